//! Config errors and overrides, through the real binary: every problem reported with its
//! file:line:column, exit code 78, nothing started.

use crate::support::{BIN, Spawn, run_to_end};

/// Runs `outrigger run` (and `check`) on `config`; asserts exit 78 with each `expected` line in
/// stderr, and that nothing was bound. Returns stderr.
pub fn rejected(config: &str, expected: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, config).unwrap();
    let listeners = dir.path().join("listeners.json");
    let (code, _, stderr) = run_to_end(
        &[
            "run",
            "-c",
            path.to_str().unwrap(),
            "--listeners-file",
            listeners.to_str().unwrap(),
            "--",
            "touch",
            "app-started",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 78, "{BIN} run: expected exit 78, stderr:\n{stderr}");
    assert!(
        !listeners.exists(),
        "listeners were bound despite a bad config"
    );
    assert!(
        !dir.path().join("app-started").exists(),
        "the app was started despite a bad config"
    );
    for e in expected {
        assert!(stderr.contains(e), "missing `{e}` in stderr:\n{stderr}");
    }
    let (code, _, check_stderr) =
        run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "check: {check_stderr}");
    assert_eq!(
        check_stderr, stderr,
        "run and check report the same problems"
    );
    stderr
}

#[test]
fn unknown_key() {
    let e = rejected(
        "admin:\n  adress: 127.0.0.1:9901\n",
        &["bad.yaml:2:3: admin.adress: unknown field `adress`, expected `address`"],
    );
    assert!(e.contains("invalid configuration (1 problem)"), "{e}");
}

#[test]
fn bad_address() {
    rejected(
        "admin:\n  address: localhost:99999\n",
        &[
            "bad.yaml:2:12: admin.address: invalid value: string \"localhost:99999\", expected a TCP address like 127.0.0.1:9901",
        ],
    );
}

#[test]
fn bad_duration() {
    rejected(
        "runtime:\n  shutdown_grace: 30\n",
        &[
            "bad.yaml:2:19: runtime.shutdown_grace: invalid value: integer `30`, expected a duration with a unit, like 250ms, 30s or 1m30s",
        ],
    );
}

#[test]
fn wrong_type() {
    rejected(
        "runtime:\n  worker_threads: [1]\n",
        &["bad.yaml:2:19: runtime.worker_threads: invalid type: sequence, expected usize"],
    );
}

#[test]
fn every_problem_at_once() {
    let e = rejected(
        "service: checkout\nadmin:\n  address: nowhere\nruntime:\n  worker_threads: two\n  shutdown_grace: soon\nlog:\n  format: xml\nextra: 1\n",
        &[
            "invalid configuration (5 problems)",
            "bad.yaml:3:12: admin.address: invalid value",
            "bad.yaml:5:19: runtime.worker_threads: invalid type: string \"two\", expected usize",
            "bad.yaml:6:19: runtime.shutdown_grace: invalid value: string \"soon\"",
            "bad.yaml:8:11: log.format: unknown variant `xml`, expected `human` or `json`",
            "bad.yaml:9:1: extra: unknown field `extra`",
        ],
    );
    // In file order.
    let lines: Vec<&str> = e.lines().filter(|l| l.contains("bad.yaml:")).collect();
    let mut sorted = lines.clone();
    sorted.sort_by_key(|l| l.split(':').nth(1).unwrap().parse::<u32>().unwrap());
    assert_eq!(lines, sorted);
}

#[test]
fn semantic_and_syntax_problems() {
    rejected(
        "runtime:\n  worker_threads: 0\nlog:\n  level: 'info,,=['\n",
        &[
            "bad.yaml:2:19: runtime.worker_threads: expected a number of threads from 1 to 64, found 0",
            "bad.yaml:4:10: log.level: expected a log filter",
        ],
    );
    rejected("admin: [unclosed\n", &["bad.yaml:2:1: invalid YAML"]);
}

#[test]
fn missing_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_to_end(&["run", "-c", "nope.yaml"], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("nope.yaml: cannot read the config file"),
        "{stderr}"
    );
}

#[test]
fn bad_overrides_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_to_end(
        &[
            "check",
            "--set",
            "runtime.worker_threads=many",
            "--set",
            "admin.port=1",
        ],
        &[("OUTRIGGER_ADMIN_ADDRESS", "somewhere")],
        dir.path(),
    );
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("env OUTRIGGER_ADMIN_ADDRESS: admin.address: invalid value"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--set runtime.worker_threads: runtime.worker_threads: invalid type"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--set admin.port: admin.port: unknown field `port`"),
        "{stderr}"
    );
}

#[test]
fn overrides_reach_the_running_config() {
    let sc = Spawn {
        config: "service: from-file\nlog:\n  level: info\n",
        args: &["--set", "log.level=warn", "--log-format", "json"],
        env: &[("OUTRIGGER_SERVICE", "from-env")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let c = sc.get_json("/config");
    assert_eq!(c["config"]["service"], "from-env", "{c}");
    assert_eq!(c["config"]["log"]["level"], "warn", "{c}");
    assert_eq!(c["config"]["log"]["format"], "json", "{c}");
}

#[test]
fn json_logs_are_json() {
    let mut sc = Spawn {
        config: "",
        args: &["--log-format", "json"],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(std::time::Duration::from_secs(10));
    let stderr = sc.stderr();
    assert!(!stderr.is_empty());
    for line in stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        stderr.contains("\"message\":\"admin listening\""),
        "{stderr}"
    );
}

#[test]
fn check_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), "service: checkout\n").unwrap();
    let (code, stdout, stderr) = run_to_end(
        &[
            "check",
            "-c",
            "c.yaml",
            "--set",
            "runtime.shutdown_grace=5s",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("service: checkout"), "{stdout}");
    assert!(stdout.contains("shutdown_grace: 5s"), "{stdout}");
    assert!(stdout.contains("address: 127.0.0.1:9901"), "{stdout}");
    assert!(stderr.contains("configuration is valid"), "{stderr}");
}

#[test]
fn cli_basics() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run_to_end(&["version"], &[], dir.path());
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with(&format!("outrigger {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    let (code, stdout, _) = run_to_end(&["--help"], &[], dir.path());
    assert_eq!(code, 0);
    assert!(stdout.contains("Examples:"), "{stdout}");
    let (code, _, stderr) = run_to_end(&["run", "--no-such-flag"], &[], dir.path());
    assert_eq!(code, 64, "{stderr}");
    let (code, _, stderr) = run_to_end(&["check", "--set", "novalue"], &[], dir.path());
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn the_example_config_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = run_to_end(&["check", "-c", "examples/outrigger.yaml"], &[], root);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("name: egress"), "{stdout}");
    let (code, stdout, stderr) = run_to_end(&["check", "-c", "examples/bridge.yaml"], &[], root);
    if cfg!(feature = "bridge") {
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("app_id: quickstart"), "{stdout}");
    } else {
        assert_eq!(code, 78, "{stderr}");
        assert!(stderr.contains("cargo feature `bridge`"), "{stderr}");
    }
    let (code, stdout, stderr) = run_to_end(&["check", "-c", "examples/logs.yaml"], &[], root);
    if cfg!(feature = "logs") {
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("redact"), "{stdout}");
    } else {
        assert_eq!(code, 78, "{stderr}");
        assert!(stderr.contains("cargo feature `logs`"), "{stderr}");
    }
}

#[test]
fn lifecycle_and_reload_errors_are_located() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "app:\n  command: [sleep, \"1\"]\n  probe: { http: healthz, interval: 0s }\n  stop_signal: SIGNOPE\n  forward_signals: [SIGTERM]\nreload:\n  - watch: /nonexistent/dir/file\n    action: { signal: HUP, restart: true }\n  - watch: .\n    action:\n      webhook: { url: \"ftp://example.com/\" }\n",
    )
    .unwrap();
    let (code, _, stderr) =
        crate::support::run_to_end(&["check", "-c", "bad.yaml"], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    for e in [
        "bad.yaml:3:18: app.probe.http: expected a path starting with '/', found \"healthz\"",
        "bad.yaml:4:16: app.stop_signal: expected a signal name like SIGHUP or SIGUSR1, found \"SIGNOPE\"",
        "bad.yaml:5:21: app.forward_signals[0]: SIGTERM cannot be forwarded",
        "bad.yaml:7:12: reload[0].watch: neither /nonexistent/dir/file nor its directory /nonexistent/dir exists",
        "bad.yaml:8:5: reload[0].action: expected exactly one of signal, webhook or restart, found 2",
        "bad.yaml:11:23: reload[1].action.webhook.url: expected an http:// or https:// URL with a host",
    ] {
        assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
    }
    // Supervision settings without an app to supervise.
    std::fs::write(
        dir.path().join("unsupervised.yaml"),
        "runtime:\n  shutdown_grace: 5s\n  drain_delay: 5s\napp:\n  address: 127.0.0.1:8080\n  restart: always\n  stop_timeout: 6s\nreload:\n  - watch: .\n    action: { signal: SIGHUP }\n",
    )
    .unwrap();
    let (code, _, stderr) =
        crate::support::run_to_end(&["check", "-c", "unsupervised.yaml"], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    for e in [
        "unsupervised.yaml:3:16: runtime.drain_delay: expected less than runtime.shutdown_grace (5s), found 5s",
        "unsupervised.yaml:6:12: app.restart: set, but there is no app.command",
        "unsupervised.yaml:7:17: app.stop_timeout: expected less than runtime.shutdown_grace (5s), found 6s",
        "unsupervised.yaml:10:5: reload[0].action: signal and restart act on the supervised app",
    ] {
        assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
    }
}

#[test]
fn tls_errors_are_located() {
    let pki = crate::tls::Pki::new();
    let (a_cert, _) = pki.issue("a", &[]);
    let (_, b_key) = pki.issue("b", &[]);
    let dir = pki.dir.path();
    std::fs::write(
        dir.join("bad.yaml"),
        format!(
            "app:\n  address: 127.0.0.1:8080\nlisteners:\n  - name: one\n    address: 127.0.0.1:0\n    tls: {{ cert: /nonexistent.crt, key: /nonexistent.key }}\n  - name: two\n    address: 127.0.0.1:0\n    tls: {{ cert: {}, key: {}, min_version: \"1.1\" }}\n    authz: [\"spiffe://example.org/ns/*/sa/x\"]\nclusters:\n  up:\n    endpoints: [127.0.0.1:1]\n    tls: {{ cert: {} }}\n",
            a_cert.display(),
            b_key.display(),
            a_cert.display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = crate::support::run_to_end(&["check", "-c", "bad.yaml"], &[], dir);
    assert_eq!(code, 78, "{stderr}");
    for e in [
        "bad.yaml:6:5: listeners[0].tls: cannot read /nonexistent.crt",
        "bad.yaml:9:5: listeners[1].tls: ",
        "does not belong to the certificate in",
        "listeners[1].tls.min_version: expected \"1.2\" or \"1.3\" (TLS 1.0 and 1.1 are not supported), found \"1.1\"",
        "bad.yaml:10:13: listeners[1].authz[0]: a SPIFFE ID may only end in /*",
        "listeners[1].authz: identities come from client certificates: set tls.client_ca too",
        "bad.yaml:14:5: clusters.up.tls: a client certificate needs both cert and key",
    ] {
        assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
    }
}

/// A token or header value written as a number was quoted in serde's type error: refused now
/// (YAML would change it: `0042` is 42) with a message that never repeats it.
#[test]
fn secrets_written_as_numbers_are_never_echoed() {
    let bridge = if cfg!(feature = "bridge") {
        "bridge:\n  api_token: 4242424242\n"
    } else {
        ""
    };
    let e = rejected(
        &format!(
            "{bridge}telemetry:\n  tracing:\n    otlp:\n      endpoint: http://collector:4318\n      headers: {{ authorization: 4343434343, x-key: [4444444444], x-other: 0x1F }}\n"
        ),
        &[
            "telemetry.tracing.otlp.headers.authorization: expected a string, found a number: write the secret in quotes",
            "telemetry.tracing.otlp.headers.x-key: expected a string, found a list",
        ],
    );
    for secret in ["4242424242", "4343434343", "4444444444", "0x1F"] {
        assert!(!e.contains(secret), "{secret} echoed in:\n{e}");
    }
    // Too large for any integer type: YAML itself refuses it, without repeating it.
    let e = rejected(
        "telemetry:\n  tracing:\n    otlp:\n      endpoint: http://collector:4318\n      headers: { authorization: 1234567890123456789012345 }\n",
        &["invalid YAML"],
    );
    assert!(!e.contains("1234567890123456789012345"), "{e}");
}

#[test]
fn telemetry_errors_are_located() {
    rejected(
        "telemetry:\n  tracing:\n    sample: 2\n    otlp: ftp://collector\n  access_log:\n    to: stdout\n    format: '{method} {pathh}'\n",
        &[
            "bad.yaml:3:13: telemetry.tracing.sample: expected a ratio from 0 to 1, found 2",
            "bad.yaml:4:11: telemetry.tracing.otlp: expected an http:// or https:// URL with a host",
            "bad.yaml:7:13: telemetry.access_log.format: expected json or a format string: unknown field {pathh}",
        ],
    );
    rejected(
        "telemetry:\n  tracing:\n    otlp:\n      endpoint: http://collector:4318\n      ca: /nonexistent/ca.pem\n      timeout: 0s\n",
        &[
            "bad.yaml:5:11: telemetry.tracing.otlp.ca: a CA bundle needs an https:// endpoint",
            "bad.yaml:6:16: telemetry.tracing.otlp.timeout: expected more than 0s",
        ],
    );
    // An https collector's CA is read by the preflight stage, located the same way.
    rejected(
        "telemetry:\n  tracing:\n    otlp:\n      endpoint: https://collector:4318\n      ca: /nonexistent/ca.pem\n",
        &["bad.yaml:5:11: telemetry.tracing.otlp.ca: cannot read /nonexistent/ca.pem"],
    );
    rejected(
        "telemetry:\n  tracing:\n    otlp: http://user:s3cret@collector:4318\n",
        &["bad.yaml:3:11: telemetry.tracing.otlp: expected no credentials in the URL"],
    );
    // The map form's own mistakes are named (not "did not match any variant").
    let e = rejected(
        "telemetry:\n  tracing:\n    otlp: { endpoint: 'http://collector:4318', timout: 5s }\n",
        &["unknown field `timout`"],
    );
    assert!(!e.contains("s3cret"));
}

/// A huge, deep or wide config was parsed at any cost before being refused (a 200 KB file of
/// `[` took 19 s, a 111 MB one 4.9 GB): now each is refused at its limit, naming the file.
#[test]
fn huge_deep_and_wide_configs_are_refused_at_their_limits() {
    // 2 MiB of comments: valid YAML, and read whole before.
    let huge = "# padding\n".repeat(2 * 1024 * 1024 / 10);
    rejected(
        &huge,
        &["bad.yaml: cannot read the config file: the file is larger than 1 MiB"],
    );
    let deep = format!("listeners: {}{}\n", "[".repeat(20_000), "]".repeat(20_000));
    rejected(
        &deep,
        &[
            "bad.yaml:1:",
            "mappings and sequences nest more than 32 levels deep here",
        ],
    );
    let wide = format!("service: a\nlog: [{}1]\n", "1, ".repeat(100_000));
    rejected(
        &wide,
        &[
            "bad.yaml:2:",
            "more than 100000 keys and values; that is the limit for one file",
        ],
    );
}

/// Resource files in `bridge.resources` have the same limits, named by their own file.
#[cfg(feature = "bridge")]
#[test]
fn huge_and_deep_resource_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let components = dir.path().join("components");
    std::fs::create_dir(&components).unwrap();
    std::fs::write(
        components.join("big.yaml"),
        "# padding\n".repeat(2 * 1024 * 1024 / 10),
    )
    .unwrap();
    std::fs::write(
        components.join("deep.yaml"),
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{ name: x }}\nspec: {}{}\n",
            "{a: ".repeat(20_000),
            "}".repeat(20_000)
        ),
    )
    .unwrap();
    let config = dir.path().join("outrigger.yaml");
    std::fs::write(&config, "bridge:\n  resources: ./components\n").unwrap();
    let (code, _, stderr) = run_to_end(&["check", "-c", config.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("big.yaml: cannot read the resource file: the file is larger than 1 MiB"),
        "{stderr}"
    );
    assert!(
        stderr.contains("deep.yaml:4:") && stderr.contains("nest more than 32 levels deep"),
        "{stderr}"
    );
}

/// A Subscription document's problem had no line (`./res/subs.yaml: Subscription "bad": …`):
/// it is now located at the document's first key.
#[cfg(feature = "bridge")]
#[test]
fn a_subscription_problem_is_located_at_its_document() {
    let dir = tempfile::tempdir().unwrap();
    let components = dir.path().join("components");
    std::fs::create_dir(&components).unwrap();
    std::fs::write(
        components.join("subs.yaml"),
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: ok}\nspec: {topic: a, route: /a, pubsubname: pubsub}\n---\n# the second\napiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: bad}\nspec:\n  topic: b\n  pubsubname: pubsub\n  routes:\n    rules:\n      - {match: 'event.type == ', path: /x}\n",
    )
    .unwrap();
    let config = dir.path().join("outrigger.yaml");
    std::fs::write(&config, "bridge:\n  resources: ./components\n").unwrap();
    let (code, _, stderr) = run_to_end(&["check", "-c", config.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("components/subs.yaml:7:1: Subscription \"bad\": topic \"b\": rule match"),
        "{stderr}"
    );
}

/// `http2_server` takes `hyper` or `outrigger` on HTTP listeners: any other value, and the key
/// on a tcp listener, are refused with their location, every one of them at once (exit 78 for
/// `run` and `check`).
#[test]
fn http2_server_is_hyper_or_outrigger_on_http_listeners() {
    rejected(
        "app:\n  address: 127.0.0.1:8080\nlisteners:\n  - name: one\n    address: 127.0.0.1:0\n    http2_server: nghttp2\n  - name: two\n    address: 127.0.0.1:0\n    http2_server: outrigger\n  - name: three\n    address: 127.0.0.1:0\n    protocol: tcp\n    http2_server: hyper\n  - name: four\n    address: 127.0.0.1:0\n    http2_server: [hyper]\n",
        &[
            "invalid configuration (3 problems)",
            "bad.yaml:6:19: listeners[0].http2_server: unknown variant `nghttp2`, expected `hyper` or `outrigger`",
            "bad.yaml:13:19: listeners[2].http2_server: a tcp listener speaks no HTTP; `http2_server` is for http listeners",
            "bad.yaml:16:19: listeners[3].http2_server: invalid type: sequence",
        ],
    );
}
