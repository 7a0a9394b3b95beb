//! Running out of descriptors (EMFILE): what keeps admin and the bridge answering when a
//! flooded proxy listener has taken every descriptor the process may open, and how every
//! accept loop behaves meanwhile.
//!
//! - **The reserve**: a few spare descriptors (`/dev/null`, opened at start-up) kept aside.
//!   When an accept of admin or the bridge fails with EMFILE/ENFILE, one spare is closed and
//!   the accept tried again at once, so `/live`, `/ready` and `/v1.0/healthz` are answered;
//!   when that connection closes, its descriptor *number* becomes the spare again: `dup2` of
//!   `/dev/null` onto the socket's descriptor closes the socket and fills the slot in one
//!   system call, so no other thread (a flooded listener's accept on another worker, the
//!   bridge's runtime) can take the slot in between. The classic trick (libev, nginx, libuv)
//!   closes a spare to *shed* a queued connection; here it serves the ones that must not fail.
//! - **With several threads** the gap between closing a spare and the accept that uses its
//!   slot cannot be closed (Linux has no "accept into this descriptor"): a descriptor opened by
//!   another thread in those microseconds takes it, and the accept fails again. It then takes
//!   the next spare, up to all [`SPARES`] of them, instead of giving up after one.
//! - **A proxy listener gives slots back**: while the reserve is short (a spare is in use, or
//!   another thread took a freed slot first), a connection a proxy listener accepts is closed
//!   at once and its descriptor becomes a spare ([`Reserve::short`], [`Reserve::take_back`]).
//!   Otherwise every race a flooded listener wins would cost the reserve a spare for good
//!   (its connection is held), and after [`SPARES`] lost races the health endpoints fail.
//!   Out of descriptors, the process serves no more proxy connections anyway.
//! - **Accept errors** ([`AcceptErrors`]): every accept loop (proxy listeners, bridge, admin)
//!   backs off while accepts fail and logs once a second with a count.
//! - The proxy's per-listener connection caps leave room below `RLIMIT_NOFILE` by default
//!   (`config::proxy::default_max_connections`), so a flood on one listener does not take the
//!   descriptors of the others in the first place.
//!
//! In: accept results. Out: accepted sockets, with a [`Refill`] for those that used a spare.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Spare descriptors kept: one per admin or bridge connection that must be answered at the
/// same moment while the process is out of descriptors (a kubelet's liveness and readiness
/// probes, the app's SDK health check, a scrape), with room to spare.
pub const SPARES: usize = 8;

/// The spare descriptors.
pub struct Reserve {
    spares: Mutex<Vec<std::fs::File>>,
    /// `/dev/null`, kept open to `dup2` onto a closing connection's descriptor (one more
    /// descriptor, so that turning a socket into a spare never needs a free slot).
    null: Option<std::fs::File>,
}

static RESERVE: OnceLock<Reserve> = OnceLock::new();

/// The process's reserve, filled on first use (admin calls this at start-up, before any
/// listener can be flooded).
pub fn reserve() -> &'static Reserve {
    RESERVE.get_or_init(|| {
        let r = Reserve {
            spares: Mutex::new(Vec::with_capacity(SPARES)),
            null: std::fs::File::open("/dev/null").ok(),
        };
        r.refill();
        r
    })
}

impl Reserve {
    /// Closes one spare; false when none is left.
    fn release(&self) -> bool {
        self.spares.lock().expect("not poisoned").pop().is_some()
    }

    /// Opens spares up to [`SPARES`]; stops at the first that cannot be opened (descriptors
    /// are still short: the next refill tries again).
    pub fn refill(&self) {
        let mut spares = self.spares.lock().expect("not poisoned");
        while spares.len() < SPARES {
            match std::fs::File::open("/dev/null") {
                Ok(f) => spares.push(f),
                Err(_) => break,
            }
        }
    }

    /// Whether spares are missing: in use by a connection accepted out of descriptors, or
    /// taken by another thread's descriptor in a race. A full reserve only gets short when the
    /// process runs out of descriptors.
    pub fn short(&self) -> bool {
        self.spares.lock().expect("not poisoned").len() < SPARES
    }

    /// Makes `fd` (a connection's socket, deregistered from its runtime) a spare in one system
    /// call: `/dev/null` is duplicated onto it, which closes the socket and keeps the slot.
    /// False when the reserve is full or the call failed (`fd` is then closed as it is).
    pub fn take_back(&self, mut fd: OwnedFd) -> bool {
        let mut spares = self.spares.lock().expect("not poisoned");
        let Some(null) = &self.null else {
            return false;
        };
        if spares.len() >= SPARES || nix::unistd::dup2(null, &mut fd).is_err() {
            return false;
        }
        spares.push(std::fs::File::from(fd));
        true
    }

    /// Spares held now.
    pub fn available(&self) -> usize {
        self.spares.lock().expect("not poisoned").len()
    }
}

/// Whether an accept (or open) failed because the process or the system is out of
/// descriptors.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Held by a connection that was accepted with a spare descriptor: its drop refills the
/// reserve. Drop it after the socket (declare it before the connection, or after it in a
/// struct), so the socket's descriptor is the one that comes back.
#[derive(Debug)]
pub struct Refill(());

impl Drop for Refill {
    fn drop(&mut self) {
        reserve().refill();
    }
}

/// Accepts with `accept`; when the process is out of descriptors, closes a spare and accepts
/// again at once — and again with the next spare while another thread takes the freed slot
/// first. The connection then comes with a [`Refill`] to keep until it closes.
pub async fn accept_with_reserve<T, F, Fut>(mut accept: F) -> io::Result<(T, Option<Refill>)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut refill = None;
    loop {
        match accept().await {
            Ok(accepted) => return Ok((accepted, refill)),
            // On an error the refill (dropped here) takes the spares back.
            Err(e) if out_of_descriptors(&e) && reserve().release() => {
                // One for all the spares used (a second would refill on being replaced).
                if refill.is_none() {
                    refill = Some(Refill(()));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A socket whose descriptor can become a spare when its connection closes.
pub trait IntoSpare {
    /// Deregisters the socket from its runtime and gives its descriptor (None: it has none of
    /// its own, like a TLS stream).
    fn into_spare(self) -> Option<OwnedFd>;
}

impl IntoSpare for tokio::net::TcpStream {
    fn into_spare(self) -> Option<OwnedFd> {
        self.into_std().ok().map(OwnedFd::from)
    }
}

impl IntoSpare for tokio::net::UnixStream {
    fn into_spare(self) -> Option<OwnedFd> {
        self.into_std().ok().map(OwnedFd::from)
    }
}

/// A stream and the [`Refill`] it may hold: when it drops, a stream that used a spare gives
/// its descriptor back to the reserve in one system call ([`IntoSpare`]); failing that, it is
/// closed and the reserve refilled by opening.
pub struct Held<S: IntoSpare> {
    /// Always `Some` until the drop.
    io: Option<S>,
    refill: Option<Refill>,
}

impl<S: IntoSpare> Held<S> {
    pub fn new(io: S, refill: Option<Refill>) -> Self {
        Held {
            io: Some(io),
            refill,
        }
    }

    fn io(&mut self) -> &mut S {
        self.io.as_mut().expect("taken only by the drop")
    }
}

impl<S: IntoSpare> Drop for Held<S> {
    fn drop(&mut self) {
        if let (Some(refill), Some(io)) = (self.refill.take(), self.io.take())
            && let Some(fd) = io.into_spare()
        {
            reserve().take_back(fd);
            // Tops up what other threads took while this connection held a spare.
            drop(refill);
        }
    }
}

impl<S: IntoSpare + AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()).poll_read(cx, buf)
    }
}

impl<S: IntoSpare + AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io()).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io()).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()).poll_shutdown(cx)
    }
}

/// Accept failures (EMFILE when descriptors run out, ECONNABORTED…) on one listener: wait
/// before trying again, longer while they go on, and log them once a second with their count
/// (one line per failure was 2,126 warnings in 40 s when descriptors ran out).
#[derive(Debug)]
pub struct AcceptErrors {
    /// Failures not logged yet.
    unlogged: u64,
    last_log: Option<Instant>,
    delay: Duration,
}

/// The first wait after a failure; doubled while failures go on, up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            unlogged: 0,
            last_log: None,
            delay: ACCEPT_BACKOFF_MIN,
        }
    }
}

impl AcceptErrors {
    /// Counts a failure, logs (at most once a second) and waits before the next accept. A
    /// connection that failed on its own (aborted or reset while queued) is retried at once.
    pub async fn failed(&mut self, listener: &str, error: &io::Error) {
        if matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
        ) {
            tracing::debug!(listener, %error, "a queued connection failed before its accept");
            return;
        }
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(listener, %error, failures = self.unlogged, "accept failed; backing off");
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF_MAX);
    }

    /// An accept worked: the next failure waits the shortest time again, and failures not
    /// logged yet are (so a later line does not carry a stale count).
    pub fn succeeded(&mut self) {
        if self.unlogged > 0 {
            tracing::warn!(
                failures = self.unlogged,
                "accept failed; accepting again now"
            );
            self.unlogged = 0;
        }
        self.delay = ACCEPT_BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accept_failures_back_off_and_are_logged_together() {
        let mut errors = AcceptErrors::default();
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..5 {
            errors.failed("in", &e).await;
        }
        // The first was logged; the next four wait for the next line (within the second).
        assert_eq!(errors.unlogged, 4);
        assert_eq!(errors.delay, Duration::from_millis(320));
        for _ in 0..10 {
            errors.failed("in", &e).await;
        }
        assert_eq!(errors.delay, ACCEPT_BACKOFF_MAX);
        errors.succeeded();
        assert_eq!(errors.delay, ACCEPT_BACKOFF_MIN);
    }

    /// The reserve is the process's: tests that count its spares take turns.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn out_of_descriptors_an_accept_uses_a_spare_and_gives_it_back() {
        let _turn = TURN.lock().await;
        let r = reserve();
        r.refill();
        assert_eq!(r.available(), SPARES);
        let mut calls = 0;
        let (v, refill) = accept_with_reserve(|| {
            calls += 1;
            let first = calls == 1;
            async move {
                if first {
                    Err(io::Error::from_raw_os_error(libc::EMFILE))
                } else {
                    Ok(7)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((v, calls), (7, 2));
        assert!(refill.is_some());
        assert_eq!(r.available(), SPARES - 1);
        drop(refill);
        assert_eq!(r.available(), SPARES);
        // Any other error is the caller's, and spares stay.
        let e = accept_with_reserve(|| async { Err::<(), _>(io::Error::other("nope")) }).await;
        assert!(e.is_err());
        assert_eq!(r.available(), SPARES);
    }

    /// Another thread that takes the freed slot first (simulated: the accept fails again)
    /// makes the accept use the next spare, not give up.
    #[tokio::test]
    async fn an_accept_raced_for_a_freed_slot_takes_the_next_spare() {
        let _turn = TURN.lock().await;
        let r = reserve();
        r.refill();
        let mut calls = 0;
        let (_, refill) = accept_with_reserve(|| {
            calls += 1;
            let lost = calls <= 3;
            async move {
                if lost {
                    Err(io::Error::from_raw_os_error(libc::EMFILE))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(calls, 4);
        assert_eq!(r.available(), SPARES - 3);
        drop(refill);
        assert_eq!(r.available(), SPARES);
        // Every spare lost to other threads: the error is the caller's, the spares come back.
        let e = accept_with_reserve(|| async {
            Err::<(), _>(io::Error::from_raw_os_error(libc::EMFILE))
        })
        .await;
        assert!(e.is_err());
        assert_eq!(r.available(), SPARES);
    }

    /// A connection that used a spare gives its own descriptor number back as the spare: the
    /// socket is closed (the peer reads end of stream) and the slot holds `/dev/null`, with no
    /// moment in which another thread could have taken it.
    #[tokio::test]
    async fn a_closing_connection_turns_its_own_descriptor_into_the_spare() {
        use std::os::fd::AsRawFd;
        use tokio::io::AsyncReadExt;

        let _turn = TURN.lock().await;
        let r = reserve();
        r.refill();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(r.release());
        let fd = server.as_raw_fd();
        let held = Held::new(server, Some(Refill(())));
        drop(held);
        assert_eq!(r.available(), SPARES);
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(target, std::path::Path::new("/dev/null"));
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        // The descriptor is one of the spares (closing one reopens nothing in its place).
        assert!(r.spares.lock().unwrap().iter().any(|f| f.as_raw_fd() == fd));
    }
}
