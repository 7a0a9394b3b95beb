//! Tests of how the server shares what the client lets it send (the connection window, turns
//! between streams) and gives back what it lets the client send (request-body window), and of
//! the stall timer: frames in, frames out over an in-memory pipe, on tokio's paused clock
//! where a timeout is involved (it only moves when every task waits).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response};
use tokio::io::AsyncWriteExt;

use super::RecvBody;
use super::frame::{self, Reason, flag, kind};
use super::tests::{Raw, service, settings, u32_at};
use crate::proxy::body::{self, ProxyBody};

type Service = Box<
    dyn FnMut(Request<RecvBody>) -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>
        + Send,
>;

/// The tests' service with three more paths: `/hold` keeps its request body unread and never
/// answers; `/keep` hands its request body to `kept` and answers "ok" at once; `/huge` answers
/// 4 MiB in one body frame. Anything else goes to `tests::service`.
fn with_kept(kept: Arc<Mutex<Vec<RecvBody>>>) -> Service {
    Box::new(move |req: Request<RecvBody>| {
        let kept = kept.clone();
        Box::pin(async move {
            match req.uri().path() {
                "/hold" => {
                    let _req = req;
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                "/keep" => {
                    kept.lock().unwrap().push(req.into_body());
                    Response::new(body::full("ok"))
                }
                "/huge" => Response::new(body::full(vec![b'h'; 4 << 20])),
                _ => service(req).await,
            }
        })
    })
}

fn stall_counter(s: &mut super::Settings) -> Arc<AtomicUsize> {
    let stalls = Arc::new(AtomicUsize::new(0));
    let count = stalls.clone();
    s.on_stalled_stream = Some(Arc::new(move || {
        count.fetch_add(1, Ordering::SeqCst);
    }));
    stalls
}

/// HEADERS of a POST to `path`, the request body to follow.
async fn post(c: &mut Raw, stream: u32, path: &str) {
    let b = c.block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "x"),
    ]);
    c.send(kind::HEADERS, flag::END_HEADERS, stream, &b).await;
}

/// `len` bytes of request body on `stream` in frames of 16 KiB, sent in one write; END_STREAM
/// on the last when `end`.
async fn upload(c: &mut Raw, stream: u32, len: usize, end: bool) {
    let mut out = BytesMut::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(16_384);
        left -= n;
        let flags = if end && left == 0 {
            flag::END_STREAM
        } else {
            0
        };
        frame::put_head(&mut out, n, kind::DATA, flags, stream);
        out.extend_from_slice(&vec![b'u'; n]);
    }
    c.io.write_all(&out).await.unwrap();
}

fn window_update(inc: u32) -> [u8; 4] {
    inc.to_be_bytes()
}

/// Waits for a WINDOW_UPDATE on stream 0 (other frames skipped). With the clock paused, the
/// hour passes only when every task waits: the server will never send one.
async fn connection_window_update(c: &mut Raw) -> Option<u32> {
    let wait = async {
        loop {
            let f = c.next().await.expect("the connection goes on");
            if f.head.kind == kind::WINDOW_UPDATE && f.head.stream == 0 {
                return u32_at(&f.payload);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(3600), wait)
        .await
        .ok()
}

/// Review item 1: a client whose connection window equals its stream window (h2's and
/// grpc-go's defaults) reads two large responses and gives back, on the connection, what it
/// read. The connection window goes to the streams in turn: stream 3 gets DATA while stream 1
/// is still sending, and is not reset as stalled however long the transfer takes (it used to
/// get nothing until stream 1 ended, and was reset after `stalled_stream_timeout`).
#[tokio::test(start_paused = true)]
async fn two_downloads_share_a_connection_window_equal_to_the_stream_window() {
    let mut s = settings();
    s.stalled_stream_timeout = Duration::from_secs(10);
    let stalls = stall_counter(&mut s);
    let mut c = Raw::start(s).await;
    c.get(1, "/big").await;
    c.get(3, "/big").await;
    let mut got = [0usize; 2];
    let mut ended = [false; 2];
    let mut stream_3_before_stream_1_ended = false;
    while !(ended[0] && ended[1]) {
        let f = c.next().await.expect("the connection goes on");
        assert_ne!(f.head.kind, kind::RST_STREAM, "a stream was reset: {f:?}");
        assert_ne!(f.head.kind, kind::GOAWAY, "{f:?}");
        if f.head.kind != kind::DATA {
            continue;
        }
        let i = (f.head.stream / 2) as usize;
        let n = f.payload.len();
        got[i] += n;
        if i == 1 && n > 0 && !ended[0] {
            stream_3_before_stream_1_ended = true;
        }
        ended[i] |= f.head.flags & flag::END_STREAM != 0;
        if n > 0 {
            // A client that takes a while to read each frame: a second on the paused clock
            // (a 2 MiB transfer then takes ~2 minutes, far past the stall timeout).
            tokio::time::sleep(Duration::from_secs(1)).await;
            let inc = window_update(n as u32);
            c.send(kind::WINDOW_UPDATE, 0, f.head.stream, &inc).await;
            c.send(kind::WINDOW_UPDATE, 0, 0, &inc).await;
        }
    }
    assert_eq!(got, [1 << 20, 1 << 20]);
    assert!(
        stream_3_before_stream_1_ended,
        "stream 3 got nothing until stream 1 ended"
    );
    assert_eq!(stalls.load(Ordering::SeqCst), 0);
}

/// What review item 1 must not break: a client that opens its stream window but never the
/// connection's (it reads nothing) still has its stream reset after the stall timeout.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_opens_the_connection_window_has_its_stream_reset() {
    let mut s = settings();
    s.stalled_stream_timeout = Duration::from_secs(10);
    let stalls = stall_counter(&mut s);
    let mut c = Raw::start_with(s, &[(frame::setting::INITIAL_WINDOW_SIZE, 1 << 20)]).await;
    c.get(1, "/big").await;
    c.expect_rst(1, Reason::CANCEL).await;
    assert_eq!(stalls.load(Ordering::SeqCst), 1);
}

/// Review item 4: stream 1's service does not read its 700 KiB upload, stream 3's reads its
/// 324 KiB, and the connection window (1 MiB) is then 0. What stream 3's reader gave back
/// (under half the window) is announced at once: the client can send no more DATA, so no
/// frame of its would wake the connection task (it used to wait for one).
#[tokio::test(start_paused = true)]
async fn window_read_on_one_stream_is_given_back_while_another_holds_its_upload() {
    let mut s = settings();
    s.initial_window_size = 1 << 20;
    s.connection_window_size = 1 << 20;
    let kept = Arc::new(Mutex::new(Vec::new()));
    let mut c = Raw::start_serving(s, &[], with_kept(kept)).await;
    post(&mut c, 1, "/hold").await;
    upload(&mut c, 1, 700 << 10, false).await;
    let seen = c.sync().await;
    assert!(seen.is_empty(), "{seen:?}");
    // `/echo` reads the body as it comes and waits for its end.
    post(&mut c, 3, "/echo").await;
    upload(&mut c, 3, 324 << 10, false).await;
    let mut given = 0;
    while given < 324 << 10 {
        let inc = connection_window_update(&mut c).await;
        given += inc.expect("the window stream 3's reader took was not given back");
    }
    assert_eq!(given, 324 << 10);
}

/// Review item 4, the other path: a request body kept past the end of its stream (the
/// response sent, the request ended) and dropped unread gives its window back at once.
#[tokio::test(start_paused = true)]
async fn window_of_a_body_dropped_after_its_stream_ended_is_given_back() {
    let mut s = settings();
    s.initial_window_size = 1 << 20;
    s.connection_window_size = 1 << 20;
    let kept = Arc::new(Mutex::new(Vec::new()));
    let mut c = Raw::start_serving(s, &[], with_kept(kept.clone())).await;
    post(&mut c, 1, "/keep").await;
    upload(&mut c, 1, 1 << 20, true).await;
    let seen = c.sync().await;
    assert!(
        seen.iter().any(|f| f.head.kind == kind::DATA
            && f.head.stream == 1
            && f.head.flags & flag::END_STREAM != 0),
        "the response: {seen:?}"
    );
    assert_eq!(kept.lock().unwrap().len(), 1);
    kept.lock().unwrap().clear();
    let inc = connection_window_update(&mut c).await;
    assert_eq!(
        inc,
        Some(1 << 20),
        "the window of the dropped body was not given back"
    );
}

/// Review item 6: a stream waiting for window that the client resets, while its request body
/// is still held elsewhere (the stream stays in the map), is not reset again (§5.1: nothing
/// but PRIORITY on a closed stream) nor counted as stalled when the stall timer fires.
#[tokio::test(start_paused = true)]
async fn a_stalled_stream_the_client_reset_is_not_reset_again() {
    let mut s = settings();
    s.stalled_stream_timeout = Duration::from_secs(10);
    let stalls = stall_counter(&mut s);
    let kept = Arc::new(Mutex::new(Vec::new()));
    let mut c = Raw::start_serving(
        s,
        &[(frame::setting::INITIAL_WINDOW_SIZE, 0)],
        with_kept(kept.clone()),
    )
    .await;
    // `/keep` answers "ok" at once; the window 0 holds its DATA back.
    post(&mut c, 1, "/keep").await;
    let f = c.next().await.unwrap();
    assert_eq!((f.head.kind, f.head.stream), (kind::HEADERS, 1));
    c.send(kind::RST_STREAM, 0, 1, &Reason::CANCEL.0.to_be_bytes())
        .await;
    let seen = c.sync().await;
    assert!(seen.is_empty(), "{seen:?}");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let seen = c.sync().await;
    assert!(
        !seen.iter().any(|f| f.head.kind == kind::RST_STREAM),
        "a reset stream was reset again: {seen:?}"
    );
    assert_eq!(stalls.load(Ordering::SeqCst), 0);
    assert_eq!(kept.lock().unwrap().len(), 1);
}

/// Review item 7: a response body that comes as one large frame (4 MiB) does not keep its
/// place at the front: a response queued beside it goes out after at most one frame of it
/// (it used to wait for the whole 4 MiB).
#[tokio::test]
async fn a_large_body_frame_does_not_hold_the_other_responses_back() {
    let kept = Arc::new(Mutex::new(Vec::new()));
    let mut c = Raw::start_serving(
        settings(),
        &[(frame::setting::INITIAL_WINDOW_SIZE, 0x7fff_ffff)],
        with_kept(kept),
    )
    .await;
    c.send(
        kind::WINDOW_UPDATE,
        0,
        0,
        &window_update(0x7fff_ffff - 65_535),
    )
    .await;
    let mut out = BytesMut::new();
    for (id, path) in [(1, "/huge"), (3, "/")] {
        let b = c.block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
        ]);
        frame::put_head(
            &mut out,
            b.len(),
            kind::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            id,
        );
        out.extend_from_slice(&b);
    }
    c.io.write_all(&out).await.unwrap();
    let mut before = 0;
    loop {
        let f = c.next().await.expect("the connection goes on");
        if f.head.kind != kind::DATA {
            continue;
        }
        if f.head.stream == 1 {
            before += f.payload.len();
        } else if f.head.flags & flag::END_STREAM != 0 {
            break;
        }
    }
    // One frame of it when the small response's task ran first (as it does here), a few
    // more when it had not queued its response yet; 4 MiB when the large one kept its place.
    assert!(
        before <= 256 << 10,
        "{before} bytes of the large body went before the small response"
    );
}
