//! Access logs: one line per proxied request, written when its response has been sent (so the
//! duration and the response bytes are the whole exchange), to stdout, stderr or a file, as a
//! JSON object (the default) or through a format string. Records go through a bounded queue
//! to a writer thread that encodes and writes them: when the destination cannot keep up,
//! records are dropped and counted (`outrigger_access_log_dropped_total`) rather than slowing
//! traffic down.

use std::io::Write;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::telemetry::{AccessLogConfig, AccessLogFormat, AccessLogTo, Field, Piece};
use crate::telemetry::record::Record;

/// Records waiting for the writer; beyond this they are dropped.
const QUEUE: usize = 8192;
/// How often the writer drains the queue.
const WRITE_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// The sending side, shared by every listener.
#[derive(Clone)]
pub struct AccessLog {
    tx: std::sync::mpsc::SyncSender<Record>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer: a plain thread with a buffered writer, so the runtime's threads only
    /// ever hand a record over (no blocking-pool round trip per write, as async file I/O
    /// costs, and no encoding on the data path).
    pub fn start(config: &AccessLogConfig, dropped: Counter) -> std::io::Result<AccessLog> {
        // On a pipe shared with the app's own output, each write must hold whole lines and
        // stay within PIPE_BUF (4 KiB) to be atomic; a file takes bigger writes.
        let capacity = match config.to {
            AccessLogTo::File(_) => 64 * 1024,
            _ => 4096,
        };
        let out: Box<dyn Write + Send> = match &config.to {
            AccessLogTo::Stdout => Box::new(std::io::stdout()),
            AccessLogTo::Stderr => Box::new(std::io::stderr()),
            AccessLogTo::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let format = config.format.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Record>(QUEUE);
        let lost = dropped.clone();
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(capacity, out);
                let mut line: Vec<u8> = Vec::with_capacity(512);
                let mut last_warning: Option<Instant> = None;
                let mut failed = |e: std::io::Error, lines: u64| {
                    lost.inc_by(lines);
                    // A full disk or a closed pipe fails every write: say so once a minute.
                    if last_warning.is_none_or(|t| t.elapsed().as_secs() >= 60) {
                        last_warning = Some(Instant::now());
                        tracing::warn!(error = %e, "cannot write the access log; lines are dropped and counted");
                    }
                };
                // Polled, not woken: a sender never pays for waking this thread (a futex call
                // per request cost a quarter of the throughput). The queue holds well over one
                // period's records at any rate this proxy reaches.
                loop {
                    std::thread::sleep(WRITE_EVERY);
                    let mut done = false;
                    loop {
                        match rx.try_recv() {
                            Ok(record) => {
                                line.clear();
                                encode(&format, &record, &mut line);
                                line.push(b'\n');
                                if let Err(e) = out.write_all(&line) {
                                    failed(e, 1);
                                }
                            }
                            Err(std::sync::mpsc::TryRecvError::Empty) => break,
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                                done = true;
                                break;
                            }
                        }
                    }
                    if let Err(e) = out.flush() {
                        failed(e, 0);
                    }
                    if done {
                        return;
                    }
                }
            })?;
        *WRITER.lock().expect("not poisoned") = Some(handle);
        Ok(AccessLog { tx, dropped })
    }

    pub(crate) fn send(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

/// The writer thread, joined at exit so the last lines are written.
static WRITER: std::sync::Mutex<Option<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(None);

/// Waits (at most `limit`) for the writer to write what is queued. Call once every sender is
/// gone (after the runtime has stopped); the writer then drains the queue and ends.
pub fn flush_at_exit(limit: std::time::Duration) {
    let Some(handle) = WRITER.lock().expect("not poisoned").take() else {
        return;
    };
    let deadline = Instant::now() + limit;
    while !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if handle.is_finished() {
        let _ = handle.join();
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    direction: &'static str,
    listener: &'a str,
    route: Option<&'a str>,
    cluster: Option<&'a str>,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    status: u16,
    duration_ms: f64,
    bytes_in: Option<u64>,
    bytes_out: u64,
    upstream: Option<String>,
    retries: u32,
    trace_id: String,
    span_id: String,
    request_id: &'a str,
    identity: Option<&'a str>,
    error: Option<&'a str>,
}

fn time(r: &Record) -> String {
    // humantime panics on a clock before 1970.
    if r.ended >= std::time::UNIX_EPOCH {
        humantime::format_rfc3339_micros(r.ended).to_string()
    } else {
        String::from("1970-01-01T00:00:00Z")
    }
}

fn duration_ms(r: &Record) -> f64 {
    (r.duration.as_secs_f64() * 1e6).round() / 1e3
}

/// Appends `r` as one line (without the newline) in `format`.
pub fn encode(format: &AccessLogFormat, r: &Record, out: &mut Vec<u8>) {
    let e = &r.entry;
    match format {
        AccessLogFormat::Json => {
            let line = Line {
                time: time(r),
                direction: e.direction,
                listener: &e.listener,
                route: r.routed.route.as_deref().map(String::as_str),
                cluster: r.routed.cluster.as_deref().map(String::as_str),
                method: e.method.as_str(),
                authority: e.authority(),
                path: e.uri.path(),
                status: r.status,
                duration_ms: duration_ms(r),
                bytes_in: e.bytes_in,
                bytes_out: r.bytes_out,
                upstream: r.routed.upstream.as_ref().map(|a| a.to_string()),
                retries: r.routed.retries,
                trace_id: e.trace.trace_hex(),
                span_id: e.trace.span_hex(),
                request_id: e.request_id(),
                identity: e.identity.as_deref(),
                error: r.error.as_deref(),
            };
            let _ = serde_json::to_writer(&mut *out, &line);
        }
        AccessLogFormat::Template(pieces) => {
            for p in pieces {
                let f = match p {
                    Piece::Text(t) => {
                        out.extend_from_slice(t.as_bytes());
                        continue;
                    }
                    Piece::Field(f) => f,
                };
                let text = |out: &mut Vec<u8>, v: Option<&str>| match v {
                    Some(v) if !v.is_empty() => out.extend_from_slice(v.as_bytes()),
                    _ => out.push(b'-'),
                };
                match f {
                    Field::Time => out.extend_from_slice(time(r).as_bytes()),
                    Field::Direction => out.extend_from_slice(e.direction.as_bytes()),
                    Field::Listener => out.extend_from_slice(e.listener.as_bytes()),
                    Field::Route => text(out, r.routed.route.as_deref().map(String::as_str)),
                    Field::Cluster => text(out, r.routed.cluster.as_deref().map(String::as_str)),
                    Field::Method => out.extend_from_slice(e.method.as_str().as_bytes()),
                    Field::Authority => text(out, Some(e.authority())),
                    Field::Path => out.extend_from_slice(e.uri.path().as_bytes()),
                    Field::Status => {
                        let _ = write!(out, "{}", r.status);
                    }
                    Field::DurationMs => {
                        let _ = write!(out, "{}", duration_ms(r));
                    }
                    Field::BytesIn => match e.bytes_in {
                        Some(b) => {
                            let _ = write!(out, "{b}");
                        }
                        None => out.push(b'-'),
                    },
                    Field::BytesOut => {
                        let _ = write!(out, "{}", r.bytes_out);
                    }
                    Field::Upstream => match &r.routed.upstream {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.push(b'-'),
                    },
                    Field::Retries => {
                        let _ = write!(out, "{}", r.routed.retries);
                    }
                    Field::TraceId => {
                        let _ = write!(out, "{:032x}", e.trace.trace_id);
                    }
                    Field::SpanId => {
                        let _ = write!(out, "{:016x}", e.trace.span_id);
                    }
                    Field::RequestId => text(out, Some(e.request_id())),
                    Field::Identity => text(out, e.identity.as_deref()),
                    Field::Error => text(out, r.error.as_deref()),
                }
            }
        }
    }
}
