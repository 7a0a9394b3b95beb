//! `pubsub.in-memory`: topics inside this process. Each consumer group gets every message once;
//! a message the handler leaves for retry is queued again after a short delay. Nothing survives
//! a restart, and messages published while a topic has no subscriber are discarded (as Dapr's
//! in-memory component does).

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

type Queue = mpsc::UnboundedSender<Message>;

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
        if let Some(groups) = topics.get_mut(topic) {
            groups.retain(|_, queue| queue.send(message.clone()).is_ok());
        }
        Box::pin(async { Ok(()) })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
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
                tokio::spawn(async move {
                    let _permit = permit;
                    if handler(message.clone()).await == Outcome::Retry {
                        tokio::time::sleep(REDELIVER_DELAY).await;
                        let _ = tx.send(message);
                    }
                });
            }
            // Wait for the handlers in flight.
            let _ = permits.acquire_many(CONCURRENCY as u32).await;
        });
        Box::pin(async { Ok(sub) })
    }
}
