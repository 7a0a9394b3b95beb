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
//! response head with `httparse` into the connection's own buffer
//! ([`crate::proxy::upstream_head`]; the header values are slices of one copy of the head, and
//! so is the body's first frame when the body's first bytes, or a chunked body's first chunk,
//! came with the head and fit in that copy), and the response body reads on from that same
//! buffer: each frame is a copy of exactly its bytes, and the connection goes back to the pool
//! when the body's end has passed. The response's hop-by-hop fields that the respond phase
//! would only remove are not put in its header map ([`skipped`]).
//!
//! Early answers: the head is read while the request is still being written, in the same
//! task (one future polls both), since an upstream may answer before it has read the body
//! (a 413 and a close, a 401 without reading on) and then stop reading; the client gets that
//! answer, not a 502 for the write that could not finish. The rest of the request is written
//! on while the response body is read (an upstream may stream its answer to the body, as
//! hyper's client allows), unless the upstream closes after this response (RFC 9112 §9.6:
//! stop sending); a write that fails then is not an error of the response. A connection
//! whose request was not written whole when the final response head came never goes back to
//! the pool, even if the rest is written while the response body is read: an upstream that
//! answered the head alone (a 401 and keep-alive) may take the body's bytes for its next
//! request, and the next client would get the answer to them. When every byte was written
//! before the head came, that cannot be told apart from an answer to the whole request: the
//! connection is pooled (as hyper's client does).
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
//! while idle, before any response byte, gets the request again on another (an idempotent
//! request; a bodiless one whose write failed).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{Pool, Raw, SendError};
use crate::proxy::body::{BoxError, ProxyBody, REPLAY_LIMIT};
use crate::proxy::fast_path::{
    self, Chunked, Framing, ResponseFraming, Step, fmt_u64, itoa_buf, response_framing,
};
use crate::proxy::small_bytes::{self, copy_small};
use crate::proxy::upstream_head::{self, HeadRead, Parsed, Unanswered};

/// Whether this path takes `req`: the body's length when it does.
pub(super) fn takes(req: &Request<ProxyBody>) -> Option<u64> {
    let h = req.headers();
    // The forward phase copies the client's version (forward.rs): an HTTP/1.0 request goes to
    // hyper's client, which sends it as HTTP/1.0. No Transfer-Encoding check: the forward
    // phase has stripped it with the other hop-by-hop headers, and a body of unknown length
    // is refused below by its size hint.
    if req.method() == Method::CONNECT || req.version() == Version::HTTP_10 {
        return None;
    }
    // One pass over the names for both fields, which a request rarely has (two lookups hash
    // their names every time: ~170 instructions per h2c request, docs/BENCHMARKS.md "h2c
    // shared path, second round").
    let (mut upgrade, mut length) = (false, false);
    for k in h.keys() {
        upgrade |= *k == header::UPGRADE;
        length |= *k == header::CONTENT_LENGTH;
    }
    if upgrade {
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
    if !length {
        return Some(len);
    }
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
) -> Result<Response<RawBody>, SendError> {
    let (mut parts, mut body) = req.into_parts();
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
        conn.out.clear();
        write_head(&mut conn.out, &parts, len);
        // The request is written while the response head is read: an upstream may answer
        // before it has read the body (a 413, a 401), and then stop reading or close. Its
        // answer is what the client gets, not a 502 for a write that could not finish.
        let mut upload = Some(Upload {
            body: std::mem::take(&mut data),
            sent: 0,
        });
        let mut write_failed = false;
        let mut started = false;
        let mut head = HeadRead::default();
        let read = poll_fn(|cx| {
            let mut parse = |bytes: &[u8]| parse_head(bytes, head_request, &mut parts.headers);
            // Closed while idle: sent again on another connection, unless part of a body may
            // have been taken by a request that is not safe to repeat.
            let may_resend = |write_failed| pooled && (idempotent || (len == 0 && write_failed));
            // Once the write has begun, the head first: a head that came while the write
            // waited is an early answer (the connection is not reused, see below) even if
            // the write could go on by now.
            if started
                && upload.is_some()
                && let Poll::Ready(read) = head.poll(cx, &mut conn, may_resend(false), &mut parse)
            {
                return Poll::Ready(read);
            }
            started = true;
            if let Some(u) = &mut upload
                && let Poll::Ready(done) = u.poll(cx, &mut conn)
            {
                write_failed = done.is_err();
                data = upload.take().map(|u| u.body).unwrap_or_default();
            }
            head.poll(cx, &mut conn, may_resend(write_failed), &mut parse)
        })
        .await;
        match read {
            Ok((answer, end)) => {
                // The rest of the request goes on while the response is read (an upstream may
                // stream its answer to the body), unless the upstream closes after this
                // response: then it is not sent (RFC 9112 §9.6).
                if answer.upstream_close {
                    upload = None;
                }
                // Not reused when the write failed, nor when the answer came before the
                // request was out whole: the upstream may read the rest as another request.
                let reusable = answer.reusable() && !write_failed && upload.is_none();
                let mut body = respond(
                    pool,
                    conn,
                    answer.framing,
                    reusable,
                    (answer.len + answer.taken, answer.first, answer.chunks),
                    end,
                    upload,
                );
                // A body of known length of which nothing came with the head: its first
                // bytes are awaited here (within the route's timeout, like the head), so that
                // an upstream that breaks off gets the client a 502, not a head and a cut body.
                if matches!(answer.framing, Framing::Length(n) if n > 0) && end == answer.len {
                    match poll_fn(|cx| body.poll_more(cx)).await {
                        Ok(n) if n > 0 => {}
                        Ok(_) => {
                            return Err(broke(
                                "the connection closed before the response body".into(),
                            ));
                        }
                        Err(e) => return Err(broke(e.into())),
                    }
                }
                return Ok(answer.res.map(|()| body));
            }
            Err(Unanswered::Resend) => {
                // The body (whole: nothing of it may have been taken) for the next connection.
                if let Some(u) = upload.take() {
                    data = u.body;
                }
                continue;
            }
            Err(Unanswered::Broke(why)) => return Err(broke(why.into())),
        }
    }
}

/// The request's bytes not written yet: the head in the connection's `out`, then the body.
struct Upload {
    body: Bytes,
    /// Bytes written, of the head and the body together.
    sent: usize,
}

impl Upload {
    /// Writes on (the head and the body in one vectored write while the head is not all out),
    /// then flushes.
    fn poll(&mut self, cx: &mut Context<'_>, conn: &mut Raw) -> Poll<io::Result<()>> {
        let head = conn.out.len();
        let total = head + self.body.len();
        while self.sent < total {
            let io = Pin::new(&mut conn.io);
            let n = if self.sent < head {
                let bufs = [
                    IoSlice::new(&conn.out[self.sent..]),
                    IoSlice::new(&self.body),
                ];
                ready!(io.poll_write_vectored(cx, &bufs))?
            } else {
                ready!(io.poll_write(cx, &self.body[self.sent - head..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        Pin::new(&mut conn.io).poll_flush(cx)
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

/// A final response head: the response (its body empty yet), how its body ends, whether the
/// upstream closes the connection after it, the head's length, and the body's first bytes
/// when they came with the head and were copied with it (empty otherwise; they follow the head
/// in the connection's buffer).
struct Answer {
    res: Response<()>,
    framing: Framing,
    upstream_close: bool,
    len: usize,
    first: Bytes,
    /// The bytes after the head that `first` took: its own, and a first chunk's framing.
    taken: usize,
    /// A chunked body's decoder, past those bytes.
    chunks: Chunked,
}

impl Answer {
    /// Whether the connection can take another request after this response.
    fn reusable(&self) -> bool {
        !self.upstream_close && self.framing != Framing::Close
    }
}

/// Heads up to this size are copied once and their header values are slices of the copy;
/// larger ones get a copy per value. Why the bound: hyper's HTTP/2 server keeps the values
/// it adds to its HPACK table (a `Date`, an echoed request id: new values, ~50 entries at
/// most per connection), and each such value keeps its whole head alive; 1 KiB covers the
/// usual heads (nginx's is ~150 bytes) without letting large ones (cookies) pile up. The
/// copy is one allocation with its reference count ([`copy_small`]).
const SHARED_HEAD: usize = small_bytes::MAX;

/// Reads a response head. `spare`: a header map whose memory the response's headers reuse
/// (the request's, written already), taken for a final head.
fn parse_head(
    bytes: &[u8],
    head_request: bool,
    spare: &mut HeaderMap,
) -> Result<Parsed<Answer>, &'static str> {
    let parsed = upstream_head::parse(bytes, |res, len| -> Result<_, &'static str> {
        let status = res.code.ok_or("invalid response head")?;
        let Some(ResponseFraming {
            framing,
            upstream_close,
            ..
        }) = response_framing(status, res.version, &*res.headers, head_request)?
        else {
            return Ok(Parsed::Informational(len));
        };
        let status = StatusCode::from_u16(status).map_err(|_| "invalid status code")?;
        // The body's bytes that came with the head, when they fit in its copy too (a larger
        // copy would keep a larger block alive under header values that outlive the body).
        // A chunked body's first chunk is decoded here: its data (as much as came) is the
        // first frame, a slice of the head's copy as a fixed-length body's is, where the body
        // would copy it on its own (an allocation per chunked response), and the decoder
        // goes on from there. `taken`: the bytes after the head that this takes.
        let mut chunks = Chunked::default();
        let (taken, first) = match framing {
            Framing::Length(n) => {
                let n = n.min((bytes.len() - len) as u64) as usize;
                (n, 0..n)
            }
            Framing::Chunked => match chunks.decode(&bytes[len..]) {
                Ok(Step::Data(s, e)) => (e, s..e),
                // The rest (framing only, an empty body's end, an error) is the body's.
                _ => (0, 0..0),
            },
            _ => (0, 0..0),
        };
        let (taken, first) = if taken > 0 && len + taken <= SHARED_HEAD {
            (taken, first)
        } else {
            chunks = Chunked::default();
            (0, 0..0)
        };
        // One copy of a small head, which every header value is a slice of (a copy per
        // value was an allocation each), and the body's first frame too (its own copy was
        // another): one allocation for a usual response.
        let shared = (len <= SHARED_HEAD).then(|| copy_small(&bytes[..len + taken]));
        let copy = |part: &[u8]| match &shared {
            Some(head) => {
                let at = part.as_ptr() as usize - bytes.as_ptr() as usize;
                head.slice(at..at + part.len())
            }
            None => Bytes::copy_from_slice(part),
        };
        // The request's map, cleared: its capacity (grown for the request's headers, up to
        // the client's limit) goes on with the response, to hyper's server, and is freed
        // with it; a map sized for the response alone would be allocated here instead.
        let mut headers = std::mem::take(spare);
        headers.clear();
        headers.reserve(res.headers.len());
        for h in res.headers.iter() {
            if skipped(h) {
                continue;
            }
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| "invalid response head: invalid header name")?;
            let value = HeaderValue::from_maybe_shared(copy(h.value))
                .map_err(|_| "invalid response head: invalid header value")?;
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
            && let Ok(r) = hyper::ext::ReasonPhrase::try_from(copy(r.as_bytes()))
        {
            out.extensions_mut().insert(r);
        }
        let first = match &shared {
            Some(copy) if !first.is_empty() => copy.slice(len + first.start..len + first.end),
            _ => Bytes::new(),
        };
        Ok(Parsed::Final(Answer {
            res: out,
            framing,
            upstream_close,
            len,
            first,
            taken,
            chunks,
        }))
    })?;
    parsed.unwrap_or(Ok(Parsed::Partial))
}

/// Whether a response field is left out of the response's map: a hop-by-hop field the respond
/// phase would remove anyway ([`crate::proxy::headers::strip_hop_by_hop`]), when leaving it out
/// changes nothing of what the client gets. Each such field was a name, a value and an
/// insertion here, then a lookup and a removal there (`Connection: keep-alive`, on nearly
/// every upstream response: ~990 instructions per h2c request, docs/BENCHMARKS.md "h2c
/// shared path, second round"). The names are [`fast_path::hop_by_hop`]'s (the same list
/// as the phase's, not a third copy), less `TE`, which the phase keeps as `te: trailers`;
/// a `Connection` is left out only when it names nothing but hop-by-hop fields (not
/// `close`: the phase removes a field so named), so the phase has nothing to read in it.
/// `skipping_changes_nothing_the_respond_phase_passes_on` holds the two to the same result.
fn skipped(h: &httparse::Header<'_>) -> bool {
    let name = h.name.as_bytes();
    if !fast_path::hop_by_hop(name) || name.eq_ignore_ascii_case(b"te") {
        return false;
    }
    !name.eq_ignore_ascii_case(b"connection")
        || fast_path::tokens(h.value)
            .all(|t| !t.eq_ignore_ascii_case(b"close") && fast_path::hop_by_hop(t))
}

/// The response body: `first` (bytes of it copied with the head, [`Answer::first`]), then the
/// rest, read from the connection's buffer from `start` (after the head and the bytes `first`
/// took), a chunked body with `chunks`, the decoder past those bytes.
fn respond(
    pool: &Arc<Pool>,
    conn: Raw,
    framing: Framing,
    reusable: bool,
    (start, first, chunks): (usize, Bytes, Chunked),
    end: usize,
    upload: Option<Upload>,
) -> RawBody {
    let kind = match framing {
        Framing::Empty | Framing::Length(0) => Kind::Length(0),
        Framing::Length(n) => Kind::Length(n - first.len() as u64),
        Framing::Chunked => Kind::Chunked(chunks),
        Framing::Close => Kind::Close,
    };
    let mut body = RawBody {
        conn: Some(conn),
        pool: pool.clone(),
        start,
        end,
        first,
        kind,
        reusable,
        upload: upload.map(Box::new),
    };
    if matches!(body.kind, Kind::Length(0)) {
        body.finish();
    }
    body
}

/// What is left of a response body. A chunked body's decoder is inline, not boxed: chunked
/// responses are common (Node's `res.write`, Go handlers past their buffer, streaming), and
/// a box would be an allocation and a free on each of them (`Chunked::default()` allocates
/// nothing: its trailers' `Vec` is empty until trailers come), against a `memcpy` some 40
/// bytes shorter at each move of the response (docs/BENCHMARKS.md "h2c shared path, second
/// round": ~70 instructions per request for both boxes).
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
pub struct RawBody {
    /// None once the body has ended.
    conn: Option<Raw>,
    pool: Arc<Pool>,
    /// Unread bytes: `conn.buf[start..end]`.
    start: usize,
    end: usize,
    /// The body's first bytes, copied with the head: the first frame (the connection may be
    /// back in the pool already, if they were all of the body).
    first: Bytes,
    /// What is left of the body after `first`.
    kind: Kind,
    reusable: bool,
    /// The rest of the request, written on while the response is read (see [`send`]); the
    /// connection is not reused then. Boxed: rare (an early answer), and the body is moved
    /// with its response through the phases, a `memcpy` of its size at each move.
    upload: Option<Box<Upload>>,
}

impl RawBody {
    /// The body's end: the connection goes back to the pool if the exchange ended cleanly
    /// (never when the request was still being written as the head came, see [`send`]).
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && self.start == self.end
        {
            self.pool.put_raw(conn);
        }
        self.upload = None;
    }

    /// Writes on the rest of the request, then reads more of the response into the buffer
    /// (every byte read before is used: from its start). `Ok(0)`: the upstream closed.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        // The connection is not reused (`reusable` is false while there is an upload), and
        // a write that fails is not an error of the response.
        if let Some(u) = &mut self.upload
            && u.poll(cx, conn).is_ready()
        {
            self.upload = None;
        }
        (self.start, self.end) = (0, 0);
        let mut buf = ReadBuf::new(&mut conn.buf);
        ready!(Pin::new(&mut conn.io).poll_read(cx, &mut buf))?;
        self.end = buf.filled().len();
        Poll::Ready(Ok(self.end))
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
        if !this.first.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.first)))));
        }
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
            match ready!(this.poll_more(cx)) {
                Err(_) => {
                    return this.fail("the upstream connection broke during the response body");
                }
                Ok(0) if matches!(this.kind, Kind::Close) => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail("the upstream closed the connection before the body's end");
                }
                Ok(_) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() && self.first.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first.len() as u64;
        match (&self.kind, &self.conn) {
            (_, None) => SizeHint::with_exact(first),
            (Kind::Length(n), _) => SizeHint::with_exact(first + *n),
            _ => SizeHint::default(),
        }
    }
}

/// A chunked body's trailer lines as a header map (None when one is malformed).
fn trailer_map(lines: &[u8]) -> Option<HeaderMap> {
    let mut section = Vec::with_capacity(lines.len() + 2);
    section.extend_from_slice(lines);
    section.extend_from_slice(b"\r\n");
    upstream_head::parse_fields(&section, |fields| {
        let mut map = HeaderMap::with_capacity(fields.len());
        for h in fields {
            map.append(
                HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                HeaderValue::from_bytes(h.value).ok()?,
            );
        }
        Some(map)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_read_as_hyper_read_them() {
        let raw = b"HTTP/1.1 200 Fine\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello";
        let Parsed::Final(answer) = parse_head(raw, false, &mut HeaderMap::new()).unwrap() else {
            panic!("a final head")
        };
        assert_eq!(answer.framing, Framing::Length(5));
        assert!(answer.reusable());
        assert_eq!(answer.len, raw.len() - 5);
        // The body came with the head: its first frame is a slice of the head's copy.
        assert_eq!(answer.first, "hello");
        let res = answer.res;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-a"], "1");
        assert_eq!(res.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(
            res.extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes()),
            Some(&b"Fine"[..])
        );
        assert!(matches!(
            parse_head(
                b"HTTP/1.1 100 Continue\r\n\r\n",
                false,
                &mut HeaderMap::new()
            ),
            Ok(Parsed::Informational(25))
        ));
        assert!(matches!(
            parse_head(
                b"HTTP/1.1 200 OK\r\nContent-Le",
                false,
                &mut HeaderMap::new()
            ),
            Ok(Parsed::Partial)
        ));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(
                parse_head(bad, false, &mut HeaderMap::new()).is_err(),
                "{bad:?}"
            );
        }
    }

    /// The body's first bytes go with the head's copy only as far as the body's length says
    /// and [`SHARED_HEAD`] allows; a chunked body's first chunk's data as far as it came,
    /// its framing taken too, and the decoder goes on after them.
    #[test]
    fn a_bodys_first_bytes_are_copied_with_the_head_within_its_length_and_the_bound() {
        let first = |raw: &[u8]| match parse_head(raw, false, &mut HeaderMap::new()) {
            Ok(Parsed::Final(answer)) => (answer.len, answer.first),
            _ => panic!("a final head"),
        };
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        // Part of the body came: that part.
        let (len, bytes) = first(&[&head[..], b"0123"].concat());
        assert_eq!((len, &bytes[..]), (head.len(), &b"0123"[..]));
        // More than the body (the upstream's next bytes): the body's length only.
        let (_, bytes) = first(&[&head[..], b"0123456789HTTP/1.1"].concat());
        assert_eq!(bytes, "0123456789");
        // Nothing yet, or a HEAD request's answer: nothing.
        assert!(first(head).1.is_empty());
        let Ok(Parsed::Final(answer)) = parse_head(head, true, &mut HeaderMap::new()) else {
            panic!("a final head")
        };
        assert!(answer.first.is_empty());
        // Past the bound, the head alone is copied and the body read from the buffer.
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n{}",
            "b".repeat(2000)
        );
        assert!(first(big.as_bytes()).1.is_empty());
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let answer = |raw: &[u8]| match parse_head(raw, false, &mut HeaderMap::new()) {
            Ok(Parsed::Final(answer)) => answer,
            _ => panic!("a final head"),
        };
        let mut a = answer(&[&head[..], b"3\r\nabc\r\n0\r\n\r\n"].concat());
        assert_eq!((a.len, a.taken, &a.first[..]), (head.len(), 6, &b"abc"[..]));
        // The decoder is past the chunk's data: the rest ends the body.
        assert_eq!(a.chunks.decode(b"\r\n0\r\n\r\n"), Ok(Step::Done(7)));
        // Part of a chunk: that part; the decoder wants the rest of it.
        let mut a = answer(&[&head[..], b"a\r\nabc"].concat());
        assert_eq!((a.taken, &a.first[..]), (6, &b"abc"[..]));
        assert_eq!(a.chunks.decode(b"defghij\r\n"), Ok(Step::Data(0, 7)));
        // Framing only, an empty body, a bad size, a chunk past the bound: nothing taken.
        for rest in [&b"3\r"[..], b"0\r\n\r\n", b"z\r\n"] {
            let a = answer(&[&head[..], rest].concat());
            assert_eq!((a.taken, a.first.len()), (0, 0), "{rest:?}");
        }
        let big = format!("7d0\r\n{}", "b".repeat(2000));
        let a = answer(&[&head[..], big.as_bytes()].concat());
        assert_eq!((a.taken, a.first.len()), (0, 0));
    }

    /// Hop-by-hop fields the respond phase removes anyway are not put in the response's map;
    /// what that phase must still read (a `Connection` naming other fields or `close`, `TE`)
    /// is.
    #[test]
    fn hop_by_hop_fields_the_respond_phase_removes_are_left_out() {
        let map = |raw: &str| match parse_head(raw.as_bytes(), false, &mut HeaderMap::new()) {
            Ok(Parsed::Final(answer)) => answer.res.into_parts().0.headers,
            _ => panic!("a final head"),
        };
        let usual = map(
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            usual.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["server", "content-length"]
        );
        let chunked = map(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\n\
             Proxy-Authenticate: Basic\r\nProxy-Connection: x\r\nTE: trailers\r\n\r\n",
        );
        assert_eq!(
            chunked.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["te"]
        );
        for kept in [
            "close",
            "x-secret",
            "keep-alive, x-secret",
            "Keep-Alive, Close",
        ] {
            let m = map(&format!(
                "HTTP/1.1 200 OK\r\nConnection: {kept}\r\nContent-Length: 0\r\n\r\n"
            ));
            assert_eq!(m["connection"], kept);
        }
        // Empty tokens and case do not matter.
        let m = map("HTTP/1.1 200 OK\r\nconnection: , Keep-Alive ,\r\nContent-Length: 0\r\n\r\n");
        assert!(!m.contains_key("connection"));
    }

    /// The skips change nothing the respond phase passes on: over heads of every shape the
    /// skip tells apart, `strip_hop_by_hop` (as the phase calls it: no upgrade) gives the same
    /// map from `parse_head`'s (skips taken) as from a map of every field (no skips).
    #[test]
    fn skipping_changes_nothing_the_respond_phase_passes_on() {
        let fields = [
            "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
            "Connection: keep-alive\r\nConnection: x-secret\r\nX-Secret: 1\r\n",
            "Connection: keep-alive\r\nConnection: close\r\n",
            "Connection: close\r\nClose: 1\r\nKeep-Alive: 1\r\n",
            "Connection: Keep-Alive, Close\r\nKeep-Alive: timeout=5\r\n",
            "Connection: keep-alive, x-request-id\r\nX-Request-Id: abc\r\nKeep-Alive: 1\r\n",
            "Connection: keep-alive, x-\u{e9}t\u{e9}\r\nKeep-Alive: 1\r\n",
            "Connection: , ,keep-alive,, \r\nKeep-Alive: 1\r\n",
            "Connection: ,\r\n",
            "Connection: te\r\nTE: trailers\r\n",
            "Connection: te, upgrade\r\nTE: trailers, deflate\r\nUpgrade: h2c\r\n",
            "TE: deflate\r\nTransfer-Encoding: chunked\r\n",
            "TE: trailers\r\nProxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\n\
             Proxy-Authorization: Basic x\r\n",
            "Upgrade: websocket\r\nconnection: UPGRADE\r\n",
        ];
        for f in fields {
            let framing = if f.contains("Transfer-Encoding") {
                ""
            } else {
                "Content-Length: 0\r\n"
            };
            let raw = format!("HTTP/1.1 200 OK\r\nServer: s\r\n{f}{framing}\r\n");
            // Each char is one byte (`\u{e9}`: obs-text).
            let bytes: Vec<u8> = raw
                .chars()
                .map(|c| u8::try_from(u32::from(c)).unwrap())
                .collect();
            let mut skips = match parse_head(&bytes, false, &mut HeaderMap::new()) {
                Ok(Parsed::Final(answer)) => answer.res.into_parts().0.headers,
                _ => panic!("a final head: {f}"),
            };
            let mut all = HeaderMap::new();
            let mut slots = [httparse::EMPTY_HEADER; 16];
            let mut res = httparse::Response::new(&mut slots);
            assert!(res.parse(&bytes).unwrap().is_complete(), "{f}");
            for h in res.headers.iter() {
                all.append(
                    HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(h.value).unwrap(),
                );
            }
            assert!(skips.len() < all.len(), "nothing skipped: {f}");
            crate::proxy::headers::strip_hop_by_hop(&mut skips, false);
            crate::proxy::headers::strip_hop_by_hop(&mut all, false);
            assert_eq!(skips, all, "{f}");
        }
    }

    /// The body is moved with its response through the phases, a `memcpy` of its size each
    /// time: its rare part, an upload's rest, is one pointer (boxed), and a chunked decoder
    /// (common) is inline without widening the body beyond the decoder and a tag.
    #[test]
    fn a_raw_body_keeps_its_rare_parts_out_of_line() {
        use std::mem::size_of;
        assert_eq!(size_of::<Option<Box<Upload>>>(), size_of::<usize>());
        assert!(size_of::<Upload>() > 2 * size_of::<usize>());
        assert!(size_of::<Kind>() <= size_of::<Chunked>() + size_of::<u64>());
        // The whole, as a budget (x86-64 and other 64-bit targets): a connection, the pool,
        // two offsets, the first bytes, a length or a decoder, an upload's box, a flag.
        #[cfg(target_pointer_width = "64")]
        assert!(size_of::<RawBody>() <= 216, "{}", size_of::<RawBody>());
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
