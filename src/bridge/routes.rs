//! The state, secrets, metadata, health and shutdown routes of the Dapr API. Bodies are read
//! up to `bridge.max_body`; every failure is an [`ApiError`] rendered as Dapr does.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::BridgeState;
use super::error::ApiError;
use super::field_case::{self, Shape};
use super::ops::{self, Item, Options, TxOp};

type St = State<Arc<BridgeState>>;

/// Every route but invocation (the fallback) and pub/sub.
pub fn routes() -> Router<Arc<BridgeState>> {
    Router::new()
        .route("/v1.0/healthz", get(healthz))
        .route("/v1.0/healthz/outbound", get(healthz))
        .route("/v1.0/metadata", get(metadata))
        .route("/v1.0/metadata/{key}", put(put_metadata))
        .route("/v1.0/shutdown", post(shutdown))
        .route("/v1.0/state/{store}", post(save).put(save))
        .route("/v1.0/state/{store}/bulk", post(bulk_get).put(bulk_get))
        .route(
            "/v1.0/state/{store}/transaction",
            post(transaction).put(transaction),
        )
        .route("/v1.0/state/{store}/{key}", get(get_state).delete(delete))
        .route("/v1.0/secrets/{store}/bulk", get(bulk_secrets))
        .route("/v1.0/secrets/{store}/{name}", get(get_secret))
}

/// Reads a request body up to `bridge.max_body`.
pub async fn read_body(state: &BridgeState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(limit)),
        Err(e) => Err(ApiError::Malformed(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// Parses a body whose field names are matched as daprd's Go decoder matches them (exact, then
/// ignoring case: see [`field_case`]).
fn parse_json<T: for<'a> Deserialize<'a>>(
    what: &str,
    shape: &Shape,
    body: &[u8],
) -> Result<T, ApiError> {
    let malformed = |e: serde_json::Error| {
        ApiError::Malformed(format!("expected {what}, found invalid JSON: {e}"))
    };
    let text = field_case::canonical(body, shape).map_err(malformed)?;
    serde_json::from_str(&text).map_err(malformed)
}

/// A state item as the HTTP API sends it: `value` is any JSON, stored as its text.
#[derive(Deserialize)]
struct SaveItem {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: Option<Box<RawValue>>,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    options: Option<Options>,
}

impl SaveItem {
    fn into_item(self) -> Item {
        let metadata = match self.metadata {
            Some(serde_json::Value::Object(m)) => m
                .into_iter()
                .filter_map(|(k, v)| match v {
                    serde_json::Value::String(s) => Some((k, s)),
                    _ => None,
                })
                .collect(),
            _ => Default::default(),
        };
        Item {
            key: self.key,
            value: self.value.map_or_else(
                || Bytes::from_static(b"null"),
                |v| Bytes::from(v.get().to_string()),
            ),
            etag: self.etag,
            options: self.options.unwrap_or_default(),
            metadata,
            json: true,
        }
    }
}

/// `metadata.<k>=<v>` query parameters (the first value of a key wins).
fn query_metadata(pairs: Vec<(String, String)>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if let Some(k) = k.strip_prefix("metadata.") {
            out.entry(k.to_string()).or_insert(v);
        }
    }
    out
}

/// Saves the items; `?metadata.k=v` applies to every item that does not set `k` itself (so
/// `?metadata.ttlInSeconds=60` gives them all a time to live).
async fn save(
    State(st): St,
    Path(name): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    body: Body,
) -> Result<Response, ApiError> {
    ops::state_store(&st, &name)?;
    let body = read_body(&st, body).await?;
    let items: Vec<SaveItem> = parse_json(
        "a JSON array of state items",
        &field_case::STATE_SAVE,
        &body,
    )?;
    let query = query_metadata(query);
    let items = items
        .into_iter()
        .map(|i| {
            let mut item = i.into_item();
            for (k, v) in &query {
                item.metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            item
        })
        .collect();
    ops::save(&st, &name, items).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The value, its `ETag`, and its response metadata as `metadata.<key>` headers (as daprd:
/// `metadata.ttlExpireTime` when it expires).
async fn get_state(
    State(st): St,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    match ops::get_entry(&st, &name, &key).await? {
        Some(entry) => {
            let metadata = entry.metadata();
            let mut response = (
                StatusCode::OK,
                [
                    (header::ETAG, entry.version.to_string()),
                    (header::CONTENT_TYPE, "application/json".to_string()),
                ],
                entry.value,
            )
                .into_response();
            for (k, v) in metadata {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::try_from(format!("metadata.{k}")),
                    header::HeaderValue::try_from(v),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            Ok(response)
        }
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[derive(Deserialize)]
struct BulkRequest {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default, rename = "parallelism")]
    _parallelism: Option<u32>,
}

async fn bulk_get(
    State(st): St,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    ops::state_store(&st, &name)?;
    let body = read_body(&st, body).await?;
    let req: BulkRequest = parse_json("{\"keys\": [...]}", &field_case::STATE_BULK_GET, &body)?;
    let items = ops::bulk_get(&st, &name, req.keys).await?;
    let out: Vec<serde_json::Value> = items
        .into_iter()
        .map(|ops::BulkItem { key, outcome }| match outcome {
            Ok(Some((value, version))) => {
                let data = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| RawValue::from_string(s.to_string()).ok())
                    .map(serde_json::to_value)
                    .and_then(Result::ok)
                    .unwrap_or_else(|| {
                        serde_json::Value::String(String::from_utf8_lossy(&value).into_owned())
                    });
                serde_json::json!({"key": key, "data": data, "etag": version.to_string()})
            }
            Ok(None) => serde_json::json!({ "key": key }),
            Err(e) => serde_json::json!({"key": key, "error": e}),
        })
        .collect();
    Ok(axum::Json(out).into_response())
}

async fn delete(
    State(st): St,
    Path((name, key)): Path<(String, String)>,
    Query(options): Query<Options>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    ops::state_store(&st, &name)?;
    let etag = headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().unwrap_or("\u{0}").to_string());
    ops::delete(&st, &name, &key, etag.as_deref(), &options).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct Transaction {
    #[serde(default)]
    operations: Vec<TransactionOp>,
}

#[derive(Deserialize)]
struct TransactionOp {
    operation: String,
    request: SaveItem,
}

async fn transaction(
    State(st): St,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    ops::state_store(&st, &name)?;
    let body = read_body(&st, body).await?;
    let tx: Transaction = parse_json(
        "{\"operations\": [...]}",
        &field_case::STATE_TRANSACTION,
        &body,
    )?;
    let ops = tx
        .operations
        .into_iter()
        .map(|op| TxOp::new(&op.operation, op.request.into_item()))
        .collect::<Result<Vec<_>, _>>()?;
    ops::transaction(&st, &name, ops).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_secret(
    State(st): St,
    Path((store, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    match ops::secret(&st, &store, &name)? {
        Some(secret) => Ok(axum::Json(secret).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn bulk_secrets(State(st): St, Path(store): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(ops::bulk_secrets(&st, &store)?).into_response())
}

async fn healthz(State(st): St) -> Response {
    if ops::ready(&st) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"errorCode": "ERR_HEALTH_NOT_READY", "message": "dapr is not ready"})),
        )
            .into_response()
    }
}

async fn metadata(State(st): St) -> Response {
    let components: Vec<serde_json::Value> = ops::components(&st)
        .into_iter()
        .map(|c| {
            let mut entry = serde_json::json!({
                "name": c.name,
                "type": c.kind,
                "version": c.version,
                "capabilities": c.capabilities,
            });
            // Ours (daprd reports no component health): SDKs ignore fields they do not know.
            if let Some(status) = &c.status {
                entry["status"] = status.word().into();
                if let Some(e) = status.error() {
                    entry["error"] = e.into();
                }
            }
            entry
        })
        .collect();
    let extended = ops::extended(&st);
    let subscriptions = st.pubsub.subscriptions_json();
    let mut body = serde_json::json!({
        "id": st.config.app_id,
        "runtimeVersion": ops::RUNTIME_VERSION,
        "enabledFeatures": [],
        "actors": [],
        "components": components,
        "extended": extended,
        "subscriptions": subscriptions,
        "httpEndpoints": [],
    });
    if let Some(c) = ops::app_connection(&st) {
        body["appConnectionProperties"] = serde_json::json!({
            "port": c.port,
            "protocol": c.protocol,
            "channelAddress": c.channel_address,
        });
    }
    axum::Json(body).into_response()
}

async fn put_metadata(
    State(st): St,
    Path(key): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&st, body).await?;
    ops::set_metadata(&st, key, String::from_utf8_lossy(&body).into_owned());
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1.0/shutdown`: the same graceful stop as SIGTERM (with `dapr-force-shutdown`, a
/// fast stop). Answers first; the stop runs after.
async fn shutdown(State(st): St, headers: HeaderMap) -> Response {
    ops::shutdown(&st, !headers.contains_key("dapr-force-shutdown"));
    StatusCode::NO_CONTENT.into_response()
}
