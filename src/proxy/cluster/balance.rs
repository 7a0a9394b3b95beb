//! Balancing (`clusters.<name>.lb`): which endpoint a request goes to. `round_robin` takes
//! them in turn; `p2c_ewma` picks two at random and takes the one with the lower cost, its
//! peak-EWMA latency times its requests in flight plus one. Ejected endpoints are skipped,
//! unless all are (then any, as Envoy's panic mode does: refusing everything helps no one).
//!
//! Written here rather than taken from `tower::balance` because our endpoints are plain
//! structs shared with discovery and ejection, not `tower::Service`s, and the whole of P2C +
//! peak-EWMA is a few dozen lines. In: the cluster's endpoint set and each endpoint's
//! latency samples. Out: an [`Attempt`] (no allocation) that counts as in flight until dropped.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Attempt, Cluster, Endpoint};
use crate::config::proxy::Lb;

/// Peak-EWMA decay time: older latency samples weigh less after this.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// An endpoint with no latency sample yet is assumed this slow (so it gets tried).
pub(super) const EWMA_DEFAULT: Duration = Duration::from_millis(1);

impl Cluster {
    /// Picks an endpoint, skipping ejected ones (unless all are: then any, as Envoy's panic
    /// mode does, because refusing everything helps no one). No allocation.
    pub fn pick(&self) -> Option<Attempt> {
        let all = self.endpoints.load();
        let n = all.len();
        if n == 0 {
            return None;
        }
        // The clock is read only to choose among several (one endpoint is taken ejected or
        // not, as before): a cluster of one, the app's, reads it once less per request.
        let chosen = match (self.config.lb, n) {
            (_, 1) => &all[0],
            (Lb::RoundRobin, n) => {
                let now = self.now_ms();
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &all[(start + i) % n])
                    .find(|e| !e.ejected(now))
                    .unwrap_or(&all[start % n])
            }
            (Lb::P2cEwma, n) => {
                let now = self.now_ms();
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
}

impl Endpoint {
    /// The balancer's cost: latency estimate times (requests in flight + 1).
    fn cost(&self) -> f64 {
        let (ewma, _) = *self.ewma.lock().expect("not poisoned");
        ewma * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    /// Feeds a response time into the peak-EWMA.
    pub(super) fn observe(&self, rtt: Duration) {
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

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::*;
    use crate::telemetry::metrics::ProxyMetrics;

    #[tokio::test]
    async fn round_robin_skips_ejected_endpoints() {
        let c = Cluster::new(config(Lb::RoundRobin, 3), ProxyMetrics::default(), None);
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
        let c = Cluster::new(config(Lb::P2cEwma, 2), ProxyMetrics::default(), None);
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
    async fn peak_ewma_jumps_up_and_decays_down() {
        let c = Cluster::new(config(Lb::P2cEwma, 1), ProxyMetrics::default(), None);
        let e = c.endpoints.load()[0].clone();
        e.observe(Duration::from_millis(100));
        assert_eq!(
            e.ewma.lock().unwrap().0,
            0.1,
            "a slower sample takes over at once"
        );
        e.observe(Duration::from_millis(1));
        let after = e.ewma.lock().unwrap().0;
        assert!(after > 0.09, "a faster one pulls it down slowly: {after}");
    }

    #[tokio::test]
    async fn attempts_count_in_flight_until_dropped() {
        let c = Cluster::new(config(Lb::RoundRobin, 1), ProxyMetrics::default(), None);
        let a = c.pick().unwrap();
        assert_eq!(a.endpoint.in_flight.load(Ordering::Relaxed), 1);
        let e = a.endpoint.clone();
        drop(a);
        assert_eq!(e.in_flight.load(Ordering::Relaxed), 0);
        assert!(
            Cluster::new(config(Lb::RoundRobin, 0), ProxyMetrics::default(), None)
                .pick()
                .is_none()
        );
    }
}
