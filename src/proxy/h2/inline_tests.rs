//! Tests of the streams served on the connection's own task (`inline`): which streams are (the
//! rule), that a slow one holds no other back, that every way a stream ends early drops its
//! future at once, that a panic costs only its stream, that shutdown waits for them, and the
//! per-poll budget. Frames in, frames out over an in-memory pipe (`tests::Raw`), on tokio's
//! paused clock where a timeout is involved.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Frame;

use super::frame::{Reason, flag, kind, setting};
use super::inline::{INLINE_BUDGET, Inline};
use super::streams::{Shared, SharedRef};
use super::tests::{In, Raw, settings, u32_at};
use super::{RecvBody, Settings};
use crate::proxy::body::{self, BoxError, ProxyBody};

/// What the test service saw: services started, and their futures (or bodies) dropped.
struct Probe {
    started: AtomicUsize,
    dropped: AtomicUsize,
    /// `/wait` answers once it gets a permit.
    gate: tokio::sync::Semaphore,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            started: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        }
    }
}

/// Counts a drop into `Probe::dropped`.
struct DropFlag(Arc<Probe>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// A response body that yields one 16 KiB frame (a response the client's window holds), then
/// nothing, and never wakes its reader: only the stream's end can drop it.
struct Endless(bool, #[allow(dead_code)] DropFlag);

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if std::mem::replace(&mut self.0, true) {
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'e'; 16 * 1024])))))
    }
}

type Service = Box<
    dyn FnMut(Request<RecvBody>) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>
        + Send,
>;

/// Every response says where its service ran: "inline" (on the connection's task, whose id
/// the service closure reads: it is called there) or "spawned". `/wait` waits for a permit
/// of `gate`, `/hang` for ever, `/panic` panics, `/endless` answers one frame and then nothing;
/// `/wait`, `/hang`, `/panic` and `/endless` count in `started`, and their drop in
/// `dropped`.
fn probe_service(probe: Arc<Probe>) -> Service {
    Box::new(move |req: Request<RecvBody>| {
        let conn_task = tokio::task::id();
        let probe = probe.clone();
        Box::pin(async move {
            let place = if tokio::task::id() == conn_task {
                "inline"
            } else {
                "spawned"
            };
            let path = req.uri().path().to_string();
            if path != "/" {
                probe.started.fetch_add(1, Ordering::SeqCst);
            }
            let flag = DropFlag(probe.clone());
            match path.as_str() {
                "/wait" => {
                    probe.gate.acquire().await.unwrap().forget();
                    drop(flag);
                }
                "/hang" => {
                    std::future::pending::<()>().await;
                    drop(flag);
                }
                "/panic" => {
                    // Not at once: after the future was first polled and went pending.
                    tokio::task::yield_now().await;
                    panic!("a service that panics (inline_tests)");
                }
                "/endless" => return Response::new(Endless(false, flag).boxed()),
                _ => std::mem::forget(flag),
            }
            Response::new(body::full(place))
        })
    })
}

async fn start(s: Settings, client: &[(u16, u32)]) -> (Raw, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    let c = Raw::start_serving(s, client, probe_service(probe.clone())).await;
    (c, probe)
}

/// Reads until `stream` ends: its body, or the code of its RST_STREAM; the other frames read
/// meanwhile (but WINDOW_UPDATEs).
async fn answer(c: &mut Raw, stream: u32) -> (Result<Vec<u8>, Reason>, Vec<In>) {
    let mut body = Vec::new();
    let mut others = Vec::new();
    loop {
        let f = c.next().await.expect("the connection is open");
        if f.head.stream != stream {
            if f.head.kind != kind::WINDOW_UPDATE {
                others.push(f);
            }
            continue;
        }
        match f.head.kind {
            kind::DATA => {
                body.extend_from_slice(&f.payload);
                if f.head.flags & flag::END_STREAM != 0 {
                    return (Ok(body), others);
                }
            }
            kind::RST_STREAM => return (Err(Reason(u32_at(&f.payload))), others),
            kind::HEADERS if f.head.flags & flag::END_STREAM != 0 => return (Ok(body), others),
            _ => {}
        }
    }
}

/// Waits for `f`, 60 s at most: a sleep between checks, not a yield, so that on the paused
/// clock the time moves (a test fails rather than spins for ever).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

/// Where `/` says a request without a body was served: inline, unless the test runs on the
/// spawned path (`on_both_paths!`) or a multi-thread runtime.
fn bodiless() -> &'static [u8] {
    if super::tests::test_path() == "inline" {
        b"inline"
    } else {
        b"spawned"
    }
}

// ---- The rule ----

/// On a current-thread runtime (the tests' and Outrigger's default), a request that ended with
/// its HEADERS is served on the connection's task; one with a body on a task of its own.
#[tokio::test]
async fn requests_without_a_body_are_served_inline_on_a_current_thread_runtime() {
    let (mut c, _) = start(settings(), &[]).await;
    c.get(1, "/").await;
    assert_eq!(answer(&mut c, 1).await.0.unwrap(), b"inline");
    let b = c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]);
    c.send(kind::HEADERS, flag::END_HEADERS, 3, &b).await;
    c.send(kind::DATA, flag::END_STREAM, 3, b"body").await;
    assert_eq!(answer(&mut c, 3).await.0.unwrap(), b"spawned");
}

/// On a multi-thread runtime every stream is spawned: one connection's streams may run on
/// several cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_spawned_on_a_multi_thread_runtime() {
    let (mut c, _) = start(settings(), &[]).await;
    c.get(1, "/").await;
    assert_eq!(answer(&mut c, 1).await.0.unwrap(), b"spawned");
}

/// The tests' switch (`inline::spawn_all`, for `on_both_paths!`): on a current-thread
/// runtime, every stream spawned while it is on, inline again once it is dropped.
#[tokio::test]
async fn the_tests_switch_spawns_every_stream_on_a_current_thread_runtime() {
    let spawned = super::inline::spawn_all();
    let (mut c, _) = start(settings(), &[]).await;
    c.get(1, "/").await;
    assert_eq!(answer(&mut c, 1).await.0.unwrap(), b"spawned");
    drop(spawned);
    let (mut c, _) = start(settings(), &[]).await;
    c.get(1, "/").await;
    assert_eq!(answer(&mut c, 1).await.0.unwrap(), b"inline");
}

/// The switch's guard restores what was set before: an inner switch dropped leaves the outer
/// one on.
#[test]
fn the_tests_switch_restores_what_was_set_before() {
    let outer = super::inline::spawn_all();
    drop(super::inline::spawn_all());
    assert!(
        super::inline::spawning_all(),
        "the outer switch is still on"
    );
    drop(outer);
    assert!(!super::inline::spawning_all());
}

// ---- Fairness ----

on_both_paths! {
    multi_thread;
    /// A stream whose service waits (a slow upstream) holds back neither a later stream nor the
    /// connection's own frames; it is answered once it can be.
    #[tokio::test]
    async fn a_slow_inline_stream_does_not_hold_back_a_fast_one() {
        let (mut c, probe) = start(settings(), &[]).await;
        c.get(1, "/wait").await;
        until("the slow service started", || {
            probe.started.load(Ordering::SeqCst) == 1
        })
        .await;
        c.get(3, "/").await;
        let (fast, others) = answer(&mut c, 3).await;
        assert_eq!(fast.unwrap(), bodiless());
        assert!(others.is_empty(), "{others:?}");
        assert!(c.sync().await.is_empty());
        probe.gate.add_permits(1);
        assert_eq!(answer(&mut c, 1).await.0.unwrap(), bodiless());
    }
}

/// At most `INLINE_BUDGET` polls per `poll_conn` call: the rest wait for the next, and the
/// task wakes itself for it (it yields); a future is polled only when woken.
#[tokio::test]
async fn inline_polls_are_bounded_per_connection_poll() {
    /// Counts its polls and stays pending; nothing wakes it.
    struct Idle(Arc<AtomicUsize>);
    impl Future for Idle {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Pending
        }
    }
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let shared = shared();
    let mut inline = Inline::new();
    assert!(inline.on());
    let n = INLINE_BUDGET as usize + 36;
    let counts: Vec<_> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    for (i, count) in counts.iter().enumerate() {
        let id = 1 + 2 * i as u32;
        let (slot, _task) = inline.reserve(id);
        inline.start(slot, id, Idle(count.clone()));
    }
    let yields = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(yields.clone());
    let mut cx = Context::from_waker(&waker);
    let polls = |counts: &[Arc<AtomicUsize>]| -> Vec<usize> {
        counts.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    };
    inline.begin();
    inline.poll(&mut cx, &shared);
    assert_eq!(polls(&counts).iter().sum::<usize>(), INLINE_BUDGET as usize);
    assert_eq!(yields.0.load(Ordering::SeqCst), 1, "the task yields");
    // The same budget for the rest of this `poll_conn` call: nothing more.
    inline.poll(&mut cx, &shared);
    assert_eq!(polls(&counts).iter().sum::<usize>(), INLINE_BUDGET as usize);
    assert_eq!(yields.0.load(Ordering::SeqCst), 2);
    // The next call: the ones left out, and only them (nothing woke the others).
    inline.begin();
    inline.poll(&mut cx, &shared);
    let all = polls(&counts);
    assert!(all.iter().all(|&p| p == 1), "{all:?}");
    assert_eq!(yields.0.load(Ordering::SeqCst), 2);
    assert_eq!(inline.live(), n);
    // All dropped (the connection's end): the slots stay, at most `SPARE_SLOTS` boxes with them.
    inline.clear();
    assert_eq!(inline.live(), 0);
    assert_eq!(inline.kept(), (n, 16));
}

fn shared() -> SharedRef {
    Arc::new(std::sync::Mutex::new(Shared::new(1, 1)))
}

// ---- Early ends drop the future at once ----

on_both_paths! {
    multi_thread;
    /// The client's RST_STREAM and a reset of ours (a zero WINDOW_UPDATE: PROTOCOL_ERROR) drop the
    /// inline stream's future; the connection goes on.
    #[tokio::test]
    async fn resets_drop_the_inline_future() {
        let (mut c, probe) = start(settings(), &[]).await;
        c.get(1, "/hang").await;
        c.get(3, "/hang").await;
        until("both services started", || {
            probe.started.load(Ordering::SeqCst) == 2
        })
        .await;
        c.send(kind::RST_STREAM, 0, 1, &Reason::CANCEL.0.to_be_bytes())
            .await;
        until("the client's reset dropped the service", || {
            probe.dropped.load(Ordering::SeqCst) == 1
        })
        .await;
        c.send(kind::WINDOW_UPDATE, 0, 3, &[0, 0, 0, 0]).await;
        c.expect_rst(3, Reason::PROTOCOL_ERROR).await;
        until("our reset dropped the service", || {
            probe.dropped.load(Ordering::SeqCst) == 2
        })
        .await;
        c.get(5, "/").await;
        assert_eq!(answer(&mut c, 5).await.0.unwrap(), bodiless());
    }
}

on_both_paths! {
    multi_thread;
    /// A reset of a stream whose inline future has ended (its response waits for the client's
    /// window) does not touch the slot's next stream; and two resets in one read each drop their
    /// own stream's future (review h2inline, SERIOUS 1).
    #[tokio::test]
    async fn a_reset_touches_only_its_own_stream_in_a_reused_slot() {
        let (mut c, probe) = start(settings(), &[(setting::INITIAL_WINDOW_SIZE, 0)]).await;
        // Stream 1's response: its HEADERS out, its body held by the window; its future ended and
        // its slot free.
        c.get(1, "/").await;
        loop {
            let f = c.next().await.expect("the connection is open");
            if f.head.stream == 1 && f.head.kind == kind::HEADERS {
                break;
            }
        }
        // Stream 3 takes the same slot.
        c.get(3, "/hang").await;
        until("the service started", || {
            probe.started.load(Ordering::SeqCst) == 1
        })
        .await;
        // RST_STREAM(3) then RST_STREAM(1), in one write.
        let mut out = BytesMut::new();
        for id in [3, 1] {
            crate::proxy::h2::frame::put_head(&mut out, 4, kind::RST_STREAM, 0, id);
            out.extend_from_slice(&Reason::CANCEL.0.to_be_bytes());
        }
        tokio::io::AsyncWriteExt::write_all(&mut c.io, &out)
            .await
            .unwrap();
        until("stream 3's reset dropped its service", || {
            probe.dropped.load(Ordering::SeqCst) == 1
        })
        .await;
    }
}

on_both_paths! {
    /// A response the client's window holds for `stalled_stream_timeout` is reset (CANCEL) and its
    /// inline future dropped.
    #[tokio::test(start_paused = true)]
    async fn the_stall_timer_drops_the_inline_future() {
        let mut s = settings();
        s.stalled_stream_timeout = Duration::from_secs(5);
        let (mut c, probe) = start(s, &[(setting::INITIAL_WINDOW_SIZE, 0)]).await;
        c.get(1, "/endless").await;
        let (end, _) = answer(&mut c, 1).await;
        assert_eq!(end.unwrap_err(), Reason::CANCEL);
        until("the stall reset dropped the body", || {
            probe.dropped.load(Ordering::SeqCst) == 1
        })
        .await;
    }
}

on_both_paths! {
    /// A connection error drops the inline futures at once, before the connection's closing
    /// linger (which may last 500 ms); so does the client's close.
    #[tokio::test(start_paused = true)]
    async fn a_connection_error_or_close_drops_the_inline_futures_at_once() {
        let (mut c, probe) = start(settings(), &[]).await;
        c.get(1, "/hang").await;
        c.get(3, "/hang").await;
        until("both services started", || {
            probe.started.load(Ordering::SeqCst) == 2
        })
        .await;
        // PING on a stream: a connection error (PROTOCOL_ERROR).
        c.send(kind::PING, 0, 1, b"12345678").await;
        loop {
            let f = c.next().await.expect("GOAWAY");
            if f.head.kind == kind::GOAWAY {
                break;
            }
        }
        // No time passes (the paused clock moves only when every task waits): at once.
        assert_eq!(probe.dropped.load(Ordering::SeqCst), 2);
        assert!(!c.task.is_finished(), "still lingering");

        let (mut c, probe) = start(settings(), &[]).await;
        c.get(1, "/hang").await;
        until("the service started", || {
            probe.started.load(Ordering::SeqCst) == 1
        })
        .await;
        tokio::io::AsyncWriteExt::shutdown(&mut c.io).await.unwrap();
        until("the client's close dropped the service", || {
            probe.dropped.load(Ordering::SeqCst) == 1
        })
        .await;
    }
}

// ---- Panics ----

on_both_paths! {
    multi_thread;
    /// A service that panics costs its stream only (INTERNAL_ERROR), as when its task was
    /// spawned: the connection and its other streams go on.
    #[tokio::test]
    async fn a_panicking_service_resets_only_its_stream() {
        let (mut c, probe) = start(settings(), &[]).await;
        c.get(1, "/wait").await;
        c.get(3, "/panic").await;
        let (end, _) = answer(&mut c, 3).await;
        assert_eq!(end.unwrap_err(), Reason::INTERNAL_ERROR);
        c.get(5, "/").await;
        assert_eq!(answer(&mut c, 5).await.0.unwrap(), bodiless());
        probe.gate.add_permits(1);
        assert_eq!(answer(&mut c, 1).await.0.unwrap(), bodiless());
        assert!(!c.task.is_finished());
    }
}

// ---- Shutdown ----

on_both_paths! {
    /// Graceful shutdown waits for the inline streams to finish (their responses whole), then
    /// closes.
    #[tokio::test(start_paused = true)]
    async fn graceful_shutdown_waits_for_inline_streams() {
        let (mut c, probe) = start(settings(), &[]).await;
        c.get(1, "/wait").await;
        until("the service started", || {
            probe.started.load(Ordering::SeqCst) == 1
        })
        .await;
        c.shutdown.graceful();
        let mut last = None;
        while last.is_none() {
            let f = c.next().await.expect("GOAWAY");
            match f.head.kind {
                kind::PING => c.send(kind::PING, flag::ACK, 0, &f.payload).await,
                kind::GOAWAY if u32_at(&f.payload) != 0x7fff_ffff => {
                    last = Some(u32_at(&f.payload))
                }
                _ => {}
            }
        }
        assert_eq!(last, Some(1));
        // Long after (the paused clock jumps while every task waits): still open for stream 1.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!c.task.is_finished());
        assert_eq!(probe.dropped.load(Ordering::SeqCst), 0);
        probe.gate.add_permits(1);
        assert_eq!(answer(&mut c, 1).await.0.unwrap(), bodiless());
        tokio::io::AsyncWriteExt::shutdown(&mut c.io).await.unwrap();
        let mut rest = BytesMut::new();
        while let Some(f) = c.next().await {
            rest.extend_from_slice(&f.payload);
        }
        c.task.await.unwrap().unwrap();
    }
}
