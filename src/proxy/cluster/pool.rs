//! The HTTP/1.1 connection pool of one endpoint, for the proxy's forward path: idle
//! connections kept in a stack (the most recently used first), each a
//! `hyper::client::conn::http1` sender whose connection runs in a task of its own.
//!
//! Written here rather than using hyper-util's pooled client for the HTTP/1 path because that
//! client's generic pool was a fifth of the proxy's work per request (callgrind, 55,000
//! instructions per request before: a keyed `HashMap` checkout with SipHash, a waiter queue,
//! and a task spawned per response only to put the connection back). Here a request pops a
//! sender (one lock, no hash), and the response body hands it back when its last byte has
//! passed; a body dropped before its end drops the sender, which closes the connection (hyper
//! cannot reuse it). Like hyper-util's client, a request that a pooled connection could not
//! take because the upstream had just closed it is sent again on the next connection, since
//! nothing of it was sent. HTTP/2 clusters and CONNECT keep hyper-util's client
//! ([`super::Endpoint::send`]).
//!
//! In: requests in origin form from the forward phase. Out: the upstream's response (its body
//! returns the connection), or a [`SendError`] that says whether a connection was made at all.
//! Early answers: an upstream may answer a request before it has read the body (a 413 and a
//! close) and then reset the connection. hyper's HTTP/1 client gives the exchange up at the
//! first write that fails (its dispatcher reads before it writes, but a write error ends the
//! connection and goes to the request in place of a response still unread in the socket), so
//! the connection's I/O is wrapped ([`EarlyAnswer`]): a write that fails because the peer is
//! gone waits instead, until the read side ends, so that hyper reads the answer first.
//!
//! Idle connections close after the cluster's `pool_idle_timeout` (a sweep per pool, as long
//! as the pool has idle connections) and when the pool is dropped (`Cluster::close_idle`
//! replaces the endpoints, and so their pools).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::connect::Connector;
use crate::proxy::body::{BoxError, ProxyBody, UpstreamBody};
use crate::proxy::listener::Stream;

/// Idle connections kept per endpoint (as hyper-util's pool was configured).
const MAX_IDLE: usize = 256;

/// Why an exchange got no response.
#[derive(Debug)]
pub struct SendError {
    /// No connection could be made: nothing was sent.
    pub connect: bool,
    /// The request's own body failed (the downstream's fault, not the endpoint's).
    pub downstream: bool,
    pub error: BoxError,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Its cause is the exchange's error, so a walk of the chain (e.g. for a body that came too
/// slowly, `min_body_rate::too_slow`) finds what is inside.
impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.error)
    }
}

/// One endpoint's idle HTTP/1.1 connections: hyper's (the forward phase's) and raw ones (the
/// HTTP/1 fast path's, [`crate::proxy::fast_path`]), each in its own stack.
pub struct Pool {
    connector: Connector,
    idle: Mutex<Vec<Idle>>,
    raw: Mutex<Vec<RawIdle>>,
    idle_timeout: Duration,
    /// A sweep task is running (it ends once the pool is empty or gone).
    sweeping: AtomicBool,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// A connection's request sender, with the flag its [`EarlyAnswer`] sets when a write failed
/// with the upstream gone: such a connection is never pooled (hyper may still think it can
/// take a request, as when the upstream answered in full and then reset).
struct Sender {
    tx: http1::SendRequest<ProxyBody>,
    broken: Arc<AtomicBool>,
}

impl Sender {
    fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.broken.load(Ordering::Relaxed)
    }
}

/// An upstream connection the fast path speaks HTTP/1.1 on itself, with its read buffer (made
/// once per connection; empty whenever the connection is idle).
pub struct Raw {
    pub io: Stream,
    pub buf: Vec<u8>,
    /// Where [`super::raw_exchange`] writes request heads (empty between requests).
    pub out: Vec<u8>,
}

/// A raw connection's read buffer: a response head of a typical size and body reads of a
/// socket buffer's order.
const RAW_BUFFER: usize = 16 * 1024;

struct RawIdle {
    conn: Raw,
    since: Instant,
}

/// Whether an idle connection can no longer take a request: the upstream closed it (or sent
/// something unasked, which makes it unusable too). A read polled once without waiting.
fn unusable(io: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    !matches!(
        tokio::io::AsyncRead::poll_read(Pin::new(io), &mut cx, &mut buf),
        Poll::Pending
    )
}

impl Pool {
    pub(super) fn new(connector: Connector, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            idle: Mutex::new(Vec::new()),
            raw: Mutex::new(Vec::new()),
            idle_timeout,
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `req` (origin form) on an idle connection, or a new one: on a raw connection
    /// ([`super::raw_exchange`]) when that path takes it, else through hyper's client.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if let Some(len) = super::raw_exchange::takes(&req) {
            let res = super::raw_exchange::send(self, req, len).await?;
            return Ok(res.map(UpstreamBody::Raw));
        }
        loop {
            let (mut sender, pooled) = match self.take() {
                Some(s) => (s, true),
                // Boxed, as in `connect_raw` (here with hyper's handshake).
                None => (Box::pin(self.connect()).await?, false),
            };
            if let Err(e) = poll_fn(|cx| sender.tx.poll_ready(cx)).await {
                if pooled {
                    continue; // closed while idle: nothing was sent
                }
                return Err(SendError {
                    connect: false,
                    downstream: false,
                    error: e.into(),
                });
            }
            match sender.tx.try_send_request(req).await {
                Ok(res) => {
                    // Not after a 1xx (an upgrade takes the connection over).
                    let back = (!res.status().is_informational()).then(|| (self.clone(), sender));
                    return Ok(
                        res.map(|inner| UpstreamBody::Boxed(Returning { inner, back }.boxed()))
                    );
                }
                Err(mut e) => match e.take_message() {
                    // The connection closed before it took the request: send it again.
                    Some(r) if pooled => req = r,
                    _ => {
                        return Err(SendError {
                            connect: false,
                            downstream: false,
                            error: e.into_error().into(),
                        });
                    }
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and not past the idle
    /// timeout.
    fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("not poisoned");
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < self.idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    /// A connection whose last response is done goes back on the stack.
    fn put(self: &Arc<Self>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("not poisoned");
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
        drop(idle);
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// The most recently used idle raw connection that is still open and not past the idle
    /// timeout (the fast path's).
    pub fn take_raw(&self) -> Option<Raw> {
        let mut idle = self.raw.lock().expect("not poisoned");
        while let Some(mut i) = idle.pop() {
            if i.since.elapsed() < self.idle_timeout && !unusable(&mut i.conn.io) {
                return Some(i.conn);
            }
        }
        None
    }

    /// A raw connection whose exchange ended cleanly goes back on its stack.
    pub fn put_raw(self: &Arc<Self>, mut conn: Raw) {
        // A large response head grew the buffer (up to 400 KiB): idle, it shrinks back.
        if conn.buf.len() > RAW_BUFFER {
            conn.buf.truncate(RAW_BUFFER);
            conn.buf.shrink_to_fit();
        }
        // The same for the request-head buffer after a large request head.
        if conn.out.capacity() > 4096 {
            conn.out = Vec::new();
        }
        conn.out.clear();
        let mut idle = self.raw.lock().expect("not poisoned");
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(RawIdle {
            conn,
            since: Instant::now(),
        });
        drop(idle);
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }

    /// A new raw connection (TLS included, within the connect timeout).
    pub async fn connect_raw(&self) -> std::io::Result<Raw> {
        // Boxed: the connect future (TCP, TLS, their timeout) is one of the largest states of
        // the request's future, which is moved whole into its box and its task; a connection
        // is made once for many requests, and only then is this allocated.
        let io = Box::pin(self.connector.connect()).await?.into_inner();
        Ok(Raw {
            io,
            buf: vec![0; RAW_BUFFER],
            out: Vec::new(),
        })
    }

    async fn connect(&self) -> Result<Sender, SendError> {
        let io = self.connector.connect().await.map_err(|e| SendError {
            connect: true,
            downstream: false,
            error: e.into(),
        })?;
        let broken = Arc::new(AtomicBool::new(false));
        let io = TokioIo::new(EarlyAnswer::new(io.into_inner(), broken.clone()));
        let (sender, conn) = http1::handshake(io).await.map_err(|e| SendError {
            connect: true,
            downstream: false,
            error: e.into(),
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Sender { tx: sender, broken })
    }
}

/// How long a write that failed (the peer gone) waits for the read side to say something
/// before its error goes to hyper. After a reset the read side ends at once (an answer the
/// upstream sent first, then EOF), so this only bounds a read side hyper stops polling.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Once an answer is coming in, how long the wait may go on without a byte read (a client
/// that reads the answer slowly holds hyper's reads back). Always bounded: hyper may stop
/// reading for good (bytes past a complete answer, which it leaves unread), and then the
/// write's error must end the connection.
const EARLY_ANSWER_IDLE: Duration = Duration::from_secs(10);

/// An upstream connection's I/O for hyper's HTTP/1 client, where a write failed because the
/// upstream went away (a reset, a broken pipe) does not fail at once: it stays pending until
/// the read side ends (EOF or an error), then fails with its error. Meanwhile hyper's
/// dispatcher, which polls the read side first on each turn, reads a response the upstream
/// sent before it went (an early 413 + close to a body it would not read) and hands it to
/// the request, instead of the write's error; the response body is read to its end, and the
/// connection ends there (it is never pooled: hyper sees the request unfinished). Without a
/// response the read side ends at once too (EOF after a reset), and the request gets the
/// "connection closed before message completed" error, as before. Written here: neither
/// hyper nor hyper-util has an option for it (hyper's server side has `half_close`, its
/// client nothing).
struct EarlyAnswer {
    io: Stream,
    /// A write failed with the peer gone: its error kind, and how long it may still wait for
    /// the read side ([`EARLY_ANSWER_WAIT`], then [`EARLY_ANSWER_IDLE`] from each read).
    broken: Option<(std::io::ErrorKind, Pin<Box<tokio::time::Sleep>>)>,
    /// The read side ended (EOF or an error).
    read_ended: bool,
    /// Set with `broken`, shared with the connection's [`Sender`] (which then is not pooled).
    gone: Arc<AtomicBool>,
}

impl EarlyAnswer {
    fn new(io: Stream, gone: Arc<AtomicBool>) -> EarlyAnswer {
        EarlyAnswer {
            io,
            broken: None,
            read_ended: false,
            gone,
        }
    }

    /// What a write does once the peer is gone: pending while an answer may still be read,
    /// else the write's error.
    fn poll_broken(&mut self, cx: &mut Context<'_>) -> Option<Poll<std::io::Error>> {
        let (kind, wait) = self.broken.as_mut()?;
        let kind = *kind;
        // The timer is polled whatever was read: the wait is always bounded.
        if self.read_ended || wait.as_mut().poll(cx).is_ready() {
            return Some(Poll::Ready(kind.into()));
        }
        Some(Poll::Pending)
    }

    /// Whether `res`, a write's result, is the peer gone (with the read side still open):
    /// then the connection waits for the read side ([`Self::poll_broken`]).
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        res: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match res {
            Poll::Ready(Err(e))
                if !self.read_ended
                    && matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted) =>
            {
                tracing::debug!(error = %e, "upstream write failed; reading for an early answer");
                self.gone.store(true, Ordering::Relaxed);
                self.broken = Some((e.kind(), Box::pin(tokio::time::sleep(EARLY_ANSWER_WAIT))));
                match self.poll_broken(cx) {
                    Some(Poll::Ready(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Pending,
                }
            }
            other => other,
        }
    }
}

impl AsyncRead for EarlyAnswer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) if buf.filled().len() == before => self.read_ended = true,
            Poll::Ready(Ok(())) => {
                if let Some((_, wait)) = self.broken.as_mut() {
                    // An answer is coming in: the wait goes on while bytes come.
                    wait.as_mut()
                        .reset(tokio::time::Instant::now() + EARLY_ANSWER_IDLE);
                }
            }
            Poll::Ready(Err(_)) => self.read_ended = true,
            Poll::Pending => {}
        }
        res
    }
}

impl AsyncWrite for EarlyAnswer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(p) = self.poll_broken(cx) {
            return p.map(Err);
        }
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(p) = self.poll_broken(cx) {
            return p.map(Err);
        }
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(p) = self.poll_broken(cx) {
            return p.map(Err);
        }
        let res = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, res)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Nothing to shut on a connection the peer has gone from.
        if self.broken.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Closes idle connections past the timeout, every timeout period, until the pool has none
/// left (the next `put` starts a sweep again) or is gone.
async fn sweep(pool: Weak<Pool>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().expect("not poisoned");
        idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < every);
        let mut raw = pool.raw.lock().expect("not poisoned");
        raw.retain_mut(|i| i.since.elapsed() < every && !unusable(&mut i.conn.io));
        if idle.is_empty() && raw.is_empty() {
            pool.sweeping.store(false, Ordering::Relaxed);
            return;
        }
    }
}

/// A response body that returns its connection to the pool once its end has passed.
struct Returning {
    inner: Incoming,
    back: Option<(Arc<Pool>, Sender)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((pool, sender)) = self.back.take() {
            pool.put(sender);
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // Dropped at its end (a reader that stops after the last frame, or an empty body
        // never polled): the connection is still good. Otherwise it is dropped: hyper closes
        // a connection whose response was not read to the end.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        res.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
