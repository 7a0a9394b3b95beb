//! Span export: every sampled proxied request is a span, sent in batches to a collector over
//! OTLP/HTTP with JSON bodies (`POST <endpoint>/v1/traces`; trace and span ids in hex, as the
//! OTLP JSON mapping says). A bounded queue sits between the data path and the exporter task:
//! when the collector is slow or down, spans are dropped and counted
//! (`outrigger_spans_dropped_total{reason}`) instead of slowing traffic.
//!
//! Written by hand rather than with `opentelemetry-otlp`: that crate brings the OpenTelemetry
//! SDK and its own HTTP client stack for what is one JSON document per batch over one kept-alive
//! connection; the OTLP 1.x JSON encoding is stable.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::config::OtlpConfig;
use crate::telemetry::metrics::ReasonLabels;
use crate::telemetry::record::Record;

/// Spans waiting for export; beyond this they are dropped.
const QUEUE: usize = 4096;
/// Spans per request to the collector.
const BATCH: usize = 512;
/// How often the exporter sends what has queued.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// The exporter's counters (`docs/metrics.md`).
#[derive(Clone, Default)]
pub struct SpanMetrics {
    pub exported: Counter,
    pub dropped: Family<ReasonLabels, Counter>,
}

/// One span, as the data path hands it over.
pub struct Span {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    /// Inbound hops are servers, outbound hops clients.
    pub server: bool,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub method: http::Method,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub listener: crate::telemetry::metrics::Name,
    pub route: Option<crate::telemetry::metrics::Name>,
    pub cluster: Option<crate::telemetry::metrics::Name>,
    pub upstream: Option<String>,
    pub retries: u32,
    pub error: Option<String>,
    pub identity: Option<std::sync::Arc<str>>,
    pub request_id: String,
}

impl Record {
    /// This request as a span.
    pub fn span(&self) -> Span {
        let e = &self.entry;
        let (start, end) = self.unix_nanos();
        Span {
            trace_id: e.trace.trace_id,
            span_id: e.trace.span_id,
            parent_id: e.trace.parent_id,
            server: e.direction == "inbound",
            start_unix_nanos: start,
            end_unix_nanos: end,
            method: e.method.clone(),
            authority: e.authority().to_string(),
            path: e.uri.path().to_string(),
            status: self.status,
            listener: e.listener.clone(),
            route: self.routed.route.clone(),
            cluster: self.routed.cluster.clone(),
            upstream: self.routed.upstream.as_deref().map(str::to_string),
            retries: self.routed.retries,
            error: self.error.clone(),
            identity: e.identity.clone(),
            request_id: e.request_id().to_string(),
        }
    }
}

/// The sending side, shared by every listener.
#[derive(Clone)]
pub struct SpanExporter {
    tx: std::sync::mpsc::SyncSender<Span>,
    metrics: SpanMetrics,
}

impl SpanExporter {
    /// Starts the exporter task (on the current runtime).
    pub fn start(config: &OtlpConfig, service: &str, metrics: SpanMetrics) -> SpanExporter {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Span>(QUEUE);
        let exporter = Exporter {
            config: config.clone(),
            resource: json!({
                "attributes": [
                    attribute("service.name", json!({ "stringValue": service })),
                    attribute("telemetry.sdk.name", json!({ "stringValue": "outrigger" })),
                    attribute("telemetry.sdk.version", json!({ "stringValue": env!("CARGO_PKG_VERSION") })),
                ]
            }),
            connection: None,
            metrics: metrics.clone(),
            last_warning: None,
        };
        tokio::spawn(exporter.run(rx));
        SpanExporter { tx, metrics }
    }

    pub(crate) fn send(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.metrics
                .dropped
                .get_or_create(&ReasonLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

struct Exporter {
    config: OtlpConfig,
    resource: Value,
    connection: Option<SendRequest<Full<Bytes>>>,
    metrics: SpanMetrics,
    last_warning: Option<Instant>,
}

impl Exporter {
    async fn run(mut self, rx: std::sync::mpsc::Receiver<Span>) {
        // Polled, not woken: the data path never pays for waking this task.
        let mut tick = tokio::time::interval(EXPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tick.tick().await;
            let mut closed = false;
            loop {
                match rx.try_recv() {
                    Ok(span) => {
                        batch.push(span);
                        if batch.len() == BATCH {
                            self.export(std::mem::take(&mut batch)).await;
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                self.export(std::mem::take(&mut batch)).await;
            }
            if closed {
                return;
            }
        }
    }

    async fn export(&mut self, spans: Vec<Span>) {
        let n = spans.len() as u64;
        let body = self.encode(&spans);
        let result = tokio::time::timeout(self.config.timeout, self.post(body)).await;
        let error = match result {
            Ok(Ok(())) => {
                self.metrics.exported.inc_by(n);
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => {
                self.connection = None;
                format!("no answer within {:?}", self.config.timeout)
            }
        };
        self.metrics
            .dropped
            .get_or_create(&ReasonLabels {
                reason: "export_failed",
            })
            .inc_by(n);
        // A collector that is down fails every batch: say so once a minute.
        if self
            .last_warning
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            self.last_warning = Some(Instant::now());
            tracing::warn!(endpoint = %self.config.endpoint, error = %error, spans = n, "cannot export spans; they are dropped and counted");
        }
    }

    /// POSTs one batch, on the kept-alive connection when it is still usable.
    async fn post(&mut self, body: Bytes) -> Result<(), String> {
        let reusable = match self.connection.take() {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reusable {
            Some(s) => s,
            None => self.connect().await?,
        };
        let mut req = http::Request::post(self.config.endpoint.clone())
            .header(HOST, self.config.host.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("outrigger/", env!("CARGO_PKG_VERSION")));
        for (k, v) in &self.config.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("the export request failed: {e}"))?;
        let status = res.status();
        // Read the answer so the connection can be reused.
        let answer = res.into_body().collect().await.map(|b| b.to_bytes());
        if !status.is_success() {
            let text = answer
                .ok()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned())
                .unwrap_or_default();
            return Err(format!("the collector answered {status}: {text}"));
        }
        if answer.is_ok() {
            self.connection = Some(sender);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let c = &self.config;
        let tcp = TcpStream::connect(&c.authority)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", c.authority))?;
        let _ = tcp.set_nodelay(true);
        if c.https {
            let tls = crate::config::tls::ClientTlsConfig {
                ca: c.ca.clone(),
                server_name: None,
                client: None,
                identity: None,
                min_version: crate::config::tls::TlsVersion::V1_2,
            };
            let config = crate::tls::client_config(&tls, false)?.config;
            let name = rustls_pki_types::ServerName::try_from(c.server_name.clone())
                .map_err(|e| format!("{}: {e}", c.server_name))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {} failed: {e}", c.authority))?;
            handshake(stream).await
        } else {
            handshake(tcp).await
        }
    }

    /// The batch as an OTLP `ExportTraceServiceRequest` in JSON.
    fn encode(&self, spans: &[Span]) -> Bytes {
        let spans: Vec<Value> = spans.iter().map(span_json).collect();
        let doc = json!({
            "resourceSpans": [{
                "resource": self.resource,
                "scopeSpans": [{
                    "scope": { "name": "outrigger", "version": env!("CARGO_PKG_VERSION") },
                    "spans": spans,
                }],
            }],
        });
        Bytes::from(serde_json::to_vec(&doc).expect("JSON values serialize"))
    }
}

async fn handshake<S>(io: S) -> Result<SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn attribute(key: &str, value: Value) -> Value {
    json!({ "key": key, "value": value })
}

fn string(key: &str, v: &str) -> Value {
    attribute(key, json!({ "stringValue": v }))
}

/// OTLP JSON writes 64-bit integers as strings.
fn int(key: &str, v: u64) -> Value {
    attribute(key, json!({ "intValue": v.to_string() }))
}

#[derive(Serialize)]
struct Status<'a> {
    code: u8,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
}

/// Attributes follow the OpenTelemetry HTTP semantic conventions where one fits.
fn span_json(s: &Span) -> Value {
    let mut attributes = vec![
        string("http.request.method", s.method.as_str()),
        string("url.path", &s.path),
        string("server.address", &s.authority),
        int("http.response.status_code", u64::from(s.status)),
        string("outrigger.listener", &s.listener),
    ];
    if let Some(r) = &s.route {
        attributes.push(string("outrigger.route", r));
    }
    if let Some(c) = &s.cluster {
        attributes.push(string("outrigger.cluster", c));
    }
    if let Some(u) = &s.upstream {
        attributes.push(string("network.peer.address", u));
    }
    if s.retries > 0 {
        attributes.push(int("outrigger.retries", u64::from(s.retries)));
    }
    if let Some(e) = &s.error {
        attributes.push(string("error.type", e));
    }
    if let Some(i) = &s.identity {
        attributes.push(string("outrigger.peer.identity", i));
    }
    if !s.request_id.is_empty() {
        attributes.push(string("outrigger.request_id", &s.request_id));
    }
    // Unset, or Error: 5xx (and a failure of Outrigger's own) on any span, 4xx on a client
    // span (semantic conventions: a server's 4xx is the caller's fault).
    let failed = s.error.is_some() || s.status >= 500 || (!s.server && s.status >= 400);
    let status = Status {
        code: if failed { 2 } else { 0 },
        message: s.error.as_deref().unwrap_or(""),
    };
    let mut span = json!({
        "traceId": format!("{:032x}", s.trace_id),
        "spanId": format!("{:016x}", s.span_id),
        "name": match &s.route {
            Some(r) => format!("{} {}", s.method, r),
            None => s.method.to_string(),
        },
        // SPAN_KIND_SERVER = 2, SPAN_KIND_CLIENT = 3.
        "kind": if s.server { 2 } else { 3 },
        "startTimeUnixNano": s.start_unix_nanos.to_string(),
        "endTimeUnixNano": s.end_unix_nanos.to_string(),
        "attributes": attributes,
        "status": status,
    });
    if let Some(p) = s.parent_id {
        span["parentSpanId"] = json!(format!("{p:016x}"));
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_encode_as_otlp_json_with_hex_ids() {
        let s = Span {
            trace_id: 0x0af7651916cd43dd8448eb211c80319c,
            span_id: 0xb7ad6b7169203331,
            parent_id: Some(0x00f067aa0ba902b7),
            server: true,
            start_unix_nanos: 1_000,
            end_unix_nanos: 3_000,
            method: http::Method::GET,
            authority: "shop".into(),
            path: "/cart".into(),
            status: 503,
            listener: std::sync::Arc::new("public".into()),
            route: Some(std::sync::Arc::new("cart".into())),
            cluster: Some(std::sync::Arc::new("app".into())),
            upstream: Some("127.0.0.1:8080".into()),
            retries: 1,
            error: Some("connect".into()),
            identity: None,
            request_id: "r1".into(),
        };
        let v = span_json(&s);
        assert_eq!(v["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(v["spanId"], "b7ad6b7169203331");
        assert_eq!(v["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(v["name"], "GET cart");
        assert_eq!(v["kind"], 2);
        assert_eq!(v["startTimeUnixNano"], "1000");
        assert_eq!(v["status"]["code"], 2);
        assert_eq!(v["status"]["message"], "connect");
        let attrs = v["attributes"].as_array().unwrap();
        assert!(attrs.contains(&int("http.response.status_code", 503)));
        assert!(attrs.contains(&string("network.peer.address", "127.0.0.1:8080")));
    }
}
