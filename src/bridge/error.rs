//! The bridge's API errors, rendered as Dapr renders them: a status code and
//! `{"errorCode":"ERR_…","message":"…"}`. Each variant picks the status and code the Dapr
//! reference gives for that failure.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::state::StateError;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body or a parameter is not what the API takes (400 `ERR_MALFORMED_REQUEST`).
    #[error("{0}")]
    Malformed(String),
    /// The request body is over `bridge.max_body` (413 `ERR_BODY_TOO_LARGE`).
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    /// No component of that name and building block (400).
    #[error("{block} store {name} is not found")]
    StoreNotFound {
        block: &'static str,
        code: &'static str,
        name: String,
    },
    /// No component of that building block at all (400).
    #[error("{block} stores are not configured")]
    NotConfigured {
        block: &'static str,
        code: &'static str,
    },
    /// A state operation failed; `code` names the operation (`ERR_STATE_SAVE`, …).
    #[error("{source}")]
    State {
        code: &'static str,
        source: StateError,
    },
    /// A transaction named an operation other than upsert or delete (400).
    #[error("operation type {0} not supported")]
    UnsupportedOperation(String),
    /// A component's call failed (500 with the operation's code: `ERR_TRY_LOCK`,
    /// `ERR_UNLOCK`, …; gRPC `INTERNAL`).
    #[error("{message}")]
    Failed { code: &'static str, message: String },
    /// A secret store failed (500 `ERR_SECRET_GET`).
    #[error("{0}")]
    Secret(String),
    /// Service invocation failed before the callee answered.
    #[error("{message}")]
    Invoke { status: StatusCode, message: String },
    /// A gRPC app (`app.protocol: grpc`) answered an invocation with this status: passed on
    /// unchanged to a gRPC caller, as the matching HTTP status to an HTTP one.
    #[error("{message}")]
    AppStatus { code: i32, message: String },
    /// The route does not exist (as daprd: invocation without an app id, 400).
    #[error("failed getting app id either from the URL path or the header dapr-app-id")]
    NoAppId,
    /// A daprd route whose building block Outrigger does not serve (501
    /// `ERR_NOT_IMPLEMENTED`), named so the caller knows what is missing.
    #[error("outrigger: {0} API is not implemented")]
    NotImplemented(&'static str),
    /// A web page of another site sent a change (403; Outrigger's own code: daprd has none).
    #[error("cross-origin requests cannot change state, publish or stop the sidecar")]
    CrossOrigin,
    /// A `Host` other than an IP address or localhost, without an API token (403).
    #[error(
        "without bridge.api_token the bridge answers Host: an IP address or localhost only (set a token to call it by name)"
    )]
    ForeignHost,
}

impl ApiError {
    /// The status and Dapr error code.
    pub fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Malformed(_) => (StatusCode::BAD_REQUEST, "ERR_MALFORMED_REQUEST"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "ERR_BODY_TOO_LARGE"),
            ApiError::StoreNotFound { code, .. } | ApiError::NotConfigured { code, .. } => {
                (StatusCode::BAD_REQUEST, code)
            }
            ApiError::State { code, source } => match source {
                StateError::EtagMismatch(_) => (StatusCode::CONFLICT, code),
                StateError::EtagInvalid(_) | StateError::TtlInvalid(_) => {
                    (StatusCode::BAD_REQUEST, code)
                }
                StateError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, code),
            },
            ApiError::UnsupportedOperation(_) => {
                (StatusCode::BAD_REQUEST, "ERR_NOT_SUPPORTED_STATE_OPERATION")
            }
            ApiError::Secret(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ERR_SECRET_GET"),
            ApiError::Failed { code, .. } => (StatusCode::INTERNAL_SERVER_ERROR, code),
            ApiError::Invoke { status, .. } => (*status, "ERR_DIRECT_INVOKE"),
            ApiError::NoAppId => (StatusCode::BAD_REQUEST, "ERR_DIRECT_INVOKE"),
            ApiError::AppStatus { code, .. } => (
                super::grpc::http_status(tonic::Code::from(*code)),
                "ERR_DIRECT_INVOKE",
            ),
            ApiError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "ERR_NOT_IMPLEMENTED"),
            ApiError::CrossOrigin => (StatusCode::FORBIDDEN, "ERR_CROSS_ORIGIN_REQUEST"),
            ApiError::ForeignHost => (StatusCode::FORBIDDEN, "ERR_FOREIGN_HOST"),
        }
    }

    pub fn state(code: &'static str) -> impl FnOnce(StateError) -> ApiError {
        move |source| ApiError::State { code, source }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let body = serde_json::json!({ "errorCode": code, "message": self.to_string() });
        (status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let e = ApiError::State {
            code: "ERR_STATE_SAVE",
            source: StateError::EtagMismatch("k".into()),
        };
        assert_eq!(e.parts(), (StatusCode::CONFLICT, "ERR_STATE_SAVE"));
        assert_eq!(
            ApiError::Malformed("x".into()).parts().0,
            StatusCode::BAD_REQUEST
        );
    }
}
