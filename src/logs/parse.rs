//! Parse, redact and enrich one line into one NDJSON record.
//!
//! In order: the redaction rules (`logs.redact`) run over the raw line first, so nothing they
//! match leaves the process in any field; then the line is parsed (`json`: a JSON object keeps
//! its fields; `plain`: the line becomes `message`; `auto`: JSON when it parses as an object);
//! then Outrigger adds `source`, `stream` (app) or `file` (files), the configured fields (not
//! replacing the line's own), `time` (the read time, when the line has none of `time`,
//! `timestamp`, `ts`, `@timestamp`), and `trace_id`/`span_id` lifted from `traceId`/`spanId`,
//! `trace.id`/`span.id` or a W3C `traceparent`, so logs join traces.
//!
//! No tree is built: a JSON line is validated in one pass ([`scan::members`]) that hands each
//! top-level key and its value as raw text to the encoder; the record is the line's own bytes
//! with the added fields written after its last member (or, when the line has a key Outrigger
//! replaces, its members copied one by one without that key). Building a `serde_json::Map` per
//! line and writing it back cost ~4× the instructions per line, serde_json's validation alone
//! ~45 % of them (callgrind, docs/BENCHMARKS.md).

use std::borrow::Cow;
use std::time::SystemTime;

use crate::config::logs::{LineFormat, Redact};
use crate::telemetry::json;

/// Where a line came from.
pub enum Origin<'a> {
    Stream(&'a str),
    File(&'a std::path::Path),
}

/// What Outrigger writes last in every record of one source and origin (`"source":…` and
/// `"stream":…` or `"file":…`), rendered once and reused for each of its lines.
pub struct Tail {
    bytes: Vec<u8>,
    /// `stream` or `file`: a key of the line's that this replaces, beside `source`.
    origin_key: &'static str,
}

impl Tail {
    pub fn new(source: &str, origin: Origin<'_>) -> Tail {
        let mut bytes = b"\"source\":".to_vec();
        json::string(&mut bytes, source);
        let origin_key = match origin {
            Origin::Stream(s) => {
                bytes.extend_from_slice(b",\"stream\":");
                json::string(&mut bytes, s);
                "stream"
            }
            Origin::File(p) => {
                bytes.extend_from_slice(b",\"file\":");
                json::string(&mut bytes, &p.to_string_lossy());
                "file"
            }
        };
        Tail { bytes, origin_key }
    }

    fn replaces(&self, key: &str) -> bool {
        key == "source" || key == self.origin_key
    }
}

/// What a container runtime said of a line (`format: cri` or `docker`): its stream and time.
#[derive(Clone, Copy, Default)]
pub struct Meta<'a> {
    pub stream: Option<&'a str>,
    pub time: Option<&'a str>,
}

impl Meta<'_> {
    /// Whether the line's own `key` gives way to Outrigger's.
    fn replaces(&self, tail: &Tail, key: &str) -> bool {
        tail.replaces(key) || (self.stream.is_some() && key == "stream")
    }
}

/// Turns lines into records; built once per run.
pub struct Encoder {
    redact: Vec<Redact>,
    /// Static fields and those from the environment: the name, and `"name":"value"`.
    fields: Vec<(String, Vec<u8>)>,
    /// The first bytes of every key [`Encoder::look`] cares about: most of a line's keys are
    /// passed over on one table lookup (a third of the encoder's own instructions, callgrind).
    first_bytes: [bool; 256],
}

/// Keys Outrigger reads or replaces, beside the configured fields.
const KEYS: &[&str] = &[
    "time",
    "timestamp",
    "ts",
    "@timestamp",
    "trace_id",
    "span_id",
    "traceId",
    "traceid",
    "trace.id",
    "spanId",
    "spanid",
    "span.id",
    "traceparent",
    "source",
    "stream",
    "file",
];

/// Which of the keys Outrigger looks for a line has.
#[derive(Default)]
struct Seen<'a> {
    time: bool,
    trace_id: bool,
    span_id: bool,
    /// The best alternative trace and span ids so far: (rank, raw value); rank 0 is best.
    trace: Option<(u8, &'a str)>,
    span: Option<(u8, &'a str)>,
    traceparent: Option<&'a str>,
    /// A key Outrigger replaces: the members must be copied one by one.
    replaced: bool,
    /// Bit i: the line has configured field i; `more` holds fields 64 and up (allocated only
    /// when the line has one of them).
    fields: u64,
    more: Vec<u64>,
}

impl Seen<'_> {
    fn set_field(&mut self, i: usize) {
        if i < 64 {
            self.fields |= 1 << i;
        } else {
            let w = i / 64 - 1;
            if self.more.len() <= w {
                self.more.resize(w + 1, 0);
            }
            self.more[w] |= 1 << (i % 64);
        }
    }

    fn has_field(&self, i: usize) -> bool {
        if i < 64 {
            self.fields & (1 << i) != 0
        } else {
            self.more
                .get(i / 64 - 1)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        }
    }
}

impl Encoder {
    pub fn new(redact: Vec<Redact>, fields: Vec<(String, String)>) -> Encoder {
        let mut first_bytes = [false; 256];
        for k in KEYS
            .iter()
            .copied()
            .chain(fields.iter().map(|(k, _)| k.as_str()))
        {
            // An empty name is looked at on every key.
            first_bytes[usize::from(k.bytes().next().unwrap_or(0))] = true;
        }
        first_bytes[0] = true;
        Encoder {
            redact,
            first_bytes,
            fields: fields
                .into_iter()
                .map(|(k, v)| {
                    let mut b = Vec::with_capacity(k.len() + v.len() + 5);
                    json::string(&mut b, &k);
                    b.push(b':');
                    json::string(&mut b, &v);
                    (k, b)
                })
                .collect(),
        }
    }

    /// Appends the record of `line` and a `\n` to `out`. False when the line is not what
    /// `format` says (`json`, `logfmt`, `regex` that did not parse or match): it is then
    /// shipped as `message`, like a plain line, and the caller counts it.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        line: &[u8],
        format: &LineFormat,
        tail: &Tail,
        meta: Meta<'_>,
        now: SystemTime,
    ) -> bool {
        // The validation alone first: `from_utf8_lossy` walks the line in chunks at ~5× the
        // cost of `from_utf8`'s word-at-a-time ASCII path (callgrind).
        let mut text = match std::str::from_utf8(line) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(line),
        };
        for r in &self.redact {
            if let Cow::Owned(s) = r.pattern.replace_all(&text, r.mask.as_str()) {
                text = Cow::Owned(s);
            }
        }
        // logfmt and regex fields are written as a JSON object and go the JSON way.
        let object: String;
        let json: Option<&str> = match format {
            LineFormat::Plain => None,
            LineFormat::Auto | LineFormat::Json => {
                Some(&*text).filter(|t| t.trim_start().starts_with('{'))
            }
            LineFormat::Logfmt => match logfmt(&text) {
                Some(o) => {
                    object = o;
                    Some(&object)
                }
                None => None,
            },
            LineFormat::Regex(r) => match captures(r, &text) {
                Some(o) => {
                    object = o;
                    Some(&object)
                }
                None => None,
            },
        };
        let mut seen = Seen::default();
        let mut empty = true;
        let valid = json.is_some_and(|j| {
            scan::members(j, |k, v| {
                empty = false;
                self.look(&mut seen, &k, v, tail, meta);
            })
        });
        let (true, Some(json)) = (valid, json) else {
            out.extend_from_slice(b"{\"message\":");
            json::string(out, &text);
            self.finish(out, &Seen::default(), true, (tail, meta, now));
            return matches!(format, LineFormat::Plain | LineFormat::Auto);
        };
        if seen.replaced {
            // Rare: copy every member but the replaced ones.
            out.push(b'{');
            let mut first = true;
            scan::members(json, |k, v| {
                if meta.replaces(tail, &k) {
                    return;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                json::string(out, &k);
                out.push(b':');
                out.extend_from_slice(v.as_bytes());
            });
            self.finish(out, &seen, !first, (tail, meta, now));
        } else {
            // The line as written, up to its closing brace.
            let t = json.trim_end();
            out.extend_from_slice(t[..t.len() - 1].trim_end().as_bytes());
            self.finish(out, &seen, !empty, (tail, meta, now));
        }
        true
    }

    /// Notes what one member of the line is.
    fn look<'a>(
        &self,
        seen: &mut Seen<'a>,
        key: &str,
        value: &'a str,
        tail: &Tail,
        meta: Meta<'_>,
    ) {
        if !self.first_bytes[usize::from(key.bytes().next().unwrap_or(0))] {
            return;
        }
        let string = value.starts_with('"');
        match key {
            "time" | "timestamp" | "ts" | "@timestamp" => seen.time = true,
            "trace_id" => seen.trace_id = true,
            "span_id" => seen.span_id = true,
            "traceId" | "traceid" | "trace.id" if string => {
                let rank = ["traceId", "traceid", "trace.id"]
                    .iter()
                    .position(|k| *k == key)
                    .unwrap_or(0) as u8;
                if seen.trace.is_none_or(|(r, _)| rank < r) {
                    seen.trace = Some((rank, value));
                }
            }
            "spanId" | "spanid" | "span.id" if string => {
                let rank = ["spanId", "spanid", "span.id"]
                    .iter()
                    .position(|k| *k == key)
                    .unwrap_or(0) as u8;
                if seen.span.is_none_or(|(r, _)| rank < r) {
                    seen.span = Some((rank, value));
                }
            }
            "traceparent" if string => seen.traceparent = Some(value),
            _ => {}
        }
        if meta.replaces(tail, key) {
            seen.replaced = true;
        }
        for (i, (name, _)) in self.fields.iter().enumerate() {
            if name == key {
                seen.set_field(i);
            }
        }
    }

    /// Writes the added members, the tail and the closing `}\n`. `comma`: something was
    /// written after the opening brace already.
    fn finish(
        &self,
        out: &mut Vec<u8>,
        seen: &Seen<'_>,
        comma: bool,
        (tail, meta, now): (&Tail, Meta<'_>, SystemTime),
    ) {
        let sep = |out: &mut Vec<u8>| out.push(b',');
        if comma {
            sep(out);
        }
        // trace_id/span_id under another name, or in a W3C traceparent
        // (version-traceid-spanid-flags); the line's own `trace_id`/`span_id` win.
        let mut trace = seen.trace.map(|(_, v)| Cow::Borrowed(v));
        let mut span = seen.span.map(|(_, v)| Cow::Borrowed(v));
        if trace.is_none()
            && let Some(tp) = seen
                .traceparent
                .and_then(|v| serde_json::from_str::<String>(v).ok())
        {
            let parts: Vec<&str> = tp.split('-').collect();
            if parts.len() == 4 && parts[1].len() == 32 && parts[2].len() == 16 {
                let quoted = |s: &str| {
                    let mut b = Vec::new();
                    json::string(&mut b, s);
                    Cow::Owned(String::from_utf8(b).unwrap_or_default())
                };
                trace = Some(quoted(parts[1]));
                span = span.or(Some(quoted(parts[2])));
            }
        }
        let (mut trace_added, mut span_added) = (false, false);
        if let (Some(t), false) = (trace, seen.trace_id) {
            out.extend_from_slice(b"\"trace_id\":");
            out.extend_from_slice(t.as_bytes());
            sep(out);
            trace_added = true;
        }
        if let (Some(s), false) = (span, seen.span_id) {
            out.extend_from_slice(b"\"span_id\":");
            out.extend_from_slice(s.as_bytes());
            sep(out);
            span_added = true;
        }
        if !seen.time {
            match meta.time {
                Some(t) => {
                    out.extend_from_slice(b"\"time\":");
                    json::string(out, t);
                    sep(out);
                }
                None => {
                    out.extend_from_slice(b"\"time\":\"");
                    json::time(out, now);
                    out.extend_from_slice(b"\",");
                }
            }
        }
        if let Some(s) = meta.stream {
            out.extend_from_slice(b"\"stream\":");
            json::string(out, s);
            sep(out);
        }
        for (i, (name, member)) in self.fields.iter().enumerate() {
            let has = seen.has_field(i);
            let lifted = (name == "trace_id" && trace_added) || (name == "span_id" && span_added);
            if !has && !lifted {
                out.extend_from_slice(member);
                sep(out);
            }
        }
        out.extend_from_slice(&tail.bytes);
        out.extend_from_slice(b"}\n");
    }
}

/// A logfmt line (`level=info msg="a b" took=5ms ok`) as a JSON object of strings (a bare key
/// is `true`); None when a token is not `key`, `key=value` or `key="quoted"`, or no token has
/// a value — then the line is shipped as `message`. The first of a repeated key wins.
///
/// Written by hand (forty lines): the Rust logfmt crates are unmaintained or build a map of
/// owned strings per line; this writes the object straight from the line.
fn logfmt(line: &str) -> Option<String> {
    let mut out = String::with_capacity(line.len() + 16);
    out.push('{');
    // A set: a joined multiline record can hold many thousands of keys (a Vec was quadratic).
    let mut keys: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut valued = false;
    let mut rest = line.trim();
    while !rest.is_empty() {
        let key_end = rest.find(['=', ' ', '"']).unwrap_or(rest.len());
        let key = &rest[..key_end];
        if key.is_empty() {
            return None;
        }
        rest = &rest[key_end..];
        let value: Option<Cow<'_, str>> = if let Some(r) = rest.strip_prefix('=') {
            valued = true;
            if r.starts_with('"') {
                // A JSON string's escapes are logfmt's (`\"`, `\\`): serde reads it to its end.
                let mut de = serde_json::Deserializer::from_str(r).into_iter::<String>();
                let v = de.next()?.ok()?;
                rest = &r[de.byte_offset()..];
                Some(Cow::Owned(v))
            } else {
                let end = r.find(' ').unwrap_or(r.len());
                rest = &r[end..];
                Some(Cow::Borrowed(&r[..end]))
            }
        } else if rest.is_empty() || rest.starts_with(' ') {
            None
        } else {
            return None;
        };
        if !rest.is_empty() && !rest.starts_with(' ') {
            return None;
        }
        rest = rest.trim_start();
        if !keys.insert(key) {
            continue;
        }
        if out.len() > 1 {
            out.push(',');
        }
        push_json(&mut out, key);
        out.push(':');
        match value {
            Some(v) => push_json(&mut out, &v),
            None => out.push_str("true"),
        }
    }
    out.push('}');
    valued.then_some(out)
}

/// The named captures of `pattern` in `line` as a JSON object of strings; None when it does not
/// match (the line is then shipped as `message`).
fn captures(pattern: &regex::Regex, line: &str) -> Option<String> {
    let c = pattern.captures(line)?;
    let mut out = String::with_capacity(line.len() + 32);
    out.push('{');
    for name in pattern.capture_names().flatten() {
        if let Some(m) = c.name(name) {
            if out.len() > 1 {
                out.push(',');
            }
            push_json(&mut out, name);
            out.push(':');
            push_json(&mut out, m.as_str());
        }
    }
    out.push('}');
    Some(out)
}

fn push_json(out: &mut String, s: &str) {
    let mut b = Vec::with_capacity(s.len() + 2);
    json::string(&mut b, s);
    out.push_str(std::str::from_utf8(&b).unwrap_or("\"\""));
}

/// A JSON object's top-level members, found while the whole text is validated.
///
/// Written by hand: serde_json (already in the tree) did this through a `Deserialize` of
/// `(key, &RawValue)` pairs, whose visitor machinery and per-value `ignore_value` were ~45 % of
/// the agent's instructions per line (callgrind, docs/BENCHMARKS.md); the SIMD validators
/// (`simd-json`, `sonic-rs`) bring large dependencies, `unsafe` and target-feature builds for
/// what is one grammar of a page. It accepts exactly what `serde_json::from_str` did for an
/// object: the same escapes, number grammar and whitespace, no nesting limit inside a member's
/// value (serde_json has none for a raw value), top-level keys with escapes decoded by serde_json
/// itself (so a lone surrogate there is refused, while in a nested key it passes, as it does
/// in serde_json's raw values); checked against serde_json in the tests, every
/// one-byte change of a line at every position.
pub(super) mod scan {
    use std::borrow::Cow;

    /// Calls `member(key, raw value)` for each top-level member of the JSON object `s` (with
    /// surrounding whitespace) in order; false when `s` is not one valid JSON object, in which
    /// case the members passed so far mean nothing.
    pub fn members<'a>(s: &'a str, mut member: impl FnMut(Cow<'a, str>, &'a str)) -> bool {
        let mut p = Scan {
            b: s.as_bytes(),
            i: 0,
        };
        p.ws();
        if p.peek() != Some(b'{') {
            return false;
        }
        p.i += 1;
        p.ws();
        if p.peek() == Some(b'}') {
            p.i += 1;
        } else {
            loop {
                if p.peek() != Some(b'"') {
                    return false;
                }
                let start = p.i;
                let Some(escaped) = p.string() else {
                    return false;
                };
                let key = if escaped {
                    match serde_json::from_str::<String>(&s[start..p.i]) {
                        Ok(k) => Cow::Owned(k),
                        Err(_) => return false,
                    }
                } else {
                    Cow::Borrowed(&s[start + 1..p.i - 1])
                };
                p.ws();
                if p.peek() != Some(b':') {
                    return false;
                }
                p.i += 1;
                p.ws();
                let start = p.i;
                if p.value().is_none() {
                    return false;
                }
                member(key, &s[start..p.i]);
                p.ws();
                match p.peek() {
                    Some(b',') => {
                        p.i += 1;
                        p.ws();
                    }
                    Some(b'}') => {
                        p.i += 1;
                        break;
                    }
                    _ => return false,
                }
            }
        }
        p.ws();
        p.i == p.b.len()
    }

    struct Scan<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl Scan<'_> {
        fn peek(&self) -> Option<u8> {
            self.b.get(self.i).copied()
        }

        fn ws(&mut self) {
            while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
                self.i += 1;
            }
        }

        /// One value (of a member: depth 1 is the object around it); `i` then just after it.
        fn value(&mut self) -> Option<()> {
            // Whether each open container is an object, innermost last: bit d of `kinds` for the
            // first 128, `deeper` past them (serde_json sets no depth limit inside a raw value).
            let mut kinds: u128 = 0;
            let mut deeper: Vec<bool> = Vec::new();
            let mut depth: usize = 0;
            loop {
                // A value starts here.
                match self.peek()? {
                    b'"' => {
                        self.string()?;
                    }
                    b'-' | b'0'..=b'9' => self.number()?,
                    b't' => self.literal(b"true")?,
                    b'f' => self.literal(b"false")?,
                    b'n' => self.literal(b"null")?,
                    open @ (b'[' | b'{') => {
                        self.i += 1;
                        self.ws();
                        let object = open == b'{';
                        if self.peek() == Some(if object { b'}' } else { b']' }) {
                            self.i += 1;
                        } else {
                            if depth < 128 {
                                kinds = kinds & !(1 << depth) | (u128::from(object) << depth);
                            } else {
                                deeper.truncate(depth - 128);
                                deeper.push(object);
                            }
                            depth += 1;
                            if object {
                                self.key()?;
                            }
                            continue;
                        }
                    }
                    _ => return None,
                }
                // After a value: the next member or element, or the end of containers.
                loop {
                    if depth == 0 {
                        return Some(());
                    }
                    let object = match depth - 1 {
                        d @ 0..128 => kinds & (1 << d) != 0,
                        d => deeper[d - 128],
                    };
                    self.ws();
                    match self.peek()? {
                        b',' => {
                            self.i += 1;
                            self.ws();
                            if object {
                                self.key()?;
                            }
                            break;
                        }
                        b'}' if object => {}
                        b']' if !object => {}
                        _ => return None,
                    }
                    self.i += 1;
                    depth -= 1;
                }
            }
        }

        /// A nested object's `"key" :` and the whitespace before its value.
        fn key(&mut self) -> Option<()> {
            if self.peek() != Some(b'"') {
                return None;
            }
            // Not decoded: serde_json skips a raw value's nested keys as it skips strings, so
            // a lone surrogate is accepted here (only top-level keys are decoded, in `members`).
            self.string()?;
            self.ws();
            if self.peek() != Some(b':') {
                return None;
            }
            self.i += 1;
            self.ws();
            Some(())
        }

        /// A string at its opening quote; `i` then after the closing one. Some(true) when it
        /// has escapes.
        fn string(&mut self) -> Option<bool> {
            self.i += 1;
            let mut escaped = false;
            loop {
                self.i = special(self.b, self.i);
                match self.peek()? {
                    b'"' => {
                        self.i += 1;
                        return Some(escaped);
                    }
                    b'\\' => {
                        escaped = true;
                        match *self.b.get(self.i + 1)? {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                            b'u' => {
                                let hex = self.b.get(self.i + 2..self.i + 6)?;
                                if !hex.iter().all(u8::is_ascii_hexdigit) {
                                    return None;
                                }
                                self.i += 6;
                            }
                            _ => return None,
                        }
                    }
                    // A control character.
                    _ => return None,
                }
            }
        }

        fn number(&mut self) -> Option<()> {
            if self.peek() == Some(b'-') {
                self.i += 1;
            }
            match self.peek()? {
                b'0' => {
                    self.i += 1;
                    if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        return None;
                    }
                }
                b'1'..=b'9' => self.digits(),
                _ => return None,
            }
            if self.peek() == Some(b'.') {
                self.i += 1;
                if !self.peek()?.is_ascii_digit() {
                    return None;
                }
                self.digits();
            }
            if let Some(b'e' | b'E') = self.peek() {
                self.i += 1;
                if let Some(b'+' | b'-') = self.peek() {
                    self.i += 1;
                }
                if !self.peek()?.is_ascii_digit() {
                    return None;
                }
                self.digits();
            }
            Some(())
        }

        fn digits(&mut self) {
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
        }

        fn literal(&mut self, word: &[u8]) -> Option<()> {
            if !self.b[self.i..].starts_with(word) {
                return None;
            }
            self.i += word.len();
            Some(())
        }
    }

    /// The position of the first `"`, `\` or control character at or after `i` (or the end),
    /// eight bytes a step: a byte is flagged by the usual "has a zero byte" word arithmetic,
    /// whose lowest flag is exact.
    fn special(b: &[u8], mut i: usize) -> usize {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        while let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            let q = w ^ (ONES * u64::from(b'"'));
            let e = w ^ (ONES * u64::from(b'\\'));
            let m = (q.wrapping_sub(ONES) & !q
                | e.wrapping_sub(ONES) & !e
                | w.wrapping_sub(ONES * 0x20) & !w)
                & HIGH;
            if m != 0 {
                return i + (m.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        while let Some(&c) = b.get(i) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                break;
            }
            i += 1;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    // The old path, kept as the oracle of `scan::members`: serde_json's own validation.
    use serde::Deserialize;
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    /// A JSON object's top-level members in order, values left unparsed.
    struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

    /// A key borrowed from the line unless it has escapes.
    struct Key<'a>(Cow<'a, str>);

    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a key")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v)))
                }
            }
            d.deserialize_str(V)
        }
    }

    impl<'de> Deserialize<'de> for Members<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Members<'de>, A::Error> {
                    let mut v = Vec::with_capacity(16);
                    while let Some((Key(k), raw)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                        v.push((k, raw));
                    }
                    Ok(Members(v))
                }
            }
            d.deserialize_map(V)
        }
    }

    /// What `scan::members` says of `s`, next to what serde_json says.
    type Pairs = Option<Vec<(String, String)>>;

    fn both(s: &str) -> (Pairs, Pairs) {
        let mut got = Vec::new();
        let ok = scan::members(s, |k, v| got.push((k.into_owned(), v.to_owned())));
        let want = serde_json::from_str::<Members<'_>>(s)
            .ok()
            .map(|Members(m)| {
                m.into_iter()
                    .map(|(k, v)| (k.into_owned(), v.get().to_owned()))
                    .collect()
            });
        (ok.then_some(got), want)
    }

    #[test]
    fn the_scanner_accepts_what_serde_json_accepts() {
        let cases = [
            r#"{"time":"2026-12-06T08:00:00.1Z","level":"info","status":200,"duration_ms":3.25,"ok":true,"n":null,"f":false}"#,
            r#" { "a" : [ 1 , -0.5e+3 , {"b" : [] } , {} , "x\"y\\z\/\b\f\n\r\t\u00e9" ] , "k\u0065y" : -0 } "#,
            r#"{"a":"\ud83d\ude00","b":"\ud800"}"#,
            r#"{"":"","":1}"#,
            // Nested keys are not decoded by serde_json's raw values: a lone surrogate passes.
            r#"{"a":{"\ud800":1}}"#,
            r#"{"a":[{"k\u0065y":1}]}"#,
            "{}",
            "{\"a\":1}\n",
        ];
        let bad = [
            r#"{"\ud800":1}"#,
            "",
            "{",
            "}",
            "[1]",
            "1",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{,}"#,
            r#"{"a":1"#,
            r#"{"a":1}x"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":-}"#,
            r#"{"a":+1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12g4"}"#,
            "{\"a\":\"\t\"}",
            r#"{"a":[1,]}"#,
            r#"{"a":[1 2]}"#,
            r#"{"a":{"b" 1}}"#,
            r#"{"a":{1:2}}"#,
            r#"{"a":[}"#,
            r#"{"a":{]}"#,
            r#"{a:1}"#,
            r#"{"a":1}{}"#,
            r#"{"a":"x}"#,
            "{\"a\":1}\u{0c}",
        ];
        for c in cases.iter().chain(&bad) {
            let (got, want) = both(c);
            assert_eq!(got, want, "{c:?}");
        }
        for c in cases {
            assert!(both(c).0.is_some(), "{c:?}");
        }
        for c in bad {
            assert!(both(c).0.is_none(), "{c:?}");
        }
        // Raw multi-byte characters, long strings, and a quote, backslash or control character
        // at every offset of an eight-byte step, next to a multi-byte character.
        for pad in 0..17 {
            let x = "x".repeat(pad);
            let valid = [
                format!(r#"{{"k{x}é":"{x}\"é😀","m":"{x}\\é","n":["{x}é"]}}"#),
                format!(r#"{{"k":"{x}😀\u00e9é{x}","é{x}":{{"ü{x}😀":"{x}é"}}}}"#),
                format!("{{\"k\":\"{x}é\u{7f}😀\"}}"),
            ];
            for s in &valid {
                let (got, want) = both(s);
                assert!(got.is_some(), "{s:?}");
                assert_eq!(got, want, "{s:?}");
            }
            for s in [
                format!(r#"{{"k":"{x}"é😀"}}"#),
                format!("{{\"k\":\"{x}\té\"}}"),
                format!("{{\"k\":\"{x}é\u{1f}😀\"}}"),
            ] {
                let (got, want) = both(&s);
                assert!(got.is_none(), "{s:?}");
                assert_eq!(got, want, "{s:?}");
            }
        }
        let long = format!(
            r#"{{"msg":"{}","e":"{}","q":"{}\"{}"}}"#,
            "é".repeat(300),
            "😀".repeat(300),
            "a".repeat(1000),
            "ü".repeat(1000)
        );
        let (got, want) = both(&long);
        assert!(got.is_some());
        assert_eq!(got, want);
        // Deep nesting (serde_json's limit of 128 is not applied to raw values).
        for depth in (120..135).chain([300, 1000]) {
            let s = format!(r#"{{"a":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth));
            let (got, want) = both(&s);
            assert_eq!(got.is_some(), want.is_some(), "depth {depth}");
            let s = format!(
                r#"{{"a":{}1{}}}"#,
                r#"{"b":"#.repeat(depth),
                "}".repeat(depth)
            );
            let (got, want) = both(&s);
            assert_eq!(got.is_some(), want.is_some(), "depth {depth}");
        }
        // Every one-byte change of a realistic line, at every position.
        // Every one-byte change and every one-byte deletion of realistic lines, at every
        // position (those that leave invalid UTF-8 are no `&str` and are skipped).
        let lines = [
            r#"{"time":"2026-12-06T08:00:00.123456Z","level":"info","msg":"a \"b\" \u00e9","status":200,"d":-1.5e-3,"ok":true,"n":null,"tags":["x",{"y":[false]}],"e":{}}"#,
            r#"{"msg":"café \"crème\" 😀","k\u00e9y":"é\\","o":{"ü":["ñ",1]}}"#,
        ];
        let subs = b" \t\n\"\\{}[]:,.-+0123456789eEtrufalsn\x01\x7fxu/";
        for line in lines {
            assert!(both(line).0.is_some(), "{line:?}");
            for i in 0..line.len() {
                for &c in subs {
                    let mut b = line.as_bytes().to_vec();
                    b[i] = c;
                    let Ok(s) = String::from_utf8(b) else {
                        continue;
                    };
                    let (got, want) = both(&s);
                    assert_eq!(got, want, "{s:?}");
                }
                let mut b = line.as_bytes().to_vec();
                b.remove(i);
                let Ok(s) = String::from_utf8(b) else {
                    continue;
                };
                let (got, want) = both(&s);
                assert_eq!(got, want, "{s:?}");
            }
        }
    }

    fn enc() -> Encoder {
        Encoder::new(
            vec![Redact {
                pattern: regex::Regex::new(r"password=\S+").unwrap(),
                mask: "password=***".into(),
            }],
            vec![("service".into(), "shop".into())],
        )
    }

    fn record(line: &str, format: LineFormat) -> Map<String, Value> {
        let mut out = Vec::new();
        enc().encode(
            &mut out,
            line.as_bytes(),
            &format,
            &Tail::new("app", Origin::Stream("stdout")),
            Meta::default(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn plain_lines_become_messages_with_fields_and_redaction() {
        let r = record("login password=hunter2 ok", LineFormat::Auto);
        assert_eq!(r["message"], "login password=*** ok");
        assert_eq!(r["service"], "shop");
        assert_eq!(r["source"], "app");
        assert_eq!(r["stream"], "stdout");
        assert_eq!(r["time"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn json_lines_keep_their_fields_and_lift_trace_ids() {
        let r = record(
            r#"{"msg":"hi","traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7","service":"own","ts":1}"#,
            LineFormat::Auto,
        );
        assert_eq!(r["msg"], "hi");
        assert_eq!(r["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r["span_id"], "00f067aa0ba902b7");
        assert_eq!(r["service"], "own");
        assert!(r.get("time").is_none());
        let r = record(
            r#"{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","note":"x password=y z"}"#,
            LineFormat::Json,
        );
        assert_eq!(r["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r["note"], "x password=*** z");
        let r = record(r#"{"a":1}"#, LineFormat::Plain);
        assert_eq!(r["message"], r#"{"a":1}"#);
    }

    #[test]
    fn json_lines_keep_their_bytes_and_lose_only_the_keys_outrigger_sets() {
        let mut out = Vec::new();
        let tail = Tail::new("app", Origin::Stream("stdout"));
        let e = enc();
        e.encode(
            &mut out,
            br#" {"a": [1, {"b":2}] , "ts":3} "#,
            &LineFormat::Json,
            &tail,
            Meta::default(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            " {\"a\": [1, {\"b\":2}] , \"ts\":3,\"service\":\"shop\",\"source\":\"app\",\"stream\":\"stdout\"}\n"
        );
        // The line's own `source` and `stream` are replaced; an escaped key is still a key.
        let r = record(
            r#"{"source":"mine","str\u0065am":"x","k\"ey":"v","service":"own"}"#,
            LineFormat::Json,
        );
        assert_eq!(r["source"], "app");
        assert_eq!(r["stream"], "stdout");
        assert_eq!(r["k\"ey"], "v");
        assert_eq!(r["service"], "own");
        assert_eq!(r.len(), 5, "{r:?}");
        // An empty object, and a JSON line that is not an object.
        let r = record("{}", LineFormat::Json);
        assert_eq!(r.len(), 4, "{r:?}");
        let r = record("[1]", LineFormat::Auto);
        assert_eq!(r["message"], "[1]");
        let r = record(r#"{"a":1"#, LineFormat::Auto);
        assert_eq!(r["message"], r#"{"a":1"#);
        // A trace id under another name (the best-ranked one), a span from a traceparent.
        let r = record(
            r#"{"trace.id":"bbb","traceId":"aaa","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#,
            LineFormat::Json,
        );
        assert_eq!(r["trace_id"], "aaa");
        assert!(r.get("span_id").is_none());
        let r = record(r#"{"trace_id":7,"traceId":"aaa"}"#, LineFormat::Json);
        assert_eq!(r["trace_id"], 7);
    }

    #[test]
    fn a_lines_own_fields_win_past_the_64th_configured_one() {
        let fields = (0..130)
            .map(|i| (format!("f{i}"), "cfg".to_string()))
            .collect();
        let e = Encoder::new(vec![], fields);
        let mut out = Vec::new();
        e.encode(
            &mut out,
            br#"{"f0":"own","f64":"own","f129":"own","f70":{"f71":1}}"#,
            &LineFormat::Json,
            &Tail::new("app", Origin::Stream("stdout")),
            Meta::default(),
            SystemTime::UNIX_EPOCH,
        );
        for k in ["f0", "f64", "f129", "f70", "f128"] {
            let n = out
                .windows(k.len() + 3)
                .filter(|w| *w == format!("\"{k}\":").as_bytes())
                .count();
            assert_eq!(n, 1, "{k}: {}", String::from_utf8_lossy(&out));
        }
        let r: Map<String, Value> = serde_json::from_slice(&out).unwrap();
        for k in ["f0", "f64", "f129"] {
            assert_eq!(r[k], "own");
        }
        assert_eq!(r["f71"], "cfg");
        assert_eq!(r["f128"], "cfg");
        assert_eq!(r.len(), 130 + 3, "{r:?}");
    }

    #[test]
    fn logfmt_lines_become_fields_and_other_lines_messages() {
        let r = record(
            r#"level=info msg="user \"x\" logged in" took=5ms cached source=own trace_id=abc"#,
            LineFormat::Logfmt,
        );
        assert_eq!(r["level"], "info");
        assert_eq!(r["msg"], r#"user "x" logged in"#);
        assert_eq!(r["took"], "5ms");
        assert_eq!(r["cached"], true);
        assert_eq!(r["trace_id"], "abc");
        assert_eq!(r["source"], "app");
        assert_eq!(r["service"], "shop");
        // No pair, or a malformed token: the line is the message.
        for l in [
            "just words here",
            r#"a="unterminated"#,
            "=x",
            r#"k="v"rest"#,
        ] {
            let r = record(l, LineFormat::Logfmt);
            assert_eq!(r["message"], l, "{r:?}");
        }
        // Redaction runs before parsing: the secret never becomes a field.
        let r = record("user=a password=hunter2", LineFormat::Logfmt);
        assert_eq!(r["password"], "***");
    }

    #[test]
    fn regex_captures_become_fields() {
        let re = regex::Regex::new(r"^(?P<level>[A-Z]+) \[(?P<thread>[^\]]*)\] (?P<message>.*)$")
            .unwrap();
        let r = record("WARN [main] disk \"full\"", LineFormat::Regex(re.clone()));
        assert_eq!(r["level"], "WARN");
        assert_eq!(r["thread"], "main");
        assert_eq!(r["message"], "disk \"full\"");
        let r = record("no match", LineFormat::Regex(re));
        assert_eq!(r["message"], "no match");
        assert!(r.get("level").is_none());
    }

    #[test]
    fn a_container_runtimes_stream_and_time_are_used() {
        let mut out = Vec::new();
        let meta = Meta {
            stream: Some("stderr"),
            time: Some("2024-01-01T00:00:00.5Z"),
        };
        let tail = Tail::new("pods", Origin::File(std::path::Path::new("/var/log/0.log")));
        enc().encode(
            &mut out,
            br#"{"stream":"x","a":1}"#,
            &LineFormat::Auto,
            &tail,
            meta,
            SystemTime::UNIX_EPOCH,
        );
        enc().encode(
            &mut out,
            b"plain",
            &LineFormat::Auto,
            &tail,
            meta,
            SystemTime::UNIX_EPOCH,
        );
        let rs: Vec<Map<String, Value>> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        for r in &rs {
            assert_eq!(r["stream"], "stderr");
            assert_eq!(r["time"], "2024-01-01T00:00:00.5Z");
            assert_eq!(r["file"], "/var/log/0.log");
        }
        assert_eq!(rs[0]["a"], 1);
        assert_eq!(rs[1]["message"], "plain");
    }
}
