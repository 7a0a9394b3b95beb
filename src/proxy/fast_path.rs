//! The HTTP/1 fast path: plain keep-alive HTTP/1.1 requests, without a body or with one of
//! a stated `Content-Length`, are proxied here without hyper, from the bytes as they came.
//!
//! Why: hyper's two HTTP/1 codecs (decode the request into an `http::Request`, encode it again
//! for the upstream, and the same for the response), their header maps and the client's
//! dispatch were about 25,000 of the 41,000 user-space instructions a proxied request cost
//! (callgrind, `bench/proxy-instructions.sh`), and most of its heap allocations. Like
//! pingora's and HAProxy's own HTTP/1 code, this path parses the request head once with
//! `httparse`, writes the upstream's head by copying the original header lines with only our
//! edits (hop-by-hop headers gone; `x-forwarded-for`, `x-forwarded-proto`, `via`,
//! `x-request-id`, `traceparent` written in place), sends it on an upstream connection this
//! connection's task owns for the exchange (taken from and returned to the endpoint's pool,
//! [`super::cluster::pool::Pool::take_raw`]), parses the response head with `httparse` and
//! streams the body (Content-Length, chunked, or up to the close, which is sent on chunked)
//! back with one vectored write of head and first bytes. One read buffer per downstream
//! connection and one per upstream connection, reused: no heap allocation per request
//! without a record (an access log or an exported span costs a few: below).
//!
//! What it takes, checked before anything has an effect (no metric, no permit kept): HTTP/1.1,
//! origin-form target, exactly one Host, at most one Content-Length (all digits, at most 19),
//! no Transfer-Encoding, no Expect, no Upgrade, a listener without `authz`, rate limit or canonical
//! path rule, an open app gate, and a route without retries, header edits, rewrite or `authz` to
//! an HTTP/1.1 cluster. Anything else, and
//! every head `httparse` does not read as complete and well formed, goes to hyper's path on the
//! same connection ([`Outcome::Fallback`] hands over the bytes read so far): what is refused
//! is refused there, as before, so this path is never less strict than hyper's (it is
//! stricter: heads `httparse` ends before their `\r\n\r\n`, obs-text in Host and duplicate
//! Host go to hyper).
//!
//! A request body with one `Content-Length` of up to [`REPLAY_LIMIT`] (64 KiB) is read whole
//! first (`read_body`, into `out` after the head), before any permit is taken or upstream
//! connection made, under the route's timeout and `limits.min_body_rate` (408,
//! `request-timeout`, connection closed; a client that closes mid-body gets 400
//! `bad-request`), as hyper's path reads such bodies ahead; then it goes up with the head in
//! one write. So a slow client's small body never reaches the upstream, and the body is
//! resent on the same terms as a bodiless request (below) when its method is idempotent.
//!
//! A longer body streams, full duplex: the bytes read with the head go up with it, the rest as
//! the client sends them (read into the connection's buffer, never past the body's end: a
//! pipelined request after it waits for its turn), while the upstream's answer is read and
//! passed on (`pump` until its head, then `duplex` under every read and write of
//! `stream_body`: one task, one poll function over both connections, no split, no channel). An
//! upstream that answers while it still reads (an echo) thus gets all of it. An upstream
//! that answers an error (status 400 or more) or says `Connection: close` before it has the
//! whole body gets no more: the client hears the answer with `connection: close`, and what it
//! still sends is read and dropped for up to [`linger::LINGER`] after our side is shut, so that the
//! answer is not lost to a reset. Any other answer that ends before the body does (nginx's
//! `return` answers at once and reads the body after) gets the rest after it, for up to the
//! route's timeout, so that both connections go on; failing that, the client's connection
//! closes after the answer, the same way. An upstream
//! connection that did not get the whole body is never pooled, and a streamed body is never
//! sent again (hyper's path does not retry one either; a route with retries is hyper's
//! anyway). The client's waits count against `limits.min_body_rate` (the upstream's pace
//! does not); before the response head, a client that closes mid-body gets 400
//! `bad-request`, one too slow 408, the route's timeout while the body is still coming 408
//! (after it, 504), an upstream that closes or resets 502 `upstream-reset` (with
//! `connection: close` while the client still sends); after the head, a client that fails
//! its body cuts the response (logged `client-closed`). Chunked request bodies stay on
//! hyper's path (`check`). A `Content-Length` over the proxy's own limit
//! (`limits.max_request_body`) is answered here, as hyper's path would (413 `body-too-large`,
//! `connection: close`, the same metrics and record: [`Refusal`]), and then the body the
//! client still sends is read and dropped for up to [`linger::LINGER`] (its lingering close;
//! hyper's path lingers the same way).
//!
//! Two deliberate differences from hyper's path: a chunked response is passed on as it came,
//! chunk extensions and trailer fields included (hyper's encoder keeps only the trailers the
//! `Trailer` header declares); and a pooled upstream connection that closes or resets before
//! a single response byte, the keep-alive race with an upstream's idle timeout, gets an
//! idempotent request (its body whole in `out`, never a streamed one) once more on a new
//! connection (as nginx does by default; hyper's pool
//! resends only a request it had not written yet, and answers 502 here).
//!
//! An access log line and an exported span come from here too: the request's record
//! ([`super::record::Recording`]) is built from the head as it came (method, target, Host,
//! `x-request-id` or the one written for it, trace context, the peer's identity) and finished
//! with what the exchange gave (status, route, cluster, endpoint, body bytes, `x-outrigger-error`
//! reason, `upstream-reset` or `client-closed` for a body cut off), field for field what hyper's
//! path records (`fast_path_and_hyper_path_write_the_same_access_log_lines`). It costs a few
//! small allocations per request (one copy of the head, the URI, Host and request id slices
//! of it), as on hyper's path. While the upstream answers, the client's connection is read for an EOF (as
//! hyper's dispatcher does when no pipelined bytes wait): a client gone then drops the
//! exchange and is logged 499 `client-closed`.
//!
//! The phases of [`super::http`] apply in the same order with the same effects: listener
//! limits (in-flight cap), route, the route's metrics, the cluster's in-flight cap and retry
//! budget deposit, balancing, outlier reports, the route's timeout (504) and connect/reset
//! failures (502, `x-outrigger-error`), `connection: close` when draining. The connection's
//! idle, header-read and stalled-client watches stay in [`super::accept`].

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Method;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use super::body::{End, REPLAY_LIMIT};
use super::cluster::pool::{Pool, Raw};
use super::failure::Failure;
use super::generation::{Kind, Listener};
use super::http::{Downstream, HttpListener};
use super::linger;
use super::listener::{Metered, Stream};
use super::min_body_rate::Credit;
use super::record::Recording;
use super::route::{Target, route_key};
use super::upstream_head::{HeadRead, Parsed, Unanswered};
use crate::config::proxy::{Direction, MinBodyRate};
use crate::telemetry::record::Entry;
use crate::telemetry::trace::{TraceContext, is_context_name};

/// Request headers `httparse` reads per head (hyper's own limit: a head with more goes to
/// hyper, which refuses it).
const MAX_REQUEST_HEADERS: usize = 100;
/// A downstream connection's read buffer to begin with (hyper's too); grown up to the
/// listener's `max_header_bytes` for a larger head.
const FIRST_BUFFER: usize = 8 * 1024;

/// What the connection's watcher and the fast path tell each other.
#[derive(Default)]
pub(super) struct Flags {
    /// A request is being served (read whole, not yet answered in full).
    busy: AtomicBool,
    /// Close once the request being served is answered (idle or drain watch).
    closing: AtomicBool,
}

impl Flags {
    pub(super) fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }
    pub(super) fn close_when_done(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

/// How the fast path left a connection.
pub(super) enum Outcome {
    /// Closed (the client's, ours, an error or a watch).
    Closed,
    /// A request it does not take: hyper goes on with these bytes first.
    Fallback(Bytes),
}

/// What serving a connection on the fast path takes.
pub(super) struct Ctx<'a> {
    pub(super) listener: &'a Listener,
    /// The generation the connection was accepted under (if a reload made the listener tcp).
    pub(super) first: &'a Arc<HttpListener>,
    pub(super) down: &'a Arc<Downstream>,
    pub(super) flags: &'a Flags,
    pub(super) header_read_timeout: Duration,
    /// The listener's `max_header_bytes` (hyper's buffer limit: a larger head is hyper's 431).
    pub(super) max_head: usize,
}

/// Serves requests on the fast path until the connection closes or a request needs hyper.
pub(super) async fn serve<S>(cx: Ctx<'_>, io: &mut Metered<S>) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_head = cx.max_head.max(FIRST_BUFFER);
    let mut buf = vec![0u8; FIRST_BUFFER];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let fallback = |buf: &[u8]| Outcome::Fallback(Bytes::copy_from_slice(buf));
    loop {
        cx.flags.busy.store(false, Ordering::Relaxed);
        // Read until a whole head is buffered (`\r\n\r\n`; a head `httparse` would end
        // otherwise, with bare LFs, is hyper's).
        let mut deadline = None;
        let mut searched = start;
        let head_len = loop {
            if let Some(i) = memchr::memmem::find(&buf[searched..end], b"\r\n\r\n") {
                break searched + i + 4 - start;
            }
            if start < end {
                let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                if !matches!(req.parse(&buf[start..end]), Ok(httparse::Status::Partial))
                    || end - start >= max_head
                {
                    return fallback(&buf[start..end]);
                }
            }
            searched = end.saturating_sub(3).max(start);
            if start > 0 {
                buf.copy_within(start..end, 0);
                (searched, end, start) = (searched - start, end - start, 0);
            }
            if end == buf.len() {
                buf.resize((buf.len() * 2).min(max_head), 0);
            }
            let read = io.read(&mut buf[end..]);
            let n = match deadline {
                // hyper's header timer starts at a request's first byte: the rest of the
                // head must follow within `header_read_timeout`.
                Some(d) => match tokio::time::timeout_at(d, read).await {
                    Ok(r) => r,
                    Err(_) => return Outcome::Closed,
                },
                None => read.await,
            };
            match n {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(n) => end += n,
            }
            if deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + cx.header_read_timeout);
            }
        };
        let head = &buf[start..start + head_len];
        let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(n)) if n == head_len) {
            return fallback(&buf[start..end]);
        }
        let state = match &cx.listener.serving.load().kind {
            Kind::Http(state, _) => state.clone(),
            Kind::Tcp(_) => cx.first.clone(),
        };
        let Some(checked) = check(&state, &req) else {
            return fallback(&buf[start..end]);
        };
        cx.flags.busy.store(true, Ordering::Relaxed);
        let started = Instant::now();
        if checked.too_large {
            // The body bytes not read yet: dropped after the answer (`linger`).
            let body_start = start + head_len;
            let unread = checked.length - checked.length.min((end - body_start) as u64);
            let Some(refusal) = Refusal::new(&state, cx.down, head, &req, checked) else {
                return fallback(&buf[start..end]);
            };
            refusal.answer(io, &state, &mut out, started).await;
            cx.flags.busy.store(false, Ordering::Relaxed);
            if io.flush().await.is_ok() {
                let _ = io.shutdown().await;
                linger::drain(io, &mut buf, unread).await;
            }
            return Outcome::Closed;
        }
        out.clear();
        write_request_head(&mut out, &state, cx.down, &req, &checked);
        // The body bytes read with the head go up in the same write, copied after the head.
        // Pipelined bytes after the body stay where they are.
        let body_start = start + head_len;
        let buffered = (checked.length.min((end - body_start) as u64)) as usize;
        out.extend_from_slice(&buf[body_start..body_start + buffered]);
        let mut unread = checked.length - buffered as u64;
        // A body that fits REPLAY_LIMIT is read whole first, into `out` after the head (as
        // hyper's path reads it ahead, within the route's timeout and `min_body_rate`): a slow
        // small body holds no permit and never reaches the app, and the request can be resent
        // whole. Larger bodies stream (below).
        let mut failed = None;
        let head_out = out.len() - buffered;
        let read_first = unread > 0 && checked.length <= REPLAY_LIMIT as u64;
        if read_first {
            let (timeout, rate) = (checked.target.timeout, checked.rate);
            match read_body(io, &mut out, unread as usize, timeout, rate).await {
                Ok(()) => unread = 0,
                Err(f) => failed = Some(f),
            }
        }
        let Some(mut plan) = admit(&state, cx.down, head, &req, checked) else {
            // Overloaded, or no endpoint: hyper's path answers (with the body read first, if
            // it was, in front of what the buffer holds).
            return match (read_first, failed) {
                (false, _) => fallback(&buf[start..end]),
                (true, None) => {
                    let mut bytes = buf[start..body_start].to_vec();
                    bytes.extend_from_slice(&out[head_out..]);
                    Outcome::Fallback(bytes.into())
                }
                (true, Some(_)) => Outcome::Closed,
            };
        };
        plan.target.stats.requests.inc();
        if let Some(f) = failed {
            // Its body did not arrive: answered and closed, nothing went upstream (no
            // lingering: a client too slow to send its body would hold the slot on).
            answer(io, &state, &mut plan, f, &mut out, true, started).await;
            cx.flags.busy.store(false, Ordering::Relaxed);
            if io.flush().await.is_ok() {
                let _ = io.shutdown().await;
            }
            return Outcome::Closed;
        }
        plan.target.cluster.deposit();
        // The client's connection is watched while the upstream answers (hyper's dispatcher
        // reads for an EOF on a busy connection too): its next bytes go after this request.
        // When nothing waits in the buffer (no pipelined bytes), the whole of it is free for
        // them (everything before is in `out` or the record); it never grows here.
        let mut idle_at = body_start + buffered;
        if idle_at == end {
            (idle_at, end) = (0, 0);
        }
        let mut spare = Spare {
            buf: &mut buf,
            end: &mut end,
            idle_at,
            watch: true,
            unread,
        };
        let keep = forward(&cx, io, &state, &mut plan, &mut out, started, &mut spare).await;
        let (next, unread) = (spare.idle_at, spare.unread);
        drop(plan);
        start = next;
        if start == end {
            (start, end) = (0, 0);
        }
        // A watch that asked for a close while the response was on its way (idle, drain) is
        // obeyed now, as hyper's graceful shutdown closes after the response in flight.
        if !keep || unread > 0 || cx.flags.closing.load(Ordering::Relaxed) {
            // Not busy any more: the connection's idle watch closes it if the client never
            // takes the rest (a TLS shutdown must send what rustls still holds, then
            // close_notify); the flush first lets the watch see a stalled write.
            cx.flags.busy.store(false, Ordering::Relaxed);
            if io.flush().await.is_ok() {
                let _ = io.shutdown().await;
                if unread > 0 {
                    linger::drain(io, &mut buf, unread).await;
                }
            }
            return Outcome::Closed;
        }
    }
}

/// A request the fast path takes, and what its checks found.
struct Plan {
    target: Arc<Target>,
    attempt: super::cluster::Attempt,
    pool: Arc<Pool>,
    /// The listener's and the cluster's in-flight permits, held until the response's end.
    _permits: super::limits::Permits,
    /// The client asked to close after this response.
    close: bool,
    head: bool,
    idempotent: bool,
    /// The request's record, when an access log or span export wants it.
    record: Option<Recording>,
    /// The request body's length (its one `Content-Length`; 0 without one).
    length: u64,
    /// The body's minimum data rate (`limits.min_body_rate`; none for gRPC).
    rate: Option<MinBodyRate>,
}

/// Whether the fast path takes this request, and with what; None leaves it to hyper. Nothing
/// here has an effect ([`admit`] takes the permits, once a small body is read).
fn check(state: &HttpListener, req: &httparse::Request<'_, '_>) -> Option<Checked> {
    if req.version != Some(1) {
        return None;
    }
    let method = req.method?;
    let target = req.path?;
    // hyper answers a request-target of 65,535 bytes or more with 414: its path.
    if method == "CONNECT"
        || !target.starts_with('/')
        || target.len() >= usize::from(u16::MAX)
        || !target.bytes().all(plain_target_byte)
    {
        return None;
    }
    if state.authz.is_some() || state.strict_paths || state.rate.is_some() {
        return None;
    }
    if let Some((gate, _)) = &state.hold
        && !gate.is_open()
    {
        return None;
    }
    let mut host = None;
    let mut close = false;
    let mut named = false;
    let mut context = false;
    let mut length = None;
    let mut over = false;
    let mut grpc = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return None;
            }
            host = Some(std::str::from_utf8(h.value).ok()?);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            // Exactly one, all digits, within u64 (what `check_framing` and hyper's decoder
            // take); a second one, even equal, is hyper's to judge.
            if length.is_some() || !valid_length(h.value) {
                return None;
            }
            let l = parse_length(h.value);
            // Any length: up to REPLAY_LIMIT the body is read whole first (`read_body`),
            // beyond it streamed full duplex (`pump`, `duplex`). Over
            // `limits.max_request_body`: answered 413 here ([`Refusal`]).
            over = state.limits.max_request_body.is_some_and(|max| l > max);
            length = Some(l);
        } else if name.eq_ignore_ascii_case(b"content-type") {
            grpc = h.value.starts_with(b"application/grpc");
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"http2-settings")
        {
            return None;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade")
                    || t.eq_ignore_ascii_case(b"content-length")
                    || t.eq_ignore_ascii_case(b"host")
                    || t.eq_ignore_ascii_case(b"transfer-encoding")
                {
                    // Stripping the header that frames the body (or says where it goes)
                    // would let its bytes reach the upstream as a request of their own:
                    // hyper's path, which frames the body itself, takes it.
                    return None;
                } else if !hop_by_hop(t) {
                    named = true;
                }
            }
        } else if is_context_name(name) {
            context = true;
        }
    }
    // hyper's HeaderValue::to_str: visible ASCII only.
    let host = host.filter(|h| !h.is_empty() && h.bytes().all(|b| (0x20..0x7f).contains(&b)))?;
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let first = |k: &HeaderName| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(k.as_str()))
            .map(|h| h.value)
    };
    let target = state
        .router
        .route_by(&route_key(host), path, &method, &first)?;
    // A router with a route's `authz` makes the listener's `strict_paths`, sent to hyper above.
    debug_assert!(
        target.authz.is_none(),
        "a route with authz on the fast path"
    );
    // Too large: hyper's path refuses it once routed (`check_body_size`, in `forward`);
    // retries, header edits, a rewrite or an HTTP/2 cluster change nothing of the 413. gRPC
    // bodies have no such limit there: its path, as before.
    if over && grpc {
        return None;
    }
    let too_large = over;
    if !too_large
        && (target.retry.is_some()
            || !target.request_headers.is_empty()
            || !target.response_headers.is_empty()
            || target.rewrite.is_some()
            || target.authz.is_some()
            || target.cluster.config.http2)
    {
        return None;
    }
    let (trace, context) = if context {
        let mut map = HeaderMap::new();
        for h in req
            .headers
            .iter()
            .filter(|h| is_context_name(h.name.as_bytes()))
        {
            map.append(
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                HeaderValue::from_bytes(h.value).ok()?,
            );
        }
        let trace = TraceContext::from_headers(&map, state.sample);
        trace.inject(&mut map);
        (trace, Some(map))
    } else {
        (
            TraceContext::from_headers(&HeaderMap::new(), state.sample),
            None,
        )
    };
    Some(Checked {
        too_large,
        length: length.unwrap_or(0),
        // As `min_body_rate::applies`: gRPC bodies are exempt.
        rate: state.limits.min_body_rate.filter(|_| !grpc),
        idempotent: super::forward::is_idempotent(&method),
        head: method == Method::HEAD,
        method,
        target: target.clone(),
        trace,
        context,
        close,
        named,
    })
}

/// What [`check`] found of a request the fast path takes, before it is admitted.
struct Checked {
    target: Arc<Target>,
    method: Method,
    trace: TraceContext,
    /// The request's trace context headers when it had some, with ours injected.
    context: Option<HeaderMap>,
    /// The client asked to close after this response.
    close: bool,
    head: bool,
    idempotent: bool,
    /// Some `Connection` token names a header to strip.
    named: bool,
    /// The request body's length (its one `Content-Length`; 0 without one).
    length: u64,
    /// The length is over `limits.max_request_body`: answered 413 ([`Refusal`]).
    too_large: bool,
    /// The body's minimum data rate (`limits.min_body_rate`; none for gRPC).
    rate: Option<MinBodyRate>,
}

/// A checked request admitted: the listener's and the cluster's in-flight permits, an
/// endpoint and its pool, the record. None (overloaded, no endpoint) leaves it to hyper, as
/// [`check`]'s None.
fn admit(
    state: &HttpListener,
    down: &Downstream,
    head: &[u8],
    req: &httparse::Request<'_, '_>,
    c: Checked,
) -> Option<Plan> {
    let cluster = &c.target.cluster;
    let (listener_permit, (cluster_permit, attempt, pool), record) =
        admission(state, down, head, req, c.method, &c.trace, || {
            let cluster_permit = cluster.admit().ok()?;
            let attempt = cluster.pick()?;
            let pool = attempt.endpoint.pool()?.clone();
            Some((cluster_permit, attempt, pool))
        })?;
    Some(Plan {
        length: c.length,
        rate: c.rate,
        idempotent: c.idempotent,
        head: c.head,
        target: c.target,
        attempt,
        pool,
        _permits: super::limits::Permits {
            _listener: listener_permit,
            _cluster: cluster_permit,
        },
        close: c.close,
        record,
    })
}

/// What every request the fast path answers itself takes ([`admit`], [`Refusal::new`]): the
/// listener's in-flight permit, then what `then` takes (a forwarded request: the cluster's
/// permit and an endpoint), then its record. None leaves the request to hyper: the listener or
/// `then` is at its limit, or the head does not make a record.
fn admission<T>(
    state: &HttpListener,
    down: &Downstream,
    head: &[u8],
    req: &httparse::Request<'_, '_>,
    method: Method,
    trace: &TraceContext,
    then: impl FnOnce() -> Option<T>,
) -> Option<(Option<OwnedSemaphorePermit>, T, Option<Recording>)> {
    let listener_permit = match &state.in_flight {
        None => None,
        Some(s) => Some(s.clone().try_acquire_owned().ok()?),
    };
    let taken = then()?;
    // An access log wants every request, span export the sampled ones: the record holds what
    // hyper's path puts in its own (`HttpListener::handle`), from the head as it came. Built
    // last, so that a request that goes to hyper after all leaves no record here (hyper's
    // path draws its own sampling decision then; this one had no effect).
    let record = match &state.recorder {
        Some(r) if r.wants(trace) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())?;
            Some(Recording::new(
                r,
                entry(state, down, head, req, method, host, trace.clone())?,
            ))
        }
        _ => None,
    };
    Some((listener_permit, taken, record))
}

/// What is known of a request when it arrives, for its record (the fields hyper's path reads
/// from the decoded request). The target, Host and request id are slices of one copy of the
/// head (`head`, which `req` was parsed from): one allocation instead of three.
fn entry(
    state: &HttpListener,
    down: &Downstream,
    head: &[u8],
    req: &httparse::Request<'_, '_>,
    method: Method,
    host: &str,
    trace: TraceContext,
) -> Option<Entry> {
    let first = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
    };
    let shared = Bytes::copy_from_slice(head);
    // `part` lies in `head`: httparse's slices point into it.
    let slice = |part: &[u8]| {
        let at = part.as_ptr() as usize - head.as_ptr() as usize;
        shared.slice(at..at + part.len())
    };
    // The id this request goes on with: the client's first, or the one written for it.
    let request_id = match first("x-request-id") {
        Some(h) => HeaderValue::from_maybe_shared(slice(h.value)).ok()?,
        None => trace.trace_header(),
    };
    Some(Entry {
        started: Instant::now(),
        direction: state.direction,
        listener: state.name.clone(),
        method,
        uri: http::Uri::from_maybe_shared(slice(req.path?.as_bytes())).ok()?,
        host: Some(HeaderValue::from_maybe_shared(slice(host.as_bytes())).ok()?),
        // As hyper's path: the Content-Length as the client stated it (one, all digits here).
        bytes_in: first("content-length").map(|h| parse_length(h.value)),
        trace,
        request_id: Some(request_id),
        identity: down
            .identity
            .as_ref()
            .and_then(|i| i.identity().map(Arc::from)),
    })
}

/// Request-target bytes the fast path passes on as they are: those `http`'s URI parser takes
/// in a path and query, less `#` (hyper drops a fragment) — anything else is hyper's to judge.
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// A header list's comma-separated tokens, trimmed (empty ones skipped).
pub(super) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// The hop-by-hop headers of RFC 9110 §7.6.1 and a proxy's credentials (as
/// [`super::headers`] strips them).
pub(super) fn hop_by_hop(name: &[u8]) -> bool {
    const HOPS: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    HOPS.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Whether `name` is listed in one of the message's `Connection` headers (Outrigger's own
/// trace and request id headers excepted, as in [`super::headers`]).
fn named_in_connection(headers: &[httparse::Header<'_>], name: &[u8]) -> bool {
    const OURS: [&[u8]; 5] = [
        b"traceparent",
        b"tracestate",
        b"x-request-id",
        b"b3",
        b"x-outrigger-error",
    ];
    if OURS.iter().any(|o| name.eq_ignore_ascii_case(o)) {
        return false;
    }
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| tokens(h.value))
        .any(|t| t.eq_ignore_ascii_case(name))
}

/// Whether a `te` header asks for trailers (gRPC's `te: trailers` goes on end to end).
fn te_trailers(v: &[u8]) -> bool {
    tokens(v).any(|t| t.eq_ignore_ascii_case(b"trailers"))
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The upstream's request head: the client's lines with hop-by-hop headers gone and the
/// forwarding headers written as [`super::headers`] writes them.
fn write_request_head(
    out: &mut Vec<u8>,
    state: &HttpListener,
    down: &Downstream,
    req: &httparse::Request<'_, '_>,
    plan: &Checked,
) {
    let inbound = state.direction == Direction::Inbound;
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let (mut xff, mut via, mut request_id, mut proto, mut te) = (false, false, false, false, false);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if hop_by_hop(name) {
            if name.eq_ignore_ascii_case(b"te") && te_trailers(h.value) && !te {
                te = true;
                out.extend_from_slice(b"te: trailers\r\n");
            }
            continue;
        }
        if plan.named && named_in_connection(&req.headers[..], name) {
            continue;
        }
        if is_context_name(name) {
            continue; // written below, ours injected
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            let Some(ip) = &down.forwarded_for else {
                header_line(out, name, h.value);
                continue;
            };
            // The first one, joined with the peer (an empty or invalid one replaced); the
            // others go, as `HeaderMap::entry(…).insert` does.
            if !xff {
                xff = true;
                out.extend_from_slice(b"x-forwarded-for: ");
                if !h.value.is_empty() && visible(h.value) {
                    out.extend_from_slice(h.value);
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(ip.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
            // Inbound, the client's claim is not trusted; outbound, the app's is kept.
            proto = true;
            if !inbound {
                header_line(out, name, h.value);
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"via") {
            if !via {
                via = true;
                out.extend_from_slice(b"via: ");
                if visible(h.value) {
                    out.extend_from_slice(h.value);
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(b"1.1 outrigger\r\n");
            }
            continue;
        }
        if inbound && name.eq_ignore_ascii_case(b"x-forwarded-client-cert") {
            continue; // only Outrigger says who the peer is
        }
        if name.eq_ignore_ascii_case(b"x-request-id") {
            request_id = true;
        }
        header_line(out, name, h.value);
    }
    if !xff && let Some(ip) = &down.forwarded_for {
        header_line(out, b"x-forwarded-for", ip.as_bytes());
    }
    if inbound || !proto {
        let scheme: &[u8] = if inbound && down.secure {
            b"https"
        } else {
            b"http"
        };
        header_line(out, b"x-forwarded-proto", scheme);
    }
    if !via {
        out.extend_from_slice(b"via: 1.1 outrigger\r\n");
    }
    if inbound
        && let Some(id) = &down.identity
        && HeaderValue::from_str(&id.xfcc).is_ok()
    {
        header_line(out, b"x-forwarded-client-cert", id.xfcc.as_bytes());
    }
    match &plan.context {
        Some(map) => {
            for (k, v) in map {
                header_line(out, k.as_str().as_bytes(), v.as_bytes());
            }
        }
        None => header_line(out, b"traceparent", &plan.trace.traceparent()),
    }
    if !request_id {
        let mut id = [0u8; 32];
        crate::telemetry::trace::hex_into(&mut id, plan.trace.trace_id);
        header_line(out, b"x-request-id", &id);
    }
    out.extend_from_slice(b"\r\n");
}

/// `HeaderValue::to_str`'s test: visible ASCII and tabs.
fn visible(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// How a response body ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Up to the upstream's close; sent on chunked.
    Close,
}

/// A response head as the client will see it, written into `out`.
struct Head {
    status: u16,
    framing: Framing,
    /// The upstream connection can take another request after this body.
    reusable: bool,
    /// The head's length in the upstream buffer.
    len: usize,
}

/// Why an exchange got no response.
struct Failed {
    failure: Failure,
    message: String,
}

/// Where the client's next bytes go while its request is served: `buf[*end..]`. Nothing
/// past `idle_at` was read yet when the request began (no pipelined request): only then is
/// the client watched, as hyper's dispatcher reads a busy connection only with an empty
/// buffer. A request body still to come from the client is read into the whole of `buf`
/// (everything in it is sent by then).
struct Spare<'a> {
    buf: &'a mut Vec<u8>,
    end: &'a mut usize,
    /// Where the next request begins in `buf` (after this one's body).
    idle_at: usize,
    /// The client may be read for an EOF: off while it still owes body bytes.
    watch: bool,
    /// Body bytes the client still owes (not read yet).
    unread: u64,
}

impl Spare<'_> {
    /// Runs `work` (waiting on the upstream) while reading the client: `None` when the client
    /// closed (or its connection failed) first, `work` dropped then (its upstream connection
    /// closed with it, never pooled mid-exchange). Bytes the client sends meanwhile (its next
    /// request) are kept, and the watch ends with them.
    async fn unless_gone<S, T>(
        &mut self,
        io: &mut Metered<S>,
        work: impl Future<Output = T>,
    ) -> Option<T>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.watch || *self.end != self.idle_at || *self.end == self.buf.len() {
            return Some(work.await);
        }
        tokio::pin!(work);
        let n = tokio::select! {
            biased;
            done = &mut work => return Some(done),
            n = io.read(&mut self.buf[*self.end..]) => n,
        };
        match n {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                *self.end += n;
                Some(work.await)
            }
        }
    }
}

/// Sends the request, streams the response back. Returns whether the downstream connection
/// stays open. A body the client still owes is read into the connection's read buffer (taken
/// for the exchange: everything in it was sent by then) and sent on while the upstream
/// answers ([`relay`]).
async fn forward<S>(
    cx: &Ctx<'_>,
    io: &mut Metered<S>,
    state: &HttpListener,
    plan: &mut Plan,
    out: &mut Vec<u8>,
    started: Instant,
    spare: &mut Spare<'_>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = plan.target.clone();
    if spare.unread == 0 {
        // No body, or all of it came with the head: the client is watched meanwhile.
        target.stats.request_bytes.inc_by(plan.length);
        return relay(cx, io, state, plan, out, started, spare, None).await;
    }
    let with_head = plan.length - spare.unread;
    let mut up = Upload::new(std::mem::take(spare.buf), spare.unread, plan.rate);
    spare.watch = false;
    let keep = relay(cx, io, state, plan, out, started, spare, Some(&mut up)).await;
    *spare.buf = std::mem::take(&mut up.buf);
    spare.unread = up.left;
    // The buffer held only body bytes: it is empty now, and the client is watched again only
    // if it owes nothing more.
    (*spare.end, spare.idle_at, spare.watch) = (0, 0, up.left == 0);
    // What came with the head went with it; of the rest, what was written up.
    target.stats.request_bytes.inc_by(with_head + up.written);
    if up.unsent() {
        tracing::debug!(listener = %state.name, upstream = %plan.attempt.endpoint.address, unread = up.left, "the request body was not sent whole; the upstream connection is discarded");
    }
    keep
}

/// [`forward`]'s exchange, with `up`: the rest of the body, sent on until the response's end
/// (full duplex), unless the upstream stops taking it or answers early with an error.
#[allow(clippy::too_many_arguments)]
async fn relay<S>(
    cx: &Ctx<'_>,
    io: &mut Metered<S>,
    state: &HttpListener,
    plan: &mut Plan,
    out: &mut Vec<u8>,
    started: Instant,
    spare: &mut Spare<'_>,
    mut up: Option<&mut Upload>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = plan.target.clone();
    let cluster = &target.cluster;
    let closing =
        || plan.close || cx.down.drain.is_draining() || cx.flags.closing.load(Ordering::Relaxed);
    let close = closing();
    let exchanged = match up.as_deref_mut() {
        None => {
            let upstream = send(cx, state, plan, out, close, None::<(&mut Metered<S>, _)>);
            // The client gone before the answer: its record says 499 `client-closed` when
            // dropped.
            let Some(exchanged) = spare.unless_gone(io, upstream).await else {
                return false;
            };
            exchanged
        }
        // The rest of the body comes from the client while the upstream may answer.
        Some(u) => send(cx, state, plan, out, close, Some((&mut *io, u))).await,
    };
    let owed = |up: &Option<&mut Upload>| up.as_ref().is_some_and(|u| u.left > 0);
    let (mut conn, head, mut end) = match exchanged {
        Ok(Ok(r)) => r,
        // A client that still owes some of its body is told its connection closes (what it
        // sends on is read and dropped for a while, [`linger`](linger::drain)).
        Ok(Err(f)) => {
            let close = close || owed(&up);
            return answer(io, state, plan, f, out, close, started).await;
        }
        // The route's timeout while the client was still sending and the upstream took all
        // it was given: the body did not arrive in time (hyper's path: 408 when the body is
        // read ahead). Bytes read and not written up mean the upstream stopped reading: it
        // is the one that stalled (504 below, counted against the endpoint).
        Err(_) if owed(&up) && up.as_ref().is_some_and(|u| u.at == u.len) => {
            let f = Failed {
                failure: Failure::RequestTimeout,
                message: format!(
                    "the request body did not arrive within {:?}",
                    target.timeout
                ),
            };
            return answer(io, state, plan, f, out, close, started).await;
        }
        Err(_) => {
            let message = format!(
                "no response from {} within {:?}",
                plan.attempt.endpoint.address, target.timeout
            );
            let f = Failed {
                failure: Failure::Timeout,
                message,
            };
            // The upstream stopped reading mid-body: the client still owes the rest.
            let close = close || owed(&up);
            return answer(io, state, plan, f, out, close, started).await;
        }
    };
    // The upstream answered before it had the whole body. An error (a 413, a 401): the body
    // stops here, and the client, which still sends it, is told `connection: close` (what it
    // sends on is read and dropped for a while, [`linger`](linger::drain)). Any other answer
    // (an echo, even an HTTP/1.0 one or one with `connection: close`, which may read the body
    // as it answers) gets the rest as the response goes back. Reads of the response after the
    // body stopped end at the route's timeout: an upstream may still wait for the body.
    let early = up
        .as_ref()
        .is_some_and(|u| u.unsent() && head.status >= 400);
    if let Some(u) = up.as_deref_mut() {
        u.deadline = Some(tokio::time::Instant::from_std(started + target.timeout));
        if early {
            u.stopped = true;
        }
    }
    // A drain or idle watch may have begun while the upstream answered, or the upstream
    // answered early while the client still owes some of its body: the response says
    // `connection: close` then (as hyper's path decides after the upstream answered).
    let late = !close && (closing() || early && owed(&up));
    let close = close || late;
    if late {
        // `out` holds the client's head, ending in its blank line.
        out.truncate(out.len() - 2);
        out.extend_from_slice(b"connection: close\r\n\r\n");
    }
    // A body of known length of which nothing came with the head: its first bytes are
    // awaited before anything reaches the client, so that an upstream that breaks off here
    // gets the client a 502 instead of a head and a cut body.
    if let Framing::Length(n) = head.framing
        && n > 0
        && end == head.len
    {
        if end == conn.buf.len() {
            conn.buf.resize(end + FIRST_BUFFER, 0);
        }
        let left = target.timeout.saturating_sub(started.elapsed());
        let first = if up.is_some() {
            // The body goes on meanwhile (an echo answers its first bytes once it has them).
            let Raw {
                io: upstream, buf, ..
            } = &mut conn;
            let read = up_read(io, upstream, &mut up, &mut buf[end..]);
            match tokio::time::timeout(left, read).await {
                Ok(Err(f)) => return answer(io, state, plan, f, out, true, started).await,
                Ok(Ok(r)) => Ok(r),
                Err(e) => Err(e),
            }
        } else {
            let first = tokio::time::timeout(left, conn.io.read(&mut conn.buf[end..]));
            let Some(first) = spare.unless_gone(io, first).await else {
                return false;
            };
            first
        };
        let f = match first {
            Ok(Ok(n)) if n > 0 => {
                end += n;
                None
            }
            Ok(_) => Some(broke(
                &plan.attempt.endpoint.address,
                "the connection closed before the response body",
            )),
            Err(_) => Some(Failed {
                failure: Failure::Timeout,
                message: format!(
                    "no response body from {} within {:?}",
                    plan.attempt.endpoint.address, target.timeout
                ),
            }),
        };
        if let Some(f) = f {
            let close = close || owed(&up);
            return answer(io, state, plan, f, out, close, started).await;
        }
    }
    if head.status >= 500 {
        cluster.failed(&plan.attempt);
    } else {
        cluster.succeeded(&plan.attempt);
    }
    target.stats.response(head.status, "");
    if let Some(r) = &mut plan.record {
        let routed = super::forward::routed(&plan.target, &plan.attempt, 0);
        r.answered(head.status, None, routed);
    }
    target
        .stats
        .latency
        .observe(started.elapsed().as_secs_f64());
    let streamed = stream_body(io, &mut conn, &head, end, out, &mut plan.record, &mut up).await;
    target
        .stats
        .duration
        .observe(started.elapsed().as_secs_f64());
    let (bytes, how) = match &streamed {
        Ok((bytes, _)) => (*bytes, End::Done),
        Err(Broken { bytes, upstream }) => (
            *bytes,
            if *upstream {
                End::Failed
            } else {
                // A bodiless response's head not written: hyper's tap sees its body at the
                // end (no error), as here.
                End::Dropped {
                    at_end: head.framing == Framing::Empty,
                }
            },
        ),
    };
    if let Some(r) = plan.record.take() {
        r.end(bytes, how);
    }
    // A response that ended before the body did (an upstream that answers at once and reads
    // the body after, as nginx's `return` does): the rest goes up as the client sends it, for
    // up to the route's timeout, so that both connections can go on; what the upstream did
    // not take by then stays unsent.
    let mut failed = false;
    if let (Ok((_, true)), Some(u)) = (&streamed, up.as_deref_mut())
        && head.reusable
        && !u.stopped
    {
        let finish = std::future::poll_fn(|task| u.poll_send(task, io, &mut conn.io));
        let left = target.timeout.saturating_sub(started.elapsed());
        if let Ok(Err(f)) = tokio::time::timeout(left, finish).await {
            body_failed(&f);
            failed = true;
        }
        u.stopped = true;
    }
    let unsent = up.as_ref().is_some_and(|u| u.unsent());
    match streamed {
        Ok((bytes, upstream_clean)) => {
            target.stats.response_bytes.inc_by(bytes);
            // Never pooled with some of the request body not written: the upstream would
            // read the rest of it as the next request.
            if upstream_clean && head.reusable && !unsent {
                plan.pool.put_raw(conn);
            }
            !close && !failed && io.flush().await.is_ok()
        }
        Err(Broken { bytes, .. }) => {
            target.stats.response_bytes.inc_by(bytes);
            false
        }
    }
}

/// A request whose `Content-Length` is over `limits.max_request_body`, refused before anything
/// else is done for it: 413 `body-too-large` with `connection: close`, counted, logged and
/// recorded as hyper's path does (`check_body_size`: the listener's in-flight permit taken, the
/// route's request and response counted, `x-outrigger-error`, the record's route and cluster).
/// Answered here rather than on hyper's path (which answers it the same way, and lingers too)
/// so that a large body's connection costs no hand-over; the body the client still sends is
/// read and dropped after the answer ([`linger`](linger::drain)).
struct Refusal {
    target: Arc<Target>,
    length: u64,
    record: Option<Recording>,
    /// The listener's in-flight permit, held while the answer is written.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Refusal {
    /// None when hyper's path must answer after all: the listener is at its in-flight limit
    /// (its 503 comes first there) or the head does not make a record ([`admission`], as
    /// [`admit`]).
    fn new(
        state: &HttpListener,
        down: &Downstream,
        head: &[u8],
        req: &httparse::Request<'_, '_>,
        c: Checked,
    ) -> Option<Refusal> {
        let (permit, (), record) =
            admission(state, down, head, req, c.method, &c.trace, || Some(()))?;
        Some(Refusal {
            target: c.target,
            length: c.length,
            record,
            _permit: permit,
        })
    }

    async fn answer<S>(
        mut self,
        io: &mut Metered<S>,
        state: &HttpListener,
        out: &mut Vec<u8>,
        started: Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let limit = state.limits.max_request_body.unwrap_or_default();
        let failure = Failure::BodyTooLarge;
        self.target.stats.requests.inc();
        let res = state.fail(
            &self.target,
            failure,
            &format!(
                "the request body ({} bytes) is larger than {limit} bytes (limits.max_request_body)",
                self.length
            ),
            started,
        );
        let (status, ok, body_len) = write_answer(io, res, out, true).await;
        if let Some(mut r) = self.record.take() {
            let routed = crate::telemetry::record::Routed {
                route: Some(self.target.name.clone()),
                cluster: Some(self.target.cluster.name.clone()),
                upstream: None,
                retries: 0,
            };
            r.answered(status, Some(failure.reason()), routed);
            let how = if ok {
                End::Done
            } else {
                End::Dropped { at_end: false }
            };
            r.end(body_len, how);
        }
    }
}

/// Writes one of Outrigger's own answers (`res`, from [`HttpListener::fail`]) with its
/// `content-length` and `date`, and `connection: close` when `close`: its status, whether it
/// was written whole, and its body's length.
async fn write_answer<S>(
    io: &mut Metered<S>,
    res: http::Response<super::body::ProxyBody>,
    out: &mut Vec<u8>,
    close: bool,
) -> (u16, bool, u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in &parts.headers {
        header_line(out, k.as_str().as_bytes(), v.as_bytes());
    }
    let mut len = itoa_buf();
    header_line(out, b"content-length", fmt_u64(&mut len, body.len() as u64));
    date(out);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let ok = write_all(io, &mut [IoSlice::new(out), IoSlice::new(&body)])
        .await
        .is_ok();
    (parts.status.as_u16(), ok, body.len() as u64)
}

/// Outrigger's own answer to a failed exchange (the forward phase's, [`HttpListener::fail`]).
async fn answer<S>(
    io: &mut Metered<S>,
    state: &HttpListener,
    plan: &mut Plan,
    f: Failed,
    out: &mut Vec<u8>,
    close: bool,
    started: Instant,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The client's own fault (its body) is not the endpoint's, and the connection closes: its
    // framing can no longer be trusted (hyper's path answers `with_close`).
    let downstream = matches!(f.failure, Failure::BadRequest | Failure::RequestTimeout);
    let close = close || downstream;
    if !downstream {
        plan.target.cluster.failed(&plan.attempt);
    }
    let res = state.fail(&plan.target, f.failure, &f.message, started);
    let (status, ok, body_len) = write_answer(io, res, out, close).await;
    if let Some(mut r) = plan.record.take() {
        r.answered(
            status,
            Some(f.failure.reason()),
            super::forward::routed(&plan.target, &plan.attempt, 0),
        );
        let how = if ok {
            End::Done
        } else {
            End::Dropped { at_end: false }
        };
        r.end(body_len, how);
    }
    ok && !close && io.flush().await.is_ok()
}

/// The exchange within the route's timeout, and once more after a connect the app refused
/// because it just died (held for its restart, hold.rs), as on hyper's path. `out` still holds
/// the request then: nothing was written.
async fn send<S>(
    cx: &Ctx<'_>,
    state: &HttpListener,
    plan: &Plan,
    out: &mut Vec<u8>,
    close: bool,
    mut up: Option<(&mut Metered<S>, &mut Upload)>,
) -> Result<Result<(Raw, Head, usize), Failed>, tokio::time::error::Elapsed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = plan.target.timeout;
    let mut exchanged =
        tokio::time::timeout(timeout, exchange(plan, out, reborrow(&mut up), close)).await;
    if let Ok(Err(f)) = &exchanged
        && f.failure == Failure::Connect
        && state
            .held_after_refusal(cx.down, &plan.target.cluster, timeout)
            .await
    {
        exchanged = tokio::time::timeout(timeout, exchange(plan, out, up, close)).await;
    }
    exchanged
}

/// The client's connection and the upload, for one more attempt.
fn reborrow<'a, S>(
    up: &'a mut Option<(&mut Metered<S>, &mut Upload)>,
) -> Option<(&'a mut Metered<S>, &'a mut Upload)> {
    up.as_mut().map(|(c, u)| (&mut **c, &mut **u))
}

/// The rest of a request body, still to come from the client (what came with the head is
/// sent with it, from `out`), sent on while the upstream's answer is read: before its head
/// ([`pump`]) and while its body is passed on ([`duplex`]).
struct Upload {
    /// Where the client's body bytes are read: the connection's read buffer, taken for the
    /// exchange (everything in it was sent or kept before) and given back after it.
    buf: Vec<u8>,
    /// Bytes the client still owes.
    left: u64,
    /// Bytes read and not written yet: `buf[at..len]`.
    at: usize,
    len: usize,
    /// `limits.min_body_rate` over the waits for the client.
    credit: Option<Credit>,
    /// Since when the client is waited for.
    waiting: Option<tokio::time::Instant>,
    /// The end of that wait's credit (made at the first wait: only streamed bodies with a
    /// rate pay for it).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Nothing more goes up: all of it went, the upstream stopped taking it, or its answer
    /// asked for no more (an early error).
    stopped: bool,
    /// Bytes written to the upstream.
    written: u64,
    /// The end of the route's timeout, once the response head came: a read of the response
    /// after the body stopped short waits no longer ([`up_read`]).
    deadline: Option<tokio::time::Instant>,
}

impl Upload {
    fn new(buf: Vec<u8>, left: u64, rate: Option<MinBodyRate>) -> Upload {
        Upload {
            buf,
            left,
            at: 0,
            len: 0,
            credit: Credit::new(rate),
            waiting: None,
            timer: None,
            stopped: false,
            written: 0,
            deadline: None,
        }
    }

    /// Some of the body never reached the upstream (not read from the client, or not written).
    fn unsent(&self) -> bool {
        self.left > 0 || self.at < self.len
    }

    /// Moves body bytes from the client to the upstream as far as both let it. The
    /// upstream's pace sets the client's (a read waits until what was read before is
    /// written), and only time spent waiting on the client counts against
    /// `limits.min_body_rate` (as [`super::min_body_rate::Watched`] counts it). Ready(Ok)
    /// once nothing more goes (`stopped`): all of it written and flushed, or the upstream
    /// stopped taking it (`unsent()` says which; what it answered is read on). Ready(Err)
    /// when the client failed its body: 400 closed, 408 too slow.
    fn poll_send<S>(
        &mut self,
        task: &mut Context<'_>,
        client: &mut Metered<S>,
        upstream: &mut Stream,
    ) -> Poll<Result<(), Failed>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            if self.stopped {
                return Poll::Ready(Ok(()));
            }
            // Bytes read from the client go up before more are read.
            if self.at < self.len {
                match Pin::new(&mut *upstream).poll_write(task, &self.buf[self.at..self.len]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.at += n;
                        self.written += n as u64;
                        continue;
                    }
                    Poll::Ready(_) => {
                        self.stopped = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.left == 0 {
                return match Pin::new(&mut *upstream).poll_flush(task) {
                    Poll::Ready(_) => {
                        self.stopped = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            // What a TLS stream still holds goes out before the client is waited for.
            if let Poll::Ready(Err(_)) = Pin::new(&mut *upstream).poll_flush(task) {
                self.stopped = true;
                return Poll::Ready(Ok(()));
            }
            // Never past the body: pipelined bytes stay in the client's socket.
            let want = (self.left.min(self.buf.len() as u64)) as usize;
            let mut read = ReadBuf::new(&mut self.buf[..want]);
            match Pin::new(&mut *client).poll_read(task, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    let n = read.filled().len();
                    if let Some(c) = &mut self.credit {
                        c.arrived(self.waiting.take(), n);
                    }
                    self.left -= n as u64;
                    (self.at, self.len) = (0, n);
                }
                Poll::Ready(Ok(())) => {
                    self.stopped = true;
                    return Poll::Ready(Err(Failed {
                        failure: Failure::BadRequest,
                        message: format!(
                            "the client closed its connection {} bytes before the end of the request body",
                            self.left
                        ),
                    }));
                }
                Poll::Ready(Err(e)) => {
                    self.stopped = true;
                    return Poll::Ready(Err(Failed {
                        failure: Failure::BadRequest,
                        message: format!("reading the request body: {e}"),
                    }));
                }
                Poll::Pending => {
                    if let Some(c) = &self.credit {
                        let since = *self.waiting.get_or_insert_with(tokio::time::Instant::now);
                        let deadline = c.deadline(since);
                        let timer = self
                            .timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        if timer.deadline() != deadline {
                            timer.as_mut().reset(deadline);
                        }
                        if timer.as_mut().poll(task).is_ready() {
                            self.stopped = true;
                            return Poll::Ready(Err(Failed {
                                failure: Failure::RequestTimeout,
                                message: c.too_slow().to_string(),
                            }));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// How streaming the rest of a body ended (see [`pump`]).
enum Pumped {
    /// All of it was written.
    Sent,
    /// The upstream answered first (a final head, in `out`; the end of the bytes read). The
    /// body goes on with the response ([`forward`] decides).
    Answered(Head, usize),
    /// The upstream stopped taking it (closed, reset): whatever it said is read next.
    Refused,
}

/// Sends the head (and the body bytes that came with it, all in `out`) on a pooled connection
/// (or a new one), streams the rest of the body from the client if some is still to come, and
/// reads the response head, writing the client's version of it into `out`. Returns the
/// connection, the head and the end of the bytes read.
///
/// A pooled connection the upstream closed before taking the request is replaced once more,
/// as hyper's pool resends a request a closed connection did not take: when the write failed,
/// for a bodiless or idempotent request; when nothing came back, for an idempotent one. Never
/// once the client's body is streamed (`up`): bytes read from the client and written are gone,
/// the request cannot be sent again.
async fn exchange<S>(
    plan: &Plan,
    out: &mut Vec<u8>,
    mut up: Option<(&mut Metered<S>, &mut Upload)>,
    close: bool,
) -> Result<(Raw, Head, usize), Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let address = &plan.attempt.endpoint.address;
    loop {
        let (mut conn, pooled) = match plan.pool.take_raw() {
            Some(c) => (c, true),
            None => match plan.pool.connect_raw().await {
                Ok(c) => (c, false),
                Err(e) => {
                    return Err(Failed {
                        failure: Failure::Connect,
                        message: format!("cannot connect to {address}: {e}"),
                    });
                }
            },
        };
        let sent = async {
            conn.io.write_all(out).await?;
            conn.io.flush().await
        };
        if let Err(e) = sent.await {
            if pooled && up.is_none() && (plan.length == 0 || plan.idempotent) {
                continue;
            }
            return Err(broke(address, &e.to_string()));
        }
        let mut parse = |bytes: &[u8]| {
            Ok(match response_head(bytes, plan.head, close, out)? {
                // 1xx (not 101, refused there): skipped, as hyper's client does.
                Some(head) if (100..200).contains(&head.status) => Parsed::Informational(head.len),
                Some(head) => Parsed::Final(head),
                None => Parsed::Partial,
            })
        };
        // One head read for the pump and after it: what came while the body was streamed is
        // parsed before the next read.
        let mut reading = HeadRead::default();
        if let Some((client, up)) = up.as_mut() {
            match pump(client, up, &mut conn, &mut reading, &mut parse, plan).await? {
                Pumped::Answered(head, end) => return Ok((conn, head, end)),
                Pumped::Sent | Pumped::Refused => {}
            }
        }
        // A streamed body is never sent again.
        let resend = pooled && plan.idempotent && up.is_none();
        let read = if up.is_some() {
            std::future::poll_fn(|cx| reading.poll(cx, &mut conn, false, &mut parse)).await
        } else {
            super::upstream_head::read(&mut conn, resend, &mut parse).await
        };
        match read {
            Ok((head, end)) => return Ok((conn, head, end)),
            Err(Unanswered::Resend) => continue, // closed while idle: on a new connection
            Err(Unanswered::Broke(why)) => return Err(broke(address, &why)),
        }
    }
}

/// Streams the rest of the body from the client to the upstream ([`Upload::poll_send`]) while
/// reading the upstream's answer, which may come first: a final head ends the pump, and the
/// body goes on (or not) with the response ([`forward`]). Written as one poll function over
/// both connections, not two tasks: the upstream connection is this task's (no split, no
/// allocation), and both directions wake the same task. `reading`: the response head read
/// so far ([`HeadRead`], read on after the pump when it did not end in a head).
async fn pump<S>(
    client: &mut Metered<S>,
    up: &mut Upload,
    conn: &mut Raw,
    reading: &mut HeadRead,
    parse: &mut impl FnMut(&[u8]) -> Result<Parsed<Head>, &'static str>,
    plan: &Plan,
) -> Result<Pumped, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let address = &plan.attempt.endpoint.address;
    std::future::poll_fn(|task| {
        // The upstream's answer, if it has begun one (never resent: the body is streamed).
        match reading.poll(task, conn, false, parse) {
            Poll::Ready(Ok((head, end))) => return Poll::Ready(Ok(Pumped::Answered(head, end))),
            Poll::Ready(Err(Unanswered::Broke(why))) => {
                return Poll::Ready(Err(broke(address, &why)));
            }
            Poll::Ready(Err(Unanswered::Resend)) => {
                return Poll::Ready(Err(broke(address, "the connection closed")));
            }
            Poll::Pending => {}
        }
        match up.poll_send(task, client, &mut conn.io) {
            Poll::Ready(Ok(())) if up.unsent() => Poll::Ready(Ok(Pumped::Refused)),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Pumped::Sent)),
            Poll::Ready(Err(f)) => Poll::Ready(Err(f)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Polls `op` (on the client's connection and the upstream's) to its end while the rest of
/// the request body, if some is still to go, goes up meanwhile ([`Upload::poll_send`]): the
/// response and the request body in one task, full duplex, so that an upstream that answers
/// while it still reads (an echo) gets the rest. Err: the client failed its body (closed,
/// too slow) — the response cannot go on then.
async fn duplex<S, T>(
    client: &mut Metered<S>,
    upstream: &mut Stream,
    up: &mut Option<&mut Upload>,
    mut op: impl FnMut(&mut Context<'_>, &mut Metered<S>, &mut Stream) -> Poll<T>,
) -> Result<T, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(|task| {
        if let Some(u) = up.as_deref_mut()
            && let Poll::Ready(Err(f)) = u.poll_send(task, client, upstream)
        {
            return Poll::Ready(Err(f));
        }
        op(task, client, upstream).map(Ok)
    })
    .await
}

/// Reads the `left` bytes of a request body the client still owes onto the end of `out`, within
/// `timeout` (the route's) and `rate` (`limits.min_body_rate`), as hyper's path reads a small
/// body ahead ([`super::forward`]): 408 when it is late or too slow, 400 when the client closed.
async fn read_body<S>(
    io: &mut Metered<S>,
    out: &mut Vec<u8>,
    left: usize,
    timeout: Duration,
    rate: Option<MinBodyRate>,
) -> Result<(), Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut credit = Credit::new(rate);
    let mut at = out.len();
    out.resize(at + left, 0);
    let read = async {
        while at < out.len() {
            let since = tokio::time::Instant::now();
            let read = io.read(&mut out[at..]);
            let n = match &credit {
                Some(c) => match tokio::time::timeout_at(c.deadline(since), read).await {
                    Ok(n) => n,
                    Err(_) => {
                        return Err(Failed {
                            failure: Failure::RequestTimeout,
                            message: c.too_slow().to_string(),
                        });
                    }
                },
                None => read.await,
            };
            match n {
                Ok(0) => {
                    return Err(Failed {
                        failure: Failure::BadRequest,
                        message: format!(
                            "the client closed its connection {} bytes before the end of the request body",
                            out.len() - at
                        ),
                    });
                }
                Err(e) => {
                    return Err(Failed {
                        failure: Failure::BadRequest,
                        message: format!("reading the request body: {e}"),
                    });
                }
                Ok(n) => {
                    at += n;
                    if let Some(c) = &mut credit {
                        c.arrived(Some(since), n);
                    }
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(Failed {
            failure: Failure::RequestTimeout,
            message: format!("the request body did not arrive within {timeout:?}"),
        }),
    }
}

fn broke(address: &crate::config::Address, why: &str) -> Failed {
    Failed {
        failure: Failure::Upstream,
        message: format!("{address} broke the exchange: {why}"),
    }
}

/// Reads a response head; `Ok(None)` when it is not complete yet. Writes the client's head
/// into `out` (not for 1xx, which are skipped).
fn response_head(
    bytes: &[u8],
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Head>, &'static str> {
    super::upstream_head::parse(bytes, |res, len| {
        client_head(res, len, head_request, close, out)
    })?
    .transpose()
}

/// The client's head for a complete response head of `len` bytes.
fn client_head(
    res: &httparse::Response<'_, '_>,
    len: usize,
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Head, &'static str> {
    let status = res.code.ok_or("invalid response head")?;
    let ResponseFraming {
        framing,
        upstream_close,
        named,
    } = match response_framing(status, res.version, &*res.headers, head_request)? {
        Some(f) => f,
        None => {
            return Ok(Head {
                status,
                framing: Framing::Empty,
                reusable: false,
                len,
            });
        }
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = itoa_buf();
    out.extend_from_slice(fmt_u64(&mut code, u64::from(status)));
    out.push(b' ');
    match res.reason {
        Some(r) if !r.is_empty() => out.extend_from_slice(r.as_bytes()),
        _ => out.extend_from_slice(
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .as_bytes(),
        ),
    }
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    let mut te = false;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") && framing == Framing::Chunked {
            header_line(out, name, h.value); // the body goes on as it came
            continue;
        }
        if hop_by_hop(name) {
            if name.eq_ignore_ascii_case(b"te") && te_trailers(h.value) && !te {
                te = true;
                out.extend_from_slice(b"te: trailers\r\n");
            }
            continue;
        }
        // Only Outrigger says why it answered itself.
        if name.eq_ignore_ascii_case(b"x-outrigger-error")
            || named && named_in_connection(&res.headers[..], name)
        {
            continue;
        }
        has_date |= name.eq_ignore_ascii_case(b"date");
        header_line(out, name, h.value);
    }
    if framing == Framing::Close {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !has_date {
        date(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Head {
        status,
        framing,
        reusable: !upstream_close && framing != Framing::Close,
        len,
    })
}

/// What a response head says about its body and its connection.
pub(super) struct ResponseFraming {
    pub(super) framing: Framing,
    /// The upstream closes the connection after this response (`Connection: close`, HTTP/1.0).
    pub(super) upstream_close: bool,
    /// Some `Connection` token names a header to strip.
    pub(super) named: bool,
}

/// The response side's framing refusals (as strict as hyper's client, stricter on
/// Content-Length with Transfer-Encoding: refused, not resolved) and how the body ends.
/// `Ok(None)` for a 1xx other than 101 (skipped by the caller, as hyper's client does); a 101
/// is refused, since no request that reaches here asked for an upgrade.
pub(super) fn response_framing(
    status: u16,
    version: Option<u8>,
    headers: &[httparse::Header<'_>],
    head_request: bool,
) -> Result<Option<ResponseFraming>, &'static str> {
    // httparse takes any three digits; `http::StatusCode` (hyper's client) refuses 000–099.
    if status < 100 {
        return Err("invalid status code");
    }
    if status == 101 {
        return Err("101 Switching Protocols to a request that asked for no upgrade");
    }
    if (100..200).contains(&status) {
        return Ok(None);
    }
    let mut length: Option<&[u8]> = None;
    let mut chunked = None;
    let mut upstream_close = version != Some(1);
    let mut named = false;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some_and(|l| l != h.value) || !valid_length(h.value) {
                return Err("invalid or conflicting Content-Length");
            }
            length = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only the last coding matters: chunked or read to the close.
            chunked = Some(
                tokens(h.value)
                    .last()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")),
            );
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                } else if !hop_by_hop(t) {
                    named = true;
                }
            }
        }
    }
    let no_body = head_request || status == 204 || status == 304;
    let framing = match (chunked, length) {
        _ if no_body => Framing::Empty,
        (Some(_), Some(_)) => return Err("both Content-Length and Transfer-Encoding"),
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) | (None, None) => Framing::Close,
        (None, Some(l)) => Framing::Length(parse_length(l)),
    };
    Ok(Some(ResponseFraming {
        framing,
        upstream_close,
        named,
    }))
}

/// All digits, at most 19 (every such value fits a u64; hyper refuses one that does not).
fn valid_length(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit)
}

fn parse_length(v: &[u8]) -> u64 {
    v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0'))
}

/// The response body broke off (upstream or client): the client's connection closes.
struct Broken {
    bytes: u64,
    /// The upstream broke it off (or sent a bad chunk); otherwise the client went away.
    upstream: bool,
}

/// Writes the head in `out` and the body to the client. Returns the body's data bytes and
/// whether the upstream connection ended the body exactly (nothing more was read). The
/// record counts the bytes as they go (a connection dropped mid-body logs what was sent).
/// `up`: the rest of the request body, sent on meanwhile (a client that fails it cuts the
/// response: its connection closes).
async fn stream_body<S>(
    io: &mut Metered<S>,
    conn: &mut Raw,
    head: &Head,
    mut end: usize,
    out: &[u8],
    record: &mut Option<Recording>,
    up: &mut Option<&mut Upload>,
) -> Result<(u64, bool), Broken>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Raw {
        io: upstream, buf, ..
    } = conn;
    let mut start = head.len;
    let cut_client = |bytes| {
        Err(Broken {
            bytes,
            upstream: false,
        })
    };
    let cut_upstream = |bytes| {
        Err(Broken {
            bytes,
            upstream: true,
        })
    };
    match head.framing {
        Framing::Empty => {
            if down_all(io, upstream, up, &mut [IoSlice::new(out)])
                .await
                .is_err()
            {
                return cut_client(0);
            }
            Ok((0, start == end))
        }
        Framing::Length(total) => {
            let mut left = total;
            let n = (left.min((end - start) as u64)) as usize;
            if down_all(
                io,
                upstream,
                up,
                &mut [IoSlice::new(out), IoSlice::new(&buf[start..start + n])],
            )
            .await
            .is_err()
            {
                return cut_client(0);
            }
            left -= n as u64;
            start += n;
            sent(record, total - left);
            while left > 0 {
                let n = match up_read(io, upstream, up, buf).await {
                    Err(_) => return cut_client(total - left),
                    Ok(Ok(0) | Err(_)) => return cut_upstream(total - left),
                    Ok(Ok(n)) => n,
                };
                let take = (left.min(n as u64)) as usize;
                if down_all(io, upstream, up, &mut [IoSlice::new(&buf[..take])])
                    .await
                    .is_err()
                {
                    return cut_client(total - left);
                }
                left -= take as u64;
                sent(record, total - left);
                (start, end) = (take, n);
            }
            Ok((total, start == end))
        }
        Framing::Chunked => {
            let mut chunks = Chunked::default();
            let mut first = Some(out);
            loop {
                let done = match chunks.scan(&buf[start..end]) {
                    Ok(d) => d,
                    Err(()) => return cut_upstream(chunks.data),
                };
                let upto = done.map_or(end, |n| start + n);
                let body = IoSlice::new(&buf[start..upto]);
                let written = match first.take() {
                    Some(h) => down_all(io, upstream, up, &mut [IoSlice::new(h), body]).await,
                    None => down_all(io, upstream, up, &mut [body]).await,
                };
                if written.is_err() {
                    return cut_client(chunks.data);
                }
                sent(record, chunks.data);
                if done.is_some() {
                    return Ok((chunks.data, upto == end));
                }
                // What a TLS stream still holds goes out before we wait on the upstream
                // (server-sent events must not sit in rustls until the next chunk).
                if down_flush(io, upstream, up).await.is_err() {
                    return cut_client(chunks.data);
                }
                start = 0;
                match up_read(io, upstream, up, buf).await {
                    Err(_) => return cut_client(chunks.data),
                    Ok(Ok(0) | Err(_)) => return cut_upstream(chunks.data),
                    Ok(Ok(n)) => end = n,
                }
            }
        }
        Framing::Close => {
            let mut bytes = 0u64;
            let mut first = Some(out);
            loop {
                let data = &buf[start..end];
                let mut size = [0u8; 18];
                let size = chunk_size(&mut size, data.len());
                let mut slices = [
                    IoSlice::new(first.take().unwrap_or_default()),
                    IoSlice::new(if data.is_empty() { b"" } else { size }),
                    IoSlice::new(data),
                    IoSlice::new(if data.is_empty() { b"" } else { b"\r\n" }),
                ];
                if down_all(io, upstream, up, &mut slices).await.is_err() {
                    return cut_client(bytes);
                }
                bytes += data.len() as u64;
                sent(record, bytes);
                if down_flush(io, upstream, up).await.is_err() {
                    return cut_client(bytes);
                }
                start = 0;
                match up_read(io, upstream, up, buf).await {
                    Err(_) => return cut_client(bytes),
                    Ok(Ok(0)) => break,
                    Ok(Err(_)) => return cut_upstream(bytes),
                    Ok(Ok(n)) => end = n,
                }
            }
            if down_all(io, upstream, up, &mut [IoSlice::new(b"0\r\n\r\n")])
                .await
                .is_err()
            {
                return cut_client(bytes);
            }
            Ok((bytes, false))
        }
    }
}

/// Writes `bufs` whole to the client ([`write_all`]) while the rest of the request body, if
/// some, goes up ([`duplex`]). Err: the client's connection failed, or its body did.
async fn down_all<S>(
    io: &mut Metered<S>,
    upstream: &mut Stream,
    up: &mut Option<&mut Upload>,
    mut bufs: &mut [IoSlice<'_>],
) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if up.as_ref().is_none_or(|u| u.stopped) {
        return write_all(io, bufs).await.map_err(drop);
    }
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let written = duplex(io, upstream, up, |task, client, _| {
            Pin::new(client).poll_write_vectored(task, &*bufs)
        })
        .await;
        match written {
            Ok(Ok(n)) if n > 0 => IoSlice::advance_slices(&mut bufs, n),
            Ok(_) => return Err(()),
            Err(f) => {
                body_failed(&f);
                return Err(());
            }
        }
    }
    Ok(())
}

/// Flushes the client's connection while the request body goes up ([`duplex`]).
async fn down_flush<S>(
    io: &mut Metered<S>,
    upstream: &mut Stream,
    up: &mut Option<&mut Upload>,
) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if up.as_ref().is_none_or(|u| u.stopped) {
        return io.flush().await.map_err(drop);
    }
    match duplex(io, upstream, up, |task, client, _| {
        Pin::new(client).poll_flush(task)
    })
    .await
    {
        Ok(r) => r.map_err(drop),
        Err(f) => {
            body_failed(&f);
            Err(())
        }
    }
}

/// Reads the upstream's response into `buf` while the request body goes up ([`duplex`]).
/// The outer Err: the client failed its body.
async fn up_read<S>(
    io: &mut Metered<S>,
    upstream: &mut Stream,
    up: &mut Option<&mut Upload>,
    buf: &mut [u8],
) -> Result<io::Result<usize>, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(u) = up.as_ref()
        && u.stopped
        && u.unsent()
        && let Some(deadline) = u.deadline
    {
        // The body stopped short: an upstream that waits for it would never answer on.
        return Ok(tokio::time::timeout_at(deadline, upstream.read(buf))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())));
    }
    if up.as_ref().is_none_or(|u| u.stopped) {
        return Ok(upstream.read(buf).await);
    }
    duplex(io, upstream, up, |task, _, upstream| {
        let mut read = ReadBuf::new(&mut *buf);
        Pin::new(upstream)
            .poll_read(task, &mut read)
            .map_ok(|()| read.filled().len())
    })
    .await
}

/// A request body the client failed while its response was on its way: the response is cut
/// (the client's connection closes).
fn body_failed(f: &Failed) {
    tracing::debug!(
        reason = f.failure.reason(),
        "{}; the response is cut off",
        f.message
    );
}

/// The response body's data bytes written so far, for a record dropped before the end.
fn sent(record: &mut Option<Recording>, bytes: u64) {
    if let Some(r) = record {
        r.sent(bytes);
    }
}

/// `{len:x}\r\n` on the stack.
fn chunk_size(buf: &mut [u8; 18], len: usize) -> &[u8] {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    crate::telemetry::trace::hex_into(&mut buf[..digits], len as u128);
    buf[digits..digits + 2].copy_from_slice(b"\r\n");
    &buf[..digits + 2]
}

/// Follows a chunked body passed on as it is, to find its end (RFC 9112 §7.1; as strict as
/// hyper's decoder: hex sizes of at most 16 digits, CRLF line ends, extensions skipped,
/// trailers passed on). Written by hand: hyper's decoder is not public, and this one only
/// follows, it copies nothing. [`Chunked::decode`] also hands out each chunk's data and keeps
/// the trailer lines, for a body that becomes frames
/// ([`super::cluster::raw_exchange`]).
#[derive(Default)]
pub(super) struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Data bytes so far.
    pub(super) data: u64,
    /// The trailer section's lines, when decoding (each ending in CRLF).
    pub(super) trailers: Vec<u8>,
}

/// The trailer section a decoded chunked body may carry (hyper's default header buffer).
const MAX_TRAILERS: usize = 64 * 1024;

/// What [`Chunked::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Everything given was framing (or trailers): more input is needed.
    More,
    /// Chunk data at `start..end` of the input; what follows `end` is not read yet.
    Data(usize, usize),
    /// The body ended after the first n bytes of the input.
    Done(usize),
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Spaces after the size (hyper accepts them).
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty one).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl Chunked {
    /// Follows `data`; Ok(Some(n)) when the body ends after its first n bytes.
    fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, ()> {
        match self.run(data, false)? {
            Step::Done(n) => Ok(Some(n)),
            _ => Ok(None),
        }
    }

    /// Decodes `data` up to the next chunk data (or the body's end), keeping trailer lines.
    pub(super) fn decode(&mut self, data: &[u8]) -> Result<Step, ()> {
        self.run(data, true)
    }

    fn run(&mut self, data: &[u8], decode: bool) -> Result<Step, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            let before = self.state;
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > 16 {
                            return Err(());
                        }
                        let v = (b as char).to_digit(16).ok_or(())?;
                        self.size = self.size << 4 | u64::from(v);
                    }
                    _ if self.digits == 0 => return Err(()),
                    b' ' | b'\t' => self.state = SizeSpace,
                    b';' => self.state = Extension,
                    b'\r' => self.state = SizeLf,
                    _ => return Err(()),
                },
                SizeSpace => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Extension,
                    b'\r' => self.state = SizeLf,
                    _ => return Err(()),
                },
                Extension => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' | 0 => return Err(()),
                    _ => {}
                },
                SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                Data => {
                    let n = (self.size.min((data.len() - i) as u64)) as usize;
                    self.size -= n as u64;
                    self.data += n as u64;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    if decode {
                        return Ok(Step::Data(i, i + n));
                    }
                    i += n;
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(());
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = Size;
                }
                TrailerStart => match b {
                    b'\r' => self.state = EndLf,
                    b'\n' | 0 => return Err(()),
                    _ => self.state = Trailer,
                },
                Trailer => match b {
                    b'\r' => self.state = TrailerLf,
                    b'\n' | 0 => return Err(()),
                    _ => {}
                },
                TrailerLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = TrailerStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    return Ok(Step::Done(i + 1));
                }
            }
            // A trailer line's byte (not the empty line that ends the section).
            if decode && matches!(self.state, Trailer | TrailerLf)
                || decode && self.state == TrailerStart && before == TrailerLf
            {
                if self.trailers.len() >= MAX_TRAILERS {
                    return Err(());
                }
                self.trailers.push(b);
            }
            i += 1;
        }
        Ok(Step::More)
    }
}

/// Writes every slice whole (vectored: head and body in one `writev` when they fit).
pub(super) async fn write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

pub(super) fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

pub(super) fn fmt_u64(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

thread_local! {
    /// The `date` value of the current second (hyper caches it the same way).
    static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
}

/// A `date` header line, as hyper's server adds to a response without one.
fn date(out: &mut Vec<u8>) {
    header_line(out, b"date", &http_date());
}

/// The current second as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`), formatted once a
/// second per thread: the `date` hyper's servers add, for ours (this fast path and
/// `proxy::h2`).
pub(crate) fn http_date() -> [u8; 29] {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (cached, mut text) = DATE.get();
    if cached != secs {
        use std::io::Write;
        let mut w = &mut text[..];
        let _ = write!(w, "{}", httpdate::HttpDate::from(now));
        DATE.set((secs, text));
    }
    text
}

/// Bytes read ahead, then the stream: how hyper gets a connection the fast path began.
pub(super) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(super) fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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
        bufs: &[IoSlice<'_>],
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
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(parts: &[&[u8]]) -> Result<Option<usize>, ()> {
        let mut c = Chunked::default();
        let mut r = Ok(None);
        for p in parts {
            r = c.scan(p);
            if !matches!(r, Ok(None)) {
                return r;
            }
        }
        r
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\nGET";
        assert_eq!(follow(&[body]), Ok(Some(body.len() - 3)));
        // Split anywhere.
        for i in 1..body.len() - 3 {
            let (a, b) = body.split_at(i);
            let mut c = Chunked::default();
            assert_eq!(c.scan(a), Ok(None), "split at {i}");
            assert_eq!(c.scan(b), Ok(Some(b.len() - 3)), "split at {i}");
            assert_eq!(c.data, 11);
        }
        assert_eq!(follow(&[b"0\r\nx-sum: 1\r\n\r\n"]), Ok(Some(15)));
    }

    #[test]
    fn bad_chunks_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5\r\nhelloX",
            b"11111111111111111\r\n",
            b"0\r\n\n",
            b"5;a\nb\r\n",
        ] {
            assert_eq!(
                follow(&[bad]),
                Err(()),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn response_heads_are_rewritten() {
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nx-outrigger-error: forged\r\nDate: Sun, 06 Dec 2026 11:51:36 GMT\r\nx-kept: 1\r\n\r\nhello";
        let h = response_head(raw, false, false, &mut out).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.reusable);
        assert_eq!(h.len, raw.len() - 5);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: Sun, 06 Dec 2026 11:51:36 GMT\r\nx-kept: 1\r\n\r\n"
        );
        let raw = b"HTTP/1.0 200 OK\r\n\r\nabc";
        let h = response_head(raw, false, true, &mut out).unwrap().unwrap();
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.reusable);
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(
            text.contains("date: ") && text.ends_with("connection: close\r\n\r\n"),
            "{text}"
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(response_head(bad, false, false, &mut out).is_err());
        }
        // More headers than hyper's client took (100).
        let mut many = b"HTTP/1.1 204 No Content\r\n".to_vec();
        for i in 0..300 {
            many.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let h = response_head(&many, false, false, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.framing), (204, Framing::Empty));
    }

    #[test]
    fn chunk_sizes_are_hex() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size(&mut b, 0), b"0\r\n");
        assert_eq!(chunk_size(&mut b, 255), b"ff\r\n");
        assert_eq!(chunk_size(&mut b, 4096), b"1000\r\n");
        let mut n = itoa_buf();
        assert_eq!(fmt_u64(&mut n, 0), b"0");
        assert_eq!(
            fmt_u64(&mut n, 18446744073709551615),
            b"18446744073709551615"
        );
    }
}
