//! Hot restart: a new Outrigger process takes over the listening sockets — and the supervised
//! app — of the running one, so a new binary or a new config that cannot apply live is rolled
//! out with no refused connection.
//!
//! ```text
//!  new (outrigger run --upgrade)                 old (serving)
//!   1. connect to the upgrade socket  ───────▶  checks the peer's uid
//!      Hello{pid, version}
//!   2.                               ◀───────  Sockets{generation, names} + every listening fd
//!      (SCM_RIGHTS); binds nothing that was handed over, binds what is new
//!   3. builds and starts every module, admin, probes…; until every module is ready the old
//!      process keeps serving alone (a new process that fails here just goes away: the old one
//!      notices the closed socket and carries on)
//!      Started{pid}                  ───────▶  hands out the app (still supervising it)
//!   4.                               ◀───────  App{pid, ready} + its pidfd (+ stdio pipes)
//!      Adopted{pid}                  ───────▶  (no ack, a closed socket, an error: it keeps
//!                                               the app and carries on serving)
//!   5. supervises the app                       stops accepting, drains in-flight requests and
//!                                               streams within the grace period, flushes, exits
//! ```
//!
//! Both processes accept on the same sockets while they overlap (the kernel's accept queue is
//! the socket's, not the process's), so nothing queued is lost — unlike binding a second
//! socket with `SO_REUSEPORT`, where connections queued on the old socket are reset when it
//! closes.
//!
//! The socket is a unix stream socket (mode 0600, peers with another uid refused); each frame
//! is a 4-byte big-endian length and a JSON message, and descriptors ride on a frame's first
//! bytes. Written by hand: no crate does this hand-off, and the protocol is five messages.

pub mod sys;

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, getsockname, getsockopt,
    recvmsg, sendmsg, sockopt,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::Address;

/// Bumped when a message changes incompatibly; a process refuses a peer of another version.
pub const PROTOCOL: u32 = 1;
/// The largest frame either side sends or accepts.
const MAX_FRAME: usize = 1 << 20;
/// The most descriptors one frame carries.
const MAX_FDS: usize = 250;

/// One listening socket handed over.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Socket {
    /// `admin`, `bridge`, `bridge_grpc` or `listener:NAME`, when the old process knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub address: Address,
}

/// The supervised app, as the old process hands it over.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppHandover {
    pub pid: i32,
    pub program: String,
    /// Its probe's last verdict, so the new process opens its gate at once.
    pub ready: bool,
    /// Its stdout and stderr are pipes that follow the pidfd in the message (log capture).
    #[serde(default)]
    pub captured: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        protocol: u32,
        pid: u32,
        version: String,
    },
    Sockets {
        generation: u64,
        pid: u32,
        sockets: Vec<Socket>,
        /// The app passed its probe in the old process: the new one opens its gate at once.
        #[serde(default)]
        app_ready: bool,
    },
    Refused {
        reason: String,
    },
    Started {
        pid: u32,
    },
    App {
        app: Option<AppHandover>,
    },
    /// The successor has the app (and its descriptors): the old process may drain.
    Adopted {
        pid: u32,
    },
}

/// Sends one frame, with `fds` riding on it.
fn send(stream: &UnixStream, message: &Message, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&frame)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    // The rest, if the socket buffer took only part (the descriptors went with the first part).
    (&*stream).write_all(&frame[sent..])
}

/// Receives one frame and the descriptors that rode on it. `Ok(None)`: the peer closed.
fn recv(stream: &UnixStream) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut head = [0u8; 4];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut head)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(sys::received(raw));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("too many descriptors in one message"));
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    (&*stream).read_exact(&mut head[n..])?;
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a {len}-byte message is too large"
        )));
    }
    let mut body = vec![0u8; len];
    (&*stream).read_exact(&mut body)?;
    let message = serde_json::from_slice(&body)
        .map_err(|e| io::Error::other(format!("not an upgrade message: {e}")))?;
    Ok(Some((message, fds)))
}

// ---------------------------------------------------------------------------------------------
// The new process: inherited sockets.

/// Sockets handed over by the old process and not yet taken by a bind. Process-wide, as
/// systemd's `LISTEN_FDS` are: every module binds through [`take`], and whatever no module
/// took is closed once start-up is done ([`close_untaken`]).
static INHERITED: Mutex<Vec<(Address, OwnedFd)>> = Mutex::new(Vec::new());

/// The listening socket handed over for `address`, if any (taken: a second bind of the same
/// address gets none).
fn take(address: &Address) -> Option<OwnedFd> {
    let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    let i = inherited.iter().position(|(a, _)| a == address)?;
    let (_, fd) = inherited.swap_remove(i);
    debug!(%address, "using the listening socket handed over by the old process");
    Some(fd)
}

/// The TCP listening socket handed over for `address`, ready for tokio.
pub fn take_tcp(address: SocketAddr) -> io::Result<Option<tokio::net::TcpListener>> {
    let Some(fd) = take(&Address::Tcp(address)) else {
        return Ok(None);
    };
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l).map(Some)
}

/// The unix listening socket handed over for `path`, ready for tokio.
pub fn take_unix(path: &Path) -> io::Result<Option<tokio::net::UnixListener>> {
    let Some(fd) = take(&Address::Unix(path.to_path_buf())) else {
        return Ok(None);
    };
    let l = UnixListener::from(fd);
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l).map(Some)
}

/// Closes the sockets the new config has no listener for (the old process stops accepting on
/// them when it drains; then they are gone).
pub fn close_untaken() {
    let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    for (address, _) in inherited.drain(..) {
        info!(%address, "not listening on a socket the old process had: the new config has no listener there");
    }
}

/// The new process's side of an upgrade, from the first message to the app's hand-over.
pub struct Successor {
    stream: UnixStream,
    /// The old process's pid and generation.
    pub parent_pid: u32,
    pub generation: u64,
    /// What was handed over, by name, to give port-0 addresses the old port.
    sockets: Vec<Socket>,
    /// The app was ready in the old process.
    pub app_ready: bool,
}

impl Successor {
    /// Connects to the running process at `path` and receives its listening sockets.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Successor> {
        use anyhow::Context;
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot reach a running Outrigger at {} (is one running with this runtime.upgrade_socket?)",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        // Whoever holds the socket hands us listening sockets and an app: it must be an
        // Outrigger of our own user (or root), not another user's socket at a guessable path.
        let cred = getsockopt(&stream, sockopt::PeerCredentials)?;
        let uid = nix::unistd::geteuid().as_raw();
        if cred.uid() != uid && cred.uid() != 0 {
            anyhow::bail!(
                "{} is served by uid {} (pid {}), not by an Outrigger of ours (uid {uid})",
                path.display(),
                cred.uid(),
                cred.pid()
            );
        }
        send(
            &stream,
            &Message::Hello {
                protocol: PROTOCOL,
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            &[],
        )?;
        match recv(&stream).context("no answer from the running Outrigger")? {
            Some((
                Message::Sockets {
                    generation,
                    pid,
                    sockets,
                    app_ready,
                },
                fds,
            )) => {
                if fds.len() != sockets.len() {
                    anyhow::bail!(
                        "the running Outrigger sent {} sockets and {} descriptors",
                        sockets.len(),
                        fds.len()
                    );
                }
                let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
                for (s, fd) in sockets.iter().zip(fds) {
                    inherited.push((s.address.clone(), fd));
                }
                info!(
                    parent_pid = pid,
                    sockets = sockets.len(),
                    "received the listening sockets of the running Outrigger"
                );
                Ok(Successor {
                    stream,
                    parent_pid: pid,
                    generation: generation + 1,
                    sockets,
                    app_ready,
                })
            }
            Some((Message::Refused { reason }, _)) => {
                anyhow::bail!("the running Outrigger refused the upgrade: {reason}")
            }
            Some((other, _)) => {
                anyhow::bail!("unexpected answer from the running Outrigger: {other:?}")
            }
            None => anyhow::bail!("the running Outrigger closed the upgrade socket"),
        }
    }

    /// The address the old process had for `name`, to use instead of a port-0 address (which
    /// would otherwise bind a fresh port and strand the clients of the old one).
    pub fn pinned(&self, name: &str, configured: &Address) -> Option<Address> {
        let Address::Tcp(c) = configured else {
            return None;
        };
        if c.port() != 0 {
            return None;
        }
        self.sockets
            .iter()
            .find_map(|s| match (&s.name, &s.address) {
                (Some(n), Address::Tcp(a)) if n == name && a.ip() == c.ip() => {
                    Some(s.address.clone())
                }
                _ => None,
            })
    }

    /// Tells the old process that every module is up; it answers with the app (if it runs
    /// one) and starts draining.
    pub fn started(self) -> anyhow::Result<Option<(AppHandover, Vec<OwnedFd>)>> {
        send(
            &self.stream,
            &Message::Started {
                pid: std::process::id(),
            },
            &[],
        )?;
        let app = match recv(&self.stream)? {
            Some((Message::App { app: Some(app) }, fds)) => {
                let want = if app.captured { 3 } else { 1 };
                if fds.len() != want {
                    anyhow::bail!(
                        "the app was handed over with {} descriptors, not {want}",
                        fds.len()
                    );
                }
                Some((app, fds))
            }
            Some((Message::App { app: None }, _)) => None,
            Some((Message::Refused { reason }, _)) => {
                anyhow::bail!("the old process refused the hand-over: {reason}")
            }
            Some((other, _)) => anyhow::bail!("unexpected answer from the old process: {other:?}"),
            None => anyhow::bail!("the old process closed the upgrade socket before handing over"),
        };
        // From here the app is ours: the old process drains once it reads this (until then,
        // a failure of ours gives the app back to it).
        send(
            &self.stream,
            &Message::Adopted {
                pid: std::process::id(),
            },
            &[],
        )?;
        Ok(app)
    }
}

// ---------------------------------------------------------------------------------------------
// The old process: the upgrade socket.

/// What the main loop is asked when a successor has started: release the app and reply with it
/// (and the descriptors to send), then drain.
pub struct Handover {
    pub successor_pid: u32,
    pub reply: oneshot::Sender<Result<Option<ReleasedApp>, String>>,
    /// `Ok`: the successor has the app; drain. `Err`: it failed after the release; the app
    /// comes back (to supervise again) and this process carries on.
    pub outcome: oneshot::Receiver<Result<(), Option<ReleasedApp>>>,
}

/// An app on its way to a successor: its description and descriptors (pidfd, stdio pipes).
pub type ReleasedApp = (AppHandover, Vec<OwnedFd>);

/// Serves the upgrade socket until the process ends.
pub struct UpgradeServer {
    path: PathBuf,
}

impl UpgradeServer {
    /// Binds `path` (mode 0600; a stale socket file replaced, never a regular file) and serves
    /// successors on a thread of its own: the conversation is four blocking messages, and a
    /// successor may take a while to start. `took_over`: this process has just taken over
    /// from the one that served `path`, which no longer accepts there.
    pub fn start(
        path: &Path,
        names: BTreeMap<String, String>,
        generation: u64,
        timeout: Duration,
        handover: mpsc::Sender<Handover>,
        took_over: bool,
        app_ready: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<UpgradeServer> {
        use anyhow::Context;
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            anyhow::ensure!(
                meta.file_type().is_socket(),
                "runtime.upgrade_socket: {} exists and is not a socket",
                path.display()
            );
            // A live process answering there is another Outrigger: do not steal its socket.
            if !took_over && UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "runtime.upgrade_socket: another process serves {}; to take over from it, run with --upgrade",
                    path.display()
                );
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot bind the upgrade socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let own = listener.as_raw_fd();
        let busy = std::sync::Arc::new(AtomicBool::new(false));
        std::thread::Builder::new()
            .name("outrigger-upgrade".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let ctx = Conversation {
                        app_ready: &app_ready,
                        names: &names,
                        generation,
                        timeout,
                        handover: &handover,
                        own,
                    };
                    if busy.swap(true, Ordering::AcqRel) {
                        let _ = send(
                            &conn,
                            &Message::Refused {
                                reason: "an upgrade is already in progress".into(),
                            },
                            &[],
                        );
                        continue;
                    }
                    let done = ctx.run(conn);
                    if done {
                        // Handed over: this process is draining; nobody else may take over.
                        return;
                    }
                    busy.store(false, Ordering::Release);
                }
            })?;
        info!(path = %path.display(), "upgrade socket listening");
        Ok(UpgradeServer {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

struct Conversation<'a> {
    /// The app's readiness now (its probe), for the successor's gate.
    app_ready: &'a tokio::sync::watch::Receiver<bool>,
    names: &'a BTreeMap<String, String>,
    generation: u64,
    timeout: Duration,
    handover: &'a mpsc::Sender<Handover>,
    /// The upgrade socket's own descriptor (not handed over).
    own: RawFd,
}

impl Conversation<'_> {
    /// One successor, start to end. Returns true once the process has handed over.
    fn run(&self, conn: UnixStream) -> bool {
        match self.converse(&conn) {
            Ok(handed_over) => handed_over,
            Err(e) => {
                warn!(error = %e, "upgrade failed; still serving");
                false
            }
        }
    }

    fn converse(&self, conn: &UnixStream) -> io::Result<bool> {
        let cred = getsockopt(conn, sockopt::PeerCredentials).map_err(io::Error::from)?;
        let uid = nix::unistd::geteuid().as_raw();
        if cred.uid() != uid && cred.uid() != 0 {
            let _ = send(
                conn,
                &Message::Refused {
                    reason: format!(
                        "uid {} may not take over a process of uid {uid}",
                        cred.uid()
                    ),
                },
                &[],
            );
            return Err(io::Error::other(format!(
                "refused a successor of uid {} (pid {})",
                cred.uid(),
                cred.pid()
            )));
        }
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(self.timeout))?;
        let Some((
            Message::Hello {
                protocol,
                pid,
                version,
            },
            _,
        )) = recv(conn)?
        else {
            return Err(io::Error::other("the successor did not say hello"));
        };
        if protocol != PROTOCOL {
            let reason = format!(
                "upgrade protocol {protocol} (version {version}) cannot take over from protocol {PROTOCOL} (version {})",
                env!("CARGO_PKG_VERSION")
            );
            let _ = send(
                conn,
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(io::Error::other(reason));
        }
        info!(successor_pid = pid, successor_version = %version, "a new process is taking over; handing it the listening sockets");
        let found = listening_sockets(self.own);
        let sockets: Vec<Socket> = found
            .iter()
            .map(|(address, _)| Socket {
                name: self.names.get(&address.to_string()).cloned(),
                address: address.clone(),
            })
            .collect();
        let fds: Vec<RawFd> = found.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send(
            conn,
            &Message::Sockets {
                generation: self.generation,
                pid: std::process::id(),
                sockets,
                app_ready: *self.app_ready.borrow(),
            },
            &fds,
        )?;
        drop(found);
        // Its whole start-up: config, TLS, discovery, components.
        conn.set_read_timeout(Some(self.timeout))?;
        match recv(conn) {
            Ok(Some((Message::Started { .. }, _))) => {}
            Ok(Some((other, _))) => {
                return Err(io::Error::other(format!("unexpected message {other:?}")));
            }
            Ok(None) => {
                return Err(io::Error::other(format!(
                    "the new process (pid {pid}) went away before it was ready (see its own output for why)"
                )));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::other(format!(
                    "the new process (pid {pid}) was not ready within runtime.upgrade_timeout ({:?})",
                    self.timeout
                )));
            }
            Err(e) => return Err(e),
        }
        let (reply, app) = oneshot::channel();
        let (outcome_tx, outcome) = oneshot::channel();
        if self
            .handover
            .blocking_send(Handover {
                successor_pid: pid,
                reply,
                outcome,
            })
            .is_err()
        {
            return Err(io::Error::other("this process is already stopping"));
        }
        let released = match app.blocking_recv() {
            Ok(Ok(released)) => released,
            Ok(Err(reason)) => {
                let _ = send(
                    conn,
                    &Message::Refused {
                        reason: reason.clone(),
                    },
                    &[],
                );
                return Err(io::Error::other(reason));
            }
            Err(_) => return Err(io::Error::other("this process is stopping")),
        };
        let raw: Vec<RawFd> = released
            .iter()
            .flat_map(|(_, fds)| fds.iter().map(|f| f.as_raw_fd()))
            .collect();
        let sent = send(
            conn,
            &Message::App {
                app: released.as_ref().map(|(a, _)| a.clone()),
            },
            &raw,
        );
        // Only its acknowledgement lets this process drain: a successor that died meanwhile
        // would leave nobody serving, and the app (its pipes unread) to die of SIGPIPE.
        let acked = sent
            .and_then(|()| conn.set_read_timeout(Some(Duration::from_secs(10))))
            .and_then(|()| recv(conn));
        match acked {
            Ok(Some((Message::Adopted { .. }, _))) => {
                let _ = outcome_tx.send(Ok(()));
                info!(
                    successor_pid = pid,
                    "handed over to the new process; draining"
                );
                Ok(true)
            }
            other => {
                let _ = outcome_tx.send(Err(released));
                let why = match other {
                    Ok(None) => "it went away".to_string(),
                    Ok(Some((m, _))) => format!("it answered {m:?}"),
                    Err(e) => e.to_string(),
                };
                Err(io::Error::other(format!(
                    "the new process (pid {pid}) did not take the app over ({why}); keeping it"
                )))
            }
        }
    }
}

/// Every listening stream socket (TCP or unix) this process holds, as duplicates, with its
/// address: found by descriptor number in `/proc/self/fd`, so that whatever the modules
/// bound — and a live reload kept — is handed over, with no registry to keep in step.
fn listening_sockets(except: RawFd) -> Vec<(Address, OwnedFd)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in dir.flatten() {
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if n == except || n <= 2 {
            continue;
        }
        let Ok(fd) = sys::dup_raw(n) else { continue };
        if !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
            || getsockopt(&fd, sockopt::SockType).ok() != Some(nix::sys::socket::SockType::Stream)
        {
            continue;
        }
        let Ok(addr) = getsockname::<SockaddrStorage>(fd.as_fd().as_raw_fd()) else {
            continue;
        };
        let address = if let Some(v4) = addr.as_sockaddr_in() {
            Address::Tcp(SocketAddr::V4((*v4).into()))
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            Address::Tcp(SocketAddr::V6((*v6).into()))
        } else if let Some(path) = addr.as_unix_addr().and_then(|u| u.path()) {
            Address::Unix(path.to_path_buf())
        } else {
            continue;
        };
        // The same socket twice (a duplicate descriptor) is handed over once.
        if seen.insert(address.to_string()) {
            found.push((address, fd));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Starting a successor from the running process (SIGUSR2, `POST /upgrade`).

/// How this process was started, to start its successor the same way.
pub struct Invocation {
    /// The binary's path at start-up (a binary replaced in place since is the new one).
    pub exe: PathBuf,
    /// The arguments after the program name.
    pub args: Vec<std::ffi::OsString>,
}

impl Invocation {
    pub fn current() -> Option<Invocation> {
        // The path we were started by (a symlink to a versioned install stays a symlink, so the
        // new version behind it is what starts), else the resolved one.
        let exe = std::env::args_os()
            .next()
            .map(PathBuf::from)
            .filter(|p| p.components().count() > 1)
            .and_then(|p| std::env::current_dir().ok().map(|d| d.join(p)))
            .or_else(|| std::env::current_exe().ok())?;
        Some(Invocation {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }

    /// Starts `exe run … --upgrade --upgrade-socket PATH` with our own arguments (and stdio).
    pub fn spawn_successor(&self, socket: &Path) -> io::Result<tokio::process::Child> {
        tokio::process::Command::new(&self.exe)
            .args(successor_args(&self.args, socket))
            .spawn()
    }
}

/// Our arguments plus `--upgrade --upgrade-socket PATH`, placed before `--` (the app's
/// command, which is not ours to change); a flag already given is not repeated.
fn successor_args(args: &[std::ffi::OsString], socket: &Path) -> Vec<std::ffi::OsString> {
    let mut args = args.to_vec();
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let ours = &args[..at];
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    if !ours.iter().any(|a| a == "--upgrade") {
        extra.push("--upgrade".into());
    }
    if !ours
        .iter()
        .any(|a| a == "--upgrade-socket" || a.to_string_lossy().starts_with("--upgrade-socket="))
    {
        extra.push("--upgrade-socket".into());
        extra.push(socket.as_os_str().to_owned());
    }
    args.splice(at..at, extra);
    args
}

/// `GET /server_info`: which process this is.
#[derive(Clone, Debug, Serialize)]
pub struct ServerInfo {
    pub version: &'static str,
    pub pid: u32,
    /// 0 for a cold start, one more at each hot restart.
    pub generation: u64,
    /// The process this one took over from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_pid: Option<u32>,
    /// RFC 3339, and seconds since the Unix epoch.
    pub start_time: String,
    pub start_time_unix: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_socket: Option<PathBuf>,
}

impl ServerInfo {
    pub fn new(generation: u64, parent_pid: Option<u32>, upgrade_socket: Option<PathBuf>) -> Self {
        let now = SystemTime::now();
        ServerInfo {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            generation,
            parent_pid,
            start_time: humantime::format_rfc3339_seconds(now).to_string(),
            start_time_unix: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            upgrade_socket,
        }
    }
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) that this process is ready and is the
/// service's main process — after a hot restart, the new pid, so systemd follows it instead of
/// stopping the service when the old one exits. Does nothing outside systemd (no
/// `NOTIFY_SOCKET`). Written by hand: the protocol is one datagram of `KEY=VALUE` lines.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => {
                std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?
            }
            None => std::os::unix::net::SocketAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

/// Where the upgrade socket is: `runtime.upgrade_socket`, or beside the admin address
/// (`$XDG_RUNTIME_DIR` or `/tmp`, `outrigger-<admin port>.upgrade`) when the admin port is
/// fixed. None: no upgrade socket (`off`, or an admin port of 0 with no path given).
pub fn socket_path(
    configured: Option<&crate::config::UpgradeSocket>,
    admin: SocketAddr,
) -> Option<PathBuf> {
    use crate::config::UpgradeSocket;
    match configured {
        Some(UpgradeSocket::Off) => None,
        Some(UpgradeSocket::Path(p)) => Some(p.clone()),
        None if admin.port() == 0 => None,
        None => {
            let dir = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|d| d.is_dir())
                .unwrap_or_else(|| PathBuf::from("/tmp"));
            Some(dir.join(format!("outrigger-{}.upgrade", admin.port())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_messages_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        send(
            &a,
            &Message::Sockets {
                generation: 3,
                pid: 7,
                sockets: vec![Socket {
                    name: Some("admin".into()),
                    address: Address::Tcp(addr),
                }],
                app_ready: true,
            },
            &[listener.as_raw_fd()],
        )
        .unwrap();
        let (m, fds) = recv(&b).unwrap().unwrap();
        let Message::Sockets {
            generation,
            sockets,
            ..
        } = m
        else {
            panic!("{m:?}")
        };
        assert_eq!(generation, 3);
        assert_eq!(sockets[0].address, Address::Tcp(addr));
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same socket: a connection to it is accepted there.
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        drop(listener);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        received.accept().unwrap();
        drop(a);
        assert!(recv(&b).unwrap().is_none(), "EOF is None");
    }

    #[test]
    fn listening_sockets_are_found_by_descriptor() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Address::Tcp(l.local_addr().unwrap());
        // A connected socket is not listening.
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let found = listening_sockets(-1);
        assert!(found.iter().any(|(a, _)| *a == addr), "{found:?}");
        assert!(
            found
                .iter()
                .all(|(a, _)| *a != Address::Tcp(_c.local_addr().unwrap()))
        );
    }

    #[test]
    fn successor_arguments_go_before_the_app_command() {
        let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            successor_args(
                &os(&["run", "-c", "x.yaml", "--", "app", "--upgrade"]),
                Path::new("/s")
            ),
            os(&[
                "run",
                "-c",
                "x.yaml",
                "--upgrade",
                "--upgrade-socket",
                "/s",
                "--",
                "app",
                "--upgrade"
            ])
        );
        // A successor's successor: nothing added twice.
        assert_eq!(
            successor_args(
                &os(&["run", "--upgrade", "--upgrade-socket=/t"]),
                Path::new("/s")
            ),
            os(&["run", "--upgrade", "--upgrade-socket=/t"])
        );
    }
}
