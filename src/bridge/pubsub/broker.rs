//! The one interface every pub/sub broker implements: publish bytes to a topic, and subscribe a
//! consumer group to a topic with a handler whose [`Outcome`] decides between ack and
//! redelivery. [`build`] turns a `pubsub.*` component into a broker, validating its metadata.
//!
//! Messages come in through [`Broker::publish`] (from the HTTP handlers or a dead-letter
//! forward) and leave through the handler given to [`Broker::subscribe`]; the broker acks only
//! after the handler says [`Outcome::Ack`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bridge::components::Component;

/// A boxed, sendable future (the trait is object-safe without an async-trait crate).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message as the broker stores it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    /// The bytes published: a CloudEvent JSON document, or the raw payload.
    pub data: Bytes,
    /// Publish metadata carried with the message (where the broker can carry it).
    pub metadata: BTreeMap<String, String>,
}

/// What the subscriber decided about one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered, dropped or dead-lettered: acknowledge it to the broker.
    Ack,
    /// Not handled: leave it to the broker's redelivery.
    Retry,
}

/// Called for each message; may run concurrently up to the broker's `concurrency`.
pub type Handler = Arc<dyn Fn(Message) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// A broker operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Publish(String),
    #[error("{0}")]
    Subscribe(String),
}

/// A pub/sub broker.
pub trait Broker: Send + Sync + 'static {
    /// The component type, e.g. `pubsub.redis`.
    fn kind(&self) -> &'static str;

    /// Tells the broker the app id before any publish or subscription (MQTT's client id
    /// defaults to it). Most brokers need nothing.
    fn set_app_id(&self, _app_id: &str) {}

    /// Gives the broker the counter of messages it drops (MQTT QoS 0 past its queue bound).
    /// Most brokers drop nothing.
    fn set_drop_counter(&self, _counter: prometheus_client::metrics::counter::Counter) {}

    /// Stores one message; resolves once the broker has accepted it.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Bytes,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The health probe ([`crate::bridge::health`]): resolves `Ok` when the broker answers
    /// (connecting when there is no connection). None: nothing to probe (in-memory).
    fn ping(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        None
    }

    /// Starts consuming `topic` as consumer group `group` (the app id unless the component's
    /// metadata names one). Resolves once the subscription exists on the broker; the returned
    /// [`Subscription`] keeps consuming (and reconnecting) until stopped.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>>;

    /// [`Broker::subscribe`] with the subscription's metadata (RabbitMQ's `routingKey`);
    /// brokers that read none subscribe as without it.
    fn subscribe_with<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        _metadata: &'a BTreeMap<String, String>,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        self.subscribe(topic, group, handler)
    }
}

/// A running subscription: a consuming task and its stop signal.
pub struct Subscription {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// Spawns `run` with a stop receiver that turns `true` when [`Subscription::stop`] is called.
    pub fn spawn<F, Fut>(run: F) -> Subscription
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        Subscription {
            stop,
            task: tokio::spawn(run(rx)),
        }
    }

    /// Stops fetching new messages and waits for the in-flight ones to finish (their handlers
    /// see the stop and return [`Outcome::Retry`] instead of waiting out a backoff).
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Resolves when the stop receiver turns `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Builds the broker a `pubsub.*` component describes, validating its metadata. Connects
/// lazily: nothing is opened until the first publish or subscribe.
pub fn build(component: &Component) -> Result<Arc<dyn Broker>, String> {
    let broker: Arc<dyn Broker> = match component.kind.as_str() {
        "pubsub.in-memory" => Arc::new(super::memory::Memory::new()),
        "pubsub.redis" => Arc::new(super::redis::Redis::new(&Meta::new(component))?),
        "pubsub.jetstream" => Arc::new(super::jetstream::JetStream::new(&Meta::new(component))?),
        "pubsub.rabbitmq" => Arc::new(super::rabbitmq::RabbitMq::new(&Meta::new(component))?),
        "pubsub.mqtt3" => Arc::new(super::mqtt::Mqtt::new(&Meta::new(component))?),
        other => {
            return Err(format!(
                "{}: component {:?} has type {other:?}; expected one of {}",
                component.file.display(),
                component.name,
                super::super::components::PUBSUB_TYPES.join(", ")
            ));
        }
    };
    Ok(broker)
}

/// Typed access to a component's metadata, with errors that name the file and component.
pub struct Meta<'a> {
    component: &'a Component,
}

impl<'a> Meta<'a> {
    pub fn new(component: &'a Component) -> Self {
        Meta { component }
    }

    /// The value of `key`, if set and not empty.
    pub fn str(&self, key: &str) -> Option<&'a str> {
        self.component
            .metadata
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// An error about `key` naming the component and its file.
    pub fn error(&self, key: &str, expected: &str, found: &str) -> String {
        format!(
            "{}: component {:?} ({}): metadata {key}: expected {expected}, found {found:?}",
            self.component.file.display(),
            self.component.name,
            self.component.kind
        )
    }

    pub fn required(&self, key: &str, expected: &str) -> Result<&'a str, String> {
        self.str(key)
            .ok_or_else(|| self.error(key, expected, "nothing"))
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(self.error(key, "true or false", v)),
            },
        }
    }

    pub fn u64(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| self.error(key, "a non-negative integer", v)),
        }
    }

    pub fn i64(&self, key: &str, default: i64) -> Result<i64, String> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| self.error(key, "an integer", v)),
        }
    }

    /// A duration such as `60s`, `500ms` or `1m`; `0` means zero.
    pub fn duration(&self, key: &str, default: Duration) -> Result<Duration, String> {
        match self.str(key) {
            None => Ok(default),
            Some("0") => Ok(Duration::ZERO),
            Some(v) => humantime::parse_duration(v)
                .map_err(|_| self.error(key, "a duration such as 30s or 500ms", v)),
        }
    }

    /// Refuses a key this implementation does not support (rather than silently ignoring it).
    pub fn unsupported(&self, key: &str, why: &str) -> Result<(), String> {
        match self.str(key) {
            Some(v) if v != "false" => Err(self.error(key, why, v)),
            _ => Ok(()),
        }
    }
}

/// Capped exponential backoff for reconnect loops: 100 ms doubling to 5 s.
pub fn reconnect_backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
}
