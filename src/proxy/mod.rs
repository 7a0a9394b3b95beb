//! The proxy module: inbound listeners forward to the app, outbound listeners give the app one
//! local address through which it reaches every cluster. Built on hyper and hyper-util
//! directly.
//!
//! Connections come in on [`listener::Bound`] sockets (TCP or unix), are served as HTTP/1.1 or
//! HTTP/2 (detected from the h2c preface) by [`http::HttpListener`], or copied opaquely by
//! [`tcp`]; requests leave through a [`cluster::Cluster`]'s endpoint pools.
//!
//! On drain a listener stops accepting, tells every HTTP connection to finish its in-flight
//! requests and close (HTTP/2 GOAWAY), and returns once all are gone; the runtime's grace
//! period bounds the wait.

pub mod authz;
pub mod body;
pub mod cluster;
pub mod failure;
pub mod forward;
pub mod framing;
pub mod headers;
pub mod hold;
pub mod http;
pub mod limits;
pub mod listener;
pub mod respond;
pub mod route;
pub mod tcp;
pub mod upgrade;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::proxy::{APP_CLUSTER, Limits, ListenerConfig, MatchConfig, RouteConfig};
use crate::config::raw::{Direction, Protocol};
use crate::config::{Address, Config};
use crate::runtime::{AppGate, Drain, Module, ModuleContext, ModuleFuture, ReloadFuture};
use crate::telemetry::metrics::{FlowLabels, ListenerLabels, Name, ProxyMetrics};
use crate::telemetry::record::Recorder;
use crate::tls::Reloadable;
use cluster::{Cluster, first_discovery};
use listener::{Activity, Bound, Metered, Peer};

/// What a listener does with a connection.
enum Kind {
    Http(Arc<http::HttpListener>, Box<auto::Builder<TokioExecutor>>),
    Tcp(Arc<Cluster>),
}

/// A bound listener. The socket and counters stay for the sidecar's life; what it serves
/// (routes, clusters, limits) is swapped whole on a config reload.
struct Listener {
    name: Name,
    bound: Bound,
    inbound: bool,
    serving: ArcSwap<Serving>,
    opened: Counter,
    closed: Counter,
    open: Gauge,
    received: Counter,
    sent: Counter,
}

/// One generation of a listener's config. A connection keeps the generation it was accepted
/// under for its connection-level settings (timeouts, its `max_connections` slot); every HTTP
/// request is routed by the newest one.
struct Serving {
    /// The listener's config this was built from (to tell whether a reload changes it).
    config: ListenerConfig,
    kind: Kind,
    limits: Limits,
    connections: Arc<Semaphore>,
    /// Inbound: connections and requests wait for the app up to this long.
    hold: Option<(AppGate, Duration)>,
    /// TLS termination.
    tls: Option<Arc<crate::tls::ServerTls>>,
}

/// A downstream connection's slot: releases the `max_connections` permit and updates the
/// connection gauges when the last holder (the connection, or an upgraded stream spliced from
/// it) is gone, even on a panic.
pub struct ConnectionGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: Gauge,
    closed: Counter,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
        self.closed.inc();
    }
}

/// The proxy module.
pub struct Proxy {
    listeners: Vec<Arc<Listener>>,
    clusters: Mutex<HashMap<String, Arc<Cluster>>>,
    metrics: ProxyMetrics,
    gate: AppGate,
    recorder: Option<Recorder>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Proxy {
    /// Builds the proxy and binds every listener. `None` when no listener is configured.
    /// Returns the bound addresses by listener name.
    pub async fn build(
        config: &Config,
        metrics: &ProxyMetrics,
        gate: AppGate,
    ) -> Result<Option<(Proxy, BTreeMap<String, Address>)>> {
        if config.listeners.is_empty() {
            return Ok(None);
        }
        let clusters: HashMap<String, Arc<Cluster>> = config
            .clusters
            .values()
            .map(|c| (c.name.clone(), Cluster::new(c.clone(), metrics.clone())))
            .collect();
        for c in clusters.values() {
            tokio::spawn(Cluster::discover(Arc::downgrade(c)));
        }
        let log = match &config.telemetry.access_log {
            Some(c) => Some(
                crate::telemetry::access_log::AccessLog::start(
                    c,
                    metrics.access_log_dropped.clone(),
                )
                .with_context(|| format!("cannot open the access log {:?}", c.to))?,
            ),
            None => None,
        };
        let spans = match &config.telemetry.tracing.otlp {
            Some(o) => Some(
                crate::telemetry::otlp::SpanExporter::start(
                    o,
                    &config.service,
                    metrics.spans.clone(),
                )
                .map_err(|e| anyhow::anyhow!("cannot set up span export to {}: {e}", o.endpoint))?,
            ),
            None => None,
        };
        let recorder = (log.is_some() || spans.is_some()).then_some(Recorder { log, spans });
        let mut listeners = Vec::new();
        let mut bound_addresses = BTreeMap::new();
        for l in &config.listeners {
            let bound = Bound::bind(&l.address, l.socket_mode)
                .await
                .with_context(|| format!("cannot bind listener `{}` on {}", l.name, l.address))?;
            let local = bound.local_address()?;
            tracing::info!(listener = %l.name, address = %local, direction = ?l.direction, protocol = ?l.protocol, "listening");
            bound_addresses.insert(l.name.clone(), local);
            listeners.push(Arc::new(build_listener(
                l,
                config,
                bound,
                &clusters,
                metrics,
                &gate,
                recorder.as_ref(),
            )?));
        }
        Ok(Some((
            Proxy {
                listeners,
                clusters: Mutex::new(clusters),
                metrics: metrics.clone(),
                gate,
                recorder,
                reloading: tokio::sync::Mutex::new(()),
            },
            bound_addresses,
        )))
    }

    /// The cluster named `name` as the running config has it (the bridge invokes through it).
    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters
            .lock()
            .expect("not poisoned")
            .get(name)
            .cloned()
    }

    fn clusters(&self) -> Vec<Arc<Cluster>> {
        self.clusters
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }
}

fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

fn build_listener(
    l: &ListenerConfig,
    config: &Config,
    bound: Bound,
    clusters: &HashMap<String, Arc<Cluster>>,
    metrics: &ProxyMetrics,
    gate: &AppGate,
    recorder: Option<&Recorder>,
) -> Result<Listener> {
    let name: Name = Arc::new(l.name.clone());
    let direction = direction_label(l.direction);
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
    let serving = build_serving(l, config, clusters, metrics, gate, None, recorder)?;
    Ok(Listener {
        opened: metrics.connections_opened.get_or_create(&labels).clone(),
        closed: metrics.connections_closed.get_or_create(&labels).clone(),
        open: metrics.connections_open.get_or_create(&labels).clone(),
        received: flow("received"),
        sent: flow("sent"),
        inbound: l.direction == Direction::Inbound,
        serving: ArcSwap::from_pointee(serving),
        bound,
        name,
    })
}

/// What a listener serves under `config`: its routes (or tcp cluster), limits and hold.
fn build_serving(
    l: &ListenerConfig,
    config: &Config,
    clusters: &HashMap<String, Arc<Cluster>>,
    metrics: &ProxyMetrics,
    gate: &AppGate,
    previous: Option<&Serving>,
    recorder: Option<&Recorder>,
) -> Result<Serving> {
    let name: Name = Arc::new(l.name.clone());
    let direction = direction_label(l.direction);
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
            let state = Arc::new(state);
            Kind::Http(state, Box::new(server_builder(&l.limits)))
        }
    };
    // An unchanged cap keeps its semaphore, so connections from before a reload still count.
    let connections = match previous {
        Some(p) if p.limits.max_connections == l.limits.max_connections => p.connections.clone(),
        _ => Arc::new(Semaphore::new(l.limits.max_connections)),
    };
    // The same TLS settings keep their material holder (and re-read the files, as SIGHUP
    // asks); other settings build a new one.
    let tls = match (&l.tls, previous.and_then(|p| p.tls.as_ref())) {
        (Some(c), Some(prev)) if prev.config == *c => {
            // A no-op unless the files changed (session tickets survive a reload).
            let _ = prev.reload_files();
            Some(prev.clone())
        }
        (Some(c), _) => Some(
            crate::tls::ServerTls::new(&l.name, c.clone(), metrics.tls.clone())
                .map_err(|e| anyhow::anyhow!("listener `{}`: {e}", l.name))?,
        ),
        (None, prev) => {
            if prev.is_some() {
                metrics.tls.untrack(&format!("listener/{}", l.name));
            }
            None
        }
    };
    Ok(Serving {
        config: l.clone(),
        kind,
        connections,
        limits: l.limits.clone(),
        hold,
        tls,
    })
}

fn server_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
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
        .max_header_list_size(limits.max_header_bytes as u32);
    b
}

impl Module for Proxy {
    fn name(&self) -> &'static str {
        "proxy"
    }

    fn run(self: Arc<Self>, mut cx: ModuleContext) -> ModuleFuture {
        Box::pin(async move {
            // First resolution before reporting ready, so that early requests do not meet an
            // empty cluster; bounded, since a resolver that hangs must not hold the sidecar.
            first_discovery(&self.clusters()).await;
            let mut accepting = JoinSet::new();
            for l in &self.listeners {
                let drain = if l.inbound {
                    cx.drain.inbound()
                } else {
                    cx.drain.clone()
                };
                accepting.spawn(accept_loop(l.clone(), drain));
            }
            cx.set_ready();
            loop {
                tokio::select! {
                    _ = cx.drain.signaled() => break,
                    done = accepting.join_next() => match done {
                        // An accept loop ends on its own only once drained: inbound listeners
                        // drain first, the module runs on for the outbound ones.
                        Some(Ok(Ok(()))) => {}
                        Some(Ok(Err(e))) => return Err(e.into()),
                        Some(Err(e)) => return Err(e.into()),
                        None => {
                            cx.drain.signaled().await;
                            break;
                        }
                    },
                }
            }
            // Draining: every accept loop finishes once its connections have.
            while accepting.join_next().await.is_some() {}
            Ok(())
        })
    }

    fn reload(
        self: Arc<Self>,
        config: Arc<Config>,
        _tls: Arc<crate::tls::Material>,
    ) -> ReloadFuture {
        Box::pin(async move {
            let _one = self.reloading.lock().await;
            // Clusters whose settings did not change are kept, with their pools, endpoints
            // and ejection state; the others are built new.
            let old = self.clusters.lock().expect("not poisoned").clone();
            let mut next = HashMap::new();
            let mut fresh = Vec::new();
            for c in config.clusters.values() {
                match old.get(&c.name) {
                    Some(o) if same(&o.config, c) => {
                        next.insert(c.name.clone(), o.clone());
                    }
                    _ => {
                        let n = Cluster::new(c.clone(), self.metrics.clone());
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
                let uses_replaced = replaced.iter().any(|r| uses_cluster(&current.config, r));
                let sample_changed = match &current.kind {
                    Kind::Http(h, _) => h.sample != config.telemetry.tracing.sample,
                    Kind::Tcp(_) => false,
                };
                if same(&current.config, lc) && !uses_replaced && !sample_changed {
                    if let Some(tls) = &current.tls {
                        // SIGHUP re-reads certificates even when the config is unchanged.
                        let _ = tls.reload_files();
                    }
                    continue;
                }
                let serving = build_serving(
                    lc,
                    &config,
                    &next,
                    &self.metrics,
                    &self.gate,
                    Some(&current),
                    self.recorder.as_ref(),
                )
                .map_err(|e| format!("{e:#}"))?;
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
                    // Kept: SIGHUP and config reloads re-read its TLS files (if changed).
                    c.reload_tls();
                }
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
        })
    }
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

/// Accepts until drained, then waits for the listener's connections to finish. An inbound
/// listener counts as an inbound task (the stop waits for it before signalling the app).
async fn accept_loop(l: Arc<Listener>, mut drain: Drain) -> std::io::Result<()> {
    let _tracked = l.inbound.then(|| drain.track());
    let mut connections = JoinSet::new();
    loop {
        // Backpressure: at the connection cap, stop accepting until one closes.
        let permit = tokio::select! {
            _ = drain.signaled() => break,
            p = async {
                let connections = l.serving.load().connections.clone();
                connections.acquire_owned().await
            } => p.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = drain.signaled() => break,
            r = l.bound.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE, ECONNABORTED…: wait a little, keep serving.
                    tracing::warn!(listener = %l.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        // The newest generation, loaded after the accept: an idle listener must not hand its
        // first connection after a reload the old settings.
        let serving = l.serving.load_full();
        let l2 = l.clone();
        let drain = drain.clone();
        l.opened.inc();
        l.open.inc();
        let guard = Arc::new(ConnectionGuard {
            _permit: permit,
            open: l.open.clone(),
            closed: l.closed.clone(),
        });
        connections
            .spawn(async move { serve_connection(l2, serving, stream, peer, drain, guard).await });
    }
    tracing::info!(listener = %l.name, open = connections.len(), "listener draining");
    while connections.join_next().await.is_some() {}
    if l.inbound
        && let Kind::Http(state, _) = &l.serving.load().kind
    {
        for c in state.router.clusters() {
            c.close_idle();
        }
    }
    Ok(())
}

async fn serve_connection(
    l: Arc<Listener>,
    serving: Arc<Serving>,
    stream: listener::Stream,
    peer: Peer,
    mut drain: Drain,
    guard: Arc<ConnectionGuard>,
) {
    let mut identity = None;
    let secure = serving.tls.is_some();
    let stream = match &serving.tls {
        None => stream,
        Some(tls) => {
            let handshake = tls_handshake(&l, &serving, tls, stream, &peer);
            let done = tokio::select! {
                r = handshake => r,
                _ = drain.signaled() => None,
            };
            let Some((stream, id)) = done else { return };
            // HTTP listeners check `authz` per request (403, newest config); a tcp
            // connection has no requests: it is checked here and closed.
            if let (Some(allowed), Kind::Tcp(_)) = (&serving.config.authz, &serving.kind) {
                let ids = crate::tls::PeerIdentity::all(id.as_ref());
                if !crate::config::tls::allowed(allowed, ids) {
                    tracing::warn!(listener = %l.name, peer = ?peer, identity = ?ids.first(), "identity not allowed on this listener; connection closed");
                    tls.metrics().handshake("server", &l.name, "forbidden");
                    return;
                }
            }
            identity = id;
            stream
        }
    };
    let activity = Activity::new();
    let alarm = framing::Alarm::default();
    let scanner =
        matches!(serving.kind, Kind::Http(..)).then(|| framing::Scanner::new(alarm.clone()));
    let io = Metered::new(
        stream,
        activity.clone(),
        l.received.clone(),
        l.sent.clone(),
        scanner,
    );
    let idle = serving.limits.idle_timeout.get();
    match &serving.kind {
        Kind::Tcp(cluster) => {
            let _guard = guard;
            let open = match &serving.hold {
                Some((gate, limit)) if !gate.is_open() => tokio::select! {
                    open = gate.wait(*limit) => open,
                    _ = drain.signaled() => false,
                },
                _ => true,
            };
            if !open {
                tracing::debug!(listener = %l.name, "the app is not ready; tcp connection closed");
                return;
            }
            tokio::select! {
                _ = tcp::serve(io, peer, cluster.clone(), &l.name) => {}
                // Opaque bytes cannot be drained gracefully: close at the start of a stop.
                _ = drain.signaled() => tracing::debug!(listener = %l.name, "tcp connection closed: draining"),
                _ = idle_for(&activity, idle) => tracing::debug!(listener = %l.name, "tcp connection idle; closed"),
            }
        }
        Kind::Http(first, builder) => {
            let down = Arc::new(http::Downstream {
                peer,
                guard,
                drain: drain.clone(),
                activity: activity.clone(),
                idle_timeout: idle,
                framing_alarm: alarm,
                secure,
                identity,
            });
            // Each request is handled by the listener's newest config generation: a reload
            // reaches keep-alive connections too.
            let (listener, fallback) = (l.clone(), first.clone());
            let service = hyper::service::service_fn(move |req| {
                let state = match &listener.serving.load().kind {
                    Kind::Http(state, _) => state.clone(),
                    // Reloaded as a tcp listener: this connection still speaks HTTP.
                    Kind::Tcp(_) => fallback.clone(),
                };
                state.handle(down.clone(), req)
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(conn);
            // Made once per connection, not per wake-up: a fresh timer for every request was
            // a measurable share of the data path.
            let drained = drain.signaled();
            let idled = idle_for(&activity, idle);
            tokio::pin!(drained, idled);
            let mut closing = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(listener = %l.name, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut drained, if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = &mut idled, if !closing => {
                        // In-flight requests still finish; the connection then closes.
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// TLS on an accepted connection, within the header read timeout. Plain HTTP sent to a TLS
/// port gets a 400 that says so. Returns the TLS stream and the client certificate's identity;
/// None (logged and counted) when the handshake fails.
async fn tls_handshake(
    l: &Listener,
    serving: &Serving,
    tls: &crate::tls::ServerTls,
    stream: listener::Stream,
    peer: &Peer,
) -> Option<(listener::Stream, Option<crate::tls::PeerIdentity>)> {
    use tokio::io::AsyncWriteExt;
    // One deadline for the first byte and the whole handshake: a slow client holds its
    // connection slot for at most this long before any HTTP timer starts.
    let deadline = tokio::time::Instant::now() + serving.limits.header_read_timeout.get();
    let metrics = tls.metrics();
    let mut stream = stream;
    let http = matches!(serving.kind, Kind::Http(..));
    // A TLS connection starts with a handshake record (0x16); anything else on an HTTP
    // listener is a client speaking plain HTTP to an HTTPS port.
    if let (listener::Stream::Tcp(tcp), true) = (&stream, http) {
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != 0x16 => {
                tracing::warn!(listener = %l.name, peer = ?peer, "plain text on a TLS listener; answered 400");
                metrics.handshake("server", &l.name, "not_tls");
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 51\r\n\r\noutrigger: this port speaks TLS; use https:// here\n")
                    .await;
                let _ = stream.shutdown().await;
                return None;
            }
            // Closed without a byte: a TCP health check (kubelet, load balancers). Not worth
            // a warning every few seconds.
            Ok(Ok(0)) => {
                metrics.handshake("server", &l.name, "eof");
                return None;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                metrics.handshake("server", &l.name, "io");
                tracing::debug!(listener = %l.name, peer = ?peer, error = %e, "connection failed before the TLS handshake");
                return None;
            }
            Err(_) => {
                metrics.handshake("server", &l.name, "timeout");
                tracing::warn!(listener = %l.name, peer = ?peer, "no TLS handshake within the header read timeout; closed");
                return None;
            }
        }
    }
    let accepted = tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await;
    let tls_stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = crate::tls::classify(&e);
            metrics.handshake("server", &l.name, reason);
            if reason == "eof" {
                tracing::debug!(listener = %l.name, peer = ?peer, "connection closed during the TLS handshake");
            } else {
                tracing::warn!(listener = %l.name, peer = ?peer, reason, error = %e, "TLS handshake failed");
            }
            return None;
        }
        Err(_) => {
            metrics.handshake("server", &l.name, "timeout");
            tracing::warn!(listener = %l.name, peer = ?peer, "TLS handshake did not finish within the header read timeout; closed");
            return None;
        }
    };
    metrics.handshake("server", &l.name, "ok");
    let (_, conn) = tls_stream.get_ref();
    let own = tls.own_identity.load();
    let identity = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| crate::tls::PeerIdentity::of(c, own.as_deref()));
    Some((listener::Stream::TlsServer(Box::new(tls_stream)), identity))
}

/// Resolves once the connection has moved no bytes for a whole `limit` (so after between one
/// and two `limit`s of silence).
pub(crate) async fn idle_for(activity: &Activity, limit: Duration) {
    loop {
        let before = activity.count();
        tokio::time::sleep(limit).await;
        if activity.count() == before {
            return;
        }
    }
}
