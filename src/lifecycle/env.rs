//! What the supervised app finds in its environment about the sidecar: where admin and each
//! listener are (`OUTRIGGER_ADMIN_ADDRESS`, `OUTRIGGER_LISTENER_<NAME>`), where to send its
//! outbound calls (`OUTRIGGER_OUTBOUND_ADDRESS`) and its service name. Modules add their own
//! (the bridge: `DAPR_HTTP_PORT` and the rest, in `bridge::env`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::config::proxy::{Direction, Protocol};
use crate::config::{Address, Config};

/// The `OUTRIGGER_*` variables, given the bound admin address and listeners (by name).
pub fn sidecar(
    config: &Config,
    admin: SocketAddr,
    bound: &BTreeMap<String, Address>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("OUTRIGGER_ADMIN_ADDRESS".to_string(), admin.to_string()),
        ("OUTRIGGER_SERVICE".to_string(), config.service.clone()),
    ];
    env.extend(
        bound
            .iter()
            .map(|(name, address)| (listener_env_name(name), address.to_string())),
    );
    // The first outbound HTTP listener: where the app sends its calls.
    if let Some(l) = config
        .listeners
        .iter()
        .find(|l| l.direction == Direction::Outbound && l.protocol == Protocol::Http)
        && let Some(address) = bound.get(&l.name)
    {
        env.push(("OUTRIGGER_OUTBOUND_ADDRESS".into(), address.to_string()));
    }
    env
}

/// `OUTRIGGER_LISTENER_<NAME>`: the variable that tells the app where listener NAME is.
pub fn listener_env_name(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("OUTRIGGER_LISTENER_{upper}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_names_become_variable_names() {
        assert_eq!(listener_env_name("egress"), "OUTRIGGER_LISTENER_EGRESS");
        assert_eq!(listener_env_name("web-2.x"), "OUTRIGGER_LISTENER_WEB_2_X");
    }
}
