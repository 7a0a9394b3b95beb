//! Configuration stores behind `/v1.0/configuration/{store}` and `GetConfiguration` /
//! `SubscribeConfiguration`: `configuration.postgresql` (in `configuration_postgresql.rs`) and
//! `configuration.redis`, read as daprd's (components-contrib
//! `configuration/redis`): each key is a Redis string `value||version`; changes are watched
//! through keyspace notifications (`__keyspace@<db>__:<key>`, which need the server's
//! `notify-keyspace-events` to include `K` and the string or generic events), and each change
//! is the key's new item (a deleted key: an empty value and version).
//!
//! Watches are registered in [`Watches`] by id; a watch ends when it is unsubscribed, when its
//! consumer goes away (the app's forwarder or a gRPC stream), or when its Redis connection
//! breaks (logged; the app subscribes again, as with daprd).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::components::Component;

/// One configuration item.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConfigItem {
    pub value: String,
    pub version: String,
    pub metadata: BTreeMap<String, String>,
}

/// Changes a watch has seen, in order; each batch is one key's new item.
pub type Changes = mpsc::Receiver<BTreeMap<String, ConfigItem>>;

/// How many change batches may wait for a slow consumer before the watch waits too.
pub(crate) const CHANGES_BUFFERED: usize = 64;

/// `value||version` as contrib splits it: the part before the first `||`, the part after it.
fn parse(raw: &str) -> ConfigItem {
    let mut parts = raw.splitn(3, "||");
    ConfigItem {
        value: parts.next().unwrap_or_default().to_string(),
        version: parts.next().unwrap_or_default().to_string(),
        metadata: BTreeMap::new(),
    }
}

/// A configuration store component (connects on first use).
pub enum ConfigurationStore {
    Redis(Box<RedisConfiguration>),
    Postgres(Box<super::configuration_postgresql::PostgresConfiguration>),
}

impl ConfigurationStore {
    /// Checks the metadata without connecting (preflight).
    pub fn check(c: &Component) -> Result<(), String> {
        ConfigurationStore::open(c).map(drop)
    }

    pub fn open(c: &Component) -> Result<ConfigurationStore, String> {
        match c.kind.as_str() {
            "configuration.redis" => {
                if let Some(t) = c.meta("redisType").filter(|t| *t != "node") {
                    return Err(format!(
                        "expected redisType node (a single Redis server), found {t:?}"
                    ));
                }
                Ok(ConfigurationStore::Redis(Box::new(RedisConfiguration {
                    client: super::state::redis_client(c)?,
                    conn: tokio::sync::OnceCell::new(),
                    db: super::state::redis_db(c)?,
                })))
            }
            "configuration.postgresql" | "configuration.postgres" => {
                super::configuration_postgresql::PostgresConfiguration::open(c)
                    .map(|p| ConfigurationStore::Postgres(Box::new(p)))
            }
            other => Err(format!("{other} is not a configuration store type")),
        }
    }

    /// The health probe ([`super::health`]).
    pub fn ping(&self) -> super::pubsub::broker::BoxFuture<'_, Result<(), String>> {
        match self {
            ConfigurationStore::Redis(r) => Box::pin(super::state::redis_ping(&r.client, &r.conn)),
            ConfigurationStore::Postgres(p) => Box::pin(p.ping()),
        }
    }

    /// The items of `keys` that exist (no keys: all of them).
    pub async fn get(&self, keys: &[String]) -> Result<BTreeMap<String, ConfigItem>, String> {
        match self {
            ConfigurationStore::Redis(r) => r.get(keys).await,
            ConfigurationStore::Postgres(p) => p.get(keys).await,
        }
    }

    /// Watches `keys` (none: every key) with the subscription's `metadata`: subscribes now (so
    /// an error is the caller's), then sends each change until the receiver is dropped or the
    /// subscription breaks.
    pub async fn watch(
        &self,
        keys: Vec<String>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(Changes, tokio::task::JoinHandle<()>), String> {
        match self {
            ConfigurationStore::Redis(r) => r.watch(keys).await,
            ConfigurationStore::Postgres(p) => p.watch(keys, metadata).await,
        }
    }
}

/// A `configuration.redis` component (connects on first use).
pub struct RedisConfiguration {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    db: i64,
}

impl RedisConfiguration {
    /// The items of `keys` that exist (no keys: every key in the database).
    pub async fn get(&self, keys: &[String]) -> Result<BTreeMap<String, ConfigItem>, String> {
        let mut conn = super::state::redis_connection(&self.client, &self.conn).await?;
        let redis_err = |e: redis::RedisError| format!("redis: {e}");
        let keys: Vec<String> = if keys.is_empty() {
            redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?
        } else {
            keys.to_vec()
        };
        let mut out = BTreeMap::new();
        for key in keys {
            // One GET per key: a key of another type is skipped, not an error for the rest.
            let value: redis::RedisResult<Option<String>> =
                redis::cmd("GET").arg(&key).query_async(&mut conn).await;
            match value {
                Ok(Some(v)) => {
                    out.insert(key, parse(&v));
                }
                Ok(None) => {}
                Err(e) if e.code() == Some("WRONGTYPE") => {}
                Err(e) => return Err(redis_err(e)),
            }
        }
        Ok(out)
    }

    /// Watches `keys` (none: every key): subscribes now (so an error is the caller's), then
    /// sends each change until the receiver is dropped or the subscription breaks.
    pub async fn watch(
        &self,
        keys: Vec<String>,
    ) -> Result<(Changes, tokio::task::JoinHandle<()>), String> {
        let prefix = format!("__keyspace@{}__:", self.db);
        // Connecting and subscribing are bounded like every other Redis call: a server that
        // accepts but never answers (or a host that drops packets) fails the subscribe.
        let setup = async {
            let mut pubsub = self
                .client
                .get_async_pubsub()
                .await
                .map_err(|e| format!("redis: {e}"))?;
            if keys.is_empty() {
                pubsub
                    .psubscribe(format!("{prefix}*"))
                    .await
                    .map_err(|e| format!("redis: {e}"))?;
            } else {
                for k in &keys {
                    pubsub
                        .subscribe(format!("{prefix}{k}"))
                        .await
                        .map_err(|e| format!("redis: {e}"))?;
                }
            }
            Ok::<_, String>(pubsub)
        };
        let limit = super::state::REDIS_CONNECT_TIMEOUT + super::state::REDIS_RESPONSE_TIMEOUT;
        let pubsub = tokio::time::timeout(limit, setup)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "redis: no answer to the subscription within {}s",
                    limit.as_secs()
                ))
            })?;
        let (tx, rx) = mpsc::channel(CHANGES_BUFFERED);
        let client = self.client.clone();
        let task = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            let mut conn: Option<redis::aio::MultiplexedConnection> = None;
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return,
                    msg = messages.next() => msg,
                };
                let Some(msg) = msg else {
                    tracing::warn!("configuration watch: the Redis subscription ended");
                    return;
                };
                let Some(key) = msg
                    .get_channel_name()
                    .strip_prefix(&prefix)
                    .map(str::to_string)
                else {
                    continue;
                };
                if conn.is_none() {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(super::state::REDIS_CONNECT_TIMEOUT))
                        .set_response_timeout(Some(super::state::REDIS_RESPONSE_TIMEOUT));
                    conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .ok();
                }
                let Some(c) = conn.as_mut() else { continue };
                let value: redis::RedisResult<Option<String>> =
                    redis::cmd("GET").arg(&key).query_async(c).await;
                let item = match value {
                    Ok(v) => v.as_deref().map(parse).unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "configuration watch: cannot read the changed key");
                        conn = None;
                        continue;
                    }
                };
                if tx.send(BTreeMap::from([(key, item)])).await.is_err() {
                    return;
                }
            }
        });
        Ok((rx, task))
    }
}

/// The open watches, by id.
#[derive(Default)]
pub struct Watches {
    open: Mutex<HashMap<String, (String, tokio::task::AbortHandle)>>,
}

/// Configuration subscriptions open at once (each holds up to two Redis connections and two
/// tasks until unsubscribed or, over gRPC, until its stream closes).
pub const MAX_WATCHES: usize = 128;

impl Watches {
    /// How many watches are running now.
    pub fn open(&self) -> usize {
        let mut open = self.open.lock().expect("not poisoned");
        open.retain(|_, (_, t)| !t.is_finished());
        open.len()
    }

    /// Registers a watch of `store`; returns its id.
    pub fn add(&self, store: &str, task: &tokio::task::JoinHandle<()>) -> String {
        let id = new_id();
        let mut open = self.open.lock().expect("not poisoned");
        open.retain(|_, (_, t)| !t.is_finished());
        open.insert(id.clone(), (store.to_string(), task.abort_handle()));
        id
    }

    /// Stops the watch `id` of `store`; false when there is none.
    pub fn remove(&self, store: &str, id: &str) -> bool {
        let mut open = self.open.lock().expect("not poisoned");
        match open.get(id) {
            Some((s, _)) if s == store || store.is_empty() => {
                let (_, task) = open.remove(id).expect("present");
                task.abort();
                true
            }
            _ => false,
        }
    }
}

/// A random UUID (version 4 layout), as daprd's subscription ids.
fn new_id() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_versions_split_as_contrib() {
        assert_eq!(parse("v2||2").value, "v2");
        assert_eq!(parse("v2||2").version, "2");
        assert_eq!(parse("plain").version, "");
        assert_eq!(parse("a||b||c").version, "b");
        assert_eq!(new_id().len(), 36);
    }
}
