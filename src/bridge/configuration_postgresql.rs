//! `configuration.postgresql` (alias `configuration.postgres`): configuration items in a
//! PostgreSQL table, read as daprd's store reads them (components-contrib
//! `configuration/postgres`). The user makes the table — `key`, `value`, `version` (text) and
//! `metadata` (json) — and a trigger that calls `pg_notify(<channel>, <json>)` with the changed
//! row under `data` (the Dapr docs' `notify_event()` sends `{"table", "action", "data"}`).
//!
//! A get reads the rows of the keys asked for (none: every row); a key with several rows is
//! the row with the highest numeric version, as daprd picks it. A subscription needs the
//! request metadata `pgNotifyChannel`: it opens a connection of its own, `LISTEN`s on the
//! channel and turns each notification whose `data.key` is watched (no keys: all) into a
//! change (`value`, `version`, `metadata` of the row — for a deleted row, the row as it was).
//! Requests come from [`super::configuration::ConfigurationStore`]; gets leave on the shared
//! pool of [`super::state_postgresql::pool`] (connects on first use; a database that is down
//! fails each call). A subscription whose connection breaks ends (logged; the app subscribes
//! again, as with daprd). Subscriptions are bounded by the component's `maxConns` (the pool's
//! size): each holds a `LISTEN` connection of its own besides the pool, so the component
//! opens at most twice `maxConns` connections; one more subscription fails at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{Semaphore, mpsc};

use super::components::Component;
use super::configuration::{CHANGES_BUFFERED, Changes, ConfigItem};
use super::postgresql_tls::PgTls;
use super::state_postgresql::{chain, client_config, pool_of};

/// A `configuration.postgresql` component.
pub struct PostgresConfiguration {
    pool: Pool,
    config: tokio_postgres::Config,
    /// For the `LISTEN` connection of a subscription.
    tls: PgTls,
    table: String,
    timeout: Duration,
    /// One permit per open subscription: as many as the pool's `maxConns`. A subscription's
    /// `LISTEN` connection is its own (the pool's connections drop notifications), so this
    /// bounds them apart from the pool.
    subscriptions: Arc<Semaphore>,
}

/// contrib's `allowedChars` for keys.
fn valid_key(key: &str) -> bool {
    key.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_'))
}

/// A channel name written into `LISTEN` (unquoted, as daprd writes it, so the server folds it
/// to lower case as daprd's does): letters, digits and `_`, not starting with a digit.
fn valid_channel(channel: &str) -> bool {
    !channel.is_empty()
        && channel.len() < 64
        && !channel.starts_with(|c: char| c.is_ascii_digit())
        && channel
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl PostgresConfiguration {
    /// The health probe: `SELECT 1` on the pool.
    pub async fn ping(&self) -> Result<(), String> {
        super::state_postgresql::pg_ping(&self.pool).await
    }

    pub fn open(c: &Component) -> Result<PostgresConfiguration, String> {
        let table = c
            .meta("table")
            .ok_or("expected metadata table (the configuration table's name), found none")?
            .to_string();
        // contrib's `allowedTableNameChars`, and PostgreSQL's identifier length.
        let ok = table.len() < 64
            && !table.starts_with(|c: char| c.is_ascii_digit())
            && table
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_'));
        if !ok {
            return Err(format!(
                "expected table as a lowercase table name of letters, digits and '_' (optionally schema.table), found {table:?}"
            ));
        }
        let (config, tls, timeout) = client_config(c)?;
        let pool = pool_of(
            c,
            config.clone(),
            tls.clone(),
            timeout,
            deadpool_postgres::RecyclingMethod::Fast,
        )?;
        let subscriptions = Arc::new(Semaphore::new(pool.status().max_size));
        Ok(PostgresConfiguration {
            pool,
            config,
            tls,
            table,
            timeout,
            subscriptions,
        })
    }

    /// The items of `keys` (none: every row); per key the row with the highest numeric version.
    pub async fn get(&self, keys: &[String]) -> Result<BTreeMap<String, ConfigItem>, String> {
        if let Some(bad) = keys.iter().find(|k| !valid_key(k)) {
            return Err(format!("invalid key : '{bad}'"));
        }
        let work = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| format!("postgresql: cannot connect: {}", chain(&e)))?;
            let mut sql = format!(
                "SELECT key::text, value::text, version::text, metadata::text FROM {}",
                self.table
            );
            if !keys.is_empty() {
                let params: Vec<String> = (1..=keys.len()).map(|i| format!("${i}")).collect();
                sql.push_str(&format!(" WHERE key IN ({})", params.join(", ")));
            }
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = keys
                .iter()
                .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            client
                .query(sql.as_str(), &params)
                .await
                .map_err(|e| format!("error in querying configuration store: {}", chain(&e)))
        };
        let rows = tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "postgresql: no answer within {}s",
                    self.timeout.as_secs()
                ))
            })?;
        let mut out: BTreeMap<String, ConfigItem> = BTreeMap::new();
        for row in rows {
            let key: Option<String> = row.get(0);
            let Some(key) = key else { continue };
            let item = ConfigItem {
                value: row.get::<_, Option<String>>(1).unwrap_or_default(),
                version: row.get::<_, Option<String>>(2).unwrap_or_default(),
                metadata: row
                    .get::<_, Option<String>>(3)
                    .map(|m| string_map(&serde_json::from_str(&m).unwrap_or_default()))
                    .unwrap_or_default(),
            };
            // A non-numeric version counts as -1 (contrib's getNumericVersion).
            let n = |v: &str| v.parse::<i64>().unwrap_or(-1);
            match out.get(&key) {
                Some(have) if n(&item.version) <= n(&have.version) => {}
                _ => {
                    out.insert(key, item);
                }
            }
        }
        Ok(out)
    }

    /// Listens on the request metadata's `pgNotifyChannel` (matched ignoring case, as daprd)
    /// and sends each change of `keys` (none: all) until the receiver is dropped or the
    /// connection breaks.
    pub async fn watch(
        &self,
        keys: Vec<String>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(Changes, tokio::task::JoinHandle<()>), String> {
        let channel = metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("pgNotifyChannel"))
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                format!(
                    "unable to subscribe to '{}'. pgNotifyChannel attribute cannot be empty",
                    self.table
                )
            })?;
        if !valid_channel(&channel) {
            return Err(format!(
                "expected pgNotifyChannel as a channel name of letters, digits and '_', found {channel:?}"
            ));
        }
        let Ok(permit) = self.subscriptions.clone().try_acquire_owned() else {
            return Err(format!(
                "postgresql: cannot subscribe: {} subscriptions are open on this component already (at most maxConns, each with a connection of its own); unsubscribe one, or raise maxConns",
                self.pool.status().max_size
            ));
        };
        let setup = async {
            let (client, mut connection) = super::postgresql_tls::connect(&self.config, &self.tls)
                .await
                .map_err(|e| format!("postgresql: cannot connect: {}", chain(&e)))?;
            // The connection is driven here until LISTEN is done, then by the watch's task.
            let command = format!("LISTEN {channel}");
            let mut early = Vec::new();
            {
                let listen = client.batch_execute(&command);
                tokio::pin!(listen);
                loop {
                    tokio::select! {
                        done = &mut listen => {
                            done.map_err(|e| format!("postgresql: cannot listen on {channel}: {}", chain(&e)))?;
                            break;
                        }
                        m = std::future::poll_fn(|cx| connection.poll_message(cx)) => match m {
                            Some(Ok(m)) => early.push(m),
                            Some(Err(e)) => return Err(format!("postgresql: {}", chain(&e))),
                            None => return Err("postgresql: the connection closed".into()),
                        },
                    }
                }
            }
            Ok::<_, String>((client, connection, early))
        };
        let (client, mut connection, early) = tokio::time::timeout(self.timeout, setup)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "postgresql: no answer to LISTEN within {}s",
                    self.timeout.as_secs()
                ))
            })?;
        let (tx, rx) = mpsc::channel(CHANGES_BUFFERED);
        let task = tokio::spawn(async move {
            // Dropping the client closes the connection: it lives as long as the watch, and
            // holds its place among the component's subscriptions.
            let _client = client;
            let _permit = permit;
            for m in early {
                if !forward(m, &keys, &tx).await {
                    return;
                }
            }
            loop {
                let m = tokio::select! {
                    _ = tx.closed() => return,
                    m = std::future::poll_fn(|cx| connection.poll_message(cx)) => m,
                };
                match m {
                    Some(Ok(m)) => {
                        if !forward(m, &keys, &tx).await {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %chain(&e), "configuration watch: the PostgreSQL connection broke; the subscription ends");
                        return;
                    }
                    None => {
                        tracing::warn!(
                            "configuration watch: the PostgreSQL connection closed; the subscription ends"
                        );
                        return;
                    }
                }
            }
        });
        Ok((rx, task))
    }
}

/// Sends the change a notification carries, when it is one of `keys` (none: all). False when
/// the receiver is gone.
async fn forward(
    m: tokio_postgres::AsyncMessage,
    keys: &[String],
    tx: &mpsc::Sender<BTreeMap<String, ConfigItem>>,
) -> bool {
    let tokio_postgres::AsyncMessage::Notification(n) = m else {
        return true;
    };
    let Some((key, item)) = change(n.payload()) else {
        // Not the payload itself: it may carry configuration values.
        tracing::info!(
            channel = %n.channel(),
            bytes = n.payload().len(),
            "configuration watch: a notification without data.key; ignored"
        );
        return true;
    };
    if !keys.is_empty() && !keys.contains(&key) {
        return true;
    }
    tx.send(BTreeMap::from([(key, item)])).await.is_ok()
}

/// The key and item of a notification's `data` row (field names matched ignoring case).
fn change(payload: &str) -> Option<(String, ConfigItem)> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let row = v.get("data")?.as_object()?;
    let mut key = None;
    let mut item = ConfigItem::default();
    for (k, v) in row {
        match k.to_ascii_lowercase().as_str() {
            "key" => key = Some(text(v)),
            "value" => item.value = text(v),
            "version" => item.version = text(v),
            "metadata" => item.metadata = string_map(v),
            _ => {}
        }
    }
    Some((key?, item))
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A JSON object's members as strings (anything else: empty).
fn string_map(v: &serde_json::Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), text(v))).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_read_as_daprd() {
        let (key, item) = change(
            r#"{"table": "config", "action": "UPDATE", "data": {"key": "a", "value": "1", "version": "2", "metadata": {"m": "x"}}}"#,
        )
        .unwrap();
        assert_eq!(key, "a");
        assert_eq!((item.value.as_str(), item.version.as_str()), ("1", "2"));
        assert_eq!(item.metadata.get("m").map(String::as_str), Some("x"));
        assert!(change(r#"{"data": {"value": "1"}}"#).is_none());
        assert!(change("not json").is_none());
        assert!(valid_channel("config_1") && !valid_channel("x; DROP TABLE t"));
        assert!(valid_key("a.b/c_d") && !valid_key("a'b"));
    }
}
