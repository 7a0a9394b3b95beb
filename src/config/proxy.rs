//! The validated proxy config: listeners, their routes and limits, and clusters. Built from the
//! raw structs by [`validate`], which checks every cross-reference (a route's cluster exists, an
//! inbound listener has an app to forward to, …) and reports each problem at its key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::check::{MAX_COUNT, check_count, check_duration};
use super::document::{Document, Problem};
pub use super::raw::{Direction, Http2Server, Lb, Protocol};
use super::raw::{RawCluster, RawListener};
pub use super::route::{
    DEFAULT_RETRY_BACKOFF, HeaderOps, MatchConfig, PathMatch, RetryOn, RetryPolicy, RouteConfig,
};
use super::types::{Address, Duration};

/// Inbound listeners forward to this cluster, made from `app.address`.
pub const APP_CLUSTER: &str = "app";

/// Per-listener connection cap: far above a sidecar's usual load, low enough to bound memory.
/// Lower when the process may open fewer descriptors ([`default_max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Descriptors left out of the listeners' default shares: admin and its reserve, the bridge's
/// stores, log files, the app's pipes, DNS, the runtime's own.
pub const DESCRIPTORS_KEPT: u64 = 64;

/// The default `max_connections` of each of `sockets` sockets that accept connections (proxy
/// listeners, and the bridge): [`DEFAULT_MAX_CONNECTIONS`], or less when the soft
/// `RLIMIT_NOFILE` is lower — each connection may hold two descriptors (the client's and an
/// upstream's), and every listener flooded at once must still leave [`DESCRIPTORS_KEPT`]. So
/// a flood on one listener cannot take the descriptors the others need. At least 1.
pub fn default_max_connections(sockets: usize) -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft);
    share_of_descriptors(soft, sockets)
}

fn share_of_descriptors(soft_limit: u64, sockets: usize) -> usize {
    let share = soft_limit.saturating_sub(DESCRIPTORS_KEPT) / (2 * sockets.max(1) as u64);
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .clamp(1, DEFAULT_MAX_CONNECTIONS)
}
/// Slowloris guard: a request head must arrive within this.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must arrive at least this fast on average (Kestrel's default, 240 B/s)…
pub const DEFAULT_MIN_BODY_RATE: u64 = 240;
/// …after this long, and it never saves up more slack than this (Kestrel's grace period): a
/// body that trickles is cut after at most this long below the rate, not the route timeout.
pub const DEFAULT_MIN_BODY_RATE_GRACE: Duration = Duration::from_secs(5);
/// Request heads above this are answered 431 (HTTP/1) or refused (HTTP/2).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Idle keep-alive connections from clients are closed after this.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time to the upstream's response headers (Envoy's route default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle pooled upstream connections are closed after this (below common server keep-alives).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// Outlier ejection: this many consecutive failures eject an endpoint…
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// …for this long (then it gets traffic again).
pub const DEFAULT_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Retry budget (linkerd's): retries may add this share of requests…
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// …plus this many retries per second regardless.
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
/// Unix sockets are private to the user unless configured otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

#[derive(Clone, Debug, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub address: Address,
    pub direction: Direction,
    pub protocol: Protocol,
    /// HTTP listeners: which server speaks HTTP/2 on their connections (HTTP/1 is always
    /// the fast path's, then hyper's).
    pub http2_server: Http2Server,
    /// tcp listeners: the cluster that receives the bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Unix socket permissions.
    #[serde(serialize_with = "octal")]
    pub socket_mode: u32,
    pub routes: Vec<RouteConfig>,
    pub limits: Limits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ServerTlsConfig>,
    /// Peer identities allowed in; None: anyone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz: Option<Vec<super::tls::IdentityPattern>>,
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    /// Requests served at once; more are shed with 503.
    pub max_requests_in_flight: Option<usize>,
    pub rate_limit: Option<RateLimit>,
    /// The data rate a request body must keep up; None: off (`bytes_per_second: 0`).
    pub min_body_rate: Option<MinBodyRate>,
    /// The largest request body taken, in bytes (larger ones get 413); None: unlimited.
    pub max_request_body: Option<u64>,
}

/// `limits.min_body_rate`: a request body that arrives slower than `bytes_per_second` (on
/// average, with up to `grace` of slack saved up) is cut: 408, connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MinBodyRate {
    pub bytes_per_second: u64,
    pub grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterConfig {
    pub name: String,
    pub discovery: Discovery,
    pub lb: Lb,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub http2: bool,
    pub pool_idle_timeout: Duration,
    pub max_requests_in_flight: Option<usize>,
    pub outlier: Outlier,
    pub retry_budget: RetryBudget,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::tls::ClientTlsConfig>,
}

impl ClusterConfig {
    /// A cluster with every default (round robin, default timeouts, outlier ejection and
    /// retry budget, no TLS): the `app` cluster, and the bridge's clusters made by name
    /// resolution.
    pub fn with_defaults(name: &str, discovery: Discovery) -> ClusterConfig {
        ClusterConfig {
            name: name.to_string(),
            discovery,
            lb: Lb::RoundRobin,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            http2: false,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            max_requests_in_flight: None,
            outlier: Outlier {
                consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
                ejection_time: DEFAULT_EJECTION_TIME,
            },
            retry_budget: RetryBudget {
                ratio: DEFAULT_BUDGET_RATIO,
                min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
            },
            tls: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    Static(Vec<Address>),
    Dns {
        host: String,
        port: u16,
        refresh: Duration,
    },
    File {
        path: PathBuf,
        refresh: Duration,
    },
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub ejection_time: Duration,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
}

/// Validates listeners and clusters; every problem is pushed with its location.
///
/// `sockets`: how many sockets accept connections (these listeners and the bridge), for the
/// default `max_connections`.
pub fn validate(
    raw_listeners: Vec<RawListener>,
    raw_clusters: BTreeMap<String, RawCluster>,
    app_address: Option<&Address>,
    sockets: usize,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> (Vec<ListenerConfig>, BTreeMap<String, ClusterConfig>) {
    let mut clusters = BTreeMap::new();
    for (name, raw) in raw_clusters {
        let at = format!("clusters.{name}");
        if name == APP_CLUSTER {
            problems.push(doc.problem(
                &at,
                "the cluster name `app` is reserved: it is made from app.address",
            ));
            continue;
        }
        if let Some(c) = cluster(&name, raw, &at, doc, problems) {
            clusters.insert(name, c);
        }
    }
    if let Some(addr) = app_address {
        let mut app =
            ClusterConfig::with_defaults(APP_CLUSTER, Discovery::Static(vec![addr.clone()]));
        // One endpoint: ejecting it would only turn errors into 503s.
        app.outlier.consecutive_failures = 0;
        clusters.insert(APP_CLUSTER.to_string(), app);
    }

    let default_connections = default_max_connections(sockets);
    let mut listeners = Vec::new();
    let mut names = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    for (i, raw) in raw_listeners.into_iter().enumerate() {
        let at = format!("listeners[{i}]");
        if let Some(prev) = names.insert(raw.name.clone(), i) {
            problems.push(doc.problem(
                &format!("{at}.name"),
                format!(
                    "the name {:?} is already used by {}",
                    raw.name,
                    doc.written(&format!("listeners[{prev}]"))
                ),
            ));
        }
        let port_zero = matches!(raw.address, Address::Tcp(a) if a.port() == 0);
        if !port_zero && let Some(prev) = addresses.insert(raw.address.to_string(), i) {
            problems.push(doc.problem(
                &format!("{at}.address"),
                format!(
                    "the address {} is already used by {}",
                    raw.address,
                    doc.written(&format!("listeners[{prev}]"))
                ),
            ));
        }
        if let Some(l) = listener(
            raw,
            &at,
            &clusters,
            app_address.is_some(),
            default_connections,
            doc,
            problems,
        ) {
            listeners.push(l);
        }
    }
    (listeners, clusters)
}

fn cluster(
    name: &str,
    raw: RawCluster,
    at: &str,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<ClusterConfig> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        problems.push(doc.problem(
            at,
            format!("expected a cluster name of letters, digits, '-', '_' or '.', found {name:?}"),
        ));
    }
    let refresh = raw.refresh.unwrap_or(DEFAULT_REFRESH);
    let sources = [
        raw.endpoints.is_some(),
        raw.dns.is_some(),
        raw.file.is_some(),
    ];
    let discovery = match (raw.endpoints, raw.dns, raw.file) {
        _ if sources.iter().filter(|s| **s).count() != 1 => {
            // Not when the one source written was removed as wrong (reported already).
            if !doc.pruned_inside(at) {
                problems.push(doc.problem(at, "expected exactly one of endpoints, dns or file"));
            }
            return None;
        }
        (Some(eps), _, _) => {
            let endpoints = format!("{at}.endpoints");
            // Empty only because its bad entries were removed: those were reported.
            if eps.is_empty() && !doc.pruned_inside(&endpoints) {
                problems.push(doc.problem(&endpoints, "expected at least one endpoint"));
            }
            Discovery::Static(eps)
        }
        (_, Some(dns), _) => match dns
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        {
            Some((host, port)) if !host.is_empty() && port != 0 => Discovery::Dns {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port,
                refresh,
            },
            _ => {
                problems.push(doc.problem(
                    &format!("{at}.dns"),
                    format!("expected host:port like payments.shop.svc:8080, found {dns:?}"),
                ));
                return None;
            }
        },
        (_, _, Some(path)) => Discovery::File { path, refresh },
        _ => unreachable!("exactly one source"),
    };

    check_duration(doc, problems, &format!("{at}.refresh"), raw.refresh, false);
    check_duration(
        doc,
        problems,
        &format!("{at}.connect_timeout"),
        raw.connect_timeout,
        false,
    );
    check_duration(doc, problems, &format!("{at}.timeout"), raw.timeout, false);
    check_duration(
        doc,
        problems,
        &format!("{at}.pool_idle_timeout"),
        raw.pool_idle_timeout,
        false,
    );
    check_count(
        doc,
        problems,
        &format!("{at}.max_requests_in_flight"),
        raw.max_requests_in_flight,
    );
    let outlier = raw.outlier.unwrap_or_default();
    check_duration(
        doc,
        problems,
        &format!("{at}.outlier.ejection_time"),
        outlier.ejection_time,
        false,
    );
    let budget = raw.retry_budget.unwrap_or_default();
    if let Some(m) = budget.min_per_second
        && m > MAX_COUNT as u32
    {
        problems.push(doc.problem(
            &format!("{at}.retry_budget.min_per_second"),
            format!("expected at most {MAX_COUNT}, found {m}"),
        ));
    }
    let ratio = budget.ratio.unwrap_or(DEFAULT_BUDGET_RATIO);
    if !(0.0..=1000.0).contains(&ratio) {
        problems.push(doc.problem(
            &format!("{at}.retry_budget.ratio"),
            format!("expected a ratio from 0 to 1000, found {ratio}"),
        ));
    }
    let tls = match &raw.tls {
        Some(t) => Some(super::tls::client(t, &format!("{at}.tls"), doc, problems)?),
        None => None,
    };
    Some(ClusterConfig {
        tls,
        name: name.to_string(),
        discovery,
        lb: raw.lb.unwrap_or_default(),
        connect_timeout: raw.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        timeout: raw.timeout.unwrap_or(DEFAULT_TIMEOUT),
        http2: raw.http2.unwrap_or(false),
        pool_idle_timeout: raw.pool_idle_timeout.unwrap_or(DEFAULT_POOL_IDLE_TIMEOUT),
        max_requests_in_flight: raw.max_requests_in_flight,
        outlier: Outlier {
            consecutive_failures: outlier
                .consecutive_failures
                .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
            ejection_time: outlier.ejection_time.unwrap_or(DEFAULT_EJECTION_TIME),
        },
        retry_budget: RetryBudget {
            ratio,
            min_per_second: budget
                .min_per_second
                .unwrap_or(DEFAULT_BUDGET_MIN_PER_SECOND),
        },
    })
}

fn listener(
    raw: RawListener,
    at: &str,
    clusters: &BTreeMap<String, ClusterConfig>,
    has_app: bool,
    default_connections: usize,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<ListenerConfig> {
    let inbound = raw.direction == Direction::Inbound;
    let tls = raw.tls.as_ref().and_then(|t| {
        super::tls::server(
            t,
            &format!("{at}.tls"),
            raw.protocol == Protocol::Http,
            doc,
            problems,
        )
    });
    let authz = raw
        .authz
        .as_ref()
        .map(|a| super::tls::identities(a, &format!("{at}.authz"), doc, problems));
    let mtls = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    if mtls && !inbound {
        problems.push(doc.problem(
            &format!("{at}.tls.client_ca"),
            "client certificates are verified on inbound listeners only (the app is the client of an outbound listener)",
        ));
    }
    if !mtls {
        if raw.authz.is_some() {
            problems.push(doc.problem(
                &format!("{at}.authz"),
                "identities come from client certificates: set tls.client_ca too",
            ));
        }
        for (i, r) in raw.routes.iter().enumerate() {
            if r.authz.is_some() {
                problems.push(doc.problem(
                    &format!("{at}.routes[{i}].authz"),
                    "identities come from client certificates: set the listener's tls.client_ca too",
                ));
            }
        }
    }
    if inbound && !has_app {
        problems.push(doc.problem(
            &format!("{at}.direction"),
            "an inbound listener forwards to the app, but app.address is not set",
        ));
    }
    let socket_mode = match &raw.socket_mode {
        None => DEFAULT_SOCKET_MODE,
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 => v,
            _ => {
                problems.push(doc.problem(
                    &format!("{at}.socket_mode"),
                    format!("expected octal permissions like \"0600\", found {m:?}"),
                ));
                DEFAULT_SOCKET_MODE
            }
        },
    };
    let check_cluster = |name: &str, path: &str, problems: &mut Vec<Problem>| {
        if !clusters.contains_key(name) {
            let known: Vec<&str> = clusters.keys().map(String::as_str).collect();
            problems.push(doc.problem(
                path,
                format!(
                    "no cluster named {name:?} (defined: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    };
    let cluster = match raw.protocol {
        Protocol::Tcp => {
            if !raw.routes.is_empty() {
                problems.push(doc.problem(
                    &format!("{at}.routes"),
                    "a tcp listener has no routes; set `cluster` instead",
                ));
            }
            let name = match (&raw.cluster, inbound) {
                (Some(c), _) => c.clone(),
                (None, true) => APP_CLUSTER.to_string(),
                (None, false) => {
                    problems.push(doc.problem(
                        at,
                        "an outbound tcp listener needs a `cluster` to send bytes to",
                    ));
                    return None;
                }
            };
            if raw.http2_server.is_some() {
                problems.push(doc.problem(
                    &format!("{at}.http2_server"),
                    "a tcp listener speaks no HTTP; `http2_server` is for http listeners",
                ));
            }
            if has_app || !inbound || raw.cluster.is_some() {
                check_cluster(&name, &format!("{at}.cluster"), problems);
            }
            Some(name)
        }
        Protocol::Http => {
            if raw.cluster.is_some() {
                problems.push(doc.problem(
                    &format!("{at}.cluster"),
                    "an http listener picks clusters in its routes; `cluster` is for tcp listeners",
                ));
            }
            None
        }
    };
    let default_cluster = inbound.then_some(APP_CLUSTER);
    let mut routes = Vec::new();
    for (j, r) in raw.routes.into_iter().enumerate() {
        let rat = format!("{at}.routes[{j}]");
        if let Some(route) = super::route::route(r, j, &rat, default_cluster, doc, problems) {
            if !(inbound && route.cluster == APP_CLUSTER && !has_app) {
                check_cluster(&route.cluster, &format!("{rat}.cluster"), problems);
            }
            routes.push(route);
        }
    }
    let l = raw.limits;
    check_count(
        doc,
        problems,
        &format!("{at}.limits.max_connections"),
        l.max_connections,
    );
    check_count(
        doc,
        problems,
        &format!("{at}.limits.max_requests_in_flight"),
        l.max_requests_in_flight,
    );
    check_duration(
        doc,
        problems,
        &format!("{at}.limits.header_read_timeout"),
        l.header_read_timeout,
        false,
    );
    check_duration(
        doc,
        problems,
        &format!("{at}.limits.idle_timeout"),
        l.idle_timeout,
        false,
    );
    let max_header_bytes = l.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if !(8192..=1 << 20).contains(&max_header_bytes) {
        problems.push(doc.problem(
            &format!("{at}.limits.max_header_bytes"),
            format!("expected 8192 to 1048576 bytes, found {max_header_bytes}"),
        ));
    }
    let rate_limit = l.rate_limit.and_then(|r| {
        if !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite()) {
            problems.push(doc.problem(
                &format!("{at}.limits.rate_limit.requests_per_second"),
                format!(
                    "expected a positive number, found {}",
                    r.requests_per_second
                ),
            ));
            return None;
        }
        Some(RateLimit {
            requests_per_second: r.requests_per_second,
            burst: r
                .burst
                .unwrap_or_else(|| r.requests_per_second.ceil().max(1.0) as u32),
        })
    });
    let min_body_rate = match l.min_body_rate {
        None => Some(MinBodyRate {
            bytes_per_second: DEFAULT_MIN_BODY_RATE,
            grace: DEFAULT_MIN_BODY_RATE_GRACE,
        }),
        Some(r) if r.bytes_per_second == 0 => None,
        Some(r) => {
            check_duration(
                doc,
                problems,
                &format!("{at}.limits.min_body_rate.grace"),
                r.grace,
                false,
            );
            Some(MinBodyRate {
                bytes_per_second: r.bytes_per_second,
                grace: r.grace.unwrap_or(DEFAULT_MIN_BODY_RATE_GRACE),
            })
        }
    };
    let max_request_body = l.max_request_body.and_then(|b| {
        if b.0 == 0 {
            problems.push(doc.problem(
                &format!("{at}.limits.max_request_body"),
                "expected a positive size (like 10MiB), found 0; leave the key out for no limit",
            ));
            return None;
        }
        Some(b.0 as u64)
    });
    Some(ListenerConfig {
        tls,
        authz,
        name: raw.name,
        address: raw.address,
        direction: raw.direction,
        protocol: raw.protocol,
        http2_server: raw.http2_server.unwrap_or_default(),
        cluster,
        socket_mode,
        routes,
        limits: Limits {
            max_connections: l.max_connections.unwrap_or(default_connections),
            header_read_timeout: l.header_read_timeout.unwrap_or(DEFAULT_HEADER_READ_TIMEOUT),
            max_header_bytes,
            idle_timeout: l.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
            max_requests_in_flight: l.max_requests_in_flight,
            rate_limit,
            min_body_rate,
            max_request_body,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_connection_caps_leave_descriptors_for_the_others() {
        // Plenty of descriptors: the fixed default.
        assert_eq!(share_of_descriptors(1 << 20, 3), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(share_of_descriptors(u64::MAX, 1), DEFAULT_MAX_CONNECTIONS);
        // 1,024: (1024 - 64) / (2 × 2) each; all flooded at once stay below the limit.
        let each = share_of_descriptors(1024, 2);
        assert_eq!(each, 240);
        assert!(2 * 2 * each as u64 + DESCRIPTORS_KEPT <= 1024);
        // Never zero.
        assert_eq!(share_of_descriptors(10, 4), 1);
        assert_eq!(share_of_descriptors(1024, 0), 480);
    }
}
