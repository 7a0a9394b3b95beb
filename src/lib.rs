//! Outrigger: one small binary that runs beside an application and takes over the work every
//! service needs — proxying, TLS, telemetry, lifecycle, config reloads and a Dapr-compatible
//! API — as modules that are off unless configured.
//!
//! ```text
//!  outrigger run -c FILE [-- APP ARGS]          (outrigger check: the first two steps only)
//!      │
//!      ├─ config::parse    YAML + env + --set → RawConfig → Config: syntax, types, references
//!      ├─ preflight        deep checks that build things (TLS material, Dapr components,
//!      │                   brokers, Subscriptions), located like config errors, and KEPT
//!      ├─ app::run         bind → build → spawn → wait → stop
//!      │    ├─ runtime     Module trait, supervisor, readiness, drain, signals, stop sequence
//!      │    ├─ admin       /live /ready /metrics /config /log-level /reload /shutdown /status, dashboard /
//!      │    ├─ proxy       inbound/outbound listeners, request phases, clusters (+ tls)
//!      │    ├─ bridge      Dapr HTTP and gRPC APIs: state, pub/sub, invocation, secrets, metadata
//!      │    ├─ lifecycle   the app: process group, probes, restarts, its environment
//!      │    ├─ logs        the log agent: app stdio and files → parse/enrich → sink, checkpoints
//!      │    └─ reload      `reload:` entries; live reload of our own config
//!      └─ exit code        0 ok · 64 usage · 65 inject input · 69 wait timed out · 78 config · the app's code
//!
//!  outrigger inject / injector   k8s: manifests or AdmissionReviews in, Outrigger added as a native sidecar
//! ```
//!
//! Floors, from the bottom: `config` (imports nothing above it) → `telemetry`, `watch`, `origin`, `descriptors`, `memory` →
//! `tls` → `runtime` → `lifecycle`, `admin`, `proxy` → `reload`, `bridge`, `logs` → `preflight` →
//! `app` → `main`; `k8s` (inject, injector) sits beside `preflight`, above `config` and `tls`,
//! and nothing imports it but `main`. Every import runs downward; no two top-level modules import each other.
//! Signals, the admin API and the config file watcher all speak [`runtime::Control`].
//!
//! # Where is…
//!
//! | behaviour | file |
//! |---|---|
//! | config syntax, types, defaults, located errors | `config/mod.rs`, `config/{proxy,route,tls,lifecycle,telemetry,bridge,logs,check}.rs`, `config/document.rs` |
//! | limits on YAML files (size, nesting, nodes) | `config/file_limits.rs` |
//! | deep config checks (certificates, components, brokers, Subscriptions) | `preflight.rs` |
//! | what a reload changes live and what needs a restart | `config/diff.rs` (`ConfigDiff`) |
//! | live reload of our own config (SIGHUP, `POST /reload`, file watch) | `reload/live.rs` |
//! | `reload:` entries (signal, webhook, restart the app) | `reload/mod.rs` |
//! | watching files and directories (ConfigMaps too) | `watch.rs` |
//! | the dashboard (`GET /`) and `GET /status`; its history sampler | `admin/dashboard.html`, `admin/status.rs`, `admin/history.rs` (reads `/metrics` back: `admin/scrape.rs`) |
//! | the start order | `app.rs` |
//! | the stop order (drain delay, inbound, app, the rest, admin) | `runtime/stop.rs` |
//! | signals → control requests | `runtime/signals.rs` |
//! | hot restart: socket and app hand-over, `/server_info`, systemd notify | `runtime/upgrade/` (its `sys.rs` and `memory.rs` hold the crate's only `unsafe`) |
//! | start-up's code pages out of the resident set (`runtime.code_pages`) | `memory.rs` (called from `app.rs` and the trimmer in `main.rs`) |
//! | module restarts with backoff, `/ready` | `runtime/supervisor.rs`, `runtime/health.rs` |
//! | the request phases, in order | `proxy/http.rs` (`phases`) |
//! | listener `authz`, path checks, route `authz` | `proxy/authz.rs` (identity matching: `tls/authz.rs`) |
//! | connection and rate limits, load shedding | `proxy/limits.rs`, `proxy/accept.rs` |
//! | the minimum data rate of request bodies (`min_body_rate`) | `proxy/min_body_rate.rs` |
//! | idle, silent and non-reading connections (`silent_for`) | `proxy/accept.rs`, `proxy/listener.rs` |
//! | running out of descriptors: the reserve that keeps admin and bridge health answering, accept backoff | `descriptors.rs`; default connection caps from `RLIMIT_NOFILE`: `config/proxy.rs` |
//! | HTTP/2 streams whose client reads nothing (zero window) | `proxy/unread_streams.rs` |
//! | refusing what only a web page sends (cross-origin, DNS rebinding) | `origin.rs` (used by admin and the bridge) |
//! | holding requests while the app starts | `proxy/hold.rs` |
//! | ambiguous framing (smuggling) | `proxy/framing.rs` |
//! | routing | `proxy/route.rs` |
//! | header edits, hop-by-hop, `x-forwarded-*` | `proxy/headers.rs` |
//! | the retry loop, timeouts | `proxy/forward.rs` |
//! | WebSocket / upgrades | `proxy/upgrade.rs` |
//! | Outrigger's own error answers | `proxy/failure.rs` |
//! | what a reload rebuilds in the proxy | `proxy/generation.rs` |
//! | balancing, ejection, retry budget, discovery, connecting, the HTTP/1.1 upstream pool | `proxy/cluster/{balance,outlier,budget,discovery,connect,pool}.rs` |
//! | TLS handshake on accept, origination, authz, certificates | `tls/accept.rs`, `tls/origination.rs`, `tls/authz.rs`, `tls/mod.rs` |
//! | access log line and span of a request | `proxy/record.rs` → `telemetry/{record,access_log,otlp}.rs` |
//! | every metric | `telemetry/metrics.rs`, `telemetry/tls.rs` |
//! | the app's process, probe, restarts | `lifecycle/mod.rs`, `lifecycle/probe.rs` |
//! | the app's environment (`OUTRIGGER_*`, `DAPR_*`) | `lifecycle/env.rs`, `bridge/env.rs` |
//! | Dapr components, state, pub/sub, invocation, secrets | `bridge/` |
//! | pub/sub brokers (Redis Streams, JetStream, RabbitMQ, MQTT, in-memory) | `bridge/pubsub/{redis,jetstream,rabbitmq,mqtt,memory}.rs` |
//! | input bindings to the app (`OPTIONS`/`POST /{route}`, `OnBindingEvent`), cron schedules | `bridge/input_bindings.rs`, `bridge/cron.rs` |
//! | the bridge on its own thread and runtime (module isolation) | `bridge/isolation.rs` |
//! | limits, timeouts and the worst-case memory formula, for users | `docs/security.md` |
//! | one operation for both Dapr front doors (HTTP routes, gRPC RPCs) | `bridge/ops.rs`, called by `bridge/routes.rs` and `bridge/grpc/mod.rs` |
//! | Dapr's gRPC API: the `.proto` files, their build, streaming subscriptions, gRPC apps | `proto/`, `build.rs`, `bridge/grpc/{mod,subscribe,app}.rs` |
//! | app ids without a cluster (`bridge.name_resolution`, mesh peers) | `proxy/cluster/name_resolution.rs` |
//! | the mesh: a workload's SPIFFE ID, its mutual-TLS listener, peers by app id | `config/mesh.rs` → `proxy/cluster/name_resolution.rs`, `proxy/route.rs` (`Router::peer`) |
//! | capturing the app's stdout/stderr (echo + bounded queue) | `lifecycle/capture.rs` |
//! | the log agent's loop: batch, send, retry, checkpoint | `logs/mod.rs` |
//! | following files by glob across rotation | `logs/files.rs` |
//! | the checkpoint state file | `logs/checkpoint.rs` |
//! | redaction, parsing, enrichment of a log line | `logs/parse.rs` |
//! | log sinks (http NDJSON, Loki push, file, stdout) and backoff | `logs/sink.rs` |
//! | `outrigger inject`: manifests in and out, workload kinds | `k8s/inject.rs` |
//! | what the sidecar container, volumes, app env and grace period look like in a pod | `k8s/sidecar.rs` |
//! | the `outrigger.dev/*` annotations | `k8s/annotations.rs` |
//! | the admission webhook: review → JSONPatch; its HTTPS server | `k8s/admission.rs`, `k8s/injector.rs` |
//!
//! # Long-running work that is not a supervised `Module`, and why
//!
//! The proxy, the bridge and the log agent are [`runtime::Module`]s: supervised, restarted with backoff, on
//! `/ready`, drained in step 3 of the stop. The rest is not, on purpose:
//! - **admin** reports the modules' health, so it must not drain with them: it answers `/ready`
//!   503 until the stop's last step (`admin::serve`);
//! - **the app** (`lifecycle::supervise`) has its own restart policy (`app.restart`) and its
//!   readiness is the `app` component on `/ready`, driven by its probe; it is stopped in step 2,
//!   before the modules;
//! - **`reload:` entries and the config file watcher** must stop *before* the stop begins (no
//!   reload may restart the app while it stops), earlier than any module drain; a watch that
//!   cannot start retries on its own and is counted;
//! - **TLS file watchers, the certificate expiry task, the span exporter and the access log
//!   writer** belong to the material or the listener that made them and end with it; they
//!   cannot fail (a failed export or a full queue is dropped and counted).

#![deny(unsafe_code)]

pub mod admin;
pub mod app;
#[cfg(feature = "bridge")]
pub mod bridge;
pub mod config;
pub mod descriptors;
pub mod errors;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod lifecycle;
#[cfg(feature = "logs")]
pub mod logs;
pub mod memory;
pub mod origin;
pub mod preflight;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod telemetry;
pub mod tls;
pub mod watch;

/// The optional modules compiled into this binary (cargo features), for `outrigger version`
/// and `outrigger_build_info`.
pub const FEATURES: &[&str] = &[
    #[cfg(feature = "proxy")]
    "proxy",
    #[cfg(feature = "bridge")]
    "bridge",
    #[cfg(feature = "logs")]
    "logs",
    #[cfg(feature = "k8s")]
    "k8s",
];
