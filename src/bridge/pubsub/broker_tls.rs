//! Dapr's TLS keys for the brokers that take them (`pubsub.mqtt3`, `bindings.mqtt3`,
//! `pubsub.rabbitmq`, `bindings.rabbitmq`; components-contrib's `pubsub.TLSProperties`):
//! `caCert`, `clientCert` and `clientKey`, PEM text in the metadata. TLS itself is the URL's
//! (`ssl://` for MQTT, `amqps://` for RabbitMQ); then, as daprd, the broker's certificate is
//! checked against `caCert` alone when it is given, else against the system's roots
//! (`SSL_CERT_FILE` / `SSL_CERT_DIR` name others), and always for the URL's host name.
//!
//! In: the component's metadata. Out: one rustls client config (aws-lc-rs), built when the
//! component is, so `outrigger check` reports bad PEM, a half client pair, a key of another
//! certificate, or TLS keys on a plain URL at the key's line (daprd ignores TLS keys on a plain
//! URL; a certificate that is never sent is a mistake worth saying).

use std::sync::Arc;

use rustls::ClientConfig;

use super::broker::Meta;
use crate::tls::stores::{StoreTls, Verify, store_client_config};
use crate::tls::{Pem, TlsError, pem_certified_key, pem_certs, pem_key};

/// The TLS keys, in the order a problem is reported.
const KEYS: [&str; 3] = ["caCert", "clientCert", "clientKey"];

/// The client config for a broker component: None when `tls` is off (the URL is a plain one;
/// `plain` says which, for the message that refuses TLS keys there).
pub(crate) fn broker_tls(
    meta: &Meta,
    tls: bool,
    plain: &str,
) -> Result<Option<Arc<ClientConfig>>, String> {
    let [ca, cert, key] = KEYS.map(|k| meta.str(k));
    if !tls {
        for (k, v) in KEYS.iter().zip([ca, cert, key]) {
            if let Some(v) = v {
                return Err(meta.error(
                    k,
                    &format!("nothing while TLS is off ({plain}; it is used with TLS only)"),
                    &format!("{} bytes", v.len()),
                ));
            }
        }
        return Ok(None);
    }
    let text = |key: &'static str, pem: &str| Pem::Text {
        pem: pem.to_string(),
        key,
    };
    let ca = match ca {
        None => None,
        Some(v) => {
            let pem = text("caCert", v);
            pem_certs(&pem)
                .map_err(|e| meta.error("caCert", "PEM CA certificates", &e.to_string()))?;
            Some(pem)
        }
    };
    let client = match (cert, key) {
        (None, None) => None,
        // Named by the key that is there: its line is the one shown.
        (Some(_), None) => {
            return Err(meta.error(
                "clientCert",
                "clientCert and clientKey together",
                "no clientKey",
            ));
        }
        (None, Some(_)) => {
            return Err(meta.error(
                "clientKey",
                "clientCert and clientKey together",
                "no clientCert",
            ));
        }
        (Some(cert), Some(key)) => {
            let (cert, key) = (text("clientCert", cert), text("clientKey", key));
            pem_certs(&cert)
                .map_err(|e| meta.error("clientCert", "a PEM certificate", &e.to_string()))?;
            // The parser's message can quote a line of the text: not for a private key.
            pem_key(&key).map_err(|_| {
                meta.error(
                    "clientKey",
                    "a PEM private key (PKCS#8, PKCS#1 or SEC1)",
                    "no private key",
                )
            })?;
            // This message names one key only: its line is the one shown.
            pem_certified_key(&cert, &key).map_err(|e| {
                let found = match e {
                    TlsError::KeyMismatch { .. } => "another key".to_string(),
                    e => e.to_string(),
                };
                meta.error(
                    "clientKey",
                    "the private key of the client certificate",
                    &found,
                )
            })?;
            Some((cert, key))
        }
    };
    let config = store_client_config(&StoreTls {
        ca,
        client,
        verify: Verify::Full,
        alpn: Vec::new(),
    })
    .map_err(|e| {
        // With caCert checked above, what is left is the system's roots (none found).
        let found = match e {
            TlsError::NoSystemRoots(why) => format!("no system CA certificates ({why})"),
            e => e.to_string(),
        };
        meta.error("caCert", "the broker's CA certificate", &found)
    })?;
    Ok(Some(config))
}
