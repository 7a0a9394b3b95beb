//! Body types of the proxy's data path.
//!
//! Request bodies up to [`REPLAY_LIMIT`] are read before forwarding when their length is known
//! or they are HTTP/1 chunked: then they can be replayed on a retry, and an invalid chunked
//! body is refused with 400 before a byte reaches the upstream. Longer or open-ended bodies
//! (gRPC streams) are forwarded as they arrive and are not retried.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::failure::Failure;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Bodies up to this size are buffered so that a retry can replay them.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// A body from hyper (or a watched one, see `min_body_rate`), boxed.
pub fn incoming<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// The error of a request body that went past `limits.max_request_body`.
#[derive(Debug)]
pub struct TooLarge(pub u64);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body is larger than {} bytes (limits.max_request_body)",
            self.0
        )
    }
}

impl std::error::Error for TooLarge {}

/// True when `e`, or an error it wraps, is a body cut at `limits.max_request_body`.
pub fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::errors::any_cause(e, |err| err.is::<TooLarge>())
}

/// `inner`, cut with [`TooLarge`] at the data frame that takes it past `limit` bytes (a body
/// without a stated length: chunked, or HTTP/2 without `content-length`); passed on as it is
/// when `limit` is None.
pub struct Capped<B> {
    inner: B,
    /// Bytes still allowed, and the limit.
    left: Option<(u64, u64)>,
    cut: Cut,
}

/// `at_end`: whether `inner` is at its end already (a GET's body), as the caller asked it
/// once (for `http2_server: outrigger`, asking takes the connection's lock); such a body has
/// nothing to cut: no shared flag, no allocation. A stale `false` only costs the flag.
pub fn capped<B: Body>(inner: B, limit: Option<u64>, at_end: bool) -> Capped<B> {
    let cut = Cut((!at_end).then(Arc::default));
    Capped {
        inner,
        left: limit.map(|l| (l, l)),
        cut,
    }
}

impl<B> Capped<B> {
    /// Says later whether the body was cut by the client's fault.
    pub fn cut(&self) -> Cut {
        self.cut.clone()
    }
}

/// Whether a [`Capped`] body was cut past its limit ([`TooLarge`]) or, within it, by a
/// `min_body_rate` error: shared, because an HTTP/2 upstream client (hyper-util's) turns a
/// body's error into a stream reset that no longer carries it, and the exchange's failure
/// must still be the client's (413 / 408), not the endpoint's. None for a body that was at
/// its end when capped: such a body yields no frame, so nothing can cut it (one allocation
/// per bodiless request less, on every path through the forward phase).
#[derive(Clone)]
pub struct Cut(Option<Arc<AtomicU8>>);

impl Cut {
    const TOO_LARGE: u8 = 1;
    const TOO_SLOW: u8 = 2;

    /// The client's failure that cut the body, if one did.
    pub fn failure(&self) -> Option<Failure> {
        match self.0.as_ref()?.load(Ordering::Relaxed) {
            Self::TOO_LARGE => Some(Failure::BodyTooLarge),
            Self::TOO_SLOW => Some(Failure::RequestTimeout),
            _ => None,
        }
    }

    fn set(&self, why: u8) {
        if let Some(flag) = &self.0 {
            flag.store(why, Ordering::Relaxed);
        }
    }
}

impl<B> Body for Capped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let (Some(Ok(frame)), Some((left, limit))) = (&res, self.left.as_mut())
            && let Some(d) = frame.data_ref()
        {
            let len = d.len() as u64;
            if len > *left {
                let limit = *limit;
                // Nothing more of it is read: the exchange ends here.
                self.left = Some((0, limit));
                self.cut.set(Cut::TOO_LARGE);
                return Poll::Ready(Some(Err(Box::new(TooLarge(limit)))));
            }
            *left -= len;
        }
        Poll::Ready(res.map(|r| {
            r.map_err(|e| {
                let e: BoxError = e.into();
                if super::min_body_rate::too_slow(&*e) {
                    self.cut.set(Cut::TOO_SLOW);
                }
                e
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as the proxy holds it.
pub enum RequestBody {
    /// Read to its end: can be sent any number of times.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Too long (or open-ended) to hold: sent once, as it arrives.
    Streaming(ProxyBody),
    /// A streaming body that was already sent.
    Taken,
}

impl RequestBody {
    /// A body for one attempt; `None` when a streaming body was already sent.
    pub fn take(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Complete {
                data,
                trailers: None,
            } if data.is_empty() => Some(empty()),
            RequestBody::Complete {
                data,
                trailers: None,
            } => Some(full(data.clone())),
            RequestBody::Complete {
                data,
                trailers: Some(t),
            } => {
                let mut frames = VecDeque::with_capacity(2);
                if !data.is_empty() {
                    frames.push_back(Frame::data(data.clone()));
                }
                frames.push_back(Frame::trailers(t.clone()));
                Some(Prefixed { frames, rest: None }.boxed())
            }
            RequestBody::Streaming(_) => match std::mem::replace(self, RequestBody::Taken) {
                RequestBody::Streaming(b) => Some(b),
                _ => None,
            },
            RequestBody::Taken => None,
        }
    }

    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Complete { .. })
    }
}

/// Reads `body` up to `limit` bytes. Returns the whole body when it ends within the limit,
/// or what was read plus the rest, as one stream. An error (an invalid chunk) is returned
/// before anything is forwarded.
pub async fn prebuffer<B>(mut body: B, limit: usize) -> Result<RequestBody, BoxError>
where
    B: Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len = 0usize;
    loop {
        if len > limit {
            return Ok(RequestBody::Streaming(
                Prefixed {
                    frames,
                    rest: Some(incoming(body)),
                }
                .boxed(),
            ));
        }
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    len += d.len();
                }
                frames.push_back(frame);
            }
        }
    }
    let mut data = BytesMut::with_capacity(len);
    let mut trailers = None;
    for f in frames {
        match f.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    Ok(RequestBody::Complete {
        data: data.freeze(),
        trailers,
    })
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<ProxyBody>,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// How a tapped body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Its last frame was sent.
    Done,
    /// Its source failed mid-body (the upstream broke it).
    Failed,
    /// Dropped before its end was seen: the client went away, unless nothing was left
    /// (`at_end`: an empty body hyper never polls).
    Dropped { at_end: bool },
}

/// What watches a body as it passes: its data frames, then how it ended (exactly once).
pub trait Tap: Send + Sync + Unpin + 'static {
    fn data(&mut self, len: u64);
    fn end(self, how: End);
}

/// `inner`, with `tap` told of each data frame and of the end. `inner` is kept as it is, not
/// boxed again: the result is the one box (an upstream's [`UpstreamBody`] is not boxed yet).
pub fn tap<B, T: Tap>(inner: B, tap: T) -> ProxyBody
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Sync + Unpin + 'static,
{
    Tapped {
        inner,
        tap: Some(tap),
    }
    .boxed()
}

struct Tapped<B: Body, T: Tap> {
    inner: B,
    tap: Option<T>,
}

impl<B: Body, T: Tap> Drop for Tapped<B, T> {
    fn drop(&mut self) {
        if let Some(t) = self.tap.take() {
            t.end(End::Dropped {
                at_end: self.inner.is_end_stream(),
            });
        }
    }
}

impl<B, T: Tap> Body for Tapped<B, T>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        let end = match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(t)) = (frame.data_ref(), self.tap.as_mut()) {
                    t.data(d.len() as u64);
                }
                None
            }
            Poll::Ready(Some(Err(_))) => Some(End::Failed),
            Poll::Ready(None) => Some(End::Done),
            Poll::Pending => None,
        };
        if let Some(how) = end
            && let Some(t) = self.tap.take()
        {
            t.end(how);
        }
        res
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body's measure: its bytes and the time to its end go to the route's metrics
/// when it ends or is dropped. It also holds `guard` (permits of the limits the request
/// counted against) until then.
pub struct Measured<G> {
    guard: G,
    started: Instant,
    bytes: u64,
    duration: Histogram,
    counter: Counter,
}

impl<G: Send + Sync + Unpin + 'static> Measured<G> {
    /// `duration` and `bytes`: the route's duration histogram and response bytes counter.
    pub fn wrap(
        inner: UpstreamBody,
        guard: G,
        started: Instant,
        duration: &Histogram,
        bytes: &Counter,
    ) -> ProxyBody {
        tap(
            inner,
            Measured {
                guard,
                started,
                bytes: 0,
                duration: duration.clone(),
                counter: bytes.clone(),
            },
        )
    }
}

impl<G: Send + Sync + Unpin + 'static> Tap for Measured<G> {
    fn data(&mut self, len: u64) {
        self.bytes += len;
    }
    fn end(self, _: End) {
        self.duration.observe(self.started.elapsed().as_secs_f64());
        self.counter.inc_by(self.bytes);
        drop(self.guard);
    }
}

/// An upstream's response body: the raw exchange's own, not boxed (the respond phase boxes it
/// once, with its measure: a box each was two allocations per response), or any other.
#[allow(
    clippy::large_enum_variant,
    reason = "the large variant is the usual one, held inline so as not to be boxed on its own"
)]
pub enum UpstreamBody {
    Raw(crate::proxy::cluster::RawBody),
    Boxed(ProxyBody),
}

impl UpstreamBody {
    /// As the body type of the rest of the proxy.
    pub fn boxed(self) -> ProxyBody {
        match self {
            UpstreamBody::Raw(b) => b.boxed(),
            UpstreamBody::Boxed(b) => b,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Raw(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Raw(b) => b.is_end_stream(),
            UpstreamBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Raw(b) => b.size_hint(),
            UpstreamBody::Boxed(b) => b.size_hint(),
        }
    }
}

/// A streamed request body whose data bytes are counted as they pass.
pub fn counted(inner: ProxyBody, counter: Counter) -> ProxyBody {
    tap(inner, Counted(counter))
}

struct Counted(Counter);

impl Tap for Counted {
    fn data(&mut self, len: u64) {
        self.0.inc_by(len);
    }
    fn end(self, _: End) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data frames of these sizes.
    fn frames(sizes: &[usize]) -> Prefixed {
        Prefixed {
            frames: sizes
                .iter()
                .map(|n| Frame::data(Bytes::from(vec![b'x'; *n])))
                .collect(),
            rest: None,
        }
    }

    #[tokio::test]
    async fn a_capped_body_passes_up_to_its_limit_and_is_cut_past_it() {
        let whole = capped(frames(&[400, 600]), Some(1000), false)
            .collect()
            .await;
        assert_eq!(whole.unwrap().to_bytes().len(), 1000);
        let e = capped(frames(&[400, 600, 1]), Some(1000), false)
            .collect()
            .await
            .unwrap_err();
        assert!(too_large(&*e), "{e}");
        assert!(e.to_string().contains("larger than 1000 bytes"), "{e}");
        let open = capped(frames(&[1 << 20]), None, false).collect().await;
        assert_eq!(open.unwrap().to_bytes().len(), 1 << 20);
    }

    /// A capped body cut past its limit says so through its `Cut` (which the forward phase
    /// reads after the body was handed to the upstream client); a body at its end when capped
    /// has no flag to share, and says nothing.
    #[tokio::test]
    async fn a_cut_is_told_through_the_shared_flag_and_an_ended_body_has_none() {
        let body = capped(frames(&[400, 600, 1]), Some(1000), false);
        let cut = body.cut();
        assert!(cut.failure().is_none());
        assert!(body.collect().await.is_err());
        assert!(matches!(cut.failure(), Some(Failure::BodyTooLarge)));
        let ended = capped(frames(&[]), Some(0), true);
        assert!(ended.cut().0.is_none());
        assert!(ended.cut().failure().is_none());
        assert!(ended.collect().await.unwrap().to_bytes().is_empty());
    }

    /// A body whose end only its caller may ask (as our HTTP/2 server's, behind the
    /// connection's lock): capping it does not ask again.
    #[test]
    fn capping_a_body_does_not_ask_it_whether_it_ended() {
        struct AskedOnce(Prefixed);
        impl Body for AskedOnce {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                Pin::new(&mut self.get_mut().0).poll_frame(cx)
            }
            fn is_end_stream(&self) -> bool {
                panic!("asked whether it ended")
            }
        }
        assert!(capped(AskedOnce(frames(&[])), None, true).cut().0.is_none());
        assert!(
            capped(AskedOnce(frames(&[1])), None, false)
                .cut()
                .0
                .is_some()
        );
    }
}
