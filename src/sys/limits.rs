//! Resource limits of the agent process, and telling resource exhaustion apart from
//! other OS errors.
//!
//! Every layer that turns an OS error into a client-visible code asks
//! [`is_resource_exhaustion`]: running out of descriptors, memory, buffers or processes
//! is the agent's (or the machine's) trouble, never the caller's identity or input, and
//! retrying later may work. The API layers map it to `resource_exhausted` (Connect) and
//! 503 (REST), keeping the errno in the message.

use std::io;

/// The errnos that mean "out of a resource, try again later":
/// EMFILE/ENFILE (descriptors), ENOMEM, EAGAIN (processes, threads, memory locks),
/// ENOBUFS (socket buffers), ENOLCK (file locks).
pub fn is_exhaustion_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::ENOBUFS | libc::ENOLCK
    )
}

/// True when `err` carries one of the errnos of [`is_exhaustion_errno`].
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    err.raw_os_error().is_some_and(is_exhaustion_errno)
}

/// `RLIMIT_NOFILE` before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit found at start.
    pub soft_before: u64,
    /// Soft limit now (the hard limit when raising worked).
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. The agent holds a descriptor per
/// connection, watch, process pipe and kernel socket: a soft limit of 1024 (a common
/// default) would make a few hundred idle clients starve every other request.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= hard {
        return Ok(NofileLimit {
            soft_before: soft,
            soft,
            hard,
        });
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    Ok(NofileLimit {
        soft_before: soft,
        soft: hard,
        hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_errnos() {
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::EAGAIN,
            libc::ENOBUFS,
        ] {
            assert!(
                is_resource_exhaustion(&io::Error::from_raw_os_error(e)),
                "{e}"
            );
        }
        for e in [libc::ENOENT, libc::EACCES, libc::EINVAL, libc::ENOSPC] {
            assert!(
                !is_resource_exhaustion(&io::Error::from_raw_os_error(e)),
                "{e}"
            );
        }
        assert!(!is_resource_exhaustion(&io::Error::other("no errno")));
    }
}
