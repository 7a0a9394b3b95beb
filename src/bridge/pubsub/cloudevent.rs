//! CloudEvents 1.0 envelopes as Dapr builds them: around a published body (`data`, or
//! `data_base64` for binary content types), around a caller's own `application/cloudevents+json`
//! (missing fields filled in), and, on delivery, around a raw payload for the app.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value};

/// `type` of events Dapr creates.
pub const DEFAULT_TYPE: &str = "com.dapr.event.sent";
/// `source` of events wrapped on the subscriber side (Dapr's constant).
pub const DEFAULT_SOURCE: &str = "Dapr";
/// `datacontenttype` when the publisher sends none (Dapr's default).
pub const DEFAULT_CONTENT_TYPE: &str = "text/plain";
pub const SPEC_VERSION: &str = "1.0";
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// What a publish request gives the envelope.
#[derive(Clone, Debug)]
pub struct Publish<'a> {
    pub app_id: &'a str,
    pub pubsub: &'a str,
    pub topic: &'a str,
    /// The request's `Content-Type`, if any.
    pub content_type: Option<&'a str>,
    pub data: &'a [u8],
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
    /// Request metadata (`metadata.*` query parameters): `cloudevent.id` and friends override.
    pub metadata: &'a BTreeMap<String, String>,
}

/// The media type without parameters, lowercased.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// `application/json`, `text/json` or any `+json` type (but not CloudEvents itself).
pub fn is_json(content_type: &str) -> bool {
    let m = media_type(content_type);
    m == "application/json"
        || m == "text/json"
        || (m.ends_with("+json") && m != CLOUDEVENTS_CONTENT_TYPE)
}

pub fn is_cloudevent(content_type: &str) -> bool {
    media_type(content_type) == CLOUDEVENTS_CONTENT_TYPE
}

/// Content types whose bytes go in `data_base64`.
pub fn is_binary(content_type: &str) -> bool {
    let m = media_type(content_type);
    m == "application/octet-stream" || m == "application/x-protobuf" || m == "application/protobuf"
}

/// A random version-4 UUID in its usual text form.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    fastrand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The CloudEvent `expiration` (RFC 3339, UTC) of a publish with `metadata.ttlInSeconds`, as
/// daprd's `ApplyMetadata` sets it (none of our brokers expires messages itself): now plus the
/// ttl. A ttl that is not a positive integer sets none (daprd ignores it too).
pub fn expiration(metadata: &BTreeMap<String, String>) -> Option<String> {
    let seconds: u64 = metadata
        .get("ttlInSeconds")?
        .parse()
        .ok()
        .filter(|&s| s > 0)?;
    let at = std::time::SystemTime::now().checked_add(std::time::Duration::from_secs(seconds))?;
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

/// Whether an event's `expiration` has passed (daprd drops such events instead of delivering
/// them). An event without one, or with one that is not RFC 3339, has not expired.
pub fn expired(event: &Map<String, Value>) -> bool {
    event
        .get("expiration")
        .and_then(Value::as_str)
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .is_some_and(|t| t <= std::time::SystemTime::now())
}

/// A metadata override: `cloudevent.<field>` (Dapr's code) or `cloudevent-<field>` (its docs).
fn overridden<'a>(metadata: &'a BTreeMap<String, String>, field: &str) -> Option<&'a str> {
    metadata
        .get(&format!("cloudevent.{field}"))
        .or_else(|| metadata.get(&format!("cloudevent-{field}")))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Wraps a published body in a new CloudEvent.
pub fn envelope(p: &Publish) -> Map<String, Value> {
    let content_type = p
        .content_type
        .filter(|c| !c.is_empty())
        .unwrap_or(DEFAULT_CONTENT_TYPE);
    let mut ce = Map::new();
    let s = |v: &str| Value::String(v.to_string());
    ce.insert("specversion".into(), s(SPEC_VERSION));
    ce.insert(
        "id".into(),
        Value::String(overridden(p.metadata, "id").map_or_else(new_id, str::to_string)),
    );
    ce.insert(
        "source".into(),
        s(overridden(p.metadata, "source").unwrap_or(p.app_id)),
    );
    ce.insert(
        "type".into(),
        s(overridden(p.metadata, "type").unwrap_or(DEFAULT_TYPE)),
    );
    ce.insert("datacontenttype".into(), s(content_type));
    if is_json(content_type) {
        let data = serde_json::from_slice::<Value>(p.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(p.data).into_owned()));
        ce.insert("data".into(), data);
    } else if is_binary(content_type) {
        ce.insert(
            "data_base64".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(p.data)),
        );
    } else {
        ce.insert(
            "data".into(),
            Value::String(String::from_utf8_lossy(p.data).into_owned()),
        );
    }
    ce.insert("topic".into(), s(p.topic));
    ce.insert("pubsubname".into(), s(p.pubsub));
    let traceparent = overridden(p.metadata, "traceparent")
        .or(overridden(p.metadata, "traceid"))
        .or(p.traceparent)
        .unwrap_or("");
    ce.insert("traceid".into(), s(traceparent));
    ce.insert("traceparent".into(), s(traceparent));
    ce.insert(
        "tracestate".into(),
        s(overridden(p.metadata, "tracestate")
            .or(p.tracestate)
            .unwrap_or("")),
    );
    ce.insert("time".into(), s(&now_rfc3339()));
    if let Some(at) = expiration(p.metadata) {
        ce.insert("expiration".into(), s(&at));
    }
    ce
}

/// Takes the caller's own CloudEvent (`application/cloudevents+json`) as Dapr's
/// `FromCloudEvent` does: `topic` and `pubsubname` are set, the trace fields come from the
/// request (kept from the event when the request has none), and a missing `source` (`Dapr`),
/// `type`, `specversion` or `time` is filled in. A missing `id` gets a random one (Dapr leaves
/// it out; subscribers need one).
pub fn pass_through(p: &Publish) -> Result<Map<String, Value>, String> {
    let mut ce = match serde_json::from_slice::<Value>(p.data) {
        Ok(Value::Object(m)) => m,
        Ok(other) => {
            return Err(format!(
                "expected a JSON object as the cloud event, found {}",
                kind_of(&other)
            ));
        }
        Err(e) => return Err(format!("the cloud event is not valid JSON: {e}")),
    };
    let mut fill = |k: &str, v: String| {
        if matches!(ce.get(k), None | Some(Value::Null)) {
            ce.insert(k.to_string(), Value::String(v));
        }
    };
    fill("id", new_id());
    fill("source", DEFAULT_SOURCE.to_string());
    fill("type", DEFAULT_TYPE.to_string());
    fill("specversion", SPEC_VERSION.to_string());
    fill("time", now_rfc3339());
    fill("traceid", String::new());
    fill("traceparent", String::new());
    fill("tracestate", String::new());
    if let Some(tp) = p.traceparent {
        ce.insert("traceid".into(), Value::String(tp.to_string()));
        ce.insert("traceparent".into(), Value::String(tp.to_string()));
        ce.insert(
            "tracestate".into(),
            Value::String(p.tracestate.unwrap_or("").to_string()),
        );
    }
    ce.insert("topic".into(), Value::String(p.topic.to_string()));
    ce.insert("pubsubname".into(), Value::String(p.pubsub.to_string()));
    if let Some(at) = expiration(p.metadata) {
        ce.insert("expiration".into(), Value::String(at));
    }
    Ok(ce)
}

/// The CloudEvent a subscriber with `rawPayload` gets around bytes published raw (Dapr's
/// `FromRawPayload`): a fresh id, `source` `Dapr`, and the bytes in `data_base64`.
pub fn from_raw_payload(data: &[u8], topic: &str, pubsub: &str) -> Map<String, Value> {
    let mut ce = Map::new();
    let s = |v: &str| Value::String(v.to_string());
    ce.insert("id".into(), Value::String(new_id()));
    ce.insert("specversion".into(), s(SPEC_VERSION));
    ce.insert("datacontenttype".into(), s("application/octet-stream"));
    ce.insert("source".into(), s(DEFAULT_SOURCE));
    ce.insert("type".into(), s(DEFAULT_TYPE));
    ce.insert("topic".into(), s(topic));
    ce.insert("pubsubname".into(), s(pubsub));
    ce.insert(
        "data_base64".into(),
        Value::String(base64::engine::general_purpose::STANDARD.encode(data)),
    );
    ce
}

/// `object`, `array`, … for error messages.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish<'a>(
        ct: Option<&'a str>,
        data: &'a [u8],
        md: &'a BTreeMap<String, String>,
    ) -> Publish<'a> {
        Publish {
            app_id: "app",
            pubsub: "ps",
            topic: "orders",
            content_type: ct,
            data,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            tracestate: None,
            metadata: md,
        }
    }

    #[test]
    fn json_body_becomes_data() {
        let md = BTreeMap::new();
        let ce = envelope(&publish(Some("application/json"), br#"{"a":1}"#, &md));
        assert_eq!(ce["data"], serde_json::json!({"a": 1}));
        assert_eq!(ce["source"], "app");
        assert_eq!(ce["type"], DEFAULT_TYPE);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["topic"], "orders");
        assert_eq!(ce["pubsubname"], "ps");
        assert_eq!(ce["traceparent"], ce["traceid"]);
        assert_eq!(ce["id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn text_binary_and_default_content_types() {
        let md = BTreeMap::new();
        let ce = envelope(&publish(None, b"hi", &md));
        assert_eq!(ce["datacontenttype"], "text/plain");
        assert_eq!(ce["data"], "hi");
        let ce = envelope(&publish(Some("application/octet-stream"), &[0, 255], &md));
        assert_eq!(ce["data_base64"], "AP8=");
        assert!(!ce.contains_key("data"));
        // Invalid JSON under a JSON content type is kept as a string, as Dapr does.
        let ce = envelope(&publish(Some("application/json"), b"{nope", &md));
        assert_eq!(ce["data"], "{nope");
    }

    #[test]
    fn metadata_overrides_fields() {
        let md = BTreeMap::from([
            ("cloudevent.id".to_string(), "my-id".to_string()),
            ("cloudevent-type".to_string(), "my.type".to_string()),
        ]);
        let ce = envelope(&publish(None, b"x", &md));
        assert_eq!(ce["id"], "my-id");
        assert_eq!(ce["type"], "my.type");
    }

    #[test]
    fn pass_through_fills_missing_fields_only() {
        let md = BTreeMap::new();
        let ce = pass_through(&publish(
            Some(CLOUDEVENTS_CONTENT_TYPE),
            br#"{"id":"1","source":"s","type":"t","specversion":"1.0","data":{"x":1},"topic":"other"}"#,
            &md,
        ))
        .unwrap();
        assert_eq!(ce["id"], "1");
        assert_eq!(ce["source"], "s");
        assert_eq!(ce["type"], "t");
        assert_eq!(ce["topic"], "orders");
        assert!(ce["time"].is_string());
        // The request's trace context wins.
        assert_eq!(
            ce["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let ce = pass_through(&publish(None, br#"{"data":1}"#, &md)).unwrap();
        assert_eq!(ce["source"], DEFAULT_SOURCE);
        assert_eq!(ce["type"], DEFAULT_TYPE);
        assert_eq!(ce["id"].as_str().unwrap().len(), 36);
        let err = pass_through(&publish(None, b"[1]", &md)).unwrap_err();
        assert!(err.contains("found an array"), "{err}");
    }

    #[test]
    fn ttl_sets_the_expiration() {
        let md = BTreeMap::from([("ttlInSeconds".to_string(), "60".to_string())]);
        let ce = envelope(&publish(None, b"x", &md));
        let at = humantime::parse_rfc3339(ce["expiration"].as_str().unwrap()).unwrap();
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        assert!(left.as_secs() > 50 && left.as_secs() <= 60, "{left:?}");
        assert!(!expired(&ce));
        let ce = pass_through(&publish(
            Some(CLOUDEVENTS_CONTENT_TYPE),
            br#"{"data":1}"#,
            &md,
        ))
        .unwrap();
        assert!(ce["expiration"].is_string());
        // Not a positive integer: no expiration, as daprd.
        for bad in ["0", "-1", "soon", ""] {
            let md = BTreeMap::from([("ttlInSeconds".to_string(), bad.to_string())]);
            assert!(
                !envelope(&publish(None, b"x", &md)).contains_key("expiration"),
                "{bad}"
            );
        }
        let mut old = envelope(&publish(None, b"x", &BTreeMap::new()));
        assert!(!expired(&old));
        old.insert("expiration".into(), "2020-01-01T00:00:00Z".into());
        assert!(expired(&old));
    }

    #[test]
    fn raw_payload_wrapping() {
        let ce = from_raw_payload(b"raw", "t", "p");
        assert_eq!(ce["data_base64"], "cmF3");
        assert_eq!(ce["source"], "Dapr");
        assert_eq!(ce["datacontenttype"], "application/octet-stream");
    }
}
