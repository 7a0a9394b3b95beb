//! What a connection of Outrigger's own HTTP/2 server (`proxy::h2`) keeps alive, measured in
//! heap bytes: unread request DATA, a large header block once it is done, an idle connection.
//! A test binary of its own, because it counts allocations with a global allocator (the
//! library forbids unsafe code, and a counter in the unit tests' binary would count every
//! other test too).
//!
//! The count is per thread: the server and the client run on one current-thread runtime on
//! the test's thread, so what the server allocates while it reads the client's frames is what
//! the count sees, and nothing else.
//!
//! The allocator also grows blocks in place where it can, as glibc's `realloc` often does:
//! every block of [`IN_PLACE`] bytes gets the system's block of the range's top size, and a
//! `realloc` within the range keeps the pointer. So a test sees a server that takes a grown
//! buffer for the same one because its pointer did not move.
//!
//! It counts allocations too (per thread), for the one test here that is not about the HTTP/2
//! server: what a connection's shared Host value ([`LastHost`]) costs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use outrigger::proxy::body::ProxyBody;
use outrigger::proxy::h2::{RecvBody, Settings, Shutdown, serve};
use outrigger::proxy::route::LastHost;

struct Counting;

thread_local! {
    /// Heap bytes allocated and not freed by this thread (frees of another thread's blocks
    /// count where they happen: none in these tests).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// Allocations (and reallocations) made by this thread.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
}

fn allocations() -> usize {
    ALLOCATIONS.with(|a| a.get())
}

fn live() -> isize {
    LIVE.with(|l| l.get())
}

/// Block sizes the allocator serves with one system block of the range's top size, so that a
/// `realloc` within the range stays in place.
const IN_PLACE: std::ops::RangeInclusive<usize> = 8193..=(4 << 20);

/// The layout of the system block behind a block of `layout` (the same for every size in
/// [`IN_PLACE`], whatever `realloc`s it went through).
fn real(layout: Layout) -> Layout {
    if IN_PLACE.contains(&layout.size()) {
        // The range's top is a valid size for any alignment a smaller layout had.
        Layout::from_size_align(*IN_PLACE.end(), layout.align()).expect("a valid layout")
    } else {
        layout
    }
}

// SAFETY: every call is passed to the system allocator with the layout `real` gives, the same
// for a block's allocation, reallocations and release (a `realloc` that keeps the pointer
// keeps the block within `IN_PLACE`, whose system block holds any size of it); the counter
// is a const-initialised thread-local `Cell` that never allocates. What is counted is the
// sizes asked for, not the system blocks.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        count_allocation();
        // SAFETY: the caller's contract is the system allocator's; `real` keeps it.
        unsafe { System.alloc(real(layout)) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        count_allocation();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(real(layout)) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        count_allocation();
        if IN_PLACE.contains(&layout.size()) && IN_PLACE.contains(&new_size) {
            // The system block already holds `new_size` bytes: grown (or shrunk) in place.
            return ptr;
        }
        let new = real(Layout::from_size_align(new_size, layout.align()).expect("a layout"));
        // SAFETY: `ptr` is the system's block of `real(layout)`; a block of the same
        // alignment and of `new.size()` bytes replaces it.
        unsafe { System.realloc(ptr, real(layout), new.size()) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, real(layout)) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
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

/// A service that answers at once, with no body.
async fn answers(_req: Request<RecvBody>) -> Response<ProxyBody> {
    Response::new(outrigger::proxy::body::empty())
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
        self.read_until(|kind, flags, _, payload| {
            kind == PING && flags & ACK != 0 && payload == b"pinnedme"
        })
        .await;
    }

    /// Reads (and drops) frames until one that `last` picks (kind, flags, stream, payload).
    async fn read_until(&mut self, last: impl Fn(u8, u8, u32, &[u8]) -> bool) {
        loop {
            while self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (self.buf[3], self.buf[4]);
                let stream = u32::from_be_bytes(self.buf[5..9].try_into().unwrap());
                let found = last(kind, flags, stream, &self.buf[9..9 + len]);
                self.buf.drain(..9 + len);
                if found {
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A GET whose header block is `fields` (after `:method GET`, `:scheme http`, `:path /`,
    /// from the static table) in HEADERS and CONTINUATION frames of 16 KiB, and its response
    /// read to its end, then a sync: the stream is gone.
    async fn get(&mut self, stream: u32, fields: &[u8]) {
        let mut block = vec![0x82, 0x86, 0x84];
        block.extend_from_slice(fields);
        self.request(stream, &block).await;
    }

    /// A request whose whole header block is `block`, ended with it, as [`Self::get`] sends
    /// it and reads its response.
    async fn request(&mut self, stream: u32, block: &[u8]) {
        let mut out = Vec::new();
        let mut parts = block.chunks(16_384).peekable();
        let mut kind = HEADERS;
        while let Some(part) = parts.next() {
            let flags = if kind == HEADERS { END_STREAM } else { 0 };
            let end = if parts.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            frame(&mut out, kind, flags | end, stream, part);
            kind = CONTINUATION;
        }
        self.write(&out).await;
        self.read_until(|_, flags, id, _| id == stream && flags & END_STREAM != 0)
            .await;
        self.sync().await;
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
    start_serving(Settings::for_tests(), never_reads).await
}

async fn start_serving<S, F>(settings: Settings, service: S) -> Client
where
    S: FnMut(Request<RecvBody>) -> F + Send + 'static,
    F: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let (mut a, b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(b, Bytes::new(), settings, Shutdown::new(), service));
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

/// What a connection whose service reads no request body holds after an [`upload`] of `times`
/// times the frames `each` writes. The same upload on another stream first, so the buffers
/// that stay (the pipe's, the server's read buffer, the stream map) have their size before
/// the count starts.
async fn held_after_unread_upload(times: usize, each: impl Fn(&mut Vec<u8>, u32)) -> isize {
    let mut c = start().await;
    upload(&mut c, 1, times, &each).await;
    let before = live();
    upload(&mut c, 3, times, &each).await;
    live() - before
}

/// A POST on `stream`, then `times` times the frames `each` writes for it, in writes of
/// about 64 KiB, then a sync.
async fn upload(c: &mut Client, stream: u32, times: usize, each: &impl Fn(&mut Vec<u8>, u32)) {
    c.post(stream).await;
    let mut out = Vec::new();
    for _ in 0..times {
        each(&mut out, stream);
        if out.len() >= 64 * 1024 {
            c.write(&out).await;
            out.clear();
        }
    }
    c.write(&out).await;
    c.sync().await;
}

/// Unknown frames (ignored, counted against no window) of 256 KiB in all, in 64 KiB writes,
/// then a sync: the pipe's buffers and what else stays have their size before a count.
async fn settle(c: &mut Client) {
    let mut out = Vec::new();
    junk(&mut out, 256 * 1024, 16_000);
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
        // 64 times: a 1-byte DATA frame, then an unknown frame of 16,000 bytes (ignored, and
        // counted against no window).
        let zeros = vec![0u8; 16_000];
        let held = held_after_unread_upload(64, |out, stream| {
            frame(out, DATA, 0, stream, b"d");
            frame(out, 0xfa, 0, 0, &zeros);
        })
        .await;
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
        // 20,000 1-byte DATA frames back to back.
        let held =
            held_after_unread_upload(20_000, |out, stream| frame(out, DATA, 0, stream, b"d")).await;
        eprintln!("held: {held} bytes");
        // 20,000 bytes unread: held in one growing buffer (at most twice), not in 20,000
        // slices of 32 bytes each plus the 10-byte frames' read buffers.
        assert!(
            held < 2 * 20_000 + SLACK,
            "20,000 unread bytes of DATA hold {held} bytes of heap"
        );
    });
}

/// `n` bytes of unknown frames (type 0xfa, ignored, counted against no window), each at most
/// `size` bytes of payload.
fn junk(out: &mut Vec<u8>, mut n: usize, size: usize) {
    let zeros = vec![0u8; size];
    while n > 0 {
        let len = n.min(size);
        frame(out, 0xfa, 0, 0, &zeros[..len]);
        n -= len;
    }
}

/// A read buffer that grew in place (a `realloc` that kept its pointer) is known for its new
/// size: DATA payloads small for it are copied, not kept as slices that pin it (review
/// finding: the size followed the buffer only when its pointer moved, so the bound of four
/// times what is unread could be eight times, or, here, far more).
#[test]
fn a_read_buffer_grown_in_place_is_still_known_for_its_size() {
    runtime().block_on(async {
        let mut s = Settings::for_tests();
        s.max_frame_size = 1 << 20;
        let mut c = start_serving(s, never_reads).await;
        c.post(1).await;
        settle(&mut c).await;
        let before = live();
        // A frame of 1,000,000 bytes: the read buffer (16 KiB, no slice of it alive) grows
        // to hold it, in place. Then 8 DATA frames of 5,000 bytes, 60,000 bytes apart (each
        // a twentieth of the buffer's new size, but more than a quarter of its old one).
        let mut out = Vec::new();
        frame(&mut out, 0xfa, 0, 0, &vec![0u8; 1_000_000]);
        let data = vec![b'd'; 5_000];
        for _ in 0..8 {
            frame(&mut out, DATA, 0, 1, &data);
            junk(&mut out, 60_000, 60_000);
        }
        // A frame larger than the buffer: the connection takes a new one (1,048,585 bytes),
        // and what no slice pins of the last one is freed.
        frame(&mut out, 0xfa, 0, 0, &vec![0u8; 1 << 20]);
        c.write(&out).await;
        drop(out);
        c.sync().await;
        let held = live() - before;
        let unread: isize = 8 * 5_000;
        eprintln!("held: {held} bytes, {unread} bytes unread");
        let read_buf: isize = (1 << 20) + 9 + 16 * 1024;
        assert!(
            held < read_buf + 4 * unread + SLACK,
            "{unread} unread bytes of DATA hold {held} bytes of heap (the read buffer: {read_buf})"
        );
    });
}

/// A large header block is done with once its request is: the connection goes back to a
/// normal value arena (review finding: it kept twice the largest block's size for its life,
/// ~1 MiB after one 512 KiB block).
#[test]
fn a_large_header_block_leaves_a_normal_arena_behind() {
    runtime().block_on(async {
        let mut s = Settings::for_tests();
        s.max_header_list_size = 1 << 20;
        let mut c = start_serving(s, answers).await;
        // An ordinary GET first: the arena has its size.
        c.get(1, &[]).await;
        settle(&mut c).await;
        let before = live();
        // `x-big: v…` (512 KiB), a literal without indexing (the decoder's table stays
        // empty) and no Huffman coding.
        let value = 512 * 1024;
        let mut fields = vec![0x00, 5];
        fields.extend_from_slice(b"x-big");
        // Its length: 127, then the rest (524,161) in 7-bit groups, low first.
        fields.extend_from_slice(&[0x7f, 0x81, 0xff, 0x1f]);
        assert_eq!(127 + 0x01 + (0x7f << 7) + (0x1f << 14), value);
        fields.extend(std::iter::repeat_n(b'v', value));
        c.get(3, &fields).await;
        drop(fields);
        let after_large = live() - before;
        c.get(5, &[]).await;
        let after_next = live() - before;
        eprintln!("held after the large block: {after_large}, after the next GET: {after_next}");
        // At most a new normal arena (4 KiB) and its field list, and a read buffer up to a
        // frame larger (16 KiB: the block's first fragment held the last one when more room
        // was needed), where it kept twice the block's size (1 MiB) before.
        assert!(
            after_large < 24 * 1024 && after_next < 24 * 1024,
            "a connection holds {after_large} bytes more after one 512 KiB header block \
             ({after_next} after the next GET)"
        );
    });
}

/// What a connection holds idle: after its handshake (no header block yet: no value arena),
/// and after one GET (a normal arena, 4 KiB, and the buffers its response used).
#[test]
fn an_idle_connection_holds_no_arena_until_its_first_block() {
    runtime().block_on(async {
        // A first connection: what the runtime and the pipe allocate once is not counted.
        let mut warm = start_serving(Settings::for_tests(), answers).await;
        warm.get(1, &[]).await;
        let before = live();
        let mut c = start_serving(Settings::for_tests(), answers).await;
        let idle = live() - before;
        c.get(1, &[]).await;
        let served = live() - before;
        eprintln!("an idle connection holds {idle} bytes; after one GET, {served}");
        // The read buffer (16 KiB and a frame header), the output buffer (4 KiB), the
        // pipe's two buffers, the stream map, the decoder and the task: no arena.
        let read_and_out = 16_393 + 4096;
        assert!(
            idle < read_and_out + 2 * 64 * 1024 + 8 * 1024,
            "an idle connection holds {idle} bytes"
        );
        assert!(
            served - idle < 8 * 1024,
            "a connection holds {} bytes more after one GET than idle",
            served - idle
        );
    });
}

/// A request whose `:path` is a Huffman-coded literal (as h2load, and browsers for a path not
/// in the static table, send it) costs no more allocations than the same `:path` indexed
/// (`/`) or as a raw literal (`/hello`): the Huffman decoder is a table built once per
/// process and decodes into a buffer the connection keeps. (`loona-hpack` built a decoder of
/// all 257 codes for every Huffman-coded string: about 60 allocations more.) Each kind's
/// fewest of three, after warm-up: a new value arena now and then is not the decoder's.
#[test]
fn a_huffman_coded_path_costs_no_more_allocations_than_an_indexed_one() {
    runtime().block_on(async {
        let mut c = start_serving(Settings::for_tests(), answers).await;
        // `:method GET` and `:scheme http` indexed, then `:path`: `/` indexed, `/` as a
        // literal without indexing (name 4) Huffman-coded (1 byte), `/hello` raw, and
        // `/hello` Huffman-coded (5 bytes).
        let blocks: [&[u8]; 4] = [
            &[0x82, 0x86, 0x84],
            &[0x82, 0x86, 0x04, 0x81, 0x63],
            b"\x82\x86\x04\x06/hello",
            &[0x82, 0x86, 0x04, 0x85, 0x62, 0x72, 0xd1, 0x41, 0xff],
        ];
        let mut stream = 1;
        for _ in 0..4 {
            for block in blocks {
                c.request(stream, block).await;
                stream += 2;
            }
        }
        let mut fewest = [usize::MAX; 4];
        for _ in 0..3 {
            for (i, block) in blocks.into_iter().enumerate() {
                let before = allocations();
                c.request(stream, block).await;
                fewest[i] = fewest[i].min(allocations() - before);
                stream += 2;
            }
        }
        let [indexed, huffman, raw_hello, huffman_hello] = fewest;
        eprintln!(
            "allocations per request: `/` indexed {indexed}, Huffman-coded {huffman}; \
             `/hello` raw {raw_hello}, Huffman-coded {huffman_hello}"
        );
        assert!(
            huffman <= indexed,
            "a Huffman-coded :path / costs {huffman} allocations, an indexed one {indexed}"
        );
        assert!(
            huffman_hello <= raw_hello,
            "a Huffman-coded :path /hello costs {huffman_hello} allocations, a raw one \
             {raw_hello}"
        );
    });
}

/// A connection's first Host value (or one for a new authority) is one allocation, as it was
/// before the value was shared: its bytes and reference count together, so that the clone
/// `LastHost` keeps, and those later requests get, allocate nothing (a `Vec`-backed value
/// would allocate its shared count at its first clone).
#[test]
fn a_connections_host_value_is_one_allocation_and_its_clones_none() {
    let last = LastHost::default();
    let before = allocations();
    let first = last.value("api.internal:8080").unwrap();
    let again = last.value("api.internal:8080").unwrap();
    let clone = again.clone();
    assert_eq!(allocations() - before, 1);
    let before = allocations();
    let other = last.value("other.internal").unwrap();
    assert_eq!(allocations() - before, 1);
    assert_eq!(first, clone);
    assert_eq!(other, "other.internal");
}

/// A frame larger than the read buffer is read into a larger one; once it is handled, the
/// connection goes back to a buffer of the usual size (review finding: it kept its largest
/// frame's size, 1 MB here, for its life, as the header arena did before).
#[test]
fn a_large_frame_leaves_a_normal_read_buffer_behind() {
    runtime().block_on(async {
        let mut s = Settings::for_tests();
        s.max_frame_size = 1 << 20;
        let mut c = start_serving(s, answers).await;
        // An ordinary GET first: what stays has its size.
        c.get(1, &[]).await;
        settle(&mut c).await;
        let before = live();
        let mut out = Vec::new();
        frame(&mut out, 0xfa, 0, 0, &vec![0u8; 1_000_000]);
        c.write(&out).await;
        drop(out);
        c.sync().await;
        let held = live() - before;
        eprintln!("held after a 1,000,000-byte frame: {held} bytes");
        // A read buffer of the usual size (16 KiB and a frame header) replaces the large
        // one: about nothing more than before.
        assert!(
            held < 16 * 1024,
            "a connection holds {held} bytes more after one frame of 1,000,000 bytes"
        );
    });
}
