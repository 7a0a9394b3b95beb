//! The log agent end to end: the real binary, real files, a real supervised process, and a
//! real HTTP receiver in the test that counts every line it is sent.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Sidecar, Spawn, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// An NDJSON receiver: keeps every record; answers 503 while `failing`, 413 to a body over
/// `max_body` bytes, and never answers at all while `hanging`.
struct Receiver {
    url: String,
    records: Arc<Mutex<Vec<serde_json::Value>>>,
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    limits: Arc<Limits>,
}

#[derive(Default)]
struct Limits {
    max_body: AtomicUsize,
    /// The largest body taken.
    largest: AtomicUsize,
    too_large: AtomicUsize,
    hanging: AtomicBool,
    /// Requests left without an answer.
    hung: AtomicUsize,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/ingest", listener.local_addr().unwrap());
        let r = Receiver {
            url,
            records: Default::default(),
            failing: Default::default(),
            refused: Default::default(),
            limits: Default::default(),
        };
        r.limits.max_body.store(usize::MAX, Ordering::SeqCst);
        let (records, failing, refused, limits) = (
            r.records.clone(),
            r.failing.clone(),
            r.refused.clone(),
            r.limits.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (records, failing, refused, limits) = (
                    records.clone(),
                    failing.clone(),
                    refused.clone(),
                    limits.clone(),
                );
                std::thread::spawn(move || serve(conn, &records, &failing, &refused, &limits));
            }
        });
        r
    }

    fn records(&self) -> Vec<serde_json::Value> {
        self.records.lock().unwrap().clone()
    }

    /// `field` of every record, counted.
    fn counts(&self, field: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in self.records() {
            *m.entry(r[field].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
        m
    }

    /// Waits until every `message` in `expected` arrived; returns the counts.
    fn wait_for(&self, expected: &[String]) -> BTreeMap<String, usize> {
        eventually(WAIT, "every line at the receiver", || {
            let c = self.counts("message");
            expected.iter().all(|e| c.contains_key(e)).then_some(c)
        })
    }
}

/// One HTTP/1.1 connection, keep-alive.
fn serve(
    conn: TcpStream,
    records: &Mutex<Vec<serde_json::Value>>,
    failing: &AtomicBool,
    refused: &AtomicUsize,
    limits: &Limits,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        let mut loki = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if first {
                loki = line.starts_with("POST /loki/api/v1/push ");
                assert!(loki || line.starts_with("POST /ingest "), "{line}");
                first = false;
            }
            let l = line.to_ascii_lowercase();
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if limits.hanging.load(Ordering::SeqCst) {
            limits.hung.fetch_add(1, Ordering::SeqCst);
            // Keep the connection open and say nothing.
            let _ = reader.read(&mut [0; 1]);
            return;
        }
        let status = if failing.load(Ordering::SeqCst) {
            refused.fetch_add(1, Ordering::SeqCst);
            "503 Service Unavailable"
        } else if len > limits.max_body.load(Ordering::SeqCst) {
            limits.too_large.fetch_add(1, Ordering::SeqCst);
            "413 Payload Too Large"
        } else {
            limits.largest.fetch_max(len, Ordering::SeqCst);
            let mut r = records.lock().unwrap();
            if loki {
                r.extend(loki_records(&body));
            } else {
                for l in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    r.push(serde_json::from_slice(l).expect("every record is JSON"));
                }
            }
            "200 OK"
        };
        let _ = write!(out, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
    }
}

/// The records of a Loki push request, checked against the push API's JSON shape
/// (`{"streams":[{"stream":{label:value},"values":[["<unix ns>","<line>"]]}]}`); each record
/// gets its stream's labels under `_labels`.
fn loki_records(body: &[u8]) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(body).expect("a Loki push is JSON");
    let mut out = Vec::new();
    for s in v["streams"].as_array().expect("streams") {
        let labels = s["stream"].as_object().expect("stream labels");
        assert!(!labels.is_empty() && labels.values().all(|l| l.is_string()));
        for e in s["values"].as_array().expect("values") {
            let e = e.as_array().unwrap();
            assert_eq!(e.len(), 2);
            let ns = e[0].as_str().expect("the timestamp is a string");
            assert!(
                ns.len() >= 19 && ns.bytes().all(|b| b.is_ascii_digit()),
                "{ns}"
            );
            let mut record: serde_json::Value =
                serde_json::from_str(e[1].as_str().expect("the line is a string")).unwrap();
            record["_labels"] = s["stream"].clone();
            out.push(record);
        }
    }
    out
}

fn append(path: &Path, from: usize, to: usize, prefix: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut s = String::new();
    for i in from..to {
        s.push_str(&format!("{prefix} {i}\n"));
    }
    f.write_all(s.as_bytes()).unwrap();
}

fn expected(from: usize, to: usize, prefix: &str) -> Vec<String> {
    (from..to).map(|i| format!("{prefix} {i}")).collect()
}

fn files_config(dir: &Path, url: &str, extra: &str) -> String {
    format!(
        "logs:\n  sources:\n    - files: {}/*.log\n      format: plain\n  sinks:\n    - http: {url}\n  checkpoint: {}/checkpoint.json\n  poll: 50ms\n  batch:\n    max_lines: 100\n    max_wait: 50ms\n    retry_max: 200ms\n{extra}",
        dir.display(),
        dir.display()
    )
}

/// Every line exactly once, or panics naming what is missing or doubled.
fn assert_once(counts: &BTreeMap<String, usize>, expected: &[String], sc: &Sidecar) {
    let missing: Vec<_> = expected
        .iter()
        .filter(|e| !counts.contains_key(*e))
        .collect();
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && counts.len() == expected.len(),
        "missing {missing:?}, doubled {doubled:?}, {} distinct of {}\n{}",
        counts.len(),
        expected.len(),
        sc.diagnostics()
    );
}

#[test]
fn app_lines_reach_the_http_sink_enriched_redacted_and_still_echoed() {
    let rx = Receiver::start();
    let config = format!(
        "service: shop\nlogs:\n  sources: [{{app: stdio}}]\n  sinks: [{{http: {}}}]\n  fields: {{env: test}}\n  env_fields: {{pod: TEST_POD_NAME}}\n  redact:\n    - pattern: 'password=\\S+'\n      mask: password=***\n",
        rx.url
    );
    let script = r#"i=0; while [ $i -lt 3000 ]; do echo "line $i password=hunter$i"; i=$((i+1)); done
echo '{"msg":"json line","traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7"}'
echo "to stderr" >&2"#;
    let mut sc = Spawn {
        config: &config,
        env: &[("TEST_POD_NAME", "shop-0")],
        app: &["sh", "-c", script],
        ..Spawn::default()
    }
    .start();
    // The app's exit stops the sidecar; its last lines are shipped on the way out.
    let status = sc.wait_exit(WAIT);
    assert!(status.success(), "{status}\n{}", sc.diagnostics());
    let mut want: Vec<String> = (0..3000)
        .map(|i| format!("line {i} password=***"))
        .collect();
    want.push("to stderr".into());
    let counts = rx.counts("message");
    let plain: BTreeMap<_, _> = counts.into_iter().filter(|(k, _)| !k.is_empty()).collect();
    assert_once(&plain, &want, &sc);
    let records = rx.records();
    assert!(
        records.iter().all(|r| !r.to_string().contains("hunter")),
        "a password left the process"
    );
    let json = records.iter().find(|r| r["msg"] == "json line").unwrap();
    assert_eq!(json["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(json["span_id"], "00f067aa0ba902b7");
    let err = records
        .iter()
        .find(|r| r["message"] == "to stderr")
        .unwrap();
    assert_eq!(err["stream"], "stderr");
    for r in &records {
        assert_eq!(r["env"], "test");
        assert_eq!(r["pod"], "shop-0");
        assert_eq!(r["source"], "app");
    }
    // Still echoed, unredacted, for `kubectl logs` (the echo is written after the line is
    // queued for shipping, so it may trail the sink by a moment).
    eventually(Duration::from_secs(10), "the echo", || {
        (sc.stdout().contains("line 2999 password=hunter2999\n")
            && sc.stderr().contains("to stderr\n"))
        .then_some(())
    });
}

#[test]
fn files_rotated_by_rename_and_by_copytruncate_lose_and_double_no_line() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 500, "a");
    let sc = Sidecar::start(&files_config(dir.path(), &rx.url, ""));
    // The file is followed (a file renamed away before it was ever seen is not the glob's).
    rx.wait_for(&expected(0, 500, "a"));
    // Rename and create, with the writer still appending to the old file for a while.
    let old = dir.path().join("app.log.1");
    std::fs::rename(&log, &old).unwrap();
    append(&old, 500, 1000, "a");
    append(&log, 1000, 1500, "a");
    rx.wait_for(&expected(0, 1500, "a"));
    // Copytruncate: copy, then truncate in place; the writer goes on with the same file.
    std::fs::copy(&log, dir.path().join("app.log.2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, 1500, 2000, "a");
    let want = expected(0, 2000, "a");
    rx.wait_for(&want);
    eventually(WAIT, "everything shipped and counted", || {
        (sc.metric("outrigger_logs_shipped_lines_total{sink=\"http\"}") >= 2000.0).then_some(())
    });
    assert_once(&rx.counts("message"), &want, &sc);
    let r = &rx.records()[0];
    assert!(r["file"].as_str().unwrap().ends_with("app.log"), "{r}");
}

#[test]
fn batches_are_bounded_by_encoded_bytes_and_a_413_splits_them_down_to_one_refused_line() {
    let rx = Receiver::start();
    // Takes bodies of up to 2,000 bytes: the 1 KiB batches pass (a record is ~150 bytes);
    // after a restart with 100 KiB batches, each is refused and halved until its pieces fit.
    rx.limits.max_body.store(2000, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 300, "b");
    let config = |bytes: &str| {
        files_config(dir.path(), &rx.url, "").replace(
            "max_lines: 100",
            &format!("max_lines: 1000\n    max_bytes: {bytes}"),
        )
    };
    let mut sc = Sidecar::start(&config("1KiB"));
    rx.wait_for(&expected(0, 300, "b"));
    assert!(rx.limits.largest.load(Ordering::SeqCst) <= 1024);
    assert_eq!(rx.limits.too_large.load(Ordering::SeqCst), 0);
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(WAIT);

    // One line alone is over the limit: it is dropped and counted, every other line arrives.
    append(&log, 300, 1300, "b");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(format!("{}\n", "x".repeat(3000)).as_bytes())
        .unwrap();
    append(&log, 1301, 1500, "b");
    let sc = Sidecar::start(&config("100KiB"));
    let mut want = expected(0, 1300, "b");
    want.extend(expected(1301, 1500, "b"));
    let counts = rx.wait_for(&want);
    eventually(WAIT, "the long line counted as refused", || {
        (sc.metric("outrigger_logs_dropped_lines_total{source=\"*\",reason=\"rejected\"}") == 1.0)
            .then_some(())
    });
    assert_once(&counts, &want, &sc);
    assert!(rx.limits.too_large.load(Ordering::SeqCst) > 1);
    assert!(rx.limits.largest.load(Ordering::SeqCst) <= 2000);
}

#[test]
fn a_stop_while_the_sink_hangs_ends_within_the_flush_budget_and_resumes_after() {
    let rx = Receiver::start();
    rx.limits.hanging.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 500, "h");
    // A sink timeout far longer than the stop's budget: the stop must not wait for it.
    let config = files_config(dir.path(), &rx.url, "").replace(
        &format!("    - http: {}\n", rx.url),
        &format!("    - http: {}\n      timeout: 10m\n", rx.url),
    );
    let mut sc = Sidecar::start(&config);
    eventually(WAIT, "a batch sent and left unanswered", || {
        (rx.limits.hung.load(Ordering::SeqCst) > 0).then_some(())
    });
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sc.wait_exit(WAIT);
    assert!(status.code().is_some(), "{status:?}\n{}", sc.diagnostics());
    // Nothing was acknowledged: after a restart with the sink back, every line arrives once.
    rx.limits.hanging.store(false, Ordering::SeqCst);
    let sc = Sidecar::start(&config);
    let want = expected(0, 500, "h");
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
}

#[test]
fn a_sink_that_fails_then_recovers_receives_every_line() {
    let rx = Receiver::start();
    rx.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    append(&dir.path().join("app.log"), 0, 1000, "r");
    let sc = Sidecar::start(&files_config(dir.path(), &rx.url, ""));
    eventually(WAIT, "a few refused attempts", || {
        (rx.refused.load(Ordering::SeqCst) >= 3).then_some(())
    });
    append(&dir.path().join("app.log"), 1000, 1500, "r");
    rx.failing.store(false, Ordering::SeqCst);
    let want = expected(0, 1500, "r");
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
    assert!(sc.metric("outrigger_logs_sink_retries_total{sink=\"http\"}") >= 3.0);
}

#[test]
fn a_killed_sidecar_resumes_from_its_checkpoint_without_loss() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 20_000, "k");
    let config = files_config(dir.path(), &rx.url, "");
    let mut sc = Sidecar::start(&config);
    // kill -9 mid-stream (as soon as the first batch arrived): no drain, no last checkpoint.
    eventually(WAIT, "the first batch", || {
        (!rx.records.lock().unwrap().is_empty()).then_some(())
    });
    sc.signal(nix::sys::signal::Signal::SIGKILL);
    sc.wait_exit(WAIT);
    let before = rx.records().len();
    eprintln!("received before the kill: {before}");
    append(&log, 20_000, 21_000, "k");
    let sc = Sidecar::start(&config);
    let want = expected(0, 21_000, "k");
    let counts = rx.wait_for(&want);
    let missing = want.iter().filter(|e| !counts.contains_key(*e)).count();
    let doubled: usize = counts.values().map(|n| n - 1).sum();
    assert_eq!(missing, 0, "{}", sc.diagnostics());
    // At-least-once: at most the one batch in flight at the kill is sent again.
    assert!(
        doubled <= 100,
        "{doubled} lines doubled ({before} received before the kill)\n{}",
        sc.diagnostics()
    );
    // Lines written while it was down are not doubled at all.
    for l in expected(20_000, 21_000, "k") {
        assert_eq!(counts[&l], 1, "{l}");
    }
}

#[test]
fn a_logs_section_with_problems_is_refused_with_locations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "logs:\n  sources:\n    - files: relative/*.log\n    - app: stdio\n  sinks:\n    - http: https://example.com/x\n  redact:\n    - pattern: '('\n",
    )
    .unwrap();
    let (code, _, err) =
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("bad.yaml:3:") && err.contains("absolute"),
        "{err}"
    );
    assert!(err.contains("https is not supported"), "{err}");
    assert!(err.contains("logs.redact[0].pattern"), "{err}");
    assert!(err.contains("app: stdio needs a supervised app"), "{err}");
}

#[test]
fn an_app_writing_100k_lines_and_exiting_has_every_line_shipped_once() {
    let rx = Receiver::start();
    let config = format!(
        "logs:\n  sources: [{{app: stdio, format: plain}}]\n  sinks: [{{http: {}}}]\n",
        rx.url
    );
    let mut sc = Spawn {
        config: &config,
        app: &["seq", "1", "100000"],
        ..Spawn::default()
    }
    .start();
    let status = sc.wait_exit(WAIT);
    assert!(status.success(), "{status}\n{}", sc.diagnostics());
    let want: Vec<String> = (1..=100_000).map(|i| i.to_string()).collect();
    assert_once(&rx.counts("message"), &want, &sc);
}

#[test]
fn loki_receives_labelled_streams_in_the_push_shape() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut lines = String::new();
    for i in 0..300 {
        let level = if i % 3 == 0 { "error" } else { "info" };
        lines.push_str(&format!(
            "{{\"level\":\"{level}\",\"message\":\"l {i}\"}}\n"
        ));
    }
    std::fs::write(&log, lines).unwrap();
    let base = rx.url.trim_end_matches("/ingest");
    let config = format!(
        "logs:\n  sources: [{{files: {}/*.log, name: web}}]\n  sinks: [{{loki: {base}, labels: [source, level]}}]\n  poll: 50ms\n  batch: {{max_wait: 50ms, max_lines: 64}}\n",
        dir.path().display()
    );
    let sc = Sidecar::start(&config);
    let want = expected(0, 300, "l");
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
    for r in rx.records() {
        assert_eq!(r["_labels"]["source"], "web");
        assert_eq!(r["_labels"]["level"], r["level"], "{r}");
    }
    assert!(sc.metric("outrigger_logs_shipped_lines_total{sink=\"loki\"}") >= 300.0);
}
