//! Wiring: builds the runtime and the enabled modules, binds every listener eagerly, starts the
//! modules and then the app, serves admin, and turns [`Control`] values into reloads and stops.
//!
//! Start: bind admin and module listeners → start modules → report bound addresses → start the
//! app. Stop (graceful): `/ready` goes 503 → the app gets SIGTERM and what is left of the grace
//! period → modules drain within the grace period → admin stops → exit with the app's code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::admin::{self, AdminState};
use crate::config::{self, Address, Config, ProcessEnv, Source};
use crate::lifecycle::{self, App};
use crate::runtime::{
    self, Control, Health, Module, ReloadOutcome, RunningConfig, State, Stop, supervisor,
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
    rt.block_on(serve(config, options))
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
    let (modules, bound) = build_modules(&config, &metrics).await?;

    let registry = Arc::new(metrics.registry);
    let running = Arc::new(RunningConfig::new(config.clone()));
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(16);
    let (drain_trigger, drain) = runtime::drain();

    let module_tasks: Vec<_> = modules
        .into_iter()
        .map(|m| supervisor::spawn(m, health.clone(), metrics.runtime.clone(), drain.clone()))
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
        write_listeners_file(path, admin_addr, &bound).await?;
    }
    spawn_signal_handlers(control_tx.clone())?;

    let mut app = None;
    if let Some(command) = &config.app.command {
        health.register_component("app");
        let mut env = vec![
            (
                "OUTRIGGER_ADMIN_ADDRESS".to_string(),
                admin_addr.to_string(),
            ),
            ("OUTRIGGER_SERVICE".to_string(), config.service.clone()),
        ];
        env.extend(
            bound
                .iter()
                .map(|(name, address)| (listener_env_name(name), address.to_string())),
        );
        match App::spawn(command, &config.app.env, &env) {
            Ok(a) => {
                info!(pid = a.pid(), program = a.program(), "app started");
                // Probes come with the lifecycle module; until then a running app is ready.
                health.set("app", State::Ready, None);
                app = Some(a);
            }
            Err(e) => {
                error!(program = %command[0], error = %e, "cannot start the app");
                health.set("app", State::Stopped, Some(format!("cannot start: {e}")));
                // 127: what a shell returns for a command it cannot run.
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                stop(
                    Stop::Fast,
                    &config,
                    &health,
                    None,
                    &mut control_rx,
                    drain_trigger,
                    module_tasks,
                    admin_stop_tx,
                    admin_task,
                )
                .await;
                return Ok(code);
            }
        }
    }
    info!(
        service = %config.service,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "outrigger started"
    );

    // Run until a stop is asked for or the app ends.
    let mut app_status = None;
    let stop_kind = loop {
        let app_exit = async {
            match app.as_mut() {
                Some(a) => a.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            control = control_rx.recv() => match control {
                Some(Control::Reload) => reload(&options, &running, &metrics.runtime).await,
                Some(Control::Shutdown { graceful }) => {
                    break if graceful { Stop::Graceful } else { Stop::Fast };
                }
                None => break Stop::Graceful,
            },
            status = app_exit => {
                let status = status.context("cannot wait for the app")?;
                info!(code = lifecycle::exit_code(status), "the app exited; stopping");
                health.set("app", State::Stopped, Some(format!("exited: {status}")));
                app_status = Some(status);
                break Stop::Graceful;
            }
        }
    };
    let app_running = if app_status.is_none() {
        app.as_mut()
    } else {
        None
    };
    let stopped_status = stop(
        stop_kind,
        &config,
        &health,
        app_running,
        &mut control_rx,
        drain_trigger,
        module_tasks,
        admin_stop_tx,
        admin_task,
    )
    .await;
    Ok(app_status
        .or(stopped_status)
        .map(lifecycle::exit_code)
        .unwrap_or(0))
}

/// The modules enabled by the config, each with its listeners bound, and the bound addresses
/// by listener name.
async fn build_modules(
    config: &Config,
    metrics: &Metrics,
) -> Result<(Vec<Arc<dyn Module>>, BTreeMap<String, Address>)> {
    let mut modules: Vec<Arc<dyn Module>> = Vec::new();
    let mut bound = BTreeMap::new();
    #[cfg(feature = "proxy")]
    if let Some((proxy, addresses)) = crate::proxy::Proxy::build(config, &metrics.proxy).await? {
        modules.push(Arc::new(proxy));
        bound.extend(addresses);
    }
    #[cfg(not(feature = "proxy"))]
    let _ = (config, metrics);
    Ok((modules, bound))
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

/// Stops in order: `/ready` 503 → app → modules → admin. Returns the app's status if it ran.
#[allow(clippy::too_many_arguments)]
async fn stop(
    kind: Stop,
    config: &Config,
    health: &Health,
    app: Option<&mut App>,
    control: &mut mpsc::Receiver<Control>,
    drain_trigger: runtime::DrainTrigger,
    module_tasks: Vec<tokio::task::JoinHandle<()>>,
    admin_stop: tokio::sync::oneshot::Sender<()>,
    admin_task: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Option<std::process::ExitStatus> {
    let budget = match kind {
        Stop::Graceful => config.runtime.shutdown_grace.get(),
        Stop::Fast => FAST_STOP.min(config.runtime.shutdown_grace.get()),
    };
    let deadline = Instant::now() + budget;
    info!(kind = ?kind, grace = ?budget, "stopping");
    health.set_draining();

    let mut status = None;
    if let Some(app) = app {
        let signal = match kind {
            Stop::Graceful => Signal::SIGTERM,
            Stop::Fast => Signal::SIGINT,
        };
        // A fast stop (SIGINT, `POST /shutdown?fast=true`) during a graceful one cuts it short.
        let outcome = tokio::select! {
            r = app.stop(signal, deadline) => r,
            _ = fast_requested(control), if kind == Stop::Graceful => {
                app.stop(Signal::SIGINT, Instant::now() + FAST_STOP).await
            }
        };
        match outcome {
            Ok(s) => {
                info!(code = lifecycle::exit_code(s), "the app exited");
                health.set("app", State::Stopped, Some(format!("exited: {s}")));
                status = Some(s);
            }
            Err(e) => error!(error = %e, "cannot wait for the app"),
        }
    }

    drain_trigger.trigger(kind);
    let left = deadline.saturating_duration_since(Instant::now());
    let aborts: Vec<_> = module_tasks.iter().map(|t| t.abort_handle()).collect();
    let join = futures_join_all(module_tasks);
    tokio::pin!(join);
    let drained = tokio::select! {
        r = tokio::time::timeout(left, &mut join) => r.is_ok(),
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
    status
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

/// Reads the config again. A bad file changes nothing and is reported; a good one applies
/// what can change live (the log level) and names what needs a restart.
async fn reload(
    options: &RunOptions,
    running: &RunningConfig,
    metrics: &crate::telemetry::metrics::RuntimeMetrics,
) {
    let source = options.source.clone();
    let loaded = tokio::task::spawn_blocking(move || config::load(&source, &ProcessEnv))
        .await
        .map_err(|e| e.to_string());
    let outcome = match loaded {
        Ok(Ok(new)) => {
            let old = running.config.load_full();
            let mut applied = (*old).clone();
            if new.log.level != old.log.level {
                match options.log_level.set(&new.log.level) {
                    Ok(()) => applied.log.level = new.log.level.clone(),
                    Err(e) => warn!(error = %e, "cannot apply the new log level"),
                }
            }
            let needs_restart = changed_keys(&applied, &new);
            for key in &needs_restart {
                warn!(key, "config changed but takes effect only after a restart");
            }
            running.config.store(Arc::new(applied));
            metrics
                .config_reloads
                .get_or_create(&ResultLabels { result: "success" })
                .inc();
            metrics.config_last_reload_success.set(unix_now());
            info!("config reloaded");
            ReloadOutcome {
                at: unix_now(),
                result: "success",
                errors: Vec::new(),
                needs_restart,
            }
        }
        Ok(Err(e)) => {
            for p in &e.problems {
                error!(problem = %p, "config reload rejected; keeping the running config");
            }
            metrics
                .config_reloads
                .get_or_create(&ResultLabels { result: "failure" })
                .inc();
            ReloadOutcome {
                at: unix_now(),
                result: "failure",
                errors: e.problems.iter().map(ToString::to_string).collect(),
                needs_restart: Vec::new(),
            }
        }
        Err(e) => {
            error!(error = %e, "config reload failed");
            metrics
                .config_reloads
                .get_or_create(&ResultLabels { result: "failure" })
                .inc();
            ReloadOutcome {
                at: unix_now(),
                result: "failure",
                errors: vec![e],
                needs_restart: Vec::new(),
            }
        }
    };
    *running.last_reload.lock().expect("not poisoned") = Some(outcome);
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
                }
                _ => out.push(k.clone()),
            }
        }
    }
    out
}

fn spawn_signal_handlers(control: mpsc::Sender<Control>) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
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
        }
    });
    Ok(())
}

/// Writes `{"admin": "127.0.0.1:PORT", "listeners": {"NAME": "ADDRESS"}}` atomically (temp
/// file + rename), so a reader never sees half of it.
async fn write_listeners_file(
    path: &std::path::Path,
    admin: SocketAddr,
    bound: &BTreeMap<String, Address>,
) -> Result<()> {
    let listeners: BTreeMap<&String, String> =
        bound.iter().map(|(k, v)| (k, v.to_string())).collect();
    let body =
        serde_json::json!({ "admin": admin.to_string(), "listeners": listeners }).to_string();
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, body)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
