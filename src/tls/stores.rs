//! TLS to the bridge's stores and brokers (PostgreSQL, RabbitMQ, MQTT, Redis): a rustls client
//! config on the one provider (aws-lc-rs) built from what a component's metadata says — the
//! CA file or the system's roots, an optional client certificate, and how much of the server's
//! certificate to check (libpq's `sslmode` has three levels: none, the chain, the chain and the
//! name).
//!
//! In: a [`StoreTls`] the component module parsed from its metadata. Out: an
//! `Arc<ClientConfig>` for tokio-rustls (or a broker client that takes one). The files are read
//! here, once, when the component is built — so preflight reports a bad CA path at the
//! component's line — and not watched (a rotated client certificate needs a restart).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use super::{TlsError, certified_key, provider, roots, system_roots};
use crate::config::tls::CertFiles;

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Nothing but the handshake's own signatures: encryption only (libpq's `sslmode=require`
    /// without a root certificate). The certificate may be self-signed or for another name.
    Nothing,
    /// The chain up to the trusted roots (validity, usage), not the name (`verify-ca`).
    Chain,
    /// The chain and the name we connected to (`verify-full`, and every `amqps://`,
    /// `mqtts://`, `rediss://` connection).
    Full,
}

/// PEM material: a file (libpq's `sslrootcert=/path`) or the text itself (Dapr's `caCert`,
/// `clientCert`, `clientKey` metadata hold the PEM).
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

/// What a component's metadata says about TLS to its server.
#[derive(Clone, Debug)]
pub struct StoreTls {
    /// A PEM CA bundle; None: the system's roots (unused with [`Verify::Nothing`]).
    pub ca: Option<Pem>,
    /// A client certificate and its key, for servers that ask for one.
    pub client: Option<(Pem, Pem)>,
    pub verify: Verify,
    /// ALPN protocols to offer (PostgreSQL's direct TLS wants `postgresql`).
    pub alpn: Vec<Vec<u8>>,
}

/// The rustls client config for `t`: its files read and checked now.
pub fn store_client_config(t: &StoreTls) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier: Arc<dyn ServerCertVerifier> = match t.verify {
        Verify::Nothing => Arc::new(NoNameNoChain(provider())),
        Verify::Chain | Verify::Full => {
            let roots = match &t.ca {
                Some(Pem::File(ca)) => roots(ca)?,
                Some(Pem::Text { pem, key }) => text_roots(pem, key)?,
                None => system_roots()?,
            };
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::Build(e.to_string()))?;
            Arc::new(ChainVerifier {
                inner,
                check_name: t.verify == Verify::Full,
            })
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &t.client {
        Some((Pem::File(cert), Pem::File(key))) => {
            let (ck, _) = certified_key(&CertFiles {
                cert: cert.clone(),
                key: key.clone(),
                identity: None,
            })?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)))
        }
        Some((cert, key)) => {
            let ck = text_certified_key(cert, key)?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = t.alpn.clone();
    Ok(Arc::new(config))
}

/// Where PEM text came from, for messages: its metadata key (the text may be a secret).
fn origin(p: &Pem) -> PathBuf {
    match p {
        Pem::File(f) => f.clone(),
        Pem::Text { key, .. } => PathBuf::from(format!("metadata {key}")),
    }
}

fn text_certs(pem: &str, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = || {
        origin(&Pem::Text {
            pem: String::new(),
            key,
        })
    };
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::NotPem {
            path: path(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path() });
    }
    Ok(certs)
}

fn text_roots(pem: &str, key: &'static str) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in text_certs(pem, key)? {
        store.add(c).map_err(|source| TlsError::BadCa {
            path: origin(&Pem::Text {
                pem: String::new(),
                key,
            }),
            source,
        })?;
    }
    Ok(Arc::new(store))
}

/// A client certificate and key where either may be text (a file is read here).
fn text_certified_key(cert: &Pem, key: &Pem) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = match cert {
        Pem::File(f) => super::load_certs(f)?,
        Pem::Text { pem, key } => text_certs(pem, key)?,
    };
    let der = match key {
        Pem::File(f) => super::load_key(f)?,
        Pem::Text { pem, key: k } => {
            PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::NoKey {
                path: origin(&Pem::Text {
                    pem: String::new(),
                    key: k,
                }),
                source,
            })?
        }
    };
    let mismatch = || TlsError::KeyMismatch {
        cert: origin(cert),
        key: origin(key),
    };
    let ck = CertifiedKey::from_der(certs, der, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => mismatch(),
        source => TlsError::Key {
            cert: origin(cert),
            key: origin(key),
            source,
        },
    })?;
    ck.keys_match().map_err(|_| mismatch())?;
    Ok(Arc::new(ck))
}

/// WebPKI verification, with the name check left out for [`Verify::Chain`].
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The chain is checked before the name: a name error means the chain was good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any certificate (libpq's `sslmode=require`: encrypted, not authenticated); the
/// handshake's signatures are still checked against the certificate's key.
#[derive(Debug)]
struct NoNameNoChain(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoNameNoChain {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// RFC 5929's `tls-server-end-point` channel binding of a server certificate (SCRAM's
/// `-PLUS` mechanisms): the certificate hashed with its signature's hash, SHA-256 for MD5 and
/// SHA-1. None for a signature with no single hash (Ed25519, RSA-PSS): the binding is then
/// not offered.
pub fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::digest;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let alg = match parsed.signature_algorithm.algorithm.to_id_string().as_str() {
        // md5/sha1/sha256 WithRSAEncryption, ecdsa-with-SHA1/SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => &digest::SHA256,
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &digest::SHA384,
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(alg, cert).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_text_is_not_printed() {
        let p = Pem::Text {
            pem: "-----BEGIN PRIVATE KEY-----secret".into(),
            key: "clientKey",
        };
        let d = format!("{p:?}");
        assert!(d.contains("clientKey") && !d.contains("secret"), "{d}");
    }
}
