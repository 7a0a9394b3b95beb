//! The state the connection task shares with its streams' tasks: one `Mutex` per connection
//! over every open stream (its buffered request body, its queued response frames, its send
//! window) and the wakers of both sides, as `h2` keeps it. A stream's task queues its
//! response here and wakes the connection task, which writes the frames under the client's
//! flow control; the connection task queues request DATA here and wakes the stream's body
//! reader, whose reading gives the window back.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use tokio::time::Instant;

use super::frame::Reason;
use super::inline::Task;

/// Stream ids are small odd integers: no need to hash them.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u32(&mut self, n: u32) {
        // Odd ids: drop the low bit so consecutive streams fill consecutive buckets.
        self.0 = u64::from(n >> 1);
    }
}

pub(super) type StreamMap = HashMap<u32, Stream, BuildHasherDefault<IdHasher>>;

/// A response's frame waiting to be written.
pub(super) enum Queued {
    /// The response head, encoded in a buffer of the connection's that goes back to it once
    /// written (`Conn::gather`).
    Head {
        block: BytesMut,
        end: bool,
    },
    Data {
        data: Bytes,
        end: bool,
    },
    Trailers(Bytes),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Recv {
    /// The client may send more DATA (or trailers).
    Open,
    /// END_STREAM received.
    Ended,
}

pub(super) struct Stream {
    // Receive side (the request body).
    pub recv: Recv,
    /// Request DATA not read yet, in order: slices of the connection's read buffer (large
    /// payloads), then `recv_tail`.
    pub recv_data: VecDeque<Bytes>,
    /// Small payloads copied together (after everything in `recv_data`): a slice of a few
    /// bytes would keep its whole read buffer (16 KiB or more) alive while unread.
    pub recv_tail: BytesMut,
    pub recv_trailers: Option<HeaderMap>,
    /// Bytes the client may still send on this stream.
    pub recv_window: i64,
    /// Bytes the body reader took and the client has not been given back yet.
    pub recv_released: u32,
    /// DATA bytes received, checked against `content_length`.
    pub recv_len: u64,
    pub content_length: Option<u64>,
    pub body_waker: Option<Waker>,
    /// The `RecvBody` was dropped or read to its end: what still comes is dropped.
    pub body_gone: bool,

    // Send side (the response).
    pub queue: VecDeque<Queued>,
    /// Bytes of DATA in `queue`.
    pub queued: usize,
    pub send_window: i64,
    /// The last frame of the response (END_STREAM) was written.
    pub send_done: bool,
    /// The response's task waits for room in `queue`.
    pub send_waker: Option<Waker>,
    /// Set once the stream is reset either way: both sides stop.
    pub reset: Option<Reason>,
    /// The reset came from the client (RST_STREAM) or the connection's end.
    pub reset_by_client: bool,
    /// In `Shared::release_due`.
    pub release_queued: bool,
    /// A reset to write (the stream's own task failed or ended without a response).
    pub reset_to_send: Option<Reason>,
    /// In `Shared::ready`.
    pub in_ready: bool,
    /// In the connection task's FIFO of streams waiting for the connection window.
    pub in_conn_wait: bool,
    /// Since when queued DATA waited for the client's window: the stream's own, or the
    /// connection's while the client opens it for no stream (see `Conn::window_update`).
    pub stalled_since: Option<Instant>,
    /// When its HEADERS were read (the turn's clock), for the age of a client's reset
    /// (`conn::RAPID_RESET_AGE`, `conn::CANCEL_FLOOR`); None once the response's head was
    /// written.
    pub opened: Option<Instant>,
    /// The response's task, or its slot on the connection's task (`inline`).
    pub task: Option<Task>,
}

impl Stream {
    pub fn new(
        recv_window: i64,
        send_window: i64,
        ended: bool,
        content_length: Option<u64>,
    ) -> Self {
        Stream {
            recv: if ended { Recv::Ended } else { Recv::Open },
            recv_data: VecDeque::new(),
            recv_tail: BytesMut::new(),
            recv_trailers: None,
            recv_window,
            recv_released: 0,
            recv_len: 0,
            content_length,
            body_waker: None,
            body_gone: false,
            queue: VecDeque::new(),
            queued: 0,
            send_window,
            send_done: false,
            send_waker: None,
            reset: None,
            reset_by_client: false,
            release_queued: false,
            reset_to_send: None,
            in_ready: false,
            in_conn_wait: false,
            stalled_since: None,
            opened: None,
            task: None,
        }
    }

    /// Closed as far as the protocol goes (§5.1): reset, or both sides ended.
    pub fn closed(&self) -> bool {
        self.reset.is_some() || (self.send_done && self.recv == Recv::Ended)
    }

    /// Can leave the map: closed, and nobody will read its body any more.
    pub fn finished(&self) -> bool {
        self.closed() && self.body_gone
    }

    /// Queues a request DATA payload for the body reader. `pins` is the size of the read buffer
    /// it is a slice of: a payload under a quarter of it is copied into `recv_tail` (with the
    /// small payloads before it), so what unread DATA keeps alive stays within about four
    /// times its own size (and twice for tiny frames), whatever the client sends between.
    pub fn push_recv(&mut self, payload: BytesMut, pins: usize) {
        if payload.is_empty() {
            return;
        }
        if payload.len().saturating_mul(4) < pins {
            self.recv_tail.extend_from_slice(&payload);
            return;
        }
        if !self.recv_tail.is_empty() {
            // Taken, not split: a split would leave `recv_tail` sharing (and, once the
            // reader drops its part, reusing) the largest buffer it ever grew to.
            let tail = std::mem::take(&mut self.recv_tail).freeze();
            self.recv_data.push_back(tail);
        }
        self.recv_data.push_back(payload.freeze());
    }

    /// The next unread request DATA.
    pub fn pop_recv(&mut self) -> Option<Bytes> {
        if let Some(data) = self.recv_data.pop_front() {
            return Some(data);
        }
        if self.recv_tail.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.recv_tail).freeze())
    }

    pub fn recv_is_empty(&self) -> bool {
        self.recv_data.is_empty() && self.recv_tail.is_empty()
    }

    /// Drops the unread request DATA (nobody will read it); its length, to give back.
    pub fn drain_recv(&mut self) -> usize {
        let unread =
            self.recv_data.drain(..).map(|d| d.len()).sum::<usize>() + self.recv_tail.len();
        self.recv_tail = BytesMut::new();
        unread
    }

    pub fn wake_all(&mut self) {
        if let Some(w) = self.body_waker.take() {
            w.wake();
        }
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }
}

pub(super) struct Shared {
    pub streams: StreamMap,
    /// Streams with something for the connection task to write or clean up.
    pub ready: VecDeque<u32>,
    /// Window the body readers gave back on the connection, not yet announced.
    pub conn_released: u32,
    /// Streams whose body reader gave back enough window for a WINDOW_UPDATE.
    pub release_due: Vec<u32>,
    pub conn_waker: Option<Waker>,
    /// Give back the connection's window once this much was read (half of it).
    pub conn_release_at: u32,
    /// The connection's receive window is under `conn_release_at`: any window a body reader
    /// gives back is announced at once (the client may be waiting for it), so the reader
    /// wakes the connection task. Set by the connection task, the only one that changes
    /// that window.
    pub conn_recv_low: bool,
    /// Give back a stream's window once this much was read (half of it).
    pub stream_release_at: u32,
    /// Send queues of removed streams, emptied, for the next streams' responses
    /// ([`Shared::remove_stream`]): no allocation per stream for one.
    pub spare_queues: Vec<VecDeque<Queued>>,
}

/// Spare send queues kept per connection (at most), and the largest kept.
const SPARE_QUEUES: usize = 16;
const SPARE_QUEUE_LEN: usize = 8;

pub(super) type SharedRef = Arc<Mutex<Shared>>;

pub(super) fn lock(shared: &SharedRef) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves consistent enough state for our uses: every
    // change is a few field writes.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// No streams yet; window given back once `conn_release_at` (the connection's) or
    /// `stream_release_at` (a stream's) bytes are due.
    pub fn new(conn_release_at: u32, stream_release_at: u32) -> Self {
        Shared {
            streams: Default::default(),
            ready: VecDeque::new(),
            conn_released: 0,
            release_due: Vec::new(),
            conn_waker: None,
            conn_release_at,
            conn_recv_low: false,
            stream_release_at,
            spare_queues: Vec::new(),
        }
    }

    /// A stream reset either way (its `reset` already set): as hyper does for any reset, the
    /// service's future goes with it (else its upstream request would go on outside the
    /// stream limit, which the stream no longer counts toward); nothing queued is sent; both
    /// sides are woken (the body reader sees the error, not what came before it); its unread
    /// request bytes go back to the connection window; a finished stream is removed.
    pub fn end_reset_stream(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if let Some(task) = s.task.take() {
            task.abort();
        }
        s.queue.clear();
        s.queued = 0;
        // Nothing waits for window any more: the stall timer passes it by.
        s.stalled_since = None;
        s.wake_all();
        let unread = s.drain_recv();
        self.conn_released += unread as u32;
        if s.finished() {
            self.remove_stream(id);
        }
    }

    /// Removes a stream, keeping its send queue's allocation for a later stream's response.
    pub fn remove_stream(&mut self, id: u32) {
        if let Some(mut s) = self.streams.remove(&id)
            && (1..=SPARE_QUEUE_LEN).contains(&s.queue.capacity())
            && self.spare_queues.len() < SPARE_QUEUES
        {
            s.queue.clear();
            self.spare_queues.push(std::mem::take(&mut s.queue));
        }
    }

    /// Puts a stream on the connection task's list and returns the waker to wake once the
    /// lock is released.
    pub fn make_ready(&mut self, id: u32) -> Option<Waker> {
        if let Some(s) = self.streams.get_mut(&id)
            && !s.in_ready
        {
            s.in_ready = true;
            self.ready.push_back(id);
        }
        self.conn_waker.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A removed stream's send queue serves the next stream (no allocation per response);
    /// a grown one is not kept.
    #[test]
    fn removed_streams_leave_their_send_queue_for_the_next() {
        let mut sh = Shared::new(1, 1);
        let mut s = Stream::new(10, 10, true, None);
        s.queue.push_back(Queued::Trailers(Bytes::new()));
        let kept = s.queue.capacity();
        sh.streams.insert(1, s);
        sh.remove_stream(1);
        assert!(sh.streams.is_empty());
        assert_eq!(sh.spare_queues.len(), 1);
        assert!(sh.spare_queues[0].is_empty());
        assert_eq!(sh.spare_queues[0].capacity(), kept);
        let mut big = Stream::new(10, 10, true, None);
        big.queue.reserve(SPARE_QUEUE_LEN + 1);
        sh.streams.insert(3, big);
        sh.remove_stream(3);
        assert_eq!(sh.spare_queues.len(), 1);
    }
}
