//! The child's side of a launch: everything between `clone` and `exec`, as one policy
//! written against [`Syscall`], so it is unit-tested with the recording fake.
//!
//! In order: default signal dispositions and an empty mask; join the cgroup(s) (before
//! anything the user's code could fork from; best effort); a new process group, or a
//! new session (with the PTY as controlling terminal); stdin/stdout/stderr; OOM score,
//! nice, I/O priority (best effort); rlimits (best effort); groups, gid, uid; cwd;
//! every other descriptor close-on-exec; then the exec candidates like a shell.
//!
//! The child never writes anything but its 8-byte report (to the close-on-exec report
//! pipe, which has room for it): messages for the user (`cmd: command not found`) are
//! written by the parent, which is not suspended then. A child that could block on a
//! full pipe while its `CLONE_VFORK` parent waits would wedge the spawning thread and
//! keep every guestd descriptor (listening sockets included) open.

use std::ffi::{CStr, c_char};
use std::marker::PhantomData;
use std::os::fd::RawFd;

use super::syscall::{Errno, Syscall};
use super::{Command, ExecTarget, Session};

pub(super) const STAGE_SETSID: u32 = 1;
pub(super) const STAGE_SETPGID: u32 = 2;
pub(super) const STAGE_DUP: u32 = 3;
pub(super) const STAGE_CTTY: u32 = 4;
pub(super) const STAGE_SETGROUPS: u32 = 5;
pub(super) const STAGE_SETGID: u32 = 6;
pub(super) const STAGE_SETUID: u32 = 7;
pub(super) const STAGE_CHDIR: u32 = 8;
/// The exec itself failed (errno in the report; 127/126 for shell-style reporting).
pub(super) const STAGE_EXEC: u32 = 9;

pub(super) fn stage_name(stage: u32) -> &'static str {
    match stage {
        STAGE_SETSID => "setsid",
        STAGE_SETPGID => "setpgid",
        STAGE_DUP => "installing stdio",
        STAGE_CTTY => "setting the controlling terminal",
        STAGE_SETGROUPS => "setgroups",
        STAGE_SETGID => "setgid",
        STAGE_SETUID => "setuid",
        STAGE_CHDIR => "chdir",
        STAGE_EXEC => "exec",
        _ => "child setup",
    }
}

/// Why the child did not exec: the stage and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Failure {
    pub stage: u32,
    pub errno: Errno,
}

impl Failure {
    pub(super) fn to_bytes(self) -> [u8; 8] {
        let mut rec = [0u8; 8];
        rec[..4].copy_from_slice(&self.stage.to_ne_bytes());
        rec[4..].copy_from_slice(&self.errno.to_ne_bytes());
        rec
    }

    pub(super) fn from_bytes(b: [u8; 8]) -> Failure {
        Failure {
            stage: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            errno: i32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// What the child reads after `clone`: raw pointers into the [`Command`] (which
/// outlives the clone call), so the child never allocates.
pub(super) struct ChildCtx<'a> {
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// `["/bin/sh", <script>, args..., NULL]` for ENOEXEC; slot 1 is filled in the child.
    sh_argv: Vec<*const c_char>,
    candidates: Vec<*const c_char>,
    /// `true`: a PATH search (bare name); `false`: a path or nothing.
    search: bool,
    cwd: *const c_char,
    creds: Option<(u32, u32, *const u32, usize)>,
    stdio: [RawFd; 3],
    session: Session,
    pub(super) report_fd: RawFd,
    cgroup_procs: Vec<*const c_char>,
    /// The `cgroup_procs` entry not to write: the child was created in that cgroup.
    pub(super) skip_cgroup: Option<usize>,
    oom_score_adj: Option<i32>,
    nice: Option<i32>,
    ioprio: Option<(u8, u8)>,
    rlimits: Vec<(u32, u64, u64)>,
    _cmd: PhantomData<&'a Command>,
}

const SH: &CStr = c"/bin/sh";

impl<'a> ChildCtx<'a> {
    pub(super) fn new(cmd: &'a Command, stdio: [RawFd; 3], report_fd: RawFd) -> Self {
        let null = std::ptr::null::<c_char>();
        let mut argv: Vec<_> = cmd.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(null);
        let mut envp: Vec<_> = cmd.envp.iter().map(|a| a.as_ptr()).collect();
        envp.push(null);
        let mut sh_argv = vec![SH.as_ptr(), null];
        sh_argv.extend(cmd.argv.iter().skip(1).map(|a| a.as_ptr()));
        sh_argv.push(null);
        let (candidates, search) = match &cmd.exec {
            ExecTarget::Path(p) => (vec![p.as_ptr()], false),
            ExecTarget::Search(list) => (list.iter().map(|c| c.as_ptr()).collect(), true),
            ExecTarget::NotFound => (Vec::new(), true),
        };
        ChildCtx {
            argv,
            envp,
            sh_argv,
            candidates,
            search,
            cwd: cmd.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            creds: cmd
                .creds
                .as_ref()
                .map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len())),
            stdio,
            session: cmd.session,
            report_fd,
            cgroup_procs: cmd.cgroup_procs.iter().map(|c| c.as_ptr()).collect(),
            skip_cgroup: None,
            oom_score_adj: cmd.oom_score_adj,
            nice: cmd.nice,
            ioprio: cmd.ioprio,
            rlimits: cmd
                .rlimits
                .iter()
                .map(|r| (r.resource, r.soft, r.hard))
                .collect(),
            _cmd: PhantomData,
        }
    }
}

/// Moves `fd` to a number >= 3 (close-on-exec) so installing 0/1/2 cannot clobber it.
fn raise<S: Syscall>(sys: &mut S, fd: RawFd) -> Result<RawFd, Errno> {
    if fd >= 3 {
        Ok(fd)
    } else {
        sys.dup_above(fd, 3)
    }
}

fn at(stage: u32) -> impl Fn(Errno) -> Failure {
    move |errno| Failure { stage, errno }
}

/// The child after `clone`: returns only if it did not exec, with the reason.
///
/// # Safety
/// `ctx` must have been built by [`ChildCtx::new`] from a live [`Command`]. With
/// [`super::syscall::Real`] this may only run in a freshly cloned child.
pub(super) unsafe fn run<S: Syscall>(sys: &mut S, ctx: &mut ChildCtx<'_>) -> Failure {
    match setup(sys, ctx) {
        Ok(()) => {}
        Err(f) => return f,
    }
    // SAFETY: the caller's contract (pointers into a live Command).
    unsafe { exec_candidates(sys, ctx) }
}

fn setup<S: Syscall>(sys: &mut S, ctx: &mut ChildCtx<'_>) -> Result<(), Failure> {
    // Default dispositions first (guestd ignores SIGPIPE; its handlers must not run
    // here), then unblock everything (the parent blocked all signals around clone).
    sys.reset_signals();

    // Join the cgroup(s) before the user's code can fork: nothing it starts can be
    // outside. Best effort: a missing cgroup must never fail the spawn.
    for (i, &procs) in ctx.cgroup_procs.iter().enumerate() {
        if ctx.skip_cgroup == Some(i) {
            continue;
        }
        // SAFETY: NUL-terminated strings owned by the Command.
        let _ = sys.join_cgroup(unsafe { CStr::from_ptr(procs) });
    }

    match ctx.session {
        Session::NewSession { .. } => sys.setsid().map_err(at(STAGE_SETSID))?,
        Session::NewGroup => sys.setpgid().map_err(at(STAGE_SETPGID))?,
        Session::Inherit => {}
    }

    let report = raise(sys, ctx.report_fd).map_err(at(STAGE_DUP))?;
    ctx.report_fd = report;
    let mut src = ctx.stdio;
    for fd in src.iter_mut() {
        *fd = raise(sys, *fd).map_err(at(STAGE_DUP))?;
    }
    for (target, fd) in src.iter().enumerate() {
        // Sources are >= 3, so dup2 always creates the target without close-on-exec.
        sys.dup2(*fd, target as RawFd).map_err(at(STAGE_DUP))?;
    }
    if let Session::NewSession { ctty: true } = ctx.session {
        sys.set_controlling_tty(0).map_err(at(STAGE_CTTY))?;
    }

    // Priorities (contract 6.2) and limits: failures are ignored, they must never fail
    // a spawn.
    if let Some(v) = ctx.oom_score_adj {
        let _ = sys.set_oom_score_adj(v);
    }
    if let Some(n) = ctx.nice {
        let _ = sys.set_nice(n);
    }
    if let Some((class, level)) = ctx.ioprio {
        let _ = sys.set_ioprio(class, level);
    }
    for &(resource, soft, hard) in &ctx.rlimits {
        let _ = sys.setrlimit(resource, soft, hard);
    }

    // Credentials: groups, then gid, then uid (after which nothing privileged works).
    if let Some((uid, gid, groups, ngroups)) = ctx.creds {
        // SAFETY: the pointer and length come from the Command's Vec<u32>.
        let groups = unsafe { std::slice::from_raw_parts(groups, ngroups) };
        sys.setgroups(groups).map_err(at(STAGE_SETGROUPS))?;
        sys.setresgid(gid).map_err(at(STAGE_SETGID))?;
        sys.setresuid(uid).map_err(at(STAGE_SETUID))?;
    }

    // As the user: a directory the user cannot enter fails the spawn.
    if !ctx.cwd.is_null() {
        // SAFETY: a NUL-terminated string owned by the Command.
        sys.chdir(unsafe { CStr::from_ptr(ctx.cwd) })
            .map_err(at(STAGE_CHDIR))?;
    }

    sys.cloexec_from(3);
    Ok(())
}

/// Tries the exec candidates like a shell (a PATH search goes on past "not here"
/// errors). Returns the failure of the decisive attempt: for a search that found
/// nothing, ENOENT (127) or, if some candidate was not executable, EACCES (126).
///
/// # Safety
/// As [`run`].
unsafe fn exec_candidates<S: Syscall>(sys: &mut S, ctx: &mut ChildCtx<'_>) -> Failure {
    let mut saw_eacces = false;
    for i in 0..ctx.candidates.len() {
        // SAFETY: NUL-terminated strings owned by the Command.
        let path = unsafe { CStr::from_ptr(ctx.candidates[i]) };
        // SAFETY: NULL-terminated arrays of strings owned by the Command.
        let mut e = unsafe { sys.execve(path, ctx.argv.as_ptr(), ctx.envp.as_ptr()) };
        if e == libc::ENOEXEC {
            // A script without `#!`: run it with /bin/sh, as shells do.
            ctx.sh_argv[1] = ctx.candidates[i];
            // SAFETY: as above; sh_argv is NULL-terminated.
            unsafe { sys.execve(SH, ctx.sh_argv.as_ptr(), ctx.envp.as_ptr()) };
            e = libc::ENOEXEC;
        }
        if !ctx.search {
            return Failure {
                stage: STAGE_EXEC,
                errno: e,
            };
        }
        match e {
            // Not here: keep searching (as execvp does).
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            libc::EACCES => saw_eacces = true,
            other => {
                return Failure {
                    stage: STAGE_EXEC,
                    errno: other,
                };
            }
        }
    }
    Failure {
        stage: STAGE_EXEC,
        errno: if saw_eacces {
            libc::EACCES
        } else {
            libc::ENOENT
        },
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;

    use super::super::syscall::{Call, Recorder};
    use super::super::{Credentials, IOPRIO_CLASS_BE, Rlimit, Stdio};
    use super::*;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn user_cmd() -> Command {
        Command {
            argv: vec![c("ls"), c("-l")],
            envp: vec![c("HOME=/home/u"), c("PATH=/a:/b")],
            exec: ExecTarget::Search(vec![c("/a/ls"), c("/b/ls")]),
            cwd: Some(c("/home/u")),
            creds: Some(Credentials {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 27],
            }),
            session: Session::NewGroup,
            stdio: [Stdio::Null, Stdio::Null, Stdio::Null],
            cgroup_procs: vec![c("/cg/pids/user/cmd-1/cgroup.procs")],
            cgroup_at_clone: None,
            oom_score_adj: Some(100),
            nice: Some(0),
            ioprio: Some((IOPRIO_CLASS_BE, 4)),
            rlimits: vec![Rlimit {
                resource: libc::RLIMIT_NOFILE,
                soft: 1024,
                hard: 524288,
            }],
            shell_errors: None,
        }
    }

    fn run_fake(cmd: &Command, rec: &mut Recorder, stdio: [RawFd; 3]) -> Failure {
        let mut ctx = ChildCtx::new(cmd, stdio, 7);
        // SAFETY: ctx comes from a live Command; the fake makes no system calls.
        unsafe { run(rec, &mut ctx) }
    }

    #[test]
    fn a_user_command_gets_the_whole_policy_in_order() {
        let cmd = user_cmd();
        let mut rec = Recorder::default();
        let f = run_fake(&cmd, &mut rec, [10, 11, 12]);
        let env = vec!["HOME=/home/u".to_string(), "PATH=/a:/b".to_string()];
        let argv = vec!["ls".to_string(), "-l".to_string()];
        assert_eq!(
            rec.calls,
            vec![
                Call::ResetSignals,
                Call::JoinCgroup("/cg/pids/user/cmd-1/cgroup.procs".into()),
                Call::Setpgid,
                Call::Dup2(10, 0),
                Call::Dup2(11, 1),
                Call::Dup2(12, 2),
                Call::OomScoreAdj(100),
                Call::Nice(0),
                Call::Ioprio(IOPRIO_CLASS_BE, 4),
                Call::Rlimit(libc::RLIMIT_NOFILE, 1024, 524288),
                Call::Setgroups(vec![1000, 27]),
                Call::Setresgid(1000),
                Call::Setresuid(1000),
                Call::Chdir("/home/u".into()),
                Call::CloexecFrom(3),
                Call::Execve {
                    path: "/a/ls".into(),
                    argv: argv.clone(),
                    envp: env.clone()
                },
                Call::Execve {
                    path: "/b/ls".into(),
                    argv,
                    envp: env
                },
            ]
        );
        // Nothing execs under the fake: a search that found nothing is ENOENT (127).
        assert_eq!(
            f,
            Failure {
                stage: STAGE_EXEC,
                errno: libc::ENOENT
            }
        );
    }

    #[test]
    fn a_child_created_in_its_v2_leaf_skips_only_that_join() {
        let mut cmd = user_cmd();
        cmd.cgroup_procs = vec![
            c("/cg/unified/user/cmd-1/cgroup.procs"),
            c("/cg/pids/user/cmd-1/cgroup.procs"),
        ];
        let mut rec = Recorder::default();
        let mut ctx = ChildCtx::new(&cmd, [10, 11, 12], 7);
        ctx.skip_cgroup = Some(0);
        // SAFETY: ctx comes from a live Command; the fake makes no system calls.
        unsafe { run(&mut rec, &mut ctx) };
        let joins: Vec<_> = rec
            .calls
            .iter()
            .filter(|c| matches!(c, Call::JoinCgroup(_)))
            .cloned()
            .collect();
        assert_eq!(
            joins,
            vec![Call::JoinCgroup("/cg/pids/user/cmd-1/cgroup.procs".into())]
        );
    }

    #[test]
    fn low_descriptors_are_raised_before_stdio_is_installed() {
        let cmd = user_cmd();
        let mut rec = Recorder::default();
        run_fake(&cmd, &mut rec, [0, 2, 1]);
        let dups: Vec<_> = rec
            .calls
            .iter()
            .filter(|c| matches!(c, Call::DupAbove(..) | Call::Dup2(..)))
            .cloned()
            .collect();
        assert_eq!(
            dups,
            vec![
                Call::DupAbove(0, 3),
                Call::DupAbove(2, 3),
                Call::DupAbove(1, 3),
                Call::Dup2(100, 0),
                Call::Dup2(102, 1),
                Call::Dup2(101, 2),
            ]
        );
    }

    #[test]
    fn a_pty_gets_a_session_and_a_controlling_terminal() {
        let mut cmd = user_cmd();
        cmd.session = Session::NewSession { ctty: true };
        let mut rec = Recorder::default();
        run_fake(&cmd, &mut rec, [9, 9, 9]);
        let names: Vec<_> = rec.calls.iter().take(7).cloned().collect();
        assert_eq!(
            names,
            vec![
                Call::ResetSignals,
                Call::JoinCgroup("/cg/pids/user/cmd-1/cgroup.procs".into()),
                Call::Setsid,
                Call::Dup2(9, 0),
                Call::Dup2(9, 1),
                Call::Dup2(9, 2),
                Call::ControllingTty(0),
            ]
        );
    }

    #[test]
    fn credential_failures_stop_the_child_at_their_stage() {
        for (call, stage) in [
            ("setgroups", STAGE_SETGROUPS),
            ("setresgid", STAGE_SETGID),
            ("setresuid", STAGE_SETUID),
            ("chdir", STAGE_CHDIR),
            ("setpgid", STAGE_SETPGID),
        ] {
            let cmd = user_cmd();
            let mut rec = Recorder {
                fail: vec![(call, libc::EPERM)],
                ..Default::default()
            };
            let f = run_fake(&cmd, &mut rec, [10, 11, 12]);
            assert_eq!(
                f,
                Failure {
                    stage,
                    errno: libc::EPERM
                },
                "{call}"
            );
            assert!(
                !rec.calls.iter().any(|c| matches!(c, Call::Execve { .. })),
                "{call}: must not exec after a failed setup"
            );
        }
    }

    #[test]
    fn best_effort_steps_never_fail_the_spawn() {
        let cmd = user_cmd();
        let mut rec = Recorder {
            fail: vec![
                ("join_cgroup", libc::ENOENT),
                ("set_oom_score_adj", libc::EACCES),
                ("set_nice", libc::EPERM),
                ("set_ioprio", libc::EPERM),
                ("setrlimit", libc::EPERM),
            ],
            exec_errnos: vec![libc::ENOENT, 0],
            ..Default::default()
        };
        let f = run_fake(&cmd, &mut rec, [10, 11, 12]);
        // The second candidate "execs" (errno 0 here: the fake's stand-in for success
        // is simply that the policy reached it).
        assert!(rec.calls.iter().any(|c| matches!(c, Call::Setresuid(1000))));
        assert_eq!(f.stage, STAGE_EXEC);
    }

    #[test]
    fn a_search_goes_on_past_eacces_and_reports_it_at_the_end() {
        let cmd = user_cmd();
        let mut rec = Recorder {
            exec_errnos: vec![libc::EACCES, libc::ENOENT],
            ..Default::default()
        };
        let f = run_fake(&cmd, &mut rec, [10, 11, 12]);
        assert_eq!(f.errno, libc::EACCES);
        // A decisive error stops the search at once.
        let mut rec = Recorder {
            exec_errnos: vec![libc::E2BIG],
            ..Default::default()
        };
        let f = run_fake(&cmd, &mut rec, [10, 11, 12]);
        assert_eq!(f.errno, libc::E2BIG);
        let execs = rec
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Execve { .. }))
            .count();
        assert_eq!(execs, 1);
    }

    #[test]
    fn a_script_without_shebang_runs_under_sh() {
        let mut cmd = user_cmd();
        cmd.exec = ExecTarget::Path(c("./run.sh"));
        let mut rec = Recorder {
            exec_errnos: vec![libc::ENOEXEC, libc::ENOENT],
            ..Default::default()
        };
        let f = run_fake(&cmd, &mut rec, [10, 11, 12]);
        let execs: Vec<_> = rec
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Execve { path, argv, .. } => Some((path.clone(), argv.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            execs,
            vec![
                ("./run.sh".into(), vec!["ls".into(), "-l".into()]),
                (
                    "/bin/sh".into(),
                    vec!["/bin/sh".into(), "./run.sh".into(), "-l".into()]
                ),
            ]
        );
        assert_eq!(f.errno, libc::ENOEXEC);
    }

    #[test]
    fn root_kernels_keep_their_credentials_and_cwd_is_optional() {
        let mut cmd = user_cmd();
        cmd.creds = None;
        cmd.cwd = None;
        let mut rec = Recorder::default();
        run_fake(&cmd, &mut rec, [10, 11, 12]);
        assert!(!rec.calls.iter().any(|c| matches!(
            c,
            Call::Setgroups(_) | Call::Setresgid(_) | Call::Setresuid(_) | Call::Chdir(_)
        )));
    }

    #[test]
    fn reports_round_trip() {
        let f = Failure {
            stage: STAGE_CHDIR,
            errno: libc::EACCES,
        };
        assert_eq!(Failure::from_bytes(f.to_bytes()), f);
    }
}
