//! What Dapr SDKs read from the app's environment, pointing at the bridge: `DAPR_HTTP_PORT`,
//! `DAPR_HTTP_ENDPOINT`, `DAPR_RUNTIME_HOST`, `DAPR_SIDECAR_HOST`, `APP_ID`, and the tokens
//! (`DAPR_API_TOKEN`, `APP_API_TOKEN`) when configured; also `OUTRIGGER_BRIDGE_ADDRESS`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::Address;
use crate::config::bridge::BridgeConfig;

/// The variables for an app whose bridge is bound at `address`.
pub fn dapr(config: &BridgeConfig, address: &Address) -> Vec<(String, String)> {
    let mut env = vec![
        ("OUTRIGGER_BRIDGE_ADDRESS".to_string(), address.to_string()),
        ("APP_ID".to_string(), config.app_id.clone()),
    ];
    if let Address::Tcp(a) = address {
        // A wildcard bind is still reached on loopback.
        let ip = if a.ip().is_unspecified() {
            match a {
                SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                SocketAddr::V6(_) => IpAddr::from(Ipv6Addr::LOCALHOST),
            }
        } else {
            a.ip()
        };
        let host = SocketAddr::new(ip, a.port());
        env.push(("DAPR_HTTP_PORT".into(), a.port().to_string()));
        env.push(("DAPR_HTTP_ENDPOINT".into(), format!("http://{host}")));
        env.push(("DAPR_RUNTIME_HOST".into(), ip.to_string()));
        env.push(("DAPR_SIDECAR_HOST".into(), ip.to_string()));
    }
    if let Some(t) = &config.api_token {
        env.push(("DAPR_API_TOKEN".into(), t.expose().to_string()));
    }
    if let Some(t) = &config.app_api_token {
        env.push(("APP_API_TOKEN".into(), t.expose().to_string()));
    }
    env
}
