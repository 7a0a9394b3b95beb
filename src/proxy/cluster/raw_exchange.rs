//! An HTTP/1.1 exchange on one of the endpoint's raw connections (the fast path's, see
//! [`crate::proxy::fast_path`]) for a request hyper's server decoded: every HTTP/2 request to an
//! HTTP/1.1 cluster, and the HTTP/1 requests the fast path leaves to hyper (bodies, retries,
//! header edits…).
//!
//! Why: hyper's HTTP/1 client (a connection task, a dispatch channel per request, a fresh
//! 8 KiB read buffer per read while the response body still holds the last one) made h2c
//! 0.63–0.72× HAProxy and left glibc with ~15 MiB of fragmented pages after an h2c load
//! (docs/BENCHMARKS.md). Here the request's task writes the head from the prepared
//! `http::Request` (method, origin-form target, its header map, which the forward phase has
//! already stripped of hop-by-hop headers) and the body in one vectored write, reads the
//! response head with `httparse` into the connection's own buffer, and the response body
//! reads on from that same buffer: each frame is a copy of exactly its bytes, and the
//! connection goes back to the pool when the body's end has passed.
//!
//! What it takes (anything else goes to hyper's client as before, [`super::pool::Pool::send`]):
//! no `Upgrade`, no `Transfer-Encoding`, a body that is empty or of a known length up to
//! [`REPLAY_LIMIT`] (the forward phase has read such bodies already; longer and open-ended
//! ones stream through hyper), a `Content-Length` that agrees with it. The response side
//! refuses what the fast path refuses ([`crate::proxy::fast_path::response_framing`]:
//! invalid or conflicting Content-Length, Content-Length with Transfer-Encoding, a 101, a
//! status below 100, a head over 400 KiB), skips 1xx, and decodes a chunked body as strictly
//! as hyper's decoder, trailers included. Unlike hyper's client it reads more than 100
//! response headers (up to 1,024, as the fast path). A pooled connection the upstream closed
//! while idle gets the request again on another (an idempotent or bodiless request whose
//! write failed; an idempotent one that got no response byte).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::pool::{Pool, Raw, SendError};
use crate::proxy::body::{BoxError, ProxyBody, REPLAY_LIMIT};
use crate::proxy::fast_path::{
    Chunked, Framing, MANY_HEADERS, MAX_RESPONSE_HEAD, RESPONSE_HEADERS, ResponseFraming, Step,
    fmt_u64, itoa_buf, response_framing, write_all,
};

/// Whether this path takes `req`: the body's length when it does.
pub(super) fn takes(req: &Request<ProxyBody>) -> Option<u64> {
    let h = req.headers();
    // The forward phase copies the client's version (forward.rs): an HTTP/1.0 request goes to
    // hyper's client, which sends it as HTTP/1.0. No Transfer-Encoding check: the forward
    // phase has stripped it with the other hop-by-hop headers, and a body of unknown length
    // is refused below by its size hint.
    if req.method() == Method::CONNECT
        || req.version() == Version::HTTP_10
        || h.contains_key(header::UPGRADE)
    {
        return None;
    }
    let body = req.body();
    let len = if body.is_end_stream() {
        0
    } else {
        body.size_hint()
            .exact()
            .filter(|n| *n <= REPLAY_LIMIT as u64)?
    };
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (None, _) => Some(len),
        (Some(v), None) if is_length(v.as_bytes(), len) => Some(len),
        _ => None,
    }
}

/// Whether a Content-Length value says `len` (digits only).
fn is_length(v: &[u8], len: u64) -> bool {
    let mut n = itoa_buf();
    v == fmt_u64(&mut n, len)
}

/// Sends `req` (origin form, a body of `len` bytes, see [`takes`]) on a raw connection.
pub(super) async fn send(
    pool: &Arc<Pool>,
    req: Request<ProxyBody>,
    len: u64,
) -> Result<Response<ProxyBody>, SendError> {
    let (parts, mut body) = req.into_parts();
    // The body, read whole (the forward phase already holds it: one frame, no copy).
    let mut data = Bytes::new();
    if len > 0 {
        let mut more = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| SendError {
                connect: false,
                downstream: true,
                error,
            })?;
            if let Ok(d) = frame.into_data() {
                if data.is_empty() && more.is_empty() {
                    data = d;
                } else {
                    if more.is_empty() {
                        more.extend_from_slice(&data);
                    }
                    more.extend_from_slice(&d);
                }
            }
        }
        if !more.is_empty() {
            data = more.freeze();
        }
        if data.len() as u64 != len {
            return Err(SendError {
                connect: false,
                downstream: true,
                error: "the request body's length is not its Content-Length".into(),
            });
        }
    }
    let head_request = parts.method == Method::HEAD;
    let idempotent = crate::proxy::forward::is_idempotent(&parts.method);
    let broke = |why: BoxError| SendError {
        connect: false,
        downstream: false,
        error: why,
    };
    loop {
        let (mut conn, pooled) = match pool.take_raw() {
            Some(c) => (c, true),
            None => match pool.connect_raw().await {
                Ok(c) => (c, false),
                Err(e) => {
                    return Err(SendError {
                        connect: true,
                        downstream: false,
                        error: e.into(),
                    });
                }
            },
        };
        let mut out = std::mem::take(&mut conn.out);
        write_head(&mut out, &parts, len);
        let sent = async {
            write_all(&mut conn.io, &mut [IoSlice::new(&out), IoSlice::new(&data)]).await?;
            conn.io.flush().await
        }
        .await;
        out.clear();
        conn.out = out;
        if let Err(e) = sent {
            // Closed while idle: sent again on another connection, unless part of a body
            // may have been taken by a request that is not safe to repeat.
            if pooled && (idempotent || len == 0) {
                continue;
            }
            return Err(broke(e.into()));
        }
        match read_head(&mut conn, head_request, pooled && idempotent).await {
            Ok(Some((res, framing, reusable, len, mut end))) => {
                // A body of known length of which nothing came with the head: its first
                // bytes are awaited here (within the route's timeout, like the head), so that
                // an upstream that breaks off gets the client a 502, not a head and a cut body.
                if matches!(framing, Framing::Length(n) if n > 0) && end == len {
                    if end == conn.buf.len() {
                        conn.buf.resize(end + 8 * 1024, 0);
                    }
                    match conn.io.read(&mut conn.buf[end..]).await {
                        Ok(n) if n > 0 => end += n,
                        Ok(_) => {
                            return Err(broke(
                                "the connection closed before the response body".into(),
                            ));
                        }
                        Err(e) => return Err(broke(e.into())),
                    }
                }
                return Ok(respond(pool, conn, res, framing, reusable, len, end));
            }
            Ok(None) => continue, // closed while idle: on a new connection
            Err(why) => return Err(broke(why.into())),
        }
    }
}

/// The request head, from the prepared request.
fn write_head(out: &mut Vec<u8>, parts: &http::request::Parts, len: u64) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in &parts.headers {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // hyper's client says the length of a body it knows, when the request did not.
    if len > 0 && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: ");
        let mut n = itoa_buf();
        out.extend_from_slice(fmt_u64(&mut n, len));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head read: the response (empty body yet), how its body ends, whether the
/// connection can take another request after it, the head's length and the end of the bytes
/// read. `Ok(None)`: a pooled connection closed before any byte and the request may go again.
type ReadHead = (Response<()>, Framing, bool, usize, usize);

async fn read_head(
    conn: &mut Raw,
    head_request: bool,
    may_resend: bool,
) -> Result<Option<ReadHead>, String> {
    let mut end = 0;
    let mut answered = false;
    loop {
        if end == conn.buf.len() {
            if end >= MAX_RESPONSE_HEAD {
                return Err("the response head is too large".into());
            }
            conn.buf.resize((end * 2).min(MAX_RESPONSE_HEAD), 0);
        }
        let n = match conn.io.read(&mut conn.buf[end..]).await {
            Ok(0) | Err(_) if !answered && may_resend => return Ok(None),
            Ok(0) => return Err("the connection closed before a response".into()),
            Err(e) => return Err(e.to_string()),
            Ok(n) => n,
        };
        answered = true;
        end += n;
        loop {
            match parse_head(&conn.buf[..end], head_request)? {
                Parsed::Partial => break,
                Parsed::Informational(len) => {
                    conn.buf.copy_within(len..end, 0);
                    end -= len;
                }
                Parsed::Final(res, framing, reusable, len) => {
                    return Ok(Some((res, framing, reusable, len, end)));
                }
            }
        }
    }
}

enum Parsed {
    Partial,
    /// A 1xx of this length, skipped.
    Informational(usize),
    Final(Response<()>, Framing, bool, usize),
}

fn parse_head(bytes: &[u8], head_request: bool) -> Result<Parsed, String> {
    let mut stack = [httparse::EMPTY_HEADER; RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut stack);
    let mut heap;
    let parsed = match res.parse(bytes) {
        Err(httparse::Error::TooManyHeaders) => {
            heap = vec![httparse::EMPTY_HEADER; MANY_HEADERS];
            res = httparse::Response::new(&mut heap);
            res.parse(bytes)
        }
        other => other,
    };
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let status = res.code.ok_or("invalid response head")?;
    let Some(ResponseFraming {
        framing,
        upstream_close,
        ..
    }) = response_framing(status, res.version, &*res.headers, head_request)?
    else {
        return Ok(Parsed::Informational(len));
    };
    let status = StatusCode::from_u16(status).map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|e| e.to_string())?;
        headers.append(name, value);
    }
    let mut out = Response::new(());
    *out.status_mut() = status;
    *out.version_mut() = if res.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *out.headers_mut() = headers;
    // A reason other than the usual one goes on, as hyper's client keeps it.
    if let Some(r) = res.reason
        && !r.is_empty()
        && status.canonical_reason() != Some(r)
        && let Ok(r) = hyper::ext::ReasonPhrase::try_from(Bytes::copy_from_slice(r.as_bytes()))
    {
        out.extensions_mut().insert(r);
    }
    let reusable = !upstream_close && framing != Framing::Close;
    Ok(Parsed::Final(out, framing, reusable, len))
}

fn respond(
    pool: &Arc<Pool>,
    conn: Raw,
    res: Response<()>,
    framing: Framing,
    reusable: bool,
    head_len: usize,
    end: usize,
) -> Response<ProxyBody> {
    let kind = match framing {
        Framing::Empty | Framing::Length(0) => Kind::Length(0),
        Framing::Length(n) => Kind::Length(n),
        Framing::Chunked => Kind::Chunked(Chunked::default()),
        Framing::Close => Kind::Close,
    };
    let mut body = RawBody {
        conn: Some(conn),
        pool: pool.clone(),
        start: head_len,
        end,
        kind,
        reusable,
    };
    if matches!(body.kind, Kind::Length(0)) {
        body.finish();
    }
    res.map(|()| body.boxed())
}

enum Kind {
    /// Bytes left.
    Length(u64),
    Chunked(Chunked),
    /// Up to the upstream's close.
    Close,
}

/// A response body read from the raw connection; the connection goes back to the pool when
/// the body's end has passed and nothing more was read, and closes when the body is dropped
/// before its end.
struct RawBody {
    /// None once the body has ended.
    conn: Option<Raw>,
    pool: Arc<Pool>,
    /// Unread bytes: `conn.buf[start..end]`.
    start: usize,
    end: usize,
    kind: Kind,
    reusable: bool,
}

impl RawBody {
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && self.start == self.end
        {
            self.pool.put_raw(conn);
        }
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if this.start < this.end {
                let bytes = &conn.buf[this.start..this.end];
                match &mut this.kind {
                    Kind::Length(left) => {
                        let n = (*left).min(bytes.len() as u64) as usize;
                        let data = Bytes::copy_from_slice(&bytes[..n]);
                        this.start += n;
                        *left -= n as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Kind::Close => {
                        let data = Bytes::copy_from_slice(bytes);
                        this.start = this.end;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Kind::Chunked(chunks) => match chunks.decode(bytes) {
                        Err(()) => return this.fail("invalid chunked response body"),
                        Ok(Step::Data(s, e)) => {
                            let data = Bytes::copy_from_slice(&bytes[s..e]);
                            this.start += e;
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(Step::Done(n)) => {
                            this.start += n;
                            let trailers = std::mem::take(&mut chunks.trailers);
                            this.finish();
                            if trailers.is_empty() {
                                return Poll::Ready(None);
                            }
                            return match trailer_map(&trailers) {
                                Some(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                                None => this.fail("invalid trailer fields"),
                            };
                        }
                        Ok(Step::More) => this.start = this.end,
                    },
                }
                continue;
            }
            (this.start, this.end) = (0, 0);
            let mut buf = ReadBuf::new(&mut conn.buf);
            if ready!(Pin::new(&mut conn.io).poll_read(cx, &mut buf)).is_err() {
                return this.fail("the upstream connection broke during the response body");
            }
            let n = buf.filled().len();
            if n == 0 {
                if matches!(this.kind, Kind::Close) {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                return this.fail("the upstream closed the connection before the body's end");
            }
            this.end = n;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.kind, &self.conn) {
            (_, None) => SizeHint::with_exact(0),
            (Kind::Length(n), _) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

/// A chunked body's trailer lines as a header map (None when one is malformed).
fn trailer_map(lines: &[u8]) -> Option<HeaderMap> {
    let mut section = Vec::with_capacity(lines.len() + 2);
    section.extend_from_slice(lines);
    section.extend_from_slice(b"\r\n");
    // As many trailer fields as a response head may have header fields ([`MANY_HEADERS`]; the
    // section is at most 64 KiB): the stack's slots first, the heap's for a longer section.
    let mut stack = [httparse::EMPTY_HEADER; 64];
    let mut heap;
    let parsed = match httparse::parse_headers(&section, &mut stack) {
        Err(httparse::Error::TooManyHeaders) => {
            heap = vec![httparse::EMPTY_HEADER; MANY_HEADERS];
            httparse::parse_headers(&section, &mut heap)
        }
        other => other,
    };
    let (_, parsed) = match parsed {
        Ok(httparse::Status::Complete(r)) => r,
        _ => return None,
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        map.append(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_read_as_hyper_read_them() {
        let raw = b"HTTP/1.1 200 Fine\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello";
        let Parsed::Final(res, framing, reusable, len) = parse_head(raw, false).unwrap() else {
            panic!("a final head")
        };
        assert_eq!(res.status(), 200);
        assert_eq!(framing, Framing::Length(5));
        assert!(reusable);
        assert_eq!(len, raw.len() - 5);
        assert_eq!(res.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(
            res.extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes()),
            Some(&b"Fine"[..])
        );
        assert!(matches!(
            parse_head(b"HTTP/1.1 100 Continue\r\n\r\n", false),
            Ok(Parsed::Informational(25))
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false),
            Ok(Parsed::Partial)
        ));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(parse_head(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_trailers_become_a_frame() {
        let mut c = Chunked::default();
        let body = b"3\r\nabc\r\n0\r\nx-sum: 1\r\nx-n: 2\r\n\r\n";
        assert_eq!(c.decode(body), Ok(Step::Data(3, 6)));
        assert_eq!(c.decode(&body[6..]), Ok(Step::Done(body.len() - 6)));
        let map = trailer_map(&c.trailers).unwrap();
        assert_eq!(map["x-sum"], "1");
        assert_eq!(map["x-n"], "2");
        let mut c = Chunked::default();
        assert_eq!(c.decode(b"0\r\n\r\n"), Ok(Step::Done(5)));
        assert!(c.trailers.is_empty());
        // More fields than the stack's 64 slots: the heap's.
        let many: String = (0..300).map(|i| format!("x-t{i}: {i}\r\n")).collect();
        let map = trailer_map(many.as_bytes()).unwrap();
        assert_eq!(map.len(), 300);
        assert_eq!(map["x-t299"], "299");
    }
}
