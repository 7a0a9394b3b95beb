//! `pubsub.mqtt3`: an MQTT 3.1.1 broker (rumqttc), as daprd's component (components-contrib
//! `pubsub/mqtt3`): one connection per component whose client id is `consumerID` (the app id
//! by default), shared by publishes and every subscription; topics are MQTT topics (a
//! subscription may use `+`, `#` and `$share/{group}/…`).
//!
//! A publish resolves once the broker has acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2;
//! QoS 0 once written). Deliveries use manual acks: a message is acked after the handler says
//! [`Outcome::Ack`]; one it leaves is not acked, as daprd does, so the broker sends it again
//! when the session resumes (a reconnection with `cleanSession: false`, the default). MQTT
//! carries no metadata: the app gets `retained` (`true`/`false`) as daprd sends it.
//!
//! The connection is opened on first use (a publish or a subscription; not by the health probe,
//! since connecting resumes the session and its backlog arrives at once) by a driver task that polls it and reconnects with
//! backoff, re-subscribing every topic; while it is down a publish fails at once with the last
//! connection error. Each (re)connection is a fresh client, so nothing half-sent is replayed
//! behind the caller's back: a publish cut short by a lost connection is an error.
//!
//! TLS (daprd's `ssl://` URL, or `mqtts://`, `tcps://`, `tls://`; port 8883 by default): the
//! broker's certificate is checked against `caCert` (else the system's roots) and for the URL's
//! host, `clientCert`/`clientKey` answer a broker that asks for a client certificate
//! ([`super::broker_tls`]); the connection is made by [`super::mqtt_tls`], which says why
//! rumqttc's own TLS is not used.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, Transport};
use tokio::sync::{Semaphore, oneshot, watch};

use super::broker::{
    BoxFuture, Broker, BrokerError, Handler, Message, Meta, Outcome, Subscription,
    reconnect_backoff, stopped,
};
use super::rabbitmq::redact;

/// Handlers at once per subscription.
const PARALLEL: usize = 10;
/// MQTT keep-alive (rumqttc's default is 60 s; a lost broker is noticed sooner).
const KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Requests queued for the connection before callers wait.
const REQUEST_CAPACITY: usize = 128;
/// Messages a subscription holds for the app at once: being handled ([`PARALLEL`]) or waiting
/// for a handler. Past it, a QoS 0 message is dropped (and counted: there is no redelivery to
/// lean on), and a QoS 1 or 2 message waits for a slot, unacked, on a task of its own: the
/// connection is read on (it carries the acks of our publishes, other subscriptions and the
/// keep-alive), and the broker's in-flight window (Mosquitto's `max_inflight_messages`)
/// bounds how many unacked messages it sends us. Also the bound of messages kept for a
/// subscription not made yet.
pub const HELD_PER_SUBSCRIPTION: usize = 100;

/// A user name and maybe a password.
type Credentials = (String, Option<String>);

#[derive(Clone, Debug)]
struct Settings {
    host: String,
    port: u16,
    /// The client config for a TLS URL.
    tls: Option<Arc<rustls::ClientConfig>>,
    user: Option<Credentials>,
    consumer_id: Option<String>,
    qos: QoS,
    retain: bool,
    clean_session: bool,
}

/// What the driver knows of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Link {
    /// Connecting (the first time, or again).
    Connecting,
    Up,
    /// The last attempt failed with this error; the driver tries again after a backoff.
    Down(String),
}

type Waiter = oneshot::Sender<Result<(), String>>;

/// One connection's client and what waits on it.
struct Live {
    client: AsyncClient,
    /// Publishes sent, in order, waiting for their packet id (the `Outgoing::Publish` events
    /// come in the order the requests were sent).
    unsent: VecDeque<Waiter>,
    /// Publishes waiting for the broker's acknowledgement, by packet id.
    unacked: HashMap<u16, Waiter>,
    /// Subscribes sent, in order, then by packet id.
    subscribes_unsent: VecDeque<Waiter>,
    subscribes: HashMap<u16, Waiter>,
}

impl Live {
    fn fail_all(&mut self, error: &str) {
        let all = self
            .unsent
            .drain(..)
            .chain(self.unacked.drain().map(|(_, w)| w))
            .chain(self.subscribes_unsent.drain(..))
            .chain(self.subscribes.drain().map(|(_, w)| w));
        for w in all {
            let _ = w.send(Err(error.to_string()));
        }
    }
}

/// A subscribed topic filter and its handler.
struct Route {
    filter: String,
    handler: Handler,
    permits: Arc<Semaphore>,
    /// [`HELD_PER_SUBSCRIPTION`] slots.
    held: Arc<Semaphore>,
}

struct Shared {
    settings: Settings,
    client_id: Mutex<Option<String>>,
    link: watch::Sender<Link>,
    live: tokio::sync::Mutex<Option<Live>>,
    routes: Mutex<Vec<Arc<Route>>>,
    /// Messages that came before any route covered them, with the client to ack them on.
    unrouted: Mutex<Vec<(rumqttc::Publish, AsyncClient)>>,
    driver: Mutex<bool>,
    /// QoS 0 messages dropped past [`HELD_PER_SUBSCRIPTION`] (the component's metric).
    dropped: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
}

/// The MQTT broker.
pub struct Mqtt {
    shared: Arc<Shared>,
}

/// A broker URL's parts.
#[derive(Debug, PartialEq, Eq)]
struct Url {
    host: String,
    port: u16,
    user: Option<Credentials>,
    tls: bool,
}

/// `tcp://user:pass@host:port` (also `mqtt://`; port 1883 by default), or over TLS `ssl://`
/// (daprd's spelling; `mqtts://`, `tcps://` and `tls://` as daprd takes them; port 8883).
fn parse_url(url: &str) -> Result<Url, String> {
    let (scheme, rest) = url.split_once("://").ok_or("no scheme")?;
    let tls = match scheme {
        "tcp" | "mqtt" => false,
        "ssl" | "mqtts" | "tcps" | "tls" => true,
        _ => return Err(format!("unknown scheme {scheme:?}")),
    };
    let rest = rest.trim_end_matches('/');
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => {
            let user = match u.split_once(':') {
                Some((n, p)) => (n.to_string(), Some(p.to_string())),
                None => (u.to_string(), None),
            };
            (Some(user), h)
        }
        None => (None, rest),
    };
    if hostport.contains('/') {
        return Err("a path after host:port".into());
    }
    let default = if tls { 8883 } else { 1883 };
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("port {p:?}"));
    // A bracketed IPv6 address holds colons of its own.
    let (host, port) = match hostport.strip_prefix('[').map(|h| h.split_once(']')) {
        Some(Some((h, ""))) => (h, default),
        Some(Some((h, after))) => match after.strip_prefix(':') {
            Some(p) => (h, port(p)?),
            None => return Err(format!("{after:?} after the IPv6 address")),
        },
        Some(None) => return Err("no ] after [".into()),
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, port(p)?),
            None => (hostport, default),
        },
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok(Url {
        host: host.to_string(),
        port,
        user,
        tls,
    })
}

/// Whether MQTT topic filter `filter` (`+`, `#`, `$share/{group}/…`) covers `topic`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    };
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Mqtt {
    pub fn new(meta: &Meta) -> Result<Self, String> {
        let url = meta.required("url", "the broker's URL, e.g. tcp://localhost:1883")?;
        let url = parse_url(url).map_err(|e| {
            meta.error(
                "url",
                &format!("tcp://[user:password@]host:port or ssl://… for TLS ({e})"),
                &redact(url),
            )
        })?;
        let qos = match meta.u64("qos", 1)? {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            n => return Err(meta.error("qos", "0, 1 or 2", &n.to_string())),
        };
        let tls = super::broker_tls::broker_tls(
            meta,
            url.tls,
            "the url is tcp://; ssl:// is MQTT over TLS",
        )?;
        let settings = Settings {
            host: url.host,
            port: url.port,
            tls,
            user: url.user,
            consumer_id: meta.str("consumerID").map(str::to_string),
            qos,
            retain: meta.bool("retain", false)?,
            clean_session: meta.bool("cleanSession", false)?,
        };
        Ok(Mqtt {
            shared: Arc::new(Shared {
                settings,
                client_id: Mutex::new(None),
                link: watch::channel(Link::Connecting).0,
                live: tokio::sync::Mutex::new(None),
                routes: Mutex::new(Vec::new()),
                unrouted: Mutex::new(Vec::new()),
                driver: Mutex::new(false),
                dropped: std::sync::OnceLock::new(),
            }),
        })
    }
}

impl Shared {
    /// Starts the driver once. The client id is the component's `consumerID`, else the app id
    /// ([`Broker::set_app_id`]), else the consumer group of the first subscription.
    fn start(self: &Arc<Self>, group: Option<&str>) {
        {
            let mut id = self.client_id.lock().unwrap();
            if id.is_none() {
                *id = Some(
                    self.settings
                        .consumer_id
                        .clone()
                        .or_else(|| group.map(str::to_string))
                        .unwrap_or_else(|| format!("outrigger-{:08x}", fastrand::u32(..))),
                );
            }
        }
        let mut running = self.driver.lock().unwrap();
        if !*running {
            *running = true;
            tokio::spawn(self.clone().drive());
        }
    }

    /// rumqttc's options: to the broker, or to a TLS relay's unix socket ([`super::mqtt_tls`]).
    fn options(&self, relay: Option<String>) -> MqttOptions {
        let id = self.client_id.lock().unwrap().clone().unwrap_or_default();
        let mut o = match relay {
            None => MqttOptions::new(id, self.settings.host.clone(), self.settings.port),
            Some(address) => {
                let mut o = MqttOptions::new(id, address, 0);
                o.set_transport(Transport::Unix);
                o
            }
        };
        o.set_clean_session(self.settings.clean_session)
            .set_manual_acks(true)
            .set_keep_alive(KEEP_ALIVE);
        if let Some((user, password)) = &self.settings.user {
            o.set_credentials(user.clone(), password.clone().unwrap_or_default());
        }
        o
    }

    /// Connects, polls, reconnects: forever (the component lives as long as the sidecar).
    async fn drive(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            self.link.send_replace(Link::Connecting);
            let error = match self.relay().await {
                Err(e) => e,
                // `relay` holds the TLS connection while rumqttc uses it: dropped with the
                // event loop when this connection is given up.
                Ok(relay) => {
                    let address = relay.as_ref().map(|r| r.address.clone());
                    let (client, eventloop) =
                        AsyncClient::new(self.options(address), REQUEST_CAPACITY);
                    // Kept messages of the last connection cannot be acked on this one: the
                    // session sends them again.
                    self.unrouted.lock().unwrap().clear();
                    *self.live.lock().await = Some(Live {
                        client: client.clone(),
                        unsent: VecDeque::new(),
                        unacked: HashMap::new(),
                        subscribes_unsent: VecDeque::new(),
                        subscribes: HashMap::new(),
                    });
                    self.poll(eventloop, &client, &mut failures).await
                }
            };
            tracing::warn!(host = %self.settings.host, port = self.settings.port, %error, "mqtt connection lost or refused; reconnecting");
            self.link.send_replace(Link::Down(error.clone()));
            // Taken, not kept until the next connection: a publish while reconnecting (the
            // backoff, the TLS handshake) is refused with this reason, not by the dead client.
            if let Some(mut live) = self.live.lock().await.take() {
                live.fail_all(&format!("mqtt connection lost: {error}"));
            }
            failures += 1;
            tokio::time::sleep(reconnect_backoff(failures)).await;
        }
    }

    /// With TLS, a new TLS connection and the relay rumqttc dials (its address); without, None.
    async fn relay(&self) -> Result<Option<super::mqtt_tls::Relay>, String> {
        let Some(config) = &self.settings.tls else {
            return Ok(None);
        };
        let (host, port) = (&self.settings.host, self.settings.port);
        super::mqtt_tls::connect(host, port, config.clone())
            .await
            .map(Some)
            .map_err(|e| format!("mqtt {host}:{port}: {e}"))
    }

    /// Polls one connection until it fails; returns the error.
    async fn poll(
        &self,
        mut eventloop: EventLoop,
        client: &AsyncClient,
        failures: &mut u32,
    ) -> String {
        loop {
            let event = match eventloop.poll().await {
                Ok(e) => e,
                Err(e) => {
                    return format!("mqtt {}:{}: {e}", self.settings.host, self.settings.port);
                }
            };
            match event {
                Event::Incoming(Incoming::ConnAck(_)) => {
                    *failures = 0;
                    // Subscriptions are the session's: sent again on every connection (a
                    // resumed session keeps them anyway; a clean one needs them).
                    let filters: Vec<String> = self
                        .routes
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|r| r.filter.clone())
                        .collect();
                    for f in filters {
                        let _ = client.try_subscribe(f, self.settings.qos);
                    }
                    self.link.send_replace(Link::Up);
                }
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    let mut live = self.live.lock().await;
                    if let Some(live) = live.as_mut()
                        && let Some(w) = live.unsent.pop_front()
                    {
                        if pkid == 0 {
                            let _ = w.send(Ok(()));
                        } else {
                            live.unacked.insert(pkid, w);
                        }
                    }
                }
                Event::Incoming(Incoming::PubAck(ack)) => self.acked(ack.pkid, Ok(())).await,
                Event::Incoming(Incoming::PubComp(ack)) => self.acked(ack.pkid, Ok(())).await,
                Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                    let mut live = self.live.lock().await;
                    if let Some(live) = live.as_mut()
                        && let Some(w) = live.subscribes_unsent.pop_front()
                    {
                        live.subscribes.insert(pkid, w);
                    }
                }
                Event::Incoming(Incoming::SubAck(ack)) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    let mut live = self.live.lock().await;
                    if let Some(w) = live.as_mut().and_then(|l| l.subscribes.remove(&ack.pkid)) {
                        let _ = w.send(if refused {
                            Err("the broker refused the subscription".into())
                        } else {
                            Ok(())
                        });
                    }
                }
                Event::Incoming(Incoming::Publish(p)) => self.dispatch(p, client.clone()),
                _ => {}
            }
        }
    }

    async fn acked(&self, pkid: u16, result: Result<(), String>) {
        let mut live = self.live.lock().await;
        if let Some(w) = live.as_mut().and_then(|l| l.unacked.remove(&pkid)) {
            let _ = w.send(result);
        }
    }

    /// Hands a message to the handler of the first filter that covers its topic, on its own
    /// task; acks it when the handler says so. Never waits: the poll loop must go on reading
    /// (PUBACKs of our publishes, other subscriptions, keep-alive). A message holds one of the
    /// route's [`HELD_PER_SUBSCRIPTION`] slots: a QoS 0 message finding none is dropped and
    /// counted; a QoS 1 or 2 message waits for one on its task, unacked (the broker sends no
    /// more than its in-flight window of unacked messages, which bounds those waiting). A
    /// message no route covers yet (a resumed session's backlog arrives right after CONNACK,
    /// before every subscription is made again) is kept, up to [`HELD_PER_SUBSCRIPTION`], for
    /// a route added later ([`Shared::route_kept`]).
    fn dispatch(&self, p: rumqttc::Publish, client: AsyncClient) {
        let topic = p.topic.clone();
        let route = self
            .routes
            .lock()
            .unwrap()
            .iter()
            .find(|r| filter_matches(&r.filter, &topic))
            .cloned();
        let Some(route) = route else {
            let mut kept = self.unrouted.lock().unwrap();
            if kept.len() < HELD_PER_SUBSCRIPTION {
                tracing::debug!(%topic, "mqtt message before its subscription is made; kept for it");
                kept.push((p, client));
            } else {
                tracing::warn!(%topic, "mqtt message on a topic nobody subscribes to; not acked");
            }
            return;
        };
        let slot = if p.qos == QoS::AtMostOnce {
            match route.held.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    if let Some(c) = self.dropped.get() {
                        c.inc();
                    }
                    tracing::debug!(%topic, held = HELD_PER_SUBSCRIPTION, "mqtt QoS 0 message dropped: the app is behind");
                    return;
                }
            }
        } else {
            None
        };
        tokio::spawn(async move {
            let slot = match slot {
                Some(slot) => slot,
                // Closed: the subscription stopped; the message stays unacked.
                None => match route.held.clone().acquire_owned().await {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            let Ok(permit) = route.permits.clone().acquire_owned().await else {
                return;
            };
            let message = Message {
                topic: topic.clone(),
                data: p.payload.clone(),
                metadata: BTreeMap::from([("retained".to_string(), p.retain.to_string())]),
            };
            let outcome = (route.handler)(message).await;
            drop((permit, slot));
            if outcome == Outcome::Ack
                && let Err(e) = client.ack(&p).await
            {
                tracing::debug!(%topic, error = %e, "mqtt ack not sent (connection gone); the broker redelivers");
            }
        });
    }

    /// Hands the kept messages a new route covers to it.
    fn route_kept(&self) {
        let kept = std::mem::take(&mut *self.unrouted.lock().unwrap());
        for (p, client) in kept {
            self.dispatch(p, client);
        }
    }

    /// Waits until the link is up, or fails with why it is down (a first connection gets the
    /// time it takes: the caller's deadline bounds it).
    /// Why there is no connection to use: the last one's error if there is one.
    fn not_connected(&self) -> String {
        match &*self.link.borrow() {
            Link::Down(e) => format!("mqtt is not connected: {e}"),
            _ => "mqtt is not connected (reconnecting)".into(),
        }
    }

    async fn up(&self) -> Result<(), String> {
        let mut rx = self.link.subscribe();
        loop {
            match rx.borrow_and_update().clone() {
                Link::Up => return Ok(()),
                Link::Down(e) => return Err(e),
                Link::Connecting => {}
            }
            if rx.changed().await.is_err() {
                return Err("mqtt connection closed".into());
            }
        }
    }
}

impl Broker for Mqtt {
    fn set_drop_counter(&self, counter: prometheus_client::metrics::counter::Counter) {
        let _ = self.shared.dropped.set(counter);
    }

    /// Does not connect: the connection opens the session (`cleanSession: false` resumes
    /// the last one, and its backlog arrives at once), which is for the first publish or
    /// subscription, once the app is ready. Until then the probe says
    /// [`super::super::health::NOT_STARTED`] (status `unknown`).
    fn ping(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        Some(Box::pin(async move {
            if !*self.shared.driver.lock().unwrap() {
                return Err(super::super::health::NOT_STARTED.to_string());
            }
            self.shared.up().await
        }))
    }

    fn kind(&self) -> &'static str {
        "pubsub.mqtt3"
    }

    fn set_app_id(&self, app_id: &str) {
        let mut id = self.shared.client_id.lock().unwrap();
        if id.is_none() {
            *id = Some(
                self.shared
                    .settings
                    .consumer_id
                    .clone()
                    .unwrap_or_else(|| app_id.to_string()),
            );
        }
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: Bytes,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let s = &self.shared;
            s.start(None);
            s.up().await.map_err(BrokerError::Publish)?;
            let retain = match metadata.get("retain") {
                None => s.settings.retain,
                Some(v) => matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "t"),
            };
            let (tx, rx) = oneshot::channel();
            {
                let mut live = s.live.lock().await;
                let live = live
                    .as_mut()
                    .ok_or_else(|| BrokerError::Publish(s.not_connected()))?;
                live.unsent.push_back(tx);
                if let Err(e) =
                    live.client
                        .try_publish(topic, s.settings.qos, retain, data.to_vec())
                {
                    live.unsent.pop_back();
                    return Err(BrokerError::Publish(format!(
                        "mqtt publish to {topic:?} refused: {e}"
                    )));
                }
            }
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(BrokerError::Publish(e)),
                Err(_) => Err(BrokerError::Publish("mqtt connection lost".into())),
            }
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        handler: Handler,
    ) -> BoxFuture<'a, Result<Subscription, BrokerError>> {
        Box::pin(async move {
            let s = self.shared.clone();
            s.start(Some(group));
            s.up().await.map_err(BrokerError::Subscribe)?;
            let route = Arc::new(Route {
                filter: topic.to_string(),
                handler,
                permits: Arc::new(Semaphore::new(PARALLEL)),
                held: Arc::new(Semaphore::new(HELD_PER_SUBSCRIPTION)),
            });
            s.routes.lock().unwrap().push(route.clone());
            s.route_kept();
            let (tx, rx) = oneshot::channel();
            let sent = {
                let mut live = s.live.lock().await;
                match live.as_mut() {
                    Some(live) => {
                        live.subscribes_unsent.push_back(tx);
                        match live.client.try_subscribe(topic, s.settings.qos) {
                            Ok(()) => Ok(()),
                            Err(e) => {
                                live.subscribes_unsent.pop_back();
                                Err(format!("mqtt cannot subscribe to {topic:?}: {e}"))
                            }
                        }
                    }
                    None => Err(s.not_connected()),
                }
            };
            let result = match sent {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err("mqtt connection lost".into())),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                s.routes.lock().unwrap().retain(|r| !Arc::ptr_eq(r, &route));
                return Err(BrokerError::Subscribe(e));
            }
            Ok(Subscription::spawn(move |mut stop| async move {
                stopped(&mut stop).await;
                s.routes.lock().unwrap().retain(|r| !Arc::ptr_eq(r, &route));
                // With a clean session nothing is kept for us anyway: unsubscribe (as daprd);
                // otherwise the broker keeps the subscription and queues for the next start.
                if s.settings.clean_session
                    && let Some(live) = s.live.lock().await.as_ref()
                {
                    let _ = live.client.try_unsubscribe(route.filter.clone());
                }
                // Messages waiting for a slot are left unacked; deliveries in flight finish
                // (they leave unacked what they do not ack).
                route.held.close();
                let _ = route.permits.acquire_many(PARALLEL as u32).await;
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_filters() {
        let url = |host: &str, port, user: Option<Credentials>, tls| Url {
            host: host.into(),
            port,
            user,
            tls,
        };
        assert_eq!(
            parse_url("tcp://localhost:1883").unwrap(),
            url("localhost", 1883, None, false)
        );
        assert_eq!(
            parse_url("mqtt://u:p@h").unwrap(),
            url("h", 1883, Some(("u".into(), Some("p".into()))), false)
        );
        for scheme in ["ssl", "mqtts", "tcps", "tls"] {
            assert_eq!(
                parse_url(&format!("{scheme}://h")).unwrap(),
                url("h", 8883, None, true)
            );
        }
        assert_eq!(
            parse_url("ssl://[::1]:8884").unwrap(),
            url("::1", 8884, None, true)
        );
        assert_eq!(
            parse_url("ssl://[::1]").unwrap(),
            url("::1", 8883, None, true)
        );
        // The docs' placeholder is no URL.
        assert!(parse_url("tcp://[username][:password]@host.domain[:port]").is_err());
        assert!(parse_url("ssl://[::1").is_err());
        assert!(parse_url("wss://h").is_err());
        assert!(parse_url("h:1883").is_err());
        assert_eq!(redact("tcp://u:secret@h:1"), "tcp://u:***@h:1");
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("$share/g/a/b", "a/b"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("a/b", "a/c"));
    }

    fn mqtt() -> Mqtt {
        let c = crate::bridge::components::Component {
            name: "mq".into(),
            kind: "pubsub.mqtt3".into(),
            version: "v1".into(),
            metadata: BTreeMap::from([("url".into(), "tcp://127.0.0.1:1".into())]),
            scopes: Vec::new(),
            ignore_errors: false,
            file: "mq.yaml".into(),
            line: 1,
            lines: BTreeMap::new(),
        };
        Mqtt::new(&super::super::broker::Meta::new(&c)).unwrap()
    }

    /// A route whose handler reports each message's payload and then never answers.
    fn stuck_route(filter: &str) -> (Arc<Route>, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let handler: Handler = Arc::new(move |m: Message| {
            let _ = tx.send(m.data);
            Box::pin(std::future::pending())
        });
        let route = Arc::new(Route {
            filter: filter.into(),
            handler,
            permits: Arc::new(Semaphore::new(PARALLEL)),
            held: Arc::new(Semaphore::new(HELD_PER_SUBSCRIPTION)),
        });
        (route, rx)
    }

    /// The health probe does not connect (that would open a persistent session, whose
    /// backlog arrives before any subscription exists): `unknown` until first use.
    #[tokio::test]
    async fn the_probe_does_not_connect() {
        let m = mqtt();
        let answer = m.ping().unwrap().await;
        assert_eq!(answer, Err(crate::bridge::health::NOT_STARTED.to_string()));
        assert!(!*m.shared.driver.lock().unwrap());
        assert!(m.shared.live.lock().await.is_none());
    }

    /// QoS 1 messages past the bound do not hold the poll loop (dispatch never waits), and a
    /// message that comes before its route is kept for it.
    #[tokio::test]
    async fn dispatch_never_waits_and_keeps_unrouted_messages() {
        let m = mqtt();
        m.set_app_id("app");
        let (client, _eventloop) = AsyncClient::new(m.shared.options(None), 10);
        let (stuck, mut stuck_rx) = stuck_route("stuck");
        m.shared.routes.lock().unwrap().push(stuck.clone());
        for i in 0..HELD_PER_SUBSCRIPTION + 50 {
            let p = rumqttc::Publish::new("stuck", QoS::AtLeastOnce, format!("m{i}"));
            m.shared.dispatch(p, client.clone());
        }
        for _ in 0..PARALLEL {
            stuck_rx.recv().await.unwrap();
        }
        m.shared.dispatch(
            rumqttc::Publish::new("later", QoS::AtLeastOnce, "early"),
            client.clone(),
        );
        assert_eq!(m.shared.unrouted.lock().unwrap().len(), 1);
        let (later, mut later_rx) = stuck_route("later");
        m.shared.routes.lock().unwrap().push(later);
        m.shared.route_kept();
        assert_eq!(later_rx.recv().await.unwrap(), Bytes::from("early"));
        assert!(m.shared.unrouted.lock().unwrap().is_empty());
        // A stopped route leaves its waiting messages (unacked) instead of delivering them.
        stuck.held.close();
        assert!(stuck_rx.try_recv().is_err());
    }
}
