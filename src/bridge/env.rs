//! What Dapr SDKs read from the app's environment, pointing at the bridge: `DAPR_HTTP_PORT`,
//! `DAPR_HTTP_ENDPOINT`, `DAPR_GRPC_PORT`, `DAPR_GRPC_ENDPOINT`, `DAPR_RUNTIME_HOST`,
//! `DAPR_SIDECAR_HOST`, `APP_ID`, and the tokens (`DAPR_API_TOKEN`, `APP_API_TOKEN`) when
//! configured; also `OUTRIGGER_BRIDGE_ADDRESS` and `OUTRIGGER_BRIDGE_GRPC_ADDRESS`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::Address;
use crate::config::bridge::BridgeConfig;

/// A wildcard bind is still reached on loopback.
fn reachable(a: &SocketAddr) -> SocketAddr {
    let ip = if a.ip().is_unspecified() {
        match a {
            SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            SocketAddr::V6(_) => IpAddr::from(Ipv6Addr::LOCALHOST),
        }
    } else {
        a.ip()
    };
    SocketAddr::new(ip, a.port())
}

/// The variables for an app whose bridge is bound at `http` (HTTP and gRPC) and `grpc` (gRPC;
/// the same address when there is no second socket).
pub fn dapr(config: &BridgeConfig, http: &Address, grpc: &Address) -> Vec<(String, String)> {
    let mut env = vec![
        ("OUTRIGGER_BRIDGE_ADDRESS".to_string(), http.to_string()),
        (
            "OUTRIGGER_BRIDGE_GRPC_ADDRESS".to_string(),
            grpc.to_string(),
        ),
        ("APP_ID".to_string(), config.app_id.clone()),
    ];
    if let Address::Tcp(a) = http {
        let host = reachable(a);
        env.push(("DAPR_HTTP_PORT".into(), a.port().to_string()));
        env.push(("DAPR_HTTP_ENDPOINT".into(), format!("http://{host}")));
        env.push(("DAPR_RUNTIME_HOST".into(), host.ip().to_string()));
        env.push(("DAPR_SIDECAR_HOST".into(), host.ip().to_string()));
    }
    match grpc {
        Address::Tcp(a) => {
            let host = reachable(a);
            env.push(("DAPR_GRPC_PORT".into(), a.port().to_string()));
            env.push(("DAPR_GRPC_ENDPOINT".into(), format!("http://{host}")));
        }
        // gRPC's own URI scheme for a unix socket, as the Dapr SDKs accept it.
        // gRPC's URI forms for a unix socket: `unix:///abs/path`, `unix:rel/path`.
        Address::Unix(p) => {
            let endpoint = if p.is_absolute() {
                format!("unix://{}", p.display())
            } else {
                format!("unix:{}", p.display())
            };
            env.push(("DAPR_GRPC_ENDPOINT".into(), endpoint));
        }
    }
    if let Some(t) = &config.api_token {
        env.push(("DAPR_API_TOKEN".into(), t.expose().to_string()));
    }
    if let Some(t) = &config.app_api_token {
        env.push(("APP_API_TOKEN".into(), t.expose().to_string()));
    }
    env
}
