//! TLS metrics: handshakes by side and result, certificate file reloads, and the expiry of
//! every loaded certificate (refreshed every minute, with a warning close to expiry). The
//! `tls` module records into them; they live here with the other metric types so that the
//! whole list can be read and documented in one place.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::metrics::unix_now;

/// A loaded certificate, as far as its expiry gauge needs to know it.
pub trait CertExpiry {
    fn path(&self) -> &Path;
    /// Unix time.
    fn not_after(&self) -> i64;
    /// The identities it proves (SPIFFE IDs, DNS names), for the admin dashboard.
    fn identities(&self) -> &[String] {
        &[]
    }
}

/// A loaded certificate as the admin dashboard shows it ([`TlsMetrics::certificates`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertStatus {
    /// `listener/<name>`, `cluster/<name>` or `logs/<sink>`.
    pub owner: String,
    pub path: String,
    pub identities: Vec<String>,
    /// Unix time.
    pub not_after: i64,
}

/// TLS metrics: handshakes by result, reloads, certificate expiry.
#[derive(Clone, Default)]
pub struct TlsMetrics {
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub expiry: Family<CertLabels, Gauge<f64, AtomicU64>>,
    /// not_after (and identities) by certificate, refreshed into `expiry` periodically.
    known: Arc<Mutex<Vec<Known>>>,
    /// The results counted so far by cluster (side `client`), for [`Self::remove_client`].
    client_results: Arc<Mutex<HashMap<String, HashSet<&'static str>>>>,
}

/// A tracked certificate: its labels, not_after (Unix time) and identities.
type Known = (CertLabels, i64, Vec<String>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `server` (a listener terminating) or `client` (a cluster originating).
    pub side: &'static str,
    /// The listener's or the cluster's name.
    pub name: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub listener: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `listener/<name>`, `cluster/<name>` or `logs/<sink>`.
    pub owner: String,
    pub path: String,
}

impl TlsMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "tls_handshakes",
            "TLS handshakes by side (server, client), listener or cluster name, and result (ok, no_client_cert, unknown_ca, expired, wrong_identity, forbidden, not_tls, incompatible, timeout, ...)",
            self.handshakes.clone(),
        );
        r.register(
            "tls_reloads",
            "Reloads of a listener's certificate files by result (a failed one keeps the old material)",
            self.reloads.clone(),
        );
        r.register(
            "tls_cert_expiry_seconds",
            "Seconds until each loaded certificate expires (negative: expired)",
            self.expiry.clone(),
        );
    }

    pub fn handshake(&self, side: &'static str, name: &str, result: &'static str) {
        // A client series is noted (and written under the same lock) for `remove_client`.
        let _noted = (side == "client").then(|| {
            let mut written = self.client_results.lock().expect("not poisoned");
            if !written.get(name).is_some_and(|r| r.contains(result)) {
                written.entry(name.to_string()).or_default().insert(result);
            }
            written
        });
        self.handshakes
            .get_or_create(&HandshakeLabels {
                side,
                name: name.to_string(),
                result,
            })
            .inc();
    }

    /// Records the certificates `owner` now uses.
    pub fn track<C: CertExpiry>(&self, owner: &str, certs: &[C]) {
        self.untrack(owner);
        let mut known = self.known.lock().expect("not poisoned");
        for c in certs {
            known.push((
                CertLabels {
                    owner: owner.to_string(),
                    path: c.path().display().to_string(),
                },
                c.not_after(),
                c.identities().to_vec(),
            ));
        }
        drop(known);
        self.refresh(None);
    }

    /// Forgets `owner`'s certificates (a listener or cluster removed or without TLS now).
    pub fn untrack(&self, owner: &str) {
        let mut known = self.known.lock().expect("not poisoned");
        known.retain(|(l, _, _)| {
            if l.owner == owner {
                self.expiry.remove(l);
                false
            } else {
                true
            }
        });
    }

    /// Removes the client handshake series of cluster `name` (an evicted mesh peer), every
    /// result counted for it.
    pub fn remove_client(&self, name: &str) {
        let mut written = self.client_results.lock().expect("not poisoned");
        for result in written.remove(name).unwrap_or_default() {
            self.handshakes.remove(&HandshakeLabels {
                side: "client",
                name: name.to_string(),
                result,
            });
        }
    }

    /// The certificates in use now, with their identities and expiry.
    pub fn certificates(&self) -> Vec<CertStatus> {
        self.known
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(l, not_after, identities)| CertStatus {
                owner: l.owner.clone(),
                path: l.path.clone(),
                identities: identities.clone(),
                not_after: *not_after,
            })
            .collect()
    }

    /// Updates the expiry gauges; with a warning threshold, logs certificates close to expiry.
    pub fn refresh(&self, warn_below: Option<Duration>) {
        let now = unix_now();
        for (labels, not_after, _) in self.known.lock().expect("not poisoned").iter() {
            let left = *not_after as f64 - now;
            self.expiry.get_or_create(labels).set(left);
            if let Some(w) = warn_below
                && left < w.as_secs_f64()
            {
                tracing::warn!(owner = %labels.owner, path = %labels.path, days_left = format!("{:.1}", left / 86_400.0), "certificate expires soon");
            }
        }
    }

    /// Refreshes the gauges every minute and warns (hourly) about certificates that expire
    /// within `warn_below`.
    pub fn spawn_expiry_task(&self, warn_below: Duration) {
        let m = self.clone();
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                m.refresh(tick.is_multiple_of(60).then_some(warn_below));
                tick += 1;
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });
    }
}
