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
use crate::runtime::upgrade::{self, Successor};
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
    /// `--upgrade`: take over the listening sockets and app of the running Outrigger.
    pub upgrade: bool,
    /// `--upgrade-socket`: where (instead of `runtime.upgrade_socket` or its default).
    pub upgrade_socket: Option<PathBuf>,
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

async fn serve(mut config: Config, built: Preflight, options: RunOptions) -> Result<i32> {
    let started = Instant::now();
    let metrics = Metrics::new();
    let health = Arc::new(Health::new(metrics.runtime.clone()));
    // What `/config` shows and reloads compare with: the config as written, before an
    // upgrade gives its port-0 addresses the ports it inherited.
    let as_configured = config.clone();
    let upgrade_socket = options.upgrade_socket.clone().or_else(|| {
        upgrade::socket_path(config.runtime.upgrade_socket.as_ref(), config.admin.address)
    });
    // Hot restart: take over the running Outrigger's sockets before binding anything.
    let successor = if options.upgrade {
        let path = upgrade_socket.as_deref().context(
            "--upgrade: nowhere to find the running Outrigger; give --upgrade-socket PATH or set runtime.upgrade_socket (there is no default with an admin port of 0)",
        )?;
        let s = Successor::connect(path, config.runtime.upgrade_timeout.get())?;
        pin_inherited_ports(&mut config, &s);
        Some(s)
    } else {
        None
    };
    let server_info = Arc::new(upgrade::ServerInfo::new(
        successor.as_ref().map_or(0, |s| s.generation),
        successor.as_ref().map(|s| s.parent_pid),
        upgrade_socket.clone(),
    ));

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
        dashboard,
    } = build_modules(&config, built, &metrics, &gate, &control_tx).await?;
    #[cfg(feature = "proxy")]
    metrics
        .proxy
        .tls
        .spawn_expiry_task(config.tls.expiry_warning.get());
    let registry = Arc::new(metrics.registry);
    let running = Arc::new(RunningConfig::new(as_configured));
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
            server_info: server_info.clone(),
            sources: Arc::new(admin::status::Sources {
                started_at: crate::telemetry::metrics::unix_now() - started.elapsed().as_secs_f64(),
                bound: bound
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                bridge_address: bridge.as_ref().map(|(http, _)| http.to_string()),
                runtime: metrics.runtime.clone(),
                tls: metrics.proxy.tls.clone(),
                logs: metrics.logs.clone(),
                #[cfg(feature = "proxy")]
                proxy: dashboard.proxy,
                #[cfg(feature = "bridge")]
                bridge: dashboard.bridge,
                history: Default::default(),
            }),
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
    if watched_app && successor.as_ref().is_some_and(|s| s.app_ready) {
        // The app (still running, about to be handed over) passed its probe in the old
        // process: no gate closes for it here; its probe here confirms it or not.
        app_status.set_ready();
    }

    // Hot restart, new side: once every module is up, the old process hands over the app
    // and drains. Until then it serves alone; if we fail before, it carries on.
    let (handover_tx, mut handover_rx) = mpsc::channel::<upgrade::Handover>(1);
    let inherited_app = match successor {
        Some(s) => {
            let timeout = config.runtime.upgrade_timeout.get();
            let ready = async {
                while !health.report_modules().ready {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(timeout, ready).await.map_err(|_| {
                anyhow::anyhow!(
                    "the modules were not ready within runtime.upgrade_timeout ({timeout:?}): {:?}; the old process keeps serving",
                    health.report_modules().not_ready
                )
            })?;
            upgrade::close_untaken();
            let app = tokio::task::spawn_blocking(move || s.started())
                .await
                .context("the upgrade task failed")??;
            info!(generation = server_info.generation, parent_pid = ?server_info.parent_pid, "took over from the previous Outrigger");
            app
        }
        None => None,
    };
    let names = socket_names(admin_addr, &bound, bridge.as_ref());
    // A socket asked for by name must work; the default one is a convenience: where it
    // cannot be made (a read-only /tmp, another user's file), there is just no hot restart.
    let explicit = options.upgrade_socket.is_some()
        || matches!(
            config.runtime.upgrade_socket,
            Some(crate::config::UpgradeSocket::Path(_))
        );
    let upgrade_server = match &upgrade_socket {
        Some(path) => match upgrade::UpgradeServer::start(
            path,
            names,
            server_info.generation,
            config.runtime.upgrade_timeout.get(),
            handover_tx.clone(),
            options.upgrade,
            // The app's readiness, as the upgrade socket reports it to a successor.
            app_status.ready.subscribe(),
        ) {
            Ok(s) => Some(s),
            // Having taken over, failing now would leave nobody serving.
            Err(e) if !explicit || options.upgrade => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "no hot restart: the upgrade socket cannot be served"
                );
                None
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let invocation = upgrade::Invocation::current();

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
        let adopt = inherited_app.map(|(a, fds)| {
            let mut fds = fds.into_iter();
            let pidfd = fds.next().expect("checked: the pidfd comes first");
            lifecycle::Adopted {
                pid: a.pid,
                pidfd,
                program: a.program,
                ready: a.ready,
                stdio: fds.next().zip(fds.next()),
            }
        });
        let spec = AppSpec {
            command: command.clone(),
            app_env: config.app.env.clone(),
            env,
            lifecycle: config.app.lifecycle.clone(),
            capture,
            adopt,
        };
        app = Some(lifecycle::supervise(spec, app_status.clone()));
    } else if let Some((a, _)) = &inherited_app {
        // The old process supervised an app this config has no command for: it runs on,
        // unsupervised.
        tracing::warn!(pid = a.pid, program = %a.program, "the previous Outrigger supervised an app, but this config has no app.command: it keeps running unsupervised");
        if let Some(probe) = &config.app.lifecycle.probe {
            _probe = Some(AbortOnDrop(tokio::spawn(
                lifecycle::probe::run(probe.clone(), app_status.clone())
                    .instrument(info_span!("app")),
            )));
        }
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
    // systemd follows the new main process after a hot restart.
    upgrade::notify_systemd(&format!("READY=1\nMAINPID={}\n", std::process::id()));
    // Start-up's code pages out of the resident set, 2 s from now (runtime.code_pages).
    crate::memory::after_start(config.runtime.code_pages);

    // Wait: until a stop is asked for, the app ends for good, or a new process takes over.
    let mut app_end = None;
    let mut handed_over = false;
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
                Some(Control::Upgrade) => start_successor(upgrade_server.as_ref(), invocation.as_ref()),
                None => break Stop::Graceful,
            },
            Some(h) = handover_rx.recv() => {
                let released = match &app {
                    Some(a) => a.handle.release().await,
                    None => Ok(None),
                };
                let refused = released.is_err();
                let _ = h.reply.send(released);
                if refused {
                    continue;
                }
                // The successor acknowledges the app before anything here stops.
                let taken = matches!(h.outcome.await, Ok(Ok(())));
                if let Some(a) = &app {
                    a.handle.released(taken);
                }
                if !taken {
                    tracing::warn!(successor_pid = h.successor_pid, "the new Outrigger failed during the hand-over; still serving");
                    continue;
                }
                info!(successor_pid = h.successor_pid, "a new Outrigger took over; draining");
                // systemd follows the new main process even if it never says so itself.
                upgrade::notify_systemd(&format!("MAINPID={}\n", h.successor_pid));
                handed_over = true;
                break Stop::Graceful;
            }
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
    let app_running = if app_end.is_none() && !handed_over {
        app
    } else {
        None
    };

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
    let app_ready = (lifecycle.probe.is_some() && serves_the_app && !handed_over)
        .then(|| app_status.ready.subscribe());
    let admin_server = if handed_over {
        // The new process answers admin requests on the same socket from now on: ours
        // stops accepting at once (finishing what it has) instead of saying 503 to probes.
        let _ = admin_server.stop.send(());
        runtime::stop::AdminServer {
            stop: tokio::sync::oneshot::channel().0,
            task: admin_server.task,
        }
    } else {
        admin_server
    };
    if handed_over {
        drain_trigger.hand_over();
    }
    let stopped = StopSequence {
        kind: stop_kind,
        settings: StopSettings {
            grace: config.runtime.shutdown_grace.get(),
            // Nobody needs to notice a hand-over: the new process accepts on the same sockets.
            drain_delay: if handed_over {
                std::time::Duration::ZERO
            } else {
                config.runtime.drain_delay.get()
            },
            stop_signal: lifecycle.stop_signal.0,
            stop_timeout: lifecycle.stop_timeout.get(),
            // An app that already ended (or was handed over) needs none of the grace.
            watched_app: app_running.is_some() || (lifecycle.probe.is_some() && !handed_over),
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

/// Starts a new Outrigger from our binary path and arguments, with `--upgrade` (SIGUSR2,
/// `POST /upgrade`). It takes over when it is ready; if it fails, it says why on its own
/// output, and this process, which never stopped serving, logs its exit.
fn start_successor(
    server: Option<&upgrade::UpgradeServer>,
    invocation: Option<&upgrade::Invocation>,
) {
    let (Some(server), Some(invocation)) = (server, invocation) else {
        tracing::warn!(
            "cannot upgrade: no upgrade socket (set runtime.upgrade_socket; the default needs a fixed admin port)"
        );
        return;
    };
    match invocation.spawn_successor(server.path()) {
        Ok(mut child) => {
            let pid = child.id();
            info!(pid, exe = %invocation.exe.display(), "started a new Outrigger to take over");
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await {
                    tracing::warn!(pid, %status, "the new Outrigger exited");
                }
            });
        }
        Err(e) => {
            tracing::warn!(exe = %invocation.exe.display(), error = %e, "cannot start a new Outrigger; still serving")
        }
    }
}

/// Gives port-0 addresses the ports the old process had for the same names, so the sockets
/// it hands over are used (and the app's `DAPR_HTTP_PORT` & co. stay true).
fn pin_inherited_ports(config: &mut Config, successor: &Successor) {
    let admin = Address::Tcp(config.admin.address);
    if let Some(Address::Tcp(a)) = successor.pinned("admin", &admin) {
        config.admin.address = a;
    }
    for l in &mut config.listeners {
        if let Some(a) = successor.pinned(&format!("listener:{}", l.name), &l.address) {
            l.address = a;
        }
    }
    if let Some(b) = &mut config.bridge {
        if let Some(a) = successor.pinned("bridge", &b.address) {
            b.address = a;
        }
        if let Some(g) = &mut b.grpc_address
            && let Some(a) = successor.pinned("bridge_grpc", g)
        {
            *g = a;
        }
    }
}

/// The names of our listening sockets by address, for a successor's [`pin_inherited_ports`].
fn socket_names(
    admin: SocketAddr,
    bound: &BTreeMap<String, Address>,
    bridge: Option<&(Address, Address)>,
) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    names.insert(admin.to_string(), "admin".to_string());
    for (name, address) in bound {
        names.insert(address.to_string(), format!("listener:{name}"));
    }
    if let Some((http, grpc)) = bridge {
        names
            .entry(grpc.to_string())
            .or_insert("bridge_grpc".into());
        names.insert(http.to_string(), "bridge".into());
    }
    names
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
    /// What the admin dashboard reads (`GET /status`).
    dashboard: DashboardHandles,
}

/// The modules' shared state the admin dashboard reads.
#[derive(Default)]
struct DashboardHandles {
    #[cfg(feature = "proxy")]
    proxy: Option<Arc<crate::proxy::Proxy>>,
    #[cfg(feature = "bridge")]
    bridge: Option<Arc<crate::bridge::BridgeState>>,
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
    // Taken before the bridge takes the rest of `built`.
    #[cfg(feature = "logs")]
    let logs_tls = built.logs_tls.clone();
    // The access log as a log source: its writer hands each line over (set before the proxy
    // starts the writer).
    #[cfg(feature = "logs")]
    let access_lines = config
        .logs
        .as_ref()
        .and_then(|l| l.sources.iter().find(|s| s.is_access_log()))
        .map(|source| {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::logs::ACCESS_QUEUE);
            let dropped = metrics
                .logs
                .dropped
                .get_or_create(&crate::telemetry::metrics::LogDropLabels {
                    source: source.name.clone(),
                    reason: "buffer_full",
                })
                .clone();
            #[cfg(feature = "proxy")]
            crate::telemetry::access_log::set_tap(crate::telemetry::access_log::Tap {
                tx,
                dropped,
            });
            #[cfg(not(feature = "proxy"))]
            drop((tx, dropped));
            rx
        });
    #[cfg_attr(not(feature = "proxy"), allow(unused_mut))]
    let mut bound = BTreeMap::new();
    #[cfg_attr(not(any(feature = "proxy", feature = "bridge")), allow(unused_mut))]
    let mut dashboard = DashboardHandles::default();
    // Here, not in the proxy: a mesh with neither `app.address` nor `mesh.outbound_address`
    // has no listener, so no proxy, only the bridge.
    if let Some(m) = &config.mesh {
        for w in m.warnings(config.app.address.is_some()) {
            tracing::warn!("{w}");
        }
    }
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
            dashboard.proxy = Some(proxy.clone());
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
            // Made on the bridge's runtime: a task or timer it starts wakes the bridge's
            // thread, not the proxy's workers.
            let state = crate::bridge::isolation::build(|| {
                BridgeState::new(
                    config,
                    prepared,
                    gate.clone(),
                    control.clone(),
                    clusters,
                    metrics.bridge.clone(),
                    metrics.pubsub.clone(),
                )
            })?;
            let (bridge, addresses) = Bridge::build(state).await?;
            dashboard.bridge = Some(bridge.state().clone());
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
                logs_tls,
                metrics.proxy.tls.clone(),
                access_lines,
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
        dashboard,
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
