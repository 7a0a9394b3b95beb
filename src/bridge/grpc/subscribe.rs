//! `SubscribeTopicEventsAlpha1`: a streaming subscription. The app opens a bidirectional
//! stream and sends an initial request (pubsub, topic, metadata, dead-letter topic); we answer
//! with an initial response, then send each event as a `TopicEventRequest` and wait for the
//! app's `event_processed` (SUCCESS, RETRY or DROP) with the event's id. The subscription runs
//! on pub/sub's delivery path ([`PubSub::subscribe_stream`]), so retries, dead-lettering and
//! acks to the broker are the same as for deliveries over HTTP. When the stream ends, events in
//! flight are left to the broker's redelivery and the subscription stops.
//!
//! [`PubSub::subscribe_stream`]: crate::bridge::pubsub::PubSub::subscribe_stream

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use super::runtime::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as In;
use super::runtime::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType as Out;
use super::runtime::topic_event_response::TopicEventResponseStatus;
use super::runtime::{
    SubscribeTopicEventsRequestAlpha1, SubscribeTopicEventsResponseAlpha1,
    SubscribeTopicEventsResponseInitialAlpha1, TopicEventRequest,
};
use crate::bridge::BridgeState;
use crate::bridge::pubsub::cloudevent;
use crate::bridge::pubsub::subscription::{Rule, Source, Subscription};
use crate::bridge::pubsub::{AppStatus, StreamConsumer, StreamError, StreamEvent};

/// Events sent and not yet answered, bounded by the broker's concurrency; the channel holds a
/// few more so a slow reader does not stall acks.
const OUTBOX: usize = 64;

pub type EventStream = Pin<
    Box<dyn tokio_stream::Stream<Item = Result<SubscribeTopicEventsResponseAlpha1, Status>> + Send>,
>;

/// Answers awaited for events in flight, by event id (the app answers with the id), oldest
/// first when two deliveries share an id; `None` once the stream has ended.
type Pending = Arc<Mutex<Option<HashMap<String, Vec<Waiter>>>>>;

/// One delivery waiting for its answer: a sequence number (its own, to remove it) and where
/// the answer goes.
type Waiter = (u64, oneshot::Sender<AppStatus>);

/// Removes a delivery's waiter when the delivery ends without an answer (its timeout, a stop):
/// nothing stays behind in [`Pending`] for an event the app never answered.
struct Waiting {
    pending: Pending,
    id: String,
    seq: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(map) = self.pending.lock().expect("not poisoned").as_mut()
            && let Some(waiters) = map.get_mut(&self.id)
        {
            waiters.retain(|(seq, _)| *seq != self.seq);
            if waiters.is_empty() {
                map.remove(&self.id);
            }
        }
    }
}

/// Reads the initial request, starts the subscription and returns the stream of events.
pub async fn subscribe(
    st: Arc<BridgeState>,
    mut incoming: tonic::Streaming<SubscribeTopicEventsRequestAlpha1>,
) -> Result<EventStream, Status> {
    let first = incoming
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before its initial request"))?;
    let initial = match first.subscribe_topic_events_request_type {
        Some(In::InitialRequest(i)) => i,
        Some(In::EventProcessed(_)) | None => {
            return Err(Status::invalid_argument(
                "expected an initial request (pubsub name and topic) first, found another message",
            ));
        }
    };
    if st.pubsub.is_empty() {
        return Err(Status::failed_precondition(format!(
            "pubsub {} is not configured",
            initial.pubsub_name
        )));
    }
    if initial.pubsub_name.is_empty() {
        return Err(Status::invalid_argument("pubsub name is empty"));
    }
    if initial.topic.is_empty() {
        return Err(Status::invalid_argument(format!(
            "topic is empty in pubsub {}",
            initial.pubsub_name
        )));
    }
    let (tx, rx) = mpsc::channel(OUTBOX);
    // The initial response goes first, before any event can be queued.
    let _ = tx
        .send(Ok(SubscribeTopicEventsResponseAlpha1 {
            subscribe_topic_events_response_type: Some(Out::InitialResponse(
                SubscribeTopicEventsResponseInitialAlpha1 {},
            )),
        }))
        .await;
    let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
    let (closed_tx, closed) = watch::channel(false);
    let sink = {
        let (tx, pending) = (tx.clone(), pending.clone());
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        Arc::new(move |ev: StreamEvent| {
            let (tx, pending) = (tx.clone(), pending.clone());
            let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                let req = topic_event(ev);
                let id = req.id.clone();
                let (done, answer) = oneshot::channel();
                match pending.lock().expect("not poisoned").as_mut() {
                    Some(p) => p.entry(id.clone()).or_default().push((seq, done)),
                    None => return AppStatus::Retry,
                };
                let _waiting = Waiting {
                    pending: pending.clone(),
                    id,
                    seq,
                };
                let msg = SubscribeTopicEventsResponseAlpha1 {
                    subscribe_topic_events_response_type: Some(Out::EventMessage(req)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return AppStatus::Retry;
                }
                answer.await.unwrap_or(AppStatus::Retry)
            }) as crate::bridge::pubsub::broker::BoxFuture<'static, AppStatus>
        })
    };
    let sub = Subscription {
        pubsubname: initial.pubsub_name.clone(),
        topic: initial.topic.clone(),
        rules: vec![Rule {
            text: String::new(),
            matcher: None,
            path: String::new(),
        }],
        dead_letter_topic: initial.dead_letter_topic.filter(|d| !d.is_empty()),
        metadata: initial.metadata.into_iter().collect(),
        scopes: Vec::new(),
        source: Source::Streaming,
        bulk: None,
    };
    let consumer = StreamConsumer {
        sink,
        closed: closed.clone(),
    };
    let running = st
        .pubsub
        .subscribe_stream(sub, consumer)
        .await
        .map_err(|e| match e {
            StreamError::NotFound(_) => Status::invalid_argument(e.to_string()),
            StreamError::AlreadySubscribed { .. } => Status::already_exists(e.to_string()),
            // The SDKs reconnect on UNAVAILABLE.
            StreamError::ShuttingDown | StreamError::Broker(_) => {
                Status::unavailable(e.to_string())
            }
        })?;
    let mut stopping = st.pubsub.stopping();
    let (pubsub, topic) = (initial.pubsub_name, initial.topic);
    // Reads the app's answers until the stream ends or pub/sub stops.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = incoming.message() => match msg {
                    Ok(Some(m)) => match m.subscribe_topic_events_request_type {
                        Some(In::EventProcessed(p)) => {
                            let status = match p.status.map(|s| TopicEventResponseStatus::try_from(s.status)) {
                                Some(Ok(TopicEventResponseStatus::Success)) => AppStatus::Success,
                                Some(Ok(TopicEventResponseStatus::Drop)) => AppStatus::Drop,
                                Some(Ok(TopicEventResponseStatus::Retry)) | Some(Err(_)) | None => AppStatus::Retry,
                            };
                            let waiter = pending.lock().expect("not poisoned").as_mut().and_then(|map| {
                                let waiters = map.get_mut(&p.id)?;
                                let first = (!waiters.is_empty()).then(|| waiters.remove(0).1)?;
                                if waiters.is_empty() {
                                    map.remove(&p.id);
                                }
                                Some(first)
                            });
                            match waiter {
                                Some(w) => { let _ = w.send(status); }
                                None => tracing::debug!(pubsub, topic, id = %p.id, "streaming subscription: an answer for no event in flight"),
                            }
                        }
                        Some(In::InitialRequest(_)) | None => {
                            tracing::debug!(pubsub, topic, "streaming subscription: a second initial request ignored");
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(pubsub, topic, error = %e, "streaming subscription ended with an error");
                        break;
                    }
                },
                _ = stopping.wait_for(|s| *s) => break,
            }
        }
        // Events in flight go back to the broker; the subscription stops.
        closed_tx.send_replace(true);
        pending.lock().expect("not poisoned").take();
        running.stop().await;
        tracing::info!(pubsub, topic, "streaming subscription ended");
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// A CloudEvent as the stream's `TopicEventRequest`: the core attributes in their fields, the
/// data as bytes (JSON text for JSON data), every other attribute in `extensions`.
pub(super) fn topic_event(ev: StreamEvent) -> TopicEventRequest {
    let mut event = ev.event;
    let mut take = |k: &str| match event.remove(k) {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let id = take("id");
    let source = take("source");
    let r#type = take("type");
    let spec_version = take("specversion");
    let data_content_type = take("datacontenttype");
    // The subscription's, not the event's (a dead-lettered event names its first topic).
    take("topic");
    take("pubsubname");
    let (topic, pubsub_name) = (ev.topic, ev.pubsub);
    let data = match (event.remove("data"), event.remove("data_base64")) {
        (_, Some(Value::String(b64))) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .unwrap_or_else(|_| b64.into_bytes())
        }
        (Some(Value::String(s)), _) if !cloudevent::is_json(&data_content_type) => s.into_bytes(),
        (Some(v), _) => serde_json::to_vec(&v).unwrap_or_default(),
        (None, _) => Vec::new(),
    };
    // (A stream message has no per-event metadata: the broker's metadata is not sent.)
    let extensions = prost_types::Struct {
        fields: event
            .into_iter()
            .map(|(k, v)| (k, prost_value(v)))
            .collect(),
    };
    TopicEventRequest {
        id,
        source,
        r#type,
        spec_version,
        data_content_type,
        topic,
        data,
        pubsub_name,
        path: String::new(),
        extensions: Some(extensions),
    }
}

/// A JSON value as protobuf's `Value`.
fn prost_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(prost_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, prost_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_that_ends_unanswered_leaves_no_waiter() {
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (a, _ra) = oneshot::channel();
        let (b, _rb) = oneshot::channel();
        // Two deliveries of the same event id at once (a redelivery while the first waits).
        pending
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .entry("e1".into())
            .or_default()
            .extend([(1, a), (2, b)]);
        let waiting = |seq| Waiting {
            pending: pending.clone(),
            id: "e1".into(),
            seq,
        };
        drop(waiting(1));
        let left: Vec<u64> = pending.lock().unwrap().as_ref().unwrap()["e1"]
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(left, [2]);
        drop(waiting(2));
        assert!(pending.lock().unwrap().as_ref().unwrap().is_empty());
    }

    #[test]
    fn cloudevent_to_topic_event() {
        let event: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"id":"1","source":"app","type":"com.dapr.event.sent","specversion":"1.0",
                "datacontenttype":"application/json","topic":"orders","pubsubname":"ps",
                "data":{"n":1},"traceparent":"00-abc","custom":[1,"x"]}"#,
        )
        .unwrap();
        let t = topic_event(StreamEvent {
            event,
            pubsub: "ps".into(),
            topic: "orders".into(),
            metadata: Default::default(),
        });
        assert_eq!(t.id, "1");
        assert_eq!(t.topic, "orders");
        assert_eq!(t.pubsub_name, "ps");
        assert_eq!(t.data, br#"{"n":1}"#);
        let ext = t.extensions.unwrap().fields;
        assert!(ext.contains_key("traceparent") && ext.contains_key("custom"));
        assert!(!ext.contains_key("data") && !ext.contains_key("id"));
        let text: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"id":"2","datacontenttype":"text/plain","data":"hello"}"#)
                .unwrap();
        let t = topic_event(StreamEvent {
            event: text,
            pubsub: "ps".into(),
            topic: "orders".into(),
            metadata: Default::default(),
        });
        assert_eq!(t.data, b"hello");
    }
}
