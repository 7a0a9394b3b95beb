//! HTTP/2 response streams whose client reads nothing: reset after the idle timeout.
//!
//! On HTTP/1 a client that reads nothing fills the socket, a write waits, and the connection's
//! watcher cuts it ([`super::accept::silent_for`]). On HTTP/2 flow control hides it: a stream
//! whose window stays at zero (the client never sends WINDOW_UPDATE) stops hyper from taking
//! the response body's next frame, but the socket stays writable, so no write ever waits. Each
//! such stream held its upstream connection and buffers forever (40 connections × 200
//! streams held 8,064 descriptors and 346 MB).
//!
//! So every HTTP/2 response body is watched: hyper polls it whenever it wants a frame. A body
//! that handed hyper a frame (or none yet) and is then not polled for a whole `idle_timeout` is
//! one the client does not read; its stream task is aborted, which makes h2 reset the stream
//! (RST_STREAM CANCEL) and drops the upstream response, releasing that connection. A body
//! waiting on a slow upstream (its last poll returned `Pending`) is never cut: the upstream,
//! not the client, is quiet.
//!
//! Pieces: [`Streams::next_stream`] registers an HTTP/2 request's watch when hyper calls the
//! service, and leaves it for [`StreamExecutor`], which hyper calls next (same thread, no
//! await between) to spawn that stream's task: the watch keeps the task's [`AbortHandle`];
//! [`StreamWatch::watch`] wraps the response body; [`Streams`] is a connection's list of
//! watches and its sweep, run by the connection's task once per idle period while a body is
//! in flight. (It was a task-local `Notify` polled in a `select!` around each stream: the
//! per-poll scope, the `Notify` and its allocation were ~1.5 % of an h2c request's
//! instructions, docs/BENCHMARKS.md.)

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::body::{BoxError, ProxyBody};

thread_local! {
    /// The watch of the HTTP/2 stream whose service future was just made, for the
    /// [`StreamExecutor`] call that spawns it (hyper makes both in one go, on this thread).
    static NEXT_STREAM: RefCell<Option<Arc<Watch>>> = const { RefCell::new(None) };
}

/// hyper's executor for the HTTP/2 server: spawns each stream's task on tokio; the stream's
/// watch (left by [`Streams::next_stream`]) keeps its abort handle, so that [`Streams`] can end
/// it when its client reads nothing. Other tasks hyper spawns (an extended CONNECT's upgraded
/// stream) find no watch and are spawned as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let task = tokio::spawn(fut);
        if let Some(w) = NEXT_STREAM.with_borrow_mut(Option::take) {
            let _ = w.task.set(task.abort_handle());
        }
    }
}

/// Past this many entries, finished ones are dropped before another is added (twice the
/// streams a connection may have open, so it happens at most once per 128 responses).
const FORGET_FINISHED_AT: usize = 2 * super::generation::MAX_STREAMS_PER_CONNECTION as usize;

/// One HTTP/2 stream's watch.
struct Watch {
    /// Polls of the body by hyper.
    polls: AtomicU64,
    /// hyper owes the body a poll: it has not polled yet, or its last poll returned a frame.
    /// (After `Pending` the body waits on its upstream, and the upstream wakes hyper.)
    owed: AtomicBool,
    /// The body ended or was dropped (or the request ended without one).
    done: AtomicBool,
    /// Polls seen by the previous sweep (`u64::MAX`: no sweep yet).
    swept: AtomicU64,
    /// Ends the stream's task.
    task: OnceLock<AbortHandle>,
}

/// A connection's in-flight HTTP/2 response bodies.
#[derive(Default)]
pub struct Streams {
    watched: Mutex<Vec<Arc<Watch>>>,
    /// The list went from empty to not: the sweeps start again.
    busy: Notify,
}

/// An HTTP/2 request's watch, until its response body takes it ([`StreamWatch::watch`]);
/// dropped without a body (the request's future was dropped), the watch is done.
pub struct StreamWatch(Option<Arc<Watch>>);

impl StreamWatch {
    /// `body`, watched: hyper owes it a poll from now on (the next sweep starts its period).
    pub fn watch(mut self, body: ProxyBody) -> ProxyBody {
        let w = self.0.take().expect("taken once");
        // `swept` before `owed` (Release), read in the other order by `sweep` (Acquire): a
        // sweep on another worker that sees `owed` also sees the fresh period.
        w.swept.store(u64::MAX, Ordering::Relaxed);
        w.owed.store(true, Ordering::Release);
        http_body_util::BodyExt::boxed(Watched { inner: body, w })
    }
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        if let Some(w) = &self.0 {
            w.done.store(true, Ordering::Relaxed);
        }
    }
}

impl Streams {
    /// The watch of an HTTP/2 request whose service future hyper is making: call it there,
    /// only for HTTP/2 requests (hyper spawns that future's stream task right after, through
    /// [`StreamExecutor`], which takes the watch).
    pub fn next_stream(&self) -> StreamWatch {
        let fresh = Watch {
            polls: AtomicU64::new(0),
            // Nothing is owed before there is a body: a request waiting on a slow upstream
            // is not a client that reads nothing.
            owed: AtomicBool::new(false),
            done: AtomicBool::new(false),
            swept: AtomicU64::new(u64::MAX),
            task: OnceLock::new(),
        };
        let mut watched = self.watched.lock().expect("not poisoned");
        // A finished watch that nothing else holds any more (its body was dropped) is taken
        // over in place: no allocation per response in steady state, and the list stays as
        // long (not empty), so its sweeps go on as they were.
        let w = if let Some(i) = watched
            .iter_mut()
            .position(|w| Arc::get_mut(w).is_some_and(|w| *w.done.get_mut()))
        {
            let w = &mut watched[i];
            *Arc::get_mut(w).expect("only the list holds it") = fresh;
            w.clone()
        } else {
            // Finished bodies leave at the next sweep, or here: a busy connection must not
            // pile up a period's worth of them (at most 100 streams are open at once).
            if watched.len() >= FORGET_FINISHED_AT {
                watched.retain(|w| !w.done.load(Ordering::Relaxed));
            }
            if watched.is_empty() {
                self.busy.notify_one();
            }
            let w = Arc::new(fresh);
            watched.push(w.clone());
            w
        };
        drop(watched);
        // hyper hands the stream's future to the executor right after calling the service (no
        // await between), which takes this; a watch left here (no task) is never reset.
        NEXT_STREAM.with_borrow_mut(|next| *next = Some(w.clone()));
        StreamWatch(Some(w))
    }

    /// Runs for the connection's life: while bodies are in flight, sweeps them once per
    /// `period`, ending each stream whose body hyper owed a poll for a whole period (so
    /// between one and two periods). Each one ended is counted in `reset`.
    pub async fn sweep_every(&self, period: Duration, reset: &Counter) {
        loop {
            self.busy.notified().await;
            loop {
                tokio::time::sleep(period).await;
                if self.sweep(reset) == 0 {
                    break;
                }
            }
        }
    }

    /// One sweep; returns how many bodies are still watched.
    fn sweep(&self, reset: &Counter) -> usize {
        let mut watched = self.watched.lock().expect("not poisoned");
        watched.retain(|w| {
            if w.done.load(Ordering::Relaxed) {
                return false;
            }
            // `owed` first (see `StreamWatch::watch`): what the last poll left.
            let owed = w.owed.load(Ordering::Acquire);
            let polls = w.polls.load(Ordering::Relaxed);
            let before = w.swept.swap(polls, Ordering::Relaxed);
            // Polls unchanged for a period and a poll still owed: the client reads nothing.
            if polls == before && owed {
                let Some(task) = w.task.get() else {
                    // No task to end (hyper did not hand this stream to our executor): keep
                    // watching rather than count a reset that did not happen.
                    return true;
                };
                tracing::debug!(
                    "the client read nothing of a response for the idle timeout; stream reset"
                );
                reset.inc();
                task.abort();
                return false;
            }
            true
        });
        watched.len()
    }
}

struct Watched {
    inner: ProxyBody,
    w: Arc<Watch>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.w.done.store(true, Ordering::Relaxed);
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        let w = &self.w;
        w.polls.fetch_add(1, Ordering::Relaxed);
        match &res {
            Poll::Pending => w.owed.store(false, Ordering::Relaxed),
            Poll::Ready(Some(Ok(_))) => w.owed.store(true, Ordering::Relaxed),
            Poll::Ready(_) => w.done.store(true, Ordering::Relaxed),
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

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    /// A body hyper polled and got a frame from, then never polled again, is ended after one
    /// or two sweeps (its stream's task is aborted); a body waiting on its upstream
    /// (`Pending`) is not, nor is a request with no body yet.
    #[tokio::test]
    async fn a_body_owed_a_poll_for_a_period_ends_its_stream() {
        let streams = Arc::new(Streams::default());
        let reset = Counter::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (alive, ended) = tokio::sync::oneshot::channel::<()>();
        let waiting = streams.next_stream();
        let no_body_yet = streams.next_stream();
        // The stream whose task is spawned next: hyper makes its watch, then spawns it.
        let stalled = streams.next_stream();
        StreamExecutor.execute_stream(async move {
            let _alive = alive;
            let stalled = stalled.watch(super::super::body::full("x"));
            let (_tx2, rx2) = tokio::sync::oneshot::channel::<()>();
            let waiting = waiting.watch(http_body_util::BodyExt::boxed(
                http_body_util::StreamBody::new(futures_stream(rx2)),
            ));
            let mut stalled = std::pin::pin!(stalled);
            let mut waiting = std::pin::pin!(waiting);
            std::future::poll_fn(|cx| {
                assert!(stalled.as_mut().poll_frame(cx).is_ready());
                assert!(waiting.as_mut().poll_frame(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            let _ = tx.send(());
            std::future::pending::<()>().await;
        });
        rx.await.unwrap();
        assert_eq!(streams.sweep(&reset), 3);
        assert_eq!(streams.sweep(&reset), 2);
        assert_eq!(reset.get(), 1);
        // The stalled stream's task was aborted (the waiting body, in the same task here,
        // went with it); the request with no body yet is still watched until it ends.
        assert!(ended.await.is_err());
        assert_eq!(streams.sweep(&reset), 1);
        drop(no_body_yet);
        assert_eq!(streams.sweep(&reset), 0);
        assert_eq!(reset.get(), 1);
    }

    /// Finished bodies do not pile up between sweeps on a busy connection.
    #[tokio::test]
    async fn finished_bodies_are_forgotten_before_the_next_sweep() {
        let streams = Arc::new(Streams::default());
        for _ in 0..10_000 {
            let next = streams.next_stream();
            StreamExecutor.execute_stream(async move {
                drop(next.watch(super::super::body::empty()));
            });
            tokio::task::yield_now().await;
        }
        assert!(streams.watched.lock().unwrap().len() <= FORGET_FINISHED_AT);
        // Requests dropped before their response count as finished too.
        for _ in 0..10_000 {
            drop(streams.next_stream());
        }
        assert!(streams.watched.lock().unwrap().len() <= FORGET_FINISHED_AT);
    }

    /// One stream after another on a connection: each new body takes over the entry of the
    /// one before (dropped, so finished), instead of adding one of its own.
    #[tokio::test]
    async fn a_finished_bodys_entry_is_taken_over() {
        let streams = Arc::new(Streams::default());
        let reset = Counter::default();
        for _ in 0..10 {
            drop(streams.next_stream().watch(super::super::body::empty()));
            NEXT_STREAM.with_borrow_mut(Option::take);
        }
        let open = streams.next_stream().watch(super::super::body::full("x"));
        NEXT_STREAM.with_borrow_mut(Option::take);
        assert_eq!(streams.watched.lock().unwrap().len(), 1);
        // The entry is the open body's, not a finished one: the sweep keeps it.
        assert_eq!(streams.sweep(&reset), 1);
        drop(open);
    }

    fn futures_stream(
        rx: tokio::sync::oneshot::Receiver<()>,
    ) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        struct Once(tokio::sync::oneshot::Receiver<()>);
        impl futures_core::Stream for Once {
            type Item = Result<Frame<Bytes>, BoxError>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                Pin::new(&mut self.0).poll(cx).map(|_| None)
            }
        }
        Once(rx)
    }

    impl StreamExecutor {
        fn execute_stream(self, fut: impl Future<Output = ()> + Send + 'static) {
            hyper::rt::Executor::execute(&self, fut)
        }
    }
}
