//! Hardening limits across modules (issue 19): descriptors running out, the minimum data rate
//! of request bodies.

use std::net::TcpStream;
use std::time::Duration;

use crate::backend::Backend;
use crate::support::{Sidecar, Spawn, client, eventually};

/// GET on a fresh connection (a new client each time): the status, or the error.
fn fresh_get(url: &str) -> Result<u16, String> {
    client()
        .get(url)
        .send()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// Opens `n` connections to `address` and keeps them (they send nothing).
fn flood(address: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect()
}

fn open_connections(sc: &Sidecar, listener: &str) -> f64 {
    sc.metric(&format!(
        "outrigger_connections_open{{direction=\"inbound\",listener=\"{listener}\"}}"
    ))
}

/// A listener flooded until the process has no descriptor left (its cap set far above the
/// limit): admin's `/live` and `/ready`, and the bridge's healthz, still answer every time —
/// from the descriptor reserve — where they used to hang (admin slept a second per failed
/// accept and failed again).
#[test]
fn admin_and_bridge_health_answer_when_a_listener_took_every_descriptor() {
    health_answers_out_of_descriptors(1);
}

/// The same with four worker threads: the flooded listener's accepts run on other threads
/// while a spare is used and given back (a closing connection's descriptor becomes the spare
/// in one `dup2`, so no other thread takes the slot in between).
#[test]
fn health_answers_out_of_descriptors_with_several_worker_threads() {
    health_answers_out_of_descriptors(4);
}

fn health_answers_out_of_descriptors(worker_threads: usize) {
    let app = Backend::http();
    let bridge = if cfg!(feature = "bridge") {
        "bridge:\n  address: 127.0.0.1:0\n"
    } else {
        ""
    };
    let config = format!(
        "runtime: {{ worker_threads: {worker_threads} }}\napp:\n  address: {}\nlisteners:\n  - name: flood\n    address: 127.0.0.1:0\n    limits: {{ max_connections: 10000, header_read_timeout: 1h, idle_timeout: 1h }}\n{bridge}",
        app.address()
    );
    let sc = Spawn {
        config: &config,
        nofile: Some(256),
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    // More connections than the sidecar may hold: the rest wait in the listen backlog.
    let _held = flood(&sc.listeners["flood"], 300);
    eventually(
        Duration::from_secs(10),
        "the sidecar out of descriptors",
        || sc.stderr().contains("accept failed").then_some(()),
    );
    for i in 0..20 {
        assert_eq!(
            fresh_get(&sc.url("/live")),
            Ok(200),
            "/live, call {i}\n{}",
            sc.diagnostics()
        );
        assert_eq!(
            fresh_get(&sc.url("/ready")),
            Ok(200),
            "/ready, call {i}\n{}",
            sc.diagnostics()
        );
        if cfg!(feature = "bridge") {
            assert_eq!(
                fresh_get(&format!(
                    "http://{}/v1.0/healthz",
                    sc.bridge.as_ref().unwrap()
                )),
                Ok(204),
                "bridge healthz, call {i}\n{}",
                sc.diagnostics()
            );
        }
    }
    // Still out of descriptors (the flood is held): the answers came from the reserve.
    assert!(
        open_connections(&sc, "flood") > 100.0,
        "{}",
        sc.diagnostics()
    );
}

/// Without a `max_connections`, a listener's default cap leaves descriptors for the others
/// under a low `RLIMIT_NOFILE` ((256 − 64) / (2 × 2 listeners) = 48): a flood on one listener
/// no longer makes the other's accepts fail.
#[test]
fn by_default_a_flooded_listener_leaves_descriptors_for_the_others() {
    let app = Backend::http();
    let config = format!(
        "app:\n  address: {}\nlisteners:\n  - name: flood\n    address: 127.0.0.1:0\n    limits: {{ header_read_timeout: 1h, idle_timeout: 1h }}\n  - name: other\n    address: 127.0.0.1:0\n",
        app.address()
    );
    let sc = Spawn {
        config: &config,
        nofile: Some(256),
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let effective = sc.get_json("/config");
    assert_eq!(
        effective["config"]["listeners"][0]["limits"]["max_connections"], 48,
        "{effective}"
    );
    // 48 accepted, the rest in the listen backlog (128).
    let _held = flood(&sc.listeners["flood"], 150);
    eventually(Duration::from_secs(10), "the flood at its cap", || {
        (open_connections(&sc, "flood") == 48.0).then_some(())
    });
    for i in 0..20 {
        assert_eq!(
            fresh_get(&sc.listener_url("other", "/x")),
            Ok(200),
            "call {i}\n{}",
            sc.diagnostics()
        );
    }
    assert_eq!(fresh_get(&sc.url("/live")), Ok(200));
    assert!(
        !sc.stderr().contains("accept failed"),
        "{}",
        sc.diagnostics()
    );
}

/// Sends `head`, then one byte of body every 100 ms (for at most 60 s) while reading the
/// answer; returns what was read until the sidecar closed the connection (or 20 s passed).
fn trickle(address: &str, head: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(address).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        for _ in 0..600 {
            std::thread::sleep(Duration::from_millis(100));
            if writer.write_all(b"x").is_err() {
                return;
            }
        }
    });
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
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

/// A request body that trickles (10 bytes a second against `min_body_rate` 1,000 B/s with 1 s
/// of grace) is cut with 408 and the connection closed — a small body (read ahead) and a long
/// one (streamed to the app) alike — where it used to hold its slot until the route timeout
/// (30 s here; the read gives up after 20).
#[test]
fn a_trickling_request_body_is_cut_at_the_minimum_rate() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits: {{ min_body_rate: {{ bytes_per_second: 1000, grace: 1s }} }}\n    routes:\n      - timeout: 30s\n",
        app.address()
    ));
    sc.wait_ready();
    let address = &sc.listeners["public"];
    for length in [1_000, 1_000_000] {
        let out = trickle(
            address,
            &format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\n\r\n"),
        );
        assert!(
            out.starts_with("HTTP/1.1 408"),
            "{length}: {out}\n{}",
            sc.diagnostics()
        );
        assert!(out.contains("min_body_rate"), "{out}");
    }
    // A body at a good pace is not cut, and the listener serves on.
    let r = client()
        .post(sc.listener_url("public", "/ok"))
        .body(vec![b'y'; 200_000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `min_body_rate` is checked like every other limit.
#[test]
fn min_body_rate_mistakes_are_located() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        "app:\n  address: 127.0.0.1:1\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits:\n      min_body_rate: { bytes_per_second: 10, grace: 0s, per: minute }\n",
    )
    .unwrap();
    let (code, _, stderr) = crate::support::run_to_end(&["check", "-c", "c.yaml"], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("c.yaml:7:") && stderr.contains("min_body_rate"),
        "{stderr}"
    );
}

/// `retry: {on: [bogus]}` without `attempts` reported the missing `attempts` alone; the bad
/// condition came only after it was fixed. Both now, each located.
#[test]
fn a_retry_without_attempts_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        "app:\n  address: 127.0.0.1:1\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - retry: { on: [bogus] }\n",
    )
    .unwrap();
    let (code, _, stderr) = crate::support::run_to_end(&["check", "-c", "c.yaml"], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    for e in [
        "c.yaml:7:9: listeners[0].routes[0].retry: missing field `attempts`",
        "c.yaml:7:23: listeners[0].routes[0].retry.on[0]: expected connect-failure",
    ] {
        assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
    }
}

/// `data` in HTTP/1 chunks of 64 KiB, and the last chunk.
fn chunked(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 1000 + 16);
    for c in data.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// hyper's path (a listener with a rate limit; any chunked body) answers a body over a 1 MiB
/// `limits.max_request_body` with 413 `body-too-large`, then reads and drops what the client
/// still sends (its lingering close), as the fast path does: a client that writes its whole
/// body before it reads gets its 413 — a `Content-Length` refused before a byte of the body is
/// read, and a chunked body cut where it passes the limit — where it got a reset. The body is
/// 64 MiB: more than loopback's socket buffers take (`net.ipv4.tcp_rmem` lets one grow to
/// 32 MiB), which would otherwise swallow it all before the close.
#[test]
fn hyper_s_path_lingers_so_a_client_writing_a_body_over_the_limit_gets_its_413() {
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: limited\n    address: 127.0.0.1:0\n    limits: {{ max_request_body: 1MiB, rate_limit: {{ requests_per_second: 100000, burst: 100000 }} }}\n    routes:\n      - timeout: 30s\n  - name: plain\n    address: 127.0.0.1:0\n    limits: {{ max_request_body: 1MiB }}\n    routes:\n      - timeout: 30s\n",
        app.address()
    ));
    sc.wait_ready();
    let data = vec![b'z'; 64 << 20];
    let sized = format!(
        "PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    let chunks = chunked(&data);
    let open = "PUT /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cases = [
        ("limited", sized.as_bytes(), &data[..]),
        ("limited", open.as_bytes(), &chunks[..]),
        ("plain", open.as_bytes(), &chunks[..]),
    ];
    for (listener, head, body) in cases {
        for i in 0..3 {
            let what = format!(
                "{listener}, {}, attempt {i}",
                if body.len() == data.len() {
                    "content-length"
                } else {
                    "chunked"
                }
            );
            let out = crate::support::or_panic(
                crate::support::written_whole_then_read(&sc.listeners[listener], head, body),
                || format!("{what}\n{}", sc.diagnostics()),
            );
            assert!(out.starts_with("HTTP/1.1 413"), "{what}: {out}");
            assert!(
                out.contains("\r\nx-outrigger-error: body-too-large\r\n")
                    && out.contains("\r\nconnection: close\r\n"),
                "{what}: {out}"
            );
        }
    }
    // The Content-Length never reached the app; each chunked body was cut there.
    assert!(
        app.seen().iter().all(|s| s.body.len() < data.len()),
        "the app got a whole body"
    );
    assert_eq!(
        sc.metric("outrigger_http_responses_total{direction=\"inbound\",listener=\"limited\",route=\"0\",cluster=\"app\",class=\"4xx\",error=\"body-too-large\"}"),
        6.0,
        "{}",
        sc.diagnostics()
    );
}
