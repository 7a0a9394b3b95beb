//! Access logs: one line per proxied request, written when its response has been sent (so the
//! duration and the response bytes are the whole exchange), to stdout, stderr or a file, as a
//! JSON object (the default) or through a format string. Records go through a bounded queue
//! to a writer thread that encodes and writes them: when the destination cannot keep up,
//! records are dropped and counted (`outrigger_access_log_dropped_total`) rather than slowing
//! traffic down.

use std::io::Write;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::config::telemetry::{AccessLogConfig, AccessLogFormat, AccessLogTo, Field, Piece};
use crate::telemetry::json::{hex, number, opt_string, string};
use crate::telemetry::record::Record;

/// Records waiting for the writer; beyond this they are dropped. Boxed in the queue, so an
/// idle queue costs 8 bytes a slot.
const QUEUE: usize = 8192;
/// How often the writer drains the queue.
const WRITE_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// The sending side, shared by every listener.
#[derive(Clone)]
pub struct AccessLog {
    tx: std::sync::mpsc::SyncSender<Box<Record>>,
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
        let tap = TAP.lock().expect("not poisoned").clone();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Box<Record>>(QUEUE);
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
                                if let Some(t) = &tap {
                                    t.send(&line);
                                }
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
        if self.tx.try_send(Box::new(record)).is_err() {
            self.dropped.inc();
        }
    }
}

/// The log agent's end of the access log (`logs.sources[].access_log`): each line, as
/// written, is also handed to it through a bounded queue; a full queue drops the line for the
/// agent only, counted (the proxy never waits for the log agent, nor does the writer).
#[derive(Clone)]
pub struct Tap {
    pub tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub dropped: Counter,
}

impl Tap {
    fn send(&self, line: &[u8]) {
        if self.tx.try_send(line.to_vec()).is_err() {
            self.dropped.inc();
        }
    }
}

/// Set by the log agent's wiring before the proxy starts its access log writer.
static TAP: std::sync::Mutex<Option<Tap>> = std::sync::Mutex::new(None);

/// Hands every access log line written from now on to `tap` as well.
pub fn set_tap(tap: Tap) {
    *TAP.lock().expect("not poisoned") = Some(tap);
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

/// The line's time, as `2026-11-27T13:04:08.625343Z` ([`json::time`]).
fn time(r: &Record, out: &mut Vec<u8>) {
    super::json::time(out, r.ended);
}

/// Milliseconds with up to three decimals (microsecond resolution), trailing zeros dropped.
fn duration_ms(r: &Record, out: &mut Vec<u8>) {
    let micros = r.duration.as_micros() as u64;
    number(out, micros / 1000);
    let frac = micros % 1000;
    if frac != 0 {
        let digits = [
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ];
        let mut len = 4;
        while digits[len - 1] == b'0' {
            len -= 1;
        }
        out.extend_from_slice(&digits[..len]);
    }
}

/// The JSON object, keys in a fixed order.
fn json_line(r: &Record, out: &mut Vec<u8>) {
    let e = &r.entry;
    out.extend_from_slice(b"{\"time\":\"");
    time(r, out);
    out.extend_from_slice(b"\",\"direction\":");
    string(out, e.direction.label());
    out.extend_from_slice(b",\"listener\":");
    string(out, &e.listener);
    out.extend_from_slice(b",\"route\":");
    opt_string(out, r.routed.route.as_deref().map(String::as_str));
    out.extend_from_slice(b",\"cluster\":");
    opt_string(out, r.routed.cluster.as_deref().map(String::as_str));
    out.extend_from_slice(b",\"method\":");
    string(out, e.method.as_str());
    out.extend_from_slice(b",\"authority\":");
    string(out, e.authority());
    out.extend_from_slice(b",\"path\":");
    string(out, e.uri.path());
    out.extend_from_slice(b",\"status\":");
    number(out, u64::from(r.status));
    out.extend_from_slice(b",\"duration_ms\":");
    duration_ms(r, out);
    out.extend_from_slice(b",\"bytes_in\":");
    match e.bytes_in {
        Some(b) => number(out, b),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"bytes_out\":");
    number(out, r.bytes_out);
    out.extend_from_slice(b",\"upstream\":");
    opt_string(out, r.routed.upstream.as_deref());
    out.extend_from_slice(b",\"retries\":");
    number(out, u64::from(r.routed.retries));
    out.extend_from_slice(b",\"trace_id\":\"");
    hex(out, e.trace.trace_id, 32);
    out.extend_from_slice(b"\",\"span_id\":\"");
    hex(out, u128::from(e.trace.span_id), 16);
    out.extend_from_slice(b"\",\"request_id\":");
    string(out, e.request_id());
    out.extend_from_slice(b",\"identity\":");
    opt_string(out, e.identity.as_deref());
    out.extend_from_slice(b",\"error\":");
    opt_string(out, r.error.as_deref());
    out.push(b'}');
}

/// Appends `r` as one line (without the newline) in `format`.
pub fn encode(format: &AccessLogFormat, r: &Record, out: &mut Vec<u8>) {
    let e = &r.entry;
    match format {
        AccessLogFormat::Json => json_line(r, out),
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
                    Field::Time => time(r, out),
                    Field::Direction => out.extend_from_slice(e.direction.label().as_bytes()),
                    Field::Listener => out.extend_from_slice(e.listener.as_bytes()),
                    Field::Route => text(out, r.routed.route.as_deref().map(String::as_str)),
                    Field::Cluster => text(out, r.routed.cluster.as_deref().map(String::as_str)),
                    Field::Method => out.extend_from_slice(e.method.as_str().as_bytes()),
                    Field::Authority => text(out, Some(e.authority())),
                    Field::Path => out.extend_from_slice(e.uri.path().as_bytes()),
                    Field::Status => {
                        let _ = write!(out, "{}", r.status);
                    }
                    Field::DurationMs => duration_ms(r, out),
                    Field::BytesIn => match e.bytes_in {
                        Some(b) => {
                            let _ = write!(out, "{b}");
                        }
                        None => out.push(b'-'),
                    },
                    Field::BytesOut => {
                        let _ = write!(out, "{}", r.bytes_out);
                    }
                    Field::Upstream => text(out, r.routed.upstream.as_deref()),
                    Field::Retries => {
                        let _ = write!(out, "{}", r.routed.retries);
                    }
                    Field::TraceId => hex(out, e.trace.trace_id, 32),
                    Field::SpanId => hex(out, u128::from(e.trace.span_id), 16),
                    Field::RequestId => text(out, Some(e.request_id())),
                    Field::Identity => text(out, e.identity.as_deref()),
                    Field::Error => text(out, r.error.as_deref()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::record::tests::sample_record;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    fn record(ended: SystemTime, duration: Duration, path: &str) -> Record {
        let mut r = sample_record();
        r.ended = ended;
        r.duration = duration;
        r.entry.uri = path.parse().unwrap();
        r
    }

    #[test]
    fn json_lines_are_json_with_every_field() {
        let r = record(
            UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789),
            Duration::from_micros(3_240),
            "/a%22b/c",
        );
        let mut out = Vec::new();
        encode(&AccessLogFormat::Json, &r, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["time"], "2026-11-18T11:06:40.123456Z");
        assert_eq!(v["listener"], "pub\"lic");
        assert_eq!(v["route"], "r");
        assert!(v["cluster"].is_null());
        assert_eq!(v["method"], "POST");
        assert_eq!(v["authority"], "shop");
        assert_eq!(v["path"], "/a%22b/c");
        assert_eq!(v["status"], 201);
        assert_eq!(v["duration_ms"], 3.24);
        assert_eq!(v["bytes_in"], 12);
        assert_eq!(v["bytes_out"], 5);
        assert_eq!(v["upstream"], "127.0.0.1:1");
        assert_eq!(v["retries"], 2);
        assert_eq!(v["trace_id"], "00000000000000000000000000000abc");
        assert_eq!(v["span_id"], "000000000000001f");
        assert_eq!(v["request_id"], "");
        assert_eq!(v["identity"], "spiffe://x/ns/é");
        assert!(v["error"].is_null());
    }

    #[test]
    fn times_and_durations_match_the_usual_formatting() {
        for secs in [
            0u64,
            59,
            951_782_400,
            1_709_164_800,
            4_102_444_799,
            1_795_000_000,
        ] {
            for nanos in [0u32, 1_000, 999_999_999] {
                let t = UNIX_EPOCH + Duration::new(secs, nanos);
                let r = record(t, Duration::ZERO, "/");
                let mut out = Vec::new();
                time(&r, &mut out);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    humantime::format_rfc3339_micros(t).to_string()
                );
            }
        }
        for (micros, text) in [
            (0, "0"),
            (1, "0.001"),
            (10, "0.01"),
            (1_500, "1.5"),
            (12_345_678, "12345.678"),
        ] {
            let r = record(UNIX_EPOCH, Duration::from_micros(micros), "/");
            let mut out = Vec::new();
            duration_ms(&r, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
    }

    #[test]
    fn templates_write_dashes_for_absent_values() {
        let r = record(UNIX_EPOCH, Duration::from_micros(2_000), "/x");
        let format = AccessLogFormat::Template(
            crate::config::telemetry::parse_template(
                "{method} {path} {cluster} {upstream} {duration_ms}ms {trace_id}",
            )
            .unwrap(),
        );
        let mut out = Vec::new();
        encode(&format, &r, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /x - 127.0.0.1:1 2ms 00000000000000000000000000000abc"
        );
    }
}
