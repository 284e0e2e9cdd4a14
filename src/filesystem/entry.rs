//! `EntryInfo` of a path, built exactly as contract §4.3 says.

use std::collections::HashMap;
use std::fs::{self, Metadata as StdMetadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::sys::users::UserDb;

use super::error::{FsError, is_missing};
use super::metadata::{self, Metadata};

/// The type of an entry as the clients see it. A symlink reports its *target's* type
/// (with [`EntryInfo::is_symlink`] set); the agent never produces `FILE_TYPE_SYMLINK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// Sockets, FIFOs, devices, dangling symlinks, symlinks to special files.
    Unspecified,
    File,
    Directory,
}

/// A point in time as protobuf's `Timestamp` has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub seconds: i64,
    /// 0..=999_999_999
    pub nanos: i32,
}

impl Timestamp {
    pub fn to_system_time(self) -> SystemTime {
        let nanos = Duration::from_nanos(u64::try_from(self.nanos).unwrap_or(0));
        if self.seconds >= 0 {
            UNIX_EPOCH + Duration::from_secs(self.seconds.unsigned_abs()) + nanos
        } else {
            UNIX_EPOCH - Duration::from_secs(self.seconds.unsigned_abs()) + nanos
        }
    }
}

/// Everything the `EntryInfo` message carries, without proto types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// Last path component (`/` for the root). Non-UTF-8 bytes are replaced (lossy).
    pub name: String,
    pub file_type: FileType,
    /// The path as given (ListDir rewrites it to stay under the requested path).
    pub path: PathBuf,
    /// `st_size` of the entry itself (a symlink: length of its text).
    pub size: i64,
    /// Permission bits only (`& 0o777`); a symlink: its target's bits, 0 if dangling.
    pub mode: u32,
    /// The reference's letter format, e.g. `-rw-r--r--`, `dtrwxrwxrwx`, `Lrwxrwxrwx`.
    pub permissions: String,
    /// User name of `st_uid`, or the number as a string.
    pub owner: String,
    /// Group name of `st_gid`, or the number as a string.
    pub group: String,
    /// `st_mtime` with nanoseconds; `None` when it is exactly the epoch.
    pub modified_time: Option<Timestamp>,
    /// Symlinks only: the fully resolved absolute target, or the path itself if resolution fails.
    pub symlink_target: Option<PathBuf>,
    /// The `user.e2b.*` xattrs (of the target, for a symlink).
    pub metadata: Metadata,
    pub is_symlink: bool,
}

/// Builds the [`EntryInfo`] of `path`. Missing → [`FsError::NotFound`] "file not found: …".
pub fn entry_info(path: &Path, users: &dyn UserDb) -> Result<EntryInfo, FsError> {
    let mut names = NameCache::new(users);
    entry_info_with(path, &mut names).map_err(|e| {
        if is_missing(&e) {
            FsError::NotFound(format!("file not found: {}", path.display()))
        } else {
            FsError::io("cannot stat", path, e)
        }
    })
}

/// Owner and group names, looked up once per id for the lifetime of the cache (one
/// ListDir call): a passwd lookup can read the whole `/etc/passwd` each time.
pub(crate) struct NameCache<'a> {
    users: &'a dyn UserDb,
    uids: HashMap<u32, String>,
    gids: HashMap<u32, String>,
}

impl<'a> NameCache<'a> {
    pub(crate) fn new(users: &'a dyn UserDb) -> Self {
        NameCache {
            users,
            uids: HashMap::new(),
            gids: HashMap::new(),
        }
    }

    fn user(&mut self, uid: u32) -> String {
        let users = self.users;
        self.uids
            .entry(uid)
            .or_insert_with(|| users.user_name(uid).unwrap_or_else(|| uid.to_string()))
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        let users = self.users;
        self.gids
            .entry(gid)
            .or_insert_with(|| users.group_name(gid).unwrap_or_else(|| gid.to_string()))
            .clone()
    }
}

/// [`entry_info`] with the raw error (ListDir skips entries that vanished).
pub(crate) fn entry_info_with(path: &Path, names: &mut NameCache<'_>) -> io::Result<EntryInfo> {
    let lmeta = fs::symlink_metadata(path)?;
    Ok(build(path, &lmeta, names))
}

/// Builds an EntryInfo from an `lstat` result already at hand.
pub(crate) fn build(path: &Path, lmeta: &StdMetadata, names: &mut NameCache<'_>) -> EntryInfo {
    let ft = lmeta.file_type();
    let is_symlink = ft.is_symlink();
    let (file_type, mode, symlink_target) = if is_symlink {
        // The target decides type and mode; a dangling link or a loop gives UNSPECIFIED/0.
        let (file_type, mode) = match fs::metadata(path) {
            Ok(t) => (type_of(&t), t.mode() & 0o777),
            Err(_) => (FileType::Unspecified, 0),
        };
        let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        (file_type, mode, Some(target))
    } else {
        (type_of(lmeta), lmeta.mode() & 0o777, None)
    };
    let modified_time = match (lmeta.mtime(), lmeta.mtime_nsec()) {
        (0, 0) => None,
        (seconds, nanos) => Some(Timestamp {
            seconds,
            nanos: i32::try_from(nanos).unwrap_or(0),
        }),
    };
    // Metadata of the target for a symlink (Linux refuses user.* xattrs on links anyway):
    // the same file GET /files would serve.
    let metadata = if is_symlink && file_type == FileType::Unspecified {
        Metadata::new()
    } else {
        metadata::read_path(path, is_symlink)
    };
    EntryInfo {
        name: name_of(path),
        file_type,
        path: path.to_path_buf(),
        size: i64::try_from(lmeta.size()).unwrap_or(i64::MAX),
        mode,
        permissions: permissions_string(lmeta.mode()),
        owner: names.user(lmeta.uid()),
        group: names.group(lmeta.gid()),
        modified_time,
        symlink_target,
        metadata,
        is_symlink,
    }
}

fn type_of(meta: &StdMetadata) -> FileType {
    let ft = meta.file_type();
    if ft.is_file() {
        FileType::File
    } else if ft.is_dir() {
        FileType::Directory
    } else {
        FileType::Unspecified
    }
}

/// Last component of `path`; `/` for the root (and for paths without a normal last
/// component such as `/a/..`, the path as written).
pub(crate) fn name_of(path: &Path) -> String {
    match path.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None if path.as_os_str() == "/" || path.as_os_str().is_empty() => "/".to_string(),
        None => path.to_string_lossy().into_owned(),
    }
}

/// The reference's `permissions` format (Go's `os.FileMode.String()`): type and flag
/// letters in the order `d L D p S u g c t` (a single `-` when none apply), then nine
/// `rwx` characters. `st_mode` is the raw `lstat` mode.
pub fn permissions_string(st_mode: u32) -> String {
    let fmt = st_mode & libc::S_IFMT;
    let mut s = String::with_capacity(12);
    if fmt == libc::S_IFDIR {
        s.push('d');
    }
    if fmt == libc::S_IFLNK {
        s.push('L');
    }
    if fmt == libc::S_IFBLK || fmt == libc::S_IFCHR {
        s.push('D');
    }
    if fmt == libc::S_IFIFO {
        s.push('p');
    }
    if fmt == libc::S_IFSOCK {
        s.push('S');
    }
    if st_mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if st_mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if fmt == libc::S_IFCHR {
        s.push('c');
    }
    if st_mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, c) in RWX.iter().enumerate() {
        if st_mode & (1 << (8 - i)) != 0 {
            s.push(char::from(*c));
        } else {
            s.push('-');
        }
    }
    s
}

/// True when `meta` is a FIFO, socket or device.
pub(crate) fn is_special(meta: &StdMetadata) -> bool {
    let ft = meta.file_type();
    ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sys::users::{SystemUsers, User, UserError};
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// A fixed user table for tests: uid/gid 0 → root, 4242 → "tester", others unnamed.
    pub(crate) struct FakeUsers;

    impl UserDb for FakeUsers {
        fn user_by_name(&self, name: &str) -> Result<User, UserError> {
            Err(UserError::Unknown(name.to_string()))
        }
        fn user_name(&self, uid: u32) -> Option<String> {
            match uid {
                0 => Some("root".into()),
                4242 => Some("tester".into()),
                _ => None,
            }
        }
        fn group_name(&self, gid: u32) -> Option<String> {
            match gid {
                0 => Some("root".into()),
                4242 => Some("testers".into()),
                _ => None,
            }
        }
    }

    #[test]
    fn permission_strings() {
        assert_eq!(permissions_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(
            permissions_string(libc::S_IFDIR | libc::S_ISVTX | 0o777),
            "dtrwxrwxrwx"
        );
        assert_eq!(
            permissions_string(libc::S_IFREG | libc::S_ISUID | 0o755),
            "urwxr-xr-x"
        );
        assert_eq!(
            permissions_string(libc::S_IFREG | libc::S_ISGID | 0o755),
            "grwxr-xr-x"
        );
        assert_eq!(permissions_string(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
        assert_eq!(permissions_string(libc::S_IFBLK | 0o660), "Drw-rw----");
        assert_eq!(permissions_string(libc::S_IFIFO | 0o644), "prw-r--r--");
        assert_eq!(permissions_string(libc::S_IFSOCK | 0o755), "Srwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFREG), "----------");
    }

    #[test]
    fn real_special_entries() {
        let tmp = entry_info(Path::new("/tmp"), &SystemUsers).expect("/tmp");
        assert_eq!(tmp.permissions, "dtrwxrwxrwx");
        assert_eq!(tmp.file_type, FileType::Directory);
        assert_eq!(tmp.mode, 0o777);
        let null = entry_info(Path::new("/dev/null"), &SystemUsers).expect("/dev/null");
        assert_eq!(null.permissions, "Dcrw-rw-rw-");
        assert_eq!(null.file_type, FileType::Unspecified);
        assert_eq!(null.owner, "root");
        let root = entry_info(Path::new("/"), &SystemUsers).expect("/");
        assert_eq!(root.name, "/");
        assert_eq!(root.file_type, FileType::Directory);
    }

    #[test]
    fn regular_file_and_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.txt");
        fs::write(&f, b"hello").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        std::os::unix::fs::chown(&f, Some(4242), Some(4242)).expect("chown");
        let e = entry_info(&f, &FakeUsers).expect("stat");
        assert_eq!(e.name, "a.txt");
        assert_eq!(e.path, f);
        assert_eq!(e.file_type, FileType::File);
        assert_eq!(e.size, 5);
        assert_eq!(e.mode, 0o644);
        assert_eq!(e.permissions, "-rw-r--r--");
        assert_eq!(e.owner, "tester");
        assert_eq!(e.group, "testers");
        assert!(!e.is_symlink);
        assert_eq!(e.symlink_target, None);
        let m = fs::metadata(&f).expect("meta");
        let t = e.modified_time.expect("mtime");
        assert_eq!(t.seconds, m.mtime());
        assert_eq!(i64::from(t.nanos), m.mtime_nsec());
        assert!(e.metadata.is_empty());

        std::os::unix::fs::chown(&f, Some(31337), Some(31338)).expect("chown");
        let e = entry_info(&f, &FakeUsers).expect("stat");
        assert_eq!((e.owner.as_str(), e.group.as_str()), ("31337", "31338"));

        let d = dir.path().join("sub");
        fs::create_dir(&d).expect("mkdir");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = entry_info(&d, &FakeUsers).expect("stat");
        assert_eq!(e.file_type, FileType::Directory);
        assert_eq!(e.permissions, "drwxr-xr-x");
        assert_eq!(e.mode, 0o755);

        let missing = entry_info(&dir.path().join("nope"), &FakeUsers).expect_err("missing");
        assert_eq!(
            missing.to_string(),
            format!("file not found: {}", dir.path().join("nope").display())
        );
    }

    #[test]
    fn setuid_file_and_epoch_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("suid");
        fs::write(&f, b"x").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).expect("chmod");
        let e = entry_info(&f, &FakeUsers).expect("stat");
        assert_eq!(e.permissions, "urwxr-xr-x");
        assert_eq!(e.mode, 0o755);
        let file = fs::File::options().write(true).open(&f).expect("open");
        file.set_modified(UNIX_EPOCH).expect("utimes");
        let e = entry_info(&f, &FakeUsers).expect("stat");
        assert_eq!(e.modified_time, None);
    }

    #[test]
    fn symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = fs::canonicalize(dir.path()).expect("canon");
        let target = real.join("target.txt");
        fs::write(&target, b"0123456789").expect("write");
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).expect("chmod");
        let link = real.join("link");
        symlink("target.txt", &link).expect("symlink");
        let e = entry_info(&link, &FakeUsers).expect("stat");
        assert!(e.is_symlink);
        assert_eq!(e.file_type, FileType::File);
        assert_eq!(e.mode, 0o600);
        assert_eq!(e.permissions, "Lrwxrwxrwx");
        assert_eq!(e.size, "target.txt".len() as i64);
        assert_eq!(e.symlink_target.as_deref(), Some(target.as_path()));

        // A chain of links resolves fully.
        let link2 = real.join("link2");
        symlink(&link, &link2).expect("symlink");
        let e = entry_info(&link2, &FakeUsers).expect("stat");
        assert_eq!(e.symlink_target.as_deref(), Some(target.as_path()));

        // Link to a directory.
        let sub = real.join("sub");
        fs::create_dir(&sub).expect("mkdir");
        let dl = real.join("dirlink");
        symlink(&sub, &dl).expect("symlink");
        let e = entry_info(&dl, &FakeUsers).expect("stat");
        assert_eq!(e.file_type, FileType::Directory);
        assert!(e.is_symlink);

        // Dangling.
        let dangling = real.join("dangling");
        symlink("nowhere", &dangling).expect("symlink");
        let e = entry_info(&dangling, &FakeUsers).expect("stat");
        assert!(e.is_symlink);
        assert_eq!(e.file_type, FileType::Unspecified);
        assert_eq!(e.mode, 0);
        assert_eq!(e.symlink_target.as_deref(), Some(dangling.as_path()));

        // Loop: still an entry, unresolvable.
        let a = real.join("loop_a");
        let b = real.join("loop_b");
        symlink(&b, &a).expect("symlink");
        symlink(&a, &b).expect("symlink");
        let e = entry_info(&a, &FakeUsers).expect("stat");
        assert_eq!(e.file_type, FileType::Unspecified);
        assert_eq!(e.symlink_target.as_deref(), Some(a.as_path()));

        // Link to a device.
        let dev = real.join("devlink");
        symlink("/dev/null", &dev).expect("symlink");
        let e = entry_info(&dev, &FakeUsers).expect("stat");
        assert_eq!(e.file_type, FileType::Unspecified);
        assert_eq!(e.mode, 0o666);
    }

    #[test]
    fn metadata_from_xattrs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("m");
        fs::write(&f, b"x").expect("write");
        xattr::set(&f, "user.e2b.color", b"blue").expect("xattr");
        xattr::set(&f, "user.other", b"ignored").expect("xattr");
        xattr::set(&f, "user.e2b.bin", b"\xff\xfe").expect("xattr");
        let e = entry_info(&f, &FakeUsers).expect("stat");
        assert_eq!(e.metadata.len(), 1);
        assert_eq!(e.metadata["color"], "blue");
        // Through a symlink: the target's metadata.
        let l = dir.path().join("l");
        symlink(&f, &l).expect("symlink");
        let e = entry_info(&l, &FakeUsers).expect("stat");
        assert_eq!(e.metadata["color"], "blue");
    }

    #[test]
    fn timestamp_round_trip() {
        let t = Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        };
        assert_eq!(
            t.to_system_time(),
            UNIX_EPOCH + Duration::new(1_700_000_000, 5)
        );
    }
}
