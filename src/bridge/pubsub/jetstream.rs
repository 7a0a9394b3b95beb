//! `pubsub.jetstream`: NATS JetStream. Publish waits for the stream's ack. A subscription is a
//! durable pull consumer with explicit acks: a message is acked after the handler says ack and
//! nak'ed for redelivery otherwise (and redelivered by the server after `ackWait` if neither
//! arrives, e.g. across a restart).
//!
//! Streams: with `streamName`, that stream is used (created if missing, and the topic added to
//! its subjects if it does not list it); without, each topic gets a stream named after it
//! (characters JetStream refuses in names become `_`). Consumers are named
//! `{durableName or consumer group}-{topic}` (sanitised the same way), one per topic, so several
//! topics can share a stream. The client connects on first use and reconnects by itself.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{OnceCell, Semaphore};

use super::broker::{
    BoxFuture, Broker, BrokerError, Handler, Message, Meta, Outcome, Subscription,
    reconnect_backoff, stopped,
};
use super::rabbitmq::redact;

/// Dapr's component defaults (the server's where Dapr leaves them unset).
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECTION_NAME: &str = "dapr.io - pubsub.jetstream";
/// How long one fetch waits for messages before it is renewed (also bounds how long a lost
/// pull, e.g. across a server restart, goes unnoticed).
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// Handlers at once per subscription with `concurrency: parallel` (`single` is one).
const PARALLEL: usize = 10;

#[derive(Clone, Debug)]
struct Settings {
    url: String,
    name: String,
    stream_name: Option<String>,
    durable_name: Option<String>,
    ack_wait: Duration,
    max_deliver: i64,
    max_ack_pending: i64,
    memory_storage: bool,
    replicas: usize,
    deliver_policy: consumer::DeliverPolicy,
    backoff: Vec<Duration>,
    concurrency: usize,
}

/// The JetStream broker.
pub struct JetStream {
    settings: Settings,
    context: OnceCell<jetstream::Context>,
    /// Topics whose stream is known to exist and to list them.
    ready_topics: Mutex<HashSet<String>>,
    /// Serialises stream creation and updates.
    stream_lock: tokio::sync::Mutex<()>,
}

/// A JetStream name (stream, consumer): no `.`, `*`, `>`, whitespace or path separators.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl JetStream {
    pub fn new(meta: &Meta) -> Result<Self, String> {
        let url = meta.required("natsURL", "the NATS server URL, e.g. nats://localhost:4222")?;
        if url.parse::<async_nats::ServerAddr>().is_err() {
            return Err(meta.error(
                "natsURL",
                "a NATS URL such as nats://localhost:4222",
                &redact(url),
            ));
        }
        for key in [
            "jwt",
            "seedKey",
            "token",
            "tls_client_cert",
            "tls_client_key",
        ] {
            meta.unsupported(key, "nothing (only unauthenticated NATS is supported)")?;
        }
        let start_sequence = meta.u64("startSequence", 0)?;
        let start_time =
            match meta.i64("startTime", 0)? {
                0 => None,
                t => Some(time::OffsetDateTime::from_unix_timestamp(t).map_err(|_| {
                    meta.error("startTime", "a Unix time in seconds", &t.to_string())
                })?),
            };
        // Dapr's order: an explicit deliverPolicy, else startSequence, startTime, deliverAll.
        let deliver_policy = match meta.str("deliverPolicy") {
            Some("all") => consumer::DeliverPolicy::All,
            Some("last") => consumer::DeliverPolicy::Last,
            Some("new") => consumer::DeliverPolicy::New,
            Some("sequence") if start_sequence > 0 => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            Some("time") if start_time.is_some() => consumer::DeliverPolicy::ByStartTime {
                start_time: start_time.unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
            Some(other) => {
                return Err(meta.error(
                    "deliverPolicy",
                    "all, last, new, sequence (with startSequence) or time (with startTime)",
                    other,
                ));
            }
            None if start_sequence > 0 => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            None => match start_time {
                Some(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
                None => consumer::DeliverPolicy::All,
            },
        };
        meta.bool("deliverAll", true)?;
        let concurrency = match meta.str("concurrency").unwrap_or("parallel") {
            "single" => 1,
            "parallel" => PARALLEL,
            other => return Err(meta.error("concurrency", "single or parallel", other)),
        };
        let backoff = match meta.str("backOff") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|d| humantime::parse_duration(d.trim()))
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    meta.error("backOff", "comma-separated durations such as 1s,5s", list)
                })?,
        };
        let settings = Settings {
            url: url.to_string(),
            name: meta
                .str("name")
                .unwrap_or(DEFAULT_CONNECTION_NAME)
                .to_string(),
            stream_name: meta.str("streamName").map(str::to_string),
            durable_name: meta.str("durableName").map(str::to_string),
            ack_wait: meta.duration("ackWait", DEFAULT_ACK_WAIT)?,
            max_deliver: meta.i64("maxDeliver", -1)?,
            max_ack_pending: meta.i64("maxAckPending", 0)?,
            memory_storage: meta.bool("memoryStorage", false)?,
            replicas: meta.u64("replicas", 1)?.max(1) as usize,
            deliver_policy,
            backoff,
            concurrency,
        };
        if let Some(name) = &settings.stream_name
            && sanitize(name) != *name
        {
            return Err(meta.error("streamName", "a name of letters, digits, - and _", name));
        }
        Ok(JetStream {
            settings,
            context: OnceCell::new(),
            ready_topics: Mutex::new(HashSet::new()),
            stream_lock: tokio::sync::Mutex::new(()),
        })
    }

    async fn context(&self) -> Result<&jetstream::Context, String> {
        self.context
            .get_or_try_init(|| async {
                let client = async_nats::ConnectOptions::new()
                    .name(&self.settings.name)
                    .retry_on_initial_connect()
                    .connect(self.settings.url.as_str())
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot connect to nats at {}: {e}",
                            redact(&self.settings.url)
                        )
                    })?;
                Ok(jetstream::new(client))
            })
            .await
    }

    fn stream_name(&self, topic: &str) -> String {
        self.settings
            .stream_name
            .clone()
            .unwrap_or_else(|| sanitize(topic))
    }

    /// Makes sure a stream captures `topic`.
    async fn ensure_stream(&self, topic: &str) -> Result<stream::Stream, String> {
        let js = self.context().await?;
        let name = self.stream_name(topic);
        let _guard = self.stream_lock.lock().await;
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![topic.to_string()],
            storage: if self.settings.memory_storage {
                stream::StorageType::Memory
            } else {
                stream::StorageType::File
            },
            num_replicas: self.settings.replicas,
            ..Default::default()
        };
        let mut stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| format!("cannot create or find stream {name:?}: {e}"))?;
        let info = stream
            .info()
            .await
            .map_err(|e| format!("cannot read stream {name:?}: {e}"))?;
        if !info
            .config
            .subjects
            .iter()
            .any(|s| subject_matches(s, topic))
        {
            let mut config = info.config.clone();
            config.subjects.push(topic.to_string());
            js.update_stream(config)
                .await
                .map_err(|e| format!("cannot add subject {topic:?} to stream {name:?}: {e}"))?;
        }
        self.ready_topics.lock().unwrap().insert(topic.to_string());
        Ok(stream)
    }
}

/// Publish metadata as NATS headers (names NATS reserves, `Nats-…`, and unsendable pairs are
/// left out).
fn headers(metadata: &BTreeMap<String, String>) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in metadata {
        let name_ok = !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            && !k.to_ascii_lowercase().starts_with("nats-");
        if name_ok && !v.contains(['\r', '\n']) {
            h.insert(k.as_str(), v.as_str());
        }
    }
    h
}

/// The metadata carried in a message's headers.
fn metadata_of(message: &async_nats::Message) -> BTreeMap<String, String> {
    message
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .filter_map(|(k, v)| Some((k.to_string(), v.first()?.to_string())))
        .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("nats-"))
        .collect()
}

/// Whether NATS subject pattern `pattern` (with `*` and `>`) covers `subject`.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// How long a health probe waits for a connection still being opened (under the health
/// module's 3 s probe timeout).
const PING_PENDING: Duration = Duration::from_secs(2);

impl Broker for JetStream {
    fn ping(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        Some(Box::pin(async move {
            let js = self.context().await?;
            // Right after start the first connection is still pending (it is opened in the
            // background): give it a moment before calling the component unhealthy.
            let mut waited = Duration::ZERO;
            loop {
                match js.client().connection_state() {
                    async_nats::connection::State::Connected => return Ok(()),
                    async_nats::connection::State::Pending if waited < PING_PENDING => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        waited += Duration::from_millis(50);
                    }
                    state => {
                        return Err(format!("nats at {}: {state}", redact(&self.settings.url)));
                    }
                }
            }
        }))
    }

    fn kind(&self) -> &'static str {
        "pubsub.jetstream"
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Bytes,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let known = self.ready_topics.lock().unwrap().contains(topic);
            if !known {
                self.ensure_stream(topic)
                    .await
                    .map_err(BrokerError::Publish)?;
            }
            let js = self.context().await.map_err(BrokerError::Publish)?;
            let ack = js
                .publish_with_headers(topic.to_string(), headers(metadata), data)
                .await
                .map_err(|e| BrokerError::Publish(format!("nats publish failed: {e}")))?;
            ack.await.map(|_| ()).map_err(|e| {
                BrokerError::Publish(format!("jetstream did not store the message: {e}"))
            })
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        Box::pin(async move {
            let durable = sanitize(&format!(
                "{}-{topic}",
                self.settings.durable_name.as_deref().unwrap_or(group)
            ));
            let config = consumer::pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: topic.to_string(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.settings.ack_wait,
                max_deliver: self.settings.max_deliver,
                max_ack_pending: self.settings.max_ack_pending,
                deliver_policy: self.settings.deliver_policy,
                backoff: self.settings.backoff.clone(),
                ..Default::default()
            };
            let consumer = Arc::new(Consumer {
                topic: topic.to_string(),
                config,
                permits: Arc::new(Semaphore::new(self.settings.concurrency)),
                concurrency: self.settings.concurrency,
                handler,
            });
            let consumer_handle = consumer.open(self).await.map_err(BrokerError::Subscribe)?;
            let broker = JetStreamRef {
                settings: self.settings.clone(),
                context: self
                    .context()
                    .await
                    .map_err(BrokerError::Subscribe)?
                    .clone(),
            };
            Ok(Subscription::spawn(move |stop| {
                consumer.run(broker, Some(consumer_handle), stop)
            }))
        })
    }
}

/// What a subscription's task keeps of the broker to reopen its consumer.
struct JetStreamRef {
    settings: Settings,
    context: jetstream::Context,
}

struct Consumer {
    topic: String,
    config: consumer::pull::Config,
    permits: Arc<Semaphore>,
    concurrency: usize,
    handler: Handler,
}

type PullConsumer = consumer::Consumer<consumer::pull::Config>;

impl Consumer {
    async fn open(&self, broker: &JetStream) -> Result<PullConsumer, String> {
        let stream = broker.ensure_stream(&self.topic).await?;
        self.create(&stream).await
    }

    async fn create(&self, stream: &stream::Stream) -> Result<PullConsumer, String> {
        let name = self.config.durable_name.clone().unwrap_or_default();
        stream
            .get_or_create_consumer(&name, self.config.clone())
            .await
            .map_err(|e| format!("cannot create consumer {name:?}: {e}"))
    }

    async fn reopen(&self, broker: &JetStreamRef) -> Result<PullConsumer, String> {
        let name = broker
            .settings
            .stream_name
            .clone()
            .unwrap_or_else(|| sanitize(&self.topic));
        let stream = broker
            .context
            .get_stream(&name)
            .await
            .map_err(|e| format!("cannot find stream {name:?}: {e}"))?;
        self.create(&stream).await
    }

    async fn run(
        self: Arc<Self>,
        broker: JetStreamRef,
        mut consumer: Option<PullConsumer>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut failures = 0u32;
        'outer: loop {
            if *stop.borrow() {
                break;
            }
            let c = match consumer.take() {
                Some(c) => c,
                None => match self.reopen(&broker).await {
                    Ok(c) => c,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(topic = %self.topic, error = %e, "jetstream consumer cannot be opened");
                        tokio::select! {
                            _ = stopped(&mut stop) => break,
                            _ = tokio::time::sleep(reconnect_backoff(failures)) => continue,
                        }
                    }
                },
            };
            // Delivery slots first, then fetch exactly that many: nothing waits in a client
            // buffer past the server's redelivery deadline (only messages being delivered
            // exist here, and those get progress acks).
            let first = tokio::select! {
                _ = stopped(&mut stop) => break 'outer,
                p = self.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
            };
            let mut slots = vec![first];
            while let Ok(p) = self.permits.clone().try_acquire_owned() {
                slots.push(p);
            }
            let mut messages = match c
                .fetch()
                .max_messages(slots.len())
                .expires(FETCH_WAIT)
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(topic = %self.topic, error = %e, "jetstream pull failed");
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        _ = tokio::time::sleep(reconnect_backoff(failures)) => continue,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stopped(&mut stop) => break 'outer,
                    n = messages.next() => n,
                };
                let message = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        failures += 1;
                        tracing::warn!(topic = %self.topic, error = %e, "jetstream fetch failed; reopening");
                        tokio::select! {
                            _ = stopped(&mut stop) => break 'outer,
                            _ = tokio::time::sleep(reconnect_backoff(failures)) => continue 'outer,
                        }
                    }
                    // The batch is done (full, or expired): fetch again with the free slots.
                    None => {
                        consumer = Some(c);
                        continue 'outer;
                    }
                };
                failures = 0;
                let Some(permit) = slots.pop() else {
                    // More than asked for: never expected; leave it to redelivery.
                    continue;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let m = Message {
                        topic: me.topic.clone(),
                        data: message.payload.clone(),
                        metadata: metadata_of(&message),
                    };
                    // A delivery may outlast `ackWait` (retries with backoff): tell the server
                    // it is being worked on, so it is not redelivered meanwhile.
                    let handling = (me.handler)(m);
                    tokio::pin!(handling);
                    // With `backOff`, the server's redelivery deadline is its entries, not ackWait.
                    let deadline = me
                        .config
                        .backoff
                        .iter()
                        .copied()
                        .chain(std::iter::once(me.config.ack_wait))
                        .filter(|d| !d.is_zero())
                        .min()
                        .unwrap_or(me.config.ack_wait);
                    let every = (deadline / 3).max(Duration::from_millis(100));
                    let mut progress =
                        tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    let outcome = loop {
                        tokio::select! {
                            o = &mut handling => break o,
                            _ = progress.tick() => {
                                let _ = message.ack_with(AckKind::Progress).await;
                            }
                        }
                    };
                    // An ack waits for the server's confirmation; a nak need not.
                    let res = match outcome {
                        Outcome::Ack => message.double_ack().await,
                        Outcome::Retry => message.ack_with(AckKind::Nak(None)).await,
                    };
                    if let Err(e) = res {
                        // Unacknowledged: the server redelivers after ackWait.
                        tracing::warn!(topic = %me.topic, error = %e, "jetstream ack failed");
                    }
                });
            }
        }
        let _ = self.permits.acquire_many(self.concurrency as u32).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_subjects() {
        assert_eq!(sanitize("orders.eu/new"), "orders_eu_new");
        assert!(subject_matches("orders.*", "orders.eu"));
        assert!(subject_matches("orders.>", "orders.eu.new"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders.*", "orders.eu.new"));
        assert!(!subject_matches("orders", "orders.eu"));
    }

    #[test]
    fn metadata_headers_skip_reserved_and_unsendable() {
        let md = BTreeMap::from([
            ("region".to_string(), "eu".to_string()),
            ("Nats-Msg-Id".to_string(), "x".to_string()),
            ("bad:name".to_string(), "x".to_string()),
            ("multi".to_string(), "a\r\nb".to_string()),
        ]);
        let h = headers(&md);
        assert_eq!(h.get("region").map(|v| v.as_str()), Some("eu"));
        assert_eq!(h.iter().count(), 1);
    }
}
