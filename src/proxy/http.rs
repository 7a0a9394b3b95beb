//! The HTTP proxy, one request at a time, in named phases (after pingora's `ProxyHttp`):
//!
//! 1. [`admit`](HttpListener::admit): local rate limit and in-flight cap (503 + `retry-after`);
//! 2. [`check_framing`]: refuse ambiguous HTTP/1 framing (400) before anything is forwarded;
//! 3. route: the listener's [`Router`] picks a [`Target`] (404 when none);
//! 4. [`prepare`]: hop-by-hop headers out, `x-forwarded-*`, `via`, `x-request-id`, route edits;
//! 5. [`forward`](HttpListener::forward): pick an endpoint, send with a timeout, retry within
//!    the policy and the cluster's budget;
//! 6. respond: response edits, metrics, upgrade hand-off (WebSocket), error responses with an
//!    `x-outrigger-error` reason (502 connect, 504 timeout, 503 overload).
//!
//! Every error is logged with listener, route and cluster.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::{self, Guarded, ProxyBody, REPLAY_LIMIT, RequestBody};
use super::listener::Peer;
use super::route::{RouteStats, Router, Target};
use crate::config::proxy::{Limits, RateLimit};
use crate::telemetry::metrics::{Name, ProxyMetrics, ShedLabels};

static X_OUTRIGGER_ERROR: HeaderName = HeaderName::from_static("x-outrigger-error");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop and never travel further (RFC 9110 §7.6.1).
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
        &header::TRAILER,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
    ]
}

/// Why Outrigger answered a request itself; the `x-outrigger-error` header and metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Malformed or ambiguous request (400, downstream's fault).
    BadRequest,
    /// No route matched (404).
    NoRoute,
    /// A local limit shed the request (503).
    Overload,
    /// The cluster has no endpoint (503).
    NoEndpoints,
    /// Could not connect to the upstream (502).
    Connect,
    /// The upstream broke the exchange (502).
    Upstream,
    /// No response headers within the route's timeout (504).
    Timeout,
}

impl Failure {
    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::Overload | Failure::NoEndpoints => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Connect | Failure::Upstream => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad-request",
            Failure::NoRoute => "no-route",
            Failure::Overload => "overload",
            Failure::NoEndpoints => "no-endpoints",
            Failure::Connect => "connect",
            Failure::Upstream => "upstream-reset",
            Failure::Timeout => "timeout",
        }
    }
}

/// A response Outrigger writes itself: short text body and the reason header.
pub fn error_response(failure: Failure, message: &str) -> Response<ProxyBody> {
    let mut res = Response::new(body::full(format!("outrigger: {message}\n")));
    *res.status_mut() = failure.status();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        X_OUTRIGGER_ERROR.clone(),
        HeaderValue::from_static(failure.reason()),
    );
    if failure == Failure::Overload {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            rate: limit.requests_per_second,
            burst: f64::from(limit.burst.max(1)),
            tokens: f64::from(limit.burst.max(1)),
            last: Instant::now(),
        }
    }

    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One HTTP listener's request handling state.
pub struct HttpListener {
    pub name: Name,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    pub router: Router,
    in_flight: Option<Arc<Semaphore>>,
    rate: Option<Mutex<TokenBucket>>,
    shed_rate: Counter,
    shed_concurrency: Counter,
    shed_breaker: Counter,
    unrouted: RouteStats,
}

/// Permits a request holds until its response body is done.
struct Permits {
    _listener: Option<OwnedSemaphorePermit>,
    _cluster: Option<OwnedSemaphorePermit>,
}

impl HttpListener {
    pub fn new(
        name: Name,
        direction: &'static str,
        router: Router,
        limits: &Limits,
        metrics: &ProxyMetrics,
    ) -> Self {
        let shed = |reason| {
            metrics
                .shed
                .get_or_create(&ShedLabels {
                    listener: name.clone(),
                    reason,
                })
                .clone()
        };
        let none = Arc::new("none".to_string());
        HttpListener {
            in_flight: limits
                .max_requests_in_flight
                .map(|n| Arc::new(Semaphore::new(n))),
            rate: limits.rate_limit.map(|r| Mutex::new(TokenBucket::new(r))),
            shed_rate: shed("rate_limit"),
            shed_concurrency: shed("concurrency"),
            shed_breaker: shed("breaker"),
            unrouted: RouteStats::new(metrics, direction, &name, none.clone(), &none),
            name,
            direction,
            router,
        }
    }

    /// Serves one request; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        peer: Peer,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let permit = match self.admit() {
            Ok(p) => p,
            Err(why) => {
                self.unrouted.response(503, Failure::Overload.reason());
                return Ok(error_response(Failure::Overload, why));
            }
        };
        if let Err(why) = check_framing(&req) {
            tracing::warn!(listener = %self.name, peer = ?peer, error = why, "refused ambiguous request framing");
            self.unrouted.response(400, Failure::BadRequest.reason());
            return Ok(with_close(error_response(Failure::BadRequest, why)));
        }
        let Some(host) = authority(&req) else {
            self.unrouted.response(400, Failure::BadRequest.reason());
            return Ok(error_response(
                Failure::BadRequest,
                "the request has no Host",
            ));
        };
        let host_name = host_without_port(&host);
        let Some(target) = self
            .router
            .route(&host_name, req.uri().path(), req.method(), req.headers())
            .cloned()
        else {
            tracing::debug!(listener = %self.name, host = %host_name, path = req.uri().path(), "no route");
            self.unrouted.response(404, Failure::NoRoute.reason());
            return Ok(error_response(
                Failure::NoRoute,
                &format!("no route for host {host_name:?}"),
            ));
        };
        target.stats.requests.inc();
        let cluster_permit = match target.cluster.admit() {
            Ok(p) => p,
            Err(_) => {
                self.shed_breaker.inc();
                return Ok(self.fail(
                    &target,
                    Failure::Overload,
                    "the cluster has too many requests in flight",
                    started,
                ));
            }
        };
        let mut res = match self.forward(&target, &peer, host, req, started).await {
            Ok(res) => res,
            Err(res) => return Ok(res),
        };
        let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(res.headers_mut(), switching);
        target.response_headers.apply(res.headers_mut());
        let status = res.status().as_u16();
        target.stats.response(status, "");
        target
            .stats
            .latency
            .observe(started.elapsed().as_secs_f64());
        let permits = Permits {
            _listener: permit,
            _cluster: cluster_permit,
        };
        Ok(res.map(|b| Guarded::wrap(b, permits)))
    }

    /// Phase 1: local limits. The error says which one shed the request.
    fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, &'static str> {
        if let Some(rate) = &self.rate
            && !rate.lock().expect("not poisoned").try_take()
        {
            self.shed_rate.inc();
            return Err("rate limit exceeded");
        }
        match &self.in_flight {
            None => Ok(None),
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Ok(Some(p)),
                Err(_) => {
                    self.shed_concurrency.inc();
                    Err("too many requests in flight")
                }
            },
        }
    }

    fn fail(
        &self,
        target: &Target,
        failure: Failure,
        message: &str,
        started: Instant,
    ) -> Response<ProxyBody> {
        tracing::warn!(
            listener = %self.name,
            route = %target.name,
            cluster = %target.cluster.name,
            error = failure.reason(),
            message,
            "request failed"
        );
        target
            .stats
            .response(failure.status().as_u16(), failure.reason());
        target
            .stats
            .latency
            .observe(started.elapsed().as_secs_f64());
        error_response(failure, message)
    }

    /// Phases 4 and 5: prepare the request and send it, retrying within the policy.
    async fn forward(
        &self,
        target: &Target,
        peer: &Peer,
        authority: String,
        mut req: Request<Incoming>,
        started: Instant,
    ) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
        let cluster = &target.cluster;
        cluster.deposit();
        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        let h1_chunked = parts.version <= Version::HTTP_11
            && parts.headers.contains_key(header::TRANSFER_ENCODING);
        prepare(
            &mut parts.headers,
            peer,
            self.direction == "inbound",
            upgrade.is_some(),
            parts.version,
        );
        target.request_headers.apply(&mut parts.headers);
        let path = rewrite(&parts.uri, target.rewrite.as_ref());
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(_) => {
                return Err(self.fail(
                    target,
                    Failure::BadRequest,
                    "the request target is invalid",
                    started,
                ));
            }
        };
        parts.version = if cluster.config.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        if parts.version == Version::HTTP_11 && !parts.headers.contains_key(header::HOST) {
            // HTTP/2 clients send :authority, HTTP/1.1 upstreams need Host.
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, v);
            }
        } else if parts.version == Version::HTTP_2 {
            // :authority carries it; a Host header as well is allowed but redundant.
            parts.headers.remove(header::HOST);
        }

        let known_small = incoming
            .size_hint()
            .upper()
            .is_some_and(|n| n as usize <= REPLAY_LIMIT);
        let mut body = if incoming.is_end_stream() {
            RequestBody::Complete {
                data: Bytes::new(),
                trailers: None,
            }
        } else if known_small || h1_chunked {
            match body::prebuffer(incoming, REPLAY_LIMIT).await {
                Ok(b) => b,
                Err(e) => {
                    let msg = format!("invalid request body: {e}");
                    return Err(with_close(self.fail(
                        target,
                        Failure::BadRequest,
                        &msg,
                        started,
                    )));
                }
            }
        } else {
            RequestBody::Streaming(body::incoming(incoming))
        };

        let policy = target.retry.as_ref();
        let idempotent = is_idempotent(&parts.method);
        let mut tries = 0u32;
        loop {
            let Some(attempt) = cluster.pick() else {
                return Err(self.fail(
                    target,
                    Failure::NoEndpoints,
                    "the cluster has no endpoints",
                    started,
                ));
            };
            let Some(b) = body.take() else {
                return Err(self.fail(
                    target,
                    Failure::Upstream,
                    "cannot replay a streamed request body",
                    started,
                ));
            };
            let mut attempt_req = Request::new(b);
            *attempt_req.method_mut() = parts.method.clone();
            *attempt_req.uri_mut() = parts.uri.clone();
            *attempt_req.version_mut() = parts.version;
            *attempt_req.headers_mut() = parts.headers.clone();
            let outcome =
                tokio::time::timeout(target.timeout, attempt.endpoint.client.request(attempt_req))
                    .await;
            let replayable = body.replayable();
            let can_retry = |on: bool, safe: bool| {
                on && safe
                    && replayable
                    && tries < policy.map_or(0, |p| p.attempts)
                    && cluster.withdraw_retry()
            };
            let (failure, message) = match outcome {
                Ok(Ok(res)) => {
                    let status = res.status().as_u16();
                    if status >= 500 {
                        cluster.failed(&attempt);
                    } else {
                        cluster.succeeded(&attempt);
                    }
                    if let Some(p) = policy
                        && p.on.status(status)
                        && can_retry(true, idempotent)
                    {
                        tracing::debug!(cluster = %cluster.name, endpoint = %attempt.endpoint.address, status, "retrying on status");
                        drop(res);
                        tries += 1;
                        backoff(p.backoff.get(), tries).await;
                        continue;
                    }
                    let mut res = res.map(body::incoming);
                    if status == 101
                        && let Some(downstream) = upgrade
                    {
                        let upstream = hyper::upgrade::on(&mut res);
                        tokio::spawn(splice(downstream, upstream, self.name.clone()));
                        return Ok(res.map(|_| body::empty()));
                    }
                    return Ok(res);
                }
                Ok(Err(e)) if e.is_connect() => {
                    cluster.failed(&attempt);
                    // Nothing was sent: safe to retry for any method.
                    if can_retry(policy.is_some_and(|p| p.on.connect_failure), true) {
                        tries += 1;
                        backoff(policy.map_or(Duration::ZERO, |p| p.backoff.get()), tries).await;
                        continue;
                    }
                    (
                        Failure::Connect,
                        format!(
                            "cannot connect to {}: {}",
                            attempt.endpoint.address,
                            source_chain(&e)
                        ),
                    )
                }
                Ok(Err(e)) => {
                    cluster.failed(&attempt);
                    if can_retry(policy.is_some_and(|p| p.on.reset), idempotent) {
                        tries += 1;
                        backoff(policy.map_or(Duration::ZERO, |p| p.backoff.get()), tries).await;
                        continue;
                    }
                    (
                        Failure::Upstream,
                        format!(
                            "{} broke the exchange: {}",
                            attempt.endpoint.address,
                            source_chain(&e)
                        ),
                    )
                }
                Err(_) => {
                    cluster.failed(&attempt);
                    if can_retry(policy.is_some_and(|p| p.on.timeout), idempotent) {
                        tries += 1;
                        backoff(policy.map_or(Duration::ZERO, |p| p.backoff.get()), tries).await;
                        continue;
                    }
                    (
                        Failure::Timeout,
                        format!(
                            "no response from {} within {:?}",
                            attempt.endpoint.address, target.timeout
                        ),
                    )
                }
            };
            return Err(self.fail(target, failure, &message, started));
        }
    }
}

/// Jittered exponential backoff before retry number `n` (1-based): base·2ⁿ⁻¹·[0.5, 1.5).
async fn backoff(base: Duration, n: u32) {
    let exp = base.saturating_mul(1u32 << (n - 1).min(10));
    tokio::time::sleep(exp.mul_f64(0.5 + fastrand::f64())).await;
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Copies bytes both ways between the two halves of an upgraded connection.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    listener: Name,
) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(listener = %listener, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(listener = %listener, error = %e, "upgraded connection ended");
    }
}

fn with_close(mut res: Response<ProxyBody>) -> Response<ProxyBody> {
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// An HTTP/1.1 upgrade (WebSocket and the like), except h2c, which is refused by stripping it:
/// a proxy that passes h2c upgrades can be used to smuggle requests past it.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && connection_has(req.headers(), "upgrade")
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("h2c"))
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Phase 2: HTTP/1 framing that two parsers could read differently is refused. hyper already
/// refuses obs-fold, whitespace before the colon, bad chunk sizes and differing duplicate
/// Content-Length values; these checks make the rules ours, whatever the parser does.
pub fn check_framing<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.version() >= Version::HTTP_2 {
        // h2 frames carry lengths; the h2 crate refuses connection-specific headers.
        return Ok(());
    }
    let h = req.headers();
    let te = h.get_all(header::TRANSFER_ENCODING);
    let has_te = te.iter().next().is_some();
    let mut cl = h.get_all(header::CONTENT_LENGTH).iter();
    if has_te && h.contains_key(header::CONTENT_LENGTH) {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if let Some(first) = cl.next() {
        let valid = |v: &HeaderValue| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if !valid(first) || cl.any(|v| v != first || !valid(v)) {
            return Err("invalid or conflicting Content-Length");
        }
    }
    if has_te {
        let codings: Vec<String> = te
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .collect();
        if req.version() == Version::HTTP_10
            || codings.last().map(String::as_str) != Some("chunked")
            || codings.iter().filter(|c| *c == "chunked").count() != 1
        {
            return Err("Transfer-Encoding must end in a single chunked");
        }
    }
    Ok(())
}

/// The request's authority: the URI's (absolute-form, HTTP/2), else the Host header.
fn authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    (!host.is_empty()).then(|| host.to_string())
}

/// `Example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn host_without_port(authority: &str) -> String {
    let host = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    host.to_ascii_lowercase()
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for h in hop_by_hop() {
        if keep_upgrade && (*h == header::UPGRADE || *h == header::CONNECTION) {
            continue;
        }
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        // gRPC needs `te: trailers` end to end.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Phase 4: the request headers the upstream sees.
fn prepare(headers: &mut HeaderMap, peer: &Peer, inbound: bool, upgrade: bool, version: Version) {
    strip_hop_by_hop(headers, upgrade);
    if let Some(ip) = peer.ip() {
        let ip = ip.to_string();
        let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
            _ => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    // Inbound, the client's claim is not trusted; outbound, the app's is kept.
    if inbound || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    let hop = match version {
        Version::HTTP_10 => "1.0 outrigger",
        Version::HTTP_2 => "2 outrigger",
        _ => "1.1 outrigger",
    };
    let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {hop}"),
        None => hop.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&via) {
        headers.insert(header::VIA, v);
    }
    if !headers.contains_key(&X_REQUEST_ID) {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        headers.insert(
            X_REQUEST_ID.clone(),
            HeaderValue::from_str(&id).expect("hex is a valid value"),
        );
    }
}

/// The path and query for the upstream, with the route's prefix rewrite applied.
fn rewrite(uri: &Uri, rule: Option<&(String, String)>) -> String {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    match rule {
        Some((from, to)) if pq.starts_with(from.as_str()) => {
            let rest = &pq[from.len()..];
            let mut out = String::with_capacity(to.len() + rest.len() + 1);
            out.push_str(to);
            if !out.ends_with('/') && !rest.is_empty() && !rest.starts_with(['/', '?']) {
                out.push('/');
            }
            out.push_str(rest);
            if !out.starts_with('/') {
                out.insert(0, '/');
            }
            out
        }
        _ => pq.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().uri("/").version(version);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn framing_rules() {
        let ok = |h: &[(&str, &str)]| check_framing(&req(Version::HTTP_11, h)).is_ok();
        assert!(ok(&[("content-length", "5")]));
        assert!(ok(&[("transfer-encoding", "chunked")]));
        assert!(ok(&[("content-length", "5"), ("content-length", "5")]));
        assert!(!ok(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked")
        ]));
        assert!(!ok(&[("content-length", "5"), ("content-length", "6")]));
        assert!(!ok(&[("content-length", "+5")]));
        assert!(!ok(&[("transfer-encoding", "chunked, identity")]));
        assert!(!ok(&[("transfer-encoding", "xchunked")]));
        assert!(!ok(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked")
        ]));
        assert!(
            check_framing(&req(Version::HTTP_10, &[("transfer-encoding", "chunked")])).is_err()
        );
    }

    #[test]
    fn hosts_and_rewrites() {
        assert_eq!(host_without_port("Example.COM:8080"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
        assert_eq!(host_without_port("payments"), "payments");
        let u: Uri = "/v1/pay?x=1".parse().unwrap();
        assert_eq!(rewrite(&u, Some(&("/v1/".into(), "/".into()))), "/pay?x=1");
        assert_eq!(
            rewrite(&u, Some(&("/v1".into(), "/api".into()))),
            "/api/pay?x=1"
        );
        assert_eq!(rewrite(&u, Some(&("/v1/pay".into(), "".into()))), "/?x=1");
        assert_eq!(rewrite(&u, None), "/v1/pay?x=1");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        prepare(
            &mut h,
            &Peer::Tcp("10.0.0.1:5".parse().unwrap()),
            true,
            false,
            Version::HTTP_11,
        );
        assert!(
            !h.contains_key("connection")
                && !h.contains_key("x-secret")
                && !h.contains_key("keep-alive")
        );
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "1");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["via"], "1.1 outrigger");
        assert_eq!(h["x-request-id"].len(), 32);
    }

    #[test]
    fn token_bucket() {
        let mut b = TokenBucket::new(RateLimit {
            requests_per_second: 0.001,
            burst: 2,
        });
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take());
    }
}
