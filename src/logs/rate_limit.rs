//! A source's rate limit (`rate_limit: {per_second, burst}`): a token bucket, refilled at
//! `per_second` tokens a second up to `burst`, one token per record.
//!
//! What happens past it differs by source, because only one of them can wait: a file source
//! stops reading until tokens come back (its lines wait on disk, positions do not move — the
//! same backpressure as a slow sink, nothing is lost); the app's stdout/stderr cannot be paused,
//! so their lines past the limit are dropped and counted (`reason="rate_limit"`), still echoed.
//!
//! Written by hand (twenty lines): `governor`, the usual crate, brings a clock abstraction,
//! keyed limiters and atomics this single-threaded use needs none of.

use std::time::Instant;

use crate::config::logs::RateLimit;

pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit) -> TokenBucket {
        TokenBucket {
            per_second: f64::from(limit.per_second),
            burst: f64::from(limit.burst),
            tokens: f64::from(limit.burst),
            at: Instant::now(),
        }
    }

    /// Whether a record may go now (its token is taken with [`TokenBucket::take`]).
    pub fn ready(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
        self.tokens >= 1.0
    }

    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = TokenBucket::new(RateLimit {
            per_second: 10,
            burst: 3,
        });
        let t = b.at;
        let mut taken = 0;
        while b.ready(t) {
            b.take();
            taken += 1;
        }
        assert_eq!(taken, 3);
        // A tenth of a second gives one token; a long pause refills to the burst only.
        assert!(b.ready(t + Duration::from_millis(100)));
        b.take();
        assert!(!b.ready(t + Duration::from_millis(150)));
        let later = t + Duration::from_secs(60);
        let mut taken = 0;
        while b.ready(later) {
            b.take();
            taken += 1;
        }
        assert_eq!(taken, 3);
    }
}
