//! Atomic file writes for `POST /files` and compose (contract §5.6, §5.7).
//!
//! Data goes to a hidden temporary file beside the target (`.<name>.guestd-<12>.tmp`,
//! created `O_EXCL`), which is renamed over the target on [`AtomicWriter::commit`]. Until
//! then the previous file is untouched: a client that disconnects (the writer is dropped)
//! or a full disk leaves the old content and no temporary file behind.
//!
//! Rules kept from the contract:
//! * missing parent directories are created (0755, chowned to the user);
//! * a new file gets mode 0644, an existing file keeps its permission bits; either way the
//!   result is owned by the user;
//! * the `user.e2b.*` metadata set is replaced (set on the open descriptor before the rename);
//! * ENOSPC when creating the file → "not enough inodes available…" (when the filesystem has
//!   no free inodes), while writing → "not enough disk space available…" (HTTP 507).
//!
//! Beyond the contract (because the target becomes a new inode):
//! * a symlink at the target is followed: the file it points to is replaced, the link stays;
//! * an existing FIFO, socket or device is written in place (never replaced by a file);
//! * a target that cannot be renamed over (a bind-mounted file: EBUSY/EXDEV) is rewritten
//!   in place from the completed temporary file;
//! * foreign xattrs of the old file (ACLs, SELinux labels, other `user.*`) are copied to the
//!   new one, except `user.e2b.*` (replaced) and `security.capability` (dropped);
//! * hard links to the old file keep the old content (the name gets a new inode).
//!
//! Watch events: the temporary name is filtered out by this crate's watchers
//! ([`is_temp_name`]); after the rename the writer re-asserts ownership and touches the
//! mtime through its descriptor, so watchers see `CREATE`, `CHMOD`, `WRITE` for the
//! target's own name, as they did with the reference's in-place writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::error::{FsError, NoSpaceKind};
use super::metadata::{self, Metadata};
use super::{FILE_MODE, Owner, create_dir_all_owned, random_token};

/// Bytes gathered before a `writev(2)`: few, large writes (and few WRITE watch events).
const WRITE_BUFFER: usize = 1 << 20;
/// Chunks gathered at most before a `writev(2)` (IOV_MAX is 1024).
const MAX_PENDING_CHUNKS: usize = 256;
/// Slices this big are written directly by [`AtomicWriter::write_all`].
const SMALL_WRITE: usize = 64 * 1024;
/// Batches (~1 MiB each) in flight between the async side and the blocking writer.
const CHANNEL_BATCHES: usize = 4;
/// Longest symlink chain followed at the target.
const MAX_SYMLINK_HOPS: usize = 40;

const TEMP_MARK: &[u8] = b".guestd-";
const TEMP_SUFFIX: &[u8] = b".tmp";
const TEMP_TOKEN_LEN: usize = 12;
/// `.guestd-` + token + `.tmp`
const TEMP_TAIL_LEN: usize = TEMP_MARK.len() + TEMP_TOKEN_LEN + TEMP_SUFFIX.len();
/// Longest part of the target's name kept in the temp name (NAME_MAX = 255).
const TEMP_NAME_KEEP: usize = 255 - 1 - TEMP_TAIL_LEN;

/// What [`AtomicWriter::commit`] should do besides publishing the file.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// fsync the file before the rename and its directory after it.
    pub fsync: bool,
    /// `Some`: make the file's `user.e2b.*` set exactly this (empty clears it).
    /// `None`: leave it (a replaced file starts without metadata).
    pub metadata: Option<Metadata>,
}

/// A committed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// The path written as requested.
    pub path: PathBuf,
    /// Where the data landed (differs from `path` when it was a symlink).
    pub real_path: PathBuf,
    /// Bytes written.
    pub size: u64,
    /// The file's metadata as read back after the commit.
    pub metadata: Metadata,
}

enum Mode {
    /// Write a temporary file, rename it over the target.
    Replace { tmp: PathBuf },
    /// Write the existing special file (FIFO, device, socket) in place.
    Direct,
}

/// A file being written; see the module docs. Blocking.
pub struct AtomicWriter {
    target: PathBuf,
    real: PathBuf,
    mode: Mode,
    file: File,
    /// Chunks not yet written: flushed with one `writev` once they reach [`WRITE_BUFFER`].
    pending: Vec<Bytes>,
    pending_len: usize,
    owner: Owner,
    written: u64,
    done: bool,
}

impl std::fmt::Debug for AtomicWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicWriter")
            .field("target", &self.target)
            .field("real", &self.real)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// What is at the target (after following symlinks).
enum Existing {
    None,
    Regular(fs::Metadata),
    Special,
}

impl AtomicWriter {
    /// Prepares writing `target` for `owner`: creates missing parents, then the temporary
    /// file. `target` is a directory → `IsADirectory` "path is a directory: …".
    pub fn create(target: &Path, owner: Owner) -> Result<Self, FsError> {
        if target.file_name().is_none() || target.as_os_str().as_bytes().ends_with(b"/") {
            return Err(match fs::metadata(target) {
                Ok(m) if m.is_dir() => FsError::is_a_directory(target),
                _ => FsError::InvalidArgument(format!(
                    "invalid file path (it must name a file): {}",
                    target.display()
                )),
            });
        }
        if let Some(parent) = target.parent()
            && !parent.as_os_str().is_empty()
        {
            create_dir_all_owned(parent, owner)?;
        }
        let (real, existing) = resolve_target(target)?;
        if real != target
            && let Some(parent) = real.parent()
            && !parent.as_os_str().is_empty()
        {
            create_dir_all_owned(parent, owner)?;
        }
        match existing {
            Existing::Special => {
                let file = open_special(&real)?;
                Ok(AtomicWriter {
                    target: target.to_path_buf(),
                    real,
                    mode: Mode::Direct,
                    file,
                    pending: Vec::new(),
                    pending_len: 0,
                    owner,
                    written: 0,
                    done: false,
                })
            }
            Existing::None => Self::with_temp(target, real, owner, None),
            Existing::Regular(old) => Self::with_temp(target, real, owner, Some(old)),
        }
    }

    fn with_temp(
        target: &Path,
        real: PathBuf,
        owner: Owner,
        old: Option<fs::Metadata>,
    ) -> Result<Self, FsError> {
        let dir = match real.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = real.file_name().unwrap_or_default();
        let mut attempt = 0;
        let (tmp, file) = loop {
            let tmp = dir.join(temp_name(name.as_bytes()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 3 => {
                    attempt += 1;
                }
                Err(e) => return Err(create_error(&dir, &real, e)),
            }
        };
        // From here on, dropping `writer` removes the temporary file.
        let writer = AtomicWriter {
            target: target.to_path_buf(),
            real,
            mode: Mode::Replace { tmp },
            file,
            pending: Vec::new(),
            pending_len: 0,
            owner,
            written: 0,
            done: false,
        };
        let f = &writer.file;
        std::os::unix::fs::fchown(f, Some(owner.uid), Some(owner.gid))
            .map_err(|e| FsError::io("cannot change the owner of", &writer.real, e))?;
        // After the chown (which may clear setuid bits): the final permission bits.
        let mode = old.as_ref().map_or(FILE_MODE, |m| m.mode() & 0o777);
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| FsError::io("cannot set the mode of", &writer.real, e))?;
        if old.is_some() {
            metadata::copy_foreign_xattrs(&writer.real, f);
        }
        Ok(writer)
    }

    /// The path being written, as requested.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data` (copied). ENOSPC/EDQUOT → `NoSpace`.
    pub fn write_all(&mut self, data: &[u8]) -> Result<(), FsError> {
        if data.len() >= SMALL_WRITE {
            self.flush_pending()?;
            self.file
                .write_all(data)
                .map_err(|e| FsError::io_write("cannot write", &self.real, e))?;
            self.written += data.len() as u64;
            Ok(())
        } else {
            self.write_bytes(Bytes::copy_from_slice(data))
        }
    }

    /// Appends `chunk` without copying it: chunks are gathered and written with one
    /// `writev(2)` per [`WRITE_BUFFER`] bytes (few syscalls, few WRITE watch events).
    pub fn write_bytes(&mut self, chunk: Bytes) -> Result<(), FsError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.written += chunk.len() as u64;
        self.pending_len += chunk.len();
        self.pending.push(chunk);
        if self.pending_len >= WRITE_BUFFER || self.pending.len() >= MAX_PENDING_CHUNKS {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), FsError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut slices: Vec<IoSlice<'_>> = self.pending.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.file.write_vectored(rest) {
                Ok(0) => {
                    return Err(FsError::io_write(
                        "cannot write",
                        &self.real,
                        io::ErrorKind::WriteZero.into(),
                    ));
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FsError::io_write("cannot write", &self.real, e)),
            }
        }
        self.pending.clear();
        self.pending_len = 0;
        Ok(())
    }

    /// Appends everything `reader` yields. A read error is reported as `Io` with op
    /// "cannot read the data for".
    pub fn write_from(&mut self, reader: &mut dyn Read) -> Result<u64, FsError> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FsError::io("cannot read the data for", &self.real, e)),
            };
            self.write_all(&buf[..n])?;
            total += n as u64;
        }
    }

    /// Appends the content of `src` (in-kernel copy where the filesystem allows it).
    pub fn append_file(&mut self, src: &Path) -> Result<u64, FsError> {
        let mut f = File::open(src).map_err(|e| FsError::io("cannot open", src, e))?;
        self.flush_pending()?;
        let n = io::copy(&mut f, &mut self.file).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                FsError::io_write("cannot write", &self.real, e)
            }
            _ => FsError::io("cannot copy data into", &self.real, e),
        })?;
        self.written += n;
        Ok(n)
    }

    /// Publishes the file: metadata on the descriptor, optional fsync, rename over the
    /// target (fsync of the directory when asked). On error the old file is untouched and
    /// the temporary file removed.
    pub fn commit(mut self, opts: CommitOptions) -> Result<Uploaded, FsError> {
        self.flush_pending()?;
        if let Some(md) = &opts.metadata {
            metadata::replace_fd(&self.file, &self.real, md)?;
        }
        if opts.fsync {
            self.file
                .sync_all()
                .map_err(|e| FsError::io_write("cannot sync", &self.real, e))?;
        }
        if let Mode::Replace { tmp } = &self.mode {
            match fs::rename(tmp, &self.real) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EXDEV)) => {
                    self.rewrite_in_place(tmp, &opts)?;
                }
                Err(e) => return Err(FsError::io_write("cannot replace", &self.real, e)),
            }
            self.done = true;
            if opts.fsync {
                sync_parent(&self.real)?;
            }
            let f = &self.file;
            // Watch compatibility: CHMOD then WRITE under the target's own name.
            if let Err(e) = std::os::unix::fs::fchown(f, Some(self.owner.uid), Some(self.owner.gid))
            {
                tracing::debug!(path = %self.real.display(), error = %e, "cannot re-chown");
            }
            if let Err(e) = nix::sys::stat::futimens(
                f,
                &nix::sys::time::TimeSpec::UTIME_OMIT,
                &nix::sys::time::TimeSpec::UTIME_NOW,
            ) {
                tracing::debug!(path = %self.real.display(), error = %e, "cannot touch mtime");
            }
        }
        self.done = true;
        Ok(Uploaded {
            path: self.target.clone(),
            real_path: self.real.clone(),
            size: self.written,
            metadata: metadata::read_fd(&self.file),
        })
    }

    /// Fallback when the target cannot be replaced (a bind-mounted file): copy the finished
    /// temporary file into the target, then remove the temporary file.
    fn rewrite_in_place(&self, tmp: &Path, opts: &CommitOptions) -> Result<(), FsError> {
        let result = (|| {
            let mut src = File::open(tmp).map_err(|e| FsError::io("cannot open", tmp, e))?;
            let mut dst = OpenOptions::new()
                .write(true)
                .truncate(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&self.real)
                .map_err(|e| FsError::io("cannot open", &self.real, e))?;
            std::os::unix::fs::fchown(&dst, Some(self.owner.uid), Some(self.owner.gid))
                .map_err(|e| FsError::io("cannot change the owner of", &self.real, e))?;
            io::copy(&mut src, &mut dst)
                .map_err(|e| FsError::io_write("cannot write", &self.real, e))?;
            if let Some(md) = &opts.metadata {
                metadata::replace_fd(&dst, &self.real, md)?;
            }
            if opts.fsync {
                dst.sync_all()
                    .map_err(|e| FsError::io_write("cannot sync", &self.real, e))?;
            }
            Ok(())
        })();
        let _ = fs::remove_file(tmp);
        result
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if !self.done
            && let Mode::Replace { tmp } = &self.mode
            && let Err(e) = fs::remove_file(tmp)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %tmp.display(), error = %e, "cannot remove temporary upload file");
        }
    }
}

/// Follows symlinks at `target` (up to 40) to the path that will be written, and says what
/// is there. A directory → `IsADirectory` (named by the requested path).
fn resolve_target(target: &Path) -> Result<(PathBuf, Existing), FsError> {
    let mut cur = target.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        let meta = match fs::symlink_metadata(&cur) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Ok((cur, Existing::None));
            }
            Err(e) => return Err(FsError::io("cannot stat", &cur, e)),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            let link = fs::read_link(&cur).map_err(|e| FsError::io("cannot read link", &cur, e))?;
            cur = if link.is_absolute() {
                link
            } else {
                cur.parent().unwrap_or(Path::new("/")).join(link)
            };
            continue;
        }
        if ft.is_dir() {
            return Err(FsError::is_a_directory(target));
        }
        if ft.is_file() {
            return Ok((cur, Existing::Regular(meta)));
        }
        return Ok((cur, Existing::Special));
    }
    Err(FsError::SymlinkLoop {
        path: target.to_path_buf(),
    })
}

fn open_special(path: &Path) -> Result<File, FsError> {
    // O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of hanging the worker.
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => FsError::InvalidArgument(format!(
                "cannot write to {}: it is a FIFO without a reader (or a socket)",
                path.display()
            )),
            _ => FsError::io("cannot open", path, e),
        })?;
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| FsError::io("cannot open", path, e.into()))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| FsError::io("cannot open", path, e.into()))?;
    Ok(file)
}

/// Maps a failure to create the temporary file in `dir` for `real`.
fn create_error(dir: &Path, real: &Path, e: io::Error) -> FsError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            let no_inodes = nix::sys::statvfs::statvfs(dir)
                .map(|s| s.files_available() == 0 || s.files_free() == 0)
                .unwrap_or(true);
            if no_inodes {
                FsError::no_space(
                    NoSpaceKind::Inodes,
                    format!(
                        "not enough inodes available to create {} (no free inodes in {}): {e}",
                        real.display(),
                        dir.display()
                    ),
                )
            } else {
                FsError::io_write("cannot create", real, e)
            }
        }
        Some(libc::EDQUOT) => FsError::io_write("cannot create", real, e),
        _ => FsError::io("cannot create a temporary file for", real, e),
    }
}

fn sync_parent(path: &Path) -> Result<(), FsError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let d = File::open(dir).map_err(|e| FsError::io("cannot open", dir, e))?;
    d.sync_all()
        .map_err(|e| FsError::io_write("cannot sync", dir, e))
}

/// `.<name>.guestd-<12 random [a-z0-9]>.tmp`, the name cut to fit NAME_MAX.
fn temp_name(name: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let keep = &name[..name.len().min(TEMP_NAME_KEEP)];
    let mut out = Vec::with_capacity(1 + keep.len() + TEMP_TAIL_LEN);
    out.push(b'.');
    out.extend_from_slice(keep);
    out.extend_from_slice(TEMP_MARK);
    out.extend_from_slice(random_token(TEMP_TOKEN_LEN).as_bytes());
    out.extend_from_slice(TEMP_SUFFIX);
    std::ffi::OsString::from_vec(out)
}

/// True for the names of this module's temporary files (watchers hide their events).
pub fn is_temp_name(name: &[u8]) -> bool {
    let n = name.len();
    if n < 1 + TEMP_TAIL_LEN || name[0] != b'.' || !name.ends_with(TEMP_SUFFIX) {
        return false;
    }
    let tail = &name[n - TEMP_TAIL_LEN..];
    tail.starts_with(TEMP_MARK)
        && tail[TEMP_MARK.len()..TEMP_MARK.len() + TEMP_TOKEN_LEN]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

enum Msg {
    Data(Vec<Bytes>),
    Commit(CommitOptions, oneshot::Sender<Result<Uploaded, FsError>>),
}

/// [`AtomicWriter`] driven from async code: chunks go through a bounded channel to one
/// blocking worker (memory stays flat whatever the file size). Dropping it without
/// [`commit`](Self::commit) discards the upload (the temporary file is removed).
pub struct AsyncAtomicWriter {
    tx: Option<mpsc::Sender<Msg>>,
    /// Chunks gathered on the async side, handed over ~1 MiB at a time (one wake-up of
    /// the worker per batch instead of per chunk).
    batch: Vec<Bytes>,
    batch_len: usize,
    worker: Option<tokio::task::JoinHandle<Result<(), FsError>>>,
    failed: Option<FsError>,
}

impl std::fmt::Debug for AsyncAtomicWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncAtomicWriter")
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl AsyncAtomicWriter {
    /// [`AtomicWriter::create`] in a blocking task, then starts the writer worker.
    pub async fn create(target: PathBuf, owner: Owner) -> Result<Self, FsError> {
        let writer = tokio::task::spawn_blocking(move || AtomicWriter::create(&target, owner))
            .await
            .map_err(join_error)??;
        let (tx, mut rx) = mpsc::channel::<Msg>(CHANNEL_BATCHES);
        let worker = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            while let Some(msg) = rx.blocking_recv() {
                match msg {
                    Msg::Data(chunks) => {
                        for chunk in chunks {
                            writer.write_bytes(chunk)?;
                        }
                    }
                    Msg::Commit(opts, reply) => {
                        let _ = reply.send(writer.commit(opts));
                        return Ok(());
                    }
                }
            }
            // The sender went away without a commit: `writer` drops, the temp file goes.
            Ok(())
        });
        Ok(AsyncAtomicWriter {
            tx: Some(tx),
            batch: Vec::new(),
            batch_len: 0,
            worker: Some(worker),
            failed: None,
        })
    }

    /// Queues `chunk` (waits while the worker is behind). Returns the worker's error once
    /// it has failed (e.g. `NoSpace`); every later call returns it again.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), FsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        if self.batch_len >= WRITE_BUFFER || self.batch.len() >= MAX_PENDING_CHUNKS {
            self.send_batch().await?;
        }
        Ok(())
    }

    async fn send_batch(&mut self) -> Result<(), FsError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        let Some(tx) = &self.tx else {
            return Err(self.worker_gone().await);
        };
        if tx.send(Msg::Data(batch)).await.is_err() {
            return Err(self.worker_gone().await);
        }
        Ok(())
    }

    /// Flushes, applies `opts` and publishes the file.
    pub async fn commit(mut self, opts: CommitOptions) -> Result<Uploaded, FsError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.send_batch().await?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let Some(tx) = self.tx.take() else {
            return Err(self.worker_gone().await);
        };
        if tx.send(Msg::Commit(opts, reply_tx)).await.is_err() {
            return Err(self.worker_gone().await);
        }
        match reply_rx.await {
            Ok(result) => result,
            Err(_) => Err(self.worker_gone().await),
        }
    }

    async fn worker_gone(&mut self) -> FsError {
        self.tx = None;
        let err = match self.worker.take() {
            Some(handle) => match handle.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => FsError::Io {
                    op: "cannot write",
                    path: PathBuf::new(),
                    source: std::sync::Arc::new(io::Error::other("upload writer already finished")),
                },
                Err(e) => join_error(e),
            },
            None => self.failed.clone().unwrap_or_else(|| FsError::Io {
                op: "cannot write",
                path: PathBuf::new(),
                source: std::sync::Arc::new(io::Error::other("upload writer already finished")),
            }),
        };
        self.failed = Some(err.clone());
        err
    }
}

pub(crate) fn join_error(e: tokio::task::JoinError) -> FsError {
    FsError::Io {
        op: "blocking filesystem task failed for",
        path: PathBuf::new(),
        source: std::sync::Arc::new(io::Error::other(e.to_string())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::filesystem::error::ErrorClass;
    use std::os::unix::fs::symlink;

    const OWNER: Owner = Owner {
        uid: 4242,
        gid: 4343,
    };

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn write_file(target: &Path, data: &[u8], opts: CommitOptions) -> Result<Uploaded, FsError> {
        let mut w = AtomicWriter::create(target, OWNER)?;
        w.write_all(data)?;
        w.commit(opts)
    }

    #[test]
    fn temp_names() {
        let t = temp_name(b"report.csv");
        let b = t.as_bytes();
        assert!(b.starts_with(b".report.csv.guestd-"));
        assert!(is_temp_name(b));
        assert!(!is_temp_name(b"report.csv"));
        assert!(!is_temp_name(b".report.csv.guestd-ABCDEFGHIJKL.tmp"));
        assert!(!is_temp_name(b".x.tmp"));
        let long = vec![b'n'; 255];
        let t = temp_name(&long);
        assert_eq!(t.len(), 255);
        assert!(is_temp_name(t.as_bytes()));
    }

    #[test]
    fn new_file_is_0644_owned_by_user_with_parents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("p/q/new.txt");
        let up = write_file(&target, b"hello", CommitOptions::default()).expect("upload");
        assert_eq!(up.path, target);
        assert_eq!(up.size, 5);
        let m = fs::metadata(&target).expect("meta");
        assert_eq!(m.mode() & 0o7777, 0o644);
        assert_eq!((m.uid(), m.gid()), (4242, 4343));
        assert_eq!(fs::read(&target).expect("read"), b"hello");
        let p = fs::metadata(dir.path().join("p/q")).expect("parent");
        assert_eq!(p.mode() & 0o7777, 0o755);
        assert_eq!(p.uid(), 4242);
        assert_eq!(dir_names(&dir.path().join("p/q")), ["new.txt"]);
    }

    #[test]
    fn overwrite_keeps_mode_changes_owner_and_follows_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("f.sh");
        fs::write(&target, b"old content that is longer").expect("write");
        fs::set_permissions(&target, fs::Permissions::from_mode(0o4750)).expect("chmod");
        xattr::set(&target, "user.foreign", b"kept").expect("xattr");
        xattr::set(&target, "user.e2b.old", b"gone").expect("xattr");
        write_file(&target, b"new", CommitOptions::default()).expect("upload");
        let m = fs::metadata(&target).expect("meta");
        assert_eq!(
            m.mode() & 0o7777,
            0o750,
            "permission bits kept, setuid dropped"
        );
        assert_eq!(m.uid(), 4242);
        assert_eq!(fs::read(&target).expect("read"), b"new");
        assert_eq!(
            xattr::get(&target, "user.foreign").expect("get").as_deref(),
            Some(&b"kept"[..])
        );
        assert_eq!(xattr::get(&target, "user.e2b.old").expect("get"), None);

        let link = dir.path().join("link");
        symlink("f.sh", &link).expect("symlink");
        let up = write_file(&link, b"via link", CommitOptions::default()).expect("upload");
        assert_eq!(up.real_path, target);
        assert!(
            fs::symlink_metadata(&link)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&target).expect("read"), b"via link");

        let dangling = dir.path().join("dangling");
        symlink("made/by/upload.txt", &dangling).expect("symlink");
        write_file(&dangling, b"d", CommitOptions::default()).expect("upload");
        assert_eq!(
            fs::read(dir.path().join("made/by/upload.txt")).expect("read"),
            b"d"
        );
    }

    #[test]
    fn drop_without_commit_keeps_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("keep.txt");
        fs::write(&target, b"previous").expect("write");
        {
            let mut w = AtomicWriter::create(&target, OWNER).expect("create");
            w.write_all(&vec![7u8; 3 << 20]).expect("write");
            assert_eq!(
                dir_names(dir.path()).len(),
                2,
                "temp file exists while writing"
            );
        }
        assert_eq!(fs::read(&target).expect("read"), b"previous");
        assert_eq!(dir_names(dir.path()), ["keep.txt"]);

        // A new file that is never committed does not appear at all.
        let fresh = dir.path().join("fresh.txt");
        drop(AtomicWriter::create(&fresh, OWNER).expect("create"));
        assert_eq!(dir_names(dir.path()), ["keep.txt"]);
    }

    #[test]
    fn metadata_replace_semantics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("m.txt");
        let mut md = Metadata::new();
        md.insert("a".into(), "1".into());
        md.insert("b".into(), "2".into());
        let up = write_file(
            &target,
            b"x",
            CommitOptions {
                fsync: true,
                metadata: Some(md.clone()),
            },
        )
        .expect("upload");
        assert_eq!(up.metadata, md);
        let mut md2 = Metadata::new();
        md2.insert("c".into(), "3".into());
        let up = write_file(
            &target,
            b"y",
            CommitOptions {
                fsync: false,
                metadata: Some(md2.clone()),
            },
        )
        .expect("upload");
        assert_eq!(up.metadata, md2);
        assert_eq!(metadata::read_path(&target, false), md2);
        let up = write_file(
            &target,
            b"z",
            CommitOptions {
                fsync: false,
                metadata: Some(Metadata::new()),
            },
        )
        .expect("upload");
        assert!(up.metadata.is_empty());
    }

    #[test]
    fn directory_and_file_parent_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("d");
        fs::create_dir(&d).expect("mkdir");
        let e = AtomicWriter::create(&d, OWNER).expect_err("dir");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        assert_eq!(
            e.to_string(),
            format!("path is a directory: {}", d.display())
        );
        let e =
            AtomicWriter::create(Path::new(&format!("{}/", d.display())), OWNER).expect_err("dir/");
        assert!(matches!(e, FsError::IsADirectory(_)));
        let f = dir.path().join("f");
        fs::write(&f, b"").expect("write");
        let e = AtomicWriter::create(&f.join("x.txt"), OWNER).expect_err("parent is file");
        assert_eq!(e.class(), ErrorClass::Internal);
    }

    #[test]
    fn special_files_are_written_in_place() {
        let up = write_file(Path::new("/dev/null"), b"discard", CommitOptions::default())
            .expect("dev null");
        assert_eq!(up.size, 7);
        let m = fs::metadata("/dev/null").expect("meta");
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &m.file_type()
        ));
        assert_eq!(m.uid(), 0, "devices are not chowned");
    }

    #[test]
    fn compose_style_append_and_write_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        fs::write(&a, b"AAA").expect("write");
        let target = dir.path().join("out");
        let mut w = AtomicWriter::create(&target, OWNER).expect("create");
        w.write_all(b"<").expect("write");
        w.append_file(&a).expect("append");
        w.write_from(&mut &b"BB"[..]).expect("write_from");
        w.append_file(&a).expect("append");
        assert_eq!(w.written(), 9);
        w.commit(CommitOptions::default()).expect("commit");
        assert_eq!(fs::read(&target).expect("read"), b"<AAABBAAA");
    }

    #[tokio::test]
    async fn async_writer_commit_and_disconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("async.bin");
        let mut w = AsyncAtomicWriter::create(target.clone(), OWNER)
            .await
            .expect("create");
        let chunk = Bytes::from(vec![1u8; 64 * 1024]);
        for _ in 0..64 {
            w.write(chunk.clone()).await.expect("write");
        }
        let up = w.commit(CommitOptions::default()).await.expect("commit");
        assert_eq!(up.size, 64 * 64 * 1024);
        assert_eq!(fs::metadata(&target).expect("meta").len(), 4 << 20);

        // Disconnect: dropped mid-way, the old content survives, no temp file.
        let mut w = AsyncAtomicWriter::create(target.clone(), OWNER)
            .await
            .expect("create");
        w.write(Bytes::from_static(b"partial"))
            .await
            .expect("write");
        drop(w);
        // The worker removes the temp file when it sees the closed channel.
        for _ in 0..100 {
            if dir_names(dir.path()).len() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(dir_names(dir.path()), ["async.bin"]);
        assert_eq!(fs::metadata(&target).expect("meta").len(), 4 << 20);
    }

    /// A tiny tmpfs mounted for one test; unmounted (lazily) on drop.
    pub(crate) struct TinyTmpfs {
        pub dir: tempfile::TempDir,
    }

    impl TinyTmpfs {
        pub(crate) fn mount(options: &str) -> Option<Self> {
            let dir = tempfile::tempdir().ok()?;
            match nix::mount::mount(
                Some("tmpfs"),
                dir.path(),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(options),
            ) {
                Ok(()) => Some(TinyTmpfs { dir }),
                Err(e) => {
                    eprintln!("skipping: cannot mount tmpfs ({e})");
                    None
                }
            }
        }
        pub(crate) fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for TinyTmpfs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn disk_full_is_no_space_and_keeps_old_file() {
        let Some(fs_) = TinyTmpfs::mount("size=64k,mode=755") else {
            return;
        };
        let target = fs_.path().join("big.bin");
        fs::write(&target, b"old").expect("write");
        let mut w = AtomicWriter::create(&target, OWNER).expect("create");
        let chunk = vec![0u8; 16 * 1024];
        let mut err = None;
        for _ in 0..64 {
            if let Err(e) = w.write_all(&chunk) {
                err = Some(e);
                break;
            }
        }
        let err = match err {
            Some(e) => {
                drop(w);
                e
            }
            // Everything fit in the buffer: the flush at commit fails.
            None => w
                .commit(CommitOptions::default())
                .expect_err("must not fit"),
        };
        assert_eq!(err.class(), ErrorClass::InsufficientStorage, "{err}");
        assert!(matches!(
            err,
            FsError::NoSpace {
                kind: NoSpaceKind::Space,
                ..
            }
        ));
        assert!(
            err.to_string()
                .starts_with("not enough disk space available"),
            "{err}"
        );
        assert_eq!(dir_names(fs_.path()), ["big.bin"], "no temp file left");
        assert_eq!(fs::read(&target).expect("read"), b"old");
    }

    #[tokio::test]
    async fn async_writer_reports_disk_full_at_write_or_commit() {
        let Some(fs_) = TinyTmpfs::mount("size=64k,mode=755") else {
            return;
        };
        let target = fs_.path().join("x.bin");
        let mut w = AsyncAtomicWriter::create(target.clone(), OWNER)
            .await
            .expect("create");
        let chunk = Bytes::from(vec![9u8; 16 * 1024]);
        let mut err = None;
        for _ in 0..128 {
            if let Err(e) = w.write(chunk.clone()).await {
                err = Some(e);
                break;
            }
        }
        let err = match err {
            Some(e) => {
                // Every later call reports the same failure.
                let again = w.write(chunk.clone()).await.expect_err("still failed");
                assert_eq!(again.to_string(), e.to_string());
                drop(w);
                e
            }
            None => w
                .commit(CommitOptions::default())
                .await
                .expect_err("must not fit"),
        };
        assert_eq!(err.class(), ErrorClass::InsufficientStorage, "{err}");
        for _ in 0..100 {
            if dir_names(fs_.path()).is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(dir_names(fs_.path()).is_empty(), "no temp file left");
    }

    #[test]
    fn no_inodes_is_no_space_inodes() {
        let Some(fs_) = TinyTmpfs::mount("size=1m,nr_inodes=4,mode=755") else {
            return;
        };
        let mut made = 0;
        let err = loop {
            let p = fs_.path().join(format!("f{made}"));
            match write_file(&p, b"x", CommitOptions::default()) {
                Ok(_) => made += 1,
                Err(e) => break e,
            }
            assert!(made < 10, "inode limit not hit");
        };
        assert!(
            matches!(
                err,
                FsError::NoSpace {
                    kind: NoSpaceKind::Inodes,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("not enough inodes available"),
            "{err}"
        );
    }

    /// Throughput of the upload path against a plain file write of the same chunks.
    /// Run with `cargo test --release --lib upload_throughput -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn upload_throughput() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
        let total: usize = 1 << 30;
        let n = total / chunk.len();

        let mut base = std::time::Duration::MAX;
        let mut ours = std::time::Duration::MAX;
        for _ in 0..3 {
            let plain = dir.path().join("plain");
            let t = std::time::Instant::now();
            {
                let mut f = File::create(&plain).expect("create");
                for _ in 0..n {
                    f.write_all(&chunk).expect("write");
                }
                f.flush().expect("flush");
            }
            base = base.min(t.elapsed());
            fs::remove_file(&plain).expect("rm");

            let target = dir.path().join("upload");
            let t = std::time::Instant::now();
            let mut w = AsyncAtomicWriter::create(target.clone(), OWNER)
                .await
                .expect("create");
            for _ in 0..n {
                w.write(chunk.clone()).await.expect("write");
            }
            w.commit(CommitOptions::default()).await.expect("commit");
            ours = ours.min(t.elapsed());
            fs::remove_file(&target).expect("rm");
        }
        let mib = (total >> 20) as f64;
        eprintln!(
            "plain write: {:.0} MiB/s; AsyncAtomicWriter: {:.0} MiB/s (ratio {:.2})",
            mib / base.as_secs_f64(),
            mib / ours.as_secs_f64(),
            ours.as_secs_f64() / base.as_secs_f64()
        );
    }
}
