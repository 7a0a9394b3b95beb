//! The admin API on its own listener (default 127.0.0.1:9901): liveness, readiness, metrics,
//! the effective config, the log level, a shutdown endpoint, and a live dashboard (`GET /`,
//! `/ui`: one page compiled in, drawing [`status`]'s `GET /status` every second).
//!
//! Requests come in from probes, scrapers and operators; they leave as reads of shared state or
//! as [`Control`] values on the one control channel. Endpoints that change something
//! (`PUT /log-level`, `POST /shutdown`, `POST /reload`) answer 403 to non-loopback peers even
//! when the admin listener is configured on another address.

pub mod history;
pub mod scrape;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::mpsc;

use crate::runtime::stop::AdminServer;
use crate::runtime::{Control, Health, RunningConfig};
use crate::telemetry::log::LogLevel;
use crate::telemetry::metrics::{self, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};

/// What the admin handlers read and where they send requests.
#[derive(Clone)]
pub struct AdminState {
    pub health: Arc<Health>,
    pub registry: Arc<Registry>,
    pub config: Arc<RunningConfig>,
    pub log_level: LogLevel,
    pub control: mpsc::Sender<Control>,
    /// `GET /server_info`: which process and generation this is (hot restart).
    pub server_info: Arc<crate::runtime::upgrade::ServerInfo>,
    /// What `GET /status` reads besides the above, and the dashboard's history.
    pub sources: Arc<status::Sources>,
}

/// Binds the admin listener: with every other listener, before anything starts, so a taken
/// port stops start-up.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    // Handed over by the Outrigger this one takes over from (hot restart), or bound now.
    let listener = match crate::runtime::upgrade::take_tcp(address)? {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot bind the admin listener on {address}"))?,
    };
    if !address.ip().to_canonical().is_loopback() {
        tracing::warn!(address = %listener.local_addr()?, "the admin API listens beyond loopback; changes are still refused to non-loopback peers");
    }
    Ok(listener)
}

/// Serves the admin API on `listener` until the stop sequence's last step.
///
/// Not a supervised [`crate::runtime::Module`], on purpose: admin is what reports the modules'
/// health, so it must not drain with them (step 3) but answer `/ready` 503 until the very end
/// (step 4), and there is nothing in it to restart (axum's server does not fail per request).
pub fn serve(listener: tokio::net::TcpListener, state: AdminState) -> AdminServer {
    use tracing::Instrument;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        async move {
            let service = router(state).into_make_service_with_connect_info::<SocketAddr>();
            // The reserve is filled now, before any listener can be flooded.
            crate::descriptors::reserve();
            // `tap_io` only for axum's `ConnectInfo` of a custom listener.
            let listener = axum::serve::ListenerExt::tap_io(
                AdminListener {
                    inner: listener,
                    errors: Default::default(),
                },
                |_| {},
            );
            axum::serve(listener, service)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        }
        .instrument(tracing::info_span!("admin")),
    );
    AdminServer { stop, task }
}

/// The admin socket: when the process is out of descriptors (a flooded proxy listener), an
/// accept uses a spare from [`crate::descriptors`], so `/live` and `/ready` still answer; other
/// failures back off and are logged once a second (axum's own loop sleeps a second and logs
/// each one).
struct AdminListener {
    inner: tokio::net::TcpListener,
    errors: crate::descriptors::AcceptErrors,
}

impl axum::serve::Listener for AdminListener {
    type Io = crate::descriptors::Held<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        loop {
            match crate::descriptors::accept_with_reserve(|| self.inner.accept()).await {
                Ok(((stream, peer), refill)) => {
                    self.errors.succeeded();
                    return (crate::descriptors::Held::new(stream, refill), peer);
                }
                Err(e) => self.errors.failed("admin", &e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The admin router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`: the
/// loopback check needs the peer address.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/ready/outbound", get(ready_outbound))
        .route("/metrics", get(metrics_handler))
        .route("/config", get(config))
        .route("/log-level", get(get_log_level).put(put_log_level))
        .route("/shutdown", post(shutdown))
        .route("/reload", post(reload))
        .route("/upgrade", post(upgrade))
        .route("/server_info", get(server_info))
        .route("/status", get(status_handler))
        .route("/", get(dashboard))
        .route("/ui", get(dashboard))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(refuse_browsers))
        .with_state(state)
}

/// Refuses what only a web page sends (see [`crate::origin`]): a change (`PUT`, `POST`) from
/// another site's page, and anything but probes and scrapes (`/live`, `/ready*`, `/metrics`)
/// under a `Host` that is not an IP address or `localhost` (DNS rebinding would let a page read
/// `/config`).
async fn refuse_browsers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = req.headers();
    let change = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    let probe = matches!(
        req.uri().path(),
        "/live" | "/ready" | "/ready/outbound" | "/metrics"
    );
    let refusal = if change && crate::origin::cross_origin(headers, req.uri()) {
        Some(
            "cross-origin requests cannot change the sidecar; call the admin API with curl or a script",
        )
    } else if !probe && crate::origin::foreign_host(headers, req.uri()) {
        Some("the admin API answers Host: an IP address or localhost")
    } else {
        None
    };
    match refusal {
        Some(why) => {
            tracing::warn!(path = req.uri().path(), origin = ?headers.get(header::ORIGIN), host = ?headers.get(header::HOST), "refused an admin request a web page sent");
            error(StatusCode::FORBIDDEN, why)
        }
        None => next.run(req).await,
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut text = body.to_string();
    text.push('\n');
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    json_response(status, json!({ "error": message.into() }))
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint; try /, /status, /live, /ready, /ready/outbound, /metrics, /config, /log-level, /reload or /shutdown",
    )
}

async fn live() -> &'static str {
    "live\n"
}

/// The readiness report, and each log sink's state (`log_sinks`), which never changes the
/// answer: a log backend that is down must not take the pod out of service.
async fn ready(State(s): State<AdminState>) -> Response {
    let (status, mut body) = ready_body(s.health.report());
    let sinks = s.sources.logs.sinks.report();
    if !sinks.is_empty() {
        body["log_sinks"] = serde_json::to_value(sinks).unwrap_or_default();
    }
    json_response(status, body)
}

/// The sidecar's own readiness, without the app: what the app waits for before its first
/// outbound call (`outrigger wait`), since `/ready` itself waits for the app.
async fn ready_outbound(State(s): State<AdminState>) -> Response {
    let (status, body) = ready_body(s.health.report_modules());
    json_response(status, body)
}

fn ready_body(report: crate::runtime::health::Report) -> (StatusCode, serde_json::Value) {
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, serde_json::to_value(&report).unwrap_or_default())
}

async fn metrics_handler(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = metrics::encode(&s.registry, openmetrics);
    let content_type = if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        PROMETHEUS_CONTENT_TYPE
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn config(State(s): State<AdminState>) -> Response {
    let config = s.config.config.load_full();
    let last_reload = s.config.last_reload.lock().expect("not poisoned").clone();
    json_response(
        StatusCode::OK,
        json!({
            "config": &*config,
            "log_level": s.log_level.get(),
            "last_reload": last_reload,
        }),
    )
}

/// The dashboard: one page, its CSS and script inline, no other request than `/status`.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing but itself and /status: no external asset can load, nothing can frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn status_handler(State(s): State<AdminState>) -> Response {
    let mut res = json_response(StatusCode::OK, status::status(&s));
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    res
}

async fn get_log_level(State(s): State<AdminState>) -> String {
    format!("{}\n", s.log_level.get())
}

/// A 403 for non-loopback peers; None when the peer may go on.
fn refuse_remote(peer: SocketAddr) -> Option<Response> {
    if peer.ip().to_canonical().is_loopback() {
        None
    } else {
        tracing::warn!(peer.addr = %peer, "refused an admin change from a non-loopback peer");
        Some(error(
            StatusCode::FORBIDDEN,
            "this endpoint answers loopback peers only",
        ))
    }
}

async fn put_log_level(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    if let Some(r) = refuse_remote(peer) {
        return r;
    }
    let Ok(spec) = std::str::from_utf8(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a UTF-8 log filter like debug",
        );
    };
    match s.log_level.set(spec) {
        Ok(()) => {
            tracing::info!(
                level = spec.trim(),
                "log level changed through the admin API"
            );
            (StatusCode::OK, format!("{}\n", s.log_level.get())).into_response()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("expected a log filter like info, debug or info,outrigger=debug: {e}"),
        ),
    }
}

async fn shutdown(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(r) = refuse_remote(peer) {
        return r;
    }
    // Parsed here, after the peer check, so remote peers always get 403.
    let graceful = match query.as_deref() {
        None | Some("") | Some("fast=false") => true,
        Some("fast=true") | Some("fast") => false,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected ?fast=true or nothing, found ?{other}"),
            );
        }
    };
    send(&s, Control::Shutdown { graceful }, "shutdown")
}

async fn reload(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Some(r) = refuse_remote(peer) {
        return r;
    }
    send(&s, Control::Reload, "reload")
}

/// Starts a new Outrigger from the same binary path and arguments, which takes over this one's
/// sockets and app (as SIGUSR2 does). 202 means started, not taken over: watch
/// `/server_info` (pid, generation) or the logs for the outcome.
async fn upgrade(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Some(r) = refuse_remote(peer) {
        return r;
    }
    if s.server_info.upgrade_socket.is_none() {
        return error(
            StatusCode::CONFLICT,
            "no upgrade socket: set runtime.upgrade_socket (the default needs a fixed admin port)",
        );
    }
    send(&s, Control::Upgrade, "upgrade")
}

async fn server_info(State(s): State<AdminState>) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_value(&*s.server_info).unwrap_or_default(),
    )
}

fn send(s: &AdminState, control: Control, what: &str) -> Response {
    match s.control.try_send(control) {
        Ok(()) => {
            tracing::info!(request = what, "accepted through the admin API");
            json_response(StatusCode::ACCEPTED, json!({ "accepted": what }))
        }
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the sidecar is busy stopping or has too many pending requests",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn state() -> (AdminState, mpsc::Receiver<Control>) {
        let m = crate::telemetry::metrics::Metrics::new();
        let (tx, rx) = mpsc::channel(4);
        let health = Arc::new(Health::new(m.runtime.clone()));
        (
            AdminState {
                health,
                registry: Arc::new(m.registry),
                config: Arc::new(RunningConfig::new(crate::config::Config::defaults())),
                log_level: LogLevel::detached("info"),
                control: tx,
                server_info: Arc::new(crate::runtime::upgrade::ServerInfo::new(0, None, None)),
                sources: Arc::new(status::Sources::empty()),
            },
            rx,
        )
    }

    fn request(method: &str, uri: &str, peer: &str, body: &str) -> Request<Body> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let peer: SocketAddr = peer.parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    }

    async fn call(state: &AdminState, req: Request<Body>) -> (StatusCode, String) {
        let res = router(state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn changes_are_refused_to_remote_peers() {
        let (s, mut rx) = state();
        let (status, _) = call(&s, request("POST", "/shutdown", "10.1.2.3:5555", "")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _) = call(&s, request("PUT", "/log-level", "10.1.2.3:5555", "debug")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(s.log_level.get(), "info");
        assert!(rx.try_recv().is_err());
        // IPv4-mapped loopback counts as loopback.
        let (status, _) = call(
            &s,
            request("POST", "/shutdown?fast=true", "[::ffff:127.0.0.1]:1", ""),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            rx.try_recv().unwrap(),
            Control::Shutdown { graceful: false }
        );
    }

    #[tokio::test]
    async fn log_level_is_validated() {
        let (s, _rx) = state();
        let (status, body) = call(
            &s,
            request("PUT", "/log-level", "127.0.0.1:1", "not a [filter"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(s.log_level.get(), "info");
        let (status, body) = call(&s, request("PUT", "/log-level", "127.0.0.1:1", "debug\n")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "debug\n");
    }

    #[tokio::test]
    async fn the_dashboard_and_its_status() {
        let (s, _rx) = state();
        let res = router(s.clone())
            .oneshot(request("GET", "/", "127.0.0.1:1", ""))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let csp = res.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
        let (status, page) = call(&s, request("GET", "/ui", "127.0.0.1:1", "")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("fetch(\"/status\""), "the page polls /status");
        // Nothing but itself: no stylesheet, script or image from elsewhere.
        assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
        assert!(page.len() < 64 << 10, "a few tens of KiB: {}", page.len());

        let (status, body) = call(&s, request("GET", "/status", "127.0.0.1:1", "")).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        for key in [
            "service",
            "modules",
            "app",
            "listeners",
            "routes",
            "clusters",
            "tls",
            "bridge",
            "logs",
            "reload",
            "errors",
            "history",
            "links",
        ] {
            assert!(v.get(key).is_some(), "/status has {key}: {v:#}");
        }
        assert_eq!(v["logs"]["enabled"], false);
        assert_eq!(
            v["modules"][0]["state"], "off",
            "no listeners: the proxy is off"
        );
        assert!(
            s.sources.history.running(),
            "the first /status starts the sampler"
        );

        // A page on another site cannot read it through DNS rebinding.
        let mut req = request("GET", "/status", "127.0.0.1:1", "");
        req.headers_mut()
            .insert(header::HOST, "evil.example:9901".parse().unwrap());
        let (status, _) = call(&s, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn unknown_paths_are_404_json() {
        let (s, _rx) = state();
        let (status, body) = call(&s, request("GET", "/nope", "127.0.0.1:1", "")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("\"error\""), "{body}");
    }
}
