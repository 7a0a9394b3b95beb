//! Clusters (`clusters.<name>`): a named set of endpoints and the protections around them.
//! Each concern has a file of its own:
//!
//! - [`discovery`]: where the endpoints come from (static, DNS, a file);
//! - [`balance`]: which endpoint a request goes to (round robin, P2C + peak-EWMA);
//! - [`outlier`]: ejecting endpoints that keep failing;
//! - [`budget`]: the retry budget;
//! - [`connect`]: connecting to an endpoint (TLS origination is
//!   [`crate::tls::origination`]);
//! - [`name_resolution`]: clusters made on demand for app ids (`bridge.name_resolution`, the
//!   mesh's peers);
//! - here: the [`Cluster`] itself, its [`Endpoint`]s and the cap on requests in flight.
//!
//! Each endpoint has its own connection pools (for HTTP/1.1 the proxy's own, [`pool`]; for
//! HTTP/2, CONNECT and the bridge hyper-util's client, with a connector fixed to that
//! endpoint), so pools survive discovery updates for endpoints that stay. In: the
//! cluster's config (rebuilt on reload only when it changed) and discovery's updates. Out:
//! an [`Attempt`] per request for the forward phase and tcp listeners.

pub mod balance;
pub mod budget;
pub mod connect;
pub mod discovery;
pub mod name_resolution;
pub mod outlier;
pub mod pool;
mod raw_exchange;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tower::retry::budget::TpsBudget;

use crate::config::Address;
use crate::config::proxy::{ClusterConfig, Discovery};
use crate::telemetry::metrics::{ClusterLabels, Name, ProxyMetrics};
use crate::tls::origination::Origination;
pub use connect::{Connector, HttpClient};
pub use discovery::{first_discovery, parse_endpoints_file};
pub use raw_exchange::RawBody;

/// One upstream endpoint and its state.
pub struct Endpoint {
    pub address: Address,
    /// The address as text, for access log lines and spans (formatted once).
    pub label: Arc<str>,
    /// hyper-util's pooled client: HTTP/2 clusters, CONNECT, the bridge's invocations.
    pub client: HttpClient,
    /// The proxy's HTTP/1.1 requests (None for `http2` clusters).
    pool: Option<Arc<pool::Pool>>,
    /// An `http2` cluster's upgrade requests (WebSocket): HTTP/2 has no `Upgrade`, so they go
    /// over HTTP/1.1 (ALPN `http/1.1` with TLS); the mesh's peers are such clusters. No
    /// connection is made until one comes.
    upgrades: Option<Arc<pool::Pool>>,
    /// The URI authority of requests to this endpoint: the pool key. Fixed, so clients cannot
    /// grow the pool by varying Host; the Host header carries the request's own authority.
    authority: http::uri::Authority,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the cluster's epoch until which the endpoint is ejected (0: never).
    ejected_until_ms: AtomicU64,
    /// Peak-EWMA of response latency (seconds) and when it was last updated.
    ewma: Mutex<(f64, Instant)>,
    /// Reached over TLS.
    tls: bool,
}

impl Endpoint {
    fn new(address: Address, config: &ClusterConfig, tls: Option<&Arc<Origination>>) -> Endpoint {
        let client = connect::client(&address, config, tls);
        let pool = pool::Pool::new(
            if config.http2 {
                Connector::new(&address, config, tls).http1()
            } else {
                Connector::new(&address, config, tls)
            },
            config.pool_idle_timeout.get(),
        );
        let (pool, upgrades) = if config.http2 {
            (None, Some(pool))
        } else {
            (Some(pool), None)
        };
        let authority = match &address {
            Address::Tcp(a) => http::uri::Authority::try_from(a.to_string())
                .expect("a socket address is an authority"),
            Address::Unix(_) => http::uri::Authority::from_static("localhost"),
        };
        Endpoint {
            tls: tls.is_some(),
            label: Arc::from(address.to_string()),
            address,
            client,
            pool,
            upgrades,
            authority,
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ewma: Mutex::new((balance::EWMA_DEFAULT.as_secs_f64(), Instant::now())),
        }
    }

    /// Sends a request to this endpoint: an HTTP/1.1 one on the endpoint's own pool (in
    /// origin form; an `http2` cluster's upgrade requests on their HTTP/1.1 pool), anything
    /// else (HTTP/2, CONNECT) through hyper-util's client. `req`'s URI is in origin form (its
    /// path and query only): the endpoint's absolute URI ([`Endpoint::uri`]) is made here for
    /// hyper-util's client alone, the pools' HTTP/1.1 requests need none (an absolute URI
    /// per attempt, then replaced by its path, was work for nothing on the usual path).
    pub async fn send(
        &self,
        mut req: http::Request<crate::proxy::body::ProxyBody>,
    ) -> Result<http::Response<crate::proxy::body::UpstreamBody>, pool::SendError> {
        let pool = match (&self.pool, &self.upgrades) {
            (Some(pool), _) => Some(pool),
            (None, Some(upgrades))
                if req.version() == http::Version::HTTP_11
                    && req.headers().contains_key(http::header::UPGRADE) =>
            {
                Some(upgrades)
            }
            _ => None,
        };
        match pool {
            Some(pool) if req.method() != http::Method::CONNECT => pool.send(req).await,
            _ => {
                let path = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
                *req.uri_mut() = self.uri(path);
                match self.client.request(req).await {
                    Ok(res) => Ok(res.map(|b| {
                        crate::proxy::body::UpstreamBody::Boxed(crate::proxy::body::incoming(b))
                    })),
                    Err(e) => Err(pool::SendError {
                        connect: e.is_connect(),
                        downstream: false,
                        error: e.into(),
                    }),
                }
            }
        }
    }

    /// The endpoint's HTTP/1.1 pool (None for `http2` clusters): the fast path's raw
    /// connections live there too.
    pub fn pool(&self) -> Option<&Arc<pool::Pool>> {
        self.pool.as_ref()
    }

    /// The URI of a request to this endpoint.
    pub fn uri(&self, path: http::uri::PathAndQuery) -> http::Uri {
        let mut parts = http::uri::Parts::default();
        // `:scheme` for HTTP/2 upstreams; HTTP/1 requests go out in origin form.
        parts.scheme = Some(if self.tls {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        http::Uri::from_parts(parts).expect("scheme, authority and path make a URI")
    }
}

/// An endpoint's state as the admin dashboard shows it ([`Cluster::endpoint_status`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct EndpointStatus {
    pub address: String,
    /// Milliseconds until the endpoint is back in balancing (0: not ejected).
    pub ejected_for_ms: u64,
    pub in_flight: usize,
    pub consecutive_failures: u32,
    /// The balancer's peak-EWMA latency estimate, in seconds.
    pub ewma_seconds: f64,
}

/// A request in flight to an endpoint; reports the outcome when dropped or finished.
pub struct Attempt {
    pub endpoint: Arc<Endpoint>,
    started: Instant,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The cluster already has `max_requests_in_flight` requests in flight.
#[derive(Debug)]
pub struct Saturated;

/// A named set of endpoints.
pub struct Cluster {
    pub name: Name,
    pub config: ClusterConfig,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    next: AtomicUsize,
    epoch: Instant,
    budget: TpsBudget,
    in_flight: Option<Arc<Semaphore>>,
    metrics: ProxyMetrics,
    /// Replaced by a config reload: no more discovery or reporting.
    retired: AtomicBool,
    tls: Option<Arc<Origination>>,
    /// Milliseconds after `epoch` of its last use, for clusters made on demand (the mesh's
    /// peers, evicted once unused for a while): [`Cluster::touch`].
    last_used: AtomicU64,
}

impl Cluster {
    /// A cluster for `config`; `tls` is the client material preflight built for it (`None`:
    /// built here from the files, when it has `tls`).
    pub fn new(
        config: ClusterConfig,
        metrics: ProxyMetrics,
        tls: Option<crate::tls::LoadedClient>,
    ) -> Arc<Cluster> {
        Self::build(config, metrics, tls, true)
    }

    /// A cluster whose TLS material `tls` is shared with others and watched by its owner (the
    /// mesh's peers: one file watch for all), who hands it new material with
    /// [`Cluster::adopt_tls`].
    pub fn with_shared_tls(
        config: ClusterConfig,
        metrics: ProxyMetrics,
        tls: crate::tls::LoadedClient,
    ) -> Arc<Cluster> {
        Self::build(config, metrics, Some(tls), false)
    }

    fn build(
        config: ClusterConfig,
        metrics: ProxyMetrics,
        tls: Option<crate::tls::LoadedClient>,
        watch: bool,
    ) -> Arc<Cluster> {
        let tls = Origination::new(&config, &metrics.tls, tls);
        let initial = match &config.discovery {
            Discovery::Static(addrs) => addrs
                .iter()
                .map(|a| Arc::new(Endpoint::new(a.clone(), &config, tls.as_ref())))
                .collect(),
            _ => Vec::new(),
        };
        let budget = budget::budget(&config.retry_budget);
        let cluster = Arc::new(Cluster {
            name: Arc::new(config.name.clone()),
            in_flight: config
                .max_requests_in_flight
                .map(|n| Arc::new(Semaphore::new(n))),
            endpoints: ArcSwap::from_pointee(initial),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            budget,
            config,
            metrics,
            retired: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            tls,
        });
        if watch && cluster.tls.is_some() {
            crate::tls::spawn_watch(&cluster);
        }
        cluster.export_endpoint_count();
        cluster
    }

    /// Notes a use (a request routed to it), for [`Cluster::idle_for`].
    pub fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used.store(now, Ordering::Relaxed);
    }

    /// How long since its last [`Cluster::touch`] (or since it was made).
    pub fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_used.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Retired (replaced by a reload, or an evicted peer): no longer to be picked.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Requests in flight on its endpoints.
    pub fn requests_in_flight(&self) -> usize {
        self.endpoints
            .load()
            .iter()
            .map(|e| e.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Marks the cluster replaced by a reload (its successor, if any, has the same name).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        if let Some(o) = &self.tls {
            o.retire();
        }
    }

    /// Re-reads the TLS files (SIGHUP, config reload); a no-op when they did not change.
    pub fn reload_tls(&self) {
        let _ = crate::tls::Reloadable::reload_files(self);
    }

    /// A config reload kept this cluster: take the TLS material preflight built for it when
    /// its files changed (new connections then; pooled ones were made with the old material),
    /// or read them again if nothing was built (SIGHUP).
    pub fn adopt_tls(&self, built: Option<&crate::tls::LoadedClient>) {
        match (&self.tls, built) {
            (Some(o), Some(b)) => {
                if o.adopt(b) {
                    self.close_idle();
                }
            }
            _ => self.reload_tls(),
        }
    }

    pub fn export_endpoint_count(&self) {
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        self.metrics
            .endpoints
            .get_or_create(&ClusterLabels {
                cluster: self.name.clone(),
            })
            .set(self.endpoints.load().len() as i64);
    }

    pub fn endpoint_addresses(&self) -> Vec<Address> {
        self.endpoints
            .load()
            .iter()
            .map(|e| e.address.clone())
            .collect()
    }

    /// Replaces the endpoint set, keeping the pools of endpoints that stay.
    pub fn set_endpoints(&self, addresses: Vec<Address>) -> bool {
        let current = self.endpoints.load();
        let mut by_addr: HashMap<&Address, &Arc<Endpoint>> =
            current.iter().map(|e| (&e.address, e)).collect();
        let mut changed = addresses.len() != current.len();
        let next: Vec<Arc<Endpoint>> = addresses
            .into_iter()
            .map(|a| match by_addr.remove(&a) {
                Some(e) => e.clone(),
                None => {
                    changed = true;
                    Arc::new(Endpoint::new(a, &self.config, self.tls.as_ref()))
                }
            })
            .collect();
        if changed {
            self.endpoints.store(Arc::new(next));
            self.export_endpoint_count();
        }
        changed
    }

    /// Closes the idle pooled connections (new endpoint clients, same addresses): once inbound
    /// has drained, so that an app waiting for its keep-alive connections to end can exit.
    /// Requests in flight finish on their connection, which then closes.
    pub fn close_idle(&self) {
        // rcu: a discovery update racing with this is not lost.
        self.endpoints.rcu(|current| {
            current
                .iter()
                .map(|e| {
                    Arc::new(Endpoint::new(
                        e.address.clone(),
                        &self.config,
                        self.tls.as_ref(),
                    ))
                })
                .collect::<Vec<_>>()
        });
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Each endpoint's state now, for the admin dashboard (`GET /status`): atomics and the
    /// EWMA's lock read once per endpoint, nothing on the data path.
    pub fn endpoint_status(&self) -> Vec<EndpointStatus> {
        let now = self.now_ms();
        self.endpoints
            .load()
            .iter()
            .map(|e| {
                let until = e.ejected_until_ms.load(Ordering::Relaxed);
                EndpointStatus {
                    address: e.label.to_string(),
                    ejected_for_ms: until.saturating_sub(now),
                    in_flight: e.in_flight.load(Ordering::Relaxed),
                    consecutive_failures: e.consecutive_failures.load(Ordering::Relaxed),
                    ewma_seconds: e.ewma.lock().expect("not poisoned").0,
                }
            })
            .collect()
    }

    /// A permit for one more request in flight, if the cluster caps them.
    pub fn admit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Saturated> {
        match &self.in_flight {
            None => Ok(None),
            Some(s) => s
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| Saturated),
        }
    }
}

/// A cluster's TLS files: when they change, new material and new connections (the pooled
/// ones were made with the old certificate; requests in flight finish on theirs).
impl crate::tls::Reloadable for Cluster {
    fn files(&self) -> Vec<std::path::PathBuf> {
        self.tls
            .as_ref()
            .map(|o| crate::tls::Reloadable::files(&**o))
            .unwrap_or_default()
    }

    fn reload_files(&self) -> Result<(), crate::tls::TlsError> {
        let Some(o) = &self.tls else { return Ok(()) };
        let before = o.fingerprints();
        crate::tls::Reloadable::reload_files(&**o)?;
        if o.fingerprints() != before {
            self.close_idle();
        }
        Ok(())
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::proxy::Lb;
    use crate::config::proxy::{Outlier, RetryBudget};

    pub(super) fn config(lb: Lb, n: u16) -> ClusterConfig {
        ClusterConfig {
            name: "c".into(),
            discovery: Discovery::Static(
                (0..n)
                    .map(|i| Address::Tcp(([127, 0, 0, 1], 1000 + i).into()))
                    .collect(),
            ),
            lb,
            connect_timeout: crate::config::Duration::from_secs(1),
            timeout: crate::config::Duration::from_secs(1),
            http2: false,
            tls: None,
            pool_idle_timeout: crate::config::Duration::from_secs(1),
            max_requests_in_flight: Some(1),
            outlier: Outlier {
                consecutive_failures: 2,
                ejection_time: crate::config::Duration::from_secs(60),
            },
            retry_budget: RetryBudget {
                ratio: 0.2,
                min_per_second: 10,
            },
        }
    }

    #[tokio::test]
    async fn discovery_updates_keep_existing_endpoints() {
        let c = Cluster::new(config(Lb::RoundRobin, 2), ProxyMetrics::default(), None);
        let before = c.endpoints.load_full();
        let a: Address = "127.0.0.1:1001".parse().unwrap();
        let b: Address = "127.0.0.1:2000".parse().unwrap();
        assert!(c.set_endpoints(vec![a.clone(), b]));
        let after = c.endpoints.load_full();
        assert!(
            Arc::ptr_eq(&before[1], &after[0]),
            "the pool of a staying endpoint is kept"
        );
        assert!(!c.set_endpoints(vec![a, "127.0.0.1:2000".parse().unwrap()]));
    }

    #[tokio::test]
    async fn in_flight_cap() {
        let c = Cluster::new(config(Lb::RoundRobin, 1), ProxyMetrics::default(), None);
        let p = c.admit().unwrap();
        assert!(c.admit().is_err());
        drop(p);
        assert!(c.admit().is_ok());
    }
}
