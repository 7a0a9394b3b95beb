//! File sources: the files matching each `files:` glob, followed line by line across rotation.
//!
//! Every [`Files::scan`] (each `logs.poll`) lists the glob's directory, opens files not seen
//! before and checks the open ones:
//! - a file is known by device + inode ([`FileId`]), so a rename (`app.log` → `app.log.1`) keeps
//!   its position; the open descriptor is read to its end even once the name is gone
//!   (rename-and-create rotation, deleted-while-open), then closed;
//! - a file now shorter than what was read was truncated (copytruncate): reading starts over at
//!   0. Its first bytes are hashed as well, so content replaced in place, or an inode reused by a
//!   new file, also starts over at 0 even when the new file is already longer;
//! - a file first seen at start-up starts at its checkpoint when the checkpoint names its
//!   identity and its head matches, else at its beginning or end (`start_at`); a file appearing
//!   later always starts at its beginning.
//!
//! Polling rather than inotify (`notify`): rotation is detected from the descriptor and the
//! directory listing either way, polling works the same on every file system (NFS, overlayfs,
//! a ConfigMap's symlinks), and a missed event can never strand a file. The cost is one
//! directory listing and one `fstat` per file per poll.
//!
//! Only complete lines are read: a line still being written waits for its `\n`, except at the
//! end of a file that was rotated away (its last line is taken as it is once the file has been
//! quiet for [`ORPHAN_QUIET`]).
//!
//! All of it is blocking file I/O; the pipeline runs it on tokio's blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::checkpoint::{self, FileId, Position};
use crate::lifecycle::capture::MAX_LINE;

/// The first bytes of a file whose hash tells it apart from another with the same inode.
pub const HEAD_BYTES: u64 = 256;
/// A file whose name is gone is closed once read to its end and quiet this long (a writer may
/// still append a little after the rename, until it reopens its log).
pub const ORPHAN_QUIET: Duration = Duration::from_secs(1);
/// How deep a glob's directory is listed (`/var/log/**/x.log`).
const MAX_DEPTH: usize = 8;

/// One `files:` entry.
pub struct FileSource {
    /// Its index in `logs.sources`.
    pub source: usize,
    pub matcher: globset::GlobMatcher,
    pub base: PathBuf,
    pub from_end: bool,
}

/// A file being followed.
struct Tailer {
    source: usize,
    path: Arc<Path>,
    file: File,
    /// Bytes handed to batches: the next read starts here.
    read: u64,
    /// Bytes the sink acknowledged.
    acked: u64,
    /// The file's size at the last look.
    size: u64,
    head_len: u64,
    head_hash: u64,
    /// Since when its name no longer matches (renamed or deleted).
    orphan_since: Option<Instant>,
    /// When it last grew.
    grew_at: Instant,
}

/// A line read from a file.
pub struct FileLine<'a> {
    pub source: usize,
    pub path: &'a Path,
    pub line: &'a [u8],
}

/// Every file source's open files and positions.
pub struct Files {
    sources: Vec<FileSource>,
    tailers: BTreeMap<FileId, Tailer>,
    /// Positions from the checkpoint, for files not opened yet.
    saved: BTreeMap<FileId, Position>,
    first_scan: bool,
    last_scan: Option<Instant>,
    buf: Vec<u8>,
}

impl Files {
    pub fn new(sources: Vec<FileSource>, saved: BTreeMap<FileId, Position>) -> Files {
        Files {
            sources,
            tailers: BTreeMap::new(),
            saved,
            first_scan: true,
            last_scan: None,
            buf: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Scans for files when `every` has passed since the last scan.
    pub fn scan_if_due(&mut self, every: Duration) {
        if self.last_scan.is_none_or(|t| t.elapsed() >= every) {
            self.scan();
        }
    }

    /// Lists the globs, opens new files, notices renamed, deleted, truncated and replaced ones.
    pub fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let mut seen = BTreeSet::new();
        for s in 0..self.sources.len() {
            let mut paths = Vec::new();
            walk(
                &self.sources[s].base,
                0,
                &self.sources[s].matcher,
                &mut paths,
            );
            for path in paths {
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                if !meta.is_file() {
                    continue;
                }
                let id = FileId {
                    dev: meta.dev(),
                    ino: meta.ino(),
                };
                if !seen.insert(id) {
                    continue;
                }
                if let Some(t) = self.tailers.get_mut(&id) {
                    if *t.path != *path {
                        debug!(from = %t.path.display(), to = %path.display(), "log file renamed");
                        t.path = path.into();
                    }
                    continue;
                }
                self.open(s, id, &path);
            }
        }
        let now = Instant::now();
        for (id, t) in &mut self.tailers {
            if seen.contains(id) {
                t.orphan_since = None;
            } else if t.orphan_since.is_none() {
                debug!(path = %t.path.display(), "log file renamed away or deleted; reading it to its end");
                t.orphan_since = Some(now);
            }
            t.check();
        }
        if self.first_scan {
            // Positions of files that are gone for good would otherwise be carried from run
            // to run; a file still there but outside the glob now is not read again either.
            self.saved.retain(|_, p| p.path.exists());
        }
        self.first_scan = false;
    }

    fn open(&mut self, source: usize, id: FileId, path: &Path) {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot open log file");
                return;
            }
        };
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let head_len = size.min(HEAD_BYTES);
        let head_hash = head(&file, head_len).unwrap_or(0);
        let start = match self.saved.remove(&id) {
            Some(p)
                if p.head_len <= size
                    && head(&file, p.head_len) == Some(p.head_hash)
                    && p.offset <= size =>
            {
                p.offset
            }
            Some(_) => {
                info!(path = %path.display(), "log file differs from its checkpoint; reading it from the start");
                0
            }
            None if self.first_scan && self.sources[source].from_end => size,
            None => 0,
        };
        info!(path = %path.display(), offset = start, "following log file");
        self.tailers.insert(
            id,
            Tailer {
                source,
                path: path.into(),
                file,
                read: start,
                acked: start,
                size,
                head_len,
                head_hash,
                orphan_since: None,
                grew_at: Instant::now(),
            },
        );
    }

    /// Hands complete lines to `emit` until it refuses one (returns false: no room; that line
    /// is read again next time). Returns true when some file still had lines left (the caller
    /// should come back without waiting).
    pub fn read(&mut self, mut emit: impl FnMut(FileLine<'_>) -> bool) -> bool {
        let mut more = false;
        let mut done = Vec::new();
        for (id, t) in &mut self.tailers {
            loop {
                let want = MAX_LINE.min((t.size.saturating_sub(t.read)) as usize);
                if want == 0 {
                    break;
                }
                self.buf.resize(want, 0);
                let n = match t.file.read_at(&mut self.buf, t.read) {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(path = %t.path.display(), error = %e, "cannot read log file");
                        break;
                    }
                };
                if n == 0 {
                    break;
                }
                let chunk = &self.buf[..n];
                let mut used = 0;
                let mut stopped = false;
                while let Some(nl) = chunk[used..].iter().position(|&b| b == b'\n') {
                    let end = used + nl;
                    let mut line = &chunk[used..end];
                    if line.last() == Some(&b'\r') {
                        line = &line[..line.len() - 1];
                    }
                    if !emit(FileLine {
                        source: t.source,
                        path: &t.path,
                        line,
                    }) {
                        stopped = true;
                        break;
                    }
                    used = end + 1;
                }
                // No line ending in a whole MAX_LINE: ship the piece as a line. At the end of a
                // rotated-away file that has gone quiet: its last, unterminated line.
                let last_of_orphan = t.orphan_since.is_some()
                    && t.read + n as u64 == t.size
                    && t.grew_at.elapsed() >= ORPHAN_QUIET;
                if !stopped && used < n && (used == 0 && n == MAX_LINE || last_of_orphan) {
                    if emit(FileLine {
                        source: t.source,
                        path: &t.path,
                        line: &chunk[used..n],
                    }) {
                        used = n;
                    } else {
                        stopped = true;
                    }
                }
                t.read += used as u64;
                if stopped {
                    more = true;
                    break;
                }
                if used == 0 {
                    break;
                }
            }
            if t.orphan_since.is_some() && t.read >= t.size && t.grew_at.elapsed() >= ORPHAN_QUIET {
                done.push(*id);
            }
        }
        for id in done {
            if let Some(t) = self.tailers.remove(&id) {
                info!(path = %t.path.display(), "finished a rotated-away log file");
            }
        }
        more
    }

    /// The sink acknowledged everything read so far.
    pub fn ack(&mut self) {
        for t in self.tailers.values_mut() {
            t.acked = t.read;
        }
    }

    /// Bytes in the files not yet acknowledged (what a restart would read again, or for the
    /// first time).
    pub fn lag(&self) -> u64 {
        self.tailers
            .values()
            .map(|t| t.size.saturating_sub(t.acked))
            .sum()
    }

    /// The acknowledged positions, for the checkpoint (positions of files not opened in this
    /// run are kept until they are).
    pub fn positions(&self) -> impl Iterator<Item = Position> + '_ {
        self.tailers
            .iter()
            .map(|(id, t)| Position {
                path: t.path.to_path_buf(),
                id: *id,
                offset: t.acked,
                head_len: t.head_len,
                head_hash: t.head_hash,
            })
            .chain(self.saved.values().cloned())
    }
}

impl Tailer {
    /// Notices growth, truncation and replaced content.
    fn check(&mut self) {
        let size = match self.file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return,
        };
        if size > self.size {
            self.grew_at = Instant::now();
        }
        self.size = size;
        let replaced = head(&self.file, self.head_len) != Some(self.head_hash);
        if size < self.read || replaced {
            info!(
                path = %self.path.display(),
                was = self.read,
                now = size,
                "log file truncated or replaced; reading it from the start"
            );
            self.read = 0;
            self.acked = 0;
            self.head_len = 0;
            self.head_hash = checkpoint::head_hash(b"");
        }
        if self.head_len < HEAD_BYTES && size > self.head_len {
            self.head_len = size.min(HEAD_BYTES);
            self.head_hash = head(&self.file, self.head_len).unwrap_or(0);
        }
    }
}

/// The hash of the first `len` bytes; None when the file is shorter.
fn head(file: &File, len: u64) -> Option<u64> {
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, 0).ok()?;
    Some(checkpoint::head_hash(&b))
}

/// Paths under `dir` matching `glob`, `depth` levels down at most.
fn walk(dir: &Path, depth: usize, glob: &globset::GlobMatcher, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if glob.is_match(&path) {
            out.push(path);
        } else if depth < MAX_DEPTH && e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, depth + 1, glob, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn files(dir: &Path) -> Files {
        files_from(dir, false)
    }

    fn files_from(dir: &Path, from_end: bool) -> Files {
        let glob = format!("{}/*.log", dir.display());
        Files::new(
            vec![FileSource {
                source: 0,
                matcher: crate::config::logs::compile_glob(&glob).unwrap(),
                base: dir.to_path_buf(),
                from_end,
            }],
            BTreeMap::new(),
        )
    }

    #[test]
    fn start_at_end_skips_what_was_there_but_not_files_that_appear_later() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.log"), "before\n").unwrap();
        let mut f = files_from(dir.path(), true);
        assert!(lines(&mut f).is_empty());
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("old.log"))
            .unwrap()
            .write_all(b"after\n")
            .unwrap();
        std::fs::write(dir.path().join("new.log"), "new\n").unwrap();
        let mut got = lines(&mut f);
        got.sort();
        assert_eq!(got, ["after", "new"]);
    }

    #[test]
    fn a_file_deleted_while_open_is_read_to_its_end_then_closed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        let mut w = std::fs::File::create(&log).unwrap();
        writeln!(w, "one").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one"]);
        std::fs::remove_file(&log).unwrap();
        write!(w, "two\nlast without end").unwrap();
        assert_eq!(lines(&mut f), ["two"]);
        // Quiet for ORPHAN_QUIET: its last line is taken as it is and the file closed.
        for t in f.tailers.values_mut() {
            t.grew_at -= ORPHAN_QUIET;
        }
        assert_eq!(lines(&mut f), ["last without end"]);
        assert!(f.tailers.is_empty());
    }

    fn lines(f: &mut Files) -> Vec<String> {
        f.scan();
        let mut out = Vec::new();
        f.read(|l| {
            out.push(String::from_utf8_lossy(l.line).into_owned());
            true
        });
        out
    }

    #[test]
    fn follows_rename_and_copytruncate_and_waits_for_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        let mut w = std::fs::File::create(&log).unwrap();
        write!(w, "one\ntwo\nthr").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one", "two"]);
        writeln!(w, "ee").unwrap();
        assert_eq!(lines(&mut f), ["three"]);

        // Rename and create: the old file is read to its end, the new one from its start.
        std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
        writeln!(w, "four").unwrap();
        let mut w2 = std::fs::File::create(&log).unwrap();
        writeln!(w2, "five").unwrap();
        let mut got = lines(&mut f);
        got.sort();
        assert_eq!(got, ["five", "four"]);

        // Copytruncate: same inode, shorter.
        w2.set_len(0).unwrap();
        let mut w2 = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(w2, "six").unwrap();
        assert_eq!(lines(&mut f), ["six"]);

        // Replaced in place with more bytes than were read: the head tells.
        std::fs::write(&log, "seven is longer than six\n").unwrap();
        assert_eq!(lines(&mut f), ["seven is longer than six"]);
    }

    #[test]
    fn resumes_from_a_checkpoint_whose_head_matches() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "one\ntwo\n").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one", "two"]);
        f.ack();
        let saved: BTreeMap<_, _> = f.positions().map(|p| (p.id, p)).collect();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"three\n")
            .unwrap();
        let mut again = files(dir.path());
        again.saved = saved;
        assert_eq!(lines(&mut again), ["three"]);
    }
}
