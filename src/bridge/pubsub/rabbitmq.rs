//! `pubsub.rabbitmq`: RabbitMQ over AMQP 0-9-1 (lapin), laid out as daprd's component
//! (components-contrib `pubsub/rabbitmq`) so a daprd and Outrigger of the same app share queues.
//!
//! A topic is a durable exchange named after it, of the component's `exchangeKind` (`fanout`
//! by default; `topic`, `direct` or `headers`); a subscription is the queue
//! `{consumerID}-{topic}` (consumerID: the component's, else the app id) bound to that exchange
//! once per routing key of its `routingKey` metadata (comma-separated; none: the empty key),
//! and a publish goes with its `routingKey` metadata as the routing key, as daprd does.
//! With `enableDeadLetter` the queue dead-letters into the exchange `dlx-{queue}`, bound to the
//! durable queue `dlq-{queue}`, as daprd declares them.
//!
//! Publish runs on a channel in confirm mode and resolves only when the broker has confirmed
//! the message (so a 204 means RabbitMQ has it; daprd confirms only with `publisherConfirm`).
//! Deliveries are acked after the handler says [`Outcome::Ack`]; a message the handler leaves
//! ([`Outcome::Retry`]: its attempts are spent and it has no dead-letter topic) is nacked with
//! `requeue = requeueInFailure`, as daprd does — without requeue RabbitMQ dead-letters it (with
//! `enableDeadLetter`) or discards it. A message in flight when the subscription stops (or its
//! connection breaks) is neither acked nor nacked: the broker puts it back when the channel
//! closes. Each subscription has a connection of its own and reconnects by itself
//! (`reconnectWait`); the publisher connects on first use and again after any failure.
//!
//! TLS: an `amqps://` URL (or `protocol: amqps`), as daprd. The broker's certificate is checked
//! against `caCert` (else the system's roots) and for the URL's host; `clientCert`/`clientKey`
//! answer a broker that asks for a client certificate, and `saslExternal: true` logs in as
//! that certificate (SASL EXTERNAL, RabbitMQ's `rabbitmq_auth_mechanism_ssl`) instead of with
//! the URL's user and password ([`super::broker_tls`], [`AmqpTarget`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{Semaphore, watch};

use super::broker::{
    BoxFuture, Broker, BrokerError, Handler, Message, Meta, Outcome, Subscription, stopped,
};
use crate::bridge::percent_encode;

/// daprd's `reconnectWaitSeconds` default.
const DEFAULT_RECONNECT_WAIT: Duration = Duration::from_secs(3);
/// The metadata key (publish and subscription) for the routing key, as daprd names it.
const ROUTING_KEY: &str = "routingKey";
/// Handlers at once per subscription with `concurrencyMode: parallel` (`single` is one).
const PARALLEL: usize = 10;

#[derive(Clone, Debug)]
struct Settings {
    target: AmqpTarget,
    consumer_id: Option<String>,
    durable: bool,
    delete_when_unused: bool,
    auto_ack: bool,
    requeue_in_failure: bool,
    delivery_mode: u8,
    /// `prefetchCount`: 0 is no limit (AMQP's meaning, and daprd's default).
    prefetch: u16,
    exchange_kind: lapin::ExchangeKind,
    reconnect_wait: Duration,
    max_len: Option<i64>,
    max_len_bytes: Option<i64>,
    enable_dead_letter: bool,
    /// Default message TTL (`ttlInSeconds`), in milliseconds.
    ttl_ms: Option<u64>,
    concurrency: usize,
    client_name: Option<String>,
}

/// The RabbitMQ broker.
pub struct RabbitMq {
    settings: Arc<Settings>,
    /// The publishing connection, opened on first use and dropped after a failure.
    publisher: tokio::sync::Mutex<Option<Arc<Publisher>>>,
}

/// A connection with one channel in confirm mode, and the exchanges declared on it.
struct Publisher {
    connection: Connection,
    channel: Channel,
    declared: Mutex<HashSet<String>>,
}

/// Where and how a RabbitMQ component connects: its URL (with the password: shown only
/// through [`redact`]) and, for `amqps://`, the TLS client config and whether the client
/// certificate is the login (SASL EXTERNAL).
#[derive(Clone, Debug)]
pub(crate) struct AmqpTarget {
    uri: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    external: bool,
}

/// The broker URL (`key` names where it came from), the TLS keys and the SASL EXTERNAL switch
/// (`external`: its key and value), as both RabbitMQ components take them: an `amqp://` or
/// `amqps://` URL lapin reads. The URL is shown with its password redacted, certificates by
/// their size.
pub(crate) fn check_uri(
    meta: &Meta,
    key: &str,
    uri: &str,
    external: (&str, bool),
) -> Result<AmqpTarget, String> {
    let parsed = match uri.parse::<lapin::uri::AMQPUri>() {
        Ok(u) if uri.starts_with("amqp://") || uri.starts_with("amqps://") => u,
        _ => {
            return Err(meta.error(
                key,
                "an amqp:// or amqps:// URL such as amqp://user:pass@localhost:5672/vhost",
                &redact(uri),
            ));
        }
    };
    let tls = parsed.scheme == lapin::uri::AMQPScheme::AMQPS;
    // The message names no other key: the line shown is the TLS key's.
    let config =
        super::broker_tls::broker_tls(meta, tls, "the URL is amqp://; amqps:// is AMQP over TLS")?;
    let (external_key, external) = external;
    // daprd asks for all three: the client certificate is the login, checked by the broker
    // against its CA, and the broker's by ours.
    if external
        && let Some(missing) = ["caCert", "clientCert", "clientKey"]
            .into_iter()
            .find(|k| meta.str(k).is_none())
    {
        return Err(meta.error(
            external_key,
            "false, or an amqps:// URL with caCert, clientCert and clientKey (SASL EXTERNAL logs in with the client certificate)",
            &format!("true without {missing}"),
        ));
    }
    Ok(AmqpTarget {
        uri: uri.to_string(),
        tls: config,
        external,
    })
}

/// A RabbitMQ name (exchange, queue): at most 255 bytes, as AMQP's short strings.
pub(crate) fn short(s: &str) -> Result<ShortString, String> {
    ShortString::try_new(s).map_err(|_| format!("{s:?} is longer than 255 bytes"))
}

impl RabbitMq {
    pub fn new(meta: &Meta) -> Result<Self, String> {
        // `connectionString` (daprd's `host` before it), else protocol + hostname + username +
        // password.
        let uri = match meta.str("connectionString").or_else(|| meta.str("host")) {
            Some(s) => s.to_string(),
            None => {
                let protocol = meta.str("protocol").unwrap_or("amqp");
                let hostname = meta.str("hostname").unwrap_or("localhost");
                let auth = match (meta.str("username"), meta.str("password")) {
                    (Some(u), Some(p)) => format!("{}:{}@", percent_encode(u), percent_encode(p)),
                    (Some(u), None) => format!("{}@", percent_encode(u)),
                    _ => String::new(),
                };
                format!("{protocol}://{auth}{hostname}")
            }
        };
        let key = if meta.str("connectionString").is_some() {
            "connectionString"
        } else if meta.str("host").is_some() {
            "host"
        } else {
            "protocol"
        };
        let target = check_uri(
            meta,
            key,
            &uri,
            ("saslExternal", meta.bool("saslExternal", false)?),
        )?;
        let exchange_kind = match meta.str("exchangeKind").unwrap_or("fanout") {
            "fanout" => lapin::ExchangeKind::Fanout,
            "topic" => lapin::ExchangeKind::Topic,
            "direct" => lapin::ExchangeKind::Direct,
            "headers" => lapin::ExchangeKind::Headers,
            other => {
                return Err(meta.error("exchangeKind", "fanout, topic, direct or headers", other));
            }
        };
        let delivery_mode = match meta.u64("deliveryMode", 0)? {
            n @ 0..=2 => n as u8,
            n => {
                return Err(meta.error(
                    "deliveryMode",
                    "0, 1 or 2 (2: persistent)",
                    &n.to_string(),
                ));
            }
        };
        let prefetch = match meta.u64("prefetchCount", 0)? {
            n if n <= u16::MAX as u64 => n as u16,
            n => return Err(meta.error("prefetchCount", "at most 65535", &n.to_string())),
        };
        let concurrency = match meta
            .str("concurrencyMode")
            .or_else(|| meta.str("concurrency"))
            .unwrap_or("parallel")
        {
            "single" => 1,
            "parallel" => PARALLEL,
            other => return Err(meta.error("concurrencyMode", "single or parallel", other)),
        };
        // daprd reads whole seconds (`reconnectWaitSeconds`; its docs say `reconnectWait`).
        let reconnect_wait = match meta
            .str("reconnectWaitSeconds")
            .or_else(|| meta.str("reconnectWait"))
        {
            None => DEFAULT_RECONNECT_WAIT,
            Some(v) => match v.parse::<u64>() {
                Ok(s) => Duration::from_secs(s),
                Err(_) => humantime::parse_duration(v)
                    .map_err(|_| meta.error("reconnectWaitSeconds", "seconds, such as 3", v))?,
            },
        };
        let positive = |key: &str| -> Result<Option<i64>, String> {
            match meta.i64(key, 0)? {
                n if n > 0 => Ok(Some(n)),
                0 => Ok(None),
                n => Err(meta.error(key, "a positive integer", &n.to_string())),
            }
        };
        let ttl_ms = match meta.i64("ttlInSeconds", 0)? {
            n if n > 0 => Some(n as u64 * 1000),
            0 => None,
            n => {
                return Err(meta.error(
                    "ttlInSeconds",
                    "a positive number of seconds",
                    &n.to_string(),
                ));
            }
        };
        // Accepted: confirms are always on. `publisherConfirm: false` cannot turn them off.
        meta.bool("publisherConfirm", false)?;
        let settings = Settings {
            target,
            consumer_id: meta.str("consumerID").map(str::to_string),
            durable: meta.bool("durable", true)?,
            delete_when_unused: meta.bool("deletedWhenUnused", true)?,
            auto_ack: meta.bool("autoAck", false)?,
            requeue_in_failure: meta.bool("requeueInFailure", false)?,
            delivery_mode,
            prefetch,
            exchange_kind,
            reconnect_wait,
            max_len: positive("maxLen")?,
            max_len_bytes: positive("maxLenBytes")?,
            enable_dead_letter: meta.bool("enableDeadLetter", false)?,
            ttl_ms,
            concurrency,
            client_name: meta.str("clientName").map(str::to_string),
        };
        if let Some(id) = &settings.consumer_id {
            short(id).map_err(|_| meta.error("consumerID", "at most 255 bytes", id))?;
        }
        Ok(RabbitMq {
            settings: Arc::new(settings),
            publisher: tokio::sync::Mutex::new(None),
        })
    }

    /// The publishing channel, connecting when there is none.
    async fn publisher(&self) -> Result<Arc<Publisher>, String> {
        let mut slot = self.publisher.lock().await;
        if let Some(p) = slot.as_ref()
            && p.channel.status().connected()
        {
            return Ok(p.clone());
        }
        if let Some(old) = slot.take() {
            let _ = old.connection.close(200, "reconnecting".into()).await;
        }
        let connection = connect(&self.settings).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("rabbitmq: cannot open a channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("rabbitmq: cannot turn publisher confirms on: {e}"))?;
        let p = Arc::new(Publisher {
            connection,
            channel,
            declared: Mutex::new(HashSet::new()),
        });
        *slot = Some(p.clone());
        Ok(p)
    }

    /// Forgets `p` after a failure (the next publish reconnects).
    async fn reset(&self, p: &Arc<Publisher>) {
        let mut slot = self.publisher.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, p)) {
            *slot = None;
            let _ = p.connection.close(200, "reconnecting".into()).await;
        }
    }

    async fn publish_on(
        &self,
        p: &Publisher,
        topic: &str,
        data: &[u8],
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let exchange = short(topic)?;
        let known = p.declared.lock().unwrap().contains(topic);
        if !known {
            declare_exchange(&p.channel, topic, self.settings.exchange_kind.clone()).await?;
            p.declared.lock().unwrap().insert(topic.to_string());
        }
        let mut properties = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers(metadata));
        if self.settings.delivery_mode != 0 {
            properties = properties.with_delivery_mode(self.settings.delivery_mode);
        }
        // A per-message ttl (publish metadata), else the component's default, in ms.
        let ttl = metadata
            .get(super::super::ops::TTL_KEY)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(|s| s * 1000)
            .or(self.settings.ttl_ms);
        if let Some(ms) = ttl {
            properties = properties.with_expiration(ms.to_string().into());
        }
        let routing_key = short(metadata.get(ROUTING_KEY).map_or("", String::as_str))?;
        publish_confirmed(&p.channel, exchange, routing_key, data, properties).await
    }
}

/// Publishes on a channel in confirm mode and waits for the broker's answer: Ok only on its ack
/// (pub/sub and `bindings.rabbitmq` both answer 204 only once the broker has the message).
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    data: &[u8],
    properties: BasicProperties,
) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions::default(),
            data,
            properties,
        )
        .await
        .map_err(|e| format!("rabbitmq publish failed: {e}"))?
        .await
        .map_err(|e| format!("rabbitmq did not confirm the message: {e}"))?;
    match confirm {
        Confirmation::Ack(_) => Ok(()),
        Confirmation::Nack(_) => Err("rabbitmq refused the message (nack)".into()),
        Confirmation::NotRequested => Err("rabbitmq publisher confirms are off".into()),
    }
}

/// The metadata of a subscription made without any.
static NO_METADATA: BTreeMap<String, String> = BTreeMap::new();

/// Hides the secret of a broker URL in messages, logs and the metadata API (AMQP, MQTT and
/// NATS share it): `user:password@` becomes `user:***@`, and a lone userinfo becomes `***@`
/// (NATS reads `nats://TOKEN@host` as a token). A comma-separated server list (NATS) is
/// redacted server by server.
pub(crate) fn redact(uri: &str) -> String {
    uri.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(s), Some(at)) if at > s => match one[s + 3..at].split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &one[..s + 3], &one[at..]),
                None => format!("{}***{}", &one[..s + 3], &one[at..]),
            },
            _ => one.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

async fn connect(settings: &Settings) -> Result<Connection, String> {
    connect_uri(&settings.target, settings.client_name.as_deref()).await
}

/// The TCP connection and TLS handshake of an `amqps://` connection together: a broker that
/// accepts and then says nothing fails the attempt instead of hanging it.
const TLS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to `target` (named `name` in the management UI when given).
///
/// TLS through lapin's own rustls path (its `rustls-native-certs` feature: rustls-connector on
/// futures-rustls, aws-lc-rs, no ring) but with our client config and a connect of our own:
/// lapin's `OwnedTLSConfig` takes a CA bundle and a PKCS#12 identity only, and would make its
/// own roots and verifier.
pub(crate) async fn connect_uri(
    target: &AmqpTarget,
    name: Option<&str>,
) -> Result<Connection, String> {
    let failed = |e: &dyn std::fmt::Display| {
        format!("rabbitmq: cannot connect to {}: {e}", redact(&target.uri))
    };
    let mut props = ConnectionProperties::default();
    if let Some(name) = name {
        props = props.with_connection_name(name.into());
    }
    let Some(config) = &target.tls else {
        return Connection::connect(&target.uri, props)
            .await
            .map_err(|e| failed(&e));
    };
    let mut uri: lapin::uri::AMQPUri = target.uri.parse().map_err(|e: String| failed(&e))?;
    if target.external {
        uri.query.auth_mechanism = Some(lapin::uri::SASLMechanism::External);
    }
    let connector = lapin::tcp::RustlsConnector::from(config.clone());
    let runtime = lapin::runtime::default_runtime().map_err(|e| failed(&e))?;
    let open = async move |uri: lapin::uri::AMQPUri, runtime| {
        let host = uri.authority.host.clone();
        let connect = async {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), uri.authority.port))
                    .await?
                    .collect();
            let tcp = lapin::tcp::AsyncTcpStream::connect(&runtime, addrs).await?;
            tcp.into_rustls(&connector, &host).await
        };
        match tokio::time::timeout(TLS_CONNECT_TIMEOUT, connect).await {
            Ok(stream) => Ok(stream?),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no TLS connection within {}s",
                    TLS_CONNECT_TIMEOUT.as_secs()
                ),
            )
            .into()),
        }
    };
    Connection::connector(uri, runtime, open, props)
        .await
        .map_err(|e| failed(&e))
}

/// An exchange as daprd declares it: durable, not auto-deleted, of `kind` (the topic's:
/// `exchangeKind`; a dead-letter exchange: fanout).
async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: lapin::ExchangeKind,
) -> Result<(), String> {
    channel
        .exchange_declare(
            short(name)?,
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("rabbitmq: cannot declare exchange {name:?}: {e}"))
}

/// Publish metadata as AMQP headers (string values; names longer than 255 bytes left out).
pub(crate) fn headers(metadata: &BTreeMap<String, String>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in metadata {
        if let Ok(name) = ShortString::try_new(k.as_str()) {
            table.insert(name, AMQPValue::LongString(LongString::from(v.as_bytes())));
        }
    }
    table
}

/// The metadata carried in a delivery's headers (string values only).
pub(crate) fn metadata_of(properties: &BasicProperties) -> BTreeMap<String, String> {
    let Some(table) = properties.headers() else {
        return BTreeMap::new();
    };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                _ => return None,
            };
            Some((k.as_str().to_string(), text))
        })
        .collect()
}

impl Broker for RabbitMq {
    fn ping(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        Some(Box::pin(async move { self.publisher().await.map(drop) }))
    }

    fn kind(&self) -> &'static str {
        "pubsub.rabbitmq"
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Bytes,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let p = self.publisher().await.map_err(BrokerError::Publish)?;
            match self.publish_on(&p, topic, &data, metadata).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // A failed declare or publish closes the channel: start again next time.
                    self.reset(&p).await;
                    Err(BrokerError::Publish(e))
                }
            }
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        self.subscribe_with(topic, group, &NO_METADATA, handler)
    }

    fn subscribe_with<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        metadata: &'a BTreeMap<String, String>,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        Box::pin(async move {
            // daprd: `routingKey` split at commas, one binding each (none: the empty key).
            let routing_keys: Vec<String> = match metadata.get(ROUTING_KEY) {
                Some(keys) => keys.split(',').map(str::to_string).collect(),
                None => vec![String::new()],
            };
            for k in &routing_keys {
                short(k).map_err(|e| BrokerError::Subscribe(format!("routingKey {e}")))?;
            }
            let consumer_id = self.settings.consumer_id.as_deref().unwrap_or(group);
            let queue = format!("{consumer_id}-{topic}");
            short(&queue).map_err(|e| BrokerError::Subscribe(format!("queue name {e}")))?;
            let consumer = Arc::new(Consumer {
                topic: topic.to_string(),
                routing_keys,
                queue,
                settings: self.settings.clone(),
                handler,
                permits: Arc::new(Semaphore::new(self.settings.concurrency)),
            });
            let open = consumer.open().await.map_err(BrokerError::Subscribe)?;
            Ok(Subscription::spawn(move |stop| {
                consumer.run(Some(open), stop)
            }))
        })
    }
}

/// One subscription: its queue, its own connection, its handlers.
struct Consumer {
    topic: String,
    /// The keys the queue is bound with (at least one; `""` when the subscription names none).
    routing_keys: Vec<String>,
    queue: String,
    settings: Arc<Settings>,
    handler: Handler,
    permits: Arc<Semaphore>,
}

/// A subscription's connection and the deliveries coming over it.
struct Open {
    connection: Connection,
    deliveries: lapin::Consumer,
}

impl Consumer {
    /// Connects, declares the exchange, the queue (and the dead-letter pair) as daprd does,
    /// binds them and starts consuming.
    async fn open(&self) -> Result<Open, String> {
        let connection = connect(&self.settings).await?;
        match self.declare_and_consume(&connection).await {
            Ok(deliveries) => Ok(Open {
                connection,
                deliveries,
            }),
            Err(e) => {
                let _ = connection.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    async fn declare_and_consume(
        &self,
        connection: &Connection,
    ) -> Result<lapin::Consumer, String> {
        let s = &self.settings;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("rabbitmq: cannot open a channel: {e}"))?;
        declare_exchange(&channel, &self.topic, s.exchange_kind.clone()).await?;
        let limits = |mut t: FieldTable| {
            if let Some(n) = s.max_len {
                t.insert("x-max-length".into(), AMQPValue::LongLongInt(n));
            }
            if let Some(n) = s.max_len_bytes {
                t.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(n));
            }
            t
        };
        let mut args = FieldTable::default();
        if s.enable_dead_letter {
            let dlx = format!("dlx-{}", self.queue);
            let dlq = format!("dlq-{}", self.queue);
            declare_exchange(&channel, &dlx, lapin::ExchangeKind::Fanout).await?;
            let mut dlq_args = limits(FieldTable::default());
            dlq_args.insert(
                "x-queue-mode".into(),
                AMQPValue::LongString(LongString::from("lazy")),
            );
            channel
                .queue_declare(
                    short(&dlq)?,
                    QueueDeclareOptions {
                        durable: true,
                        auto_delete: s.delete_when_unused,
                        ..Default::default()
                    },
                    dlq_args,
                )
                .await
                .map_err(|e| format!("rabbitmq: cannot declare queue {dlq:?}: {e}"))?;
            channel
                .queue_bind(
                    short(&dlq)?,
                    short(&dlx)?,
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("rabbitmq: cannot bind {dlq:?} to {dlx:?}: {e}"))?;
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(dlx.as_bytes())),
            );
        }
        let queue = short(&self.queue)?;
        channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable: s.durable,
                    auto_delete: s.delete_when_unused,
                    ..Default::default()
                },
                limits(args),
            )
            .await
            .map_err(|e| format!("rabbitmq: cannot declare queue {:?}: {e}", self.queue))?;
        channel
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("rabbitmq: cannot set the prefetch count: {e}"))?;
        for key in &self.routing_keys {
            channel
                .queue_bind(
                    queue.clone(),
                    short(&self.topic)?,
                    short(key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    format!(
                        "rabbitmq: cannot bind queue {:?} to exchange {:?} with key {key:?}: {e}",
                        self.queue, self.topic
                    )
                })?;
        }
        channel
            .basic_consume(
                queue.clone(),
                queue,
                BasicConsumeOptions {
                    no_ack: s.auto_ack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("rabbitmq: cannot consume from {:?}: {e}", self.queue))
    }

    async fn run(self: Arc<Self>, mut open: Option<Open>, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                break;
            }
            let mut current = match open.take() {
                Some(o) => o,
                None => match self.open().await {
                    Ok(o) => {
                        tracing::info!(topic = %self.topic, queue = %self.queue, "rabbitmq subscription reconnected");
                        o
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(topic = %self.topic, queue = %self.queue, error = %e, "rabbitmq subscription cannot reconnect yet");
                        let wait = self.settings.reconnect_wait.max(
                            super::broker::reconnect_backoff(failures).min(Duration::from_secs(1)),
                        );
                        tokio::select! {
                            _ = stopped(&mut stop) => break,
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                },
            };
            failures = 0;
            loop {
                // A free handler slot first: deliveries wait in the broker's prefetch, not here.
                let permit = tokio::select! {
                    _ = stopped(&mut stop) => None,
                    p = self.permits.clone().acquire_owned() => p.ok(),
                };
                let Some(permit) = permit else { break };
                let next = tokio::select! {
                    _ = stopped(&mut stop) => break,
                    n = current.deliveries.next() => n,
                };
                match next {
                    Some(Ok(delivery)) => {
                        let me = self.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            me.handle(delivery, stop).await;
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(topic = %self.topic, queue = %self.queue, error = %e, "rabbitmq subscription lost its connection; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!(topic = %self.topic, queue = %self.queue, "rabbitmq ended the subscription (queue deleted?); reconnecting");
                        break;
                    }
                }
            }
            // Handlers in flight finish (their acks need this connection) before it closes:
            // what they leave unacked goes back to the queue when it does.
            let all = self.settings.concurrency as u32;
            if let Ok(p) = self.permits.acquire_many(all).await {
                drop(p);
            }
            let _ = current.connection.close(200, "bye".into()).await;
            if !*stop.borrow() {
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = tokio::time::sleep(self.settings.reconnect_wait) => {}
                }
            }
        }
    }

    async fn handle(&self, delivery: lapin::message::Delivery, stop: watch::Receiver<bool>) {
        let message = Message {
            topic: self.topic.clone(),
            metadata: metadata_of(&delivery.properties),
            data: Bytes::from(delivery.data),
        };
        let outcome = (self.handler)(message).await;
        if self.settings.auto_ack {
            return;
        }
        let res = match outcome {
            Outcome::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
            // Stopping: left unacked, so the broker requeues it as the channel closes.
            Outcome::Retry if *stop.borrow() => return,
            Outcome::Retry => {
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: self.settings.requeue_in_failure,
                    })
                    .await
            }
        };
        if let Err(e) = res {
            // The connection is gone: the broker redelivers the message.
            tracing::warn!(topic = %self.topic, queue = %self.queue, error = %e, "rabbitmq ack/nack failed; the broker will redeliver");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("amqp://guest:secret@localhost:5672/v"),
            "amqp://guest:***@localhost:5672/v"
        );
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
        assert_eq!(redact("nats://s3cret@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact("nats://u:p@a:4222,nats://b:4222"),
            "nats://u:***@a:4222,nats://b:4222"
        );
    }

    #[test]
    fn metadata_round_trips_through_headers() {
        let m: BTreeMap<String, String> = [("region".to_string(), "eu".to_string())].into();
        let props = BasicProperties::default().with_headers(headers(&m));
        assert_eq!(metadata_of(&props), m);
        let long: BTreeMap<String, String> = [("k".repeat(300), "v".to_string())].into();
        assert!(headers(&long).inner().is_empty());
    }
}
