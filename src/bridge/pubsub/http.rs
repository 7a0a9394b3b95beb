//! The publish routes of Dapr's HTTP API: `POST|PUT /v1.0/publish/{pubsub}/{topic…}` and bulk
//! publish under `v1.0-alpha1` (and `v1.0`), with `metadata.*` query parameters, and the
//! [`PubSubError`] they answer with (`{"errorCode","message"}` and Dapr's status codes).

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
    let topic = check(&ps, &pubsub, &topic)?;
    let metadata = metadata(params)?;
    let p = Publish {
        app_id: ps.app_id(),
        pubsub: &pubsub,
        topic,
        content_type: header(&headers, "content-type"),
        data: &body,
        traceparent: header(&headers, "traceparent"),
        tracestate: header(&headers, "tracestate"),
        metadata: &metadata,
    };
    let data = event_bytes(&p, raw_payload(&metadata)?)?;
    ps.publish_bytes(&pubsub, topic, data, &metadata)
        .await
        .map_err(|e| PubSubError::Publish {
            pubsub: pubsub.clone(),
            topic: topic.to_string(),
            error: e.to_string(),
        })?;
    Ok(StatusCode::NO_CONTENT)
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
    let entries: Vec<BulkEntry> =
        serde_json::from_slice(&body).map_err(|e| PubSubError::BulkBody {
            pubsub: pubsub.clone(),
            topic: topic.to_string(),
            error: e.to_string(),
        })?;
    let raw = raw_payload(&metadata)?;
    let entry_error = |error: String| PubSubError::BulkEntry {
        pubsub: pubsub.clone(),
        topic: topic.to_string(),
        error,
    };
    let mut ids = HashSet::new();
    // Build every event first: a bad entry fails the request before anything is published.
    let mut prepared = Vec::with_capacity(entries.len());
    for e in &entries {
        // Without a contentType, a string is text and anything else JSON.
        let content_type = match (e.content_type.as_str(), &e.event) {
            ("", Value::String(_)) => cloudevent::DEFAULT_CONTENT_TYPE,
            ("", _) => "application/json",
            (c, _) => c,
        };
        let data = event_to_bytes(&e.event, content_type).map_err(&entry_error)?;
        if e.entry_id.is_empty() || !ids.insert(e.entry_id.as_str()) {
            return Err(entry_error(
                "entryId is duplicated or not present for entry".to_string(),
            ));
        }
        // Entry metadata overrides the request's.
        let mut md = metadata.clone();
        md.extend(e.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        let p = Publish {
            app_id: ps.app_id(),
            pubsub: &pubsub,
            topic,
            content_type: Some(content_type),
            data: &data,
            traceparent: header(&headers, "traceparent"),
            tracestate: header(&headers, "tracestate"),
            metadata: &md,
        };
        let bytes = event_bytes(&p, raw)?;
        prepared.push((e.entry_id.as_str(), bytes, md));
    }
    let mut failed = Vec::new();
    // One deadline for the whole request: entries after a broker that stopped answering fail
    // at once instead of waiting in turn.
    let deadline = tokio::time::Instant::now() + super::PUBLISH_TIMEOUT;
    for (id, bytes, md) in prepared {
        if let Err(e) = ps
            .publish_bytes_by(deadline, &pubsub, topic, bytes, &md)
            .await
        {
            failed.push(json!({"entryId": id, "error": e.to_string()}));
        }
    }
    if failed.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok((
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"failedEntries": failed, "errorCode": "ERR_PUBSUB_PUBLISH_MESSAGE"})),
    )
        .into_response())
}
