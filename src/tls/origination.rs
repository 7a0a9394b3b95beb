//! Origination: TLS from a cluster to its endpoints (`clusters.<name>.tls`). One
//! [`Origination`] per cluster holds the rustls client config built from the cluster's files
//! (CA bundle or system roots, client certificate, minimum version, SNI, a required upstream
//! identity) and swaps it when the files change (watched like a listener's) or on SIGHUP;
//! connections made afterwards use the new one.
//!
//! In: the cluster's config, and a connected stream from the proxy's connector. Out: the TLS
//! stream (handshake outcomes counted in `outrigger_tls_handshakes_total`, side `client`), or
//! the handshake error. When the material cannot be built, connections fail: never fall back
//! to plain text.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Reloadable, TlsMetrics};
use crate::config::Address;
use crate::config::proxy::{ClusterConfig, Discovery};
use crate::config::tls::ClientTlsConfig;

/// TLS origination for a cluster's endpoints. The client config is swapped when its files
/// change (watched like a listener's) or on SIGHUP; connections made afterwards use it.
pub struct Origination {
    /// The rustls client config, or why it could not be built (connections then fail: never
    /// fall back to plain text).
    connector: ArcSwap<Result<Connectors, String>>,
    cluster: String,
    /// `tls.server_name`, else the DNS host; else each endpoint's IP.
    server_name: Option<String>,
    metrics: TlsMetrics,
    tls: ClientTlsConfig,
    h2: bool,
    fingerprints: Mutex<Vec<u64>>,
    retired: AtomicBool,
}

/// The client configs made from one read of the files.
struct Connectors {
    /// As the cluster speaks: ALPN `h2` for an `http2` cluster, else `http/1.1`.
    own: tokio_rustls::TlsConnector,
    /// For an `http2` cluster, the same material offering only `http/1.1`: the connections of
    /// upgrade requests (WebSocket), which HTTP/2 cannot carry.
    http1: Option<tokio_rustls::TlsConnector>,
}

impl Origination {
    /// The cluster's origination, if it has `tls`, with the material preflight built (`None`:
    /// built here). Material that cannot be built is logged and kept as the reason connections
    /// fail.
    pub fn new(
        config: &ClusterConfig,
        metrics: &TlsMetrics,
        built: Option<super::LoadedClient>,
    ) -> Option<Arc<Origination>> {
        let tls = config.tls.as_ref()?;
        let server_name = tls.server_name.clone().or_else(|| match &config.discovery {
            Discovery::Dns { host, .. } => Some(host.clone()),
            _ => None,
        });
        let o = Arc::new(Origination {
            connector: ArcSwap::from_pointee(Err("not loaded yet".to_string())),
            cluster: config.name.clone(),
            server_name,
            metrics: metrics.clone(),
            tls: tls.clone(),
            h2: config.http2,
            fingerprints: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
        });
        let loaded = match built {
            Some(loaded) => Ok(loaded),
            None => super::client_config(tls, config.http2),
        };
        if let Err(e) = loaded.map(|l| o.install(l)) {
            tracing::error!(cluster = %config.name, error = %e, "cannot set up TLS; connections to this cluster will fail");
            o.connector.store(Arc::new(Err(e.to_string())));
        }
        // Watched through its cluster (see `Cluster::new`), which also drops the pooled
        // connections made with the old material.
        Some(o)
    }

    /// Builds the client config from the files (whose `fingerprints` were just taken) and
    /// swaps it in; false when retired meanwhile (nothing swapped in).
    fn load(&self, fingerprints: Vec<u64>) -> Result<bool, super::TlsError> {
        let loaded = super::client_config_from(&self.tls, self.h2, fingerprints)?;
        Ok(self.install(loaded))
    }

    /// A config reload kept this cluster (same settings) and preflight built `built` from the
    /// files just now: swap it in when the files changed since the current material was read.
    /// True when the material changed (pooled connections then belong to the old one).
    pub fn adopt(&self, built: &super::LoadedClient) -> bool {
        if *self.fingerprints.lock().expect("not poisoned") == built.fingerprints {
            return false;
        }
        if !self.install(built.clone()) {
            return false;
        }
        tracing::info!(cluster = %self.cluster, "TLS client material reloaded");
        true
    }

    /// Swaps in `loaded`, unless retired (false then). Under the fingerprints' lock, as [`Self::retire`]:
    /// a reload racing the eviction of a mesh peer (which retires it, then removes its
    /// certificate's series) either writes the series before the removal or not at all.
    fn install(&self, loaded: super::LoadedClient) -> bool {
        let mut current = self.fingerprints.lock().expect("not poisoned");
        if self.retired.load(Ordering::Relaxed) {
            return false;
        }
        let fingerprints = loaded.fingerprints.clone();
        self.metrics
            .track(&format!("cluster/{}", self.cluster), &loaded.certs);
        let http1 = self.h2.then(|| {
            let mut c = (*loaded.config).clone();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(c))
        });
        self.connector.store(Arc::new(Ok(Connectors {
            own: tokio_rustls::TlsConnector::from(loaded.config),
            http1,
        })));
        *current = fingerprints;
        true
    }

    /// Replaced by a config reload, or an evicted mesh peer: no more reloading, and no more
    /// material installed (nor its certificate's series written) once an install under way is
    /// done.
    pub fn retire(&self) {
        let _installing = self.fingerprints.lock().expect("not poisoned");
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Counts a handshake's result, unless retired: under the fingerprints' lock, as
    /// [`Self::install`], so that an evicted mesh peer's handshake series, removed after it is
    /// retired, are not written again by a handshake that was under way.
    fn count_handshake(&self, result: &'static str) {
        let _retiring = self.fingerprints.lock().expect("not poisoned");
        if !self.retired.load(Ordering::Relaxed) {
            self.metrics.handshake("client", &self.cluster, result);
        }
    }

    /// The fingerprints of the files the current material was built from.
    pub fn fingerprints(&self) -> Vec<u64> {
        self.fingerprints.lock().expect("not poisoned").clone()
    }

    /// The name to verify an endpoint's certificate against (and send as SNI).
    pub fn server_name(&self, address: &Address) -> ServerName<'static> {
        let by_name = self
            .server_name
            .as_ref()
            .and_then(|n| ServerName::try_from(n.clone()).ok());
        by_name.unwrap_or_else(|| match address {
            Address::Tcp(a) => ServerName::IpAddress(a.ip().into()),
            Address::Unix(_) => ServerName::try_from("localhost").expect("a valid DNS name"),
        })
    }

    /// The TLS handshake on a connection to `endpoint`, with the material held now; `http1`
    /// offers only `http/1.1` by ALPN even for an `http2` cluster (an upgrade's connection).
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        name: ServerName<'static>,
        stream: S,
        endpoint: &Address,
        http1: bool,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
        let current = self.connector.load_full();
        let connectors = current
            .as_ref()
            .as_ref()
            .map_err(|e| std::io::Error::other(e.clone()))?;
        let connector = match &connectors.http1 {
            Some(h1) if http1 => h1,
            _ => &connectors.own,
        };
        match connector.connect(name, stream).await {
            Ok(s) => {
                self.count_handshake("ok");
                Ok(s)
            }
            Err(e) => {
                let reason = super::classify(&e);
                self.count_handshake(reason);
                tracing::warn!(cluster = %self.cluster, endpoint = %endpoint, reason, error = %e, "TLS handshake with the upstream failed");
                Err(e)
            }
        }
    }
}

impl Reloadable for Origination {
    fn files(&self) -> Vec<std::path::PathBuf> {
        super::client_files(&self.tls)
    }

    fn reload_files(&self) -> Result<(), super::TlsError> {
        if self.retired() {
            return Ok(());
        }
        let now = super::fingerprints(&self.files());
        if *self.fingerprints.lock().expect("not poisoned") == now {
            return Ok(());
        }
        match self.load(now) {
            Ok(installed) => {
                if installed {
                    tracing::info!(cluster = %self.cluster, "TLS client material reloaded");
                }
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
