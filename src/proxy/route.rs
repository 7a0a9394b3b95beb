//! Routing: the first route whose match accepts the request wins; on an outbound listener a
//! request no route takes goes to the cluster named by its Host (with `mesh:`, else to the mesh
//! peer its Host names by app id, [`Router::peer`]). Each route carries what the
//! forward phase needs (cluster, timeout, retry policy, header edits, rewrite) and its
//! pre-created metric series, so the data path allocates no labels.
//!
//! The route phase lives here too (`HttpListener::route`): the request's authority (the URI's
//! first, then the Host header) gives the host routes match on. In: the request head. Out: the
//! [`Target`] and the Host the upstream will see, or 400 (no usable authority) / 404 (no route).
//! That Host, when it comes from the URI (HTTP/2's `:authority`), is shared with the previous
//! request's on the same connection when they are the same ([`LastHost`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use regex::Regex;

use super::body::ProxyBody;
use super::cluster::Cluster;
use super::cluster::name_resolution::{NameResolution, ResolveError};
use super::failure::Failure;
use super::http::HttpListener;
use crate::config::proxy::{HeaderOps, MatchConfig, PathMatch, RetryPolicy, RouteConfig};
use crate::telemetry::metrics::{LatencyLabels, Name, ProxyMetrics, ResponseLabels, RouteLabels};

/// Where a matched request goes and how.
pub struct Target {
    pub name: Name,
    pub cluster: Arc<Cluster>,
    pub timeout: Duration,
    pub retry: Option<RetryPolicy>,
    pub request_headers: Edits,
    pub response_headers: Edits,
    /// Replace the matched path prefix with this.
    pub rewrite: Option<(String, String)>,
    pub stats: RouteStats,
    /// Identities allowed on this route (mutual TLS); None: anyone.
    pub authz: Option<Vec<crate::config::tls::IdentityPattern>>,
}

/// The `class` label of `outrigger_http_responses_total`, by the status's first digit.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The metric series of one route, created up front.
pub struct RouteStats {
    pub requests: Counter,
    /// Responses by class 1xx..5xx when the upstream answered.
    pub responses: [Counter; 5],
    pub latency: Histogram,
    /// To the end of the response body.
    pub duration: Histogram,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
    labels: RouteLabels,
    metrics: ProxyMetrics,
}

impl RouteStats {
    pub fn new(
        metrics: &ProxyMetrics,
        direction: &'static str,
        listener: &Name,
        route: Name,
        cluster: &Name,
    ) -> RouteStats {
        let labels = RouteLabels {
            direction,
            listener: listener.clone(),
            route,
            cluster: cluster.clone(),
        };
        let responses = CLASSES.map(|class| {
            metrics
                .responses
                .get_or_create(&response_labels(&labels, class, ""))
                .clone()
        });
        RouteStats {
            requests: metrics.requests.get_or_create(&labels).clone(),
            responses,
            latency: metrics
                .latency
                .get_or_create(&LatencyLabels {
                    direction,
                    listener: listener.clone(),
                    cluster: cluster.clone(),
                })
                .clone(),
            duration: metrics
                .duration
                .get_or_create(&LatencyLabels {
                    direction,
                    listener: listener.clone(),
                    cluster: cluster.clone(),
                })
                .clone(),
            request_bytes: metrics.request_bytes.get_or_create(&labels).clone(),
            response_bytes: metrics.response_bytes.get_or_create(&labels).clone(),
            labels,
            metrics: metrics.clone(),
        }
    }

    /// Removes every series made for the route `labels` (a mesh peer's route, its cluster
    /// evicted: [`NameResolution::track_route`]): requests, bytes, responses of each class
    /// (the upstream's and Outrigger's own, by reason) and its listener's latency histograms
    /// for the cluster.
    pub fn remove_series(metrics: &ProxyMetrics, labels: &RouteLabels) {
        metrics.requests.remove(labels);
        metrics.request_bytes.remove(labels);
        metrics.response_bytes.remove(labels);
        for class in CLASSES {
            metrics
                .responses
                .remove(&response_labels(labels, class, ""));
        }
        for failure in Failure::ALL {
            let class = class(failure.status().as_u16());
            metrics
                .responses
                .remove(&response_labels(labels, class, failure.reason()));
        }
        let latency = LatencyLabels {
            direction: labels.direction,
            listener: labels.listener.clone(),
            cluster: labels.cluster.clone(),
        };
        metrics.latency.remove(&latency);
        metrics.duration.remove(&latency);
    }

    /// Counts an answer Outrigger wrote itself before forwarding (no body to wait for): the
    /// response, and both latency histograms.
    pub fn answered(&self, status: u16, error: &'static str, started: std::time::Instant) {
        self.response(status, error);
        let elapsed = started.elapsed().as_secs_f64();
        self.latency.observe(elapsed);
        self.duration.observe(elapsed);
    }

    /// Counts a response: pre-created series for upstream answers, a labelled one for
    /// Outrigger's own error answers.
    pub fn response(&self, status: u16, error: &'static str) {
        if error.is_empty() && (100..600).contains(&status) {
            self.responses[(status / 100 - 1) as usize].inc();
        } else {
            self.metrics
                .responses
                .get_or_create(&response_labels(&self.labels, class(status), error))
                .inc();
        }
    }
}

fn response_labels(l: &RouteLabels, class: &'static str, error: &'static str) -> ResponseLabels {
    ResponseLabels {
        direction: l.direction,
        listener: l.listener.clone(),
        route: l.route.clone(),
        cluster: l.cluster.clone(),
        class,
        error,
    }
}

pub fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Header edits, parsed once.
#[derive(Default)]
pub struct Edits {
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Edits {
    fn new(ops: &HeaderOps) -> Edits {
        // Names and values were validated with the config.
        Edits {
            add: ops
                .add
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            remove: ops
                .remove
                .iter()
                .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
                .collect(),
        }
    }

    /// No edit at all (the HTTP/1 fast path takes only such routes).
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for k in &self.remove {
            headers.remove(k);
        }
        for (k, v) in &self.add {
            headers.insert(k.clone(), v.clone());
        }
    }
}

enum HostMatch {
    Exact(String),
    /// `*.example.com`: the suffix with its dot.
    Suffix(String),
}

enum PathMatcher {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

struct Matcher {
    host: Option<HostMatch>,
    path: PathMatcher,
    method: Option<Method>,
    headers: Vec<(HeaderName, String)>,
}

impl Matcher {
    fn new(m: &MatchConfig) -> Matcher {
        Matcher {
            host: m.host.as_ref().map(|h| match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                None => HostMatch::Exact(h.clone()),
            }),
            path: match &m.path {
                PathMatch::Any => PathMatcher::Any,
                PathMatch::Exact(p) => PathMatcher::Exact(p.clone()),
                PathMatch::Prefix(p) => PathMatcher::Prefix(p.clone()),
                PathMatch::Regex(r) => {
                    PathMatcher::Regex(Regex::new(r).expect("validated with the config"))
                }
            },
            method: m
                .method
                .as_ref()
                .and_then(|s| Method::from_bytes(s.as_bytes()).ok()),
            headers: m
                .headers
                .iter()
                .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, v.clone())))
                .collect(),
        }
    }

    /// `header` gives a header's first value, as `HeaderMap::get` does.
    fn matches<'h>(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        header: &impl Fn(&HeaderName) -> Option<&'h [u8]>,
    ) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(HostMatch::Exact(h)) => h == host,
            Some(HostMatch::Suffix(s)) => host.ends_with(s.as_str()),
        };
        let path_ok = match &self.path {
            PathMatcher::Any => true,
            PathMatcher::Exact(p) => p == path,
            PathMatcher::Prefix(p) => path.starts_with(p.as_str()),
            PathMatcher::Regex(r) => r.is_match(path),
        };
        host_ok
            && path_ok
            && self.method.as_ref().is_none_or(|m| m == method)
            && self
                .headers
                .iter()
                .all(|(k, v)| header(k).is_some_and(|h| h == v.as_bytes()))
    }
}

/// A listener's routes.
pub struct Router {
    routes: Vec<(Matcher, Arc<Target>)>,
    /// Outbound only: a cluster for each name, used when no route matched.
    by_host: HashMap<String, Arc<Target>>,
    /// Outbound with `mesh:`: a host no route or cluster takes is an app id, a mesh peer.
    peers: Option<Peers>,
    direction: &'static str,
    listener: Name,
    metrics: ProxyMetrics,
}

/// The mesh's peers as this listener's targets (route `peer:HOST`), made on a host's first
/// request and kept (resolved again once the peer was evicted unused), as many as the peers
/// themselves are bounded to.
struct Peers {
    resolution: Arc<NameResolution>,
    targets: Mutex<HashMap<String, Arc<Target>>>,
}

impl Router {
    pub fn new(
        direction: &'static str,
        listener: &Name,
        routes: &[RouteConfig],
        clusters: &HashMap<String, Arc<Cluster>>,
        route_by_host: bool,
        metrics: &ProxyMetrics,
    ) -> Router {
        let routes = routes
            .iter()
            .filter_map(|r| {
                let cluster = clusters.get(&r.cluster)?.clone();
                let name = Arc::new(r.name.clone());
                let rewrite = match (&r.matches.path, &r.rewrite_path_prefix) {
                    (PathMatch::Prefix(from), Some(to)) => Some((from.clone(), to.clone())),
                    _ => None,
                };
                let target = Target {
                    stats: RouteStats::new(
                        metrics,
                        direction,
                        listener,
                        name.clone(),
                        &cluster.name,
                    ),
                    name,
                    timeout: r.timeout.unwrap_or(cluster.config.timeout).get(),
                    retry: r.retry.clone(),
                    request_headers: Edits::new(&r.request_headers),
                    response_headers: Edits::new(&r.response_headers),
                    rewrite,
                    cluster,
                    authz: r.authz.clone(),
                };
                Some((Matcher::new(&r.matches), Arc::new(target)))
            })
            .collect();
        let by_host = if route_by_host {
            clusters
                .iter()
                .map(|(name, cluster)| {
                    let route = Arc::new(format!("host:{name}"));
                    let target = Target {
                        stats: RouteStats::new(
                            metrics,
                            direction,
                            listener,
                            route.clone(),
                            &cluster.name,
                        ),
                        name: route,
                        timeout: cluster.config.timeout.get(),
                        retry: None,
                        request_headers: Edits::default(),
                        response_headers: Edits::default(),
                        rewrite: None,
                        cluster: cluster.clone(),
                        authz: None,
                    };
                    (name.clone(), Arc::new(target))
                })
                .collect()
        } else {
            HashMap::new()
        };
        Router {
            routes,
            by_host,
            peers: None,
            direction,
            listener: listener.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Routes what nothing else takes to the mesh's peers (outbound listeners with `mesh:`).
    pub fn with_peers(mut self, peers: Option<Arc<NameResolution>>) -> Router {
        self.peers = peers.map(|resolution| Peers {
            resolution,
            targets: Mutex::new(HashMap::new()),
        });
        self
    }

    /// The mesh peer named by `host` (an app id, `id` or `id.namespace`), resolved on its
    /// first request; None without `mesh:`.
    pub async fn peer(&self, host: &str) -> Option<Result<Arc<Target>, ResolveError>> {
        let peers = self.peers.as_ref()?;
        {
            let mut targets = peers.targets.lock().expect("not poisoned");
            match targets.get(host) {
                Some(t) if !t.cluster.is_retired() => {
                    t.cluster.touch();
                    return Some(Ok(t.clone()));
                }
                // Evicted unused: resolved again below.
                Some(_) => {
                    targets.remove(host);
                }
                None => {}
            }
        }
        let cluster = match peers.resolution.cluster(host).await {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let mut targets = peers.targets.lock().expect("not poisoned");
        if let Some(t) = targets.get(host) {
            return Some(Ok(t.clone()));
        }
        let route = Arc::new(format!("peer:{host}"));
        let target = Arc::new(Target {
            stats: RouteStats::new(
                &self.metrics,
                self.direction,
                &self.listener,
                route.clone(),
                &cluster.name,
            ),
            name: route,
            timeout: cluster.config.timeout.get(),
            retry: None,
            request_headers: Edits::default(),
            response_headers: Edits::default(),
            rewrite: None,
            cluster,
            authz: None,
        });
        // Two spellings of one app id (`payments`, `payments.shop`) share a cluster, each its
        // own target: at most twice the peers' bound (evicted peers' targets make room).
        // Removed with the cluster when it is evicted.
        peers.resolution.track_route(
            &target.cluster,
            target.stats.labels.clone(),
            RouteStats::remove_series,
        );
        if targets.len() >= 2 * peers.resolution.max() {
            targets.retain(|_, t| !t.cluster.is_retired());
        }
        if targets.len() < 2 * peers.resolution.max() {
            targets.insert(host.to_string(), target.clone());
        }
        Some(Ok(target))
    }

    /// Whether some route limits who may use it.
    pub fn has_authz(&self) -> bool {
        self.routes.iter().any(|(_, t)| t.authz.is_some())
    }

    /// The clusters this router's routes send to (not the outbound by-host ones).
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.routes.iter().map(|(_, t)| &t.cluster)
    }

    /// The route for a request; `host` is lowercase, without port.
    pub fn route(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<&Arc<Target>> {
        self.route_by(host, path, method, &|k| {
            headers.get(k).map(|v| v.as_bytes())
        })
    }

    /// [`Router::route`] with headers looked up by `header` (the HTTP/1 fast path's raw head).
    pub fn route_by<'h>(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        header: &impl Fn(&HeaderName) -> Option<&'h [u8]>,
    ) -> Option<&Arc<Target>> {
        self.routes
            .iter()
            .find(|(m, _)| m.matches(host, path, method, header))
            .map(|(_, t)| t)
            .or_else(|| self.by_host.get(host))
    }
}

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, moved once to the handler; boxing it would allocate per refusal"
)]
impl HttpListener {
    /// Phase: route by the request's authority (absolute-form or :authority first, as RFC 9112
    /// §3.2.2 says), which is also the Host the upstream will see: returned when it came from
    /// the URI (the Host header then travels as it is). On an outbound listener with `mesh:`,
    /// a host no route or cluster takes is a mesh peer's app id (resolved on first use).
    pub(super) async fn route<B>(
        &self,
        req: &Request<B>,
        last_host: &LastHost,
        started: Instant,
    ) -> Result<(Arc<Target>, Option<HeaderValue>), Response<ProxyBody>> {
        let (authority, from_uri) =
            authority(req).map_err(|why| self.refuse(Failure::BadRequest, why, started))?;
        let key = route_key(authority);
        let routed = self
            .router
            .route(&key, req.uri().path(), req.method(), req.headers())
            .cloned();
        let target = match routed {
            Some(t) => t,
            None => match self.router.peer(&key).await {
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    tracing::debug!(listener = %self.name, host = %key, error = %e, "no route, and not a mesh peer");
                    let failure = match e {
                        ResolveError::Full(_) => Failure::Overload,
                        // No endpoint can be reached without the TLS material (logged).
                        ResolveError::Tls(_) => Failure::NoEndpoints,
                        ResolveError::Malformed(_) | ResolveError::Unresolved(_) => {
                            Failure::NoRoute
                        }
                    };
                    return Err(self.refuse(
                        failure,
                        &format!("no route for host {key:?}; {e}"),
                        started,
                    ));
                }
                None => {
                    tracing::debug!(listener = %self.name, host = %key, path = req.uri().path(), "no route");
                    return Err(self.refuse(
                        Failure::NoRoute,
                        &format!("no route for host {key:?}"),
                        started,
                    ));
                }
            },
        };
        let host = if from_uri {
            last_host.value(authority)
        } else {
            None
        };
        Ok((target, host))
    }
}

/// The Host value made for the last request on a connection whose authority came from its URI
/// (HTTP/2's `:authority`, an absolute-form HTTP/1 target). A client names the same authority
/// on every request of a connection: the next such request shares the value (a reference
/// count) instead of copying the authority into a new one (an allocation per request, the
/// URI's bytes cannot be shared as a header value). One value per connection, replaced when
/// the authority differs: it never grows.
///
/// A new value is one allocation, its bytes and reference count together
/// ([`copy_small`](super::small_bytes::copy_small), for an authority of up to 1 KiB), so that
/// keeping a clone of it costs nothing more: the first request of a connection, or one whose
/// authority changed, allocates once, as without the sharing. The lock is only tried: the
/// streams of one HTTP/2 connection are tasks of their own, and a request that finds it
/// taken makes its own value rather than wait.
#[derive(Default)]
pub struct LastHost(Mutex<Option<HeaderValue>>);

impl LastHost {
    /// `authority` as a Host value; None when it is not a valid one.
    pub fn value(&self, authority: &str) -> Option<HeaderValue> {
        let mut last = match self.0.try_lock() {
            Ok(last) => last,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return Self::new_value(authority),
        };
        if let Some(v) = &*last
            && v.as_bytes() == authority.as_bytes()
        {
            return Some(v.clone());
        }
        let v = Self::new_value(authority)?;
        *last = Some(v.clone());
        Some(v)
    }

    /// A Host value whose clones never allocate (see [`LastHost`]).
    fn new_value(authority: &str) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(super::small_bytes::copy_small(authority.as_bytes())).ok()
    }
}

/// The request's authority and whether it came from the URI (absolute-form, HTTP/2
/// `:authority`) rather than the Host header. The URI wins, as RFC 9112 §3.2.2 says; several
/// Host headers are refused.
fn authority<B>(req: &Request<B>) -> Result<(&str, bool), &'static str> {
    // A pass over the names first: an HTTP/2 request rarely has a Host header, and a lookup
    // hashes the name even when there is none (~110 instructions per h2c request).
    let host = if req.headers().keys().any(|k| *k == header::HOST) {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() {
            return Err("more than one Host header");
        }
        host
    } else {
        None
    };
    if let Some(a) = req.uri().authority() {
        return Ok((a.as_str(), true));
    }
    match host.map(|h| h.to_str()) {
        Some(Ok(h)) if !h.is_empty() => Ok((h, false)),
        Some(_) => Err("the Host header is empty or not text"),
        None => Err("the request has no Host"),
    }
}

/// What routes match on: the host of an authority, lowercase, without userinfo and port
/// (`User@Example.com:8080` → `example.com`, `[::1]:80` → `[::1]`).
pub(super) fn route_key(authority: &str) -> Cow<'_, str> {
    // One pass for the last `@`, `:` and `]` (three searches from the end with `str`'s
    // searchers were ~500 instructions per request, callgrind on h2c; an authority is short).
    let bytes = authority.as_bytes();
    let (mut at, mut colon, mut bracket) = (None, None, None);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'@' => at = Some(i),
            b':' => colon = Some(i),
            b']' => bracket = Some(i),
            _ => {}
        }
    }
    let start = at.map_or(0, |i| i + 1);
    // A port: the last `:` of the host, unless a `]` follows it (an IPv6 literal's own).
    let end = match colon {
        Some(i) if i >= start && bracket.is_none_or(|b| b < i) => i,
        _ => bytes.len(),
    };
    let host = &authority[start..end];
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mesh peer's route series (and its listener's latency histograms for the peer's
    /// cluster) are removed when the cluster is evicted unused, as the cluster's own are; a
    /// peer in use keeps them, a router that made them as the eviction ran removes them at
    /// once, and a peer called again starts new ones.
    #[tokio::test]
    async fn a_mesh_peers_route_series_go_when_its_cluster_is_evicted() {
        let metrics = ProxyMetrics::default();
        let r = NameResolution::template(
            "127.0.0.{app_id}:{namespace}".into(),
            "1".into(),
            metrics.clone(),
        );
        let listener: Name = Arc::new("out".into());
        let router = Router::new("outbound", &listener, &[], &HashMap::new(), false, &metrics)
            .with_peers(Some(r.clone()));
        let series = |l: &RouteLabels| {
            let latency = LatencyLabels {
                direction: l.direction,
                listener: l.listener.clone(),
                cluster: l.cluster.clone(),
            };
            [
                metrics.requests.get(l).is_some(),
                metrics.request_bytes.get(l).is_some(),
                metrics.response_bytes.get(l).is_some(),
                metrics
                    .responses
                    .get(&response_labels(l, "2xx", ""))
                    .is_some(),
                metrics
                    .responses
                    .get(&response_labels(l, "5xx", "overload"))
                    .is_some(),
                metrics.latency.get(&latency).is_some(),
                metrics.duration.get(&latency).is_some(),
            ]
            .into_iter()
            .filter(|&there| there)
            .count()
        };
        let gone = router.peer("1").await.unwrap().unwrap();
        let kept = router.peer("2").await.unwrap().unwrap();
        for t in [&gone, &kept] {
            t.stats.requests.inc();
            t.stats
                .answered(503, Failure::Overload.reason(), Instant::now());
        }
        assert_eq!(gone.name.as_str(), "peer:1");
        assert_eq!(series(&gone.stats.labels), 7);
        assert_eq!(series(&kept.stats.labels), 7);
        let in_flight = kept.cluster.pick().expect("an endpoint");
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        assert_eq!(series(&gone.stats.labels), 0, "the evicted peer's series");
        assert_eq!(
            series(&kept.stats.labels),
            7,
            "the peer in use keeps its series"
        );
        // Series made for a cluster evicted meanwhile go at once.
        let late = r.cluster("3").await.unwrap();
        assert_eq!(r.evict_idle(Duration::ZERO), 1);
        let stats = RouteStats::new(
            &metrics,
            "outbound",
            &listener,
            Arc::new("peer:3".into()),
            &late.name,
        );
        assert_eq!(series(&stats.labels), 6, "all but the error's");
        r.track_route(&late, stats.labels.clone(), RouteStats::remove_series);
        assert_eq!(series(&stats.labels), 0);
        // Called again: new series.
        let again = router.peer("1").await.unwrap().unwrap();
        assert!(!Arc::ptr_eq(&again, &gone));
        assert_eq!(series(&again.stats.labels), 6);
        drop(in_flight);
    }

    #[test]
    fn hosts() {
        assert_eq!(route_key("Example.COM:8080"), "example.com");
        assert_eq!(route_key("user@api:80"), "api");
        assert_eq!(route_key("[::1]:80"), "[::1]");
        assert_eq!(route_key("[::1]"), "[::1]");
        assert_eq!(route_key("payments"), "payments");
        let two_hosts = Request::builder()
            .uri("/")
            .header("host", "a")
            .header("host", "b")
            .body(())
            .unwrap();
        assert!(authority(&two_hosts).is_err());
        let absolute = Request::builder()
            .uri("http://public/x")
            .header("host", "admin")
            .body(())
            .unwrap();
        assert_eq!(authority(&absolute).unwrap(), ("public", true));
    }

    /// The Host of a request is its own authority, shared with the last request's value when
    /// the two are the same, made anew when they differ; an invalid authority gives none.
    #[test]
    fn the_last_host_is_shared_only_while_the_authority_is_the_same() {
        let last = LastHost::default();
        let a = last.value("api.internal:8080").unwrap();
        let again = last.value("api.internal:8080").unwrap();
        assert_eq!(again, "api.internal:8080");
        // The same bytes, not a copy.
        assert_eq!(a.as_bytes().as_ptr(), again.as_bytes().as_ptr());
        let other = last.value("other.internal").unwrap();
        assert_eq!(other, "other.internal");
        assert_ne!(other.as_bytes().as_ptr(), a.as_bytes().as_ptr());
        assert_eq!(
            last.value("api.internal:8080").unwrap(),
            "api.internal:8080"
        );
        assert!(last.value("bad\nhost").is_none());
        assert_eq!(
            last.value("api.internal:8080").unwrap(),
            "api.internal:8080"
        );
    }

    /// A request that finds the connection's value taken (another stream of the same HTTP/2
    /// connection) makes its own instead of waiting, and leaves the shared one alone. The
    /// answer is awaited for a bounded time: a `LastHost` that waits for its lock fails here
    /// (the held lock is released as the test unwinds), it does not hang the run.
    #[test]
    fn a_request_does_not_wait_for_the_last_host() {
        let last = Arc::new(LastHost::default());
        let shared = last.value("api.internal:8080").unwrap();
        let held = last.0.lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let other = last.clone();
        let asker = std::thread::spawn(move || {
            let _ = tx.send(other.value("other.internal"));
        });
        let v = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the value, without waiting for the held lock");
        assert_eq!(v.unwrap(), "other.internal");
        asker.join().unwrap();
        assert_eq!(held.as_ref().unwrap(), "api.internal:8080");
        drop(held);
        let again = last.value("api.internal:8080").unwrap();
        assert_eq!(again.as_bytes().as_ptr(), shared.as_bytes().as_ptr());
    }

    /// The one-pass `route_key` says what the three searches it replaced said.
    #[test]
    fn route_keys_are_the_host_without_userinfo_and_port() {
        let searched = |authority: &str| {
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let host = match host.rfind(':') {
                Some(i) if !host[i..].contains(']') => &host[..i],
                _ => host,
            };
            host.to_ascii_lowercase()
        };
        for a in [
            "api",
            "api:80",
            "API.Internal:8080",
            "User@Example.com:8080",
            "u:p@host:1",
            "u:p@host",
            "u@p@host:2",
            "[::1]",
            "[::1]:80",
            "u@[::1]:80",
            "[::1]@host",
            "[::1]:80@host:9",
            ":80",
            "@",
            "@:",
            "",
            "host:",
            "a]b:c",
            "a:b]c",
        ] {
            assert_eq!(route_key(a), searched(a), "{a:?}");
        }
        assert_eq!(route_key("User@Example.com:8080"), "example.com");
        assert_eq!(route_key("[::1]:80"), "[::1]");
    }

    #[test]
    fn route_keys_borrow_unless_they_must_lowercase() {
        assert!(matches!(
            route_key("api.internal:80"),
            Cow::Borrowed("api.internal")
        ));
        assert!(matches!(route_key("API"), Cow::Owned(_)));
        let host = |h: &str| {
            let r = Request::builder()
                .uri("/")
                .header("host", h)
                .body(())
                .unwrap();
            authority(&r).map(|(a, from_uri)| (a.to_string(), from_uri))
        };
        assert_eq!(host("api:8080"), Ok(("api:8080".to_string(), false)));
        assert!(host("").is_err());
        assert!(authority(&Request::builder().uri("/").body(()).unwrap()).is_err());
    }
}
