//! The diff of a live reload: what of a new config can be applied while running, and which
//! changed keys take effect only after a restart (listener addresses, the admin address,
//! runtime and app settings, the access log's destination, the span exporter, the bridge, the
//! log agent).
//!
//! Pure data in, data out: the reload task (`reload::live`) applies `applied` to the modules and
//! reports `needs_restart` in the log, `/config` and `outrigger_config_reloads_total`.

use super::Config;

/// A new config split into what is applied live and what waits for a restart.
#[derive(Debug)]
pub struct ConfigDiff {
    /// The new config with the keys that cannot change live kept as they are running.
    pub applied: Config,
    /// The changed keys that take effect only after a restart (`listeners[web].address`,
    /// `runtime.worker_threads`, `bridge.address`…).
    pub needs_restart: Vec<String>,
}

impl ConfigDiff {
    /// What of `new` can be applied live: `new`, with the keys that cannot change while running
    /// kept from `old`; and the names of those keys that differ.
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let mut applied = new.clone();
        applied.source = old.source.clone();
        applied.service = old.service.clone();
        applied.admin = old.admin.clone();
        applied.runtime = old.runtime.clone();
        applied.log.format = old.log.format;
        // The access log's destination is opened once.
        applied.telemetry.access_log = old.telemetry.access_log.clone();
        // So is the span exporter's collector.
        applied.telemetry.tracing.otlp = old.telemetry.tracing.otlp.clone();
        // The app's address feeds the `app` cluster (live); the rest of `app` is the process's.
        let address = applied.app.address.clone();
        applied.app = old.app.clone();
        applied.app.address = address;
        // Listeners stay bound where they are; their routes and limits change.
        let mut listeners = Vec::new();
        let mut restart = Vec::new();
        for l in &old.listeners {
            match new.listeners.iter().find(|n| n.name == l.name) {
                Some(n) => {
                    let mut n = n.clone();
                    if n.address != l.address {
                        restart.push(format!("listeners[{}].address", l.name));
                        n.address = l.address.clone();
                    }
                    if n.socket_mode != l.socket_mode {
                        restart.push(format!("listeners[{}].socket_mode", l.name));
                        n.socket_mode = l.socket_mode;
                    }
                    // What kind of listener it is decides how its connections drain: the old one
                    // stays whole until a restart.
                    if n.direction != l.direction
                        || n.protocol != l.protocol
                        || n.cluster != l.cluster
                    {
                        restart.push(format!("listeners[{}].direction/protocol/cluster", l.name));
                        n = l.clone();
                    }
                    listeners.push(n);
                }
                None => {
                    restart.push(format!("listeners[{}] (removed)", l.name));
                    listeners.push(l.clone());
                }
            }
        }
        for n in &new.listeners {
            if !old.listeners.iter().any(|l| l.name == n.name) {
                restart.push(format!("listeners[{}] (added)", n.name));
            }
        }
        // The mesh (its identity, its listeners, how peers resolve) is set up once: its
        // listeners stay as they run, and a changed `mesh:` is named for a restart.
        applied.mesh = old.mesh.clone();
        if old.mesh.is_some() {
            for l in &mut listeners {
                if [super::mesh::LISTENER, super::mesh::OUTBOUND_LISTENER]
                    .contains(&l.name.as_str())
                    && let Some(o) = old.listeners.iter().find(|o| o.name == l.name)
                {
                    *l = o.clone();
                }
            }
        }
        applied.listeners = listeners;
        // The bridge's socket, stores and tokens are set up once.
        applied.bridge = old.bridge.clone();
        // The log agent's sources, sink and checkpoint are set up once, too.
        applied.logs = old.logs.clone();
        let mut keys = changed_keys(&applied, new);
        keys.retain(|k| k != "listeners");
        // Header values serialize redacted, so a rotated token would look unchanged.
        if applied.telemetry.tracing.otlp != new.telemetry.tracing.otlp
            && !keys.iter().any(|k| k == "telemetry.tracing")
        {
            keys.push("telemetry.tracing".to_string());
        }
        // Likewise the log sinks' header values (a rotated token, in the file or the
        // environment): the sinks are set up once, so a change needs a restart.
        if sink_header_values(&applied.logs) != sink_header_values(&new.logs)
            && !keys.iter().any(|k| k == "logs.sinks")
        {
            keys.push("logs.sinks".to_string());
        }
        keys.extend(restart);
        ConfigDiff {
            applied,
            needs_restart: keys,
        }
    }
}

/// Each log sink's header values (they serialize redacted), in order.
fn sink_header_values(logs: &Option<super::logs::LogsConfig>) -> Vec<Vec<&str>> {
    logs.iter()
        .flat_map(|l| &l.sinks)
        .map(|s| s.sink.headers().iter().map(|h| h.value.expose()).collect())
        .collect()
}

/// Top-level keys (and their direct children) whose values differ.
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, va) in a {
            let vb = b.get(k).unwrap_or(&serde_json::Value::Null);
            if va == vb {
                continue;
            }
            match (va.as_object(), vb.as_object()) {
                (Some(ca), Some(cb)) => {
                    for (ck, cva) in ca {
                        if Some(cva) != cb.get(ck) {
                            out.push(format!("{k}.{ck}"));
                        }
                    }
                    for ck in cb.keys().filter(|ck| !ca.contains_key(*ck)) {
                        out.push(format!("{k}.{ck}"));
                    }
                }
                _ => out.push(k.clone()),
            }
        }
        // A section only the new config has (`mesh:` or `bridge:` added).
        for k in b.keys().filter(|k| !a.contains_key(*k)) {
            out.push(k.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Source, load};

    /// Each version of the config is written to the same file, as a reload reads it.
    fn config(yaml: &str) -> Config {
        thread_local! {
            static DIR: tempfile::TempDir = tempfile::tempdir().unwrap();
        }
        let file = DIR.with(|d| d.path().join("c.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let source = Source {
            file: Some(file),
            ..Source::default()
        };
        load(&source, &BTreeMap::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = "
service: a
app: { address: 127.0.0.1:8080 }
listeners:
  - name: web
    address: 127.0.0.1:0
    direction: inbound
    protocol: http
clusters:
  up: { endpoints: [127.0.0.1:9000] }
";

    #[test]
    fn the_same_config_changes_nothing() {
        let old = config(BASE);
        let diff = ConfigDiff::between(&old, &config(BASE));
        assert!(diff.needs_restart.is_empty(), "{:?}", diff.needs_restart);
        assert_eq!(
            serde_json::to_value(&diff.applied).unwrap(),
            serde_json::to_value(&old).unwrap()
        );
    }

    #[test]
    fn routes_clusters_and_log_level_apply_live() {
        let old = config(BASE);
        let new = config(&format!(
            "{}  more: {{ endpoints: [127.0.0.1:9001] }}\nlog: {{ level: debug }}\n",
            BASE.replace("8080", "8081")
        ));
        let diff = ConfigDiff::between(&old, &new);
        // The app's probe follows its address, and the probe is the process's: only it waits.
        assert_eq!(diff.needs_restart, ["app.probe"]);
        assert!(diff.applied.clusters.contains_key("more"));
        assert_eq!(diff.applied.log.level, "debug");
        // The app's address feeds the `app` cluster: live.
        assert_eq!(
            diff.applied.app.address.as_ref().unwrap().to_string(),
            "127.0.0.1:8081"
        );
    }

    #[test]
    fn restart_only_keys_are_kept_and_named() {
        let old = config(BASE);
        let new = config(
            &BASE
                .replace("service: a", "service: b\nruntime: { worker_threads: 2 }\nadmin: { address: 127.0.0.1:9902 }")
                .replace("address: 127.0.0.1:0", "address: 127.0.0.1:1234"),
        );
        let diff = ConfigDiff::between(&old, &new);
        let mut keys = diff.needs_restart.clone();
        keys.sort();
        assert_eq!(
            keys,
            [
                "admin.address",
                "listeners[web].address",
                "runtime.worker_threads",
                "service"
            ]
        );
        assert_eq!(diff.applied.service, "a");
        assert_eq!(
            diff.applied.runtime.worker_threads,
            old.runtime.worker_threads
        );
        assert_eq!(diff.applied.admin.address, old.admin.address);
        assert_eq!(diff.applied.listeners[0].address, old.listeners[0].address);
    }

    #[test]
    fn listeners_added_removed_or_changed_in_kind_wait_for_a_restart() {
        let old = config(BASE);
        let new = config(
            &BASE
                .replace("name: web", "name: api")
                .replace("direction: inbound", "direction: outbound"),
        );
        let diff = ConfigDiff::between(&old, &new);
        let mut keys = diff.needs_restart.clone();
        keys.sort();
        assert_eq!(keys, ["listeners[api] (added)", "listeners[web] (removed)"]);
        // The running listener stays as it is.
        assert_eq!(diff.applied.listeners.len(), 1);
        assert_eq!(diff.applied.listeners[0].name, "web");

        let new = config(&BASE.replace("direction: inbound", "direction: outbound"));
        let diff = ConfigDiff::between(&old, &new);
        assert_eq!(
            diff.needs_restart,
            ["listeners[web].direction/protocol/cluster"]
        );
        assert_eq!(
            diff.applied.listeners[0].direction,
            old.listeners[0].direction
        );
    }

    #[test]
    fn changed_keys_names_children_of_top_level_sections() {
        let old = config(BASE);
        let new = config(&format!(
            "{BASE}telemetry: {{ tracing: {{ sample: 0.5 }} }}\n"
        ));
        assert_eq!(changed_keys(&old, &new), ["telemetry.tracing"]);
    }

    #[test]
    fn a_changed_mesh_waits_for_a_restart_and_is_named() {
        let mesh = |ns: &str| {
            format!(
                "service: a\napp: {{ address: 127.0.0.1:8080 }}\nmesh:\n  namespace: {ns}\n  service_account: a\n  outbound_address: 127.0.0.1:0\n"
            )
        };
        let old = config(&mesh("shop"));
        let diff = ConfigDiff::between(&old, &config(&mesh("billing")));
        assert_eq!(diff.needs_restart, ["mesh.namespace"]);
        assert_eq!(diff.applied.mesh, old.mesh, "the running mesh is kept");
        // Joining or leaving the mesh: the section and its listeners.
        let plain = config("service: a\napp: { address: 127.0.0.1:8080 }\n");
        let joined = ConfigDiff::between(&plain, &old);
        assert!(
            joined.needs_restart.iter().any(|k| k == "mesh"),
            "{:?}",
            joined.needs_restart
        );
        assert!(joined.applied.mesh.is_none());
        let left = ConfigDiff::between(&old, &plain);
        assert!(
            left.needs_restart.iter().any(|k| k == "mesh"),
            "{:?}",
            left.needs_restart
        );
        assert_eq!(left.applied.mesh, old.mesh);
    }

    /// Header values serialize redacted: a changed one is still named for a restart (the log
    /// sinks are set up once).
    #[cfg(feature = "logs")]
    #[test]
    fn a_changed_log_sink_header_value_needs_a_restart() {
        let with = |token: &str| {
            config(&format!(
                "{BASE}logs:\n  sources: [{{files: /var/log/*.log}}]\n  sinks: [{{http: http://c/x, headers: {{Authorization: {token}}}}}]\n"
            ))
        };
        let old = with("a");
        assert!(
            ConfigDiff::between(&old, &with("a"))
                .needs_restart
                .is_empty()
        );
        let diff = ConfigDiff::between(&old, &with("b"));
        assert_eq!(diff.needs_restart, ["logs.sinks"]);
        assert_eq!(
            diff.applied.logs.unwrap().sinks[0].sink.headers()[0]
                .value
                .expose(),
            "a"
        );
    }
}
