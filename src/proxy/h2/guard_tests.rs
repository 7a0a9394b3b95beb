//! Tests of the abuse guards' second reset budget (client resets before the response, of
//! streams younger than 1 s, against the streams completed), the metric label of each guard, and the
//! connection's own bounds: one stream removal, one clock read per read batch, the output and
//! header block bounds, the read buffer's size after a large frame, the close after a
//! connection error.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use tokio::io::AsyncWriteExt;

use super::conn::{
    Buffered, CALM_CLOSE_MAX, CALM_GRACE, Conn, DATA_FRAME, ERROR_CLOSE_MAX, ERROR_LINGER,
    OUT_HIGH, READ_BUF,
};
use super::frame::{self, Reason, flag, kind, setting};
use super::streams::{Queued, SharedRef, lock};
use super::tests::{In, Raw, hang_count, service, settings, u32_at};
use super::{Guard, RecvBody, Settings, Shutdown};
use crate::proxy::body::ProxyBody;

fn rst(code: Reason) -> [u8; 4] {
    code.0.to_be_bytes()
}

/// The client cancels stream `id` (RST_STREAM CANCEL).
async fn cancel(c: &mut Raw, id: u32) {
    c.send(kind::RST_STREAM, 0, id, &rst(Reason::CANCEL)).await;
}

/// A rapid reset attack: 300 GETs of `/hang`, each reset (CANCEL) right after its HEADERS,
/// in one write.
async fn send_rapid_resets(c: &mut Raw) {
    let buf = rapid_resets(c);
    c.io.write_all(&buf).await.unwrap();
}

/// 300 rapid resets (an abuse guard's error).
fn rapid_resets(c: &mut Raw) -> BytesMut {
    let mut buf = BytesMut::new();
    for i in 0..300u32 {
        let id = 1 + 2 * i;
        let b = c.block(&[(":method", "GET"), (":scheme", "http"), (":path", "/hang")]);
        frame::put_header_block(&mut buf, id, &b, true, 16_384);
        frame::put_rst(&mut buf, id, Reason::CANCEL);
    }
    buf
}

/// A protocol error (RST_STREAM on stream 0).
fn stream_zero_reset(_: &mut Raw) -> BytesMut {
    let mut buf = BytesMut::new();
    frame::put_rst(&mut buf, 0, Reason::CANCEL);
    buf
}

/// An abuse guard's close, after what the client sent was read: a GOAWAY ENHANCE_YOUR_CALM
/// (see [`sync_or_goaway`]), and `guard` named in the connection's error. `case` names the
/// case in a failure's message.
async fn expect_abuse_close(mut c: Raw, guard: Guard, case: &str) {
    assert_eq!(
        sync_or_goaway(&mut c).await.err(),
        Some(Reason::ENHANCE_YOUR_CALM),
        "{case}"
    );
    let err = c.task.await.unwrap().expect_err("an abuse guard's close");
    assert_eq!(err.abuse_guard(), Some(guard), "{case}: {err}");
}

/// Opens `/hang?KEY` on `id` and waits until its service runs (the connection read the
/// request in a read of its own). False when the connection ended meanwhile.
async fn start_hanging(c: &mut Raw, id: u32, key: &str, started_before: usize) -> bool {
    if !try_get(c, id, &format!("/hang?{key}")).await {
        return false;
    }
    let mut spins = 0u32;
    while hang_count(key, |_| {}).0 <= started_before {
        spins += 1;
        if c.task.is_finished() || spins > 100_000 {
            return false;
        }
        tokio::task::yield_now().await;
    }
    true
}

/// A GET of `path` on `id`; false when the connection is gone (its end already read).
async fn try_get(c: &mut Raw, id: u32, path: &str) -> bool {
    let b = c.block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "x"),
    ]);
    let mut buf = BytesMut::new();
    frame::put_header_block(&mut buf, id, &b, true, 16_384);
    c.io.write_all(&buf).await.is_ok()
}

/// A GET of `/` on `id`, read to its END_STREAM. The GOAWAY instead, if one came (or
/// None too when the connection is gone, which the caller's sync then tells).
async fn complete(c: &mut Raw, id: u32) -> Option<In> {
    if !try_get(c, id, "/").await {
        return None;
    }
    loop {
        let f = c.next().await.expect("the response");
        if f.head.kind == kind::GOAWAY {
            return Some(f);
        }
        if f.head.stream == id && f.head.flags & flag::END_STREAM != 0 {
            return None;
        }
    }
}

/// A PING, and what came before its ACK; the GOAWAY instead when the connection ended.
async fn sync_or_goaway(c: &mut Raw) -> Result<Vec<In>, Reason> {
    // Refused once the connection is gone: its last frames are still there to read.
    let mut ping = BytesMut::new();
    frame::put_ping(&mut ping, b"syncsync");
    let _ = c.io.write_all(&ping).await;
    let mut seen = Vec::new();
    while let Some(f) = c.next().await {
        if f.head.kind == kind::GOAWAY {
            return Err(Reason(u32_at(&f.payload[4..])));
        }
        if f.head.kind == kind::PING && &f.payload[..] == b"syncsync" {
            return Ok(seen);
        }
        seen.push(f);
    }
    panic!("the connection ended without GOAWAY: {seen:?}");
}

// ---- The second reset budget ----

on_both_paths! {
    /// A client that starts requests and cancels each once its service is at work, later than
    /// a rapid reset (20 ms), and completes none: closed (ENHANCE_YOUR_CALM) after the base
    /// allowance (max(200, 2 × 100 streams)), not before. Review finding: it was never counted,
    /// and could make ~10k upstream requests a second on one connection.
    #[tokio::test(start_paused = true)]
    async fn starting_and_cancelling_requests_closes_the_connection() {
        let mut c = Raw::start(settings()).await;
        let key = "guard-cancel-only";
        let mut closed_after = None;
        for i in 0..300u32 {
            let id = 1 + 2 * i;
            if !start_hanging(&mut c, id, key, i as usize).await {
                closed_after = Some(i);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel(&mut c, id).await;
        }
        if let Some(i) = closed_after {
            assert!(i > 200, "closed after {i} cancellations");
        }
        expect_abuse_close(c, Guard::CancelledStreams, "cancellations").await;
    }
}

on_both_paths! {
    /// A gRPC-like client that cancels many slow calls (more than the base allowance in every
    /// 10 s) while it completes about as many: kept, over several windows.
    #[tokio::test(start_paused = true)]
    async fn cancelling_slow_calls_while_others_complete_keeps_the_connection() {
        let mut c = Raw::start(settings()).await;
        let key = "guard-cancel-and-complete";
        // 20 ms apart: 500 cancellations and 500 completions per 10 s, 18 s in all.
        for i in 0..900u32 {
            let cancelled = 1 + 4 * i;
            assert!(
                start_hanging(&mut c, cancelled, key, i as usize).await,
                "closed after {i} cancellations"
            );
            if let Some(f) = complete(&mut c, cancelled + 2).await {
                panic!("closed after {i} cancellations: {f:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel(&mut c, cancelled).await;
        }
        let seen = sync_or_goaway(&mut c).await.expect("the connection kept");
        assert!(seen.iter().all(|f| f.head.kind != kind::GOAWAY), "{seen:?}");
    }
}

/// A client's traffic for [`mixed`]: after `warmup` rounds of `completions` only, `rounds` of
/// `cancels` requests started (their services at work) and `completions` GETs of `/` (a
/// cheap answer, as the proxy's own 404 for an unrouted host is), the started ones cancelled
/// once `age` old; a round every `period`.
struct Mix {
    warmup: u32,
    rounds: u32,
    cancels: u32,
    completions: u32,
    age: Duration,
    period: Duration,
}

/// Runs `m` on a new connection (paused clock). The time from the first cancellation to the
/// close (a GOAWAY ENHANCE_YOUR_CALM) and the connection's error, None when it was kept (a
/// PING answered).
async fn mixed(key: &str, m: Mix) -> Option<(Duration, super::Error)> {
    let mut c = Raw::start(settings()).await;
    let mut id = 1u32;
    let mut started = 0usize;
    let mut first_cancel = None;
    let mut goaway = None;
    let closed = |c: &Raw| c.task.is_finished();
    'rounds: for round in 0..m.warmup + m.rounds {
        let begun = tokio::time::Instant::now();
        let mut hanging = Vec::new();
        if round >= m.warmup {
            for _ in 0..m.cancels {
                if !start_hanging(&mut c, id, key, started).await {
                    break 'rounds;
                }
                started += 1;
                hanging.push(id);
                id += 2;
            }
        }
        for _ in 0..m.completions {
            if closed(&c) {
                break 'rounds;
            }
            if let Some(f) = complete(&mut c, id).await {
                goaway = Some(Reason(u32_at(&f.payload[4..])));
                break 'rounds;
            }
            id += 2;
        }
        if !hanging.is_empty() {
            tokio::time::sleep(m.age).await;
            first_cancel.get_or_insert_with(tokio::time::Instant::now);
            let mut buf = BytesMut::new();
            for &h in &hanging {
                frame::put_rst(&mut buf, h, Reason::CANCEL);
            }
            if closed(&c) || c.io.write_all(&buf).await.is_err() {
                break;
            }
        }
        tokio::time::sleep_until(begun + m.period).await;
    }
    let end = match goaway {
        Some(reason) => Err(reason),
        None => sync_or_goaway(&mut c).await.map(drop),
    };
    match end {
        Ok(()) => None,
        Err(reason) => {
            assert_eq!(reason, Reason::ENHANCE_YOUR_CALM);
            let after = first_cancel.expect("a cancellation").elapsed();
            Some((
                after,
                c.task.await.unwrap().expect_err("an abuse guard's close"),
            ))
        }
    }
}

on_both_paths! {
    /// A gRPC client on a new connection during an upstream brownout: 100 calls a second with 1 s
    /// deadlines, 65 % of them cancelled at their deadline, before any response (65 streams in
    /// flight, under the 100 allowed), the others completed. Kept: a stream 1 s old is counted by
    /// no budget. Review finding: a new connection had no credit from a window before and was
    /// closed after about 7 s, and the client's reconnection again (every call in flight lost).
    #[tokio::test(start_paused = true)]
    async fn a_new_connection_cancelling_most_of_its_slow_calls_is_kept() {
        let m = Mix {
            warmup: 0,
            rounds: 25,
            cancels: 65,
            completions: 35,
            age: Duration::from_secs(1),
            period: Duration::from_secs(1),
        };
        if let Some((after, err)) = mixed("guard-brownout", m).await {
            panic!("closed {after:?} after the first cancellation: {err}");
        }
    }
}

on_both_paths! {
    /// Three cancellations of 20 ms calls per completion of a cheap request, on a connection
    /// that completed 200 requests before: closed within 10 s of the first cancellation (after
    /// the base 200 and one per completion in the window: about 300 cancellations, 6.7 s at 45
    /// a second). Review finding: the completions before counted in the next window too.
    #[tokio::test(start_paused = true)]
    async fn three_cancellations_of_young_calls_per_cheap_completion_close_the_connection() {
        let m = Mix {
            warmup: 100,
            rounds: 150,
            cancels: 6,
            completions: 2,
            age: Duration::from_millis(20),
            period: Duration::from_millis(133),
        };
        let (after, err) = mixed("guard-three-to-one", m).await.expect("closed");
        assert_eq!(err.abuse_guard(), Some(Guard::CancelledStreams), "{err}");
        assert!(after < Duration::from_secs(10), "closed {after:?} after");
    }
}

on_both_paths! {
    /// One cheap completion per two cancellations of 50 ms calls (60 a second), for 30 s: closed
    /// (ENHANCE_YOUR_CALM), once this window's cancellations pass 200 plus its completions.
    /// Review finding: each completion counted in two windows, so cancellations up to 200 plus
    /// twice the completions passed, and a client could start and drop about 4,500 upstream
    /// requests a second while it kept 10 streams busy with 404s.
    #[tokio::test(start_paused = true)]
    async fn one_cheap_completion_per_two_cancellations_closes_the_connection() {
        let m = Mix {
            warmup: 150,
            rounds: 450,
            cancels: 4,
            completions: 2,
            age: Duration::from_millis(50),
            period: Duration::from_millis(66),
        };
        let (after, err) = mixed("guard-two-to-one", m).await.expect("closed");
        assert_eq!(err.abuse_guard(), Some(Guard::CancelledStreams), "{err}");
        assert!(after < Duration::from_secs(30), "closed {after:?} after");
    }
}

on_both_paths! {
    multi_thread;
    /// The rapid-reset guard closes first, and says so.
    #[tokio::test]
    async fn rapid_resets_are_told_apart_from_late_cancellations() {
        let mut c = Raw::start(settings()).await;
        send_rapid_resets(&mut c).await;
        c.expect_goaway(Reason::ENHANCE_YOUR_CALM).await;
        let err = c.task.await.unwrap().expect_err("an abuse guard's close");
        assert_eq!(err.abuse_guard(), Some(Guard::RapidReset), "{err}");
    }
}

// ---- One clock read per read batch ----

on_both_paths! {
    /// A read batch of late client resets (streams 20 ms old: the second budget's count, the
    /// remembered ids) and empty DATA frames (the empty-frame guard's window) reads the clock
    /// once, not once per frame (the sites this per-turn clock changed: `Flood::hit`,
    /// `Cancels::hit`, `reset_lately`).
    #[tokio::test(start_paused = true)]
    async fn a_batch_of_late_resets_and_empty_frames_reads_the_clock_once() {
        use crate::proxy::h2::conn::CLOCK_READS;
        let mut c = Raw::start(settings()).await;
        let key = "guard-clock";
        for i in 0..50u32 {
            assert!(start_hanging(&mut c, 1 + 2 * i, key, i as usize).await);
        }
        // A request whose body stays open, for the empty DATA frames.
        let b = c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/hang")]);
        c.send(kind::HEADERS, flag::END_HEADERS, 101, &b).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = BytesMut::new();
        for i in 0..50u32 {
            frame::put_rst(&mut buf, 1 + 2 * i, Reason::CANCEL);
            frame::put_head(&mut buf, 0, kind::DATA, 0, 101);
        }
        frame::put_ping(&mut buf, b"syncsync");
        CLOCK_READS.with(|n| n.set(0));
        c.io.write_all(&buf).await.unwrap();
        loop {
            let f = c.next().await.expect("the PING's ACK");
            assert_ne!(f.head.kind, kind::GOAWAY, "{f:?}");
            if f.head.kind == kind::PING {
                break;
            }
        }
        assert_eq!(CLOCK_READS.with(|n| n.get()), 1);
    }
}

// ---- The close after a connection error ----

/// Frames from a client that keeps writing after our GOAWAY (not read).
async fn keep_writing(c: &mut Raw) {
    let mut buf = BytesMut::new();
    for _ in 0..10 {
        frame::put_ping(&mut buf, b"stillon!");
    }
    let _ = c.io.write_all(&buf).await;
}

/// Reads to the GOAWAY; its code.
async fn goaway_code(c: &mut Raw) -> Reason {
    loop {
        let f = c.next().await.expect("GOAWAY");
        if f.head.kind == kind::GOAWAY {
            return Reason(u32_at(&f.payload[4..]));
        }
    }
}

on_both_paths! {
    /// An abuse guard's close (ENHANCE_YOUR_CALM) is at once, whatever the client still sends;
    /// another connection error lingers 500 ms (reading and dropping the client's input, so the
    /// close is no TCP reset that could destroy the GOAWAY). On the paused clock: a linger's
    /// timer would fire after the test's own short one.
    #[tokio::test(start_paused = true)]
    async fn an_abuse_close_is_at_once_and_other_errors_linger() {
        let mut c = Raw::start(settings()).await;
        send_rapid_resets(&mut c).await;
        assert_eq!(goaway_code(&mut c).await, Reason::ENHANCE_YOUR_CALM);
        keep_writing(&mut c).await;
        let end = tokio::time::timeout(Duration::from_millis(1), &mut c.task).await;
        let err = end
            .expect("closed at once")
            .unwrap()
            .expect_err("an abuse guard's close");
        assert_eq!(err.abuse_guard(), Some(Guard::RapidReset), "{err}");

        let mut c = Raw::start(settings()).await;
        c.send(kind::RST_STREAM, 0, 0, &rst(Reason::CANCEL)).await;
        assert_eq!(goaway_code(&mut c).await, Reason::PROTOCOL_ERROR);
        keep_writing(&mut c).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(400), &mut c.task)
                .await
                .is_err(),
            "closed before the linger's end"
        );
        keep_writing(&mut c).await;
        let end = tokio::time::timeout(Duration::from_millis(200), &mut c.task).await;
        let err = end
            .expect("closed after the linger")
            .unwrap()
            .expect_err("an error");
        assert_eq!(err.abuse_guard(), None, "{err}");
    }
}

/// Connection errors to a client that reads nothing, its pipe full of our PING ACKs (the
/// output still under its bound, so input is read), the GOAWAY stuck behind them: an abuse
/// guard's close ends within [`CALM_GRACE`], another error's within [`ERROR_LINGER`], with
/// what did not fit dropped. Review MINOR 5: both waited for the client for good (in the
/// proxy, until the idle timeout's stall watch cut the connection and counted a stall, not
/// the guard).
#[tokio::test(start_paused = true)]
async fn a_close_does_not_wait_for_a_client_that_reads_nothing() {
    type Make = fn(&mut Raw) -> BytesMut;
    let cases: [(Make, Duration, Option<Guard>); 2] = [
        (rapid_resets, CALM_GRACE, Some(Guard::RapidReset)),
        (stream_zero_reset, ERROR_LINGER, None),
    ];
    for (make, bound, guard) in cases {
        let (mut c, _, seen) = start_watched(settings(), &[], 4096, service).await;
        // 6.8 KiB of PING ACKs: more than the pipe takes, less than the output's bound.
        let mut buf = BytesMut::new();
        for _ in 0..400 {
            frame::put_ping(&mut buf, b"fillfill");
        }
        buf.extend_from_slice(&make(&mut c));
        let started = tokio::time::Instant::now();
        // Taken while the connection reads; it stops at its error (then the write fails or,
        // on the old code, waits out this timeout).
        let _ = tokio::time::timeout(Duration::from_secs(60), c.io.write_all(&buf)).await;
        let end = tokio::time::timeout(Duration::from_secs(60), &mut c.task).await;
        let err = end
            .unwrap_or_else(|_| panic!("still open after 60 s (guard {guard:?})"))
            .unwrap()
            .expect_err("a connection error");
        assert_eq!(err.abuse_guard(), guard, "{err}");
        assert!(err.goaway_unsent(), "{err}");
        // One tick (1 ms) over: the paused clock lands on the timer's tick, not before it.
        assert!(
            started.elapsed() <= bound + Duration::from_millis(1),
            "closed {:?} after ({err})",
            started.elapsed()
        );
        let left = seen.lock().unwrap().last.out;
        assert!(left > 0, "the GOAWAY was never stuck ({err})");
    }
}

/// A connection error after 2,000 PINGs on a 4 KiB pipe (34 KB of ACKs queued before the
/// GOAWAY, under the output's bound), then a client that reads `chunk` bytes every 50 ms
/// until the end: what it read (in `c.buf`), the connection's end, and how long after the
/// error it came (seen at a read: 50 ms late at most; the reader may still be taking what
/// the pipe holds).
async fn close_to_slow_reader(
    make: fn(&mut Raw) -> BytesMut,
    chunk: usize,
) -> (Raw, Result<(), super::Error>, Duration) {
    let (mut c, _, _) = start_watched(settings(), &[], 4096, service).await;
    let mut buf = BytesMut::new();
    for _ in 0..2000 {
        frame::put_ping(&mut buf, b"fillfill");
    }
    buf.extend_from_slice(&make(&mut c));
    c.io.write_all(&buf).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut scratch = vec![0u8; chunk];
    let mut ended = None;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if ended.is_none() && c.task.is_finished() {
            ended = Some(started.elapsed());
        }
        match tokio::io::AsyncReadExt::read(&mut c.io, &mut scratch).await {
            Ok(0) | Err(_) => break,
            Ok(n) => c.buf.extend_from_slice(&scratch[..n]),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no end");
    }
    let end = (&mut c.task).await.unwrap();
    let took = ended.unwrap_or_else(|| started.elapsed());
    (c, end, took)
}

/// A client that reads slowly but steadily (2 KiB every 50 ms: 34 KB in about 850 ms, far
/// over [`CALM_GRACE`] and [`ERROR_LINGER`]) gets its GOAWAY whole after the ACKs queued
/// before it: the close's wait is re-armed by each write that moves our bytes (review
/// MINORs 1+2: it was a fixed 100 ms / 500 ms in all, and such a client, a bulk download on a
/// slow link, was cut mid-frame without the GOAWAY).
#[tokio::test(start_paused = true)]
async fn a_close_waits_for_a_client_that_reads_slowly_but_steadily() {
    type Make = fn(&mut Raw) -> BytesMut;
    let cases: [(Make, Reason, Option<Guard>); 2] = [
        (
            rapid_resets,
            Reason::ENHANCE_YOUR_CALM,
            Some(Guard::RapidReset),
        ),
        (stream_zero_reset, Reason::PROTOCOL_ERROR, None),
    ];
    for (make, code, guard) in cases {
        let (mut c, end, took) = close_to_slow_reader(make, 2048).await;
        let err = end.expect_err("a connection error");
        assert_eq!(err.abuse_guard(), guard, "{err}");
        assert!(!err.goaway_unsent(), "{err} after {took:?}");
        let mut pings = 0;
        let mut goaway = None;
        while let Some(f) = c.next().await {
            assert!(goaway.is_none(), "a frame after the GOAWAY ({err})");
            match f.head.kind {
                kind::PING => pings += 1,
                kind::GOAWAY => goaway = Some(Reason(u32_at(&f.payload[4..]))),
                _ => {}
            }
        }
        assert!(
            c.buf.is_empty(),
            "{} bytes of a cut frame ({err})",
            c.buf.len()
        );
        assert_eq!(goaway, Some(code), "{err} after {took:?}");
        assert_eq!(pings, 2000, "{err}");
    }
}

/// A client that takes a little now and then (64 bytes every 50 ms) never lets the grace run
/// out, and is still dropped at the close's cap ([`CALM_CLOSE_MAX`], [`ERROR_CLOSE_MAX`]),
/// not before it and not much after.
#[tokio::test(start_paused = true)]
async fn a_close_to_a_trickling_client_ends_at_its_cap() {
    type Make = fn(&mut Raw) -> BytesMut;
    let cases: [(Make, Duration, Option<Guard>); 2] = [
        (rapid_resets, CALM_CLOSE_MAX, Some(Guard::RapidReset)),
        (stream_zero_reset, ERROR_CLOSE_MAX, None),
    ];
    for (make, cap, guard) in cases {
        let (_, end, took) = close_to_slow_reader(make, 64).await;
        let err = end.expect_err("a connection error");
        assert_eq!(err.abuse_guard(), guard, "{err}");
        assert!(err.goaway_unsent(), "{err} after {took:?}");
        assert!(err.to_string().ends_with(" (GOAWAY unsent)"), "{err}");
        // Seen at the reader's next read: 50 ms late at most, and a tick.
        assert!(
            took >= cap && took <= cap + Duration::from_millis(51),
            "closed {took:?} after ({err})"
        );
    }
}

// ---- A connection polled here: its state in view ----

/// What a connection polled by [`start_watched`] held: the largest of each (`max`) and the
/// last (`last`).
#[derive(Default)]
struct Seen {
    max: Buffered,
    last: Buffered,
}

/// A raw client on a connection polled by the test itself (not through `serve`): its shared
/// state and its buffers are in view. `pipe`: the in-memory pipe's size; `client_settings`:
/// the client's SETTINGS. The handshake is done (our SETTINGS acknowledged, and theirs).
async fn start_watched<S, F>(
    settings: Settings,
    client_settings: &[(u16, u32)],
    pipe: usize,
    service: S,
) -> (Raw, SharedRef, Arc<Mutex<Seen>>)
where
    S: FnMut(Request<RecvBody>) -> F + Send + 'static,
    F: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let (a, b) = tokio::io::duplex(pipe);
    let shutdown = Shutdown::new();
    let mut conn = Conn::new(b, Bytes::new(), settings, shutdown.clone(), service);
    let shared = conn.shared();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let task = tokio::spawn(async move {
        poll_fn(|cx| {
            let r = conn.poll_conn(cx);
            let b = conn.buffered();
            let mut s = s2.lock().unwrap();
            s.max.out = s.max.out.max(b.out);
            s.max.read_alloc = s.max.read_alloc.max(b.read_alloc);
            s.last = b;
            r
        })
        .await
    });
    let mut c = Raw::new(a, task, shutdown);
    let mut hello = BytesMut::from(&frame::PREFACE[..]);
    frame::put_settings(&mut hello, client_settings);
    c.io.write_all(&hello).await.unwrap();
    loop {
        let f = c.next().await.expect("the handshake");
        if f.head.kind == kind::SETTINGS && f.head.flags & flag::ACK == 0 {
            c.send(kind::SETTINGS, flag::ACK, 0, &[]).await;
        } else if f.head.kind == kind::SETTINGS {
            break;
        }
    }
    (c, shared, seen)
}

/// Takes the request body and never answers.
async fn holds_the_body(req: Request<RecvBody>) -> Response<ProxyBody> {
    let _body = req.into_body();
    std::future::pending::<()>().await;
    unreachable!()
}

// ---- One removal for finished streams ----

on_both_paths! {
    both_runtimes;
    /// A stream that finishes on the client's last DATA, or on its trailers, leaves its send
    /// queue for the next stream, as one that finishes anywhere else does (review finding: those
    /// two removed it without keeping its queue).
    #[tokio::test]
    async fn streams_finished_by_request_data_or_trailers_leave_their_send_queue() {
        let (mut c, shared, _) = start_watched(settings(), &[], 1 << 20, holds_the_body).await;
        for id in [1, 3] {
            let b = c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]);
            c.send(kind::HEADERS, flag::END_HEADERS, id, &b).await;
        }
        c.sync().await;
        {
            // The response is all written and nobody reads the body any more; the send queue
            // was used (a response's head and body went through it).
            let mut sh = lock(&shared);
            for id in [1, 3] {
                let s = sh.streams.get_mut(&id).expect("open");
                s.send_done = true;
                s.body_gone = true;
                s.queue.push_back(Queued::Trailers(Bytes::new()));
                s.queue.clear();
            }
            assert!(sh.spare_queues.is_empty());
        }
        c.send(kind::DATA, flag::END_STREAM, 1, b"end").await;
        let trailers = c.block(&[("x-t", "1")]);
        c.send(
            kind::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            3,
            &trailers,
        )
        .await;
        c.sync().await;
        let sh = lock(&shared);
        assert!(sh.streams.is_empty());
        assert_eq!(sh.spare_queues.len(), 2);
    }
}

// ---- The output's bound ----

on_both_paths! {
    /// A client that accepts 16 MiB frames and opens its windows wide, then reads nothing:
    /// the output stops at its bound and one frame of ours (16 KiB), not one of the client's
    /// size (review finding: one 1 MiB frame went past it).
    #[tokio::test(start_paused = true)]
    async fn the_output_bound_holds_whatever_frame_size_the_client_accepts() {
        let client = [
            (setting::MAX_FRAME_SIZE, frame::MAX_MAX_FRAME_SIZE),
            (setting::INITIAL_WINDOW_SIZE, (1 << 31) - 1),
        ];
        let (mut c, _, seen) = start_watched(settings(), &client, 16 * 1024, service).await;
        c.send(
            kind::WINDOW_UPDATE,
            0,
            0,
            &((1u32 << 31) - 1 - 65_535).to_be_bytes(),
        )
        .await;
        c.get(1, "/big").await;
        // The paused clock moves once every task waits: the connection waits for the client.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let max = seen.lock().unwrap().max.out;
        // Filled (less what the pipe took), and not past the bound by more than one of our frames.
        assert!(max > OUT_HIGH - 16 * 1024 - DATA_FRAME, "{max}");
        assert!(
            max <= OUT_HIGH + DATA_FRAME + 9,
            "{max} bytes of output waited for the client"
        );
    }
}

// ---- One size rule for header blocks ----

on_both_paths! {
    both_runtimes;
    /// A header block longer than the header list size + 16 KiB closes the connection whether it
    /// came in one HEADERS frame (a client that may send large frames) or with CONTINUATION
    /// frames (review finding: in one frame it was decoded, and answered 431).
    #[tokio::test]
    async fn a_header_block_too_long_closes_the_connection_in_one_frame_or_many() {
        let mut s = settings();
        s.max_header_list_size = 1024;
        s.max_frame_size = 64 * 1024;
        for in_one_frame in [true, false] {
            let mut c = Raw::start(s.clone()).await;
            let value = "v".repeat(20_000);
            let b = c.block(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("x-big", &value),
            ]);
            assert!(b.len() > 1024 + 16 * 1024);
            let mut out = BytesMut::new();
            frame::put_header_block(
                &mut out,
                1,
                &b,
                true,
                if in_one_frame { 64 * 1024 } else { 16_384 },
            );
            c.io.write_all(&out).await.unwrap();
            let case = format!("in one frame: {in_one_frame}");
            expect_abuse_close(c, Guard::HeaderBlock, &case).await;
        }
    }
}

// ---- The read buffer after a large frame ----

/// A frame larger than the read buffer makes it grow; once it is read, the buffer goes back
/// to its usual size (review finding: it kept the largest frame's size for the connection's
/// life).
#[tokio::test]
async fn a_large_frame_leaves_a_read_buffer_of_the_usual_size() {
    let mut s = settings();
    s.max_frame_size = 1 << 20;
    let (mut c, _, seen) = start_watched(s, &[], 1 << 20, service).await;
    // An unknown frame (ignored) of 1,000,000 bytes.
    c.send(0xfa, 0, 0, &vec![0u8; 1_000_000]).await;
    c.sync().await;
    // (The large buffer was taken and let go within polls: only the last size is seen.)
    assert_eq!(seen.lock().unwrap().last.read_alloc, READ_BUF);
}

/// An upload of 16 KiB DATA frames (the usual frame size) whose body the service holds (its
/// slices keep the read buffer alive, so the loop's top-ups take new ones, larger than the
/// usual size): no buffer is shrunk, none of those allocations is paid twice (review
/// finding: the buffer shrank whenever it was over 16 KiB + 9, not only after a larger
/// frame).
#[tokio::test]
async fn an_upload_of_usual_frames_shrinks_no_read_buffer() {
    use super::conn::SHRINKS;
    let (mut c, _, seen) = start_watched(settings(), &[], 64 * 1024, holds_the_body).await;
    SHRINKS.with(|n| n.set(0));
    let b = c.block(&[(":method", "POST"), (":scheme", "http"), (":path", "/")]);
    c.send(kind::HEADERS, flag::END_HEADERS, 1, &b).await;
    for _ in 0..40 {
        c.send(kind::DATA, 0, 1, &[7u8; 16_384]).await;
    }
    c.sync().await;
    assert_eq!(SHRINKS.with(|n| n.get()), 0);
    assert!(
        seen.lock().unwrap().max.read_alloc > READ_BUF,
        "no top-up larger than usual"
    );
}
