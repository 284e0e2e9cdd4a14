//! Stat, MakeDir, Move, ListDir and Remove (contract §4.4).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::paths::normalize;
use crate::sys::users::UserDb;

use super::entry::{self, EntryInfo, NameCache};
use super::error::{FsError, is_missing};
use super::{Owner, create_dir_all_owned};

/// Stat: the [`EntryInfo`] of `path` (not followed if it is a symlink).
/// Missing → `NotFound` "file not found: …".
pub fn stat(path: &Path, users: &dyn UserDb) -> Result<EntryInfo, FsError> {
    entry::entry_info(path, users)
}

/// MakeDir: creates `path` and its missing parents (0755, each new one chowned to `owner`)
/// and returns its EntryInfo. Already a directory (symlinks followed) → `AlreadyExists`;
/// exists as something else → `InvalidArgument`; a parent component is a file → `Io`.
pub fn make_dir(path: &Path, owner: Owner, users: &dyn UserDb) -> Result<EntryInfo, FsError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(FsError::AlreadyExists(format!(
                "directory already exists: {}",
                path.display()
            )));
        }
        Ok(_) => {
            return Err(FsError::InvalidArgument(format!(
                "path already exists but is not a directory: {}",
                path.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling symlink is in the way.
            if fs::symlink_metadata(path).is_ok() {
                return Err(FsError::InvalidArgument(format!(
                    "path already exists but is not a directory (dangling symlink): {}",
                    path.display()
                )));
            }
        }
        // ENOTDIR: a parent is a file; create_dir_all_owned reports it with the path.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
        Err(e) => return Err(FsError::io("cannot stat", path, e)),
    }
    create_dir_all_owned(path, owner)?;
    stat(path, users)
}

/// Move: creates the destination's missing parents (0755, chowned to `owner`), then
/// `rename(2)`, which atomically replaces an existing file or empty directory. Returns the
/// destination's EntryInfo. Missing source → `NotFound` "source file not found: …".
pub fn rename(
    source: &Path,
    destination: &Path,
    owner: Owner,
    users: &dyn UserDb,
) -> Result<EntryInfo, FsError> {
    if let Err(e) = fs::symlink_metadata(source) {
        return Err(if is_missing(&e) {
            FsError::NotFound(format!("source file not found: {}", source.display()))
        } else {
            FsError::io("cannot stat", source, e)
        });
    }
    if let Some(parent) = destination.parent()
        && !parent.as_os_str().is_empty()
    {
        create_dir_all_owned(parent, owner)?;
    }
    if let Err(e) = fs::rename(source, destination) {
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) => {
                FsError::NotFound(format!("source file not found: {}", source.display()))
            }
            Some(libc::EXDEV) => FsError::io(
                "cannot move across filesystems to",
                destination,
                io::Error::other(format!(
                    "{} and {} are on different filesystems",
                    source.display(),
                    destination.display()
                )),
            ),
            _ => FsError::io_write("cannot move to", destination, e),
        });
    }
    stat(destination, users)
}

/// Checks that `path` is an existing directory (symlinks followed): not a directory →
/// `NotADirectory`, symlink loop → `SymlinkLoop`, missing → `NotFound` worded by
/// `not_found` (ListDir and the watches word it differently).
pub(crate) fn require_dir(path: &Path, not_found: impl FnOnce() -> String) -> Result<(), FsError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FsError::not_a_directory(path)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(FsError::SymlinkLoop {
            path: path.to_path_buf(),
        }),
        Err(e) if is_missing(&e) => Err(FsError::NotFound(not_found())),
        Err(e) => Err(FsError::io("cannot stat", path, e)),
    }
}

/// ListDir: the entries below `path` down to `depth` levels (0 means 1), in pre-order with
/// children sorted byte-wise, each directory right before its children. `path` may be a
/// symlink to a directory; entries' paths stay under the requested (lexically normalized)
/// path. Symlinks to directories are listed but not descended; entries that vanish during
/// the walk are skipped.
///
/// Missing → `NotFound`; symlink loop → `SymlinkLoop`; not a directory → `NotADirectory`.
pub fn list_dir(path: &Path, depth: u32, users: &dyn UserDb) -> Result<Vec<EntryInfo>, FsError> {
    let depth = depth.max(1);
    require_dir(path, || format!("directory not found: {}", path.display()))?;
    let shown_root = normalize(path);
    let mut names = NameCache::new(users);
    let mut out = Vec::new();

    // Explicit stack (no recursion limit); children are pushed in reverse byte-wise order
    // so they pop in order, and a directory's children are pushed right after it is
    // visited: pre-order.
    let mut stack: Vec<Pending> = Vec::new();
    push_children(path, &shown_root, 1, &mut stack, true)?;

    while let Some(Pending { real, shown, level }) = stack.pop() {
        let lmeta = match fs::symlink_metadata(&real) {
            Ok(m) => m,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(FsError::io("cannot stat", &real, e)),
        };
        let mut info = entry::build(&real, &lmeta, &mut names);
        info.path = shown.clone();
        out.push(info);
        if lmeta.is_dir() && level < depth {
            push_children(&real, &shown, level + 1, &mut stack, false)?;
        }
    }
    Ok(out)
}

/// A ListDir entry waiting to be visited: its real path, its path as shown, its level.
struct Pending {
    real: PathBuf,
    shown: PathBuf,
    level: u32,
}

/// Pushes the children of `real_dir` in reverse byte-wise order, so they pop in order.
fn push_children(
    real_dir: &Path,
    shown_dir: &Path,
    level: u32,
    stack: &mut Vec<Pending>,
    is_root: bool,
) -> Result<(), FsError> {
    let rd = match fs::read_dir(real_dir) {
        Ok(rd) => rd,
        Err(e) if !is_root && is_missing(&e) => return Ok(()),
        Err(e) => return Err(FsError::io("cannot list directory", real_dir, e)),
    };
    let mut children: Vec<OsString> = Vec::new();
    for ent in rd {
        match ent {
            Ok(ent) => children.push(ent.file_name()),
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(FsError::io("cannot list directory", real_dir, e)),
        }
    }
    // OsString ordering on Unix is byte-wise.
    children.sort_unstable();
    for name in children.into_iter().rev() {
        stack.push(Pending {
            real: real_dir.join(&name),
            shown: shown_dir.join(&name),
            level,
        });
    }
    Ok(())
}

/// Remove: `rm -rf` — a directory with everything below it (symlinks are removed, never
/// followed), or a single entry. Success when `path` does not exist. Refuses `/`.
pub fn remove(path: &Path) -> Result<(), FsError> {
    if normalize(path) == Path::new("/") {
        return Err(FsError::InvalidArgument(format!(
            "refusing to remove the root directory: {}",
            path.display()
        )));
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if is_missing(&e) => return Ok(()),
        Err(e) => return Err(FsError::io("cannot stat", path, e)),
    };
    let result = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::io("cannot remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::entry::FileType;
    use crate::filesystem::entry::tests::FakeUsers;
    use crate::filesystem::error::ErrorClass;
    use std::os::unix::fs::{MetadataExt, symlink};

    const OWNER: Owner = Owner {
        uid: 4242,
        gid: 4242,
    };

    fn paths(entries: &[EntryInfo], base: &Path) -> Vec<String> {
        entries
            .iter()
            .map(|e| {
                e.path
                    .strip_prefix(base)
                    .expect("under base")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    #[test]
    fn stat_missing_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x");
        let e = stat(&p, &FakeUsers).expect_err("missing");
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert_eq!(e.to_string(), format!("file not found: {}", p.display()));
        // A file used as a directory: also "not found".
        fs::write(&p, b"").expect("write");
        let e = stat(&p.join("y"), &FakeUsers).expect_err("enotdir");
        assert_eq!(e.class(), ErrorClass::NotFound);
    }

    #[test]
    fn make_dir_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a/b/c");
        let info = make_dir(&p, OWNER, &FakeUsers).expect("mkdir");
        assert_eq!(info.file_type, FileType::Directory);
        assert_eq!(info.permissions, "drwxr-xr-x");
        assert_eq!(info.mode, 0o755);
        assert_eq!(info.owner, "tester");
        assert_eq!(fs::metadata(dir.path().join("a")).expect("a").uid(), 4242);
        // Existing parents untouched.
        assert_eq!(fs::metadata(dir.path()).expect("root").uid(), 0);

        let e = make_dir(&p, OWNER, &FakeUsers).expect_err("exists");
        assert_eq!(e.class(), ErrorClass::AlreadyExists);
        assert!(e.to_string().contains(&*p.to_string_lossy()), "{e}");

        let f = dir.path().join("file");
        fs::write(&f, b"").expect("write");
        let e = make_dir(&f, OWNER, &FakeUsers).expect_err("file");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);

        let e = make_dir(&f.join("sub"), OWNER, &FakeUsers).expect_err("parent file");
        assert_eq!(e.class(), ErrorClass::Internal);

        let dangling = dir.path().join("dangling");
        symlink("nowhere", &dangling).expect("symlink");
        let e = make_dir(&dangling, OWNER, &FakeUsers).expect_err("dangling");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);

        // A symlink to a directory is "already a directory".
        let l = dir.path().join("link");
        symlink(&p, &l).expect("symlink");
        let e = make_dir(&l, OWNER, &FakeUsers).expect_err("link to dir");
        assert_eq!(e.class(), ErrorClass::AlreadyExists);
    }

    #[test]
    fn rename_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.txt");
        fs::write(&src, b"new").expect("write");
        let dst = dir.path().join("x/y/dst.txt");
        let info = rename(&src, &dst, OWNER, &FakeUsers).expect("move");
        assert_eq!(info.path, dst);
        assert_eq!(info.name, "dst.txt");
        assert_eq!(fs::read(&dst).expect("read"), b"new");
        assert!(!src.exists());
        assert_eq!(fs::metadata(dir.path().join("x/y")).expect("y").uid(), 4242);

        // Replaces an existing file.
        fs::write(&src, b"newer").expect("write");
        rename(&src, &dst, OWNER, &FakeUsers).expect("replace");
        assert_eq!(fs::read(&dst).expect("read"), b"newer");

        let e = rename(&src, &dst, OWNER, &FakeUsers).expect_err("missing");
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert_eq!(
            e.to_string(),
            format!("source file not found: {}", src.display())
        );

        // A directory onto a non-empty directory fails (internal).
        let d1 = dir.path().join("d1");
        let d2 = dir.path().join("d2");
        fs::create_dir(&d1).expect("mkdir");
        fs::create_dir(&d2).expect("mkdir");
        fs::write(d2.join("f"), b"").expect("write");
        let e = rename(&d1, &d2, OWNER, &FakeUsers).expect_err("not empty");
        assert_eq!(e.class(), ErrorClass::Internal);
        // A directory onto an empty one replaces it.
        fs::remove_file(d2.join("f")).expect("rm");
        rename(&d1, &d2, OWNER, &FakeUsers).expect("replace empty dir");
        assert!(!d1.exists());
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = dir.path();
        for d in ["d", "d/sub", "d/sub/deeper", "d/sub/deeper/deepest", "a"] {
            fs::create_dir_all(b.join(d)).expect("mkdir");
        }
        for f in [
            "f.txt",
            "B.txt",
            "d/z.txt",
            "d/_x",
            "d/sub/file",
            "d/sub/deeper/deepest/leaf",
        ] {
            fs::write(b.join(f), b"x").expect("write");
        }
        symlink(b.join("d"), b.join("link_to_d")).expect("symlink");
        dir
    }

    #[test]
    fn list_dir_order_and_depth() {
        let dir = tree();
        let b = dir.path();
        let l1 = list_dir(b, 0, &FakeUsers).expect("list");
        assert_eq!(
            paths(&l1, b),
            ["B.txt", "a", "d", "f.txt", "link_to_d"],
            "byte-wise: uppercase first"
        );
        let link = l1.iter().find(|e| e.name == "link_to_d").expect("link");
        assert!(link.is_symlink);
        assert_eq!(link.file_type, FileType::Directory);

        let l2 = list_dir(b, 2, &FakeUsers).expect("list");
        assert_eq!(
            paths(&l2, b),
            [
                "B.txt",
                "a",
                "d",
                "d/_x",
                "d/sub",
                "d/z.txt",
                "f.txt",
                "link_to_d"
            ]
        );
        let l9 = list_dir(b, 9, &FakeUsers).expect("list");
        assert_eq!(
            paths(&l9, b),
            [
                "B.txt",
                "a",
                "d",
                "d/_x",
                "d/sub",
                "d/sub/deeper",
                "d/sub/deeper/deepest",
                "d/sub/deeper/deepest/leaf",
                "d/sub/file",
                "d/z.txt",
                "f.txt",
                "link_to_d"
            ],
            "depth > 3 works, symlinked dirs are not descended"
        );
        let leaf = &l9[7];
        assert_eq!(leaf.name, "leaf");
        assert_eq!(leaf.file_type, FileType::File);
    }

    #[test]
    fn list_dir_through_symlinked_root_keeps_requested_paths() {
        let dir = tree();
        let b = dir.path();
        let req = b.join("link_to_d/./");
        let l = list_dir(&req, 1, &FakeUsers).expect("list");
        let shown = b.join("link_to_d");
        assert_eq!(
            l.iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
            vec![shown.join("_x"), shown.join("sub"), shown.join("z.txt")]
        );
    }

    #[test]
    fn list_dir_errors() {
        let dir = tree();
        let b = dir.path();
        let e = list_dir(&b.join("f.txt"), 1, &FakeUsers).expect_err("file");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        assert_eq!(
            e.to_string(),
            format!("path is not a directory: {}", b.join("f.txt").display())
        );
        let e = list_dir(&b.join("missing"), 1, &FakeUsers).expect_err("missing");
        assert_eq!(e.class(), ErrorClass::NotFound);
        symlink(b.join("loop2"), b.join("loop1")).expect("symlink");
        symlink(b.join("loop1"), b.join("loop2")).expect("symlink");
        let e = list_dir(&b.join("loop1"), 1, &FakeUsers).expect_err("loop");
        assert_eq!(e.class(), ErrorClass::FailedPrecondition);
        assert!(e.to_string().contains("loop1"), "{e}");
        // The looping links themselves list fine (type unspecified).
        let l = list_dir(b, 1, &FakeUsers).expect("list");
        let looped = l.iter().find(|e| e.name == "loop1").expect("loop1");
        assert_eq!(looped.file_type, FileType::Unspecified);
    }

    #[test]
    fn remove_rules() {
        let dir = tree();
        let b = dir.path();
        remove(&b.join("nope")).expect("missing is fine");
        remove(&b.join("f.txt/below")).expect("below a file is fine");
        // Removing a symlink to a dir removes the link only.
        remove(&b.join("link_to_d")).expect("link");
        assert!(b.join("d/sub/file").exists());
        remove(&b.join("d")).expect("rm -rf");
        assert!(!b.join("d").exists());
        remove(&b.join("f.txt")).expect("file");
        assert!(!b.join("f.txt").exists());
        let e = remove(Path::new("/tmp/..")).expect_err("root");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
    }
}
