//! Upgrades: HTTP/1.1 `Upgrade` (WebSocket and the like). A request that asks for one keeps its
//! `Upgrade` and `Connection` headers; when the upstream answers 101, both connections are
//! taken over from hyper and bytes are copied both ways until either side closes, the
//! listener's idle timeout passes, or a drain begins.
//!
//! In: the downstream request's and the upstream response's pending upgrades. Out: the 101
//! response (empty body) for the client, and a spawned task that splices the two streams; it
//! holds the downstream connection's `max_connections` slot while it runs.

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::{Request, Response, Version};
use hyper_util::rt::TokioIo;

use super::body::{self, ProxyBody};
use super::http::{Downstream, HttpListener};
use crate::telemetry::metrics::Name;

/// An HTTP/1.1 upgrade (WebSocket and the like). A request that offers h2c among its
/// protocols is not treated as one (its Upgrade header is then dropped as hop-by-hop): a proxy
/// that passes h2c upgrades can be used to smuggle requests past its routing and limits.
pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    // The version first: an HTTP/2 request (no `Upgrade` in HTTP/2) looks nothing up.
    if req.version() != Version::HTTP_11 {
        return false;
    }
    let mut protocols = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| v.to_str().unwrap_or("h2c"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .peekable();
    connection_has(req.headers(), "upgrade")
        && protocols.peek().is_some()
        && protocols.all(|p| !p.eq_ignore_ascii_case("h2c") && !p.is_empty())
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl HttpListener {
    /// The upstream switched protocols: splice the two upgraded connections (in a task of its
    /// own) and answer the client with the 101.
    pub(super) fn hand_off(
        &self,
        mut res: Response<ProxyBody>,
        downstream: hyper::upgrade::OnUpgrade,
        down: &Arc<Downstream>,
    ) -> Response<ProxyBody> {
        let upstream = hyper::upgrade::on(&mut res);
        tokio::spawn(splice(
            downstream,
            upstream,
            self.name.clone(),
            down.clone(),
        ));
        res.map(|_| body::empty())
    }
}

/// Copies bytes both ways between the two halves of an upgraded connection (WebSocket). It
/// holds the downstream connection's slot, ends on drain (but runs on through a hot restart's
/// hand-over), and on the listener's idle timeout.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    listener: Name,
    down: Arc<Downstream>,
) {
    let (d, u) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(listener = %listener, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
    let mut drain = down.drain.clone();
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut d, &mut u) => {
            if let Err(e) = res {
                tracing::debug!(listener = %listener, error = %e, "upgraded connection ended");
            }
        }
        _ = drain.must_close() => tracing::debug!(listener = %listener, "upgraded connection closed: draining"),
        silence = super::accept::silent_for(&down.activity, down.idle_timeout, down.idle_timeout) => tracing::debug!(listener = %listener, ?silence, "upgraded connection closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2c_is_never_an_upgrade() {
        let up = |v: &[&str]| {
            let mut r = Request::builder().uri("/").header("connection", "upgrade");
            for x in v {
                r = r.header("upgrade", *x);
            }
            is_upgrade(&r.body(()).unwrap())
        };
        assert!(up(&["websocket"]));
        assert!(!up(&["h2c"]));
        assert!(!up(&["websocket, h2c"]));
        assert!(!up(&["websocket", "H2C"]));
        assert!(!up(&[]));
    }

    #[test]
    fn upgrades_need_http11_and_connection_upgrade() {
        let ws = |version: Version, connection: &str| {
            let r = Request::builder()
                .uri("/")
                .version(version)
                .header("connection", connection)
                .header("upgrade", "websocket")
                .body(())
                .unwrap();
            is_upgrade(&r)
        };
        assert!(ws(Version::HTTP_11, "keep-alive, Upgrade"));
        assert!(!ws(Version::HTTP_11, "keep-alive"));
        assert!(!ws(Version::HTTP_10, "upgrade"));
        assert!(!ws(Version::HTTP_2, "upgrade"));
    }
}
