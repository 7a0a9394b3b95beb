//! The mesh (`mesh:`), with real sidecars on loopback and certificates from `outrigger certs`:
//! app A calls app B by app id through its sidecar — an outbound request whose Host is `b`,
//! and the bridge's `/v1.0/invoke/b/…` — over mutual TLS with no cluster written, B's app sees
//! the request and A's SPIFFE ID; a peer whose certificate is outside the trust domain is
//! refused on both sides (by B's listener, and by A when it is the one called). The DNS
//! template is `127.0.0.1` with the peers' port from the test (in a cluster it is
//! `{app_id}.{namespace}.svc.cluster.local` and a fixed port). Malformed `mesh:` config and a
//! certificate that is not the workload's are refused with file:line, exit 78.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::backend::Backend;
use crate::support::{GrpcStream, Sidecar, client, or_panic, run_to_end};

const TD: &str = "spiffe://cluster.local";

/// A development CA (trust domain cluster.local) and identity directories laid out as the
/// Secret `outrigger-identity-SA` mounts them (`tls.crt`, `tls.key`, `ca.crt`).
struct Identities {
    dir: tempfile::TempDir,
}

impl Identities {
    fn new() -> Identities {
        let dir = tempfile::tempdir().unwrap();
        let (code, out, err) = run_to_end(
            &[
                "certs",
                "ca",
                "--out",
                "ca",
                "--trust-domain",
                "cluster.local",
            ],
            &[],
            dir.path(),
        );
        assert_eq!(code, 0, "{out}{err}");
        Identities { dir }
    }

    /// The identity directory of `spiffe_id` (issued by the one CA), named `name`.
    fn issue(&self, name: &str, spiffe_id: &str) -> PathBuf {
        let (code, out, err) = run_to_end(
            &[
                "certs",
                "issue",
                "--ca",
                "ca",
                "--out",
                "certs",
                "--name",
                name,
                "--spiffe",
                spiffe_id,
                "--ip",
                "127.0.0.1",
            ],
            &[],
            self.dir.path(),
        );
        assert_eq!(code, 0, "{out}{err}");
        let id = self.dir.path().join(format!("identity-{name}"));
        std::fs::create_dir(&id).unwrap();
        let certs = self.dir.path().join("certs");
        for (from, to) in [
            (format!("{name}.crt"), "tls.crt"),
            (format!("{name}.key"), "tls.key"),
        ] {
            std::fs::copy(certs.join(from), id.join(to)).unwrap();
        }
        std::fs::copy(self.dir.path().join("ca/ca.crt"), id.join("ca.crt")).unwrap();
        id
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A sidecar in the mesh as service account `sa` of namespace shop; `extra` goes inside
/// `mesh:`, `rest` at the top level.
fn member(identity: &Path, sa: &str, peer_port: u16, extra: &str, rest: &str) -> Sidecar {
    let sc = Sidecar::start(&format!(
        "service: {sa}\nmesh:\n  namespace: shop\n  service_account: {sa}\n  identity_dir: {}\n  address: 127.0.0.1:0\n  peer_dns: 127.0.0.1\n  peer_port: {peer_port}\n{extra}{rest}",
        p(identity)
    ));
    sc.wait_ready();
    sc
}

/// B, with `app` behind the mesh's inbound listener (`app_extra` inside its `app:`; B calls no
/// one, so any peer port), then A, which calls B's mesh port (`a_mesh` inside A's `mesh:`, `a_rest` at its top level).
fn b_then_a(
    ids: &Identities,
    app: &Backend,
    app_extra: &str,
    a_mesh: &str,
    a_rest: &str,
) -> (Sidecar, Sidecar) {
    let b = member(
        &ids.issue("b", &format!("{TD}/ns/shop/sa/b")),
        "b",
        1,
        "",
        &format!("app:\n  address: {}\n{app_extra}", app.address()),
    );
    let a = member(
        &ids.issue("a", &format!("{TD}/ns/shop/sa/a")),
        "a",
        port(&b.listeners["mesh"]),
        a_mesh,
        a_rest,
    );
    (b, a)
}

fn port(address: &str) -> u16 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn two_services_talk_mutual_tls_by_app_id_and_outsiders_are_refused() {
    let ids = Identities::new();
    let app_b = Backend::http();
    // B calls no one (any peer port); A: no app address (so no inbound listener), an outbound
    // listener and the bridge.
    let (b, a) = b_then_a(
        &ids,
        &app_b,
        "",
        "  outbound_address: 127.0.0.1:0\n",
        "bridge:\n  address: 127.0.0.1:0\n",
    );
    let b_mesh = b.listeners["mesh"].clone();
    assert!(
        !a.listeners.contains_key("mesh"),
        "no app: no inbound listener"
    );

    // The proxy: a request whose Host is B's app id.
    let r = client()
        .get(format!(
            "http://{}/orders?x=1",
            a.listeners["mesh-outbound"]
        ))
        .header("host", "b")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}\n{}", a.diagnostics(), b.diagnostics());
    let seen = app_b.seen();
    assert_eq!(seen[0].path, "/orders?x=1");
    let xfcc = seen[0].header("x-forwarded-client-cert").expect("xfcc");
    assert!(
        xfcc.starts_with(&format!("By={TD}/ns/shop/sa/b;")),
        "{xfcc}"
    );
    assert!(xfcc.contains(&format!(";URI={TD}/ns/shop/sa/a")), "{xfcc}");
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));

    // The bridge: Dapr's invocation by app id, and `id.namespace`.
    for id in ["b", "b.shop"] {
        let r = client()
            .post(a.bridge_url(&format!("/v1.0/invoke/{id}/method/hello")))
            .body("hi")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{id}: {}", a.diagnostics());
    }
    let seen = app_b.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].path, "/hello");
    assert_eq!(seen[1].body, b"hi");
    assert!(
        seen[2]
            .header("x-forwarded-client-cert")
            .is_some_and(|x| x.contains(&format!("URI={TD}/ns/shop/sa/a")))
    );
    // One cluster for `b` (both spellings, proxy and bridge), `peer:b.shop`, reached over TLS.
    assert!(
        a.metric(
            "outrigger_tls_handshakes_total{side=\"client\",name=\"peer:b.shop\",result=\"ok\"}"
        ) >= 1.0,
        "{}",
        a.get("/metrics").1
    );
    let status = a.get_json("/status");
    let peer = status["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "peer:b.shop"))
        .unwrap_or_else(|| panic!("the peer is on the dashboard: {status}"));
    assert!(peer.to_string().contains(&b_mesh), "{peer}");
    assert_eq!(peer["lb"], "round-robin", "its real settings: {peer}");
    assert_eq!(peer["tls"], true, "{peer}");
    // A host that is not an app id, or one that names another namespace's peer that B is not:
    // no route.
    let r = client()
        .get(format!("http://{}/", a.listeners["mesh-outbound"]))
        .header("host", "not.an.app-id")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);

    // An outsider: a certificate from the same CA, outside the trust domain.
    let outsider = ids.issue("c", "spiffe://evil.example/ns/shop/sa/c");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(outsider.join("ca.crt"))
        .arg("--cert")
        .arg(outsider.join("tls.crt"))
        .arg("--key")
        .arg(outsider.join("tls.key"))
        .arg(format!("https://{b_mesh}/steal"))
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "403",
        "B lets in only its trust domain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without a client certificate there is no TLS session at all.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null"])
        .arg("--cacert")
        .arg(outsider.join("ca.crt"))
        .arg(format!("https://{b_mesh}/steal"))
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    assert!(!out.status.success(), "no client certificate, no request");
    assert_eq!(app_b.count(), 3, "no outsider reached B's app");

    // The outsider as the one called: its sidecar would let A in, but A refuses it.
    let app_c = Backend::http();
    let c = Sidecar::start(&format!(
        "service: c\napp:\n  address: {}\nmesh:\n  trust_domain: evil.example\n  namespace: shop\n  service_account: c\n  identity_dir: {}\n  address: 127.0.0.1:0\n  peer_port: 1\n  authz: [\"{TD}/*\"]\n",
        app_c.address(),
        p(&outsider)
    ));
    c.wait_ready();
    let a_to_c = member(
        &ids.issue("a2", &format!("{TD}/ns/shop/sa/a2")),
        "a2",
        port(&c.listeners["mesh"]),
        "  outbound_address: 127.0.0.1:0\n",
        "bridge:\n  address: 127.0.0.1:0\n",
    );
    let r = client()
        .get(format!("http://{}/x", a_to_c.listeners["mesh-outbound"]))
        .header("host", "c")
        .send()
        .unwrap();
    assert_eq!(r.status(), 502, "{}", a_to_c.diagnostics());
    let r = client()
        .post(a_to_c.bridge_url("/v1.0/invoke/c/method/x"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 500, "{}", a_to_c.diagnostics());
    assert!(
        a_to_c.stderr().contains("wrong_identity"),
        "{}",
        a_to_c.diagnostics()
    );
    assert_eq!(app_c.count(), 0);
}

/// `require_peer_namespace`: a peer called as `id.namespace` must carry that namespace's ID.
#[test]
fn a_peer_must_be_in_the_namespace_its_app_id_names_when_required() {
    let ids = Identities::new();
    let app_b = Backend::http();
    let (_b, a) = b_then_a(
        &ids,
        &app_b,
        "",
        "  outbound_address: 127.0.0.1:0\n  require_peer_namespace: true\n",
        "",
    );
    let get = |host: &str| {
        client()
            .get(format!("http://{}/", a.listeners["mesh-outbound"]))
            .header("host", host)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(get("b"), 200, "{}", a.diagnostics());
    // The same endpoint called as billing's `b`: its ID says shop.
    assert_eq!(get("b.billing"), 502, "{}", a.diagnostics());
    assert_eq!(app_b.count(), 1);
}

#[test]
fn malformed_mesh_config_is_located() {
    let e = crate::config::rejected(
        "mesh:\n  namespace: Shop\n  trust_domain: \"Bad Domain\"\n  authz: []\n  peer_dns: \"{app_id}:80\"\n  max_peers: 0\n  address: 127.0.0.1:0\nlisteners:\n  - name: mesh\n    address: 127.0.0.1:0\n    direction: outbound\n",
        &[
            "bad.yaml:1:1: mesh: mesh.service_account is not set",
            "bad.yaml:2:14: mesh.namespace: expected the workload's namespace",
            "bad.yaml:3:17: mesh.trust_domain: expected a SPIFFE trust domain",
            "bad.yaml:4:10: mesh.authz: expected at least one identity pattern",
            "bad.yaml:5:13: mesh.peer_dns: expected a host name, where",
            "bad.yaml:6:14: mesh.max_peers: expected 1 to 10000, found 0",
            "mesh: mesh.address has port 0, so the peers' port is unknown",
        ],
    );
    assert!(!e.contains("listeners[0]"), "{e}");
    crate::config::rejected(
        "mesh:\n  namespace: shop\n  service_account: web\n  peer_dns: \"{namespace}:1\"\n  address: 127.0.0.1:15443\n  outbound_address: 0.0.0.0:15443\n",
        &[
            "bad.yaml:4:13: mesh.peer_dns: expected a host name, where {app_id}",
            "bad.yaml:6:21: mesh.outbound_address: 0.0.0.0:15443 is mesh.address's too",
        ],
    );
    // `mesh-peers` labels the peers' TLS reloads: no listener may be called so.
    crate::config::rejected(
        "mesh:\n  namespace: shop\n  service_account: web\nlisteners:\n  - name: mesh-peers\n    address: 127.0.0.1:0\n    direction: outbound\n",
        &["bad.yaml:5:11: listeners[0].name: the name \"mesh-peers\" is the mesh's"],
    );
    // The peers' cluster names are theirs alone.
    crate::config::rejected(
        "clusters:\n  \"peer:b.shop\": { endpoints: [\"127.0.0.1:1\"] }\n",
        &["clusters.peer:b.shop: cluster names starting with \"peer:\" are the mesh's peers'"],
    );
    crate::config::rejected(
        "mesh:\n  namespace: shop\n  service_account: web\n  unknown: 1\n",
        &["bad.yaml:4:3: mesh.unknown: unknown field `unknown`"],
    );
    crate::config::rejected(
        "mesh:\n  namespace: shop\n  service_account: web\n  identity_dir: /nonexistent\nlisteners:\n  - name: mesh\n    address: 127.0.0.1:0\n    direction: outbound\n",
        &[
            "bad.yaml:6:11: listeners[0].name: the name \"mesh\" is the mesh's",
            "bad.yaml:4:17: mesh.identity_dir: cannot read /nonexistent/",
        ],
    );
}

/// The certificate in the identity directory must carry the workload's own SPIFFE ID.
#[test]
fn a_certificate_that_is_not_the_workloads_is_refused() {
    let ids = Identities::new();
    let id = ids.issue("b", &format!("{TD}/ns/shop/sa/b"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("o.yaml"),
        format!(
            "mesh:\n  namespace: shop\n  service_account: payments\n  identity_dir: {}\n",
            p(&id)
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_to_end(&["check", "-c", "o.yaml"], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "o.yaml:1:1: mesh: {}/tls.crt carries [\"{TD}/ns/shop/sa/b\"",
            p(&id)
        )) && stderr.contains(&format!(
            "not this workload's SPIFFE ID {TD}/ns/shop/sa/payments"
        )),
        "{stderr}"
    );
    // The right identity, but no app.address: valid, with a warning (no inbound listener).
    std::fs::write(
        dir.path().join("o.yaml"),
        format!(
            "mesh:\n  namespace: shop\n  service_account: b\n  identity_dir: {}\n",
            p(&id)
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_to_end(&["check", "-c", "o.yaml"], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains(
            "warning: mesh: app.address is not set, so there is no inbound `mesh` listener"
        ),
        "{stderr}"
    );
}

/// Swaps `from`'s certificate and key into the identity directory `to`, as the kubelet does:
/// new files renamed over the old ones.
fn renew(from: &Path, to: &Path) {
    for f in ["tls.key", "tls.crt"] {
        let tmp = to.join(format!(".{f}.new"));
        std::fs::copy(from.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, to.join(f)).unwrap();
    }
}

/// A renewed identity (the Secret's files replaced) is used for new connections to peers
/// without a restart: B's app sees A's new certificate. A renewal carrying another
/// workload's SPIFFE ID is refused on both sides (B's `mesh` listener, A's peers), the old
/// certificate kept and the refusal counted.
#[test]
fn a_renewed_identity_is_used_without_a_restart() {
    let ids = Identities::new();
    let app_b = Backend::http();
    let b_dir = ids.issue("b", &format!("{TD}/ns/shop/sa/b"));
    let b = member(
        &b_dir,
        "b",
        1,
        "",
        &format!("app:\n  address: {}\n", app_b.address()),
    );
    let a_dir = ids.issue("a", &format!("{TD}/ns/shop/sa/a"));
    let a = member(
        &a_dir,
        "a",
        port(&b.listeners["mesh"]),
        "  outbound_address: 127.0.0.1:0\n",
        "",
    );
    let field = |xfcc: &str, name: &str| {
        xfcc.split(';')
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {xfcc}"))
            .to_string()
    };
    let xfcc = || {
        let r = client()
            .get(format!("http://{}/", a.listeners["mesh-outbound"]))
            .header("host", "b")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}\n{}", a.diagnostics(), b.diagnostics());
        let seen = app_b.seen();
        seen.last()
            .unwrap()
            .header("x-forwarded-client-cert")
            .unwrap()
            .to_string()
    };
    let hash = || field(&xfcc(), "Hash=");
    let before = hash();
    // The same SPIFFE ID, a new certificate and key.
    renew(
        &ids.issue("a-renewed", &format!("{TD}/ns/shop/sa/a")),
        &a_dir,
    );
    let renewed = crate::support::eventually(
        std::time::Duration::from_secs(20),
        "A's new certificate at B",
        || {
            let h = hash();
            (h != before).then_some(h)
        },
    );

    // Another workload's SPIFFE ID (the wrong Secret mounted), on both sides: refused, the
    // old certificates kept, counted.
    renew(&ids.issue("x", &format!("{TD}/ns/shop/sa/x")), &b_dir);
    renew(&ids.issue("y", &format!("{TD}/ns/shop/sa/y")), &a_dir);
    for (sc, listener) in [(&b, "mesh"), (&a, "mesh-peers")] {
        crate::support::eventually(
            std::time::Duration::from_secs(20),
            &format!("the wrong renewal refused ({listener})"),
            || {
                (sc.metric(&format!(
                    "outrigger_tls_reloads_total{{listener=\"{listener}\",result=\"failure\"}}"
                )) >= 1.0)
                    .then_some(())
            },
        );
    }
    let now = xfcc();
    assert_eq!(field(&now, "Hash="), renewed, "A's certificate kept: {now}");
    assert!(
        now.starts_with(&format!("By={TD}/ns/shop/sa/b;")),
        "B's kept: {now}"
    );
    assert!(
        b.stderr().contains("not this workload's SPIFFE ID"),
        "{}",
        b.diagnostics()
    );
}

/// gRPC between apps through the mesh: app A calls B's gRPC method by app id through A's
/// sidecar (the outbound listener, and the bridge's gRPC proxying with `dapr-app-id`), the
/// peers speak HTTP/2 over mutual TLS, B's sidecar hands the call to B's gRPC app, and the
/// trailers (`grpc-status`) come back to A. Plain HTTP/1.1 requests ride the same peer.
#[test]
fn grpc_between_apps_crosses_the_mesh_with_its_trailers() {
    let ids = Identities::new();
    let app_b = Backend::http();
    let (b, a) = b_then_a(
        &ids,
        &app_b,
        "  protocol: grpc\n",
        "  outbound_address: 127.0.0.1:0\n",
        "bridge:\n  address: 127.0.0.1:0\n",
    );
    let diagnostics = || format!("{}\n{}", a.diagnostics(), b.diagnostics());
    const MSG: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];

    // A stream, each message echoed before the next is sent; while it is open, a plain
    // HTTP/1.1 request from the app rides the same peer connection: one TLS handshake for
    // both, which only HTTP/2 between the sidecars allows.
    let mut call = or_panic(
        GrpcStream::open(&a.listeners["mesh-outbound"], "b", &[], MSG),
        diagnostics,
    );
    assert_eq!(call.status, 200, "{}", diagnostics());
    let r = client()
        .get(format!("http://{}/plain", a.listeners["mesh-outbound"]))
        .header("host", "b")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", diagnostics());
    or_panic(call.exchange(b"second"), diagnostics);
    assert_eq!(
        or_panic(call.finish(), diagnostics).as_deref(),
        Some("0"),
        "{}",
        diagnostics()
    );
    let seen = app_b.seen();
    let grpc = seen
        .iter()
        .find(|s| s.path == "/echo.v1.Echo/Stream")
        .unwrap_or_else(|| panic!("{seen:?}"));
    assert_eq!(grpc.version, "HTTP/2.0");
    assert!(
        grpc.header("x-forwarded-client-cert")
            .is_some_and(|x| x.contains(&format!("URI={TD}/ns/shop/sa/a"))),
        "{grpc:?}"
    );
    assert!(seen.iter().any(|s| s.path == "/plain"), "{seen:?}");
    assert_eq!(
        a.metric(
            "outrigger_tls_handshakes_total{side=\"client\",name=\"peer:b.shop\",result=\"ok\"}"
        ),
        1.0,
        "one multiplexed connection to the peer: {}",
        diagnostics()
    );

    // Daprd's gRPC proxying: the bridge's port, `dapr-app-id: b`, the same message by message
    // stream (the bridge forwards each message as it comes, and each echo as it comes back).
    let bridge = a.bridge.clone().expect("the bridge runs");
    let mut call = or_panic(
        GrpcStream::open(&bridge, &bridge, &[("dapr-app-id", "b")], MSG),
        diagnostics,
    );
    assert_eq!(call.status, 200, "{}", diagnostics());
    or_panic(
        call.exchange(&crate::support::grpc_message(b"second")),
        diagnostics,
    );
    assert_eq!(
        or_panic(call.finish(), diagnostics).as_deref(),
        Some("0"),
        "{}",
        diagnostics()
    );
    assert_eq!(app_b.count(), 3);
}

/// A WebSocket (an HTTP/1.1 upgrade) from app A to B by app id: HTTP/2 has no `Upgrade`, so
/// the peers carry this one over HTTP/1.1 (ALPN `http/1.1` on its own mutual-TLS connection),
/// B's app gets the upgrade, and bytes flow both ways once it is switched.
#[test]
fn websocket_upgrades_cross_the_mesh_over_http1() {
    use std::io::{Read, Write};
    let ids = Identities::new();
    let app_b = Backend::http();
    let (b, a) = b_then_a(&ids, &app_b, "", "  outbound_address: 127.0.0.1:0\n", "");
    let diagnostics = || format!("{}\n{}", a.diagnostics(), b.diagnostics());
    let mut s = std::net::TcpStream::connect(&a.listeners["mesh-outbound"]).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read_exact(&mut byte).is_err() {
            panic!(
                "the answer's head was cut: {:?}\n{}",
                String::from_utf8_lossy(&head),
                diagnostics()
            );
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "{head}\n{}",
        diagnostics()
    );
    for msg in [&b"ping"[..], b"pong and more"] {
        s.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    }
    let seen = app_b.seen();
    assert_eq!(
        seen[0].header("upgrade"),
        Some("websocket"),
        "{:?}",
        seen[0]
    );
    assert_eq!(seen[0].version, "HTTP/1.1");
    assert!(
        seen[0]
            .header("x-forwarded-client-cert")
            .is_some_and(|x| x.contains(&format!("URI={TD}/ns/shop/sa/a"))),
        "over the mesh's mutual TLS: {:?}",
        seen[0]
    );
}

/// A mesh member with neither `app.address` nor `mesh.outbound_address` runs no proxy, only
/// the bridge: it still warns that no peer can call it, and still calls its peers.
#[cfg(feature = "bridge")]
#[test]
fn a_bridge_only_member_warns_and_calls_its_peers() {
    let ids = Identities::new();
    let app_b = Backend::http();
    let (b, a) = b_then_a(&ids, &app_b, "", "", "bridge:\n  address: 127.0.0.1:0\n");
    assert!(a.listeners.is_empty(), "{:?}", a.listeners);
    let r = client()
        .post(a.bridge_url("/v1.0/invoke/b/method/hello"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}\n{}", a.diagnostics(), b.diagnostics());
    assert!(
        a.stderr()
            .contains("mesh: app.address is not set, so there is no inbound `mesh` listener"),
        "{}",
        a.diagnostics()
    );
}
