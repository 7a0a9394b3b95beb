//! One stream's task side: the request body as the service reads it ([`RecvBody`]), and the
//! response as the service answers it (`respond`), both through the connection's shared
//! state ([`super::streams`]).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Response;
use hyper::body::{Body, Frame, SizeHint};

use super::frame::Reason;
use super::hpack;
use super::streams::{Queued, Recv, SharedRef, lock};
use crate::proxy::body::{BoxError, ProxyBody};

/// A response's task queues DATA while less than this waits on its stream; past it, it waits
/// for the connection task to write (the client's window to open). One body frame may be
/// larger: it is queued whole and written in pieces.
pub(super) const SEND_BUFFER: usize = 64 * 1024;

/// How a stream ended before its time, as the request body and the service see it.
#[derive(Debug)]
pub struct StreamError {
    pub(super) reason: Reason,
    pub(super) by_client: bool,
}

impl StreamError {
    /// The HTTP/2 error code (RFC 9113 §7).
    pub fn code(&self) -> u32 {
        self.reason.0
    }
    /// The client reset the stream (RST_STREAM) or closed the connection; otherwise we reset it
    /// for a fault of the client's (content-length mismatch, flow control).
    pub fn by_client(&self) -> bool {
        self.by_client
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.by_client {
            write!(f, "HTTP/2 stream reset by the client ({})", self.reason)
        } else {
            write!(f, "HTTP/2 stream error ({})", self.reason)
        }
    }
}

impl std::error::Error for StreamError {}

/// A request's body as the client sends it: DATA frames, then trailers if any. Reading it
/// gives the client window back (WINDOW_UPDATE). A client's RST_STREAM is an error here.
pub struct RecvBody {
    pub(super) shared: SharedRef,
    pub(super) id: u32,
    /// The request stated this `content-length` (checked by the connection against the
    /// DATA received).
    pub(super) content_length: Option<u64>,
    pub(super) read: u64,
    /// The end (or an error) was returned, or the request had no body (END_STREAM on its
    /// HEADERS): no lock needed to say so.
    pub(super) done: bool,
}

impl RecvBody {
    fn finish(&mut self) {
        self.done = true;
        let mut sh = lock(&self.shared);
        if let Some(s) = sh.streams.get_mut(&self.id) {
            s.body_gone = true;
            if s.finished() {
                sh.remove_stream(self.id);
            }
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut guard = lock(&this.shared);
        let sh = &mut *guard;
        let Some(s) = sh.streams.get_mut(&this.id) else {
            drop(guard);
            this.done = true;
            return Poll::Ready(Some(Err(StreamError {
                reason: Reason::CANCEL,
                by_client: true,
            }
            .into())));
        };
        if let Some(reason) = s.reset {
            let by_client = s.reset_by_client;
            drop(guard);
            this.finish();
            return Poll::Ready(Some(Err(StreamError { reason, by_client }.into())));
        }
        if let Some(data) = s.pop_recv() {
            let n = data.len() as u32;
            this.read += u64::from(n);
            sh.conn_released += n;
            let mut wake = sh.conn_released >= sh.conn_release_at || sh.conn_recv_low;
            if s.recv == Recv::Open {
                s.recv_released += n;
                if s.recv_released >= sh.stream_release_at && !s.release_queued {
                    s.release_queued = true;
                    sh.release_due.push(this.id);
                    wake = true;
                }
            }
            let waker = if wake { sh.conn_waker.take() } else { None };
            drop(guard);
            if let Some(w) = waker {
                w.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = s.recv_trailers.take() {
            drop(guard);
            this.finish();
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if s.recv == Recv::Ended {
            drop(guard);
            this.finish();
            return Poll::Ready(None);
        }
        if !s
            .body_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            s.body_waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let sh = lock(&self.shared);
        sh.streams.get(&self.id).is_some_and(|s| {
            s.reset.is_none()
                && s.recv == Recv::Ended
                && s.recv_is_empty()
                && s.recv_trailers.is_none()
        })
    }

    /// Exact when the request stated a `content-length` (checked against the DATA received).
    fn size_hint(&self) -> SizeHint {
        match self.content_length {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.read)),
            None if self.done => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut guard = lock(&self.shared);
        let sh = &mut *guard;
        let Some(s) = sh.streams.get_mut(&self.id) else {
            return;
        };
        s.body_gone = true;
        s.body_waker = None;
        // What nobody will read goes back to the connection's window.
        let unread = s.drain_recv();
        sh.conn_released += unread as u32;
        // Whatever becomes of the stream, the window given back is announced under the
        // same test as `Conn::gather` applies (enough of it, or the client short of it).
        let release = unread > 0 && (sh.conn_released >= sh.conn_release_at || sh.conn_recv_low);
        let waker = if s.finished() {
            sh.remove_stream(self.id);
            if release { sh.conn_waker.take() } else { None }
        } else if s.send_done {
            // The response is complete and the rest of the request is not wanted: the
            // connection task resets the stream with NO_ERROR (§8.1).
            sh.make_ready(self.id)
        } else if release {
            sh.conn_waker.take()
        } else {
            None
        };
        drop(guard);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// On a response's task: resets the stream (INTERNAL_ERROR) unless the whole response was
/// queued, so a service that panics or a body that fails never leaves a stream open.
struct Guard {
    shared: SharedRef,
    id: u32,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut sh = lock(&self.shared);
        let Some(s) = sh.streams.get_mut(&self.id) else {
            return;
        };
        if s.reset.is_some() {
            return;
        }
        // What was queued goes first (the head, DATA the window allows), then the reset.
        s.reset_to_send = Some(Reason::INTERNAL_ERROR);
        let waker = sh.make_ready(self.id);
        drop(sh);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Queues frames on the stream; false when it is gone or reset (stop answering).
fn push(shared: &SharedRef, id: u32, head: Option<BytesMut>, item: Option<Queued>) -> bool {
    let mut guard = lock(shared);
    let sh = &mut *guard;
    let Some(s) = sh.streams.get_mut(&id) else {
        return false;
    };
    if s.reset.is_some() {
        return false;
    }
    if s.queue.capacity() == 0
        && let Some(spare) = sh.spare_queues.pop()
    {
        s.queue = spare;
    }
    if let Some(block) = head {
        s.queue.push_back(Queued::Head { block, end: false });
    }
    if let Some(item) = item {
        if let Queued::Data { data, .. } = &item {
            s.queued += data.len();
        }
        s.queue.push_back(item);
    }
    let waker = sh.make_ready(id);
    drop(guard);
    if let Some(w) = waker {
        w.wake();
    }
    true
}

/// Waits until the stream has room for more DATA; false when it is gone or reset.
fn poll_room(shared: &SharedRef, id: u32, cx: &mut Context<'_>) -> Poll<bool> {
    let mut sh = lock(shared);
    let Some(s) = sh.streams.get_mut(&id) else {
        return Poll::Ready(false);
    };
    if s.reset.is_some() {
        return Poll::Ready(false);
    }
    if s.queued < SEND_BUFFER {
        return Poll::Ready(true);
    }
    if !s
        .send_waker
        .as_ref()
        .is_some_and(|w| w.will_wake(cx.waker()))
    {
        s.send_waker = Some(cx.waker().clone());
    }
    Poll::Pending
}

enum Next {
    Frame(Option<Result<Frame<Bytes>, BoxError>>),
    Stop,
}

/// A stream's task: runs the service's future, then queues its response (head, DATA,
/// trailers) for the connection task. `head_only`: a HEAD request, whose response has no DATA.
/// `block`: an empty buffer of the connection's for the response head (its allocation is
/// reused from stream to stream).
pub(super) async fn respond<F>(
    shared: SharedRef,
    id: u32,
    head_only: bool,
    mut block: BytesMut,
    service: F,
) where
    F: Future<Output = Response<ProxyBody>>,
{
    let mut guard = Guard {
        shared,
        id,
        done: false,
    };
    let response = service.await;
    let (parts, mut body) = response.into_parts();
    block.reserve(64 + 32 * parts.headers.len());
    let added = hpack::Added::for_response(
        parts.status,
        &parts.headers,
        body.size_hint(),
        head_only || body.is_end_stream(),
    );
    hpack::encode_response(parts.status, &parts.headers, added, &mut block);
    let shared = guard.shared.clone();
    if head_only || body.is_end_stream() {
        guard.done = true;
        push(&shared, id, None, Some(Queued::Head { block, end: true }));
        return;
    }
    // The head waits for the first body frame when that is ready at once (one wake of the
    // connection for both), and goes alone when the body is not ready.
    let mut head = Some(block);
    loop {
        let next = poll_fn(|cx| {
            if head.is_none() {
                match poll_room(&shared, id, cx) {
                    Poll::Ready(true) => {}
                    Poll::Ready(false) => return Poll::Ready(Next::Stop),
                    Poll::Pending => return Poll::Pending,
                }
            }
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Next::Frame(frame)),
                Poll::Pending => {
                    if let Some(block) = head.take()
                        && !push(&shared, id, Some(block), None)
                    {
                        return Poll::Ready(Next::Stop);
                    }
                    Poll::Pending
                }
            }
        })
        .await;
        let frame = match next {
            Next::Stop => {
                // Reset (by the client, or for a stall): nothing more to send.
                guard.done = true;
                return;
            }
            Next::Frame(None) => {
                guard.done = true;
                let item = match head.take() {
                    Some(block) => Queued::Head { block, end: true },
                    None => Queued::Data {
                        data: Bytes::new(),
                        end: true,
                    },
                };
                push(&shared, id, None, Some(item));
                return;
            }
            // The guard resets the stream (INTERNAL_ERROR).
            Next::Frame(Some(Err(_))) => return,
            Next::Frame(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if data.is_empty() && !end {
                    continue;
                }
                if end {
                    guard.done = true;
                }
                if !push(&shared, id, head.take(), Some(Queued::Data { data, end })) || end {
                    guard.done = true;
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let mut t = BytesMut::with_capacity(32 * trailers.len() + 16);
                    hpack::encode_fields(&trailers, &mut t);
                    guard.done = true;
                    push(&shared, id, head.take(), Some(Queued::Trailers(t.freeze())));
                    return;
                }
            }
        }
    }
}
