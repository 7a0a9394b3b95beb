//! Clusters: a named set of endpoints, how they are discovered (static, DNS, file), how one is
//! picked (round robin or power-of-two-choices by peak-EWMA latency), and the protections around
//! them (outlier ejection, a retry budget, a cap on requests in flight).
//!
//! Each endpoint has its own connection pool (hyper-util's client with a connector fixed to
//! that endpoint), so pools survive discovery updates for endpoints that stay. The balancer is
//! written here rather than taken from `tower::balance` because our endpoints are plain structs
//! shared with discovery and ejection, not `tower::Service`s, and the whole of P2C + peak-EWMA is
//! a few dozen lines.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tower::retry::budget::{Budget, TpsBudget};

use super::body::ProxyBody;
use super::listener::{self, Stream};
use crate::config::Address;
use crate::config::proxy::{ClusterConfig, Discovery};
use crate::config::raw::Lb;
use crate::telemetry::metrics::{ClusterLabels, Name, OutcomeLabels, ProxyMetrics};

/// Peak-EWMA decay time: older latency samples weigh less after this.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// An endpoint with no latency sample yet is assumed this slow (so it gets tried).
const EWMA_DEFAULT: Duration = Duration::from_millis(1);

/// Connects to one endpoint, whatever URI the client asks for: the URI carries the request's
/// authority (for `Host` and the pool key), the endpoint is fixed.
#[derive(Clone)]
pub struct Connector {
    address: Address,
    timeout: Duration,
    tls: Option<(Arc<Origination>, rustls_pki_types::ServerName<'static>)>,
}

/// TLS origination for a cluster's endpoints. The client config is swapped when its files
/// change (watched like a listener's) or on SIGHUP; connections made afterwards use it.
pub struct Origination {
    /// The rustls client config, or why it could not be built (connections then fail: never
    /// fall back to plain text).
    connector: ArcSwap<Result<tokio_rustls::TlsConnector, String>>,
    cluster: String,
    /// `tls.server_name`, else the DNS host; else each endpoint's IP.
    server_name: Option<String>,
    metrics: crate::tls::TlsMetrics,
    tls: crate::config::tls::ClientTlsConfig,
    h2: bool,
    fingerprints: Mutex<Vec<u64>>,
    retired: std::sync::atomic::AtomicBool,
}

impl Origination {
    fn new(config: &ClusterConfig, metrics: &ProxyMetrics) -> Option<Arc<Origination>> {
        let tls = config.tls.as_ref()?;
        let server_name = tls.server_name.clone().or_else(|| match &config.discovery {
            Discovery::Dns { host, .. } => Some(host.clone()),
            _ => None,
        });
        let o = Arc::new(Origination {
            connector: ArcSwap::from_pointee(Err("not loaded yet".to_string())),
            cluster: config.name.clone(),
            server_name,
            metrics: metrics.tls.clone(),
            tls: tls.clone(),
            h2: config.http2,
            fingerprints: Mutex::new(Vec::new()),
            retired: std::sync::atomic::AtomicBool::new(false),
        });
        if let Err(e) = o.load() {
            tracing::error!(cluster = %config.name, error = %e, "cannot set up TLS; connections to this cluster will fail");
            o.connector.store(Arc::new(Err(e)));
        }
        // Watched through its cluster (see `Cluster::new`), which also drops the pooled
        // connections made with the old material.
        Some(o)
    }

    /// Builds the client config from the files and swaps it in.
    fn load(&self) -> Result<(), String> {
        let files = crate::tls::Reloadable::files(self);
        let fingerprints = crate::tls::fingerprints(&files);
        let loaded = crate::tls::client_config(&self.tls, self.h2)?;
        self.metrics
            .track(&format!("cluster/{}", self.cluster), &loaded.certs);
        self.connector
            .store(Arc::new(Ok(tokio_rustls::TlsConnector::from(
                loaded.config,
            ))));
        *self.fingerprints.lock().expect("not poisoned") = fingerprints;
        Ok(())
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }
    fn server_name(&self, address: &Address) -> rustls_pki_types::ServerName<'static> {
        let by_name = self
            .server_name
            .as_ref()
            .and_then(|n| rustls_pki_types::ServerName::try_from(n.clone()).ok());
        by_name.unwrap_or_else(|| match address {
            Address::Tcp(a) => rustls_pki_types::ServerName::IpAddress(a.ip().into()),
            Address::Unix(_) => {
                rustls_pki_types::ServerName::try_from("localhost").expect("a valid DNS name")
            }
        })
    }
}

impl crate::tls::Reloadable for Origination {
    fn files(&self) -> Vec<std::path::PathBuf> {
        let t = &self.tls;
        let mut files: Vec<_> = t.ca.iter().cloned().collect();
        if let Some(c) = &t.client {
            files.push(c.cert.clone());
            files.push(c.key.clone());
        }
        files
    }

    fn reload_files(&self) -> Result<(), String> {
        if self.retired() {
            return Ok(());
        }
        let now = crate::tls::fingerprints(&self.files());
        if *self.fingerprints.lock().expect("not poisoned") == now {
            return Ok(());
        }
        match self.load() {
            Ok(()) => {
                tracing::info!(cluster = %self.cluster, "TLS client material reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(cluster = %self.cluster, error = %e, "TLS client material not reloaded; keeping the old one");
                Err(e)
            }
        }
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
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

    fn reload_files(&self) -> Result<(), String> {
        let Some(o) = &self.tls else { return Ok(()) };
        let before = o.fingerprints.lock().expect("not poisoned").clone();
        crate::tls::Reloadable::reload_files(&**o)?;
        if *o.fingerprints.lock().expect("not poisoned") != before {
            self.close_idle();
        }
        Ok(())
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Stream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (address, timeout, tls) = (self.address.clone(), self.timeout, self.tls.clone());
        Box::pin(async move {
            // The connect timeout covers the TLS handshake too.
            let connect = async {
                let stream = listener::connect(&address).await?;
                let Some((origination, name)) = tls else {
                    return Ok(stream);
                };
                let current = origination.connector.load_full();
                let connector = current
                    .as_ref()
                    .as_ref()
                    .map_err(|e| std::io::Error::other(e.clone()))?;
                match connector.connect(name, stream).await {
                    Ok(s) => {
                        origination
                            .metrics
                            .handshake("client", &origination.cluster, "ok");
                        Ok(Stream::TlsClient(Box::new(s)))
                    }
                    Err(e) => {
                        let reason = crate::tls::classify(&e);
                        origination
                            .metrics
                            .handshake("client", &origination.cluster, reason);
                        tracing::warn!(cluster = %origination.cluster, endpoint = %address, reason, error = %e, "TLS handshake with the upstream failed");
                        Err(e)
                    }
                }
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(s)) => Ok(TokioIo::new(s)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                )),
            }
        })
    }
}

pub type HttpClient = Client<Connector, ProxyBody>;

/// Idle pooled connections kept per endpoint.
const POOL_MAX_IDLE: usize = 256;

/// One upstream endpoint and its state.
pub struct Endpoint {
    pub address: Address,
    /// The address as text, for access log lines and spans (formatted once).
    pub label: Arc<str>,
    pub client: HttpClient,
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
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout.get())
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .set_host(false)
            .http2_only(config.http2);
        let client = builder.build(Connector {
            address: address.clone(),
            timeout: config.connect_timeout.get(),
            tls: tls.map(|o| (o.clone(), o.server_name(&address))),
        });
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
            authority,
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ewma: Mutex::new((EWMA_DEFAULT.as_secs_f64(), Instant::now())),
        }
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

    fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// The balancer's cost: latency estimate times (requests in flight + 1).
    fn cost(&self) -> f64 {
        let (ewma, _) = *self.ewma.lock().expect("not poisoned");
        ewma * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    fn observe(&self, rtt: Duration) {
        let sample = rtt.as_secs_f64();
        let mut guard = self.ewma.lock().expect("not poisoned");
        let (ewma, at) = *guard;
        let now = Instant::now();
        // Peak: a slower sample takes over at once; faster ones pull the estimate down slowly.
        let next = if sample > ewma {
            sample
        } else {
            let w = (-(now - at).as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp();
            ewma * w + sample * (1.0 - w)
        };
        *guard = (next, now);
    }
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
    retired: std::sync::atomic::AtomicBool,
    tls: Option<Arc<Origination>>,
}

impl Cluster {
    pub fn new(config: ClusterConfig, metrics: ProxyMetrics) -> Arc<Cluster> {
        let tls = Origination::new(&config, &metrics);
        let initial = match &config.discovery {
            Discovery::Static(addrs) => addrs
                .iter()
                .map(|a| Arc::new(Endpoint::new(a.clone(), &config, tls.as_ref())))
                .collect(),
            _ => Vec::new(),
        };
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.retry_budget.min_per_second,
            config.retry_budget.ratio as f32,
        );
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
            retired: std::sync::atomic::AtomicBool::new(false),
            tls,
        });
        if cluster.tls.is_some() {
            crate::tls::spawn_watch(&cluster);
        }
        cluster.export_endpoint_count();
        cluster
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

    /// Picks an endpoint, skipping ejected ones (unless all are: then any, as Envoy's panic
    /// mode does, because refusing everything helps no one). No allocation.
    pub fn pick(&self) -> Option<Attempt> {
        let all = self.endpoints.load();
        let n = all.len();
        if n == 0 {
            return None;
        }
        let now = self.now_ms();
        let chosen = match (self.config.lb, n) {
            (_, 1) => &all[0],
            (Lb::RoundRobin, n) => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &all[(start + i) % n])
                    .find(|e| !e.ejected(now))
                    .unwrap_or(&all[start % n])
            }
            (Lb::P2cEwma, n) => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&all[a], &all[b]);
                match (ea.ejected(now), eb.ejected(now)) {
                    (false, true) => ea,
                    (true, false) => eb,
                    // Both ejected: look for any healthy one before giving up on ejection.
                    (true, true) => all.iter().find(|e| !e.ejected(now)).unwrap_or(ea),
                    (false, false) => {
                        if ea.cost() <= eb.cost() {
                            ea
                        } else {
                            eb
                        }
                    }
                }
            }
        };
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Attempt {
            endpoint: chosen.clone(),
            started: Instant::now(),
        })
    }

    /// Records a success (a response that is not a failure by the outlier rules).
    pub fn succeeded(&self, attempt: &Attempt) {
        attempt.endpoint.observe(attempt.started.elapsed());
        attempt
            .endpoint
            .consecutive_failures
            .store(0, Ordering::Relaxed);
    }

    /// Records a failure (connect error, reset, timeout or 5xx); ejects the endpoint after
    /// `outlier.consecutive_failures` in a row.
    pub fn failed(&self, attempt: &Attempt) {
        let e = &attempt.endpoint;
        e.observe(attempt.started.elapsed());
        let n = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.config.outlier.consecutive_failures;
        // Never eject more than half the cluster: past that, ejection only concentrates load.
        let now = self.now_ms();
        let all = self.endpoints.load();
        let ejected = all.iter().filter(|x| x.ejected(now)).count();
        if limit > 0 && n >= limit && (ejected + 1) * 2 <= all.len().max(2) {
            e.consecutive_failures.store(0, Ordering::Relaxed);
            let until =
                now.saturating_add(self.config.outlier.ejection_time.get().as_millis() as u64);
            e.ejected_until_ms.store(until, Ordering::Relaxed);
            self.metrics
                .ejections
                .get_or_create(&ClusterLabels {
                    cluster: self.name.clone(),
                })
                .inc();
            tracing::warn!(
                cluster = %self.name,
                endpoint = %e.address,
                failures = n,
                for_ = ?self.config.outlier.ejection_time.get(),
                "endpoint ejected after consecutive failures"
            );
        }
    }

    /// Counts a request toward the retry budget.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Asks the budget for a retry; counts the outcome.
    pub fn withdraw_retry(&self) -> bool {
        let ok = self.budget.withdraw();
        self.metrics
            .retries
            .get_or_create(&OutcomeLabels {
                cluster: self.name.clone(),
                outcome: if ok { "attempted" } else { "budget_exhausted" },
            })
            .inc();
        ok
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

    /// True for clusters whose endpoints come from DNS or a file.
    pub fn is_discovered(&self) -> bool {
        !matches!(self.config.discovery, Discovery::Static(_))
    }

    /// Resolves the endpoints once, keeping the last good ones when that fails.
    pub async fn refresh(&self) {
        let outcome = match self.resolve().await {
            Ok(addrs) if addrs.is_empty() => {
                tracing::warn!(cluster = %self.name, "discovery found no endpoints; keeping the last ones");
                "failed"
            }
            Ok(addrs) => {
                if self.set_endpoints(addrs) {
                    let now: Vec<String> = self
                        .endpoint_addresses()
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    tracing::info!(cluster = %self.name, endpoints = ?now, "endpoints changed");
                    "changed"
                } else {
                    "unchanged"
                }
            }
            Err(e) => {
                tracing::warn!(cluster = %self.name, error = %e, "discovery failed; keeping the last endpoints");
                "failed"
            }
        };
        self.metrics
            .discovery
            .get_or_create(&OutcomeLabels {
                cluster: self.name.clone(),
                outcome,
            })
            .inc();
    }

    /// Keeps DNS- or file-discovered endpoints fresh, one refresh every `refresh` (the first
    /// after one period: the module refreshes once before it reports ready). Ends once the
    /// cluster is gone (replaced by a reload and no longer used by any request).
    pub async fn discover(cluster: std::sync::Weak<Cluster>) {
        let refresh = match cluster.upgrade().map(|c| c.config.discovery.clone()) {
            Some(Discovery::Dns { refresh, .. } | Discovery::File { refresh, .. }) => refresh.get(),
            _ => return,
        };
        loop {
            tokio::time::sleep(refresh).await;
            let Some(c) = cluster.upgrade() else { return };
            if c.retired.load(Ordering::Relaxed) {
                return;
            }
            c.refresh().await;
        }
    }

    async fn resolve(&self) -> Result<Vec<Address>, String> {
        match &self.config.discovery {
            Discovery::Static(a) => Ok(a.clone()),
            Discovery::Dns { host, port, .. } => {
                let mut addrs: Vec<Address> = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| format!("cannot resolve {host}: {e}"))?
                    .map(Address::Tcp)
                    .collect();
                addrs.sort_by_key(ToString::to_string);
                addrs.dedup();
                Ok(addrs)
            }
            Discovery::File { path, .. } => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                parse_endpoints_file(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
        }
    }
}

/// An endpoints file: `endpoints: [10.0.0.1:80, unix:/run/x.sock]` (or just the list).
pub fn parse_endpoints_file(text: &str) -> Result<Vec<Address>, String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum File {
        Wrapped { endpoints: Vec<Address> },
        List(Vec<Address>),
    }
    match serde_norway::from_str::<File>(text) {
        Ok(File::Wrapped { endpoints }) | Ok(File::List(endpoints)) => Ok(endpoints),
        Err(e) => Err(format!("expected `endpoints: [host:port, ...]`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::proxy::{Outlier, RetryBudget};

    fn config(lb: Lb, n: u16) -> ClusterConfig {
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
    async fn round_robin_skips_ejected_endpoints() {
        let c = Cluster::new(config(Lb::RoundRobin, 3), ProxyMetrics::default());
        let picks: Vec<String> = (0..3)
            .map(|_| c.pick().unwrap().endpoint.address.to_string())
            .collect();
        assert_eq!(
            picks,
            ["127.0.0.1:1000", "127.0.0.1:1001", "127.0.0.1:1002"]
        );
        // Two failures in a row eject :1000.
        for _ in 0..2 {
            let a = loop {
                let a = c.pick().unwrap();
                if a.endpoint.address.to_string() == "127.0.0.1:1000" {
                    break a;
                }
            };
            c.failed(&a);
        }
        for _ in 0..10 {
            assert_ne!(
                c.pick().unwrap().endpoint.address.to_string(),
                "127.0.0.1:1000"
            );
        }
    }

    #[tokio::test]
    async fn p2c_prefers_the_faster_endpoint() {
        let c = Cluster::new(config(Lb::P2cEwma, 2), ProxyMetrics::default());
        let eps = c.endpoints.load();
        eps[0].observe(Duration::from_millis(50));
        eps[1].observe(Duration::from_micros(100));
        drop(eps);
        let fast = (0..100)
            .filter(|_| c.pick().unwrap().endpoint.address.to_string() == "127.0.0.1:1001")
            .count();
        assert_eq!(fast, 100);
    }

    #[tokio::test]
    async fn discovery_updates_keep_existing_endpoints() {
        let c = Cluster::new(config(Lb::RoundRobin, 2), ProxyMetrics::default());
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

    #[test]
    fn endpoints_files() {
        assert_eq!(
            parse_endpoints_file("endpoints: [127.0.0.1:1]\n")
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_endpoints_file("- 127.0.0.1:1\n- unix:/x\n")
                .unwrap()
                .len(),
            2
        );
        assert!(parse_endpoints_file("endpoints: [nowhere]\n").is_err());
    }

    #[tokio::test]
    async fn in_flight_cap() {
        let c = Cluster::new(config(Lb::RoundRobin, 1), ProxyMetrics::default());
        let p = c.admit().unwrap();
        assert!(c.admit().is_err());
        drop(p);
        assert!(c.admit().is_ok());
    }
}
