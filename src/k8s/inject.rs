//! `outrigger inject`: Kubernetes YAML in (one or more documents, from a file or stdin), the same
//! YAML out with Outrigger added to every pod template it finds (Pod, Deployment, StatefulSet,
//! DaemonSet, ReplicaSet, Job, CronJob, and `List`s of them); every other document passes
//! through. The pod spec change itself is [`super::sidecar::inject_pod`].
//!
//! Documents are read as JSON values (keys come out sorted, as `kubectl get -o yaml` writes
//! them; comments and anchors are not kept).

use serde::Deserialize;
use serde_json::Value;

use super::sidecar::{Options, Outcome, Owner, inject_pod};

/// Why the input could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// Not YAML (with the position, when the parser has one).
    #[error("{0}")]
    Yaml(String),
    /// A workload that cannot be injected: which document, which object, what is wrong.
    #[error("{source_name}: document {document} ({object}): {message}")]
    Workload {
        source_name: String,
        document: usize,
        object: String,
        message: String,
    },
}

/// What was done to one workload, for the summary on stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `Deployment shop/web`.
    pub object: String,
    pub outcome: Outcome,
}

/// Reads every YAML document of `text` (empty documents are dropped).
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Value>, InjectError> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("{source_name}:{}:{}", l.line(), l.column()))
                .unwrap_or_else(|| source_name.to_string());
            InjectError::Yaml(format!("{at}: {e}"))
        })?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Writes documents as YAML, `---` between them.
///
/// With yaml-rust2's emitter, not serde_norway's: Kubernetes reads YAML 1.1, where a plain
/// `on`, `yes` or `n` is a boolean, and serde_norway writes those strings unquoted (a ConfigMap
/// value `"on"` would come back as `true` and be refused). yaml-rust2 quotes them, and numbers
/// and nulls written as strings. Multi-line strings (files in ConfigMaps) stay literal blocks.
pub fn render(docs: &[Value]) -> String {
    let mut out = String::new();
    for doc in docs {
        let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
        emitter.multiline_strings(true);
        emitter.dump(&to_yaml(doc)).expect("writing to a String");
        out.push('\n');
    }
    out
}

fn to_yaml(v: &Value) -> yaml_rust2::Yaml {
    use yaml_rust2::Yaml;
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => string(s),
        Value::Array(a) => Yaml::Array(a.iter().map(to_yaml).collect()),
        Value::Object(m) => Yaml::Hash(m.iter().map(|(k, v)| (string(k), to_yaml(v))).collect()),
    }
}

/// A string (value or key) that stays one for a YAML 1.1 reader. yaml-rust2 quotes YAML 1.1's
/// booleans and nulls and what Rust parses as a number, but leaves plain what Kubernetes' Go
/// reader still takes for a number or a date: `0b101`, `0o755`, `+0x1`, `1_000`, `2001-12-14`.
/// Those are written double-quoted here (JSON's quoting is valid YAML; `Yaml::Real` is written
/// as it is), and the emitter keeps every other decision.
fn string(s: &str) -> yaml_rust2::Yaml {
    if may_read_as_a_number_or_date(s) {
        yaml_rust2::Yaml::Real(serde_json::to_string(s).expect("a string serializes"))
    } else {
        yaml_rust2::Yaml::String(s.to_owned())
    }
}

/// Over-approximates YAML 1.1's int, float and timestamp forms and Go's `ParseInt`/`ParseFloat`
/// with base prefixes and `_`: a leading digit, sign or dot, then only digits, signs, `.`,
/// `_`, `:` and the letters of hex digits, base prefixes, exponents and timestamps. Quoting a
/// string that did not need it changes nothing for any reader.
fn may_read_as_a_number_or_date(s: &str) -> bool {
    // YAML 1.1's infinities and NaN, signed too (`+.inf`): the emitter quotes only some.
    let special = s.trim_start_matches(['+', '-']).to_ascii_lowercase();
    if special == ".inf" || special == ".nan" {
        return true;
    }
    s.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
        && s.chars().all(|c| {
            c.is_ascii_hexdigit()
                || matches!(
                    c,
                    '+' | '-' | '.' | '_' | ':' | 'x' | 'X' | 'o' | 'O' | 't' | 'T' | 'z' | 'Z'
                )
        })
}

/// Injects every workload of `text`; returns the new YAML and what was done.
pub fn inject_text(
    text: &str,
    source_name: &str,
    options: &Options,
) -> Result<(String, Vec<Report>), InjectError> {
    let mut docs = parse(text, source_name)?;
    let mut reports = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        inject_object(doc, options, &mut reports).map_err(|(object, message)| {
            InjectError::Workload {
                source_name: source_name.to_string(),
                document: i + 1,
                object,
                message,
            }
        })?;
    }
    Ok((render(&docs), reports))
}

/// `Kind namespace/name` of an object, for messages.
pub fn describe(object: &Value) -> String {
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("?");
    let meta = object.get("metadata");
    let name = meta
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("?");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The kinds `inject` changes, with the one apiVersion of each it knows.
pub const WORKLOADS: &[(&str, &str)] = &[
    ("Pod", "v1"),
    ("Deployment", "apps/v1"),
    ("StatefulSet", "apps/v1"),
    ("DaemonSet", "apps/v1"),
    ("ReplicaSet", "apps/v1"),
    ("Job", "batch/v1"),
    ("CronJob", "batch/v1"),
];

/// Whether an object of a kind we do not know looks like it makes pods (`spec.template.spec`
/// or `spec.jobTemplate…` with containers).
fn has_pod_template(object: &Value) -> bool {
    [
        "/spec/template/spec/containers",
        "/spec/jobTemplate/spec/template/spec/containers",
    ]
    .iter()
    .any(|p| object.pointer(p).is_some_and(Value::is_array))
}

/// Injects one object (and the items of a `List`). On error: (object, message).
pub fn inject_object(
    object: &mut Value,
    options: &Options,
    reports: &mut Vec<Report>,
) -> Result<(), (String, String)> {
    let field = |k: &str| {
        object
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (kind, api) = (field("kind"), field("apiVersion"));
    // Where the pod template (its metadata and spec) is.
    let path: &[&str] = match (kind.as_str(), api.as_str()) {
        (k, _) if k.ends_with("List") => {
            let described = describe(object);
            let Some(items) = object.get_mut("items") else {
                return Ok(());
            };
            let Some(items) = items.as_array_mut() else {
                return Err((described, "items: expected a list".into()));
            };
            for item in items {
                inject_object(item, options, reports)?;
            }
            return Ok(());
        }
        ("Pod", "v1") => &[],
        ("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet", "apps/v1") => {
            &["spec", "template"]
        }
        ("Job", "batch/v1") => &["spec", "template"],
        ("CronJob", "batch/v1") => &["spec", "jobTemplate", "spec", "template"],
        // A kind we inject under an apiVersion we do not know: refused rather than passed on
        // without the sidecar (the older ones are no longer served by Kubernetes ≥ 1.25).
        (k, _) if WORKLOADS.iter().any(|(kind, _)| *kind == k) => {
            let want = WORKLOADS
                .iter()
                .find(|(kind, _)| *kind == k)
                .map(|(_, api)| *api)
                .expect("found above");
            return Err((
                describe(object),
                format!(
                    "apiVersion {api:?}: expected {want} for a {k} (the only version Kubernetes serves since 1.25); `kubectl convert` it first"
                ),
            ));
        }
        // Anything else with a pod template (a custom resource such as an Argo Rollout): its
        // pods are not injected here, and the summary says so.
        _ => {
            if has_pod_template(object) {
                reports.push(Report {
                    object: describe(object),
                    outcome: Outcome::NotAWorkload(format!(
                        "kind {kind:?} apiVersion {api:?} has a pod template, but inject knows only {}; its pods get the sidecar from the admission webhook, or not at all",
                        WORKLOADS.iter().map(|(k, a)| format!("{a} {k}")).collect::<Vec<_>>().join(", ")
                    )),
                });
            }
            return Ok(());
        }
    };
    let described = describe(object);
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut pod = &mut *object;
    for (i, key) in path.iter().enumerate() {
        let at = path[..=i].join(".");
        pod = pod
            .get_mut(*key)
            .filter(|v| v.is_object())
            .ok_or_else(|| (described.clone(), format!("{at}: expected a map")))?;
    }
    let metadata = pod.get("metadata").cloned();
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{}.", path.join("."))
    };
    let spec = pod
        .get_mut("spec")
        .ok_or_else(|| (described.clone(), format!("{prefix}spec: missing")))?;
    let owner = Owner {
        name: name.as_deref(),
    };
    let outcome = inject_pod(metadata.as_ref(), spec, &owner, options)
        .map_err(|e| (described.clone(), with_prefix(&prefix, e)))?;
    reports.push(Report {
        object: described,
        outcome,
    });
    Ok(())
}

/// Puts the template's path in front of a message about its spec (`spec.containers…` →
/// `spec.template.spec.containers…`).
fn with_prefix(prefix: &str, message: String) -> String {
    if message.starts_with("spec.") || message.starts_with("spec:") {
        format!("{prefix}{message}")
    } else {
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings a YAML 1.1 reader (Kubernetes) would take for booleans, numbers or null stay
    /// strings; files stay literal blocks; everything reads back the same.
    #[test]
    fn render_quotes_what_kubernetes_would_misread() {
        let doc = serde_json::json!({
            "data": {"a": "on", "b": "yes", "c": "n", "d": "0x10", "e": "010", "f": "~", "g": "1e3",
                     "h": "0b101", "i": "0o755", "j": "+0x1F", "k": "1_000", "l": "2001-12-14",
                     "m": "0755", "yes": "1:20", "2024": "x", "cpu": "50m", "v": "v1.29",
                     "file": "line 1\nline 2\n", "inf": "+.inf", "nan": ".NaN"},
            "n": 3, "t": true, "z": null,
        });
        let text = render(std::slice::from_ref(&doc));
        for want in [
            "a: \"on\"",
            "b: \"yes\"",
            "c: \"n\"",
            "d: \"0x10\"",
            "e: \"010\"",
            "g: \"1e3\"",
            "h: \"0b101\"",
            "i: \"0o755\"",
            "j: \"+0x1F\"",
            "k: \"1_000\"",
            "l: \"2001-12-14\"",
            "m: \"0755\"",
            "\"yes\": \"1:20\"",
            "\"2024\": x",
            "cpu: 50m",
            "file: |\n",
            "\"inf\": \"+.inf\"",
            "\"nan\": \".NaN\"",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert_eq!(parse(&text, "t").unwrap(), vec![doc]);
    }
}
