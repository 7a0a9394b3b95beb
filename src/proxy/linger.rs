//! Lingering close: a connection answered before its client sent all of a request body reads
//! and drops the rest for a while after our side is shut, instead of closing at once. Closing a
//! socket with unread bytes resets it, and a reset can reach the client before it has read its
//! answer: a client that writes its whole body before it reads (curl, most HTTP/1 clients for a
//! body it has in hand) would get `ECONNRESET` instead of its 413 (nginx's lingering close,
//! `lingering_timeout` and `lingering_time`, for the same reason).
//!
//! Both HTTP/1 servers use it: the fast path after the answers it writes itself
//! ([`drain`], with the unread length it knows), and hyper's path through [`Lingering`], the
//! connection's IO, which lingers when hyper shuts the connection down after a request whose
//! body was dropped before its end ([`Unread`], told by [`Tracked`], the request body hyper
//! hands the phases): a refusal (403, 503, 413 `body-too-large`, a chunked body cut at
//! `limits.max_request_body`) answers before the body is read, and hyper then closes.
//!
//! Bounded: at most `left` bytes (the unread `Content-Length`; a chunked body's rest is
//! unknown), at most [`LINGER`] between reads and [`LINGER_TOTAL`] in all; a client that
//! closes, errs or goes quiet ends it at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a lingering close waits for the client's next bytes: short, the client has its
/// answer, the connection's slot is what it holds (nginx waits up to 5 s between reads).
pub(super) const LINGER: Duration = Duration::from_secs(2);
/// The longest a lingering close reads a client that keeps sending (nginx: 30 s).
pub(super) const LINGER_TOTAL: Duration = Duration::from_secs(30);
/// The scratch buffer [`Lingering`] reads into.
const SCRATCH: usize = 8 * 1024;

/// One lingering close in progress: what may still be read and until when.
pub(super) struct Drain {
    left: u64,
    end: Instant,
    /// The next read's deadline: [`LINGER`] after the last one, never past `end`. None for a
    /// drain of no time ([`Drain::within`] zero: HTTP/2's close after ENHANCE_YOUR_CALM), over
    /// at once: no timer built and registered that nothing would poll.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Drain {
    pub(super) fn new(left: u64) -> Drain {
        let now = Instant::now();
        let end = now + LINGER_TOTAL;
        Drain {
            left,
            end,
            timer: Some(Box::pin(tokio::time::sleep_until((now + LINGER).min(end)))),
        }
    }

    /// Reads and drops everything the client sends, for at most `total` in all (and
    /// [`LINGER`] between reads): HTTP/2's close, after its last GOAWAY. Zero (or an `end`
    /// already past): over at once, nothing read (and no timer).
    pub(super) fn within(total: Duration) -> Drain {
        Drain::until(Instant::now() + total)
    }

    /// [`Drain::within`], to `end`.
    pub(super) fn until(end: Instant) -> Drain {
        let now = Instant::now();
        Drain {
            left: u64::MAX,
            end,
            timer: (end > now).then(|| Box::pin(tokio::time::sleep_until((now + LINGER).min(end)))),
        }
    }

    /// Ready once the current deadline has passed ([`LINGER`] since the last read or the
    /// start, never past `end`): for a shutdown that does not complete (a TLS close_notify
    /// that a client that reads nothing leaves stuck in a full send buffer).
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(timer) = &mut self.timer else {
            return Poll::Ready(());
        };
        if Instant::now() >= self.end {
            return Poll::Ready(());
        }
        timer.as_mut().poll(cx)
    }

    /// Reads and drops into `buf` until the client closes, errs, has sent `left` bytes or a
    /// deadline passes; Ready then.
    pub(super) fn poll<S: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut io: Pin<&mut S>,
        buf: &mut [u8],
    ) -> Poll<()> {
        let Some(timer) = &mut self.timer else {
            return Poll::Ready(());
        };
        while self.left > 0 {
            let now = Instant::now();
            if now >= self.end {
                return Poll::Ready(());
            }
            let want = self.left.min(buf.len() as u64) as usize;
            let mut read = ReadBuf::new(&mut buf[..want]);
            match io.as_mut().poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    self.left -= read.filled().len() as u64;
                    timer.as_mut().reset((now + LINGER).min(self.end));
                }
                // Closed or failed: nothing more to wait for.
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => {
                    ready!(timer.as_mut().poll(cx));
                    return Poll::Ready(());
                }
            }
        }
        Poll::Ready(())
    }
}

/// The fast path's lingering close: up to `left` bytes of `io` read into `buf` and dropped,
/// after our side of the connection is shut.
pub(super) async fn drain<S: AsyncRead + Unpin>(io: &mut S, buf: &mut [u8], left: u64) {
    let mut d = Drain::new(left);
    std::future::poll_fn(|cx| d.poll(cx, Pin::new(&mut *io), buf)).await
}

/// What hyper's path left unread of an HTTP/1 connection's last request body, in bytes
/// (`u64::MAX`: an unknown rest, chunked; 0: nothing), for [`Lingering`] to drop at the close.
///
/// Kept current as the body is read ([`Tracked`]), not only when it is dropped: a body cut at
/// `limits.max_request_body` is owned by the upstream request, which may drop it on another
/// worker after hyper has already shut the connection down. The count is what the handler
/// had not read; it includes what hyper had read ahead into its buffer, and when hyper reads
/// the rest of a small dropped body itself before a close, the count is stale: that close
/// then waits up to [`LINGER`] for bytes that do not come (bounded, and rare: hyper keeps
/// such a connection open for its next request, which resets the count).
#[derive(Clone, Default)]
pub(super) struct Unread(Arc<AtomicU64>);

impl Unread {
    /// A new request's body, watched (`http1`; HTTP/2 streams end with a reset, not a close).
    /// Hyper reads the next request head only once the last body was read to its end: what
    /// an earlier request left is forgotten.
    pub(super) fn track<B: Body>(&self, body: B, http1: bool) -> Tracked<B> {
        let tracked = Tracked {
            inner: body,
            unread: http1.then(|| self.clone()),
        };
        tracked.note(false);
        tracked
    }

    fn take(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }
}

/// A request body that keeps its connection's [`Unread`] at what is left of it.
pub struct Tracked<B: Body> {
    inner: B,
    unread: Option<Unread>,
}

impl<B: Body> Tracked<B> {
    /// Stores what is left unread: nothing once `ended` or at the end of the stream.
    fn note(&self, ended: bool) {
        if let Some(u) = &self.unread {
            let left = if ended || self.inner.is_end_stream() {
                0
            } else {
                self.inner.size_hint().exact().unwrap_or(u64::MAX)
            };
            u.0.store(left, Ordering::Relaxed);
        }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let res = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        self.note(res.is_none());
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// hyper's IO for a connection: when hyper shuts it down with a request body left unread
/// ([`Unread`]), our side is shut first (the answer and FIN go out), then the rest is read
/// and dropped ([`Drain`]) before hyper's connection ends.
pub(super) struct Lingering<S> {
    inner: S,
    unread: Unread,
    state: Closing,
}

enum Closing {
    /// Until hyper's shutdown completes; with the deadline set at its first Pending.
    Open(Option<Pin<Box<Sleep>>>),
    Draining(Drain),
    Done,
}

impl<S> Lingering<S> {
    pub(super) fn new(inner: S, unread: Unread) -> Self {
        Lingering {
            inner,
            unread,
            state: Closing::Open(None),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                Closing::Open(deadline) => {
                    // A TLS stream sends what it still holds and close_notify first, which a
                    // client that reads nothing can hold up for good: for at most [`LINGER`],
                    // then the connection is dropped without them.
                    if Pin::new(&mut this.inner).poll_shutdown(cx)?.is_pending() {
                        let timer =
                            deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
                        ready!(timer.as_mut().poll(cx));
                        this.state = Closing::Done;
                        continue;
                    }
                    this.state = match this.unread.take() {
                        0 => Closing::Done,
                        left => Closing::Draining(Drain::new(left)),
                    };
                }
                Closing::Draining(d) => {
                    let mut scratch = [0u8; SCRATCH];
                    ready!(d.poll(cx, Pin::new(&mut this.inner), &mut scratch));
                    this.state = Closing::Done;
                }
                Closing::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A body of `n` bytes in one frame, with its exact length.
    fn sized(n: usize) -> http_body_util::Full<Bytes> {
        http_body_util::Full::new(Bytes::from(vec![b'x'; n]))
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_leaves_its_rest_unread_and_a_read_one_nothing() {
        let unread = Unread::default();
        drop(unread.track(sized(100), true));
        assert_eq!(unread.take(), 100);
        // Counted while the body is still held: a body cut at the limit is dropped by the
        // upstream request, maybe after hyper shut the connection down.
        let held = unread.track(sized(100), true);
        assert_eq!(unread.take(), 100, "the rest of a body still held");
        drop(held);
        let read = unread.track(sized(100), true).collect().await.unwrap();
        assert_eq!(read.to_bytes().len(), 100);
        assert_eq!(unread.take(), 0);
        // HTTP/2 streams are not counted.
        drop(unread.track(sized(100), false));
        assert_eq!(unread.take(), 0);
    }

    #[tokio::test]
    async fn a_shutdown_after_an_unread_body_reads_the_rest_before_it_ends() {
        let (ours, mut client) = tokio::io::duplex(1024);
        let unread = Unread::default();
        unread.0.store(5000, Ordering::Relaxed);
        let mut io = Lingering::new(ours, unread);
        let closing = tokio::spawn(async move {
            io.write_all(b"HTTP/1.1 413 \r\n\r\n").await.unwrap();
            io.shutdown().await.unwrap();
        });
        // The client writes all 5000 bytes (more than the pipe holds) before it reads.
        client.write_all(&[b'y'; 5000]).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 413 \r\n\r\n");
        closing.await.unwrap();
    }

    /// An IO whose shutdown never completes: a TLS stream whose close_notify does not fit in
    /// the send buffer of a client that reads nothing.
    pub(crate) struct StuckShutdown<S>(pub(crate) S);

    impl<S: AsyncRead + Unpin> AsyncRead for StuckShutdown<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for StuckShutdown<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// A drain of no time (HTTP/2's close after ENHANCE_YOUR_CALM) is over at once, whether
    /// our shutdown waits or not, and reads nothing of a client that keeps writing; it builds
    /// no timer: it runs on a runtime without one, where building a `Sleep` panics (review
    /// h2guard leftover: the timer was built and never polled).
    #[test]
    fn a_drain_of_no_time_ends_at_once_and_builds_no_timer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut ours, mut client) = tokio::io::duplex(1024);
            client.write_all(b"more").await.unwrap();
            let mut d = Drain::within(Duration::ZERO);
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(d.poll_expired(&mut cx).is_ready(), "a stuck shutdown");
            let mut scratch = [0u8; 64];
            assert!(
                d.poll(&mut cx, Pin::new(&mut ours), &mut scratch)
                    .is_ready()
            );
            let mut unread = [0u8; 4];
            ours.read_exact(&mut unread).await.unwrap();
            assert_eq!(&unread, b"more", "nothing read");
        });
    }

    /// A shutdown that never completes (review h2-merged SERIOUS 1) ends after [`LINGER`]:
    /// the connection is then dropped without its close_notify.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_that_never_completes_is_given_up() {
        let (ours, _client) = tokio::io::duplex(1024);
        let mut io = Lingering::new(StuckShutdown(ours), Unread::default());
        tokio::time::timeout(Duration::from_secs(60), io.shutdown())
            .await
            .expect("the shutdown was given up")
            .unwrap();
    }
}
