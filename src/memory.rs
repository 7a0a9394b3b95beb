//! The process's own memory: what start-up leaves mapped and what glibc's allocator keeps.
//!
//! Linux only, measured in docs/BENCHMARKS.md ("RSS under load: start-up's code pages"), with a
//! way to turn it off (docs/configuration.md, "Process memory"):
//!
//! - [`release_code_pages`], once start-up is over (config parsed, listeners bound): the pages
//!   of code and read-only data that start-up mapped into our page tables, found at that
//!   moment and only where `/proc/self/smaps` shows the file's own bytes ([`code_segments`]).
//!   Most of the binary's resident set (VmRSS counts them as `RssFile`) is code only start-up ran
//!   (config parsing, preflight, building the modules), and more of it is pages nothing ran:
//!   for every page touched the kernel maps the 64 KiB around it that the page cache holds
//!   (fault-around) or the whole page-cache folio (up to a few MiB for a binary written or
//!   read ahead in big chunks). `runtime.code_pages: unmap` (the default): `MADV_DONTNEED`,
//!   out of our page tables; what the steady state runs comes back from the page cache.
//!   `drop` (opt-in): `MADV_RANDOM` (what faults back in is read a page at a time, no
//!   read-ahead, no large folio), `MADV_DONTNEED`, then `POSIX_FADV_DONTNEED` on the binary's
//!   file: its cached pages that no process maps leave the page cache, so fault-around finds
//!   nothing to add, but that acts on the file node-wide (other pods sharing the image layer's
//!   inode, the old process of a hot restart). `keep` does nothing.
//! - [`after_trim`], with each trim of the trimmer in `main.rs`: unmaps again.
//! - Not done here: turning glibc's per-thread malloc cache off. It needs a re-exec
//!   (`GLIBC_TUNABLES` is read only at exec) and measured no smaller heap under h2c load any
//!   more (docs/BENCHMARKS.md): the allocator's part is the trimmer's in `main.rs`.
//!
//! This is the only module besides `runtime/upgrade/sys.rs` with `unsafe`: `madvise`, the
//! loader's program headers, `posix_fadvise`.

/// `runtime.code_pages` (`OUTRIGGER_CODE_PAGES`): how [`release_code_pages`] releases the
/// start-up pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CodePages {
    /// `MADV_DONTNEED`: out of our page tables only; they come back from the page cache a
    /// folio (or the 64 KiB of fault-around) at a time.
    #[default]
    Unmap,
    /// `MADV_RANDOM` and `MADV_DONTNEED` on the mappings, then `POSIX_FADV_DONTNEED` on the
    /// binary's file: the binary's pages no process maps leave the page cache, node-wide (every
    /// process sharing the file's inode: other pods from the same image layer, the old process
    /// of a hot restart); read back a page at a time.
    Drop,
    /// Left as they are.
    Keep,
}

impl CodePages {
    /// `unmap`, `drop` or `keep`; anything else is None (a config error).
    pub fn parse(value: &str) -> Option<CodePages> {
        match value {
            "unmap" => Some(CodePages::Unmap),
            "drop" => Some(CodePages::Drop),
            "keep" => Some(CodePages::Keep),
            _ => None,
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

/// The ranges [`release_code_pages`] advises, found now: every loaded object's code and
/// read-only data (the binary and each shared library: libc, libm, libgcc_s, the loader, NSS
/// modules…; not the vDSO, not writable or relocated data), page-aligned, and of those only the
/// parts inside a mapping of `/proc/self/smaps` that is private, not writable, backed by a file
/// and holds no anonymous (copied-on-write) page. So code that is not the file's bytes is never
/// advised: a packed binary's code in anonymous memory, text copied to huge pages by a preload
/// tool, a page a debugger or uprobe patched, a library relocated in its text, a library since
/// unloaded.
pub fn code_segments() -> std::io::Result<Vec<(usize, usize)>> {
    sys::releasable(&sys::read_only_segments().0)
}

/// Drops the pages of [`code_segments`] (found at this moment) from our page tables (and, for
/// [`CodePages::Drop`], the binary's unmapped pages from the page cache); see the module docs.
/// Never fails: a refused advice, or `/proc/self/smaps` unreadable (then nothing is advised),
/// is reported in [`Released::error`].
pub fn release_code_pages(how: CodePages) -> Released {
    let mut out = Released::default();
    if how == CodePages::Keep {
        return out;
    }
    let segments = match code_segments() {
        Ok(s) => s,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    for (start, end) in segments {
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

/// The mode [`after_start`] was given, for [`after_trim`]: 0 until then (nothing released).
static STARTED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Releases the code pages as `runtime.code_pages` says, [`RELEASE_DELAY`] from now, on a
/// blocking thread of the current runtime (reading smaps, `MADV_RANDOM` taking the mmap lock for
/// writing and `posix_fadvise` over the binary are kept off the workers); logs what it did at
/// debug. Call once start-up is over.
pub fn after_start(how: CodePages) {
    use std::sync::atomic::Ordering;
    STARTED.store(how as u8 + 1, Ordering::Relaxed);
    if how == CodePages::Keep {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(RELEASE_DELAY).await;
        let started = std::time::Instant::now();
        let Ok(r) = tokio::task::spawn_blocking(move || release_code_pages(how)).await else {
            return;
        };
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

/// For the trimmer, after a load: unmaps the code pages the load mapped (never the page-cache
/// drop: the next load maps them back from the page cache, without disk reads). None when
/// [`after_start`] has not run yet or `runtime.code_pages` is `keep`.
pub fn after_trim() -> Option<Released> {
    let started = STARTED.load(std::sync::atomic::Ordering::Relaxed);
    if started == 0 || started == CodePages::Keep as u8 + 1 {
        return None;
    }
    Some(release_code_pages(CodePages::Unmap))
}

/// Address ranges `[start, end)`.
type Ranges = Vec<(usize, usize)>;

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys {
    use super::{CodePages, Ranges};

    /// `[start, end)` of each loaded object's non-writable `PT_LOAD` segment, page-aligned
    /// inwards, minus any page of a `PT_GNU_RELRO` range (relocated data made read-only after
    /// relocation: its pages are private copies, and dropping them would bring back the
    /// file's unrelocated bytes). The vDSO is left out. Second: the RELRO ranges (for tests).
    pub fn read_only_segments() -> (Ranges, Ranges) {
        let mut out: (Ranges, Ranges) = Default::default();
        // SAFETY: the callback only reads the `dl_phdr_info` the loader hands it, for the
        // duration of the call, and pushes into the Vecs behind `data`.
        unsafe {
            libc::dl_iterate_phdr(Some(each), (&raw mut out).cast());
        }
        out
    }

    /// The parts of `candidates` inside a mapping of `/proc/self/smaps` (read now) that is
    /// private (`p`), not writable, file-backed (inode ≠ 0) and has `Anonymous: 0 kB`: pages
    /// that `MADV_DONTNEED` turns back into the file's bytes, and nothing else. Hand-written:
    /// the smaps format is a header line per mapping and `Key: value kB` lines, and the crates
    /// that parse it (procfs) would add a dependency for these few lines.
    pub fn releasable(candidates: &[(usize, usize)]) -> std::io::Result<Vec<(usize, usize)>> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut eligible: Vec<(usize, usize)> = Vec::new();
        let mut current: Option<(usize, usize)> = None;
        for line in smaps.lines() {
            let mut fields = line.split_ascii_whitespace();
            let Some(first) = fields.next() else { continue };
            if !first.ends_with(':') {
                // A mapping: "start-end perms offset dev inode [path]".
                current = None;
                let (Some(perms), Some(_offset), Some(_dev), Some(inode)) =
                    (fields.next(), fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let Some((s, e)) = first.split_once('-') else {
                    continue;
                };
                let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                else {
                    continue;
                };
                let perms = perms.as_bytes();
                if perms.len() == 4 && perms[1] != b'w' && perms[3] == b'p' && inode != "0" {
                    current = Some((s, e));
                }
            } else if first == "Anonymous:"
                && let Some(range) = current.take()
                && fields.next() == Some("0")
            {
                eligible.push(range);
            }
        }
        let mut out = Vec::new();
        for &(cs, ce) in candidates {
            for &(vs, ve) in &eligible {
                let (s, e) = (cs.max(vs), ce.min(ve));
                if s < e {
                    out.push((s, e));
                }
            }
        }
        Ok(out)
    }

    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid info for this call; `data` is the Vecs above.
        let (info, (out, all_relro)) = unsafe { (&*info, &mut *data.cast::<(Ranges, Ranges)>()) };
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
        all_relro.extend_from_slice(&relro);
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
            // SAFETY: [start, end) is, as /proc/self/smaps showed a moment ago, inside a private,
            // read-only file mapping of a loaded object without a copied-on-write page (see
            // releasable); these advices only drop page-table entries (and clean page-cache
            // pages), which the next access faults back in with the same bytes. (A page that a
            // debugger patches between that read and this call would be lost: a debugger stops
            // the process for that.)
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
    use super::{CodePages, Ranges};
    pub fn read_only_segments() -> (Ranges, Ranges) {
        Default::default()
    }
    pub fn releasable(_: &[(usize, usize)]) -> std::io::Result<Vec<(usize, usize)>> {
        Ok(Vec::new())
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

    /// 32 KiB of read-only data (in `.rodata`, a read-only segment), not all zeros.
    static TABLE: [u64; 4096] = {
        let mut t = [0u64; 4096];
        let mut i = 0;
        while i < t.len() {
            t[i] = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555;
            i += 1;
        }
        t
    };

    fn checksum() -> u64 {
        let t = std::hint::black_box(&TABLE);
        t.iter()
            .fold(0u64, |a, &v| a.rotate_left(5) ^ std::hint::black_box(v))
    }

    /// (start, end, perms, inode) of every mapping in /proc/self/maps.
    #[cfg(target_os = "linux")]
    fn maps() -> Vec<(usize, usize, String, String)> {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_ascii_whitespace().collect();
                let (s, e) = f[0].split_once('-').unwrap();
                (
                    usize::from_str_radix(s, 16).unwrap(),
                    usize::from_str_radix(e, 16).unwrap(),
                    f[1].to_string(),
                    f[4].to_string(),
                )
            })
            .collect()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_code_of_a_running_process_can_be_released_and_runs_on() {
        let before = checksum();
        let segments = code_segments().unwrap();
        assert!(!segments.is_empty());
        // This function's own code is in one of them, and so is the table.
        let here = the_code_of_a_running_process_can_be_released_and_runs_on as fn() as usize;
        assert!(segments.iter().any(|&(s, e)| s <= here && here < e));
        let table = TABLE.as_ptr() as usize;
        assert!(segments.iter().any(|&(s, e)| s <= table && table < e));
        // Each range inside one private, read-only, file-backed mapping; none overlaps a
        // writable mapping or a RELRO range.
        let maps = maps();
        let (_, relro) = sys::read_only_segments();
        for &(s, e) in &segments {
            let inside = maps.iter().find(|m| m.0 <= s && e <= m.1);
            let Some((_, _, perms, inode)) = inside else {
                panic!("{s:#x}-{e:#x} in no single mapping");
            };
            assert!(
                !perms.contains('w') && perms.ends_with('p') && inode != "0",
                "{perms}"
            );
            assert!(!maps.iter().any(|m| m.2.contains('w') && m.0 < e && s < m.1));
            assert!(!relro.iter().any(|&(rs, re)| rs < e && s < re));
        }
        for how in [CodePages::Unmap, CodePages::Drop] {
            let r = release_code_pages(how);
            assert!(r.error.is_none(), "{:?}", r.error);
            assert!(r.ranges > 0);
            // Still running, its read-only data the file's bytes.
            assert_eq!(checksum(), before);
        }
    }

    /// Mapping `len` bytes with `prot` and `flags` (fd -1 for anonymous); unmapped on drop.
    #[cfg(target_os = "linux")]
    struct Map(usize, usize);
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    impl Map {
        fn new(len: usize, prot: i32, flags: i32, fd: i32) -> Map {
            // SAFETY: a fresh mapping the kernel places; checked below.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
            assert_ne!(p, libc::MAP_FAILED);
            Map(p as usize, len)
        }
        fn range(&self) -> (usize, usize) {
            (self.0, self.0 + self.1)
        }
    }
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no reference into it is left.
            unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    #[allow(unsafe_code)]
    fn code_that_is_not_the_files_bytes_is_never_released() {
        use std::os::fd::AsRawFd;
        let len = 2 * 4096;
        // Code in anonymous memory (a packed binary, text copied to huge pages): skipped.
        let anon = Map::new(
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        );
        assert_eq!(sys::releasable(&[anon.range()]).unwrap(), vec![]);
        // A file's pages, mapped private, read-only and executable: released.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("code");
        std::fs::write(&path, vec![0xc3u8; len]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let clean = Map::new(
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
        );
        // SAFETY: reading our own mapping (faults a page in).
        assert_eq!(
            unsafe { std::ptr::read_volatile(clean.0 as *const u8) },
            0xc3
        );
        assert_eq!(
            sys::releasable(&[clean.range()]).unwrap(),
            vec![clean.range()]
        );
        // The same file with a page written (copied on write, as a breakpoint does), then made
        // read-only and executable: skipped.
        let patched = Map::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
        );
        // SAFETY: writing our own private, writable mapping, then changing its protection.
        unsafe {
            std::ptr::write_volatile(patched.0 as *mut u8, 0xcc);
            assert_eq!(
                libc::mprotect(
                    patched.0 as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_EXEC
                ),
                0
            );
        }
        assert_eq!(sys::releasable(&[patched.range()]).unwrap(), vec![]);
        // Released anyway, the patched page would read 0xc3 again: that is what is avoided.
        // SAFETY: reading our own mapping.
        assert_eq!(
            unsafe { std::ptr::read_volatile(patched.0 as *const u8) },
            0xcc
        );
    }

    #[test]
    fn only_the_three_modes_are_accepted() {
        assert_eq!(CodePages::default(), CodePages::Unmap);
        assert_eq!(CodePages::parse("drop"), Some(CodePages::Drop));
        assert_eq!(CodePages::parse("keep"), Some(CodePages::Keep));
        for bad in ["false", "0", "Keep", "off", ""] {
            assert_eq!(CodePages::parse(bad), None, "{bad}");
        }
    }
}
