//! Dapr's gRPC API, end to end, with the official Python SDK unmodified (`tests/py`: `dapr`
//! pinned in a venv the test creates when `.ci/run` has not): state on Redis, SQLite and memory;
//! publish and streaming subscriptions over Redis Streams, JetStream and in-memory; secrets,
//! metadata, invocation, tokens, shutdown; our `.proto` files against the SDK's descriptors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::backend::Backend;
use crate::servers::{NatsServer, RedisServer};
use crate::support::{Sidecar, Spawn};

/// `tests/py/.venv/bin/python` with the pinned SDK, made on first use; None (after a loud
/// message) only when pip cannot reach PyPI.
fn python() -> Option<PathBuf> {
    crate::support::venv_python("tests/py", "the Dapr Python SDK tests")
}

/// The port of `host:port`.
fn port(address: &str) -> String {
    address.rsplit(':').next().unwrap().to_string()
}

/// Runs `sdk_client.py scenario args…` against the sidecar's gRPC address; returns stdout
/// (its last line is `{"ok": true, …}`) or fails with everything that helps. (Tests return
/// early, after `python()`'s loud message, when the SDK cannot be installed.)
fn scenario(sc: &Sidecar, env: &[(&str, &str)], args: &[&str]) -> Result<String, String> {
    let Some(python) = python() else {
        return Ok("{\"ok\": true, \"skipped\": true}".into());
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/sdk_client.py");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let http = sc.bridge.clone().expect("the bridge runs");
    let out = crate::support::output_within(
        Command::new(python)
            .arg(script)
            .args(args)
            .env("DAPR_GRPC_PORT", port(&grpc))
            .env("DAPR_HTTP_PORT", port(&http))
            .env("DAPR_API_METHOD_INVOCATION_PROTOCOL", "grpc")
            .env_remove("DAPR_API_TOKEN")
            .envs(env.iter().copied()),
        Duration::from_secs(90),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success()
        && stdout
            .lines()
            .last()
            .is_some_and(|l| l.contains("\"ok\": true"))
    {
        Ok(stdout)
    } else {
        Err(format!(
            "sdk_client.py {args:?} failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n--- sidecar\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            sc.diagnostics()
        ))
    }
}

/// A sidecar with `components` (YAML documents) in its resources dir and `extra` config.
fn sidecar(extra: &str, components: &str) -> Sidecar {
    let resources = tempfile::tempdir().unwrap().keep();
    std::fs::write(resources.join("components.yaml"), components).unwrap();
    let config = format!(
        "service: pyapp\nbridge:\n  address: 127.0.0.1:0\n  resources: {}\n{extra}",
        resources.display()
    );
    let sc = Spawn {
        config: &config,
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    sc
}

fn component(name: &str, kind: &str, metadata: &[(&str, &str)]) -> String {
    let mut doc = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n"
    );
    doc.push_str(if metadata.is_empty() {
        "  metadata: []\n"
    } else {
        "  metadata:\n"
    });
    for (k, v) in metadata {
        doc.push_str(&format!("  - name: {k}\n    value: \"{v}\"\n"));
    }
    doc.push_str("---\n");
    doc
}

#[test]
fn python_sdk_state_on_redis_sqlite_and_memory() {
    if python().is_none() {
        return;
    }
    let redis = RedisServer::start();
    let db = tempfile::tempdir().unwrap();
    let components = [
        component("statestore", "state.in-memory", &[]),
        component("redis", "state.redis", &[("redisHost", &redis.host())]),
        component(
            "sqlite",
            "state.sqlite",
            &[(
                "connectionString",
                &db.path().join("state.db").display().to_string(),
            )],
        ),
    ]
    .concat();
    // gRPC on the HTTP API's own port (no grpc_address: one port for both).
    let sc = sidecar("", &components);
    assert_eq!(sc.bridge, sc.bridge_grpc, "one port for both APIs");
    for store in ["statestore", "redis", "sqlite"] {
        scenario(&sc, &[], &["state", store]).unwrap_or_else(|e| panic!("{e}"));
    }
    // What gRPC wrote, HTTP reads (one core): the raw bytes come back.
    let r = crate::support::client()
        .get(sc.bridge_url("/v1.0/state/redis/k1"))
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "v4");
    // Every call was counted in the bridge's metrics, by building block.
    assert!(
        sc.metric("outrigger_bridge_requests_total{api=\"state\",status_class=\"2xx\"}") > 10.0
    );
    assert!(
        sc.metric("outrigger_bridge_requests_total{api=\"state\",status_class=\"4xx\"}") >= 3.0
    );
}

#[test]
fn python_sdk_streaming_subscriptions_on_redis_jetstream_and_memory() {
    if python().is_none() {
        return;
    }
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let components = [
        component("memory", "pubsub.in-memory", &[]),
        component("redis", "pubsub.redis", &[("redisHost", &redis.host())]),
        component(
            "js",
            "pubsub.jetstream",
            &[("natsURL", &nats.url()), ("ackWait", "2s")],
        ),
    ]
    .concat();
    // gRPC on a socket of its own.
    let sc = sidecar("  grpc_address: 127.0.0.1:0\n", &components);
    assert_ne!(sc.bridge, sc.bridge_grpc);
    for pubsub in ["memory", "redis", "js"] {
        scenario(&sc, &[], &["pubsub", pubsub]).unwrap_or_else(|e| panic!("{e}"));
    }
    // Streams that ended leave no subscription behind (their ends are handled as they close).
    crate::support::eventually(Duration::from_secs(10), "no subscription left", || {
        let md: serde_json::Value = crate::support::client()
            .get(sc.bridge_url("/v1.0/metadata"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        (md["subscriptions"] == serde_json::json!([])).then_some(())
    });
}

#[test]
fn python_sdk_secrets_metadata_invocation_and_unimplemented_blocks() {
    if python().is_none() {
        return;
    }
    let backend = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.json");
    std::fs::write(
        &secrets,
        r#"{"db": {"user": "admin", "password": "s3cret"}}"#,
    )
    .unwrap();
    let components = [
        component("statestore", "state.in-memory", &[]),
        component(
            "secrets",
            "secretstores.local.file",
            &[
                ("secretsFile", &secrets.display().to_string()),
                ("multiValued", "true"),
            ],
        ),
    ]
    .concat();
    let extra = format!(
        "clusters:\n  echo:\n    endpoints: [{}]\n",
        backend.address()
    );
    let config_extra = format!("  grpc_address: 127.0.0.1:0\n{extra}");
    let sc = sidecar(&config_extra, &components);
    scenario(&sc, &[], &["misc", "echo"]).unwrap_or_else(|e| panic!("{e}"));
    // The invocation reached the callee as HTTP with the verb and path asked for.
    let seen = backend.seen();
    let call = seen
        .iter()
        .find(|s| s.path == "/echo/path")
        .unwrap_or_else(|| panic!("no invocation seen: {seen:?}"));
    assert_eq!(call.method, "POST");
    assert_eq!(call.body, b"ping");
    assert_eq!(call.header("content-type"), Some("text/plain"));
}

#[test]
fn python_sdk_with_an_api_token_and_shutdown() {
    if python().is_none() {
        return;
    }
    let mut sc = sidecar(
        "  api_token: s3cr3t-token\n",
        &component("statestore", "state.in-memory", &[]),
    );
    // The SDK sends DAPR_API_TOKEN as `dapr-api-token` metadata.
    scenario(
        &sc,
        &[("DAPR_API_TOKEN", "s3cr3t-token")],
        &["state", "statestore"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = scenario(
        &sc,
        &[("DAPR_API_TOKEN", "wrong")],
        &["state", "statestore"],
    )
    .expect_err("a wrong token is refused");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    // Shutdown over gRPC stops the sidecar gracefully.
    scenario(&sc, &[("DAPR_API_TOKEN", "s3cr3t-token")], &["shutdown"])
        .unwrap_or_else(|e| panic!("{e}"));
    let status = sc.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}\n{}", sc.diagnostics());
}

#[test]
fn a_dapr_ext_grpc_app_gets_events_and_invocations_over_its_app_callback() {
    let Some(python) = python() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/grpc_app.py");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let port = crate::servers::free_port();
    // The in-memory pubsub, and two cron input bindings: `tick`, which the app lists in
    // ListInputBindings, and `tock`, which it does not (never started).
    let resources = dir.path().join("components");
    std::fs::create_dir(&resources).unwrap();
    let component = |name: &str, kind: &str, metadata: &str| {
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n{metadata}"
        )
    };
    for (name, kind, metadata) in [
        ("pubsub", "pubsub.in-memory", "  metadata: []\n"),
        (
            "tick",
            "bindings.cron",
            "  metadata:\n  - {name: schedule, value: \"@every 1s\"}\n",
        ),
        (
            "tock",
            "bindings.cron",
            "  metadata:\n  - {name: schedule, value: \"@every 1s\"}\n",
        ),
    ] {
        std::fs::write(
            resources.join(format!("{name}.yaml")),
            component(name, kind, metadata),
        )
        .unwrap();
    }
    let config = format!(
        "service: gapp\napp:\n  address: 127.0.0.1:{port}\n  protocol: grpc\n  probe: {{ grpc: dapr }}\n  env: {{ APP_PORT: \"{port}\", OUT: \"{}\" }}\nbridge:\n  address: 127.0.0.1:0\n  resources: {}\n",
        out.display(),
        resources.display()
    );
    let sc = Spawn {
        config: &config,
        app: &[python.to_str().unwrap(), script.to_str().unwrap()],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    // The app's subscriptions came from ListTopicSubscriptions.
    let subscribed = |sc: &Sidecar| {
        let md: serde_json::Value = crate::support::client()
            .get(sc.bridge_url("/v1.0/metadata"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        md["subscriptions"].as_array().map_or(0, Vec::len)
    };
    crate::support::eventually(Duration::from_secs(30), "the app's subscriptions", || {
        (subscribed(&sc) == 2).then_some(())
    });
    for id in ["a", "retry-me", "drop-me"] {
        let r = crate::support::client()
            .post(sc.bridge_url("/v1.0/publish/pubsub/orders"))
            .json(&serde_json::json!({ "id": id }))
            .send()
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    // OnTopicEvent: success; retry then success; drop, then the dead-letter topic's handler.
    let lines = crate::support::eventually(Duration::from_secs(30), "the app's events", || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let done = text.contains(r#""id": "retry-me", "status": "success""#)
            && text.contains(r#""topic": "orders-dead", "id": "drop-me""#);
        done.then_some(text)
    });
    assert!(
        lines.contains(r#""id": "a", "status": "success""#),
        "{lines}"
    );
    assert!(
        lines.contains(r#""id": "retry-me", "status": "retry""#),
        "{lines}"
    );
    // OnBindingEvent: the listed cron binding ticks (twice), the other one never.
    let ticks = crate::support::eventually(Duration::from_secs(30), "two ticks", || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        (text.matches(r#""binding": "tick""#).count() >= 2).then_some(text)
    });
    assert!(ticks.contains(" +0000 UTC"), "{ticks}");
    assert!(
        sc.metric(r#"outrigger_bindings_input_events_total{binding="tick",result="success"}"#)
            >= 2.0
    );
    assert_eq!(
        sc.metric(r#"outrigger_bindings_input_events_total{binding="tock",result="success"}"#),
        0.0
    );
    // OnInvoke: an invocation of our own app id, over HTTP and over gRPC.
    let r = crate::support::client()
        .post(sc.bridge_url("/v1.0/invoke/gapp/method/hello"))
        .body("bob")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=UTF-8");
    assert_eq!(r.text().unwrap(), "hi bob");
    let r = crate::support::client()
        .post(sc.bridge_url("/v1.0/invoke/gapp/method/nope"))
        .body("x")
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        501,
        "an unknown method is the app's UNIMPLEMENTED"
    );
}

#[test]
fn our_proto_files_match_the_sdk_descriptors() {
    let Some(python) = python() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(root.join("tests/proto/check_protos.py"))
        .arg("--proto-root")
        .arg(root.join("proto"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("match"), "{stdout}");
}

#[test]
fn a_grpc_call_with_dapr_app_id_is_invoked_not_answered_by_the_bridge() {
    // daprd's gRPC proxying: a call to another service's method, with `dapr-app-id`, goes to
    // that app id (here a cluster whose backend echoes gRPC-shaped streams with trailers).
    let backend = Backend::http();
    let sc = sidecar(
        &format!(
            "clusters:\n  echo:\n    endpoints: [{}]\n    http2: true\n",
            backend.address()
        ),
        &component("statestore", "state.in-memory", &[]),
    );
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let r = h2
        .post(sc.bridge_url("/echo.v1.Echo/Stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("dapr-app-id", "echo")
        .body(vec![0u8, 0, 0, 0, 2, 0x08, 0x01])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), &[0u8, 0, 0, 0, 2, 0x08, 0x01]);
    assert!(
        backend
            .seen()
            .iter()
            .any(|s| s.path == "/echo.v1.Echo/Stream")
    );
}

/// A sidecar whose bridge proxies gRPC calls with `dapr-app-id: target` to `backend` (a
/// cluster over h2c); `bridge` is more of the bridge's config.
fn proxying(backend: &Backend, bridge: &str) -> Sidecar {
    proxying_with(backend, bridge, "")
}

/// [`proxying`], with `cluster` more of the `target` cluster's config.
fn proxying_with(backend: &Backend, bridge: &str, cluster: &str) -> Sidecar {
    let config = format!(
        "service: caller\nbridge:\n  address: 127.0.0.1:0\n  grpc_address: 127.0.0.1:0\n{bridge}clusters:\n  target:\n    endpoints: [{}]\n    http2: true\n{cluster}",
        backend.address()
    );
    let sc = Spawn {
        config: &config,
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    sc
}

/// One gRPC message (5-byte prefix, 2 bytes).
const MSG: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];
const TARGET: &[(&str, &str)] = &[("dapr-app-id", "target")];

/// On `client` (an h2 connection to the bridge's gRPC address `grpc`; without a token it
/// answers only IP addresses and localhost), a bidi call to app `target`'s
/// `/echo.v1.Echo/Stream` with `extra` headers: [`MSG`] sent, the stream left open, and the
/// response headers awaited (200) within `wait`.
async fn echo_stream(
    client: h2::client::SendRequest<bytes::Bytes>,
    grpc: &str,
    extra: &[(&str, &str)],
    wait: Duration,
    sc: &Sidecar,
) -> (http::Response<h2::RecvStream>, h2::SendStream<bytes::Bytes>) {
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::post(format!("http://{grpc}/echo.v1.Echo/Stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("dapr-app-id", "target");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let (res, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(bytes::Bytes::from_static(MSG), false)
        .unwrap();
    let res = tokio::time::timeout(wait, res)
        .await
        .unwrap_or_else(|_| panic!("no response headers\n{}", sc.diagnostics()))
        .unwrap();
    assert_eq!(res.status(), 200);
    (res, send)
}

/// Waits until `backend` has seen a stream reset, failing with `what` after `wait`.
async fn until_reset(backend: &Backend, wait: Duration, what: &str, sc: &Sidecar) {
    let deadline = tokio::time::Instant::now() + wait;
    while backend.resets() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}\n{}",
            sc.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// daprd's gRPC proxying streams both ways: each message reaches the target as it comes and
/// each echo comes back before the next message is sent (ping-pong, which hangs if either
/// side buffers); the half-close ends the call with the target's `grpc-status: 0`. (The bridge
/// used to read the whole request first: no response headers while the stream was open.)
#[test]
fn grpc_proxying_streams_a_bidi_call_message_by_message() {
    let backend = Backend::http();
    let sc = proxying(&backend, "");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    let mut call = crate::support::or_panic(
        crate::support::GrpcStream::open(&grpc, &grpc, TARGET, MSG),
        diag,
    );
    assert_eq!(call.status, 200, "{}", diag());
    for payload in [&b"two"[..], b"three", &[7u8; 70_000]] {
        let msg = crate::support::grpc_message(payload);
        crate::support::or_panic(call.exchange(&msg), diag);
    }
    assert_eq!(
        crate::support::or_panic(call.finish(), diag).as_deref(),
        Some("0"),
        "{}",
        diag()
    );
    let seen = backend.seen();
    let call = seen
        .iter()
        .find(|s| s.path == "/echo.v1.Echo/Stream")
        .unwrap_or_else(|| panic!("{seen:?}"));
    assert_eq!(call.version, "HTTP/2.0");
    assert_eq!(call.header("te"), Some("trailers"));
    assert_eq!(call.header("dapr-app-id"), None);
    assert_eq!(
        sc.metric("outrigger_bridge_requests_total{api=\"invoke\",status_class=\"2xx\"}"),
        1.0
    );

    // An app id nobody serves: a gRPC status (trailers-only), not an HTTP error page.
    let mut call = crate::support::or_panic(
        crate::support::GrpcStream::call(
            &grpc,
            &grpc,
            "/echo.v1.Echo/Stream",
            &[("dapr-app-id", "nowhere")],
            MSG,
        ),
        diag,
    );
    assert_eq!(call.status, 200, "{}", diag());
    let (status, message) = crate::support::or_panic(call.trailers(), diag);
    assert_eq!(status.as_deref(), Some("13"), "{message:?}");
    assert!(
        message.as_deref().unwrap_or("").contains("nowhere"),
        "{message:?}"
    );
    assert_eq!(
        sc.metric("outrigger_bridge_requests_total{api=\"invoke\",status_class=\"5xx\"}"),
        1.0
    );

    // A callee's HTTP error without `grpc-status` counts by its HTTP status.
    let call = crate::support::or_panic(
        crate::support::GrpcStream::call(&grpc, &grpc, "/status/503", TARGET, MSG),
        diag,
    );
    assert_eq!(call.status, 503, "{}", diag());
    drop(call);
    assert_eq!(
        sc.metric("outrigger_bridge_requests_total{api=\"invoke\",status_class=\"5xx\"}"),
        2.0
    );
}

/// A proxied call passes the bridge's checks first, answered as gRPC statuses: the API token
/// (missing or wrong: `UNAUTHENTICATED`), not forwarded to the callee; without a token, a call
/// by a name (DNS rebinding) is `PERMISSION_DENIED`, logged as a warning.
#[test]
fn grpc_proxying_checks_the_token_and_the_host() {
    let backend = Backend::http();
    let sc = proxying(&backend, "  api_token: s3cret\n");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    let path = "/echo.v1.Echo/Stream";
    for (headers, want) in [
        (&[("dapr-app-id", "target")][..], "16"),
        (
            &[("dapr-app-id", "target"), ("dapr-api-token", "nope")],
            "16",
        ),
        (
            &[("dapr-app-id", "target"), ("dapr-api-token", "s3cret")],
            "0",
        ),
    ] {
        let mut call = crate::support::or_panic(
            crate::support::GrpcStream::call(&grpc, &grpc, path, headers, MSG),
            diag,
        );
        let (status, message) = crate::support::or_panic(call.trailers(), diag);
        assert_eq!(status.as_deref(), Some(want), "{headers:?}: {message:?}");
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("dapr-api-token"), None, "{seen:?}");
    drop(sc);

    let sc = proxying(&backend, "");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    let mut call = crate::support::or_panic(
        crate::support::GrpcStream::call(&grpc, "evil.example", path, TARGET, MSG),
        diag,
    );
    let (status, message) = crate::support::or_panic(call.trailers(), diag);
    assert_eq!(status.as_deref(), Some("7"), "{message:?}");
    assert_eq!(backend.count(), 1);
    crate::support::eventually(Duration::from_secs(5), "the refusal logged", || {
        sc.stderr()
            .contains("refused a gRPC call for a foreign Host")
            .then_some(())
    });
}

/// An invocation holds its place in the cluster's `max_requests_in_flight` until its answer
/// ends or the caller goes away: a call abandoned mid-body gives it back.
#[test]
fn an_invocation_abandoned_mid_body_gives_back_its_place() {
    use std::io::Read;
    let backend = Backend::http();
    let sc = proxying_with(&backend, "", "    max_requests_in_flight: 1\n");
    let client = crate::support::client;
    // `/drip/MS`: "a", then "b" MS later.
    let mut res = client()
        .get(sc.bridge_url("/v1.0/invoke/target/method/drip/60000"))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200, "{}", sc.diagnostics());
    let mut a = [0u8; 1];
    res.read_exact(&mut a).unwrap();
    assert_eq!(&a, b"a");
    // While it runs, the cluster is full.
    let full = client()
        .get(sc.bridge_url("/v1.0/invoke/target/method/status/200"))
        .send()
        .unwrap();
    assert_eq!(full.status(), 503, "{}", sc.diagnostics());
    drop(res);
    crate::support::eventually(Duration::from_secs(10), "the place given back", || {
        let res = client()
            .get(sc.bridge_url("/v1.0/invoke/target/method/status/200"))
            .send()
            .unwrap();
        (res.status() == 200).then_some(())
    });
}

/// A server stream through the bridge: the target's messages come back as it sends them (the
/// first two arrive while the last is held back until they came), then its trailers.
#[test]
fn grpc_proxying_streams_the_answer_as_the_target_sends_it() {
    use crate::backend::TICK;
    let backend = Backend::http();
    let sc = proxying(&backend, "");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    let mut call = crate::support::or_panic(
        crate::support::GrpcStream::call(&grpc, &grpc, "/echo.v1.Echo/Ticks", TARGET, MSG),
        diag,
    );
    assert_eq!(call.status, 200, "{}", diag());
    // The target sends its last message only after these came (a bridge that held the
    // answer until its end would wait here forever).
    for _ in 0..2 {
        assert_eq!(crate::support::or_panic(call.read(TICK.len()), diag), TICK);
    }
    backend.release_ticks();
    assert_eq!(crate::support::or_panic(call.read(TICK.len()), diag), TICK);
    assert_eq!(
        crate::support::or_panic(call.finish(), diag).as_deref(),
        Some("0")
    );
}

/// A caller that cancels mid-stream (RST_STREAM) cancels the target's stream too.
#[test]
fn grpc_proxying_passes_a_cancel_to_the_target() {
    let backend = Backend::http();
    let sc = proxying(&backend, "");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wait = Duration::from_secs(20);
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&grpc).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let (res, mut send) = echo_stream(client, &grpc, &[], wait, &sc).await;
        let mut body = res.into_body();
        let mut echoed = Vec::new();
        while echoed.len() < MSG.len() {
            let data = tokio::time::timeout(wait, body.data())
                .await
                .unwrap_or_else(|_| panic!("no echo\n{}", sc.diagnostics()))
                .expect("the echo")
                .unwrap();
            let _ = body.flow_control().release_capacity(data.len());
            echoed.extend_from_slice(&data);
        }
        assert_eq!(echoed, MSG);
        assert_eq!(backend.resets(), 0);
        send.send_reset(h2::Reason::CANCEL);
        // The connection stays open (its task runs here) while the target hears of it.
        until_reset(&backend, wait, "the target never saw the cancel", &sc).await;
    });
}

/// The caller's deadline (`grpc-timeout`) bounds the whole call, not only its start: a stream
/// still open when it passes ends with `DEADLINE_EXCEEDED` and the target's stream is
/// cancelled.
#[test]
fn grpc_proxying_applies_the_callers_deadline() {
    let backend = Backend::http();
    let sc = proxying(&backend, "");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    let mut call = crate::support::or_panic(
        crate::support::GrpcStream::open(
            &grpc,
            &grpc,
            &[("dapr-app-id", "target"), ("grpc-timeout", "3S")],
            MSG,
        ),
        diag,
    );
    assert_eq!(call.status, 200, "{}", diag());
    let (status, message) = crate::support::or_panic(call.trailers(), diag);
    assert_eq!(status.as_deref(), Some("4"), "{message:?}\n{}", diag());
    // The target was given the time left, in milliseconds.
    let seen = backend.seen();
    let left = seen[0].header("grpc-timeout").unwrap_or_default();
    let ms: u64 = left
        .strip_suffix('m')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("grpc-timeout: {left:?}"));
    assert!(ms <= 3000, "grpc-timeout: {left:?}");
    crate::support::eventually(
        Duration::from_secs(10),
        "the target's stream cancelled",
        || (backend.resets() == 1).then_some(()),
    );
}

/// `bridge.max_body` bounds each message of a proxied stream (as daprd's `--max-body-size`
/// bounds gRPC messages), not the stream: a larger one ends the call with
/// `RESOURCE_EXHAUSTED` and cancels the target's stream.
#[test]
fn grpc_proxying_limits_each_message_to_max_body() {
    let backend = Backend::http();
    let sc = proxying(&backend, "  max_body: 1KiB\n");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    let mut call = crate::support::or_panic(
        crate::support::GrpcStream::open(&grpc, &grpc, TARGET, MSG),
        diag,
    );
    // Messages under the limit pass, however many (the stream is longer than the limit).
    for _ in 0..3 {
        let msg = crate::support::grpc_message(&[1u8; 768]);
        crate::support::or_panic(call.exchange(&msg), diag);
    }
    // A 2 KiB message: refused from its prefix.
    let mut msg = vec![0u8, 0, 0, 8, 0];
    msg.extend_from_slice(&[1u8; 100]);
    crate::support::or_panic(call.send(&msg), diag);
    let (status, message) = crate::support::or_panic(call.trailers(), diag);
    assert_eq!(status.as_deref(), Some("8"), "{message:?}\n{}", diag());
    assert!(
        message.as_deref().unwrap_or("").contains("2048"),
        "{message:?}"
    );
    crate::support::eventually(
        Duration::from_secs(10),
        "the target's stream cancelled",
        || (backend.resets() == 1).then_some(()),
    );
}

/// A proxied call without a deadline waits for the target's headers as long as it takes, not
/// the cluster's `timeout`: gRPC servers (grpc-go, Java, Python) send their headers only with
/// their first message, which a server stream may send minutes later. Nor is the target
/// marked failed (outlier ejection would take away a healthy endpoint).
#[test]
fn grpc_proxying_waits_for_late_headers_past_the_cluster_timeout() {
    let backend = Backend::http();
    let sc = proxying_with(&backend, "", "    timeout: 500ms\n");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    // `/slow/MS`: headers and body after MS milliseconds.
    let mut call = crate::support::or_panic(
        crate::support::GrpcStream::call(&grpc, &grpc, "/slow/1500", TARGET, MSG),
        diag,
    );
    assert_eq!(call.status, 200, "{}", diag());
    assert_eq!(
        crate::support::or_panic(call.trailers(), diag),
        (None, None),
        "the target's answer, not the bridge's status\n{}",
        diag()
    );
    // A whole-body invocation keeps the cluster's timeout.
    let res = crate::support::client()
        .post(sc.bridge_url("/v1.0/invoke/target/method/slow/1500"))
        .send()
        .unwrap();
    assert_eq!(res.status(), 500, "{}", diag());
}

/// gRPC-Web with `dapr-app-id` is not gRPC's framing (grpc-web-text is base64): it is invoked
/// as any HTTP request with that header, its body forwarded as it is.
#[test]
fn a_grpc_web_call_with_dapr_app_id_is_invoked_as_http() {
    let backend = Backend::http();
    let sc = proxying(&backend, "");
    for ct in ["application/grpc-web-text", "application/grpc-web+proto"] {
        let res = crate::support::client()
            .post(sc.bridge_url("/echo.v1.Echo/Say"))
            .header("content-type", ct)
            .header("dapr-app-id", "target")
            .body("AAAAAAJ4eQ==")
            .send()
            .unwrap();
        assert_eq!(res.status(), 200, "{ct}\n{}", sc.diagnostics());
        let echo: serde_json::Value = res.json().unwrap();
        assert_eq!(echo["path"], "/echo.v1.Echo/Say", "{echo}");
        assert_eq!(echo["body"], "AAAAAAJ4eQ==", "{echo}");
    }
}

#[test]
fn a_grpc_app_on_a_unix_socket_is_a_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        "app:\n  address: unix:/tmp/app.sock\n  protocol: grpc\nbridge: {}\n",
    )
    .unwrap();
    let (code, _, stderr) =
        crate::support::run_to_end(&["check", "-c", config.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("app.protocol") || stderr.contains(":3:"),
        "{stderr}"
    );
}

/// The distributed lock through the Python SDK (`try_lock`, `unlock`, the context manager)
/// on `lock.redis`: the same keys as over HTTP.
#[test]
fn python_sdk_lock_on_redis() {
    let redis = RedisServer::start();
    let components = component("lockstore", "lock.redis", &[("redisHost", &redis.host())]);
    let sc = sidecar("", &components);
    scenario(&sc, &[], &["lock", "lockstore"]).unwrap_or_else(|e| panic!("{e}"));
    // dave still holds order-2, under daprd's key, and HTTP sees it.
    let key = "lock||pyapp||order-2";
    assert_eq!(redis.command(&["GET", key]).unwrap(), "$4\r\ndave");
    let r = crate::support::client()
        .post(sc.bridge_url("/v1.0-alpha1/unlock/lockstore"))
        .json(&serde_json::json!({"resourceId": "order-2", "lockOwner": "dave"}))
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), r#"{"status":0}"#);
    assert!(sc.metric("outrigger_bridge_requests_total{api=\"lock\",status_class=\"2xx\"}") >= 8.0);
}

/// The Python SDK's state scenario on `state.postgresql`: gRPC's raw bytes are stored as
/// daprd stores them (base64 with `isbinary`), and HTTP reads the same bytes back.
#[test]
fn python_sdk_state_on_postgresql() {
    let db = crate::servers::PostgresDb::create();
    let components = component(
        "pg",
        "state.postgresql",
        &[("connectionString", &db.connection_string())],
    );
    let sc = sidecar("", &components);
    scenario(&sc, &[], &["state", "pg"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        db.sql("SELECT value::text || '|' || isbinary FROM state WHERE key = 'pyapp||k1'"),
        "\"djQ=\"|true"
    );
    let r = crate::support::client()
        .get(sc.bridge_url("/v1.0/state/pg/k1"))
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "v4");
}

/// The configuration API through the Python SDK (`get_configuration`,
/// `subscribe_configuration` with a handler fed by the server stream, `unsubscribe`) on
/// `configuration.redis`.
#[test]
fn python_sdk_configuration_on_redis() {
    let redis = RedisServer::start();
    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "notify-keyspace-events", "KA"])
            .unwrap(),
        "+OK"
    );
    let components = component(
        "configstore",
        "configuration.redis",
        &[("redisHost", &redis.host())],
    );
    let sc = sidecar("", &components);
    let port = redis.port.to_string();
    scenario(&sc, &[], &["configuration", "configstore", &port]).unwrap_or_else(|e| panic!("{e}"));
}

/// An output binding through the Python SDK (`invoke_binding`, gRPC `InvokeBinding`) on
/// `bindings.http`: the same core as `POST /v1.0/bindings/{name}`.
#[test]
fn python_sdk_output_binding_http() {
    let backend = Backend::http();
    let components = component(
        "webhook",
        "bindings.http",
        &[("url", &format!("http://{}", backend.address()))],
    );
    let sc = sidecar("", &components);
    scenario(&sc, &[], &["binding", "webhook"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(backend.count(), 2);
}

/// A proxied call whose target cannot be connected (refused) is tried on the cluster's next
/// endpoint, as a whole-body invocation is: nothing of its request stream was sent, so the
/// stream goes to the next attempt unread (within the cluster's retry budget).
#[test]
fn grpc_proxying_tries_another_endpoint_after_a_connect_failure() {
    let backend = Backend::http();
    let config = format!(
        "service: caller\nbridge:\n  address: 127.0.0.1:0\n  grpc_address: 127.0.0.1:0\nclusters:\n  target:\n    endpoints: [{}, {}]\n    http2: true\n",
        crate::backend::dead_port(),
        backend.address()
    );
    let sc = Spawn {
        config: &config,
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let diag = || sc.diagnostics();
    for i in 0..4 {
        let mut call = crate::support::or_panic(
            crate::support::GrpcStream::call(&grpc, &grpc, "/echo.v1.Echo/Stream", TARGET, MSG),
            diag,
        );
        assert_eq!(call.status, 200, "call {i}\n{}", diag());
        let (status, message) = crate::support::or_panic(call.trailers(), diag);
        assert_eq!(
            status.as_deref(),
            Some("0"),
            "call {i}: {message:?}\n{}",
            diag()
        );
    }
    assert_eq!(
        backend.count(),
        4,
        "every call reached the live endpoint once"
    );
    assert!(
        sc.metric("outrigger_retries_total{cluster=\"target\",outcome=\"attempted\"}") >= 1.0,
        "{}",
        diag()
    );
}

/// The caller's deadline fires on its own: a caller that reads nothing (its HTTP/2 window
/// is 0, so the bridge has nothing to send it) still has the target's stream cancelled at
/// its deadline, not when it reads again. (The deadline used to be seen only when the
/// answer was polled, which hyper does not do without window.)
#[test]
fn grpc_proxying_cancels_the_target_at_the_deadline_when_the_caller_does_not_read() {
    let backend = Backend::http();
    let sc = proxying(&backend, "");
    let grpc = sc.bridge_grpc.clone().expect("the bridge runs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wait = Duration::from_secs(20);
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&grpc).await.unwrap();
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(conn);
        let (res, send) = echo_stream(client, &grpc, &[("grpc-timeout", "2S")], wait, &sc).await;
        // The echo waits in the bridge (no window); nothing is read. The connection stays
        // open (its task runs here) while the target hears of the deadline.
        let _body = res.into_body();
        let what = "the target's stream was not cancelled at the deadline";
        until_reset(&backend, wait, what, &sc).await;
        drop(send);
    });
}
