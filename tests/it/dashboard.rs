//! The admin dashboard (`GET /`, `GET /status`) against a real Outrigger under traffic: a
//! cluster of two real upstreams, one of which dies and is ejected, a TLS listener whose
//! certificate expires in three days, the bridge with a declarative subscription delivering to
//! the app. `/status` is checked here; the page itself in headless Chromium driven by
//! playwright-core (`tests/js/dashboard.mjs`), which reads the numbers from the DOM, checks they
//! move and agree with `/metrics`, and saves screenshots under
//! `target/tmp/dashboard/`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::backend::Backend;
use crate::support::{Sidecar, client};
use crate::tls::Pki;

const TOKEN: &str = "dashboard-secret-token-7f3a";

/// tests/js with playwright-core installed, and Debian's chromium; None (said loudly) when
/// either is missing.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let Some(chromium) = chromium else {
        eprintln!(
            "\n\n!!!!!!!! SKIPPED: the dashboard browser test: no /usr/bin/chromium (apt-get install chromium; .ci/run installs it)\n!!!!!!!!\n"
        );
        return None;
    };
    if Command::new("node").arg("--version").output().is_err() {
        eprintln!(
            "\n\n!!!!!!!! SKIPPED: the dashboard browser test: node is not installed\n!!!!!!!!\n"
        );
        return None;
    }
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!(
                "\n\n!!!!!!!! SKIPPED: the dashboard browser test: `npm ci` in tests/js failed (is the npm registry reachable?)\n{}\n!!!!!!!!\n",
                out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_else(|e| e.to_string())
            );
            return None;
        }
    }
    Some((dir.join("dashboard.mjs"), chromium))
}

/// Requests through `egress` until stopped (a few hundred a second at most: the debug binary
/// shares two cores with other tests).
fn traffic(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let c = client();
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            let _ = c.get(&url).send().map(|r| r.bytes());
            sent += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        sent
    })
}

#[test]
fn the_dashboard_shows_the_sidecar_live_in_a_real_browser() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("web", &["--days", "3"]);
    let healthy = Backend::http();
    let doomed = Backend::http();
    let doomed_address = doomed.address();
    let resources = tempfile::tempdir().unwrap();
    std::fs::write(
        resources.path().join("pubsub.yaml"),
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: pubsub}\nspec: {type: pubsub.in-memory, version: v1}\n",
    )
    .unwrap();
    std::fs::write(
        resources.path().join("subscription.yaml"),
        "apiVersion: dapr.io/v1alpha1\nkind: Subscription\nmetadata: {name: orders}\nspec:\n  pubsubname: pubsub\n  topic: orders\n  route: /orders\n",
    )
    .unwrap();
    let config = format!(
        "service: shop
app:
  address: {app}
listeners:
  - name: public
    address: 127.0.0.1:0
    direction: inbound
    tls: {{ cert: {cert}, key: {key} }}
  - name: egress
    address: 127.0.0.1:0
    direction: outbound
    routes:
      - name: api
        match: {{ path_prefix: / }}
        cluster: backend
clusters:
  backend:
    endpoints: [{app}, {doomed}]
    outlier: {{ consecutive_failures: 2, ejection_time: 10m }}
bridge:
  address: 127.0.0.1:0
  api_token: {TOKEN}
  resources: {resources}
",
        app = healthy.address(),
        doomed = doomed_address,
        cert = cert.display(),
        key = key.display(),
        resources = resources.path().display(),
    );
    let sc = Sidecar::start(&config);
    sc.wait_ready();

    // Traffic, then one upstream dies: its connect errors eject it.
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(sc.listener_url("egress", "/shop"), stop.clone());
    let published = client()
        .post(sc.bridge_url("/v1.0/publish/pubsub/orders"))
        .header("dapr-api-token", TOKEN)
        .json(&serde_json::json!({"id": 1}))
        .send()
        .unwrap();
    let code = published.status();
    assert_eq!(
        code,
        204,
        "{}\n{}",
        published.text().unwrap_or_default(),
        sc.diagnostics()
    );
    drop(doomed);
    let backend = |s: &serde_json::Value| {
        s["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "backend")
            .cloned()
            .unwrap_or_default()
    };
    let mut last = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = sc.get_json("/status");
        let ejected = backend(&s)["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["address"] == doomed_address.as_str() && e["state"] == "ejected");
        let delivered = s["bridge"]["subscriptions"][0]["delivered"]["success"]
            .as_f64()
            .is_some_and(|n| n >= 1.0);
        if ejected && delivered {
            break s;
        }
        last = s;
        assert!(
            std::time::Instant::now() < deadline,
            "the dead endpoint was not ejected or the event not delivered: {last:#}\n{}",
            sc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = last;

    // /status, as scripts read it.
    assert_eq!(status["service"], "shop");
    let cluster = backend(&status);
    let endpoints = cluster["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2, "{status:#}");
    let alive = endpoints
        .iter()
        .find(|e| e["address"] == healthy.address().as_str())
        .unwrap();
    assert_eq!(alive["state"], "healthy", "{status:#}");
    assert!(alive["ewma_ms"].as_f64().unwrap() > 0.0);
    let certs = status["tls"]["certificates"].as_array().unwrap();
    let web = certs
        .iter()
        .find(|c| c["owner"] == "listener/public")
        .unwrap_or_else(|| panic!("no certificate for listener/public: {status:#}"));
    assert_eq!(web["state"], "expiring", "{web}");
    let days = web["days_left"].as_f64().unwrap();
    assert!((2.9..=3.0).contains(&days), "{web}");
    assert!(
        web["identities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == "spiffe://example.org/ns/shop/sa/web"),
        "{web}"
    );
    let route = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "api")
        .unwrap_or_else(|| panic!("no route api: {status:#}"));
    assert!(route["requests"].as_f64().unwrap() > 0.0);
    assert!(
        status["errors"]["totals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["error"] == "connect"),
        "the dead endpoint's connect errors are listed: {status:#}"
    );
    let modules = status["modules"].as_array().unwrap();
    for m in modules {
        let expected = if m["name"] == "logs" { "off" } else { "ready" };
        assert_eq!(m["state"], expected, "{m}");
    }
    assert_eq!(status["logs"]["enabled"], false);
    assert_eq!(status["bridge"]["ready"], true);
    assert_eq!(status["history"]["capacity"], 300);
    // Nothing /config redacts shows here.
    let (_, text) = sc.get("/status");
    assert!(
        !text.contains(TOKEN),
        "the bridge token leaked into /status"
    );
    let (_, config) = sc.get("/config");
    assert!(!config.contains(TOKEN) && config.contains("<redacted>"));

    // The page in a browser.
    let Some((script, chromium)) = browser() else {
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap();
        return;
    };
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = crate::support::output_within(
        Command::new("node")
            .arg(&script)
            .env("ADMIN_URL", sc.url(""))
            .env("CHROMIUM", &chromium)
            .env("OUT_DIR", &out_dir)
            .env("EJECTED", format!("backend/{doomed_address}"))
            .env("HEALTHY", format!("backend/{}", healthy.address()))
            .env("EXPIRING", "listener/public")
            .env("ROUTE", "egress/api")
            .env("SECRET", TOKEN),
        Duration::from_secs(90),
    );
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "the browser check failed ({:?}, {sent} requests sent)\n--- stdout\n{stdout}\n--- stderr\n{}\n--- sidecar\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sc.diagnostics()
    );
    eprintln!("dashboard: {stdout}screenshots in {}", out_dir.display());
    assert!(out_dir.join("dashboard.png").is_file());
}
