//! Errors of the process domain. The API layer maps each variant to a Connect code
//! (noted on each variant).

use std::io;
use std::path::PathBuf;

use super::Selector;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// `not_found`.
    #[error("process with {0} not found")]
    NotFound(Selector),
    /// `invalid_argument`.
    #[error("cwd '{}' does not exist", .0.display())]
    CwdMissing(PathBuf),
    /// `invalid_argument`: the cwd exists but is not a directory.
    #[error("cwd '{}' is not a directory", .0.display())]
    CwdNotDirectory(PathBuf),
    /// `invalid_argument`: PTY allocation, pipe, fork or child setup failure (before exec),
    /// or a request that cannot be turned into an exec (a NUL byte in an argument).
    #[error("failed to start process: {0}")]
    Spawn(#[source] io::Error),
    /// `invalid_argument`: the argv or environment is more than the kernel accepts
    /// (the message names the culprit and the limit).
    #[error("failed to start process: {0}")]
    TooLarge(String),
    /// `resource_exhausted`: EAGAIN/ENOMEM/EMFILE/ENFILE/ENOBUFS/ENOSPC while spawning.
    #[error("failed to start process, out of resources: {0}")]
    ResourceExhausted(#[source] io::Error),
    /// `internal`.
    #[error("stdin not enabled or closed")]
    StdinNotAvailable,
    /// `internal`: stdin input for a PTY process.
    #[error("process is a PTY: send input as pty data, not stdin")]
    IsPty,
    /// `internal`: PTY input or resize for a process without a PTY.
    #[error("process has no PTY")]
    NotPty,
    /// `unknown`.
    #[error("cannot close stdin of a PTY process; send Ctrl+D (0x04) instead")]
    CloseStdinOnPty,
    /// `internal`.
    #[error("error sending signal: {0}")]
    Signal(#[source] io::Error),
    /// `internal`.
    #[error("{0}")]
    Io(#[source] io::Error),
}

impl ProcessError {
    /// A spawn-time OS error with what was being done, classified as resource
    /// exhaustion or a plain spawn failure.
    pub(crate) fn spawn(context: &str, err: io::Error) -> Self {
        let exhausted = is_resource_exhaustion(&err);
        let err = io::Error::new(err.kind(), format!("{context}: {err}"));
        if exhausted {
            ProcessError::ResourceExhausted(err)
        } else {
            ProcessError::Spawn(err)
        }
    }
}

/// The errnos of [`crate::sys::limits::is_resource_exhaustion`] (EAGAIN, ENOMEM,
/// EMFILE, ENFILE, ENOBUFS, …) and ENOSPC (no PTY left): the machine (or a limit) is out
/// of something; retrying later may work.
pub(crate) fn is_resource_exhaustion(err: &io::Error) -> bool {
    crate::sys::limits::is_resource_exhaustion(err) || err.raw_os_error() == Some(libc::ENOSPC)
}

/// Returned by [`super::Subscription::next`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// `resource_exhausted`: this subscriber did not keep up with the output.
    #[error(
        "output subscriber dropped: it fell {behind} bytes behind the process's output \
         (its buffer is {buffer} bytes) while the process or a faster reader went on; \
         reconnect with replay_from={next_offset} to resume from the last byte received \
         (output still retained is replayed, the start event's replay offset shows any gap)"
    )]
    Lagged {
        /// How far behind it was when dropped.
        behind: u64,
        /// The per-subscriber buffer it exceeded.
        buffer: usize,
        /// Output offset right after the last chunk this subscriber received: reconnect
        /// with `replay_from` set to this to continue without a gap (if still retained).
        next_offset: u64,
    },
}
