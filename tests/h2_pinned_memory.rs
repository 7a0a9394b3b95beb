//! What unread request DATA keeps alive in Outrigger's own HTTP/2 server (`proxy::h2`),
//! measured in heap bytes: a test binary of its own, because it counts allocations with a
//! global allocator (the library forbids unsafe code, and a counter in the unit tests' binary
//! would count every other test too).
//!
//! The count is per thread: the server and the client run on one current-thread runtime on
//! the test's thread, so what the server allocates while it reads the client's frames is what
//! the count sees, and nothing else.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use outrigger::proxy::body::ProxyBody;
use outrigger::proxy::h2::{RecvBody, Settings, Shutdown, serve};

struct Counting;

thread_local! {
    /// Heap bytes allocated and not freed by this thread (frees of another thread's blocks
    /// count where they happen: none in these tests).
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
}

fn live() -> isize {
    LIVE.with(|l| l.get())
}

// SAFETY: every call is passed to the system allocator unchanged; the counter is a
// const-initialised thread-local `Cell` that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A service that takes the request body and never reads it.
async fn never_reads(req: Request<RecvBody>) -> Response<ProxyBody> {
    let _body = req.into_body();
    std::future::pending::<()>().await;
    unreachable!()
}

struct Client {
    io: DuplexStream,
    buf: Vec<u8>,
}

impl Client {
    async fn write(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// Sends a PING and reads (and drops) what the server sent until its ACK: everything sent
    /// before it has been read and handled.
    async fn sync(&mut self) {
        let mut ping = Vec::new();
        frame(&mut ping, PING, 0, 0, b"pinnedme");
        self.write(&ping).await;
        loop {
            while self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (self.buf[3], self.buf[4]);
                let ack = kind == PING && flags & ACK != 0 && &self.buf[9..9 + len] == b"pinnedme";
                self.buf.drain(..9 + len);
                if ack {
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A POST (`:method POST`, `:scheme http`, `:path /`, all from the static table) whose
    /// body stays open.
    async fn post(&mut self, stream: u32) {
        let mut out = Vec::new();
        frame(&mut out, HEADERS, END_HEADERS, stream, &[0x83, 0x86, 0x84]);
        self.write(&out).await;
    }
}

async fn start() -> Client {
    let (mut a, b) = tokio::io::duplex(64 * 1024);
    let settings = Settings {
        max_concurrent_streams: 100,
        max_header_list_size: 16 * 1024,
        initial_window_size: 1024 * 1024,
        connection_window_size: 4 * 1024 * 1024,
        max_frame_size: 16_384,
        stalled_stream_timeout: Duration::from_secs(30),
        on_stalled_stream: None,
    };
    tokio::spawn(serve(
        b,
        Bytes::new(),
        settings,
        Shutdown::new(),
        never_reads,
    ));
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut hello, SETTINGS, 0, 0, &[]);
    frame(&mut hello, SETTINGS, ACK, 0, &[]);
    a.write_all(&hello).await.unwrap();
    let mut c = Client {
        io: a,
        buf: Vec::new(),
    };
    c.sync().await;
    c
}

/// `pairs` times: a 1-byte DATA frame on `stream`, then an unknown frame of 16,000 bytes
/// (ignored, and counted against no window), in writes of about 64 KiB.
async fn data_between_junk(c: &mut Client, stream: u32, pairs: usize) {
    let junk = vec![0u8; 16_000];
    let mut out = Vec::new();
    for _ in 0..pairs {
        frame(&mut out, DATA, 0, stream, b"d");
        frame(&mut out, 0xfa, 0, 0, &junk);
        if out.len() >= 64 * 1024 {
            c.write(&out).await;
            out.clear();
        }
    }
    c.write(&out).await;
    c.sync().await;
}

/// `frames` 1-byte DATA frames back to back on `stream`.
async fn tiny_data(c: &mut Client, stream: u32, frames: usize) {
    let mut out = Vec::new();
    for _ in 0..frames {
        frame(&mut out, DATA, 0, stream, b"d");
        if out.len() >= 64 * 1024 {
            c.write(&out).await;
            out.clear();
        }
    }
    c.write(&out).await;
    c.sync().await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Slack for what a new stream itself costs (its state, its service's task).
const SLACK: isize = 64 * 1024;

#[test]
fn tiny_data_between_large_frames_does_not_pin_the_read_buffers() {
    runtime().block_on(async {
        let mut c = start().await;
        // The same traffic once first, so the buffers that stay (the pipe's, the server's
        // read buffer, the stream map) have their size before the count starts.
        c.post(1).await;
        data_between_junk(&mut c, 1, 64).await;
        let before = live();
        c.post(3).await;
        data_between_junk(&mut c, 3, 64).await;
        let held = live() - before;
        eprintln!("held: {held} bytes");
        // 64 bytes of DATA unread; without copying, each keeps a 16 KiB+ read buffer alive.
        assert!(
            held < 4 * 64 + SLACK,
            "64 unread bytes of DATA hold {held} bytes of heap"
        );
    });
}

#[test]
fn tiny_data_frames_hold_about_their_size() {
    runtime().block_on(async {
        let mut c = start().await;
        c.post(1).await;
        tiny_data(&mut c, 1, 20_000).await;
        let before = live();
        c.post(3).await;
        tiny_data(&mut c, 3, 20_000).await;
        let held = live() - before;
        eprintln!("held: {held} bytes");
        // 20,000 bytes unread: held in one growing buffer (at most twice), not in 20,000
        // slices of 32 bytes each plus the 10-byte frames' read buffers.
        assert!(
            held < 2 * 20_000 + SLACK,
            "20,000 unread bytes of DATA hold {held} bytes of heap"
        );
    });
}
