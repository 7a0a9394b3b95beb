//! Listener generations and what a reload rebuilds.
//!
//! A `Listener` keeps its socket and counters for the sidecar's life; what it serves (routes,
//! clusters, limits, hold, TLS) is a `Serving` generation, swapped whole on a config reload.
//! A connection keeps the generation it was accepted under for its connection-level settings;
//! every HTTP request is handled by the newest one.
//!
//! On reload (`Proxy::apply`) everything is built before anything is swapped. A cluster whose
//! settings did not change is kept, with its pools, endpoints and ejection state
//! (`rebuilds_cluster`); a listener whose settings, clusters and trace sampling did not
//! change keeps its generation, and so its limiters' state (`rebuilds_listener`). In: the
//! running generations and the new [`Config`]. Out: new generations swapped in, replaced
//! clusters and TLS material retired.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;

use super::cluster::{Cluster, first_discovery};
use super::listener::Bound;
use super::unread_streams::StreamExecutor;
use super::{Proxy, http, route};
use crate::config::Config;
use crate::config::proxy::{
    APP_CLUSTER, ClusterConfig, Limits, ListenerConfig, MatchConfig, RouteConfig,
};
use crate::config::proxy::{Direction, Http2Server, Protocol};
use crate::runtime::AppGate;
use crate::telemetry::metrics::{FlowLabels, GuardLabels, ListenerLabels, Name, ProxyMetrics};
use crate::telemetry::record::Recorder;

/// What a listener does with a connection.
pub(super) enum Kind {
    Http(Arc<http::HttpListener>, Box<auto::Builder<StreamExecutor>>),
    Tcp(Arc<Cluster>),
}

/// A bound listener. The socket and counters stay for the sidecar's life; what it serves
/// (routes, clusters, limits) is swapped whole on a config reload.
pub(super) struct Listener {
    pub(super) name: Name,
    pub(super) bound: Bound,
    pub(super) inbound: bool,
    pub(super) serving: ArcSwap<Serving>,
    pub(super) opened: Counter,
    pub(super) closed: Counter,
    /// Connections cut because their client read nothing (`outrigger_client_stalls_total`).
    pub(super) stalled: Counter,
    /// HTTP/2 streams reset because their client read nothing
    /// (`outrigger_client_stream_stalls_total`).
    pub(super) stalled_streams: Counter,
    /// HTTP/2 connections our server closed for abuse, by guard
    /// (`outrigger_client_abuse_closes_total`; a series once a guard closed one).
    pub(super) abuse_closes: Family<GuardLabels, Counter>,
    /// `inbound` or `outbound`, as the metrics' `direction` label.
    pub(super) direction: &'static str,
    /// HTTP connections closed because their client sent no byte
    /// (`outrigger_client_silent_closes_total`).
    pub(super) silent: Counter,
    pub(super) open: Gauge,
    pub(super) received: Counter,
    pub(super) sent: Counter,
}

/// One generation of a listener's config. A connection keeps the generation it was accepted
/// under for its connection-level settings (timeouts, its `max_connections` slot); every HTTP
/// request is routed by the newest one.
pub(super) struct Serving {
    /// The listener's config this was built from (to tell whether a reload changes it).
    pub(super) config: ListenerConfig,
    pub(super) kind: Kind,
    pub(super) limits: Limits,
    pub(super) connections: Arc<Semaphore>,
    /// Inbound: connections and requests wait for the app up to this long.
    pub(super) hold: Option<(AppGate, Duration)>,
    /// TLS termination.
    pub(super) tls: Option<Arc<crate::tls::ServerTls>>,
    /// `http2_server: outrigger`: what our HTTP/2 server announces and enforces on this
    /// generation's connections (None: hyper serves HTTP/2).
    pub(super) h2: Option<super::h2::Settings>,
}

impl Proxy {
    /// Applies a reloaded config: clusters first (kept or built), then each listener's new
    /// generation, then the swap, then retiring what was replaced.
    pub(super) async fn apply(
        &self,
        config: Arc<Config>,
        tls: &crate::tls::Material,
    ) -> Result<(), String> {
        let _one = self.reloading.lock().await;
        // Clusters whose settings did not change are kept, with their pools, endpoints
        // and ejection state; the others are built new.
        let old = self.clusters.lock().expect("not poisoned").clone();
        let mut next = HashMap::new();
        let mut fresh = Vec::new();
        for c in config.clusters.values() {
            match old.get(&c.name) {
                Some(o) if !rebuilds_cluster(&o.config, c) => {
                    next.insert(c.name.clone(), o.clone());
                }
                _ => {
                    let built = tls.clients.get(&c.name).cloned();
                    let n = Cluster::new(c.clone(), self.metrics.clone(), built);
                    fresh.push(n.clone());
                    next.insert(c.name.clone(), n);
                }
            }
        }
        first_discovery(&fresh).await;
        // Everything is built before anything is swapped. A listener whose config and
        // clusters are unchanged keeps its generation (and so its limiters' state).
        let replaced: Vec<&String> = old
            .iter()
            .filter(|(name, c)| next.get(*name).is_none_or(|n| !Arc::ptr_eq(c, n)))
            .map(|(name, _)| name)
            .collect();
        let mut generations = Vec::new();
        for l in &self.listeners {
            let Some(lc) = config.listeners.iter().find(|c| *c.name == **l.name) else {
                continue;
            };
            let current = l.serving.load_full();
            let sample_changed = match &current.kind {
                Kind::Http(h, _) => h.sample != config.telemetry.tracing.sample,
                Kind::Tcp(_) => false,
            };
            if !rebuilds_listener(&current.config, lc, &replaced, sample_changed) {
                if let Some(t) = &current.tls {
                    // SIGHUP takes new certificates even when the config is unchanged.
                    t.adopt(tls.servers.get(&*l.name));
                }
                continue;
            }
            let build = Build {
                config: &config,
                clusters: &next,
                tls,
                metrics: &self.metrics,
                gate: &self.gate,
                recorder: self.recorder.as_ref(),
                peers: self.peers.as_ref(),
            };
            let serving =
                build_serving(lc, &build, Some(&current)).map_err(|e| format!("{e:#}"))?;
            generations.push((l, serving));
        }
        let swapped = generations.len();
        for (l, serving) in generations {
            let old = l.serving.swap(Arc::new(serving));
            let new = l.serving.load();
            if let Some(t) = &old.tls
                && !new.tls.as_ref().is_some_and(|n| Arc::ptr_eq(n, t))
            {
                t.retire();
            }
        }
        for name in replaced {
            // Its discovery stops and it no longer reports; connections that still hold
            // it finish their requests.
            old[name].retire();
            if next.get(name).is_none_or(|n| n.config.tls.is_none()) {
                self.metrics.tls.untrack(&format!("cluster/{name}"));
            }
        }
        for (name, c) in &next {
            if old.get(name).is_some_and(|o| Arc::ptr_eq(o, c)) {
                // Kept: SIGHUP and config reloads take its TLS files' new content, if any.
                c.adopt_tls(tls.clients.get(name));
            }
        }
        if let Some(p) = &self.peers {
            // The mesh's peers: their shared material, from the identity files.
            let _ = crate::tls::Reloadable::reload_files(p.as_ref());
        }
        for c in &fresh {
            tokio::spawn(Cluster::discover(Arc::downgrade(c)));
            c.export_endpoint_count();
        }
        tracing::debug!(listeners_changed = swapped, "listeners swapped");
        let (kept, built) = (next.len() - fresh.len(), fresh.len());
        *self.clusters.lock().expect("not poisoned") = next;
        tracing::info!(
            clusters_kept = kept,
            clusters_new = built,
            "proxy config applied"
        );
        Ok(())
    }
}

/// What building a listener's generation takes besides the listener's own config.
pub(super) struct Build<'a> {
    pub config: &'a Config,
    /// The clusters of `config`, by name.
    pub clusters: &'a HashMap<String, Arc<Cluster>>,
    /// What preflight built for `config` (listeners' TLS material).
    pub tls: &'a crate::tls::Material,
    pub metrics: &'a ProxyMetrics,
    pub gate: &'a AppGate,
    pub recorder: Option<&'a Recorder>,
    /// `mesh:`: outbound listeners route hosts that name no cluster to the mesh's peers.
    pub peers: Option<&'a Arc<super::cluster::name_resolution::NameResolution>>,
}

pub(super) fn build_listener(l: &ListenerConfig, bound: Bound, b: &Build<'_>) -> Result<Listener> {
    let metrics = b.metrics;
    let name: Name = Arc::new(l.name.clone());
    let direction = l.direction.label();
    let labels = ListenerLabels {
        direction,
        listener: name.clone(),
    };
    let flow = |flow| {
        metrics
            .bytes
            .get_or_create(&FlowLabels {
                direction,
                listener: name.clone(),
                flow,
            })
            .clone()
    };
    let serving = build_serving(l, b, None)?;
    Ok(Listener {
        opened: metrics.connections_opened.get_or_create(&labels).clone(),
        closed: metrics.connections_closed.get_or_create(&labels).clone(),
        stalled: metrics.client_stalls.get_or_create(&labels).clone(),
        stalled_streams: metrics.client_stream_stalls.get_or_create(&labels).clone(),
        abuse_closes: metrics.client_abuse_closes.clone(),
        direction,
        silent: metrics.client_silent.get_or_create(&labels).clone(),
        open: metrics.connections_open.get_or_create(&labels).clone(),
        received: flow("received"),
        sent: flow("sent"),
        inbound: l.direction == Direction::Inbound,
        serving: ArcSwap::from_pointee(serving),
        bound,
        name,
    })
}

/// What a listener serves: its routes (or tcp cluster), limits, hold and TLS.
fn build_serving(l: &ListenerConfig, b: &Build<'_>, previous: Option<&Serving>) -> Result<Serving> {
    let Build {
        config,
        clusters,
        tls: material,
        metrics,
        gate,
        recorder,
        peers,
    } = *b;
    let name: Name = Arc::new(l.name.clone());
    let direction = l.direction.label();
    let hold = (l.direction == Direction::Inbound)
        .then(|| (gate.clone(), config.app.lifecycle.hold_timeout.get()));
    let kind = match l.protocol {
        Protocol::Tcp => {
            let name = l.cluster.as_deref().unwrap_or(APP_CLUSTER);
            // Validation guarantees the cluster; say so plainly if that ever breaks.
            let cluster = clusters
                .get(name)
                .with_context(|| format!("listener `{}`: no cluster `{name}`", l.name))?;
            Kind::Tcp(cluster.clone())
        }
        Protocol::Http => {
            let mut routes = l.routes.clone();
            if l.direction == Direction::Inbound {
                // What no route takes goes to the app.
                routes.push(RouteConfig {
                    name: "default".into(),
                    matches: MatchConfig::default(),
                    cluster: APP_CLUSTER.into(),
                    timeout: None,
                    retry: None,
                    request_headers: Default::default(),
                    response_headers: Default::default(),
                    rewrite_path_prefix: None,
                    authz: None,
                });
            }
            let router = route::Router::new(
                direction,
                &name,
                &routes,
                clusters,
                l.direction == Direction::Outbound,
                metrics,
            )
            .with_peers(
                peers
                    .filter(|_| l.direction == Direction::Outbound)
                    .cloned(),
            );
            let mut state = http::HttpListener::new(
                name.clone(),
                l.direction,
                router,
                &l.limits,
                metrics,
                hold.clone(),
                previous.and_then(|p| match &p.kind {
                    Kind::Http(h, _) => Some(&**h),
                    Kind::Tcp(_) => None,
                }),
                l.authz.clone(),
            );
            state.sample = config.telemetry.tracing.sample;
            state.recorder = recorder.cloned();
            state.supervised = config.app.command.is_some();
            let state = Arc::new(state);
            Kind::Http(state, Box::new(server_builder(&l.limits)))
        }
    };
    // An unchanged cap keeps its semaphore, so connections from before a reload still count.
    let connections = match previous {
        Some(p) if p.limits.max_connections == l.limits.max_connections => p.connections.clone(),
        _ => Arc::new(Semaphore::new(l.limits.max_connections)),
    };
    // The same TLS settings keep their material holder (taking the files' new content, as
    // SIGHUP asks); other settings get a new one, with what preflight built.
    let tls = match (&l.tls, previous.and_then(|p| p.tls.as_ref())) {
        (Some(c), Some(prev)) if prev.config == *c => {
            // A no-op unless the files changed (session tickets survive a reload).
            prev.adopt(material.servers.get(&l.name));
            Some(prev.clone())
        }
        (Some(c), _) => Some(
            crate::tls::ServerTls::new(
                &l.name,
                c.clone(),
                material.servers.get(&l.name).cloned(),
                metrics.tls.clone(),
            )
            .map_err(|e| anyhow::anyhow!("listener `{}`: {e}", l.name))?,
        ),
        (None, prev) => {
            if prev.is_some() {
                metrics.tls.untrack(&format!("listener/{}", l.name));
            }
            None
        }
    };
    let h2 =
        (l.protocol == Protocol::Http && l.http2_server == Http2Server::Outrigger).then(|| {
            let stalled = metrics
                .client_stream_stalls
                .get_or_create(&ListenerLabels {
                    direction,
                    listener: name.clone(),
                })
                .clone();
            h2_settings(&l.limits, stalled)
        });
    Ok(Serving {
        h2,
        config: l.clone(),
        kind,
        connections,
        limits: l.limits.clone(),
        hold,
        tls,
    })
}

fn server_builder(limits: &Limits) -> auto::Builder<StreamExecutor> {
    // HTTP/2 stream tasks that can be ended when their client reads nothing.
    let mut b = auto::Builder::new(StreamExecutor);
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // Slowloris: the whole request head within this time.
        .header_read_timeout(limits.header_read_timeout.get())
        // Heads larger than the buffer are answered 431.
        .max_buf_size(limits.max_header_bytes.max(8192));
    // No server pings: they would count as activity and keep idle HTTP/2 connections open
    // forever; the idle timeout closes connections to dead peers instead.
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(limits.max_header_bytes as u32);
    b
}

/// What our own HTTP/2 server (`http2_server: outrigger`) announces and enforces: the same
/// limits as hyper's server above (streams, header list size), hyper's default windows and
/// frame size, and the idle timeout for a stream whose client reads nothing of its response
/// (reset and counted in `outrigger_client_stream_stalls_total`, as `unread_streams` does on
/// hyper's path).
fn h2_settings(limits: &Limits, stalled_streams: Counter) -> super::h2::Settings {
    super::h2::Settings {
        max_concurrent_streams: MAX_STREAMS_PER_CONNECTION,
        max_header_list_size: limits.max_header_bytes as u32,
        initial_window_size: H2_STREAM_WINDOW,
        connection_window_size: H2_CONNECTION_WINDOW,
        max_frame_size: H2_MAX_FRAME_SIZE,
        stalled_stream_timeout: limits.idle_timeout.get(),
        on_stalled_stream: Some(Arc::new(move || {
            stalled_streams.inc();
        })),
    }
}

/// A request stream's receive window on our HTTP/2 server: hyper's server default (1 MiB), so
/// that an upload is not slower than on hyper's; a client cannot make us buffer more than this
/// per stream.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// The connection's receive window: hyper's server default (1 MiB) too.
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// The largest frame we accept: RFC 9113's initial value (and hyper's), 16 KiB.
const H2_MAX_FRAME_SIZE: u32 = 16 * 1024;

/// Concurrent HTTP/2 streams one downstream connection may open (hyper's default is 200).
/// Each in-flight stream can hold an upstream connection; 100 is what RFC 9113 asks a peer to
/// allow at least, nginx's 128 and Envoy's recommended value are alike. A listener's total is
/// then at most `max_connections` × 100 (or `max_requests_in_flight`).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// Whether a reload builds a cluster anew (new pools, endpoints and ejection state) instead
/// of keeping the running one: its settings changed.
pub(super) fn rebuilds_cluster(old: &ClusterConfig, new: &ClusterConfig) -> bool {
    !same(old, new)
}

/// Whether a reload gives a listener a new generation: its settings changed, it sends to a
/// cluster the reload replaced, or (HTTP) the trace sample rate changed.
pub(super) fn rebuilds_listener(
    current: &ListenerConfig,
    next: &ListenerConfig,
    replaced: &[&String],
    sample_changed: bool,
) -> bool {
    let uses_replaced = replaced.iter().any(|r| uses_cluster(current, r));
    !same(current, next) || uses_replaced || sample_changed
}

/// Whether two configs are the same (they hold regexes and durations; comparing their
/// serialized forms is simplest and reload is rare).
fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    matches!((serde_json::to_value(a), serde_json::to_value(b)), (Ok(x), Ok(y)) if x == y)
}

/// Whether a listener sends traffic to `cluster` (outbound listeners route by Host to every
/// cluster).
fn uses_cluster(l: &ListenerConfig, cluster: &str) -> bool {
    match (l.protocol, l.direction) {
        (Protocol::Tcp, _) => l.cluster.as_deref().unwrap_or(APP_CLUSTER) == cluster,
        (Protocol::Http, Direction::Outbound) => true,
        (Protocol::Http, Direction::Inbound) => {
            cluster == APP_CLUSTER || l.routes.iter().any(|r| r.cluster == cluster)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use super::*;

    const BASE: &str = "\
app:
  address: 127.0.0.1:8080
listeners:
  - name: in
    address: 127.0.0.1:0
    routes:
      - match: { path_prefix: /pay }
        cluster: payments
  - name: out
    address: 127.0.0.1:0
    direction: outbound
  - name: db
    address: 127.0.0.1:0
    protocol: tcp
    cluster: postgres
clusters:
  payments:
    endpoints: [127.0.0.1:1001]
  billing:
    endpoints: [127.0.0.1:1002]
  postgres:
    endpoints: [127.0.0.1:5432]
";

    fn load(text: &str) -> Config {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let source = crate::config::Source {
            file: Some(f.path().to_path_buf()),
            sets: Vec::new(),
            app_command: None,
        };
        crate::config::load(&source, &BTreeMap::<String, String>::new()).unwrap()
    }

    /// What reloading `before` with `after` rebuilds: (clusters, listeners), in config order.
    fn rebuilt(before: &Config, after: &Config) -> (Vec<String>, Vec<String>) {
        let replaced: Vec<&String> = before
            .clusters
            .iter()
            .filter(|(name, c)| {
                after
                    .clusters
                    .get(*name)
                    .is_none_or(|n| rebuilds_cluster(c, n))
            })
            .map(|(name, _)| name)
            .collect();
        let listeners = before
            .listeners
            .iter()
            .filter(|l| {
                let next = after.listeners.iter().find(|n| n.name == l.name).unwrap();
                rebuilds_listener(l, next, &replaced, false)
            })
            .map(|l| l.name.clone())
            .collect();
        (replaced.into_iter().cloned().collect(), listeners)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_unchanged_config_rebuilds_nothing() {
        let c = load(BASE);
        assert_eq!(rebuilt(&c, &load(BASE)), (vec![], vec![]));
    }

    #[test]
    fn a_changed_cluster_rebuilds_the_listeners_that_send_to_it() {
        let before = load(BASE);
        // Only outbound (which reaches every cluster by Host) sends to billing.
        let after = load(&BASE.replace("127.0.0.1:1002", "127.0.0.1:2002"));
        assert_eq!(
            rebuilt(&before, &after),
            (names(&["billing"]), names(&["out"]))
        );
        // payments: the inbound route and outbound.
        let after = load(&BASE.replace("127.0.0.1:1001", "127.0.0.1:2001"));
        assert_eq!(
            rebuilt(&before, &after),
            (names(&["payments"]), names(&["in", "out"]))
        );
        // postgres: the tcp listener and outbound.
        let after = load(&BASE.replace("127.0.0.1:5432", "127.0.0.1:6432"));
        assert_eq!(
            rebuilt(&before, &after),
            (names(&["postgres"]), names(&["out", "db"]))
        );
        // The app cluster: inbound (its default route) and outbound.
        let after = load(&BASE.replace("127.0.0.1:8080", "127.0.0.1:9090"));
        assert_eq!(
            rebuilt(&before, &after),
            (names(&["app"]), names(&["in", "out"]))
        );
    }

    #[test]
    fn a_changed_listener_rebuilds_only_itself() {
        let before = load(BASE);
        let after = load(&BASE.replace(
            "        cluster: payments\n",
            "        cluster: payments\n        timeout: 3s\n",
        ));
        assert_eq!(rebuilt(&before, &after), (vec![], names(&["in"])));
        let after = load(&BASE.replace(
            "    direction: outbound\n",
            "    direction: outbound\n    limits: { max_requests_in_flight: 10 }\n",
        ));
        assert_eq!(rebuilt(&before, &after), (vec![], names(&["out"])));
    }

    #[test]
    fn a_changed_sample_rate_rebuilds_the_listener() {
        let c = load(BASE);
        assert!(rebuilds_listener(
            &c.listeners[0],
            &c.listeners[0],
            &[],
            true
        ));
        assert!(!rebuilds_listener(
            &c.listeners[0],
            &c.listeners[0],
            &[],
            false
        ));
    }

    #[test]
    fn which_listeners_use_which_cluster() {
        let c = load(BASE);
        let by_name = |n: &str| c.listeners.iter().find(|l| l.name == n).unwrap();
        assert!(uses_cluster(by_name("in"), "payments"));
        assert!(uses_cluster(by_name("in"), APP_CLUSTER));
        assert!(!uses_cluster(by_name("in"), "billing"));
        assert!(uses_cluster(by_name("out"), "billing"));
        assert!(uses_cluster(by_name("db"), "postgres"));
        assert!(!uses_cluster(by_name("db"), APP_CLUSTER));
    }
}
