//! HTTP/2 conformance and abuse tests for the proxy listener's HTTP/2 server, written against
//! the wire: raw frames over a `TcpStream` (h2c with prior knowledge), so that they judge any
//! server behind the listener key `http2_server` (hyper's and `h2`'s today; Outrigger's own in
//! `src/proxy/h2` once it is wired in). Each case cites the RFC 9113 section it checks and
//! accepts every outcome the RFC allows (a stream error or a connection error where either is
//! allowed, a close without GOAWAY where GOAWAY is only a SHOULD); what it saw is printed
//! (`--nocapture`) so the servers can be compared.
//!
//! Every case is a function of the server's name; its `#[test]` runs it for each of
//! [`SERVERS`]. A case in [`DIFFERS`] is one where a server is known not to do what the RFC
//! requires: the test then expects the deviation (and fails once it is gone, so the entry is
//! removed). After every case, a fresh connection must still get an answer.
//!
//! The client is hand-written on purpose: a conformance test has to send what a well-behaved
//! client library refuses to (frames on stream 0, bad lengths, header blocks cut in two,
//! windows overrun, uppercase names, floods). Only decoding the server's header blocks is left
//! to a crate (`loona-hpack`); our own blocks are literals without indexing, no Huffman.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::support::Sidecar;

/// The listener's `http2_server` values to judge (the lead adds "outrigger" at merge).
const SERVERS: &[&str] = &["hyper", "outrigger"];

/// Known deviations from RFC 9113: (server, case, what the server does instead, why). The
/// case's test expects its check to fail for that server with a message containing the third
/// field (so a different failure, a hang or a dead process is still a failure), and fails when
/// it passes (remove the entry then). The "still answers a fresh GET" check after the case is
/// never exempt.
///
/// All of hyper's come from `h2` 0.4 (its server under hyper): its frame reader
/// (`codec/framed_read.rs`) turns every frame or header block it cannot decode into GOAWAY
/// PROTOCOL_ERROR, where the RFC names a more precise code; and its handshake accepts any
/// first frame.
const DIFFERS: &[(&str, &str, &str, &str)] = &[
    (
        "hyper",
        "padding_given_back",
        "GOAWAY ENHANCE_YOUR_CALM",
        "h2 counts DATA frames that carry only padding as an empty-frame flood (too_many_data_frames) \
         before it gives the stream's window back",
    ),
    (
        "hyper",
        "first_frame_not_settings",
        "still open after",
        "h2 answers a PING sent in place of the preface's SETTINGS (§3.4 wants PROTOCOL_ERROR)",
    ),
    (
        "hyper",
        "settings_bad_length",
        "got GOAWAY PROTOCOL_ERROR",
        "GOAWAY PROTOCOL_ERROR, not FRAME_SIZE_ERROR (§6.5)",
    ),
    (
        "hyper",
        "settings_initial_window_too_large",
        "got GOAWAY PROTOCOL_ERROR",
        "GOAWAY PROTOCOL_ERROR, not FLOW_CONTROL_ERROR (§6.5.2)",
    ),
    (
        "hyper",
        "settings_ack_with_payload",
        "got GOAWAY PROTOCOL_ERROR",
        "GOAWAY PROTOCOL_ERROR, not FRAME_SIZE_ERROR (§6.5)",
    ),
    (
        "hyper",
        "ping_bad_length",
        "got GOAWAY PROTOCOL_ERROR",
        "GOAWAY PROTOCOL_ERROR, not FRAME_SIZE_ERROR (§6.7)",
    ),
    (
        "hyper",
        "priority_bad_length",
        "got GOAWAY PROTOCOL_ERROR",
        "GOAWAY PROTOCOL_ERROR, not a FRAME_SIZE_ERROR stream or connection error (§6.3)",
    ),
    (
        "hyper",
        "hpack_garbage",
        "got GOAWAY PROTOCOL_ERROR",
        "GOAWAY PROTOCOL_ERROR, not COMPRESSION_ERROR (§4.3)",
    ),
    (
        "hyper",
        "hpack_index_past_table",
        "got GOAWAY PROTOCOL_ERROR",
        "GOAWAY PROTOCOL_ERROR, not COMPRESSION_ERROR (§4.3)",
    ),
];

type Verdict = Result<String, String>;

/// A case's result: its verdict, and whether the process still answered a fresh GET on a new
/// connection afterwards (never exempt by [`DIFFERS`]).
struct Outcome {
    verdict: Verdict,
    serves: Result<(), String>,
}

/// A response read whole: status, fields (trailers appended), body.
type Fields = Vec<(String, String)>;
type Response = (u16, Fields, Vec<u8>);

thread_local! {
    /// Connections a case saw end in a close without GOAWAY (allowed: GOAWAY is a SHOULD),
    /// counted per server (each test runs on its own thread, its servers one after another).
    static CLOSED_WITHOUT_GOAWAY: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Records a connection error seen as a bare close, and says so.
fn closed_without_goaway(e: &str) -> String {
    CLOSED_WITHOUT_GOAWAY.with(|n| n.set(n.get() + 1));
    format!("closed without GOAWAY ({e})")
}

/// Runs `case` against every server, then fails with every server's failures at once (so one
/// server's failure does not hide another's); the server's name is in every message.
fn run(name: &str, case: fn(&str) -> Outcome) {
    let mut failures = Vec::new();
    for &server in SERVERS {
        let known = DIFFERS
            .iter()
            .find(|(s, c, _, _)| *s == server && *c == name)
            .map(|(_, _, expect, why)| (*expect, *why));
        CLOSED_WITHOUT_GOAWAY.with(|n| n.set(0));
        let Outcome { verdict, serves } = case(server);
        let bare = CLOSED_WITHOUT_GOAWAY.with(|n| n.get());
        if bare > 0 {
            println!("[{server}] {name}: {bare} connection error(s) closed without GOAWAY");
        }
        match (verdict, known) {
            (Ok(seen), None) => println!("[{server}] {name}: ok: {seen}"),
            (Err(e), None) => failures.push(format!("[{server}] {name}: {e}")),
            (Err(e), Some((expect, why))) if e.contains(expect) => {
                println!("[{server}] {name}: differs from RFC 9113 as known ({why}): {e}")
            }
            (Err(e), Some((expect, why))) => failures.push(format!(
                "[{server}] {name}: fails, but not as known (expected {expect:?}: {why}): {e}"
            )),
            (Ok(seen), Some((_, why))) => failures.push(format!(
                "[{server}] {name}: now conforms ({seen}); remove it from DIFFERS ({why})"
            )),
        }
        if let Err(e) = serves {
            failures.push(format!("[{server}] {name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Wire constants (RFC 9113 §6, §7, §6.5.2)

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const COMPRESSION_ERROR: u32 = 0x9;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

const HEADER_TABLE_SIZE: u16 = 0x1;
const ENABLE_PUSH: u16 = 0x2;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
const MAX_FRAME_SIZE: u16 = 0x5;

const DEFAULT_WINDOW: i64 = 65_535;
/// How long a read waits for the server before the case fails (a hang turned into a failure):
/// generous, as it only bounds waits for what should come (a slow CI box must not fail them).
pub(crate) const PATIENCE: Duration = Duration::from_secs(15);

fn code_name(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => return format!("error {code:#x}"),
    };
    name.to_string()
}

fn names(codes: &[u32]) -> String {
    codes
        .iter()
        .map(|c| code_name(*c))
        .collect::<Vec<_>>()
        .join(" or ")
}

// ---------------------------------------------------------------------------------------------
// Frames and HPACK

/// One frame: its 9-byte header (RFC 9113 §4.1) and payload. A HEADERS frame read from the
/// server carries its whole block (CONTINUATIONs folded in), decoded into `fields`.
pub(crate) struct Frame {
    pub(crate) kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
    fields: Vec<(String, String)>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    pub(crate) fn code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        self.payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
            .unwrap_or(u32::MAX)
    }

    fn status(&self) -> Option<u16> {
        self.fields
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse().ok())
    }

    pub(crate) fn describe(&self) -> String {
        match self.kind {
            DATA => format!(
                "DATA stream {} len {} flags {:#x}",
                self.stream,
                self.payload.len(),
                self.flags
            ),
            HEADERS => format!(
                "HEADERS stream {} flags {:#x} {:?}",
                self.stream, self.flags, self.fields
            ),
            RST_STREAM => format!(
                "RST_STREAM stream {} {}",
                self.stream,
                code_name(self.code())
            ),
            GOAWAY => format!(
                "GOAWAY {} (debug {:?})",
                code_name(self.code()),
                String::from_utf8_lossy(self.payload.get(8..).unwrap_or_default())
            ),
            k => format!(
                "frame type {k:#x} stream {} flags {:#x} len {}",
                self.stream,
                self.flags,
                self.payload.len()
            ),
        }
    }
}

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn settings_payload(values: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in values {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1); `high` holds the bits above it.
fn hpack_int(out: &mut Vec<u8>, prefix_bits: u8, high: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
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

/// A header block of literals without indexing, new names, no Huffman (RFC 7541 §6.2.2): the
/// server's table is never touched, and any name or value can be sent as it is.
pub(crate) fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 7, 0, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 7, 0, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

pub(crate) fn get(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "conformance"),
        (":path", path),
    ]
}

fn post(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "conformance"),
        (":path", path),
    ]
}

/// The fragment of a HEADERS frame's payload (padding and priority taken off).
fn fragment(f: &Frame) -> Vec<u8> {
    let mut start = 0;
    let mut end = f.payload.len();
    if f.flags & PADDED != 0 && !f.payload.is_empty() {
        start = 1;
        end = end.saturating_sub(f.payload[0] as usize);
    }
    if f.flags & PRIORITY_FLAG != 0 {
        start += 5;
    }
    f.payload.get(start..end).unwrap_or_default().to_vec()
}

// ---------------------------------------------------------------------------------------------
// The raw client

pub(crate) enum Got {
    Frame(Frame),
    /// The server closed (EOF) or reset the connection.
    Closed(String),
    Timeout,
}

pub(crate) struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    hpack: loona_hpack::Decoder<'static>,
    /// The server's SETTINGS, as announced.
    settings: HashMap<u16, u32>,
    /// What the server lets us send: the connection window and each stream's.
    conn_window: i64,
    stream_windows: HashMap<u32, i64>,
    window_updates: usize,
}

impl Client {
    /// A TCP connection, nothing sent.
    fn connect(addr: &str) -> Result<Client, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s.set_nodelay(true).unwrap();
        Ok(Client {
            s,
            buf: Vec::new(),
            hpack: loona_hpack::Decoder::new(),
            settings: HashMap::new(),
            conn_window: DEFAULT_WINDOW,
            stream_windows: HashMap::new(),
            window_updates: 0,
        })
    }

    /// Preface and our SETTINGS, then waits for the server's SETTINGS (acknowledged as they
    /// come, in `next`).
    pub(crate) fn open(addr: &str, settings: &[(u16, u32)]) -> Result<Client, String> {
        let mut c = Client::connect(addr)?;
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &settings_payload(settings)));
        c.write(&hello)?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            match c.next(deadline) {
                Got::Frame(f) if f.kind == SETTINGS && f.flags & ACK == 0 => return Ok(c),
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("closed during the handshake: {e}")),
                Got::Timeout => return Err("no SETTINGS from the server".into()),
            }
        }
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.s.write_all(bytes).map_err(|e| format!("write: {e}"))
    }

    fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Result<(), String> {
        if kind == DATA {
            self.conn_window -= payload.len() as i64;
            *self.window(stream) -= payload.len() as i64;
        }
        self.write(&frame(kind, flags, stream, payload))
    }

    fn window(&mut self, stream: u32) -> &mut i64 {
        let initial = self
            .settings
            .get(&INITIAL_WINDOW_SIZE)
            .map_or(DEFAULT_WINDOW, |v| *v as i64);
        self.stream_windows.entry(stream).or_insert(initial)
    }

    /// A request head in one HEADERS frame.
    fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end: bool) -> Result<(), String> {
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        self.send(HEADERS, flags, stream, &block(fields))
    }

    /// A stream left open: a POST whose body has not come yet (the upstream waits for it).
    fn open_stream(&mut self, stream: u32) -> Result<(), String> {
        self.headers(stream, &post("/open"), false)
    }

    fn read_frame(&mut self, deadline: Instant) -> Got {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                        fields: Vec::new(),
                    };
                    self.buf.drain(..9 + len);
                    return Got::Frame(f);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Got::Timeout;
            }
            self.s
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .unwrap();
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) => return Got::Closed("EOF".into()),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Got::Closed(e.to_string()),
            }
        }
    }

    /// The next frame; a HEADERS frame with its CONTINUATIONs folded in and decoded. Answers
    /// the server's SETTINGS (ACK) and keeps the send windows.
    pub(crate) fn next(&mut self, deadline: Instant) -> Got {
        let mut f = match self.read_frame(deadline) {
            Got::Frame(f) => f,
            other => return other,
        };
        match f.kind {
            HEADERS => {
                let mut block = fragment(&f);
                while f.flags & END_HEADERS == 0 {
                    match self.read_frame(deadline) {
                        Got::Frame(c) if c.kind == CONTINUATION && c.stream == f.stream => {
                            block.extend_from_slice(&c.payload);
                            f.flags |= c.flags & END_HEADERS;
                        }
                        Got::Frame(c) => {
                            return Got::Closed(format!(
                                "the server broke its own header block with {}",
                                c.describe()
                            ));
                        }
                        other => return other,
                    }
                }
                f.fields = match self.hpack.decode(&block) {
                    Ok(list) => list
                        .into_iter()
                        .map(|(n, v)| {
                            (
                                String::from_utf8_lossy(&n).into_owned(),
                                String::from_utf8_lossy(&v).into_owned(),
                            )
                        })
                        .collect(),
                    Err(e) => vec![("<undecodable block>".into(), format!("{e:?}"))],
                };
            }
            SETTINGS if f.flags & ACK == 0 => {
                for p in f.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([p[0], p[1]]);
                    let v = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
                    if id == INITIAL_WINDOW_SIZE {
                        let old = self
                            .settings
                            .get(&INITIAL_WINDOW_SIZE)
                            .map_or(DEFAULT_WINDOW, |v| *v as i64);
                        for w in self.stream_windows.values_mut() {
                            *w += v as i64 - old;
                        }
                    }
                    self.settings.insert(id, v);
                }
                let _ = self.write(&frame(SETTINGS, ACK, 0, &[]));
            }
            WINDOW_UPDATE if f.payload.len() == 4 => {
                let inc =
                    (u32::from_be_bytes(f.payload[..4].try_into().unwrap()) & 0x7fff_ffff) as i64;
                self.window_updates += 1;
                if f.stream == 0 {
                    self.conn_window += inc;
                } else {
                    *self.window(f.stream) += inc;
                }
            }
            _ => {}
        }
        Got::Frame(f)
    }

    /// The whole response on `stream`: status, fields (trailers appended) and body. DATA is
    /// given its window back as it comes.
    fn response(&mut self, stream: u32) -> Result<Response, String> {
        let (status, fields, body) = self.rest_of(stream)?;
        let status = status.ok_or(format!("stream {stream}: no :status in {fields:?}"))?;
        Ok((status, fields, body))
    }

    /// A GET of `path` on `stream`, answered 200.
    fn get_ok(&mut self, stream: u32, path: &str) -> Result<(), String> {
        self.headers(stream, &get(path), true)?;
        let (status, _, _) = self.response(stream)?;
        ensure!(
            status == 200,
            "GET {path} on stream {stream} was answered {status}"
        );
        Ok(())
    }

    /// What is left of the response on `stream`, until its END_STREAM.
    fn rest_of(&mut self, stream: u32) -> Result<(Option<u16>, Fields, Vec<u8>), String> {
        let deadline = Instant::now() + PATIENCE;
        let (mut status, mut fields, mut body) = (None, Vec::new(), Vec::new());
        loop {
            match self.next(deadline) {
                Got::Frame(f) if f.stream == stream && f.kind == HEADERS => {
                    if status.is_none() {
                        status = f.status();
                    }
                    fields.extend(f.fields.iter().cloned());
                    if f.flags & END_STREAM != 0 {
                        break;
                    }
                }
                Got::Frame(f) if f.stream == stream && f.kind == DATA => {
                    body.extend_from_slice(&f.payload);
                    if !f.payload.is_empty() {
                        let inc = (f.payload.len() as u32).to_be_bytes();
                        self.write(&frame(WINDOW_UPDATE, 0, 0, &inc))?;
                        if f.flags & END_STREAM == 0 {
                            self.write(&frame(WINDOW_UPDATE, 0, stream, &inc))?;
                        }
                    }
                    if f.flags & END_STREAM != 0 {
                        break;
                    }
                }
                Got::Frame(f)
                    if (f.kind == RST_STREAM && f.stream == stream) || f.kind == GOAWAY =>
                {
                    return Err(format!(
                        "stream {stream}: {} instead of a response",
                        f.describe()
                    ));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("stream {stream}: connection closed ({e})")),
                Got::Timeout => {
                    return Err(format!("stream {stream}: no response within {PATIENCE:?}"));
                }
            }
        }
        Ok((status, fields, body))
    }

    /// A connection error of type `code` (RFC 9113 §5.4.1): GOAWAY with that code, or a close
    /// (GOAWAY before closing is a SHOULD). Frames before it (SETTINGS, WINDOW_UPDATE, a
    /// response already under way) are skipped.
    fn connection_error(&mut self, codes: &[u32]) -> Verdict {
        self.connection_error_within(codes, PATIENCE)
    }

    /// [`Client::connection_error`], waiting `within` for it. After a GOAWAY the connection
    /// must close too (within [`PATIENCE`]); a close without GOAWAY is counted per server.
    fn connection_error_within(&mut self, codes: &[u32], within: Duration) -> Verdict {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match self.next(deadline) {
                Got::Frame(f) if f.kind == GOAWAY => {
                    ensure!(
                        codes.contains(&f.code()),
                        "expected a connection error {}, got {}",
                        names(codes),
                        f.describe()
                    );
                    let goaway = format!("GOAWAY {}", code_name(f.code()));
                    self.closes_after(&goaway)?;
                    return Ok(goaway);
                }
                Got::Frame(f) if f.kind == RST_STREAM => {
                    return Err(format!(
                        "expected a connection error {}, got {}",
                        names(codes),
                        f.describe()
                    ));
                }
                Got::Frame(f) => seen.push(f.describe()),
                Got::Closed(e) => return Ok(closed_without_goaway(&e)),
                Got::Timeout => {
                    return Err(format!(
                        "expected a connection error {}; the connection is still open after {within:?} (the server sent: {seen:?})",
                        names(codes)
                    ));
                }
            }
        }
    }

    /// After a GOAWAY for a connection error, the server closes the connection (§5.4.1): reads
    /// until EOF or reset, skipping frames, within [`PATIENCE`].
    pub(crate) fn closes_after(&mut self, goaway: &str) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.read_frame(deadline) {
                Got::Frame(_) => {}
                Got::Closed(_) => return Ok(()),
                Got::Timeout => {
                    return Err(format!(
                        "{goaway}, but the connection is still open {PATIENCE:?} later"
                    ));
                }
            }
        }
    }

    /// A stream error of one of `codes` on `stream` (RST_STREAM), or the same as a connection
    /// error (an endpoint may always treat a stream error as a connection error, §5.4).
    fn stream_error(&mut self, stream: u32, codes: &[u32]) -> Verdict {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.next(deadline) {
                Got::Frame(f)
                    if (f.kind == RST_STREAM && f.stream == stream) || f.kind == GOAWAY =>
                {
                    ensure!(
                        codes.contains(&f.code()),
                        "expected a stream error {} on stream {stream}, got {}",
                        names(codes),
                        f.describe()
                    );
                    return Ok(f.describe());
                }
                Got::Frame(f) if f.kind == HEADERS && f.stream == stream => {
                    return Err(format!(
                        "expected a stream error {} on stream {stream}, got a response: {}",
                        names(codes),
                        f.describe()
                    ));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Ok(closed_without_goaway(&e)),
                Got::Timeout => {
                    return Err(format!(
                        "expected a stream error {} on stream {stream}; nothing within {PATIENCE:?}",
                        names(codes)
                    ));
                }
            }
        }
    }

    /// A malformed request (RFC 9113 §8.1.1): a stream error PROTOCOL_ERROR, or the same as a
    /// connection error, or an HTTP 4xx answer first ("a server MAY send an HTTP response
    /// prior to closing or resetting the stream"). Never forwarded, so never a 2xx.
    fn malformed(&mut self, stream: u32) -> Verdict {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.next(deadline) {
                Got::Frame(f)
                    if (f.kind == RST_STREAM && f.stream == stream) || f.kind == GOAWAY =>
                {
                    ensure!(
                        f.code() == PROTOCOL_ERROR,
                        "malformed request on stream {stream}: expected PROTOCOL_ERROR, got {}",
                        f.describe()
                    );
                    return Ok(f.describe());
                }
                Got::Frame(f) if f.kind == HEADERS && f.stream == stream => {
                    let status = f.status().unwrap_or(0);
                    ensure!(
                        (400..500).contains(&status),
                        "malformed request on stream {stream} was answered {}",
                        f.describe()
                    );
                    return Ok(format!("answered {status}"));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Ok(closed_without_goaway(&e)),
                Got::Timeout => {
                    return Err(format!(
                        "malformed request on stream {stream}: no reset within {PATIENCE:?}"
                    ));
                }
            }
        }
    }

    /// Reads for `within`, failing on the first frame `bad` picks out.
    fn quiet(&mut self, within: Duration, bad: impl Fn(&Frame) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            match self.next(deadline) {
                Got::Frame(f) if bad(&f) => return Err(format!("unexpected {}", f.describe())),
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("connection closed ({e})")),
                Got::Timeout => return Ok(()),
            }
        }
    }

    /// PING and its ACK: everything the server sent before the ACK has been read.
    fn ping(&mut self, data: [u8; 8]) -> Result<Vec<Frame>, String> {
        self.send(PING, 0, 0, &data)?;
        let deadline = Instant::now() + PATIENCE;
        let mut before = Vec::new();
        loop {
            match self.next(deadline) {
                Got::Frame(f) if f.kind == PING && f.flags & ACK != 0 => {
                    ensure!(
                        f.payload == data,
                        "PING ACK carries {:?}, not the PING's {data:?}",
                        f.payload
                    );
                    return Ok(before);
                }
                Got::Frame(f) => before.push(f),
                Got::Closed(e) => {
                    return Err(format!("connection closed before the PING ACK ({e})"));
                }
                Got::Timeout => return Err(format!("no PING ACK within {PATIENCE:?}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy under test and its upstreams

/// A sidecar whose listener `public` speaks HTTP/2 with `server`, routing everything to one
/// upstream.
struct Rig {
    sc: Sidecar,
    addr: String,
    /// The default upstream (what a fresh GET reaches); kept for the cases that count on it.
    app: Backend,
    _other: Option<Upstream>,
}

impl Rig {
    fn new(server: &str) -> Rig {
        let app = Backend::http();
        let address = app.address();
        Rig::start(server, app, &address, None, false, "")
    }

    /// Routes to `other` (an HTTP/2 upstream when `http2`) instead of the default backend.
    fn to(server: &str, other: Upstream, http2: bool, limits: &str) -> Rig {
        let address = other.addr.clone();
        Rig::start(
            server,
            Backend::http(),
            &address,
            Some(other),
            http2,
            limits,
        )
    }

    fn start(
        server: &str,
        app: Backend,
        upstream: &str,
        other: Option<Upstream>,
        http2: bool,
        limits: &str,
    ) -> Rig {
        // Named even when it is the default: the default may change, the case's server must not.
        let key = format!("    http2_server: {server}\n");
        let h2 = if http2 { ", http2: true" } else { "" };
        // `/status/…` (the fresh GET after each case) always reaches the backend.
        let sc = Sidecar::start(&format!(
            "app:\n  address: 127.0.0.1:1\n  probe: {{ enabled: false }}\nclusters:\n  up: {{ endpoints: [\"{upstream}\"]{h2} }}\n  fresh: {{ endpoints: [\"{}\"] }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n{key}{limits}    routes:\n      - match: {{ path_prefix: /status/ }}\n        cluster: fresh\n      - cluster: up\n",
            app.address()
        ));
        sc.wait_ready();
        let addr = sc.listeners["public"].clone();
        Rig {
            sc,
            addr,
            app,
            _other: other,
        }
    }

    fn client(&self) -> Result<Client, String> {
        Client::open(&self.addr, &[])
    }

    fn client_with(&self, settings: &[(u16, u32)]) -> Result<Client, String> {
        Client::open(&self.addr, settings)
    }

    /// The sidecar's resident set (`VmRSS`) in KiB.
    fn rss_kib(&self) -> Result<u64, String> {
        proc_status_kib(self.sc.pid(), "VmRSS")
    }

    /// The sidecar's peak resident set over its life so far (`VmHWM`) in KiB.
    fn peak_kib(&self) -> Result<u64, String> {
        proc_status_kib(self.sc.pid(), "VmHWM")
    }

    /// Runs a case's checks on this rig (a closure, so that they can use `?` and still reach
    /// [`Rig::finish`]), then finishes it.
    fn check(self, checks: impl FnOnce(&Rig) -> Verdict) -> Outcome {
        let v = checks(&self);
        self.finish(v)
    }

    /// The case's verdict, and whether the process still answers a fresh GET on a new
    /// connection (checked apart: a known deviation never excuses a dead process); the
    /// sidecar's diagnostics on either failure.
    fn finish(mut self, v: Verdict) -> Outcome {
        let serves = self.still_serves();
        let diagnostics = if v.is_err() || serves.is_err() {
            format!("\n{}", self.sc.diagnostics())
        } else {
            String::new()
        };
        Outcome {
            verdict: v.map_err(|e| format!("{e}{diagnostics}")),
            serves: serves.map_err(|e| format!("{e}{diagnostics}")),
        }
    }

    fn still_serves(&mut self) -> Result<(), String> {
        // try_wait, not kill(pid, 0): an exited child stays a zombie until reaped, and a
        // signal to a zombie succeeds.
        let exited = self
            .sc
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            return Err(format!("the sidecar exited during the case ({status})"));
        }
        let mut c = self
            .client()
            .map_err(|e| format!("a fresh connection after the case: {e}"))?;
        c.get_ok(1, "/status/200")
            .map_err(|e| format!("a fresh GET after the case: {e}"))
    }
}

/// One `kB` line of `/proc/{pid}/status`; an error (never a silent 0) when it cannot be read,
/// so a memory bound is not passed by default.
fn proc_status_kib(pid: i32, key: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or(format!("no {key} in /proc/{pid}/status"))
}

/// An upstream of the test's own, on a runtime thread stopped on drop.
struct Upstream {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Upstream {
    fn spawn<F, Fut>(serve: F) -> Upstream
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap().to_string()).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        c = l.accept() => if let Ok((s, _)) = c {
                            tokio::spawn(serve(s));
                        }
                    }
                }
            });
        });
        Upstream {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Accepts connections and never reads nor answers: requests stay in flight, request
    /// bodies stop at what the sockets' buffers take.
    fn silent() -> Upstream {
        Upstream::spawn(|s| async move {
            // Held until the runtime stops.
            std::future::pending::<()>().await;
            drop(s);
        })
    }

    /// An h2c upstream (gRPC-shaped) that answers each request with the request trailers it
    /// received, as `name=value` lines.
    fn trailers_echo() -> Upstream {
        use http_body_util::{BodyExt, Full};
        Upstream::spawn(|s| async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let text = match req.into_body().collect().await {
                        Ok(c) => c
                            .trailers()
                            .map(|t| {
                                t.iter()
                                    .map(|(k, v)| format!("{k}={}\n", v.to_str().unwrap_or("")))
                                    .collect::<String>()
                            })
                            .unwrap_or_else(|| "no trailers\n".into()),
                        Err(e) => format!("body error: {e}\n"),
                    };
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(bytes::Bytes::from(text))))
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Cases: connection preface and frame rules

/// The shape of many cases: one frame (not DATA: no window is kept) on a fresh connection,
/// answered by a connection error of one of `codes`.
fn connection_error_after(server: &str, one: Vec<u8>, codes: &[u32]) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.write(&one)?;
        c.connection_error(codes)
    })
}

/// §3.4: an invalid preface is a connection error PROTOCOL_ERROR; GOAWAY MAY be omitted. A
/// listener that also speaks HTTP/1.1 may read wrong magic as an HTTP/1 request and refuse it
/// (a 4xx and a close): either way nothing is served and the connection ends.
fn case_bad_preface(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = Client::connect(&rig.addr)?;
        c.write(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")?;
        c.write(&frame(SETTINGS, 0, 0, &[]))?;
        let deadline = Instant::now() + PATIENCE;
        let mut raw = Vec::new();
        let bad_magic = loop {
            let now = Instant::now();
            ensure!(now < deadline, "bad magic: still open after {PATIENCE:?}");
            c.s.set_read_timeout(Some(deadline - now)).unwrap();
            let mut tmp = [0u8; 4096];
            match c.s.read(&mut tmp) {
                Ok(0) => break "closed",
                Ok(n) => raw.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break "reset",
            }
        };
        let text = String::from_utf8_lossy(&raw);
        let goaway = raw.len() >= 17 && raw[3] == GOAWAY;
        let h1_refusal = text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.0 4");
        let h2_settings_then_goaway = raw.len() >= 9 && raw[3] == SETTINGS;
        ensure!(
            raw.is_empty() || goaway || h1_refusal || h2_settings_then_goaway,
            "bad magic: unexpected answer {text:?}"
        );
        Ok(format!(
            "{} bytes ({:?}) then {bad_magic}",
            raw.len(),
            text.lines().next().unwrap_or_default()
        ))
    })
}

/// §3.4: the client preface is the magic followed by a SETTINGS frame; another first frame
/// (here PING) is an invalid preface: a connection error PROTOCOL_ERROR.
fn case_first_frame_not_settings(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = Client::connect(&rig.addr)?;
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(PING, 0, 0, &[0; 8]));
        c.write(&hello)?;
        // A short wait of its own: a server that takes the PING keeps the connection open, and
        // the case is a known deviation for hyper (it would otherwise wait out PATIENCE).
        c.connection_error_within(&[PROTOCOL_ERROR], Duration::from_secs(2))
    })
}

/// §6.1, §6.2: DATA and HEADERS must name a stream; on stream 0 they are connection errors
/// PROTOCOL_ERROR.
fn case_frame_on_stream_zero(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.send(DATA, 0, 0, b"hello")?;
        let data = c.connection_error(&[PROTOCOL_ERROR])?;
        let mut c = rig.client()?;
        c.headers(0, &get("/zero"), true)?;
        let headers = c.connection_error(&[PROTOCOL_ERROR])?;
        Ok(format!("DATA: {data}; HEADERS: {headers}"))
    })
}

/// §6.5: a SETTINGS length not a multiple of 6 is a connection error FRAME_SIZE_ERROR.
fn case_settings_bad_length(server: &str) -> Outcome {
    let one = frame(SETTINGS, 0, 0, &[0, 3, 0]);
    connection_error_after(server, one, &[FRAME_SIZE_ERROR])
}

/// §6.5: SETTINGS on a stream other than 0 is a connection error PROTOCOL_ERROR.
fn case_settings_on_a_stream(server: &str) -> Outcome {
    let settings = settings_payload(&[(MAX_CONCURRENT_STREAMS, 10)]);
    let one = frame(SETTINGS, 0, 1, &settings);
    connection_error_after(server, one, &[PROTOCOL_ERROR])
}

/// §6.5.2: ENABLE_PUSH other than 0 or 1 and MAX_FRAME_SIZE outside 2^14..2^24−1 are
/// connection errors PROTOCOL_ERROR.
fn case_settings_bad_values(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut seen = Vec::new();
        for (what, id, value, code) in [
            ("ENABLE_PUSH 2", ENABLE_PUSH, 2, PROTOCOL_ERROR),
            (
                "MAX_FRAME_SIZE 16383",
                MAX_FRAME_SIZE,
                16_383,
                PROTOCOL_ERROR,
            ),
            (
                "MAX_FRAME_SIZE 2^24",
                MAX_FRAME_SIZE,
                1 << 24,
                PROTOCOL_ERROR,
            ),
        ] {
            let mut c = rig.client()?;
            c.send(SETTINGS, 0, 0, &settings_payload(&[(id, value)]))?;
            let got = c
                .connection_error(&[code])
                .map_err(|e| format!("{what}: {e}"))?;
            seen.push(format!("{what}: {got}"));
        }
        Ok(seen.join("; "))
    })
}

/// §6.5.2: INITIAL_WINDOW_SIZE above 2^31−1 is a connection error FLOW_CONTROL_ERROR.
fn case_settings_initial_window_too_large(server: &str) -> Outcome {
    let settings = settings_payload(&[(INITIAL_WINDOW_SIZE, 1 << 31)]);
    let one = frame(SETTINGS, 0, 0, &settings);
    connection_error_after(server, one, &[FLOW_CONTROL_ERROR])
}

/// §6.5: a SETTINGS ACK with a payload is a connection error FRAME_SIZE_ERROR.
fn case_settings_ack_with_payload(server: &str) -> Outcome {
    let settings = settings_payload(&[(ENABLE_PUSH, 0)]);
    let one = frame(SETTINGS, ACK, 0, &settings);
    connection_error_after(server, one, &[FRAME_SIZE_ERROR])
}

/// §6.7: a PING whose length is not 8 is a connection error FRAME_SIZE_ERROR.
fn case_ping_bad_length(server: &str) -> Outcome {
    let one = frame(PING, 0, 0, &[0; 7]);
    connection_error_after(server, one, &[FRAME_SIZE_ERROR])
}

/// §6.7: a PING on a stream other than 0 is a connection error PROTOCOL_ERROR.
fn case_ping_on_a_stream(server: &str) -> Outcome {
    let one = frame(PING, 0, 1, &[0; 8]);
    connection_error_after(server, one, &[PROTOCOL_ERROR])
}

/// §6.7: a PING is answered with a PING ACK carrying the same 8 bytes; a PING ACK is not
/// answered.
fn case_ping_answered(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.send(PING, ACK, 0, b"unasked!")?;
        let before = c.ping(*b"h2conf!!")?;
        ensure!(
            !before.iter().any(|f| f.kind == PING),
            "an unasked PING ACK was answered"
        );
        Ok("PING ACK with the same payload".into())
    })
}

/// §6.9: a WINDOW_UPDATE of 0 is a stream error PROTOCOL_ERROR on a stream and a connection
/// error PROTOCOL_ERROR on stream 0.
fn case_window_update_zero(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.open_stream(1)?;
        c.send(WINDOW_UPDATE, 0, 1, &0u32.to_be_bytes())?;
        let stream = c.stream_error(1, &[PROTOCOL_ERROR])?;
        let mut c = rig.client()?;
        c.send(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes())?;
        let conn = c.connection_error(&[PROTOCOL_ERROR])?;
        Ok(format!("stream: {stream}; connection: {conn}"))
    })
}

/// §6.9.1: a WINDOW_UPDATE that takes a window past 2^31−1 ends the stream (RST_STREAM
/// FLOW_CONTROL_ERROR) or, on stream 0, the connection (GOAWAY FLOW_CONTROL_ERROR).
fn case_window_overflow(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let max = 0x7fff_ffffu32.to_be_bytes();
        let mut c = rig.client()?;
        c.open_stream(1)?;
        c.send(WINDOW_UPDATE, 0, 1, &max)?;
        let stream = c.stream_error(1, &[FLOW_CONTROL_ERROR])?;
        let mut c = rig.client()?;
        c.send(WINDOW_UPDATE, 0, 0, &max)?;
        let conn = c.connection_error(&[FLOW_CONTROL_ERROR])?;
        Ok(format!("stream: {stream}; connection: {conn}"))
    })
}

/// §5.1.1: a client's stream ids are odd; an even one is a connection error PROTOCOL_ERROR.
fn case_even_stream_id(server: &str) -> Outcome {
    let head = block(&get("/even"));
    let one = frame(HEADERS, END_HEADERS | END_STREAM, 2, &head);
    connection_error_after(server, one, &[PROTOCOL_ERROR])
}

/// §5.1.1: a new stream's id must be above every id the client used; a lower one is a
/// connection error PROTOCOL_ERROR (STREAM_CLOSED accepted too: stream 3 was implicitly
/// closed when 5 opened, §5.1).
fn case_decreasing_stream_id(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.get_ok(5, "/five")?;
        c.headers(3, &get("/three"), true)?;
        c.connection_error(&[PROTOCOL_ERROR, STREAM_CLOSED])
    })
}

/// §6.10: between a HEADERS without END_HEADERS and its last CONTINUATION, any other frame
/// (or a CONTINUATION of another stream) is a connection error PROTOCOL_ERROR.
fn case_headers_interrupted(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let b = block(&get("/interrupted"));
        let (first, rest) = b.split_at(b.len() / 2);
        let mut c = rig.client()?;
        c.send(HEADERS, END_STREAM, 1, first)?;
        c.send(PING, 0, 0, &[0; 8])?;
        let ping = c.connection_error(&[PROTOCOL_ERROR])?;
        let mut c = rig.client()?;
        c.send(HEADERS, END_STREAM, 1, first)?;
        c.send(CONTINUATION, END_HEADERS, 3, rest)?;
        let other = c.connection_error(&[PROTOCOL_ERROR])?;
        Ok(format!(
            "PING inside: {ping}; CONTINUATION of stream 3: {other}"
        ))
    })
}

/// §6.10: a CONTINUATION that does not follow a HEADERS (or CONTINUATION) without
/// END_HEADERS is a connection error PROTOCOL_ERROR.
fn case_continuation_without_headers(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.send(CONTINUATION, END_HEADERS, 1, &block(&get("/orphan")))?;
        let alone = c.connection_error(&[PROTOCOL_ERROR])?;
        let mut c = rig.client()?;
        c.open_stream(1)?;
        c.send(CONTINUATION, END_HEADERS, 1, &block(&[("x-late", "1")]))?;
        let after = c.connection_error(&[PROTOCOL_ERROR])?;
        Ok(format!("alone: {alone}; after a complete HEADERS: {after}"))
    })
}

/// §6.3: a PRIORITY whose length is not 5 is a stream error FRAME_SIZE_ERROR.
fn case_priority_bad_length(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.send(PRIORITY, 0, 1, &[0, 0, 0, 0])?;
        let seen = c.stream_error(1, &[FRAME_SIZE_ERROR])?;
        Ok(seen)
    })
}

/// §5.3.1: a stream cannot depend on itself: a stream error PROTOCOL_ERROR, in a PRIORITY
/// frame or in a HEADERS frame's priority block.
fn case_priority_self_dependency(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.send(PRIORITY, 0, 1, &[0, 0, 0, 1, 16])?;
        let priority = c.stream_error(1, &[PROTOCOL_ERROR])?;
        let mut c = rig.client()?;
        let mut payload = vec![0, 0, 0, 3, 16];
        payload.extend(block(&get("/self")));
        c.send(
            HEADERS,
            END_HEADERS | END_STREAM | PRIORITY_FLAG,
            3,
            &payload,
        )?;
        let headers = c.stream_error(3, &[PROTOCOL_ERROR])?;
        Ok(format!("PRIORITY: {priority}; HEADERS: {headers}"))
    })
}

/// §4.2: a frame larger than the server's SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR: a
/// stream error for DATA (or FLOW_CONTROL_ERROR, §6.9.1, when it also overruns a small
/// window), a connection error for a frame carrying a field block.
fn case_frame_over_max_size(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        let max = *c.settings.get(&MAX_FRAME_SIZE).unwrap_or(&16_384) as usize;
        c.open_stream(1)?;
        c.send(DATA, 0, 1, &vec![b'x'; max + 1])?;
        // The frame may also overrun the stream's window (an initial window of max or less):
        // FLOW_CONTROL_ERROR is then as right as FRAME_SIZE_ERROR.
        let data = c.stream_error(1, &[FRAME_SIZE_ERROR, FLOW_CONTROL_ERROR])?;
        let mut c = rig.client()?;
        let big = "v".repeat(max + 1);
        let mut fields = get("/big-frame");
        fields.push(("x-big", &big));
        c.headers(1, &fields, true)?;
        let headers = c.connection_error(&[FRAME_SIZE_ERROR])?;
        Ok(format!("DATA: {data}; HEADERS: {headers}"))
    })
}

/// §8.4: a client cannot push; a PUSH_PROMISE from it is a connection error PROTOCOL_ERROR.
fn case_push_promise_from_client(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.open_stream(1)?;
        let mut payload = 2u32.to_be_bytes().to_vec();
        payload.extend(block(&get("/pushed")));
        c.send(PUSH_PROMISE, END_HEADERS, 1, &payload)?;
        c.connection_error(&[PROTOCOL_ERROR])
    })
}

/// §4.1, §5.5: frames of unknown types are ignored, on stream 0 and on a stream; a GET after
/// them is answered.
fn case_unknown_frame_type_ignored(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.send(0xfa, 0xff, 0, b"whatever")?;
        c.send(0xfb, 0, 1, b"whatever")?;
        c.get_ok(1, "/after-unknown")
            .map_err(|e| format!("after unknown frames: {e}"))?;
        Ok("ignored".into())
    })
}

/// §5.1: DATA on a stream that is closed (both sides sent END_STREAM) is an error
/// STREAM_CLOSED (a connection error by the letter of §5.1; a stream error accepted too, as
/// h2spec does).
fn case_data_on_closed_stream(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.get_ok(1, "/closed")?;
        c.send(DATA, 0, 1, b"late")?;
        c.stream_error(1, &[STREAM_CLOSED])
    })
}

/// §5.1: after the client's RST_STREAM, any frame but PRIORITY it sends on the stream is a
/// stream error STREAM_CLOSED (or the same as a connection error). The request, its reset and
/// DATA after it go in one write, so that the server reads them together, the request's
/// stream still in its hands.
fn case_data_after_client_reset(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        let mut out = frame(HEADERS, END_HEADERS, 1, &block(&post("/reset")));
        out.extend(frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()));
        out.extend(frame(DATA, 0, 1, b"late"));
        c.write(&out)?;
        c.stream_error(1, &[STREAM_CLOSED])
    })
}

/// §5.1: HEADERS on a stream that is closed (both sides sent END_STREAM) may be treated as a
/// connection error STREAM_CLOSED (a stream error accepted too). A server that keeps no
/// record of every id it saw cannot tell such a stream from a skipped id, where §5.1.1 wants
/// a connection error PROTOCOL_ERROR: that is accepted as well (ours does it).
fn case_headers_on_closed_stream(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        c.get_ok(1, "/closed")?;
        c.headers(1, &[("x-late", "1")], true)?;
        c.stream_error(1, &[STREAM_CLOSED, PROTOCOL_ERROR])
    })
}

/// §5.1.1, §5.1: an even stream id is one only the server could open; the server pushes
/// nothing, so such a stream is idle, and DATA, WINDOW_UPDATE or RST_STREAM on it is a
/// connection error PROTOCOL_ERROR, even below a stream the client opened.
fn case_frames_on_even_stream(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut seen = Vec::new();
        for (what, kind, payload) in [
            ("DATA", DATA, vec![b'x']),
            ("WINDOW_UPDATE", WINDOW_UPDATE, vec![0, 0, 0, 1]),
            ("RST_STREAM", RST_STREAM, vec![0, 0, 0, 8]),
        ] {
            let mut c = rig.client()?;
            c.get_ok(3, "/three")?;
            c.send(kind, 0, 2, &payload)?;
            let got = c
                .connection_error(&[PROTOCOL_ERROR])
                .map_err(|e| format!("{what} on stream 2: {e}"))?;
            seen.push(format!("{what}: {got}"));
        }
        Ok(seen.join("; "))
    })
}

/// RFC 7541 §4.2: a client that lowers SETTINGS_HEADER_TABLE_SIZE (here to 0) must find a
/// dynamic table size update (to at most its value) at the start of the server's next header
/// block; the block still decodes.
fn case_header_table_size_lowered(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client_with(&[(HEADER_TABLE_SIZE, 0)])?;
        c.headers(1, &get("/status/200"), true)?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            match c.read_frame(deadline) {
                Got::Frame(f) if f.kind == HEADERS && f.stream == 1 => {
                    let frag = fragment(&f);
                    ensure!(
                        frag.first() == Some(&0x20),
                        "the response's block starts with {:02x?}, not a table size update to 0",
                        &frag[..frag.len().min(4)]
                    );
                    return Ok("size update to 0 first".into());
                }
                Got::Frame(f) if f.kind == SETTINGS && f.flags & ACK == 0 => {
                    let _ = c.write(&frame(SETTINGS, ACK, 0, &[]));
                }
                Got::Frame(f) if f.kind == GOAWAY || f.kind == RST_STREAM => {
                    return Err(format!("{} instead of a response", f.describe()));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("connection closed ({e})")),
                Got::Timeout => return Err(format!("no response within {PATIENCE:?}")),
            }
        }
    })
}

/// Responses as hyper's server sends them: a `date` when the upstream (or the proxy's own
/// answer) has none, and a `content-length` when the body's size is known and none was given.
/// Here the proxy's own 502 (the upstream refuses connections).
fn case_response_date_and_length(server: &str) -> Outcome {
    Rig::start(server, Backend::http(), "127.0.0.1:1", None, false, "").check(|rig| {
        let mut c = rig.client()?;
        c.headers(1, &get("/refused"), true)?;
        let (status, fields, body) = c.response(1)?;
        let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        ensure!(field("date").is_some(), "no date in {fields:?}");
        ensure!(
            field("content-length") == Some(&body.len().to_string()),
            "content-length {:?} for a body of {} bytes",
            field("content-length"),
            body.len()
        );
        Ok(format!("{status}: date and content-length {}", body.len()))
    })
}

/// §6.9.1: padding counts toward flow control, and a receiver gives it back (nobody will
/// read it). Padding-only DATA to a request whose upstream reads nothing, past half the
/// stream's window: a WINDOW_UPDATE for the stream comes.
fn case_padding_given_back(server: &str) -> Outcome {
    Rig::to(server, Upstream::silent(), false, "").check(|rig| {
        let mut c = rig.client()?;
        c.ping(*b"windows!")?;
        c.open_stream(1)?;
        let room = (*c.window(1)).min(c.conn_window);
        ensure!(room > 4096, "the windows allow only {room} bytes");
        // 256 flow-controlled bytes each: the pad length byte and 255 bytes of padding.
        let mut padded = vec![255u8];
        padded.extend_from_slice(&[0; 255]);
        let frames = (room * 3 / 4) as usize / padded.len();
        let mut burst = Vec::new();
        for _ in 0..frames {
            burst.extend(frame(DATA, PADDED, 1, &padded));
        }
        c.write(&burst)?;
        let sent = frames * padded.len();
        let deadline = Instant::now() + PATIENCE;
        loop {
            match c.next(deadline) {
                Got::Frame(f) if f.kind == WINDOW_UPDATE && f.stream == 1 => {
                    return Ok(format!(
                        "{sent} bytes of padding; the stream's window came back"
                    ));
                }
                Got::Frame(f) if f.kind == GOAWAY || (f.kind == RST_STREAM && f.stream == 1) => {
                    return Err(format!("{} after {sent} bytes of padding", f.describe()));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("connection closed ({e})")),
                Got::Timeout => {
                    return Err(format!(
                        "no WINDOW_UPDATE on stream 1 within {PATIENCE:?} of {sent} bytes of padding (of a window of {room})"
                    ));
                }
            }
        }
    })
}

/// §5.1.2: streams refused for going past SETTINGS_MAX_CONCURRENT_STREAMS are the server's
/// call, and a client retries them: 300 of them (more than a rapid-reset guard's usual 200)
/// must not end the connection.
fn case_refused_streams_not_counted_as_resets(server: &str) -> Outcome {
    Rig::to(server, Upstream::silent(), false, "").check(|rig| {
        let mut c = rig.client()?;
        let max = *c
            .settings
            .get(&MAX_CONCURRENT_STREAMS)
            .ok_or("the server announced no SETTINGS_MAX_CONCURRENT_STREAMS")?;
        let mut burst = Vec::new();
        for i in 0..max + 300 {
            burst.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                2 * i + 1,
                &block(&get(&format!("/held/{i}"))),
            ));
        }
        c.write(&burst)?;
        let before = c.ping(*b"refused!")?;
        let mut refused = before
            .iter()
            .filter(|f| f.kind == RST_STREAM && f.code() == REFUSED_STREAM)
            .count();
        if let Some(f) = before.iter().find(|f| f.kind == GOAWAY) {
            return Err(format!("{} after {refused} refused streams", f.describe()));
        }
        // Refusals the PING overtook.
        while refused < 300 {
            match c.next(Instant::now() + PATIENCE) {
                Got::Frame(f) if f.kind == RST_STREAM && f.code() == REFUSED_STREAM => refused += 1,
                Got::Frame(f) if f.kind == GOAWAY => {
                    return Err(format!("{} after {refused} refused streams", f.describe()));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => {
                    return Err(format!(
                        "connection closed after {refused} refused streams ({e})"
                    ));
                }
                Got::Timeout => return Err(format!("only {refused} of 300 streams refused")),
            }
        }
        c.ping(*b"stillup!")?;
        Ok(format!(
            "{max} in flight, {refused} refused, the connection still answers"
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Cases: HPACK and request heads

/// §4.3: a header block that cannot be decoded is a connection error COMPRESSION_ERROR (here
/// an integer that overflows).
fn case_hpack_garbage(server: &str) -> Outcome {
    let one = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff; 12]);
    connection_error_after(server, one, &[COMPRESSION_ERROR])
}

/// RFC 7541 §2.3.3, RFC 9113 §4.3: an index past the static and (empty) dynamic table is a
/// decoding error: a connection error COMPRESSION_ERROR.
fn case_hpack_index_past_table(server: &str) -> Outcome {
    let mut b = block(&get("/index"));
    b.push(0x80 | 70);
    let one = frame(HEADERS, END_HEADERS | END_STREAM, 1, &b);
    connection_error_after(server, one, &[COMPRESSION_ERROR])
}

/// The header that marks each malformed request [`refused`] sends, to find it upstream.
const MARKER: &str = "x-h2conf-marker";

/// Sends `fields` (and `body`, if any) as a request on a new connection and expects it refused
/// as malformed (§8.1.1). An intermediary must not forward a malformed request (§8.1.1), so the
/// upstream must never see it: the request carries a unique [`MARKER`], looked for once a PING
/// round trip on the connection (if still open) and a fresh GET through the proxy to the same
/// upstream have both come back.
fn refused(rig: &Rig, what: &str, fields: &[(&str, &str)], body: Option<&[u8]>) -> Verdict {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let marker = format!(
        "{what}#{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut fields = fields.to_vec();
    fields.push((MARKER, &marker));
    let mut c = rig.client()?;
    c.headers(1, &fields, body.is_none())?;
    if let Some(body) = body {
        c.send(DATA, END_STREAM, 1, body)?;
    }
    let seen = c.malformed(1).map_err(|e| format!("{what}: {e}"))?;
    // Only an ordering point: the connection may well be closed already.
    let _ = c.ping(*b"marker!!");
    let mut fresh = rig.client()?;
    fresh.headers(1, &get("/status/200"), true)?;
    fresh
        .response(1)
        .map_err(|e| format!("{what}: a GET after the malformed request: {e}"))?;
    let reached = rig
        .app
        .seen()
        .into_iter()
        .find(|s| s.header(MARKER) == Some(marker.as_str()));
    ensure!(
        reached.is_none(),
        "{what}: the malformed request reached the upstream ({seen}; upstream saw {:?} {})",
        reached.as_ref().map(|s| &s.method),
        reached.as_ref().map_or("", |s| s.path.as_str())
    );
    Ok(format!("{what}: {seen}"))
}

/// The shape of a case of one malformed request: [`refused`] on a fresh rig.
fn malformed_case(server: &str, what: &str, fields: &[(&str, &str)]) -> Outcome {
    Rig::new(server).check(|rig| refused(rig, what, fields, None))
}

/// §8.2.1: field names are lowercase; an uppercase one makes the request malformed.
fn case_uppercase_header_name(server: &str) -> Outcome {
    let mut fields = get("/upper");
    fields.push(("X-Upper", "a"));
    malformed_case(server, "X-Upper", &fields)
}

/// §8.2.2: connection-specific fields make a request malformed.
fn case_connection_specific_headers(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut seen = Vec::new();
        for (name, value) in [
            ("connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
        ] {
            let path = format!("/conn-specific/{name}");
            let mut fields = get(&path);
            fields.push((name, value));
            seen.push(refused(rig, name, &fields, None)?);
        }
        Ok(seen.join("; "))
    })
}

/// §8.2.2: `te` may only be `trailers`.
fn case_te_other_than_trailers(server: &str) -> Outcome {
    let mut fields = get("/te-gzip");
    fields.push(("te", "gzip"));
    malformed_case(server, "te: gzip", &fields)
}

/// §8.3: pseudo-header fields come before regular ones.
fn case_pseudo_after_regular(server: &str) -> Outcome {
    let fields = [
        (":method", "GET"),
        (":scheme", "http"),
        ("x-regular", "1"),
        (":path", "/pseudo-late"),
        (":authority", "conformance"),
    ];
    malformed_case(server, "pseudo after regular", &fields)
}

/// §8.3.1: a request has exactly one :method, :scheme and a non-empty :path (not CONNECT).
fn case_missing_pseudo(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut seen = Vec::new();
        for missing in [":method", ":scheme", ":path"] {
            let fields: Vec<_> = get("/missing")
                .into_iter()
                .filter(|(k, _)| *k != missing)
                .collect();
            seen.push(refused(rig, &format!("no {missing}"), &fields, None)?);
        }
        let mut fields = get("");
        fields.retain(|(k, _)| *k != ":path");
        fields.push((":path", ""));
        seen.push(refused(rig, "empty :path", &fields, None)?);
        let mut fields = get("/twice");
        fields.insert(1, (":method", "POST"));
        seen.push(refused(rig, "two :method", &fields, None)?);
        Ok(seen.join("; "))
    })
}

/// §8.3: an unknown pseudo-header field makes the request malformed.
fn case_unknown_pseudo(server: &str) -> Outcome {
    let mut fields = get("/unknown-pseudo");
    fields.insert(0, (":foo", "bar"));
    malformed_case(server, ":foo", &fields)
}

/// §8.3: a response pseudo-header field (:status) in a request makes it malformed.
fn case_response_pseudo_in_request(server: &str) -> Outcome {
    let mut fields = get("/status-in-request");
    fields.insert(0, (":status", "200"));
    malformed_case(server, ":status", &fields)
}

/// §8.1.1: a content-length that does not match the DATA makes the request malformed (fewer
/// bytes, or more).
fn case_content_length_mismatch(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut fewer = post("/cl-fewer");
        fewer.push(("content-length", "10"));
        let a = refused(rig, "content-length 10, 5 bytes", &fewer, Some(b"12345"))?;
        let mut more = post("/cl-more");
        more.push(("content-length", "2"));
        let b = refused(rig, "content-length 2, 5 bytes", &more, Some(b"12345"))?;
        Ok(format!("{a}; {b}"))
    })
}

// ---------------------------------------------------------------------------------------------
// Cases: limits and flow control

/// §5.1.2: a HEADERS that takes the client past the server's SETTINGS_MAX_CONCURRENT_STREAMS
/// is a stream error REFUSED_STREAM (or PROTOCOL_ERROR); the streams within it stay open.
/// The upstream never answers, so all of them stay in flight.
fn case_max_concurrent_streams(server: &str) -> Outcome {
    Rig::to(server, Upstream::silent(), false, "").check(|rig| {
        let mut c = rig.client()?;
        let max = *c
            .settings
            .get(&MAX_CONCURRENT_STREAMS)
            .ok_or("the server announced no SETTINGS_MAX_CONCURRENT_STREAMS")?;
        ensure!(
            max == 100,
            "the listener announces {max} concurrent streams, not 100"
        );
        let mut burst = Vec::new();
        for i in 0..=max {
            burst.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                2 * i + 1,
                &block(&get(&format!("/held/{i}"))),
            ));
        }
        c.write(&burst)?;
        let excess = 2 * max + 1;
        let deadline = Instant::now() + PATIENCE;
        loop {
            match c.next(deadline) {
                Got::Frame(f) if f.kind == RST_STREAM && f.stream == excess => {
                    ensure!(
                        [REFUSED_STREAM, PROTOCOL_ERROR].contains(&f.code()),
                        "stream {excess} past the limit: {}",
                        f.describe()
                    );
                    break;
                }
                Got::Frame(f) if f.kind == RST_STREAM || f.kind == GOAWAY || f.kind == HEADERS => {
                    return Err(format!(
                        "a stream within the limit of {max} ended: {}",
                        f.describe()
                    ));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("connection closed ({e})")),
                Got::Timeout => {
                    return Err(format!(
                        "stream {excess} (past the limit of {max}) was not refused"
                    ));
                }
            }
        }
        // The other 100 are still in flight: nothing more for them.
        c.quiet(Duration::from_millis(200), |f| {
            matches!(f.kind, RST_STREAM | GOAWAY | HEADERS)
        })
        .map_err(|e| format!("after the refusal: {e}"))?;
        Ok(format!("{max} in flight, stream {excess} refused"))
    })
}

/// §6.5.2, §10.5.1: a header list over what the server announced (the listener's
/// `max_header_bytes`, 64 KiB) is answered 431 or its stream (or connection) reset with
/// REFUSED_STREAM, PROTOCOL_ERROR or ENHANCE_YOUR_CALM (any accepted; the message says which;
/// INTERNAL_ERROR is a failure); it never reaches the upstream and the connection stays usable when
/// only the stream ended.
fn case_header_list_over_limit(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        let max = *c.settings.get(&MAX_FRAME_SIZE).unwrap_or(&16_384) as usize;
        let big = "h".repeat(80 * 1024);
        let mut fields = get("/big-headers");
        fields.push(("x-big", &big));
        let b = block(&fields);
        let chunks: Vec<&[u8]> = b.chunks(max).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            if i == 0 {
                c.send(HEADERS, END_STREAM | last, 1, chunk)?;
            } else {
                c.send(CONTINUATION, last, 1, chunk)?;
            }
        }
        // A refusal, not a failure of the server's own (INTERNAL_ERROR).
        let refusals = [REFUSED_STREAM, PROTOCOL_ERROR, ENHANCE_YOUR_CALM];
        let deadline = Instant::now() + PATIENCE;
        let seen = loop {
            match c.next(deadline) {
                Got::Frame(f) if f.kind == HEADERS && f.stream == 1 => {
                    ensure!(f.status() == Some(431), "answered {}", f.describe());
                    break "answered 431".to_string();
                }
                Got::Frame(f) if f.kind == RST_STREAM && f.stream == 1 => {
                    ensure!(
                        refusals.contains(&f.code()),
                        "reset with {}, not {}",
                        f.describe(),
                        names(&refusals)
                    );
                    break format!("reset: {}", f.describe());
                }
                Got::Frame(f) if f.kind == GOAWAY => {
                    ensure!(
                        refusals.contains(&f.code()),
                        "connection ended with {}, not {}",
                        f.describe(),
                        names(&refusals)
                    );
                    break format!("connection ended: {}", f.describe());
                }
                Got::Frame(_) => {}
                Got::Closed(e) => break format!("connection closed ({e})"),
                Got::Timeout => return Err(format!("nothing within {PATIENCE:?}")),
            }
        };
        ensure!(
            !rig.app.seen().iter().any(|s| s.path == "/big-headers"),
            "the oversized request reached the upstream ({seen})"
        );
        if seen.starts_with("answered") || seen.starts_with("reset") {
            c.get_ok(3, "/after-big")
                .map_err(|e| format!("after {seen}: {e}"))?;
        }
        Ok(seen)
    })
}

/// §6.9, §6.9.2: a client that announces INITIAL_WINDOW_SIZE 0 still gets the response
/// HEADERS (not flow-controlled), but DATA only once it sends WINDOW_UPDATE.
fn case_response_waits_for_client_window(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client_with(&[(INITIAL_WINDOW_SIZE, 0)])?;
        c.headers(1, &get("/bytes/100"), true)?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            match c.next(deadline) {
                Got::Frame(f) if f.stream == 1 && f.kind == HEADERS => {
                    ensure!(f.status() == Some(200), "answered {}", f.describe());
                    break;
                }
                Got::Frame(f) if f.stream == 1 => {
                    return Err(format!("before the HEADERS: {}", f.describe()));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("connection closed ({e})")),
                Got::Timeout => return Err("no response HEADERS with a zero window".into()),
            }
        }
        let flowed = |f: &Frame| f.kind == DATA && !f.payload.is_empty();
        let before = c.ping(*b"window0!")?;
        if let Some(f) = before.iter().find(|f| flowed(f)) {
            return Err(format!("DATA past a zero window: {}", f.describe()));
        }
        c.quiet(Duration::from_millis(300), flowed)
            .map_err(|e| format!("with a zero window: {e}"))?;
        c.send(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes())?;
        let (_, _, body) = c.rest_of(1)?;
        ensure!(
            body.len() == 100,
            "{} bytes after the WINDOW_UPDATE",
            body.len()
        );
        Ok("HEADERS at once, DATA after WINDOW_UPDATE".into())
    })
}

/// Sends `size` bytes on `stream` within the windows the server grants, waiting for its
/// WINDOW_UPDATEs when they are spent; stops early (returning what was sent) when the window
/// stays spent for `stall` (counted from when it ran out, not restarted by other frames). The
/// whole upload has one deadline, [`PATIENCE`]: past it, an error.
fn upload(c: &mut Client, stream: u32, size: usize, stall: Duration) -> Result<usize, String> {
    let max = *c.settings.get(&MAX_FRAME_SIZE).unwrap_or(&16_384) as i64;
    let chunk = vec![b'u'; max as usize];
    let overall = Instant::now() + PATIENCE;
    let mut stalled_until: Option<Instant> = None;
    let mut sent = 0usize;
    while sent < size {
        let room = c.conn_window.min(*c.window(stream)).min(max);
        if room <= 0 {
            let until = *stalled_until.get_or_insert_with(|| Instant::now() + stall);
            if Instant::now() >= overall {
                return Err(format!(
                    "the upload did not finish within {PATIENCE:?} ({sent} of {size} bytes)"
                ));
            }
            match c.next(until.min(overall)) {
                Got::Frame(f)
                    if (f.kind == RST_STREAM && f.stream == stream) || f.kind == GOAWAY =>
                {
                    return Err(format!("after {sent} bytes: {}", f.describe()));
                }
                Got::Frame(_) => {}
                Got::Closed(e) => return Err(format!("after {sent} bytes: closed ({e})")),
                Got::Timeout if Instant::now() >= until => return Ok(sent),
                Got::Timeout => {}
            }
            continue;
        }
        stalled_until = None;
        let n = (room as usize).min(size - sent);
        let end = if sent + n == size { END_STREAM } else { 0 };
        c.send(DATA, end, stream, &chunk[..n])?;
        sent += n;
    }
    Ok(sent)
}

/// §6.9: an upload larger than the windows the server announced goes through only as the
/// server gives window back (WINDOW_UPDATE as the upstream reads), and arrives whole.
fn case_upload_follows_server_window(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        let initial = (*c.window(1)).max(c.conn_window) as usize;
        let size = 3 * initial + 12_345;
        let mut fields = post("/bytes/0");
        let len = size.to_string();
        fields.push(("content-length", &len));
        c.headers(1, &fields, false)?;
        let updates_before = c.window_updates;
        let sent = upload(&mut c, 1, size, PATIENCE)?;
        ensure!(
            sent == size,
            "the server stopped giving window back after {sent} of {size} bytes"
        );
        let (status, _, _) = c.response(1)?;
        ensure!(status == 200, "the upload was answered {status}");
        let got = rig
            .app
            .seen()
            .iter()
            .find(|s| s.path == "/bytes/0")
            .map(|s| s.body.len());
        ensure!(
            got == Some(size),
            "the upstream got {got:?} of {size} bytes"
        );
        Ok(format!(
            "{size} bytes through windows of {initial}, {} WINDOW_UPDATEs",
            c.window_updates - updates_before
        ))
    })
}

/// §5.2, §6.9: a server must not take more of a body than it can pass on: when the upstream
/// reads nothing, the windows it grants stop (bounded by the sockets' buffers on the way),
/// rather than buffering the whole upload. DATA past the spent window MAY then be refused with
/// FLOW_CONTROL_ERROR (§6.9.1; the message says what happened).
fn case_upload_bounded_when_upstream_stops_reading(server: &str) -> Outcome {
    const BOUND: usize = 48 << 20;
    Rig::to(server, Upstream::silent(), false, "").check(|rig| {
        let mut c = rig.client()?;
        c.headers(1, &post("/never-read"), false)?;
        let rss_before = rig.rss_kib()?;
        let sent = upload(&mut c, 1, BOUND, Duration::from_millis(500))?;
        ensure!(
            sent < BOUND,
            "the server took {sent} bytes of a body nobody reads (no bound)"
        );
        let grown = rig.rss_kib()?.saturating_sub(rss_before);
        ensure!(
            grown < 32 * 1024,
            "RSS grew {grown} KiB while taking {sent} bytes nobody reads"
        );
        // Past the spent window (stream or connection).
        let over = c.conn_window.min(*c.window(1)).max(0) as usize + 1024;
        let over = over.min(16_384);
        c.send(DATA, 0, 1, &vec![b'o'; over])?;
        let past = match c.next(Instant::now() + Duration::from_millis(500)) {
            Got::Frame(f) if f.kind == RST_STREAM || f.kind == GOAWAY => {
                ensure!(
                    f.code() == FLOW_CONTROL_ERROR,
                    "DATA past the window: {}",
                    f.describe()
                );
                f.describe()
            }
            Got::Frame(f) => format!("then {}", f.describe()),
            Got::Closed(e) => format!("closed ({e})"),
            Got::Timeout => "not refused (allowed: MAY)".into(),
        };
        Ok(format!(
            "granted {sent} bytes then stopped, RSS +{grown} KiB; DATA past the window: {past}"
        ))
    })
}

/// §8.1: trailers (a HEADERS with END_STREAM after DATA) end a request; the proxy passes them
/// to an HTTP/2 (gRPC-shaped) upstream.
fn case_request_trailers_reach_http2_upstream(server: &str) -> Outcome {
    Rig::to(server, Upstream::trailers_echo(), true, "").check(|rig| {
        let mut c = rig.client()?;
        let mut fields = post("/pkg.Svc/Call");
        fields.push(("content-type", "application/grpc"));
        fields.push(("te", "trailers"));
        c.headers(1, &fields, false)?;
        c.send(DATA, 0, 1, &[0, 0, 0, 0, 2, 8, 1])?;
        c.headers(1, &[("x-trailer", "yes"), ("grpc-timeout", "5S")], true)?;
        let (status, _, body) = c.response(1)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        ensure!(status == 200, "answered {status}: {body}");
        ensure!(
            body.contains("x-trailer=yes"),
            "the upstream saw these request trailers: {body:?}"
        );
        Ok("trailers passed on".into())
    })
}

// ---------------------------------------------------------------------------------------------
// Cases: abuse

/// Rapid reset (CVE-2023-44487): 1,000 HEADERS + RST_STREAM pairs. The server either ends the
/// connection (GOAWAY, ENHANCE_YOUR_CALM as a rule; recorded) or keeps serving and answers a
/// PING after the burst; either way the process stays healthy and answers another client.
fn case_rapid_reset(server: &str) -> Outcome {
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        let mut burst = Vec::new();
        let head = block(&get("/status/200"));
        for i in 0..1000u32 {
            burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &head));
            burst.extend(frame(RST_STREAM, 0, 2 * i + 1, &8u32.to_be_bytes()));
        }
        let wrote = c.write(&burst);
        let _ = c.send(PING, 0, 0, b"rapidrst");
        let deadline = Instant::now() + PATIENCE;
        let outcome = loop {
            match c.next(deadline) {
                Got::Frame(f) if f.kind == GOAWAY => {
                    ensure!(
                        [ENHANCE_YOUR_CALM, PROTOCOL_ERROR, 0].contains(&f.code()),
                        "rapid reset ended with {}",
                        f.describe()
                    );
                    break f.describe();
                }
                Got::Frame(f) if f.kind == PING && f.flags & ACK != 0 => {
                    break "connection kept, PING answered".to_string();
                }
                Got::Frame(_) => {}
                Got::Closed(e) => break format!("closed without GOAWAY ({e})"),
                Got::Timeout => return Err("neither ended nor answered the PING".into()),
            }
        };
        Ok(format!("{outcome} (burst write: {wrote:?})"))
    })
}

/// CONTINUATION flood: a HEADERS without END_HEADERS and CONTINUATIONs that never end it. The
/// server must cut the connection once the block is past any limit it announced, and must not
/// hold what it read meanwhile.
///
/// The bound on what it may take, [`FLOOD_BOUND`] (4 MiB): the listener announces a 64 KiB
/// header list, and a server may read some multiple of that before it gives up (h2 counts
/// CONTINUATION frames), plus what the kernel holds on the way, which the server never read:
/// our send buffer, pinned small (16 KiB, so autotuning cannot grow it to the 4 MiB of
/// `tcp_wmem`), and the server's receive buffer when it stops reading (loopback autotuning
/// takes it to a few MiB at most in a burst this short). A server that buffers the block
/// whole takes all 32 MiB. Memory is sampled (`VmRSS`) while writing, and the peak
/// (`VmHWM`, over the process's life: only a rise past the peak before the case counts).
fn case_continuation_flood(server: &str) -> Outcome {
    const FLOOD: usize = 32 << 20;
    const FLOOD_BOUND: usize = 4 << 20;
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        nix::sys::socket::setsockopt(&c.s, nix::sys::socket::sockopt::SndBuf, &(16 << 10))
            .map_err(|e| format!("SO_SNDBUF: {e}"))?;
        c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let rss_before = rig.rss_kib()?;
        let peak_before = rig.peak_kib()?;
        // One literal field whose value claims the whole flood, so the block is never complete.
        let mut head = block(&get("/flood"));
        head.push(0x00);
        hpack_int(&mut head, 7, 0, 7);
        head.extend_from_slice(b"x-flood");
        hpack_int(&mut head, 7, 0, FLOOD);
        c.send(HEADERS, END_STREAM, 1, &head)?;
        let piece = frame(CONTINUATION, 0, 1, &[b'f'; 16_384]);
        let mut batch = Vec::new();
        for _ in 0..4 {
            batch.extend_from_slice(&piece);
        }
        let mut sent = 0usize;
        let mut rss_max = rss_before;
        let stopped = loop {
            if sent >= FLOOD {
                break None;
            }
            match c.s.write_all(&batch) {
                Ok(()) => sent += batch.len(),
                Err(e) => break Some(e.to_string()),
            }
            rss_max = rss_max.max(rig.rss_kib()?);
        };
        let end = c.connection_error(&[
            PROTOCOL_ERROR,
            ENHANCE_YOUR_CALM,
            COMPRESSION_ERROR,
            FRAME_SIZE_ERROR,
        ]);
        let peak_after = rig.peak_kib()?;
        let end = end.map_err(|e| {
            format!("after {sent} bytes of CONTINUATION (writes stopped: {stopped:?}): {e}")
        })?;
        ensure!(
            stopped.is_some() && sent < FLOOD_BOUND,
            "took {sent} bytes of an endless header block (bound {FLOOD_BOUND}; writes stopped: {stopped:?}; {end})"
        );
        // VmHWM only moves when the process passes its earlier peak; if it did, the case did it.
        let peak = if peak_after > peak_before {
            peak_after
        } else {
            rss_max
        };
        let grown = peak.max(rss_max).saturating_sub(rss_before);
        ensure!(
            grown < 16 * 1024,
            "RSS rose {grown} KiB during the flood ({sent} bytes sent)"
        );
        Ok(format!(
            "{end} after {sent} bytes written (writes stopped: {}), peak RSS +{grown} KiB",
            stopped.unwrap_or_else(|| "no".into())
        ))
    })
}

/// Writes `one` repeatedly without reading, for at most `bytes` or until writes block for a
/// second (the server stopped reading: back-pressure).
fn flood(c: &mut Client, one: &[u8], bytes: usize) -> (usize, String) {
    c.s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut batch = Vec::new();
    while batch.len() < 64 * 1024 {
        batch.extend_from_slice(one);
    }
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes && started.elapsed() < Duration::from_secs(5) {
        match c.s.write_all(&batch) {
            Ok(()) => sent += batch.len(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (sent, "writes blocked (the server stopped reading)".into());
            }
            Err(e) => return (sent, format!("write failed: {e}")),
        }
    }
    (sent, "all written".into())
}

/// A flood of frames that each ask for an answer, from a client that reads nothing: the server
/// must push back (stop reading) or cut the connection, not queue answers without bound.
fn answer_flood(server: &str, what: &str, one: Vec<u8>) -> Outcome {
    const BYTES: usize = 64 << 20;
    Rig::new(server).check(|rig| {
        let mut c = rig.client()?;
        let rss_before = rig.rss_kib()?;
        let (sent, how) = flood(&mut c, &one, BYTES);
        let grown = rig.rss_kib()?.saturating_sub(rss_before);
        ensure!(
            grown < 32 * 1024,
            "RSS grew {grown} KiB under a {what} flood of {sent} bytes ({how})"
        );
        ensure!(
            sent < BYTES || how != "all written",
            "took {sent} bytes of {what} from a client that reads nothing"
        );
        Ok(format!("{what}: {sent} bytes, {how}, RSS +{grown} KiB"))
    })
}

/// SETTINGS flood while not reading: each SETTINGS owes an ACK.
fn case_settings_flood(server: &str) -> Outcome {
    answer_flood(server, "SETTINGS", frame(SETTINGS, 0, 0, &[]))
}

/// PING flood while not reading: each PING owes an ACK.
fn case_ping_flood(server: &str) -> Outcome {
    answer_flood(server, "PING", frame(PING, 0, 0, b"floodpin"))
}

// ---------------------------------------------------------------------------------------------
// One test per case

macro_rules! cases {
    ($($name:ident => $case:ident,)*) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name), $case);
            }
        )*
    };
}

cases! {
    bad_preface => case_bad_preface,
    first_frame_not_settings => case_first_frame_not_settings,
    frame_on_stream_zero => case_frame_on_stream_zero,
    settings_bad_length => case_settings_bad_length,
    settings_on_a_stream => case_settings_on_a_stream,
    settings_bad_values => case_settings_bad_values,
    settings_initial_window_too_large => case_settings_initial_window_too_large,
    settings_ack_with_payload => case_settings_ack_with_payload,
    ping_bad_length => case_ping_bad_length,
    ping_on_a_stream => case_ping_on_a_stream,
    ping_answered => case_ping_answered,
    window_update_zero => case_window_update_zero,
    window_overflow => case_window_overflow,
    even_stream_id => case_even_stream_id,
    decreasing_stream_id => case_decreasing_stream_id,
    headers_interrupted => case_headers_interrupted,
    continuation_without_headers => case_continuation_without_headers,
    priority_bad_length => case_priority_bad_length,
    priority_self_dependency => case_priority_self_dependency,
    frame_over_max_size => case_frame_over_max_size,
    push_promise_from_client => case_push_promise_from_client,
    unknown_frame_type_ignored => case_unknown_frame_type_ignored,
    data_on_closed_stream => case_data_on_closed_stream,
    hpack_garbage => case_hpack_garbage,
    hpack_index_past_table => case_hpack_index_past_table,
    uppercase_header_name => case_uppercase_header_name,
    connection_specific_headers => case_connection_specific_headers,
    te_other_than_trailers => case_te_other_than_trailers,
    pseudo_after_regular => case_pseudo_after_regular,
    missing_pseudo => case_missing_pseudo,
    unknown_pseudo => case_unknown_pseudo,
    response_pseudo_in_request => case_response_pseudo_in_request,
    content_length_mismatch => case_content_length_mismatch,
    max_concurrent_streams => case_max_concurrent_streams,
    header_list_over_limit => case_header_list_over_limit,
    response_waits_for_client_window => case_response_waits_for_client_window,
    upload_follows_server_window => case_upload_follows_server_window,
    upload_bounded_when_upstream_stops_reading => case_upload_bounded_when_upstream_stops_reading,
    request_trailers_reach_http2_upstream => case_request_trailers_reach_http2_upstream,
    rapid_reset => case_rapid_reset,
    continuation_flood => case_continuation_flood,
    settings_flood => case_settings_flood,
    ping_flood => case_ping_flood,
    headers_on_closed_stream => case_headers_on_closed_stream,
    frames_on_even_stream => case_frames_on_even_stream,
    header_table_size_lowered => case_header_table_size_lowered,
    response_date_and_length => case_response_date_and_length,
    padding_given_back => case_padding_given_back,
    refused_streams_not_counted_as_resets => case_refused_streams_not_counted_as_resets,
    data_after_client_reset => case_data_after_client_reset,
}
