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
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::{self, Measured, ProxyBody, REPLAY_LIMIT, RequestBody};
use super::listener::{Activity, Peer};
use super::route::{RouteStats, Router, Target};
use crate::config::proxy::{Limits, RateLimit};
use crate::runtime::{AppGate, Drain};
use crate::telemetry::metrics::{Name, ProxyMetrics, ShedLabels};
use crate::telemetry::record::{self, Recorder};
use crate::telemetry::trace::TraceContext;

static X_OUTRIGGER_ERROR: HeaderName = HeaderName::from_static("x-outrigger-error");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop and never travel further (RFC 9110 §7.6.1), plus the
/// credentials a client meant for a proxy. `Trailer` is end to end: it declares the trailers
/// HTTP/1 must send.
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
}

/// Why Outrigger answered a request itself; the `x-outrigger-error` header and metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Malformed or ambiguous request (400, downstream's fault).
    BadRequest,
    /// The request body did not arrive in time (408, downstream's fault).
    RequestTimeout,
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
    /// The app is starting or restarting and did not become ready within `app.hold_timeout`
    /// (503, with retry-after).
    AppNotReady,
    /// The peer's identity is not in the listener's or route's `authz` (403).
    Forbidden,
}

impl Failure {
    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::Overload | Failure::NoEndpoints | Failure::AppNotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Failure::Connect | Failure::Upstream => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad-request",
            Failure::RequestTimeout => "request-timeout",
            Failure::NoRoute => "no-route",
            Failure::Overload => "overload",
            Failure::NoEndpoints => "no-endpoints",
            Failure::Connect => "connect",
            Failure::Upstream => "upstream-reset",
            Failure::Timeout => "timeout",
            Failure::AppNotReady => "app-not-ready",
            Failure::Forbidden => "forbidden",
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
    if matches!(failure, Failure::Overload | Failure::AppNotReady) {
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
    rate: Option<Arc<Mutex<TokenBucket>>>,
    shed_rate: Counter,
    shed_concurrency: Counter,
    shed_breaker: Counter,
    unrouted: RouteStats,
    /// Inbound: requests wait for the app (starting or restarting) up to this long.
    hold: Option<(AppGate, Duration)>,
    limits: Limits,
    /// The listener's `authz`: identities allowed in (None: anyone).
    authz: Option<Vec<crate::config::tls::IdentityPattern>>,
    /// The share of new traces marked sampled (`telemetry.tracing.sample`).
    pub(crate) sample: f64,
    /// Where request records go (access log, span export), if anywhere.
    pub(crate) recorder: Option<Recorder>,
    /// Some route has `authz`: paths must be canonical, or `//admin`, `/./admin` and
    /// `/%61dmin` (which apps read as `/admin`) would miss the protected route.
    strict_paths: bool,
}

/// The downstream connection a request arrived on.
pub struct Downstream {
    pub peer: Peer,
    /// The connection's slot under `max_connections`; an upgraded stream keeps it.
    pub guard: Arc<super::ConnectionGuard>,
    pub drain: Drain,
    pub activity: Activity,
    pub idle_timeout: Duration,
    /// Raised when a request head on this connection had both Content-Length and
    /// Transfer-Encoding (hyper then shows only the latter).
    pub framing_alarm: super::framing::Alarm,
    /// The connection came over TLS (`x-forwarded-proto: https`).
    pub secure: bool,
    /// The verified client certificate's identity (mutual TLS).
    pub identity: Option<crate::tls::PeerIdentity>,
}

/// Permits a request holds until its response body is done.
struct Permits {
    _listener: Option<OwnedSemaphorePermit>,
    _cluster: Option<OwnedSemaphorePermit>,
}

impl HttpListener {
    // One call site (proxy::build_serving); a params struct would only rename the list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: Name,
        direction: &'static str,
        router: Router,
        limits: &Limits,
        metrics: &ProxyMetrics,
        hold: Option<(AppGate, Duration)>,
        previous: Option<&HttpListener>,
        authz: Option<Vec<crate::config::tls::IdentityPattern>>,
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
            // Unchanged limits keep their state across a reload: requests admitted before it
            // still count, and a reload does not refill the rate limiter's bucket.
            in_flight: match previous {
                Some(p) if p.limits.max_requests_in_flight == limits.max_requests_in_flight => {
                    p.in_flight.clone()
                }
                _ => limits
                    .max_requests_in_flight
                    .map(|n| Arc::new(Semaphore::new(n))),
            },
            rate: match previous {
                Some(p) if p.limits.rate_limit == limits.rate_limit => p.rate.clone(),
                _ => limits
                    .rate_limit
                    .map(|r| Arc::new(Mutex::new(TokenBucket::new(r)))),
            },
            limits: limits.clone(),
            strict_paths: router.has_authz(),
            sample: crate::config::DEFAULT_TRACE_SAMPLE,
            recorder: None,
            authz,
            shed_rate: shed("rate_limit"),
            shed_concurrency: shed("concurrency"),
            shed_breaker: shed("breaker"),
            unrouted: RouteStats::new(metrics, direction, &name, none.clone(), &none),
            name,
            direction,
            router,
            hold,
        }
    }

    /// Serves one request; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        down: Arc<Downstream>,
        mut req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        // This hop is a span: the trace goes on upstream with our span as its parent, and a
        // request without an id is known by its trace id.
        let trace = TraceContext::from_headers(req.headers(), self.sample);
        trace.inject(req.headers_mut());
        if !req.headers().contains_key(&X_REQUEST_ID) {
            req.headers_mut()
                .insert(X_REQUEST_ID.clone(), trace.trace_header());
        }
        let recorder = match &self.recorder {
            Some(r) if r.wants(&trace) => r.clone(),
            _ => return self.handle_inner(down, req).await,
        };
        // Handles, not copies: the URI and header values share the bytes hyper read.
        let h = req.headers();
        let entry = record::Entry {
            started: Instant::now(),
            direction: self.direction,
            listener: self.name.clone(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: match req.uri().authority() {
                Some(_) => None,
                None => h.get(header::HOST).cloned(),
            },
            bytes_in: h
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            trace,
            request_id: h.get(&X_REQUEST_ID).cloned(),
            identity: down
                .identity
                .as_ref()
                .and_then(|i| i.identity().map(Arc::from)),
        };
        // Finished even if this future is dropped before there is a response.
        let unanswered = record::Unanswered::new(&recorder, entry);
        let res = self.handle_inner(down, req).await?;
        Ok(unanswered.answered(res))
    }

    async fn handle_inner(
        self: Arc<Self>,
        down: Arc<Downstream>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        // Checked per request against the newest config: a reload that changes `authz`
        // applies to open keep-alive connections too.
        if let Some(allowed) = &self.authz {
            let ids = crate::tls::PeerIdentity::all(down.identity.as_ref());
            if !crate::config::tls::allowed(allowed, ids) {
                tracing::warn!(listener = %self.name, peer = ?down.peer, identity = ?ids.first(), "identity not allowed on this listener");
                self.unrouted
                    .answered(403, Failure::Forbidden.reason(), started);
                return Ok(error_response(
                    Failure::Forbidden,
                    "your identity is not allowed on this listener",
                ));
            }
        }
        let permit = match self.admit() {
            Ok(p) => p,
            Err(why) => {
                self.unrouted
                    .answered(503, Failure::Overload.reason(), started);
                return Ok(error_response(Failure::Overload, why));
            }
        };
        // Inbound while the app starts or restarts: wait for it (admitted, so held requests
        // count against the limits), but not past the start of a stop.
        if let Some((gate, limit)) = &self.hold
            && !gate.is_open()
        {
            let mut drain = down.drain.clone();
            let open = tokio::select! {
                open = gate.wait(*limit) => open,
                _ = drain.signaled() => false,
            };
            if !open {
                tracing::debug!(listener = %self.name, "the app is not ready; request refused");
                self.unrouted
                    .answered(503, Failure::AppNotReady.reason(), started);
                return Ok(error_response(
                    Failure::AppNotReady,
                    "the app is not ready yet; retry shortly",
                ));
            }
        }
        let framing = if down.framing_alarm.raised()
            && req.headers().contains_key(header::TRANSFER_ENCODING)
        {
            // hyper has already dropped the Content-Length; the scanner saw it.
            Err("both Content-Length and Transfer-Encoding")
        } else {
            check_framing(&req)
        };
        if let Err(why) = framing {
            tracing::warn!(listener = %self.name, peer = ?down.peer, error = why, "refused ambiguous request framing");
            self.unrouted
                .answered(400, Failure::BadRequest.reason(), started);
            return Ok(with_close(error_response(Failure::BadRequest, why)));
        }
        if self.strict_paths && !canonical_path(req.uri().path()) {
            tracing::warn!(listener = %self.name, peer = ?down.peer, path = req.uri().path(), "non-canonical path refused (a route here has authz)");
            self.unrouted
                .answered(400, Failure::BadRequest.reason(), started);
            return Ok(error_response(
                Failure::BadRequest,
                "non-canonical path (empty or dot segments, backslashes, or encoded unreserved characters)",
            ));
        }
        // Phase 3: route by the request's authority (absolute-form or :authority first, as
        // RFC 9112 §3.2.2 says), which is also the Host the upstream will see.
        let (target, host) = {
            let (authority, from_uri) = match authority(&req) {
                Ok(a) => a,
                Err(why) => {
                    self.unrouted
                        .answered(400, Failure::BadRequest.reason(), started);
                    return Ok(error_response(Failure::BadRequest, why));
                }
            };
            let key = route_key(authority);
            let Some(target) = self
                .router
                .route(&key, req.uri().path(), req.method(), req.headers())
                .cloned()
            else {
                tracing::debug!(listener = %self.name, host = %key, path = req.uri().path(), "no route");
                self.unrouted
                    .answered(404, Failure::NoRoute.reason(), started);
                return Ok(error_response(
                    Failure::NoRoute,
                    &format!("no route for host {key:?}"),
                ));
            };
            let host = if from_uri {
                HeaderValue::from_str(authority).ok()
            } else {
                None
            };
            (target, host)
        };
        if let Some(allowed) = &target.authz {
            let ids = crate::tls::PeerIdentity::all(down.identity.as_ref());
            if !crate::config::tls::allowed(allowed, ids) {
                tracing::warn!(listener = %self.name, route = %target.name, identity = ?ids.first(), "identity not allowed on this route");
                target
                    .stats
                    .answered(403, Failure::Forbidden.reason(), started);
                return Ok(error_response(
                    Failure::Forbidden,
                    "your identity is not allowed on this route",
                ));
            }
        }
        target.stats.requests.inc();
        let version = req.version();
        let (mut res, cluster_permit) = match self.forward(&target, &down, host, req, started).await
        {
            Ok(pair) => pair,
            Err(res) => return Ok(res),
        };
        // The downstream's version, not the upstream's: an HTTP/1.0 app must not turn the
        // client's keep-alive HTTP/1.1 connection into one request per connection.
        *res.version_mut() = version;
        // Only Outrigger says why it answered itself: an upstream's claim is removed (it
        // would also be logged as Outrigger's own failure).
        res.headers_mut().remove(&X_OUTRIGGER_ERROR);
        let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(res.headers_mut(), switching);
        target.response_headers.apply(res.headers_mut());
        target.stats.response(res.status().as_u16(), "");
        target
            .stats
            .latency
            .observe(started.elapsed().as_secs_f64());
        let permits = Permits {
            _listener: permit,
            _cluster: cluster_permit,
        };
        let stats = &target.stats;
        Ok(
            res.map(|b| {
                Measured::wrap(b, permits, started, &stats.duration, &stats.response_bytes)
            }),
        )
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
        // Shed requests are counted; logging each would flood the log exactly under overload.
        if failure == Failure::Overload {
            tracing::debug!(listener = %self.name, route = %target.name, cluster = %target.cluster.name, message, "request shed");
        } else {
            tracing::warn!(
                listener = %self.name,
                route = %target.name,
                cluster = %target.cluster.name,
                error = failure.reason(),
                message,
                "request failed"
            );
        }
        target
            .stats
            .response(failure.status().as_u16(), failure.reason());
        let elapsed = started.elapsed().as_secs_f64();
        target.stats.latency.observe(elapsed);
        target.stats.duration.observe(elapsed);
        let mut res = error_response(failure, message);
        if self.recorder.is_some() {
            res.extensions_mut().insert(record::Routed {
                route: Some(target.name.clone()),
                cluster: Some(target.cluster.name.clone()),
                upstream: None,
                retries: 0,
            });
        }
        res
    }

    /// Phases 4 and 5: prepare the request and send it, retrying within the policy. Returns the
    /// response and the cluster's in-flight permit (held until the response body is done).
    async fn forward(
        &self,
        target: &Target,
        down: &Arc<Downstream>,
        host: Option<HeaderValue>,
        mut req: Request<Incoming>,
        started: Instant,
    ) -> Result<(Response<ProxyBody>, Option<OwnedSemaphorePermit>), Response<ProxyBody>> {
        let cluster = &target.cluster;
        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        let h1_chunked = parts.version <= Version::HTTP_11
            && parts.headers.contains_key(header::TRANSFER_ENCODING);
        prepare(
            &mut parts.headers,
            &down.peer,
            self.direction == "inbound",
            upgrade.is_some(),
            parts.version,
        );
        if self.direction == "inbound" {
            if down.secure {
                parts
                    .headers
                    .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
            }
            // Only Outrigger says who the peer is: a client's own claim is removed.
            parts.headers.remove(&X_FORWARDED_CLIENT_CERT);
            if let Some(id) = &down.identity
                && let Ok(v) = HeaderValue::from_str(&id.xfcc)
            {
                parts.headers.insert(X_FORWARDED_CLIENT_CERT.clone(), v);
            }
        }
        target.request_headers.apply(&mut parts.headers);
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        let Some(path) = rewrite(&parts.uri, target.rewrite.as_ref()) else {
            return Err(self.fail(
                target,
                Failure::BadRequest,
                "the rewritten path is invalid",
                started,
            ));
        };
        parts.version = if cluster.config.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };

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
            // A client that stops sending mid-body must not hold its permits forever.
            match tokio::time::timeout(target.timeout, body::prebuffer(incoming, REPLAY_LIMIT))
                .await
            {
                Ok(Ok(RequestBody::Complete { data, trailers })) => {
                    target.stats.request_bytes.inc_by(data.len() as u64);
                    RequestBody::Complete { data, trailers }
                }
                Ok(Ok(RequestBody::Streaming(b))) => {
                    RequestBody::Streaming(body::counted(b, target.stats.request_bytes.clone()))
                }
                Ok(Ok(RequestBody::Taken)) => RequestBody::Taken,
                Ok(Err(e)) => {
                    let msg = format!("invalid request body: {e}");
                    return Err(with_close(self.fail(
                        target,
                        Failure::BadRequest,
                        &msg,
                        started,
                    )));
                }
                Err(_) => {
                    let msg = format!(
                        "the request body did not arrive within {:?}",
                        target.timeout
                    );
                    return Err(with_close(self.fail(
                        target,
                        Failure::RequestTimeout,
                        &msg,
                        started,
                    )));
                }
            }
        } else {
            RequestBody::Streaming(body::counted(
                body::incoming(incoming),
                target.stats.request_bytes.clone(),
            ))
        };
        // Taken after the body is read: a slow client does not hold a cluster slot meanwhile.
        let Ok(cluster_permit) = cluster.admit() else {
            self.shed_breaker.inc();
            return Err(self.fail(
                target,
                Failure::Overload,
                "the cluster has too many requests in flight",
                started,
            ));
        };
        cluster.deposit();

        let policy = target.retry.as_ref();
        let max_retries = policy.map_or(0, |p| p.attempts);
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
            let replayable = body.replayable();
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
            *attempt_req.uri_mut() = attempt.endpoint.uri(path.clone());
            *attempt_req.version_mut() = parts.version;
            // The headers are copied only when another attempt may follow.
            *attempt_req.headers_mut() = if replayable && tries < max_retries {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let outcome =
                tokio::time::timeout(target.timeout, attempt.endpoint.client.request(attempt_req))
                    .await;
            let can_retry = |on: bool, safe: bool| {
                on && safe && replayable && tries < max_retries && cluster.withdraw_retry()
            };
            let (failure, message, retry_on, safe) = match outcome {
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
                    if self.recorder.is_some() {
                        res.extensions_mut().insert(record::Routed {
                            route: Some(target.name.clone()),
                            cluster: Some(cluster.name.clone()),
                            upstream: Some(attempt.endpoint.label.clone()),
                            retries: tries,
                        });
                    }
                    if status == 101
                        && let Some(downstream) = upgrade
                    {
                        let upstream = hyper::upgrade::on(&mut res);
                        tokio::spawn(splice(
                            downstream,
                            upstream,
                            self.name.clone(),
                            down.clone(),
                        ));
                        return Ok((res.map(|_| body::empty()), cluster_permit));
                    }
                    return Ok((res, cluster_permit));
                }
                // Every failed exchange: count it against the endpoint, then retry when the
                // policy names the failure and it is safe (a connect failure sent nothing, so
                // any method; otherwise idempotent methods only).
                Ok(Err(e)) if e.is_connect() => (
                    Failure::Connect,
                    format!(
                        "cannot connect to {}: {}",
                        attempt.endpoint.address,
                        source_chain(&e)
                    ),
                    policy.is_some_and(|p| p.on.connect_failure),
                    true,
                ),
                Ok(Err(e)) if downstream_fault(&e) => {
                    // The client's own body failed (it went away mid-upload): nothing to hold
                    // against the endpoint, and nothing to retry.
                    let msg = format!("the request body failed: {}", source_chain(&e));
                    return Err(with_close(self.fail(
                        target,
                        Failure::BadRequest,
                        &msg,
                        started,
                    )));
                }
                Ok(Err(e)) => (
                    Failure::Upstream,
                    format!(
                        "{} broke the exchange: {}",
                        attempt.endpoint.address,
                        source_chain(&e)
                    ),
                    policy.is_some_and(|p| p.on.reset),
                    idempotent,
                ),
                Err(_) => (
                    Failure::Timeout,
                    format!(
                        "no response from {} within {:?}",
                        attempt.endpoint.address, target.timeout
                    ),
                    policy.is_some_and(|p| p.on.timeout),
                    idempotent,
                ),
            };
            cluster.failed(&attempt);
            if can_retry(retry_on, safe) {
                tries += 1;
                backoff(policy.map_or(Duration::ZERO, |p| p.backoff.get()), tries).await;
                continue;
            }
            let mut res = self.fail(target, failure, &message, started);
            if let Some(r) = res.extensions_mut().get_mut::<record::Routed>() {
                // The access log names the last endpoint tried and the retries spent.
                r.upstream = Some(attempt.endpoint.label.clone());
                r.retries = tries;
            }
            return Err(res);
        }
    }
}

/// Jittered exponential backoff before retry number `n` (1-based): base·2ⁿ⁻¹·[0.5, 1.5).
async fn backoff(base: Duration, n: u32) {
    let exp = base.saturating_mul(1u32 << (n - 1).min(10));
    tokio::time::sleep(exp.mul_f64(0.5 + fastrand::f64())).await;
}

/// True when an exchange failed because the downstream's request body did (hyper reports the
/// body we stream as "user" input), not because of the endpoint.
fn downstream_fault(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            return true;
        }
        cur = err.source();
    }
    false
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

/// Copies bytes both ways between the two halves of an upgraded connection (WebSocket). It
/// holds the downstream connection's slot, ends on drain, and on the listener's idle timeout.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    listener: Name,
    down: Arc<Downstream>,
) {
    let (d, u) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(listener = %listener, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
    let mut drain = down.drain.clone();
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut d, &mut u) => {
            if let Err(e) = res {
                tracing::debug!(listener = %listener, error = %e, "upgraded connection ended");
            }
        }
        _ = drain.signaled() => tracing::debug!(listener = %listener, "upgraded connection closed: draining"),
        _ = super::idle_for(&down.activity, down.idle_timeout) => tracing::debug!(listener = %listener, "upgraded connection idle; closed"),
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

/// An HTTP/1.1 upgrade (WebSocket and the like). A request that offers h2c among its
/// protocols is not treated as one (its Upgrade header is then dropped as hop-by-hop): a proxy
/// that passes h2c upgrades can be used to smuggle requests past its routing and limits.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    let mut protocols = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| v.to_str().unwrap_or("h2c"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .peekable();
    req.version() == Version::HTTP_11
        && connection_has(req.headers(), "upgrade")
        && protocols.peek().is_some()
        && protocols.all(|p| !p.eq_ignore_ascii_case("h2c") && !p.is_empty())
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
    // hyper drops Content-Length when Transfer-Encoding is present, so for parsed requests
    // the framing scanner (`Downstream::framing_alarm`) is what catches this; the rule stays
    // here as the statement of it, for any parser that keeps both.
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
        // hyper refuses HTTP/1.0 with Transfer-Encoding and a final coding other than chunked;
        // we go further and accept chunked alone: stripping Transfer-Encoding (hop-by-hop)
        // from `gzip, chunked` would hand the upstream a body it cannot decode.
        let mut codings = te.iter().flat_map(|v| v.to_str().unwrap_or("?").split(','));
        let only_chunked = codings
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
            && codings.next().is_none();
        if req.version() == Version::HTTP_10 || !only_chunked {
            return Err("Transfer-Encoding must be exactly chunked");
        }
    }
    Ok(())
}

/// The request's authority and whether it came from the URI (absolute-form, HTTP/2
/// `:authority`) rather than the Host header. The URI wins, as RFC 9112 §3.2.2 says; several
/// Host headers are refused.
fn authority<B>(req: &Request<B>) -> Result<(&str, bool), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if let Some(a) = req.uri().authority() {
        return Ok((a.as_str(), true));
    }
    match host.map(|h| h.to_str()) {
        Some(Ok(h)) if !h.is_empty() => Ok((h, false)),
        Some(_) => Err("the Host header is empty or not text"),
        None => Err("the request has no Host"),
    }
}

/// What routes match on: the host of an authority, lowercase, without userinfo and port
/// (`User@Example.com:8080` → `example.com`, `[::1]:80` → `[::1]`).
fn route_key(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
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
        // Outrigger's own trace and request id headers cannot be stripped by naming them.
        let ours = matches!(
            n.as_str(),
            "traceparent" | "tracestate" | "x-request-id" | "b3" | "x-outrigger-error"
        );
        if !(ours || keep_upgrade && n == header::UPGRADE) {
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

/// Whether `path` has one spelling only: no empty or dot segments, no backslash, and no
/// percent-encoding of what needs none (letters, digits, `-._~`) or of `/` and `\`.
pub fn canonical_path(path: &str) -> bool {
    if path.contains("//") || path.contains('\\') {
        return false;
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return false;
    }
    let b = path.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) else {
                return false;
            };
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\') {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// The path and query for the upstream, with the route's prefix rewrite applied; None when
/// the rewrite produced an invalid target.
fn rewrite(uri: &Uri, rule: Option<&(String, String)>) -> Option<PathAndQuery> {
    let original = || {
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    };
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
            PathAndQuery::try_from(out).ok()
        }
        _ => Some(original()),
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
    fn canonical_paths() {
        for ok in ["/", "/admin/x", "/a%20b", "/a.b/c~d", "/%C3%A9"] {
            assert!(canonical_path(ok), "{ok}");
        }
        for bad in [
            "//admin/x",
            "/./admin/x",
            "/a/../admin",
            "/%61dmin",
            "/admin%2Fx",
            "/a\\b",
            "/%2e%2e/x",
            "/%zz",
            "/x/.",
        ] {
            assert!(!canonical_path(bad), "{bad}");
        }
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
        assert_eq!(route_key("Example.COM:8080"), "example.com");
        assert_eq!(route_key("user@api:80"), "api");
        assert_eq!(route_key("[::1]:80"), "[::1]");
        assert_eq!(route_key("[::1]"), "[::1]");
        assert_eq!(route_key("payments"), "payments");
        let u: Uri = "/v1/pay?x=1".parse().unwrap();
        let rw = |from: &str, to: &str| {
            rewrite(&u, Some(&(from.into(), to.into())))
                .unwrap()
                .to_string()
        };
        assert_eq!(rw("/v1/", "/"), "/pay?x=1");
        assert_eq!(rw("/v1", "/api"), "/api/pay?x=1");
        assert_eq!(rw("/v1/pay", ""), "/?x=1");
        assert_eq!(rewrite(&u, None).unwrap(), "/v1/pay?x=1");
        let two_hosts = Request::builder()
            .uri("/")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        assert!(authority(&two_hosts).is_err());
        let absolute = Request::builder()
            .uri("http://public/x")
            .header("host", "admin")
            .body(())
            .unwrap();
        assert_eq!(authority(&absolute).unwrap(), ("public", true));
    }

    #[test]
    fn h2c_is_never_an_upgrade() {
        let up = |v: &[&str]| {
            let mut r = Request::builder().uri("/").header("connection", "upgrade");
            for x in v {
                r = r.header("upgrade", *x);
            }
            is_upgrade(&r.body(()).unwrap())
        };
        assert!(up(&["websocket"]));
        assert!(!up(&["h2c"]));
        assert!(!up(&["websocket, h2c"]));
        assert!(!up(&["websocket", "H2C"]));
        assert!(!up(&[]));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("trailer", "x-checksum".parse().unwrap());
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
        assert!(!h.contains_key("proxy-authorization"));
        assert_eq!(h["trailer"], "x-checksum", "Trailer is end to end");
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
