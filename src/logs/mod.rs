//! The log agent (`logs:`): lines come in from the supervised app's stdout/stderr
//! (`lifecycle::capture`) and from files by glob ([`files`]); each is redacted, parsed and
//! enriched into one NDJSON record ([`parse`]); records are batched by count, bytes and time and
//! leave through one sink ([`sink`]); file positions are checkpointed ([`checkpoint`]) only
//! after the sink acknowledged the batch.
//!
//! ```text
//!  app stdout/stderr ─► capture queue (bounded, drops counted) ─┐
//!  files (glob, poll) ─► read complete lines ───────────────────┼─► redact → parse → enrich
//!                                                               │        │
//!                      checkpoint ◄── ack ◄── sink (retries) ◄──┴── batch (lines/bytes/wait)
//! ```
//!
//! One batch is in flight at a time. While the sink is down the batch is retried (exponential
//! backoff, jitter) and nothing more is read from files — backpressure: their bytes wait on
//! disk and their positions do not move. The app's lines cannot wait there: they queue up to
//! `logs.app_buffer`, then are dropped and counted. Delivery is at-least-once for files (a crash
//! between the sink's acknowledgement and the checkpoint write sends that one batch again) and
//! best-effort, counted, for the app's stdio. `docs/logs.md` states the guarantees.
//!
//! A supervised [`Module`]: it drains in step 3 of the stop, after the app has exited — it
//! reads the app's last lines and the files to their current end, sends them, checkpoints and
//! returns.

pub mod checkpoint;
pub mod files;
pub mod parse;
pub mod sink;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use crate::config::logs::{LineFormat, LogSourceKind, LogsConfig};
use crate::lifecycle::capture::{AppLine, Captured};
use crate::runtime::{Module, ModuleContext, ModuleFuture};
use crate::telemetry::metrics::{LogDropLabels, LogSinkLabels, LogSourceLabels, LogsMetrics};
use files::{FileSource, Files};
use parse::{Encoder, Origin};
use sink::{SendError, Sink};

/// How long a stop waits for the sink to take the last batches before giving up on them (file
/// lines are then read again after a restart; the app's are counted as dropped).
pub const DRAIN_FLUSH: Duration = Duration::from_secs(5);

/// The log agent module.
pub struct Logs {
    config: LogsConfig,
    metrics: LogsMetrics,
    /// The app's lines; held by the running pipeline (a tokio mutex: a panicking run releases it
    /// for the next one).
    captured: tokio::sync::Mutex<Option<Captured>>,
}

impl Logs {
    pub fn new(config: LogsConfig, captured: Option<Captured>, metrics: LogsMetrics) -> Logs {
        Logs {
            config,
            metrics,
            captured: tokio::sync::Mutex::new(captured),
        }
    }
}

impl Module for Logs {
    fn name(&self) -> &'static str {
        "logs"
    }

    fn run(self: Arc<Self>, cx: ModuleContext) -> ModuleFuture {
        Box::pin(async move { self.pipeline(cx).await.map_err(Into::into) })
    }
}

/// Lines and bytes ready to send, and where they came from.
struct Batch {
    body: Vec<u8>,
    lines: usize,
    /// Lines from the app (they cannot be read again if the batch is lost).
    app_lines: usize,
    started: Option<Instant>,
}

/// What the blocking pool works on: moved there and back for each fill.
struct Work {
    files: Files,
    encoder: Encoder,
    batch: Batch,
    /// Per source: name, format, lines and bytes read.
    sources: Vec<(String, LineFormat, Counter, Counter)>,
    app_source: Option<usize>,
    max_lines: usize,
    max_bytes: usize,
    poll: Duration,
}

impl Work {
    fn full(&self) -> bool {
        self.batch.lines >= self.max_lines || self.batch.body.len() >= self.max_bytes
    }

    /// Encodes `app` lines, then reads files until the batch is full. True when files still
    /// have lines to read.
    fn fill(&mut self, app: Vec<AppLine>) -> bool {
        let now = SystemTime::now();
        if let Some(s) = self.app_source {
            let (name, format, lines, bytes) = &self.sources[s];
            for l in &app {
                lines.inc();
                bytes.inc_by(l.line.len() as u64 + 1);
                self.encoder.encode(
                    &mut self.batch.body,
                    &l.line,
                    name,
                    *format,
                    Origin::Stream(l.stream.as_str()),
                    now,
                );
            }
            self.batch.lines += app.len();
            self.batch.app_lines += app.len();
        }
        if self.files.is_empty() {
            return false;
        }
        self.files.scan_if_due(self.poll);
        let (max_lines, max_bytes) = (self.max_lines, self.max_bytes);
        let Work {
            files,
            encoder,
            batch,
            sources,
            ..
        } = self;
        files.read(|l| {
            // One line always fits an empty batch, however long it is.
            let room = batch.lines == 0
                || (batch.lines < max_lines && batch.body.len() + l.line.len() < max_bytes);
            if !room {
                return false;
            }
            {
                let (name, format, lines, bytes) = &sources[l.source];
                lines.inc();
                bytes.inc_by(l.line.len() as u64 + 1);
                encoder.encode(
                    &mut batch.body,
                    l.line,
                    name,
                    *format,
                    Origin::File(l.path),
                    now,
                );
                batch.lines += 1;
            }
            true
        })
    }
}

/// Why the pipeline ended.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("the blocking pool failed: {0}")]
    Blocking(String),
}

impl Logs {
    async fn pipeline(&self, cx: ModuleContext) -> Result<(), LogsError> {
        let c = &self.config;
        let mut captured = self.captured.lock().await;
        let saved = match &c.checkpoint {
            Some(path) => checkpoint::load(path).unwrap_or_else(|e| {
                warn!(error = %e, "ignoring the log checkpoint");
                Default::default()
            }),
            None => Default::default(),
        };
        let mut file_sources = Vec::new();
        let mut sources = Vec::new();
        let mut app_source = None;
        for (i, s) in c.sources.iter().enumerate() {
            let label = LogSourceLabels {
                source: s.name.clone(),
            };
            sources.push((
                s.name.clone(),
                s.format,
                self.metrics.read.get_or_create(&label).clone(),
                self.metrics.read_bytes.get_or_create(&label).clone(),
            ));
            match &s.kind {
                LogSourceKind::App => app_source = Some(i),
                LogSourceKind::Files {
                    glob,
                    base,
                    from_end,
                } => file_sources.push(FileSource {
                    source: i,
                    matcher: crate::config::logs::compile_glob(glob)
                        .expect("validated with the config"),
                    base: base.clone(),
                    from_end: *from_end,
                }),
            }
        }
        let mut fields: Vec<(String, String)> = c
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, var) in &c.env_fields {
            if let Ok(v) = std::env::var(var) {
                fields.push((k.clone(), v));
            }
        }
        let mut work = Some(Work {
            files: Files::new(file_sources, saved),
            encoder: Encoder::new(c.redact.clone(), fields),
            batch: Batch {
                body: Vec::with_capacity(c.batch_bytes.min(1 << 20) + 4096),
                lines: 0,
                app_lines: 0,
                started: None,
            },
            sources,
            app_source,
            max_lines: c.batch_lines,
            max_bytes: c.batch_bytes,
            poll: c.poll.get(),
        });
        let sink = Sink::new(&c.sink);
        let sink_label = LogSinkLabels { sink: sink.kind() };
        let app_name = app_source.map(|s| c.sources[s].name.clone());
        let dropped = |reason: &'static str, n: usize| {
            if let (Some(name), true) = (&app_name, n > 0) {
                self.metrics
                    .dropped
                    .get_or_create(&LogDropLabels {
                        source: name.clone(),
                        reason,
                    })
                    .inc_by(n as u64);
            }
        };
        cx.set_ready();
        info!(
            sink = sink.kind(),
            sources = c.sources.len(),
            "log agent started"
        );

        let mut drain = cx.drain.clone();
        let mut draining = drain.is_draining();
        let mut app_open = captured.is_some();
        let tick = c.poll.get().min(c.batch_wait.get());
        let mut more = false;
        loop {
            // Wait for a line from the app, the next poll, or a stop — unless files have more.
            let mut app = Vec::new();
            if !more {
                let recv = async {
                    match captured.as_mut() {
                        Some(q) if app_open => q.recv().await,
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    l = recv => match l {
                        Some(l) => app.push(l),
                        None => app_open = false,
                    },
                    _ = tokio::time::sleep(tick) => {}
                    _ = drain.signaled(), if !draining => draining = true,
                }
            }
            let mut app_bytes = app.iter().map(|l| l.line.len()).sum::<usize>();
            if let Some(q) = captured.as_mut() {
                while app.len() < c.batch_lines && app_bytes < c.batch_bytes {
                    match q.try_recv() {
                        Ok(l) => {
                            app_bytes += l.line.len();
                            app.push(l);
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                            app_open = false;
                            break;
                        }
                    }
                }
                dropped("buffer_full", q.take_dropped());
                self.metrics.app_buffer.set(q.queued_bytes() as i64);
            }
            let mut w = work.take().expect("work is back after each fill");
            let (w, m) = tokio::task::spawn_blocking(move || {
                let more = w.fill(app);
                (w, more)
            })
            .await
            .map_err(|e| LogsError::Blocking(e.to_string()))?;
            more = m;
            let w = work.insert(w);
            self.metrics.checkpoint_lag.set(w.files.lag() as i64);
            if w.batch.lines > 0 && w.batch.started.is_none() {
                w.batch.started = Some(Instant::now());
            }
            let due = w.full()
                || more
                || (w.batch.lines > 0
                    && (draining
                        || w.batch
                            .started
                            .is_some_and(|t| t.elapsed() >= c.batch_wait.get())));
            if due && w.batch.lines > 0 {
                let ndjson = Bytes::from(std::mem::take(&mut w.batch.body));
                let body = sink.prepare(ndjson.clone());
                let lines = w.batch.lines;
                let started = Instant::now();
                let mut attempt = 0u32;
                let shipped = loop {
                    match sink.send(body.clone()).await {
                        Ok(()) => break true,
                        Err(SendError::Rejected(e)) => {
                            warn!(sink = sink.kind(), error = %e, lines, "the sink refused a batch; dropping it");
                            // The refusal is the batch's, not one source's: `source="*"`.
                            self.metrics
                                .dropped
                                .get_or_create(&LogDropLabels {
                                    source: "*".into(),
                                    reason: "rejected",
                                })
                                .inc_by(lines as u64);
                            break false;
                        }
                        Err(SendError::Failed(e)) => {
                            if draining && started.elapsed() >= DRAIN_FLUSH {
                                warn!(sink = sink.kind(), error = %e, lines, "the sink did not take the last batch before the stop; files resume from the checkpoint");
                                dropped("shutdown", w.batch.app_lines);
                                return Ok(());
                            }
                            let wait = sink::backoff(attempt, c.retry_max.get());
                            attempt = attempt.saturating_add(1);
                            self.metrics.retries.get_or_create(&sink_label).inc();
                            warn!(sink = sink.kind(), error = %e, attempt, retry_in = ?wait, "cannot ship log batch; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = drain.signaled(), if !draining => draining = true,
                            }
                        }
                    }
                };
                let w = work.as_mut().expect("work");
                if shipped {
                    self.metrics
                        .shipped
                        .get_or_create(&sink_label)
                        .inc_by(lines as u64);
                }
                self.metrics
                    .batch_duration
                    .get_or_create(&sink_label)
                    .observe(started.elapsed().as_secs_f64());
                w.files.ack();
                if let Some(path) = &c.checkpoint {
                    // The write ends with an fsync: off the async workers.
                    let positions: Vec<_> = w.files.positions().collect();
                    let path = path.clone();
                    let saved = tokio::task::spawn_blocking(move || {
                        checkpoint::save(&path, positions.into_iter())
                            .map_err(|e| format!("{}: {e}", path.display()))
                    })
                    .await
                    .map_err(|e| LogsError::Blocking(e.to_string()))?;
                    if let Err(e) = saved {
                        warn!(error = %e, "cannot write the log checkpoint");
                    }
                }
                self.metrics.checkpoint_lag.set(w.files.lag() as i64);
                // Reuse the allocation when nothing else holds the bytes.
                drop(body);
                w.batch.body = match ndjson.try_into_mut() {
                    Ok(mut b) => {
                        b.clear();
                        b.into()
                    }
                    Err(_) => Vec::with_capacity(c.batch_bytes.min(1 << 20)),
                };
                w.batch.lines = 0;
                w.batch.app_lines = 0;
                w.batch.started = None;
            }
            let w = work.as_ref().expect("work");
            if draining && !app_open && !more && w.batch.lines == 0 {
                info!("log agent drained");
                return Ok(());
            }
        }
    }
}
