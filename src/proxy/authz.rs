//! Authz: which peers may use a listener or a route (`listeners[].authz`, `routes[].authz`),
//! checked per request against the newest config, so a reload that changes `authz` applies to
//! open keep-alive connections too.
//!
//! In: the connection's verified client certificate identity (mutual TLS, see
//! [`crate::tls::accept`]) and the request path. Out: 403 `forbidden` for an identity not in
//! the list; 400 `bad-request` for a path with more than one spelling when some route of the
//! listener has `authz` (`//admin`, `/./admin` and `/%61dmin` read as `/admin` by apps, and
//! would otherwise miss the protected route). The identity matching itself is
//! [`crate::tls::authz`].

use std::time::Instant;

use http::{Request, Response};

use super::body::ProxyBody;
use super::failure::{Failure, error_response};
use super::http::{Downstream, HttpListener};
use super::route::Target;
use crate::tls::PeerIdentity;
use crate::tls::authz::allowed;

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, moved once to the handler; boxing it would allocate per refusal"
)]
impl HttpListener {
    /// Phase: the listener's `authz`.
    pub(super) fn authorize_listener(
        &self,
        down: &Downstream,
        started: Instant,
    ) -> Result<(), Response<ProxyBody>> {
        if let Some(patterns) = &self.authz {
            let ids = PeerIdentity::all(down.identity.as_ref());
            if !allowed(patterns, ids) {
                tracing::warn!(listener = %self.name, peer = ?down.peer, identity = ?ids.first(), "identity not allowed on this listener");
                return Err(self.refuse(
                    Failure::Forbidden,
                    "your identity is not allowed on this listener",
                    started,
                ));
            }
        }
        Ok(())
    }

    /// Phase: when a route here has `authz`, the path must be canonical.
    pub(super) fn check_path<B>(
        &self,
        down: &Downstream,
        req: &Request<B>,
        started: Instant,
    ) -> Result<(), Response<ProxyBody>> {
        if self.strict_paths && !canonical_path(req.uri().path()) {
            tracing::warn!(listener = %self.name, peer = ?down.peer, path = req.uri().path(), "non-canonical path refused (a route here has authz)");
            return Err(self.refuse(
                Failure::BadRequest,
                "non-canonical path (empty or dot segments, backslashes, or encoded unreserved characters)",
                started,
            ));
        }
        Ok(())
    }

    /// Phase: the route's `authz`.
    pub(super) fn authorize_route(
        &self,
        target: &Target,
        down: &Downstream,
        started: Instant,
    ) -> Result<(), Response<ProxyBody>> {
        if let Some(patterns) = &target.authz {
            let ids = PeerIdentity::all(down.identity.as_ref());
            if !allowed(patterns, ids) {
                tracing::warn!(listener = %self.name, route = %target.name, identity = ?ids.first(), "identity not allowed on this route");
                target
                    .stats
                    .answered(403, Failure::Forbidden.reason(), started);
                return Err(error_response(
                    Failure::Forbidden,
                    "your identity is not allowed on this route",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `path` has one spelling only: no empty or dot segments, no backslash, and no
/// percent-encoding of what needs none (letters, digits, `-._~`) or of `/` and `\`.
pub fn canonical_path(path: &str) -> bool {
    if path.contains("//") || path.contains('\\') {
        return false;
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return false;
    }
    let b = path.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) else {
                return false;
            };
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\') {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        for ok in ["/", "/admin/x", "/a%20b", "/a.b/c~d", "/%C3%A9"] {
            assert!(canonical_path(ok), "{ok}");
        }
        for bad in [
            "//admin/x",
            "/./admin/x",
            "/a/../admin",
            "/%61dmin",
            "/admin%2Fx",
            "/a\\b",
            "/%2e%2e/x",
            "/%zz",
            "/x/.",
        ] {
            assert!(!canonical_path(bad), "{bad}");
        }
    }
}
