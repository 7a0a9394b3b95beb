//! Outlier ejection (`clusters.<name>.outlier`): an endpoint that fails
//! `consecutive_failures` times in a row (connect error, reset, timeout or 5xx) is left out of
//! balancing for `ejection_time`. Never more than half the cluster is ejected: past that,
//! ejection only concentrates the load on fewer endpoints.
//!
//! In: each attempt's outcome, from the forward phase and tcp listeners. Out: the endpoint's
//! ejection deadline (read by the balancer), its latency estimate, and
//! `outrigger_ejections_total` plus a warning per ejection.

use std::sync::atomic::Ordering;

use super::{Attempt, Cluster, Endpoint};
use crate::telemetry::metrics::ClusterLabels;

impl Endpoint {
    /// Whether the endpoint sits out at `now_ms` (milliseconds since the cluster's epoch).
    pub(super) fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

impl Cluster {
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::*;
    use crate::config::proxy::Lb;
    use crate::telemetry::metrics::ProxyMetrics;

    fn ejected(c: &Cluster) -> usize {
        let now = c.now_ms();
        c.endpoints.load().iter().filter(|e| e.ejected(now)).count()
    }

    #[tokio::test]
    async fn ejects_after_consecutive_failures_only() {
        let c = Cluster::new(config(Lb::RoundRobin, 4), ProxyMetrics::default(), None);
        let first = c.endpoints.load()[0].clone();
        let attempt = || {
            first.in_flight.fetch_add(1, Ordering::Relaxed);
            Attempt {
                endpoint: first.clone(),
                started: std::time::Instant::now(),
            }
        };
        c.failed(&attempt());
        c.succeeded(&attempt());
        c.failed(&attempt());
        assert_eq!(ejected(&c), 0, "a success in between resets the count");
        c.failed(&attempt());
        assert_eq!(ejected(&c), 1);
        // As the admin dashboard sees it.
        let status = c.endpoint_status();
        assert!(status[0].ejected_for_ms > 59_000, "{status:?}");
        assert_eq!(status[1].ejected_for_ms, 0);
    }

    #[tokio::test]
    async fn never_ejects_more_than_half() {
        let c = Cluster::new(config(Lb::RoundRobin, 2), ProxyMetrics::default(), None);
        for e in c.endpoints.load().iter() {
            for _ in 0..4 {
                e.in_flight.fetch_add(1, Ordering::Relaxed);
                c.failed(&Attempt {
                    endpoint: e.clone(),
                    started: std::time::Instant::now(),
                });
            }
        }
        assert_eq!(ejected(&c), 1);
    }
}
