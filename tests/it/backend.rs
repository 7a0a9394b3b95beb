//! A real HTTP backend for proxy tests: a hyper server (HTTP/1.1 and h2c) on a loopback port or
//! a unix socket, in its own runtime thread, recording every request it sees.
//!
//! Paths: `/status/N` answers N; `/slow/MS` answers after MS milliseconds; `/drip/MS` sends
//! `a`, then `b` MS milliseconds later; `/upgrade` switches
//! protocols and echoes bytes; `/stream` (or a gRPC-like `/pkg.Svc/Stream`) echoes the request body frame by frame and ends with
//! `grpc-status: 0` trailers (the shape of a gRPC bidi stream; a stream reset by the caller is
//! counted, [`Backend::resets`]); a gRPC-like `/pkg.Svc/Ticks` answers two 5-byte gRPC
//! messages ([`TICK`]) [`TICK_GAP`] apart, a third once the test calls
//! [`Backend::release_ticks`], then `grpc-status: 0` (a server stream); anything else echoes the request as JSON (method, path,
//! headers, body).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = BoxBody<Bytes, Infallible>;

/// What the backend saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Backend {
    pub addr: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections open to the backend now.
    open: Arc<std::sync::atomic::AtomicUsize>,
    #[cfg_attr(not(feature = "bridge"), allow(dead_code))]
    counters: Arc<Counters>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// An HTTP backend on 127.0.0.1, port 0.
    pub fn http() -> Backend {
        Self::start(None, "127.0.0.1:0")
    }

    /// An HTTP backend on `addr`, or None when it cannot be bound.
    pub fn http_at(addr: &str) -> Option<Backend> {
        std::net::TcpListener::bind(addr).ok()?;
        Some(Self::start(None, addr))
    }

    /// An HTTP backend on a unix socket at `path`.
    pub fn http_unix(path: PathBuf) -> Backend {
        Self::start(Some(path), "")
    }

    fn start(unix: Option<PathBuf>, tcp: &str) -> Backend {
        let tcp = tcp.to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let seen2 = seen.clone();
        let unix2 = unix.clone();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open2 = open.clone();
        let counters = Arc::new(Counters::default());
        let counters2 = counters.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut rx = rx;
                enum L {
                    Tcp(tokio::net::TcpListener),
                    Unix(tokio::net::UnixListener),
                }
                let l = match &unix2 {
                    Some(p) => L::Unix(tokio::net::UnixListener::bind(p).unwrap()),
                    None => L::Tcp(tokio::net::TcpListener::bind(&tcp).await.unwrap()),
                };
                let addr = match &l {
                    L::Tcp(t) => Some(t.local_addr().unwrap()),
                    L::Unix(_) => None,
                };
                addr_tx.send(addr).unwrap();
                loop {
                    let (seen, counters) = (seen2.clone(), counters2.clone());
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, seen.clone(), counters.clone())
                    });
                    tokio::select! {
                        _ = &mut rx => return,
                        c = async {
                            match &l {
                                L::Tcp(t) => t.accept().await.map(|(s, _)| Either::Tcp(s)),
                                L::Unix(u) => u.accept().await.map(|(s, _)| Either::Unix(s)),
                            }
                        } => {
                            let Ok(s) = c else { continue };
                            let open = open2.clone();
                            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::spawn(async move {
                                let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                                let _ = match s {
                                    Either::Tcp(s) => b.serve_connection_with_upgrades(TokioIo::new(s), svc).await,
                                    Either::Unix(s) => b.serve_connection_with_upgrades(TokioIo::new(s), svc).await,
                                };
                                open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            });
                        }
                    }
                }
            });
        });
        let addr = addr_rx.recv().unwrap();
        Backend {
            addr,
            unix,
            seen,
            open,
            counters,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn address(&self) -> String {
        match (&self.addr, &self.unix) {
            (Some(a), _) => a.to_string(),
            (None, Some(p)) => format!("unix:{}", p.display()),
            _ => unreachable!(),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Connections open to the backend now (from the sidecar's pools, mostly).
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// `/Stream` calls whose request was reset (cancelled) by the caller.
    #[cfg(feature = "bridge")]
    pub fn resets(&self) -> usize {
        self.counters
            .resets
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets one `/Ticks` call send its last message.
    #[cfg(feature = "bridge")]
    pub fn release_ticks(&self) {
        self.counters.release.notify_one();
    }
}

/// What the streaming paths did, for tests to read.
#[derive(Default)]
struct Counters {
    resets: std::sync::atomic::AtomicUsize,
    /// Lets a `/Ticks` call send its last message.
    release: tokio::sync::Notify,
}

/// One `/Ticks` message: gRPC's 5-byte prefix (uncompressed, length 2) and 2 bytes.
pub const TICK: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];
/// The pause between two `/Ticks` messages.
pub const TICK_GAP: Duration = Duration::from_millis(200);

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Either {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

async fn handle(
    mut req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    counters: Arc<Counters>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let mut record = Seen {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: Vec::new(),
    };
    if path == "/upgrade" {
        seen.lock().unwrap().push(record);
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = full(101, Bytes::new());
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(r);
    }
    if path == "/stream" || path.ends_with("/Stream") {
        seen.lock().unwrap().push(record);
        // Echo each frame as it arrives, then trailers: gRPC's shape, without its codec.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
        let mut body = req.into_body();
        tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    // RST_STREAM from the caller: the call was cancelled.
                    counters
                        .resets
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return;
                };
                if let Ok(data) = frame.into_data()
                    && tx.send(Ok(Frame::data(data))).await.is_err()
                {
                    return;
                }
            }
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        });
        let stream = ReceiverStream(rx);
        let mut r = Response::new(StreamBody::new(stream).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(r);
    }
    if path.ends_with("/Ticks") {
        seen.lock().unwrap().push(record);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tokio::spawn(async move {
            for i in 0..3 {
                if i == 1 {
                    tokio::time::sleep(TICK_GAP).await;
                }
                if i == 2 {
                    counters.release.notified().await;
                }
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(TICK))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        });
        let mut r = Response::new(StreamBody::new(ReceiverStream(rx)).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(r);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    record.body = body.to_vec();
    seen.lock().unwrap().push(record.clone());
    if let Some(code) = path.strip_prefix("/status/") {
        return Ok(full(
            code.parse().unwrap_or(500),
            format!("status {code}\n"),
        ));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return Ok(full(200, vec![b'x'; n.parse().unwrap_or(0)]));
    }
    if let Some(ms) = path.strip_prefix("/drip/") {
        // "a", then "b" after MS milliseconds: a body whose upstream is quiet mid-way.
        let ms = ms.parse().unwrap_or(1000);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"b")))).await;
        });
        return Ok(Response::new(StreamBody::new(ReceiverStream(rx)).boxed()));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
        return Ok(full(200, "slow done\n"));
    }
    let json = serde_json::json!({
        "method": record.method,
        "path": record.path,
        "version": record.version,
        "headers": record.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>(),
        "body": String::from_utf8_lossy(&record.body),
    });
    Ok(full(200, json.to_string()))
}

/// A `Stream` over an mpsc receiver (what `tokio-stream` would give, in a few lines).
pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// A TCP echo server on 127.0.0.1, port 0 (for `tcp` listeners).
pub fn tcp_echo() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    (addr, t)
}

/// A port on which nothing listens (bound, then closed).
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
