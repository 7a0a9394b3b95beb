//! Service invocation: `/v1.0/invoke/{appId}/method/{path}` and, on any other path, the
//! `dapr-app-id` header. The app id names a proxy cluster (`clusters.<appId>`), so the
//! cluster's balancing, connection pools, outlier ejection, limits and TLS (mTLS) apply; our
//! own app id goes to the local app (the `app` cluster, `app.address`). An app id without a
//! cluster of its name is resolved by `bridge.name_resolution` or, in a mesh, by `mesh:` over
//! mutual TLS (`proxy::cluster::name_resolution`, shared with the proxy's outbound
//! listeners). The callee's status, headers and body come back unchanged.
//!
//! Routes' retry policies belong to outbound listeners and are not applied here: a request is
//! sent once, except that a connect failure (nothing was sent) is tried on another endpoint,
//! within the cluster's retry budget (`outrigger_retries_total`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};

use super::BridgeState;
use super::error::ApiError;
use crate::config::proxy::{APP_CLUSTER, ClusterConfig};
use crate::proxy::body;
use crate::proxy::cluster::Cluster;
use crate::proxy::cluster::name_resolution::ResolveError;
use crate::telemetry::metrics::ProxyMetrics;

/// The header form of invocation: the whole path is the method.
pub const APP_ID_HEADER: &str = "dapr-app-id";

/// Where app ids are looked up.
pub enum Clusters {
    /// The proxy module's clusters (live across config reloads).
    Proxy(Arc<crate::proxy::Proxy>),
    /// No proxy module runs (no listeners): clusters built on first use from the config.
    Own(Box<OwnClusters>),
}

/// Clusters the bridge builds itself, on first use, when no proxy module runs.
pub struct OwnClusters {
    pub configs: BTreeMap<String, ClusterConfig>,
    pub built: Mutex<HashMap<String, Arc<Cluster>>>,
    pub metrics: ProxyMetrics,
    /// The clusters' TLS material, built by preflight.
    pub tls: crate::tls::Material,
}

impl Clusters {
    /// The proxy's metrics, for clusters the bridge makes.
    pub fn metrics(&self) -> ProxyMetrics {
        match self {
            Clusters::Proxy(p) => p.metrics().clone(),
            Clusters::Own(own) => own.metrics.clone(),
        }
    }

    async fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        match self {
            Clusters::Proxy(p) => p.cluster(name),
            Clusters::Own(own) => {
                let OwnClusters {
                    configs,
                    built,
                    metrics,
                    tls,
                } = &**own;
                if let Some(c) = built.lock().expect("not poisoned").get(name) {
                    return Some(c.clone());
                }
                let config = configs.get(name)?;
                let cluster = Cluster::new(
                    config.clone(),
                    metrics.clone(),
                    tls.clients.get(name).cloned(),
                );
                if cluster.is_discovered() {
                    cluster.refresh().await;
                    tokio::spawn(Cluster::discover(Arc::downgrade(&cluster)));
                }
                let mut built = built.lock().expect("not poisoned");
                Some(built.entry(name.to_string()).or_insert(cluster).clone())
            }
        }
    }
}

/// The fallback route: invocation (URL or header form), or daprd's "no app id" error.
pub async fn fallback(State(st): State<Arc<BridgeState>>, req: Request) -> Response {
    match target(&req) {
        Some((app_id, path)) => {
            let (parts, body) = req.into_parts();
            let call = async {
                // A gRPC app takes its own invocations whole (`OnInvoke`).
                if app_id == st.config.app_id && st.grpc_app.is_some() {
                    let body = super::routes::read_body(&st, body).await?;
                    return call(&st, &app_id, parts.method, &path, parts.headers, body).await;
                }
                call_streaming(&st, &app_id, parts.method, &path, parts.headers, body).await
            };
            match call.await {
                Ok(r) => r.into_response(),
                Err(e) => e.into_response(),
            }
        }
        None => ApiError::NoAppId.into_response(),
    }
}

/// The app id and the path (with query) to call it on.
fn target(req: &Request) -> Option<(String, String)> {
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    if let Some(id) = req.headers().get(APP_ID_HEADER) {
        let id = id.to_str().ok()?.to_string();
        return Some((id, format!("{}{query}", req.uri().path())));
    }
    let rest = req.uri().path().strip_prefix("/v1.0/invoke/")?;
    let (id, method) = rest.split_once("/method/")?;
    let id = percent_decode(id)?;
    Some((id, format!("/{method}{query}")))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a streaming request body's owner tells [`send`].
pub trait Streamed: Sync {
    /// The failure was the caller's doing (its side of the stream broke): not the endpoint's.
    fn caller_fault(&self) -> bool;
    /// The body again, when the failed attempt dropped it before reading anything of it (a
    /// connect failure); `None` once any of it was read.
    fn again(&self) -> Option<body::ProxyBody>;
    /// The callee's headers may come any time later (a gRPC stream): no `timeout` of the
    /// cluster's applies, only the caller's deadline.
    fn open_ended(&self) -> bool {
        true
    }
    /// How far the caller's body got ([`Progress`]; `None`: the cluster's `timeout` counts
    /// from the start): until its end, the `timeout` bounds each wait in which the callee
    /// takes none of it, not a slow upload (the caller's); from its end, the wait for the
    /// answer.
    fn progress(&self) -> Option<tokio::sync::watch::Receiver<Progress>> {
        None
    }
}

/// How far a streamed request body got, for [`send`]'s time limits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Pieces passed on to the callee so far (not sent as a change: read when the waiter's
    /// timer fires).
    pub pieces: u64,
    /// The body was read to its end.
    pub done: bool,
    /// The callee's side asked for more and waits for the caller to send it: a wait that is
    /// the caller's (not sent as a change: read when a wait ends).
    pub waiting_for_caller: bool,
}

/// Connect failures retried on another endpoint (within the cluster's retry budget).
const MAX_CONNECT_RETRIES: u32 = 2;

/// Headers that belong to one hop, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    APP_ID_HEADER,
];

/// Bodies up to this size are read whole before they are sent (so a connect failure sends
/// them again, as any); a longer one streams to the callee as it arrives.
const READ_WHOLE: usize = body::REPLAY_LIMIT;

/// Calls `app_id` with a request body as it arrives (HTTP invocation): up to [`READ_WHOLE`]
/// read first, the rest streamed, all of it within `bridge.max_body` (past it the callee's
/// request is cut and the caller gets 413).
async fn call_streaming(
    st: &BridgeState,
    app_id: &str,
    method: http::Method,
    path: &str,
    headers: http::HeaderMap,
    incoming: Body,
) -> Result<http::Response<Body>, ApiError> {
    use hyper::body::Body as _;
    let limit = st.config.max_body;
    if incoming.size_hint().lower() > limit as u64 {
        return Err(ApiError::TooLarge(limit));
    }
    let first = body::prebuffer(SyncBody(Mutex::new(incoming)), READ_WHOLE.min(limit))
        .await
        .map_err(|e| ApiError::Malformed(format!("cannot read the request body: {e}")))?;
    let hooks = Capped {
        limit,
        over: Arc::new(AtomicBool::new(false)),
        broke: Arc::new(AtomicBool::new(false)),
        unsent: Arc::new(Mutex::new(None)),
        progress: Arc::new(tokio::sync::watch::Sender::new(Progress::default())),
    };
    let body = match first {
        // Read up to the limit and still more to come: over it already.
        body::RequestBody::Streaming(_) if limit <= READ_WHOLE => {
            return Err(ApiError::TooLarge(limit));
        }
        body::RequestBody::Streaming(rest) => body::RequestBody::Streaming(hooks.wrap(rest, 0)),
        whole => {
            hooks.progress.send_modify(|p| p.done = true);
            whole
        }
    };
    let res = send(st, app_id, method, path, headers, body, None, Some(&hooks)).await;
    drop(hooks.unsent.lock().expect("not poisoned").take());
    if hooks.over.load(Ordering::Relaxed) {
        return Err(ApiError::TooLarge(limit));
    }
    Ok(res?.map(Body::new))
}

/// An axum body made `Sync` for a [`body::ProxyBody`] (a box of `Send + Sync`): it is polled
/// only through `&mut` (`Mutex::get_mut`, no locking). Written here: a few lines, where a
/// crate (sync_wrapper) would be one more direct dependency for it.
struct SyncBody(Mutex<Body>);

impl hyper::body::Body for SyncBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::pin::Pin::new(inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().map_or(true, |b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.lock().map(|b| b.size_hint()).unwrap_or_default()
    }
}

/// An HTTP invocation's streamed request body: what [`send`] asks of it, and where an
/// attempt that could not connect leaves it unread.
struct Capped {
    limit: usize,
    /// The body went past `bridge.max_body`: the call answers 413.
    over: Arc<AtomicBool>,
    /// The caller's side broke (a reset, a bad chunk).
    broke: Arc<AtomicBool>,
    unsent: Arc<Mutex<Option<(body::ProxyBody, usize)>>>,
    /// How far the caller's body got.
    progress: Arc<tokio::sync::watch::Sender<Progress>>,
}

impl Capped {
    fn wrap(&self, inner: body::ProxyBody, seen: usize) -> body::ProxyBody {
        use http_body_util::BodyExt;
        CappedBody {
            inner: Some(inner),
            seen,
            limit: self.limit,
            over: self.over.clone(),
            broke: self.broke.clone(),
            read: false,
            unsent: self.unsent.clone(),
            progress: self.progress.clone(),
        }
        .boxed()
    }
}

impl Streamed for Capped {
    fn caller_fault(&self) -> bool {
        self.over.load(Ordering::Relaxed) || self.broke.load(Ordering::Relaxed)
    }

    fn again(&self) -> Option<body::ProxyBody> {
        let (inner, seen) = self.unsent.lock().expect("not poisoned").take()?;
        Some(self.wrap(inner, seen))
    }

    fn open_ended(&self) -> bool {
        false
    }

    fn progress(&self) -> Option<tokio::sync::watch::Receiver<Progress>> {
        Some(self.progress.subscribe())
    }
}

/// The body itself: frames pass as they come, counted; past the limit it fails (hyper then
/// cuts the callee's request). Dropped unread, it leaves the stream for the next attempt.
struct CappedBody {
    inner: Option<body::ProxyBody>,
    /// Bytes passed so far (the part read before it was sent counts too).
    seen: usize,
    limit: usize,
    over: Arc<AtomicBool>,
    broke: Arc<AtomicBool>,
    read: bool,
    unsent: Arc<Mutex<Option<(body::ProxyBody, usize)>>>,
    progress: Arc<tokio::sync::watch::Sender<Progress>>,
}

impl CappedBody {
    /// The body is read to its end.
    fn done(&self) {
        self.progress
            .send_if_modified(|p| !std::mem::replace(&mut p.done, true));
    }
}

impl Drop for CappedBody {
    fn drop(&mut self) {
        if !self.read
            && let Some(inner) = self.inner.take()
        {
            *self.unsent.lock().expect("not poisoned") = Some((inner, self.seen));
        }
    }
}

impl hyper::body::Body for CappedBody {
    type Data = bytes::Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, body::BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        this.read = true;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(inner).poll_frame(cx);
        let waiting = polled.is_pending();
        if this.progress.borrow().waiting_for_caller != waiting {
            // Set without waking the waiter: it reads it when its wait ends.
            this.progress.send_if_modified(|p| {
                p.waiting_for_caller = waiting;
                false
            });
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                // Counted without waking the waiter: it looks when its timer fires.
                this.progress.send_if_modified(|p| {
                    p.pieces += 1;
                    false
                });
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len());
                    if this.seen > this.limit {
                        this.over.store(true, Ordering::Relaxed);
                        this.inner = None;
                        return Poll::Ready(Some(Err(
                            "the request body is over bridge.max_body".into()
                        )));
                    }
                }
                if this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    this.done();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.broke.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.as_ref().is_none_or(|b| b.is_end_stream());
        if end && !self.over.load(Ordering::Relaxed) {
            self.done();
        }
        end
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

/// Calls `app_id` (a cluster, or our own app) with one request and returns its answer as
/// received: gRPC's `InvokeService` and a gRPC app's own invocations come here.
pub async fn call(
    st: &BridgeState,
    app_id: &str,
    method: http::Method,
    path: &str,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> Result<http::Response<Body>, ApiError> {
    let body = body::RequestBody::Complete {
        data: body,
        trailers: None,
    };
    let res = send(st, app_id, method, path, headers, body, None, None).await?;
    Ok(res.map(Body::new))
}

/// Sends one request to `app_id` and returns the answer once its headers came; its body
/// streams from the callee as it is read (holding the cluster's in-flight permit until it
/// ends). A whole body is sent again after a connect failure and goes to a gRPC app of our
/// own app id through `OnInvoke`; a streaming one (gRPC proxying, [`super::grpc::proxying`])
/// is forwarded as it arrives, and sent again after a connect failure only when `stream`
/// gives it back unread. The headers are awaited up to `deadline` when the caller
/// set one (then a miss is 504, gRPC's `DEADLINE_EXCEEDED`); otherwise up to the cluster's
/// `timeout` for a whole body, without a limit for an open-ended stream (gRPC proxying), and
/// for an HTTP invocation's streamed body as [`answer_while_streaming`] says (the `timeout`
/// from the body's end, and for each wait in which the callee takes none of it). The deadline also
/// bounds the wait for our own app and for name resolution, and goes on as the remaining
/// `grpc-timeout`. For a streaming body, `stream` says whether a failure was the caller's
/// doing (then it does not count against the endpoint) and gives the body back after a
/// connect failure, which sent nothing of it: the call is then tried on another endpoint as a
/// whole body is.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    st: &BridgeState,
    app_id: &str,
    method: http::Method,
    path: &str,
    mut headers: http::HeaderMap,
    mut body: body::RequestBody,
    deadline: Option<tokio::time::Instant>,
    stream: Option<&dyn Streamed>,
) -> Result<http::Response<body::ProxyBody>, ApiError> {
    let fail = |status: StatusCode, message: String| ApiError::Invoke { status, message };
    let late = || {
        fail(
            StatusCode::GATEWAY_TIMEOUT,
            format!("the call's deadline passed before {app_id:?} answered"),
        )
    };
    if app_id.is_empty() {
        return Err(ApiError::NoAppId);
    }
    let local = app_id == st.config.app_id;
    let cluster_name = if local { APP_CLUSTER } else { app_id };
    let cluster = match (st.clusters.get(cluster_name).await, &st.resolver) {
        (Some(c), _) => c,
        (None, Some(resolver)) if !local => {
            let resolved = match deadline {
                Some(d) => tokio::time::timeout_at(d, resolver.cluster(app_id))
                    .await
                    .map_err(|_| late())?,
                None => resolver.cluster(app_id).await,
            };
            resolved.map_err(|e| match e {
                ResolveError::Malformed(m) => ApiError::Malformed(m),
                ResolveError::Full(m) | ResolveError::Tls(m) => {
                    fail(StatusCode::SERVICE_UNAVAILABLE, m)
                }
                ResolveError::Unresolved(m) => fail(StatusCode::INTERNAL_SERVER_ERROR, m),
            })?
        }
        (None, _) => {
            return Err(fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                if local {
                    format!("cannot invoke {app_id:?}: the local app has no app.address")
                } else {
                    format!(
                        "cannot invoke {app_id:?}: expected a cluster named {app_id:?} in clusters (or bridge.name_resolution, or mesh:), found none"
                    )
                },
            ));
        }
    };
    let path: http::uri::PathAndQuery = path
        .parse()
        .map_err(|_| ApiError::Malformed(format!("invalid method path {path:?}")))?;
    if local {
        let hold = deadline.map_or(st.hold_timeout, |d| {
            st.hold_timeout
                .min(d.saturating_duration_since(tokio::time::Instant::now()))
        });
        if !st.app_gate.wait(hold).await {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Err(late());
            }
            return Err(fail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the app was not ready within {:?}", st.hold_timeout),
            ));
        }
    }
    // gRPC needs `te: trailers` end to end (it is hop-by-hop only in name).
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Hop-by-hop headers belong to this hop, whichever way the call goes on.
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // A gRPC app takes invocations of its own id through `OnInvoke` (a gRPC call proxied to
    // it, a stream, goes to its server as it is).
    if local
        && let Some(app) = &st.grpc_app
        && let body::RequestBody::Complete { data: body, .. } = &body
    {
        let body = body.clone();
        let (method_path, query) = path.as_str().split_once('?').unwrap_or((path.as_str(), ""));
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let (body, content_type) = app
            .invoke(method_path, &method, query, &content_type, body, &headers)
            .await
            .map_err(|s| ApiError::AppStatus {
                code: s.code() as i32,
                message: s.message().to_string(),
            })?;
        let mut res = http::Response::new(body::full(body));
        if let Ok(v) = HeaderValue::from_str(&content_type) {
            res.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        return Ok(res);
    }
    let Ok(permit) = cluster.admit() else {
        return Err(fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cluster {app_id:?} has too many requests in flight"),
        ));
    };
    if local && let Some(token) = &st.config.app_api_token {
        headers.insert(
            HeaderName::from_static(super::TOKEN_HEADER),
            HeaderValue::from_str(token.expose()).expect("validated as printable ASCII"),
        );
    }
    let version = if cluster.config.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let timeout = cluster.config.timeout.get();
    // A stream (gRPC proxying) is bounded by the caller's deadline only: a gRPC server may
    // send its headers with its first message, any time later (a server stream's first
    // event, a bidi call's first answer); daprd sets no limit either.
    let streamed =
        matches!(body, body::RequestBody::Streaming(_)) && stream.is_none_or(|s| s.open_ended());
    cluster.deposit();
    // A connect failure sent nothing, so it is retried on another endpoint (any method), as
    // far as the cluster's retry budget allows; every other outcome is final.
    let mut tries = 0;
    loop {
        let Some(attempt) = cluster.pick() else {
            return Err(fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cluster {cluster_name:?} has no endpoints"),
            ));
        };
        let Some(out_body) = body.take() else {
            // A streaming body is sent again only once given back (below): not reached.
            return Err(fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot invoke {app_id:?}: the request body was already sent"),
            ));
        };
        let mut out = http::Request::new(out_body);
        *out.method_mut() = method.clone();
        *out.uri_mut() = attempt.endpoint.uri(path.clone());
        *out.version_mut() = version;
        let mut headers = headers.clone();
        // HTTP/1 needs a Host; the endpoint's authority is what the callee listens on.
        if let Some(host) = out.uri().authority().map(|a| a.to_string())
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            headers.insert(header::HOST, v);
        }
        // The callee gets the time left, not the caller's whole budget.
        if let Some(d) = deadline
            && headers.contains_key(GRPC_TIMEOUT)
        {
            let left = d.saturating_duration_since(tokio::time::Instant::now());
            headers.insert(GRPC_TIMEOUT, grpc_timeout_value(left));
        }
        *out.headers_mut() = headers;
        let request = attempt.endpoint.client.request(out);
        let answer = match (deadline, stream.and_then(|s| s.progress())) {
            (Some(d), _) => tokio::time::timeout_at(d, request).await,
            (None, _) if streamed => Ok(request.await),
            // While the caller's body is still being read, a slow upload is the caller's, not
            // the endpoint's: no limit while the callee waits for it. A callee that takes none
            // of it (and does not answer) for `timeout` is the callee's: the call ends then.
            // From the body's end, the timeout counts to the answer.
            (None, Some(progress)) => {
                match answer_while_streaming(request, progress, timeout).await {
                    Some(answer) => answer,
                    None => {
                        cluster.failed(&attempt);
                        return Err(fail(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!(
                                "no response from {app_id:?} at {} within {timeout:?}, nor any more of the request body taken",
                                attempt.endpoint.address
                            ),
                        ));
                    }
                }
            }
            (None, None) => tokio::time::timeout(timeout, request).await,
        };
        match answer {
            Ok(Ok(res)) => {
                if res.status().is_server_error() {
                    cluster.failed(&attempt);
                } else {
                    cluster.succeeded(&attempt);
                }
                // In flight (for the cluster's limit and balancing) until the answer's end.
                let held = Held {
                    _permit: permit,
                    _attempt: attempt,
                };
                return Ok(res.map(|b| body::tap(body::incoming(b), held)));
            }
            Ok(Err(e)) => {
                if !stream.is_some_and(|s| s.caller_fault()) {
                    cluster.failed(&attempt);
                }
                // A streaming body comes back when the attempt dropped it unread.
                if e.is_connect()
                    && !body.replayable()
                    && tries < MAX_CONNECT_RETRIES
                    && let Some(again) = stream.and_then(|s| s.again())
                {
                    body = body::RequestBody::Streaming(again);
                }
                if e.is_connect()
                    && !matches!(body, body::RequestBody::Taken)
                    && tries < MAX_CONNECT_RETRIES
                    && cluster.withdraw_retry()
                {
                    tries += 1;
                    tracing::debug!(app_id, endpoint = %attempt.endpoint.address, "invocation: connect failed; trying another endpoint");
                    continue;
                }
                return Err(fail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "cannot invoke {app_id:?} at {}: {e}",
                        attempt.endpoint.address
                    ),
                ));
            }
            Err(_) if deadline.is_some() => {
                // The caller's deadline, not the callee's fault: no outlier mark.
                return Err(fail(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the call's deadline passed before {app_id:?} at {} answered",
                        attempt.endpoint.address
                    ),
                ));
            }
            Err(_) => {
                cluster.failed(&attempt);
                return Err(fail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "no response from {app_id:?} at {} within {timeout:?}",
                        attempt.endpoint.address
                    ),
                ));
            }
        }
    }
}

/// Waits for the callee's answer to a request whose body is still streaming (`progress`):
/// without a limit while the callee waits for the caller's next piece, but not a whole
/// `timeout` without the callee taking a piece or answering (None: it stalled, neither reading
/// nor answering); once the body is read to its end, `timeout` for the answer.
///
/// One timer for the whole body, looked at when it fires: the pieces taken wake no one (a
/// wake-up and a new timer for each frame of a long body cost more than the call). A stall
/// therefore ends the call one to two `timeout`s after the last piece taken.
async fn answer_while_streaming<F: std::future::Future>(
    request: F,
    mut progress: tokio::sync::watch::Receiver<Progress>,
    timeout: std::time::Duration,
) -> Option<Result<F::Output, tokio::time::error::Elapsed>> {
    tokio::pin!(request);
    let stall = tokio::time::sleep(timeout);
    tokio::pin!(stall);
    let mut pieces = progress.borrow().pieces;
    loop {
        if progress.borrow_and_update().done {
            break;
        }
        tokio::select! {
            res = &mut request => return Some(Ok(res)),
            changed = progress.changed() => {
                if changed.is_err() {
                    // The body's owner is gone: nothing more will come of it.
                    break;
                }
            }
            () = &mut stall => {
                let now = *progress.borrow();
                if now.pieces == pieces && !now.waiting_for_caller {
                    return None;
                }
                pieces = now.pieces;
                stall.as_mut().reset(tokio::time::Instant::now() + timeout);
            }
        }
    }
    Some(tokio::time::timeout(timeout, request).await)
}

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// `left` as a `grpc-timeout` value (at most 8 digits): milliseconds, rounded up, or seconds
/// past 99999999 ms.
fn grpc_timeout_value(left: std::time::Duration) -> HeaderValue {
    let ms = left.as_nanos().div_ceil(1_000_000);
    let v = if ms <= 99_999_999 {
        format!("{ms}m")
    } else {
        format!("{}S", left.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&v).expect("digits and a unit")
}

/// What an answer holds until its body ends or is dropped: the cluster's in-flight permit
/// and the endpoint's attempt (least-request balancing counts it).
struct Held {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _attempt: crate::proxy::cluster::Attempt,
}

impl body::Tap for Held {
    fn data(&mut self, _: u64) {}
    fn end(self, _: body::End) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP invocation's streamed body, its pieces sent on `tx`; its end when `tx` drops.
    fn streamed_body(hooks: &Capped) -> (tokio::sync::mpsc::Sender<bytes::Bytes>, body::ProxyBody) {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let piece = rx.recv().await?;
            Some((Ok::<_, body::BoxError>(hyper::body::Frame::data(piece)), rx))
        });
        let inner = http_body_util::StreamBody::new(stream).boxed();
        (tx, hooks.wrap(inner, 0))
    }

    fn hooks() -> Capped {
        Capped {
            limit: usize::MAX,
            over: Arc::new(AtomicBool::new(false)),
            broke: Arc::new(AtomicBool::new(false)),
            unsent: Arc::new(Mutex::new(None)),
            progress: Arc::new(tokio::sync::watch::Sender::new(Progress::default())),
        }
    }

    /// A callee that takes a long body steadily (1000 pieces over 100 `timeout`s, then
    /// answers) is waited for, and its pieces do not wake the waiter: it is polled when its
    /// one timer fires (about once per `timeout`), not once per piece, as it was. Paused time:
    /// the counts do not depend on the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn a_streamed_bodys_pieces_do_not_wake_the_wait_for_the_answer() {
        use http_body_util::BodyExt;
        const PIECES: usize = 1000;
        let timeout = std::time::Duration::from_secs(1);
        let hooks = hooks();
        let (tx, mut body) = streamed_body(&hooks);
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        // The callee: a piece every tenth of the timeout, then its answer.
        tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                frame.unwrap();
                tokio::time::sleep(timeout / 10).await;
            }
            let _ = answer.send(());
        });
        // The caller: all its pieces, then the body's end.
        tokio::spawn(async move {
            for _ in 0..PIECES {
                tx.send(bytes::Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let wait = answer_while_streaming(answered, hooks.progress.subscribe(), timeout);
        tokio::pin!(wait);
        let mut polls = 0;
        let got = std::future::poll_fn(|cx| {
            polls += 1;
            wait.as_mut().poll(cx)
        })
        .await;
        assert!(matches!(got, Some(Ok(Ok(())))), "answered: {got:?}");
        assert!(
            polls < PIECES / 4,
            "polled {polls} times for {PIECES} pieces"
        );
    }

    /// A callee that stops taking the body (and does not answer) is given up on; a caller
    /// that stops sending is not the callee's fault: waited for, however long.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_callee_ends_the_wait_and_a_slow_caller_does_not() {
        use http_body_util::BodyExt;
        let timeout = std::time::Duration::from_secs(1);

        // The callee takes 10 pieces, then nothing more (the caller would send more).
        let hooks_a = hooks();
        let (tx, mut body) = streamed_body(&hooks_a);
        tokio::spawn(async move {
            for _ in 0..10 {
                body.frame().await.unwrap().unwrap();
            }
            std::future::pending::<()>().await;
        });
        tokio::spawn(
            async move { while tx.send(bytes::Bytes::from_static(b"x")).await.is_ok() {} },
        );
        let never = std::future::pending::<()>();
        let got = answer_while_streaming(never, hooks_a.progress.subscribe(), timeout).await;
        assert!(got.is_none(), "a stalled callee ends the wait");

        // The callee reads on; the caller sends one piece, then nothing for 30 timeouts, then
        // ends its body; the callee then answers.
        let hooks_b = hooks();
        let (tx, mut body) = streamed_body(&hooks_b);
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                frame.unwrap();
            }
            let _ = answer.send(());
        });
        tokio::spawn(async move {
            tx.send(bytes::Bytes::from_static(b"x")).await.unwrap();
            tokio::time::sleep(timeout * 30).await;
        });
        let got = answer_while_streaming(answered, hooks_b.progress.subscribe(), timeout).await;
        assert!(
            matches!(got, Some(Ok(Ok(())))),
            "a slow caller is waited for: {got:?}"
        );
    }

    #[test]
    fn grpc_timeout_values() {
        use std::time::Duration;
        for (d, v) in [
            (Duration::ZERO, "0m"),
            (Duration::from_micros(1), "1m"),
            (Duration::from_millis(2500), "2500m"),
            (Duration::from_millis(99_999_999), "99999999m"),
            (Duration::from_secs(100_000), "100000S"),
        ] {
            assert_eq!(grpc_timeout_value(d), v, "{d:?}");
        }
    }

    #[test]
    fn targets() {
        let req = Request::builder()
            .uri("/v1.0/invoke/my%2Dapp/method/api/v1/add?x=1")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            target(&req),
            Some(("my-app".into(), "/api/v1/add?x=1".into()))
        );
        let req = Request::builder()
            .uri("/orders/7")
            .header(APP_ID_HEADER, "shop")
            .body(Body::empty())
            .unwrap();
        assert_eq!(target(&req), Some(("shop".into(), "/orders/7".into())));
        let req = Request::builder()
            .uri("/nothing")
            .body(Body::empty())
            .unwrap();
        assert_eq!(target(&req), None);
    }
}
