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

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig};

pub use super::Pem;
use super::{
    ServerCertCheck, TlsError, Verifier, pem_certified_key, pem_roots, provider, system_roots,
};

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
        Verify::Nothing => Verifier::new(NoNameNoChain),
        Verify::Chain | Verify::Full => {
            let roots = match &t.ca {
                Some(ca) => pem_roots(ca)?,
                None => system_roots()?,
            };
            let inner =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::Build(e.to_string()))?;
            Verifier::new(ChainVerifier {
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
        Some((cert, key)) => {
            let ck = pem_certified_key(cert, key)?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = t.alpn.clone();
    Ok(Arc::new(config))
}

/// WebPKI verification, with the name check left out for [`Verify::Chain`].
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertCheck for ChainVerifier {
    fn check(
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
}

/// Accepts any certificate (libpq's `sslmode=require`: encrypted, not authenticated); the
/// handshake's signatures are still checked against the certificate's key ([`Verifier`]).
#[derive(Debug)]
struct NoNameNoChain;

impl ServerCertCheck for NoNameNoChain {
    fn check(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
