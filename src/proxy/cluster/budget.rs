//! The retry budget (`clusters.<name>.retry_budget`): retries may add at most `ratio` of the
//! cluster's requests (over a 10 s window), plus `min_per_second`, so that retries cannot
//! multiply the load on a cluster that is already failing. tower's `TpsBudget`.
//!
//! In: every request forwarded to the cluster (a deposit) and every retry the forward phase
//! wants (a withdrawal). Out: yes or no, counted in `outrigger_retries_total` by outcome
//! (`attempted`, `budget_exhausted`).

use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

use super::Cluster;
use crate::config::proxy::RetryBudget;
use crate::telemetry::metrics::{OutcomeLabels, RETRY_ATTEMPTED, RETRY_BUDGET_EXHAUSTED};

/// The window the budget's ratio is measured over.
const WINDOW: Duration = Duration::from_secs(10);

/// A new, full budget.
pub(super) fn budget(config: &RetryBudget) -> TpsBudget {
    TpsBudget::new(WINDOW, config.min_per_second, config.ratio as f32)
}

impl Cluster {
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
                outcome: if ok {
                    RETRY_ATTEMPTED
                } else {
                    RETRY_BUDGET_EXHAUSTED
                },
            })
            .inc();
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_beyond_the_budget_are_refused() {
        let b = budget(&RetryBudget {
            ratio: 0.5,
            min_per_second: 0,
        });
        for _ in 0..10 {
            b.deposit();
        }
        let granted = (0..20).filter(|_| b.withdraw()).count();
        assert!(
            (1..=6).contains(&granted),
            "about half of 10 requests, got {granted}"
        );
        assert!(!b.withdraw());
    }
}
