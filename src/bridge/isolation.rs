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
//! Everything of the bridge lives there from the start: its sockets are bound on that runtime
//! ([`on_bridge`]: a socket wakes the reactor of the runtime it was registered with, whoever
//! polls it), and its state is built with that runtime current ([`build`]: a task a component
//! spawns while it is made runs there) — so no bridge socket or client task wakes the proxy's
//! workers.
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

/// Runs `make` with the bridge's runtime as the current one: what it spawns or registers (a
/// component's client task, a timer) belongs to the bridge's thread.
pub fn build<T>(make: impl FnOnce() -> T) -> T {
    let _current = runtime().enter();
    make()
}

/// Runs `work` on the bridge's runtime (sockets made there are registered with its reactor)
/// and waits for it here.
pub async fn on_bridge<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> T {
    match runtime().spawn(work.in_current_span()).await {
        Ok(t) => t,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("the bridge's runtime dropped a task: {e}"),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::sync::mpsc;

    use crate::bridge::{Bridge, BridgeMetrics, BridgeState, invoke};

    /// The bridge's state and sockets are made while another runtime (the main one) runs the
    /// start-up; once that runtime is gone, the sockets still accept on the bridge's: they were
    /// never registered with the main runtime's reactor (a socket bound there fails with
    /// "the Tokio context is being shutdown" once it stops, and wakes its I/O thread while it
    /// runs).
    #[test]
    fn the_bridge_sockets_belong_to_its_own_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "service: unit\nbridge: { address: 127.0.0.1:0, grpc_address: 127.0.0.1:0 }\n",
        )
        .unwrap();
        let source = crate::config::Source {
            file: Some(path),
            ..Default::default()
        };
        let (config, built) =
            crate::preflight::load(&source, &BTreeMap::<String, String>::new()).unwrap();
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let bridge = main.block_on(async {
            let (control, _rx) = mpsc::channel(1);
            let (_setter, gate) = crate::runtime::app_gate(true);
            let clusters = invoke::Clusters::Own(Box::new(invoke::OwnClusters {
                configs: BTreeMap::new(),
                built: Default::default(),
                metrics: Default::default(),
                tls: Default::default(),
            }));
            let state = super::build(|| {
                BridgeState::new(
                    &config,
                    built.bridge.unwrap(),
                    gate,
                    control,
                    clusters,
                    BridgeMetrics::default(),
                    Default::default(),
                )
            })
            .unwrap();
            Bridge::build(state).await.unwrap().0
        });
        drop(main);
        super::runtime().block_on(async {
            for bound in [&bridge.bound, bridge.grpc_bound.as_ref().unwrap()] {
                let crate::config::Address::Tcp(at) = bound.local_address().unwrap() else {
                    unreachable!("tcp")
                };
                let client = tokio::net::TcpStream::connect(at);
                let (accepted, client) = tokio::join!(bound.accept(), client);
                accepted.unwrap();
                client.unwrap();
            }
        });
    }
}
