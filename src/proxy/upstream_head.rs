//! Reading an upstream's HTTP/1.1 response head, for the two places that speak HTTP/1.1 to
//! upstreams themselves: the HTTP/1 fast path ([`super::fast_path`]) and the raw exchange
//! ([`super::cluster::raw_exchange`]).
//!
//! In: a raw upstream connection ([`Raw`]) whose request is on its way, and what the caller
//! makes of a complete head (its own refusals, its own output). Out: that, and where the bytes
//! read so far end in the connection's buffer; or why there is no answer, which says when the
//! request may go again on another connection (a pooled connection the upstream closed while
//! idle).
//!
//! One place for three things both paths did alike: the header slots (on the stack, again on
//! the heap for a head or trailer section with more fields), the read loop (the buffer grown
//! up to [`MAX_RESPONSE_HEAD`], 1xx heads skipped, a close before any byte told apart), and
//! its states kept outside the future ([`HeadRead`]), so that a caller can read the head while
//! it still writes the request (an upstream may answer before it has read the body).

use std::borrow::Cow;
use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};

use super::cluster::pool::Raw;

/// Response headers read on the stack; a response with more is read again with
/// [`MANY_HEADERS`] on the heap (hyper's client refused more than 100 with a 502).
const RESPONSE_HEADERS: usize = 128;
const MANY_HEADERS: usize = 1024;
/// The largest response head read (hyper's default buffer limit).
const MAX_RESPONSE_HEAD: usize = 400 * 1024;
/// Trailer fields read on the stack; a longer section is read again with [`MANY_HEADERS`]
/// slots on the heap (as many as a response head may have).
const TRAILER_FIELDS: usize = 64;

/// Parses `bytes` as a response head and gives the parsed head and its length to `read`.
/// `Ok(None)`: not complete yet.
pub(super) fn parse<T>(
    bytes: &[u8],
    read: impl FnOnce(&httparse::Response<'_, '_>, usize) -> T,
) -> Result<Option<T>, &'static str> {
    // Slots left uninitialized: filling 128 empty headers (4 KiB) before every parse was
    // ~600 instructions per proxied response (callgrind, h2c; docs/BENCHMARKS.md).
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let mut heap;
    let parsed = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, bytes, &mut stack)
    {
        Err(httparse::Error::TooManyHeaders) => {
            heap = vec![httparse::EMPTY_HEADER; MANY_HEADERS];
            res = httparse::Response::new(&mut heap);
            res.parse(bytes)
        }
        other => other,
    };
    match parsed {
        Ok(httparse::Status::Complete(len)) => Ok(Some(read(&res, len))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(invalid(e)),
    }
}

/// Parses `section` as header fields ending in an empty line (a chunked body's trailer
/// section) and gives them to `read`. None when it is malformed or not complete.
pub(super) fn parse_fields<T>(
    section: &[u8],
    read: impl FnOnce(&[httparse::Header<'_>]) -> T,
) -> Option<T> {
    let mut stack = [httparse::EMPTY_HEADER; TRAILER_FIELDS];
    let mut heap;
    let parsed = match httparse::parse_headers(section, &mut stack) {
        Err(httparse::Error::TooManyHeaders) => {
            heap = vec![httparse::EMPTY_HEADER; MANY_HEADERS];
            httparse::parse_headers(section, &mut heap)
        }
        other => other,
    };
    match parsed {
        Ok(httparse::Status::Complete((_, fields))) => Some(read(fields)),
        _ => None,
    }
}

/// httparse's reason, as a message that does not allocate.
fn invalid(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid response head: invalid header name",
        httparse::Error::HeaderValue => "invalid response head: invalid header value",
        httparse::Error::NewLine => "invalid response head: invalid new line",
        httparse::Error::Status => "invalid response head: invalid status",
        httparse::Error::Token => "invalid response head: invalid token",
        httparse::Error::TooManyHeaders => "invalid response head: too many headers",
        httparse::Error::Version => "invalid response head: invalid version",
    }
}

/// What the caller made of the bytes read so far.
pub(super) enum Parsed<T> {
    /// No complete head yet.
    Partial,
    /// A 1xx head of this length: skipped, the next head is read.
    Informational(usize),
    /// The final head.
    Final(T),
}

/// Why no response head came.
#[derive(Debug)]
pub(super) enum Unanswered {
    /// The connection closed (or reset) before a single byte, and the caller said the request
    /// may go again: it goes on another connection.
    Resend,
    /// The exchange broke.
    Broke(Cow<'static, str>),
}

/// A response head being read into a raw connection's buffer (from its start).
#[derive(Default)]
pub(super) struct HeadRead {
    /// The end of the bytes read (1xx heads already skipped are gone).
    end: usize,
    /// Some byte came back (a 1xx counts): a close is no longer "closed while idle".
    answered: bool,
    /// Bytes came that were not parsed yet.
    unparsed: bool,
}

impl HeadRead {
    /// Reads until `parse` finds the final head; gives what it made of it and the end of the
    /// bytes read (a body's first bytes may follow the head). `may_resend`: a close or reset
    /// before any byte is [`Unanswered::Resend`].
    pub(super) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Raw,
        may_resend: bool,
        parse: &mut impl FnMut(&[u8]) -> Result<Parsed<T>, &'static str>,
    ) -> Poll<Result<(T, usize), Unanswered>> {
        loop {
            while self.unparsed {
                match parse(&conn.buf[..self.end]) {
                    Err(why) => return Poll::Ready(Err(Unanswered::Broke(why.into()))),
                    Ok(Parsed::Partial) => self.unparsed = false,
                    Ok(Parsed::Informational(len)) => {
                        conn.buf.copy_within(len..self.end, 0);
                        self.end -= len;
                    }
                    Ok(Parsed::Final(head)) => return Poll::Ready(Ok((head, self.end))),
                }
            }
            if self.end == conn.buf.len() {
                if self.end >= MAX_RESPONSE_HEAD {
                    return Poll::Ready(Err(Unanswered::Broke(
                        "the response head is too large".into(),
                    )));
                }
                conn.buf.resize((self.end * 2).min(MAX_RESPONSE_HEAD), 0);
            }
            let mut buf = ReadBuf::new(&mut conn.buf[self.end..]);
            let read = ready!(Pin::new(&mut conn.io).poll_read(cx, &mut buf));
            let n = buf.filled().len();
            let resend = !self.answered && may_resend;
            match read {
                Err(_) if resend => return Poll::Ready(Err(Unanswered::Resend)),
                Err(e) => return Poll::Ready(Err(Unanswered::Broke(e.to_string().into()))),
                Ok(()) if n == 0 && resend => return Poll::Ready(Err(Unanswered::Resend)),
                Ok(()) if n == 0 => {
                    return Poll::Ready(Err(Unanswered::Broke(
                        "the connection closed before a response".into(),
                    )));
                }
                Ok(()) => {}
            }
            self.answered = true;
            self.end += n;
            self.unparsed = true;
        }
    }
}

/// [`HeadRead::poll`] once the request is written whole.
pub(super) async fn read<T>(
    conn: &mut Raw,
    may_resend: bool,
    mut parse: impl FnMut(&[u8]) -> Result<Parsed<T>, &'static str>,
) -> Result<(T, usize), Unanswered> {
    let mut head = HeadRead::default();
    poll_fn(|cx| head.poll(cx, conn, may_resend, &mut parse)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_past_the_stack_slots_are_read_on_the_heap() {
        let mut head = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..300 {
            head.push_str(&format!("x-h{i}: {i}\r\n"));
        }
        head.push_str("\r\nbody");
        let parsed = parse(
            head.as_bytes(),
            |res: &httparse::Response<'_, '_>, len: usize| (res.headers.len(), len),
        );
        assert_eq!(parsed, Ok(Some((300, head.len() - 4))));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nx-a", |_, _| ()), Ok(None));
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", |_, _| ()),
            Err("invalid response head: invalid header name")
        );
        let many: String = (0..(MANY_HEADERS + 1))
            .map(|i| format!("x-h{i}: {i}\r\n"))
            .collect();
        assert!(
            parse(
                format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes(),
                |_, _| ()
            )
            .is_err()
        );
    }

    #[test]
    fn trailer_sections_past_the_stack_slots_are_read_on_the_heap() {
        let many: String = (0..300).map(|i| format!("x-t{i}: {i}\r\n")).collect();
        let section = format!("{many}\r\n");
        assert_eq!(
            parse_fields(section.as_bytes(), |f: &[httparse::Header<'_>]| f.len()),
            Some(300)
        );
        assert_eq!(
            parse_fields(b"x-a: 1\r\n", |f: &[httparse::Header<'_>]| f.len()),
            None
        );
        assert_eq!(
            parse_fields(b"bad name: 1\r\n\r\n", |f: &[httparse::Header<'_>]| f.len()),
            None
        );
    }
}
