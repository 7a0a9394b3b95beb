//! `bindings.rabbitmq`: one RabbitMQ queue as an output and an input binding, as daprd's
//! (components-contrib `bindings/rabbitmq`). The queue `queueName` is declared as daprd
//! declares it (`durable`, `deleteWhenUnused`, `exclusive`; `x-message-ttl` from the component's
//! `ttlInSeconds`, `x-max-priority` from `maxPriority`).
//!
//! Output (`create`): the data is published to the default exchange with the queue as routing
//! key, persistent, with the content type of the request's `contentType` metadata or the
//! component's (default `text/plain`), a per-message `ttlInSeconds` (expiration) and `priority`
//! (0–255); the other request metadata go as headers. The channel is in confirm mode: the call
//! answers once RabbitMQ has the message (daprd does not wait for a confirm).
//!
//! Input: the queue is consumed with `prefetchCount` (0: no limit, as daprd), one message at a
//! time (as daprd's binding); a message the app took (2xx) is acked, any other outcome nacked
//! with requeue, as daprd does; one in flight when the connection breaks comes back from the
//! broker. The message's string headers arrive as the event's metadata. It implements
//! [`Broker`] so the input binding reads it as it reads `bindings.mqtt3` (the topic is the
//! queue). Both sides connect on first use and again after a failure (`reconnectWaitInSeconds`,
//! default 5).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::watch;

use super::components::Component;
use super::pubsub::broker::{
    BoxFuture, Broker, BrokerError, Handler, Message, Meta, Outcome, Subscription, stopped,
};
use super::pubsub::rabbitmq::{
    AmqpTarget, check_uri, connect_uri, headers, metadata_of, publish_confirmed, short,
};

/// daprd's `reconnectWaitInSeconds` default.
const DEFAULT_RECONNECT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Settings {
    target: AmqpTarget,
    queue: String,
    durable: bool,
    delete_when_unused: bool,
    exclusive: bool,
    /// The publishing side declares the queue too — except for an `exclusive` queue the input
    /// side reads: only the connection that declares an exclusive queue may use it, so the
    /// consumer's declares it and the publisher only sends to it (by the default exchange,
    /// which any connection may).
    publisher_declares: bool,
    prefetch: u16,
    max_priority: Option<u8>,
    /// The queue's message TTL (`ttlInSeconds`), in milliseconds.
    queue_ttl_ms: Option<i64>,
    content_type: String,
    reconnect_wait: Duration,
}

/// A `bindings.rabbitmq` component: the publishing side's connection, made on first use.
pub struct RabbitBinding {
    settings: Arc<Settings>,
    publisher: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl RabbitBinding {
    /// Checks the metadata (nothing connects).
    pub fn open(c: &Component) -> Result<RabbitBinding, String> {
        let meta = Meta::new(c);
        let uri = meta
            .required(
                "host",
                "an amqp:// URL such as amqp://guest:guest@localhost:5672",
            )?
            .to_string();
        // daprd's binding spells it `externalSasl` (its pub/sub: `saslExternal`).
        let target = check_uri(
            &meta,
            "host",
            &uri,
            ("externalSasl", meta.bool("externalSasl", false)?),
        )?;
        let queue = meta
            .required("queueName", "the queue to publish to and read from")?
            .to_string();
        short(&queue).map_err(|_| meta.error("queueName", "at most 255 bytes", &queue))?;
        let prefetch = match meta.u64("prefetchCount", 0)? {
            n if n <= u16::MAX as u64 => n as u16,
            n => return Err(meta.error("prefetchCount", "at most 65535", &n.to_string())),
        };
        // contrib parses maxPriority as an integer and caps it at 255.
        let max_priority = match meta.str("maxPriority") {
            None => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| meta.error("maxPriority", "an integer from 1 to 255", v))?
                    .min(255) as u8,
            ),
        };
        let queue_ttl_ms = match meta.i64("ttlInSeconds", 0)? {
            0 => None,
            n if n > 0 => Some(n.saturating_mul(1000)),
            n => {
                return Err(meta.error(
                    "ttlInSeconds",
                    "a positive number of seconds",
                    &n.to_string(),
                ));
            }
        };
        let reconnect_wait = Duration::from_secs(
            meta.u64("reconnectWaitInSeconds", DEFAULT_RECONNECT_WAIT.as_secs())?,
        );
        Ok(RabbitBinding {
            settings: Arc::new(Settings {
                target,
                queue,
                durable: meta.bool("durable", false)?,
                delete_when_unused: meta.bool("deleteWhenUnused", false)?,
                exclusive: meta.bool("exclusive", false)?,
                publisher_declares: !(meta.bool("exclusive", false)?
                    && super::input_bindings::reads_input(c)?),
                prefetch,
                max_priority,
                queue_ttl_ms,
                content_type: meta.str("contentType").unwrap_or("text/plain").to_string(),
                reconnect_wait,
            }),
            publisher: tokio::sync::Mutex::new(None),
        })
    }

    /// The queue (the input side's "topic").
    pub fn queue(&self) -> &str {
        &self.settings.queue
    }

    /// Opens the publishing connection and channel when `slot` has none that is connected.
    async fn connect(&self, slot: &mut Option<(Connection, Channel)>) -> Result<(), String> {
        if slot.as_ref().is_some_and(|(_, ch)| ch.status().connected()) {
            return Ok(());
        }
        if let Some((old, _)) = slot.take() {
            let _ = old.close(200, "reconnecting".into()).await;
        }
        let connection = connect_uri(&self.settings.target, None).await?;
        let opened = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("rabbitmq: cannot open a channel: {e}"))?;
            if self.settings.publisher_declares {
                declare_queue(&channel, &self.settings).await?;
            }
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| format!("rabbitmq: cannot turn publisher confirms on: {e}"))?;
            Ok::<_, String>(channel)
        }
        .await;
        match opened {
            Ok(channel) => {
                *slot = Some((connection, channel));
                Ok(())
            }
            Err(e) => {
                let _ = connection.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    /// The health probe: the publishing channel is open (connecting when it is not).
    pub async fn ping(&self) -> Result<(), String> {
        self.connect(&mut *self.publisher.lock().await).await
    }

    /// `create`: publishes `data` to the queue and waits for the broker's confirm.
    pub async fn create(
        &self,
        data: &[u8],
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(
                metadata
                    .get("contentType")
                    .filter(|c| !c.is_empty())
                    .unwrap_or(&self.settings.content_type)
                    .as_str()
                    .into(),
            );
        if let Some(seconds) = super::binding_redis::ttl_seconds(metadata)? {
            properties =
                properties.with_expiration(seconds.saturating_mul(1000).to_string().into());
        }
        if let Some(p) = metadata.get("priority").filter(|p| !p.is_empty()) {
            let p = p.parse::<u8>().map_err(|_| {
                format!("priority value must be an integer from 0 to 255: actual is '{p}'")
            })?;
            properties = properties.with_priority(p);
        }
        let extra: BTreeMap<String, String> = metadata
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "ttlInSeconds" | "priority" | "contentType"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !extra.is_empty() {
            properties = properties.with_headers(headers(&extra));
        }
        let mut slot = self.publisher.lock().await;
        self.connect(&mut slot).await?;
        let Some((_, channel)) = slot.as_ref() else {
            unreachable!("connected above")
        };
        let published = match short(&self.settings.queue) {
            Ok(queue) => publish_confirmed(channel, "".into(), queue, data, properties).await,
            Err(e) => Err(e),
        };
        if published.is_err()
            && let Some((connection, _)) = slot.take()
        {
            // A failed publish closes the channel: start again next time.
            let _ = connection.close(200, "reconnecting".into()).await;
        }
        published
    }
}

/// The queue as daprd declares it.
async fn declare_queue(channel: &Channel, s: &Settings) -> Result<(), String> {
    let mut args = FieldTable::default();
    if let Some(ms) = s.queue_ttl_ms {
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
    }
    if let Some(p) = s.max_priority {
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(p));
    }
    channel
        .queue_declare(
            short(&s.queue)?,
            QueueDeclareOptions {
                durable: s.durable,
                auto_delete: s.delete_when_unused,
                exclusive: s.exclusive,
                ..Default::default()
            },
            args,
        )
        .await
        .map(drop)
        .map_err(|e| format!("rabbitmq: cannot declare queue {:?}: {e}", s.queue))
}

impl Broker for RabbitBinding {
    fn ping(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        Some(Box::pin(RabbitBinding::ping(self)))
    }

    fn kind(&self) -> &'static str {
        "bindings.rabbitmq"
    }

    fn publish<'a>(
        &'a self,
        _topic: &'a str,
        data: Bytes,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            self.create(&data, metadata)
                .await
                .map_err(BrokerError::Publish)
        })
    }

    /// Consumes the queue (`topic` and `group` are not used: the component names the queue).
    fn subscribe<'a>(
        &'a self,
        _topic: &'a str,
        _group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        Box::pin(async move {
            let settings = self.settings.clone();
            let open = consume(&settings).await.map_err(BrokerError::Subscribe)?;
            Ok(Subscription::spawn(move |stop| {
                read(settings, Some(open), handler, stop)
            }))
        })
    }
}

/// Connects, declares the queue, sets the prefetch and starts consuming.
async fn consume(s: &Settings) -> Result<(Connection, lapin::Consumer), String> {
    let connection = connect_uri(&s.target, None).await?;
    let setup = async {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("rabbitmq: cannot open a channel: {e}"))?;
        declare_queue(&channel, s).await?;
        channel
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("rabbitmq: cannot set the prefetch count: {e}"))?;
        channel
            .basic_consume(
                short(&s.queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("rabbitmq: cannot consume from {:?}: {e}", s.queue))
    }
    .await;
    match setup {
        Ok(consumer) => Ok((connection, consumer)),
        Err(e) => {
            let _ = connection.close(200, "setup failed".into()).await;
            Err(e)
        }
    }
}

/// Hands each delivery to `handler` in turn, acking or nacking (requeue) by its outcome;
/// reconnects after `reconnect_wait` when the connection breaks, until `stop`.
async fn read(
    s: Arc<Settings>,
    mut open: Option<(Connection, lapin::Consumer)>,
    handler: Handler,
    mut stop: watch::Receiver<bool>,
) {
    // Failures in a row: a message the app keeps refusing comes straight back after its
    // requeue, so each retry waits a little longer (100 ms doubling to 5 s) instead of spinning.
    let mut refused = 0u32;
    loop {
        let (connection, mut deliveries) = match open.take() {
            Some(o) => o,
            None => match consume(&s).await {
                Ok(o) => {
                    tracing::info!(queue = %s.queue, "rabbitmq input binding reconnected");
                    o
                }
                Err(e) => {
                    tracing::warn!(queue = %s.queue, error = %e, "rabbitmq input binding cannot reconnect yet");
                    tokio::select! {
                        _ = stopped(&mut stop) => return,
                        _ = tokio::time::sleep(s.reconnect_wait.max(Duration::from_millis(100))) => continue,
                    }
                }
            },
        };
        loop {
            let next = tokio::select! {
                _ = stopped(&mut stop) => None,
                n = deliveries.next() => Some(n),
            };
            let delivery = match next {
                None => {
                    // Stopping: what was not acked goes back to the queue as the channel closes.
                    let _ = connection.close(200, "bye".into()).await;
                    return;
                }
                Some(Some(Ok(d))) => d,
                Some(Some(Err(e))) => {
                    tracing::warn!(queue = %s.queue, error = %e, "rabbitmq input binding lost its connection; reconnecting");
                    break;
                }
                Some(None) => {
                    tracing::warn!(queue = %s.queue, "rabbitmq ended the consumer (queue deleted?); reconnecting");
                    break;
                }
            };
            let message = Message {
                topic: s.queue.clone(),
                metadata: metadata_of(&delivery.properties),
                data: Bytes::from(delivery.data),
            };
            let outcome = handler(message).await;
            if outcome == Outcome::Retry {
                refused += 1;
                tokio::select! {
                    _ = stopped(&mut stop) => {}
                    _ = tokio::time::sleep(super::pubsub::broker::reconnect_backoff(refused)) => {}
                }
                if *stop.borrow() {
                    let _ = connection.close(200, "bye".into()).await;
                    return;
                }
            } else {
                refused = 0;
            }
            let res = match outcome {
                Outcome::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
                Outcome::Retry => {
                    delivery
                        .acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await
                }
            };
            if let Err(e) = res {
                tracing::warn!(queue = %s.queue, error = %e, "rabbitmq ack/nack failed; the broker will redeliver");
            }
        }
        let _ = connection.close(200, "bye".into()).await;
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(s.reconnect_wait) => {}
        }
    }
}
