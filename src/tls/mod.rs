//! TLS with rustls (aws-lc-rs provider): termination on listeners (several certificates by
//! SNI, ALPN, a minimum version, session resumption, client certificates from a trust bundle),
//! origination on clusters (a CA bundle or the system roots, SNI, a client certificate, a
//! required upstream identity), workload identities (SPIFFE ID in a URI SAN, or a DNS SAN), the
//! `x-forwarded-client-cert` value, hot reload of the files, and certificate expiry metrics.
//!
//! Building material from files is here (`server_config`, `client_config`: what preflight calls
//! and keeps); holding it while the files rotate is in [`rotation`] (a listener's
//! [`ServerTls`]) and [`origination`] (a cluster's); our own HTTPS clients (log sinks) in
//! [`client`]; TLS to the bridge's stores and brokers in [`stores`]; the handshake on accept in
//! [`accept`];
//! identity matching for `authz` in [`authz`].

pub mod accept;
pub mod authz;
pub mod certs;
#[cfg(feature = "logs")]
pub mod client;
pub mod origination;
pub mod rotation;
#[cfg(feature = "bridge")]
pub mod stores;

pub use crate::telemetry::tls::{CertLabels, HandshakeLabels, ReloadLabels, TlsMetrics};
pub use rotation::{Reloadable, ServerTls, fingerprints, spawn_watch};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

use crate::config::tls::ClientCertMode;
use crate::config::tls::{
    CertFiles, ClientTlsConfig, IdentityPattern, ServerTlsConfig, TlsVersion,
};

/// Why TLS material could not be built from its files: reported by preflight at the config
/// key (`listeners[0].tls: cannot read …`), logged when a certificate reload keeps the old
/// material, or the reason a cluster's connections fail.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: not a PEM certificate file: {source}", path.display())]
    NotPem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: cannot parse the certificate: {message}", path.display())]
    BadCertificate { path: PathBuf, message: String },
    #[error("{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {source}", path.display())]
    NoKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} does not belong to the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The certificate is not the one its owner must present (the mesh's own SPIFFE ID).
    #[error("{} carries {found:?}, not this workload's SPIFFE ID {want}", path.display())]
    WrongIdentity {
        path: PathBuf,
        found: Vec<String>,
        want: String,
    },
    #[error("{} / {}: {source}", cert.display(), key.display())]
    Key {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: not a usable CA certificate: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: {message}", path.display())]
    Verifier { path: PathBuf, message: String },
    #[error("no system CA certificates found ({0}); set tls.ca")]
    NoSystemRoots(String),
    #[error("{host}: {source}")]
    ServerName {
        host: String,
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Build(String),
}

/// The one crypto provider (aws-lc-rs), as DESIGN.md asks.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes aws-lc-rs the process-wide rustls provider too. Our own configs name theirs
/// ([`provider`]), but a crate that builds its config itself (redis' `enableTLS` calls
/// `ClientConfig::builder()`) takes the process default, and rustls panics there if none is
/// installed and the build cannot pick one. Called once at start; a provider already installed
/// (a second call, a test harness) is fine.
pub fn install_process_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        // TLS 1.3 and 1.2: rustls has no 1.0 or 1.1 at all.
        TlsVersion::V1_2 => rustls::DEFAULT_VERSIONS,
        TlsVersion::V1_3 => TLS13_ONLY,
    }
}

/// PEM material: a file (`tls.ca: /path`, libpq's `sslrootcert=/path`) or the text itself
/// (Dapr's `caCert`, `clientCert`, `clientKey` metadata hold the PEM).
#[derive(Clone)]
pub enum Pem {
    File(PathBuf),
    /// The PEM text and the metadata key it came from (for messages).
    Text {
        pem: String,
        key: &'static str,
    },
}

/// The path, or the metadata key only: a `clientKey`'s text must not reach a log.
impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::File(p) => f.debug_tuple("File").field(p).finish(),
            Pem::Text { key, .. } => f
                .debug_struct("Text")
                .field("key", key)
                .finish_non_exhaustive(),
        }
    }
}

impl Pem {
    /// What messages name: the file, or `metadata KEY` (the text may be a secret).
    fn origin(&self) -> PathBuf {
        match self {
            Pem::File(f) => f.clone(),
            Pem::Text { key, .. } => PathBuf::from(format!("metadata {key}")),
        }
    }
}

/// The certificates in `pem` (a file is read now); at least one.
pub fn pem_certs(pem: &Pem) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let parsed: Result<Vec<_>, _> = match pem {
        Pem::File(path) => CertificateDer::pem_file_iter(path)
            .map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })?
            .collect(),
        Pem::Text { pem, .. } => CertificateDer::pem_slice_iter(pem.as_bytes()).collect(),
    };
    let certs = parsed.map_err(|source| TlsError::NotPem {
        path: pem.origin(),
        source,
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: pem.origin() });
    }
    Ok(certs)
}

/// The private key in `pem` (a file is read now).
pub fn pem_key(pem: &Pem) -> Result<PrivateKeyDer<'static>, TlsError> {
    match pem {
        Pem::File(path) => PrivateKeyDer::from_pem_file(path),
        Pem::Text { pem, .. } => PrivateKeyDer::from_pem_slice(pem.as_bytes()),
    }
    .map_err(|source| TlsError::NoKey {
        path: pem.origin(),
        source,
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem_certs(&Pem::File(path.to_path_buf()))
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    pem_key(&Pem::File(path.to_path_buf()))
}

/// A certificate chain and its key, checked to belong together (`cert` and `key` name them
/// in messages).
fn bind_key(
    certs: Vec<CertificateDer<'static>>,
    der: PrivateKeyDer<'static>,
    cert: &Pem,
    key: &Pem,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let mismatch = || TlsError::KeyMismatch {
        cert: cert.origin(),
        key: key.origin(),
    };
    let ck = CertifiedKey::from_der(certs, der, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => mismatch(),
        source => TlsError::Key {
            cert: cert.origin(),
            key: key.origin(),
            source,
        },
    })?;
    ck.keys_match().map_err(|_| mismatch())?;
    Ok(Arc::new(ck))
}

/// A client or server certificate and its key, each a file or text, checked to belong
/// together.
pub fn pem_certified_key(cert: &Pem, key: &Pem) -> Result<Arc<CertifiedKey>, TlsError> {
    bind_key(pem_certs(cert)?, pem_key(key)?, cert, key)
}

/// A certificate and key, checked to belong together.
fn certified_key(files: &CertFiles) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    if let Some(want) = &files.identity {
        let found = identities_of(&certs[0]);
        if !found.contains(want) {
            return Err(TlsError::WrongIdentity {
                path: files.cert.clone(),
                found,
                want: want.clone(),
            });
        }
    }
    let info = CertInfo::of(&files.cert, &certs[0])?;
    let ck = bind_key(
        certs,
        key,
        &Pem::File(files.cert.clone()),
        &Pem::File(files.key.clone()),
    )?;
    Ok((ck, info))
}

/// A root store of the CA certificates in `pem`.
fn pem_roots(pem: &Pem) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in pem_certs(pem)? {
        store.add(c).map_err(|source| TlsError::BadCa {
            path: pem.origin(),
            source,
        })?;
    }
    Ok(Arc::new(store))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    pem_roots(&Pem::File(path.to_path_buf()))
}

fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::NoSystemRoots(
            found
                .errors
                .first()
                .map(ToString::to_string)
                .unwrap_or_else(|| "install ca-certificates".into()),
        ));
    }
    Ok(Arc::new(store))
}

/// What is known of a loaded certificate: for expiry metrics and logs.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub path: PathBuf,
    /// Unix time.
    pub not_after: i64,
    pub identities: Vec<String>,
}

impl crate::telemetry::tls::CertExpiry for CertInfo {
    fn path(&self) -> &Path {
        &self.path
    }
    fn not_after(&self) -> i64 {
        self.not_after
    }
    fn identities(&self) -> &[String] {
        &self.identities
    }
}

impl CertInfo {
    fn of(path: &Path, der: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCertificate {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(CertInfo {
            path: path.to_path_buf(),
            not_after: cert.validity().not_after.timestamp(),
            identities: identities_of(der),
        })
    }
}

/// A certificate's identities: URI SANs (SPIFFE IDs) first, then DNS SANs.
pub fn identities_of(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for name in &san.value.general_names {
        match name {
            // A URI always has a scheme; DNS names never contain "://": the two kinds cannot
            // be confused when matched (see `IdentityPattern`).
            GeneralName::URI(u) if u.contains("://") => uris.push(u.to_string()),
            GeneralName::DNSName(d)
                if !d.is_empty()
                    && d.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*')) =>
            {
                dns.push(d.to_ascii_lowercase())
            }
            _ => {}
        }
    }
    uris.extend(dns);
    uris
}

/// Picks the certificate by SNI: exact names, then `*.suffix` wildcards, then the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: Vec<(String, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let sni = sni.to_ascii_lowercase();
        let exact = self.by_name.iter().find(|(n, _)| *n == sni);
        let wildcard = || {
            self.by_name.iter().find(|(n, _)| {
                n.strip_prefix("*.").is_some_and(|suffix| {
                    sni.split_once('.').is_some_and(|(_, rest)| rest == suffix)
                })
            })
        };
        Some(
            exact
                .or_else(wildcard)
                .map(|(_, k)| k.clone())
                .unwrap_or_else(|| self.default.clone()),
        )
    }
}

/// What the preflight stage built from the config's TLS sections, kept for the proxy so that no
/// file is read twice: each TLS listener's server config by listener name, each TLS cluster's
/// client config by cluster name.
#[derive(Clone, Default)]
pub struct Material {
    pub servers: std::collections::BTreeMap<String, LoadedServer>,
    pub clients: std::collections::BTreeMap<String, LoadedClient>,
}

/// A server config and what it was loaded from.
#[derive(Clone)]
pub struct LoadedServer {
    pub config: Arc<ServerConfig>,
    pub certs: Vec<CertInfo>,
    /// The files' fingerprints, taken *before* they were read: a change after that is seen as
    /// a change by whoever holds this material.
    pub fingerprints: Vec<u64>,
}

/// The files a listener's TLS is built from (watched for changes).
pub fn server_files(c: &ServerTlsConfig) -> Vec<PathBuf> {
    let mut files = vec![c.default.cert.clone(), c.default.key.clone()];
    for s in &c.sni {
        files.push(s.files.cert.clone());
        files.push(s.files.key.clone());
    }
    files.extend(c.client_ca.clone());
    files
}

/// The files a cluster's TLS is built from (watched for changes).
pub fn client_files(c: &ClientTlsConfig) -> Vec<PathBuf> {
    let mut files: Vec<_> = c.ca.iter().cloned().collect();
    if let Some(f) = &c.client {
        files.push(f.cert.clone());
        files.push(f.key.clone());
    }
    files
}

/// Builds a rustls server config from the files (also how validation checks them).
pub fn server_config(c: &ServerTlsConfig) -> Result<LoadedServer, TlsError> {
    server_config_from(c, fingerprints(&server_files(c)))
}

/// [`server_config`] for files whose `fingerprints` the caller took already (a reload that
/// compared them first).
pub fn server_config_from(
    c: &ServerTlsConfig,
    fingerprints: Vec<u64>,
) -> Result<LoadedServer, TlsError> {
    let (default, info) = certified_key(&c.default)?;
    let mut certs = vec![info];
    let mut by_name = Vec::new();
    for s in &c.sni {
        let (key, info) = certified_key(&s.files)?;
        certs.push(info);
        for n in &s.names {
            by_name.push((n.clone(), key.clone()));
        }
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(c.min_version))?;
    let builder = match &c.client_ca {
        Some(ca) => {
            let mut v = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider());
            if c.client_cert == ClientCertMode::Optional {
                v = v.allow_unauthenticated();
            }
            let v = v.build().map_err(|e| TlsError::Verifier {
                path: ca.clone(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    config.alpn_protocols = c.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if c.client_ca.is_some() {
        // A resumed session is not verified again: a client certificate that has since
        // expired (short-lived workload certs) would keep resuming for the ticket's lifetime.
        // With client certificates every connection does a full handshake.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        // Resumption: TLS 1.3 tickets (stateless) and the default session cache for TLS 1.2.
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    }
    Ok(LoadedServer {
        config: Arc::new(config),
        certs,
        fingerprints,
    })
}

/// A TLS connector for an HTTPS endpoint of our own and the name to verify it by.
pub type HttpsConnector = (tokio_rustls::TlsConnector, ServerName<'static>);

/// A TLS connector for an HTTPS endpoint of our own (a reload webhook, the OTLP collector):
/// verified against `ca` or the system's roots, by `host` (a name or an IP address).
pub fn https_connector(
    ca: Option<&std::path::Path>,
    host: &str,
) -> Result<HttpsConnector, TlsError> {
    let tls = ClientTlsConfig {
        ca: ca.map(Path::to_path_buf),
        server_name: None,
        client: None,
        identity: None,
        min_version: crate::config::tls::TlsVersion::V1_2,
    };
    let config = client_config(&tls, false)?.config;
    let name = ServerName::try_from(host.to_string()).map_err(|source| TlsError::ServerName {
        host: host.to_string(),
        source,
    })?;
    Ok((tokio_rustls::TlsConnector::from(config), name))
}

/// Builds a rustls client config for a cluster; `h2` offers only HTTP/2 by ALPN.
pub fn client_config(c: &ClientTlsConfig, h2: bool) -> Result<LoadedClient, TlsError> {
    client_config_from(c, h2, fingerprints(&client_files(c)))
}

/// [`client_config`] for files whose `fingerprints` the caller took already.
pub fn client_config_from(
    c: &ClientTlsConfig,
    h2: bool,
    fingerprints: Vec<u64>,
) -> Result<LoadedClient, TlsError> {
    let roots = match &c.ca {
        Some(ca) => roots(ca)?,
        None => system_roots()?,
    };
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Build(e.to_string()))?;
    let identity_replaces_name =
        c.ca.is_some() || c.identity.as_ref().is_some_and(|i| i.0.contains("://"));
    let verifier = Verifier::new(IdentityVerifier {
        inner,
        identity: c.identity.clone(),
        identity_replaces_name,
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(c.min_version))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut certs = Vec::new();
    let mut config = match &c.client {
        Some(files) => {
            // Read and checked once, as for a listener's certificate.
            let (ck, info) = certified_key(files)?;
            certs.push(info);
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(LoadedClient {
        config: Arc::new(config),
        certs,
        fingerprints,
    })
}

#[derive(Clone)]
pub struct LoadedClient {
    pub config: Arc<ClientConfig>,
    pub certs: Vec<CertInfo>,
    /// As [`LoadedServer::fingerprints`].
    pub fingerprints: Vec<u64>,
}

/// What one of our server certificate verifiers decides about the certificate; [`Verifier`]
/// adds the checks of the handshake's signatures, the same for all of them (the provider's
/// algorithms, as rustls' own WebPKI verifier does).
pub(crate) trait ServerCertCheck: std::fmt::Debug + Send + Sync {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

/// A rustls verifier from a [`ServerCertCheck`].
#[derive(Debug)]
pub(crate) struct Verifier<C> {
    check: C,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl<C: ServerCertCheck> Verifier<C> {
    pub(crate) fn new(check: C) -> Arc<Self> {
        Arc::new(Verifier {
            check,
            algorithms: provider().signature_verification_algorithms,
        })
    }
}

impl<C: ServerCertCheck> ServerCertVerifier for Verifier<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check
            .check(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// WebPKI verification (chain, validity, usage) plus, when configured, the upstream's identity.
/// With an identity set, a certificate valid for the identity but not for the server name (a
/// SPIFFE certificate without DNS names, reached by IP) is accepted: the identity is the
/// stronger check, as in every mesh.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    identity: Option<IdentityPattern>,
    /// Whether a name mismatch may be excused by the identity: only for a SPIFFE identity or
    /// a private CA (`tls.ca`), never for a DNS identity under the public roots.
    identity_replaces_name: bool,
}

impl ServerCertCheck for IdentityVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let Some(want) = &self.identity else {
            return verified;
        };
        match verified {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.identity_replaces_name => {}
            Err(e) => return Err(e),
        }
        let ids = identities_of(end_entity);
        if ids.iter().any(|i| want.matches(i)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch {
                    want: want.0.clone(),
                    got: ids,
                })),
            )))
        }
    }
}

/// The upstream presented another identity than the cluster requires.
#[derive(Debug)]
pub struct IdentityMismatch {
    pub want: String,
    pub got: Vec<String>,
}

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the upstream's identity {:?} is not the required {}",
            self.got, self.want
        )
    }
}

impl std::error::Error for IdentityMismatch {}

/// A verified peer (client certificate on an inbound listener).
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity {
    /// URI SANs then DNS SANs; the first is "the" identity.
    pub identities: Vec<String>,
    /// `x-forwarded-client-cert` value (Envoy's format).
    pub xfcc: String,
}

impl PeerIdentity {
    /// From the peer's certificate; `by` is this side's own identity (its certificate's).
    pub fn of(cert: &CertificateDer<'_>, by: Option<&str>) -> PeerIdentity {
        let identities = identities_of(cert);
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert);
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut xfcc = String::new();
        if let Some(by) = by {
            xfcc.push_str(&format!("By={};", xfcc_value(by)));
        }
        xfcc.push_str(&format!("Hash={hex}"));
        for i in &identities {
            let key = if i.contains("://") { "URI" } else { "DNS" };
            xfcc.push_str(&format!(";{key}={}", xfcc_value(i)));
        }
        PeerIdentity { identities, xfcc }
    }

    pub fn identity(&self) -> Option<&str> {
        self.identities.first().map(String::as_str)
    }

    /// The identities of a peer that may have none (no client certificate).
    pub fn all(peer: Option<&PeerIdentity>) -> &[String] {
        peer.map(|i| i.identities.as_slice()).unwrap_or_default()
    }
}

/// A value in `x-forwarded-client-cert`, quoted as Envoy does when it holds `,`, `;`, `=` or
/// `"`, so a crafted SAN cannot add fields or elements.
fn xfcc_value(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains([',', ';', '=', '"']) {
        std::borrow::Cow::Owned(format!(
            "\"{}\"",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        ))
    } else {
        std::borrow::Cow::Borrowed(v)
    }
}

/// How a handshake ended, for metrics and logs.
pub fn classify(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_cert",
        Some(E::InvalidCertificate(c)) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            // A look-alike CA (same name, other key) shows as a bad signature: untrusted too.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "wrong_name"
            }
            CertificateError::Other(o) if o.0.downcast_ref::<IdentityMismatch>().is_some() => {
                "wrong_identity"
            }
            _ => "bad_cert",
        },
        Some(E::PeerIncompatible(_)) => "incompatible",
        Some(E::InvalidMessage(_)) => "not_tls",
        Some(E::AlertReceived(_)) => "alert",
        Some(_) => "other",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
    }
}
