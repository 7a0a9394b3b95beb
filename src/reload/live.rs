//! Live reload of Outrigger's own config (SIGHUP, `POST /reload`, the config file watcher):
//! load both stages again; a bad file changes nothing and is reported; a good one is split by
//! [`ConfigDiff`] into what applies live (routes, clusters, limits, log level, `reload:`
//! entries, TLS material) and the keys that need a restart (named, kept as they run).
//!
//! The outcome goes to the log, `/config` (`last_reload`) and
//! `outrigger_config_reloads_total{result}`.

use std::sync::Arc;

use tracing::{error, info, warn};

use super::Reloader;
use crate::config::{Config, ConfigDiff};
use crate::runtime::{Module, ReloadOutcome, RunningConfig};
use crate::telemetry::log::LogLevel;
use crate::telemetry::metrics::{ResultLabels, RuntimeMetrics, unix_now};
use crate::tls::Material;

/// What a reload loads: the typed config and the TLS material preflight built from it, or
/// every problem (one line each).
pub type Loaded = Result<(Config, Material), Vec<String>>;

/// Everything a live reload touches.
pub struct LiveReload {
    pub running: Arc<RunningConfig>,
    pub metrics: RuntimeMetrics,
    pub modules: Vec<Arc<dyn Module>>,
    pub log_level: LogLevel,
}

impl LiveReload {
    /// Loads the config with `load` (on the blocking pool: it reads files) and applies it.
    pub async fn run<F>(&self, load: F, reloader: &Reloader)
    where
        F: FnOnce() -> Loaded + Send + 'static,
    {
        let loaded = tokio::task::spawn_blocking(load)
            .await
            .unwrap_or_else(|e| Err(vec![e.to_string()]));
        let outcome = self.apply(loaded, reloader).await;
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels {
                result: outcome.result,
            })
            .inc();
        if outcome.result == "success" {
            self.metrics.config_last_reload_success.set(unix_now());
        }
        *self.running.last_reload.lock().expect("not poisoned") = Some(outcome);
    }

    async fn apply(&self, loaded: Loaded, reloader: &Reloader) -> ReloadOutcome {
        let (new, tls) = match loaded {
            Ok(pair) => pair,
            Err(errors) => {
                for p in &errors {
                    error!(problem = %p, "config reload rejected; keeping the running config");
                }
                return ReloadOutcome::failure(errors);
            }
        };
        let old = self.running.config.load_full();
        let ConfigDiff {
            applied,
            needs_restart,
        } = ConfigDiff::between(&old, &new);
        let applied = Arc::new(applied);
        let tls = Arc::new(tls);
        let mut failed = Vec::new();
        for m in &self.modules {
            if let Err(e) = m.clone().reload(applied.clone(), tls.clone()).await {
                error!(module = m.name(), error = %e, "the module could not apply the new config; it keeps the old one");
                failed.push(format!("{}: {e}", m.name()));
            }
        }
        if !failed.is_empty() {
            // The running config stays what /config shows (a module that failed kept its
            // old config; with one module there is nothing half-applied).
            return ReloadOutcome::failure(failed);
        }
        if applied.log.level != old.log.level
            && let Err(e) = self.log_level.set(&applied.log.level)
        {
            warn!(error = %e, "cannot apply the new log level");
        }
        reloader.update(applied.reload.clone());
        for key in &needs_restart {
            warn!(key, "config changed but takes effect only after a restart");
        }
        self.running.config.store(applied);
        info!(needs_restart = needs_restart.len(), "config reloaded");
        ReloadOutcome {
            at: unix_now(),
            result: "success",
            errors: Vec::new(),
            needs_restart,
        }
    }
}
