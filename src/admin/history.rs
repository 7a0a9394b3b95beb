//! The dashboard's memory: one sample a second of request rate, error rate and latency
//! percentiles per route and cluster, and the errors Outrigger answered itself, in bounded
//! rings ([`CAPACITY`] samples, [`RECENT_ERRORS`] error events).
//!
//! In: the registry, read by one sampler task ([`History::watched`] starts it) through
//! [`Snapshot`]. Out: the `history` and `errors.recent` parts of `GET /status`. Nothing runs
//! until the first `/status` request, and the sampler stops [`IDLE_STOP`] after the last one:
//! the data path keeps only the counters it already had. History therefore starts when someone
//! first looks; samples taken before a pause stay (with their times) until pushed out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use super::scrape::{ErrorKey, LatencyKey, RouteKey, Snapshot};
use crate::telemetry::metrics::unix_now;

/// Samples kept: five minutes at one a second (a few KiB per route).
pub const CAPACITY: usize = 300;
/// One sample a second: what the page redraws at.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The sampler stops this long after the last `/status` request: the length of the history, so
/// a page reopened within it finds the history whole.
pub const IDLE_STOP: Duration = Duration::from_secs(300);
/// Error events kept (each: when, where, why, how many in that second).
pub const RECENT_ERRORS: usize = 50;

/// One second of traffic.
struct Sample {
    /// Unix time.
    at: f64,
    /// Requests per second and 5xx responses per second, by route.
    routes: BTreeMap<RouteKey, (f64, f64)>,
    /// Responses per second and p50/p95/p99 latency (seconds) by cluster.
    clusters: BTreeMap<LatencyKey, (f64, [Option<f64>; 3])>,
    /// Process CPU use (fraction of one core) and resident memory (bytes).
    cpu: f64,
    rss: f64,
}

/// Errors Outrigger answered itself in one second, by route and reason.
struct ErrorEvent {
    at: f64,
    key: ErrorKey,
    count: f64,
}

#[derive(Default)]
struct Inner {
    previous: Option<(f64, Snapshot)>,
    samples: VecDeque<Sample>,
    errors: VecDeque<ErrorEvent>,
    /// Unix time the sampler first ran (history starts there).
    started: Option<f64>,
}

/// The rings and the sampler's switch; shared by the admin handlers.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
    /// Unix milliseconds of the last `/status` request.
    last_watched_ms: AtomicU64,
    running: AtomicBool,
}

fn now_ms() -> u64 {
    (unix_now() * 1000.0) as u64
}

impl History {
    /// Someone looked (`GET /status`): starts the sampler if it is not running.
    pub fn watched(self: &Arc<Self>, registry: &Arc<Registry>) {
        self.last_watched_ms.store(now_ms(), Ordering::Relaxed);
        if !self.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(sampler(self.clone(), registry.clone()));
        }
    }

    /// Whether the sampler runs now (for tests and `/status`).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    fn idle(&self) -> bool {
        now_ms().saturating_sub(self.last_watched_ms.load(Ordering::Relaxed))
            > IDLE_STOP.as_millis() as u64
    }

    /// Takes a sample: rates and percentiles since the previous one.
    pub fn record(&self, now: Snapshot) {
        self.record_at(unix_now(), now)
    }

    fn record_at(&self, at: f64, now: Snapshot) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.started.get_or_insert(at);
        let Some((then_at, then)) = inner.previous.take() else {
            inner.previous = Some((at, now));
            return;
        };
        let dt = at - then_at;
        // A pause (nobody watched) is a gap in the history, not one long sample.
        if dt <= 0.0 || dt > 3.0 * INTERVAL.as_secs_f64() {
            inner.previous = Some((at, now));
            return;
        }
        let routes = now
            .routes
            .iter()
            .map(|(k, c)| {
                let before = then.routes.get(k).cloned().unwrap_or_default();
                let rps = (c.requests - before.requests).max(0.0) / dt;
                let eps = (c.errors - before.errors).max(0.0) / dt;
                (k.clone(), (rps, eps))
            })
            .filter(|(k, _)| now.routes[k].requests > 0.0)
            .collect();
        let clusters = now
            .latency
            .iter()
            .filter(|(_, b)| b.count > 0.0)
            .map(|(k, b)| {
                let d = b.since(then.latency.get(k));
                let q = [0.5, 0.95, 0.99].map(|q| d.quantile(q));
                (k.clone(), (d.count / dt, q))
            })
            .collect();
        for (key, count) in &now.errors {
            let new = count - then.errors.get(key).copied().unwrap_or(0.0);
            if new > 0.0 {
                if inner.errors.len() == RECENT_ERRORS {
                    inner.errors.pop_front();
                }
                inner.errors.push_back(ErrorEvent {
                    at,
                    key: key.clone(),
                    count: new,
                });
            }
        }
        if inner.samples.len() == CAPACITY {
            inner.samples.pop_front();
        }
        inner.samples.push_back(Sample {
            at,
            routes,
            clusters,
            cpu: (now.cpu_seconds - then.cpu_seconds).max(0.0) / dt,
            rss: now.resident_bytes,
        });
        inner.previous = Some((at, now));
    }

    /// The `history` part of `GET /status`: one time axis, and per route and cluster arrays
    /// aligned with it (`null` where a series has no value in a sample).
    pub fn history_json(&self) -> Value {
        let inner = self.inner.lock().expect("not poisoned");
        let t: Vec<f64> = inner.samples.iter().map(|s| round(s.at, 3)).collect();
        let route_keys: BTreeSet<&RouteKey> =
            inner.samples.iter().flat_map(|s| s.routes.keys()).collect();
        let routes: Vec<Value> = route_keys
            .into_iter()
            .map(|k| {
                let get = |i: usize| -> Vec<Value> {
                    inner
                        .samples
                        .iter()
                        .map(|s| {
                            s.routes
                                .get(k)
                                .map_or(Value::Null, |v| json!(round([v.0, v.1][i], 3)))
                        })
                        .collect()
                };
                json!({
                    "direction": k.direction, "listener": k.listener, "route": k.route,
                    "cluster": k.cluster, "rps": get(0), "error_rps": get(1),
                })
            })
            .collect();
        let cluster_keys: BTreeSet<&LatencyKey> = inner
            .samples
            .iter()
            .flat_map(|s| s.clusters.keys())
            .collect();
        let clusters: Vec<Value> = cluster_keys
            .into_iter()
            .map(|k| {
                let rps: Vec<Value> = inner
                    .samples
                    .iter()
                    .map(|s| {
                        s.clusters
                            .get(k)
                            .map_or(Value::Null, |v| json!(round(v.0, 3)))
                    })
                    .collect();
                let q = |i: usize| -> Vec<Value> {
                    inner
                        .samples
                        .iter()
                        .map(|s| {
                            s.clusters
                                .get(k)
                                .and_then(|v| v.1[i])
                                .map_or(Value::Null, |v| json!(round(v * 1000.0, 3)))
                        })
                        .collect()
                };
                json!({
                    "direction": k.direction, "listener": k.listener, "cluster": k.cluster,
                    "rps": rps, "p50_ms": q(0), "p95_ms": q(1), "p99_ms": q(2),
                })
            })
            .collect();
        let cpu: Vec<f64> = inner.samples.iter().map(|s| round(s.cpu, 4)).collect();
        let rss: Vec<f64> = inner.samples.iter().map(|s| s.rss).collect();
        json!({
            "interval_seconds": INTERVAL.as_secs_f64(),
            "capacity": CAPACITY,
            "started_at": inner.started,
            "sampling": self.running(),
            "t": t,
            "routes": routes,
            "clusters": clusters,
            "process": { "cpu_cores": cpu, "resident_memory_bytes": rss },
        })
    }

    /// The last errors Outrigger answered itself, newest first.
    pub fn recent_errors_json(&self) -> Value {
        let inner = self.inner.lock().expect("not poisoned");
        Value::Array(
            inner
                .errors
                .iter()
                .rev()
                .map(|e| {
                    json!({
                        "at": round(e.at, 3),
                        "direction": e.key.route.direction,
                        "listener": e.key.route.listener,
                        "route": e.key.route.route,
                        "cluster": e.key.route.cluster,
                        "class": e.key.class,
                        "error": e.key.error,
                        "count": e.count,
                    })
                })
                .collect(),
        )
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Samples every [`INTERVAL`] until nobody has asked for `/status` for [`IDLE_STOP`].
async fn sampler(history: Arc<History>, registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if history.idle() {
            history.running.store(false, Ordering::Release);
            // A request that came in between the check and the store saw `running` and
            // started nothing: carry on for it.
            if history.idle() || history.running.swap(true, Ordering::AcqRel) {
                tracing::debug!("nobody watches the dashboard: its sampler stops");
                return;
            }
        }
        let text = crate::telemetry::metrics::encode(&registry, false);
        history.record(Snapshot::parse(&text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(requests: f64, errors: f64, cpu: f64) -> Snapshot {
        let text = format!(
            "outrigger_http_requests_total{{direction=\"outbound\",listener=\"l\",route=\"r\",cluster=\"c\"}} {requests}\n\
             outrigger_http_responses_total{{direction=\"outbound\",listener=\"l\",route=\"r\",cluster=\"c\",class=\"5xx\",error=\"connect\"}} {errors}\n\
             outrigger_http_response_latency_seconds_bucket{{direction=\"outbound\",listener=\"l\",cluster=\"c\",le=\"0.01\"}} {requests}\n\
             outrigger_http_response_latency_seconds_bucket{{direction=\"outbound\",listener=\"l\",cluster=\"c\",le=\"+Inf\"}} {requests}\n\
             outrigger_http_response_latency_seconds_count{{direction=\"outbound\",listener=\"l\",cluster=\"c\"}} {requests}\n\
             process_cpu_seconds_total {cpu}\n"
        );
        Snapshot::parse(&text)
    }

    #[test]
    fn rates_errors_and_bounds() {
        let h = History::default();
        h.record_at(100.0, snapshot(0.0, 0.0, 1.0));
        h.record_at(101.0, snapshot(50.0, 5.0, 1.25));
        let j = h.history_json();
        assert_eq!(j["t"], json!([101.0]));
        assert_eq!(j["routes"][0]["rps"], json!([50.0]));
        assert_eq!(j["routes"][0]["error_rps"], json!([5.0]));
        assert_eq!(j["clusters"][0]["p50_ms"], json!([5.0]));
        assert_eq!(j["process"]["cpu_cores"], json!([0.25]));
        let e = h.recent_errors_json();
        assert_eq!(e[0]["error"], "connect");
        assert_eq!(e[0]["count"], 5.0);
        // A pause is a gap, not one long sample.
        h.record_at(200.0, snapshot(60.0, 5.0, 2.0));
        assert_eq!(h.history_json()["t"], json!([101.0]));
        // Bounded: CAPACITY samples, RECENT_ERRORS errors.
        for i in 1..=(CAPACITY + 10) {
            let n = i as f64;
            h.record_at(200.0 + n, snapshot(60.0 + n, 5.0 + n, 2.0));
        }
        let j = h.history_json();
        assert_eq!(j["t"].as_array().unwrap().len(), CAPACITY);
        assert_eq!(j["t"][CAPACITY - 1], json!(200.0 + (CAPACITY + 10) as f64));
        assert_eq!(
            h.recent_errors_json().as_array().unwrap().len(),
            RECENT_ERRORS
        );
    }
}
