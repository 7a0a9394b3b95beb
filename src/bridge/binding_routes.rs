//! The output binding route of the Dapr API: `POST|PUT /v1.0/bindings/{name}` with
//! `{"data", "metadata", "operation"}` (field names matched ignoring case, as Go's decoder).
//! Answers 200 with the binding's data and its response metadata as `metadata.<key>` headers
//! when the binding answered (even with no data), 204 when it answered nothing (as daprd: a
//! component's nil response); any failure is 500 `ERR_INVOKE_OUTPUT_BINDING`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::BridgeState;
use super::error::ApiError;
use super::ops;
use super::routes::read_body;

type St = State<Arc<BridgeState>>;

pub fn routes() -> Router<Arc<BridgeState>> {
    Router::new().route("/v1.0/bindings/{name}", post(invoke).put(invoke))
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct BindingRequest {
    data: Option<Box<RawValue>>,
    metadata: BTreeMap<String, String>,
    operation: String,
}

/// Lowercases the top-level field names (`Data`, `OPERATION`): Go's decoder matches them so
/// (the exact spelling wins over another case). `data` stays the text it was sent as: through
/// a `Value` an integer past 2^53 would come out rounded.
fn fold_case(body: &[u8]) -> Result<BindingRequest, serde_json::Error> {
    let raw: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(body)?;
    let mut folded: BTreeMap<String, Box<RawValue>> = BTreeMap::new();
    for (k, v) in raw {
        let key = k.to_ascii_lowercase();
        if !folded.contains_key(&key) || k == key {
            folded.insert(key, v);
        }
    }
    let mut req = BindingRequest::default();
    for (key, v) in folded {
        match key.as_str() {
            "data" => req.data = Some(v),
            // null leaves them empty, as Go's decoder does.
            "metadata" => {
                req.metadata = serde_json::from_str::<Option<_>>(v.get())?.unwrap_or_default()
            }
            "operation" => {
                req.operation = serde_json::from_str::<Option<_>>(v.get())?.unwrap_or_default()
            }
            _ => {}
        }
    }
    Ok(req)
}

async fn invoke(
    State(st): St,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&st, body).await?;
    let req = fold_case(&body).map_err(|e| {
        ApiError::Malformed(format!(
            "expected {{\"data\", \"metadata\", \"operation\"}}, found invalid JSON: {e}"
        ))
    })?;
    // A JSON string is sent as its text; any other JSON as written (as daprd).
    let data = match req.data.as_deref().map(RawValue::get) {
        None | Some("null") => Bytes::new(),
        Some(text) => match serde_json::from_str::<String>(text) {
            Ok(s) => Bytes::from(s),
            Err(_) => Bytes::from(text.to_string()),
        },
    };
    let mut metadata = req.metadata;
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            metadata
                .entry(name.to_string())
                .or_insert_with(|| v.to_string());
        }
    }
    let Some(res) = ops::invoke_binding(&st, &name, &req.operation, data, &metadata).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let mut response = (StatusCode::OK, res.data).into_response();
    for (k, v) in res.metadata {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::try_from(format!("metadata.{k}")),
            // Go's server turns line breaks into spaces (multi-line `sql` metadata).
            header::HeaderValue::try_from(v.replace(['\r', '\n'], " ")),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keeps_its_digits_and_names_fold_case() {
        let req = fold_case(
            br#"{"Data": {"id": 123456789012345678901234567890}, "OPERATION": "create", "metadata": null}"#,
        )
        .unwrap();
        assert_eq!(
            req.data.unwrap().get(),
            r#"{"id": 123456789012345678901234567890}"#
        );
        assert_eq!(req.operation, "create");
        assert!(req.metadata.is_empty());
        let req = fold_case(br#"{"operation": "get", "Operation": "delete"}"#).unwrap();
        assert_eq!(req.operation, "get");
    }
}
