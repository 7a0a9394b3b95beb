//! TLS to the bridge's brokers and to `bindings.http`, on the real binary: a mosquitto of our
//! own with TLS listeners (certificates from `outrigger certs`), the machine's RabbitMQ behind
//! a TLS terminator (a second Outrigger's `tcp` listeners with TLS in front of 127.0.0.1:5672),
//! and a plain HTTP server behind the same terminator for `https://` urls. What works: publish
//! and subscribe over TLS, a client certificate for a broker that asks for one, the system's
//! roots (`SSL_CERT_FILE`) when no CA is given. What fails, with rustls' reason in the answer
//! and the component's health: an unknown CA, a certificate for another name. And the metadata
//! mistakes `outrigger check` finds at the key's line.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::servers::{RabbitVhost, free_port, server_command};
use crate::support::{
    ComponentsDir, Sidecar, bridge_on, ca_with, client, component_with as component, eventually,
    post, value_line,
};

/// A CA in `dir/NAME/` with leaves `server` (localhost, 127.0.0.1), `elsewhere`
/// (elsewhere.example only) and `client`.
fn ca(dir: &Path, name: &str) {
    ca_with(
        dir,
        name,
        &[
            ("server", &["--dns", "localhost", "--ip", "127.0.0.1"]),
            ("elsewhere", &["--dns", "elsewhere.example"]),
            ("client", &["--dns", "client"]),
        ],
    );
}

/// Two CAs in `dir`, `ca` and `other` (see [`ca`]), and the PEM texts the tests use.
struct Pems {
    ca: String,
    other: String,
    cert: String,
    key: String,
}

impl Pems {
    fn make(dir: &Path) -> Pems {
        ca(dir, "ca");
        ca(dir, "other");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        Pems {
            ca: read("ca/ca.crt"),
            other: read("other/ca.crt"),
            cert: read("ca/client.crt"),
            key: read("ca/client.key"),
        }
    }
}

/// Metadata (name, value) pairs.
type Meta<'a> = &'a [(&'a str, &'a str)];

/// A component file `NAME.yaml`: `first`, then `meta`, as its metadata.
fn file(name: &str, kind: &str, first: Meta, meta: Meta) -> (String, String) {
    (
        format!("{name}.yaml"),
        component(name, kind, &[first, meta].concat()),
    )
}

/// A subscriber app: `/dapr/subscribe` answers `subscriptions`; every delivery's `data` is
/// recorded with its path and acknowledged.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

fn subscriber(subscriptions: Value) -> (std::net::SocketAddr, Seen) {
    use axum::routing::get;
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let subscriptions = subscriptions.to_string();
            let app = axum::Router::new()
                .route("/dapr/subscribe", get(move || async move { subscriptions }))
                .fallback(move |uri: axum::http::Uri, body: axum::body::Bytes| {
                    let record = record.clone();
                    async move {
                        let event: Value = serde_json::from_slice(&body).unwrap_or_default();
                        record
                            .lock()
                            .unwrap()
                            .push((uri.path().to_string(), event["data"].clone()));
                        r#"{"status":"SUCCESS"}"#
                    }
                });
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (addr, seen)
}

/// Publishes `{"n": n}` to `ps`'s `topic` (204 each time) until the app has it on `path`: a
/// subscription made after a publish would not see it.
fn delivered(sc: &Sidecar, seen: &Seen, (ps, topic, path, n): (&str, &str, &str, u64)) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = post(sc, &format!("/v1.0/publish/{ps}/{topic}"), json!({"n": n}));
        assert_eq!(s, 204, "{ps}: {body}\n{}", sc.diagnostics());
        for _ in 0..10 {
            if seen
                .lock()
                .unwrap()
                .iter()
                .any(|(p, d)| p == path && d["n"] == n)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ps}: no delivery on {path}\n{}",
            sc.diagnostics()
        );
    }
}

/// A bridge sidecar on `components` (file name, text) for app `app`, whose system roots
/// (`SSL_CERT_FILE`) are `dir/ca`'s CA.
fn bridge(dir: &Path, components: &[(String, String)], app: &str) -> Sidecar {
    let roots = dir.join("ca/ca.crt").display().to_string();
    let head = format!("app:\n  address: {app}\n");
    bridge_on(dir, components, &head, &[("SSL_CERT_FILE", &roots)])
}

/// Each of `failures` (pub/sub component, what its error says): a publish answered 500 with
/// it, and, when it says something, the component's health too.
fn publishes_fail(sc: &Sidecar, failures: &[(&str, &str)]) {
    for &(ps, why) in failures {
        let (s, body) = post(sc, &format!("/v1.0/publish/{ps}/orders"), json!({"n": 0}));
        assert_eq!(s, 500, "{ps}: {body}");
        assert!(body.contains(why), "{ps}: {body}");
        if !why.is_empty() {
            let error = unhealthy(sc, ps);
            assert!(error.contains(why), "{ps}: {error}");
        }
    }
}

/// The `error` the bridge's health shows for component `name` once it is unhealthy.
fn unhealthy(sc: &Sidecar, name: &str) -> String {
    eventually(Duration::from_secs(20), "the component's health", || {
        let m: Value = client()
            .get(sc.bridge_url("/v1.0/metadata"))
            .send()
            .ok()?
            .json()
            .ok()?;
        let c = m["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)?
            .clone();
        (c["status"] == "unhealthy").then(|| c["error"].as_str().unwrap_or("").to_string())
    })
}

/// A mosquitto with TLS listeners only, from `dir/ca`'s `server` certificate: `port` on
/// 127.0.0.1 and 127.0.0.2 (an address the certificate does not carry), and `mutual` on
/// 127.0.0.1 asking for a client certificate of that CA. Killed when dropped.
struct MosquittoTls {
    child: std::process::Child,
    port: u16,
    mutual: u16,
    _dir: tempfile::TempDir,
}

impl MosquittoTls {
    fn start(certs: &Path) -> Self {
        let (port, mutual) = (free_port(), free_port());
        let dir = tempfile::tempdir().unwrap();
        let file = |f: &str| certs.join(f).display().to_string();
        let tls = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            file("ca.crt"),
            file("server.crt"),
            file("server.key")
        );
        // `user root`: started as root, mosquitto would read the certificates as its own user.
        let config = format!(
            "user root\nallow_anonymous true\npersistence false\nlistener {port} 127.0.0.1\n{tls}listener {port} 127.0.0.2\n{tls}listener {mutual} 127.0.0.1\n{tls}require_certificate true\n"
        );
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, config).unwrap();
        let child = server_command("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (.ci/run installs it)");
        let s = MosquittoTls {
            child,
            port,
            mutual,
            _dir: dir,
        };
        for p in [port, mutual] {
            eventually(Duration::from_secs(30), "mosquitto's TLS ports", || {
                std::net::TcpStream::connect(("127.0.0.1", p)).ok()
            });
        }
        s
    }
}

impl Drop for MosquittoTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pubsub.mqtt3` over TLS against a TLS-only mosquitto: publish and subscribe with `caCert`;
/// a client certificate where the broker asks for one; the system's roots without `caCert`.
/// An unknown CA and a wrong name fail the publish with rustls' reason, also in the health.
#[test]
fn mqtt_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pems = Pems::make(d);
    let broker = MosquittoTls::start(&d.join("ca"));
    let (ca_pem, other_pem) = (&pems.ca, &pems.other);
    let (cert, key) = (&pems.cert, &pems.key);
    let url = |scheme: &str, host: &str, port: u16| format!("{scheme}://{host}:{port}");
    let mqtt = |name: &str, url: &str, meta: Meta| {
        let first = [("url", url), ("consumerID", name)];
        file(name, "pubsub.mqtt3", &first, meta)
    };
    let good = url("ssl", "localhost", broker.port);
    let mutual = url("mqtts", "localhost", broker.mutual);
    let system = url("tcps", "localhost", broker.port);
    let wrong = url("ssl", "127.0.0.2", broker.port);
    let components = [
        mqtt("good", &good, &[("caCert", ca_pem)]),
        mqtt(
            "mutual",
            &mutual,
            &[("caCert", ca_pem), ("clientCert", cert), ("clientKey", key)],
        ),
        mqtt("system", &system, &[]),
        mqtt("otherca", &good, &[("caCert", other_pem)]),
        mqtt("wrongname", &wrong, &[("caCert", ca_pem)]),
        mqtt("nocert", &mutual, &[("caCert", ca_pem)]),
    ];
    let (app, seen) = subscriber(json!([
        {"pubsubname": "good", "topic": "orders", "route": "/good"},
        {"pubsubname": "mutual", "topic": "orders", "route": "/mutual"},
    ]));
    let sc = bridge(d, &components, &app.to_string());

    // Subscribed over TLS (one broker behind both ports): what one component publishes, the
    // subscriptions of the others get too.
    delivered(&sc, &seen, ("good", "orders", "/good", 1));
    delivered(&sc, &seen, ("mutual", "orders", "/mutual", 2));
    delivered(&sc, &seen, ("system", "orders", "/good", 3));

    publishes_fail(
        &sc,
        &[
            // Another CA of the same name: its signature does not check out.
            ("otherca", "invalid peer certificate"),
            ("wrongname", "certificate not valid for name"),
            ("nocert", ""),
        ],
    );
    assert!(
        sc.stderr().contains("invalid peer certificate"),
        "the log names the reason\n{}",
        sc.diagnostics()
    );
    // Without a client certificate the handshake completes (TLS 1.3) and the broker's alert
    // comes on the first read: the relay logs it.
    assert!(
        sc.stderr().contains("CertificateRequired"),
        "the log names the broker's alert\n{}",
        sc.diagnostics()
    );
}

/// A second sidecar terminating TLS in front of `app` (the machine's RabbitMQ, or a plain
/// HTTP server): inbound `tcp` listeners with `dir/ca`'s certificates, by name: `tls` (the
/// `server` certificate), `mutual` (asks for a client certificate of the CA), `elsewhere` (a
/// certificate for another name).
fn terminator(d: &Path, app: &str, listeners: &[&str]) -> Sidecar {
    let p = |f: &str| d.join(f).display().to_string();
    let mut config = format!("app:\n  address: {app}\nlisteners:\n");
    for name in listeners {
        let leaf = if *name == "elsewhere" {
            "elsewhere"
        } else {
            "server"
        };
        let client_ca = if *name == "mutual" {
            format!(", client_ca: {}", p("ca/ca.crt"))
        } else {
            String::new()
        };
        config.push_str(&format!(
            "  - name: {name}\n    address: 127.0.0.1:0\n    protocol: tcp\n    tls: {{ cert: {}, key: {}{client_ca} }}\n",
            p(&format!("ca/{leaf}.crt")),
            p(&format!("ca/{leaf}.key")),
        ));
    }
    let sc = Sidecar::start(&config);
    sc.wait_ready();
    sc
}

/// The port of a terminator's listener.
fn port(sc: &Sidecar, listener: &str) -> u16 {
    sc.listeners[listener]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `pubsub.rabbitmq` and `bindings.rabbitmq` over `amqps://` (RabbitMQ behind a TLS
/// terminator): publish and subscribe with `caCert`, a client certificate where one is asked
/// for, the system's roots without `caCert`; an unknown CA and a wrong name fail with rustls'
/// reason. And `bindings.http` to an `https://` url: `MTLSRootCA` as a file or as PEM text,
/// the system's roots without it, and the same failures.
#[test]
fn rabbitmq_and_http_binding_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pems = Pems::make(d);
    let web = crate::backend::Backend::http();
    let term = terminator(d, "127.0.0.1:5672", &["tls", "mutual", "elsewhere"]);
    let web_term = terminator(d, &web.address(), &["tls", "elsewhere"]);
    let vhost = RabbitVhost::create();
    let (ca_pem, other_pem) = (&pems.ca, &pems.other);
    let (cert, key) = (&pems.cert, &pems.key);
    let amqps = |host: &str, listener: &str| {
        format!(
            "amqps://guest:guest@{host}:{}/{}",
            port(&term, listener),
            vhost.name
        )
    };
    let rabbit = |name: &str, url: &str, meta: Meta| {
        file(name, "pubsub.rabbitmq", &[("connectionString", url)], meta)
    };
    let (good, mutual) = (amqps("localhost", "tls"), amqps("localhost", "mutual"));
    let elsewhere = amqps("localhost", "elsewhere");
    let https = |listener: &str| format!("https://localhost:{}", port(&web_term, listener));
    let web_url = https("tls");
    let ca_file = d.join("ca/ca.crt").display().to_string();
    let http =
        |name: &str, url: &str, meta: Meta| file(name, "bindings.http", &[("url", url)], meta);
    let binding_url = good.clone();
    let components = vec![
        rabbit("good", &good, &[("caCert", ca_pem)]),
        rabbit(
            "mutual",
            &mutual,
            &[("caCert", ca_pem), ("clientCert", cert), ("clientKey", key)],
        ),
        rabbit("system", &good, &[]),
        rabbit("otherca", &good, &[("caCert", other_pem)]),
        rabbit("wrongname", &elsewhere, &[("caCert", ca_pem)]),
        rabbit("nocert", &mutual, &[("caCert", ca_pem)]),
        (
            "queue.yaml".to_string(),
            component(
                "queue",
                "bindings.rabbitmq",
                &[
                    ("host", &binding_url),
                    ("queueName", "jobs"),
                    ("caCert", ca_pem),
                    ("direction", "output"),
                ],
            ),
        ),
        http("webfile", &web_url, &[("MTLSRootCA", &ca_file)]),
        http("webtext", &web_url, &[("MTLSRootCA", ca_pem)]),
        http("websystem", &web_url, &[]),
        http("webother", &web_url, &[("MTLSRootCA", other_pem)]),
        http("webname", &https("elsewhere"), &[("MTLSRootCA", ca_pem)]),
    ];
    let (app, seen) = subscriber(json!([
        {"pubsubname": "good", "topic": "orders", "route": "/good"},
        {"pubsubname": "mutual", "topic": "payments", "route": "/mutual"},
    ]));
    let sc = bridge(d, &components, &app.to_string());

    delivered(&sc, &seen, ("good", "orders", "/good", 1));
    delivered(&sc, &seen, ("mutual", "payments", "/mutual", 2));
    // The system's roots (SSL_CERT_FILE) without caCert; same exchange as "good".
    delivered(&sc, &seen, ("system", "orders", "/good", 3));
    let (s, body) = post(
        &sc,
        "/v1.0/bindings/queue",
        json!({"operation": "create", "data": {"job": 1}}),
    );
    assert!(s == 200 || s == 204, "{s} {body}");
    assert_eq!(vhost.queues().get("jobs").map(|q| q.0), Some(1));

    publishes_fail(
        &sc,
        &[
            ("otherca", "invalid peer certificate"),
            ("wrongname", "certificate not valid for name"),
            ("nocert", ""),
        ],
    );

    // No client certificate: the terminator's alert, named in the log.
    assert!(
        sc.stderr().contains("CertificateRequired"),
        "the log names the terminator's alert\n{}",
        sc.diagnostics()
    );

    for name in ["webfile", "webtext", "websystem"] {
        let (s, body) = post(
            &sc,
            &format!("/v1.0/bindings/{name}"),
            json!({"operation": "get", "metadata": {"path": "/hello"}}),
        );
        assert_eq!(s, 200, "{name}: {body}\n{}", sc.diagnostics());
    }
    assert!(web.seen().iter().any(|r| r.path == "/hello"));
    for (name, why) in [
        ("webother", "invalid peer certificate"),
        ("webname", "certificate not valid for name"),
    ] {
        let (s, body) = post(
            &sc,
            &format!("/v1.0/bindings/{name}"),
            json!({"operation": "get"}),
        );
        assert_eq!(s, 500, "{name}: {body}");
        assert!(body.contains(why), "{name}: {body}");
    }
}

/// `outrigger check` finds the TLS mistakes at the key's line, exit 78, and never prints the
/// PEM: TLS keys on a plain URL, text that is no PEM, a key of another certificate, half a
/// client pair, SASL EXTERNAL without a client certificate, `MTLSRootCA` on an `http://` url.
#[test]
fn broker_tls_mistakes_are_found_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "ca");
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let (ca_pem, cert, key) = (
        read("ca/ca.crt"),
        read("ca/client.crt"),
        read("ca/client.key"),
    );
    let server_key = read("ca/server.key");
    let components = ComponentsDir::new(d, "bridge:\n");
    let check = |text: &str| {
        components.write("c.yaml", text);
        components.check()
    };
    let cases: [(&str, Meta, &str, &str); 10] = [
        (
            "pubsub.mqtt3",
            &[("url", "tcp://b:1883"), ("caCert", &ca_pem)],
            "caCert",
            "TLS is off",
        ),
        (
            "pubsub.mqtt3",
            &[("url", "ssl://b"), ("caCert", "not PEM")],
            "caCert",
            "no certificate",
        ),
        (
            "bindings.mqtt3",
            &[
                ("url", "ssl://b"),
                ("topic", "t"),
                ("clientCert", &cert),
                ("clientKey", &server_key),
            ],
            "clientKey",
            "another key",
        ),
        (
            "pubsub.mqtt3",
            &[("url", "ssl://b"), ("clientKey", &key)],
            "clientKey",
            "together",
        ),
        (
            "pubsub.rabbitmq",
            &[
                ("connectionString", "amqp://b"),
                ("clientCert", &cert),
                ("clientKey", &key),
            ],
            "clientCert",
            "TLS is off",
        ),
        (
            "pubsub.rabbitmq",
            &[
                ("connectionString", "amqps://b"),
                ("saslExternal", "true"),
                ("caCert", &ca_pem),
            ],
            "saslExternal",
            "without clientCert",
        ),
        (
            "bindings.rabbitmq",
            &[
                ("host", "amqps://b"),
                ("queueName", "q"),
                ("clientCert", "junk"),
                ("clientKey", &key),
            ],
            "clientCert",
            "no certificate",
        ),
        (
            "bindings.http",
            &[("url", "http://b"), ("MTLSRootCA", &ca_pem)],
            "MTLSRootCA",
            "https://",
        ),
        (
            "bindings.http",
            &[("url", "https://b"), ("MTLSRootCA", "/nowhere/ca.pem")],
            "MTLSRootCA",
            "/nowhere/ca.pem",
        ),
        (
            "bindings.http",
            &[("url", "https://b"), ("mtlsRootCA", &ca_pem)],
            "mtlsRootCA",
            "spelled MTLSRootCA",
        ),
    ];
    for (kind, meta, at, why) in cases {
        let text = component("c", kind, meta);
        let (code, _, stderr) = check(&text);
        assert_eq!(code, 78, "{kind} {at}: {stderr}");
        let line = format!("c.yaml:{}", value_line(&text, at));
        assert!(
            stderr.contains(&line) && stderr.contains(why),
            "{kind} {at}: want {line} and {why:?}: {stderr}"
        );
        assert!(!stderr.contains("BEGIN"), "{stderr}");
    }
    // And the good ones pass.
    let good: [(&str, Meta); 3] = [
        (
            "pubsub.mqtt3",
            &[
                ("url", "ssl://b"),
                ("caCert", &ca_pem),
                ("clientCert", &cert),
                ("clientKey", &key),
            ],
        ),
        (
            "pubsub.rabbitmq",
            &[
                ("connectionString", "amqps://b"),
                ("saslExternal", "true"),
                ("caCert", &ca_pem),
                ("clientCert", &cert),
                ("clientKey", &key),
            ],
        ),
        (
            "bindings.http",
            &[("url", "https://b"), ("MTLSRootCA", &ca_pem)],
        ),
    ];
    for (kind, meta) in good {
        let (code, _, stderr) = check(&component("c", kind, meta));
        assert_eq!(code, 0, "{kind}: {stderr}");
    }
}
