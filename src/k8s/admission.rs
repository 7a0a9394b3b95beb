//! The admission webhook's answer: an AdmissionReview v1 request in, an AdmissionReview
//! response out, with a JSONPatch (RFC 6902) made by the same code as `outrigger inject`
//! ([`super::inject::inject_object`]). Never refuses a pod: one it cannot inject is admitted
//! unchanged with a warning (the API server shows it to `kubectl`); only a request that is not
//! an AdmissionReview gets an error answer.

use base64::Engine;
use serde_json::{Value, json};

use super::inject::{describe, inject_object};
use super::sidecar::{Options, Outcome};

const API_VERSION: &str = "admission.k8s.io/v1";

/// An answer: the HTTP status and the AdmissionReview to send.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub review: Value,
    /// For the log: what was done.
    pub summary: String,
}

/// Answers one AdmissionReview (the request body).
pub fn answer(body: &[u8], options: &Options) -> Answer {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return malformed(None, format!("the body is not JSON: {e}")),
    };
    let uid = review.pointer("/request/uid").and_then(Value::as_str);
    if review.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION)
        || review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return malformed(
            uid,
            format!(
                "expected apiVersion {API_VERSION} and kind AdmissionReview, found {} {}",
                review.get("apiVersion").unwrap_or(&Value::Null),
                review.get("kind").unwrap_or(&Value::Null)
            ),
        );
    }
    let Some(uid) = uid else {
        return malformed(
            None,
            "request.uid: missing (is this an AdmissionReview request?)".into(),
        );
    };
    let operation = review.pointer("/request/operation").and_then(Value::as_str);
    if operation != Some("CREATE") {
        return allowed(
            uid,
            None,
            vec![],
            format!("{operation:?}: not a CREATE, admitted"),
        );
    }
    let Some(object) = review.pointer("/request/object").filter(|o| o.is_object()) else {
        return malformed(
            Some(uid),
            "request.object: expected the object being created".into(),
        );
    };
    let mut injected = object.clone();
    let mut reports = Vec::new();
    let described = describe(object);
    match inject_object(&mut injected, options, &mut reports) {
        Err((what, message)) => {
            let warning = format!("outrigger: {what} admitted without the sidecar: {message}");
            allowed(uid, None, vec![warning.clone()], warning)
        }
        Ok(()) if reports.iter().any(|r| r.outcome == Outcome::Injected) => {
            let ops = diff(object, &injected);
            let patch = base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&ops).expect("a JSON value serializes"));
            allowed(uid, Some(patch), vec![], format!("{described}: injected"))
        }
        Ok(()) => {
            let why = reports
                .first()
                .map(|r| format!("{:?}", r.outcome))
                .unwrap_or_else(|| "not a workload".into());
            allowed(
                uid,
                None,
                vec![],
                format!("{described}: left alone ({why})"),
            )
        }
    }
}

fn allowed(uid: &str, patch: Option<String>, warnings: Vec<String>, summary: String) -> Answer {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(p) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(p);
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    Answer {
        status: 200,
        review: json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}),
        summary,
    }
}

/// A request that is not an AdmissionReview v1: HTTP 400 with an AdmissionReview that says why
/// (the API server never sends one; a person with curl might).
fn malformed(uid: Option<&str>, message: String) -> Answer {
    Answer {
        status: 400,
        review: json!({
            "apiVersion": API_VERSION,
            "kind": "AdmissionReview",
            "response": {
                "uid": uid.unwrap_or(""),
                "allowed": false,
                "status": {"code": 400, "message": format!("malformed AdmissionReview: {message}")},
            },
        }),
        summary: format!("malformed AdmissionReview: {message}"),
    }
}

/// A JSONPatch taking `old` to `new`: maps are compared key by key, anything else (lists too)
/// is replaced whole. Hand-written: json-patch's `diff` would do, but it patches lists item by
/// item (indexes that shift as it goes); whole lists are easier to read in an API server's
/// audit log and as safe, since webhooks see the object one at a time.
pub fn diff(old: &Value, new: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff_at(old, new, &mut String::new(), &mut ops);
    ops
}

fn diff_at(old: &Value, new: &Value, path: &mut String, ops: &mut Vec<Value>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let len = path.len();
            for (k, v) in b {
                path.push('/');
                path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                match a.get(k) {
                    None => ops.push(json!({"op": "add", "path": path, "value": v})),
                    Some(was) if was != v => diff_at(was, v, path, ops),
                    Some(_) => {}
                }
                path.truncate(len);
            }
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                let p = format!("{path}/{}", k.replace('~', "~0").replace('/', "~1"));
                ops.push(json!({"op": "remove", "path": p}));
            }
        }
        _ if old == new => {}
        _ => ops.push(json!({"op": "replace", "path": path, "value": new})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_escapes_and_replaces_lists_whole() {
        let old =
            json!({"metadata": {"annotations": {"a/b": "1", "gone": "x"}}, "spec": {"l": [1]}});
        let new =
            json!({"metadata": {"annotations": {"a/b": "2", "n~": "y"}}, "spec": {"l": [1, 2]}});
        assert_eq!(
            diff(&old, &new),
            vec![
                json!({"op": "replace", "path": "/metadata/annotations/a~1b", "value": "2"}),
                json!({"op": "add", "path": "/metadata/annotations/n~0", "value": "y"}),
                json!({"op": "remove", "path": "/metadata/annotations/gone"}),
                json!({"op": "replace", "path": "/spec/l", "value": [1, 2]}),
            ]
        );
    }

    #[test]
    fn not_json_and_not_a_review_are_clear_errors() {
        let a = answer(b"{nope", &Options::default());
        assert_eq!(a.status, 400);
        assert_eq!(a.review["response"]["allowed"], false);
        assert!(
            a.review["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("not JSON")
        );
        let a = answer(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u1"}}"#, &Options::default());
        assert_eq!(a.status, 400);
        assert_eq!(a.review["response"]["uid"], "u1");
    }

    #[test]
    fn a_pod_with_bad_annotations_is_admitted_with_a_warning() {
        let body = json!({
            "apiVersion": API_VERSION, "kind": "AdmissionReview",
            "request": {"uid": "u2", "operation": "CREATE", "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "annotations": {"outrigger.dev/app-port": "eighty"}},
                "spec": {"containers": [{"name": "app", "image": "app"}]},
            }},
        });
        let a = answer(body.to_string().as_bytes(), &Options::default());
        assert_eq!(a.status, 200);
        let r = &a.review["response"];
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
        assert!(
            r["warnings"][0]
                .as_str()
                .unwrap()
                .contains("outrigger.dev/app-port"),
            "{r}"
        );
    }
}
