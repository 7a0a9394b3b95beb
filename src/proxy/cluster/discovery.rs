//! Discovery: where a cluster's endpoints come from (`clusters.<name>.discovery`): a static
//! list, DNS (`host` and `port`, re-resolved every `refresh`) or a file (`endpoints:
//! [10.0.0.1:80, unix:/run/x.sock]`, re-read every `refresh`). A failed or empty resolution
//! keeps the last endpoints.
//!
//! In: the resolver's answer or the file's text. Out: the cluster's endpoint set (see
//! [`Cluster::set_endpoints`], which keeps the pools of endpoints that stay), the
//! `outrigger_endpoints` gauge and `outrigger_discovery_total` by outcome.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;

use super::Cluster;
use crate::config::Address;
use crate::config::proxy::Discovery;
use crate::telemetry::metrics::{
    DISCOVERY_CHANGED, DISCOVERY_FAILED, DISCOVERY_UNCHANGED, OutcomeLabels,
};

/// How long the proxy waits for the first DNS/file resolution before reporting ready.
const FIRST_DISCOVERY: Duration = Duration::from_secs(5);

impl Cluster {
    /// True for clusters whose endpoints come from DNS or a file.
    pub fn is_discovered(&self) -> bool {
        !matches!(self.config.discovery, Discovery::Static(_))
    }

    /// Resolves the endpoints once, keeping the last good ones when that fails.
    pub async fn refresh(&self) {
        let outcome = match self.resolve().await {
            Ok(addrs) if addrs.is_empty() => {
                tracing::warn!(cluster = %self.name, "discovery found no endpoints; keeping the last ones");
                DISCOVERY_FAILED
            }
            Ok(addrs) => {
                if self.set_endpoints(addrs) {
                    let now: Vec<String> = self
                        .endpoint_addresses()
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    tracing::info!(cluster = %self.name, endpoints = ?now, "endpoints changed");
                    DISCOVERY_CHANGED
                } else {
                    DISCOVERY_UNCHANGED
                }
            }
            Err(e) => {
                tracing::warn!(cluster = %self.name, error = %e, "discovery failed; keeping the last endpoints");
                DISCOVERY_FAILED
            }
        };
        // Evicted (or replaced) while it resolved: its series are gone, or its successor's.
        if self.is_retired() {
            return;
        }
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
                // At most 1 MiB, like every YAML file read (config/file_limits.rs).
                let text = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || crate::config::file_limits::read(&path)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                parse_endpoints_file(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
        }
    }
}

/// Resolves DNS- and file-discovered clusters once, bounded: so that early requests do not
/// meet an empty cluster, while a resolver that hangs does not hold the sidecar.
pub async fn first_discovery(clusters: &[Arc<Cluster>]) {
    let mut first = JoinSet::new();
    for c in clusters.iter().filter(|c| c.is_discovered()) {
        let c = c.clone();
        first.spawn(async move { c.refresh().await });
    }
    if first.is_empty() {
        return;
    }
    let all_done = async { while first.join_next().await.is_some() {} };
    if tokio::time::timeout(FIRST_DISCOVERY, all_done)
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?FIRST_DISCOVERY, "endpoint discovery still pending; serving anyway");
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
    crate::config::file_limits::check_shape(text)
        .map_err(|d| format!("line {} column {}: {}", d.line, d.column, d.message))?;
    match serde_norway::from_str::<File>(text) {
        Ok(File::Wrapped { endpoints }) | Ok(File::List(endpoints)) => Ok(endpoints),
        Err(e) => Err(format!("expected `endpoints: [host:port, ...]`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_endpoints_file_is_refused_at_its_limit() {
        let deep = format!("endpoints: {}{}\n", "[".repeat(20_000), "]".repeat(20_000));
        let e = parse_endpoints_file(&deep).unwrap_err();
        assert!(e.contains("nest more than 32 levels deep"), "{e}");
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
}
