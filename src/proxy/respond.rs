//! Respond: what the client sees of an upstream's response. The downstream's HTTP version
//! (not the upstream's), no hop-by-hop headers, no `x-outrigger-error` an upstream made up, the
//! route's `response_headers` edits; then the route's response and latency metrics.
//!
//! In: the upstream's response and the permits the request holds. Out: the response for
//! hyper to write, its body wrapped so that its bytes and duration are counted and the permits
//! released when it ends.

use std::time::Instant;

use http::{Response, StatusCode, Version};

use super::body::{Measured, ProxyBody, UpstreamBody};
use super::failure::X_OUTRIGGER_ERROR;
use super::headers::strip_hop_by_hop;
use super::http::HttpListener;
use super::limits::Permits;
use super::route::Target;

impl HttpListener {
    /// Phase: the response the client sees.
    pub(super) fn respond(
        &self,
        target: &Target,
        mut res: Response<UpstreamBody>,
        version: Version,
        permits: Permits,
        started: Instant,
    ) -> Response<ProxyBody> {
        // The downstream's version, not the upstream's: an HTTP/1.0 app must not turn the
        // client's keep-alive HTTP/1.1 connection into one request per connection.
        *res.version_mut() = version;
        // Only Outrigger says why it answered itself: an upstream's claim is removed (it
        // would also be logged as Outrigger's own failure).
        // A pass over the names (a response has a few) is cheaper than the removal's hashing
        // when there is none, as there almost never is.
        if res.headers().keys().any(|k| *k == X_OUTRIGGER_ERROR) {
            res.headers_mut().remove(&X_OUTRIGGER_ERROR);
        }
        let switching = res.status() == StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(res.headers_mut(), switching);
        target.response_headers.apply(res.headers_mut());
        target.stats.response(res.status().as_u16(), "");
        target
            .stats
            .latency
            .observe(started.elapsed().as_secs_f64());
        let stats = &target.stats;
        res.map(|b| Measured::wrap(b, permits, started, &stats.duration, &stats.response_bytes))
    }
}
