//! Dapr's gRPC API (`dapr.proto.runtime.v1.Dapr`), so the Python, Go, Java and .NET SDKs work
//! unchanged. The messages are compiled from `proto/` at build time (build.rs). Each RPC parses
//! its message into the types of [`super::ops`] (or pub/sub's and invocation's cores), calls the
//! same function the HTTP route calls, and maps the [`ApiError`] to a gRPC status with the HTTP
//! API's text: one implementation, two front doors.
//!
//! Served on the bridge's own connections ([`super::Bridge`]): every request whose content type
//! is `application/grpc…` comes here ([`is_grpc`]), on `bridge.address` and on
//! `bridge.grpc_address`. [`Grpc::call`] checks the API token (`dapr-api-token` metadata),
//! answers RPCs we do not implement with `UNIMPLEMENTED` naming their building block, and counts
//! every call in the bridge's metrics. A call to another service with `dapr-app-id` metadata
//! ([`is_proxied`]) is forwarded to that app id as a stream both ways ([`Grpc::proxy`],
//! [`proxying`]: daprd's gRPC proxying).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::bridge::error::ApiError;
use crate::bridge::ops::{self, Item, Options, TxOp};
use crate::bridge::pubsub::http::{Entry, PubSubError, publish_entries, publish_event};
use crate::bridge::pubsub::subscription::Source;
use crate::bridge::{BridgeState, TOKEN_HEADER};
use crate::telemetry::metrics::{BridgeApiLabels, BridgeRequestLabels};

/// The generated messages and services (`proto/`), in Dapr's package layout.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod dapr {
    pub mod proto {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("dapr.proto.common.v1");
            }
        }
        pub mod runtime {
            pub mod v1 {
                tonic::include_proto!("dapr.proto.runtime.v1");
            }
        }
    }
}

pub mod app;
pub mod proxying;
mod subscribe;

use dapr::proto::common::v1 as common;
use dapr::proto::runtime::v1 as runtime;
use runtime::dapr_server::{Dapr, DaprServer};

/// The service's path prefix: `/dapr.proto.runtime.v1.Dapr/`.
const SERVICE_PREFIX: &str = "/dapr.proto.runtime.v1.Dapr/";

/// Whether a request is a gRPC call (any `application/grpc` content type).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whether a request is gRPC proper (`application/grpc`, `application/grpc+proto`,
/// `application/grpc;…`), not gRPC-Web (`application/grpc-web…`, whose body is framed or
/// base64-encoded otherwise): only these are proxied as streams ([`is_proxied`]).
pub fn is_grpc_proper<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
}

/// Whether a gRPC call is for another service, to invoke by its `dapr-app-id` (daprd's gRPC
/// proxying) rather than for Dapr's own API.
pub fn is_proxied<B>(req: &Request<B>) -> bool {
    req.headers()
        .contains_key(crate::bridge::invoke::APP_ID_HEADER)
        && !req.uri().path().starts_with(SERVICE_PREFIX)
}

/// The gRPC front door: the generated server over [`Api`], plus token, metrics and the
/// `UNIMPLEMENTED` answers.
#[derive(Clone)]
pub struct Grpc {
    state: Arc<BridgeState>,
    server: DaprServer<Api>,
}

impl Grpc {
    pub fn new(state: Arc<BridgeState>) -> Grpc {
        let limit = state.config.max_body;
        let server = DaprServer::new(Api {
            state: state.clone(),
        })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
        Grpc { state, server }
    }

    /// Serves one gRPC request.
    pub async fn call(self, req: Request<Body>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let method = path.strip_prefix(SERVICE_PREFIX);
        let api = method.map_or("grpc", api_of);
        let response = if let Err(status) = self.authorize(&req) {
            tracing::debug!(path, "gRPC call refused: {}", status.message());
            status_response(status)
        } else {
            match method {
                Some(m) if !IMPLEMENTED.contains(&m) => status_response(unimplemented(m)),
                Some(_) => {
                    let mut req = req;
                    req.headers_mut().remove(TOKEN_HEADER);
                    match self.server.clone().oneshot(req).await {
                        Ok(res) => res.map(Body::new),
                        Err(never) => match never {},
                    }
                }
                None => status_response(Status::unimplemented(format!(
                    "unknown gRPC service or method {path:?}: Outrigger serves dapr.proto.runtime.v1.Dapr"
                ))),
            }
        };
        self.observe(api, &response, started);
        Ok(response)
    }

    /// Serves one call to another app id (`dapr-app-id`, [`is_proxied`]): the same token check
    /// as the API's calls, then [`proxying::forward`]; counted as `api="invoke"`.
    pub async fn proxy(
        self,
        mut req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let app_id = req
            .headers()
            .get(crate::bridge::invoke::APP_ID_HEADER)
            .map(|v| v.to_str().map(str::to_string));
        let response = match (self.authorize(&req), app_id) {
            (Err(status), _) => {
                tracing::debug!(
                    path = req.uri().path(),
                    "gRPC call refused: {}",
                    status.message()
                );
                status_response(status)
            }
            (Ok(()), Some(Ok(app_id))) => {
                req.headers_mut().remove(TOKEN_HEADER);
                proxying::forward(&self.state, &app_id, req).await
            }
            (Ok(()), _) => status_response(Status::invalid_argument(
                "expected a dapr-app-id of printable ASCII, found other bytes",
            )),
        };
        self.observe("invoke", &response, started);
        Ok(response)
    }

    /// Counts a call and the time to its answer's headers.
    fn observe(&self, api: &'static str, response: &Response<Body>, started: Instant) {
        let class = grpc_class(response.status(), response.headers());
        let metrics = &self.state.metrics;
        metrics
            .requests
            .get_or_create(&BridgeRequestLabels {
                api,
                status_class: class,
            })
            .inc();
        metrics
            .duration
            .get_or_create(&BridgeApiLabels { api })
            .observe(started.elapsed().as_secs_f64());
    }

    /// The API token, when one is configured, must come as `dapr-api-token` metadata; without
    /// one, only IP addresses and localhost are answered (as the HTTP API: a DNS-rebinding page
    /// must not reach it by name).
    fn authorize<B>(&self, req: &Request<B>) -> Result<(), Status> {
        let Some(token) = &self.state.config.api_token else {
            if crate::origin::foreign_host(req.headers(), req.uri()) {
                tracing::warn!(path = req.uri().path(), authority = ?req.uri().authority(), host = ?req.headers().get(http::header::HOST), "refused a gRPC call for a foreign Host");
                return Err(Status::permission_denied(ApiError::ForeignHost.to_string()));
            }
            return Ok(());
        };
        match req.headers().get(TOKEN_HEADER) {
            None => Err(Status::unauthenticated(
                "missing api token in request metadata",
            )),
            Some(v) if crate::bridge::token_matches(Some(v), token.expose()) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "authentication error: api token mismatch",
            )),
        }
    }
}

/// The RPCs of `proto/`'s Dapr service.
const IMPLEMENTED: &[&str] = &[
    "InvokeService",
    "GetState",
    "GetBulkState",
    "SaveState",
    "DeleteState",
    "DeleteBulkState",
    "ExecuteStateTransaction",
    "PublishEvent",
    "BulkPublishEvent",
    "BulkPublishEventAlpha1",
    "SubscribeTopicEventsAlpha1",
    "InvokeBinding",
    "GetSecret",
    "GetBulkSecret",
    "GetConfiguration",
    "SubscribeConfiguration",
    "UnsubscribeConfiguration",
    "GetConfigurationAlpha1",
    "SubscribeConfigurationAlpha1",
    "UnsubscribeConfigurationAlpha1",
    "TryLockAlpha1",
    "UnlockAlpha1",
    "GetMetadata",
    "SetMetadata",
    "Shutdown",
];

/// The building block of a Dapr RPC we do not serve, by its name.
fn block_of(method: &str) -> &'static str {
    const BY_WORD: &[(&str, &str)] = &[
        ("Actor", "actors"),
        ("Reminder", "actors"),
        ("Timer", "actors"),
        ("Workflow", "workflows"),
        ("Configuration", "configuration"),
        ("Lock", "distributed lock"),
        ("Binding", "bindings"),
        ("Crypto", "cryptography"),
        ("Encrypt", "cryptography"),
        ("Decrypt", "cryptography"),
        ("Job", "jobs"),
        ("Converse", "conversation"),
        ("QueryState", "state query"),
        ("Subscribe", "pub/sub"),
        ("Publish", "pub/sub"),
        ("State", "state"),
        ("Secret", "secrets"),
        ("Invoke", "service invocation"),
        ("Metadata", "metadata"),
    ];
    BY_WORD
        .iter()
        .find(|(w, _)| method.contains(w))
        .map_or("this", |(_, b)| b)
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!(
        "{method}: the {} building block is not implemented by Outrigger",
        block_of(method)
    ))
}

/// The bounded `api` label of an RPC.
fn api_of(method: &str) -> &'static str {
    match method {
        "GetState"
        | "GetBulkState"
        | "SaveState"
        | "DeleteState"
        | "DeleteBulkState"
        | "ExecuteStateTransaction" => "state",
        "PublishEvent" | "BulkPublishEvent" | "BulkPublishEventAlpha1" => "publish",
        "SubscribeTopicEventsAlpha1" => "subscribe",
        "InvokeService" => "invoke",
        "GetSecret" | "GetBulkSecret" => "secrets",
        "TryLockAlpha1" | "UnlockAlpha1" => "lock",
        "InvokeBinding" => "bindings",
        "GetConfiguration"
        | "GetConfigurationAlpha1"
        | "SubscribeConfiguration"
        | "SubscribeConfigurationAlpha1"
        | "UnsubscribeConfiguration"
        | "UnsubscribeConfigurationAlpha1" => "configuration",
        "GetMetadata" | "SetMetadata" => "metadata",
        "Shutdown" => "shutdown",
        _ => "other",
    }
}

/// The status class of a gRPC answer: a `grpc-status` in the headers is a trailers-only error;
/// otherwise the call was answered (its final status travels in trailers).
fn grpc_class(status: http::StatusCode, headers: &HeaderMap) -> &'static str {
    // Not a gRPC answer (a proxied callee's HTTP error, with or without `grpc-status`): its
    // HTTP class.
    match status.as_u16() / 100 {
        2 => {}
        1 => return "1xx",
        3 => return "3xx",
        4 => return "4xx",
        _ => return "5xx",
    }
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from);
    match code {
        Code::Ok => "2xx",
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unauthenticated
        | Code::ResourceExhausted
        | Code::Cancelled => "4xx",
        _ => "5xx",
    }
}

fn status_response(status: Status) -> Response<Body> {
    status.into_http::<Body>()
}

/// An API error as daprd's gRPC API reports it, with the HTTP API's message.
impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        use crate::bridge::state::StateError;
        let code = match &e {
            ApiError::Malformed(_) | ApiError::NoAppId => Code::InvalidArgument,
            ApiError::TooLarge(_) => Code::ResourceExhausted,
            ApiError::StoreNotFound { .. } => Code::InvalidArgument,
            ApiError::NotConfigured { .. } => Code::FailedPrecondition,
            ApiError::State { source, .. } => match source {
                StateError::EtagMismatch(_) => Code::Aborted,
                StateError::EtagInvalid(_) | StateError::TtlInvalid(_) => Code::InvalidArgument,
                StateError::Store(_) => Code::Internal,
            },
            ApiError::UnsupportedOperation(_) | ApiError::NotImplemented(_) => Code::Unimplemented,
            ApiError::Secret(_) | ApiError::Failed { .. } => Code::Internal,
            ApiError::Invoke { status, .. } => http_code(*status),
            ApiError::AppStatus { code, message } => {
                return Status::new(Code::from(*code), message.clone());
            }
            ApiError::CrossOrigin | ApiError::ForeignHost => Code::PermissionDenied,
        };
        Status::new(code, e.to_string())
    }
}

impl From<PubSubError> for Status {
    fn from(e: PubSubError) -> Status {
        let code = match &e {
            PubSubError::NotConfigured(_) => Code::FailedPrecondition,
            PubSubError::PubsubEmpty
            | PubSubError::TopicEmpty(_)
            | PubSubError::NotFound(_)
            | PubSubError::Metadata(_)
            | PubSubError::BulkBody { .. }
            | PubSubError::BulkEntry { .. }
            | PubSubError::CloudEvent(_) => Code::InvalidArgument,
            PubSubError::Publish { .. } => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// The gRPC code for an HTTP status (as the gRPC spec's HTTP-to-gRPC table).
fn http_code(status: http::StatusCode) -> Code {
    match status.as_u16() {
        200..=299 => Code::Ok,
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// The HTTP status for a gRPC code (the reverse of [`http_code`]).
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as S;
    match code {
        Code::Ok => S::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => S::BAD_REQUEST,
        Code::Unauthenticated => S::UNAUTHORIZED,
        Code::PermissionDenied => S::FORBIDDEN,
        Code::NotFound => S::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => S::CONFLICT,
        Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
        Code::Unimplemented => S::NOT_IMPLEMENTED,
        Code::Unavailable => S::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
        _ => S::INTERNAL_SERVER_ERROR,
    }
}

/// The Dapr service over the bridge's state.
#[derive(Clone)]
pub struct Api {
    state: Arc<BridgeState>,
}

fn options(o: Option<common::StateOptions>) -> Options {
    let Some(o) = o else {
        return Options::default();
    };
    let concurrency = match o.concurrency {
        1 => Some("first-write"),
        2 => Some("last-write"),
        _ => None,
    };
    let consistency = match o.consistency {
        1 => Some("eventual"),
        2 => Some("strong"),
        _ => None,
    };
    Options {
        concurrency: concurrency.map(str::to_string),
        consistency: consistency.map(str::to_string),
    }
}

fn item(i: common::StateItem) -> Item {
    Item {
        key: i.key,
        value: Bytes::from(i.value),
        etag: i.etag.map(|e| e.value),
        options: options(i.options),
        metadata: i.metadata.into_iter().collect(),
        json: false,
    }
}

fn sorted(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// `traceparent` and `tracestate` from the call's metadata.
fn trace(headers: &tonic::metadata::MetadataMap) -> (Option<String>, Option<String>) {
    let get = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    (get("traceparent"), get("tracestate"))
}

type Reply<T> = Result<tonic::Response<T>, Status>;

fn ok<T>(t: T) -> Reply<T> {
    Ok(tonic::Response::new(t))
}

/// The HTTP method of an invocation (daprd: no verb is POST).
fn verb(ext: Option<&common::HttpExtension>) -> http::Method {
    use common::http_extension::Verb;
    match ext.map(|e| Verb::try_from(e.verb).unwrap_or(Verb::None)) {
        Some(Verb::Get) => http::Method::GET,
        Some(Verb::Head) => http::Method::HEAD,
        Some(Verb::Put) => http::Method::PUT,
        Some(Verb::Delete) => http::Method::DELETE,
        Some(Verb::Connect) => http::Method::CONNECT,
        Some(Verb::Options) => http::Method::OPTIONS,
        Some(Verb::Trace) => http::Method::TRACE,
        Some(Verb::Patch) => http::Method::PATCH,
        Some(Verb::Post | Verb::None) | None => http::Method::POST,
    }
}

/// A header that belongs to the callee, not to this call: copied between HTTP headers and gRPC
/// metadata either way (an invocation's metadata to HTTP headers, an HTTP caller's headers or a
/// message's metadata to a gRPC app); the call's own framing, pseudo-headers and token never.
pub(crate) fn forwardable(name: &str) -> bool {
    !(name.starts_with("grpc-")
        || name.starts_with(':')
        || matches!(
            name,
            "content-type" | "te" | "user-agent" | "content-length" | TOKEN_HEADER
        ))
}

#[tonic::async_trait]
impl Dapr for Api {
    async fn invoke_service(
        &self,
        request: tonic::Request<runtime::InvokeServiceRequest>,
    ) -> Reply<common::InvokeResponse> {
        let (md, _, req) = request.into_parts();
        let message = req
            .message
            .ok_or_else(|| Status::invalid_argument("the invoke request has no message"))?;
        let mut headers = HeaderMap::new();
        for (name, value) in md.into_headers() {
            if let Some(name) = name
                && forwardable(name.as_str())
            {
                headers.append(name, value);
            }
        }
        if !message.content_type.is_empty()
            && let Ok(v) = http::HeaderValue::from_str(&message.content_type)
        {
            headers.insert(http::header::CONTENT_TYPE, v);
        }
        let method = verb(message.http_extension.as_ref());
        let mut path = format!("/{}", message.method.trim_start_matches('/'));
        if let Some(q) = message
            .http_extension
            .as_ref()
            .map(|e| e.querystring.as_str())
            .filter(|q| !q.is_empty())
        {
            path.push('?');
            path.push_str(q);
        }
        let body = message
            .data
            .map(|a| Bytes::from(a.value))
            .unwrap_or_default();
        let res =
            crate::bridge::invoke::call(&self.state, &req.id, method, &path, headers, body).await?;
        let status = res.status();
        let headers = res.headers().clone();
        let content_type = res
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let limit = self.state.config.max_body;
        let body = http_body_util::Limited::new(res.into_body(), limit);
        // (An HTTP callee's body; a gRPC app's answer is already whole.)
        let body = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|e| Status::internal(format!("cannot read the answer of {:?}: {e}", req.id)))?
            .to_bytes();
        if !status.is_success() {
            // The callee's failure as a status (daprd does the same for an HTTP callee).
            return Err(Status::new(
                http_code(status),
                format!(
                    "{:?} answered {}: {}",
                    req.id,
                    status,
                    String::from_utf8_lossy(&body[..body.len().min(1024)])
                ),
            ));
        }
        let mut reply = tonic::Response::new(common::InvokeResponse {
            data: Some(prost_types::Any {
                type_url: String::new(),
                value: body.to_vec(),
            }),
            content_type,
        });
        // The callee's headers come back as response metadata (as daprd returns them).
        for (name, value) in &headers {
            if forwardable(name.as_str())
                && !matches!(
                    name.as_str(),
                    "content-length" | "transfer-encoding" | "connection" | "keep-alive"
                )
                && let (Ok(k), Ok(v)) = (
                    tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
                    tonic::metadata::MetadataValue::try_from(value.as_bytes()),
                )
            {
                reply.metadata_mut().append(k, v);
            }
        }
        Ok(reply)
    }

    async fn get_state(
        &self,
        request: tonic::Request<runtime::GetStateRequest>,
    ) -> Reply<runtime::GetStateResponse> {
        let req = request.into_inner();
        // With `ttlExpireTime` in the metadata when the value expires (as the HTTP header).
        let found = ops::get_entry(&self.state, &req.store_name, &req.key).await?;
        ok(match found {
            Some(entry) => runtime::GetStateResponse {
                metadata: entry.metadata().into_iter().collect(),
                data: entry.value.to_vec(),
                etag: entry.version.to_string(),
            },
            None => runtime::GetStateResponse::default(),
        })
    }

    async fn get_bulk_state(
        &self,
        request: tonic::Request<runtime::GetBulkStateRequest>,
    ) -> Reply<runtime::GetBulkStateResponse> {
        let req = request.into_inner();
        let items = ops::bulk_get(&self.state, &req.store_name, req.keys).await?;
        let items = items
            .into_iter()
            .map(|ops::BulkItem { key, outcome }| {
                let mut out = runtime::BulkStateItem {
                    key,
                    ..Default::default()
                };
                match outcome {
                    Ok(Some((value, version))) => {
                        out.data = value.to_vec();
                        out.etag = version.to_string();
                    }
                    Ok(None) => {}
                    Err(e) => out.error = e,
                }
                out
            })
            .collect();
        ok(runtime::GetBulkStateResponse { items })
    }

    async fn save_state(&self, request: tonic::Request<runtime::SaveStateRequest>) -> Reply<()> {
        let req = request.into_inner();
        let items = req.states.into_iter().map(item).collect();
        ops::save(&self.state, &req.store_name, items).await?;
        ok(())
    }

    async fn delete_state(
        &self,
        request: tonic::Request<runtime::DeleteStateRequest>,
    ) -> Reply<()> {
        let req = request.into_inner();
        let etag = req.etag.map(|e| e.value);
        ops::delete(
            &self.state,
            &req.store_name,
            &req.key,
            etag.as_deref(),
            &options(req.options),
        )
        .await?;
        ok(())
    }

    async fn delete_bulk_state(
        &self,
        request: tonic::Request<runtime::DeleteBulkStateRequest>,
    ) -> Reply<()> {
        let req = request.into_inner();
        let items = req.states.into_iter().map(item).collect();
        ops::delete_bulk(&self.state, &req.store_name, items).await?;
        ok(())
    }

    async fn execute_state_transaction(
        &self,
        request: tonic::Request<runtime::ExecuteStateTransactionRequest>,
    ) -> Reply<()> {
        let req = request.into_inner();
        let ops = req
            .operations
            .into_iter()
            .map(|op| {
                let request = op.request.ok_or_else(|| {
                    ApiError::Malformed(format!(
                        "the {} operation has no request",
                        op.operation_type
                    ))
                })?;
                TxOp::new(&op.operation_type, item(request))
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        ops::transaction(&self.state, &req.store_name, ops).await?;
        ok(())
    }

    async fn publish_event(
        &self,
        request: tonic::Request<runtime::PublishEventRequest>,
    ) -> Reply<()> {
        let (traceparent, tracestate) = trace(request.metadata());
        let req = request.into_inner();
        let content_type = Some(req.data_content_type.as_str()).filter(|c| !c.is_empty());
        publish_event(
            &self.state.pubsub,
            &req.pubsub_name,
            &req.topic,
            content_type,
            &req.data,
            &sorted(req.metadata),
            (traceparent.as_deref(), tracestate.as_deref()),
        )
        .await?;
        ok(())
    }

    async fn bulk_publish_event(
        &self,
        request: tonic::Request<runtime::BulkPublishRequest>,
    ) -> Reply<runtime::BulkPublishResponse> {
        self.bulk_publish(request).await
    }

    async fn bulk_publish_event_alpha1(
        &self,
        request: tonic::Request<runtime::BulkPublishRequest>,
    ) -> Reply<runtime::BulkPublishResponse> {
        self.bulk_publish(request).await
    }

    type SubscribeTopicEventsAlpha1Stream = Pin<
        Box<
            dyn tokio_stream::Stream<
                    Item = Result<runtime::SubscribeTopicEventsResponseAlpha1, Status>,
                > + Send,
        >,
    >;

    async fn subscribe_topic_events_alpha1(
        &self,
        request: tonic::Request<tonic::Streaming<runtime::SubscribeTopicEventsRequestAlpha1>>,
    ) -> Reply<Self::SubscribeTopicEventsAlpha1Stream> {
        let stream = subscribe::subscribe(self.state.clone(), request.into_inner()).await?;
        ok(stream)
    }

    async fn invoke_binding(
        &self,
        request: tonic::Request<runtime::InvokeBindingRequest>,
    ) -> Reply<runtime::InvokeBindingResponse> {
        let (traceparent, tracestate) = trace(request.metadata());
        let req = request.into_inner();
        let mut metadata = sorted(req.metadata);
        for (k, v) in [("traceparent", traceparent), ("tracestate", tracestate)] {
            if let Some(v) = v {
                metadata.entry(k.to_string()).or_insert(v);
            }
        }
        let res = ops::invoke_binding(
            &self.state,
            &req.name,
            &req.operation,
            Bytes::from(req.data),
            &metadata,
        )
        .await?
        .unwrap_or_default();
        ok(runtime::InvokeBindingResponse {
            data: res.data.to_vec(),
            metadata: res.metadata.into_iter().collect(),
        })
    }

    async fn get_secret(
        &self,
        request: tonic::Request<runtime::GetSecretRequest>,
    ) -> Reply<runtime::GetSecretResponse> {
        let req = request.into_inner();
        let data = ops::secret(&self.state, &req.store_name, &req.key)?
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        ok(runtime::GetSecretResponse { data })
    }

    async fn get_bulk_secret(
        &self,
        request: tonic::Request<runtime::GetBulkSecretRequest>,
    ) -> Reply<runtime::GetBulkSecretResponse> {
        let req = request.into_inner();
        let data = ops::bulk_secrets(&self.state, &req.store_name)?
            .into_iter()
            .map(|(name, secret)| {
                (
                    name,
                    runtime::SecretResponse {
                        secrets: secret.into_iter().collect(),
                    },
                )
            })
            .collect();
        ok(runtime::GetBulkSecretResponse { data })
    }

    async fn get_configuration(
        &self,
        request: tonic::Request<runtime::GetConfigurationRequest>,
    ) -> Reply<runtime::GetConfigurationResponse> {
        let req = request.into_inner();
        let items = ops::get_configuration(&self.state, &req.store_name, &req.keys).await?;
        ok(runtime::GetConfigurationResponse {
            items: configuration_items(items),
        })
    }

    type SubscribeConfigurationStream = Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<runtime::SubscribeConfigurationResponse, Status>>
                + Send,
        >,
    >;

    async fn subscribe_configuration(
        &self,
        request: tonic::Request<runtime::SubscribeConfigurationRequest>,
    ) -> Reply<Self::SubscribeConfigurationStream> {
        let req = request.into_inner();
        let metadata = sorted(req.metadata);
        let (id, mut changes) =
            ops::subscribe_configuration(&self.state, &req.store_name, req.keys, &metadata).await?;
        // As daprd: the first frame carries only the watch's id, then one per change. The
        // stream ends when the watch is unsubscribed; the watch ends when the client goes.
        let stream = async_stream_of(id.clone(), move |tx| async move {
            loop {
                // A client that goes away ends the watch now, not at the key's next change
                // (which may never come): its Redis connections and tasks are released.
                let items = tokio::select! {
                    _ = tx.closed() => return,
                    items = changes.recv() => match items {
                        Some(items) => items,
                        None => return,
                    },
                };
                let frame = runtime::SubscribeConfigurationResponse {
                    id: id.clone(),
                    items: configuration_items(items),
                };
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        ok(stream)
    }

    async fn unsubscribe_configuration(
        &self,
        request: tonic::Request<runtime::UnsubscribeConfigurationRequest>,
    ) -> Reply<runtime::UnsubscribeConfigurationResponse> {
        let req = request.into_inner();
        ok(
            match ops::unsubscribe_configuration(&self.state, &req.store_name, &req.id) {
                Ok(()) => runtime::UnsubscribeConfigurationResponse {
                    ok: true,
                    message: String::new(),
                },
                Err(e @ ApiError::Failed { .. }) => runtime::UnsubscribeConfigurationResponse {
                    ok: false,
                    message: e.to_string(),
                },
                Err(e) => return Err(e.into()),
            },
        )
    }

    async fn get_configuration_alpha1(
        &self,
        request: tonic::Request<runtime::GetConfigurationRequest>,
    ) -> Reply<runtime::GetConfigurationResponse> {
        self.get_configuration(request).await
    }

    type SubscribeConfigurationAlpha1Stream = Self::SubscribeConfigurationStream;

    async fn subscribe_configuration_alpha1(
        &self,
        request: tonic::Request<runtime::SubscribeConfigurationRequest>,
    ) -> Reply<Self::SubscribeConfigurationAlpha1Stream> {
        self.subscribe_configuration(request).await
    }

    async fn unsubscribe_configuration_alpha1(
        &self,
        request: tonic::Request<runtime::UnsubscribeConfigurationRequest>,
    ) -> Reply<runtime::UnsubscribeConfigurationResponse> {
        self.unsubscribe_configuration(request).await
    }

    async fn try_lock_alpha1(
        &self,
        request: tonic::Request<runtime::TryLockRequest>,
    ) -> Reply<runtime::TryLockResponse> {
        let req = request.into_inner();
        let success = ops::try_lock(
            &self.state,
            &req.store_name,
            &req.resource_id,
            &req.lock_owner,
            req.expiry_in_seconds,
        )
        .await?;
        ok(runtime::TryLockResponse { success })
    }

    async fn unlock_alpha1(
        &self,
        request: tonic::Request<runtime::UnlockRequest>,
    ) -> Reply<runtime::UnlockResponse> {
        let req = request.into_inner();
        let status = ops::unlock(
            &self.state,
            &req.store_name,
            &req.resource_id,
            &req.lock_owner,
        )
        .await?;
        ok(runtime::UnlockResponse {
            status: status as i32,
        })
    }

    async fn get_metadata(
        &self,
        _request: tonic::Request<runtime::GetMetadataRequest>,
    ) -> Reply<runtime::GetMetadataResponse> {
        let st = &self.state;
        let registered_components = ops::components(st)
            .into_iter()
            .map(|c| runtime::RegisteredComponents {
                name: c.name.to_string(),
                r#type: c.kind.to_string(),
                version: c.version.to_string(),
                capabilities: c.capabilities.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        let subscriptions = st
            .pubsub
            .subscriptions()
            .iter()
            .map(|s| runtime::PubsubSubscription {
                pubsub_name: s.pubsubname.clone(),
                topic: s.topic.clone(),
                metadata: s.metadata.clone().into_iter().collect(),
                rules: Some(runtime::PubsubSubscriptionRules {
                    rules: s
                        .rules
                        .iter()
                        .map(|r| runtime::PubsubSubscriptionRule {
                            r#match: r.text.clone(),
                            path: r.path.clone(),
                        })
                        .collect(),
                }),
                dead_letter_topic: s.dead_letter_topic.clone().unwrap_or_default(),
                r#type: match s.source {
                    Source::Declarative => runtime::PubsubSubscriptionType::Declarative,
                    Source::Programmatic => runtime::PubsubSubscriptionType::Programmatic,
                    Source::Streaming => runtime::PubsubSubscriptionType::Streaming,
                } as i32,
            })
            .collect();
        let app_connection_properties =
            ops::app_connection(st).map(|c| runtime::AppConnectionProperties {
                port: i32::from(c.port),
                protocol: c.protocol.to_string(),
                channel_address: c.channel_address,
                ..Default::default()
            });
        ok(runtime::GetMetadataResponse {
            id: st.config.app_id.clone(),
            registered_components,
            extended_metadata: ops::extended(st).into_iter().collect(),
            subscriptions,
            app_connection_properties,
            runtime_version: ops::RUNTIME_VERSION.to_string(),
            ..Default::default()
        })
    }

    async fn set_metadata(
        &self,
        request: tonic::Request<runtime::SetMetadataRequest>,
    ) -> Reply<()> {
        let req = request.into_inner();
        ops::set_metadata(&self.state, req.key, req.value);
        ok(())
    }

    async fn shutdown(&self, _request: tonic::Request<runtime::ShutdownRequest>) -> Reply<()> {
        ops::shutdown(&self.state, true);
        ok(())
    }
}

/// Configuration items as the gRPC messages carry them.
fn configuration_items(
    items: BTreeMap<String, crate::bridge::configuration::ConfigItem>,
) -> HashMap<String, common::ConfigurationItem> {
    items
        .into_iter()
        .map(|(k, i)| {
            (
                k,
                common::ConfigurationItem {
                    value: i.value,
                    version: i.version,
                    metadata: i.metadata.into_iter().collect(),
                },
            )
        })
        .collect()
}

/// A server stream whose first frame is the watch `id` (no items), then what `feed` sends.
fn async_stream_of<F, Fut>(
    id: String,
    feed: F,
) -> Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<runtime::SubscribeConfigurationResponse, Status>>
            + Send,
    >,
>
where
    F: FnOnce(
        tokio::sync::mpsc::Sender<Result<runtime::SubscribeConfigurationResponse, Status>>,
    ) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let first = runtime::SubscribeConfigurationResponse {
        id,
        items: HashMap::new(),
    };
    let _ = tx.try_send(Ok(first));
    tokio::spawn(feed(tx));
    Box::pin(ReceiverStream(rx))
}

/// An mpsc receiver as a stream.
struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> tokio_stream::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

impl Api {
    async fn bulk_publish(
        &self,
        request: tonic::Request<runtime::BulkPublishRequest>,
    ) -> Reply<runtime::BulkPublishResponse> {
        let (traceparent, tracestate) = trace(request.metadata());
        let req = request.into_inner();
        let entries = req
            .entries
            .into_iter()
            .map(|e| Entry {
                id: e.entry_id,
                content_type: if e.content_type.is_empty() {
                    crate::bridge::pubsub::cloudevent::DEFAULT_CONTENT_TYPE.to_string()
                } else {
                    e.content_type
                },
                data: e.event,
                metadata: sorted(e.metadata),
            })
            .collect();
        let failed = publish_entries(
            &self.state.pubsub,
            &req.pubsub_name,
            &req.topic,
            entries,
            &sorted(req.metadata),
            (traceparent.as_deref(), tracestate.as_deref()),
        )
        .await?;
        ok(runtime::BulkPublishResponse {
            failed_entries: failed
                .into_iter()
                .map(
                    |(entry_id, error)| runtime::BulkPublishResponseFailedEntry { entry_id, error },
                )
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gRPC proper is proxied as a stream; gRPC-Web (its own framing, or base64) is not.
    #[test]
    fn grpc_proper_is_not_grpc_web() {
        let req = |ct: &str| {
            Request::builder()
                .header(http::header::CONTENT_TYPE, ct)
                .body(())
                .unwrap()
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc_proper(&req(ct)), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpc-web-text",
            "application/grpc-web+proto",
            "application/grpcx",
            "application/json",
        ] {
            assert!(!is_grpc_proper(&req(ct)), "{ct}");
        }
        assert!(!is_grpc_proper(&Request::new(())));
    }

    /// `IMPLEMENTED` decides what reaches the generated server: it must name exactly the RPCs
    /// `proto/` declares (a new RPC would otherwise answer UNIMPLEMENTED, or an undeclared one
    /// reach the server's own empty UNIMPLEMENTED).
    #[test]
    fn implemented_is_the_declared_service() {
        let proto = include_str!("../../../proto/dapr/proto/runtime/v1/dapr.proto");
        let service = &proto[proto.find("service Dapr").expect("the Dapr service")..];
        let service = &service[..service.find("\n}").expect("its end")];
        let mut declared: Vec<&str> = service
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap().trim())
            .collect();
        let mut ours = IMPLEMENTED.to_vec();
        declared.sort_unstable();
        ours.sort_unstable();
        assert_eq!(declared, ours);
    }

    #[test]
    fn unserved_rpcs_name_their_building_block() {
        for (method, block) in [
            ("ScheduleJobAlpha1", "jobs"),
            ("InvokeActor", "actors"),
            ("StartWorkflowBeta1", "workflows"),
            ("EncryptAlpha1", "cryptography"),
            ("QueryStateAlpha1", "state query"),
        ] {
            assert_eq!(block_of(method), block, "{method}");
            assert!(unimplemented(method).message().contains(block));
        }
    }
}
