//! Access logs: one JSON object per proxied request, written when its response has been sent
//! (so the duration and the response bytes are the whole exchange), to stdout, stderr or a
//! file. Lines go through a bounded queue to a writer thread: when the destination cannot keep
//! up, lines are dropped and counted (`outrigger_access_log_dropped_total`) rather than slowing
//! traffic down.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::io::Write;

use crate::config::AccessLogTo;
use crate::proxy::body::{BoxError, ProxyBody};

/// Lines waiting for the writer; beyond this they are dropped.
const QUEUE: usize = 8192;
/// How often the writer drains the queue.
const WRITE_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// The sending side, shared by every listener.
#[derive(Clone)]
pub struct AccessLog {
    tx: std::sync::mpsc::SyncSender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer: a plain thread with a buffered writer, so the runtime's threads only
    /// ever hand a line over (no blocking-pool round trip per write, as async file I/O costs).
    pub fn start(to: &AccessLogTo, dropped: Counter) -> std::io::Result<AccessLog> {
        // On a pipe shared with the app's own output, each write must hold whole lines and
        // stay within PIPE_BUF (4 KiB) to be atomic; a file takes bigger writes.
        let capacity = match to {
            AccessLogTo::File(_) => 64 * 1024,
            _ => 4096,
        };
        let out: Box<dyn Write + Send> = match to {
            AccessLogTo::Stdout => Box::new(std::io::stdout()),
            AccessLogTo::Stderr => Box::new(std::io::stderr()),
            AccessLogTo::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
        let lost = dropped.clone();
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(capacity, out);
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
                // period's lines at any rate this proxy reaches.
                loop {
                    std::thread::sleep(WRITE_EVERY);
                    let mut done = false;
                    loop {
                        match rx.try_recv() {
                            Ok(line) => {
                                if let Err(e) = out.write_all(line.as_bytes()) {
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

    fn send(&self, line: String) {
        if self.tx.try_send(line).is_err() {
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

/// What is known of a request when it arrives.
pub struct Entry {
    pub started: Instant,
    pub direction: &'static str,
    pub listener: crate::telemetry::metrics::Name,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub bytes_in: Option<u64>,
    pub trace_id: String,
    pub request_id: String,
    pub identity: Option<String>,
}

/// What the proxy learned while handling it: put in the response's extensions.
#[derive(Clone, Debug, Default)]
pub struct Routed {
    pub route: Option<crate::telemetry::metrics::Name>,
    pub cluster: Option<crate::telemetry::metrics::Name>,
    pub upstream: Option<String>,
    pub retries: u32,
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
    upstream: Option<&'a str>,
    retries: u32,
    trace_id: &'a str,
    request_id: &'a str,
    identity: Option<&'a str>,
    error: Option<&'a str>,
}

/// A request not answered yet: if it is dropped first (an HTTP/2 reset, a client gone while
/// its request waited), its line is still written, with status 499 and `client-closed`.
pub struct Unanswered(Option<(AccessLog, Entry)>);

impl Unanswered {
    pub fn new(log: &AccessLog, entry: Entry) -> Unanswered {
        Unanswered(Some((log.clone(), entry)))
    }

    /// The request got a response: its line is written when the response is done.
    pub fn answered(mut self, res: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
        let (log, entry) = self.0.take().expect("answered once");
        wrap(&log, entry, res)
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some((log, entry)) = self.0.take() {
            Pending {
                log,
                entry,
                status: 499,
                error: Some("client-closed".to_string()),
                routed: Routed::default(),
                bytes_out: 0,
            }
            .write();
        }
    }
}

/// Wraps the response body so the line is written once the body is done (or dropped: the
/// client went away).
pub fn wrap(
    log: &AccessLog,
    entry: Entry,
    res: http::Response<ProxyBody>,
) -> http::Response<ProxyBody> {
    let status = res.status().as_u16();
    let error = res
        .headers()
        .get("x-outrigger-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let routed = res
        .extensions()
        .get::<Routed>()
        .cloned()
        .unwrap_or_default();
    res.map(|body| {
        Logged {
            inner: body,
            pending: Some(Pending {
                log: log.clone(),
                entry,
                status,
                error,
                routed,
                bytes_out: 0,
            }),
        }
        .boxed()
    })
}

struct Pending {
    log: AccessLog,
    entry: Entry,
    status: u16,
    error: Option<String>,
    routed: Routed,
    bytes_out: u64,
}

impl Pending {
    fn write(self) {
        let e = &self.entry;
        let line = Line {
            // humantime panics on a clock before 1970, and this runs in Drop.
            time: match std::time::SystemTime::now() {
                now if now >= std::time::UNIX_EPOCH => {
                    humantime::format_rfc3339_micros(now).to_string()
                }
                _ => String::from("1970-01-01T00:00:00Z"),
            },
            direction: e.direction,
            listener: &e.listener,
            route: self.routed.route.as_deref().map(String::as_str),
            cluster: self.routed.cluster.as_deref().map(String::as_str),
            method: &e.method,
            authority: &e.authority,
            path: &e.path,
            status: self.status,
            duration_ms: (e.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            bytes_in: e.bytes_in,
            bytes_out: self.bytes_out,
            upstream: self.routed.upstream.as_deref(),
            retries: self.routed.retries,
            trace_id: &e.trace_id,
            request_id: &e.request_id,
            identity: e.identity.as_deref(),
            error: self.error.as_deref(),
        };
        if let Ok(mut s) = serde_json::to_string(&line) {
            s.push('\n');
            self.log.send(s);
        }
    }
}

struct Logged {
    inner: ProxyBody,
    pending: Option<Pending>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.write();
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref()
                    && let Some(p) = &mut self.pending
                {
                    p.bytes_out += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = self.pending.take() {
                    p.write();
                }
            }
            _ => {}
        }
        res
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
