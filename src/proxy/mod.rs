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

pub mod body;
pub mod cluster;
pub mod framing;
pub mod http;
pub mod listener;
pub mod route;
pub mod tcp;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::proxy::{APP_CLUSTER, Limits, ListenerConfig, MatchConfig, RouteConfig};
use crate::config::raw::{Direction, Protocol};
use crate::config::{Address, Config};
use crate::runtime::{Drain, Module, ModuleContext, ModuleFuture};
use crate::telemetry::metrics::{FlowLabels, ListenerLabels, Name, ProxyMetrics};
use cluster::Cluster;
use listener::{Activity, Bound, Metered, Peer};

/// How long the proxy waits for the first DNS/file resolution before reporting ready.
const FIRST_DISCOVERY: Duration = Duration::from_secs(5);

/// What a listener does with a connection.
enum Kind {
    Http(Arc<http::HttpListener>, Box<auto::Builder<TokioExecutor>>),
    Tcp(Arc<Cluster>),
}

/// A bound listener and what it serves.
struct Listener {
    name: Name,
    bound: Bound,
    kind: Kind,
    limits: Limits,
    connections: Arc<Semaphore>,
    opened: Counter,
    closed: Counter,
    open: Gauge,
    received: Counter,
    sent: Counter,
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
    clusters: Vec<Arc<Cluster>>,
}

impl Proxy {
    /// Builds the proxy and binds every listener. `None` when no listener is configured.
    /// Returns the bound addresses by listener name.
    pub async fn build(
        config: &Config,
        metrics: &ProxyMetrics,
    ) -> Result<Option<(Proxy, BTreeMap<String, Address>)>> {
        if config.listeners.is_empty() {
            return Ok(None);
        }
        let clusters: HashMap<String, Arc<Cluster>> = config
            .clusters
            .values()
            .map(|c| (c.name.clone(), Cluster::new(c.clone(), metrics.clone())))
            .collect();
        let mut listeners = Vec::new();
        let mut bound_addresses = BTreeMap::new();
        for l in &config.listeners {
            let bound = Bound::bind(&l.address, l.socket_mode)
                .await
                .with_context(|| format!("cannot bind listener `{}` on {}", l.name, l.address))?;
            let local = bound.local_address()?;
            tracing::info!(listener = %l.name, address = %local, direction = ?l.direction, protocol = ?l.protocol, "listening");
            bound_addresses.insert(l.name.clone(), local);
            listeners.push(Arc::new(build_listener(l, bound, &clusters, metrics)?));
        }
        Ok(Some((
            Proxy {
                listeners,
                clusters: clusters.into_values().collect(),
            },
            bound_addresses,
        )))
    }
}

fn build_listener(
    l: &ListenerConfig,
    bound: Bound,
    clusters: &HashMap<String, Arc<Cluster>>,
    metrics: &ProxyMetrics,
) -> Result<Listener> {
    let name: Name = Arc::new(l.name.clone());
    let direction = match l.direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    };
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
            let state = Arc::new(http::HttpListener::new(
                name.clone(),
                direction,
                router,
                &l.limits,
                metrics,
            ));
            Kind::Http(state, Box::new(server_builder(&l.limits)))
        }
    };
    Ok(Listener {
        connections: Arc::new(Semaphore::new(l.limits.max_connections)),
        opened: metrics.connections_opened.get_or_create(&labels).clone(),
        closed: metrics.connections_closed.get_or_create(&labels).clone(),
        open: metrics.connections_open.get_or_create(&labels).clone(),
        received: flow("received"),
        sent: flow("sent"),
        limits: l.limits.clone(),
        bound,
        kind,
        name,
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
            let mut first = JoinSet::new();
            for c in self.clusters.iter().filter(|c| c.is_discovered()) {
                let c = c.clone();
                first.spawn(async move { c.refresh().await });
            }
            let all_done = async { while first.join_next().await.is_some() {} };
            if tokio::time::timeout(FIRST_DISCOVERY, all_done)
                .await
                .is_err()
            {
                tracing::warn!(timeout = ?FIRST_DISCOVERY, "endpoint discovery still pending; serving anyway");
            }
            // Dropped (and so aborted) when this run ends.
            let mut discovery = JoinSet::new();
            for c in &self.clusters {
                discovery.spawn(c.clone().discover());
            }
            let mut accepting = JoinSet::new();
            for l in &self.listeners {
                accepting.spawn(accept_loop(l.clone(), cx.drain.clone()));
            }
            cx.set_ready();
            tokio::select! {
                _ = cx.drain.signaled() => {}
                Some(done) = accepting.join_next() => {
                    // Accept loops end on their own only when drained (this select may see that
                    // before the drain branch); otherwise let the supervisor restart us.
                    if cx.drain.is_draining() {
                        while accepting.join_next().await.is_some() {}
                        return Ok(());
                    }
                    return match done {
                        Ok(Err(e)) => Err(e.into()),
                        Ok(Ok(())) => Err("a listener stopped".into()),
                        Err(e) => Err(e.into()),
                    };
                }
            }
            // Draining: every accept loop finishes once its connections have.
            while accepting.join_next().await.is_some() {}
            Ok(())
        })
    }
}

/// Accepts until drained, then waits for the listener's connections to finish.
async fn accept_loop(l: Arc<Listener>, mut drain: Drain) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        // Backpressure: at the connection cap, stop accepting until one closes.
        let permit = tokio::select! {
            _ = drain.signaled() => break,
            p = l.connections.clone().acquire_owned() => p.expect("never closed"),
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
        let l2 = l.clone();
        let drain = drain.clone();
        l.opened.inc();
        l.open.inc();
        let guard = Arc::new(ConnectionGuard {
            _permit: permit,
            open: l.open.clone(),
            closed: l.closed.clone(),
        });
        connections.spawn(async move { serve_connection(&l2, stream, peer, drain, guard).await });
    }
    tracing::info!(listener = %l.name, open = connections.len(), "listener draining");
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn serve_connection(
    l: &Listener,
    stream: listener::Stream,
    peer: Peer,
    mut drain: Drain,
    guard: Arc<ConnectionGuard>,
) {
    let activity = Activity::new();
    let alarm = framing::Alarm::default();
    let scanner = matches!(l.kind, Kind::Http(..)).then(|| framing::Scanner::new(alarm.clone()));
    let io = Metered::new(
        stream,
        activity.clone(),
        l.received.clone(),
        l.sent.clone(),
        scanner,
    );
    let idle = l.limits.idle_timeout.get();
    match &l.kind {
        Kind::Tcp(cluster) => {
            let _guard = guard;
            tokio::select! {
                _ = tcp::serve(io, peer, cluster.clone(), &l.name) => {}
                // Opaque bytes cannot be drained gracefully: close at the start of a stop.
                _ = drain.signaled() => tracing::debug!(listener = %l.name, "tcp connection closed: draining"),
                _ = idle_for(&activity, idle) => tracing::debug!(listener = %l.name, "tcp connection idle; closed"),
            }
        }
        Kind::Http(state, builder) => {
            let state = state.clone();
            let down = Arc::new(http::Downstream {
                peer,
                guard,
                drain: drain.clone(),
                activity: activity.clone(),
                idle_timeout: idle,
                framing_alarm: alarm,
            });
            let service =
                hyper::service::service_fn(move |req| state.clone().handle(down.clone(), req));
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
