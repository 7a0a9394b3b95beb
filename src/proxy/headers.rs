//! Headers: what the upstream sees of a request, and what the client sees of a response.
//!
//! Requests: hop-by-hop headers go (RFC 9110 §7.6.1, and those named in `Connection`),
//! `x-forwarded-for`, `x-forwarded-proto` and `via` are set (`x-request-id` is, before any
//! phase, by the handler: `TraceContext::inject_with_id`), inbound the
//! verified client certificate goes in `x-forwarded-client-cert`, then the route's
//! `request_headers` edits and `rewrite_path_prefix` apply. Responses lose their hop-by-hop
//! headers too (see the respond phase). In: the request's parts as hyper parsed them. Out: the
//! same parts, ready for the forward phase, and the upstream path.

use std::time::Instant;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Response, Uri, Version};

use super::body::ProxyBody;
use super::failure::Failure;
use super::http::{Downstream, HttpListener};
#[cfg(test)]
use super::listener::Peer;
use super::route::Target;
use crate::config::proxy::Direction;

pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop and never travel further (RFC 9110 §7.6.1), plus the
/// credentials a client meant for a proxy. `Trailer` is end to end: it declares the trailers
/// HTTP/1 must send.
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ]
}

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, moved once to the handler; boxing it would allocate per refusal"
)]
impl HttpListener {
    /// Phase: the request the upstream sees: [`prepare`]d headers, inbound the client
    /// certificate, the route's header edits, the Host of an absolute-form request, the
    /// cluster's HTTP version. Returns the upstream path (the route's rewrite applied).
    pub(super) fn prepare_request(
        &self,
        target: &Target,
        down: &Downstream,
        host: Option<HeaderValue>,
        parts: &mut Parts,
        upgrade: bool,
        started: Instant,
    ) -> Result<PathAndQuery, Response<ProxyBody>> {
        let inbound = self.direction == Direction::Inbound;
        prepare(
            &mut parts.headers,
            down.forwarded_for.as_ref(),
            inbound,
            upgrade,
            parts.version,
        );
        if inbound {
            if down.secure {
                parts
                    .headers
                    .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
            }
            // Only Outrigger says who the peer is: a client's own claim is removed. A pass over
            // the names first (a removal hashes the name even when there is none, as there
            // almost never is: ~190 instructions per request, callgrind on h2c).
            if parts.headers.keys().any(|k| *k == X_FORWARDED_CLIENT_CERT) {
                parts.headers.remove(&X_FORWARDED_CLIENT_CERT);
            }
            if let Some(id) = &down.identity
                && let Ok(v) = HeaderValue::from_str(&id.xfcc)
            {
                parts.headers.insert(X_FORWARDED_CLIENT_CERT.clone(), v);
            }
        }
        target.request_headers.apply(&mut parts.headers);
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        let Some(path) = rewrite(&parts.uri, target.rewrite.as_ref()) else {
            return Err(self.fail(
                target,
                Failure::BadRequest,
                "the rewritten path is invalid",
                started,
            ));
        };
        // HTTP/2 has no `Upgrade`: an upgrade request (WebSocket) goes over HTTP/1.1 even to
        // an `http2` cluster (the endpoint's upgrade pool).
        parts.version = if target.cluster.config.http2 && !upgrade {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        Ok(path)
    }
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names first, comparing them (cheap for the standard ones): most
    // messages carry none or one of these, and every lookup or removal hashes the name. Eight
    // blind removals per message were ~1,500 instructions per proxied request (callgrind).
    let hops = hop_by_hop();
    let mut present = [false; 8];
    for k in headers.keys() {
        if let Some(i) = hops.iter().position(|h| *h == k) {
            present[i] = true;
        }
    }
    // `hop_by_hop()`'s order: Connection first, TE fifth.
    let (connection, te) = (present[0], present[4]);
    // Read before Connection's names go (it may name TE).
    let te_trailers = te
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    if connection {
        // Headers named in Connection are hop-by-hop too. Names from the list above are
        // removed (or kept) by the list's own pass: `Connection: keep-alive`, what most
        // upstreams send, then costs no `HeaderName`, no `Vec` and no removal.
        let tokens = || {
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| !hops.iter().any(|h| t.eq_ignore_ascii_case(h.as_str())))
        };
        let named: Vec<HeaderName> = if tokens().next().is_none() {
            Vec::new()
        } else {
            tokens()
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .collect()
        };
        for n in named {
            // Outrigger's own trace and request id headers cannot be stripped by naming them.
            let ours = matches!(
                n.as_str(),
                "traceparent" | "tracestate" | "x-request-id" | "b3" | "x-outrigger-error"
            );
            if !(ours || keep_upgrade && n == header::UPGRADE) {
                headers.remove(n);
            }
        }
    }
    for (h, present) in hops.into_iter().zip(present) {
        if !present || keep_upgrade && (*h == header::UPGRADE || *h == header::CONNECTION) {
            continue;
        }
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        // gRPC needs `te: trailers` end to end.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The request headers the upstream sees, before the route's edits. `forwarded_for` is the
/// peer's IP as a header value, formatted once per connection (`Peer::forwarded_for`).
/// A header the client sent is looked up once (an entry), one it did not is appended, and a
/// value is built only when one must be appended to: a fresh request costs no formatting and
/// no allocation here. `x-request-id`
/// is not looked at: the request's handler has set it already when the client sent none
/// (`TraceContext::inject_with_id`, before any phase), and `strip_hop_by_hop` never removes
/// it (a lookup of it here found it every time: ~200 instructions per request).
fn prepare(
    headers: &mut HeaderMap,
    forwarded_for: Option<&HeaderValue>,
    inbound: bool,
    upgrade: bool,
    version: Version,
) {
    strip_hop_by_hop(headers, upgrade);
    // Which of the three a client sent (one pass over the names, comparing them): most send
    // none, and a header it did not send is appended without an entry's lookup first (each
    // entry hashed its name and probed: ~120 instructions per header, callgrind on h2c).
    let (mut has_for, mut has_proto, mut has_via) = (false, false, false);
    for k in headers.keys() {
        has_for |= *k == X_FORWARDED_FOR;
        has_proto |= *k == X_FORWARDED_PROTO;
        has_via |= *k == header::VIA;
    }
    let hop = match version {
        Version::HTTP_10 => "1.0 outrigger",
        Version::HTTP_2 => "2 outrigger",
        _ => "1.1 outrigger",
    };
    if let Some(ip) = forwarded_for {
        if !has_for {
            headers.append(X_FORWARDED_FOR.clone(), ip.clone());
        } else {
            match headers.entry(&X_FORWARDED_FOR) {
                Entry::Occupied(mut e) => {
                    // An empty or invalid earlier value is replaced.
                    let v = match e.get().to_str() {
                        Ok(prev) if !prev.is_empty() => joined(prev, ip.as_bytes()),
                        _ => None,
                    };
                    e.insert(v.unwrap_or_else(|| ip.clone()));
                }
                Entry::Vacant(e) => {
                    e.insert(ip.clone());
                }
            }
        }
    }
    // Inbound, the client's claim is not trusted; outbound, the app's is kept.
    if !has_proto {
        headers.append(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    } else if inbound {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if !has_via {
        headers.append(header::VIA, HeaderValue::from_static(hop));
        return;
    }
    match headers.entry(header::VIA) {
        Entry::Occupied(mut e) => {
            // An invalid earlier value is replaced.
            let v = e
                .get()
                .to_str()
                .ok()
                .and_then(|prev| joined(prev, hop.as_bytes()));
            e.insert(v.unwrap_or(HeaderValue::from_static(hop)));
        }
        Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static(hop));
        }
    }
}

/// `prev, next` as one header value.
fn joined(prev: &str, next: &[u8]) -> Option<HeaderValue> {
    let mut v = Vec::with_capacity(prev.len() + 2 + next.len());
    v.extend_from_slice(prev.as_bytes());
    v.extend_from_slice(b", ");
    v.extend_from_slice(next);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

/// The path and query for the upstream, with the route's prefix rewrite applied; None when
/// the rewrite produced an invalid target.
fn rewrite(uri: &Uri, rule: Option<&(String, String)>) -> Option<PathAndQuery> {
    let original = || {
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    };
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    match rule {
        Some((from, to)) if pq.starts_with(from.as_str()) => {
            let rest = &pq[from.len()..];
            let mut out = String::with_capacity(to.len() + rest.len() + 1);
            out.push_str(to);
            if !out.ends_with('/') && !rest.is_empty() && !rest.starts_with(['/', '?']) {
                out.push('/');
            }
            out.push_str(rest);
            if !out.starts_with('/') {
                out.insert(0, '/');
            }
            PathAndQuery::try_from(out).ok()
        }
        _ => Some(original()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites() {
        let u: Uri = "/v1/pay?x=1".parse().unwrap();
        let rw = |from: &str, to: &str| {
            rewrite(&u, Some(&(from.into(), to.into())))
                .unwrap()
                .to_string()
        };
        assert_eq!(rw("/v1/", "/"), "/pay?x=1");
        assert_eq!(rw("/v1", "/api"), "/api/pay?x=1");
        assert_eq!(rw("/v1/pay", ""), "/?x=1");
        assert_eq!(rewrite(&u, None).unwrap(), "/v1/pay?x=1");
        // A rule that does not match leaves the path alone.
        assert_eq!(rw("/v2", "/api"), "/v1/pay?x=1");
        assert_eq!(rw("/v1p", "/api"), "/v1/pay?x=1");
        // The result is always absolute.
        assert_eq!(rw("/v1/", "api/"), "/api/pay?x=1");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("trailer", "x-checksum".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        prepare(
            &mut h,
            Peer::Tcp("10.0.0.1:5".parse().unwrap())
                .forwarded_for()
                .as_ref(),
            true,
            false,
            Version::HTTP_11,
        );
        assert!(
            !h.contains_key("connection")
                && !h.contains_key("x-secret")
                && !h.contains_key("keep-alive")
        );
        assert_eq!(h["te"], "trailers");
        assert!(!h.contains_key("proxy-authorization"));
        assert_eq!(h["trailer"], "x-checksum", "Trailer is end to end");
        assert_eq!(h["x-kept"], "1");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["via"], "1.1 outrigger");
        // Set by the handler before the phases (`inject_with_id`), not here.
        assert!(!h.contains_key("x-request-id"));
    }

    #[test]
    fn prepare_appends_and_keeps_what_it_should() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("via", "1.1 edge".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        // Naming Outrigger's own headers in Connection does not strip them.
        h.insert("connection", "x-request-id, traceparent".parse().unwrap());
        h.insert("traceparent", "00-x".parse().unwrap());
        let peer = Peer::Tcp("10.0.0.1:5".parse().unwrap()).forwarded_for();
        let peer = peer.as_ref();
        let mut outbound = h.clone();
        prepare(&mut outbound, peer, false, false, Version::HTTP_2);
        assert_eq!(outbound["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(
            outbound["x-forwarded-proto"], "https",
            "outbound keeps the app's"
        );
        assert_eq!(outbound["via"], "1.1 edge, 2 outrigger");
        assert_eq!(outbound["x-request-id"], "abc");
        assert_eq!(outbound["traceparent"], "00-x");
        let mut inbound = h;
        prepare(&mut inbound, peer, true, false, Version::HTTP_10);
        assert_eq!(
            inbound["x-forwarded-proto"], "http",
            "inbound trusts no claim"
        );
        assert_eq!(inbound["via"], "1.1 edge, 1.0 outrigger");
    }

    #[test]
    fn connection_naming_listed_headers_strips_them_as_before() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            "Keep-Alive, TE, Upgrade, X-Gone".parse().unwrap(),
        );
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers, deflate".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers", "gRPC's te: trailers goes on");
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(!h.contains_key("transfer-encoding"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("connection") && !h.contains_key("upgrade"));
    }
}
