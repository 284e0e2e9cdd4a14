//! The system calls a child makes between `clone` and `exec`, behind a trait.
//!
//! [`child::run`](super::child::run) is written against [`Syscall`] so the whole
//! child-side policy (signal reset, cgroup join, session, stdio, priorities, rlimits,
//! credentials, cwd, exec candidates) runs in unit tests against [`Recorder`], which
//! records every call and fails the ones a test asks it to, without root and without
//! forking. [`Real`] makes the raw system calls.
//!
//! Every [`Real`] method is async-signal-safe: a raw system call (or libc's thin wrapper
//! that is one) on memory prepared before the `clone`. Nothing allocates, locks or
//! unwinds: the child shares guestd's memory until it execs.

use std::ffi::{CStr, c_char};
use std::os::fd::RawFd;

/// An errno value.
pub type Errno = i32;

/// The calls of a child before `exec`. Methods return the errno of a failure.
pub trait Syscall {
    /// Every signal to its default disposition, and an empty signal mask.
    fn reset_signals(&mut self);
    /// Writes `0` into a `cgroup.procs` file: joins that cgroup.
    fn join_cgroup(&mut self, procs: &CStr) -> Result<(), Errno>;
    fn setsid(&mut self) -> Result<(), Errno>;
    /// `setpgid(0, 0)`: leader of a new process group.
    fn setpgid(&mut self) -> Result<(), Errno>;
    /// `fcntl(fd, F_DUPFD_CLOEXEC, min)`.
    fn dup_above(&mut self, fd: RawFd, min: RawFd) -> Result<RawFd, Errno>;
    fn dup2(&mut self, from: RawFd, to: RawFd) -> Result<(), Errno>;
    /// `ioctl(fd, TIOCSCTTY, 0)`.
    fn set_controlling_tty(&mut self, fd: RawFd) -> Result<(), Errno>;
    /// Writes `/proc/self/oom_score_adj`.
    fn set_oom_score_adj(&mut self, value: i32) -> Result<(), Errno>;
    /// `setpriority(PRIO_PROCESS, 0, nice)`.
    fn set_nice(&mut self, nice: i32) -> Result<(), Errno>;
    /// `ioprio_set(IOPRIO_WHO_PROCESS, 0, class << 13 | level)`.
    fn set_ioprio(&mut self, class: u8, level: u8) -> Result<(), Errno>;
    fn setrlimit(&mut self, resource: u32, soft: u64, hard: u64) -> Result<(), Errno>;
    fn setgroups(&mut self, groups: &[u32]) -> Result<(), Errno>;
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno>;
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno>;
    fn chdir(&mut self, path: &CStr) -> Result<(), Errno>;
    /// Marks every descriptor from `from` on close-on-exec.
    fn cloexec_from(&mut self, from: RawFd);
    /// `execve`; returns only on failure, with its errno.
    ///
    /// # Safety
    /// `argv` and `envp` must be NULL-terminated arrays of NUL-terminated strings.
    unsafe fn execve(
        &mut self,
        path: &CStr,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> Errno;
}

/// The real system calls (only ever used in a freshly cloned child).
pub struct Real;

fn errno() -> Errno {
    // Reading errno does not allocate (the Os variant holds just the code).
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(rc: libc::c_long) -> Result<(), Errno> {
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// Writes all of `buf` to `fd`. Async-signal-safe.
fn write_all(fd: RawFd, buf: &[u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a live slice; write reads at most rest.len() bytes of it.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Opens `path` write-only, writes `data`, closes. Async-signal-safe.
fn write_file(path: &CStr, data: &[u8]) -> Result<(), Errno> {
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    let r = write_all(fd, data);
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    r
}

/// Formats `v` in decimal into `buf` without allocating; returns the digits.
pub(super) fn format_i32(v: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut n = i64::from(v).unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

impl Syscall for Real {
    fn reset_signals(&mut self) {
        // Linux has signals 1..=64. Raw rt_sigaction: the C library refuses to touch the
        // signals it reserves (32, 33), which may have been inherited as ignored. An
        // all-zero kernel sigaction is SIG_DFL with no flags and an empty mask.
        let dfl = [0u64; 4];
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // SAFETY: a valid kernel sigaction (all zero), no old-action pointer.
                unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        dfl.as_ptr(),
                        std::ptr::null_mut::<u64>(),
                        8usize,
                    )
                };
            }
        }
        // SAFETY: sigset_t is plain data, initialised by sigemptyset.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        }
    }

    fn join_cgroup(&mut self, procs: &CStr) -> Result<(), Errno> {
        write_file(procs, b"0")
    }

    fn setsid(&mut self) -> Result<(), Errno> {
        // SAFETY: no arguments.
        check(libc::c_long::from(unsafe { libc::setsid() }))
    }

    fn setpgid(&mut self) -> Result<(), Errno> {
        // SAFETY: no pointers.
        check(libc::c_long::from(unsafe { libc::setpgid(0, 0) }))
    }

    fn dup_above(&mut self, fd: RawFd, min: RawFd) -> Result<RawFd, Errno> {
        // SAFETY: fcntl on a descriptor number; failure is reported.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
        if n < 0 { Err(errno()) } else { Ok(n) }
    }

    fn dup2(&mut self, from: RawFd, to: RawFd) -> Result<(), Errno> {
        // SAFETY: descriptor numbers only.
        check(libc::c_long::from(unsafe { libc::dup2(from, to) }))
    }

    fn set_controlling_tty(&mut self, fd: RawFd) -> Result<(), Errno> {
        // SAFETY: TIOCSCTTY takes an int argument.
        check(libc::c_long::from(unsafe {
            libc::ioctl(fd, libc::TIOCSCTTY, 0)
        }))
    }

    fn set_oom_score_adj(&mut self, value: i32) -> Result<(), Errno> {
        let mut buf = [0u8; 12];
        write_file(c"/proc/self/oom_score_adj", format_i32(value, &mut buf))
    }

    fn set_nice(&mut self, nice: i32) -> Result<(), Errno> {
        // SAFETY: no pointers.
        check(libc::c_long::from(unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, nice)
        }))
    }

    fn set_ioprio(&mut self, class: u8, level: u8) -> Result<(), Errno> {
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
        let prio = (libc::c_long::from(class) << IOPRIO_CLASS_SHIFT) | libc::c_long::from(level);
        // SAFETY: integer arguments only.
        check(unsafe {
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0 as libc::c_long,
                prio,
            )
        })
    }

    fn setrlimit(&mut self, resource: u32, soft: u64, hard: u64) -> Result<(), Errno> {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: a valid rlimit struct; raw syscall (no wrapper state).
        check(unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0 as libc::c_long,
                libc::c_long::from(resource),
                &lim as *const libc::rlimit,
                std::ptr::null_mut::<libc::rlimit>(),
            )
        })
    }

    fn setgroups(&mut self, groups: &[u32]) -> Result<(), Errno> {
        // Raw syscalls for credentials: the C library's wrappers may try to coordinate
        // threads that do not exist in this child.
        // SAFETY: the slice is valid for groups.len() gid_t values (u32 on Linux).
        check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })
    }

    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })
    }

    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })
    }

    fn chdir(&mut self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: a NUL-terminated path.
        check(libc::c_long::from(unsafe { libc::chdir(path.as_ptr()) }))
    }

    fn cloexec_from(&mut self, from: RawFd) {
        // Best effort (Linux 5.11+): everything guestd opens is close-on-exec already;
        // this also covers anything a library opened without the flag.
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        // SAFETY: integer arguments only.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                from as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            )
        };
    }

    unsafe fn execve(
        &mut self,
        path: &CStr,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> Errno {
        // SAFETY: NUL-terminated strings and NULL-terminated pointer arrays prepared
        // before the clone (the caller guarantees them).
        unsafe { libc::execve(path.as_ptr(), argv, envp) };
        errno()
    }
}

/// A recording fake for unit tests: every call is appended to `calls`; calls listed in
/// `fail` return that errno; `execve` fails with `exec_errno` (ENOENT by default).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Recorder {
    pub calls: Vec<Call>,
    pub fail: Vec<(&'static str, Errno)>,
    pub exec_errnos: Vec<Errno>,
}

/// One recorded call (owned copies of its arguments).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    ResetSignals,
    JoinCgroup(String),
    Setsid,
    Setpgid,
    DupAbove(RawFd, RawFd),
    Dup2(RawFd, RawFd),
    ControllingTty(RawFd),
    OomScoreAdj(i32),
    Nice(i32),
    Ioprio(u8, u8),
    Rlimit(u32, u64, u64),
    Setgroups(Vec<u32>),
    Setresgid(u32),
    Setresuid(u32),
    Chdir(String),
    CloexecFrom(RawFd),
    Execve {
        path: String,
        argv: Vec<String>,
        envp: Vec<String>,
    },
}

#[cfg(test)]
impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::ResetSignals => "reset_signals",
            Call::JoinCgroup(_) => "join_cgroup",
            Call::Setsid => "setsid",
            Call::Setpgid => "setpgid",
            Call::DupAbove(..) => "dup_above",
            Call::Dup2(..) => "dup2",
            Call::ControllingTty(_) => "set_controlling_tty",
            Call::OomScoreAdj(_) => "set_oom_score_adj",
            Call::Nice(_) => "set_nice",
            Call::Ioprio(..) => "set_ioprio",
            Call::Rlimit(..) => "setrlimit",
            Call::Setgroups(_) => "setgroups",
            Call::Setresgid(_) => "setresgid",
            Call::Setresuid(_) => "setresuid",
            Call::Chdir(_) => "chdir",
            Call::CloexecFrom(_) => "cloexec_from",
            Call::Execve { .. } => "execve",
        }
    }
}

#[cfg(test)]
impl Recorder {
    fn record(&mut self, call: Call) -> Result<(), Errno> {
        let name = call.name();
        self.calls.push(call);
        match self.fail.iter().find(|(n, _)| *n == name) {
            Some((_, e)) => Err(*e),
            None => Ok(()),
        }
    }

    /// Reads a NULL-terminated array of C strings (test only).
    fn strings(mut p: *const *const c_char) -> Vec<String> {
        let mut out = Vec::new();
        // SAFETY: test-only; the arrays come from ChildCtx and are NULL-terminated.
        unsafe {
            while !(*p).is_null() {
                out.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
                p = p.add(1);
            }
        }
        out
    }
}

#[cfg(test)]
impl Syscall for Recorder {
    fn reset_signals(&mut self) {
        let _ = self.record(Call::ResetSignals);
    }
    fn join_cgroup(&mut self, procs: &CStr) -> Result<(), Errno> {
        self.record(Call::JoinCgroup(procs.to_string_lossy().into_owned()))
    }
    fn setsid(&mut self) -> Result<(), Errno> {
        self.record(Call::Setsid)
    }
    fn setpgid(&mut self) -> Result<(), Errno> {
        self.record(Call::Setpgid)
    }
    fn dup_above(&mut self, fd: RawFd, min: RawFd) -> Result<RawFd, Errno> {
        self.record(Call::DupAbove(fd, min))?;
        // A fresh number well above anything the test uses.
        Ok(100 + fd)
    }
    fn dup2(&mut self, from: RawFd, to: RawFd) -> Result<(), Errno> {
        self.record(Call::Dup2(from, to))
    }
    fn set_controlling_tty(&mut self, fd: RawFd) -> Result<(), Errno> {
        self.record(Call::ControllingTty(fd))
    }
    fn set_oom_score_adj(&mut self, value: i32) -> Result<(), Errno> {
        self.record(Call::OomScoreAdj(value))
    }
    fn set_nice(&mut self, nice: i32) -> Result<(), Errno> {
        self.record(Call::Nice(nice))
    }
    fn set_ioprio(&mut self, class: u8, level: u8) -> Result<(), Errno> {
        self.record(Call::Ioprio(class, level))
    }
    fn setrlimit(&mut self, resource: u32, soft: u64, hard: u64) -> Result<(), Errno> {
        self.record(Call::Rlimit(resource, soft, hard))
    }
    fn setgroups(&mut self, groups: &[u32]) -> Result<(), Errno> {
        self.record(Call::Setgroups(groups.to_vec()))
    }
    fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
        self.record(Call::Setresgid(gid))
    }
    fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
        self.record(Call::Setresuid(uid))
    }
    fn chdir(&mut self, path: &CStr) -> Result<(), Errno> {
        self.record(Call::Chdir(path.to_string_lossy().into_owned()))
    }
    fn cloexec_from(&mut self, from: RawFd) {
        let _ = self.record(Call::CloexecFrom(from));
    }
    unsafe fn execve(
        &mut self,
        path: &CStr,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> Errno {
        let _ = self.record(Call::Execve {
            path: path.to_string_lossy().into_owned(),
            argv: Self::strings(argv),
            envp: Self::strings(envp),
        });
        if self.exec_errnos.is_empty() {
            libc::ENOENT
        } else {
            self.exec_errnos.remove(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_integers_without_allocating() {
        let mut b = [0u8; 12];
        assert_eq!(format_i32(0, &mut b), b"0");
        assert_eq!(format_i32(100, &mut b), b"100");
        assert_eq!(format_i32(-1000, &mut b), b"-1000");
        assert_eq!(format_i32(i32::MIN, &mut b), b"-2147483648");
        assert_eq!(format_i32(i32::MAX, &mut b), b"2147483647");
    }
}
