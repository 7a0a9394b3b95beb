//! The few system calls that neither std nor nix wraps for us: pidfds (to adopt an app that is
//! not our child) and taking ownership of descriptors that arrived over `SCM_RIGHTS` or that
//! we found by number. The only `unsafe` in the library; each block says why it holds.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A pidfd for `pid` (Linux ≥ 5.3): signals and exit notices that cannot reach a recycled pid.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1; no memory is
    // shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `signal` to the process behind `pidfd` (never to a process that reused its pid).
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a valid descriptor we own, a signal number, a null siginfo (allowed: the kernel
    // fills in a default one) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct pidfd_info` as Linux 6.15 published it (PIDFD_INFO_SIZE_VER0: 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

/// `_IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// What the kernel knows of how the process behind `pidfd` ended.
pub enum ExitInfo {
    /// Its wait status (as `waitpid` gives it), once its parent reaped it.
    Status(i32),
    /// Not reaped yet (or still running).
    NotYet,
    /// The kernel cannot tell (before Linux 6.15): a non-child's status is lost.
    Unsupported,
}

/// Reads the exit status of a process that is not our child (PIDFD_INFO_EXIT, Linux ≥ 6.15).
pub fn pidfd_exit_info(pidfd: &OwnedFd) -> ExitInfo {
    const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: PIDFD_GET_INFO reads and writes exactly one `struct pidfd_info`, whose size is
    // encoded in the request number and matches ours (asserted above).
    let r = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO,
            &mut info as *mut PidfdInfo,
        )
    };
    if r < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ESRCH) => ExitInfo::NotYet,
            _ => ExitInfo::Unsupported,
        };
    }
    if info.mask & PIDFD_INFO_EXIT != 0 {
        ExitInfo::Status(info.exit_code)
    } else {
        ExitInfo::NotYet
    }
}

/// Takes ownership of descriptors that just arrived in an `SCM_RIGHTS` message.
pub fn received(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: the kernel installed these descriptors in our table while receiving the
        // message; nothing else in the process knows their numbers yet.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// A close-on-exec duplicate of descriptor number `fd`, if it is open.
pub fn dup_raw(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; a closed one gives EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this duplicate for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Registers a pidfd with tokio's reactor: readable once the process has exited.
pub fn async_pidfd(pidfd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes the OwnedFd, which owns a valid descriptor that nothing else
    // closes or replaces while it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    };
    registered.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout and request number of `PIDFD_GET_INFO`: a reaped child's status reads back
    /// (on kernels before 6.15 the call is unsupported, and the test says so).
    #[test]
    fn the_exit_status_of_a_reaped_process_reads_back() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let pidfd = pidfd_open(child.id() as i32).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(3));
        match pidfd_exit_info(&pidfd) {
            ExitInfo::Status(raw) => assert_eq!(raw, 3 << 8, "wait status of exit(3)"),
            ExitInfo::NotYet => panic!("reaped, yet no exit info"),
            ExitInfo::Unsupported => eprintln!("PIDFD_INFO_EXIT unsupported here (Linux < 6.15)"),
        }
    }
}
