//! Trace context: W3C `traceparent`/`tracestate` and B3 (single `b3` header and the
//! `X-B3-*` headers) are accepted on every proxied request; each hop through Outrigger is a
//! span whose id replaces the parent id going upstream; a request without context starts a new
//! trace, sampled with `telemetry.tracing.sample`. `x-request-id`, when absent, is the trace id.
//!
//! Written by hand rather than with `opentelemetry`'s propagators: those need its whole SDK and
//! context machinery for what is a few dozen lines of header parsing, on the data path.

use http::header::{HeaderMap, HeaderName, HeaderValue};

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Which format the incoming context came in (also written back going upstream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// None came: a new trace.
    None,
    W3c,
    B3Single,
    B3Multi,
}

/// Bytes of `traceparent` and generated `x-request-id` values: each value is a slice of a
/// shared 1 KiB buffer instead of its own allocation (`HeaderValue::from_bytes` copies into a
/// new one, once per proxied request). A buffer is freed when the last header sliced from it
/// is. Why 1 KiB (as the raw exchange's `SHARED_HEAD`): an HTTP/2 upstream connection's HPACK
/// table may keep a value (~50 entries at most), and each kept value keeps its buffer; 1 KiB
/// still holds ~11 requests' values (one allocation for them).
const VALUE_ARENA: usize = 1024;

thread_local! {
    static VALUES: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// `value` (visible ASCII) as a header value sliced from this thread's buffer of values.
pub(crate) fn shared_value(value: &[u8]) -> HeaderValue {
    HeaderValue::from_maybe_shared(shared_bytes(value)).expect("hex is a valid value")
}

/// `value`'s bytes in this thread's buffer of values.
fn shared_bytes(value: &[u8]) -> bytes::Bytes {
    VALUES.with_borrow_mut(|buf| {
        if buf.capacity() - buf.len() < value.len() {
            *buf = bytes::BytesMut::with_capacity(VALUE_ARENA.max(value.len()));
        }
        buf.extend_from_slice(value);
        buf.split().freeze()
    })
}

/// One hop's trace context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The caller's span (None for a new trace).
    pub parent_id: Option<u64>,
    /// This hop's span: the parent id the upstream sees.
    pub span_id: u64,
    pub sampled: bool,
    pub format: Format,
}

/// Writes the low `out.len() * 4` bits of `v` as lowercase hex, right-aligned.
pub(crate) fn hex_into(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Two digits per byte of `v` from a table: half the steps of a digit at a time (this runs
    // twice per proxied request, for the `traceparent` and the request id).
    static PAIRS: [[u8; 2]; 256] = {
        let mut t = [[0; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        t
    };
    let mut pairs = out.rchunks_exact_mut(2);
    for pair in &mut pairs {
        pair.copy_from_slice(&PAIRS[(v & 0xff) as usize]);
        v >>= 8;
    }
    if let [first] = pairs.into_remainder() {
        *first = DIGITS[(v & 0xf) as usize];
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

fn hex_u128(s: &str) -> Option<u128> {
    match s.len() {
        32 | 16 if s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u128::from_str_radix(s, 16).ok().filter(|v| *v != 0)
        }
        _ => None,
    }
}

fn hex_u64(s: &str) -> Option<u64> {
    if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(s, 16).ok().filter(|v| *v != 0)
    } else {
        None
    }
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

impl TraceContext {
    /// The context of a request: from its headers, or a new trace sampled with `sample`.
    pub fn from_headers(h: &HeaderMap, sample: f64) -> TraceContext {
        // Most requests carry no context: one pass over the names instead of six lookups.
        if !h.keys().any(is_context_header) {
            return TraceContext::fresh(sample >= 1.0 || fastrand::f64() < sample);
        }
        // Two traceparent headers are invalid (W3C): a new trace.
        let w3c = (h.get_all(&TRACEPARENT).iter().count() == 1)
            .then(|| header(h, &TRACEPARENT))
            .flatten();
        let found = w3c
            .and_then(parse_w3c)
            .or_else(|| header(h, &B3).and_then(parse_b3_single))
            .or_else(|| parse_b3_multi(h));
        match found {
            Some((trace_id, parent, sampled, format)) => TraceContext {
                trace_id,
                parent_id: Some(parent),
                span_id: nonzero_u64(),
                sampled,
                format,
            },
            // `b3: 0` (or `X-B3-Sampled: 0`) alone carries no context, only "do not
            // sample"; `b3: 1`/`d` only "sample".
            None => TraceContext::fresh(match forced_sampling(h) {
                Some(decision) => decision,
                None => sample >= 1.0 || fastrand::f64() < sample,
            }),
        }
    }

    /// A new trace, this hop its root.
    fn fresh(sampled: bool) -> TraceContext {
        TraceContext {
            sampled,
            trace_id: loop {
                let v = fastrand::u128(..);
                if v != 0 {
                    break v;
                }
            },
            parent_id: None,
            span_id: nonzero_u64(),
            format: Format::None,
        }
    }

    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The trace id as a header value (for `x-request-id`), without a String in between.
    pub fn trace_header(&self) -> HeaderValue {
        let mut buf = [0u8; 32];
        hex_into(&mut buf, self.trace_id);
        shared_value(&buf)
    }

    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// Writes the context for the upstream: `traceparent` always (this hop's span as the
    /// parent), and the B3 form too when the request came with B3, so a Zipkin-instrumented
    /// app keeps working. An invalid or absent `traceparent` also drops `tracestate`.
    /// The `traceparent` value the upstream sees (this hop's span as the parent), encoded on
    /// the stack: this runs for every proxied request.
    pub fn traceparent(&self) -> [u8; 55] {
        let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex_into(&mut tp[3..35], self.trace_id);
        hex_into(&mut tp[36..52], u128::from(self.span_id));
        if self.sampled {
            tp[54] = b'1';
        }
        tp
    }

    pub fn inject(&self, h: &mut HeaderMap) {
        self.inject_value(h, shared_value(&self.traceparent()));
    }

    /// [`inject`](Self::inject), and `id` (`x-request-id`) set to the trace id when `h` has
    /// none: a slice of the `traceparent` value's bytes, not a second encoding.
    pub fn inject_with_id(&self, h: &mut HeaderMap, id: &HeaderName) {
        let tp = shared_bytes(&self.traceparent());
        if !h.contains_key(id) {
            let trace_id = HeaderValue::from_maybe_shared(tp.slice(3..35));
            h.insert(id.clone(), trace_id.expect("hex is a valid value"));
        }
        let tp = HeaderValue::from_maybe_shared(tp).expect("hex is a valid value");
        self.inject_value(h, tp);
    }

    fn inject_value(&self, h: &mut HeaderMap, traceparent: HeaderValue) {
        h.insert(TRACEPARENT.clone(), traceparent);
        if self.format == Format::None
            && !h.keys().any(|k| k != TRACEPARENT && is_context_header(k))
        {
            // Nothing stale to remove (the common case: one pass, not seven removals).
            return;
        }
        if self.format != Format::W3c {
            h.remove(&TRACESTATE);
        }
        if self.format != Format::B3Single {
            // A B3 header of another hop (or a sampling-only one) must not contradict ours.
            h.remove(&B3);
        }
        if self.format != Format::B3Multi {
            // Nor may X-B3-* headers left beside a traceparent that won.
            for name in [
                &B3_TRACE_ID,
                &B3_SPAN_ID,
                &B3_PARENT,
                &B3_SAMPLED,
                &B3_FLAGS,
            ] {
                h.remove(name);
            }
        }
        let hex = |s: String| HeaderValue::from_str(&s).expect("hex is a valid value");
        match self.format {
            Format::B3Single => {
                let sampled = if self.sampled { "1" } else { "0" };
                let mut v = format!("{}-{}-{sampled}", self.trace_hex(), self.span_hex());
                if let Some(p) = self.parent_id {
                    v.push_str(&format!("-{p:016x}"));
                }
                h.insert(B3.clone(), hex(v));
            }
            Format::B3Multi => {
                h.insert(B3_TRACE_ID.clone(), hex(self.trace_hex()));
                h.insert(B3_SPAN_ID.clone(), hex(self.span_hex()));
                if let Some(p) = self.parent_id {
                    h.insert(B3_PARENT.clone(), hex(format!("{p:016x}")));
                }
                h.insert(
                    B3_SAMPLED.clone(),
                    HeaderValue::from_static(if self.sampled { "1" } else { "0" }),
                );
                h.remove(&B3_FLAGS);
            }
            Format::None | Format::W3c => {}
        }
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` (future versions: the same first
/// four fields).
fn parse_w3c(v: &str) -> Option<(u128, u64, bool, Format)> {
    let mut parts = v.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || !version.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || flags.len() != 2 {
        return None;
    }
    // Upper-case hex is invalid in traceparent.
    if v.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    if !flags.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((
        hex_u128(trace)?,
        hex_u64(parent)?,
        flags & 1 == 1,
        Format::W3c,
    ))
}

/// `b3: {TraceId}-{SpanId}[-{Sampled}[-{ParentSpanId}]]`; a bare `b3: 0` only says "do not
/// sample" and carries no context.
fn parse_b3_single(v: &str) -> Option<(u128, u64, bool, Format)> {
    let mut parts = v.split('-');
    let trace = hex_u128(parts.next()?)?;
    let span = hex_u64(parts.next()?)?;
    let sampled = match parts.next() {
        None | Some("1") | Some("d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    Some((trace, span, sampled, Format::B3Single))
}

/// A sampling decision without context: `b3: 0|1|d`, or `X-B3-Sampled`/`X-B3-Flags` alone.
fn forced_sampling(h: &HeaderMap) -> Option<bool> {
    match header(h, &B3) {
        Some("0") => return Some(false),
        Some("1") | Some("d") => return Some(true),
        _ => {}
    }
    if header(h, &B3_FLAGS) == Some("1") {
        return Some(true);
    }
    match header(h, &B3_SAMPLED) {
        Some("0") | Some("false") => Some(false),
        Some("1") | Some("true") => Some(true),
        _ => None,
    }
}

/// Whether a raw header name (any case) carries trace context ([`is_context_header`]).
pub(crate) fn is_context_name(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"traceparent")
        || name.eq_ignore_ascii_case(b"tracestate")
        || name.eq_ignore_ascii_case(b"b3")
        || name.len() > 5 && name[..5].eq_ignore_ascii_case(b"x-b3-")
}

/// A header that carries (or would contradict) trace context.
fn is_context_header(k: &HeaderName) -> bool {
    let s = k.as_str();
    s == "traceparent" || s == "tracestate" || s == "b3" || s.starts_with("x-b3-")
}

fn parse_b3_multi(h: &HeaderMap) -> Option<(u128, u64, bool, Format)> {
    let trace = hex_u128(header(h, &B3_TRACE_ID)?)?;
    let span = hex_u64(header(h, &B3_SPAN_ID)?)?;
    let sampled = header(h, &B3_FLAGS) == Some("1")
        || !matches!(header(h, &B3_SAMPLED), Some("0") | Some("false"));
    Some((trace, span, sampled, Format::B3Multi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn injected_values_sliced_from_one_buffer_stay_each_their_own() {
        // More values than one 4 KiB buffer holds: every map keeps its own value, also after
        // the buffer it was sliced from has been replaced.
        let maps: Vec<(TraceContext, HeaderMap)> = (0..200u64)
            .map(|i| {
                let ctx = TraceContext {
                    trace_id: u128::from(i) << 64 | 0xabc,
                    parent_id: None,
                    span_id: i + 1,
                    sampled: i % 2 == 0,
                    format: Format::None,
                };
                let mut h = HeaderMap::new();
                ctx.inject(&mut h);
                (ctx, h)
            })
            .collect();
        for (ctx, h) in &maps {
            assert_eq!(h["traceparent"].as_bytes(), &ctx.traceparent()[..]);
        }
    }

    /// The request id set with the traceparent is the trace id, sliced from the same bytes;
    /// a request's own id is kept.
    #[test]
    fn the_request_id_is_the_trace_id_unless_the_request_has_one() {
        let ctx = TraceContext {
            trace_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            parent_id: None,
            span_id: 0xfedc_ba98_7654_3210,
            sampled: true,
            format: Format::None,
        };
        let id = HeaderName::from_static("x-request-id");
        let mut h = HeaderMap::new();
        ctx.inject_with_id(&mut h, &id);
        assert_eq!(h[&id], "0123456789abcdef0011223344556677");
        assert_eq!(h[&id], ctx.trace_header());
        assert_eq!(
            h["traceparent"],
            "00-0123456789abcdef0011223344556677-fedcba9876543210-01"
        );
        let mut h = headers(&[("x-request-id", "mine")]);
        ctx.inject_with_id(&mut h, &id);
        assert_eq!(h[&id], "mine");
        assert_eq!(h["traceparent"].as_bytes(), &ctx.traceparent()[..]);
    }

    #[test]
    fn hex_is_right_aligned_in_odd_and_even_widths() {
        for (width, want) in [(1, "f"), (2, "ef"), (3, "def"), (5, "bcdef"), (0, "")] {
            let mut out = vec![b'-'; width];
            hex_into(&mut out, 0xabcdef);
            assert_eq!(out, want.as_bytes());
        }
        let mut out = [0; 32];
        hex_into(&mut out, u128::MAX);
        assert_eq!(&out, b"ffffffffffffffffffffffffffffffff");
    }

    #[test]
    fn stale_b3_headers_beside_a_winning_traceparent_are_removed() {
        let mut h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ]);
        let t = TraceContext::from_headers(&h, 0.0);
        assert_eq!(t.format, Format::W3c);
        t.inject(&mut h);
        for name in [
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-sampled",
            "x-b3-flags",
            "b3",
        ] {
            assert!(!h.contains_key(name), "{name} left behind");
        }
    }

    #[test]
    fn w3c_in_w3c_out_keeps_the_trace_and_makes_a_new_parent() {
        let mut h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let t = TraceContext::from_headers(&h, 0.0);
        assert_eq!(t.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, Some(0x00f067aa0ba902b7));
        assert!(t.sampled);
        t.inject(&mut h);
        let out = h["traceparent"].to_str().unwrap();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(
            &out[36..52],
            "00f067aa0ba902b7",
            "a new span id goes upstream"
        );
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
    }

    #[test]
    fn invalid_or_absent_context_starts_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            let mut h = headers(&[("traceparent", bad), ("tracestate", "a=b")]);
            let t = TraceContext::from_headers(&h, 1.0);
            assert_eq!(t.format, Format::None, "{bad}");
            assert_eq!(t.parent_id, None);
            t.inject(&mut h);
            assert!(h.get("tracestate").is_none(), "{bad}");
        }
        let t = TraceContext::from_headers(&HeaderMap::new(), 0.0);
        assert!(!t.sampled, "sample 0 samples nothing");
        assert_ne!(t.trace_id, 0);
        // Flags with a sign, and duplicated traceparent headers, are invalid too.
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
        )]);
        assert_eq!(TraceContext::from_headers(&h, 1.0).format, Format::None);
        let mut h = HeaderMap::new();
        for _ in 0..2 {
            h.append(
                "traceparent",
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
        }
        assert_eq!(TraceContext::from_headers(&h, 1.0).format, Format::None);
    }

    #[test]
    fn b3_sampling_only_forms_decide_the_new_trace() {
        let mut h = headers(&[("b3", "0")]);
        let t = TraceContext::from_headers(&h, 1.0);
        assert!(!t.sampled);
        t.inject(&mut h);
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        assert!(h.get("b3").is_none(), "the stale b3 header is gone");
        let h = headers(&[("x-b3-flags", "1")]);
        assert!(TraceContext::from_headers(&h, 0.0).sampled);
    }

    #[test]
    fn b3_in_w3c_and_b3_out() {
        let mut h = headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]);
        let t = TraceContext::from_headers(&h, 0.0);
        assert_eq!(t.format, Format::B3Single);
        assert_eq!(t.parent_id, Some(0xe457b5a2e4d86bd1));
        t.inject(&mut h);
        assert!(
            h["traceparent"]
                .to_str()
                .unwrap()
                .starts_with("00-80f198ee56343ba864fe8b2a57d3eff7-")
        );
        let b3 = h["b3"].to_str().unwrap();
        assert!(
            b3.starts_with(&format!(
                "80f198ee56343ba864fe8b2a57d3eff7-{}-1-e457b5a2e4d86bd1",
                t.span_hex()
            )),
            "{b3}"
        );

        // 64-bit B3 trace ids are widened; multi-header form.
        let mut h = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
        ]);
        let t = TraceContext::from_headers(&h, 1.0);
        assert_eq!(t.trace_hex(), "0000000000000000a3ce929d0e0e4736");
        assert!(!t.sampled);
        t.inject(&mut h);
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-spanid"].to_str().unwrap(), t.span_hex());
    }
}
