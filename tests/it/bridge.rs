//! The Dapr-compatible bridge, end to end: the real binary, real Redis (started per test on a
//! free port), SQLite files in temp dirs, a real HTTP backend for invocation.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::backend::Backend;
use crate::servers::{PostgresDb, RedisServer, free_port};
use crate::support::{ComponentsDir, Sidecar, Spawn, client, eventually, post, run_to_end};

const BRIDGE: &str = "bridge:\n  address: 127.0.0.1:0\n";

/// A sidecar with the bridge, `extra` config and a resources dir holding `components`.
fn start(extra: &str, components: &[(&str, &str)]) -> Sidecar {
    start_with(extra, components, &[])
}

fn start_with(extra: &str, components: &[(&str, &str)], env: &[(&str, &str)]) -> Sidecar {
    let resources = tempfile::tempdir().unwrap().keep();
    for (name, text) in components {
        std::fs::write(resources.join(name), text).unwrap();
    }
    let resources_line = if components.is_empty() {
        String::new()
    } else {
        format!("  resources: {}\n", resources.display())
    };
    let config = format!("{BRIDGE}{resources_line}{extra}");
    let sc = Spawn {
        config: &config,
        env,
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    sc
}

fn post_raw(sc: &Sidecar, path: &str, body: &str) -> (u16, Value) {
    let r = client()
        .post(sc.bridge_url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// GET: (status, etag, body).
fn get(sc: &Sidecar, path: &str) -> (u16, Option<String>, String) {
    let r = client().get(sc.bridge_url(path)).send().unwrap();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), etag, r.text().unwrap())
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["errorCode"].as_str().unwrap_or_default().to_string()
}

/// The state API against one store: save/get/ETags/bulk/delete/transactions and the errors.
fn state_contract(sc: &Sidecar, store: &str) {
    let base = format!("/v1.0/state/{store}");
    let (s, body) = post(
        sc,
        &base,
        json!([{"key": "k1", "value": {"a": 1}}, {"key": "k2", "value": "two"}]),
    );
    assert_eq!(s, 204, "{body}\n{}", sc.diagnostics());
    let (s, etag, body) = get(sc, &format!("{base}/k1"));
    // Compared as JSON: PostgreSQL's jsonb gives `{"a": 1}` back (as daprd's store does).
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"a": 1})
    );
    let etag = etag.expect("an ETag header");
    let (_, _, body) = get(sc, &format!("{base}/k2"));
    assert_eq!(body, r#""two""#);
    // Missing: 204, empty.
    let (s, etag_missing, body) = get(sc, &format!("{base}/nope"));
    assert_eq!((s, etag_missing, body.as_str()), (204, None, ""));

    // ETags: the current one writes, a stale one is 409, a non-version is 400.
    let (s, body) = post(
        sc,
        &base,
        json!([{"key": "k1", "value": 2, "etag": etag, "options": {"concurrency": "first-write", "consistency": "strong"}}]),
    );
    assert_eq!(s, 204, "{body}");
    let (s, body) = post(sc, &base, json!([{"key": "k1", "value": 3, "etag": etag}]));
    assert_eq!(
        (s, error_code(&body).as_str()),
        (409, "ERR_STATE_SAVE"),
        "{body}"
    );
    let (s, body) = post(
        sc,
        &base,
        json!([{"key": "k1", "value": 3, "etag": "not-a-version"}]),
    );
    assert_eq!(
        (s, error_code(&body).as_str()),
        (400, "ERR_STATE_SAVE"),
        "{body}"
    );
    // last-write ignores the etag.
    let (s, body) = post(
        sc,
        &base,
        json!([{"key": "k1", "value": 4, "etag": etag, "options": {"concurrency": "last-write"}}]),
    );
    assert_eq!(s, 204, "{body}");
    let (_, etag, body) = get(sc, &format!("{base}/k1"));
    assert_eq!(body, "4");
    let etag = etag.unwrap();

    // Malformed bodies and missing keys.
    let (s, v) = post_raw(sc, &base, "[{\"key\": ");
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (400, Some("ERR_MALFORMED_REQUEST"))
    );
    let (s, v) = post_raw(sc, &base, r#"{"key": "k"}"#);
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (400, Some("ERR_MALFORMED_REQUEST"))
    );
    let (s, v) = post_raw(sc, &base, r#"[{"value": 1}]"#);
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (400, Some("ERR_MALFORMED_REQUEST"))
    );
    let (s, _) = post_raw(sc, &base, "[]");
    assert_eq!(s, 204);
    let (s, v) = post_raw(sc, &base, r#"[{"key": "a||b", "value": 1}]"#);
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (400, Some("ERR_MALFORMED_REQUEST"))
    );
    let (s, v) = post_raw(sc, "/v1.0/state/nosuchstore", "[]");
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (400, Some("ERR_STATE_STORE_NOT_FOUND"))
    );

    // Bulk get: found keys with data and etag, missing ones with the key only.
    let (s, body) = post(
        sc,
        &format!("{base}/bulk"),
        json!({"keys": ["k1", "k2", "nope"], "parallelism": 10}),
    );
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0], json!({"key": "k1", "data": 4, "etag": etag}));
    assert_eq!(v[1]["data"], json!("two"));
    assert_eq!(v[2], json!({"key": "nope"}));

    // Delete with If-Match: stale 409, bad 400, current 204.
    let del = |etag: Option<&str>| {
        let mut r = client().delete(sc.bridge_url(&format!("{base}/k1")));
        if let Some(e) = etag {
            r = r.header("if-match", e);
        }
        let r = r.send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (s, body) = del(Some("999"));
    assert_eq!((s, error_code(&body).as_str()), (409, "ERR_STATE_DELETE"));
    let (s, body) = del(Some("x"));
    assert_eq!((s, error_code(&body).as_str()), (400, "ERR_STATE_DELETE"));
    assert_eq!(del(Some(&etag)).0, 204);
    assert_eq!(get(sc, &format!("{base}/k1")).0, 204);
    // Without an etag a delete of a missing key is fine.
    assert_eq!(del(None).0, 204);

    // Transactions: all or nothing.
    let (_, k2_etag, _) = get(sc, &format!("{base}/k2"));
    let tx = format!("{base}/transaction");
    let (s, body) = post(
        sc,
        &tx,
        json!({"operations": [
            {"operation": "upsert", "request": {"key": "t1", "value": "one"}},
            {"operation": "upsert", "request": {"key": "k2", "value": "changed", "etag": "999"}},
        ]}),
    );
    assert_eq!(
        (s, error_code(&body).as_str()),
        (409, "ERR_STATE_TRANSACTION"),
        "{body}"
    );
    // The message names the key whose ETag did not match (Redis named the first one).
    assert!(body.contains("k2\\\""), "{body}");
    assert_eq!(
        get(sc, &format!("{base}/t1")).0,
        204,
        "nothing of a failed transaction is applied"
    );
    assert_eq!(get(sc, &format!("{base}/k2")).2, r#""two""#);
    let (s, body) = post(
        sc,
        &tx,
        json!({"operations": [
            {"operation": "upsert", "request": {"key": "t1", "value": "one"}},
            {"operation": "delete", "request": {"key": "k2", "etag": k2_etag.unwrap()}},
        ], "metadata": {}}),
    );
    assert_eq!(s, 204, "{body}");
    assert_eq!(get(sc, &format!("{base}/t1")).2, r#""one""#);
    assert_eq!(get(sc, &format!("{base}/k2")).0, 204);
    // In order, as daprd's PostgreSQL and SQLite stores run a transaction: each ETag is
    // checked against the state the earlier operations leave, so a key written and then
    // deleted with the ETag it had before is a mismatch, and nothing is applied (every store
    // used to check all ETags against the state before the transaction: this passed).
    let (_, t1_etag, _) = get(sc, &format!("{base}/t1"));
    let t1_etag = t1_etag.unwrap();
    let (s, body) = post(
        sc,
        &tx,
        json!({"operations": [
            {"operation": "upsert", "request": {"key": "t1", "value": "a", "etag": t1_etag}},
            {"operation": "upsert", "request": {"key": "t3", "value": "c"}},
            {"operation": "delete", "request": {"key": "t1", "etag": t1_etag}},
        ]}),
    );
    assert_eq!(
        (s, error_code(&body).as_str()),
        (409, "ERR_STATE_TRANSACTION"),
        "{body}"
    );
    let (s, etag, body) = get(sc, &format!("{base}/t1"));
    assert_eq!(
        (s, etag.as_deref(), body.as_str()),
        (200, Some(t1_etag.as_str()), r#""one""#),
        "nothing of it applied"
    );
    assert_eq!(
        get(sc, &format!("{base}/t3")).0,
        204,
        "nothing of it applied"
    );
    // Its current ETag, then no ETag: both apply, in order.
    let (s, body) = post(
        sc,
        &tx,
        json!({"operations": [
            {"operation": "upsert", "request": {"key": "t1", "value": "a", "etag": t1_etag}},
            {"operation": "upsert", "request": {"key": "t1", "value": "b"}},
        ]}),
    );
    assert_eq!(s, 204, "{body}");
    assert_eq!(get(sc, &format!("{base}/t1")).2, r#""b""#);
    // Chained ETags in one transaction: the delete carries the version the upsert before it
    // leaves (Redis: a version number, one up; its Lua script keeps them in its `after` table).
    let (_, t1_etag, _) = get(sc, &format!("{base}/t1"));
    if store == "cache"
        && let Some(v) = t1_etag.as_deref().and_then(|e| e.parse::<u64>().ok())
    {
        let (s, body) = post(
            sc,
            &tx,
            json!({"operations": [
                {"operation": "upsert", "request": {"key": "t1", "value": "c", "etag": v.to_string()}},
                {"operation": "delete", "request": {"key": "t1", "etag": (v + 1).to_string()}},
            ]}),
        );
        assert_eq!(s, 204, "{body}");
        assert_eq!(get(sc, &format!("{base}/t1")).0, 204, "deleted");
        // The key is gone now; write it back for what follows.
        let (s, body) = post(sc, &base, json!([{"key": "t1", "value": "b"}]));
        assert_eq!(s, 204, "{body}");
    }
    let (s, body) = post(
        sc,
        &tx,
        json!({"operations": [{"operation": "merge", "request": {"key": "a"}}]}),
    );
    assert_eq!(
        (s, error_code(&body).as_str()),
        (400, "ERR_NOT_SUPPORTED_STATE_OPERATION")
    );
    let (s, v) = post_raw(sc, &tx, "{\"operations\": 7}");
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (400, Some("ERR_MALFORMED_REQUEST"))
    );
}

/// Concurrent read-modify-write with first-write ETags: no update is lost, so the counter
/// ends at the number of successful writes.
fn concurrent_counter(sc: &Sidecar, store: &str) {
    let base = format!("/v1.0/state/{store}");
    assert_eq!(
        post(sc, &base, json!([{"key": "counter", "value": 0}])).0,
        204
    );
    let url = sc.bridge_url(&base);
    let get_url = sc.bridge_url(&format!("{base}/counter"));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (url, get_url) = (url.clone(), get_url.clone());
            std::thread::spawn(move || {
                let c = client();
                let (mut ok, mut conflicts) = (0, 0);
                for _ in 0..15 {
                    let r = c.get(&get_url).send().unwrap();
                    let etag = r.headers()["etag"].to_str().unwrap().to_string();
                    let n: u64 = r.text().unwrap().parse().unwrap();
                    let r = c
                        .post(&url)
                        .json(&json!([{"key": "counter", "value": n + 1, "etag": etag, "options": {"concurrency": "first-write"}}]))
                        .send()
                        .unwrap();
                    match r.status().as_u16() {
                        204 => ok += 1,
                        409 => conflicts += 1,
                        s => panic!("unexpected status {s}: {}", r.text().unwrap()),
                    }
                }
                (ok, conflicts)
            })
        })
        .collect();
    let (mut ok, mut conflicts) = (0u64, 0u64);
    for t in threads {
        let (a, b) = t.join().unwrap();
        ok += a;
        conflicts += b;
    }
    let (_, _, body) = get(sc, &format!("{base}/counter"));
    assert_eq!(
        body.parse::<u64>().unwrap(),
        ok,
        "{ok} writes succeeded, {conflicts} conflicted"
    );
    assert_eq!(ok + conflicts, 8 * 15);
}

#[test]
fn in_memory_state_health_metadata_and_metrics() {
    // No resources directory: the embedded statestore (in-memory) and pubsub.
    let sc = start("service: shop\n", &[]);
    assert_eq!(get(&sc, "/v1.0/healthz").0, 204);
    assert_eq!(get(&sc, "/v1.0/healthz/outbound").0, 204);
    state_contract(&sc, "statestore");
    concurrent_counter(&sc, "statestore");

    let r = client()
        .put(sc.bridge_url("/v1.0/metadata/team"))
        .body("checkout")
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, _, body) = get(&sc, "/v1.0/metadata");
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], "shop", "the app id defaults to the service");
    assert_eq!(v["extended"]["team"], "checkout");
    let names: Vec<(&str, &str)> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("statestore", "state.in-memory"),
            ("pubsub", "pubsub.in-memory")
        ]
    );
    assert!(v["subscriptions"].is_array());

    // Unknown routes are daprd's invocation error.
    let (s, _, body) = get(&sc, "/v1.0/nothing-here");
    assert_eq!((s, error_code(&body).as_str()), (400, "ERR_DIRECT_INVOKE"));

    let ok = sc.metric("outrigger_bridge_requests_total{api=\"state\",status_class=\"2xx\"}");
    assert!(ok >= 10.0, "state 2xx counted: {ok}");
    assert!(
        sc.metric("outrigger_bridge_requests_total{api=\"state\",status_class=\"4xx\"}") >= 5.0
    );
    assert!(sc.metric("outrigger_bridge_request_duration_seconds_count{api=\"metadata\"}") >= 1.0);
}

#[test]
fn redis_state_store() {
    let redis = RedisServer::start();
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: cache\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:{}\n  - name: redisPassword\n    value: \"\"\n",
        redis.port
    );
    let sc = start("service: orders\n", &[("redis.yaml", &component)]);
    state_contract(&sc, "cache");
    concurrent_counter(&sc, "cache");
    // Laid out as Dapr's Redis store does: a hash per prefixed key, data and version.
    assert_eq!(
        post(
            &sc,
            "/v1.0/state/cache",
            json!([{"key": "layout", "value": {"x": true}}])
        )
        .0,
        204
    );
    let data = redis.command(&["HGET", "orders||layout", "data"]).unwrap();
    assert!(data.ends_with(r#"{"x":true}"#), "{data}");
    let version = redis
        .command(&["HGET", "orders||layout", "version"])
        .unwrap();
    assert!(version.ends_with("\r\n1"), "{version:?}");
    // Data written the way daprd writes it is read back.
    redis.command(&["HSET", "orders||fromdapr", "data", "\"hi\"", "version", "7"]);
    let (s, etag, body) = get(&sc, "/v1.0/state/cache/fromdapr");
    assert_eq!(
        (s, etag.as_deref(), body.as_str()),
        (200, Some("7"), "\"hi\"")
    );
}

#[test]
fn sqlite_state_persists_across_restarts() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("state.db");
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: db\nspec:\n  type: state.sqlite\n  version: v1\n  metadata:\n  - name: connectionString\n    value: {}\n  - name: keyPrefix\n    value: name\n",
        db.display()
    );
    {
        let sc = start("", &[("db.yaml", &component)]);
        state_contract(&sc, "db");
        concurrent_counter(&sc, "db");
        assert_eq!(
            post(
                &sc,
                "/v1.0/state/db",
                json!([{"key": "kept", "value": [1, 2]}])
            )
            .0,
            204
        );
    }
    let sc = start("", &[("db.yaml", &component)]);
    let (s, etag, body) = get(&sc, "/v1.0/state/db/kept");
    assert_eq!(
        (s, etag.as_deref(), body.as_str()),
        (200, Some("1"), "[1,2]"),
        "{}",
        sc.diagnostics()
    );
}

#[test]
fn api_token_is_required_except_for_health() {
    let sc = start_with("", &[], &[("DAPR_API_TOKEN", "s3cret")]);
    let (s, _, body) = get(&sc, "/v1.0/metadata");
    assert_eq!((s, body.as_str()), (401, "invalid api token"));
    let r = client()
        .get(sc.bridge_url("/v1.0/metadata"))
        .header("dapr-api-token", "wrong")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(sc.bridge_url("/v1.0/metadata"))
        .header("dapr-api-token", "s3cret")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&sc, "/v1.0/healthz").0, 204);
    assert_eq!(get(&sc, "/v1.0/healthz/outbound").0, 204);
    let r = client()
        .post(sc.bridge_url("/v1.0/state/statestore"))
        .json(&json!([{"key": "a", "value": 1}]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // The config key wins over the variable.
    let sc = start_with(
        "  api_token: fromfile\n",
        &[],
        &[("DAPR_API_TOKEN", "s3cret")],
    );
    let r = client()
        .get(sc.bridge_url("/v1.0/metadata"))
        .header("dapr-api-token", "fromfile")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn body_limit_answers_413() {
    let sc = start("  max_body: 1KiB\n", &[]);
    let big = format!("[{{\"key\": \"k\", \"value\": \"{}\"}}]", "x".repeat(2000));
    let (s, v) = post_raw(&sc, "/v1.0/state/statestore", &big);
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (413, Some("ERR_BODY_TOO_LARGE"))
    );
    let (s, _) = post_raw(
        &sc,
        "/v1.0/state/statestore",
        r#"[{"key": "k", "value": 1}]"#,
    );
    assert_eq!(s, 204);
}

#[test]
fn unknown_component_type_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(dir.path(), "bridge:\n  address: 127.0.0.1:0\n");
    components.write(
        "kafka.yaml",
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: events\nspec:\n  type: pubsub.kafka\n  version: v1\n",
    );
    let (code, _, stderr) = components.run("run", &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("kafka.yaml:6:"), "{stderr}");
    assert!(
        stderr.contains("unknown component type \"pubsub.kafka\""),
        "{stderr}"
    );
    let (code, _, stderr) = components.check();
    assert_eq!(code, 78, "{stderr}");
}

/// The preflight stage's problems (a component, a certificate) come with the first stage's
/// (a bad key) in one run, each located, and `check` says the same.
#[test]
fn component_certificate_and_key_problems_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(
        dir.path(),
        "service: \"bad name\"\napp: { address: 127.0.0.1:1 }\nlisteners:\n  - name: web\n    address: 127.0.0.1:0\n    tls: { cert: /nonexistent.crt, key: /nonexistent.key }\nbridge:\n  address: 127.0.0.1:0\n",
    );
    components.write(
        "kafka.yaml",
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: events\nspec:\n  type: pubsub.kafka\n  version: v1\n",
    );
    let (code, _, run_stderr) = components.run("run", &[]);
    assert_eq!(code, 78, "{run_stderr}");
    for e in [
        "outrigger.yaml:1:10: service: expected a name",
        "outrigger.yaml:6:5: listeners[0].tls: cannot read /nonexistent.crt",
        "kafka.yaml:6:",
        "unknown component type \"pubsub.kafka\"",
        "invalid configuration (3 problems)",
    ] {
        assert!(run_stderr.contains(e), "missing `{e}` in:\n{run_stderr}");
    }
    let (code, _, check_stderr) = components.check();
    assert_eq!(code, 78, "{check_stderr}");
    assert_eq!(check_stderr, run_stderr);
}

#[test]
fn secrets_from_a_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.json");
    std::fs::write(
        &file,
        r#"{"db": {"password": "pw", "user": "u"}, "token": "t"}"#,
    )
    .unwrap();
    let components = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: files\nspec:\n  type: secretstores.local.file\n  version: v1\n  metadata:\n  - name: secretsFile\n    value: {}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: env\nspec:\n  type: secretstores.local.env\n  version: v1\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: statestore\nspec:\n  type: state.in-memory\n  version: v1\n  metadata:\n  - name: unused\n    secretKeyRef:\n      name: \"db:password\"\nauth:\n  secretStore: files\n",
        file.display()
    );
    let sc = start_with(
        "",
        &[("all.yaml", &components)],
        &[("BRIDGE_TEST_SECRET", "from-env")],
    );
    let (s, _, body) = get(&sc, "/v1.0/secrets/files/db:password");
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"db:password": "pw"})
    );
    let (s, _, body) = get(&sc, "/v1.0/secrets/files/bulk");
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["db:user"], json!({"db:user": "u"}));
    assert_eq!(v["token"], json!({"token": "t"}));
    assert_eq!(get(&sc, "/v1.0/secrets/files/missing").0, 204);
    let (_, _, body) = get(&sc, "/v1.0/secrets/env/BRIDGE_TEST_SECRET");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"BRIDGE_TEST_SECRET": "from-env"})
    );
    let (s, _, body) = get(&sc, "/v1.0/secrets/nope/x");
    assert_eq!(
        (s, error_code(&body).as_str()),
        (400, "ERR_SECRET_STORE_NOT_FOUND")
    );
}

#[test]
fn invoke_the_local_app_and_a_cluster() {
    let app = Backend::http();
    let other = Backend::http();
    let config = format!(
        "service: front\napp:\n  address: {}\nclusters:\n  billing:\n    endpoints: [{}]\n  flaky:\n    endpoints: [{}, {}]\n  dead:\n    endpoints: [{}]\nbridge:\n  address: 127.0.0.1:0\n  app_api_token: apptok\n",
        app.address(),
        other.address(),
        crate::backend::dead_port(),
        other.address(),
        crate::backend::dead_port()
    );
    let sc = Sidecar::start(&config);
    sc.wait_ready();
    // Our own app id: the local app, with the app token.
    let r = client()
        .post(sc.bridge_url("/v1.0/invoke/front/method/orders/7?x=1"))
        .header("x-custom", "yes")
        .body("hello")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.diagnostics());
    let seen = app.seen().pop().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/orders/7?x=1")
    );
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header("x-custom"), Some("yes"));
    assert_eq!(seen.header("dapr-api-token"), Some("apptok"));
    // Another app id: the cluster of that name; the header form; status passes through.
    let r = client()
        .put(sc.bridge_url("/status/418"))
        .header("dapr-app-id", "billing")
        .send()
        .unwrap();
    assert_eq!(r.status(), 418);
    // The callee's own 413 is not mistaken for the bridge's body limit.
    let r = client()
        .get(sc.bridge_url("/v1.0/invoke/billing/method/status/413"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    let body = r.text().unwrap();
    assert!(!body.contains("ERR_BODY_TOO_LARGE"), "{body}");
    let r = client()
        .delete(sc.bridge_url("/v1.0/invoke/billing/method/items/1"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = other.seen().pop().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("DELETE", "/items/1")
    );
    assert_eq!(seen.header("dapr-app-id"), None);
    assert_eq!(
        seen.header("dapr-api-token"),
        None,
        "the app token is for the local app only"
    );
    // Unknown app id.
    let (s, _, body) = get(&sc, "/v1.0/invoke/ghost/method/x");
    assert_eq!((s, error_code(&body).as_str()), (500, "ERR_DIRECT_INVOKE"));
    assert!(body.contains("ghost"), "{body}");
    // A cluster with a dead endpoint: connect failures are tried on the other one.
    for i in 0..4 {
        let r = client()
            .get(sc.bridge_url(&format!("/v1.0/invoke/flaky/method/n/{i}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "call {i}\n{}", sc.diagnostics());
    }
    assert!(
        sc.metric("outrigger_retries_total{cluster=\"flaky\",outcome=\"attempted\"}") >= 1.0,
        "{}",
        sc.diagnostics()
    );
    // Nothing listens for a cluster whose only endpoint is dead.
    let (s, _, body) = get(&sc, "/v1.0/invoke/dead/method/x");
    assert_eq!((s, error_code(&body).as_str()), (500, "ERR_DIRECT_INVOKE"));
    let message = serde_json::from_str::<Value>(&body).unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap()
            .starts_with("cannot invoke \"dead\" at"),
        "{body}"
    );
}

#[test]
fn invoke_through_the_proxy_clusters_and_shutdown() {
    // With listeners the proxy module runs, and the bridge uses its clusters.
    let other = Backend::http();
    let config = format!(
        "listeners:\n  - name: egress\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - match: {{ path_prefix: / }}\n        cluster: billing\nclusters:\n  billing:\n    endpoints: [{}]\nbridge:\n  address: 127.0.0.1:0\n",
        other.address()
    );
    let mut sc = Sidecar::start(&config);
    sc.wait_ready();
    let r = client()
        .get(sc.bridge_url("/v1.0/invoke/billing/method/hello"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.diagnostics());
    assert_eq!(other.seen().pop().unwrap().path, "/hello");
    // POST /v1.0/shutdown stops the sidecar gracefully.
    let r = client()
        .post(sc.bridge_url("/v1.0/shutdown"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let status = sc.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
}

#[test]
fn the_app_finds_the_bridge_in_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env.txt");
    let script = format!(
        "env | grep -E '^(DAPR_|APP_ID|APP_API_TOKEN|OUTRIGGER_BRIDGE)' | sort > {}; sleep 30",
        out.display()
    );
    let config = "service: envapp\nbridge:\n  address: 127.0.0.1:0\n  api_token: tok\n  app_api_token: apptok\n";
    let sc = Spawn {
        config,
        app: &["sh", "-c", &script],
        ..Spawn::default()
    }
    .start();
    let port = sc
        .bridge
        .clone()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let text = crate::support::eventually(Duration::from_secs(10), "the app's env file", || {
        std::fs::read_to_string(&out)
            .ok()
            .filter(|t| t.contains("DAPR_HTTP_PORT"))
    });
    for line in [
        format!("DAPR_HTTP_PORT={port}"),
        format!("DAPR_HTTP_ENDPOINT=http://127.0.0.1:{port}"),
        "DAPR_API_TOKEN=tok".to_string(),
        "APP_API_TOKEN=apptok".to_string(),
        "APP_ID=envapp".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line} in:\n{text}"
        );
    }
}

#[test]
fn h2c_and_unix_socket() {
    let sc = start("", &[]);
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let r = h2.get(sc.bridge_url("/v1.0/healthz")).send().unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (204, reqwest::Version::HTTP_2)
    );
    let r = h2
        .post(sc.bridge_url("/v1.0/state/statestore"))
        .json(&json!([{"key": "h2", "value": 1}]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("dapr.sock");
    let config = format!("bridge:\n  address: unix:{}\n", sock.display());
    let sc = Sidecar::start(&config);
    sc.wait_ready();
    assert_eq!(
        sc.bridge.as_deref(),
        Some(format!("unix:{}", sock.display()).as_str())
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&sock)
        .arg("http://localhost/v1.0/healthz")
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "204",
        "{}",
        sc.diagnostics()
    );
}

/// `tests/js`, with `@dapr/dapr` installed (`npm ci`); None (after a loud message) only when
/// npm cannot reach its registry.
fn dapr_js_sdk() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if dir.join("node_modules/@dapr/dapr/package.json").is_file() {
        return Some(dir);
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .expect("npm must be installed for the Dapr JS SDK test");
    if out.status.success() {
        return Some(dir);
    }
    eprintln!(
        "\n\n!!!!!!!! SKIPPED: the Dapr JavaScript SDK end-to-end test: `npm ci` in tests/js failed (is the npm registry reachable?)\n{}\n!!!!!!!!\n",
        String::from_utf8_lossy(&out.stderr)
    );
    None
}

#[test]
fn dapr_js_sdk_end_to_end() {
    let Some(js) = dapr_js_sdk() else { return };
    let script = js.join("e2e.mjs");
    let app_port = free_port();
    // The callee: a DaprServer supervised by its own sidecar, reached through its inbound
    // listener.
    let server_config = format!(
        "service: server\napp:\n  address: 127.0.0.1:{app_port}\n  probe: {{ tcp: 127.0.0.1:{app_port} }}\n  env: {{ APP_PORT: \"{app_port}\" }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    direction: inbound\nbridge:\n  address: 127.0.0.1:0\n"
    );
    let server = Spawn {
        config: &server_config,
        app: &["node", script.to_str().unwrap(), "server"],
        ..Spawn::default()
    }
    .start();
    server.wait_ready();
    let client_config = format!(
        "service: client\nclusters:\n  server:\n    endpoints: [{}]\nbridge:\n  address: 127.0.0.1:0\n",
        server.listeners["public"]
    );
    let sidecar = Sidecar::start(&client_config);
    sidecar.wait_ready();
    let port = sidecar
        .bridge
        .clone()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let out = crate::support::output_within(
        Command::new("node")
            .arg(&script)
            .arg("client")
            .env("DAPR_HTTP_PORT", &port),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("JS client: {stdout}");
    assert!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "the JS client failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n--- client sidecar\n{}\n--- server sidecar\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sidecar.diagnostics(),
        server.diagnostics()
    );
}

#[test]
fn dapr_js_sdk_in_grpc_mode() {
    let Some(js) = dapr_js_sdk() else { return };
    let sc_grpc = Spawn {
        config: "service: client\nbridge:\n  address: 127.0.0.1:0\n",
        ..Spawn::default()
    }
    .start();
    sc_grpc.wait_ready();
    let port = sc_grpc
        .bridge_grpc
        .clone()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let out = crate::support::output_within(
        Command::new("node")
            .arg(js.join("e2e.mjs"))
            .arg("grpc-client")
            .env("DAPR_GRPC_PORT", &port)
            .env("DAPR_HTTP_PORT", &port),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"ok\":true"),
        "the JS gRPC client failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{}\n--- sidecar\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sc_grpc.diagnostics()
    );
}

#[test]
fn the_bridge_serves_the_app_until_it_has_exited() {
    let dir = tempfile::tempdir().unwrap();
    let (started, out) = (dir.path().join("started"), dir.path().join("out"));
    // On SIGTERM the app saves state through the bridge, then exits.
    let script = format!(
        "trap 'curl -s -o /dev/null -w \"%{{http_code}}\" -H content-type:application/json -d \"[{{\\\"key\\\":\\\"bye\\\",\\\"value\\\":1}}]\" $DAPR_HTTP_ENDPOINT/v1.0/state/statestore > {out}; exit 0' TERM; touch {started}; while true; do sleep 0.05; done",
        out = out.display(),
        started = started.display()
    );
    let mut sc = Spawn {
        config: "bridge:\n  address: 127.0.0.1:0\n",
        app: &["sh", "-c", &script],
        ..Spawn::default()
    }
    .start();
    crate::support::eventually(Duration::from_secs(10), "the app to start", || {
        started.exists().then_some(())
    });
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sc.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    assert_eq!(
        std::fs::read_to_string(&out).unwrap_or_default(),
        "204",
        "the app's last save during its stop\n{}",
        sc.diagnostics()
    );
}

/// A stop lets a delivery in flight finish before the app gets its stop signal (the app then
/// has no half-processed event), and the sidecar exits with the app's code.
#[test]
fn a_stop_lets_deliveries_in_flight_finish_before_the_app_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events");
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pubsub_app.py");
    let config = format!(
        "app:\n  address: 127.0.0.1:{port}\n  env: {{ PORT: \"{port}\", EVENTS: \"{}\" }}\nbridge:\n  address: 127.0.0.1:0\n",
        events.display()
    );
    let mut sc = Spawn {
        config: &config,
        app: &["python3", script],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let c = client();
    eventually(Duration::from_secs(10), "the app's subscription", || {
        let m: serde_json::Value = c
            .get(sc.bridge_url("/v1.0/metadata"))
            .send()
            .ok()?
            .json()
            .ok()?;
        (!m["subscriptions"].as_array()?.is_empty()).then_some(())
    });
    let r = c
        .post(sc.bridge_url("/v1.0/publish/pubsub/slow"))
        .json(&serde_json::json!({ "n": 1 }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    eventually(Duration::from_secs(10), "the delivery to start", || {
        std::fs::read_to_string(&events)
            .ok()?
            .contains("delivery-start")
            .then_some(())
    });
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sc.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    let text = std::fs::read_to_string(&events).unwrap();
    let order: Vec<&str> = text.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    assert_eq!(
        order,
        ["delivery-start", "delivery-end", "sigterm"],
        "{text}\n{}",
        sc.diagnostics()
    );
}

#[test]
fn bad_pubsub_metadata_and_subscriptions_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(dir.path(), "bridge:\n  address: 127.0.0.1:0\n");
    components.write(
        "pubsub.yaml",
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: events\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n    - { name: redisHost, value: localhost }\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: local\nspec:\n  type: pubsub.in-memory\n  version: v1\n",
    );
    components.write(
        "subs.yaml",
        "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata:\n  name: orders\nspec:\n  pubsubname: local\n  topic: orders\n  routes:\n    rules:\n      - match: event.type in [\"a\"]\n        path: /a\n    default: /orders\n",
    );
    for cmd in ["check", "run"] {
        let (code, _, stderr) = components.run(cmd, &[]);
        assert_eq!(code, 78, "{cmd}: {stderr}");
        // At the value of the key at fault, not the component's first line.
        assert!(stderr.contains("pubsub.yaml:9:1:"), "{cmd}: {stderr}");
        assert!(stderr.contains("redisHost"), "{cmd}: {stderr}");
        assert!(stderr.contains("subs.yaml:"), "{cmd}: {stderr}");
        assert!(stderr.contains("orders"), "{cmd}: {stderr}");
    }
}

#[test]
fn another_apps_pubsub_component_is_not_this_apps_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(
        dir.path(),
        "service: shop\nbridge:\n  address: 127.0.0.1:0\n",
    );
    // A shared directory: another app's component with a setting we do not support.
    components.write(
        "theirs.yaml",
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: events\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n    - { name: redisHost, value: localhost }\nscopes: [billing]\n",
    );
    let (code, _, stderr) = components.check();
    assert_eq!(code, 0, "{stderr}");
    // For the app it belongs to, it is an error.
    let (code, _, stderr) = components.run("check", &["--set", "service=billing"]);
    assert_eq!(code, 78, "{stderr}");
}

/// Without an API token, a web page on this host could write state or stop the sidecar with a
/// "simple" cross-origin POST: refused (403, Dapr-style JSON), nothing written; the SDK's calls
/// (no Origin) work as before.
#[test]
fn web_pages_cannot_write_state_or_stop_the_sidecar() {
    let sc = start("", &[]);
    let r = client()
        .post(sc.bridge_url("/v1.0/state/statestore"))
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body(r#"[{"key":"k","value":"evil"}]"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(&r.text().unwrap()), "ERR_CROSS_ORIGIN_REQUEST");
    let r = client()
        .post(sc.bridge_url("/v1.0/shutdown"))
        .header("origin", "null")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // DNS rebinding: the page's own name as Host (and as Origin, same-origin to the browser).
    let r = client()
        .post(sc.bridge_url("/v1.0/shutdown"))
        .header("host", "evil.example:3500")
        .header("origin", "http://evil.example:3500")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client()
        .get(sc.bridge_url("/v1.0/state/statestore/k"))
        .header("host", "evil.example:3500")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(&r.text().unwrap()), "ERR_FOREIGN_HOST");
    assert_eq!(
        get(&sc, "/v1.0/state/statestore/k").0,
        204,
        "nothing written"
    );
    let (s, _) = post(
        &sc,
        "/v1.0/state/statestore",
        json!([{"key": "k", "value": "ok"}]),
    );
    assert_eq!(s, 204);
    assert_eq!(get(&sc, "/v1.0/healthz").0, 204);
}

/// Silent sockets to the bridge were kept forever (no connection cap, no idle timeout): one
/// that sends nothing is closed after the 10 s header timeout.
#[test]
fn a_silent_connection_to_the_bridge_is_closed() {
    use std::io::Read;
    let sc = start("", &[]);
    let address = sc.bridge_url("");
    let address = address.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    // An error here is the 30 s read timeout: the bridge kept the socket.
    let n = s
        .read(&mut buf)
        .expect("the bridge closes the connection before the read times out");
    assert_eq!(n, 0, "expected the bridge to close the connection");
    // The bridge still answers.
    assert_eq!(get(&sc, "/v1.0/healthz").0, 204);
    // And counts it.
    assert_eq!(
        sc.metric("outrigger_bridge_connections_cut_total{reason=\"silent\"}"),
        1.0
    );
}

/// A down Redis made every state call wait 9.4 s for its 500 (the client's reconnect
/// retries): it now fails within the client's 5 s here, and the store is used again as soon
/// as Redis is back.
#[test]
fn a_down_redis_fails_fast_and_recovers() {
    let mut redis = RedisServer::start();
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: cache\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:{}\n",
        redis.port
    );
    // And one that was never up.
    let gone = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: gone\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: {}\n",
        crate::backend::dead_port()
    );
    // A broker and a lock store on the same server: probed and shown as the store is.
    let broker = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: events\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:{}\n",
        redis.port
    );
    let sc = start(
        "service: orders\n",
        &[
            ("redis.yaml", &component),
            ("gone.yaml", &gone),
            ("broker.yaml", &broker),
            ("lock.yaml", &lock_component("locks", &redis, "")),
        ],
    );
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // The health of each component, as `/v1.0/metadata` and its extended metadata show it.
    let health = |name: &str| -> (String, String) {
        let (s, _, body) = get(&sc, "/v1.0/metadata");
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let entry = v["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {body}"))
            .clone();
        let extended = v["extended"][format!("outrigger.health.{name}")]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let status = entry["status"].as_str().unwrap_or_default().to_string();
        if status == "unhealthy" {
            assert!(
                extended.starts_with("unhealthy: ") && entry["error"].is_string(),
                "{body}"
            );
        }
        (status, extended)
    };
    for name in ["cache", "events", "locks"] {
        eventually(Duration::from_secs(10), "healthy at start", || {
            (health(name).0 == "healthy").then_some(())
        });
    }
    eventually(
        Duration::from_secs(10),
        "a store down at start shown",
        || (health("gone").0 == "unhealthy").then_some(()),
    );
    let r = quick
        .get(sc.bridge_url("/v1.0/state/gone/k"))
        .send()
        .expect("a 500 well before the old 9.4 s");
    assert_eq!(r.status(), 500);
    let (s, _) = post(&sc, "/v1.0/state/cache", json!([{"key": "k", "value": 1}]));
    assert_eq!(s, 204);
    redis.kill();
    for name in ["cache", "events", "locks"] {
        eventually(Duration::from_secs(15), "unhealthy once down", || {
            (health(name).0 == "unhealthy").then_some(())
        });
    }
    let (s, body) = post(&sc, "/v1.0/publish/events/orders", json!({"a": 1}));
    assert_eq!(
        (s, error_code(&body).as_str()),
        (500, "ERR_PUBSUB_PUBLISH_MESSAGE"),
        "{body}"
    );
    for _ in 0..3 {
        let r = quick
            .get(sc.bridge_url("/v1.0/state/cache/k"))
            .send()
            .expect("a 500 well before the old 9.4 s");
        assert_eq!(r.status(), 500);
        assert_eq!(error_code(&r.text().unwrap()), "ERR_STATE_GET");
    }
    redis.restart();
    eventually(Duration::from_secs(15), "the store back", || {
        let r = quick
            .get(sc.bridge_url("/v1.0/state/cache/k"))
            .send()
            .ok()?;
        (r.status() == 200 || r.status() == 204).then_some(())
    });
    for name in ["cache", "events", "locks"] {
        eventually(Duration::from_secs(15), "healthy again", || {
            (health(name) == ("healthy".into(), "healthy".into())).then_some(())
        });
    }
    let (s, body) = post(&sc, "/v1.0/publish/events/orders", json!({"a": 1}));
    assert_eq!(s, 204, "{body}");
    assert_eq!(health("gone").0, "unhealthy");
}

/// A path segment that is not UTF-8 once decoded got axum's plain-text 400: now Dapr's JSON.
#[test]
fn undecodable_paths_get_dapr_errors() {
    let sc = start("", &[]);
    let (s, _, body) = get(&sc, "/v1.0/state/statestore/%FF");
    assert_eq!(s, 400, "{body}");
    assert_eq!(error_code(&body), "ERR_MALFORMED_REQUEST", "{body}");
}

#[test]
fn app_ids_without_a_cluster_are_resolved_by_the_name_template() {
    let backend = Backend::http();
    let port = backend.address().rsplit(':').next().unwrap().to_string();
    // `{app_id}:PORT`: the app id "localhost" is a name the resolver knows.
    let sc = start(&format!("  name_resolution: \"{{app_id}}:{port}\"\n"), &[]);
    let r = client()
        .post(sc.bridge_url("/v1.0/invoke/localhost/method/orders?x=1"))
        .body("hi")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", sc.diagnostics());
    let body: Value = r.json().unwrap();
    assert_eq!(body["path"], "/orders?x=1");
    assert_eq!(body["body"], "hi");
    // An app id that is not a DNS name is refused before any lookup.
    let r = client()
        .get(sc.bridge_url("/v1.0/invoke/bad%20id/method/x"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("cannot be resolved"));
    // The cluster it made reports like any other.
    assert!(sc.metric("outrigger_cluster_endpoints{cluster=\"localhost\"}") >= 1.0);
}

#[test]
fn a_bad_name_template_is_a_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "bridge:\n  name_resolution: \"{app}.svc:80\"\n").unwrap();
    let (code, _, stderr) = run_to_end(&["check", "-c", config.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("c.yaml:2:") && stderr.contains("{app_id}"),
        "{stderr}"
    );
}

/// GET with the `metadata.ttlExpireTime` header: (status, header, body).
fn get_ttl(sc: &Sidecar, path: &str) -> (u16, Option<String>, String) {
    let r = client().get(sc.bridge_url(path)).send().unwrap();
    let ttl = r
        .headers()
        .get("metadata.ttlExpireTime")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), ttl, r.text().unwrap())
}

/// `ttlInSeconds` against one store: a value expires (polled, bounded), the
/// `metadata.ttlExpireTime` header says when, a later save without a ttl keeps the value, and
/// invalid ttls are refused. Keys are prefixed with `tag` so stores can be shared.
fn ttl_contract(sc: &Sidecar, store: &str, tag: &str) {
    let save = |body: Value| post(sc, &format!("/v1.0/state/{store}"), body);
    let path = |key: &str| format!("/v1.0/state/{store}/{tag}-{key}");
    // Saved with a ttl, then again without: the second save clears the expiry.
    let (s, body) = save(
        json!([{"key": format!("{tag}-kept"), "value": 1, "metadata": {"ttlInSeconds": "1"}}]),
    );
    assert_eq!(s, 204, "{body}");
    let (s, body) = save(json!([{"key": format!("{tag}-kept"), "value": 2}]));
    assert_eq!(s, 204, "{body}");
    assert_eq!(get_ttl(sc, &path("kept")).1, None);
    // -1 is "never"; with it no header either.
    let (s, body) = save(
        json!([{"key": format!("{tag}-never"), "value": 3, "metadata": {"ttlInSeconds": "-1"}}]),
    );
    assert_eq!(s, 204, "{body}");
    assert_eq!(get_ttl(sc, &path("never")).1, None);
    let before = std::time::SystemTime::now();
    let (s, body) = save(
        json!([{"key": format!("{tag}-short"), "value": {"a": 1}, "metadata": {"ttlInSeconds": "1"}}]),
    );
    assert_eq!(s, 204, "{body}");
    let (s, expires, body) = get_ttl(sc, &path("short"));
    // Read back at once: still there (a 1 s ttl), with its expiry in RFC 3339.
    if s == 200 {
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"a": 1})
        );
        let expires = expires.expect("the metadata.ttlExpireTime header");
        let at = humantime::parse_rfc3339(&expires).unwrap_or_else(|e| panic!("{expires}: {e}"));
        assert!(
            at + Duration::from_secs(1) >= before && at <= before + Duration::from_secs(3),
            "{expires}"
        );
    }
    eventually(Duration::from_secs(10), "the value to expire", || {
        (get_ttl(sc, &path("short")).0 == 204).then_some(())
    });
    // Its first ttl has passed too: the save without one kept it.
    let (s, _, body) = get_ttl(sc, &path("kept"));
    assert_eq!((s, body.as_str()), (200, "2"));
    // An expired key is absent for ETags too: a write with its old ETag conflicts.
    let (s, body) = save(json!([{"key": format!("{tag}-short"), "value": 1, "etag": "1"}]));
    assert_eq!(s, 409, "{body}");
    // Transactions and the query string carry a ttl as well.
    let (s, body) = post(
        sc,
        &format!("/v1.0/state/{store}/transaction"),
        json!({"operations": [{"operation": "upsert", "request": {"key": format!("{tag}-tx"), "value": 1, "metadata": {"ttlInSeconds": "100"}}}]}),
    );
    assert_eq!(s, 204, "{body}");
    let expires = get_ttl(sc, &path("tx")).1.expect("metadata.ttlExpireTime");
    let at = humantime::parse_rfc3339(&expires).unwrap_or_else(|e| panic!("{expires}: {e}"));
    assert!(
        at > std::time::SystemTime::now() + Duration::from_secs(90),
        "{expires}"
    );
    let (s, body) = post(
        sc,
        &format!("/v1.0/state/{store}?metadata.ttlInSeconds=100"),
        json!([{"key": format!("{tag}-query"), "value": 1}]),
    );
    assert_eq!(s, 204, "{body}");
    assert!(get_ttl(sc, &path("query")).1.is_some());
    // Not an integer, or below -1: 400, and nothing is written.
    for bad in ["soon", "1.5", "-2"] {
        let (s, body) = save(json!([
            {"key": format!("{tag}-ok"), "value": 1},
            {"key": format!("{tag}-bad"), "value": 1, "metadata": {"ttlInSeconds": bad}},
        ]));
        assert_eq!(s, 400, "{bad}: {body}");
        assert_eq!(error_code(&body), "ERR_STATE_SAVE", "{body}");
        assert!(body.contains("ttlInSeconds"), "{body}");
        assert_eq!(get_ttl(sc, &path("ok")).0, 204);
    }
}

#[test]
fn ttl_in_memory() {
    let sc = start("", &[]);
    ttl_contract(&sc, "statestore", "mem");
}

#[test]
fn ttl_on_redis() {
    let redis = RedisServer::start();
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: cache\nspec:\n  type: state.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:{}\n",
        redis.port
    );
    let sc = start("service: orders\n", &[("redis.yaml", &component)]);
    // Redis itself expires the hash (EXPIRE in the write script).
    let (s, body) = post(
        &sc,
        "/v1.0/state/cache",
        json!([{"key": "long", "value": 1, "metadata": {"ttlInSeconds": "100"}}]),
    );
    assert_eq!(s, 204, "{body}");
    let ttl = redis.command(&["TTL", "orders||long"]).unwrap();
    let ttl: i64 = ttl.trim_start_matches(':').parse().unwrap();
    assert!(ttl > 0 && ttl <= 100, "{ttl}");
    // A save without a ttl makes it persistent again (PERSIST).
    assert_eq!(
        post(
            &sc,
            "/v1.0/state/cache",
            json!([{"key": "long", "value": 2}])
        )
        .0,
        204
    );
    assert_eq!(redis.command(&["TTL", "orders||long"]).unwrap(), ":-1");
    ttl_contract(&sc, "cache", "redis");
}

#[test]
fn ttl_on_sqlite_and_an_older_table_is_migrated() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("state.db");
    // A table as earlier versions made it, without the expiry column, with a value in it.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE state (key TEXT NOT NULL PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL);
             INSERT INTO state VALUES ('app||old', CAST('\"before\"' AS BLOB), 4);",
        )
        .unwrap();
    }
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: db\nspec:\n  type: state.sqlite\n  version: v1\n  metadata:\n  - name: connectionString\n    value: {}\n",
        db.display()
    );
    let sc = start("service: app\n", &[("db.yaml", &component)]);
    let (s, etag, body) = get(&sc, "/v1.0/state/db/old");
    assert_eq!(
        (s, etag.as_deref(), body.as_str()),
        (200, Some("4"), "\"before\""),
        "{}",
        sc.diagnostics()
    );
    ttl_contract(&sc, "db", "sqlite");
}

/// `spec.ignoreErrors: true`: a component that cannot be opened (bad metadata found by the
/// preflight stage, an unknown type, a SQLite file that cannot be created at start) is logged
/// and skipped, the others serve, and `/v1.0/metadata` lists it under `extended`. Without the
/// flag the same component stops `check` and `run` with exit 78 and its file and line.
#[test]
fn ignore_errors_skips_a_failing_component_and_shows_it() {
    let component = |name: &str, kind: &str, meta: &str, ignore: bool| {
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n  ignoreErrors: {ignore}\n  metadata:\n{meta}"
        )
    };
    let bad_redis = "  - name: redisHost\n    value: no-port-here\n";
    let bad_sqlite =
        "  - name: connectionString\n    value: /nonexistent-dir/for/outrigger/state.db\n";
    let sc = start(
        "service: app\n",
        &[
            (
                "a-bad-redis.yaml",
                &component("cache", "state.redis", bad_redis, true),
            ),
            (
                "b-bad-sqlite.yaml",
                &component("db", "state.sqlite", bad_sqlite, true),
            ),
            (
                "c-unknown.yaml",
                &component("events", "pubsub.kafka", "    []\n", true),
            ),
            (
                "d-bad-pubsub.yaml",
                &component("bus", "pubsub.redis", "    []\n", true),
            ),
            (
                "e-good.yaml",
                &component("good", "state.in-memory", "    []\n", false),
            ),
        ],
    );
    let (s, _, body) = get(&sc, "/v1.0/metadata");
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["good"], "{body}");
    for (name, kind, file) in [
        ("cache", "state.redis", "a-bad-redis.yaml"),
        ("db", "state.sqlite", "b-bad-sqlite.yaml"),
        ("events", "pubsub.kafka", "c-unknown.yaml"),
        ("bus", "pubsub.redis", "d-bad-pubsub.yaml"),
    ] {
        let note = v["extended"][format!("outrigger.skipped.{name}")]
            .as_str()
            .unwrap_or_else(|| panic!("{name} not in extended: {body}"));
        assert!(note.starts_with(kind) && note.contains(file), "{note}");
    }
    assert!(
        sc.stderr().contains("ignoring error opening component")
            || sc.stdout().contains("ignoring error opening component"),
        "{}",
        sc.diagnostics()
    );
    assert_eq!(
        post(&sc, "/v1.0/state/good", json!([{"key": "k", "value": 1}])).0,
        204
    );
    let (s, body) = post(&sc, "/v1.0/state/cache", json!([{"key": "k", "value": 1}]));
    assert_eq!(
        (s, error_code(&body).as_str()),
        (400, "ERR_STATE_STORE_NOT_FOUND")
    );
    drop(sc);

    // Without the flag: refused before anything starts, located, by `check` too.
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(dir.path(), "bridge:\n  address: 127.0.0.1:0\n");
    components.write(
        "redis.yaml",
        component("cache", "state.redis", bad_redis, false),
    );
    for cmd in ["check", "run"] {
        let (code, _, stderr) = components.run(cmd, &[]);
        assert_eq!(code, 78, "{cmd}: {stderr}");
        assert!(stderr.contains("redis.yaml:11:"), "{cmd}: {stderr}");
        assert!(stderr.contains("redisHost"), "{cmd}: {stderr}");
    }
}

/// `lock.redis` as the Dapr docs write it (`redisHost`, an empty `redisPassword`).
fn lock_component(name: &str, redis: &RedisServer, extra: &str) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: lock.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: localhost:{}\n  - name: redisPassword\n    value: \"\"\n{extra}",
        redis.port
    )
}

/// Two lockers at once: exactly one wins; the key is daprd's and expires; only the owner
/// releases it, with daprd's numeric statuses; an expired lock can be taken again.
#[test]
fn lock_one_winner_owner_checked_release_and_expiry() {
    let redis = RedisServer::start();
    let sc = start(
        "service: orders\n",
        &[("lock.yaml", &lock_component("lockstore", &redis, ""))],
    );
    let lock = |owner: &str, resource: &str, expiry: i64| {
        let (s, body) = post(
            &sc,
            "/v1.0-alpha1/lock/lockstore",
            json!({"resourceId": resource, "lockOwner": owner, "expiryInSeconds": expiry}),
        );
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["success"].as_bool().unwrap_or_else(|| panic!("{body}"))
    };
    let unlock = |owner: &str, resource: &str| {
        let (s, body) = post(
            &sc,
            "/v1.0-alpha1/unlock/lockstore",
            json!({"resourceId": resource, "lockOwner": owner}),
        );
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["status"].as_i64().unwrap_or_else(|| panic!("{body}"))
    };
    // Eight lockers released together, several rounds: one winner each round.
    for round in 0..5 {
        let resource = format!("order-{round}");
        let barrier = std::sync::Barrier::new(8);
        let winners: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (barrier, resource, lock) = (&barrier, &resource, &lock);
                    s.spawn(move || {
                        let owner = format!("owner-{i}");
                        barrier.wait();
                        lock(&owner, resource, 60).then_some(owner)
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        // daprd's key, holding the owner, with an expiry.
        let key = format!("lock||orders||{resource}");
        assert_eq!(
            redis.command(&["GET", &key]).unwrap(),
            format!("${}\r\n{}", winners[0].len(), winners[0])
        );
        let ttl: i64 = redis.command(&["TTL", &key]).unwrap()[1..].parse().unwrap();
        assert!((1..=60).contains(&ttl), "{ttl}");
        // Someone else cannot release it; the owner can, once.
        assert_eq!(unlock("intruder", &resource), 2);
        assert_eq!(unlock(&winners[0], &resource), 0);
        assert_eq!(unlock(&winners[0], &resource), 1);
        assert!(lock("intruder", &resource, 60));
    }
    // Expiry: a one-second lock is free again without an unlock.
    assert!(lock("a", "short", 1));
    assert!(!lock("b", "short", 1));
    eventually(Duration::from_secs(10), "the lock to expire", || {
        lock("b", "short", 30).then_some(())
    });
    assert_eq!(unlock("a", "short"), 2);
    // Proto field names and a string expiry are read too (protojson).
    let (s, body) = post_raw(
        &sc,
        "/v1.0-alpha1/lock/lockstore",
        r#"{"resource_id":"p","lock_owner":"me","expiry_in_seconds":"5"}"#,
    );
    assert_eq!((s, body), (200, json!({"success": true})));
    // daprd's validation, in its order, and its error codes.
    for (body, code, text) in [
        (
            json!({"lockOwner": "me", "expiryInSeconds": 5}),
            "ERR_MALFORMED_REQUEST",
            "ResourceId is empty in lock store lockstore",
        ),
        (
            json!({"resourceId": "r", "expiryInSeconds": 5}),
            "ERR_MALFORMED_REQUEST",
            "LockOwner is empty in lock store lockstore",
        ),
        (
            json!({"resourceId": "r", "lockOwner": "me"}),
            "ERR_MALFORMED_REQUEST",
            "ExpiryInSeconds is not positive in lock store lockstore",
        ),
        (
            json!({"resourceId": "a||b", "lockOwner": "me", "expiryInSeconds": 5}),
            "ERR_TRY_LOCK",
            "can't contain '||'",
        ),
    ] {
        let (s, got) = post(&sc, "/v1.0-alpha1/lock/lockstore", body);
        assert!(s == 400 || s == 500, "{got}");
        assert_eq!(error_code(&got), code, "{got}");
        assert!(got.contains(text), "{got}");
    }
    let (s, got) = post(
        &sc,
        "/v1.0-alpha1/lock/nope",
        json!({"resourceId": "r", "lockOwner": "me", "expiryInSeconds": 5}),
    );
    assert_eq!(
        (s, error_code(&got)),
        (400, "ERR_LOCK_STORE_NOT_FOUND".into())
    );
    // Counted under its own api label.
    assert!(sc.metric("outrigger_bridge_requests_total{api=\"lock\",status_class=\"2xx\"}") > 10.0);
}

/// A lock store that is down answers each call with a clear 500 and serves again once Redis
/// is back; without a lock component the routes say so.
#[test]
fn lock_store_down_fails_per_request_and_recovers() {
    let mut redis = RedisServer::start();
    let sc = start(
        "service: orders\n",
        &[("lock.yaml", &lock_component("lockstore", &redis, ""))],
    );
    let body = json!({"resourceId": "r", "lockOwner": "me", "expiryInSeconds": 30});
    redis.kill();
    for path in [
        "/v1.0-alpha1/lock/lockstore",
        "/v1.0-alpha1/unlock/lockstore",
    ] {
        let (s, got) = post(&sc, path, body.clone());
        assert_eq!(s, 500, "{got}");
        let code = if path.contains("unlock") {
            "ERR_UNLOCK"
        } else {
            "ERR_TRY_LOCK"
        };
        assert_eq!(error_code(&got), code, "{got}");
        assert!(got.contains("redis"), "{got}");
    }
    redis.restart();
    eventually(Duration::from_secs(15), "the lock store back", || {
        let (s, got) = post(&sc, "/v1.0-alpha1/lock/lockstore", body.clone());
        (s == 200 && got.contains("true")).then_some(())
    });
    let plain = start("service: orders\n", &[]);
    let (s, got) = post(&plain, "/v1.0-alpha1/lock/lockstore", body);
    assert_eq!(
        (s, error_code(&got)),
        (400, "ERR_LOCK_STORE_NOT_CONFIGURED".into())
    );
}

/// The Dapr docs' `lock.redis` YAML is accepted unchanged by `check`; a mistake in it is
/// located at the component (file:line, exit 78).
#[test]
fn lock_component_is_checked_and_located() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(dir.path(), "bridge:\n");
    components.write("lock.yaml", lock_component("lockstore", &redis, ""));
    let (code, _, stderr) = components.check();
    assert_eq!(code, 0, "{stderr}");
    components.write(
        "lock.yaml",
        "# a comment\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: lockstore\nspec:\n  type: lock.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: no-port\n",
    );
    let (code, _, stderr) = components.check();
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("lock.yaml:"), "{stderr}");
    assert!(stderr.contains("redisHost"), "{stderr}");
}

/// `state.postgresql` as the Dapr docs write it (`connectionString` in key=value form).
fn postgres_component(name: &str, kind: &str, connection: &str, extra: &str) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n  metadata:\n  - name: connectionString\n    value: \"{connection}\"\n{extra}"
    )
}

/// The whole state contract, concurrency and TTL on PostgreSQL, in daprd's v1 layout: the
/// table is created, rows read back as daprd writes them (JSON and base64 `isbinary`), the
/// ETag is `xmin`, expired rows are deleted by the cleanup.
#[test]
fn postgres_state_store() {
    let db = PostgresDb::create();
    let components = [
        (
            "pg.yaml",
            postgres_component(
                "pg",
                "state.postgresql",
                &db.connection_string(),
                "  - name: cleanupInterval\n    value: 1s\n",
            ),
        ),
        (
            "pg2.yaml",
            postgres_component(
                "pg2",
                "state.postgres",
                &db.connection_string(),
                "  - name: tableName\n    value: other\n  - name: keyPrefix\n    value: none\n",
            ),
        ),
    ];
    let components: Vec<(&str, &str)> = components.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let sc = start("service: orders\n", &components);
    state_contract(&sc, "pg");
    concurrent_counter(&sc, "pg");
    // An ETag past 32 bits cannot be an xmin: 400 as daprd (uint32), not a 409 mismatch.
    let (s, body) = post(
        &sc,
        "/v1.0/state/pg",
        json!([{"key": "wide", "value": 1, "etag": "4294967296"}]),
    );
    assert_eq!(s, 400, "{body}");
    ttl_contract(&sc, "pg", "pg");
    // daprd's layout: the columns, the migration level, JSON stored as jsonb, the ETag = xmin.
    let columns = db.sql(
        "SELECT string_agg(column_name || ':' || data_type, ',' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_name = 'state'",
    );
    assert_eq!(
        columns,
        "key:text,value:jsonb,isbinary:boolean,insertdate:timestamp with time zone,updatedate:timestamp with time zone,expiredate:timestamp with time zone"
    );
    assert_eq!(
        db.sql("SELECT value FROM dapr_metadata WHERE key = 'migrations'"),
        "2"
    );
    assert_eq!(
        db.sql("SELECT value::text || '|' || isbinary FROM state WHERE key = 'orders||pg-kept'"),
        "2|false"
    );
    let xmin = db.sql("SELECT xmin FROM state WHERE key = 'orders||pg-kept'");
    assert_eq!(
        get(&sc, "/v1.0/state/pg/pg-kept").1.as_deref(),
        Some(xmin.as_str())
    );
    // Rows daprd wrote: JSON, and bytes as base64 with isbinary.
    db.sql(
        "INSERT INTO state (key, value, isbinary) VALUES ('orders||fromdapr', '{\"n\": 7}', false), ('orders||bytes', '\"aGk=\"', true)",
    );
    let (s, _, body) = get(&sc, "/v1.0/state/pg/fromdapr");
    assert_eq!((s, body.as_str()), (200, r#"{"n": 7}"#));
    assert_eq!(get(&sc, "/v1.0/state/pg/bytes").2, "hi");
    // The cleanup deleted the expired row (cleanupInterval: 1s), polled.
    eventually(
        Duration::from_secs(15),
        "the cleanup of expired rows",
        || {
            (db.sql("SELECT count(*) FROM state WHERE key = 'orders||pg-short'") == "0")
                .then_some(())
        },
    );
    // The alias, another table, no prefix.
    let (s, body) = post(
        &sc,
        "/v1.0/state/pg2",
        json!([{"key": "plain", "value": [1, 2]}]),
    );
    assert_eq!(s, 204, "{body}");
    assert_eq!(
        db.sql("SELECT value::text FROM other WHERE key = 'plain'"),
        "[1, 2]"
    );
}

/// A database that is down (or not there) fails each call with a clear 500 and is used as
/// soon as it is there; `check` accepts the docs' YAML and locates a mistake.
#[test]
fn postgres_down_fails_per_request_and_recovers() {
    let name = format!("outrigger_test_late_{}", std::process::id());
    let connection = format!("host=127.0.0.1 user=postgres port=5432 database={name}");
    let sc = start(
        "service: orders\n",
        &[(
            "pg.yaml",
            &postgres_component("pg", "state.postgresql", &connection, ""),
        )],
    );
    let (s, _, body) = get(&sc, "/v1.0/state/pg/k");
    assert_eq!(
        (s, error_code(&body).as_str()),
        (500, "ERR_STATE_GET"),
        "{body}"
    );
    assert!(
        body.contains("postgresql") && body.contains(&name),
        "{body}"
    );
    let (s, body) = post(&sc, "/v1.0/state/pg", json!([{"key": "k", "value": 1}]));
    assert_eq!(
        (s, error_code(&body).as_str()),
        (500, "ERR_STATE_SAVE"),
        "{body}"
    );
    eventually(
        Duration::from_secs(15),
        "pg unhealthy in the metadata",
        || {
            let v: Value = serde_json::from_str(&get(&sc, "/v1.0/metadata").2).ok()?;
            let c = v["components"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "pg")?;
            (c["status"] == "unhealthy" && c["error"].as_str()?.contains(&name)).then_some(())
        },
    );
    // The database appears: the next calls create the table and work.
    let db = PostgresDb { name };
    let _ = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtq",
            "-c",
        ])
        .arg(format!("CREATE DATABASE {}", db.name))
        .output();
    eventually(Duration::from_secs(15), "the database", || {
        (post(&sc, "/v1.0/state/pg", json!([{"key": "k", "value": 1}])).0 == 204).then_some(())
    });
    assert_eq!(get(&sc, "/v1.0/state/pg/k").2, "1");
    // The probe saw it too: the store shows healthy in the metadata.
    eventually(
        Duration::from_secs(15),
        "pg healthy in the metadata",
        || {
            let v: Value = serde_json::from_str(&get(&sc, "/v1.0/metadata").2).ok()?;
            let c = v["components"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "pg")?;
            (c["status"] == "healthy").then_some(())
        },
    );

    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(dir.path(), "bridge:\n");
    components.write(
        "pg.yaml",
        postgres_component("pg", "state.postgresql", &connection, ""),
    );
    let (code, _, stderr) = components.check();
    assert_eq!(code, 0, "{stderr}");
    components.write(
        "pg.yaml",
        postgres_component(
            "pg",
            "state.postgresql",
            &connection,
            "  - name: tableName\n    value: \"bad name\"\n",
        ),
    );
    let (code, _, stderr) = components.check();
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("pg.yaml:") && stderr.contains("tableName"),
        "{stderr}"
    );
}

/// `configuration.redis` as the Dapr docs write it, on a Redis with keyspace notifications.
fn configuration_component(redis: &RedisServer) -> String {
    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "notify-keyspace-events", "KA"])
            .unwrap(),
        "+OK"
    );
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: configstore\nspec:\n  type: configuration.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: localhost:{}\n  - name: redisPassword\n    value: \"\"\n",
        redis.port
    )
}

/// Get (both API versions), subscribe: a `redis-cli SET` reaches the app as daprd sends it
/// (polled, bounded), unsubscribe stops it; and the errors.
#[test]
fn configuration_get_subscribe_and_unsubscribe_on_redis() {
    let redis = RedisServer::start();
    let app = Backend::http();
    let sc = start(
        &format!("service: orders\napp:\n  address: {}\n", app.address()),
        &[("config.yaml", &configuration_component(&redis))],
    );
    redis.command(&["SET", "orderconfig", "v1||1"]);
    redis.command(&["SET", "plain", "x"]);
    for version in ["v1.0", "v1.0-alpha1"] {
        let (s, _, body) = get(
            &sc,
            &format!("/{version}/configuration/configstore?key=orderconfig&key=missing"),
        );
        assert_eq!(s, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"orderconfig": {"value": "v1", "version": "1", "metadata": {}}})
        );
    }
    // No keys: all of them.
    let (s, _, body) = get(&sc, "/v1.0/configuration/configstore");
    assert_eq!(s, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        all["plain"],
        json!({"value": "x", "version": "", "metadata": {}})
    );
    assert_eq!(
        get(&sc, "/v1.0/configuration/configstore?key=missing").0,
        204
    );
    let (s, _, body) = get(&sc, "/v1.0/configuration/nope?key=a");
    assert_eq!(
        (s, error_code(&body).as_str()),
        (400, "ERR_CONFIGURATION_STORE_NOT_FOUND")
    );

    let (s, _, body) = get(
        &sc,
        "/v1.0-alpha1/configuration/configstore/subscribe?key=orderconfig",
    );
    assert_eq!(s, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 36, "{id}");
    redis.command(&["SET", "orderconfig", "v2||2"]);
    redis.command(&["SET", "unwatched", "z||9"]);
    let seen = eventually(Duration::from_secs(10), "the change at the app", || {
        app.seen()
            .into_iter()
            .find(|s| s.path == "/configuration/configstore/orderconfig")
    });
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        json!({"id": id, "items": {"orderconfig": {"value": "v2", "version": "2", "metadata": {}}}})
    );
    // Unsubscribed: later changes do not reach the app; a second unsubscribe is an error.
    let (s, _, body) = get(
        &sc,
        &format!("/v1.0/configuration/configstore/{id}/unsubscribe"),
    );
    assert_eq!((s, body.as_str()), (200, r#"{"ok":true}"#));
    let (s, _, body) = get(
        &sc,
        &format!("/v1.0/configuration/configstore/{id}/unsubscribe"),
    );
    assert_eq!(s, 500, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ok"], false);
    // A fresh subscription sees the next change; the old one sent nothing more.
    let (_, _, body) = get(
        &sc,
        "/v1.0/configuration/configstore/subscribe?key=orderconfig",
    );
    let id2 = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    redis.command(&["SET", "orderconfig", "v3||3"]);
    eventually(Duration::from_secs(10), "the second change", || {
        app.seen()
            .iter()
            .any(|s| String::from_utf8_lossy(&s.body).contains("v3"))
            .then_some(())
    });
    let old = app
        .seen()
        .iter()
        .filter(|s| String::from_utf8_lossy(&s.body).contains(&id))
        .count();
    assert_eq!(old, 1, "the unsubscribed watch sent only the first change");
    assert!(app.seen().iter().all(|s| !s.path.contains("unwatched")));
    let _ = id2;
}

/// `bindings.http` as the Dapr docs write it: the operation is the method, `path` is appended,
/// other metadata goes as headers; the answer's body, status and headers come back; a non-2xx
/// answer is 500 `ERR_INVOKE_OUTPUT_BINDING`.
#[test]
fn output_binding_http() {
    let backend = Backend::http();
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: webhook\nspec:\n  type: bindings.http\n  version: v1\n  metadata:\n  - name: url\n    value: http://{}/\n",
        backend.address()
    );
    let sc = start("service: orders\n", &[("http.yaml", &component)]);
    let r = client()
        .post(sc.bridge_url("/v1.0/bindings/webhook"))
        .json(&json!({"data": {"n": 1}, "metadata": {"path": "/items", "x-team": "pay"}, "operation": "create"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["metadata.statusCode"], "200");
    assert_eq!(r.headers()["metadata.status"], "200 OK");
    let echoed: Value = r.json().unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/items");
    assert_eq!(echoed["body"], r#"{"n":1}"#);
    let seen = backend.seen();
    assert_eq!(seen[0].header("x-team"), Some("pay"));
    // A JSON string is sent as its text; `Operation` matches ignoring case; PUT works too.
    let r = client()
        .put(sc.bridge_url("/v1.0/bindings/webhook"))
        .json(&json!({"Data": "plain text", "Operation": "put"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let echoed: Value = r.json().unwrap();
    assert_eq!(
        (echoed["method"].as_str(), echoed["body"].as_str()),
        (Some("PUT"), Some("plain text"))
    );
    // An answer without a body is still an answer: 200 (daprd), with its status as metadata.
    let (s, md, body) = invoke_binding(
        &sc,
        "webhook",
        json!({"operation": "get", "metadata": {"path": "/status/204"}}),
    );
    assert_eq!((s, body.as_str()), (200, ""));
    assert_eq!(md.get("statuscode").map(String::as_str), Some("204"));
    // A request's errorIfNot2XX turns the check off for that call (contrib's IsTruthy).
    let (s, md, body) = invoke_binding(
        &sc,
        "webhook",
        json!({"operation": "get", "metadata": {"path": "/status/503", "errorIfNot2XX": "false"}}),
    );
    assert_eq!((s, body.as_str()), (200, "status 503\n"));
    assert_eq!(md.get("statuscode").map(String::as_str), Some("503"));
    // The server's error, an unknown operation, an unknown binding: 500 with daprd's code.
    for (body, text) in [
        (
            json!({"operation": "get", "metadata": {"path": "/status/503"}}),
            "received status code 503",
        ),
        (json!({"operation": "merge"}), "invalid operation"),
    ] {
        let (s, got) = post(&sc, "/v1.0/bindings/webhook", body);
        assert_eq!(
            (s, error_code(&got).as_str()),
            (500, "ERR_INVOKE_OUTPUT_BINDING"),
            "{got}"
        );
        assert!(
            got.contains("error invoking output binding webhook") && got.contains(text),
            "{got}"
        );
    }
    let (s, got) = post(&sc, "/v1.0/bindings/nope", json!({"operation": "create"}));
    assert_eq!(
        (s, error_code(&got).as_str()),
        (500, "ERR_INVOKE_OUTPUT_BINDING"),
        "{got}"
    );
    let (s, v) = post_raw(&sc, "/v1.0/bindings/webhook", "not json");
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (400, Some("ERR_MALFORMED_REQUEST"))
    );
}

/// Tables made beforehand (by a DBA, or by daprd) and a role that may only read and write rows:
/// no DDL runs, so the store works (it needed CREATE and ownership on every start before).
#[test]
fn postgres_state_works_for_a_role_without_ddl_rights() {
    let db = PostgresDb::create();
    // First start as the owner: the tables are created at daprd's migration level 2.
    let owner = postgres_component("pg", "state.postgresql", &db.connection_string(), "");
    let sc = start("service: orders\n", &[("pg.yaml", owner.as_str())]);
    let (s, _) = post(&sc, "/v1.0/state/pg", json!([{"key": "a", "value": 1}]));
    assert_eq!(s, 204);
    drop(sc);
    let role = format!("{}_dml", db.name);
    db.sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON state, dapr_metadata TO {role}; REVOKE CREATE ON SCHEMA public FROM PUBLIC; REVOKE CREATE ON SCHEMA public FROM {role};"
    ));
    let dml = db
        .connection_string()
        .replace("user=postgres", &format!("user={role}"));
    let limited = postgres_component("pg", "state.postgresql", &dml, "");
    let sc = start("service: orders\n", &[("pg.yaml", limited.as_str())]);
    let (s, body) = post(&sc, "/v1.0/state/pg", json!([{"key": "b", "value": 2}]));
    assert_eq!(s, 204, "{body}\n{}", sc.diagnostics());
    let (s, _, body) = get(&sc, "/v1.0/state/pg/a");
    assert_eq!((s, body.as_str()), (200, "1"));
    drop(sc);
    db.sql(&format!(
        "REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role};"
    ));
    PostgresDb::drop_role(&role);
}

/// `bindings.cron` as the Dapr docs write it.
fn cron_component(name: &str, schedule: &str, extra: &str) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: bindings.cron\n  version: v1\n  metadata:\n  - name: schedule\n    value: \"{schedule}\" # valid cron schedule\n{extra}"
    )
}

/// Input bindings as daprd sends them: once the app is ready, `OPTIONS /{route}` (2xx: it
/// listens; 404: the binding stays idle), then `POST /{route}` per tick with `readTimeUTC` and
/// `timeZone` headers: an `@every 1s` and a six-field schedule each reach the app twice.
#[test]
fn cron_input_bindings_reach_the_app() {
    let app = Backend::http();
    let sc = start(
        &format!("service: orders\napp:\n  address: {}\n", app.address()),
        &[
            ("tick.yaml", &cron_component("tick", "@every 1s", "")),
            (
                "six.yaml",
                &cron_component(
                    "six",
                    "* * * * * *",
                    "  - name: route\n    value: /every-second\n  - name: timeZone\n    value: UTC\n",
                ),
            ),
            (
                "idle.yaml",
                &cron_component(
                    "idle",
                    "@every 1s",
                    "  - name: route\n    value: /status/404\n",
                ),
            ),
        ],
    );
    let posts = |path: &str| {
        app.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.path == path)
            .count()
    };
    eventually(Duration::from_secs(30), "two ticks of each binding", || {
        (posts("/tick") >= 2 && posts("/every-second") >= 2).then_some(())
    });
    let seen = app.seen();
    let first = |method: &str, path: &str| {
        seen.iter()
            .position(|s| s.method == method && s.path == path)
            .unwrap_or_else(|| panic!("no {method} {path}: {seen:?}"))
    };
    assert!(first("OPTIONS", "/tick") < first("POST", "/tick"));
    assert!(first("OPTIONS", "/every-second") < first("POST", "/every-second"));
    // The app answered 404 to OPTIONS: that binding never sends.
    assert!(
        seen.iter()
            .any(|s| s.method == "OPTIONS" && s.path == "/status/404")
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.method == "POST" && s.path == "/status/404")
    );
    let tick = &seen[first("POST", "/every-second")];
    assert_eq!(tick.header("timezone"), Some("UTC"));
    assert!(
        tick.header("readtimeutc")
            .is_some_and(|t| t.ends_with(" +0000 UTC")),
        "{tick:?}"
    );
    assert!(tick.body.is_empty());
    assert!(
        sc.metric(r#"outrigger_bindings_input_events_total{binding="tick",result="success"}"#)
            >= 2.0
    );
}

/// The Dapr docs' YAML for `pubsub.rabbitmq`, `pubsub.mqtt3` and `bindings.cron` is accepted
/// unchanged by `check`; a mistake in each is located at its component (file:line, exit 78).
#[test]
fn rabbitmq_mqtt_and_cron_components_are_checked_and_located() {
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(dir.path(), "bridge:\n");
    let rabbit = "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: rabbitmq-pubsub\nspec:\n  type: pubsub.rabbitmq\n  version: v1\n  metadata:\n  - name: connectionString\n    value: \"amqp://localhost:5672\"\n  - name: protocol\n    value: amqp\n  - name: hostname\n    value: localhost\n  - name: username\n    value: username\n  - name: password\n    value: password\n  - name: consumerID\n    value: channel1\n  - name: durable\n    value: false\n  - name: deletedWhenUnused\n    value: false\n  - name: autoAck\n    value: false\n  - name: deliveryMode\n    value: 0\n  - name: requeueInFailure\n    value: false\n  - name: prefetchCount\n    value: 0\n  - name: reconnectWait\n    value: 0\n  - name: concurrencyMode\n    value: parallel\n  - name: publisherConfirm\n    value: false\n  - name: enableDeadLetter # Optional enable dead Letter or not\n    value: true\n  - name: maxLen # Optional max message count in a queue\n    value: 3000\n  - name: maxLenBytes # Optional maximum length in bytes of a queue.\n    value: 10485760\n  - name: exchangeKind\n    value: fanout\n";
    let mqtt = "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: mqtt-pubsub\nspec:\n  type: pubsub.mqtt3\n  version: v1\n  metadata:\n  - name: url\n    value: \"tcp://[username][:password]@host.domain[:port]\"\n  - name: qos\n    value: 1\n  - name: retain\n    value: \"false\"\n  - name: cleanSession\n    value: \"false\"\n";
    let cron = cron_component(
        "scheduled",
        "@every 15m",
        "  - name: direction\n    value: \"input\"\n",
    );
    // The docs' placeholder URL is not a URL: the docs' own example with a real host passes.
    let mqtt_real = mqtt.replace(
        "tcp://[username][:password]@host.domain[:port]",
        "tcp://localhost:1883",
    );
    for (file, text) in [
        ("rabbit.yaml", rabbit),
        ("mqtt.yaml", mqtt_real.as_str()),
        ("cron.yaml", cron.as_str()),
    ] {
        components.write(file, text);
    }
    let (code, _, stderr) = components.check();
    assert_eq!(code, 0, "{stderr}");
    for (file, text, key) in [
        (
            "rabbit.yaml",
            rabbit.replace(
                "value: 0\n  - name: requeueInFailure",
                "value: 5\n  - name: requeueInFailure",
            ),
            "deliveryMode",
        ),
        ("mqtt.yaml", mqtt.to_string(), "url"),
        (
            "cron.yaml",
            cron_component("scheduled", "every 15 minutes", ""),
            "schedule",
        ),
    ] {
        let good = components.read(file);
        let text = format!("# a comment\n{text}");
        components.write(file, &text);
        let (code, _, stderr) = components.check();
        assert_eq!(code, 78, "{file}: {stderr}");
        // Located at the faulty key's value: the line after its `- name:`.
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with(&format!("- name: {key}")))
            .unwrap()
            + 2;
        assert!(
            stderr.contains(&format!("{file}:{line}:")),
            "{file}: {stderr}"
        );
        assert!(stderr.contains(key), "{file}: {stderr}");
        components.write(file, good);
    }
}

/// A PostgreSQL call that times out does not leave its statement running on a pooled
/// connection (it waited there on a row lock until the lock was released, holding up the next
/// user of that connection): the server cancels it at the component's `timeout`.
#[test]
fn postgres_timed_out_statements_do_not_keep_running() {
    let db = PostgresDb::create();
    let component = postgres_component(
        "pg",
        "state.postgresql",
        &db.connection_string(),
        "  - name: timeout\n    value: \"1s\"\n",
    );
    let sc = start("service: orders\n", &[("pg.yaml", component.as_str())]);
    let (s, _) = post(&sc, "/v1.0/state/pg", json!([{"key": "a", "value": 1}]));
    assert_eq!(s, 204);
    let (_, etag, _) = get(&sc, "/v1.0/state/pg/a");
    // Another session holds the row's lock for a minute.
    let mut holder = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", &db.name, "-XAtq", "-c"])
        .arg("BEGIN; SELECT 1 FROM state WHERE key = 'orders||a' FOR UPDATE; SELECT pg_sleep(60); COMMIT;")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
    eventually(Duration::from_secs(30), "the lock holder", || {
        (db.sql(&format!(
            "{others} AND query LIKE '%pg_sleep(60)%' AND state = 'active'"
        )) == "1")
            .then_some(())
    });
    // A write with the ETag locks the row first: it waits, and fails at the timeout.
    let (s, body) = post(
        &sc,
        "/v1.0/state/pg",
        json!([{"key": "a", "value": 2, "etag": etag.unwrap()}]),
    );
    assert_eq!(s, 500, "{body}");
    // Its statement is gone from the server (it would wait out the minute otherwise).
    eventually(
        Duration::from_secs(30),
        "no statement of ours waiting on the lock",
        || (db.sql(&format!("{others} AND wait_event_type = 'Lock'")) == "0").then_some(()),
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

/// `bindings.mqtt3` both ways on the machine's Mosquitto: `create` publishes to the topic, the
/// same component's input side reads it back and POSTs it to the app (after `OPTIONS`).
#[test]
fn mqtt3_binding_round_trip() {
    let app = Backend::http();
    let prefix = format!("outrigger-test-{:08x}", fastrand::u32(..));
    let component = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: mq\nspec:\n  type: bindings.mqtt3\n  version: v1\n  metadata:\n  - name: url\n    value: \"tcp://127.0.0.1:1883\"\n  - name: topic\n    value: \"{prefix}/events\"\n  - name: consumerID\n    value: \"{prefix}\"\n"
    );
    let sc = start(
        &format!("service: orders\napp:\n  address: {}\n", app.address()),
        &[("mq.yaml", &component)],
    );
    let posts = || {
        app.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.path == "/mq")
            .collect::<Vec<_>>()
    };
    // Until the input side has subscribed, what is published is nobody's: publish until one
    // comes back.
    let mut n = 0;
    let got = eventually(
        Duration::from_secs(30),
        "a message back through the binding",
        || {
            n += 1;
            let (s, body) = post(
                &sc,
                "/v1.0/bindings/mq",
                json!({"operation": "create", "data": {"n": n}}),
            );
            assert_eq!(s, 204, "{body}");
            posts().into_iter().next()
        },
    );
    assert!(
        String::from_utf8_lossy(&got.body).starts_with(r#"{"n":"#),
        "{got:?}"
    );
    assert_eq!(
        got.header("topic"),
        Some(format!("{prefix}/events").as_str())
    );
    assert!(
        app.seen()
            .iter()
            .any(|s| s.method == "OPTIONS" && s.path == "/mq")
    );
    let (s, body) = post(&sc, "/v1.0/bindings/mq", json!({"operation": "delete"}));
    assert_eq!(
        (s, error_code(&body).as_str()),
        (500, "ERR_INVOKE_OUTPUT_BINDING")
    );
}

/// `POST /v1.0/bindings/{name}`: status, the `metadata.*` headers (without the prefix, names
/// lowercased as HTTP carries them), body.
fn invoke_binding(
    sc: &Sidecar,
    name: &str,
    body: Value,
) -> (u16, std::collections::BTreeMap<String, String>, String) {
    let r = client()
        .post(sc.bridge_url(&format!("/v1.0/bindings/{name}")))
        .json(&body)
        .send()
        .unwrap();
    let metadata = r
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix("metadata.")?;
            Some((key.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect();
    (r.status().as_u16(), metadata, r.text().unwrap())
}

fn binding_component(name: &str, kind: &str, metadata: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n  metadata:\n"
    );
    for (k, v) in metadata {
        text.push_str(&format!("  - name: {k}\n    value: \"{v}\"\n"));
    }
    text
}

/// `bindings.postgresql` as daprd's: `exec` answers `rows-affected` (200, no body), `query` the
/// rows as JSON arrays of values typed as pgx/Go marshal them, both with `operation`, `sql`,
/// `start-time`, `end-time`, `duration`; params bind `$1`…; every mistake is a 500
/// `ERR_INVOKE_OUTPUT_BINDING`; `close` answers 204 and later calls fail. A database that is
/// not there yet fails each call and is used once it appears.
#[test]
fn output_binding_postgresql_exec_query_close() {
    let db = PostgresDb::create();
    let late = format!("outrigger_test_late_binding_{}", std::process::id());
    let late_connection = format!("host=127.0.0.1 user=postgres port=5432 database={late}");
    let sc = start(
        "service: orders\n",
        &[
            (
                "sql.yaml",
                &binding_component(
                    "sql",
                    "bindings.postgresql",
                    &[("connectionString", &db.connection_string())],
                ),
            ),
            (
                "late.yaml",
                &binding_component(
                    "late",
                    "bindings.postgres",
                    &[("connectionString", &late_connection)],
                ),
            ),
        ],
    );
    let exec = |sql: &str, params: Option<&str>| {
        let mut metadata = json!({"sql": sql});
        if let Some(p) = params {
            metadata["params"] = json!(p);
        }
        invoke_binding(
            &sc,
            "sql",
            json!({"operation": "exec", "metadata": metadata}),
        )
    };
    let (s, md, body) = exec(
        "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), tags text[], doc jsonb, at timestamptz, raw bytea, ok boolean, ratio float8)",
        None,
    );
    assert_eq!((s, body.as_str()), (200, ""), "{body}");
    assert_eq!(md.get("rows-affected").map(String::as_str), Some("0"));
    assert_eq!(md.get("operation").map(String::as_str), Some("exec"));
    assert!(md["sql"].starts_with("CREATE TABLE items"), "{md:?}");
    for key in ["start-time", "end-time"] {
        assert!(md[key].ends_with('Z') && md[key].contains('T'), "{md:?}");
    }
    assert!(
        ["ns", "µs", "ms", "s"]
            .iter()
            .any(|u| md["duration"].ends_with(u)),
        "{md:?}"
    );
    let (s, md, body) = exec(
        "INSERT INTO items (id, name, price, tags, doc, at, raw, ok, ratio) VALUES ($1, $2, $3, ARRAY['a', 'b'], $4, '2024-01-02T03:04:05.5Z', '\\x6869', $5, $6), ($7, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        Some(r#"[1, "apple", 1.5, {"k": [1, 2]}, true, 0.25, 2.0]"#),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(md.get("rows-affected").map(String::as_str), Some("2"));
    // The rows as pgx gives them and Go marshals them.
    let (s, md, body) = invoke_binding(
        &sc,
        "sql",
        json!({"operation": "query", "metadata": {"sql": "SELECT id, name, price, tags, doc, at, raw, ok, ratio FROM items ORDER BY id"}}),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(md.get("operation").map(String::as_str), Some("query"));
    assert!(!md.contains_key("rows-affected"), "{md:?}");
    let rows: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        rows,
        json!([
            [1, "apple", 1.5, ["a", "b"], {"k": [1, 2]}, "2024-01-02T03:04:05.5Z", "aGk=", true, 0.25],
            [2, null, null, null, null, null, null, null, null]
        ])
    );
    // Numbers digit for digit (a parameter, numeric, jsonb: none through f64), binary types
    // (a range, an interval) as base64 of their bytes, not those bytes as text.
    let raw = |body: &str| {
        let r = client()
            .post(sc.bridge_url("/v1.0/bindings/sql"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (s, body) = raw(
        r#"{"operation":"query","metadata":{"sql":"SELECT $1::numeric, 123456789012345678901234567890.5::numeric, '{\"n\": 123456789012345678901}'::jsonb, int4range(1, 5), '1 day'::interval","params":"[123456789012345678901234567890]"}}"#,
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body,
        r#"[[123456789012345678901234567890,123456789012345678901234567890.5,{"n": 123456789012345678901},"AgAAAAQAAAABAAAABAAAAAU=","AAAAAAAAAAAAAAABAAAAAA=="]]"#
    );
    // A result past the cap is refused, with a reason, instead of filling the memory.
    let (s, body) = raw(
        r#"{"operation":"query","metadata":{"sql":"SELECT repeat('x', 1000000) FROM generate_series(1, 20)"}}"#,
    );
    assert_eq!(s, 500, "{body}");
    assert!(body.contains("larger than 16 MiB"), "{body}");
    let (s, _, body) = invoke_binding(
        &sc,
        "sql",
        json!({"operation": "query", "metadata": {"sql": "SELECT name FROM items WHERE id = $1", "params": "[3]"}}),
    );
    assert_eq!((s, body.as_str()), (200, "[]"));
    // Mistakes: each a 500 with daprd's code and a message saying what.
    for (body, text) in [
        (
            json!({"operation": "query", "metadata": {"sql": "SELECT nope FROM items"}}),
            "error executing query",
        ),
        (
            json!({"operation": "query"}),
            "required metadata not set: sql",
        ),
        (
            json!({"operation": "exec", "metadata": {"sql": "SELECT 1", "params": "{\"a\": 1}"}}),
            "invalid metadata property params",
        ),
        (
            json!({"operation": "exec", "metadata": {"sql": "SELECT $1::int", "params": "[\"x\"]"}}),
            "error executing query",
        ),
        (
            json!({"operation": "drop", "metadata": {"sql": "SELECT 1"}}),
            "invalid operation type: drop",
        ),
    ] {
        let (s, _, got) = invoke_binding(&sc, "sql", body);
        assert_eq!(
            (s, error_code(&got).as_str()),
            (500, "ERR_INVOKE_OUTPUT_BINDING"),
            "{got}"
        );
        assert!(got.contains(text), "{text}: {got}");
    }
    // The database that is not there yet: a 500 naming it, then it works once created.
    let (s, _, got) = invoke_binding(
        &sc,
        "late",
        json!({"operation": "query", "metadata": {"sql": "SELECT 1"}}),
    );
    assert_eq!(s, 500, "{got}");
    assert!(got.contains(&late), "{got}");
    let late_db = PostgresDb { name: late };
    let _ = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtq",
            "-c",
        ])
        .arg(format!("CREATE DATABASE {}", late_db.name))
        .output();
    let got = eventually(Duration::from_secs(15), "the late database", || {
        let (s, _, body) = invoke_binding(
            &sc,
            "late",
            json!({"operation": "query", "metadata": {"sql": "SELECT 41 + 1"}}),
        );
        (s == 200).then_some(body)
    });
    assert_eq!(got, "[[42]]");
    // close: 204, and the component is closed from then on (a second close is fine).
    let (s, _, _) = invoke_binding(&sc, "sql", json!({"operation": "close"}));
    assert_eq!(s, 204);
    let (s, _, got) = exec("SELECT 1", None);
    assert_eq!(s, 500);
    assert!(got.contains("component is closed"), "{got}");
    assert_eq!(
        invoke_binding(&sc, "sql", json!({"operation": "close"})).0,
        204
    );
}

/// A reply of [`RedisServer::command`] without its RESP framing (`$7\r\n…` → `…`; a missing
/// bulk string → `None`; `:1` → `1`).
fn resp(reply: Option<String>) -> Option<String> {
    let reply = reply?;
    match reply.as_bytes().first() {
        Some(b'$') if reply.starts_with("$-1") => None,
        Some(b'$') => reply.split_once("\r\n").map(|(_, v)| v.to_string()),
        Some(b':' | b'+') => Some(reply[1..].to_string()),
        _ => Some(reply),
    }
}

/// `bindings.redis` as daprd's: `create` sets the key (with `ttlInSeconds`, an expiry), `get`
/// answers the value (200 and no body when there is none; `delete: "true"` takes it), `delete`
/// removes it, `increment` counts; a missing key or a bad ttl is a 500. Redis killed: a 500 per
/// call, and it works again once Redis is back.
#[test]
fn output_binding_redis() {
    let mut redis = RedisServer::start();
    let sc = start(
        "service: orders\n",
        &[(
            "kv.yaml",
            &binding_component("kv", "bindings.redis", &[("redisHost", &redis.host())]),
        )],
    );
    let call = |op: &str, data: Value, metadata: Value| {
        invoke_binding(
            &sc,
            "kv",
            json!({"operation": op, "data": data, "metadata": metadata}),
        )
    };
    let (s, _, body) = call("create", json!({"n": 1}), json!({"key": "k1"}));
    assert_eq!((s, body.as_str()), (204, ""));
    assert_eq!(
        resp(redis.command(&["GET", "k1"])).as_deref(),
        Some(r#"{"n":1}"#)
    );
    assert_eq!(resp(redis.command(&["TTL", "k1"])).as_deref(), Some("-1"));
    let (s, _, body) = call("get", Value::Null, json!({"key": "k1"}));
    assert_eq!((s, body.as_str()), (200, r#"{"n":1}"#));
    // A key that is not there: 200 without a body (daprd's empty response).
    let (s, _, body) = call("get", Value::Null, json!({"key": "nope"}));
    assert_eq!((s, body.as_str()), (200, ""));
    // ttlInSeconds on create and increment.
    assert_eq!(
        call(
            "create",
            json!("text"),
            json!({"key": "k2", "ttlInSeconds": "100"})
        )
        .0,
        204
    );
    let ttl: i64 = resp(redis.command(&["TTL", "k2"]))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=100).contains(&ttl), "{ttl}");
    assert_eq!(resp(redis.command(&["GET", "k2"])).as_deref(), Some("text"));
    for _ in 0..3 {
        assert_eq!(
            call(
                "increment",
                Value::Null,
                json!({"key": "n", "ttlInSeconds": "50"})
            )
            .0,
            204
        );
    }
    assert_eq!(resp(redis.command(&["GET", "n"])).as_deref(), Some("3"));
    assert!(
        resp(redis.command(&["TTL", "n"]))
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 0
    );
    // get with delete: "true" takes the value.
    let (s, _, body) = call("get", Value::Null, json!({"key": "k2", "delete": "true"}));
    assert_eq!((s, body.as_str()), (200, "text"));
    assert_eq!(resp(redis.command(&["EXISTS", "k2"])).as_deref(), Some("0"));
    assert_eq!(call("delete", Value::Null, json!({"key": "k1"})).0, 204);
    assert_eq!(resp(redis.command(&["EXISTS", "k1"])).as_deref(), Some("0"));
    for (op, metadata, text) in [
        ("create", json!({}), "missing key"),
        (
            "create",
            json!({"key": "k3", "ttlInSeconds": "soon"}),
            "ttlInSeconds",
        ),
        (
            "rename",
            json!({"key": "k3"}),
            "invalid operation type: rename",
        ),
    ] {
        let (s, _, got) = call(op, json!(1), metadata);
        assert_eq!(
            (s, error_code(&got).as_str()),
            (500, "ERR_INVOKE_OUTPUT_BINDING"),
            "{got}"
        );
        assert!(got.contains(text), "{text}: {got}");
    }
    // A bad ttl wrote nothing.
    assert_eq!(resp(redis.command(&["EXISTS", "k3"])).as_deref(), Some("0"));
    redis.kill();
    let (s, _, got) = call("get", Value::Null, json!({"key": "n"}));
    assert_eq!(
        (s, error_code(&got).as_str()),
        (500, "ERR_INVOKE_OUTPUT_BINDING")
    );
    redis.restart();
    eventually(Duration::from_secs(15), "redis back", || {
        (call("create", json!(5), json!({"key": "back"})).0 == 204).then_some(())
    });
    assert_eq!(resp(redis.command(&["GET", "back"])).as_deref(), Some("5"));
}

/// `bindings.rabbitmq` both ways, as daprd's: the queue declared with its ttl and priority
/// arguments; `create` publishes persistent messages with a per-message ttl and priority; the
/// input side consumes the queue: `OPTIONS` then `POST /{name}` per message, acked on 2xx and
/// requeued (delivered again) when the app refuses it.
#[test]
fn rabbitmq_binding_output_and_input() {
    let vhost = crate::servers::RabbitVhost::create();
    let app = Backend::http();
    let sc = start(
        &format!("service: orders\napp:\n  address: {}\n", app.address()),
        &[
            (
                "jobs.yaml",
                &binding_component(
                    "jobs",
                    "bindings.rabbitmq",
                    &[
                        ("host", &vhost.url()),
                        ("queueName", "jobs"),
                        ("durable", "true"),
                        ("maxPriority", "5"),
                        ("ttlInSeconds", "60"),
                    ],
                ),
            ),
            // A route the app refuses: OPTIONS and POST answer 405 (OPTIONS 405: it listens).
            (
                "refused.yaml",
                &binding_component(
                    "refused",
                    "bindings.rabbitmq",
                    &[
                        ("host", &vhost.url()),
                        ("queueName", "refused"),
                        ("route", "/status/405"),
                    ],
                ),
            ),
            // An exclusive queue: the consumer's connection declares it, the publisher's only
            // sends to it (two connections declaring it: RESOURCE_LOCKED).
            (
                "solo.yaml",
                &binding_component(
                    "solo",
                    "bindings.rabbitmq",
                    &[
                        ("host", &vhost.url()),
                        ("queueName", "solo"),
                        ("exclusive", "true"),
                    ],
                ),
            ),
            // Output only.
            (
                "out.yaml",
                &binding_component(
                    "out",
                    "bindings.rabbitmq",
                    &[
                        ("host", &vhost.url()),
                        ("queueName", "outq"),
                        ("direction", "output"),
                    ],
                ),
            ),
        ],
    );
    let (s, _, body) = invoke_binding(
        &sc,
        "jobs",
        json!({"operation": "create", "data": {"job": 1}, "metadata": {"ttlInSeconds": "30", "priority": "3", "team": "pay"}}),
    );
    assert_eq!((s, body.as_str()), (204, ""));
    let got = eventually(Duration::from_secs(30), "the message at the app", || {
        app.seen()
            .into_iter()
            .find(|r| r.method == "POST" && r.path == "/jobs")
    });
    assert_eq!(String::from_utf8_lossy(&got.body), r#"{"job":1}"#);
    assert_eq!(got.header("team"), Some("pay"));
    let (s, _, body) = invoke_binding(&sc, "solo", json!({"operation": "create", "data": "alone"}));
    assert_eq!((s, body.as_str()), (204, ""));
    eventually(
        Duration::from_secs(30),
        "the exclusive queue's message",
        || {
            app.seen()
                .into_iter()
                .find(|r| r.method == "POST" && r.path == "/solo" && &r.body[..] == b"alone")
        },
    );
    assert!(
        app.seen()
            .iter()
            .any(|r| r.method == "OPTIONS" && r.path == "/jobs")
    );
    // Acked: the queue is empty (nothing ready, nothing unacked).
    eventually(Duration::from_secs(15), "the ack", || {
        (vhost.queues().get("jobs") == Some(&(0, 0))).then_some(())
    });
    // Output only: the message stays in its queue (nobody reads it).
    assert_eq!(
        invoke_binding(&sc, "out", json!({"operation": "create", "data": "x"})).0,
        204
    );
    eventually(Duration::from_secs(15), "the message in outq", || {
        (vhost.queues().get("outq") == Some(&(1, 0))).then_some(())
    });
    assert!(!app.seen().iter().any(|r| r.path == "/out"));
    // Refused by the app: nacked with requeue, so it comes again, and stays in the queue.
    assert_eq!(
        invoke_binding(&sc, "refused", json!({"operation": "create", "data": "r1"})).0,
        204
    );
    eventually(Duration::from_secs(30), "the refused message twice", || {
        (app.seen()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/status/405" && r.body == b"r1")
            .count()
            >= 2)
            .then_some(())
    });
    let (ready, unacked) = vhost.queues()["refused"];
    assert_eq!(ready + unacked, 1);
    // Mistakes: an unknown operation, a bad priority.
    for (body, text) in [
        (json!({"operation": "get"}), "invalid operation"),
        (
            json!({"operation": "create", "data": 1, "metadata": {"priority": "high"}}),
            "priority",
        ),
    ] {
        let (s, _, got) = invoke_binding(&sc, "jobs", body);
        assert_eq!(
            (s, error_code(&got).as_str()),
            (500, "ERR_INVOKE_OUTPUT_BINDING"),
            "{got}"
        );
        assert!(got.contains(text), "{text}: {got}");
    }
}

/// `configuration.postgresql` as the Dapr docs set it up: the user's table and `notify_event()`
/// trigger; get (several rows of a key: the highest numeric version; metadata JSON), subscribe
/// with `metadata.pgNotifyChannel` (a change reaches the app within a second or so, unwatched
/// keys do not), unsubscribe; no channel or a bad one is a 500.
#[test]
fn configuration_on_postgresql_with_listen_notify() {
    let db = PostgresDb::create();
    db.sql(
        "CREATE TABLE configtable (KEY VARCHAR NOT NULL, VALUE VARCHAR NOT NULL, VERSION VARCHAR NOT NULL, METADATA JSON);
         CREATE OR REPLACE FUNCTION notify_event() RETURNS TRIGGER AS $$
           DECLARE data json; notification json;
           BEGIN
             IF (TG_OP = 'DELETE') THEN data = row_to_json(OLD); ELSE data = row_to_json(NEW); END IF;
             notification = json_build_object('table', TG_TABLE_NAME, 'action', TG_OP, 'data', data);
             PERFORM pg_notify('config', notification::text);
             RETURN NULL;
           END;
         $$ LANGUAGE plpgsql;
         CREATE TRIGGER config AFTER INSERT OR UPDATE OR DELETE ON configtable
           FOR EACH ROW EXECUTE PROCEDURE notify_event();
         INSERT INTO configtable VALUES ('orderconfig', 'v1', '1', '{\"team\": \"pay\"}'), ('orderconfig', 'v0', '0', NULL), ('other', 'x', 'a', NULL);",
    );
    let app = Backend::http();
    let sc = start(
        &format!("service: orders\napp:\n  address: {}\n", app.address()),
        &[(
            "config.yaml",
            &binding_component(
                "pgconfig",
                "configuration.postgresql",
                &[
                    ("connectionString", &db.connection_string()),
                    ("table", "configtable"),
                ],
            ),
        )],
    );
    let (s, _, body) = get(
        &sc,
        "/v1.0/configuration/pgconfig?key=orderconfig&key=missing",
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"orderconfig": {"value": "v1", "version": "1", "metadata": {"team": "pay"}}})
    );
    let (s, _, body) = get(&sc, "/v1.0/configuration/pgconfig");
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["other"],
        json!({"value": "x", "version": "a", "metadata": {}})
    );
    assert_eq!(get(&sc, "/v1.0/configuration/pgconfig?key=missing").0, 204);
    let (s, _, body) = get(&sc, "/v1.0/configuration/pgconfig?key=bad'key");
    assert_eq!(
        (s, error_code(&body).as_str()),
        (500, "ERR_CONFIGURATION_GET")
    );
    // Subscribing needs the channel.
    for query in [
        "key=orderconfig",
        "key=orderconfig&metadata.pgNotifyChannel=x;drop",
    ] {
        let (s, _, body) = get(
            &sc,
            &format!("/v1.0/configuration/pgconfig/subscribe?{query}"),
        );
        assert_eq!(
            (s, error_code(&body).as_str()),
            (500, "ERR_CONFIGURATION_SUBSCRIBE"),
            "{body}"
        );
    }
    let (s, _, body) = get(
        &sc,
        "/v1.0/configuration/pgconfig/subscribe?key=orderconfig&metadata.pgNotifyChannel=config",
    );
    assert_eq!(s, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    db.sql("UPDATE configtable SET value = 'v2', version = '2' WHERE key = 'orderconfig' AND version = '1'");
    db.sql("UPDATE configtable SET value = 'y' WHERE key = 'other'");
    let seen = eventually(Duration::from_secs(10), "the change at the app", || {
        app.seen()
            .into_iter()
            .find(|s| s.path == "/configuration/pgconfig/orderconfig")
    });
    assert_eq!(seen.method, "POST");
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        json!({"id": id, "items": {"orderconfig": {"value": "v2", "version": "2", "metadata": {"team": "pay"}}}})
    );
    let (s, _, body) = get(
        &sc,
        &format!("/v1.0/configuration/pgconfig/{id}/unsubscribe"),
    );
    assert_eq!((s, body.as_str()), (200, r#"{"ok":true}"#));
    // After the unsubscribe a change reaches nobody; a new subscription to every key sees it.
    let (_, _, body) = get(
        &sc,
        "/v1.0/configuration/pgconfig/subscribe?metadata.pgNotifyChannel=config",
    );
    let id2 = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    db.sql("DELETE FROM configtable WHERE key = 'other'");
    eventually(Duration::from_secs(10), "the delete at the app", || {
        app.seen()
            .into_iter()
            .find(|s| s.path == "/configuration/pgconfig/other")
    });
    let with_first = app
        .seen()
        .iter()
        .filter(|s| String::from_utf8_lossy(&s.body).contains(&id))
        .count();
    assert_eq!(
        with_first, 1,
        "the unsubscribed watch sent only the first change"
    );
    assert!(
        app.seen()
            .iter()
            .any(|s| String::from_utf8_lossy(&s.body).contains(&id2))
    );
}

/// `configuration.postgresql` subscriptions each hold a `LISTEN` connection outside the pool:
/// they are bounded by the component's `maxConns` (they used to open one connection each,
/// whatever `maxConns` said). One more fails at once; an unsubscribe gives its place back.
#[test]
fn postgres_configuration_subscriptions_are_bounded_by_max_conns() {
    let db = PostgresDb::create();
    db.sql("CREATE TABLE boundedconfig (KEY VARCHAR NOT NULL, VALUE VARCHAR NOT NULL, VERSION VARCHAR NOT NULL, METADATA JSON);");
    let app = Backend::http();
    let sc = start(
        &format!("service: orders\napp:\n  address: {}\n", app.address()),
        &[(
            "config.yaml",
            &binding_component(
                "pgconfig",
                "configuration.postgresql",
                &[
                    ("connectionString", &db.connection_string()),
                    ("table", "boundedconfig"),
                    ("maxConns", "2"),
                ],
            ),
        )],
    );
    let subscribe = || {
        get(
            &sc,
            "/v1.0/configuration/pgconfig/subscribe?metadata.pgNotifyChannel=bounded",
        )
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (s, _, body) = subscribe();
        assert_eq!(s, 200, "{body}\n{}", sc.diagnostics());
        ids.push(
            serde_json::from_str::<Value>(&body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (s, _, body) = subscribe();
    assert_eq!(
        (s, error_code(&body).as_str()),
        (500, "ERR_CONFIGURATION_SUBSCRIBE"),
        "{body}"
    );
    assert!(body.contains("maxConns"), "{body}");
    // The pool still serves gets.
    assert_eq!(get(&sc, "/v1.0/configuration/pgconfig?key=missing").0, 204);
    let (s, _, _) = get(
        &sc,
        &format!("/v1.0/configuration/pgconfig/{}/unsubscribe", ids[0]),
    );
    assert_eq!(s, 200);
    eventually(Duration::from_secs(10), "a place given back", || {
        (subscribe().0 == 200).then_some(())
    });
}

/// The bridge's address (`IP:PORT`), and a current-thread runtime for a client of its own.
fn bridge_address_and_runtime(sc: &Sidecar) -> (String, tokio::runtime::Runtime) {
    let addr = sc
        .bridge_url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (addr, rt)
}

/// HTTP invocation streams a request body over 64 KiB to the callee as it arrives (it used to
/// read the whole body first): the callee's echo of the first part comes back while the rest
/// is still to be sent. A streamed body past `bridge.max_body` is a 413, whether it says its
/// length or not.
#[test]
fn invocation_streams_large_request_bodies_within_max_body() {
    use http_body_util::BodyExt;
    let backend = Backend::http();
    let sc = start(
        &format!(
            "  max_body: 256KiB\nservice: front\nclusters:\n  target:\n    endpoints: [{}]\n    http2: true\n",
            backend.address()
        ),
        &[],
    );
    let (addr, rt) = bridge_address_and_runtime(&sc);
    let wait = Duration::from_secs(20);
    let part = bytes::Bytes::from(vec![b'x'; 100 * 1024]);
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = http::Request::post(format!("http://{addr}/v1.0/invoke/target/method/stream"))
            .body(http_body_util::StreamBody::new(
                crate::backend::ReceiverStream(rx),
            ))
            .unwrap();
        tx.send(Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
            part.clone(),
        )))
        .await
        .unwrap();
        let res = tokio::time::timeout(wait, send.send_request(req))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no answer while the body is open: read whole first?\n{}",
                    sc.diagnostics()
                )
            })
            .unwrap();
        assert_eq!(res.status(), 200, "{}", sc.diagnostics());
        let mut body = res.into_body();
        let mut echoed = 0;
        while echoed < part.len() {
            let frame = tokio::time::timeout(wait, body.frame())
                .await
                .unwrap_or_else(|_| panic!("no echo of the first part\n{}", sc.diagnostics()))
                .expect("the echo")
                .unwrap();
            echoed += frame.data_ref().map_or(0, |d| d.len());
        }
        tx.send(Ok(hyper::body::Frame::data(part.clone())))
            .await
            .unwrap();
        drop(tx);
        let rest = tokio::time::timeout(wait, body.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        assert_eq!(echoed + rest.len(), 2 * part.len());
    });
    // Past the limit: 413, from its Content-Length.
    let big = vec![b'y'; 300 * 1024];
    let r = client()
        .post(sc.bridge_url("/v1.0/invoke/target/method/stream"))
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(&r.text().unwrap()), "ERR_BODY_TOO_LARGE");
    // (Without a length it is counted as it passes: the callee reads it all before it
    // answers, so its request is cut and the caller gets the 413 — or, over HTTP/1, sees the
    // connection closed while it still sends, as with any early answer.)
    let sent = client()
        .post(sc.bridge_url("/v1.0/invoke/target/method/status/200"))
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(big)))
        .send();
    match sent {
        Ok(r) => assert_eq!(r.status(), 413, "{}", sc.diagnostics()),
        // HTTP/1: the 413 came while reqwest still sent, and the bridge closed the socket.
        Err(e) => assert!(
            e.is_request() || e.is_body() || e.is_connect(),
            "not a closed connection: {e:?}"
        ),
    }
    // Either way the callee never got the whole body: its request was cut at the limit.
    assert!(
        backend
            .seen()
            .iter()
            .filter(|s| s.path == "/status/200")
            .all(|s| s.body.len() < 300 * 1024),
        "the callee saw a whole request past max_body"
    );
    // A body within the limit, streamed, arrives whole.
    let r = client()
        .post(sc.bridge_url("/v1.0/invoke/target/method/stream"))
        .body(vec![b'z'; 200 * 1024])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), 200 * 1024);
}

/// The cluster's `timeout` used to run while a streamed request body (over 64 KiB) was still
/// being uploaded: a slow caller got a 500 and its callee an outlier mark. It counts from the
/// body's end now: an upload longer than the timeout to a callee that answers at once is a 200.
#[test]
fn invocation_timeout_counts_from_the_end_of_a_slow_upload() {
    use http_body_util::BodyExt;
    let backend = Backend::http();
    let sc = start(
        &format!(
            "service: front\nclusters:\n  target:\n    endpoints: [{}]\n    timeout: 300ms\n    outlier:\n      consecutive_failures: 1\n",
            backend.address()
        ),
        &[],
    );
    let (addr, rt) = bridge_address_and_runtime(&sc);
    let part = bytes::Bytes::from(vec![b'x'; 100 * 1024]);
    let (status, body) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = http::Request::post(format!(
            "http://{addr}/v1.0/invoke/target/method/status/200"
        ))
        .header("host", addr.as_str())
        .body(http_body_util::StreamBody::new(
            crate::backend::ReceiverStream(rx),
        ))
        .unwrap();
        let uploader = tokio::spawn({
            let part = part.clone();
            async move {
                for _ in 0..2 {
                    if tx
                        .send(Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                            part.clone(),
                        )))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // A slow caller: more than the cluster's timeout between the parts.
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                }
            }
        });
        let res = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
            .await
            .expect("an answer")
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        uploader.abort();
        (status, body)
    });
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&body),
        sc.diagnostics()
    );
    let seen = backend.seen();
    assert_eq!(seen.last().map(|s| s.body.len()), Some(2 * part.len()));
    // A callee that takes longer than the timeout after the body's end still times out.
    let r = client()
        .post(sc.bridge_url("/v1.0/invoke/target/method/slow/2000"))
        .body(vec![b'z'; 100 * 1024])
        .send()
        .unwrap();
    assert_eq!(r.status(), 500, "{}", sc.diagnostics());
}

/// A streamed invocation body (over 64 KiB) to a callee that neither reads it nor answers,
/// from a caller that keeps sending (and its connection open), used to wait forever: the
/// cluster's `timeout` counted only from the body's end, which never came. The `timeout` now
/// also bounds each wait in which the callee takes none of the body: the caller gets a 500
/// `ERR_DIRECT_INVOKE`, as from a callee that does not answer in time.
#[test]
fn a_streamed_invocation_to_a_callee_that_never_reads_ends_at_the_timeout() {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    // The callee: takes connections and never reads nor answers (kept open).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let callee = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn({
        let held = held.clone();
        move || {
            for c in listener.incoming().flatten() {
                held.lock().unwrap().push(c);
            }
        }
    });
    let sc = start(
        &format!(
            "  max_body: 64MiB\nservice: front\nclusters:\n  target:\n    endpoints: [{callee}]\n    timeout: 500ms\n"
        ),
        &[],
    );
    let (addr, rt) = bridge_address_and_runtime(&sc);
    let (status, body) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = http::Request::post(format!("http://{addr}/v1.0/invoke/target/method/upload"))
            .body(http_body_util::StreamBody::new(
                crate::backend::ReceiverStream(rx),
            ))
            .unwrap();
        // The caller sends as long as it is let (far more than the socket buffers between
        // the bridge and the callee hold), and never ends its body.
        let part = bytes::Bytes::from(vec![b'x'; 256 * 1024]);
        let sender = tokio::spawn(async move {
            for _ in 0..200 {
                let frame =
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(part.clone()));
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let res = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("no answer within 20 s\n{}", sc.diagnostics()))
            .unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        sender.abort();
        (status, body)
    });
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 500, "{body}\n{}", sc.diagnostics());
    assert_eq!(error_code(&body), "ERR_DIRECT_INVOKE");
    assert!(
        body.contains("nor any more of the request body taken"),
        "{body}"
    );
    assert!(!held.lock().unwrap().is_empty(), "the callee was called");
}
