//! Wiring, in the order of the lifecycle contract: **bind** admin and every module's listeners
//! → **build** the modules (with what preflight built) → **spawn** them, admin, the signal
//! handlers, the app (its probe opens `/ready` and the inbound gate) and the watchers → **wait**
//! for a stop (serving reloads and forwarded signals meanwhile) → **stop** in order
//! ([`StopSequence`]) → exit with the app's code.
//!
//! Where each behaviour lives: the stop order in `runtime::stop`, signals in `runtime::signals`,
//! live reload in `reload::live` (its diff in `config::diff`), the app's environment in
//! `lifecycle::env` and `bridge::env`, the admin server in `admin`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span};

use crate::admin::{self, AdminState};
use crate::config::proxy::Direction;
use crate::config::{Address, Config, ProcessEnv, Source};
use crate::lifecycle::probe::AppStatus;
use crate::lifecycle::{self, AppEnd, AppSpec, Supervised};
use crate::preflight::Preflight;
use crate::reload::{self, live::LiveReload};
use crate::runtime::stop::{StopSequence, StopSettings};
use crate::runtime::{self, AppGate, Control, Health, Module, RunningConfig, Stop, supervisor};
use crate::telemetry::log::LogLevel;
use crate::telemetry::metrics::Metrics;

pub use crate::runtime::stop::FAST_STOP;

/// Options of `outrigger run` that are not config.
pub struct RunOptions {
    /// Where the config came from, to read it again on reload.
    pub source: Source,
    /// Write the bound addresses here as JSON once every listener is bound.
    pub listeners_file: Option<PathBuf>,
    pub log_level: LogLevel,
}

/// Runs the sidecar until it is stopped; returns the process exit code.
pub fn run(config: Config, built: Preflight, options: RunOptions) -> Result<i32> {
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
    let code = rt.block_on(serve(config, built, options));
    // Every task (and so every access log sender) is gone once the runtime is: the writer
    // then writes what is queued and ends.
    drop(rt);
    #[cfg(feature = "proxy")]
    crate::telemetry::access_log::flush_at_exit(std::time::Duration::from_secs(2));
    code
}

async fn serve(config: Config, built: Preflight, options: RunOptions) -> Result<i32> {
    let started = Instant::now();
    let metrics = Metrics::new();
    let health = Arc::new(Health::new(metrics.runtime.clone()));

    // Bind: everything before starting anything, so a taken port stops start-up here.
    let admin_listener = admin::bind(config.admin.address).await?;
    let admin_addr = admin_listener.local_addr()?;
    // Inbound traffic waits for the app when there is one to wait for.
    let watched_app = config.app.command.is_some() || config.app.lifecycle.probe.is_some();
    let (gate_setter, gate) = runtime::app_gate(!watched_app);
    if watched_app {
        // Before anything can answer `/ready`: it must never be 200 without the app.
        health.register_component("app");
        metrics.runtime.app_ready.set(0);
    }
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(16);

    // Build the modules (binding their listeners) with what preflight built.
    let Built {
        modules,
        bound,
        bridge,
        capture,
    } = build_modules(&config, built, &metrics, &gate, &control_tx).await?;
    #[cfg(feature = "proxy")]
    metrics
        .proxy
        .tls
        .spawn_expiry_task(config.tls.expiry_warning.get());
    let registry = Arc::new(metrics.registry);
    let running = Arc::new(RunningConfig::new(config.clone()));
    let (drain_trigger, drain) = runtime::drain();

    // Spawn: the modules, admin, the signal handlers, the app, the watchers.
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
    let admin_server = admin::serve(
        admin_listener,
        AdminState {
            health: health.clone(),
            registry,
            config: running.clone(),
            log_level: options.log_level.clone(),
            control: control_tx.clone(),
        },
    );
    info!(address = %admin_addr, "admin listening");
    if let Some(path) = &options.listeners_file {
        write_listeners_file(path, admin_addr, &bound, bridge.as_ref()).await?;
    }
    runtime::signals::spawn(control_tx.clone(), &config.app.lifecycle.forward_signals)?;

    let app_status = AppStatus {
        health: health.clone(),
        gate: Arc::new(gate_setter),
        metrics: metrics.runtime.clone(),
        ready: Arc::new(watch::channel(false).0),
    };
    // Supervision mode: the app is ours to start, restart and stop. Otherwise (the app runs in
    // another container) only its probe, if any.
    let mut app: Option<Supervised> = None;
    let mut _probe = None;
    if let Some(command) = &config.app.command {
        lifecycle::reaper::start_if_init();
        #[cfg_attr(not(feature = "bridge"), allow(unused_mut))]
        let mut env = lifecycle::env::sidecar(&config, admin_addr, &bound);
        #[cfg(feature = "bridge")]
        if let (Some(b), Some((http, grpc))) = (&config.bridge, &bridge) {
            env.extend(crate::bridge::env::dapr(b, http, grpc));
        }
        let spec = AppSpec {
            command: command.clone(),
            app_env: config.app.env.clone(),
            env,
            lifecycle: config.app.lifecycle.clone(),
            capture,
        };
        app = Some(lifecycle::supervise(spec, app_status.clone()));
    } else if let Some(probe) = &config.app.lifecycle.probe {
        _probe = Some(AbortOnDrop(tokio::spawn(
            lifecycle::probe::run(probe.clone(), app_status.clone()).instrument(info_span!("app")),
        )));
    }
    let app_handle = app.as_ref().map(|a| a.handle.clone());
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
    let live = LiveReload {
        running: running.clone(),
        metrics: metrics.runtime.clone(),
        modules: modules.clone(),
        log_level: options.log_level.clone(),
    };
    info!(
        service = %config.service,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "outrigger started"
    );

    // Wait: until a stop is asked for or the app ends for good.
    let mut app_end = None;
    let stop_kind = loop {
        let app_ended = async {
            match app.as_mut() {
                Some(a) => a.ended().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            control = control_rx.recv() => match control {
                Some(Control::Reload) => {
                    let source = options.source.clone();
                    live.run(move || load_again(&source), &reloader).await;
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
                let kind = if matches!(end, AppEnd::NotStarted(_)) { Stop::Fast } else { Stop::Graceful };
                if let AppEnd::Exited(s) = &end {
                    info!(code = lifecycle::exit_code(*s), "the app ended; stopping");
                }
                app_end = Some(end);
                break kind;
            }
        }
    };
    let app_running = if app_end.is_none() { app } else { None };

    // Stop: no reload may restart the app or change anything from here on.
    drop(config_watch);
    drop(reloader);
    if let Some(a) = &app_running {
        a.handle.draining();
    }
    let lifecycle = &config.app.lifecycle;
    // An app in another container is served until its probe fails, when it has something to
    // use while it stops (outbound listeners, the bridge).
    let serves_the_app = config.bridge.is_some()
        || config
            .listeners
            .iter()
            .any(|l| l.direction == Direction::Outbound);
    let app_ready =
        (lifecycle.probe.is_some() && serves_the_app).then(|| app_status.ready.subscribe());
    let stopped = StopSequence {
        kind: stop_kind,
        settings: StopSettings {
            grace: config.runtime.shutdown_grace.get(),
            drain_delay: config.runtime.drain_delay.get(),
            stop_signal: lifecycle.stop_signal.0,
            stop_timeout: lifecycle.stop_timeout.get(),
            // An app that already ended needs none of the grace: inbound gets all of it.
            watched_app: app_running.is_some() || lifecycle.probe.is_some(),
        },
        health: &health,
        control: &mut control_rx,
        drain: drain_trigger,
        modules: module_tasks,
        app: app_running,
        app_ready,
        admin: Some(admin_server),
    }
    .run()
    .await;
    info!("stopped");
    Ok(app_end.or(stopped).map_or(0, |end| end.exit_code()))
}

/// Both config stages again, for a live reload: the config and the TLS material built from it.
fn load_again(source: &Source) -> reload::live::Loaded {
    match crate::preflight::load(source, &ProcessEnv) {
        Ok((config, built)) => Ok((config, built.tls)),
        Err(e) => Err(e.problems.iter().map(ToString::to_string).collect()),
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The modules the config enables, built.
struct Built {
    modules: Vec<Arc<dyn Module>>,
    /// Bound addresses by listener name.
    bound: BTreeMap<String, Address>,
    /// The bridge's bound addresses: the HTTP API's, and the gRPC API's (the same when it has
    /// no socket of its own).
    bridge: Option<(Address, Address)>,
    /// Where the app's stdout/stderr lines go for the log agent (`logs` with `app: stdio`).
    capture: Option<lifecycle::capture::Capture>,
}

/// Builds the modules enabled by the config, each with its listeners bound.
async fn build_modules(
    config: &Config,
    built: Preflight,
    metrics: &Metrics,
    gate: &AppGate,
    control: &mpsc::Sender<Control>,
) -> Result<Built> {
    #[cfg_attr(not(any(feature = "proxy", feature = "logs")), allow(unused_mut))]
    let mut modules: Vec<Arc<dyn Module>> = Vec::new();
    #[cfg_attr(not(feature = "proxy"), allow(unused_mut))]
    let mut bound = BTreeMap::new();
    #[cfg(feature = "proxy")]
    let proxy = match crate::proxy::Proxy::build(
        config,
        &built.tls,
        built.otlp_tls.clone(),
        &metrics.proxy,
        gate.clone(),
    )
    .await?
    {
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
    let bridge = match built.bridge {
        Some(prepared) => {
            use crate::bridge::invoke::{Clusters, OwnClusters};
            use crate::bridge::{Bridge, BridgeState};
            let clusters = match proxy {
                Some(p) => Clusters::Proxy(p),
                None => Clusters::Own(Box::new(OwnClusters {
                    configs: config.clusters.clone(),
                    built: Default::default(),
                    metrics: metrics.proxy.clone(),
                    tls: built.tls.clone(),
                })),
            };
            let state = BridgeState::new(
                config,
                prepared,
                gate.clone(),
                control.clone(),
                clusters,
                metrics.bridge.clone(),
                metrics.pubsub.clone(),
            )?;
            let (bridge, addresses) = Bridge::build(state).await?;
            modules.push(Arc::new(bridge));
            Some((addresses.http, addresses.grpc))
        }
        None => None,
    };
    #[cfg(not(feature = "bridge"))]
    let bridge = {
        let _ = (control, built);
        #[cfg(feature = "proxy")]
        drop(proxy);
        None
    };
    // Only with a `logs:` section: no task, file or queue otherwise.
    #[cfg(feature = "logs")]
    let capture = match &config.logs {
        Some(logs) => {
            let (capture, captured) = if logs.captures_app() {
                let (c, r) = lifecycle::capture::capture(logs.app_buffer);
                (Some(c), Some(r))
            } else {
                (None, None)
            };
            modules.push(Arc::new(crate::logs::Logs::new(
                logs.clone(),
                captured,
                metrics.logs.clone(),
            )));
            capture
        }
        None => None,
    };
    #[cfg(not(feature = "logs"))]
    let capture = None;
    Ok(Built {
        modules,
        bound,
        bridge,
        capture,
    })
}

/// Writes `{"admin": "127.0.0.1:PORT", "listeners": {"NAME": "ADDRESS"}, "bridge": "ADDRESS",
/// "bridge_grpc": "ADDRESS"}`
/// atomically (temp file + rename), so a reader never sees half of it.
async fn write_listeners_file(
    path: &std::path::Path,
    admin: SocketAddr,
    bound: &BTreeMap<String, Address>,
    bridge: Option<&(Address, Address)>,
) -> Result<()> {
    let listeners: BTreeMap<&String, String> =
        bound.iter().map(|(k, v)| (k, v.to_string())).collect();
    let mut body = serde_json::json!({ "admin": admin.to_string(), "listeners": listeners });
    if let Some((http, grpc)) = bridge {
        body["bridge"] = serde_json::Value::String(http.to_string());
        body["bridge_grpc"] = serde_json::Value::String(grpc.to_string());
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
