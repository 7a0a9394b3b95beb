//! daprd's gRPC proxying: a gRPC call to any service but Dapr's own
//! (`dapr.proto.runtime.v1.Dapr`) that carries `dapr-app-id` metadata goes to that app id (a
//! cluster, a peer of the mesh, or our own app), resolved as every invocation is
//! ([`crate::bridge::invoke`]). The call is a stream both ways: each request message is
//! forwarded as it arrives, and the target's headers, messages and trailers come back as it
//! sends them, so unary, client-, server- and bidirectional-streaming calls all work.
//!
//! In: [`super::Grpc::proxy`], from the bridge's connections (both sockets), with the caller's
//! request and its body as hyper read it. Out: [`invoke::send`] with that body wrapped in
//! [`Outbound`]; the target's answer goes back wrapped in [`Answer`].
//!
//! What the bridge adds on the way, as daprd does:
//! - each request message is at most `bridge.max_body` bytes on the wire (compressed, as its
//!   5-byte prefix says, read as it passes; not the stream's total): a larger one ends the call with `RESOURCE_EXHAUSTED`
//!   and cancels the target's stream;
//! - the caller's deadline (`grpc-timeout`, which the target gets as the time left) bounds the whole call,
//!   not only the wait for the headers: past it the call ends with `DEADLINE_EXCEEDED` and the
//!   target's stream is cancelled;
//! - a caller that cancels (RST_STREAM, or a closed connection) cancels the target's stream;
//! - a failure before the target answers is a gRPC status (trailers-only), not an HTTP page.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;
use tonic::Status;

use crate::bridge::{BridgeState, invoke};
use crate::proxy::body::{self, BoxError, ProxyBody, RequestBody};

/// Forwards one call to `app_id` and answers with the target's answer as it comes.
pub async fn forward(
    st: &BridgeState,
    app_id: &str,
    req: Request<Incoming>,
) -> Response<axum::body::Body> {
    let deadline = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| grpc_timeout(v.as_bytes()))
        .and_then(|t| tokio::time::Instant::now().checked_add(t));
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
    let (parts, incoming) = req.into_parts();
    let refused = Arc::new(OnceLock::new());
    // Dropped with the answer (or here, when there is none): the request stream stops.
    let (ended, ended_rx) = oneshot::channel::<()>();
    let outbound = Outbound {
        inner: incoming,
        limit: st.config.max_body,
        framing: Framing::default(),
        refused: refused.clone(),
        ended: Some(ended_rx),
    };
    let sent = invoke::send(
        st,
        app_id,
        parts.method,
        &path,
        parts.headers,
        RequestBody::Streaming(outbound.boxed()),
        deadline,
        // A message refused before the callee answered is the caller's doing.
        Some(&|| refused.get().is_some()),
    )
    .await;
    match sent {
        Ok(res) => res.map(|inner| {
            axum::body::Body::new(Answer {
                inner,
                deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                refused,
                app_id: app_id.to_string(),
                _ended: ended,
                done: false,
            })
        }),
        Err(e) => refused
            .get()
            .cloned()
            .unwrap_or_else(|| Status::from(e))
            .into_http(),
    }
}

/// `grpc-timeout`'s value (gRPC over HTTP/2: 1 to 8 digits, then `H`, `M`, `S`, `m`, `u` or
/// `n`). Written here: tonic parses it only inside its own transport server.
fn grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Where a request stream is in gRPC's framing: each message is a 5-byte prefix (a
/// compressed flag, then its length, big-endian) and that many bytes. Written here: only the
/// lengths matter, and tonic's decoder would read (and hold) whole messages.
#[derive(Default)]
struct Framing {
    /// The next message's prefix, `have` bytes of it read so far.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    rest: usize,
}

impl Framing {
    /// Passes `data`; `Err(length)` when a message longer than `limit` begins.
    fn pass(&mut self, mut data: &[u8], limit: usize) -> Result<(), u32> {
        while !data.is_empty() {
            if self.rest > 0 {
                let n = self.rest.min(data.len());
                self.rest -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
                if len_usize > limit {
                    return Err(len);
                }
                self.rest = len_usize;
            }
        }
        Ok(())
    }
}

/// The caller's request body on its way to the target: frames pass as they come; a message
/// over the limit, or the end of the answer, fails it, and hyper then resets the target's
/// stream (RST_STREAM).
struct Outbound {
    inner: Incoming,
    limit: usize,
    framing: Framing,
    /// The status the call ends with when this body refused a message.
    refused: Arc<OnceLock<Status>>,
    /// Resolves (the sender dropped) when the answer is gone: ended early, or dropped by a
    /// caller that went away.
    ended: Option<oneshot::Receiver<()>>,
}

impl Body for Outbound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(ended) = this.ended.as_mut()
            && Pin::new(ended).poll(cx).is_ready()
        {
            this.ended = None;
            return Poll::Ready(Some(Err("the call ended".into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(len) = this.framing.pass(data, this.limit)
                {
                    let status = Status::resource_exhausted(format!(
                        "grpc: received message larger than max ({len} vs. {})",
                        this.limit
                    ));
                    let _ = this.refused.set(status);
                    return Poll::Ready(Some(Err("a message over bridge.max_body".into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The target's answer on its way to the caller: frames pass as they come, up to the
/// caller's deadline. A stream cut short (the deadline, a refused message, the target's
/// stream broken) ends with trailers that say why, and drops the target's stream.
///
/// The deadline is seen when hyper polls this body, which it does whenever it waits for the
/// next frame; a caller that stops reading (no HTTP/2 window left) is not polled, so its call
/// ends past the deadline only once it reads again or goes away (its own gRPC library cancels
/// it at its deadline anyway).
struct Answer {
    inner: ProxyBody,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    refused: Arc<OnceLock<Status>>,
    app_id: String,
    /// Dropped with the answer: the request stream to the target stops ([`Outbound`]).
    _ended: oneshot::Sender<()>,
    done: bool,
}

impl Answer {
    /// Ends the answer with `status` in its trailers, dropping the target's stream.
    fn end_with(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::debug!(app_id = self.app_id, code = ?status.code(), "proxied gRPC call cut short: {}", status.message());
        self.done = true;
        self.inner = body::empty();
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return this.end_with(Status::deadline_exceeded(format!(
                "the call's deadline (grpc-timeout) passed before {:?} finished",
                this.app_id
            )));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.done = frame.is_trailers();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let status = this.refused.get().cloned().unwrap_or_else(|| {
                    Status::unavailable(format!("the stream from {:?} broke: {e}", this.app_id))
                });
                this.end_with(status)
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        for (v, d) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(grpc_timeout(v.as_bytes()), Some(d), "{v}");
        }
        for v in ["", "S", "5", "5s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(v.as_bytes()), None, "{v}");
        }
    }

    /// Messages are measured from their prefixes however the stream is cut into frames.
    #[test]
    fn framing_finds_each_message_whatever_the_frames() {
        let mut stream = Vec::new();
        for len in [0u32, 3, 1024, 7] {
            stream.push(0);
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend(std::iter::repeat_n(0xAB, len as usize));
        }
        for cut in [1, 2, 5, 6, 100, stream.len()] {
            let mut f = Framing::default();
            for chunk in stream.chunks(cut) {
                assert_eq!(f.pass(chunk, 1024), Ok(()), "frames of {cut}");
            }
            assert_eq!((f.have, f.rest), (0, 0), "frames of {cut}");
        }
        // One byte over, found from the prefix alone (split across frames).
        let mut f = Framing::default();
        assert_eq!(f.pass(&[0, 0, 0], 1024), Ok(()));
        assert_eq!(f.pass(&[4, 1], 1024), Err(1025));
        // A message's bytes that look like a prefix are data.
        let mut f = Framing::default();
        assert_eq!(
            f.pass(&[0, 0, 0, 0, 5, 0, 0xFF, 0xFF, 0xFF, 0xFF], 8),
            Ok(())
        );
    }
}
