//! Outrigger's own HTTP/2 server (listener key `http2_server: outrigger`): the connection
//! codec (frames, HPACK, stream states, flow control, settings, GOAWAY) and its driver, in
//! place of hyper's and `h2`'s server for HTTP/2 connections on proxy listeners.
//!
//! Why: on h2c, hyper's and h2's server were ~22k of the ~52k user-space instructions a
//! proxied request cost (docs/BENCHMARKS.md, "h2c per request"), the largest part of the gap
//! to HAProxy (32k).
//!
//! INTERFACE STUB (lead, 2026-12-07): the types and signatures below are the contract between
//! the codec/driver (branch `h2codec`, which owns this directory and fills it in) and the
//! proxy's glue (branch `h2glue`, which calls [`serve`] from `accept.rs`). Change a signature
//! only if both sides agree; the bodies are placeholders.

#![allow(
    dead_code,
    unused_variables,
    reason = "interface stub, filled in by branch h2codec"
)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::{Request, Response};
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::{BoxError, ProxyBody};

/// What our side of a connection announces and enforces.
#[derive(Clone)]
pub struct Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS; a stream past it is refused (RST_STREAM REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 §6.5.2 size: names + values + 32 per field);
    /// a request over it is answered 431 (as hyper does) or reset; the header block is still
    /// decoded (HPACK state) but not kept.
    pub max_header_list_size: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: each stream's receive window for request bodies.
    pub initial_window_size: u32,
    /// The connection's receive window (raised from 65,535 with a WINDOW_UPDATE on stream 0).
    pub connection_window_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE we accept (16,384 unless raised).
    pub max_frame_size: u32,
    /// A stream whose response waited this long for the client's flow-control window (the
    /// client reads nothing of it) is reset (CANCEL) and `on_stalled_stream` called.
    pub stalled_stream_timeout: Duration,
    pub on_stalled_stream: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Asks a connection to finish: GOAWAY with the last stream id taken, in-flight streams end,
/// then the connection closes. Cloneable; the glue keeps one per connection.
#[derive(Clone, Default)]
pub struct Shutdown {}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
    /// Graceful: no new streams (GOAWAY NO_ERROR), in-flight ones finish.
    pub fn graceful(&self) {
        todo!("h2codec")
    }
}

/// How a connection ended badly (a connection error we sent GOAWAY for, or I/O).
#[derive(Debug)]
pub struct Error {}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HTTP/2 connection error")
    }
}

impl std::error::Error for Error {}

/// A request's body as the client sends it: DATA frames, then trailers if any. Reading it
/// gives the client window back (WINDOW_UPDATE). A client's RST_STREAM is an error here.
pub struct RecvBody {}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        todo!("h2codec")
    }

    fn is_end_stream(&self) -> bool {
        todo!("h2codec")
    }

    /// Exact when the request stated a `content-length` (checked against the DATA received).
    fn size_hint(&self) -> SizeHint {
        todo!("h2codec")
    }
}

/// Serves one HTTP/2 connection until it ends. `prefix` is what was already read from `io`
/// (it starts with, or is a prefix of, the client preface `PRI * HTTP/2.0…`); for a TLS
/// connection with ALPN `h2`, it may be empty.
///
/// Each stream's request (`http::Request` as hyper builds one: version HTTP/2, the URI from
/// `:scheme`, `:authority` and `:path`, the regular fields in its `HeaderMap`, no `host` added)
/// goes to `service` on a task of its own (`tokio::spawn`); its response (head, body frames,
/// trailers) is sent back under flow control. A response body that fails resets its stream
/// (INTERNAL_ERROR). Dropping the returned future closes the connection and aborts its
/// streams' tasks.
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
    todo!("h2codec")
}
