//! Capturing the supervised app's stdout and stderr for the log agent (`logs.sources: [{app:
//! stdio}]`), while still echoing every byte to Outrigger's own stdout and stderr so that
//! `kubectl logs` keeps working.
//!
//! With capture on, the app's stdout and stderr are pipes; one task per pipe reads lines, writes
//! each to our own stream first, then offers it to a queue bounded in bytes. The app is never
//! blocked by the log agent: when the queue is full (the sink is slow or down), the line is
//! still echoed but not shipped, and counted as dropped (`buffer_full`). Blocking the app
//! instead would turn a log backend outage into an app outage; the echoed copy stays in the
//! container runtime's log.

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
}

/// A line longer than this is cut into pieces of this size (so one endless line cannot take
/// all memory); each piece is shipped as a line.
pub const MAX_LINE: usize = 256 * 1024;

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
}

/// A new capture queue holding at most `cap` bytes of lines.
pub fn capture(cap: usize) -> (Capture, Captured) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        bytes: AtomicUsize::new(0),
        cap,
        dropped: AtomicUsize::new(0),
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
    fn offer(&self, stream: Stream, line: Vec<u8>) {
        // Each line costs its bytes and a little for the queue entry.
        let cost = line.len() + 32;
        let now = self.shared.bytes.fetch_add(cost, Ordering::AcqRel);
        if now + cost > self.shared.cap || self.tx.send(AppLine { stream, line }).is_err() {
            self.shared.bytes.fetch_sub(cost, Ordering::AcqRel);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads `pipe` to its end, echoing every byte to `echo` and queueing each line. The echo
    /// is written a whole read at a time (one write per up to 64 KiB, not one per line: a
    /// write to our stdout goes through tokio's blocking pool).
    pub async fn pump(
        self,
        stream: Stream,
        mut pipe: impl AsyncRead + Unpin,
        mut echo: impl AsyncWrite + Unpin,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        // The start of a line whose end has not been read yet.
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let n = match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            // Echo first, exactly as written; a closed stdout of ours must not stop capture.
            let _ = echo.write_all(chunk).await;
            let _ = echo.flush().await;
            let mut rest = chunk;
            while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
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
                self.offer(stream, line);
                rest = &rest[nl + 1..];
            }
            partial.extend_from_slice(rest);
            while partial.len() >= MAX_LINE {
                let tail = partial.split_off(MAX_LINE);
                self.offer(stream, std::mem::replace(&mut partial, tail));
            }
        }
        if !partial.is_empty() {
            self.offer(stream, partial);
        }
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
        cap.offer(Stream::Stderr, big.clone());
        cap.offer(Stream::Stderr, big);
        assert_eq!(got.take_dropped(), 1);
        drop(cap);
        assert_eq!(got.recv().await.unwrap().stream, Stream::Stderr);
        assert!(got.recv().await.is_none());
    }
}
