//! Outrigger: one small binary that runs beside an application and takes over the work every
//! service needs — proxying, TLS, telemetry, lifecycle, config reloads and a Dapr-compatible
//! API — as modules that are off unless configured.
//!
//! ```text
//!  outrigger run -c FILE [-- APP ARGS]
//!      │
//!      ├─ config::load     YAML + env + --set → RawConfig → Config (all problems, file:line:col)
//!      ├─ app::run         bind every listener → start modules → start the app
//!      │    ├─ runtime     Module trait, supervisor (restart with backoff), readiness, drain
//!      │    ├─ admin       /live /ready /metrics /config /log-level /reload /shutdown
//!      │    ├─ telemetry   own logs (human | json), metrics registry, process metrics
//!      │    └─ lifecycle   the supervised app: process group, stop signal, exit code
//!      └─ exit code        0 ok · 64 usage · 78 config · the app's code when it ran
//! ```
//!
//! Signals, the admin API and (later) file watchers all speak [`runtime::Control`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod lifecycle;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod runtime;
pub mod telemetry;

/// The optional modules compiled into this binary (cargo features), for `outrigger version`
/// and `outrigger_build_info`.
pub const FEATURES: &[&str] = &[
    #[cfg(feature = "proxy")]
    "proxy",
];
