//! The supervised app (`outrigger run -- CMD` or `app.command`): spawned after every listener is
//! bound and every module started, in its own process group, with stdio passed through and
//! `OUTRIGGER_*` variables telling it where the sidecar is. On a stop it gets a signal and the
//! rest of the grace period, then SIGKILL; the sidecar exits with its exit code.
//!
//! This is the foundation's part of lifecycle; probes, restart policies and signal forwarding
//! settings belong to the lifecycle issue.

use std::collections::BTreeMap;
use std::io;
use std::process::ExitStatus;
use std::time::Instant;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A running app process (and its process group).
pub struct App {
    child: Child,
    pgid: Pid,
    program: String,
}

impl App {
    /// Starts `command`. `env` is added to the inherited environment, then `app_env`
    /// (`app.env`).
    pub fn spawn(
        command: &[String],
        app_env: &BTreeMap<String, String>,
        env: &[(String, String)],
    ) -> io::Result<App> {
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .envs(app_env)
            // Its own group, so that a stop reaches the app's children too and a terminal's
            // Ctrl-C reaches only the sidecar, which then stops the app in order.
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the app exited at once"))?;
        Ok(App {
            child,
            pgid: Pid::from_raw(pid as i32),
            program: command[0].clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    /// Waits for the app to exit. Cancel-safe. Whatever the app left running in its process
    /// group is killed then: the group lives and dies with the app.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await;
        let _ = killpg(self.pgid, Signal::SIGKILL);
        status
    }

    /// Sends `signal` to the app's process group and waits until `deadline`; then SIGKILL.
    pub async fn stop(&mut self, signal: Signal, deadline: Instant) -> io::Result<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let _ = killpg(self.pgid, Signal::SIGKILL);
            return Ok(status);
        }
        tracing::info!(pid = self.pid(), %signal, "stopping the app");
        // ESRCH: the group is already gone; wait() below reaps the child.
        let _ = killpg(self.pgid, signal);
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.child.wait()).await {
            Ok(status) => {
                let _ = killpg(self.pgid, Signal::SIGKILL);
                status
            }
            Err(_) => {
                tracing::warn!(
                    pid = self.pid(),
                    "the app did not stop within the grace period; killing it"
                );
                let _ = killpg(self.pgid, Signal::SIGKILL);
                // Also the process itself, in case it left its group.
                let _ = self.child.start_kill();
                self.child.wait().await
            }
        }
    }
}

/// The exit code a shell would report: the code, or 128 + the signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
