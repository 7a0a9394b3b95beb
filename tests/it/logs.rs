//! The log agent end to end: the real binary, real files, a real supervised process, and a
//! real HTTP receiver in the test that counts every line it is sent.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Sidecar, Spawn, eventually};

mod buffer;
mod sinks;

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
    /// `_bulk`: messages refused once with a 429 already (a `flaky` one is, the first time).
    flaky_seen: Mutex<std::collections::BTreeSet<String>>,
    /// `_bulk`: the `_id`s stored (a `create` of one again answers 409).
    bulk_ids: Mutex<std::collections::BTreeSet<String>>,
    /// `_bulk`: item conflicts answered (409).
    conflicts: AtomicUsize,
    /// `_bulk`: requests left whose documents are stored but whose answer is a 503 (as if the
    /// answer were lost on the way back).
    lose_answers: AtomicUsize,
    /// The `authorization` and `x-…` request header lines received, as sent.
    headers: Mutex<Vec<String>>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::start_on(None)
    }

    /// With `tls`, an HTTPS receiver (`https://127.0.0.1:PORT/ingest`).
    fn start_on(tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/ingest", listener.local_addr().unwrap());
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
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    Some(config) => {
                        let tls = rustls::ServerConnection::new(config).unwrap();
                        let conn = rustls::StreamOwned::new(tls, conn);
                        serve(conn, &records, &failing, &refused, &limits)
                    }
                    None => serve(conn, &records, &failing, &refused, &limits),
                });
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

/// One HTTP/1.1 connection, keep-alive (plain TCP, or TLS: `Receiver::start_on` with a config).
fn serve<S: Read + Write>(
    conn: S,
    records: &Mutex<Vec<serde_json::Value>>,
    failing: &AtomicBool,
    refused: &AtomicUsize,
    limits: &Limits,
) {
    let mut reader = BufReader::new(conn);
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        let mut loki = false;
        let mut path = String::new();
        let mut gzip = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if first {
                loki = line.starts_with("POST /loki/api/v1/push ");
                path = line.split(' ').nth(1).unwrap_or("").to_string();
                assert!(
                    ["/loki/api/v1/push", "/ingest", "/v1/logs", "/_bulk"].contains(&path.as_str()),
                    "{line}"
                );
                first = false;
            }
            let l = line.to_ascii_lowercase();
            if l.starts_with("authorization:") || l.starts_with("x-") {
                limits
                    .headers
                    .lock()
                    .unwrap()
                    .push(line.trim_end().to_string());
            }
            if l.starts_with("content-encoding:") {
                assert_eq!(l.trim(), "content-encoding: gzip");
                gzip = true;
            }
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
        if gzip {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut plain)
                .expect("a gzip body");
            body = plain;
        }
        let mut answer = String::new();
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
            } else if path == "/v1/logs" {
                r.extend(otlp_records(&body));
            } else if path == "/_bulk" {
                let (taken, items) = bulk_records(&body, limits);
                r.extend(taken);
                answer = items;
                if limits
                    .lose_answers
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    answer.clear();
                    refused.fetch_add(1, Ordering::SeqCst);
                    drop(r);
                    let _ = write!(
                        reader.get_mut(),
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                    );
                    continue;
                }
            } else {
                for l in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    r.push(serde_json::from_slice(l).expect("every record is JSON"));
                }
            }
            "200 OK"
        };
        let _ = write!(
            reader.get_mut(),
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
    }
}

/// The records of an OTLP/HTTP logs export request (JSON encoding), checked against its
/// shape: `resourceLogs[].scopeLogs[].logRecords[]`, nanosecond times as digit strings, a
/// `body` AnyValue, attributes as `{key, value: AnyValue}`. Each record: `message` from the
/// body, its attributes as fields, `_service` from the resource, `_severity` and `_trace`.
fn otlp_records(body: &[u8]) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(body).expect("an OTLP request is JSON");
    let any = |v: &serde_json::Value| -> serde_json::Value {
        let (k, v) = v.as_object().unwrap().iter().next().expect("an AnyValue");
        assert!(
            ["stringValue", "boolValue", "intValue", "doubleValue"].contains(&k.as_str()),
            "{k}"
        );
        v.clone()
    };
    let mut out = Vec::new();
    for rl in v["resourceLogs"].as_array().expect("resourceLogs") {
        let service = rl["resource"]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == "service.name")
            .map(|a| any(&a["value"]));
        for sl in rl["scopeLogs"].as_array().expect("scopeLogs") {
            assert_eq!(sl["scope"]["name"], "outrigger");
            for lr in sl["logRecords"].as_array().expect("logRecords") {
                for t in ["timeUnixNano", "observedTimeUnixNano"] {
                    let ns = lr[t].as_str().expect("times are strings");
                    assert!(ns.bytes().all(|b| b.is_ascii_digit()), "{ns}");
                }
                let mut record = serde_json::json!({ "message": any(&lr["body"]) });
                for a in lr["attributes"].as_array().expect("attributes") {
                    record[a["key"].as_str().unwrap()] = any(&a["value"]);
                }
                record["_service"] = service.clone().unwrap_or_default();
                record["_severity"] = lr["severityNumber"].clone();
                record["_trace"] = lr["traceId"].clone();
                out.push(record);
            }
        }
    }
    out
}

/// The documents of a `_bulk` request (`create` action lines, each followed by its document)
/// and the answer: a message containing `poison` is refused (400), one containing `flaky` is
/// refused with a 429 the first time it comes; the others are taken (and returned).
fn bulk_records(body: &[u8], limits: &Limits) -> (Vec<serde_json::Value>, String) {
    let lines: Vec<serde_json::Value> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("every _bulk line is JSON"))
        .collect();
    assert!(lines.len().is_multiple_of(2), "action and document pairs");
    let mut taken = Vec::new();
    let mut items = Vec::new();
    for pair in lines.chunks(2) {
        assert_eq!(
            pair[0]["create"]["_index"], "logs-test-default",
            "{}",
            pair[0]
        );
        let doc = &pair[1];
        assert!(doc["@timestamp"].is_string(), "{doc}");
        let id = pair[0]["create"]["_id"]
            .as_str()
            .unwrap_or_else(|| panic!("every document has an _id: {}", pair[0]))
            .to_string();
        let m = doc["message"].as_str().unwrap_or("").to_string();
        let status = if limits.bulk_ids.lock().unwrap().contains(&id) {
            limits.conflicts.fetch_add(1, Ordering::SeqCst);
            409
        } else if m.contains("poison") {
            400
        } else if m.contains("flaky") && limits.flaky_seen.lock().unwrap().insert(m.clone()) {
            429
        } else {
            limits.bulk_ids.lock().unwrap().insert(id);
            taken.push(doc.clone());
            201
        };
        let item = if status == 409 {
            serde_json::json!({"create": {"status": 409, "error": {"type": "version_conflict_engine_exception"}}})
        } else {
            serde_json::json!({"create": {"status": status}})
        };
        items.push(item);
    }
    let errors = items.iter().any(|i| i["create"]["status"] != 201);
    let answer = serde_json::json!({"took": 1, "errors": errors, "items": items}).to_string();
    (taken, answer)
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

/// Kills the test's app (whose script wrote its pid to the file) when the test ends, passed or
/// failed: an app left behind (the sidecar killed with SIGKILL, or not stopped within the
/// `Sidecar` drop's few seconds) would otherwise sleep on, holding every fd it inherited (the
/// shared cargo lock's among them). Create it before the sidecar: the pid file is read at drop.
struct AppGuard(std::path::PathBuf);

impl AppGuard {
    /// Kills the app now (its pid read from the file), if it is still the script's `sleep`.
    fn kill(&self) {
        let Ok(pid) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        // Not a recycled pid: only the script's own process (`sh`, or the `sleep` it exec'd).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"sleep\0") || cmdline.starts_with(b"sh\0") {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for AppGuard {
    fn drop(&mut self) {
        self.kill();
    }
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
        "logs:\n  sources:\n    - files: relative/*.log\n    - app: stdio\n  sinks:\n    - http: ftp://example.com/x\n  redact:\n    - pattern: '('\n",
    )
    .unwrap();
    let (code, _, err) =
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("bad.yaml:3:") && err.contains("absolute"),
        "{err}"
    );
    assert!(err.contains("expected an http:// or https:// URL"), "{err}");
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

#[test]
fn cri_and_docker_files_arrive_with_partial_lines_joined_and_their_stream_and_time() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let (pods, docker) = (dir.path().join("pods"), dir.path().join("docker"));
    std::fs::create_dir_all(&pods).unwrap();
    std::fs::create_dir_all(&docker).unwrap();
    // A line cut in three by the runtime, with a stderr line between its pieces; a JSON
    // message inside (its keys kept); an empty line.
    let long = "x".repeat(20_000);
    std::fs::write(
        pods.join("0.log"),
        format!(
            "2024-05-01T10:00:00.000000001Z stdout P {}\n2024-05-01T10:00:00.000000002Z stderr F boom\n2024-05-01T10:00:00.000000003Z stdout P {}\n2024-05-01T10:00:00.000000004Z stdout F end\n2024-05-01T10:00:00.000000005Z stdout F {{\"message\":\"cri json\",\"level\":\"warn\"}}\n2024-05-01T10:00:00.000000006Z stdout F \n",
            &long[..16_384],
            &long[16_384..]
        ),
    )
    .unwrap();
    std::fs::write(
        docker.join("c-json.log"),
        "{\"log\":\"docker \",\"stream\":\"stdout\",\"time\":\"2024-05-01T11:00:00.1Z\"}\n{\"log\":\"joined\\n\",\"stream\":\"stdout\",\"time\":\"2024-05-01T11:00:00.2Z\"}\n{\"log\":\"docker err\\n\",\"stream\":\"stderr\",\"time\":\"2024-05-01T11:00:00.3Z\"}\n",
    )
    .unwrap();
    let config = format!(
        "logs:\n  sources:\n    - files: {}/*.log\n      format: cri\n      name: pods\n    - files: {}/*-json.log\n      format: docker\n      message_format: plain\n      name: docker\n  sinks: [{{http: {}}}]\n  poll: 50ms\n  batch: {{max_wait: 50ms}}\n",
        pods.display(),
        docker.display(),
        rx.url
    );
    let sc = Sidecar::start(&config);
    let want: Vec<String> = [
        format!("{long}end"),
        "boom".into(),
        "cri json".into(),
        "".into(),
        "docker joined".into(),
        "docker err".into(),
    ]
    .into();
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
    let records = rx.records();
    let by = |m: &str| records.iter().find(|r| r["message"] == m).unwrap().clone();
    let joined = by(&format!("{long}end"));
    assert_eq!(joined["stream"], "stdout");
    assert_eq!(joined["time"], "2024-05-01T10:00:00.000000001Z");
    assert_eq!(joined["source"], "pods");
    assert_eq!(by("boom")["stream"], "stderr");
    assert_eq!(by("cri json")["level"], "warn");
    let d = by("docker joined");
    assert_eq!(
        (&d["stream"], &d["time"]),
        (&"stdout".into(), &"2024-05-01T11:00:00.1Z".into())
    );
    assert_eq!(by("docker err")["stream"], "stderr");
}

#[test]
fn stack_traces_are_joined_by_their_start_line_and_a_kill_midway_loses_none() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let trace = |i: usize| {
        format!(
            "{i} ERROR failed\njava.lang.IllegalStateException: {i}\n\tat a.B.c(B.java:{i})\n\tat a.B.main(B.java:1)\n"
        )
    };
    let joined = |i: usize| trace(i).trim_end().to_string();
    let mut text = String::new();
    for i in 0..200 {
        text.push_str(&trace(i));
    }
    std::fs::write(&log, &text).unwrap();
    let config = files_config(dir.path(), &rx.url, "")
        .replace(
            "      format: plain\n",
            "      format: plain\n      multiline: {start: '^\\d', timeout: 300ms}\n",
        )
        .replace("max_lines: 100", "max_lines: 7");
    let mut sc = Sidecar::start(&config);
    eventually(WAIT, "the first batch", || {
        (!rx.records.lock().unwrap().is_empty()).then_some(())
    });
    // kill -9 mid-stream: a record being joined or waiting for a batch is read again.
    sc.signal(nix::sys::signal::Signal::SIGKILL);
    sc.wait_exit(WAIT);
    // The last trace has no line after it: it leaves when the timeout passes.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(trace(200).as_bytes())
        .unwrap();
    let sc = Sidecar::start(&config);
    let want: Vec<String> = (0..=200).map(joined).collect();
    let counts = rx.wait_for(&want);
    let missing = want.iter().filter(|e| !counts.contains_key(*e)).count();
    let stray: Vec<_> = counts.keys().filter(|k| !want.contains(k)).collect();
    assert!(
        missing == 0 && stray.is_empty(),
        "{stray:?}\n{}",
        sc.diagnostics()
    );
    // At-least-once: at most the batch in flight at the kill again.
    let doubled: usize = counts.values().map(|n| n - 1).sum();
    assert!(doubled <= 7, "{doubled} doubled\n{}", sc.diagnostics());
    assert_eq!(counts[&joined(200)], 1);
}

#[test]
fn logfmt_and_regex_sources_ship_their_fields() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.logfmt"),
        "level=info msg=\"order placed\" order=17 duration=12ms\nnot logfmt at all\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.access"),
        "10.0.0.1 GET /orders/17 200\nunparsable\n",
    )
    .unwrap();
    let config = format!(
        "logs:\n  sources:\n    - files: {d}/*.logfmt\n      format: logfmt\n    - files: {d}/*.access\n      format: regex\n      pattern: '^(?P<client>\\S+) (?P<method>[A-Z]+) (?P<path>\\S+) (?P<status>\\d+)$'\n  sinks: [{{http: {}}}]\n  poll: 50ms\n  batch: {{max_wait: 50ms}}\n",
        rx.url,
        d = dir.path().display(),
    );
    let sc = Sidecar::start(&config);
    let records = eventually(WAIT, "four records", || {
        let r = rx.records();
        (r.len() >= 4).then_some(r)
    });
    assert_eq!(records.len(), 4, "{records:?}\n{}", sc.diagnostics());
    let logfmt = records.iter().find(|r| r["msg"] == "order placed").unwrap();
    assert_eq!(logfmt["level"], "info");
    assert_eq!(logfmt["order"], "17");
    assert_eq!(logfmt["duration"], "12ms");
    let access = records.iter().find(|r| r["path"] == "/orders/17").unwrap();
    assert_eq!(
        (&access["client"], &access["method"], &access["status"]),
        (&"10.0.0.1".into(), &"GET".into(), &"200".into())
    );
    for m in ["not logfmt at all", "unparsable"] {
        assert!(
            records.iter().any(|r| r["message"] == m),
            "{m}: {records:?}"
        );
    }
}

#[test]
fn two_sinks_get_every_line_and_one_down_holds_the_checkpoint_not_the_other() {
    let (up, down) = (Receiver::start(), Receiver::start());
    down.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 1000, "f");
    let config = files_config(dir.path(), &up.url, "").replace(
        &format!("    - http: {}\n", up.url),
        &format!(
            "    - http: {}\n      name: primary\n    - http: {}\n      name: archive\n",
            up.url, down.url
        ),
    );
    let mut sc = Sidecar::start(&config);
    // The first batch reaches the sink that is up; the next waits for the other (backpressure).
    eventually(WAIT, "the archive refusing", || {
        (down.refused.load(Ordering::SeqCst) >= 3).then_some(())
    });
    assert!(up.records().len() <= 200, "{}", up.records().len());
    assert!(sc.metric("outrigger_logs_sink_retries_total{sink=\"archive\"}") >= 3.0);
    // A restart while it is down: nothing was committed past what both have.
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(WAIT);
    down.failing.store(false, Ordering::SeqCst);
    let sc = Sidecar::start(&config);
    let want = expected(0, 1000, "f");
    let (a, b) = (up.wait_for(&want), down.wait_for(&want));
    assert_once(&b, &want, &sc);
    // The sink that was up may see the batch in flight at the stop again, no more.
    let doubled: usize = a.values().map(|n| n - 1).sum();
    assert!(
        a.len() == 1000 && doubled <= 100,
        "{doubled}\n{}",
        sc.diagnostics()
    );
    eventually(WAIT, "both counted", || {
        (sc.metric("outrigger_logs_shipped_lines_total{sink=\"archive\"}") >= 1000.0
            && sc.metric("outrigger_logs_shipped_lines_total{sink=\"primary\"}") >= 900.0)
            .then_some(())
    });
}

#[test]
fn rate_limits_drop_the_apps_excess_and_delay_files() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    append(&dir.path().join("app.log"), 0, 300, "file");
    let config = format!(
        "logs:\n  sources:\n    - app: stdio\n      format: plain\n      rate_limit: {{per_second: 50, burst: 100}}\n    - files: {}/*.log\n      format: plain\n      rate_limit: {{per_second: 400, burst: 100}}\n  sinks: [{{http: {}}}]\n  poll: 50ms\n  batch: {{max_wait: 50ms}}\n",
        dir.path().display(),
        rx.url
    );
    let app_guard = AppGuard(dir.path().join("app.pid"));
    let script = format!(
        "echo $$ > {}; seq 1 5000; exec sleep 60",
        app_guard.0.display()
    );
    let sc = Spawn {
        config: &config,
        app: &["sh", "-c", &script],
        ..Spawn::default()
    }
    .start();
    let files = dir.path().join("*.log").display().to_string();
    // Files wait: every line arrives. The app's lines past the limit are dropped and counted.
    eventually(WAIT, "every line read or dropped", || {
        let app = sc.metric("outrigger_logs_read_lines_total{source=\"app\"}");
        let limited =
            sc.metric("outrigger_logs_dropped_lines_total{source=\"app\",reason=\"rate_limit\"}");
        let got = rx.counts("source");
        (app + limited == 5000.0
            && got.get(&files) == Some(&300)
            && got.get("app").map(|&n| n as f64) == Some(app))
        .then_some(())
    });
    // The 5,000 lines come at once: the burst passes, and what the rate adds meanwhile.
    let shipped = sc.metric("outrigger_logs_read_lines_total{source=\"app\"}");
    assert!(
        (100.0..=600.0).contains(&shipped),
        "{shipped}\n{}",
        sc.diagnostics()
    );
    assert_once(
        &rx.counts("message")
            .into_iter()
            .filter(|(m, _)| m.starts_with("file"))
            .collect(),
        &expected(0, 300, "file"),
        &sc,
    );
    eventually(WAIT, "every line echoed", || {
        sc.stdout().contains("\n5000\n").then_some(())
    });
}

#[test]
fn new_source_and_sink_keys_with_problems_are_each_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "app:\n  command: [sleep, '1']\nlogs:\n  sources:\n    - files: /var/log/a/*.log\n      format: regex\n    - files: /var/log/b/*.log\n      format: plain\n      message_format: json\n      multiline: {start: '(', max_lines: 1}\n    - app: stdio\n      format: cri\n      rate_limit: {per_second: 0}\n    - files: /var/log/c/*.log\n      format: regex\n      pattern: 'no captures'\n  sinks:\n    - http: http://127.0.0.1:9/a\n    - http: http://127.0.0.1:9/b\n",
    )
    .unwrap();
    let (code, _, err) =
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{err}");
    for (line, what) in [
        (6, "regex needs a pattern"),
        (9, "message_format applies to format: cri or docker only"),
        (10, "logs.sources[1].multiline.start"),
        (10, "logs.sources[1].multiline.max_lines"),
        (
            12,
            "cri and docker are formats of a container runtime's files",
        ),
        (13, "logs.sources[2].rate_limit.per_second"),
        (16, "named captures"),
        (19, "two sinks of one kind need a name"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("bad.yaml:{line}:")) && l.contains(what)),
            "line {line}: {what}\n{err}"
        );
    }
}

#[test]
fn otlp_and_bulk_sinks_with_gzip_receive_their_shapes_and_bulk_retries_only_failed_items() {
    let (otlp, es) = (Receiver::start(), Receiver::start());
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..300 {
        text.push_str(&format!(
            "{{\"message\":\"o {i}\",\"level\":\"error\",\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"}}\n"
        ));
    }
    text.push_str("flaky 1\nflaky 2\npoison\n");
    std::fs::write(dir.path().join("app.log"), text).unwrap();
    let base = |r: &Receiver| r.url.trim_end_matches("/ingest").to_string();
    let config = format!(
        "logs:\n  sources: [{{files: {}/*.log}}]\n  fields: {{service: shop}}\n  sinks:\n    - otlp: {}\n      gzip: true\n    - elasticsearch: {}\n      index: logs-test-default\n      gzip: true\n  poll: 50ms\n  batch: {{max_wait: 50ms, retry_max: 200ms}}\n",
        dir.path().display(),
        base(&otlp),
        base(&es)
    );
    let sc = Sidecar::start(&config);
    let mut want = expected(0, 300, "o");
    want.extend(["flaky 1".to_string(), "flaky 2".to_string()]);
    let counts = es.wait_for(&want);
    assert_once(&counts, &want, &sc);
    want.push("poison".into());
    let counts = otlp.wait_for(&want);
    assert_once(&counts, &want, &sc);
    let r = otlp
        .records()
        .into_iter()
        .find(|r| r["message"] == "o 7")
        .unwrap();
    assert_eq!(r["_service"], "shop");
    assert_eq!(r["_severity"], 17);
    assert_eq!(r["_trace"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(r["file"].as_str().unwrap().ends_with("app.log"), "{r}");
    eventually(
        WAIT,
        "the refused item counted, the flaky ones retried",
        || {
            (sc.metric("outrigger_logs_dropped_lines_total{source=\"*\",reason=\"rejected\"}")
                == 1.0
                && sc.metric("outrigger_logs_sink_retries_total{sink=\"elasticsearch\"}") >= 1.0
                && sc.metric("outrigger_logs_shipped_lines_total{sink=\"elasticsearch\"}") == 302.0
                && sc.metric("outrigger_logs_shipped_lines_total{sink=\"otlp\"}") == 303.0)
                .then_some(())
        },
    );
}

#[test]
fn the_apps_stack_traces_are_joined_per_stream_and_the_last_leaves_at_exit() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    // A file's last trace waits for its timeout (an hour) — or for the stop.
    std::fs::write(&log, "ERROR file trace\n  at f()\n").unwrap();
    let config = format!(
        "logs:\n  sources:\n    - app: stdio\n      format: plain\n      multiline: {{start: '^\\S', timeout: 1h}}\n    - files: {}/*.log\n      format: plain\n      multiline: {{start: '^\\S', timeout: 1h}}\n  sinks: [{{http: {}}}]\n  poll: 50ms\n",
        dir.path().display(),
        rx.url
    );
    let script = r#"echo 'ERROR out trace'; echo '  at a()' >&2; echo '  at b()'; echo 'ERROR err trace' >&2; echo '  at c()' >&2; echo 'next'"#;
    let mut sc = Spawn {
        config: &config,
        app: &["sh", "-c", script],
        ..Spawn::default()
    }
    .start();
    let status = sc.wait_exit(WAIT);
    assert!(status.success(), "{status}\n{}", sc.diagnostics());
    // stderr's `  at a()` has no start line before it on stderr: a record of its own.
    let want: Vec<String> = [
        "ERROR out trace\n  at b()",
        "  at a()",
        "ERROR err trace\n  at c()",
        "next",
        "ERROR file trace\n  at f()",
    ]
    .map(String::from)
    .into();
    assert_once(&rx.counts("message"), &want, &sc);
}

#[test]
fn a_cut_long_line_is_one_record_again_and_lines_not_in_their_format_ship_counted() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    // A CRI file: one good line, and one whose first word is not an RFC 3339 time.
    std::fs::write(
        dir.path().join("0.log"),
        "2024-05-01T10:00:00Z stdout F cri ok\nyesterday stdout F not a cri line\n",
    )
    .unwrap();
    let config = format!(
        "logs:\n  sources:\n    - app: stdio\n      format: json\n      multiline: {{start: '^\\S', max_bytes: 1MiB, timeout: 100ms}}\n    - files: {}/*.log\n      format: cri\n      name: pods\n  sinks: [{{http: {}}}]\n  poll: 50ms\n  batch: {{max_wait: 50ms}}\n",
        dir.path().display(),
        rx.url
    );
    // A JSON line of 300,000 bytes: longer than the 256 KiB the capture holds, so it comes in
    // two pieces; joined again with a `\n` between them it would no longer be JSON.
    let script = r#"import sys, time
print('{"big":"' + 'y' * 300000 + '"}')
print('not json at all')
sys.stdout.flush()
time.sleep(60)"#;
    let sc = Spawn {
        config: &config,
        app: &["python3", "-c", script],
        ..Spawn::default()
    }
    .start();
    let want: Vec<String> = [
        "not json at all",
        "cri ok",
        "yesterday stdout F not a cri line",
    ]
    .map(String::from)
    .into();
    rx.wait_for(&want);
    let records = rx.records();
    let big: Vec<_> = records.iter().filter(|r| r.get("big").is_some()).collect();
    assert_eq!(big.len(), 1, "{records:?}");
    assert_eq!(big[0]["big"].as_str().unwrap().len(), 300_000);
    assert_eq!(big[0]["stream"], "stdout");
    // The line that is not the runtime's: as it is, no stream, counted.
    let bad = records
        .iter()
        .find(|r| r["message"] == "yesterday stdout F not a cri line")
        .unwrap();
    assert!(bad.get("stream").is_none(), "{bad}");
    eventually(WAIT, "the unparsed lines counted", || {
        let format =
            sc.metric("outrigger_logs_unparsed_lines_total{source=\"app\",reason=\"format\"}");
        let container =
            sc.metric("outrigger_logs_unparsed_lines_total{source=\"pods\",reason=\"container\"}");
        (format == 1.0 && container == 1.0).then_some(())
    });
    assert_eq!(records.len(), 4, "{records:?}");
}

#[test]
fn the_apps_record_being_joined_leaves_at_stop_even_while_a_child_holds_its_stdout() {
    let rx = Receiver::start();
    // A stack trace held for joining (timeout: an hour), then the app exits leaving a child
    // that keeps its stdout open (in a session of its own: not stopped with the app).
    let config = format!(
        "logs:\n  sources:\n    - app: stdio\n      format: plain\n      multiline: {{start: '^\\S', timeout: 1h}}\n  sinks: [{{http: {}}}]\n  poll: 50ms\n",
        rx.url
    );
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child.pid");
    let script = format!(
        "echo 'ERROR held'; echo '  at a()'; setsid sleep 20 & echo $! > {}; exit 0",
        pid_file.display()
    );
    // The child is stopped when the test ends, passed or failed.
    struct Child(std::path::PathBuf);
    impl Drop for Child {
        fn drop(&mut self) {
            if let Ok(pid) = std::fs::read_to_string(&self.0) {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
    let _child = Child(pid_file);
    let mut sc = Spawn {
        config: &config,
        app: &["sh", "-c", &script],
        ..Spawn::default()
    }
    .start();
    let status = sc.wait_exit(WAIT);
    assert!(status.success(), "{status}\n{}", sc.diagnostics());
    let want = ["ERROR held\n  at a()".to_string()];
    assert_once(&rx.counts("message"), &want, &sc);
}
