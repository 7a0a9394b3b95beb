//! The `otlp` sink's request: a batch of NDJSON records as an OTLP/HTTP logs export request
//! in the JSON encoding (`POST /v1/logs`, `ExportLogsServiceRequest`), and the collector's
//! answer read for a partial success.
//!
//! Each record becomes one `LogRecord`: `body` is its `message` (or `msg`) when that is a
//! string, else the whole record as JSON text; `timeUnixNano` from `time` (RFC 3339), the send
//! time when absent; `severityText`/`severityNumber` from `level` (or `severity`); `traceId` and
//! `spanId` from `trace_id`/`span_id` when they are hex of the right length; every other field
//! an attribute (strings, booleans, integers and doubles as such, anything else as JSON text).
//! Records are grouped into one `ResourceLogs` per value of their `service` field, which
//! becomes the resource's `service.name` (the OpenTelemetry convention every backend groups by).
//!
//! Written by hand rather than with `opentelemetry-proto`: the JSON mapping is small and stable,
//! and the crate brings prost and tonic types for what is one JSON document per batch (as the
//! span exporter in `telemetry::otlp`).

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

/// The export request of one NDJSON batch.
pub fn export_request(ndjson: &[u8], now: SystemTime) -> Vec<u8> {
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string();
    let mut by_service: BTreeMap<Option<String>, Vec<Value>> = BTreeMap::new();
    for line in ndjson.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        // A record the encoder passed on but `Value` cannot hold (a lone surrogate escape, a
        // number beyond f64, nesting past serde_json's depth limit) is not dropped: it goes
        // as a record whose body is the line's text.
        let mut record = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(record)) => record,
            _ => {
                let mut m = Map::new();
                m.insert(
                    "message".into(),
                    Value::String(String::from_utf8_lossy(line).into_owned()),
                );
                m
            }
        };
        let service = match record.get("service") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        by_service
            .entry(service)
            .or_default()
            .push(log_record(&mut record, &now_ns));
    }
    let resource_logs: Vec<Value> = by_service
        .into_iter()
        .map(|(service, records)| {
            let attributes: Vec<Value> = service
                .into_iter()
                .map(|s| json!({"key": "service.name", "value": {"stringValue": s}}))
                .collect();
            json!({
                "resource": {"attributes": attributes},
                "scopeLogs": [{
                    "scope": {"name": "outrigger", "version": env!("CARGO_PKG_VERSION")},
                    "logRecords": records,
                }],
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "resourceLogs": resource_logs })).unwrap_or_default()
}

fn log_record(record: &mut Map<String, Value>, now_ns: &str) -> Value {
    let mut out = Map::new();
    let time = match record.remove("time") {
        Some(Value::String(t)) => match humantime::parse_rfc3339_weak(&t) {
            Ok(at) => Some(
                at.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
                    .to_string(),
            ),
            // Not a time we can read: kept as an attribute.
            Err(_) => {
                record.insert("time".into(), Value::String(t));
                None
            }
        },
        Some(other) => {
            record.insert("time".into(), other);
            None
        }
        None => None,
    };
    out.insert(
        "timeUnixNano".into(),
        Value::String(time.unwrap_or_else(|| now_ns.to_string())),
    );
    out.insert("observedTimeUnixNano".into(), Value::String(now_ns.into()));
    for key in ["level", "severity"] {
        if let Some(Value::String(level)) = record.get(key) {
            out.insert("severityText".into(), Value::String(level.clone()));
            if let Some(n) = severity_number(level) {
                out.insert("severityNumber".into(), n.into());
            }
            record.remove(key);
            break;
        }
    }
    for (key, otlp, len) in [("trace_id", "traceId", 32), ("span_id", "spanId", 16)] {
        if let Some(Value::String(id)) = record.get(key)
            && id.len() == len
            && id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            out.insert(otlp.into(), Value::String(id.to_ascii_lowercase()));
            record.remove(key);
        }
    }
    let body = ["message", "msg"]
        .into_iter()
        .find(|k| matches!(record.get(*k), Some(Value::String(_))))
        .and_then(|k| record.remove(k))
        .unwrap_or_else(|| Value::String(Value::Object(record.clone()).to_string()));
    out.insert("body".into(), any_value(body));
    let attributes: Vec<Value> = std::mem::take(record)
        .into_iter()
        .map(|(k, v)| json!({"key": k, "value": any_value(v)}))
        .collect();
    out.insert("attributes".into(), Value::Array(attributes));
    Value::Object(out)
}

/// An OTLP `AnyValue` (the JSON mapping writes 64-bit integers as strings).
fn any_value(v: Value) -> Value {
    match v {
        Value::String(s) => json!({ "stringValue": s }),
        Value::Bool(b) => json!({ "boolValue": b }),
        // int64 only: a larger integer as intValue makes the collector refuse the batch.
        Value::Number(n) if n.is_i64() => json!({ "intValue": n.to_string() }),
        Value::Number(n) if n.is_u64() => json!({ "stringValue": n.to_string() }),
        Value::Number(n) => json!({ "doubleValue": n.as_f64() }),
        other => json!({ "stringValue": other.to_string() }),
    }
}

/// OpenTelemetry's severity numbers for the usual level names (the first of each range).
fn severity_number(level: &str) -> Option<u8> {
    Some(match level.to_ascii_lowercase().as_str() {
        "trace" => 1,
        "debug" => 5,
        "info" | "information" | "notice" => 9,
        "warn" | "warning" => 13,
        "error" | "err" => 17,
        "fatal" | "critical" | "crit" | "panic" | "emergency" | "alert" => 21,
        _ => return None,
    })
}

/// The records a collector's `partialSuccess` says it refused, and its message.
pub fn rejected(answer: &[u8]) -> Option<(usize, String)> {
    let v: Value = serde_json::from_slice(answer).ok()?;
    let p = v.get("partialSuccess")?;
    // An int64 in the JSON mapping: a string, though some collectors write a number.
    let n = match p.get("rejectedLogRecords")? {
        Value::String(s) => s.parse().ok()?,
        Value::Number(n) => n.as_u64()? as usize,
        _ => return None,
    };
    let message = p
        .get("errorMessage")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    (n > 0).then_some((n, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_log_records_grouped_by_service() {
        let body = export_request(
            br#"{"message":"hi","level":"WARN","time":"2024-05-01T10:00:00.5Z","service":"shop","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","n":3,"ok":true,"source":"app"}
{"a":{"b":1},"source":"app","time":"not a time"}
"#,
            SystemTime::UNIX_EPOCH,
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        let rl = v["resourceLogs"].as_array().unwrap();
        assert_eq!(rl.len(), 2);
        let shop = rl
            .iter()
            .find(|r| r["resource"]["attributes"][0]["value"]["stringValue"] == "shop")
            .unwrap();
        let r = &shop["scopeLogs"][0]["logRecords"][0];
        assert_eq!(r["body"]["stringValue"], "hi");
        assert_eq!(r["timeUnixNano"], "1714557600500000000");
        assert_eq!(r["severityText"], "WARN");
        assert_eq!(r["severityNumber"], 13);
        assert_eq!(r["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r["spanId"], "00f067aa0ba902b7");
        let attr = |name: &str| {
            r["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == name)
                .map(|a| a["value"].clone())
        };
        assert_eq!(attr("n").unwrap()["intValue"], "3");
        assert_eq!(attr("ok").unwrap()["boolValue"], true);
        assert_eq!(attr("service").unwrap()["stringValue"], "shop");
        assert!(attr("message").is_none() && attr("time").is_none());
        let other = rl
            .iter()
            .find(|r| r["resource"]["attributes"].as_array().unwrap().is_empty())
            .unwrap();
        let r = &other["scopeLogs"][0]["logRecords"][0];
        // No message: the record is the body; an unreadable time stays an attribute.
        assert!(
            r["body"]["stringValue"]
                .as_str()
                .unwrap()
                .contains("\"b\":1")
        );
        assert_eq!(r["timeUnixNano"], "0");
    }

    /// Records the encoder passes but `Value` cannot hold still go (as their text), and an
    /// integer beyond int64 goes as a string: one such value must not lose the batch.
    #[test]
    fn unreadable_records_and_huge_integers_are_not_lost() {
        let body = export_request(
            b"{\"m\":\"\\ud800\"}\n{\"n\":1e400}\n{\"id\":18446744073709551615}\n",
            SystemTime::UNIX_EPOCH,
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        let records = v["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
            .as_array()
            .unwrap();
        assert_eq!(records.len(), 3, "{v}");
        assert!(
            records[0]["body"]["stringValue"]
                .as_str()
                .unwrap()
                .contains("ud800")
        );
        let id = &records[2]["attributes"][0];
        assert_eq!(id["key"], "id");
        assert_eq!(id["value"]["stringValue"], "18446744073709551615");
    }

    #[test]
    fn a_partial_success_is_read() {
        assert_eq!(
            rejected(br#"{"partialSuccess":{"rejectedLogRecords":"2","errorMessage":"too old"}}"#),
            Some((2, "too old".into()))
        );
        assert_eq!(rejected(br#"{"partialSuccess":{}}"#), None);
        assert_eq!(rejected(b"{}"), None);
        assert_eq!(rejected(b""), None);
    }
}
