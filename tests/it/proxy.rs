//! The proxy through the real binary with real backends: HTTP/1.1, h2c, a gRPC-shaped h2
//! stream with trailers, upgrades, TCP mode, unix sockets, routing, retries and their budget,
//! ejection, discovery from a file, limits, timeouts and request smuggling shapes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::backend::{Backend, dead_port, tcp_echo};
use crate::support::{GrpcStream, Sidecar, client, eventually, or_panic, with_http2_server};

// The HTTP/2 tests of this file, each run with hyper's HTTP/2 server and with Outrigger's own
// (`NAME::hyper`, `NAME::outrigger`).
on_both_http2_servers!(
    inbound_http1_and_h2c_reach_the_app_with_forwarding_headers,
    grpc_shaped_h2_stream_flows_both_ways_with_trailers,
    a_request_cancelled_before_its_response_is_logged_as_client_closed,
    http2_streams_whose_client_reads_nothing_are_reset,
    an_http2_body_waiting_on_a_quiet_upstream_outlives_the_idle_timeout,
    the_first_body_byte_wait_skips_bodiless_responses_and_keeps_the_route_timeout,
    raw_exchange_reuses_a_clean_connection_and_drops_one_with_trailing_bytes,
    h2c_and_hyper_path_requests_take_the_raw_exchange,
    an_upstream_that_answers_before_reading_the_body_is_heard,
    an_early_answer_leaves_its_connection_out_of_the_pool,
    an_early_answer_to_a_large_body_is_heard,
    an_early_answer_with_bytes_past_it_or_a_reset_without_one_ends_the_connection,
    a_stated_body_length_over_max_request_body_gets_413,
    a_body_growing_past_max_request_body_is_cut_with_413,
);

fn inbound(app: &Backend, extra: &str) -> Sidecar {
    inbound_on("hyper", app, extra)
}

/// [`inbound`], whose listener serves HTTP/2 with `server` (`http2_server`).
fn inbound_on(server: &str, app: &Backend, extra: &str) -> Sidecar {
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n{extra}",
            app.address()
        ),
    ));
    sc.wait_ready();
    sc
}

/// Sends raw bytes and returns everything read until the peer closes or 5 s pass.
fn raw(addr: &str, data: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(data).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn inbound_http1_and_h2c_reach_the_app_with_forwarding_headers(server: &str) {
    let app = Backend::http();
    let sc = inbound_on(server, &app, "");
    let r = client()
        .get(sc.listener_url("public", "/hello?x=1"))
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .header("x-forwarded-proto", "https")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = &app.seen()[0];
    assert_eq!(seen.path, "/hello?x=1");
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some("http"),
        "inbound overwrites the client's claim"
    );
    assert_eq!(seen.header("via"), Some("1.1 outrigger"));
    assert_eq!(seen.header("x-request-id").map(str::len), Some(32));
    assert_eq!(
        seen.header("x-secret"),
        None,
        "headers named in Connection are hop-by-hop"
    );

    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(sc.listener_url("public", "/h2"))
        .body("over h2c")
        .send()
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen = app.seen().pop().unwrap();
    assert_eq!(seen.body, b"over h2c");
    assert_eq!(
        seen.header("host").map(|h| h.starts_with("127.0.0.1:")),
        Some(true),
        "HTTP/1.1 upstream gets a Host"
    );
    assert_eq!(seen.header("via"), Some("2 outrigger"));

    assert_eq!(sc.metric("outrigger_http_requests_total{direction=\"inbound\",listener=\"public\",route=\"default\",cluster=\"app\"}"), 2.0);
    assert_eq!(
        sc.metric("outrigger_http_responses_total{direction=\"inbound\",listener=\"public\",route=\"default\",cluster=\"app\",class=\"2xx\",error=\"\"}"),
        2.0
    );
}

#[test]
fn outbound_routes_match_rewrite_and_fall_back_to_host() {
    let (a, b) = (Backend::http(), Backend::http());
    let sc = Sidecar::start(&format!(
        r#"
clusters:
  alpha: {{ endpoints: ["{}"] }}
  beta: {{ endpoints: ["{}"] }}
listeners:
  - name: egress
    address: 127.0.0.1:0
    direction: outbound
    routes:
      - name: canary
        match: {{ headers: {{ x-env: canary }} }}
        cluster: beta
      - name: v1
        match: {{ host: api.example.com, path_prefix: /v1/ }}
        cluster: alpha
        rewrite: {{ path_prefix: / }}
        request_headers: {{ add: {{ x-route: v1 }}, remove: [x-drop] }}
        response_headers: {{ add: {{ x-served-by: alpha }} }}
      - match: {{ path_regex: "^/items/[0-9]+$", method: delete }}
        cluster: beta
"#,
        a.address(),
        b.address()
    ));
    sc.wait_ready();
    let url = |p: &str| sc.listener_url("egress", p);
    let r = client()
        .get(url("/v1/pay?id=7"))
        .header("host", "api.example.com")
        .header("x-drop", "1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "alpha");
    let seen = a.seen().pop().unwrap();
    assert_eq!(seen.path, "/pay?id=7");
    assert_eq!(seen.header("x-route"), Some("v1"));
    assert_eq!(seen.header("x-drop"), None);
    assert_eq!(
        seen.header("host"),
        Some("api.example.com"),
        "the authority is kept"
    );

    client()
        .get(url("/anything"))
        .header("host", "api.example.com")
        .header("x-env", "canary")
        .send()
        .unwrap();
    assert_eq!(b.count(), 1, "first match wins: the canary route");
    client()
        .delete(url("/items/42"))
        .header("host", "x")
        .send()
        .unwrap();
    assert_eq!(b.count(), 2);
    // No route: the Host names a cluster.
    client()
        .get(url("/by-host"))
        .header("host", "alpha:8080")
        .send()
        .unwrap();
    assert_eq!(a.seen().pop().unwrap().path, "/by-host");
    let r = client()
        .get(url("/nope"))
        .header("host", "nowhere")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-outrigger-error"], "no-route");
}

fn grpc_shaped_h2_stream_flows_both_ways_with_trailers(server: &str) {
    let app = Backend::http();
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "clusters:\n  grpc: {{ endpoints: [\"{}\"], http2: true }}\nlisteners:\n  - name: egress\n    address: 127.0.0.1:0\n    direction: outbound\n",
            app.address()
        ),
    ));
    sc.wait_ready();
    let diag = || sc.diagnostics();
    // Each message comes back before the next is sent: nothing is buffered on the way.
    let mut call = or_panic(
        GrpcStream::open(&sc.listeners["egress"], "grpc", &[], b"one"),
        diag,
    );
    assert_eq!(call.status, 200, "{}", diag());
    for msg in ["two", "three"] {
        or_panic(call.exchange(msg.as_bytes()), diag);
    }
    assert_eq!(
        or_panic(call.finish(), diag).as_deref(),
        Some("0"),
        "{}",
        diag()
    );
    let seen = app.seen()[0].clone();
    assert_eq!(seen.version, "HTTP/2.0");
    assert_eq!(seen.header("te"), Some("trailers"));
}

#[test]
fn upgrades_are_spliced() {
    let app = Backend::http();
    let sc = inbound(&app, "");
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [&b"ping"[..], b"pong and more"] {
        s.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    }
    assert_eq!(app.seen()[0].header("upgrade"), Some("websocket"));
}

#[test]
fn tcp_mode_copies_bytes_both_ways() {
    let (echo, _t) = tcp_echo();
    let sc = Sidecar::start(&format!(
        "clusters:\n  db: {{ endpoints: [\"{echo}\"] }}\nlisteners:\n  - name: db\n    address: 127.0.0.1:0\n    direction: outbound\n    protocol: tcp\n    cluster: db\n"
    ));
    sc.wait_ready();
    let mut s = TcpStream::connect(&sc.listeners["db"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A protocol that speaks first from the client and is not HTTP.
    let msg = b"\x00\x01binary\xffpayload";
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, msg);
    drop(s);
    eventually(Duration::from_secs(5), "byte counters", || {
        (sc.metric(
            "outrigger_bytes_total{direction=\"outbound\",listener=\"db\",flow=\"received\"}",
        ) == msg.len() as f64)
            .then_some(())
    });
}

#[test]
fn unix_sockets_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let app = Backend::http_unix(dir.path().join("app.sock"));
    let listen = dir.path().join("in.sock");
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: unix:{}\n",
        app.address(),
        listen.display()
    ));
    sc.wait_ready();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&listen).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "unix listeners are private by default");
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--unix-socket",
            listen.to_str().unwrap(),
            "http://app/over-unix",
        ])
        .output()
        .expect("curl");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/over-unix"),
        "{out:?}\n{}",
        sc.diagnostics()
    );
    assert_eq!(
        app.seen()[0].header("x-forwarded-for"),
        None,
        "no IP for a unix peer"
    );
}

#[test]
fn retries_happen_and_stop_at_the_budget() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        r#"
clusters:
  flaky:
    endpoints: ["{}"]
    outlier: {{ consecutive_failures: 0 }}
    retry_budget: {{ ratio: 0.2, min_per_second: 1 }}
listeners:
  - name: egress
    address: 127.0.0.1:0
    direction: outbound
    routes:
      - cluster: flaky
        retry: {{ attempts: 3, on: ["503"], backoff: 1ms }}
"#,
        app.address()
    ));
    sc.wait_ready();
    let n = 50;
    for _ in 0..n {
        let r = client()
            .get(sc.listener_url("egress", "/status/503"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 503, "the last answer passes through");
    }
    let attempted = sc.metric("outrigger_retries_total{cluster=\"flaky\",outcome=\"attempted\"}");
    let exhausted =
        sc.metric("outrigger_retries_total{cluster=\"flaky\",outcome=\"budget_exhausted\"}");
    // The budget: 20% of requests plus 1/s (over a 10 s window) — far below 3 retries each.
    assert!(attempted >= 3.0, "retries happened: {attempted}");
    assert!(
        attempted <= 0.2 * n as f64 + 12.0,
        "retries stopped at the budget: {attempted}"
    );
    assert!(exhausted > 0.0, "the budget refused some retries");
    assert_eq!(
        app.count() as f64,
        n as f64 + attempted,
        "every attempt reached the backend once"
    );
}

#[test]
fn a_dead_endpoint_is_ejected() {
    let live = Backend::http();
    let dead = dead_port();
    let sc = Sidecar::start(&format!(
        r#"
clusters:
  svc:
    endpoints: ["{dead}", "{}"]
    outlier: {{ consecutive_failures: 2, ejection_time: 60s }}
listeners:
  - name: egress
    address: 127.0.0.1:0
    direction: outbound
    routes:
      - cluster: svc
        retry: {{ attempts: 1, on: [connect-failure] }}
"#,
        live.address()
    ));
    sc.wait_ready();
    for _ in 0..20 {
        let r = client()
            .get(sc.listener_url("egress", "/ok"))
            .send()
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "a connect failure is retried on the other endpoint"
        );
    }
    assert_eq!(
        sc.metric("outrigger_endpoint_ejections_total{cluster=\"svc\"}"),
        1.0
    );
    // After the ejection every request goes to the live endpoint at once: no more retries.
    let retries = sc.metric("outrigger_retries_total{cluster=\"svc\",outcome=\"attempted\"}");
    assert!(retries <= 2.0, "{retries}");
    assert_eq!(live.count(), 20);
}

#[test]
fn endpoints_file_is_hot_reloaded() {
    let (a, b) = (Backend::http(), Backend::http());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    // Replaced atomically, as Kubernetes and editors do: a half-written file is never read.
    let write = |text: String| {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(format!("endpoints: [\"{}\"]\n", a.address()));
    let sc = Sidecar::start(&format!(
        "clusters:\n  svc: {{ file: {}, refresh: 100ms }}\nlisteners:\n  - name: egress\n    address: 127.0.0.1:0\n    direction: outbound\n",
        file.display()
    ));
    sc.wait_ready();
    let get = || {
        client()
            .get(sc.listener_url("egress", "/x"))
            .header("host", "svc")
            .send()
            .unwrap()
            .status()
    };
    eventually(Duration::from_secs(10), "the first endpoint", || {
        (get() == 200 && a.count() > 0).then_some(())
    });
    write(format!("endpoints: [\"{}\"]\n", b.address()));
    eventually(Duration::from_secs(10), "the new endpoint", || {
        (get() == 200 && b.count() > 0).then_some(())
    });
    // A broken file keeps the last good endpoints.
    let failed =
        || sc.metric("outrigger_discovery_updates_total{cluster=\"svc\",outcome=\"failed\"}");
    let baseline = failed();
    write("endpoints: [nonsense\n".to_string());
    eventually(Duration::from_secs(10), "the broken file read", || {
        (failed() > baseline).then_some(())
    });
    let before = b.count();
    assert_eq!(get(), 200);
    assert_eq!(b.count(), before + 1, "the last good endpoint still serves");
}

/// A name in /etc/hosts for one test; the system resolver reads the file on every lookup, so
/// changing the entry changes what DNS discovery sees. Removed on drop.
struct HostsEntry {
    /// The file as it was before the test, written back on drop.
    original: Vec<u8>,
}

static HOSTS_FILE: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl HostsEntry {
    fn new() -> HostsEntry {
        HostsEntry {
            original: std::fs::read("/etc/hosts").unwrap(),
        }
    }

    /// The original file plus one line for `name` (or none).
    fn set(&self, name: &str, ip: Option<&str>) {
        let _lock = HOSTS_FILE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = self.original.clone();
        if !text.is_empty() && !text.ends_with(b"\n") {
            text.push(b'\n');
        }
        if let Some(ip) = ip {
            text.extend_from_slice(format!("{ip} {name}\n").as_bytes());
        }
        // Written in place: /etc/hosts is often a bind mount that cannot be replaced.
        std::fs::write("/etc/hosts", text).expect(
            "this test edits /etc/hosts (root, as on CI) to give DNS discovery a changing answer",
        );
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        let _lock = HOSTS_FILE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = std::fs::write("/etc/hosts", &self.original);
    }
}

#[test]
fn dns_is_re_resolved_and_the_last_good_answer_kept() {
    // Two backends on one port at two loopback addresses.
    let (a, b) = (0..20)
        .find_map(|_| {
            let a = Backend::http();
            let b = Backend::http_at(&format!("127.0.0.2:{}", a.addr.unwrap().port()))?;
            Some((a, b))
        })
        .expect("a port free on both 127.0.0.1 and 127.0.0.2");
    let port = a.addr.unwrap().port();
    let name = format!("outrigger-it-{}-{port}.test", std::process::id());
    let hosts = HostsEntry::new();
    hosts.set(&name, Some("127.0.0.1"));
    let sc = Sidecar::start(&format!(
        "clusters:\n  svc: {{ dns: \"{name}:{port}\", refresh: 100ms }}\nlisteners:\n  - name: egress\n    address: 127.0.0.1:0\n    direction: outbound\n"
    ));
    sc.wait_ready();
    let get = || {
        client()
            .get(sc.listener_url("egress", "/dns"))
            .header("host", "svc")
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(10), "the first answer", || {
        (get() == 200 && a.count() > 0).then_some(())
    });
    hosts.set(&name, Some("127.0.0.2"));
    eventually(Duration::from_secs(10), "the new answer", || {
        (get() == 200 && b.count() > 0).then_some(())
    });
    // The name disappears: resolution fails, the last good endpoint keeps serving.
    hosts.set(&name, None);
    eventually(Duration::from_secs(10), "a failed resolution", || {
        (sc.metric("outrigger_discovery_updates_total{cluster=\"svc\",outcome=\"failed\"}") >= 1.0)
            .then_some(())
    });
    let before = b.count();
    assert_eq!(get(), 200);
    assert_eq!(b.count(), before + 1);
    assert_eq!(
        sc.metric("outrigger_cluster_endpoints{cluster=\"svc\"}"),
        1.0
    );
}

#[test]
fn failures_answer_502_504_503_with_a_reason() {
    let app = Backend::http();
    let dead = dead_port();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("none.yaml");
    std::fs::write(&empty, "endpoints: []\n").unwrap();
    let empty = empty.display();
    let sc = Sidecar::start(&format!(
        r#"
clusters:
  down: {{ endpoints: ["{dead}"] }}
  slow: {{ endpoints: ["{}"] }}
  empty: {{ file: {empty} }}
listeners:
  - name: egress
    address: 127.0.0.1:0
    direction: outbound
    routes:
      - match: {{ host: slow }}
        cluster: slow
        timeout: 200ms
"#,
        app.address()
    ));
    sc.wait_ready();
    let r = client()
        .get(sc.listener_url("egress", "/"))
        .header("host", "down")
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-outrigger-error"], "connect");
    let r = client()
        .get(sc.listener_url("egress", "/slow/3000"))
        .header("host", "slow")
        .send()
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-outrigger-error"], "timeout");
    let r = client()
        .get(sc.listener_url("egress", "/"))
        .header("host", "empty")
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-outrigger-error"], "no-endpoints");
    let stderr = sc.stderr();
    assert!(
        stderr.contains("request failed")
            && stderr.contains("cluster=down")
            && stderr.contains("route=host:down"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cluster=slow") && stderr.contains("route=0"),
        "{stderr}"
    );
}

#[test]
fn limits_shed_with_503_and_retry_after() {
    let app = Backend::http();
    let sc = inbound(
        &app,
        "    limits:\n      rate_limit: { requests_per_second: 0.01, burst: 2 }\n",
    );
    let codes: Vec<u16> = (0..4)
        .map(|_| {
            client()
                .get(sc.listener_url("public", "/"))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(codes, [200, 200, 503, 503]);
    let r = client().get(sc.listener_url("public", "/")).send().unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["x-outrigger-error"], "overload");
    assert_eq!(app.count(), 2);
    assert_eq!(
        sc.metric("outrigger_shed_requests_total{listener=\"public\",reason=\"rate_limit\"}"),
        3.0
    );

    let app = Backend::http();
    let sc = inbound(&app, "    limits:\n      max_requests_in_flight: 1\n");
    let url = sc.listener_url("public", "/slow/3000");
    let slow = std::thread::spawn(move || client().get(url).send().unwrap().status());
    eventually(
        Duration::from_secs(5),
        "the slow request at the app",
        || (app.count() == 1).then_some(()),
    );
    let r = client().get(sc.listener_url("public", "/")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(slow.join().unwrap(), 200);
    assert_eq!(
        client()
            .get(sc.listener_url("public", "/"))
            .send()
            .unwrap()
            .status(),
        200
    );
}

/// Request heads that must be refused (with the status), whatever path reads them.
fn smuggling_shapes() -> [(&'static str, Vec<u8>, &'static str); 14] {
    [
        ("Content-Length with Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), "400"),
        ("duplicate differing Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(), "400"),
        ("invalid chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(), "400"),
        ("whitespace before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n".to_vec(), "400"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n".to_vec(), "400"),
        ("unknown transfer coding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n".to_vec(), "400"),
        ("chunked not last", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n".to_vec(), "400"),
        ("chunked in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), "400"),
        ("header too large", [b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".as_slice(), &[b'a'; 9000], b"\r\n\r\n"].concat(), "431"),
        ("bare CR in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rX-B: c\r\n\r\n".to_vec(), "400"),
        ("bare CR ending a header line", b"GET / HTTP/1.1\r\nHost: a\rX-B: c\r\n\r\n".to_vec(), "400"),
        ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n".to_vec(), "400"),
        ("header line without a colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A b\r\n\r\n".to_vec(), "400"),
        ("several Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), "400"),
    ]
}

#[test]
fn smuggling_shapes_are_refused_and_never_reach_the_app() {
    let app = Backend::http();
    let sc = inbound(&app, "    limits:\n      max_header_bytes: 8192\n");
    let addr = sc.listeners["public"].clone();
    let cases = smuggling_shapes();
    for (what, bytes, status) in cases {
        let out = raw(&addr, &bytes);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {out}"
        );
    }
    assert_eq!(app.count(), 0, "nothing reached the app: {:?}", app.seen());
    // A well-formed chunked request still works.
    let out = raw(&addr, b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.seen()[0].body, b"abc");
}

/// The HTTP/1.1 upstream pool: sequential requests reuse one upstream connection, whatever
/// their body (none, small, large, HEAD) and whichever client connection they come on; the
/// connection closes once idle for the cluster's `pool_idle_timeout`, and the next request
/// opens a new one.
#[test]
fn upstream_connections_are_reused_then_closed_when_idle() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "clusters:\n  a: {{ endpoints: [\"{}\"], pool_idle_timeout: 1s }}\nlisteners:\n  - name: egress\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: a\n",
        app.address()
    ));
    sc.wait_ready();
    let url = |p: &str| sc.listener_url("egress", p);
    for path in ["/", "/bytes/200000", "/x", "/bytes/10"] {
        let r = client().get(url(path)).send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().unwrap();
    }
    let r = client().head(url("/bytes/5000")).send().unwrap();
    assert_eq!(r.status(), 200);
    let out = raw(
        &sc.listeners["egress"],
        b"GET /raw HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.count(), 6, "{:?}", app.seen());
    assert_eq!(
        app.open_connections(),
        1,
        "one upstream connection for sequential requests\n{}",
        sc.diagnostics()
    );
    eventually(
        Duration::from_secs(10),
        "the idle upstream connection closed",
        || (app.open_connections() == 0).then_some(()),
    );
    let r = client().get(url("/again")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.count(), 7);
}

#[test]
fn slow_headers_are_cut_off() {
    let app = Backend::http();
    let sc = inbound(&app, "    limits:\n      header_read_timeout: 300ms\n");
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the connection was closed by the header timeout"
    );
    assert_eq!(app.count(), 0);
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let app = Backend::http();
    let mut sc = inbound(&app, "");
    let url = sc.listener_url("public", "/slow/700");
    let inflight = std::thread::spawn(move || {
        client().get(url).send().map(|r| {
            let connection = r.headers().get("connection").cloned();
            (r.status().as_u16(), connection)
        })
    });
    eventually(Duration::from_secs(5), "the request at the app", || {
        (app.count() == 1).then_some(())
    });
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, connection) = inflight.join().unwrap().unwrap();
    assert_eq!(status, 200, "{}", sc.diagnostics());
    // The drain began while the upstream was answering: the response tells the client to
    // close, rather than leaving it to race its next request against the close.
    assert_eq!(
        connection.as_ref().map(|v| v.as_bytes()),
        Some(b"close".as_slice()),
        "{}",
        sc.diagnostics()
    );
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
}

#[test]
fn proxy_config_errors_are_located() {
    crate::support::check_finds(
        "bad.yaml",
        "listeners:\n  - name: public\n    address: 127.0.0.1:0\n  - name: public\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: nope\n        retry: { attempts: 1, on: [sometimes] }\n        match: { path_regex: \"([\" }\n",
        &[
            "bad.yaml:2:5: listeners[0].direction: an inbound listener forwards to the app, but app.address is not set",
            "bad.yaml:4:11: listeners[1].name: the name \"public\" is already used by listeners[0]",
            "bad.yaml:8:18: listeners[1].routes[0].cluster: no cluster named \"nope\"",
            "bad.yaml:9:36: listeners[1].routes[0].retry.on[0]: expected connect-failure, timeout, reset, 5xx",
            "bad.yaml:10:30: listeners[1].routes[0].match.path_regex: expected a regular expression",
        ],
    );
}

#[test]
fn a_stalled_request_body_gets_408_and_never_reaches_the_app() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 300ms\n",
        app.address()
    ));
    sc.wait_ready();
    let started = std::time::Instant::now();
    let out = raw(
        &sc.listeners["public"],
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b",
    );
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(app.count(), 0);
}

#[test]
fn hostile_headers_are_neutralised() {
    let app = Backend::http();
    let sc = inbound(&app, "");
    let addr = sc.listeners["public"].clone();
    // h2c offered among other protocols: not an upgrade, and the Upgrade header is dropped.
    let out = raw(&addr, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\nConnection: close\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = app.seen().pop().unwrap();
    assert_eq!(seen.header("upgrade"), None, "{seen:?}");
    // Two Host headers: which one would the app believe?
    let out = raw(
        &addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Absolute-form: the URI's authority is the Host the app sees.
    let out = raw(
        &addr,
        b"GET http://public/abs HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.seen().pop().unwrap().header("host"), Some("public"));
    assert_eq!(app.count(), 2);
}

/// Content-Length with Transfer-Encoding: refused with 400 (hyper alone would apply RFC 9112
/// §6.3 and forward it as chunked), in whichever order the two headers come and also behind
/// another request on the same connection; nothing reaches the app.
#[test]
fn content_length_with_transfer_encoding_is_refused() {
    let app = Backend::http();
    let sc = inbound(&app, "");
    let addr = sc.listeners["public"].clone();
    for head in [
        "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n",
    ] {
        let out = raw(
            &addr,
            format!("{head}3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
                .as_bytes(),
        );
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert_eq!(
            out.matches("HTTP/1.1 ").count(),
            1,
            "then the connection closed: {out}"
        );
    }
    assert_eq!(app.count(), 0, "{:?}", app.seen());
    // Behind a well-formed request on the same connection.
    let out = raw(
        &addr,
        b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcPOST /bad HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(out.contains("HTTP/1.1 400"), "{out}");
    assert!(
        app.seen().iter().all(|s| s.path != "/bad"),
        "{:?}",
        app.seen()
    );
}

#[test]
fn proxy_limits_and_patterns_are_validated() {
    crate::support::check_finds(
        "bad.yaml",
        "app: { address: 127.0.0.1:1 }\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits: { max_connections: 0, idle_timeout: 0s }\n    routes:\n      - match: { host: \"*foo.com\" }\n        request_headers: { add: { content-length: \"0\" } }\n",
        &[
            "listeners[0].limits.max_connections: expected a number from 1 to 1000000, found 0",
            "listeners[0].limits.idle_timeout: expected a positive duration",
            "listeners[0].routes[0].match.host: expected a host or a wildcard like *.example.com",
            "listeners[0].routes[0].request_headers: \"content-length\" frames the message",
        ],
    );
}

/// A client that gives up in the middle of a large (streamed) upload says nothing about the
/// endpoint: no ejection however often it happens.
#[test]
fn aborted_uploads_do_not_eject_endpoints() {
    let (a, b) = (Backend::http(), Backend::http());
    let sc = Sidecar::start(&format!(
        "clusters:\n  svc:\n    endpoints: [\"{}\", \"{}\"]\n    outlier: {{ consecutive_failures: 2 }}\nlisteners:\n  - name: egress\n    address: 127.0.0.1:0\n    direction: outbound\n",
        a.address(),
        b.address()
    ));
    sc.wait_ready();
    let addr = sc.listeners["egress"].clone();
    for _ in 0..6 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000000\r\n\r\n")
            .unwrap();
        s.write_all(&[b'x'; 200_000]).unwrap();
        drop(s); // gone mid-body
    }
    // Each abort is answered (to no one) as the client's fault.
    let aborted = "outrigger_http_responses_total{direction=\"outbound\",listener=\"egress\",route=\"host:svc\",cluster=\"svc\",class=\"4xx\",error=\"bad-request\"}";
    eventually(
        Duration::from_secs(10),
        "six aborted uploads handled",
        || (sc.metric(aborted) == 6.0).then_some(()),
    );
    assert_eq!(
        sc.metric("outrigger_endpoint_ejections_total{cluster=\"svc\"}"),
        0.0,
        "{}",
        sc.diagnostics()
    );
    for _ in 0..4 {
        assert_eq!(
            client()
                .get(sc.listener_url("egress", "/ok"))
                .header("host", "svc")
                .send()
                .unwrap()
                .status(),
            200
        );
    }
    assert!(
        a.seen().iter().any(|s| s.path == "/ok") && b.seen().iter().any(|s| s.path == "/ok"),
        "both endpoints still get traffic"
    );
}

/// An app that answers HTTP/1.0 (Python's http.server does) must not cost the client its
/// keep-alive connection: the client gets HTTP/1.1 responses, several on one connection.
#[test]
fn an_http10_app_keeps_client_connections_alive() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut byte).is_ok() {
                head.push(byte[0]);
            }
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let sc = Sidecar::start(&format!(
        "app:\n  address: {app}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n"
    ));
    sc.wait_ready();
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("ok"), "{text}");
    }
}

#[test]
fn trace_context_is_propagated_with_a_new_parent_and_tied_to_the_request_id() {
    let app = Backend::http();
    let sc = inbound(&app, "telemetry:\n  tracing: { sample: 1.0 }\n");
    let url = sc.listener_url("public", "/traced");
    let c = client();
    // W3C in: same trace, new parent, tracestate kept, sampled flag kept.
    c.get(&url)
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )
        .header("tracestate", "congo=t61rcWkgMzE")
        .header("x-request-id", "mine")
        .send()
        .unwrap();
    // None in: a new valid, sampled trace, and x-request-id is its trace id.
    c.get(&url).send().unwrap();
    // B3 in: W3C (and B3) out with the same trace id.
    c.get(&url)
        .header("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")
        .send()
        .unwrap();
    let seen = app.seen();
    let tp = seen[0].header("traceparent").unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(tp.ends_with("-00"), "{tp}");
    assert_ne!(&tp[36..52], "00f067aa0ba902b7");
    assert_eq!(seen[0].header("tracestate"), Some("congo=t61rcWkgMzE"));
    assert_eq!(seen[0].header("x-request-id"), Some("mine"));

    let tp = seen[1].header("traceparent").unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{tp}");
    assert_eq!(parts[1].len(), 32);
    assert!(
        parts[1]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(seen[1].header("x-request-id"), Some(parts[1]));

    let tp = seen[2].header("traceparent").unwrap();
    assert!(
        tp.starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-"),
        "{tp}"
    );
    let b3 = seen[2].header("b3").unwrap();
    assert!(b3.starts_with("80f198ee56343ba864fe8b2a57d3eff7-"), "{b3}");
    assert!(b3.ends_with("-1-e457b5a2e4d86bd1"), "{b3}");
}

#[test]
fn access_log_lines_match_the_requests() {
    let app = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = Sidecar::start(&format!(
        // No probe: with one, a stop would keep the outbound listener up until the app (which
        // outlives the test) is gone.
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\ntelemetry:\n  access_log: {{ to: {} }}\n",
        app.address(),
        log.display()
    ));
    sc.wait_ready();
    let c = client();
    let body = c
        .get(sc.listener_url("public", "/status/201?secret=1"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-request-id", "req-1")
        .send()
        .unwrap()
        .text()
        .unwrap();
    let r = c
        .get(sc.listener_url("out", "/x"))
        .header("host", "nowhere")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let lines: Vec<serde_json::Value> = eventually(Duration::from_secs(5), "two log lines", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        (lines.len() == 2).then_some(lines)
    });
    let ok = &lines[0];
    assert_eq!(ok["direction"], "inbound");
    assert_eq!(ok["listener"], "public");
    assert_eq!(ok["route"], "default");
    assert_eq!(ok["cluster"], "app");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/status/201", "no query string in the log");
    assert_eq!(ok["status"], 201);
    assert_eq!(ok["bytes_out"], body.len());
    assert_eq!(ok["upstream"], app.address());
    assert_eq!(ok["retries"], 0);
    assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(ok["request_id"], "req-1");
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["error"].is_null());
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let missed = &lines[1];
    assert_eq!(missed["direction"], "outbound");
    assert_eq!(missed["status"], 404);
    assert_eq!(missed["error"], "no-route");
    assert_eq!(missed["authority"], "nowhere");
    assert_eq!(missed["trace_id"].as_str().unwrap().len(), 32);
    assert_eq!(missed["request_id"], missed["trace_id"]);
}

#[test]
fn every_access_log_line_is_written_before_the_sidecar_exits() {
    let app = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  access_log: {{ to: {} }}\n",
        app.address(),
        log.display()
    ));
    sc.wait_ready();
    let c = client();
    for i in 0..50 {
        c.get(sc.listener_url("public", &format!("/n/{i}")))
            .send()
            .unwrap()
            .text()
            .unwrap();
    }
    // Stop at once: lines still queued must be written, not lost with the process.
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sc.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 50, "{text}");
}

fn a_request_cancelled_before_its_response_is_logged_as_client_closed(server: &str) {
    let app = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  access_log: {{ to: {} }}\n",
            app.address(),
            log.display()
        ),
    ));
    sc.wait_ready();
    // An HTTP/2 client that gives up: its stream is reset before the app answers.
    let impatient = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(
        impatient
            .get(sc.listener_url("public", "/slow/1500"))
            .send()
            .is_err()
    );
    let line: serde_json::Value = eventually(Duration::from_secs(5), "the log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .next()
            .map(|l| serde_json::from_str(l).unwrap())
    });
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["error"], "client-closed");
    assert_eq!(line["path"], "/slow/1500");
}

#[test]
fn an_http1_client_that_gives_up_on_the_fast_path_is_logged_as_client_closed() {
    let app = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  access_log: {{ to: {} }}\n",
        app.address(),
        log.display()
    ));
    sc.wait_ready();
    // A keep-alive GET without a body: the fast path's. The client closes before the app
    // answers; the request is not served on to its end (the app's answer would say 200).
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.write_all(b"GET /slow/1500 HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    drop(s);
    let line: serde_json::Value = eventually(Duration::from_secs(5), "the log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .next()
            .map(|l| serde_json::from_str(l).unwrap())
    });
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["error"], "client-closed");
    assert_eq!(line["path"], "/slow/1500");
    assert!(line["route"].is_null(), "{line}");
}

#[test]
fn a_fast_path_response_cut_off_by_a_stalled_client_logs_the_bytes_sent() {
    const LEN: usize = 32 << 20;
    let app = RawApp::start(|_| {
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\n\r\n").into_bytes();
        r.resize(r.len() + LEN, b'x');
        (r, true)
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits: {{ idle_timeout: 1s }}\ntelemetry:\n  access_log: {{ to: {} }}\n",
        app.address,
        log.display()
    ));
    sc.wait_ready();
    // The client reads nothing: the stalled-write watch drops the connection mid-body.
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let line: serde_json::Value = eventually(Duration::from_secs(20), "the log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .next()
            .map(|l| serde_json::from_str(l).unwrap())
    });
    drop(s);
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "client-closed", "{line}");
    let sent = line["bytes_out"].as_u64().unwrap();
    assert!(
        sent > 0 && sent < LEN as u64,
        "the bytes sent so far: {line}"
    );
}

#[test]
fn access_log_names_the_endpoint_and_retries_of_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let dead = dead_port();
    let sc = Sidecar::start(&format!(
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: gone\n        retry: {{ attempts: 2, on: [connect-failure] }}\nclusters:\n  gone:\n    endpoints: [{dead}]\n    outlier: {{ consecutive_failures: 0 }}\ntelemetry:\n  access_log: {{ to: {} }}\n",
        log.display()
    ));
    sc.wait_ready();
    let r = client().get(sc.listener_url("out", "/x")).send().unwrap();
    assert_eq!(r.status(), 502);
    let line: serde_json::Value = eventually(Duration::from_secs(5), "the log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .next()
            .map(|l| serde_json::from_str(l).unwrap())
    });
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["error"], "connect");
    assert_eq!(line["upstream"], dead.to_string());
    assert_eq!(line["retries"], 2);
}

/// A client that asks for a large response and reads none of it held its connection, the
/// upstream one and their buffers forever (the idle timeout only asked it to close): now it is
/// cut after the idle timeout, twice over at most.
#[test]
fn a_client_that_reads_nothing_is_cut_off() {
    let app = Backend::http();
    let sc = inbound(&app, "    limits: { idle_timeout: 1s }\n");
    let open = "outrigger_connections_open{direction=\"inbound\",listener=\"public\"}";
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.write_all(b"GET /bytes/16777216 HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    eventually(Duration::from_secs(5), "the connection open", || {
        (sc.metric(open) >= 1.0).then_some(())
    });
    // Nothing is read from `s` until the sidecar has closed its side.
    eventually(
        Duration::from_secs(15),
        "the non-reading connection cut off",
        || (sc.metric(open) == 0.0).then_some(()),
    );
    assert_eq!(
        sc.metric("outrigger_client_stalls_total{direction=\"inbound\",listener=\"public\"}"),
        1.0
    );
    drop(s);
    // Other clients are served as usual.
    let r = client()
        .get(sc.listener_url("public", "/x"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// An HTTP/2 client that opens streams with a zero window and never sends WINDOW_UPDATE reads
/// nothing, yet its socket stays writable: each stream held an upstream connection forever
/// (40 connections × 200 streams held 8,064 descriptors). Now each such stream is reset after
/// the idle timeout and its upstream connection released; other clients are served as usual.
/// A connection may open at most 100 streams at once.
fn http2_streams_whose_client_reads_nothing_are_reset(server: &str) {
    const STREAMS: usize = 5;
    let app = Backend::http();
    let sc = inbound_on(server, &app, "    limits: { idle_timeout: 1s }\n");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = sc.listeners["public"].clone();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut client, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            // Until the server's SETTINGS say otherwise (h2's own default is 100).
            .initial_max_send_streams(1000)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut bodies = Vec::new();
        for _ in 0..STREAMS {
            client = client.ready().await.unwrap();
            let req = http::Request::get("http://a/bytes/1048576")
                .body(())
                .unwrap();
            let (res, _) = client.send_request(req, true).unwrap();
            // Headers are not flow-controlled: the answer arrives, its body cannot.
            let res = res.await.unwrap();
            assert_eq!(res.status(), 200);
            bodies.push(res.into_body());
        }
        assert_eq!(
            app.open_connections(),
            STREAMS,
            "one upstream connection per stream"
        );
        // And a connection may open at most 100 at once (hyper's default was 200).
        assert_eq!(client.current_max_send_streams(), 100);
        for mut body in bodies {
            // No byte of data: the window stays shut. The stream ends in a reset (the
            // deadline only turns a hang into a failure).
            let end = tokio::time::timeout(Duration::from_secs(20), body.data())
                .await
                .expect("the stream was never reset");
            let err = match end {
                Some(Err(e)) => e,
                other => panic!("expected a reset, got {other:?}"),
            };
            assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}");
        }
    });
    eventually(
        Duration::from_secs(10),
        "the upstream connections released",
        || (app.open_connections() <= 1).then_some(()),
    );
    assert_eq!(
        sc.metric(
            "outrigger_client_stream_stalls_total{direction=\"inbound\",listener=\"public\"}"
        ),
        STREAMS as f64
    );
    // A client that reads is served in full.
    let h2c = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2c
        .get(sc.listener_url("public", "/bytes/1048576"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), 1048576);
}

/// The HTTP/2 watch cuts a client that reads nothing, not a body whose upstream is quiet for
/// longer than the idle timeout.
fn an_http2_body_waiting_on_a_quiet_upstream_outlives_the_idle_timeout(server: &str) {
    let app = Backend::http();
    let sc = inbound_on(server, &app, "    limits: { idle_timeout: 1s }\n");
    let h2c = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2c
        .get(sc.listener_url("public", "/drip/3500"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "ab");
    assert_eq!(
        sc.metric(
            "outrigger_client_stream_stalls_total{direction=\"inbound\",listener=\"public\"}"
        ),
        0.0
    );
}

/// A connection that never sends a byte held its slot until the idle timeout (hyper's header
/// timer starts at the first byte): it now gets `header_read_timeout`.
#[test]
fn a_silent_connection_gets_the_header_read_timeout_not_the_idle_timeout() {
    let app = Backend::http();
    let sc = inbound(
        &app,
        "    limits: { header_read_timeout: 1s, idle_timeout: 1h }\n",
    );
    let open = "outrigger_connections_open{direction=\"inbound\",listener=\"public\"}";
    let s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    eventually(Duration::from_secs(5), "the connection open", || {
        (sc.metric(open) >= 1.0).then_some(())
    });
    eventually(
        Duration::from_secs(10),
        "the silent connection closed",
        || (sc.metric(open) == 0.0).then_some(()),
    );
    assert_eq!(
        sc.metric(
            "outrigger_client_silent_closes_total{direction=\"inbound\",listener=\"public\"}"
        ),
        1.0
    );
    drop(s);
}

/// Cutting off clients that read nothing must not cut a quiet request that waits for its
/// upstream longer than the idle timeout (nothing is being written to its client).
#[test]
fn a_request_waiting_on_a_slow_upstream_outlives_the_idle_timeout() {
    let app = Backend::http();
    let sc = inbound(
        &app,
        "    limits: { idle_timeout: 1s }\n    routes:\n      - cluster: app\n        timeout: 30s\n",
    );
    let r = client()
        .get(sc.listener_url("public", "/slow/3500"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "slow done\n");
}

/// An upstream that records each request head as it came (header names in their case: hyper
/// would have lowercased them) and answers each with what `answer` gives for the head; with
/// `close`, it closes the connection after answering.
struct RawApp {
    address: String,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RawApp {
    fn start(answer: fn(&str) -> (Vec<u8>, bool)) -> RawApp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                            buf.drain(..end + 4);
                            seen.lock().unwrap().push(head.clone());
                            let (bytes, close) = answer(&head);
                            if write_paced(&mut conn, &bytes).is_err() || close {
                                return;
                            }
                        }
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        RawApp {
            address,
            heads,
            accepted,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Writes `bytes`, pausing 300 ms at each `<pause>` and 5 s at each `<stall>` (an upstream
/// that sends its head and then its body later).
fn write_paced(conn: &mut TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    loop {
        let next = [(&b"<pause>"[..], 300), (&b"<stall>"[..], 5000)]
            .into_iter()
            .filter_map(|(m, ms)| Some((bytes.windows(m.len()).position(|w| w == m)?, m, ms)))
            .min_by_key(|(at, _, _)| *at);
        let Some((at, marker, ms)) = next else {
            return conn.write_all(bytes);
        };
        conn.write_all(&bytes[..at])?;
        conn.flush()?;
        std::thread::sleep(Duration::from_millis(ms));
        bytes = &bytes[at + marker.len()..];
    }
}

fn inbound_to(app: &RawApp) -> Sidecar {
    inbound_to_on("hyper", app)
}

/// [`inbound_to`], whose listener serves HTTP/2 with `server` (`http2_server`).
fn inbound_to_on(server: &str, app: &RawApp) -> Sidecar {
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits:\n      max_header_bytes: 8192\n",
            app.address
        ),
    ));
    sc.wait_ready();
    sc
}

/// Reads one response whose body ends with `end`.
fn read_until(s: &mut TcpStream, end: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).ends_with(end) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every refused framing shape arrives on a connection the HTTP/1 fast path is serving (a
/// first request went through it: the upstream saw its header names in the client's case,
/// which hyper would have lowercased), and is refused there as on hyper's path: the fast path
/// hands the bytes to hyper, which refuses them. Nothing of them reaches the upstream.
#[test]
fn refused_shapes_meet_the_fast_path_first_and_are_refused() {
    let app = RawApp::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
        )
    });
    let sc = inbound_to(&app);
    let addr = sc.listeners["public"].clone();
    let cases = smuggling_shapes();
    for (what, bytes, status) in &cases {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /fast HTTP/1.1\r\nHost: a\r\nX-Case-Probe: 1\r\n\r\n")
            .unwrap();
        let first = read_until(&mut s, "ok");
        assert!(first.starts_with("HTTP/1.1 200"), "{what}: {first}");
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {out}"
        );
    }
    let heads = app.heads();
    assert_eq!(
        heads.len(),
        cases.len(),
        "only the first requests: {heads:?}"
    );
    for h in &heads {
        assert!(
            h.starts_with("GET /fast HTTP/1.1\r\n") && h.contains("\r\nX-Case-Probe: 1\r\n"),
            "forwarded by the fast path (names as sent): {h}"
        );
    }
}

/// The path of a request head (`/` when it has none).
fn request_path(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("/")
}

/// A [`RawApp`] answer that keeps the connection.
fn ok(response: &str) -> (Vec<u8>, bool) {
    (response.as_bytes().to_vec(), false)
}

/// A [`RawApp`] answer after which the connection is closed.
fn closing(response: &str) -> (Vec<u8>, bool) {
    (response.as_bytes().to_vec(), true)
}

/// The response framings both framing tests serve, by path: chunked with trailers, a body up
/// to the close, more than 100 headers, both Content-Length and chunked (broken), else a
/// plain `ok`.
fn framing(path: &str) -> (Vec<u8>, bool) {
    match path {
        "/chunked" => ok(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
        ),
        "/close" => closing("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"),
        "/many" => {
            let mut r = String::from("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n");
            for i in 0..150 {
                r.push_str(&format!("x-h{i}: {i}\r\n"));
            }
            r.push_str("\r\nmany");
            ok(&r)
        }
        "/both" => closing(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        _ => ok("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    }
}

/// Response shapes the fast path streams itself: chunked with trailers (passed on as they
/// came), a body up to the upstream's close (sent on chunked, the client connection kept), a
/// 1xx before the answer (skipped), more than 100 headers (hyper's client gave 502), and
/// broken ones (502). Each response is checked on one keep-alive client connection.
#[test]
fn response_framings_pass_through_the_fast_path() {
    let app = RawApp::start(|head| match request_path(head) {
        "/continue" => ok(
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate",
        ),
        "/bad-chunk" => closing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        path => framing(path),
    });
    let sc = inbound_to(&app);
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut get = |path: &str, end: &str| {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .unwrap();
        read_until(&mut s, end)
    };
    let out = get("/chunked", "0\r\nx-sum: 11\r\n\r\n");
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n")
            && out.contains("5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n"),
        "{out}"
    );
    let out = get("/close", "0\r\n\r\n");
    assert!(
        out.contains("transfer-encoding: chunked\r\n")
            && out.ends_with("d\r\nuntil the end\r\n0\r\n\r\n")
            && !out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    let out = get("/continue", "late");
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && !out.contains("103"),
        "{out}"
    );
    let out = get("/many", "many");
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("x-h149: 149\r\n"),
        "{out}"
    );
    // The same connection still serves after all of these.
    let out = get("/plain", "ok");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = raw(
        &sc.listeners["public"],
        b"GET /both HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.starts_with("HTTP/1.1 502") && out.contains("x-outrigger-error: upstream-reset"),
        "{out}"
    );
    // A broken chunked body: the client's connection is cut before a complete response (the
    // bytes before the broken chunk line may have gone, never a final chunk).
    let out = raw(
        &sc.listeners["public"],
        b"GET /bad-chunk HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(!out.contains("0\r\n\r\n") && !out.contains("zz"), "{out}");
}

/// Responses without a body (HEAD, 204, 304: their Content-Length is not followed by bytes)
/// leave the keep-alive connection usable, and a status below 100 (which httparse reads but
/// `http::StatusCode` refuses) is a 502 on the fast path as on hyper's.
#[test]
fn bodiless_responses_and_invalid_statuses_on_the_fast_path() {
    let app = RawApp::start(|head| match request_path(head) {
        "/no-content" => ok("HTTP/1.1 204 No Content\r\n\r\n"),
        "/not-modified" => ok("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        "/low" => closing("HTTP/1.1 042 Odd\r\nContent-Length: 0\r\n\r\n"),
        // A head, then the connection closes before any of the promised body.
        "/cut" => closing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        // HEAD: the length of the body a GET would have had, and no body.
        _ => ok("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
    });
    let sc = inbound_to(&app);
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (method, path, status) in [
        ("HEAD", "/head", "200"),
        ("GET", "/no-content", "204"),
        ("GET", "/not-modified", "304"),
        ("HEAD", "/head", "200"),
    ] {
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .unwrap();
        let out = read_until(&mut s, "\r\n\r\n");
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {out}"
        );
    }
    // Nothing more was sent: the next bytes are the next response's.
    s.write_all(b"HEAD /again HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let out = read_until(&mut s, "\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = raw(
        &sc.listeners["public"],
        b"GET /low HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    // Nothing of the body had come: the client gets a 502, not a head and a cut body.
    let out = raw(
        &sc.listeners["public"],
        b"GET /cut HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.starts_with("HTTP/1.1 502") && out.contains("x-outrigger-error: upstream-reset"),
        "{out}"
    );
    assert!(
        app.heads().iter().all(|h| !h.contains("host: a")),
        "served by the fast path (Host in the client's case)"
    );
}

/// Waiting for the first body byte before the head goes out never waits for a body that
/// is not coming (HEAD with a Content-Length, 204, 304, `Content-Length: 0`, a 1xx before the
/// final head), on the fast path and on the raw exchange (h2c); a body that follows its head
/// after a pause (a long poll) still arrives; one that does not come within the route's
/// timeout is a 504, not a hang.
fn the_first_body_byte_wait_skips_bodiless_responses_and_keeps_the_route_timeout(server: &str) {
    let app = RawApp::start(|head| match request_path(head) {
        "/empty" => ok("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        "/no-content" => ok("HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
        "/not-modified" => ok("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        "/continue" => ok(
            "HTTP/1.1 100 Continue\r\n\r\n<pause>HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n<pause>late",
        ),
        "/slow" => ok("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n<pause>0123456789"),
        "/stall" => closing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n<stall>0123456789"),
        // HEAD: the length of the body a GET would have had, and no body.
        _ => ok("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
    });
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 2s\n",
            app.address
        ),
    ));
    sc.wait_ready();
    // The fast path: one keep-alive connection.
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (method, path, status, end) in [
        ("HEAD", "/head", "200", "\r\n\r\n"),
        ("GET", "/empty", "200", "\r\n\r\n"),
        ("GET", "/no-content", "204", "\r\n\r\n"),
        ("GET", "/not-modified", "304", "\r\n\r\n"),
        ("GET", "/continue", "200", "late"),
        ("GET", "/slow", "200", "0123456789"),
        ("HEAD", "/head", "200", "\r\n\r\n"),
    ] {
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .unwrap();
        let out = read_until(&mut s, end);
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")) && out.ends_with(end),
            "{path}: {out}"
        );
    }
    let out = raw(
        &sc.listeners["public"],
        b"GET /stall HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(
        app.heads().iter().all(|h| !h.contains("host: a")),
        "served by the fast path (Host in the client's case)"
    );
    // The raw exchange (h2c).
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let send = |method: reqwest::Method, path: &str| {
        let r = h2
            .request(method, sc.listener_url("public", path))
            .send()
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    assert_eq!(send(reqwest::Method::HEAD, "/head"), (200, String::new()));
    assert_eq!(send(reqwest::Method::GET, "/empty"), (200, String::new()));
    assert_eq!(send(reqwest::Method::GET, "/no-content").0, 204);
    assert_eq!(send(reqwest::Method::GET, "/not-modified").0, 304);
    assert_eq!(
        send(reqwest::Method::GET, "/continue"),
        (200, "late".into())
    );
    assert_eq!(
        send(reqwest::Method::GET, "/slow"),
        (200, "0123456789".into())
    );
    assert_eq!(send(reqwest::Method::HEAD, "/head").0, 200);
    assert_eq!(send(reqwest::Method::GET, "/stall").0, 504);
}

/// The raw exchange's connection goes back to the pool once a body has ended cleanly: several
/// h2c requests use one upstream connection; bytes after a body's end (garbage) cost that
/// connection, and the next request opens another.
fn raw_exchange_reuses_a_clean_connection_and_drops_one_with_trailing_bytes(server: &str) {
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let get = |sc: &Sidecar, path: &str| {
        let r = h2.get(sc.listener_url("public", path)).send().unwrap();
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    // The app's probe runs a command: no probe connection joins the count.
    let unprobed = |app: &RawApp| {
        let sc = Sidecar::start(&with_http2_server(
            server,
            &format!(
                "app:\n  address: {}\n  probe: {{ exec: [\"true\"] }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n",
                app.address
            ),
        ));
        sc.wait_ready();
        sc
    };
    let app = RawApp::start(|_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
        )
    });
    let sc = unprobed(&app);
    for _ in 0..4 {
        assert_eq!(get(&sc, "/"), (200, "ok".into()));
    }
    assert_eq!(app.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let app = RawApp::start(|head| {
        if head.starts_with("GET /garbage ") {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE".to_vec(),
                false,
            )
        } else {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                false,
            )
        }
    });
    let sc = unprobed(&app);
    assert_eq!(get(&sc, "/garbage"), (200, "ok".into()));
    assert_eq!(get(&sc, "/plain"), (200, "ok".into()));
    assert_eq!(app.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Requests hyper's server decoded (h2c, and an HTTP/1 request with a body, which the fast
/// path leaves to hyper) go upstream on the raw HTTP/1.1 exchange: the same response shapes
/// as above come back decoded (a chunked body and its trailers, a body up to the close, a 1xx
/// skipped, more than 100 headers, which hyper's client answered with 502), the broken ones
/// are 502, and a request body goes with its length.
fn h2c_and_hyper_path_requests_take_the_raw_exchange(server: &str) {
    let app = RawApp::start(|head| match request_path(head) {
        "/continue" => {
            ok("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        }
        // The body follows the head on this connection: closed after the answer.
        "/post" => closing("HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ntook"),
        "/low" => closing("HTTP/1.1 042 Odd\r\nContent-Length: 0\r\n\r\n"),
        "/cut" => closing("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        // Part of the body with the head (copied with it), the rest read after. Nothing the
        // client sees tells whether the head and "0123" came in one read (they are one write
        // on loopback, one segment: one read in practice), so this step can pass without
        // taking that path; `raw_exchange::tests::a_bodys_first_bytes_are_copied_with_the_head…`
        // is what checks the copy and the length left.
        "/split" => ok("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123<pause>456789"),
        // Only Outrigger says why it answered: an upstream's claim (twice) is removed.
        "/forged" => ok(
            "HTTP/1.1 200 OK\r\nX-Outrigger-Error: forged\r\nx-kept: 1\r\nx-outrigger-error: again\r\nContent-Length: 2\r\n\r\nok",
        ),
        path => framing(path),
    });
    let sc = inbound_to_on(server, &app);
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let get = |path: &str| {
        let r = h2.get(sc.listener_url("public", path)).send().unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        let status = r.status().as_u16();
        let many = r.headers().get("x-h149").is_some();
        (status, many, r.text().unwrap_or_default())
    };
    assert_eq!(get("/chunked"), (200, false, "hello world".into()));
    assert_eq!(get("/close"), (200, false, "until the end".into()));
    assert_eq!(get("/continue"), (200, false, "late".into()));
    assert_eq!(get("/many"), (200, true, "many".into()));
    assert_eq!(get("/plain"), (200, false, "ok".into()));
    assert_eq!(get("/split"), (200, false, "0123456789".into()));
    let r = h2.get(sc.listener_url("public", "/forged")).send().unwrap();
    assert_eq!(
        r.headers().get("x-kept").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(r.headers().get("x-outrigger-error").is_none(), "{r:?}");
    assert_eq!(r.text().unwrap(), "ok");
    assert_eq!(get("/plain"), (200, false, "ok".into()));
    assert_eq!(get("/both").0, 502);
    assert_eq!(get("/low").0, 502);
    // Nothing of the promised body came: a 502, not a head and a cut body.
    assert_eq!(get("/cut").0, 502);
    let r = h2
        .post(sc.listener_url("public", "/post"))
        .body("hello")
        .send()
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().unwrap()),
        (201, "took".into())
    );
    // HTTP/1 with a body the fast path leaves (chunked): hyper's server reads it ahead, then
    // the raw exchange sends it with its length.
    let out = raw(
        &sc.listeners["public"],
        b"POST /post HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(
        out.starts_with("HTTP/1.1 201") && out.ends_with("took"),
        "{out}"
    );
    let heads = app.heads();
    let posts: Vec<_> = heads
        .iter()
        .filter(|h| h.starts_with("POST /post HTTP/1.1\r\n"))
        .collect();
    assert_eq!(posts.len(), 2, "{heads:?}");
    for h in posts {
        assert!(
            h.contains("\r\ncontent-length: 5\r\n"),
            "written from the header map: {h}"
        );
    }
}

/// A listener whose connections take little at a time (a 536-byte MSS and a small receive
/// buffer): a sender whose peer reads nothing gets a few tens of KiB into its socket, and its
/// writes wait (on loopback a 64 KiB write would otherwise fit in the socket buffers whole).
fn narrow_listener() -> std::net::TcpListener {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &4096).unwrap();
    setsockopt(&fd, sockopt::TcpMaxSeg, &536).unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    listen(&fd, Backlog::new(16).unwrap()).unwrap();
    std::net::TcpListener::from(fd)
}

/// Bytes on `conn`'s connection that its peer has handed to the kernel and `conn` has not
/// read: `conn`'s receive queue and the peer's send queue, from /proc/net/tcp (loopback, IPv4).
fn unread_in_kernel(conn: &TcpStream) -> usize {
    let here = conn.local_addr().unwrap().port();
    let there = conn.peer_addr().unwrap().port();
    let hex = |s: &str| usize::from_str_radix(s, 16).unwrap();
    let port = |a: &str| hex(a.rsplit(':').next().unwrap()) as u16;
    let mut total = 0;
    for line in std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (tx, rx) = f[4].split_once(':').unwrap();
        if port(f[1]) == here && port(f[2]) == there {
            total += hex(rx);
        }
        if port(f[1]) == there && port(f[2]) == here {
            total += hex(tx);
        }
    }
    total
}

/// Reads from `conn` into `buf` until `buf` holds `pat`: where `pat` ends (None at a close).
fn read_through(conn: &mut TcpStream, buf: &mut Vec<u8>, pat: &[u8]) -> Option<usize> {
    let mut chunk = [0u8; 512];
    loop {
        if let Some(at) = buf.windows(pat.len()).position(|w| w == pat) {
            return Some(at + pat.len());
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What the early-answer upstream saw: connections accepted; each request's line and the
/// connection it came on (numbered from 0 as accepted); for each early answer the request
/// bytes the sidecar had handed to its kernel when the answer went (at most: see
/// [`unread_in_kernel`]; unacknowledged bytes count twice).
#[derive(Default)]
struct EarlySeen {
    accepts: std::sync::atomic::AtomicUsize,
    requests: std::sync::Mutex<Vec<(String, usize)>>,
    in_kernel: std::sync::Mutex<Vec<usize>>,
}

/// The header that makes the early-answer requests large: with it a request (~100 KiB)
/// does not fit in the sockets' buffers towards a [`narrow_listener`] (~90 KiB at most once
/// the sender's buffer has grown), and the sidecar's write waits.
const PAD: usize = 40 * 1024;

/// An upstream on a [`narrow_listener`] that answers requests as they come on each
/// connection (keep-alive). `POST /early-close`: a `413` + `Connection: close` as soon as the
/// request line came, the rest unread. `POST /early-keep`: a `401` head as soon as the
/// request line came, then it reads the request whole, sends the 401's body and keeps the
/// connection (an exchange that pooled it would send the next request on it). Anything
/// else: `200 ok`.
fn early_answer_upstream() -> (String, std::sync::Arc<EarlySeen>) {
    use std::sync::atomic::Ordering;
    let listener = narrow_listener();
    let address = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(EarlySeen::default());
    let out = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let id = seen.accepts.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while let Some(line) = read_through(&mut conn, &mut buf, b"\r\n") {
                    let line = String::from_utf8_lossy(&buf[..line - 2]).into_owned();
                    seen.requests.lock().unwrap().push((line, id));
                    let early = buf.starts_with(b"POST /early-");
                    if early {
                        let in_kernel = buf.len() + unread_in_kernel(&conn);
                        seen.in_kernel.lock().unwrap().push(in_kernel);
                    }
                    if buf.starts_with(b"POST /early-reset ") {
                        // Closed with the request unread, no answer: a reset.
                        return;
                    }
                    if buf.starts_with(b"POST /early-extra ") {
                        // A whole keep-alive answer with bytes past its end, then a reset.
                        let _ = conn.write_all(
                            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\ndeniedXYZ",
                        );
                        return;
                    }
                    if buf.starts_with(b"POST /early-close ") {
                        // Closed with the request unread: the sidecar's write fails (a reset).
                        let _ = conn.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo much");
                        return;
                    }
                    if early {
                        let _ = conn
                            .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\n");
                    }
                    let Some(head) = read_through(&mut conn, &mut buf, b"\r\n\r\n") else {
                        return;
                    };
                    let len: usize = String::from_utf8_lossy(&buf[..head])
                        .to_ascii_lowercase()
                        .split("content-length: ")
                        .nth(1)
                        .and_then(|v| v.split("\r\n").next())
                        .map_or(0, |v| v.parse().unwrap());
                    buf.drain(..head);
                    let mut chunk = [0u8; 4096];
                    while buf.len() < len {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..len);
                    let answer: &[u8] = if early {
                        // The whole request is out before the response's end.
                        std::thread::sleep(Duration::from_millis(50));
                        b"denied"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if conn.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (address, out)
}

/// Asserts that each early answer came while the sidecar still had bytes of the request
/// to write (else the early-answer tests would pass without the handling they test).
fn assert_the_writes_waited(seen: &EarlySeen, answers: usize) {
    let in_kernel = seen.in_kernel.lock().unwrap();
    assert_eq!(in_kernel.len(), answers);
    assert!(
        in_kernel.iter().all(|n| *n < PAD + 60 * 1024),
        "the sidecar's write did not wait: {in_kernel:?} of more than {} request bytes",
        PAD + 60 * 1024
    );
}

/// An upstream that answers a POST after its head, without reading the body, and closes is
/// heard: the client gets its 413 (not a 502 for the write that could not finish), over h2c
/// and over HTTP/1.1 through hyper's path (a chunked body: the fast path leaves it to hyper),
/// both on the raw exchange; the next request works. Each POST (a 40 KiB header, a 60 KiB
/// body) goes on a new connection, whose socket buffers take ~50–90 KiB of it before the
/// upstream's answer (checked: the test says when the write did not wait).
fn an_upstream_that_answers_before_reading_the_body_is_heard(server: &str) {
    let (address, seen) = early_answer_upstream();
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {address}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 5s\n"
        ),
    ));
    sc.wait_ready();
    let body = vec![b'x'; 60 * 1024];
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let post = |path: &str| {
        let r = h2
            .post(sc.listener_url("public", path))
            .header("x-pad", "p".repeat(PAD))
            .body(body.clone())
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    let get = || {
        let r = h2.get(sc.listener_url("public", "/next")).send().unwrap();
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    assert_eq!(
        post("/early-close"),
        (413, "too much".into()),
        "{}",
        sc.diagnostics()
    );
    assert_eq!(get(), (200, "ok".into()));
    // HTTP/1.1, the body chunked: hyper's server reads it, the raw exchange sends it.
    let mut req = format!(
        "POST /early-close HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        "p".repeat(PAD),
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&req).unwrap();
    let out = read_until(&mut s, "too much");
    assert!(
        out.starts_with("HTTP/1.1 413") && out.ends_with("too much"),
        "{out}\n{}",
        sc.diagnostics()
    );
    let out = raw(
        &sc.listeners["public"],
        b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("ok"),
        "{out}"
    );
    assert_eq!(get(), (200, "ok".into()));
    assert_the_writes_waited(&seen, 2);
}

/// An upstream that answers before the request's end and keeps the connection (a 401, then
/// it reads the request as it comes): the connection is not pooled, as the upstream may have taken the
/// body's bytes for its next request; the next request goes on a new connection and gets
/// its own answer.
fn an_early_answer_leaves_its_connection_out_of_the_pool(server: &str) {
    let (address, seen) = early_answer_upstream();
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {address}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 5s\n"
        ),
    ));
    sc.wait_ready();
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(sc.listener_url("public", "/early-keep"))
        .header("x-pad", "p".repeat(PAD))
        .body(vec![b'x'; 60 * 1024])
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "{}", sc.diagnostics());
    assert_eq!(r.text().unwrap(), "denied");
    assert_the_writes_waited(&seen, 1);
    let r = h2.get(sc.listener_url("public", "/next")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "ok");
    let requests = seen.requests.lock().unwrap().clone();
    let on = |line: &str| {
        requests
            .iter()
            .find(|(l, _)| l == line)
            .map(|(_, id)| *id)
            .unwrap_or_else(|| panic!("no {line}: {requests:?}"))
    };
    assert_ne!(
        on("POST /early-keep HTTP/1.1"),
        on("GET /next HTTP/1.1"),
        "the next request went on the connection of the early answer: {requests:?}"
    );
}

/// A body over the raw exchange's 64 KiB streams through hyper's client (`Pool::send`), whose
/// body write fails once the upstream has answered early (`413` + close) and reset the
/// connection: the response read first is what the client gets (the connection's I/O waits
/// for the read side when a write fails, `pool::EarlyAnswer`), here for a 4 MiB h2c POST.
/// HTTP/1.1 clients: [`an_early_answer_to_a_large_http1_body_is_heard`].
fn an_early_answer_to_a_large_body_is_heard(server: &str) {
    let (address, _seen) = early_answer_upstream();
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {address}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 5s\n"
        ),
    ));
    sc.wait_ready();
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = h2
        .post(sc.listener_url("public", "/early-close"))
        .body(vec![b'x'; 4 << 20])
        .send();
    let r = r.unwrap_or_else(|e| panic!("{e}\n{}", sc.diagnostics()));
    assert_eq!(r.status(), 413);
    assert_eq!(r.text().unwrap(), "too much");
    // Without a length (a streamed body): the same.
    let (status, _, body) = h2_post_unsized(&sc.listeners["public"], "/early-close", 4 << 20);
    assert_eq!(
        (status, body.as_str()),
        (413, "too much"),
        "{}",
        sc.diagnostics()
    );
    let r = h2.get(sc.listener_url("public", "/next")).send().unwrap();
    assert_eq!((r.status().as_u16(), r.text().unwrap()), (200, "ok".into()));
}

/// Through hyper's client (a 4 MiB body): an upstream that sends a whole keep-alive answer
/// with bytes past its end and then resets gives the client that answer, and its connection
/// is not pooled (hyper leaves the extra bytes unread and would keep the connection waiting:
/// the next request would wait for the route's timeout); an upstream that resets without an
/// answer gives a 502 (the wait for an answer is bounded), not the route's 504.
fn an_early_answer_with_bytes_past_it_or_a_reset_without_one_ends_the_connection(server: &str) {
    let (address, _seen) = early_answer_upstream();
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {address}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 60s\n"
        ),
    ));
    sc.wait_ready();
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let post = |path: &str| {
        let r = h2
            .post(sc.listener_url("public", path))
            .body(vec![b'x'; 4 << 20])
            .send()
            .unwrap_or_else(|e| panic!("{e}\n{}", sc.diagnostics()));
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    let get = || {
        let r = h2
            .get(sc.listener_url("public", "/next"))
            .send()
            .unwrap_or_else(|e| panic!("{e}\n{}", sc.diagnostics()));
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    assert_eq!(post("/early-extra"), (401, "denied".into()));
    assert_eq!(get(), (200, "ok".into()), "{}", sc.diagnostics());
    assert_eq!(post("/early-reset").0, 502, "{}", sc.diagnostics());
    assert_eq!(get(), (200, "ok".into()));
}

/// A request the HTTP/1 fast path serves and the same request through hyper's path (a
/// listener with a rate limit, which the fast path leaves to hyper) give the same access log
/// line, field for field, for each way a request ends: a response of known length, a chunked
/// one, a HEAD with `Content-Length: 0`, a body the upstream cuts off, a connect failure and a
/// POST with a body.
#[test]
fn fast_path_and_hyper_path_write_the_same_access_log_lines() {
    let app = RawApp::start(|head| {
        let path = head.split([' ', '?']).nth(1).unwrap_or("/");
        let bytes: &[u8] = match path {
            "/ok" if head.starts_with("HEAD") => b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\n",
            "/ok" => b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello",
            "/chunked" => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            }
            // The body came in the head's segment (this app reads no bodies): the connection
            // closes with it.
            "/post" => b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        };
        (bytes.to_vec(), path == "/cut" || path == "/post")
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let dead = dead_port();
    let routes = "    routes:\n      - match: { path_prefix: /dead }\n        cluster: gone\n      - cluster: app\n";
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: fast\n    address: 127.0.0.1:0\n{routes}  - name: hyper\n    address: 127.0.0.1:0\n    limits: {{ rate_limit: {{ requests_per_second: 100000, burst: 100000 }} }}\n{routes}clusters:\n  gone:\n    endpoints: [{dead}]\ntelemetry:\n  access_log: {{ to: {} }}\n",
        app.address,
        log.display()
    ));
    sc.wait_ready();
    let requests: [&[u8]; 6] = [
        b"GET /ok?q=1 HTTP/1.1\r\nHost: a\r\nx-request-id: rid\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n",
        b"GET /chunked HTTP/1.1\r\nHost: a:80\r\nConnection: close\r\n\r\n",
        b"HEAD /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"GET /cut HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"DELETE /dead/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    ];
    for listener in ["fast", "hyper"] {
        for r in requests {
            raw(&sc.listeners[listener], r);
        }
    }
    let lines: Vec<serde_json::Value> = eventually(Duration::from_secs(5), "12 log lines", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        (lines.len() == 12).then_some(lines)
    });
    let heads = app.heads();
    assert!(
        heads[..5].iter().all(|h| h.contains("\r\nHost: a")),
        "the first listener's requests took the fast path (Host in the client's case): {heads:?}"
    );
    assert!(
        heads[5..].iter().all(|h| h.contains("\r\nhost: a")),
        "the second listener's took hyper's: {heads:?}"
    );
    // What differs by nature: the time, the duration, the listener, this hop's span id and,
    // for a request without trace context, the trace (and so the request id).
    let same = |v: &serde_json::Value| {
        let mut v = v.clone();
        let o = v.as_object_mut().unwrap();
        assert_eq!(o["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(o["span_id"].as_str().unwrap().len(), 16);
        if o["request_id"] != "rid" {
            assert_eq!(o["request_id"], o["trace_id"]);
            o.remove("trace_id");
            o.remove("request_id");
        }
        assert!(o["duration_ms"].as_f64().unwrap() > 0.0);
        for k in ["time", "duration_ms", "listener", "span_id"] {
            o.remove(k);
        }
        v
    };
    for (fast, slow) in lines[..6].iter().zip(&lines[6..]) {
        assert_eq!(fast["listener"], "fast");
        assert_eq!(slow["listener"], "hyper");
        assert_eq!(same(fast), same(slow), "fast path: {fast}\nhyper: {slow}");
    }
    let f = |i: usize, k: &str| lines[i][k].clone();
    assert_eq!(
        (f(0, "status"), f(0, "bytes_out"), f(0, "path")),
        (201.into(), 5.into(), "/ok".into())
    );
    assert_eq!(f(0, "trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        (f(1, "bytes_out"), f(1, "authority")),
        (11.into(), "a:80".into())
    );
    assert_eq!((f(2, "bytes_in"), f(2, "bytes_out")), (0.into(), 0.into()));
    assert_eq!(
        (f(3, "status"), f(3, "error"), f(3, "bytes_out")),
        (200.into(), "upstream-reset".into(), 3.into())
    );
    assert_eq!(
        (f(4, "status"), f(4, "error"), f(4, "upstream")),
        (502.into(), "connect".into(), dead.to_string().into())
    );
    assert_eq!(
        (f(5, "status"), f(5, "bytes_in"), f(5, "bytes_out")),
        (201.into(), 5.into(), 2.into())
    );
}

/// A client that writes `request` on a thread of its own (its write fails once the sidecar
/// closes) while this one reads the response whose body ends with `end` (10 s at most).
fn send_while_reading(addr: &str, request: Vec<u8>, end: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&request);
    });
    let out = read_until(&mut s, end);
    // The writer's socket goes with it: a write still waiting fails at once.
    let _ = s.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    out
}

/// An HTTP/1.1 request with a chunked body of `size` bytes in chunks of `chunk` bytes.
fn chunked_request(path: &str, size: usize, chunk: usize) -> Vec<u8> {
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        .into_bytes();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk);
        req.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        req.extend(std::iter::repeat_n(b'x', n));
        req.extend_from_slice(b"\r\n");
        left -= n;
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// As [`an_early_answer_to_a_large_body_is_heard`], from HTTP/1.1 clients: a 4 MiB chunked
/// body and a 4 MiB `Content-Length` one (both over 64 KiB: hyper's path and client) get
/// the upstream's early `413`, not a 502 or a 504 after the route's timeout; the next
/// request works.
#[test]
fn an_early_answer_to_a_large_http1_body_is_heard() {
    let (address, _seen) = early_answer_upstream();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {address}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 5s\n"
    ));
    sc.wait_ready();
    let addr = &sc.listeners["public"];
    let out = send_while_reading(
        addr,
        chunked_request("/early-close", 4 << 20, 64 * 1024),
        "too much",
    );
    assert!(
        out.starts_with("HTTP/1.1 413") && out.ends_with("too much"),
        "{out}\n{}",
        sc.diagnostics()
    );
    let mut req =
        b"POST /early-close HTTP/1.1\r\nHost: a\r\nContent-Length: 4194304\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'x', 4 << 20));
    let out = send_while_reading(addr, req, "too much");
    assert!(
        out.starts_with("HTTP/1.1 413") && out.ends_with("too much"),
        "{out}\n{}",
        sc.diagnostics()
    );
    let out = raw(
        addr,
        b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("ok"),
        "{out}"
    );
}

/// Listeners with `limits.max_request_body` 1000 (`public`) and 100 KiB (`big`) in front of
/// the echo backend, with an access log.
fn body_limited(server: &str, app: &Backend, log: &std::path::Path) -> Sidecar {
    let sc = Sidecar::start(&with_http2_server(
        server,
        &format!(
            "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits: {{ max_request_body: 1000 }}\n    routes:\n      - timeout: 5s\n  - name: big\n    address: 127.0.0.1:0\n    limits: {{ max_request_body: 100KiB }}\n    routes:\n      - timeout: 5s\ntelemetry:\n  access_log: {{ to: {} }}\n",
            app.address(),
            log.display()
        ),
    ));
    sc.wait_ready();
    sc
}

const TOO_LARGE: &str = "outrigger_http_responses_total{direction=\"inbound\",listener=\"public\",route=\"0\",cluster=\"app\",class=\"4xx\",error=\"body-too-large\"}";

/// `limits.max_request_body`: a `Content-Length` over it is answered 413 `body-too-large` and
/// the connection closed, before the body is forwarded or the upstream contacted, on the
/// HTTP/1 fast path (which answers it itself) and from h2c; a body of exactly the limit passes
/// on each; counted with its reason and in the access log.
fn a_stated_body_length_over_max_request_body_gets_413(server: &str) {
    let app = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = body_limited(server, &app, &log);
    let addr = &sc.listeners["public"];
    for length in [1001, 10 << 20] {
        // The head alone: nothing of the body is waited for.
        let out = raw(
            addr,
            format!("POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\n\r\n").as_bytes(),
        );
        assert!(
            out.starts_with("HTTP/1.1 413"),
            "{out}\n{}",
            sc.diagnostics()
        );
        let lower = out.to_ascii_lowercase();
        assert!(
            lower.contains("\r\nx-outrigger-error: body-too-large\r\n"),
            "{out}"
        );
        assert!(lower.contains("\r\nconnection: close\r\n"), "{out}");
        assert!(out.contains("limits.max_request_body"), "{out}");
    }
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = h2
        .post(sc.listener_url("public", "/big"))
        .body(vec![b'x'; 1001])
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["x-outrigger-error"], "body-too-large");
    assert_eq!(app.count(), 0, "the upstream never saw a refused request");
    // Exactly the limit passes: the fast path, hyper's path (chunked) and h2c.
    let mut req =
        b"POST /fits HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
            .to_vec();
    req.extend_from_slice(&[b'x'; 1000]);
    assert!(raw(addr, &req).starts_with("HTTP/1.1 200"));
    let mut req = b"POST /fits HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3e8\r\n".to_vec();
    req.extend_from_slice(&[b'x'; 1000]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    assert!(raw(addr, &req).starts_with("HTTP/1.1 200"));
    let r = h2
        .post(sc.listener_url("public", "/fits"))
        .body(vec![b'x'; 1000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = app.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter()
            .all(|s| s.path == "/fits" && s.body.len() == 1000)
    );
    assert_eq!(sc.metric(TOO_LARGE), 3.0, "{}", sc.diagnostics());
    let lines: Vec<serde_json::Value> = eventually(Duration::from_secs(5), "6 log lines", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        (lines.len() == 6).then_some(lines)
    });
    for l in &lines[..3] {
        assert_eq!(
            (&l["status"], &l["error"]),
            (&413.into(), &"body-too-large".into()),
            "{l}"
        );
    }
}

/// A body without a length that grows past `limits.max_request_body` is cut: 413 and the
/// connection closed on HTTP/1.1 (chunked: under a limit below 64 KiB while it is read
/// ahead, before the upstream is contacted; over 64 KiB while it streams, the upstream
/// request aborted), 413 on h2c (no `content-length`: streamed); no whole request reaches
/// the upstream, and the upstream connections of the aborted requests are not pooled (the
/// next requests work).
fn a_body_growing_past_max_request_body_is_cut_with_413(server: &str) {
    let app = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = body_limited(server, &app, &log);
    // Cut while read ahead (the first 64 KiB and the frame that passes them), and while
    // streamed (16 KiB chunks: streamed from 80 KiB, cut at 100 KiB).
    for (listener, size, chunk) in [
        ("public", 2000, 2000),
        ("public", 4 << 20, 64 * 1024),
        ("big", 110 * 1024, 64 * 1024),
        ("big", 4 << 20, 16 * 1024),
    ] {
        let req = chunked_request("/big", size, chunk);
        let out = send_while_reading(&sc.listeners[listener], req, "(limits.max_request_body)\n");
        assert!(
            out.starts_with("HTTP/1.1 413"),
            "{listener} {size}: {out}\n{}",
            sc.diagnostics()
        );
        let lower = out.to_ascii_lowercase();
        assert!(
            lower.contains("\r\nx-outrigger-error: body-too-large\r\n"),
            "{out}"
        );
        assert!(lower.contains("\r\nconnection: close\r\n"), "{out}");
    }
    let (status, headers, _) = h2_post_unsized(&sc.listeners["big"], "/big", 160 * 1024);
    let reason = headers["x-outrigger-error"].clone();
    assert_eq!(status, 413, "{}", sc.diagnostics());
    assert_eq!(reason, "body-too-large");
    // The streamed ones (the 16 KiB chunks, h2c) reached the upstream cut short (the echo
    // backend records a body it could not read whole as empty); the others not at all.
    let big: Vec<_> = app
        .seen()
        .into_iter()
        .filter(|s| s.path == "/big")
        .collect();
    assert!(
        big.len() <= 2 && big.iter().all(|s| s.body.is_empty()),
        "no whole request reached the upstream: {big:?}"
    );
    assert_eq!(sc.metric(TOO_LARGE), 2.0, "{}", sc.diagnostics());
    assert_eq!(sc.metric(&TOO_LARGE.replace("\"public\"", "\"big\"")), 3.0);
    for listener in ["public", "big", "big"] {
        let r = client()
            .post(sc.listener_url(listener, "/after"))
            .body("ok")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// The same towards an `http2: true` cluster (hyper-util's client, which turns the cut body
/// into a stream reset): still 413 `body-too-large`, not a 502 against the endpoint.
#[test]
fn a_body_cut_towards_an_http2_cluster_is_413() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: 127.0.0.1:1\n  probe: {{ enabled: false }}\nclusters:\n  up: {{ endpoints: [\"{}\"], http2: true }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits: {{ max_request_body: 100KiB }}\n    routes:\n      - cluster: up\n        timeout: 5s\n",
        app.address()
    ));
    sc.wait_ready();
    for _ in 0..3 {
        let (status, headers, _) = h2_post_unsized(&sc.listeners["public"], "/big", 4 << 20);
        assert_eq!(status, 413, "{headers:?}\n{}", sc.diagnostics());
        assert_eq!(headers["x-outrigger-error"], "body-too-large");
        let req = chunked_request("/big", 4 << 20, 16 * 1024);
        let out = send_while_reading(&sc.listeners["public"], req, "(limits.max_request_body)\n");
        assert!(
            out.starts_with("HTTP/1.1 413"),
            "{out}\n{}",
            sc.diagnostics()
        );
    }
    let r = client()
        .post(sc.listener_url("public", "/after"))
        .body("ok")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.diagnostics());
}

/// `limits.max_request_body: 0` is refused at check, with where it is.
#[test]
fn a_zero_max_request_body_is_refused() {
    crate::support::check_finds(
        "zero.yaml",
        "app: { address: 127.0.0.1:1 }\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits:\n      max_request_body: 0\n",
        &["zero.yaml:6:25: listeners[0].limits.max_request_body: expected a positive size"],
    );
}

/// An h2c POST of `size` bytes without a `content-length` (h2 frames of 16 KiB, the stream
/// left open until the last), with the client's own h2 (reqwest's blocking client reports a
/// request body cut by the server's reset instead of the response that came first): the
/// status, headers and body of the response, within 10 s.
fn h2_post_unsized(addr: &str, path: &str, size: usize) -> (u16, http::HeaderMap, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            let req = http::Request::post(format!("http://{addr}{path}"))
                .body(())
                .unwrap();
            let (res, mut body) = client.send_request(req, false).unwrap();
            // Buffered by h2 and sent as the windows open; a reset stream takes no more.
            let mut left = size;
            while left > 0 {
                let n = left.min(16 * 1024);
                if body.send_data(vec![b'x'; n].into(), false).is_err() {
                    break;
                }
                left -= n;
            }
            let _ = body.send_data(bytes::Bytes::new(), true);
            let res = res.await.expect("a response");
            let (parts, mut recv) = res.into_parts();
            let mut out = Vec::new();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.expect("the response body");
                let _ = recv.flow_control().release_capacity(chunk.len());
                out.extend_from_slice(&chunk);
            }
            (
                parts.status.as_u16(),
                parts.headers,
                String::from_utf8_lossy(&out).into_owned(),
            )
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("an answer within 10 s")
    })
}
