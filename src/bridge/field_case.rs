//! Request JSON field names matched as daprd's Go decoder (`encoding/json`) matches them: an
//! exact match first, then a case-insensitive one (Go's `foldName`: ASCII case, plus `ſ` for
//! `s` and the Kelvin sign for `k`). SDKs rely on it: the official JS SDK's `publishBulk`
//! sends `entryID` where the field is `entryId`, and serde, matching exactly, refused every
//! such message with 400 (or, for an optional field like `metadata`, silently dropped it).
//!
//! How: before serde sees a body, [`canonical`] rewrites the object keys that a [`Shape`] names
//! to their canonical spelling, as text. Values are copied byte for byte (a state value is
//! stored as the JSON text the app sent, so it must not be re-serialized), map-valued fields
//! (`metadata`) keep their keys as sent (Go matches struct fields, not map keys), and a field
//! given twice keeps its last value, as Go's decoder does. The derived `Deserialize` types stay
//! plain; one table per body says which names are fields.

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

/// What a JSON body is expected to look like, as far as field names go.
#[derive(Debug)]
pub enum Shape {
    /// Any value, taken as written (including maps, whose keys are data).
    Any,
    /// An object with these fields (and the shape of each field's value).
    Object(&'static [(&'static str, Shape)]),
    /// An array whose elements have this shape.
    Array(&'static Shape),
}

/// A state item's `options`.
pub const OPTIONS: Shape =
    Shape::Object(&[("concurrency", Shape::Any), ("consistency", Shape::Any)]);
/// One state item (save, transaction request).
pub const STATE_ITEM: Shape = Shape::Object(&[
    ("key", Shape::Any),
    ("value", Shape::Any),
    ("etag", Shape::Any),
    ("metadata", Shape::Any),
    ("options", OPTIONS),
]);
/// `POST /v1.0/state/{store}`: an array of items.
pub const STATE_SAVE: Shape = Shape::Array(&STATE_ITEM);
/// `POST /v1.0/state/{store}/bulk`.
pub const STATE_BULK_GET: Shape = Shape::Object(&[
    ("keys", Shape::Any),
    ("parallelism", Shape::Any),
    ("metadata", Shape::Any),
]);
/// `POST /v1.0/state/{store}/transaction`.
pub const STATE_TRANSACTION: Shape = Shape::Object(&[
    (
        "operations",
        Shape::Array(&Shape::Object(&[
            ("operation", Shape::Any),
            ("request", STATE_ITEM),
        ])),
    ),
    ("metadata", Shape::Any),
]);
/// `POST /v1.0-alpha1/publish/bulk/{pubsub}/{topic}`: an array of entries.
pub const BULK_PUBLISH: Shape = Shape::Array(&Shape::Object(&[
    ("entryId", Shape::Any),
    ("event", Shape::Any),
    ("contentType", Shape::Any),
    ("metadata", Shape::Any),
]));

/// Go's case folding of one character, for names made of ASCII letters.
fn fold(c: char) -> char {
    match c {
        '\u{017F}' => 's',
        '\u{212A}' => 'k',
        c => c.to_ascii_lowercase(),
    }
}

/// Whether `sent` names `field` for Go's decoder, ignoring case.
fn folds_to(sent: &str, field: &str) -> bool {
    sent.chars().map(fold).eq(field.chars().map(fold))
}

/// The canonical spelling of a sent key, if it names one of the fields.
fn field_of(
    sent: &str,
    fields: &'static [(&'static str, Shape)],
) -> Option<&'static (&'static str, Shape)> {
    fields
        .iter()
        .find(|(f, _)| *f == sent)
        .or_else(|| fields.iter().find(|(f, _)| folds_to(sent, f)))
}

/// An object's entries in order, values unparsed.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn rewrite(raw: &RawValue, shape: &Shape, out: &mut String) {
    match shape {
        Shape::Any => out.push_str(raw.get()),
        Shape::Array(inner) => match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
            Ok(items) => {
                out.push('[');
                for (i, item) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    rewrite(item, inner, out);
                }
                out.push(']');
            }
            // Not an array: serde reports the type error on the text as sent.
            Err(_) => out.push_str(raw.get()),
        },
        Shape::Object(fields) => match serde_json::from_str::<Entries>(raw.get()) {
            Ok(Entries(entries)) => {
                // Canonical names; a field sent twice (in any case) keeps its last value.
                let mut kept: Vec<(String, &RawValue, &Shape)> = Vec::with_capacity(entries.len());
                for (key, value) in entries {
                    match field_of(&key, fields) {
                        Some((name, shape)) => {
                            kept.retain(|(k, _, _)| k != name);
                            kept.push((name.to_string(), value, shape));
                        }
                        None => kept.push((key, value, &Shape::Any)),
                    }
                }
                out.push('{');
                for (i, (key, value, shape)) in kept.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(&key).expect("a string serializes"));
                    out.push(':');
                    rewrite(value, shape, out);
                }
                out.push('}');
            }
            Err(_) => out.push_str(raw.get()),
        },
    }
}

/// The body with the field names `shape` knows spelled canonically, ready for serde; a body
/// that is not JSON is refused with serde's error (positions as sent).
pub fn canonical(body: &[u8], shape: &Shape) -> Result<String, serde_json::Error> {
    let raw: &RawValue = serde_json::from_slice(body)?;
    let mut out = String::with_capacity(body.len() + 16);
    rewrite(raw, shape, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fold_as_gos_decoder_does() {
        let out = canonical(
            br#"[{"entryID":"1","EVENT":{"Keep":"as is"},"ContentType":"text/plain","metadata":{"TTLinSeconds":"5"}}]"#,
            &BULK_PUBLISH,
        )
        .unwrap();
        assert_eq!(
            out,
            r#"[{"entryId":"1","event":{"Keep":"as is"},"contentType":"text/plain","metadata":{"TTLinSeconds":"5"}}]"#
        );
        // Nested shapes, Go's special folds, unknown fields kept, the last duplicate wins,
        // values byte for byte.
        let out = canonical(
            br#"{"Operations":[{"OPERATION":"upsert","request":{"\u212aey":"a","Key":"b","value": 1.50 ,"Options":{"Concurrency":"last-write"}}}],"extra":1}"#,
            &STATE_TRANSACTION,
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"operations":[{"operation":"upsert","request":{"key":"b","value":1.50,"options":{"concurrency":"last-write"}}}],"extra":1}"#
        );
        // A field given twice in different cases: the last one wins, as in Go.
        let out = canonical(br#"{"KEYS":["a"],"keys":["b"]}"#, &STATE_BULK_GET).unwrap();
        assert_eq!(out, r#"{"keys":["b"]}"#);
        // Not the expected type: left for serde to refuse.
        assert_eq!(canonical(br#"{"a":1}"#, &STATE_SAVE).unwrap(), r#"{"a":1}"#);
        assert!(canonical(b"not json", &STATE_SAVE).is_err());
    }
}
