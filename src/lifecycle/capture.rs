//! Capturing the supervised app's stdout and stderr for the log agent (`logs.sources: [{app:
//! stdio}]`), while still echoing every byte to Outrigger's own stdout and stderr so that
//! `kubectl logs` keeps working.
//!
//! With capture on, the app's stdout and stderr are pipes; one task per pipe reads them, offers
//! each line to the agent's queue (bounded in bytes) and then hands the whole lines read to an
//! echo writer beside it (bounded in bytes too). The app is never blocked by either:
//! - when the queue is full (the sink is slow or down), the line is still echoed but not
//!   shipped, and counted as dropped (`buffer_full`). Blocking the app instead would turn a log
//!   backend outage into an app outage; the echoed copy stays in the container runtime's log;
//! - when Outrigger's own stdout/stderr does not keep up (a full pipe), lines are still shipped
//!   but not echoed once [`ECHO_BUFFER`] is waiting, and counted (`echo_full`).
//!
//! The echo is written whole lines at a time (a line still being written is held until its end,
//! up to [`MAX_LINE`]), so the app's stdout and stderr sharing one terminal or pipe do not cut
//! into each other's lines.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Which of the app's streams a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One line the app wrote, without its line ending.
#[derive(Debug)]
pub struct AppLine {
    pub stream: Stream,
    pub line: Vec<u8>,
    /// Cut at [`MAX_LINE`]: the next line of this stream is the rest of this one.
    pub cut: bool,
}

/// A line longer than this is cut into pieces of this size (so one endless line cannot take
/// all memory); each piece is shipped as a line.
pub const MAX_LINE: usize = 256 * 1024;

/// Bytes of whole lines waiting to be echoed, per stream, before more are not echoed (and
/// counted): a few seconds of a chatty app, so a briefly slow terminal or log pipe loses
/// nothing.
pub const ECHO_BUFFER: usize = 4 << 20;

/// The sending half: handed to the app's supervisor; cheap to clone.
#[derive(Clone)]
pub struct Capture {
    tx: mpsc::UnboundedSender<AppLine>,
    shared: Arc<Shared>,
}

/// The receiving half, for the log agent.
pub struct Captured {
    rx: mpsc::UnboundedReceiver<AppLine>,
    shared: Arc<Shared>,
}

struct Shared {
    /// Bytes queued now.
    bytes: AtomicUsize,
    cap: usize,
    /// Lines refused because the queue was full, not yet reported.
    dropped: AtomicUsize,
    /// Lines not echoed because our own stream did not keep up, not yet reported.
    echo_dropped: AtomicUsize,
}

/// A new capture queue holding at most `cap` bytes of lines.
pub fn capture(cap: usize) -> (Capture, Captured) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        bytes: AtomicUsize::new(0),
        cap,
        dropped: AtomicUsize::new(0),
        echo_dropped: AtomicUsize::new(0),
    });
    (
        Capture {
            tx,
            shared: shared.clone(),
        },
        Captured { rx, shared },
    )
}

impl Capture {
    /// Queues `line` unless the queue is full (then counts it as dropped).
    fn offer(&self, stream: Stream, line: Vec<u8>, cut: bool) {
        // Each line costs its bytes and a little for the queue entry.
        let cost = line.len() + 32;
        let now = self.shared.bytes.fetch_add(cost, Ordering::AcqRel);
        if now + cost > self.shared.cap || self.tx.send(AppLine { stream, line, cut }).is_err() {
            self.shared.bytes.fetch_sub(cost, Ordering::AcqRel);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads `pipe` to its end, queueing each line and echoing every byte to `echo`. The
    /// reading never waits for the echo: whole lines go to the echo writer through a buffer of
    /// [`ECHO_BUFFER`] bytes, written a read at a time (one write per up to 64 KiB, not one
    /// per line: a write to our stdout goes through tokio's blocking pool).
    pub async fn pump(
        self,
        stream: Stream,
        pipe: impl AsyncRead + Unpin,
        mut echo: impl AsyncWrite + Unpin,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let waiting = AtomicUsize::new(0);
        let read = self.read(stream, pipe, tx, &waiting);
        let write = async {
            while let Some(chunk) = rx.recv().await {
                // A closed stdout of ours must not stop capture.
                let _ = echo.write_all(&chunk).await;
                if rx.is_empty() {
                    let _ = echo.flush().await;
                }
                waiting.fetch_sub(chunk.len(), Ordering::AcqRel);
            }
        };
        // Both run in this task; the reader goes on while the writer waits on a full stdout.
        tokio::join!(read, write);
    }

    async fn read(
        self,
        stream: Stream,
        mut pipe: impl AsyncRead + Unpin,
        echo: mpsc::UnboundedSender<Vec<u8>>,
        waiting: &AtomicUsize,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        // The start of a line whose end has not been read yet.
        let mut partial: Vec<u8> = Vec::new();
        // What was read and not echoed yet: the partial line's bytes.
        let mut unechoed: Vec<u8> = Vec::new();
        let send_echo = |bytes: Vec<u8>| {
            if bytes.is_empty() {
                return;
            }
            let n = bytes.len();
            if waiting.fetch_add(n, Ordering::AcqRel) + n > ECHO_BUFFER {
                waiting.fetch_sub(n, Ordering::AcqRel);
                let lines = memchr::memchr_iter(b'\n', &bytes).count().max(1);
                self.shared.echo_dropped.fetch_add(lines, Ordering::Relaxed);
            } else if echo.send(bytes).is_err() {
                waiting.fetch_sub(n, Ordering::AcqRel);
            }
        };
        loop {
            let n = match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let mut rest = chunk;
            while let Some(nl) = memchr::memchr(b'\n', rest) {
                let mut line = if partial.is_empty() {
                    rest[..nl].to_vec()
                } else {
                    let mut l = std::mem::take(&mut partial);
                    l.extend_from_slice(&rest[..nl]);
                    l
                };
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                // A line longer than MAX_LINE whose end came in this read is cut as one whose
                // end is still to come (below): where the pipe's reads split it changes nothing.
                while line.len() > MAX_LINE {
                    let tail = line.split_off(MAX_LINE);
                    self.offer(stream, std::mem::replace(&mut line, tail), true);
                }
                self.offer(stream, line, false);
                rest = &rest[nl + 1..];
            }
            partial.extend_from_slice(rest);
            // Cut once more than MAX_LINE and a possible `\r` are held: a line of MAX_LINE bytes
            // (and its `\r\n`) waits for its end, so that it comes out the same as when its end
            // is in the same read (above).
            let mut cut = false;
            while partial.len() > MAX_LINE + 1 {
                let tail = partial.split_off(MAX_LINE);
                self.offer(stream, std::mem::replace(&mut partial, tail), true);
                cut = true;
            }
            // Echo exactly the bytes read, up to the last line end (all of it when a line was
            // cut: it is too long to hold).
            let whole = if cut { n } else { n - rest.len() };
            unechoed.extend_from_slice(&chunk[..whole]);
            send_echo(std::mem::take(&mut unechoed));
            unechoed.extend_from_slice(&chunk[whole..]);
        }
        if !partial.is_empty() {
            self.offer(stream, partial, false);
        }
        send_echo(unechoed);
    }
}

impl Captured {
    /// The next line; None once every [`Capture`] is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<AppLine> {
        let l = self.rx.recv().await?;
        self.release(&l);
        Some(l)
    }

    /// A line if one is queued now.
    pub fn try_recv(&mut self) -> Result<AppLine, mpsc::error::TryRecvError> {
        let l = self.rx.try_recv()?;
        self.release(&l);
        Ok(l)
    }

    fn release(&self, l: &AppLine) {
        self.shared
            .bytes
            .fetch_sub(l.line.len() + 32, Ordering::AcqRel);
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }

    /// Lines dropped since the last call.
    pub fn take_dropped(&self) -> usize {
        self.shared.dropped.swap(0, Ordering::Relaxed)
    }

    /// Lines not echoed since the last call.
    pub fn take_echo_dropped(&self) -> usize {
        self.shared.echo_dropped.swap(0, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_echoed_and_queued_and_a_full_queue_drops_and_counts() {
        let (cap, mut got) = capture(64 + 3 * 32);
        let input: &[u8] = b"one\r\ntwo\nthree without end";
        let mut echo = Vec::new();
        cap.clone().pump(Stream::Stdout, input, &mut echo).await;
        assert_eq!(echo, input);
        assert_eq!(got.try_recv().unwrap().line, b"one");
        assert_eq!(got.try_recv().unwrap().line, b"two");
        assert_eq!(got.try_recv().unwrap().line, b"three without end");
        assert_eq!(got.queued_bytes(), 0);

        let big = vec![b'x'; 100];
        cap.offer(Stream::Stderr, big.clone(), false);
        cap.offer(Stream::Stderr, big, false);
        assert_eq!(got.take_dropped(), 1);
        drop(cap);
        assert_eq!(got.recv().await.unwrap().stream, Stream::Stderr);
        assert!(got.recv().await.is_none());
    }

    /// A pipe whose reads return the given pieces, one a read (as a loaded system's pipe
    /// splits what the app wrote wherever it happens to).
    struct Reads(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Reads {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                if piece.len() > buf.remaining() {
                    let rest = piece.split_off(buf.remaining());
                    self.0.push_front(rest);
                }
                buf.put_slice(&piece);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The pieces a line longer than MAX_LINE is cut into do not depend on where the pipe's
    /// reads split it: its end in the same read as the cut (the flaky
    /// `an_apps_line_longer_than_a_spool_line_arrives_whole_in_its_pieces` under load) or in
    /// a later one. A line of exactly MAX_LINE bytes, with `\n` or `\r\n`, is never cut.
    #[tokio::test]
    async fn a_long_lines_pieces_do_not_depend_on_how_the_pipe_reads_split_it() {
        let mut input = vec![b'a'; 300 * 1024];
        input.extend_from_slice(b"\nend\n");
        input.extend(std::iter::repeat_n(b'b', MAX_LINE));
        input.extend_from_slice(b"\r\n");
        input.extend(std::iter::repeat_n(b'c', MAX_LINE));
        input.extend_from_slice(b"\n");
        input.extend(std::iter::repeat_n(b'd', MAX_LINE + 1));
        input.extend_from_slice(b"\r\nlast\n");
        let want: Vec<(usize, bool)> = vec![
            (MAX_LINE, true),
            (300 * 1024 - MAX_LINE, false),
            (3, false),
            (MAX_LINE, false),
            (MAX_LINE, false),
            (MAX_LINE, true),
            (1, false),
            (4, false),
        ];
        // Reads of 64 KiB from the start; from odd offsets; one that holds the end of the first
        // line and crosses MAX_LINE; one byte at a time around each MAX_LINE boundary.
        let mut splits: Vec<Vec<usize>> = vec![vec![64 * 1024], vec![1000, 64 * 1024]];
        splits.push(vec![240 * 1024, 64 * 1024]);
        splits.push(vec![MAX_LINE - 2, 1, 1, 1, 1, 64 * 1024]);
        for sizes in splits {
            let mut pieces = std::collections::VecDeque::new();
            let mut at = 0;
            let mut i = 0;
            while at < input.len() {
                let n = sizes[i.min(sizes.len() - 1)].min(input.len() - at);
                pieces.push_back(input[at..at + n].to_vec());
                at += n;
                i += 1;
            }
            let (cap, mut got) = capture(64 << 20);
            let mut echo = Vec::new();
            cap.pump(Stream::Stdout, Reads(pieces), &mut echo).await;
            assert!(echo == input, "every byte echoed ({sizes:?})");
            let mut lines = Vec::new();
            while let Ok(l) = got.try_recv() {
                lines.push((l.line.len(), l.cut));
            }
            assert_eq!(lines, want, "reads of {sizes:?}");
        }
    }

    /// An AsyncWrite into a shared buffer; `stuck` ones never take a byte.
    #[derive(Clone, Default)]
    struct Sink {
        out: Arc<std::sync::Mutex<Vec<u8>>>,
        stuck: bool,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.stuck {
                return std::task::Poll::Pending;
            }
            self.out.lock().unwrap().extend_from_slice(b);
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn stdout_and_stderr_echoed_to_one_place_do_not_cut_into_each_others_lines() {
        let (cap, mut got) = capture(1 << 20);
        let shared = Sink::default();
        let (mut out_w, out_r) = tokio::io::duplex(1024);
        let (mut err_w, err_r) = tokio::io::duplex(1024);
        let a = tokio::spawn(cap.clone().pump(Stream::Stdout, out_r, shared.clone()));
        let b = tokio::spawn(cap.pump(Stream::Stderr, err_r, shared.clone()));
        out_w.write_all(b"half a line, ").await.unwrap();
        err_w.write_all(b"an error\n").await.unwrap();
        // The stderr line is echoed while stdout's is still open.
        assert_eq!(got.recv().await.unwrap().line, b"an error");
        while shared.out.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        out_w.write_all(b"then the rest\n").await.unwrap();
        drop((out_w, err_w));
        let (a, b) = tokio::join!(a, b);
        a.unwrap();
        b.unwrap();
        assert_eq!(
            String::from_utf8(shared.out.lock().unwrap().clone()).unwrap(),
            "an error\nhalf a line, then the rest\n"
        );
        assert_eq!(
            got.recv().await.unwrap().line,
            b"half a line, then the rest"
        );
    }

    #[tokio::test]
    async fn a_stdout_that_takes_nothing_neither_blocks_the_app_nor_its_shipping() {
        let (cap, mut got) = capture(64 << 20);
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let stuck = Sink {
            stuck: true,
            ..Default::default()
        };
        let pump = tokio::spawn(cap.pump(Stream::Stdout, r, stuck));
        let line = [b'x'; 1023];
        let lines = 2 * ECHO_BUFFER / 1024;
        let writer = tokio::spawn(async move {
            for _ in 0..lines {
                w.write_all(&line).await.unwrap();
                w.write_all(b"\n").await.unwrap();
            }
        });
        // Every line written reaches the queue although nothing was echoed.
        let mut n = 0;
        while got.recv().await.is_some() {
            n += 1;
        }
        writer.await.unwrap();
        assert_eq!(n, lines);
        let not_echoed = got.take_echo_dropped();
        assert!(not_echoed >= lines / 2 - 64, "{not_echoed}");
        pump.abort();
    }
}
