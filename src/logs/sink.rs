//! Sinks: where batches of NDJSON records go, and what counts as acknowledged.
//!
//! - `http`: one POST per batch (`Content-Type: application/x-ndjson`); a 2xx answer
//!   acknowledges it. 408, 429, 5xx, a timeout or a connection error is a failed attempt (sent
//!   again); 413 (too large) has the batch sent again in halves (down to single records); any
//!   other 4xx is a refusal: the batch will never be accepted, so it is dropped and counted
//!   (`reason="rejected"`) rather than stalling every line behind it.
//! - `loki`: Loki's push API (JSON), acknowledged and retried like `http`; records grouped
//!   into streams by the values of `labels`, at most [`MAX_LOKI_STREAMS`] label sets.
//! - `otlp`: an OTLP/HTTP logs export request, JSON encoding ([`super::otlp`]); a
//!   `partialSuccess` naming refused records counts them as refused.
//! - `elasticsearch`: `_bulk` ([`super::bulk`]); items refused with 429 or 5xx are sent again,
//!   alone, other refused items are counted; an answer without one item per record is a failed
//!   attempt.
//! - `gzip: true` compresses the request body of any of the HTTP sinks (once per batch; every
//!   retry sends the same bytes).
//! - Every HTTP sink takes an `https://` URL: TLS with rustls through
//!   [`crate::tls::client`], verified against `tls.ca` or the system's roots (a cluster's
//!   `tls` keys and checks), read again when its files change (the next connection uses the
//!   new material). A failed handshake is a failed attempt, retried like any other.
//! - `file`: appended and `fdatasync`ed before it counts as acknowledged.
//! - `stdout`: written and flushed.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;

use crate::config::logs::LogSink;
use crate::tls::client::HttpsClient;

/// How a batch fared.
#[derive(Debug)]
pub enum SendError {
    /// Try again later.
    Failed(String),
    /// The sink will never take this batch.
    Rejected(String),
    /// The sink will not take a batch this large (HTTP 413): smaller pieces may go through.
    TooLarge(String),
    /// The sink took the batch but for `rejected` of its records (Loki's 400 naming how many
    /// entries it ignored): sending it again would double the others.
    Partial { rejected: usize, message: String },
    /// The sink took some records, refused `rejected` for good, and asks for the records at
    /// `retry` (positions in the batch, ascending) again (`_bulk`'s item errors).
    Items {
        retry: Vec<usize>,
        rejected: usize,
        message: String,
    },
}

pub enum Sink {
    Stdout,
    File(PathBuf),
    Http(Box<HttpSink>),
    Loki(Box<LokiSink>),
    Otlp(Box<HttpSink>),
    Elasticsearch(Box<HttpSink>, String),
}

/// A POST endpoint.
pub struct HttpSink {
    client: Client,
    url: http::Uri,
    timeout: Duration,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    content_type: &'static str,
    gzip: bool,
}

/// Loki's push API: records grouped into streams by the values of `labels`.
pub struct LokiSink {
    http: HttpSink,
    labels: Vec<String>,
    /// Label sets pushed so far; past [`MAX_LOKI_STREAMS`] a new set goes to the overflow
    /// stream (`{overflow="true"}`), so a high-cardinality field cannot flood Loki's index.
    streams: std::sync::Mutex<std::collections::HashSet<Vec<(String, String)>>>,
    /// The last timestamp given to an entry (ns): the next batch starts after it, so entries
    /// stay in order per stream even when the clock steps back or batches come within the
    /// same nanoseconds (Loki refuses out-of-order entries unless configured otherwise).
    last_ns: std::sync::atomic::AtomicU64,
}

/// The HTTPS client of a sink with an `https://` URL: rebuilt when its TLS files change.
pub type SinkClient = crate::tls::client::ReloadingClient<Full<Bytes>>;

/// How long an idle pooled connection to a sink is kept.
pub const IDLE: Duration = Duration::from_secs(30);

/// How an HTTP sink sends: a plain client for `http://`, or the reloading one for `https://`.
enum Client {
    Plain(Box<HttpsClient<Full<Bytes>>>),
    Tls(std::sync::Arc<SinkClient>),
}

impl Client {
    /// The client for the next request (the TLS material held now).
    fn get(&self) -> HttpsClient<Full<Bytes>> {
        match self {
            Client::Plain(c) => (**c).clone(),
            Client::Tls(t) => (*t.client()).clone(),
        }
    }
}

/// How much of a refusal's body is kept for the log line: Loki's ends with the count of the
/// entries it ignored, after one line per ignored entry (up to a handful).
const MAX_ERROR_BODY: usize = 4096;

/// Distinct label sets one sidecar pushes to Loki.
pub const MAX_LOKI_STREAMS: usize = 1000;
/// Longer label values are cut to this many bytes.
const MAX_LABEL_VALUE: usize = 128;

impl HttpSink {
    fn new(
        url: &http::Uri,
        timeout: crate::config::Duration,
        headers: &[crate::config::logs::SinkHeader],
        content_type: &'static str,
        gzip: bool,
        tls: Option<std::sync::Arc<SinkClient>>,
    ) -> HttpSink {
        // An `https://` URL without a client (never from the config: preflight built one)
        // trusts nothing, so its requests fail rather than go out unverified.
        let client = match tls {
            Some(t) => Client::Tls(t),
            None => Client::Plain(Box::new(crate::tls::client::https_client(None, None, IDLE))),
        };
        HttpSink {
            client,
            url: url.clone(),
            timeout: timeout.get(),
            // Names and values were checked with the config. Marked sensitive: hyper and the
            // `http` types print such a value as `Sensitive`, never its text.
            headers: headers
                .iter()
                .filter_map(|h| {
                    let mut value = http::HeaderValue::try_from(h.value.expose()).ok()?;
                    value.set_sensitive(true);
                    Some((http::HeaderName::try_from(h.name.as_str()).ok()?, value))
                })
                .collect(),
            content_type,
            gzip,
        }
    }

    /// POSTs one prepared body; the answer's body once it is a 2xx.
    async fn post(&self, body: Bytes) -> Result<Bytes, SendError> {
        let mut req = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, self.content_type);
        if self.gzip {
            req = req.header(http::header::CONTENT_ENCODING, "gzip");
        }
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| SendError::Rejected(e.to_string()))?;
        let call = async {
            let resp = self
                .client
                .get()
                .request(req)
                .await
                .map_err(|e| crate::errors::chain(&e))?;
            let status = resp.status();
            // Read the answer to its end so the connection can be used again. An answer cut
            // off is a failed send (sent again): `_bulk` and OTLP answers say which records
            // were refused, and an empty one would read as "all taken".
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("the answer broke off: {e}"))?;
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(SendError::Failed(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
            Ok(Err(e)) => Err(SendError::Failed(e)),
            Ok(Ok((s, body))) if s.is_success() => Ok(body),
            Ok(Ok((s, _))) if s == http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(SendError::TooLarge(format!("answered {s}")))
            }
            // A refusal that retrying cannot fix (a malformed or too large batch) is dropped
            // and counted; an answer that says "not now" or "not you, yet" (a token being
            // rotated, a route not yet deployed) is retried, keeping the files' positions.
            Ok(Ok((s, body)))
                if s.is_client_error()
                    && !matches!(
                        s,
                        http::StatusCode::REQUEST_TIMEOUT
                            | http::StatusCode::TOO_MANY_REQUESTS
                            | http::StatusCode::UNAUTHORIZED
                            | http::StatusCode::FORBIDDEN
                            | http::StatusCode::NOT_FOUND
                    ) =>
            {
                let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY)]);
                Err(SendError::Rejected(format!(
                    "answered {s}: {}",
                    text.trim()
                )))
            }
            Ok(Ok((s, _))) => Err(SendError::Failed(format!("answered {s}"))),
        }
    }
}

impl LokiSink {
    /// The push request of one NDJSON batch: `{"streams":[{"stream":{labels},"values":[[ns,
    /// line]…]}]}`, each record's JSON as its log line, timestamps from now (one nanosecond
    /// apart, so the batch's order is kept and a retry sends the very same entries).
    fn push_body(&self, ndjson: &[u8]) -> Bytes {
        use std::sync::atomic::Ordering;
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let lines = memchr::memchr_iter(b'\n', ndjson).count() as u64;
        let mut now = 0;
        let _ = self
            .last_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                now = clock.max(last + 1);
                Some(now + lines.max(1) - 1)
            });
        // Each record's label values, read in one pass over its top-level members (no tree):
        // records are the encoder's own output, so this only finds where the values are.
        type Labels = Vec<(String, String)>;
        let mut streams: std::collections::BTreeMap<Labels, Vec<(u64, &[u8])>> = Default::default();
        let mut seen = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut raw: Vec<Option<&str>> = vec![None; self.labels.len()];
        for (i, line) in ndjson
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            raw.fill(None);
            let text = std::str::from_utf8(line).unwrap_or("");
            // A repeated key: the last one, as in serde_json's map.
            let whole = super::parse::scan::members(text, |k, v| {
                for (l, r) in self.labels.iter().zip(raw.iter_mut()) {
                    if *l == *k {
                        *r = Some(v);
                    }
                }
            });
            if !whole {
                raw.fill(None);
            }
            let mut labels: Vec<(String, String)> = self
                .labels
                .iter()
                .zip(&raw)
                .filter_map(|(k, v)| {
                    let v = (*v)?;
                    let v = match v.as_bytes()[0] {
                        b'"' => serde_json::from_str::<String>(v).ok()?,
                        b'n' => return None,
                        // Numbers, booleans, objects and arrays as serde_json writes them.
                        _ => serde_json::from_str::<serde_json::Value>(v)
                            .ok()?
                            .to_string(),
                    };
                    let mut cut = v.len().min(MAX_LABEL_VALUE);
                    while !v.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    Some((k.clone(), v[..cut].to_string()))
                })
                .collect();
            if labels.is_empty() {
                labels.push(("job".into(), "outrigger".into()));
            }
            if !seen.contains(&labels) {
                if seen.len() < MAX_LOKI_STREAMS {
                    seen.insert(labels.clone());
                } else {
                    labels = vec![("overflow".into(), "true".into())];
                }
            }
            streams
                .entry(labels)
                .or_default()
                .push((now + i as u64, line));
        }
        drop(seen);
        // `{"streams":[{"stream":{labels},"values":[["ns","line"],…]},…]}`, written directly.
        use crate::telemetry::json;
        let mut out = Vec::with_capacity(ndjson.len() + ndjson.len() / 8 + 64);
        out.extend_from_slice(b"{\"streams\":[");
        for (n, (labels, lines)) in streams.into_iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"stream\":{");
            for (j, (k, v)) in labels.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                json::string(&mut out, k);
                out.push(b':');
                json::string(&mut out, v);
            }
            out.extend_from_slice(b"},\"values\":[");
            for (j, (ns, line)) in lines.into_iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"[\"");
                json::number(&mut out, ns);
                out.extend_from_slice(b"\",");
                json::string(&mut out, &String::from_utf8_lossy(line));
                out.push(b']');
            }
            out.extend_from_slice(b"]}");
        }
        out.extend_from_slice(b"]}");
        Bytes::from(out)
    }
}

impl Sink {
    /// The sink for `config`; `tls`: the client for an `https://` URL.
    pub fn new(config: &LogSink, tls: Option<std::sync::Arc<SinkClient>>) -> Sink {
        match config {
            LogSink::Stdout => Sink::Stdout,
            LogSink::File(p) => Sink::File(p.clone()),
            LogSink::Http {
                url,
                timeout,
                headers,
                gzip,
                tls: _,
            } => Sink::Http(Box::new(HttpSink::new(
                url,
                *timeout,
                headers,
                "application/x-ndjson",
                *gzip,
                tls,
            ))),
            LogSink::Otlp {
                url,
                timeout,
                headers,
                gzip,
                tls: _,
            } => Sink::Otlp(Box::new(HttpSink::new(
                url,
                *timeout,
                headers,
                "application/json",
                *gzip,
                tls,
            ))),
            LogSink::Elasticsearch {
                url,
                timeout,
                headers,
                index,
                gzip,
                tls: _,
            } => Sink::Elasticsearch(
                Box::new(HttpSink::new(
                    url,
                    *timeout,
                    headers,
                    "application/x-ndjson",
                    *gzip,
                    tls,
                )),
                index.clone(),
            ),
            LogSink::Loki {
                url,
                timeout,
                headers,
                labels,
                gzip,
                tls: _,
            } => Sink::Loki(Box::new(LokiSink {
                http: HttpSink::new(url, *timeout, headers, "application/json", *gzip, tls),
                // Each once: the config refuses a label named twice.
                labels: labels.clone(),
                streams: Default::default(),
                last_ns: Default::default(),
            })),
        }
    }

    /// What is sent for a batch of NDJSON records, built once so every retry sends the same.
    pub fn prepare(&self, ndjson: Bytes) -> Bytes {
        self.prepare_with_ids(ndjson, &[])
    }

    /// Whether records need ids (`_bulk`'s `_id`, so a resent record is not stored twice).
    pub fn wants_ids(&self) -> bool {
        matches!(self, Sink::Elasticsearch(..))
    }

    /// [`Sink::prepare`], with each record's id (`elasticsearch` only; others ignore them).
    pub fn prepare_with_ids(&self, ndjson: Bytes, ids: &[&str]) -> Bytes {
        let (body, gzip) = match self {
            Sink::Loki(l) => (l.push_body(&ndjson), l.http.gzip),
            Sink::Otlp(h) => (
                Bytes::from(super::otlp::export_request(
                    &ndjson,
                    std::time::SystemTime::now(),
                )),
                h.gzip,
            ),
            Sink::Elasticsearch(h, index) => (
                Bytes::from(super::bulk::request_with_ids(&ndjson, index, ids)),
                h.gzip,
            ),
            Sink::Http(h) => (ndjson, h.gzip),
            Sink::Stdout | Sink::File(_) => (ndjson, false),
        };
        if !gzip {
            return body;
        }
        // Level 6 (zlib's default): NDJSON logs shrink 8–12× at ~60 MB/s a core; a faster
        // level saves little CPU for a third more bytes on the wire.
        let mut z = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 4),
            flate2::Compression::default(),
        );
        use std::io::Write;
        match z.write_all(&body).and_then(|()| z.finish()) {
            Ok(gz) => Bytes::from(gz),
            // Writing to a Vec cannot fail; were it to, the sink would get a broken body.
            Err(_) => Bytes::new(),
        }
    }

    /// Sends one prepared batch of `records`; Ok once the sink has acknowledged it.
    pub async fn send(&self, body: Bytes, records: usize) -> Result<(), SendError> {
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
            Sink::Http(h) => h.post(body).await.map(drop),
            Sink::Otlp(h) => {
                let answer = h.post(body).await?;
                match super::otlp::rejected(&answer) {
                    Some((rejected, message)) => Err(SendError::Partial { rejected, message }),
                    None => Ok(()),
                }
            }
            Sink::Elasticsearch(h, _) => {
                let answer = h.post(body).await?;
                match super::bulk::outcome(&answer, records) {
                    Ok(Some(o)) => Err(SendError::Items {
                        retry: o.retry,
                        rejected: o.rejected,
                        message: o.message,
                    }),
                    Ok(None) => Ok(()),
                    Err(e) => Err(SendError::Failed(e)),
                }
            }
            Sink::Loki(l) => match l.http.post(body).await.map(drop) {
                Err(SendError::Rejected(message)) => match loki_ignored(&message) {
                    Some(rejected) => Err(SendError::Partial { rejected, message }),
                    None => Err(SendError::Rejected(message)),
                },
                other => other,
            },
        }
    }
}

/// How many entries a Loki 400 says it ignored: Loki takes the valid entries of a push and
/// answers 400 listing the others, ending with `total ignored: N out of M`.
fn loki_ignored(message: &str) -> Option<usize> {
    let rest = &message[message.rfind("total ignored: ")? + "total ignored: ".len()..];
    let (n, rest) = rest.split_once(" out of ")?;
    let m: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let (n, m) = (n.trim().parse::<usize>().ok()?, m.parse::<usize>().ok()?);
    (n < m).then_some(n)
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
    fn loki_push_groups_records_into_labelled_streams_and_bounds_them() {
        let sink = Sink::new(
            &LogSink::Loki {
                url: "http://loki:3100/loki/api/v1/push".parse().unwrap(),
                timeout: crate::config::Duration::from_secs(1),
                headers: vec![],
                labels: vec!["source".into(), "level".into()],
                gzip: false,
                tls: None,
            },
            None,
        );
        let body = sink.prepare(Bytes::from_static(
            b"{\"source\":\"app\",\"level\":\"info\",\"message\":\"a\"}\n{\"source\":\"app\",\"message\":\"b\"}\n{\"source\":\"app\",\"level\":\"info\",\"message\":\"c\"}\n",
        ));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2);
        let info = streams
            .iter()
            .find(|s| s["stream"]["level"] == "info")
            .unwrap();
        assert_eq!(info["stream"]["source"], "app");
        // Each label is written once.
        let object = &body[..];
        let from = memchr::memmem::find(object, b"{\"stream\":{").unwrap();
        let to = from + memchr::memmem::find(&object[from..], b"}").unwrap();
        assert_eq!(
            memchr::memmem::find_iter(&object[from..to], b"\"source\"").count(),
            1,
            "{}",
            String::from_utf8_lossy(object)
        );
        let values = info["values"].as_array().unwrap();
        assert_eq!(values.len(), 2);
        let (t0, t1): (u128, u128) = (
            values[0][0].as_str().unwrap().parse().unwrap(),
            values[1][0].as_str().unwrap().parse().unwrap(),
        );
        assert!(t0 < t1);
        assert!(values[1][1].as_str().unwrap().contains("\"c\""));

        let Sink::Loki(l) = &sink else { unreachable!() };
        for i in 0..MAX_LOKI_STREAMS {
            l.streams
                .lock()
                .unwrap()
                .insert(vec![("n".into(), i.to_string())]);
        }
        let body = sink.prepare(Bytes::from_static(b"{\"source\":\"new\"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["streams"][0]["stream"]["overflow"], "true");
    }

    #[test]
    fn loki_labels_are_read_from_each_records_members_and_entries_keep_the_batch_order() {
        let sink = Sink::new(
            &LogSink::Loki {
                url: "http://loki:3100/loki/api/v1/push".parse().unwrap(),
                timeout: crate::config::Duration::from_secs(1),
                headers: vec![],
                labels: vec!["s".into(), "n".into()],
                gzip: false,
                tls: None,
            },
            None,
        );
        let body = sink.prepare(Bytes::from_static(
            b"{\"n\":5,\"s\":\"a\\\"b\",\"m\":\"x\\u00e9\"}\n{\"n\":null}\n{\"s\":\"old\",\"n\":5.0,\"s\":\"a\\\"b\"}\n",
        ));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 3, "{v}");
        let find = |f: &dyn Fn(&serde_json::Value) -> bool| {
            streams.iter().find(|s| f(&s["stream"])).unwrap().clone()
        };
        let a = find(&|s| s["n"] == "5");
        assert_eq!(a["stream"]["s"], "a\"b");
        assert_eq!(a["stream"].as_object().unwrap().len(), 2);
        let record: serde_json::Value =
            serde_json::from_str(a["values"][0][1].as_str().unwrap()).unwrap();
        assert_eq!(record["m"], "x\u{e9}");
        let b = find(&|s| s["n"] == "5.0");
        assert_eq!(b["stream"]["s"], "a\"b");
        let job = find(&|s| s["job"] == "outrigger");
        let ns = |s: &serde_json::Value| -> u128 {
            s["values"][0][0].as_str().unwrap().parse().unwrap()
        };
        assert_eq!(ns(&job), ns(&a) + 1);
        assert_eq!(ns(&b), ns(&a) + 2);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(2);
        assert!(backoff(0, max) <= RETRY_BASE);
        assert!(backoff(3, max) >= RETRY_BASE * 4);
        assert!(backoff(30, max) <= max);
    }

    #[test]
    fn loki_timestamps_never_go_back_and_partial_refusals_are_read() {
        let sink = Sink::new(
            &LogSink::Loki {
                url: "http://loki:3100/loki/api/v1/push".parse().unwrap(),
                timeout: crate::config::Duration::from_secs(1),
                headers: vec![],
                labels: vec!["source".into()],
                gzip: false,
                tls: None,
            },
            None,
        );
        let Sink::Loki(l) = &sink else { unreachable!() };
        // As if the last batch had been stamped an hour ahead (the clock stepped back since).
        let ahead = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            + 3_600_000_000_000;
        l.last_ns.store(ahead, std::sync::atomic::Ordering::SeqCst);
        let body = sink.prepare(Bytes::from_static(
            b"{\"source\":\"a\"}\n{\"source\":\"a\"}\n",
        ));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let ts: Vec<u64> = v["streams"][0]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[0].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(ts, [ahead + 1, ahead + 2]);

        let answer = "entry with timestamp 2026-01-01 ignored, reason: 'entry too far behind' for stream: {source=\"a\"},\ntotal ignored: 1 out of 3";
        assert_eq!(loki_ignored(answer), Some(1));
        assert_eq!(loki_ignored("total ignored: 3 out of 3"), None);
        assert_eq!(loki_ignored("bad request"), None);
    }
}
