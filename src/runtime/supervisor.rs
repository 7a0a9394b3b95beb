//! Runs each module in its own task and restarts it when it fails, returns early or panics,
//! with capped exponential backoff. A failing module is reported on `/ready` (backoff, with the
//! reason) and in `outrigger_module_restarts_total`; the other modules are not affected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{Instrument, error, info, info_span};

use super::{Drain, Health, Module, ModuleContext, State};
use crate::telemetry::metrics::{ModuleLabels, RuntimeMetrics};

/// First restart delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Restarts never wait longer than this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long was healthy: the next failure starts the backoff over.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The delay before restart number `failures` (0-based).
pub fn backoff(failures: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX)
}

/// Aborts the task when dropped, so aborting a supervisor also stops its module.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts supervising `module`. The returned task ends when the module has stopped after the
/// drain signal; aborting it stops the module at once.
pub fn spawn(
    module: Arc<dyn Module>,
    health: Arc<Health>,
    metrics: RuntimeMetrics,
    drain: Drain,
) -> JoinHandle<()> {
    let name = module.name();
    health.register_module(name);
    tokio::spawn(
        supervise(module, health, metrics, drain).instrument(info_span!("module", module = name)),
    )
}

async fn supervise(
    module: Arc<dyn Module>,
    health: Arc<Health>,
    metrics: RuntimeMetrics,
    mut drain: Drain,
) {
    let name = module.name();
    let mut failures = 0u32;
    loop {
        health.set(name, State::Starting, None);
        let cx = ModuleContext {
            name,
            health: health.clone(),
            drain: drain.clone(),
        };
        let started = Instant::now();
        let mut task = AbortOnDrop(tokio::spawn(module.clone().run(cx).in_current_span()));
        let outcome = tokio::select! {
            outcome = &mut task.0 => outcome,
            _ = drain.signaled() => {
                health.set(name, State::Stopping, None);
                let outcome = (&mut task.0).await;
                if let Ok(Err(e)) = &outcome {
                    error!(error = %e, "module failed while stopping");
                }
                health.set(name, State::Stopped, None);
                info!("module stopped");
                return;
            }
        };
        if drain.is_draining() {
            health.set(name, State::Stopped, None);
            return;
        }
        let reason = match outcome {
            Ok(Ok(())) => "returned without being asked to stop".to_string(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(e) => format!("cancelled: {e}"),
        };
        if started.elapsed() >= STABLE_AFTER {
            failures = 0;
        }
        let delay = backoff(failures);
        failures = failures.saturating_add(1);
        metrics
            .module_restarts
            .get_or_create(&ModuleLabels {
                module: name.to_string(),
            })
            .inc();
        error!(%reason, retry_in = ?delay, "module stopped unexpectedly; restarting it");
        health.set(name, State::Backoff, Some(reason));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = drain.signaled() => {
                health.set(name, State::Stopped, None);
                return;
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{ModuleFuture, Stop, drain};
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(20), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    /// Panics on its first two runs, fails on the third, then serves until drained.
    struct Flaky {
        runs: AtomicU32,
    }

    impl Module for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn run(self: Arc<Self>, mut cx: ModuleContext) -> ModuleFuture {
            Box::pin(async move {
                match self.runs.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => panic!("boom"),
                    2 => Err("no luck".into()),
                    _ => {
                        cx.set_ready();
                        cx.drain.signaled().await;
                        Ok(())
                    }
                }
            })
        }
    }

    /// Serves until drained, unaffected by its neighbour.
    struct Steady;

    impl Module for Steady {
        fn name(&self) -> &'static str {
            "steady"
        }
        fn run(self: Arc<Self>, mut cx: ModuleContext) -> ModuleFuture {
            Box::pin(async move {
                cx.set_ready();
                cx.drain.signaled().await;
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_module_is_restarted_and_isolated() {
        let metrics = RuntimeMetrics::default();
        let health = Arc::new(Health::new(metrics.clone()));
        let (trigger, drain) = drain();
        let flaky = Arc::new(Flaky {
            runs: AtomicU32::new(0),
        });
        let a = spawn(
            flaky.clone(),
            health.clone(),
            metrics.clone(),
            drain.clone(),
        );
        let b = spawn(Arc::new(Steady), health.clone(), metrics.clone(), drain);

        // Paused time: sleeps complete as soon as every task is idle.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !health.report().ready {
            assert!(
                Instant::now() < deadline,
                "never ready: {:?}",
                health.report()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = health.report();
        assert_eq!(flaky.runs.load(Ordering::SeqCst), 4);
        assert_eq!(report.components["flaky"].restarts, 3);
        assert_eq!(report.components["steady"].restarts, 0);
        let restarts = metrics
            .module_restarts
            .get_or_create(&ModuleLabels {
                module: "flaky".into(),
            })
            .get();
        assert_eq!(restarts, 3);

        trigger.trigger(Stop::Graceful);
        a.await.unwrap();
        b.await.unwrap();
        let report = health.report();
        assert_eq!(report.components["flaky"].state, State::Stopped);
        assert_eq!(report.components["steady"].state, State::Stopped);
    }
}
