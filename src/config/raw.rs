//! The config file as written: serde structs that mirror the YAML, with unknown keys refused
//! and every default in one place. `config::load` turns this into the typed [`super::Config`].
//!
//! Defaults are named consts with the reason they are what they are; `docs/configuration.md`
//! lists the same values.

use serde::Deserialize;

use super::types::{Duration, TcpAddress};

/// The service name when none is configured.
pub const DEFAULT_SERVICE: &str = "app";
/// Loopback only: the admin API can stop the sidecar and change its log level.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";
/// A sidecar shares its pod with the app; one core is enough for most of them and keeps the
/// sidecar from competing with the app for CPU.
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// The Kubernetes default `terminationGracePeriodSeconds`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Informational events only; `debug` per module when needed through `PUT /log-level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub service: Option<String>,
    pub admin: RawAdmin,
    pub runtime: RawRuntime,
    pub log: RawLog,
    pub app: RawApp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub address: Option<TcpAddress>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    pub worker_threads: Option<usize>,
    pub shutdown_grace: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

/// How Outrigger writes its own diagnostics (to stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApp {
    /// The app to run and supervise: program and arguments. `outrigger run -- CMD` sets it too.
    pub command: Option<Vec<String>>,
    /// Extra environment variables for the app.
    pub env: Option<std::collections::BTreeMap<String, String>>,
}
