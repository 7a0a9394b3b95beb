//! Wiring: builds the runtime and the enabled modules, binds every listener eagerly, starts the
//! modules and then the app, serves admin, and turns [`Control`] values into reloads and stops.
//!
//! Start: bind admin and module listeners → start modules → report bound addresses → start the
//! app (its probe opens `/ready` and the inbound gate) → watchers. Stop (graceful): `/ready`
//! goes 503 → inbound drains → the app gets `app.stop_signal` and what is left of the grace
//! period while outbound keeps serving it → the rest drains → admin stops → exit with the
//! app's code. Reload: validate, apply what can change live, name the rest.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::admin::{self, AdminState};
use crate::config::{self, Address, Config, ProcessEnv, Source};
use crate::lifecycle::probe::AppStatus;
use crate::lifecycle::{self, AppEnd, AppHandle, AppSpec};
use crate::reload;
use crate::runtime::{
    self, AppGate, Control, Health, Module, ReloadOutcome, RunningConfig, Stop, supervisor,
};
use crate::telemetry::log::LogLevel;
use crate::telemetry::metrics::{Metrics, ResultLabels, unix_now};

/// How long a fast stop (SIGINT, `POST /shutdown?fast=true`) waits for the app and modules.
pub const FAST_STOP: std::time::Duration = std::time::Duration::from_secs(2);

/// Options of `outrigger run` that are not config.
pub struct RunOptions {
    /// Where the config came from, to read it again on reload.
    pub source: Source,
    /// Write the bound addresses here as JSON once every listener is bound.
    pub listeners_file: Option<PathBuf>,
    pub log_level: LogLevel,
}

/// Runs the sidecar until it is stopped; returns the process exit code.
pub fn run(config: Config, options: RunOptions) -> Result<i32> {
    let mut builder = if config.runtime.worker_threads == 1 {
        // One worker: the current-thread scheduler has no cross-thread handoff at all.
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.runtime.worker_threads);
        b
    };
    let rt = builder
        .enable_all()
        .max_blocking_threads(8)
        .thread_name("outrigger")
        .build()
        .context("cannot start the async runtime")?;
    let code = rt.block_on(serve(config, options));
    // Every task (and so every access log sender) is gone once the runtime is: the writer
    // then writes what is queued and ends.
    drop(rt);
    #[cfg(feature = "proxy")]
    crate::telemetry::access_log::flush_at_exit(std::time::Duration::from_secs(2));
    code
}

async fn serve(config: Config, options: RunOptions) -> Result<i32> {
    let started = Instant::now();
    let metrics = Metrics::new();
    let health = Arc::new(Health::new(metrics.runtime.clone()));

    // Bind everything before starting anything: a taken port stops start-up here.
    let admin_listener = TcpListener::bind(config.admin.address)
        .await
        .with_context(|| format!("cannot bind the admin listener on {}", config.admin.address))?;
    let admin_addr = admin_listener.local_addr()?;
    if !config.admin.address.ip().to_canonical().is_loopback() {
        warn!(address = %admin_addr, "the admin API listens beyond loopback; changes are still refused to non-loopback peers");
    }
    // Inbound traffic waits for the app when there is one to wait for.
    let watched_app = config.app.command.is_some() || config.app.lifecycle.probe.is_some();
    let (gate_setter, gate) = runtime::app_gate(!watched_app);
    if watched_app {
        // Before anything can answer `/ready`: it must never be 200 without the app.
        health.register_component("app");
        metrics.runtime.app_ready.set(0);
    }
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(16);
    let (modules, bound, bridge) = build_modules(&config, &metrics, &gate, &control_tx).await?;
    #[cfg(feature = "proxy")]
    metrics
        .proxy
        .tls
        .spawn_expiry_task(config.tls.expiry_warning.get());

    let registry = Arc::new(metrics.registry);
    let running = Arc::new(RunningConfig::new(config.clone()));
    let (drain_trigger, drain) = runtime::drain();

    let module_tasks: Vec<_> = modules
        .iter()
        .map(|m| {
            supervisor::spawn(
                m.clone(),
                health.clone(),
                metrics.runtime.clone(),
                drain.clone(),
            )
        })
        .collect();

    let admin_state = AdminState {
        health: health.clone(),
        registry,
        config: running.clone(),
        log_level: options.log_level.clone(),
        control: control_tx.clone(),
    };
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(
        async move {
            let service =
                admin::router(admin_state).into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(admin_listener, service)
                .with_graceful_shutdown(async {
                    let _ = admin_stop_rx.await;
                })
                .await
        }
        .instrument(info_span!("admin")),
    );
    info!(address = %admin_addr, "admin listening");

    if let Some(path) = &options.listeners_file {
        write_listeners_file(path, admin_addr, &bound, bridge.as_ref()).await?;
    }
    spawn_signal_handlers(control_tx.clone(), &config.app.lifecycle.forward_signals)?;

    let app_status = AppStatus {
        health: health.clone(),
        gate: Arc::new(gate_setter),
        metrics: metrics.runtime.clone(),
        ready: Arc::new(watch::channel(false).0),
    };
    // Supervision mode: the app is ours to start, restart and stop. Otherwise (the app runs in
    // another container) only its probe, if any.
    let mut app: Option<(AppHandle, tokio::task::JoinHandle<AppEnd>)> = None;
    let mut _probe = None;
    if let Some(command) = &config.app.command {
        lifecycle::reaper::start_if_init();
        let spec = AppSpec {
            command: command.clone(),
            app_env: config.app.env.clone(),
            env: app_env(&config, admin_addr, &bound, bridge.as_ref()),
            lifecycle: config.app.lifecycle.clone(),
        };
        app = Some(lifecycle::supervise(spec, app_status.clone()));
    } else if let Some(probe) = &config.app.lifecycle.probe {
        _probe = Some(AbortOnDrop(tokio::spawn(
            lifecycle::probe::run(probe.clone(), app_status.clone()).instrument(info_span!("app")),
        )));
    }
    let app_handle = app.as_ref().map(|(h, _)| h.clone());
    let reloader = reload::Reloader::start(
        config.reload.clone(),
        app_handle.clone(),
        metrics.runtime.clone(),
    );
    let config_watch = match (&config.source, config.runtime.watch_config) {
        (Some(file), true) => Some(AbortOnDrop(reload::watch_config(
            file.clone(),
            control_tx.clone(),
        ))),
        _ => None,
    };
    info!(
        service = %config.service,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "outrigger started"
    );

    // Run until a stop is asked for or the app ends for good.
    let mut app_end = None;
    let stop_kind = loop {
        let app_ended = async {
            match app.as_mut() {
                Some((_, task)) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            control = control_rx.recv() => match control {
                Some(Control::Reload) => {
                    reload(&options, &running, &metrics.runtime, &modules, &reloader).await
                }
                Some(Control::Forward(signal)) => match &app_handle {
                    Some(h) => h.signal(signal),
                    None => debug!(%signal, "no supervised app to pass the signal to"),
                },
                Some(Control::Shutdown { graceful }) => {
                    break if graceful { Stop::Graceful } else { Stop::Fast };
                }
                None => break Stop::Graceful,
            },
            end = app_ended => {
                let end = end.unwrap_or_else(|e| AppEnd::NotStarted(std::io::Error::other(e)));
                let kind = if matches!(end, AppEnd::NotStarted(_)) { Stop::Fast } else { Stop::Graceful };
                if let AppEnd::Exited(s) = &end {
                    info!(code = lifecycle::exit_code(*s), "the app ended; stopping");
                }
                app_end = Some(end);
                break kind;
            }
        }
    };
    let app_running = match (app_end.is_none(), app) {
        (true, Some(pair)) => Some(pair),
        _ => None,
    };
    // No reload may restart the app or change anything while stopping.
    drop(config_watch);
    drop(reloader);
    if let Some((h, _)) = &app_running {
        h.draining();
    }
    let stopped = stop(
        stop_kind,
        &config,
        &health,
        app_running,
        &app_status,
        &mut control_rx,
        drain_trigger,
        module_tasks,
        admin_stop_tx,
        admin_task,
    )
    .await;
    Ok(match app_end.or(stopped) {
        Some(AppEnd::Exited(s)) => lifecycle::exit_code(s),
        // 127: what a shell returns for a command it cannot find; 126: found, cannot run.
        Some(AppEnd::NotStarted(e)) if e.kind() == std::io::ErrorKind::NotFound => 127,
        Some(AppEnd::NotStarted(_)) => 126,
        None => 0,
    })
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the app finds in its environment: where the sidecar and each listener are, and, with
/// the bridge, what Dapr SDKs read (`DAPR_HTTP_PORT`, `DAPR_HTTP_ENDPOINT`, `DAPR_API_TOKEN`,
/// `APP_ID`, `APP_API_TOKEN`).
fn app_env(
    config: &Config,
    admin: SocketAddr,
    bound: &BTreeMap<String, Address>,
    bridge: Option<&Address>,
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
    if let Some(l) = config.listeners.iter().find(|l| {
        l.direction == crate::config::raw::Direction::Outbound
            && l.protocol == crate::config::raw::Protocol::Http
    }) && let Some(address) = bound.get(&l.name)
    {
        env.push(("OUTRIGGER_OUTBOUND_ADDRESS".into(), address.to_string()));
    }
    if let (Some(b), Some(address)) = (&config.bridge, bridge) {
        env.push(("OUTRIGGER_BRIDGE_ADDRESS".into(), address.to_string()));
        env.push(("APP_ID".into(), b.app_id.clone()));
        if let Address::Tcp(a) = address {
            // A wildcard bind is still reached on loopback.
            let ip = if a.ip().is_unspecified() {
                match a {
                    SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
                    SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
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
        if let Some(t) = &b.api_token {
            env.push(("DAPR_API_TOKEN".into(), t.expose().to_string()));
        }
        if let Some(t) = &b.app_api_token {
            env.push(("APP_API_TOKEN".into(), t.expose().to_string()));
        }
    }
    env
}

/// The modules enabled by the config, each with its listeners bound, the bound addresses by
/// listener name, and the bridge's bound address.
async fn build_modules(
    config: &Config,
    metrics: &Metrics,
    gate: &AppGate,
    control: &mpsc::Sender<Control>,
) -> Result<(
    Vec<Arc<dyn Module>>,
    BTreeMap<String, Address>,
    Option<Address>,
)> {
    #[cfg_attr(not(feature = "proxy"), allow(unused_mut))]
    let mut modules: Vec<Arc<dyn Module>> = Vec::new();
    #[cfg_attr(not(feature = "proxy"), allow(unused_mut))]
    let mut bound = BTreeMap::new();
    #[cfg(feature = "proxy")]
    let proxy = match crate::proxy::Proxy::build(config, &metrics.proxy, gate.clone()).await? {
        Some((proxy, addresses)) => {
            let proxy = Arc::new(proxy);
            modules.push(proxy.clone());
            bound.extend(addresses);
            Some(proxy)
        }
        None => None,
    };
    #[cfg(not(feature = "proxy"))]
    let _ = (config, metrics, gate);
    // Only with a `bridge:` section: no socket, store or thread otherwise.
    #[cfg(feature = "bridge")]
    let bridge = match &config.bridge {
        Some(b) => {
            use crate::bridge::invoke::{Clusters, OwnClusters};
            use crate::bridge::{Bridge, BridgeState};
            let clusters = match proxy {
                Some(p) => Clusters::Proxy(p),
                None => Clusters::Own(Box::new(OwnClusters {
                    configs: config.clusters.clone(),
                    built: Default::default(),
                    metrics: metrics.proxy.clone(),
                })),
            };
            let state = BridgeState::new(
                config,
                b,
                gate.clone(),
                control.clone(),
                clusters,
                metrics.bridge.clone(),
                metrics.pubsub.clone(),
            )?;
            let (bridge, address) = Bridge::build(state).await?;
            modules.push(Arc::new(bridge));
            Some(address)
        }
        None => None,
    };
    #[cfg(not(feature = "bridge"))]
    let bridge = {
        let _ = control;
        #[cfg(feature = "proxy")]
        drop(proxy);
        None
    };
    Ok((modules, bound, bridge))
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

/// Stops in the order of the lifecycle contract: `/ready` 503 → inbound stops accepting and
/// drains → the app gets its stop signal and the rest of the grace period (outbound keeps
/// serving it meanwhile) → everything else drains → admin stops. A fast stop asked for on the
/// way cuts the rest short. Returns how the app ended, if it was still running.
#[allow(clippy::too_many_arguments)]
async fn stop(
    kind: Stop,
    config: &Config,
    health: &Health,
    app: Option<(AppHandle, tokio::task::JoinHandle<AppEnd>)>,
    app_status: &AppStatus,
    control: &mut mpsc::Receiver<Control>,
    drain_trigger: runtime::DrainTrigger,
    module_tasks: Vec<tokio::task::JoinHandle<()>>,
    admin_stop: tokio::sync::oneshot::Sender<()>,
    admin_task: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Option<AppEnd> {
    let mut kind = kind;
    let grace = config.runtime.shutdown_grace.get();
    let mut deadline = Instant::now()
        + match kind {
            Stop::Graceful => grace,
            Stop::Fast => FAST_STOP.min(grace),
        };
    info!(kind = ?kind, grace = ?deadline.saturating_duration_since(Instant::now()), "stopping");
    health.set_draining();
    let lifecycle = &config.app.lifecycle;
    let watched_app = app.is_some() || lifecycle.probe.is_some();

    // 0. Optionally keep accepting for a while with `/ready` at 503, while load balancers
    //    (Kubernetes endpoints, ingresses) notice.
    let delay = config.runtime.drain_delay.get();
    if kind == Stop::Graceful && !delay.is_zero() {
        info!(delay = ?delay, "still accepting while load balancers notice /ready 503");
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.min(Instant::now() + delay).into()) => {}
            _ = fast_requested(control) => {
                kind = Stop::Fast;
                deadline = deadline.min(Instant::now() + FAST_STOP);
            }
        }
    }

    // 1. Inbound: stop accepting, finish in-flight requests; keep `stop_timeout` for the app.
    //    A fast stop does not wait: the app gets SIGINT at once.
    drain_trigger.trigger_inbound(kind);
    if kind == Stop::Graceful {
        let inbound_deadline = if watched_app {
            deadline
                .checked_sub(lifecycle.stop_timeout.get())
                .unwrap_or_else(Instant::now)
        } else {
            deadline
        };
        let inbound =
            tokio::time::timeout_at(inbound_deadline.into(), drain_trigger.inbound_drained());
        tokio::select! {
            r = inbound => match r {
                Ok(()) => info!("inbound drained"),
                Err(_) => warn!("inbound did not drain in time; going on"),
            },
            _ = fast_requested(control) => {
                kind = Stop::Fast;
                deadline = deadline.min(Instant::now() + FAST_STOP);
            }
        }
    }

    // 2. The app: its stop signal, then SIGKILL at the deadline. Outbound still serves it.
    let mut end = None;
    if let Some((handle, mut task)) = app {
        let signal = match kind {
            Stop::Graceful => lifecycle.stop_signal.0,
            Stop::Fast => Signal::SIGINT,
        };
        handle.stop(signal, deadline);
        let ended = tokio::select! {
            r = &mut task => r,
            _ = fast_requested(control), if kind == Stop::Graceful => {
                kind = Stop::Fast;
                deadline = deadline.min(Instant::now() + FAST_STOP);
                handle.stop(Signal::SIGINT, deadline);
                (&mut task).await
            }
        };
        end = Some(ended.unwrap_or_else(|e| AppEnd::NotStarted(std::io::Error::other(e))));
    } else if lifecycle.probe.is_some()
        && kind == Stop::Graceful
        && (config.bridge.is_some()
            || config
                .listeners
                .iter()
                .any(|l| l.direction == crate::config::raw::Direction::Outbound))
    {
        // The app runs in another container and gets its own SIGTERM: serve its outbound
        // (and bridge) calls until its probe says it is gone, or the grace period ends.
        let mut ready = app_status.ready.subscribe();
        let gone = tokio::time::timeout_at(deadline.into(), ready.wait_for(|r| !*r));
        tokio::select! {
            r = gone => match r {
                Ok(_) => info!("the app is gone"),
                Err(_) => warn!("the app still answers its probe at the end of the grace period"),
            },
            _ = fast_requested(control) => {
                kind = Stop::Fast;
                deadline = deadline.min(Instant::now() + FAST_STOP);
            }
        }
    }

    // 3. Everything else: outbound, and whatever inbound is left.
    drain_trigger.trigger(kind);
    let aborts: Vec<_> = module_tasks.iter().map(|t| t.abort_handle()).collect();
    let join = futures_join_all(module_tasks);
    tokio::pin!(join);
    let drained = tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), &mut join) => r.is_ok(),
        _ = fast_requested(control), if kind == Stop::Graceful => {
            tokio::time::timeout(FAST_STOP, &mut join).await.is_ok()
        }
    };
    if !drained {
        warn!("modules did not drain within the grace period; stopping them now");
        aborts.iter().for_each(|a| a.abort());
    }

    let _ = admin_stop.send(());
    match tokio::time::timeout(std::time::Duration::from_secs(1), admin_task).await {
        Ok(Ok(Err(e))) => error!(error = %e, "admin server failed"),
        Err(_) => warn!("admin server did not stop in time"),
        _ => {}
    }
    info!("stopped");
    end
}

/// Resolves when a fast stop is asked for; other requests are ignored while stopping.
async fn fast_requested(control: &mut mpsc::Receiver<Control>) {
    loop {
        match control.recv().await {
            Some(Control::Shutdown { graceful: false }) => {
                info!("fast stop requested; cutting the graceful stop short");
                return;
            }
            Some(other) => debug!(request = ?other, "ignored while stopping"),
            None => std::future::pending().await,
        }
    }
}

async fn futures_join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Reads the config again. A bad file changes nothing and is reported; a good one is applied
/// live (routes, clusters, limits, log level, reload entries) and what cannot change live
/// (listener addresses, the admin address, runtime and app settings) is kept as it was and
/// named as needing a restart.
async fn reload(
    options: &RunOptions,
    running: &RunningConfig,
    metrics: &crate::telemetry::metrics::RuntimeMetrics,
    modules: &[Arc<dyn Module>],
    reloader: &reload::Reloader,
) {
    let source = options.source.clone();
    let loaded = tokio::task::spawn_blocking(move || config::load(&source, &ProcessEnv))
        .await
        .map_err(|e| vec![e.to_string()]);
    let loaded = match loaded {
        Ok(Ok(new)) => Ok(new),
        Ok(Err(e)) => Err(e.problems.iter().map(ToString::to_string).collect()),
        Err(e) => Err(e),
    };
    let outcome = match loaded {
        Ok(new) => {
            let old = running.config.load_full();
            let (applied, needs_restart) = live_part(&old, &new);
            let applied = Arc::new(applied);
            let mut failed = Vec::new();
            for m in modules {
                if let Err(e) = m.clone().reload(applied.clone()).await {
                    error!(module = m.name(), error = %e, "the module could not apply the new config; it keeps the old one");
                    failed.push(format!("{}: {e}", m.name()));
                }
            }
            if failed.is_empty() {
                if applied.log.level != old.log.level
                    && let Err(e) = options.log_level.set(&applied.log.level)
                {
                    warn!(error = %e, "cannot apply the new log level");
                }
                reloader.update(applied.reload.clone());
                for key in &needs_restart {
                    warn!(key, "config changed but takes effect only after a restart");
                }
                running.config.store(applied);
                info!(needs_restart = needs_restart.len(), "config reloaded");
                ReloadOutcome {
                    at: unix_now(),
                    result: "success",
                    errors: Vec::new(),
                    needs_restart,
                }
            } else {
                // The running config stays what /config shows (a module that failed kept its
                // old config; with one module there is nothing half-applied).
                ReloadOutcome {
                    at: unix_now(),
                    result: "failure",
                    errors: failed,
                    needs_restart: Vec::new(),
                }
            }
        }
        Err(errors) => {
            for p in &errors {
                error!(problem = %p, "config reload rejected; keeping the running config");
            }
            ReloadOutcome {
                at: unix_now(),
                result: "failure",
                errors,
                needs_restart: Vec::new(),
            }
        }
    };
    metrics
        .config_reloads
        .get_or_create(&ResultLabels {
            result: outcome.result,
        })
        .inc();
    if outcome.result == "success" {
        metrics.config_last_reload_success.set(unix_now());
    }
    *running.last_reload.lock().expect("not poisoned") = Some(outcome);
}

/// What of `new` can be applied live: `new`, with the keys that cannot change while running
/// kept from `old`; and the names of those keys that differ.
fn live_part(old: &Config, new: &Config) -> (Config, Vec<String>) {
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
                if n.direction != l.direction || n.protocol != l.protocol || n.cluster != l.cluster
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
    applied.listeners = listeners;
    // The bridge's socket, stores and tokens are set up once.
    applied.bridge = old.bridge.clone();
    let mut keys = changed_keys(&applied, new);
    keys.retain(|k| k != "listeners");
    // Header values serialize redacted, so a rotated token would look unchanged.
    if applied.telemetry.tracing.otlp != new.telemetry.tracing.otlp
        && !keys.iter().any(|k| k == "telemetry.tracing")
    {
        keys.push("telemetry.tracing".to_string());
    }
    keys.extend(restart);
    (applied, keys)
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
    }
    out
}

fn spawn_signal_handlers(
    control: mpsc::Sender<Control>,
    forward: &[crate::config::lifecycle::SignalName],
) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let forward_hup = forward.iter().any(|s| s.0 == Signal::SIGHUP);
    {
        let control = control.clone();
        tokio::spawn(async move {
            loop {
                let (name, c) = tokio::select! {
                    _ = term.recv() => ("SIGTERM", Control::Shutdown { graceful: true }),
                    _ = int.recv() => ("SIGINT", Control::Shutdown { graceful: false }),
                    _ = hup.recv() => ("SIGHUP", Control::Reload),
                };
                info!(signal = name, "signal received");
                if control.send(c).await.is_err() {
                    return;
                }
                if name == "SIGHUP"
                    && forward_hup
                    && control
                        .send(Control::Forward(Signal::SIGHUP))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
    }
    // The others are only passed on.
    for s in forward.iter().filter(|s| s.0 != Signal::SIGHUP) {
        let sig = s.0;
        let mut stream = signal(SignalKind::from_raw(sig as i32))
            .with_context(|| format!("cannot handle {sig}"))?;
        let control = control.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                info!(signal = %sig, "signal received; passing it to the app");
                if control.send(Control::Forward(sig)).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// Writes `{"admin": "127.0.0.1:PORT", "listeners": {"NAME": "ADDRESS"}, "bridge": "ADDRESS"}`
/// atomically (temp file + rename), so a reader never sees half of it.
async fn write_listeners_file(
    path: &std::path::Path,
    admin: SocketAddr,
    bound: &BTreeMap<String, Address>,
    bridge: Option<&Address>,
) -> Result<()> {
    let listeners: BTreeMap<&String, String> =
        bound.iter().map(|(k, v)| (k, v.to_string())).collect();
    let mut body = serde_json::json!({ "admin": admin.to_string(), "listeners": listeners });
    if let Some(b) = bridge {
        body["bridge"] = serde_json::Value::String(b.to_string());
    }
    let body = body.to_string();
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, body)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
