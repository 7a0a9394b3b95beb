//! Configuration: one YAML file (or none: embedded defaults), then environment overrides, then
//! `--set` flags, parsed into [`raw::RawConfig`] and validated into the typed [`Config`].
//!
//! Every problem is collected with its file:line:column ([`document`]) so users fix them all
//! in one go; `main` prints them and exits with 78 (EX_CONFIG) before anything starts.
//! Overrides are merged here and only here, through [`Environment`] so tests can pass a map.
//!
//! This is the bottom floor: syntax, types and cross-references only, importing nothing from
//! the modules above. Checks that must read files or build things (TLS material, Dapr
//! components, brokers, Subscription documents) are the preflight stage's (`preflight.rs`),
//! which locates its problems through [`Parsed::problem`] and keeps what it built.

pub mod bridge;
pub mod check;
pub mod diff;
pub mod document;
pub mod file_limits;
pub mod lifecycle;
pub mod logs;
pub mod mesh;
pub mod proxy;
pub mod raw;
pub mod route;
pub mod telemetry;
pub mod tls;
pub mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

pub use diff::ConfigDiff;
pub use document::{Origin, Problem};
pub use raw::LogFormat;
pub use telemetry::{
    AccessLogConfig, AccessLogFormat, AccessLogTo, DEFAULT_TRACE_SAMPLE, OtlpConfig,
    TelemetryConfig, TracingConfig,
};
pub use types::{Address, Duration, Secret};

pub use document::Document;
use raw::RawConfig;

/// Environment variables that override a config key, for the few keys people change per
/// deployment. `--set key=value` reaches every key.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("OUTRIGGER_SERVICE", "service"),
    ("OUTRIGGER_ADMIN_ADDRESS", "admin.address"),
    ("OUTRIGGER_LOG_LEVEL", "log.level"),
    ("OUTRIGGER_LOG_FORMAT", "log.format"),
    ("OUTRIGGER_WORKER_THREADS", "runtime.worker_threads"),
    ("OUTRIGGER_CODE_PAGES", "runtime.code_pages"),
];

/// Where overrides come from: the process environment, or a map in tests.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;

    /// Whether `name` is set at all (a value that is not UTF-8 included).
    fn is_set(&self, name: &str) -> bool {
        self.var(name).is_some()
    }
}

/// The real process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn is_set(&self, name: &str) -> bool {
        std::env::var_os(name).is_some()
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// What to load: the file (if any) and the `--set key=value` flags, in order.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub file: Option<PathBuf>,
    pub sets: Vec<(String, String)>,
    /// The app command from `outrigger run -- CMD`; replaces `app.command`.
    pub app_command: Option<Vec<String>>,
}

/// The validated, typed configuration the sidecar runs with.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// The file it was read from (none: embedded defaults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// This workload's name: metric labels and, later, its identity.
    pub service: String,
    pub admin: AdminConfig,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
    pub app: AppConfig,
    /// Where traffic comes in and goes out (the proxy module).
    pub listeners: Vec<proxy::ListenerConfig>,
    /// Upstream clusters by name, including `app` when `app.address` is set.
    pub clusters: BTreeMap<String, proxy::ClusterConfig>,
    /// Files and directories watched for the app, and what to do when they change.
    pub reload: Vec<lifecycle::ReloadConfig>,
    pub tls: TlsGlobalConfig,
    pub telemetry: TelemetryConfig,
    /// The Dapr-compatible API, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<bridge::BridgeConfig>,
    /// The log agent, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<logs::LogsConfig>,
    /// This workload's identity in a mesh of sidecars, when configured (its listeners are in
    /// `listeners` too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<mesh::MeshConfig>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TlsGlobalConfig {
    /// Warn in the log when a loaded certificate expires sooner than this.
    pub expiry_warning: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Serialize)]
pub struct RuntimeConfig {
    pub worker_threads: usize,
    pub shutdown_grace: Duration,
    pub watch_config: bool,
    pub drain_delay: Duration,
    /// `runtime.upgrade_socket`: None means the default (beside the admin port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_socket: Option<UpgradeSocket>,
    pub upgrade_timeout: Duration,
    /// `runtime.code_pages`: what happens to start-up's code pages (src/memory.rs).
    pub code_pages: crate::memory::CodePages,
}

/// `runtime.upgrade_socket`: a path, or `off`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpgradeSocket {
    Off,
    Path(PathBuf),
}

impl Serialize for UpgradeSocket {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UpgradeSocket::Off => s.serialize_str("off"),
            UpgradeSocket::Path(p) => s.collect_str(&p.display()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, or `info,outrigger::admin=debug`.
    pub level: String,
    pub format: LogFormat,
}

/// What the app speaks at `app.address` (Dapr's `--app-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (the proxy may use h2c when the cluster says so).
    #[default]
    Http,
    /// gRPC (h2c): the proxy's `app` cluster speaks HTTP/2, and the bridge calls the app's
    /// `AppCallback` service for subscriptions, events and invocations.
    Grpc,
}

#[derive(Clone, Debug, Serialize)]
pub struct AppConfig {
    /// Where the app listens (inbound listeners forward here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    pub protocol: AppProtocol,
    /// The app to start and supervise, when Outrigger runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(flatten)]
    pub lifecycle: lifecycle::AppLifecycle,
}

/// Every problem found in a configuration.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl From<Vec<Problem>> for ConfigError {
    fn from(mut problems: Vec<Problem>) -> Self {
        problems.sort_by(|a, b| a.origin.cmp(&b.origin));
        ConfigError { problems }
    }
}

/// Reads, merges and validates the configuration: syntax, types and cross-references (the
/// first stage; `preflight` does the checks that must read files or build things).
pub fn load(source: &Source, env: &dyn Environment) -> Result<Config, ConfigError> {
    let (parsed, problems) = parse(source, env);
    match parsed {
        Some(parsed) if problems.is_empty() => Ok(parsed.config),
        _ => Err(problems.into()),
    }
}

/// A config as far as it could be validated, and the document it came from (to locate the
/// later stage's problems at their keys).
pub struct Parsed {
    pub config: Config,
    pub doc: Document,
}

impl Parsed {
    /// A problem located at a dotted key (`listeners[0].tls`) of this config's file.
    pub fn problem(&self, path: &str, message: impl Into<String>) -> Problem {
        self.doc.problem(path, message)
    }

    /// The key of the `nth` (from 0) listener named `name` (`listeners[2]`), as written in the
    /// file (the config holds only the listeners that were valid, so its indexes can differ).
    pub fn listener_key(&self, name: &str, nth: usize) -> String {
        match self.doc.index_by_name("listeners", name, nth) {
            Some(i) => format!("listeners[{i}]"),
            None => "listeners".to_string(),
        }
    }
}

/// The first stage, keeping going after a problem: the config with the parts that were valid
/// (none when the document itself could not be read), and every problem found. A later stage
/// can check what is there and add its own problems, so users see them all in one run.
pub fn parse(source: &Source, env: &dyn Environment) -> (Option<Parsed>, Vec<Problem>) {
    let name = document::display_name(source.file.as_deref());
    let text = match &source.file {
        Some(path) => match file_limits::read(path) {
            Ok(text) => text,
            Err(e) => {
                let problem = Problem {
                    origin: Origin::Whole {
                        file: name.display().to_string(),
                    },
                    path: String::new(),
                    message: format!("cannot read the config file: {e}"),
                };
                return (None, vec![problem]);
            }
        },
        None => String::new(),
    };
    let mut doc = match Document::parse(&name, &text) {
        Ok(doc) => doc,
        Err(p) => return (None, vec![p]),
    };

    let mut problems = Vec::new();
    for (var, key) in ENV_OVERRIDES {
        // An empty variable counts as unset (as `VAR= cmd` in a shell means "no value").
        if let Some(v) = env.var(var).filter(|v| !v.is_empty())
            && let Err(p) = doc.set(key, &v, &format!("env {var}"))
        {
            problems.push(p);
        }
    }
    for (key, v) in &source.sets {
        if let Err(p) = doc.set(key, v, &format!("--set {key}")) {
            problems.push(p);
        }
    }
    // Even when some keys were bad, the rest is validated too: every problem in one run.
    let (raw, mut more) = doc.deserialize_pruned::<RawConfig>();
    problems.append(&mut more);
    let Some(mut raw) = raw else {
        return (None, problems);
    };
    // The variable daprd reads, for apps moving over from Dapr (the file wins).
    if let Some(b) = raw.bridge.as_mut()
        && b.api_token.is_none()
    {
        b.api_token = env
            .var("DAPR_API_TOKEN")
            .filter(|v| !v.is_empty())
            .map(Secret::new);
    }
    let mut semantic = Vec::new();
    let config = validate(raw, source, env, &doc, &mut semantic);
    // Located where the user wrote them (list entries removed as wrong shift the indices); a
    // check of a node that was removed sees the default in its place (an invalid `direction`
    // read as inbound): its problem was reported, the consequences are not.
    problems.extend(semantic.into_iter().filter_map(|p| doc.as_written(p)));
    (Some(Parsed { config, doc }), problems)
}

/// Raw → typed, with the checks serde cannot express. Pushes a located problem for each.
fn validate(
    raw: RawConfig,
    source: &Source,
    env: &dyn Environment,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Config {
    let service = raw
        .service
        .unwrap_or_else(|| raw::DEFAULT_SERVICE.to_string());
    if service.is_empty()
        || !service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        problems.push(doc.problem(
            "service",
            format!("expected a name of letters, digits, '-', '_' or '.', found {service:?}"),
        ));
    }

    let admin_address = raw
        .admin
        .address
        .map(|a| a.0)
        .unwrap_or_else(|| raw::DEFAULT_ADMIN_ADDRESS.parse().expect("valid default"));

    let worker_threads = raw
        .runtime
        .worker_threads
        .unwrap_or(raw::DEFAULT_WORKER_THREADS);
    if worker_threads == 0 || worker_threads > 64 {
        problems.push(doc.problem(
            "runtime.worker_threads",
            format!("expected a number of threads from 1 to 64, found {worker_threads}"),
        ));
    }

    let code_pages = match raw.runtime.code_pages.as_deref() {
        None => crate::memory::CodePages::default(),
        Some(v) => crate::memory::CodePages::parse(v).unwrap_or_else(|| {
            problems.push(doc.problem(
                "runtime.code_pages",
                format!("expected `unmap`, `drop` or `keep`, found `{v}`"),
            ));
            crate::memory::CodePages::default()
        }),
    };

    let level = raw
        .log
        .level
        .unwrap_or_else(|| raw::DEFAULT_LOG_LEVEL.to_string());
    if let Err(e) = parse_log_filter(&level) {
        problems.push(doc.problem(
            "log.level",
            format!("expected a log filter like info, debug or info,outrigger=debug: {e}"),
        ));
    }

    let command = source.app_command.clone().or(raw.app.command.clone());
    if let Some(cmd) = &command
        && (cmd.is_empty() || cmd[0].is_empty())
    {
        problems.push(doc.problem(
            "app.command",
            "expected a program and its arguments, like [python3, app.py], found an empty list",
        ));
    }
    if command.is_none() && raw.app.env.is_some() {
        problems.push(doc.problem(
            "app.env",
            "app.env is set but there is no app.command (or `-- CMD`) to give it to",
        ));
    }
    let stop_timeout_set = raw.app.stop_timeout.is_some();
    let lifecycle = lifecycle::app(
        &raw.app,
        raw.app.address.as_ref(),
        command.is_some(),
        doc,
        problems,
    );
    let reload = lifecycle::reloads(raw.reload, command.is_some(), doc, problems);
    let protocol = raw.app.protocol.unwrap_or_default();
    if protocol == AppProtocol::Grpc && matches!(raw.app.address, Some(Address::Unix(_))) {
        problems.push(doc.problem(
            "app.protocol",
            "a gRPC app is reached on TCP: expected app.address host:port with protocol grpc, found a unix socket",
        ));
    }
    let app = AppConfig {
        address: raw.app.address,
        protocol,
        command,
        env: raw.app.env.unwrap_or_default(),
        lifecycle,
    };
    if !cfg!(feature = "proxy") && !raw.listeners.is_empty() {
        problems.push(doc.problem(
            "listeners",
            "listeners need the proxy module, and this binary was built without it (cargo feature `proxy`)",
        ));
    }
    let mesh_sockets = raw.mesh.as_ref().map_or(0, |m| {
        usize::from(app.address.is_some()) + usize::from(m.outbound_address.is_some())
    });
    let sockets = raw.listeners.len() + usize::from(raw.bridge.is_some()) + mesh_sockets;
    let (mut listeners, mut clusters) = proxy::validate(
        raw.listeners,
        raw.clusters,
        app.address.as_ref(),
        sockets,
        doc,
        problems,
    );
    for name in clusters.keys() {
        if name.starts_with(mesh::PEER_CLUSTER_PREFIX) {
            problems.push(doc.problem(
                &format!("clusters.{name}"),
                format!(
                    "cluster names starting with {:?} are the mesh's peers' (mesh:); rename this cluster",
                    mesh::PEER_CLUSTER_PREFIX
                ),
            ));
        }
    }
    // A gRPC app is reached over HTTP/2 (h2c) by the inbound listeners.
    if app.protocol == AppProtocol::Grpc
        && let Some(c) = clusters.get_mut(proxy::APP_CLUSTER)
    {
        c.http2 = true;
    }

    let shutdown_grace = raw
        .runtime
        .shutdown_grace
        .unwrap_or(raw::DEFAULT_SHUTDOWN_GRACE);
    if shutdown_grace.get().is_zero()
        || shutdown_grace.get() > std::time::Duration::from_secs(86_400)
    {
        problems.push(doc.problem(
            "runtime.shutdown_grace",
            format!("expected a duration from 1ms to 24h, found {shutdown_grace}"),
        ));
    }
    let drain_delay = raw.runtime.drain_delay.unwrap_or(Duration::from_secs(0));
    if drain_delay >= shutdown_grace && !drain_delay.get().is_zero() {
        problems.push(doc.problem(
            "runtime.drain_delay",
            format!(
                "expected less than runtime.shutdown_grace ({shutdown_grace}), found {drain_delay}: nothing would be left to drain in"
            ),
        ));
    }
    let upgrade_socket = match raw.runtime.upgrade_socket.as_deref() {
        None => None,
        Some("off") => Some(UpgradeSocket::Off),
        Some("") => {
            problems.push(doc.problem(
                "runtime.upgrade_socket",
                "expected a path, or `off`, found an empty string",
            ));
            None
        }
        Some(p) => Some(UpgradeSocket::Path(PathBuf::from(p))),
    };
    let upgrade_timeout = raw
        .runtime
        .upgrade_timeout
        .unwrap_or(Duration::from_secs(60));
    if upgrade_timeout.get() < std::time::Duration::from_secs(1)
        || upgrade_timeout.get() > std::time::Duration::from_secs(3600)
    {
        problems.push(doc.problem(
            "runtime.upgrade_timeout",
            format!("expected a duration from 1s to 1h, found {upgrade_timeout}"),
        ));
    }
    let mesh = raw.mesh.and_then(|m| mesh::validate(m, doc, problems));
    if let Some(m) = &mesh {
        let added = m.listeners(
            app.address.is_some(),
            proxy::default_max_connections(sockets),
        );
        for (i, other) in listeners.iter().enumerate() {
            if [mesh::LISTENER, mesh::OUTBOUND_LISTENER, mesh::PEERS_LABEL]
                .contains(&other.name.as_str())
            {
                problems.push(doc.problem(
                    &format!("listeners[{i}].name"),
                    format!(
                        "the name {:?} is the mesh's (mesh:); rename this listener",
                        other.name
                    ),
                ));
            }
        }
        for l in &added {
            for (i, other) in listeners.iter().enumerate() {
                if other.address == l.address
                    && !matches!(l.address, Address::Tcp(a) if a.port() == 0)
                {
                    let key = if l.name == mesh::LISTENER {
                        "mesh.address"
                    } else {
                        "mesh.outbound_address"
                    };
                    problems.push(doc.problem(
                        key,
                        format!(
                            "the address {} is already used by {}",
                            l.address,
                            doc.written(&format!("listeners[{i}]"))
                        ),
                    ));
                }
            }
        }
        listeners.extend(added);
        if raw
            .bridge
            .as_ref()
            .is_some_and(|b| b.name_resolution.is_some())
        {
            problems.push(doc.problem(
                "bridge.name_resolution",
                "mesh: resolves app ids (mesh.peer_dns, over mutual TLS); remove bridge.name_resolution",
            ));
        }
    }
    let telemetry = telemetry::validate(&raw.telemetry, doc, problems);
    let bridge = raw
        .bridge
        .and_then(|b| bridge::validate(b, &service, doc, problems));
    let logs = raw.logs.and_then(|l| {
        let access_log = telemetry.access_log.is_some();
        logs::validate(l, app.command.is_some(), access_log, env, doc, problems)
    });
    let mut app = app;
    if stop_timeout_set {
        let app_watched = app.command.is_some() || app.lifecycle.probe.is_some();
        if app_watched && app.lifecycle.stop_timeout >= shutdown_grace {
            problems.push(doc.problem(
            "app.stop_timeout",
            format!(
                "expected less than runtime.shutdown_grace ({shutdown_grace}), found {}: the inbound drain gets the difference",
                app.lifecycle.stop_timeout
            ),
        ));
        }
    } else {
        // A third of a short grace period, so that the inbound drain always gets most of it.
        app.lifecycle.stop_timeout = app
            .lifecycle
            .stop_timeout
            .min(Duration(shutdown_grace.get() / 3));
    }
    Config {
        source: source.file.clone(),
        service,
        admin: AdminConfig {
            address: admin_address,
        },
        runtime: RuntimeConfig {
            worker_threads,
            shutdown_grace,
            watch_config: raw.runtime.watch_config.unwrap_or(true),
            drain_delay,
            upgrade_socket,
            upgrade_timeout,
            code_pages,
        },
        log: LogConfig {
            level,
            format: raw.log.format.unwrap_or_default(),
        },
        app,
        listeners,
        clusters,
        reload,
        telemetry,
        bridge,
        logs,
        mesh,
        tls: TlsGlobalConfig {
            expiry_warning: raw
                .tls
                .expiry_warning
                .unwrap_or(tls::DEFAULT_EXPIRY_WARNING),
        },
    }
}

impl Config {
    /// The embedded defaults (what `outrigger run` uses without `-c`).
    pub fn defaults() -> Config {
        load(&Source::default(), &BTreeMap::new()).expect("the defaults are valid")
    }

    /// The default connection cap of each socket that accepts connections (each proxy
    /// listener, and the bridge), from the descriptors the process may open
    /// ([`proxy::default_max_connections`]).
    pub fn connection_share(&self) -> usize {
        proxy::default_max_connections(self.listeners.len() + usize::from(self.bridge.is_some()))
    }

    /// The effective config as YAML, secrets redacted (for `outrigger check`).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Parses a log filter such as `info` or `info,outrigger::admin=debug` (`log.level`, and
/// `PUT /log-level` through `telemetry::log`).
pub fn parse_log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if spec.trim().is_empty() {
        return Err("the filter is empty".into());
    }
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(spec)
        .map_err(|e| e.to_string())
}

/// Parses `key=value` as given to `--set`.
pub fn parse_set(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, found {s:?}"))?;
    if k.trim().is_empty() {
        return Err(format!("expected key=value with a key, found {s:?}"));
    }
    Ok((k.trim().to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_text(
        text: &str,
        env: &[(&str, &str)],
        sets: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let source = Source {
            file: Some(f.path().to_path_buf()),
            sets: sets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            app_command: None,
        };
        load(&source, &env)
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::defaults();
        assert_eq!(c.service, "app");
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:9901");
        assert_eq!(c.runtime.worker_threads, 1);
        assert_eq!(c.runtime.shutdown_grace.get().as_secs(), 30);
        assert_eq!(c.log.level, "info");
        assert!(c.app.command.is_none() && c.listeners.is_empty() && c.clusters.is_empty());
    }

    #[test]
    fn precedence_is_file_then_env_then_set() {
        let c = load_text(
            "service: from-file\nadmin:\n  address: 127.0.0.1:1\n",
            &[
                ("OUTRIGGER_SERVICE", "from-env"),
                ("OUTRIGGER_ADMIN_ADDRESS", "127.0.0.1:2"),
            ],
            &[("admin.address", "127.0.0.1:3")],
        )
        .unwrap();
        assert_eq!(c.service, "from-env");
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:3");
    }

    #[test]
    fn semantic_problems_are_located() {
        let err = load_text(
            "service: 'bad name'\nruntime:\n  worker_threads: 0\nlog:\n  level: 'not a [level'\n",
            &[],
            &[],
        )
        .unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].contains(":1:10: service: expected a name"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains(":3:19: runtime.worker_threads: expected a number of threads"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains(":5:10: log.level: expected a log filter"),
            "{lines:#?}"
        );
    }

    /// The problems of `text`, each as `line:column: path: message` (file name cut).
    fn problems_of(text: &str) -> Vec<String> {
        let err = load_text(text, &[], &[]).unwrap_err();
        err.problems
            .iter()
            .map(|p| {
                let line = p.to_string();
                line.split_once(':')
                    .map_or(line.clone(), |(_, rest)| rest.to_string())
            })
            .collect()
    }

    #[cfg(feature = "logs")]
    #[test]
    fn a_log_sink_tls_goes_by_the_parsed_scheme() {
        let lines = problems_of(
            "logs:\n  sources: [{files: /var/log/*.log}]\n  sinks:\n    - http: HTTP://es:9200/logs\n      tls: {ca: /nonexistent/ca.pem}\n    - http: HTTPS://es:9200/logs\n      tls: {server_name: es}\n",
        );
        assert_eq!(
            lines,
            ["5:7: logs.sinks[0].tls: tls needs an https:// URL, found http://"],
        );
    }

    #[cfg(feature = "logs")]
    #[test]
    fn credentials_in_a_log_sink_url_are_refused_without_being_shown() {
        let lines = problems_of(
            "logs:\n  sources: [{files: /var/log/*.log}]\n  sinks:\n    - http: https://user:s3cret@es:9200/logs\n    - elasticsearch: http://elastic:s3cret@es:9200\n",
        );
        assert_eq!(
            lines,
            [
                "4:13: logs.sinks[0].http: expected no credentials in the URL (they would show in /config and logs); put them in headers, e.g. authorization",
                "5:22: logs.sinks[1].elasticsearch: expected no credentials in the URL (they would show in /config and logs); put them in headers, e.g. authorization",
            ],
        );
    }

    #[test]
    fn a_listener_problem_hides_no_other() {
        let lines = problems_of(
            "bogus: 1\nlisteners:\n  - name: out\n    address: nope\n    direction: outbound\n    routes:\n      - cluster: api\nclusters:\n  api:\n    endpoints: [127.0.0.1:1, not-an-endpoint]\n",
        );
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].starts_with("1:1: bogus: unknown field"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("4:14: listeners[0].address: invalid value"),
            "{lines:#?}"
        );
        assert!(
            lines[2].starts_with("10:30: clusters.api.endpoints[1]: invalid value"),
            "{lines:#?}"
        );
    }

    /// A bad node is removed so the rest can be checked: what its absence causes is not a
    /// second problem (an endpoint list emptied by its one bad entry, an invalid `direction`
    /// read as the default, inbound, which needs `app.address`).
    #[test]
    fn a_removed_bad_node_adds_no_consequences() {
        let lines = problems_of(
            "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: sideways\n    routes:\n      - cluster: api\nclusters:\n  api:\n    endpoints: [not-an-endpoint]\n  db:\n    dns: 5\n",
        );
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].starts_with("4:16: listeners[0].direction: unknown variant"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("9:17: clusters.api.endpoints[0]: invalid value"),
            "{lines:#?}"
        );
        assert!(
            lines[2].starts_with("11:10: clusters.db.dns: invalid type"),
            "{lines:#?}"
        );
        // Still said when it is the user's own doing.
        let lines = problems_of("clusters:\n  api:\n    endpoints: []\n");
        assert!(
            lines[0].contains("expected at least one endpoint"),
            "{lines:#?}"
        );
    }

    /// A later check's problem points at the entry the user wrote, not at its index once a bad
    /// entry before it was removed.
    #[test]
    fn problems_after_a_removed_entry_point_at_the_entry_written() {
        let lines = problems_of(
            "listeners:\n  - address: 127.0.0.1:0\n  - name: b\n    address: 127.0.0.1:0\n    direction: outbound\n    protocol: tcp\n",
        );
        assert_eq!(
            lines,
            [
                "2:5: listeners[0]: missing field `name`",
                "3:5: listeners[1]: an outbound tcp listener needs a `cluster` to send bytes to",
            ]
        );
        let lines = problems_of(
            "listeners:\n  - address: 127.0.0.1:0\n  - name: a\n    address: 127.0.0.1:0\n    direction: outbound\n  - name: a\n    address: 127.0.0.1:0\n    direction: outbound\n",
        );
        assert_eq!(
            lines,
            [
                "2:5: listeners[0]: missing field `name`",
                "6:11: listeners[2].name: the name \"a\" is already used by listeners[1]",
            ]
        );
    }

    #[test]
    fn max_request_body_is_a_positive_size() {
        let listener = |limit: &str| {
            format!(
                "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    limits:\n      max_request_body: {limit}\n    routes:\n      - cluster: api\nclusters:\n  api:\n    endpoints: [127.0.0.1:1]\n"
            )
        };
        let limit = |text: &str| {
            load_text(text, &[], &[]).unwrap().listeners[0]
                .limits
                .max_request_body
        };
        assert_eq!(limit(&listener("10MiB")), Some(10 << 20));
        assert_eq!(limit(&listener("4096")), Some(4096));
        assert_eq!(
            limit(
                "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: api\nclusters:\n  api:\n    endpoints: [127.0.0.1:1]\n"
            ),
            None,
            "unlimited by default"
        );
        assert_eq!(
            problems_of(&listener("0")),
            [
                "6:25: listeners[0].limits.max_request_body: expected a positive size (like 10MiB), found 0; leave the key out for no limit"
            ]
        );
        let lines = problems_of(&listener("12 parsecs"));
        assert!(
            lines[0].starts_with("6:25: listeners[0].limits.max_request_body: invalid value"),
            "{lines:#?}"
        );
    }

    #[test]
    fn type_errors_name_no_rust_types() {
        let lines = problems_of("listeners: [nope]\n");
        assert_eq!(
            lines,
            ["1:13: listeners[0]: invalid type: string \"nope\", expected a mapping"]
        );
    }

    #[test]
    fn type_and_semantic_problems_are_reported_together() {
        let err = load_text(
            "admin:\n  colour: x\nruntime:\n  worker_threads: 0\n",
            &[],
            &[],
        )
        .unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].contains("admin.colour: unknown field"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("runtime.worker_threads: expected a number of threads"),
            "{lines:#?}"
        );
        // A bad required value is reported once, not again as "missing field".
        let err =
            load_text("listeners:\n  - name: x\n    address: nowhere\n", &[], &[]).unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains(":3:14: listeners[0].address: invalid value"),
            "{lines:#?}"
        );
    }

    #[cfg(feature = "logs")]
    #[test]
    fn an_elasticsearch_url_with_filter_path_is_refused_at_its_line() {
        let err = load_text(
            "logs:\n  sources: [{files: /var/log/*.log}]\n  sinks:\n    - elasticsearch: http://127.0.0.1:9200/_bulk?filter_path=items.*.error\n",
            &[],
            &[],
        )
        .unwrap_err();
        let lines: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains(":4:") && lines[0].contains("filter_path is not supported"),
            "{lines:#?}"
        );
        assert!(load_text("logs:\n  sources: [{files: /var/log/*.log}]\n  sinks:\n    - elasticsearch: http://127.0.0.1:9200/_bulk?refresh=false\n", &[], &[]).is_ok());
    }

    #[cfg(feature = "logs")]
    #[test]
    fn a_log_source_with_both_app_and_files_or_neither_is_refused_at_its_line() {
        let lines = problems_of(
            "logs:\n  sources:\n    - {app: stdio, files: /var/log/*.log}\n    - {name: nothing}\n  sinks: [{stdout: true}]\n",
        );
        let want = "expected exactly one of app: stdio, files: GLOB or access_log: true";
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("3:") && l.contains(want)),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("4:") && l.contains(want)),
            "{lines:#?}"
        );
    }

    #[test]
    fn overrides_are_blamed_even_for_new_keys() {
        let err = load_text("service: a\n", &[], &[("foo.bar", "1")]).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(
            err.problems[0]
                .to_string()
                .starts_with("--set foo.bar: foo: unknown field"),
            "{}",
            err.problems[0]
        );
        let c = load_text("", &[("OUTRIGGER_SERVICE", "")], &[]).unwrap();
        assert_eq!(c.service, "app", "an empty variable is unset");
        let err = load_text("runtime: { shutdown_grace: 0s }\n", &[], &[]).unwrap_err();
        assert!(
            err.problems[0]
                .to_string()
                .contains("expected a duration from 1ms to 24h")
        );
    }

    #[test]
    fn bad_override_is_named() {
        let err = load_text("", &[("OUTRIGGER_WORKER_THREADS", "many")], &[]).unwrap_err();
        assert_eq!(
            err.problems[0].to_string(),
            "env OUTRIGGER_WORKER_THREADS: runtime.worker_threads: invalid type: string \"many\", expected usize"
        );
    }

    #[test]
    #[cfg(not(feature = "bridge"))]
    fn a_bridge_section_needs_the_bridge_module() {
        let err = load_text("bridge:\n", &[], &[]).unwrap_err().to_string();
        assert!(err.contains("cargo feature `bridge`"), "{err}");
    }

    #[test]
    #[cfg(feature = "bridge")]
    fn bridge_section() {
        assert!(
            load_text("service: a\n", &[], &[])
                .unwrap()
                .bridge
                .is_none()
        );
        let c = load_text("service: a\nbridge:\n", &[("DAPR_API_TOKEN", "t")], &[]).unwrap();
        let b = c.bridge.expect("an empty section turns the bridge on");
        assert_eq!(b.app_id, "a");
        assert_eq!(b.address.to_string(), "127.0.0.1:3500");
        assert_eq!(b.max_body, 4 << 20);
        assert_eq!(b.api_token.unwrap().expose(), "t");
        let err = load_text(
            "bridge:\n  app_id: a/b\n  max_body: 4 parsecs\n  resources: /nonexistent\n  colour: red\n",
            &[],
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            ":2:11: bridge.app_id: expected an app id",
            ":3:13: bridge.max_body: invalid value",
            ":4:14: bridge.resources: expected a directory",
            ":5:3: bridge.colour: unknown field",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    #[test]
    fn set_parsing() {
        assert_eq!(parse_set("a.b=c=d").unwrap(), ("a.b".into(), "c=d".into()));
        assert!(parse_set("nokey").is_err());
        assert!(parse_set("=v").is_err());
    }
}
