//! State stores behind `/v1.0/state/{store}`: `state.in-memory`, `state.sqlite` (rusqlite,
//! bundled, WAL; calls run on the blocking pool), `state.redis` (a hash per key with `data`
//! and `version` fields, written by Lua scripts that check ETags, as Dapr's Redis store lays
//! data out) and `state.postgresql` ([`super::state_postgresql`], daprd's v1 table). ETags are versions: decimal integers, incremented on every write.
//!
//! Keys arrive already prefixed (`appid||key`, see [`KeyPrefix`]). Every write goes through
//! [`Store::apply`], a list of operations applied atomically, in order: each ETag is checked
//! against the state the earlier operations leave, and one mismatch applies nothing.
//!
//! A save may carry a time to live (`ttlInSeconds`): Redis expires the hash (`EXPIRE`, and
//! `PERSIST` on a later save without one), SQLite keeps a deadline column filtered on read and
//! deleted now and then, memory keeps a deadline checked on read and swept on writes. An expired
//! value is gone for every purpose: reads, ETag checks, versions (a new write starts at 1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    /// `ttlInSeconds` is not an integer of -1 or more (400, as a bad ETag).
    #[error("incorrect value for metadata 'ttlInSeconds': {0}")]
    TtlInvalid(String),
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

/// `ttlInSeconds` as daprd's stores read it (components-contrib `state/utils.ParseTTL`):
/// absent or empty, none; otherwise an integer from -1 to 2^31-1. Returns the seconds after
/// which the value expires: None for no expiry (also for 0 and -1, "never", which clear an
/// earlier expiry).
pub fn parse_ttl(value: Option<&str>) -> Result<Option<u32>, StateError> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let n: i64 = v.parse().map_err(|_| {
        StateError::TtlInvalid(format!(
            "expected an integer number of seconds (-1: never expires), found {v:?}"
        ))
    })?;
    if !(-1..=i64::from(i32::MAX)).contains(&n) {
        return Err(StateError::TtlInvalid(format!(
            "must be -1 or greater (and at most {}), found {n}",
            i32::MAX
        )));
    }
    Ok(u32::try_from(n).ok().filter(|&n| n > 0))
}

/// A stored value: its bytes, its version (the ETag) and when it expires, if it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub version: u64,
    pub expires: Option<SystemTime>,
}

impl Entry {
    /// The response metadata daprd returns with a value: `ttlExpireTime` (RFC 3339, UTC, whole
    /// seconds) when it expires.
    pub fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        self.expires
            .map(|t| {
                (
                    "ttlExpireTime".to_string(),
                    humantime::format_rfc3339_seconds(t).to_string(),
                )
            })
            .into_iter()
            .collect()
    }
}

/// One write.
#[derive(Clone, Debug)]
pub enum Op {
    Upsert {
        key: String,
        value: Bytes,
        etag: Etag,
        /// Seconds to live; None: never expires (an earlier expiry is cleared).
        ttl: Option<u32>,
        /// The value is JSON text (an HTTP save) rather than raw bytes (gRPC): PostgreSQL
        /// stores JSON as is and raw bytes base64-encoded with `isbinary`, as daprd does.
        json: bool,
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

/// How often, at most, a write to the in-memory store sweeps out expired values (reads skip
/// them anyway): sweeping costs a pass over the map, and values only accumulate through writes,
/// so sweeping on writes bounds the map by what one period writes plus what is live.
const MEMORY_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// `state.in-memory`: values with their version and deadline.
pub struct Memory {
    entries: HashMap<String, MemoryEntry>,
    next_sweep: Instant,
}

struct MemoryEntry {
    value: Bytes,
    version: u64,
    deadline: Option<Instant>,
}

impl MemoryEntry {
    fn live(&self, now: Instant) -> bool {
        self.deadline.is_none_or(|d| d > now)
    }
}

impl Memory {
    fn new() -> Memory {
        Memory {
            entries: HashMap::new(),
            next_sweep: Instant::now() + MEMORY_SWEEP_INTERVAL,
        }
    }

    fn get(&mut self, key: &str, now: Instant) -> Option<Entry> {
        match self.entries.get(key) {
            Some(e) if e.live(now) => Some(Entry {
                value: e.value.clone(),
                version: e.version,
                expires: e.deadline.map(|d| SystemTime::now() + (d - now)),
            }),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn version(&self, key: &str, now: Instant) -> Option<u64> {
        self.entries
            .get(key)
            .filter(|e| e.live(now))
            .map(|e| e.version)
    }

    fn apply(&mut self, ops: Vec<Op>, now: Instant) -> Result<(), StateError> {
        // In order, each ETag against the version the earlier operations left (none written
        // until every check passed).
        let mut after: HashMap<&str, Option<u64>> = HashMap::new();
        for op in &ops {
            let current = match after.get(op.key()) {
                Some(v) => *v,
                None => self.version(op.key(), now),
            };
            if let Some(want) = op.etag()
                && current != Some(want)
            {
                return Err(StateError::EtagMismatch(op.key().to_string()));
            }
            let next = match op {
                Op::Upsert { .. } => Some(current.map_or(1, |v| v + 1)),
                Op::Delete { .. } => None,
            };
            after.insert(op.key(), next);
        }
        for op in ops {
            match op {
                Op::Upsert {
                    key, value, ttl, ..
                } => {
                    let version = self.version(&key, now).map_or(1, |v| v + 1);
                    let deadline = ttl.map(|s| now + Duration::from_secs(u64::from(s)));
                    self.entries.insert(
                        key,
                        MemoryEntry {
                            value,
                            version,
                            deadline,
                        },
                    );
                }
                Op::Delete { key, .. } => {
                    self.entries.remove(&key);
                }
            }
        }
        if now >= self.next_sweep {
            self.sweep(now);
        }
        Ok(())
    }

    /// Drops every expired value.
    fn sweep(&mut self, now: Instant) {
        self.entries.retain(|_, e| e.live(now));
        self.next_sweep = now + MEMORY_SWEEP_INTERVAL;
    }
}

/// A configured state store.
pub enum Store {
    Memory(Mutex<Memory>),
    Sqlite(Arc<Sqlite>),
    Redis(Box<Redis>),
    Postgres(Box<super::state_postgresql::Postgres>),
}

impl Store {
    /// Opens the store a component describes. SQLite opens its file now; Redis connects on
    /// first use (so the sidecar starts while Redis is still coming up).
    pub fn open(c: &Component) -> Result<Store, String> {
        match c.kind.as_str() {
            "state.in-memory" => Ok(Store::Memory(Mutex::new(Memory::new()))),
            "state.sqlite" => Ok(Store::Sqlite(Arc::new(Sqlite::open(c)?))),
            "state.redis" => Ok(Store::Redis(Box::new(Redis::new(c)?))),
            "state.postgresql" | "state.postgres" => Ok(Store::Postgres(Box::new(
                super::state_postgresql::Postgres::new(c)?,
            ))),
            other => Err(format!("{other} is not a state store type")),
        }
    }

    /// Checks a component's metadata without opening anything (no file is created, no
    /// connection made): for the preflight stage, so `outrigger check` reports it.
    pub fn check(c: &Component) -> Result<(), String> {
        match c.kind.as_str() {
            "state.in-memory" => Ok(()),
            "state.sqlite" => Sqlite::table_name(c).map(drop),
            "state.redis" => Redis::new(c).map(drop),
            "state.postgresql" | "state.postgres" => super::state_postgresql::Postgres::check(c),
            other => Err(format!("{other} is not a state store type")),
        }
    }

    /// The value, its ETag and expiry, or None (also when it has expired).
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, StateError> {
        match self {
            Store::Memory(m) => Ok(m.lock().expect("not poisoned").get(key, Instant::now())),
            Store::Sqlite(s) => {
                let s = s.clone();
                let key = key.to_string();
                blocking(move || s.get(&key)).await
            }
            Store::Redis(r) => r.get(key).await,
            Store::Postgres(p) => p.get(key).await,
        }
    }

    /// The health probe ([`super::health`]); None for the stores in this process.
    pub fn ping(&self) -> Option<super::pubsub::broker::BoxFuture<'_, Result<(), String>>> {
        match self {
            Store::Memory(_) | Store::Sqlite(_) => None,
            Store::Redis(r) => Some(Box::pin(redis_ping(&r.client, &r.conn))),
            Store::Postgres(p) => Some(Box::pin(p.ping())),
        }
    }

    /// Applies every operation in order, or none: one ETag mismatch (checked against the state
    /// the earlier operations leave) applies nothing.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        match self {
            Store::Memory(m) => m.lock().expect("not poisoned").apply(ops, Instant::now()),
            Store::Sqlite(s) => {
                let s = s.clone();
                blocking(move || s.apply(ops)).await
            }
            Store::Redis(r) => r.apply(ops).await,
            Store::Postgres(p) => p.apply(ops).await,
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

/// `state.sqlite`: one table `(key TEXT PRIMARY KEY, value BLOB, version INTEGER,
/// expires_at INTEGER)`, `expires_at` in Unix milliseconds (NULL: never).
pub struct Sqlite {
    conn: Mutex<rusqlite::Connection>,
    table: String,
    /// When a write next deletes the expired rows.
    next_cleanup: Mutex<Instant>,
}

/// How often, at most, a write deletes expired SQLite rows (reads filter them anyway; daprd's
/// `cleanupInterval` default is the same hour).
const SQLITE_CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);

/// Unix milliseconds.
fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What `connectionString` defaults to: a file in the working directory.
pub const DEFAULT_SQLITE_FILE: &str = "outrigger-state.db";

impl Sqlite {
    /// `tableName` (default `state`), which is written into SQL: letters, digits and `_` only.
    fn table_name(c: &Component) -> Result<String, String> {
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
        Ok(table)
    }

    fn open(c: &Component) -> Result<Sqlite, String> {
        let target = c
            .meta("connectionString")
            .unwrap_or(DEFAULT_SQLITE_FILE)
            .to_string();
        let table = Sqlite::table_name(c)?;
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
            | rusqlite::OpenFlags::SQLITE_OPEN_URI
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(&target, flags)
            .map_err(|e| format!("cannot open the SQLite database {target:?}: {e}"))?;
        let setup = format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS {table} (key TEXT NOT NULL PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL, expires_at INTEGER);"
        );
        let prepare =
            |e: rusqlite::Error| format!("cannot prepare the SQLite database {target:?}: {e}");
        conn.execute_batch(&setup).map_err(prepare)?;
        // A table made before values could expire gets the column (NULL: never expires).
        let has_expiry: bool = conn
            .query_row(
                &format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = 'expires_at'"),
                [],
                |r| r.get(0),
            )
            .map_err(prepare)?;
        if !has_expiry {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN expires_at INTEGER;"
            ))
            .map_err(prepare)?;
        }
        conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at) WHERE expires_at IS NOT NULL;"
        ))
        .map_err(prepare)?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            table,
            // The first write cleans up what expired while the sidecar was down.
            next_cleanup: Mutex::new(Instant::now()),
        })
    }

    fn get(&self, key: &str) -> Result<Option<Entry>, StateError> {
        let conn = self.conn.lock().expect("not poisoned");
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT value, version, expires_at FROM {} WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                self.table
            ))
            .map_err(sql)?;
        let mut rows = stmt
            .query(rusqlite::params![key, unix_ms(SystemTime::now())])
            .map_err(sql)?;
        match rows.next().map_err(sql)? {
            Some(row) => {
                let value: Vec<u8> = row.get(0).map_err(sql)?;
                let version: i64 = row.get(1).map_err(sql)?;
                let expires: Option<i64> = row.get(2).map_err(sql)?;
                Ok(Some(Entry {
                    value: Bytes::from(value),
                    version: version as u64,
                    expires: expires
                        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)),
                }))
            }
            None => Ok(None),
        }
    }

    fn apply(&self, ops: Vec<Op>) -> Result<(), StateError> {
        let mut conn = self.conn.lock().expect("not poisoned");
        let now = SystemTime::now();
        let now_ms = unix_ms(now);
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        // In order: each ETag is checked against the state the earlier operations of the
        // transaction left (as daprd's transactional stores run them); a mismatch drops the
        // transaction, which rolls back everything written.
        for op in &ops {
            if let Some(want) = op.etag() {
                let current: Option<i64> = tx
                    .prepare_cached(&format!(
                        "SELECT version FROM {} WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                        self.table
                    ))
                    .map_err(sql)?
                    .query_row(rusqlite::params![op.key(), now_ms], |r| r.get(0))
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(e),
                    })
                    .map_err(sql)?;
                if current != Some(want as i64) {
                    return Err(StateError::EtagMismatch(op.key().to_string()));
                }
            }
            match op {
                Op::Upsert {
                    key, value, ttl, ..
                } => {
                    // An expired row counts as absent: the new value starts again at version 1.
                    let expires_at = ttl.map(|s| unix_ms(now + Duration::from_secs(u64::from(s))));
                    tx.prepare_cached(&format!(
                        "INSERT INTO {} (key, value, version, expires_at) VALUES (?1, ?2, 1, ?3)
                         ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                           version = CASE WHEN expires_at IS NOT NULL AND expires_at <= ?4 THEN 1 ELSE version + 1 END,
                           expires_at = excluded.expires_at",
                        self.table
                    ))
                    .map_err(sql)?
                    .execute(rusqlite::params![key, value.as_ref(), expires_at, now_ms])
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
        let mut next_cleanup = self.next_cleanup.lock().expect("not poisoned");
        if Instant::now() >= *next_cleanup {
            tx.prepare_cached(&format!(
                "DELETE FROM {} WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                self.table
            ))
            .map_err(sql)?
            .execute([now_ms])
            .map_err(sql)?;
            *next_cleanup = Instant::now() + SQLITE_CLEANUP_INTERVAL;
        }
        tx.commit().map_err(sql)
    }
}

fn sql(e: rusqlite::Error) -> StateError {
    StateError::Store(format!("sqlite: {e}"))
}

/// How long connecting to Redis may take (daprd's `dialTimeout` default is 5 s).
pub(crate) const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a Redis command may wait for its answer before the call fails with 500.
pub(crate) const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// `state.redis`: `HSET key data <value> version <n>`, like Dapr's Redis store.
pub struct Redis {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    apply: redis::Script,
}

/// Checks every ETag in order, each against the version the earlier operations leave (worked
/// out, not written: a script's writes are not undone by a later error), then applies every
/// operation: one script, so atomic, and nothing written when a check fails. ARGV: the number
/// of operations, then for each: kind (`u`/`d`), expected version (empty: no check), value,
/// seconds to live (empty: never expires, and an earlier expiry is cleared, as daprd's
/// `PERSIST`). KEYS: one per operation.
const APPLY_SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
local after = {}
for i = 1, n do
  local base = (i - 1) * 4 + 2
  local cur = after[KEYS[i]]
  if cur == nil then
    cur = tonumber(redis.call("HGET", KEYS[i], "version") or "") or false
  end
  local want = ARGV[base + 1]
  if want ~= "" and ((not cur) or cur ~= tonumber(want)) then
    return redis.error_reply("ETAGMISMATCH " .. i)
  end
  if ARGV[base] == "u" then
    after[KEYS[i]] = (cur or 0) + 1
  else
    after[KEYS[i]] = false
  end
end
for i = 1, n do
  local base = (i - 1) * 4 + 2
  if ARGV[base] == "u" then
    redis.call("HSET", KEYS[i], "data", ARGV[base + 2])
    redis.call("HINCRBY", KEYS[i], "version", 1)
    if ARGV[base + 3] ~= "" then
      redis.call("EXPIRE", KEYS[i], ARGV[base + 3])
    else
      redis.call("PERSIST", KEYS[i])
    end
  else
    redis.call("DEL", KEYS[i])
  end
end
return n
"#;

/// A Redis client for a component's `redisHost`, `redisPassword`, `redisUsername`,
/// `redisDB` and TLS keys ([`redis_tls`]) (shared by the Redis state, lock, configuration
/// stores and the Redis binding). Connects nothing.
pub(crate) fn redis_client(c: &Component) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    let host = c
        .meta("redisHost")
        .ok_or("expected metadata redisHost (host:port), found none")?;
    if host.starts_with("rediss://") || host.starts_with("redis://") {
        return Err(format!(
            "expected redisHost as host:port (a URL is not taken, as by daprd; TLS is a key of its own), found {host:?}"
        ));
    }
    let (h, port) = host
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("expected redisHost as host:port, found {host:?}"))?;
    let db: i64 = redis_db(c)?;
    let tls = redis_tls(|k| c.meta(k)).map_err(|p| p.to_string())?;
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
    redis_open(info, tls.as_ref()).map_err(|e| format!("invalid redisHost {host:?}: {e}"))
}

/// TLS to Redis as Dapr's Redis components take it: `enableTLS`, then the server's
/// certificate checked against the system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` name
/// others) and for the `redisHost` name, unless `insecureSkipTLSVerify`; `clientCert` and
/// `clientKey` (PEM text) for a server that asks for a client certificate.
pub(crate) struct RedisTls {
    insecure: bool,
    client: Option<redis::ClientTlsConfig>,
}

/// A metadata key that is wrong, what it should be and what it is (each caller words the
/// message its way).
#[derive(Debug)]
pub(crate) struct MetaProblem {
    pub key: &'static str,
    pub expected: String,
    pub found: String,
}

impl std::fmt::Display for MetaProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "metadata {}: expected {}, found {:?}",
            self.key, self.expected, self.found
        )
    }
}

/// A boolean as daprd decodes metadata (Go's `strconv.ParseBool`).
fn go_bool(key: &'static str, v: Option<&str>) -> Result<bool, MetaProblem> {
    match v.map(str::trim) {
        None | Some("") => Ok(false),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(MetaProblem {
            key,
            expected: "true or false".into(),
            found: other.to_string(),
        }),
    }
}

/// The TLS keys of a Redis component (`get` reads its metadata); None: plain TCP. The client
/// certificate and key are parsed and matched now, so `outrigger check` reports them.
pub(crate) fn redis_tls<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<RedisTls>, MetaProblem> {
    let enabled = go_bool("enableTLS", get("enableTLS"))?;
    let insecure = go_bool("insecureSkipTLSVerify", get("insecureSkipTLSVerify"))?;
    let cert = get("clientCert").filter(|v| !v.trim().is_empty());
    let key = get("clientKey").filter(|v| !v.trim().is_empty());
    if !enabled {
        // daprd ignores these without TLS; a certificate that is never sent is a mistake.
        for (k, set) in [
            ("clientCert", cert.is_some()),
            ("clientKey", key.is_some()),
            ("insecureSkipTLSVerify", insecure),
        ] {
            if set {
                return Err(MetaProblem {
                    key: k,
                    expected: "nothing while TLS is off (it is used with TLS only)".into(),
                    found: "a value".into(),
                });
            }
        }
        return Ok(None);
    }
    let client = match (cert, key) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            // Named by the key that is there: its line is the one shown.
            let (given, missing) = if cert.is_none() {
                ("clientKey", "clientCert")
            } else {
                ("clientCert", "clientKey")
            };
            return Err(MetaProblem {
                key: given,
                expected: "clientCert and clientKey together".into(),
                found: format!("no {missing}"),
            });
        }
        (Some(cert), Some(key)) => {
            use crate::tls::{Pem, pem_certified_key, pem_certs, pem_key};
            let cert_pem = Pem::Text {
                pem: cert.to_string(),
                key: "clientCert",
            };
            let key_pem = Pem::Text {
                pem: key.to_string(),
                key: "clientKey",
            };
            fn problem(
                key: &'static str,
                expected: &'static str,
            ) -> impl Fn(crate::tls::TlsError) -> MetaProblem {
                move |e| MetaProblem {
                    key,
                    expected: expected.into(),
                    found: e.to_string(),
                }
            }
            pem_certs(&cert_pem).map_err(problem("clientCert", "a PEM certificate"))?;
            pem_key(&key_pem).map_err(problem("clientKey", "a PEM private key"))?;
            // Messages name one key only: the line shown is that key's.
            pem_certified_key(&cert_pem, &key_pem).map_err(|e| MetaProblem {
                key: "clientKey",
                expected: "the private key of the client certificate".into(),
                found: match e {
                    crate::tls::TlsError::KeyMismatch { .. } => "another key".into(),
                    e => e.to_string(),
                },
            })?;
            Some(redis::ClientTlsConfig {
                client_cert: cert.as_bytes().to_vec(),
                client_key: key.as_bytes().to_vec(),
            })
        }
    };
    Ok(Some(RedisTls { insecure, client }))
}

/// A client for `info`, over TLS when `tls` says so. The redis crate makes the rustls config
/// for each connection itself (on the process provider, aws-lc-rs).
pub(crate) fn redis_open(
    info: redis::ConnectionInfo,
    tls: Option<&RedisTls>,
) -> redis::RedisResult<redis::Client> {
    let Some(tls) = tls else {
        return redis::Client::open(info);
    };
    let info = match info.addr().clone() {
        redis::ConnectionAddr::Tcp(host, port) => info.set_addr(redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: tls.insecure,
            tls_params: None,
        }),
        _ => info,
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: tls.client.clone(),
            root_cert: None,
        },
    )
}

/// `redisDB` (default 0).
pub(crate) fn redis_db(c: &Component) -> Result<i64, String> {
    match c.meta("redisDB") {
        Some(v) => v
            .parse()
            .map_err(|_| format!("expected redisDB as a number, found {v:?}")),
        None => Ok(0),
    }
}

/// The shared connection of a Redis component, made on first use. The client's defaults
/// retry a refused or unauthenticated connection 6 times with backoff: every call to a down
/// store waited 9.4 s for its 500. This fails fast instead; the next call tries again, and a
/// store that comes back is used at once.
pub(crate) async fn redis_connection(
    client: &redis::Client,
    cell: &tokio::sync::OnceCell<redis::aio::ConnectionManager>,
) -> Result<redis::aio::ConnectionManager, String> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT));
    cell.get_or_try_init(|| client.get_connection_manager_with_config(config))
        .await
        .cloned()
        .map_err(|e| format!("redis: {e}"))
}

/// A `PING` on a component's Redis connection (connecting when there is none): the health
/// probe of every Redis-backed component ([`super::health`]).
pub(crate) async fn redis_ping(
    client: &redis::Client,
    cell: &tokio::sync::OnceCell<redis::aio::ConnectionManager>,
) -> Result<(), String> {
    let mut conn = redis_connection(client, cell).await?;
    redis::cmd("PING")
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("redis: {e}"))
}

impl Redis {
    fn new(c: &Component) -> Result<Redis, String> {
        Ok(Redis {
            client: redis_client(c)?,
            conn: tokio::sync::OnceCell::new(),
            apply: redis::Script::new(APPLY_SCRIPT),
        })
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, StateError> {
        redis_connection(&self.client, &self.conn)
            .await
            .map_err(StateError::Store)
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StateError> {
        let mut conn = self.conn().await?;
        // The value and its time to live at once (PTTL: -1 without an expiry).
        let ((data, version), pttl): ((Option<Vec<u8>>, Option<String>), i64) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(key)
            .arg("data")
            .arg("version")
            .cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| StateError::Store(format!("redis: {e}")))?;
        let expires = u64::try_from(pttl)
            .ok()
            .map(|ms| SystemTime::now() + Duration::from_millis(ms));
        Ok(data.map(|d| Entry {
            value: Bytes::from(d),
            version: version.and_then(|v| v.parse().ok()).unwrap_or(0),
            expires,
        }))
    }

    async fn apply(&self, ops: Vec<Op>) -> Result<(), StateError> {
        let mut conn = self.conn().await?;
        let mut inv = self.apply.prepare_invoke();
        inv.arg(ops.len());
        for op in &ops {
            inv.key(op.key());
            match op {
                Op::Upsert {
                    value, etag, ttl, ..
                } => {
                    inv.arg("u")
                        .arg(etag.map(|e| e.to_string()).unwrap_or_default())
                        .arg(value.as_ref())
                        .arg(ttl.map(|s| s.to_string()).unwrap_or_default());
                }
                Op::Delete { etag, .. } => {
                    inv.arg("d")
                        .arg(etag.map(|e| e.to_string()).unwrap_or_default())
                        .arg("")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(key: &str, ttl: Option<u32>) -> Op {
        Op::Upsert {
            key: key.into(),
            value: Bytes::from_static(b"1"),
            etag: None,
            ttl,
            json: true,
        }
    }

    #[test]
    fn ttls_parse_as_daprs_stores_read_them() {
        assert_eq!(parse_ttl(None).unwrap(), None);
        assert_eq!(parse_ttl(Some("")).unwrap(), None);
        assert_eq!(parse_ttl(Some("5")).unwrap(), Some(5));
        assert_eq!(parse_ttl(Some("0")).unwrap(), None);
        assert_eq!(parse_ttl(Some("-1")).unwrap(), None);
        for bad in ["-2", "1.5", "x", "2147483648"] {
            let e = parse_ttl(Some(bad)).unwrap_err().to_string();
            assert!(
                e.starts_with("incorrect value for metadata 'ttlInSeconds'"),
                "{e}"
            );
        }
    }

    /// Expired values are invisible at once and swept on a later write: the map does not keep
    /// every value ever written with a ttl.
    #[test]
    fn memory_expiry_is_invisible_then_swept() {
        let mut m = Memory::new();
        let t0 = Instant::now();
        let ops = (0..100)
            .map(|i| upsert(&format!("k{i}"), Some(1)))
            .collect();
        m.apply(ops, t0).unwrap();
        m.apply(vec![upsert("forever", None)], t0).unwrap();
        assert!(m.get("k1", t0).is_some_and(|e| e.expires.is_some()));
        let later = t0 + Duration::from_secs(2);
        assert!(m.get("k1", later).is_none());
        assert_eq!(m.version("k2", later), None);
        // A write after the sweep interval drops everything expired.
        m.apply(
            vec![upsert("k2", None)],
            t0 + MEMORY_SWEEP_INTERVAL + Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(m.entries.len(), 2);
        // The rewritten key started again at version 1.
        assert_eq!(m.version("k2", later), Some(1));
        assert!(m.get("forever", later).is_some_and(|e| e.expires.is_none()));
    }

    /// A transaction runs in order: each ETag against the version the earlier operations
    /// leave; one mismatch applies nothing.
    #[test]
    fn memory_transactions_check_etags_in_order() {
        let mut m = Memory::new();
        let t0 = Instant::now();
        m.apply(vec![upsert("k", None)], t0).unwrap();
        let with = |op: Op, etag: u64| match op {
            Op::Upsert {
                key,
                value,
                ttl,
                json,
                ..
            } => Op::Upsert {
                key,
                value,
                etag: Some(etag),
                ttl,
                json,
            },
            Op::Delete { key, .. } => Op::Delete {
                key,
                etag: Some(etag),
            },
        };
        let delete = |key: &str| Op::Delete {
            key: key.into(),
            etag: None,
        };
        // Written (version 2), then deleted with the version it had before: a mismatch.
        let e = m
            .apply(
                vec![
                    with(upsert("k", None), 1),
                    upsert("other", None),
                    with(delete("k"), 1),
                ],
                t0,
            )
            .unwrap_err();
        assert!(
            matches!(e, StateError::EtagMismatch(ref k) if k == "k"),
            "{e}"
        );
        assert_eq!(m.version("k", t0), Some(1), "nothing applied");
        assert_eq!(m.version("other", t0), None, "nothing applied");
        // With the version the first write leaves: both apply.
        m.apply(vec![with(upsert("k", None), 1), with(delete("k"), 2)], t0)
            .unwrap();
        assert_eq!(m.version("k", t0), None);
        // A deleted key has no version for a later operation of the transaction.
        m.apply(vec![upsert("k", None)], t0).unwrap();
        assert!(
            m.apply(vec![delete("k"), with(upsert("k", None), 1)], t0)
                .is_err()
        );
        assert_eq!(m.version("k", t0), Some(1));
    }
}
