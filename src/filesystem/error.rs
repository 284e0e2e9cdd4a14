//! The one error type of the filesystem domain.
//!
//! Every message names the path it is about, so the API layer can pass [`FsError`]'s
//! `Display` text to the client unchanged. The API layer maps [`FsError::class`] onto
//! Connect codes and HTTP statuses (see [`ErrorClass`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What kind of failure an [`FsError`] is, for the API layer's mapping.
///
/// | class | Connect code (RPCs) | HTTP status (`/files`) |
/// |---|---|---|
/// | `NotFound` | `not_found` | 404 |
/// | `AlreadyExists` | `already_exists` | 409 |
/// | `InvalidArgument` | `invalid_argument` | 400 |
/// | `FailedPrecondition` | `failed_precondition` | 400 |
/// | `PermissionDenied` | `permission_denied` (or `internal`, contract §1.8) | 403 (or 500) |
/// | `InsufficientStorage` | `internal` (contract 4.4 "other → internal"; `resource_exhausted` is the newer-reference choice) | 507 |
/// | `ResourceExhausted` | `resource_exhausted` (the agent ran out of descriptors, memory, …) | 503 |
/// | `Internal` | `internal` | 500 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    PermissionDenied,
    InsufficientStorage,
    /// EMFILE, ENFILE, ENOMEM, EAGAIN, ENOBUFS ([`crate::sys::limits`]): not the
    /// client's fault, and retrying later may work.
    ResourceExhausted,
    Internal,
}

/// Why a write ran out of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSpaceKind {
    /// No free inodes (ENOSPC when creating a file on a filesystem with no free inodes).
    Inodes,
    /// No free blocks (ENOSPC while writing data or metadata).
    Space,
    /// The user's disk quota is exhausted (EDQUOT).
    Quota,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    /// The entry does not exist. The message is built by the operation (contract wording
    /// differs per call: "file not found: …", "source file not found: …", "path … not found").
    #[error("{0}")]
    NotFound(String),
    /// MakeDir on an existing directory.
    #[error("{0}")]
    AlreadyExists(String),
    /// A directory was required ("path is not a directory: …").
    #[error("{0}")]
    NotADirectory(String),
    /// A file was required ("path is a directory: …").
    #[error("{0}")]
    IsADirectory(String),
    /// Anything else the client got wrong (bad metadata, wrong kind of entry, …).
    #[error("{0}")]
    InvalidArgument(String),
    /// EACCES/EPERM/EROFS from the kernel (the agent runs as root, so: immutable files,
    /// read-only mounts and the like).
    #[error("permission denied: {op} {}: {source}", path.display())]
    PermissionDenied {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// ELOOP while resolving a path.
    #[error("symlink loop: too many levels of symbolic links while resolving {}", path.display())]
    SymlinkLoop { path: PathBuf },
    /// ENOSPC / EDQUOT (HTTP 507 on `/files`).
    #[error("{message}")]
    NoSpace { kind: NoSpaceKind, message: String },
    /// Watch refused: the path is on NFS/CIFS/SMB/FUSE and network mounts were not allowed.
    #[error("cannot watch path on network filesystem: {}", path.display())]
    NetworkMount { path: PathBuf },
    /// ENOSPC from `inotify_add_watch`: the per-user inotify watch limit is reached.
    #[error(
        "cannot watch {}: the inotify watch limit was reached (fs.inotify.max_user_watches = {}); \
         raise it with `sysctl fs.inotify.max_user_watches=<n>` or watch a smaller tree",
        path.display(),
        limit_text(*limit)
    )]
    WatchLimit { path: PathBuf, limit: Option<u64> },
    /// EMFILE from `inotify_init1`: the per-user inotify instance limit is reached.
    #[error(
        "cannot watch {}: the inotify instance limit was reached (fs.inotify.max_user_instances = {}); \
         remove unused watchers or raise the limit",
        path.display(),
        limit_text(*limit)
    )]
    InstanceLimit { path: PathBuf, limit: Option<u64> },
    /// Events were lost (kernel queue overflow or a full per-watcher queue); the watch is over.
    #[error("{0}")]
    QueueOverflow(String),
    /// Any other I/O failure.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
}

fn limit_text(limit: Option<u64>) -> String {
    match limit {
        Some(n) => n.to_string(),
        None => "unknown".to_string(),
    }
}

impl FsError {
    /// How the API layer should report this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            FsError::NotFound(_) => ErrorClass::NotFound,
            FsError::AlreadyExists(_) => ErrorClass::AlreadyExists,
            FsError::NotADirectory(_)
            | FsError::IsADirectory(_)
            | FsError::InvalidArgument(_)
            | FsError::NetworkMount { .. } => ErrorClass::InvalidArgument,
            FsError::SymlinkLoop { .. } => ErrorClass::FailedPrecondition,
            FsError::PermissionDenied { .. } => ErrorClass::PermissionDenied,
            FsError::NoSpace { .. } => ErrorClass::InsufficientStorage,
            FsError::Io { source, .. } if crate::sys::limits::is_resource_exhaustion(source) => {
                ErrorClass::ResourceExhausted
            }
            FsError::WatchLimit { .. }
            | FsError::InstanceLimit { .. }
            | FsError::QueueOverflow(_)
            | FsError::Io { .. } => ErrorClass::Internal,
        }
    }

    /// The errno behind this error, when there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            FsError::Io { source, .. } | FsError::PermissionDenied { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    pub(crate) fn not_a_directory(path: &Path) -> Self {
        FsError::NotADirectory(format!("path is not a directory: {}", path.display()))
    }

    pub(crate) fn is_a_directory(path: &Path) -> Self {
        FsError::IsADirectory(format!("path is a directory: {}", path.display()))
    }

    pub(crate) fn no_space(kind: NoSpaceKind, message: String) -> Self {
        FsError::NoSpace { kind, message }
    }

    /// Maps an I/O error of operation `op` on `path`: ELOOP → [`FsError::SymlinkLoop`],
    /// EACCES/EPERM/EROFS → [`FsError::PermissionDenied`], everything else → [`FsError::Io`].
    /// ENOENT and ENOSPC are not special here: callers that give them a meaning check first.
    pub(crate) fn io(op: &'static str, path: &Path, e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ELOOP) => FsError::SymlinkLoop {
                path: path.to_path_buf(),
            },
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                FsError::PermissionDenied {
                    op,
                    path: path.to_path_buf(),
                    source: Arc::new(e),
                }
            }
            _ => FsError::Io {
                op,
                path: path.to_path_buf(),
                source: Arc::new(e),
            },
        }
    }

    /// Like [`FsError::io`], but ENOSPC/EDQUOT become [`FsError::NoSpace`] with the
    /// contract's "not enough disk space available" wording.
    pub(crate) fn io_write(op: &'static str, path: &Path, e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) => FsError::no_space(
                NoSpaceKind::Space,
                format!(
                    "not enough disk space available: {op} {}: {e}",
                    path.display()
                ),
            ),
            Some(libc::EDQUOT) => FsError::no_space(
                NoSpaceKind::Quota,
                format!(
                    "not enough disk space available (disk quota exceeded): {op} {}: {e}",
                    path.display()
                ),
            ),
            _ => FsError::io(op, path, e),
        }
    }
}

/// True for "does not exist" errors: ENOENT, and ENOTDIR (a component of the path is a
/// file, so the entry cannot exist either).
pub(crate) fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_messages() {
        let e = FsError::io(
            "cannot open",
            Path::new("/x"),
            io::Error::from_raw_os_error(libc::ELOOP),
        );
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
        assert!(e.to_string().contains("/x"), "{e}");

        let e = FsError::io_write(
            "cannot write",
            Path::new("/y"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.class(), ErrorClass::InsufficientStorage);
        assert!(
            e.to_string()
                .starts_with("not enough disk space available: cannot write /y"),
            "{e}"
        );

        let e = FsError::io(
            "cannot remove",
            Path::new("/z"),
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert_eq!(e.class(), ErrorClass::PermissionDenied);
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let e = FsError::io(
            "cannot create",
            Path::new("/ro/f"),
            io::Error::from_raw_os_error(libc::EROFS),
        );
        assert_eq!(e.class(), ErrorClass::PermissionDenied);
        assert!(e.to_string().contains("Read-only file system"), "{e}");

        let e = FsError::io(
            "cannot open",
            Path::new("/many"),
            io::Error::from_raw_os_error(libc::EMFILE),
        );
        assert_eq!(e.class(), ErrorClass::ResourceExhausted);
        assert_eq!(
            e.to_string(),
            "cannot open /many: Too many open files (os error 24)"
        );

        let e = FsError::WatchLimit {
            path: "/w".into(),
            limit: Some(8192),
        };
        let text = e.to_string();
        assert!(
            text.contains("fs.inotify.max_user_watches = 8192"),
            "{text}"
        );
        assert!(text.contains("/w"), "{text}");
        assert_eq!(e.class(), ErrorClass::Internal);

        assert_eq!(
            FsError::not_a_directory(Path::new("/f")).to_string(),
            "path is not a directory: /f"
        );
        assert_eq!(
            FsError::is_a_directory(Path::new("/d")).to_string(),
            "path is a directory: /d"
        );
        assert_eq!(
            FsError::NetworkMount { path: "/n".into() }.to_string(),
            "cannot watch path on network filesystem: /n"
        );
    }
}
