//! Dapr-compatible pub/sub: publish (`POST /v1.0/publish/{pubsub}/{topic}`, bulk publish) into a
//! broker, and deliver what the app subscribed to as CloudEvents `POST`ed to the app, acking the
//! broker only after the app said SUCCESS or DROP (or the event went to a dead-letter topic).
//!
//! Data comes in from the app over HTTP ([`http::router`]) and from the brokers ([`broker`]:
//! in-memory, Redis Streams, NATS JetStream, RabbitMQ, MQTT); it leaves to the brokers and to the app
//! ([`delivery`]). Subscriptions come from the app's `GET /dapr/subscribe` and from
//! `Subscription` resources ([`subscription`]); `routes.rules` use a CEL subset ([`cel`]).
//!
//! # How to wire this (for the bridge)
//!
//! 1. At start-up, whenever the bridge runs (with no `pubsub.*` component this is an empty
//!    registry that starts nothing: no task, thread or connection; publish then answers
//!    `ERR_PUBSUB_NOT_CONFIGURED` as Dapr does):
//!    ```ignore
//!    // preflight: bridge::components::prepare built the brokers and parsed the Subscriptions
//!    let ps = PubSub::with_brokers(options, prepared.brokers, prepared.declarative, metrics)?;
//!    ```
//!    `options` is [`PubSubOptions`]: app id, the app's `host:port` (None: no subscriptions are
//!    started, as Dapr without an app port), `APP_API_TOKEN`, retry policy. `new` builds and
//!    validates every broker (errors name the component file) but opens no connection;
//!    `with_brokers` takes the brokers that preflight built.
//! 2. Merge `http::router(ps.clone())` into the bridge's axum router (it is `Router<()>`), then
//!    apply the bridge's layers (body limit: axum's default is 2 MiB, Dapr's 4 MiB; API token).
//!    [`http::PubSubError`] is the error type; it renders `{"errorCode","message"}`.
//! 3. When the app is ready, or right away with a `watch` that turns true then: call
//!    `ps.start(app_ready_rx)`. It waits for `true`, calls `GET /dapr/subscribe` (retrying while
//!    the app does not answer), adds the declarative subscriptions and subscribes on the brokers.
//! 4. On stop (after inbound has drained, before the app is stopped): `ps.stop().await` stops
//!    fetching, lets in-flight deliveries finish (their retries are cut short and left to the
//!    broker's redelivery) and returns.
//! 5. `ps.subscriptions_json()` is the `subscriptions` array for `GET /v1.0/metadata`;
//!    `ps.subscribed()` counts subscriptions running on their brokers.

pub mod broker;
pub(crate) mod broker_tls;
pub mod bulk_subscribe;
pub mod cel;
pub mod cloudevent;
pub mod delivery;
pub mod http;
pub mod jetstream;
pub mod memory;
pub mod mqtt;
mod mqtt_tls;
pub mod rabbitmq;
pub mod redis;
pub mod subscription;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bridge::components::Component;
use crate::telemetry::metrics::{Name, PubSubMetrics};
pub use broker::{Broker, BrokerError, Message, Outcome};
pub use delivery::{AppChannel, AppStatus, RetryPolicy};
pub use subscription::Subscription;

/// How pub/sub reaches the app.
pub enum App {
    /// `GET /dapr/subscribe` and `POST {route}`.
    Http(AppChannel),
    /// The app's `AppCallback` gRPC service (`app.protocol: grpc`).
    Grpc(crate::bridge::grpc::app::GrpcApp),
}

/// Where a subscription's events go.
#[derive(Clone)]
pub enum Consumer {
    /// `POST`ed to the app (`app.address`).
    App,
    /// Sent over a streaming subscription (gRPC `SubscribeTopicEventsAlpha1`).
    Stream(StreamConsumer),
}

/// A streaming subscription's side of delivery.
#[derive(Clone)]
pub struct StreamConsumer {
    /// Sends one event and resolves with the app's answer.
    pub sink: StreamSink,
    /// Turns true when the stream has ended: deliveries stop waiting and retrying at once
    /// (the broker redelivers).
    pub closed: watch::Receiver<bool>,
}

/// One event for a gRPC consumer (a streaming subscription or a gRPC app): the CloudEvent (as
/// delivered over HTTP), the subscription's pubsub and topic (a dead-lettered event keeps its
/// original topic inside), and the message's metadata (sent to a gRPC app as call metadata; a
/// stream message has no place for it).
pub struct StreamEvent {
    pub event: serde_json::Map<String, Value>,
    pub pubsub: String,
    pub topic: String,
    pub metadata: BTreeMap<String, String>,
}

/// Sends one event over a stream and waits for the app's status.
pub type StreamSink =
    Arc<dyn Fn(StreamEvent) -> broker::BoxFuture<'static, AppStatus> + Send + Sync>;

/// A streaming subscription running on its broker; [`StreamSubscription::stop`] ends it (in
/// flight events are left to the broker's redelivery).
pub struct StreamSubscription {
    running: broker::Subscription,
    active: Active,
}

impl StreamSubscription {
    /// Ends the subscription. It leaves `active` first, so a stream reconnecting at once is
    /// not refused as a duplicate while this one's deliveries wind down.
    pub async fn stop(self) {
        drop(self.active);
        self.running.stop().await;
    }
}

/// A subscription's place in `active`, given up when dropped — also when the call that made
/// it is cancelled half-way (a stream reset while its broker was still subscribing).
struct Active {
    pubsub: Arc<PubSub>,
    sub: Arc<Subscription>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.pubsub
            .active
            .lock()
            .unwrap()
            .retain(|s| !Arc::ptr_eq(s, &self.sub));
    }
}

/// Why a streaming subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("pubsub {0} is not found")]
    NotFound(String),
    #[error("already subscribed to pubsub {pubsub:?} topic {topic:?}")]
    AlreadySubscribed { pubsub: String, topic: String },
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    #[error("cannot subscribe: {0}")]
    Broker(String),
}

/// How long one delivery to the app may take before it counts as failed (and is retried).
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings the bridge passes in (from its config and the app section).
#[derive(Clone, Debug)]
pub struct PubSubOptions {
    /// The app id: CloudEvent `source`, default consumer group.
    pub app_id: String,
    /// The app's `host:port` for `/dapr/subscribe` and deliveries; `None`: no subscriptions.
    pub app_address: Option<String>,
    /// What the app speaks there: HTTP (`/dapr/subscribe`, `POST`s) or gRPC (`AppCallback`).
    pub app_protocol: crate::config::AppProtocol,
    /// The bridge's channel to a gRPC app, shared (one HTTP/2 connection); made here when
    /// absent.
    pub grpc_app: Option<crate::bridge::grpc::app::GrpcApp>,
    /// Sent as `dapr-api-token` on calls to the app (`APP_API_TOKEN`).
    pub app_token: Option<String>,
    pub retry: RetryPolicy,
    pub delivery_timeout: Duration,
}

impl PubSubOptions {
    pub fn new(app_id: impl Into<String>, app_address: Option<String>) -> Self {
        PubSubOptions {
            app_id: app_id.into(),
            app_address,
            app_protocol: crate::config::AppProtocol::Http,
            grpc_app: None,
            app_token: None,
            retry: RetryPolicy::default(),
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
        }
    }
}

/// A configured pubsub component.
struct Configured {
    broker: Arc<dyn Broker>,
    /// Metric label.
    label: Name,
}

/// The pub/sub building block: brokers by component name, subscriptions, delivery.
pub struct PubSub {
    options: PubSubOptions,
    components: BTreeMap<String, Configured>,
    declarative: Vec<Subscription>,
    metrics: PubSubMetrics,
    app: Option<App>,
    /// Active subscriptions (for `/v1.0/metadata`).
    active: Mutex<Vec<Arc<Subscription>>>,
    running: tokio::sync::Mutex<Vec<broker::Subscription>>,
    /// How many subscriptions are running on their brokers.
    subscribed: watch::Sender<usize>,
    stop: watch::Sender<bool>,
    /// The app's readiness (set by `start`): deliveries wait while the app is down (a
    /// restart), instead of spending their attempts on connection errors.
    app_ready: std::sync::OnceLock<watch::Receiver<bool>>,
}

/// How long a publish may take, connecting to the broker included (a bulk publish: all its
/// entries). Without it, each request to a NATS server that does not answer waits the client's
/// own 5 s, and a publish to a new topic makes up to four (find or create the stream, read it,
/// add the subject, publish): 10 s measured with NATS down, 20 s for a two-entry bulk publish.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads `Subscription` documents from YAML files (other kinds in them are skipped). All
/// problems are returned together, each naming its file.
pub fn load_subscription_files(files: &[PathBuf]) -> Result<Vec<Subscription>, Vec<String>> {
    let mut subs = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match crate::config::file_limits::read(f) {
            Ok(text) => match subscription::parse_declarative(&text, f) {
                Ok(s) => subs.extend(s),
                Err(e) => errors.extend(e),
            },
            Err(e) => errors.push(format!("{}: cannot read: {e}", f.display())),
        }
    }
    if errors.is_empty() {
        Ok(subs)
    } else {
        Err(errors)
    }
}

impl PubSub {
    /// Builds the brokers of the `pubsub.*` components (others are ignored) and keeps the
    /// declarative subscriptions that apply to this app. Opens no connection.
    pub fn new(
        options: PubSubOptions,
        components: &[Component],
        declarative: Vec<Subscription>,
        metrics: PubSubMetrics,
    ) -> Result<Arc<PubSub>, Vec<String>> {
        let mut errors = Vec::new();
        let mut brokers = Vec::new();
        for c in components.iter().filter(|c| c.kind.starts_with("pubsub.")) {
            match broker::build(c) {
                Ok(broker) => brokers.push((c.name.clone(), broker)),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        PubSub::with_brokers(options, brokers, declarative, metrics)
    }

    /// As [`PubSub::new`], with brokers built already (by the preflight stage:
    /// `bridge::components::prepare`).
    pub fn with_brokers(
        options: PubSubOptions,
        brokers: Vec<(String, Arc<dyn Broker>)>,
        declarative: Vec<Subscription>,
        metrics: PubSubMetrics,
    ) -> Result<Arc<PubSub>, Vec<String>> {
        let mut errors = Vec::new();
        let mut built = BTreeMap::new();
        for (name, broker) in brokers {
            broker.set_app_id(&options.app_id);
            if broker.kind() == "pubsub.mqtt3" {
                broker.set_drop_counter(metrics.mqtt_dropped_counter(&name));
            }
            if built.contains_key(&name) {
                errors.push(format!(
                    "a pubsub component named {name:?} is already defined"
                ));
                continue;
            }
            built.insert(
                name.clone(),
                Configured {
                    broker,
                    label: Arc::new(name),
                },
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let declarative = declarative
            .into_iter()
            .filter(|s| s.in_scope(&options.app_id))
            .collect();
        let app = match (&options.app_address, options.app_protocol) {
            (None, _) => None,
            (Some(a), crate::config::AppProtocol::Http) => Some(App::Http(AppChannel::new(
                a,
                options.app_token.as_deref(),
                options.delivery_timeout,
            ))),
            (Some(a), crate::config::AppProtocol::Grpc) => {
                Some(App::Grpc(match &options.grpc_app {
                    Some(shared) => shared.with_timeout(options.delivery_timeout),
                    None => crate::bridge::grpc::app::GrpcApp::new(
                        a,
                        options.app_token.as_deref(),
                        options.delivery_timeout,
                    )
                    .map_err(|e| vec![e])?,
                }))
            }
        };
        Ok(Arc::new(PubSub {
            options,
            components: built,
            declarative,
            metrics,
            app,
            active: Mutex::new(Vec::new()),
            running: tokio::sync::Mutex::new(Vec::new()),
            subscribed: watch::channel(0).0,
            stop: watch::channel(false).0,
            app_ready: std::sync::OnceLock::new(),
        }))
    }

    /// The app id events are published as.
    pub fn app_id(&self) -> &str {
        &self.options.app_id
    }

    /// Whether any pubsub component is configured.
    pub fn is_empty(&self) -> bool {
        self.components.is_empty()
    }

    /// The broker behind a component name.
    pub fn broker(&self, name: &str) -> Option<&Arc<dyn Broker>> {
        self.components.get(name).map(|c| &c.broker)
    }

    /// Publishes already-enveloped bytes within [`PUBLISH_TIMEOUT`] and counts the result.
    pub async fn publish_bytes(
        &self,
        pubsub: &str,
        topic: &str,
        data: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
        self.publish_bytes_by(deadline, pubsub, topic, data, metadata)
            .await
    }

    /// Publishes already-enveloped bytes, failing at `deadline` (a bulk publish shares one),
    /// and counts the result.
    pub async fn publish_bytes_by(
        &self,
        deadline: tokio::time::Instant,
        pubsub: &str,
        topic: &str,
        data: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let Some(c) = self.components.get(pubsub) else {
            return Err(BrokerError::Publish(format!("pubsub {pubsub} not found")));
        };
        let publish = c.broker.publish(topic, data, metadata);
        let (res, result) = match tokio::time::timeout_at(deadline, publish).await {
            Ok(Ok(())) => (Ok(()), "success"),
            Ok(Err(e)) => (Err(e), "failure"),
            Err(_) => (
                Err(BrokerError::Publish(format!(
                    "{} did not take the message within {}s",
                    c.broker.kind(),
                    PUBLISH_TIMEOUT.as_secs()
                ))),
                "timeout",
            ),
        };
        self.metrics.publish(&c.label, result);
        res
    }

    /// Waits until `app_ready` is true, then discovers the app's subscriptions and starts them
    /// with the declarative ones. Returns at once (without calling the app) when there is no
    /// pubsub component or no app address.
    pub fn start(self: &Arc<Self>, mut app_ready: watch::Receiver<bool>) -> JoinHandle<()> {
        let _ = self.app_ready.set(app_ready.clone());
        let me = self.clone();
        tokio::spawn(async move {
            if me.components.is_empty() || me.app.is_none() {
                return;
            }
            let mut stop = me.stop.subscribe();
            tokio::select! {
                _ = broker::stopped(&mut stop) => return,
                r = app_ready.wait_for(|r| *r) => if r.is_err() { return },
            }
            let Some(mut subs) = me.discover(&mut stop).await else {
                return;
            };
            subs.extend(me.declarative.iter().cloned());
            me.subscribe_all(subs).await;
        })
    }

    /// `GET /dapr/subscribe`, retried while the app does not answer.
    async fn discover(&self, stop: &mut watch::Receiver<bool>) -> Option<Vec<Subscription>> {
        let app = self.app.as_ref()?;
        let mut attempt = 0u32;
        loop {
            let http = match app {
                App::Http(http) => http,
                App::Grpc(grpc) => match grpc.subscriptions().await {
                    Ok((subs, errors)) => {
                        for e in errors {
                            tracing::error!(error = %e, "app subscription ignored");
                        }
                        return Some(subs);
                    }
                    Err(e) => {
                        attempt += 1;
                        tracing::debug!(error = %e, "ListTopicSubscriptions: app not answering yet");
                        tokio::select! {
                            _ = broker::stopped(stop) => return None,
                            _ = tokio::time::sleep(broker::reconnect_backoff(attempt)) => {}
                        }
                        continue;
                    }
                },
            };
            match http.get_subscriptions().await {
                Ok((status, body)) if status.is_success() => {
                    let (subs, errors) = subscription::parse_programmatic(&body);
                    for e in errors {
                        tracing::error!(error = %e, "app subscription ignored");
                    }
                    return Some(subs);
                }
                Ok((status, _)) if status == ::http::StatusCode::NOT_FOUND => {
                    return Some(Vec::new());
                }
                Ok((status, _)) => {
                    tracing::error!(
                        status = status.as_u16(),
                        "GET /dapr/subscribe failed; only declarative subscriptions apply"
                    );
                    return Some(Vec::new());
                }
                Err(e) => {
                    attempt += 1;
                    tracing::debug!(error = %e, "GET /dapr/subscribe: app not answering yet");
                    tokio::select! {
                        _ = broker::stopped(stop) => return None,
                        _ = tokio::time::sleep(broker::reconnect_backoff(attempt)) => {}
                    }
                }
            }
        }
    }

    /// Starts `subs` on their brokers (unknown pubsub names and duplicates are logged and
    /// skipped). Each subscription is started on its own task, retried with backoff while its
    /// broker cannot subscribe yet, so one broker that is down does not hold up the others.
    pub async fn subscribe_all(self: &Arc<Self>, subs: Vec<Subscription>) {
        let mut seen = std::collections::HashSet::new();
        for sub in subs {
            if !self.components.contains_key(&sub.pubsubname) {
                tracing::warn!(pubsub = %sub.pubsubname, topic = %sub.topic, "subscription to an unknown pubsub ignored");
                continue;
            }
            if !seen.insert((sub.pubsubname.clone(), sub.topic.clone())) {
                tracing::warn!(pubsub = %sub.pubsubname, topic = %sub.topic, "duplicate subscription ignored");
                continue;
            }
            let sub = Arc::new(sub);
            // A streaming subscription that came first keeps the topic.
            if !self.claim(&sub) {
                tracing::warn!(pubsub = %sub.pubsubname, topic = %sub.topic, "the topic already has a streaming subscription; this subscription is ignored");
                continue;
            }
            tokio::spawn(self.clone().subscribe_one(sub));
        }
    }

    /// Adds `sub` to the active subscriptions unless its pubsub and topic already have one
    /// (one subscription per topic, whoever asked first: a stream, the app, a resource).
    fn claim(&self, sub: &Arc<Subscription>) -> bool {
        let mut active = self.active.lock().unwrap();
        if active
            .iter()
            .any(|s| s.pubsubname == sub.pubsubname && s.topic == sub.topic)
        {
            return false;
        }
        active.push(sub.clone());
        true
    }

    async fn subscribe_one(self: Arc<Self>, sub: Arc<Subscription>) {
        let mut stop = self.stop.subscribe();
        let mut attempt = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            let handler = self.handler(sub.clone(), Consumer::App);
            let broker = &self.components[&sub.pubsubname].broker;
            match broker
                .subscribe_with(&sub.topic, &self.options.app_id, &sub.metadata, handler)
                .await
            {
                Ok(running) => {
                    let mut all = self.running.lock().await;
                    if *stop.borrow() {
                        // `stop` already drained the list: stop this one here.
                        drop(all);
                        running.stop().await;
                        return;
                    }
                    tracing::info!(pubsub = %sub.pubsubname, topic = %sub.topic, "subscribed");
                    all.push(running);
                    self.subscribed.send_modify(|n| *n += 1);
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(pubsub = %sub.pubsubname, topic = %sub.topic, error = %e, "cannot subscribe yet; retrying");
                    tokio::select! {
                        _ = broker::stopped(&mut stop) => return,
                        _ = tokio::time::sleep(broker::reconnect_backoff(attempt)) => {}
                    }
                }
            }
        }
    }

    fn handler(self: &Arc<Self>, sub: Arc<Subscription>, consumer: Consumer) -> broker::Handler {
        let me = self.clone();
        // The metric label, made once per subscription.
        let topic: Name = Arc::new(sub.topic.clone());
        // `bulkSubscribe`: deliveries go through envelopes (dropped with the handler).
        let bulk = match (&consumer, &self.app) {
            (Consumer::App, Some(App::Http(_))) => sub.bulk,
            _ => None,
        };
        let batches = bulk.map(|config| {
            Arc::new(bulk_subscribe::Batches::new(
                me.clone(),
                sub.clone(),
                config,
            ))
        });
        Arc::new(move |msg| {
            let (me, sub, topic, consumer) =
                (me.clone(), sub.clone(), topic.clone(), consumer.clone());
            let batches = batches.clone();
            Box::pin(async move {
                me.handle(&sub, &topic, msg, &consumer, batches.as_deref())
                    .await
            })
        })
    }

    /// Starts a streaming subscription (gRPC `SubscribeTopicEventsAlpha1`): events go to
    /// `sink` with the same retries, dead-lettering and acks as deliveries to the app. Refused
    /// for an unknown pubsub and for a topic this app already subscribes to.
    pub async fn subscribe_stream(
        self: &Arc<Self>,
        sub: Subscription,
        consumer: StreamConsumer,
    ) -> Result<StreamSubscription, StreamError> {
        let Some(c) = self.components.get(&sub.pubsubname) else {
            return Err(StreamError::NotFound(sub.pubsubname));
        };
        if *self.stop.borrow() {
            return Err(StreamError::ShuttingDown);
        }
        let sub = Arc::new(sub);
        if !self.claim(&sub) {
            return Err(StreamError::AlreadySubscribed {
                pubsub: sub.pubsubname.clone(),
                topic: sub.topic.clone(),
            });
        }
        let active = Active {
            pubsub: self.clone(),
            sub: sub.clone(),
        };
        let handler = self.handler(sub.clone(), Consumer::Stream(consumer));
        let running = c
            .broker
            .subscribe_with(&sub.topic, &self.options.app_id, &sub.metadata, handler)
            .await
            .map_err(|e| StreamError::Broker(e.to_string()))?;
        tracing::info!(pubsub = %sub.pubsubname, topic = %sub.topic, "streaming subscription started");
        Ok(StreamSubscription { running, active })
    }

    /// Turns true when pub/sub stops (the sidecar is stopping): streams end then.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Delivers one message to its consumer: route, deliver with retries, then dead-letter or
    /// leave it to the broker.
    async fn handle(
        &self,
        sub: &Subscription,
        topic: &Name,
        msg: Message,
        consumer: &Consumer,
        batches: Option<&bulk_subscribe::Batches>,
    ) -> Outcome {
        let app = match consumer {
            Consumer::App => match &self.app {
                Some(app) => Some(app),
                None => return Outcome::Retry,
            },
            Consumer::Stream(_) => None,
        };
        let label = &self.components[&sub.pubsubname].label;
        let event = if sub.raw_payload() {
            cloudevent::from_raw_payload(&msg.data, &sub.topic, &sub.pubsubname)
        } else {
            match serde_json::from_slice::<Value>(&msg.data) {
                Ok(Value::Object(m)) => m,
                // Not a CloudEvent (published raw without a rawPayload subscription): wrap it.
                _ => cloudevent::from_raw_payload(&msg.data, &sub.topic, &sub.pubsubname),
            }
        };
        // Past its `expiration` (a publish with a ttl): dropped, as daprd does.
        if cloudevent::expired(&event) {
            tracing::warn!(pubsub = %sub.pubsubname, topic = %sub.topic, id = ?event.get("id"), expiration = ?event.get("expiration"), "dropping an expired event");
            return self
                .drop_or_dead_letter(sub, &msg, label, topic, false)
                .await;
        }
        let event = Value::Object(event);
        // A stream has no routes: every event goes over it.
        let path = match consumer {
            Consumer::App => sub.route(&event),
            Consumer::Stream(_) => Some(""),
        };
        let Some(path) = path else {
            tracing::debug!(pubsub = %sub.pubsubname, topic = %sub.topic, "no route matches the event; dropped");
            self.metrics.delivery(label, topic, "drop");
            return Outcome::Ack;
        };
        let body = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
        let trace = (
            event.get("traceparent").and_then(Value::as_str),
            event.get("tracestate").and_then(Value::as_str),
        );
        let policy = self.options.retry;
        let mut stop = self.stop.subscribe();
        for attempt in 1..=policy.max_attempts.max(1) {
            // While the app is down (restarting), wait for it: that is not a failed attempt.
            if app.is_some()
                && let Some(ready) = self.app_ready.get()
                && !*ready.borrow()
            {
                let mut ready = ready.clone();
                tokio::select! {
                    _ = broker::stopped(&mut stop) => return Outcome::Retry,
                    r = ready.wait_for(|open| *open) => if r.is_err() { return Outcome::Retry },
                }
            }
            let status = match (consumer, app) {
                (Consumer::Stream(c), _) => {
                    let Value::Object(event) = event.clone() else {
                        unreachable!("built as an object above")
                    };
                    let metadata = msg.metadata.clone();
                    let mut closed = c.closed.clone();
                    // An app that never answers an event: a failed attempt, as over HTTP.
                    let timeout = self.options.delivery_timeout;
                    tokio::select! {
                        _ = broker::stopped(&mut stop) => return Outcome::Retry,
                        _ = broker::stopped(&mut closed) => return Outcome::Retry,
                        _ = tokio::time::sleep(timeout) => {
                            tracing::warn!(pubsub = %sub.pubsubname, topic = %sub.topic, ?timeout, "no answer from the streaming subscriber; will retry");
                            AppStatus::Retry
                        }
                        status = (c.sink)(StreamEvent {
                        event,
                        pubsub: sub.pubsubname.clone(),
                        topic: sub.topic.clone(),
                        metadata,
                    }) => status,
                    }
                }
                (Consumer::App, Some(App::Http(app))) => match (batches, &event) {
                    (Some(b), Value::Object(m)) => b.deliver(path, m.clone(), &msg.metadata).await,
                    _ => app.deliver(path, body.clone(), trace, &msg.metadata).await,
                },
                (Consumer::App, Some(App::Grpc(app))) => {
                    let Value::Object(event) = event.clone() else {
                        unreachable!("built as an object above")
                    };
                    let metadata = msg.metadata.clone();
                    app.deliver(
                        StreamEvent {
                            event,
                            pubsub: sub.pubsubname.clone(),
                            topic: sub.topic.clone(),
                            metadata,
                        },
                        path,
                    )
                    .await
                }
                (Consumer::App, None) => return Outcome::Retry,
            };
            match status {
                AppStatus::Success => {
                    self.metrics.delivery(label, topic, "success");
                    return Outcome::Ack;
                }
                AppStatus::Drop => {
                    return self
                        .drop_or_dead_letter(sub, &msg, label, topic, false)
                        .await;
                }
                AppStatus::Retry => {
                    self.metrics.delivery(label, topic, "retry");
                    if attempt >= policy.max_attempts {
                        break;
                    }
                    // A stream that ended stops waiting (the broker redelivers).
                    let closed = async {
                        match consumer {
                            Consumer::Stream(c) => broker::stopped(&mut c.closed.clone()).await,
                            Consumer::App => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = broker::stopped(&mut stop) => return Outcome::Retry,
                        _ = closed => return Outcome::Retry,
                        _ = tokio::time::sleep(policy.backoff(attempt)) => {}
                    }
                }
            }
        }
        if sub.dead_letter_topic.is_some() {
            self.drop_or_dead_letter(sub, &msg, label, topic, true)
                .await
        } else {
            Outcome::Retry
        }
    }

    /// A dropped or exhausted message goes to the dead-letter topic when there is one (then is
    /// acked); a dropped one without is acked and counted.
    async fn drop_or_dead_letter(
        &self,
        sub: &Subscription,
        msg: &Message,
        label: &Name,
        topic: &Name,
        exhausted: bool,
    ) -> Outcome {
        let Some(dlt) = &sub.dead_letter_topic else {
            self.metrics.delivery(label, topic, "drop");
            return Outcome::Ack;
        };
        match self
            .publish_bytes(&sub.pubsubname, dlt, msg.data.clone(), &msg.metadata)
            .await
        {
            Ok(()) => {
                tracing::warn!(pubsub = %sub.pubsubname, topic = %sub.topic, dead_letter_topic = %dlt, exhausted, "event sent to the dead-letter topic");
                self.metrics.delivery(label, topic, "dead_letter");
                Outcome::Ack
            }
            Err(e) => {
                tracing::error!(pubsub = %sub.pubsubname, topic = %sub.topic, dead_letter_topic = %dlt, error = %e, "cannot publish to the dead-letter topic; leaving the event for redelivery");
                Outcome::Retry
            }
        }
    }

    /// Stops every subscription: no new fetches, in-flight deliveries finish (retry waits are
    /// cut short). Idempotent.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let running = std::mem::take(&mut *self.running.lock().await);
        for r in running {
            r.stop().await;
        }
    }

    /// The number of subscriptions running on their brokers (for readiness and tests).
    pub fn subscribed(&self) -> watch::Receiver<usize> {
        self.subscribed.subscribe()
    }

    /// The active subscriptions (for gRPC's `GetMetadata`).
    pub fn subscriptions(&self) -> Vec<Arc<Subscription>> {
        self.active.lock().unwrap().clone()
    }

    /// The active subscriptions in `/v1.0/metadata`'s shape.
    pub fn subscriptions_json(&self) -> Value {
        let active = self.active.lock().unwrap();
        Value::Array(
            active
                .iter()
                .map(|s| {
                    let mut o = serde_json::json!({
                        "pubsubname": s.pubsubname,
                        "topic": s.topic,
                        "rules": s.rules.iter().map(|r| serde_json::json!({"match": r.text, "path": r.path})).collect::<Vec<_>>(),
                        "type": s.source.as_str(),
                    });
                    if !s.metadata.is_empty() {
                        o["metadata"] = serde_json::json!(s.metadata);
                    }
                    if let Some(d) = &s.dead_letter_topic {
                        o["deadLetterTopic"] = Value::String(d.clone());
                    }
                    o
                })
                .collect(),
        )
    }
}
