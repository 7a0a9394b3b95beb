//! `pubsub.in-memory`: topics inside this process. Each consumer group gets every message once;
//! a message the handler leaves for retry is queued again after a short delay, at most
//! [`MAX_REDELIVERIES`] times. Each group's queue holds at most [`QUEUE`] messages, and the
//! broker at most [`MAX_BYTES`] of message data (counted once per group that holds it, queued
//! or being delivered): a publish beyond either fails, so the sidecar's memory stays bounded
//! when the app is slow or down (by count alone, 1 MB messages grew it by 3 GB in 10 s).
//! Nothing survives a restart, and messages published while a topic has no subscriber are
//! discarded (as Dapr's in-memory component does).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::broker::{
    BoxFuture, Broker, BrokerError, Handler, Message, Outcome, Subscription, stopped,
};

/// Delay before a message left for retry is queued again.
const REDELIVER_DELAY: Duration = Duration::from_millis(200);
/// Handlers running at once per subscription (Dapr's default `concurrency` elsewhere).
const CONCURRENCY: usize = 10;

/// Messages waiting per consumer group; a publish beyond this fails.
pub const QUEUE: usize = 10_000;
/// Times a message left for retry is queued again before it is dropped (logged).
pub const MAX_REDELIVERIES: u32 = 10;
/// Message data the broker holds at most (queued or being delivered, once per consumer group):
/// the worst case of this component's memory, whatever the number of topics and groups.
pub const MAX_BYTES: usize = 64 << 20;
/// What a message costs besides its data (topic, metadata, queue slot), for the byte count.
const OVERHEAD: usize = 256;

/// A queued message, how often it was redelivered, and its share of the byte budget.
type Entry = (Message, u32, Held);
type Queue = mpsc::Sender<Entry>;

/// Bytes of the budget held by one queued message; given back when it is dropped (handled,
/// given up on, or left in a queue whose subscription stopped).
struct Held {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The in-memory broker.
#[derive(Default)]
pub struct Memory {
    /// topic → consumer group → queue.
    topics: Mutex<HashMap<String, HashMap<String, Queue>>>,
    /// Bytes held by queued and in-delivery messages (see [`MAX_BYTES`]).
    held: Arc<AtomicUsize>,
}

impl Memory {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Broker for Memory {
    fn kind(&self) -> &'static str {
        "pubsub.in-memory"
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Bytes,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let message = Message {
            topic: topic.to_string(),
            data,
            metadata: metadata.clone(),
        };
        let mut topics = self.topics.lock().unwrap();
        let mut result = Ok(());
        if let Some(groups) = topics.get_mut(topic) {
            groups.retain(|_, queue| !queue.is_closed());
            // All or nothing: a slot in every group's queue first, so a failed publish (which
            // the caller may retry) has reached no group.
            let mut permits = Vec::with_capacity(groups.len());
            for (group, queue) in groups.iter() {
                match queue.try_reserve() {
                    Ok(p) => permits.push(p),
                    Err(_) => {
                        result = Err(BrokerError::Publish(format!(
                            "the in-memory queue of topic {topic:?} for {group:?} is full ({QUEUE} messages): the subscriber is not keeping up"
                        )));
                        break;
                    }
                }
            }
            let cost = message.data.len() + message.topic.len() + OVERHEAD;
            let need = cost * permits.len();
            if result.is_ok() {
                let held = self.held.fetch_add(need, Ordering::AcqRel) + need;
                if held > MAX_BYTES {
                    self.held.fetch_sub(need, Ordering::AcqRel);
                    result = Err(BrokerError::Publish(if need > MAX_BYTES {
                        format!(
                            "a message of {} bytes for {} consumer groups is more than the in-memory broker holds at once ({MAX_BYTES} bytes)",
                            message.data.len(),
                            permits.len()
                        )
                    } else {
                        format!(
                            "the in-memory broker holds {} bytes of undelivered messages across all its topics (at most {MAX_BYTES}): some subscribers are not keeping up",
                            held - need
                        )
                    }));
                }
            }
            if result.is_ok() {
                for p in permits {
                    let held = Held {
                        bytes: cost,
                        total: self.held.clone(),
                    };
                    p.send((message.clone(), 0, held));
                }
            }
        }
        Box::pin(async move { result })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE);
        self.topics
            .lock()
            .unwrap()
            .entry(topic.to_string())
            .or_default()
            .insert(group.to_string(), tx.clone());
        let sub = Subscription::spawn(move |mut stop| async move {
            let permits = Arc::new(Semaphore::new(CONCURRENCY));
            loop {
                let message = tokio::select! {
                    _ = stopped(&mut stop) => break,
                    m = rx.recv() => match m { Some(m) => m, None => break },
                };
                // A stop is heeded while every handler slot is busy too.
                let permit = tokio::select! {
                    _ = stopped(&mut stop) => break,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                };
                let (handler, tx) = (handler.clone(), tx.clone());
                let (message, redeliveries, held) = message;
                tokio::spawn(async move {
                    let _permit = permit;
                    if handler(message.clone()).await == Outcome::Retry {
                        if redeliveries >= MAX_REDELIVERIES {
                            tracing::warn!(topic = %message.topic, redeliveries, "in-memory pub/sub: giving up on a message the app keeps refusing");
                            return;
                        }
                        tokio::time::sleep(REDELIVER_DELAY).await;
                        // Never waits: a full queue would wait for the permit this task holds.
                        match tx.try_send((message, redeliveries + 1, held)) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => tracing::warn!(
                                "in-memory pub/sub: queue full, a message left for retry is dropped"
                            ),
                            // Stopping: nothing survives a stop.
                            Err(mpsc::error::TrySendError::Closed(_)) => {}
                        }
                    }
                });
            }
            // What is still queued is dropped now (nothing survives a stop), then the handlers
            // in flight are waited for.
            drop(rx);
            let _ = permits.acquire_many(CONCURRENCY as u32).await;
        });
        Box::pin(async { Ok(sub) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber that never finishes handling (the app is stuck): 1 MiB messages are refused
    /// once the broker holds `MAX_BYTES`, not after 10,000 of them; the budget comes back when
    /// the subscription stops.
    #[tokio::test]
    async fn undelivered_bytes_are_bounded() {
        let memory = Memory::new();
        let handler: Handler = Arc::new(|_| Box::pin(std::future::pending()));
        let sub = memory.subscribe("t", "g", handler).await.unwrap();
        let meta = BTreeMap::new();
        let data = Bytes::from(vec![b'x'; 1 << 20]);
        let mut accepted = 0;
        let error = loop {
            match memory.publish("t", data.clone(), &meta).await {
                Ok(()) => accepted += 1,
                Err(e) => break e.to_string(),
            }
            assert!(accepted <= 64, "more than MAX_BYTES accepted");
            // Let deliveries start: 10 handlers take a message each and never finish.
            tokio::task::yield_now().await;
        };
        assert_eq!(accepted, 63, "{error}");
        assert!(error.contains("not keeping up"), "{error}");
        assert!(memory.held.load(Ordering::Acquire) <= MAX_BYTES);
        // Small messages still fit in what is left.
        memory
            .publish("t", Bytes::from_static(b"{}"), &meta)
            .await
            .unwrap();
        // Stopping drops what is queued; the stuck handlers keep theirs (they are still
        // delivering), plus the message taken while waiting for a handler slot.
        drop(tokio::time::timeout(std::time::Duration::from_millis(200), sub.stop()).await);
        let held = memory.held.load(Ordering::Acquire);
        let one = (1 << 20) + 1 + OVERHEAD;
        assert!(held <= 11 * one, "{held}");
        assert!(held >= 10 * one, "{held}");
    }
}
