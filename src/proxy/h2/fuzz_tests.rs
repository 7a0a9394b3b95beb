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
//! blocks that decode, nothing after RST_STREAM or END_STREAM, an error GOAWAY last and the
//! one `serve` returned); no task outlives the connection.
//!
//! `OUTRIGGER_H2_FUZZ_CASES` (default 2,000) and `OUTRIGGER_H2_FUZZ_SEED` (a number; fixed by
//! default, so a run is repeatable) choose the run; a failure prints the seed and the
//! shrunk case.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A body of `left` chunks of `size` bytes, each after a yield, then trailers.
struct Chunks {
    left: usize,
    size: usize,
    yielded: bool,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.yielded = false;
        if self.left == 0 {
            if self.size == 0 {
                return std::task::Poll::Ready(None);
            }
            self.size = 0;
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            return std::task::Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b's'; self.size])))))
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

async fn service(req: Request<RecvBody>) -> Response<ProxyBody> {
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
                yielded: false,
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
    )
        .prop_map(|(m, p, regular, cl)| {
            let mut f = vec![
                Field::Method(m),
                Field::Scheme(0),
                Field::Path(p),
                Field::Authority(0),
            ];
            f.extend(regular.into_iter().map(|(n, v)| Field::Regular(n, v)));
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
    ]
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

fn encode_field(out: &mut Vec<u8>, f: &Field) {
    let at = |list: &[&'static str], i: u8| list[i as usize % list.len()].as_bytes();
    match f {
        Field::Method(i) => literal(out, b":method", at(METHODS, *i)),
        Field::Scheme(i) => literal(out, b":scheme", at(SCHEMES, *i)),
        Field::Path(i) => literal(out, b":path", at(PATHS, *i)),
        Field::Authority(i) => literal(out, b":authority", at(AUTHORITIES, *i)),
        Field::Pseudo(i) => literal(out, at(PSEUDOS, *i), b"1"),
        Field::Regular(n, v) => literal(out, at(NAMES, *n), at(VALUES, *v)),
        Field::Upper => literal(out, b"X-Upper", b"v"),
        Field::ConnectionSpecific(i) => literal(out, at(CONNECTION_FIELDS, *i), b"close"),
        Field::Te(trailers) => literal(out, b"te", if *trailers { b"trailers" } else { b"gzip" }),
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
        Field::Incremental(n, v) => {
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

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let l = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    out.put_u32(stream);
    out.extend_from_slice(payload);
}

struct Writer {
    next_id: u32,
    opened: Vec<u32>,
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
    let mut events = Vec::new();
    let mut w = Writer {
        next_id: 1,
        opened: Vec::new(),
    };
    let max_frame = case.server.max_frame as usize;
    for op in &case.ops {
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
                let Some(id) = w.sid_or_skip(sid) else {
                    continue;
                };
                let mut block = Vec::new();
                for f in fields {
                    encode_field(&mut block, f);
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
                let room = max_frame.saturating_sub(overhead).max(1);
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
                    while cut - at > if pieces.is_empty() { room } else { max_frame } {
                        let n = if pieces.is_empty() { room } else { max_frame };
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
                        put_frame(&mut out, kind::HEADERS, flags | end_headers, id, &payload);
                    } else {
                        put_frame(&mut out, kind::CONTINUATION, end_headers, id, piece);
                    }
                }
            }
            Op::Data { sid, len, pad, end } => {
                let Some(id) = w.sid_or_skip(sid) else {
                    continue;
                };
                let mut payload = Vec::new();
                let mut flags = if *end { flag::END_STREAM } else { 0 };
                if let Some(p) = pad {
                    flags |= flag::PADDED;
                    payload.push(*p);
                }
                payload.resize(payload.len() + *len as usize, b'q');
                payload.resize(payload.len() + pad.map_or(0, usize::from), 0);
                put_frame(&mut out, kind::DATA, flags, id, &payload);
            }
            Op::Rst { sid, code } => {
                let Some(id) = w.sid_or_skip(sid) else {
                    continue;
                };
                put_frame(&mut out, kind::RST_STREAM, 0, id, &code.to_be_bytes());
            }
            Op::Ping { ack, payload } => {
                let flags = if *ack { flag::ACK } else { 0 };
                put_frame(&mut out, kind::PING, flags, 0, &payload.to_be_bytes());
            }
            Op::Settings { ack, entries } => {
                let mut payload = Vec::new();
                for &(id, value) in entries {
                    payload.extend_from_slice(&id.to_be_bytes());
                    payload.extend_from_slice(&value.to_be_bytes());
                }
                let flags = if *ack { flag::ACK } else { 0 };
                put_frame(&mut out, kind::SETTINGS, flags, 0, &payload);
            }
            Op::WindowUpdate { sid, inc } => {
                let Some(id) = w.sid_or_skip(sid) else {
                    continue;
                };
                put_frame(&mut out, kind::WINDOW_UPDATE, 0, id, &inc.to_be_bytes());
            }
            Op::Goaway { last, code, debug } => {
                let mut payload = last.to_be_bytes().to_vec();
                payload.extend_from_slice(&code.to_be_bytes());
                payload.resize(payload.len() + *debug as usize, b'g');
                put_frame(&mut out, kind::GOAWAY, 0, 0, &payload);
            }
            Op::Priority { sid, dep, len } => {
                let Some(id) = w.sid_or_skip(sid) else {
                    continue;
                };
                let dep = if *dep == 0 { id } else { *dep };
                let mut payload = dep.to_be_bytes().to_vec();
                payload.push(15);
                payload.resize(*len as usize, 0);
                put_frame(&mut out, kind::PRIORITY, 0, id, &payload);
            }
            Op::Raw {
                kind,
                flags,
                sid,
                payload,
            } => {
                let Some(id) = w.sid_or_skip(sid) else {
                    continue;
                };
                put_frame(&mut out, *kind, *flags, id, payload);
            }
            Op::Shutdown => events.push((out.len(), Event::Shutdown)),
            Op::Pause => events.push((out.len(), Event::Pause)),
        }
    }
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
        match head.kind {
            kind::SETTINGS
                if head.flags & flag::ACK == 0
                    && head.stream == 0
                    && payload.len().is_multiple_of(6) =>
            {
                s.settings += 1;
                for e in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([e[0], e[1]]);
                    let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
                    if id == setting::MAX_FRAME_SIZE && v <= frame::MAX_MAX_FRAME_SIZE {
                        s.max_frame = s.max_frame.max(v);
                    }
                    if id == setting::INITIAL_WINDOW_SIZE {
                        s.initial_window = s.initial_window.max(i64::from(v));
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
}

fn check_output(out: &[u8], sent: &Sent, result: &Result<(), Error>) -> Result<(), String> {
    let mut decoder = loona_hpack::Decoder::new();
    let mut pos = 0;
    let mut streams: HashMap<u32, OutStream> = HashMap::new();
    // An unfinished header block: (stream, bytes, trailers).
    let mut block: Option<(u32, Vec<u8>, bool)> = None;
    let mut conn_data = 0i64;
    let mut settings = 0;
    let mut acks = 0;
    let mut goaways: Vec<(u32, u32)> = Vec::new();
    let mut index = 0;
    while pos < out.len() {
        if out.len() - pos < 9 {
            return Err(format!(
                "a partial frame header at the end ({} bytes)",
                out.len() - pos
            ));
        }
        let head = Head::parse(&out[pos..]);
        let end = pos + 9 + head.len as usize;
        if end > out.len() {
            // An input cut mid-frame ends `serve` at once (I/O error), its output unflushed.
            if result.as_ref().is_err_and(|e| e.io_error().is_some()) {
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
                if head.stream != 0 {
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
                decoder
                    .decode_with_cb(&bytes, |n, v| fields.push((n.into_owned(), v.into_owned())))
                    .map_err(|e| format!("{at}: our header block does not decode: {e:?}"))?;
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
    let last_code = goaways.last().map(|g| g.1).filter(|&c| c != 0);
    match result {
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
    let max_frame = cfg.max_frame as usize + 9;
    let conn_window = cfg.conn_window.max(frame::DEFAULT_WINDOW) as usize;
    let max_streams = cfg.max_streams as usize;
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
    } else if b.block > cfg.header_list as usize + 16 * 1024 {
        Some("header block past its bound")
    } else if b.queued > b.streams * (SEND_BUFFER + 200_000) {
        Some("response DATA queued past the send buffers")
    } else if b.ready > b.streams + 2 * RECENT + 16 {
        Some("ready list grew")
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
    if case.ping_at_end && !write_failed {
        let mut ping = Vec::new();
        put_frame(&mut ping, kind::PING, 0, 0, b"fuzzdone");
        if wr.write_all(&ping).await.is_ok() {
            let answered = tokio::time::timeout(STUCK, async {
                tokio::select! {
                    _ = ack_rx.wait_for(|a| *a) => {}
                    r = &mut server => result = Some(r),
                }
            })
            .await;
            if answered.is_err() && sent.aligned {
                return Err(
                    "a PING after whole frames got no answer and the connection stayed".into(),
                );
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
    check_output(&out, sent, &result)
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
        server: ServerCfg {
            max_streams: 100,
            header_list: 16 * 1024,
            initial_window: 1024 * 1024,
            conn_window: 4 * 1024 * 1024,
            max_frame: 16_384,
            stall_secs: 30,
        },
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
