//! User metadata of files: `X-Metadata-<key>` upload headers stored as `user.e2b.<key>`
//! extended attributes (contract §4.3 "metadata", §5.6).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;

use xattr::FileExt;

use super::error::{FsError, NoSpaceKind};

/// Metadata of one file: key → value, keys without the `user.e2b.` prefix.
pub type Metadata = BTreeMap<String, String>;

/// Namespace of the metadata xattrs.
pub const XATTR_PREFIX: &str = "user.e2b.";
/// Request headers carrying metadata start with this (matched case-insensitively).
pub const HEADER_PREFIX: &str = "x-metadata-";
/// Longest key: 255 (xattr name limit) − `user.e2b.`.
pub const MAX_KEY_LEN: usize = 246;
/// Limit of Σ (9 + len(key) + len(value)) over all entries.
pub const MAX_TOTAL_LEN: usize = 4096;

/// Collects metadata from request headers (name, raw value): every header whose name
/// starts with `X-Metadata-` (any case) is an entry; the key is the rest of the name,
/// lowercased; empty keys are ignored; a repeated key keeps its first value. The result is
/// validated with [`validate_metadata`].
pub fn metadata_from_headers<'a, I>(headers: I) -> Result<Metadata, FsError>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut out = Metadata::new();
    for (name, value) in headers {
        let Some(prefix) = name.get(..HEADER_PREFIX.len()) else {
            continue;
        };
        if !prefix.eq_ignore_ascii_case(HEADER_PREFIX) {
            continue;
        }
        let key = name[HEADER_PREFIX.len()..].to_ascii_lowercase();
        if key.is_empty() || out.contains_key(&key) {
            continue;
        }
        if !is_printable_ascii(value) {
            return Err(invalid(format!(
                "value of key '{}' must be printable ASCII (0x20-0x7E)",
                key.escape_default()
            )));
        }
        // Printable ASCII is valid UTF-8.
        let value = String::from_utf8_lossy(value).into_owned();
        out.insert(key, value);
    }
    validate_metadata(&out)?;
    Ok(out)
}

/// Checks the contract's limits: keys and values printable US-ASCII (0x20–0x7E), keys
/// non-empty and at most 246 bytes, Σ (9 + len(key) + len(value)) ≤ 4096.
pub fn validate_metadata(md: &Metadata) -> Result<(), FsError> {
    let mut total = 0usize;
    for (k, v) in md {
        if k.is_empty() {
            return Err(invalid("empty key".to_string()));
        }
        if !is_printable_ascii(k.as_bytes()) {
            return Err(invalid(format!(
                "key '{}' must be printable ASCII (0x20-0x7E)",
                k.escape_default()
            )));
        }
        if k.len() > MAX_KEY_LEN {
            return Err(invalid(format!(
                "key '{}…' is {} bytes long; keys are limited to {MAX_KEY_LEN} bytes",
                &k[..32],
                k.len()
            )));
        }
        if !is_printable_ascii(v.as_bytes()) {
            return Err(invalid(format!(
                "value of key '{k}' must be printable ASCII (0x20-0x7E)"
            )));
        }
        total = total.saturating_add(XATTR_PREFIX.len() + k.len() + v.len());
    }
    if total > MAX_TOTAL_LEN {
        return Err(invalid(format!(
            "total size {total} bytes exceeds the limit of {MAX_TOTAL_LEN} bytes \
             (counting {} bytes of prefix per key)",
            XATTR_PREFIX.len()
        )));
    }
    Ok(())
}

fn invalid(what: String) -> FsError {
    FsError::InvalidArgument(format!("invalid metadata: {what}"))
}

fn is_printable_ascii(b: &[u8]) -> bool {
    b.iter().all(|c| (0x20..=0x7e).contains(c))
}

/// True for the errors of a filesystem (or file type) that cannot hold user xattrs.
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENOSYS))
}

/// Reads the `user.e2b.*` set of `path` (following symlinks when `follow`). Errors and
/// filesystems without xattrs yield an empty map; non-UTF-8 keys or values are skipped.
pub(crate) fn read_path(path: &Path, follow: bool) -> Metadata {
    let names = if follow {
        xattr::list_deref(path)
    } else {
        xattr::list(path)
    };
    let Ok(names) = names else {
        return Metadata::new();
    };
    let mut out = Metadata::new();
    for name in names {
        let Some(key) = e2b_key(&name) else { continue };
        let value = if follow {
            xattr::get_deref(path, &name)
        } else {
            xattr::get(path, &name)
        };
        if let Ok(Some(v)) = value
            && let Ok(v) = String::from_utf8(v)
        {
            out.insert(key.to_string(), v);
        }
    }
    out
}

/// Reads the `user.e2b.*` set of an open file.
pub(crate) fn read_fd(file: &File) -> Metadata {
    let Ok(names) = file.list_xattr() else {
        return Metadata::new();
    };
    let mut out = Metadata::new();
    for name in names {
        let Some(key) = e2b_key(&name) else { continue };
        if let Ok(Some(v)) = file.get_xattr(&name)
            && let Ok(v) = String::from_utf8(v)
        {
            out.insert(key.to_string(), v);
        }
    }
    out
}

fn e2b_key(name: &std::ffi::OsStr) -> Option<&str> {
    name.to_str()?.strip_prefix(XATTR_PREFIX)
}

/// Makes the `user.e2b.*` set of `file` exactly `md`: keys not in `md` are removed.
/// Works on the open descriptor (never by path, so a concurrent rename cannot redirect it).
/// Filesystems or file types without user xattrs: silently nothing. ENOSPC/EDQUOT (the
/// xattr space of the inode or its block is full) → [`FsError::NoSpace`].
pub(crate) fn replace_fd(file: &File, path: &Path, md: &Metadata) -> Result<(), FsError> {
    let existing = match file.list_xattr() {
        Ok(names) => names
            .filter_map(|n| e2b_key(&n).map(str::to_string))
            .collect::<Vec<_>>(),
        Err(e) if unsupported(&e) => return Ok(()),
        Err(e) => return Err(FsError::io("cannot list extended attributes of", path, e)),
    };
    for key in existing {
        if !md.contains_key(&key) {
            match file.remove_xattr(format!("{XATTR_PREFIX}{key}")) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(FsError::io("cannot remove metadata of", path, e)),
            }
        }
    }
    for (k, v) in md {
        match file.set_xattr(format!("{XATTR_PREFIX}{k}"), v.as_bytes()) {
            Ok(()) => {}
            // No user xattrs here (filesystem, or a device/FIFO where the kernel refuses
            // user.* with EPERM): metadata is silently not stored.
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && !is_regular(file) => {
                return Ok(());
            }
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::E2BIG) => FsError::no_space(
                        NoSpaceKind::Space,
                        format!(
                            "not enough disk space available to store metadata of {}: {e}",
                            path.display()
                        ),
                    ),
                    Some(libc::EDQUOT) => FsError::no_space(
                        NoSpaceKind::Quota,
                        format!(
                            "not enough disk space available (disk quota exceeded) to store \
                             metadata of {}: {e}",
                            path.display()
                        ),
                    ),
                    _ => FsError::io("cannot store metadata of", path, e),
                });
            }
        }
    }
    Ok(())
}

fn is_regular(file: &File) -> bool {
    file.metadata().map(|m| m.is_file()).unwrap_or(false)
}

/// Copies the extended attributes of `from` onto `to`, except the `user.e2b.*` set (the
/// upload replaces it) and `security.capability` (file capabilities must not survive new
/// content). Best effort: used when an upload replaces a file by a new inode, so ACLs,
/// SELinux labels and foreign user xattrs of the old file are kept.
pub(crate) fn copy_foreign_xattrs(from: &Path, to: &File) {
    let Ok(names) = xattr::list(from) else { return };
    for name in names {
        if e2b_key(&name).is_some() || name == "security.capability" {
            continue;
        }
        if let Ok(Some(v)) = xattr::get(from, &name)
            && let Err(e) = to.set_xattr(&name, &v)
        {
            tracing::debug!(xattr = ?name, path = %from.display(), error = %e, "cannot copy xattr");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, &'a [u8])> {
        pairs.iter().map(|(k, v)| (*k, v.as_bytes())).collect()
    }

    #[test]
    fn headers_prefix_case_lowercase_first_value_wins() {
        let md = metadata_from_headers(h(&[
            ("X-Metadata-Owner", "alice"),
            ("x-metadata-owner", "bob"),
            ("X-METADATA-Kind", "report"),
            ("x-metadata-", "ignored"),
            ("content-type", "text/plain"),
            ("x-meta", "short"),
        ]))
        .expect("valid");
        assert_eq!(md.len(), 2);
        assert_eq!(md["owner"], "alice");
        assert_eq!(md["kind"], "report");
    }

    #[test]
    fn validation_limits() {
        let bad_value = metadata_from_headers(vec![("x-metadata-a", "é".as_bytes())]);
        let e = bad_value.expect_err("non-ASCII value");
        assert!(e.to_string().starts_with("invalid metadata: "), "{e}");
        assert_eq!(e.class(), super::super::ErrorClass::InvalidArgument);

        let ctl = metadata_from_headers(vec![("x-metadata-a", &b"x\x01"[..])]);
        assert!(ctl.is_err());

        let mut md = Metadata::new();
        md.insert("k".repeat(246), "v".into());
        assert!(validate_metadata(&md).is_ok());
        md.insert("q".repeat(247), "v".into());
        let e = validate_metadata(&md).expect_err("key too long");
        assert!(e.to_string().contains("246"), "{e}");

        // Exactly 4096 bytes in total passes, one more fails.
        let mut md = Metadata::new();
        md.insert("a".into(), "x".repeat(4096 - 9 - 1));
        assert!(validate_metadata(&md).is_ok());
        md.insert("b".into(), String::new());
        let e = validate_metadata(&md).expect_err("total too big");
        assert!(e.to_string().contains("4096"), "{e}");

        let mut md = Metadata::new();
        md.insert("a b".into(), "tab\tno".into());
        assert!(validate_metadata(&md).is_err());
        let mut md = Metadata::new();
        md.insert(String::new(), "v".into());
        assert!(validate_metadata(&md).is_err());
    }

    #[test]
    fn replace_and_read_back_on_fd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let f = File::create(&p).expect("create");
        f.set_xattr("user.other", b"keep").expect("xattr support");
        let mut md = Metadata::new();
        md.insert("a".into(), "1".into());
        md.insert("b".into(), "2".into());
        replace_fd(&f, &p, &md).expect("set");
        assert_eq!(read_fd(&f), md);
        let mut md2 = Metadata::new();
        md2.insert("b".into(), "3".into());
        replace_fd(&f, &p, &md2).expect("replace");
        assert_eq!(read_path(&p, false), md2);
        replace_fd(&f, &p, &Metadata::new()).expect("clear");
        assert!(read_fd(&f).is_empty());
        assert_eq!(
            f.get_xattr("user.other").expect("get").as_deref(),
            Some(&b"keep"[..])
        );
    }
}
