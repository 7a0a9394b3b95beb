//! `bindings.redis`: Redis string keys through an output binding, as daprd's
//! (components-contrib `bindings/redis`). Every operation needs the `key` metadata:
//! - `create`: `SET key data` (with `EX ttlInSeconds` when the request carries one);
//! - `get`: `GET key` (with `delete: "true"`, `GETDEL`); the value as the answer's data, an
//!   empty answer (200) when there is no such key;
//! - `delete`: `DEL key`;
//! - `increment`: `INCR key`, then the `ttlInSeconds` expiry as for `create`.
//!
//! Requests come from [`super::bindings::OutputBinding`] and leave on one shared connection
//! made on first use (the component's `redisHost`, `redisPassword`, `redisUsername`, `redisDB`,
//! as `state.redis`), failing fast while Redis is down and used again once it is back.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::bindings::BindingResponse;
use super::components::Component;

/// A `bindings.redis` component.
pub struct RedisBinding {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
}

impl RedisBinding {
    /// The health probe: a `PING`.
    pub async fn ping(&self) -> Result<(), String> {
        super::state::redis_ping(&self.client, &self.conn).await
    }

    /// Checks the metadata (nothing connects).
    pub fn open(c: &Component) -> Result<RedisBinding, String> {
        if let Some(t) = c.meta("redisType").filter(|t| *t != "node") {
            return Err(format!(
                "expected redisType node (a single Redis server), found {t:?}: bindings.redis does not support clusters"
            ));
        }
        if c.meta("failover") == Some("true") {
            return Err(
                "failover (Sentinel) is not supported by the bridge's bindings.redis".into(),
            );
        }
        Ok(RedisBinding {
            client: super::state::redis_client(c)?,
            conn: tokio::sync::OnceCell::new(),
        })
    }

    pub async fn invoke(
        &self,
        operation: &str,
        data: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Option<BindingResponse>, String> {
        let key = metadata
            .get("key")
            .filter(|k| !k.is_empty())
            .ok_or("redis binding: missing key in request metadata")?;
        // daprd reads the ttl before it writes anything: a bad one changes nothing.
        let ttl = match operation {
            "create" | "increment" => ttl_seconds(metadata)?,
            _ => None,
        };
        let mut conn = super::state::redis_connection(&self.client, &self.conn).await?;
        let fail = |e: redis::RedisError| format!("redis: {e}");
        match operation {
            "delete" => {
                redis::cmd("DEL")
                    .arg(key)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(fail)?;
            }
            "get" => {
                let command = if metadata.get("delete").map(String::as_str) == Some("true") {
                    "GETDEL"
                } else {
                    "GET"
                };
                let value: Option<Vec<u8>> = redis::cmd(command)
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(fail)?;
                return Ok(Some(BindingResponse {
                    data: value.map(Bytes::from).unwrap_or_default(),
                    metadata: BTreeMap::new(),
                }));
            }
            "create" | "increment" => {
                let cmd = if operation == "create" {
                    let mut c = redis::cmd("SET");
                    c.arg(key).arg(data.as_ref());
                    // One command: a key never stays without its expiry.
                    if let Some(seconds) = ttl {
                        c.arg("EX").arg(seconds);
                    }
                    c
                } else {
                    let mut c = redis::cmd("INCR");
                    c.arg(key);
                    c
                };
                cmd.query_async::<()>(&mut conn).await.map_err(fail)?;
                if let Some(seconds) = ttl.filter(|_| operation == "increment") {
                    redis::cmd("EXPIRE")
                        .arg(key)
                        .arg(seconds)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(fail)?;
                }
            }
            other => return Err(format!("invalid operation type: {other}")),
        }
        Ok(None)
    }
}

/// `ttlInSeconds` request metadata (contrib's `TryGetTTL`: an integer number of seconds,
/// above zero).
pub(crate) fn ttl_seconds(metadata: &BTreeMap<String, String>) -> Result<Option<i64>, String> {
    match metadata.get("ttlInSeconds").filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            Ok(n) => Err(format!(
                "ttlInSeconds value must be higher than zero: actual is {n}"
            )),
            Err(_) => Err(format!(
                "ttlInSeconds value must be a valid integer: actual is '{v}'"
            )),
        },
    }
}
