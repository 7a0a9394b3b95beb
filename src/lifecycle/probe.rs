//! App probes: an HTTP GET, a TCP (or unix socket) connect, a command, or a gRPC health call
//! (Dapr's `AppCallbackHealthCheck` or `grpc.health.v1`), run every
//! `interval`. `success_threshold` passes in a row make the app ready (`/ready`, the inbound
//! gate); `failure_threshold` failures in a row make it unhealthy again (`/ready` 503; inbound
//! traffic keeps flowing, since a half-working app usually serves better than none).
//!
//! A check the sidecar itself cannot run — out of descriptors (EMFILE/ENFILE), memory
//! (ENOMEM/ENOBUFS) or, for an exec probe's fork, processes (EAGAIN) — says nothing about the
//! app: it is logged (once a minute at most) and counted in
//! `outrigger_app_probe_skipped_total`, not as a failure, and the app's state stays as it was.
//! Otherwise a flooded listener that takes every descriptor would also make the app "fail" its
//! probe and `/ready` answer 503, though the app is fine.
//!
//! Until the app is ready for the first time the probe runs every [`STARTUP_INTERVAL`] (or
//! `interval`, when shorter; for at most [`STARTUP_FAST_FOR`]), so a starting app gets traffic
//! a moment after it listens instead of up to a whole interval later.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::Address;
use crate::config::lifecycle::{GrpcHealth, ProbeCheck, ProbeConfig};
use crate::runtime::{AppGateSetter, Health, State};
use crate::telemetry::metrics::RuntimeMetrics;

/// How often a starting app is probed…
pub const STARTUP_INTERVAL: Duration = Duration::from_millis(100);
/// …for at most this long; an app that takes longer is probed every `interval` (an exec probe
/// must not fork ten times a second forever).
pub const STARTUP_FAST_FOR: Duration = Duration::from_secs(30);

/// Where probe results go: `/ready`, the inbound gate, metrics, and a watch for whoever waits
/// for the app to come or go.
#[derive(Clone)]
pub struct AppStatus {
    pub health: Arc<Health>,
    pub gate: Arc<AppGateSetter>,
    pub metrics: RuntimeMetrics,
    /// True while the app counts as ready.
    pub ready: Arc<watch::Sender<bool>>,
}

impl AppStatus {
    /// The app is ready: `/ready` and the inbound gate open.
    pub fn set_ready(&self) {
        self.health.set("app", State::Ready, None);
        self.gate.set(true);
        self.metrics.app_ready.set(1);
        self.ready.send_replace(true);
    }

    /// The app is not ready; with `close_gate`, inbound requests wait for it again (it is not
    /// running).
    pub fn set_not_ready(&self, state: State, detail: String, close_gate: bool) {
        self.health.set("app", state, Some(detail));
        if close_gate {
            self.gate.set(false);
        }
        self.metrics.app_ready.set(0);
        self.ready.send_replace(false);
    }
}

/// Probes until cancelled (dropped), reporting into `status`.
pub async fn run(config: ProbeConfig, status: AppStatus) {
    tokio::time::sleep(config.initial_delay.get()).await;
    let (mut ready, mut passes, mut failures) = (false, 0u32, 0u32);
    let mut ever_ready = false;
    let fast_until = tokio::time::Instant::now() + STARTUP_FAST_FOR;
    let mut skipped_logged: Option<tokio::time::Instant> = None;
    loop {
        match check(&config.check, config.timeout.get()).await {
            Err(Failure::Sidecar(e)) => {
                status.metrics.app_probe_skipped.inc();
                let now = tokio::time::Instant::now();
                if skipped_logged.is_none_or(|at| now - at >= Duration::from_secs(60)) {
                    skipped_logged = Some(now);
                    warn!(probe = %describe(&config.check), error = %e, "the probe could not run (the sidecar's own limit); the app's state is kept");
                }
            }
            Ok(()) => {
                failures = 0;
                passes = passes.saturating_add(1);
                if !ready && passes >= config.success_threshold {
                    ready = true;
                    ever_ready = true;
                    info!(probe = %describe(&config.check), "the app is ready");
                    status.set_ready();
                }
            }
            Err(Failure::App(e)) => {
                status.metrics.app_probe_failures.inc();
                passes = 0;
                failures = failures.saturating_add(1);
                if ready && failures >= config.failure_threshold {
                    ready = false;
                    warn!(probe = %describe(&config.check), error = %e, failures, "the app failed its probe; not ready");
                    status.set_not_ready(State::Unhealthy, format!("probe failing: {e}"), false);
                } else if !ready {
                    debug!(probe = %describe(&config.check), error = %e, "the app is not ready yet");
                    let state = if ever_ready {
                        State::Unhealthy
                    } else {
                        State::Starting
                    };
                    status.health.set("app", state, Some(format!("probe: {e}")));
                }
            }
        }
        let interval = config.interval.get();
        let next = if ever_ready || tokio::time::Instant::now() >= fast_until {
            interval
        } else {
            interval.min(STARTUP_INTERVAL)
        };
        tokio::time::sleep(next).await;
    }
}

/// One-line description for logs.
pub fn describe(check: &ProbeCheck) -> String {
    match check {
        ProbeCheck::Http { address, path } => format!("http {address}{path}"),
        ProbeCheck::Tcp(a) => format!("tcp {a}"),
        ProbeCheck::Exec(cmd) => format!("exec {}", cmd.join(" ")),
        ProbeCheck::Grpc { address, service } => format!("grpc {service:?} {address}"),
    }
}

/// Why a check did not pass.
#[derive(Debug, PartialEq)]
pub enum Failure {
    /// The app did not pass the check.
    App(String),
    /// The sidecar could not run the check (out of descriptors or processes): says nothing
    /// about the app.
    Sidecar(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::App(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::App(e) | Failure::Sidecar(e) => f.write_str(e),
        }
    }
}

/// An error of the sidecar's own limits: descriptors (EMFILE, ENFILE) or memory (ENOMEM,
/// ENOBUFS); for a fork also processes (EAGAIN). Not EAGAIN on a connect: on a unix socket it
/// means the app's listen backlog is full, which is the app's state.
fn own_limit(e: &std::io::Error, fork: bool) -> bool {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => true,
        Some(libc::EAGAIN) => fork,
        _ => false,
    }
}

/// A failed connect to the app, classified.
fn connect_failed(address: &Address, e: std::io::Error) -> Failure {
    let message = format!("cannot connect to {address}: {e}");
    if own_limit(&e, false) {
        Failure::Sidecar(message)
    } else {
        Failure::App(message)
    }
}

/// Runs one check within `timeout`.
pub async fn check(check: &ProbeCheck, timeout: Duration) -> Result<(), Failure> {
    match tokio::time::timeout(timeout, check_inner(check)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::App(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

async fn check_inner(check: &ProbeCheck) -> Result<(), Failure> {
    match check {
        ProbeCheck::Tcp(address) => match address {
            Address::Tcp(a) => TcpStream::connect(a).await.map(drop),
            Address::Unix(p) => UnixStream::connect(p).await.map(drop),
        }
        .map_err(|e| connect_failed(address, e)),
        ProbeCheck::Http { address, path } => {
            let status = request_classified(address, http::Method::GET, path).await?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(Failure::App(format!("GET {path} answered {status}")))
            }
        }
        ProbeCheck::Grpc { address, service } => grpc_health(address, *service).await,
        ProbeCheck::Exec(cmd) => {
            let (mut child, pid) = spawn_registered(cmd)?;
            let status = child.wait().await;
            if let Some(pid) = pid {
                super::reaper::forget(pid);
            }
            let status = status.map_err(|e| format!("cannot wait for {}: {e}", cmd[0]))?;
            if status.success() {
                Ok(())
            } else {
                Err(Failure::App(format!("{} exited with {status}", cmd[0])))
            }
        }
    }
}

/// Spawns an exec probe, registered with the reaper (not inside an async fn: the registry's
/// lock must not be held across an await).
fn spawn_registered(cmd: &[String]) -> Result<(tokio::process::Child, Option<u32>), Failure> {
    let mut ours = super::reaper::spawning();
    let child = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            let message = format!("cannot run {}: {e}", cmd[0]);
            if own_limit(&e, true) {
                Failure::Sidecar(message)
            } else {
                Failure::App(message)
            }
        })?;
    let pid = child.id();
    if let Some(pid) = pid {
        ours.insert(pid as i32);
    }
    Ok((child, pid))
}

/// One unary gRPC health call on a fresh HTTP/2 connection. Written on hyper's client rather
/// than a generated gRPC client: the request is an empty message (five bytes of framing), the
/// answer needs only `grpc-status` and, for `grpc.health.v1`, one varint field — and the
/// lifecycle floor stays free of the bridge's protobuf code.
async fn grpc_health(address: &Address, service: GrpcHealth) -> Result<(), Failure> {
    use http_body_util::{BodyExt, Full};
    let path = match service {
        GrpcHealth::Dapr => "/dapr.proto.runtime.v1.AppCallbackHealthCheck/HealthCheck",
        GrpcHealth::Health => "/grpc.health.v1.Health/Check",
    };
    let io: Box<dyn Io> = match address {
        Address::Tcp(a) => Box::new(
            TcpStream::connect(a)
                .await
                .map_err(|e| connect_failed(address, e))?,
        ),
        Address::Unix(p) => Box::new(
            UnixStream::connect(p)
                .await
                .map_err(|e| connect_failed(address, e))?,
        ),
    };
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(io),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://localhost{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "outrigger")
        // An empty message: not compressed, length 0.
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .map_err(|e| e.to_string())?;
    let answer = async {
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{path} failed: {e}"))?;
        if res.status() != http::StatusCode::OK {
            return Err(format!("{path} answered HTTP {}", res.status()));
        }
        let early = res.headers().get("grpc-status").cloned();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{path}: reading the answer: {e}"))?;
        let status = body
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(early);
        match status.as_ref().map(|v| v.as_bytes()) {
            Some(b"0") => Ok(body.to_bytes()),
            Some(code) => Err(format!(
                "{path} answered grpc-status {}",
                String::from_utf8_lossy(code)
            )),
            None => Err(format!("{path} answered without a grpc-status")),
        }
    };
    let message = answer.await;
    conn.abort();
    let message = message?;
    if service == GrpcHealth::Health {
        // HealthCheckResponse{status = 1 (SERVING)}: frame header, then field 1 as a varint.
        let serving = message.len() >= 7 && message[5] == 0x08 && message[6] == 1;
        if !serving {
            return Err(Failure::App(format!("{path}: the server is not SERVING")));
        }
    }
    Ok(())
}

/// A connection of either kind, boxed for the gRPC probe.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One request on a fresh connection (as kubelet probes: a probe must not reuse a
/// connection the app may have half-closed); returns the status. No timeout of its own.
pub async fn request(address: &Address, method: http::Method, path: &str) -> Result<u16, String> {
    request_classified(address, method, path)
        .await
        .map_err(|e| e.to_string())
}

/// [`request`], its failure classified.
async fn request_classified(
    address: &Address,
    method: http::Method,
    path: &str,
) -> Result<u16, Failure> {
    match address {
        Address::Tcp(a) => {
            let s = TcpStream::connect(a)
                .await
                .map_err(|e| connect_failed(address, e))?;
            Ok(request_on(s, method, path, "localhost", "outrigger").await?)
        }
        Address::Unix(p) => {
            let s = UnixStream::connect(p)
                .await
                .map_err(|e| connect_failed(address, e))?;
            Ok(request_on(s, method, path, "localhost", "outrigger").await?)
        }
    }
}

/// One request without a body on `io` (plain or TLS); returns the status.
pub(crate) async fn request_on<S>(
    io: S,
    method: http::Method,
    path: &str,
    host: &str,
    user_agent: &str,
) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method.clone())
        .uri(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, user_agent)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await;
    conn.abort();
    res.map(|r| r.status().as_u16())
        .map_err(|e| format!("{method} {path} failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// A connect or fork refused by the sidecar's own limits is not the app's failure; every
    /// other error is.
    #[test]
    fn own_limits_are_not_the_apps_failure() {
        let at = Address::Tcp("127.0.0.1:9".parse().unwrap());
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
            let e = std::io::Error::from_raw_os_error(code);
            assert!(
                matches!(connect_failed(&at, e), Failure::Sidecar(_)),
                "{code}"
            );
        }
        // EAGAIN on a connect is a unix socket's full backlog: the app's state. On a fork it
        // is the process limit: ours.
        assert!(own_limit(
            &std::io::Error::from_raw_os_error(libc::EAGAIN),
            true
        ));
        for code in [
            libc::ECONNREFUSED,
            libc::ENOENT,
            libc::ETIMEDOUT,
            libc::EAGAIN,
        ] {
            let e = std::io::Error::from_raw_os_error(code);
            assert!(matches!(connect_failed(&at, e), Failure::App(_)), "{code}");
        }
    }

    /// An h2c server answering every call with `message` and `grpc-status: status` in the
    /// trailers, as a gRPC server does.
    async fn server(message: &'static [u8], status: &'static str) -> Address {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = Address::Tcp(listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", status.parse().unwrap());
                    let body = Full::new(Bytes::from_static(message))
                        .with_trailers(async move { Some(Ok(trailers)) });
                    let mut res = http::Response::new(body);
                    res.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(res)
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        address
    }

    #[tokio::test]
    async fn grpc_probes_read_the_status_and_serving() {
        let serving = server(&[0, 0, 0, 0, 2, 0x08, 0x01], "0").await;
        assert_eq!(grpc_health(&serving, GrpcHealth::Health).await, Ok(()));
        assert_eq!(grpc_health(&serving, GrpcHealth::Dapr).await, Ok(()));
        let not_serving = server(&[0, 0, 0, 0, 2, 0x08, 0x02], "0").await;
        let e = grpc_health(&not_serving, GrpcHealth::Health)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not SERVING"), "{e}");
        let unimplemented = server(&[], "12").await;
        let e = grpc_health(&unimplemented, GrpcHealth::Dapr)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("grpc-status 12"), "{e}");
        let nobody = Address::Tcp("127.0.0.1:1".parse().unwrap());
        assert!(grpc_health(&nobody, GrpcHealth::Dapr).await.is_err());
    }
}
