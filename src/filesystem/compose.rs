//! `POST /files/compose` (contract §5.7): concatenate files into a destination.
//!
//! The sources are copied in order (in-kernel `copy_file_range` where possible) into a
//! temporary sibling of the destination owned by the user, which is renamed over the
//! destination; the sources are deleted only after that succeeded. Any failure leaves the
//! destination and the sources as they were.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::paths::normalize;

use super::Owner;
use super::error::{FsError, is_missing};
use super::upload::{AtomicWriter, CommitOptions};

/// The composed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeOutcome {
    pub path: PathBuf,
    pub size: u64,
}

/// Concatenates `sources` (resolved paths, in order) into `destination` for `owner`.
///
/// Errors: empty `sources` → `InvalidArgument`; a missing source → `NotFound` "source
/// file not found: …"; a source that is not a regular file, or that is the destination
/// itself → `InvalidArgument`; destination is a directory → `IsADirectory`; ENOSPC →
/// `NoSpace`.
pub fn compose(
    sources: &[PathBuf],
    destination: &Path,
    owner: Owner,
) -> Result<ComposeOutcome, FsError> {
    if sources.is_empty() {
        return Err(FsError::InvalidArgument(
            "source_paths must not be empty".to_string(),
        ));
    }
    if destination.as_os_str().is_empty() {
        return Err(FsError::InvalidArgument(
            "destination must not be empty".to_string(),
        ));
    }
    // The destination's identity, to catch a source that is the destination under
    // another name (symlink, `..`).
    let dest_id = fs::metadata(destination).ok().map(|m| (m.dev(), m.ino()));
    let dest_norm = normalize(destination);
    for src in sources {
        let meta = fs::metadata(src).map_err(|e| {
            if is_missing(&e) {
                FsError::NotFound(format!("source file not found: {}", src.display()))
            } else {
                FsError::io("cannot stat", src, e)
            }
        })?;
        if !meta.is_file() {
            return Err(FsError::InvalidArgument(format!(
                "source path is not a regular file: {}",
                src.display()
            )));
        }
        if normalize(src) == dest_norm || dest_id == Some((meta.dev(), meta.ino())) {
            return Err(FsError::InvalidArgument(format!(
                "source path must differ from the destination: {}",
                src.display()
            )));
        }
    }

    let mut writer = AtomicWriter::create(destination, owner)?;
    for src in sources {
        writer.append_file(src).map_err(|e| match e {
            FsError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
                FsError::NotFound(format!("source file not found: {}", src.display()))
            }
            other => other,
        })?;
    }
    let done = writer.commit(CommitOptions::default())?;

    let mut removed = HashSet::new();
    for src in sources {
        if !removed.insert(normalize(src)) {
            continue;
        }
        if let Err(e) = fs::remove_file(src)
            && !is_missing(&e)
        {
            // The destination is complete; a leftover source is not worth failing for.
            tracing::warn!(source = %src.display(), error = %e, "compose: cannot delete source");
        }
    }
    Ok(ComposeOutcome {
        path: done.path,
        size: done.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::error::ErrorClass;
    use std::os::unix::fs::symlink;

    const OWNER: Owner = Owner {
        uid: 4242,
        gid: 4343,
    };

    #[test]
    fn concatenates_in_order_and_deletes_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        let parts: Vec<PathBuf> = (0..3).map(|i| b.join(format!("part{i}"))).collect();
        for (i, p) in parts.iter().enumerate() {
            fs::write(p, format!("<{i}>").repeat(1000)).expect("write");
        }
        let dest = b.join("out/joined.txt");
        fs::create_dir(b.join("out")).expect("mkdir");
        fs::write(&dest, b"old").expect("write");
        let out = compose(&parts, &dest, OWNER).expect("compose");
        assert_eq!(out.path, dest);
        assert_eq!(out.size, 9000);
        let data = fs::read_to_string(&dest).expect("read");
        assert!(data.starts_with("<0><0>"));
        assert!(data.ends_with("<2><2>"));
        assert_eq!(&data[3000..3003], "<1>");
        assert!(parts.iter().all(|p| !p.exists()), "sources deleted");
        let m = fs::metadata(&dest).expect("meta");
        assert_eq!((m.uid(), m.gid()), (4242, 4343));
        assert_eq!(
            fs::read_dir(b.join("out")).expect("ls").count(),
            1,
            "no temp file"
        );
    }

    #[test]
    fn validation_errors_leave_everything_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        let a = b.join("a");
        fs::write(&a, b"A").expect("write");
        let dest = b.join("dest");

        let e = compose(&[], &dest, OWNER).expect_err("empty");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);

        let missing = b.join("missing");
        let e = compose(&[a.clone(), missing.clone()], &dest, OWNER).expect_err("missing");
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert_eq!(
            e.to_string(),
            format!("source file not found: {}", missing.display())
        );

        let e = compose(&[a.clone(), b.to_path_buf()], &dest, OWNER).expect_err("dir source");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);

        let e = compose(std::slice::from_ref(&a), &a, OWNER).expect_err("same");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        let l = b.join("l");
        symlink(&a, &l).expect("symlink");
        let e = compose(std::slice::from_ref(&a), &l, OWNER).expect_err("same via link");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);

        let e = compose(std::slice::from_ref(&a), b, OWNER).expect_err("dest dir");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);

        assert_eq!(fs::read(&a).expect("a kept"), b"A");
        assert!(!dest.exists());
    }

    #[test]
    fn repeated_source_is_copied_twice_and_deleted_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a");
        fs::write(&a, b"xy").expect("write");
        let dest = dir.path().join("d");
        let out = compose(&[a.clone(), a.clone()], &dest, OWNER).expect("compose");
        assert_eq!(out.size, 4);
        assert_eq!(fs::read(&dest).expect("read"), b"xyxy");
        assert!(!a.exists());
    }

    #[test]
    fn disk_full_keeps_sources() {
        let Some(tmp) = crate::filesystem::upload::tests::TinyTmpfs::mount("size=64k,mode=755")
        else {
            return;
        };
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        fs::write(&a, vec![1u8; 24 * 1024]).expect("write");
        fs::write(&b, vec![2u8; 24 * 1024]).expect("write");
        let e =
            compose(&[a.clone(), b.clone()], &tmp.path().join("d"), OWNER).expect_err("no space");
        assert_eq!(e.class(), ErrorClass::InsufficientStorage, "{e}");
        assert!(a.exists() && b.exists());
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
    }
}
