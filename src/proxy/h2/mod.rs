//! Outrigger's own HTTP/2 server (listener key `http2_server: outrigger`, the default;
//! `hyper` keeps hyper's and `h2`'s as a fallback): the connection codec (frames, HPACK,
//! stream states, flow control, settings, GOAWAY) and its driver, for HTTP/2 connections on
//! proxy listeners.
//!
//! Why: on h2c, hyper's and h2's server were ~22k of the ~52k user-space instructions a
//! proxied request cost (docs/BENCHMARKS.md, "h2c per request"), the largest part of the gap
//! to HAProxy (32k).
//!
//! How it works: one task per connection reads and writes every frame (`conn`: one read
//! buffer, reused; all frames ready are written with one write per wake); each request's
//! service future runs on a task of its own (`tokio::spawn`), or on the connection's task for
//! a request without a body on a current-thread runtime (`inline`: the rule and why there),
//! and queues its response in state shared with the connection task (`streams`: one `Mutex` per connection and a waker
//! per side, as `h2` does; no channel per stream) and encodes the response head itself
//! (`hpack`: a stateless encoder; request blocks are decoded by `hpack_decode`, our own,
//! whose Huffman decoder is a table built once per process). The request body ([`RecvBody`]) is read from the same
//! state, and reading it is what gives the client its window back.
//!
//! Per request, in steady state, the server itself allocates the request's `HeaderMap` (two
//! arrays, sized at once for what the proxy's phases add; a third once a field name repeats)
//! and, for a spawned stream, its task (`tokio::spawn`; an inline stream reuses a slot of the
//! connection's once it had as many streams at once). Header values go into a per-connection arena
//! (`hpack::BlockReader`: 4 KiB that the requests' values slice, allocated at the first header
//! block and anew only once requests used up its room; a block that needs more gets one of
//! its own size, dropped after the block), response heads are encoded into buffers the
//! connection hands to each stream's task and takes back once written, and a removed
//! stream's send queue serves the next one (docs/BENCHMARKS.md, "h2c allocations"). What the
//! client sends can add: a copy of each field name that is not one of `http`'s standard
//! names (`HeaderName`); from our HPACK decoder (`hpack_decode`), each literal with indexing
//! copied into its table (one allocation; Huffman-coded strings are decoded into one scratch
//! buffer the connection keeps); a buffer for the request's small DATA
//! payloads (copied together) and one for response trailers.
//!
//! What the client gets (RFC 9113 server side, RFC 7541 HPACK):
//! - our SETTINGS (max concurrent streams, initial window, max header list size, max frame
//!   size when not the default) and a WINDOW_UPDATE raising the connection window; no server
//!   push, no extended CONNECT; the client's settings applied and acknowledged;
//! - a stream past SETTINGS_MAX_CONCURRENT_STREAMS is refused (REFUSED_STREAM); a malformed
//!   request (§8.1.1: pseudo-headers, connection-specific fields, `te`, uppercase names,
//!   NUL/CR/LF in a value, `content-length` against the DATA) is reset with PROTOCOL_ERROR;
//!   a header list over SETTINGS_MAX_HEADER_LIST_SIZE is answered 431, as h2's server does
//!   (then RST_STREAM NO_ERROR when the request had not ended); a refused stream is not
//!   counted as a reset by the abuse guard below;
//! - DATA, WINDOW_UPDATE or RST_STREAM on a stream the client never opened (above its last,
//!   or even: we push nothing) is a connection error PROTOCOL_ERROR. On a closed stream
//!   (§5.1), DATA or HEADERS is a stream error STREAM_CLOSED, after the client's own
//!   RST_STREAM too; WINDOW_UPDATE, PRIORITY and RST_STREAM are ignored; anything on a stream
//!   we reset in the last 10 s is dropped (the client may have sent it before it saw our
//!   reset; §5.1 lets us limit that period). Without a record of every id: the streams we
//!   reset in the last 10 s (1,024 at most) and the last 128 the client reset are remembered
//!   for once they left the stream map (streams opened after our final GOAWAY are not: their
//!   frames are dropped by id); HEADERS on another stream gone from it, which we
//!   cannot tell from a skipped id, is a connection error PROTOCOL_ERROR, DATA a stream error
//!   STREAM_CLOSED. Padding is given back to the connection's and the stream's window
//!   (§6.9.1);
//! - frames read with the preface (a client's first flight: preface, SETTINGS, a request)
//!   are handled at once, not when the client next sends something;
//! - the read buffer holds one frame (16 KiB and its header); a larger frame (a raised
//!   SETTINGS_MAX_FRAME_SIZE) gets a buffer of its size, let go once the frame is handled and
//!   no whole frame header is left in it;
//! - request DATA kept unread costs about its own size: a payload under a quarter of the read
//!   buffer it came in is copied into its stream's buffer rather than kept as a slice that
//!   would keep the whole read buffer alive (at most four times what is unread: the read
//!   buffer is never grown in place, so its size is known);
//! - the request as h2's server builds it: version HTTP/2, an absolute URI from `:scheme`,
//!   `:authority` and `:path` when `:authority` is there (else the path only), the regular
//!   fields, no `host` added;
//! - response heads with `date` and (from an exact size hint of a body not at its end, not on
//!   204/304) `content-length` when absent, as hyper's server adds them; a dynamic table size
//!   update to 0 first in our next block after the client lowers SETTINGS_HEADER_TABLE_SIZE;
//! - responses under the client's windows in DATA frames of at most its SETTINGS_MAX_FRAME_SIZE
//!   and 16 KiB (whatever it accepts: the output's bound does not depend on it),
//!   connection-specific fields dropped; a HEAD response has no DATA; trailers end the
//!   stream with HEADERS, empty ones with an empty DATA frame (END_STREAM); a body that fails resets the stream (INTERNAL_ERROR); a response
//!   that waits `stalled_stream_timeout` for window is reset (CANCEL): for its stream's
//!   window, or for a connection window the client opens for no stream in that time (one it
//!   opens goes to the streams in turn, so a stream waiting for it is not passed over); a
//!   stream already reset is never reset again;
//! - streams take turns at the output, about 16 KiB of DATA each (one frame at the default
//!   frame size), so one large body frame does not hold the other responses back; the
//!   connection window goes to the streams that found it shut in that order, one that used
//!   it up going to the back (as h2's server assigns connection capacity);
//! - window a body reader gives back is announced at once when the connection's receive
//!   window is under half (else once half is due), whichever stream's reader it was and
//!   whether the stream has ended or not: a client blocked on the connection window by a
//!   stream whose body nobody reads gets the window the other streams' readers free;
//! - abuse guards: more rapid client resets (RST_STREAM before any of the response's head was
//!   written and within 10 ms of the request: rapid reset, CVE-2023-44487) and resets of ours
//!   for the client's faults than max(200, 2 × max concurrent streams) in 10 s; more client
//!   resets before any of the response's head, of streams 10 ms to 1 s old, than that many
//!   plus the streams completed normally (their END_STREAM written) in the same 10 s window
//!   (those at most 4 × that many); more than 1,000 empty DATA (zero-length: padding counts as data) or CONTINUATION
//!   frames in 10 s; or a header block (in one HEADERS frame or with CONTINUATION: fragments
//!   and 9 bytes per frame) longer than the max header list size + 16 KiB close the connection
//!   with ENHANCE_YOUR_CALM ([`Error::abuse_guard`] says which, for
//!   `outrigger_client_abuse_closes_total`); no input is read while 64 KiB of output wait for
//!   the client (SETTINGS and PING floods; the output can go past it by one DATA frame of 16
//!   KiB or one response head). A reset after the head never counts: the stream's service is
//!   dropped at once (as hyper does), so it cost no more than a request that long; nor one of
//!   a stream 1 s old or more: each held one of the max concurrent streams that long, so they
//!   come at most that many a second (100 at the default), and slow calls are what clients
//!   cancel (gRPC deadlines in an upstream slowdown: never closed, however many). A reset
//!   before the head of a stream 10 ms to 1 s old counts against the second budget: a client
//!   may cancel 200 of those per 10 s, plus one per request it completed in that window, at
//!   most 1,000 in all at 100 streams (completions are cheap: a 404 of our own counts); one
//!   that only starts requests and cancels them young is closed after 200. In all, one
//!   connection can make us start and drop about 100 + 100 + 20 upstream requests a second at
//!   100 streams. h2's server counts resets of streams not yet accepted by the application,
//!   which hyper does at once (`conn::Cancels` says what others do);
//! - [`Shutdown::graceful`] in two steps, as h2's server: GOAWAY (NO_ERROR, stream 2^31-1) and
//!   a PING; requests that crossed it are still taken; once the PING's ACK is back (or after
//!   1 s) GOAWAY with the last stream taken; open streams finish; then our side is shut (FIN)
//!   and what the client still sends is read and dropped until it closes, 2 s at most (also
//!   after the client's GOAWAY; also while our shutdown itself waits: a TLS close_notify that
//!   a client that reads nothing never lets out, the connection then dropped without it): a
//!   close with unread input would reset the connection, and a pooled client that sent a
//!   request just as an idle connection closed could not tell it was never processed. A
//!   connection error: GOAWAY with its code, then the same close for 500 ms after the GOAWAY
//!   is flushed (so the client reads the GOAWAY rather than a TCP reset); after
//!   ENHANCE_YOUR_CALM (an abuse guard: floods, rapid resets) the close is at once (the same
//!   close, with no drain time), nothing more read, once the GOAWAY is written. Nothing is
//!   read while the GOAWAY waits for room in the socket behind what was queued before it:
//!   the wait is re-armed each time the client takes some of our bytes, 500 ms (100 ms after
//!   an abuse guard's) at a time, the whole close capped at 5 s (2 s). A client that reads
//!   nothing for that long, or still reads at the cap, is dropped with what did not fit
//!   ([`Error::goaway_unsent`], " (GOAWAY unsent)" in its message), and an abuse close is
//!   still its guard's, not a stall.
//!
//! The service closure is called, and its task spawned (or its future put in its slot),
//! without the connection's lock held.
//!
//! Tested by `tests` (frames in, frames out; real clients), `inline_tests` (the inline
//! streams: the rule, fairness, resets, panics, shutdown), `guard_tests` (the second reset
//! budget, the bounds on output, header blocks and the read buffer, one clock read per read
//! batch) and `fuzz_tests` (generated and
//! mutated client input, 2,000 cases by default, `OUTRIGGER_H2_FUZZ_CASES` for more, about
//! half with every stream spawned: no panic, no hang, bounded buffers, valid output); `fair_tests` for the turns, the window given
//! back and the stall timer (on tokio's paused clock). The tests of resets, stalls, closes,
//! guards and stream limits that make a request without a body run on both of its paths
//! (`on_both_paths!`: inline, and spawned as on a multi-thread runtime; some that do not pause
//! the clock also on a multi-thread runtime); some that make none run on both runtimes.
//!
//! Not done: priorities (PRIORITY is checked and ignored: responses take turns in the order
//! they are ready), a dynamic table in the response encoder, Huffman coding of what we send,
//! SETTINGS_ENABLE_CONNECT_PROTOCOL, a SETTINGS ACK timeout, a lower `initial_window_size`
//! than 65,535 enforced on streams opened before the client acknowledged it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ::http::{Request, Response};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::ProxyBody;

/// Tests: a test run on both paths of a request without a body: `NAME::inline`, served on
/// the connection's task (the current-thread runtime's rule), and `NAME::spawned`, on a task
/// of its own as on a multi-thread runtime (`inline::spawn_all`), with the test's own
/// attributes (`#[tokio::test]`, a paused clock). With `multi_thread;` first, also
/// `NAME::multi_thread` on a multi-thread runtime of two workers. With `both_runtimes;`
/// first (a test that makes no request without a body, so one path only), `NAME::current_thread`
/// and `NAME::multi_thread`. The last two forms take doc comments and a plain
/// `#[tokio::test]` only (no paused clock, which the multi-thread runtime has not): anything
/// else is a compile error. The body is written once; it may ask `tests::test_path()`.
#[cfg(test)]
macro_rules! on_both_paths {
    ($(#[$attr:meta])* async fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$attr])*
            async fn inline() $body
            $(#[$attr])*
            async fn spawned() {
                let _spawned = crate::proxy::h2::inline::spawn_all();
                $body
            }
        }
    };
    (multi_thread; $(#[doc = $doc:literal])* #[tokio::test] async fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[doc = $doc])*
            #[tokio::test]
            async fn inline() $body
            $(#[doc = $doc])*
            #[tokio::test]
            async fn spawned() {
                let _spawned = crate::proxy::h2::inline::spawn_all();
                $body
            }
            $(#[doc = $doc])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_thread() $body
        }
    };
    (both_runtimes; $(#[doc = $doc:literal])* #[tokio::test] async fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[doc = $doc])*
            #[tokio::test]
            async fn current_thread() $body
            $(#[doc = $doc])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn multi_thread() $body
        }
    };
    ($runtimes:ident; $($rest:tt)*) => {
        compile_error!(concat!(
            "on_both_paths!(",
            stringify!($runtimes),
            "; ...) takes doc comments and a plain #[tokio::test] only (no paused clock)"
        ));
    };
}

#[cfg(test)]
mod close_tests;
mod conn;
#[cfg(test)]
mod fair_tests;
mod frame;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod guard_tests;
mod hpack;
mod hpack_decode;
mod inline;
#[cfg(test)]
mod inline_tests;
mod stream;
mod streams;
#[cfg(test)]
mod tests;

pub use stream::{RecvBody, StreamError};

/// What our side of a connection announces and enforces.
#[derive(Clone)]
pub struct Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS; a stream past it is refused (RST_STREAM REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 §6.5.2 size: names + values + 32 per field);
    /// a request over it is answered 431 (as hyper does); the header block is still decoded
    /// (HPACK state) but not kept.
    pub max_header_list_size: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: each stream's receive window for request bodies.
    pub initial_window_size: u32,
    /// The connection's receive window (raised from 65,535 with a WINDOW_UPDATE on stream 0).
    pub connection_window_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE we accept (16,384 unless raised).
    pub max_frame_size: u32,
    /// A stream whose response waited this long for the client's flow-control window (the
    /// client reads nothing of it: the stream's window stayed shut, or the connection's
    /// with no WINDOW_UPDATE on it) is reset (CANCEL) and `on_stalled_stream` called.
    pub stalled_stream_timeout: Duration,
    pub on_stalled_stream: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Settings {
    /// The settings the HTTP/2 tests start from (the unit tests' and `tests/h2_pinned_memory.rs`,
    /// which links only the library: hence public), each test changing what it is about. Not
    /// the listener's: those come from its limits (`generation::h2_settings`: a 64 KiB header
    /// list, a 1 MiB connection window, the 60 s idle timeout by default); these keep the
    /// values the tests were written against (a 16 KiB header list, a 4 MiB connection window,
    /// 30 s before a stalled stream is reset).
    #[doc(hidden)]
    pub fn for_tests() -> Self {
        Settings {
            max_concurrent_streams: 100,
            max_header_list_size: 16 * 1024,
            initial_window_size: 1024 * 1024,
            connection_window_size: 4 * 1024 * 1024,
            max_frame_size: 16_384,
            stalled_stream_timeout: Duration::from_secs(30),
            on_stalled_stream: None,
        }
    }
}

/// Asks a connection to finish: GOAWAY (in two steps, the last with the last stream id
/// taken), in-flight streams end, then the connection closes (lingering). Cloneable; the glue
/// keeps one per connection.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    requested: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            inner: Arc::new(ShutdownInner {
                requested: AtomicBool::new(false),
                waker: Mutex::new(None),
            }),
        }
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Graceful: no new streams (GOAWAY NO_ERROR), in-flight ones finish.
    pub fn graceful(&self) {
        self.inner.requested.store(true, Ordering::Release);
        let waker = self
            .inner
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn poll_requested(&self, cx: &mut Context<'_>) -> bool {
        if self.inner.requested.load(Ordering::Acquire) {
            return true;
        }
        let mut waker = self.inner.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        drop(waker);
        self.inner.requested.load(Ordering::Acquire)
    }
}

/// How a connection ended badly (a connection error we sent GOAWAY for, or I/O).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

#[derive(Debug)]
enum ErrorKind {
    Io(std::io::Error),
    Protocol {
        reason: frame::Reason,
        detail: &'static str,
        /// The abuse guard that closed the connection (then `reason` is ENHANCE_YOUR_CALM).
        guard: Option<Guard>,
        /// The close ended before the client took all of our last frames (it read nothing
        /// for the close's time): the GOAWAY, and maybe more, was dropped with the
        /// connection.
        unsent: bool,
    },
}

/// An abuse guard of the server, which closes the connection with GOAWAY ENHANCE_YOUR_CALM
/// (the `guard` label of `outrigger_client_abuse_closes_total`: [`Guard::label`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    /// Client resets within 10 ms of the request, before the response. One count with
    /// [`Guard::StreamErrors`]: the label names the kind that passed the limit.
    RapidReset,
    /// Client resets before the response of streams 10 ms to 1 s old, beyond the streams
    /// completed (`conn::Cancels`).
    CancelledStreams,
    /// Our resets for the client's faults (one count with [`Guard::RapidReset`]).
    StreamErrors,
    /// Empty DATA frames (without END_STREAM).
    EmptyData,
    /// Empty CONTINUATION frames.
    EmptyContinuations,
    /// A header block too long (CONTINUATION flood).
    HeaderBlock,
}

impl Guard {
    /// The metric's label: one per guard, but both kinds of empty frames are `empty_frames`.
    pub fn label(self) -> &'static str {
        match self {
            Guard::RapidReset => "rapid_reset",
            Guard::CancelledStreams => "cancelled_streams",
            Guard::StreamErrors => "stream_errors",
            Guard::EmptyData | Guard::EmptyContinuations => "empty_frames",
            Guard::HeaderBlock => "header_block",
        }
    }

    /// What the close says (in the log and the error's text).
    fn detail(self) -> &'static str {
        match self {
            Guard::RapidReset => "too many stream resets (rapid reset)",
            Guard::CancelledStreams => "too many streams reset before their response",
            Guard::StreamErrors => "too many stream resets",
            Guard::EmptyData => "too many empty DATA frames",
            Guard::EmptyContinuations => "too many empty CONTINUATION frames",
            Guard::HeaderBlock => "header block too long",
        }
    }
}

impl Error {
    fn io(e: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io(e),
        }
    }

    fn protocol(reason: frame::Reason, detail: &'static str, guard: Option<Guard>) -> Self {
        Error {
            kind: ErrorKind::Protocol {
                reason,
                detail,
                guard,
                unsent: false,
            },
        }
    }

    /// The same error, its close given up before the client took our last frames.
    fn unsent(mut self) -> Self {
        if let ErrorKind::Protocol { unsent, .. } = &mut self.kind {
            *unsent = true;
        }
        self
    }

    /// Whether the close was given up before the client took all of our last frames (the
    /// GOAWAY among them): a client that read nothing for the close's time.
    pub fn goaway_unsent(&self) -> bool {
        matches!(self.kind, ErrorKind::Protocol { unsent: true, .. })
    }

    /// The HTTP/2 error code we sent in GOAWAY, when it was a protocol error (not I/O).
    pub fn code(&self) -> Option<u32> {
        match &self.kind {
            ErrorKind::Protocol { reason, .. } => Some(reason.0),
            ErrorKind::Io(_) => None,
        }
    }

    /// Which abuse guard closed the connection (GOAWAY ENHANCE_YOUR_CALM), if one did.
    pub fn abuse_guard(&self) -> Option<Guard> {
        match &self.kind {
            ErrorKind::Protocol { guard, .. } => *guard,
            ErrorKind::Io(_) => None,
        }
    }

    /// The I/O error, when the connection failed on its socket.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match &self.kind {
            ErrorKind::Io(e) => Some(e),
            ErrorKind::Protocol { .. } => None,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ErrorKind::Io(e) => write!(f, "HTTP/2 connection error: {e}"),
            ErrorKind::Protocol {
                reason,
                detail,
                unsent,
                ..
            } => {
                write!(f, "HTTP/2 connection error {reason}: {detail}")?;
                if *unsent {
                    f.write_str(" (GOAWAY unsent)")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io(e) => Some(e),
            ErrorKind::Protocol { .. } => None,
        }
    }
}

/// Serves one HTTP/2 connection until it ends. `prefix` is what was already read from `io`
/// (it starts with, or is a prefix of, the client preface `PRI * HTTP/2.0…`); for a TLS
/// connection with ALPN `h2`, it may be empty.
///
/// Each stream's request (`http::Request` as hyper builds one: version HTTP/2, the URI from
/// `:scheme`, `:authority` and `:path`, the regular fields in its `HeaderMap`, no `host` added)
/// goes to `service`, whose future runs on a task of its own (`tokio::spawn`) or on the
/// connection's (`inline`: a request without a body on a current-thread runtime); its response
/// (head, body frames, trailers) is sent back under flow control. A response body that fails,
/// or a service that panics, resets its stream (INTERNAL_ERROR). Dropping the returned future
/// closes the connection and aborts its streams' tasks (drops the inline ones).
pub async fn serve<IO, S, F>(
    io: IO,
    prefix: Bytes,
    settings: Settings,
    shutdown: Shutdown,
    service: S,
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: FnMut(Request<RecvBody>) -> F + Send + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut conn = conn::Conn::new(io, prefix, settings, shutdown, service);
    std::future::poll_fn(|cx: &mut Context<'_>| -> Poll<Result<(), Error>> { conn.poll_conn(cx) })
        .await
}
