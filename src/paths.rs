//! Path resolution shared by every path-taking RPC and REST call (contract §2.4).
//!
//! Given input `p`, the user's home and the default workdir:
//! 1. empty `p` becomes the default workdir when one is set;
//! 2. `~` and `~/rest` expand to the home; `~name` is an error;
//! 3. an absolute path is used verbatim (not normalized);
//! 4. a relative path is joined to the **home** (not the workdir) and normalized.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("cannot expand user-specific home dir: '{0}'")]
    UserHome(String),
    #[error("path contains a NUL byte")]
    Nul,
}

/// Resolves `input` for a user whose home is `home`, with optional default workdir.
pub fn resolve(
    input: &str,
    home: &Path,
    default_workdir: Option<&Path>,
) -> Result<PathBuf, PathError> {
    if input.contains('\0') {
        return Err(PathError::Nul);
    }
    let mut p = input;
    let workdir_owned;
    if p.is_empty()
        && let Some(w) = default_workdir
    {
        workdir_owned = w.to_string_lossy().into_owned();
        p = &workdir_owned;
    }
    let expanded: PathBuf = if p == "~" {
        home.to_path_buf()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home.join(rest)
    } else if p.starts_with('~') {
        return Err(PathError::UserHome(p.to_string()));
    } else {
        PathBuf::from(p)
    };
    if expanded.is_absolute() {
        if p.starts_with('~') {
            return Ok(normalize(&expanded));
        }
        return Ok(expanded);
    }
    Ok(normalize(&home.join(expanded)))
}

/// Lexical normalization: removes `.` and empty components and folds `..` (never above
/// the root). Does not touch the filesystem.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                if out.parent().is_some() {
                    out.pop();
                } else if !out.has_root() {
                    out.push("..");
                }
            }
            Component::Normal(s) => out.push(s),
            Component::Prefix(_) => {}
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: &str, w: Option<&str>) -> Result<PathBuf, PathError> {
        resolve(p, Path::new("/home/user"), w.map(Path::new))
    }

    #[test]
    fn relative_paths_join_the_home_not_the_workdir() {
        assert_eq!(
            r("a.txt", Some("/work")).unwrap(),
            PathBuf::from("/home/user/a.txt")
        );
        assert_eq!(r("./x/../y", None).unwrap(), PathBuf::from("/home/user/y"));
        assert_eq!(r("../../..", None).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn empty_is_workdir_or_home() {
        assert_eq!(r("", Some("/work")).unwrap(), PathBuf::from("/work"));
        assert_eq!(r("", None).unwrap(), PathBuf::from("/home/user"));
    }

    #[test]
    fn absolute_paths_are_verbatim() {
        assert_eq!(r("/a/../b/", None).unwrap(), PathBuf::from("/a/../b/"));
    }

    #[test]
    fn tilde_expansion() {
        assert_eq!(r("~", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("~/x/y", None).unwrap(), PathBuf::from("/home/user/x/y"));
        assert_eq!(
            r("~root/x", None).unwrap_err().to_string(),
            "cannot expand user-specific home dir: '~root/x'"
        );
    }

    #[test]
    fn nul_is_rejected() {
        assert_eq!(r("a\0b", None), Err(PathError::Nul));
    }
}
