//! daprd's routes for the building blocks Outrigger does not serve (actors, workflows,
//! crypto, jobs, conversation, state query): each answers 501
//! `ERR_NOT_IMPLEMENTED` naming the building block. Without these, such a request fell through
//! to invocation (the fallback) and got a misleading 400 `ERR_DIRECT_INVOKE` ("failed getting
//! app id"), so an app could not tell a missing feature from its own mistake.
//!
//! The route list is daprd 1.16's (`pkg/api/http/*.go`, see `dapr-surface.md` §1.1). A request
//! carrying `dapr-app-id` is still an invocation of that path, as before.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::BridgeState;
use super::error::ApiError;
use super::invoke;

/// Every unserved daprd route prefix, with the building block it belongs to. A prefix covers
/// the bare path and everything under it, whatever the method.
pub const UNSERVED: &[(&str, &str)] = &[
    ("/v1.0/actors", "actors"),
    ("/v1.0/workflows", "workflows"),
    ("/v1.0-alpha1/workflows", "workflows"),
    ("/v1.0-beta1/workflows", "workflows"),
    ("/v1.0-alpha1/crypto", "crypto"),
    ("/v1.0-alpha1/subtlecrypto", "crypto"),
    ("/v1.0-alpha1/jobs", "jobs"),
    ("/v1.0-alpha1/conversation", "conversation"),
    ("/v1.0-alpha2/conversation", "conversation"),
];

/// The routes answering 501 (merge into the bridge's router).
pub fn routes() -> Router<Arc<BridgeState>> {
    let mut router = Router::new();
    for &(prefix, block) in UNSERVED {
        let handler = move |st: State<Arc<BridgeState>>, req: Request| unserved(st, req, block);
        router = router
            .route(prefix, any(handler))
            .route(&format!("{prefix}/{{*rest}}"), any(handler));
    }
    // The state query API (alpha): the other state routes are served.
    router.route(
        "/v1.0-alpha1/state/{store}/query",
        any(|st: State<Arc<BridgeState>>, req: Request| unserved(st, req, "state query")),
    )
}

async fn unserved(st: State<Arc<BridgeState>>, req: Request, block: &'static str) -> Response {
    if req.headers().contains_key(invoke::APP_ID_HEADER) {
        return invoke::fallback(st, req).await;
    }
    ApiError::NotImplemented(block).into_response()
}
