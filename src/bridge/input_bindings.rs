//! Input bindings: events a component reads (`bindings.cron`'s ticks) handed to the app as
//! daprd hands them (`pkg/runtime/processor/binding`). Once the app is ready, each binding asks
//! whether the app listens — HTTP: `OPTIONS /{route}` (2xx or 405: yes; anything else: no, and
//! the binding stays idle); gRPC: its name in `ListInputBindings` — then sends each event as
//! `POST /{route}` (the event's data as the body, its metadata as headers; a 2xx answer is
//! delivered, anything else or no answer within the delivery timeout is a failure, logged and
//! counted) or `OnBindingEvent`. `route` is the component's `route` metadata, else its name.
//!
//! Events come in from the components' sources ([`crate::bridge::cron::Schedule`], an MQTT
//! topic, a RabbitMQ queue) and
//! leave to the app; nothing is queued: a tick while the app is down waits for it, and ticks
//! missed meanwhile are skipped (as robfig/cron skips them).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::sync::watch;

use super::components::Component;
use super::cron::Schedule;
use super::grpc::app::GrpcApp;
use super::pubsub::AppChannel;
use super::pubsub::broker::{reconnect_backoff, stopped};
use crate::telemetry::metrics::{BridgeMetrics, Name};

/// Input binding component types.
pub const INPUT_TYPES: &[&str] = &["bindings.cron"];

/// Where events go: the app over HTTP or gRPC.
#[derive(Clone)]
pub enum Target {
    Http(Arc<AppChannel>),
    Grpc(Arc<GrpcApp>),
}

/// One input binding component.
pub struct InputBinding {
    pub name: String,
    /// The path events are POSTed to (`/` + `route` or the name).
    pub route: String,
    source: Source,
}

enum Source {
    Cron(Schedule),
    /// `bindings.mqtt3` (messages on the topic) and `bindings.rabbitmq` (messages in the
    /// queue): the component's connection, shared with its output side.
    Broker {
        broker: Arc<dyn super::pubsub::broker::Broker>,
        topic: String,
    },
}

/// Whether `direction` metadata (`input`, `output`, `input, output`; absent: both) lets the
/// component read events.
pub(crate) fn reads_input(c: &Component) -> Result<bool, String> {
    let Some(d) = c.meta("direction") else {
        return Ok(true);
    };
    let mut input = false;
    for part in d.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "input" => input = true,
            "output" => {}
            other => {
                return Err(format!(
                    "expected direction input, output or \"input, output\", found {other:?}"
                ));
            }
        }
    }
    Ok(input)
}

impl InputBinding {
    /// Checks the component's metadata (preflight): the same as [`InputBinding::open`].
    pub fn check(c: &Component) -> Result<(), String> {
        InputBinding::open(c).map(drop)
    }

    /// The binding, or `None` when its `direction` says it is output only.
    pub fn open(c: &Component) -> Result<Option<InputBinding>, String> {
        let input = reads_input(c)?;
        let source = match c.kind.as_str() {
            "bindings.cron" => {
                let spec = c.meta("schedule").ok_or(
                    "expected metadata schedule (a cron expression such as \"@every 15s\" or \"0 30 * * * *\"), found none",
                )?;
                Source::Cron(
                    Schedule::parse(spec, c.meta("timeZone"))
                        .map_err(|e| format!("metadata schedule: {e}"))?,
                )
            }
            other => return Err(format!("{other} is not an input binding type")),
        };
        if !input {
            return Ok(None);
        }
        let route = c.meta("route").unwrap_or(&c.name);
        Ok(Some(InputBinding {
            name: c.name.clone(),
            route: format!("/{}", route.trim_start_matches('/')),
            source,
        }))
    }
}

impl InputBinding {
    /// A `bindings.mqtt3` or `bindings.rabbitmq` component's input side, reading `topic` (the
    /// queue for RabbitMQ) through `broker` (`None`: output only).
    pub fn from_broker(
        c: &Component,
        broker: Arc<dyn super::pubsub::broker::Broker>,
        topic: &str,
    ) -> Result<Option<InputBinding>, String> {
        if !reads_input(c)? {
            return Ok(None);
        }
        let route = c.meta("route").unwrap_or(&c.name);
        Ok(Some(InputBinding {
            name: c.name.clone(),
            route: format!("/{}", route.trim_start_matches('/')),
            source: Source::Broker {
                broker,
                topic: topic.to_string(),
            },
        }))
    }
}

/// Runs every binding once `ready` turns true, until `stop` does.
pub fn start(
    bindings: Vec<Arc<InputBinding>>,
    target: Target,
    ready: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    metrics: BridgeMetrics,
) {
    if bindings.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut stop_rx = stop.clone();
        let mut ready_rx = ready.clone();
        tokio::select! {
            _ = stopped(&mut stop_rx) => return,
            r = ready_rx.wait_for(|r| *r) => if r.is_err() { return },
        }
        // gRPC: one ListInputBindings for all.
        let listened = match &target {
            Target::Http(_) => None,
            Target::Grpc(app) => {
                let mut attempt = 0u32;
                loop {
                    match app.input_bindings().await {
                        Ok(names) => break Some(names),
                        Err(e) => {
                            attempt += 1;
                            tracing::debug!(error = %e, "ListInputBindings: app not answering yet");
                            tokio::select! {
                                _ = stopped(&mut stop_rx) => return,
                                _ = tokio::time::sleep(reconnect_backoff(attempt)) => {}
                            }
                        }
                    }
                }
            }
        };
        for b in bindings {
            if let Some(names) = &listened
                && !names.contains(&b.name)
            {
                tracing::info!(binding = %b.name, "the app does not list this input binding (ListInputBindings); not started");
                continue;
            }
            tokio::spawn(run(
                b,
                target.clone(),
                ready.clone(),
                stop.clone(),
                metrics.clone(),
            ));
        }
    });
}

/// `OPTIONS /{route}`, retried while the app does not answer: whether it listens.
async fn listens(
    b: &InputBinding,
    app: &AppChannel,
    stop: &mut watch::Receiver<bool>,
) -> Option<bool> {
    let mut attempt = 0u32;
    loop {
        match app
            .call(Method::OPTIONS, &b.route, &BTreeMap::new(), Bytes::new())
            .await
        {
            Ok((status, _)) => {
                return Some(status.is_success() || status == StatusCode::METHOD_NOT_ALLOWED);
            }
            Err(e) => {
                attempt += 1;
                tracing::debug!(binding = %b.name, error = %e, "OPTIONS for the input binding: app not answering yet");
                tokio::select! {
                    _ = stopped(stop) => return None,
                    _ = tokio::time::sleep(reconnect_backoff(attempt)) => {}
                }
            }
        }
    }
}

async fn run(
    b: Arc<InputBinding>,
    target: Target,
    mut ready: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    metrics: BridgeMetrics,
) {
    if let Target::Http(app) = &target {
        match listens(&b, app, &mut stop).await {
            None => return,
            Some(false) => {
                tracing::info!(binding = %b.name, route = %b.route, "the app does not listen to this input binding (OPTIONS answered neither 2xx nor 405); not started");
                return;
            }
            Some(true) => {}
        }
    }
    tracing::info!(binding = %b.name, route = %b.route, "input binding started");
    let label: Name = Arc::new(b.name.clone());
    let schedule = match &b.source {
        Source::Cron(schedule) => schedule,
        Source::Broker { broker, topic } => {
            return read_broker(&b, broker, topic, target, stop, metrics, label).await;
        }
    };
    loop {
        let Some(wait) = schedule.wait_from(jiff::Timestamp::now()) else {
            tracing::info!(binding = %b.name, "the schedule never fires again; input binding stopped");
            return;
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // While the app is down (a restart), the tick waits for it.
        tokio::select! {
            _ = stopped(&mut stop) => return,
            r = ready.wait_for(|r| *r) => if r.is_err() { return },
        }
        let now = jiff::Timestamp::now();
        let metadata = BTreeMap::from([
            (
                "timeZone".to_string(),
                match schedule {
                    Schedule::Cron { zone, .. } => zone.iana_name().unwrap_or("Local").to_string(),
                    Schedule::Every(_) => "Local".to_string(),
                },
            ),
            // Go's `time.Time.String()` of the UTC time, as daprd sends it.
            (
                "readTimeUTC".to_string(),
                now.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
            ),
        ]);
        let result = deliver(&b, &target, Bytes::new(), &metadata).await;
        match result {
            Ok(()) => metrics.binding_event(&label, "success"),
            Err(e) => {
                metrics.binding_event(&label, "failure");
                tracing::warn!(binding = %b.name, route = %b.route, error = %e, "input binding event not delivered");
            }
        }
    }
}

/// `bindings.mqtt3`'s and `bindings.rabbitmq`'s input side: subscribes (retrying while the
/// broker is away), hands each message to the app and acks it once the app took it (MQTT: not
/// acked otherwise, the broker sends it again when the session resumes; RabbitMQ: nacked with
/// requeue), until `stop`.
async fn read_broker(
    b: &Arc<InputBinding>,
    broker: &Arc<dyn super::pubsub::broker::Broker>,
    topic: &str,
    target: Target,
    mut stop: watch::Receiver<bool>,
    metrics: BridgeMetrics,
    label: Name,
) {
    use super::pubsub::broker::Outcome;
    let handler: super::pubsub::broker::Handler = {
        let (b, target) = (b.clone(), target.clone());
        Arc::new(move |msg: super::pubsub::Message| {
            let (b, target, metrics, label) =
                (b.clone(), target.clone(), metrics.clone(), label.clone());
            Box::pin(async move {
                let mut metadata = msg.metadata;
                metadata.insert("topic".into(), msg.topic);
                match deliver(&b, &target, msg.data, &metadata).await {
                    Ok(()) => {
                        metrics.binding_event(&label, "success");
                        Outcome::Ack
                    }
                    Err(e) => {
                        metrics.binding_event(&label, "failure");
                        tracing::warn!(binding = %b.name, route = %b.route, error = %e, "input binding event not delivered; left unacked");
                        Outcome::Retry
                    }
                }
            })
        })
    };
    let mut attempt = 0u32;
    let running = loop {
        match broker.subscribe(topic, &b.name, handler.clone()).await {
            Ok(r) => break r,
            Err(e) => {
                attempt += 1;
                tracing::warn!(binding = %b.name, error = %e, "input binding cannot subscribe yet; retrying");
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(reconnect_backoff(attempt)) => {}
                }
            }
        }
    };
    stopped(&mut stop).await;
    running.stop().await;
}

/// Sends one event to the app.
async fn deliver(
    b: &InputBinding,
    target: &Target,
    data: Bytes,
    metadata: &BTreeMap<String, String>,
) -> Result<(), String> {
    match target {
        Target::Http(app) => {
            let mut headers = metadata.clone();
            headers.insert("content-type".into(), "application/json".into());
            let (status, body) = app.call(Method::POST, &b.route, &headers, data).await?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!(
                    "the app answered {}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&body[..body.len().min(256)])
                ))
            }
        }
        Target::Grpc(app) => app.binding_event(&b.name, data, metadata).await,
    }
}
