//! `GET /files` (contract §5.5): opening a file for streaming, and (opt-in) a directory as
//! one zip archive produced while walking the tree.
//!
//! Encoding, `Range`, conditional requests and the content type are the API layer's job;
//! it gets an open [`File`] with its size and mtime here.
//!
//! Zip archives ([`write_zip`], [`open_zip_download`]):
//! * streamed: written to a non-seekable sink (data descriptors), in ~64 KiB chunks through
//!   a bounded channel, no temporary file; memory does not grow with file sizes (the zip
//!   format's central directory at the end costs ~100 bytes per entry);
//! * entries relative to the directory, in ListDir order (pre-order, byte-wise sorted),
//!   directories as `name/` entries, Unix permission bits and mtimes kept;
//! * symlinks are stored as symlinks (their link text, like `zip -y`), never followed:
//!   no loops, no duplicated trees, nothing from outside the directory;
//! * FIFOs, sockets and devices are skipped, as are entries that vanish during the walk;
//! * files of 2 GiB or more are written as ZIP64 entries.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::mpsc;
use zip::write::{FileOptions, ZipWriter};
use zip::{CompressionMethod, DateTime, System};

use super::entry::is_special;
use super::error::{FsError, is_missing};
use super::upload::join_error;

/// A regular file opened for download.
#[derive(Debug)]
pub struct FileDownload {
    pub file: File,
    pub size: u64,
    pub modified: Option<SystemTime>,
    pub path: PathBuf,
}

/// Opens `path` (symlinks followed) for reading. Missing → `NotFound` "path '…' does not
/// exist"; a directory → `IsADirectory` "path '…' is a directory"; FIFOs, sockets and
/// devices → `InvalidArgument` (they would block or never end).
pub fn open_download(path: &Path) -> Result<FileDownload, FsError> {
    let meta = fs::metadata(path).map_err(|e| missing_or(path, e))?;
    if meta.is_dir() {
        return Err(FsError::IsADirectory(format!(
            "path '{}' is a directory",
            path.display()
        )));
    }
    if is_special(&meta) {
        return Err(not_regular(path));
    }
    // O_NONBLOCK: if the entry was swapped for a FIFO meanwhile, open does not hang.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| missing_or(path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| FsError::io("cannot stat", path, e))?;
    if !meta.is_file() {
        return Err(if meta.is_dir() {
            FsError::IsADirectory(format!("path '{}' is a directory", path.display()))
        } else {
            not_regular(path)
        });
    }
    Ok(FileDownload {
        size: meta.len(),
        modified: meta.modified().ok(),
        file,
        path: path.to_path_buf(),
    })
}

fn missing_or(path: &Path, e: io::Error) -> FsError {
    if is_missing(&e) {
        FsError::NotFound(format!("path '{}' does not exist", path.display()))
    } else {
        FsError::io("cannot open", path, e)
    }
}

fn not_regular(path: &Path) -> FsError {
    FsError::InvalidArgument(format!(
        "path '{}' is not a regular file (FIFO, socket or device)",
        path.display()
    ))
}

/// How archive entries are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ZipCompression {
    /// No compression (fastest; for already-compressed content).
    Stored,
    /// Deflate at level 1: most of the gain of deflate at a fraction of the CPU.
    #[default]
    Deflated,
}

/// What went into an archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZipSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Special files and entries that vanished during the walk.
    pub skipped: u64,
    /// Uncompressed bytes of file content.
    pub bytes: u64,
}

/// Files this big or bigger get ZIP64 headers (with room for growth during the read).
const LARGE_FILE: u64 = 1 << 31;
/// Bytes per chunk sent to the stream.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight between the archiver and the stream.
const CHANNEL_CHUNKS: usize = 8;

/// Writes the directory `dir` (symlink followed for the root only) as a zip archive to
/// `out`, which need not be seekable. Blocking.
pub fn write_zip<W: Write>(
    dir: &Path,
    out: W,
    compression: ZipCompression,
) -> Result<ZipSummary, FsError> {
    check_dir(dir)?;
    let mut zip = ZipWriter::new_stream(out).set_auto_large_file();
    let mut summary = ZipSummary::default();
    // Pre-order walk with an explicit stack of (real path, name in the archive).
    let mut stack: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    push_children(dir, &[], &mut stack, true)?;
    let mut buf = vec![0u8; CHUNK];
    while let Some((path, name)) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if is_missing(&e) => {
                summary.skipped += 1;
                continue;
            }
            Err(e) => return Err(FsError::io("cannot stat", &path, e)),
        };
        let ft = meta.file_type();
        let base = FileOptions::<()>::default()
            .system(System::Unix)
            .last_modified_time(zip_time(meta.mtime()));
        if ft.is_dir() {
            // The crate takes directory names as strings only (non-UTF-8 bytes are
            // replaced here; the files inside keep their raw names).
            let opts =
                base.external_attributes(((libc::S_IFDIR | (meta.mode() & 0o777)) << 16) | 0x10);
            zip.add_directory(String::from_utf8_lossy(&name), opts)
                .map_err(|e| zip_error(&path, e))?;
            summary.dirs += 1;
            push_children(&path, &name, &mut stack, false)?;
        } else if ft.is_symlink() {
            let target = match fs::read_link(&path) {
                Ok(t) => t,
                Err(e) if is_missing(&e) => {
                    summary.skipped += 1;
                    continue;
                }
                Err(e) => return Err(FsError::io("cannot read link", &path, e)),
            };
            let opts = base
                .compression_method(CompressionMethod::Stored)
                .external_attributes((libc::S_IFLNK | 0o777) << 16)
                .name(&name);
            zip.start_file_with_options(opts)
                .map_err(|e| zip_error(&path, e))?;
            zip.write_all(target.as_os_str().as_bytes())
                .map_err(|e| write_error(&path, e))?;
            summary.symlinks += 1;
        } else if ft.is_file() {
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if is_missing(&e) => {
                    summary.skipped += 1;
                    continue;
                }
                Err(e) => return Err(FsError::io("cannot open", &path, e)),
            };
            let (method, level) = match compression {
                ZipCompression::Stored => (CompressionMethod::Stored, None),
                ZipCompression::Deflated => (CompressionMethod::Deflated, Some(1)),
            };
            let opts = base
                .compression_method(method)
                .compression_level(level)
                .large_file(meta.len() >= LARGE_FILE)
                .external_attributes((libc::S_IFREG | (meta.mode() & 0o777)) << 16)
                .name(&name);
            zip.start_file_with_options(opts)
                .map_err(|e| zip_error(&path, e))?;
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(FsError::io("cannot read", &path, e)),
                };
                zip.write_all(&buf[..n])
                    .map_err(|e| write_error(&path, e))?;
                summary.bytes += n as u64;
            }
            summary.files += 1;
        } else {
            summary.skipped += 1;
        }
    }
    let stream = zip.finish().map_err(|e| zip_error(dir, e))?;
    let mut out = stream.into_inner();
    out.flush().map_err(|e| write_error(dir, e))?;
    Ok(summary)
}

fn check_dir(dir: &Path) -> Result<(), FsError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FsError::NotADirectory(format!(
            "path '{}' is not a directory",
            dir.display()
        ))),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(FsError::SymlinkLoop {
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(missing_or(dir, e)),
    }
}

fn push_children(
    dir: &Path,
    prefix: &[u8],
    stack: &mut Vec<(PathBuf, Vec<u8>)>,
    is_root: bool,
) -> Result<(), FsError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if !is_root && is_missing(&e) => return Ok(()),
        Err(e) => return Err(FsError::io("cannot list directory", dir, e)),
    };
    let mut names: Vec<OsString> = Vec::new();
    for ent in rd {
        match ent {
            Ok(ent) => names.push(ent.file_name()),
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(FsError::io("cannot list directory", dir, e)),
        }
    }
    names.sort_unstable();
    for n in names.into_iter().rev() {
        let mut name = Vec::with_capacity(prefix.len() + 1 + n.len());
        if !prefix.is_empty() {
            name.extend_from_slice(prefix);
            name.push(b'/');
        }
        name.extend_from_slice(n.as_bytes());
        stack.push((dir.join(&n), name));
    }
    Ok(())
}

fn zip_error(path: &Path, e: zip::result::ZipError) -> FsError {
    match e {
        zip::result::ZipError::Io(e) => write_error(path, e),
        other => FsError::io("cannot archive", path, io::Error::other(other.to_string())),
    }
}

fn write_error(path: &Path, e: io::Error) -> FsError {
    FsError::io("cannot write the archive entry for", path, e)
}

/// Unix seconds → a zip (DOS) timestamp in UTC, clamped to the format's 1980–2107 range.
fn zip_time(secs: i64) -> DateTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days → civil date.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if year < 1980 {
        return DateTime::default();
    }
    if year > 2107 {
        return DateTime::from_date_and_time(2107, 12, 31, 23, 59, 58).unwrap_or_default();
    }
    let to_u8 = |v: i64| u8::try_from(v).unwrap_or(0);
    DateTime::from_date_and_time(
        u16::try_from(year).unwrap_or(1980),
        to_u8(month),
        to_u8(day),
        to_u8(rem / 3600),
        to_u8(rem % 3600 / 60),
        to_u8(rem % 60),
    )
    .unwrap_or_default()
}

/// Sends what the archiver writes as `Bytes` chunks through a bounded channel.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, FsError>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "download cancelled"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

/// A zip archive of a directory as a stream of byte chunks. An `Err` item is final: the
/// archive is incomplete and the API layer should abort the response (not end it cleanly).
/// Dropping the stream stops the archiver.
#[derive(Debug)]
pub struct ZipStream {
    rx: mpsc::Receiver<Result<Bytes, FsError>>,
}

impl ZipStream {
    pub async fn recv(&mut self) -> Option<Result<Bytes, FsError>> {
        self.rx.recv().await
    }
}

impl futures_util::Stream for ZipStream {
    type Item = Result<Bytes, FsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

/// Validates `dir` (missing → `NotFound`, not a directory → `NotADirectory`), then starts
/// archiving it in a blocking task. Must be called within a tokio runtime.
pub async fn open_zip_download(
    dir: PathBuf,
    compression: ZipCompression,
) -> Result<ZipStream, FsError> {
    let checked = dir.clone();
    tokio::task::spawn_blocking(move || check_dir(&checked))
        .await
        .map_err(join_error)??;
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        match write_zip(&dir, writer, compression) {
            Ok(summary) => {
                tracing::debug!(dir = %dir.display(), ?summary, "zip download complete");
            }
            Err(e) if e.raw_os_error().is_none() && tx.is_closed() => {
                tracing::debug!(dir = %dir.display(), "zip download cancelled");
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "zip download failed");
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    Ok(ZipStream { rx })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::error::ErrorClass;
    use std::io::Cursor;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn sample_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        fs::create_dir_all(b.join("sub/deeper")).expect("mkdir");
        fs::create_dir(b.join("empty")).expect("mkdir");
        fs::write(b.join("a.txt"), b"alpha").expect("write");
        fs::write(b.join("sub/b.bin"), vec![42u8; 300_000]).expect("write");
        fs::write(b.join("sub/deeper/c.sh"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(b.join("sub/deeper/c.sh"), fs::Permissions::from_mode(0o750))
            .expect("chmod");
        symlink("../a.txt", b.join("sub/link")).expect("symlink");
        symlink(b, b.join("sub/loop")).expect("symlink");
        nix::unistd::mkfifo(
            &b.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        dir
    }

    fn check_archive(bytes: Vec<u8>) {
        let mut ar = zip::ZipArchive::new(Cursor::new(bytes)).expect("valid zip");
        let names: Vec<String> = (0..ar.len())
            .map(|i| {
                ar.by_index(i)
                    .expect("entry")
                    .name()
                    .expect("name")
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "a.txt",
                "empty/",
                "sub/",
                "sub/b.bin",
                "sub/deeper/",
                "sub/deeper/c.sh",
                "sub/link",
                "sub/loop"
            ]
        );
        let mut s = String::new();
        ar.by_name("a.txt")
            .expect("a")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "alpha");
        let mut v = Vec::new();
        ar.by_name("sub/b.bin")
            .expect("b")
            .read_to_end(&mut v)
            .expect("read");
        assert_eq!(v, vec![42u8; 300_000]);
        let c = ar.by_name("sub/deeper/c.sh").expect("c");
        assert_eq!(c.unix_mode().map(|m| m & 0o777), Some(0o750));
        drop(c);
        assert!(ar.by_name("sub/").expect("dir").is_dir());
        let mut l = ar.by_name("sub/link").expect("link");
        assert!(l.is_symlink());
        let mut t = String::new();
        l.read_to_string(&mut t).expect("read");
        assert_eq!(t, "../a.txt");
    }

    #[test]
    fn zip_of_a_tree_round_trips() {
        let dir = sample_tree();
        let mut out = Vec::new();
        let summary = write_zip(dir.path(), &mut out, ZipCompression::Deflated).expect("zip");
        assert_eq!(summary.files, 3);
        assert_eq!(summary.dirs, 3);
        assert_eq!(summary.symlinks, 2);
        assert_eq!(summary.skipped, 1, "the FIFO");
        assert!(out.len() < 300_000, "compressed: {}", out.len());
        check_archive(out);

        let mut stored = Vec::new();
        write_zip(dir.path(), &mut stored, ZipCompression::Stored).expect("zip");
        assert!(stored.len() > 300_000);
        check_archive(stored);
    }

    #[tokio::test]
    async fn zip_stream_produces_the_same_archive() {
        let dir = sample_tree();
        let mut s = open_zip_download(dir.path().to_path_buf(), ZipCompression::Deflated)
            .await
            .expect("open");
        let mut all = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = s.recv().await {
            let chunk = chunk.expect("chunk");
            assert!(chunk.len() <= CHUNK);
            all.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert!(chunks >= 1);
        check_archive(all);
    }

    #[tokio::test]
    async fn zip_stream_errors_up_front_and_cancel() {
        let dir = sample_tree();
        let e = open_zip_download(dir.path().join("nope"), ZipCompression::Stored)
            .await
            .expect_err("missing");
        assert_eq!(e.class(), ErrorClass::NotFound);
        let e = open_zip_download(dir.path().join("a.txt"), ZipCompression::Stored)
            .await
            .expect_err("file");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        // Dropping after the first chunk stops the archiver (no hang, no panic).
        let mut s = open_zip_download(dir.path().to_path_buf(), ZipCompression::Stored)
            .await
            .expect("open");
        assert!(s.recv().await.is_some());
        drop(s);
    }

    #[test]
    fn open_download_rules() {
        let dir = sample_tree();
        let d = open_download(&dir.path().join("sub/b.bin")).expect("open");
        assert_eq!(d.size, 300_000);
        assert!(d.modified.is_some());
        // Through a symlink.
        let d = open_download(&dir.path().join("sub/link")).expect("open");
        assert_eq!(d.size, 5);
        let missing = dir.path().join("missing");
        let e = open_download(&missing).expect_err("missing");
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert_eq!(
            e.to_string(),
            format!("path '{}' does not exist", missing.display())
        );
        let e = open_download(&dir.path().join("sub")).expect_err("dir");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        assert_eq!(
            e.to_string(),
            format!("path '{}' is a directory", dir.path().join("sub").display())
        );
        let e = open_download(&dir.path().join("fifo")).expect_err("fifo");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
    }

    #[test]
    fn zip_times() {
        assert_eq!(zip_time(0), DateTime::default());
        let t = zip_time(1_700_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!(
            (
                t.year(),
                t.month(),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            (2023, 11, 14, 22, 13, 20)
        );
        let t = zip_time(951_782_400); // 2000-02-29 00:00:00 UTC
        assert_eq!((t.year(), t.month(), t.day()), (2000, 2, 29));
    }
}
