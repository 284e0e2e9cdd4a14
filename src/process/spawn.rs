//! The spawn executor (contract 3.3.2).
//!
//! Everything the child needs is prepared before the `clone` (the [`SpawnPlan`] plus raw
//! pointer arrays into it, every file descriptor). The child is started like
//! `posix_spawn` does it: `clone(CLONE_VM | CLONE_VFORK)` on a private stack, sharing
//! guestd's memory until its `exec` while the spawning thread waits; so the child makes
//! only async-signal-safe calls (raw syscalls, `write`, `execve`, `_exit`), writes only
//! its own context, and never returns into Rust code that could allocate, lock or unwind.
//!
//! The child, in order: joins its cgroup leaf; resets every signal disposition to default and unblocks all
//! signals; becomes a process-group leader (`setpgid(0,0)`) or, in PTY mode, a session
//! leader with the PTY as controlling terminal; installs stdin/stdout/stderr; sets
//! `oom_score_adj` 100, nice 0 and best-effort I/O priority 4 (failures ignored);
//! switches to the user's groups, gid and uid; changes to the cwd; marks every other
//! descriptor close-on-exec; then tries the exec candidates like a shell does.
//!
//! Setup failures before exec travel to the parent through a close-on-exec pipe (stage
//! and errno) and fail the spawn. An exec failure does not: like a shell, the child
//! prints `<cmd>: command not found` (or the error) to its stderr and exits 127/126.

use std::ffi::{CStr, CString, c_char};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;

use super::PtySize;
use super::error::ProcessError;
use super::plan::{ExecTarget, SpawnPlan};
use crate::sys::reaper::{self, ExitWaiter};

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

/// Starts the child described by `plan`. Returns once the child has exec'd (or failed
/// before exec, which is an error).
pub(crate) async fn spawn(
    plan: &SpawnPlan,
    pty: Option<PtySize>,
    stdin: bool,
    cgroup_procs: &[CString],
) -> Result<Spawned, ProcessError> {
    let (err_r, err_w) = pipe().map_err(|e| setup_error("error pipe", e))?;
    let err_r = async_fd(err_r).map_err(|e| setup_error("error pipe", e))?;

    // The child's three standard descriptors and guestd's ends.
    let (child_fds, parent_io) = match pty {
        Some(size) => {
            let owner = plan.creds.as_ref().map(|c| c.uid);
            let (master, slave) = open_pty(size, owner).map_err(|e| setup_error("pty", e))?;
            let master = async_fd(master).map_err(|e| setup_error("pty", e))?;
            (ChildFds::Pty(slave), ParentIo::Pty { master })
        }
        None => {
            let (stdin_child, stdin_parent) = if stdin {
                let (r, w) = pipe().map_err(|e| setup_error("stdin pipe", e))?;
                let w = async_fd(w).map_err(|e| setup_error("stdin pipe", e))?;
                (r, Some(w))
            } else {
                let null = nix::fcntl::open(
                    c"/dev/null",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| setup_error("open /dev/null", e.into()))?;
                (null, None)
            };
            let (out_r, out_w) = pipe().map_err(|e| setup_error("stdout pipe", e))?;
            let (err_pr, err_pw) = pipe().map_err(|e| setup_error("stderr pipe", e))?;
            let stdout = async_fd(out_r).map_err(|e| setup_error("stdout pipe", e))?;
            let stderr = async_fd(err_pr).map_err(|e| setup_error("stderr pipe", e))?;
            (
                ChildFds::Pipes([stdin_child, out_w, err_pw]),
                ParentIo::Pipes {
                    stdin: stdin_parent,
                    stdout,
                    stderr,
                },
            )
        }
    };

    let (pidfd, waiter) = {
        // ChildCtx holds raw pointers (not Send): keep it out of the async state.
        let mut ctx = ChildCtx::new(plan, &child_fds, err_w.as_raw_fd(), cgroup_procs);
        // Not under the reaper lock: the spawn waits for the child's exec (CLONE_VFORK),
        // which must never hold up reaping or other spawns.
        reaper::global()
            .spawn_unlocked(|| spawn_child(&mut ctx))
            .map_err(|e| setup_error("clone", e))?
    };
    // The child has its own copies; ours would keep the pipes (and the PTY) open.
    drop(child_fds);
    drop(err_w);
    let pid = waiter.pid();

    match await_exec(&err_r).await {
        Ok(None) => {}
        Ok(Some((stage, errno))) => {
            // The child reported and exited; the reaper collects it.
            return Err(ProcessError::spawn(
                stage_name(stage),
                io::Error::from_raw_os_error(errno),
            ));
        }
        Err(e) => {
            // We cannot tell what the child is doing: make sure it is gone.
            let _ = kill_exact(pid, pidfd.as_ref(), libc::SIGKILL);
            return Err(setup_error("waiting for exec", e));
        }
    }
    let pid = u32::try_from(pid).map_err(|_| ProcessError::Spawn(io::Error::other("bad pid")))?;
    Ok(Spawned {
        pid,
        waiter,
        pidfd,
        io: parent_io,
    })
}

/// Sends `sig` to exactly the process `pid` (through its pidfd when there is one, so
/// a reaped and reused pid is never hit). Errors are returned raw.
pub(crate) fn kill_exact(pid: i32, pidfd: Option<&OwnedFd>, sig: libc::c_int) -> io::Result<()> {
    let rc = match pidfd {
        // SAFETY: pidfd_send_signal with a valid pidfd, a null siginfo and no flags.
        Some(fd) => unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        },
        // SAFETY: kill takes no pointers.
        None => libc::c_long::from(unsafe { libc::kill(pid, sig) }),
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
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
        nix::fcntl::open(name.as_str(), flags, Mode::empty())?
    };
    set_winsize(master.as_raw_fd(), size)?;
    if let Some(uid) = owner {
        let _ = nix::unistd::fchown(slave.as_fd(), Some(nix::unistd::Uid::from_raw(uid)), None);
    }
    Ok((master.into(), slave))
}

/// Reads the child's setup report: `None` when the pipe closed empty (exec happened),
/// `Some((stage, errno))` when setup failed.
async fn await_exec(err_r: &AsyncFd<OwnedFd>) -> io::Result<Option<(u32, i32)>> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        let mut guard = err_r.readable().await?;
        match guard
            .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf[got..]).map_err(io::Error::from))
        {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    match got {
        0 => Ok(None),
        8 => {
            let stage = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            Ok(Some((stage, errno)))
        }
        n => Err(io::Error::other(format!(
            "truncated child setup report ({n} bytes)"
        ))),
    }
}

/// The descriptors the child installs as 0, 1 and 2 (dropped by the parent after fork).
enum ChildFds {
    Pipes([OwnedFd; 3]),
    Pty(OwnedFd),
}

impl ChildFds {
    fn raw(&self) -> [RawFd; 3] {
        match self {
            ChildFds::Pipes(fds) => [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()],
            ChildFds::Pty(fd) => [fd.as_raw_fd(); 3],
        }
    }
}

const STAGE_SETSID: u32 = 1;
const STAGE_SETPGID: u32 = 2;
const STAGE_DUP: u32 = 3;
const STAGE_CTTY: u32 = 4;
const STAGE_SETGROUPS: u32 = 5;
const STAGE_SETGID: u32 = 6;
const STAGE_SETUID: u32 = 7;
const STAGE_CHDIR: u32 = 8;

fn stage_name(stage: u32) -> &'static str {
    match stage {
        STAGE_SETSID => "setsid",
        STAGE_SETPGID => "setpgid",
        STAGE_DUP => "installing stdio",
        STAGE_CTTY => "setting the controlling terminal",
        STAGE_SETGROUPS => "setgroups",
        STAGE_SETGID => "setgid",
        STAGE_SETUID => "setuid",
        STAGE_CHDIR => "chdir",
        _ => "child setup",
    }
}

/// What the child reads after `fork`: raw pointers into the plan (which outlives the
/// fork call), so the child never allocates.
struct ChildCtx<'a> {
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// `["/bin/sh", <script>, args..., NULL]` for ENOEXEC; slot 1 is filled in the child.
    sh_argv: Vec<*const c_char>,
    candidates: Vec<*const c_char>,
    /// `true`: a PATH search (bare name); `false`: a path or nothing.
    search: bool,
    cwd: *const c_char,
    creds: Option<(libc::uid_t, libc::gid_t, *const libc::gid_t, usize)>,
    stdio: [RawFd; 3],
    pty: bool,
    err_fd: RawFd,
    prefix: *const u8,
    prefix_len: usize,
    /// `cgroup.procs` files to join (written `0`) before anything else.
    cgroup_procs: Vec<*const c_char>,
    _plan: PhantomData<&'a SpawnPlan>,
}

const SH: &CStr = c"/bin/sh";

impl<'a> ChildCtx<'a> {
    fn new(
        plan: &'a SpawnPlan,
        fds: &'a ChildFds,
        err_fd: RawFd,
        cgroup_procs: &'a [CString],
    ) -> Self {
        let null = std::ptr::null::<c_char>();
        let mut argv: Vec<_> = plan.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(null);
        let mut envp: Vec<_> = plan.envp.iter().map(|a| a.as_ptr()).collect();
        envp.push(null);
        let mut sh_argv = vec![SH.as_ptr(), null];
        sh_argv.extend(plan.argv.iter().skip(1).map(|a| a.as_ptr()));
        sh_argv.push(null);
        let (candidates, search) = match &plan.exec {
            ExecTarget::Path(p) => (vec![p.as_ptr()], false),
            ExecTarget::Search(list) => (list.iter().map(|c| c.as_ptr()).collect(), true),
            ExecTarget::NotFound => (Vec::new(), true),
        };
        ChildCtx {
            argv,
            envp,
            sh_argv,
            candidates,
            search,
            cwd: plan.cwd.as_ptr(),
            creds: plan
                .creds
                .as_ref()
                .map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len())),
            stdio: fds.raw(),
            pty: matches!(fds, ChildFds::Pty(_)),
            err_fd,
            prefix: plan.message_prefix.as_ptr(),
            prefix_len: plan.message_prefix.len(),
            cgroup_procs: cgroup_procs.iter().map(|c| c.as_ptr()).collect(),
            _plan: PhantomData,
        }
    }
}

/// Stack of the child between `clone` and `exec` (it shares guestd's memory until then).
const CHILD_STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

/// Entry point of the child on its private stack.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildCtx` that `spawn_child` passed to clone; with
    // CLONE_VFORK the parent is suspended and does not touch it until we exec or exit.
    unsafe { child_main(&mut *arg.cast::<ChildCtx<'static>>()) }
}

/// Starts the child the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)` on a
/// private stack, so guestd's page tables are not copied and no copy-on-write faults
/// follow (a plain `fork` of a multi-threaded process pays both, plus TLB shootdowns);
/// this thread waits until the child has exec'd (or exited). The child runs
/// [`child_main`] and never returns. All signals are blocked around `clone` so no guestd
/// signal handler runs in the child before it resets the dispositions. `CLONE_PIDFD`
/// gives a pidfd for exactly this child, atomically.
fn spawn_child(ctx: &mut ChildCtx<'_>) -> io::Result<(Option<OwnedFd>, i32)> {
    // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            CHILD_STACK + GUARD,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // The lowest page is a guard: a stack overflow faults in the child instead of
    // writing into guestd's memory (which the child shares).
    // SAFETY: the first page of the mapping made above.
    unsafe { libc::mprotect(map, GUARD, libc::PROT_NONE) };
    // SAFETY: one past the end of the mapping: the initial stack pointer (stacks grow
    // down; mmap returns page-aligned memory, so it is 16-byte aligned).
    let top = unsafe { map.cast::<u8>().add(CHILD_STACK + GUARD) }.cast::<libc::c_void>();

    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, filled by pthread_sigmask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigset_t values owned by this frame.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let arg = (ctx as *mut ChildCtx<'_>).cast::<libc::c_void>();
    let mut pidfd: libc::c_int = -1;
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    // SAFETY: child_entry runs on the fresh stack and only executes child_main, which
    // restricts itself to async-signal-safe syscalls on memory prepared before the
    // call; CLONE_VFORK keeps this thread (and so ctx and the stack) alive and untouched
    // until the child has exec'd or exited. With CLONE_PIDFD the kernel writes the pidfd
    // into `pidfd` (the parent_tid argument).
    let mut pid =
        unsafe { libc::clone(child_entry, top, flags | libc::CLONE_PIDFD, arg, &mut pidfd) };
    if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A kernel without CLONE_PIDFD (before 5.2).
        pidfd = -1;
        // SAFETY: as above, without the pidfd.
        pid = unsafe { libc::clone(child_entry, top, flags, arg) };
    }
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above; the mapping is ours and the child no longer
    // runs on it (it has exec'd or exited: CLONE_VFORK).
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        libc::munmap(map, CHILD_STACK + GUARD);
    }
    if pid < 0 {
        return Err(clone_err);
    }
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: a fresh descriptor from CLONE_PIDFD, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(pidfd) }
    });
    Ok((pidfd, pid))
}

fn errno() -> libc::c_int {
    // Reading errno does not allocate (the Os variant holds just the code).
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes all of `buf` to `fd`, ignoring errors. Async-signal-safe.
///
/// # Safety
/// `buf` must be valid for `len` bytes.
unsafe fn write_all_raw(fd: RawFd, mut buf: *const u8, mut len: usize) {
    while len > 0 {
        // SAFETY: the caller guarantees buf is valid for len bytes.
        let n = unsafe { libc::write(fd, buf.cast(), len) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return;
        }
        let n = n as usize;
        // SAFETY: n <= len, so the pointer stays within (or one past) the buffer.
        buf = unsafe { buf.add(n) };
        len -= n;
    }
}

/// Reports a setup failure to the parent and exits.
///
/// # Safety
/// Only in the forked child.
unsafe fn fail(err_fd: RawFd, stage: u32) -> ! {
    let e = errno();
    let mut rec = [0u8; 8];
    rec[..4].copy_from_slice(&stage.to_ne_bytes());
    rec[4..].copy_from_slice(&e.to_ne_bytes());
    // SAFETY: rec is a live 8-byte buffer; _exit never returns.
    unsafe {
        write_all_raw(err_fd, rec.as_ptr(), rec.len());
        libc::_exit(127)
    }
}

/// Moves `fd` to a number >= 3 (close-on-exec) so installing 0/1/2 cannot clobber it.
///
/// # Safety
/// Only in the forked child.
unsafe fn raise_fd(fd: RawFd, err_fd: RawFd) -> RawFd {
    if fd >= 3 {
        return fd;
    }
    // SAFETY: fcntl on a descriptor number; failure is reported.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        // SAFETY: in the child.
        unsafe { fail(err_fd, STAGE_DUP) }
    }
    n
}

/// The child after fork. Only async-signal-safe calls; never returns.
///
/// # Safety
/// Must only run in a freshly forked child, with `ctx` prepared by [`ChildCtx::new`].
unsafe fn child_main(ctx: &mut ChildCtx<'_>) -> ! {
    // SAFETY (whole body): every call below is an async-signal-safe libc function or raw
    // syscall operating on descriptors and memory prepared before fork; nothing
    // allocates, locks or unwinds.
    unsafe {
        // Default dispositions first (guestd ignores SIGPIPE; handlers must not run
        // here), then unblock everything (the parent blocked all signals around fork).
        // Linux has signals 1..=64 (_NSIG is 65 on every architecture guestd targets).
        // Raw rt_sigaction: the C library refuses to touch the signals it reserves
        // (32, 33), which may have been inherited as ignored. An all-zero kernel
        // sigaction is SIG_DFL with no flags and an empty mask on every layout.
        let dfl = [0u64; 4];
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Join the command's cgroup leaf (every hierarchy) before the user's code can
        // fork: nothing it starts can be outside the leaf. Best effort, like the
        // priorities below: a missing cgroup must never fail the spawn.
        for &procs in &ctx.cgroup_procs {
            let fd = libc::open(procs, libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                write_all_raw(fd, b"0".as_ptr(), 1);
                libc::close(fd);
            }
        }

        if ctx.pty {
            if libc::setsid() < 0 {
                fail(ctx.err_fd, STAGE_SETSID);
            }
        } else if libc::setpgid(0, 0) < 0 {
            fail(ctx.err_fd, STAGE_SETPGID);
        }

        let err_fd = raise_fd(ctx.err_fd, ctx.err_fd);
        ctx.err_fd = err_fd;
        let mut src = ctx.stdio;
        for fd in src.iter_mut() {
            *fd = raise_fd(*fd, err_fd);
        }
        for (target, fd) in src.iter().enumerate() {
            // Sources are >= 3, so dup2 always creates target without close-on-exec.
            if libc::dup2(*fd, target as RawFd) < 0 {
                fail(err_fd, STAGE_DUP);
            }
        }
        if ctx.pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(err_fd, STAGE_CTTY);
        }

        // Priorities (contract 6.2). Failures are ignored: they must never fail a spawn.
        let oom = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if oom >= 0 {
            write_all_raw(oom, b"100".as_ptr(), 3);
            libc::close(oom);
        }
        libc::setpriority(libc::PRIO_PROCESS, 0, 0);
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_BE: libc::c_long = 2;
        const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 4,
        );

        // Credentials: raw syscalls (the C library's wrappers may try to coordinate
        // threads that do not exist in this child). Groups, then gid, then uid.
        if let Some((uid, gid, groups, ngroups)) = ctx.creds {
            if libc::syscall(libc::SYS_setgroups, ngroups, groups) < 0 {
                fail(err_fd, STAGE_SETGROUPS);
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0 {
                fail(err_fd, STAGE_SETGID);
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0 {
                fail(err_fd, STAGE_SETUID);
            }
        }

        // As the user: a directory the user cannot enter fails the spawn.
        if libc::chdir(ctx.cwd) < 0 {
            fail(err_fd, STAGE_CHDIR);
        }

        // Everything guestd opens is close-on-exec already; this also covers anything a
        // library opened without the flag. Best effort (Linux 5.11+).
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );

        exec_candidates(ctx)
    }
}

/// Tries the exec candidates like a shell and, if none execs, prints the shell-style
/// message and exits 127 (not found) or 126 (found but not executable).
///
/// # Safety
/// Only in the forked child.
unsafe fn exec_candidates(ctx: &mut ChildCtx<'_>) -> ! {
    let mut saw_eacces = false;
    let mut fatal = None;
    for i in 0..ctx.candidates.len() {
        let path = ctx.candidates[i];
        // SAFETY: in the child; path, argv and envp point into the plan.
        let e = unsafe { try_exec(ctx, path) };
        if !ctx.search {
            fatal = Some(e);
            break;
        }
        match e {
            // Not here: keep searching (as execvp does).
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            libc::EACCES => saw_eacces = true,
            other => {
                fatal = Some(other);
                break;
            }
        }
    }
    let (msg, code): (&[u8], i32) = match fatal {
        None if saw_eacces => (b"Permission denied", 126),
        None => (b"command not found", 127),
        Some(libc::ENOENT) => (b"No such file or directory", 127),
        Some(e) => (errno_text(e), 126),
    };
    // SAFETY: prefix points into the plan; the other buffers are static.
    unsafe {
        write_all_raw(2, ctx.prefix, ctx.prefix_len);
        write_all_raw(2, msg.as_ptr(), msg.len());
        write_all_raw(2, b"\n".as_ptr(), 1);
        libc::_exit(code)
    }
}

/// `execve(path)`; on ENOEXEC (a script without `#!`) runs it with `/bin/sh` like
/// shells do. Returns the errno of the failed attempt.
///
/// # Safety
/// Only in the forked child.
unsafe fn try_exec(ctx: &mut ChildCtx<'_>, path: *const c_char) -> libc::c_int {
    // SAFETY: NUL-terminated strings and NULL-terminated arrays prepared before fork.
    unsafe {
        libc::execve(path, ctx.argv.as_ptr(), ctx.envp.as_ptr());
        let e = errno();
        if e != libc::ENOEXEC {
            return e;
        }
        ctx.sh_argv[1] = path;
        libc::execve(SH.as_ptr(), ctx.sh_argv.as_ptr(), ctx.envp.as_ptr());
    }
    libc::ENOEXEC
}

/// strerror texts for the errors execve can return (strerror itself is not
/// async-signal-safe).
fn errno_text(e: libc::c_int) -> &'static [u8] {
    match e {
        libc::EACCES => b"Permission denied",
        libc::EPERM => b"Operation not permitted",
        libc::EISDIR => b"Is a directory",
        libc::ENOTDIR => b"Not a directory",
        libc::E2BIG => b"Argument list too long",
        libc::ENOMEM => b"Cannot allocate memory",
        libc::ETXTBSY => b"Text file busy",
        libc::ELOOP => b"Too many levels of symbolic links",
        libc::ENAMETOOLONG => b"File name too long",
        libc::ENOEXEC => b"cannot execute binary file: Exec format error",
        libc::EINVAL => b"Invalid argument",
        libc::EIO => b"Input/output error",
        libc::EMFILE => b"Too many open files",
        libc::ENFILE => b"Too many open files in system",
        libc::EAGAIN => b"Resource temporarily unavailable",
        libc::ELIBBAD => b"Accessing a corrupted shared library",
        _ => b"cannot execute",
    }
}
