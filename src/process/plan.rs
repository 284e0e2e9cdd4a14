//! The pure part of a spawn: what the child will execute, with which environment and
//! credentials. Everything here is computed before `fork` (the child may not allocate),
//! and nothing here touches the system, so it is unit-tested directly.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use super::StartSpec;
use crate::sys::users::User;

/// A request that cannot be turned into an exec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0} contains a NUL byte")]
    Nul(String),
}

pub use crate::sys::launch::{Credentials, DEFAULT_PATH, ExecTarget, Target, exec_target};

/// Everything the child needs, prepared before `fork`.
#[derive(Debug, Clone)]
pub struct SpawnPlan {
    /// `argv[0]` is `cmd` itself; then the request's args.
    pub argv: Vec<CString>,
    /// The final environment, sorted by name (for logs and tests).
    pub env: Vec<(String, String)>,
    /// The same, as `NAME=value` strings.
    pub envp: Vec<CString>,
    pub exec: ExecTarget,
    pub cwd: CString,
    /// `None` when guestd already runs as the target user and cannot change groups.
    pub creds: Option<Credentials>,
    /// `"<cmd>: "`, the prefix of shell-style exec failure messages.
    pub message_prefix: Vec<u8>,
}

/// Builds the spawn plan for `spec`. `euid`/`egid` are guestd's own effective ids.
pub fn build(
    spec: &StartSpec,
    agent_path: &str,
    euid: u32,
    egid: u32,
) -> Result<SpawnPlan, PlanError> {
    let env = layered_env(agent_path, &spec.user, &spec.global_env, &spec.config.envs);
    let envp = env
        .iter()
        .map(|(k, v)| {
            cstring(format!("{k}={v}").into_bytes(), || {
                format!("environment variable {k}")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let cmd = &spec.config.cmd;
    let mut argv = Vec::with_capacity(spec.config.args.len() + 1);
    argv.push(cstring(cmd.as_bytes().to_vec(), || "command".to_string())?);
    for (i, arg) in spec.config.args.iter().enumerate() {
        argv.push(cstring(arg.as_bytes().to_vec(), || {
            format!("argument {}", i + 1)
        })?);
    }

    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let exec = match exec_target(cmd, path) {
        Target::Path(p) => ExecTarget::Path(cstring(p.into_bytes(), || "command".to_string())?),
        Target::Search(list) => ExecTarget::Search(
            list.into_iter()
                .map(|c| cstring(c.into_bytes(), || "PATH candidate".to_string()))
                .collect::<Result<_, _>>()?,
        ),
        Target::NotFound => ExecTarget::NotFound,
    };

    let cwd = cstring(spec.cwd.as_os_str().as_bytes().to_vec(), || {
        "cwd".to_string()
    })?;
    let creds = credentials(&spec.user, euid, egid);
    let mut message_prefix = cmd.as_bytes().to_vec();
    message_prefix.extend_from_slice(b": ");
    Ok(SpawnPlan {
        argv,
        env,
        envp,
        exec,
        cwd,
        creds,
        message_prefix,
    })
}

/// The child environment, later layers overriding earlier ones (contract 3.3.2):
/// 1. `PATH` = guestd's own (omitted when empty);
/// 2. `HOME`, `USER`, `LOGNAME` of the user;
/// 3. the global variables;
/// 4. the request's variables.
///
/// Nothing else is inherited. Sorted by name.
pub fn layered_env(
    agent_path: &str,
    user: &User,
    global: &[(String, String)],
    request: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    if !agent_path.is_empty() {
        env.insert("PATH".into(), agent_path.into());
    }
    env.insert("HOME".into(), user.home.to_string_lossy().into_owned());
    env.insert("USER".into(), user.name.clone());
    env.insert("LOGNAME".into(), user.name.clone());
    for (k, v) in global {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in request {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

/// The credentials the child switches to. guestd normally runs as root and always
/// switches (even to root, which clears inherited supplementary groups). When guestd is
/// not root and already is the target user, there is nothing to switch (and no privilege
/// to call `setgroups`); any other user is attempted and fails with EPERM, which is the
/// right error.
pub fn credentials(user: &User, euid: u32, egid: u32) -> Option<Credentials> {
    if euid != 0 && user.uid == euid && user.gid == egid {
        return None;
    }
    let mut groups = Vec::with_capacity(user.groups.len() + 1);
    groups.push(user.gid);
    for g in &user.groups {
        if !groups.contains(g) {
            groups.push(*g);
        }
    }
    Some(Credentials {
        uid: user.uid,
        gid: user.gid,
        groups,
    })
}

fn cstring(bytes: Vec<u8>, what: impl FnOnce() -> String) -> Result<CString, PlanError> {
    CString::new(bytes).map_err(|_| PlanError::Nul(what()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::process::CommandConfig;

    fn user() -> User {
        User {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27, 100],
            home: PathBuf::from("/home/alice"),
            shell: PathBuf::from("/bin/bash"),
        }
    }

    fn spec(cmd: &str, envs: &[(&str, &str)]) -> StartSpec {
        StartSpec {
            config: CommandConfig {
                cmd: cmd.into(),
                args: vec!["-c".into(), "echo hi".into()],
                envs: envs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                cwd: None,
            },
            cwd: PathBuf::from("/tmp"),
            user: user(),
            global_env: vec![
                ("E2B_SANDBOX".into(), "true".into()),
                ("USER".into(), "global-user".into()),
                ("G".into(), "global".into()),
            ],
            pty: None,
            stdin: false,
            tag: None,
            timeout: None,
        }
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_layers_override_in_order() {
        let s = spec(
            "bash",
            &[("G", "request"), ("PATH", "/opt/bin"), ("X", "1")],
        );
        let env = layered_env("/usr/bin:/bin", &s.user, &s.global_env, &s.config.envs);
        assert_eq!(
            env,
            pairs(&[
                ("E2B_SANDBOX", "true"),
                ("G", "request"),
                ("HOME", "/home/alice"),
                ("LOGNAME", "alice"),
                ("PATH", "/opt/bin"),
                ("USER", "global-user"),
                ("X", "1"),
            ])
        );
    }

    #[test]
    fn env_has_nothing_else_and_no_empty_path() {
        let u = user();
        let env = layered_env("", &u, &[], &BTreeMap::new());
        assert_eq!(
            env,
            pairs(&[
                ("HOME", "/home/alice"),
                ("LOGNAME", "alice"),
                ("USER", "alice")
            ])
        );
    }

    #[test]
    fn path_resolution_follows_shell_rules() {
        assert_eq!(
            exec_target("ls", Some("/usr/local/bin:/usr/bin/::/bin")),
            Target::Search(vec![
                "/usr/local/bin/ls".into(),
                "/usr/bin/ls".into(),
                "ls".into(),
                "/bin/ls".into(),
            ])
        );
        assert_eq!(
            exec_target("ls", Some("/")),
            Target::Search(vec!["/ls".into()])
        );
        assert_eq!(
            exec_target("ls", None),
            Target::Search(vec!["/bin/ls".into(), "/usr/bin/ls".into()])
        );
        assert_eq!(
            exec_target("./run.sh", Some("/bin")),
            Target::Path("./run.sh".into())
        );
        assert_eq!(
            exec_target("/bin/ls", Some("/x")),
            Target::Path("/bin/ls".into())
        );
        assert_eq!(exec_target("", Some("/bin")), Target::NotFound);
    }

    #[test]
    fn plan_uses_the_final_path_and_keeps_argv_verbatim() {
        let s = spec("tool", &[("PATH", "/opt/a:/opt/b")]);
        let p = build(&s, "/usr/bin", 0, 0).unwrap();
        assert_eq!(
            p.exec,
            ExecTarget::Search(vec![
                CString::new("/opt/a/tool").unwrap(),
                CString::new("/opt/b/tool").unwrap()
            ])
        );
        assert_eq!(
            p.argv,
            vec![
                CString::new("tool").unwrap(),
                CString::new("-c").unwrap(),
                CString::new("echo hi").unwrap()
            ]
        );
        assert!(
            p.envp
                .contains(&CString::new("PATH=/opt/a:/opt/b").unwrap())
        );
        assert_eq!(p.message_prefix, b"tool: ");
        assert_eq!(p.cwd, CString::new("/tmp").unwrap());
    }

    #[test]
    fn nul_bytes_are_rejected_with_the_culprit_named() {
        let mut s = spec("bash", &[]);
        s.config.args[1] = "a\0b".into();
        assert_eq!(
            build(&s, "/bin", 0, 0).unwrap_err().to_string(),
            "argument 2 contains a NUL byte"
        );
        let s = spec("bash", &[("K", "v\0")]);
        assert_eq!(
            build(&s, "/bin", 0, 0).unwrap_err().to_string(),
            "environment variable K contains a NUL byte"
        );
    }

    #[test]
    fn credentials_put_the_primary_group_first() {
        let c = credentials(&user(), 0, 0).unwrap();
        assert_eq!(c.groups, vec![1000, 27, 100]);
        let mut u = user();
        u.groups = vec![5, 1000];
        assert_eq!(credentials(&u, 0, 0).unwrap().groups, vec![1000, 5]);
        // Not root and already the user: nothing to switch.
        assert_eq!(credentials(&user(), 1000, 1000), None);
        // Not root and another user: attempted (and the kernel will refuse).
        assert!(credentials(&user(), 1001, 1001).is_some());
    }
}
