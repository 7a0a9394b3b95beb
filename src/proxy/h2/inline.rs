//! Streams served on the connection's own task: their `respond` futures kept in a slot array
//! the connection task polls (`Conn::poll_conn`), instead of a task each (`tokio::spawn`).
//!
//! Why: per h2c GET, the spawn, the task's first poll and its wakes through the scheduler were
//! ≈ 2–3k of ~34k user-space instructions, and the task cell one heap allocation
//! (docs/BENCHMARKS.md, "h2c streams inline on the connection task").
//!
//! Which streams (the rule, decided once per connection and per stream in
//! `Conn::decode_header_block`): a request that ended with its HEADERS (END_STREAM: no request
//! body to read) on a current-thread runtime (`runtime.worker_threads: 1`, Outrigger's
//! default). On a multi-thread runtime a task per stream lets one connection's streams run on
//! several cores, so they are spawned as before; a request with a body is spawned too (its
//! body reader and the connection would share the task, not measured here).
//!
//! How:
//! - each slot keeps its future in a pinned box that is reused from stream to stream
//!   (`Pin::set`: no allocation per stream once the connection has as many slots as it had
//!   streams at once; at most [`SPARE_SLOTS`] free slots keep theirs), and a waker of its own,
//!   made once (an `Arc` of [`SlotWaker`]);
//! - a slot's waker puts the slot on the connection's ready list (once: a flag) and wakes the
//!   connection task; `poll_conn` polls only the slots on that list, so a stream waiting for a
//!   slow upstream costs nothing until its waker fires, and one that is ready does not wait
//!   for it;
//! - at most [`INLINE_BUDGET`] polls per `poll_conn` call; past it the rest wait on the list and
//!   the task yields (wakes itself), so a burst of ready streams does not hold back the
//!   connection's reads and writes (as tokio's budget does for a task); the same when the
//!   connection task's tokio budget is spent (each inline future's I/O draws on it, and
//!   spent it would make the connection's own socket reads and writes wait for the next
//!   poll). Checking it (`coop::has_budget_remaining`) rather than moving the socket's
//!   read and write before the inline polls keeps one turn's order: what the inline futures
//!   queue is written in the same turn;
//! - a stream ended by a reset (the client's RST_STREAM, ours, the stall timer, the
//!   connection's end) has its future dropped, as a spawned one is aborted: `Task::abort` marks
//!   the slot and puts it on the ready list only while the slot still serves that stream (its
//!   `current` id, set when reserved and cleared when its future ends: a stream whose future
//!   has ended but whose response still waits for the client's window may be reset long after
//!   its slot went to another stream), and the next poll drops the future instead of polling it
//!   (`Conn::abort_streams` and a closing connection drop them all at once). Dropping the
//!   future drops the service's (its upstream connection released as for an aborted task);
//! - a poll that panics is caught (`catch_unwind`) and its future dropped (a panic in that drop
//!   is caught too): its guard resets the
//!   stream (INTERNAL_ERROR) and the connection goes on, as when a spawned stream's task
//!   panics (tokio catches it; the panic hook runs in both cases);
//! - the connection does not wait for them on its own: an inline stream is open until its
//!   response is written, and graceful shutdown and drain wait for open streams (`Conn::idle`)
//!   as for spawned ones.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use tokio::task::AbortHandle;

use super::streams::{SharedRef, lock};

/// Inline polls one `poll_conn` call makes at most before it yields (tokio's own budget per
/// task poll is 128 operations on its resources).
pub(super) const INLINE_BUDGET: u32 = 64;
/// Free slots that keep their future's box for the next stream (at most): a connection keeps
/// no more memory than that for the streams it once had at once (a reset's future is dropped
/// at the next poll, so one read of HEADERS and RST_STREAM pairs takes a slot per pair).
const SPARE_SLOTS: usize = 16;

#[cfg(test)]
thread_local! {
    /// Tests: connections made on this thread spawn every stream, as on a multi-thread
    /// runtime ([`spawn_all`]).
    static SPAWN_ALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests: until the guard is dropped, connections made on this thread spawn every stream
/// (the multi-thread runtime's path) whatever the runtime, so that the tests on tokio's
/// current-thread runtime (and its paused clock) cover both paths (`on_both_paths!`). The
/// guard's drop restores what was set before (nested switches). Bind it to a name: `let _ =`
/// drops it at once.
#[cfg(test)]
#[must_use = "the switch is on only while the guard lives: `let _spawned = spawn_all();`"]
pub(super) fn spawn_all() -> impl Drop {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SPAWN_ALL.set(self.0);
        }
    }
    Restore(SPAWN_ALL.replace(true))
}

/// Tests: whether [`spawn_all`] is on for this thread.
#[cfg(test)]
pub(super) fn spawning_all() -> bool {
    SPAWN_ALL.get()
}

/// How a stream's response is served: what ends it when the stream is reset.
pub(super) enum Task {
    /// On a task of its own.
    Spawned(AbortHandle),
    /// In a slot of the connection's [`Inline`] set, for this stream id.
    Inline(Arc<SlotWaker>, u32),
}

impl Task {
    /// Ends the stream's service: the task aborted, or the inline future dropped by the
    /// connection task's next poll of its inline set (never here: this is called with the
    /// connection's lock held, and the future's drop takes it).
    pub fn abort(&self) {
        match self {
            Task::Spawned(handle) => handle.abort(),
            Task::Inline(waker, id) => {
                // Only the slot's current stream: its future may have ended and the slot
                // serve another stream now.
                if waker.current.load(Ordering::Acquire) == *id {
                    waker.doomed.store(*id, Ordering::Release);
                    waker.wake_by_ref();
                }
            }
        }
    }
}

/// What the slots' wakers share with the connection task.
#[derive(Default)]
struct Woken {
    inner: Mutex<WokenInner>,
}

#[derive(Default)]
struct WokenInner {
    /// Slots woken since the connection task last looked, in the order they were woken (the
    /// ones a poll left out for want of budget at the front).
    ready: VecDeque<usize>,
    /// The connection task's waker.
    conn: Option<Waker>,
}

impl Woken {
    fn lock(&self) -> MutexGuard<'_, WokenInner> {
        // Nothing runs under this lock that could panic halfway through a change.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A slot's waker (one per slot, for every stream it serves).
pub(super) struct SlotWaker {
    slot: usize,
    /// On the ready list (not yet taken by the connection task).
    queued: AtomicBool,
    /// The stream whose future is to be dropped, not polled (0: none; stream ids are odd).
    doomed: AtomicU32,
    /// The stream the slot serves (0: none): set by `Inline::reserve`, cleared when its future
    /// ends; `Task::abort` of any other stream leaves the slot alone.
    current: AtomicU32,
    woken: Arc<Woken>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut w = self.woken.lock();
        w.ready.push_back(self.slot);
        if let Some(conn) = &w.conn {
            conn.wake_by_ref();
        }
    }
}

struct Slot<R> {
    /// Reused: `Pin::set` replaces the future in place (None: a free slot past
    /// [`SPARE_SLOTS`], its box dropped).
    future: Option<Pin<Box<Option<R>>>>,
    /// The stream it serves (0: empty).
    id: u32,
    shared_waker: Arc<SlotWaker>,
    waker: Waker,
}

impl<R> Drop for Inline<R> {
    fn drop(&mut self) {
        // As in `clear`: the slot wakers may outlive the connection.
        self.woken.lock().conn = None;
    }
}

/// The connection's inline streams (see the module doc).
pub(super) struct Inline<R> {
    /// The rule's runtime half: a current-thread runtime.
    on: bool,
    slots: Vec<Slot<R>>,
    free: Vec<usize>,
    woken: Arc<Woken>,
    /// Slots filled since the last poll (polled first at the next, no wake needed: the
    /// connection task is running).
    fresh: Vec<usize>,
    /// The slots of one poll (kept for its allocation).
    batch: Vec<usize>,
    /// The slots of one poll left for the next (kept for its allocation).
    rest: Vec<usize>,
    /// Polls left in this `poll_conn` call.
    budget: u32,
    /// Slots holding a future.
    live: usize,
}

impl<R: Future<Output = ()>> Inline<R> {
    /// Inline streams when the current runtime is a current-thread one.
    pub fn new() -> Self {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let on =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread);
        #[cfg(test)]
        let on = on && !SPAWN_ALL.get();
        Inline {
            on,
            slots: Vec::new(),
            free: Vec::new(),
            woken: Arc::default(),
            fresh: Vec::new(),
            batch: Vec::new(),
            rest: Vec::new(),
            budget: INLINE_BUDGET,
            live: 0,
        }
    }

    /// Streams may be served inline on this connection (the runtime's half of the rule).
    pub fn on(&self) -> bool {
        self.on
    }

    /// Takes a free slot for stream `id` (filled by [`Self::start`]); the stream's [`Task`].
    pub fn reserve(&mut self, id: u32) -> (usize, Task) {
        let slot = self.free.pop().unwrap_or_else(|| {
            let slot = self.slots.len();
            let shared_waker = Arc::new(SlotWaker {
                slot,
                queued: AtomicBool::new(false),
                doomed: AtomicU32::new(0),
                current: AtomicU32::new(0),
                woken: self.woken.clone(),
            });
            self.slots.push(Slot {
                future: None,
                id: 0,
                waker: Waker::from(shared_waker.clone()),
                shared_waker,
            });
            slot
        });
        let waker = self.slots[slot].shared_waker.clone();
        // A doom for this stream from before (none) or for the slot's last stream is void.
        waker.doomed.store(0, Ordering::Release);
        waker.current.store(id, Ordering::Release);
        (slot, Task::Inline(waker, id))
    }

    /// Puts stream `id`'s future in its reserved slot; it is first polled by the next
    /// [`Self::poll`].
    pub fn start(&mut self, slot: usize, id: u32, future: R) {
        let s = &mut self.slots[slot];
        match &mut s.future {
            Some(b) => b.as_mut().set(Some(future)),
            None => s.future = Some(Box::pin(Some(future))),
        }
        s.id = id;
        self.live += 1;
        self.fresh.push(slot);
    }

    /// A new `poll_conn` call: a new budget.
    pub fn begin(&mut self) {
        self.budget = INLINE_BUDGET;
    }

    /// Drops the futures of the slots marked by [`Task::abort`] and polls the woken ones (at
    /// most what is left of the budget); what they queue is for the caller's `gather`. The connection's waker in `shared` is taken first, so that a
    /// future queueing its response does not wake the running connection task (the caller
    /// gathers next, which puts it back).
    pub fn poll(&mut self, cx: &mut Context<'_>, shared: &SharedRef) {
        if self.live == 0 {
            return;
        }
        // The woken first (oldest first), then the fresh: a steady flow of new streams does
        // not hold back a woken one.
        let mut batch = std::mem::take(&mut self.batch);
        {
            let mut w = self.woken.lock();
            if !w.conn.as_ref().is_some_and(|c| c.will_wake(cx.waker())) {
                w.conn = Some(cx.waker().clone());
            }
            batch.extend(w.ready.drain(..));
        }
        batch.append(&mut self.fresh);
        if batch.is_empty() {
            self.batch = batch;
            return;
        }
        lock(shared).conn_waker = None;
        for &n in &batch {
            let s = &mut self.slots[n];
            if s.id == 0 {
                // Woken after its future ended (or a fresh one already polled).
                s.shared_waker.queued.store(false, Ordering::Release);
                continue;
            }
            if s.shared_waker.doomed.load(Ordering::Acquire) == s.id {
                // Dropped whatever the budget: it holds an upstream connection, say.
                s.shared_waker.queued.store(false, Ordering::Release);
                self.end(n);
                continue;
            }
            // Out of our budget, or of the connection task's tokio budget (the inline
            // futures' I/O draws on it: spent, the connection's own reads and writes would
            // return Pending until the next poll of the task).
            if self.budget == 0 || !tokio::task::coop::has_budget_remaining() {
                // Next time, first (on the list, flagged as a wake leaves it).
                s.shared_waker.queued.store(true, Ordering::Release);
                self.rest.push(n);
                continue;
            }
            self.budget -= 1;
            // Before the poll: a wake during it puts the slot back on the list.
            s.shared_waker.queued.store(false, Ordering::Release);
            let mut cx = Context::from_waker(&s.waker);
            let future = s.future.as_mut().and_then(|b| b.as_mut().as_pin_mut());
            let polled = catch_unwind(AssertUnwindSafe(|| future.map(|f| f.poll(&mut cx))));
            match polled {
                Ok(Some(Poll::Pending)) => {}
                // Ended; or panicked: dropping the future resets the stream (its guard).
                Ok(_) | Err(_) => self.end(n),
            }
        }
        if !self.rest.is_empty() {
            let mut w = self.woken.lock();
            for &n in self.rest.iter().rev() {
                w.ready.push_front(n);
            }
            drop(w);
            self.rest.clear();
            // The task yields and comes back for the rest.
            cx.waker().wake_by_ref();
        }
        batch.clear();
        self.batch = batch;
    }

    /// Drops slot `n`'s future and frees the slot.
    fn end(&mut self, n: usize) {
        let s = &mut self.slots[n];
        s.id = 0;
        s.shared_waker.current.store(0, Ordering::Release);
        // A drop that panics (a service's or a body's `Drop`) costs only its stream, as for a
        // spawned task (tokio catches a panic while dropping an aborted task's future).
        let _ = catch_unwind(AssertUnwindSafe(|| {
            if self.free.len() >= SPARE_SLOTS {
                s.future = None;
            } else if let Some(b) = &mut s.future {
                b.as_mut().set(None);
            }
        }));
        self.live -= 1;
        self.free.push(n);
    }

    /// Drops every inline future (the connection is ending: its streams are gone).
    pub fn clear(&mut self) {
        for n in 0..self.slots.len() {
            if self.slots[n].id != 0 {
                self.end(n);
            }
        }
        self.fresh.clear();
        // A slot waker kept by an upstream resource after the connection ends does not keep
        // the connection task (its waker) alive.
        self.woken.lock().conn = None;
    }

    /// Futures held (tests).
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.live
    }

    /// Slots, and boxes kept by free ones (tests).
    #[cfg(test)]
    pub fn kept(&self) -> (usize, usize) {
        let spare = self
            .slots
            .iter()
            .filter(|s| s.id == 0 && s.future.is_some())
            .count();
        (self.slots.len(), spare)
    }
}
