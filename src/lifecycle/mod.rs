//! The app's lifecycle: the supervised process (`outrigger run -- CMD` or `app.command`), its
//! probes, restart policy and signals, and `outrigger wait` for apps that run in another
//! container.
//!
//! The app is spawned after every listener is bound and every module started, in its own
//! process group, with stdio passed through and `OUTRIGGER_*` variables telling it where the
//! sidecar is. [`supervise`] owns it from then on: it restarts it per `app.restart` with capped
//! backoff, passes on signals and restart requests ([`AppHandle`]), and on a stop sends
//! `app.stop_signal`, waits, then SIGKILLs the group. Its task ends with the app's last exit.

pub mod capture;
pub mod env;
pub mod probe;
pub mod reaper;
pub mod wait;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::lifecycle::AppLifecycle;
use crate::config::lifecycle::RestartPolicy;
use crate::runtime::State;
use probe::AppStatus;

/// A running app process (and its process group).
pub struct App {
    process: Process,
    pgid: Pid,
    program: String,
    /// The tasks copying its captured stdout/stderr, and duplicates of those pipes' read ends
    /// (to hand them over on a hot restart).
    stdio: Vec<(tokio::task::JoinHandle<()>, OwnedFd)>,
    /// Handed over to a new Outrigger (hot restart): dropping it must not kill it.
    released: bool,
}

/// Our own child, or an app adopted from the Outrigger we took over from (hot restart): not
/// our child, so watched through a pidfd instead of `waitpid`.
enum Process {
    Own(Child),
    Adopted(tokio::io::unix::AsyncFd<OwnedFd>),
}

/// An app handed over by the Outrigger this one took over from (see `runtime::upgrade`).
pub struct Adopted {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub program: String,
    /// Its probe passed in the old process: open the gate at once.
    pub ready: bool,
    /// The read ends of its stdout and stderr pipes, when the old process captured them.
    pub stdio: Option<(OwnedFd, OwnedFd)>,
}

/// What a released app becomes in the hand-over message: its description and descriptors
/// (its pidfd, then its stdout and stderr pipes when captured).
pub type Released = (crate::runtime::upgrade::AppHandover, Vec<OwnedFd>);

impl App {
    /// Starts `command`. `env` is added to the inherited environment, then `app_env`
    /// (`app.env`). With `capture`, its stdout and stderr are pipes read by two tasks that echo
    /// every line to ours and queue it for the log agent; without, they are ours.
    pub fn spawn(
        command: &[String],
        app_env: &BTreeMap<String, String>,
        env: &[(String, String)],
        capture: Option<&capture::Capture>,
    ) -> io::Result<App> {
        let mut cmd = Command::new(&command[0]);
        cmd.args(&command[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .envs(app_env)
            // Its own group, so that a stop reaches the app's children too and a terminal's
            // Ctrl-C reaches only the sidecar, which then stops the app in order.
            .process_group(0);
        if capture.is_some() {
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
        }
        let mut ours = reaper::spawning();
        let mut child = cmd.spawn()?;
        let mut stdio = Vec::new();
        if let Some(c) = capture {
            use capture::Stream;
            if let Some(out) = child.stdout.take() {
                let dup = out.as_fd().try_clone_to_owned()?;
                let task = tokio::spawn(c.clone().pump(Stream::Stdout, out, tokio::io::stdout()));
                stdio.push((task, dup));
            }
            if let Some(err) = child.stderr.take() {
                let dup = err.as_fd().try_clone_to_owned()?;
                let task = tokio::spawn(c.clone().pump(Stream::Stderr, err, tokio::io::stderr()));
                stdio.push((task, dup));
            }
        }
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the app exited at once"))?;
        ours.insert(pid as i32);
        drop(ours);
        Ok(App {
            process: Process::Own(child),
            pgid: Pid::from_raw(pid as i32),
            program: command[0].clone(),
            stdio,
            released: false,
        })
    }

    /// Takes over an app another Outrigger started. Its captured stdout/stderr are read again
    /// here (into `capture`, or just echoed when this config captures nothing): a pipe nobody
    /// reads would block the app, and one nobody holds would kill it with SIGPIPE.
    pub fn adopt(adopted: Adopted, capture: Option<&capture::Capture>) -> io::Result<App> {
        use capture::Stream;
        let mut stdio = Vec::new();
        if let Some((out, err)) = adopted.stdio {
            for (stream, fd) in [(Stream::Stdout, out), (Stream::Stderr, err)] {
                let dup = fd.try_clone()?;
                let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
                let task = match (capture, stream) {
                    (Some(c), Stream::Stdout) => {
                        tokio::spawn(c.clone().pump(stream, pipe, tokio::io::stdout()))
                    }
                    (Some(c), Stream::Stderr) => {
                        tokio::spawn(c.clone().pump(stream, pipe, tokio::io::stderr()))
                    }
                    (None, Stream::Stdout) => tokio::spawn(echo(pipe, tokio::io::stdout())),
                    (None, Stream::Stderr) => tokio::spawn(echo(pipe, tokio::io::stderr())),
                };
                stdio.push((task, dup));
            }
        }
        Ok(App {
            process: Process::Adopted(crate::runtime::upgrade::sys::async_pidfd(adopted.pidfd)?),
            pgid: Pid::from_raw(adopted.pid),
            program: adopted.program,
            stdio,
            released: false,
        })
    }

    /// What to hand a new Outrigger (hot restart): a pidfd and duplicates of the pipes we
    /// read. Nothing changes here until [`App::release_for_good`]: the successor may still
    /// fail, and then the app stays ours.
    fn handover(&self, ready: bool) -> io::Result<Released> {
        let pidfd = match &self.process {
            // Still our unreaped child: its pid cannot have been reused.
            Process::Own(_) => crate::runtime::upgrade::sys::pidfd_open(self.pgid.as_raw())?,
            Process::Adopted(fd) => fd.get_ref().try_clone()?,
        };
        let mut fds = vec![pidfd];
        if self.stdio.len() == 2 {
            for (_, fd) in &self.stdio {
                fds.push(fd.try_clone()?);
            }
        }
        Ok((
            crate::runtime::upgrade::AppHandover {
                pid: self.pgid.as_raw(),
                program: self.program.clone(),
                ready,
                captured: fds.len() == 3,
            },
            fds,
        ))
    }

    /// The successor has the app: stop reading its pipes (it reads them now) and never kill it.
    fn release_for_good(&mut self) {
        for (task, _) in std::mem::take(&mut self.stdio) {
            task.abort();
        }
        self.released = true;
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
        let status = self.wait_process().await;
        // Not for an adopted app: it was reaped by another parent, maybe long enough ago that
        // its pid (and so its group id) belongs to someone else now.
        if matches!(self.process, Process::Own(_)) {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
        self.drain_stdio().await;
        status
    }

    /// After the app's exit: lets the capture tasks read its pipes to their end and echo the
    /// last lines to our stdout/stderr, [`STDIO_DRAIN`] at most (a process that left the group
    /// may keep a pipe open). Without it, a sidecar that stops with its app could exit before
    /// the app's last lines (its crash message, say) were echoed (seen under load: the echo
    /// task had not run yet). Cancel-safe: a finished task is not polled again.
    async fn drain_stdio(&mut self) {
        let deadline = tokio::time::Instant::now() + STDIO_DRAIN;
        for (task, _) in &mut self.stdio {
            if !task.is_finished() {
                let _ = tokio::time::timeout_at(deadline, &mut *task).await;
            }
        }
    }

    /// Waits for the main process to exit (cancel-safe).
    async fn wait_process(&mut self) -> io::Result<ExitStatus> {
        match &mut self.process {
            Process::Own(child) => child.wait().await,
            Process::Adopted(pidfd) => wait_adopted(pidfd, self.pgid.as_raw()).await,
        }
    }

    /// Sends `signal` to the app's main process (forwarded signals, reload actions): a
    /// prefork server's master handles SIGHUP and manages its workers, which may not.
    pub fn signal(&self, signal: Signal) {
        let sent = match &self.process {
            Process::Own(_) => nix::sys::signal::kill(self.pgid, signal).map_err(io::Error::from),
            // Not our child: once it is gone its pid may be someone else's.
            Process::Adopted(fd) => {
                crate::runtime::upgrade::sys::pidfd_send_signal(fd.get_ref(), signal as i32)
            }
        };
        if let Err(e) = sent {
            warn!(pid = self.pid(), %signal, error = %e, "cannot signal the app");
        }
    }

    /// Sends `signal` to the app's process group, ignoring a group that is already gone.
    fn signal_quietly(&self, signal: Signal) {
        // ESRCH: the group is already gone; waiting reaps the child.
        let _ = killpg(self.pgid, signal);
    }

    /// Waits for the app to exit until `deadline`; then SIGKILLs it. Cancel-safe.
    pub async fn wait_until(&mut self, deadline: Instant) -> io::Result<ExitStatus> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.wait_process()).await {
            Ok(status) => {
                let _ = killpg(self.pgid, Signal::SIGKILL);
                self.drain_stdio().await;
                status
            }
            Err(_) => {
                warn!(
                    pid = self.pid(),
                    "the app did not stop within the grace period; killing it"
                );
                let _ = killpg(self.pgid, Signal::SIGKILL);
                // Also the process itself, in case it left its group.
                match &mut self.process {
                    Process::Own(child) => {
                        let _ = child.start_kill();
                    }
                    Process::Adopted(fd) => {
                        let _ = crate::runtime::upgrade::sys::pidfd_send_signal(
                            fd.get_ref(),
                            libc::SIGKILL,
                        );
                    }
                }
                // SIGKILL ends anything but a process stuck in the kernel (D state).
                match tokio::time::timeout(Duration::from_secs(1), self.wait_process()).await {
                    Ok(s) => s,
                    Err(_) => Err(io::Error::other(
                        "the app did not exit even after SIGKILL (stuck in the kernel?)",
                    )),
                }
            }
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Process::Own(child) = &mut self.process {
            // An app that outlives its supervision is killed (tokio's `kill_on_drop`, which
            // could not be turned off for a hand-over); one that exited is not touched.
            if !self.released {
                let _ = child.start_kill();
            }
            reaper::forget(self.pid());
        }
    }
}

/// Copies an adopted app's pipe to ours when this config ships nothing from it.
async fn echo(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
) {
    let _ = tokio::io::copy(&mut pipe, &mut to).await;
}

/// Waits for an adopted app (not our child) to exit, through its pidfd; its status comes from
/// the kernel once whoever is its parent now has reaped it (PIDFD_INFO_EXIT, Linux ≥ 6.15).
/// Without that, the status is unknown and reported as exit code 1 (so `on-failure` restarts).
async fn wait_adopted(
    pidfd: &tokio::io::unix::AsyncFd<OwnedFd>,
    pid: i32,
) -> io::Result<ExitStatus> {
    use crate::runtime::upgrade::sys::{ExitInfo, pidfd_exit_info};
    use std::os::unix::process::ExitStatusExt;
    // Readable once the process has exited; it stays readable.
    let _ = pidfd.readable().await?;
    // Its new parent (init, or a subreaper) reaps it shortly after.
    for _ in 0..200 {
        match pidfd_exit_info(pidfd.get_ref()) {
            ExitInfo::Status(s) => return Ok(ExitStatus::from_raw(s)),
            ExitInfo::NotYet => tokio::time::sleep(Duration::from_millis(10)).await,
            ExitInfo::Unsupported => break,
        }
    }
    warn!(
        pid,
        "the adopted app exited; its exit status is unknown (this kernel cannot tell it to a process that is not its parent, or it was not reaped): taken as 1"
    );
    Ok(ExitStatus::from_raw(1 << 8))
}

/// The exit code a shell would report: the code, or 128 + the signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// What can be asked of the supervised app.
#[derive(Debug)]
enum AppCommand {
    Signal(Signal),
    /// Stop it gracefully and start it again.
    Restart,
    /// Stop it for good: `signal`, then SIGKILL at `deadline`. A second `Stop` tightens the
    /// first (a fast stop during a graceful one).
    Stop {
        signal: Signal,
        deadline: Instant,
    },
    /// A stop has begun: from now on the app is not restarted, whatever the policy.
    Draining,
    /// A new Outrigger takes over (hot restart): answer with what to hand over (None when it
    /// is not running; an error when it cannot be handed over), then wait for the verdict.
    Release(tokio::sync::oneshot::Sender<Result<Option<Released>, String>>),
    /// The verdict on a release: true, the successor has the app (supervision ends, the app
    /// runs on); false, it failed (supervision goes on as before).
    Released(bool),
}

/// Sends requests to the supervised app; cheap to clone.
#[derive(Clone)]
pub struct AppHandle(mpsc::UnboundedSender<AppCommand>);

impl AppHandle {
    /// Sends `signal` to the app's process group (if it runs).
    pub fn signal(&self, signal: Signal) {
        let _ = self.0.send(AppCommand::Signal(signal));
    }

    /// Restarts the app gracefully (`stop_signal`, `stop_timeout`, then start again).
    pub fn restart(&self) {
        let _ = self.0.send(AppCommand::Restart);
    }

    /// A stop has begun: no more restarts (by policy or reload action).
    pub fn draining(&self) {
        let _ = self.0.send(AppCommand::Draining);
    }

    /// Stops the app for good; the supervising task then ends with its status.
    pub fn stop(&self, signal: Signal, deadline: Instant) {
        let _ = self.0.send(AppCommand::Stop { signal, deadline });
    }

    /// Asks for what to hand a new Outrigger (hot restart); answer the verdict with
    /// [`AppHandle::released`]. `Ok(None)`: it is not running. `Err`: it cannot be handed
    /// over (refuse the successor).
    pub async fn release(&self) -> Result<Option<Released>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.0.send(AppCommand::Release(tx)).is_err() {
            return Ok(None);
        }
        rx.await.unwrap_or(Ok(None))
    }

    /// After [`AppHandle::release`]: whether the successor took the app (supervision ends
    /// with [`AppEnd::Released`]) or not (it goes on, as if nothing had happened).
    pub fn released(&self, taken: bool) {
        let _ = self.0.send(AppCommand::Released(taken));
    }
}

/// How the supervised app ended.
#[derive(Debug)]
pub enum AppEnd {
    /// It exited (on its own, for good, or because it was stopped).
    Exited(ExitStatus),
    /// It could not be started at all (the first time).
    NotStarted(io::Error),
    /// Handed over to a new Outrigger (hot restart); still running.
    Released,
}

impl AppEnd {
    /// The exit code Outrigger ends with: the app's own, or 127 (cannot be found) / 126 (found,
    /// cannot run) as a shell says for a command it cannot start.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppEnd::Exited(s) => exit_code(*s),
            AppEnd::NotStarted(e) if e.kind() == io::ErrorKind::NotFound => 127,
            AppEnd::NotStarted(_) => 126,
            AppEnd::Released => 0,
        }
    }
}

/// The supervised app: the handle to send it requests and the task that ends with it.
pub struct Supervised {
    pub handle: AppHandle,
    pub task: tokio::task::JoinHandle<AppEnd>,
}

impl Supervised {
    /// Resolves when the app has ended for good (cancel-safe).
    pub async fn ended(&mut self) -> AppEnd {
        (&mut self.task)
            .await
            .unwrap_or_else(|e| AppEnd::NotStarted(io::Error::other(e)))
    }
}

/// The stop sequence's step 2 reaches the app through this.
impl crate::runtime::stop::StoppingApp for Supervised {
    type End = AppEnd;

    fn stop(&self, signal: Signal, deadline: Instant) {
        self.handle.stop(signal, deadline);
    }

    async fn ended(&mut self) -> AppEnd {
        Supervised::ended(self).await
    }
}

/// What [`supervise`] needs.
pub struct AppSpec {
    pub command: Vec<String>,
    /// `app.env`.
    pub app_env: BTreeMap<String, String>,
    /// `OUTRIGGER_*` and the like.
    pub env: Vec<(String, String)>,
    pub lifecycle: AppLifecycle,
    /// Where the app's stdout/stderr lines go besides ours (`logs` with `app: stdio`).
    pub capture: Option<capture::Capture>,
    /// An app to take over instead of starting one (hot restart).
    pub adopt: Option<Adopted>,
}

/// The first restart waits this long; each failure doubles it up to [`RESTART_BACKOFF_MAX`].
/// How long an exited app's pipes are read and echoed at most before the exit is acted on
/// (`App::drain_stdio`).
const STDIO_DRAIN: Duration = Duration::from_secs(1);
pub const RESTART_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long was healthy: the backoff starts over.
pub const RESTART_STABLE_AFTER: Duration = Duration::from_secs(60);

/// Starts the app and supervises it in a task; the task ends with how the app ended for good.
pub fn supervise(spec: AppSpec, status: AppStatus) -> Supervised {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(supervise_loop(spec, status, rx));
    Supervised {
        handle: AppHandle(tx),
        task,
    }
}

/// The probe of one app run: aborted when the run ends.
struct ProbeTask(Option<tokio::task::JoinHandle<()>>);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

fn start_probe(spec: &AppSpec, status: &AppStatus) -> ProbeTask {
    match &spec.lifecycle.probe {
        Some(p) => ProbeTask(Some(tokio::spawn(probe::run(p.clone(), status.clone())))),
        None => {
            status.set_ready();
            ProbeTask(None)
        }
    }
}

async fn supervise_loop(
    spec: AppSpec,
    status: AppStatus,
    mut rx: mpsc::UnboundedReceiver<AppCommand>,
) -> AppEnd {
    let policy = spec.lifecycle.restart;
    let mut failures = 0u32;
    // Restarts in a row: a stable run starts the count over.
    let mut restarts = 0u32;
    let mut first = true;
    let mut last_exit = ExitStatus::default();
    // A stop has begun (inbound is draining): no more restarts of any kind.
    let mut draining = false;
    let mut adopt = spec.adopt;
    let spec = AppSpec {
        adopt: None,
        ..spec
    };
    loop {
        let started = match adopt.take() {
            Some(a) => {
                let (pid, ready) = (a.pid, a.ready);
                App::adopt(a, spec.capture.as_ref()).map(|app| {
                    info!(
                        pid,
                        program = app.program(),
                        "adopted the app from the previous Outrigger"
                    );
                    (app, ready)
                })
            }
            None => App::spawn(
                &spec.command,
                &spec.app_env,
                &spec.env,
                spec.capture.as_ref(),
            )
            .map(|app| {
                info!(pid = app.pid(), program = app.program(), "app started");
                (app, false)
            }),
        };
        let (mut app, adopted_ready) = match started {
            Ok(a) => a,
            Err(e) if first => {
                error!(program = %spec.command[0], error = %e, "cannot start the app");
                status.set_not_ready(State::Stopped, format!("cannot start: {e}"), true);
                return AppEnd::NotStarted(e);
            }
            Err(e) => {
                // It started before: treat like a failed run and try again later.
                error!(program = %spec.command[0], error = %e, "cannot start the app again");
                if spec
                    .lifecycle
                    .max_restarts
                    .is_some_and(|max| restarts >= max)
                {
                    status.set_not_ready(State::Stopped, format!("cannot start: {e}"), true);
                    return AppEnd::NotStarted(e);
                }
                restarts += 1;
                status.set_not_ready(State::Backoff, format!("cannot start: {e}"), true);
                let wait = restart_backoff(failures);
                failures += 1;
                if let Some(end) = wait_or_stop(&mut rx, wait, last_exit).await {
                    return end;
                }
                status.metrics.app_restarts.inc();
                continue;
            }
        };
        first = false;
        let started = Instant::now();
        if adopted_ready {
            // Its probe passed in the old process: the new one need not hold traffic until
            // its own first probe.
            status.set_ready();
        }
        let mut probe = Some(start_probe(&spec, &status));

        // Serve requests until the app exits.
        let exit = loop {
            tokio::select! {
                s = app.wait() => break s.map_err(Some),
                cmd = rx.recv() => match cmd {
                    Some(AppCommand::Signal(sig)) => {
                        info!(pid = app.pid(), signal = %sig, "signalling the app");
                        app.signal(sig);
                    }
                    Some(AppCommand::Draining) => draining = true,
                    Some(AppCommand::Release(reply)) => {
                        let ready = *status.ready.borrow();
                        match app.handover(ready) {
                            Ok(released) => {
                                info!(pid = app.pid(), "handing the app over to the new Outrigger");
                                let _ = reply.send(Ok(Some(released)));
                                if verdict(&mut rx, Some(&app)).await {
                                    probe.take();
                                    app.release_for_good();
                                    return AppEnd::Released;
                                }
                                info!(pid = app.pid(), "the new Outrigger did not take the app; it stays ours");
                            }
                            Err(e) => {
                                // It stays ours, and the successor is refused.
                                warn!(error = %e, "cannot hand the app over");
                                let _ = reply.send(Err(format!("cannot hand the app over: {e}")));
                            }
                        }
                    }
                    Some(AppCommand::Released(_)) => {}
                    Some(AppCommand::Restart) if draining => {
                        info!("restart not done: the sidecar is stopping");
                    }
                    Some(AppCommand::Restart) => {
                        info!(pid = app.pid(), "restarting the app");
                        // The old run's probe must not open the gate again meanwhile.
                        probe.take();
                        status.set_not_ready(State::Starting, "restarting".into(), true);
                        let deadline = Instant::now() + spec.lifecycle.stop_timeout.get();
                        let (s, for_good) =
                            stop_app(&mut app, spec.lifecycle.stop_signal.0, deadline, &mut rx).await;
                        if for_good {
                            return finish(s, &status);
                        }
                        if let Ok(s) = s {
                            last_exit = s;
                        }
                        break Err(None);
                    }
                    Some(AppCommand::Stop { signal, deadline }) => {
                        probe.take();
                        let (s, _) = stop_app(&mut app, signal, deadline, &mut rx).await;
                        return finish(s, &status);
                    }
                    // Nobody can ask anything any more: keep running until the app exits.
                    None => break app.wait().await.map_err(Some),
                },
            }
        };
        probe.take();
        let exit = match exit {
            Ok(exit) => exit,
            // A restart that was asked for: start again at once.
            Err(None) => {
                status.metrics.app_restarts.inc();
                continue;
            }
            Err(Some(e)) => {
                error!(error = %e, "cannot wait for the app");
                return AppEnd::NotStarted(e);
            }
        };
        last_exit = exit;
        let code = exit_code(exit);
        let restart = !draining
            && match policy {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => !exit.success(),
                RestartPolicy::Always => true,
            };
        if !restart {
            info!(code, "the app exited");
            status.set_not_ready(State::Stopped, format!("exited: {exit}"), true);
            return AppEnd::Exited(exit);
        }
        if started.elapsed() >= RESTART_STABLE_AFTER {
            failures = 0;
            restarts = 0;
        }
        if let Some(max) = spec.lifecycle.max_restarts
            && restarts >= max
        {
            error!(
                code,
                max_restarts = max,
                "the app exited and was restarted too often; giving up"
            );
            status.set_not_ready(
                State::Stopped,
                format!("exited: {exit}; max_restarts reached"),
                true,
            );
            return AppEnd::Exited(exit);
        }
        let wait = restart_backoff(failures);
        failures += 1;
        restarts += 1;
        warn!(code, restart_in = ?wait, restarts, "the app exited; restarting it");
        status.set_not_ready(State::Backoff, format!("exited: {exit}; restarting"), true);
        if let Some(end) = wait_or_stop(&mut rx, wait, exit).await {
            return end;
        }
        status.metrics.app_restarts.inc();
    }
}

fn finish(status: io::Result<ExitStatus>, app: &AppStatus) -> AppEnd {
    match status {
        Ok(s) => {
            info!(code = exit_code(s), "the app exited");
            app.set_not_ready(State::Stopped, format!("exited: {s}"), true);
            AppEnd::Exited(s)
        }
        Err(e) => {
            error!(error = %e, "cannot wait for the app");
            app.set_not_ready(State::Stopped, format!("cannot wait: {e}"), true);
            AppEnd::NotStarted(e)
        }
    }
}

/// Stops `app` (`signal`, SIGKILL at `deadline`); a `Stop` arriving meanwhile tightens the
/// deadline and makes the stop final. Returns the status and whether the stop is final.
async fn stop_app(
    app: &mut App,
    signal: Signal,
    deadline: Instant,
    rx: &mut mpsc::UnboundedReceiver<AppCommand>,
) -> (io::Result<ExitStatus>, bool) {
    let mut for_good = false;
    let mut deadline = deadline;
    info!(pid = app.pid(), %signal, "stopping the app");
    app.signal_quietly(signal);
    loop {
        tokio::select! {
            s = app.wait_until(deadline) => return (s, for_good),
            Some(cmd) = rx.recv() => match cmd {
                AppCommand::Stop { signal: sig, deadline: d } => {
                    for_good = true;
                    if sig != signal {
                        app.signal_quietly(sig);
                    }
                    deadline = deadline.min(d);
                }
                AppCommand::Signal(sig) => app.signal(sig),
                AppCommand::Release(reply) => {
                    let _ = reply.send(Err("the app is being stopped or restarted".into()));
                }
                AppCommand::Restart | AppCommand::Draining | AppCommand::Released(_) => {}
            },
        }
    }
}

/// Waits `delay` before a restart; a stop request meanwhile ends supervision with the app's
/// last exit (it is not running, so there is nothing to stop).
async fn wait_or_stop(
    rx: &mut mpsc::UnboundedReceiver<AppCommand>,
    delay: Duration,
    last: ExitStatus,
) -> Option<AppEnd> {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return None,
            cmd = rx.recv() => match cmd {
                Some(AppCommand::Stop { .. } | AppCommand::Draining) | None => {
                    info!("the sidecar is stopping; the app is not restarted");
                    return Some(AppEnd::Exited(last));
                }
                // Not running: nothing to signal; a restart request starts it now.
                Some(AppCommand::Signal(_)) => {}
                Some(AppCommand::Restart) => return None,
                // Not running: the new Outrigger starts it (or, if it fails, we do, now).
                Some(AppCommand::Release(reply)) => {
                    let _ = reply.send(Ok(None));
                    return verdict(rx, None).await.then_some(AppEnd::Released);
                }
                Some(AppCommand::Released(_)) => {}
            },
        }
    }
}

/// Waits for the verdict on a release (the main loop sends it within seconds); signals meant
/// for the app meanwhile still reach it.
async fn verdict(rx: &mut mpsc::UnboundedReceiver<AppCommand>, app: Option<&App>) -> bool {
    loop {
        match rx.recv().await {
            Some(AppCommand::Released(taken)) => return taken,
            Some(AppCommand::Signal(sig)) => {
                if let Some(app) = app {
                    app.signal(sig);
                }
            }
            Some(AppCommand::Release(reply)) => {
                let _ = reply.send(Err("a hand-over is already in progress".into()));
            }
            Some(_) => {}
            // Nobody left to decide: the process is ending; keep the app ours.
            None => return false,
        }
    }
}

/// The delay before restart number `failures` (0-based).
pub fn restart_backoff(failures: u32) -> Duration {
    RESTART_BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(RESTART_BACKOFF_MAX)
}
