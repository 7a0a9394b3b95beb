//! TLS with real clients: curl (HTTPS, HTTP/2, client certificates), `openssl s_client`
//! (versions, ALPN), two sidecars talking mutual TLS, every rejection case with no bytes to the
//! app, and certificate hot reload under load. Certificates come from `outrigger certs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::support::{Sidecar, eventually, run_to_end};

const TD: &str = "spiffe://example.org/ns/shop/sa";

/// A development PKI made with `outrigger certs`.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (code, out, err) = run_to_end(
            &[
                "certs",
                "ca",
                "--out",
                "ca",
                "--trust-domain",
                "example.org",
            ],
            &[],
            dir.path(),
        );
        assert_eq!(code, 0, "{out}{err}");
        Pki { dir }
    }

    /// A second, unrelated CA in `ca-<name>`.
    pub fn other_ca(&self, name: &str) -> PathBuf {
        let out = format!("ca-{name}");
        let (code, o, e) = run_to_end(&["certs", "ca", "--out", &out], &[], self.dir.path());
        assert_eq!(code, 0, "{o}{e}");
        self.dir.path().join(out)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca/ca.crt")
    }

    /// Issues NAME with `spiffe://example.org/ns/shop/sa/NAME`, DNS localhost and IP 127.0.0.1.
    pub fn issue(&self, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        self.issue_from("ca", name, extra)
    }

    pub fn issue_from(&self, ca: &str, name: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        let spiffe = format!("{TD}/{name}");
        let mut args = vec![
            "certs",
            "issue",
            "--ca",
            ca,
            "--out",
            "certs",
            "--name",
            name,
            "--spiffe",
            &spiffe,
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
        ];
        args.extend_from_slice(extra);
        let (code, o, e) = run_to_end(&args, &[], self.dir.path());
        assert_eq!(code, 0, "{o}{e}");
        let d = self.dir.path().join("certs");
        (d.join(format!("{name}.crt")), d.join(format!("{name}.key")))
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// curl with the test CA; returns (exit code, stdout, stderr).
fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `openssl s_client` against `addr` with `args`; returns its output (both streams). Prints
/// "Protocol version: …" (`-brief`), or without `-brief` the ALPN result and the certificates.
fn s_client(addr: &str, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", addr])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An inbound TLS listener `public` in front of `app`, with `tls_extra` inside its `tls:` and
/// `extra` at the listener level.
fn inbound(pki: &Pki, app: &Backend, tls_extra: &str, extra: &str) -> Sidecar {
    let (cert, key) = pki.issue("b", &[]);
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    tls:\n      cert: {}\n      key: {}\n{tls_extra}{extra}",
        app.address(),
        p(&cert),
        p(&key)
    ));
    sc.wait_ready();
    sc
}

// Run with hyper's HTTP/2 server and with Outrigger's own (`NAME::hyper`, `NAME::outrigger`).
on_both_http2_servers!(https_http1_and_http2_alpn_and_versions_with_curl_and_openssl);

fn https_http1_and_http2_alpn_and_versions_with_curl_and_openssl(server: &str) {
    let pki = Pki::new();
    let app = Backend::http();
    let sc = inbound(&pki, &app, "", &format!("    http2_server: {server}\n"));
    let port = sc.listeners["public"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("https://localhost:{port}/hello");
    let ca = p(&pki.ca());
    let (code, out, err) = curl(&[
        "--http1.1",
        "--cacert",
        &ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &url,
    ]);
    assert_eq!((code, out.as_str()), (0, "200 1.1"), "{err}");
    let (code, out, err) = curl(&[
        "--http2",
        "--cacert",
        &ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &url,
    ]);
    assert_eq!((code, out.as_str()), (0, "200 2"), "{err}");
    let seen = app.seen();
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));

    let addr = sc.listeners["public"].clone();
    let h2 = s_client(&addr, &["-alpn", "h2", "-CAfile", &ca]);
    let brief = |extra: &[&str]| s_client(&addr, &[&["-brief"], extra].concat());
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    let h1 = s_client(&addr, &["-alpn", "http/1.1", "-CAfile", &ca]);
    assert!(h1.contains("ALPN protocol: http/1.1"), "{h1}");
    let v12 = brief(&["-tls1_2", "-CAfile", &ca]);
    assert!(v12.contains("Protocol version: TLSv1.2"), "{v12}");
    // TLS 1.0 and 1.1 do not exist in rustls: the handshake fails (SECLEVEL=0 makes openssl
    // itself willing to try).
    for v in ["-tls1", "-tls1_1"] {
        let old = brief(&[v, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(!old.contains("Protocol version"), "{v} was accepted: {old}");
    }
    assert_eq!(app.count(), 2, "only the two curl requests reached the app");
    assert!(sc.metric("outrigger_tls_handshakes_total{side=\"server\",name=\"public\",result=\"incompatible\"}") >= 1.0
        || sc.stderr().contains("TLS handshake failed"), "{}", sc.diagnostics());
}

#[test]
fn min_version_and_plain_http_are_refused() {
    let pki = Pki::new();
    let app = Backend::http();
    let sc = inbound(&pki, &app, "      min_version: \"1.3\"\n", "");
    let addr = sc.listeners["public"].clone();
    let ca = p(&pki.ca());
    let v12 = s_client(&addr, &["-brief", "-tls1_2", "-CAfile", &ca]);
    assert!(!v12.contains("Protocol version"), "{v12}");
    let v13 = s_client(&addr, &["-brief", "-tls1_3", "-CAfile", &ca]);
    assert!(v13.contains("Protocol version: TLSv1.3"), "{v13}");
    let (code, out, _) = curl(&["-i", &format!("http://{addr}/")]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("this port speaks TLS"), "{out}");
    assert_eq!(app.count(), 0);
    assert_eq!(
        sc.metric(
            "outrigger_tls_handshakes_total{side=\"server\",name=\"public\",result=\"not_tls\"}"
        ),
        1.0
    );
}

/// Sidecar B: inbound mTLS in front of its app, allowing `allow`.
fn service_b(pki: &Pki, app: &Backend, allow: &str) -> Sidecar {
    inbound(
        pki,
        app,
        &format!("      client_ca: {}\n", p(&pki.ca())),
        &format!("    authz: [\"{allow}\"]\n"),
    )
}

/// Sidecar A: an outbound listener whose cluster `b` is B's inbound port over mTLS, requiring
/// `identity`.
fn service_a(pki: &Pki, b_addr: &str, identity: &str) -> Sidecar {
    let (cert, key) = pki.issue("a", &[]);
    let sc = Sidecar::start(&format!(
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: b\nclusters:\n  b:\n    endpoints: [{b_addr}]\n    tls:\n      ca: {}\n      cert: {}\n      key: {}\n      identity: \"{identity}\"\n",
        p(&pki.ca()),
        p(&cert),
        p(&key)
    ));
    sc.wait_ready();
    sc
}

#[test]
fn two_sidecars_talk_mutual_tls_and_the_app_sees_the_callers_identity() {
    let pki = Pki::new();
    let app_b = Backend::http();
    let b = service_b(&pki, &app_b, &format!("{TD}/a"));
    let a = service_a(&pki, &b.listeners["public"], &format!("{TD}/b"));
    let url = a.listener_url("out", "/orders");
    let r = crate::support::client()
        .get(&url)
        .header("x-forwarded-client-cert", "URI=spiffe://evil/sa/root")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}\n{}", a.diagnostics(), b.diagnostics());
    let seen = &app_b.seen()[0];
    let xfcc = seen.header("x-forwarded-client-cert").expect("xfcc");
    assert!(xfcc.starts_with(&format!("By={TD}/b;Hash=")), "{xfcc}");
    assert!(xfcc.contains(&format!(";URI={TD}/a")), "{xfcc}");
    assert!(xfcc.contains(";DNS=localhost"), "{xfcc}");
    assert!(
        !xfcc.contains("evil"),
        "a client's own claim was passed on: {xfcc}"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        a.metric("outrigger_tls_handshakes_total{side=\"client\",name=\"b\",result=\"ok\"}"),
        1.0
    );
    // A requires B to be `sa/b`: a cluster wanting another identity refuses B (502).
    let strict = service_a(&pki, &b.listeners["public"], &format!("{TD}/payments"));
    let r = crate::support::client()
        .get(strict.listener_url("out", "/x"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(
        strict.stderr().contains("wrong_identity"),
        "{}",
        strict.diagnostics()
    );
    assert_eq!(app_b.count(), 1);
}

#[test]
fn listener_authz_changes_reach_open_connections() {
    let pki = Pki::new();
    let app = Backend::http();
    let (cert, key) = pki.issue("b", &[]);
    let config = |authz: &str| {
        format!(
            "runtime:\n  watch_config: false\napp:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    tls: {{ cert: {}, key: {}, client_ca: {} }}\n{authz}",
            app.address(),
            p(&cert),
            p(&key),
            p(&pki.ca())
        )
    };
    let sc = Sidecar::start(&config(""));
    sc.wait_ready();
    let port = sc.listeners["public"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let (wc, wk) = pki.issue("web", &[]);
    let mut pem = std::fs::read(&wc).unwrap();
    pem.extend(std::fs::read(&wk).unwrap());
    // One keep-alive connection for the whole test.
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).unwrap()).unwrap(),
        )
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/x");
    assert_eq!(client.get(&url).send().unwrap().status(), 200);
    std::fs::write(
        &sc.config_path,
        config(&format!("    authz: [\"{TD}/a\"]\n")),
    )
    .unwrap();
    crate::support::client()
        .post(sc.url("/reload"))
        .send()
        .unwrap();
    eventually(Duration::from_secs(10), "the reload", || {
        (sc.metric("outrigger_config_reloads_total{result=\"success\"}") == 1.0).then_some(())
    });
    assert_eq!(client.get(&url).send().unwrap().status(), 403);
    assert_eq!(
        sc.metric("outrigger_tls_handshakes_total{side=\"server\",name=\"public\",result=\"ok\"}"),
        1.0,
        "the same connection was used"
    );
    assert_eq!(app.count(), 1);
}

#[test]
fn a_clusters_client_certificate_is_reloaded() {
    let pki = Pki::new();
    let app_b = Backend::http();
    let b = service_b(&pki, &app_b, &format!("{TD}/a"));
    let (cert, key) = pki.issue("a", &[]);
    let dir = tempfile::tempdir().unwrap();
    let (live_cert, live_key) = (dir.path().join("a.crt"), dir.path().join("a.key"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let a = Sidecar::start(&format!(
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: b\nclusters:\n  b:\n    endpoints: [{}]\n    pool_idle_timeout: 100ms\n    tls:\n      ca: {}\n      cert: {}\n      key: {}\n",
        b.listeners["public"],
        p(&pki.ca()),
        p(&live_cert),
        p(&live_key)
    ));
    a.wait_ready();
    let url = a.listener_url("out", "/x");
    assert_eq!(
        crate::support::client().get(&url).send().unwrap().status(),
        200
    );
    // Rotated to a certificate B does not allow: once A uses it, B answers 403.
    let (other_cert, other_key) = pki.issue("c", &[]);
    std::fs::copy(&other_key, dir.path().join("k.tmp")).unwrap();
    std::fs::copy(&other_cert, dir.path().join("c.tmp")).unwrap();
    std::fs::rename(dir.path().join("k.tmp"), &live_key).unwrap();
    std::fs::rename(dir.path().join("c.tmp"), &live_cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = crate::support::client().get(&url).send().unwrap().status();
        if status == 403 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never used the new certificate (last status {status})\n{}\n{}",
            a.diagnostics(),
            b.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        a.stderr().contains("TLS client material reloaded"),
        "{}",
        a.diagnostics()
    );
    // (Requests on connections pooled before the rotation still carried the old identity.)
}

#[test]
fn rejected_clients_never_reach_the_app() {
    let pki = Pki::new();
    let app = Backend::http();
    let b = service_b(&pki, &app, &format!("{TD}/a"));
    let port = b.listeners["public"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("https://localhost:{port}/");
    let ca = p(&pki.ca());
    let with = |cert: &Path, key: &Path| {
        curl(&[
            "--cacert",
            &ca,
            "--cert",
            &p(cert),
            "--key",
            &p(key),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
    };
    // No client certificate.
    let (code, _, _) = curl(&["--cacert", &ca, &url]);
    assert_ne!(code, 0);
    // A certificate from another CA.
    pki.other_ca("rogue");
    let (cert, key) = pki.issue_from("ca-rogue", "a", &[]);
    assert_ne!(with(&cert, &key).0, 0);
    // An expired certificate.
    let (cert, key) = pki.issue("expired", &["--expired"]);
    assert_ne!(with(&cert, &key).0, 0);
    // A valid certificate with an identity the listener does not allow: 403.
    let (cert, key) = pki.issue("c", &[]);
    let (code, out, _) = with(&cert, &key);
    assert_eq!((code, out.as_str()), (0, "403"));
    let m = |r: &str| {
        b.metric(&format!(
            "outrigger_tls_handshakes_total{{side=\"server\",name=\"public\",result=\"{r}\"}}"
        ))
    };
    let counted = || {
        format!(
            "{} {} {}",
            m("no_client_cert"),
            m("unknown_ca"),
            m("expired")
        )
    };
    let all = b.get("/metrics").1;
    let all: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("tls_handshakes_total{"))
        .collect();
    eventually(
        Duration::from_secs(5),
        &format!("the rejections counted: {} {all:?}", counted()),
        || {
            (m("no_client_cert") == 1.0 && m("unknown_ca") == 1.0 && m("expired") == 1.0)
                .then_some(())
        },
    );
    let log = b.stderr();
    for reason in [
        "no_client_cert",
        "unknown_ca",
        "expired",
        "identity not allowed",
    ] {
        assert!(log.contains(reason), "no log line for {reason}\n{log}");
    }
    assert_eq!(app.count(), 0, "a rejected client reached the app");
}

#[test]
fn certificates_reload_under_load_without_a_failed_request() {
    let pki = Pki::new();
    let app = Backend::http();
    let (cert, key) = pki.issue("b", &[]);
    let dir = tempfile::tempdir().unwrap();
    let (live_cert, live_key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    tls: {{ cert: {}, key: {} }}\n",
        app.address(),
        p(&live_cert),
        p(&live_key)
    ));
    sc.wait_ready();
    let port = sc.listeners["public"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("https://localhost:{port}/");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.ca()).unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (url, ca, stop, ok, failed) = (
                url.clone(),
                ca.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
            );
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    // A new client each time: every request is a new handshake.
                    let c = reqwest::blocking::Client::builder()
                        .add_root_certificate(ca.clone())
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap();
                    match c.get(&url).send() {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // One keep-alive connection across the swap: open connections are kept.
    let kept = reqwest::blocking::Client::builder()
        .add_root_certificate(ca.clone())
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    assert_eq!(kept.get(&url).send().unwrap().status(), 200);
    // A renewed certificate, swapped in the way Kubernetes does it for secret volumes: key
    // and certificate replaced by rename.
    let (new_cert, new_key) = pki.issue("b-renewed", &["--dns", "renewed.example.org"]);
    std::fs::copy(&new_key, dir.path().join("k.tmp")).unwrap();
    std::fs::copy(&new_cert, dir.path().join("c.tmp")).unwrap();
    std::fs::rename(dir.path().join("k.tmp"), &live_key).unwrap();
    std::fs::rename(dir.path().join("c.tmp"), &live_cert).unwrap();
    eventually(Duration::from_secs(10), "the reload", || {
        (sc.metric("outrigger_tls_reloads_total{listener=\"public\",result=\"success\"}") >= 1.0)
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        kept.get(&url).send().unwrap().status(),
        200,
        "the open connection broke"
    );
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().for_each(|w| w.join().unwrap());
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{ok} ok\n{}", sc.diagnostics());
    assert!(ok > 20, "too little load: {ok}");
    // The new certificate is served now.
    let served = s_client(
        &sc.listeners["public"],
        &["-showcerts", "-CAfile", &p(&pki.ca())],
    );
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            let pem_start = served.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
            c.stdin
                .take()
                .unwrap()
                .write_all(&served.as_bytes()[pem_start..])?;
            c.wait_with_output()
        })
        .unwrap();
    let san = String::from_utf8_lossy(&out.stdout);
    assert!(san.contains("renewed.example.org"), "{san}\n{served}");
    // A broken file keeps the working material.
    std::fs::write(&live_cert, "not a certificate").unwrap();
    eventually(Duration::from_secs(10), "the failed reload", || {
        (sc.metric("outrigger_tls_reloads_total{listener=\"public\",result=\"failure\"}") >= 1.0)
            .then_some(())
    });
    let (code, out, err) = curl(&[
        "--cacert",
        &p(&pki.ca()),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!((code, out.as_str()), (0, "200"), "{err}");
}

#[test]
fn sni_picks_the_certificate_sessions_resume_and_tcp_listeners_terminate_tls() {
    let pki = Pki::new();
    let app = Backend::http();
    // Only that name, so its CN is it too.
    let (code, o, e) = run_to_end(
        &[
            "certs",
            "issue",
            "--ca",
            "ca",
            "--out",
            "certs",
            "--name",
            "other",
            "--dns",
            "other.example.org",
        ],
        &[],
        pki.dir.path(),
    );
    assert_eq!(code, 0, "{o}{e}");
    let other_cert = pki.dir.path().join("certs/other.crt");
    let other_key = pki.dir.path().join("certs/other.key");
    let (echo, _t) = crate::backend::tcp_echo();
    let (cert, key) = pki.issue("b", &[]);
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    tls:\n      cert: {c}\n      key: {k}\n      sni:\n        - {{ names: [other.example.org], cert: {}, key: {} }}\n  - name: raw\n    address: 127.0.0.1:0\n    protocol: tcp\n    cluster: echo\n    tls: {{ cert: {c}, key: {k} }}\nclusters:\n  echo:\n    endpoints: [{echo}]\n",
        app.address(),
        p(&other_cert),
        p(&other_key),
        c = p(&cert),
        k = p(&key),
    ));
    sc.wait_ready();
    let addr = sc.listeners["public"].clone();
    let ca = p(&pki.ca());
    let by_sni = s_client(
        &addr,
        &["-brief", "-servername", "other.example.org", "-CAfile", &ca],
    );
    assert!(by_sni.contains("CN = other.example.org"), "{by_sni}");
    let default = s_client(
        &addr,
        &["-brief", "-servername", "localhost", "-CAfile", &ca],
    );
    assert!(default.contains("CN = localhost"), "{default}");

    // TLS 1.2 session resumption (TLS 1.3 resumes through tickets the same way).
    let sess = sc.path("session.pem");
    let first = s_client(&addr, &["-tls1_2", "-CAfile", &ca, "-sess_out", &p(&sess)]);
    assert!(first.contains("New, TLSv1.2"), "{first}");
    let again = s_client(&addr, &["-tls1_2", "-CAfile", &ca, "-sess_in", &p(&sess)]);
    assert!(again.contains("Reused, TLSv1.2"), "{again}");

    // A tcp listener terminating TLS in front of an opaque backend (an echo server).
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-no_ign_eof",
            "-connect",
            &sc.listeners["raw"],
            "-CAfile",
            &ca,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            let mut stdin = c.stdin.take().unwrap();
            stdin.write_all(b"ping over tls\n")?;
            // Give the echo a moment before closing our side (s_client exits on EOF).
            std::thread::sleep(Duration::from_millis(500));
            drop(stdin);
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ping over tls"),
        "{}",
        sc.diagnostics()
    );
}

#[test]
fn route_authz_allows_per_route() {
    let pki = Pki::new();
    let app = Backend::http();
    let (cert, key) = pki.issue("b", &[]);
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    tls: {{ cert: {}, key: {}, client_ca: {} }}\n    routes:\n      - name: admin\n        match: {{ path_prefix: /admin/ }}\n        cluster: app\n        authz: [\"{TD}/ops\"]\n",
        app.address(),
        p(&cert),
        p(&key),
        p(&pki.ca())
    ));
    sc.wait_ready();
    let port = sc.listeners["public"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let ca = p(&pki.ca());
    let get = |who: &str, path: &str| {
        let (c, k) = pki.issue(who, &[]);
        let url = format!("https://localhost:{port}{path}");
        curl(&[
            "--cacert",
            &ca,
            "--cert",
            &p(&c),
            "--key",
            &p(&k),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .1
    };
    assert_eq!(get("ops", "/admin/x"), "200");
    assert_eq!(get("web", "/admin/x"), "403");
    assert_eq!(get("web", "/public"), "200");
    // Other spellings of /admin/ that apps read as /admin/ are refused, not routed past the
    // protected route.
    for sneaky in ["//admin/x", "/./admin/x", "/%61dmin/x", "/x/../admin/x"] {
        let (c, k) = pki.issue("web", &[]);
        let url = format!("https://localhost:{port}{sneaky}");
        let (_, code, _) = curl(&[
            "--path-as-is",
            "--cacert",
            &ca,
            "--cert",
            &p(&c),
            "--key",
            &p(&k),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]);
        assert_eq!(code, "400", "{sneaky}");
    }
    assert_eq!(app.count(), 2);
}
