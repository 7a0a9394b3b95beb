//! The state, secrets, metadata, health and shutdown routes of the Dapr API. Bodies are read
//! up to `bridge.max_body`; every failure is an [`ApiError`] rendered as Dapr does.

use std::sync::Arc;
use std::sync::atomic::Ordering;

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

use super::error::ApiError;
use super::state::{Op, parse_etag};
use super::{BridgeState, StateStore};
use crate::runtime::Control;

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

fn parse_json<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("expected {what}, found invalid JSON: {e}")))
}

fn store<'a>(state: &'a BridgeState, name: &str) -> Result<&'a StateStore, ApiError> {
    if state.state_stores.is_empty() {
        return Err(ApiError::NotConfigured {
            block: "state",
            code: "ERR_STATE_STORE_NOT_CONFIGURED",
        });
    }
    state
        .state_stores
        .get(name)
        .ok_or_else(|| ApiError::StoreNotFound {
            block: "state",
            code: "ERR_STATE_STORE_NOT_FOUND",
            name: name.to_string(),
        })
}

/// The key as stored; with a prefix, a key may not contain the separator `||` (as daprd).
fn stored_key(store: &StateStore, key: &str) -> Result<String, ApiError> {
    if store.prefix != super::state::KeyPrefix::None && key.contains("||") {
        return Err(ApiError::Malformed(format!(
            "input key/keyPrefix {key:?} can't contain '||'"
        )));
    }
    Ok(store.prefix.apply(key))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Options {
    concurrency: Option<String>,
    consistency: Option<String>,
}

/// The version to check, from an etag and the options: last-write ignores the etag (as Dapr's
/// stores do); first-write (the default) with an etag requires it to match. No etag: no check.
fn etag_value(
    etag: Option<&str>,
    options: &Options,
    code: &'static str,
) -> Result<Option<u64>, ApiError> {
    match options.consistency.as_deref() {
        None | Some("" | "eventual" | "strong") => {}
        Some(other) => {
            return Err(ApiError::Malformed(format!(
                "expected consistency eventual or strong, found {other:?}"
            )));
        }
    }
    let last_write = match options.concurrency.as_deref() {
        None | Some("" | "first-write") => false,
        Some("last-write") => true,
        Some(other) => {
            return Err(ApiError::Malformed(format!(
                "expected concurrency first-write or last-write, found {other:?}"
            )));
        }
    };
    match etag {
        Some(e) if !e.is_empty() && !last_write => {
            parse_etag(e).map(Some).map_err(ApiError::state(code))
        }
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
struct SaveItem {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: Option<Box<RawValue>>,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default, rename = "metadata")]
    _metadata: Option<serde_json::Value>,
    #[serde(default)]
    options: Option<Options>,
}

/// An item's stored key and the version to check: the key is required, then the ETag and
/// options are checked, then the key's form (the order of the errors a client sees).
fn key_and_etag(
    store: &StateStore,
    item: &SaveItem,
    code: &'static str,
) -> Result<(String, Option<u64>), ApiError> {
    if item.key.is_empty() {
        return Err(ApiError::Malformed("\"key\" is a required field".into()));
    }
    let etag = etag_value(
        item.etag.as_deref(),
        item.options.as_ref().unwrap_or(&Options::default()),
        code,
    )?;
    Ok((stored_key(store, &item.key)?, etag))
}

fn upsert(store: &StateStore, item: SaveItem, code: &'static str) -> Result<Op, ApiError> {
    let (key, etag) = key_and_etag(store, &item, code)?;
    let value = item.value.map_or_else(
        || Bytes::from_static(b"null"),
        |v| Bytes::from(v.get().to_string()),
    );
    Ok(Op::Upsert { key, value, etag })
}

async fn save(State(st): St, Path(name): Path<String>, body: Body) -> Result<Response, ApiError> {
    let store = store(&st, &name)?;
    let body = read_body(&st, body).await?;
    let items: Vec<SaveItem> = parse_json("a JSON array of state items", &body)?;
    let ops = items
        .into_iter()
        .map(|i| upsert(store, i, "ERR_STATE_SAVE"))
        .collect::<Result<Vec<_>, _>>()?;
    store
        .store
        .apply(ops)
        .await
        .map_err(ApiError::state("ERR_STATE_SAVE"))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_state(
    State(st): St,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let store = store(&st, &name)?;
    match store
        .store
        .get(&stored_key(store, &key)?)
        .await
        .map_err(ApiError::state("ERR_STATE_GET"))?
    {
        Some((value, version)) => Ok((
            StatusCode::OK,
            [
                (header::ETAG, version.to_string()),
                (header::CONTENT_TYPE, "application/json".to_string()),
            ],
            value,
        )
            .into_response()),
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
    let store = store(&st, &name)?;
    let body = read_body(&st, body).await?;
    let req: BulkRequest = parse_json("{\"keys\": [...]}", &body)?;
    let mut out = Vec::with_capacity(req.keys.len());
    for key in req.keys {
        let item = match store.store.get(&stored_key(store, &key)?).await {
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
            Err(e) => serde_json::json!({"key": key, "error": e.to_string()}),
        };
        out.push(item);
    }
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize)]
struct DeleteQuery {
    concurrency: Option<String>,
    consistency: Option<String>,
}

async fn delete(
    State(st): St,
    Path((name, key)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let store = store(&st, &name)?;
    let etag = headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().unwrap_or("\u{0}").to_string());
    let options = Options {
        concurrency: q.concurrency,
        consistency: q.consistency,
    };
    let etag = etag_value(etag.as_deref(), &options, "ERR_STATE_DELETE")?;
    store
        .store
        .apply(vec![Op::Delete {
            key: stored_key(store, &key)?,
            etag,
        }])
        .await
        .map_err(ApiError::state("ERR_STATE_DELETE"))?;
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
    let store = store(&st, &name)?;
    let body = read_body(&st, body).await?;
    let tx: Transaction = parse_json("{\"operations\": [...]}", &body)?;
    let code = "ERR_STATE_TRANSACTION";
    let mut ops = Vec::with_capacity(tx.operations.len());
    for op in tx.operations {
        match op.operation.as_str() {
            "upsert" => ops.push(upsert(store, op.request, code)?),
            "delete" => {
                let (key, etag) = key_and_etag(store, &op.request, code)?;
                ops.push(Op::Delete { key, etag });
            }
            other => return Err(ApiError::UnsupportedOperation(other.to_string())),
        }
    }
    store
        .store
        .apply(ops)
        .await
        .map_err(ApiError::state(code))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn secret_store<'a>(
    st: &'a BridgeState,
    name: &str,
) -> Result<&'a super::secrets::SecretStore, ApiError> {
    if st.secret_stores.is_empty() {
        return Err(ApiError::NotConfigured {
            block: "secret",
            code: "ERR_SECRET_STORES_NOT_CONFIGURED",
        });
    }
    st.secret_stores
        .get(name)
        .ok_or_else(|| ApiError::StoreNotFound {
            block: "secret",
            code: "ERR_SECRET_STORE_NOT_FOUND",
            name: name.to_string(),
        })
}

async fn get_secret(
    State(st): St,
    Path((store, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    match secret_store(&st, &store)?.get(&name) {
        Some(secret) => Ok(axum::Json(secret).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn bulk_secrets(State(st): St, Path(store): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(secret_store(&st, &store)?.bulk()).into_response())
}

async fn healthz(State(st): St) -> Response {
    if st.ready.load(Ordering::Acquire) {
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
    let components: Vec<serde_json::Value> = st
        .components
        .iter()
        .map(|c| {
            let capabilities: &[&str] = match c.block() {
                "state" => &["ETAG", "TRANSACTIONAL"],
                _ => &[],
            };
            serde_json::json!({
                "name": c.name,
                "type": c.kind,
                "version": c.version,
                "capabilities": capabilities,
            })
        })
        .collect();
    let extended = st.extended.lock().expect("not poisoned").clone();
    let subscriptions = st.pubsub.subscriptions_json();
    let mut body = serde_json::json!({
        "id": st.config.app_id,
        "runtimeVersion": concat!("outrigger-", env!("CARGO_PKG_VERSION")),
        "enabledFeatures": [],
        "actors": [],
        "components": components,
        "extended": extended,
        "subscriptions": subscriptions,
        "httpEndpoints": [],
    });
    if let Some(crate::config::Address::Tcp(a)) = &st.app_address {
        body["appConnectionProperties"] = serde_json::json!({
            "port": a.port(),
            "protocol": "http",
            "channelAddress": a.ip().to_string(),
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
    st.extended
        .lock()
        .expect("not poisoned")
        .insert(key, String::from_utf8_lossy(&body).into_owned());
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1.0/shutdown`: the same graceful stop as SIGTERM (with `dapr-force-shutdown`, a
/// fast stop). Answers first; the stop runs after.
async fn shutdown(State(st): St, headers: HeaderMap) -> Response {
    let graceful = !headers.contains_key("dapr-force-shutdown");
    let control = st.control.clone();
    tokio::spawn(async move {
        let _ = control.send(Control::Shutdown { graceful }).await;
    });
    StatusCode::NO_CONTENT.into_response()
}
