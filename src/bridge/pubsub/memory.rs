//! `pubsub.in-memory`: topics inside this process. Each consumer group gets every message once;
//! a message the handler leaves for retry is queued again after a short delay, at most
//! [`MAX_REDELIVERIES`] times. Each group's queue holds at most [`QUEUE`] messages: a publish
//! beyond that fails (the sidecar's memory stays bounded when the app is slow or down).
//! Nothing survives a restart, and messages published while a topic has no subscriber are
//! discarded (as Dapr's in-memory component does).

use std::collections::{BTreeMap, HashMap};
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

type Queue = mpsc::Sender<(Message, u32)>;

/// The in-memory broker.
#[derive(Default)]
pub struct Memory {
    /// topic → consumer group → queue.
    topics: Mutex<HashMap<String, HashMap<String, Queue>>>,
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
            if result.is_ok() {
                for p in permits {
                    p.send((message.clone(), 0));
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
        let (tx, mut rx) = mpsc::channel::<(Message, u32)>(QUEUE);
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
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (handler, tx) = (handler.clone(), tx.clone());
                let (message, redeliveries) = message;
                tokio::spawn(async move {
                    let _permit = permit;
                    if handler(message.clone()).await == Outcome::Retry {
                        if redeliveries >= MAX_REDELIVERIES {
                            tracing::warn!(topic = %message.topic, redeliveries, "in-memory pub/sub: giving up on a message the app keeps refusing");
                            return;
                        }
                        tokio::time::sleep(REDELIVER_DELAY).await;
                        // Never waits: a full queue would wait for the permit this task holds.
                        if tx.try_send((message, redeliveries + 1)).is_err() {
                            tracing::warn!(
                                "in-memory pub/sub: queue full, a message left for retry is dropped"
                            );
                        }
                    }
                });
            }
            // Wait for the handlers in flight.
            let _ = permits.acquire_many(CONCURRENCY as u32).await;
        });
        Box::pin(async { Ok(sub) })
    }
}
