//! Accepting and serving connections: each listener's accept loop (with backpressure at
//! `max_connections`), then per connection the TLS handshake when the listener terminates TLS
//! ([`crate::tls::accept`]), the hold for a starting app (`tcp`), and serving: opaque copying
//! for `tcp` listeners ([`super::tcp`]); for `http` ones the HTTP/1 fast path first, then
//! hyper's HTTP/1.1 and HTTP/2 server, or, with `http2_server: outrigger`, our own HTTP/2
//! server ([`super::h2`]) for connections that begin with the HTTP/2 preface; each request
//! handled by the listener's newest generation ([`super::http`]).
//!
//! In: accepted sockets. Out: requests handed to the HTTP handler, bytes to a cluster; on
//! drain, connections are told to finish (HTTP/2 GOAWAY) and the loop returns once all are
//! gone. Idle connections close after `idle_timeout`; so do clients that read nothing (a write
//! waiting that long), and HTTP/2 streams whose client reads nothing are reset
//! ([`super::unread_streams`]). An HTTP/1 connection hyper closes after an answer that left
//! the request body unread lingers first ([`super::linger`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinSet;

use super::generation::{Kind, Listener, Serving};
use super::listener::{self, Activity, Metered, Peer, Stream};
use super::{fast_path, framing, http, linger, tcp};
use crate::runtime::Drain;
use crate::telemetry::metrics::GuardLabels;

/// A downstream connection's slot: releases the `max_connections` permit and updates the
/// connection gauges when the last holder (the connection, or an upgraded stream spliced from
/// it) is gone, even on a panic.
pub struct ConnectionGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: Gauge,
    closed: Counter,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
        self.closed.inc();
    }
}

/// Accepts until drained, then waits for the listener's connections to finish. An inbound
/// listener counts as an inbound task (the stop waits for it before signalling the app).
pub(super) async fn accept_loop(l: Arc<Listener>, mut drain: Drain) -> std::io::Result<()> {
    let _tracked = l.inbound.then(|| drain.track());
    let mut connections = JoinSet::new();
    let mut errors = listener::AcceptErrors::default();
    loop {
        // Backpressure: at the connection cap, stop accepting until one closes.
        let permit = tokio::select! {
            _ = drain.signaled() => break,
            p = async {
                let connections = l.serving.load().connections.clone();
                connections.acquire_owned().await
            } => p.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = drain.signaled() => break,
            r = l.bound.accept() => match r {
                Ok(pair) => {
                    errors.succeeded();
                    pair
                }
                Err(e) => {
                    // EMFILE, ECONNABORTED…: back off, keep serving.
                    errors.failed(&l.name, &e).await;
                    continue;
                }
            },
        };
        if crate::descriptors::reserve().short() {
            // Out of descriptors, and admin or the bridge needs one for a health check: this
            // connection's slot refills the reserve instead (see `crate::descriptors`).
            if let Some(fd) = crate::descriptors::IntoSpare::into_spare(stream) {
                crate::descriptors::reserve().take_back(fd);
            }
            let e = std::io::Error::other(
                "out of descriptors: connection closed, its descriptor kept for health checks",
            );
            errors.failed(&l.name, &e).await;
            continue;
        }
        while connections.try_join_next().is_some() {}
        // The newest generation, loaded after the accept: an idle listener must not hand its
        // first connection after a reload the old settings.
        let serving = l.serving.load_full();
        let l2 = l.clone();
        let drain = drain.clone();
        l.opened.inc();
        l.open.inc();
        let guard = Arc::new(ConnectionGuard {
            _permit: permit,
            open: l.open.clone(),
            closed: l.closed.clone(),
        });
        connections
            .spawn(async move { serve_connection(l2, serving, stream, peer, drain, guard).await });
    }
    tracing::info!(listener = %l.name, open = connections.len(), "listener draining");
    while connections.join_next().await.is_some() {}
    if l.inbound
        && let Kind::Http(state, _) = &l.serving.load().kind
    {
        for c in state.router.clusters() {
            c.close_idle();
        }
    }
    Ok(())
}

async fn serve_connection(
    l: Arc<Listener>,
    serving: Arc<Serving>,
    stream: listener::Stream,
    peer: Peer,
    mut drain: Drain,
    guard: Arc<ConnectionGuard>,
) {
    let mut identity = None;
    let secure = serving.tls.is_some();
    let stream = match &serving.tls {
        None => stream,
        Some(tls) => {
            let handshake = crate::tls::accept::handshake(
                tls,
                stream,
                &l.name,
                &peer,
                serving.limits.header_read_timeout.get(),
                matches!(serving.kind, Kind::Http(..)),
            );
            let done = tokio::select! {
                r = handshake => r,
                _ = drain.signaled() => None,
            };
            let Some((stream, id)) = done else { return };
            // HTTP listeners check `authz` per request (403, newest config); a tcp
            // connection has no requests: it is checked here and closed.
            if let (Some(allowed), Kind::Tcp(_)) = (&serving.config.authz, &serving.kind) {
                let ids = crate::tls::PeerIdentity::all(id.as_ref());
                if !crate::tls::authz::allowed(allowed, ids) {
                    tracing::warn!(listener = %l.name, peer = ?peer, identity = ?ids.first(), "identity not allowed on this listener; connection closed");
                    tls.metrics().handshake("server", &l.name, "forbidden");
                    return;
                }
            }
            identity = id;
            Stream::TlsServer(Box::new(stream))
        }
    };
    let activity = Activity::new();
    let alarm = framing::Alarm::default();
    // HTTP: the fast path reads heads itself; the framing scanner starts with hyper.
    let mut io = Metered::new(
        stream,
        activity.clone(),
        l.received.clone(),
        l.sent.clone(),
        None,
    );
    let idle = serving.limits.idle_timeout.get();
    match &serving.kind {
        Kind::Tcp(cluster) => {
            let _guard = guard;
            let open = match &serving.hold {
                Some((gate, limit)) if !gate.is_open() => tokio::select! {
                    open = gate.wait(*limit) => open,
                    _ = drain.signaled() => false,
                },
                _ => true,
            };
            if !open {
                tracing::debug!(listener = %l.name, "the app is not ready; tcp connection closed");
                return;
            }
            tokio::select! {
                _ = tcp::serve(io, peer, cluster.clone(), &l.name) => {}
                // Opaque bytes cannot be drained gracefully: close at the start of a stop (a
                // hot restart's hand-over lets them finish).
                _ = drain.must_close() => tracing::debug!(listener = %l.name, "tcp connection closed: draining"),
                silence = silent_for(&activity, idle, idle) => tracing::debug!(listener = %l.name, ?silence, "tcp connection closed"),
            }
        }
        Kind::Http(first, builder) => {
            let down = Arc::new(http::Downstream {
                forwarded_for: peer.forwarded_for(),
                peer,
                guard,
                drain: drain.clone(),
                activity: activity.clone(),
                idle_timeout: idle,
                streams: Default::default(),
                framing_alarm: alarm,
                secure,
                identity,
                last_host: Default::default(),
            });
            // Made once per connection, not per wake-up: a fresh timer for every request was
            // a measurable share of the data path.
            let drained = drain.signaled();
            // hyper's header timer starts at a request's first byte: a connection that never
            // sends one (a bare TCP connect, or silence after the TLS handshake) is given the
            // same `header_read_timeout` before its first watch period ends.
            let first_period = serving.limits.header_read_timeout.get().min(idle);
            let silent = silent_for(&activity, first_period, idle);
            let quiet = silent_for(&activity, DRAIN_QUIET, DRAIN_QUIET);
            tokio::pin!(drained, silent, quiet);
            let mut draining = false;
            // The HTTP/1 fast path first: it serves the requests it takes, and hands hyper the
            // connection (with the bytes it read) at the first one it does not.
            let flags = fast_path::Flags::default();
            let outcome = {
                let fast = fast_path::serve(
                    fast_path::Ctx {
                        listener: &l,
                        first,
                        down: &down,
                        flags: &flags,
                        header_read_timeout: serving.limits.header_read_timeout.get(),
                        max_head: serving.limits.max_header_bytes,
                    },
                    &mut io,
                );
                tokio::pin!(fast);
                loop {
                    // Biased: the connection first, the timers after (no random start per
                    // wake-up; the timers are only polled while the connection waits).
                    tokio::select! {
                        biased;
                        outcome = &mut fast => break outcome,
                        _ = &mut drained, if !draining => {
                            // As below: responses from now on say `connection: close`, and a
                            // connection quiet for a moment is closed.
                            draining = true;
                            quiet.set(silent_for(&activity, DRAIN_QUIET, DRAIN_QUIET));
                        }
                        _ = &mut quiet, if draining => {
                            if !flags.busy() {
                                break fast_path::Outcome::Closed;
                            }
                            flags.close_when_done();
                            quiet.set(silent_for(&activity, DRAIN_QUIET, DRAIN_QUIET));
                        }
                        silence = &mut silent => {
                            if silence == Silence::WriteStalled {
                                tracing::debug!(listener = %l.name, "the client read nothing for the idle timeout; connection closed");
                                l.stalled.inc();
                                break fast_path::Outcome::Closed;
                            }
                            if activity.count() == 0 {
                                tracing::debug!(listener = %l.name, "the client sent nothing; connection closed");
                                l.silent.inc();
                            }
                            if !flags.busy() {
                                break fast_path::Outcome::Closed;
                            }
                            flags.close_when_done();
                            silent.set(silent_for(&activity, idle, idle));
                        }
                    }
                }
            };
            let fast_path::Outcome::Fallback(prefix) = outcome else {
                return;
            };
            // `http2_server: outrigger`: an HTTP/2 connection (h2c with prior knowledge, or
            // TLS with ALPN `h2`: both begin with the client preface, which the fast path
            // hands over unread) goes to our own server; HTTP/1 goes on to hyper below.
            let prefix = match &serving.h2 {
                None => prefix,
                Some(settings) => {
                    let timeout = serving.limits.header_read_timeout.get();
                    match read_preface(&mut io, prefix, timeout).await {
                        Preface::Http2(prefix) => {
                            let settings = settings.clone();
                            let connection = H2Connection {
                                listener: &l,
                                first,
                                down,
                                settings,
                                draining,
                            };
                            return connection.serve(io, prefix).await;
                        }
                        Preface::Other(prefix) => prefix,
                        Preface::Closed => return,
                    }
                }
            };
            // hyper reads the head the fast path stopped at again: the framing scanner starts
            // there too.
            let mut scanner = framing::Scanner::new(down.framing_alarm.clone());
            scanner.feed(&prefix);
            io.set_scanner(Some(scanner));
            // HTTP/1: a connection hyper closes after an answer that left the request body
            // unread (a refusal, a 413) reads and drops the rest first (`linger`).
            let unread = linger::Unread::default();
            let io = linger::Lingering::new(fast_path::Rewind::new(prefix, io), unread.clone());
            // Each request is handled by the listener's newest config generation: a reload
            // reaches keep-alive connections too.
            let (listener, fallback) = (l.clone(), first.clone());
            let watched = down.clone();
            // Seen an HTTP/2 request: a drain can send GOAWAY at once.
            let h2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let saw_h2 = h2.clone();
            let service = hyper::service::service_fn(move |req| {
                let state = match &listener.serving.load().kind {
                    Kind::Http(state, _) => state.clone(),
                    // Reloaded as a tcp listener: this connection still speaks HTTP.
                    Kind::Tcp(_) => fallback.clone(),
                };
                let http1 = req.version() < hyper::Version::HTTP_2;
                if !http1 {
                    saw_h2.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let down = down.clone();
                let req = req.map(|body| unread.track(body, http1));
                // Boxed: the request's future (the whole forward state machine) is large,
                // and hyper moves the service's future by value into its HTTP/2 stream, the
                // executor into a task, tokio into the task's cell (each a memcpy of all of
                // it), and tokio writes a stage of that size again when the task ends. perf
                // on h2c put those copies at ~13 % of the process's time (docs/BENCHMARKS.md,
                // "fifth step"); the box is one allocation of a known size instead. HTTP/1
                // requests on hyper get it too (one future type for both protocols; an
                // `Either` would be as large as the unboxed future): callgrind counts the same
                // instructions per request there with and without it.
                let handled = boxed(|| state.handle(down.clone(), req));
                // HTTP/2: the response body is watched for a client that reads nothing
                // (hyper spawns this stream's task right after this call returns).
                let stream = (!http1).then(|| down.streams.next_stream());
                async move {
                    let mut response = handled.await?;
                    if let Some(stream) = stream {
                        response = response.map(|b| stream.watch(b));
                    }
                    // Draining: the client's next request goes on a new connection (to the
                    // process that took over, or nowhere after a stop) instead of racing the
                    // close of this one.
                    if http1 && down.drain.is_draining() {
                        response.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(conn);
            // HTTP/2 response bodies the client reads nothing of: flow control keeps the
            // socket writable, so only a watch on each body sees them.
            let unread = watched.streams.sweep_every(idle, &l.stalled_streams);
            tokio::pin!(unread);
            let mut closing = false;
            loop {
                // Biased, as above.
                tokio::select! {
                    biased;
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(listener = %l.name, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut unread => {}
                    _ = &mut drained, if !closing && !draining => {
                        // A keep-alive connection closed the moment a stop begins races the
                        // client's next request on it (which then fails). Instead: responses
                        // from now on say `connection: close`, and a connection with nothing
                        // moving for a moment is closed (HTTP/2 gets its GOAWAY at once: a
                        // client retries the streams it refuses).
                        draining = true;
                        if h2.load(std::sync::atomic::Ordering::Relaxed) {
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        } else {
                            quiet.set(silent_for(&activity, DRAIN_QUIET, DRAIN_QUIET));
                        }
                    }
                    _ = &mut quiet, if draining && !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    silence = &mut silent => {
                        // A client that reads nothing holds its response, the upstream
                        // connection behind it and their buffers for as long as it likes: a
                        // write that waited a whole idle period ends the connection, requests
                        // in flight too. (A quiet request waiting for its upstream is not
                        // that: nothing is being written.)
                        if silence == Silence::WriteStalled {
                            tracing::debug!(listener = %l.name, "the client read nothing for the idle timeout; connection closed");
                            l.stalled.inc();
                            break;
                        }
                        if activity.count() == 0 {
                            // Not a byte since the accept (or the TLS handshake).
                            tracing::debug!(listener = %l.name, "the client sent nothing; connection closed");
                            l.silent.inc();
                        }
                        // Idle: in-flight requests still finish; the connection then closes.
                        if !closing {
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                        silent.set(silent_for(&activity, idle, idle));
                    }
                }
            }
        }
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4): the first bytes of every HTTP/2
/// connection, h2c with prior knowledge and TLS with ALPN `h2` alike.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection the fast path handed over begins with.
enum Preface {
    /// The HTTP/2 preface (and maybe more): these bytes, read so far.
    Http2(Bytes),
    /// Anything else (HTTP/1 for hyper): these bytes, read so far.
    Other(Bytes),
    /// The client closed, failed or went quiet before it could be told.
    Closed,
}

/// Tells an HTTP/2 connection from the rest by its first bytes (`prefix`, what the fast path
/// read): it stops at the first byte that differs from the preface, and reads more only while
/// all it has is a (short) prefix of it, for up to `timeout` (the head's time on HTTP/1).
async fn read_preface<S>(io: &mut S, prefix: Bytes, timeout: Duration) -> Preface
where
    S: tokio::io::AsyncRead + Unpin,
{
    let short = |b: &[u8]| b.len() < PREFACE.len() && PREFACE.starts_with(b);
    if !short(&prefix) {
        return match prefix.starts_with(PREFACE) {
            true => Preface::Http2(prefix),
            false => Preface::Other(prefix),
        };
    }
    let mut buf = BytesMut::with_capacity(PREFACE.len().max(prefix.len()) + 512);
    buf.extend_from_slice(&prefix);
    let read_on = async {
        while short(&buf) {
            match tokio::io::AsyncReadExt::read_buf(io, &mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        true
    };
    match tokio::time::timeout(timeout, read_on).await {
        Ok(true) if buf.starts_with(PREFACE) => Preface::Http2(buf.freeze()),
        Ok(true) => Preface::Other(buf.freeze()),
        _ => Preface::Closed,
    }
}

/// An HTTP/2 connection served by our own server (`http2_server: outrigger`, [`super::h2`]),
/// under the same watches as hyper's connections above.
struct H2Connection<'a> {
    listener: &'a Arc<Listener>,
    /// The generation the connection was accepted under (if a reload made the listener tcp).
    first: &'a Arc<http::HttpListener>,
    down: Arc<http::Downstream>,
    settings: super::h2::Settings,
    /// A stop began while the fast path had the connection.
    draining: bool,
}

impl H2Connection<'_> {
    /// Serves the connection until it ends: each stream's request is handled by the listener's
    /// newest generation; a drain or an idle period sends GOAWAY at once (in-flight streams
    /// finish, as hyper's HTTP/2 does); a write stalled for a whole idle period (the client
    /// reads nothing, not even the connection's frames) ends it, streams in flight too.
    async fn serve(self, io: Metered<Stream>, prefix: Bytes) {
        let H2Connection {
            listener: l,
            first,
            down,
            settings,
            draining,
        } = self;
        tracing::debug!(listener = %l.name, "HTTP/2 connection served by outrigger's own server");
        let activity = down.activity.clone();
        let idle = down.idle_timeout;
        let mut drain = down.drain.clone();
        let shutdown = super::h2::Shutdown::new();
        let (listener, fallback) = (l.clone(), first.clone());
        let service = move |req: ::http::Request<super::h2::RecvBody>| {
            let state = match &listener.serving.load().kind {
                Kind::Http(state, _) => state.clone(),
                // Reloaded as a tcp listener: this connection still speaks HTTP.
                Kind::Tcp(_) => fallback.clone(),
            };
            // Boxed, as on hyper's path: the stream's task is spawned with this future in it
            // (a move of all of it), and the box is one allocation of a known size instead.
            let handled = boxed(|| state.handle(down.clone(), req));
            async move {
                match handled.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        };
        let conn = super::h2::serve(io, prefix, settings, shutdown.clone(), service);
        let drained = drain.signaled();
        let silent = silent_for(&activity, idle, idle);
        tokio::pin!(conn, drained, silent);
        let mut closing = draining;
        if closing {
            shutdown.graceful();
        }
        loop {
            // Biased, as above.
            tokio::select! {
                biased;
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(listener = %l.name, error = %e, "connection ended with an error");
                        if let Some(guard) = e.abuse_guard() {
                            l.abuse_closes
                                .get_or_create(&GuardLabels {
                                    direction: l.direction,
                                    listener: l.name.clone(),
                                    guard: guard.label(),
                                })
                                .inc();
                        }
                    }
                    break;
                }
                _ = &mut drained, if !closing => {
                    // GOAWAY at once: a client retries the streams it refuses.
                    shutdown.graceful();
                    closing = true;
                }
                silence = &mut silent => {
                    if silence == Silence::WriteStalled {
                        tracing::debug!(listener = %l.name, "the client read nothing for the idle timeout; connection closed");
                        l.stalled.inc();
                        break;
                    }
                    // Idle: in-flight streams still finish (a quiet stream waiting for its
                    // upstream too: nothing is being written); the connection then closes.
                    // Not closed on a second idle period: that would cut such a stream
                    // (proxy::an_http2_body_waiting_on_a_quiet_upstream_outlives_the_idle_timeout);
                    // a client that holds its streams open after GOAWAY is the server's to end.
                    if !closing {
                        shutdown.graceful();
                        closing = true;
                    }
                    silent.set(silent_for(&activity, idle, idle));
                }
            }
        }
    }
}

/// How long a draining HTTP/1 connection must be quiet before it is closed (see the drain arm
/// of the connection loop): long enough that a client between two requests is not cut, short
/// next to any grace period.
pub(crate) const DRAIN_QUIET: Duration = Duration::from_millis(250);

/// Why a connection's watcher fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Silence {
    /// No byte moved either way for a whole idle period.
    Idle,
    /// A write has waited a whole idle period: the peer reads nothing (bytes it sends do not
    /// count).
    WriteStalled,
}

/// Resolves once the connection has moved no bytes for a whole `limit`, or a write has waited
/// that long (so after between one and two `limit`s); the first period is `first` long. One
/// timer per connection.
pub async fn silent_for(activity: &Activity, first: Duration, limit: Duration) -> Silence {
    let mut period = first;
    loop {
        let (moved, written) = (activity.count(), activity.written());
        let waiting = activity.write_stalled();
        tokio::time::sleep(period).await;
        period = limit;
        // Checked first: a stalled write is also silence, but only it means the client reads
        // nothing.
        if waiting && activity.write_stalled() && activity.written() == written {
            return Silence::WriteStalled;
        }
        if activity.count() == moved {
            return Silence::Idle;
        }
    }
}

/// The future `make` makes, in a box allocated before it is made, which lets the optimiser
/// build the future in place rather than on the stack and then copy it: Rust does not
/// guarantee it (it is LLVM's call-slot optimisation after inlining, not done in a debug
/// build), but the release build does it. The request's future is several KiB, and
/// `Box::pin(f())` copied it whole; measured in the fat-LTO release build, `memcpy` from the
/// service went from 655 to 168 instructions per h2c request (callgrind, docs/BENCHMARKS.md
/// "h2c shared path, second round").
fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn told(prefix: &[u8], then: &[u8]) -> Preface {
        let mut rest = then;
        read_preface(
            &mut rest,
            Bytes::copy_from_slice(prefix),
            Duration::from_secs(5),
        )
        .await
    }

    #[tokio::test]
    async fn the_preface_tells_http2_from_the_rest_reading_more_only_when_too_short() {
        let mut frames = PREFACE.to_vec();
        frames.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        // Whole: nothing more is read.
        assert!(matches!(told(&frames, b"unread").await, Preface::Http2(b) if b == frames));
        assert!(
            matches!(told(b"GET / HTTP/1.1\r\n\r\n", b"").await, Preface::Other(b) if b == "GET / HTTP/1.1\r\n\r\n")
        );
        // What the fast path hands over when `PRI * HTTP/2.0` came alone: the rest is read.
        assert!(
            matches!(told(&PREFACE[..14], &frames[14..]).await, Preface::Http2(b) if b == frames)
        );
        assert!(
            matches!(told(&PREFACE[..14], b"\r\nx: y\r\n\r\n").await, Preface::Other(b) if b == "PRI * HTTP/2.0\r\nx: y\r\n\r\n")
        );
        assert!(matches!(
            told(&PREFACE[..14], b"\r\n").await,
            Preface::Closed
        ));
    }
}
