//! Parse, redact and enrich one line into one NDJSON record.
//!
//! In order: the redaction rules (`logs.redact`) run over the raw line first, so nothing they
//! match leaves the process in any field; then the line is parsed (`json`: a JSON object keeps
//! its fields; `plain`: the line becomes `message`; `auto`: JSON when it parses as an object);
//! then Outrigger adds `source`, `stream` (app) or `file` (files), the configured fields (not
//! replacing the line's own), `time` (the read time, when the line has none of `time`,
//! `timestamp`, `ts`, `@timestamp`), and `trace_id`/`span_id` lifted from `traceId`/`spanId`,
//! `trace.id`/`span.id` or a W3C `traceparent`, so logs join traces.

use std::borrow::Cow;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::config::logs::{LineFormat, Redact};

/// Where a line came from.
pub enum Origin<'a> {
    Stream(&'a str),
    File(&'a std::path::Path),
}

/// Turns lines into records; built once per run.
pub struct Encoder {
    redact: Vec<Redact>,
    /// Static fields and those from the environment.
    fields: Vec<(String, Value)>,
}

const TIME_KEYS: &[&str] = &["time", "timestamp", "ts", "@timestamp"];
const TRACE_KEYS: &[&str] = &["trace_id", "traceId", "traceid", "trace.id"];
const SPAN_KEYS: &[&str] = &["span_id", "spanId", "spanid", "span.id"];

impl Encoder {
    pub fn new(redact: Vec<Redact>, fields: Vec<(String, String)>) -> Encoder {
        Encoder {
            redact,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        }
    }

    /// Appends the record of `line` and a `\n` to `out`.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        line: &[u8],
        source: &str,
        format: LineFormat,
        origin: Origin<'_>,
        now: SystemTime,
    ) {
        let mut text = String::from_utf8_lossy(line);
        for r in &self.redact {
            if let Cow::Owned(s) = r.pattern.replace_all(&text, r.mask.as_str()) {
                text = Cow::Owned(s);
            }
        }
        let parsed = match format {
            LineFormat::Plain => None,
            _ if !text.trim_start().starts_with('{') => None,
            _ => serde_json::from_str::<Map<String, Value>>(&text).ok(),
        };
        let mut record = match parsed {
            Some(mut obj) => {
                lift(&mut obj);
                obj
            }
            None => {
                let mut m = Map::new();
                m.insert("message".into(), Value::String(text.into_owned()));
                m
            }
        };
        if !TIME_KEYS.iter().any(|k| record.contains_key(*k)) {
            let mut t = Vec::with_capacity(27);
            crate::telemetry::json::time(&mut t, now);
            record.insert(
                "time".into(),
                Value::String(String::from_utf8(t).unwrap_or_default()),
            );
        }
        for (k, v) in &self.fields {
            if !record.contains_key(k) {
                record.insert(k.clone(), v.clone());
            }
        }
        record.insert("source".into(), Value::String(source.into()));
        match origin {
            Origin::Stream(s) => record.insert("stream".into(), Value::String(s.into())),
            Origin::File(p) => record.insert(
                "file".into(),
                Value::String(p.to_string_lossy().into_owned()),
            ),
        };
        // Writing a Map to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &record);
        out.push(b'\n');
    }
}

/// Copies a trace and span id found under another name to `trace_id` and `span_id`.
fn lift(obj: &mut Map<String, Value>) {
    let find = |obj: &Map<String, Value>, keys: &[&str]| {
        keys.iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_str).map(str::to_owned))
    };
    let mut trace = find(obj, TRACE_KEYS);
    let mut span = find(obj, SPAN_KEYS);
    if trace.is_none()
        && let Some(tp) = obj.get("traceparent").and_then(Value::as_str)
    {
        // version-traceid-spanid-flags
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() == 4 && parts[1].len() == 32 && parts[2].len() == 16 {
            trace = Some(parts[1].to_owned());
            span = span.or(Some(parts[2].to_owned()));
        }
    }
    if let Some(t) = trace {
        obj.entry("trace_id").or_insert(Value::String(t));
    }
    if let Some(s) = span {
        obj.entry("span_id").or_insert(Value::String(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc() -> Encoder {
        Encoder::new(
            vec![Redact {
                pattern: regex::Regex::new(r"password=\S+").unwrap(),
                mask: "password=***".into(),
            }],
            vec![("service".into(), "shop".into())],
        )
    }

    fn record(line: &str, format: LineFormat) -> Map<String, Value> {
        let mut out = Vec::new();
        enc().encode(
            &mut out,
            line.as_bytes(),
            "app",
            format,
            Origin::Stream("stdout"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn plain_lines_become_messages_with_fields_and_redaction() {
        let r = record("login password=hunter2 ok", LineFormat::Auto);
        assert_eq!(r["message"], "login password=*** ok");
        assert_eq!(r["service"], "shop");
        assert_eq!(r["source"], "app");
        assert_eq!(r["stream"], "stdout");
        assert_eq!(r["time"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn json_lines_keep_their_fields_and_lift_trace_ids() {
        let r = record(
            r#"{"msg":"hi","traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7","service":"own","ts":1}"#,
            LineFormat::Auto,
        );
        assert_eq!(r["msg"], "hi");
        assert_eq!(r["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r["span_id"], "00f067aa0ba902b7");
        assert_eq!(r["service"], "own");
        assert!(r.get("time").is_none());
        let r = record(
            r#"{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","note":"x password=y z"}"#,
            LineFormat::Json,
        );
        assert_eq!(r["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r["note"], "x password=*** z");
        let r = record(r#"{"a":1}"#, LineFormat::Plain);
        assert_eq!(r["message"], r#"{"a":1}"#);
    }
}
