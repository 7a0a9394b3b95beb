//! The config file as written: serde structs that mirror the YAML, with unknown keys refused
//! and every default in one place. `config::load` turns this into the typed [`super::Config`].
//!
//! Defaults are named consts with the reason they are what they are; `docs/configuration.md`
//! lists the same values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::types::{Address, Duration, TcpAddress};

/// The service name when none is configured.
pub const DEFAULT_SERVICE: &str = "app";
/// Loopback only: the admin API can stop the sidecar and change its log level.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";
/// A sidecar shares its pod with the app; one core is enough for most of them and keeps the
/// sidecar from competing with the app for CPU.
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// The Kubernetes default `terminationGracePeriodSeconds`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Informational events only; `debug` per module when needed through `PUT /log-level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub service: Option<String>,
    pub admin: RawAdmin,
    pub runtime: RawRuntime,
    pub log: RawLog,
    pub app: RawApp,
    pub listeners: Vec<RawListener>,
    pub clusters: BTreeMap<String, RawCluster>,
    pub reload: Vec<RawReload>,
    pub tls: RawTlsGlobal,
    pub telemetry: super::telemetry::RawTelemetry,
    /// The Dapr-compatible API; present (even empty: `bridge:`) turns the bridge on.
    #[serde(deserialize_with = "present")]
    pub bridge: Option<RawBridge>,
    /// The log agent; on when present.
    #[serde(deserialize_with = "present")]
    pub logs: Option<super::logs::RawLogs>,
    /// This workload's identity in a mesh of sidecars; on when present.
    #[serde(deserialize_with = "present")]
    pub mesh: Option<super::mesh::RawMesh>,
}

/// A section that is on when its key is there, even with no value (`bridge:` is YAML null).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(|v| Some(v.unwrap_or_default()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBridge {
    /// Where the Dapr HTTP API listens (`host:port` or `unix:/path`).
    pub address: Option<Address>,
    /// Where Dapr's gRPC API listens too (it is always served on `address` as well).
    pub grpc_address: Option<Address>,
    /// `host:port` of an app id without a cluster of its name: `{app_id}` and `{namespace}`
    /// are replaced.
    pub name_resolution: Option<String>,
    /// A directory of Dapr Component (and Subscription) YAML files.
    pub resources: Option<PathBuf>,
    /// The Dapr app id (default: `service`).
    pub app_id: Option<String>,
    /// Required as `dapr-api-token` on every call (default: env DAPR_API_TOKEN).
    pub api_token: Option<super::Secret>,
    /// Sent to the app as `dapr-api-token` on the calls the bridge makes to it.
    pub app_api_token: Option<super::Secret>,
    /// The largest request body accepted.
    pub max_body: Option<super::types::ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTlsGlobal {
    /// Warn in the log when a certificate expires sooner than this.
    pub expiry_warning: Option<Duration>,
}

/// TLS termination on a listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// More certificates, chosen by the client's SNI.
    #[serde(default)]
    pub sni: Vec<RawSniCert>,
    /// Verify client certificates against this PEM bundle (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: Option<ClientCertMode>,
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSniCert {
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether a client certificate is required once `client_ca` is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    #[default]
    Required,
    /// Verified when sent; a client without one is let through without an identity.
    Optional,
}

/// TLS origination on a cluster.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClientTls {
    /// PEM bundle to verify the upstream with; default: the system's roots.
    pub ca: Option<PathBuf>,
    /// SNI and the name the certificate must carry (default: the DNS host, else the IP).
    pub server_name: Option<String>,
    /// Client certificate for upstream mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The identity the upstream must present (SPIFFE ID or DNS name; `prefix*`).
    pub identity: Option<String>,
    pub min_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub address: Option<TcpAddress>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    pub worker_threads: Option<usize>,
    pub shutdown_grace: Option<Duration>,
    /// Reload Outrigger's own config file when it changes (besides SIGHUP and `POST /reload`).
    pub watch_config: Option<bool>,
    /// Keep accepting inbound traffic this long after a stop begins (with `/ready` at 503).
    pub drain_delay: Option<Duration>,
    /// Where a new process (`outrigger run --upgrade`) asks for the listening sockets; `off`.
    pub upgrade_socket: Option<String>,
    /// How long a new process may take to start before the old one gives up on it.
    pub upgrade_timeout: Option<Duration>,
    /// What happens to start-up's code pages (src/memory.rs): `unmap` (default), `drop`, `keep`.
    pub code_pages: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

/// How Outrigger writes its own diagnostics (to stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApp {
    /// Where the app listens: inbound listeners forward here.
    pub address: Option<Address>,
    /// What the app speaks at that address: `http` or `grpc` (Dapr's `--app-protocol`).
    pub protocol: Option<super::AppProtocol>,
    /// The app to run and supervise: program and arguments. `outrigger run -- CMD` sets it too.
    pub command: Option<Vec<String>>,
    /// Extra environment variables for the app.
    pub env: Option<std::collections::BTreeMap<String, String>>,
    /// How Outrigger decides the app is ready.
    pub probe: Option<RawProbe>,
    pub restart: Option<RestartPolicy>,
    /// Give up (and exit with the app's code) after this many restarts in a row.
    pub max_restarts: Option<u32>,
    /// What the app gets on a graceful stop.
    pub stop_signal: Option<String>,
    /// Time kept for the app to exit after inbound traffic has drained.
    pub stop_timeout: Option<Duration>,
    /// Signals sent to Outrigger that are passed on to the app.
    pub forward_signals: Option<Vec<String>>,
    /// How long inbound requests wait for the app to be ready before a 503.
    pub hold_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProbe {
    pub enabled: Option<bool>,
    /// An HTTP GET on this path at app.address; 2xx and 3xx pass.
    pub http: Option<String>,
    /// A TCP (or unix socket) connect to this address.
    pub tcp: Option<Address>,
    /// A command; exit status 0 passes.
    pub exec: Option<Vec<String>>,
    /// A gRPC health call at app.address: `dapr` (Dapr's AppCallbackHealthCheck) or `health`
    /// (the standard grpc.health.v1.Health/Check).
    pub grpc: Option<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub initial_delay: Option<Duration>,
    pub failure_threshold: Option<u32>,
    pub success_threshold: Option<u32>,
}

/// What happens when the supervised app exits on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// The sidecar stops and exits with the app's code (the container's own policy decides).
    #[default]
    Never,
    /// Restart after a non-zero exit or a signal; a clean exit stops the sidecar.
    OnFailure,
    /// Restart whatever the exit.
    Always,
}

/// One `reload:` entry: watch a file or directory, act when its content changes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    #[serde(default)]
    pub name: Option<String>,
    pub watch: PathBuf,
    pub action: RawAction,
    #[serde(default)]
    pub debounce: RawDebounce,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAction {
    pub signal: Option<String>,
    pub webhook: Option<RawWebhook>,
    pub restart: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub expect: Option<u16>,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// https: the CA bundle to verify the server with (default: the system's roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDebounce {
    pub quiet: Option<Duration>,
    pub max: Option<Duration>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic to the app.
    #[default]
    Inbound,
    /// Traffic from the app to clusters.
    Outbound,
}

impl Direction {
    /// The name metric labels, access log lines and spans use.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (h2c prior knowledge, detected per connection).
    #[default]
    Http,
    /// Opaque bytes, copied both ways.
    Tcp,
}

/// Which server speaks HTTP/2 on an HTTP listener (`http2_server`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Http2Server {
    /// hyper's (and the `h2` crate's) server, kept as a fallback.
    Hyper,
    /// Outrigger's own (`proxy::h2`), the default.
    #[default]
    Outrigger,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lb {
    #[default]
    RoundRobin,
    /// Power of two choices, by peak-EWMA latency times in-flight requests.
    P2cEwma,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub address: Address,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub protocol: Protocol,
    /// HTTP listeners: which server speaks HTTP/2 (default Outrigger's own).
    #[serde(default)]
    pub http2_server: Option<Http2Server>,
    /// Where a `tcp` listener sends bytes (inbound default: the app).
    #[serde(default)]
    pub cluster: Option<String>,
    /// Unix socket permissions, octal as a string ("0600").
    #[serde(default)]
    pub socket_mode: Option<String>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub tls: Option<RawServerTls>,
    /// Peer identities allowed in (needs client certificates); default deny once set.
    #[serde(default)]
    pub authz: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub header_read_timeout: Option<Duration>,
    pub max_header_bytes: Option<usize>,
    pub idle_timeout: Option<Duration>,
    pub max_requests_in_flight: Option<usize>,
    pub rate_limit: Option<RawRateLimit>,
    pub min_body_rate: Option<RawMinBodyRate>,
    pub max_request_body: Option<super::types::ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMinBodyRate {
    pub bytes_per_second: u64,
    #[serde(default)]
    pub grace: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRoute {
    /// The route's name in metrics and logs (default: its index).
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: RawMatch,
    pub cluster: Option<String>,
    pub timeout: Option<Duration>,
    pub retry: Option<RawRetry>,
    pub request_headers: RawHeaderOps,
    pub response_headers: RawHeaderOps,
    pub rewrite: Option<RawRewrite>,
    /// Peer identities allowed on this route; default deny once set.
    pub authz: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMatch {
    pub host: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub method: Option<String>,
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Required; checked in validation so that its absence is reported with the rest.
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub on: Vec<String>,
    #[serde(default)]
    pub backoff: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHeaderOps {
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRewrite {
    pub path_prefix: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCluster {
    pub endpoints: Option<Vec<Address>>,
    /// `host:port`, resolved (A and AAAA) every `refresh`.
    pub dns: Option<String>,
    /// A YAML file with `endpoints: [...]`, re-read when it changes.
    pub file: Option<PathBuf>,
    pub refresh: Option<Duration>,
    pub lb: Option<Lb>,
    pub connect_timeout: Option<Duration>,
    pub timeout: Option<Duration>,
    pub http2: Option<bool>,
    pub pool_idle_timeout: Option<Duration>,
    pub max_requests_in_flight: Option<usize>,
    pub outlier: Option<RawOutlier>,
    pub retry_budget: Option<RawRetryBudget>,
    pub tls: Option<RawClientTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutlier {
    pub consecutive_failures: Option<u32>,
    pub ejection_time: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetryBudget {
    pub ratio: Option<f64>,
    pub min_per_second: Option<u32>,
}
