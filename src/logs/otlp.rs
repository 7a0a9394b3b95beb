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

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::Value;

use crate::telemetry::json;

/// The export request of one NDJSON batch.
///
/// Written from each record's top-level members as [`super::parse::scan`] finds them, with no
/// `serde_json::Value` tree per record (only a nested object or array, or a number other than
/// a plain integer, goes through serde_json, so they print as before). The output is the one
/// the `Value`-based encoder gave, byte for byte (checked against it in the tests): members in
/// key order, a repeated key's last value, a record `Value` could not hold sent as its text.
pub fn export_request(ndjson: &[u8], now: SystemTime) -> Vec<u8> {
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string();
    let now_ns = now_ns.as_str();
    // Each service's records, already encoded and joined by commas.
    let mut by_service: BTreeMap<Option<String>, Vec<u8>> = BTreeMap::new();
    let mut members: Vec<(Cow<'_, str>, Member<'_>)> = Vec::new();
    for line in ndjson.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        members.clear();
        // A record the encoder passed on but `Value` cannot hold (a lone surrogate escape, a
        // number beyond f64, nesting past serde_json's depth limit) is not dropped: it goes
        // as a record whose body is the line's text.
        if !read_members(line, &mut members) {
            members.clear();
            members.push((
                Cow::Borrowed("message"),
                Member::Str(String::from_utf8_lossy(line)),
            ));
        }
        let service = members.iter().find_map(|(k, v)| match v {
            Member::Str(s) if k == "service" => Some(s.to_string()),
            _ => None,
        });
        let out = by_service.entry(service).or_default();
        if !out.is_empty() {
            out.push(b',');
        }
        log_record(out, &mut members, now_ns);
    }
    let mut out = Vec::with_capacity(ndjson.len() + ndjson.len() / 2 + 128);
    out.extend_from_slice(b"{\"resourceLogs\":[");
    for (i, (service, records)) in by_service.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"resource\":{\"attributes\":[");
        if let Some(s) = service {
            out.extend_from_slice(b"{\"key\":\"service.name\",\"value\":{\"stringValue\":");
            json::string(&mut out, s);
            out.extend_from_slice(b"}}");
        }
        out.extend_from_slice(b"]},\"scopeLogs\":[{\"logRecords\":[");
        out.extend_from_slice(records);
        out.extend_from_slice(b"],\"scope\":{\"name\":\"outrigger\",\"version\":");
        json::string(&mut out, env!("CARGO_PKG_VERSION"));
        out.extend_from_slice(b"}}]}");
    }
    out.extend_from_slice(b"]}");
    out
}

/// A top-level member's value, as much of it as the request needs.
enum Member<'a> {
    /// A string, its escapes decoded.
    Str(Cow<'a, str>),
    Bool(bool),
    Null,
    /// An integer that fits int64, as written (no sign of zero, no exponent: its own text is
    /// what serde_json would print).
    Int(&'a str),
    /// Any other number, as serde_json reads it.
    Number(serde_json::Number),
    /// An object or an array.
    Nested(Value),
}

impl Member<'_> {
    /// The value as serde_json prints it (compact, object keys sorted).
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Member::Str(s) => json::string(out, s),
            Member::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Member::Null => out.extend_from_slice(b"null"),
            Member::Int(n) => out.extend_from_slice(n.as_bytes()),
            Member::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Member::Nested(v) => {
                let _ = serde_json::to_writer(&mut *out, v);
            }
        }
    }

    /// An OTLP `AnyValue` (the JSON mapping writes 64-bit integers as strings).
    fn write_any(&self, out: &mut Vec<u8>) {
        match self {
            Member::Str(s) => {
                out.extend_from_slice(b"{\"stringValue\":");
                json::string(out, s);
            }
            Member::Bool(b) => {
                out.extend_from_slice(b"{\"boolValue\":");
                out.extend_from_slice(if *b { b"true" } else { b"false" });
            }
            Member::Int(n) => {
                out.extend_from_slice(b"{\"intValue\":\"");
                out.extend_from_slice(n.as_bytes());
                out.push(b'"');
            }
            // int64 only: a larger integer as intValue makes the collector refuse the batch.
            Member::Number(n) if n.is_i64() || n.is_u64() => {
                out.extend_from_slice(if n.is_i64() {
                    b"{\"intValue\":"
                } else {
                    b"{\"stringValue\":"
                });
                json::string(out, &n.to_string());
            }
            Member::Number(n) => {
                out.extend_from_slice(b"{\"doubleValue\":");
                let _ = serde_json::to_writer(&mut *out, &n.as_f64());
            }
            Member::Null | Member::Nested(_) => {
                let mut text = Vec::new();
                self.write_json(&mut text);
                out.extend_from_slice(b"{\"stringValue\":");
                json::string(out, std::str::from_utf8(&text).unwrap_or(""));
            }
        }
        out.push(b'}');
    }
}

/// The members of the JSON object `line` in key order, a repeated key's last value kept; false
/// when `serde_json::Value` would not have read it as an object (not JSON, not an object, a
/// lone surrogate, a number beyond f64, too deep).
fn read_members<'a>(line: &'a [u8], members: &mut Vec<(Cow<'a, str>, Member<'a>)>) -> bool {
    let Ok(text) = std::str::from_utf8(line) else {
        return false;
    };
    let mut ok = true;
    let whole = super::parse::scan::members(text, |k, v| {
        // Every value is read, a replaced one too: serde_json refuses the record for it.
        match member(v) {
            Some(m) if ok => members.push((k, m)),
            _ => ok = false,
        }
    });
    if !(whole && ok) {
        return false;
    }
    // A stable sort keeps a repeated key's values in order; the last one is kept (moved into
    // the place of the first).
    members.sort_by(|a, b| a.0.cmp(&b.0));
    members.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    true
}

/// One raw member value (valid JSON, as scanned) read as `Value` would; None where it fails.
fn member(raw: &str) -> Option<Member<'_>> {
    Some(match raw.as_bytes()[0] {
        b'"' if !raw.contains('\\') => Member::Str(Cow::Borrowed(&raw[1..raw.len() - 1])),
        b'"' => Member::Str(Cow::Owned(serde_json::from_str(raw).ok()?)),
        b't' => Member::Bool(true),
        b'f' => Member::Bool(false),
        b'n' => Member::Null,
        b'{' | b'[' => {
            // The record's own object is one level of serde_json's 128: a member nested 127
            // deep is one too many in the record, though not alone.
            if depth(raw) >= 127 {
                return None;
            }
            Member::Nested(serde_json::from_str(raw).ok()?)
        }
        _ => {
            let digits = raw.strip_prefix('-').unwrap_or(raw);
            if digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit()) && raw != "-0" {
                Member::Int(raw)
            } else {
                Member::Number(serde_json::from_str(raw).ok()?)
            }
        }
    })
}

/// How deep objects and arrays nest in the JSON text `raw` (valid: as scanned).
fn depth(raw: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0, false, false);
    for b in raw.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth -= 1,
            _ => {}
        }
    }
    max
}

/// One `LogRecord` from a record's members (in key order; the ones it takes are removed).
fn log_record(out: &mut Vec<u8>, record: &mut Vec<(Cow<'_, str>, Member<'_>)>, now_ns: &str) {
    // Where `key` is, when its value is a string.
    let str_at = |record: &[(Cow<'_, str>, Member<'_>)], key: &str| {
        record
            .iter()
            .position(|(k, v)| k == key && matches!(v, Member::Str(_)))
    };
    // Not a time we can read: kept as an attribute.
    let time = str_at(record, "time").and_then(|at| {
        let Member::Str(t) = &record[at].1 else {
            return None;
        };
        let ns = humantime::parse_rfc3339_weak(t).ok()?;
        record.remove(at);
        Some(
            ns.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        )
    });
    let mut severity = None;
    for key in ["level", "severity"] {
        if let Some(at) = str_at(record, key) {
            if let Member::Str(level) = record.remove(at).1 {
                severity = Some(level.into_owned());
            }
            break;
        }
    }
    let mut ids: [Option<String>; 2] = [None, None];
    for (slot, (key, len)) in ids.iter_mut().zip([("trace_id", 32), ("span_id", 16)]) {
        if let Some(at) = str_at(record, key)
            && let Member::Str(id) = &record[at].1
            && id.len() == len
            && id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            *slot = Some(id.to_ascii_lowercase());
            record.remove(at);
        }
    }
    let body = ["message", "msg"]
        .into_iter()
        .find_map(|k| str_at(record, k))
        .map(|at| record.remove(at).1);

    out.extend_from_slice(b"{\"attributes\":[");
    for (i, (k, v)) in record.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        json::string(out, k);
        out.extend_from_slice(b",\"value\":");
        v.write_any(out);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"body\":");
    match body {
        Some(b) => b.write_any(out),
        // No message: the record (what is left of it) is the body, as JSON text.
        None => {
            let mut text = Vec::with_capacity(256);
            text.push(b'{');
            for (i, (k, v)) in record.iter().enumerate() {
                if i > 0 {
                    text.push(b',');
                }
                json::string(&mut text, k);
                text.push(b':');
                v.write_json(&mut text);
            }
            text.push(b'}');
            out.extend_from_slice(b"{\"stringValue\":");
            json::string(out, std::str::from_utf8(&text).unwrap_or(""));
            out.push(b'}');
        }
    }
    out.extend_from_slice(b",\"observedTimeUnixNano\":\"");
    out.extend_from_slice(now_ns.as_bytes());
    out.push(b'"');
    if let Some(level) = severity {
        if let Some(n) = severity_number(&level) {
            out.extend_from_slice(b",\"severityNumber\":");
            json::number(out, u64::from(n));
        }
        out.extend_from_slice(b",\"severityText\":");
        json::string(out, &level);
    }
    if let Some(span) = &ids[1] {
        out.extend_from_slice(b",\"spanId\":");
        json::string(out, span);
    }
    out.extend_from_slice(b",\"timeUnixNano\":\"");
    match time {
        Some(ns) => out.extend_from_slice(ns.to_string().as_bytes()),
        None => out.extend_from_slice(now_ns.as_bytes()),
    }
    out.push(b'"');
    if let Some(trace) = &ids[0] {
        out.extend_from_slice(b",\"traceId\":");
        json::string(out, trace);
    }
    out.push(b'}');
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

    /// The encoder as it was, one `serde_json::Value` per record: the new one must write the
    /// very same bytes.
    mod reference {
        use super::super::severity_number;
        use serde_json::{Map, Value, json};
        use std::collections::BTreeMap;
        use std::time::SystemTime;

        /// The export request as the `Value`-based encoder wrote it.
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
    }

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

    /// The scanned encoder writes what the `Value` one did, byte for byte, on records that
    /// take every path: nested values (keys unsorted), arrays, numbers of every kind, escapes
    /// (pairs, lone surrogates at the top and inside), repeated keys, fields of the wrong type,
    /// nesting at serde_json's limit, lines that are not JSON objects.
    #[test]
    fn the_scanned_encoder_writes_what_the_value_encoder_did() {
        let deep = |n: usize| format!("{{\"d\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        let mut lines: Vec<String> = [
            r#"{"message":"hi","level":"WARN","time":"2024-05-01T10:00:00.5Z","service":"shop","trace_id":"4BF92F3577B34DA6A3CE929D0E0E4736","span_id":"00f067aa0ba902b7","n":3,"ok":true,"source":"app"}"#,
            r#"{"z":{"b":[1,2.50,{"y":null,"x":"\u00e9"}],"a":-0},"source":"app","time":"not a time","msg":7}"#,
            r#"{"msg":"m","message":{"not":"a string"},"severity":"error","level":3,"time":17}"#,
            r#"{"f":1.50,"e":1e2,"E":1E-7,"neg0":-0,"negf":-0.0,"big":18446744073709551615,"i64max":9223372036854775807,"i64min":-9223372036854775808,"i64over":9223372036854775808,"huge":123456789012345678901234,"digits18":999999999999999999,"digits19":1000000000000000000}"#,
            r#"{"s":"tab\there \"q\" \\ \/ \b\f\n\r \u0001 \u007f \ud83d\ude00 ü","k\u00e9y":"v","":"empty key"}"#,
            r#"{"a":1,"a":"two","b":{"c":1},"b":[3],"service":"x","service":"y\n"}"#,
            r#"{"a":"\ud800","a":1}"#,
            r#"{"n":{"\udc00":1}}"#,
            r#"{"x":1e400}"#,
            r#"{"x":-1e400,"message":"gone"}"#,
            r#"  {"spaced" : true , "null": null }  "#,
            r#"{}"#,
            r#"[1,2]"#,
            r#""a string""#,
            r#"plain text, not JSON"#,
            r#"{"cut": "#,
            r#"{"trace_id":"4bf92f3577b34da6a3ce929d0e0e47","span_id":"zzf067aa0ba902b7","level":"Info","msg":"ids kept"}"#,
            r#"{"level":"nonsense","message":"no number","time":"2024-05-01T10:00:00+02:00"}"#,
            r#"{"service":"","message":"empty service"}"#,
        ]
        .into_iter()
        .map(String::from)
        .collect();
        for n in [125, 126, 127, 128, 200] {
            lines.push(deep(n));
        }
        let mut ndjson = lines.join("\n").into_bytes();
        ndjson.extend_from_slice(b"\n{\"bad utf8\":\"\xff\"}\n\xfe\xff\n");
        let at =
            SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(1_733_000_000_123_456_789);
        let old = reference::export_request(&ndjson, at);
        let new = export_request(&ndjson, at);
        assert_eq!(
            String::from_utf8_lossy(&new),
            String::from_utf8_lossy(&old),
            "the new encoder differs"
        );
        assert_eq!(new, old);
        // And line by line (each line's own request), so no difference hides in grouping.
        for line in ndjson.split(|&b| b == b'\n') {
            assert_eq!(
                export_request(line, at),
                reference::export_request(line, at),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// For `bench/logs-instructions.sh otlp`: encodes the NDJSON file `OTLP_BENCH_FILE` in
    /// batches of 1,000 records with the encoder `OTLP_BENCH_ENCODER` (`new`, `old` or `none`,
    /// the baseline: reading the file only), to be counted by callgrind.
    #[test]
    #[ignore = "a measurement, run by bench/logs-instructions.sh"]
    fn otlp_encoder_instructions() {
        let file = std::env::var("OTLP_BENCH_FILE").expect("OTLP_BENCH_FILE");
        let ndjson = std::fs::read(file).unwrap();
        let encoder = std::env::var("OTLP_BENCH_ENCODER").unwrap_or_default();
        let lines: Vec<&[u8]> = ndjson.split_inclusive(|&b| b == b'\n').collect();
        let mut bytes = 0;
        for batch in lines.chunks(1000) {
            let batch = batch.concat();
            let body = match encoder.as_str() {
                "new" => export_request(&batch, SystemTime::UNIX_EPOCH),
                "old" => reference::export_request(&batch, SystemTime::UNIX_EPOCH),
                _ => batch,
            };
            bytes += std::hint::black_box(body).len();
        }
        eprintln!("{encoder}: {} lines, {bytes} bytes out", lines.len());
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
