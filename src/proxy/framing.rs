//! Watches the raw bytes of an HTTP/1 connection for a request head that carries both
//! Content-Length and Transfer-Encoding, so that the proxy can refuse it with 400.
//!
//! hyper resolves that ambiguity itself, as RFC 9112 §6.3 allows (chunked wins, Content-Length
//! is dropped, the connection closes after the response), and then the request no longer shows
//! it. We refuse such requests instead: a peer that sends both is probing for a parser that
//! reads them differently. The scanner sees the bytes before hyper parses them, follows message
//! framing (heads, Content-Length bodies, chunked bodies) to find each head, and raises a flag
//! the request handler checks. Written by hand because no crate exposes this; it is a follower,
//! not a parser: on anything it does not understand it stops and leaves the verdict to hyper.
//!
//! The check-framing phase lives here too: [`check_framing`] states the rules for one parsed
//! request head, and `HttpListener::check_framing` applies them with the scanner's verdict.
//! In: the request head (and the connection's [`Alarm`]). Out: nothing, or a 400 that closes
//! the connection, before anything is forwarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};

use super::body::ProxyBody;
use super::failure::{Failure, with_close};
use super::http::{Downstream, HttpListener};

/// Heads longer than this are hyper's to refuse (431); the scanner stops following.
const MAX_HEAD: usize = 1 << 20;
/// Headers per head the scanner looks at (hyper's own limit is 100).
const MAX_HEADERS: usize = 128;

/// Set once a head with both Content-Length and Transfer-Encoding went by.
#[derive(Clone, Default)]
pub struct Alarm(Arc<AtomicBool>);

impl Alarm {
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    fn raise(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

enum State {
    /// Collecting a request head.
    Head,
    /// Skipping a Content-Length body.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until the empty one.
    Trailers,
    /// Not following any more (HTTP/2, an upgrade, something odd): hyper decides.
    Done,
}

pub struct Scanner {
    state: State,
    /// The current head or line so far.
    buf: Vec<u8>,
    alarm: Alarm,
    first: bool,
}

impl Scanner {
    pub fn new(alarm: Alarm) -> Self {
        Scanner {
            state: State::Head,
            buf: Vec::new(),
            alarm,
            first: true,
        }
    }

    /// Follows `data`, the next bytes received on the connection.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.first && !data.is_empty() {
            self.first = false;
            if data.starts_with(b"PRI ") {
                self.state = State::Done; // the HTTP/2 preface
            }
        }
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::ChunkSize;
                    }
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let Some(rest) = self.take_until_end(&mut data) else {
                        return;
                    };
                    data = rest;
                }
            }
        }
    }

    /// Takes bytes up to the end of the current head or line; when it is complete, acts on it
    /// and returns the remaining input. A unit that arrives whole in one read (the common
    /// case) is looked at where it lies; only one split across reads is collected in `buf`.
    fn take_until_end<'a>(&mut self, data: &mut &'a [u8]) -> Option<&'a [u8]> {
        let head = matches!(self.state, State::Head);
        let end: &[u8] = if head { b"\r\n\r\n" } else { b"\r\n" };
        if self.buf.is_empty() {
            let Some(i) = memchr::memmem::find(data, end) else {
                self.buf.extend_from_slice(data);
                self.check_size();
                *data = &[];
                return None;
            };
            let (unit, rest) = data.split_at(i + end.len());
            self.state = self.after_unit(unit);
            return Some(rest);
        }
        let start = self.buf.len().saturating_sub(end.len() - 1);
        self.buf.extend_from_slice(data);
        let found = memchr::memmem::find(&self.buf[start..], end).map(|i| start + i + end.len());
        let Some(stop) = found else {
            self.check_size();
            *data = &[];
            return None;
        };
        // Bytes of `data` beyond the end belong to what follows.
        let consumed_from_data = stop - (self.buf.len() - data.len());
        let rest = &data[consumed_from_data..];
        // Reuse the buffer's allocation for the next head.
        let mut owned = std::mem::take(&mut self.buf);
        owned.truncate(stop);
        let next = self.after_unit(&owned);
        owned.clear();
        self.buf = owned;
        self.state = next;
        Some(rest)
    }

    /// Past [`MAX_HEAD`] the scanner stops following (hyper refuses such heads).
    fn check_size(&mut self) {
        if self.buf.len() > MAX_HEAD {
            self.state = State::Done;
            self.buf = Vec::new();
        }
    }

    /// The state after a complete head or line `unit` (its CRLFs included).
    fn after_unit(&self, unit: &[u8]) -> State {
        match self.state {
            State::Head if unit == b"\r\n" || unit == b"\r\n\r\n" => State::Head, // stray CRLF between messages
            State::Head => self.after_head(unit),
            State::ChunkSize => {
                let line = &unit[..unit.len() - 2];
                let hex = line.split(|b| *b == b';').next().unwrap_or_default();
                match std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                {
                    Some(0) => State::Trailers,
                    // The chunk's data, then its CRLF.
                    Some(n) => State::ChunkData(n.saturating_add(2)),
                    None => State::Done,
                }
            }
            State::Trailers if unit == b"\r\n" => State::Head,
            State::Trailers => State::Trailers,
            _ => State::Done,
        }
    }

    fn after_head(&self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            return State::Done;
        }
        let mut length = None;
        let (mut cl, mut te, mut upgrade) = (false, false, false);
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl = true;
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if cl && te {
            self.alarm.raise();
            // hyper closes the connection after this request.
            return State::Done;
        }
        if upgrade || req.method == Some("CONNECT") {
            // After a 101 the bytes are no longer HTTP.
            return State::Done;
        }
        match (te, length) {
            (true, _) => State::ChunkSize,
            (false, Some(0)) | (false, None) if !cl => State::Head,
            (false, Some(n)) => State::Body(n),
            (false, None) => State::Done, // an invalid Content-Length: hyper refuses it
        }
    }
}

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, moved once to the handler; boxing it would allocate per refusal"
)]
impl HttpListener {
    /// Phase: refuse ambiguous HTTP/1 framing (400, and the connection closes) before anything
    /// is forwarded.
    pub(super) fn check_framing<B>(
        &self,
        down: &Downstream,
        req: &Request<B>,
        started: Instant,
    ) -> Result<(), Response<ProxyBody>> {
        let framing = if down.framing_alarm.raised()
            && req.headers().contains_key(header::TRANSFER_ENCODING)
        {
            // hyper has already dropped the Content-Length; the scanner saw it.
            Err("both Content-Length and Transfer-Encoding")
        } else {
            check_framing(req)
        };
        if let Err(why) = framing {
            tracing::warn!(listener = %self.name, peer = ?down.peer, error = why, "refused ambiguous request framing");
            return Err(with_close(self.refuse(Failure::BadRequest, why, started)));
        }
        Ok(())
    }
}

/// HTTP/1 framing that two parsers could read differently is refused. hyper already
/// refuses obs-fold, whitespace before the colon, bad chunk sizes and differing duplicate
/// Content-Length values; these checks make the rules ours, whatever the parser does.
pub fn check_framing<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.version() >= Version::HTTP_2 {
        // h2 frames carry lengths; the h2 crate refuses connection-specific headers.
        return Ok(());
    }
    let h = req.headers();
    let te = h.get_all(header::TRANSFER_ENCODING);
    let has_te = te.iter().next().is_some();
    let mut cl = h.get_all(header::CONTENT_LENGTH).iter();
    // hyper drops Content-Length when Transfer-Encoding is present, so for parsed requests
    // the framing scanner (`Downstream::framing_alarm`) is what catches this; the rule stays
    // here as the statement of it, for any parser that keeps both.
    if has_te && h.contains_key(header::CONTENT_LENGTH) {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if let Some(first) = cl.next() {
        let valid = |v: &HeaderValue| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit);
        if !valid(first) || cl.any(|v| v != first || !valid(v)) {
            return Err("invalid or conflicting Content-Length");
        }
    }
    if has_te {
        // hyper refuses HTTP/1.0 with Transfer-Encoding and a final coding other than chunked;
        // we go further and accept chunked alone: stripping Transfer-Encoding (hop-by-hop)
        // from `gzip, chunked` would hand the upstream a body it cannot decode.
        let mut codings = te.iter().flat_map(|v| v.to_str().unwrap_or("?").split(','));
        let only_chunked = codings
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
            && codings.next().is_none();
        if req.version() == Version::HTTP_10 || !only_chunked {
            return Err("Transfer-Encoding must be exactly chunked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> bool {
        let alarm = Alarm::default();
        let mut s = Scanner::new(alarm.clone());
        for c in chunks {
            s.feed(c);
        }
        alarm.raised()
    }

    #[test]
    fn finds_both_headers_in_any_request_of_a_connection() {
        assert!(scan(&[b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]));
        // Behind a Content-Length body and a chunked body with trailers, split at odd places.
        let stream: &[u8] = b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcdPOST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\n\r\n\n\r\n0\r\nX-T: 1\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        for split in 1..stream.len() {
            let (a, b) = stream.split_at(split);
            assert!(scan(&[a, b]), "split at {split}");
        }
    }

    #[test]
    fn body_bytes_are_not_mistaken_for_heads() {
        // The bodies contain text that looks like a smuggled head.
        let evil: &[u8] =
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            evil.len()
        )
        .into_bytes();
        stream.extend_from_slice(evil);
        stream.extend_from_slice(
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                evil.len()
            )
            .as_bytes(),
        );
        stream.extend_from_slice(evil);
        stream.extend_from_slice(b"\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(!scan(&[&stream]));
    }

    #[test]
    fn stops_following_http2_and_upgrades() {
        assert!(!scan(&[
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]));
    }

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().uri("/").version(version);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn framing_rules() {
        let ok = |h: &[(&str, &str)]| check_framing(&req(Version::HTTP_11, h)).is_ok();
        assert!(ok(&[("content-length", "5")]));
        assert!(ok(&[("transfer-encoding", "chunked")]));
        assert!(ok(&[("content-length", "5"), ("content-length", "5")]));
        assert!(!ok(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked")
        ]));
        assert!(!ok(&[("content-length", "5"), ("content-length", "6")]));
        assert!(!ok(&[("content-length", "+5")]));
        assert!(!ok(&[("transfer-encoding", "chunked, identity")]));
        assert!(!ok(&[("transfer-encoding", "xchunked")]));
        assert!(!ok(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked")
        ]));
        assert!(
            check_framing(&req(Version::HTTP_10, &[("transfer-encoding", "chunked")])).is_err()
        );
    }

    #[test]
    fn framing_rules_are_for_http1_only() {
        let both = [("content-length", "5"), ("transfer-encoding", "chunked")];
        assert!(check_framing(&req(Version::HTTP_2, &both)).is_ok());
        assert!(check_framing(&req(Version::HTTP_11, &[("content-length", "")])).is_err());
        assert!(
            check_framing(&req(
                Version::HTTP_11,
                &[("transfer-encoding", " Chunked ")]
            ))
            .is_ok()
        );
        assert!(check_framing(&req(Version::HTTP_10, &[("content-length", "5")])).is_ok());
        assert!(check_framing(&req(Version::HTTP_11, &[])).is_ok());
    }
}
