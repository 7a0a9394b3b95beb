//! TLS to the bridge's stores: a PostgreSQL of our own that takes TLS connections only
//! (`servers::PostgresTlsServer`, certificates from `outrigger certs`), reached by the real
//! binary with each `sslmode` — what is checked of the server's certificate, a client
//! certificate as the login, SCRAM with channel binding — and the errors: an unknown CA, a
//! wrong name, a plain connection refused (also `prefer`'s retry after a failed handshake), a bad CA path found by `outrigger check`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::servers::PostgresTlsServer;
use crate::support::{
    ComponentsDir, Sidecar, bridge_on, ca_with, client, component_with, eventually, post,
    value_line,
};

/// A CA in `dir/NAME/` with `server` (localhost, 127.0.0.1) and `certuser` leaves.
fn ca(dir: &Path, name: &str) {
    ca_with(
        dir,
        name,
        &[
            ("server", &["--dns", "localhost", "--ip", "127.0.0.1"]),
            // The CN is the first DNS name: PostgreSQL's `cert` login takes it as the role.
            ("certuser", &["--dns", "certuser"]),
        ],
    );
}

fn component(name: &str, kind: &str, connection: &str, extra: &str) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n  metadata:\n  - name: connectionString\n    value: \"{connection}\"\n  - name: timeout\n    value: 5s\n{extra}"
    )
}

fn table(name: &str) -> String {
    format!("  - name: tableName\n    value: {name}\n")
}

fn save(sc: &Sidecar, store: &str, key: &str, value: Value) -> (u16, String) {
    let r = client()
        .post(sc.bridge_url(&format!("/v1.0/state/{store}")))
        .json(&json!([{"key": key, "value": value}]))
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

fn read(sc: &Sidecar, store: &str, key: &str) -> (u16, String) {
    let r = client()
        .get(sc.bridge_url(&format!("/v1.0/state/{store}/{key}")))
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// Saves `{"store": STORE}` under `k` in each of `stores` (204) and reads it back (200): the
/// text read must be `stored(STORE)`.
fn saved_and_read(sc: &Sidecar, stores: &[&str], stored: impl Fn(&str) -> String) {
    for &store in stores {
        let (s, body) = save(sc, store, "k", json!({"store": store}));
        assert_eq!(s, 204, "{store}: {body}\n{}", sc.diagnostics());
        let (s, body) = read(sc, store, "k");
        assert_eq!((s, body), (200, stored(store)), "{store}");
    }
}

/// Each of `failures` (store, what its error says): a save answered 500 with
/// `ERR_STATE_SAVE`, `kind` (the store's) and that.
fn saves_fail(sc: &Sidecar, kind: &str, failures: &[(&str, &str)]) {
    for &(store, why) in failures {
        let (s, body) = save(sc, store, "k", json!(1));
        assert_eq!(s, 500, "{store}: {body}");
        assert!(
            body.contains("ERR_STATE_SAVE") && body.contains(kind) && body.contains(why),
            "{store}: {body}"
        );
    }
}

#[test]
fn postgres_over_tls_by_sslmode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "ca");
    ca(d, "other");
    let mut pg = PostgresTlsServer::start(&d.join("ca"));
    let port = pg.port;
    let ca_file = d.join("ca/ca.crt").display().to_string();
    let other_ca = d.join("other/ca.crt").display().to_string();
    let app = |host: &str, tls: &str| {
        format!("host={host} port={port} user=app password=secret dbname=app {tls}")
    };
    let components = [
        (
            "full.yaml",
            component(
                "full",
                "state.postgresql",
                // SCRAM with channel binding: the server's certificate hashed into the login.
                &app(
                    "localhost",
                    &format!("sslmode=verify-full sslrootcert={ca_file} channel_binding=require"),
                ),
                "",
            ),
        ),
        (
            "require.yaml",
            component(
                "require",
                "state.postgresql",
                // 127.0.0.2 is not in the certificate: `require` does not look.
                &app("127.0.0.2", "sslmode=require"),
                &table("t_require"),
            ),
        ),
        (
            "chain.yaml",
            component(
                "chain",
                "state.postgresql",
                // The URL form; verify-ca checks the chain, not the name.
                &format!(
                    "postgres://app:secret@127.0.0.2:{port}/app?sslmode=verify-ca&sslrootcert={ca_file}"
                ),
                &table("t_chain"),
            ),
        ),
        (
            "wrongname.yaml",
            component(
                "wrongname",
                "state.postgresql",
                &app(
                    "127.0.0.2",
                    &format!("sslmode=verify-full sslrootcert={ca_file}"),
                ),
                &table("t_wrongname"),
            ),
        ),
        (
            "otherca.yaml",
            component(
                "otherca",
                "state.postgresql",
                &app(
                    "localhost",
                    &format!("sslmode=verify-full sslrootcert={other_ca}"),
                ),
                &table("t_otherca"),
            ),
        ),
        (
            "prefer.yaml",
            component(
                "prefer",
                "state.postgresql",
                // A root certificate given is used: the handshake fails, and `prefer` tries
                // again without TLS (as libpq), which this server refuses.
                &app(
                    "localhost",
                    &format!("sslmode=prefer sslrootcert={other_ca}"),
                ),
                &table("t_prefer"),
            ),
        ),
        (
            "plain.yaml",
            component(
                "plain",
                "state.postgresql",
                &app("127.0.0.1", "sslmode=disable"),
                &table("t_plain"),
            ),
        ),
        (
            "socket.yaml",
            component(
                "socket",
                "state.postgresql",
                // The default `prefer` over a unix socket: no host name for TLS, and the
                // server offers none there.
                &format!(
                    "host={} port={port} user=app dbname=app",
                    pg.socket_dir().display()
                ),
                &table("t_socket"),
            ),
        ),
        (
            "certlogin.yaml",
            component(
                "certlogin",
                "bindings.postgresql",
                &format!(
                    "host=localhost port={port} user=certuser dbname=app sslmode=verify-full sslrootcert={ca_file} sslcert={} sslkey={}",
                    d.join("ca/certuser.crt").display(),
                    d.join("ca/certuser.key").display()
                ),
                "",
            ),
        ),
    ];
    let sc = bridge_on(d, &components, "", &[]);

    // As jsonb prints it (a space after the colon), as from daprd.
    saved_and_read(&sc, &["full", "require", "chain", "socket"], |store| {
        format!(r#"{{"store": "{store}"}}"#)
    });
    saves_fail(
        &sc,
        "postgresql",
        &[
            ("wrongname", "certificate not valid for name"),
            // Another CA of the same name: its signature does not check out.
            ("otherca", "invalid peer certificate: BadSignature"),
            ("plain", "no encryption"),
            ("prefer", "no encryption"),
        ],
    );
    // The client certificate is the login (pg_hba `cert`: its CN is the role).
    let r = client()
        .post(sc.bridge_url("/v1.0/bindings/certlogin"))
        .json(&json!({"operation": "query", "metadata": {"sql": "SELECT current_user"}}))
        .send()
        .unwrap();
    let (s, body) = (r.status().as_u16(), r.text().unwrap());
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("certuser"), "{body}");

    // The server goes away: a clear 500; back: used again.
    pg.kill();
    let (s, body) = read(&sc, "full", "k");
    assert_eq!(s, 500, "{body}");
    assert!(body.contains("postgresql"), "{body}");
    pg.restart();
    eventually(Duration::from_secs(15), "the store after a restart", || {
        (read(&sc, "full", "k").0 == 200).then_some(())
    });
}

/// `outrigger check` finds a CA file that is not there and an unknown `sslmode` at the
/// component's connection string, exit 78.
#[test]
fn postgres_tls_mistakes_are_found_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let components = ComponentsDir::new(dir.path(), "bridge:\n");
    let check = |connection: &str| {
        components.write(
            "pg.yaml",
            component("pg", "state.postgresql", connection, ""),
        );
        components.check()
    };
    let (code, _, stderr) = check("host=db user=u sslmode=verify-full sslrootcert=system");
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = check("host=db user=u sslmode=verify-ca sslrootcert=/nowhere/ca.crt");
    assert_eq!(code, 78, "{stderr}");
    // Located at the connectionString's line (the 10th).
    assert!(
        stderr.contains("pg.yaml:10") && stderr.contains("/nowhere/ca.crt"),
        "{stderr}"
    );
    let (code, _, stderr) = check("postgres://u@db/x?sslmode=verify_full");
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("pg.yaml:10") && stderr.contains("verify_full"),
        "{stderr}"
    );
}

/// A redis-server of our own on TLS only (`--port 0`), on a free loopback port, listening on
/// 127.0.0.1 and 127.0.0.2 (an address its certificate does not carry), with `dir`'s
/// `server.crt`/`server.key`; asking every client for a certificate of `dir`'s CA when
/// `client_auth`. Killed when dropped.
struct RedisTlsServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisTlsServer {
    fn start(certs: &Path, client_auth: bool) -> Self {
        let port = crate::servers::free_port();
        let dir = tempfile::tempdir().unwrap();
        let file = |f: &str| certs.join(f).display().to_string();
        let child = crate::servers::server_command("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "127.0.0.2"])
            .args(["--tls-cert-file", &file("server.crt")])
            .args(["--tls-key-file", &file("server.key")])
            .args(["--tls-ca-cert-file", &file("ca.crt")])
            .args(["--tls-auth-clients", if client_auth { "yes" } else { "no" }])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (built with TLS) must be installed");
        let s = RedisTlsServer {
            child,
            port,
            _dir: dir,
        };
        eventually(Duration::from_secs(30), "redis-server's TLS port", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        s
    }
}

impl Drop for RedisTlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis component: `redisHost` then `meta` (name, value) pairs (see [`component_with`]).
fn redis_component(name: &str, kind: &str, host: &str, meta: &[(&str, &str)]) -> String {
    component_with(name, kind, &[&[("redisHost", host)], meta].concat())
}

/// Dapr's Redis TLS keys on the real binary against TLS-only redis-servers: `enableTLS`
/// checks the certificate against the system's roots (here `SSL_CERT_FILE`) and the name,
/// `insecureSkipTLSVerify: "true"` checks neither (`"false"` checks both), `clientCert`/`clientKey` (PEM in the metadata) log
/// in to a server that asks for a certificate; state, lock, binding and pub/sub alike. An
/// unknown CA, a wrong name and a missing client certificate fail the call with the reason.
#[test]
fn redis_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "ca");
    ca(d, "other");
    let plain = RedisTlsServer::start(&d.join("ca"), false);
    let mutual = RedisTlsServer::start(&d.join("ca"), true);
    let foreign = RedisTlsServer::start(&d.join("other"), false);
    let read_file = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let (cert, key) = (read_file("ca/certuser.crt"), read_file("ca/certuser.key"));
    let tls = ("enableTLS", "true");
    let client_cert = [
        tls,
        ("clientCert", cert.as_str()),
        ("clientKey", key.as_str()),
    ];
    let at = |port: u16| format!("localhost:{port}");
    let components = [
        redis_component("full", "state.redis", &at(plain.port), &[tls]),
        redis_component("mtls", "state.redis", &at(mutual.port), &client_cert),
        redis_component("events", "pubsub.redis", &at(mutual.port), &client_cert),
        redis_component("locks", "lock.redis", &at(plain.port), &[tls]),
        redis_component("cache", "bindings.redis", &at(plain.port), &[tls]),
        redis_component(
            "insecure",
            "state.redis",
            &at(foreign.port),
            &[tls, ("insecureSkipTLSVerify", "true")],
        ),
        redis_component(
            "wrongname",
            "state.redis",
            &format!("127.0.0.2:{}", plain.port),
            &[tls],
        ),
        redis_component("otherca", "state.redis", &at(foreign.port), &[tls]),
        redis_component(
            "verifying",
            "state.redis",
            &at(foreign.port),
            &[tls, ("insecureSkipTLSVerify", "false")],
        ),
        redis_component("nocert", "state.redis", &at(mutual.port), &[tls]),
        redis_component("notls", "state.redis", &at(plain.port), &[]),
    ];
    let files: Vec<_> = components
        .iter()
        .enumerate()
        .map(|(i, text)| (format!("c{i}.yaml"), text))
        .collect();
    let roots = d.join("ca/ca.crt").display().to_string();
    let sc = bridge_on(d, &files, "", &[("SSL_CERT_FILE", &roots)]);

    saved_and_read(&sc, &["full", "mtls", "insecure"], |store| {
        format!(r#"{{"store":"{store}"}}"#)
    });
    let (s, body) = post(&sc, "/v1.0/publish/events/orders", json!({"a": 1}));
    assert_eq!(s, 204, "{body}");
    let (s, body) = post(
        &sc,
        "/v1.0-alpha1/lock/locks",
        json!({"resourceId": "r", "lockOwner": "o", "expiryInSeconds": 30}),
    );
    assert_eq!((s, body.as_str()), (200, r#"{"success":true}"#));
    let (s, body) = post(
        &sc,
        "/v1.0/bindings/cache",
        json!({"operation": "create", "data": "v", "metadata": {"key": "b"}}),
    );
    assert!(s == 200 || s == 204, "{s} {body}");

    saves_fail(
        &sc,
        "redis",
        &[
            ("wrongname", "certificate not valid for name"),
            ("otherca", "invalid peer certificate"),
            // Said "false" in so many words: still checked.
            ("verifying", "invalid peer certificate"),
            ("nocert", ""),
            ("notls", ""),
        ],
    );
}

/// Metadata (name, value) pairs.
type Meta<'a> = &'a [(&'a str, &'a str)];

/// `outrigger check` finds Redis TLS mistakes at the key's line, exit 78: a `enableTLS` that
/// is not a boolean, PEM that is not a certificate, a key of another certificate, a half
/// pair, client keys without TLS, a `rediss://` URL as `redisHost`.
#[test]
fn redis_tls_mistakes_are_found_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "ca");
    let read_file = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let (cert, key) = (read_file("ca/certuser.crt"), read_file("ca/certuser.key"));
    let server_key = read_file("ca/server.key");
    let components = ComponentsDir::new(d, "bridge:\n");
    let check = |text: &str| {
        components.write("r.yaml", text);
        components.check()
    };
    let tls = ("enableTLS", "true");
    for kind in ["state.redis", "pubsub.redis", "lock.redis"] {
        let good = redis_component(
            "r",
            kind,
            "db:6380",
            &[tls, ("clientCert", &cert), ("clientKey", &key)],
        );
        let (code, _, stderr) = check(&good);
        assert_eq!(code, 0, "{kind}: {stderr}");
        let mistakes: [(Meta, &str, &str); 5] = [
            (&[("enableTLS", "yes")], "enableTLS", "yes"),
            (
                &[tls, ("clientCert", "not PEM"), ("clientKey", &key)],
                "clientCert",
                "no certificate",
            ),
            (
                &[tls, ("clientCert", &cert), ("clientKey", &server_key)],
                "clientKey",
                "another key",
            ),
            (&[tls, ("clientCert", &cert)], "clientCert", "together"),
            (
                &[("clientCert", &cert), ("clientKey", &key)],
                "clientCert",
                "TLS is off",
            ),
        ];
        for (meta, at, why) in mistakes {
            let text = redis_component("r", kind, "db:6380", meta);
            let (code, _, stderr) = check(&text);
            assert_eq!(code, 78, "{kind} {at}: {stderr}");
            let line = format!("r.yaml:{}", value_line(&text, at));
            assert!(
                stderr.contains(&line) && stderr.contains(why),
                "{kind} {at}: want {line} and {why:?}: {stderr}"
            );
            // The PEM never reaches the message.
            assert!(!stderr.contains("BEGIN"), "{stderr}");
        }
    }
    let text = redis_component("r", "state.redis", "rediss://db:6380", &[]);
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("r.yaml:10"), "{stderr}");
}
