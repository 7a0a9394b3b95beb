//! The module runtime: the [`Module`] trait every workload implements, the [`supervisor`] that
//! runs and restarts modules, the [`health`] latch behind `/ready`, the one [`Control`] channel
//! fed by OS signals and the admin API, and the [`Drain`] signal handed to every task.
//!
//! Modules are built first (binding their listeners eagerly, so a bind error stops start-up
//! before anything runs), then handed to the supervisor. A module whose `run` returns an error,
//! returns early or panics is restarted with capped exponential backoff; the others keep going.

pub mod health;
pub mod supervisor;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
pub use health::{Health, State};

/// What signals, the admin API and (later) the file watcher ask of the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file and apply what can change live (SIGHUP, `POST /reload`).
    Reload,
    /// Stop. Graceful: `/ready` goes 503 and in-flight work drains within the grace period
    /// (SIGTERM, `POST /shutdown`). Fast: stop now (SIGINT).
    Shutdown { graceful: bool },
}

/// How a stop was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Graceful,
    Fast,
}

/// Tells tasks to stop. Cheap to clone; every task holds one.
#[derive(Clone)]
pub struct Drain(watch::Receiver<Option<Stop>>);

/// The sending half of [`Drain`].
pub struct DrainTrigger(watch::Sender<Option<Stop>>);

/// A new drain signal and its trigger.
pub fn drain() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(None);
    (DrainTrigger(tx), Drain(rx))
}

impl DrainTrigger {
    pub fn trigger(&self, stop: Stop) {
        self.0.send_replace(Some(stop));
    }
}

impl Drain {
    /// Resolves once a stop was asked for (also when the trigger is gone: nothing can call
    /// this task back then).
    pub async fn signaled(&mut self) -> Stop {
        match self.0.wait_for(Option::is_some).await {
            Ok(stop) => stop.unwrap_or(Stop::Fast),
            Err(_) => Stop::Fast,
        }
    }

    /// True once a stop was asked for.
    pub fn is_draining(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// What a module's `run` resolves to.
pub type ModuleResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
/// The future a module's `run` returns.
pub type ModuleFuture = Pin<Box<dyn Future<Output = ModuleResult> + Send>>;

/// What a running module is given.
pub struct ModuleContext {
    name: &'static str,
    health: Arc<Health>,
    /// Resolves when the module should stop: it then finishes in-flight work and returns.
    pub drain: Drain,
}

impl ModuleContext {
    /// Reports the module ready to serve (`/ready` waits for every module).
    pub fn set_ready(&self) {
        self.health.set(self.name, State::Ready, None);
    }
}

/// A workload (proxy, bridge, logs, …). Built with its listeners already bound; `run` may be
/// called again after a failure, so per-run state belongs inside the future.
pub trait Module: Send + Sync + 'static {
    /// The module's name in logs, `/ready` and metrics.
    fn name(&self) -> &'static str;
    /// Serves until `cx.drain` fires (then drains and returns `Ok`) or fails.
    fn run(self: Arc<Self>, cx: ModuleContext) -> ModuleFuture;
}

/// The config the sidecar is running with, and how the last reload went; shown by `/config`.
pub struct RunningConfig {
    pub config: ArcSwap<Config>,
    pub last_reload: Mutex<Option<ReloadOutcome>>,
}

impl RunningConfig {
    pub fn new(config: Config) -> Self {
        RunningConfig {
            config: ArcSwap::from_pointee(config),
            last_reload: Mutex::new(None),
        }
    }
}

/// The result of the last config reload.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadOutcome {
    /// Unix time of the attempt.
    pub at: f64,
    /// `success` or `failure`.
    pub result: &'static str,
    /// Every problem of a rejected file (the running config was kept).
    pub errors: Vec<String>,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<String>,
}
