//! Header blocks: a request's block decoded (by [`super::hpack_decode`], which keeps the
//! connection's dynamic table) and checked into an `http::Request` head as h2's server builds
//! one, and a response's head encoded.
//!
//! The response encoder is ours and stateless: `:status` from the static table, every other
//! field a literal without indexing (never indexed when the value is marked sensitive), its
//! name from the static table when it is there, no Huffman coding. So it needs no lock, runs
//! on the stream's own task, never sends a dynamic table size update, and costs a copy of the
//! bytes: on loopback, fewer instructions matter more than fewer bytes. `loona-hpack`'s
//! encoder would add every new field to its table with two `Vec` copies.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};

/// The fields of RFC 9113 §8.2.2 that HTTP/2 has no place for (and, for a response, the
/// hop-by-hop ones we drop before encoding).
pub(super) fn connection_specific(name: &HeaderName) -> bool {
    name == http::header::CONNECTION
        || name == http::header::TRANSFER_ENCODING
        || name == http::header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Why a request's header block was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// Malformed (§8.1.1): the stream is reset with PROTOCOL_ERROR.
    Malformed(&'static str),
    /// Over SETTINGS_MAX_HEADER_LIST_SIZE: answered 431, as h2's server does.
    TooLarge,
}

/// A request head as decoded, before it is turned into an `http::Request`.
pub(super) struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The `content-length`, when the request stated one.
    pub content_length: Option<u64>,
}

/// Room the proxy's phases need in a request's `HeaderMap` for the fields they add before
/// forwarding (`x-forwarded-for`, `x-forwarded-proto`, `via`, `x-request-id`, `traceparent`,
/// `tracestate`, `host`, …): sized for them at once, the map is not grown (a new index table
/// and a moved entry array each time) three or four times per request.
const ADDED_BY_PHASES: usize = 8;

/// The value arena's normal size: a new one of this size once what is left of the current
/// one is shorter than a block needs. A block that needs more gets an arena of its own size,
/// which is not kept after the block.
const ARENA: usize = 4096;

/// The most entries the reused field list keeps room for between blocks (56 bytes each): a
/// request with more fields grows it for its block only.
const FIELDS_KEPT: usize = 64;

/// The most fields one block may carry (refused as too large past it), well under what a
/// `HeaderMap` holds (24,576) with room for what the phases add.
const MAX_FIELDS: usize = 16_384;

/// Collects one header block's fields (a callback of the HPACK decoder, which cannot fail, so
/// the first problem is remembered and the rest of the block only decoded). One per
/// connection, reused for every block ([`BlockReader::start`]).
pub(super) struct BlockReader {
    max_list_size: usize,
    size: usize,
    refused: Option<Refused>,
    regular_seen: bool,
    method: Option<Method>,
    scheme: Option<Scheme>,
    authority: Option<(usize, usize)>,
    path: Option<(usize, usize)>,
    content_length: Option<u64>,
    /// The connection's value arena: a block's values (and `:authority`, `:path`) are copied
    /// to its end and split off as one `Bytes` when the block is done, which the request's
    /// `HeaderValue`s and URI slice. Allocated at the first block (none before), and a new
    /// one ([`ARENA`] bytes) only once the requests took the last one's room (or its own
    /// start again, when no request holds it any more): no allocation per block. A block
    /// that needs more room gets an arena of its own, dropped after the block ([`Self::end`])
    /// so that the connection keeps at most [`ARENA`] bytes of it. A live request keeps its
    /// arena's memory (at most [`ARENA`] bytes, or its own block's when that is longer).
    bytes: BytesMut,
    /// The arena outgrew [`ARENA`] during the block (seen before its values are split off).
    oversized: bool,
    /// Kept between blocks (cleared, not freed) up to [`FIELDS_KEPT`] entries: each field's
    /// name, its value's place in the arena, and whether it came never indexed.
    fields: Vec<(HeaderName, usize, usize, bool)>,
    /// Trailers: no pseudo-header allowed.
    trailers: bool,
}

impl BlockReader {
    pub fn new() -> Self {
        BlockReader {
            max_list_size: 0,
            size: 0,
            refused: None,
            regular_seen: false,
            method: None,
            scheme: None,
            authority: None,
            path: None,
            content_length: None,
            bytes: BytesMut::new(),
            oversized: false,
            fields: Vec::new(),
            trailers: false,
        }
    }

    /// Readies the reader for a new block (whatever a block left unfinished is dropped).
    pub fn start(&mut self, max_list_size: usize, block_len: usize, trailers: bool) {
        self.max_list_size = max_list_size;
        self.size = 0;
        self.refused = None;
        self.regular_seen = false;
        self.method = None;
        self.scheme = None;
        self.authority = None;
        self.path = None;
        self.content_length = None;
        self.trailers = trailers;
        self.fields.clear();
        self.bytes.clear();
        self.oversized = false;
        // Huffman-coded strings grow by about 8/5 when decoded; indexed fields more, but
        // they are rarely long (and the arena grows if need be). Past the list size nothing
        // is kept.
        let want = block_len.saturating_mul(2).min(max_list_size);
        if self.bytes.capacity() < want {
            if want <= ARENA {
                // A normal arena: the current one's start again when no request holds it
                // any more, else a new one.
                self.bytes.reserve(ARENA);
            } else {
                self.bytes = BytesMut::with_capacity(want);
            }
        }
    }

    /// After a block, whatever became of it: an arena that outgrew [`ARENA`] and a field list
    /// that outgrew [`FIELDS_KEPT`] are dropped (the next block starts a normal one), so that
    /// one large block does not stay the connection's memory for its life.
    pub fn end(&mut self) {
        self.fields.clear();
        if self.fields.capacity() > FIELDS_KEPT {
            self.fields = Vec::new();
        }
        if self.oversized || self.bytes.capacity() > ARENA {
            self.bytes = BytesMut::new();
        }
        self.oversized = false;
    }

    /// The block's values, split off the arena (its room stays for the next block).
    fn values(&mut self) -> Bytes {
        // From the block's start to the allocation's end: more than a normal arena only when
        // this block needed an arena of its own or grew one.
        self.oversized = self.bytes.capacity() > ARENA;
        self.bytes.split().freeze()
    }

    fn refuse(&mut self, why: Refused) {
        if self.refused.is_none() {
            self.refused = Some(why);
        }
    }

    fn keep(&mut self, value: &[u8]) -> (usize, usize) {
        let start = self.bytes.len();
        self.bytes.put_slice(value);
        (start, self.bytes.len())
    }

    /// One decoded field; `never_indexed` marks its value sensitive (as h2 does), so that
    /// it stays out of any compression table when forwarded over HTTP/2.
    pub fn field(&mut self, name: &[u8], value: &[u8], never_indexed: bool) {
        self.size += name.len() + value.len() + 32;
        // The field count is capped too: a `HeaderMap` panics past 24,576 entries, which
        // 1-byte indexed fields reach under a large SETTINGS_MAX_HEADER_LIST_SIZE.
        if self.size > self.max_list_size || self.fields.len() >= MAX_FIELDS {
            self.refuse(Refused::TooLarge);
        }
        if self.refused.is_some() {
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if self.regular_seen || self.trailers {
                return self.refuse(Refused::Malformed("pseudo-header after a regular field"));
            }
            match pseudo {
                b"method" if self.method.is_none() => match Method::from_bytes(value) {
                    Ok(m) => self.method = Some(m),
                    Err(_) => self.refuse(Refused::Malformed("invalid :method")),
                },
                b"scheme" if self.scheme.is_none() => match value {
                    b"http" => self.scheme = Some(Scheme::HTTP),
                    b"https" => self.scheme = Some(Scheme::HTTPS),
                    other => match Scheme::try_from(other) {
                        Ok(s) => self.scheme = Some(s),
                        Err(_) => self.refuse(Refused::Malformed("invalid :scheme")),
                    },
                },
                b"authority" if self.authority.is_none() => self.authority = Some(self.keep(value)),
                b"path" if self.path.is_none() => self.path = Some(self.keep(value)),
                b"method" | b"scheme" | b"authority" | b"path" => {
                    self.refuse(Refused::Malformed("a pseudo-header twice"))
                }
                _ => self.refuse(Refused::Malformed("unknown or response pseudo-header")),
            }
            return;
        }
        self.regular_seen = true;
        let Ok(name) = HeaderName::from_lowercase(name) else {
            return self.refuse(Refused::Malformed("invalid or uppercase field name"));
        };
        if connection_specific(&name) {
            return self.refuse(Refused::Malformed("connection-specific field"));
        }
        if name == http::header::TE && value != b"trailers" {
            return self.refuse(Refused::Malformed("te other than \"trailers\""));
        }
        if name == http::header::CONTENT_LENGTH && !self.trailers {
            let Some(n) = parse_length(value) else {
                return self.refuse(Refused::Malformed("invalid content-length"));
            };
            if self.content_length.is_some_and(|m| m != n) {
                return self.refuse(Refused::Malformed("two different content-lengths"));
            }
            self.content_length = Some(n);
        }
        let (a, b) = self.keep(value);
        self.fields.push((name, a, b, never_indexed));
    }

    fn finish_fields(&mut self, bytes: &Bytes, room: usize) -> Result<HeaderMap, Refused> {
        let mut headers = HeaderMap::with_capacity(self.fields.len() + room);
        for (name, a, b, never_indexed) in self.fields.drain(..) {
            // NUL, CR, LF and other controls but tab are refused here.
            let Ok(mut value) = HeaderValue::from_maybe_shared(bytes.slice(a..b)) else {
                return Err(Refused::Malformed("invalid field value"));
            };
            value.set_sensitive(never_indexed);
            headers.append(name, value);
        }
        Ok(headers)
    }

    /// The request head, once the whole block is decoded.
    pub fn finish_request(&mut self) -> Result<RequestHead, Refused> {
        let bytes = self.values();
        if let Some(why) = self.refused.take() {
            return Err(why);
        }
        let Some(method) = self.method.take() else {
            return Err(Refused::Malformed("no :method"));
        };
        let mut parts = http::uri::Parts::default();
        if let Some((a, b)) = self.authority {
            match Authority::from_maybe_shared(bytes.slice(a..b)) {
                Ok(authority) => parts.authority = Some(authority),
                Err(_) => return Err(Refused::Malformed("invalid :authority")),
            }
        }
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() || parts.authority.is_none() {
                return Err(Refused::Malformed("CONNECT takes :authority only"));
            }
        } else {
            let (Some(scheme), Some((a, b))) = (self.scheme.take(), self.path) else {
                return Err(Refused::Malformed("no :scheme or :path"));
            };
            if a == b {
                return Err(Refused::Malformed("empty :path"));
            }
            // As h2: the scheme goes into the URI only with an authority (absolute form).
            if parts.authority.is_some() {
                parts.scheme = Some(scheme);
            }
            match PathAndQuery::from_maybe_shared(bytes.slice(a..b)) {
                Ok(path) => parts.path_and_query = Some(path),
                Err(_) => return Err(Refused::Malformed("invalid :path")),
            }
        }
        let uri = Uri::from_parts(parts).map_err(|_| Refused::Malformed("invalid uri"))?;
        let headers = self.finish_fields(&bytes, ADDED_BY_PHASES)?;
        Ok(RequestHead {
            method,
            uri,
            headers,
            content_length: self.content_length,
        })
    }

    /// What the reader keeps between blocks: the value arena's capacity and the field list's.
    #[cfg(test)]
    pub fn held(&self) -> (usize, usize) {
        (self.bytes.capacity(), self.fields.capacity())
    }

    /// The trailers, once the whole block is decoded.
    pub fn finish_trailers(&mut self) -> Result<HeaderMap, Refused> {
        let bytes = self.values();
        if let Some(why) = self.refused.take() {
            return Err(why);
        }
        self.finish_fields(&bytes, 0)
    }
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

impl RequestHead {
    pub fn into_request<B>(self, body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = self.headers;
        req
    }
}

/// What hyper's HTTP/2 server adds to a response head that lacks it, added the same way.
#[derive(Clone, Copy, Default)]
pub(super) struct Added {
    /// A `date` of the current second, when the head has none.
    pub date: bool,
    /// A `content-length`, when the head has none: hyper's takes the body's exact size hint
    /// for a body that is not already at its end.
    pub content_length: Option<u64>,
}

impl Added {
    /// As hyper's server decides it (`proto/h2/server.rs`): `date` always, `content-length`
    /// from an exact size hint of a body not at its end (never on 204 or 304, whose head
    /// must not state a length the body does not have).
    pub fn for_response(
        status: StatusCode,
        headers: &HeaderMap,
        hint: hyper::body::SizeHint,
        end: bool,
    ) -> Self {
        Added {
            date: !headers.contains_key(http::header::DATE),
            content_length: hint.exact().filter(|_| {
                !end && status != StatusCode::NO_CONTENT
                    && status != StatusCode::NOT_MODIFIED
                    && !headers.contains_key(http::header::CONTENT_LENGTH)
            }),
        }
    }
}

/// Encodes a response head (`:status` and the fields but the connection-specific ones), and
/// what `added` says after them.
pub(super) fn encode_response(
    status: StatusCode,
    headers: &HeaderMap,
    added: Added,
    out: &mut BytesMut,
) {
    let indexed = match status.as_u16() {
        200 => Some(8),
        204 => Some(9),
        206 => Some(10),
        304 => Some(11),
        400 => Some(12),
        404 => Some(13),
        500 => Some(14),
        _ => None,
    };
    match indexed {
        Some(i) => out.put_u8(0x80 | i),
        None => {
            // Literal without indexing, name index 8 (`:status`), 3 digits.
            out.put_slice(&[0x08, 3]);
            out.put_slice(status.as_str().as_bytes());
        }
    }
    encode_fields(headers, out);
    if let Some(n) = added.content_length {
        // `content-length`: static name 28.
        put_int(out, 28, 4, 0);
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut v = n;
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        put_string(out, &digits[at..]);
    }
    if added.date {
        // `date`: static name 33.
        put_int(out, 33, 4, 0);
        put_string(out, &crate::proxy::fast_path::http_date());
    }
}

/// Encodes trailers (or any fields but the connection-specific ones).
pub(super) fn encode_fields(headers: &HeaderMap, out: &mut BytesMut) {
    for (name, value) in headers {
        if connection_specific(name) {
            continue;
        }
        let never = if value.is_sensitive() { 0x10 } else { 0 };
        match static_name_index(name.as_str()) {
            Some(i) => put_int(out, i, 4, never),
            None => {
                out.put_u8(never);
                put_string(out, name.as_str().as_bytes());
            }
        }
        put_string(out, value.as_bytes());
    }
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_int(out, s.len(), 7, 0);
    out.put_slice(s);
}

/// An HPACK integer (RFC 7541 §5.1) with a `prefix`-bit prefix after `first`'s high bits.
pub(super) fn put_int(out: &mut impl BufMut, mut value: usize, prefix: u8, first: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

/// The index of a name in HPACK's static table (RFC 7541 Appendix A), first entry of it.
fn static_name_index(name: &str) -> Option<usize> {
    Some(match name {
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        let mut d = loona_hpack::Decoder::new();
        let mut v = Vec::new();
        d.decode_with_cb(block, |n, val| {
            v.push((
                String::from_utf8(n.into_owned()).unwrap(),
                String::from_utf8(val.into_owned()).unwrap(),
            ))
        })
        .unwrap();
        v
    }

    #[test]
    fn response_heads_decode_as_sent_without_connection_fields() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-long", HeaderValue::from_str(&"a".repeat(300)).unwrap());
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        let mut secret = HeaderValue::from_static("s");
        secret.set_sensitive(true);
        h.insert("set-cookie", secret);
        for (status, want) in [(200, "200"), (418, "418"), (404, "404")] {
            let mut out = BytesMut::new();
            encode_response(
                StatusCode::from_u16(status).unwrap(),
                &h,
                Added::default(),
                &mut out,
            );
            let got = decode(&out);
            assert_eq!(got[0], (":status".into(), want.into()));
            let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, [":status", "content-type", "x-long", "set-cookie"]);
            assert_eq!(got[2].1.len(), 300);
        }
    }

    fn read(fields: &[(&str, &str)], max: usize) -> Result<RequestHead, Refused> {
        let mut r = BlockReader::new();
        r.start(max, 64, false);
        for (n, v) in fields {
            r.field(n.as_bytes(), v.as_bytes(), false);
        }
        r.finish_request()
    }

    const GET: [(&str, &str); 3] = [(":method", "GET"), (":scheme", "http"), (":path", "/a?b")];

    #[test]
    fn requests_are_built_as_h2_builds_them() {
        let r = read(&GET, 1000).unwrap();
        assert_eq!(r.uri, "/a?b");
        let mut f = GET.to_vec();
        f.push((":authority", "example.com:80"));
        f.push(("x-a", "1"));
        f.push(("x-a", "2"));
        f.push(("content-length", "5"));
        let r = read(&f, 1000).unwrap();
        assert_eq!(r.uri.to_string(), "http://example.com:80/a?b");
        assert_eq!(r.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(r.content_length, Some(5));
        assert!(r.headers.get("host").is_none());
        let r = read(&[(":method", "CONNECT"), (":authority", "a:443")], 1000).unwrap();
        assert_eq!(r.uri.to_string(), "a:443");
    }

    /// One reader per connection: consecutive blocks' values share one arena (the second
    /// block's values sit right after the first's, with no new buffer), a refused block leaves
    /// nothing behind, and the request's map has room for what the phases add.
    #[test]
    fn blocks_on_a_connection_share_one_value_arena() {
        let mut r = BlockReader::new();
        let block = |r: &mut BlockReader, path: &str| {
            r.start(1000, 16, false);
            for (n, v) in [(":method", "GET"), (":scheme", "http"), (":path", path)] {
                r.field(n.as_bytes(), v.as_bytes(), false);
            }
            r.field(b"x-a", b"1", false);
            r.finish_request()
        };
        let first = block(&mut r, "/first").unwrap();
        let arena = r.bytes.capacity();
        let refused = {
            r.start(1000, 16, false);
            r.field(b":bogus", b"x", false);
            r.finish_request()
        };
        assert!(refused.is_err());
        let second = block(&mut r, "/second").unwrap();
        let (a, b) = (first.uri.path(), second.uri.path());
        // The first block's values are "/first" then "1": the second's path follows them.
        assert_eq!(b.as_ptr(), a.as_ptr().wrapping_add(a.len() + 1));
        assert_eq!(r.bytes.capacity(), arena - "/second1".len());
        assert_eq!(second.headers["x-a"], "1");
        assert!(second.headers.capacity() > ADDED_BY_PHASES);
    }

    /// No arena before the first block; a block longer than a normal arena gets one of its
    /// own, which goes after the block (the request keeps its values), as does the room of a
    /// field list grown past [`FIELDS_KEPT`]; the next ordinary block gets a normal arena.
    #[test]
    fn a_large_block_leaves_no_large_arena_behind() {
        let mut r = BlockReader::new();
        assert_eq!(r.bytes.capacity(), 0, "an arena before any block");
        let big = "v".repeat(512 * 1024);
        r.start(1 << 20, big.len() + 4096, false);
        for (n, v) in GET {
            r.field(n.as_bytes(), v.as_bytes(), false);
        }
        for i in 0..2 * FIELDS_KEPT {
            let name = format!("x-{i}");
            r.field(name.as_bytes(), b"1", false);
        }
        r.field(b"x-big", big.as_bytes(), false);
        let head = r.finish_request().unwrap();
        r.end();
        assert_eq!(r.bytes.capacity(), 0, "the large arena is kept");
        assert!(
            r.fields.capacity() <= FIELDS_KEPT,
            "{}",
            r.fields.capacity()
        );
        assert_eq!(head.headers["x-big"].len(), big.len());
        r.start(1000, 16, false);
        for (n, v) in GET {
            r.field(n.as_bytes(), v.as_bytes(), false);
        }
        let _head = r.finish_request().unwrap();
        r.end();
        assert!((1..=ARENA).contains(&r.bytes.capacity()));
    }

    /// A block of many tiny indexed fields under a large SETTINGS_MAX_HEADER_LIST_SIZE (each
    /// 1-byte `accept: ""` counts 38 bytes, so 1 MiB lets ~27,500 through) is refused as too
    /// large rather than panicking in `HeaderMap` (whose limit is 24,576 entries), for a
    /// request and for trailers; a block just under the cap still leaves the phases room.
    #[test]
    fn many_tiny_fields_are_refused_not_a_panic() {
        let mut d = super::super::hpack_decode::Decoder::new(4096);
        let mut r = BlockReader::new();
        let mut block = vec![0x82, 0x86, 0x84]; // :method GET, :scheme http, :path /
        block.extend(std::iter::repeat_n(0x80 | 19, 25_000)); // accept: "", 950,000 bytes
        for trailers in [false, true] {
            let block = if trailers { &block[3..] } else { &block[..] };
            r.start(1 << 20, block.len(), trailers);
            d.decode_with_cb(block, |n, v, s| r.field(n, v, s)).unwrap();
            let got = if trailers {
                r.finish_trailers().map(|_| ())
            } else {
                r.finish_request().map(|_| ())
            };
            assert_eq!(got, Err(Refused::TooLarge), "trailers: {trailers}");
        }
        let block = &block[..3 + MAX_FIELDS];
        r.start(1 << 20, block.len(), false);
        d.decode_with_cb(block, |n, v, s| r.field(n, v, s)).unwrap();
        let mut head = r.finish_request().unwrap();
        assert_eq!(head.headers.len(), MAX_FIELDS);
        for i in 0..2 * ADDED_BY_PHASES {
            let name = HeaderName::try_from(format!("x-phase-{i}")).unwrap();
            head.headers.insert(name, HeaderValue::from_static("1"));
        }
    }

    /// The encoder's static name indexes are the decoder's static table's (first entry of
    /// each name).
    #[test]
    fn static_name_indexes_match_the_decoders_table() {
        use super::super::hpack_decode::STATIC_TABLE;
        for (i, (name, _)) in STATIC_TABLE.iter().enumerate().skip(14) {
            let first = STATIC_TABLE.iter().position(|(n, _)| n == name).unwrap() + 1;
            assert_eq!(static_name_index(name), Some(first), "{name}");
            assert_eq!(first, i + 1, "{name}");
        }
        assert_eq!(static_name_index(":path"), None);
    }

    /// A field sent never indexed (RFC 7541 §6.2.3) becomes a sensitive value, as h2 makes
    /// it, so that our encoder (and h2's, upstream) send it never indexed in turn.
    #[test]
    fn never_indexed_fields_become_sensitive_values() {
        let mut d = super::super::hpack_decode::Decoder::new(4096);
        let mut r = BlockReader::new();
        // GET http / ; `authorization: s` never indexed (name 23); `x-a: 1` without indexing.
        let block = [
            0x82, 0x86, 0x84, 0x1f, 0x08, 0x01, b's', 0x00, 0x03, b'x', b'-', b'a', 0x01, b'1',
        ];
        r.start(1000, block.len(), false);
        d.decode_with_cb(&block, |n, v, s| r.field(n, v, s))
            .unwrap();
        let head = r.finish_request().unwrap();
        assert!(head.headers["authorization"].is_sensitive());
        assert!(!head.headers["x-a"].is_sensitive());
        let mut out = BytesMut::new();
        encode_fields(&head.headers, &mut out);
        assert_eq!(out[0], 0x1f, "not sent never indexed: {:02x?}", &out[..]);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let cases: &[&[(&str, &str)]] = &[
            &[(":method", "GET"), (":scheme", "http")],
            &[(":method", "GET"), (":path", "/")],
            &[(":scheme", "http"), (":path", "/")],
            &[(":method", "GET"), (":scheme", "http"), (":path", "")],
            &[
                (":method", "GET"),
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":status", "200"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":foo", "x"),
            ],
            &[
                (":method", "GET"),
                ("x", "y"),
                (":scheme", "http"),
                (":path", "/"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("X-Up", "y"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("connection", "x"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("upgrade", "x"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("keep-alive", "x"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("transfer-encoding", "x"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("proxy-connection", "x"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("te", "gzip"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("a", "b\nc"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("a", "b\0"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("a", "b\rc"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("content-length", "x"),
            ],
            &[
                (":method", "CONNECT"),
                (":authority", "a:1"),
                (":path", "/"),
            ],
            &[(":method", "CONNECT")],
        ];
        for (i, case) in cases.iter().enumerate() {
            assert!(
                matches!(read(case, 1000), Err(Refused::Malformed(_))),
                "case {i}: {case:?}"
            );
        }
        let mut f = GET.to_vec();
        f.push(("te", "trailers"));
        assert!(read(&f, 1000).is_ok());
        let big = "v".repeat(100);
        f.push(("x", &big));
        assert_eq!(read(&f, 150).err(), Some(Refused::TooLarge));
    }
}
