//! The disk buffer of the app's stdout/stderr (`logs.buffer`): the app cannot be paused, so
//! while the sink is slow or down its lines go to spool files instead of waiting in memory.
//!
//! A writer thread takes the app's lines from the capture queue and appends them to
//! `DIR/spool-NNNNNNNNNNNN.log` in the CRI format (`TIME STREAM F|P LINE`, `P` for a line cut at
//! [`MAX_LINE`](crate::lifecycle::capture::MAX_LINE)); a file is closed for writing once it
//! holds [`Spool::segment`] bytes and the next one begins. The pipeline reads the spool files as
//! an ordinary file source ([`super::files`], `format: cri`), so their positions are
//! checkpointed after the sink's acknowledgement like any file's: the lines survive a sink
//! outage and a restart of Outrigger (at-least-once, as for files). A file the writer is done
//! with and the sink acknowledged to its end is deleted ([`Spool::collect`]).
//!
//! Past `max_bytes` of spool files the app's new lines are dropped and counted
//! (`reason="buffer_full"`); lines a write failed for (a full disk, an I/O error) are dropped and
//! counted apart (`reason="buffer_error"`). The writer only ever writes whole lines, and the
//! reader only ever reads lines with their end ([`super::files::FileSource::whole_lines`]), so
//! an unterminated tail is never shipped: a write that fails partway is cut back; when even that
//! fails, the file is closed with its torn tail noted ([`Spool::torn`]) and deleted once its
//! whole lines are shipped. A kill in the middle of a write leaves such a tail too: the next
//! start notes it the same way. The file is never changed after a tear, so the reader, which
//! checks a file's first bytes, never takes it for a replaced one.
//!
//! The echo to Outrigger's own stdout/stderr happens after a line is put in the capture queue
//! ([`crate::lifecycle::capture`]) and never waits for the disk; the writer does. Writes are not
//! fsynced: the lines survive Outrigger being killed (they are in the kernel's page cache), not
//! a power cut.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tracing::warn;

use super::checkpoint::Position;
use crate::config::logs::Buffer;
use crate::lifecycle::capture::{AppLine, Captured, MAX_LINE};
use crate::telemetry::json;

/// Spool file names: `spool-` and a 12-digit sequence number (sorts as it was written).
const PREFIX: &str = "spool-";
const SUFFIX: &str = ".log";
/// The smallest and largest spool file: a quarter of the cap, so acknowledged bytes are given
/// back in steps of at most a quarter, between 256 KiB and 64 MiB.
const SEGMENT_MIN: u64 = 256 << 10;
const SEGMENT_MAX: u64 = 64 << 20;

/// The disk buffer, shared by its writer thread and the pipeline.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes of the spool files on disk.
    bytes: AtomicU64,
    /// The sequence number of the file being written (never deleted).
    current: AtomicU64,
    /// The writer saw the app's stdout/stderr close and wrote its last line.
    done: AtomicBool,
    /// Files closed with a torn tail (a failed write that could not be cut back): sequence
    /// number → the length of their whole lines.
    torn: std::sync::Mutex<std::collections::BTreeMap<u64, u64>>,
    gauge: Gauge,
}

/// What the writer counts.
pub struct WriterMetrics {
    /// The app's lines dropped because the buffer was full.
    pub dropped: Counter,
    /// The app's lines dropped because writing them failed.
    pub failed: Counter,
    /// The app's lines not echoed (read from the capture queue's counter).
    pub echo_dropped: Counter,
    /// Bytes in the in-memory capture queue.
    pub queued: Gauge,
}

impl Spool {
    /// The disk buffer in `config.dir`: takes the measure of the spool files already there (a
    /// restart's), notes those with an unterminated tail as torn, and starts a new file.
    pub fn open(config: &Buffer, gauge: Gauge) -> std::io::Result<Arc<Spool>> {
        std::fs::create_dir_all(&config.dir)?;
        let files = list(&config.dir)?;
        let bytes: u64 = files
            .iter()
            .map(|(_, path)| std::fs::metadata(path).map_or(0, |m| m.len()))
            .sum();
        // An unterminated tail is a torn write a previous run could not cut back, or a write a
        // kill cut short (the last file's, most likely): the rest of that line is gone, so it
        // is not shipped as a line; the file is deleted once its whole lines are shipped.
        let mut torn = std::collections::BTreeMap::new();
        for (seq, path) in &files {
            match whole_lines(path) {
                Ok(Some(whole)) => {
                    warn!(path = %path.display(), "a spool file ends with a torn line (a failed write, or a kill in the middle of one); it will not be shipped");
                    torn.insert(*seq, whole);
                }
                Ok(None) => {}
                // Read as it is (its whole lines shipped); deleted once acknowledged to its end.
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read the end of a spool file")
                }
            }
        }
        let current = files.last().map_or(0, |(seq, _)| seq + 1);
        let spool = Arc::new(Spool {
            dir: config.dir.clone(),
            max_bytes: config.max_bytes as u64,
            bytes: AtomicU64::new(0),
            current: AtomicU64::new(current),
            done: AtomicBool::new(false),
            torn: std::sync::Mutex::new(torn),
            gauge,
        });
        spool.add(bytes as i64);
        Ok(spool)
    }

    /// The glob the pipeline follows.
    pub fn glob(&self) -> String {
        format!("{}/{PREFIX}*{SUFFIX}", self.dir.display())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the writer is done: the app's stdout/stderr closed and every line taken is on
    /// disk.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// The sequence number of the file being written: when it moves on, the file before it
    /// may have been shipped to its end already and can be collected.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// How large a spool file grows before the next one begins.
    pub fn segment(&self) -> u64 {
        (self.max_bytes / 4).clamp(SEGMENT_MIN, SEGMENT_MAX)
    }

    fn add(&self, delta: i64) {
        let now = if delta >= 0 {
            self.bytes.fetch_add(delta as u64, Ordering::AcqRel) + delta as u64
        } else {
            let d = delta.unsigned_abs();
            self.bytes.fetch_sub(d, Ordering::AcqRel).saturating_sub(d)
        };
        self.gauge.set(now as i64);
    }

    /// Starts the writer thread: it drains `captured` until the app's stdout/stderr close.
    pub fn start(
        self: &Arc<Spool>,
        captured: Captured,
        metrics: WriterMetrics,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        let spool = self.clone();
        std::thread::Builder::new()
            .name("logs-spool".into())
            .spawn(move || {
                spool.write(captured, &metrics, &rt);
                spool.done.store(true, Ordering::Release);
            })?;
        Ok(())
    }

    /// The writer's loop: waits for a line, takes what else is queued (up to 1 MiB and the
    /// current file's room), appends it in one write.
    fn write(&self, mut captured: Captured, metrics: &WriterMetrics, rt: &tokio::runtime::Handle) {
        let mut file: Option<(File, u64)> = None;
        let mut chunk = Vec::with_capacity(1 << 20);
        while let Some(first) = rt.block_on(captured.recv()) {
            let now = std::time::SystemTime::now();
            // At most what the current file has room for (and 1 MiB): files keep to their
            // segment size, so shipped bytes are given back in segments.
            let segment = self.segment();
            let limit = match &file {
                Some((_, n)) if *n < segment => segment - n,
                _ => segment,
            }
            .min(1 << 20) as usize;
            let mut next = Some(first);
            let mut dropped = 0u64;
            while let Some(l) = next.take() {
                let mark = chunk.len();
                encode(&mut chunk, &l, now);
                let total = self.bytes.load(Ordering::Acquire) + chunk.len() as u64;
                if total > self.max_bytes {
                    chunk.truncate(mark);
                    dropped += 1;
                }
                if chunk.len() < limit {
                    next = captured.try_recv().ok();
                }
            }
            metrics.queued.set(captured.queued_bytes() as i64);
            metrics
                .echo_dropped
                .inc_by(captured.take_echo_dropped() as u64);
            // Lines the capture queue itself refused (its memory cap) as well.
            let queue_dropped = captured.take_dropped() as u64;
            self.store(&mut file, &chunk, dropped, queue_dropped, metrics);
            chunk.clear();
        }
        metrics.dropped.inc_by(captured.take_dropped() as u64);
    }

    /// Writes `chunk` and counts what was lost: `full` lines the buffer had no room for and
    /// `queue_dropped` the capture queue refused (`buffer_full`), the lines a failed write lost
    /// (`buffer_error`).
    fn store(
        &self,
        file: &mut Option<(File, u64)>,
        chunk: &[u8],
        full: u64,
        queue_dropped: u64,
        metrics: &WriterMetrics,
    ) {
        if full + queue_dropped > 0 {
            metrics.dropped.inc_by(full + queue_dropped);
        }
        if !chunk.is_empty()
            && let Err((e, lost)) = self.append(file, chunk)
        {
            warn!(error = %e, dir = %self.dir.display(), lines = lost, "cannot write the app's lines to the disk buffer; dropping them");
            metrics.failed.inc_by(lost);
        }
        // The buffer is full: the file being written is closed now, not once it reaches its
        // segment size (it may never: no line is written while the buffer is full), so it can
        // be deleted once shipped and the buffer frees up.
        if full > 0 {
            self.next_file(file);
        }
    }

    /// Closes the file being written, if it holds anything: the next write begins the next one.
    fn next_file(&self, file: &mut Option<(File, u64)>) {
        if file.as_ref().is_some_and(|(_, n)| *n > 0) {
            *file = None;
            self.current.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Appends `chunk` (whole lines) to the current spool file, beginning the next one when it
    /// is full. A write that fails partway (a full disk) is taken back, so no piece of a line
    /// without its end is left for the next write to continue. If even that fails, the file is
    /// closed and noted as torn at the end of its whole lines: the lines written whole are
    /// shipped, the torn piece is not ([`Spool::collect`]). On failure, the error and the
    /// number of lines of `chunk` not on disk.
    fn append(
        &self,
        file: &mut Option<(File, u64)>,
        chunk: &[u8],
    ) -> Result<(), (std::io::Error, u64)> {
        let lines = |b: &[u8]| memchr::memchr_iter(b'\n', b).count() as u64;
        if file.as_ref().is_some_and(|(_, n)| *n >= self.segment()) {
            self.next_file(file);
        }
        if file.is_none() {
            let path = self.path(self.current.load(Ordering::Acquire));
            let opened = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|f| Ok((f.metadata()?.len(), f)));
            let (len, f) = opened.map_err(|e| (e, lines(chunk)))?;
            *file = Some((f, len));
        }
        let (f, n) = file.as_mut().expect("opened above");
        if let Err(e) = write_all(f, chunk) {
            if cut_back(f, *n).is_ok() {
                return Err((e, lines(chunk)));
            }
            // What is on disk now: the lines written whole stay (and are shipped), the piece
            // after them is torn.
            let on_disk = f.metadata().map_or(*n, |m| m.len()).max(*n);
            let written = &chunk[..((on_disk - *n) as usize).min(chunk.len())];
            let whole = memchr::memrchr(b'\n', written).map_or(0, |i| i + 1);
            let seq = self.current.load(Ordering::Acquire);
            warn!(path = %self.path(seq).display(), "cannot cut a failed write back; the file is closed, its torn last line will not be shipped");
            self.torn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(seq, *n + whole as u64);
            self.add((on_disk - *n) as i64);
            *file = None;
            self.current.fetch_add(1, Ordering::AcqRel);
            return Err((e, lines(chunk) - lines(written)));
        }
        *n += chunk.len() as u64;
        self.add(chunk.len() as i64);
        Ok(())
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{seq:012}{SUFFIX}"))
    }

    /// Deletes the spool files the writer is done with that `acked` (what the checkpoint now
    /// holds) covers to their end. Blocking file I/O.
    pub fn collect<'a>(&self, acked: impl IntoIterator<Item = &'a Position>) {
        use std::os::unix::fs::MetadataExt;
        let current = self.current.load(Ordering::Acquire);
        for p in acked {
            let Some(seq) = sequence(&p.path) else {
                continue;
            };
            if seq >= current || p.path.parent() != Some(self.dir.as_path()) {
                continue;
            }
            let Ok(m) = std::fs::metadata(&p.path) else {
                continue;
            };
            if m.ino() != p.id.ino || m.dev() != p.id.dev {
                continue;
            }
            // A torn file ends at its whole lines (the reader reads no further).
            let mut torn = self.torn.lock().unwrap_or_else(|e| e.into_inner());
            if p.offset < torn.get(&seq).copied().unwrap_or(m.len()) {
                continue;
            }
            match std::fs::remove_file(&p.path) {
                Ok(()) => {
                    torn.remove(&seq);
                    self.add(-(m.len() as i64))
                }
                Err(e) => {
                    warn!(error = %e, path = %p.path.display(), "cannot delete a shipped spool file")
                }
            }
        }
    }
}

/// `f.write_all(chunk)`; in tests, a write can be made to fail after some bytes (a full disk
/// is not something a test can arrange portably, nor a `set_len` that fails).
fn write_all(mut f: &File, chunk: &[u8]) -> std::io::Result<()> {
    #[cfg(test)]
    if let Some(k) = tests::WRITE_FAILS_AFTER.with(std::cell::Cell::get) {
        f.write_all(&chunk[..k.min(chunk.len())])?;
        return Err(std::io::Error::other("no space left (test)"));
    }
    f.write_all(chunk)
}

/// Cuts `f` back to `len` bytes: what a failed write left after them is taken back.
fn cut_back(f: &File, len: u64) -> std::io::Result<()> {
    #[cfg(test)]
    if tests::CUT_BACK_FAILS.with(std::cell::Cell::get) {
        return Err(std::io::Error::other("cut back fails (test)"));
    }
    f.set_len(len)
}

/// The longest CRI prefix and line end the writer adds to a piece of the app's line: the time
/// (`2024-01-01T00:00:00.000000Z`, always 27 bytes), ` stdout P ` and `\n`.
const FRAME_MAX: usize = 27 + " stdout P ".len() + 1;
/// The largest piece of an app's line in one spool line: with its frame it fits the
/// [`MAX_LINE`] the file reader reads a line in, so a line the capture cut at `MAX_LINE` is not
/// cut again (its last bytes a record of their own, not in the CRI format).
const PIECE_MAX: usize = MAX_LINE - FRAME_MAX;

/// One line in the CRI format: in pieces of at most [`PIECE_MAX`] bytes, all but the last
/// flagged `P` (the last too when the capture cut the line), which the reader joins again.
fn encode(out: &mut Vec<u8>, l: &AppLine, now: std::time::SystemTime) {
    let mut pieces = l.line.chunks(PIECE_MAX).peekable();
    let mut first = true;
    while first || pieces.peek().is_some() {
        first = false;
        let piece = pieces.next().unwrap_or_default();
        let cut = l.cut || pieces.peek().is_some();
        json::time(out, now);
        out.push(b' ');
        out.extend_from_slice(l.stream.as_str().as_bytes());
        out.extend_from_slice(if cut { b" P " } else { b" F " });
        out.extend_from_slice(piece);
        out.push(b'\n');
    }
}

/// The sequence number of a spool file's name.
fn sequence(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)?
        .parse()
        .ok()
}

/// The spool files in `dir`, oldest first.
fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let path = e.ok()?.path();
            Some((sequence(&path)?, path))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The length of a spool file's whole lines when it ends with a torn piece (no `\n`), None
/// when it ends with a whole line. A torn piece is shorter than a write (1 MiB).
fn whole_lines(path: &Path) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut last = [0u8];
    if len == 0 || f.read_exact_at(&mut last, len - 1).is_ok() && last[0] == b'\n' {
        return Ok(None);
    }
    let from = len.saturating_sub(2 << 20);
    let mut tail = vec![0; (len - from) as usize];
    f.read_exact_at(&mut tail, from)?;
    if tail.last().is_none_or(|&b| b == b'\n') {
        return Ok(None);
    }
    Ok(Some(
        from + memchr::memrchr(b'\n', &tail).map_or(0, |i| i as u64 + 1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::capture::Stream;
    use std::cell::Cell;

    thread_local! {
        /// A spool write on this thread writes this many bytes, then fails.
        pub(super) static WRITE_FAILS_AFTER: Cell<Option<usize>> = const { Cell::new(None) };
        /// Cutting a failed write back fails on this thread.
        pub(super) static CUT_BACK_FAILS: Cell<bool> = const { Cell::new(false) };
    }

    fn position(path: &Path, offset: u64) -> Position {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        Position {
            path: path.to_path_buf(),
            id: super::super::checkpoint::FileId {
                dev: m.dev(),
                ino: m.ino(),
            },
            offset,
            head_len: 0,
            head_hash: 0,
        }
    }

    /// A write that fails partway is cut back; when cutting back fails too, the file is closed
    /// and its whole lines are kept (counted as written), the torn piece noted: once the whole
    /// lines are acknowledged the file is deleted, left as it is until then — in this run, and
    /// in the next one (the note is found again from the file).
    #[test]
    fn a_torn_write_that_cannot_be_cut_back_is_closed_and_deleted_once_its_whole_lines_are_shipped()
    {
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 1 << 20);
        let mut file = None;
        let line = |i: usize| format!("1970-01-01T00:00:00.000000Z stdout F line {i}\n");
        let first = line(0);
        s.append(&mut file, first.as_bytes()).unwrap();
        let chunk: String = (1..4).map(line).collect();
        let partway = first.len() + first.len() / 2; // line 1 whole, half of line 2

        // Cut back: nothing of the chunk stays, every line of it is lost.
        WRITE_FAILS_AFTER.set(Some(partway));
        let (_, lost) = s.append(&mut file, chunk.as_bytes()).unwrap_err();
        assert_eq!(lost, 3);
        let path0 = s.path(0);
        assert_eq!(std::fs::read_to_string(&path0).unwrap(), first);
        assert_eq!(s.current(), 0);

        // Not cut back: line 1 stays whole, the file is closed, torn after it.
        CUT_BACK_FAILS.set(true);
        let (_, lost) = s.append(&mut file, chunk.as_bytes()).unwrap_err();
        WRITE_FAILS_AFTER.set(None);
        CUT_BACK_FAILS.set(false);
        assert_eq!(lost, 2);
        assert!(file.is_none());
        assert_eq!(s.current(), 1);
        let whole = (first.len() * 2) as u64;
        let on_disk = std::fs::metadata(&path0).unwrap().len();
        assert_eq!(on_disk, first.len() as u64 + partway as u64);
        assert_eq!(s.bytes.load(Ordering::Acquire), on_disk);
        s.append(&mut file, line(9).as_bytes()).unwrap();

        // Acknowledged short of its whole lines: kept; to their end: deleted, never changed
        // (the reader's look at its first bytes still matches).
        s.collect([&position(&path0, first.len() as u64)]);
        assert!(path0.exists());
        let reader = File::open(&path0).unwrap();
        s.collect([&position(&path0, whole)]);
        assert!(!path0.exists());
        assert_eq!(reader.metadata().unwrap().len(), on_disk);
        assert!(s.torn.lock().unwrap().is_empty());
        assert_eq!(s.bytes.load(Ordering::Acquire), line(9).len() as u64);

        // The next run finds a torn file (before the last) again from its content.
        let path1 = s.path(1);
        drop(s);
        let torn = format!("{}1970-01-01T00:00", line(10));
        std::fs::write(&path1, &torn).unwrap();
        std::fs::write(s_path(dir.path(), 2), line(11)).unwrap();
        let s = spool(dir.path(), 1 << 20);
        let whole = line(10).len() as u64;
        assert_eq!(s.torn.lock().unwrap().get(&1), Some(&whole));
        s.collect([&position(&path1, whole)]);
        assert!(!path1.exists());
    }

    fn s_path(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!("{PREFIX}{seq:012}{SUFFIX}"))
    }

    fn spool(dir: &Path, max_bytes: usize) -> Arc<Spool> {
        Spool::open(
            &Buffer {
                dir: dir.to_path_buf(),
                max_bytes,
            },
            Gauge::default(),
        )
        .unwrap()
    }

    #[test]
    fn lines_are_written_in_cri_format_rotated_by_size_and_collected_once_acknowledged() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 1 << 20);
        assert_eq!(s.segment(), SEGMENT_MIN);
        let mut file = None;
        let mut chunk = Vec::new();
        let line = AppLine {
            stream: Stream::Stderr,
            line: b"hello".to_vec(),
            cut: false,
        };
        encode(&mut chunk, &line, std::time::UNIX_EPOCH);
        assert_eq!(chunk, b"1970-01-01T00:00:00.000000Z stderr F hello\n");
        // A line the capture cut at MAX_LINE: in pieces that fit MAX_LINE with their frame,
        // all flagged P.
        let mut long = Vec::new();
        let cut = AppLine {
            stream: Stream::Stdout,
            line: vec![b'a'; MAX_LINE],
            cut: true,
        };
        encode(&mut long, &cut, std::time::UNIX_EPOCH);
        let pieces: Vec<&[u8]> = long.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.len() <= MAX_LINE));
        assert_eq!(pieces[0].len(), MAX_LINE);
        assert!(pieces.iter().all(|p| p[27..].starts_with(b" stdout P ")));
        assert_eq!(long.len(), MAX_LINE + 2 * FRAME_MAX);
        // Its rest: the last piece F; an empty line is one line.
        long.clear();
        let rest = AppLine { cut: false, ..cut };
        encode(&mut long, &rest, std::time::UNIX_EPOCH);
        let tail = [&b" stdout F "[..], &[b'a'; FRAME_MAX], b"\n"].concat();
        assert!(long.ends_with(&tail));
        long.clear();
        encode(
            &mut long,
            &AppLine {
                line: Vec::new(),
                ..rest
            },
            std::time::UNIX_EPOCH,
        );
        assert_eq!(long, b"1970-01-01T00:00:00.000000Z stdout F \n");
        let big = vec![b'x'; SEGMENT_MIN as usize];
        s.append(&mut file, &big).unwrap();
        s.append(&mut file, &chunk).unwrap();
        let files = list(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            s.bytes.load(Ordering::Acquire),
            big.len() as u64 + chunk.len() as u64
        );
        let position = |path: &Path, offset: u64| {
            let m = std::fs::metadata(path).unwrap();
            Position {
                path: path.to_path_buf(),
                id: super::super::checkpoint::FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                },
                offset,
                head_len: 0,
                head_hash: 0,
            }
        };
        // Not to its end, then the current file: both kept.
        let first = position(&files[0].1, 10);
        let current = position(&files[1].1, chunk.len() as u64);
        s.collect([&first, &current]);
        assert_eq!(list(dir.path()).unwrap().len(), 2);
        s.collect([&position(&files[0].1, big.len() as u64)]);
        assert_eq!(list(dir.path()).unwrap().len(), 1);
        assert_eq!(s.bytes.load(Ordering::Acquire), chunk.len() as u64);

        // A restart: the measure is taken again, a line a kill cut short noted torn (left as
        // it is, not ended: it would ship as a line), a new file begun.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&files[1].1)
            .unwrap()
            .write_all(b"1970-01-01T00:00:00Z stdout F cut sh")
            .unwrap();
        let s = spool(dir.path(), 1 << 20);
        assert!(std::fs::read(&files[1].1).unwrap().ends_with(b"cut sh"));
        assert_eq!(s.torn.lock().unwrap().get(&1), Some(&(chunk.len() as u64)));
        assert_eq!(s.current.load(Ordering::Acquire), 2);
        assert_eq!(
            s.bytes.load(Ordering::Acquire),
            std::fs::metadata(&files[1].1).unwrap().len()
        );
        s.collect([&position(&files[1].1, chunk.len() as u64)]);
        assert!(list(dir.path()).unwrap().is_empty());
        assert_eq!(s.bytes.load(Ordering::Acquire), 0);
    }

    /// Torn spool files read by the spool source after a restart: small ones (shorter than
    /// the reader's look at a file's first bytes), one before the last and the last (a kill
    /// mid-write). Their whole lines arrive once; the torn pieces never, not even once the
    /// files are acknowledged, deleted and their readers closed.
    #[test]
    fn torn_spool_files_ship_their_whole_lines_once_and_never_their_torn_piece() {
        use super::super::files::{FileSource, Files};
        let dir = tempfile::tempdir().unwrap();
        let line = |m: &str| format!("1970-01-01T00:00:00.000000Z stdout F {m}\n");
        let (a, b, c) = (line("a"), line("b"), line("c"));
        std::fs::write(s_path(dir.path(), 0), format!("{a}{b}1970-01-01T00:00:0")).unwrap();
        std::fs::write(
            s_path(dir.path(), 1),
            format!("{c}1970-01-01T00:00:00.000000Z std"),
        )
        .unwrap();
        let s = spool(dir.path(), 1 << 20);
        assert_eq!(s.current(), 2);
        let mut f = Files::new(
            vec![FileSource {
                source: 0,
                matcher: crate::config::logs::compile_glob(&s.glob()).unwrap(),
                base: dir.path().to_path_buf(),
                from_end: false,
                rotate_wait: std::time::Duration::ZERO,
                container: Some(crate::config::logs::Container::Cri),
                multiline: None,
                limit: None,
                whole_lines: true,
            }],
            Default::default(),
        );
        let mut got = Vec::new();
        let mut round = |f: &mut Files| {
            f.scan();
            f.read(|l| {
                got.push(String::from_utf8_lossy(l.line).into_owned());
                true
            });
        };
        for _ in 0..3 {
            round(&mut f);
        }
        // What the sink acknowledged: each file to the end of its whole lines.
        let whole = [(a.len() + b.len()) as u64, c.len() as u64];
        s.collect([
            &position(&s_path(dir.path(), 0), whole[0]),
            &position(&s_path(dir.path(), 1), whole[1]),
        ]);
        assert!(list(dir.path()).unwrap().is_empty());
        for _ in 0..3 {
            round(&mut f);
        }
        assert_eq!(got, ["a", "b", "c"]);
        assert_eq!(s.bytes.load(Ordering::Acquire), 0);
    }

    /// Lines a write failed for and lines the full buffer refused are counted apart.
    #[test]
    fn write_failures_and_a_full_buffer_are_counted_apart() {
        let dir = tempfile::tempdir().unwrap();
        let s = spool(dir.path(), 1 << 20);
        let metrics = WriterMetrics {
            dropped: Counter::default(),
            failed: Counter::default(),
            echo_dropped: Counter::default(),
            queued: Gauge::default(),
        };
        let mut file = None;
        let chunk = "1970-01-01T00:00:00.000000Z stdout F a\n".repeat(3);
        WRITE_FAILS_AFTER.set(Some(10));
        s.store(&mut file, chunk.as_bytes(), 0, 0, &metrics);
        WRITE_FAILS_AFTER.set(None);
        assert_eq!((metrics.dropped.get(), metrics.failed.get()), (0, 3));
        s.store(&mut file, chunk.as_bytes(), 2, 1, &metrics);
        assert_eq!((metrics.dropped.get(), metrics.failed.get()), (3, 3));
        assert_eq!(
            std::fs::read_to_string(s.path(0)).unwrap(),
            chunk,
            "the failed write cut back"
        );
        assert_eq!(s.current(), 1, "closed when the buffer is full");
    }
}
