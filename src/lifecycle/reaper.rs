//! Reaping orphans when Outrigger is PID 1 — the container's entrypoint in supervision mode.
//! Processes the app leaves behind (a daemonizing child, a shell's background job) are
//! re-parented to PID 1 when their parent exits, and stay zombies unless PID 1 waits for them.
//! tini and `docker run --init` do this; Outrigger does it itself so that it can be the
//! entrypoint alone.
//!
//! tokio waits for the children it spawned itself (the app, exec probes) by their pid, so those
//! must not be reaped here: each is registered in [`OURS`] while it runs, and the reaper only
//! peeks (`WNOWAIT`) at an exited child before reaping it, skipping registered ones.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

/// Pids of children tokio waits for.
static OURS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// A sweep runs at least this often (SIGCHLDs coalesce).
const SWEEP: Duration = Duration::from_secs(1);

/// Held while spawning a child and registering its pid, so the reaper cannot take a child
/// that exits at once before it is registered.
pub fn spawning() -> MutexGuard<'static, BTreeSet<i32>> {
    OURS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forgets a child once tokio has waited for it.
pub fn forget(pid: u32) {
    spawning().remove(&(pid as i32));
}

/// Starts reaping orphans if this process is PID 1.
pub fn start_if_init() {
    if std::process::id() != 1 {
        return;
    }
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "running as PID 1 but cannot watch SIGCHLD; orphaned processes will stay zombies");
            return;
        }
    };
    tracing::info!("running as PID 1: reaping orphaned processes");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep(SWEEP) => {}
            }
            reap_orphans();
        }
    });
}

fn reap_orphans() {
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match waitid(Id::All, flags) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return,
            },
        };
        if spawning().contains(&pid.as_raw()) {
            // tokio's own child: it reaps it; orphans behind it wait for the next sweep.
            return;
        }
        match waitpid(Pid::from_raw(pid.as_raw()), Some(WaitPidFlag::WNOHANG)) {
            Ok(_) => tracing::debug!(pid = pid.as_raw(), "reaped an orphaned process"),
            Err(_) => return,
        }
    }
}
