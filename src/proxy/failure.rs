//! Failures: why Outrigger answered a request itself, and what that answer looks like.
//!
//! Every phase that refuses or fails a request comes here. A [`Failure`] picks the status
//! (400/403/404/408/413 downstream's fault, 502/504 upstream's, 503 ours) and the reason that goes
//! into the `x-outrigger-error` header and the `error` metric label; [`error_response`] writes
//! the short text answer. Exchanges that got no response are classified here too
//! (`exchange_fault`): the client's own body failing is the downstream's fault, a connect
//! failure or reset is the endpoint's. What leaves: a `Response` for the handler to return, and
//! the route's or listener's response and latency metrics.

use std::time::Instant;

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, ProxyBody};
use super::cluster::pool::SendError;
use super::http::HttpListener;
use super::route::Target;
use crate::config::Address;
use crate::telemetry::record;

pub(super) static X_OUTRIGGER_ERROR: HeaderName = HeaderName::from_static("x-outrigger-error");

/// Why Outrigger answered a request itself; the `x-outrigger-error` header and metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Malformed or ambiguous request (400, downstream's fault).
    BadRequest,
    /// The request body did not arrive in time (408, downstream's fault).
    RequestTimeout,
    /// No route matched (404).
    NoRoute,
    /// A local limit shed the request (503).
    Overload,
    /// The cluster has no endpoint (503).
    NoEndpoints,
    /// Could not connect to the upstream (502).
    Connect,
    /// The upstream broke the exchange (502).
    Upstream,
    /// No response headers within the route's timeout (504).
    Timeout,
    /// The app is starting or restarting and did not become ready within `app.hold_timeout`
    /// (503, with retry-after).
    AppNotReady,
    /// The peer's identity is not in the listener's or route's `authz` (403).
    Forbidden,
    /// The request body is larger than `limits.max_request_body` (413, downstream's fault).
    BodyTooLarge,
}

impl Failure {
    /// Every failure (each an `error` label value).
    pub const ALL: [Failure; 11] = [
        Failure::BadRequest,
        Failure::RequestTimeout,
        Failure::NoRoute,
        Failure::Overload,
        Failure::NoEndpoints,
        Failure::Connect,
        Failure::Upstream,
        Failure::Timeout,
        Failure::AppNotReady,
        Failure::Forbidden,
        Failure::BodyTooLarge,
    ];

    /// The failure at this one's place in [`Self::ALL`], which keeps ALL whole: the match is
    /// exhaustive (a new variant does not compile without its arm), an arm's place past ALL's
    /// end does not compile ("index out of bounds"), and the check below it fails to compile
    /// unless every place holds its own failure.
    const fn listed(self) -> Failure {
        match self {
            Failure::BadRequest => Self::ALL[0],
            Failure::RequestTimeout => Self::ALL[1],
            Failure::NoRoute => Self::ALL[2],
            Failure::Overload => Self::ALL[3],
            Failure::NoEndpoints => Self::ALL[4],
            Failure::Connect => Self::ALL[5],
            Failure::Upstream => Self::ALL[6],
            Failure::Timeout => Self::ALL[7],
            Failure::AppNotReady => Self::ALL[8],
            Failure::Forbidden => Self::ALL[9],
            Failure::BodyTooLarge => Self::ALL[10],
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::Overload | Failure::NoEndpoints | Failure::AppNotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Failure::Connect | Failure::Upstream => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Forbidden => StatusCode::FORBIDDEN,
            Failure::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad-request",
            Failure::RequestTimeout => "request-timeout",
            Failure::NoRoute => "no-route",
            Failure::Overload => "overload",
            Failure::NoEndpoints => "no-endpoints",
            Failure::Connect => "connect",
            Failure::Upstream => "upstream-reset",
            Failure::Timeout => "timeout",
            Failure::AppNotReady => "app-not-ready",
            Failure::Forbidden => "forbidden",
            Failure::BodyTooLarge => "body-too-large",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Failure::ALL.len() {
        let f = Failure::ALL[i];
        assert!(
            f.listed() as u8 == f as u8,
            "Failure::ALL holds each failure at its place in Failure::listed"
        );
        i += 1;
    }
};

/// A response Outrigger writes itself: short text body and the reason header.
pub fn error_response(failure: Failure, message: &str) -> Response<ProxyBody> {
    let mut res = Response::new(body::full(format!("outrigger: {message}\n")));
    *res.status_mut() = failure.status();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        X_OUTRIGGER_ERROR.clone(),
        HeaderValue::from_static(failure.reason()),
    );
    if matches!(failure, Failure::Overload | Failure::AppNotReady) {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

/// The same response, and the connection closes after it (the request's framing or body
/// cannot be trusted to end where the next request starts).
pub(super) fn with_close(mut res: Response<ProxyBody>) -> Response<ProxyBody> {
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

impl HttpListener {
    /// A refusal before any route was chosen: counted on the listener's `unrouted` series.
    pub(super) fn refuse(
        &self,
        failure: Failure,
        message: &str,
        started: Instant,
    ) -> Response<ProxyBody> {
        self.unrouted
            .answered(failure.status().as_u16(), failure.reason(), started);
        error_response(failure, message)
    }

    /// A failure once a route was chosen: logged with listener, route and cluster, counted on
    /// the route, and named in the request record.
    pub(super) fn fail(
        &self,
        target: &Target,
        failure: Failure,
        message: &str,
        started: Instant,
    ) -> Response<ProxyBody> {
        // Shed requests are counted; logging each would flood the log exactly under overload.
        if failure == Failure::Overload {
            tracing::debug!(listener = %self.name, route = %target.name, cluster = %target.cluster.name, message, "request shed");
        } else {
            tracing::warn!(
                listener = %self.name,
                route = %target.name,
                cluster = %target.cluster.name,
                error = failure.reason(),
                message,
                "request failed"
            );
        }
        target
            .stats
            .response(failure.status().as_u16(), failure.reason());
        let elapsed = started.elapsed().as_secs_f64();
        target.stats.latency.observe(elapsed);
        target.stats.duration.observe(elapsed);
        let mut res = error_response(failure, message);
        if self.recorder.is_some() {
            res.extensions_mut().insert(record::Routed {
                route: Some(target.name.clone()),
                cluster: Some(target.cluster.name.clone()),
                upstream: None,
                retries: 0,
            });
        }
        res
    }
}

/// Whose fault an exchange without a response was.
pub(super) enum Fault {
    /// The client's own request body failed (it went away mid-upload): nothing to hold against
    /// the endpoint, and nothing to retry.
    Downstream(String),
    /// The endpoint's: connect failure or a broken exchange.
    Endpoint(Failure, String),
}

/// Classifies an exchange that failed before response headers (timeouts are the caller's:
/// they never reach the client).
pub(super) fn exchange_fault(e: &SendError, endpoint: &Address) -> Fault {
    let error: &(dyn std::error::Error + 'static) = &*e.error;
    if e.connect {
        Fault::Endpoint(
            Failure::Connect,
            format!(
                "cannot connect to {endpoint}: {}",
                crate::errors::chain(error)
            ),
        )
    } else if e.downstream || downstream_fault(error) {
        Fault::Downstream(format!(
            "the request body failed: {}",
            crate::errors::chain(error)
        ))
    } else {
        Fault::Endpoint(
            Failure::Upstream,
            format!(
                "{endpoint} broke the exchange: {}",
                crate::errors::chain(error)
            ),
        )
    }
}

/// True when an exchange failed because the downstream's request body did (hyper reports the
/// body we stream as "user" input), not because of the endpoint.
fn downstream_fault(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::errors::any_cause(e, |err| {
        err.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_pick_status_and_reason() {
        let all = [
            (Failure::BadRequest, 400, "bad-request"),
            (Failure::RequestTimeout, 408, "request-timeout"),
            (Failure::NoRoute, 404, "no-route"),
            (Failure::Overload, 503, "overload"),
            (Failure::NoEndpoints, 503, "no-endpoints"),
            (Failure::Connect, 502, "connect"),
            (Failure::Upstream, 502, "upstream-reset"),
            (Failure::Timeout, 504, "timeout"),
            (Failure::AppNotReady, 503, "app-not-ready"),
            (Failure::Forbidden, 403, "forbidden"),
            (Failure::BodyTooLarge, 413, "body-too-large"),
        ];
        // Every failure has its row (ALL is whole: `Failure::listed`).
        assert_eq!(all.map(|(f, _, _)| f), Failure::ALL);
        for (f, status, reason) in all {
            assert_eq!(f.status().as_u16(), status, "{f:?}");
            assert_eq!(f.reason(), reason, "{f:?}");
        }
    }

    #[test]
    fn error_responses_say_why() {
        let res = error_response(Failure::Overload, "too many requests in flight");
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["x-outrigger-error"], "overload");
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
        let res = with_close(error_response(Failure::BadRequest, "no"));
        assert_eq!(res.status(), 400);
        assert!(!res.headers().contains_key("retry-after"));
        assert_eq!(res.headers()["connection"], "close");
        assert!(
            error_response(Failure::AppNotReady, "wait")
                .headers()
                .contains_key("retry-after")
        );
    }
}
