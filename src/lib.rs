//! Outrigger: one small binary that runs beside an application and takes over the work every
//! service needs — proxying, TLS, telemetry, lifecycle, config reloads and a Dapr-compatible
//! API — as modules that are off unless configured.
//!
//! ```text
//!  outrigger run -c FILE [-- APP ARGS]
//!      │
//!      ├─ config::load     YAML + env + --set → RawConfig → Config (all problems, file:line:col)
//!      ├─ app::run         bind every listener → start modules → start the app → watchers
//!      │    ├─ runtime     Module trait, supervisor (restart with backoff), readiness, drain
//!      │    ├─ admin       /live /ready /metrics /config /log-level /reload /shutdown
//!      │    ├─ telemetry   own logs, metrics registry, trace context, access log, OTLP spans
//!      │    ├─ proxy       inbound/outbound listeners, routes, clusters (+ tls)
//!      │    ├─ bridge      Dapr HTTP API: state, pub/sub, invocation, secrets, metadata
//!      │    ├─ lifecycle   the app: process group, probes, restarts, signals, stop order
//!      │    └─ reload      watched files → signal / webhook / restart; own config file
//!      └─ exit code        0 ok · 64 usage · 69 wait timed out · 78 config · the app's code
//! ```
//!
//! Signals, the admin API and the config file watcher all speak [`runtime::Control`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
#[cfg(feature = "bridge")]
pub mod bridge;
pub mod config;
pub mod lifecycle;
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
];
