//! Limits: the admit phase. A listener's `limits.rate_limit` (a token bucket) and
//! `limits.max_requests_in_flight` (a semaphore) shed requests before anything else is spent on
//! them: 503 with `retry-after: 1` and `x-outrigger-error: overload`, counted in
//! `outrigger_shed_total` by reason.
//!
//! In: the request's listener state. Out: an in-flight permit the request holds until its
//! response body is done (see `Permits`), or the 503.
//!
//! Also `limits.max_request_body` (`check_body_size`, called by the forward phase once the
//! route is known): a stated body length over it is answered 413 `body-too-large`.

use std::time::Instant;

use http::Response;
use tokio::sync::OwnedSemaphorePermit;

use super::body::ProxyBody;
use super::failure::{Failure, with_close};
use super::http::HttpListener;
use super::route::Target;
use crate::config::proxy::RateLimit;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            rate: limit.requests_per_second,
            burst: f64::from(limit.burst.max(1)),
            tokens: f64::from(limit.burst.max(1)),
            last: Instant::now(),
        }
    }

    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + (now - self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Permits a request holds until its response body is done.
pub(super) struct Permits {
    pub(super) _listener: Option<OwnedSemaphorePermit>,
    pub(super) _cluster: Option<OwnedSemaphorePermit>,
}

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, moved once to the handler; boxing it would allocate per refusal"
)]
impl HttpListener {
    /// Phase: local limits (rate, then requests in flight). The 503 says which one shed the
    /// request.
    pub(super) fn admit(
        &self,
        started: Instant,
    ) -> Result<Option<OwnedSemaphorePermit>, Response<ProxyBody>> {
        self.take_limits()
            .map_err(|why| self.refuse(Failure::Overload, why, started))
    }

    /// Phase (in `forward`, before the body is read or an upstream contacted): a request whose
    /// stated length (`Content-Length`) is over `limits.max_request_body` is answered 413
    /// (`x-outrigger-error: body-too-large`), and an HTTP/1 connection closes after it (its
    /// body is not read). A body without a stated length is cut as it grows past the limit
    /// (`body::capped`).
    pub(super) fn check_body_size(
        &self,
        target: &Target,
        max: Option<u64>,
        declared: u64,
        started: Instant,
    ) -> Result<(), Response<ProxyBody>> {
        match max {
            Some(limit) if declared > limit => Err(with_close(self.fail(
                target,
                Failure::BodyTooLarge,
                &format!(
                    "the request body ({declared} bytes) is larger than {limit} bytes (limits.max_request_body)"
                ),
                started,
            ))),
            _ => Ok(()),
        }
    }

    fn take_limits(&self) -> Result<Option<OwnedSemaphorePermit>, &'static str> {
        if let Some(rate) = &self.rate
            && !rate.lock().expect("not poisoned").try_take()
        {
            self.shed_rate.inc();
            return Err("rate limit exceeded");
        }
        match &self.in_flight {
            None => Ok(None),
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Ok(Some(p)),
                Err(_) => {
                    self.shed_concurrency.inc();
                    Err("too many requests in flight")
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket() {
        let mut b = TokenBucket::new(RateLimit {
            requests_per_second: 0.001,
            burst: 2,
        });
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take());
    }

    #[test]
    fn token_bucket_burst_is_at_least_one_and_refills() {
        let mut b = TokenBucket::new(RateLimit {
            requests_per_second: 1000.0,
            burst: 0,
        });
        assert!(b.try_take(), "a burst of 0 still lets one request through");
        // Refilled at 1000/s, capped at one token.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(b.try_take());
        assert!(b.tokens < 1.0, "never more than the burst saved up");
    }
}
