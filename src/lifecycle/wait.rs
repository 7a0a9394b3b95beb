//! `outrigger wait`: for an app that runs in its own container (Kubernetes without
//! supervision mode). Its entrypoint becomes `outrigger wait -- CMD`: block until the sidecar
//! is ready for the app's outbound calls (`/ready/outbound`: the sidecar's `/ready` itself waits
//! for the app), then run CMD. With `--shutdown`, CMD runs as a child (signals passed on) and
//! the sidecar is asked to stop when it ends, so a Job's pod completes.

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

use super::exit_code;
use crate::config::Address;

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(100);
/// One poll's limit.
const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// EX_UNAVAILABLE: the sidecar did not become ready in time.
pub const EXIT_NOT_READY: i32 = 69;

pub struct WaitOptions {
    pub admin: Address,
    pub timeout: Duration,
    pub shutdown: bool,
    pub command: Vec<String>,
}

/// Runs `outrigger wait`; returns the exit code (when it does not exec).
pub fn run(options: WaitOptions) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ready = rt.block_on(wait_ready(&options.admin, options.timeout));
    if let Err(e) = ready {
        eprintln!(
            "outrigger wait: the sidecar at {} was not ready within {}: {e}",
            options.admin,
            humantime::format_duration(options.timeout)
        );
        return Ok(EXIT_NOT_READY);
    }
    if options.command.is_empty() {
        return Ok(0);
    }
    if !options.shutdown {
        // Become CMD: its signals, its exit code, no process in between.
        let e = std::process::Command::new(&options.command[0])
            .args(&options.command[1..])
            .exec();
        eprintln!("outrigger wait: cannot run {}: {e}", options.command[0]);
        return Ok(if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        });
    }
    rt.block_on(run_then_shutdown(&options))
}

async fn wait_ready(admin: &Address, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(
            POLL_TIMEOUT,
            super::probe::request(admin, http::Method::GET, "/ready/outbound"),
        )
        .await;
        let last = match attempt {
            Ok(Ok(200)) => return Ok(()),
            Ok(Ok(status)) => format!("/ready/outbound answered {status}"),
            Ok(Err(e)) => e,
            Err(_) => "no answer within 1s".into(),
        };
        if Instant::now() + POLL > deadline {
            return Err(last);
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn run_then_shutdown(options: &WaitOptions) -> anyhow::Result<i32> {
    // Handlers first: a signal between the spawn and their setup would kill us, not CMD.
    let kinds = [
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::user_defined1(), Signal::SIGUSR1),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
        (SignalKind::quit(), Signal::SIGQUIT),
    ];
    let mut streams = Vec::new();
    for (kind, sig) in kinds {
        streams.push((signal(kind)?, sig));
    }
    // Its own process group: a terminal's Ctrl-C reaches only us, and we pass it on once.
    let mut child = match tokio::process::Command::new(&options.command[0])
        .args(&options.command[1..])
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outrigger wait: cannot run {}: {e}", options.command[0]);
            ask_shutdown(&options.admin).await;
            return Ok(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    if let Some(pid) = child.id() {
        let pid = Pid::from_raw(pid as i32);
        for (mut stream, sig) in streams {
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    let _ = kill(pid, sig);
                }
            });
        }
    }
    let status = child.wait().await?;
    ask_shutdown(&options.admin).await;
    Ok(exit_code(status))
}

/// Asks the sidecar to stop (gracefully); a few tries, then gives up with a message.
async fn ask_shutdown(admin: &Address) {
    let mut last = String::new();
    for _ in 0..5 {
        match tokio::time::timeout(
            POLL_TIMEOUT,
            super::probe::request(admin, http::Method::POST, "/shutdown"),
        )
        .await
        {
            Ok(Ok(s)) if (200..300).contains(&s) => return,
            Ok(Ok(s)) => last = format!("/shutdown answered {s}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer within 1s".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("outrigger wait: could not ask the sidecar at {admin} to stop: {last}");
}

/// `outrigger install --to DIR`: copies this binary to `DIR/outrigger` (mode 0755), so an app
/// container without Outrigger in its image can run `outrigger wait` from a shared volume (the
/// legacy Kubernetes pattern; the image has no shell or `cp` to do it). Written to a temporary
/// name first and renamed, so a reader never sees half a binary.
pub fn install(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("find this binary")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let target = dir.join("outrigger");
    let tmp = dir.join(".outrigger.tmp");
    std::fs::copy(&me, &tmp)
        .with_context(|| format!("copy {} to {}", me.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("rename to {}", target.display()))?;
    Ok(target)
}
