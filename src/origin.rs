//! Requests a web page can make: a page open in a browser on the same host can send a POST to
//! any loopback port (a "simple" cross-origin request needs no CORS preflight), and through DNS
//! rebinding it can even read the answers of one that accepts any `Host`. The admin API and the
//! bridge face the host, so they refuse what only a browser sends:
//!
//! - [`cross_origin`]: an `Origin` that is not the request's own `Host` (or `null`), or
//!   `Sec-Fetch-Site: cross-site`/`same-site`; curl, SDKs and probes send neither;
//! - [`foreign_host`]: a `Host` that is not an IP address or `localhost` — what a rebound DNS
//!   name looks like.
//!
//! Pure functions over the request head; the refusals themselves (403, logged) are the
//! callers'. The request's host is its `Host` header, or the URI's authority (HTTP/2
//! `:authority`) when it has none.

use http::header::{HOST, ORIGIN};
use http::{HeaderMap, Uri};

/// The request's host: `Host`, else the URI's authority.
fn host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<Result<&'a str, ()>> {
    match headers.get(HOST) {
        Some(h) => Some(h.to_str().map_err(|_| ())),
        None => uri.authority().map(|a| Ok(a.as_str())),
    }
}

/// Whether a browser sent this request from another site's page.
pub fn cross_origin(headers: &HeaderMap, uri: &Uri) -> bool {
    if let Some(site) = headers.get("sec-fetch-site")
        && matches!(site.as_bytes(), b"cross-site" | b"same-site")
    {
        return true;
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return false;
    };
    let Ok(origin) = origin.to_str() else {
        return true;
    };
    // `scheme://host[:port]`; `null` (sandboxed frames, file:// pages) has no authority.
    let Some((_, authority)) = origin.split_once("://") else {
        return true;
    };
    !matches!(host(headers, uri), Some(Ok(h)) if h.eq_ignore_ascii_case(authority))
}

/// Whether the `Host` header names something other than an IP address or `localhost` (with or
/// without a port). No `Host` (HTTP/1.0, or HTTP/2 with `:authority` only) is not foreign.
pub fn foreign_host(headers: &HeaderMap, uri: &Uri) -> bool {
    let host = match host(headers, uri) {
        None => return false,
        Some(Err(())) => return true,
        Some(Ok(h)) => h,
    };
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_none_or(|ip| ip.parse::<std::net::Ipv6Addr>().is_err());
        }
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    !(name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn co(pairs: &[(&'static str, &'static str)]) -> bool {
        cross_origin(&headers(pairs), &Uri::from_static("/"))
    }

    fn fh(pairs: &[(&'static str, &'static str)]) -> bool {
        foreign_host(&headers(pairs), &Uri::from_static("/"))
    }

    #[test]
    fn cross_origin_requests_are_told_apart() {
        assert!(!co(&[("host", "127.0.0.1:9901")]));
        assert!(!co(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "http://127.0.0.1:9901")
        ]));
        assert!(!co(&[("sec-fetch-site", "none")]));
        assert!(co(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "http://evil.example")
        ]));
        assert!(co(&[("origin", "null")]));
        assert!(co(&[("origin", "http://127.0.0.1:9901")]));
        assert!(co(&[("sec-fetch-site", "cross-site")]));
    }

    #[test]
    fn only_ip_addresses_and_localhost_are_our_hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "[::1]:9901",
            "[::1]",
            "localhost:3500",
            "LOCALHOST",
            "10.0.0.7:9901",
        ] {
            assert!(!fh(&[("host", ok)]), "{ok}");
        }
        assert!(!foreign_host(&HeaderMap::new(), &Uri::from_static("/")));
        // HTTP/2: the authority stands for Host.
        let h2: Uri = "http://evil.example:3500/x".parse().unwrap();
        assert!(foreign_host(&HeaderMap::new(), &h2));
        let h2: Uri = "http://127.0.0.1:3500/x".parse().unwrap();
        assert!(!cross_origin(
            &headers(&[("origin", "http://127.0.0.1:3500")]),
            &h2
        ));
        for bad in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "[evil]:1",
        ] {
            assert!(fh(&[("host", bad)]), "{bad}");
        }
    }
}
