//! Certificate rotation: a listener's material lives in a [`ServerTls`]: new handshakes use
//! whatever it holds now; a watcher re-reads the files when they change (Kubernetes secret
//! volumes too) and a file that does not parse keeps the old material, reported in the log and
//! `outrigger_tls_reloads_total`. A config reload that keeps the listener's TLS settings hands it
//! the material preflight built ([`ServerTls::adopt`]). A cluster's material rotates the same way
//! through [`Reloadable`] (`tls::origination`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use super::{
    LoadedServer, ReloadLabels, TlsError, TlsMetrics, server_config, server_config_from,
    server_files,
};
use crate::config::tls::ServerTlsConfig;

/// A listener's TLS material, swapped whole when its files change.
pub struct ServerTls {
    pub listener: String,
    pub config: ServerTlsConfig,
    current: ArcSwap<ServerConfig>,
    /// The files' content when last loaded: a reload of unchanged files keeps the config
    /// (and so its session tickets).
    fingerprints: Mutex<Vec<u64>>,
    /// Replaced by a config reload: its watch ends and it no longer reports.
    retired: std::sync::atomic::AtomicBool,
    /// This side's identity (its default certificate's), for `By=` in XFCC.
    pub own_identity: ArcSwap<Option<String>>,
    metrics: TlsMetrics,
}

impl ServerTls {
    /// A listener's TLS, with the material preflight built (`None`: built here).
    pub fn new(
        listener: &str,
        config: ServerTlsConfig,
        built: Option<LoadedServer>,
        metrics: TlsMetrics,
    ) -> Result<Arc<ServerTls>, TlsError> {
        let loaded = match built {
            Some(loaded) => loaded,
            None => server_config(&config)?,
        };
        let owner = format!("listener/{listener}");
        metrics.track(&owner, &loaded.certs);
        for result in ["success", "failure"] {
            let _ = metrics.reloads.get_or_create(&ReloadLabels {
                listener: listener.to_string(),
                result,
            });
        }
        let own = loaded
            .certs
            .first()
            .and_then(|c| c.identities.first().cloned());
        let tls = Arc::new(ServerTls {
            listener: listener.to_string(),
            config,
            fingerprints: Mutex::new(loaded.fingerprints),
            retired: std::sync::atomic::AtomicBool::new(false),
            current: ArcSwap::new(loaded.config),
            own_identity: ArcSwap::from_pointee(own),
            metrics,
        });
        spawn_watch(&tls);
        Ok(tls)
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    pub fn metrics(&self) -> &TlsMetrics {
        &self.metrics
    }

    /// A config reload kept this holder (same TLS settings) and preflight built `built` from
    /// the files just now: swap it in when the files changed since the current material was
    /// read, else keep the current one (and its session tickets). Without `built`, read the
    /// files again if they changed (SIGHUP).
    pub fn adopt(&self, built: Option<&LoadedServer>) {
        match built {
            Some(b) if *self.fingerprints.lock().expect("not poisoned") != b.fingerprints => {
                self.install(b.clone());
            }
            Some(_) => {}
            None => {
                let _ = self.reload_files();
            }
        }
    }

    /// Swaps in new material; new handshakes use it.
    fn install(&self, loaded: LoadedServer) {
        self.metrics
            .track(&format!("listener/{}", self.listener), &loaded.certs);
        self.own_identity.store(Arc::new(
            loaded
                .certs
                .first()
                .and_then(|c| c.identities.first().cloned()),
        ));
        self.current.store(loaded.config);
        *self.fingerprints.lock().expect("not poisoned") = loaded.fingerprints;
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels {
                listener: self.listener.clone(),
                result: "success",
            })
            .inc();
        tracing::info!(listener = %self.listener, "TLS certificates reloaded");
    }

    /// Marks this material replaced (a config reload built another): no more reloads.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Reloadable for ServerTls {
    fn retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the files again; on success new handshakes use them, on failure the old material
    /// stays (and the error is returned, logged and counted).
    fn reload_files(&self) -> Result<(), TlsError> {
        if self.retired.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let labels = |result| ReloadLabels {
            listener: self.listener.clone(),
            result,
        };
        let now = fingerprints(&self.files());
        if *self.fingerprints.lock().expect("not poisoned") == now {
            return Ok(());
        }
        match server_config_from(&self.config, now) {
            Ok(loaded) => {
                self.install(loaded);
                Ok(())
            }
            Err(e) => {
                self.metrics.reloads.get_or_create(&labels("failure")).inc();
                tracing::error!(listener = %self.listener, error = %e, "TLS certificates not reloaded; keeping the old ones");
                Err(e)
            }
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        server_files(&self.config)
    }
}

/// TLS material read from files that can change (a listener's or a cluster's).
pub trait Reloadable: Send + Sync + 'static {
    /// The files to watch.
    fn files(&self) -> Vec<PathBuf>;
    /// Reads them again; keeps the old material when they do not parse.
    fn reload_files(&self) -> Result<(), TlsError>;
    /// Replaced by a config reload: the watch ends.
    fn retired(&self) -> bool;
}

/// Re-reads `target`'s files when they change (Kubernetes secret volumes too); ends once the
/// target is gone or retired.
pub fn spawn_watch<T: Reloadable>(target: &Arc<T>) {
    tokio::spawn(watch_files(Arc::downgrade(target)));
}

async fn watch_files<T: Reloadable>(target: Weak<T>) {
    let Some(files) = target.upgrade().map(|t| t.files()) else {
        return;
    };
    let spec = crate::watch::WatchSpec {
        paths: files,
        quiet: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
    };
    let mut watch = match crate::watch::Watch::start(spec) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the TLS files; reload them with SIGHUP");
            return;
        }
    };
    // A rotation between the first read and the watch starting is not missed (a no-op when
    // the files are unchanged).
    if let Some(t) = target.upgrade() {
        let _ = t.reload_files();
    }
    loop {
        // Checked every few seconds so a replaced target's watch does not linger.
        let changed = tokio::time::timeout(Duration::from_secs(5), watch.changed()).await;
        let Some(t) = target.upgrade() else { return };
        if t.retired() {
            return;
        }
        if changed.is_ok() {
            let _ = t.reload_files();
        }
    }
}

/// The content fingerprints of `files`.
pub fn fingerprints(files: &[PathBuf]) -> Vec<u64> {
    files.iter().map(|f| crate::watch::fingerprint(f)).collect()
}
