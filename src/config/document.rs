//! A config document: the YAML value, where each of its nodes was written, and which nodes were
//! replaced by an environment variable or `--set`.
//!
//! serde stops at the first error, but users should fix every problem in one go. So
//! [`Document::deserialize`] records an error with its location, removes the offending node,
//! and deserializes again until the document is clean (at most [`MAX_PROBLEMS`] rounds). The
//! node positions come from yaml-rust2's marked events, because serde_norway keeps positions only
//! for the first error of a string. Written by hand: no YAML crate offers both serde
//! deserialization and the position of every node.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Stop collecting after this many problems: the rest are usually consequences.
pub const MAX_PROBLEMS: usize = 50;

/// One thing wrong with the configuration, with where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    /// Dotted path of the key, like `admin.address` or `app.command[1]`; empty for the root.
    pub path: String,
    pub message: String,
}

/// Where a problem comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// A position in the config file (line and column start at 1).
    File {
        file: String,
        line: usize,
        column: usize,
    },
    /// The file as a whole (no better position known).
    Whole { file: String },
    /// An environment variable or a `--set` flag, named as the user wrote it.
    Override(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { file, line, column } => write!(f, "{file}:{line}:{column}: ")?,
            Origin::Whole { file } => write!(f, "{file}: ")?,
            Origin::Override(name) => write!(f, "{name}: ")?,
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// One step of a path into the document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Step {
    Key(String),
    Index(usize),
}

fn render(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Whether the node at path `a` is the one at `b` or inside it.
fn within(a: &str, b: &str) -> bool {
    a == b || (a.starts_with(b) && matches!(a.as_bytes().get(b.len()), Some(b'.' | b'[')))
}

/// A parsed config document.
pub struct Document {
    /// How the file is named in messages.
    file: String,
    value: Value,
    /// Position of each node's value, by rendered path.
    values: HashMap<String, Marker>,
    /// Position of each mapping key, by the rendered path of the entry.
    keys: HashMap<String, Marker>,
    /// Nodes that overrides replaced: rendered path → how the user named the override.
    overrides: Vec<(String, String)>,
    /// Nodes [`Self::deserialize_pruned`] removed because they were wrong (paths as written):
    /// later checks must not report what their absence causes.
    pruned: std::sync::Mutex<Vec<String>>,
    /// Indices removed from each sequence by that pruning (by original path).
    removed: std::sync::Mutex<HashMap<String, Vec<usize>>>,
}

impl Document {
    /// Parses YAML text. An empty document is an empty mapping. A syntax error is the one
    /// problem returned: nothing after it can be trusted.
    pub fn parse(file: &Path, text: &str) -> Result<Document, Problem> {
        let file = file.display().to_string();
        // Before serde_norway, whose scanner is slow on deep nesting (file_limits.rs).
        if let Err(deep) = super::file_limits::check_shape(text) {
            return Err(Problem {
                origin: Origin::File {
                    file,
                    line: deep.line,
                    column: deep.column,
                },
                path: String::new(),
                message: deep.message,
            });
        }
        let mut value: Value = match serde_norway::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let origin = match e.location() {
                    Some(l) => Origin::File {
                        file: file.clone(),
                        line: l.line(),
                        column: l.column(),
                    },
                    None => Origin::Whole { file: file.clone() },
                };
                let mut message = e.to_string();
                // serde_norway appends " at line L column C"; the origin already says it.
                if let Some(i) = message.find(" at line ") {
                    message.truncate(i);
                }
                // A number too large for any integer type is quoted in the message: it may be
                // a token (`api_token: 12345678901234567890123`), so it is not repeated.
                if let Some(start) = message.find("integer `")
                    && let Some(len) = message[start + 9..].find('`')
                {
                    message.replace_range(start + 9..start + 9 + len, "…");
                }
                return Err(Problem {
                    origin,
                    path: String::new(),
                    message: format!("invalid YAML: {message}"),
                });
            }
        };
        if value.is_null() {
            value = Value::Mapping(Mapping::new());
        }
        let mut locator = Locator::default();
        // The text parsed above, so this parse succeeds too; if it did not, positions are
        // simply missing and problems point at the whole file.
        let _ = Parser::new_from_str(text).load(&mut locator, false);
        if let Err(e) = value.apply_merge() {
            // serde_norway does not say which merge key failed: located at the merge key when
            // there is one, at the first (and saying so) when there are several.
            let mut merges: Vec<&Marker> = locator
                .keys
                .iter()
                .filter(|(path, _)| *path == "<<" || path.ends_with(".<<"))
                .map(|(_, m)| m)
                .collect();
            merges.sort_by_key(|m| m.index());
            let (origin, which) = match merges.first() {
                Some(m) => (
                    Origin::File {
                        file: file.clone(),
                        line: m.line(),
                        column: m.col() + 1,
                    },
                    if merges.len() > 1 {
                        format!(" (one of {} merge keys; the first is here)", merges.len())
                    } else {
                        String::new()
                    },
                ),
                None => (Origin::Whole { file: file.clone() }, String::new()),
            };
            return Err(Problem {
                origin,
                path: String::new(),
                message: format!("invalid YAML merge key: {e}{which}"),
            });
        }
        Ok(Document {
            file,
            value,
            values: locator.values,
            keys: locator.keys,
            overrides: Vec::new(),
            pruned: Default::default(),
            removed: Default::default(),
        })
    }

    /// Sets `dotted.path` to `raw` (parsed as a YAML scalar, so `8` is a number and
    /// `127.0.0.1:80` a string), creating mappings on the way. `origin` names the override in
    /// messages (`--set admin.address`, `env OUTRIGGER_ADMIN_ADDRESS`).
    pub fn set(&mut self, dotted: &str, raw: &str, origin: &str) -> Result<(), Problem> {
        let problem = |message: String| Problem {
            origin: Origin::Override(origin.to_string()),
            path: dotted.to_string(),
            message,
        };
        let keys: Vec<&str> = dotted.split('.').collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(problem("expected a dotted key like admin.address".into()));
        }
        let new: Value = super::file_limits::check_shape(raw)
            .ok()
            .and_then(|()| serde_norway::from_str(raw).ok())
            .unwrap_or_else(|| Value::String(raw.into()));
        let mut node = &mut self.value;
        for (i, key) in keys.iter().enumerate() {
            let Value::Mapping(map) = node else {
                return Err(problem(format!(
                    "`{}` is not a mapping, so it has no key `{key}`",
                    keys[..i].join(".")
                )));
            };
            let key = Value::String(key.to_string());
            if i + 1 == keys.len() {
                map.insert(key, new);
                break;
            }
            node = map
                .entry(key)
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
        }
        self.overrides
            .push((dotted.to_string(), origin.to_string()));
        Ok(())
    }

    /// Where the node at `path` came from: an override, its position in the file, or the
    /// closest enclosing node that has a position.
    pub fn origin(&self, path: &str, key: bool) -> Origin {
        // The override set this node, something inside it, or created the mapping it is in.
        if let Some((_, name)) = self
            .overrides
            .iter()
            .rev()
            .find(|(p, _)| within(path, p) || (!path.is_empty() && within(p, path)))
        {
            return Origin::Override(name.clone());
        }
        let mut probe = path.to_string();
        loop {
            let mark = if key {
                self.keys.get(&probe).or_else(|| self.values.get(&probe))
            } else {
                self.values.get(&probe).or_else(|| self.keys.get(&probe))
            };
            if let Some(m) = mark {
                return Origin::File {
                    file: self.file.clone(),
                    line: m.line(),
                    // yaml-rust2 counts columns from 0 (its doc says 1; tests pin it).
                    column: m.col() + 1,
                };
            }
            match probe.rfind(['.', '[']) {
                Some(i) => probe.truncate(i),
                None if !probe.is_empty() => probe.clear(),
                None => {
                    return Origin::Whole {
                        file: self.file.clone(),
                    };
                }
            }
        }
    }

    /// The position of the `nth` (from 0) entry of the top-level list `list` whose `name` is
    /// `name` (`listeners` by listener name), as written in the file.
    pub fn index_by_name(&self, list: &str, name: &str, nth: usize) -> Option<usize> {
        self.value
            .get(list)?
            .as_sequence()?
            .iter()
            .enumerate()
            .filter(|(_, v)| v.get("name").and_then(Value::as_str) == Some(name))
            .nth(nth)
            .map(|(i, _)| i)
    }

    /// Whether the node at `path` was removed as wrong, or is inside one that was (its problem
    /// was reported; what its absence causes would only repeat it).
    pub fn pruned(&self, path: &str) -> bool {
        self.pruned
            .lock()
            .expect("not poisoned")
            .iter()
            .any(|p| within(path, p))
    }

    /// Whether a node inside the one at `path` was removed as wrong (a list that is empty only
    /// because its one bad entry was removed).
    pub fn pruned_inside(&self, path: &str) -> bool {
        self.pruned
            .lock()
            .expect("not poisoned")
            .iter()
            .any(|p| p != path && within(p, path))
    }

    /// A path into what [`Self::deserialize_pruned`] returned, as the user wrote it: renumbered
    /// past the list entries that were removed.
    pub fn written(&self, path: &str) -> String {
        let removed = self.removed.lock().expect("not poisoned");
        if removed.is_empty() {
            path.to_string()
        } else {
            render(&original_path(&parse_path(path), &removed))
        }
    }

    /// A problem found in what [`Self::deserialize_pruned`] returned, where the user wrote it:
    /// its path renumbered past the list entries that were removed (the second listener is
    /// `listeners[1]` even when the first was removed), and None when it is about a node that
    /// was removed (a consequence of a problem reported already).
    pub fn as_written(&self, problem: Problem) -> Option<Problem> {
        let written = self.written(&problem.path);
        if self.pruned(&written) {
            return None;
        }
        if written == problem.path {
            return Some(problem);
        }
        Some(self.problem(&written, problem.message))
    }

    /// A problem at `path`, located.
    pub fn problem(&self, path: &str, message: impl Into<String>) -> Problem {
        Problem {
            origin: self.origin(path, false),
            path: path.to_string(),
            message: message.into(),
        }
    }

    /// Deserializes the document into `T`, collecting every problem with its location. Returns
    /// `T` only when there were none.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, Vec<Problem>> {
        match self.deserialize_pruned() {
            (Some(t), problems) if problems.is_empty() => Ok(t),
            (_, problems) => Err(problems),
        }
    }

    /// Like [`Self::deserialize`], but also returns `T` made from what was left once the bad
    /// nodes were removed (when that succeeds), so later checks can still report their
    /// problems in the same run.
    pub fn deserialize_pruned<T: DeserializeOwned>(&self) -> (Option<T>, Vec<Problem>) {
        let mut value = self.value.clone();
        let mut problems = Vec::new();
        // Indices removed from each sequence (by original path), so that later errors in the same
        // sequence still point at the element the user wrote.
        let mut removed: HashMap<String, Vec<usize>> = HashMap::new();
        let mut seen = Vec::new();
        self.pruned.lock().expect("not poisoned").clear();
        loop {
            let err = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(t) => {
                    *self.removed.lock().expect("not poisoned") = removed;
                    return (Some(t), problems);
                }
                Err(e) => e,
            };
            let current: Vec<Step> = err
                .path()
                .iter()
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                    serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                    _ => None,
                })
                .collect();
            let original = original_path(&current, &removed);
            let path = render(&original);
            let message = plain_words(err.inner().to_string());
            // A required key we removed ourselves, after reporting its bad value: already said.
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
            {
                let removed = if path.is_empty() {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                };
                if seen.contains(&removed) {
                    return (None, problems);
                }
            }
            let unknown_key = message.starts_with("unknown field");
            if problems.len() >= MAX_PROBLEMS {
                // Said, not dropped silently: the rest come once these are fixed.
                problems.push(Problem {
                    origin: Origin::Whole {
                        file: self.file.clone(),
                    },
                    path: String::new(),
                    message: format!(
                        "stopped after {MAX_PROBLEMS} problems: fix these and check again for the rest"
                    ),
                });
                return (None, problems);
            }
            problems.push(Problem {
                origin: self.origin(&path, unknown_key),
                path: path.clone(),
                message,
            });
            // Remove the node so the next round gets past it. A problem we cannot get past
            // (a missing node, the root itself) ends the collection.
            if seen.contains(&path) || !remove(&mut value, &current) {
                return (None, problems);
            }
            self.pruned.lock().expect("not poisoned").push(path.clone());
            if let Some((Step::Index(i), parent)) = original.split_last() {
                removed.entry(render(parent)).or_default().push(*i);
            }
            seen.push(path);
        }
    }
}

/// serde names the Rust type it expected (`expected struct RawListener`): users wrote a
/// mapping there.
fn plain_words(mut message: String) -> String {
    while let Some(i) = message.find("expected struct ") {
        let name_end = message[i + 16..]
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .map_or(message.len(), |n| i + 16 + n);
        message.replace_range(i..name_end, "expected a mapping");
    }
    message
}

/// The steps of a rendered path (`a.b[2].c`). A key written with a dot in it comes back as
/// two keys, which render the same: good enough to renumber indices.
fn parse_path(path: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            steps.push(Step::Key(key.to_string()));
        }
        while let Some(end) = rest.find(']') {
            match rest[1..end].parse() {
                Ok(i) => steps.push(Step::Index(i)),
                Err(_) => steps.push(Step::Key(rest[1..end].to_string())),
            }
            rest = &rest[end + 1..];
        }
    }
    steps
}

/// Maps a path in the pruned value back to the path the user wrote.
fn original_path(current: &[Step], removed: &HashMap<String, Vec<usize>>) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::with_capacity(current.len());
    for step in current {
        match step {
            Step::Index(i) => {
                let gone = removed.get(&render(&out)).map(Vec::as_slice).unwrap_or(&[]);
                // The i-th surviving element: skip over every removed index at or before it.
                let mut original = *i;
                let mut sorted = gone.to_vec();
                sorted.sort_unstable();
                for g in sorted {
                    if g <= original {
                        original += 1;
                    }
                }
                out.push(Step::Index(original));
            }
            key => out.push(key.clone()),
        }
    }
    out
}

/// Removes the node at `path`; false when there is none.
fn remove(value: &mut Value, path: &[Step]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for step in parents {
        node = match (step, node) {
            (Step::Key(k), Value::Mapping(m)) => match m.get_mut(k.as_str()) {
                Some(n) => n,
                None => return false,
            },
            (Step::Index(i), Value::Sequence(s)) => match s.get_mut(*i) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Step::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        (Step::Index(i), Value::Sequence(s)) if *i < s.len() => {
            s.remove(*i);
            true
        }
        _ => false,
    }
}

/// Records the position of every node from the parser's events.
#[derive(Default)]
struct Locator {
    stack: Vec<Frame>,
    /// Nesting depth inside a complex (non-scalar) mapping key, which we do not locate.
    in_complex_key: usize,
    values: HashMap<String, Marker>,
    keys: HashMap<String, Marker>,
}

enum Frame {
    /// `locate_at_first_key`: a block mapping's own mark points past its first key, so a
    /// mapping that has no key of its own (the root, a list item) is located at its first key.
    Map {
        path: Vec<Step>,
        key: Option<String>,
        locate_at_first_key: bool,
    },
    Seq {
        path: Vec<Step>,
        index: usize,
    },
}

impl Locator {
    /// The path of the node that starts now, or None when it is a mapping key.
    fn next_node_path(&mut self, ev: &Event, mark: Marker) -> Option<Vec<Step>> {
        match self.stack.last_mut() {
            None => Some(Vec::new()),
            Some(Frame::Seq { path, index }) => {
                let mut p = path.clone();
                p.push(Step::Index(*index));
                *index += 1;
                Some(p)
            }
            Some(Frame::Map {
                path,
                key,
                locate_at_first_key,
            }) => match key.take() {
                Some(k) => {
                    let mut p = path.clone();
                    p.push(Step::Key(k));
                    Some(p)
                }
                None => {
                    match ev {
                        Event::Scalar(s, ..) => {
                            let mut p = path.clone();
                            p.push(Step::Key(s.clone()));
                            self.keys.insert(render(&p), mark);
                            if std::mem::take(locate_at_first_key) {
                                self.values.insert(render(path), mark);
                            }
                            *key = Some(s.clone());
                        }
                        // A sequence or mapping used as a key: rare, and not locatable by a
                        // dotted path. Skip its events.
                        Event::SequenceStart(..) | Event::MappingStart(..) => {
                            *key = Some(String::from("?"));
                            self.in_complex_key = 1;
                        }
                        _ => *key = Some(String::from("?")),
                    }
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Locator {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.in_complex_key > 0 {
            match ev {
                Event::SequenceStart(..) | Event::MappingStart(..) => self.in_complex_key += 1,
                Event::SequenceEnd | Event::MappingEnd => self.in_complex_key -= 1,
                _ => {}
            }
            return;
        }
        match ev {
            Event::Scalar(..) | Event::Alias(..) => {
                if let Some(p) = self.next_node_path(&ev, mark) {
                    self.values.insert(render(&p), mark);
                }
            }
            Event::MappingStart(..) => {
                let keyless = matches!(self.stack.last(), None | Some(Frame::Seq { .. }));
                if let Some(p) = self.next_node_path(&ev, mark) {
                    self.stack.push(Frame::Map {
                        path: p,
                        key: None,
                        locate_at_first_key: keyless,
                    });
                }
            }
            Event::SequenceStart(..) => {
                if let Some(p) = self.next_node_path(&ev, mark) {
                    self.values.insert(render(&p), mark);
                    self.stack.push(Frame::Seq { path: p, index: 0 });
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// The path of the file for messages: as given, or `<defaults>` when there is none.
pub fn display_name(file: Option<&Path>) -> PathBuf {
    file.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("<defaults>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        #[serde(default)]
        a: Option<Inner>,
        #[serde(default)]
        list: Vec<u16>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        name: Option<String>,
    }

    fn doc(text: &str) -> Document {
        Document::parse(Path::new("c.yaml"), text).unwrap()
    }

    #[test]
    fn a_bad_merge_key_is_located() {
        let text = "base: &b 5\nadmin:\n  <<: *b\n";
        let e = Document::parse(Path::new("c.yaml"), text).err().unwrap();
        let shown = e.to_string();
        assert!(
            shown.starts_with("c.yaml:3:3: ") && shown.contains("invalid YAML merge key"),
            "{shown}"
        );
        let text = "a: &a {x: 1}\nb:\n  <<: *a\nc:\n  <<: 7\n";
        let shown = Document::parse(Path::new("c.yaml"), text)
            .err()
            .unwrap()
            .to_string();
        assert!(
            shown.starts_with("c.yaml:3:3: ") && shown.contains("one of 2 merge keys"),
            "{shown}"
        );
    }

    #[test]
    fn past_the_cap_the_rest_is_announced_not_dropped_silently() {
        let text = format!(
            "list: [{}]\n",
            (0..80).map(|_| "x").collect::<Vec<_>>().join(", ")
        );
        let (t, problems) = doc(&text).deserialize_pruned::<T>();
        assert!(t.is_none());
        assert_eq!(problems.len(), MAX_PROBLEMS + 1);
        assert!(
            problems[MAX_PROBLEMS]
                .to_string()
                .contains("stopped after 50 problems"),
            "{}",
            problems[MAX_PROBLEMS]
        );
    }

    #[test]
    fn collects_every_problem_with_its_position() {
        let d = doc("a:\n  port: lots\n  colour: red\nlist: [1, x, 3, y]\nextra: 1\n");
        let problems = d.deserialize::<T>().unwrap_err();
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 5, "{lines:#?}");
        assert!(
            lines[0].starts_with("c.yaml:2:9: a.port: invalid type: string \"lots\""),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("c.yaml:3:3: a.colour: unknown field `colour`"),
            "{lines:#?}"
        );
        assert!(
            lines[2].starts_with("c.yaml:4:11: list[1]: invalid type"),
            "{lines:#?}"
        );
        // After list[1] was removed, the bad element is the third surviving one; it must still
        // point at what the user wrote: index 3, column 17.
        assert!(
            lines[3].starts_with("c.yaml:4:17: list[3]: invalid type"),
            "{lines:#?}"
        );
        assert!(
            lines[4].starts_with("c.yaml:5:1: extra: unknown field `extra`"),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_mapping_is_located_at_its_key() {
        let d = doc("list: [1]\na:\n  port: 1\n");
        // `a` itself is the problem here (wrong type): point at the `a:` the user wrote.
        assert_eq!(
            d.origin("a", false),
            Origin::File {
                file: "c.yaml".into(),
                line: 2,
                column: 1
            }
        );
        let d = doc("- x: 1\n- y: 2\n");
        assert_eq!(
            d.origin("[1]", false),
            Origin::File {
                file: "c.yaml".into(),
                line: 2,
                column: 3
            }
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let p = Document::parse(Path::new("c.yaml"), "a:\n  port: [1,\n")
            .err()
            .unwrap();
        assert!(matches!(p.origin, Origin::File { .. }), "{p}");
        assert!(p.message.starts_with("invalid YAML"), "{p}");
    }

    #[test]
    fn overrides_are_named_in_problems() {
        let mut d = doc("a:\n  port: 1\n");
        d.set("a.port", "seventy", "--set a.port").unwrap();
        d.set("a.name", "x", "env NAME").unwrap();
        let problems = d.deserialize::<T>().unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].to_string(),
            "--set a.port: a.port: invalid type: string \"seventy\", expected u16"
        );
        let mut d = doc("");
        d.set("a.port", "8080", "--set a.port").unwrap();
        let t: T = d.deserialize().unwrap();
        let a = t.a.unwrap();
        assert_eq!((a.port, a.name, t.list), (Some(8080), None, vec![]));
    }

    #[test]
    fn wrong_shape_at_root() {
        let d = doc("- 1\n- 2\n");
        let problems = d.deserialize::<T>().unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .to_string()
                .starts_with("c.yaml:1:1: invalid type: sequence"),
            "{}",
            problems[0]
        );
    }
}
