//! The bridge runs on its own thread, with its own tokio runtime, so that its heavy work cannot
//! delay the proxy's requests. With one worker thread (the default `runtime.worker_threads`)
//! everything shared it: 32 clients looping over 4 MiB bulk-get answers (JSON built on the
//! worker) pushed the proxy's p50 from 0.16 ms to 1.45 s (`bench/isolation.sh`). On its own
//! thread the kernel's scheduler shares the CPU between the two, and a woken proxy preempts a
//! busy bridge within its scheduling granularity (see docs/BENCHMARKS.md for the figures).
//!
//! A runtime rather than `spawn_blocking` around each JSON call: the work is spread over every
//! handler (state, pub/sub, bulk publish, invocation bodies, gRPC), the store clients' own
//! parsing and hyper's copying of large bodies; moving the whole module moves all of it, and
//! the bridge's code does not change.
//!
//! In: the bridge module's serve future (from the supervisor's task on the main runtime). Out:
//! its result on the main runtime; a panic is resumed there (the supervisor counts and
//! restarts it as before), and the serve task is aborted when the module's task is.

use std::future::Future;
use std::sync::OnceLock;

use tracing::Instrument;

use crate::runtime::ModuleResult;

/// The bridge's runtime: one worker thread (`outrigger-bridge`), its own timers and I/O, and
/// its own blocking pool (SQLite). Made on first use, kept for the life of the process (a
/// module restart serves on it again).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("outrigger-bridge")
            .enable_all()
            .build()
            .expect("cannot start the bridge's runtime")
    })
}

/// Aborts the task when the module's own task is dropped (the supervisor aborted it).
struct AbortOnDrop(tokio::task::JoinHandle<ModuleResult>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `serve` on the bridge's runtime and waits for it here.
pub async fn run(serve: impl Future<Output = ModuleResult> + Send + 'static) -> ModuleResult {
    let mut task = AbortOnDrop(runtime().spawn(serve.in_current_span()));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Box::new(e)),
    }
}
