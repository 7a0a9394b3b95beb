//! Bridge pub/sub at the library level, against real brokers started here (redis-server,
//! nats-server -js on free loopback ports, in temp dirs) and a real HTTP app (axum on port 0)
//! that records what it receives and answers as each test says.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;

use outrigger::bridge::components::Component;
use outrigger::bridge::pubsub::{self, PubSub, PubSubOptions, RetryPolicy};
use outrigger::telemetry::metrics::Metrics;

use crate::servers::{MosquittoServer, NatsServer, RabbitVhost, RedisServer, free_port};

/// Generous: a healthy run takes well under a second per step.
const WAIT: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds, or panics with `what` after [`WAIT`].
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- brokers

impl RedisServer {
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://{}/", self.host()))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Entries read by the group and not yet acked.
    async fn pending(&self, stream: &str, group: &str) -> usize {
        let reply: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        reply.count()
    }
}

fn component(name: &str, kind: &str, metadata: &[(&str, &str)]) -> Component {
    Component {
        name: name.into(),
        kind: kind.into(),
        version: "v1".into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        file: format!("{name}.yaml").into(),
        scopes: Vec::new(),
        ignore_errors: false,
        line: 1,
        lines: Default::default(),
    }
}

// ---------------------------------------------------------------- the app

/// What the app answers for one delivery: `(path, event, times this event id was seen)`.
type Behaviour = dyn Fn(&str, &Value, usize) -> (StatusCode, String) + Send + Sync;

#[derive(Clone, Debug)]
struct Received {
    path: String,
    event: Value,
    headers: HeaderMap,
}

struct AppState {
    subscribe: Option<Value>,
    behaviour: Box<Behaviour>,
    received: Mutex<Vec<Received>>,
    answers: Mutex<Vec<(String, StatusCode, String)>>,
    /// Deliveries wait while this is false (a slow app).
    open: watch::Sender<bool>,
}

/// A tiny app: `GET /dapr/subscribe` answers `subscribe` (404 when `None`), every POST is
/// recorded and answered by `behaviour`.
struct App {
    addr: SocketAddr,
    state: Arc<AppState>,
}

impl App {
    async fn start(
        subscribe: Option<Value>,
        behaviour: impl Fn(&str, &Value, usize) -> (StatusCode, String) + Send + Sync + 'static,
    ) -> App {
        Self::start_at("127.0.0.1:0", subscribe, behaviour).await
    }

    async fn start_at(
        address: &str,
        subscribe: Option<Value>,
        behaviour: impl Fn(&str, &Value, usize) -> (StatusCode, String) + Send + Sync + 'static,
    ) -> App {
        let state = Arc::new(AppState {
            subscribe,
            behaviour: Box::new(behaviour),
            received: Mutex::new(Vec::new()),
            answers: Mutex::new(Vec::new()),
            open: watch::channel(true).0,
        });
        async fn subscriptions(State(s): State<Arc<AppState>>) -> (StatusCode, String) {
            match &s.subscribe {
                Some(v) => (StatusCode::OK, v.to_string()),
                None => (StatusCode::NOT_FOUND, String::new()),
            }
        }
        async fn deliver(
            State(s): State<Arc<AppState>>,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> (StatusCode, String) {
            let _ = s.open.subscribe().wait_for(|open| *open).await;
            let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let id = event["id"].clone();
            let seen = {
                let mut r = s.received.lock().unwrap();
                r.push(Received {
                    path: uri.path().to_string(),
                    event: event.clone(),
                    headers,
                });
                r.iter().filter(|x| x.event["id"] == id).count()
            };
            let (status, body) = (s.behaviour)(uri.path(), &event, seen);
            s.answers.lock().unwrap().push((
                event["id"].as_str().unwrap_or("").to_string(),
                status,
                body.clone(),
            ));
            (status, body)
        }
        let router = axum::Router::new()
            .route("/dapr/subscribe", get(subscriptions))
            .fallback(deliver)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        App { addr, state }
    }

    /// While closed, deliveries wait before they are recorded and answered.
    fn gate(&self, open: bool) {
        self.state.open.send_replace(open);
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    fn on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// How many of the deliveries on `path` carried the event `id`.
    fn count_on(&self, path: &str, id: &str) -> usize {
        self.on(path).iter().filter(|r| r.event["id"] == id).count()
    }

    /// After `retry-me`, `drop-me` and `fail-me` were published with metadata `region=eu` to
    /// an app that asks for three retries of the first, drops the second and fails the third:
    /// `retry-me` came 4 times, `drop-me` once, `fail-me` 5 times, each with its `region`
    /// header, and the last two went to the dead letters (`/poison`).
    #[track_caller]
    fn retried_dropped_and_failed(&self) {
        assert_eq!(self.count_on("/orders", "retry-me"), 4);
        assert_eq!(self.count_on("/orders", "drop-me"), 1);
        assert_eq!(self.count_on("/orders", "fail-me"), 5);
        assert!(
            self.on("/orders")
                .iter()
                .all(|r| r.headers["region"] == "eu")
        );
        let mut dead: Vec<String> = self
            .on("/poison")
            .iter()
            .map(|r| r.event["id"].as_str().unwrap().to_string())
            .collect();
        dead.sort();
        assert_eq!(dead, ["drop-me", "fail-me"]);
    }

    /// Deliveries the app answered with SUCCESS (2xx and no other status).
    fn successes(&self) -> Vec<String> {
        self.state
            .answers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s, b)| s.is_success() && (b.is_empty() || b.contains("SUCCESS")))
            .map(|(id, _, _)| id.clone())
            .collect()
    }
}

/// A CloudEvent with id `id` and no data.
fn ce(id: &str) -> String {
    json!({"specversion":"1.0","id":id,"source":"t","type":"t","data":{}}).to_string()
}

fn ok() -> (StatusCode, String) {
    (StatusCode::OK, r#"{"status":"SUCCESS"}"#.into())
}

fn status(s: &str) -> (StatusCode, String) {
    (StatusCode::OK, format!(r#"{{"status":"{s}"}}"#))
}

// ---------------------------------------------------------------- the sidecar side

struct Bridge {
    ps: Arc<PubSub>,
    router: axum::Router,
    metrics: Metrics,
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial_interval: Duration::from_millis(5),
        max_interval: Duration::from_millis(20),
    }
}

/// Builds the pub/sub block for `app`, starts its subscriptions and waits for `expect` of them.
async fn bridge(
    app: Option<&App>,
    components: &[Component],
    declarative: Vec<pubsub::Subscription>,
    expect: usize,
) -> Bridge {
    let metrics = Metrics::new();
    let mut options = PubSubOptions::new("shop", app.map(|a| a.addr.to_string()));
    options.retry = fast_retry();
    let ps = PubSub::new(options, components, declarative, metrics.pubsub.clone())
        .unwrap_or_else(|e| panic!("{e:?}"));
    let (_tx, rx) = watch::channel(true);
    ps.start(rx);
    let mut subscribed = ps.subscribed();
    tokio::time::timeout(WAIT, subscribed.wait_for(|n| *n >= expect))
        .await
        .expect("subscriptions start")
        .unwrap();
    Bridge {
        router: pubsub::http::router(ps.clone()),
        ps,
        metrics,
    }
}

impl Bridge {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, Value) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(axum::body::Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn publish(&self, pubsub: &str, topic: &str, content_type: &str, body: &str) {
        let (status, err) = self
            .call(
                "POST",
                &format!("/v1.0/publish/{pubsub}/{topic}"),
                &[("content-type", content_type)],
                body,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{err}");
    }

    /// POSTs [`ce`]`(id)` as a CloudEvent to the publish `uri` (with metadata in its query, if
    /// any): 204.
    async fn publish_ce(&self, uri: impl AsRef<str>, id: &str) {
        let (status, err) = self
            .call(
                "POST",
                uri.as_ref(),
                &[("content-type", "application/cloudevents+json")],
                &ce(id),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{err}");
    }

    fn metrics_text(&self) -> String {
        outrigger::telemetry::metrics::encode(&self.metrics.registry, false)
    }
}

// ---------------------------------------------------------------- tests

/// method, uri, headers, body, expected status, expected error code.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a str,
    u16,
    &'a str,
);

#[tokio::test]
async fn publish_errors_have_daprs_codes() {
    let b = bridge(None, &[component("ps", "pubsub.in-memory", &[])], vec![], 0).await;
    let cases: &[Case] = &[
        (
            "POST",
            "/v1.0/publish/nope/t",
            &[],
            "x",
            404,
            "ERR_PUBSUB_NOT_FOUND",
        ),
        (
            "POST",
            "/v1.0/publish/ps",
            &[],
            "x",
            404,
            "ERR_TOPIC_NAME_EMPTY",
        ),
        (
            "POST",
            "/v1.0/publish/ps/",
            &[],
            "x",
            404,
            "ERR_TOPIC_NAME_EMPTY",
        ),
        (
            "POST",
            "/v1.0/publish/ps/t?metadata.rawPayload=maybe",
            &[],
            "x",
            400,
            "ERR_PUBSUB_REQUEST_METADATA",
        ),
        (
            "POST",
            "/v1.0/publish/ps/t",
            &[("content-type", "application/cloudevents+json")],
            "{not json",
            500,
            "ERR_PUBSUB_CLOUD_EVENTS_SER",
        ),
        (
            "POST",
            "/v1.0-alpha1/publish/bulk/ps/t",
            &[],
            "{}",
            400,
            "ERR_PUBSUB_EVENTS_SER",
        ),
        (
            "POST",
            "/v1.0-alpha1/publish/bulk/ps/t",
            &[],
            r#"[{"entryId":"1","event":"a"},{"entryId":"1","event":"b"}]"#,
            400,
            "ERR_PUBSUB_EVENTS_SER",
        ),
        (
            "POST",
            "/v1.0-alpha1/publish/bulk/ps/t",
            &[],
            r#"[{"event":"a"}]"#,
            400,
            "ERR_PUBSUB_EVENTS_SER",
        ),
        (
            "POST",
            "/v1.0-alpha1/publish/bulk/ps/t",
            &[],
            r#"[{"entryId":"1","event":{"a":1},"contentType":"text/plain"}]"#,
            400,
            "ERR_PUBSUB_EVENTS_SER",
        ),
        (
            "POST",
            "/v1.0-alpha1/publish/bulk/ps/t",
            &[],
            r#"[{"entryId":"1","event":"not base64!","contentType":"application/octet-stream"}]"#,
            400,
            "ERR_PUBSUB_EVENTS_SER",
        ),
        (
            "POST",
            "/v1.0-alpha1/publish/bulk/nope/t",
            &[],
            "[]",
            404,
            "ERR_PUBSUB_NOT_FOUND",
        ),
    ];
    for (method, uri, headers, body, want_status, want_code) in cases {
        let (status, err) = b.call(method, uri, headers, body).await;
        assert_eq!(status.as_u16(), *want_status, "{method} {uri}: {err}");
        assert_eq!(err["errorCode"], *want_code, "{method} {uri}: {err}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{err}"
        );
    }
    // PUT works as POST; a topic may contain '/'.
    let (status, _) = b.call("PUT", "/v1.0/publish/ps/a/b", &[], "x").await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let none = bridge(None, &[], vec![], 0).await;
    let (status, err) = none.call("POST", "/v1.0/publish/ps/t", &[], "x").await;
    assert_eq!(
        (status.as_u16(), err["errorCode"].as_str()),
        (400, Some("ERR_PUBSUB_NOT_CONFIGURED"))
    );
    assert_eq!(err["message"], "pubsub ps is not configured");
}

#[tokio::test]
async fn bad_component_metadata_is_refused_with_the_file() {
    for (kind, md, want) in [
        (
            "pubsub.redis",
            vec![],
            "metadata redisHost: expected host:port of the Redis server, found \"nothing\"",
        ),
        (
            "pubsub.redis",
            vec![("redisHost", "h:1"), ("processingTimeout", "soon")],
            "processingTimeout: expected a duration",
        ),
        (
            "pubsub.redis",
            vec![("redisHost", "h:1"), ("enableTLS", "yes")],
            "enableTLS: expected true or false, found \"yes\"",
        ),
        (
            "pubsub.jetstream",
            vec![("natsURL", "nats://h:1"), ("deliverPolicy", "sometimes")],
            "deliverPolicy: expected all, last, new, sequence",
        ),
        (
            "pubsub.rabbitmq",
            vec![("connectionString", "amqpx://u:secret@h:5671")],
            "connectionString: expected an amqp:// or amqps:// URL such as amqp://user:pass@localhost:5672/vhost, found \"amqpx://u:***@h:5671\"",
        ),
        (
            "pubsub.rabbitmq",
            vec![("connectionString", "amqp://h"), ("deliveryMode", "3")],
            "deliveryMode: expected 0, 1 or 2",
        ),
        (
            "pubsub.rabbitmq",
            vec![
                ("connectionString", "amqp://h"),
                ("exchangeKind", "x-delayed"),
            ],
            "exchangeKind: expected fanout, topic, direct or headers",
        ),
        (
            "pubsub.mqtt3",
            vec![("url", "wss://u:secret@h:8883")],
            "metadata url: expected tcp://[user:password@]host:port or ssl://… for TLS (unknown scheme \"wss\"), found \"wss://u:***@h:8883\"",
        ),
        (
            "pubsub.mqtt3",
            vec![("url", "tcp://h:1883"), ("qos", "3")],
            "qos: expected 0, 1 or 2",
        ),
        ("pubsub.kafka", vec![], "expected one of pubsub.in-memory"),
    ] {
        let c = component("ps", kind, &md);
        let errors = PubSub::new(
            PubSubOptions::new("a", None),
            &[c],
            vec![],
            Default::default(),
        )
        .err()
        .expect("refused");
        assert!(errors[0].starts_with("ps.yaml: "), "{errors:?}");
        assert!(errors[0].contains(want), "{errors:?}");
    }
}

#[tokio::test]
async fn in_memory_delivers_cloudevents_by_route_rules() {
    let app = App::start(
        Some(json!([{
            "pubsubname": "ps", "topic": "orders",
            "routes": {"rules": [
                {"match": "event.type == \"order.gold\" && event.data.total > 100", "path": "/gold"},
                {"match": "event.type.startsWith(\"order.\")", "path": "/orders"}
            ], "default": "/other"}
        }])),
        |_, _, _| ok(),
    )
    .await;
    let b = bridge(
        Some(&app),
        &[component("ps", "pubsub.in-memory", &[])],
        vec![],
        1,
    )
    .await;
    // An event past its `expiration` is dropped, not delivered.
    b.publish(
        "ps",
        "orders",
        "application/cloudevents+json",
        &json!({"specversion":"1.0","id":"stale","source":"x","type":"order.gold","expiration":"2020-01-01T00:00:00Z","data":{"total":1000}}).to_string(),
    )
    .await;
    // A generated envelope: JSON data, the app id as source, the trace header carried, and an
    // `expiration` from the ttl.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, _) = b
        .call(
            "POST",
            "/v1.0/publish/ps/orders?metadata.ttlInSeconds=60",
            &[("content-type", "application/json"), ("traceparent", tp)],
            r#"{"n":1}"#,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The caller's own CloudEvents, routed by type and data.
    let ce = |ty: &str, total: u32| {
        json!({"specversion":"1.0","id":format!("{ty}-{total}"),"source":"x","type":ty,"datacontenttype":"application/json","data":{"total":total}}).to_string()
    };
    b.publish(
        "ps",
        "orders",
        "application/cloudevents+json",
        &ce("order.gold", 500),
    )
    .await;
    b.publish(
        "ps",
        "orders",
        "application/cloudevents+json",
        &ce("order.gold", 5),
    )
    .await;
    until("three deliveries", async || app.received().len() == 3).await;

    let other = app.on("/other");
    assert_eq!(other.len(), 1, "{:?}", app.received());
    let e = &other[0].event;
    assert_eq!(e["data"], json!({"n": 1}));
    assert_eq!(e["source"], "shop");
    assert_eq!(e["type"], "com.dapr.event.sent");
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["datacontenttype"], "application/json");
    assert_eq!(e["topic"], "orders");
    assert_eq!(e["pubsubname"], "ps");
    assert_eq!(e["traceparent"], tp);
    let expiration = e["expiration"].as_str().expect("an expiration");
    assert!(
        humantime::parse_rfc3339(expiration).unwrap() > std::time::SystemTime::now(),
        "{expiration}"
    );
    assert_eq!(
        other[0].headers["content-type"],
        "application/cloudevents+json"
    );
    assert_eq!(other[0].headers["traceparent"], tp);
    assert_eq!(app.on("/gold")[0].event["id"], "order.gold-500");
    assert_eq!(app.on("/gold")[0].event["source"], "x");
    assert_eq!(app.on("/orders")[0].event["id"], "order.gold-5");
    until("the expired event dropped", async || {
        b.metrics_text().contains(
            r#"outrigger_pubsub_delivered_total{pubsub="ps",topic="orders",result="drop"} 1"#,
        )
    })
    .await;
    assert!(app.received().iter().all(|r| r.event["id"] != "stale"));

    let text = b.metrics_text();
    assert!(
        text.contains(
            r#"outrigger_pubsub_delivered_total{pubsub="ps",topic="orders",result="success"} 3"#
        ),
        "{text}"
    );

    assert!(
        text.contains(r#"outrigger_pubsub_published_total{pubsub="ps",result="success"} 4"#),
        "{text}"
    );
    b.ps.stop().await;
}

#[tokio::test]
async fn raw_payload_bulk_publish_and_declarative_subscriptions() {
    // No programmatic subscriptions (404): everything comes from a Subscription file.
    let app = App::start(None, |_, _, _| ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("subs.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata: {name: raw}
spec:
  pubsubname: ps
  topic: raw
  routes: {default: /raw}
  metadata: {rawPayload: "true"}
---
apiVersion: dapr.io/v1alpha1
kind: Subscription
metadata: {name: bulk}
spec: {pubsubname: ps, topic: bulk, route: /bulk}
---
apiVersion: dapr.io/v1alpha1
kind: Subscription
metadata: {name: elsewhere}
spec: {pubsubname: ps, topic: bulk, route: /not-for-us}
scopes: [another-app]
"#,
    )
    .unwrap();
    let declarative = pubsub::load_subscription_files(&[file]).unwrap();
    let b = bridge(
        Some(&app),
        &[component("ps", "pubsub.in-memory", &[])],
        declarative,
        2,
    )
    .await;

    let (status, err) = b
        .call(
            "POST",
            "/v1.0/publish/ps/raw?metadata.rawPayload=true",
            &[("content-type", "application/octet-stream")],
            "raw bytes",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{err}");
    let (status, err) = b
        .call(
            "POST",
            "/v1.0-alpha1/publish/bulk/ps/bulk",
            &[("content-type", "application/json")],
            r#"[{"entryId":"a","event":{"k":1},"contentType":"application/json"},
                {"entryId":"b","event":"hello","contentType":"text/plain"},
                {"entryId":"c","event":"AP8=","contentType":"application/octet-stream"},
                {"entryID":"d","Event":{"js":true},"CONTENTTYPE":"application/json"}]"#,
        )
        .await;
    // `entryID` (the JS SDK's spelling): field names match as in daprd's Go decoder.
    assert_eq!(status, StatusCode::NO_CONTENT, "{err}");
    until("five deliveries", async || app.received().len() == 5).await;

    let raw = &app.on("/raw")[0].event;
    assert_eq!(raw["data_base64"], "cmF3IGJ5dGVz");
    assert_eq!(raw["datacontenttype"], "application/octet-stream");
    let bulk: Vec<Value> = app
        .on("/bulk")
        .into_iter()
        .map(|r| r.event["data"].clone())
        .collect();
    assert!(
        bulk.contains(&json!({"k": 1}))
            && bulk.contains(&json!("hello"))
            && bulk.contains(&json!({"js": true})),
        "{bulk:?}"
    );
    let binary = app
        .on("/bulk")
        .into_iter()
        .find(|r| r.event.get("data_base64").is_some())
        .expect("the binary entry");
    assert_eq!(binary.event["data_base64"], "AP8=");
    assert!(app.on("/not-for-us").is_empty());
    let subs = b.ps.subscriptions_json();
    assert_eq!(subs.as_array().unwrap().len(), 2, "{subs}");
    assert_eq!(subs[0]["type"], "DECLARATIVE");
    b.ps.stop().await;
}

/// `bulkSubscribe.enabled`: the app gets daprd's bulk envelope and answers per entry; SUCCESS
/// acks, DROP drops, a missing or empty status retries that entry alone (in a later envelope).
#[tokio::test]
async fn bulk_subscribe_delivers_envelopes_and_reads_per_entry_statuses() {
    let retried = Arc::new(Mutex::new(false));
    let seen_retry = retried.clone();
    let app = App::start(
        Some(json!([{
            "pubsubname": "ps", "topic": "bulk", "route": "/bulk",
            // A Java-style handler: up to 3 events per envelope; the wait is long so that
            // the three published at once arrive together (it ships when full).
            "bulkSubscribe": {"enabled": true, "maxMessagesCount": 3, "maxAwaitDurationMs": 2000}
        }])),
        move |_, envelope, _| {
            let statuses: Vec<Value> = envelope["entries"]
                .as_array()
                .map(|entries| {
                    entries
                        .iter()
                        .filter_map(|e| {
                            let status = match e["event"]["data"]["n"].as_i64() {
                                Some(1) => "SUCCESS",
                                Some(2) => "DROP",
                                // No status the first time: RETRY; then SUCCESS.
                                Some(3)
                                    if !std::mem::replace(
                                        &mut *seen_retry.lock().unwrap(),
                                        true,
                                    ) =>
                                {
                                    return None;
                                }
                                _ => "SUCCESS",
                            };
                            Some(json!({"entryId": e["entryId"], "status": status}))
                        })
                        .collect()
                })
                .unwrap_or_default();
            (StatusCode::OK, json!({ "statuses": statuses }).to_string())
        },
    )
    .await;
    let b = bridge(
        Some(&app),
        &[component("ps", "pubsub.in-memory", &[])],
        vec![],
        1,
    )
    .await;
    for n in 1..=3 {
        b.publish(
            "ps",
            "bulk",
            "application/json",
            &json!({ "n": n }).to_string(),
        )
        .await;
    }
    until("the retried entry delivered again", async || {
        b.metrics_text().contains(
            r#"outrigger_pubsub_delivered_total{pubsub="ps",topic="bulk",result="success"} 2"#,
        )
    })
    .await;
    assert!(*retried.lock().unwrap());
    let envelopes = app.on("/bulk");
    // The first envelope holds the three events, as daprd lays it out.
    let first = &envelopes[0];
    assert_eq!(first.headers["content-type"], "application/json");
    let e = &first.event;
    assert_eq!(e["type"], "com.dapr.event.sent.bulk");
    assert_eq!(
        (e["topic"].as_str(), e["pubsubname"].as_str()),
        (Some("bulk"), Some("ps"))
    );
    assert_eq!(e["id"].as_str().unwrap().len(), 36);
    let entries = e["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "{e}");
    let mut ns: Vec<i64> = entries
        .iter()
        .map(|x| x["event"]["data"]["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [1, 2, 3]);
    for x in entries {
        assert_eq!(x["contentType"], "application/cloudevents+json");
        assert!(!x["entryId"].as_str().unwrap().is_empty());
        assert_eq!(x["event"]["type"], "com.dapr.event.sent");
    }
    // Then only the retried event, alone.
    let later: Vec<i64> = envelopes[1..]
        .iter()
        .flat_map(|r| r.event["entries"].as_array().unwrap().clone())
        .map(|x| x["event"]["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(later, [3]);
    let text = b.metrics_text();
    for (result, n) in [("drop", 1), ("retry", 1)] {
        let line = format!(
            r#"outrigger_pubsub_delivered_total{{pubsub="ps",topic="bulk",result="{result}"}} {n}"#
        );
        assert!(text.contains(&line), "{line}\n{text}");
    }
    b.ps.stop().await;
}

#[tokio::test]
async fn redis_retries_then_acks_once_drops_and_dead_letters() {
    let redis = RedisServer::start_persistent();
    let host = redis.host();
    // orders: RETRY three times then SUCCESS for "retry-me"; DROP for "drop-me" (→ poison);
    // 500 forever for "fail-me" (→ poison after 5 attempts). plain: DROP without a dead-letter topic.
    let app = App::start(
        Some(json!([
            {"pubsubname": "ps", "topic": "orders", "route": "/orders", "deadLetterTopic": "poison"},
            {"pubsubname": "ps", "topic": "poison", "route": "/poison"},
            {"pubsubname": "ps", "topic": "plain", "route": "/plain"}
        ])),
        |path, event, seen| match (path, event["id"].as_str().unwrap_or("")) {
            ("/orders", "retry-me") if seen <= 3 => status("RETRY"),
            ("/orders", "drop-me") | ("/plain", _) => status("DROP"),
            ("/orders", "fail-me") => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
            _ => ok(),
        },
    )
    .await;
    let ps = component(
        "ps",
        "pubsub.redis",
        &[
            ("redisHost", &host),
            ("processingTimeout", "1s"),
            ("redeliverInterval", "1s"),
        ],
    );
    let b = bridge(Some(&app), &[ps], vec![], 3).await;
    for id in ["retry-me", "drop-me", "fail-me"] {
        b.publish_ce(
            "/v1.0/publish/ps/orders?metadata.region=eu&metadata.region=ignored",
            id,
        )
        .await;
    }
    b.publish_ce("/v1.0/publish/ps/plain", "plain-drop").await;

    until("two dead letters and a success", async || {
        app.on("/poison").len() == 2 && app.successes().contains(&"retry-me".to_string())
    })
    .await;
    until("nothing pending", async || {
        redis.pending("orders", "shop").await == 0
            && redis.pending("plain", "shop").await == 0
            && redis.pending("poison", "shop").await == 0
    })
    .await;
    // Metadata (first value wins) rides in the stream entry and reaches the app as headers.
    app.retried_dropped_and_failed();
    assert_eq!(app.on("/plain").len(), 1);
    let text = b.metrics_text();
    for line in [
        r#"outrigger_pubsub_delivered_total{pubsub="ps",topic="orders",result="dead_letter"} 2"#,
        r#"outrigger_pubsub_delivered_total{pubsub="ps",topic="orders",result="retry"} 8"#,
        r#"outrigger_pubsub_delivered_total{pubsub="ps",topic="plain",result="drop"} 1"#,
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    b.ps.stop().await;
}

#[tokio::test]
async fn redis_restart_keeps_unacked_messages() {
    let mut redis = RedisServer::start_persistent();
    let host = redis.host();
    let accept = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = accept.clone();
    let app = App::start(
        Some(json!([{"pubsubname": "ps", "topic": "jobs", "route": "/jobs"}])),
        move |_, _, _| {
            if a.load(std::sync::atomic::Ordering::SeqCst) {
                ok()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, String::new())
            }
        },
    )
    .await;
    let ps = component(
        "ps",
        "pubsub.redis",
        &[
            ("redisHost", &host),
            ("processingTimeout", "1s"),
            ("redeliverInterval", "1s"),
        ],
    );
    let b = bridge(Some(&app), &[ps], vec![], 1).await;
    let ids = ["j1", "j2", "j3"];
    for id in ids {
        b.publish(
            "ps",
            "jobs",
            "application/cloudevents+json",
            &json!({"id": id, "source": "t", "type": "t", "specversion": "1.0"}).to_string(),
        )
        .await;
    }
    until("every job tried", async || {
        ids.iter()
            .all(|id| app.received().iter().any(|r| r.event["id"] == *id))
    })
    .await;
    assert_eq!(redis.pending("jobs", "shop").await, 3);

    redis.restart();
    accept.store(true, std::sync::atomic::Ordering::SeqCst);
    until("every job delivered after the restart", async || {
        let s = app.successes();
        ids.iter().all(|id| s.iter().any(|x| x == id))
    })
    .await;
    until("nothing pending", async || {
        redis.pending("jobs", "shop").await == 0
    })
    .await;
    b.ps.stop().await;
}

#[tokio::test]
async fn jetstream_retries_survives_a_restart_and_dead_letters() {
    let mut nats = NatsServer::start();
    let accept = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let a = accept.clone();
    let app = App::start(
        Some(json!([
            {"pubsubname": "js", "topic": "orders", "route": "/orders", "deadLetterTopic": "poison"},
            {"pubsubname": "js", "topic": "poison", "route": "/poison"}
        ])),
        move |path, event, seen| {
            if !a.load(std::sync::atomic::Ordering::SeqCst) {
                return (StatusCode::SERVICE_UNAVAILABLE, String::new());
            }
            match (path, event["id"].as_str().unwrap_or("")) {
                ("/orders", "retry-me") if seen <= 3 => status("RETRY"),
                ("/orders", "drop-me") => status("DROP"),
                _ => ok(),
            }
        },
    )
    .await;
    let js = component(
        "js",
        "pubsub.jetstream",
        &[("natsURL", &nats.url()), ("ackWait", "2s")],
    );
    let b = bridge(Some(&app), &[js], vec![], 2).await;
    // Publish metadata travels with the message (as NATS headers) and reaches the app as headers.
    b.publish_ce("/v1.0/publish/js/orders?metadata.region=eu", "retry-me")
        .await;
    b.publish_ce("/v1.0/publish/js/orders", "drop-me").await;
    until("a success after retries and a dead letter", async || {
        app.successes().contains(&"retry-me".to_string()) && app.on("/poison").len() == 1
    })
    .await;
    assert_eq!(app.count_on("/orders", "retry-me"), 4);
    assert_eq!(app.on("/orders")[0].headers["region"], "eu");
    assert_eq!(app.on("/poison")[0].event["id"], "drop-me");

    // Unacked across a restart: the app refuses, the server restarts, then the app accepts.
    accept.store(false, std::sync::atomic::Ordering::SeqCst);
    for id in ["r1", "r2"] {
        b.publish_ce("/v1.0/publish/js/orders", id).await;
    }
    until("both tried", async || {
        ["r1", "r2"]
            .iter()
            .all(|id| app.count_on("/orders", id) > 0)
    })
    .await;
    nats.restart();
    accept.store(true, std::sync::atomic::Ordering::SeqCst);
    until("both delivered after the restart", async || {
        let s = app.successes();
        ["r1", "r2"].iter().all(|id| s.iter().any(|x| x == id))
    })
    .await;
    // Nothing left unacknowledged on the consumer.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let ctx = async_nats::jetstream::new(client);
    until("no ack pending", async || {
        let mut stream = ctx.get_stream("orders").await.unwrap();
        let _ = stream.info().await;
        let mut c: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("shop-orders").await.unwrap();
        let info = c.info().await.unwrap();
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    b.ps.stop().await;
}

#[tokio::test]
async fn stop_cuts_retry_waits_short_and_leaves_the_message_pending() {
    let redis = RedisServer::start_persistent();
    let app = App::start(
        Some(json!([{"pubsubname": "ps", "topic": "slow", "route": "/slow"}])),
        |_, _, _| status("RETRY"),
    )
    .await;
    // A retry wait far longer than the test may take: stop must not sit it out.
    let mut options = PubSubOptions::new("shop", Some(app.addr.to_string()));
    options.retry = RetryPolicy {
        max_attempts: 10,
        initial_interval: Duration::from_secs(3600),
        max_interval: Duration::from_secs(3600),
    };
    let ps = PubSub::new(
        options,
        &[component(
            "ps",
            "pubsub.redis",
            &[("redisHost", &redis.host())],
        )],
        vec![],
        Default::default(),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(true);
    ps.start(rx);
    tokio::time::timeout(WAIT, ps.subscribed().wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    let router = pubsub::http::router(ps.clone());
    let res = router
        .oneshot(
            axum::http::Request::post("/v1.0/publish/ps/slow")
                .body(axum::body::Body::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    until("the first attempt", async || !app.received().is_empty()).await;
    tokio::time::timeout(WAIT, ps.stop())
        .await
        .expect("stop does not wait out a retry backoff");
    assert_eq!(app.received().len(), 1);
    // Not acked: the broker still holds it for redelivery.
    assert_eq!(redis.pending("slow", "shop").await, 1);
}

#[tokio::test]
async fn subscriptions_are_asked_for_until_the_app_answers() {
    // The app is "ready" but not listening yet: /dapr/subscribe is retried until it answers.
    let address = format!("127.0.0.1:{}", free_port());
    let ps = PubSub::new(
        PubSubOptions::new("shop", Some(address.clone())),
        &[component("ps", "pubsub.in-memory", &[])],
        vec![],
        Default::default(),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(true);
    ps.start(rx);
    let mut asked = ps.subscribed();
    let app = App::start_at(
        &address,
        Some(json!([{"pubsubname": "ps", "topic": "late", "route": "/late"}])),
        |_, _, _| ok(),
    )
    .await;
    tokio::time::timeout(WAIT, asked.wait_for(|n| *n == 1))
        .await
        .expect("the subscription starts once the app answers")
        .unwrap();
    let res = pubsub::http::router(ps.clone())
        .oneshot(
            axum::http::Request::post("/v1.0/publish/ps/late")
                .body(axum::body::Body::from("hi"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    until("the delivery", async || app.on("/late").len() == 1).await;
    assert_eq!(app.on("/late")[0].event["data"], "hi");
    ps.stop().await;
}

/// A JetStream publish to a new topic while NATS is down waited 5 s per request to it (10 s
/// here, more for a bulk publish: each entry in turn): the whole publish now has one 5 s
/// deadline, answered with Dapr's error, and a bulk publish shares it across its entries.
#[tokio::test]
async fn a_publish_to_an_unreachable_broker_fails_within_the_publish_timeout() {
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let b = bridge(
        None,
        &[component("ps", "pubsub.jetstream", &[("natsURL", &dead)])],
        vec![],
        0,
    )
    .await;
    // The deadline only turns a hang into a failure.
    let (status, err) = tokio::time::timeout(
        Duration::from_secs(30),
        b.call("POST", "/v1.0/publish/ps/t", &[], "x"),
    )
    .await
    .expect("the publish never answered");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
    assert_eq!(err["errorCode"], "ERR_PUBSUB_PUBLISH_MESSAGE", "{err}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("pubsub.jetstream did not take the message within 5s")),
        "{err}"
    );
    let (status, err) = tokio::time::timeout(
        Duration::from_secs(30),
        b.call(
            "POST",
            "/v1.0-alpha1/publish/bulk/ps/t",
            &[],
            r#"[{"entryId":"1","event":"a","contentType":"text/plain"},{"entryId":"2","event":"b","contentType":"text/plain"}]"#,
        ),
    )
    .await
    .expect("the bulk publish never answered");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
    assert_eq!(
        err["failedEntries"].as_array().map(Vec::len),
        Some(2),
        "{err}"
    );
    assert!(
        b.metrics_text()
            .contains("outrigger_pubsub_published_total{pubsub=\"ps\",result=\"timeout\"} 3"),
        "{}",
        b.metrics_text()
    );
}

/// RabbitMQ in daprd's layout: RETRY then SUCCESS, DROP and exhausted attempts to the
/// subscription's dead-letter topic, an exhausted message without one nacked into the
/// component's dead-letter queue (`enableDeadLetter`), metadata as AMQP headers, nothing left
/// unacked.
#[tokio::test]
async fn rabbitmq_retries_dead_letters_and_acks_in_daprs_layout() {
    let vhost = RabbitVhost::create();
    let app = App::start(
        Some(json!([
            {"pubsubname": "rmq", "topic": "orders", "route": "/orders", "deadLetterTopic": "poison"},
            {"pubsubname": "rmq", "topic": "poison", "route": "/poison"},
            {"pubsubname": "rmq", "topic": "plain", "route": "/plain"}
        ])),
        |path, event, seen| match (path, event["id"].as_str().unwrap_or("")) {
            ("/orders", "retry-me") if seen <= 3 => status("RETRY"),
            ("/orders", "drop-me") => status("DROP"),
            ("/orders", "fail-me") | ("/plain", _) => {
                (StatusCode::INTERNAL_SERVER_ERROR, String::new())
            }
            _ => ok(),
        },
    )
    .await;
    let rmq = component(
        "rmq",
        "pubsub.rabbitmq",
        &[
            ("connectionString", &vhost.url()),
            ("durable", "true"),
            ("deletedWhenUnused", "false"),
            ("deliveryMode", "2"),
            ("prefetchCount", "5"),
            ("enableDeadLetter", "true"),
        ],
    );
    let b = bridge(Some(&app), &[rmq], vec![], 3).await;
    for id in ["retry-me", "drop-me", "fail-me"] {
        b.publish_ce("/v1.0/publish/rmq/orders?metadata.region=eu", id)
            .await;
    }
    b.publish_ce("/v1.0/publish/rmq/plain", "nacked").await;
    until(
        "two dead letters, a success and a nacked message",
        async || {
            app.on("/poison").len() == 2
                && app.successes().contains(&"retry-me".to_string())
                && app.on("/plain").len() == 5
        },
    )
    .await;
    app.retried_dropped_and_failed();
    // daprd's names: queue `{consumerID}-{topic}`, dead-letter queue `dlq-{queue}`; the
    // exhausted message without a dead-letter topic was nacked into it; nothing is unacked.
    until("the broker's counts settle", async || {
        let q = vhost.queues();
        q.get("shop-orders") == Some(&(0, 0))
            && q.get("shop-poison") == Some(&(0, 0))
            && q.get("shop-plain") == Some(&(0, 0))
            && q.get("dlq-shop-plain") == Some(&(1, 0))
    })
    .await;
    let text = b.metrics_text();
    for line in [
        r#"outrigger_pubsub_delivered_total{pubsub="rmq",topic="orders",result="dead_letter"} 2"#,
        r#"outrigger_pubsub_delivered_total{pubsub="rmq",topic="plain",result="retry"} 5"#,
        r#"outrigger_pubsub_published_total{pubsub="rmq",result="success"} 6"#,
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    b.ps.stop().await;
}

/// `exchangeKind: topic` with a subscription's `routingKey` list and a publish's `routingKey`:
/// only what the keys match reaches the app; nothing is left in the queue.
#[tokio::test]
async fn rabbitmq_topic_exchange_routes_by_key() {
    let vhost = RabbitVhost::create();
    let app = App::start(
        Some(json!([
            {"pubsubname": "rmq", "topic": "orders", "route": "/orders",
             "metadata": {"routingKey": "eu.*,us.orders"}}
        ])),
        |_, _, _| ok(),
    )
    .await;
    let rmq = component(
        "rmq",
        "pubsub.rabbitmq",
        &[
            ("connectionString", &vhost.url()),
            ("exchangeKind", "topic"),
            ("prefetchCount", "0"),
        ],
    );
    let b = bridge(Some(&app), &[rmq], vec![], 1).await;
    // Unroutable first: once the later two arrive, it would have too.
    for (id, key) in [
        ("asia", "asia.tokyo"),
        ("paris", "eu.paris"),
        ("us", "us.orders"),
    ] {
        b.publish_ce(
            format!("/v1.0/publish/rmq/orders?metadata.routingKey={key}"),
            id,
        )
        .await;
    }
    until("two deliveries", async || app.on("/orders").len() == 2).await;
    let mut got: Vec<String> = app
        .on("/orders")
        .iter()
        .map(|r| r.event["id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, ["paris", "us"]);
    until("nothing left in the queue", async || {
        vhost.queues().get("shop-orders") == Some(&(0, 0))
    })
    .await;
    assert_eq!(app.on("/orders").len(), 2);
    b.ps.stop().await;
}

/// RabbitMQ drops every connection (as a restart does) while deliveries are unacked: the
/// subscription and the publisher reconnect, the broker redelivers what was in flight, and a
/// broker that is not there at all fails a publish at once with Dapr's error.
#[tokio::test]
async fn rabbitmq_connection_loss_redelivers_and_an_absent_broker_fails_publishes() {
    let vhost = RabbitVhost::create();
    let accept = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a = accept.clone();
    let app = App::start(
        Some(json!([{"pubsubname": "rmq", "topic": "jobs", "route": "/jobs"}])),
        move |_, _, _| {
            if a.load(std::sync::atomic::Ordering::SeqCst) {
                ok()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, String::new())
            }
        },
    )
    .await;
    let mut options = PubSubOptions::new("shop", Some(app.addr.to_string()));
    // Attempts that outlast the connection drop: the messages are in flight when it comes.
    options.retry = RetryPolicy {
        max_attempts: 10_000,
        initial_interval: Duration::from_millis(20),
        max_interval: Duration::from_millis(50),
    };
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/", free_port());
    let ps = PubSub::new(
        options,
        &[
            component(
                "rmq",
                "pubsub.rabbitmq",
                &[
                    ("connectionString", &vhost.url()),
                    ("reconnectWaitSeconds", "0"),
                ],
            ),
            component("down", "pubsub.rabbitmq", &[("connectionString", &dead)]),
        ],
        vec![],
        Default::default(),
    )
    .unwrap();
    let (_tx, rx) = watch::channel(true);
    ps.start(rx);
    tokio::time::timeout(WAIT, ps.subscribed().wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    let publish = async |pubsub: &str, body: &str| {
        let res = pubsub::http::router(ps.clone())
            .oneshot(
                axum::http::Request::post(format!("/v1.0/publish/{pubsub}/jobs"))
                    .header("content-type", "application/cloudevents+json")
                    .body(axum::body::Body::from(body.to_string()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    let ce =
        |id: &str| json!({"id": id, "source": "t", "type": "t", "specversion": "1.0"}).to_string();
    for id in ["j1", "j2"] {
        assert_eq!(publish("rmq", &ce(id)).await.0, StatusCode::NO_CONTENT);
    }
    until("both tried", async || {
        ["j1", "j2"]
            .iter()
            .all(|id| app.received().iter().any(|r| r.event["id"] == *id))
    })
    .await;
    assert_eq!(vhost.queues().get("shop-jobs"), Some(&(0, 2)));

    vhost.close_connections();
    accept.store(true, std::sync::atomic::Ordering::SeqCst);
    // The publisher reconnects on its next publish (its old connection was closed).
    let mut published = false;
    for _ in 0..50 {
        if publish("rmq", &ce("j3")).await.0 == StatusCode::NO_CONTENT {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        published,
        "a publish after the connection drop never succeeded"
    );
    until("every job delivered after the drop", async || {
        let s = app.successes();
        ["j1", "j2", "j3"]
            .iter()
            .all(|id| s.iter().any(|x| x == id))
    })
    .await;
    until("nothing left in the queue", async || {
        vhost.queues().get("shop-jobs") == Some(&(0, 0))
    })
    .await;

    // Nothing listens there: a clear 500 at once, not a hang.
    let (status, err) = tokio::time::timeout(Duration::from_secs(30), publish("down", &ce("x")))
        .await
        .expect("the publish never answered");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
    assert_eq!(err["errorCode"], "ERR_PUBSUB_PUBLISH_MESSAGE", "{err}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("rabbitmq: cannot connect to amqp://guest:***@127.0.0.1")),
        "{err}"
    );
    ps.stop().await;
}

/// MQTT on the machine's Mosquitto (topics under a prefix of our own): RETRY then SUCCESS, DROP
/// to the dead-letter topic, `retained` as daprd sends it, a retained publish kept by the
/// broker.
#[tokio::test]
async fn mqtt3_retries_dead_letters_and_retains() {
    let prefix = format!("outrigger-test-{:08x}", fastrand::u32(..));
    let (orders, poison, kept) = (
        format!("{prefix}/orders"),
        format!("{prefix}/poison"),
        format!("{prefix}/kept"),
    );
    let app = App::start(
        Some(json!([
            {"pubsubname": "mq", "topic": orders, "route": "/orders", "deadLetterTopic": poison},
            {"pubsubname": "mq", "topic": poison, "route": "/poison"}
        ])),
        |path, event, seen| match (path, event["id"].as_str().unwrap_or("")) {
            ("/orders", "retry-me") if seen <= 3 => status("RETRY"),
            ("/orders", "drop-me") => status("DROP"),
            _ => ok(),
        },
    )
    .await;
    let mq = component(
        "mq",
        "pubsub.mqtt3",
        &[
            ("url", "tcp://127.0.0.1:1883"),
            ("consumerID", &format!("{prefix}-client")),
            ("qos", "1"),
        ],
    );
    let b = bridge(Some(&app), &[mq], vec![], 2).await;
    for id in ["retry-me", "drop-me"] {
        b.publish_ce(format!("/v1.0/publish/mq/{orders}"), id).await;
    }
    until("a success after retries and a dead letter", async || {
        app.successes().contains(&"retry-me".to_string()) && app.on("/poison").len() == 1
    })
    .await;
    assert_eq!(app.count_on("/orders", "retry-me"), 4);
    assert_eq!(app.count_on("/orders", "drop-me"), 1);
    assert_eq!(app.on("/poison")[0].event["id"], "drop-me");
    assert_eq!(app.on("/orders")[0].headers["retained"], "false");
    // `retain` per publish: the broker keeps the message for later subscribers.
    b.publish_ce(
        format!("/v1.0/publish/mq/{kept}?metadata.retain=true"),
        "kept-1",
    )
    .await;
    let out = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-t",
            &kept,
            "-C",
            "1",
            "-W",
            "10",
        ])
        .output()
        .expect("mosquitto_sub");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept-1"),
        "{out:?}"
    );
    let _ = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", "1883", "-t", &kept, "-r", "-n"])
        .output();
    let text = b.metrics_text();
    assert!(
        text.contains(&format!(
            r#"outrigger_pubsub_delivered_total{{pubsub="mq",topic="{orders}",result="dead_letter"}} 1"#
        )),
        "{text}"
    );
    b.ps.stop().await;
}

/// A slow app and QoS 0: the subscription holds `HELD_PER_SUBSCRIPTION` messages (10 being
/// handled, 90 waiting); the rest are dropped and counted, not queued without bound. Once the
/// app answers, the held ones arrive.
#[tokio::test]
async fn mqtt3_qos0_backlog_is_bounded_and_drops_are_counted() {
    let held = outrigger::bridge::pubsub::mqtt::HELD_PER_SUBSCRIPTION;
    let prefix = format!("outrigger-test-{:08x}", fastrand::u32(..));
    let topic = format!("{prefix}/ticks");
    let app = App::start(
        Some(json!([{"pubsubname": "mq", "topic": topic, "route": "/ticks"}])),
        |_, _, _| ok(),
    )
    .await;
    app.gate(false);
    let mq = component(
        "mq",
        "pubsub.mqtt3",
        &[
            ("url", "tcp://127.0.0.1:1883"),
            ("consumerID", &format!("{prefix}-client")),
            ("qos", "0"),
        ],
    );
    let b = bridge(Some(&app), &[mq], vec![], 1).await;
    let extra = 30;
    for i in 0..held + extra {
        b.publish("mq", &topic, "text/plain", &format!("m{i}"))
            .await;
    }
    let dropped = format!(r#"outrigger_pubsub_mqtt_dropped_total{{pubsub="mq"}} {extra}"#);
    until("the drops counted", async || {
        b.metrics_text().contains(&dropped)
    })
    .await;
    app.gate(true);
    until("the held messages delivered", async || {
        app.successes().len() == held
    })
    .await;
    assert_eq!(app.on("/ticks").len(), held);
    assert!(b.metrics_text().contains(&dropped), "{}", b.metrics_text());
    b.ps.stop().await;
}

/// A stuck app and QoS 1 past the backlog bound, on a broker with no in-flight limit (so more
/// than `HELD_PER_SUBSCRIPTION` unacked messages reach the sidecar): the connection is read
/// on, so the component's own publishes are still acknowledged (the poll loop used to wait for
/// a slot, and a consume-and-publish app deadlocked itself), and once the app answers every
/// message arrives (QoS 1 is not dropped).
#[tokio::test]
async fn mqtt3_a_stuck_qos1_subscription_does_not_stall_the_connection() {
    let held = outrigger::bridge::pubsub::mqtt::HELD_PER_SUBSCRIPTION;
    let port = free_port();
    let _mosquitto = MosquittoServer::start_with(port, "max_inflight_messages 0");
    let app = App::start(
        Some(json!([{"pubsubname": "mq", "topic": "ticks", "route": "/ticks"}])),
        |_, _, _| ok(),
    )
    .await;
    app.gate(false);
    let mq = component(
        "mq",
        "pubsub.mqtt3",
        &[
            ("url", &format!("tcp://127.0.0.1:{port}")),
            ("consumerID", "stuck-qos1"),
            ("qos", "1"),
        ],
    );
    let b = bridge(Some(&app), &[mq], vec![], 1).await;
    let total = held + 30;
    for i in 0..total {
        tokio::time::timeout(
            WAIT,
            b.publish("mq", "ticks", "text/plain", &format!("m{i}")),
        )
        .await
        .unwrap_or_else(|_| panic!("publish {i} never acknowledged: the connection stalled"));
    }
    app.gate(true);
    until("every message delivered", async || {
        app.successes().len() == total
    })
    .await;
    b.ps.stop().await;
}

/// An MQTT broker that is not there: publishes fail at once with Dapr's error and the
/// subscription waits; once the broker starts, publishes succeed and the subscription
/// delivers (the connection is retried with backoff).
#[tokio::test]
async fn mqtt3_broker_down_fails_publishes_then_recovers() {
    let port = free_port();
    let app = App::start(
        Some(json!([{"pubsubname": "mq", "topic": "jobs", "route": "/jobs"}])),
        |_, _, _| ok(),
    )
    .await;
    let mq = component(
        "mq",
        "pubsub.mqtt3",
        &[("url", &format!("tcp://127.0.0.1:{port}"))],
    );
    let b = bridge(Some(&app), &[mq], vec![], 0).await;
    let publish = async || b.call("POST", "/v1.0/publish/mq/jobs", &[], "hello").await;
    let (status, err) = tokio::time::timeout(Duration::from_secs(30), publish())
        .await
        .expect("the publish never answered");
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
    assert_eq!(err["errorCode"], "ERR_PUBSUB_PUBLISH_MESSAGE", "{err}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("mqtt 127.0.0.1:{port}"))),
        "{err}"
    );
    let _mosquitto = MosquittoServer::start(port);
    tokio::time::timeout(WAIT, b.ps.subscribed().wait_for(|n| *n == 1))
        .await
        .expect("the subscription starts once the broker is up")
        .unwrap();
    let mut delivered = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if publish().await.0 == StatusCode::NO_CONTENT {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "no publish succeeded after the broker started");
    until("the delivery", async || !app.on("/jobs").is_empty()).await;
    assert_eq!(app.on("/jobs")[0].event["data"], "hello");
    b.ps.stop().await;
}
