//! Subscriptions: what the app asks for in `GET /dapr/subscribe` (programmatic, v1 `route` or
//! v2 `routes`) and what `Subscription` YAML resources declare (`dapr.io/v2alpha1`, anything
//! else read as `v1alpha1`). Both become [`Subscription`]s whose rules pick the app path for an
//! event.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::cel;

/// Where a subscription came from (reported by `/v1.0/metadata` as `type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Programmatic,
    Declarative,
    /// A gRPC `SubscribeTopicEventsAlpha1` stream (for as long as it is open).
    Streaming,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Programmatic => "PROGRAMMATIC",
            Source::Declarative => "DECLARATIVE",
            Source::Streaming => "STREAMING",
        }
    }
}

/// One routing rule: when `matcher` accepts the event (or is absent), deliver to `path`.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The `match` text as given ("" for the default route).
    pub text: String,
    pub matcher: Option<cel::Expr>,
    pub path: String,
}

/// `bulkSubscribe` with `enabled: true`: events go to the app in envelopes of up to
/// `max_messages`, sent when full or `max_await` after their first event arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkSubscribe {
    pub max_messages: usize,
    pub max_await: Duration,
}

/// daprd's defaults (`pkg/runtime/pubsub/bulksubscriber.go`): 100 messages, 1 s.
pub const BULK_DEFAULT_MAX_MESSAGES: usize = 100;
pub const BULK_DEFAULT_MAX_AWAIT: Duration = Duration::from_millis(1000);

/// A topic subscription.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub pubsubname: String,
    pub topic: String,
    /// In order; the default route (if any) is last.
    pub rules: Vec<Rule>,
    pub dead_letter_topic: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// App ids this applies to (declarative `scopes`); empty means every app.
    pub scopes: Vec<String>,
    pub source: Source,
    /// Bulk delivery (`bulkSubscribe.enabled`); None: one event per request.
    pub bulk: Option<BulkSubscribe>,
}

impl Subscription {
    /// `metadata.rawPayload` is true: events arrive unwrapped and are wrapped for the app.
    pub fn raw_payload(&self) -> bool {
        self.metadata
            .get("rawPayload")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// The app path for `event`: the first rule that matches.
    pub fn route(&self, event: &Value) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| r.matcher.as_ref().is_none_or(|m| m.matches(event)))
            .map(|r| r.path.as_str())
    }

    /// Whether the subscription applies to `app_id`.
    pub fn in_scope(&self, app_id: &str) -> bool {
        self.scopes.is_empty() || self.scopes.iter().any(|s| s == app_id)
    }
}

#[derive(Deserialize)]
struct Routes {
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Deserialize)]
struct RawRule {
    #[serde(default, rename = "match")]
    matcher: String,
    path: String,
}

/// The JSON element of `/dapr/subscribe` and the `spec` of a Subscription resource.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    pubsubname: String,
    #[serde(default)]
    topic: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    routes: Option<Routes>,
    #[serde(default)]
    metadata: BTreeMap<String, Value>,
    #[serde(default)]
    dead_letter_topic: Option<String>,
    #[serde(default)]
    bulk_subscribe: Option<RawBulk>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBulk {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    max_messages_count: Option<i64>,
    #[serde(default)]
    max_await_duration_ms: Option<i64>,
}

impl RawBulk {
    /// Enabled: the settings, a missing or non-positive value taking daprd's default.
    fn settings(&self) -> Option<BulkSubscribe> {
        self.enabled.then(|| BulkSubscribe {
            max_messages: self
                .max_messages_count
                .filter(|&n| n > 0)
                .map_or(BULK_DEFAULT_MAX_MESSAGES, |n| n as usize),
            max_await: self
                .max_await_duration_ms
                .filter(|&n| n > 0)
                .map_or(BULK_DEFAULT_MAX_AWAIT, |n| Duration::from_millis(n as u64)),
        })
    }
}

fn metadata_strings(m: BTreeMap<String, Value>) -> BTreeMap<String, String> {
    m.into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect()
}

/// Paths are sent as `/path`.
fn normalize_path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

/// Builds a subscription from a spec; `v2` says whether `routes` (v2) or `route` (v1) is read
/// first. Returns `Ok(None)` for a subscription without any route (dropped with a warning).
fn from_spec(
    raw: RawSpec,
    source: Source,
    scopes: Vec<String>,
) -> Result<Option<Subscription>, String> {
    if raw.pubsubname.is_empty() {
        return Err("expected a pubsubname, found nothing".to_string());
    }
    if raw.topic.is_empty() {
        return Err(format!(
            "subscription to pubsub {:?}: expected a topic, found nothing",
            raw.pubsubname
        ));
    }
    let mut rules = Vec::new();
    let mut default = None;
    if let Some(Routes {
        rules: raw_rules,
        default: d,
    }) = raw.routes
    {
        for r in raw_rules {
            let matcher = if r.matcher.trim().is_empty() {
                None
            } else {
                Some(cel::parse(&r.matcher).map_err(|e| {
                    format!("topic {:?}: rule match {:?}: {e}", raw.topic, r.matcher)
                })?)
            };
            rules.push(Rule {
                text: r.matcher,
                matcher,
                path: normalize_path(&r.path),
            });
        }
        default = d.filter(|d| !d.is_empty());
    }
    // `routes.default` is appended as the last rule; without one, `route` is.
    if let Some(path) = default.or(raw.route.filter(|r| !r.is_empty())) {
        rules.push(Rule {
            text: String::new(),
            matcher: None,
            path: normalize_path(&path),
        });
    }
    if rules.is_empty() {
        tracing::warn!(pubsub = %raw.pubsubname, topic = %raw.topic, "subscription has no route; ignored");
        return Ok(None);
    }
    Ok(Some(Subscription {
        pubsubname: raw.pubsubname,
        topic: raw.topic,
        rules,
        dead_letter_topic: raw.dead_letter_topic.filter(|t| !t.is_empty()),
        metadata: metadata_strings(raw.metadata),
        scopes,
        source,
        bulk: raw.bulk_subscribe.as_ref().and_then(RawBulk::settings),
    }))
}

/// A subscription a gRPC app listed (`ListTopicSubscriptions`): paths are sent as given (the
/// app routes by them, `""` for the default), and there is always a default rule.
pub fn from_app_callback(
    pubsubname: String,
    topic: String,
    metadata: BTreeMap<String, String>,
    rules: Vec<(String, String)>,
    default: String,
    dead_letter_topic: String,
) -> Result<Subscription, String> {
    if pubsubname.is_empty() || topic.is_empty() {
        return Err(format!(
            "expected a pubsub name and a topic, found {pubsubname:?} and {topic:?}"
        ));
    }
    let mut compiled = Vec::with_capacity(rules.len() + 1);
    for (text, path) in rules {
        let matcher = if text.trim().is_empty() {
            None
        } else {
            Some(
                cel::parse(&text)
                    .map_err(|e| format!("topic {topic:?}: rule match {text:?}: {e}"))?,
            )
        };
        compiled.push(Rule {
            text,
            matcher,
            path,
        });
    }
    compiled.push(Rule {
        text: String::new(),
        matcher: None,
        path: default,
    });
    Ok(Subscription {
        pubsubname,
        topic,
        rules: compiled,
        dead_letter_topic: Some(dead_letter_topic).filter(|t| !t.is_empty()),
        metadata,
        scopes: Vec::new(),
        source: Source::Programmatic,
        // Bulk delivery to a gRPC app (OnBulkTopicEventAlpha1) is not implemented.
        bulk: None,
    })
}

/// Parses the app's `GET /dapr/subscribe` answer. An element that cannot be used is skipped
/// with the reason in the returned error list (the app is up; there is no start-up to stop).
pub fn parse_programmatic(body: &[u8]) -> (Vec<Subscription>, Vec<String>) {
    let items: Vec<Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items,
        Ok(Value::Null) => Vec::new(),
        Ok(other) => {
            return (
                Vec::new(),
                vec![format!(
                    "/dapr/subscribe: expected a JSON array, found {}",
                    super::cloudevent::kind_of(&other)
                )],
            );
        }
        Err(e) => {
            return (
                Vec::new(),
                vec![format!("/dapr/subscribe: invalid JSON: {e}")],
            );
        }
    };
    let mut subs = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let res = serde_json::from_value::<RawSpec>(item)
            .map_err(|e| e.to_string())
            .and_then(|raw| from_spec(raw, Source::Programmatic, Vec::new()));
        match res {
            Ok(Some(s)) => subs.push(s),
            Ok(None) => {}
            Err(e) => errors.push(format!("/dapr/subscribe: element {i}: {e}")),
        }
    }
    (subs, errors)
}

#[derive(Deserialize)]
struct Resource {
    #[serde(default, rename = "apiVersion")]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: ResourceMeta,
    #[serde(default)]
    spec: Option<Value>,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Default, Deserialize)]
struct ResourceMeta {
    #[serde(default)]
    name: String,
}

/// Parses the `kind: Subscription` documents of one YAML file (others are skipped). Every
/// problem is reported with the file and document name, so start-up can fail with all of them.
pub fn parse_declarative(yaml: &str, file: &Path) -> Result<Vec<Subscription>, Vec<String>> {
    let mut subs = Vec::new();
    let mut errors = Vec::new();
    // Before serde_norway, whose scanner is slow on deep nesting.
    if let Err(deep) = crate::config::file_limits::check_shape(yaml) {
        return Err(vec![format!(
            "{}:{}:{}: {}",
            file.display(),
            deep.line,
            deep.column,
            deep.message
        )]);
    }
    for (i, doc) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{}: document {}: {e}", file.display(), i + 1));
                // A syntax error ends the stream: the iterator would yield it again forever
                // (found by the generative tests: memory grew until the process was killed).
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        match parse_document(value) {
            Ok(Some(sub)) => subs.push(sub),
            Ok(None) => {}
            Err(e) => errors.push(format!("{}: document {}: {e}", file.display(), i + 1)),
        }
    }
    if errors.is_empty() {
        Ok(subs)
    } else {
        Err(errors)
    }
}

/// One YAML document of a resources file, as JSON: its `Subscription` (None for another kind,
/// or a subscription that routes nowhere), or what is wrong with it — without the file, which
/// the caller names with the document's position.
pub fn parse_document(value: Value) -> Result<Option<Subscription>, String> {
    let res: Resource = serde_json::from_value(value).map_err(|e| e.to_string())?;
    if res.kind != "Subscription" {
        return Ok(None);
    }
    let at = format!(
        "Subscription {:?}",
        if res.metadata.name.is_empty() {
            "(unnamed)"
        } else {
            &res.metadata.name
        }
    );
    let Some(spec) = res.spec else {
        return Err(format!("{at}: expected a spec, found nothing"));
    };
    let mut raw =
        serde_json::from_value::<RawSpec>(spec).map_err(|e| format!("{at}: spec: {e}"))?;
    // v1alpha1 (and any other apiVersion) routes with `spec.route` only.
    if res.api_version != "dapr.io/v2alpha1" {
        raw.routes = None;
    }
    from_spec(raw, Source::Declarative, res.scopes).map_err(|e| format!("{at}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn programmatic_v1_and_v2() {
        let body = json!([
            {"pubsubname": "ps", "topic": "a", "route": "a-handler", "bulkSubscribe": {"enabled": true}},
            {"pubsubname": "ps", "topic": "b", "routes": {
                "rules": [{"match": "event.type == \"x\"", "path": "/x"}], "default": "/other"},
             "deadLetterTopic": "dead", "metadata": {"rawPayload": "true"},
             "bulkSubscribe": {"enabled": true, "maxMessagesCount": 5, "maxAwaitDurationMs": 40}},
            {"pubsubname": "ps", "topic": "c"},
            {"pubsubname": "ps", "topic": "d", "routes": {"rules": [{"match": "event.type ==", "path": "/d"}]}}
        ]);
        let (subs, errors) = parse_programmatic(body.to_string().as_bytes());
        assert_eq!(subs.len(), 2, "{errors:?}");
        assert_eq!(subs[0].rules[0].path, "/a-handler");
        assert_eq!(
            subs[0].bulk,
            Some(BulkSubscribe {
                max_messages: BULK_DEFAULT_MAX_MESSAGES,
                max_await: BULK_DEFAULT_MAX_AWAIT
            })
        );
        let b = &subs[1];
        assert_eq!(
            b.bulk,
            Some(BulkSubscribe {
                max_messages: 5,
                max_await: Duration::from_millis(40)
            })
        );
        assert_eq!(b.route(&json!({"type": "x"})), Some("/x"));
        assert_eq!(b.route(&json!({"type": "y"})), Some("/other"));
        assert_eq!(b.dead_letter_topic.as_deref(), Some("dead"));
        assert!(b.raw_payload());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("element 3") && errors[0].contains("topic \"d\""),
            "{errors:?}"
        );
    }

    #[test]
    fn declarative_versions_scopes_and_errors() {
        let yaml = r#"
apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata: {name: order}
spec:
  pubsubname: pubsub
  topic: orders
  routes: {rules: [{match: 'event.type == "x"', path: /x}], default: /checkout}
  deadLetterTopic: poison
scopes: [shop]
---
apiVersion: dapr.io/v1alpha1
kind: Subscription
metadata: {name: old}
spec: {pubsubname: pubsub, topic: legacy, route: /legacy, routes: {rules: [{path: /ignored}]}}
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {name: pubsub}
spec: {type: pubsub.redis}
"#;
        let subs = parse_declarative(yaml, Path::new("subs.yaml")).unwrap();
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[0].rules.len(), 2);
        assert!(subs[0].in_scope("shop") && !subs[0].in_scope("other"));
        assert_eq!(subs[1].rules.len(), 1);
        assert_eq!(subs[1].rules[0].path, "/legacy");
        let bad = "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: bad}\nspec: {pubsubname: p, topic: t, routes: {rules: [{match: 'event.type = 1', path: /x}]}}\n";
        let errors = parse_declarative(bad, Path::new("bad.yaml")).unwrap_err();
        assert!(
            errors[0]
                .starts_with("bad.yaml: document 1: Subscription \"bad\": topic \"t\": rule match"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_syntax_error_is_reported_once_not_forever() {
        let errors =
            parse_declarative("a: [\nkind: Subscription\n", Path::new("s.yaml")).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("s.yaml: document 1:"), "{errors:?}");
    }
}
