//! The configuration routes of the Dapr API, under `v1.0` and `v1.0-alpha1` alike: get
//! (`?key=a&key=b`, none: every key), subscribe (each change is POSTed to the app at
//! `/configuration/{store}/{key}` with `{"id", "items"}`, as daprd does) and unsubscribe.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

use super::BridgeState;
use super::error::ApiError;
use super::ops;
use crate::bridge::percent_encode;

type St = State<Arc<BridgeState>>;

pub fn routes() -> Router<Arc<BridgeState>> {
    let mut router = Router::new();
    for version in ["v1.0", "v1.0-alpha1"] {
        router = router
            .route(
                &format!("/{version}/configuration/{{store}}"),
                get(get_items),
            )
            .route(
                &format!("/{version}/configuration/{{store}}/subscribe"),
                get(subscribe),
            )
            .route(
                &format!("/{version}/configuration/{{store}}/{{id}}/unsubscribe"),
                get(unsubscribe),
            );
    }
    router
}

/// The `metadata.<name>` query parameters (daprd's request metadata, e.g.
/// `metadata.pgNotifyChannel`).
fn metadata(query: &[(String, String)]) -> std::collections::BTreeMap<String, String> {
    query
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("metadata.")?.to_string(), v.clone())))
        .collect()
}

/// The `key` query parameters, in order.
fn keys(query: Vec<(String, String)>) -> Vec<String> {
    query
        .into_iter()
        .filter(|(k, _)| k == "key")
        .map(|(_, v)| v)
        .collect()
}

async fn get_items(
    State(st): St,
    Path(store): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let items = ops::get_configuration(&st, &store, &keys(query)).await?;
    if items.is_empty() {
        // daprd: no items, no content.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(axum::Json(items).into_response())
}

async fn subscribe(
    State(st): St,
    Path(store): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let Some(crate::config::Address::Tcp(app)) = st.app_address.clone() else {
        return Err(ApiError::Failed {
            code: "ERR_CONFIGURATION_SUBSCRIBE",
            message: "configuration changes are sent to the app: app.address must be a TCP address"
                .into(),
        });
    };
    let metadata = metadata(&query);
    let (id, mut changes) =
        ops::subscribe_configuration(&st, &store, keys(query), &metadata).await?;
    let channel = crate::bridge::pubsub::delivery::AppChannel::new(
        &app.to_string(),
        st.config.app_api_token.as_ref().map(|t| t.expose()),
        crate::bridge::pubsub::DEFAULT_DELIVERY_TIMEOUT,
    );
    let watch = id.clone();
    // The subscription belongs to this run of the app: when the app stops (a restart closes
    // the gate) it ends, and the app subscribes again when it starts — kept, each change
    // reached the restarted app once per subscription it ever made.
    let mut gate = st.app_gate.watch();
    let state = st.clone();
    tokio::spawn(async move {
        let app_stopped = async {
            if gate.wait_for(|open| *open).await.is_err()
                || gate.wait_for(|open| !*open).await.is_err()
            {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(app_stopped);
        loop {
            let items = tokio::select! {
                _ = &mut app_stopped => {
                    tracing::info!(store = %store, id = %watch, "the app stopped: its configuration subscription ends");
                    state.configuration_watches.remove(&store, &watch);
                    return;
                }
                items = changes.recv() => items,
            };
            let Some(items) = items else { return };
            let body = Bytes::from(
                serde_json::to_vec(&serde_json::json!({"id": watch, "items": items}))
                    .expect("serializable"),
            );
            for key in items.keys() {
                let path = format!(
                    "/configuration/{}/{}",
                    percent_encode(&store),
                    percent_encode(key)
                );
                match channel.post_json(&path, body.clone()).await {
                    Ok((status, _)) if status == StatusCode::OK => {}
                    Ok((status, body)) => tracing::warn!(
                        path, %status, body = %String::from_utf8_lossy(&body[..body.len().min(256)]),
                        "the app did not take a configuration change (expected 200)"
                    ),
                    Err(e) => {
                        tracing::warn!(path, error = %e, "cannot send a configuration change to the app")
                    }
                }
            }
        }
    });
    Ok(axum::Json(serde_json::json!({ "id": id })).into_response())
}

async fn unsubscribe(State(st): St, Path((store, id)): Path<(String, String)>) -> Response {
    match ops::unsubscribe_configuration(&st, &store, &id) {
        Ok(()) => axum::Json(serde_json::json!({"ok": true})).into_response(),
        Err(e @ ApiError::Failed { .. }) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"ok": false, "message": e.to_string()})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}
