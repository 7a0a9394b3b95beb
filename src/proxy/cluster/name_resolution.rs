//! Name resolution: clusters made on demand for app ids that no cluster of the config is
//! named after. Two ways to turn an app id into endpoints:
//!
//! - `bridge.name_resolution`: a `host:port` template, plain text (the bridge's invocations);
//! - `mesh:`: the `mesh.peer_dns` template and `mesh.peer_port`, over mutual TLS with this
//!   workload's certificate, the peer's SPIFFE ID required to be in the trust domain (and in
//!   the namespace its app id names, with `mesh.require_peer_namespace`). The proxy's outbound
//!   listeners (a request whose Host is an app id) and the bridge's invocations share it.
//!
//! An app id is `id` (this workload's namespace) or `id.namespace`, each a DNS label, so it
//! names a workload and never an arbitrary host. Each resolved id is an ordinary
//! [`Cluster`] with default settings and DNS discovery (balancing, pools, outlier ejection,
//! retry budget, TLS origination and its certificate rotation all apply), kept for the
//! sidecar's life; at most `max` of them (each has its own metric series). A name that does not
//! resolve is not kept. In: an app id. Out: its cluster, or why there is none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Cluster;
use crate::config::mesh::MeshConfig;
use crate::config::proxy::{ClusterConfig, DEFAULT_REFRESH, Discovery};
use crate::telemetry::metrics::ProxyMetrics;

/// App ids `bridge.name_resolution` keeps clusters for.
pub const MAX_RESOLVED: usize = 256;

/// How app ids become endpoints.
enum How {
    /// `bridge.name_resolution`: `{app_id}` and `{namespace}` in a `host:port` template.
    Template { template: String, namespace: String },
    /// `mesh:`.
    Mesh(Box<MeshConfig>),
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
}

/// Clusters for app ids, made on first use and kept.
pub struct NameResolution {
    how: How,
    max: usize,
    metrics: ProxyMetrics,
    /// By `id.namespace`, so `payments` and `payments.shop` (in shop) share one.
    resolved: Mutex<HashMap<String, Arc<Cluster>>>,
}

impl NameResolution {
    /// `bridge.name_resolution`: plain-text clusters; `namespace` fills `{namespace}` for ids
    /// without one.
    pub fn template(template: String, namespace: String, metrics: ProxyMetrics) -> Self {
        NameResolution {
            how: How::Template {
                template,
                namespace,
            },
            max: MAX_RESOLVED,
            metrics,
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// `mesh:`: mutual-TLS clusters to the peers' inbound mesh listeners.
    pub fn mesh(mesh: &MeshConfig, metrics: ProxyMetrics) -> Self {
        NameResolution {
            max: mesh.max_peers,
            how: How::Mesh(Box::new(mesh.clone())),
            metrics,
            resolved: Mutex::new(HashMap::new()),
        }
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
            return Ok(c.clone());
        }
        if self.resolved.lock().expect("not poisoned").len() >= self.max {
            return Err(ResolveError::Full(format!(
                "cannot resolve {app_id:?}: {} app ids are resolved already (declare the clusters you use, or raise the limit)",
                self.max
            )));
        }
        let (host, port) = match &config.discovery {
            Discovery::Dns { host, port, .. } => (host.clone(), *port),
            _ => unreachable!("name resolution makes DNS clusters"),
        };
        let cluster = Cluster::new(config, self.metrics.clone(), None);
        cluster.refresh().await;
        if cluster.endpoint_addresses().is_empty() {
            cluster.retire();
            return Err(ResolveError::Unresolved(format!(
                "cannot resolve {app_id:?}: {host}:{port} does not resolve"
            )));
        }
        let mut resolved = self.resolved.lock().expect("not poisoned");
        if let Some(c) = resolved.get(&key) {
            // Resolved by a request racing with this one: one cluster per app id.
            cluster.retire();
            return Ok(c.clone());
        }
        tokio::spawn(Cluster::discover(Arc::downgrade(&cluster)));
        tracing::info!(app_id, cluster = %cluster.name, endpoints = ?cluster.endpoint_addresses().iter().map(ToString::to_string).collect::<Vec<_>>(), "app id resolved");
        resolved.insert(key, cluster.clone());
        Ok(cluster)
    }

    /// The map key and the cluster config of `app_id`.
    fn config(&self, app_id: &str) -> Result<(String, ClusterConfig), ResolveError> {
        match &self.how {
            How::Template {
                template,
                namespace,
            } => {
                let (id, ns) = app_id.split_once('.').unwrap_or((app_id, namespace));
                if !crate::config::mesh::dns_label(id) || !crate::config::mesh::dns_label(ns) {
                    return Err(ResolveError::Malformed(format!(
                        "app id {app_id:?} cannot be resolved: expected a DNS label (lowercase letters, digits, '-'; at most 63), optionally .namespace"
                    )));
                }
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
            How::Mesh(mesh) => {
                let (namespace, host, port) = mesh.peer(app_id).map_err(ResolveError::Malformed)?;
                let id = app_id.split('.').next().unwrap_or(app_id);
                let mut config = ClusterConfig::with_defaults(
                    app_id,
                    Discovery::Dns {
                        host,
                        port,
                        refresh: DEFAULT_REFRESH,
                    },
                );
                config.tls = Some(mesh.peer_tls(&namespace));
                Ok((format!("{id}.{namespace}"), config))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
