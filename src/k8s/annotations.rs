//! The `outrigger.dev/*` annotations of a pod template: read once into [`Annotations`], every
//! problem named with the annotation and what was expected. An unknown `outrigger.dev/` key is
//! refused, like an unknown config key, so a typo does not silently inject the defaults.

use std::collections::BTreeMap;

use serde_json::Value;

/// The prefix of every annotation Outrigger reads.
pub const PREFIX: &str = "outrigger.dev/";

/// The annotations Outrigger reads, without the prefix (also the error message's list).
pub const KNOWN: &[&str] = &[
    "inject",
    "app-id",
    "config",
    "app-port",
    "app-protocol",
    "bridge",
    "outbound-address",
    "shutdown-grace",
    "image",
    "identity",
    "mesh",
    "cpu-request",
    "cpu-limit",
    "memory-request",
    "memory-limit",
];

/// What the annotations ask for. `None`: not given (the injector's default applies).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Annotations {
    /// `outrigger.dev/inject`: `"false"` leaves the pod alone.
    pub inject: Option<bool>,
    pub app_id: Option<String>,
    /// The ConfigMap holding `outrigger.yaml`.
    pub config: Option<String>,
    pub app_port: Option<u16>,
    /// `http` or `grpc`.
    pub app_protocol: Option<String>,
    /// `outrigger.dev/bridge`: `"false"` runs no Dapr-compatible API (default: on).
    pub bridge: Option<bool>,
    /// Passed to the app as `OUTRIGGER_OUTBOUND_ADDRESS` (an outbound listener of the config).
    pub outbound_address: Option<String>,
    /// Whole seconds, rounded up.
    pub shutdown_grace_seconds: Option<u64>,
    pub image: Option<String>,
    /// `outrigger.dev/identity: "true"`: mount the service account's identity Secret.
    pub identity: Option<bool>,
    /// `outrigger.dev/mesh: "true"`: join the mesh (its listeners and `mesh.*` settings);
    /// implies `identity`. Identity alone mounts the Secret and adds nothing else.
    pub mesh: Option<bool>,
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

/// Reads the `outrigger.dev/*` entries of a `metadata.annotations` object (absent or null: none).
/// Every problem is collected; the error lists them all, `; `-separated.
pub fn read(annotations: Option<&Value>) -> Result<Annotations, String> {
    let mut out = Annotations::default();
    let mut problems = Vec::new();
    let map: BTreeMap<&str, &Value> = match annotations {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.as_str(), v)).collect(),
        Some(other) => {
            return Err(format!(
                "metadata.annotations: expected a map, found {other}"
            ));
        }
    };
    for (key, value) in map {
        let Some(name) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(text) = value.as_str() else {
            problems.push(format!(
                "annotation {key}: expected a string, found {value} (quote it)"
            ));
            continue;
        };
        let text = text.trim();
        let result = match name {
            "inject" => boolean(text).map(|b| out.inject = Some(b)),
            "bridge" => boolean(text).map(|b| out.bridge = Some(b)),
            "identity" => boolean(text).map(|b| out.identity = Some(b)),
            "mesh" => boolean(text).map(|b| out.mesh = Some(b)),
            "app-id" => dns_label(text).map(|()| out.app_id = Some(text.into())),
            "config" => dns_subdomain(text).map(|()| out.config = Some(text.into())),
            "app-port" => match text.parse::<u16>() {
                Ok(p) if p > 0 => {
                    out.app_port = Some(p);
                    Ok(())
                }
                _ => Err(format!("expected a port 1-65535, found {text:?}")),
            },
            "app-protocol" => match text {
                "http" | "grpc" => {
                    out.app_protocol = Some(text.into());
                    Ok(())
                }
                _ => Err(format!("expected http or grpc, found {text:?}")),
            },
            "outbound-address" => address(text).map(|()| out.outbound_address = Some(text.into())),
            "shutdown-grace" => match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() && d.as_secs() <= 24 * 3600 => {
                    out.shutdown_grace_seconds =
                        Some(d.as_secs() + u64::from(d.subsec_nanos() > 0));
                    Ok(())
                }
                _ => Err(format!(
                    "expected a duration with a unit above 0 and at most 24h, like 30s or 1m30s, found {text:?}"
                )),
            },
            "image" => {
                if text.is_empty() || text.contains(char::is_whitespace) {
                    Err(format!(
                        "expected a container image reference, found {text:?}"
                    ))
                } else {
                    out.image = Some(text.into());
                    Ok(())
                }
            }
            "cpu-request" => quantity(text).map(|()| out.cpu_request = Some(text.into())),
            "cpu-limit" => quantity(text).map(|()| out.cpu_limit = Some(text.into())),
            "memory-request" => quantity(text).map(|()| out.memory_request = Some(text.into())),
            "memory-limit" => quantity(text).map(|()| out.memory_limit = Some(text.into())),
            _ => Err(format!(
                "unknown annotation, expected one of {}",
                KNOWN
                    .iter()
                    .map(|k| format!("{PREFIX}{k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        if let Err(e) = result {
            problems.push(format!("annotation {key}: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    }
}

fn boolean(text: &str) -> Result<bool, String> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("expected \"true\" or \"false\", found {text:?}")),
    }
}

/// An app id becomes a DNS name (`bridge.name_resolution`) and the `service`: an RFC 1123 label.
fn dns_label(text: &str) -> Result<(), String> {
    if crate::config::mesh::dns_label(text) {
        Ok(())
    } else {
        Err(format!(
            "expected a DNS label (lowercase letters, digits, '-', at most 63), found {text:?}"
        ))
    }
}

/// A ConfigMap name: an RFC 1123 subdomain.
fn dns_subdomain(text: &str) -> Result<(), String> {
    let ok = !text.is_empty() && text.len() <= 253 && text.split('.').all(|l| dns_label(l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a ConfigMap name (lowercase letters, digits, '-', '.'), found {text:?}"
        ))
    }
}

fn address(text: &str) -> Result<(), String> {
    text.parse::<crate::config::Address>()
        .map(|_| ())
        .map_err(|()| format!("expected host:port or unix:/path, found {text:?}"))
}

/// A Kubernetes resource quantity (`100m`, `0.5`, `64Mi`, `1G`, `1e3`): the API server's own
/// grammar, checked here so a typo is refused by `inject` rather than by the cluster.
fn quantity(text: &str) -> Result<(), String> {
    // Hand-written: the grammar is one line, and no maintained crate parses just quantities.
    let (number, suffix) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((text, ""), |i| text.split_at(i));
    let number_ok =
        !number.is_empty() && number.chars().filter(|c| *c == '.').count() <= 1 && number != ".";
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || (suffix.len() > 1
        && (suffix.starts_with('e') || suffix.starts_with('E'))
        && suffix[1..]
            .trim_start_matches(['+', '-'])
            .chars()
            .all(|c| c.is_ascii_digit())
        && !suffix[1..].trim_start_matches(['+', '-']).is_empty());
    if number_ok && suffix_ok {
        Ok(())
    } else {
        Err(format!(
            "expected a resource quantity like 100m, 0.5, 64Mi or 1G, found {text:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_every_annotation() {
        let a = read(Some(&json!({
            "outrigger.dev/inject": "true",
            "outrigger.dev/app-id": "checkout",
            "outrigger.dev/config": "checkout-outrigger",
            "outrigger.dev/app-port": "8080",
            "outrigger.dev/app-protocol": "grpc",
            "outrigger.dev/bridge": "false",
            "outrigger.dev/outbound-address": "127.0.0.1:15001",
            "outrigger.dev/shutdown-grace": "1m30s",
            "outrigger.dev/image": "registry.local/outrigger:dev",
            "outrigger.dev/identity": "true",
            "outrigger.dev/mesh": "false",
            "outrigger.dev/cpu-request": "100m",
            "outrigger.dev/cpu-limit": "1",
            "outrigger.dev/memory-request": "64Mi",
            "outrigger.dev/memory-limit": "256Mi",
            "other.io/x": 3,
        })))
        .unwrap();
        assert_eq!(a.app_port, Some(8080));
        assert_eq!(a.shutdown_grace_seconds, Some(90));
        assert_eq!(a.bridge, Some(false));
        assert_eq!(a.identity, Some(true));
        assert_eq!(a.mesh, Some(false));
        assert_eq!(a.memory_limit.as_deref(), Some("256Mi"));
    }

    #[test]
    fn collects_every_problem() {
        let e = read(Some(&json!({
            "outrigger.dev/inject": "yes",
            "outrigger.dev/app-port": "99999",
            "outrigger.dev/app-prot": "http",
            "outrigger.dev/cpu-limit": "lots",
            "outrigger.dev/app-id": 5,
        })))
        .unwrap_err();
        for want in [
            "outrigger.dev/inject: expected \"true\" or \"false\", found \"yes\"",
            "outrigger.dev/app-port: expected a port 1-65535, found \"99999\"",
            "outrigger.dev/app-prot: unknown annotation",
            "outrigger.dev/cpu-limit: expected a resource quantity",
            "outrigger.dev/app-id: expected a string, found 5",
        ] {
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn quantities() {
        for ok in ["1", "100m", "0.5", "64Mi", "1G", "1e3", "2E-1", "1.5Gi"] {
            assert!(quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["", "m", "1mb", "1..2", "-1", "1 Gi", "1e"] {
            assert!(quantity(bad).is_err(), "{bad}");
        }
    }
}
