//! Secret stores: `secretstores.local.file` (a JSON file read at start-up; nested keys joined
//! with `nestedSeparator`, or one secret per top-level key with `multiValued`) and
//! `secretstores.local.env` (the sidecar's environment). Served on `/v1.0/secrets/{store}/…`
//! and used to resolve `secretKeyRef` in component metadata.

use std::collections::BTreeMap;

use super::components::Component;

/// One secret: its keys and values.
pub type Secret = BTreeMap<String, String>;

/// A configured secret store.
pub enum SecretStore {
    /// Secrets read from a JSON file, by name.
    File(BTreeMap<String, Secret>),
    /// Environment variables.
    Env,
}

/// A `secretstores.local.file` JSON file is refused above this (the same cap as config
/// files): it is read whole into memory, and a huge file (or a FIFO) must not fill it.
pub const MAX_SECRETS_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a secrets file of at most [`MAX_SECRETS_FILE_BYTES`], not reading a longer one whole.
fn read_secrets_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read secretsFile {path}: {e}");
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_SECRETS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_SECRETS_FILE_BYTES {
        return Err(format!(
            "secretsFile {path} is larger than {} MiB, the limit for a secrets file",
            MAX_SECRETS_FILE_BYTES >> 20
        ));
    }
    Ok(text)
}

impl SecretStore {
    /// Opens the store a component describes (reads the file now).
    pub fn new(c: &Component) -> Result<SecretStore, String> {
        match c.kind.as_str() {
            "secretstores.local.env" => Ok(SecretStore::Env),
            "secretstores.local.file" => {
                let path = c
                    .meta("secretsFile")
                    .ok_or("expected metadata secretsFile (the JSON file's path), found none")?;
                let separator = c.meta("nestedSeparator").unwrap_or(":");
                let multi = match c.meta("multiValued") {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(v) => {
                        return Err(format!("expected multiValued true or false, found {v:?}"));
                    }
                };
                let text = read_secrets_file(path)?;
                let json: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("expected a JSON object in {path}: {e}"))?;
                let serde_json::Value::Object(top) = json else {
                    return Err(format!(
                        "expected a JSON object in {path}, found another value"
                    ));
                };
                Ok(SecretStore::File(parse_file(top, separator, multi)))
            }
            other => Err(format!("{other} is not a secret store type")),
        }
    }

    /// The secret `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Secret> {
        match self {
            SecretStore::File(all) => all.get(name).cloned(),
            SecretStore::Env => std::env::var(name)
                .ok()
                .map(|v| BTreeMap::from([(name.to_string(), v)])),
        }
    }

    /// Every secret, by name.
    pub fn bulk(&self) -> BTreeMap<String, Secret> {
        match self {
            SecretStore::File(all) => all.clone(),
            SecretStore::Env => std::env::vars()
                .map(|(k, v)| (k.clone(), BTreeMap::from([(k, v)])))
                .collect(),
        }
    }
}

/// Flattens the JSON file into secrets, as Dapr's local file store does: without
/// `multiValued`, every leaf is a secret named by its joined path (`db:password`) holding one
/// key of the same name; with it, each top-level key is a secret and the leaves below it are
/// its keys.
fn parse_file(
    top: serde_json::Map<String, serde_json::Value>,
    separator: &str,
    multi: bool,
) -> BTreeMap<String, Secret> {
    let mut out = BTreeMap::new();
    if multi {
        for (name, value) in top {
            let mut keys = BTreeMap::new();
            match value {
                serde_json::Value::Object(inner) => {
                    for (k, v) in inner {
                        flatten(&k, v, separator, &mut keys);
                    }
                }
                leaf => flatten(&name, leaf, separator, &mut keys),
            }
            out.insert(name, keys);
        }
    } else {
        let mut leaves = BTreeMap::new();
        for (k, v) in top {
            flatten(&k, v, separator, &mut leaves);
        }
        for (k, v) in leaves {
            out.insert(k.clone(), BTreeMap::from([(k, v)]));
        }
    }
    out
}

fn flatten(prefix: &str, v: serde_json::Value, sep: &str, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}{sep}{k}"), v, sep, out);
            }
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s);
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secrets_file_over_the_cap_is_refused_without_reading_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let mut big = String::from("{\"k\": \"");
        big.push_str(&"x".repeat(MAX_SECRETS_FILE_BYTES as usize));
        big.push_str("\"}");
        std::fs::write(&path, big).unwrap();
        let e = read_secrets_file(path.to_str().unwrap()).unwrap_err();
        assert!(e.contains("larger than 1 MiB"), "{e}");
        std::fs::write(&path, "{\"k\": \"v\"}").unwrap();
        assert!(read_secrets_file(path.to_str().unwrap()).is_ok());
    }

    #[test]
    fn nested_keys() {
        let json = serde_json::json!({"a": {"b": {"c": "x"}, "n": 1}, "top": "t"});
        let serde_json::Value::Object(top) = json else {
            unreachable!()
        };
        let flat = parse_file(top.clone(), ":", false);
        assert_eq!(flat["a:b:c"]["a:b:c"], "x");
        assert_eq!(flat["a:n"]["a:n"], "1");
        assert_eq!(flat["top"]["top"], "t");
        let multi = parse_file(top, ".", true);
        assert_eq!(multi["a"]["b.c"], "x");
        assert_eq!(multi["a"]["n"], "1");
        assert_eq!(multi["top"]["top"], "t");
    }
}
