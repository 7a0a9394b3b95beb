//! The log agent (`logs:`): lines come in from the supervised app's stdout/stderr
//! (`lifecycle::capture`), from Outrigger's own access log (its writer's tap,
//! `telemetry::access_log::Tap`) and from files by glob ([`files`]); each is redacted, parsed and
//! enriched into one NDJSON record ([`parse`]); records are batched by count, bytes and time and
//! leave through one sink ([`sink`]); file positions are checkpointed ([`checkpoint`]) only
//! after the sink acknowledged the batch.
//!
//! ```text
//!  app stdout/stderr ─► capture queue (bounded, drops counted) ─┐
//!  access log writer ─► access queue (bounded, drops counted) ──┤
//!  files (glob, poll) ─► read complete lines ───────────────────┼─► redact → parse → enrich
//!                                                               │        │
//!                      checkpoint ◄── ack ◄── sink (retries) ◄──┴── batch (lines/bytes/wait)
//! ```
//!
//! One batch is in flight at a time while the next is read and encoded on the blocking pool.
//! While the sink is down the batch is retried (exponential backoff, jitter; halves after a
//! 413) and nothing more is read from files once the next batch is full — backpressure: their
//! bytes wait on disk and their positions do not move. The app's lines cannot wait there: they queue up to
//! `logs.app_buffer`, then are dropped and counted — unless `logs.buffer` is set: then they
//! go through spool files on disk ([`spool`]), read back like a file source, up to the
//! buffer's cap. Delivery is at-least-once for files and the spooled app's lines (a crash
//! between the sink's acknowledgement and the checkpoint write sends that one batch again) and
//! best-effort, counted, for the app's stdio held in memory. `docs/logs.md` states the
//! guarantees.
//!
//! A supervised [`Module`]: it drains in step 3 of the stop, after the app has exited — it
//! reads the app's last lines and the files to their current end, sends them, checkpoints and
//! returns.

pub mod bulk;
pub mod checkpoint;
pub mod container;
pub mod files;
pub mod multiline;
pub mod otlp;
pub mod parse;
pub mod rate_limit;
pub mod sink;
pub mod spool;

use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use crate::config::logs::{LineFormat, LogSourceKind, LogsConfig};
use crate::lifecycle::capture::{AppLine, Captured, Stream};
use crate::runtime::{Module, ModuleContext, ModuleFuture};
use crate::telemetry::metrics::{LogDropLabels, LogSinkLabels, LogSourceLabels, LogsMetrics};
use files::{FileSource, Files};
use multiline::Assembler;
use parse::{Encoder, Meta, Origin, Tail};
use rate_limit::TokenBucket;
use sink::{SendError, Sink};

/// Access log lines waiting for the agent (`logs.sources[].access_log`); past it the access
/// log's writer drops them for the agent, counted (`reason="buffer_full"`): at ~200 bytes a
/// line, about 3 MiB at most.
pub const ACCESS_QUEUE: usize = 16_384;

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
    /// The HTTPS client of each sink with an `https://` URL, by name: built from what preflight
    /// read, and rebuilt when its files change (kept across restarts of the pipeline).
    tls: std::collections::BTreeMap<String, Arc<sink::SinkClient>>,
    /// Lines of Outrigger's own access log, from its writer (`access_log: true`).
    access: tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Vec<u8>>>>,
    /// The disk buffer (`logs.buffer`), once its writer has started (it outlives a restart of
    /// the pipeline).
    spool: OnceLock<Arc<spool::Spool>>,
}

impl Logs {
    pub fn new(
        config: LogsConfig,
        captured: Option<Captured>,
        metrics: LogsMetrics,
        mut built: std::collections::BTreeMap<String, crate::tls::LoadedClient>,
        tls_metrics: crate::tls::TlsMetrics,
        access: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    ) -> Logs {
        // Watched from now on (a tokio runtime is running: the modules are built in it).
        let tls = config
            .sinks
            .iter()
            .filter_map(|s| {
                let client = sink::SinkClient::new(
                    format!("logs/{}", s.name),
                    s.sink.https()?,
                    built.remove(&s.name),
                    tls_metrics.clone(),
                    sink::IDLE,
                );
                Some((s.name.clone(), client))
            })
            .collect();
        Logs {
            config,
            metrics,
            captured: tokio::sync::Mutex::new(captured),
            tls,
            access: tokio::sync::Mutex::new(access),
            spool: OnceLock::new(),
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
    /// Each record's id, when a sink wants them (`elasticsearch`): see [`Ids`].
    ids: Option<Ids>,
}

/// Records' ids (`_bulk`'s `_id`): where a file's (or the disk buffer's) record was read, so a
/// record sent again — a retry, or read again after a restart — has the same; for the app's
/// lines held in memory and the access log, this run's prefix and a counter (a retry still
/// has the same).
struct Ids {
    list: Vec<String>,
    run: String,
    next: u64,
}

impl Ids {
    fn new() -> Ids {
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Ids {
            list: Vec::new(),
            run: format!("r{nanos:x}{:x}", std::process::id()),
            next: 0,
        }
    }

    fn unique(&mut self) {
        self.next += 1;
        self.list.push(format!("{}.{:x}", self.run, self.next));
    }

    fn file(&mut self, at: &files::LineAt) {
        self.list.push(format!(
            "f{:x}.{:x}.{:x}.{:x}",
            at.id.dev, at.id.ino, at.head, at.offset
        ));
    }
}

/// What the blocking pool works on: moved there and back for each fill.
struct Work {
    files: Files,
    encoder: Encoder,
    batch: Batch,
    /// Per source: name, format, lines and bytes read, lines not in its format.
    sources: Vec<(String, LineFormat, Counter, Counter, Counter)>,
    app_source: Option<usize>,
    max_lines: usize,
    max_bytes: usize,
    poll: Duration,
    /// The app's lines taken from the queue that did not fit the last batch.
    app_pending: std::collections::VecDeque<AppLine>,
    /// The app's lines joined into records (`multiline:`), per stream.
    app_join: Option<Assembler>,
    /// The app source's rate limit, and the records it dropped since the pipeline last looked.
    app_limit: Option<TokenBucket>,
    app_limited: usize,
    /// The app's tails (stdout, stderr), rendered once.
    app_tails: Option<[Tail; 2]>,
    /// The app source when its lines come through the disk buffer's files (`logs.buffer`):
    /// they keep the app's tails (`stream`, not `file`).
    spool_source: Option<usize>,
    /// Look for new files in the next fill, whenever the last look was (the disk buffer's
    /// writer finished: its last file may be new).
    scan_now: bool,
    /// The tail of the file read last: (source, path, tail), reused while it stays the same.
    file_tail: Option<(usize, std::path::PathBuf, Tail)>,
    /// The access log source, its lines taken from the queue not yet in a batch, its tail.
    access_source: Option<usize>,
    access_pending: std::collections::VecDeque<Vec<u8>>,
    access_tail: Option<Tail>,
}

impl Batch {
    /// Appends the record `encode` writes, unless the batch would then hold more than
    /// `max_lines` records or `max_bytes` encoded bytes (one record always fits an empty
    /// batch, however long). False when it did not fit: the record is taken back.
    fn push(
        &mut self,
        max_lines: usize,
        max_bytes: usize,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        if self.lines >= max_lines {
            return false;
        }
        let mark = self.body.len();
        encode(&mut self.body);
        if self.lines > 0 && self.body.len() > max_bytes {
            self.body.truncate(mark);
            return false;
        }
        self.lines += 1;
        true
    }
}

impl Work {
    /// Encodes the access log's pending lines into the batch; true when some did not fit.
    fn encode_access(&mut self) -> bool {
        let Some(s) = self.access_source else {
            return false;
        };
        let now = SystemTime::now();
        let (name, format, lines, bytes, unparsed) = &self.sources[s];
        let tail = self
            .access_tail
            .get_or_insert_with(|| Tail::new(name, Origin::Stream("access")));
        let (mut n, mut b, mut bad) = (0, 0, 0);
        while let Some(l) = self.access_pending.front() {
            let mut parsed = true;
            if !self.batch.push(self.max_lines, self.max_bytes, |out| {
                parsed = self
                    .encoder
                    .encode(out, l, format, tail, Meta::default(), now);
            }) {
                break;
            }
            bad += u64::from(!parsed);
            n += 1;
            b += l.len() as u64 + 1;
            self.batch.app_lines += 1;
            if let Some(ids) = &mut self.batch.ids {
                ids.unique();
            }
            self.access_pending.pop_front();
        }
        lines.inc_by(n);
        bytes.inc_by(b);
        if bad > 0 {
            unparsed.inc_by(bad);
        }
        !self.access_pending.is_empty()
    }

    fn full(&self) -> bool {
        self.batch.lines >= self.max_lines || self.batch.body.len() >= self.max_bytes
    }

    /// Joins and rate-limits the `app` lines taken, queues the access log's `access` lines, encodes the app's pending records and then,
    /// once none waits for room, scans and reads files until the batch is full. `flush_app`:
    /// the agent drains (the app has exited), so records still being joined (the app's and the
    /// files') leave now. True when lines are left for the next batch (the caller should come
    /// back without waiting).
    fn fill(&mut self, app: Vec<AppLine>, access: Vec<Vec<u8>>, flush_app: bool) -> bool {
        self.access_pending.extend(access);
        let now = SystemTime::now();
        let clock = Instant::now();
        let mut records = std::collections::VecDeque::new();
        match &mut self.app_join {
            Some(a) => {
                for l in app {
                    a.push(&l.line, 0, 0, Some(l.stream), l.cut, clock);
                }
                a.flush_expired(clock);
                if flush_app {
                    a.flush_all(clock);
                }
                records.extend(a.ready.drain(..).map(|r| AppLine {
                    stream: r.stream.unwrap_or(Stream::Stdout),
                    line: r.text,
                    cut: false,
                }));
            }
            None => records.extend(app),
        }
        match &mut self.app_limit {
            // Past the limit the app's records are dropped (it cannot be paused), counted.
            Some(b) => {
                for l in records {
                    if b.ready(clock) {
                        b.take();
                        self.app_pending.push_back(l);
                    } else {
                        self.app_limited += 1;
                    }
                }
            }
            None => self.app_pending.extend(records),
        }
        if let Some(s) = self.app_source {
            let (name, format, lines, bytes, unparsed) = &self.sources[s];
            let tails = self.app_tails.get_or_insert_with(|| {
                [
                    Tail::new(name, Origin::Stream(Stream::Stdout.as_str())),
                    Tail::new(name, Origin::Stream(Stream::Stderr.as_str())),
                ]
            });
            let (mut n, mut b, mut bad) = (0, 0, 0);
            while let Some(l) = self.app_pending.front() {
                let tail = &tails[usize::from(l.stream == Stream::Stderr)];
                let mut parsed = true;
                if !self.batch.push(self.max_lines, self.max_bytes, |out| {
                    parsed = self
                        .encoder
                        .encode(out, &l.line, format, tail, Meta::default(), now);
                }) {
                    break;
                }
                bad += u64::from(!parsed);
                n += 1;
                b += l.line.len() as u64 + 1;
                self.batch.app_lines += 1;
                if let Some(ids) = &mut self.batch.ids {
                    ids.unique();
                }
                self.app_pending.pop_front();
            }
            lines.inc_by(n);
            bytes.inc_by(b);
            if bad > 0 {
                unparsed.inc_by(bad);
            }
        }
        if !self.app_pending.is_empty() || self.encode_access() {
            return true;
        }
        if self.files.is_empty() {
            return false;
        }
        if std::mem::take(&mut self.scan_now) {
            self.files.scan();
        } else {
            self.files.scan_if_due(self.poll);
        }
        if flush_app {
            self.files.flush_joined();
        }
        let (max_lines, max_bytes) = (self.max_lines, self.max_bytes);
        let Work {
            files,
            encoder,
            batch,
            sources,
            file_tail,
            spool_source,
            app_tails,
            ..
        } = self;
        if let Some(s) = *spool_source {
            let name = &sources[s].0;
            app_tails.get_or_insert_with(|| {
                [
                    Tail::new(name, Origin::Stream(Stream::Stdout.as_str())),
                    Tail::new(name, Origin::Stream(Stream::Stderr.as_str())),
                ]
            });
        }
        // Lines, bytes and lines not in their format per source, added to the counters once
        // per fill.
        let mut read = vec![(0u64, 0u64, 0u64); sources.len()];
        let plain = LineFormat::Plain;
        let more = files.read(|l| {
            if batch.lines >= max_lines {
                return false;
            }
            // The app's lines from the disk buffer: as if read from its stdout/stderr.
            let spooled = app_tails
                .as_ref()
                .filter(|_| Some(l.source) == *spool_source)
                .map(|t| &t[usize::from(l.stream == Some(Stream::Stderr))]);
            let same = spooled.is_some()
                || file_tail.as_ref().is_some_and(|(s, p, _)| {
                    *s == l.source && p.as_os_str().as_bytes() == l.path.as_os_str().as_bytes()
                });
            if !same {
                let tail = Tail::new(&sources[l.source].0, Origin::File(l.path));
                *file_tail = Some((l.source, l.path.to_path_buf(), tail));
            }
            let tail = match spooled {
                Some(t) => t,
                None => &file_tail.as_ref().expect("set above").2,
            };
            let format = if l.malformed {
                &plain
            } else {
                &sources[l.source].1
            };
            let meta = Meta {
                stream: l.stream.filter(|_| spooled.is_none()).map(Stream::as_str),
                time: l.time,
            };
            let mut parsed = true;
            if !batch.push(max_lines, max_bytes, |out| {
                parsed = encoder.encode(out, l.line, format, tail, meta, now);
            }) {
                return false;
            }
            if let Some(ids) = &mut batch.ids {
                ids.file(&l.at);
            }
            let r = &mut read[l.source];
            r.0 += 1;
            r.1 += l.line.len() as u64 + 1;
            r.2 += u64::from(!parsed);
            true
        });
        for (i, (n, b, bad)) in read.into_iter().enumerate() {
            if n > 0 {
                sources[i].2.inc_by(n);
                sources[i].3.inc_by(b);
            }
            if bad > 0 {
                sources[i].4.inc_by(bad);
            }
        }
        more
    }
}

/// Records in an NDJSON batch.
fn count_lines(ndjson: &[u8]) -> usize {
    memchr::memchr_iter(b'\n', ndjson).count()
}

/// An NDJSON batch of two records or more cut in two at the line end nearest its middle.
fn split_half(ndjson: &Bytes) -> (Bytes, Bytes) {
    let mid = ndjson.len() / 2;
    let ends: Vec<usize> = memchr::memchr_iter(b'\n', ndjson).map(|i| i + 1).collect();
    // Never at the very end: both halves hold a record.
    let cut = ends[..ends.len() - 1]
        .iter()
        .copied()
        .min_by_key(|&e| e.abs_diff(mid))
        .unwrap_or(ndjson.len());
    (ndjson.slice(..cut), ndjson.slice(cut..))
}

/// Why the pipeline ended.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("the blocking pool failed: {0}")]
    Blocking(String),
    #[error("cannot start the disk buffer: {0}")]
    Spool(String),
}

impl Logs {
    /// The disk buffer, its writer started with the app's lines on the first run.
    async fn start_spool(
        &self,
        buffer: &crate::config::logs::Buffer,
        app: &str,
        captured: &mut Option<Captured>,
    ) -> Result<Arc<spool::Spool>, LogsError> {
        if let Some(s) = self.spool.get() {
            return Ok(s.clone());
        }
        let (b, gauge) = (buffer.clone(), self.metrics.disk_buffer.clone());
        let spool = tokio::task::spawn_blocking(move || spool::Spool::open(&b, gauge))
            .await
            .map_err(|e| LogsError::Blocking(e.to_string()))?
            .map_err(|e| LogsError::Spool(format!("{}: {e}", buffer.dir.display())))?;
        self.metrics.disk_buffer_max.set(buffer.max_bytes as i64);
        if let Some(q) = captured.take() {
            // Each series in a call of its own: `get_or_create`'s read guard lives to the end of
            // its statement, and creating another series takes the family's write lock.
            let dropped = |reason| {
                self.metrics
                    .dropped
                    .get_or_create(&LogDropLabels {
                        source: app.to_string(),
                        reason,
                    })
                    .clone()
            };
            let (full, failed) = (dropped("buffer_full"), dropped("buffer_error"));
            let metrics = spool::WriterMetrics {
                dropped: full,
                failed,
                echo_dropped: self.metrics.echo_dropped.clone(),
                queued: self.metrics.app_buffer.clone(),
            };
            spool
                .start(q, metrics, tokio::runtime::Handle::current())
                .map_err(|e| LogsError::Spool(e.to_string()))?;
        }
        Ok(self.spool.get_or_init(|| spool).clone())
    }

    async fn pipeline(&self, cx: ModuleContext) -> Result<(), LogsError> {
        let c = &self.config;
        let mut captured = self.captured.lock().await;
        let saved = match c.checkpoint.clone() {
            Some(path) => tokio::task::spawn_blocking(move || checkpoint::load(&path))
                .await
                .map_err(|e| LogsError::Blocking(e.to_string()))?
                .unwrap_or_else(|e| {
                    warn!(error = %e, "ignoring the log checkpoint");
                    Default::default()
                }),
            None => Default::default(),
        };
        let mut file_sources = Vec::new();
        let mut sources = Vec::new();
        let mut app_source = None;
        let mut spool_source = None;
        let mut access_source = None;
        let mut access = self.access.lock().await;
        for (i, s) in c.sources.iter().enumerate() {
            let label = LogSourceLabels {
                source: s.name.clone(),
            };
            sources.push((
                s.name.clone(),
                s.format.clone(),
                self.metrics.read.get_or_create(&label).clone(),
                self.metrics.read_bytes.get_or_create(&label).clone(),
                self.metrics
                    .unparsed
                    .get_or_create(&LogDropLabels {
                        source: s.name.clone(),
                        reason: "format",
                    })
                    .clone(),
            ));
            match &s.kind {
                LogSourceKind::App => match &c.buffer {
                    None => app_source = Some(i),
                    Some(buffer) => {
                        let spool = self.start_spool(buffer, &s.name, &mut captured).await?;
                        spool_source = Some(i);
                        file_sources.push(FileSource {
                            source: i,
                            matcher: crate::config::logs::compile_glob(&spool.glob())
                                .map_err(|e| LogsError::Spool(e.to_string()))?,
                            base: spool.dir().to_path_buf(),
                            from_end: false,
                            // Spool files are deleted only once read and acknowledged to
                            // their end: nothing more can come.
                            rotate_wait: Duration::ZERO,
                            container: Some(crate::config::logs::Container::Cri),
                            multiline: s.multiline.clone(),
                            limit: s.rate_limit.map(TokenBucket::new),
                            // A torn write's piece is never shipped.
                            whole_lines: true,
                        });
                    }
                },
                LogSourceKind::AccessLog => access_source = Some(i),
                LogSourceKind::Files {
                    glob,
                    base,
                    from_end,
                    rotate_wait,
                } => file_sources.push(FileSource {
                    source: i,
                    matcher: crate::config::logs::compile_glob(glob)
                        .expect("validated with the config"),
                    base: base.clone(),
                    from_end: *from_end,
                    rotate_wait: rotate_wait.get(),
                    container: s.container,
                    multiline: s.multiline.clone(),
                    limit: s.rate_limit.map(TokenBucket::new),
                    whole_lines: false,
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
        let outlets_want_ids = c
            .sinks
            .iter()
            .any(|s| matches!(s.sink, crate::config::logs::LogSink::Elasticsearch { .. }));
        // What the checkpoint holds: the spool files a previous run shipped to their end are
        // collected from it now, and again each time the spool's writer moves on to a new file.
        let mut acked: Arc<Vec<checkpoint::Position>> = Arc::new(saved.values().cloned().collect());
        let mut work = Some(Work {
            files: Files::new(file_sources, saved),
            encoder: Encoder::new(c.redact.clone(), fields),
            batch: Batch {
                body: Vec::with_capacity(c.batch_bytes.min(1 << 20) + 4096),
                lines: 0,
                app_lines: 0,
                started: None,
                ids: outlets_want_ids.then(Ids::new),
            },
            sources,
            app_source,
            max_lines: c.batch_lines,
            max_bytes: c.batch_bytes,
            poll: c.poll.get(),
            app_pending: Default::default(),
            app_join: app_source.and_then(|i| Assembler::new(None, c.sources[i].multiline.clone())),
            app_limit: app_source
                .and_then(|i| c.sources[i].rate_limit)
                .map(TokenBucket::new),
            app_limited: 0,
            app_tails: None,
            spool_source,
            scan_now: false,
            file_tail: None,
            access_source,
            access_pending: Default::default(),
            access_tail: None,
        });
        let outlets: Vec<Outlet> = c
            .sinks
            .iter()
            .map(|s| Outlet {
                sink: Sink::new(&s.sink, self.tls.get(&s.name).cloned()),
                label: LogSinkLabels {
                    sink: s.name.clone(),
                },
            })
            .collect();
        self.metrics.sinks.reset(
            outlets.iter().map(|o| o.label.sink.as_str()),
            c.retry_max.get(),
        );
        // `sink_up` is set from a sink's first attempt on: before it the sink is `pending` (in
        // /ready and /status) and has no `sink_up` series yet.
        let app_name = app_source.map(|s| c.sources[s].name.clone());
        let spool = self.spool.get().cloned();
        let mut collected_at = None;
        let mut spool_open = spool.as_ref().is_some_and(|s| !s.done());
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
            sinks = ?c.sinks.iter().map(|s| &s.name).collect::<Vec<_>>(),
            sources = c.sources.len(),
            "log agent started"
        );

        let mut drain = cx.drain.clone();
        let stop = Stop {
            drain: cx.drain.clone(),
            draining: AtomicBool::new(cx.drain.is_draining()),
            since: OnceLock::new(),
        };
        let mut app_open = captured.is_some();
        let tick = c.poll.get().min(c.batch_wait.get());
        let mut more = false;
        // The batch being shipped while the next one is filled: the sink's round trip and the
        // checkpoint's fsync overlap with reading and encoding (bench/logs.sh: 2× the
        // throughput of one thing at a time). At most two batches are held.
        let mut sealed: Option<Sealed> = None;
        loop {
            stop.budget();
            // Wait for a line from the app, the next poll, or a stop — unless there is work.
            let mut app = Vec::new();
            let mut access_lines = Vec::new();
            if !more && sealed.is_none() {
                let recv = async {
                    match captured.as_mut() {
                        Some(q) if app_open => q.recv().await,
                        _ => std::future::pending().await,
                    }
                };
                let access_recv = async {
                    match access.as_mut() {
                        Some(q) => q.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    l = recv => match l {
                        Some(l) => app.push(l),
                        None => app_open = false,
                    },
                    Some(l) = access_recv => access_lines.push(l),
                    _ = tokio::time::sleep(tick) => {}
                    _ = drain.signaled(), if !stop.draining() => stop.set_draining(),
                }
            }
            let mut app_bytes = app.iter().map(|l| l.line.len()).sum::<usize>();
            let pending = work.as_ref().map_or(0, |w| w.app_pending.len());
            if let Some(q) = captured.as_mut() {
                // Only as many as one batch can take: the rest wait in the bounded queue.
                while pending == 0 && app.len() < c.batch_lines && app_bytes < c.batch_bytes {
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
                self.metrics
                    .echo_dropped
                    .inc_by(q.take_echo_dropped() as u64);
                self.metrics.app_buffer.set(q.queued_bytes() as i64);
            }
            if let Some(q) = access.as_mut() {
                // As for the app: only what one batch can take; the rest waits in the queue.
                let pending = work.as_ref().map_or(0, |w| w.access_pending.len());
                while pending == 0 && access_lines.len() < c.batch_lines {
                    match q.try_recv() {
                        Ok(l) => access_lines.push(l),
                        Err(_) => break,
                    }
                }
            }
            // Fill the next batch on the blocking pool while the sealed one is shipped.
            let mut w = work.take().expect("work is back after each fill");
            // The agent drains after the app has exited: records still being joined leave now
            // (a child the app left behind may still hold its stdout open, and write to it).
            let flush_app = stop.draining();
            if let Some(spool) = spool.as_ref().filter(|s| collected_at != Some(s.current())) {
                // A file the writer closed (full, or the buffer full) that was shipped to its
                // end before: deleted now, not at the next acknowledgement (with the buffer
                // full, none may come).
                collected_at = Some(spool.current());
                let (spool, acked) = (spool.clone(), acked.clone());
                let _ = tokio::task::spawn_blocking(move || spool.collect(acked.iter())).await;
            }
            if spool_open && spool.as_ref().is_some_and(|s| s.done()) {
                // The app's last lines are on disk: read them to their end from now on.
                spool_open = false;
                w.scan_now = true;
            }
            let fill = tokio::task::spawn_blocking(move || {
                let more = w.fill(app, access_lines, flush_app);
                (w, more)
            });
            let shipped = match sealed.take() {
                Some(b) => Some(self.ship(&outlets, b, &stop).await),
                None => None,
            };
            let (w, m) = fill.await.map_err(|e| LogsError::Blocking(e.to_string()))?;
            more = m;
            let w = work.insert(w);
            dropped("rate_limit", std::mem::take(&mut w.app_limited));
            let out_of_budget = match shipped {
                Some(Shipped::Acked(mark)) => {
                    w.files.ack(&mark);
                    if let Some(spool) = &spool {
                        acked = Arc::new(mark.positions);
                        let (spool, acked) = (spool.clone(), acked.clone());
                        let _ =
                            tokio::task::spawn_blocking(move || spool.collect(acked.iter())).await;
                    }
                    // Lines still coming faster than the sink takes them when the budget ends.
                    stop.budget()
                        .is_some_and(|left| left.is_zero())
                        .then_some(0)
                }
                Some(Shipped::Stopped { app_lines }) => Some(app_lines),
                // Nothing in flight, and the budget spent waiting for the app's stdio to close
                // (a child it left behind holds it open).
                None => stop
                    .budget()
                    .is_some_and(|left| left.is_zero())
                    .then_some(0),
            };
            if let Some(app_lines) = out_of_budget {
                // The stop's budget ran out: files resume from the checkpoint; the app's
                // lines not shipped are counted, records still being joined among them.
                let mut lost = app_lines
                    + w.batch.app_lines
                    + w.app_pending.len()
                    + w.app_join.as_ref().map_or(0, Assembler::held);
                if let Some(q) = captured.as_mut() {
                    while q.try_recv().is_ok() {
                        lost += 1;
                    }
                }
                dropped("shutdown", lost);
                // The access log's lines not shipped: taken from its queue, or still in it
                // (those in the last batches are among the app's count above: both are
                // counted as `app_lines`, lines that cannot be read again).
                let mut access_lost = w.access_pending.len();
                if let Some(q) = access.as_mut() {
                    while q.try_recv().is_ok() {
                        access_lost += 1;
                    }
                }
                if let (Some(s), true) = (access_source, access_lost > 0) {
                    self.metrics
                        .dropped
                        .get_or_create(&LogDropLabels {
                            source: c.sources[s].name.clone(),
                            reason: "shutdown",
                        })
                        .inc_by(access_lost as u64);
                }
                let lost = lost + access_lost;
                if lost > 0 || w.batch.lines > 0 {
                    warn!(
                        lost,
                        "the stop's flush budget ran out with lines left; files resume from the checkpoint"
                    );
                } else {
                    info!(
                        "the stop's flush budget ran out waiting for the app's stdout/stderr to close (a child of the app holds them)"
                    );
                }
                return Ok(());
            }
            self.metrics.checkpoint_lag.set(w.files.lag() as i64);
            for (source, lines) in w.files.take_malformed() {
                self.metrics
                    .unparsed
                    .get_or_create(&LogDropLabels {
                        source: c.sources[source].name.clone(),
                        reason: "container",
                    })
                    .inc_by(lines);
            }
            for (source, bytes) in w.files.take_truncated() {
                self.metrics
                    .truncated_bytes
                    .get_or_create(&LogSourceLabels {
                        source: c.sources[source].name.clone(),
                    })
                    .inc_by(bytes);
            }
            if w.batch.lines > 0 && w.batch.started.is_none() {
                w.batch.started = Some(Instant::now());
            }
            let due = w.full()
                || more
                || (w.batch.lines > 0
                    && (stop.draining()
                        || w.batch
                            .started
                            .is_some_and(|t| t.elapsed() >= c.batch_wait.get())));
            if due && w.batch.lines > 0 {
                let ndjson = Bytes::from(std::mem::replace(
                    &mut w.batch.body,
                    Vec::with_capacity(c.batch_bytes.min(1 << 20) + 4096),
                ));
                sealed = Some(Sealed {
                    ndjson,
                    lines: w.batch.lines,
                    app_lines: w.batch.app_lines,
                    ids: w
                        .batch
                        .ids
                        .as_mut()
                        .map(|i| std::mem::take(&mut i.list))
                        .unwrap_or_default(),
                    mark: w.files.mark(),
                });
                w.batch.lines = 0;
                w.batch.app_lines = 0;
                w.batch.started = None;
            }
            if stop.draining()
                && !app_open
                && !spool_open
                && !more
                && sealed.is_none()
                && w.batch.lines == 0
                && w.app_pending.is_empty()
                && w.access_pending.is_empty()
                && w.app_join.as_ref().is_none_or(Assembler::is_empty)
            {
                info!("log agent drained");
                return Ok(());
            }
        }
    }

    /// Sends one sealed batch to every sink at once until each took it (or refused it for
    /// good), then writes the checkpoint: file positions move only once all of them have it.
    /// Stopped when the stop's flush budget runs out first.
    async fn ship(&self, outlets: &[Outlet], batch: Sealed, stop: &Stop) -> Shipped {
        let sent = futures_util::future::join_all(
            outlets
                .iter()
                .map(|o| self.ship_to(o, &batch.ndjson, batch.lines, &batch.ids, stop)),
        )
        .await;
        if sent.contains(&false) {
            return Shipped::Stopped {
                app_lines: batch.app_lines,
            };
        }
        if let Some(path) = &self.config.checkpoint {
            // The write ends with an fsync: off the async workers.
            let positions = batch.mark.positions.clone();
            let path = path.clone();
            let saved = tokio::task::spawn_blocking(move || {
                checkpoint::save(&path, positions.into_iter())
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = saved {
                warn!(error = %e, "cannot write the log checkpoint");
            }
        }
        Shipped::Acked(batch.mark)
    }

    /// Sends one batch to one sink until it takes it (retrying with backoff; halves after a
    /// 413). True once taken or refused for good; false when the stop's budget ran out first.
    async fn ship_to(
        &self,
        outlet: &Outlet,
        ndjson: &Bytes,
        lines: usize,
        ids: &[String],
        stop: &Stop,
    ) -> bool {
        let c = &self.config;
        let (sink, sink_label) = (&outlet.sink, &outlet.label);
        let name = &sink_label.sink;
        let mut drain = stop.drain.clone();
        let started = Instant::now();
        let mut attempt = 0u32;
        let (mut shipped, mut rejected) = (0usize, 0usize);
        // Pieces still to send, the next one last: the batch, or its halves after a 413.
        // Each piece with its records' positions in the batch (for their ids).
        let mut parts = vec![(ndjson.clone(), lines, (0..lines).collect::<Vec<usize>>())];
        while let Some((part, lines, at)) = parts.pop() {
            let body = if sink.wants_ids() && ids.len() >= lines {
                let part_ids: Vec<&str> = at
                    .iter()
                    .filter_map(|&i| ids.get(i).map(String::as_str))
                    .collect();
                sink.prepare_with_ids(part.clone(), &part_ids)
            } else {
                sink.prepare(part.clone())
            };
            loop {
                // A stop during the attempt bounds what is left of it by the flush budget.
                let send = sink.send(body.clone(), lines);
                tokio::pin!(send);
                // Cut short by the stop's budget: says nothing about the sink (its state and
                // `sink_up` stay as they were).
                let mut cut_short = false;
                let sent = loop {
                    match stop.budget() {
                        None => tokio::select! {
                            r = &mut send => break r,
                            _ = drain.signaled() => stop.set_draining(),
                        },
                        Some(left) => {
                            break tokio::time::timeout(left, &mut send).await.unwrap_or_else(
                                |_| {
                                    cut_short = true;
                                    Err(SendError::Failed("the stop's flush budget ran out".into()))
                                },
                            );
                        }
                    }
                };
                match &sent {
                    _ if cut_short => {}
                    Err(SendError::Failed(e)) => {
                        self.metrics.sinks.failed(name, e);
                        self.metrics.sink_up.get_or_create(sink_label).set(0);
                    }
                    _ => {
                        self.metrics.sinks.answered(name);
                        self.metrics.sink_up.get_or_create(sink_label).set(1);
                    }
                }
                match sent {
                    Ok(()) => {
                        shipped += lines;
                        break;
                    }
                    Err(SendError::TooLarge(e)) if lines > 1 => {
                        // Split at the line end nearest the middle; each half is sent (and
                        // split again) on its own.
                        let (first, second) = split_half(&part);
                        warn!(sink = %name, error = %e, lines, "the sink refused a batch as too large; sending it in halves");
                        let n = count_lines(&first);
                        parts.push((second, lines - n, at[n.min(at.len())..].to_vec()));
                        parts.push((first, n, at[..n.min(at.len())].to_vec()));
                        break;
                    }
                    Err(SendError::Partial {
                        rejected: n,
                        message,
                    }) => {
                        warn!(sink = %name, error = %message, lines, rejected = n, "the sink refused part of a batch; dropping that part");
                        shipped += lines.saturating_sub(n);
                        rejected += n.min(lines);
                        break;
                    }
                    Err(SendError::Items {
                        retry,
                        rejected: n,
                        message,
                    }) => {
                        // Only the items refused for now go again, after a backoff.
                        let again = retry.len().min(lines);
                        warn!(sink = %name, error = %message, lines, retry = again, rejected = n, "the sink refused some records of a batch; sending those again");
                        shipped += lines.saturating_sub(again + n);
                        rejected += n.min(lines);
                        if again > 0 {
                            let picked = retry.iter().filter_map(|&p| at.get(p).copied()).collect();
                            parts.push((Bytes::from(bulk::pick(&part, &retry)), again, picked));
                            let wait = sink::backoff(attempt, c.retry_max.get());
                            attempt = attempt.saturating_add(1);
                            self.metrics.retries.get_or_create(sink_label).inc();
                            let wait = stop.budget().map_or(wait, |left| wait.min(left));
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = drain.signaled(), if !stop.draining() => stop.set_draining(),
                            }
                        }
                        break;
                    }
                    Err(SendError::TooLarge(e) | SendError::Rejected(e)) => {
                        warn!(sink = %name, error = %e, lines, "the sink refused a batch; dropping it");
                        rejected += lines;
                        break;
                    }
                    Err(SendError::Failed(e)) => {
                        if stop.budget().is_some_and(|left| left.is_zero()) {
                            warn!(sink = %name, error = %e, lines, "the sink did not take the last batch before the stop; files resume from the checkpoint");
                            return false;
                        }
                        let wait = sink::backoff(attempt, c.retry_max.get());
                        attempt = attempt.saturating_add(1);
                        self.metrics.retries.get_or_create(sink_label).inc();
                        warn!(sink = %name, error = %e, attempt, retry_in = ?wait, "cannot ship log batch; retrying");
                        let wait = stop.budget().map_or(wait, |left| wait.min(left));
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = drain.signaled(), if !stop.draining() => stop.set_draining(),
                        }
                    }
                }
            }
        }
        if rejected > 0 {
            // The refusal is the batch's, not one source's: `source="*"` (once per sink that
            // refused it).
            self.metrics
                .dropped
                .get_or_create(&LogDropLabels {
                    source: "*".into(),
                    reason: "rejected",
                })
                .inc_by(rejected as u64);
        }
        if shipped > 0 {
            self.metrics
                .shipped
                .get_or_create(sink_label)
                .inc_by(shipped as u64);
        }
        self.metrics
            .batch_duration
            .get_or_create(sink_label)
            .observe(started.elapsed().as_secs_f64());
        true
    }
}

/// A sink and its metrics' labels.
struct Outlet {
    sink: Sink,
    label: LogSinkLabels,
}

/// A batch ready to send, and where reading stood when it was sealed.
struct Sealed {
    ndjson: Bytes,
    lines: usize,
    /// Lines from the app (they cannot be read again if the batch is lost).
    app_lines: usize,
    /// Each record's id, when a sink wants them.
    ids: Vec<String>,
    mark: files::Mark,
}

/// How shipping a batch ended.
enum Shipped {
    /// Taken (or refused for good, counted) by every sink: file positions move to the mark.
    Acked(files::Mark),
    /// The stop's flush budget ran out first.
    Stopped { app_lines: usize },
}

/// The stop signal, and when it came: from then on the agent has [`DRAIN_FLUSH`] in all to
/// ship what is left. Shared by the sinks shipping one batch at once.
struct Stop {
    drain: crate::runtime::Drain,
    draining: AtomicBool,
    since: OnceLock<Instant>,
}

impl Stop {
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// What is left of the flush budget; None while not stopping.
    fn budget(&self) -> Option<Duration> {
        if !self.draining() {
            return None;
        }
        let at = *self.since.get_or_init(Instant::now);
        Some(DRAIN_FLUSH.saturating_sub(at.elapsed()))
    }
}
