//! The distributed lock routes of the Dapr API (`/v1.0-alpha1/lock/{store}`,
//! `/v1.0-alpha1/unlock/{store}`). Bodies are read as daprd reads them (protojson): field
//! names as JSON names (`resourceId`) or proto names (`resource_id`), unknown fields ignored,
//! `expiryInSeconds` a number or a string of one. Answers are daprd's: `{"success":bool}` and
//! `{"status":N}` with N numeric (0 success, 1 lock does not exist, 2 belongs to another
//! owner, 3 internal error).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use super::BridgeState;
use super::error::ApiError;
use super::ops;
use super::routes::read_body;

type St = State<Arc<BridgeState>>;

pub fn routes() -> Router<Arc<BridgeState>> {
    Router::new()
        .route("/v1.0-alpha1/lock/{store}", post(lock))
        .route("/v1.0-alpha1/unlock/{store}", post(unlock))
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct LockRequest {
    #[serde(alias = "resource_id", rename = "resourceId")]
    resource_id: String,
    #[serde(alias = "lock_owner", rename = "lockOwner")]
    lock_owner: String,
    #[serde(alias = "expiry_in_seconds", rename = "expiryInSeconds")]
    expiry_in_seconds: Option<NumberOrString>,
}

/// protojson reads an int32 from a number or a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(i64),
    Text(String),
}

fn parse<T: Default + for<'a> Deserialize<'a>>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("expected a JSON lock request, found: {e}")))
}

async fn lock(State(st): St, Path(store): Path<String>, body: Body) -> Result<Response, ApiError> {
    let body = read_body(&st, body).await?;
    let req: LockRequest = parse(&body)?;
    let expiry = match req.expiry_in_seconds {
        None => 0,
        Some(NumberOrString::Number(n)) => i32::try_from(n).map_err(|_| {
            ApiError::Malformed(format!("expected expiryInSeconds as an int32, found {n}"))
        })?,
        Some(NumberOrString::Text(t)) => t.trim().parse().map_err(|_| {
            ApiError::Malformed(format!("expected expiryInSeconds as an int32, found {t:?}"))
        })?,
    };
    let success = ops::try_lock(&st, &store, &req.resource_id, &req.lock_owner, expiry).await?;
    Ok(axum::Json(serde_json::json!({ "success": success })).into_response())
}

async fn unlock(
    State(st): St,
    Path(store): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&st, body).await?;
    let req: LockRequest = parse(&body)?;
    let status = ops::unlock(&st, &store, &req.resource_id, &req.lock_owner).await?;
    Ok(axum::Json(serde_json::json!({ "status": status as i32 })).into_response())
}
