//! TLS settings: termination on listeners (`listeners[].tls`), origination on clusters
//! (`clusters.<name>.tls`), identity lists (`authz`), validated from their raw form. The files
//! are read and parsed by the preflight stage (`preflight.rs`), which keeps what it built for
//! the proxy, so a missing, unreadable or mismatched certificate or key is reported with the
//! key's file:line like any other mistake, before anything starts.

use std::path::PathBuf;

use serde::Serialize;

use super::document::{Document, Problem};
pub use super::raw::ClientCertMode;
use super::raw::{RawClientTls, RawServerTls};
use super::types::Duration;

/// Warn this long before a certificate expires.
pub const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// A certificate chain and its key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A SPIFFE ID the certificate must carry (the mesh's own identity), checked each time
    /// the files are read: at start, on reload and when a renewed certificate is adopted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// The lowest TLS version accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// An identity (SPIFFE ID or DNS name) a peer must have. A SPIFFE ID (anything with `://`)
/// matches only URI SANs: exactly, or every ID under a path when it ends in `/*`
/// (`spiffe://example.org/ns/shop/*`). A DNS name matches only DNS SANs: exactly (any case),
/// or every subdomain with `*.example.org`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct IdentityPattern(pub String);

/// Why `s` is not a valid identity pattern, if it is not.
fn pattern_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() || !s.is_ascii() || s.contains(char::is_whitespace) {
        return Some("expected a non-empty ASCII SPIFFE ID or DNS name");
    }
    if s.contains("://") {
        let body = s.strip_suffix("/*").unwrap_or(s);
        if body.contains('*') {
            return Some("a SPIFFE ID may only end in /* (every ID under that path)");
        }
    } else {
        let body = s.strip_prefix("*.").unwrap_or(s);
        if body.contains('*')
            || !body
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        {
            return Some("a DNS name may only start with *. (every subdomain)");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_patterns() {
        // Matching is tested in tls::authz.
        for bad in [
            "spiffe://td*",
            "spiffe://td/ns/*/sa",
            "api.example.com*",
            "a*b",
            "",
            "x y",
            "spiffe://td/opé",
        ] {
            assert!(pattern_problem(bad).is_some(), "{bad}");
        }
        assert!(pattern_problem("spiffe://td/ns/shop/*").is_none());
        assert!(pattern_problem("*.example.org").is_none());
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerTlsConfig {
    #[serde(flatten)]
    pub default: CertFiles,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<SniCert>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    pub client_cert: ClientCertMode,
    pub min_version: TlsVersion,
    pub alpn: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SniCert {
    pub names: Vec<String>,
    #[serde(flatten)]
    pub files: CertFiles,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientTlsConfig {
    /// None: the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<CertFiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityPattern>,
    pub min_version: TlsVersion,
}

fn version(raw: Option<&str>, at: &str, doc: &Document, problems: &mut Vec<Problem>) -> TlsVersion {
    match raw.map(str::trim) {
        None | Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => {
            problems.push(doc.problem(
                at,
                format!(
                    "expected \"1.2\" or \"1.3\" (TLS 1.0 and 1.1 are not supported), found {other:?}"
                ),
            ));
            TlsVersion::V1_2
        }
    }
}

/// Validates identity patterns (`authz` lists).
pub fn identities(
    raw: &[String],
    at: &str,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Vec<IdentityPattern> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, s)| {
            if let Some(why) = pattern_problem(s) {
                problems.push(doc.problem(
                    &format!("{at}[{i}]"),
                    format!(
                        "{why} (spiffe://example.org/ns/shop/sa/web, spiffe://example.org/ns/shop/*, api.example.org, *.example.org), found {s:?}"
                    ),
                ));
                return None;
            }
            Some(IdentityPattern(s.clone()))
        })
        .collect()
}

/// Validates a listener's `tls`; `http` selects the default ALPN.
pub fn server(
    raw: &RawServerTls,
    at: &str,
    http: bool,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<ServerTlsConfig> {
    let min_version = version(
        raw.min_version.as_deref(),
        &format!("{at}.min_version"),
        doc,
        problems,
    );
    let alpn = match &raw.alpn {
        Some(list) => {
            for (i, p) in list.iter().enumerate() {
                if !matches!(p.as_str(), "h2" | "http/1.1") {
                    problems.push(doc.problem(
                        &format!("{at}.alpn[{i}]"),
                        format!("expected h2 or http/1.1, found {p:?}"),
                    ));
                }
            }
            list.clone()
        }
        None if http => vec!["h2".into(), "http/1.1".into()],
        None => Vec::new(),
    };
    if raw.client_cert.is_some() && raw.client_ca.is_none() {
        problems.push(doc.problem(
            &format!("{at}.client_cert"),
            "set, but there is no client_ca to verify client certificates with",
        ));
    }
    let config = ServerTlsConfig {
        default: CertFiles {
            cert: raw.cert.clone(),
            key: raw.key.clone(),
            identity: None,
        },
        sni: raw
            .sni
            .iter()
            .map(|s| SniCert {
                names: s.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                files: CertFiles {
                    cert: s.cert.clone(),
                    key: s.key.clone(),
                    identity: None,
                },
            })
            .collect(),
        client_ca: raw.client_ca.clone(),
        client_cert: raw.client_cert.unwrap_or_default(),
        min_version,
        alpn,
    };
    // The files are read by the preflight stage (a bad one is a config error located at this
    // key, reported before anything starts).
    Some(config)
}

/// Validates a cluster's `tls`.
pub fn client(
    raw: &RawClientTls,
    at: &str,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<ClientTlsConfig> {
    let min_version = version(
        raw.min_version.as_deref(),
        &format!("{at}.min_version"),
        doc,
        problems,
    );
    let client = match (&raw.cert, &raw.key) {
        (Some(cert), Some(key)) => Some(CertFiles {
            cert: cert.clone(),
            key: key.clone(),
            identity: None,
        }),
        (None, None) => None,
        _ => {
            problems.push(doc.problem(at, "a client certificate needs both cert and key"));
            return None;
        }
    };
    let identity = raw.identity.as_ref().and_then(|i| {
        identities(
            std::slice::from_ref(i),
            &format!("{at}.identity"),
            doc,
            problems,
        )
        .pop()
    });
    if let Some(name) = &raw.server_name
        && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        problems.push(doc.problem(
            &format!("{at}.server_name"),
            format!("expected a DNS name or an IP address, found {name:?}"),
        ));
        return None;
    }
    let config = ClientTlsConfig {
        ca: raw.ca.clone(),
        server_name: raw.server_name.clone(),
        client,
        identity,
        min_version,
    };
    Some(config)
}
