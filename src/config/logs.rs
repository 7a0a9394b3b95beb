//! The `logs:` section: where log lines come from (the app's stdout/stderr, files by glob), how
//! they are parsed, enriched and redacted, where they are shipped, and where positions are
//! checkpointed. Validated into real types (compiled globs and regexes, a parsed sink URL);
//! `docs/logs.md` is the reference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::document::{Document, Problem};
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
    pub poll: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogSource {
    /// `stdio`: the supervised app's stdout and stderr.
    pub app: Option<String>,
    /// A glob of files to follow (`/var/log/app/*.log`).
    pub files: Option<String>,
    /// For files seen for the first time at start-up: `beginning` (default) or `end`.
    pub start_at: Option<String>,
    /// `auto` (default: JSON when the line is a JSON object), `json` or `plain`.
    pub format: Option<String>,
    /// The `source` field of its lines (default: `app` or the glob).
    pub name: Option<String>,
    /// Files only: how long a rotated-away file is kept open, read to its end and quiet.
    pub rotate_wait: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogSink {
    /// POST batches as NDJSON to this `http://` URL.
    pub http: Option<String>,
    /// Push to Loki's push API (JSON) at this `http://` URL (`/loki/api/v1/push` when the URL
    /// has no path).
    pub loki: Option<String>,
    /// Loki stream labels: the record fields whose values label a stream (default: `source`).
    pub labels: Option<Vec<String>>,
    /// Write NDJSON lines to Outrigger's stdout.
    pub stdout: Option<bool>,
    /// Append NDJSON lines to this file.
    pub file: Option<PathBuf>,
    pub timeout: Option<Duration>,
    pub headers: BTreeMap<String, super::Secret>,
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
    pub sink: LogSink,
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
    pub poll: Duration,
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
    pub format: LineFormat,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSourceKind {
    App,
    Files {
        glob: String,
        /// The directory to list: the glob's part before its first wildcard.
        base: PathBuf,
        from_end: bool,
        rotate_wait: Duration,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LineFormat {
    Auto,
    Json,
    Plain,
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
        #[serde(serialize_with = "header_names")]
        headers: Vec<(String, super::Secret)>,
    },
    Loki {
        #[serde(serialize_with = "display")]
        url: http::Uri,
        timeout: Duration,
        #[serde(serialize_with = "header_names")]
        headers: Vec<(String, super::Secret)>,
        labels: Vec<String>,
    },
}

/// At most this many Loki label names: each multiplies the streams Loki has to index.
pub const MAX_LOKI_LABELS: usize = 8;

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn header_names<S: serde::Serializer>(
    h: &[(String, super::Secret)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(|(k, _)| k))
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
            "expected at least one source, like [{app: stdio}] or [{files: /var/log/app/*.log}]",
        ));
    }
    let mut sources = Vec::new();
    let mut app_seen = false;
    for (i, s) in raw.sources.into_iter().enumerate() {
        let key = format!("logs.sources[{i}]");
        let format = match s.format.as_deref() {
            None | Some("auto") => LineFormat::Auto,
            Some("json") => LineFormat::Json,
            Some("plain") => LineFormat::Plain,
            Some(other) => {
                problems.push(doc.problem(
                    &format!("{key}.format"),
                    format!("expected auto, json or plain, found {other:?}"),
                ));
                continue;
            }
        };
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
                sources.push(LogSource {
                    name: s.name.unwrap_or_else(|| "app".into()),
                    kind: LogSourceKind::App,
                    format,
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
                sources.push(LogSource {
                    name: s.name.unwrap_or_else(|| glob.clone()),
                    kind: LogSourceKind::Files {
                        base: glob_base(&glob),
                        glob,
                        from_end,
                        rotate_wait: s.rotate_wait.unwrap_or(DEFAULT_ROTATE_WAIT),
                    },
                    format,
                });
            }
            _ => problems
                .push(doc.problem(&key, "expected exactly one of app: stdio or files: GLOB")),
        }
    }

    let sink = match raw.sinks.len() {
        0 => {
            problems.push(doc.problem(
                "logs.sinks",
                "expected a sink, like [{http: http://collector:8080/logs}] or [{stdout: true}]",
            ));
            None
        }
        1 => sink(raw.sinks.into_iter().next()?, doc, problems),
        n => {
            problems.push(doc.problem(
                "logs.sinks",
                format!("expected one sink (this version ships to one), found {n}"),
            ));
            None
        }
    };

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
        sink: sink?,
        fields: raw.fields,
        env_fields: raw.env_fields,
        redact,
        batch_lines,
        batch_bytes,
        batch_wait: raw.batch.max_wait.unwrap_or(DEFAULT_BATCH_WAIT),
        retry_max: raw.batch.retry_max.unwrap_or(DEFAULT_RETRY_MAX),
        checkpoint: raw.checkpoint,
        app_buffer,
        poll,
    })
}

/// Fields every shipped line carries, which `fields` may not replace.
pub const RESERVED_FIELDS: &[&str] = &["message", "source", "stream", "file", "time"];

fn sink(raw: RawLogSink, doc: &Document, problems: &mut Vec<Problem>) -> Option<LogSink> {
    let key = "logs.sinks[0]";
    let chosen = raw.http.is_some() as u8
        + raw.loki.is_some() as u8
        + raw.file.is_some() as u8
        + (raw.stdout == Some(true)) as u8;
    if chosen != 1 {
        problems.push(doc.problem(
            key,
            "expected exactly one of http: URL, loki: URL, file: PATH or stdout: true",
        ));
        return None;
    }
    if raw.labels.is_some() && raw.loki.is_none() {
        problems.push(doc.problem(&format!("{key}.labels"), "labels apply to a loki sink only"));
        return None;
    }
    if let Some(url) = raw.loki {
        let mut uri = http_url(&url, &format!("{key}.loki"), doc, problems)?;
        if uri.path() == "/" && !url.ends_with('/') {
            let mut parts = uri.into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/loki/api/v1/push"));
            uri = http::Uri::from_parts(parts).ok()?;
        }
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
        return Some(LogSink::Loki {
            url: uri,
            timeout: raw.timeout.unwrap_or(DEFAULT_SINK_TIMEOUT),
            headers: raw.headers.into_iter().collect(),
            labels,
        });
    }
    if let Some(url) = raw.http {
        let uri = http_url(&url, &format!("{key}.http"), doc, problems)?;
        return Some(LogSink::Http {
            url: uri,
            timeout: raw.timeout.unwrap_or(DEFAULT_SINK_TIMEOUT),
            headers: raw.headers.into_iter().collect(),
        });
    }
    if let Some(path) = raw.file {
        return Some(LogSink::File(path));
    }
    Some(LogSink::Stdout)
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
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        problems.push(doc.problem(
            key,
            format!(
                "expected an http:// URL with a host (https is not supported yet), found {url:?}"
            ),
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
