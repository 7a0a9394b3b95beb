//! The `telemetry:` section: access log destination and format, trace sampling and span
//! export (OTLP/HTTP), validated into real types.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

use super::document::{Document, Problem};
use super::types::Duration;

#[derive(Clone, Debug, Serialize)]
pub struct TelemetryConfig {
    pub tracing: TracingConfig,
    /// Where access log lines go and how they look; None: no access log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AccessLogConfig {
    pub to: AccessLogTo,
    pub format: AccessLogFormat,
}

/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogTo {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// How access log lines look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One JSON object per line, every field.
    Json,
    /// A format string: text with `{field}` placeholders.
    Template(Vec<Piece>),
}

#[derive(Clone, Debug, Serialize)]
pub struct TracingConfig {
    /// The share of new traces marked sampled (0 to 1).
    pub sample: f64,
    /// Where sampled spans are exported; None: not exported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp: Option<OtlpConfig>,
}

/// New traces sampled by default: enough to see traffic, cheap for the tracing backend.
pub const DEFAULT_TRACE_SAMPLE: f64 = 0.01;
/// A collector that has not answered a batch in this long is treated as down.
pub const DEFAULT_OTLP_TIMEOUT: Duration = Duration::from_secs(5);

/// An OTLP/HTTP collector.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OtlpConfig {
    /// The full URL spans are POSTed to (`…/v1/traces`).
    #[serde(serialize_with = "display")]
    pub endpoint: http::Uri,
    /// host:port to connect to.
    #[serde(skip)]
    pub authority: String,
    /// The Host header.
    #[serde(skip)]
    pub host: String,
    /// The name the collector's certificate must hold (https).
    #[serde(skip)]
    pub server_name: String,
    #[serde(skip)]
    pub https: bool,
    /// Extra request headers (authentication); values are never shown.
    #[serde(serialize_with = "redacted_headers")]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// CA bundle for an https collector; None: the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    pub timeout: Duration,
}

fn display<S: Serializer>(v: &http::Uri, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn redacted_headers<S: Serializer>(
    h: &[(http::HeaderName, http::HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(h.iter().map(|(k, _)| (k.as_str(), "<redacted>")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    pub tracing: RawTracing,
    pub access_log: Option<RawAccessLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccessLog {
    /// `stdout`, `stderr` or a file path.
    pub to: Option<String>,
    /// `json`, or a format string with `{field}` placeholders.
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTracing {
    /// The share of new traces (requests without trace context) marked sampled.
    pub sample: Option<f64>,
    /// The collector: a URL, or the map form.
    pub otlp: Option<RawOtlp>,
}

/// `otlp: URL` or `otlp: {endpoint, …}`. Not `#[serde(untagged)]`: that reports any mistake in
/// the map as "did not match any variant"; this passes the map's own error on.
#[derive(Debug)]
pub enum RawOtlp {
    Url(String),
    Full(RawOtlpFull),
}

impl<'de> Deserialize<'de> for RawOtlp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawOtlp;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a collector URL, or a map with endpoint, headers, ca, timeout")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawOtlp, E> {
                Ok(RawOtlp::Url(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawOtlp, A::Error> {
                RawOtlpFull::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawOtlp::Full)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOtlpFull {
    pub endpoint: String,
    #[serde(default)]
    pub headers: BTreeMap<String, super::Secret>,
    pub ca: Option<PathBuf>,
    pub timeout: Option<Duration>,
}

/// Validates the section; every problem goes to `problems`.
pub fn validate(
    raw: &RawTelemetry,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> TelemetryConfig {
    let sample = raw.tracing.sample.unwrap_or(DEFAULT_TRACE_SAMPLE);
    if !(0.0..=1.0).contains(&sample) {
        problems.push(doc.problem(
            "telemetry.tracing.sample",
            format!("expected a ratio from 0 to 1, found {sample}"),
        ));
    }
    let otlp = raw
        .tracing
        .otlp
        .as_ref()
        .and_then(|o| otlp(o, doc, problems));
    let access_log = raw.access_log.as_ref().and_then(|a| {
        let format = match a.format.as_deref() {
            None | Some("json") => AccessLogFormat::Json,
            Some(t) => match parse_template(t) {
                Ok(pieces) => AccessLogFormat::Template(pieces),
                Err(e) => {
                    problems.push(doc.problem(
                        "telemetry.access_log.format",
                        format!("expected json or a format string: {e}"),
                    ));
                    AccessLogFormat::Json
                }
            },
        };
        let to = match a.to.as_deref().unwrap_or("stdout") {
            "stdout" => AccessLogTo::Stdout,
            "stderr" => AccessLogTo::Stderr,
            "" => {
                problems.push(doc.problem(
                    "telemetry.access_log.to",
                    "expected stdout, stderr or a file path",
                ));
                return None;
            }
            path => {
                let path = PathBuf::from(path);
                let dir = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                if !dir.is_dir() {
                    problems.push(doc.problem(
                        "telemetry.access_log.to",
                        format!("the directory {} does not exist", dir.display()),
                    ));
                }
                AccessLogTo::File(path)
            }
        };
        Some(AccessLogConfig { to, format })
    });
    TelemetryConfig {
        tracing: TracingConfig { sample, otlp },
        access_log,
    }
}

fn otlp(raw: &RawOtlp, doc: &Document, problems: &mut Vec<Problem>) -> Option<OtlpConfig> {
    let (url, at, headers, ca, timeout) = match raw {
        RawOtlp::Url(u) => (u, "telemetry.tracing.otlp", None, None, None),
        RawOtlp::Full(f) => (
            &f.endpoint,
            "telemetry.tracing.otlp.endpoint",
            Some(&f.headers),
            f.ca.clone(),
            f.timeout,
        ),
    };
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            problems.push(doc.problem(
                at,
                format!("expected an http:// or https:// URL, found {url:?}: {e}"),
            ));
            return None;
        }
    };
    let (https, authority, host, server_name) = match (uri.scheme_str(), uri.authority()) {
        (Some(_), Some(a)) if a.as_str().contains('@') => {
            problems.push(doc.problem(
                at,
                "expected no credentials in the URL (they would show in /config and logs); put them in headers, e.g. authorization",
            ));
            return None;
        }
        (Some(scheme @ ("http" | "https")), Some(a)) => {
            let https = scheme == "https";
            let port = a.port_u16().unwrap_or(if https { 443 } else { 80 });
            (
                https,
                format!("{}:{port}", a.host()),
                a.as_str().to_string(),
                a.host().trim_matches(['[', ']']).to_string(),
            )
        }
        _ => {
            problems.push(doc.problem(
                at,
                format!("expected an http:// or https:// URL with a host, found {url:?}"),
            ));
            return None;
        }
    };
    // As OTEL_EXPORTER_OTLP_ENDPOINT: a base URL gets the signal's path.
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("" | "/") => "/v1/traces".to_string(),
        Some(p) if p.starts_with("/?") => format!("/v1/traces{}", &p[1..]),
        Some(p) => p.to_string(),
    };
    let endpoint: http::Uri = format!(
        "{}://{}{}",
        if https { "https" } else { "http" },
        host,
        path
    )
    .parse()
    .ok()?;
    let mut parsed = Vec::new();
    for (k, v) in headers.into_iter().flatten() {
        match (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v.expose()),
        ) {
            (Ok(k), Ok(mut v)) => {
                v.set_sensitive(true);
                parsed.push((k, v));
            }
            _ => problems.push(doc.problem(
                &format!("telemetry.tracing.otlp.headers.{k}"),
                "expected a header name and a visible-ASCII value",
            )),
        }
    }
    if ca.is_some() && !https {
        problems.push(doc.problem(
            "telemetry.tracing.otlp.ca",
            "a CA bundle needs an https:// endpoint",
        ));
    }
    let timeout = timeout.unwrap_or(DEFAULT_OTLP_TIMEOUT);
    if timeout.get().is_zero() {
        problems.push(doc.problem("telemetry.tracing.otlp.timeout", "expected more than 0s"));
    }
    Some(OtlpConfig {
        endpoint,
        authority,
        host,
        server_name,
        https,
        headers: parsed,
        ca,
        timeout,
    })
}

/// The fields a line can hold: the JSON object's keys, and the `{name}`s of a format string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Time,
    Direction,
    Listener,
    Route,
    Cluster,
    Method,
    Authority,
    Path,
    Status,
    DurationMs,
    BytesIn,
    BytesOut,
    Upstream,
    Retries,
    TraceId,
    SpanId,
    RequestId,
    Identity,
    Error,
}

impl Field {
    pub const ALL: [(&'static str, Field); 19] = [
        ("time", Field::Time),
        ("direction", Field::Direction),
        ("listener", Field::Listener),
        ("route", Field::Route),
        ("cluster", Field::Cluster),
        ("method", Field::Method),
        ("authority", Field::Authority),
        ("path", Field::Path),
        ("status", Field::Status),
        ("duration_ms", Field::DurationMs),
        ("bytes_in", Field::BytesIn),
        ("bytes_out", Field::BytesOut),
        ("upstream", Field::Upstream),
        ("retries", Field::Retries),
        ("trace_id", Field::TraceId),
        ("span_id", Field::SpanId),
        ("request_id", Field::RequestId),
        ("identity", Field::Identity),
        ("error", Field::Error),
    ];
}

/// A piece of a format string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Piece {
    Text(String),
    Field(Field),
}

/// Parses a format string: text with `{field}` placeholders (`{{` and `}}` for braces).
pub fn parse_template(s: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err(format!("an unclosed `{{{name}`; write `{{{{` for a brace"));
                }
                let Some((_, field)) = Field::ALL.iter().find(|(n, _)| *n == name) else {
                    let known: Vec<&str> = Field::ALL.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "unknown field {{{name}}}; expected one of {}",
                        known.join(", ")
                    ));
                };
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Field(*field));
            }
            '}' => return Err("a lone `}`; write `}}` for a brace".to_string()),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
        return Err("expected at least one {field}".to_string());
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_fields_text_and_braces() {
        let t = parse_template("{method} {path} -> {status} {{x}}").unwrap();
        assert_eq!(
            t,
            vec![
                Piece::Field(Field::Method),
                Piece::Text(" ".into()),
                Piece::Field(Field::Path),
                Piece::Text(" -> ".into()),
                Piece::Field(Field::Status),
                Piece::Text(" {x}".into()),
            ]
        );
        assert!(
            parse_template("{nope}")
                .unwrap_err()
                .contains("unknown field {nope}")
        );
        assert!(parse_template("no fields").is_err());
        assert!(parse_template("{status} }").is_err());
        assert!(
            parse_template("{method} {status")
                .unwrap_err()
                .contains("unclosed")
        );
    }
}
