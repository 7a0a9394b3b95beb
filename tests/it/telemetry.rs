//! Telemetry: span export to a real OTLP/HTTP receiver, dropping when the collector is down,
//! access log format strings, per-route histograms and byte counters, and `promtool` on
//! `/metrics` while traffic flows.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::backend::{Backend, dead_port};
use crate::support::{Sidecar, client, eventually};

/// One POST the collector received.
#[derive(Clone, Debug)]
struct Export {
    path: String,
    content_type: String,
    body: Value,
}

/// A small OTLP/HTTP receiver: a hyper server that decodes each JSON export request.
struct Collector {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Export>>>,
}

impl Collector {
    fn start() -> Collector {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((s, _)) = listener.accept().await else {
                        continue;
                    };
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let seen = seen.clone();
                                async move {
                                    let path = req.uri().path().to_string();
                                    let content_type = req
                                        .headers()
                                        .get("content-type")
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or_default()
                                        .to_string();
                                    let body = req.into_body().collect().await.unwrap().to_bytes();
                                    let body: Value =
                                        serde_json::from_slice(&body).expect("an OTLP JSON body");
                                    seen.lock().unwrap().push(Export {
                                        path,
                                        content_type,
                                        body,
                                    });
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                        Full::new(Bytes::from_static(b"{}")),
                                    ))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        });
        Collector { addr, got }
    }

    /// Every span received so far, with the resource's service.name.
    fn spans(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for e in self.got.lock().unwrap().iter() {
            for rs in e.body["resourceSpans"].as_array().unwrap() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["key"] == "service.name")
                    .map(|a| a["value"]["stringValue"].as_str().unwrap().to_string())
                    .unwrap();
                for ss in rs["scopeSpans"].as_array().unwrap() {
                    for s in ss["spans"].as_array().unwrap() {
                        out.push((service.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .unwrap_or_else(|| panic!("no attribute {key} in {span}"))["value"]
}

#[test]
fn spans_reach_a_real_otlp_receiver_with_parent_links() {
    let collector = Collector::start();
    let app = Backend::http();
    // B: inbound to the app. A: outbound to B. Both export to the collector.
    let b = Sidecar::start(&format!(
        "service: payments\napp:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  tracing: {{ sample: 0, otlp: http://{} }}\n",
        app.address(),
        collector.addr
    ));
    b.wait_ready();
    let b_public = b.listeners["public"].clone();
    let a = Sidecar::start(&format!(
        "service: checkout\nlisteners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - name: to-payments\n        cluster: payments\nclusters:\n  payments:\n    endpoints: [{b_public}]\ntelemetry:\n  tracing:\n    sample: 0\n    otlp: {{ endpoint: 'http://{}/', headers: {{ authorization: Bearer t0k3n }} }}\n",
        collector.addr
    ));
    a.wait_ready();
    let c = client();
    let r = c
        .post(a.listener_url("out", "/pay?id=7"))
        .header("host", "payments")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body("hello")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Not sampled (flags 00, and sample: 0 for new traces): not exported.
    for tp in [
        Some("00-11111111111111111111111111111111-00f067aa0ba902b7-00"),
        None,
    ] {
        let mut req = c
            .get(a.listener_url("out", "/quiet"))
            .header("host", "payments");
        if let Some(tp) = tp {
            req = req.header("traceparent", tp);
        }
        assert_eq!(req.send().unwrap().status(), 200);
    }
    let spans = eventually(
        Duration::from_secs(10),
        "two spans at the collector",
        || {
            let s = collector.spans();
            (s.len() >= 2).then_some(s)
        },
    );
    assert_eq!(spans.len(), 2, "only the sampled request: {spans:?}");
    let exports = collector.got.lock().unwrap().clone();
    for e in &exports {
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(e.content_type, "application/json");
    }
    let (a_service, out) = spans
        .iter()
        .find(|(_, s)| s["kind"] == 3)
        .expect("a client span");
    let (b_service, inb) = spans
        .iter()
        .find(|(_, s)| s["kind"] == 2)
        .expect("a server span");
    assert_eq!(a_service, "checkout");
    assert_eq!(b_service, "payments");
    // One trace: the client's span → A's outbound hop → B's inbound hop → the app.
    assert_eq!(out["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(inb["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(out["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(inb["parentSpanId"], out["spanId"]);
    let seen = app.seen();
    let tp = seen[0].header("traceparent").unwrap();
    assert_eq!(
        tp,
        format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
            inb["spanId"].as_str().unwrap()
        )
    );
    assert_eq!(out["name"], "POST to-payments");
    assert_eq!(attr(out, "http.request.method")["stringValue"], "POST");
    assert_eq!(attr(out, "url.path")["stringValue"], "/pay");
    assert_eq!(attr(out, "http.response.status_code")["intValue"], "200");
    assert_eq!(attr(out, "network.peer.address")["stringValue"], b_public);
    assert_eq!(
        attr(inb, "network.peer.address")["stringValue"],
        app.address()
    );
    let start: u64 = out["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u64 = out["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let inner_start: u64 = inb["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 1_600_000_000_000_000_000 && start <= end, "{out}");
    assert!(
        start <= inner_start,
        "the outer hop starts first: {out} {inb}"
    );
    assert_eq!(out["status"]["code"], 0);
    eventually(Duration::from_secs(5), "the export counted", || {
        (a.metric("outrigger_spans_exported_total") == 1.0).then_some(())
    });
    // The header's value is not shown by /config…
    let config = a.get_json("/config");
    assert_eq!(
        config["config"]["telemetry"]["tracing"]["otlp"]["headers"]["authorization"], "<redacted>",
        "{config}"
    );
    assert!(!config.to_string().contains("t0k3n"));
    // …but a rotated value is still seen by a reload, and named as needing a restart.
    let text = std::fs::read_to_string(&a.config_path).unwrap();
    let tmp = a.config_path.with_extension("new");
    std::fs::write(&tmp, text.replace("t0k3n", "n3wt0k3n")).unwrap();
    std::fs::rename(&tmp, &a.config_path).unwrap();
    let r = c.post(a.url("/reload")).send().unwrap();
    assert!(r.status().is_success());
    eventually(
        Duration::from_secs(10),
        "telemetry.tracing needing a restart",
        || {
            let v = a.get_json("/config");
            let needs = v["last_reload"]["needs_restart"].as_array()?.clone();
            needs.iter().any(|k| k == "telemetry.tracing").then_some(())
        },
    );
}

#[test]
fn spans_are_dropped_and_counted_when_the_collector_is_down() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  tracing: {{ sample: 1, otlp: {{ endpoint: http://{}, timeout: 1s }} }}\n",
        app.address(),
        dead_port()
    ));
    sc.wait_ready();
    let c = client();
    for _ in 0..5 {
        let r = c.get(sc.listener_url("public", "/x")).send().unwrap();
        assert_eq!(r.status(), 200, "traffic is not held up by the exporter");
    }
    eventually(
        Duration::from_secs(10),
        "5 spans counted as dropped",
        || {
            (sc.metric("outrigger_spans_dropped_total{reason=\"export_failed\"}") == 5.0)
                .then_some(())
        },
    );
    assert_eq!(app.count(), 5);
    assert!(
        sc.stderr().contains("cannot export spans"),
        "{}",
        sc.stderr()
    );
}

#[test]
fn access_log_format_strings_shape_the_line() {
    let app = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  access_log: {{ to: {}, format: '{{method}} {{path}} {{status}} route={{route}} id={{request_id}} peer={{identity}} {{{{done}}}}' }}\n",
        app.address(),
        log.display()
    ));
    sc.wait_ready();
    let r = client()
        .get(sc.listener_url("public", "/status/202?q=1"))
        .header("x-request-id", "abc")
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let line = eventually(Duration::from_secs(5), "a log line", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.ends_with('\n'))
    });
    assert_eq!(
        line,
        "GET /status/202 202 route=default id=abc peer=- {done}\n"
    );
}

#[test]
fn route_histograms_and_body_bytes_count_every_request() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n",
        app.address()
    ));
    sc.wait_ready();
    let c = client();
    let mut out_bytes = 0;
    for i in 0..7 {
        let r = c
            .post(sc.listener_url("public", &format!("/r{i}")))
            .body(vec![b'x'; 100])
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        out_bytes += r.bytes().unwrap().len();
    }
    let labels = "direction=\"inbound\",listener=\"public\",cluster=\"app\"";
    let route = "direction=\"inbound\",listener=\"public\",route=\"default\",cluster=\"app\"";
    // The body's end is recorded when hyper has sent it, just after the client has it.
    eventually(Duration::from_secs(5), "7 durations", || {
        (sc.metric(&format!(
            "outrigger_http_request_duration_seconds_count{{{labels}}}"
        )) == 7.0)
            .then_some(())
    });
    assert_eq!(
        sc.metric(&format!(
            "outrigger_http_response_latency_seconds_count{{{labels}}}"
        )),
        7.0
    );
    let (_, metrics) = sc.get("/metrics");
    let buckets: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("outrigger_http_request_duration_seconds_bucket{")
                && l.contains("cluster=\"app\"")
        })
        .collect();
    let les: Vec<String> = buckets
        .iter()
        .map(|l| {
            l.split("le=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        les,
        [
            "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
            "1", "2.5", "5", "10", "+Inf"
        ],
        "{metrics}"
    );
    assert!(buckets.last().unwrap().ends_with(" 7"), "{buckets:?}");
    assert_eq!(
        sc.metric(&format!(
            "outrigger_http_request_body_bytes_total{{{route}}}"
        )),
        700.0
    );
    assert_eq!(
        sc.metric(&format!(
            "outrigger_http_response_body_bytes_total{{{route}}}"
        )),
        out_bytes as f64
    );
}

#[test]
fn promtool_accepts_metrics_under_load() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - name: api\n        match: {{ path_prefix: /api }}\n        cluster: app\n      - name: dead\n        match: {{ path_prefix: /dead }}\n        cluster: dead\nclusters:\n  dead:\n    endpoints: [{}]\ntelemetry:\n  tracing: {{ sample: 1, otlp: http://{} }}\n",
        app.address(),
        dead_port(),
        dead_port()
    ));
    sc.wait_ready();
    let url = sc.listener_url("public", "");
    // Bounded load: 4 workers × 200 requests over three routes (one failing), while scraping.
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let c = client();
                for i in 0..200 {
                    let path = match (w + i) % 3 {
                        0 => "/api/x",
                        1 => "/dead/x",
                        _ => "/other",
                    };
                    let _ = c.get(format!("{url}{path}")).send();
                }
            })
        })
        .collect();
    let mut scrapes = 0;
    while scrapes < 3 || workers.iter().any(|w| !w.is_finished()) {
        let (_, body) = sc.get("/metrics");
        promtool(&body);
        scrapes += 1;
    }
    for w in workers {
        w.join().unwrap();
    }
    let (_, body) = sc.get("/metrics");
    promtool(&body);
    assert!(body.contains("outrigger_http_request_duration_seconds_bucket{"));
    assert!(body.contains("route=\"dead\""), "{body}");
}

fn promtool(body: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install the Debian package `prometheus` (.ci/run does)");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}\n{body}"
    );
}

/// docs/grafana-dashboard.json: every query is valid PromQL (promtool checks it as a recording
/// rule) and uses only metrics docs/metrics.md lists.
#[test]
fn the_grafana_dashboard_queries_documented_metrics_with_valid_promql() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let documented = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$job", ".*")
                .replace("$instance", ".*");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("outrigger_") || word.starts_with("process_") {
                    let base = word.strip_suffix("_bucket").unwrap_or(word);
                    assert!(
                        documented.contains(&format!("`{base}`")),
                        "the dashboard's panel {:?} uses {word}, which docs/metrics.md does not list",
                        panel["title"]
                    );
                }
            }
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:query{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    assert!(n > 20, "{n} queries");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool not found: install the Debian package `prometheus` (.ci/run does)");
    assert!(
        out.status.success(),
        "promtool rejected a dashboard query: {}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_sampled_request_on_the_http1_fast_path_exports_one_span() {
    let collector = Collector::start();
    let app = Backend::http();
    // Spans only (no access log), no listener limits: a GET without a body is the fast path's.
    let sc = Sidecar::start(&format!(
        "service: payments\napp:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  tracing: {{ sample: 0, otlp: http://{} }}\n",
        app.address(),
        collector.addr
    ));
    sc.wait_ready();
    let c = client();
    for tp in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-11111111111111111111111111111111-00f067aa0ba902b7-00",
    ] {
        let r = c
            .get(sc.listener_url("public", "/fast?x=1"))
            .header("traceparent", tp)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    eventually(Duration::from_secs(10), "the export counted", || {
        (sc.metric("outrigger_spans_exported_total") >= 1.0).then_some(())
    });
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "only the sampled request: {spans:?}");
    let (service, span) = &spans[0];
    assert_eq!(service, "payments");
    assert_eq!(span["kind"], 2, "a server span: {span}");
    assert_eq!(span["name"], "GET default");
    assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(attr(span, "url.path")["stringValue"], "/fast");
    assert_eq!(attr(span, "http.response.status_code")["intValue"], "200");
    assert_eq!(
        attr(span, "network.peer.address")["stringValue"],
        app.address()
    );
    let seen = app.seen();
    assert_eq!(
        seen[0].header("traceparent").unwrap(),
        format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
            span["spanId"].as_str().unwrap()
        )
    );
}
