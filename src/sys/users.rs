//! The passwd and group databases: who a username is (uid, gid, groups, home).
//!
//! [`UserDb`] is the seam: [`SystemUsers`] reads the real databases (through libc, so it
//! works the same in the static musl build, which reads `/etc/passwd` and `/etc/group`
//! directly); tests of path resolution and credential planning can use a fixed table.

use std::path::PathBuf;

/// A resolved account: everything a spawn or a path resolution needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Primary gid first, then every supplementary gid (deduplicated).
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name is not in the database (the API answers `unauthenticated` / 401).
    #[error("invalid username: '{0}'")]
    Unknown(String),
    /// The lookup itself failed (the errno is in the message). Running out of
    /// descriptors or memory ([`UserError::is_resource_exhaustion`]) is not an
    /// authentication failure: the API answers `resource_exhausted` / 503 then.
    #[error("error looking up user '{name}': {source}")]
    Lookup {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl UserError {
    /// The lookup failed for lack of a resource (EMFILE, ENFILE, ENOMEM, …): the user
    /// may well exist, and retrying later may work.
    pub fn is_resource_exhaustion(&self) -> bool {
        match self {
            UserError::Unknown(_) => false,
            UserError::Lookup { source, .. } => crate::sys::limits::is_resource_exhaustion(source),
        }
    }

    fn lookup(name: &str, e: nix::errno::Errno) -> UserError {
        match e {
            // getpwnam_r(3): ENOENT and ESRCH also mean "the name was not found".
            nix::errno::Errno::ENOENT | nix::errno::Errno::ESRCH => {
                UserError::Unknown(name.to_string())
            }
            e => UserError::Lookup {
                name: name.to_string(),
                source: std::io::Error::from(e),
            },
        }
    }
}

/// Looks users up by name, and names up by id.
pub trait UserDb: Send + Sync + 'static {
    fn user_by_name(&self, name: &str) -> Result<User, UserError>;
    /// The user name of a uid, if it has one.
    fn user_name(&self, uid: u32) -> Option<String>;
    /// The group name of a gid, if it has one.
    fn group_name(&self, gid: u32) -> Option<String>;
}

/// The machine's own passwd and group databases.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemUsers;

impl UserDb for SystemUsers {
    fn user_by_name(&self, name: &str) -> Result<User, UserError> {
        if name.is_empty() || name.contains('\0') {
            return Err(UserError::Unknown(name.to_string()));
        }
        let pw = match nix::unistd::User::from_name(name) {
            Ok(Some(pw)) => pw,
            Ok(None) => return Err(UserError::Unknown(name.to_string())),
            Err(e) => return Err(UserError::lookup(name, e)),
        };
        let gid = pw.gid.as_raw();
        let mut groups = vec![gid];
        let cname = std::ffi::CString::new(name).map_err(|_| UserError::Unknown(name.into()))?;
        match nix::unistd::getgrouplist(&cname, pw.gid) {
            Ok(list) => {
                for g in list {
                    let g = g.as_raw();
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
            Err(e) => return Err(UserError::lookup(name, e)),
        }
        Ok(User {
            name: pw.name,
            uid: pw.uid.as_raw(),
            gid,
            groups,
            home: pw.dir,
            shell: pw.shell,
        })
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .ok()
            .flatten()
            .map(|g| g.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_with_uid_zero() {
        let root = SystemUsers.user_by_name("root").expect("root");
        assert_eq!(root.uid, 0);
        assert_eq!(root.gid, 0);
        assert_eq!(root.groups[0], 0);
        assert_eq!(root.home, PathBuf::from("/root"));
    }

    #[test]
    fn unknown_user_is_reported_by_name() {
        let err = SystemUsers
            .user_by_name("no-such-user-guestd")
            .expect_err("must not exist");
        assert_eq!(err.to_string(), "invalid username: 'no-such-user-guestd'");
    }

    #[test]
    fn lookup_errors_are_classified() {
        let e = UserError::lookup("user", nix::errno::Errno::EMFILE);
        assert!(e.is_resource_exhaustion());
        assert_eq!(
            e.to_string(),
            "error looking up user 'user': Too many open files (os error 24)"
        );
        assert!(!UserError::lookup("user", nix::errno::Errno::EIO).is_resource_exhaustion());
        assert!(matches!(
            UserError::lookup("ghost", nix::errno::Errno::ENOENT),
            UserError::Unknown(_)
        ));
        assert!(!UserError::Unknown("x".into()).is_resource_exhaustion());
    }

    #[test]
    fn empty_name_is_unknown() {
        assert!(matches!(
            SystemUsers.user_by_name(""),
            Err(UserError::Unknown(_))
        ));
    }
}
