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

/// Why a publish request failed, with Dapr's error code and status.
#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    #[error("no pubsub is configured")]
    NotConfigured,
    #[error("pubsub name is empty")]
    PubsubEmpty,
    #[error("pubsub {0} not found")]
    NotFound(String),
    #[error("topic is empty in pubsub {0}")]
    TopicEmpty(String),
    #[error("failed deserializing metadata: {0}")]
    Metadata(String),
    #[error("cannot create cloudevent: {0}")]
    CloudEvent(String),
    #[error("error when publish to topic {topic} in pubsub {pubsub}: {error}")]
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
    #[error("entryId is duplicated or not present for entry {0}")]
    BulkEntryId(usize),
}

impl PubSubError {
    /// Dapr's `errorCode`.
    pub fn code(&self) -> &'static str {
        match self {
            PubSubError::NotConfigured => "ERR_PUBSUB_NOT_CONFIGURED",
            PubSubError::PubsubEmpty => "ERR_PUBSUB_EMPTY",
            PubSubError::NotFound(_) => "ERR_PUBSUB_NOT_FOUND",
            PubSubError::TopicEmpty(_) => "ERR_TOPIC_EMPTY",
            PubSubError::Metadata(_) => "ERR_PUBSUB_REQUEST_METADATA",
            PubSubError::CloudEvent(_) => "ERR_PUBSUB_CLOUD_EVENTS_SER",
            PubSubError::Publish { .. } => "ERR_PUBSUB_PUBLISH_MESSAGE",
            PubSubError::BulkBody { .. } | PubSubError::BulkEntryId(_) => "ERR_PUBSUB_EVENTS_SER",
        }
    }

    /// Dapr's HTTP status for it.
    pub fn status(&self) -> StatusCode {
        match self {
            PubSubError::NotConfigured | PubSubError::NotFound(_) => StatusCode::BAD_REQUEST,
            PubSubError::PubsubEmpty | PubSubError::TopicEmpty(_) => StatusCode::NOT_FOUND,
            PubSubError::Metadata(_)
            | PubSubError::BulkBody { .. }
            | PubSubError::BulkEntryId(_) => StatusCode::BAD_REQUEST,
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

fn truthy(v: Option<&String>) -> bool {
    v.is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn check<'a>(ps: &PubSub, pubsub: &str, topic: &'a str) -> Result<&'a str, PubSubError> {
    if ps.is_empty() {
        return Err(PubSubError::NotConfigured);
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
    let data = event_bytes(&p, truthy(metadata.get("rawPayload")))?;
    ps.publish_bytes(&pubsub, topic, data, &metadata)
        .await
        .map_err(|e| PubSubError::Publish {
            pubsub: pubsub.clone(),
            topic: topic.to_string(),
            error: e.to_string(),
        })?;
    Ok(StatusCode::NO_CONTENT)
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
    let mut ids = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        if e.entry_id.is_empty() || !ids.insert(e.entry_id.as_str()) {
            return Err(PubSubError::BulkEntryId(i));
        }
    }
    // Build every event first: a bad entry fails the request before anything is published.
    let mut prepared = Vec::with_capacity(entries.len());
    for e in &entries {
        let content_type = match (e.content_type.as_str(), &e.event) {
            ("", Value::String(_)) => cloudevent::DEFAULT_CONTENT_TYPE,
            ("", _) => "application/json",
            (c, _) => c,
        };
        let data = match &e.event {
            Value::String(s)
                if !cloudevent::is_json(content_type)
                    && !cloudevent::is_cloudevent(content_type) =>
            {
                s.as_bytes().to_vec()
            }
            other => serde_json::to_vec(other).unwrap_or_default(),
        };
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
        let bytes = event_bytes(&p, truthy(md.get("rawPayload")))?;
        prepared.push((e.entry_id.as_str(), bytes, md));
    }
    let mut failed = Vec::new();
    for (id, bytes, md) in prepared {
        if let Err(e) = ps.publish_bytes(&pubsub, topic, bytes, &md).await {
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
