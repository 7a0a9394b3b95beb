//! The record of one proxied request, for the access log and span export: what is known when
//! the request arrives ([`Entry`]), what the proxy learned routing it ([`Routed`], put in the
//! response's extensions) and how it ended ([`Record`]), handed over by [`Recorder::finish`].
//! The proxy finishes it when the response body is done or dropped (`proxy::record`).
//!
//! The data path only copies cheap handles (the request's `Uri` and header values share the
//! bytes hyper read) and hands the record over; lines and spans are encoded on the writer
//! thread and the exporter task.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;

use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Name;
use crate::telemetry::otlp::SpanExporter;
use crate::telemetry::trace::TraceContext;

/// Where finished records go: the access log, span export, or both.
#[derive(Clone)]
pub struct Recorder {
    pub log: Option<AccessLog>,
    pub spans: Option<SpanExporter>,
}

impl Recorder {
    /// Whether this request needs a record at all: the access log takes every request, the
    /// exporter only sampled ones.
    pub fn wants(&self, trace: &TraceContext) -> bool {
        self.log.is_some() || (trace.sampled && self.spans.is_some())
    }
}

/// What is known of a request when it arrives.
#[derive(Clone)]
pub struct Entry {
    pub started: Instant,
    pub direction: crate::config::proxy::Direction,
    pub listener: Name,
    pub method: http::Method,
    pub uri: http::Uri,
    /// The Host header, when the URI has no authority.
    pub host: Option<HeaderValue>,
    pub bytes_in: Option<u64>,
    pub trace: TraceContext,
    pub request_id: Option<HeaderValue>,
    pub identity: Option<Arc<str>>,
}

impl Entry {
    pub fn authority(&self) -> &str {
        match self.uri.authority() {
            Some(a) => a.as_str(),
            None => self
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default(),
        }
    }
    pub fn request_id(&self) -> &str {
        self.request_id
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
    }
}

/// What the proxy learned while handling a request: put in the response's extensions.
#[derive(Clone, Debug, Default)]
pub struct Routed {
    pub route: Option<Name>,
    pub cluster: Option<Name>,
    pub upstream: Option<Arc<str>>,
    pub retries: u32,
}

/// A finished request.
#[derive(Clone)]
pub struct Record {
    pub entry: Entry,
    /// When the response was done (the end of its body).
    pub ended: SystemTime,
    pub duration: Duration,
    pub status: u16,
    /// Why Outrigger answered itself, or why the response did not complete.
    pub error: Option<String>,
    pub routed: Routed,
    pub bytes_out: u64,
}

impl Record {
    /// Unix nanoseconds of the start and the end (0 for a clock before 1970).
    pub fn unix_nanos(&self) -> (u64, u64) {
        let end = self
            .ended
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (end.saturating_sub(self.duration.as_nanos() as u64), end)
    }
}

impl Recorder {
    /// Finishes a request's record and hands it over: to the access log, and to the span
    /// exporter when the request is sampled. `entry`: what was known when it arrived.
    pub fn finish(
        &self,
        entry: Entry,
        status: u16,
        error: Option<String>,
        routed: Routed,
        bytes_out: u64,
    ) {
        let sampled = entry.trace.sampled;
        let record = Record {
            duration: entry.started.elapsed(),
            ended: SystemTime::now(),
            entry,
            status,
            error,
            routed,
            bytes_out,
        };
        match (&self.log, &self.spans) {
            (Some(log), Some(spans)) if sampled => {
                spans.send(record.clone());
                log.send(record);
            }
            (Some(log), _) => log.send(record),
            (None, Some(spans)) if sampled => spans.send(record),
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::telemetry::trace::Format;
    use std::time::UNIX_EPOCH;

    /// A finished request with most fields set, for encoder tests.
    pub(crate) fn sample_record() -> Record {
        Record {
            entry: Entry {
                started: Instant::now(),
                direction: crate::config::proxy::Direction::Inbound,
                listener: Arc::new("pub\"lic".into()),
                method: http::Method::POST,
                uri: "/a%22b/c".parse().unwrap(),
                host: Some(HeaderValue::from_static("shop")),
                bytes_in: Some(12),
                trace: TraceContext {
                    trace_id: 0xabc,
                    parent_id: None,
                    span_id: 0x1f,
                    sampled: true,
                    format: Format::None,
                },
                request_id: None,
                identity: Some(Arc::from("spiffe://x/ns/é")),
            },
            ended: UNIX_EPOCH,
            duration: Duration::ZERO,
            status: 201,
            error: None,
            routed: Routed {
                route: Some(Arc::new("r".into())),
                cluster: None,
                upstream: Some(Arc::from("127.0.0.1:1")),
                retries: 2,
            },
            bytes_out: 5,
        }
    }
}
