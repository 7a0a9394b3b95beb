//! The stop sequence: the order of DESIGN's lifecycle contract, as a type whose steps are
//! numbered like the contract's Stop paragraph.
//!
//! ```text
//!  0. /ready → 503; keep accepting for `runtime.drain_delay` while load balancers notice
//!  1. inbound stops accepting and drains (leaving `app.stop_timeout` of the grace for the app)
//!  2. the app gets `app.stop_signal` (SIGINT on a fast stop), SIGKILL at the deadline; outbound
//!     and the bridge keep serving it meanwhile. An app in another container (probe only) is
//!     served until its probe fails.
//!  3. everything else drains (outbound, bridge, what is left of inbound); aborted at the deadline
//!  4. admin stops
//! ```
//!
//! A fast stop asked for on the way (SIGINT, `POST /shutdown?fast=true`) cuts the rest short:
//! every later step gets at most [`FAST_STOP`]. The app is reached through the [`StoppingApp`]
//! trait, so the sequence can be tested with a stand-in and `runtime` needs nothing from
//! `lifecycle`.

use std::future::Future;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::{Control, DrainTrigger, Health, Stop};

/// How long a fast stop (SIGINT, `POST /shutdown?fast=true`) waits for the app and modules.
pub const FAST_STOP: Duration = Duration::from_secs(2);
/// How long the admin server gets to finish its last requests.
const ADMIN_STOP: Duration = Duration::from_secs(1);

/// A supervised app, as the stop sequence sees it.
pub trait StoppingApp: Send {
    /// How the app ended.
    type End: Send;
    /// Sends `signal` now, SIGKILL at `deadline` if it is still running.
    fn stop(&self, signal: Signal, deadline: Instant);
    /// Resolves once the app has exited. Cancel-safe: a stop that hurries drops the wait,
    /// signals again and waits anew.
    fn ended(&mut self) -> impl Future<Output = Self::End> + Send;
}

/// The settings of a stop, from the config.
#[derive(Clone, Debug)]
pub struct StopSettings {
    /// `runtime.shutdown_grace`: the whole stop's budget.
    pub grace: Duration,
    /// `runtime.drain_delay`: step 0.
    pub drain_delay: Duration,
    /// `app.stop_signal`, sent in step 2 of a graceful stop.
    pub stop_signal: Signal,
    /// `app.stop_timeout`: what step 1 leaves of the grace for the app, when there is one.
    pub stop_timeout: Duration,
    /// A supervised app is still running, or an app is probed: inbound drains only until
    /// `stop_timeout` is left.
    pub watched_app: bool,
}

/// The admin server, stopped last.
pub struct AdminServer {
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// One stop, from `/ready` 503 to the admin server's end.
pub struct StopSequence<'a, A: StoppingApp> {
    pub kind: Stop,
    pub settings: StopSettings,
    pub health: &'a Health,
    /// Requests that arrive while stopping: only a fast stop is heeded.
    pub control: &'a mut mpsc::Receiver<Control>,
    pub drain: DrainTrigger,
    /// The supervised modules' tasks.
    pub modules: Vec<JoinHandle<()>>,
    /// The supervised app, if it is still running.
    pub app: Option<A>,
    /// An app in another container: its readiness (step 2 waits for `false`). Only given
    /// when there is something for it to use while it stops (outbound listeners, the bridge).
    pub app_ready: Option<watch::Receiver<bool>>,
    pub admin: Option<AdminServer>,
}

/// Where a running stop is: how it was asked for and when it must be over.
struct Clock {
    kind: Stop,
    deadline: Instant,
}

impl Clock {
    /// A fast stop cuts every later step short.
    fn hurry(&mut self) {
        self.kind = Stop::Fast;
        self.deadline = self.deadline.min(Instant::now() + FAST_STOP);
    }
}

impl<A: StoppingApp> StopSequence<'_, A> {
    /// Runs every step; returns how the app ended, if it was still running.
    pub async fn run(mut self) -> Option<A::End> {
        let mut clock = Clock {
            kind: self.kind,
            deadline: Instant::now()
                + match self.kind {
                    Stop::Graceful => self.settings.grace,
                    Stop::Fast => FAST_STOP.min(self.settings.grace),
                },
        };
        info!(kind = ?clock.kind, grace = ?clock.deadline.saturating_duration_since(Instant::now()), "stopping");
        self.health.set_draining();
        self.step0_let_load_balancers_notice(&mut clock).await;
        self.step1_drain_inbound(&mut clock).await;
        let end = self.step2_stop_the_app(&mut clock).await;
        self.step3_drain_the_rest(&mut clock).await;
        self.step4_stop_admin().await;
        end
    }

    /// 0. Keep accepting for a while with `/ready` at 503, while load balancers (Kubernetes
    ///    endpoints, ingresses) notice.
    async fn step0_let_load_balancers_notice(&mut self, clock: &mut Clock) {
        let delay = self.settings.drain_delay;
        if clock.kind != Stop::Graceful || delay.is_zero() {
            return;
        }
        info!(delay = ?delay, "still accepting while load balancers notice /ready 503");
        tokio::select! {
            _ = tokio::time::sleep_until(clock.deadline.min(Instant::now() + delay).into()) => {}
            _ = fast_requested(self.control) => clock.hurry(),
        }
    }

    /// 1. Inbound: stop accepting, finish in-flight requests; keep `stop_timeout` for the app.
    ///    A fast stop does not wait: the app gets SIGINT at once.
    async fn step1_drain_inbound(&mut self, clock: &mut Clock) {
        self.drain.trigger_inbound(clock.kind);
        if clock.kind != Stop::Graceful {
            return;
        }
        let inbound_deadline = if self.settings.watched_app {
            clock
                .deadline
                .checked_sub(self.settings.stop_timeout)
                .unwrap_or_else(Instant::now)
        } else {
            clock.deadline
        };
        let inbound =
            tokio::time::timeout_at(inbound_deadline.into(), self.drain.inbound_drained());
        tokio::select! {
            r = inbound => match r {
                Ok(()) => info!("inbound drained"),
                Err(_) => warn!("inbound did not drain in time; going on"),
            },
            _ = fast_requested(self.control) => clock.hurry(),
        }
    }

    /// 2. The app: its stop signal, then SIGKILL at the deadline. Outbound still serves it.
    async fn step2_stop_the_app(&mut self, clock: &mut Clock) -> Option<A::End> {
        if let Some(mut app) = self.app.take() {
            let signal = match clock.kind {
                Stop::Graceful => self.settings.stop_signal,
                Stop::Fast => Signal::SIGINT,
            };
            app.stop(signal, clock.deadline);
            let graceful = clock.kind == Stop::Graceful;
            let ended = tokio::select! {
                end = app.ended() => Some(end),
                _ = fast_requested(self.control), if graceful => None,
            };
            return Some(match ended {
                Some(end) => end,
                None => {
                    clock.hurry();
                    app.stop(Signal::SIGINT, clock.deadline);
                    app.ended().await
                }
            });
        }
        // The app runs in another container and gets its own SIGTERM: serve its outbound
        // (and bridge) calls until its probe says it is gone, or the grace period ends.
        if let Some(mut ready) = self.app_ready.take()
            && clock.kind == Stop::Graceful
        {
            let gone = tokio::time::timeout_at(clock.deadline.into(), ready.wait_for(|r| !*r));
            tokio::select! {
                r = gone => match r {
                    Ok(_) => info!("the app is gone"),
                    Err(_) => warn!("the app still answers its probe at the end of the grace period"),
                },
                _ = fast_requested(self.control) => clock.hurry(),
            }
        }
        None
    }

    /// 3. Everything else: outbound, the bridge, and whatever inbound is left.
    async fn step3_drain_the_rest(&mut self, clock: &mut Clock) {
        self.drain.trigger(clock.kind);
        let modules = std::mem::take(&mut self.modules);
        let aborts: Vec<_> = modules.iter().map(|t| t.abort_handle()).collect();
        let join = async {
            for t in modules {
                let _ = t.await;
            }
        };
        tokio::pin!(join);
        let graceful = clock.kind == Stop::Graceful;
        let drained = tokio::select! {
            r = tokio::time::timeout_at(clock.deadline.into(), &mut join) => r.is_ok(),
            _ = fast_requested(self.control), if graceful => {
                tokio::time::timeout(FAST_STOP, &mut join).await.is_ok()
            }
        };
        if !drained {
            warn!("modules did not drain within the grace period; stopping them now");
            aborts.iter().for_each(|a| a.abort());
        }
    }

    /// 4. Admin last: `/ready` said 503 until here.
    async fn step4_stop_admin(&mut self) {
        let Some(admin) = self.admin.take() else {
            return;
        };
        let _ = admin.stop.send(());
        match tokio::time::timeout(ADMIN_STOP, admin.task).await {
            Ok(Ok(Err(e))) => error!(error = %e, "admin server failed"),
            Err(_) => warn!("admin server did not stop in time"),
            _ => {}
        }
    }
}

/// Resolves when a fast stop is asked for; other requests are ignored while stopping.
async fn fast_requested(control: &mut mpsc::Receiver<Control>) {
    loop {
        match control.recv().await {
            Some(Control::Shutdown { graceful: false }) => {
                info!("fast stop requested; cutting the graceful stop short");
                return;
            }
            Some(other) => debug!(request = ?other, "ignored while stopping"),
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::runtime::{drain, health::Health};
    use crate::telemetry::metrics::Metrics;

    /// What happened, in order, as the steps saw it.
    type Log = Arc<Mutex<Vec<String>>>;

    /// A stand-in app: records its signal and ends `after` it, or at the deadline (SIGKILL).
    struct FakeApp {
        log: Log,
        after: Duration,
        deadline: Arc<Mutex<Option<(Signal, Instant)>>>,
    }

    impl StoppingApp for FakeApp {
        type End = &'static str;
        fn stop(&self, signal: Signal, deadline: Instant) {
            self.log.lock().unwrap().push(format!("app {signal}"));
            *self.deadline.lock().unwrap() = Some((signal, deadline));
        }
        async fn ended(&mut self) -> &'static str {
            let (_, deadline) = self.deadline.lock().unwrap().expect("stopped first");
            let exit = Instant::now() + self.after;
            if exit <= deadline {
                tokio::time::sleep_until(exit.into()).await;
                self.log.lock().unwrap().push("app exited".into());
                "exited"
            } else {
                tokio::time::sleep_until(deadline.into()).await;
                self.log.lock().unwrap().push("app killed".into());
                "killed"
            }
        }
    }

    fn settings(grace_ms: u64) -> StopSettings {
        StopSettings {
            grace: Duration::from_millis(grace_ms),
            drain_delay: Duration::ZERO,
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_millis(grace_ms / 3),
            watched_app: true,
        }
    }

    /// An inbound and an outbound module task that log when their drain fires.
    fn modules(d: &crate::runtime::Drain, log: &Log) -> Vec<JoinHandle<()>> {
        let spawn = |mut d: crate::runtime::Drain, name: &'static str, log: Log| {
            let tracked = d.inbound.then(|| d.track());
            tokio::spawn(async move {
                d.signaled().await;
                log.lock().unwrap().push(format!("{name} drained"));
                drop(tracked);
            })
        };
        vec![
            spawn(d.inbound(), "inbound", log.clone()),
            spawn(d.clone(), "outbound", log.clone()),
        ]
    }

    fn health() -> Health {
        Health::new(Metrics::new().runtime)
    }

    /// Runs a stop with an inbound and an outbound module task logging into `log`; returns how
    /// the app ended and whether `/ready` said draining.
    async fn stop_with(
        log: &Log,
        settings: StopSettings,
        control: &mut mpsc::Receiver<Control>,
        app: Option<FakeApp>,
        app_ready: Option<watch::Receiver<bool>>,
    ) -> (Option<&'static str>, bool) {
        let (trigger, d) = drain();
        let health = health();
        let end = StopSequence {
            kind: Stop::Graceful,
            settings,
            health: &health,
            control,
            drain: trigger,
            modules: modules(&d, log),
            app,
            app_ready,
            admin: None,
        }
        .run()
        .await;
        (end, health.report().draining)
    }

    fn fake(log: &Log, after: Duration) -> FakeApp {
        FakeApp {
            log: log.clone(),
            after,
            deadline: Default::default(),
        }
    }

    #[tokio::test]
    async fn graceful_order_is_inbound_app_rest() {
        let log: Log = Default::default();
        let (_tx, mut rx) = mpsc::channel(1);
        let app = fake(&log, Duration::from_millis(100));
        let (end, draining) = stop_with(&log, settings(600), &mut rx, Some(app), None).await;
        assert_eq!(end, Some("exited"));
        assert_eq!(
            *log.lock().unwrap(),
            [
                "inbound drained",
                "app SIGTERM",
                "app exited",
                "outbound drained"
            ]
        );
        assert!(draining);
    }

    #[tokio::test]
    async fn an_app_that_does_not_exit_is_killed_at_the_deadline() {
        let log: Log = Default::default();
        let (_tx, mut rx) = mpsc::channel(1);
        let started = Instant::now();
        let app = fake(&log, Duration::from_secs(60));
        let (end, _) = stop_with(&log, settings(600), &mut rx, Some(app), None).await;
        assert_eq!(end, Some("killed"));
        // Not before the end of the grace period.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(600), "{took:?}");
        // The grace period is over: modules still running are aborted, not waited for.
        assert_eq!(
            *log.lock().unwrap(),
            ["inbound drained", "app SIGTERM", "app killed"]
        );
    }

    #[tokio::test]
    async fn a_fast_stop_on_the_way_cuts_the_app_short_with_sigint() {
        let log: Log = Default::default();
        let (tx, mut rx) = mpsc::channel(4);
        let app = fake(&log, Duration::from_secs(60));
        let deadline = app.deadline.clone();
        // A reload asked for while stopping is ignored; the fast stop is heeded.
        tx.send(Control::Reload).await.unwrap();
        tx.send(Control::Shutdown { graceful: false })
            .await
            .unwrap();
        let started = Instant::now();
        let slow = StopSettings {
            drain_delay: Duration::from_secs(10),
            ..settings(30_000)
        };
        let (end, _) = stop_with(&log, slow, &mut rx, Some(app), None).await;
        assert_eq!(end, Some("killed"));
        // The drain delay was cut short, and the app got SIGINT with FAST_STOP left.
        let (signal, at) = deadline.lock().unwrap().unwrap();
        assert_eq!(signal, Signal::SIGINT);
        // FAST_STOP from the request on, not the 30 s grace period.
        assert!(at - started < FAST_STOP * 2, "{:?}", at - started);
    }

    #[tokio::test]
    async fn an_app_in_another_container_is_served_until_its_probe_fails() {
        let log: Log = Default::default();
        let (_tx, mut rx) = mpsc::channel(1);
        let (ready_tx, ready_rx) = watch::channel(true);
        let probe_log = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            probe_log.lock().unwrap().push("probe failed".into());
            ready_tx.send_replace(false);
            // Kept alive: a closed channel would also end the wait.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let (end, _) = stop_with(&log, settings(600), &mut rx, None, Some(ready_rx)).await;
        assert_eq!(end, None);
        assert_eq!(
            *log.lock().unwrap(),
            ["inbound drained", "probe failed", "outbound drained"]
        );
    }
}
