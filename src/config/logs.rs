//! The `logs:` section: where log lines come from (the app's stdout/stderr, files by glob), how
//! they are parsed, enriched and redacted, where they are shipped, and where positions are
//! checkpointed. Validated into real types (compiled globs and regexes, a parsed sink URL);
//! `docs/logs.md` is the reference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Environment;
use super::document::{Document, Problem};
use super::tls::ClientTlsConfig;
use super::types::{ByteSize, Duration};

/// A batch is sent when it holds this many lines… (10,000: `max_bytes` is the bound that binds
/// for lines of typical length; at 1,000, batches of ~350-byte lines were a third of it and the
/// per-batch costs — a round trip, a checkpoint fsync — held file → HTTP at 106 MiB/s against
/// 178 MiB/s, bench/logs.sh)
pub const DEFAULT_BATCH_LINES: usize = 10_000;
/// …or this many bytes (1 MiB: well under every common ingest limit, Loki's 4 MiB included)…
pub const DEFAULT_BATCH_BYTES: usize = 1 << 20;
/// …or when its first line has waited this long (a quiet app's lines still leave promptly).
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(1000);
/// Lines of the app's stdout/stderr held while the sink is slow or down (8 MiB): past it, new
/// lines are still echoed but not shipped, and counted as dropped (the app is never blocked).
pub const DEFAULT_APP_BUFFER: usize = 8 << 20;
/// The app's lines spooled on disk at most (`logs.buffer.max_bytes`, 256 MiB): minutes of a
/// chatty app's output while the sink is down, and a bound a pod's ephemeral storage can hold.
pub const DEFAULT_SPOOL_BYTES: usize = 256 << 20;
/// How often file sources look for new files and new bytes: a quarter of a second keeps the
/// delay small at the cost of a few `stat` calls per file.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);
/// A sink that has not answered in this long failed this attempt.
pub const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);
/// A renamed or deleted file is closed once read to its end and quiet this long: a writer may go
/// on appending after the rename until it reopens its log (logrotate's `postrotate` signal, a
/// buffered logger's next flush); Fluent Bit waits 5 s, we take twice that for slow flushers.
pub const DEFAULT_ROTATE_WAIT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts to send a batch.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogs {
    pub sources: Vec<RawLogSource>,
    pub sinks: Vec<RawLogSink>,
    /// Added to every line.
    pub fields: BTreeMap<String, String>,
    /// Added to every line from the environment: field → variable name.
    pub env_fields: BTreeMap<String, String>,
    pub redact: Vec<RawRedact>,
    pub batch: RawBatch,
    /// The state file of file positions (default: none, positions live in memory only).
    pub checkpoint: Option<PathBuf>,
    pub app_buffer: Option<ByteSize>,
    /// The app's stdout/stderr spooled to disk before shipping (survives a sink outage and a
    /// restart), instead of waiting in memory only.
    pub buffer: Option<RawBuffer>,
    pub poll: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuffer {
    /// The directory of the spool files (created when missing).
    pub dir: PathBuf,
    /// Spool files on disk at most; past it new lines are dropped and counted.
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogSource {
    /// `stdio`: the supervised app's stdout and stderr.
    pub app: Option<String>,
    /// A glob of files to follow (`/var/log/app/*.log`).
    pub files: Option<String>,
    /// `true`: Outrigger's own access log (`telemetry.access_log`), handed over in memory.
    pub access_log: Option<bool>,
    /// For files seen for the first time at start-up: `beginning` (default) or `end`.
    pub start_at: Option<String>,
    /// `auto` (default: JSON when the line is a JSON object), `json`, `plain`, `logfmt`,
    /// `regex` (with `pattern`), or a container runtime's file format: `cri` or `docker`.
    pub format: Option<String>,
    /// `cri`/`docker` only: how the message inside is parsed (default `auto`).
    pub message_format: Option<String>,
    /// `regex` only: a regular expression whose named captures become the record's fields.
    pub pattern: Option<String>,
    /// Lines joined into one record (stack traces): a line matching `start` begins a record.
    pub multiline: Option<RawMultiline>,
    /// At most this many lines per second from this source.
    pub rate_limit: Option<RawRateLimit>,
    /// The `source` field of its lines (default: `app` or the glob).
    pub name: Option<String>,
    /// Files only: how long a rotated-away file is kept open, read to its end and quiet.
    pub rotate_wait: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMultiline {
    pub start: String,
    #[serde(default)]
    pub max_lines: Option<usize>,
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    #[serde(default)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: u32,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogSink {
    /// The `sink` label of its metrics (default: its kind, like `http`).
    pub name: Option<String>,
    /// POST batches as NDJSON to this `http://` or `https://` URL.
    pub http: Option<String>,
    /// Push to Loki's push API (JSON) at this `http(s)://` URL (`/loki/api/v1/push` when the URL
    /// has no path).
    pub loki: Option<String>,
    /// Loki stream labels: the record fields whose values label a stream (default: `source`).
    pub labels: Option<Vec<String>>,
    /// OTLP/HTTP logs, JSON encoding, at this `http(s)://` URL (`/v1/logs` when it has no path).
    pub otlp: Option<String>,
    /// Elasticsearch/OpenSearch `_bulk` at this `http(s)://` URL (`/_bulk` when it has no path).
    pub elasticsearch: Option<String>,
    /// Elasticsearch only: the index or data stream.
    pub index: Option<String>,
    /// Compress request bodies with gzip (http, loki, otlp, elasticsearch).
    pub gzip: Option<bool>,
    /// Write NDJSON lines to Outrigger's stdout.
    pub stdout: Option<bool>,
    /// Append NDJSON lines to this file.
    pub file: Option<PathBuf>,
    pub timeout: Option<Duration>,
    pub headers: BTreeMap<String, super::Secret>,
    /// Extra request headers read from the environment: header → variable name (a Kubernetes
    /// Secret injected as an environment variable), so no credential is written in the file.
    pub headers_env: BTreeMap<String, String>,
    /// `https://` URLs: the CA bundle (default: the system's roots), a client certificate, the
    /// server name — a cluster's `tls` keys.
    pub tls: Option<super::raw::RawClientTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedact {
    /// A regular expression; every match is replaced by `mask` (`$1` names a group).
    pub pattern: String,
    #[serde(default)]
    pub mask: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatch {
    pub max_lines: Option<usize>,
    pub max_bytes: Option<ByteSize>,
    pub max_wait: Option<Duration>,
    pub retry_max: Option<Duration>,
}

/// The log agent's validated config.
#[derive(Clone, Debug, Serialize)]
pub struct LogsConfig {
    pub sources: Vec<LogSource>,
    /// Every batch goes to each; file positions move once all acknowledged it.
    pub sinks: Vec<NamedSink>,
    pub fields: BTreeMap<String, String>,
    pub env_fields: BTreeMap<String, String>,
    pub redact: Vec<Redact>,
    pub batch_lines: usize,
    pub batch_bytes: usize,
    pub batch_wait: Duration,
    pub retry_max: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    pub app_buffer: usize,
    /// The app's lines go through spool files on disk (`logs.buffer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer: Option<Buffer>,
    pub poll: Duration,
}

/// `logs.buffer`: the disk buffer of the app's stdout/stderr.
#[derive(Clone, Debug, Serialize)]
pub struct Buffer {
    pub dir: PathBuf,
    pub max_bytes: usize,
}

impl LogsConfig {
    /// Whether the supervised app's stdout/stderr are captured.
    pub fn captures_app(&self) -> bool {
        self.sources
            .iter()
            .any(|s| matches!(s.kind, LogSourceKind::App))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LogSource {
    /// The `source` field of its lines.
    pub name: String,
    pub kind: LogSourceKind,
    /// How a line (or, for `container`, the message inside it) is parsed.
    pub format: LineFormat,
    /// Files only: the container runtime's wrapper, decoded first (partial lines joined).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiline: Option<Multiline>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

impl LogSource {
    /// Whether this is Outrigger's own access log.
    pub fn is_access_log(&self) -> bool {
        matches!(self.kind, LogSourceKind::AccessLog)
    }
}

/// The file format of a container runtime's logs (`/var/log/pods/…`, `/var/lib/docker/…`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// Kubernetes CRI: `<RFC 3339 time> <stdout|stderr> <P|F> <message>`.
    Cri,
    /// Docker's json-file driver: `{"log":"…\n","stream":"stdout","time":"…"}`.
    Docker,
}

/// Lines joined into one record: a line matching `start` begins one, the others are added to
/// the record before them.
#[derive(Clone, Debug, Serialize)]
pub struct Multiline {
    #[serde(serialize_with = "display")]
    pub start: regex::Regex,
    pub max_lines: usize,
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// A token bucket: `per_second` lines on average, `burst` at once.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// A sink and the name its metrics and `/ready` use.
#[derive(Clone, Debug, Serialize)]
pub struct NamedSink {
    pub name: String,
    #[serde(flatten)]
    pub sink: LogSink,
}

/// A record holds at most this many lines joined by `multiline` (a runaway "continuation" —
/// every line, when `start` never matches — still leaves in records of bounded size).
pub const DEFAULT_MULTILINE_MAX_LINES: usize = 500;
/// …and at most this many bytes (the longest single line a source reads, 256 KiB).
pub const DEFAULT_MULTILINE_MAX_BYTES: usize = 256 * 1024;
/// A record being joined is sent once no line was added to it for this long (the last stack
/// trace of a burst must not wait for the next log line, which may never come).
pub const DEFAULT_MULTILINE_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSourceKind {
    App,
    /// Outrigger's own access log, handed over in memory by its writer.
    AccessLog,
    Files {
        glob: String,
        /// The directory to list: the glob's part before its first wildcard.
        base: PathBuf,
        from_end: bool,
        rotate_wait: Duration,
    },
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LineFormat {
    Auto,
    Json,
    Plain,
    /// `key=value key2="quoted value"` pairs.
    Logfmt,
    /// Named captures become fields; a line that does not match becomes `message`.
    Regex(#[serde(serialize_with = "display")] regex::Regex),
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSink {
    Stdout,
    File(PathBuf),
    Http {
        #[serde(serialize_with = "display")]
        url: http::Uri,
        timeout: Duration,
        /// Values are never shown.
        #[serde(serialize_with = "redacted_headers")]
        headers: Vec<SinkHeader>,
        gzip: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<ClientTlsConfig>,
    },
    Loki {
        #[serde(serialize_with = "display")]
        url: http::Uri,
        timeout: Duration,
        #[serde(serialize_with = "redacted_headers")]
        headers: Vec<SinkHeader>,
        labels: Vec<String>,
        gzip: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<ClientTlsConfig>,
    },
    Otlp {
        #[serde(serialize_with = "display")]
        url: http::Uri,
        timeout: Duration,
        #[serde(serialize_with = "redacted_headers")]
        headers: Vec<SinkHeader>,
        gzip: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<ClientTlsConfig>,
    },
    Elasticsearch {
        #[serde(serialize_with = "display")]
        url: http::Uri,
        timeout: Duration,
        #[serde(serialize_with = "redacted_headers")]
        headers: Vec<SinkHeader>,
        index: String,
        gzip: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<ClientTlsConfig>,
    },
}

/// The Elasticsearch index or data stream when `index` is not set (`logs-*-*` matches
/// Elasticsearch's built-in logs data stream template, which needs `@timestamp`: added).
pub const DEFAULT_ES_INDEX: &str = "logs-outrigger-default";

/// At most this many Loki label names: each multiplies the streams Loki has to index.
pub const MAX_LOKI_LABELS: usize = 8;

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// An extra request header of an HTTP sink (`headers`, `headers_env`). Its value is a secret.
#[derive(Clone, Debug)]
pub struct SinkHeader {
    /// Checked to be a header name.
    pub name: String,
    /// Checked to be a header value (visible ASCII); never shown.
    pub value: super::Secret,
    /// `headers_env`: the environment variable the value was read from.
    pub env: Option<String>,
}

/// Header name → `<redacted>`, or `<redacted: env VAR>` for one read from the environment.
fn redacted_headers<S: serde::Serializer>(h: &[SinkHeader], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(h.iter().map(|h| {
        let shown = match &h.env {
            Some(var) => format!("<redacted: env {var}>"),
            None => "<redacted>".to_string(),
        };
        (h.name.as_str(), shown)
    }))
}

#[derive(Clone, Debug, Serialize)]
pub struct Redact {
    #[serde(serialize_with = "display")]
    pub pattern: regex::Regex,
    pub mask: String,
}

/// The mask when a rule names none.
pub const DEFAULT_MASK: &str = "[REDACTED]";

/// Raw → typed; None when the section is absent or a problem was found (each pushed, located).
pub fn validate(
    raw: RawLogs,
    supervised_app: bool,
    access_log: bool,
    env: &dyn Environment,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<LogsConfig> {
    let before = problems.len();
    if !cfg!(feature = "logs") {
        problems.push(doc.problem(
            "logs",
            "logs need the log agent, and this binary was built without it (cargo feature `logs`)",
        ));
        return None;
    }
    if raw.sources.is_empty() {
        problems.push(doc.problem(
            "logs.sources",
            "expected at least one source, like [{app: stdio}], [{files: /var/log/app/*.log}] or [{access_log: true}]",
        ));
    }
    let mut sources = Vec::new();
    let mut app_seen = false;
    let mut access_seen = false;
    for (i, s) in raw.sources.into_iter().enumerate() {
        let key = format!("logs.sources[{i}]");
        let before_source = problems.len();
        let parser = |name: Option<&str>, at: &str, problems: &mut Vec<Problem>| {
            Some(match name {
                None | Some("auto") => LineFormat::Auto,
                Some("json") => LineFormat::Json,
                Some("plain") => LineFormat::Plain,
                Some("logfmt") => LineFormat::Logfmt,
                Some("regex") => match s.pattern.as_deref().map(regex::Regex::new) {
                    Some(Ok(r)) if r.capture_names().flatten().next().is_some() => {
                        LineFormat::Regex(r)
                    }
                    Some(Ok(_)) => {
                        problems.push(doc.problem(
                            &format!("{key}.pattern"),
                            "expected a regular expression with named captures, like (?P<level>\\w+)",
                        ));
                        return None;
                    }
                    Some(Err(e)) => {
                        problems.push(doc.problem(
                            &format!("{key}.pattern"),
                            format!("expected a regular expression: {e}"),
                        ));
                        return None;
                    }
                    None => {
                        problems.push(doc.problem(
                            at,
                            "regex needs a pattern: with named captures, like pattern: '^(?P<level>\\w+) (?P<message>.*)$'",
                        ));
                        return None;
                    }
                },
                Some(other) => {
                    problems.push(doc.problem(
                        at,
                        format!("expected auto, json, plain, logfmt, regex, cri or docker, found {other:?}"),
                    ));
                    return None;
                }
            })
        };
        let format_key = format!("{key}.format");
        let (container, format) = match s.format.as_deref() {
            Some("cri") => (
                Some(Container::Cri),
                parser(
                    s.message_format.as_deref(),
                    &format!("{key}.message_format"),
                    problems,
                ),
            ),
            Some("docker") => (
                Some(Container::Docker),
                parser(
                    s.message_format.as_deref(),
                    &format!("{key}.message_format"),
                    problems,
                ),
            ),
            other => {
                if s.message_format.is_some() {
                    problems.push(doc.problem(
                        &format!("{key}.message_format"),
                        "message_format applies to format: cri or docker only",
                    ));
                }
                (None, parser(other, &format_key, problems))
            }
        };
        if s.pattern.is_some() && !matches!(format, Some(LineFormat::Regex(_)) | None) {
            problems.push(doc.problem(
                &format!("{key}.pattern"),
                "pattern applies to format: regex (or message_format: regex) only",
            ));
        }
        let multiline = s.multiline.and_then(|m| {
            let at = format!("{key}.multiline");
            let start = regex::Regex::new(&m.start)
                .map_err(|e| {
                    problems.push(doc.problem(
                        &format!("{at}.start"),
                        format!("expected a regular expression: {e}"),
                    ))
                })
                .ok();
            let max_lines = m.max_lines.unwrap_or(DEFAULT_MULTILINE_MAX_LINES);
            if !(2..=100_000).contains(&max_lines) {
                problems.push(doc.problem(
                    &format!("{at}.max_lines"),
                    format!("expected 2 to 100000, found {max_lines}"),
                ));
            }
            let max_bytes = m.max_bytes.map_or(DEFAULT_MULTILINE_MAX_BYTES, |b| b.0);
            if !(1024..=(16 << 20)).contains(&max_bytes) {
                problems.push(doc.problem(
                    &format!("{at}.max_bytes"),
                    format!("expected 1KiB to 16MiB, found {max_bytes} bytes"),
                ));
            }
            let timeout = m.timeout.unwrap_or(DEFAULT_MULTILINE_TIMEOUT);
            if timeout.get().is_zero() {
                problems.push(doc.problem(&format!("{at}.timeout"), "expected a duration above 0"));
            }
            Some(Multiline {
                start: start?,
                max_lines,
                max_bytes,
                timeout,
            })
        });
        let rate_limit = s.rate_limit.map(|r| {
            let burst = r.burst.unwrap_or(r.per_second);
            if r.per_second == 0 {
                problems.push(doc.problem(
                    &format!("{key}.rate_limit.per_second"),
                    "expected at least 1 line per second",
                ));
            }
            if burst == 0 {
                problems.push(doc.problem(
                    &format!("{key}.rate_limit.burst"),
                    format!("expected at least 1, found {burst}"),
                ));
            }
            RateLimit {
                per_second: r.per_second,
                burst,
            }
        });
        let Some(format) = format else { continue };
        if s.access_log == Some(true) {
            if s.app.is_some() || s.files.is_some() {
                problems.push(doc.problem(
                    &key,
                    "expected exactly one of app: stdio, files: GLOB or access_log: true",
                ));
                continue;
            }
            if access_seen {
                problems.push(doc.problem(&key, "the access log is listed twice"));
            }
            access_seen = true;
            if !access_log {
                problems.push(doc.problem(
                    &format!("{key}.access_log"),
                    "access_log: true ships the proxy's access log, and there is none: set telemetry.access_log (its format is the line shipped)",
                ));
            }
            for (set, what) in [
                (s.start_at.is_some(), "start_at"),
                (s.rotate_wait.is_some(), "rotate_wait"),
                (container.is_some(), "format"),
                (multiline.is_some(), "multiline"),
                (rate_limit.is_some(), "rate_limit"),
            ] {
                if set {
                    problems.push(doc.problem(
                        &format!("{key}.{what}"),
                        format!("{what} does not apply to the access log"),
                    ));
                }
            }
            sources.push(LogSource {
                name: s.name.unwrap_or_else(|| "access_log".into()),
                kind: LogSourceKind::AccessLog,
                format,
                container: None,
                multiline: None,
                rate_limit: None,
            });
            continue;
        }
        match (s.app.as_deref(), s.files) {
            (Some("stdio"), None) => {
                if app_seen {
                    problems.push(doc.problem(&key, "the app's stdio is listed twice"));
                }
                app_seen = true;
                if !supervised_app {
                    problems.push(doc.problem(
                        &format!("{key}.app"),
                        "app: stdio needs a supervised app (app.command or `-- CMD`)",
                    ));
                }
                if s.start_at.is_some() {
                    problems.push(doc.problem(
                        &format!("{key}.start_at"),
                        "start_at applies to files only: the app's lines are read as they come",
                    ));
                }
                if s.rotate_wait.is_some() {
                    problems.push(doc.problem(
                        &format!("{key}.rotate_wait"),
                        "rotate_wait applies to files only",
                    ));
                }
                if container.is_some() {
                    problems.push(doc.problem(
                        &format_key,
                        "cri and docker are formats of a container runtime's files: the app's stdio is read as the app writes it",
                    ));
                }
                sources.push(LogSource {
                    name: s.name.unwrap_or_else(|| "app".into()),
                    kind: LogSourceKind::App,
                    format,
                    container: None,
                    multiline,
                    rate_limit,
                });
            }
            (Some(other), None) => problems.push(doc.problem(
                &format!("{key}.app"),
                format!("expected stdio, found {other:?}"),
            )),
            (None, Some(glob)) => {
                let from_end = match s.start_at.as_deref() {
                    None | Some("beginning") => false,
                    Some("end") => true,
                    Some(other) => {
                        problems.push(doc.problem(
                            &format!("{key}.start_at"),
                            format!("expected beginning or end, found {other:?}"),
                        ));
                        false
                    }
                };
                if !glob.starts_with('/') {
                    problems.push(doc.problem(
                        &format!("{key}.files"),
                        format!("expected an absolute path or glob, found {glob:?}"),
                    ));
                    continue;
                }
                #[cfg(feature = "logs")]
                if let Err(e) = compile_glob(&glob) {
                    problems.push(doc.problem(
                        &format!("{key}.files"),
                        format!("expected a glob like /var/log/app/*.log: {e}"),
                    ));
                    continue;
                }
                if problems.len() > before_source {
                    continue;
                }
                sources.push(LogSource {
                    name: s.name.unwrap_or_else(|| glob.clone()),
                    kind: LogSourceKind::Files {
                        base: glob_base(&glob),
                        glob,
                        from_end,
                        rotate_wait: s.rotate_wait.unwrap_or(DEFAULT_ROTATE_WAIT),
                    },
                    format,
                    container,
                    multiline,
                    rate_limit,
                });
            }
            _ => problems.push(doc.problem(
                &key,
                "expected exactly one of app: stdio, files: GLOB or access_log: true",
            )),
        }
    }

    if raw.sinks.is_empty() {
        problems.push(doc.problem(
            "logs.sinks",
            "expected a sink, like [{http: http://collector:8080/logs}] or [{stdout: true}]",
        ));
    }
    if raw.sinks.len() > MAX_SINKS {
        problems.push(doc.problem(
            "logs.sinks",
            format!(
                "expected at most {MAX_SINKS} sinks, found {}",
                raw.sinks.len()
            ),
        ));
    }
    let mut sinks: Vec<NamedSink> = Vec::new();
    for (i, raw) in raw.sinks.into_iter().enumerate() {
        let key = format!("logs.sinks[{i}]");
        let name = raw.name.clone();
        let Some(s) = sink(raw, &key, env, doc, problems) else {
            continue;
        };
        let name = name.unwrap_or_else(|| s.kind().to_string());
        if name.is_empty() || sinks.iter().any(|o| o.name == name) {
            problems.push(doc.problem(
                &format!("{key}.name"),
                format!(
                    "expected a name no other sink has ({name:?} is taken; two sinks of one kind need a name: each)"
                ),
            ));
            continue;
        }
        sinks.push(NamedSink { name, sink: s });
    }

    let mut redact = Vec::new();
    for (i, r) in raw.redact.into_iter().enumerate() {
        match regex::Regex::new(&r.pattern) {
            Ok(pattern) => redact.push(Redact {
                pattern,
                mask: r.mask.unwrap_or_else(|| DEFAULT_MASK.into()),
            }),
            Err(e) => problems.push(doc.problem(
                &format!("logs.redact[{i}].pattern"),
                format!("expected a regular expression: {e}"),
            )),
        }
    }
    for name in raw.fields.keys().chain(raw.env_fields.keys()) {
        if RESERVED_FIELDS.contains(&name.as_str()) {
            problems.push(doc.problem(
                "logs.fields",
                format!("{name:?} is set by Outrigger on every line; choose another name"),
            ));
        }
    }
    let batch_lines = raw.batch.max_lines.unwrap_or(DEFAULT_BATCH_LINES);
    if batch_lines == 0 || batch_lines > 100_000 {
        problems.push(doc.problem(
            "logs.batch.max_lines",
            format!("expected 1 to 100000, found {batch_lines}"),
        ));
    }
    let batch_bytes = raw.batch.max_bytes.map_or(DEFAULT_BATCH_BYTES, |b| b.0);
    if !(1024..=(64 << 20)).contains(&batch_bytes) {
        problems.push(doc.problem(
            "logs.batch.max_bytes",
            format!("expected 1KiB to 64MiB, found {batch_bytes} bytes"),
        ));
    }
    let app_buffer = raw.app_buffer.map_or(DEFAULT_APP_BUFFER, |b| b.0);
    if app_buffer < 64 << 10 {
        problems.push(doc.problem(
            "logs.app_buffer",
            format!("expected at least 64KiB, found {app_buffer} bytes"),
        ));
    }
    let buffer = raw.buffer.and_then(|b| {
        let max_bytes = b.max_bytes.map_or(DEFAULT_SPOOL_BYTES, |m| m.0);
        if max_bytes < 1 << 20 {
            problems.push(doc.problem(
                "logs.buffer.max_bytes",
                format!("expected at least 1MiB, found {max_bytes} bytes"),
            ));
        }
        if !app_seen {
            problems.push(doc.problem(
                "logs.buffer",
                "the disk buffer holds the app's stdout/stderr: add the source {app: stdio}",
            ));
        }
        if !b.dir.is_absolute() {
            problems.push(doc.problem(
                "logs.buffer.dir",
                format!("expected an absolute path, found {:?}", b.dir),
            ));
            return None;
        }
        if let Err(e) = writable_dir(&b.dir) {
            problems.push(doc.problem(
                "logs.buffer.dir",
                format!("expected a directory Outrigger can write: {e}"),
            ));
            return None;
        }
        Some(Buffer {
            dir: b.dir,
            max_bytes,
        })
    });
    let poll = raw.poll.unwrap_or(DEFAULT_POLL);
    if poll.get().is_zero() {
        problems.push(doc.problem("logs.poll", "expected a duration above 0"));
    }
    // Zero would spin: a batch tick of 0, or retries back to back against a sink that is down.
    for (key, value) in [
        ("logs.batch.max_wait", raw.batch.max_wait),
        ("logs.batch.retry_max", raw.batch.retry_max),
    ] {
        if value.is_some_and(|d| d.get().is_zero()) {
            problems.push(doc.problem(key, "expected a duration above 0"));
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(LogsConfig {
        sources,
        sinks,
        fields: raw.fields,
        env_fields: raw.env_fields,
        redact,
        batch_lines,
        batch_bytes,
        batch_wait: raw.batch.max_wait.unwrap_or(DEFAULT_BATCH_WAIT),
        retry_max: raw.batch.retry_max.unwrap_or(DEFAULT_RETRY_MAX),
        // The spool's positions must outlive a restart: without a checkpoint of its own
        // choosing, the buffer keeps one in its directory.
        checkpoint: raw
            .checkpoint
            .or_else(|| buffer.as_ref().map(|b| b.dir.join(SPOOL_CHECKPOINT))),
        app_buffer,
        buffer,
        poll,
    })
}

/// The checkpoint file in `logs.buffer.dir` when `logs.checkpoint` is not set.
pub const SPOOL_CHECKPOINT: &str = "checkpoint.json";

/// Checks `dir` can be written, or made: the directory itself when it exists, else the nearest
/// directory above it that exists (the log agent creates the rest when it starts). Nothing is
/// created: `outrigger check` and a reload leave the filesystem as they found it.
fn writable_dir(dir: &std::path::Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    let existing = dir
        .ancestors()
        .find(|a| a.symlink_metadata().is_ok())
        .unwrap_or(std::path::Path::new("/"));
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    access(existing, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| format!("cannot write in {}: {e}", existing.display()))
}

/// Fields every shipped line carries, which `fields` may not replace.
pub const RESERVED_FIELDS: &[&str] = &["message", "source", "stream", "file", "time"];

/// At most this many sinks: each holds a copy of the batch in flight.
pub const MAX_SINKS: usize = 8;

impl LogSink {
    /// Its kind, the default `sink` label.
    pub fn kind(&self) -> &'static str {
        match self {
            LogSink::Stdout => "stdout",
            LogSink::File(_) => "file",
            LogSink::Http { .. } => "http",
            LogSink::Loki { .. } => "loki",
            LogSink::Otlp { .. } => "otlp",
            LogSink::Elasticsearch { .. } => "elasticsearch",
        }
    }

    /// Its extra request headers (`headers`, `headers_env`), values included.
    pub fn headers(&self) -> &[SinkHeader] {
        match self {
            LogSink::Stdout | LogSink::File(_) => &[],
            LogSink::Http { headers, .. }
            | LogSink::Loki { headers, .. }
            | LogSink::Otlp { headers, .. }
            | LogSink::Elasticsearch { headers, .. } => headers,
        }
    }

    /// Its `tls` keys, when set.
    pub fn tls(&self) -> Option<&ClientTlsConfig> {
        match self {
            LogSink::Stdout | LogSink::File(_) => None,
            LogSink::Http { tls, .. }
            | LogSink::Loki { tls, .. }
            | LogSink::Otlp { tls, .. }
            | LogSink::Elasticsearch { tls, .. } => tls.as_ref(),
        }
    }

    /// The TLS an HTTP sink's `https://` URL is reached with: its `tls`, else the system's
    /// roots. None for a plain `http://` URL and for `stdout` and `file`.
    pub fn https(&self) -> Option<ClientTlsConfig> {
        let url = match self {
            LogSink::Stdout | LogSink::File(_) => return None,
            LogSink::Http { url, .. }
            | LogSink::Loki { url, .. }
            | LogSink::Otlp { url, .. }
            | LogSink::Elasticsearch { url, .. } => url,
        };
        if url.scheme_str() != Some("https") {
            return None;
        }
        Some(self.tls().cloned().unwrap_or(ClientTlsConfig {
            ca: None,
            server_name: None,
            client: None,
            identity: None,
            min_version: super::tls::TlsVersion::V1_2,
        }))
    }
}

fn sink(
    raw: RawLogSink,
    key: &str,
    env: &dyn Environment,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<LogSink> {
    let chosen = raw.http.is_some() as u8
        + raw.loki.is_some() as u8
        + raw.otlp.is_some() as u8
        + raw.elasticsearch.is_some() as u8
        + raw.file.is_some() as u8
        + (raw.stdout == Some(true)) as u8;
    if chosen != 1 {
        problems.push(doc.problem(
            key,
            "expected exactly one of http: URL, loki: URL, otlp: URL, elasticsearch: URL, file: PATH or stdout: true",
        ));
        return None;
    }
    if raw.labels.is_some() && raw.loki.is_none() {
        problems.push(doc.problem(&format!("{key}.labels"), "labels apply to a loki sink only"));
        return None;
    }
    if raw.index.is_some() && raw.elasticsearch.is_none() {
        problems.push(doc.problem(
            &format!("{key}.index"),
            "index applies to an elasticsearch sink only",
        ));
        return None;
    }
    if raw.gzip.is_some() && (raw.file.is_some() || raw.stdout.is_some()) {
        problems.push(doc.problem(
            &format!("{key}.gzip"),
            "gzip applies to the HTTP sinks only (http, loki, otlp, elasticsearch)",
        ));
        return None;
    }
    let gzip = raw.gzip.unwrap_or(false);
    let timeout = raw.timeout.unwrap_or(DEFAULT_SINK_TIMEOUT);
    let url = [&raw.http, &raw.loki, &raw.otlp, &raw.elasticsearch]
        .into_iter()
        .flatten()
        .next();
    for (set, what) in [
        (!raw.headers.is_empty(), "headers"),
        (!raw.headers_env.is_empty(), "headers_env"),
    ] {
        if set && url.is_none() {
            problems.push(doc.problem(
                &format!("{key}.{what}"),
                format!("{what} apply to the HTTP sinks only (http, loki, otlp, elasticsearch)"),
            ));
            return None;
        }
    }
    let headers = sink_headers(&raw, key, env, doc, problems)?;
    let tls = match (&raw.tls, url) {
        (None, _) => None,
        (Some(_), None) => {
            problems.push(doc.problem(
                &format!("{key}.tls"),
                "tls applies to the HTTP sinks only (http, loki, otlp, elasticsearch)",
            ));
            return None;
        }
        // By the parsed scheme (`HTTPS://` is https); a URL that does not parse is reported
        // as such below. The URL is not repeated: it may hold credentials.
        (Some(t), Some(u)) => match u
            .parse::<http::Uri>()
            .ok()
            .as_ref()
            .and_then(|p| p.scheme_str())
        {
            Some(scheme) if scheme != "https" => {
                problems.push(doc.problem(
                    &format!("{key}.tls"),
                    format!("tls needs an https:// URL, found {scheme}://"),
                ));
                return None;
            }
            _ => Some(super::tls::client(t, &format!("{key}.tls"), doc, problems)?),
        },
    };
    // A URL without a path gets the API's usual one.
    let with_path = |url: &str, field: &str, default: &'static str, problems: &mut Vec<Problem>| {
        let mut uri = http_url(url, &format!("{key}.{field}"), doc, problems)?;
        if uri.path() == "/" && !url.ends_with('/') {
            let mut parts = uri.into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static(default));
            uri = http::Uri::from_parts(parts).ok()?;
        }
        Some(uri)
    };
    if let Some(url) = raw.loki {
        let uri = with_path(&url, "loki", "/loki/api/v1/push", problems)?;
        let labels = raw.labels.unwrap_or_else(|| vec!["source".into()]);
        let valid = |l: &String| {
            l.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if labels.is_empty() || labels.len() > MAX_LOKI_LABELS || !labels.iter().all(valid) {
            problems.push(doc.problem(
                &format!("{key}.labels"),
                format!("expected 1 to {MAX_LOKI_LABELS} field names of letters, digits and '_', found {labels:?}"),
            ));
            return None;
        }
        // Each label once: a stream's labels are a JSON object, and a name written twice in it
        // is what Loki reads as the last one only (a typo for another field, most likely).
        if let Some(j) = (1..labels.len()).find(|&j| labels[..j].contains(&labels[j])) {
            problems.push(doc.problem(
                &format!("{key}.labels[{j}]"),
                format!("expected each label once, found {:?} again", labels[j]),
            ));
            return None;
        }
        return Some(LogSink::Loki {
            url: uri,
            timeout,
            headers,
            labels,
            gzip,
            tls,
        });
    }
    if let Some(url) = raw.otlp {
        return Some(LogSink::Otlp {
            url: with_path(&url, "otlp", "/v1/logs", problems)?,
            timeout,
            headers,
            gzip,
            tls,
        });
    }
    if let Some(url) = raw.elasticsearch {
        let index = raw.index.unwrap_or_else(|| DEFAULT_ES_INDEX.into());
        // Elasticsearch's rules for index names that a config can break.
        if index.is_empty()
            || index.starts_with(['-', '_', '+'])
            || index
                .chars()
                .any(|c| c.is_ascii_uppercase() || " \\/*?\"<>|,#:".contains(c))
        {
            problems.push(doc.problem(
                &format!("{key}.index"),
                format!(
                    "expected a lowercase index name without spaces or \\/*?\"<>|,#:, found {index:?}"
                ),
            ));
            return None;
        }
        // `filter_path` drops `_bulk`'s items, by which each record's fate is known: with
        // errors, the whole batch would be sent again (stored twice), without end when an item
        // is refused for good.
        let filtered = url.split_once('?').is_some_and(|(_, q)| {
            q.split('&')
                .any(|kv| kv.split('=').next() == Some("filter_path"))
        });
        if filtered {
            problems.push(doc.problem(
                &format!("{key}.elasticsearch"),
                "filter_path is not supported: the outcome of each record is read from _bulk's items",
            ));
            return None;
        }
        return Some(LogSink::Elasticsearch {
            url: with_path(&url, "elasticsearch", "/_bulk", problems)?,
            timeout,
            headers,
            index,
            gzip,
            tls,
        });
    }
    if let Some(url) = raw.http {
        let uri = http_url(&url, &format!("{key}.http"), doc, problems)?;
        return Some(LogSink::Http {
            url: uri,
            timeout,
            headers,
            gzip,
            tls,
        });
    }
    if let Some(path) = raw.file {
        return Some(LogSink::File(path));
    }
    Some(LogSink::Stdout)
}

/// An HTTP sink's `headers` and `headers_env`, checked: header names, visible-ASCII values,
/// each name once (names are case-insensitive), every variable set. No problem shows a value,
/// and none shows what a variable holds.
fn sink_headers(
    raw: &RawLogSink,
    key: &str,
    env: &dyn Environment,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<Vec<SinkHeader>> {
    let before = problems.len();
    let mut out: Vec<SinkHeader> = Vec::new();
    // The sink's name as `/ready` and the metrics show it (`LogSink::kind`), for the messages.
    let sink = raw.name.as_deref().unwrap_or(if raw.loki.is_some() {
        "loki"
    } else if raw.otlp.is_some() {
        "otlp"
    } else if raw.elasticsearch.is_some() {
        "elasticsearch"
    } else {
        "http"
    });
    let literal = raw
        .headers
        .iter()
        .map(|(name, value)| (name, Some(value.clone()), None));
    let from_env = raw.headers_env.iter().map(|(name, var)| {
        let value = env
            .var(var)
            .filter(|v| !v.is_empty())
            .map(super::Secret::new);
        (name, value, Some(var))
    });
    for (name, value, var) in literal.chain(from_env) {
        let at = match var {
            None => format!("{key}.headers.{name}"),
            Some(_) => format!("{key}.headers_env.{name}"),
        };
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.push(doc.problem(
                &at,
                format!(
                    "expected a header name (letters, digits and !#$%&'*+-.^_`|~), found {name:?}"
                ),
            ));
            continue;
        }
        // The sink frames its requests itself (and sets their type and encoding).
        let lower = name.to_ascii_lowercase();
        if super::route::FRAMING_HEADERS.contains(&lower.as_str())
            || ["content-type", "content-encoding"].contains(&lower.as_str())
        {
            problems.push(doc.problem(
                &at,
                format!(
                    "the sink {sink:?} sets {name} itself (it frames and encodes its requests); remove it"
                ),
            ));
            continue;
        }
        if out.iter().any(|h| h.name.eq_ignore_ascii_case(name)) {
            problems.push(doc.problem(
                &at,
                format!(
                    "the header {name} is set twice (in headers and headers_env, or in two cases: header names are case-insensitive)"
                ),
            ));
            continue;
        }
        let Some(value) = value else {
            let var = var.expect("only a variable can be unset");
            problems.push(doc.problem(
                &at,
                format!(
                    "the sink {sink:?} reads its {name} header from the environment variable {var}, which is {}",
                    if env.var(var).is_some() {
                        "empty"
                    } else if env.is_set(var) {
                        "not valid UTF-8"
                    } else {
                        "not set"
                    }
                ),
            ));
            continue;
        };
        if http::HeaderValue::from_str(value.expose()).is_err() {
            problems.push(doc.problem(
                &at,
                match var {
                    None => "expected a header value of visible ASCII characters (the value is not shown)".to_string(),
                    Some(var) => format!(
                        "the sink {sink:?} reads its {name} header from the environment variable {var}, which holds characters a header value cannot (control characters, a line break, non-ASCII: a Secret made with `echo` ends with a newline; the value is not shown)"
                    ),
                },
            ));
            continue;
        }
        out.push(SinkHeader {
            name: name.clone(),
            value,
            env: var.cloned(),
        });
    }
    (problems.len() == before).then_some(out)
}

fn http_url(
    url: &str,
    key: &str,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<http::Uri> {
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            problems.push(doc.problem(
                key,
                format!("expected a URL like http://collector:8080/logs: {e}"),
            ));
            return None;
        }
    };
    // hyper sends no Authorization for them, so the collector would answer 401 for ever.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        problems.push(doc.problem(
            key,
            "expected no credentials in the URL (they would show in /config and logs); put them in headers, e.g. authorization",
        ));
        return None;
    }
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        problems.push(doc.problem(
            key,
            format!("expected an http:// or https:// URL with a host, found {url:?}"),
        ));
        return None;
    }
    Some(uri)
}

/// `files:` as a matcher: `*` stays within one directory.
#[cfg(feature = "logs")]
pub fn compile_glob(glob: &str) -> Result<globset::GlobMatcher, globset::Error> {
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
}

/// The longest leading part of `glob` without a wildcard, cut at a `/`: the directory to list.
fn glob_base(glob: &str) -> PathBuf {
    let wild = glob.find(['*', '?', '[', '{']).unwrap_or(glob.len());
    let cut = glob[..wild].rfind('/').unwrap_or(0);
    PathBuf::from(if cut == 0 { "/" } else { &glob[..cut] })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config of `text` with the environment `env`, or its problems (`line:col: path:
    /// message`, the file name cut).
    #[cfg(feature = "logs")]
    fn load(text: &str, env: &[(&str, &str)]) -> Result<crate::config::Config, Vec<String>> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let source = crate::config::Source {
            file: Some(file.path().to_path_buf()),
            ..Default::default()
        };
        crate::config::load(&source, &env).map_err(|e| {
            e.problems
                .iter()
                .map(|p| {
                    let line = p.to_string();
                    line.split_once(':')
                        .map_or(line.clone(), |(_, rest)| rest.to_string())
                })
                .collect()
        })
    }

    #[cfg(feature = "logs")]
    const SINKS: &str = "logs:\n  sources: [{files: /var/log/*.log}]\n  sinks:\n";

    #[cfg(feature = "logs")]
    #[test]
    fn headers_env_values_come_from_the_environment_and_are_never_shown() {
        let text = format!(
            "{SINKS}    - loki: http://loki:3100\n      headers: {{X-Scope-OrgID: tenant-1}}\n      headers_env: {{Authorization: LOKI_AUTH}}\n"
        );
        let config = load(&text, &[("LOKI_AUTH", "Bearer s3cret")]).unwrap();
        let logs = config.logs.as_ref().unwrap();
        let LogSink::Loki { headers, .. } = &logs.sinks[0].sink else {
            panic!("{logs:?}")
        };
        let got: Vec<_> = headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.expose(), h.env.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("X-Scope-OrgID", "tenant-1", None),
                ("Authorization", "Bearer s3cret", Some("LOKI_AUTH")),
            ]
        );
        let shown = serde_json::to_string(&config).unwrap();
        assert!(
            shown.contains(r#""headers":{"X-Scope-OrgID":"<redacted>","Authorization":"<redacted: env LOKI_AUTH>"}"#),
            "{shown}"
        );
        assert!(!shown.contains("s3cret") && !config.to_yaml().contains("s3cret"));
        assert!(!format!("{config:?}").contains("s3cret"));

        // Unset, empty, not a header value: refused at the entry, naming variable and sink.
        let unset = load(&text, &[]).unwrap_err();
        assert_eq!(
            unset,
            [
                "6:36: logs.sinks[0].headers_env.Authorization: the sink \"loki\" reads its Authorization header from the environment variable LOKI_AUTH, which is not set"
            ]
        );
        let empty = load(&text, &[("LOKI_AUTH", "")]).unwrap_err();
        assert!(empty[0].ends_with("LOKI_AUTH, which is empty"), "{empty:?}");
        let newline = load(&text, &[("LOKI_AUTH", "Bearer s3cret\n")]).unwrap_err();
        assert_eq!(newline.len(), 1, "{newline:?}");
        assert!(newline[0].starts_with("6:36: logs.sinks[0].headers_env.Authorization: "));
        assert!(newline[0].contains("ends with a newline") && !newline[0].contains("s3cret"));
    }

    #[cfg(feature = "logs")]
    #[test]
    fn sink_headers_are_checked_and_each_set_once() {
        let problems = load(
            &format!(
                "{SINKS}    - http: http://c/x\n      headers: {{authorization: a, 'bad name': b, x-ok: \"s3cret\\u0001\"}}\n      headers_env: {{Authorization: AUTH}}\n    - name: f\n      file: /tmp/x\n      headers_env: {{a: AUTH}}\n    - otlp: http://o/v1/logs\n      headers: {{host: h, Content-Type: x, X-Tenant: t}}\n"
            ),
            &[("AUTH", "t")],
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "5:47: logs.sinks[0].headers.bad name: expected a header name (letters, digits and !#$%&'*+-.^_`|~), found \"bad name\"",
                "5:56: logs.sinks[0].headers.x-ok: expected a header value of visible ASCII characters (the value is not shown)",
                "6:36: logs.sinks[0].headers_env.Authorization: the header Authorization is set twice (in headers and headers_env, or in two cases: header names are case-insensitive)",
                "9:7: logs.sinks[1].headers_env: headers_env apply to the HTTP sinks only (http, loki, otlp, elasticsearch)",
                "11:23: logs.sinks[2].headers.host: the sink \"otlp\" sets host itself (it frames and encodes its requests); remove it",
                "11:40: logs.sinks[2].headers.Content-Type: the sink \"otlp\" sets Content-Type itself (it frames and encodes its requests); remove it",
            ]
        );
    }

    #[cfg(feature = "logs")]
    #[test]
    fn a_loki_label_listed_twice_is_refused_at_its_entry() {
        let problems = load(
            &format!(
                "{SINKS}    - loki: http://loki:3100\n      labels: [source, level, source]\n"
            ),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            problems,
            ["5:31: logs.sinks[0].labels[2]: expected each label once, found \"source\" again"]
        );
    }

    #[test]
    fn a_buffer_dir_is_checked_without_being_created() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("a/b/spool");
        assert_eq!(writable_dir(&spool), Ok(()));
        assert!(!dir.path().join("a").exists());
        std::fs::write(dir.path().join("file"), "").unwrap();
        let err = writable_dir(&dir.path().join("file/spool")).unwrap_err();
        assert!(err.ends_with("file is not a directory"), "{err}");
    }

    #[test]
    fn glob_base_is_the_directory_before_the_first_wildcard() {
        assert_eq!(
            glob_base("/var/log/app/*.log"),
            PathBuf::from("/var/log/app")
        );
        assert_eq!(glob_base("/var/log/*/x.log"), PathBuf::from("/var/log"));
        assert_eq!(glob_base("/a.log"), PathBuf::from("/"));
        assert_eq!(glob_base("/var/log/a.log"), PathBuf::from("/var/log"));
    }
}
