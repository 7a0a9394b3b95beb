//! `outrigger certs`: the real binary creates a CA and workload certificates, and real openssl
//! checks them (chain, both TLS purposes, the SPIFFE URI SAN, key file modes).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::run_to_end;

const SPIFFE: &str = "spiffe://example.org/ns/shop/sa/web";

/// Runs `outrigger certs ARGS` in `dir`; panics with the output unless it exits with `want`.
fn certs(dir: &Path, args: &[&str], want: i32) -> (String, String) {
    let args: Vec<&str> = ["certs"].iter().chain(args).copied().collect();
    let (code, stdout, stderr) = run_to_end(&args, &[], dir);
    assert_eq!(
        code, want,
        "outrigger {args:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    (stdout, stderr)
}

/// Runs openssl in `dir`; returns (success, stdout + stderr).
fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_and_leaf_pass_openssl_verify_as_client_and_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (stdout, _) = certs(
        d,
        &["ca", "--out", "certs", "--trust-domain", "example.org"],
        0,
    );
    assert_eq!(stdout, "wrote certs/ca.crt\nwrote certs/ca.key\n");
    let issue = [
        "issue",
        "--ca",
        "certs",
        "--out",
        "certs",
        "--name",
        "web",
        "--spiffe",
        SPIFFE,
        "--dns",
        "web.shop.svc",
        "--ip",
        "127.0.0.1",
    ];
    let (stdout, _) = certs(d, &issue, 0);
    assert_eq!(stdout, "wrote certs/web.crt\nwrote certs/web.key\n");
    assert_eq!(mode(&d.join("certs/ca.key")), 0o600);
    assert_eq!(mode(&d.join("certs/web.key")), 0o600);

    let c = d.join("certs");
    for purpose in ["sslclient", "sslserver"] {
        let args = [
            "verify", "-CAfile", "ca.crt", "-purpose", purpose, "web.crt",
        ];
        let (ok, text) = openssl(&c, &args);
        assert!(
            ok && text.contains("web.crt: OK"),
            "openssl {args:?}\n{text}"
        );
    }
    let (ok, text) = openssl(
        &c,
        &["x509", "-in", "web.crt", "-noout", "-ext", "subjectAltName"],
    );
    assert!(ok, "{text}");
    assert!(text.contains(&format!("URI:{SPIFFE}")), "{text}");
    assert!(
        text.contains("DNS:web.shop.svc") && text.contains("IP Address:127.0.0.1"),
        "{text}"
    );
    let (ok, text) = openssl(&c, &["pkey", "-in", "web.key", "-noout"]);
    assert!(ok, "web.key is not a key openssl reads: {text}");

    // Re-issuing replaces the leaf; a second CA in the same place is refused.
    certs(d, &issue, 0);
    let key_before = std::fs::read(c.join("ca.key")).unwrap();
    let (_, stderr) = certs(d, &["ca", "--out", "certs"], 1);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("ca.key already exists"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(c.join("ca.key")).unwrap(), key_before);
}

#[test]
fn ed25519_and_rsa_leaves_verify_and_expired_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs(d, &["ca", "--out", "."], 0);
    for key in ["ed25519", "rsa"] {
        let args = [
            "issue", "--ca", ".", "--out", ".", "--name", key, "--spiffe", SPIFFE, "--key", key,
        ];
        certs(d, &args, 0);
        let crt = format!("{key}.crt");
        let (ok, text) = openssl(
            d,
            &["verify", "-CAfile", "ca.crt", "-purpose", "sslserver", &crt],
        );
        assert!(ok, "{key}: {text}");
        let (ok, text) = openssl(
            d,
            &["pkey", "-in", &format!("{key}.key"), "-noout", "-text"],
        );
        let kind = if key == "rsa" {
            "Private-Key: (2048 bit"
        } else {
            "ED25519 Private-Key"
        };
        assert!(ok && text.contains(kind), "{key}: {text}");
    }
    let args = [
        "issue",
        "--ca",
        ".",
        "--out",
        ".",
        "--name",
        "old",
        "--dns",
        "old.test",
        "--expired",
    ];
    certs(d, &args, 0);
    let (ok, text) = openssl(d, &["verify", "-CAfile", "ca.crt", "old.crt"]);
    assert!(!ok && text.contains("certificate has expired"), "{text}");
}

#[test]
fn usage_errors_exit_64_and_other_failures_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, stderr) = certs(
        d,
        &["issue", "--ca", ".", "--out", ".", "--name", "web"],
        64,
    );
    assert!(stderr.contains("--spiffe"), "no names: {stderr}");
    let bad = [
        "issue",
        "--ca",
        ".",
        "--out",
        ".",
        "--name",
        "web",
        "--spiffe",
        "spiffe://example.org",
    ];
    let (_, stderr) = certs(d, &bad, 64);
    assert!(stderr.contains("invalid SPIFFE ID"), "{stderr}");
    let (_, stderr) = certs(
        d,
        &[
            "issue", "--ca", "none", "--out", ".", "--name", "web", "--dns", "a",
        ],
        1,
    );
    assert!(stderr.starts_with("error: reading the CA"), "{stderr}");
}
