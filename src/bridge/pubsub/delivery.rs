//! The app side of pub/sub: `GET /dapr/subscribe` to learn the app's subscriptions, and the
//! `POST {path}` that delivers one CloudEvent, with the app's answer read as Dapr reads it
//! (the table in `docs/bridge-pubsub.md`). Retries and dead-lettering are decided by the caller
//! ([`super::PubSub`]) from the [`AppStatus`] returned here.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::cloudevent::CLOUDEVENTS_CONTENT_TYPE;

/// What the app said about one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppStatus {
    Success,
    Retry,
    Drop,
}

/// Bounded exponential backoff between delivery attempts of one message (Dapr's resiliency
/// shape: next = previous × 1.5 × rand(0.5–1.5), capped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per message before it is dead-lettered or left to the broker's redelivery.
    pub max_attempts: u32,
    pub initial_interval: Duration,
    pub max_interval: Duration,
}

/// Defaults: 5 attempts, 1 s then ×1.5, at most 15 s apart.
impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base =
            self.initial_interval.as_secs_f64() * 1.5f64.powi(attempt.saturating_sub(1) as i32);
        let jittered = base * (0.5 + fastrand::f64());
        Duration::from_secs_f64(jittered.min(self.max_interval.as_secs_f64()))
    }
}

/// An HTTP channel to the app (keep-alive pooled).
pub struct AppChannel {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    token: Option<HeaderValue>,
    timeout: Duration,
}

impl AppChannel {
    /// `address` is the app's `host:port`; `token` is sent as `dapr-api-token` (APP_API_TOKEN).
    pub fn new(address: &str, token: Option<&str>, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        AppChannel {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: format!("http://{address}"),
            token: token.and_then(|t| HeaderValue::from_str(t).ok()),
            timeout,
        }
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let fut = async {
            let res = self.client.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            })?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the app's answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }

    fn request(&self, method: Method, path: &str) -> http::request::Builder {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            b = b.header("dapr-api-token", t.clone());
        }
        b
    }

    /// Sends `method path` with `headers` (those that are valid; `Host` and framing headers
    /// left out) and `body`: the status and body (input binding events).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &BTreeMap<String, String>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut b = self.request(method, path);
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v))
                && !matches!(
                    k.as_str(),
                    "host"
                        | "content-length"
                        | "transfer-encoding"
                        | "connection"
                        | "dapr-api-token"
                )
            {
                b = b.header(k, v);
            }
        }
        let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
        self.send(req).await
    }

    /// POSTs a JSON body to `path` (configuration changes): the status and body.
    pub async fn post_json(&self, path: &str, body: Bytes) -> Result<(StatusCode, Bytes), String> {
        let req = self
            .request(Method::POST, path)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        self.send(req).await
    }

    /// `GET /dapr/subscribe`: the status and body, or why there is none.
    pub async fn get_subscriptions(&self) -> Result<(StatusCode, Bytes), String> {
        let req = self
            .request(Method::GET, "/dapr/subscribe")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        self.send(req).await
    }

    /// Delivers one CloudEvent to `path` and reads the app's answer.
    pub async fn deliver(
        &self,
        path: &str,
        event: Bytes,
        trace: (Option<&str>, Option<&str>),
        metadata: &BTreeMap<String, String>,
    ) -> AppStatus {
        let mut b = self
            .request(Method::POST, path)
            .header("content-type", CLOUDEVENTS_CONTENT_TYPE);
        for (name, value) in [("traceparent", trace.0), ("tracestate", trace.1)] {
            if let Some(v) = value.filter(|v| !v.is_empty())
                && let Ok(v) = HeaderValue::from_str(v)
            {
                b = b.header(name, v);
            }
        }
        // Message metadata travels as headers (Dapr does the same), where it is a valid header.
        for (k, v) in metadata {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v))
                && !matches!(
                    k.as_str(),
                    "content-type" | "content-length" | "host" | "dapr-api-token"
                )
            {
                b = b.header(k, v);
            }
        }
        let req = match b.body(Full::new(event)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot build the delivery request");
                return AppStatus::Retry;
            }
        };
        match self.send(req).await {
            Err(e) => {
                tracing::warn!(path, error = %e, "delivery to the app failed; will retry");
                AppStatus::Retry
            }
            Ok((status, body)) => interpret(status, &body, path),
        }
    }
}

impl AppChannel {
    /// Delivers a bulk envelope (`application/json`) to `path` and reads one status per entry
    /// id, in the order of `ids` ([`interpret_bulk`]).
    pub async fn deliver_bulk(
        &self,
        path: &str,
        envelope: Bytes,
        ids: &[String],
        trace: (Option<&str>, Option<&str>),
    ) -> Vec<AppStatus> {
        let mut b = self
            .request(Method::POST, path)
            .header("content-type", "application/json");
        for (name, value) in [("traceparent", trace.0), ("tracestate", trace.1)] {
            if let Some(v) = value.filter(|v| !v.is_empty())
                && let Ok(v) = HeaderValue::from_str(v)
            {
                b = b.header(name, v);
            }
        }
        let req = match b.body(Full::new(envelope)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot build the bulk delivery request");
                return vec![AppStatus::Retry; ids.len()];
            }
        };
        match self.send(req).await {
            Err(e) => {
                tracing::warn!(path, error = %e, "bulk delivery to the app failed; will retry");
                vec![AppStatus::Retry; ids.len()]
            }
            Ok((status, body)) => interpret_bulk(status, &body, ids, path),
        }
    }
}

/// Reads the app's answer to a bulk delivery as daprd does: 2xx with
/// `{"statuses":[{"entryId","status"}]}` gives each entry its status (SUCCESS, RETRY, DROP); an
/// entry missing from it, or with an empty or unknown status, is RETRY, and so is every entry
/// when the body does not parse. 404 drops every entry; any other status retries them all.
pub fn interpret_bulk(
    status: StatusCode,
    body: &[u8],
    ids: &[String],
    path: &str,
) -> Vec<AppStatus> {
    if status == StatusCode::NOT_FOUND {
        tracing::error!(
            path,
            "the app answered 404 for a bulk delivery; dropping its events"
        );
        return vec![AppStatus::Drop; ids.len()];
    }
    if !status.is_success() {
        tracing::warn!(
            path,
            status = status.as_u16(),
            "the app failed a bulk delivery; will retry"
        );
        return vec![AppStatus::Retry; ids.len()];
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        statuses: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "entryId", default)]
        entry_id: String,
        #[serde(default)]
        status: String,
    }
    let statuses: BTreeMap<String, String> = match serde_json::from_slice::<Answer>(body) {
        Ok(a) => a
            .statuses
            .into_iter()
            .map(|e| (e.entry_id, e.status))
            .collect(),
        Err(e) => {
            tracing::warn!(path, error = %e, "cannot read the app's bulk answer; will retry every entry");
            return vec![AppStatus::Retry; ids.len()];
        }
    };
    ids.iter()
        .map(
            |id| match statuses.get(id).map(|s| s.to_ascii_uppercase()).as_deref() {
                Some("SUCCESS") => AppStatus::Success,
                Some("DROP") => {
                    tracing::warn!(path, entry_id = %id, "the app dropped the event (status DROP)");
                    AppStatus::Drop
                }
                _ => AppStatus::Retry,
            },
        )
        .collect()
}

/// Reads the app's answer as Dapr does.
pub fn interpret(status: StatusCode, body: &[u8], path: &str) -> AppStatus {
    if status.is_success() {
        let Ok(serde_json::Value::Object(o)) = serde_json::from_slice::<serde_json::Value>(body)
        else {
            return AppStatus::Success;
        };
        let Some(s) = o.get("status").and_then(|s| s.as_str()) else {
            return AppStatus::Success;
        };
        match s.to_ascii_uppercase().as_str() {
            "" | "SUCCESS" => AppStatus::Success,
            "RETRY" => AppStatus::Retry,
            "DROP" => {
                tracing::warn!(path, "the app dropped the event (status DROP)");
                AppStatus::Drop
            }
            other => {
                tracing::warn!(
                    path,
                    status = other,
                    "unknown status from the app; will retry"
                );
                AppStatus::Retry
            }
        }
    } else if status == StatusCode::NOT_FOUND {
        tracing::error!(path, "the app answered 404 for the event; dropping it");
        AppStatus::Drop
    } else {
        tracing::warn!(
            path,
            status = status.as_u16(),
            "the app failed the event; will retry"
        );
        AppStatus::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_answers_are_read_per_entry() {
        use AppStatus::*;
        let ids: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        let body = br#"{"statuses":[{"entryId":"a","status":"SUCCESS"},{"entryId":"b","status":"drop"},{"entryId":"c","status":"RETRY"},{"entryId":"d","status":""}]}"#;
        assert_eq!(
            interpret_bulk(StatusCode::OK, body, &ids, "/p"),
            [Success, Drop, Retry, Retry, Retry]
        );
        assert_eq!(
            interpret_bulk(StatusCode::OK, b"ok", &ids[..2], "/p"),
            [Retry, Retry]
        );
        // daprd's docs show `statuses` as an object: that is not what its runtime reads.
        assert_eq!(
            interpret_bulk(
                StatusCode::OK,
                br#"{"statuses":{"a":"SUCCESS"}}"#,
                &ids[..1],
                "/p"
            ),
            [Retry]
        );
        assert_eq!(
            interpret_bulk(StatusCode::NOT_FOUND, b"", &ids[..2], "/p"),
            [Drop, Drop]
        );
        assert_eq!(
            interpret_bulk(StatusCode::INTERNAL_SERVER_ERROR, body, &ids[..1], "/p"),
            [Retry]
        );
    }

    #[test]
    fn answers_are_read_as_dapr_reads_them() {
        let ok = StatusCode::OK;
        assert_eq!(interpret(ok, b"", "/p"), AppStatus::Success);
        assert_eq!(interpret(ok, b"not json", "/p"), AppStatus::Success);
        assert_eq!(
            interpret(ok, br#"{"status":"SUCCESS"}"#, "/p"),
            AppStatus::Success
        );
        assert_eq!(interpret(ok, br#"{"status":""}"#, "/p"), AppStatus::Success);
        assert_eq!(
            interpret(ok, br#"{"status":"RETRY"}"#, "/p"),
            AppStatus::Retry
        );
        assert_eq!(
            interpret(ok, br#"{"status":"DROP"}"#, "/p"),
            AppStatus::Drop
        );
        assert_eq!(
            interpret(ok, br#"{"status":"WHAT"}"#, "/p"),
            AppStatus::Retry
        );
        assert_eq!(
            interpret(StatusCode::NO_CONTENT, b"", "/p"),
            AppStatus::Success
        );
        assert_eq!(interpret(StatusCode::NOT_FOUND, b"", "/p"), AppStatus::Drop);
        assert_eq!(
            interpret(
                StatusCode::INTERNAL_SERVER_ERROR,
                br#"{"status":"SUCCESS"}"#,
                "/p"
            ),
            AppStatus::Retry
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for attempt in 1..20 {
            assert!(p.backoff(attempt) <= p.max_interval);
        }
        assert!(p.backoff(1) >= Duration::from_millis(500));
    }
}
