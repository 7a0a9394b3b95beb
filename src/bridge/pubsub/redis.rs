//! `pubsub.redis`: Redis Streams, as Dapr's component uses them. A topic is a stream; publish is
//! `XADD topic [MAXLEN ~ n] * data <bytes> [metadata <json>]`; a subscription is a consumer
//! group (`consumerID`, default the app id) created at `0` with `MKSTREAM`, read with
//! `XREADGROUP … >`. A message is `XACK`ed only after the handler says ack; one left for retry
//! stays pending and is claimed again (`XAUTOCLAIM`) once it has been idle for
//! `processingTimeout`, checked every `redeliverInterval`.
//!
//! Connections are opened on first use and reopened after errors (a Redis restart is survived;
//! what Redis persisted is delivered again).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::Semaphore;

use super::broker::{
    BoxFuture, Broker, BrokerError, Handler, Message, Meta, Outcome, Subscription,
    reconnect_backoff, stopped,
};
use crate::bridge::percent_encode;

/// Dapr's defaults for the Redis component.
const DEFAULT_PROCESSING_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_REDELIVER_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_QUEUE_DEPTH: u64 = 100;
const DEFAULT_CONCURRENCY: u64 = 10;
/// How long one `XREADGROUP` blocks, so a stop is noticed promptly.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// Settings from the component's metadata.
#[derive(Clone, Debug)]
struct Settings {
    consumer_id: Option<String>,
    max_len_approx: Option<u64>,
    processing_timeout: Duration,
    redeliver_interval: Duration,
    queue_depth: usize,
    concurrency: usize,
}

/// The Redis Streams broker.
pub struct Redis {
    settings: Settings,
    shared: Arc<Shared>,
}

/// The client and one multiplexed connection for XADD and XACK, reopened after an error.
struct Shared {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Shared {
    /// Runs `cmd` on the shared connection; a connection error drops it so the next call
    /// reconnects.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = {
            let mut slot = self.conn.lock().await;
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = self.client.get_multiplexed_async_connection().await?;
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        let res = cmd.query_async(&mut conn).await;
        if let Err(e) = &res
            && (e.is_io_error() || e.is_connection_dropped() || e.is_timeout())
        {
            *self.conn.lock().await = None;
        }
        res
    }
}

impl Redis {
    pub fn new(meta: &Meta) -> Result<Self, String> {
        let host = meta.required("redisHost", "host:port of the Redis server")?;
        if host.contains("://") || !host.contains(':') {
            return Err(meta.error("redisHost", "host:port", host));
        }
        meta.unsupported("failover", "false (Sentinel is not supported)")?;
        if let Some(t) = meta.str("redisType")
            && t != "node"
        {
            return Err(meta.error("redisType", "node (cluster is not supported)", t));
        }
        let db = meta.u64("redisDB", 0)?;
        let user = meta.str("redisUsername").unwrap_or("");
        let auth = match meta.str("redisPassword") {
            Some(p) => format!("{}:{}@", percent_encode(user), percent_encode(p)),
            None if !user.is_empty() => format!("{}@", percent_encode(user)),
            None => String::new(),
        };
        let tls = crate::bridge::state::redis_tls(|k| meta.str(k))
            .map_err(|p| meta.error(p.key, &p.expected, &p.found))?;
        let url = format!("redis://{auth}{host}/{db}");
        let client = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .and_then(|info| crate::bridge::state::redis_open(info, tls.as_ref()))
            .map_err(|e| meta.error("redisHost", "host:port", &format!("{host} ({e})")))?;
        let positive = |key: &str, default: u64| -> Result<usize, String> {
            match meta.u64(key, default)? {
                0 => Err(meta.error(key, "an integer above 0", "0")),
                n => Ok(n as usize),
            }
        };
        let settings = Settings {
            consumer_id: meta.str("consumerID").map(str::to_string),
            max_len_approx: match meta.u64("maxLenApprox", 0)? {
                0 => None,
                n => Some(n),
            },
            processing_timeout: meta.duration("processingTimeout", DEFAULT_PROCESSING_TIMEOUT)?,
            redeliver_interval: meta.duration("redeliverInterval", DEFAULT_REDELIVER_INTERVAL)?,
            queue_depth: positive("queueDepth", DEFAULT_QUEUE_DEPTH)?,
            concurrency: positive("concurrency", DEFAULT_CONCURRENCY)?,
        };
        Ok(Redis {
            settings,
            shared: Arc::new(Shared {
                client,
                conn: tokio::sync::Mutex::new(None),
            }),
        })
    }
}

impl Broker for Redis {
    fn ping(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        Some(Box::pin(async move {
            self.shared
                .query::<()>(&redis::cmd("PING"))
                .await
                .map_err(|e| format!("redis: {e}"))
        }))
    }

    fn kind(&self) -> &'static str {
        "pubsub.redis"
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Bytes,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(topic);
            if let Some(n) = self.settings.max_len_approx {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*").arg("data").arg(data.as_ref());
            if !metadata.is_empty() {
                let json = serde_json::to_string(metadata).unwrap_or_default();
                cmd.arg("metadata").arg(json);
            }
            self.shared
                .query::<String>(&cmd)
                .await
                .map(|_| ())
                .map_err(|e| BrokerError::Publish(format!("redis XADD failed: {e}")))
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        Box::pin(async move {
            let group = self
                .settings
                .consumer_id
                .clone()
                .unwrap_or_else(|| group.to_string());
            let consumer = Consumer {
                topic: topic.to_string(),
                group,
                settings: self.settings.clone(),
                shared: self.shared.clone(),
                handler,
                in_flight: Arc::new(Mutex::new(HashSet::new())),
                permits: Arc::new(Semaphore::new(self.settings.concurrency)),
            };
            consumer
                .create_group(&mut consumer.connect().await.map_err(sub_err)?)
                .await
                .map_err(sub_err)?;
            let consumer = Arc::new(consumer);
            Ok(Subscription::spawn(move |stop| consumer.run(stop)))
        })
    }
}

fn sub_err(e: redis::RedisError) -> BrokerError {
    BrokerError::Subscribe(format!("redis consumer group setup failed: {e}"))
}

/// One topic's consumer: a reader loop and, when enabled, a reclaim loop.
struct Consumer {
    topic: String,
    group: String,
    settings: Settings,
    shared: Arc<Shared>,
    handler: Handler,
    /// Entry ids being handled now, so a reclaim does not hand them out twice.
    in_flight: Arc<Mutex<HashSet<String>>>,
    permits: Arc<Semaphore>,
}

impl Consumer {
    /// A connection of its own: `XREADGROUP … BLOCK` must not hold up other commands.
    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(5)));
        self.shared
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    async fn create_group(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let res: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.topic)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match res {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let reclaim = (!self.settings.redeliver_interval.is_zero()).then(|| {
            let me = self.clone();
            let stop = stop.clone();
            tokio::spawn(me.reclaim_loop(stop))
        });
        let mut failures = 0u32;
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(topic = %self.topic, error = %e, "redis subscriber cannot connect");
                        tokio::select! {
                            _ = stopped(&mut stop) => break,
                            _ = tokio::time::sleep(reconnect_backoff(failures)) => continue,
                        }
                    }
                },
            };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.group)
                .arg(&self.group)
                .arg("COUNT")
                .arg(self.settings.queue_depth)
                .arg("BLOCK")
                .arg(READ_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.topic)
                .arg(">");
            let res: redis::RedisResult<Option<StreamReadReply>> = tokio::select! {
                _ = stopped(&mut stop) => break,
                r = cmd.query_async(c) => r,
            };
            match res {
                Ok(reply) => {
                    failures = 0;
                    let entries: Vec<StreamId> = reply
                        .map(|r| r.keys)
                        .unwrap_or_default()
                        .into_iter()
                        .flat_map(|k| k.ids)
                        .collect();
                    // The whole batch is in flight from now: XAUTOCLAIM (another task) must
                    // not hand out an entry that waits here for a permit.
                    {
                        let mut in_flight = self.in_flight.lock().unwrap();
                        for e in &entries {
                            in_flight.insert(e.id.clone());
                        }
                    }
                    for entry in entries {
                        self.clone().dispatch_marked(entry, &mut stop).await;
                    }
                }
                Err(e) if e.code() == Some("NOGROUP") => {
                    // The stream or group vanished (e.g. Redis restarted without persistence).
                    if let Err(e) = self.create_group(c).await {
                        tracing::warn!(topic = %self.topic, error = %e, "redis consumer group cannot be created");
                        conn = None;
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(topic = %self.topic, error = %e, "redis XREADGROUP failed; reconnecting");
                    conn = None;
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        _ = tokio::time::sleep(reconnect_backoff(failures)) => {}
                    }
                }
            }
        }
        if let Some(task) = reclaim {
            let _ = task.await;
        }
        // Wait for the handlers in flight.
        let _ = self
            .permits
            .acquire_many(self.settings.concurrency as u32)
            .await;
    }

    /// Claims entries idle longer than `processingTimeout` and handles them again.
    async fn reclaim_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep(self.settings.redeliver_interval) => {}
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(c) => conn.insert(c),
                    Err(_) => continue,
                },
            };
            let mut start = "0-0".to_string();
            loop {
                let res: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                    .arg(&self.topic)
                    .arg(&self.group)
                    .arg(&self.group)
                    .arg(self.settings.processing_timeout.as_millis() as u64)
                    .arg(&start)
                    .arg("COUNT")
                    .arg(self.settings.queue_depth)
                    .query_async(c)
                    .await;
                match res {
                    Ok(reply) => {
                        for entry in reply.claimed {
                            let busy = self.in_flight.lock().unwrap().contains(&entry.id);
                            if !busy {
                                self.clone().dispatch(entry, &mut stop).await;
                            }
                        }
                        if reply.next_stream_id == "0-0" || *stop.borrow() {
                            break;
                        }
                        start = reply.next_stream_id;
                    }
                    Err(e) => {
                        if e.code() != Some("NOGROUP") {
                            tracing::debug!(topic = %self.topic, error = %e, "redis XAUTOCLAIM failed");
                            conn = None;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Hands one entry to the handler on its own task (bounded by `concurrency`).
    async fn dispatch(
        self: Arc<Self>,
        entry: StreamId,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) {
        if !self.in_flight.lock().unwrap().insert(entry.id.clone()) {
            return;
        }
        self.dispatch_marked(entry, stop).await;
    }

    /// [`Self::dispatch`] for an entry already marked in flight (unmarked if it is not run).
    async fn dispatch_marked(
        self: Arc<Self>,
        entry: StreamId,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) {
        let permit = tokio::select! {
            _ = stopped(stop) => None,
            p = self.permits.clone().acquire_owned() => p.ok(),
        };
        let Some(permit) = permit else {
            self.in_flight.lock().unwrap().remove(&entry.id);
            return;
        };
        let data: Vec<u8> = entry.get("data").unwrap_or_default();
        let metadata: BTreeMap<String, String> = entry
            .get::<String>("metadata")
            .and_then(|m| serde_json::from_str(&m).ok())
            .unwrap_or_default();
        let message = Message {
            topic: self.topic.clone(),
            data: Bytes::from(data),
            metadata,
        };
        tokio::spawn(async move {
            let _permit = permit;
            if (self.handler)(message).await == Outcome::Ack {
                self.ack(&entry.id).await;
            }
            self.in_flight.lock().unwrap().remove(&entry.id);
        });
    }

    /// `XACK`, retried briefly: a lost ack means one more delivery, not a lost message.
    async fn ack(&self, id: &str) {
        for attempt in 0..5 {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&self.topic).arg(&self.group).arg(id);
            let res = self.shared.query::<i64>(&cmd).await;
            match res {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, id, error = %e, "redis XACK failed");
                    tokio::time::sleep(reconnect_backoff(attempt)).await;
                }
            }
        }
    }
}
