//! Bulk subscribe (`bulkSubscribe.enabled` on a subscription): events for the same app path
//! are gathered into one daprd bulk envelope — `{"id","type":"com.dapr.event.sent.bulk",
//! "topic","pubsubname","metadata","entries":[{"entryId","event","contentType","metadata"}]}`,
//! POSTed as `application/json` — sent when `maxMessagesCount` entries are waiting or
//! `maxAwaitDurationMs` after the first one arrived, whichever comes first. The app's
//! per-entry statuses come back to each event's own delivery ([`Batches::deliver`]), so
//! retries, drops and dead-lettering stay per event, as for single deliveries: a retried event
//! joins a later envelope.
//!
//! One task per (subscription, path) gathers; it ends when the subscription's handler is
//! dropped (the subscription stops). An envelope holds at most what the broker hands over at
//! once (its delivery concurrency), so it may be smaller than `maxMessagesCount`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::PubSub;
use super::cloudevent::{CLOUDEVENTS_CONTENT_TYPE, new_id};
use super::delivery::AppStatus;
use super::subscription::{BulkSubscribe, Subscription};

/// `type` of daprd's bulk envelope.
pub const BULK_TYPE: &str = "com.dapr.event.sent.bulk";

/// One event waiting for its envelope.
struct Pending {
    event: Map<String, Value>,
    metadata: BTreeMap<String, String>,
    reply: oneshot::Sender<AppStatus>,
}

/// The gathering tasks of one bulk subscription, by app path.
pub struct Batches {
    pubsub: Arc<PubSub>,
    sub: Arc<Subscription>,
    config: BulkSubscribe,
    paths: Mutex<HashMap<String, mpsc::Sender<Pending>>>,
}

impl Batches {
    pub fn new(pubsub: Arc<PubSub>, sub: Arc<Subscription>, config: BulkSubscribe) -> Batches {
        Batches {
            pubsub,
            sub,
            config,
            paths: Mutex::new(HashMap::new()),
        }
    }

    /// Delivers one event to `path` inside a bulk envelope; returns the app's status for it.
    pub async fn deliver(
        &self,
        path: &str,
        event: Map<String, Value>,
        metadata: &BTreeMap<String, String>,
    ) -> AppStatus {
        let tx = {
            let mut paths = self.paths.lock().expect("not poisoned");
            paths
                .entry(path.to_string())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(self.config.max_messages.max(1));
                    tokio::spawn(gather(
                        self.pubsub.clone(),
                        self.sub.clone(),
                        path.to_string(),
                        self.config,
                        rx,
                    ));
                    tx
                })
                .clone()
        };
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            event,
            metadata: metadata.clone(),
            reply,
        };
        if tx.send(pending).await.is_err() {
            return AppStatus::Retry;
        }
        answer.await.unwrap_or(AppStatus::Retry)
    }
}

/// Gathers events for one path into envelopes until every sender is gone.
async fn gather(
    pubsub: Arc<PubSub>,
    sub: Arc<Subscription>,
    path: String,
    config: BulkSubscribe,
    mut rx: mpsc::Receiver<Pending>,
) {
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + config.max_await;
        let mut batch = vec![first];
        while batch.len() < config.max_messages {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) | Err(_) => break,
            }
        }
        let ids: Vec<String> = batch.iter().map(|_| new_id()).collect();
        let envelope = envelope(&sub, &batch, &ids);
        // The first event's trace context goes on the request (daprd sends one span per batch).
        let trace = (
            batch[0].event.get("traceparent").and_then(Value::as_str),
            batch[0].event.get("tracestate").and_then(Value::as_str),
        );
        // (Batches exist only for an app reached over HTTP.)
        let statuses = match &pubsub.app {
            Some(super::App::Http(app)) => app.deliver_bulk(&path, envelope, &ids, trace).await,
            _ => vec![AppStatus::Retry; batch.len()],
        };
        for (p, status) in batch.into_iter().zip(statuses) {
            let _ = p.reply.send(status);
        }
    }
}

fn envelope(sub: &Subscription, batch: &[Pending], ids: &[String]) -> Bytes {
    let entries: Vec<Value> = batch
        .iter()
        .zip(ids)
        .map(|(p, id)| {
            json!({
                "entryId": id,
                "event": p.event,
                "contentType": CLOUDEVENTS_CONTENT_TYPE,
                "metadata": p.metadata,
            })
        })
        .collect();
    let body = json!({
        "id": new_id(),
        "type": BULK_TYPE,
        "topic": sub.topic,
        "pubsubname": sub.pubsubname,
        "metadata": sub.metadata,
        "entries": entries,
    });
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}
