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
use tokio::net::TcpStream;

use crate::config::OtlpConfig;
use crate::telemetry::json::{hex, number, string};
use crate::telemetry::metrics::ReasonLabels;
use crate::telemetry::record::Record;

/// Spans waiting for export; beyond this they are dropped. Boxed in the queue, so an idle
/// queue costs 8 bytes a slot.
const QUEUE: usize = 8192;
/// Spans per request to the collector.
const BATCH: usize = 512;
/// How often the exporter takes what has queued (a full batch is sent at once)…
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// …and how long a partial batch may wait.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// The exporter's counters (`docs/metrics.md`).
#[derive(Clone, Default)]
pub struct SpanMetrics {
    pub exported: Counter,
    pub dropped: Family<ReasonLabels, Counter>,
}

/// The sending side, shared by every listener.
#[derive(Clone)]
pub struct SpanExporter {
    tx: std::sync::mpsc::SyncSender<Box<Record>>,
    metrics: SpanMetrics,
}

impl SpanExporter {
    /// Starts the exporter task (on the current runtime). `tls`: the connector to an https
    /// collector, built by preflight (its CA file checked there); required for one.
    pub fn start(
        config: &OtlpConfig,
        tls: Option<(
            tokio_rustls::TlsConnector,
            rustls_pki_types::ServerName<'static>,
        )>,
        service: &str,
        metrics: SpanMetrics,
    ) -> Result<SpanExporter, String> {
        if config.https && tls.is_none() {
            return Err("an https collector needs its TLS connector (built by preflight)".into());
        }
        // Both reasons exist from the start, so `increase()` sees the first drop.
        for reason in ["queue_full", "export_failed"] {
            let _ = metrics.dropped.get_or_create(&ReasonLabels { reason });
        }
        let path = config
            .endpoint
            .path_and_query()
            .map_or("/v1/traces", |p| p.as_str())
            .parse()
            .map_err(|e| format!("{e}"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Box<Record>>(QUEUE);
        let exporter = Exporter {
            config: config.clone(),
            head: {
                let mut h = b"{\"resourceSpans\":[{\"resource\":{\"attributes\":[".to_vec();
                attribute(&mut h, "service.name", service);
                h.push(b',');
                attribute(&mut h, "telemetry.sdk.name", "outrigger");
                h.push(b',');
                attribute(&mut h, "telemetry.sdk.version", env!("CARGO_PKG_VERSION"));
                h.extend_from_slice(
                    b"]},\"scopeSpans\":[{\"scope\":{\"name\":\"outrigger\",\"version\":",
                );
                string(&mut h, env!("CARGO_PKG_VERSION"));
                h.extend_from_slice(b"},\"spans\":[");
                h
            },
            connection: None,
            metrics: metrics.clone(),
            last_warning: None,
            tls,
            path,
        };
        tokio::spawn(exporter.run(rx));
        Ok(SpanExporter { tx, metrics })
    }

    pub(crate) fn send(&self, span: Record) {
        if self.tx.try_send(Box::new(span)).is_err() {
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
    /// The request's JSON up to the spans.
    head: Vec<u8>,
    connection: Option<SendRequest<Full<Bytes>>>,
    metrics: SpanMetrics,
    last_warning: Option<Instant>,
    /// Built once: the CA file is read at start, not per connection.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    /// The request target, in origin form.
    path: http::Uri,
}

impl Exporter {
    async fn run(mut self, rx: std::sync::mpsc::Receiver<Box<Record>>) {
        // Polled, not woken: the data path never pays for waking this task. Drained every
        // 50 ms (a queue of 8,192 then holds 160,000 spans/s), full batches sent at once,
        // partial ones within a second.
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        let mut oldest = Instant::now();
        loop {
            tick.tick().await;
            let mut closed = false;
            loop {
                match rx.try_recv() {
                    Ok(span) => {
                        if batch.is_empty() {
                            oldest = Instant::now();
                        }
                        batch.push(*span);
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
            if !batch.is_empty() && (closed || oldest.elapsed() >= EXPORT_EVERY) {
                self.export(std::mem::take(&mut batch)).await;
            }
            if closed {
                return;
            }
        }
    }

    async fn export(&mut self, spans: Vec<Record>) {
        let n = spans.len() as u64;
        let body = self.encode(&spans);
        let result = tokio::time::timeout(self.config.timeout.get(), self.post(body)).await;
        let error = match result {
            Ok(Ok(())) => {
                self.metrics.exported.inc_by(n);
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => {
                self.connection = None;
                format!("no answer within {}", self.config.timeout)
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
        let mut req = http::Request::post(self.path.clone())
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
        match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {} failed: {e}", c.authority))?;
                handshake(stream).await
            }
            None => handshake(tcp).await,
        }
    }

    /// The batch as an OTLP `ExportTraceServiceRequest` in JSON.
    fn encode(&self, spans: &[Record]) -> Bytes {
        let mut out = Vec::with_capacity(self.head.len() + spans.len() * 700 + 8);
        out.extend_from_slice(&self.head);
        for (i, s) in spans.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            span(&mut out, s);
        }
        out.extend_from_slice(b"]}]}]}");
        Bytes::from(out)
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

fn attribute(out: &mut Vec<u8>, key: &str, v: &str) {
    out.extend_from_slice(b"{\"key\":");
    string(out, key);
    out.extend_from_slice(b",\"value\":{\"stringValue\":");
    string(out, v);
    out.extend_from_slice(b"}}");
}

/// OTLP JSON writes 64-bit integers as strings.
fn int_attribute(out: &mut Vec<u8>, key: &str, v: u64) {
    out.extend_from_slice(b"{\"key\":");
    string(out, key);
    out.extend_from_slice(b",\"value\":{\"intValue\":\"");
    number(out, v);
    out.extend_from_slice(b"\"}}");
}

/// One span. Attributes follow the OpenTelemetry HTTP semantic conventions where one fits.
fn span(out: &mut Vec<u8>, r: &Record) {
    let e = &r.entry;
    let server = e.direction == crate::config::proxy::Direction::Inbound;
    let (start, end) = r.unix_nanos();
    out.extend_from_slice(b"{\"traceId\":\"");
    hex(out, e.trace.trace_id, 32);
    out.extend_from_slice(b"\",\"spanId\":\"");
    hex(out, u128::from(e.trace.span_id), 16);
    out.push(b'"');
    if let Some(p) = e.trace.parent_id {
        out.extend_from_slice(b",\"parentSpanId\":\"");
        hex(out, u128::from(p), 16);
        out.push(b'"');
    }
    out.extend_from_slice(b",\"name\":");
    match &r.routed.route {
        Some(route) => string(out, &format!("{} {route}", e.method)),
        None => string(out, e.method.as_str()),
    }
    // SPAN_KIND_SERVER = 2, SPAN_KIND_CLIENT = 3.
    out.extend_from_slice(if server {
        b",\"kind\":2"
    } else {
        b",\"kind\":3"
    });
    out.extend_from_slice(b",\"startTimeUnixNano\":\"");
    number(out, start);
    out.extend_from_slice(b"\",\"endTimeUnixNano\":\"");
    number(out, end);
    out.extend_from_slice(b"\",\"attributes\":[");
    attribute(out, "http.request.method", e.method.as_str());
    out.push(b',');
    attribute(out, "url.path", e.uri.path());
    out.push(b',');
    attribute(out, "server.address", e.authority());
    out.push(b',');
    int_attribute(out, "http.response.status_code", u64::from(r.status));
    out.push(b',');
    attribute(out, "outrigger.listener", &e.listener);
    let optional = [
        (
            "outrigger.route",
            r.routed.route.as_deref().map(String::as_str),
        ),
        (
            "outrigger.cluster",
            r.routed.cluster.as_deref().map(String::as_str),
        ),
        ("network.peer.address", r.routed.upstream.as_deref()),
        ("error.type", r.error.as_deref()),
        ("outrigger.peer.identity", e.identity.as_deref()),
        (
            "outrigger.request_id",
            Some(e.request_id()).filter(|v| !v.is_empty()),
        ),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            out.push(b',');
            attribute(out, key, v);
        }
    }
    if r.routed.retries > 0 {
        out.push(b',');
        int_attribute(out, "outrigger.retries", u64::from(r.routed.retries));
    }
    // Unset, or Error: 5xx on any span, 4xx on a client span (semantic conventions: a server's
    // 4xx is the caller's fault), or a response body the upstream broke. A client that went
    // away is not this hop's error (`error.type` still says so).
    let failed = r.status >= 500
        || (!server && r.status >= 400)
        || r.error.as_deref() == Some("upstream-reset");
    out.extend_from_slice(b"],\"status\":{\"code\":");
    out.push(if failed { b'2' } else { b'0' });
    if let Some(e) = r.error.as_deref().filter(|_| failed) {
        out.extend_from_slice(b",\"message\":");
        string(out, e);
    }
    out.extend_from_slice(b"}}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::record::tests::sample_record;

    #[test]
    fn spans_encode_as_otlp_json_with_hex_ids() {
        let mut r = sample_record();
        r.entry.trace.trace_id = 0x0af7651916cd43dd8448eb211c80319c;
        r.entry.trace.span_id = 0xb7ad6b7169203331;
        r.entry.trace.parent_id = Some(0x00f067aa0ba902b7);
        r.status = 503;
        r.error = Some("connect".into());
        r.duration = std::time::Duration::from_nanos(2_000);
        r.ended = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(3_000);
        let mut out = Vec::new();
        span(&mut out, &r);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(v["spanId"], "b7ad6b7169203331");
        assert_eq!(v["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(v["name"], "POST r");
        assert_eq!(v["kind"], 2);
        assert_eq!(v["startTimeUnixNano"], "1000");
        assert_eq!(v["endTimeUnixNano"], "3000");
        assert_eq!(v["status"]["code"], 2);
        assert_eq!(v["status"]["message"], "connect");
        let attrs = v["attributes"].as_array().unwrap();
        let get = |k: &str| {
            attrs
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
        };
        assert_eq!(get("http.response.status_code").unwrap()["intValue"], "503");
        assert_eq!(
            get("network.peer.address").unwrap()["stringValue"],
            "127.0.0.1:1"
        );
        assert_eq!(get("outrigger.retries").unwrap()["intValue"], "2");
        assert_eq!(
            get("outrigger.listener").unwrap()["stringValue"],
            "pub\"lic"
        );
        assert!(get("outrigger.request_id").is_none());
        assert!(get("outrigger.cluster").is_none());
    }
}
