//! The second stage of loading a config: the checks that must read files or build things —
//! TLS certificates, keys and CA bundles, the OTLP collector's CA, the Dapr resources directory
//! (components, secret references, pub/sub brokers, `Subscription` documents). Each problem is
//! located at its key (file:line:col) like the first stage's, and reported with them in one run.
//!
//! What a check builds is *kept* ([`Preflight`]) and handed to the modules, so nothing is read,
//! parsed or built twice: the proxy takes the rustls configs, the span exporter its TLS
//! connector, the bridge its components, brokers and subscriptions. `outrigger check`,
//! `outrigger run` and every live reload go through [`load`].
//!
//! Sits above the modules whose builders it calls (tls, telemetry, bridge); `config` below it
//! imports nothing from them.

use crate::config::{self, Config, ConfigError, Environment, Parsed, Problem, Source};

/// What the deep checks built, for the modules to use.
#[derive(Default)]
pub struct Preflight {
    /// Listeners' server configs and clusters' client configs, by name.
    pub tls: crate::tls::Material,
    /// The TLS connector for an https OTLP collector (`telemetry.tracing.otlp`).
    pub otlp_tls: Option<crate::tls::HttpsConnector>,
    /// The rustls client config of each log sink with an `https://` URL, by sink name.
    pub logs_tls: std::collections::BTreeMap<String, crate::tls::LoadedClient>,
    /// The bridge's components, brokers and subscriptions (with a `bridge:` section).
    #[cfg(feature = "bridge")]
    pub bridge: Option<crate::bridge::components::Prepared>,
}

impl std::fmt::Debug for Preflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preflight")
            .field("tls_servers", &self.tls.servers.keys().collect::<Vec<_>>())
            .field("tls_clients", &self.tls.clients.keys().collect::<Vec<_>>())
            .field("otlp_tls", &self.otlp_tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Both stages: the typed config and what the deep checks built, or every problem of both.
pub fn load(source: &Source, env: &dyn Environment) -> Result<(Config, Preflight), ConfigError> {
    let (parsed, mut problems) = config::parse(source, env);
    let Some(parsed) = parsed else {
        return Err(problems.into());
    };
    // Run on what the first stage could validate even when it found problems: users fix
    // everything in one go.
    let built = check(&parsed, &mut problems);
    if problems.is_empty() {
        Ok((parsed.config, built))
    } else {
        Err(problems.into())
    }
}

/// The deep checks of a (possibly partly valid) config. Pushes a located problem for each.
pub fn check(parsed: &Parsed, problems: &mut Vec<Problem>) -> Preflight {
    let config = &parsed.config;
    let mut built = Preflight::default();
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for l in &config.listeners {
        // A duplicate name is a problem already; its certificates are located at its own key.
        let nth = seen.entry(&l.name).or_default();
        let key = parsed.listener_key(&l.name, *nth);
        *nth += 1;
        // The mesh's listener is made from `mesh:`, where its files are named.
        let at = if config.mesh.is_some() && l.name == config::mesh::LISTENER {
            "mesh.identity_dir".to_string()
        } else {
            format!("{key}.tls")
        };
        if let Some(t) = &l.tls {
            match crate::tls::server_config(t) {
                Ok(loaded) => {
                    built.tls.servers.insert(l.name.clone(), loaded);
                }
                // The mesh's own identity is reported once, by `check_mesh_identity`.
                Err(crate::tls::TlsError::WrongIdentity { .. }) if at == "mesh.identity_dir" => {}
                Err(e) => problems.push(parsed.problem(&at, e.to_string())),
            }
        }
    }
    if let Some(m) = &config.mesh {
        check_mesh_identity(parsed, m, problems);
    }
    for (name, c) in &config.clusters {
        if let Some(t) = &c.tls {
            match crate::tls::client_config(t, c.http2) {
                Ok(loaded) => {
                    built.tls.clients.insert(name.clone(), loaded);
                }
                Err(e) => {
                    problems.push(parsed.problem(&format!("clusters.{name}.tls"), e.to_string()))
                }
            }
        }
    }
    // The span exporter runs in the proxy (it exports the proxy's requests): its connector is
    // built only when there is a proxy; the CA file is checked either way.
    let otlp = config.telemetry.tracing.otlp.as_ref().filter(|o| o.https);
    if let Some(o) = otlp.filter(|_| config.listeners.is_empty())
        && let Some(ca) = &o.ca
        && let Err(e) = crate::tls::load_certs(ca)
    {
        problems.push(parsed.problem("telemetry.tracing.otlp.ca", e.to_string()));
    }
    if let Some(o) = otlp.filter(|_| !config.listeners.is_empty()) {
        match crate::tls::https_connector(o.ca.as_deref(), &o.server_name) {
            Ok(connector) => built.otlp_tls = Some(connector),
            Err(e) => {
                let at = if o.ca.is_some() {
                    "telemetry.tracing.otlp.ca"
                } else {
                    "telemetry.tracing.otlp"
                };
                problems.push(parsed.problem(at, e.to_string()));
            }
        }
    }
    // A log sink's https:// URL: its CA bundle and client certificate (or the system's roots).
    // `logs` is only set when its section had no problem, so the sinks' indices are the file's.
    for (i, s) in config.logs.iter().flat_map(|l| l.sinks.iter()).enumerate() {
        let Some(tls) = s.sink.https() else { continue };
        match crate::tls::client_config(&tls, false) {
            Ok(loaded) => {
                built.logs_tls.insert(s.name.clone(), loaded);
            }
            Err(e) => {
                let at = match s.sink.tls() {
                    Some(_) => format!("logs.sinks[{i}].tls"),
                    None => format!("logs.sinks[{i}].{}", s.sink.kind()),
                };
                problems.push(parsed.problem(&at, e.to_string()));
            }
        }
    }
    #[cfg(feature = "bridge")]
    if let Some(b) = &config.bridge {
        let dir = b.resources.as_deref().filter(|d| d.is_dir());
        let prepared = crate::bridge::components::prepare(dir, &b.app_id, problems);
        built.bridge = Some(prepared);
    }
    built
}

/// The mesh's identity files: the peers' TLS can be built from them (the client side, also
/// when there is no inbound listener), and the certificate carries this workload's SPIFFE ID,
/// so that a Secret mounted into the wrong pod is caught before it talks to anyone.
/// (The same check runs whenever the files are read again: `CertFiles::identity`.)
fn check_mesh_identity(parsed: &Parsed, m: &config::mesh::MeshConfig, problems: &mut Vec<Problem>) {
    match crate::tls::client_config(&m.peer_tls(&m.namespace), true) {
        Ok(_) => {}
        Err(e @ crate::tls::TlsError::WrongIdentity { .. }) => problems.push(parsed.problem(
            "mesh",
            format!("{e} (from mesh.trust_domain, namespace and service_account)"),
        )),
        // The listener reported the same files already.
        Err(e) => {
            if !problems.iter().any(|p| p.path == "mesh.identity_dir") {
                problems.push(parsed.problem("mesh.identity_dir", e.to_string()));
            }
        }
    }
}
