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
use std::sync::{Arc, Mutex, OnceLock};
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
    // Dropped with the answer (or here, when there is none, or at the deadline): the request
    // stream stops.
    let (ended, ended_rx) = oneshot::channel::<()>();
    let hooks = Hooks {
        refused: refused.clone(),
        limit: st.config.max_body,
        unsent: Arc::new(Mutex::new(None)),
    };
    let outbound = hooks.outbound(Unsent {
        inner: incoming,
        ended: Some(ended_rx),
    });
    let sent = invoke::send(
        st,
        app_id,
        parts.method,
        &path,
        parts.headers,
        RequestBody::Streaming(outbound),
        deadline,
        Some(&hooks),
    )
    .await;
    // (Holds the caller's stream only between a connect failure and the next attempt.)
    drop(hooks.unsent.lock().expect("not poisoned").take());
    match sent {
        Ok(res) => res.map(|inner| {
            let target = Arc::new(Mutex::new(Some(Target {
                body: inner,
                _ended: ended,
            })));
            // The deadline fires on its own, not only when hyper polls the answer (it does
            // not while the caller's window is full): the target's stream is cancelled on
            // time, and the caller gets `DEADLINE_EXCEEDED` as soon as it reads again.
            let gone = deadline.map(|d| {
                let (gone, gone_rx) = oneshot::channel::<()>();
                let target = Arc::downgrade(&target);
                let app_id = app_id.to_string();
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep_until(d) => {
                            let cut = target.upgrade().and_then(|t| t.lock().expect("not poisoned").take());
                            if cut.is_some() {
                                tracing::debug!(app_id, "proxied gRPC call past its deadline: the target's stream cancelled");
                            }
                        }
                        _ = gone_rx => {}
                    }
                });
                gone
            });
            axum::body::Body::new(Answer {
                target,
                deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                refused,
                app_id: app_id.to_string(),
                _gone: gone,
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

/// The caller's request stream, not yet read by any attempt.
struct Unsent {
    inner: Incoming,
    /// Resolves (the sender dropped) when the answer is gone: ended early, cut at the
    /// deadline, or dropped by a caller that went away.
    ended: Option<oneshot::Receiver<()>>,
}

/// What [`invoke::send`] asks of the call's request stream.
struct Hooks {
    refused: Arc<OnceLock<Status>>,
    limit: usize,
    /// Where an attempt that dropped the stream unread (a connect failure) leaves it.
    unsent: Arc<Mutex<Option<Unsent>>>,
}

impl Hooks {
    fn outbound(&self, unsent: Unsent) -> body::ProxyBody {
        Outbound {
            stream: Some(unsent),
            limit: self.limit,
            framing: Framing::default(),
            refused: self.refused.clone(),
            read: false,
            unsent: self.unsent.clone(),
        }
        .boxed()
    }
}

impl invoke::Streamed for Hooks {
    /// A message refused before the callee answered is the caller's doing.
    fn caller_fault(&self) -> bool {
        self.refused.get().is_some()
    }

    fn again(&self) -> Option<body::ProxyBody> {
        let unsent = self.unsent.lock().expect("not poisoned").take()?;
        Some(self.outbound(unsent))
    }
}

/// The target's side of a call: its answer's body, and (dropped with it) the signal that
/// stops the request stream. Dropping it cancels the target's stream.
struct Target {
    body: ProxyBody,
    _ended: oneshot::Sender<()>,
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
/// stream (RST_STREAM). Dropped unread (the attempt could not connect), it leaves the stream
/// for the next attempt ([`Hooks::again`]).
struct Outbound {
    stream: Option<Unsent>,
    limit: usize,
    framing: Framing,
    /// The status the call ends with when this body refused a message.
    refused: Arc<OnceLock<Status>>,
    /// Polled at least once: a connection took it, so it is never sent again.
    read: bool,
    unsent: Arc<Mutex<Option<Unsent>>>,
}

impl Drop for Outbound {
    fn drop(&mut self) {
        if !self.read
            && let Some(unsent) = self.stream.take()
        {
            *self.unsent.lock().expect("not poisoned") = Some(unsent);
        }
    }
}

impl Body for Outbound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.read = true;
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(ended) = stream.ended.as_mut()
            && Pin::new(ended).poll(cx).is_ready()
        {
            stream.ended = None;
            return Poll::Ready(Some(Err("the call ended".into())));
        }
        match Pin::new(&mut stream.inner).poll_frame(cx) {
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
        self.stream.as_ref().is_none_or(|s| s.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.stream
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |s| s.inner.size_hint())
    }
}

/// The target's answer on its way to the caller: frames pass as they come, up to the
/// caller's deadline. A stream cut short (the deadline, a refused message, the target's
/// stream broken) ends with trailers that say why, and drops the target's stream.
///
/// The deadline is seen here when hyper polls this body (whenever it waits for the next
/// frame), and by a timer of its own ([`forward`]) that cancels the target's stream on time
/// even when hyper does not poll (a caller that stopped reading, no HTTP/2 window left): that
/// caller then gets `DEADLINE_EXCEEDED` when it reads again or goes away (its own gRPC
/// library cancels at its deadline anyway).
struct Answer {
    /// `None` once the deadline's timer cut it.
    target: Arc<Mutex<Option<Target>>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    refused: Arc<OnceLock<Status>>,
    app_id: String,
    /// Dropped with the answer: the deadline's timer ends.
    _gone: Option<oneshot::Sender<()>>,
    done: bool,
}

impl Answer {
    /// Ends the answer with `status` in its trailers, dropping the target's stream.
    fn end_with(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::debug!(app_id = self.app_id, code = ?status.code(), "proxied gRPC call cut short: {}", status.message());
        self.done = true;
        drop(self.target.lock().expect("not poisoned").take());
        let mut trailers = HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(Status::GRPC_STATUS, (status.code() as i32).into());
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn past_deadline(&self) -> Status {
        Status::deadline_exceeded(format!(
            "the call's deadline (grpc-timeout) passed before {:?} finished",
            self.app_id
        ))
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
            return this.end_with(this.past_deadline());
        }
        let polled = {
            let mut target = this.target.lock().expect("not poisoned");
            target
                .as_mut()
                .map(|t| Pin::new(&mut t.body).poll_frame(cx))
        };
        match polled {
            // Cut by the deadline's timer.
            None => this.end_with(this.past_deadline()),
            Some(Poll::Ready(Some(Ok(frame)))) => {
                this.done = frame.is_trailers();
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Poll::Ready(Some(Err(e)))) => {
                let status = this.refused.get().cloned().unwrap_or_else(|| {
                    Status::unavailable(format!("the stream from {:?} broke: {e}", this.app_id))
                });
                this.end_with(status)
            }
            Some(Poll::Ready(None)) => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(Poll::Pending) => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || self
                .target
                .lock()
                .expect("not poisoned")
                .as_ref()
                .is_some_and(|t| t.body.is_end_stream())
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
