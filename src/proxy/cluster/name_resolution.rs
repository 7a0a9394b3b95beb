//! Name resolution: clusters made on demand for app ids that no cluster of the config is
//! named after. Two ways to turn an app id into endpoints:
//!
//! - `bridge.name_resolution`: a `host:port` template, plain text (the bridge's invocations);
//! - `mesh:`: the `mesh.peer_dns` template and `mesh.peer_port`, over mutual TLS with this
//!   workload's certificate, the peer's SPIFFE ID required to be in the trust domain (and in
//!   the namespace its app id names, with `mesh.require_peer_namespace`). Both ends are
//!   Outrigger, so peers speak HTTP/2 (ALPN `h2`): gRPC's trailers cross, and HTTP/1.1
//!   requests ride it too; an upgrade (WebSocket) gets an HTTP/1.1 connection of its own
//!   (the endpoint's upgrade pool, ALPN `http/1.1`). A peer's cluster is named `peer:ID.NAMESPACE`, a name no declared
//!   cluster may have. The proxy's outbound listeners (a request whose Host is an app id) and
//!   the bridge's invocations share it.
//!
//! An app id is `id` (this workload's namespace) or `id.namespace`, each a DNS label, so it
//! names a workload and never an arbitrary host. Each resolved id is an ordinary
//! [`Cluster`] with default settings and DNS discovery (balancing, pools, outlier ejection,
//! retry budget, TLS origination and its certificate rotation all apply), kept while used (an
//! app id unused for [`PEER_IDLE_TIMEOUT`] is evicted, and made again on its next call);
//! at most `max` of them (each has its own metric series). The name is looked
//! up (at most [`LOOKUP_TIMEOUT`]) before any cluster is made: a name that does not resolve
//! makes no cluster, no metric series and no log line, and is answered from a short-lived,
//! bounded cache of failures for [`FAILURE_TTL`]. The mesh's peers share one TLS client
//! material per required peer namespace, built once from the identity files, watched by one
//! file watch for all of them (SIGHUP and config reloads read them again too); a renewed
//! certificate without this workload's SPIFFE ID is refused and the old material kept.
//! In: an app id. Out: its cluster, or why there is none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Cluster;
use crate::config::Address;
use crate::config::mesh::MeshConfig;
use crate::config::proxy::{ClusterConfig, DEFAULT_REFRESH, Discovery};
use crate::telemetry::metrics::{Name, ProxyMetrics, RouteLabels};
use crate::tls::LoadedClient;

/// How long an app id's name lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an app id that did not resolve is answered from the cache of failures.
pub const FAILURE_TTL: Duration = Duration::from_secs(5);
/// App ids the cache of failures holds at most (beyond, failures are not cached).
pub const MAX_FAILURES: usize = 1024;

/// A mesh peer (or a `bridge.name_resolution` app id) unused this long is evicted (its cluster, discovery and pools dropped; made
/// again on its next call): without it every app id ever called would be looked up in DNS
/// every 5 s for the sidecar's life.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often idle peers are looked for.
const EVICTION_INTERVAL: Duration = Duration::from_secs(60);

/// The `listener` label of `outrigger_tls_reloads_total` for the mesh peers' material.
pub const PEERS_RELOAD_LABEL: &str = crate::config::mesh::PEERS_LABEL;

/// App ids `bridge.name_resolution` keeps clusters for.
pub const MAX_RESOLVED: usize = 256;

/// How app ids become endpoints.
enum How {
    /// `bridge.name_resolution`: `{app_id}` and `{namespace}` in a `host:port` template.
    Template { template: String, namespace: String },
    /// `mesh:`, with the peers' TLS material by the namespace it requires of a peer (`""`
    /// for any, without `require_peer_namespace`), built once and shared by the peers.
    Mesh(Box<MeshConfig>, Mutex<HashMap<String, LoadedClient>>),
}

/// Why an app id has no cluster.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Not an app id (or the template does not make a host:port of it).
    #[error("{0}")]
    Malformed(String),
    /// `max` app ids are resolved already.
    #[error("{0}")]
    Full(String),
    /// The name does not resolve (now).
    #[error("{0}")]
    Unresolved(String),
    /// The mesh's TLS material cannot be built from the identity files (logged as an error).
    #[error("{0}")]
    Tls(String),
}

/// Clusters for app ids, made on first use and kept while used (the mesh's peers).
pub struct NameResolution {
    how: How,
    max: usize,
    metrics: ProxyMetrics,
    /// By `id.namespace`, so `payments` and `payments.shop` (in shop) share one.
    resolved: Mutex<HashMap<String, Arc<Cluster>>>,
    /// App ids (by the same key) that did not resolve, and when.
    failed: Mutex<HashMap<String, Instant>>,
    /// The routers' series of each resolved cluster (by its name), removed when it is evicted
    /// ([`NameResolution::track_route`]). Locked only under `resolved`.
    routes: Mutex<HashMap<Name, HashMap<RouteLabels, RemoveRoute>>>,
}

/// Removes the series of a route (`RouteStats::remove_series`, in the proxy's router).
pub type RemoveRoute = fn(&ProxyMetrics, &RouteLabels);

impl NameResolution {
    /// `bridge.name_resolution`: plain-text clusters; `namespace` fills `{namespace}` for ids
    /// without one. App ids unused for [`PEER_IDLE_TIMEOUT`] are evicted, as the mesh's peers
    /// are (when a runtime is running): an app id that went away gives back its place.
    pub fn template(template: String, namespace: String, metrics: ProxyMetrics) -> Arc<Self> {
        let r = Arc::new(NameResolution {
            how: How::Template {
                template,
                namespace,
            },
            max: MAX_RESOLVED,
            metrics,
            resolved: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(Self::evict_idle_peers(Arc::downgrade(&r)));
        }
        r
    }

    /// `mesh:`: mutual-TLS clusters to the peers' inbound mesh listeners, their identity
    /// files watched (one watch for all peers) when a runtime is running.
    pub fn mesh(mesh: &MeshConfig, metrics: ProxyMetrics) -> Arc<Self> {
        let r = Arc::new(NameResolution {
            max: mesh.max_peers,
            how: How::Mesh(Box::new(mesh.clone()), Mutex::new(HashMap::new())),
            metrics,
            resolved: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
        });
        // Built now from the files preflight checked, for the peers of this workload's
        // namespace (any peer without `require_peer_namespace`): a renewal that does not carry
        // the workload's SPIFFE ID is then refused and the old material kept, even before the
        // first call (built lazily, the first call would read the wrong files).
        let own = if mesh.require_peer_namespace {
            mesh.namespace.as_str()
        } else {
            ""
        };
        let _ = r.material_for(own);
        if tokio::runtime::Handle::try_current().is_ok() {
            crate::tls::spawn_watch(&r);
            tokio::spawn(Self::evict_idle_peers(Arc::downgrade(&r)));
        }
        r
    }

    /// Every [`EVICTION_INTERVAL`], evicts the peers unused for [`PEER_IDLE_TIMEOUT`]; ends
    /// with the resolution.
    async fn evict_idle_peers(this: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(EVICTION_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(r) = this.upgrade() else { return };
            r.evict_idle(PEER_IDLE_TIMEOUT);
        }
    }

    /// Drops the clusters unused for `idle` with no request in flight: retired (discovery
    /// stops, a router holding one resolves again), their certificate no longer reported.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let evicted: Vec<Arc<Cluster>> = {
            let mut resolved = self.resolved.lock().expect("not poisoned");
            let keys: Vec<String> = resolved
                .iter()
                .filter(|(_, c)| c.idle_for() >= idle && c.requests_in_flight() == 0)
                .map(|(k, _)| k.clone())
                .collect();
            let evicted: Vec<Arc<Cluster>> =
                keys.iter().filter_map(|k| resolved.remove(k)).collect();
            // Still under the lock: a call that makes the app id's cluster again waits for it,
            // so its new series (same name) are not the ones removed here.
            let mut routes = self.routes.lock().expect("not poisoned");
            for c in &evicted {
                // Retired first: its endpoint gauge is not set again after this, nor its
                // certificate's expiry or its handshake counts (`Origination::retire`).
                c.retire();
                self.metrics.tls.untrack(&format!("cluster/{}", c.name));
                self.metrics.tls.remove_client(&c.name);
                self.metrics.remove_cluster(&c.name);
                for (labels, remove) in routes.remove(&c.name).unwrap_or_default() {
                    remove(&self.metrics, &labels);
                }
            }
            evicted
        };
        for c in &evicted {
            tracing::info!(cluster = %c.name, idle_seconds = c.idle_for().as_secs(), "unused app id evicted (its cluster is made again on its next call)");
        }
        evicted.len()
    }

    /// A router made series (`labels`) for `cluster`: `remove` removes them when the cluster
    /// is evicted, or at once when it already was (a request that raced the eviction), so
    /// that the series of a peer no longer called do not stay for the sidecar's life.
    pub fn track_route(&self, cluster: &Arc<Cluster>, labels: RouteLabels, remove: RemoveRoute) {
        let resolved = self.resolved.lock().expect("not poisoned");
        if !resolved.values().any(|c| Arc::ptr_eq(c, cluster)) {
            drop(resolved);
            remove(&self.metrics, &labels);
            return;
        }
        self.routes
            .lock()
            .expect("not poisoned")
            .entry(cluster.name.clone())
            .or_default()
            .insert(labels, remove);
    }

    /// How many app ids it keeps clusters for.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The clusters resolved so far (the admin dashboard).
    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        self.resolved
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// The cluster of `app_id`, resolved now if it is new.
    pub async fn cluster(&self, app_id: &str) -> Result<Arc<Cluster>, ResolveError> {
        let (key, config) = self.config(app_id)?;
        if let Some(c) = self.resolved.lock().expect("not poisoned").get(&key) {
            c.touch();
            return Ok(c.clone());
        }
        let full = || {
            ResolveError::Full(format!(
                "cannot resolve {app_id:?}: {} app ids are resolved already (declare the clusters you use, or raise the limit)",
                self.max
            ))
        };
        if self.resolved.lock().expect("not poisoned").len() >= self.max {
            return Err(full());
        }
        let (host, port) = match &config.discovery {
            Discovery::Dns { host, port, .. } => (host.clone(), *port),
            _ => unreachable!("name resolution makes DNS clusters"),
        };
        let unresolved = || {
            ResolveError::Unresolved(format!(
                "cannot resolve {app_id:?}: {host}:{port} does not resolve"
            ))
        };
        if self.failed_recently(&key) {
            return Err(unresolved());
        }
        let lookup = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await;
        let mut addrs: Vec<Address> = match lookup {
            Ok(Ok(a)) => a.map(Address::Tcp).collect(),
            _ => Vec::new(),
        };
        addrs.sort_by_key(ToString::to_string);
        addrs.dedup();
        if addrs.is_empty() {
            self.remember_failure(key);
            return Err(unresolved());
        }
        let tls = self.material(&key)?;
        let mut resolved = self.resolved.lock().expect("not poisoned");
        if let Some(c) = resolved.get(&key) {
            // Resolved by a request racing with this one: one cluster per app id.
            return Ok(c.clone());
        }
        // Checked again under the lock: racing requests for new ids do not overshoot.
        if resolved.len() >= self.max {
            return Err(full());
        }
        let cluster = match tls {
            Some(tls) => Cluster::with_shared_tls(config, self.metrics.clone(), tls),
            None => Cluster::new(config, self.metrics.clone(), None),
        };
        cluster.set_endpoints(addrs);
        tokio::spawn(Cluster::discover(Arc::downgrade(&cluster)));
        tracing::info!(app_id, cluster = %cluster.name, endpoints = ?cluster.endpoint_addresses().iter().map(ToString::to_string).collect::<Vec<_>>(), "app id resolved");
        resolved.insert(key, cluster.clone());
        Ok(cluster)
    }

    /// `key` did not resolve less than [`FAILURE_TTL`] ago.
    fn failed_recently(&self, key: &str) -> bool {
        let failed = self.failed.lock().expect("not poisoned");
        failed.get(key).is_some_and(|t| t.elapsed() < FAILURE_TTL)
    }

    /// Caches that `key` did not resolve, within [`MAX_FAILURES`].
    fn remember_failure(&self, key: String) {
        let mut failed = self.failed.lock().expect("not poisoned");
        if failed.len() >= MAX_FAILURES {
            failed.retain(|_, t| t.elapsed() < FAILURE_TTL);
        }
        if failed.len() < MAX_FAILURES {
            failed.insert(key, Instant::now());
        }
    }

    /// The namespace a peer of `key` (`id.namespace`) must be in: its key in the material.
    fn material_key<'a>(mesh: &MeshConfig, key: &'a str) -> &'a str {
        match key.split_once('.') {
            Some((_, ns)) if mesh.require_peer_namespace => ns,
            _ => "",
        }
    }

    /// The peers' TLS material for `key`, built from the identity files on first use (`None`:
    /// not the mesh).
    fn material(&self, key: &str) -> Result<Option<LoadedClient>, ResolveError> {
        let How::Mesh(mesh, _) = &self.how else {
            return Ok(None);
        };
        self.material_for(Self::material_key(mesh, key))
    }

    /// The peers' TLS material for the required namespace `ns` (`""`: any), built from the
    /// identity files on first use (`None`: not the mesh).
    fn material_for(&self, ns: &str) -> Result<Option<LoadedClient>, ResolveError> {
        let How::Mesh(mesh, material) = &self.how else {
            return Ok(None);
        };
        let mut material = material.lock().expect("not poisoned");
        if let Some(m) = material.get(ns) {
            return Ok(Some(m.clone()));
        }
        let built = crate::tls::client_config(&mesh.peer_tls(ns), true).map_err(|e| {
            tracing::error!(error = %e, "cannot set up mutual TLS to the mesh's peers");
            ResolveError::Tls(format!("cannot set up mutual TLS to the mesh's peers: {e}"))
        })?;
        material.insert(ns.to_string(), built.clone());
        Ok(Some(built))
    }

    /// `outrigger_tls_reloads_total{listener="mesh-peers"}`: the peers' client material
    /// read again (a renewed certificate adopted, or refused and the old one kept).
    fn count_reload(&self, result: &'static str) {
        self.metrics
            .tls
            .reloads
            .get_or_create(&crate::tls::ReloadLabels {
                listener: PEERS_RELOAD_LABEL.to_string(),
                result,
            })
            .inc();
    }

    /// The map key and the cluster config of `app_id`.
    fn config(&self, app_id: &str) -> Result<(String, ClusterConfig), ResolveError> {
        match &self.how {
            How::Template {
                template,
                namespace,
            } => {
                let (id, ns) = crate::config::mesh::split_app_id(app_id, namespace)
                    .map_err(ResolveError::Malformed)?;
                let (host, port) = crate::config::bridge::resolve_name(template, id, ns)
                    .map_err(ResolveError::Malformed)?;
                let config = ClusterConfig::with_defaults(
                    app_id,
                    Discovery::Dns {
                        host,
                        port,
                        refresh: DEFAULT_REFRESH,
                    },
                );
                Ok((format!("{id}.{ns}"), config))
            }
            How::Mesh(mesh, _) => {
                let peer = mesh.peer(app_id).map_err(ResolveError::Malformed)?;
                let mut config = ClusterConfig::with_defaults(
                    &peer.cluster_name(),
                    Discovery::Dns {
                        host: peer.host,
                        port: peer.port,
                        refresh: DEFAULT_REFRESH,
                    },
                );
                config.tls = Some(mesh.peer_tls(&peer.namespace));
                // Both ends are Outrigger: HTTP/2 (ALPN h2) carries gRPC's trailers, and plain
                // HTTP/1.1 requests ride it as well; upgrades go over HTTP/1.1 (`Endpoint::send`).
                config.http2 = true;
                Ok((format!("{}.{}", peer.id, peer.namespace), config))
            }
        }
    }
}

impl crate::tls::Reloadable for NameResolution {
    /// The identity files (the mesh); none for a template.
    fn files(&self) -> Vec<std::path::PathBuf> {
        match &self.how {
            How::Mesh(mesh, _) => crate::tls::client_files(&mesh.peer_tls(&mesh.namespace)),
            How::Template { .. } => Vec::new(),
        }
    }

    /// Builds the peers' material again when the files changed, once per required namespace,
    /// and gives it to every peer (whose idle connections then close).
    fn reload_files(&self) -> Result<(), crate::tls::TlsError> {
        let How::Mesh(mesh, material) = &self.how else {
            return Ok(());
        };
        let now = crate::tls::fingerprints(&self.files());
        let rebuilt: Vec<(String, LoadedClient)> = {
            let mut material = material.lock().expect("not poisoned");
            let mut rebuilt = Vec::new();
            for (ns, m) in material.iter_mut() {
                if m.fingerprints == now {
                    continue;
                }
                match crate::tls::client_config_from(&mesh.peer_tls(ns), true, now.clone()) {
                    Ok(built) => {
                        *m = built.clone();
                        rebuilt.push((ns.clone(), built));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the mesh's TLS material not reloaded; keeping the old one");
                        self.count_reload("failure");
                        return Err(e);
                    }
                }
            }
            rebuilt
        };
        if rebuilt.is_empty() {
            return Ok(());
        }
        self.count_reload("success");
        let peers: Vec<(String, Arc<Cluster>)> = self
            .resolved
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        for (key, c) in peers {
            let ns = Self::material_key(mesh, &key);
            if let Some((_, built)) = rebuilt.iter().find(|(n, _)| n == ns) {
                c.adopt_tls(Some(built));
            }
        }
        tracing::info!("the mesh's TLS material reloaded");
        Ok(())
    }

    fn retired(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Puts another workload's certificate (same CA, SPIFFE ID `…/sa/db`) where the mesh reads
    /// its own: as if the wrong Secret were mounted on renewal.
    fn mount_another_workloads_identity(dir: &std::path::Path) {
        crate::tls::certs::issue(&crate::tls::certs::IssueOptions {
            ca_dir: dir.join("ca"),
            out: dir.join("other"),
            name: "db".into(),
            spiffe: Some("spiffe://cluster.local/ns/1/sa/db".into()),
            dns: vec![],
            ips: vec![],
            days: 20,
            expired: false,
            key: crate::tls::certs::KeyKind::Ecdsa,
        })
        .unwrap();
        for (from, to) in [("db.crt", "tls.crt"), ("db.key", "tls.key")] {
            std::fs::copy(dir.join("other").join(from), dir.join(to)).unwrap();
        }
    }

    #[tokio::test]
    async fn app_ids_resolve_once_and_within_the_bound() {
        let r = NameResolution {
            how: How::Template {
                // Digits are DNS labels: app id "2" is 127.0.0.2, namespace "9" port 9.
                template: "127.0.0.{app_id}:{namespace}".into(),
                namespace: "1".into(),
            },
            max: 2,
            metrics: ProxyMetrics::default(),
            resolved: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
        };
        let a = r.cluster("1").await.unwrap();
        assert_eq!(a.endpoint_addresses()[0].to_string(), "127.0.0.1:1");
        assert!(
            Arc::ptr_eq(&a, &r.cluster("1.1").await.unwrap()),
            "one per id"
        );
        let b = r.cluster("2.9").await.unwrap();
        assert_eq!(b.endpoint_addresses()[0].to_string(), "127.0.0.2:9");
        assert!(matches!(r.cluster("3").await, Err(ResolveError::Full(_))));
        assert!(matches!(
            r.cluster("evil.com:80").await,
            Err(ResolveError::Malformed(_))
        ));
    }

    /// An app id's cluster evicted unused takes its metric series with it (they stayed for the
    /// sidecar's life, one set per app id ever called); the app ids still in use keep theirs,
    /// and an evicted id called again starts new ones.
    #[tokio::test]
    async fn an_evicted_app_ids_metric_series_go_with_it() {
        use crate::telemetry::metrics::{
            ClusterLabels, DISCOVERY_OUTCOMES, OutcomeLabels, RETRY_OUTCOMES,
        };
        let r = NameResolution {
            how: How::Template {
                template: "127.0.0.{app_id}:{namespace}".into(),
                namespace: "1".into(),
            },
            max: 4,
            metrics: ProxyMetrics::default(),
            resolved: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
        };
        let m = &r.metrics;
        let series = |name: &str| {
            let cluster = Arc::new(name.to_string());
            let c = ClusterLabels {
                cluster: cluster.clone(),
            };
            let outcome = |outcome| OutcomeLabels {
                cluster: cluster.clone(),
                outcome,
            };
            [m.endpoints.get(&c).is_some(), m.ejections.get(&c).is_some()]
                .into_iter()
                .chain(RETRY_OUTCOMES.map(|o| m.retries.get(&outcome(o)).is_some()))
                .chain(DISCOVERY_OUTCOMES.map(|o| m.discovery.get(&outcome(o)).is_some()))
                .filter(|&there| there)
                .count()
        };
        let gone = r.cluster("1").await.unwrap();
        let kept = r.cluster("2").await.unwrap();
        for c in [&gone, &kept] {
            // Every kind of series a cluster has: retries (both outcomes: the budget runs
            // out), discovery updates, an ejection (as `Cluster::failed` counts one).
            while c.withdraw_retry() {}
            c.refresh().await;
            c.refresh().await;
            m.ejections
                .get_or_create(&ClusterLabels {
                    cluster: c.name.clone(),
                })
                .inc();
        }
        // Endpoints, ejections, retries twice (attempted, budget_exhausted), discovery
        // (unchanged).
        let all = series("1");
        assert_eq!(all, 5, "series of app id 1");
        assert_eq!(series("2"), all);
        // A request in flight keeps `kept` (eviction skips those, however long idle).
        let in_flight = kept.pick().expect("an endpoint");
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        drop(in_flight);
        assert!(gone.is_retired() && !kept.is_retired());
        assert_eq!(series("1"), 0, "the evicted app id's series removed");
        assert_eq!(series("2"), all, "the app id in use keeps its series");
        // A refresh that was under way when it was evicted does not bring them back.
        gone.refresh().await;
        gone.export_endpoint_count();
        assert_eq!(series("1"), 0);
        // Called again: a new cluster, new series.
        let again = r.cluster("1").await.unwrap();
        assert!(!Arc::ptr_eq(&again, &gone));
        assert_eq!(series("1"), 1, "its endpoint count");
    }

    /// A mesh whose identity files (a CA of cluster.local, a leaf for `web`) are in `dir`, its
    /// peers `127.0.0.{app_id}`.
    fn mesh_in(dir: &std::path::Path, require_peer_namespace: bool) -> Arc<NameResolution> {
        use crate::tls::certs::{CaOptions, IssueOptions, KeyKind};
        crate::tls::certs::create_ca(&CaOptions {
            out: dir.join("ca"),
            trust_domain: "cluster.local".into(),
            days: 10,
        })
        .unwrap();
        crate::tls::certs::issue(&IssueOptions {
            ca_dir: dir.join("ca"),
            out: dir.join("leaves"),
            name: "web".into(),
            spiffe: Some("spiffe://cluster.local/ns/1/sa/web".into()),
            dns: vec![],
            ips: vec![],
            days: 10,
            expired: false,
            key: KeyKind::Ecdsa,
        })
        .unwrap();
        std::fs::copy(dir.join("ca/ca.crt"), dir.join("ca.crt")).unwrap();
        std::fs::copy(dir.join("leaves/web.crt"), dir.join("tls.crt")).unwrap();
        std::fs::copy(dir.join("leaves/web.key"), dir.join("tls.key")).unwrap();
        let mesh = MeshConfig {
            trust_domain: "cluster.local".into(),
            namespace: "1".into(),
            service_account: "web".into(),
            identity_dir: dir.into(),
            address: crate::config::types::TcpAddress("127.0.0.1:0".parse().unwrap()),
            authz: vec![],
            peer_dns: "127.0.0.{app_id}".into(),
            peer_port: 15443,
            require_peer_namespace,
            max_peers: 3,
            outbound_address: None,
        };
        NameResolution::mesh(&mesh, ProxyMetrics::default())
    }

    /// Mounts a renewed certificate of the workload's own (the same SPIFFE ID, new dates).
    fn renew_own_certificate(dir: &std::path::Path) {
        crate::tls::certs::issue(&crate::tls::certs::IssueOptions {
            ca_dir: dir.join("ca"),
            out: dir.join("renewed"),
            name: "web".into(),
            spiffe: Some("spiffe://cluster.local/ns/1/sa/web".into()),
            dns: vec![],
            ips: vec![],
            days: 20,
            expired: false,
            key: crate::tls::certs::KeyKind::Ecdsa,
        })
        .unwrap();
        std::fs::copy(dir.join("renewed/web.crt"), dir.join("tls.crt")).unwrap();
        std::fs::copy(dir.join("renewed/web.key"), dir.join("tls.key")).unwrap();
    }

    /// A certificate reload that took its list of peers before an eviction and hands them the
    /// renewed material after it (a file watch racing the eviction task) does not put back
    /// the evicted peer's `outrigger_tls_cert_expiry_seconds` series.
    #[tokio::test]
    async fn a_reload_racing_an_eviction_does_not_bring_back_the_evicted_peers_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let r = mesh_in(dir.path(), false);
        let a = r.cluster("1").await.unwrap();
        let owner = format!("cluster/{}", a.name);
        let tracked = || {
            r.metrics
                .tls
                .certificates()
                .iter()
                .filter(|c| c.owner == owner)
                .count()
        };
        assert!(tracked() > 0, "the peer's certificate is reported");
        renew_own_certificate(dir.path());
        let How::Mesh(mesh, _) = &r.how else {
            unreachable!()
        };
        let renewed = crate::tls::client_config(&mesh.peer_tls(""), true).unwrap();
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        assert_eq!(tracked(), 0, "evicted: its certificate no longer reported");
        // The reload's last step, for the peer it listed before the eviction.
        a.adopt_tls(Some(&renewed));
        assert_eq!(
            tracked(),
            0,
            "the evicted peer's certificate series came back"
        );
    }

    /// An evicted peer's `outrigger_tls_handshakes_total{side="client"}` series go with it,
    /// and a handshake under way at the eviction does not write them again.
    #[tokio::test]
    async fn an_evicted_peers_handshake_series_go_with_it() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let r = mesh_in(dir.path(), false);
        let a = r.cluster("1").await.unwrap();
        let o = a.tls.clone().unwrap();
        let address = Address::Tcp("127.0.0.1:15443".parse().unwrap());
        // A handshake with a server that answers in plain text: it fails (`not_tls`).
        let handshake = |o: Arc<crate::tls::origination::Origination>| {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let address = address.clone();
            let done = tokio::spawn(async move {
                let name = o.server_name(&address);
                o.connect(name, ours, &address, false).await.is_err()
            });
            (done, theirs)
        };
        let answer = |mut theirs: tokio::io::DuplexStream| async move {
            theirs.write_all(b"HTTP/1.1 400 \r\n\r\n").await.unwrap();
            theirs.shutdown().await.unwrap();
            theirs
        };
        let counted = || {
            r.metrics
                .tls
                .handshakes
                .get(&crate::telemetry::tls::HandshakeLabels {
                    side: "client",
                    name: a.name.to_string(),
                    result: "not_tls",
                })
                .is_some()
        };
        let (done, theirs) = handshake(o.clone());
        let _theirs = answer(theirs).await;
        assert!(done.await.unwrap());
        assert!(counted(), "the failed handshake counted");
        // One under way when the peer is evicted, failing after.
        let (late, theirs) = handshake(o.clone());
        tokio::task::yield_now().await;
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        assert!(!counted(), "the evicted peer's series removed");
        let _theirs = answer(theirs).await;
        assert!(late.await.unwrap());
        assert!(
            !counted(),
            "a handshake under way at the eviction wrote its series again"
        );
    }

    fn fingerprints(c: &Cluster) -> Vec<u64> {
        c.tls.as_ref().unwrap().fingerprints()
    }

    #[tokio::test]
    async fn mesh_peers_share_one_material_that_reloads_for_all() {
        use crate::tls::Reloadable;
        let dir = tempfile::tempdir().unwrap();
        let r = mesh_in(dir.path(), false);
        let a = r.cluster("1").await.unwrap();
        let b = r.cluster("2.9").await.unwrap();
        let How::Mesh(_, material) = &r.how else {
            unreachable!()
        };
        assert_eq!(
            material.lock().unwrap().len(),
            1,
            "built once for all peers"
        );
        let before = fingerprints(&a);
        assert_eq!(before, fingerprints(&b));

        // A renewed certificate (as the watch or SIGHUP sees it) reaches every peer.
        renew_own_certificate(dir.path());
        r.reload_files().unwrap();
        assert_ne!(fingerprints(&a), before);
        assert_eq!(fingerprints(&a), fingerprints(&b));
    }

    #[tokio::test]
    async fn a_renewed_certificate_with_another_spiffe_id_is_refused_and_the_old_kept() {
        use crate::tls::Reloadable;
        let dir = tempfile::tempdir().unwrap();
        let r = mesh_in(dir.path(), false);
        let a = r.cluster("1").await.unwrap();
        assert_eq!(&*a.name, "peer:1.1", "a peer's cluster name is its own");
        assert!(a.config.http2, "peers speak HTTP/2");
        let before = fingerprints(&a);
        mount_another_workloads_identity(dir.path());
        let e = r.reload_files().unwrap_err().to_string();
        assert!(
            e.contains("not this workload's SPIFFE ID spiffe://cluster.local/ns/1/sa/web"),
            "{e}"
        );
        assert_eq!(fingerprints(&a), before, "the old material kept");
        let failures = r
            .metrics
            .tls
            .reloads
            .get_or_create(&crate::tls::ReloadLabels {
                listener: PEERS_RELOAD_LABEL.into(),
                result: "failure",
            })
            .get();
        assert_eq!(failures, 1);
    }

    /// Before any peer was called: the material was built when the mesh was made, so a wrong
    /// renewal is refused (counted) and the first call uses the workload's own certificate.
    #[tokio::test]
    async fn a_wrong_renewal_before_the_first_call_is_refused_too() {
        use crate::tls::Reloadable;
        let dir = tempfile::tempdir().unwrap();
        let r = mesh_in(dir.path(), false);
        let own = crate::tls::fingerprints(&r.files());
        mount_another_workloads_identity(dir.path());
        assert!(r.reload_files().is_err(), "refused before any call");
        let a = r.cluster("1").await.expect("the old material serves");
        assert_eq!(fingerprints(&a), own);
    }

    #[tokio::test]
    async fn unused_peers_are_evicted_and_made_again_on_their_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let r = mesh_in(dir.path(), false);
        let a = r.cluster("1").await.unwrap();
        assert_eq!(r.evict_idle(PEER_IDLE_TIMEOUT), 0, "just used");
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        assert!(a.is_retired(), "its discovery stops, routers resolve again");
        assert!(r.clusters().is_empty());
        let again = r.cluster("1").await.unwrap();
        assert!(!Arc::ptr_eq(&a, &again) && !again.is_retired());
        assert_eq!(again.name, a.name, "the same name: the same metric series");
    }

    #[tokio::test]
    async fn mesh_material_is_per_namespace_when_peers_must_be_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let r = mesh_in(dir.path(), true);
        r.cluster("1").await.unwrap();
        r.cluster("2").await.unwrap();
        r.cluster("2.9").await.unwrap();
        let How::Mesh(_, material) = &r.how else {
            unreachable!()
        };
        assert_eq!(material.lock().unwrap().len(), 2, "namespaces 1 and 9");
        assert!(matches!(r.cluster("3").await, Err(ResolveError::Full(_))));
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_makes_no_cluster_and_is_remembered() {
        let r = NameResolution::template(
            "{app_id}.invalid:80".into(),
            "default".into(),
            ProxyMetrics::default(),
        );
        assert!(matches!(
            r.cluster("nowhere").await,
            Err(ResolveError::Unresolved(_))
        ));
        assert!(r.clusters().is_empty(), "no cluster kept");
        assert!(
            r.failed_recently("nowhere.default"),
            "the failure is cached"
        );
        // Answered from the cache (no second lookup).
        assert!(matches!(
            r.cluster("nowhere.default").await,
            Err(ResolveError::Unresolved(_))
        ));
    }

    /// `bridge.name_resolution`'s app ids are evicted when unused, as the mesh's peers are
    /// (they used to be kept for the sidecar's life: an app id that went away kept its
    /// cluster, its DNS refreshes and its place among the 256).
    #[tokio::test]
    async fn template_app_ids_are_evicted_when_unused() {
        let r = NameResolution::template(
            "127.0.0.{app_id}:{namespace}".into(),
            "1".into(),
            ProxyMetrics::default(),
        );
        assert_eq!(
            Arc::weak_count(&r),
            1,
            "the eviction task watches the resolution"
        );
        let a = r.cluster("1").await.unwrap();
        assert_eq!(r.evict_idle(PEER_IDLE_TIMEOUT), 0, "just used");
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        assert!(a.is_retired() && r.clusters().is_empty());
        let again = r.cluster("1").await.unwrap();
        assert!(!Arc::ptr_eq(&a, &again), "made again on its next call");
    }

    #[test]
    fn the_cache_of_failures_is_bounded() {
        let r = NameResolution::template("{app_id}:80".into(), "d".into(), ProxyMetrics::default());
        for i in 0..MAX_FAILURES + 10 {
            r.remember_failure(format!("id{i}.d"));
        }
        assert_eq!(r.failed.lock().unwrap().len(), MAX_FAILURES);
    }
}
