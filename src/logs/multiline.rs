//! Joining lines into records, in two steps, per stream (a container's stdout and stderr
//! interleave in one file, each with its own cut lines and stack traces):
//!
//! 1. a container runtime's partial pieces ([`super::container`]) are joined up to the piece
//!    that ends the line (at most [`MAX_LINE`] bytes: past that the record leaves as it is);
//! 2. with `multiline:`, a line matching `start` begins a record and every other line is added
//!    to the record before it (`\n` between them), until `max_lines` or `max_bytes`, or until no
//!    line came for `timeout`. A line cut at [`MAX_LINE`] (by the reader: it had no line end in
//!    that many bytes) arrives in pieces flagged `cut`: the next piece of the same stream is the
//!    rest of that line and is appended without a `\n` (or, past `max_bytes`, begins the next
//!    record: the line is cut there, as without `multiline:`).
//!
//! Lines of a container file that are not in the runtime's format (no stream) are joined in a
//! slot of their own, never into the stdout record being joined.
//!
//! Each record remembers the file bytes it came from (`start..end`): a file's checkpoint never
//! passes the start of a record still being joined (or joined and not yet taken by a batch), so
//! a restart reads its lines again rather than losing them. Records wait in `ready` until the
//! batch takes them; the file is not read further while one waits.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::logs::{Container, Multiline};
use crate::lifecycle::capture::{MAX_LINE, Stream};

use super::container;

/// A runtime's partial line whose last piece has not come within this long is sent as it is
/// (the runtime cuts a line at its buffer's size and writes the rest at once; a wait this long
/// means the rest will not come — the container was killed mid-line).
pub const PARTIAL_WAIT: Duration = Duration::from_secs(5);

/// A record: joined text, the file bytes it came from, and what the runtime said of it.
#[derive(Debug)]
pub struct Record {
    pub text: Vec<u8>,
    pub start: u64,
    pub end: u64,
    pub stream: Option<Stream>,
    /// The runtime's timestamp of its first piece.
    pub time: Option<String>,
}

struct Pending {
    record: Record,
    lines: usize,
    last: Instant,
    /// Its last line was cut at [`MAX_LINE`]: the next piece of its stream continues it.
    open: bool,
}

/// Slots: stdout, stderr, and lines without a stream (files without a runtime format, or a
/// runtime's file's lines not in its format).
const SLOTS: usize = 3;

/// The joining state of one file (or of the app's stdio).
pub struct Assembler {
    container: Option<Container>,
    multiline: Option<Multiline>,
    /// Per stream ([`SLOTS`]): a runtime line being joined from its pieces…
    partial: [Option<Pending>; SLOTS],
    /// …and a multiline record being joined.
    joined: [Option<Pending>; SLOTS],
    /// Lines not in the runtime's format since the last [`Assembler::take_malformed`].
    malformed: u64,
    /// Records complete, in order, waiting for a batch.
    pub ready: VecDeque<Record>,
}

fn slot(stream: Option<Stream>) -> usize {
    match stream {
        Some(Stream::Stdout) => 0,
        Some(Stream::Stderr) => 1,
        None => 2,
    }
}

impl Assembler {
    /// None when lines are records as they are (no container format, no multiline).
    pub fn new(container: Option<Container>, multiline: Option<Multiline>) -> Option<Assembler> {
        (container.is_some() || multiline.is_some()).then(|| Assembler {
            container,
            multiline,
            partial: [None, None, None],
            joined: [None, None, None],
            malformed: 0,
            ready: VecDeque::new(),
        })
    }

    /// The container runtime's format its lines are in, if any.
    pub fn container(&self) -> Option<Container> {
        self.container
    }

    /// Takes one line read from `start..end` of a file (`stream`: the app's stream it came
    /// from, when known without a container format). `cut`: the line had no end within
    /// [`MAX_LINE`] bytes and the next line of the stream is its rest (no container format:
    /// a runtime cuts its lines itself, at 16 KiB).
    pub fn push(
        &mut self,
        line: &[u8],
        start: u64,
        end: u64,
        stream: Option<Stream>,
        cut: bool,
        now: Instant,
    ) {
        let Some(format) = self.container else {
            self.join(
                Record {
                    text: line.to_vec(),
                    start,
                    end,
                    stream,
                    time: None,
                },
                cut,
                now,
            );
            return;
        };
        let Some(u) = container::unwrap(format, line) else {
            // Not the runtime's format: shipped as it is, counted.
            self.malformed += 1;
            self.join(
                Record {
                    text: line.to_vec(),
                    start,
                    end,
                    stream: None,
                    time: None,
                },
                false,
                now,
            );
            return;
        };
        let s = slot(Some(u.stream));
        let record = match self.partial[s].take() {
            Some(mut p) => {
                p.record.text.extend_from_slice(&u.text);
                p.record.end = end;
                p.lines += 1;
                p.last = now;
                p
            }
            None => Pending {
                record: Record {
                    text: u.text.into_owned(),
                    start,
                    end,
                    stream: Some(u.stream),
                    // A Docker line without `time` has none (not `""`, which a `_bulk`
                    // `@timestamp` refuses): the record takes its read time.
                    time: (!u.time.is_empty()).then(|| u.time.into_owned()),
                },
                lines: 1,
                last: now,
                open: false,
            },
        };
        if u.partial && record.record.text.len() < MAX_LINE {
            self.partial[s] = Some(record);
        } else {
            // Joined pieces that reached MAX_LINE: the rest of the line follows (as for a line
            // the reader cut at MAX_LINE).
            self.join(record.record, u.partial, now);
        }
    }

    /// Step 2: multiline joining, or straight to `ready`.
    fn join(&mut self, record: Record, cut: bool, now: Instant) {
        let Some(m) = &self.multiline else {
            self.ready.push_back(record);
            return;
        };
        let s = slot(record.stream);
        if let Some(p) = self.joined[s].as_mut().filter(|p| p.open) {
            // The rest of a line cut at MAX_LINE: appended as it is, whatever it starts with.
            if p.record.text.len() + record.text.len() <= m.max_bytes {
                p.record.text.extend_from_slice(&record.text);
                p.record.end = record.end;
                p.last = now;
                p.open = cut;
                return;
            }
            // Past max_bytes: the record leaves and the rest of the line begins the next one.
            if let Some(p) = self.joined[s].take() {
                self.ready.push_back(p.record);
            }
            self.joined[s] = Some(Pending {
                record,
                lines: 1,
                last: now,
                open: cut,
            });
            return;
        }
        let starts = match std::str::from_utf8(&record.text) {
            Ok(t) => m.start.is_match(t),
            Err(_) => m.start.is_match(&String::from_utf8_lossy(&record.text)),
        };
        let fits = |p: &Pending| {
            p.lines < m.max_lines && p.record.text.len() + 1 + record.text.len() <= m.max_bytes
        };
        match self.joined[s].take() {
            Some(mut p) if !starts && fits(&p) => {
                p.record.text.push(b'\n');
                p.record.text.extend_from_slice(&record.text);
                p.record.end = record.end;
                p.lines += 1;
                p.last = now;
                p.open = cut;
                if p.lines >= m.max_lines && !cut {
                    self.ready.push_back(p.record);
                } else {
                    self.joined[s] = Some(p);
                }
            }
            before => {
                if let Some(p) = before {
                    self.ready.push_back(p.record);
                }
                self.joined[s] = Some(Pending {
                    record,
                    lines: 1,
                    last: now,
                    open: cut,
                });
            }
        }
    }

    /// Sends on records that waited too long for their next line.
    pub fn flush_expired(&mut self, now: Instant) {
        for s in 0..SLOTS {
            if let Some(p) = self.partial[s].take_if(|p| now.duration_since(p.last) >= PARTIAL_WAIT)
            {
                self.join(p.record, false, now);
            }
            let timeout = self.multiline.as_ref().map(|m| m.timeout.get());
            if let Some(t) = timeout
                && let Some(p) = self.joined[s].take_if(|p| now.duration_since(p.last) >= t)
            {
                self.ready.push_back(p.record);
            }
        }
    }

    /// Sends on every record being joined (the file is done, or the agent stops).
    pub fn flush_all(&mut self, now: Instant) {
        for s in 0..SLOTS {
            if let Some(p) = self.partial[s].take() {
                self.join(p.record, false, now);
            }
        }
        for s in 0..SLOTS {
            if let Some(p) = self.joined[s].take() {
                self.ready.push_back(p.record);
            }
        }
    }

    /// The file was truncated or replaced and is read again from 0: every record held is sent
    /// on as it is (its lines are gone from the file, so they cannot be read again), and no
    /// longer points into the file (a checkpoint taken while it waits for a batch says 0).
    pub fn flush_detached(&mut self, now: Instant) {
        self.flush_all(now);
        for r in &mut self.ready {
            r.start = 0;
            r.end = 0;
        }
    }

    /// Lines not in the runtime's format (shipped as they are) since the last call.
    pub fn take_malformed(&mut self) -> u64 {
        std::mem::take(&mut self.malformed)
    }

    /// Records held: joined and waiting for a batch, or still being joined.
    pub fn held(&self) -> usize {
        self.ready.len() + self.partial.iter().chain(&self.joined).flatten().count()
    }

    /// Where the oldest line not yet in a batch starts: a checkpoint must not pass it.
    pub fn oldest(&self) -> Option<u64> {
        self.partial
            .iter()
            .chain(&self.joined)
            .flatten()
            .map(|p| p.record.start)
            .chain(self.ready.iter().map(|r| r.start))
            .min()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.partial.iter().chain(&self.joined).all(Option::is_none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn multiline(start: &str, max_lines: usize) -> Multiline {
        Multiline {
            start: regex::Regex::new(start).unwrap(),
            max_lines,
            max_bytes: 1024,
            timeout: crate::config::Duration::from_secs(1),
        }
    }

    fn texts(a: &mut Assembler) -> Vec<String> {
        a.ready
            .drain(..)
            .map(|r| String::from_utf8(r.text).unwrap())
            .collect()
    }

    #[test]
    fn stack_traces_join_under_their_start_line_and_the_checkpoint_waits_for_them() {
        let mut a = Assembler::new(None, Some(multiline(r"^\S", 3))).unwrap();
        let now = Instant::now();
        let mut at = 0u64;
        for l in [
            "Exception in main",
            "  at a()",
            "  at b()",
            "next",
            "  at c()",
            "  at d()",
            "  at e()",
        ] {
            let end = at + l.len() as u64 + 1;
            a.push(l.as_bytes(), at, end, None, false, now);
            at = end;
        }
        // Three lines at most: `at e()` starts a record of its own.
        assert_eq!(
            texts(&mut a),
            [
                "Exception in main\n  at a()\n  at b()",
                "next\n  at c()\n  at d()"
            ]
        );
        assert_eq!(a.oldest(), Some(at - "  at e()\n".len() as u64));
        a.flush_expired(now + Duration::from_millis(999));
        assert!(a.ready.is_empty());
        a.flush_expired(now + Duration::from_secs(1));
        assert_eq!(texts(&mut a), ["  at e()"]);
        assert!(a.is_empty() && a.oldest().is_none());
    }

    #[test]
    fn cri_partial_pieces_join_per_stream() {
        let mut a = Assembler::new(Some(Container::Cri), None).unwrap();
        let now = Instant::now();
        let lines = [
            "2024-01-01T00:00:00.1Z stdout P hel",
            "2024-01-01T00:00:00.2Z stderr F an error",
            "2024-01-01T00:00:00.3Z stdout P lo ",
            "2024-01-01T00:00:00.4Z stdout F world",
        ];
        let mut at = 0;
        for l in lines {
            let end = at + l.len() as u64 + 1;
            a.push(l.as_bytes(), at, end, None, false, now);
            at = end;
        }
        let r: Vec<_> = a.ready.drain(..).collect();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].text, b"an error");
        assert_eq!(r[0].stream, Some(Stream::Stderr));
        assert_eq!(r[1].text, b"hello world");
        assert_eq!(r[1].time.as_deref(), Some("2024-01-01T00:00:00.1Z"));
        assert_eq!((r[1].start, r[1].end), (0, at));
        // A piece whose end never comes leaves after PARTIAL_WAIT.
        a.push(
            b"2024-01-01T00:00:01Z stdout P cut",
            at,
            at + 10,
            None,
            false,
            now,
        );
        assert_eq!(a.oldest(), Some(at));
        a.flush_expired(now + PARTIAL_WAIT);
        assert_eq!(texts(&mut a), ["cut"]);
    }

    #[test]
    fn pieces_of_a_cut_line_join_without_a_line_end_and_past_max_bytes_begin_the_next() {
        let mut m = multiline(r"^\S", 10);
        m.max_bytes = 30;
        let mut a = Assembler::new(None, Some(m)).unwrap();
        let now = Instant::now();
        // `ERROR aaaaaaaa` + `bbbb` is one line cut in two (the second piece would match
        // `start`, and is still no record of its own).
        a.push(b"ERROR aaaaaaaa", 0, 14, None, true, now);
        a.push(b"bbbb", 14, 19, None, false, now);
        a.push(b"  at x", 19, 26, None, false, now);
        a.push(b"next", 26, 31, None, false, now);
        assert_eq!(texts(&mut a), ["ERROR aaaaaaaabbbb\n  at x"]);
        // Past max_bytes: the record leaves and the rest of the line begins the next one, cut
        // where the reader cut it, with no `\n` added anywhere.
        a.push(b"0123456789ab", 31, 43, None, true, now);
        a.push(b"0123456789ab", 43, 55, None, true, now);
        a.push(b"end-of-line", 55, 67, None, false, now);
        a.flush_all(now);
        assert_eq!(
            texts(&mut a),
            ["next", "0123456789ab0123456789ab", "end-of-line"]
        );
    }

    #[test]
    fn a_line_not_in_the_runtimes_format_is_counted_and_not_joined_into_stdouts_record() {
        let mut a = Assembler::new(Some(Container::Cri), Some(multiline(r"^\S", 10))).unwrap();
        let now = Instant::now();
        a.push(
            b"2024-01-01T00:00:00Z stdout F Exception",
            0,
            40,
            None,
            false,
            now,
        );
        a.push(b"damaged: no time", 40, 57, None, false, now);
        a.push(b"  more damage", 57, 71, None, false, now);
        a.push(
            b"2024-01-01T00:00:01Z stdout F   at b()",
            83,
            122,
            None,
            false,
            now,
        );
        assert_eq!(a.take_malformed(), 2);
        assert_eq!(a.take_malformed(), 0);
        a.flush_all(now);
        let r: Vec<_> = a.ready.drain(..).collect();
        let stdout = r.iter().find(|r| r.stream == Some(Stream::Stdout)).unwrap();
        assert_eq!(stdout.text, b"Exception\n  at b()");
        let other = r.iter().find(|r| r.stream.is_none()).unwrap();
        assert_eq!(other.text, b"damaged: no time\n  more damage");
    }

    #[test]
    fn records_held_when_the_file_is_truncated_leave_pointing_nowhere_in_it() {
        let mut a = Assembler::new(None, Some(multiline(r"^\S", 10))).unwrap();
        let now = Instant::now();
        a.push(b"Exception", 100, 110, None, false, now);
        a.push(b"  at a()", 110, 119, None, false, now);
        assert_eq!(a.held(), 1);
        a.flush_detached(now);
        let r: Vec<_> = a.ready.drain(..).collect();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].text, b"Exception\n  at a()");
        assert_eq!((r[0].start, r[0].end), (0, 0));
    }
}
