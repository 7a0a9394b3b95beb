//! The `bridge:` section: the Dapr-compatible API's address, resources directory, app id,
//! tokens and body limit, validated into [`BridgeConfig`]. The resources directory (Dapr
//! Component YAML) is only checked to be a directory here; the preflight stage reads it
//! (`bridge::components::prepare`), so that an unknown component type or a bad secret reference
//! stops start-up with its file and line, like any other config problem.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::document::Document;
use super::raw::RawBridge;
pub use super::types::ByteSize;
use super::{Address, Problem, Secret};

/// Dapr's default HTTP API port, on loopback: the API can read state and secrets.
pub const DEFAULT_BRIDGE_ADDRESS: &str = "127.0.0.1:3500";
/// Dapr's default gRPC API port, on loopback.
pub const DEFAULT_GRPC_ADDRESS: &str = "127.0.0.1:50001";
/// Dapr's default `--dapr-http-max-request-size` (4 MB).
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
/// Unix sockets: only the sidecar's user (the app runs as the same user or is given access).
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// The validated `bridge:` section.
#[derive(Clone, PartialEq, Serialize)]
pub struct BridgeConfig {
    pub address: Address,
    /// A second socket for the gRPC API (which `address` serves too): `bridge.grpc_address`;
    /// with neither key set, Dapr's 127.0.0.1:50001; with only `address` set, none (one port
    /// for both APIs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_address: Option<Address>,
    /// Where an app id without a cluster of its name is invoked: a `host:port` template with
    /// `{app_id}` and `{namespace}` (`bridge.name_resolution`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_resolution: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<PathBuf>,
    /// The Dapr app id (state key prefix, CloudEvent `source`, `/v1.0/metadata` id).
    pub app_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_api_token: Option<Secret>,
    pub max_body: usize,
}

impl fmt::Debug for BridgeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgeConfig")
            .field("address", &self.address)
            .field("grpc_address", &self.grpc_address)
            .field("resources", &self.resources)
            .field("app_id", &self.app_id)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

/// Fills a `bridge.name_resolution` template: `{app_id}` and `{namespace}` replaced, giving
/// `host:port`. Errors name what is wrong with the template.
pub fn resolve_name(
    template: &str,
    app_id: &str,
    namespace: &str,
) -> Result<(String, u16), String> {
    if !template.contains("{app_id}") {
        return Err(format!(
            "expected a host:port template with {{app_id}} (like {{app_id}}.{{namespace}}.svc.cluster.local:3500), found {template:?}"
        ));
    }
    let filled = template
        .replace("{app_id}", app_id)
        .replace("{namespace}", namespace);
    if let Some(unknown) = filled.find('{') {
        return Err(format!(
            "unknown placeholder at {:?}: expected {{app_id}} or {{namespace}}",
            &filled[unknown..]
        ));
    }
    match filled.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok((
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                p,
            )),
            _ => Err(format!(
                "expected a port number after the last ':', found {port:?}"
            )),
        },
        _ => Err(format!("expected host:port, found {filled:?}")),
    }
}

/// Validates the `bridge:` section (present: the bridge runs).
pub fn validate(
    raw: RawBridge,
    service: &str,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<BridgeConfig> {
    if !cfg!(feature = "bridge") {
        problems.push(doc.problem(
            "bridge",
            "the bridge needs the bridge module, and this binary was built without it (cargo feature `bridge`)",
        ));
        return None;
    }
    let app_id = raw.app_id.unwrap_or_else(|| service.to_string());
    if app_id.is_empty() || app_id.contains("||") || app_id.contains('/') {
        problems.push(doc.problem(
            "bridge.app_id",
            format!("expected an app id without '/' or '||', found {app_id:?}"),
        ));
    }
    let max_body = raw.max_body.map_or(DEFAULT_MAX_BODY, |b| b.0);
    if max_body == 0 {
        problems.push(doc.problem(
            "bridge.max_body",
            "expected a size above 0, like 4MiB, found 0",
        ));
    }
    if let Some(dir) = &raw.resources
        && !dir.is_dir()
    {
        problems.push(doc.problem(
            "bridge.resources",
            format!(
                "expected a directory of Dapr component YAML files, found no directory at {}",
                dir.display()
            ),
        ));
    }
    for (key, token) in [
        ("bridge.api_token", &raw.api_token),
        ("bridge.app_api_token", &raw.app_api_token),
    ] {
        if let Some(t) = token
            && (t.expose().is_empty()
                || t.expose()
                    .bytes()
                    .any(|b| b.is_ascii_control() || !b.is_ascii()))
        {
            problems.push(doc.problem(
                key,
                "expected a non-empty token of printable ASCII characters (it is sent as a header)",
            ));
        }
    }
    let grpc_address = match (&raw.address, raw.grpc_address) {
        (_, Some(g)) => Some(g),
        (None, None) => Some(DEFAULT_GRPC_ADDRESS.parse().expect("valid default")),
        (Some(_), None) => None,
    };
    let address = raw
        .address
        .unwrap_or_else(|| DEFAULT_BRIDGE_ADDRESS.parse().expect("valid default"));
    // The same socket twice is one socket: gRPC is served on `address` anyway (port 0 twice is
    // two sockets).
    let grpc_address =
        grpc_address.filter(|g| *g != address || matches!(g, Address::Tcp(a) if a.port() == 0));
    if let Some(t) = &raw.name_resolution
        && let Err(e) = resolve_name(t, "app", "default")
    {
        problems.push(doc.problem("bridge.name_resolution", e));
    }
    Some(BridgeConfig {
        address,
        grpc_address,
        name_resolution: raw.name_resolution,
        resources: raw.resources,
        app_id,
        api_token: raw.api_token,
        app_api_token: raw.app_api_token,
        max_body,
    })
}
