//! The admin API, signals and reloads, through the real binary.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{Sidecar, client, eventually};

#[test]
fn every_admin_endpoint_answers() {
    let sc = Sidecar::start("service: checkout\n");
    sc.wait_ready();

    let (status, body) = sc.get("/live");
    assert_eq!((status, body.as_str()), (200, "live\n"));

    let ready = sc.get_json("/ready");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["draining"], false, "{ready}");

    let r = client().get(sc.url("/metrics")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().unwrap();
    for name in [
        "outrigger_build_info{version=",
        "outrigger_uptime_seconds ",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "outrigger_config_reloads_total",
    ] {
        // A family with no samples yet still has its TYPE line.
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
    assert!(!text.contains("# EOF"), "{text}");

    let r = client()
        .get(sc.url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
    );
    assert!(r.text().unwrap().ends_with("# EOF\n"));

    let config = sc.get_json("/config");
    assert_eq!(config["config"]["service"], "checkout", "{config}");
    assert_eq!(
        config["config"]["runtime"]["shutdown_grace"], "30s",
        "{config}"
    );
    assert_eq!(
        config["config"]["admin"]["address"], "127.0.0.1:0",
        "{config}"
    );

    assert_eq!(sc.get("/log-level"), (200, "info\n".to_string()));
    let r = client()
        .put(sc.url("/log-level"))
        .body("debug")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sc.get("/log-level"), (200, "debug\n".to_string()));
    let r = client()
        .put(sc.url("/log-level"))
        .body("no[such")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(sc.get("/log-level"), (200, "debug\n".to_string()));

    let (status, body) = sc.get("/no-such-endpoint");
    assert_eq!(status, 404, "{body}");
    // Wrong method on a known path.
    let r = client().get(sc.url("/shutdown")).send().unwrap();
    assert_eq!(r.status(), 405);
}

#[test]
fn promtool_accepts_metrics() {
    let sc = Sidecar::start("");
    sc.wait_ready();
    // Make the labelled families non-empty so promtool sees samples with labels.
    let _ = client().post(sc.url("/reload")).send().unwrap();
    eventually(Duration::from_secs(10), "a reload", || {
        sc.get_json("/config")["last_reload"]["result"]
            .as_str()
            .map(|_| ())
    });
    let (_, body) = sc.get("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install the Debian package `prometheus` (.ci/run does)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool rejected /metrics: {report}\n{body}"
    );
    // promtool prints lint findings (e.g. missing _total, bad units) but exits 0 for some.
    assert!(
        report.trim().is_empty(),
        "promtool lint findings: {report}\n{body}"
    );
}

#[test]
fn sigterm_stops_promptly_with_exit_0() {
    let mut sc = Sidecar::start("");
    sc.wait_ready();
    sc.signal(Signal::SIGTERM);
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    assert!(
        sc.stderr().contains("signal received"),
        "{}",
        sc.diagnostics()
    );
    assert!(
        sc.stderr().contains("outrigger::app: stopped"),
        "{}",
        sc.diagnostics()
    );
}

#[test]
fn sigint_is_a_fast_stop() {
    let mut sc = Sidecar::start("");
    sc.wait_ready();
    sc.signal(Signal::SIGINT);
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    assert!(sc.stderr().contains("Fast"), "{}", sc.diagnostics());
}

#[test]
fn post_shutdown_stops_the_sidecar() {
    let mut sc = Sidecar::start("");
    sc.wait_ready();
    let r = client().post(sc.url("/shutdown")).send().unwrap();
    assert_eq!(r.status(), 202);
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
}

#[test]
fn sighup_reloads_and_a_bad_file_keeps_the_running_config() {
    let sc = Sidecar::start("log:\n  level: info\n");
    sc.wait_ready();

    std::fs::write(
        &sc.config_path,
        "log:\n  level: debug\nruntime:\n  worker_threads: 2\n",
    )
    .unwrap();
    sc.signal(Signal::SIGHUP);
    let config = eventually(Duration::from_secs(10), "a successful reload", || {
        let c = sc.get_json("/config");
        (c["last_reload"]["result"] == "success").then_some(c)
    });
    assert_eq!(config["log_level"], "debug", "{config}");
    assert_eq!(config["config"]["log"]["level"], "debug", "{config}");
    // A key that cannot change live is named, and the running value is kept.
    assert_eq!(
        config["last_reload"]["needs_restart"],
        serde_json::json!(["runtime.worker_threads"]),
        "{config}"
    );
    assert_eq!(config["config"]["runtime"]["worker_threads"], 1, "{config}");

    std::fs::write(&sc.config_path, "log:\n  level: trace\n  colour: red\n").unwrap();
    sc.signal(Signal::SIGHUP);
    let config = eventually(Duration::from_secs(10), "a rejected reload", || {
        let c = sc.get_json("/config");
        (c["last_reload"]["result"] == "failure").then_some(c)
    });
    let errors = config["last_reload"]["errors"].to_string();
    assert!(
        errors.contains("outrigger.yaml:3:3: log.colour: unknown field"),
        "{config}"
    );
    assert_eq!(
        config["log_level"], "debug",
        "kept the running level: {config}"
    );
    let (_, metrics) = sc.get("/metrics");
    assert!(
        metrics.contains("outrigger_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outrigger_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    assert!(sc.get_json("/ready")["ready"] == true);
}

/// A web page on this host can POST to any loopback port without a CORS preflight, and read a
/// rebound DNS name's answers: admin refuses both, and curl-style calls still work.
#[test]
fn web_pages_cannot_stop_reload_or_read_the_config() {
    let sc = Sidecar::start("service: checkout\n");
    sc.wait_ready();
    for path in ["/shutdown", "/reload"] {
        let r = client()
            .post(sc.url(path))
            .header("origin", "http://evil.example")
            .header("content-type", "text/plain")
            .body("x")
            .send()
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    let r = client()
        .put(sc.url("/log-level"))
        .header("sec-fetch-site", "cross-site")
        .body("trace")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // DNS rebinding: the page's own name in Host.
    let r = client()
        .get(sc.url("/config"))
        .header("host", "evil.example:9901")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // Probes and scrapes answer whatever the Host.
    let r = client()
        .get(sc.url("/ready"))
        .header("host", "my-pod.shop.svc:9901")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Still running, nothing reloaded; the usual calls work.
    assert_eq!(sc.get("/live").0, 200);
    assert_eq!(
        sc.get_json("/config")["last_reload"],
        serde_json::Value::Null
    );
    assert_eq!(sc.get("/log-level").1.trim(), "info");
    let r = client().post(sc.url("/reload")).send().unwrap();
    assert_eq!(r.status(), 202);
}
