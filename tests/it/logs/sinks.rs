//! Log sinks over HTTPS (certificates from `outrigger certs`, a TLS receiver in the test), and
//! each sink's state in `/ready` and `/status`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Receiver, WAIT, append, assert_once, expected};
use crate::support::{Sidecar, eventually};
use crate::tls::Pki;

/// A rustls server config presenting `cert`/`key`.
fn server_config(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// The base URL (no path) of a receiver.
fn base(r: &Receiver) -> String {
    r.url.trim_end_matches("/ingest").to_string()
}

#[test]
fn https_sinks_verify_the_collector_and_a_wrong_ca_is_retried_without_loss() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("collector", &[]);
    let other = pki.other_ca("wrong").join("ca.crt");
    let tls = server_config(&cert, &key);
    let rxs: Vec<Receiver> = (0..4)
        .map(|_| Receiver::start_on(Some(tls.clone())))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 500, "s");
    let config = |ca: &Path| {
        format!(
            "logs:\n  sources: [{{files: {}/*.log, format: plain}}]\n  sinks:\n    - http: {}\n      tls: {{ca: {ca}}}\n    - loki: {}\n      tls: {{ca: {ca}}}\n    - otlp: {}\n      tls: {{ca: {ca}, server_name: localhost}}\n    - elasticsearch: {}\n      index: logs-test-default\n      tls: {{ca: {ca}}}\n  checkpoint: {}/checkpoint.json\n  poll: 50ms\n  batch: {{max_lines: 100, max_wait: 50ms, retry_max: 200ms}}\n",
            dir.path().display(),
            rxs[0].url,
            base(&rxs[1]),
            base(&rxs[2]),
            base(&rxs[3]),
            dir.path().display(),
            ca = ca.display(),
        )
    };

    // Trusting another CA: every handshake fails; the attempts are retried, the sink shows as
    // failing in /ready (which stays 200), and nothing is taken, dropped or checkpointed.
    let mut sc = Sidecar::start(&config(&other));
    let ready = eventually(WAIT, "the sinks failing in /ready", || {
        let r = sc.get_json("/ready");
        (r["log_sinks"]["http"]["failed_attempts"].as_u64() >= Some(3)).then_some(r)
    });
    assert_eq!(sc.get("/ready").0, 200, "{ready}");
    let http = &ready["log_sinks"]["http"];
    assert!(
        ["retrying", "down"].contains(&http["state"].as_str().unwrap()),
        "{ready}"
    );
    assert!(
        http["last_error"].as_str().unwrap().contains("certificate"),
        "{ready}"
    );
    assert!(sc.metric("outrigger_logs_sink_retries_total{sink=\"loki\"}") >= 1.0);
    assert_eq!(sc.metric("outrigger_logs_sink_up{sink=\"http\"}"), 0.0);
    assert!(rxs.iter().all(|r| r.records().is_empty()));
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(WAIT);

    // The right CA: every line reaches each of the four sinks once.
    append(&log, 500, 700, "s");
    let sc = Sidecar::start(&config(&pki.ca()));
    let want = expected(0, 700, "s");
    for r in &rxs {
        let counts = r.wait_for(&want);
        assert_once(&counts, &want, &sc);
    }
    let ready = sc.get_json("/ready");
    for sink in ["http", "loki", "otlp", "elasticsearch"] {
        assert_eq!(ready["log_sinks"][sink]["state"], "up", "{ready}");
    }
    assert_eq!(sc.metric("outrigger_logs_sink_up{sink=\"otlp\"}"), 1.0);
}

#[test]
fn ready_and_status_show_a_sink_down_without_failing_readiness() {
    let rx = Receiver::start();
    rx.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    append(&dir.path().join("app.log"), 0, 50, "d");
    let sc = Sidecar::start(&super::files_config(dir.path(), &rx.url, ""));
    // retry_max is 200ms: failing longer than that is `down`.
    let ready = eventually(WAIT, "the sink down", || {
        let r = sc.get_json("/ready");
        (r["log_sinks"]["http"]["state"] == "down").then_some(r)
    });
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(sc.get("/ready").0, 200);
    assert!(ready["log_sinks"]["http"]["since"].is_string(), "{ready}");
    assert!(
        ready["log_sinks"]["http"]["last_error"]
            .as_str()
            .unwrap()
            .contains("503"),
        "{ready}"
    );
    let status = sc.get_json("/status");
    assert_eq!(status["logs"]["sinks"]["http"]["state"], "down", "{status}");
    rx.failing.store(false, Ordering::SeqCst);
    let want = expected(0, 50, "d");
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
    let ready = eventually(WAIT, "the sink up again", || {
        let r = sc.get_json("/ready");
        (r["log_sinks"]["http"]["state"] == "up").then_some(r)
    });
    assert!(ready["log_sinks"]["http"]["last_success"].is_string());
    assert!(ready["log_sinks"]["http"].get("since").is_none());
}

#[test]
fn tls_keys_of_log_sinks_with_problems_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "logs:\n  sources: [{files: /tmp/x/*.log}]\n  sinks:\n    - http: http://127.0.0.1:1/x\n      tls: {ca: /nowhere/ca.crt}\n    - file: /tmp/x.out\n      tls: {}\n    - name: a\n      loki: https://127.0.0.1:1\n      tls: {ca: /nowhere/ca.crt}\n    - name: b\n      otlp: https://127.0.0.1:1\n      tls: {cert: /a.crt}\n    - name: c\n      http: ftp://example.com/x\n",
    )
    .unwrap();
    let (code, _, err) =
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{err}");
    for (line, what) in [
        (5, "tls needs an https:// URL"),
        (7, "tls applies to the HTTP sinks only"),
        (13, "needs both cert and key"),
        (15, "expected an http:// or https:// URL"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("bad.yaml:{line}:")) && l.contains(what)),
            "line {line}: {what}\n{err}"
        );
    }

    // The files themselves are read by preflight: located at the sink's tls.
    std::fs::write(
        &path,
        "logs:\n  sources: [{files: /tmp/x/*.log}]\n  sinks:\n    - loki: https://127.0.0.1:1\n      tls: {ca: /nowhere/ca.crt}\n",
    )
    .unwrap();
    let (code, _, err) =
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{err}");
    assert!(
        err.lines().any(|l| l.contains("bad.yaml:5:")
            && l.contains("logs.sinks[0].tls")
            && l.contains("/nowhere/ca.crt")),
        "{err}"
    );
}

#[test]
fn the_access_log_ships_through_the_pipeline_redacted_and_enriched_once_per_request() {
    let rx = Receiver::start();
    let app = crate::backend::Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\ntelemetry:\n  access_log: {{ to: {}/access.log }}\nlogs:\n  sources: [{{access_log: true}}]\n  sinks: [{{http: {}}}]\n  fields: {{env: test}}\n  redact: [{{pattern: 'tok-[a-z]+', mask: 'tok-***'}}]\n  batch: {{max_lines: 64, max_wait: 50ms}}\n",
        app.address(),
        dir.path().display(),
        rx.url
    );
    let sc = Sidecar::start(&config);
    sc.wait_ready();
    let client = crate::support::client();
    for i in 0..200 {
        let r = client
            .get(sc.listener_url("public", &format!("/r/{i}/tok-abc")))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    let want: Vec<String> = (0..200).map(|i| format!("/r/{i}/tok-***")).collect();
    let counts = eventually(WAIT, "every request's access log line", || {
        let c = rx.counts("path");
        want.iter().all(|p| c.contains_key(p)).then_some(c)
    });
    assert_once(&counts, &want, &sc);
    for r in rx.records() {
        assert_eq!(r["source"], "access_log", "{r}");
        assert_eq!(r["stream"], "access", "{r}");
        assert_eq!(r["env"], "test", "{r}");
        assert_eq!(r["method"], "GET", "{r}");
        assert_eq!(r["trace_id"].as_str().unwrap().len(), 32, "{r}");
    }
    assert_eq!(
        sc.metric("outrigger_logs_read_lines_total{source=\"access_log\"}"),
        200.0
    );
}

#[test]
fn an_access_log_source_without_an_access_log_is_refused_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "logs:\n  sources:\n    - access_log: true\n      start_at: end\n  sinks: [{stdout: true}]\n",
    )
    .unwrap();
    let (code, _, err) =
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("bad.yaml:3:") && l.contains("set telemetry.access_log")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("bad.yaml:4:") && l.contains("does not apply to the access log")),
        "{err}"
    );
}

/// `_bulk` documents carry an `_id` from where their line was read: a batch whose answer was
/// lost is sent again and answered 409 per item (counted as taken, not stored twice), and the
/// batch read again after a `kill -9` is not stored twice either.
#[test]
fn bulk_ids_make_a_resent_batch_and_a_reread_after_a_kill_conflict_instead_of_doubling() {
    let es = Receiver::start();
    es.limits.lose_answers.store(2, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 20_000, "e");
    let config = format!(
        "logs:\n  sources: [{{files: {}/*.log, format: plain}}]\n  sinks:\n    - elasticsearch: {}\n      index: logs-test-default\n  checkpoint: {}/checkpoint.json\n  poll: 50ms\n  batch: {{max_lines: 100, max_wait: 50ms, retry_max: 200ms}}\n",
        dir.path().display(),
        es.url.trim_end_matches("/ingest"),
        dir.path().display()
    );
    let mut sc = Sidecar::start(&config);
    // Past the two lost answers, and a few batches further: kill -9 (no last checkpoint).
    eventually(WAIT, "a few batches stored", || {
        (es.limits.conflicts.load(Ordering::SeqCst) >= 100 && es.records().len() >= 300)
            .then_some(())
    });
    sc.signal(nix::sys::signal::Signal::SIGKILL);
    sc.wait_exit(WAIT);
    let conflicts = es.limits.conflicts.load(Ordering::SeqCst);
    let sc = Sidecar::start(&config);
    let want = expected(0, 20_000, "e");
    let counts = es.wait_for(&want);
    assert_once(&counts, &want, &sc);
    eprintln!(
        "conflicts: {conflicts} for the resent batches, {} after the restart",
        es.limits.conflicts.load(Ordering::SeqCst) - conflicts
    );
    // Answered 409 is taken: shipped, not retried again and again.
    eventually(WAIT, "every line counted as shipped", || {
        (sc.metric("outrigger_logs_checkpoint_lag_bytes") == 0.0).then_some(())
    });
}

#[test]
fn an_https_sink_presents_its_client_certificate_to_a_collector_that_requires_one() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pki = Pki::new();
    let (cert, key) = pki.issue("collector", &[]);
    let (client_cert, client_key) = pki.issue("shipper", &[]);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.ca()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                CertificateDer::pem_file_iter(&cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_file(&key).unwrap(),
            )
            .unwrap(),
    );
    let rx = Receiver::start_on(Some(tls));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 200, "m");
    let config = |client: &str| {
        format!(
            "logs:\n  sources: [{{files: {}/*.log, format: plain}}]\n  sinks:\n    - http: {}\n      tls: {{ca: {}{client}}}\n  checkpoint: {}/checkpoint.json\n  poll: 50ms\n  batch: {{max_lines: 100, max_wait: 50ms, retry_max: 200ms}}\n",
            dir.path().display(),
            rx.url,
            pki.ca().display(),
            dir.path().display(),
        )
    };

    // Without a client certificate the collector refuses every handshake: retried, nothing lost.
    let mut sc = Sidecar::start(&config(""));
    eventually(WAIT, "the sink failing", || {
        let r = sc.get_json("/ready");
        (r["log_sinks"]["http"]["failed_attempts"].as_u64() >= Some(2)).then_some(())
    });
    assert!(rx.records().is_empty());
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(WAIT);

    // With one: every line arrives once.
    let sc = Sidecar::start(&config(&format!(
        ", cert: {}, key: {}",
        client_cert.display(),
        client_key.display()
    )));
    let want = expected(0, 200, "m");
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
    assert_eq!(sc.get_json("/ready")["log_sinks"]["http"]["state"], "up");
}

/// `headers_env`: a sink's credential read from the environment reaches the collector and is
/// shown nowhere (`/config`, `/status`, the debug log); a variable not set, or holding what no
/// header value can (a Secret made with `echo` ends with a newline), is refused by `check` at
/// its line, naming the variable and the sink, never the value.
#[test]
fn a_sink_header_from_the_environment_is_sent_and_never_shown() {
    const SECRET: &str = "Bearer s3cr3t-from-env";
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, 0, 50, "h");
    let config = format!(
        "log:\n  level: debug\nlogs:\n  sources: [{{files: {}/*.log, format: plain}}]\n  sinks:\n    - name: collector\n      loki: {}\n      headers: {{X-Scope-OrgID: tenant-1}}\n      headers_env: {{Authorization: TEST_LOKI_AUTH}}\n  poll: 50ms\n  batch: {{max_wait: 50ms}}\n",
        dir.path().display(),
        base(&rx),
    );
    let sc = crate::support::Spawn {
        config: &config,
        env: &[("TEST_LOKI_AUTH", SECRET)],
        ..Default::default()
    }
    .start();
    let want = expected(0, 50, "h");
    assert_once(&rx.wait_for(&want), &want, &sc);
    let headers = rx.limits.headers.lock().unwrap().clone();
    let value = |name: &str| {
        headers
            .iter()
            .filter_map(|h| h.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    assert_eq!(
        value("authorization").as_deref(),
        Some(SECRET),
        "{headers:?}"
    );
    assert_eq!(
        value("x-scope-orgid").as_deref(),
        Some("tenant-1"),
        "{headers:?}"
    );
    let (_, shown) = sc.get("/config");
    assert!(shown.contains("<redacted: env TEST_LOKI_AUTH>"), "{shown}");
    for path in ["/config", "/status", "/ready"] {
        let (_, body) = sc.get(path);
        assert!(
            !body.contains("s3cr3t") && !body.contains("tenant-1"),
            "{path}: {body}"
        );
    }
    let output = format!("{}{}", sc.stdout(), sc.stderr());
    assert!(
        output.contains("DEBUG") || output.contains("\"debug\""),
        "the debug log is on"
    );
    assert!(!output.contains("s3cr3t"), "{output}");

    // A reload to a variable not set is refused at its line; the sink keeps its header.
    std::fs::write(
        &sc.config_path,
        config.replace("TEST_LOKI_AUTH", "TEST_LOKI_MISSING"),
    )
    .unwrap();
    crate::support::client()
        .post(sc.url("/reload"))
        .send()
        .unwrap();
    eventually(WAIT, "the refused reload", || {
        (sc.metric("outrigger_config_reloads_total{result=\"failure\"}") >= 1.0).then_some(())
    });
    let errors = sc.get_json("/config")["last_reload"]["errors"].to_string();
    assert!(
        errors.contains("outrigger.yaml:9:")
            && errors.contains("TEST_LOKI_MISSING, which is not set"),
        "{errors}"
    );
    rx.limits.headers.lock().unwrap().clear();
    append(&log, 50, 60, "h");
    let want = expected(0, 60, "h");
    assert_once(&rx.wait_for(&want), &want, &sc);
    let headers = rx.limits.headers.lock().unwrap().clone();
    assert!(
        headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&format!("authorization: {SECRET}"))),
        "{headers:?}"
    );
    assert_eq!(
        sc.metric("outrigger_config_reloads_total{result=\"success\"}"),
        0.0
    );

    let path = dir.path().join("outrigger.yaml");
    std::fs::write(&path, &config).unwrap();
    let check = |env: &[(&str, &str)]| {
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], env, dir.path())
    };
    let (code, _, err) = check(&[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.lines().any(|l| l.contains("outrigger.yaml:9:")
            && l.contains("logs.sinks[0].headers_env.Authorization")
            && l.contains("\"collector\"")
            && l.contains("TEST_LOKI_AUTH, which is not set")),
        "{err}"
    );
    let (code, _, err) = check(&[("TEST_LOKI_AUTH", "Bearer s3cr3t\n")]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("outrigger.yaml:9:") && err.contains("ends with a newline"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t"), "{err}");
    let (code, out, err) = check(&[("TEST_LOKI_AUTH", SECRET)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("s3cr3t") && !err.contains("s3cr3t"),
        "{out}{err}"
    );
}
