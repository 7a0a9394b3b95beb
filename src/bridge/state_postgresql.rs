//! `state.postgresql` (alias `state.postgres`): daprd's v1 PostgreSQL store, laid out the same
//! (components-contrib `state/postgresql/v1`), so a table written by daprd reads back here and
//! the other way round: `key text PRIMARY KEY, value jsonb, isbinary boolean, insertdate,
//! updatedate, expiredate`; the ETag is the row's `xmin`; a value that is not JSON (gRPC's raw
//! bytes) is stored as a base64 JSON string with `isbinary = true`. The migrations table
//! (`dapr_metadata`) records the schema level (`migrations` = `2`) as daprd's does.
//!
//! Requests come from [`super::state::Store`]; they leave on a bounded deadpool of
//! tokio-postgres connections (TLS by the connection string's `sslmode`, [`super::postgresql_tls`]). The first call creates the tables when missing (under
//! an advisory lock, so sidecars starting together do not race) and starts the periodic
//! cleanup of expired rows; a database that is down fails each call with a clear error and
//! is used again as soon as it is back (nothing connects at start).

use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::components::Component;
use super::postgresql_tls::PgTls;
use super::state::{Entry, Op, StateError};

/// daprd's default `timeout` for every database operation.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// daprd's default `cleanupInterval`: expired rows are invisible at once, deleted hourly.
const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// daprd's default pool size is the greater of 4 and the number of CPUs.
const MIN_CONNECTIONS: usize = 4;

/// A `state.postgresql` component.
pub struct Postgres {
    pool: Pool,
    table: String,
    metadata_table: String,
    timeout: Duration,
    /// None: no periodic cleanup (`cleanupInterval` of 0 or less).
    cleanup_interval: Option<Duration>,
    /// Set once the tables exist (and the cleanup runs).
    migrated: tokio::sync::OnceCell<()>,
}

/// A table name written into SQL: letters, digits and `_`, optionally `schema.table`.
fn table_name(c: &Component, key: &str, default: &str) -> Result<String, String> {
    let name = c.meta(key).unwrap_or(default).to_string();
    let parts: Vec<&str> = name.split('.').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                && !p.starts_with(|ch: char| ch.is_ascii_digit())
        });
    if !ok {
        return Err(format!(
            "expected {key} as a table name of letters, digits and '_' (optionally schema.table), found {name:?}"
        ));
    }
    Ok(name)
}

/// A duration as daprd reads one: a Go-style duration (`20s`, `1h`, `500ms`) or a number of
/// seconds. Negative: `None`.
fn duration(c: &Component, key: &str, default: Duration) -> Result<Option<Duration>, String> {
    let Some(v) = c.meta(key) else {
        return Ok(Some(default));
    };
    if let Ok(n) = v.trim().parse::<i64>() {
        return Ok(u64::try_from(n).ok().map(Duration::from_secs));
    }
    if v.trim().starts_with('-') {
        return Ok(None);
    }
    humantime::parse_duration(v.trim()).map(Some).map_err(|_| {
        format!("expected {key} as a duration (like 20s, 1h) or a number of seconds, found {v:?}")
    })
}

/// `connectionString` as daprd takes it: a `postgres://` URL or `key=value` pairs. pgx's
/// `database=` is libpq's `dbname=`, and pgx's pool settings (`pool_*`) are not the
/// connection's.
/// The connection's `options` with `-c statement_timeout=<timeout in ms>` added, unless the
/// connection string sets a statement timeout itself (`None`: leave them as they are).
fn statement_timeout(options: Option<&str>, timeout: Duration) -> Option<String> {
    let ms = timeout.as_millis().max(1);
    match options {
        Some(o) if o.contains("statement_timeout") => None,
        Some(o) if !o.trim().is_empty() => Some(format!("{o} -c statement_timeout={ms}")),
        _ => Some(format!("-c statement_timeout={ms}")),
    }
}

pub(crate) fn connection_config(s: &str) -> Result<(tokio_postgres::Config, PgTls), String> {
    let text = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        s.to_string()
    } else {
        s.split_whitespace()
            .filter(|kv| !kv.starts_with("pool_"))
            .map(|kv| match kv.strip_prefix("database=") {
                Some(db) => format!("dbname={db}"),
                None => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (text, mode, tls) = super::postgresql_tls::from_connection_string(&text)
        .map_err(|e| format!("connectionString: {e}"))?;
    let mut config = text
        .parse::<tokio_postgres::Config>()
        .map_err(|e| format!("invalid connectionString: {e}"))?;
    super::postgresql_tls::apply(&mut config, mode);
    Ok((config, tls))
}

/// The connection settings a PostgreSQL component describes (`connectionString`, with the
/// `timeout` as connect and statement timeout), its TLS connector, and its `timeout`.
pub(crate) fn client_config(
    c: &Component,
) -> Result<(tokio_postgres::Config, PgTls, Duration), String> {
    let conn = c
        .meta("connectionString")
        .ok_or("expected metadata connectionString, found none")?;
    let (mut config, tls) = connection_config(conn)?;
    let timeout = match c.meta("timeout").or(c.meta("timeoutInSeconds")) {
        Some(_) => {
            let key = if c.meta("timeout").is_some() {
                "timeout"
            } else {
                "timeoutInSeconds"
            };
            duration(c, key, DEFAULT_TIMEOUT)?
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("expected {key} greater than 0"))?
        }
        None => DEFAULT_TIMEOUT,
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    // A call that times out drops its future, and the pooled connection goes back with its
    // statement still running (a row lock wait, a slow query), holding up the next user:
    // the server cancels a statement that outlives `timeout` itself.
    if let Some(options) = statement_timeout(config.get_options(), timeout) {
        config.options(&options);
    }
    Ok((config, tls, timeout))
}

/// `SELECT 1` on a connection of `pool`: the health probe of every PostgreSQL component
/// ([`super::health`]). Uses the component's own pool (and its `maxConns`).
pub(crate) async fn pg_ping(pool: &Pool) -> Result<(), String> {
    // Every connection in use: the probe would wait behind the app's own calls (and time out
    // while the database serves them); the last status stands.
    let status = pool.status();
    if status.size >= status.max_size && status.available == 0 {
        return Err(super::health::BUSY.to_string());
    }
    let client = pool
        .get()
        .await
        .map_err(|e| format!("postgresql: cannot connect: {}", chain(&e)))?;
    client
        .simple_query("SELECT 1")
        .await
        .map(drop)
        .map_err(|e| format!("postgresql: {}", chain(&e)))
}

/// The connection pool a PostgreSQL component describes (`connectionString`, `timeout`,
/// `maxConns`), built with nothing connected, and its `timeout`. Shared by `state.postgresql`,
/// `bindings.postgresql` and `configuration.postgresql`, which read these keys alike.
pub(crate) fn pool(c: &Component) -> Result<(Pool, Duration), String> {
    pool_recycled(c, RecyclingMethod::Fast)
}

/// [`pool`] with its own way of checking a connection before it is reused.
pub(crate) fn pool_recycled(
    c: &Component,
    recycling_method: RecyclingMethod,
) -> Result<(Pool, Duration), String> {
    let (config, tls, timeout) = client_config(c)?;
    let pool = pool_of(c, config.clone(), tls, timeout, recycling_method)?;
    Ok((pool, timeout))
}

/// The pool for settings [`client_config`] built already (their files read once).
pub(crate) fn pool_of(
    c: &Component,
    config: tokio_postgres::Config,
    tls: PgTls,
    timeout: Duration,
    recycling_method: RecyclingMethod,
) -> Result<Pool, String> {
    let max = match c.meta("maxConns") {
        Some(v) => v
            .parse::<i64>()
            .map_err(|_| format!("expected maxConns as a number, found {v:?}"))?,
        None => 0,
    };
    let max = usize::try_from(max)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(MIN_CONNECTIONS, |n| n.get())
                .max(MIN_CONNECTIONS)
        });
    let manager = Manager::from_connect(
        config,
        super::postgresql_tls::PgConnect(tls),
        ManagerConfig { recycling_method },
    );
    Pool::builder(manager)
        .max_size(max)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        .map_err(|e| format!("cannot build the connection pool: {e}"))
}

impl Postgres {
    /// Checks the metadata without connecting (preflight).
    pub fn check(c: &Component) -> Result<(), String> {
        Postgres::new(c).map(drop)
    }

    /// The store, with its pool built but nothing connected.
    pub fn new(c: &Component) -> Result<Postgres, String> {
        let (pool, timeout) = pool(c)?;
        let table = table_name(c, "tableName", "state")?;
        let metadata_table = table_name(c, "metadataTableName", "dapr_metadata")?;
        // `cleanupIntervalInSeconds` is daprd's older name.
        let cleanup_key = if c.meta("cleanupInterval").is_none()
            && c.meta("cleanupIntervalInSeconds").is_some()
        {
            "cleanupIntervalInSeconds"
        } else {
            "cleanupInterval"
        };
        let cleanup_interval =
            duration(c, cleanup_key, DEFAULT_CLEANUP_INTERVAL)?.filter(|d| !d.is_zero());
        Ok(Postgres {
            pool,
            table,
            metadata_table,
            timeout,
            cleanup_interval,
            migrated: tokio::sync::OnceCell::new(),
        })
    }

    /// The health probe: `SELECT 1` on a pooled connection.
    pub async fn ping(&self) -> Result<(), String> {
        pg_ping(&self.pool).await
    }

    /// A pooled connection, once the tables exist.
    async fn client(&self) -> Result<deadpool_postgres::Object, StateError> {
        let mut client =
            self.pool.get().await.map_err(|e| {
                StateError::Store(format!("postgresql: cannot connect: {}", chain(&e)))
            })?;
        if self.migrated.get().is_none() {
            self.migrated
                .get_or_try_init(|| self.migrate(&mut client))
                .await?;
        }
        Ok(client)
    }

    /// Whether both tables exist at daprd's migration level 2 already: then no DDL runs, so a
    /// role with only SELECT/INSERT/UPDATE/DELETE (tables made by a DBA or by daprd; PG 15+
    /// grants no CREATE on `public`) works. Any error reads as "not yet" (the DDL then says why).
    async fn migrated_already(&self, client: &deadpool_postgres::Object) -> bool {
        let (t, m) = (&self.table, &self.metadata_table);
        let check = async {
            let row = client
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                    &[t, m],
                )
                .await?;
            if !row.try_get::<_, bool>(0)? {
                return Ok::<_, tokio_postgres::Error>(false);
            }
            let level = client
                .query_opt(
                    &format!("SELECT value FROM {m} WHERE key = 'migrations'"),
                    &[],
                )
                .await?;
            Ok(level
                .and_then(|r| r.try_get::<_, String>(0).ok())
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|v| v >= 2))
        };
        matches!(
            tokio::time::timeout(self.timeout, check).await,
            Ok(Ok(true))
        )
    }

    /// Creates what is missing, as daprd's migrations 1 and 2 leave it.
    async fn migrate(&self, client: &mut deadpool_postgres::Object) -> Result<(), StateError> {
        if self.migrated_already(client).await {
            self.start_cleanup();
            return Ok(());
        }
        let (t, m) = (&self.table, &self.metadata_table);
        let index = format!("{}_expiredate_idx", t.replace('.', "_"));
        // One lock per metadata table: components with different state tables share it.
        let sql = format!(
            "SELECT pg_advisory_xact_lock(hashtext('outrigger-migrate-' || '{m}'));
             CREATE TABLE IF NOT EXISTS {m} (key text NOT NULL PRIMARY KEY, value text NOT NULL);
             CREATE TABLE IF NOT EXISTS {t} (key text NOT NULL PRIMARY KEY, value jsonb NOT NULL,
               isbinary boolean NOT NULL, insertdate TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
               updatedate TIMESTAMP WITH TIME ZONE NULL);
             ALTER TABLE {t} ADD COLUMN IF NOT EXISTS expiredate TIMESTAMP WITH TIME ZONE NULL;
             CREATE INDEX IF NOT EXISTS {index} ON {t} (expiredate);
             INSERT INTO {m} (key, value) VALUES ('migrations', '2')
               ON CONFLICT (key) DO UPDATE SET value = '2' WHERE {m}.value ~ '^[0-9]+$' AND {m}.value::int < 2;"
        );
        let what = format!("cannot create the table {t}");
        let work = async {
            // Dropping the transaction on an error rolls it back.
            let tx = client.transaction().await.map_err(|e| pg(&what, &e))?;
            tx.batch_execute(&sql).await.map_err(|e| pg(&what, &e))?;
            tx.commit().await.map_err(|e| pg(&what, &e))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))?;
        self.start_cleanup();
        Ok(())
    }

    /// Deletes expired rows every `cleanupInterval` (first right away: what expired while no
    /// sidecar ran), while the pool is open.
    fn start_cleanup(&self) {
        let Some(every) = self.cleanup_interval else {
            return;
        };
        let pool = self.pool.clone();
        let sql = format!(
            "DELETE FROM {} WHERE expiredate IS NOT NULL AND expiredate < now()",
            self.table
        );
        tokio::spawn(async move {
            loop {
                if pool.is_closed() {
                    return;
                }
                match pool.get().await {
                    Ok(client) => match client.execute(&sql, &[]).await {
                        Ok(n) => tracing::debug!(rows = n, "postgresql: expired state deleted"),
                        Err(e) => {
                            tracing::warn!(error = %chain(&e), "postgresql: cannot delete expired state")
                        }
                    },
                    Err(e) => {
                        tracing::debug!(error = %chain(&e), "postgresql: cleanup skipped, no connection")
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    fn timed_out(&self) -> StateError {
        StateError::Store(format!(
            "postgresql: the operation did not finish within {} (timeout)",
            humantime::format_duration(self.timeout)
        ))
    }

    /// The value, its ETag (`xmin`) and its expiry, or None (also once expired).
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, StateError> {
        let work = async {
            let client = self.client().await?;
            let sql = format!(
                "SELECT value::text, isbinary, xmin::text::bigint,
                   (extract(epoch FROM expiredate) * 1000)::bigint
                 FROM {} WHERE key = $1 AND (expiredate IS NULL OR expiredate > now())",
                self.table
            );
            let stmt = client
                .prepare_cached(&sql)
                .await
                .map_err(|e| pg("get", &e))?;
            let Some(row) = client
                .query_opt(&stmt, &[&key])
                .await
                .map_err(|e| pg("get", &e))?
            else {
                return Ok(None);
            };
            // `try_get`: a table of another shape (a NULL `isbinary`) is an error, not a panic.
            let column = |e: tokio_postgres::Error| pg("get", &e);
            let text: String = row.try_get(0).map_err(column)?;
            let binary: bool = row
                .try_get::<_, Option<bool>>(1)
                .map_err(column)?
                .unwrap_or(false);
            let xmin: i64 = row.try_get(2).map_err(column)?;
            let expires: Option<i64> = row.try_get(3).map_err(column)?;
            let value = if binary {
                let encoded: String = serde_json::from_str(&text).map_err(|e| {
                    StateError::Store(format!(
                        "postgresql: key {key:?} is marked isbinary but its value is not a JSON string: {e}"
                    ))
                })?;
                Bytes::from(
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|e| {
                            StateError::Store(format!(
                                "postgresql: key {key:?} is marked isbinary but its value is not base64: {e}"
                            ))
                        })?,
                )
            } else {
                Bytes::from(text)
            };
            Ok(Some(Entry {
                value,
                version: xmin as u64,
                expires: expires
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)),
            }))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }

    /// Every ETag is checked first (locking the rows), then every operation is applied: one
    /// SQL transaction, so all or nothing.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<(), StateError> {
        let work = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| pg("begin", &e))?;
            let check = format!(
                "SELECT 1 FROM {} WHERE key = $1 AND xmin::text::bigint = $2
                   AND (expiredate IS NULL OR expiredate > now()) FOR UPDATE",
                self.table
            );
            let upsert = format!(
                "INSERT INTO {} (key, value, isbinary, expiredate)
                 VALUES ($1, $2::text::jsonb, $3, now() + $4::bigint * interval '1 second')
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, isbinary = EXCLUDED.isbinary,
                   updatedate = now(), expiredate = EXCLUDED.expiredate",
                self.table
            );
            let delete = format!("DELETE FROM {} WHERE key = $1", self.table);
            // In order, as daprd runs a transaction: each ETag is checked against the state
            // the earlier operations left (a row written here has this transaction's `xmin`).
            // `xmin` is 32 bits: a larger ETag is not one of ours (daprd parses it as a uint32
            // and answers 400, not 409), whichever operation carries it.
            if let Some(want) = ops
                .iter()
                .filter_map(op_etag)
                .find(|&e| e > u64::from(u32::MAX))
            {
                return Err(StateError::EtagInvalid(want.to_string()));
            }
            for op in &ops {
                if let Some(want) = op_etag(op) {
                    let found = tx
                        .query_opt(&check, &[&op_key(op), &(want as i64)])
                        .await
                        .map_err(|e| pg("etag check", &e))?;
                    if found.is_none() {
                        // Dropping the transaction rolls it back.
                        return Err(StateError::EtagMismatch(op_key(op).to_string()));
                    }
                }
                match op {
                    Op::Upsert {
                        key,
                        value,
                        ttl,
                        json,
                        ..
                    } => {
                        let (text, binary) = stored_value(value, *json);
                        let ttl = ttl.map(i64::from);
                        tx.execute(&upsert, &[key, &text, &binary, &ttl])
                            .await
                            .map_err(|e| pg("upsert", &e))?;
                    }
                    Op::Delete { key, .. } => {
                        tx.execute(&delete, &[key])
                            .await
                            .map_err(|e| pg("delete", &e))?;
                    }
                }
            }
            tx.commit().await.map_err(|e| pg("commit", &e))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }
}

/// The JSON text stored, and `isbinary`: JSON as is; anything else (gRPC's bytes) as a base64
/// JSON string, as daprd stores `[]byte` values.
fn stored_value(value: &[u8], json: bool) -> (String, bool) {
    if json
        && let Ok(text) = std::str::from_utf8(value)
        && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
        && !text.contains("\\u0000")
    {
        return (text.to_string(), false);
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(value);
    (serde_json::Value::String(encoded).to_string(), true)
}

fn op_key(op: &Op) -> &str {
    match op {
        Op::Upsert { key, .. } | Op::Delete { key, .. } => key,
    }
}

fn op_etag(op: &Op) -> Option<u64> {
    match op {
        Op::Upsert { etag, .. } | Op::Delete { etag, .. } => *etag,
    }
}

pub(crate) use crate::errors::chain;

fn pg(what: &str, e: &tokio_postgres::Error) -> StateError {
    StateError::Store(format!("postgresql: {what}: {}", chain(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(meta: &[(&str, &str)]) -> Component {
        Component {
            name: "pg".into(),
            kind: "state.postgresql".into(),
            version: "v1".into(),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            scopes: Vec::new(),
            ignore_errors: false,
            file: "c.yaml".into(),
            line: 1,
            lines: Default::default(),
        }
    }

    #[test]
    fn statements_are_cut_at_the_timeout_by_the_server() {
        let t = Duration::from_secs(20);
        assert_eq!(
            statement_timeout(None, t).as_deref(),
            Some("-c statement_timeout=20000")
        );
        assert_eq!(
            statement_timeout(Some("-c search_path=x"), t).as_deref(),
            Some("-c search_path=x -c statement_timeout=20000")
        );
        assert_eq!(statement_timeout(Some("-c statement_timeout=5s"), t), None);
    }

    #[test]
    fn metadata_as_daprd_reads_it() {
        // The Dapr docs' key=value form, with pgx's `database`.
        let c = component(&[(
            "connectionString",
            "host=localhost user=postgres password=example port=5432 connect_timeout=10 database=my_dapr",
        )]);
        let p = Postgres::new(&c).unwrap();
        assert_eq!(
            (p.table.as_str(), p.metadata_table.as_str()),
            ("state", "dapr_metadata")
        );
        assert_eq!(p.timeout, DEFAULT_TIMEOUT);
        assert_eq!(p.cleanup_interval, Some(DEFAULT_CLEANUP_INTERVAL));
        let c = component(&[
            (
                "connectionString",
                "postgres://u@127.0.0.1:5432/db?sslmode=disable",
            ),
            ("tableName", "app.orders"),
            ("timeout", "5"),
            ("cleanupInterval", "-1"),
        ]);
        let p = Postgres::new(&c).unwrap();
        assert_eq!(p.table, "app.orders");
        assert_eq!(p.timeout, Duration::from_secs(5));
        assert_eq!(p.cleanup_interval, None);
        for bad in [
            vec![],
            vec![("connectionString", "host=x"), ("tableName", "x; drop")],
            vec![("connectionString", "host=x"), ("timeout", "soon")],
            vec![("connectionString", "nonsense=1")],
        ] {
            assert!(Postgres::new(&component(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_is_stored_as_is_and_bytes_as_base64() {
        assert_eq!(
            stored_value(br#"{"a":1}"#, true),
            (r#"{"a":1}"#.into(), false)
        );
        assert_eq!(stored_value(b"v1", false), (r#""djE=""#.into(), true));
        assert!(stored_value(br#"{"a":1}"#, false).1);
        assert!(stored_value(b"not json", true).1);
    }
}
