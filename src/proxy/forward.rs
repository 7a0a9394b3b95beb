//! Forward: the request goes to an endpoint of the route's cluster and the upstream's response
//! comes back. The request body is read ahead when it is small or chunked (so that it can be
//! replayed), the cluster's in-flight cap is taken, then each attempt picks an endpoint
//! (balancing, skipping ejected ones), sends with the route's timeout, and reports the outcome
//! to the cluster (outlier ejection, latency). A failed attempt is retried when the route's
//! `retry` names the failure, the method allows it, the body can be replayed and the cluster's
//! retry budget has room, after a jittered exponential backoff.
//!
//! In: the prepared request (see `headers`) and its [`Target`]. Out: the upstream's response
//! and the cluster's in-flight permit, or an error response (see `failure`); a 101 is handed to
//! `upgrade`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::Body;
use tokio::sync::OwnedSemaphorePermit;

use super::body::{self, ProxyBody, REPLAY_LIMIT, RequestBody, UpstreamBody};
use super::failure::{Failure, Fault, exchange_fault, with_close};
use super::http::{Downstream, HttpListener, RequestBodyIn};
use super::min_body_rate;
use super::route::Target;
use super::upgrade::is_upgrade;
use crate::telemetry::record;

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, moved once to the handler; boxing it would allocate per refusal"
)]
impl HttpListener {
    /// Phase: prepare the request (see `headers`) and send it, retrying within the policy.
    /// Returns the response and the cluster's in-flight permit (held until the response body
    /// is done).
    pub(super) async fn forward<B: RequestBodyIn>(
        &self,
        target: &Target,
        down: &Arc<Downstream>,
        host: Option<HeaderValue>,
        mut req: Request<B>,
        started: Instant,
    ) -> Result<(Response<UpstreamBody>, Option<OwnedSemaphorePermit>), Response<ProxyBody>> {
        let cluster = &target.cluster;
        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        // Asked once (our HTTP/2 server's body answers under the connection's lock): a
        // stale `false` is harmless, such a body is read ahead below.
        let at_end = incoming.is_end_stream();
        // A body that trickles is cut (`limits.min_body_rate`); one that has ended cannot
        // trickle (and its request's content type is not looked up).
        let rate = if at_end {
            None
        } else {
            min_body_rate::applies(self.limits.min_body_rate, &parts.headers)
        };
        let incoming = min_body_rate::watch(incoming, rate);
        // `limits.max_request_body`: a stated length over it is refused now; a body without
        // one is cut where it goes past it (413 when no response has started). Not for gRPC
        // (as `min_body_rate`): a stream's messages would count together against it.
        let max_body = self
            .limits
            .max_request_body
            .filter(|_| !min_body_rate::is_grpc(&parts.headers));
        self.check_body_size(target, max_body, incoming.size_hint().lower(), started)?;
        let incoming = body::capped(incoming, max_body, at_end);
        let cut = incoming.cut();
        let h1_chunked = parts.version <= Version::HTTP_11
            && parts.headers.contains_key(header::TRANSFER_ENCODING);
        let path =
            self.prepare_request(target, down, host, &mut parts, upgrade.is_some(), started)?;

        let known_small = incoming
            .size_hint()
            .upper()
            .is_some_and(|n| n as usize <= REPLAY_LIMIT);
        let mut body = if at_end {
            RequestBody::Complete {
                data: Bytes::new(),
                trailers: None,
            }
        } else if known_small || h1_chunked {
            // A client that stops sending mid-body must not hold its permits forever.
            let read =
                tokio::time::timeout(target.timeout, body::prebuffer(incoming, REPLAY_LIMIT)).await;
            self.read_ahead(target, read, started)?
        } else {
            RequestBody::Streaming(body::counted(
                body::incoming(incoming),
                target.stats.request_bytes.clone(),
            ))
        };
        // Taken after the body is read: a slow client does not hold a cluster slot meanwhile.
        let Ok(cluster_permit) = cluster.admit() else {
            self.shed_breaker.inc();
            return Err(self.fail(
                target,
                Failure::Overload,
                "the cluster has too many requests in flight",
                started,
            ));
        };
        cluster.deposit();

        let policy = target.retry.as_ref();
        let max_retries = policy.map_or(0, |p| p.attempts);
        let idempotent = is_idempotent(&parts.method);
        let mut tries = 0u32;
        // Held once for an app that restarts under this request (hold.rs).
        let mut held = false;
        loop {
            let Some(attempt) = cluster.pick() else {
                return Err(self.fail(
                    target,
                    Failure::NoEndpoints,
                    "the cluster has no endpoints",
                    started,
                ));
            };
            let replayable = body.replayable();
            let Some(b) = body.take() else {
                return Err(self.fail(
                    target,
                    Failure::Upstream,
                    "cannot replay a streamed request body",
                    started,
                ));
            };
            let mut attempt_req = Request::new(b);
            *attempt_req.method_mut() = parts.method.clone();
            // Origin form: the endpoint adds its scheme and authority where they are sent
            // (HTTP/2 upstreams, `Endpoint::send`).
            *attempt_req.uri_mut() = http::Uri::from(path.clone());
            *attempt_req.version_mut() = parts.version;
            // The headers are copied only when another attempt may follow: a retry, or the
            // one resend after the supervised app restarted under the request (hold.rs).
            let may_hold = !held && self.may_hold_after_refusal(cluster);
            *attempt_req.headers_mut() = if replayable && (tries < max_retries || may_hold) {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let outcome =
                tokio::time::timeout(target.timeout, attempt.endpoint.send(attempt_req)).await;
            let can_retry = |on: bool, safe: bool| {
                on && safe && replayable && tries < max_retries && cluster.withdraw_retry()
            };
            let (failure, message, retry_on, safe) = match outcome {
                Ok(Ok(res)) => {
                    let status = res.status().as_u16();
                    if status >= 500 {
                        cluster.failed(&attempt);
                    } else {
                        cluster.succeeded(&attempt);
                    }
                    if let Some(p) = policy
                        && p.on.status(status)
                        && can_retry(true, idempotent)
                    {
                        tracing::debug!(cluster = %cluster.name, endpoint = %attempt.endpoint.address, status, "retrying on status");
                        drop(res);
                        tries += 1;
                        backoff(p.backoff.get(), tries).await;
                        continue;
                    }
                    let mut res = res;
                    if self.recorder.is_some() {
                        res.extensions_mut().insert(routed(target, &attempt, tries));
                    }
                    if status == 101
                        && let Some(downstream) = upgrade
                    {
                        let res = self.hand_off(res.map(UpstreamBody::boxed), downstream, down);
                        return Ok((res.map(UpstreamBody::Boxed), cluster_permit));
                    }
                    return Ok((res, cluster_permit));
                }
                // Every failed exchange: count it against the endpoint, then retry when the
                // policy names the failure and it is safe (a connect failure sent nothing, so
                // any method; otherwise idempotent methods only).
                // The client's body was cut (too large, too slow): its fault, whatever the
                // upstream client made of it (an HTTP/2 stream reset loses the cause).
                Ok(Err(e)) if cut.failure().is_some() => {
                    let failure = cut.failure().expect("checked");
                    let message = format!("the request body was cut: {e}");
                    return Err(with_close(self.fail(target, failure, &message, started)));
                }
                Ok(Err(e)) => match exchange_fault(&e, &attempt.endpoint.address) {
                    Fault::Endpoint(Failure::Connect, message) => (
                        Failure::Connect,
                        message,
                        policy.is_some_and(|p| p.on.connect_failure),
                        true,
                    ),
                    Fault::Endpoint(failure, message) => (
                        failure,
                        message,
                        policy.is_some_and(|p| p.on.reset),
                        idempotent,
                    ),
                    Fault::Downstream(message) => {
                        let failure = if min_body_rate::too_slow(&e) {
                            Failure::RequestTimeout
                        } else if body::too_large(&e) {
                            Failure::BodyTooLarge
                        } else {
                            Failure::BadRequest
                        };
                        return Err(with_close(self.fail(target, failure, &message, started)));
                    }
                },
                Err(_) => (
                    Failure::Timeout,
                    format!(
                        "no response from {} within {:?}",
                        attempt.endpoint.address, target.timeout
                    ),
                    policy.is_some_and(|p| p.on.timeout),
                    idempotent,
                ),
            };
            cluster.failed(&attempt);
            if failure == Failure::Connect
                && replayable
                && !held
                && self.held_after_refusal(down, cluster, target.timeout).await
            {
                held = true;
                continue;
            }
            if can_retry(retry_on, safe) {
                tries += 1;
                backoff(policy.map_or(Duration::ZERO, |p| p.backoff.get()), tries).await;
                continue;
            }
            let mut res = self.fail(target, failure, &message, started);
            if let Some(r) = res.extensions_mut().get_mut::<record::Routed>() {
                // The access log names the last endpoint tried and the retries spent.
                r.upstream = Some(attempt.endpoint.label.clone());
                r.retries = tries;
            }
            return Err(res);
        }
    }

    /// The request body read ahead (within the route's timeout): complete and replayable when
    /// it fits [`REPLAY_LIMIT`], else streamed on from where reading stopped.
    fn read_ahead(
        &self,
        target: &Target,
        read: Result<Result<RequestBody, body::BoxError>, tokio::time::error::Elapsed>,
        started: Instant,
    ) -> Result<RequestBody, Response<ProxyBody>> {
        match read {
            Ok(Ok(RequestBody::Complete { data, trailers })) => {
                target.stats.request_bytes.inc_by(data.len() as u64);
                Ok(RequestBody::Complete { data, trailers })
            }
            Ok(Ok(RequestBody::Streaming(b))) => Ok(RequestBody::Streaming(body::counted(
                b,
                target.stats.request_bytes.clone(),
            ))),
            Ok(Ok(RequestBody::Taken)) => Ok(RequestBody::Taken),
            Ok(Err(e)) if body::too_large(&*e) => Err(with_close(self.fail(
                target,
                Failure::BodyTooLarge,
                &e.to_string(),
                started,
            ))),
            Ok(Err(e)) if min_body_rate::too_slow(&*e) => Err(with_close(self.fail(
                target,
                Failure::RequestTimeout,
                &e.to_string(),
                started,
            ))),
            Ok(Err(e)) => {
                let msg = format!("invalid request body: {e}");
                Err(with_close(self.fail(
                    target,
                    Failure::BadRequest,
                    &msg,
                    started,
                )))
            }
            Err(_) => {
                let msg = format!(
                    "the request body did not arrive within {:?}",
                    target.timeout
                );
                Err(with_close(self.fail(
                    target,
                    Failure::RequestTimeout,
                    &msg,
                    started,
                )))
            }
        }
    }
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Jittered exponential backoff before retry number `n` (1-based): base·2ⁿ⁻¹·[0.5, 1.5).
async fn backoff(base: Duration, n: u32) {
    let exp = base.saturating_mul(1u32 << (n - 1).min(10));
    tokio::time::sleep(exp.mul_f64(0.5 + fastrand::f64())).await;
}

/// What a request's record says routed it (the fast path's too).
pub(super) fn routed(
    target: &Target,
    attempt: &super::cluster::Attempt,
    retries: u32,
) -> record::Routed {
    record::Routed {
        route: Some(target.name.clone()),
        cluster: Some(target.cluster.name.clone()),
        upstream: Some(attempt.endpoint.label.clone()),
        retries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_methods_are_retried_after_sending() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }
}
