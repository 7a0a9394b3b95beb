//! The building blocks' operations, once, for both front doors: the HTTP routes
//! ([`super::routes`]) and the gRPC service ([`super::grpc`]) parse their own wire shapes into
//! the types here, call these functions, and render the result (or the [`ApiError`]) in their
//! own way. Validation order and error texts live here, so both APIs answer alike.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::bindings::BindingResponse;
use super::configuration::{Changes, ConfigItem, ConfigurationStore};
use super::error::ApiError;
use super::lock::{LockStore, UnlockStatus};
use super::secrets::{Secret, SecretStore};
use super::state::{Entry, KeyPrefix, Op, parse_etag, parse_ttl};
use super::{BridgeState, StateStore};
use crate::runtime::Control;

/// A write's concurrency and consistency, as Dapr's HTTP API spells them (`first-write`,
/// `last-write`; `eventual`, `strong`; empty or absent: the default).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Options {
    pub concurrency: Option<String>,
    pub consistency: Option<String>,
}

/// One state item to save (or, in a transaction or bulk delete, to delete).
#[derive(Clone, Debug, Default)]
pub struct Item {
    pub key: String,
    /// The bytes stored: the JSON text of the HTTP API's `value`, or gRPC's raw bytes.
    pub value: Bytes,
    pub etag: Option<String>,
    pub options: Options,
    /// The item's metadata; `ttlInSeconds` sets its time to live.
    pub metadata: BTreeMap<String, String>,
    /// `value` is JSON text (the HTTP API) rather than raw bytes (gRPC).
    pub json: bool,
}

/// The metadata key of a value's (or a published message's) time to live, in seconds.
pub const TTL_KEY: &str = "ttlInSeconds";

/// A transaction's operation.
#[derive(Clone, Debug)]
pub enum TxOp {
    Upsert(Item),
    Delete(Item),
}

impl TxOp {
    /// `upsert` or `delete` (the HTTP and gRPC spelling); anything else is refused.
    pub fn new(operation: &str, item: Item) -> Result<TxOp, ApiError> {
        match operation {
            "upsert" => Ok(TxOp::Upsert(item)),
            "delete" => Ok(TxOp::Delete(item)),
            other => Err(ApiError::UnsupportedOperation(other.to_string())),
        }
    }
}

/// One key of a bulk get: its value and version, none, or the store's error for that key.
pub struct BulkItem {
    pub key: String,
    pub outcome: Result<Option<(Bytes, u64)>, String>,
}

/// The state store `name`, or Dapr's error for a missing one.
pub fn state_store<'a>(st: &'a BridgeState, name: &str) -> Result<&'a StateStore, ApiError> {
    if st.state_stores.is_empty() {
        return Err(ApiError::NotConfigured {
            block: "state",
            code: "ERR_STATE_STORE_NOT_CONFIGURED",
        });
    }
    st.state_stores
        .get(name)
        .ok_or_else(|| ApiError::StoreNotFound {
            block: "state",
            code: "ERR_STATE_STORE_NOT_FOUND",
            name: name.to_string(),
        })
}

/// The key as stored; with a prefix, a key may not contain the separator `||` (as daprd).
fn stored_key(store: &StateStore, key: &str) -> Result<String, ApiError> {
    if store.prefix != KeyPrefix::None && key.contains("||") {
        return Err(ApiError::Malformed(format!(
            "input key/keyPrefix {key:?} can't contain '||'"
        )));
    }
    Ok(store.prefix.apply(key))
}

/// The version to check, from an etag and the options: last-write ignores the etag (as Dapr's
/// stores do); first-write (the default) with an etag requires it to match. No etag: no check.
fn etag_value(
    etag: Option<&str>,
    options: &Options,
    code: &'static str,
) -> Result<Option<u64>, ApiError> {
    match options.consistency.as_deref() {
        None | Some("" | "eventual" | "strong") => {}
        Some(other) => {
            return Err(ApiError::Malformed(format!(
                "expected consistency eventual or strong, found {other:?}"
            )));
        }
    }
    let last_write = match options.concurrency.as_deref() {
        None | Some("" | "first-write") => false,
        Some("last-write") => true,
        Some(other) => {
            return Err(ApiError::Malformed(format!(
                "expected concurrency first-write or last-write, found {other:?}"
            )));
        }
    };
    match etag {
        Some(e) if !e.is_empty() && !last_write => {
            parse_etag(e).map(Some).map_err(ApiError::state(code))
        }
        _ => Ok(None),
    }
}

/// An item's stored key and the version to check: the key is required, then the ETag and
/// options are checked, then the key's form (the order of the errors a client sees).
fn key_and_etag(
    store: &StateStore,
    item: &Item,
    code: &'static str,
) -> Result<(String, Option<u64>), ApiError> {
    if item.key.is_empty() {
        return Err(ApiError::Malformed("\"key\" is a required field".into()));
    }
    let etag = etag_value(item.etag.as_deref(), &item.options, code)?;
    Ok((stored_key(store, &item.key)?, etag))
}

fn upsert(store: &StateStore, item: Item, code: &'static str) -> Result<Op, ApiError> {
    let (key, etag) = key_and_etag(store, &item, code)?;
    let ttl =
        parse_ttl(item.metadata.get(TTL_KEY).map(String::as_str)).map_err(ApiError::state(code))?;
    Ok(Op::Upsert {
        key,
        value: item.value,
        etag,
        ttl,
        json: item.json,
    })
}

/// Saves every item, or none.
pub async fn save(st: &BridgeState, name: &str, items: Vec<Item>) -> Result<(), ApiError> {
    let store = state_store(st, name)?;
    let code = "ERR_STATE_SAVE";
    let ops = items
        .into_iter()
        .map(|i| upsert(store, i, code))
        .collect::<Result<Vec<_>, _>>()?;
    store.store.apply(ops).await.map_err(ApiError::state(code))
}

/// The value of `key`, its version and expiry, or None (also once it has expired). Its
/// [`Entry::metadata`] is the response metadata (`ttlExpireTime`).
pub async fn get_entry(st: &BridgeState, name: &str, key: &str) -> Result<Option<Entry>, ApiError> {
    let store = state_store(st, name)?;
    store
        .store
        .get(&stored_key(store, key)?)
        .await
        .map_err(ApiError::state("ERR_STATE_GET"))
}

/// Every key's value; one key's failure is reported in its item, not for the whole call.
pub async fn bulk_get(
    st: &BridgeState,
    name: &str,
    keys: Vec<String>,
) -> Result<Vec<BulkItem>, ApiError> {
    let store = state_store(st, name)?;
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let outcome = match store.store.get(&stored_key(store, &key)?).await {
            Ok(found) => Ok(found.map(|e| (e.value, e.version))),
            Err(e) => Err(e.to_string()),
        };
        out.push(BulkItem { key, outcome });
    }
    Ok(out)
}

/// Deletes `key` (checking `etag` unless last-write).
pub async fn delete(
    st: &BridgeState,
    name: &str,
    key: &str,
    etag: Option<&str>,
    options: &Options,
) -> Result<(), ApiError> {
    let store = state_store(st, name)?;
    let code = "ERR_STATE_DELETE";
    let etag = etag_value(etag, options, code)?;
    store
        .store
        .apply(vec![Op::Delete {
            key: stored_key(store, key)?,
            etag,
        }])
        .await
        .map_err(ApiError::state(code))
}

/// Deletes every item (gRPC's DeleteBulkState), all or none.
pub async fn delete_bulk(st: &BridgeState, name: &str, items: Vec<Item>) -> Result<(), ApiError> {
    let store = state_store(st, name)?;
    let code = "ERR_STATE_DELETE";
    let mut ops = Vec::with_capacity(items.len());
    for item in &items {
        let (key, etag) = key_and_etag(store, item, code)?;
        ops.push(Op::Delete { key, etag });
    }
    store.store.apply(ops).await.map_err(ApiError::state(code))
}

/// Applies a transaction's operations atomically.
pub async fn transaction(st: &BridgeState, name: &str, ops: Vec<TxOp>) -> Result<(), ApiError> {
    let store = state_store(st, name)?;
    let code = "ERR_STATE_TRANSACTION";
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            TxOp::Upsert(item) => out.push(upsert(store, item, code)?),
            TxOp::Delete(item) => {
                let (key, etag) = key_and_etag(store, &item, code)?;
                out.push(Op::Delete { key, etag });
            }
        }
    }
    store.store.apply(out).await.map_err(ApiError::state(code))
}

/// The secret store `name`, or Dapr's error for a missing one.
pub fn secret_store<'a>(st: &'a BridgeState, name: &str) -> Result<&'a SecretStore, ApiError> {
    if st.secret_stores.is_empty() {
        return Err(ApiError::NotConfigured {
            block: "secret",
            code: "ERR_SECRET_STORES_NOT_CONFIGURED",
        });
    }
    st.secret_stores
        .get(name)
        .ok_or_else(|| ApiError::StoreNotFound {
            block: "secret",
            code: "ERR_SECRET_STORE_NOT_FOUND",
            name: name.to_string(),
        })
}

/// One secret, or None.
pub fn secret(st: &BridgeState, store: &str, name: &str) -> Result<Option<Secret>, ApiError> {
    Ok(secret_store(st, store)?.get(name))
}

/// Every secret of a store.
pub fn bulk_secrets(st: &BridgeState, store: &str) -> Result<BTreeMap<String, Secret>, ApiError> {
    Ok(secret_store(st, store)?.bulk())
}

/// The lock store `name`, or Dapr's error for a missing one.
pub fn lock_store<'a>(st: &'a BridgeState, name: &str) -> Result<&'a LockStore, ApiError> {
    st.lock_stores
        .get(name)
        .ok_or_else(|| ApiError::StoreNotFound {
            block: "lock",
            code: "ERR_LOCK_STORE_NOT_FOUND",
            name: name.to_string(),
        })
}

fn lock_configured(st: &BridgeState) -> Result<(), ApiError> {
    if st.lock_stores.is_empty() {
        return Err(ApiError::NotConfigured {
            block: "lock",
            code: "ERR_LOCK_STORE_NOT_CONFIGURED",
        });
    }
    Ok(())
}

fn lock_fields(store: &str, resource_id: &str, owner: &str) -> Result<(), ApiError> {
    if resource_id.is_empty() {
        return Err(ApiError::Malformed(format!(
            "ResourceId is empty in lock store {store}"
        )));
    }
    if owner.is_empty() {
        return Err(ApiError::Malformed(format!(
            "LockOwner is empty in lock store {store}"
        )));
    }
    Ok(())
}

/// Takes the lock on `resource_id` for `owner` for `expiry_seconds`; false when another owner
/// holds it. Checked in daprd's order: a lock store exists, the resource id, the owner, the
/// expiry, then the store's name.
pub async fn try_lock(
    st: &BridgeState,
    store: &str,
    resource_id: &str,
    owner: &str,
    expiry_seconds: i32,
) -> Result<bool, ApiError> {
    lock_configured(st)?;
    lock_fields(store, resource_id, owner)?;
    let Some(expiry) = u32::try_from(expiry_seconds).ok().filter(|&s| s > 0) else {
        return Err(ApiError::Malformed(format!(
            "ExpiryInSeconds is not positive in lock store {store}"
        )));
    };
    let lock = lock_store(st, store)?;
    let failed = |message: String| ApiError::Failed {
        code: "ERR_TRY_LOCK",
        message: format!("failed to try acquiring lock: {message}"),
    };
    let key = lock.key(resource_id).map_err(failed)?;
    lock.try_lock(&key, owner, expiry).await.map_err(failed)
}

/// Releases the lock on `resource_id` if `owner` holds it.
pub async fn unlock(
    st: &BridgeState,
    store: &str,
    resource_id: &str,
    owner: &str,
) -> Result<UnlockStatus, ApiError> {
    lock_configured(st)?;
    lock_fields(store, resource_id, owner)?;
    let lock = lock_store(st, store)?;
    let failed = |message: String| ApiError::Failed {
        code: "ERR_UNLOCK",
        message: format!("failed to release lock: {message}"),
    };
    let key = lock.key(resource_id).map_err(failed)?;
    lock.unlock(&key, owner).await.map_err(failed)
}

/// The configuration store `name`, or Dapr's error for a missing one.
pub fn configuration_store<'a>(
    st: &'a BridgeState,
    name: &str,
) -> Result<&'a ConfigurationStore, ApiError> {
    if st.configuration_stores.is_empty() {
        return Err(ApiError::NotConfigured {
            block: "configuration",
            code: "ERR_CONFIGURATION_STORE_NOT_CONFIGURED",
        });
    }
    st.configuration_stores
        .get(name)
        .ok_or_else(|| ApiError::StoreNotFound {
            block: "configuration",
            code: "ERR_CONFIGURATION_STORE_NOT_FOUND",
            name: name.to_string(),
        })
}

/// The items of `keys` that exist (no keys: all of them).
pub async fn get_configuration(
    st: &BridgeState,
    store: &str,
    keys: &[String],
) -> Result<BTreeMap<String, ConfigItem>, ApiError> {
    configuration_store(st, store)?
        .get(keys)
        .await
        .map_err(|e| ApiError::Failed {
            code: "ERR_CONFIGURATION_GET",
            message: format!("failed to get {keys:?} from Configuration store {store}: {e}"),
        })
}

/// Starts watching `keys` of `store`: the watch's id and its changes.
pub async fn subscribe_configuration(
    st: &BridgeState,
    store: &str,
    keys: Vec<String>,
    metadata: &BTreeMap<String, String>,
) -> Result<(String, Changes), ApiError> {
    let watch_store = configuration_store(st, store)?;
    if st.configuration_watches.open() >= super::configuration::MAX_WATCHES {
        return Err(ApiError::Failed {
            code: "ERR_CONFIGURATION_SUBSCRIBE",
            message: format!(
                "failed to subscribe {keys:?} from Configuration store {store}: {} subscriptions are open already (unsubscribe some)",
                super::configuration::MAX_WATCHES
            ),
        });
    }
    let (changes, task) = watch_store
        .watch(keys.clone(), metadata)
        .await
        .map_err(|e| ApiError::Failed {
            code: "ERR_CONFIGURATION_SUBSCRIBE",
            message: format!("failed to subscribe {keys:?} from Configuration store {store}: {e}"),
        })?;
    Ok((st.configuration_watches.add(store, &task), changes))
}

/// Stops the watch `id`.
pub fn unsubscribe_configuration(st: &BridgeState, store: &str, id: &str) -> Result<(), ApiError> {
    configuration_store(st, store)?;
    if st.configuration_watches.remove(store, id) {
        Ok(())
    } else {
        Err(ApiError::Failed {
            code: "ERR_CONFIGURATION_UNSUBSCRIBE",
            message: format!(
                "failed to unsubscribe subscription {id} from Configuration store {store}: subscription does not exist"
            ),
        })
    }
}

/// Invokes the output binding `name` (daprd's `ERR_INVOKE_OUTPUT_BINDING` on any failure).
pub async fn invoke_binding(
    st: &BridgeState,
    name: &str,
    operation: &str,
    data: bytes::Bytes,
    metadata: &BTreeMap<String, String>,
) -> Result<Option<BindingResponse>, ApiError> {
    let failed = |e: String| ApiError::Failed {
        code: "ERR_INVOKE_OUTPUT_BINDING",
        message: format!("error invoking output binding {name}: {e}"),
    };
    let binding = st
        .output_bindings
        .get(name)
        .ok_or_else(|| failed(format!("couldn't find output binding {name}")))?;
    binding
        .invoke(operation, data, metadata)
        .await
        .map_err(failed)
}

/// A registered component, as `GetMetadata` shows it.
pub struct ComponentView<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub version: &'a str,
    pub capabilities: &'static [&'static str],
    /// What the last probe found (None: a component with nothing to probe).
    pub status: Option<super::health::Status>,
}

/// The components in scope, with the capabilities we implement.
pub fn components(st: &BridgeState) -> Vec<ComponentView<'_>> {
    st.components
        .iter()
        .map(|c| ComponentView {
            name: &c.name,
            kind: &c.kind,
            version: &c.version,
            capabilities: match c.block() {
                "state" => &["ETAG", "TRANSACTIONAL"],
                _ => &[],
            },
            status: st.health.get(&c.name),
        })
        .collect()
}

/// How the bridge reaches the app, as `GetMetadata` shows it (`appConnectionProperties`).
pub struct AppConnection {
    pub port: u16,
    pub protocol: &'static str,
    pub channel_address: String,
}

/// The app's address and protocol, when the app listens on TCP.
pub fn app_connection(st: &BridgeState) -> Option<AppConnection> {
    match &st.app_address {
        Some(crate::config::Address::Tcp(a)) => Some(AppConnection {
            port: a.port(),
            protocol: match st.app_protocol {
                crate::config::AppProtocol::Http => "http",
                crate::config::AppProtocol::Grpc => "grpc",
            },
            channel_address: a.ip().to_string(),
        }),
        _ => None,
    }
}

/// The runtime version `GetMetadata` reports.
pub const RUNTIME_VERSION: &str = concat!("outrigger-", env!("CARGO_PKG_VERSION"));

/// `PUT /v1.0/metadata/{key}`, `SetMetadata`.
pub fn set_metadata(st: &BridgeState, key: String, value: String) {
    st.extended.lock().expect("not poisoned").insert(key, value);
}

/// The extended metadata: what was set so far, an `outrigger.skipped.<name>` entry for
/// each component skipped under `spec.ignoreErrors` (`<type> (<file:line>): <error>`), and an
/// `outrigger.health.<name>` entry for each probed component ([`super::health`]).
pub fn extended(st: &BridgeState) -> BTreeMap<String, String> {
    let mut out = st.extended.lock().expect("not poisoned").clone();
    out.extend(st.skipped.iter().map(|s| s.extended_entry()));
    out.extend(st.health.extended_entries());
    out
}

/// The same graceful stop as SIGTERM (`graceful: false`, a fast stop). Returns at once; the
/// stop runs after the caller has answered.
pub fn shutdown(st: &BridgeState, graceful: bool) {
    let control = st.control.clone();
    tokio::spawn(async move {
        let _ = control.send(Control::Shutdown { graceful }).await;
    });
}

/// Whether the bridge serves (`/v1.0/healthz`).
pub fn ready(st: &BridgeState) -> bool {
    st.ready.load(Ordering::Acquire)
}
