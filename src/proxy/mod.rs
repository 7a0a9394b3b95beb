//! The proxy module: inbound listeners forward to the app, outbound listeners give the app one
//! local address through which it reaches every cluster. Built on hyper and hyper-util
//! directly.
//!
//! A connection's way through, and the file for each step:
//!
//! 1. bind: [`listener`] (TCP or unix sockets, the byte counters, the upstream `Stream`);
//! 2. accept: [`accept`] (accept loop, backpressure at `max_connections`, serving a
//!    connection, idle timeout, clients that read nothing); HTTP/2 streams whose client reads
//!    nothing in [`unread_streams`]; TLS termination in [`crate::tls::accept`];
//! 3. serve: `tcp` listeners copy bytes to a cluster ([`tcp`]); `http` listeners first serve
//!    plain keep-alive HTTP/1.1 requests without a body on the HTTP/1 fast path (`fast_path`:
//!    httparse, the original header lines with our edits, an upstream connection owned for the
//!    exchange, no hyper), and at the first request it does not take hand the connection to
//!    hyper (HTTP/1.1 or HTTP/2) with the [`framing`] scanner watching the bytes — or, with
//!    `http2_server: outrigger`, an HTTP/2 connection to our own server ([`h2`]) — which hands
//!    each request to the listener's [`http::HttpListener`], whose phases are, in order:
//!    1. authorize the listener ([`authz`]);
//!    2. admit ([`limits`]);
//!    3. hold for a starting app ([`hold`]);
//!    4. check framing ([`framing`]) and the path ([`authz`]);
//!    5. route ([`route`]);
//!    6. authorize the route ([`authz`]);
//!    7. forward ([`forward`]): prepare the headers ([`headers`]), read the body ahead
//!       ([`body`]), pick an endpoint and send, retrying; a 101 is spliced ([`upgrade`]);
//!    8. respond ([`respond`]): response edits, metrics;
//!
//!    and any phase may answer with an error instead ([`failure`]); an HTTP/1 connection
//!    closed after an answer that left the request body unread reads and drops the rest for
//!    a while first (`linger`), so that the client reads its answer before a reset;
//! 4. upstream: a [`cluster::Cluster`] (discovery, balancing, outlier ejection, retry budget,
//!    connecting; TLS origination in [`crate::tls::origination`]).
//!
//! What a listener serves is a generation ([`generation`]), rebuilt on reload only when its
//! settings or clusters changed. On drain a listener stops accepting, tells every HTTP
//! connection to finish its in-flight requests and close (HTTP/2 GOAWAY), and returns once all
//! are gone; the runtime's grace period bounds the wait. This file holds the [`Proxy`] module
//! itself: building it, running it, reloading it.

pub mod accept;
pub mod authz;
pub mod body;
pub mod cluster;
pub mod failure;
mod fast_path;
pub mod forward;
pub mod framing;
pub mod generation;
pub mod h2;
pub mod headers;
pub mod hold;
pub mod http;
pub mod limits;
mod linger;
pub mod listener;
pub mod min_body_rate;
pub mod record;
pub mod respond;
pub mod route;
mod small_bytes;
pub mod tcp;
pub mod unread_streams;
pub mod upgrade;
mod upstream_head;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use crate::config::{Address, Config};
use crate::runtime::{AppGate, Module, ModuleContext, ModuleFuture, ReloadFuture};
use crate::telemetry::metrics::ProxyMetrics;
use crate::telemetry::record::Recorder;
use cluster::{Cluster, first_discovery};
use generation::Listener;
use listener::Bound;

/// The proxy module.
pub struct Proxy {
    listeners: Vec<Arc<Listener>>,
    clusters: Mutex<HashMap<String, Arc<Cluster>>>,
    metrics: ProxyMetrics,
    gate: AppGate,
    recorder: Option<Recorder>,
    /// `mesh:`: peers by app id, made on demand (outbound listeners and the bridge share them).
    peers: Option<Arc<cluster::name_resolution::NameResolution>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Proxy {
    /// Builds the proxy and binds every listener. `None` when no listener is configured.
    /// Returns the bound addresses by listener name.
    /// `tls` is the material preflight built (listeners' and clusters' rustls configs) and
    /// `otlp_tls` the span exporter's connector to an https collector.
    pub async fn build(
        config: &Config,
        tls: &crate::tls::Material,
        otlp_tls: Option<crate::tls::HttpsConnector>,
        metrics: &ProxyMetrics,
        gate: AppGate,
    ) -> Result<Option<(Proxy, BTreeMap<String, Address>)>> {
        if config.listeners.is_empty() {
            return Ok(None);
        }
        let clusters: HashMap<String, Arc<Cluster>> = config
            .clusters
            .values()
            .map(|c| {
                let built = tls.clients.get(&c.name).cloned();
                (
                    c.name.clone(),
                    Cluster::new(c.clone(), metrics.clone(), built),
                )
            })
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
                    otlp_tls,
                    &config.service,
                    metrics.spans.clone(),
                )
                .map_err(|e| anyhow::anyhow!("cannot set up span export to {}: {e}", o.endpoint))?,
            ),
            None => None,
        };
        let recorder = (log.is_some() || spans.is_some()).then_some(Recorder { log, spans });
        let peers = config
            .mesh
            .as_ref()
            .map(|m| cluster::name_resolution::NameResolution::mesh(m, metrics.clone()));
        let mut listeners = Vec::new();
        let mut bound_addresses = BTreeMap::new();
        for l in &config.listeners {
            let bound = Bound::bind(&l.address, l.socket_mode)
                .await
                .with_context(|| format!("cannot bind listener `{}` on {}", l.name, l.address))?;
            let local = bound.local_address()?;
            tracing::info!(listener = %l.name, address = %local, direction = ?l.direction, protocol = ?l.protocol, "listening");
            bound_addresses.insert(l.name.clone(), local);
            let build = generation::Build {
                config,
                clusters: &clusters,
                tls,
                metrics,
                gate: &gate,
                recorder: recorder.as_ref(),
                peers: peers.as_ref(),
            };
            listeners.push(Arc::new(generation::build_listener(l, bound, &build)?));
        }
        Ok(Some((
            Proxy {
                listeners,
                clusters: Mutex::new(clusters),
                metrics: metrics.clone(),
                gate,
                recorder,
                peers,
                reloading: tokio::sync::Mutex::new(()),
            },
            bound_addresses,
        )))
    }

    /// The proxy's metrics (the bridge's own clusters report there too).
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// The cluster named `name` as the running config has it (the bridge invokes through it).
    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters
            .lock()
            .expect("not poisoned")
            .get(name)
            .cloned()
    }

    /// The mesh's peers by app id (`mesh:`), for the bridge's invocations.
    pub fn peers(&self) -> Option<&Arc<cluster::name_resolution::NameResolution>> {
        self.peers.as_ref()
    }

    /// Every cluster's endpoints and their state, by cluster name (the admin dashboard); the
    /// mesh's peers resolved so far too (named `peer:ID.NAMESPACE`, never a declared name).
    pub fn cluster_status(&self) -> BTreeMap<String, Vec<cluster::EndpointStatus>> {
        let peers = self.peers.iter().flat_map(|p| p.clusters());
        self.clusters()
            .into_iter()
            .chain(peers)
            .map(|c| (c.name.to_string(), c.endpoint_status()))
            .collect()
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
                accepting.spawn(accept::accept_loop(l.clone(), drain));
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
        tls: Arc<crate::tls::Material>,
    ) -> ReloadFuture {
        Box::pin(async move { self.apply(config, &tls).await })
    }
}
