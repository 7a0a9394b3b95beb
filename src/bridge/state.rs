//! State stores behind `/v1.0/state/{store}`: `state.in-memory`, `state.sqlite` (rusqlite,
//! bundled, WAL; calls run on the blocking pool) and `state.redis` (a hash per key with `data`
//! and `version` fields, written by Lua scripts that check ETags, as Dapr's Redis store lays
//! data out). ETags are versions: decimal integers, incremented on every write.
//!
//! Keys arrive already prefixed (`appid||key`, see [`KeyPrefix`]). Every write goes through
//! [`Store::apply`], a list of operations applied atomically after all ETag checks pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::components::Component;

/// How keys are prefixed in the store (`keyPrefix` metadata).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPrefix {
    /// `appid||key` (Dapr's default).
    AppId(String),
    /// `storename||key`.
    Name(String),
    /// The key as given.
    None,
    /// `custom||key`.
    Custom(String),
}

impl KeyPrefix {
    pub fn from_component(c: &Component, app_id: &str) -> KeyPrefix {
        match c.meta("keyPrefix").unwrap_or("appid") {
            "appid" => KeyPrefix::AppId(app_id.to_string()),
            "name" => KeyPrefix::Name(c.name.clone()),
            "none" => KeyPrefix::None,
            other => KeyPrefix::Custom(other.to_string()),
        }
    }

    /// The key as stored.
    pub fn apply(&self, key: &str) -> String {
        match self {
            KeyPrefix::AppId(p) | KeyPrefix::Name(p) | KeyPrefix::Custom(p) => {
                format!("{p}||{key}")
            }
            KeyPrefix::None => key.to_string(),
        }
    }
}

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("possible etag mismatch: the etag of key {0:?} does not match")]
    EtagMismatch(String),
    #[error("invalid etag value: expected a version number, found {0:?}")]
    EtagInvalid(String),
    #[error("{0}")]
    Store(String),
}

/// An ETag check: the version the caller last read.
pub type Etag = Option<u64>;

/// Parses a caller's ETag: versions are decimal integers.
pub fn parse_etag(s: &str) -> Result<u64, StateError> {
    s.trim_matches('"')
        .parse()
        .map_err(|_| StateError::EtagInvalid(s.to_string()))
}

/// One write.
#[derive(Clone, Debug)]
pub enum Op {
    Upsert {
        key: String,
        value: Bytes,
        etag: Etag,
    },
    Delete {
        key: String,
        etag: Etag,
    },
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Upsert { key, .. } | Op::Delete { key, .. } => key,
        }
    }
    fn etag(&self) -> Etag {
        match self {
            Op::Upsert { etag, .. } | Op::Delete { etag, .. } => *etag,
        }
    }
}

/// A configured state store.
pub enum Store {
    Memory(Mutex<HashMap<String, (Bytes, u64)>>),
    Sqlite(Arc<Sqlite>),
    Redis(Box<Redis>),
}

impl Store {
    /// Opens the store a component describes. SQLite opens its file now; Redis connects on
    /// first use (so the sidecar starts while Redis is still coming up).
    pub fn open(c: &Component) -> Result<Store, String> {
        match c.kind.as_str() {
            "state.in-memory" => Ok(Store::Memory(Mutex::new(HashMap::new()))),
            "state.sqlite" => Ok(Store::Sqlite(Arc::new(Sqlite::open(c)?))),
            "state.redis" => Ok(Store::Redis(Box::new(Redis::new(c)?))),
            other => Err(format!("{other} is not a state store type")),
        }
    }

    /// The value and its ETag, or None.
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>, StateError> {
        match self {
            Store::Memory(m) => Ok(m.lock().expect("not poisoned").get(key).cloned()),
            Store::Sqlite(s) => {
                let s = s.clone();
                let key = key.to_string();
                blocking(move || s.get(&key)).await
            }
            Store::Redis(r) => r.get(key).await,
        }
    }

    /// Applies every operation, or none: all ETag checks pass first.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        match self {
            Store::Memory(m) => {
                let mut map = m.lock().expect("not poisoned");
                for op in &ops {
                    if let Some(want) = op.etag()
                        && map.get(op.key()).map(|(_, v)| *v) != Some(want)
                    {
                        return Err(StateError::EtagMismatch(op.key().to_string()));
                    }
                }
                for op in ops {
                    match op {
                        Op::Upsert { key, value, .. } => {
                            let next = map.get(&key).map_or(1, |(_, v)| v + 1);
                            map.insert(key, (value, next));
                        }
                        Op::Delete { key, .. } => {
                            map.remove(&key);
                        }
                    }
                }
                Ok(())
            }
            Store::Sqlite(s) => {
                let s = s.clone();
                blocking(move || s.apply(ops)).await
            }
            Store::Redis(r) => r.apply(ops).await,
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Store(format!("the store call failed: {e}")))?
}

/// `state.sqlite`: one table `(key TEXT PRIMARY KEY, value BLOB, version INTEGER)`.
pub struct Sqlite {
    conn: Mutex<rusqlite::Connection>,
    table: String,
}

/// What `connectionString` defaults to: a file in the working directory.
pub const DEFAULT_SQLITE_FILE: &str = "outrigger-state.db";

impl Sqlite {
    fn open(c: &Component) -> Result<Sqlite, String> {
        let target = c
            .meta("connectionString")
            .unwrap_or(DEFAULT_SQLITE_FILE)
            .to_string();
        let table = c.meta("tableName").unwrap_or("state").to_string();
        if table.is_empty()
            || !table
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        {
            return Err(format!(
                "expected tableName of letters, digits and '_', found {table:?}"
            ));
        }
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
            | rusqlite::OpenFlags::SQLITE_OPEN_URI
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(&target, flags)
            .map_err(|e| format!("cannot open the SQLite database {target:?}: {e}"))?;
        let setup = format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS {table} (key TEXT NOT NULL PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL);"
        );
        conn.execute_batch(&setup)
            .map_err(|e| format!("cannot prepare the SQLite database {target:?}: {e}"))?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            table,
        })
    }

    fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>, StateError> {
        let conn = self.conn.lock().expect("not poisoned");
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT value, version FROM {} WHERE key = ?1",
                self.table
            ))
            .map_err(sql)?;
        let mut rows = stmt.query([key]).map_err(sql)?;
        match rows.next().map_err(sql)? {
            Some(row) => {
                let value: Vec<u8> = row.get(0).map_err(sql)?;
                let version: i64 = row.get(1).map_err(sql)?;
                Ok(Some((Bytes::from(value), version as u64)))
            }
            None => Ok(None),
        }
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StateError> {
        let mut conn = self.conn.lock().expect("not poisoned");
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        // Every ETag is checked against the state before the transaction, as the other
        // stores do, and only then is anything written (so a key touched twice is checked
        // twice against the same version, not against the first write's result).
        for op in &ops {
            let Some(want) = op.etag() else { continue };
            let current: Option<i64> = tx
                .prepare_cached(&format!(
                    "SELECT version FROM {} WHERE key = ?1",
                    self.table
                ))
                .map_err(sql)?
                .query_row([op.key()], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
                .map_err(sql)?;
            if current != Some(want as i64) {
                // Dropping the transaction rolls it back.
                return Err(StateError::EtagMismatch(op.key().to_string()));
            }
        }
        for op in &ops {
            match op {
                Op::Upsert { key, value, .. } => {
                    tx.prepare_cached(&format!(
                        "INSERT INTO {} (key, value, version) VALUES (?1, ?2, 1)
                         ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = version + 1",
                        self.table
                    ))
                    .map_err(sql)?
                    .execute(rusqlite::params![key, value.as_ref()])
                    .map_err(sql)?;
                }
                Op::Delete { key, .. } => {
                    tx.prepare_cached(&format!("DELETE FROM {} WHERE key = ?1", self.table))
                        .map_err(sql)?
                        .execute([key])
                        .map_err(sql)?;
                }
            }
        }
        tx.commit().map_err(sql)
    }
}

fn sql(e: rusqlite::Error) -> StateError {
    StateError::Store(format!("sqlite: {e}"))
}

/// How long connecting to Redis may take (daprd's `dialTimeout` default is 5 s).
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a Redis command may wait for its answer before the call fails with 500.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// `state.redis`: `HSET key data <value> version <n>`, like Dapr's Redis store.
pub struct Redis {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    apply: redis::Script,
}

/// Checks every ETag, then applies every operation: one script, so atomic. ARGV: the number
/// of operations, then for each: kind (`u`/`d`), expected version (empty: no check), value.
const APPLY_SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
for i = 1, n do
  local want = ARGV[(i - 1) * 3 + 3]
  if want ~= "" then
    local cur = redis.call("HGET", KEYS[i], "version")
    if (not cur) or cur ~= want then
      return redis.error_reply("ETAGMISMATCH " .. i)
    end
  end
end
for i = 1, n do
  local base = (i - 1) * 3 + 2
  if ARGV[base] == "u" then
    redis.call("HSET", KEYS[i], "data", ARGV[base + 2])
    redis.call("HINCRBY", KEYS[i], "version", 1)
  else
    redis.call("DEL", KEYS[i])
  end
end
return n
"#;

impl Redis {
    fn new(c: &Component) -> Result<Redis, String> {
        use redis::IntoConnectionInfo;
        let host = c
            .meta("redisHost")
            .ok_or("expected metadata redisHost (host:port), found none")?;
        let (h, port) = host
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("expected redisHost as host:port, found {host:?}"))?;
        let db: i64 = match c.meta("redisDB") {
            Some(v) => v
                .parse()
                .map_err(|_| format!("expected redisDB as a number, found {v:?}"))?,
            None => 0,
        };
        if c.meta("enableTLS") == Some("true") {
            return Err("enableTLS is not supported by the bridge's Redis store".into());
        }
        let mut settings = redis::RedisConnectionInfo::default().set_db(db);
        if let Some(p) = c.meta("redisPassword") {
            settings = settings.set_password(p);
        }
        if let Some(u) = c.meta("redisUsername") {
            settings = settings.set_username(u);
        }
        let info = (h.to_string(), port)
            .into_connection_info()
            .map_err(|e| format!("invalid redisHost {host:?}: {e}"))?
            .set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| e.to_string())?;
        Ok(Redis {
            client,
            conn: tokio::sync::OnceCell::new(),
            apply: redis::Script::new(APPLY_SCRIPT),
        })
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, StateError> {
        // The client's defaults retry a refused or unauthenticated connection 6 times with
        // backoff: every call to a down store waited 9.4 s for its 500. Fail fast instead; the
        // next call tries again, and a store that comes back is used at once.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
            .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT));
        self.conn
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
            .map_err(|e| StateError::Store(format!("redis: {e}")))
    }

    async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>, StateError> {
        let mut conn = self.conn().await?;
        let (data, version): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
            .arg(key)
            .arg("data")
            .arg("version")
            .query_async(&mut conn)
            .await
            .map_err(|e| StateError::Store(format!("redis: {e}")))?;
        Ok(data.map(|d| {
            (
                Bytes::from(d),
                version.and_then(|v| v.parse().ok()).unwrap_or(0),
            )
        }))
    }

    async fn apply(&self, ops: Vec<Op>) -> Result<(), StateError> {
        let mut conn = self.conn().await?;
        let mut inv = self.apply.prepare_invoke();
        inv.arg(ops.len());
        for op in &ops {
            inv.key(op.key());
            match op {
                Op::Upsert { value, etag, .. } => {
                    inv.arg("u")
                        .arg(etag.map(|e| e.to_string()).unwrap_or_default())
                        .arg(value.as_ref());
                }
                Op::Delete { etag, .. } => {
                    inv.arg("d")
                        .arg(etag.map(|e| e.to_string()).unwrap_or_default())
                        .arg("");
                }
            }
        }
        match inv.invoke_async::<i64>(&mut conn).await {
            Ok(_) => Ok(()),
            // The script's error reply is `ETAGMISMATCH <i>`: the code, then the 1-based index
            // of the operation whose ETag did not match (its text form is not "CODE detail").
            Err(e) if e.code() == Some("ETAGMISMATCH") => {
                let i: usize = e.detail().and_then(|d| d.trim().parse().ok()).unwrap_or(1);
                let key = ops.get(i.saturating_sub(1)).map_or("", |o| o.key());
                Err(StateError::EtagMismatch(key.to_string()))
            }
            Err(e) => Err(StateError::Store(format!("redis: {e}"))),
        }
    }
}
