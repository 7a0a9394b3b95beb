//! The `mesh:` section: a workload's identity in a mesh of sidecars, validated into
//! [`MeshConfig`], and what it stands for in ordinary config — an inbound mutual-TLS listener
//! (`mesh`) that lets in peers of the trust domain and forwards to the app, optionally an
//! outbound listener (`mesh-outbound`) for the app's host-named requests, and the TLS every
//! peer cluster originates with ([`MeshConfig::peer_tls`]). Peers themselves are clusters made
//! on demand by app id through the DNS template (`proxy::cluster::name_resolution`).
//!
//! The identity files are `tls.crt`, `tls.key` and `ca.crt` in `identity_dir` (the layout of a
//! Kubernetes TLS Secret and of cert-manager's). They are read by the preflight stage, which
//! also checks that the certificate carries this workload's SPIFFE ID.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::document::{Document, Problem};
use super::proxy::{
    DEFAULT_SOCKET_MODE, Direction, Limits, ListenerConfig, MinBodyRate, Protocol, RouteConfig,
};
use super::tls::{
    CertFiles, ClientCertMode, ClientTlsConfig, IdentityPattern, ServerTlsConfig, TlsVersion,
};
use super::types::{Address, TcpAddress};

/// SPIFFE's and Kubernetes' usual trust domain (the cluster's DNS domain).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Where `outrigger inject` mounts the service account's identity Secret.
pub const DEFAULT_IDENTITY_DIR: &str = "/var/run/outrigger/identity";
/// The peers' port: a fixed one, so that every workload knows where every other one listens.
pub const DEFAULT_ADDRESS: &str = "0.0.0.0:15443";
/// Kubernetes Service names: `{app_id}` is the Service, `{namespace}` its namespace.
pub const DEFAULT_PEER_DNS: &str = "{app_id}.{namespace}.svc.cluster.local";
/// Each peer is a cluster with its own metric series and connection pools: a bound.
pub const DEFAULT_MAX_PEERS: usize = 256;
/// The inbound listener's name (reserved).
pub const LISTENER: &str = "mesh";
/// The outbound listener's name (reserved).
pub const OUTBOUND_LISTENER: &str = "mesh-outbound";
/// The `listener` label of `outrigger_tls_reloads_total` for the peers' client material
/// (reserved as a listener name, so the series are never a listener's).
pub const PEERS_LABEL: &str = "mesh-peers";
/// A resolved peer's cluster is named `peer:ID.NAMESPACE` (`peer:payments.shop`): no cluster
/// of the config may start so (refused at check), so a peer never shares a name, metric
/// series or dashboard row with a declared cluster, even one declared later.
pub const PEER_CLUSTER_PREFIX: &str = "peer:";

/// The `mesh:` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMesh {
    pub trust_domain: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub identity_dir: Option<PathBuf>,
    pub address: Option<TcpAddress>,
    pub authz: Option<Vec<String>>,
    pub peer_dns: Option<String>,
    pub peer_port: Option<u16>,
    pub require_peer_namespace: Option<bool>,
    pub max_peers: Option<usize>,
    pub outbound_address: Option<Address>,
}

/// The validated `mesh:` section.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeshConfig {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    pub identity_dir: PathBuf,
    /// The inbound mutual-TLS listener's address (made only when `app.address` is set).
    pub address: TcpAddress,
    /// Peer identities let in (default: every ID of the trust domain).
    pub authz: Vec<IdentityPattern>,
    /// The host of an app id: `{app_id}` and `{namespace}` are replaced.
    pub peer_dns: String,
    pub peer_port: u16,
    /// A peer's SPIFFE ID must be in the namespace its app id names (not only the trust domain).
    pub require_peer_namespace: bool,
    pub max_peers: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_address: Option<Address>,
}

impl MeshConfig {
    /// This workload's SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    pub fn cert(&self) -> PathBuf {
        self.identity_dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.identity_dir.join("tls.key")
    }

    pub fn ca(&self) -> PathBuf {
        self.identity_dir.join("ca.crt")
    }

    /// The TLS a peer cluster originates: this workload's certificate, the mesh's CA, and a
    /// peer identity in the trust domain (in `namespace` with `require_peer_namespace`).
    pub fn peer_tls(&self, namespace: &str) -> ClientTlsConfig {
        let identity = if self.require_peer_namespace {
            format!("spiffe://{}/ns/{namespace}/*", self.trust_domain)
        } else {
            format!("spiffe://{}/*", self.trust_domain)
        };
        ClientTlsConfig {
            ca: Some(self.ca()),
            server_name: None,
            client: Some(CertFiles {
                cert: self.cert(),
                key: self.key(),
                identity: Some(self.spiffe_id()),
            }),
            identity: Some(IdentityPattern(identity)),
            min_version: TlsVersion::V1_2,
        }
    }

    /// An app id (`id`, or `id.namespace`) as its peer: the id, the namespace it is in and
    /// the host:port of its mesh listener. Each part is a DNS label, so an app id names a
    /// workload and never an arbitrary host.
    pub fn peer(&self, app_id: &str) -> Result<Peer, String> {
        let (id, namespace) = split_app_id(app_id, &self.namespace)?;
        let host = self
            .peer_dns
            .replace("{app_id}", id)
            .replace("{namespace}", namespace);
        Ok(Peer {
            id: id.to_string(),
            namespace: namespace.to_string(),
            host,
            port: self.peer_port,
        })
    }

    /// Problems that do not stop the sidecar but are likely mistakes (`outrigger check`
    /// prints them, the proxy logs them).
    pub fn warnings(&self, has_app: bool) -> Vec<String> {
        let mut out = Vec::new();
        if !has_app {
            out.push(format!(
                "mesh: app.address is not set, so there is no inbound `{LISTENER}` listener: this workload can call its peers, but no peer can call it"
            ));
        }
        out
    }

    /// The listeners the section stands for: `mesh` (inbound, when the app has an address)
    /// and `mesh-outbound` (when `outbound_address` is set).
    pub fn listeners(&self, has_app: bool, max_connections: usize) -> Vec<ListenerConfig> {
        let mut out = Vec::new();
        let limits = Limits {
            max_connections,
            header_read_timeout: super::proxy::DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: super::proxy::DEFAULT_MAX_HEADER_BYTES,
            idle_timeout: super::proxy::DEFAULT_IDLE_TIMEOUT,
            max_requests_in_flight: None,
            rate_limit: None,
            min_body_rate: Some(MinBodyRate {
                bytes_per_second: super::proxy::DEFAULT_MIN_BODY_RATE,
                grace: super::proxy::DEFAULT_MIN_BODY_RATE_GRACE,
            }),
            max_request_body: None,
        };
        if has_app {
            out.push(ListenerConfig {
                name: LISTENER.into(),
                address: Address::Tcp(self.address.0),
                direction: Direction::Inbound,
                protocol: Protocol::Http,
                cluster: None,
                http2_server: Default::default(),
                socket_mode: DEFAULT_SOCKET_MODE,
                routes: Vec::<RouteConfig>::new(),
                limits: limits.clone(),
                tls: Some(ServerTlsConfig {
                    default: CertFiles {
                        cert: self.cert(),
                        key: self.key(),
                        identity: Some(self.spiffe_id()),
                    },
                    sni: Vec::new(),
                    client_ca: Some(self.ca()),
                    client_cert: ClientCertMode::Required,
                    min_version: TlsVersion::V1_2,
                    alpn: vec!["h2".into(), "http/1.1".into()],
                }),
                authz: Some(self.authz.clone()),
            });
        }
        if let Some(address) = &self.outbound_address {
            out.push(ListenerConfig {
                name: OUTBOUND_LISTENER.into(),
                address: address.clone(),
                direction: Direction::Outbound,
                protocol: Protocol::Http,
                cluster: None,
                http2_server: Default::default(),
                socket_mode: DEFAULT_SOCKET_MODE,
                routes: Vec::new(),
                limits,
                tls: None,
                authz: None,
            });
        }
        out
    }
}

/// A peer named by an app id ([`MeshConfig::peer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    pub namespace: String,
    /// Its mesh listener's host (`mesh.peer_dns` filled in) and port.
    pub host: String,
    pub port: u16,
}

impl Peer {
    /// The name of its cluster: `peer:ID.NAMESPACE`, one for both spellings of an app id.
    pub fn cluster_name(&self) -> String {
        format!("{PEER_CLUSTER_PREFIX}{}.{}", self.id, self.namespace)
    }
}

/// An app id as its id and namespace: `id` (in `namespace`) or `id.namespace`, each a DNS
/// label (the mesh's peers and `bridge.name_resolution` alike).
pub fn split_app_id<'a>(app_id: &'a str, namespace: &'a str) -> Result<(&'a str, &'a str), String> {
    let (id, namespace) = app_id.split_once('.').unwrap_or((app_id, namespace));
    if !dns_label(id) || !dns_label(namespace) {
        return Err(format!(
            "app id {app_id:?} cannot be resolved: expected a DNS label (lowercase letters, digits, '-'; at most 63), optionally .namespace"
        ));
    }
    Ok((id, namespace))
}

/// A SPIFFE trust domain (`mesh.trust_domain`, `outrigger certs ca --trust-domain`, the
/// trust domain of a SPIFFE ID): 1–255 lowercase letters, digits, '-', '.' and '_'.
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    let ok =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_');
    if td.is_empty() || td.len() > 255 || !td.bytes().all(ok) {
        return Err(format!(
            "expected a SPIFFE trust domain (lowercase letters, digits, '-', '.', '_'), like cluster.local, found {td:?}"
        ));
    }
    Ok(())
}

/// A DNS label as Kubernetes names namespaces and services: 1–63 lowercase letters, digits and
/// '-', not starting or ending with '-'.
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Validates the `mesh:` section (present: the workload joins the mesh).
pub fn validate(raw: RawMesh, doc: &Document, problems: &mut Vec<Problem>) -> Option<MeshConfig> {
    if !cfg!(feature = "proxy") {
        problems.push(doc.problem(
            "mesh",
            "the mesh needs the proxy module, and this binary was built without it (cargo feature `proxy`)",
        ));
        return None;
    }
    let before = problems.len();
    let trust_domain = raw
        .trust_domain
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
    if let Err(e) = check_trust_domain(&trust_domain) {
        problems.push(doc.problem("mesh.trust_domain", e));
    }
    let mut name = |key: &str, value: Option<String>, what: &str| -> String {
        match value {
            Some(v) if dns_label(&v) || (key == "service_account" && subdomain(&v)) => v,
            Some(v) => {
                problems.push(doc.problem(
                    &format!("mesh.{key}"),
                    format!("expected {what}, found {v:?}"),
                ));
                v
            }
            None => {
                problems.push(doc.problem(
                    "mesh",
                    format!(
                        "mesh.{key} is not set: expected {what} (outrigger inject sets it from the pod)"
                    ),
                ));
                String::new()
            }
        }
    };
    let namespace = name(
        "namespace",
        raw.namespace,
        "the workload's namespace (a DNS label)",
    );
    let service_account = name(
        "service_account",
        raw.service_account,
        "the workload's service account (a DNS name)",
    );
    let address = raw
        .address
        .unwrap_or_else(|| TcpAddress(DEFAULT_ADDRESS.parse().expect("valid default")));
    let authz = match &raw.authz {
        Some(list) => {
            if list.is_empty() {
                problems.push(doc.problem(
                    "mesh.authz",
                    "expected at least one identity pattern (an empty list would let no peer in)",
                ));
            }
            super::tls::identities(list, "mesh.authz", doc, problems)
        }
        None => vec![IdentityPattern(format!("spiffe://{trust_domain}/*"))],
    };
    let peer_dns = raw.peer_dns.unwrap_or_else(|| DEFAULT_PEER_DNS.to_string());
    let filled = peer_dns
        .replace("{app_id}", "app")
        .replace("{namespace}", "default");
    if filled.is_empty()
        || filled.contains(['{', '}', ':', '/'])
        || filled.contains(char::is_whitespace)
    {
        problems.push(doc.problem(
            "mesh.peer_dns",
            format!(
                "expected a host name, where {{app_id}} and {{namespace}} are replaced (no port: that is peer_port), like {DEFAULT_PEER_DNS}, found {peer_dns:?}"
            ),
        ));
    }
    let peer_port = match raw.peer_port {
        Some(0) => {
            problems.push(doc.problem("mesh.peer_port", "expected a port 1-65535, found 0"));
            0
        }
        Some(p) => p,
        None if address.0.port() == 0 => {
            problems.push(doc.problem(
                "mesh",
                "mesh.address has port 0, so the peers' port is unknown: set mesh.peer_port",
            ));
            0
        }
        None => address.0.port(),
    };
    if let Some(Address::Tcp(out)) = &raw.outbound_address
        && out.port() != 0
        && out.port() == address.0.port()
        && (out.ip() == address.0.ip()
            || out.ip().is_unspecified()
            || address.0.ip().is_unspecified())
    {
        problems.push(doc.problem(
            "mesh.outbound_address",
            format!("{out} is mesh.address's too: the inbound and outbound listeners need an address each"),
        ));
    }
    let max_peers = raw.max_peers.unwrap_or(DEFAULT_MAX_PEERS);
    if max_peers == 0 || max_peers > 10_000 {
        problems.push(doc.problem(
            "mesh.max_peers",
            format!("expected 1 to 10000, found {max_peers}"),
        ));
    }
    if problems.len() > before {
        return None;
    }
    Some(MeshConfig {
        trust_domain,
        namespace,
        service_account,
        identity_dir: raw
            .identity_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_IDENTITY_DIR)),
        address,
        authz,
        peer_dns,
        peer_port,
        require_peer_namespace: raw.require_peer_namespace.unwrap_or(false),
        max_peers,
        outbound_address: raw.outbound_address,
    })
}

/// A service account name: an RFC 1123 subdomain.
fn subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> MeshConfig {
        MeshConfig {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            identity_dir: "/id".into(),
            address: TcpAddress("0.0.0.0:15443".parse().unwrap()),
            authz: vec![],
            peer_dns: DEFAULT_PEER_DNS.into(),
            peer_port: 15443,
            require_peer_namespace: false,
            max_peers: 4,
            outbound_address: None,
        }
    }

    #[test]
    fn app_ids_name_peers_in_this_or_another_namespace() {
        let m = mesh();
        assert_eq!(m.spiffe_id(), "spiffe://cluster.local/ns/shop/sa/web");
        let p = m.peer("payments").unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.host.as_str(), p.port),
            ("shop", "payments.shop.svc.cluster.local", 15443)
        );
        assert_eq!(p.cluster_name(), "peer:payments.shop");
        assert_eq!(
            m.peer("payments.shop").unwrap(),
            p,
            "one peer, two spellings"
        );
        assert_eq!(
            m.peer("payments.billing").unwrap().host,
            "payments.billing.svc.cluster.local"
        );
        assert!(m.warnings(true).is_empty());
        assert!(m.warnings(false)[0].contains("no peer can call it"));
        for bad in ["", "Payments", "a.b.c", "evil.com:80", "x/y", "-a"] {
            assert!(m.peer(bad).is_err(), "{bad}");
        }
        assert_eq!(
            m.peer_tls("billing").identity.unwrap().0,
            "spiffe://cluster.local/*"
        );
        let strict = MeshConfig {
            require_peer_namespace: true,
            ..m
        };
        assert_eq!(
            strict.peer_tls("billing").identity.unwrap().0,
            "spiffe://cluster.local/ns/billing/*"
        );
    }
}
