//! guestd's own scheduling priority.
//!
//! Nice values and I/O priorities belong to threads, and new threads inherit them, so
//! this runs in `main` before the runtime starts its threads. User commands and kernels
//! are put back to nice 0 and best-effort I/O level 4 by the launcher.

use std::io;

/// What [`set_own`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The nice value is now the one asked for.
    Set,
    /// guestd already ran at this or a higher priority (e.g. `Nice=-20` from its
    /// systemd unit): left as it was.
    AlreadyHigher(i32),
}

/// Raises the calling thread's (and so every later thread's) priority to `nice` and
/// best-effort I/O level 0 — never lowers it: a nice value or I/O class its service
/// manager already gave it (the unit's `Nice=-20`, `IOSchedulingClass=realtime`) is
/// kept. Lowering the nice value needs `CAP_SYS_NICE`; the error is returned for the
/// caller to log.
pub fn set_own(nice: i32) -> io::Result<Applied> {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_RT: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    // SAFETY: integer arguments only; who = 0 is the calling thread.
    let io_now =
        unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0 as libc::c_long) };
    let io_class = if io_now >= 0 { io_now >> 13 } else { 0 };
    let io_level = if io_now >= 0 { io_now & 7 } else { 7 };
    // Realtime, or best-effort 0 already: nothing to raise.
    if io_class != IOPRIO_CLASS_RT && !(io_class == IOPRIO_CLASS_BE && io_level == 0) {
        // SAFETY: integer arguments only.
        unsafe {
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                0 as libc::c_long,
                IOPRIO_CLASS_BE << 13,
            )
        };
    }
    let current = own_nice();
    if current <= nice {
        return Ok(Applied::AlreadyHigher(current));
    }
    // SAFETY: integer arguments only; who = 0 is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(Applied::Set)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's nice value.
pub fn own_nice() -> i32 {
    // getpriority can return -1 legitimately; clear errno-style ambiguity by reading
    // /proc instead.
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            // Fields after the command: state(3) ... nice is field 19 overall.
            rest.split_whitespace().nth(16)?.parse().ok()
        })
        .unwrap_or(0)
}
