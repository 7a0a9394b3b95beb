//! The bridge: Dapr's HTTP API v1.0 on `bridge.address` (default 127.0.0.1:3500, or a unix
//! socket), so apps written against a Dapr SDK run unchanged. Requests come in from the app;
//! state goes to the configured stores (in-memory, SQLite, Redis, PostgreSQL), locks to
//! `lock.redis`, secrets come from local
//! stores, invocations leave through the proxy's clusters (or to the local app), and pub/sub
//! is served by [`pubsub`] (brokers, subscriptions, deliveries to the app), whose routes are
//! merged into [`router`].
//!
//! Built only when the config has a `bridge:` section: nothing runs otherwise. The server is
//! axum on hyper-util's auto builder (HTTP/1.1 and h2c). It drains in the *last* stop phase,
//! like outbound listeners: the app can still save state and publish while it shuts down.

pub mod binding_postgresql;
pub mod binding_rabbitmq;
pub mod binding_redis;
pub mod binding_routes;
pub mod bindings;
pub mod components;
pub mod configuration;
pub mod configuration_postgresql;
pub mod configuration_routes;
pub mod cron;
pub mod env;
pub mod error;
pub mod field_case;
pub mod grpc;
pub mod health;
pub mod input_bindings;
pub mod invoke;
pub mod isolation;
pub mod lock;
pub mod lock_routes;
pub mod not_implemented;
pub mod ops;
pub mod postgresql_tls;
pub mod pubsub;
pub mod routes;
pub mod secrets;
pub mod state;
pub mod state_postgresql;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::config::bridge::{BridgeConfig, DEFAULT_SOCKET_MODE};
use crate::config::{Address, Config};
use crate::proxy::listener::Bound;
use crate::runtime::{AppGate, Control, Module, ModuleContext, ModuleFuture};
use crate::telemetry::metrics::{BridgeApiLabels, BridgeMetrics, BridgeRequestLabels};
use components::{Component, RawDocument};

/// The header that carries the API token (both directions).
pub const TOKEN_HEADER: &str = "dapr-api-token";
/// Connections served at once; more wait in the listen backlog. An app's SDK keeps a handful:
/// without a cap, silent sockets to the bridge exhausted the process's descriptors and took
/// the proxy's listeners down with them.
pub const MAX_CONNECTIONS: usize = 1024;
/// daprd's `ReadHeaderTimeout`: a request head must arrive within this, and a connection that
/// sends no byte at all is closed after it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that moves no byte for this long, or whose client reads nothing for this long,
/// is closed (after one to two periods).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A state store component, opened.
pub struct StateStore {
    pub component: Component,
    pub store: state::Store,
    pub prefix: state::KeyPrefix,
}

/// Everything a bridge request handler (and pub/sub) can reach.
pub struct BridgeState {
    pub config: BridgeConfig,
    /// Where the app listens (`app.address`): invocations of our own app id go there.
    pub app_address: Option<Address>,
    /// What the app speaks there (`app.protocol`).
    pub app_protocol: crate::config::AppProtocol,
    /// The components in scope for this app id, in file order (less the skipped ones).
    pub components: Vec<Component>,
    /// Components that failed to open and were skipped (`spec.ignoreErrors: true`).
    pub skipped: Vec<components::Skipped>,
    /// Raw `Subscription` documents from the resources directory, for pub/sub.
    pub subscription_documents: Vec<RawDocument>,
    pub state_stores: HashMap<String, StateStore>,
    pub secret_stores: HashMap<String, secrets::SecretStore>,
    /// `lock.*` components, opened (they connect on first use).
    pub lock_stores: HashMap<String, lock::LockStore>,
    /// `configuration.*` components, opened (they connect on first use), and their watches.
    pub configuration_stores: HashMap<String, configuration::ConfigurationStore>,
    pub configuration_watches: configuration::Watches,
    /// Output binding components (`bindings.*`).
    pub output_bindings: HashMap<String, bindings::OutputBinding>,
    /// Input binding components (`bindings.cron`), started with pub/sub once the app is ready.
    pub input_bindings: Vec<Arc<input_bindings::InputBinding>>,
    /// Where input binding events go (`None`: no app address on TCP).
    input_target: Option<input_bindings::Target>,
    /// Open once the app's probe passes: pub/sub waits on it before `GET /dapr/subscribe`,
    /// invocations of the local app wait on it up to `app.hold_timeout`.
    pub app_gate: AppGate,
    pub hold_timeout: Duration,
    /// Shutdown requests (`POST /v1.0/shutdown`) go here.
    pub control: mpsc::Sender<Control>,
    /// True while the server runs (`/v1.0/healthz`).
    pub ready: AtomicBool,
    /// `PUT /v1.0/metadata/{key}` values.
    pub extended: Mutex<BTreeMap<String, String>>,
    /// What the last probe of each networked component found ([`health`]).
    pub health: health::Health,
    /// Pub/sub: publish routes, subscriptions and deliveries (empty, starting nothing, when
    /// no pubsub component is configured).
    pub pubsub: Arc<pubsub::PubSub>,
    /// Pub/sub's background work was started (once, even if the module restarts).
    pubsub_started: AtomicBool,
    pub clusters: invoke::Clusters,
    /// `bridge.name_resolution`, or `mesh:`: app ids without a cluster.
    pub resolver: Option<Arc<crate::proxy::cluster::name_resolution::NameResolution>>,
    /// The app's `AppCallback` service, when `app.protocol` is grpc: invocations of our own
    /// app id go there.
    pub grpc_app: Option<grpc::app::GrpcApp>,
    pub metrics: BridgeMetrics,
    /// Connections served at once, both sockets together: [`MAX_CONNECTIONS`], or the
    /// bridge's share of the descriptors when they are fewer ([`Config::connection_share`]).
    pub max_connections: usize,
}

impl BridgeState {
    /// Opens the stores of every component in scope, for `config`'s `bridge:` section and with
    /// what preflight built from it. Fails (before anything starts) when one cannot be opened,
    /// naming its file and line.
    pub fn new(
        config: &Config,
        prepared: components::Prepared,
        gate: AppGate,
        control: mpsc::Sender<Control>,
        clusters: invoke::Clusters,
        metrics: BridgeMetrics,
        pubsub_metrics: crate::telemetry::metrics::PubSubMetrics,
    ) -> Result<BridgeState> {
        let bridge = config
            .bridge
            .as_ref()
            .context("the config has no bridge section")?;
        let components::Prepared {
            resources,
            brokers,
            declarative,
        } = prepared;
        let mut components: Vec<Component> = resources
            .components
            .iter()
            .filter(|c| c.in_scope(&bridge.app_id))
            .cloned()
            .collect();
        let mut skipped: Vec<components::Skipped> = resources.skipped.clone();
        let mut state_stores = HashMap::new();
        let mut secret_stores = HashMap::new();
        let mut lock_stores = HashMap::new();
        let mut configuration_stores = HashMap::new();
        let mut output_bindings = HashMap::new();
        let mut input_bindings = Vec::new();
        let mut failed = Vec::new();
        for (i, c) in components.iter().enumerate() {
            let opened = match c.block() {
                "state" => state::Store::open(c).map(|store| {
                    state_stores.insert(
                        c.name.clone(),
                        StateStore {
                            prefix: state::KeyPrefix::from_component(c, &bridge.app_id),
                            component: c.clone(),
                            store,
                        },
                    );
                }),
                "secretstores" => secrets::SecretStore::new(c).map(|store| {
                    secret_stores.insert(c.name.clone(), store);
                }),
                "lock" => lock::LockStore::open(c, &bridge.app_id).map(|store| {
                    lock_stores.insert(c.name.clone(), store);
                }),
                "configuration" => configuration::ConfigurationStore::open(c).map(|store| {
                    configuration_stores.insert(c.name.clone(), store);
                }),
                "bindings" if input_bindings::INPUT_TYPES.contains(&c.kind.as_str()) => {
                    input_bindings::InputBinding::open(c).map(|b| {
                        input_bindings.extend(b.map(Arc::new));
                    })
                }
                "bindings" if c.kind == "bindings.mqtt3" => bindings::mqtt_parts(c, &bridge.app_id)
                    .and_then(|(broker, topic)| {
                        use pubsub::broker::Broker as _;
                        broker.set_drop_counter(pubsub_metrics.mqtt_dropped_counter(&c.name));
                        let input =
                            input_bindings::InputBinding::from_broker(c, broker.clone(), &topic)?;
                        input_bindings.extend(input.map(Arc::new));
                        output_bindings.insert(
                            c.name.clone(),
                            bindings::OutputBinding::Mqtt { broker, topic },
                        );
                        Ok(())
                    }),
                "bindings" if c.kind == "bindings.rabbitmq" => {
                    binding_rabbitmq::RabbitBinding::open(c).and_then(|b| {
                        let b = Arc::new(b);
                        let queue = b.queue().to_string();
                        let input =
                            input_bindings::InputBinding::from_broker(c, b.clone(), &queue)?;
                        input_bindings.extend(input.map(Arc::new));
                        output_bindings.insert(c.name.clone(), bindings::OutputBinding::Rabbit(b));
                        Ok(())
                    })
                }
                "bindings" => bindings::OutputBinding::open(c).map(|b| {
                    output_bindings.insert(c.name.clone(), b);
                }),
                _ => Ok(()),
            };
            match opened {
                Ok(()) => {}
                // `spec.ignoreErrors`: logged, skipped, shown in `/v1.0/metadata`.
                Err(e) if c.ignore_errors => failed.push((i, e)),
                Err(e) => anyhow::bail!("{}: component {:?}: {e}", c.location(), c.name),
            }
        }
        for (i, e) in failed.into_iter().rev() {
            let c = components.remove(i);
            skipped.push(components::Skipped::new(&c, e));
        }
        let app_address = match &config.app.address {
            Some(Address::Tcp(a)) => Some(a.to_string()),
            Some(Address::Unix(p)) => {
                if components.iter().any(|c| c.block() == "pubsub") {
                    tracing::warn!(app = %p.display(), "pub/sub deliveries need the app on TCP (app.address); subscriptions are not started");
                }
                None
            }
            None => None,
        };
        let grpc_app = match (&config.app.address, config.app.protocol) {
            (Some(Address::Tcp(a)), crate::config::AppProtocol::Grpc) => Some(
                grpc::app::GrpcApp::new(
                    &a.to_string(),
                    bridge.app_api_token.as_ref().map(|t| t.expose()),
                    config
                        .clusters
                        .get(crate::config::proxy::APP_CLUSTER)
                        .map_or(pubsub::DEFAULT_DELIVERY_TIMEOUT, |c| c.timeout.get()),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            _ => None,
        };
        let input_target = match (&app_address, &grpc_app) {
            (_, Some(g)) => Some(input_bindings::Target::Grpc(Arc::new(
                g.with_timeout(pubsub::DEFAULT_DELIVERY_TIMEOUT),
            ))),
            (Some(a), None) => Some(input_bindings::Target::Http(Arc::new(
                pubsub::AppChannel::new(
                    a,
                    bridge.app_api_token.as_ref().map(|t| t.expose()),
                    pubsub::DEFAULT_DELIVERY_TIMEOUT,
                ),
            ))),
            (None, None) => None,
        };
        if input_target.is_none() && !input_bindings.is_empty() {
            tracing::warn!(
                "input bindings need the app on TCP (app.address); they are not started"
            );
        }
        let mut options = pubsub::PubSubOptions::new(bridge.app_id.clone(), app_address);
        options.app_protocol = config.app.protocol;
        options.grpc_app = grpc_app.clone();
        options.app_token = bridge
            .app_api_token
            .as_ref()
            .map(|t| t.expose().to_string());
        let pubsub = pubsub::PubSub::with_brokers(options, brokers, declarative, pubsub_metrics)
            .map_err(|errors| anyhow::anyhow!("{}", errors.join("\n")))?;
        Ok(BridgeState {
            pubsub,
            pubsub_started: AtomicBool::new(false),
            config: bridge.clone(),
            app_address: config.app.address.clone(),
            app_protocol: config.app.protocol,
            subscription_documents: resources.subscriptions,
            components,
            skipped,
            state_stores,
            secret_stores,
            lock_stores,
            configuration_stores,
            configuration_watches: Default::default(),
            output_bindings,
            input_bindings,
            input_target,
            app_gate: gate,
            hold_timeout: config.app.lifecycle.hold_timeout.get(),
            control,
            ready: AtomicBool::new(false),
            extended: Mutex::new(BTreeMap::new()),
            health: health::Health::default(),
            resolver: resolver(config, &clusters),
            clusters,
            grpc_app,
            metrics,
            max_connections: MAX_CONNECTIONS.min(config.connection_share()),
        })
    }
}

/// How app ids without a cluster are resolved: the mesh's peers (the proxy's, when it runs,
/// so both share clusters), else `bridge.name_resolution`'s template.
fn resolver(
    config: &Config,
    clusters: &invoke::Clusters,
) -> Option<Arc<crate::proxy::cluster::name_resolution::NameResolution>> {
    use crate::proxy::cluster::name_resolution::NameResolution;
    if let Some(mesh) = &config.mesh {
        if let invoke::Clusters::Proxy(p) = clusters
            && let Some(peers) = p.peers()
        {
            return Some(peers.clone());
        }
        return Some(NameResolution::mesh(mesh, clusters.metrics()));
    }
    let template = config.bridge.as_ref()?.name_resolution.clone()?;
    let namespace = std::env::var("NAMESPACE")
        .or_else(|_| std::env::var("POD_NAMESPACE"))
        .unwrap_or_else(|_| "default".to_string());
    Some(NameResolution::template(
        template,
        namespace,
        clusters.metrics(),
    ))
}

impl BridgeState {
    /// The components of one building block (`state`, `pubsub`, `secretstores`), in file order.
    pub fn components_of<'a>(&'a self, block: &'a str) -> impl Iterator<Item = &'a Component> {
        self.components.iter().filter(move |c| c.block() == block)
    }
}

/// The bridge module: the bound API sockets and the shared state.
pub struct Bridge {
    bound: Bound,
    /// `bridge.grpc_address`, when it is a socket of its own.
    grpc_bound: Option<Bound>,
    state: Arc<BridgeState>,
}

/// Where the bridge listens once bound.
#[derive(Clone, Debug)]
pub struct BridgeAddresses {
    /// `bridge.address`: the HTTP API, and gRPC too.
    pub http: Address,
    /// `bridge.grpc_address`, or `http` when there is no second socket.
    pub grpc: Address,
}

impl Bridge {
    /// Binds `bridge.address` and `bridge.grpc_address`. Returns the module and the bound
    /// addresses.
    pub async fn build(state: BridgeState) -> Result<(Bridge, BridgeAddresses)> {
        // Bound on the bridge's runtime: their wake-ups are its thread's ([`isolation`]).
        let address = state.config.address.clone();
        let at = address.clone();
        let bound =
            isolation::on_bridge(async move { Bound::bind(&at, DEFAULT_SOCKET_MODE).await })
                .await
                .with_context(|| format!("cannot bind the bridge on {address}"))?;
        let local = bound.local_address()?;
        let grpc_bound = match state.config.grpc_address.clone() {
            Some(g) => {
                let at = g.clone();
                Some(
                    isolation::on_bridge(
                        async move { Bound::bind(&at, DEFAULT_SOCKET_MODE).await },
                    )
                    .await
                    .with_context(|| format!("cannot bind the bridge's gRPC API on {g}"))?,
                )
            }
            None => None,
        };
        let grpc_local = match &grpc_bound {
            Some(b) => b.local_address()?,
            None => local.clone(),
        };
        tracing::info!(address = %local, grpc_address = %grpc_local, app_id = %state.config.app_id, components = state.components.len(), "bridge listening");
        Ok((
            Bridge {
                bound,
                grpc_bound,
                state: Arc::new(state),
            },
            BridgeAddresses {
                http: local,
                grpc: grpc_local,
            },
        ))
    }

    pub fn state(&self) -> &Arc<BridgeState> {
        &self.state
    }
}

/// The whole API. Pub/sub's routes are merged here (`.merge(pubsub::routes())`).
pub fn router(state: Arc<BridgeState>) -> Router {
    Router::new()
        .merge(routes::routes())
        .merge(lock_routes::routes())
        .merge(configuration_routes::routes())
        .merge(binding_routes::routes())
        .merge(not_implemented::routes())
        // Publish bodies are read by axum's extractor: the same limit as the other routes
        // (413 mapped to Dapr's JSON error in `observe_and_authorize`).
        .merge({
            let max_body = state.config.max_body;
            pubsub::http::router(state.pubsub.clone())
                .layer(axum::extract::DefaultBodyLimit::max(max_body))
                // axum's own body-limit rejection is plain text: answer as Dapr does. Mapped
                // here, on the publish routes only (an invoked app's 413 passes unchanged).
                .layer(axum::middleware::map_response(
                    move |res: Response| async move {
                        let plain = res
                            .headers()
                            .get(axum::http::header::CONTENT_TYPE)
                            .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
                        if res.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE && plain {
                            error::ApiError::TooLarge(max_body).into_response()
                        } else {
                            res
                        }
                    },
                ))
                .with_state(())
        })
        .fallback(invoke::fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe_and_authorize,
        ))
        .with_state(state)
}

/// The bounded `api` label of a request.
fn api_of(req: &Request) -> &'static str {
    let path = req.uri().path();
    let rest = path
        .strip_prefix("/v1.0/")
        .or_else(|| path.strip_prefix("/v1.0-alpha1/"))
        .unwrap_or("");
    let first = rest.split('/').next().unwrap_or("");
    match first {
        "state" => "state",
        "publish" => "publish",
        "invoke" => "invoke",
        "secrets" => "secrets",
        "lock" | "unlock" => "lock",
        "configuration" => "configuration",
        "bindings" => "bindings",
        "metadata" => "metadata",
        "healthz" => "healthz",
        "shutdown" => "shutdown",
        // Any other path with the header is an invocation (the fallback route).
        _ if req.headers().contains_key(invoke::APP_ID_HEADER) => "invoke",
        _ => "other",
    }
}

/// Compares a presented token with the configured one in time that does not depend on where
/// they differ.
pub(crate) fn token_matches(presented: Option<&axum::http::HeaderValue>, token: &str) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    let (a, b) = (presented.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// axum's own rejections (a path segment that is not UTF-8 once decoded, like `%FF`; a missing
/// or wrong content type) are plain text: as Dapr's JSON `ERR_MALFORMED_REQUEST`, like every
/// other bad request to the API.
async fn dapr_rejection(response: Response) -> Response {
    let plain = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if response.status() != axum::http::StatusCode::BAD_REQUEST || !plain {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    error::ApiError::Malformed(String::from_utf8_lossy(&text).into_owned()).into_response()
}

/// Checks the API token (health GETs are exempt), strips it, and counts and times the call.
async fn observe_and_authorize(
    State(state): State<Arc<BridgeState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let api = api_of(&req);
    // Health checks work without the token, as daprd's do: exactly those two paths (a
    // `/v1.0/healthz/…` path with `dapr-app-id` is an invocation, and must not slip through).
    let exempt = req.method() == axum::http::Method::GET
        && matches!(req.uri().path(), "/v1.0/healthz" | "/v1.0/healthz/outbound");
    // An invocation whatever its path: `/v1.0/invoke/…`, or the `dapr-app-id` header (a page's
    // "simple" cross-origin request cannot carry a custom header without a CORS preflight,
    // which the bridge never grants).
    let invocation = req.uri().path().starts_with("/v1.0/invoke/")
        || req.headers().contains_key(invoke::APP_ID_HEADER);
    // A configuration subscription is a GET that opens connections and tasks: a change too.
    let change = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) || (req.uri().path().contains("/configuration/")
        && (req.uri().path().ends_with("/subscribe") || req.uri().path().contains("/unsubscribe")));
    let response = match &state.config.api_token {
        // A page open in a browser on this host must not write state, publish or stop the
        // sidecar (a "simple" cross-origin POST needs no preflight). Invocations pass through:
        // an app forwarding its own users' requests forwards their `Origin` too.
        _ if !invocation && change && crate::origin::cross_origin(req.headers(), req.uri()) => {
            tracing::warn!(api, origin = ?req.headers().get(axum::http::header::ORIGIN), "refused a cross-origin bridge request");
            error::ApiError::CrossOrigin.into_response()
        }
        // Without a token, DNS rebinding would let a page read secrets and state (and write,
        // with its own name as Origin and Host): only IP addresses and localhost are answered.
        // With a token the page cannot know it; health checks answer any Host.
        None if !exempt && crate::origin::foreign_host(req.headers(), req.uri()) => {
            tracing::warn!(api, host = ?req.headers().get(axum::http::header::HOST), "refused a bridge request for a foreign Host");
            error::ApiError::ForeignHost.into_response()
        }
        Some(token)
            if !exempt && !token_matches(req.headers().get(TOKEN_HEADER), token.expose()) =>
        {
            // daprd answers a plain-text body here.
            (axum::http::StatusCode::UNAUTHORIZED, "invalid api token").into_response()
        }
        _ => {
            req.headers_mut().remove(TOKEN_HEADER);
            let response = next.run(req).await;
            if invocation {
                // The callee's answer, unchanged.
                response
            } else {
                dapr_rejection(response).await
            }
        }
    };
    let class = crate::proxy::route::class(response.status().as_u16());
    state
        .metrics
        .requests
        .get_or_create(&BridgeRequestLabels {
            api,
            status_class: class,
        })
        .inc();
    state
        .metrics
        .duration
        .get_or_create(&BridgeApiLabels { api })
        .observe(started.elapsed().as_secs_f64());
    response
}

impl Module for Bridge {
    fn name(&self) -> &'static str {
        "bridge"
    }

    /// Served on the bridge's own thread ([`isolation`]): its JSON work cannot delay the
    /// proxy's requests.
    fn run(self: Arc<Self>, cx: ModuleContext) -> ModuleFuture {
        Box::pin(isolation::run(self.serve(cx)))
    }
}

impl Bridge {
    fn serve(self: Arc<Self>, cx: ModuleContext) -> ModuleFuture {
        Box::pin(async move {
            let app = router(self.state.clone());
            let grpc = grpc::Grpc::new(self.state.clone());
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (app, grpc) = (app.clone(), grpc.clone());
                    async move {
                        // One port for both APIs: gRPC by its content type. A gRPC call to
                        // another service with `dapr-app-id` is forwarded to that app id as
                        // it streams (daprd's gRPC proxying), its body as hyper reads it; a
                        // gRPC-Web one is invoked as any HTTP request with that header.
                        if grpc::is_grpc_proper(&req) && grpc::is_proxied(&req) {
                            grpc.proxy(req).await
                        } else if grpc::is_grpc(&req) && !grpc::is_proxied(&req) {
                            grpc.call(req.map(axum::body::Body::new)).await
                        } else {
                            app.oneshot(req.map(axum::body::Body::new)).await
                        }
                    }
                });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            // Pub/sub's background work: subscriptions once the app is ready (the gate opens
            // when its probe passes), stopped when the stop begins — deliveries finish before
            // the app is told to stop; what is unacked stays with the broker.
            if !self.state.pubsub_started.swap(true, Ordering::AcqRel) {
                let ps = self.state.pubsub.clone();
                ps.start(self.state.app_gate.watch());
                // Input bindings start with it and stop when it stops.
                if let Some(target) = &self.state.input_target {
                    input_bindings::start(
                        self.state.input_bindings.clone(),
                        target.clone(),
                        self.state.app_gate.watch(),
                        ps.stopping(),
                        self.state.metrics.clone(),
                    );
                }
                // Component probes, for `/v1.0/metadata`: from the start (a component down
                // at start shows so before the app is ready), until the stop begins.
                health::start(self.state.clone(), ps.stopping());
                let mut inbound = cx.drain.inbound();
                // Counted as inbound work: the app gets its stop signal only once deliveries
                // in flight have finished (bounded by the inbound drain's deadline).
                let tracked = cx.drain.track();
                tokio::spawn(async move {
                    inbound.signaled().await;
                    ps.stop().await;
                    drop(tracked);
                });
            }
            self.state.ready.store(true, Ordering::Release);
            cx.set_ready();
            let cap = self.state.max_connections;
            let slots = Arc::new(tokio::sync::Semaphore::new(cap));
            let http = accept_loop(
                "bridge",
                &self.bound,
                &builder,
                service.clone(),
                cx.drain.clone(),
                slots.clone(),
                self.state.metrics.clone(),
            );
            match &self.grpc_bound {
                Some(g) => {
                    let grpc = accept_loop(
                        "bridge gRPC",
                        g,
                        &builder,
                        service,
                        cx.drain.clone(),
                        slots.clone(),
                        self.state.metrics.clone(),
                    );
                    tokio::join!(http, grpc);
                }
                None => http.await,
            }
            // Draining: every connection finishes its calls in flight (each was told to).
            let _ = slots.acquire_many(cap as u32).await;
            self.state.ready.store(false, Ordering::Release);
            Ok(())
        })
    }
}

/// Accepts connections on one of the bridge's sockets until the drain begins, serving each
/// with `service` (both APIs) under the bridge's limits: the connection cap shared by both
/// sockets, the header deadline, the idle and write-stall cut-offs.
async fn accept_loop<S>(
    name: &'static str,
    bound: &Bound,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    mut drain: crate::runtime::Drain,
    slots: Arc<tokio::sync::Semaphore>,
    metrics: BridgeMetrics,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut errors = crate::descriptors::AcceptErrors::default();
    loop {
        // At the cap, stop accepting until a connection ends (as the proxy does).
        let slot = tokio::select! {
            _ = drain.signaled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        tokio::select! {
            _ = drain.signaled() => break,
            // Out of descriptors (a flooded proxy listener), a spare is used: the app's
            // health checks still get an answer.
            accepted = crate::descriptors::accept_with_reserve(|| bound.accept()) => {
                let ((stream, _peer), refill) = match accepted {
                    Ok(s) => {
                        errors.succeeded();
                        s
                    }
                    Err(e) => {
                        errors.failed(name, &e).await;
                        continue;
                    }
                };
                let service = service.clone();
                let activity = crate::proxy::listener::Activity::new();
                // Out of descriptors, the connection's descriptor goes back into the reserve
                // when it closes.
                let io = crate::proxy::listener::Metered::new(
                    crate::descriptors::Held::new(stream, refill),
                    activity.clone(),
                    Default::default(),
                    Default::default(),
                    None,
                );
                // While draining, HTTP/1 responses say `connection: close`: the client opens
                // its next call on the new process (hot restart) instead of racing the close.
                let draining = drain.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let http1 = req.version() < http::Version::HTTP_2;
                    let call = hyper::service::Service::call(&service, req);
                    let draining = draining.clone();
                    async move {
                        let mut res = call.await?;
                        if http1 && draining.is_draining() {
                            res.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
                let mut drain = drain.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    tokio::pin!(conn);
                    let silent = crate::proxy::accept::silent_for(&activity, HEADER_READ_TIMEOUT, IDLE_TIMEOUT);
                    let quiet = crate::proxy::accept::silent_for(&activity, crate::proxy::accept::DRAIN_QUIET, crate::proxy::accept::DRAIN_QUIET);
                    tokio::pin!(silent, quiet);
                    let mut closing = false;
                    let mut draining = false;
                    loop {
                        tokio::select! {
                            res = conn.as_mut() => {
                                if let Err(e) = res {
                                    tracing::debug!(error = %e, "bridge connection ended with an error");
                                }
                                break;
                            }
                            _ = drain.signaled(), if !draining => {
                                // As the proxy's listeners: responses from now on say
                                // `connection: close`, and the connection closes once quiet
                                // for a moment (closing an idle keep-alive connection at once
                                // races the client's next call: IncompleteMessage).
                                draining = true;
                                quiet.set(crate::proxy::accept::silent_for(&activity, crate::proxy::accept::DRAIN_QUIET, crate::proxy::accept::DRAIN_QUIET));
                            }
                            _ = &mut quiet, if draining && !closing => {
                                // In-flight calls finish, then the connection closes.
                                conn.as_mut().graceful_shutdown();
                                closing = true;
                            }
                            silence = &mut silent => {
                                // A client that reads nothing: cut. Idle: closed once
                                // its calls in flight are done (a slow invocation
                                // waiting on its callee is not cut).
                                if silence == crate::proxy::accept::Silence::WriteStalled {
                                    tracing::debug!("bridge client read nothing for the idle timeout; connection closed");
                                    metrics.cut("read_nothing");
                                    break;
                                }
                                if activity.count() == 0 {
                                    metrics.cut("silent");
                                }
                                if !closing {
                                    conn.as_mut().graceful_shutdown();
                                    closing = true;
                                }
                                silent.set(crate::proxy::accept::silent_for(&activity, IDLE_TIMEOUT, IDLE_TIMEOUT));
                            }
                        }
                    }
                });
            }
        }
    }
}

/// Every byte of `s` but RFC 3986's unreserved ones percent-encoded: safe as one URL path
/// segment (a key with `/`, `?`, `#`, `%`, spaces or non-ASCII letters names itself, not
/// another path) and as a URL's userinfo (broker user names and passwords).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_leaves_only_unreserved_bytes() {
        assert_eq!(super::percent_encode("orderconfig"), "orderconfig");
        assert_eq!(super::percent_encode("a/b?c#d e%"), "a%2Fb%3Fc%23d%20e%25");
        assert_eq!(super::percent_encode("café"), "caf%C3%A9");
    }

    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;

    /// The router over a state built from `yaml` (a whole config file).
    fn app(yaml: &str) -> Router {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let source = crate::config::Source {
            file: Some(path),
            ..Default::default()
        };
        let (config, built) =
            crate::preflight::load(&source, &BTreeMap::<String, String>::new()).unwrap();
        let (control, _rx) = mpsc::channel(1);
        let (_setter, gate) = crate::runtime::app_gate(true);
        let clusters = invoke::Clusters::Own(Box::new(invoke::OwnClusters {
            configs: BTreeMap::new(),
            built: Default::default(),
            metrics: Default::default(),
            tls: Default::default(),
        }));
        let state = BridgeState::new(
            &config,
            built.bridge.unwrap(),
            gate,
            control,
            clusters,
            BridgeMetrics::default(),
            Default::default(),
        )
        .unwrap();
        state.ready.store(true, Ordering::Release);
        router(Arc::new(state))
    }

    async fn call(app: &Router, req: Request<Body>) -> (StatusCode, String) {
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn save_get_and_errors_without_a_socket() {
        let app = app("service: unit\nbridge: {}\n");
        let save = |body: &'static str| {
            Request::post("/v1.0/state/statestore")
                .body(Body::from(body))
                .unwrap()
        };
        assert_eq!(
            call(&app, save(r#"[{"key":"a","value":{"n":1}}]"#)).await.0,
            StatusCode::NO_CONTENT
        );
        let (status, body) = call(
            &app,
            Request::get("/v1.0/state/statestore/a")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"n":1}"#));
        let (status, body) = call(&app, save("not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("ERR_MALFORMED_REQUEST"), "{body}");
        let (status, body) = call(
            &app,
            Request::get("/v1.0/secrets/any/x")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("ERR_SECRET_STORES_NOT_CONFIGURED"), "{body}");
    }

    #[tokio::test]
    async fn token_and_body_limit() {
        let app = app("bridge:\n  api_token: t0k\n  max_body: 16\n");
        let (status, body) = call(
            &app,
            Request::get("/v1.0/metadata").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::UNAUTHORIZED, "invalid api token")
        );
        let (status, _) = call(
            &app,
            Request::get("/v1.0/healthz").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = call(
            &app,
            Request::post("/v1.0/state/statestore")
                .header(TOKEN_HEADER, "t0k")
                .body(Body::from("[{\"key\":\"a\",\"value\":\"0123456789\"}]"))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body.contains("ERR_BODY_TOO_LARGE"), "{body}");
        // Publish and bulk publish have the same limit and error.
        for path in [
            "/v1.0/publish/pubsub/orders",
            "/v1.0-alpha1/publish/bulk/pubsub/orders",
        ] {
            let (status, body) = call(
                &app,
                Request::post(path)
                    .header(TOKEN_HEADER, "t0k")
                    .header("content-type", "application/json")
                    .body(Body::from("[{\"entryId\":\"1\",\"event\":\"0123456789\"}]"))
                    .unwrap(),
            )
            .await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {body}");
            assert!(body.contains("ERR_BODY_TOO_LARGE"), "{path}: {body}");
        }
        // Only the two health paths are exempt: a health-looking invocation needs the token.
        let (status, _) = call(
            &app,
            Request::get("/v1.0/healthz/../../admin")
                .header("dapr-app-id", "other")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = call(
            &app,
            Request::get("/v1.0/healthz/outbound")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }

    /// Every daprd route we do not serve answers 501 naming its building block (it fell
    /// through to invocation and answered 400 `ERR_DIRECT_INVOKE` before).
    #[tokio::test]
    async fn unserved_building_blocks_answer_501() {
        let app = app("service: unit\nbridge: {}\n");
        for (method, path, block) in [
            ("POST", "/v1.0/actors/cart/1/method/add", "actors"),
            ("GET", "/v1.0/actors/cart/1/state/k", "actors"),
            ("POST", "/v1.0/workflows/dapr/order/start", "workflows"),
            ("GET", "/v1.0-beta1/workflows/dapr/abc", "workflows"),
            (
                "POST",
                "/v1.0-alpha1/workflows/dapr/abc/terminate",
                "workflows",
            ),
            ("PUT", "/v1.0-alpha1/crypto/vault/encrypt", "crypto"),
            ("POST", "/v1.0-alpha1/subtlecrypto/vault/sign", "crypto"),
            ("POST", "/v1.0-alpha1/jobs/nightly", "jobs"),
            (
                "POST",
                "/v1.0-alpha1/conversation/llm/converse",
                "conversation",
            ),
            (
                "POST",
                "/v1.0-alpha2/conversation/llm/converse",
                "conversation",
            ),
            ("POST", "/v1.0-alpha1/state/statestore/query", "state query"),
        ] {
            let (status, body) = call(
                &app,
                Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await;
            assert_eq!(
                status,
                StatusCode::NOT_IMPLEMENTED,
                "{method} {path}: {body}"
            );
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["errorCode"], "ERR_NOT_IMPLEMENTED", "{path}");
            assert_eq!(
                v["message"],
                format!("outrigger: {block} API is not implemented"),
                "{path}"
            );
        }
        // Served routes and invocation are unchanged: an unknown path without an app id is
        // still daprd's invocation error, and the header form still invokes.
        let (status, body) = call(
            &app,
            Request::get("/v1.0/nothing").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("ERR_DIRECT_INVOKE"), "{body}");
        let (status, body) = call(
            &app,
            Request::post("/v1.0/bindings/cron")
                .header("dapr-app-id", "nobody")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_ne!(status, StatusCode::NOT_IMPLEMENTED, "{body}");
    }

    /// State bodies' field names match as daprd's Go decoder matches them: exact, then
    /// ignoring case (serde alone refused `Key` as a missing key and dropped `Operations`).
    #[tokio::test]
    async fn state_field_names_ignore_case() {
        let app = app("service: unit\nbridge: {}\n");
        let post = |path: &'static str, body: &'static str| {
            Request::post(path).body(Body::from(body)).unwrap()
        };
        let (status, body) = call(
            &app,
            post(
                "/v1.0/state/statestore",
                r#"[{"Key":"a","VALUE":{"Kept":1},"Options":{"CONCURRENCY":"last-write"}}]"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, body) = call(
            &app,
            post(
                "/v1.0/state/statestore/transaction",
                r#"{"Operations":[{"Operation":"upsert","Request":{"KEY":"b","Value":2}}]}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, body) = call(
            &app,
            post("/v1.0/state/statestore/bulk", r#"{"Keys":["a","b"]}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v[0]["data"], serde_json::json!({"Kept": 1}), "{body}");
        assert_eq!(v[1]["data"], 2, "{body}");
    }
}
