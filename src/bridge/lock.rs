//! Distributed lock stores behind `/v1.0-alpha1/lock/{store}` and `TryLockAlpha1`:
//! `lock.redis`, laid out as daprd's (components-contrib `lock/redis/standalone.go`): the lock
//! is a string key `lock||<prefix>||<resourceId>` holding the owner, taken with
//! `SET key owner NX EX seconds` (atomic, and it expires by itself) and released by a Lua
//! script that deletes it only when the owner matches. A lock taken by daprd for the same app
//! id is the same key, so both sidecars exclude each other.
//!
//! Keys come in as the caller's resource id; [`LockStore::key`] prefixes them with the
//! component's `keyPrefix` strategy as daprd's `pkg/components/lock/lock_config.go` does.

use super::components::Component;

/// What releasing a lock found (daprd's numeric statuses, also on the HTTP API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnlockStatus {
    Success = 0,
    LockDoesNotExist = 1,
    LockBelongsToOthers = 2,
    InternalError = 3,
}

/// Releases the lock only for its owner: 1 deleted, -1 no such lock, -2 another owner
/// (contrib's `unlockScript`).
const UNLOCK_SCRIPT: &str = r#"
local v = redis.call("get", KEYS[1])
if v == false then return -1 end
if v ~= ARGV[1] then return -2 end
return redis.call("del", KEYS[1])
"#;

/// The separator daprd puts between the parts of a lock key.
const SEPARATOR: &str = "||";

/// How lock keys are prefixed (`keyPrefix` metadata: `appid`, the default; `name`; `none`;
/// any other string is used as the prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Prefix {
    AppId(String),
    Name(String),
    None,
    Custom(String),
}

/// A `lock.redis` component, opened (it connects on first use).
pub struct LockStore {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    unlock: redis::Script,
    prefix: Prefix,
}

impl LockStore {
    /// Checks a component's metadata without connecting (preflight).
    pub fn check(c: &Component) -> Result<(), String> {
        match c.kind.as_str() {
            "lock.redis" => {
                if let Some(t) = c.meta("redisType").filter(|t| *t != "node") {
                    return Err(format!(
                        "expected redisType node (a single Redis server), found {t:?}: lock.redis does not support clusters"
                    ));
                }
                if c.meta("failover") == Some("true") {
                    return Err(
                        "failover (Sentinel) is not supported by the bridge's lock.redis".into(),
                    );
                }
                if let Some(p) = c.meta("keyPrefix").filter(|p| p.contains(SEPARATOR)) {
                    return Err(format!("expected keyPrefix without '||', found {p:?}"));
                }
                super::state::redis_client(c).map(drop)
            }
            other => Err(format!("{other} is not a lock store type")),
        }
    }

    /// Opens the store a component describes, for the app `app_id`.
    pub fn open(c: &Component, app_id: &str) -> Result<LockStore, String> {
        LockStore::check(c)?;
        // daprd reads the strategy lowercased (`keyPrefix: AppID` is the appid strategy,
        // `Shared` the prefix `shared`): the same keys, so both exclude each other.
        let strategy = c.meta("keyPrefix").unwrap_or("appid").to_ascii_lowercase();
        let prefix = match strategy.as_str() {
            "appid" => Prefix::AppId(app_id.to_string()),
            "name" => Prefix::Name(c.name.clone()),
            "none" => Prefix::None,
            other => Prefix::Custom(other.to_string()),
        };
        Ok(LockStore {
            client: super::state::redis_client(c)?,
            conn: tokio::sync::OnceCell::new(),
            unlock: redis::Script::new(UNLOCK_SCRIPT),
            prefix,
        })
    }

    /// The key a resource id is locked under: `lock||<prefix>||<resourceId>` (a resource id
    /// may not contain `||`, as daprd).
    pub fn key(&self, resource_id: &str) -> Result<String, String> {
        if resource_id.contains(SEPARATOR) {
            return Err(format!(
                "input key/keyPrefix '{resource_id}' can't contain '{SEPARATOR}'"
            ));
        }
        let key = match &self.prefix {
            Prefix::AppId(p) | Prefix::Name(p) | Prefix::Custom(p) if !p.is_empty() => {
                format!("{p}{SEPARATOR}{resource_id}")
            }
            _ => resource_id.to_string(),
        };
        Ok(format!("lock{SEPARATOR}{key}"))
    }

    /// The health probe: a `PING`.
    pub async fn ping(&self) -> Result<(), String> {
        super::state::redis_ping(&self.client, &self.conn).await
    }

    /// Takes the lock for `owner` for `expiry_seconds`, unless someone holds it.
    pub async fn try_lock(
        &self,
        key: &str,
        owner: &str,
        expiry_seconds: u32,
    ) -> Result<bool, String> {
        let mut conn = super::state::redis_connection(&self.client, &self.conn).await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(owner)
            .arg("NX")
            .arg("EX")
            .arg(expiry_seconds)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        Ok(set.is_some())
    }

    /// Releases the lock if `owner` holds it.
    pub async fn unlock(&self, key: &str, owner: &str) -> Result<UnlockStatus, String> {
        let mut conn = super::state::redis_connection(&self.client, &self.conn).await?;
        let n: i64 = self
            .unlock
            .key(key)
            .arg(owner)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        Ok(match n {
            n if n >= 0 => UnlockStatus::Success,
            -1 => UnlockStatus::LockDoesNotExist,
            -2 => UnlockStatus::LockBelongsToOthers,
            _ => UnlockStatus::InternalError,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(prefix: Option<&str>) -> Component {
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("redisHost".to_string(), "127.0.0.1:6379".to_string());
        if let Some(p) = prefix {
            metadata.insert("keyPrefix".to_string(), p.to_string());
        }
        Component {
            name: "lockstore".into(),
            kind: "lock.redis".into(),
            version: "v1".into(),
            metadata,
            scopes: Vec::new(),
            ignore_errors: false,
            file: "c.yaml".into(),
            line: 1,
            lines: Default::default(),
        }
    }

    /// Keys as daprd's `GetModifiedLockKey` makes them.
    #[test]
    fn keys_are_prefixed_as_daprd() {
        let key = |p: Option<&str>| {
            LockStore::open(&component(p), "orders")
                .unwrap()
                .key("r1")
                .unwrap()
        };
        assert_eq!(key(None), "lock||orders||r1");
        assert_eq!(key(Some("appid")), "lock||orders||r1");
        assert_eq!(key(Some("name")), "lock||lockstore||r1");
        assert_eq!(key(Some("none")), "lock||r1");
        assert_eq!(key(Some("shared")), "lock||shared||r1");
        let store = LockStore::open(&component(None), "orders").unwrap();
        assert!(store.key("a||b").is_err());
        assert!(LockStore::open(&component(Some("a||b")), "orders").is_err());
    }
}
