//! The process domain's spawn: pipes or a PTY for the child's standard streams, and a
//! [`launch::Command`] with the user-command policy (contract 3.3.2): a new process
//! group (PTY: a new session with the PTY as controlling terminal), the command's
//! cgroup leaf, `oom_score_adj` 100, nice 0, best-effort I/O priority 4, the user's
//! groups, gid and uid, the cwd, and shell-style exec failures (`<cmd>: command not
//! found` on stderr, exit 127/126). The clone itself, the child side and its safety
//! live in [`crate::sys::launch`].

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;

use super::PtySize;
use super::error::ProcessError;
use super::plan::SpawnPlan;
use crate::sys::launch::{self, IOPRIO_CLASS_BE, LaunchError, Session, Stdio};
use crate::sys::reaper::ExitWaiter;

pub(crate) use crate::sys::launch::kill_exact;

/// A started child, exec'd (or printing its exec failure).
pub(crate) struct Spawned {
    pub pid: u32,
    pub waiter: ExitWaiter,
    /// A pidfd for signalling this exact process even after its pid is reaped and
    /// reused (`None` on kernels without `pidfd_open`).
    pub pidfd: Option<OwnedFd>,
    pub io: ParentIo,
}

/// guestd's ends of the child's standard streams, nonblocking and registered with the
/// runtime.
pub(crate) enum ParentIo {
    Pipes {
        /// The write end of the stdin pipe; `None` when stdin is `/dev/null`.
        stdin: Option<AsyncFd<OwnedFd>>,
        stdout: AsyncFd<OwnedFd>,
        stderr: AsyncFd<OwnedFd>,
    },
    Pty {
        master: AsyncFd<OwnedFd>,
    },
}

/// Capacity asked for the stdout pipe.
const STDOUT_PIPE_BYTES: libc::c_int = 256 * 1024;

/// Starts the child described by `plan`. Returns once the child has exec'd (or failed
/// to exec and is reporting it like a shell), or with the setup failure.
pub(crate) async fn spawn(
    plan: SpawnPlan,
    pty: Option<PtySize>,
    stdin: bool,
    cgroup_procs: Vec<CString>,
    cgroup_at_clone: Option<(std::sync::Arc<OwnedFd>, usize)>,
    rlimits: Vec<launch::Rlimit>,
) -> Result<Spawned, ProcessError> {
    // The child's three standard descriptors and guestd's ends.
    let (stdio, session, parent_io) = match pty {
        Some(size) => {
            let owner = plan.creds.as_ref().map(|c| c.uid);
            let (master, slave) = open_pty(size, owner).map_err(|e| setup_error("pty", e))?;
            let master = async_fd(master).map_err(|e| setup_error("pty", e))?;
            (
                [Stdio::Fd(slave), Stdio::SameAsStdin, Stdio::SameAsStdin],
                Session::NewSession { ctty: true },
                ParentIo::Pty { master },
            )
        }
        None => {
            let (stdin_child, stdin_parent) = if stdin {
                let (r, w) = pipe().map_err(|e| setup_error("stdin pipe", e))?;
                let w = async_fd(w).map_err(|e| setup_error("stdin pipe", e))?;
                (Stdio::Fd(r), Some(w))
            } else {
                (Stdio::Null, None)
            };
            let (out_r, out_w) = pipe().map_err(|e| setup_error("stdout pipe", e))?;
            let (err_r, err_w) = pipe().map_err(|e| setup_error("stderr pipe", e))?;
            // A deeper stdout pipe lets a chatty child run ahead of guestd's 32 KiB
            // reads instead of blocking every 64 KiB (best effort; the pages are the
            // writer's, charged to its cgroup).
            let _ = fcntl(&out_r, FcntlArg::F_SETPIPE_SZ(STDOUT_PIPE_BYTES));
            let stdout = async_fd(out_r).map_err(|e| setup_error("stdout pipe", e))?;
            let stderr = async_fd(err_r).map_err(|e| setup_error("stderr pipe", e))?;
            (
                [stdin_child, Stdio::Fd(out_w), Stdio::Fd(err_w)],
                Session::NewGroup,
                ParentIo::Pipes {
                    stdin: stdin_parent,
                    stdout,
                    stderr,
                },
            )
        }
    };
    let cwd = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(plan.cwd.as_bytes()));
    let cmd = launch::Command {
        argv: plan.argv,
        envp: plan.envp,
        exec: plan.exec,
        cwd: Some(plan.cwd),
        creds: plan.creds,
        session,
        stdio,
        cgroup_procs,
        cgroup_at_clone,
        oom_score_adj: Some(100),
        nice: Some(0),
        ioprio: Some((IOPRIO_CLASS_BE, 4)),
        rlimits,
        shell_errors: Some(plan.message_prefix),
    };
    let launched = launch::launch(cmd)
        .await
        .map_err(|e| launch_error(e, cwd))?;
    let pid = u32::try_from(launched.pid)
        .map_err(|_| ProcessError::Spawn(io::Error::other("bad pid")))?;
    Ok(Spawned {
        pid,
        waiter: launched.waiter,
        pidfd: launched.pidfd,
        io: parent_io,
    })
}

/// Maps a launch failure: too large is the client's error, resource exhaustion is
/// retryable, anything else failed the spawn.
/// A `chdir` that found no directory is the client's missing (or non-directory) cwd.
fn launch_error(e: LaunchError, cwd: std::path::PathBuf) -> ProcessError {
    match e {
        LaunchError::TooLarge(msg) => ProcessError::TooLarge(msg),
        LaunchError::Failed {
            stage: "chdir",
            source,
        } if source.raw_os_error() == Some(libc::ENOENT) => ProcessError::CwdMissing(cwd),
        LaunchError::Failed {
            stage: "chdir",
            source,
        } if source.raw_os_error() == Some(libc::ENOTDIR) => ProcessError::CwdNotDirectory(cwd),
        LaunchError::Failed { stage, source } => ProcessError::spawn(stage, source),
    }
}

/// Sets the window size of a PTY (`TIOCSWINSZ`; the kernel sends SIGWINCH to the
/// foreground process group).
pub(crate) fn set_winsize(fd: RawFd, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct from a valid pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setup_error(what: &str, e: io::Error) -> ProcessError {
    ProcessError::spawn(what, e)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Makes `fd` nonblocking and registers it with the runtime.
pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    set_nonblocking(&fd)?;
    // SAFETY: the OwnedFd is open, owned by the AsyncFd from now on, and never replaced
    // or closed behind its back; as_raw_fd always returns that descriptor.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// Opens a PTY pair (both close-on-exec) of the given size. The slave is handed to
/// `owner` (best effort) so the user's programs can reopen their terminal by name.
fn open_pty(size: PtySize, owner: Option<u32>) -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = nix::pty::posix_openpt(flags)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    // TIOCGPTPEER (Linux 4.13+) opens the slave without a path lookup.
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let peer = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags.bits()) };
    let slave = if peer >= 0 {
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(peer) }
    } else {
        let name = nix::pty::ptsname_r(&master)?;
        nix::fcntl::open(name.as_str(), flags, nix::sys::stat::Mode::empty())?
    };
    set_winsize(master.as_raw_fd(), size)?;
    if let Some(uid) = owner {
        let _ = nix::unistd::fchown(slave.as_fd(), Some(nix::unistd::Uid::from_raw(uid)), None);
    }
    Ok((master.into(), slave))
}
