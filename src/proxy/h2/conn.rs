//! The connection task: reads and checks every frame the client sends (RFC 9113), decodes
//! header blocks, starts a task per request (or polls the request's future itself: `inline`),
//! and writes every frame we send, batched into one output buffer written once per wake.
//!
//! One poll function drives it all (no split of the socket, no channel): write what is
//! queued; read while the output buffer is under [`OUT_HIGH`] (a client that does not read
//! our answers, PING or SETTINGS ACKs included, gets no more of its input read); and take the
//! streams' queued frames under the client's flow-control windows, in turns (a FIFO of the
//! streams waiting for the connection window, as h2 assigns connection capacity).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
// tokio's clock (the same as std's outside tests): the stall timer is a tokio `Sleep`, and
// the instants it is compared with must follow tokio's paused clock in tests.
use tokio::time::{Instant, Sleep};

use super::frame::{
    self, DEFAULT_MAX_FRAME_SIZE, DEFAULT_WINDOW, Head, MAX_WINDOW, Reason, flag, kind, setting,
};
use super::hpack::{self, BlockReader, Refused};
use super::hpack_decode;
use super::inline::{Inline, Task};
use super::stream::{RecvBody, SEND_BUFFER, respond};
use super::streams::{Queued, Recv, Shared, SharedRef, Stream, lock};
use super::{Error, Guard, Settings, Shutdown};
use crate::proxy::body::ProxyBody;
use crate::proxy::linger;

/// Past this many bytes of output waiting for the socket, no more input is read and no more
/// response DATA taken from the streams. What went in last may take the output past it: one
/// DATA frame ([`DATA_FRAME`] at most, whatever the client's SETTINGS_MAX_FRAME_SIZE), or one
/// stream's header block (a response head: the upstream's, under the proxy's own limit on
/// response headers), and the small frames a read batch answers (PING and SETTINGS ACKs,
/// RST_STREAM, WINDOW_UPDATE) while under it.
pub(super) const OUT_HIGH: usize = 64 * 1024;
/// The largest DATA payload we send, even to a client that accepts larger frames: the
/// output's bound above stays the same whatever the client announces (review finding: a
/// client's 16 MiB frames let one frame take it 16 MiB over). Frame headers cost 9 bytes per
/// 16 KiB (0.05 %); the writes are batched anyway.
pub(super) const DATA_FRAME: usize = 16 * 1024;
/// Rapid client resets, and our resets for a client's faults, allowed per [`FLOOD_WINDOW`]
/// (at least; twice SETTINGS_MAX_CONCURRENT_STREAMS when that is more) before the connection
/// is closed with ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487).
const RESET_LIMIT: u32 = 200;
/// A client's RST_STREAM counts toward [`RESET_LIMIT`] only when it is rapid: it came before
/// any of the response's head was written and within this time of the stream's HEADERS (both
/// read in the same batch, or nearly). A reset stream's service is dropped at once (hyper
/// does the same), so a later reset cost us no more than a request of that length, and the
/// stream held one of SETTINGS_MAX_CONCURRENT_STREAMS meanwhile: such resets come at most
/// `max_concurrent_streams / RAPID_RESET_AGE` a second, as requests of that length could: later
/// ones before the head count against a second budget ([`Cancels`]) while the stream is
/// younger than [`CANCEL_FLOOR`]. Ordinary cancellations (a gRPC deadline, a browser
/// navigating away, a Go client closing a body early) come later or after the head. h2's server counts
/// only streams reset before the application accepted them (`max_pending_accept_reset_streams`),
/// which hyper does at once: about the same line, drawn by time instead of by task.
const RAPID_RESET_AGE: Duration = Duration::from_millis(10);
/// A client's reset before the response's head, of a stream at least this old, is counted by
/// neither budget ([`Cancels`] says why).
const CANCEL_FLOOR: Duration = Duration::from_secs(1);
/// [`Cancels`]: a window's completions raise its allowance by at most this many times the
/// base.
const CANCEL_CREDIT: u32 = 4;
/// Empty DATA (without END_STREAM) and empty CONTINUATION frames allowed per
/// [`FLOOD_WINDOW`] (CVE-2019-9518).
const EMPTY_FRAME_LIMIT: u32 = 1000;
const FLOOD_WINDOW: Duration = Duration::from_secs(10);
/// Header block bytes (HEADERS + CONTINUATION, 9 counted per frame) allowed beyond
/// SETTINGS_MAX_HEADER_LIST_SIZE before the connection is closed (CONTINUATION flood,
/// CVE-2024-27316): a block is compressed, so it is rarely longer than its decoded list.
const BLOCK_SLACK: usize = 16 * 1024;
/// The HPACK dynamic table size of RFC 9113's default SETTINGS_HEADER_TABLE_SIZE.
const HEADER_TABLE_SIZE: usize = 4096;
/// A stream's turn at writing DATA ends once it wrote this much (one frame at the default
/// SETTINGS_MAX_FRAME_SIZE; at least one frame whatever the size): then it goes to the back
/// of the queue, so a response body that comes as one large buffer does not hold the others.
const SEND_TURN: usize = 16 * 1024;
/// How long the ids of streams we reset are remembered: frames the client sent before it saw
/// the reset (late DATA, trailers) are dropped, not answered with STREAM_CLOSED or, for
/// trailers, a connection error (§5.1 lets us limit this period). Many round trips.
const RESET_MEMORY: Duration = Duration::from_secs(10);
/// At most this many of them (the oldest forgotten first): 24 KiB at most per connection.
const RECENT_RESETS: usize = 1024;
/// Graceful close, first step: GOAWAY with the largest stream id (it refuses nothing yet),
/// and a PING with this payload. Streams the client opened before it saw the GOAWAY are
/// still accepted; once its ACK is back (every frame it sent before is read) the real last
/// stream id follows (as h2's server does).
const GOAWAY_PING: [u8; 8] = *b"goaway!\0";
/// The longest we wait for that ACK before the final GOAWAY goes anyway.
const GOAWAY_ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest stream id (2^31-1): the first GOAWAY's last stream id.
const MAX_STREAM_ID: u32 = (1 << 31) - 1;
/// Ids of streams the client reset lately, at most this many (the oldest forgotten first):
/// HEADERS or DATA on one after it left the stream map is a stream error STREAM_CLOSED
/// (§5.1), not the connection error an id we know nothing of gets.
const CLIENT_RESETS: usize = 128;
/// The read buffer's size (one frame of the default SETTINGS_MAX_FRAME_SIZE and its header),
/// and the least a new one gets.
pub(super) const READ_BUF: usize = DEFAULT_MAX_FRAME_SIZE as usize + frame::HEADER_LEN;

/// Reads the clock. Every clock read of the frame loop goes through here (most through
/// [`Conn::now`]: once per turn of its loop), counted in tests; the close's linger
/// (`linger::Drain`) reads its own.
fn clock() -> Instant {
    #[cfg(test)]
    CLOCK_READS.with(|n| n.set(n.get() + 1));
    Instant::now()
}

#[cfg(test)]
thread_local! {
    /// Clock reads by the connections polled on this thread.
    pub(super) static CLOCK_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Read buffers shrunk back to [`READ_BUF`] by the connections polled on this thread.
    pub(super) static SHRINKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

struct Flood {
    count: u32,
    since: Instant,
}

impl Flood {
    fn new() -> Self {
        Flood {
            count: 0,
            since: clock(),
        }
    }
    /// Counts one; true when over `limit` in the current window.
    fn hit(&mut self, now: Instant, limit: u32) -> bool {
        if now.duration_since(self.since) > FLOOD_WINDOW {
            self.since = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > limit
    }
}

/// A client's resets of streams whose response had not begun (none of its head written),
/// younger than [`CANCEL_FLOOR`] and not rapid ([`RAPID_RESET_AGE`]: the first budget counts
/// those), allowed per [`FLOOD_WINDOW`]: [`RESET_LIMIT`] (or twice
/// SETTINGS_MAX_CONCURRENT_STREAMS when that is more), plus one for each stream that completed
/// normally in the same window, those at most [`CANCEL_CREDIT`] times the base; one more and
/// the connection is closed with ENHANCE_YOUR_CALM. The second budget, behind
/// [`RAPID_RESET_AGE`]'s: a client that waits longer than that before each reset is not
/// counted by the first, and could start `max_concurrent_streams / RAPID_RESET_AGE` upstream
/// requests a second (10,000 at 100 streams) and cancel them all.
///
/// Older resets never count: each held one of SETTINGS_MAX_CONCURRENT_STREAMS for at least
/// [`CANCEL_FLOOR`], so they come at most `max_concurrent_streams` a second (100 at the
/// default), as slow requests could; and slow calls are what legitimate clients cancel (a
/// gRPC deadline during an upstream slowdown). Younger ones: at most the base plus
/// [`CANCEL_CREDIT`] times it per window (1,000 per 10 s at 100 streams), whatever the
/// client completes; completions are cheap to make (a 404 for an unrouted host never reaches
/// an upstream), so they raise the allowance only up to that cap. At 100 streams a connection
/// can thus make us start and drop at most about 100 (old) + 100 (young) + 20 (rapid)
/// upstream requests a second.
///
/// A window begins with the first counted reset after the previous one ended (the first at
/// the connection's start) and lasts [`FLOOD_WINDOW`]; its completions are those since it
/// began, each counted once: none from an earlier window, however long ago.
///
/// Others draw the line elsewhere: h2's server counts streams reset before the application
/// accepted them (`max_pending_accept_reset_streams`, 20 at once) and its own resets for
/// protocol errors (`max_local_error_reset_streams`, 1,024 in a connection's life); nginx
/// ends a connection after `keepalive_requests` (1,000) requests whatever became of them;
/// Varnish counts resets within `h2_rapid_reset` (1 s) of the request against a budget
/// (`h2_rapid_reset_limit` per `h2_rapid_reset_period`); HAProxy counts such "glitches"
/// against `tune.h2.fe.glitches-threshold`.
///
/// Completions are counted by the connection (`Conn::completed`, no clock read for them); a
/// window's share is what the count grew by since the window began, read when a reset comes.
struct Cancels {
    count: u32,
    since: Instant,
    /// `Conn::completed` when this window began.
    completed_at_start: u64,
}

impl Cancels {
    fn new() -> Self {
        Cancels {
            count: 0,
            since: clock(),
            completed_at_start: 0,
        }
    }

    /// Counts one; true when over `base` plus the completions of this window (at most
    /// [`CANCEL_CREDIT`] × `base`; `completed`: the connection's count so far).
    fn hit(&mut self, now: Instant, completed: u64, base: u32) -> bool {
        if now.duration_since(self.since) > FLOOD_WINDOW {
            self.completed_at_start = completed;
            self.since = now;
            self.count = 0;
        }
        self.count += 1;
        let credit =
            (completed - self.completed_at_start).min(u64::from(base) * u64::from(CANCEL_CREDIT));
        u64::from(self.count) > u64::from(base) + credit
    }
}

/// Ids of streams we reset, each for [`RESET_MEMORY`] (at most [`RECENT_RESETS`] of them).
/// Kept in the order they were added, which is the order of their times, and counted by id
/// for O(1) lookups (an id reset twice is in the deque twice): the two evicted together.
#[derive(Default)]
struct RecentResets {
    ids: VecDeque<(u32, Instant)>,
    /// Per id in `ids`: how many times, and the latest.
    index: HashMap<u32, (u32, Instant)>,
}

impl RecentResets {
    fn remember(&mut self, id: u32, now: Instant) {
        while self
            .ids
            .front()
            .is_some_and(|&(_, at)| now.duration_since(at) >= RESET_MEMORY)
        {
            self.evict();
        }
        if self.ids.len() == RECENT_RESETS {
            self.evict();
        }
        self.ids.push_back((id, now));
        let e = self.index.entry(id).or_insert((0, now));
        *e = (e.0 + 1, now);
    }

    fn evict(&mut self) {
        let Some((id, _)) = self.ids.pop_front() else {
            return;
        };
        if let Some(e) = self.index.get_mut(&id) {
            e.0 -= 1;
            if e.0 == 0 {
                self.index.remove(&id);
            }
        }
    }

    /// We reset `id` less than [`RESET_MEMORY`] ago.
    fn contains(&self, id: u32, now: Instant) -> bool {
        self.index
            .get(&id)
            .is_some_and(|&(_, at)| now.duration_since(at) < RESET_MEMORY)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Where a graceful close is (RFC 9113 §6.8).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Goaway {
    None,
    /// GOAWAY(2^31-1) and [`GOAWAY_PING`] sent: new streams are still taken until the ACK.
    Announced,
    /// GOAWAY with the last stream taken: new streams are ignored; the connection closes once
    /// the open ones are done.
    Final,
}

/// A header block being received (HEADERS without END_HEADERS, then CONTINUATION).
struct Block {
    stream: u32,
    end_stream: bool,
    self_dependent: bool,
    buf: BytesMut,
    /// Bytes counted against the block limit (payloads + 9 per frame).
    counted: usize,
}

#[derive(PartialEq, Eq)]
enum Phase {
    /// Reading the 24-byte client magic.
    Preface,
    /// The client's first frame must be SETTINGS.
    FirstSettings,
    Frames,
}

type ConnResult = Result<(), Fault>;

/// A connection error: the GOAWAY's code, what the log says, and the abuse guard that
/// closed the connection (ENHANCE_YOUR_CALM) if one did.
struct Fault {
    reason: Reason,
    detail: &'static str,
    guard: Option<Guard>,
}

impl Fault {
    fn new(reason: Reason, detail: &'static str) -> Self {
        Fault {
            reason,
            detail,
            guard: None,
        }
    }

    /// An abuse guard's close.
    fn calm(guard: Guard) -> Self {
        Fault {
            reason: Reason::ENHANCE_YOUR_CALM,
            detail: guard.detail(),
            guard: Some(guard),
        }
    }
}

/// Why a stream's turn in `Conn::gather` ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Nothing left queued.
    Done,
    /// Its turn's [`SEND_TURN`] bytes written, or the output full: again after the others.
    Turn,
    /// Its own window is shut: a WINDOW_UPDATE on it puts it back in `ready`.
    StreamWindow,
    /// The connection window is shut: it joins `Conn::conn_waiting`.
    ConnWindow,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TableUpdate {
    None,
    /// Due at the start of our next header block.
    Due,
    /// Sent: our table's maximum is 0, below anything the client may set.
    Sent,
}

/// A header block of ours (HEADERS, CONTINUATION as needed), with the table size update
/// first when one is due.
fn put_block(
    out: &mut BytesMut,
    update: &mut TableUpdate,
    stream: u32,
    block: &[u8],
    end: bool,
    max_frame: usize,
) {
    if *update == TableUpdate::Due {
        *update = TableUpdate::Sent;
        let mut b = Vec::with_capacity(1 + block.len());
        // Dynamic Table Size Update (`001` prefix) to 0.
        b.push(0x20);
        b.extend_from_slice(block);
        frame::put_header_block(out, stream, &b, end, max_frame);
    } else {
        frame::put_header_block(out, stream, block, end, max_frame);
    }
}

/// `F`: the service's future; `R`: a stream's `respond` future around it (a type only the
/// compiler can name: `respond` is an `async fn`, so `Conn::new` returns it as an `impl Future`
/// and keeps the function to make one).
pub(super) struct Conn<IO, S, F, R> {
    io: IO,
    service: S,
    respond: fn(SharedRef, u32, bool, BytesMut, F) -> R,
    /// Streams served on this task rather than spawned (`inline`).
    inline: Inline<R>,
    shared: SharedRef,
    settings: Settings,
    shutdown: Shutdown,
    read_buf: BytesMut,
    /// The size of the allocation `read_buf` reads into (what a slice of it keeps alive).
    read_alloc: usize,
    /// A frame larger than [`READ_BUF`] was read: [`Self::shrink_read`] is due.
    large_frame: bool,
    out: BytesMut,
    decoder: hpack_decode::Decoder,
    /// Every header block's fields, decoded into the connection's value arena.
    reader: BlockReader,
    /// Response head buffers back from written heads, for the next streams' tasks.
    spare_blocks: Vec<BytesMut>,
    phase: Phase,
    // The client's settings.
    peer_max_frame: usize,
    peer_initial_window: i64,
    conn_send_window: i64,
    conn_recv_window: i64,
    our_settings_acked: bool,
    /// The client lowered SETTINGS_HEADER_TABLE_SIZE: our next header block starts with a
    /// dynamic table size update (RFC 7541 §4.2), to 0 (our encoder uses no table), and then
    /// no later change needs one.
    table_update: TableUpdate,
    /// The highest stream id the client opened (or tried to).
    max_client_stream: u32,
    /// The highest stream id handed to the service (GOAWAY's last stream id).
    last_accepted: u32,
    block: Option<Block>,
    recent_resets: RecentResets,
    /// Streams the client reset lately (at most [`CLIENT_RESETS`]), for HEADERS or DATA on
    /// one after it left the stream map: a stream error STREAM_CLOSED (§5.1).
    client_resets: VecDeque<u32>,
    /// Graceful close (ours): where it is, and the wait for its PING's ACK.
    goaway: Goaway,
    goaway_timer: Option<Pin<Box<Sleep>>>,
    /// The connection is done: our side is shut and what the client still sends is read and
    /// dropped for a moment, so that a close with unread input does not reset the
    /// connection before the client has read our last frames ([`crate::proxy::linger`]).
    linger: Option<Linger>,
    /// `prefix` (what was read before `serve`) is processed on the first poll: a client that
    /// sent its whole first request with the preface sends nothing more until answered.
    prefix_pending: bool,
    /// The time of this turn of the connection's loop, read once when needed (stream ages,
    /// remembered resets, flood windows, stall starts): a turn reads one batch of input, so a
    /// batch that opens many streams reads the clock once, not once per stream.
    clock: Option<Instant>,
    peer_goaway: bool,
    read_closed: bool,
    /// Written since the last flush.
    unflushed: bool,
    /// A connection error: GOAWAY queued, flush and end.
    failed: Option<Error>,
    /// Set with `failed`: how long its close may still wait for the client ([`Closing`]).
    closing: Option<Closing>,
    resets: Flood,
    /// Client resets before any of the response's head, against `completed`.
    cancels: Cancels,
    /// Streams whose response ended normally (its END_STREAM written, no reset), in the
    /// connection's life: the credit of [`Cancels`].
    completed: u64,
    empties: Flood,
    stall_timer: Option<Pin<Box<Sleep>>>,
    /// Streams with DATA their own window lets out but the connection window does not, in
    /// the order they found it closed: they get it in that order when it opens, and one that
    /// used it up goes to the back (as h2's `pending_capacity`). Ids of streams gone since
    /// are skipped when met.
    conn_waiting: VecDeque<u32>,
}

impl<IO, S, F> Conn<IO, S, F, ()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: FnMut(Request<RecvBody>) -> F + Send + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    pub fn new(
        io: IO,
        prefix: Bytes,
        settings: Settings,
        shutdown: Shutdown,
        service: S,
    ) -> Conn<IO, S, F, impl Future<Output = ()> + Send + 'static> {
        let mut read_buf = BytesMut::with_capacity(READ_BUF);
        read_buf.extend_from_slice(&prefix);
        let mut out = BytesMut::with_capacity(4096);
        let mut ours = vec![
            (
                setting::MAX_CONCURRENT_STREAMS,
                settings.max_concurrent_streams,
            ),
            (setting::INITIAL_WINDOW_SIZE, settings.initial_window_size),
            (setting::MAX_HEADER_LIST_SIZE, settings.max_header_list_size),
        ];
        if settings.max_frame_size != DEFAULT_MAX_FRAME_SIZE {
            ours.push((setting::MAX_FRAME_SIZE, settings.max_frame_size));
        }
        frame::put_settings(&mut out, &ours);
        if settings.connection_window_size > DEFAULT_WINDOW {
            frame::put_window_update(
                &mut out,
                0,
                settings.connection_window_size - DEFAULT_WINDOW,
            );
        }
        let shared = SharedRef::new(std::sync::Mutex::new(Shared::new(
            (settings.connection_window_size.max(DEFAULT_WINDOW) / 2).max(1),
            (settings.initial_window_size / 2).max(1),
        )));
        // We announce no SETTINGS_HEADER_TABLE_SIZE: the client's table updates may not go
        // past the default (a larger one would be memory the client chose).
        let decoder = hpack_decode::Decoder::new(HEADER_TABLE_SIZE);
        Conn {
            io,
            service,
            respond: respond::<F>,
            inline: Inline::new(),
            shared,
            conn_recv_window: i64::from(settings.connection_window_size.max(DEFAULT_WINDOW)),
            settings,
            shutdown,
            read_alloc: read_buf.capacity(),
            large_frame: false,
            read_buf,
            out,
            decoder,
            reader: BlockReader::new(),
            spare_blocks: Vec::new(),
            phase: Phase::Preface,
            peer_max_frame: DEFAULT_MAX_FRAME_SIZE as usize,
            peer_initial_window: i64::from(DEFAULT_WINDOW),
            conn_send_window: i64::from(DEFAULT_WINDOW),
            our_settings_acked: false,
            table_update: TableUpdate::None,
            max_client_stream: 0,
            last_accepted: 0,
            block: None,
            recent_resets: RecentResets::default(),
            client_resets: VecDeque::new(),
            goaway: Goaway::None,
            goaway_timer: None,
            linger: None,
            prefix_pending: !prefix.is_empty(),
            clock: None,
            peer_goaway: false,
            read_closed: false,
            unflushed: false,
            failed: None,
            closing: None,
            resets: Flood::new(),
            cancels: Cancels::new(),
            completed: 0,
            empties: Flood::new(),
            stall_timer: None,
            conn_waiting: VecDeque::new(),
        }
    }
}

impl<IO, S, F, R> Conn<IO, S, F, R>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: FnMut(Request<RecvBody>) -> F + Send + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
    R: Future<Output = ()> + Send + 'static,
{
    fn fail(&mut self, fault: Fault) {
        if self.failed.is_some() {
            return;
        }
        let Fault {
            reason,
            detail,
            guard,
        } = fault;
        tracing::debug!(%reason, detail, "HTTP/2 connection error");
        frame::put_goaway(&mut self.out, self.last_accepted, reason);
        self.failed = Some(Error::protocol(reason, detail, guard));
        self.closing = Some(Closing::new(reason == Reason::ENHANCE_YOUR_CALM));
        self.abort_streams();
    }

    fn abort_streams(&mut self) {
        let mut sh = lock(&self.shared);
        for (_, mut s) in sh.streams.drain() {
            if let Some(task) = s.task.take() {
                task.abort();
            }
            s.reset.get_or_insert(Reason::CANCEL);
            s.reset_by_client = true;
            s.wake_all();
        }
        sh.ready.clear();
        drop(sh);
        // Now, not at a next poll: the connection may be ending.
        self.inline.clear();
    }

    /// All streams closed (for an ending connection).
    fn idle(&self) -> bool {
        lock(&self.shared).streams.values().all(|s| s.closed())
    }

    fn recv_initial_window(&self) -> i64 {
        let ours = i64::from(self.settings.initial_window_size);
        // Until the client acknowledged our SETTINGS it may use the default.
        if self.our_settings_acked {
            ours
        } else {
            ours.max(i64::from(DEFAULT_WINDOW))
        }
    }

    pub fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if let Some(linger) = &mut self.linger {
            ready!(linger.poll(cx, &mut self.io));
            // A connection error's GOAWAY went out before its linger.
            return Poll::Ready(self.failed.take().map_or(Ok(()), Err));
        }
        if std::mem::take(&mut self.prefix_pending)
            && let Err(fault) = self.process()
        {
            self.fail(fault);
        }
        self.inline.begin();
        loop {
            // The inline streams woken (`inline`): what they queue is gathered below, in this
            // turn.
            self.inline.poll(cx, &self.shared);
            let mut progress = false;
            self.clock = None;
            if self.failed.is_none()
                && self.goaway == Goaway::None
                && self.shutdown.poll_requested(cx)
            {
                self.goaway = Goaway::Announced;
                frame::put_goaway(&mut self.out, MAX_STREAM_ID, Reason::NO_ERROR);
                frame::put_ping(&mut self.out, &GOAWAY_PING);
                self.goaway_timer = Some(Box::pin(tokio::time::sleep(GOAWAY_ACK_TIMEOUT)));
            }
            if let Some(timer) = &mut self.goaway_timer
                && timer.as_mut().poll(cx).is_ready()
            {
                // No ACK in time (a client that reads nothing, or a slow one): the final
                // GOAWAY anyway.
                self.final_goaway();
            }
            // More to take from the streams once the output is written.
            let more = self.failed.is_none() && self.gather(cx);
            while !self.out.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, &self.out) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(self.failed.take().map_or_else(
                            || Error::io(std::io::ErrorKind::WriteZero.into()),
                            Error::unsent,
                        )));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.out.advance(n);
                        self.unflushed = true;
                        if let Some(closing) = &mut self.closing {
                            closing.progress();
                        }
                        if self.out.is_empty() && self.out.capacity() > 4 * OUT_HIGH {
                            self.out = BytesMut::with_capacity(4096);
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(self.failed.take().unwrap_or(Error::io(e))));
                    }
                    Poll::Pending => break,
                }
            }
            // A TLS stream keeps what it was given until flushed (a TCP stream: a no-op).
            if self.unflushed && self.out.is_empty() {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.unflushed = false;
                        if let Some(closing) = &mut self.closing {
                            closing.progress();
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(self.failed.take().unwrap_or(Error::io(e))));
                    }
                    Poll::Pending => {}
                }
            }
            if more && self.out.is_empty() {
                progress = true;
            }
            if self.failed.is_some() {
                let closing = self.closing.as_mut().expect("set with failed");
                if !self.out.is_empty() || self.unflushed {
                    // The GOAWAY waits for room in the socket while the client takes our
                    // bytes, not for good: a client that reads nothing for the grace (its
                    // buffers full of our answers), or still reads at the cap, is then
                    // dropped with what did not fit, and the close is still its guard's, not
                    // the stall watch's (it waited for `limits.idle_timeout`, then counted as
                    // a stall).
                    ready!(closing.by.as_mut().poll(cx));
                    tracing::debug!(
                        unsent = self.out.len(),
                        "HTTP/2 connection error: the client did not take our last frames, GOAWAY included"
                    );
                    return Poll::Ready(Err(self.failed.take().expect("failed").unsent()));
                }
                // Unread input would turn the close into a TCP reset, which can destroy the
                // GOAWAY (and its reason) before the client reads it: a short linger first,
                // [`ERROR_LINGER`] from the flush (within the cap). Not after an abuse guard's
                // close (ENHANCE_YOUR_CALM: floods, rapid resets): at once (a drain of no
                // time: our side shut once, nothing read), the abuser gets no more of our
                // time.
                let calm =
                    self.failed.as_ref().and_then(Error::code) == Some(Reason::ENHANCE_YOUR_CALM.0);
                let drain = if calm {
                    linger::Drain::within(Duration::ZERO)
                } else {
                    linger::Drain::until((Instant::now() + ERROR_LINGER).min(closing.cap))
                };
                let linger = self.linger.insert(Linger { shut: false, drain });
                ready!(linger.poll(cx, &mut self.io));
                return Poll::Ready(Err(self.failed.take().expect("failed")));
            }
            let final_sent = self.goaway == Goaway::Final;
            if (final_sent || self.peer_goaway || self.read_closed)
                && self.out.is_empty()
                && !self.unflushed
                // An unfinished header block after our GOAWAY opens nothing we would serve
                // (or belongs to an open stream, and then the connection is not idle): a
                // client that stops in the middle of one must not hold the connection.
                && (self.block.is_none() || final_sent)
                && self.idle()
            {
                if self.read_closed {
                    // The client is gone; its streams with it.
                    self.abort_streams();
                    let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                    return Poll::Ready(Ok(()));
                }
                // Frames the client sent meanwhile (a request that crossed our GOAWAY, a
                // WINDOW_UPDATE) may wait unread: a close now would reset the connection,
                // and the client could lose our GOAWAY and never learn that its request was
                // not processed. Our side is shut instead, and its bytes read and dropped
                // until it closes too (it will: no stream is left), for at most
                // `linger::LINGER`.
                self.inline.clear();
                let linger = self.linger.insert(Linger {
                    shut: false,
                    drain: linger::Drain::within(linger::LINGER),
                });
                return linger.poll(cx, &mut self.io).map(Ok);
            }
            if !self.read_closed && self.out.len() < OUT_HIGH {
                if self.read_buf.capacity() - self.read_buf.len() < 4096 {
                    self.reserve_read(16 * 1024);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf)
                {
                    Poll::Ready(Ok(0)) => {
                        self.read_closed = true;
                        progress = true;
                        // Mid-frame or mid-header-block (HEADERS without END_HEADERS):
                        // nothing can finish it now, and the close below waits for no block.
                        if !self.read_buf.is_empty()
                            || self.phase != Phase::Frames
                            || self.block.is_some()
                        {
                            self.abort_streams();
                            return Poll::Ready(Err(Error::io(
                                std::io::ErrorKind::UnexpectedEof.into(),
                            )));
                        }
                        // The client closed: no response can reach it any more.
                        self.abort_streams();
                    }
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Err(fault) = self.process() {
                            self.fail(fault);
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        self.abort_streams();
                        return Poll::Ready(Err(Error::io(e)));
                    }
                    Poll::Pending => {}
                }
            }
            if let Some(timer) = &mut self.stall_timer
                && timer.as_mut().poll(cx).is_ready()
            {
                self.stall_timer = None;
                self.reset_stalled();
                progress = true;
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// The time of this turn of the loop (one clock read per turn that needs one).
    fn now(&mut self) -> Instant {
        *self.clock.get_or_insert_with(clock)
    }

    /// Graceful close, second step: GOAWAY with the last stream taken (new streams are
    /// ignored from now on).
    fn final_goaway(&mut self) {
        self.goaway_timer = None;
        if self.goaway == Goaway::Announced && self.failed.is_none() {
            self.goaway = Goaway::Final;
            frame::put_goaway(&mut self.out, self.last_accepted, Reason::NO_ERROR);
        }
    }

    /// Room for `additional` more bytes in the read buffer: in the same allocation when it
    /// has the room (its start reclaimed once no slice of it is left), else in a new one of
    /// our own making, whose size `read_alloc` then is exactly. Never `BytesMut::reserve`:
    /// it may grow the allocation in place (a `realloc` that keeps the pointer), and then
    /// nothing would tell that the buffer slices pin got larger.
    fn reserve_read(&mut self, additional: usize) {
        if self.read_buf.try_reclaim(additional) {
            return;
        }
        let mut buf = BytesMut::with_capacity((self.read_buf.len() + additional).max(READ_BUF));
        buf.extend_from_slice(&self.read_buf);
        self.read_alloc = buf.capacity();
        self.read_buf = buf;
    }

    /// Back to a read buffer of the usual size ([`READ_BUF`]) once a larger one, taken for a
    /// frame larger than it (SETTINGS_MAX_FRAME_SIZE raised: `large_frame`), has no whole
    /// frame header left (not a buffer the loop's top-up made larger, up to `len` + 16 KiB,
    /// while request DATA slices held the old one: review finding, an upload of 16 KiB frames
    /// paid one more allocation per frame):
    /// the connection does not keep its largest frame's size for its life (slices of the
    /// large one, unread request DATA, keep it alive only as long as they are). At most
    /// one allocation per frame larger than the usual buffer, which a larger one needs anyway
    /// when its last frame's payload is still held.
    fn shrink_read(&mut self) {
        if !std::mem::take(&mut self.large_frame) || self.read_alloc <= READ_BUF {
            return;
        }
        #[cfg(test)]
        SHRINKS.with(|n| n.set(n.get() + 1));
        let mut buf = BytesMut::with_capacity(READ_BUF);
        buf.extend_from_slice(&self.read_buf);
        self.read_alloc = buf.capacity();
        self.read_buf = buf;
    }

    /// Parses and handles every whole frame in the read buffer.
    fn process(&mut self) -> ConnResult {
        loop {
            if self.failed.is_some() {
                return Ok(());
            }
            if self.phase == Phase::Preface {
                let n = self.read_buf.len().min(frame::PREFACE.len());
                if self.read_buf[..n] != frame::PREFACE[..n] {
                    return Err(Fault::new(
                        Reason::PROTOCOL_ERROR,
                        "invalid connection preface",
                    ));
                }
                if n < frame::PREFACE.len() {
                    return Ok(());
                }
                self.read_buf.advance(n);
                self.phase = Phase::FirstSettings;
            }
            if self.read_buf.len() < frame::HEADER_LEN {
                self.shrink_read();
                return Ok(());
            }
            let head = Head::parse(&self.read_buf);
            if head.len > self.settings.max_frame_size {
                return Err(Fault::new(
                    Reason::FRAME_SIZE_ERROR,
                    "frame larger than SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            let total = frame::HEADER_LEN + head.len as usize;
            if total > READ_BUF {
                self.large_frame = true;
            }
            if self.read_buf.len() < total {
                self.reserve_read(total - self.read_buf.len());
                return Ok(());
            }
            if self.phase == Phase::FirstSettings {
                if head.kind != kind::SETTINGS || head.flags & flag::ACK != 0 {
                    return Err(Fault::new(
                        Reason::PROTOCOL_ERROR,
                        "the first frame is not SETTINGS",
                    ));
                }
                self.phase = Phase::Frames;
            }
            self.read_buf.advance(frame::HEADER_LEN);
            let payload = self.read_buf.split_to(head.len as usize);
            self.frame(head, payload)?;
        }
    }

    fn frame(&mut self, head: Head, payload: BytesMut) -> ConnResult {
        if let Some(block) = &self.block
            && (head.kind != kind::CONTINUATION || head.stream != block.stream)
        {
            return Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "a frame inside a header block",
            ));
        }
        match head.kind {
            kind::DATA => self.data(head, payload),
            kind::HEADERS => self.headers(head, payload),
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(Fault::new(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                let reason = if head.len != 5 {
                    Reason::FRAME_SIZE_ERROR
                } else if u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff
                    == head.stream
                {
                    Reason::PROTOCOL_ERROR
                } else {
                    return Ok(());
                };
                // A stream error, but no RST_STREAM may name an idle stream (§6.4): on one,
                // the connection's error.
                if self.idle_stream(head.stream) {
                    return Err(Fault::new(reason, "invalid PRIORITY on an idle stream"));
                }
                if self.ignored(head.stream) {
                    return Ok(());
                }
                self.reset_stream(head.stream, reason)
            }
            kind::RST_STREAM => self.rst_stream(head, &payload),
            kind::SETTINGS => self.settings_frame(head, &payload),
            kind::PUSH_PROMISE => Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            kind::PING => {
                if head.stream != 0 {
                    return Err(Fault::new(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if head.len != 8 {
                    return Err(Fault::new(
                        Reason::FRAME_SIZE_ERROR,
                        "PING of other than 8 bytes",
                    ));
                }
                if head.flags & flag::ACK == 0 {
                    frame::put_ping_ack(&mut self.out, &payload);
                } else if payload[..] == GOAWAY_PING && self.goaway == Goaway::Announced {
                    // Every stream the client opened before it saw our GOAWAY is read.
                    self.final_goaway();
                }
                Ok(())
            }
            kind::GOAWAY => {
                if head.stream != 0 {
                    return Err(Fault::new(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if head.len < 8 {
                    return Err(Fault::new(
                        Reason::FRAME_SIZE_ERROR,
                        "GOAWAY shorter than 8 bytes",
                    ));
                }
                // The client opens no more streams; ours (none: no push) above its last id
                // would be dropped. The open ones finish.
                self.peer_goaway = true;
                Ok(())
            }
            kind::WINDOW_UPDATE => self.window_update(head, &payload),
            kind::CONTINUATION => self.continuation(head, payload),
            _ => Ok(()),
        }
    }

    /// Remembers that we reset `id` (for [`RESET_MEMORY`]): what the client sent on it before
    /// it saw the reset is dropped.
    fn remember_reset(&mut self, id: u32) {
        let now = self.now();
        self.recent_resets.remember(id, now);
    }

    /// A stream the client opened after our final GOAWAY, which we ignored: its frames are
    /// dropped (one comparison; no record that many of them would fill).
    fn ignored(&self, id: u32) -> bool {
        self.goaway == Goaway::Final && id > self.last_accepted
    }

    /// We reset `id` lately ([`Self::remember_reset`]).
    fn reset_lately(&mut self, id: u32) -> bool {
        let now = self.now();
        self.recent_resets.contains(id, now)
    }

    /// A stream error (§5.4.2): RST_STREAM, the stream's sides told, counted against the
    /// flood guard (but REFUSED_STREAM).
    fn reset_stream(&mut self, id: u32, reason: Reason) -> ConnResult {
        frame::put_rst(&mut self.out, id, reason);
        self.remember_reset(id);
        {
            let mut sh = lock(&self.shared);
            if let Some(s) = sh.streams.get_mut(&id) {
                s.reset = Some(reason);
                sh.end_reset_stream(id);
            }
        }
        // A refused stream is no fault: a client may open more than our limit before it
        // has our SETTINGS, and it retries them.
        if reason != Reason::REFUSED_STREAM && {
            let now = self.now();
            self.resets.hit(now, self.reset_limit())
        } {
            return Err(Fault::calm(Guard::StreamErrors));
        }
        Ok(())
    }

    /// A stream the client did not open (yet): above the highest it opened, or even (ours,
    /// and we push none). The one test for both: frames on it are a connection error.
    fn idle_stream(&self, id: u32) -> bool {
        id > self.max_client_stream || id.is_multiple_of(2)
    }

    fn reset_limit(&self) -> u32 {
        RESET_LIMIT.max(self.settings.max_concurrent_streams.saturating_mul(2))
    }

    fn data(&mut self, head: Head, mut payload: BytesMut) -> ConnResult {
        let id = head.stream;
        if id == 0 {
            return Err(Fault::new(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if self.idle_stream(id) {
            return Err(Fault::new(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        let len = head.len as i64;
        self.conn_recv_window -= len;
        if self.conn_recv_window < 0 {
            return Err(Fault::new(
                Reason::FLOW_CONTROL_ERROR,
                "DATA past the connection window",
            ));
        }
        if head.flags & flag::PADDED != 0 {
            let Some(&pad) = payload.first() else {
                return Err(Fault::new(
                    Reason::PROTOCOL_ERROR,
                    "PADDED DATA without a pad length",
                ));
            };
            if pad as usize >= payload.len() {
                return Err(Fault::new(
                    Reason::PROTOCOL_ERROR,
                    "DATA padding longer than the frame",
                ));
            }
            payload.truncate(payload.len() - pad as usize);
            payload.advance(1);
        }
        let end = head.flags & flag::END_STREAM != 0;
        // Only a frame with no byte at all is free to send; one that carries padding costs
        // the client window like data (given back as data is), so it is no flood of empties.
        if head.len == 0 && !end && {
            let now = self.now();
            self.empties.hit(now, EMPTY_FRAME_LIMIT)
        } {
            return Err(Fault::calm(Guard::EmptyData));
        }
        let padding = head.len - payload.len() as u32;
        let mut guard = lock(&self.shared);
        let sh = &mut *guard;
        // Padding is given back at once.
        sh.conn_released += padding;
        let error = match sh.streams.get_mut(&id) {
            None => {
                sh.conn_released += payload.len() as u32;
                // Unless we reset it lately: looked up once the lock is released.
                (!self.ignored(id)).then_some((Reason::STREAM_CLOSED, true))
            }
            Some(s) if s.reset.is_some() => {
                sh.conn_released += payload.len() as u32;
                // §5.1: DATA after the client's own RST_STREAM is its error; after ours it may
                // have been sent before our reset reached the client, and is dropped.
                s.reset_by_client.then_some((Reason::STREAM_CLOSED, true))
            }
            Some(s) if s.recv == Recv::Ended => {
                sh.conn_released += payload.len() as u32;
                Some((Reason::STREAM_CLOSED, false))
            }
            Some(s) => {
                s.recv_window -= len;
                // The padding is the stream's window too (§6.9.1): given back like what the
                // body reader takes, once enough of it is due.
                s.recv_released += padding;
                if padding > 0 && s.recv_released >= sh.stream_release_at && !s.release_queued {
                    s.release_queued = true;
                    sh.release_due.push(id);
                }
                s.recv_len += payload.len() as u64;
                if s.recv_window < 0 {
                    sh.conn_released += payload.len() as u32;
                    Some((Reason::FLOW_CONTROL_ERROR, false))
                } else if s
                    .content_length
                    .is_some_and(|cl| s.recv_len > cl || (end && s.recv_len != cl))
                {
                    sh.conn_released += payload.len() as u32;
                    Some((Reason::PROTOCOL_ERROR, false))
                } else {
                    if s.body_gone {
                        sh.conn_released += payload.len() as u32;
                    } else {
                        s.push_recv(payload, self.read_alloc);
                    }
                    if end {
                        s.recv = Recv::Ended;
                    }
                    if let Some(w) = s.body_waker.take() {
                        w.wake();
                    }
                    if s.finished() {
                        sh.remove_stream(id);
                    }
                    None
                }
            }
        };
        drop(guard);
        match error {
            Some((_, true)) if self.reset_lately(id) => Ok(()),
            Some((reason, _)) => self.reset_stream(id, reason),
            None => Ok(()),
        }
    }

    fn headers(&mut self, head: Head, mut payload: BytesMut) -> ConnResult {
        let id = head.stream;
        if id == 0 {
            return Err(Fault::new(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        if id.is_multiple_of(2) {
            return Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "HEADERS on an even stream id",
            ));
        }
        let mut pad = 0;
        if head.flags & flag::PADDED != 0 {
            let Some(&p) = payload.first() else {
                return Err(Fault::new(
                    Reason::PROTOCOL_ERROR,
                    "PADDED HEADERS without a pad length",
                ));
            };
            pad = p as usize;
            payload.advance(1);
        }
        let mut self_dependent = false;
        if head.flags & flag::PRIORITY != 0 {
            if payload.len() < 5 {
                return Err(Fault::new(
                    Reason::FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority",
                ));
            }
            let dep =
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
            self_dependent = dep == id;
            payload.advance(5);
        }
        if pad > payload.len() {
            return Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "HEADERS padding longer than the frame",
            ));
        }
        payload.truncate(payload.len() - pad);
        let end_stream = head.flags & flag::END_STREAM != 0;
        // One rule for a block in one frame or in many (the frame size bounds only the
        // first): its fragments and 9 per frame, against the list size + BLOCK_SLACK.
        let counted = payload.len() + frame::HEADER_LEN;
        self.check_block_size(counted)?;
        if head.flags & flag::END_HEADERS != 0 {
            return self.header_block(id, &payload, end_stream, self_dependent);
        }
        self.block = Some(Block {
            stream: id,
            end_stream,
            self_dependent,
            buf: payload,
            counted,
        });
        Ok(())
    }

    fn check_block_size(&self, counted: usize) -> ConnResult {
        if counted > self.settings.max_header_list_size as usize + BLOCK_SLACK {
            return Err(Fault::calm(Guard::HeaderBlock));
        }
        Ok(())
    }

    fn continuation(&mut self, head: Head, payload: BytesMut) -> ConnResult {
        let Some(mut block) = self.block.take() else {
            return Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without a header block",
            ));
        };
        block.counted += payload.len() + frame::HEADER_LEN;
        self.check_block_size(block.counted)?;
        if payload.is_empty() && head.flags & flag::END_HEADERS == 0 && {
            let now = self.now();
            self.empties.hit(now, EMPTY_FRAME_LIMIT)
        } {
            return Err(Fault::calm(Guard::EmptyContinuations));
        }
        block.buf.extend_from_slice(&payload);
        if head.flags & flag::END_HEADERS != 0 {
            return self.header_block(
                block.stream,
                &block.buf,
                block.end_stream,
                block.self_dependent,
            );
        }
        self.block = Some(block);
        Ok(())
    }

    /// A whole header block: a new request, or a request's trailers.
    fn header_block(
        &mut self,
        id: u32,
        block: &[u8],
        end_stream: bool,
        self_dependent: bool,
    ) -> ConnResult {
        let result = self.decode_header_block(id, block, end_stream, self_dependent);
        // Whatever became of the block: no large arena or field list stays behind it.
        self.reader.end();
        result
    }

    fn decode_header_block(
        &mut self,
        id: u32,
        block: &[u8],
        end_stream: bool,
        self_dependent: bool,
    ) -> ConnResult {
        let new = id > self.max_client_stream;
        self.reader.start(
            self.settings.max_header_list_size as usize,
            block.len(),
            !new,
        );
        let reader = &mut self.reader;
        // Decoded whole whatever becomes of the stream: the dynamic table must stay in step.
        if let Err(error) = self
            .decoder
            .decode_with_cb(block, |n, v, never| reader.field(n, v, never))
        {
            tracing::debug!(stream = id, %error, "undecodable header block");
            return Err(Fault::new(
                Reason::COMPRESSION_ERROR,
                "invalid header block",
            ));
        }
        if !new {
            return self.trailers(id, end_stream);
        }
        self.max_client_stream = id;
        if self.goaway == Goaway::Final {
            // After our GOAWAY, new streams are ignored (§6.8), with no record: their later
            // frames are dropped by id ([`Self::ignored`]).
            return Ok(());
        }
        if self_dependent {
            return self.reset_stream(id, Reason::PROTOCOL_ERROR);
        }
        let req = match self.reader.finish_request() {
            Ok(r) => r,
            Err(Refused::Malformed(why)) => {
                tracing::debug!(stream = id, why, "malformed HTTP/2 request");
                return self.reset_stream(id, Reason::PROTOCOL_ERROR);
            }
            Err(Refused::TooLarge) => {
                // As h2's server: 431, and the rest of the request is not wanted.
                let mut b = BytesMut::new();
                hpack::encode_response(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    &http::HeaderMap::new(),
                    hpack::Added::default(),
                    &mut b,
                );
                put_block(
                    &mut self.out,
                    &mut self.table_update,
                    id,
                    &b,
                    true,
                    self.peer_max_frame,
                );
                if !end_stream {
                    frame::put_rst(&mut self.out, id, Reason::NO_ERROR);
                }
                self.remember_reset(id);
                return Ok(());
            }
        };
        if end_stream && req.content_length.is_some_and(|n| n != 0) {
            return self.reset_stream(id, Reason::PROTOCOL_ERROR);
        }
        let mut sh = lock(&self.shared);
        let max = self.settings.max_concurrent_streams as usize;
        // Closed streams stay in the map while their body or task is still being dropped:
        // counted only when it matters.
        if sh.streams.len() >= max && sh.streams.values().filter(|s| !s.closed()).count() >= max {
            drop(sh);
            return self.reset_stream(id, Reason::REFUSED_STREAM);
        }
        self.last_accepted = id;
        let head_only = req.method == Method::HEAD;
        let content_length = req.content_length;
        let mut stream = Stream::new(
            self.recv_initial_window(),
            self.peer_initial_window,
            end_stream,
            content_length,
        );
        stream.opened = Some(*self.clock.get_or_insert_with(clock));
        // The rule (`inline`): a request without a body, on a current-thread runtime.
        let inline = (end_stream && self.inline.on()).then(|| {
            let (slot, task) = self.inline.reserve(id);
            stream.task = Some(task);
            slot
        });
        sh.streams.insert(id, stream);
        let body = RecvBody {
            shared: self.shared.clone(),
            id,
            content_length,
            read: 0,
            done: end_stream,
        };
        if end_stream && let Some(s) = sh.streams.get_mut(&id) {
            // Nothing to read: no reader to wait for.
            s.body_gone = true;
        }
        // The service and the spawn run without the lock: a service may look at its body
        // (which takes the lock), and a new task may run at once on another thread.
        drop(sh);
        let future = (self.service)(req.into_request(body));
        let block = self.spare_blocks.pop().unwrap_or_default();
        let respond = (self.respond)(self.shared.clone(), id, head_only, block, future);
        if let Some(slot) = inline {
            // First polled at the top of `poll_conn`'s next turn (this one read something).
            self.inline.start(slot, id, respond);
            return Ok(());
        }
        let task = tokio::spawn(respond);
        // Gone already when the task ran to its end on another thread.
        if let Some(s) = lock(&self.shared).streams.get_mut(&id) {
            s.task = Some(Task::Spawned(task.abort_handle()));
        }
        Ok(())
    }

    /// The trailers just decoded into `self.reader`.
    fn trailers(&mut self, id: u32, end_stream: bool) -> ConnResult {
        let mut sh = lock(&self.shared);
        let Some(s) = sh.streams.get_mut(&id) else {
            drop(sh);
            if self.ignored(id) || self.reset_lately(id) {
                return Ok(());
            }
            if self.client_resets.contains(&id) {
                // §5.1: a frame but PRIORITY after the client's RST_STREAM.
                return self.reset_stream(id, Reason::STREAM_CLOSED);
            }
            // Not open and not one reset lately: either finished (§5.1: a connection error
            // STREAM_CLOSED is allowed there) or skipped, which §5.1.1 makes a connection
            // error PROTOCOL_ERROR. We keep no record of every id opened, so both get the
            // one a skipped id must.
            return Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "HEADERS on a closed stream",
            ));
        };
        if s.reset.is_some() {
            // As for DATA: the client's error after its own reset, dropped after ours.
            let by_client = s.reset_by_client;
            drop(sh);
            if by_client && !self.reset_lately(id) {
                return self.reset_stream(id, Reason::STREAM_CLOSED);
            }
            return Ok(());
        }
        if s.recv == Recv::Ended {
            drop(sh);
            return self.reset_stream(id, Reason::STREAM_CLOSED);
        }
        if !end_stream {
            drop(sh);
            return self.reset_stream(id, Reason::PROTOCOL_ERROR);
        }
        let trailers = match self.reader.finish_trailers() {
            Ok(t) => t,
            Err(_) => {
                drop(sh);
                return self.reset_stream(id, Reason::PROTOCOL_ERROR);
            }
        };
        if s.content_length.is_some_and(|cl| cl != s.recv_len) {
            drop(sh);
            return self.reset_stream(id, Reason::PROTOCOL_ERROR);
        }
        s.recv = Recv::Ended;
        if !s.body_gone {
            s.recv_trailers = Some(trailers);
        }
        if let Some(w) = s.body_waker.take() {
            w.wake();
        }
        if s.finished() {
            sh.remove_stream(id);
        }
        Ok(())
    }

    fn rst_stream(&mut self, head: Head, payload: &[u8]) -> ConnResult {
        let id = head.stream;
        if id == 0 {
            return Err(Fault::new(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if head.len != 4 {
            return Err(Fault::new(
                Reason::FRAME_SIZE_ERROR,
                "RST_STREAM of other than 4 bytes",
            ));
        }
        if self.idle_stream(id) {
            return Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        let reason = Reason(u32::from_be_bytes([
            payload[0], payload[1], payload[2], payload[3],
        ]));
        let mut sh = lock(&self.shared);
        // On a stream already closed or reset (ours crossing the client's), or already gone:
        // nothing to do, and no RST_STREAM may answer a RST_STREAM (§5.4.2).
        let Some(s) = sh.streams.get_mut(&id) else {
            return Ok(());
        };
        // Before the response began, the stream's age: under [`RAPID_RESET_AGE`] a rapid
        // one, under [`CANCEL_FLOOR`] a cancellation ([`Cancels`]), else neither.
        let unfinished = !s.closed();
        let age = match s.opened {
            Some(opened) if unfinished => {
                Some(self.clock.get_or_insert_with(clock).duration_since(opened))
            }
            _ => None,
        };
        if s.reset.is_none() {
            s.reset = Some(reason);
            s.reset_by_client = true;
        }
        sh.end_reset_stream(id);
        drop(sh);
        if unfinished {
            if self.client_resets.len() == CLIENT_RESETS {
                self.client_resets.pop_front();
            }
            self.client_resets.push_back(id);
        }
        let Some(age) = age else {
            return Ok(());
        };
        let now = self.now();
        if age < RAPID_RESET_AGE {
            if self.resets.hit(now, self.reset_limit()) {
                return Err(Fault::calm(Guard::RapidReset));
            }
        } else if age < CANCEL_FLOOR && self.cancels.hit(now, self.completed, self.reset_limit()) {
            return Err(Fault::calm(Guard::CancelledStreams));
        }
        Ok(())
    }

    fn settings_frame(&mut self, head: Head, payload: &[u8]) -> ConnResult {
        if head.stream != 0 {
            return Err(Fault::new(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.flags & flag::ACK != 0 {
            if head.len != 0 {
                return Err(Fault::new(
                    Reason::FRAME_SIZE_ERROR,
                    "SETTINGS ACK with a payload",
                ));
            }
            if !self.our_settings_acked {
                self.our_settings_acked = true;
                // Streams opened before the ACK got the default window, when ours is less.
                let delta =
                    i64::from(self.settings.initial_window_size) - i64::from(DEFAULT_WINDOW);
                if delta < 0 {
                    for s in lock(&self.shared).streams.values_mut() {
                        s.recv_window += delta;
                    }
                }
            }
            return Ok(());
        }
        if !head.len.is_multiple_of(6) {
            return Err(Fault::new(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS length not a multiple of 6",
            ));
        }
        for entry in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            match id {
                setting::ENABLE_PUSH if value > 1 => {
                    return Err(Fault::new(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH not 0 or 1",
                    ));
                }
                setting::INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > MAX_WINDOW {
                        return Err(Fault::new(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
                        ));
                    }
                    let delta = i64::from(value) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(value);
                    let mut guard = lock(&self.shared);
                    let sh = &mut *guard;
                    for (&id, s) in sh.streams.iter_mut() {
                        s.send_window += delta;
                        if s.send_window > MAX_WINDOW {
                            return Err(Fault::new(
                                Reason::FLOW_CONTROL_ERROR,
                                "a stream window over 2^31-1",
                            ));
                        }
                        if !s.queue.is_empty() && !s.in_ready {
                            s.in_ready = true;
                            sh.ready.push_back(id);
                        }
                    }
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME_SIZE..=frame::MAX_MAX_FRAME_SIZE).contains(&value) {
                        return Err(Fault::new(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        ));
                    }
                    self.peer_max_frame = value as usize;
                }
                // Our encoder never uses the dynamic table, but a client that lowers its
                // size is owed a size update (RFC 7541 §4.2) in our next block.
                setting::HEADER_TABLE_SIZE
                    if (value as usize) < HEADER_TABLE_SIZE
                        && self.table_update == TableUpdate::None =>
                {
                    self.table_update = TableUpdate::Due;
                }
                // MAX_CONCURRENT_STREAMS (we push nothing), MAX_HEADER_LIST_SIZE (advisory)
                // and unknown ids are ignored.
                _ => {}
            }
        }
        frame::put_settings_ack(&mut self.out);
        Ok(())
    }

    fn window_update(&mut self, head: Head, payload: &[u8]) -> ConnResult {
        if head.len != 4 {
            return Err(Fault::new(
                Reason::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE of other than 4 bytes",
            ));
        }
        let inc = i64::from(
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
        );
        let id = head.stream;
        if id == 0 {
            if inc == 0 {
                return Err(Fault::new(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.conn_send_window += inc;
            if self.conn_send_window > MAX_WINDOW {
                return Err(Fault::new(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window over 2^31-1",
                ));
            }
            // The streams waiting for it get it in turn (`gather`). The client reads: the
            // stall clock of a stream waiting only for the connection window starts again,
            // as the FIFO will come to it; one its own window holds keeps its clock.
            if self.conn_waiting.is_empty() {
                // No lock, no clock read: the common case, one every half window.
                return Ok(());
            }
            let now = self.now();
            let mut sh = lock(&self.shared);
            for id in &self.conn_waiting {
                if let Some(s) = sh.streams.get_mut(id)
                    && s.in_conn_wait
                    && s.stalled_since.is_some()
                {
                    s.stalled_since = Some(now);
                }
            }
            return Ok(());
        }
        if self.idle_stream(id) {
            return Err(Fault::new(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let mut guard = lock(&self.shared);
        let sh = &mut *guard;
        let Some(s) = sh.streams.get_mut(&id) else {
            return Ok(());
        };
        if s.reset.is_some() {
            return Ok(());
        }
        if inc == 0 {
            drop(guard);
            return self.reset_stream(id, Reason::PROTOCOL_ERROR);
        }
        s.send_window += inc;
        if s.send_window > MAX_WINDOW {
            drop(guard);
            return self.reset_stream(id, Reason::FLOW_CONTROL_ERROR);
        }
        if !s.queue.is_empty() && !s.in_ready {
            s.in_ready = true;
            sh.ready.push_back(id);
        }
        Ok(())
    }

    /// Takes what the streams queued (and the window their readers gave back) into the
    /// output buffer, under the client's windows, until the buffer is over [`OUT_HIGH`].
    /// Streams take turns of [`SEND_TURN`] bytes; the connection window goes to the ones
    /// that waited for it in their order (`conn_waiting`). True when streams still have
    /// frames to write (the output bound stopped it).
    fn gather(&mut self, cx: &mut Context<'_>) -> bool {
        let mut guard = lock(&self.shared);
        let sh = &mut *guard;
        if !sh
            .conn_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            sh.conn_waker = Some(cx.waker().clone());
        }
        if sh.conn_released >= sh.conn_release_at
            || (sh.conn_released > 0 && self.conn_recv_window < i64::from(sh.conn_release_at))
        {
            frame::put_window_update(&mut self.out, 0, sh.conn_released);
            self.conn_recv_window += i64::from(sh.conn_released);
            sh.conn_released = 0;
        }
        for id in sh.release_due.drain(..) {
            if let Some(s) = sh.streams.get_mut(&id) {
                s.release_queued = false;
                if s.recv == Recv::Open && s.reset.is_none() && s.recv_released > 0 {
                    frame::put_window_update(&mut self.out, id, s.recv_released);
                    s.recv_window += i64::from(s.recv_released);
                    s.recv_released = 0;
                }
            }
        }
        let mut stalled = false;
        while self.out.len() < OUT_HIGH {
            // The connection window, while open, goes first to the streams that waited for
            // it, in their order; then the streams with anything else to write.
            let from_waiting = self.conn_send_window > 0 && !self.conn_waiting.is_empty();
            let next = if from_waiting {
                self.conn_waiting.pop_front()
            } else {
                sh.ready.pop_front()
            };
            let Some(id) = next else {
                break;
            };
            let Some(s) = sh.streams.get_mut(&id) else {
                continue;
            };
            if from_waiting {
                if !s.in_conn_wait {
                    // Not waiting (each stream is in the FIFO once, flagged).
                    continue;
                }
                s.in_conn_wait = false;
            } else {
                s.in_ready = false;
            }
            if s.reset.is_some() {
                s.queue.clear();
                s.queued = 0;
                s.stalled_since = None;
            }
            let was_done = s.send_done;
            let mut turn = 0;
            let mut stop = Stop::Done;
            while let Some(item) = s.queue.front_mut() {
                match item {
                    Queued::Head { block, end } => {
                        let end = *end;
                        put_block(
                            &mut self.out,
                            &mut self.table_update,
                            id,
                            block,
                            end,
                            self.peer_max_frame,
                        );
                        if let Some(Queued::Head { block, .. }) = s.queue.pop_front() {
                            give_back(&mut self.spare_blocks, block);
                        }
                        // The response began: a reset from now on counts in no budget.
                        s.opened = None;
                        s.send_done |= end;
                    }
                    // No fields: an empty DATA frame ends the stream instead (a block of
                    // only a table size update is legal, but some decoders reject it; the
                    // update goes with the next real block).
                    Queued::Trailers(block) if block.is_empty() => {
                        frame::put_data(&mut self.out, id, &[], true);
                        s.queue.pop_front();
                        s.send_done = true;
                    }
                    Queued::Trailers(block) => {
                        put_block(
                            &mut self.out,
                            &mut self.table_update,
                            id,
                            block,
                            true,
                            self.peer_max_frame,
                        );
                        s.queue.pop_front();
                        s.send_done = true;
                    }
                    Queued::Data { data, end } => {
                        let end = *end;
                        if data.is_empty() {
                            frame::put_data(&mut self.out, id, &[], end);
                            s.queue.pop_front();
                            s.send_done |= end;
                            continue;
                        }
                        if s.send_window <= 0 {
                            stop = Stop::StreamWindow;
                            break;
                        }
                        if self.conn_send_window <= 0 {
                            stop = Stop::ConnWindow;
                            break;
                        }
                        if turn >= SEND_TURN {
                            stop = Stop::Turn;
                            break;
                        }
                        let n = (data.len() as i64)
                            .min(s.send_window)
                            .min(self.conn_send_window)
                            // Not the client's SETTINGS_MAX_FRAME_SIZE: §6.5.2 makes it at
                            // least 16 KiB, DATA_FRAME.
                            .min(DATA_FRAME as i64) as usize;
                        let last = n == data.len();
                        frame::put_data(&mut self.out, id, &data[..n], end && last);
                        data.advance(n);
                        turn += n;
                        s.send_window -= n as i64;
                        self.conn_send_window -= n as i64;
                        s.queued -= n;
                        s.stalled_since = None;
                        if s.queued < SEND_BUFFER
                            && let Some(w) = s.send_waker.take()
                        {
                            w.wake();
                        }
                        if last {
                            s.queue.pop_front();
                            s.send_done |= end;
                        }
                    }
                }
                if self.out.len() >= OUT_HIGH {
                    stop = Stop::Turn;
                    break;
                }
            }
            if s.queue.is_empty() {
                stop = Stop::Done;
            }
            if s.send_done && !was_done && s.reset.is_none() {
                // The response ended normally: one more cancellation allowed in this window
                // ([`Cancels`]).
                self.completed += 1;
            }
            match stop {
                Stop::Done => {}
                Stop::Turn => {
                    // Its turn is over (or the output is full): the back of the queue.
                    if !s.in_ready {
                        s.in_ready = true;
                        sh.ready.push_back(id);
                    }
                }
                Stop::StreamWindow | Stop::ConnWindow => {
                    if s.stalled_since.is_none() {
                        s.stalled_since = Some(*self.clock.get_or_insert_with(clock));
                    }
                    stalled = true;
                    if stop == Stop::ConnWindow && !s.in_conn_wait {
                        s.in_conn_wait = true;
                        self.conn_waiting.push_back(id);
                    }
                }
            }
            if let Some(reason) = s.reset_to_send.take()
                && s.reset.is_none()
            {
                // The stream's task failed; what the window did not let out is dropped.
                frame::put_rst(&mut self.out, id, reason);
                s.reset = Some(reason);
                s.queue.clear();
                s.queued = 0;
                s.stalled_since = None;
                s.wake_all();
                let now = *self.clock.get_or_insert_with(clock);
                self.recent_resets.remember(id, now);
            }
            if s.send_done && s.recv == Recv::Open && s.body_gone && s.reset.is_none() {
                // The response is complete and nobody reads the request: stop it (§8.1).
                frame::put_rst(&mut self.out, id, Reason::NO_ERROR);
                s.reset = Some(Reason::NO_ERROR);
                let now = *self.clock.get_or_insert_with(clock);
                self.recent_resets.remember(id, now);
            }
            if s.finished() {
                sh.remove_stream(id);
            }
        }
        // Ids of streams gone pile up only while the connection window stays shut: dropped
        // once they outnumber the streams.
        if self.conn_waiting.len() > 2 * sh.streams.len() + 16 {
            self.conn_waiting
                .retain(|id| sh.streams.get(id).is_some_and(|s| s.in_conn_wait));
        }
        sh.conn_recv_low = self.conn_recv_window < i64::from(sh.conn_release_at);
        let more =
            !sh.ready.is_empty() || (self.conn_send_window > 0 && !self.conn_waiting.is_empty());
        drop(guard);
        if stalled && self.stall_timer.is_none() {
            self.stall_timer = Some(Box::pin(tokio::time::sleep(
                self.settings.stalled_stream_timeout,
            )));
        }
        more
    }

    /// Resets (CANCEL) the streams whose response waited `stalled_stream_timeout` for the
    /// client's window.
    fn reset_stalled(&mut self) {
        let now = clock();
        let timeout = self.settings.stalled_stream_timeout;
        let mut stalled = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let sh = lock(&self.shared);
            for (&id, s) in sh.streams.iter() {
                // A stream reset either way waits for nothing (§5.1: and may get no second
                // RST_STREAM); it stays in the map while its body reader is held.
                if s.reset.is_some() {
                    continue;
                }
                if let Some(since) = s.stalled_since {
                    if now.duration_since(since) >= timeout {
                        stalled.push(id);
                    } else {
                        let at = since + timeout;
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                }
            }
        }
        for id in stalled {
            if let Some(task) = lock(&self.shared)
                .streams
                .get_mut(&id)
                .and_then(|s| s.task.take())
            {
                task.abort();
            }
            // Not the client's fault as far as the reset guard goes: it only read slowly.
            frame::put_rst(&mut self.out, id, Reason::CANCEL);
            self.remember_reset(id);
            let mut guard = lock(&self.shared);
            let sh = &mut *guard;
            if let Some(s) = sh.streams.get_mut(&id) {
                s.reset = Some(Reason::CANCEL);
                s.queue.clear();
                s.queued = 0;
                s.wake_all();
                let unread = s.drain_recv();
                sh.conn_released += unread as u32;
                if s.finished() {
                    sh.remove_stream(id);
                }
            }
            drop(guard);
            if let Some(f) = &self.settings.on_stalled_stream {
                f();
            }
        }
        if let Some(at) = next {
            self.stall_timer = Some(Box::pin(tokio::time::sleep_until(at)));
        }
    }
}

/// What a connection holds at one moment (the fuzz tests check it stays bounded).
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Buffered {
    pub read_buf: usize,
    /// The size of the read buffer's allocation.
    pub read_alloc: usize,
    pub out: usize,
    /// An unfinished header block's bytes.
    pub block: usize,
    pub streams: usize,
    /// Streams not closed (§5.1), the ones SETTINGS_MAX_CONCURRENT_STREAMS counts.
    pub open_streams: usize,
    /// Request DATA received and not read.
    pub recv_data: usize,
    /// Response DATA queued by the streams' tasks.
    pub queued: usize,
    pub ready: usize,
    pub recent_resets: usize,
    /// The header block reader's value arena (capacity) and field list (entries' capacity).
    pub arena: usize,
    pub fields: usize,
    /// Spare response head buffers (capacities, summed) and spare send queues (how many).
    pub spare_blocks: usize,
    pub spare_queues: usize,
}

#[cfg(test)]
impl<IO, S, F, R> Conn<IO, S, F, R> {
    pub(super) fn buffered(&self) -> Buffered {
        let sh = lock(&self.shared);
        Buffered {
            read_buf: self.read_buf.len(),
            read_alloc: self.read_alloc,
            out: self.out.len(),
            block: self.block.as_ref().map_or(0, |b| b.buf.len()),
            streams: sh.streams.len(),
            open_streams: sh.streams.values().filter(|s| !s.closed()).count(),
            recv_data: sh
                .streams
                .values()
                .map(|s| s.recv_data.iter().map(Bytes::len).sum::<usize>() + s.recv_tail.len())
                .sum(),
            queued: sh.streams.values().map(|s| s.queued).sum(),
            ready: sh.ready.len(),
            recent_resets: self.recent_resets.len(),
            arena: self.reader.held().0,
            fields: self.reader.held().1,
            spare_blocks: self.spare_blocks.iter().map(BytesMut::capacity).sum(),
            spare_queues: sh.spare_queues.len(),
        }
    }

    /// The state the connection shares with its streams (the fuzz test reads the windows
    /// not yet given back once the connection is idle).
    pub(super) fn shared(&self) -> SharedRef {
        self.shared.clone()
    }
}

/// After a connection error's GOAWAY (not an abuse guard's): the longest the GOAWAY waits for
/// the client to take any of our bytes (it waits behind what was queued before it, 64 KiB and
/// a frame at most, [`OUT_HIGH`]), and the lingering close once it is flushed: short, long
/// enough for the client to read the GOAWAY.
pub(super) const ERROR_LINGER: Duration = Duration::from_millis(500);
/// The same wait after an abuse guard's GOAWAY (ENHANCE_YOUR_CALM), which lingers not at all.
/// A client that reads nothing never makes room, and gets no more of our time than this.
pub(super) const CALM_GRACE: Duration = Duration::from_millis(100);
/// An abuse guard's close in all, however steadily the client reads: the 64 KiB before its
/// GOAWAY take 2 s at about 260 kbit/s. Past it the connection is dropped with what is left.
pub(super) const CALM_CLOSE_MAX: Duration = Duration::from_secs(2);
/// Another connection error's close in all, linger included: 64 KiB at about 100 kbit/s.
pub(super) const ERROR_CLOSE_MAX: Duration = Duration::from_secs(5);

/// The time a connection error's close may still take. Progress-based: each write or flush
/// that moves our bytes re-arms the grace ([`CALM_GRACE`] or [`ERROR_LINGER`]), so a client
/// that reads slowly but steadily (a bulk download on a slow link, the socket's buffers full
/// when the error came) gets its GOAWAY whole, and one that reads nothing goes after the
/// grace; the cap ([`CALM_CLOSE_MAX`], [`ERROR_CLOSE_MAX`]) bounds one that reads a byte now
/// and then.
struct Closing {
    /// The grace's end (never past `cap`).
    by: Pin<Box<Sleep>>,
    grace: Duration,
    cap: Instant,
}

impl Closing {
    fn new(calm: bool) -> Closing {
        let (grace, max) = if calm {
            (CALM_GRACE, CALM_CLOSE_MAX)
        } else {
            (ERROR_LINGER, ERROR_CLOSE_MAX)
        };
        let now = Instant::now();
        Closing {
            by: Box::pin(tokio::time::sleep_until(now + grace)),
            grace,
            cap: now + max,
        }
    }

    /// Our bytes moved: the grace again, from now.
    fn progress(&mut self) {
        let end = (Instant::now() + self.grace).min(self.cap);
        self.by.as_mut().reset(end);
    }
}

/// A connection's lingering close: our side shut first (once `shut`: a TLS stream sends
/// close_notify, a TCP one FIN), then the client's bytes read and dropped until it closes or
/// `drain`'s time is up.
struct Linger {
    shut: bool,
    drain: linger::Drain,
}

impl Linger {
    fn poll<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
    ) -> Poll<()> {
        if !self.shut {
            match Pin::new(&mut *io).poll_shutdown(cx) {
                // A TLS stream's close_notify may never fit (a client that reads nothing, its
                // buffers full): the same deadline, and the connection is dropped without it.
                Poll::Pending => return self.drain.poll_expired(cx),
                // An error: nothing to wait for.
                Poll::Ready(_) => self.shut = true,
            }
        }
        let mut scratch = [0u8; 4096];
        self.drain.poll(cx, Pin::new(io), &mut scratch)
    }
}

/// Spare response head buffers kept per connection (at most), and the largest kept.
const SPARE_BLOCKS: usize = 16;
const SPARE_BLOCK_SIZE: usize = 1024;

/// Keeps a written response head's buffer for a later stream (emptied; not a large one).
fn give_back(spare: &mut Vec<BytesMut>, mut block: BytesMut) {
    if block.capacity() <= SPARE_BLOCK_SIZE && spare.len() < SPARE_BLOCKS {
        block.clear();
        spare.push(block);
    }
}

impl<IO, S, F, R> Drop for Conn<IO, S, F, R> {
    fn drop(&mut self) {
        let mut sh = lock(&self.shared);
        for (_, mut s) in sh.streams.drain() {
            if let Some(task) = s.task.take() {
                task.abort();
            }
            s.reset.get_or_insert(Reason::CANCEL);
            s.reset_by_client = true;
            s.wake_all();
        }
    }
}
