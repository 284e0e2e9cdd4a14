//! guestd's own scheduling priority.
//!
//! Nice values and I/O priorities belong to threads, and new threads inherit them, so
//! this runs in `main` before the runtime starts its threads. User commands and kernels
//! are put back to nice 0 and best-effort I/O level 4 by the launcher.

use std::io;

/// Sets the calling thread's (and so every later thread's) nice value and best-effort
/// I/O priority level 0. Lowering the nice value needs `CAP_SYS_NICE`; the error is
/// returned for the caller to log.
pub fn set_own(nice: i32) -> io::Result<()> {
    // SAFETY: integer arguments only; who = 0 is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    let nice_result = if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    // SAFETY: integer arguments only.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_BE << 13,
        )
    };
    nice_result
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
