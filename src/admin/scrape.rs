//! Reads our own `/metrics` text back into the few numbers the dashboard shows: request and
//! error counts by route, latency buckets by cluster, open connections, pub/sub deliveries,
//! log agent and process figures.
//!
//! In: [`crate::telemetry::metrics::encode`] of the registry, only when someone asks
//! (`GET /status`, or the history sampler while someone watches). Out: a [`Snapshot`]. Reading
//! the text rather than the metric handles is deliberate: prometheus-client gives no way to
//! list a family's label sets or a histogram's buckets, and the dashboard then agrees with
//! `/metrics` by construction.
//!
//! Written by hand: the input is our own encoder's output (no timestamps, no exemplars
//! outside OpenMetrics), about forty lines; the one parser crate (prometheus-parse) pulls
//! regex, chrono and itertools along for the same.

use std::collections::BTreeMap;

/// Where a request went: the labels of `outrigger_http_requests_total`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub direction: String,
    pub listener: String,
    pub route: String,
    pub cluster: String,
}

/// The labels of `outrigger_http_response_latency_seconds`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LatencyKey {
    pub direction: String,
    pub listener: String,
    pub cluster: String,
}

/// A response Outrigger answered itself, by why (`connect`, `timeout`, `overload`, …).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ErrorKey {
    pub route: RouteKey,
    pub class: String,
    pub error: String,
}

/// Counts of one route (cumulative, as in `/metrics`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteCounts {
    pub requests: f64,
    pub responses: f64,
    /// Responses with status 5xx.
    pub errors: f64,
    /// Responses by status class (`2xx`, …).
    pub by_class: BTreeMap<String, f64>,
}

/// One histogram: cumulative bucket counts by upper bound (ascending, `+Inf` last).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    pub le: Vec<(f64, f64)>,
    pub count: f64,
    pub sum: f64,
}

impl Buckets {
    /// The `q` quantile (0..1), interpolated inside its bucket as Prometheus'
    /// `histogram_quantile` does; None without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.le.last().map_or(self.count, |b| b.1);
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, count) in &self.le {
            if count >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = count - below;
                return Some(if inside > 0.0 {
                    lower + (le - lower) * (rank - below) / inside
                } else {
                    le
                });
            }
            (lower, below) = (le, count);
        }
        Some(lower)
    }

    /// What was observed between `earlier` and `self` (same buckets).
    pub fn since(&self, earlier: Option<&Buckets>) -> Buckets {
        let Some(e) = earlier.filter(|e| e.le.len() == self.le.len()) else {
            return self.clone();
        };
        Buckets {
            le: self
                .le
                .iter()
                .zip(&e.le)
                .map(|(&(le, now), &(_, then))| (le, (now - then).max(0.0)))
                .collect(),
            count: (self.count - e.count).max(0.0),
            sum: (self.sum - e.sum).max(0.0),
        }
    }
}

/// The numbers the dashboard needs from one encoding of the registry.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub routes: BTreeMap<RouteKey, RouteCounts>,
    /// Responses Outrigger answered itself (non-empty `error` label), by route and reason.
    pub errors: BTreeMap<ErrorKey, f64>,
    pub latency: BTreeMap<LatencyKey, Buckets>,
    /// `outrigger_connections_open` by listener.
    pub connections_open: BTreeMap<String, f64>,
    /// `outrigger_pubsub_delivered_total` by (pubsub, topic, result).
    pub deliveries: BTreeMap<(String, String, String), f64>,
    /// `outrigger_reload_actions_total` by (reload entry, result).
    pub reload_actions: BTreeMap<(String, String), f64>,
    /// `outrigger_config_reloads_total` by result.
    pub config_reloads: BTreeMap<String, f64>,
    pub logs_read: f64,
    pub logs_shipped: f64,
    pub logs_dropped: f64,
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
}

impl Snapshot {
    /// Reads the text of `/metrics` (Prometheus format).
    pub fn parse(text: &str) -> Snapshot {
        let mut s = Snapshot::default();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((name, labels, value)) = series(line) else {
                continue;
            };
            let label = |k: &str| {
                labels
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or(String::new(), |(_, v)| v.clone())
            };
            let route = || RouteKey {
                direction: label("direction"),
                listener: label("listener"),
                route: label("route"),
                cluster: label("cluster"),
            };
            let latency = || LatencyKey {
                direction: label("direction"),
                listener: label("listener"),
                cluster: label("cluster"),
            };
            match name {
                "outrigger_http_requests_total" => {
                    s.routes.entry(route()).or_default().requests = value
                }
                "outrigger_http_responses_total" => {
                    let class = label("class");
                    let error = label("error");
                    let r = s.routes.entry(route()).or_default();
                    r.responses += value;
                    if class == "5xx" {
                        r.errors += value;
                    }
                    *r.by_class.entry(class.clone()).or_default() += value;
                    if !error.is_empty() {
                        *s.errors
                            .entry(ErrorKey {
                                route: route(),
                                class,
                                error,
                            })
                            .or_default() += value;
                    }
                }
                "outrigger_http_response_latency_seconds_bucket" => {
                    let le = match label("le").as_str() {
                        "+Inf" => f64::INFINITY,
                        other => other.parse().unwrap_or(f64::INFINITY),
                    };
                    s.latency.entry(latency()).or_default().le.push((le, value));
                }
                "outrigger_http_response_latency_seconds_count" => {
                    s.latency.entry(latency()).or_default().count = value
                }
                "outrigger_http_response_latency_seconds_sum" => {
                    s.latency.entry(latency()).or_default().sum = value
                }
                "outrigger_connections_open" => {
                    *s.connections_open.entry(label("listener")).or_default() += value
                }
                "outrigger_pubsub_delivered_total" => {
                    s.deliveries
                        .insert((label("pubsub"), label("topic"), label("result")), value);
                }
                "outrigger_reload_actions_total" => {
                    s.reload_actions
                        .insert((label("reload"), label("result")), value);
                }
                "outrigger_config_reloads_total" => {
                    s.config_reloads.insert(label("result"), value);
                }
                "outrigger_logs_read_lines_total" => s.logs_read += value,
                "outrigger_logs_shipped_lines_total" => s.logs_shipped += value,
                "outrigger_logs_dropped_lines_total" => s.logs_dropped += value,
                "process_cpu_seconds_total" => s.cpu_seconds = value,
                "process_resident_memory_bytes" => s.resident_bytes = value,
                _ => {}
            }
        }
        for b in s.latency.values_mut() {
            b.le.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        s
    }
}

/// A sample's labels, in order.
type Labels = Vec<(String, String)>;

/// One sample line: `name{k="v",…} value` or `name value`.
fn series(line: &str) -> Option<(&str, Labels, f64)> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// `k="v",…}` and what follows the closing brace; values unescaped (`\\`, `\"`, `\n`).
fn labels(mut text: &str) -> Option<(Labels, &str)> {
    let mut out = Vec::new();
    loop {
        text = text.trim_start_matches(',');
        if let Some(rest) = text.strip_prefix('}') {
            return Some((out, rest));
        }
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_string(), value));
        text = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP outrigger_http_requests Requests.
# TYPE outrigger_http_requests counter
outrigger_http_requests_total{direction="outbound",listener="egress",route="0",cluster="backend"} 10
outrigger_http_responses_total{direction="outbound",listener="egress",route="0",cluster="backend",class="2xx",error=""} 7
outrigger_http_responses_total{direction="outbound",listener="egress",route="0",cluster="backend",class="5xx",error="connect"} 3
outrigger_http_response_latency_seconds_sum{direction="outbound",listener="egress",cluster="backend"} 0.2
outrigger_http_response_latency_seconds_count{direction="outbound",listener="egress",cluster="backend"} 10
outrigger_http_response_latency_seconds_bucket{direction="outbound",listener="egress",cluster="backend",le="0.01"} 5
outrigger_http_response_latency_seconds_bucket{direction="outbound",listener="egress",cluster="backend",le="0.1"} 9
outrigger_http_response_latency_seconds_bucket{direction="outbound",listener="egress",cluster="backend",le="+Inf"} 10
outrigger_connections_open{direction="outbound",listener="we\"ird,name}"} 2
process_cpu_seconds_total 1.5
"#;

    #[test]
    fn reads_routes_errors_and_latency() {
        let s = Snapshot::parse(TEXT);
        let (key, r) = s.routes.iter().next().unwrap();
        assert_eq!(key.route, "0");
        assert_eq!((r.requests, r.responses, r.errors), (10.0, 10.0, 3.0));
        let (e, n) = s.errors.iter().next().unwrap();
        assert_eq!(
            (e.error.as_str(), e.class.as_str(), *n),
            ("connect", "5xx", 3.0)
        );
        let b = s.latency.values().next().unwrap();
        assert_eq!(b.count, 10.0);
        // 5th of 10 is the top of the first bucket; the 9.5th half-way into (0.1, +Inf]:
        // the highest finite bound, as histogram_quantile answers.
        assert_eq!(b.quantile(0.5), Some(0.01));
        assert!((b.quantile(0.7).unwrap() - 0.055).abs() < 1e-9);
        assert_eq!(b.quantile(0.95), Some(0.1));
        assert_eq!(s.connections_open["we\"ird,name}"], 2.0);
        assert_eq!(s.cpu_seconds, 1.5);
    }

    #[test]
    fn deltas_and_empty_histograms() {
        let now = Snapshot::parse(TEXT);
        let b = now.latency.values().next().unwrap();
        let d = b.since(Some(b));
        assert_eq!(d.count, 0.0);
        assert_eq!(d.quantile(0.5), None);
        assert_eq!(b.since(None), *b);
    }
}
