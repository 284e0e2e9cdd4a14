//! The filesystem domain: everything the `filesystem.Filesystem` RPCs and the `/files`
//! REST routes need (contract §4, §5.5–5.7), without HTTP or proto types.
//!
//! * Callers resolve paths first ([`crate::paths::resolve`]); every function here takes
//!   an absolute path and works with the agent's root privileges (contract §2.3): the
//!   user only decides ownership ([`Owner`]) and owner/group names ([`UserDb`]).
//! * The functions are blocking; the API layer runs them in `spawn_blocking`. The parts
//!   that stream ([`watch`], [`upload::AsyncAtomicWriter`], [`download::ZipStream`])
//!   run their own blocking worker and expose an async face with bounded queues.
//! * Errors are [`FsError`]; [`FsError::class`] tells the API layer which code to use.
//!
//! [`UserDb`]: crate::sys::users::UserDb

pub mod compose;
pub mod download;
pub mod entry;
pub mod error;
pub mod metadata;
pub mod ops;
pub mod upload;
pub mod watch;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

pub use compose::{ComposeOutcome, compose};
pub use download::{
    FileDownload, ZipCompression, ZipStream, ZipSummary, open_download, open_zip_download,
    write_zip,
};
pub use entry::{EntryInfo, FileType, Timestamp, entry_info, permissions_string};
pub use error::{ErrorClass, FsError, NoSpaceKind};
pub use metadata::{Metadata, metadata_from_headers, validate_metadata};
pub use ops::{list_dir, make_dir, remove, rename, stat};
pub use upload::{AsyncAtomicWriter, AtomicWriter, CommitOptions, Uploaded};
pub use watch::{
    EventType, FsEvent, InotifyLimits, RegistryConfig, WatchOptions, WatchStream, WatcherRegistry,
    WatcherStats, raise_inotify_limits, watch_dir,
};

use crate::sys::users::User;

/// Who ends up owning what the agent creates (directories, uploaded and composed files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl From<&User> for Owner {
    fn from(u: &User) -> Self {
        Owner {
            uid: u.uid,
            gid: u.gid,
        }
    }
}

/// Mode of directories the agent creates.
pub const DIR_MODE: u32 = 0o755;
/// Mode of files the agent creates.
pub const FILE_MODE: u32 = 0o644;

/// `mkdir -p` for `path`: every missing directory is created with mode 0755 (regardless of
/// the umask) and chowned to `owner`; existing ones are left alone. Tolerates concurrent
/// creators (EEXIST on a directory is success). A component that is a file → `Io`
/// ("Not a directory"); ENOSPC → `NoSpace`.
pub(crate) fn create_dir_all_owned(path: &Path, owner: Owner) -> Result<(), FsError> {
    let mut missing = Vec::new();
    let mut cur = path;
    loop {
        match fs::metadata(cur) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(FsError::io(
                    "cannot create directory",
                    path,
                    io::Error::from_raw_os_error(libc::ENOTDIR),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(cur);
                match cur.parent() {
                    Some(p) if !p.as_os_str().is_empty() => cur = p,
                    _ => break,
                }
            }
            Err(e) => return Err(FsError::io("cannot create directory", path, e)),
        }
    }
    let mut builder = fs::DirBuilder::new();
    builder.mode(DIR_MODE);
    for dir in missing.into_iter().rev() {
        match builder.create(dir) {
            Ok(()) => {
                std::os::unix::fs::lchown(dir, Some(owner.uid), Some(owner.gid))
                    .map_err(|e| FsError::io("cannot change the owner of", dir, e))?;
                // umask-independent 0755.
                fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(|e| FsError::io("cannot set the mode of", dir, e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !fs::metadata(dir).map(|m| m.is_dir()).unwrap_or(false) {
                    return Err(FsError::io(
                        "cannot create directory",
                        dir,
                        io::Error::from_raw_os_error(libc::ENOTDIR),
                    ));
                }
            }
            Err(e) => return Err(FsError::io_write("cannot create directory", dir, e)),
        }
    }
    Ok(())
}

/// `n` random characters from `[a-z0-9]` (watcher ids, temp file names).
pub(crate) fn random_token(n: usize) -> String {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        if getrandom::fill(&mut buf).is_err() {
            // No entropy source (should not happen on Linux): fall back to a clock-seeded mix.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            for (i, b) in buf.iter_mut().enumerate() {
                let shift = (i % 16) * 8;
                *b = ((t >> shift) as u8) ^ (i as u8).wrapping_mul(97) ^ std::process::id() as u8;
            }
        }
        for b in buf {
            // 252 = 7 × 36: rejection sampling keeps the distribution uniform.
            if b < 252 && out.len() < n {
                out.push(char::from(ALPHABET[usize::from(b % 36)]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn random_tokens_are_alphanumeric() {
        let a = random_token(20);
        let b = random_token(20);
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }

    #[test]
    fn create_dir_all_owned_modes_owner_and_races() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("a/b/../c/d");
        let owner = Owner {
            uid: 4242,
            gid: 4343,
        };
        // A restrictive umask must not change the result.
        // SAFETY: umask only changes this process's file-creation mask; restored below.
        let old = unsafe { libc::umask(0o077) };
        let r = create_dir_all_owned(&target, owner);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        r.expect("mkdir -p");
        for p in ["a", "a/b", "a/c", "a/c/d"] {
            let m = fs::metadata(dir.path().join(p)).expect(p);
            assert!(m.is_dir());
            assert_eq!(m.mode() & 0o7777, 0o755, "{p}");
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{p}");
        }
        // Existing: no-op, owner untouched.
        create_dir_all_owned(&target, Owner { uid: 1, gid: 1 }).expect("again");
        assert_eq!(
            fs::metadata(dir.path().join("a/c/d")).expect("meta").uid(),
            4242
        );
        // A file in the way.
        fs::write(dir.path().join("file"), b"").expect("write");
        let e = create_dir_all_owned(&dir.path().join("file/x/y"), owner).expect_err("file");
        assert_eq!(e.class(), ErrorClass::Internal);
        assert!(e.to_string().contains("Not a directory"), "{e}");
    }
}
