//! Dapr resources: Component YAML files from `bridge.resources` (several documents per file,
//! split on `---`), parsed into [`Component`]s with their `secretKeyRef` values resolved from
//! the named secret store. Documents of kind `Subscription` are kept raw for pub/sub; other
//! kinds (Configuration, Resiliency, …) are skipped with a debug log.
//!
//! Problems (unknown `spec.type`, a duplicate name, an unresolvable secret reference) are
//! config problems with the file and line, reported by the preflight stage ([`prepare`]) before
//! anything starts.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::document::Document;
use crate::config::{Origin, Problem};

/// State store types the bridge implements.
pub const STATE_TYPES: &[&str] = &[
    "state.in-memory",
    "state.sqlite",
    "state.redis",
    "state.postgresql",
    "state.postgres",
];
/// Pub/sub types (the broker implementations live in `bridge::pubsub`).
pub const PUBSUB_TYPES: &[&str] = &[
    "pubsub.in-memory",
    "pubsub.redis",
    "pubsub.jetstream",
    "pubsub.rabbitmq",
    "pubsub.mqtt3",
];
/// Distributed lock store types.
pub const LOCK_TYPES: &[&str] = &["lock.redis"];
/// Configuration store types.
pub const CONFIGURATION_TYPES: &[&str] = &[
    "configuration.redis",
    "configuration.postgresql",
    "configuration.postgres",
];
/// Binding types: output (`bindings.http`, `bindings.postgresql`, `bindings.redis`), input
/// (`bindings.cron`), both (`bindings.mqtt3`, `bindings.rabbitmq`).
pub const BINDING_TYPES: &[&str] = &[
    "bindings.http",
    "bindings.cron",
    "bindings.mqtt3",
    "bindings.postgresql",
    "bindings.postgres",
    "bindings.redis",
    "bindings.rabbitmq",
];
/// Secret store types the bridge implements.
pub const SECRET_TYPES: &[&str] = &["secretstores.local.file", "secretstores.local.env"];

/// The file name shown for the embedded default components.
pub const EMBEDDED: &str = "<embedded defaults>";

/// One Dapr component, as configured.
#[derive(Clone)]
pub struct Component {
    /// `metadata.name`: what API calls address (`/v1.0/state/{name}`).
    pub name: String,
    /// `spec.type`, like `state.redis` or `pubsub.jetstream`.
    pub kind: String,
    /// `spec.version` (`v1` when not given).
    pub version: String,
    /// `spec.metadata`, secret references resolved. Values may be secrets: never log them.
    pub metadata: BTreeMap<String, String>,
    /// `scopes`: the app ids that may use it (empty: every app).
    pub scopes: Vec<String>,
    /// `spec.ignoreErrors`: when it cannot be opened, the component is logged and skipped
    /// ([`Skipped`]) instead of stopping the start.
    pub ignore_errors: bool,
    /// Where it was written (for messages).
    pub file: PathBuf,
    pub line: usize,
    /// The line of each `spec.metadata` item's value, by name: a problem with one metadata key
    /// is located there ([`Component::line_of`]).
    pub lines: BTreeMap<String, usize>,
}

impl fmt::Debug for Component {
    /// Metadata keys only: values can be passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Component")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("metadata", &self.metadata.keys().collect::<Vec<_>>())
            .field("file", &self.file)
            .field("line", &self.line)
            .finish()
    }
}

impl Component {
    /// The building block: `state`, `pubsub`, `secretstores`.
    pub fn block(&self) -> &str {
        self.kind.split('.').next().unwrap_or("")
    }

    /// A metadata value, when set and not empty.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Whether the app `app_id` may use this component.
    pub fn in_scope(&self, app_id: &str) -> bool {
        self.scopes.is_empty() || self.scopes.iter().any(|s| s == app_id)
    }

    /// The line a problem `message` is about: the line of the metadata key it names (as a
    /// whole word; the longest such name wins, so `redisHost` beats `host`), else the
    /// component's first line.
    pub fn line_of(&self, message: &str) -> usize {
        let names = |key: &str| {
            message.match_indices(key).any(|(at, _)| {
                let before = message[..at].chars().next_back();
                let after = message[at + key.len()..].chars().next();
                !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        };
        self.lines
            .iter()
            .filter(|(key, _)| !key.is_empty() && names(key))
            .max_by_key(|(key, _)| key.len())
            .map_or(self.line, |(_, line)| *line)
    }

    /// `file:line` for messages.
    pub fn location(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

/// A resource document kept as written (kind `Subscription`, for pub/sub).
#[derive(Clone, Debug)]
pub struct RawDocument {
    pub file: PathBuf,
    /// The line the document starts on.
    pub line: usize,
    pub value: serde_norway::Value,
}

/// A component with `spec.ignoreErrors: true` that could not be opened: left out of
/// [`Resources::components`] (its API answers "not found"), logged, and listed in
/// `/v1.0/metadata`'s `extended` (daprd only logs it).
#[derive(Clone, Debug)]
pub struct Skipped {
    pub name: String,
    pub kind: String,
    /// `file:line`.
    pub location: String,
    pub error: String,
    /// The component's `scopes` (only this app's skipped components are shown).
    pub scopes: Vec<String>,
}

impl Skipped {
    /// Logs the skip and records it.
    pub fn new(c: &Component, error: String) -> Skipped {
        tracing::warn!(component = %c.name, kind = %c.kind, at = %c.location(), %error, "ignoring error opening component (spec.ignoreErrors); the component is skipped");
        Skipped {
            name: c.name.clone(),
            kind: c.kind.clone(),
            location: c.location(),
            error,
            scopes: c.scopes.clone(),
        }
    }

    /// The `extended` metadata entry: `outrigger.skipped.<name>` → `<type> (<file:line>): <error>`.
    pub fn extended_entry(&self) -> (String, String) {
        (
            format!("outrigger.skipped.{}", self.name),
            format!("{} ({}): {}", self.kind, self.location, self.error),
        )
    }
}

/// Everything read from the resources directory.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub components: Vec<Component>,
    /// Components skipped under `spec.ignoreErrors`.
    pub skipped: Vec<Skipped>,
    /// Documents of kind `Subscription`, for pub/sub to parse.
    pub subscriptions: Vec<RawDocument>,
}

impl Resources {
    /// The quick-start set, used without a resources directory: a `statestore` of type
    /// `state.in-memory` and a `pubsub` of type `pubsub.in-memory` (no external server).
    pub fn embedded() -> Resources {
        let component = |name: &str, kind: &str| Component {
            name: name.into(),
            kind: kind.into(),
            version: "v1".into(),
            metadata: BTreeMap::new(),
            scopes: Vec::new(),
            ignore_errors: false,
            file: PathBuf::from(EMBEDDED),
            line: 0,
            lines: BTreeMap::new(),
        };
        Resources {
            components: vec![
                component("statestore", "state.in-memory"),
                component("pubsub", "pubsub.in-memory"),
            ],
            subscriptions: Vec::new(),
            skipped: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
struct RawHead {
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawComponent {
    #[serde(default)]
    api_version: Option<String>,
    metadata: RawMeta,
    spec: RawSpec,
    #[serde(default)]
    auth: Option<RawAuth>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct RawMeta {
    name: String,
}

#[derive(Deserialize)]
struct RawSpec {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    metadata: Vec<RawItem>,
    #[serde(default, rename = "ignoreErrors")]
    ignore_errors: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAuth {
    #[serde(alias = "secretstore")]
    secret_store: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawItem {
    name: String,
    #[serde(default)]
    value: Option<serde_norway::Value>,
    #[serde(default)]
    secret_key_ref: Option<SecretKeyRef>,
}

#[derive(Deserialize)]
struct SecretKeyRef {
    name: String,
    #[serde(default)]
    key: Option<String>,
}

/// A secret reference waiting for its store.
struct Pending {
    component: usize,
    item: String,
    store: Option<String>,
    secret: SecretKeyRef,
    problem_at: Problem,
}

/// Reads the resources directory (`None`: the embedded defaults). Problems are pushed, with
/// their file and line; what could be read is returned.
/// Components of every app are read; [`prepare`] checks only this app's beyond their type (a
/// shared directory may hold other apps' components).
pub fn load(dir: Option<&Path>, problems: &mut Vec<Problem>) -> Resources {
    let Some(dir) = dir else {
        return Resources::embedded();
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect(),
        Err(e) => {
            problems.push(whole(
                dir,
                format!("cannot read the resources directory: {e}"),
            ));
            return Resources::default();
        }
    };
    files.sort();
    let mut out = Resources::default();
    let mut pending = Vec::new();
    for file in &files {
        let text = match crate::config::file_limits::read(file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(whole(file, format!("cannot read the resource file: {e}")));
                continue;
            }
        };
        for (offset, piece) in split_documents(&text) {
            read_document(file, offset, piece, &mut out, &mut pending, problems);
        }
    }
    resolve_secrets(&mut out, pending, problems);
    out
}

/// What the preflight stage built from the resources directory, kept for the bridge so that
/// nothing is read, parsed or built twice: the components, the pub/sub brokers of this app's
/// components (built, connected to nothing yet) and the parsed `Subscription` documents.
pub struct Prepared {
    pub resources: Resources,
    /// This app's `pubsub.*` components' brokers, in file order, by component name.
    pub brokers: Vec<(
        String,
        std::sync::Arc<dyn crate::bridge::pubsub::broker::Broker>,
    )>,
    /// Every `Subscription` document (all scopes: pub/sub keeps this app's).
    pub declarative: Vec<crate::bridge::pubsub::subscription::Subscription>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("resources", &self.resources)
            .field(
                "brokers",
                &self.brokers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("declarative", &self.declarative.len())
            .finish()
    }
}

/// The deep check of `bridge.resources` (the preflight stage): reads the directory ([`load`]),
/// builds this app's pub/sub brokers (building one validates its metadata and opens no
/// connection) and parses the `Subscription` documents. Every problem is pushed with its file
/// and line, so `outrigger check` sees them and `run` refuses them with exit 78; what was built
/// is returned for the bridge to use.
pub fn prepare(dir: Option<&Path>, app_id: &str, problems: &mut Vec<Problem>) -> Prepared {
    let mut resources = load(dir, problems);
    let mut brokers = Vec::new();
    let mut failed = Vec::new();
    for (i, c) in resources.components.iter().enumerate() {
        if !c.in_scope(app_id) {
            continue;
        }
        // Built (brokers) or checked without opening anything (stores): a problem is located
        // at the component, unless `spec.ignoreErrors` says to skip it.
        let outcome = match c.block() {
            "pubsub" => {
                crate::bridge::pubsub::broker::build(c).map(|b| brokers.push((c.name.clone(), b)))
            }
            "state" => crate::bridge::state::Store::check(c),
            "secretstores" => crate::bridge::secrets::SecretStore::new(c).map(drop),
            "lock" => crate::bridge::lock::LockStore::check(c),
            "configuration" => crate::bridge::configuration::ConfigurationStore::check(c),
            "bindings" if crate::bridge::input_bindings::INPUT_TYPES.contains(&c.kind.as_str()) => {
                crate::bridge::input_bindings::InputBinding::check(c)
            }
            "bindings" => crate::bridge::bindings::OutputBinding::check(c),
            _ => Ok(()),
        };
        let Err(e) = outcome else { continue };
        // The broker's message names the file already; keep the line.
        let message = e
            .strip_prefix(&format!("{}: ", c.file.display()))
            .unwrap_or(&e)
            .to_string();
        if c.ignore_errors {
            failed.push((i, message));
            continue;
        }
        problems.push(Problem {
            origin: Origin::File {
                file: c.file.display().to_string(),
                line: c.line_of(&message).max(1),
                column: 1,
            },
            path: String::new(),
            message: format!("component {:?}: {message}", c.name),
        });
    }
    for (i, message) in failed.into_iter().rev() {
        let c = resources.components.remove(i);
        resources.skipped.push(Skipped::new(&c, message));
    }
    // Another app's skipped component (an unknown type) is not this app's concern.
    resources
        .skipped
        .retain(|s| s.scopes.is_empty() || s.scopes.iter().any(|a| a == app_id));
    // Each document read above, located at its first line (its problems were file-wide).
    let mut declarative = Vec::new();
    for doc in &resources.subscriptions {
        let parsed = serde_json::Value::deserialize(doc.value.clone())
            .map_err(|e| e.to_string())
            .and_then(crate::bridge::pubsub::subscription::parse_document);
        match parsed {
            Ok(Some(s)) => declarative.push(s),
            Ok(None) => {}
            Err(message) => problems.push(Problem {
                origin: Origin::File {
                    file: doc.file.display().to_string(),
                    line: doc.line,
                    column: 1,
                },
                path: String::new(),
                message,
            }),
        }
    }
    Prepared {
        resources,
        brokers,
        declarative,
    }
}

fn whole(path: &Path, message: String) -> Problem {
    Problem {
        origin: Origin::Whole {
            file: path.display().to_string(),
        },
        path: String::new(),
        message,
    }
}

/// The documents of a multi-document YAML file, each with the number of lines before it.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") {
            if !current.trim().is_empty() {
                docs.push((start, std::mem::take(&mut current)));
            }
            current.clear();
            // The separator line stays as a blank line, so positions need no shift inside.
            start = i + 1;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    if !current.trim().is_empty() {
        docs.push((start, current));
    }
    docs
}

/// Moves a problem found in a document down by the lines before that document.
fn shifted(mut p: Problem, offset: usize) -> Problem {
    if let Origin::File { line, .. } = &mut p.origin {
        *line += offset;
    }
    p
}

fn read_document(
    file: &Path,
    offset: usize,
    text: String,
    out: &mut Resources,
    pending: &mut Vec<Pending>,
    problems: &mut Vec<Problem>,
) {
    let doc = match Document::parse(file, &text) {
        Ok(d) => d,
        Err(p) => {
            problems.push(shifted(p, offset));
            return;
        }
    };
    let kind = match doc.deserialize::<RawHead>() {
        Ok(h) => h.kind.unwrap_or_default(),
        Err(ps) => {
            problems.extend(ps.into_iter().map(|p| shifted(p, offset)));
            return;
        }
    };
    match kind.as_str() {
        "Component" => {}
        "Subscription" => {
            if let Ok(value) = doc.deserialize::<serde_norway::Value>() {
                out.subscriptions.push(RawDocument {
                    file: file.to_path_buf(),
                    // Its first key (not a comment or separator before it).
                    line: match doc.origin("", false) {
                        Origin::File { line, .. } => line + offset,
                        _ => offset + 1,
                    },
                    value,
                });
            }
            return;
        }
        other => {
            tracing::debug!(file = %file.display(), kind = other, "resource kind not used by the bridge; skipped");
            return;
        }
    }
    let raw = match doc.deserialize::<RawComponent>() {
        Ok(r) => r,
        Err(ps) => {
            problems.extend(ps.into_iter().map(|p| shifted(p, offset)));
            return;
        }
    };
    let line = match doc.origin("", false) {
        Origin::File { line, .. } => line + offset,
        _ => offset + 1,
    };
    if let Some(v) = &raw.api_version
        && v != "dapr.io/v1alpha1"
    {
        problems.push(shifted(
            doc.problem(
                "apiVersion",
                format!("expected dapr.io/v1alpha1 for a Component, found {v:?}"),
            ),
            offset,
        ));
    }
    let kind = raw.spec.kind.clone();
    let known = STATE_TYPES
        .iter()
        .chain(PUBSUB_TYPES)
        .chain(SECRET_TYPES)
        .chain(LOCK_TYPES)
        .chain(CONFIGURATION_TYPES)
        .chain(BINDING_TYPES)
        .any(|t| *t == kind);
    if !known {
        let message = format!(
            "unknown component type {kind:?} (component {:?}); supported: {}",
            raw.metadata.name,
            STATE_TYPES
                .iter()
                .chain(PUBSUB_TYPES)
                .chain(SECRET_TYPES)
                .chain(LOCK_TYPES)
                .chain(CONFIGURATION_TYPES)
                .chain(BINDING_TYPES)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        );
        if raw.spec.ignore_errors {
            let c = Component {
                name: raw.metadata.name,
                kind,
                version: raw.spec.version.unwrap_or_else(|| "v1".into()),
                metadata: BTreeMap::new(),
                scopes: raw.scopes,
                ignore_errors: true,
                file: file.to_path_buf(),
                line,
                lines: BTreeMap::new(),
            };
            out.skipped.push(Skipped::new(&c, message));
        } else {
            problems.push(shifted(doc.problem("spec.type", message), offset));
        }
        return;
    }
    let version = raw.spec.version.clone().unwrap_or_else(|| "v1".into());
    if version != "v1" {
        problems.push(shifted(
            doc.problem(
                "spec.version",
                format!("expected v1 for {kind}, found {version:?}"),
            ),
            offset,
        ));
    }
    if raw.metadata.name.is_empty() || raw.metadata.name.contains('/') {
        problems.push(shifted(
            doc.problem(
                "metadata.name",
                format!(
                    "expected a component name without '/', found {:?}",
                    raw.metadata.name
                ),
            ),
            offset,
        ));
        return;
    }
    if let Some(other) = out.components.iter().find(|c| c.name == raw.metadata.name) {
        problems.push(shifted(
            doc.problem(
                "metadata.name",
                format!(
                    "a component named {:?} is already defined at {}",
                    raw.metadata.name,
                    other.location()
                ),
            ),
            offset,
        ));
        return;
    }
    let index = out.components.len();
    let mut metadata = BTreeMap::new();
    let mut lines = BTreeMap::new();
    for (i, item) in raw.spec.metadata.into_iter().enumerate() {
        let at = |path: &str| match doc.origin(path, false) {
            Origin::File { line, .. } => Some(line + offset),
            _ => None,
        };
        if let Some(line) = at(&format!("spec.metadata[{i}].value"))
            .or_else(|| at(&format!("spec.metadata[{i}].secretKeyRef")))
            .or_else(|| at(&format!("spec.metadata[{i}]")))
        {
            lines.insert(item.name.clone(), line);
        }
        match (item.value, item.secret_key_ref) {
            (_, Some(secret)) => pending.push(Pending {
                component: index,
                item: item.name,
                store: raw.auth.as_ref().and_then(|a| a.secret_store.clone()),
                secret,
                problem_at: shifted(
                    doc.problem(&format!("spec.metadata[{i}].secretKeyRef"), ""),
                    offset,
                ),
            }),
            (Some(v), None) => {
                metadata.insert(item.name, scalar(&v));
            }
            (None, None) => {
                metadata.insert(item.name, String::new());
            }
        }
    }
    out.components.push(Component {
        name: raw.metadata.name,
        kind,
        version,
        metadata,
        scopes: raw.scopes,
        ignore_errors: raw.spec.ignore_errors,
        file: file.to_path_buf(),
        line,
        lines,
    });
}

/// A metadata value as the string Dapr would see (`5` and `true` are written unquoted).
fn scalar(v: &serde_norway::Value) -> String {
    match v {
        serde_norway::Value::String(s) => s.clone(),
        serde_norway::Value::Null => String::new(),
        serde_norway::Value::Bool(b) => b.to_string(),
        serde_norway::Value::Number(n) => n.to_string(),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn resolve_secrets(out: &mut Resources, pending: Vec<Pending>, problems: &mut Vec<Problem>) {
    if pending.is_empty() {
        return;
    }
    let stores: Vec<&Component> = out
        .components
        .iter()
        .filter(|c| c.block() == "secretstores")
        .collect();
    let mut built: BTreeMap<String, Result<super::secrets::SecretStore, String>> = BTreeMap::new();
    let mut resolved = Vec::new();
    for p in pending {
        let fail = |message: String| Problem {
            message,
            ..p.problem_at.clone()
        };
        let store = match &p.store {
            Some(name) => stores.iter().find(|c| c.name == *name),
            // Without `auth.secretStore`, the one secret store there is.
            None if stores.len() == 1 => stores.first(),
            None => {
                problems.push(fail(format!(
                    "expected auth.secretStore naming the secret store for secretKeyRef {:?} ({} secret stores are defined)",
                    p.secret.name,
                    stores.len()
                )));
                continue;
            }
        };
        let Some(store) = store else {
            problems.push(fail(format!(
                "expected a secret store component named {:?} (auth.secretStore), found none",
                p.store.clone().unwrap_or_default()
            )));
            continue;
        };
        let built = built
            .entry(store.name.clone())
            .or_insert_with(|| super::secrets::SecretStore::new(store));
        let store = match built {
            Ok(s) => s,
            Err(e) => {
                problems.push(fail(format!(
                    "cannot open secret store {:?}: {e}",
                    store.name
                )));
                continue;
            }
        };
        let key = p
            .secret
            .key
            .clone()
            .unwrap_or_else(|| p.secret.name.clone());
        match store.get(&p.secret.name).and_then(|m| m.get(&key).cloned()) {
            Some(v) => resolved.push((p.component, p.item, v)),
            None => problems.push(fail(format!(
                "expected secret {:?} with key {key:?} in the secret store, found none",
                p.secret.name
            ))),
        }
    }
    for (component, item, value) in resolved {
        out.components[component].metadata.insert(item, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> (Resources, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.yaml"), text).unwrap();
        let mut problems = Vec::new();
        let r = prepare(Some(dir.path()), "app", &mut problems).resources;
        (r, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn documents_kinds_and_lines() {
        let (r, problems) = load_text(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: s}\nspec:\n  type: state.redis\n  metadata:\n  - {name: redisHost, value: \"localhost:6379\"}\n  - {name: n, value: 5}\n---\nkind: Subscription\nmetadata: {name: sub}\nspec: {topic: t, pubsubname: p, route: /t}\n---\nkind: Resiliency\n---\nkind: Component\nmetadata: {name: x}\nspec: {type: state.mongodb}\n",
        );
        assert_eq!(r.components.len(), 1);
        assert_eq!(r.components[0].meta("redisHost"), Some("localhost:6379"));
        assert_eq!(r.components[0].meta("n"), Some("5"));
        assert_eq!(r.subscriptions.len(), 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("c.yaml:18:14: spec.type"),
            "{problems:?}"
        );
        assert!(problems[0].contains("unknown component type \"state.mongodb\""));
    }

    #[test]
    fn metadata_problems_are_located_at_their_key() {
        let (_, problems) = load_text(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: q\nspec:\n  type: pubsub.rabbitmq\n  version: v1\n  metadata:\n  - name: host\n    value: amqp://localhost\n  - name: prefetchCount\n    value: lots\n",
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("c.yaml:12:"), "{problems:?}");
        // A problem that names no key stays at the component's first line.
        let c = Component {
            name: "c".into(),
            kind: "state.redis".into(),
            version: "v1".into(),
            metadata: BTreeMap::new(),
            scopes: Vec::new(),
            ignore_errors: false,
            file: "c.yaml".into(),
            line: 3,
            lines: [("host".to_string(), 7), ("redisHost".to_string(), 9)].into(),
        };
        assert_eq!(c.line_of("expected redisHost as host:port"), 9);
        assert_eq!(c.line_of("cannot open"), 3);
        assert_eq!(c.line_of("hostname missing"), 3);
    }

    #[test]
    fn secret_references_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets.json");
        std::fs::write(&secrets, r#"{"redis": {"password": "pw"}}"#).unwrap();
        let text = format!(
            "kind: Component\nmetadata: {{name: local}}\nspec:\n  type: secretstores.local.file\n  metadata:\n  - {{name: secretsFile, value: {}}}\n---\nkind: Component\nmetadata: {{name: s}}\nspec:\n  type: state.redis\n  metadata:\n  - name: redisPassword\n    secretKeyRef: {{name: \"redis:password\"}}\n  - name: other\n    secretKeyRef: {{name: missing}}\n  - {{name: redisHost, value: \"localhost:6379\"}}\nauth: {{secretStore: local}}\n",
            secrets.display()
        );
        let (r, problems) = load_text(&text);
        let s = r.components.iter().find(|c| c.name == "s").unwrap();
        assert_eq!(s.meta("redisPassword"), Some("pw"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains(":16:"), "{problems:?}");
    }
}
