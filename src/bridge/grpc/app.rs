//! Calls to an app that speaks gRPC (`app.protocol: grpc`, Dapr's `--app-protocol grpc`): its
//! `AppCallback` service gives its subscriptions (`ListTopicSubscriptions`), takes events
//! (`OnTopicEvent`, answering SUCCESS, RETRY or DROP) and invocations of our own app id
//! (`OnInvoke`). Pub/sub ([`crate::bridge::pubsub`]) and invocation
//! ([`crate::bridge::invoke`]) call these instead of their HTTP requests.

use std::time::Duration;

use bytes::Bytes;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::common;
use super::runtime::app_callback_client::AppCallbackClient;
use super::runtime::topic_event_response::TopicEventResponseStatus;
use crate::bridge::pubsub::subscription::{self, Subscription};
use crate::bridge::pubsub::{AppStatus, StreamEvent};

/// A gRPC channel to the app (one HTTP/2 connection, opened on first use and re-opened after
/// a failure).
#[derive(Clone, Debug)]
pub struct GrpcApp {
    client: AppCallbackClient<Channel>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
}

impl GrpcApp {
    /// `address` is the app's `host:port`; `token` is sent as `dapr-api-token`.
    pub fn new(address: &str, token: Option<&str>, timeout: Duration) -> Result<GrpcApp, String> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("app address {address}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        Ok(GrpcApp {
            client: AppCallbackClient::new(endpoint.connect_lazy()),
            token: token.and_then(|t| t.parse().ok()),
            timeout,
        })
    }

    /// The same channel with another per-call timeout (deliveries and invocations differ).
    pub fn with_timeout(&self, timeout: Duration) -> GrpcApp {
        GrpcApp {
            timeout,
            ..self.clone()
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.timeout);
        if let Some(t) = &self.token {
            req.metadata_mut()
                .insert(crate::bridge::TOKEN_HEADER, t.clone());
        }
        req
    }

    /// `ListTopicSubscriptions`: the app's subscriptions; an app that does not implement it
    /// has none. Subscriptions that cannot be used are skipped with the reason in the list.
    pub async fn subscriptions(&self) -> Result<(Vec<Subscription>, Vec<String>), String> {
        let res = match self
            .client
            .clone()
            .list_topic_subscriptions(self.request(()))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::Unimplemented => return Ok((Vec::new(), Vec::new())),
            Err(s) => return Err(describe(&s)),
        };
        let mut subs = Vec::new();
        let mut errors = Vec::new();
        for s in res.subscriptions {
            let routes = s.routes.unwrap_or_default();
            match subscription::from_app_callback(
                s.pubsub_name,
                s.topic,
                s.metadata.into_iter().collect(),
                routes
                    .rules
                    .into_iter()
                    .map(|r| (r.r#match, r.path))
                    .collect(),
                routes.default,
                s.dead_letter_topic,
            ) {
                Ok(sub) => subs.push(sub),
                Err(e) => errors.push(e),
            }
        }
        Ok((subs, errors))
    }

    /// `OnTopicEvent` with one CloudEvent, routed to `path`; the app's answer as Dapr reads
    /// it: a status, or RETRY for an error (DROP when the app says it has no such handler).
    pub async fn deliver(&self, event: StreamEvent, path: &str) -> AppStatus {
        // The message's metadata and the event's trace context travel as call metadata (as
        // daprd sends them; over HTTP they are headers).
        let mut extra = Vec::new();
        for k in ["traceparent", "tracestate"] {
            if let Some(serde_json::Value::String(v)) = event.event.get(k) {
                extra.push((k.to_string(), v.clone()));
            }
        }
        extra.extend(event.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut req = super::subscribe::topic_event(event);
        req.path = path.to_string();
        let mut req = self.request(req);
        for (k, v) in extra {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()),
                tonic::metadata::MetadataValue::try_from(v.as_str()),
            ) && super::forwardable(k.as_str())
            {
                req.metadata_mut().insert(k, v);
            }
        }
        match self.client.clone().on_topic_event(req).await {
            Ok(r) => match TopicEventResponseStatus::try_from(r.into_inner().status) {
                Ok(TopicEventResponseStatus::Success) => AppStatus::Success,
                Ok(TopicEventResponseStatus::Drop) => AppStatus::Drop,
                Ok(TopicEventResponseStatus::Retry) | Err(_) => AppStatus::Retry,
            },
            Err(s) => {
                tracing::warn!(path, error = %describe(&s), "delivery to the gRPC app failed; will retry");
                AppStatus::Retry
            }
        }
    }

    /// `OnInvoke`: an invocation of our own app id. Returns the body and its content type.
    pub async fn invoke(
        &self,
        method: &str,
        verb: &http::Method,
        query: &str,
        content_type: &str,
        body: Bytes,
        headers: &http::HeaderMap,
    ) -> Result<(Bytes, String), Status> {
        use common::http_extension::Verb;
        let verb = match *verb {
            http::Method::GET => Verb::Get,
            http::Method::HEAD => Verb::Head,
            http::Method::POST => Verb::Post,
            http::Method::PUT => Verb::Put,
            http::Method::DELETE => Verb::Delete,
            http::Method::CONNECT => Verb::Connect,
            http::Method::OPTIONS => Verb::Options,
            http::Method::TRACE => Verb::Trace,
            http::Method::PATCH => Verb::Patch,
            _ => Verb::None,
        };
        let message = common::InvokeRequest {
            method: method.trim_start_matches('/').to_string(),
            data: Some(prost_types::Any {
                type_url: String::new(),
                value: body.to_vec(),
            }),
            content_type: content_type.to_string(),
            http_extension: Some(common::HttpExtension {
                verb: verb as i32,
                querystring: query.to_string(),
            }),
        };
        let mut req = self.request(message);
        // The caller's headers travel as metadata (those that are valid metadata; hop-by-hop
        // headers were removed by the caller).
        for (name, value) in headers {
            if !super::forwardable(name.as_str()) {
                continue;
            }
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
                tonic::metadata::MetadataValue::try_from(value.as_bytes()),
            ) {
                req.metadata_mut().append(k, v);
            }
        }
        let res = self.client.clone().on_invoke(req).await?.into_inner();
        let body = res.data.map(|a| a.value).unwrap_or_default();
        Ok((Bytes::from(body), res.content_type))
    }
}

impl GrpcApp {
    /// `ListInputBindings`: the input bindings the app listens to (an app that does not
    /// implement it listens to none).
    pub async fn input_bindings(&self) -> Result<Vec<String>, String> {
        match self
            .client
            .clone()
            .list_input_bindings(self.request(()))
            .await
        {
            Ok(r) => Ok(r.into_inner().bindings),
            Err(s) if s.code() == Code::Unimplemented => Ok(Vec::new()),
            Err(s) => Err(describe(&s)),
        }
    }

    /// `OnBindingEvent`: one event of input binding `name`; an error status is a failed
    /// delivery.
    pub async fn binding_event(
        &self,
        name: &str,
        data: Bytes,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), String> {
        let req = self.request(super::runtime::BindingEventRequest {
            name: name.to_string(),
            data: data.to_vec(),
            metadata: metadata.clone().into_iter().collect(),
        });
        self.client
            .clone()
            .on_binding_event(req)
            .await
            .map(drop)
            .map_err(|s| describe(&s))
    }
}

/// A status for logs and errors: its code and message.
fn describe(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}
