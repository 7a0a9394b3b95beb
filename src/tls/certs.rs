//! Development certificates for `outrigger certs`: a self-signed CA and workload certificates
//! carrying SPIFFE IDs, so a quick start can run two sidecars over mTLS without openssl recipes.
//! Options come from the CLI; PEM files leave on disk (keys PKCS#8, mode 0600). Signing uses
//! rcgen on aws-lc-rs, the same provider as rustls. Not a production CA: no revocation, and the
//! CA key is protected by its file mode only.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// not_before is this far in the past, so a peer whose clock is a little behind accepts a new cert.
const CLOCK_SKEW: Duration = Duration::minutes(5);
/// The longest SPIFFE ID the SPIFFE ID spec allows, in bytes.
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// The key algorithm of an issued certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256 with SHA-256: small, fast, accepted everywhere.
    #[default]
    Ecdsa,
    /// Ed25519.
    Ed25519,
    /// RSA 2048, for peers that only speak RSA.
    Rsa,
}

/// What `create_ca` writes: `OUT/ca.crt` and `OUT/ca.key`.
pub struct CaOptions {
    pub out: PathBuf,
    pub trust_domain: String,
    pub days: u32,
}

/// What `issue` writes: `OUT/NAME.crt` (the leaf, then the CA) and `OUT/NAME.key`.
pub struct IssueOptions {
    /// The directory holding `ca.crt` and `ca.key`.
    pub ca_dir: PathBuf,
    pub out: PathBuf,
    pub name: String,
    /// A URI SAN such as `spiffe://example.org/ns/shop/sa/web`.
    pub spiffe: Option<String>,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
    /// For tests: valid from two days ago until one day ago.
    pub expired: bool,
    pub key: KeyKind,
}

/// Creates a self-signed CA (ECDSA P-256); refuses to replace an existing `ca.key`.
/// Returns the files written.
pub fn create_ca(o: &CaOptions) -> anyhow::Result<Vec<PathBuf>> {
    crate::config::mesh::check_trust_domain(&o.trust_domain)
        .map_err(|e| anyhow!("invalid trust domain: {e}"))?;
    let (crt, key) = (o.out.join("ca.crt"), o.out.join("ca.key"));
    if fs::symlink_metadata(&key).is_ok() {
        bail!(
            "{} already exists; remove it first to create a new CA",
            key.display()
        );
    }
    fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let cn = format!("Outrigger development CA ({})", o.trust_domain);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = validity(o.days, false)?;
    params.serial_number = Some(random_serial()?);
    let key_pair = KeyPair::generate().context("generating the CA key")?;
    let cert = params.self_signed(&key_pair).context("signing")?;
    write_key(&key, &key_pair.serialize_pem(), true)?;
    fs::write(&crt, cert.pem()).with_context(|| format!("writing {}", crt.display()))?;
    Ok(vec![crt, key])
}

/// Issues a workload certificate signed by the CA in `ca_dir`, usable as both TLS server and
/// client. Returns the files written.
pub fn issue(o: &IssueOptions) -> anyhow::Result<Vec<PathBuf>> {
    if o.name.is_empty() || o.name.contains('/') || o.name.starts_with('.') || o.name == "ca" {
        bail!(
            "expected a file name other than ca for --name, found {:?}",
            o.name
        );
    }
    if let Some(id) = &o.spiffe {
        check_spiffe_id(id)?;
    }
    if o.spiffe.is_none() && o.dns.is_empty() && o.ips.is_empty() {
        bail!("expected at least one name for the certificate (SPIFFE ID, DNS, IP), found none");
    }
    let read = |file: &str| {
        let path = o.ca_dir.join(file);
        fs::read_to_string(&path).with_context(|| format!("reading the CA: {}", path.display()))
    };
    let ca_pem = read("ca.crt")?;
    let ca = load_ca(&ca_pem, &read("ca.key")?)?;

    let mut params = CertificateParams::default();
    let last_segment = o.spiffe.as_deref().and_then(|id| id.rsplit('/').next());
    let first_dns = o.dns.first().map(String::as_str);
    let cn = first_dns.or(last_segment).unwrap_or(&o.name);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(id) = &o.spiffe {
        let sans = &mut params.subject_alt_names;
        sans.push(SanType::URI(id.as_str().try_into()?));
    }
    for name in &o.dns {
        let ia5 = name.as_str().try_into();
        let ia5 = ia5.map_err(|_| anyhow!("expected an ASCII DNS name, found {name:?}"))?;
        params.subject_alt_names.push(SanType::DnsName(ia5));
    }
    let ips = o.ips.iter().map(|ip| SanType::IpAddress(*ip));
    params.subject_alt_names.extend(ips);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if o.key == KeyKind::Rsa {
        // RFC 5480 and RFC 8410 do not allow keyEncipherment for EC and Ed25519 keys.
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params.extended_key_usages = vec![ServerAuth, ClientAuth];
    params.use_authority_key_identifier_extension = true;
    (params.not_before, params.not_after) = validity(o.days, o.expired)?;
    params.serial_number = Some(random_serial()?);

    let key_pair = match o.key {
        KeyKind::Ecdsa => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyKind::Ed25519 => ed25519_key()?,
        KeyKind::Rsa => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?
        }
    };
    let cert = params.signed_by(&key_pair, &ca).context("signing")?;

    fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let crt = o.out.join(format!("{}.crt", o.name));
    let key = o.out.join(format!("{}.key", o.name));
    write_key(&key, &key_pair.serialize_pem(), false)?;
    let chain = format!("{}{}", cert.pem(), ca_pem);
    fs::write(&crt, chain).with_context(|| format!("writing {}", crt.display()))?;
    Ok(vec![crt, key])
}

/// Checks a SPIFFE ID as the SPIFFE ID spec (and go-spiffe) do: `spiffe://TRUST-DOMAIN/PATH`,
/// lowercase trust domain, a non-empty path of non-empty segments, no query or fragment.
pub fn check_spiffe_id(id: &str) -> anyhow::Result<()> {
    let bad = |why: &str| anyhow!("invalid SPIFFE ID {id:?}: {why}");
    let rest = id.strip_prefix("spiffe://");
    let rest = rest.ok_or_else(|| bad("expected the scheme spiffe://"))?;
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err(bad("longer than 2048 bytes"));
    }
    let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    crate::config::mesh::check_trust_domain(trust_domain).map_err(|e| bad(&e))?;
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    let segment_ok = |s: &str| !matches!(s, "" | "." | "..") && s.chars().all(ok);
    if path.is_empty() || !path.split('/').all(segment_ok) {
        return Err(bad(
            "expected a path like /ns/NS/sa/SA of A-Z a-z 0-9 . - _",
        ));
    }
    Ok(())
}

/// The CA's key and name, after checking that the key belongs to the certificate.
fn load_ca(ca_pem: &str, key_pem: &str) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::from_pem(key_pem).context("ca.key: expected a PEM private key")?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
        .map_err(|e| anyhow!("ca.crt: expected a PEM certificate: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| anyhow!("ca.crt: {e}"))?;
    if !cert.is_ca() {
        bail!("ca.crt: expected a CA certificate, found one without CA:true");
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!("ca.key does not belong to ca.crt");
    }
    Issuer::from_ca_cert_pem(ca_pem, key).context("ca.crt: reading the CA's name")
}

fn validity(days: u32, expired: bool) -> anyhow::Result<(OffsetDateTime, OffsetDateTime)> {
    let now = OffsetDateTime::now_utc();
    if expired {
        return Ok((now - Duration::days(2), now - Duration::days(1)));
    }
    if days == 0 {
        bail!("expected a validity of at least 1 day, found 0");
    }
    let not_after = now.checked_add(Duration::days(days.into()));
    let not_after = not_after.filter(|t| t.year() <= 9999);
    let not_after = not_after.ok_or_else(|| anyhow!("{days} days runs past the year 9999"))?;
    Ok((now - CLOCK_SKEW, not_after))
}

/// Random bytes from the system's CSPRNG, through rustls' aws-lc-rs provider.
fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    let random = rustls::crypto::aws_lc_rs::default_provider().secure_random;
    random
        .fill(&mut bytes)
        .map_err(|_| anyhow!("no random bytes"))?;
    Ok(bytes)
}

/// 16 random bytes, kept positive and with a non-zero leading byte so all 16 are encoded.
fn random_serial() -> anyhow::Result<SerialNumber> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// An Ed25519 key in PKCS#8 v1 (RFC 8410 section 7), as `openssl genpkey` writes it. aws-lc
/// generates v2 (with the public key), which OpenSSL before 3.5 cannot read.
fn ed25519_key() -> anyhow::Result<KeyPair> {
    // SEQUENCE { INTEGER 0, SEQUENCE { OID id-Ed25519 }, OCTET STRING { OCTET STRING (32) } }
    const V1_HEADER: &[u8] = b"\x30\x2e\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20";
    let der = [V1_HEADER, &random_bytes::<32>()?].concat();
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der.into(), &rcgen::PKCS_ED25519)?;
    Ok(key)
}

/// Writes a private key readable by its owner only (also when replacing an existing file).
fn write_key(path: &Path, pem: &str, create_new: bool) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).mode(0o600);
    match create_new {
        true => options.create_new(true),
        false => options.create(true).truncate(true),
    };
    let written = options.open(path).and_then(|mut file| {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(pem.as_bytes())
    });
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::{WebPkiServerVerifier, danger::ServerCertVerifier};
    use rustls::{RootCertStore, server::WebPkiClientVerifier};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use std::sync::Arc;
    use x509_parser::prelude::*;

    const SPIFFE: &str = "spiffe://example.org/ns/shop/sa/web";

    fn options(dir: &Path, key: KeyKind) -> IssueOptions {
        IssueOptions {
            ca_dir: dir.into(),
            out: dir.join("leaves"),
            name: "web".into(),
            spiffe: Some(SPIFFE.into()),
            dns: vec!["web.shop.svc".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            days: 30,
            expired: false,
            key,
        }
    }

    fn new_ca(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let (out, trust_domain) = (dir.into(), "example.org".into());
        create_ca(&CaOptions {
            out,
            trust_domain,
            days: 10,
        })
    }

    /// Issues with `o`; returns NAME.crt's certificates (leaf first) and the leaf's common name.
    fn issued(o: &IssueOptions) -> (Vec<CertificateDer<'static>>, String) {
        let pems = CertificateDer::pem_file_iter(&issue(o).unwrap()[0]).unwrap();
        let chain: Vec<_> = pems.map(Result::unwrap).collect();
        let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
        let cn = leaf.subject().iter_common_name().next().unwrap().as_str();
        let cn = cn.unwrap().to_string();
        (chain, cn)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn leaf_for_each_key_kind_chains_to_the_ca_and_works_both_ways_in_rustls() {
        let dir = tempfile::tempdir().unwrap();
        let ca_files = new_ca(dir.path()).unwrap();
        assert_eq!(mode(&ca_files[1]), 0o600);
        let ca_der = CertificateDer::from_pem_file(&ca_files[0]).unwrap();
        let (_, ca) = parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(ca_der.clone()).unwrap();
        let roots = Arc::new(roots);
        let as_server =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone());
        let as_server = as_server.build().unwrap();
        let as_client = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
        let as_client = as_client.build().unwrap();
        let server_name = ServerName::try_from("web.shop.svc").unwrap();

        for kind in [KeyKind::Ecdsa, KeyKind::Ed25519, KeyKind::Rsa] {
            let (chain, cn) = issued(&options(dir.path(), kind));
            assert_eq!(
                (chain.len(), &chain[1], cn.as_str()),
                (2, &ca_der, "web.shop.svc")
            );
            let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
            leaf.verify_signature(Some(ca.public_key())).unwrap();
            let explicit_ca_false = leaf.basic_constraints().unwrap().is_some();
            assert!(!leaf.is_ca() && explicit_ca_false, "{kind:?}");
            let eku = leaf.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth, "{kind:?}");
            let sans = leaf.subject_alternative_name().unwrap().unwrap().value;
            let ip = GeneralName::IPAddress(&[127, 0, 0, 1]);
            let want = [
                GeneralName::URI(SPIFFE),
                GeneralName::DNSName("web.shop.svc"),
                ip,
            ];
            assert_eq!(sans.general_names, want);
            assert!(leaf.validity().is_valid());

            // The real consumers: rustls loads the key, webpki takes the leaf both ways.
            let key_file = dir.path().join("leaves/web.key");
            assert_eq!(mode(&key_file), 0o600);
            let key = PrivateKeyDer::from_pem_file(&key_file).unwrap();
            assert!(matches!(key, PrivateKeyDer::Pkcs8(_)), "{kind:?}");
            provider.key_provider.load_private_key(key).unwrap();
            let now = UnixTime::now();
            let server = as_server.verify_server_cert(&chain[0], &[], &server_name, &[], now);
            server.unwrap();
            as_client.verify_client_cert(&chain[0], &[], now).unwrap();
        }
    }

    #[test]
    fn expired_and_spiffe_only_leaves() {
        let dir = tempfile::tempdir().unwrap();
        new_ca(dir.path()).unwrap();
        let mut o = options(dir.path(), KeyKind::Ecdsa);
        o.expired = true;
        let (chain, _) = issued(&o);
        let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
        assert!(leaf.validity().not_after < ASN1Time::now());

        (o.dns, o.ips) = (vec![], vec![]);
        assert_eq!(issued(&o).1, "web", "the SPIFFE ID's last segment");
    }

    #[test]
    fn bad_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        new_ca(dir.path()).unwrap();
        let e = new_ca(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca.key already exists"), "{e}");
        let mut o = options(dir.path(), KeyKind::Ecdsa);
        (o.spiffe, o.dns, o.ips) = (None, vec![], vec![]);
        let e = issue(&o).unwrap_err().to_string();
        assert!(e.contains("at least one name"), "{e}");

        // A CA key that is not the certificate's.
        let other = tempfile::tempdir().unwrap();
        new_ca(other.path()).unwrap();
        fs::copy(other.path().join("ca.key"), dir.path().join("ca.key")).unwrap();
        let e = issue(&options(dir.path(), KeyKind::Ecdsa)).unwrap_err();
        assert_eq!(e.to_string(), "ca.key does not belong to ca.crt");

        let bad = "https://td/a spiffe://td spiffe://td/ spiffe:///a spiffe://TD/a spiffe://td:1/a \
            spiffe://u@td/a spiffe://td/a//b spiffe://td/a/ spiffe://td/../a spiffe://td/a?x spiffe://td/a#x";
        for bad in bad.split_whitespace() {
            let e = check_spiffe_id(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid SPIFFE ID"), "{bad}: {e}");
        }
        check_spiffe_id("spiffe://dev_1.example-org/ns/Shop/sa/web.v2").unwrap();
    }
}
