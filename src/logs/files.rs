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
//! quiet for `rotate_wait`, [`DEFAULT_ROTATE_WAIT`] unless configured).
//!
//! All of it is blocking file I/O; the pipeline runs it on tokio's blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::ops::Bound;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::checkpoint::{self, FileId, Position};
use super::multiline::Assembler;
use super::rate_limit::TokenBucket;
#[cfg(doc)]
use crate::config::logs::DEFAULT_ROTATE_WAIT;
use crate::config::logs::{Container, Multiline};
use crate::lifecycle::capture::MAX_LINE;
use crate::lifecycle::capture::Stream;

/// The first bytes of a file whose hash tells it apart from another with the same inode.
pub const HEAD_BYTES: u64 = 256;
/// How deep a glob's directory is listed (`/var/log/**/x.log`).
const MAX_DEPTH: usize = 8;

/// One `files:` entry.
pub struct FileSource {
    /// Its index in `logs.sources`.
    pub source: usize,
    pub matcher: globset::GlobMatcher,
    pub base: PathBuf,
    pub from_end: bool,
    /// How long a renamed or deleted file must stay quiet, read to its end, before it is closed.
    pub rotate_wait: Duration,
    /// A container runtime's format and multiline joining ([`Assembler`]).
    pub container: Option<Container>,
    pub multiline: Option<Multiline>,
    pub limit: Option<TokenBucket>,
    /// Only lines with their end are read, even at the end of a deleted file: the disk
    /// buffer's spool files, whose writer only ever writes whole lines, so an unterminated
    /// tail there is a torn write, never shipped ([`super::spool`]).
    pub whole_lines: bool,
}

/// A file being followed.
struct Tailer {
    /// Its source's index in [`Files::sources`].
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
    /// Bumped when the file is read anew (truncated, replaced): marks taken before do not apply.
    generation: u32,
    /// Bytes at its end (as of `size`) without a line end, left unread: a source of
    /// [`FileSource::whole_lines`] closes a deleted file read up to them.
    unterminated: u64,
    /// Joins lines into records (container formats, multiline); None: a line is a record.
    assembler: Option<Assembler>,
}

/// A line read from a file.
pub struct FileLine<'a> {
    /// Its source's index in `logs.sources`.
    pub source: usize,
    pub path: &'a Path,
    pub line: &'a [u8],
    /// From a container runtime's format: the stream and timestamp it gave the line.
    pub stream: Option<Stream>,
    pub time: Option<&'a str>,
    /// A container file's line not in its runtime's format (already counted as such): shipped
    /// as plain text, whatever the source's `message_format`.
    pub malformed: bool,
    /// Where the record begins, in which file: the same when it is read again (a restart).
    pub at: LineAt,
}

/// Where a record was read: its file's identity, the hash of the file's first bytes up to the
/// record's end (at most [`HEAD_BYTES`]: content written later cannot change it, and a new
/// file on a reused inode has other first bytes), and its offset. Elasticsearch's `_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineAt {
    pub id: FileId,
    pub head: u64,
    pub offset: u64,
}

/// What [`LineAt`] needs of a file.
struct Keyer<'a> {
    id: FileId,
    file: &'a File,
    head_len: u64,
    head_hash: u64,
}

impl Keyer<'_> {
    fn at(&self, start: u64, end: u64) -> LineAt {
        let len = end.min(HEAD_BYTES);
        let head = if len == self.head_len {
            self.head_hash
        } else {
            head(self.file, len).unwrap_or(0)
        };
        LineAt {
            id: self.id,
            head,
            offset: start,
        }
    }
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
    /// Bytes lost to truncation per source, not yet reported.
    truncated: Vec<(usize, u64)>,
    /// Lines not in a container runtime's format (shipped as they are) per source, not yet
    /// reported.
    malformed: Vec<(usize, u64)>,
    /// The file that filled the last batch: the next round starts after it.
    after: Option<FileId>,
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
            truncated: Vec::new(),
            malformed: Vec::new(),
            after: None,
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
            if let Some(lost) = t.check() {
                self.truncated.push((self.sources[t.source].source, lost));
            }
        }
        if self.first_scan {
            self.find_rotated();
        }
        self.first_scan = false;
    }

    /// After the first scan: checkpointed files not found under their glob were rotated away
    /// (or deleted) while Outrigger was down, maybe before they were read to their end. Each
    /// is looked for by its identity beside its last path (`app.log` → `app.log.1`) and, when
    /// there with the same head, read to its end as a rotated-away file. Every other entry is
    /// dropped, so the state file does not carry files that are gone for good.
    fn find_rotated(&mut self) {
        for (id, p) in std::mem::take(&mut self.saved) {
            let Some(source) = self
                .sources
                .iter()
                .position(|s| p.path.starts_with(&s.base))
            else {
                continue;
            };
            let Some(dir) = p.path.parent() else { continue };
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let found = entries.flatten().map(|e| e.path()).find(|path| {
                std::fs::metadata(path)
                    .is_ok_and(|m| m.is_file() && m.dev() == id.dev && m.ino() == id.ino)
            });
            if let Some(path) = found {
                self.saved.insert(id, p);
                self.open(source, id, &path);
                if let Some(t) = self.tailers.get_mut(&id) {
                    info!(path = %path.display(), "finishing a log file rotated away while stopped");
                    t.orphan_since = Some(Instant::now());
                }
            }
        }
        self.saved.clear();
    }

    /// Sends on every record still being joined (the agent stops: the last stack trace of a
    /// file must not wait for a line that will not come before the exit).
    pub fn flush_joined(&mut self) {
        let now = Instant::now();
        for t in self.tailers.values_mut() {
            if let Some(a) = &mut t.assembler {
                a.flush_all(now);
            }
        }
    }

    /// Bytes lost to truncation since the last call, per source.
    pub fn take_truncated(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.truncated)
    }

    /// Lines not in their container runtime's format since the last call, per source.
    pub fn take_malformed(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.malformed)
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
                    && p.offset <= size
                    && at_line_start(&file, p.offset) =>
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
                generation: 0,
                unterminated: 0,
                assembler: Assembler::new(
                    self.sources[source].container,
                    self.sources[source].multiline.clone(),
                ),
            },
        );
    }

    /// Hands complete records to `emit` until it refuses one (returns false: the batch is full;
    /// that record is offered again next time, and no file is read further) or a source's rate
    /// limit stops its files. Returns true when some file still had lines left for the batch
    /// (the caller should come back without waiting; a rate-limited file waits for the next
    /// poll).
    ///
    /// Files take turns: the round after a batch filled up starts with the file after the one
    /// that filled it, so one file's backlog cannot hold back the others. A file that joins
    /// lines into records reads no further than the record that did not fit: what it holds
    /// under backpressure is that record and the one being joined, not a chunk of records.
    pub fn read(&mut self, mut emit: impl FnMut(FileLine<'_>) -> bool) -> bool {
        let mut more = false;
        let mut done = Vec::new();
        let now = Instant::now();
        let Files {
            tailers,
            sources,
            buf,
            after,
            malformed,
            ..
        } = self;
        let order: Vec<FileId> = match *after {
            Some(last) => tailers
                .range((Bound::Excluded(last), Bound::Unbounded))
                .chain(tailers.range(..=last))
                .map(|(id, _)| *id)
                .collect(),
            None => tailers.keys().copied().collect(),
        };
        'files: for id in order {
            let Some(t) = tailers.get_mut(&id) else {
                continue;
            };
            let source = &mut sources[t.source];
            // The source's index in `logs.sources` (`t.source` is its index among files).
            let index = source.source;
            let rotate_wait = source.rotate_wait;
            let whole_lines = source.whole_lines;
            let closing = |t: &Tailer| {
                let held = if whole_lines { t.unterminated } else { 0 };
                t.orphan_since.is_some()
                    && t.read + held >= t.size
                    && t.grew_at.elapsed() >= rotate_wait
            };
            let mut given = Given::Taken;
            loop {
                // Records joined earlier and not yet taken go first.
                if let Some(a) = &mut t.assembler {
                    let k = Keyer {
                        id,
                        file: &t.file,
                        head_len: t.head_len,
                        head_hash: t.head_hash,
                    };
                    given = give_ready(a, &t.path, &k, index, &mut emit, &mut source.limit, now);
                    match given {
                        Given::Taken => {}
                        Given::Full => {
                            more = true;
                            *after = Some(id);
                            break 'files;
                        }
                        Given::Limited => break,
                    }
                }
                let want = MAX_LINE.min((t.size.saturating_sub(t.read)) as usize);
                let n = if want == 0 {
                    0
                } else {
                    buf.resize(want, 0);
                    match t.file.read_at(buf, t.read) {
                        Ok(n) => n,
                        Err(e) => {
                            warn!(path = %t.path.display(), error = %e, "cannot read log file");
                            0
                        }
                    }
                };
                let chunk = &buf[..n];
                let mut used = 0;
                while let Some(nl) = memchr::memchr(b'\n', &chunk[used..]) {
                    let end = used + nl;
                    let mut line = &chunk[used..end];
                    if line.last() == Some(&b'\r') {
                        line = &line[..line.len() - 1];
                    }
                    let (start, stop) = (t.read + used as u64, t.read + end as u64 + 1);
                    let (g, took) = offer(
                        t,
                        id,
                        index,
                        (line, start, stop, false),
                        &mut emit,
                        &mut source.limit,
                        now,
                    );
                    given = g;
                    if took {
                        used = end + 1;
                    }
                    if !matches!(given, Given::Taken) {
                        break;
                    }
                }
                // No line ending in a whole MAX_LINE: ship the piece as a line, flagged cut. At
                // the end of a rotated-away file that has gone quiet (looked at again now: its
                // writer may still be appending the rest): its last, unterminated line.
                let mut regrown = false;
                if matches!(given, Given::Taken) && used < n {
                    let cut = used == 0 && n == MAX_LINE;
                    let last = !cut
                        && !whole_lines
                        && t.orphan_since.is_some()
                        && t.read + n as u64 == t.size
                        && t.grew_at.elapsed() >= rotate_wait
                        && {
                            regrown = t.grew();
                            !regrown
                        };
                    if cut || last {
                        let piece = &chunk[used..n];
                        let (start, stop) = (t.read + used as u64, t.read + n as u64);
                        let (g, took) = offer(
                            t,
                            id,
                            index,
                            (piece, start, stop, cut),
                            &mut emit,
                            &mut source.limit,
                            now,
                        );
                        given = g;
                        if took {
                            used = n;
                        }
                    }
                }
                t.read += used as u64;
                // What is left of a read to the end without a line end (not taken above; a
                // full batch or the rate limit leaves whole lines unread).
                t.unterminated =
                    if matches!(given, Given::Taken) && t.read + (n - used) as u64 == t.size {
                        (n - used) as u64
                    } else {
                        0
                    };
                match given {
                    Given::Taken => {}
                    Given::Full => {
                        // The batch is full: no file is read further this round.
                        more = true;
                        *after = Some(id);
                        break 'files;
                    }
                    Given::Limited => break,
                }
                if used == 0 {
                    if regrown {
                        continue;
                    }
                    // Read to its end (not stopped by a full batch or the rate limit: the
                    // next lines of a held record may be waiting unread): records that waited
                    // their time for a next line leave, and once the file is done, all of them.
                    let close = closing(t);
                    if let Some(a) = &mut t.assembler {
                        if close {
                            a.flush_all(now);
                        } else {
                            a.flush_expired(now);
                        }
                        if !a.ready.is_empty() {
                            continue;
                        }
                    }
                    break;
                }
            }
            if matches!(given, Given::Taken)
                && closing(t)
                && t.assembler.as_ref().is_none_or(Assembler::is_empty)
            {
                // Written to since the last look? Then it is not done: read on next time.
                if t.grew() {
                    more = true;
                } else {
                    done.push(id);
                }
            }
        }
        for t in tailers.values_mut() {
            if let Some(a) = &mut t.assembler {
                let m = a.take_malformed();
                if m > 0 {
                    malformed.push((sources[t.source].source, m));
                }
            }
        }
        for id in done {
            if let Some(t) = tailers.remove(&id) {
                info!(path = %t.path.display(), "finished a rotated-away log file");
            }
        }
        more
    }

    /// Where each file's reading stands now: what a batch sealed now covers.
    pub fn mark(&self) -> Mark {
        Mark {
            files: self
                .tailers
                .iter()
                .map(|(id, t)| (*id, t.generation, t.done()))
                .collect(),
            positions: self
                .tailers
                .iter()
                .map(|(id, t)| Position {
                    path: t.path.to_path_buf(),
                    id: *id,
                    offset: t.done(),
                    head_len: t.head_len,
                    head_hash: t.head_hash,
                })
                .chain(self.saved.values().cloned())
                .collect(),
        }
    }

    /// The sink acknowledged everything up to `mark`.
    pub fn ack(&mut self, mark: &Mark) {
        for (id, generation, read) in &mark.files {
            if let Some(t) = self.tailers.get_mut(id)
                && t.generation == *generation
            {
                t.acked = (*read).min(t.read).max(t.acked);
            }
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
}

/// The files' positions when a batch was sealed: applied when the sink acknowledges it.
pub struct Mark {
    files: Vec<(FileId, u32, u64)>,
    /// What the checkpoint holds once the batch is acknowledged.
    pub positions: Vec<Position>,
}

impl Tailer {
    /// Bytes whose records are all in batches: the next read starts at `read`, but lines being
    /// joined into a record (or joined, waiting for room in a batch) are read again after a
    /// restart.
    fn done(&self) -> u64 {
        self.assembler
            .as_ref()
            .and_then(Assembler::oldest)
            .map_or(self.read, |o| o.min(self.read))
    }

    /// Whether the file grew since the last look (the size is then updated): the writer of a
    /// rotated-away file may still be appending to it.
    fn grew(&mut self) -> bool {
        let now = self.file.metadata().map_or(self.size, |m| m.len());
        if now <= self.size {
            return false;
        }
        self.size = now;
        self.grew_at = Instant::now();
        true
    }

    /// Notices growth, truncation and replaced content. Returns the bytes lost when the file
    /// was truncated or replaced before it was read to its end (at least what it held beyond
    /// our position at the last look).
    fn check(&mut self) -> Option<u64> {
        let size = match self.file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return None,
        };
        let before = self.size;
        if size > self.size {
            self.grew_at = Instant::now();
        }
        self.size = size;
        let replaced = head(&self.file, self.head_len) != Some(self.head_hash);
        let mut lost = None;
        if size < self.read || replaced {
            let unread = before.saturating_sub(self.read);
            if unread > 0 {
                warn!(
                    path = %self.path.display(),
                    lost_bytes = unread,
                    "log file truncated before it was read to its end; those bytes are lost"
                );
                lost = Some(unread);
            }
            info!(
                path = %self.path.display(),
                was = self.read,
                now = size,
                "log file truncated or replaced; reading it from the start"
            );
            self.read = 0;
            self.acked = 0;
            self.generation = self.generation.wrapping_add(1);
            // Records held for joining came from lines now gone from the file: they leave as
            // they are (a stack trace cut short is better than none), before the new content.
            if let Some(a) = &mut self.assembler {
                a.flush_detached(Instant::now());
            }
            self.head_len = 0;
            self.head_hash = checkpoint::head_hash(b"");
        }
        if self.head_len < HEAD_BYTES && size > self.head_len {
            self.head_len = size.min(HEAD_BYTES);
            self.head_hash = head(&self.file, self.head_len).unwrap_or(0);
        }
        lost
    }
}

/// What became of a record offered to a batch.
enum Given {
    Taken,
    /// The batch is full.
    Full,
    /// The source's rate limit says wait.
    Limited,
}

/// Offers one line read from `start..stop` of file `id` (`cut`: its rest follows, it had no
/// end within [`MAX_LINE`]): to the batch as it is, or into the records the file's assembler
/// joins and then their complete ones to the batch. Also returns whether the line was taken —
/// into the joining it always is, whether or not a record it completed fits the batch now.
fn offer(
    t: &mut Tailer,
    id: FileId,
    source: usize,
    (line, start, stop, cut): (&[u8], u64, u64, bool),
    emit: &mut impl FnMut(FileLine<'_>) -> bool,
    limit: &mut Option<TokenBucket>,
    now: Instant,
) -> (Given, bool) {
    let k = &Keyer {
        id,
        file: &t.file,
        head_len: t.head_len,
        head_hash: t.head_hash,
    };
    let path = &t.path;
    match t.assembler.as_mut() {
        None => {
            let line = FileLine {
                source,
                path,
                line,
                stream: None,
                time: None,
                malformed: false,
                at: k.at(start, stop),
            };
            let g = give(emit, limit, now, line);
            let took = matches!(g, Given::Taken);
            (g, took)
        }
        Some(a) => {
            a.push(line, start, stop, None, cut, now);
            (give_ready(a, path, k, source, emit, limit, now), true)
        }
    }
}

/// Offers the records `a` has joined, oldest first, until one is not taken.
fn give_ready(
    a: &mut Assembler,
    path: &Path,
    k: &Keyer<'_>,
    source: usize,
    emit: &mut impl FnMut(FileLine<'_>) -> bool,
    limit: &mut Option<TokenBucket>,
    now: Instant,
) -> Given {
    while let Some(r) = a.ready.front() {
        let line = FileLine {
            source,
            path,
            line: &r.text,
            stream: r.stream,
            time: r.time.as_deref(),
            malformed: r.stream.is_none() && a.container().is_some(),
            at: k.at(r.start, r.end),
        };
        match give(emit, limit, now, line) {
            Given::Taken => {
                a.ready.pop_front();
            }
            other => return other,
        }
    }
    Given::Taken
}

/// Offers one record to the batch, within the source's rate limit.
fn give(
    emit: &mut impl FnMut(FileLine<'_>) -> bool,
    limit: &mut Option<TokenBucket>,
    now: Instant,
    line: FileLine<'_>,
) -> Given {
    if let Some(b) = limit.as_mut()
        && !b.ready(now)
    {
        return Given::Limited;
    }
    if !emit(line) {
        return Given::Full;
    }
    if let Some(b) = limit {
        b.take();
    }
    Given::Taken
}

/// Whether `offset` is where a record of ours could have ended: at 0, after a `\n`, or a whole
/// number of [`MAX_LINE`] pieces into a line too long to ship whole. A checkpoint pointing
/// elsewhere belongs to other content (the head matched by chance), so the file is read anew.
fn at_line_start(file: &File, offset: u64) -> bool {
    if offset == 0 {
        return true;
    }
    let from = offset.saturating_sub(MAX_LINE as u64);
    let mut b = vec![0u8; (offset - from) as usize];
    if file.read_exact_at(&mut b, from).is_err() {
        return false;
    }
    match b.iter().rposition(|&c| c == b'\n') {
        Some(i) => {
            let line_start = from + i as u64 + 1;
            (offset - line_start).is_multiple_of(MAX_LINE as u64)
        }
        // No line end in the last MAX_LINE bytes: a cut is only possible at MAX_LINE multiples
        // from a line start further back; accept it (one piece is all a wrong guess costs).
        None => true,
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

    const ROTATE_WAIT: Duration = Duration::from_secs(1);

    fn files(dir: &Path) -> Files {
        files_from(dir, false)
    }

    fn files_from(dir: &Path, from_end: bool) -> Files {
        joining(dir, from_end, None, None)
    }

    fn joining(
        dir: &Path,
        from_end: bool,
        container: Option<Container>,
        multiline: Option<Multiline>,
    ) -> Files {
        let glob = format!("{}/*.log", dir.display());
        Files::new(
            vec![FileSource {
                source: 0,
                matcher: crate::config::logs::compile_glob(&glob).unwrap(),
                base: dir.to_path_buf(),
                from_end,
                rotate_wait: ROTATE_WAIT,
                container,
                multiline,
                limit: None,
                whole_lines: false,
            }],
            BTreeMap::new(),
        )
    }

    /// Multiline records: a line starting with a non-space begins one.
    fn traces(timeout: Duration, max_bytes: usize) -> Option<Multiline> {
        Some(Multiline {
            start: regex::Regex::new(r"^\S").unwrap(),
            max_lines: 500,
            max_bytes,
            timeout: crate::config::Duration::from_millis(timeout.as_millis() as u64),
        })
    }

    /// Reads one round taking at most `room` records (the batch is then full).
    fn round(f: &mut Files, room: usize) -> (Vec<String>, bool) {
        let mut out = Vec::new();
        let more = f.read(|l| {
            if out.len() == room {
                return false;
            }
            out.push(String::from_utf8_lossy(l.line).into_owned());
            true
        });
        (out, more)
    }

    #[test]
    fn a_truncated_file_sends_the_record_it_was_joining_then_reads_the_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "Exception\n  at a()\n").unwrap();
        let mut f = joining(
            dir.path(),
            false,
            None,
            traces(Duration::from_secs(3600), 1024),
        );
        assert!(
            lines(&mut f).is_empty(),
            "held: its next line may continue it"
        );
        // copytruncate: same inode, emptied, written again.
        let w = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
        w.set_len(0).unwrap();
        std::fs::write(&log, "next\n").unwrap();
        assert_eq!(lines(&mut f), ["Exception\n  at a()"]);
        // The new content is read from 0; the checkpoint waits at the held `next`.
        let mark = f.mark();
        assert_eq!(mark.positions[0].offset, 0);
        f.ack(&mark);
        f.flush_joined();
        assert_eq!(lines(&mut f), ["next"]);
        assert_eq!(f.mark().positions[0].offset, 5);
    }

    #[test]
    fn a_trace_stopped_by_a_full_batch_arrives_whole_however_long_it_waits() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("app.log"),
            "one\ntwo\nException\n  at a()\n  at b()\nlast\n",
        )
        .unwrap();
        let mut f = joining(
            dir.path(),
            false,
            None,
            traces(Duration::from_millis(1), 1024),
        );
        f.scan();
        let mut got = Vec::new();
        loop {
            // One record a batch, and each send takes longer than the timeout.
            let (out, more) = round(&mut f, 1);
            got.extend(out);
            std::thread::sleep(Duration::from_millis(5));
            if !more {
                break;
            }
        }
        got.extend(round(&mut f, 100).0);
        assert_eq!(got, ["one", "two", "Exception\n  at a()\n  at b()", "last"]);
    }

    #[test]
    fn a_held_container_trace_waits_for_a_backlog_of_its_other_stream_and_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        // A container file: a stderr trace cut by a backlog of stdout lines.
        let mut text = String::from("2024-01-01T00:00:00Z stderr F Exception\n");
        for i in 0..200 {
            text.push_str(&format!("2024-01-01T00:00:00Z stdout F line {i}\n"));
        }
        text.push_str("2024-01-01T00:00:00Z stderr F   at a()\n");
        std::fs::write(dir.path().join("0.log"), text).unwrap();
        let mut f = joining(
            dir.path(),
            false,
            Some(Container::Cri),
            traces(Duration::from_millis(1), 1024),
        );
        f.scan();
        let mut got = Vec::new();
        loop {
            let (out, more) = round(&mut f, 5);
            got.extend(out);
            std::thread::sleep(Duration::from_millis(5));
            if !more {
                break;
            }
        }
        got.extend(round(&mut f, 100).0);
        assert_eq!(got.len(), 201, "{got:?}");
        assert!(got.iter().any(|l| l == "Exception\n  at a()"), "{got:?}");
    }

    #[test]
    fn a_container_files_line_not_in_its_format_is_flagged_to_be_shipped_as_plain() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("0.log"),
            "2024-01-01T00:00:00Z stdout F {\"ok\":1}\nyesterday stdout F not cri\n",
        )
        .unwrap();
        let mut f = joining(dir.path(), false, Some(Container::Cri), None);
        f.scan();
        let mut got = Vec::new();
        f.read(|l| {
            got.push((String::from_utf8_lossy(l.line).into_owned(), l.malformed));
            true
        });
        assert_eq!(
            got,
            [
                ("{\"ok\":1}".to_string(), false),
                ("yesterday stdout F not cri".to_string(), true)
            ]
        );
        assert_eq!(f.take_malformed(), [(0, 1)]);
    }

    #[test]
    fn under_backpressure_a_joining_file_reads_no_further_than_the_record_that_did_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            let text: String = (0..2000).map(|i| format!("{name} {i}\n")).collect();
            let name = format!("{name}.log");
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut f = joining(
            dir.path(),
            false,
            None,
            traces(Duration::from_secs(3600), 1024),
        );
        f.scan();
        // The batch is full from the start.
        let (out, more) = round(&mut f, 0);
        assert!(out.is_empty() && more);
        let held: Vec<(usize, u64)> = f
            .tailers
            .values()
            .map(|t| (t.assembler.as_ref().unwrap().held(), t.read))
            .collect();
        // One file took two lines (a complete record waiting for room, and the record after
        // it being joined); the other was not read at all.
        assert_eq!(held.iter().map(|h| h.0).sum::<usize>(), 2, "{held:?}");
        assert!(
            held.iter().any(|&(n, read)| n == 0 && read == 0),
            "{held:?}"
        );
        // Room again: everything arrives once, in order.
        let mut got = Vec::new();
        loop {
            let (out, more) = round(&mut f, 100);
            got.extend(out);
            if !more {
                break;
            }
        }
        f.flush_joined();
        got.extend(round(&mut f, 100).0);
        // Each file's lines in order.
        for name in ["a", "b"] {
            let want: Vec<String> = (0..2000).map(|i| format!("{name} {i}")).collect();
            let of_file: Vec<&String> = got
                .iter()
                .filter(|l| l.starts_with(&format!("{name} ")))
                .collect();
            assert_eq!(of_file, want.iter().collect::<Vec<_>>());
        }
        assert_eq!(got.len(), 4000);
    }

    #[test]
    fn the_unterminated_tail_of_a_rotated_file_completed_late_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        let mut w = std::fs::File::create(&log).unwrap();
        write!(w, "one\nthr").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one"]);
        // Rotated by rename; the new file starts with a line of its own.
        std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
        std::fs::write(&log, "fresh\n").unwrap();
        assert_eq!(lines(&mut f), ["fresh"]);
        // Quiet for rotate_wait as of the last look, then the writer finishes its line.
        for t in f.tailers.values_mut() {
            t.grew_at -= ROTATE_WAIT;
        }
        writeln!(w, "ee").unwrap();
        let (got, _) = round(&mut f, 100);
        assert_eq!(got, ["three"]);
        // A tail that stays unterminated leaves once, as its own line, when the file is done.
        write!(w, "four").unwrap();
        assert!(lines(&mut f).is_empty());
        for t in f.tailers.values_mut() {
            t.grew_at -= ROTATE_WAIT;
        }
        assert_eq!(lines(&mut f), ["four"]);
        assert_eq!(f.tailers.len(), 1, "the rotated file is closed");
        assert!(lines(&mut f).is_empty());
    }

    /// A source of whole lines only (the disk buffer's spool): the unterminated tail of a
    /// deleted file is not a line (a torn write), and the file is closed all the same.
    #[test]
    fn a_whole_lines_source_never_takes_an_unterminated_tail_and_closes_the_deleted_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "one\ntwo\nthr").unwrap();
        let mut f = files(dir.path());
        f.sources[0].whole_lines = true;
        f.sources[0].rotate_wait = Duration::ZERO;
        assert_eq!(lines(&mut f), ["one", "two"]);
        std::fs::remove_file(&log).unwrap();
        assert!(lines(&mut f).is_empty());
        assert!(lines(&mut f).is_empty());
        assert!(f.tailers.is_empty(), "the deleted file is closed");
    }

    #[test]
    fn a_line_cut_at_max_line_is_joined_again_without_a_line_end_in_a_multiline_record() {
        let dir = tempfile::tempdir().unwrap();
        let long = "y".repeat(MAX_LINE + 1000);
        std::fs::write(
            dir.path().join("app.log"),
            format!("ERROR {long}\n  at a()\nnext\n"),
        )
        .unwrap();
        let mut f = joining(
            dir.path(),
            false,
            None,
            traces(Duration::from_secs(3600), 1 << 20),
        );
        let got = lines(&mut f);
        assert_eq!(got, [format!("ERROR {long}\n  at a()")]);
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
        // Quiet for rotate_wait: its last line is taken as it is and the file closed.
        for t in f.tailers.values_mut() {
            t.grew_at -= ROTATE_WAIT;
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
        let mark = f.mark();
        f.ack(&mark);
        let saved: BTreeMap<_, _> = mark.positions.into_iter().map(|p| (p.id, p)).collect();
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

    #[test]
    fn bytes_lost_to_a_truncation_before_they_were_read_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "one\n").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one"]);
        // Seen by a scan but not read (the sink was down), then truncated: lost.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"two\nthree\n")
            .unwrap();
        f.scan();
        assert!(f.take_truncated().is_empty());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(0)
            .unwrap();
        f.scan();
        assert_eq!(f.take_truncated(), [(0, 10)]);
    }

    #[test]
    fn a_rotated_file_stays_open_until_quiet_for_rotate_wait_even_if_written_since_the_last_look() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        let mut w = std::fs::File::create(&log).unwrap();
        writeln!(w, "one").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one"]);
        std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
        assert!(lines(&mut f).is_empty());
        // Not quiet long enough: still open, and a late write is read.
        writeln!(w, "late").unwrap();
        assert_eq!(lines(&mut f), ["late"]);
        // Quiet for rotate_wait as of the last look, but written since: not closed yet.
        for t in f.tailers.values_mut() {
            t.grew_at -= ROTATE_WAIT;
        }
        writeln!(w, "later").unwrap();
        let mut got = Vec::new();
        assert!(f.read(|l| {
            got.push(String::from_utf8_lossy(l.line).into_owned());
            true
        }));
        assert!(got.is_empty() && f.tailers.len() == 1);
        assert_eq!(lines(&mut f), ["later"]);
        for t in f.tailers.values_mut() {
            t.grew_at -= ROTATE_WAIT;
        }
        assert!(lines(&mut f).is_empty());
        assert!(f.tailers.is_empty());
    }

    #[test]
    fn a_checkpoint_pointing_into_the_middle_of_a_line_reads_the_file_anew() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "one\ntwo\n").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one", "two"]);
        let mut mark = f.mark();
        // Same head, same inode, an offset inside "two".
        mark.positions[0].offset = 5;
        let mut again = files(dir.path());
        again.saved = mark.positions.into_iter().map(|p| (p.id, p)).collect();
        assert_eq!(lines(&mut again), ["one", "two"]);
    }

    #[test]
    fn a_file_rotated_away_while_stopped_is_finished_and_stale_entries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "one\n").unwrap();
        let mut f = files(dir.path());
        assert_eq!(lines(&mut f), ["one"]);
        let mark = f.mark();
        let mut saved: BTreeMap<_, _> = mark.positions.into_iter().map(|p| (p.id, p)).collect();
        // An entry for a file gone for good.
        let gone = FileId { dev: 0, ino: 1 };
        saved.insert(
            gone,
            Position {
                path: dir.path().join("gone.log"),
                id: gone,
                offset: 1,
                head_len: 0,
                head_hash: 0,
            },
        );
        // While stopped: more lines, then rotation by rename and create.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"two\n")
            .unwrap();
        std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
        std::fs::write(&log, "three\n").unwrap();
        let mut again = files(dir.path());
        again.saved = saved;
        let mut got = lines(&mut again);
        got.sort();
        assert_eq!(got, ["three", "two"]);
        let kept: Vec<_> = again.mark().positions.into_iter().map(|p| p.path).collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(!kept.contains(&dir.path().join("gone.log")));
    }
}
