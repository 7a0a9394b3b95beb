//! The module runtime: the [`Module`] trait every workload implements, the [`supervisor`] that
//! runs and restarts modules, the [`health`] latch behind `/ready`, the one [`Control`] channel
//! fed by OS signals and the admin API, and the [`Drain`] signal handed to every task.
//!
//! Modules are built first (binding their listeners eagerly, so a bind error stops start-up
//! before anything runs), then handed to the supervisor. A module whose `run` returns an error,
//! returns early or panics is restarted with capped exponential backoff; the others keep going.

pub mod health;
pub mod signals;
pub mod stop;
pub mod supervisor;
pub mod upgrade;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{Notify, watch};

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
    /// Pass a signal Outrigger received on to the supervised app (`app.forward_signals`).
    Forward(nix::sys::signal::Signal),
    /// Start a new Outrigger that takes over (SIGUSR2, `POST /upgrade`): see [`upgrade`].
    Upgrade,
}

/// How a stop was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Graceful,
    Fast,
}

/// Where a stop is: inbound traffic drains first, then everything else (outbound keeps
/// serving the app while it finishes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Inbound(Stop),
    All(Stop),
}

/// Tells tasks to stop. Cheap to clone; every task holds one. An inbound drain (see
/// [`Drain::inbound`]) fires at the first phase of a stop, the others at the second.
#[derive(Clone)]
pub struct Drain {
    rx: watch::Receiver<Phase>,
    inbound: bool,
    tracker: Arc<Tracker>,
}

/// The sending half of [`Drain`].
pub struct DrainTrigger {
    tx: watch::Sender<Phase>,
    tracker: Arc<Tracker>,
}

/// Counts inbound tasks still running, so a stop knows when inbound has drained.
#[derive(Default)]
struct Tracker {
    running: AtomicUsize,
    changed: Notify,
    /// This stop is a hot restart's: another process accepts on the same sockets.
    handover: AtomicBool,
}

/// Held by an inbound task until it has drained; see [`Drain::track`].
pub struct Tracked(Arc<Tracker>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// A new drain signal and its trigger.
pub fn drain() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(Phase::Running);
    let tracker = Arc::new(Tracker::default());
    (
        DrainTrigger {
            tx,
            tracker: tracker.clone(),
        },
        Drain {
            rx,
            inbound: false,
            tracker,
        },
    )
}

impl DrainTrigger {
    /// First phase: inbound listeners stop accepting and finish their requests.
    pub fn trigger_inbound(&self, stop: Stop) {
        self.tx.send_if_modified(|p| {
            if *p == Phase::Running {
                *p = Phase::Inbound(stop);
                true
            } else {
                false
            }
        });
    }

    /// Marks the coming stop as a hand-over to a new process (hot restart): connections that
    /// cannot be drained gracefully (upgraded ones, tcp listeners') are left to finish within
    /// the grace period instead of being closed at once — the clients have somewhere else to
    /// open new ones. Call before [`DrainTrigger::trigger_inbound`].
    pub fn hand_over(&self) {
        self.tracker.handover.store(true, Ordering::Release);
    }

    /// Second phase: everything drains.
    pub fn trigger(&self, stop: Stop) {
        self.tx.send_replace(Phase::All(stop));
    }

    /// Resolves once every tracked inbound task has finished.
    pub async fn inbound_drained(&self) {
        loop {
            let changed = self.tracker.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.tracker.running.load(Ordering::Acquire) == 0 {
                return;
            }
            changed.await;
        }
    }
}

impl Drain {
    /// The same signal, firing already at the inbound phase of a stop.
    pub fn inbound(&self) -> Drain {
        Drain {
            inbound: true,
            ..self.clone()
        }
    }

    /// Counts the caller as an inbound task until the guard is dropped.
    pub fn track(&self) -> Tracked {
        self.tracker.running.fetch_add(1, Ordering::AcqRel);
        Tracked(self.tracker.clone())
    }

    fn fired(&self, p: Phase) -> Option<Stop> {
        match p {
            Phase::Running => None,
            Phase::Inbound(stop) => self.inbound.then_some(stop),
            Phase::All(stop) => Some(stop),
        }
    }

    /// Resolves once a stop was asked for (also when the trigger is gone: nothing can call
    /// this task back then).
    pub async fn signaled(&mut self) -> Stop {
        let inbound = self.inbound;
        let fired = |p: &Phase| match p {
            Phase::Running => false,
            Phase::Inbound(_) => inbound,
            Phase::All(_) => true,
        };
        let phase = match self.rx.wait_for(fired).await {
            Ok(p) => *p,
            Err(_) => return Stop::Fast,
        };
        self.fired(phase).unwrap_or(Stop::Fast)
    }

    /// Resolves once a stop was asked for that closes connections which cannot drain
    /// gracefully (opaque tcp, upgraded ones): every stop but a hand-over, during which they
    /// run to their end (or the grace deadline, when the module is aborted).
    pub async fn must_close(&mut self) {
        self.signaled().await;
        if self.tracker.handover.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    }

    /// True once a stop was asked for.
    pub fn is_draining(&self) -> bool {
        let p = *self.rx.borrow();
        self.fired(p).is_some()
    }
}

/// Whether inbound traffic may reach the app: closed while the app starts (until its probe
/// passes) and while it restarts; inbound requests wait for it up to `app.hold_timeout`.
/// Checked on every inbound request, so the open case is one atomic load.
#[derive(Clone)]
pub struct AppGate {
    open: Arc<AtomicBool>,
    rx: watch::Receiver<bool>,
}

/// The sending half of [`AppGate`].
pub struct AppGateSetter {
    open: Arc<AtomicBool>,
    tx: watch::Sender<bool>,
}

/// A gate, initially open or closed.
pub fn app_gate(open: bool) -> (AppGateSetter, AppGate) {
    let (tx, rx) = watch::channel(open);
    let flag = Arc::new(AtomicBool::new(open));
    (
        AppGateSetter {
            open: flag.clone(),
            tx,
        },
        AppGate { open: flag, rx },
    )
}

impl AppGateSetter {
    pub fn set(&self, open: bool) {
        self.open.store(open, Ordering::Release);
        self.tx
            .send_if_modified(|v| std::mem::replace(v, open) != open);
    }
}

impl AppGate {
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// A receiver of the gate's state (true: open), for tasks that wait on it themselves.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// Waits until the gate is open, at most `limit`. True if it is open.
    pub async fn wait(&self, limit: std::time::Duration) -> bool {
        if self.is_open() {
            return true;
        }
        let mut rx = self.rx.clone();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|open| *open)).await,
            Ok(Ok(_))
        )
    }
}

/// What a module's `run` resolves to.
pub type ModuleResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
/// The future a module's `run` returns.
pub type ModuleFuture = Pin<Box<dyn Future<Output = ModuleResult> + Send>>;
/// The future a module's `reload` returns: an error leaves the module as it was.
pub type ReloadFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

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
    /// Applies a new, validated config to the running module, without dropping connections.
    /// Everything is prepared first and swapped in at once; an error changes nothing. Keys that
    /// cannot change live (listener addresses) are left as they are: the caller has already
    /// kept the old values for them and reports them as needing a restart.
    /// `tls` is the material the preflight stage built for this config (nothing is read twice).
    fn reload(
        self: Arc<Self>,
        config: Arc<Config>,
        tls: Arc<crate::tls::Material>,
    ) -> ReloadFuture {
        let _ = (config, tls);
        Box::pin(async { Ok(()) })
    }
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

impl ReloadOutcome {
    /// A rejected reload: the running config was kept.
    pub fn failure(errors: Vec<String>) -> ReloadOutcome {
        ReloadOutcome {
            at: crate::telemetry::metrics::unix_now(),
            result: "failure",
            errors,
            needs_restart: Vec::new(),
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
