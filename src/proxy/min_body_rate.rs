//! The minimum data rate of request bodies (`limits.min_body_rate`): a body that trickles
//! (1 byte a second) held its connection, its in-flight slot and an upstream connection until
//! the route timeout; it is now cut once it falls behind the rate: 408 when no response has
//! begun, and the connection is closed.
//!
//! The rule (Kestrel's minimum data rate, with Apache `mod_reqtimeout`'s cap on saved-up
//! slack): a body starts with `grace` seconds of credit; time spent *waiting for the client*
//! uses it up, and every byte that arrives adds `1 / bytes_per_second` seconds, never more than
//! `grace` in all. When the credit runs out while waiting, the body fails with [`TooSlow`].
//! Time the proxy does not ask for data (the upstream reads slowly: backpressure) is not the
//! client's and does not count. gRPC bodies are exempt: a client stream may be quiet for
//! minutes by design (ASP.NET Core turns the rate off for gRPC streams too).
//!
//! In: the request body (hyper's `Incoming`, or our HTTP/2 server's `RecvBody`). Out: the
//! same frames, or [`TooSlow`]; the forward phase turns that into the 408
//! (`request-timeout`). The HTTP/1 fast path, which
//! reads a body's bytes itself, keeps a [`Credit`] per body and asks it for the deadline of
//! each wait on the client: the same rule, without a body type around the bytes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::body::BoxError;
use crate::config::proxy::MinBodyRate;

/// The body fell behind `limits.min_body_rate`.
#[derive(Debug)]
pub struct TooSlow(MinBodyRate);

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body arrived slower than {} bytes/s (limits.min_body_rate)",
            self.0.bytes_per_second
        )
    }
}

impl std::error::Error for TooSlow {}

/// Whether `e` (or an error it wraps) is a [`TooSlow`].
pub fn too_slow(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::errors::any_cause(e, |err| err.is::<TooSlow>())
}

/// The rate that applies to a request with these headers: none for gRPC.
pub fn applies(rate: Option<MinBodyRate>, headers: &HeaderMap) -> Option<MinBodyRate> {
    rate.filter(|_| !is_grpc(headers))
}

/// A gRPC request (`content-type: application/grpc*`): exempt from the body limits.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A body's waiting credit under a rate: the rule above, kept by whoever reads the body.
#[derive(Clone, Copy, Debug)]
pub struct Credit {
    rate: MinBodyRate,
    /// Seconds of waiting left.
    seconds: f64,
}

impl Credit {
    /// A body's credit to begin with (`grace`); None when no rate applies.
    pub fn new(rate: Option<MinBodyRate>) -> Option<Credit> {
        rate.map(|rate| Credit {
            rate,
            seconds: rate.grace.get().as_secs_f64(),
        })
    }

    /// When a wait for the client that began at `since` has used up the credit.
    pub fn deadline(&self, since: Instant) -> Instant {
        since + Duration::from_secs_f64(self.seconds.max(0.0))
    }

    /// `n` bytes arrived after waiting for them since `since` (None: no wait).
    pub fn arrived(&mut self, since: Option<Instant>, n: usize) {
        if let Some(since) = since {
            self.seconds -= since.elapsed().as_secs_f64();
        }
        let grace = self.rate.grace.get().as_secs_f64();
        self.seconds =
            (self.seconds.max(0.0) + n as f64 / self.rate.bytes_per_second as f64).min(grace);
    }

    /// The error a body gets when its credit ran out while waiting.
    pub fn too_slow(&self) -> TooSlow {
        TooSlow(self.rate)
    }
}

/// `inner`, cut with [`TooSlow`] when it falls behind `rate` (unwatched when `rate` is None).
pub struct Watched<B> {
    inner: B,
    credit: Option<Credit>,
    /// Since when the proxy waits for the client (its last poll was Pending).
    waiting_since: Option<Instant>,
    /// Fires when the credit runs out while waiting; made on the first wait only.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

pub fn watch<B>(inner: B, rate: Option<MinBodyRate>) -> Watched<B> {
    Watched {
        inner,
        credit: Credit::new(rate),
        waiting_since: None,
        timer: None,
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(credit) = &mut this.credit else {
            return polled.map_err(Into::into);
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len());
                credit.arrived(this.waiting_since.take(), n);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let since = *this.waiting_since.get_or_insert_with(Instant::now);
                let deadline = credit.deadline(since);
                let timer = match &mut this.timer {
                    Some(t) => {
                        if t.deadline() != deadline {
                            t.as_mut().reset(deadline);
                        }
                        t
                    }
                    None => this
                        .timer
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(credit.too_slow())))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn rate(bytes_per_second: u64, grace_ms: u64) -> Option<MinBodyRate> {
        Some(MinBodyRate {
            bytes_per_second,
            grace: crate::config::Duration::from_millis(grace_ms),
        })
    }

    /// A body fed by hand: (bytes, after waiting this many ms) steps.
    struct Trickle {
        steps: std::collections::VecDeque<(usize, u64)>,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let Some(&(n, wait)) = self.steps.front() else {
                return Poll::Ready(None);
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(wait))));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
            self.steps.pop_front();
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n])))))
        }
    }

    fn trickle(steps: Vec<(usize, u64)>) -> Trickle {
        Trickle {
            steps: steps.into(),
            sleep: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_cut_once_the_grace_is_used_up() {
        // 1 byte a second against 100 B/s with 2 s of grace: cut during the third wait.
        let body = watch(trickle(vec![(1, 1000); 10]), rate(100, 2000));
        let started = tokio::time::Instant::now();
        let err = body.collect().await.unwrap_err();
        assert!(too_slow(&*err), "{err}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2000) && took < Duration::from_millis(2100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_above_the_rate_passes_however_long_it_takes() {
        // 120 bytes a second against 100 B/s: 30 s, never cut.
        let body = watch(trickle(vec![(120, 1000); 30]), rate(100, 2000));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 3600);
    }

    #[tokio::test(start_paused = true)]
    async fn saved_up_credit_is_capped_at_the_grace() {
        // A fast start (1 MB at once) does not buy minutes of trickling afterwards.
        let mut steps = vec![(1_000_000, 0)];
        steps.extend(vec![(1, 1000); 10]);
        let body = watch(trickle(steps), rate(100, 2000));
        let started = tokio::time::Instant::now();
        assert!(body.collect().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_proxy_does_not_ask_for_data_is_not_counted() {
        let mut body = watch(trickle(vec![(10, 0), (10, 0)]), rate(100, 1000));
        assert!(body.frame().await.unwrap().is_ok());
        // The upstream reads slowly: 10 s before the next poll.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(body.frame().await.unwrap().is_ok());
    }

    #[test]
    fn grpc_is_exempt() {
        let mut h = HeaderMap::new();
        assert!(applies(rate(1, 1), &h).is_some());
        h.insert(
            http::header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert!(applies(rate(1, 1), &h).is_none());
    }
}
