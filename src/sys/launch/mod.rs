//! The one way guestd starts a child: user commands (`process`), Jupyter kernels
//! (`kernel`) and `/init`'s mounts all describe it as a [`Command`] and call
//! [`launch`].
//!
//! * **Off the runtime.** The child is cloned like `posix_spawn` does it
//!   (`clone(CLONE_VM | CLONE_VFORK)` on a private, guard-paged stack: no page-table
//!   copy, no copy-on-write faults), which suspends the calling thread until the child
//!   execs. That thread is a blocking-pool thread, never a runtime worker, and at most
//!   [`MAX_INFLIGHT`] launches run at once (more wait their turn), so no child, however
//!   slow its setup (a hung NFS cwd, a huge binary), can stop the agent from serving.
//! * **The child never blocks on guestd.** Its only write is an 8-byte failure report to
//!   an empty close-on-exec pipe. Shell-style messages (`cmd: command not found`) are
//!   written by the parent into the child's stderr after the clone returned, bounded in
//!   size. (A child that wrote a 70 kB message into a 64 kB pipe nobody read, while its
//!   `CLONE_VFORK` parent waited for it, was how a long `cmd` wedged the agent.)
//! * **Sizes are checked first.** An argv or environment the kernel would refuse
//!   (E2BIG: one string over `MAX_ARG_STRLEN`, or the whole over the stack-derived
//!   limit) is a [`LaunchError::TooLarge`] naming the culprit, before any clone.
//! * **Shutdown can end stragglers.** Each child stores its pid in shared memory as its
//!   first act; [`kill_inflight`] SIGKILLs children still between clone and exec, so a
//!   stuck child cannot keep guestd's listening sockets open after guestd exits.
//!
//! The child-side policy is [`child::run`], written against the [`syscall::Syscall`]
//! seam and unit-tested with its recording fake.

mod child;
pub mod syscall;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::sys::reaper::{self, ExitWaiter};

/// Launches in flight at once (each holds a blocking-pool thread until its child execs).
pub const MAX_INFLIGHT: usize = 64;
/// The kernel's limit for one argv or environment string, NUL included
/// (`MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;
/// The floor of the kernel's total argv + envp limit (`ARG_MAX`).
const ARG_MAX_FLOOR: usize = 32 * 4096;
/// The ceiling of that limit (three quarters of the 8 MiB `_STK_LIM`).
const ARG_MAX_CEILING: usize = 6 << 20;
/// Shell-style messages name at most this much of the command.
const MESSAGE_PREFIX_MAX: usize = 256;

/// Best-effort I/O scheduling class.
pub const IOPRIO_CLASS_BE: u8 = 2;

/// How the child finds the program to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecTarget {
    /// Executed as is (relative to the cwd if relative).
    Path(CString),
    /// These candidates (from `PATH`, in order) are tried until one execs.
    Search(Vec<CString>),
    /// Nothing to try (empty command): "command not found".
    NotFound,
}

/// The search path used when the final environment has no `PATH` (glibc's `execvp`
/// default).
pub const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// [`ExecTarget`] before conversion to C strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(String),
    Search(Vec<String>),
    NotFound,
}

/// Where to look for `cmd`, the way shells and `execvp` do: a name containing `/` is a
/// path; a bare name is looked up in each `PATH` entry in order (an empty entry is the
/// current directory); without `PATH`, [`DEFAULT_PATH`] is used.
pub fn exec_target(cmd: &str, path: Option<&str>) -> Target {
    if cmd.is_empty() {
        return Target::NotFound;
    }
    if cmd.contains('/') {
        return Target::Path(cmd.to_string());
    }
    let path = path.unwrap_or(DEFAULT_PATH);
    let candidates = path
        .split(':')
        .map(|dir| {
            if dir.is_empty() {
                cmd.to_string()
            } else {
                format!("{}/{cmd}", dir.trim_end_matches('/'))
            }
        })
        .collect();
    Target::Search(candidates)
}

impl ExecTarget {
    /// [`exec_target`] as C strings; `None` if `cmd` or a candidate has a NUL byte.
    pub fn lookup(cmd: &str, path: Option<&str>) -> Option<ExecTarget> {
        Some(match exec_target(cmd, path) {
            Target::Path(p) => ExecTarget::Path(CString::new(p).ok()?),
            Target::Search(list) => ExecTarget::Search(
                list.into_iter()
                    .map(CString::new)
                    .collect::<Result<_, _>>()
                    .ok()?,
            ),
            Target::NotFound => ExecTarget::NotFound,
        })
    }
}

/// uid, gid and groups the child switches to before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Process group and session of the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// guestd's own (for short-lived helpers).
    Inherit,
    /// Leader of a new process group (kills reach the whole tree).
    NewGroup,
    /// Leader of a new session; `ctty`: stdin becomes its controlling terminal.
    NewSession { ctty: bool },
}

/// One of the child's standard descriptors.
#[derive(Debug)]
pub enum Stdio {
    /// `/dev/null` (opened for reading and writing).
    Null,
    /// This descriptor (the launcher closes guestd's copy once the child has it).
    Fd(OwnedFd),
    /// The same descriptor as stdin (a PTY's slave for all three).
    SameAsStdin,
}

/// A resource limit the child sets for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Everything about one child, prepared before the clone.
#[derive(Debug)]
pub struct Command {
    /// `argv[0]` first.
    pub argv: Vec<CString>,
    /// `NAME=value` strings: the complete environment.
    pub envp: Vec<CString>,
    pub exec: ExecTarget,
    /// `None`: guestd's cwd.
    pub cwd: Option<CString>,
    /// `None`: guestd's own credentials.
    pub creds: Option<Credentials>,
    pub session: Session,
    pub stdio: [Stdio; 3],
    /// `cgroup.procs` files the child writes `0` into first (best effort).
    pub cgroup_procs: Vec<CString>,
    /// A cgroup v2 directory to create the child in (`clone3(CLONE_INTO_CGROUP)`), and
    /// the index of the `cgroup_procs` entry that is then skipped. Where the kernel
    /// refuses it, the child moves itself like into the others.
    pub cgroup_at_clone: Option<(Arc<OwnedFd>, usize)>,
    pub oom_score_adj: Option<i32>,
    pub nice: Option<i32>,
    /// (class, level)
    pub ioprio: Option<(u8, u8)>,
    pub rlimits: Vec<Rlimit>,
    /// `Some(prefix)`: an exec failure behaves like a shell's — `<prefix>: command not
    /// found` (or the error) on the child's stderr and exit 127/126, and the launch
    /// succeeds. `None`: an exec failure is a [`LaunchError`].
    pub shell_errors: Option<Vec<u8>>,
}

/// A started child.
#[derive(Debug)]
pub struct Launched {
    pub pid: i32,
    pub waiter: ExitWaiter,
    /// Signals exactly this child even after its pid is reaped and reused (`None` on
    /// kernels without `CLONE_PIDFD`).
    pub pidfd: Option<OwnedFd>,
    /// With `shell_errors`: the exec failed and the child exits 127/126.
    pub exec_errno: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The argv or environment is more than the kernel accepts (E2BIG).
    #[error("{0}")]
    TooLarge(String),
    /// A system call failed, in guestd or in the child before exec.
    #[error("{stage}: {source}")]
    Failed {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
}

impl LaunchError {
    fn at(stage: &'static str) -> impl FnOnce(io::Error) -> LaunchError {
        move |source| LaunchError::Failed { stage, source }
    }

    /// The OS error, when there is one.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            LaunchError::Failed { source, .. } => Some(source),
            LaunchError::TooLarge(_) => None,
        }
    }
}

static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_INFLIGHT);

/// Pids of children between clone and exec (0 until the child has stored its pid).
static INFLIGHT: Mutex<Vec<Arc<AtomicI32>>> = Mutex::new(Vec::new());

/// Starts `cmd`. Returns once the child has exec'd (or, with `shell_errors`, failed to
/// and reported it like a shell would).
pub async fn launch(cmd: Command) -> Result<Launched, LaunchError> {
    check_size(&cmd)?;
    let _permit = SLOTS
        .acquire()
        .await
        .map_err(|_| LaunchError::at("launch slots")(io::Error::other("closed")))?;
    match tokio::task::spawn_blocking(move || launch_blocking(cmd)).await {
        Ok(r) => r,
        Err(e) => Err(LaunchError::at("launch thread")(io::Error::other(
            e.to_string(),
        ))),
    }
}

/// SIGKILLs every child that is still between clone and exec. For shutdown: such a
/// child holds copies of all of guestd's descriptors.
pub fn kill_inflight() -> usize {
    let list = INFLIGHT.lock().unwrap_or_else(|p| p.into_inner());
    let mut n = 0;
    for slot in list.iter() {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            n += 1;
        }
    }
    n
}

/// Checks the argv and environment against the kernel's execve limits.
pub fn check_size(cmd: &Command) -> Result<(), LaunchError> {
    let too_long = |what: String, len: usize| {
        LaunchError::TooLarge(format!(
            "{what} is {len} bytes; Linux accepts at most {} bytes per argument or \
             environment string (MAX_ARG_STRLEN)",
            MAX_ARG_STRLEN - 1
        ))
    };
    let mut total = 0usize;
    for (i, a) in cmd.argv.iter().enumerate() {
        let n = a.as_bytes_with_nul().len();
        if n > MAX_ARG_STRLEN {
            let what = if i == 0 {
                "the command".to_string()
            } else {
                format!("argument {i}")
            };
            return Err(too_long(what, n - 1));
        }
        total += n;
    }
    for e in &cmd.envp {
        let n = e.as_bytes_with_nul().len();
        if n > MAX_ARG_STRLEN {
            let name = e
                .as_bytes()
                .split(|b| *b == b'=')
                .next()
                .unwrap_or_default();
            let what = format!(
                "environment variable {}",
                String::from_utf8_lossy(&name[..name.len().min(64)])
            );
            return Err(too_long(what, n - 1));
        }
        total += n;
    }
    // The kernel copies the file name too.
    total += match &cmd.exec {
        ExecTarget::Path(p) => p.as_bytes_with_nul().len(),
        ExecTarget::Search(list) => list
            .iter()
            .map(|c| c.as_bytes_with_nul().len())
            .max()
            .unwrap_or(0),
        ExecTarget::NotFound => 0,
    };
    let pointers = (cmd.argv.len().max(1) + cmd.envp.len() + 2) * std::mem::size_of::<usize>();
    let limit = arg_limit();
    if total + pointers > limit {
        return Err(LaunchError::TooLarge(format!(
            "the command line and environment take {} bytes; the kernel's limit for them \
             here is {limit} bytes (a quarter of the stack limit, at most 6 MiB)",
            total + pointers
        )));
    }
    Ok(())
}

/// The kernel's total limit for argv + envp: a quarter of the (child's, inherited)
/// stack limit, between 128 KiB and 6 MiB.
fn arg_limit() -> usize {
    let stack = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_STACK)
        .map(|(soft, _)| soft)
        .unwrap_or(8 << 20);
    let quarter = usize::try_from(stack / 4).unwrap_or(usize::MAX);
    quarter.clamp(ARG_MAX_FLOOR, ARG_MAX_CEILING)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

fn launch_blocking(cmd: Command) -> Result<Launched, LaunchError> {
    let (report_r, report_w) = pipe().map_err(LaunchError::at("report pipe"))?;
    let null = if cmd.stdio.iter().any(|s| matches!(s, Stdio::Null)) {
        Some(
            nix::fcntl::open(
                c"/dev/null",
                OFlag::O_RDWR | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| LaunchError::at("open /dev/null")(e.into()))?,
        )
    } else {
        None
    };
    let mut raw = [-1 as RawFd; 3];
    for (i, s) in cmd.stdio.iter().enumerate() {
        raw[i] = match s {
            Stdio::Null => null.as_ref().map_or(-1, |n| n.as_raw_fd()),
            Stdio::Fd(fd) => fd.as_raw_fd(),
            Stdio::SameAsStdin => raw[0],
        };
    }

    let slot = Arc::new(AtomicI32::new(0));
    INFLIGHT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(slot.clone());
    let cloned = {
        let mut ctx = child::ChildCtx::new(&cmd, raw, report_w.as_raw_fd());
        let mut entry = Entry {
            ctx: &mut ctx,
            slot: &slot,
            into: cmd
                .cgroup_at_clone
                .as_ref()
                .map(|(fd, idx)| (fd.as_raw_fd(), *idx)),
        };
        // Not under the reaper lock: the clone waits for the child's exec
        // (CLONE_VFORK), which must never hold up reaping or other launches.
        reaper::global().spawn_unlocked(|| clone_child(&mut entry))
    };
    INFLIGHT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|s| !Arc::ptr_eq(s, &slot));
    let (pidfd, waiter) = cloned.map_err(LaunchError::at("clone"))?;
    // The child has exec'd or exited: close our end so the report read sees EOF.
    drop(report_w);
    let pid = waiter.pid();

    let failure = match read_report(&report_r) {
        Ok(f) => f,
        Err(e) => {
            // We cannot tell what the child is doing: make sure it is gone.
            let _ = kill_exact(pid, pidfd.as_ref(), libc::SIGKILL);
            return Err(LaunchError::at("reading the child's report")(e));
        }
    };
    let exec_errno = match failure {
        None => None,
        Some(f) if f.stage == child::STAGE_EXEC && f.errno != libc::E2BIG => {
            match &cmd.shell_errors {
                Some(prefix) => {
                    let search = !matches!(cmd.exec, ExecTarget::Path(_));
                    write_shell_error(&cmd.stdio, &raw, prefix, search, f.errno);
                    Some(f.errno)
                }
                None => {
                    return Err(LaunchError::at("exec")(io::Error::from_raw_os_error(
                        f.errno,
                    )));
                }
            }
        }
        Some(f) if f.errno == libc::E2BIG => {
            return Err(LaunchError::TooLarge(
                "the kernel refused the command line and environment as too long (E2BIG)".into(),
            ));
        }
        // The child reported and exited; the reaper collects it.
        Some(f) => {
            return Err(LaunchError::Failed {
                stage: child::stage_name(f.stage),
                source: io::Error::from_raw_os_error(f.errno),
            });
        }
    };
    // `cmd` (and with it guestd's copies of the child's stdio) is dropped here, after
    // any message was written, so readers see the message and then EOF.
    drop(cmd);
    Ok(Launched {
        pid,
        waiter,
        pidfd,
        exec_errno,
    })
}

/// Writes a shell-style exec failure message to the child's stderr (bounded, never
/// blocking: the descriptor is fresh and guestd's own reader drains it).
fn write_shell_error(
    stdio: &[Stdio; 3],
    raw: &[RawFd; 3],
    prefix: &[u8],
    search: bool,
    errno: i32,
) {
    if matches!(stdio[2], Stdio::Null) || raw[2] < 0 {
        return;
    }
    let msg: &[u8] = match errno {
        libc::ENOENT if search => b"command not found",
        e => errno_text(e),
    };
    let mut line = Vec::with_capacity(MESSAGE_PREFIX_MAX + msg.len() + 8);
    if prefix.len() > MESSAGE_PREFIX_MAX + 2 {
        // Cut on a UTF-8 boundary and say so.
        let mut cut = MESSAGE_PREFIX_MAX;
        while cut > 0 && (prefix[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
        line.extend_from_slice(&prefix[..cut]);
        line.extend_from_slice("…: ".as_bytes());
    } else {
        line.extend_from_slice(prefix);
    }
    line.extend_from_slice(msg);
    line.push(b'\n');
    // SAFETY: fcntl/write on a descriptor we own (the child's stderr, still open here).
    unsafe {
        let flags = libc::fcntl(raw[2], libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(raw[2], libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        libc::write(raw[2], line.as_ptr().cast(), line.len());
    }
}

/// Reads the child's failure report: `None` when the pipe closed empty (exec happened).
fn read_report(fd: &OwnedFd) -> io::Result<Option<child::Failure>> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match got {
        0 => Ok(None),
        8 => Ok(Some(child::Failure::from_bytes(buf))),
        n => Err(io::Error::other(format!(
            "truncated child setup report ({n} bytes)"
        ))),
    }
}

/// Sends `sig` to exactly the process `pid` (through its pidfd when there is one, so
/// a reaped and reused pid is never hit). Errors are returned raw.
pub fn kill_exact(pid: i32, pidfd: Option<&OwnedFd>, sig: libc::c_int) -> io::Result<()> {
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

/// What the child's entry point gets: its context and the slot for its pid.
struct Entry<'a, 'b> {
    ctx: &'a mut child::ChildCtx<'b>,
    slot: &'a AtomicI32,
    /// A cgroup v2 directory to create the child in, and the join it replaces.
    into: Option<(RawFd, usize)>,
}

/// Cleared once the kernel showed it has no `clone3` with `CLONE_INTO_CGROUP`.
static CLONE3_INTO_CGROUP: AtomicBool = AtomicBool::new(cfg!(target_arch = "x86_64"));

/// Stack of the child between `clone` and `exec` (it shares guestd's memory until then).
const CHILD_STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

/// Entry point of the child on its private stack. Never returns.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Entry` that `clone_child` passed to clone; with CLONE_VFORK
    // the parent is suspended and does not touch it until we exec or exit.
    let entry = unsafe { &mut *arg.cast::<Entry<'_, '_>>() };
    // SAFETY: getpid takes no arguments.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) } as i32;
    entry.slot.store(pid, Ordering::SeqCst);
    // SAFETY: a freshly cloned child with a context built from a live Command.
    let failure = unsafe { child::run(&mut syscall::Real, entry.ctx) };
    let rec = failure.to_bytes();
    let code = match failure {
        child::Failure {
            stage: child::STAGE_EXEC,
            errno: libc::ENOENT,
        } => 127,
        child::Failure {
            stage: child::STAGE_EXEC,
            ..
        } => 126,
        _ => 127,
    };
    // SAFETY: rec is a live 8-byte buffer; _exit never returns. The report pipe is
    // empty and has room for 8 bytes, so the write cannot block.
    unsafe {
        libc::write(entry.ctx.report_fd, rec.as_ptr().cast(), rec.len());
        libc::_exit(code)
    }
}

/// Starts the child the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)` on a
/// private stack; this thread waits until the child has exec'd (or exited). All signals
/// are blocked around `clone` so no guestd signal handler runs in the child before it
/// resets the dispositions. `CLONE_PIDFD` gives a pidfd for exactly this child.
fn clone_child(entry: &mut Entry<'_, '_>) -> io::Result<(Option<OwnedFd>, i32)> {
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
    let mut pidfd: libc::c_int = -1;
    let mut pid = -1;
    if let Some((dir, idx)) = entry.into
        && CLONE3_INTO_CGROUP.load(Ordering::Relaxed)
    {
        entry.ctx.skip_cgroup = Some(idx);
        let arg = (entry as *mut Entry<'_, '_>).cast::<libc::c_void>();
        // SAFETY: as for clone below; the stack is the mapping made above, its top
        // 16-byte aligned.
        match unsafe { clone3_into(dir, map.cast(), CHILD_STACK + GUARD, arg, &mut pidfd) } {
            Ok(p) => pid = p,
            Err(e) => {
                // Nothing was created. Unsupported (before Linux 5.7, or not x86_64
                // semantics): never again. Anything else (a full pids limit, a leaf
                // that is gone): this time the child moves itself.
                if matches!(e, libc::ENOSYS | libc::E2BIG | libc::EINVAL) {
                    CLONE3_INTO_CGROUP.store(false, Ordering::Relaxed);
                }
                entry.ctx.skip_cgroup = None;
                pidfd = -1;
            }
        }
    }
    let arg = (entry as *mut Entry<'_, '_>).cast::<libc::c_void>();
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    if pid < 0 {
        // SAFETY: child_entry runs on the fresh stack and only executes child::run with
        // the real syscalls, which restrict themselves to async-signal-safe calls on
        // memory prepared before the call; CLONE_VFORK keeps this thread (and so the
        // entry and the stack) alive and untouched until the child has exec'd or
        // exited. With CLONE_PIDFD the kernel writes the pidfd into `pidfd` (the
        // parent_tid argument).
        pid = unsafe { libc::clone(child_entry, top, flags | libc::CLONE_PIDFD, arg, &mut pidfd) };
    }
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

/// `struct clone_args` of `clone3(2)` up to `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_INTO_CGROUP)`: the child starts
/// life in the cgroup v2 directory `dir` (no migration afterwards) and runs
/// `child_entry(arg)` on the given stack. Returns the child's pid (after it exec'd or
/// exited, CLONE_VFORK) or the errno; on error no child exists.
///
/// libc has no `clone3` wrapper that takes a function: the child returns from the
/// system call on its new stack, so the call and the jump into `child_entry` are a few
/// instructions of assembly that never return to Rust code in the child.
///
/// # Safety
/// Same contract as `clone(CLONE_VM | CLONE_VFORK)` with `child_entry`: `stack` is a
/// private mapping of `stack_size` bytes (page-aligned, so its top is 16-byte aligned)
/// that stays mapped until this returns; `arg` stays valid until then; `pidfd` is
/// written by the kernel.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_into(
    dir: RawFd,
    stack: *mut u8,
    stack_size: usize,
    arg: *mut libc::c_void,
    pidfd: &mut libc::c_int,
) -> Result<i32, libc::c_int> {
    let mut args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD) as u64 | CLONE_INTO_CGROUP,
        pidfd: (pidfd as *mut libc::c_int) as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack as u64,
        stack_size: stack_size as u64,
        cgroup: dir as u64,
        ..CloneArgs::default()
    };
    let entry: extern "C" fn(*mut libc::c_void) -> libc::c_int = child_entry;
    let ret: i64;
    // SAFETY: the parent gets the result in rax with every other register but rcx and
    // r11 preserved (the kernel's syscall ABI). The child (rax = 0) runs on the fresh
    // stack, whose top the kernel put in rsp (16-byte aligned, as `call` needs): it
    // calls child_entry(arg) from r12/r13 (preserved across the syscall) and, should
    // that ever return, exits. It never reaches the Rust code after this block.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, 60",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &mut args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") entry,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    if ret < 0 {
        Err((-ret) as libc::c_int)
    } else {
        Ok(ret as i32)
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3_into(
    _dir: RawFd,
    _stack: *mut u8,
    _stack_size: usize,
    _arg: *mut libc::c_void,
    _pidfd: &mut libc::c_int,
) -> Result<i32, libc::c_int> {
    Err(libc::ENOSYS)
}

/// strerror texts for the errors execve can return, without the "(os error N)" tail.
fn errno_text(e: libc::c_int) -> &'static [u8] {
    match e {
        libc::EACCES => b"Permission denied",
        libc::ENOENT => b"No such file or directory",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn sh(script: &str) -> Command {
        Command {
            argv: vec![c("/bin/sh"), c("-c"), c(script)],
            envp: vec![c("PATH=/usr/bin:/bin")],
            exec: ExecTarget::Path(c("/bin/sh")),
            cwd: None,
            creds: None,
            session: Session::NewGroup,
            stdio: [Stdio::Null, Stdio::Null, Stdio::Null],
            cgroup_procs: Vec::new(),
            cgroup_at_clone: None,
            oom_score_adj: None,
            nice: None,
            ioprio: None,
            rlimits: Vec::new(),
            shell_errors: None,
        }
    }

    #[test]
    fn oversized_strings_are_named() {
        let mut cmd = sh("true");
        cmd.argv[2] = CString::new(vec![b'x'; MAX_ARG_STRLEN]).unwrap();
        let e = check_size(&cmd).unwrap_err().to_string();
        assert!(e.starts_with("argument 2 is 131072 bytes"), "{e}");
        let mut cmd = sh("true");
        let mut var = b"BIG=".to_vec();
        var.extend(vec![b'y'; MAX_ARG_STRLEN]);
        cmd.envp.push(CString::new(var).unwrap());
        let e = check_size(&cmd).unwrap_err().to_string();
        assert!(e.starts_with("environment variable BIG is"), "{e}");
        // Just under the per-string limit is fine.
        let mut cmd = sh("true");
        cmd.argv[2] = CString::new(vec![b'x'; MAX_ARG_STRLEN - 1]).unwrap();
        check_size(&cmd).unwrap();
    }

    #[test]
    fn the_total_is_checked_against_the_stack_derived_limit() {
        let mut cmd = sh("true");
        let limit = arg_limit();
        for _ in 0..(limit / 100_000 + 1) {
            cmd.argv.push(CString::new(vec![b'z'; 100_000]).unwrap());
        }
        let e = check_size(&cmd).unwrap_err().to_string();
        assert!(
            e.contains(&format!("limit for them here is {limit} bytes")),
            "{e}"
        );
    }

    /// A fresh directory in the cgroup v2 hierarchy (`None` without a writable one).
    fn v2_dir() -> Option<std::path::PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| f[1].to_string())
        })?;
        static N: AtomicI32 = AtomicI32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::path::Path::new(&mount).join(format!("guestd-unit-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(dir)
    }

    /// Launches `cmd` with its stdout on a pipe and `cgroup_at_clone`; returns what it
    /// wrote once it exited 0.
    async fn output_of(mut cmd: Command, at_clone: Option<(Arc<OwnedFd>, usize)>) -> String {
        let (r, w) = pipe().unwrap();
        cmd.stdio[1] = Stdio::Fd(w);
        cmd.cgroup_at_clone = at_clone;
        let l = launch(cmd).await.unwrap();
        assert_eq!(l.waiter.await.code(), Some(0));
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn the_child_is_created_in_its_v2_cgroup_without_moving() {
        let Some(dir) = v2_dir() else {
            panic!("the test needs a writable cgroup v2 hierarchy (run as root)");
        };
        let fd = crate::sys::cgroup::open_path(&dir).unwrap();
        let mut cmd = sh("cat /proc/self/cgroup");
        // The join this placement replaces names a file that does not exist: only
        // clone3(CLONE_INTO_CGROUP) can have put the child there.
        cmd.cgroup_procs = vec![c("/nonexistent/guestd-test/cgroup.procs")];
        let out = output_of(cmd, Some((Arc::new(fd), 0))).await;
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let v2 = out.lines().find(|l| l.starts_with("0::")).unwrap_or("");
        let _ = std::fs::remove_dir(&dir);
        assert!(v2.ends_with(&format!("/{name}")), "{out}");
        assert!(CLONE3_INTO_CGROUP.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_refused_clone3_falls_back_to_the_child_moving_itself() {
        // A regular file is no cgroup: clone3 fails, nothing was created, and the
        // child is cloned the old way (and joins what it is given).
        let f = std::fs::File::open("/proc/self/cgroup").unwrap();
        let out = output_of(sh("echo ran"), Some((Arc::new(OwnedFd::from(f)), 0))).await;
        assert_eq!(out, "ran\n");
    }

    #[tokio::test]
    async fn launches_and_delivers_the_status() {
        let l = launch(sh("exit 7")).await.unwrap();
        assert_eq!(l.exec_errno, None);
        assert_eq!(l.waiter.await.code(), Some(7));
    }

    #[tokio::test]
    async fn an_exec_failure_without_shell_errors_is_a_launch_error() {
        let mut cmd = sh("");
        cmd.exec = ExecTarget::Path(c("/nonexistent/guestd-test"));
        let e = launch(cmd).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "exec: No such file or directory (os error 2)"
        );
    }

    #[tokio::test]
    async fn shell_errors_go_to_stderr_bounded_and_exit_127() {
        let (r, w) = pipe().unwrap();
        let long = "q".repeat(70_000);
        let mut cmd = sh("");
        cmd.argv[0] = c(&long);
        cmd.exec = ExecTarget::Search(vec![c("/nonexistent/guestd-test")]);
        cmd.stdio[2] = Stdio::Fd(w);
        let mut prefix = long.clone().into_bytes();
        prefix.extend_from_slice(b": ");
        cmd.shell_errors = Some(prefix);
        let l = launch(cmd).await.unwrap();
        assert_eq!(l.exec_errno, Some(libc::ENOENT));
        assert_eq!(l.waiter.await.code(), Some(127));
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, format!("{}…: command not found\n", &long[..256]));
    }

    #[tokio::test]
    async fn setup_failures_name_their_stage() {
        let mut cmd = sh("true");
        cmd.cwd = Some(c("/nonexistent/dir"));
        let e = launch(cmd).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "chdir: No such file or directory (os error 2)"
        );
    }

    #[tokio::test]
    async fn many_launches_at_once_all_complete() {
        let mut tasks = Vec::new();
        for i in 0..(MAX_INFLIGHT * 2) {
            tasks.push(tokio::spawn(launch(sh(&format!("exit {}", i % 100)))));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let l = t.await.unwrap().unwrap();
            assert_eq!(l.waiter.await.code(), Some((i % 100) as i32));
        }
    }
}
