//! The publish routes of Dapr's HTTP API: `POST|PUT /v1.0/publish/{pubsub}/{topic…}` and bulk
//! publish under `v1.0-alpha1` (and `v1.0`), with `metadata.*` query parameters, and the
//! [`PubSubError`] they answer with (`{"errorCode","message"}` and Dapr's status codes).
//! [`publish_event`] and [`publish_entries`] are the publish core, called by gRPC too.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::PubSub;
use super::cloudevent::{self, Publish};

/// Why a publish request failed, with Dapr's error code, status and message (as its runtime's
/// `pkg/api/errors/pubsub.go` has them).
#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    #[error("pubsub {0} is not configured")]
    NotConfigured(String),
    #[error("pubsub name is empty")]
    PubsubEmpty,
    #[error("pubsub {0} is not found")]
    NotFound(String),
    #[error("topic is empty in pubsub {0}")]
    TopicEmpty(String),
    #[error("failed deserializing metadata. Error: {0}")]
    Metadata(String),
    #[error("cannot create cloudevent: {0}")]
    CloudEvent(String),
    #[error("error when publishing to topic {topic} in pubsub {pubsub}: {error}")]
    Publish {
        pubsub: String,
        topic: String,
        error: String,
    },
    #[error("error when unmarshaling the request for topic {topic} pubsub {pubsub}: {error}")]
    BulkBody {
        pubsub: String,
        topic: String,
        error: String,
    },
    #[error("error marshaling events to bytes for topic {topic} pubsub {pubsub}. error: {error}")]
    BulkEntry {
        pubsub: String,
        topic: String,
        error: String,
    },
}

impl PubSubError {
    /// Dapr's `errorCode`.
    pub fn code(&self) -> &'static str {
        match self {
            PubSubError::NotConfigured(_) => "ERR_PUBSUB_NOT_CONFIGURED",
            PubSubError::PubsubEmpty => "ERR_PUBSUB_EMPTY",
            PubSubError::NotFound(_) => "ERR_PUBSUB_NOT_FOUND",
            PubSubError::TopicEmpty(_) => "ERR_TOPIC_NAME_EMPTY",
            PubSubError::Metadata(_) => "ERR_PUBSUB_REQUEST_METADATA",
            PubSubError::CloudEvent(_) => "ERR_PUBSUB_CLOUD_EVENTS_SER",
            PubSubError::Publish { .. } => "ERR_PUBSUB_PUBLISH_MESSAGE",
            PubSubError::BulkBody { .. } | PubSubError::BulkEntry { .. } => "ERR_PUBSUB_EVENTS_SER",
        }
    }

    /// Dapr's HTTP status for it.
    pub fn status(&self) -> StatusCode {
        match self {
            PubSubError::PubsubEmpty | PubSubError::NotFound(_) | PubSubError::TopicEmpty(_) => {
                StatusCode::NOT_FOUND
            }
            PubSubError::NotConfigured(_)
            | PubSubError::Metadata(_)
            | PubSubError::BulkBody { .. }
            | PubSubError::BulkEntry { .. } => StatusCode::BAD_REQUEST,
            PubSubError::CloudEvent(_) | PubSubError::Publish { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for PubSubError {
    fn into_response(self) -> Response {
        (
            self.status(),
            Json(json!({"errorCode": self.code(), "message": self.to_string()})),
        )
            .into_response()
    }
}

/// The publish routes, state applied (merge into the bridge's router).
pub fn router(pubsub: Arc<PubSub>) -> Router {
    Router::new()
        .route(
            "/v1.0/publish/{pubsubname}/{*topic}",
            post(publish).put(publish),
        )
        .route("/v1.0/publish/{pubsubname}", post(no_topic).put(no_topic))
        .route("/v1.0/publish/{pubsubname}/", post(no_topic).put(no_topic))
        .route(
            "/v1.0-alpha1/publish/bulk/{pubsubname}/{*topic}",
            post(bulk_publish).put(bulk_publish),
        )
        .route(
            "/v1.0/publish/bulk/{pubsubname}/{*topic}",
            post(bulk_publish).put(bulk_publish),
        )
        .with_state(pubsub)
}

type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// `metadata.<k>=<v>` query parameters; the first value of a key wins.
fn metadata(params: Params) -> Result<BTreeMap<String, String>, PubSubError> {
    let Query(pairs) = params.map_err(|e| PubSubError::Metadata(e.body_text()))?;
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if let Some(k) = k.strip_prefix("metadata.") {
            out.entry(k.to_string()).or_insert(v);
        }
    }
    Ok(out)
}

/// `rawPayload` as Go's `strconv.ParseBool` reads it (absent or empty: false).
fn raw_payload(metadata: &BTreeMap<String, String>) -> Result<bool, PubSubError> {
    match metadata.get("rawPayload").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(PubSubError::Metadata(format!(
            "rawPayload value must be a valid boolean: actual is '{other}'"
        ))),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn check<'a>(ps: &PubSub, pubsub: &str, topic: &'a str) -> Result<&'a str, PubSubError> {
    if ps.is_empty() {
        return Err(PubSubError::NotConfigured(pubsub.to_string()));
    }
    if pubsub.is_empty() {
        return Err(PubSubError::PubsubEmpty);
    }
    if ps.broker(pubsub).is_none() {
        return Err(PubSubError::NotFound(pubsub.to_string()));
    }
    if topic.is_empty() {
        return Err(PubSubError::TopicEmpty(pubsub.to_string()));
    }
    Ok(topic)
}

async fn no_topic(
    State(ps): State<Arc<PubSub>>,
    Path(pubsub): Path<String>,
) -> Result<StatusCode, PubSubError> {
    check(&ps, &pubsub, "")?;
    Ok(StatusCode::NO_CONTENT)
}

/// The bytes to store for one event: raw, the caller's CloudEvent completed, or a new envelope.
fn event_bytes(p: &Publish, raw: bool) -> Result<Bytes, PubSubError> {
    if raw {
        return Ok(Bytes::copy_from_slice(p.data));
    }
    let ce = if p.content_type.is_some_and(cloudevent::is_cloudevent) {
        cloudevent::pass_through(p).map_err(PubSubError::CloudEvent)?
    } else {
        cloudevent::envelope(p)
    };
    serde_json::to_vec(&ce)
        .map(Bytes::from)
        .map_err(|e| PubSubError::CloudEvent(e.to_string()))
}

async fn publish(
    State(ps): State<Arc<PubSub>>,
    Path((pubsub, topic)): Path<(String, String)>,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, PubSubError> {
    check(&ps, &pubsub, &topic)?;
    let metadata = metadata(params)?;
    let trace = (
        header(&headers, "traceparent"),
        header(&headers, "tracestate"),
    );
    publish_event(
        &ps,
        &pubsub,
        &topic,
        header(&headers, "content-type"),
        &body,
        &metadata,
        trace,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Publishes one event (the HTTP route and gRPC's `PublishEvent`): checks the names, wraps the
/// data in a CloudEvent (or completes the caller's, or sends it raw with `rawPayload`), and
/// hands it to the broker.
pub async fn publish_event(
    ps: &PubSub,
    pubsub: &str,
    topic: &str,
    content_type: Option<&str>,
    data: &[u8],
    metadata: &BTreeMap<String, String>,
    trace: (Option<&str>, Option<&str>),
) -> Result<(), PubSubError> {
    let topic = check(ps, pubsub, topic)?;
    let p = Publish {
        app_id: ps.app_id(),
        pubsub,
        topic,
        content_type,
        data,
        traceparent: trace.0,
        tracestate: trace.1,
        metadata,
    };
    let data = event_bytes(&p, raw_payload(metadata)?)?;
    ps.publish_bytes(pubsub, topic, data, metadata)
        .await
        .map_err(|e| PubSubError::Publish {
            pubsub: pubsub.to_string(),
            topic: topic.to_string(),
            error: e.to_string(),
        })
}

/// One entry of a bulk publish, its event already in bytes.
pub struct Entry {
    pub id: String,
    pub content_type: String,
    pub data: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
}

/// Publishes a batch (the HTTP bulk route and gRPC's `BulkPublishEvent`): every entry is
/// checked and enveloped first, so a bad one fails the request before anything is published;
/// then each is published and the failed ones are returned with their errors.
pub async fn publish_entries(
    ps: &PubSub,
    pubsub: &str,
    topic: &str,
    entries: Vec<Entry>,
    metadata: &BTreeMap<String, String>,
    trace: (Option<&str>, Option<&str>),
) -> Result<Vec<(String, String)>, PubSubError> {
    let topic = check(ps, pubsub, topic)?;
    let raw = raw_payload(metadata)?;
    let entry_error = |error: String| PubSubError::BulkEntry {
        pubsub: pubsub.to_string(),
        topic: topic.to_string(),
        error,
    };
    let mut ids = HashSet::new();
    let mut prepared = Vec::with_capacity(entries.len());
    for e in &entries {
        if e.id.is_empty() || !ids.insert(e.id.as_str()) {
            return Err(entry_error(
                "entryId is duplicated or not present for entry".to_string(),
            ));
        }
        // Entry metadata overrides the request's.
        let mut md = metadata.clone();
        md.extend(e.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        let p = Publish {
            app_id: ps.app_id(),
            pubsub,
            topic,
            content_type: Some(e.content_type.as_str()),
            data: &e.data,
            traceparent: trace.0,
            tracestate: trace.1,
            metadata: &md,
        };
        let bytes = event_bytes(&p, raw)?;
        prepared.push((e.id.as_str(), bytes, md));
    }
    let mut failed = Vec::new();
    // One deadline for the whole request: entries after a broker that stopped answering fail
    // at once instead of waiting in turn.
    let deadline = tokio::time::Instant::now() + super::PUBLISH_TIMEOUT;
    for (id, bytes, md) in prepared {
        if let Err(e) = ps
            .publish_bytes_by(deadline, pubsub, topic, bytes, &md)
            .await
        {
            failed.push((id.to_string(), e.to_string()));
        }
    }
    Ok(failed)
}

/// A bulk entry's `event` as bytes, by its content type (Dapr's `ConvertEventToBytes`): JSON and
/// CloudEvents types take any JSON value; binary types a base64 string; other types (text, XML,
/// none) a string.
fn event_to_bytes(event: &Value, content_type: &str) -> Result<Vec<u8>, String> {
    if cloudevent::is_json(content_type) || cloudevent::is_cloudevent(content_type) {
        return serde_json::to_vec(event).map_err(|e| e.to_string());
    }
    let Value::String(s) = event else {
        return Err(format!(
            "expected a string event for content type {content_type:?}, found {}",
            cloudevent::kind_of(event)
        ));
    };
    if cloudevent::is_binary(content_type) {
        use base64::Engine;
        return base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| {
                format!("expected a base64 event for content type {content_type:?}: {e}")
            });
    }
    Ok(s.as_bytes().to_vec())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkEntry {
    #[serde(default)]
    entry_id: String,
    event: Value,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

async fn bulk_publish(
    State(ps): State<Arc<PubSub>>,
    Path((pubsub, topic)): Path<(String, String)>,
    params: Params,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, PubSubError> {
    let topic = check(&ps, &pubsub, &topic)?;
    let metadata = metadata(params)?;
    // Field names matched as daprd's Go decoder does (the JS SDK sends `entryID`).
    let entries: Vec<BulkEntry> =
        crate::bridge::field_case::canonical(&body, &crate::bridge::field_case::BULK_PUBLISH)
            .and_then(|text| serde_json::from_str(&text))
            .map_err(|e| PubSubError::BulkBody {
                pubsub: pubsub.clone(),
                topic: topic.to_string(),
                error: e.to_string(),
            })?;
    raw_payload(&metadata)?;
    let mut converted = Vec::with_capacity(entries.len());
    for e in entries {
        // Without a contentType, a string is text and anything else JSON.
        let content_type = match (e.content_type.as_str(), &e.event) {
            ("", Value::String(_)) => cloudevent::DEFAULT_CONTENT_TYPE,
            ("", _) => "application/json",
            (c, _) => c,
        };
        let data =
            event_to_bytes(&e.event, content_type).map_err(|error| PubSubError::BulkEntry {
                pubsub: pubsub.clone(),
                topic: topic.to_string(),
                error,
            })?;
        converted.push(Entry {
            id: e.entry_id,
            content_type: content_type.to_string(),
            data,
            metadata: e.metadata,
        });
    }
    let trace = (
        header(&headers, "traceparent"),
        header(&headers, "tracestate"),
    );
    let failed = publish_entries(&ps, &pubsub, topic, converted, &metadata, trace).await?;
    if failed.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let failed: Vec<Value> = failed
        .into_iter()
        .map(|(id, error)| json!({"entryId": id, "error": error}))
        .collect();
    Ok((
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"failedEntries": failed, "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE"})),
    )
        .into_response())
}
