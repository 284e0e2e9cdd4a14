//! Tests with real processes (run as root: setuid, PTYs and process groups are real).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::manager::stat_fields;
use super::*;
use crate::sys::reaper;
use crate::sys::users::{SystemUsers, UserDb};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn cfg() -> ManagerConfig {
    ManagerConfig {
        cgroups: None,
        stall_timeout: Duration::from_millis(300),
        agent_path_env: PATH.into(),
        ..ManagerConfig::default()
    }
}

fn mgr_with(cfg: ManagerConfig) -> Arc<ProcessManager> {
    // guestd's main makes itself a subreaper; do the same so orphans are reaped here.
    reaper::become_subreaper().unwrap();
    ProcessManager::new(cfg)
}

fn mgr() -> Arc<ProcessManager> {
    mgr_with(cfg())
}

fn root() -> User {
    SystemUsers.user_by_name("root").unwrap()
}

fn spec(cmd: &str, args: &[&str]) -> StartSpec {
    StartSpec {
        config: CommandConfig {
            cmd: cmd.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: BTreeMap::new(),
            cwd: None,
        },
        cwd: PathBuf::from("/"),
        user: root(),
        global_env: Vec::new(),
        pty: None,
        stdin: false,
        tag: None,
        timeout: None,
    }
}

fn sh(script: &str) -> StartSpec {
    spec("/bin/bash", &["-c", script])
}

#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    /// Every event in order, for ordering checks.
    events: Vec<Event>,
    end: Option<ExitInfo>,
    error: Option<SubscriptionError>,
}

impl Output {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn pty(&self) -> String {
        String::from_utf8_lossy(&self.pty).into_owned()
    }
    fn end(&self) -> &ExitInfo {
        self.end.as_ref().expect("no End event")
    }
}

fn record(out: &mut Output, ev: Event) {
    match &ev {
        Event::Data(OutputKind::Stdout, b) => out.stdout.extend_from_slice(b),
        Event::Data(OutputKind::Stderr, b) => out.stderr.extend_from_slice(b),
        Event::Data(OutputKind::Pty, b) => out.pty.extend_from_slice(b),
        Event::End(info) => out.end = Some(info.clone()),
    }
    out.events.push(ev);
}

/// Reads a subscription to its end (20 s limit).
async fn collect(sub: &mut Subscription) -> Output {
    let mut out = Output::default();
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            ev = sub.next() => match ev {
                None => break,
                Some(Ok(ev)) => record(&mut out, ev),
                Some(Err(e)) => out.error = Some(e),
            },
            _ = &mut deadline => panic!("subscription did not end within 20 s: {out:?}"),
        }
    }
    out
}

/// Reads PTY output until it contains `needle` (10 s limit).
async fn read_until(sub: &mut Subscription, out: &mut Output, needle: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !out.pty().contains(needle) && !out.out().contains(needle) {
            match sub.next().await {
                Some(Ok(ev)) => record(out, ev),
                other => panic!("stream ended before {needle:?}: {other:?} {out:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} within 10 s: {out:?}"));
}

async fn run(m: &ProcessManager, spec: StartSpec) -> (u32, Output) {
    let mut sub = m.start(spec).await.unwrap();
    let out = collect(&mut sub).await;
    (sub.pid(), out)
}

/// `/proc` entries: (pid, state, ppid, pgrp, session).
fn procs() -> Vec<(i32, char, i32, i32, i32)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((state, ppid, pgrp, sid)) = stat_fields(&stat)
        {
            v.push((pid, state, ppid, pgrp, sid));
        }
    }
    v
}

/// Polls until `cond` holds (3 s limit).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn group_members(pgid: u32) -> Vec<i32> {
    procs()
        .into_iter()
        .filter(|p| p.3 == pgid as i32)
        .map(|p| p.0)
        .collect()
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|f| f.0 != 'Z'),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------
// Output, exit status, exec

#[tokio::test]
async fn stdout_and_stderr_are_separate_and_exact() {
    let m = mgr();
    let (_, out) = run(&m, sh(r"printf 'out\000\377'; printf err >&2")).await;
    assert_eq!(out.stdout, b"out\0\xff");
    assert_eq!(out.stderr, b"err");
    assert_eq!(out.end().exit_code, 0);
    assert!(matches!(out.events.last(), Some(Event::End(_))));

    // Many chunks: byte-exact and in order.
    let (_, out) = run(&m, spec("seq", &["1", "100000"])).await;
    let expected: String = (1..=100000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.out(), expected);
    assert!(out.events.len() > 3, "expected several chunks");
    for ev in &out.events {
        if let Event::Data(_, b) = ev {
            assert!(b.len() <= 32 * 1024);
        }
    }
}

#[tokio::test]
async fn exit_codes_and_signals_fill_the_end_event() {
    let m = mgr();
    let (_, out) = run(&m, sh("exit 3")).await;
    assert_eq!(
        out.end(),
        &ExitInfo {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: Some("exit status 3".into()),
            oom_killed: false,
        }
    );
    let (_, out) = run(&m, sh("true")).await;
    assert_eq!(out.end().error, None);
    assert_eq!(out.end().status, "exit status 0");
    let (_, out) = run(&m, sh("kill -TERM $$")).await;
    assert_eq!(
        out.end(),
        &ExitInfo {
            exit_code: -1,
            exited: false,
            status: "signal: terminated".into(),
            error: Some("signal: terminated".into()),
            oom_killed: false,
        }
    );
    // Dispositions are reset: guestd (and the test harness) ignore SIGPIPE, the child
    // must not.
    let (_, out) = run(&m, sh("grep -q Sig /proc/self/status; kill -PIPE $$")).await;
    assert_eq!(out.end().status, "signal: broken pipe");
    let (_, out) = run(
        &m,
        sh("grep SigIgn /proc/self/status; grep SigBlk /proc/self/status"),
    )
    .await;
    assert_eq!(
        out.out(),
        "SigIgn:\t0000000000000000\nSigBlk:\t0000000000000000\n"
    );
}

#[tokio::test]
async fn the_reported_pid_is_the_programs_pid() {
    let m = mgr();
    let (pid, out) = run(&m, sh("echo $$")).await;
    assert_eq!(out.out().trim(), pid.to_string());
    // Own process group (so kills reach the tree), not a new session.
    let (pid, out) = run(&m, spec("sh", &["-c", "cut -d' ' -f5 /proc/$$/stat"])).await;
    assert_eq!(out.out().trim(), pid.to_string());
}

#[tokio::test]
async fn exec_failures_are_shell_style_not_rpc_errors() {
    let m = mgr();
    let (_, out) = run(&m, spec("guestd-no-such-command", &["x"])).await;
    assert_eq!(out.err(), "guestd-no-such-command: command not found\n");
    assert_eq!(out.end().exit_code, 127);

    let (_, out) = run(&m, spec("/nonexistent/prog", &[])).await;
    assert_eq!(out.err(), "/nonexistent/prog: No such file or directory\n");
    assert_eq!(out.end().exit_code, 127);

    let (_, out) = run(&m, spec("", &[])).await;
    assert_eq!(out.err(), ": command not found\n");
    assert_eq!(out.end().exit_code, 127);

    let dir = tempfile::tempdir().unwrap();
    let noexec = dir.path().join("noexec");
    std::fs::write(&noexec, "#!/bin/sh\necho no\n").unwrap();
    let (_, out) = run(&m, spec(noexec.to_str().unwrap(), &[])).await;
    assert_eq!(
        out.err(),
        format!("{}: Permission denied\n", noexec.display())
    );
    assert_eq!(out.end().exit_code, 126);

    // A bare name found only as a non-executable file: Permission denied (126).
    let mut s = spec("noexec", &[]);
    s.config
        .envs
        .insert("PATH".into(), dir.path().display().to_string());
    let (_, out) = run(&m, s).await;
    assert_eq!(out.err(), "noexec: Permission denied\n");
    assert_eq!(out.end().exit_code, 126);

    // A script without #! runs with /bin/sh (ENOEXEC), found through the request's PATH.
    let script = dir.path().join("script");
    std::fs::write(&script, "echo \"hi from script $1\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut s = spec("script", &["arg1"]);
    s.config.envs.insert(
        "PATH".into(),
        format!("/nonexistent:{}", dir.path().display()),
    );
    let (_, out) = run(&m, s).await;
    assert_eq!(out.out(), "hi from script arg1\n");
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn environment_is_layered_and_nothing_else_is_inherited() {
    let m = mgr();
    let mut s = spec("env", &[]);
    s.global_env = vec![
        ("E2B_SANDBOX".into(), "true".into()),
        ("G".into(), "global".into()),
        ("USER".into(), "from-global".into()),
    ];
    s.config.envs.insert("G".into(), "request".into());
    s.config.envs.insert("R".into(), "1".into());
    let (_, out) = run(&m, s).await;
    let mut lines: Vec<String> = out.out().lines().map(String::from).collect();
    lines.sort();
    let path = format!("PATH={PATH}");
    assert_eq!(
        lines,
        [
            "E2B_SANDBOX=true",
            "G=request",
            "HOME=/root",
            "LOGNAME=root",
            path.as_str(),
            "R=1",
            "USER=from-global",
        ]
    );
}

#[tokio::test]
async fn cwd_is_checked_and_used() {
    let m = mgr();
    let mut s = spec("pwd", &[]);
    s.cwd = PathBuf::from("/nonexistent/dir");
    let err = m.start(s).await.unwrap_err();
    assert!(matches!(err, ProcessError::CwdMissing(_)));
    assert_eq!(err.to_string(), "cwd '/nonexistent/dir' does not exist");

    let mut s = spec("pwd", &[]);
    s.cwd = PathBuf::from("/etc/passwd");
    let err = m.start(s).await.unwrap_err();
    assert_eq!(err.to_string(), "cwd '/etc/passwd' is not a directory");

    let mut s = spec("/bin/pwd", &[]);
    s.cwd = PathBuf::from("/usr/share");
    let (_, out) = run(&m, s).await;
    assert_eq!(out.out(), "/usr/share\n");
    assert_eq!(m.live_count(), 0);
}

#[tokio::test]
async fn nul_bytes_in_arguments_fail_the_spawn() {
    let m = mgr();
    let err = m.start(spec("echo", &["a\0b"])).await.unwrap_err();
    assert!(matches!(err, ProcessError::Spawn(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "failed to start process: argument 1 contains a NUL byte"
    );
}

// ---------------------------------------------------------------------------------
// Users

/// A throwaway user with a supplementary group (created once).
fn test_user() -> User {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let status = reaper::global()
            .spawn_command(std::process::Command::new("/bin/sh").args([
                "-c",
                "groupadd -f guestdtg && (id -u guestdtu >/dev/null 2>&1 || \
                 useradd -M -s /bin/sh -G guestdtg guestdtu)",
            ]))
            .map(|(_, waiter)| waiter);
        let waiter = status.unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(waiter).success(), "useradd failed");
    });
    SystemUsers.user_by_name("guestdtu").unwrap()
}

#[tokio::test]
async fn runs_with_the_users_uid_gid_and_groups() {
    let m = mgr();
    let user = std::thread::spawn(test_user).join().unwrap();
    assert!(user.groups.len() >= 2, "{user:?}");
    let mut s = sh("id -u; id -g; id -G; echo $HOME $USER $LOGNAME; cat /proc/self/oom_score_adj");
    s.user = user.clone();
    let (_, out) = run(&m, s).await;
    let lines: Vec<&str> = out
        .stdout
        .split(|b| *b == b'\n')
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    assert_eq!(lines[0], user.uid.to_string(), "{}", out.err());
    assert_eq!(lines[1], user.gid.to_string());
    let mut groups: Vec<u32> = lines[2].split(' ').map(|g| g.parse().unwrap()).collect();
    groups.sort();
    let mut expected = user.groups.clone();
    expected.sort();
    assert_eq!(groups, expected);
    assert_eq!(lines[3], "/home/guestdtu guestdtu guestdtu");
    assert_eq!(lines[4], "100");

    // nobody, in a PTY: the terminal belongs to the user.
    let mut s = sh("id -u; stat -c %u $(tty)");
    s.user = SystemUsers.user_by_name("nobody").unwrap();
    s.pty = Some(PtySize { cols: 80, rows: 24 });
    let (_, out) = run(&m, s).await;
    assert_eq!(out.pty(), "65534\r\n65534\r\n");
}

#[tokio::test]
async fn setup_failure_before_exec_is_a_spawn_error() {
    let m = mgr();
    // A 0700 root directory: the user cannot chdir into it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let mut s = spec("true", &[]);
    s.cwd = dir.path().to_path_buf();
    s.user = SystemUsers.user_by_name("nobody").unwrap();
    let err = m.start(s).await.unwrap_err();
    assert!(matches!(err, ProcessError::Spawn(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "failed to start process: chdir: Permission denied (os error 13)"
    );
    assert_eq!(m.live_count(), 0);
    assert!(m.list().is_empty());
}

// ---------------------------------------------------------------------------------
// stdin

#[tokio::test]
async fn stdin_pipe_and_close_stdin() {
    let m = mgr();
    let mut s = spec("cat", &[]);
    s.stdin = true;
    let mut sub = m.start(s).await.unwrap();
    let sel = Selector::Pid(sub.pid());
    m.send_input(&sel, Input::Stdin(Bytes::from_static(b"hello ")))
        .await
        .unwrap();
    m.send_input(&sel, Input::Stdin(Bytes::from_static(b"world")))
        .await
        .unwrap();
    assert!(matches!(
        m.send_input(&sel, Input::Pty(Bytes::from_static(b"x")))
            .await,
        Err(ProcessError::NotPty)
    ));
    assert!(matches!(
        m.resize(&sel, Some(PtySize { cols: 1, rows: 1 })),
        Err(ProcessError::NotPty)
    ));
    m.resize(&sel, None).unwrap();
    m.close_stdin(&sel).unwrap();
    m.close_stdin(&sel).unwrap();
    let err = m
        .send_input(&sel, Input::Stdin(Bytes::from_static(b"late")))
        .await
        .unwrap_err();
    assert!(matches!(err, ProcessError::StdinNotAvailable));
    assert_eq!(err.to_string(), "stdin not enabled or closed");
    let out = collect(&mut sub).await;
    assert_eq!(out.out(), "hello world");
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn without_stdin_the_child_reads_dev_null() {
    let m = mgr();
    let (_, out) = run(&m, spec("cat", &[])).await;
    assert_eq!(out.stdout, b"");
    assert_eq!(out.end().exit_code, 0);

    let mut sub = m
        .start(sh("readlink /proc/self/fd/0; sleep 0.3"))
        .await
        .unwrap();
    let sel = Selector::Pid(sub.pid());
    assert!(matches!(
        m.send_input(&sel, Input::Stdin(Bytes::from_static(b"x")))
            .await,
        Err(ProcessError::StdinNotAvailable)
    ));
    m.close_stdin(&sel).unwrap();
    let out = collect(&mut sub).await;
    assert_eq!(out.out(), "/dev/null\n");
}

#[tokio::test]
async fn a_child_that_does_not_read_never_blocks_guestd() {
    let m = mgr();
    let mut s = spec("sleep", &["1000"]);
    s.stdin = true;
    let mut sub = m.start(s).await.unwrap();
    let sel = Selector::Pid(sub.pid());
    // Far more than a pipe holds: the write waits, asynchronously.
    let writer = {
        let m = m.clone();
        let sel = sel.clone();
        tokio::spawn(async move {
            m.send_input(&sel, Input::Stdin(Bytes::from(vec![b'x'; 4 << 20])))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!writer.is_finished());
    // The runtime is not blocked: other calls proceed, and CloseStdin aborts the writer.
    assert_eq!(m.list().len(), 1);
    m.close_stdin(&sel).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(ProcessError::StdinNotAvailable)), "{r:?}");
    m.signal(&sel, Signal::Kill).unwrap();
    let out = collect(&mut sub).await;
    assert_eq!(out.end().status, "signal: killed");
}

// ---------------------------------------------------------------------------------
// PTY

fn pty_spec(cmd: &str, args: &[&str]) -> StartSpec {
    let mut s = spec(cmd, args);
    s.pty = Some(PtySize { cols: 80, rows: 24 });
    s
}

#[tokio::test]
async fn pty_output_tty_and_size() {
    let m = mgr();
    let (_, out) = run(&m, pty_spec("tty", &[])).await;
    assert!(out.pty().starts_with("/dev/pts/"), "{out:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(out.end().exit_code, 0);

    let mut sub = m
        .start(pty_spec(
            "/bin/bash",
            &["-c", "stty size; read x; stty size"],
        ))
        .await
        .unwrap();
    let sel = Selector::Pid(sub.pid());
    let mut out = Output::default();
    read_until(&mut sub, &mut out, "24 80").await;
    m.resize(&sel, Some(PtySize { cols: 99, rows: 33 }))
        .unwrap();
    m.send_input(&sel, Input::Pty(Bytes::from_static(b"\n")))
        .await
        .unwrap();
    read_until(&mut sub, &mut out, "33 99").await;
    let rest = collect(&mut sub).await;
    assert_eq!(rest.end().exit_code, 0);
}

#[tokio::test]
async fn pty_ctrl_d_ends_cat_and_stdin_calls_are_refused() {
    let m = mgr();
    let mut sub = m.start(pty_spec("cat", &[])).await.unwrap();
    let sel = Selector::Pid(sub.pid());
    assert!(matches!(
        m.send_input(&sel, Input::Stdin(Bytes::from_static(b"x")))
            .await,
        Err(ProcessError::IsPty)
    ));
    let err = m.close_stdin(&sel).unwrap_err();
    assert!(matches!(err, ProcessError::CloseStdinOnPty));
    assert_eq!(
        err.to_string(),
        "cannot close stdin of a PTY process; send Ctrl+D (0x04) instead"
    );
    m.send_input(&sel, Input::Pty(Bytes::from_static(b"hello\n\x04")))
        .await
        .unwrap();
    let out = collect(&mut sub).await;
    // The echo and cat's copy.
    assert_eq!(out.pty().matches("hello").count(), 2, "{out:?}");
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn killing_an_interactive_pty_shell_kills_its_jobs() {
    let m = mgr();
    let mut sub = m
        .start(pty_spec("/bin/bash", &["--norc", "-i"]))
        .await
        .unwrap();
    let sel = Selector::Pid(sub.pid());
    m.send_input(
        &sel,
        Input::Pty(Bytes::from_static(b"sleep 1000 &\necho JOB=$!.\n")),
    )
    .await
    .unwrap();
    let mut out = Output::default();
    // The echoed command line has "JOB=$!."; the output has digits.
    let job = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = out.pty();
            if let Some(pid) = text
                .split("JOB=")
                .skip(1)
                .find_map(|rest| rest.split('.').next().and_then(|d| d.parse::<i32>().ok()))
            {
                return pid;
            }
            match sub.next().await {
                Some(Ok(ev)) => record(&mut out, ev),
                other => panic!("ended early: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert!(alive(job));
    // The job is in its own process group (job control), in the shell's session.
    m.signal(&sel, Signal::Kill).unwrap();
    let rest = collect(&mut sub).await;
    assert_eq!(rest.end().status, "signal: killed");
    eventually("the background job is gone", || !alive(job)).await;
}

// ---------------------------------------------------------------------------------
// Signals, timeouts, lifetime

#[tokio::test]
async fn signal_kills_the_whole_tree() {
    let m = mgr();
    for sig in [Signal::Kill, Signal::Term] {
        let mut sub = m.start(sh("sleep 1000 & sleep 1000")).await.unwrap();
        let pid = sub.pid();
        eventually("both sleeps started", || group_members(pid).len() >= 3).await;
        m.signal(&Selector::Pid(pid), sig).unwrap();
        let out = collect(&mut sub).await;
        let expected = match sig {
            Signal::Kill => "signal: killed",
            Signal::Term => "signal: terminated",
        };
        assert_eq!(out.end().status, expected);
        eventually("no process left in the group", || {
            group_members(pid).is_empty()
        })
        .await;
    }
}

#[tokio::test]
async fn lifetime_timeout_kills_the_tree() {
    let m = mgr();
    let mut s = sh("sleep 1000 & sleep 1000");
    s.timeout = Some(Duration::from_millis(300));
    let started = Instant::now();
    let mut sub = m.start(s).await.unwrap();
    let pid = sub.pid();
    let out = collect(&mut sub).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out.end().status, "signal: killed");
    eventually("no process left in the group", || {
        group_members(pid).is_empty()
    })
    .await;

    // A process that ends first is not affected.
    let mut s = sh("echo quick");
    s.timeout = Some(Duration::from_secs(5));
    let (_, out) = run(&m, s).await;
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn output_held_by_a_descendant_delays_the_end_until_a_signal() {
    let m = mgr();
    // The background sleep keeps stdout open after bash exits (reference behaviour:
    // no End until the pipes close or a signal arrives).
    let mut sub = m
        .start(sh("echo started; sleep 1000 & exit 5"))
        .await
        .unwrap();
    let pid = sub.pid();
    let mut out = Output::default();
    read_until(&mut sub, &mut out, "started").await;
    let waited = tokio::time::timeout(Duration::from_millis(400), sub.next()).await;
    assert!(waited.is_err(), "End came early: {waited:?}");
    assert_eq!(m.list().len(), 1);
    m.signal(&Selector::Pid(pid), Signal::Kill).unwrap();
    let rest = collect(&mut sub).await;
    // The status is bash's own.
    assert_eq!(rest.end().exit_code, 5);
    eventually("group gone", || group_members(pid).is_empty()).await;

    // A descendant that left the group (new session) is not reachable by the group
    // kill; the End still comes after a short grace.
    let mut sub = m
        .start(sh("setsid sleep 1000 & echo $!; exit 0"))
        .await
        .unwrap();
    let pid = sub.pid();
    let mut out = Output::default();
    read_until(&mut sub, &mut out, "\n").await;
    let stray: i32 = out.out().trim().parse().unwrap();
    eventually("bash exited", || !alive(pid as i32)).await;
    let t = Instant::now();
    m.signal(&Selector::Pid(pid), Signal::Term).unwrap();
    let rest = collect(&mut sub).await;
    assert_eq!(rest.end().exit_code, 0);
    assert!(t.elapsed() < Duration::from_secs(2));
    // SAFETY: kill takes no pointers; cleaning up the test's own stray process.
    unsafe { libc::kill(stray, libc::SIGKILL) };
}

// ---------------------------------------------------------------------------------
// Fan-out

/// A subscriber that never reads is dropped once a buffer behind, with the offset to
/// resume from; the reader next to it gets every byte and never waits for it (the
/// stall timeout is far longer than the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_dropped_and_others_go_on() {
    let m = mgr_with(ManagerConfig {
        pace_bytes: 64 << 10,
        subscriber_buffer_bytes: 256 << 10,
        stall_timeout: Duration::from_secs(600),
        ..cfg()
    });
    let mut fast = m
        .start(spec("head", &["-c", "4000000", "/dev/zero"]))
        .await
        .unwrap();
    let mut stuck = m.connect(&Selector::Pid(fast.pid()), None).unwrap();
    let out = collect(&mut fast).await;
    assert_eq!(out.stdout.len(), 4_000_000);
    assert_eq!(out.end().exit_code, 0);
    assert!(out.error.is_none());

    let err = match stuck.next().await {
        Some(Err(e)) => e,
        other => panic!("expected the lag error first, got {other:?}"),
    };
    let SubscriptionError::Lagged {
        next_offset,
        buffer,
        behind,
    } = err.clone();
    assert_eq!(next_offset, stuck.offset());
    assert_eq!(buffer, 256 << 10);
    assert!(behind > 256 << 10);
    assert!(
        err.to_string().contains("reconnect with replay_from="),
        "{err}"
    );
    assert_eq!(stuck.next().await, None);
}

/// A sole subscriber that stops reading holds the process only for the stall timeout;
/// then the process finishes without it and the subscriber learns it was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sole_subscriber_does_not_hold_the_process() {
    let m = mgr_with(ManagerConfig {
        pace_bytes: 64 << 10,
        subscriber_buffer_bytes: 256 << 10,
        stall_timeout: Duration::from_millis(100),
        ..cfg()
    });
    let mut stuck = m
        .start(spec("head", &["-c", "4000000", "/dev/zero"]))
        .await
        .unwrap();
    let pid = stuck.pid();
    eventually("process ended", || m.list().is_empty()).await;
    assert!(matches!(
        stuck.next().await,
        Some(Err(SubscriptionError::Lagged { .. }))
    ));
    // The End is still there for whoever connects.
    let mut c = m.connect(&Selector::Pid(pid), None).unwrap();
    assert_eq!(collect(&mut c).await.end().exit_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscriber_never_blocks() {
    let m = mgr_with(ManagerConfig {
        pace_bytes: 64 << 10,
        stall_timeout: Duration::from_secs(600),
        ..cfg()
    });
    let mut sub = m
        .start(spec("head", &["-c", "4000000", "/dev/zero"]))
        .await
        .unwrap();
    let gone = m.connect(&Selector::Pid(sub.pid()), None).unwrap();
    drop(gone);
    let out = collect(&mut sub).await;
    assert_eq!(out.stdout.len(), 4_000_000);
}

#[tokio::test]
async fn output_without_subscribers_is_drained() {
    let m = mgr();
    let sub = m
        .start(spec("head", &["-c", "4000000", "/dev/zero"]))
        .await
        .unwrap();
    let pid = sub.pid();
    drop(sub);
    // Nobody reads, yet the process finishes (its output is read and discarded).
    eventually("process ended", || m.list().is_empty()).await;
    let mut c = m.connect(&Selector::Pid(pid), None).unwrap();
    let out = collect(&mut c).await;
    assert!(out.stdout.is_empty());
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn several_subscribers_see_the_same_chunks_in_the_same_order() {
    let m = mgr();
    let mut a = m
        .start(sh(
            "sleep 0.2; for i in $(seq 1 200); do echo out$i; echo err$i >&2; done",
        ))
        .await
        .unwrap();
    let mut b = m.connect(&Selector::Pid(a.pid()), None).unwrap();
    let (oa, ob) = tokio::join!(collect(&mut a), collect(&mut b));
    assert_eq!(oa.events, ob.events);
    assert_eq!(oa.out().lines().count(), 200);
    assert_eq!(oa.err().lines().count(), 200);
}

// ---------------------------------------------------------------------------------
// Replay, retention, registry

fn data(kind: OutputKind, s: &str) -> Event {
    Event::Data(kind, Bytes::copy_from_slice(s.as_bytes()))
}

const THREE_CHUNKS: &str = "printf aaaa; sleep 0.1; printf bbbb >&2; sleep 0.1; printf cccc";

#[tokio::test]
async fn replay_after_exit_from_zero_and_from_the_middle() {
    let m = mgr();
    let (pid, _) = run(&m, sh(THREE_CHUNKS)).await;
    let sel = Selector::Pid(pid);

    let mut c = m.connect(&sel, Some(0)).unwrap();
    assert_eq!(c.pid(), pid);
    assert_eq!(c.replay_offset(), Some(0));
    let out = collect(&mut c).await;
    assert_eq!(
        out.events[..3],
        [
            data(OutputKind::Stdout, "aaaa"),
            data(OutputKind::Stderr, "bbbb"),
            data(OutputKind::Stdout, "cccc")
        ]
    );
    assert_eq!(out.events.len(), 4);
    assert_eq!(out.end().exit_code, 0);

    let mut c = m.connect(&sel, Some(6)).unwrap();
    assert_eq!(c.replay_offset(), Some(6));
    let out = collect(&mut c).await;
    assert_eq!(
        out.events[..2],
        [
            data(OutputKind::Stderr, "bb"),
            data(OutputKind::Stdout, "cccc")
        ]
    );
    assert_eq!(out.events.len(), 3);

    // Without replay (reference behaviour): only the End.
    let mut c = m.connect(&sel, None).unwrap();
    assert_eq!(c.replay_offset(), None);
    let out = collect(&mut c).await;
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn replay_starts_at_the_oldest_retained_byte() {
    let m = mgr_with(ManagerConfig {
        replay_buffer_bytes: 5,
        ..cfg()
    });
    let (pid, _) = run(&m, sh(THREE_CHUNKS)).await;
    let mut c = m.connect(&Selector::Pid(pid), Some(0)).unwrap();
    assert_eq!(c.replay_offset(), Some(7));
    let out = collect(&mut c).await;
    assert_eq!(
        out.events[..2],
        [
            data(OutputKind::Stderr, "b"),
            data(OutputKind::Stdout, "cccc")
        ]
    );
}

#[tokio::test]
async fn replay_of_a_live_process_continues_with_live_output() {
    let m = mgr();
    let mut sub = m
        .start(sh("printf abc; sleep 0.5; printf def"))
        .await
        .unwrap();
    let sel = Selector::Pid(sub.pid());
    let mut out = Output::default();
    read_until(&mut sub, &mut out, "abc").await;
    let mut replay = m.connect(&sel, Some(1)).unwrap();
    let mut live = m.connect(&sel, None).unwrap();
    assert_eq!(replay.replay_offset(), Some(1));
    assert_eq!(live.offset(), 3);
    let (r, l) = tokio::join!(collect(&mut replay), collect(&mut live));
    assert_eq!(r.out(), "bcdef");
    assert_eq!(l.out(), "def");
    assert_eq!(r.end().exit_code, 0);
    assert_eq!(l.end().exit_code, 0);
    assert_eq!(replay.offset(), 6);
}

#[tokio::test]
async fn ended_processes_are_connectable_within_retention_but_not_listed() {
    let m = mgr_with(ManagerConfig {
        exit_retention: Duration::from_millis(300),
        ..cfg()
    });
    let mut live = m.start(spec("sleep", &["1000"])).await.unwrap();
    let mut s = sh("exit 4");
    s.tag = Some("quick".into());
    s.config.envs.insert("K".into(), "V".into());
    s.config.cwd = Some("relative".into());
    let (pid, _) = run(&m, s.clone()).await;

    let list = m.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].pid, live.pid());
    assert_eq!(list[0].config.cmd, "sleep");
    assert_eq!(m.live_count(), 1);

    for sel in [Selector::Pid(pid), Selector::Tag("quick".into())] {
        let mut c = m.connect(&sel, None).unwrap();
        assert_eq!(c.pid(), pid);
        let out = collect(&mut c).await;
        assert_eq!(out.end().exit_code, 4);
        // Input, signals, resize: only for live processes.
        assert!(matches!(
            m.signal(&sel, Signal::Kill),
            Err(ProcessError::NotFound(_))
        ));
        assert!(matches!(
            m.close_stdin(&sel),
            Err(ProcessError::NotFound(_))
        ));
    }

    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = m.connect(&Selector::Pid(pid), None).unwrap_err();
    assert_eq!(err.to_string(), format!("process with pid {pid} not found"));

    // List echoes the request's config verbatim.
    let mut s2 = s.clone();
    s2.config.args = vec!["-c".into(), "sleep 1000".into()];
    let mut tagged = m.start(s2.clone()).await.unwrap();
    let mut list = m.list();
    list.sort_by_key(|p| p.pid);
    let entry = list.iter().find(|p| p.pid == tagged.pid()).unwrap();
    assert_eq!(entry.tag.as_deref(), Some("quick"));
    assert_eq!(entry.config, s2.config);

    m.signal(&Selector::Tag("quick".into()), Signal::Kill)
        .unwrap();
    m.signal(&Selector::Pid(live.pid()), Signal::Kill).unwrap();
    collect(&mut tagged).await;
    collect(&mut live).await;
    assert_eq!(m.live_count(), 0);
}

#[tokio::test]
async fn tags_are_found_among_all_processes_and_replace_retained_ends() {
    let m = mgr();
    let mut untagged = m.start(spec("sleep", &["1000"])).await.unwrap();
    let mut s = spec("sleep", &["1000"]);
    s.tag = Some("one".into());
    let mut one = m.start(s).await.unwrap();
    let mut s = spec("sleep", &["1000"]);
    s.tag = Some("two".into());
    let mut two = m.start(s).await.unwrap();

    let c = m.connect(&Selector::Tag("two".into()), None).unwrap();
    assert_eq!(c.pid(), two.pid());
    let c = m.connect(&Selector::Tag("one".into()), None).unwrap();
    assert_eq!(c.pid(), one.pid());
    let err = m.connect(&Selector::Tag("three".into()), None).unwrap_err();
    assert_eq!(err.to_string(), "process with tag 'three' not found");

    m.signal(&Selector::Tag("one".into()), Signal::Kill)
        .unwrap();
    let out = collect(&mut one).await;
    assert_eq!(out.end().status, "signal: killed");
    // The retained End of "one" is replaced by a new process with the same tag.
    let mut s = sh("echo again; sleep 1000");
    s.tag = Some("one".into());
    let mut again = m.start(s).await.unwrap();
    let mut c = m.connect(&Selector::Tag("one".into()), Some(0)).unwrap();
    assert_eq!(c.pid(), again.pid());
    let mut out = Output::default();
    read_until(&mut c, &mut out, "again").await;

    for sub in [&mut untagged, &mut two, &mut again] {
        m.signal(&Selector::Pid(sub.pid()), Signal::Kill).unwrap();
        collect(sub).await;
    }
    let err = m
        .signal(&Selector::Pid(u32::MAX), Signal::Kill)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("process with pid {} not found", u32::MAX)
    );
}

// ---------------------------------------------------------------------------------
// Reaping

#[tokio::test]
async fn no_zombies_are_left_behind() {
    let m = mgr();
    let (pid, out) = run(&m, sh("sleep 0.2 & echo $!")).await;
    let orphan: i32 = out.out().trim().parse().unwrap();
    // The process itself was reaped before its End.
    assert!(!alive(pid as i32));
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || !alive(pid as i32));
    // The orphan (re-parented to us, the subreaper) is reaped when it exits.
    eventually("orphan reaped", || {
        !Path::new(&format!("/proc/{orphan}")).exists()
    })
    .await;
    // Tests run in parallel, so zombies of other tests may exist for an instant; there
    // must be moments with none.
    let me = std::process::id() as i32;
    eventually("no zombie children", || {
        !procs().iter().any(|p| p.2 == me && p.1 == 'Z')
    })
    .await;
}
