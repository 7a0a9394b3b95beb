//! Component health: a probe per networked component (a Redis `PING`, a PostgreSQL
//! `SELECT 1` on the component's own pool, a connected RabbitMQ channel, an MQTT CONNACK once
//! its connection is in use (`unknown` before: see [`NOT_STARTED`]), a NATS connection), run when the bridge starts and every [`PROBE_INTERVAL`] after. The result
//! is kept here and shown by `GET /v1.0/metadata` and gRPC `GetMetadata`; requests never wait
//! on it (a request to a down component fails on its own with a 5xx, and the component's
//! client reconnects by itself on the next request once the server is back).
//!
//! daprd 1.16 reports no component health (dapr/dapr#4758, the `Ping` health API, is not
//! merged), so the wire shape is ours, added where SDKs ignore what they do not know: each
//! HTTP `components[]` entry gets `"status"` (`healthy`, `unhealthy`, `unknown` before the first
//! probe answered) and, when unhealthy, `"error"`; the extended metadata (HTTP `extended`, gRPC
//! `extended_metadata`) gets `outrigger.health.<name>` = `healthy` or `unhealthy: <error>`.
//! Components with nothing to probe (in-memory and SQLite state, secrets, `bindings.http` and
//! `bindings.cron`) have no status.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::BridgeState;
use super::components::Component;
use super::pubsub::broker::BoxFuture;

/// How often each component is probed. A component that goes down shows unhealthy within
/// this (plus [`PROBE_TIMEOUT`]); one that comes back, likewise.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// A probe that has no answer within this counts as failed (a server that accepts but does
/// not answer is as down as one that refuses).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a probe answers for a component that connects on first use and has not been used
/// yet (MQTT: connecting would open its session before the app is ready): status `unknown`.
pub const NOT_STARTED: &str = "not connected yet (connects on first use)";

/// What a probe answers when it cannot tell now without waiting behind the component's own
/// work (a PostgreSQL pool whose every connection is in use): the last status stays.
pub const BUSY: &str = "busy: every connection in use";

/// The status a probe's answer (or its timeout) gives; None: keep the last one ([`BUSY`]).
fn status_of(answer: Result<Result<(), String>, tokio::time::error::Elapsed>) -> Option<Status> {
    Some(match answer {
        Ok(Ok(())) => Status::Healthy,
        Ok(Err(e)) if e == NOT_STARTED => Status::Unknown,
        Ok(Err(e)) if e == BUSY => return None,
        Ok(Err(e)) => Status::Unhealthy(e),
        Err(_) => Status::Unhealthy(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    })
}

/// What the last probe of a component found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Probed, but no probe has answered yet.
    Unknown,
    Healthy,
    /// The last probe failed with this error.
    Unhealthy(String),
}

impl Status {
    /// `healthy`, `unhealthy` or `unknown`.
    pub fn word(&self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Unhealthy(_) => "unhealthy",
        }
    }

    /// The error of an unhealthy component.
    pub fn error(&self) -> Option<&str> {
        match self {
            Status::Unhealthy(e) => Some(e),
            _ => None,
        }
    }
}

/// The status of every probed component, by name.
#[derive(Debug, Default)]
pub struct Health {
    by_name: Mutex<BTreeMap<String, Status>>,
}

impl Health {
    /// The status of `name` (None: not probed).
    pub fn get(&self, name: &str) -> Option<Status> {
        self.by_name
            .lock()
            .expect("not poisoned")
            .get(name)
            .cloned()
    }

    /// Every probed component's status, by name.
    pub fn all(&self) -> BTreeMap<String, Status> {
        self.by_name.lock().expect("not poisoned").clone()
    }

    /// Marks `name` as probed (its status `unknown` until the first answer).
    fn track(&self, name: &str) {
        self.by_name
            .lock()
            .expect("not poisoned")
            .entry(name.to_string())
            .or_insert(Status::Unknown);
    }

    /// Records a probe's result; logs a change.
    fn set(&self, c: &Component, status: Status) {
        let previous = self
            .by_name
            .lock()
            .expect("not poisoned")
            .insert(c.name.clone(), status.clone());
        if previous.as_ref() == Some(&status) {
            return;
        }
        match (&status, previous) {
            // Warned once when it goes down; a changed error while down is only debug.
            (Status::Unhealthy(error), Some(Status::Unhealthy(_))) => {
                tracing::debug!(component = %c.name, kind = %c.kind, %error, "component still unhealthy")
            }
            (Status::Unhealthy(error), _) => {
                tracing::warn!(component = %c.name, kind = %c.kind, %error, "component unhealthy")
            }
            (Status::Healthy, Some(Status::Unhealthy(_))) => {
                tracing::info!(component = %c.name, kind = %c.kind, "component healthy again")
            }
            _ => {}
        }
    }

    /// The `outrigger.health.<name>` extended metadata entries.
    pub fn extended_entries(&self) -> impl Iterator<Item = (String, String)> {
        self.all().into_iter().map(|(name, status)| {
            let value = match status.error() {
                Some(e) => format!("unhealthy: {e}"),
                None => status.word().to_string(),
            };
            (format!("outrigger.health.{name}"), value)
        })
    }
}

/// The probe of one component, or None when it has nothing to probe.
fn probe<'a>(st: &'a BridgeState, c: &'a Component) -> Option<BoxFuture<'a, Result<(), String>>> {
    match c.block() {
        "state" => st.state_stores.get(&c.name)?.store.ping(),
        "pubsub" => st.pubsub.broker(&c.name)?.ping(),
        "lock" => Some(Box::pin(st.lock_stores.get(&c.name)?.ping())),
        "configuration" => Some(st.configuration_stores.get(&c.name)?.ping()),
        "bindings" => st.output_bindings.get(&c.name)?.ping(),
        _ => None,
    }
}

/// Probes every component now and then every [`PROBE_INTERVAL`], until `stop` turns true.
/// Components are probed concurrently; each probe is bounded by [`PROBE_TIMEOUT`].
pub fn start(st: Arc<BridgeState>, mut stop: watch::Receiver<bool>) {
    let probed: Vec<Component> = st
        .components
        .iter()
        .filter(|c| probe(&st, c).is_some())
        .cloned()
        .collect();
    if probed.is_empty() {
        return;
    }
    for c in &probed {
        st.health.track(&c.name);
    }
    tokio::spawn(async move {
        loop {
            let rounds = probed.iter().map(|c| {
                let st = &st;
                async move {
                    let Some(p) = probe(st, c) else { return };
                    if let Some(status) = status_of(tokio::time::timeout(PROBE_TIMEOUT, p).await) {
                        st.health.set(c, status);
                    }
                }
            });
            tokio::select! {
                _ = futures_util::future::join_all(rounds) => {}
                _ = super::pubsub::broker::stopped(&mut stop) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = super::pubsub::broker::stopped(&mut stop) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_give_statuses() {
        let timed_out = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
            .await
            .unwrap_err();
        assert_eq!(status_of(Ok(Ok(()))), Some(Status::Healthy));
        assert_eq!(
            status_of(Ok(Err(NOT_STARTED.into()))),
            Some(Status::Unknown)
        );
        assert_eq!(status_of(Ok(Err(BUSY.into()))), None);
        assert_eq!(
            status_of(Ok(Err("refused".into()))),
            Some(Status::Unhealthy("refused".into()))
        );
        assert_eq!(
            status_of(Err(timed_out)),
            Some(Status::Unhealthy("no answer within 3s".into()))
        );
    }

    #[test]
    fn extended_entries_say_the_status_and_the_error() {
        let h = Health::default();
        h.track("a");
        h.track("b");
        let c = Component {
            name: "b".into(),
            kind: "state.redis".into(),
            version: "v1".into(),
            metadata: BTreeMap::new(),
            scopes: Vec::new(),
            ignore_errors: false,
            file: "c.yaml".into(),
            line: 1,
            lines: BTreeMap::new(),
        };
        h.set(&c, Status::Unhealthy("redis: connection refused".into()));
        let entries: Vec<(String, String)> = h.extended_entries().collect();
        assert_eq!(
            entries,
            vec![
                ("outrigger.health.a".into(), "unknown".into()),
                (
                    "outrigger.health.b".into(),
                    "unhealthy: redis: connection refused".into()
                ),
            ]
        );
    }
}
