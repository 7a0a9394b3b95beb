//! Listening sockets (TCP v4/v6 and unix), the stream type both sides of the proxy use, and a
//! metered wrapper that counts bytes and remembers when the connection was last active (for
//! idle timeouts).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::Address;

/// A bound listening socket.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Who is on the other end of an accepted connection.
#[derive(Clone, Debug)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    Unix,
}

impl Peer {
    /// The peer's IP, for `x-forwarded-for` (none for unix sockets).
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Peer::Tcp(a) => Some(a.ip().to_canonical()),
            Peer::Unix => None,
        }
    }

    /// The peer's IP as an `x-forwarded-for` value (none for unix sockets): formatted once per
    /// connection, not per request (formatting it was ~1,300 instructions per request).
    pub fn forwarded_for(&self) -> Option<http::HeaderValue> {
        let ip = self.ip()?;
        http::HeaderValue::from_str(&ip.to_string()).ok()
    }
}

impl Bound {
    /// Binds `address`. A stale unix socket file from a previous run is replaced (never a
    /// regular file), and the socket gets `mode`. A socket handed over by the Outrigger this
    /// one takes over from (hot restart) is used as it is.
    pub async fn bind(address: &Address, mode: u32) -> io::Result<Bound> {
        use crate::runtime::upgrade::{take_tcp, take_unix};
        match address {
            Address::Tcp(a) => match take_tcp(*a)? {
                Some(l) => Ok(Bound::Tcp(l)),
                None => Ok(Bound::Tcp(TcpListener::bind(a).await?)),
            },
            Address::Unix(path) => {
                if let Some(l) = take_unix(path)? {
                    // The new config's `socket_mode`, which may differ from the old one's.
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                    return Ok(Bound::Unix(l));
                }
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    } else {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                }
                let l = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                Ok(Bound::Unix(l))
            }
        }
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_address(&self) -> io::Result<Address> {
        match self {
            Bound::Tcp(l) => Ok(Address::Tcp(l.local_addr()?)),
            Bound::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr
                    .as_pathname()
                    .ok_or_else(|| io::Error::other("unnamed unix socket"))?;
                Ok(Address::Unix(path.to_path_buf()))
            }
        }
    }

    pub async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Bound::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Small writes (a response head, a gRPC message) must not wait for Nagle.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Tcp(peer)))
            }
            Bound::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), Peer::Unix))
            }
        }
    }
}

/// Connects to an endpoint, with nodelay on TCP.
pub async fn connect(address: &Address) -> io::Result<Stream> {
    match address {
        Address::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
        Address::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p).await?)),
    }
}

/// A TCP or unix stream, or TLS over one.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A terminated TLS connection (inbound).
    TlsServer(Box<tokio_rustls::server::TlsStream<Stream>>),
    /// An originated TLS connection (to an upstream).
    TlsClient(Box<tokio_rustls::client::TlsStream<Stream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsServer(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsClient(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsServer(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::TlsServer(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::TlsClient(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsServer(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsServer(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The socket's descriptor goes back to the reserve when the connection closes (a TLS or
/// other wrapped stream has none of its own).
impl crate::descriptors::IntoSpare for Stream {
    fn into_spare(self) -> Option<std::os::fd::OwnedFd> {
        match self {
            Stream::Tcp(s) => crate::descriptors::IntoSpare::into_spare(s),
            Stream::Unix(s) => crate::descriptors::IntoSpare::into_spare(s),
            _ => None,
        }
    }
}

impl crate::tls::accept::Accepted for Stream {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            _ => None,
        }
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Whether a connection has moved bytes: a counter bumped on every read and write, shared
/// between the connection's I/O and its idle watcher. A counter rather than a timestamp: the
/// data path then never reads the clock; the watcher compares the counter across one idle
/// period, so a connection is closed after between one and two idle periods of silence.
///
/// It also tells a write that waits (the peer reads nothing: its window or our socket buffer
/// is full) from silence: bytes the peer *sends* keep a connection from being idle, so a client
/// that trickles bytes but never reads is caught by [`Activity::write_stalled`] instead.
#[derive(Clone, Default)]
pub struct Activity(Arc<Counts>);

#[derive(Default)]
struct Counts {
    /// Reads that moved bytes.
    read: AtomicU64,
    /// Writes that moved bytes.
    written: AtomicU64,
    /// A write (or flush) returned `Pending` and no write has moved bytes since.
    write_waiting: AtomicBool,
}

impl Activity {
    pub fn new() -> Self {
        Self::default()
    }
    fn touch(&self) {
        self.0.read.fetch_add(1, Ordering::Relaxed);
    }
    fn wrote(&self) {
        self.0.written.fetch_add(1, Ordering::Relaxed);
        if self.0.write_waiting.load(Ordering::Relaxed) {
            self.0.write_waiting.store(false, Ordering::Relaxed);
        }
    }
    fn write_blocked(&self) {
        self.0.write_waiting.store(true, Ordering::Relaxed);
    }
    /// Reads and writes so far; unchanged across an idle period means no bytes moved.
    pub fn count(&self) -> u64 {
        self.0.read.load(Ordering::Relaxed) + self.0.written.load(Ordering::Relaxed)
    }
    /// Writes that moved bytes so far.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }
    /// Whether a write waits now, with no write moving bytes since it began to.
    pub fn write_stalled(&self) -> bool {
        self.0.write_waiting.load(Ordering::Relaxed)
    }
}

/// Accept failures back off and are logged once a second ([`crate::descriptors`]).
pub use crate::descriptors::AcceptErrors;

/// Counts bytes each way, records activity, and lets an HTTP/1 framing scanner see what was
/// received.
pub struct Metered<S> {
    inner: S,
    activity: Activity,
    received: Counter,
    sent: Counter,
    scanner: Option<super::framing::Scanner>,
}

impl<S> Metered<S> {
    pub fn new(
        inner: S,
        activity: Activity,
        received: Counter,
        sent: Counter,
        scanner: Option<super::framing::Scanner>,
    ) -> Self {
        Metered {
            inner,
            activity,
            received,
            sent,
            scanner,
        }
    }
}

impl<S> Metered<S> {
    /// Starts (or stops) the framing scanner: the HTTP/1 fast path parses heads itself and
    /// hands hyper a scanner that starts at a head when it falls back.
    pub fn set_scanner(&mut self, scanner: Option<super::framing::Scanner>) {
        self.scanner = scanner;
    }

    /// Counts what a write moved, or notes that it waits (the peer reads nothing).
    fn wrote(&mut self, res: &Poll<io::Result<usize>>) {
        match res {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.sent.inc_by(*n as u64);
                self.activity.wrote();
            }
            Poll::Pending => self.activity.write_blocked(),
            _ => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.received.inc_by(n as u64);
            this.activity.touch();
            if let Some(scanner) = &mut this.scanner {
                scanner.feed(&buf.filled()[before..]);
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&res);
        res
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&res);
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        // TLS takes a whole response into its buffer and waits only here.
        if res.is_pending() {
            this.activity.write_blocked();
        }
        res
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_shutdown(cx);
        // TLS writes close_notify here, which a client that reads nothing can hold up.
        if res.is_pending() {
            this.activity.write_blocked();
        }
        res
    }
}
