//! Each log sink's state as `/ready` and `/status` show it: `pending` (no attempt yet: nothing
//! was sent to it since the agent started), `up` (its last attempt was answered), `retrying` (failing, for less than `logs.batch.retry_max`), `down` (failing for
//! longer: the backoff has reached its cap), with the time it started failing, the failed
//! attempts since and the last error. Written by the log agent after every attempt, read by
//! the admin API; a sink's state never changes readiness (see `docs/logs.md`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// The sinks' states, shared by the log agent and the admin API.
#[derive(Clone, Default)]
pub struct SinkStates(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    /// A sink failing this long is `down` (`logs.batch.retry_max`).
    down_after: Duration,
    sinks: BTreeMap<String, Tracked>,
}

#[derive(Clone, Default)]
struct Tracked {
    /// An attempt was made (answered or not).
    tried: bool,
    /// When the current run of failed attempts began (None: the last attempt was answered).
    failing_since: Option<SystemTime>,
    failures: u64,
    last_error: Option<String>,
    last_ok: Option<SystemTime>,
}

/// One sink's state as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SinkReport {
    /// `pending`, `up`, `retrying` or `down`.
    pub state: &'static str,
    /// Failing since (RFC 3339), when not up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Failed attempts since then.
    #[serde(skip_serializing_if = "is_zero")]
    pub failed_attempts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The last answered attempt (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The longest error kept for the report.
const MAX_ERROR: usize = 512;

impl SinkStates {
    /// Starts tracking `sinks` (all `pending`), forgetting any earlier ones.
    pub fn reset<'a>(&self, sinks: impl IntoIterator<Item = &'a str>, down_after: Duration) {
        let mut inner = self.0.lock().expect("not poisoned");
        inner.down_after = down_after;
        inner.sinks = sinks
            .into_iter()
            .map(|s| (s.to_string(), Tracked::default()))
            .collect();
    }

    /// The sink answered an attempt (took the batch, or refused it for good).
    pub fn answered(&self, sink: &str) {
        let mut inner = self.0.lock().expect("not poisoned");
        let t = inner.sinks.entry(sink.to_string()).or_default();
        *t = Tracked {
            tried: true,
            last_ok: Some(SystemTime::now()),
            ..Tracked::default()
        };
    }

    /// An attempt failed (no answer, a connection or TLS error, a 5xx…).
    pub fn failed(&self, sink: &str, error: &str) {
        let mut inner = self.0.lock().expect("not poisoned");
        let t = inner.sinks.entry(sink.to_string()).or_default();
        t.tried = true;
        t.failing_since.get_or_insert_with(SystemTime::now);
        t.failures += 1;
        let mut cut = error.len().min(MAX_ERROR);
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        t.last_error = Some(error[..cut].to_string());
    }

    /// Every sink's state now, by name (empty without a log agent).
    pub fn report(&self) -> BTreeMap<String, SinkReport> {
        let inner = self.0.lock().expect("not poisoned");
        let now = SystemTime::now();
        let stamp = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        inner
            .sinks
            .iter()
            .map(|(name, t)| {
                let state = match t.failing_since {
                    None if !t.tried => "pending",
                    None => "up",
                    Some(since)
                        if now.duration_since(since).unwrap_or_default() >= inner.down_after =>
                    {
                        "down"
                    }
                    Some(_) => "retrying",
                };
                let report = SinkReport {
                    state,
                    since: t.failing_since.map(stamp),
                    failed_attempts: t.failures,
                    last_error: t.last_error.clone(),
                    last_success: t.last_ok.map(stamp),
                };
                (name.clone(), report)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_is_up_then_retrying_then_down_then_up_again() {
        let s = SinkStates::default();
        s.reset(["http"], Duration::from_secs(3600));
        assert_eq!(s.report()["http"].state, "pending");
        s.failed("http", "connection refused");
        s.failed("http", "answered 503");
        let r = &s.report()["http"];
        assert_eq!(r.state, "retrying");
        assert_eq!(r.failed_attempts, 2);
        assert_eq!(r.last_error.as_deref(), Some("answered 503"));
        assert!(r.since.is_some());
        s.reset(["http"], Duration::ZERO);
        s.failed("http", "x");
        assert_eq!(s.report()["http"].state, "down");
        s.answered("http");
        let r = &s.report()["http"];
        assert_eq!((r.state, r.failed_attempts), ("up", 0));
        assert!(r.last_success.is_some() && r.since.is_none());
    }
}
