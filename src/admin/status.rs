//! `GET /status`: the sidecar's state in one JSON document, for the dashboard page (`GET /`)
//! and for scripts. `docs/admin.md` lists every field; names are stable.
//!
//! In: what the modules already keep — the readiness report, the running config (through its
//! serialization, so whatever `/config` redacts stays redacted), each cluster's endpoints, the
//! loaded certificates, the bridge's components and subscriptions, the log agent's gauges, the
//! last reload — and one encoding of the registry ([`Snapshot`]), read only when asked.
//! Out: the document, and a nudge to the history sampler ([`History::watched`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::AdminState;
use super::history::History;
use super::scrape::Snapshot;
use crate::runtime::health::State;
use crate::telemetry::metrics::{LogsMetrics, RuntimeMetrics, unix_now};
use crate::telemetry::tls::TlsMetrics;

/// What `/status` reads besides the admin state: handles the modules already keep.
pub struct Sources {
    /// Unix time the sidecar started.
    pub started_at: f64,
    /// Bound addresses by listener name (port 0 resolved).
    pub bound: BTreeMap<String, String>,
    /// The bridge's bound HTTP address.
    pub bridge_address: Option<String>,
    pub runtime: RuntimeMetrics,
    pub tls: TlsMetrics,
    pub logs: LogsMetrics,
    #[cfg(feature = "proxy")]
    pub proxy: Option<Arc<crate::proxy::Proxy>>,
    #[cfg(feature = "bridge")]
    pub bridge: Option<Arc<crate::bridge::BridgeState>>,
    pub history: Arc<History>,
}

impl Sources {
    /// Sources with nothing running (tests of the admin router).
    pub fn empty() -> Sources {
        Sources {
            started_at: unix_now(),
            bound: BTreeMap::new(),
            bridge_address: None,
            runtime: RuntimeMetrics::default(),
            tls: TlsMetrics::default(),
            logs: LogsMetrics::default(),
            #[cfg(feature = "proxy")]
            proxy: None,
            #[cfg(feature = "bridge")]
            bridge: None,
            history: Arc::default(),
        }
    }
}

/// Whole seconds left of a certificate below which it shows as `expiring`.
fn cert_state(seconds_left: f64, warning: f64) -> &'static str {
    if seconds_left <= 0.0 {
        "expired"
    } else if seconds_left < warning {
        "expiring"
    } else {
        "ok"
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Builds the `/status` document.
pub fn status(s: &AdminState) -> Value {
    let src = &s.sources;
    src.history.watched(&s.registry);
    let now = unix_now();
    let metrics = Snapshot::parse(&crate::telemetry::metrics::encode(&s.registry, false));
    let config = s.config.config.load_full();
    // Serialized as `/config` shows it: its redaction applies here too.
    let shown = serde_json::to_value(&*config).unwrap_or_default();
    let report = s.health.report();

    let module = |name: &str, compiled: bool, configured: bool| {
        let c = report.components.get(name);
        json!({
            "name": name,
            "compiled": compiled,
            "configured": configured,
            "state": match (compiled && configured, c) {
                (false, _) => "off",
                (true, Some(c)) => c.state.as_str(),
                (true, None) => "starting",
            },
            "restarts": c.map_or(0, |c| c.restarts),
            "detail": c.and_then(|c| c.detail.clone()),
        })
    };
    let modules = json!([
        module(
            "proxy",
            cfg!(feature = "proxy"),
            !config.listeners.is_empty()
        ),
        module("bridge", cfg!(feature = "bridge"), config.bridge.is_some()),
        module("logs", cfg!(feature = "logs"), config.logs.is_some()),
    ]);

    let app = report.components.get("app");
    let app = json!({
        "configured": app.is_some(),
        "supervised": config.app.command.is_some(),
        "state": app.map_or("off", |a| a.state.as_str()),
        "ready": app.is_some_and(|a| a.state == State::Ready),
        "detail": app.and_then(|a| a.detail.clone()),
        "restarts": src.runtime.app_restarts.get(),
        "probe_failures": src.runtime.app_probe_failures.get(),
        "address": shown["app"]["address"],
        "command": shown["app"]["command"],
        "probe": shown["app"]["probe"],
    });

    let listeners: Vec<Value> = shown["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let name = l["name"].as_str().unwrap_or_default();
            json!({
                "name": name,
                "address": src.bound.get(name).cloned().unwrap_or_else(|| l["address"].as_str().unwrap_or_default().to_string()),
                "direction": l["direction"],
                "protocol": l["protocol"],
                "tls": !l["tls"].is_null(),
                "connections_open": metrics.connections_open.get(name).copied().unwrap_or(0.0),
            })
        })
        .collect();

    let routes: Vec<Value> = metrics
        .routes
        .iter()
        .filter(|(_, r)| r.requests > 0.0)
        .map(|(k, r)| {
            json!({
                "direction": k.direction, "listener": k.listener, "route": k.route,
                "cluster": k.cluster, "requests": r.requests, "responses": r.responses,
                "errors_5xx": r.errors, "by_class": r.by_class,
            })
        })
        .collect();

    #[cfg(feature = "proxy")]
    let endpoints = src
        .proxy
        .as_ref()
        .map(|p| p.cluster_status())
        .unwrap_or_default();
    #[cfg(not(feature = "proxy"))]
    let endpoints: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    // The config's clusters, then the mesh's peers resolved so far (made on demand, named
    // `peer:ID.NAMESPACE`), with the settings they run with.
    #[cfg(feature = "proxy")]
    let peers: Vec<(String, Value, bool)> = src
        .proxy
        .as_ref()
        .and_then(|p| p.peers())
        .map(|r| r.clusters())
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            let lb = serde_json::to_value(c.config.lb).unwrap_or(Value::Null);
            (c.name.to_string(), lb, c.config.tls.is_some())
        })
        .collect();
    #[cfg(not(feature = "proxy"))]
    let peers: Vec<(String, Value, bool)> = Vec::new();
    let declared = config.clusters.values().map(|c| {
        (
            c.name.clone(),
            shown["clusters"][&c.name]["lb"].clone(),
            c.tls.is_some(),
        )
    });
    let clusters: Vec<Value> = declared
        .chain(peers)
        .map(|(name, lb, tls)| {
            let mut latency = crate::admin::scrape::Buckets::default();
            for (k, b) in &metrics.latency {
                if k.cluster == name {
                    merge(&mut latency, b);
                }
            }
            let endpoints: Vec<Value> = endpoints
                .get(&name)
                .into_iter()
                .flatten()
                .map(endpoint_json)
                .collect();
            json!({
                "name": name,
                "lb": lb,
                "tls": tls,
                "endpoints": endpoints,
                "latency": {
                    "count": latency.count,
                    "p50_ms": latency.quantile(0.5).map(|v| round(v * 1000.0, 3)),
                    "p95_ms": latency.quantile(0.95).map(|v| round(v * 1000.0, 3)),
                    "p99_ms": latency.quantile(0.99).map(|v| round(v * 1000.0, 3)),
                },
            })
        })
        .collect();

    let warning = config.tls.expiry_warning.get().as_secs_f64();
    let certificates: Vec<Value> = src
        .tls
        .certificates()
        .into_iter()
        .map(|c| {
            let left = c.not_after as f64 - now;
            json!({
                "owner": c.owner, "path": c.path, "identities": c.identities,
                "not_after": c.not_after, "days_left": round(left / 86_400.0, 2),
                "state": cert_state(left, warning),
            })
        })
        .collect();

    let errors: Vec<Value> = metrics
        .errors
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(k, n)| {
            json!({
                "direction": k.route.direction, "listener": k.route.listener,
                "route": k.route.route, "cluster": k.route.cluster,
                "class": k.class, "error": k.error, "count": n,
            })
        })
        .collect();

    let last_reload = s.config.last_reload.lock().expect("not poisoned").clone();
    let reload_entries: Vec<Value> = config
        .reload
        .iter()
        .map(|r| {
            let get = |result: &str| {
                metrics
                    .reload_actions
                    .get(&(r.name.clone(), result.to_string()))
                    .copied()
                    .unwrap_or(0.0)
            };
            json!({ "name": r.name, "actions_succeeded": get("success"), "actions_failed": get("failure") })
        })
        .collect();

    json!({
        "service": config.service,
        "version": env!("CARGO_PKG_VERSION"),
        "features": crate::FEATURES,
        "now": round(now, 3),
        "uptime_seconds": round(now - src.started_at, 3),
        "ready": report.ready,
        "draining": report.draining,
        "modules": modules,
        "app": app,
        "listeners": listeners,
        "routes": routes,
        "clusters": clusters,
        "tls": {
            "expiry_warning_seconds": warning,
            "certificates": certificates,
        },
        "bridge": bridge_json(s, &metrics),
        "logs": logs_json(s, &metrics),
        "reload": {
            "last": last_reload,
            "config_reloads": metrics.config_reloads,
            "entries": reload_entries,
        },
        "errors": {
            "totals": errors,
            "recent": src.history.recent_errors_json(),
        },
        "process": {
            "cpu_seconds": metrics.cpu_seconds,
            "resident_memory_bytes": metrics.resident_bytes,
        },
        "history": src.history.history_json(),
        "links": { "metrics": "/metrics", "config": "/config", "ready": "/ready" },
    })
}

fn merge(into: &mut crate::admin::scrape::Buckets, b: &crate::admin::scrape::Buckets) {
    if into.le.is_empty() {
        *into = b.clone();
        return;
    }
    if into.le.len() == b.le.len() {
        for (a, x) in into.le.iter_mut().zip(&b.le) {
            a.1 += x.1;
        }
        into.count += b.count;
        into.sum += b.sum;
    }
}

#[cfg(feature = "proxy")]
fn endpoint_json(e: &crate::proxy::cluster::EndpointStatus) -> Value {
    json!({
        "address": e.address,
        "state": if e.ejected_for_ms > 0 { "ejected" } else { "healthy" },
        "ejected_for_ms": e.ejected_for_ms,
        "in_flight": e.in_flight,
        "consecutive_failures": e.consecutive_failures,
        "ewma_ms": round(e.ewma_seconds * 1000.0, 3),
    })
}

#[cfg(not(feature = "proxy"))]
fn endpoint_json(e: &Value) -> Value {
    e.clone()
}

#[cfg(feature = "bridge")]
fn bridge_json(s: &AdminState, metrics: &Snapshot) -> Value {
    let Some(b) = &s.sources.bridge else {
        return json!({ "compiled": true, "enabled": false });
    };
    let components: Vec<Value> = crate::bridge::ops::components(b)
        .into_iter()
        .map(|c| json!({ "name": c.name, "type": c.kind, "version": c.version, "state": "ok" }))
        .chain(b.skipped.iter().map(|c| {
            json!({ "name": c.name, "type": c.kind, "state": "failed", "location": c.location, "error": c.error })
        }))
        .collect();
    let subscriptions: Vec<Value> = b
        .pubsub
        .subscriptions_json()
        .as_array()
        .into_iter()
        .flatten()
        .map(|sub| {
            let pubsub = sub["pubsubname"].as_str().unwrap_or_default();
            let topic = sub["topic"].as_str().unwrap_or_default();
            let delivered: BTreeMap<&str, f64> = ["success", "retry", "drop", "dead_letter"]
                .into_iter()
                .map(|r| {
                    let key = (pubsub.to_string(), topic.to_string(), r.to_string());
                    (r, metrics.deliveries.get(&key).copied().unwrap_or(0.0))
                })
                .collect();
            json!({
                "pubsub": pubsub, "topic": topic, "type": sub["type"],
                "dead_letter_topic": sub["deadLetterTopic"], "delivered": delivered,
            })
        })
        .collect();
    json!({
        "compiled": true,
        "enabled": true,
        "address": s.sources.bridge_address,
        "ready": crate::bridge::ops::ready(b),
        "app_id": b.config.app_id,
        "components": components,
        "subscriptions": subscriptions,
    })
}

#[cfg(not(feature = "bridge"))]
fn bridge_json(_: &AdminState, _: &Snapshot) -> Value {
    json!({ "compiled": false, "enabled": false })
}

fn logs_json(s: &AdminState, metrics: &Snapshot) -> Value {
    let config = s.config.config.load();
    let Some(logs) = config.logs.as_ref().filter(|_| cfg!(feature = "logs")) else {
        return json!({ "compiled": cfg!(feature = "logs"), "enabled": false });
    };
    let m = &s.sources.logs;
    let buffered = m.app_buffer.get().max(0) as f64;
    let capacity = logs.app_buffer as f64;
    json!({
        "compiled": true,
        "enabled": true,
        "checkpoint_lag_bytes": m.checkpoint_lag.get(),
        "app_buffer_bytes": buffered,
        "app_buffer_capacity_bytes": capacity,
        "app_buffer_fill": if capacity > 0.0 { round(buffered / capacity, 4) } else { 0.0 },
        "read_lines": metrics.logs_read,
        "shipped_lines": metrics.logs_shipped,
        "dropped_lines": metrics.logs_dropped,
        "sinks": m.sinks.report(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_states() {
        assert_eq!(cert_state(-1.0, 100.0), "expired");
        assert_eq!(cert_state(50.0, 100.0), "expiring");
        assert_eq!(cert_state(500.0, 100.0), "ok");
    }
}
