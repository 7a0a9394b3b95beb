//! The readiness latch: every module and the supervised app register here, and `/ready` is 200
//! only when all of them are ready and the sidecar is not draining.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::telemetry::metrics::{ModuleStateLabels, RuntimeMetrics};

/// Where a component is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Ready,
    /// Failed; waiting before the next restart.
    Backoff,
    /// Running but failing its probe (the app only).
    Unhealthy,
    Stopping,
    Stopped,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Ready,
        State::Backoff,
        State::Unhealthy,
        State::Stopping,
        State::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::Unhealthy => "unhealthy",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }
}

/// One component's status as `/ready` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub state: State,
    /// Why it is not ready (the last error), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub restarts: u64,
    /// Modules are reported in `outrigger_module_state`; the app is not a module.
    #[serde(skip)]
    is_module: bool,
}

/// The readiness report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub ready: bool,
    pub draining: bool,
    /// Components that are not ready, by name.
    pub not_ready: Vec<String>,
    pub components: BTreeMap<String, Status>,
}

#[derive(Default)]
pub struct Health {
    inner: Mutex<Inner>,
    metrics: RuntimeMetrics,
}

#[derive(Default)]
struct Inner {
    components: BTreeMap<String, Status>,
    draining: bool,
}

impl Health {
    pub fn new(metrics: RuntimeMetrics) -> Self {
        Health {
            inner: Mutex::default(),
            metrics,
        }
    }

    /// Adds a module (reported in metrics too), starting.
    pub fn register_module(&self, name: &str) {
        self.register(name, true);
    }

    /// Adds a component that is not a module (the app), starting.
    pub fn register_component(&self, name: &str) {
        self.register(name, false);
    }

    fn register(&self, name: &str, is_module: bool) {
        self.inner.lock().expect("not poisoned").components.insert(
            name.to_string(),
            Status {
                state: State::Starting,
                detail: None,
                restarts: 0,
                is_module,
            },
        );
        if is_module {
            self.export(name, State::Starting);
        }
    }

    /// Moves a component to `state`, with an optional reason.
    pub fn set(&self, name: &str, state: State, detail: Option<String>) {
        let is_module = {
            let mut inner = self.inner.lock().expect("not poisoned");
            let Some(status) = inner.components.get_mut(name) else {
                return;
            };
            if state == State::Backoff {
                status.restarts += 1;
            }
            status.state = state;
            status.detail = detail;
            status.is_module
        };
        if is_module {
            self.export(name, state);
        }
    }

    fn export(&self, name: &str, current: State) {
        for s in State::ALL {
            self.metrics
                .module_state
                .get_or_create(&ModuleStateLabels {
                    module: name.to_string(),
                    state: s.as_str(),
                })
                .set(i64::from(s == current));
        }
    }

    /// From now on `/ready` answers 503 (a stop has begun).
    pub fn set_draining(&self) {
        self.inner.lock().expect("not poisoned").draining = true;
    }

    pub fn report(&self) -> Report {
        self.report_of(false)
    }

    /// Like [`Health::report`], for the modules only (not the app): what an app waits for
    /// before it makes outbound calls (`/ready/outbound`, `outrigger wait`).
    pub fn report_modules(&self) -> Report {
        self.report_of(true)
    }

    fn report_of(&self, modules_only: bool) -> Report {
        let inner = self.inner.lock().expect("not poisoned");
        let not_ready: Vec<String> = inner
            .components
            .iter()
            .filter(|(_, s)| s.is_module || !modules_only)
            .filter(|(_, s)| s.state != State::Ready)
            .map(|(n, _)| n.clone())
            .collect();
        Report {
            ready: !inner.draining && not_ready.is_empty(),
            draining: inner.draining,
            not_ready,
            components: inner
                .components
                .iter()
                .filter(|(_, s)| s.is_module || !modules_only)
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_ready_and_not_draining() {
        let h = Health::new(RuntimeMetrics::default());
        assert!(h.report().ready, "nothing registered: ready");
        h.register_module("proxy");
        h.register_component("app");
        let r = h.report();
        assert!(!r.ready);
        assert_eq!(r.not_ready, vec!["app", "proxy"]);
        h.set("proxy", State::Ready, None);
        h.set("app", State::Ready, None);
        assert!(h.report().ready);
        h.set("proxy", State::Backoff, Some("boom".into()));
        let r = h.report();
        assert!(!r.ready);
        assert_eq!(r.components["proxy"].restarts, 1);
        assert_eq!(r.components["proxy"].detail.as_deref(), Some("boom"));
        h.set("proxy", State::Ready, None);
        h.set_draining();
        assert!(!h.report().ready);
    }
}
