//! A listener's routes (`listeners[].routes`): how a request is matched (host, path, method,
//! headers), where it goes, its timeout and retry policy, header edits, path rewrite and
//! per-route `authz`, validated from their raw form. Split from `proxy.rs`, which validates the
//! listeners that hold these routes and the clusters they name.

use serde::Serialize;

use super::check::check_duration;
use super::document::{Document, Problem};
use super::raw::{self, RawRoute};
use super::types::Duration;

pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

#[derive(Clone, Debug, Serialize)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    pub cluster: String,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite_path_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz: Option<Vec<super::tls::IdentityPattern>>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MatchConfig {
    /// Lowercase authority without port; `*.example.com` matches subdomains.
    pub host: Option<String>,
    pub path: PathMatch,
    pub method: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    #[default]
    Any,
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HeaderOps {
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub on: RetryOn,
    /// Base of the jittered exponential backoff between attempts.
    pub backoff: Duration,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub timeout: bool,
    pub reset: bool,
    pub any_5xx: bool,
    pub statuses: Vec<u16>,
}

impl RetryOn {
    pub fn status(&self, status: u16) -> bool {
        (self.any_5xx && (500..600).contains(&status)) || self.statuses.contains(&status)
    }
}

/// Headers a route may not add or remove: they frame the message or describe the hop, and an
/// edit would desynchronise the proxy and the upstream.
pub(super) const FRAMING_HEADERS: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "content-length",
    "host",
    "trailer",
];

const RETRY_ON: &str = "connect-failure, timeout, reset, 5xx or a status code like \"503\"";

/// Validates one route; `None` (with problems pushed) when it cannot be used.
pub(super) fn route(
    raw: RawRoute,
    index: usize,
    at: &str,
    default_cluster: Option<&str>,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<RouteConfig> {
    let m = raw.matches;
    let paths = [
        m.path.is_some(),
        m.path_prefix.is_some(),
        m.path_regex.is_some(),
    ];
    if paths.iter().filter(|p| **p).count() > 1 {
        problems.push(doc.problem(
            &format!("{at}.match"),
            "expected at most one of path, path_prefix or path_regex",
        ));
    }
    let path = if let Some(p) = m.path {
        PathMatch::Exact(p)
    } else if let Some(p) = m.path_prefix {
        PathMatch::Prefix(p)
    } else if let Some(r) = m.path_regex {
        if let Err(e) = regex::Regex::new(&r) {
            // regex renders syntax errors over several lines; one line per problem here.
            let e = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            problems.push(doc.problem(
                &format!("{at}.match.path_regex"),
                format!("expected a regular expression: {e}"),
            ));
        }
        PathMatch::Regex(r)
    } else {
        PathMatch::Any
    };
    for (what, p) in [("path", &path)] {
        if let PathMatch::Exact(s) | PathMatch::Prefix(s) = p
            && !s.starts_with('/')
        {
            problems.push(doc.problem(
                &format!("{at}.match"),
                format!("expected the {what} to start with '/', found {s:?}"),
            ));
        }
    }
    if let Some(h) = &m.host
        && h.starts_with('*')
        && !h.starts_with("*.")
    {
        problems.push(doc.problem(
            &format!("{at}.match.host"),
            format!("expected a host or a wildcard like *.example.com, found {h:?}"),
        ));
    }
    check_duration(doc, problems, &format!("{at}.timeout"), raw.timeout, false);
    let method = m.method.map(|s| s.to_ascii_uppercase());
    if let Some(meth) = &method
        && http::Method::from_bytes(meth.as_bytes()).is_err()
    {
        problems.push(doc.problem(
            &format!("{at}.match.method"),
            format!("expected an HTTP method like GET, found {meth:?}"),
        ));
    }
    let mut headers = Vec::new();
    for (k, v) in m.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            problems.push(doc.problem(
                &format!("{at}.match.headers.{k}"),
                format!("expected a header name, found {k:?}"),
            ));
        }
        headers.push((k.to_ascii_lowercase(), v));
    }
    let cluster = match (raw.cluster, default_cluster) {
        (Some(c), _) => c,
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            problems.push(doc.problem(at, "an outbound route needs a `cluster`"));
            return None;
        }
    };
    let retry = raw.retry.map(|r| {
        let mut on = RetryOn::default();
        for (k, cond) in r.on.iter().enumerate() {
            match cond.as_str() {
                "connect-failure" => on.connect_failure = true,
                "timeout" => on.timeout = true,
                "reset" => on.reset = true,
                "5xx" => on.any_5xx = true,
                s => match s.parse::<u16>() {
                    Ok(code) if (100..600).contains(&code) => on.statuses.push(code),
                    _ => problems.push(doc.problem(
                        &format!("{at}.retry.on[{k}]"),
                        format!("expected {RETRY_ON}, found {s:?}"),
                    )),
                },
            }
        }
        if r.on.is_empty() {
            on.connect_failure = true;
        }
        check_duration(
            doc,
            problems,
            &format!("{at}.retry.backoff"),
            r.backoff,
            true,
        );
        // Checked here, not by serde: a missing `attempts` must not hide the other problems
        // of the same `retry` (they came one at a time).
        let attempts = match r.attempts {
            None => {
                problems.push(doc.problem(
                    &format!("{at}.retry"),
                    "missing field `attempts` (how many retries, 0 to 10)",
                ));
                0
            }
            Some(n) if n > 10 => {
                problems.push(doc.problem(
                    &format!("{at}.retry.attempts"),
                    format!("expected at most 10 retries, found {n}"),
                ));
                n
            }
            Some(n) => n,
        };
        RetryPolicy {
            attempts,
            on,
            backoff: r.backoff.unwrap_or(DEFAULT_RETRY_BACKOFF),
        }
    });
    let ops = |raw: raw::RawHeaderOps, which: &str, problems: &mut Vec<Problem>| {
        for k in raw.add.keys().chain(raw.remove.iter()) {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                problems.push(doc.problem(
                    &format!("{at}.{which}"),
                    format!("expected header names, found {k:?}"),
                ));
            } else if FRAMING_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
                problems.push(doc.problem(
                    &format!("{at}.{which}"),
                    format!("{k:?} frames the message or describes the hop; routes cannot edit it"),
                ));
            }
        }
        for v in raw.add.values() {
            if http::HeaderValue::from_str(v).is_err() {
                problems.push(doc.problem(
                    &format!("{at}.{which}.add"),
                    format!("expected a header value, found {v:?}"),
                ));
            }
        }
        HeaderOps {
            add: raw
                .add
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            remove: raw
                .remove
                .into_iter()
                .map(|k| k.to_ascii_lowercase())
                .collect(),
        }
    };
    let rewrite_path_prefix = raw.rewrite.map(|r| r.path_prefix);
    if rewrite_path_prefix.is_some() && !matches!(path, PathMatch::Prefix(_)) {
        problems.push(doc.problem(
            &format!("{at}.rewrite"),
            "a path_prefix rewrite needs a match.path_prefix to replace",
        ));
    }
    let authz = raw
        .authz
        .as_ref()
        .map(|a| super::tls::identities(a, &format!("{at}.authz"), doc, problems));
    Some(RouteConfig {
        authz,
        name: raw.name.unwrap_or_else(|| index.to_string()),
        matches: MatchConfig {
            host: m.host.map(|h| h.to_ascii_lowercase()),
            path,
            method,
            headers,
        },
        cluster,
        timeout: raw.timeout,
        retry,
        request_headers: ops(raw.request_headers, "request_headers", problems),
        response_headers: ops(raw.response_headers, "response_headers", problems),
        rewrite_path_prefix,
    })
}
