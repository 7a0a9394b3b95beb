//! A randomized, bounded attack on our HTTP/2 server: generated client byte streams (frames
//! of every type with random flags, ids, lengths and windows; HPACK blocks of valid and
//! invalid fields; CONTINUATION splits; byte flips, cuts and insertions) against a `Conn`
//! driven in memory under tokio's paused clock, with a service that answers, reads, streams,
//! fails or hangs, and a client that reads at once, slowly or not at all.
//!
//! Each case checks: no panic (connection task, stream tasks); the connection answers a final
//! PING or ends, and ends once the client closes (a hang is found when every task is idle:
//! the paused clock then jumps; a spin by the real-time watchdog); what the connection holds
//! stays bounded (`Conn::buffered` sampled after every poll); every frame we wrote parses as
//! HTTP/2 a client accepts (lengths, stream ids, no DATA past the client's windows, header
//! blocks that decode, a table size update owed after a lowered SETTINGS_HEADER_TABLE_SIZE,
//! nothing after RST_STREAM or END_STREAM, an error GOAWAY last and the one `serve`
//! returned); each response is its own stream's (the service echoes the unique `:path` in
//! `x-path`; `/echo` and `/mirror` bodies equal the request's); WINDOW_UPDATEs never give back
//! more than the client sent, and once the connection is idle after the final PING, what was
//! not given back is exactly what the server holds unread or has yet to give back (padding
//! included); no task outlives the connection.
//!
//! `OUTRIGGER_H2_FUZZ_CASES` (default 2,000) and `OUTRIGGER_H2_FUZZ_SEED` (a number; fixed by
//! default, so a run is repeatable) choose the run; a failure prints the seed and the
//! shrunk case.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::conn::{Buffered, Conn, OUT_HIGH};
use super::frame::{self, Head, flag, kind, setting};
use super::stream::SEND_BUFFER;
use super::{Error, RecvBody, Settings, Shutdown};
use crate::proxy::body::{self, BoxError, ProxyBody};

// ---- The service ----

/// A body of `left` frames of `size` bytes of `byte`, then trailers (`grpc-status: 0`) when
/// `trailers`. Not ready (a wake, then `Pending`) before the next frame while `yield_next`,
/// which `yield_every` sets again after every frame: once before the first frame, before each,
/// or never. Shared with the h2 tests (`tests.rs`).
pub(super) struct Chunks {
    pub left: usize,
    pub size: usize,
    pub byte: u8,
    pub trailers: bool,
    pub yield_next: bool,
    pub yield_every: bool,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.yield_next {
            // A body that is not ready at once: what came before goes alone.
            self.yield_next = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.yield_next = self.yield_every;
        if self.left == 0 {
            if self.trailers {
                self.trailers = false;
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                return std::task::Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![
            self.byte;
            self.size
        ])))))
    }
}

/// A body that yields some bytes, then fails.
struct Failing(bool);

impl hyper::body::Body for Failing {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.0 {
            return std::task::Poll::Ready(Some(Err("broken".into())));
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"part")))))
    }
}

/// The paths the generator asks for, each a way of answering.
const PATHS: &[&str] = &[
    "/", "/echo", "/drop", "/hold", "/hang", "/big", "/stream", "/fail", "/read1", "/head",
    "/mirror", "", "*", "x", "/a b", "/%00", "/?q",
];

/// Every answer carries the request's `:path` in `x-path` (the generator makes it unique per
/// stream), so the checker can tell that a stream's response is its own.
async fn service(req: Request<RecvBody>) -> Response<ProxyBody> {
    let tag = req
        .uri()
        .path_and_query()
        .map(|p| http::HeaderValue::from_str(p.as_str()).expect("a path is a header value"));
    let mut r = answer(req).await;
    if let Some(tag) = tag {
        r.headers_mut().insert("x-path", tag);
    }
    r
}

async fn answer(req: Request<RecvBody>) -> Response<ProxyBody> {
    match req.uri().path() {
        // Reads the whole body, answers it.
        "/echo" => match req.into_body().collect().await {
            Ok(c) => Response::new(body::full(c.to_bytes())),
            Err(e) => {
                let mut r = Response::new(body::full(e.to_string()));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        },
        // Reads nothing: the body is dropped, the answer sent.
        "/drop" => {
            drop(req);
            Response::new(body::full(vec![b'd'; 100]))
        }
        // Keeps the body unread and never answers.
        "/hold" => {
            let _req = req;
            std::future::pending().await
        }
        "/hang" => {
            drop(req);
            std::future::pending().await
        }
        // More than any window the client starts with.
        "/big" => Response::new(body::full(vec![b'b'; 200_000])),
        "/stream" => Response::new(
            Chunks {
                left: 20,
                size: 1000,
                byte: b's',
                trailers: true,
                yield_next: true,
                yield_every: true,
            }
            .boxed(),
        ),
        "/fail" => Response::new(Failing(false).boxed()),
        // Reads one frame of the body, then answers (the rest is dropped).
        "/read1" => {
            let mut b = req.into_body();
            let _ = b.frame().await;
            Response::new(body::full("one"))
        }
        "/head" => {
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        // The request body streamed back as it comes.
        "/mirror" => Response::new(req.into_body().boxed()),
        _ => {
            let mut r = Response::new(body::full("hello"));
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("close"));
            r
        }
    }
}

// ---- The generator ----

/// Which stream a frame goes on (resolved while the case is written out).
#[derive(Clone, Debug)]
enum Sid {
    /// The next new (odd, increasing) id.
    New,
    /// One the case opened before (by index), or 1.
    Open(u8),
    /// One the case opened before (by index); without one, the frame is not sent.
    Opened(u8),
    Zero,
    /// An even id next to the next new one.
    Even,
    /// An even id below one the case opened (by index): never opened, yet below the highest.
    EvenBelow(u8),
    Raw(u32),
}

const METHODS: &[&str] = &[
    "GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "", "G T",
];
const SCHEMES: &[&str] = &["http", "https", "", "1x", "ftp+x"];
const AUTHORITIES: &[&str] = &["x", "example.com:80", "", "a b", "[::1]:1", "u@h"];
const PSEUDOS: &[&str] = &[":status", ":protocol", ":foo", ":"];
const NAMES: &[&str] = &[
    "accept",
    "x-a",
    "content-type",
    "cookie",
    "user-agent",
    "grpc-timeout",
    "a\0b",
    "x y",
    "",
    "é",
];
const VALUES: &[&str] = &["v", "", "a\r\nb", "\0", "\tx ", "text/plain", "ü", "1"];
const CONNECTION_FIELDS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

#[derive(Clone, Debug)]
enum Field {
    Method(u8),
    Scheme(u8),
    Path(u8),
    Authority(u8),
    /// A response, unknown or empty pseudo-header.
    Pseudo(u8),
    Regular(u8, u8),
    Upper,
    ConnectionSpecific(u8),
    Te(bool),
    /// 0: the number, 1: not a number, 2: past u64, 3: empty, 4: twice, different.
    ContentLength(u8, u32),
    /// A value of this many KiB.
    Huge(u8),
    /// An indexed field: static 1..=61, dynamic 62.., 0 invalid.
    Indexed(u8),
    /// A literal added to the dynamic table.
    Incremental(u8, u8),
    /// An index into the dynamic table the case's `Incremental` fields filled (by index;
    /// left out when they added none).
    Dynamic(u8),
    NeverIndexed(u8, u8),
    /// A dynamic table size update (valid only at the start of a block and up to 4,096).
    TableUpdate(u32),
    /// A Huffman-coded value of random bytes.
    Huffman(Vec<u8>),
    Raw(Vec<u8>),
    /// A string whose length runs past the end of the block.
    LongLength,
}

#[derive(Clone, Debug)]
enum Op {
    Headers {
        sid: Sid,
        fields: Vec<Field>,
        end_stream: bool,
        pad: Option<u8>,
        /// PRIORITY flag with this dependency (self-dependent when it is the stream).
        prio: Option<u32>,
        /// Block offsets where a CONTINUATION starts (besides the splits the frame size needs).
        splits: Vec<u16>,
        /// The last frame of the block lacks END_HEADERS.
        unfinished: bool,
    },
    Data {
        sid: Sid,
        len: u16,
        pad: Option<u8>,
        end: bool,
    },
    Rst {
        sid: Sid,
        code: u32,
    },
    Ping {
        ack: bool,
        payload: u64,
    },
    Settings {
        ack: bool,
        entries: Vec<(u16, u32)>,
    },
    WindowUpdate {
        sid: Sid,
        inc: u32,
    },
    Goaway {
        last: u32,
        code: u32,
        debug: u8,
    },
    Priority {
        sid: Sid,
        dep: u32,
        len: u8,
    },
    /// Any frame: type (unknown ones too), flags, stream, payload.
    Raw {
        kind: u8,
        flags: u8,
        sid: Sid,
        payload: Vec<u8>,
    },
    /// A request's HEADERS without END_HEADERS, then `frames` CONTINUATION frames of `size`
    /// bytes each (an indexed regular field per byte), the last with END_HEADERS when `end`.
    ContinuationFlood {
        fields: Vec<Field>,
        frames: u16,
        size: u8,
        end: bool,
    },
    /// Frames written one after the other (a frame after the client's own RST_STREAM).
    Seq(Vec<Op>),
    /// `Shutdown::graceful` at this point of the input.
    Shutdown,
    /// The client waits until the server is idle (what it sent is handled).
    Pause,
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: u32, bit: u8 },
    Truncate { at: u32 },
    Insert { at: u32, bytes: Vec<u8> },
    Delete { at: u32, len: u8 },
}

#[derive(Clone, Copy, Debug)]
enum ReadMode {
    Eager,
    /// Reads this many bytes at a time, yielding between reads.
    Slow(u8),
    /// Reads nothing until its input is written (or everything is stuck).
    Never,
}

#[derive(Clone, Debug)]
struct ServerCfg {
    max_streams: u32,
    header_list: u32,
    initial_window: u32,
    conn_window: u32,
    max_frame: u32,
    stall_secs: u8,
}

impl ServerCfg {
    fn settings(&self) -> Settings {
        Settings {
            max_concurrent_streams: self.max_streams,
            max_header_list_size: self.header_list,
            initial_window_size: self.initial_window,
            connection_window_size: self.conn_window,
            max_frame_size: self.max_frame,
            stalled_stream_timeout: Duration::from_secs(u64::from(self.stall_secs)),
            on_stalled_stream: None,
        }
    }
}

impl From<Settings> for ServerCfg {
    fn from(s: Settings) -> Self {
        ServerCfg {
            max_streams: s.max_concurrent_streams,
            header_list: s.max_header_list_size,
            initial_window: s.initial_window_size,
            conn_window: s.connection_window_size,
            max_frame: s.max_frame_size,
            stall_secs: u8::try_from(s.stalled_stream_timeout.as_secs()).expect("at most 255 s"),
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    server: ServerCfg,
    client_settings: Vec<(u16, u32)>,
    ops: Vec<Op>,
    mutations: Vec<Mutation>,
    /// Bytes handed to `serve` as already read.
    prefix: u8,
    /// Write size.
    chunk: u16,
    /// The in-memory pipe's buffer.
    pipe: u16,
    read: ReadMode,
    /// End with a PING (and expect its ACK or the end) before closing, or just close.
    ping_at_end: bool,
}

fn sid() -> impl Strategy<Value = Sid> {
    prop_oneof![
        3 => Just(Sid::New),
        6 => any::<u8>().prop_map(Sid::Open),
        1 => Just(Sid::Zero),
        1 => Just(Sid::Even),
        1 => any::<u8>().prop_map(Sid::EvenBelow),
        1 => any::<u32>().prop_map(Sid::Raw),
    ]
}

fn open_sid() -> impl Strategy<Value = Sid> {
    prop_oneof![
        8 => any::<u8>().prop_map(Sid::Open),
        1 => sid(),
    ]
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0..=100u32,
        3 => 0..=70_000u32,
        1 => Just(0),
        1 => Just(16_383),
        1 => Just(16_384),
        1 => Just((1 << 24) - 1),
        1 => Just(1 << 24),
        1 => Just(65_535),
        1 => Just(0x7fff_ffff),
        1 => any::<u32>(),
    ]
}

fn setting_entry() -> impl Strategy<Value = (u16, u32)> {
    (
        prop_oneof![8 => 1..=6u16, 1 => 0..=20u16, 1 => any::<u16>()],
        interesting_u32(),
    )
}

/// Settings a client may send (values in range, unknown ids).
fn valid_setting_entry() -> impl Strategy<Value = (u16, u32)> {
    prop_oneof![
        (Just(setting::HEADER_TABLE_SIZE), interesting_u32()),
        (Just(setting::ENABLE_PUSH), 0..=1u32),
        (Just(setting::MAX_CONCURRENT_STREAMS), interesting_u32()),
        (
            Just(setting::INITIAL_WINDOW_SIZE),
            prop_oneof![0..=100u32, 0..=70_000u32, Just(0x7fff_ffff)]
        ),
        (
            Just(setting::MAX_FRAME_SIZE),
            prop_oneof![Just(16_384u32), 16_384..=70_000u32, Just((1 << 24) - 1)]
        ),
        (Just(setting::MAX_HEADER_LIST_SIZE), interesting_u32()),
        (7..=100u16, any::<u32>()),
    ]
}

fn pick(n: usize) -> impl Strategy<Value = u8> {
    (0..n as u8).boxed()
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        2 => pick(METHODS.len()).prop_map(Field::Method),
        1 => pick(SCHEMES.len()).prop_map(Field::Scheme),
        2 => pick(PATHS.len()).prop_map(Field::Path),
        1 => pick(AUTHORITIES.len()).prop_map(Field::Authority),
        4 => prop_oneof![
            pick(PSEUDOS.len()).prop_map(Field::Pseudo),
            (pick(NAMES.len()), pick(VALUES.len())).prop_map(|(n, v)| Field::Regular(n, v)),
            Just(Field::Upper),
            pick(CONNECTION_FIELDS.len()).prop_map(Field::ConnectionSpecific),
            any::<bool>().prop_map(Field::Te),
            (0..5u8, 0..70_000u32).prop_map(|(k, n)| Field::ContentLength(k, n)),
            (1..40u8).prop_map(Field::Huge),
        ],
        4 => prop_oneof![
            any::<u8>().prop_map(Field::Indexed),
            any::<u8>().prop_map(Field::Dynamic),
            (pick(NAMES.len()), pick(VALUES.len())).prop_map(|(n, v)| Field::Incremental(n, v)),
            (pick(NAMES.len()), pick(VALUES.len())).prop_map(|(n, v)| Field::NeverIndexed(n, v)),
            prop_oneof![0..=4096u32, any::<u32>()].prop_map(Field::TableUpdate),
            prop::collection::vec(any::<u8>(), 0..12).prop_map(Field::Huffman),
            prop::collection::vec(any::<u8>(), 1..12).prop_map(Field::Raw),
            Just(Field::LongLength),
        ],
    ]
}

/// A well-formed request's fields (a method the service knows, a path it answers).
fn request_fields() -> impl Strategy<Value = Vec<Field>> {
    (
        prop_oneof![4 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
        pick(11),
        prop::collection::vec((0..6u8, 0..2u8), 0..3),
        prop::option::of(0..70_000u32),
        // The dynamic table: a field added to it, one taken from it.
        prop::option::weighted(0.2, (0..6u8, 0..2u8)),
        prop::option::weighted(0.2, any::<u8>()),
    )
        .prop_map(|(m, p, regular, cl, added, indexed)| {
            let mut f = vec![
                Field::Method(m),
                Field::Scheme(0),
                Field::Path(p),
                Field::Authority(0),
            ];
            f.extend(regular.into_iter().map(|(n, v)| Field::Regular(n, v)));
            f.extend(added.map(|(n, v)| Field::Incremental(n, v)));
            f.extend(indexed.map(Field::Dynamic));
            if let Some(n) = cl {
                f.push(Field::ContentLength(0, n));
            }
            f
        })
}

fn header_fields() -> impl Strategy<Value = Vec<Field>> {
    prop_oneof![
        6 => request_fields(),
        // Trailers (or a request with no pseudo-header).
        1 => prop::collection::vec((0..6u8, 0..2u8), 0..3)
            .prop_map(|v| v.into_iter().map(|(n, v)| Field::Regular(n, v)).collect()),
        2 => prop::collection::vec(field(), 0..8),
        3 => (request_fields(), prop::collection::vec(field(), 1..3), any::<u8>()).prop_map(
            |(mut f, extra, at)| {
                for e in extra {
                    let at = at as usize % (f.len() + 1);
                    f.insert(at, e);
                }
                f
            }
        ),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            prop_oneof![4 => Just(Sid::New), 1 => sid()],
            header_fields(),
            any::<bool>(),
            prop::option::weighted(0.1, any::<u8>()),
            prop::option::weighted(0.1, prop_oneof![0..=9u32, any::<u32>()]),
            prop::collection::vec(any::<u16>(), 0..3),
            prop::bool::weighted(0.05),
        )
            .prop_map(|(sid, fields, end_stream, pad, prio, splits, unfinished)| Op::Headers {
                sid,
                fields,
                end_stream,
                pad,
                prio,
                splits,
                unfinished,
            }),
        6 => (
            open_sid(),
            prop_oneof![4 => 0..=200u16, 2 => 0..=16_384u16, 1 => any::<u16>()],
            prop::option::weighted(0.15, any::<u8>()),
            prop::bool::weighted(0.4),
        )
            .prop_map(|(sid, len, pad, end)| Op::Data { sid, len, pad, end }),
        2 => (open_sid(), prop_oneof![0..=14u32, any::<u32>()])
            .prop_map(|(sid, code)| Op::Rst { sid, code }),
        2 => (prop::bool::weighted(0.2), any::<u64>())
            .prop_map(|(ack, payload)| Op::Ping { ack, payload }),
        2 => (prop::bool::weighted(0.2), prop::collection::vec(setting_entry(), 0..4))
            .prop_map(|(ack, entries)| Op::Settings { ack, entries }),
        4 => (
            prop_oneof![2 => Just(Sid::Zero), 3 => open_sid()],
            interesting_u32(),
        )
            .prop_map(|(sid, inc)| Op::WindowUpdate { sid, inc }),
        1 => (prop_oneof![0..=20u32, any::<u32>()], prop_oneof![0..=14u32, any::<u32>()], 0..4u8)
            .prop_map(|(last, code, debug)| Op::Goaway { last, code, debug }),
        1 => (open_sid(), prop_oneof![0..=9u32, any::<u32>()], prop_oneof![8 => Just(5u8), 1 => 0..9u8])
            .prop_map(|(sid, dep, len)| Op::Priority { sid, dep, len }),
        2 => (
            prop_oneof![0..=12u8, any::<u8>()],
            any::<u8>(),
            sid(),
            prop::collection::vec(any::<u8>(), 0..24),
        )
            .prop_map(|(kind, flags, sid, payload)| Op::Raw { kind, flags, sid, payload }),
        1 => prop_oneof![3 => Just(Op::Pause), 1 => Just(Op::Shutdown)],
        // Stream frames on an even id below the highest the client opened (idle: §5.1.1).
        1 => (any::<u8>(), prop::bool::ANY, interesting_u32()).prop_map(|(i, rst, n)| {
            if rst {
                Op::Rst { sid: Sid::EvenBelow(i), code: n % 14 }
            } else {
                Op::WindowUpdate { sid: Sid::EvenBelow(i), inc: n }
            }
        }),
        1 => continuation_flood(),
    ]
}

/// A header block cut into many (tiny or empty) CONTINUATION frames (CVE-2024-27316,
/// CVE-2019-9518): past the block limit, or the empty-frame one, the connection must end.
fn continuation_flood() -> impl Strategy<Value = Op> {
    (
        request_fields(),
        prop_oneof![0..=50u16, 900..=1100u16, 0..=3000u16],
        prop_oneof![Just(0u8), 1..=4u8, any::<u8>()],
        any::<bool>(),
    )
        .prop_map(|(fields, frames, size, end)| Op::ContinuationFlood {
            fields,
            frames,
            size,
            end,
        })
}

/// A frame on a stream the client reset itself (§5.1: STREAM_CLOSED, or dropped).
fn after_own_reset() -> impl Strategy<Value = Op> {
    (
        any::<u8>(),
        0..=14u32,
        prop_oneof![
            (
                0..=300u16,
                prop::option::weighted(0.2, 0..50u8),
                any::<bool>()
            )
                .prop_map(|(len, pad, end)| Op::Data {
                    sid: Sid::Opened(0),
                    len,
                    pad,
                    end
                }),
            (1..=70_000u32).prop_map(|inc| Op::WindowUpdate {
                sid: Sid::Opened(0),
                inc
            }),
            prop::collection::vec((0..6u8, 0..2u8), 0..3).prop_map(|f| Op::Headers {
                sid: Sid::Opened(0),
                fields: f.into_iter().map(|(n, v)| Field::Regular(n, v)).collect(),
                end_stream: true,
                pad: None,
                prio: None,
                splits: Vec::new(),
                unfinished: false,
            }),
            Just(Op::Priority {
                sid: Sid::Opened(0),
                dep: 7,
                len: 5
            }),
            (0..=14u32).prop_map(|code| Op::Rst {
                sid: Sid::Opened(0),
                code
            }),
        ],
        prop::bool::weighted(0.3),
    )
        .prop_map(|(i, code, mut then, pause)| {
            // The same stream for both.
            match &mut then {
                Op::Data { sid, .. }
                | Op::WindowUpdate { sid, .. }
                | Op::Headers { sid, .. }
                | Op::Priority { sid, .. }
                | Op::Rst { sid, .. } => *sid = Sid::Opened(i),
                _ => {}
            }
            let mut seq = vec![Op::Rst {
                sid: Sid::Opened(i),
                code,
            }];
            if pause {
                seq.push(Op::Pause);
            }
            seq.push(then);
            Op::Seq(seq)
        })
}

/// What a well-behaved (if demanding) client sends: requests, bodies, trailers, window
/// updates, pings, settings, resets of its streams, unknown frame types.
fn valid_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            request_fields(),
            any::<bool>(),
            prop::option::weighted(0.1, 0..20u8),
            prop::option::weighted(0.1, 1000..2000u32),
            prop::collection::vec(any::<u16>(), 0..3),
        )
            .prop_map(|(fields, end_stream, pad, prio, splits)| Op::Headers {
                sid: Sid::New,
                fields,
                end_stream,
                pad,
                prio,
                splits,
                unfinished: false,
            }),
        1 => (any::<u8>(), prop::collection::vec((0..6u8, 0..2u8), 0..3)).prop_map(|(i, f)| {
            Op::Headers {
                sid: Sid::Opened(i),
                fields: f.into_iter().map(|(n, v)| Field::Regular(n, v)).collect(),
                end_stream: true,
                pad: None,
                prio: None,
                splits: Vec::new(),
                unfinished: false,
            }
        }),
        8 => (
            any::<u8>(),
            prop_oneof![4 => 0..=200u16, 2 => 0..=16_000u16],
            prop::option::weighted(0.15, 0..100u8),
            prop::bool::weighted(0.4),
        )
            .prop_map(|(i, len, pad, end)| Op::Data { sid: Sid::Opened(i), len, pad, end }),
        1 => (any::<u8>(), 0..=14u32).prop_map(|(i, code)| Op::Rst { sid: Sid::Opened(i), code }),
        2 => (Just(false), any::<u64>()).prop_map(|(ack, payload)| Op::Ping { ack, payload }),
        1 => prop::collection::vec(valid_setting_entry(), 0..3)
            .prop_map(|entries| Op::Settings { ack: false, entries }),
        1 => Just(Op::Settings { ack: true, entries: Vec::new() }),
        // SETTINGS_HEADER_TABLE_SIZE changed mid-connection (our encoder owes a size update).
        1 => prop_oneof![Just(0u32), 0..=8192u32, Just(4096u32)].prop_map(|v| Op::Settings {
            ack: false,
            entries: vec![(setting::HEADER_TABLE_SIZE, v)],
        }),
        1 => after_own_reset(),
        4 => (
            prop_oneof![Just(None), any::<u8>().prop_map(Some)],
            prop_oneof![1..=1000u32, 1..=200_000u32, 1..=1u32 << 24],
        )
            .prop_map(|(i, inc)| Op::WindowUpdate { sid: i.map_or(Sid::Zero, Sid::Opened), inc }),
        1 => any::<u8>().prop_map(|i| Op::Priority { sid: Sid::Opened(i), dep: 7, len: 5 }),
        1 => (10..=255u8, any::<u8>(), prop::collection::vec(any::<u8>(), 0..24)).prop_map(
            |(kind, flags, payload)| Op::Raw { kind, flags, sid: Sid::Zero, payload }
        ),
        2 => Just(Op::Pause),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<u32>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<u32>().prop_map(|at| Mutation::Truncate { at }),
        2 => (any::<u32>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<u32>(), 1..20u8).prop_map(|(at, len)| Mutation::Delete { at, len }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let server = (
        prop_oneof![1..=4u32, Just(100u32)],
        prop_oneof![Just(16 * 1024u32), 64..=2048u32],
        prop_oneof![Just(1024 * 1024u32), Just(65_535), 0..=70_000u32],
        prop_oneof![Just(4 * 1024 * 1024u32), 0..=200_000u32],
        prop_oneof![4 => Just(16_384u32), 1 => 16_384..=70_000u32],
        1..=60u8,
    )
        .prop_map(
            |(max_streams, header_list, initial_window, conn_window, max_frame, stall_secs)| {
                ServerCfg {
                    max_streams,
                    header_list,
                    initial_window,
                    conn_window,
                    max_frame,
                    stall_secs,
                }
            },
        );
    (
        server,
        prop_oneof![
            4 => prop::collection::vec(valid_setting_entry(), 0..3),
            1 => prop::collection::vec(setting_entry(), 0..3),
        ],
        prop_oneof![
            // A well-behaved client, with or without a few faults among its frames.
            3 => prop::collection::vec(valid_op(), 0..30),
            3 => (
                prop::collection::vec(valid_op(), 0..30),
                prop::collection::vec((op(), any::<u8>()), 1..3),
            )
                .prop_map(|(mut ops, faults)| {
                    for (op, at) in faults {
                        let at = at as usize % (ops.len() + 1);
                        ops.insert(at, op);
                    }
                    ops
                }),
            2 => prop::collection::vec(op(), 0..30),
        ],
        prop_oneof![4 => Just(Vec::new()), 1 => prop::collection::vec(mutation(), 1..4)],
        0..=24u8,
        prop_oneof![Just(u16::MAX), 1..=64u16, 1..=4096u16],
        prop_oneof![Just(1024u16), 64..=u16::MAX],
        prop_oneof![
            3 => Just(ReadMode::Eager),
            1 => (1..=200u8).prop_map(ReadMode::Slow),
            1 => Just(ReadMode::Never),
        ],
        any::<bool>(),
    )
        .prop_map(
            |(server, client_settings, ops, mutations, prefix, chunk, pipe, read, ping_at_end)| {
                Case {
                    server,
                    client_settings,
                    ops,
                    mutations,
                    prefix,
                    chunk,
                    pipe,
                    read,
                    ping_at_end,
                }
            },
        )
}

// ---- Writing a case out ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Shutdown,
    Pause,
}

struct Input {
    bytes: Vec<u8>,
    /// (offset, what the client does once the bytes before it are written).
    events: Vec<(usize, Event)>,
}

fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, high: u8, mut v: u64) {
    let max = (1u64 << prefix_bits) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0, s.len() as u64);
    out.extend_from_slice(s);
}

/// A literal field without indexing, new name.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name);
    hpack_str(out, value);
}

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let l = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    out.put_u32(stream);
    out.extend_from_slice(payload);
}

struct Writer {
    next_id: u32,
    opened: Vec<u32>,
    /// Fields the case's blocks added to the HPACK dynamic table.
    inserted: u32,
    out: Vec<u8>,
    /// (offset, what the client does once the bytes before it are written).
    events: Vec<(usize, Event)>,
    max_frame: usize,
}

impl Writer {
    /// None: a frame for an open stream when none is.
    fn sid_or_skip(&mut self, s: &Sid) -> Option<u32> {
        match s {
            Sid::Opened(i) if !self.opened.is_empty() => {
                Some(self.opened[*i as usize % self.opened.len()])
            }
            Sid::Opened(_) => None,
            other => Some(self.sid(other)),
        }
    }

    fn op(&mut self, op: &Op) {
        match op {
            Op::Headers {
                sid,
                fields,
                end_stream,
                pad,
                prio,
                splits,
                unfinished,
            } => {
                let Some(id) = self.sid_or_skip(sid) else {
                    return;
                };
                let mut block = Vec::new();
                for f in fields {
                    self.encode_field(&mut block, f, id);
                }
                let mut first = Vec::new();
                let mut flags = if *end_stream { flag::END_STREAM } else { 0 };
                if let Some(p) = pad {
                    flags |= flag::PADDED;
                    first.push(*p);
                }
                if let Some(dep) = prio {
                    flags |= flag::PRIORITY;
                    let dep = if *dep == 0 { id } else { *dep };
                    first.extend_from_slice(&dep.to_be_bytes());
                    first.push(15);
                }
                let overhead = first.len() + pad.map_or(0, usize::from);
                let room = self.max_frame.saturating_sub(overhead).max(1);
                let mut cuts: Vec<usize> = splits
                    .iter()
                    .map(|&s| s as usize % (block.len() + 1))
                    .collect();
                cuts.sort_unstable();
                let mut pieces = Vec::new();
                let mut start = 0;
                for cut in cuts.into_iter().chain([block.len()]) {
                    let cut = cut.max(start);
                    let mut at = start;
                    // The frame size splits too: room in HEADERS, max_frame in CONTINUATION.
                    while cut - at
                        > if pieces.is_empty() {
                            room
                        } else {
                            self.max_frame
                        }
                    {
                        let n = if pieces.is_empty() {
                            room
                        } else {
                            self.max_frame
                        };
                        pieces.push(&block[at..at + n]);
                        at += n;
                    }
                    if cut > at || pieces.is_empty() || cut == block.len() {
                        pieces.push(&block[at..cut]);
                    }
                    start = cut;
                }
                for (i, piece) in pieces.iter().enumerate() {
                    let last = i + 1 == pieces.len();
                    let end_headers = if last && !unfinished {
                        flag::END_HEADERS
                    } else {
                        0
                    };
                    if i == 0 {
                        let mut payload = first.clone();
                        payload.extend_from_slice(piece);
                        payload.resize(payload.len() + pad.map_or(0, usize::from), 0);
                        put_frame(
                            &mut self.out,
                            kind::HEADERS,
                            flags | end_headers,
                            id,
                            &payload,
                        );
                    } else {
                        put_frame(&mut self.out, kind::CONTINUATION, end_headers, id, piece);
                    }
                }
            }
            Op::Data { sid, len, pad, end } => {
                let Some(id) = self.sid_or_skip(sid) else {
                    return;
                };
                let mut payload = Vec::new();
                let mut flags = if *end { flag::END_STREAM } else { 0 };
                if let Some(p) = pad {
                    flags |= flag::PADDED;
                    payload.push(*p);
                }
                payload.resize(payload.len() + *len as usize, b'q');
                payload.resize(payload.len() + pad.map_or(0, usize::from), 0);
                put_frame(&mut self.out, kind::DATA, flags, id, &payload);
            }
            Op::Rst { sid, code } => {
                let Some(id) = self.sid_or_skip(sid) else {
                    return;
                };
                put_frame(&mut self.out, kind::RST_STREAM, 0, id, &code.to_be_bytes());
            }
            Op::Ping { ack, payload } => {
                let flags = if *ack { flag::ACK } else { 0 };
                put_frame(&mut self.out, kind::PING, flags, 0, &payload.to_be_bytes());
            }
            Op::Settings { ack, entries } => {
                let mut payload = Vec::new();
                for &(id, value) in entries {
                    payload.extend_from_slice(&id.to_be_bytes());
                    payload.extend_from_slice(&value.to_be_bytes());
                }
                let flags = if *ack { flag::ACK } else { 0 };
                put_frame(&mut self.out, kind::SETTINGS, flags, 0, &payload);
            }
            Op::WindowUpdate { sid, inc } => {
                let Some(id) = self.sid_or_skip(sid) else {
                    return;
                };
                put_frame(
                    &mut self.out,
                    kind::WINDOW_UPDATE,
                    0,
                    id,
                    &inc.to_be_bytes(),
                );
            }
            Op::Goaway { last, code, debug } => {
                let mut payload = last.to_be_bytes().to_vec();
                payload.extend_from_slice(&code.to_be_bytes());
                payload.resize(payload.len() + *debug as usize, b'g');
                put_frame(&mut self.out, kind::GOAWAY, 0, 0, &payload);
            }
            Op::Priority { sid, dep, len } => {
                let Some(id) = self.sid_or_skip(sid) else {
                    return;
                };
                let dep = if *dep == 0 { id } else { *dep };
                let mut payload = dep.to_be_bytes().to_vec();
                payload.push(15);
                payload.resize(*len as usize, 0);
                put_frame(&mut self.out, kind::PRIORITY, 0, id, &payload);
            }
            Op::Raw {
                kind,
                flags,
                sid,
                payload,
            } => {
                let Some(id) = self.sid_or_skip(sid) else {
                    return;
                };
                put_frame(&mut self.out, *kind, *flags, id, payload);
            }
            Op::Shutdown => self.events.push((self.out.len(), Event::Shutdown)),
            Op::Pause => self.events.push((self.out.len(), Event::Pause)),
            Op::ContinuationFlood {
                fields,
                frames,
                size,
                end,
            } => {
                let id = self.sid(&Sid::New);
                let mut block = Vec::new();
                for f in fields {
                    self.encode_field(&mut block, f, id);
                }
                let first_end = if *frames == 0 && *end {
                    flag::END_HEADERS
                } else {
                    0
                };
                put_frame(&mut self.out, kind::HEADERS, first_end, id, &block);
                // `accept-encoding: gzip, deflate` (static index 16), a regular field per byte.
                let filler = vec![0x90; *size as usize];
                for i in 0..*frames {
                    let flags = if i + 1 == *frames && *end {
                        flag::END_HEADERS
                    } else {
                        0
                    };
                    put_frame(&mut self.out, kind::CONTINUATION, flags, id, &filler);
                }
            }
            Op::Seq(ops) => {
                for op in ops {
                    self.op(op);
                }
            }
        }
    }

    /// Encodes one field; a `:path` gets `s=<stream id>` in its query, unique per stream (the
    /// service answers it in `x-path`).
    fn encode_field(&mut self, out: &mut Vec<u8>, f: &Field, id: u32) {
        let at = |list: &[&'static str], i: u8| list[i as usize % list.len()].as_bytes();
        match f {
            Field::Method(i) => literal(out, b":method", at(METHODS, *i)),
            Field::Scheme(i) => literal(out, b":scheme", at(SCHEMES, *i)),
            Field::Path(i) => {
                let path = PATHS[*i as usize % PATHS.len()];
                if path.starts_with('/') {
                    let sep = if path.contains('?') { '&' } else { '?' };
                    literal(out, b":path", format!("{path}{sep}s={id}").as_bytes());
                } else {
                    literal(out, b":path", path.as_bytes());
                }
            }
            Field::Authority(i) => literal(out, b":authority", at(AUTHORITIES, *i)),
            Field::Pseudo(i) => literal(out, at(PSEUDOS, *i), b"1"),
            Field::Regular(n, v) => literal(out, at(NAMES, *n), at(VALUES, *v)),
            Field::Upper => literal(out, b"X-Upper", b"v"),
            Field::ConnectionSpecific(i) => literal(out, at(CONNECTION_FIELDS, *i), b"close"),
            Field::Te(trailers) => {
                literal(out, b"te", if *trailers { b"trailers" } else { b"gzip" })
            }
            Field::ContentLength(k, n) => match k % 5 {
                0 => literal(out, b"content-length", n.to_string().as_bytes()),
                1 => literal(out, b"content-length", b"12a"),
                2 => literal(out, b"content-length", b"99999999999999999999999"),
                3 => literal(out, b"content-length", b""),
                _ => {
                    literal(out, b"content-length", n.to_string().as_bytes());
                    literal(out, b"content-length", (n + 1).to_string().as_bytes());
                }
            },
            Field::Huge(kib) => literal(out, b"x-huge", &vec![b'h'; *kib as usize * 1024]),
            Field::Indexed(i) => hpack_int(out, 7, 0x80, u64::from(*i)),
            // Entries are at most 54 bytes: 32 of the last fit in the 4,096 of the table.
            Field::Dynamic(i) if self.inserted > 0 => {
                let back = u32::from(*i) % self.inserted.min(32);
                hpack_int(out, 7, 0x80, 62 + u64::from(back));
            }
            Field::Dynamic(_) => {}
            Field::Incremental(n, v) => {
                self.inserted += 1;
                out.push(0x40);
                hpack_str(out, at(NAMES, *n));
                hpack_str(out, at(VALUES, *v));
            }
            Field::NeverIndexed(n, v) => {
                out.push(0x10);
                hpack_str(out, at(NAMES, *n));
                hpack_str(out, at(VALUES, *v));
            }
            Field::TableUpdate(size) => hpack_int(out, 5, 0x20, u64::from(*size)),
            Field::Huffman(bytes) => {
                out.push(0x00);
                hpack_str(out, b"x-huff");
                hpack_int(out, 7, 0x80, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
            Field::Raw(bytes) => out.extend_from_slice(bytes),
            Field::LongLength => {
                out.push(0x00);
                hpack_int(out, 7, 0, 1000);
                out.extend_from_slice(b"short");
            }
        }
    }

    fn sid(&mut self, s: &Sid) -> u32 {
        match s {
            Sid::Opened(i) => self.sid(&Sid::Open(*i)),
            Sid::New => {
                let id = self.next_id;
                self.next_id += 2;
                self.opened.push(id);
                id
            }
            Sid::Open(i) => {
                if self.opened.is_empty() {
                    1
                } else {
                    self.opened[*i as usize % self.opened.len()]
                }
            }
            Sid::Zero => 0,
            Sid::Even => self.next_id + 1,
            Sid::EvenBelow(i) => match self.opened.get(*i as usize % self.opened.len().max(1)) {
                Some(&id) if id > 1 => id - 1,
                _ => self.next_id + 1,
            },
            Sid::Raw(id) => id & 0x7fff_ffff,
        }
    }
}

fn write_case(case: &Case) -> Input {
    let mut out = frame::PREFACE.to_vec();
    let mut entries = Vec::new();
    for &(id, value) in &case.client_settings {
        entries.extend_from_slice(&id.to_be_bytes());
        entries.extend_from_slice(&value.to_be_bytes());
    }
    put_frame(&mut out, kind::SETTINGS, 0, 0, &entries);
    let mut w = Writer {
        next_id: 1,
        opened: Vec::new(),
        inserted: 0,
        out,
        events: Vec::new(),
        max_frame: case.server.max_frame as usize,
    };
    for op in &case.ops {
        w.op(op);
    }
    let Writer {
        mut out, events, ..
    } = w;
    for m in &case.mutations {
        if out.is_empty() {
            break;
        }
        // Mostly past the preface: a broken preface is one quick error.
        let at = |at: u32, len: usize| {
            if at.is_multiple_of(8) || len <= 24 {
                at as usize % len
            } else {
                24 + at as usize % (len - 24)
            }
        };
        match m {
            Mutation::Flip { at: a, bit } => {
                let i = at(*a, out.len());
                out[i] ^= 1 << bit;
            }
            Mutation::Truncate { at: a } => {
                let i = at(*a, out.len());
                out.truncate(i);
            }
            Mutation::Insert { at: a, bytes } => {
                let i = at(*a, out.len());
                out.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete { at: a, len } => {
                let i = at(*a, out.len());
                let j = (i + *len as usize).min(out.len());
                out.drain(i..j);
            }
        }
    }
    let mut events = events;
    for e in &mut events {
        e.0 = e.0.min(out.len());
    }
    Input { bytes: out, events }
}

// ---- What the client sent, as the server reads it ----

#[derive(Debug, Default)]
struct Sent {
    /// The preface and a first frame were read whole.
    started: bool,
    /// The input ends at a frame's end, outside a header block, before any frame the server
    /// refuses for its size.
    aligned: bool,
    block_open: bool,
    /// The largest SETTINGS_MAX_FRAME_SIZE the client announced (or the default).
    max_frame: u32,
    /// The largest SETTINGS_INITIAL_WINDOW_SIZE the client announced (or the default).
    initial_window: i64,
    conn_increments: i64,
    stream_increments: HashMap<u32, i64>,
    pings: HashSet<[u8; 8]>,
    settings: usize,
    /// The highest odd stream id of a HEADERS frame.
    max_stream: u32,
    /// The streams whose request block the server decoded (as the server decodes it).
    requests: HashMap<u32, SentRequest>,
    /// DATA frames' lengths (padding included), on the connection and per stream.
    conn_consumed: i64,
    consumed: HashMap<u32, i64>,
    /// Per SETTINGS frame (not ACK) in order, the least SETTINGS_HEADER_TABLE_SIZE in it.
    table_sizes: Vec<Option<u32>>,
}

#[derive(Debug, Default)]
struct SentRequest {
    method: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    /// The DATA payloads up to the first END_STREAM (padding removed), and whether one came.
    body: Vec<u8>,
    ended: bool,
}

/// The client's header blocks, decoded as the server decodes them (one HPACK decoder, whole
/// blocks, the same table limit), for the requests' `:path`s.
struct SentBlocks {
    decoder: loona_hpack::Decoder<'static>,
    /// HEADERS without END_HEADERS: (stream, bytes so far, END_STREAM).
    open: Option<(u32, Vec<u8>, bool)>,
    /// The highest stream id a decoded block opened (the server's `max_client_stream`).
    max_opened: u32,
    /// A block the server cannot decode, or a frame it ends the connection for: it reads
    /// no further.
    dead: bool,
}

impl SentBlocks {
    fn frame(&mut self, head: &Head, payload: &[u8], s: &mut Sent) {
        if self.dead {
            return;
        }
        if let Some((id, _, _)) = &self.open
            && (head.kind != kind::CONTINUATION || head.stream != *id)
        {
            self.dead = true;
            return;
        }
        let (id, block, end_stream) = match head.kind {
            kind::HEADERS => {
                if head.stream == 0 || head.stream.is_multiple_of(2) {
                    self.dead = true;
                    return;
                }
                let mut p = payload;
                let mut pad = 0;
                if head.flags & flag::PADDED != 0 {
                    let Some((&n, rest)) = p.split_first() else {
                        self.dead = true;
                        return;
                    };
                    pad = n as usize;
                    p = rest;
                }
                if head.flags & flag::PRIORITY != 0 {
                    if p.len() < 5 {
                        self.dead = true;
                        return;
                    }
                    p = &p[5..];
                }
                if pad > p.len() {
                    self.dead = true;
                    return;
                }
                let p = &p[..p.len() - pad];
                let end_stream = head.flags & flag::END_STREAM != 0;
                if head.flags & flag::END_HEADERS == 0 {
                    self.open = Some((head.stream, p.to_vec(), end_stream));
                    return;
                }
                (head.stream, p.to_vec(), end_stream)
            }
            kind::CONTINUATION => {
                let Some((id, mut bytes, end_stream)) = self.open.take() else {
                    self.dead = true;
                    return;
                };
                bytes.extend_from_slice(payload);
                if head.flags & flag::END_HEADERS == 0 {
                    self.open = Some((id, bytes, end_stream));
                    return;
                }
                (id, bytes, end_stream)
            }
            kind::DATA => {
                let id = head.stream;
                s.conn_consumed += i64::from(head.len);
                *s.consumed.entry(id).or_default() += i64::from(head.len);
                let mut p = payload;
                if head.flags & flag::PADDED != 0 {
                    match p.split_first() {
                        Some((&n, rest)) if (n as usize) < payload.len() => {
                            p = &rest[..rest.len() - n as usize];
                        }
                        _ => {
                            self.dead = true;
                            return;
                        }
                    }
                }
                if let Some(r) = s.requests.get_mut(&id)
                    && !r.ended
                {
                    r.body.extend_from_slice(p);
                    r.ended = head.flags & flag::END_STREAM != 0;
                }
                return;
            }
            _ => return,
        };
        let mut fields = Vec::new();
        if self
            .decoder
            .decode_with_cb(&block, |n, v| fields.push((n.into_owned(), v.into_owned())))
            .is_err()
        {
            self.dead = true;
            return;
        }
        if id <= self.max_opened {
            // Trailers: END_STREAM ends the request's body.
            if let Some(r) = s.requests.get_mut(&id)
                && end_stream
            {
                r.ended = true;
            }
            return;
        }
        self.max_opened = id;
        let first = |name: &[u8]| fields.iter().find(|f| f.0 == name).map(|f| f.1.clone());
        s.requests.insert(
            id,
            SentRequest {
                method: first(b":method"),
                path: first(b":path"),
                body: Vec::new(),
                ended: end_stream,
            },
        );
    }
}

fn read_sent(bytes: &[u8], server_max_frame: u32) -> Sent {
    let mut s = Sent {
        max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
        initial_window: i64::from(frame::DEFAULT_WINDOW),
        ..Default::default()
    };
    if bytes.len() < 24 || &bytes[..24] != frame::PREFACE {
        return s;
    }
    let mut pos = 24;
    let mut frames = 0;
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(4096);
    let mut blocks = SentBlocks {
        decoder,
        open: None,
        max_opened: 0,
        dead: false,
    };
    loop {
        if pos == bytes.len() {
            s.aligned = frames > 0 && !s.block_open;
            return s;
        }
        if bytes.len() - pos < 9 {
            return s;
        }
        let head = Head::parse(&bytes[pos..]);
        if head.len > server_max_frame {
            return s;
        }
        let end = pos + 9 + head.len as usize;
        if end > bytes.len() {
            return s;
        }
        let payload = &bytes[pos + 9..end];
        pos = end;
        frames += 1;
        if frames == 1 {
            s.started = true;
        }
        blocks.frame(&head, payload, &mut s);
        match head.kind {
            kind::SETTINGS
                if head.flags & flag::ACK == 0
                    && head.stream == 0
                    && payload.len().is_multiple_of(6) =>
            {
                s.settings += 1;
                s.table_sizes.push(None);
                for e in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([e[0], e[1]]);
                    let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
                    if id == setting::MAX_FRAME_SIZE && v <= frame::MAX_MAX_FRAME_SIZE {
                        s.max_frame = s.max_frame.max(v);
                    }
                    if id == setting::INITIAL_WINDOW_SIZE {
                        s.initial_window = s.initial_window.max(i64::from(v));
                    }
                    if id == setting::HEADER_TABLE_SIZE
                        && let Some(least) = s.table_sizes.last_mut()
                    {
                        *least = Some(least.map_or(v, |l| l.min(v)));
                    }
                }
            }
            kind::WINDOW_UPDATE if head.len == 4 => {
                let inc = i64::from(u32::from_be_bytes(payload.try_into().unwrap()) & 0x7fff_ffff);
                if head.stream == 0 {
                    s.conn_increments += inc;
                } else {
                    *s.stream_increments.entry(head.stream).or_default() += inc;
                }
            }
            kind::PING if head.len == 8 && head.flags & flag::ACK == 0 => {
                s.pings.insert(payload.try_into().unwrap());
            }
            kind::HEADERS => {
                if head.stream % 2 == 1 {
                    s.max_stream = s.max_stream.max(head.stream);
                }
                s.block_open = head.flags & flag::END_HEADERS == 0;
            }
            kind::CONTINUATION if head.flags & flag::END_HEADERS != 0 => {
                s.block_open = false;
            }
            _ => {}
        }
    }
}

// ---- Checking what the server wrote ----

#[derive(Default)]
struct OutStream {
    /// The response head was sent.
    head: bool,
    ended: bool,
    reset: bool,
    data: i64,
    /// The response body, kept when it must equal the request's (`/echo`, `/mirror`).
    body: Option<Vec<u8>>,
}

/// What the connection held once the client's input was all handled (its final PING
/// answered) and every task was idle: what it has not given back of the client's windows.
#[derive(Debug, Default)]
struct Quiet {
    /// Output bytes the client had read by then.
    out_len: usize,
    conn_released: i64,
    conn_release_at: i64,
    stream_release_at: i64,
    /// Request DATA held unread, on every stream.
    held: i64,
    /// Streams still receiving, reset by nobody, their body still read: (id, bytes read
    /// and not given back yet, bytes held unread).
    open: Vec<(u32, i64, i64)>,
}

impl Quiet {
    fn take(shared: &super::streams::SharedRef, out_len: usize) -> Quiet {
        let sh = super::streams::lock(shared);
        let held = |s: &super::streams::Stream| {
            (s.recv_data.iter().map(Bytes::len).sum::<usize>() + s.recv_tail.len()) as i64
        };
        Quiet {
            out_len,
            conn_released: i64::from(sh.conn_released),
            conn_release_at: i64::from(sh.conn_release_at),
            stream_release_at: i64::from(sh.stream_release_at),
            held: sh.streams.values().map(held).sum(),
            open: sh
                .streams
                .iter()
                .filter(|(_, s)| {
                    s.recv == super::streams::Recv::Open && s.reset.is_none() && !s.body_gone
                })
                .map(|(&id, s)| (id, i64::from(s.recv_released), held(s)))
                .collect(),
        }
    }
}

/// A header block's leading dynamic table size update (RFC 7541 §6.3), if it has one: its
/// value and length.
fn table_size_update(block: &[u8]) -> Option<(u64, usize)> {
    let (&first, rest) = block.split_first()?;
    if first & 0xe0 != 0x20 {
        return None;
    }
    let mut v = u64::from(first & 0x1f);
    if v < 0x1f {
        return Some((v, 1));
    }
    for (i, &b) in rest.iter().enumerate().take(8) {
        v += u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 2));
        }
    }
    None
}

/// Whether `serve` may have ended with its output cut mid-frame: an I/O error (the rest never
/// written), or a connection error whose close gave up on a client that took nothing of its
/// last frames (`ReadMode::Never`).
fn cut_short(e: &Error) -> bool {
    e.io_error().is_some() || e.goaway_unsent()
}

fn check_output(
    out: &[u8],
    sent: &Sent,
    result: &Result<(), Error>,
    cfg: &ServerCfg,
    quiet: Option<&Quiet>,
) -> Result<(), String> {
    let mut decoder = loona_hpack::Decoder::new();
    let mut pos = 0;
    let mut streams: HashMap<u32, OutStream> = HashMap::new();
    // The window given back (WINDOW_UPDATE), on the connection and per stream; as it was
    // when the client found the connection idle.
    let initial_update = cfg.conn_window.saturating_sub(frame::DEFAULT_WINDOW);
    let mut given_conn = 0i64;
    let mut given: HashMap<u32, i64> = HashMap::new();
    let mut given_at_quiet = None;
    // Our HPACK encoder's table size (RFC 7541 §4.2): a SETTINGS_HEADER_TABLE_SIZE below it,
    // acknowledged, is owed a size update at the start of our next block.
    let mut table_size = 4096u64;
    let mut update_due: Option<u64> = None;
    // An unfinished header block: (stream, bytes, trailers).
    let mut block: Option<(u32, Vec<u8>, bool)> = None;
    let mut conn_data = 0i64;
    let mut settings = 0;
    let mut acks = 0;
    let mut goaways: Vec<(u32, u32)> = Vec::new();
    let mut index = 0;
    while pos < out.len() {
        if quiet.is_some_and(|q| q.out_len == pos) {
            given_at_quiet = Some((given_conn, given.clone()));
        }
        if out.len() - pos < 9 {
            // An input cut mid-frame ends `serve` at once (I/O error), its output unflushed;
            // a connection error's close gives up on a client that reads nothing.
            if result.as_ref().is_err_and(cut_short) {
                break;
            }
            return Err(format!(
                "a partial frame header at the end ({} bytes)",
                out.len() - pos
            ));
        }
        let head = Head::parse(&out[pos..]);
        let end = pos + 9 + head.len as usize;
        if end > out.len() {
            // An input cut mid-frame ends `serve` at once (I/O error), its output unflushed;
            // a connection error's close gives up on a client that reads nothing.
            if result.as_ref().is_err_and(cut_short) {
                break;
            }
            return Err(format!("a partial frame at the end: {head:?}"));
        }
        if out[pos + 5] & 0x80 != 0 {
            return Err(format!("frame {index}: the reserved bit set"));
        }
        let p = &out[pos + 9..end];
        pos = end;
        let at = format!("frame {index} {head:?}");
        index += 1;
        if goaways.last().is_some_and(|g| g.1 != 0) {
            return Err(format!("{at}: after a GOAWAY with an error"));
        }
        if head.len > sent.max_frame {
            return Err(format!("{at}: longer than the client's max frame size"));
        }
        if index == 1 && (head.kind != kind::SETTINGS || head.flags & flag::ACK != 0) {
            return Err(format!("{at}: the first frame is not our SETTINGS"));
        }
        if let Some((id, _, _)) = &block
            && (head.kind != kind::CONTINUATION || head.stream != *id)
        {
            return Err(format!("{at}: inside our header block on stream {id}"));
        }
        let stream_ok = |id: u32| id % 2 == 1 && id <= sent.max_stream;
        match head.kind {
            kind::SETTINGS => {
                if head.stream != 0 {
                    return Err(format!("{at}: on a stream"));
                }
                if head.flags & flag::ACK != 0 {
                    acks += 1;
                    if head.len != 0 || acks > sent.settings {
                        return Err(format!("{at}: an ACK with a payload or unasked"));
                    }
                    if let Some(v) = sent.table_sizes[acks - 1].map(u64::from)
                        && v < table_size
                    {
                        update_due = Some(update_due.map_or(v, |d| d.min(v)));
                    }
                } else {
                    settings += 1;
                    if settings > 1 || !head.len.is_multiple_of(6) {
                        return Err(format!("{at}: a second or malformed SETTINGS"));
                    }
                }
            }
            // Our own PING: the graceful close's, right after its first GOAWAY.
            kind::PING
                if head.flags == 0
                    && head.stream == 0
                    && p == b"goaway!\0"
                    && goaways == [(0x7fff_ffff, 0)] => {}
            kind::PING => {
                if head.stream != 0
                    || head.len != 8
                    || head.flags != flag::ACK
                    || !sent.pings.contains(&<[u8; 8]>::try_from(p).unwrap())
                {
                    return Err(format!("{at}: not the ACK of a PING the client sent"));
                }
            }
            kind::GOAWAY => {
                if head.stream != 0 || head.len != 8 {
                    return Err(format!("{at}: malformed"));
                }
                let last = u32::from_be_bytes(p[..4].try_into().unwrap());
                let code = u32::from_be_bytes(p[4..8].try_into().unwrap());
                // 2^31-1: a graceful close's first GOAWAY (it refuses nothing yet).
                let first_graceful = last == 0x7fff_ffff && code == 0 && goaways.is_empty();
                if last != 0 && !stream_ok(last) && !first_graceful {
                    return Err(format!("{at}: last stream {last} never opened"));
                }
                if goaways.last().is_some_and(|g| g.0 < last) {
                    return Err(format!("{at}: last stream raised to {last}"));
                }
                goaways.push((last, code));
            }
            kind::WINDOW_UPDATE => {
                if head.len != 4 {
                    return Err(format!("{at}: malformed"));
                }
                let inc = u32::from_be_bytes(p.try_into().unwrap());
                if inc == 0 || inc > 0x7fff_ffff {
                    return Err(format!("{at}: increment {inc}"));
                }
                // Never more than the client sent (padding included), besides the first
                // update that opens the connection window to its configured size.
                if head.stream == 0 && !(index == 2 && initial_update > 0) {
                    given_conn += i64::from(inc);
                    if given_conn > sent.conn_consumed {
                        return Err(format!(
                            "{at}: {given_conn} given back of the connection window, {} sent",
                            sent.conn_consumed
                        ));
                    }
                } else if head.stream == 0 && inc != initial_update {
                    return Err(format!("{at}: not the configured window {initial_update}"));
                }
                if head.stream != 0 {
                    let g = given.entry(head.stream).or_default();
                    *g += i64::from(inc);
                    let c = sent.consumed.get(&head.stream).copied().unwrap_or(0);
                    if *g > c {
                        return Err(format!(
                            "{at}: {g} given back of the stream's window, {c} sent"
                        ));
                    }
                    if !stream_ok(head.stream) {
                        return Err(format!("{at}: on a stream never opened"));
                    }
                    if streams.get(&head.stream).is_some_and(|s| s.reset) {
                        return Err(format!("{at}: on a stream we reset"));
                    }
                }
            }
            kind::RST_STREAM => {
                if head.len != 4 || !stream_ok(head.stream) {
                    return Err(format!("{at}: malformed or on a stream never opened"));
                }
                streams.entry(head.stream).or_default().reset = true;
            }
            kind::HEADERS | kind::CONTINUATION => {
                let id = head.stream;
                if !stream_ok(id) {
                    return Err(format!("{at}: on a stream never opened"));
                }
                if head.flags & !(flag::END_STREAM | flag::END_HEADERS) != 0 {
                    return Err(format!("{at}: flags we never send"));
                }
                if head.kind == kind::HEADERS {
                    let update = table_size_update(p).map(|u| u.0);
                    if let Some(due) = update_due.take()
                        && update.is_none_or(|u| u > due)
                    {
                        return Err(format!(
                            "{at}: no table size update to at most {due} first (RFC 7541 §4.2)"
                        ));
                    }
                    if let Some(u) = update {
                        table_size = u;
                    }
                }
                let (mut bytes, trailers) = if head.kind == kind::HEADERS {
                    let s = streams.entry(id).or_default();
                    if s.reset || s.ended {
                        return Err(format!("{at}: after the stream's end or reset"));
                    }
                    if s.head && head.flags & flag::END_STREAM == 0 {
                        return Err(format!("{at}: trailers without END_STREAM"));
                    }
                    if head.flags & flag::END_STREAM != 0 {
                        s.ended = true;
                    }
                    let trailers = s.head;
                    s.head = true;
                    (Vec::new(), trailers)
                } else {
                    let Some((_, bytes, trailers)) = block.take() else {
                        return Err(format!("{at}: CONTINUATION outside a header block"));
                    };
                    if head.flags & flag::END_STREAM != 0 {
                        return Err(format!("{at}: END_STREAM on a CONTINUATION"));
                    }
                    (bytes, trailers)
                };
                bytes.extend_from_slice(p);
                if head.flags & flag::END_HEADERS == 0 {
                    block = Some((id, bytes, trailers));
                    continue;
                }
                let mut fields = Vec::new();
                // A block of a size update alone (our empty trailers when one is due) is
                // legal (RFC 7541 §4.2), but loona's decoder refuses it (SizeUpdateAtEnd).
                let update_only = table_size_update(&bytes).is_some_and(|u| u.1 == bytes.len());
                if !update_only {
                    decoder
                        .decode_with_cb(&bytes, |n, v| {
                            fields.push((n.into_owned(), v.into_owned()))
                        })
                        .map_err(|e| format!("{at}: our header block does not decode: {e:?}"))?;
                }
                for (i, (n, v)) in fields.iter().enumerate() {
                    if n.starts_with(b":") {
                        if trailers || i != 0 || n != b":status" || v.len() != 3 {
                            return Err(format!("{at}: pseudo-header {n:?} {v:?} at {i}"));
                        }
                    } else if n.iter().any(|c| c.is_ascii_uppercase())
                        || n == b"connection"
                        || n == b"transfer-encoding"
                    {
                        return Err(format!("{at}: field {n:?}"));
                    }
                }
                if !trailers && fields.first().is_none_or(|f| f.0 != b":status") {
                    return Err(format!("{at}: a response without :status"));
                }
                if !trailers {
                    // The answer is this stream's request's (the service echoes `:path`).
                    let status = &fields[0].1;
                    let tag = fields.iter().find(|f| f.0 == b"x-path").map(|f| &f.1);
                    let request = sent.requests.get(&id);
                    let path = request.and_then(|r| r.path.as_ref());
                    let theirs = if status == b"431" {
                        tag.is_none()
                    } else {
                        tag == path
                    };
                    if !theirs {
                        return Err(format!(
                            "{at}: a response {:?} x-path {:?} for the request :path {:?}",
                            String::from_utf8_lossy(status),
                            tag.map(|t| String::from_utf8_lossy(t)),
                            path.map(|p| String::from_utf8_lossy(p))
                        ));
                    }
                    let echoes = path
                        .is_some_and(|p| p.starts_with(b"/echo?") || p.starts_with(b"/mirror?"));
                    let head_method = request.is_some_and(|r| r.method.as_deref() == Some(b"HEAD"));
                    if echoes && !head_method && status == b"200" {
                        streams.entry(id).or_default().body = Some(Vec::new());
                    }
                }
            }
            kind::DATA => {
                let id = head.stream;
                if !stream_ok(id) {
                    return Err(format!("{at}: on a stream never opened"));
                }
                let s = streams.entry(id).or_default();
                if !s.head || s.ended || s.reset {
                    return Err(format!("{at}: before the head, after the end or reset"));
                }
                if head.flags & !flag::END_STREAM != 0 {
                    return Err(format!("{at}: flags we never send"));
                }
                s.ended = head.flags & flag::END_STREAM != 0;
                s.data += i64::from(head.len);
                if let Some(body) = &mut s.body {
                    body.extend_from_slice(p);
                }
                conn_data += i64::from(head.len);
                let window =
                    sent.initial_window + sent.stream_increments.get(&id).copied().unwrap_or(0);
                if s.data > window {
                    return Err(format!(
                        "{at}: {} bytes past the stream's window {window}",
                        s.data
                    ));
                }
                let window = i64::from(frame::DEFAULT_WINDOW) + sent.conn_increments;
                if conn_data > window {
                    return Err(format!(
                        "{at}: {conn_data} bytes past the connection window"
                    ));
                }
            }
            _ => return Err(format!("{at}: a frame type we never send")),
        }
    }
    if block.is_some() {
        return Err("the output ends inside a header block".into());
    }
    if quiet.is_some_and(|q| q.out_len == pos) {
        given_at_quiet = Some((given_conn, given.clone()));
    }
    // An echoed body, whole, is the request's body.
    for (id, s) in &streams {
        if let Some(body) = &s.body
            && s.ended
            && !s.reset
        {
            let request = &sent.requests[id];
            if !request.ended || *body != request.body {
                return Err(format!(
                    "stream {id}: the echo of {} bytes (ended: {}) is {} bytes{}",
                    request.body.len(),
                    request.ended,
                    body.len(),
                    if body.len() == request.body.len() {
                        ", different"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    // Once the client's input is all handled and the connection idle, what the client sent
    // and was not given back is exactly what the connection holds or will give back (under
    // the half-window it gives back at).
    if let Some(q) = quiet
        && result.is_ok()
        && sent.aligned
    {
        let Some((given_conn, given)) = given_at_quiet else {
            return Err(format!(
                "the output read when idle ({} bytes) ends mid-frame",
                q.out_len
            ));
        };
        let kept = sent.conn_consumed - given_conn;
        if kept != q.conn_released + q.held || q.conn_released >= q.conn_release_at {
            return Err(format!(
                "connection window: {} sent, {given_conn} given back, but {} held and {} \
                 released (given back at {})",
                sent.conn_consumed, q.held, q.conn_released, q.conn_release_at
            ));
        }
        for &(id, released, held) in &q.open {
            let c = sent.consumed.get(&id).copied().unwrap_or(0);
            let g = given.get(&id).copied().unwrap_or(0);
            if c - g != released + held || released >= q.stream_release_at {
                return Err(format!(
                    "stream {id} window: {c} sent, {g} given back, but {held} held and \
                     {released} released (given back at {})",
                    q.stream_release_at
                ));
            }
        }
    }
    let last_code = goaways.last().map(|g| g.1).filter(|&c| c != 0);
    match result {
        // Given up before the client took it: the GOAWAY may be missing, never another.
        Err(e) if e.goaway_unsent() => {
            if last_code.is_some() && last_code != e.code() {
                return Err(format!(
                    "serve failed with {e} (GOAWAY unsent) but the last GOAWAY is {goaways:?}"
                ));
            }
        }
        Err(e) if e.code().is_some() => {
            if last_code != e.code() || goaways.last().is_none() {
                return Err(format!(
                    "serve failed with {e} but the last GOAWAY is {goaways:?}"
                ));
            }
        }
        Err(e) => {
            if sent.aligned && sent.started {
                return Err(format!("serve failed with {e} on whole frames"));
            }
            if last_code.is_some() {
                return Err(format!("an error GOAWAY {goaways:?}, serve: {e}"));
            }
        }
        Ok(()) => {
            if last_code.is_some() {
                return Err(format!("an error GOAWAY {goaways:?} but serve ended well"));
            }
        }
    }
    Ok(())
}

// ---- Running a case ----

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
    static PANICS: Cell<u32> = const { Cell::new(0) };
}

/// Counts the panics of this thread's tasks (a case's runtime runs them all on the test's
/// thread): a stream task's panic is caught by tokio and would go unseen.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if FUZZING.with(Cell::get) {
                PANICS.with(|p| p.set(p.get() + 1));
            }
            prev(info);
        }));
    });
}

/// The most of each `Buffered` count seen, and the first broken invariant.
#[derive(Default, Debug)]
struct Seen {
    max: Buffered,
    broken: Option<String>,
}

fn observe(seen: &Mutex<Seen>, b: Buffered, cfg: &ServerCfg) {
    let mut s = seen.lock().unwrap();
    let m = &mut s.max;
    m.read_buf = m.read_buf.max(b.read_buf);
    m.out = m.out.max(b.out);
    m.block = m.block.max(b.block);
    m.streams = m.streams.max(b.streams);
    m.open_streams = m.open_streams.max(b.open_streams);
    m.recv_data = m.recv_data.max(b.recv_data);
    m.queued = m.queued.max(b.queued);
    m.ready = m.ready.max(b.ready);
    m.recent_resets = m.recent_resets.max(b.recent_resets);
    m.arena = m.arena.max(b.arena);
    m.fields = m.fields.max(b.fields);
    m.spare_blocks = m.spare_blocks.max(b.spare_blocks);
    m.spare_queues = m.spare_queues.max(b.spare_queues);
    let max_frame = cfg.max_frame as usize + 9;
    let conn_window = cfg.conn_window.max(frame::DEFAULT_WINDOW) as usize;
    let max_streams = cfg.max_streams as usize;
    // A block in one HEADERS frame is bounded by the frame size, one in CONTINUATIONs by the
    // list size and the slack.
    let block_max = (cfg.max_frame as usize).max(cfg.header_list as usize + BLOCK_SLACK);
    let broken = if b.open_streams > max_streams {
        Some("more open streams than SETTINGS_MAX_CONCURRENT_STREAMS")
    } else if b.streams > 2 * max_streams + 8 {
        Some("streams kept past their end")
    } else if b.recv_data > conn_window {
        Some("more request DATA held than the connection window")
    } else if b.read_buf > 2 * max_frame + 64 * 1024 {
        Some("read buffer past two frames")
    } else if b.out > OUT_HIGH + 4 * max_frame + 256 * 1024 {
        Some("output buffer past its bound")
    } else if b.block > cfg.header_list as usize + BLOCK_SLACK {
        Some("header block past its bound")
    } else if b.queued > b.streams * (SEND_BUFFER + 200_000) {
        Some("response DATA queued past the send buffers")
    } else if b.ready > b.streams + 2 * RECENT + 16 {
        Some("ready list grew")
    } else if b.arena > 2 * (2 * block_max + ARENA + cfg.header_list as usize) {
        // A block is decoded into room for twice its length, its values at most the list
        // size, the room doubled once when they need more.
        Some("header value arena past its bound")
    } else if b.fields > (2 * (cfg.header_list as usize / 32)).max(4) {
        // Each field counts 32 bytes toward SETTINGS_MAX_HEADER_LIST_SIZE.
        Some("header field list past its bound")
    } else if b.spare_blocks > SPARE_BLOCKS * SPARE_BLOCK_SIZE {
        Some("spare response head buffers past their bound")
    } else if b.spare_queues > SPARE_QUEUES {
        Some("spare send queues past their bound")
    } else {
        None
    };
    if let Some(why) = broken
        && s.broken.is_none()
    {
        s.broken = Some(format!("{why}: {b:?}"));
    }
}

const RECENT: usize = 128;
/// The server's bounds the checks above restate (conn.rs, hpack.rs, streams.rs).
const BLOCK_SLACK: usize = 16 * 1024;
const ARENA: usize = 4096;
const SPARE_BLOCKS: usize = 16;
const SPARE_BLOCK_SIZE: usize = 1024;
const SPARE_QUEUES: usize = 16;

/// Virtual time: only passes when every task waits, so a wait this long is a hang.
const STUCK: Duration = Duration::from_secs(3600);

/// Progress of the current run, for the watchdog.
static TICK: AtomicU64 = AtomicU64::new(0);
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// What a case came to, for the run's summary.
#[derive(Default, Debug)]
struct Outcome {
    max: Buffered,
    /// How `serve` ended: "ok", an error code's name, or "io".
    end: String,
    responses: usize,
    resets: usize,
}

async fn run_case_async(case: &Case, input: &Input, sent: &Sent) -> Result<Outcome, String> {
    let (client, server_io) = tokio::io::duplex(case.pipe.max(1) as usize);
    let split = (case.prefix as usize).min(input.bytes.len());
    let prefix = Bytes::copy_from_slice(&input.bytes[..split]);
    let shutdown = Shutdown::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let cfg = case.server.clone();
    let mut conn = Conn::new(server_io, prefix, cfg.settings(), shutdown.clone(), service);
    let shared = conn.shared();
    let s2 = seen.clone();
    let server = tokio::spawn(async move {
        poll_fn(|cx| {
            let r = conn.poll_conn(cx);
            observe(&s2, conn.buffered(), &cfg);
            r
        })
        .await
    });
    let (mut rd, mut wr) = tokio::io::split(client);
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let (ack_tx, mut ack_rx) = tokio::sync::watch::channel(false);
    let mode = case.read;
    let read_len = Arc::new(AtomicUsize::new(0));
    let read_len2 = read_len.clone();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        if let ReadMode::Never = mode {
            // Until the input is written, or every task waits (the paused clock jumps).
            let _ = tokio::time::timeout(Duration::from_secs(5), done_rx.wait_for(|d| *d)).await;
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut scanned = 0;
        loop {
            let n = match mode {
                ReadMode::Slow(n) => {
                    tokio::task::yield_now().await;
                    n as usize
                }
                _ => buf.len(),
            };
            match rd.read(&mut buf[..n]).await {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            read_len2.store(out.len(), Ordering::Relaxed);
            // Look for the ACK of the final PING.
            while out.len() - scanned >= 9 {
                let head = Head::parse(&out[scanned..]);
                let end = scanned + 9 + head.len as usize;
                if end > out.len() {
                    break;
                }
                if head.kind == kind::PING && &out[scanned + 9..end] == b"fuzzdone" {
                    let _ = ack_tx.send(true);
                }
                scanned = end;
            }
        }
    });
    // The input, in `chunk`-sized writes, with its events. A write may wait for good: a
    // server that stopped reading and a client that reads nothing, until the paused clock
    // moves (the reader then reads, or the stall timer resets the streams).
    let chunk = case.chunk.max(1) as usize;
    let mut pos = split;
    let mut write_failed = false;
    for &(at, e) in &input.events {
        if at > pos && !write_failed {
            write_failed = write_chunks(&mut wr, &input.bytes[pos..at], chunk).await;
        }
        pos = pos.max(at);
        match e {
            Event::Shutdown => shutdown.graceful(),
            Event::Pause => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    if pos < input.bytes.len() && !write_failed {
        write_failed = write_chunks(&mut wr, &input.bytes[pos..], chunk).await;
    }
    let _ = done_tx.send(true);
    let mut server = server;
    let mut result = None;
    let mut quiet = None;
    if case.ping_at_end && !write_failed {
        let mut ping = Vec::new();
        put_frame(&mut ping, kind::PING, 0, 0, b"fuzzdone");
        if wr.write_all(&ping).await.is_ok() {
            // The ACK, or the connection's end (the reader then ends too, and `wait_for`
            // fails: no ACK).
            let mut acked = false;
            let answered = tokio::time::timeout(STUCK, async {
                tokio::select! {
                    a = ack_rx.wait_for(|a| *a) => acked = a.is_ok(),
                    r = &mut server => result = Some(r),
                }
            })
            .await;
            if answered.is_err() && sent.aligned {
                return Err(
                    "a PING after whole frames got no answer and the connection stayed".into(),
                );
            }
            if acked {
                // Every task idle (the paused clock only moves then): the windows settled.
                tokio::time::sleep(Duration::from_millis(1)).await;
                quiet = Some(Quiet::take(&shared, read_len.load(Ordering::Relaxed)));
            }
        }
    }
    let _ = wr.shutdown().await;
    let result = match result {
        Some(r) => r,
        None => match tokio::time::timeout(STUCK, server).await {
            Err(_) => return Err("the connection did not end after the client closed".into()),
            Ok(r) => r,
        },
    };
    let result = result.map_err(|e| format!("the connection task failed: {e}"))?;
    let out = match tokio::time::timeout(STUCK, reader).await {
        Ok(Ok(out)) => out,
        _ => return Err("the output did not end with the connection".into()),
    };
    // The streams' tasks were aborted with the connection: they are gone after a turn.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    if alive != 0 {
        return Err(format!("{alive} tasks outlived the connection"));
    }
    drop(shared);
    check_output(&out, sent, &result, &case.server, quiet.as_ref())
        .map_err(|e| format!("{e}\nserve: {result:?}\noutput: {} bytes", out.len()))?;
    let seen = seen.lock().unwrap();
    if let Some(b) = &seen.broken {
        return Err(b.clone());
    }
    let (mut responses, mut resets) = (0, 0);
    let mut pos = 0;
    while pos + 9 <= out.len() {
        let head = Head::parse(&out[pos..]);
        responses += usize::from(head.kind == kind::HEADERS);
        resets += usize::from(head.kind == kind::RST_STREAM);
        pos += 9 + head.len as usize;
    }
    let end = match &result {
        Ok(()) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    Ok(Outcome {
        max: seen.max,
        end,
        responses,
        resets,
    })
}

async fn write_chunks<W: AsyncWriteExt + Unpin>(wr: &mut W, bytes: &[u8], chunk: usize) -> bool {
    for c in bytes.chunks(chunk) {
        if wr.write_all(c).await.is_err() {
            return true;
        }
    }
    false
}

fn run_case(case: &Case) -> Result<Outcome, String> {
    TICK.fetch_add(1, Ordering::Relaxed);
    *CURRENT.lock().unwrap() = format!("{case:?}");
    let input = write_case(case);
    // The final PING is read by the server after the input (and may finish a frame of it).
    let mut all = input.bytes.clone();
    if case.ping_at_end {
        put_frame(&mut all, kind::PING, 0, 0, b"fuzzdone");
    }
    let mut sent = read_sent(&all, case.server.max_frame);
    sent.aligned = read_sent(&input.bytes, case.server.max_frame).aligned;
    sent.pings.insert(*b"fuzzdone");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    FUZZING.with(|f| f.set(true));
    PANICS.with(|p| p.set(0));
    let r = rt.block_on(run_case_async(case, &input, &sent));
    drop(rt);
    FUZZING.with(|f| f.set(false));
    let panics = PANICS.with(Cell::get);
    if panics > 0 {
        return Err(format!("{panics} panics (printed above); {r:?}"));
    }
    r
}

/// Aborts the process when a case runs for `limit` of real time (a spin: the paused clock
/// only moves when every task waits, so a busy task hangs the case for good).
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn start(limit: Duration) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let mut last = TICK.load(Ordering::Relaxed);
            let mut since = std::time::Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = TICK.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    since = std::time::Instant::now();
                } else if since.elapsed() > limit {
                    eprintln!(
                        "h2 fuzz: a case ran {limit:?} of real time (a spin?):\n{}",
                        CURRENT.lock().unwrap()
                    );
                    std::process::abort();
                }
            }
        });
        Watchdog(stop)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `cases` generated cases from `seed`; on a failure, panics with the shrunk case.
fn fuzz(cases: u32, seed: u64) {
    count_panics();
    let _dog = Watchdog::start(Duration::from_secs(60));
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        max_shrink_time: 120_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let maxima = Mutex::new(Buffered::default());
    let ends = Mutex::new(HashMap::<String, u32>::new());
    let counts = Mutex::new((0usize, 0usize));
    let started = std::time::Instant::now();
    let result = runner.run(&case(), |c| {
        let o = run_case(&c).map_err(TestCaseError::fail)?;
        *ends.lock().unwrap().entry(o.end).or_default() += 1;
        let mut n = counts.lock().unwrap();
        n.0 += o.responses;
        n.1 += o.resets;
        let mut m = maxima.lock().unwrap();
        m.out = m.out.max(o.max.out);
        m.read_buf = m.read_buf.max(o.max.read_buf);
        m.streams = m.streams.max(o.max.streams);
        m.open_streams = m.open_streams.max(o.max.open_streams);
        m.recv_data = m.recv_data.max(o.max.recv_data);
        m.queued = m.queued.max(o.max.queued);
        m.block = m.block.max(o.max.block);
        m.ready = m.ready.max(o.max.ready);
        m.recent_resets = m.recent_resets.max(o.max.recent_resets);
        m.arena = m.arena.max(o.max.arena);
        m.fields = m.fields.max(o.max.fields);
        m.spare_blocks = m.spare_blocks.max(o.max.spare_blocks);
        m.spare_queues = m.spare_queues.max(o.max.spare_queues);
        Ok(())
    });
    let mut ends: Vec<_> = ends.into_inner().unwrap().into_iter().collect();
    ends.sort();
    let (responses, resets) = *counts.lock().unwrap();
    eprintln!(
        "h2 fuzz: {cases} cases from seed {seed} in {:.1} s; connections ended: {ends:?}; \
         {responses} response heads, {resets} resets; largest buffers: {:?}",
        started.elapsed().as_secs_f64(),
        maxima.lock().unwrap()
    );
    if let Err(e) = result {
        panic!("h2 fuzz: seed {seed} (OUTRIGGER_H2_FUZZ_SEED={seed}) failed: {e}");
    }
}

#[test]
fn random_client_input_never_breaks_the_server() {
    let cases = env_u64("OUTRIGGER_H2_FUZZ_CASES", 2000) as u32;
    let seed = env_u64("OUTRIGGER_H2_FUZZ_SEED", 0x6f75_7472_6967_6772);
    fuzz(cases, seed);
}

// ---- Regressions the fuzzer found (each failed before its fix) ----

fn regression_case(ops: Vec<Op>) -> Case {
    Case {
        server: ServerCfg::from(Settings::for_tests()),
        client_settings: Vec::new(),
        ops,
        mutations: Vec::new(),
        prefix: 0,
        chunk: u16::MAX,
        pipe: u16::MAX,
        read: ReadMode::Eager,
        ping_at_end: true,
    }
}

fn hang_request() -> Op {
    Op::Headers {
        sid: Sid::New,
        fields: vec![
            Field::Method(0),
            Field::Scheme(0),
            Field::Path(4),
            Field::Authority(0),
        ],
        end_stream: false,
        pad: None,
        prio: None,
        splits: Vec::new(),
        unfinished: false,
    }
}

/// A PRIORITY of the wrong length on a stream the client never opened was answered with
/// RST_STREAM on that idle stream, which §6.4 forbids (a strict client ends the connection
/// on it): it is the connection's error now.
#[test]
fn a_bad_priority_on_an_idle_stream_is_a_connection_error() {
    count_panics();
    let o = run_case(&regression_case(vec![Op::Priority {
        sid: Sid::Raw(3),
        dep: 1,
        len: 4,
    }]))
    .unwrap();
    assert!(o.end.contains("FRAME_SIZE_ERROR"), "{o:?}");
    assert_eq!(o.resets, 0, "{o:?}");
    // Self-dependent, on an even (never opened) stream below an open one.
    let o = run_case(&regression_case(vec![
        hang_request(),
        hang_request(),
        Op::Priority {
            sid: Sid::Raw(2),
            dep: 2,
            len: 5,
        },
    ]))
    .unwrap();
    assert!(o.end.contains("PROTOCOL_ERROR"), "{o:?}");
    assert_eq!(o.resets, 0, "{o:?}");
}

/// DATA on an even stream id below the highest the client opened was answered with
/// RST_STREAM (STREAM_CLOSED) on that idle stream; it is a connection error (§5.1).
#[test]
fn data_on_an_even_stream_is_a_connection_error() {
    count_panics();
    let o = run_case(&regression_case(vec![
        hang_request(),
        hang_request(),
        Op::Data {
            sid: Sid::Raw(2),
            len: 1,
            pad: None,
            end: false,
        },
    ]))
    .unwrap();
    assert!(o.end.contains("DATA on an idle stream"), "{o:?}");
    assert_eq!(o.resets, 0, "{o:?}");
}

// ---- The checker's own cases ----

fn request(path: u8, end_stream: bool) -> Op {
    Op::Headers {
        sid: Sid::New,
        fields: vec![
            Field::Method(1),
            Field::Scheme(0),
            Field::Path(path),
            Field::Authority(0),
        ],
        end_stream,
        pad: None,
        prio: None,
        splits: Vec::new(),
        unfinished: false,
    }
}

/// What the client of `ops` sent, as `run_case` reads it.
fn sent_of(ops: Vec<Op>) -> (Case, Sent) {
    let case = regression_case(ops);
    let input = write_case(&case);
    let sent = read_sent(&input.bytes, case.server.max_frame);
    (case, sent)
}

/// Our first frames: SETTINGS, the connection window's update.
fn our_start(case: &Case) -> bytes::BytesMut {
    let mut out = bytes::BytesMut::new();
    frame::put_settings(&mut out, &[(setting::MAX_CONCURRENT_STREAMS, 100)]);
    frame::put_window_update(&mut out, 0, case.server.conn_window - frame::DEFAULT_WINDOW);
    out
}

fn response_head(out: &mut bytes::BytesMut, id: u32, fields: &[(&str, &str)], end: bool) {
    let block = loona_hpack::Encoder::new()
        .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    frame::put_header_block(out, id, &block, end, 16_384);
}

/// A frame header cut short at the end of the output is what an I/O error leaves (the rest
/// of the output never written), and only then.
#[test]
fn a_partial_frame_header_after_an_io_error_is_legal() {
    let (case, mut sent) = sent_of(Vec::new());
    // The input was cut (else an I/O error is a fault of ours).
    sent.aligned = false;
    let mut out = our_start(&case);
    out.extend_from_slice(&[0, 0, 8, kind::PING]);
    let io: Result<(), Error> = Err(Error::io(std::io::ErrorKind::UnexpectedEof.into()));
    check_output(&out, &sent, &io, &case.server, None).unwrap();
    let e = check_output(&out, &sent, &Ok(()), &case.server, None).unwrap_err();
    assert!(e.contains("a partial frame header"), "{e}");
}

/// A response carries its request's `:path` (`x-path`); one with another stream's is caught,
/// and an echo must be the request's body.
#[test]
fn a_response_must_be_its_own_streams() {
    let (case, sent) = sent_of(vec![
        request(0, true),
        request(1, false),
        Op::Data {
            sid: Sid::Opened(1),
            len: 3,
            pad: Some(2),
            end: true,
        },
    ]);
    assert_eq!(sent.requests[&1].path.as_deref(), Some(&b"/?s=1"[..]));
    assert_eq!(sent.requests[&3].body, b"qqq");
    let answer = |one: &str, three: &str, echo: &[u8]| {
        let mut out = our_start(&case);
        response_head(&mut out, 1, &[(":status", "200"), ("x-path", one)], true);
        response_head(&mut out, 3, &[(":status", "200"), ("x-path", three)], false);
        frame::put_data(&mut out, 3, echo, true);
        check_output(&out, &sent, &Ok(()), &case.server, None)
    };
    answer("/?s=1", "/echo?s=3", b"qqq").unwrap();
    let e = answer("/echo?s=3", "/?s=1", b"qqq").unwrap_err();
    assert!(e.contains("x-path"), "{e}");
    let e = answer("/?s=1", "/echo?s=3", b"qq").unwrap_err();
    assert!(e.contains("the echo of 3 bytes"), "{e}");
}

/// Once the connection is idle, what the client sent and was not given back must be what the
/// server holds (unread) or has yet to give back, padding included.
#[test]
fn window_not_given_back_must_be_held() {
    let (case, sent) = sent_of(vec![
        request(4, false),
        Op::Data {
            sid: Sid::Opened(0),
            len: 100,
            pad: Some(9),
            end: false,
        },
    ]);
    // 1 + 100 + 9 bytes on stream 1.
    assert_eq!(sent.conn_consumed, 110);
    let out = our_start(&case);
    let quiet = |held: i64, released: i64| Quiet {
        out_len: out.len(),
        conn_released: released,
        conn_release_at: 1 << 20,
        stream_release_at: 1 << 19,
        held,
        open: vec![(1, released, held)],
    };
    check_output(&out, &sent, &Ok(()), &case.server, Some(&quiet(100, 10))).unwrap();
    let e = check_output(&out, &sent, &Ok(()), &case.server, Some(&quiet(100, 0))).unwrap_err();
    assert!(
        e.contains("connection window: 110 sent, 0 given back"),
        "{e}"
    );
    // More given back than sent.
    let mut more = out.clone();
    frame::put_window_update(&mut more, 1, 111);
    let e = check_output(&more, &sent, &Ok(()), &case.server, None).unwrap_err();
    assert!(
        e.contains("111 given back of the stream's window, 110 sent"),
        "{e}"
    );
}

/// A SETTINGS_HEADER_TABLE_SIZE below our encoder's table, once acknowledged, is owed a
/// dynamic table size update at the start of our next header block (RFC 7541 §4.2).
#[test]
fn a_lowered_table_size_is_owed_an_update() {
    let (case, sent) = sent_of(vec![
        Op::Settings {
            ack: false,
            entries: vec![(setting::HEADER_TABLE_SIZE, 100)],
        },
        request(0, true),
    ]);
    let answer = |update: &[u8]| {
        let mut out = our_start(&case);
        frame::put_settings_ack(&mut out);
        frame::put_settings_ack(&mut out);
        let mut block = update.to_vec();
        block.extend(
            loona_hpack::Encoder::new()
                .encode([(&b":status"[..], &b"200"[..]), (b"x-path", b"/?s=1")]),
        );
        frame::put_header_block(&mut out, 1, &block, true, 16_384);
        check_output(&out, &sent, &Ok(()), &case.server, None)
    };
    answer(&[0x20]).unwrap();
    let e = answer(&[]).unwrap_err();
    assert!(e.contains("no table size update to at most 100"), "{e}");
    // The whole run: our server owes it and pays it.
    count_panics();
    run_case(&case).unwrap();
}

/// RST_STREAM and WINDOW_UPDATE on an even id below the highest the client opened: idle
/// streams (§5.1.1), a connection error.
#[test]
fn stream_frames_on_even_ids_below_the_highest_are_connection_errors() {
    count_panics();
    for (op, why) in [
        (
            Op::Rst {
                sid: Sid::EvenBelow(1),
                code: 8,
            },
            "RST_STREAM on an idle stream",
        ),
        (
            Op::WindowUpdate {
                sid: Sid::EvenBelow(1),
                inc: 10,
            },
            "WINDOW_UPDATE on an idle stream",
        ),
    ] {
        let o = run_case(&regression_case(vec![hang_request(), hang_request(), op])).unwrap();
        assert!(o.end.contains(why), "{o:?}");
        assert_eq!(o.resets, 0, "{o:?}");
    }
}

/// Frames on a stream the client reset itself: a stream error (STREAM_CLOSED, §5.1) or
/// nothing, never the connection's end; PRIORITY is allowed.
#[test]
fn frames_after_the_clients_own_reset_end_only_the_stream() {
    count_panics();
    for then in [
        Op::Data {
            sid: Sid::Opened(0),
            len: 10,
            pad: None,
            end: false,
        },
        Op::WindowUpdate {
            sid: Sid::Opened(0),
            inc: 10,
        },
        Op::Priority {
            sid: Sid::Opened(0),
            dep: 7,
            len: 5,
        },
    ] {
        let o = run_case(&regression_case(vec![
            hang_request(),
            Op::Rst {
                sid: Sid::Opened(0),
                code: 8,
            },
            Op::Pause,
            then.clone(),
        ]))
        .unwrap();
        assert_eq!(o.end, "ok", "{then:?}: {o:?}");
    }
}

/// A header block in many CONTINUATION frames: empty ones past the flood limit, or bytes past
/// the block limit, end the connection (ENHANCE_YOUR_CALM) before the block does.
#[test]
fn continuation_floods_end_the_connection() {
    count_panics();
    for (frames, size, why) in [
        (1100, 0, "too many empty CONTINUATION frames"),
        (3000, 16, "header block too long"),
    ] {
        let o = run_case(&regression_case(vec![Op::ContinuationFlood {
            fields: vec![Field::Method(0), Field::Scheme(0), Field::Path(0)],
            frames,
            size,
            end: true,
        }]))
        .unwrap();
        assert!(o.end.contains(why), "{o:?}");
    }
}

/// Found by seeds 1, 2 and 3 (100,000 cases): a `/mirror` response's empty trailers, the
/// first block after the client lowered SETTINGS_HEADER_TABLE_SIZE, are a block of the size
/// update alone. RFC 7541 §4.2 allows it; loona's decoder refuses it (SizeUpdateAtEnd), so
/// the checker reads such a block itself.
#[test]
fn empty_trailers_may_carry_the_table_size_update_alone() {
    count_panics();
    let o = run_case(&regression_case(vec![
        request(10, false),
        Op::Pause,
        Op::Settings {
            ack: false,
            entries: vec![(setting::HEADER_TABLE_SIZE, 0)],
        },
        Op::Headers {
            sid: Sid::Opened(0),
            fields: Vec::new(),
            end_stream: true,
            pad: None,
            prio: None,
            splits: Vec::new(),
            unfinished: false,
        },
    ]))
    .unwrap();
    assert_eq!(o.end, "ok", "{o:?}");
}
