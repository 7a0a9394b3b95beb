//! The HTTP listener's request handler: one request at a time, in named phases (after
//! pingora's `ProxyHttp`), each a method of [`HttpListener`] in a file named after it:
//!
//! 1. `authorize_listener` (`authz.rs`): the listener's `authz` (403);
//! 2. `admit` (`limits.rs`): local rate limit and in-flight cap (503 + `retry-after`);
//! 3. `hold` (`hold.rs`): inbound, wait for a starting app (503 `app-not-ready` after
//!    `app.hold_timeout`);
//! 4. `check_framing` (`framing.rs`): refuse ambiguous HTTP/1 framing (400) before anything
//!    is forwarded; `check_path` (`authz.rs`): canonical paths where a route has `authz` (400);
//! 5. `route` (`route.rs`): the listener's [`Router`] picks a
//!    [`Target`](super::route::Target) (404 when none);
//! 6. `authorize_route` (`authz.rs`): the route's `authz` (403);
//! 7. `forward` (`forward.rs`): prepare the headers (`headers.rs`), read the body ahead, pick
//!    an endpoint, send with a timeout, retry within the policy and the cluster's budget; a 101
//!    is spliced (`upgrade.rs`);
//! 8. `respond` (`respond.rs`): response edits and metrics.
//!
//! Any phase can end the request with an error response (`failure.rs`) carrying an
//! `x-outrigger-error` reason (502 connect, 504 timeout, 503 overload, …); every error is
//! logged with listener, route and cluster. [`HttpListener::handle`] also opens the request's
//! trace span and, when an access log or span export wants it, its record.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header;
use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;

use super::body::ProxyBody;
use super::headers::X_REQUEST_ID;
use super::limits::{Permits, TokenBucket};
use super::listener::{Activity, Peer};
use super::route::{RouteStats, Router};
use crate::config::proxy::Direction;
use crate::config::proxy::Limits;
use crate::config::tls::IdentityPattern;
use crate::runtime::{AppGate, Drain};
use crate::telemetry::metrics::{Name, ProxyMetrics, ShedLabels};
use crate::telemetry::record::{self, Recorder};
use crate::telemetry::trace::TraceContext;

/// One HTTP listener's request handling state.
pub struct HttpListener {
    pub name: Name,
    pub direction: Direction,
    pub router: Router,
    pub(super) in_flight: Option<Arc<Semaphore>>,
    pub(super) rate: Option<Arc<Mutex<TokenBucket>>>,
    pub(super) shed_rate: Counter,
    pub(super) shed_concurrency: Counter,
    pub(super) shed_breaker: Counter,
    /// Requests answered before a route was chosen.
    pub(super) unrouted: RouteStats,
    /// Inbound: requests wait for the app (starting or restarting) up to this long.
    pub(super) hold: Option<(AppGate, Duration)>,
    /// Outrigger supervises the app (`app.command`): a refused connect to it may be a restart
    /// the gate has not seen yet (hold.rs `held_after_refusal`).
    pub(super) supervised: bool,
    pub(super) limits: Limits,
    /// The listener's `authz`: identities allowed in (None: anyone).
    pub(super) authz: Option<Vec<IdentityPattern>>,
    /// The share of new traces marked sampled (`telemetry.tracing.sample`).
    pub(crate) sample: f64,
    /// Where request records go (access log, span export), if anywhere.
    pub(crate) recorder: Option<Recorder>,
    /// Some route has `authz`: paths must be canonical, or `//admin`, `/./admin` and
    /// `/%61dmin` (which apps read as `/admin`) would miss the protected route.
    pub(super) strict_paths: bool,
}

/// What a request body from a downstream server must be for the phases: its frames as
/// `Bytes`, readable from another task (`Send + Sync`: it is boxed into a [`ProxyBody`] when
/// it streams on) and movable without pinning (`Unpin`: the read-ahead and the limits poll it
/// in place).
pub trait RequestBodyIn:
    hyper::body::Body<Data = bytes::Bytes, Error: Into<super::body::BoxError>>
    + Send
    + Sync
    + Unpin
    + 'static
{
}

impl<B> RequestBodyIn for B where
    B: hyper::body::Body<Data = bytes::Bytes, Error: Into<super::body::BoxError>>
        + Send
        + Sync
        + Unpin
        + 'static
{
}

/// The downstream connection a request arrived on.
pub struct Downstream {
    pub peer: Peer,
    /// The peer's IP as an `x-forwarded-for` value ([`Peer::forwarded_for`]).
    pub forwarded_for: Option<http::HeaderValue>,
    /// The connection's slot under `max_connections`; an upgraded stream keeps it.
    pub guard: Arc<super::accept::ConnectionGuard>,
    pub drain: Drain,
    pub activity: Activity,
    pub idle_timeout: Duration,
    /// HTTP/2: response bodies in flight, reset when their client reads nothing.
    pub streams: super::unread_streams::Streams,
    /// Raised when a request head on this connection had both Content-Length and
    /// Transfer-Encoding (hyper then shows only the latter).
    pub framing_alarm: super::framing::Alarm,
    /// The connection came over TLS (`x-forwarded-proto: https`).
    pub secure: bool,
    /// The verified client certificate's identity (mutual TLS).
    pub identity: Option<crate::tls::PeerIdentity>,
    /// The Host made from the last request's `:authority` (see the route phase).
    pub last_host: super::route::LastHost,
}

impl HttpListener {
    // One call site (proxy::generation::build_serving); a params struct would only rename the list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: Name,
        direction: Direction,
        router: Router,
        limits: &Limits,
        metrics: &ProxyMetrics,
        hold: Option<(AppGate, Duration)>,
        previous: Option<&HttpListener>,
        authz: Option<Vec<IdentityPattern>>,
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
            supervised: false,
            authz,
            shed_rate: shed("rate_limit"),
            shed_concurrency: shed("concurrency"),
            shed_breaker: shed("breaker"),
            unrouted: RouteStats::new(metrics, direction.label(), &name, none.clone(), &none),
            name,
            direction,
            router,
            hold,
        }
    }

    /// Serves one request; never fails (errors become responses). `B` is the request body as
    /// the server that read the request gives it: hyper's `Incoming` (HTTP/1, and HTTP/2 with
    /// `http2_server: hyper`) or our HTTP/2 server's [`RecvBody`](super::h2::RecvBody); each
    /// gets its own copy of the phases (no boxing on either path).
    pub async fn handle<B: RequestBodyIn>(
        self: Arc<Self>,
        down: Arc<Downstream>,
        mut req: Request<B>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        // This hop is a span: the trace goes on upstream with our span as its parent, and a
        // request without an id is known by its trace id.
        let trace = TraceContext::from_headers(req.headers(), self.sample);
        trace.inject_with_id(req.headers_mut(), &X_REQUEST_ID);
        let recorder = match &self.recorder {
            Some(r) if r.wants(&trace) => r.clone(),
            _ => {
                let (Ok(res) | Err(res)) = self.phases(down, req).await;
                return Ok(res);
            }
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
        let unanswered = super::record::Unanswered::new(&recorder, entry);
        let (Ok(res) | Err(res)) = self.phases(down, req).await;
        Ok(unanswered.answered(res))
    }

    /// The phases in order. `Err` is a response a phase answered itself (refused or failed).
    async fn phases<B: RequestBodyIn>(
        self: Arc<Self>,
        down: Arc<Downstream>,
        req: Request<B>,
    ) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
        let started = Instant::now();
        self.authorize_listener(&down, started)?;
        let permit = self.admit(started)?;
        if let Some(held) = self.hold(&down, started) {
            held.await?;
        }
        self.check_framing(&down, &req, started)?;
        self.check_path(&down, &req, started)?;
        let (target, host) = self.route(&req, &down.last_host, started).await?;
        self.authorize_route(&target, &down, started)?;
        target.stats.requests.inc();
        let version = req.version();
        let (res, cluster_permit) = self.forward(&target, &down, host, req, started).await?;
        let permits = Permits {
            _listener: permit,
            _cluster: cluster_permit,
        };
        Ok(self.respond(&target, res, version, permits, started))
    }
}
