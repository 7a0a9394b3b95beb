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

use super::connect::Connector;
use crate::proxy::body::{BoxError, ProxyBody};
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
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
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
    ) -> Result<Response<ProxyBody>, SendError> {
        if let Some(len) = super::raw_exchange::takes(&req) {
            return super::raw_exchange::send(self, req, len).await;
        }
        loop {
            let (mut sender, pooled) = match self.take() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = poll_fn(|cx| sender.poll_ready(cx)).await {
                if pooled {
                    continue; // closed while idle: nothing was sent
                }
                return Err(SendError {
                    connect: false,
                    downstream: false,
                    error: e.into(),
                });
            }
            match sender.try_send_request(req).await {
                Ok(res) => {
                    // Not after a 1xx (an upgrade takes the connection over).
                    let back = (!res.status().is_informational()).then(|| (self.clone(), sender));
                    return Ok(res.map(|inner| Returning { inner, back }.boxed()));
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
    fn take(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().expect("not poisoned");
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < self.idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    /// A connection whose last response is done goes back on the stack.
    fn put(self: &Arc<Self>, sender: http1::SendRequest<ProxyBody>) {
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
        let io = self.connector.connect().await?.into_inner();
        Ok(Raw {
            io,
            buf: vec![0; RAW_BUFFER],
            out: Vec::new(),
        })
    }

    async fn connect(&self) -> Result<http1::SendRequest<ProxyBody>, SendError> {
        let io = self.connector.connect().await.map_err(|e| SendError {
            connect: true,
            downstream: false,
            error: e.into(),
        })?;
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
        Ok(sender)
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
    back: Option<(Arc<Pool>, http1::SendRequest<ProxyBody>)>,
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
