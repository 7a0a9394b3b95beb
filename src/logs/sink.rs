//! Sinks: where batches of NDJSON records go, and what counts as acknowledged.
//!
//! - `http`: one POST per batch (`Content-Type: application/x-ndjson`); a 2xx answer
//!   acknowledges it. 408, 429, 5xx, a timeout or a connection error is a failed attempt (sent
//!   again); any other 4xx is a refusal: the batch will never be accepted, so it is dropped and
//!   counted (`reason="rejected"`) rather than stalling every line behind it.
//! - `file`: appended and `fdatasync`ed before it counts as acknowledged.
//! - `stdout`: written and flushed.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

use crate::config::logs::LogSink;

/// How a batch fared.
#[derive(Debug)]
pub enum SendError {
    /// Try again later.
    Failed(String),
    /// The sink will never take this batch.
    Rejected(String),
}

pub enum Sink {
    Stdout,
    File(PathBuf),
    Http(Box<HttpSink>),
}

pub struct HttpSink {
    client: Client<HttpConnector, Full<Bytes>>,
    url: http::Uri,
    timeout: Duration,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Sink {
    pub fn new(config: &LogSink) -> Sink {
        match config {
            LogSink::Stdout => Sink::Stdout,
            LogSink::File(p) => Sink::File(p.clone()),
            LogSink::Http {
                url,
                timeout,
                headers,
            } => Sink::Http(Box::new(HttpSink {
                client: Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build_http(),
                url: url.clone(),
                timeout: timeout.get(),
                headers: headers
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((
                            http::HeaderName::try_from(k.as_str()).ok()?,
                            http::HeaderValue::try_from(v.expose()).ok()?,
                        ))
                    })
                    .collect(),
            })),
        }
    }

    /// The `sink` label of its metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Stdout => "stdout",
            Sink::File(_) => "file",
            Sink::Http(_) => "http",
        }
    }

    /// Sends one batch; Ok once the sink has acknowledged it.
    pub async fn send(&self, body: Bytes) -> Result<(), SendError> {
        match self {
            Sink::Stdout => {
                let mut out = tokio::io::stdout();
                out.write_all(&body)
                    .await
                    .map_err(|e| SendError::Failed(e.to_string()))?;
                out.flush()
                    .await
                    .map_err(|e| SendError::Failed(e.to_string()))
            }
            Sink::File(path) => {
                let mut f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| SendError::Failed(format!("{}: {e}", path.display())))?;
                f.write_all(&body)
                    .await
                    .map_err(|e| SendError::Failed(e.to_string()))?;
                f.sync_data()
                    .await
                    .map_err(|e| SendError::Failed(e.to_string()))
            }
            Sink::Http(h) => {
                let HttpSink {
                    client,
                    url,
                    timeout,
                    headers,
                } = &**h;
                let mut req = http::Request::post(url.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-ndjson");
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let req = req
                    .body(Full::new(body))
                    .map_err(|e| SendError::Rejected(e.to_string()))?;
                let call = async {
                    let resp = client.request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    // Read the answer to its end so the connection can be used again.
                    let _ = resp.into_body().collect().await;
                    Ok::<_, String>(status)
                };
                match tokio::time::timeout(*timeout, call).await {
                    Err(_) => Err(SendError::Failed(format!(
                        "no answer within {}",
                        humantime::format_duration(*timeout)
                    ))),
                    Ok(Err(e)) => Err(SendError::Failed(e)),
                    Ok(Ok(s)) if s.is_success() => Ok(()),
                    Ok(Ok(s))
                        if s.is_client_error()
                            && s != http::StatusCode::REQUEST_TIMEOUT
                            && s != http::StatusCode::TOO_MANY_REQUESTS =>
                    {
                        Err(SendError::Rejected(format!("answered {s}")))
                    }
                    Ok(Ok(s)) => Err(SendError::Failed(format!("answered {s}"))),
                }
            }
        }
    }
}

/// The first retry waits about this long; each failure doubles it up to `logs.batch.retry_max`.
pub const RETRY_BASE: Duration = Duration::from_millis(100);

/// The wait before attempt `attempt + 1`: exponential, capped, with jitter (between half and
/// all of it) so that many sidecars do not retry a recovering collector in step.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1u32 << attempt.min(16)).min(max);
    exp.mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(2);
        assert!(backoff(0, max) <= RETRY_BASE);
        assert!(backoff(3, max) >= RETRY_BASE * 4);
        assert!(backoff(30, max) <= max);
    }
}
