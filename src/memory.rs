//! The process's own memory: what start-up leaves mapped and what glibc's allocator keeps.
//!
//! Linux only, measured in docs/BENCHMARKS.md ("RSS under load: start-up's code pages"), with a
//! way to turn it off (docs/configuration.md, "Process memory"):
//!
//! - [`release_code_pages`], once start-up is over (config parsed, listeners bound): the pages
//!   of code and read-only data that start-up mapped into our page tables. Most of the
//!   binary's resident set (VmRSS counts them as `RssFile`) is code only start-up ran
//!   (config parsing, preflight, building the modules), and more of it is pages nothing ran:
//!   for every page touched the kernel maps the 64 KiB around it that the page cache holds
//!   (fault-around) or the whole page-cache folio (up to a few MiB for a binary written or
//!   read ahead in big chunks), and `MADV_RANDOM` does not change that. So: `MADV_RANDOM`
//!   (what faults back in is read a page at a time, no read-ahead, no large folio),
//!   `MADV_DONTNEED` (out of our page tables), then `POSIX_FADV_DONTNEED` on the binary's file
//!   (its cached pages that no process maps leave the page cache, so fault-around finds
//!   nothing to add). What the steady state runs comes back, and little else:
//!   `OUTRIGGER_CODE_PAGES=unmap` stops before the page cache, `=keep` does nothing.
//! - Not done here: turning glibc's per-thread malloc cache off. It needs a re-exec
//!   (`GLIBC_TUNABLES` is read only at exec) and measured no smaller heap under h2c load any
//!   more (docs/BENCHMARKS.md): the allocator's part is the trimmer's in `main.rs`.
//!
//! This is the only module besides `runtime/upgrade/sys.rs` with `unsafe`: `madvise`, the
//! loader's program headers, `posix_fadvise`.

/// `OUTRIGGER_CODE_PAGES`: `drop` (default), `unmap` or `keep`.
pub const CODE_PAGES_ENV: &str = "OUTRIGGER_CODE_PAGES";

/// How [`release_code_pages`] drops the start-up pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodePages {
    /// `MADV_RANDOM` and `MADV_DONTNEED` on the mappings, `POSIX_FADV_DONTNEED` on the
    /// binary's file: out of our page tables, the binary's pages no process maps out of the
    /// page cache; read back a page at a time.
    Drop,
    /// `MADV_DONTNEED`: out of our page tables only; they come back a folio at a time.
    Unmap,
    /// Left as they are.
    Keep,
}

impl CodePages {
    /// From `OUTRIGGER_CODE_PAGES` (an unknown value keeps the default).
    pub fn from_env() -> CodePages {
        match std::env::var(CODE_PAGES_ENV).as_deref() {
            Ok("keep" | "off") => CodePages::Keep,
            Ok("unmap" | "dontneed") => CodePages::Unmap,
            _ => CodePages::Drop,
        }
    }
}

/// What [`release_code_pages`] did: ranges advised and bytes covered, and the first error.
#[derive(Debug, Default)]
pub struct Released {
    pub ranges: usize,
    pub bytes: usize,
    pub error: Option<std::io::Error>,
}

/// The ranges [`release_code_pages`] advises: every loaded object's code and read-only data
/// (the binary, libc, the loader; not the vDSO, not writable or relocated data), page-aligned.
pub fn code_segments() -> Vec<(usize, usize)> {
    sys::read_only_segments()
}

/// Drops the pages of `segments` (from [`code_segments`]) from our page tables (and, for
/// [`CodePages::Drop`], the binary's unmapped pages from the page cache); see the module docs.
/// Allocates nothing. Never fails: a refused advice is reported in [`Released::error`] and
/// skipped.
pub fn release_code_pages(segments: &[(usize, usize)], how: CodePages) -> Released {
    let mut out = Released::default();
    if how == CodePages::Keep {
        return out;
    }
    for &(start, end) in segments {
        out.ranges += 1;
        out.bytes += end - start;
        if let Err(e) = sys::advise(start, end, how)
            && out.error.is_none()
        {
            out.error = Some(e);
        }
    }
    if how == CodePages::Drop
        && let Err(e) = sys::drop_binary_cache()
        && out.error.is_none()
    {
        out.error = Some(e);
    }
    out
}

/// How long after "outrigger started" [`after_start`] releases the code pages: the tasks start-up
/// spawned (listeners, admin, the modules, the app's first probe) run their first steps after
/// that point, and releasing at once left ~5 MiB of their code mapped (docs/BENCHMARKS.md).
pub const RELEASE_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Releases the code pages as `OUTRIGGER_CODE_PAGES` says, [`RELEASE_DELAY`] from now, on a task
/// of the current runtime; logs what it did at debug. Call once start-up is over.
pub fn after_start() {
    let how = CodePages::from_env();
    if how == CodePages::Keep {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(RELEASE_DELAY).await;
        let started = std::time::Instant::now();
        // A few syscalls over the binary's mappings: well under a millisecond, so inline.
        let r = release_code_pages(&code_segments(), how);
        tracing::debug!(
            ?how,
            ranges = r.ranges,
            bytes = r.bytes,
            elapsed_us = started.elapsed().as_micros() as u64,
            error = ?r.error,
            "start-up code pages released"
        );
    });
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys {
    use super::CodePages;

    /// `[start, end)` of each loaded object's non-writable `PT_LOAD` segment, page-aligned
    /// inwards, minus any page of a `PT_GNU_RELRO` range (relocated data made read-only after
    /// relocation: its pages are private copies, and dropping them would bring back the
    /// file's unrelocated bytes). The vDSO is left out.
    pub fn read_only_segments() -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        // SAFETY: the callback only reads the `dl_phdr_info` the loader hands it, for the
        // duration of the call, and pushes into the Vec behind `data`.
        unsafe {
            libc::dl_iterate_phdr(Some(each), (&raw mut out).cast());
        }
        out
    }

    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info for this call; `data` is the Vec above.
        let (info, out) = unsafe { (&*info, &mut *data.cast::<Vec<(usize, usize)>>()) };
        if !info.dlpi_name.is_null() {
            // SAFETY: a NUL-terminated name owned by the loader.
            let name = unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) };
            if name.to_bytes().starts_with(b"linux-vdso")
                || name.to_bytes().starts_with(b"linux-gate")
            {
                return 0;
            }
        }
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: dlpi_phnum headers at dlpi_phdr, as the loader describes the object.
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        let page = page_size();
        let base = info.dlpi_addr as usize;
        let relro: Vec<(usize, usize)> = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_GNU_RELRO)
            .map(|p| {
                let s = base + p.p_vaddr as usize;
                (
                    s & !(page - 1),
                    (s + p.p_memsz as usize).next_multiple_of(page),
                )
            })
            .collect();
        for p in phdrs {
            if p.p_type != libc::PT_LOAD || p.p_flags & libc::PF_W != 0 {
                continue;
            }
            let s = base + p.p_vaddr as usize;
            let (mut start, end) = (
                s.next_multiple_of(page),
                (s + p.p_memsz as usize) & !(page - 1),
            );
            for &(rs, re) in &relro {
                // Keep only the part before a RELRO range it overlaps (the linkers put RELRO
                // in a writable segment; this is in case one does not).
                if rs < end && re > start {
                    if rs > start {
                        out.push((start, rs));
                    }
                    start = re;
                }
            }
            if start < end {
                out.push((start, end));
            }
        }
        0
    }

    fn page_size() -> usize {
        // SAFETY: sysconf only reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        page.max(4096) as usize
    }

    pub fn advise(start: usize, end: usize, how: CodePages) -> std::io::Result<()> {
        let advise = |advice| {
            // SAFETY: [start, end) is a read-only, unrelocated file mapping of a loaded object
            // (see read_only_segments); these advices only drop page-table entries (and clean
            // page-cache pages), which the next access faults back in with the same bytes.
            if unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        match how {
            CodePages::Keep => Ok(()),
            CodePages::Unmap => advise(libc::MADV_DONTNEED),
            CodePages::Drop => {
                // No read-ahead when they come back: a page at a time, not a folio.
                let random = advise(libc::MADV_RANDOM);
                advise(libc::MADV_DONTNEED).and(random)
            }
        }
    }

    /// `POSIX_FADV_DONTNEED` on the running binary's file: its clean cached pages that no
    /// process maps leave the page cache (pages another process maps stay).
    pub fn drop_binary_cache() -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open("/proc/self/exe")?;
        // SAFETY: an advice on a descriptor we own; it changes no memory of ours.
        let e = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if e != 0 {
            return Err(std::io::Error::from_raw_os_error(e));
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use super::CodePages;
    pub fn read_only_segments() -> Vec<(usize, usize)> {
        Vec::new()
    }
    pub fn advise(_: usize, _: usize, _: CodePages) -> std::io::Result<()> {
        Ok(())
    }
    pub fn drop_binary_cache() -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_code_of_a_running_process_can_be_released_and_runs_on() {
        let segments = sys::read_only_segments();
        assert!(!segments.is_empty());
        // This function's own code is in one of them.
        let here = the_code_of_a_running_process_can_be_released_and_runs_on as fn() as usize;
        assert!(segments.iter().any(|&(s, e)| s <= here && here < e));
        for how in [CodePages::Unmap, CodePages::Drop] {
            let r = release_code_pages(&segments, how);
            assert!(r.error.is_none(), "{:?}", r.error);
            assert_eq!(r.ranges, segments.len());
        }
        // Still running, its read-only data intact.
        assert_eq!(CODE_PAGES_ENV, "OUTRIGGER_CODE_PAGES");
    }
}
