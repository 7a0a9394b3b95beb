//! The config reloader: `reload:` entries watch files or directories (including Kubernetes
//! ConfigMap/Secret volumes) and, once per effective content change, signal the app, call a
//! webhook, or restart the app. Also the watcher of Outrigger's own config file, which asks
//! for a reload through [`Control::Reload`].
//!
//! [`crate::watch`] turns raw file events into debounced, content-checked changes; this module runs
//! one task per entry and swaps the set of entries when the config is reloaded.

pub mod live;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch as channel};
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::lifecycle::{ReloadAction, ReloadConfig, WebhookConfig};
use crate::lifecycle::AppHandle;
use crate::runtime::Control;
use crate::telemetry::metrics::{ReloadLabels, ReloadResultLabels, RuntimeMetrics, unix_now};
use crate::watch::{Watch, WatchSpec};

/// A watch that cannot start (its directory is missing) is tried again this often.
const RETRY_START: Duration = Duration::from_secs(5);
/// Webhook retries wait this long, doubled each time.
const WEBHOOK_BACKOFF: Duration = Duration::from_millis(200);

/// Runs the `reload:` entries; dropping it stops them.
pub struct Reloader {
    entries: channel::Sender<Vec<ReloadConfig>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reloader {
    pub fn start(
        entries: Vec<ReloadConfig>,
        app: Option<AppHandle>,
        metrics: RuntimeMetrics,
    ) -> Reloader {
        for e in &entries {
            register(&metrics, &e.name);
        }
        let (tx, rx) = channel::channel(entries);
        let task = tokio::spawn(run(rx, app, metrics));
        Reloader { entries: tx, task }
    }

    /// Replaces the entries (after a config reload); an unchanged set keeps running untouched.
    pub fn update(&self, entries: Vec<ReloadConfig>) {
        self.entries.send_if_modified(|current| {
            if *current == entries {
                false
            } else {
                *current = entries;
                true
            }
        });
    }
}

/// Every entry's series exist from the start, so a scrape can tell "none" from "unknown".
fn register(metrics: &RuntimeMetrics, name: &str) {
    let reload = name.to_string();
    let _ = metrics.reload_changes.get_or_create(&ReloadLabels {
        reload: reload.clone(),
    });
    for result in ["success", "failure"] {
        let _ = metrics.reload_actions.get_or_create(&ReloadResultLabels {
            reload: reload.clone(),
            result,
        });
    }
}

/// The running entries by name; aborted when dropped.
struct Running(HashMap<String, (ReloadConfig, tokio::task::JoinHandle<()>)>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, task) in self.0.values() {
            task.abort();
        }
    }
}

async fn run(
    mut entries: channel::Receiver<Vec<ReloadConfig>>,
    app: Option<AppHandle>,
    metrics: RuntimeMetrics,
) {
    let mut running = Running(HashMap::new());
    loop {
        let current = entries.borrow_and_update().clone();
        // Entries that did not change keep running: their watches keep their baseline and a
        // change being debounced (or a webhook being retried) is not lost.
        running.0.retain(|name, (config, task)| {
            let keep = current.iter().any(|c| c == config);
            if !keep {
                info!(reload = %name, "reload entry changed or removed; stopping its watch");
                task.abort();
            }
            keep
        });
        for e in current {
            if running.0.contains_key(&e.name) {
                continue;
            }
            register(&metrics, &e.name);
            let span = info_span!("reload", reload = %e.name);
            let task =
                tokio::spawn(entry(e.clone(), app.clone(), metrics.clone()).instrument(span));
            running.0.insert(e.name.clone(), (e, task));
        }
        if entries.changed().await.is_err() {
            return;
        }
    }
}

/// Watches one entry's path and acts once per change.
async fn entry(e: ReloadConfig, app: Option<AppHandle>, metrics: RuntimeMetrics) {
    let mut watch = loop {
        match Watch::start(WatchSpec {
            paths: vec![e.watch.clone()],
            quiet: e.quiet.get(),
            max_delay: e.max_delay.get(),
        }) {
            Ok(w) => break w,
            Err(err) => {
                error!(path = %e.watch.display(), error = %err, "cannot watch; trying again");
                tokio::time::sleep(RETRY_START).await;
            }
        }
    };
    info!(path = %e.watch.display(), action = describe(&e.action), "watching");
    let labels = ReloadLabels {
        reload: e.name.clone(),
    };
    loop {
        watch.changed().await;
        metrics.reload_changes.get_or_create(&labels).inc();
        info!(path = %e.watch.display(), action = describe(&e.action), "content changed");
        let outcome = match act(&e.action, app.as_ref()).await {
            Ok(()) => {
                metrics
                    .reload_last_success
                    .get_or_create(&labels)
                    .set(unix_now());
                "success"
            }
            Err(err) => {
                error!(path = %e.watch.display(), error = %err, "reload action failed");
                "failure"
            }
        };
        metrics
            .reload_actions
            .get_or_create(&ReloadResultLabels {
                reload: e.name.clone(),
                result: outcome,
            })
            .inc();
    }
}

fn describe(action: &ReloadAction) -> String {
    match action {
        ReloadAction::Signal(s) => format!("signal {}", s.0),
        ReloadAction::Webhook(w) => format!("webhook {} {}", w.method, w.url),
        ReloadAction::Restart => "restart".into(),
    }
}

async fn act(action: &ReloadAction, app: Option<&AppHandle>) -> Result<(), String> {
    match action {
        ReloadAction::Signal(s) => {
            let app = app.ok_or("no supervised app to signal")?;
            app.signal(s.0);
            Ok(())
        }
        ReloadAction::Restart => {
            let app = app.ok_or("no supervised app to restart")?;
            app.restart();
            Ok(())
        }
        ReloadAction::Webhook(w) => webhook(w).await,
    }
}

/// Calls the webhook, retrying on connection errors and unexpected statuses.
async fn webhook(w: &WebhookConfig) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..=w.retries {
        if attempt > 0 {
            tokio::time::sleep(WEBHOOK_BACKOFF * 2u32.saturating_pow(attempt - 1)).await;
        }
        match tokio::time::timeout(w.timeout.get(), call(w)).await {
            Ok(Ok(status)) => {
                let ok = match w.expect {
                    Some(code) => status == code,
                    None => (200..300).contains(&status),
                };
                if ok {
                    info!(url = %w.url, status, "webhook called");
                    return Ok(());
                }
                last = format!("{} {} answered {status}", w.method, w.url);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("{} {}: no answer within {}", w.method, w.url, w.timeout),
        }
        warn!(attempt, error = %last, "webhook attempt failed");
    }
    Err(last)
}

async fn call(w: &WebhookConfig) -> Result<u16, String> {
    let uri: http::Uri = w.url.parse().map_err(|e| format!("{e}"))?;
    let stream = TcpStream::connect(&w.authority)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", w.authority))?;
    if uri.scheme_str() == Some("https") {
        // Verified against `ca` or the system's roots, by the URL's host.
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let (connector, name) =
            crate::tls::https_connector(w.ca.as_deref(), &host).map_err(|e| e.to_string())?;
        let stream = connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS with {} failed: {e}", w.authority))?;
        return send(w, &uri, stream).await;
    }
    send(w, &uri, stream).await
}

async fn send<S>(w: &WebhookConfig, uri: &http::Uri, stream: S) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let method = http::Method::from_bytes(w.method.as_bytes()).map_err(|e| e.to_string())?;
    // Origin form, with the URL's authority as Host.
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let host = uri.authority().map(|a| a.as_str()).unwrap_or("localhost");
    crate::lifecycle::probe::request_on(stream, method, path, host, "outrigger-reload")
        .await
        .map_err(|e| format!("{}: {e}", w.url))
}

/// Watches Outrigger's own config file and asks for a reload when its content changes.
pub fn watch_config(file: PathBuf, control: mpsc::Sender<Control>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(
        async move {
            let mut watch = match Watch::start(WatchSpec {
                paths: vec![file.clone()],
                quiet: crate::config::lifecycle::DEFAULT_DEBOUNCE_QUIET.get(),
                max_delay: crate::config::lifecycle::DEFAULT_DEBOUNCE_MAX.get(),
            }) {
                Ok(w) => w,
                Err(e) => {
                    warn!(path = %file.display(), error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
                    return;
                }
            };
            loop {
                watch.changed().await;
                info!(path = %file.display(), "config file changed; reloading");
                if control.send(Control::Reload).await.is_err() {
                    return;
                }
            }
        }
        .instrument(info_span!("config_watch")),
    )
}
