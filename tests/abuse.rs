//! Hostile clients and abusive user code against the real binary (issue 8): requests of
//! any size never wedge the agent, SIGTERM always ends it, a stalled subscriber never
//! holds up others, fork bombs and memory hogs stay inside the user cgroup, a full disk
//! fails an upload cleanly. Behaviour only: timing figures live in the benches.

#![allow(clippy::disallowed_methods)] // the tests run guestd and helpers directly

mod common;

use std::time::{Duration, Instant};

use common::{Client, Codec, Guestd, collect};
use guestd::proto::process as pb;
use http::{Method, StatusCode};

/// Upper bound for anything that must simply finish (a hang guard, not a timing claim).
const HANG: Duration = Duration::from_secs(60);

fn start_req(cmd: &str, args: &[&str], pty: bool) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: Default::default(),
            cwd: None,
        }),
        pty: pty.then_some(pb::Pty {
            size: Some(pb::pty::Size { cols: 80, rows: 24 }),
        }),
        tag: None,
        stdin: Some(false),
    }
}

async fn run(c: &Client, req: &pb::StartRequest) -> common::Run {
    let mut s = c
        .server_stream(Codec::Json, "/process.Process/Start", req, &[])
        .await;
    assert_eq!(s.status, StatusCode::OK);
    tokio::time::timeout(HANG, collect(&mut s))
        .await
        .expect("the Start stream never finished")
}

async fn health(c: &Client) -> StatusCode {
    tokio::time::timeout(HANG, c.fetch(Method::GET, "/health", &[], ""))
        .await
        .expect("/health did not answer")
        .0
}

fn error_of(r: &common::Run) -> (String, String) {
    let e = &r.end_of_stream["error"];
    (
        e["code"].as_str().unwrap_or_default().to_string(),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_of_any_size_never_wedge_the_agent() {
    let g = Guestd::start();
    let c = g.client();
    let long70k = "a".repeat(70_000);
    let long20k = "b".repeat(20_000);
    let mib = "c".repeat(1 << 20);
    let echo = format!("echo {}", "d".repeat(70_000));

    // All at once: two of them used to stop the agent.
    let reqs = [
        start_req(&long70k, &[], false),
        start_req(&long20k, &[], true),
        start_req(&mib, &[], false),
        start_req("/bin/bash", &["-c", &echo], false),
    ];
    let (missing, missing2, pty, huge, valid, h) = tokio::join!(
        run(&c, &reqs[0]),
        run(&c, &reqs[0]),
        run(&c, &reqs[1]),
        run(&c, &reqs[2]),
        run(&c, &reqs[3]),
        health(&c),
    );
    assert_eq!(h, StatusCode::NO_CONTENT);

    // A name too long for the filesystem: a shell-style error, bounded in size.
    for r in [&missing, &missing2] {
        let end = r.end.as_ref().expect("end event");
        assert_eq!(end.exit_code, 126, "{r:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.ends_with("…: File name too long\n"), "{err}");
        assert!(err.len() < 400, "{} bytes of stderr", err.len());
    }
    // The same through a PTY.
    let out = String::from_utf8_lossy(&pty.pty);
    assert!(out.contains("…: File name too long"), "{out}");
    assert_eq!(pty.end.as_ref().expect("end event").exit_code, 126);
    // More than the kernel takes for one argument: invalid_argument, saying so.
    let (code, msg) = error_of(&huge);
    assert_eq!(code, "invalid_argument", "{huge:?}");
    assert!(
        msg.contains("the command is 1048576 bytes")
            && msg.contains("at most 131071 bytes per argument"),
        "{msg}"
    );
    // A long but legal command line runs.
    assert_eq!(valid.stdout.len(), 70_001);
    assert_eq!(valid.end.as_ref().expect("end event").exit_code, 0);

    // Too much in total (each piece legal): also invalid_argument.
    let piece = "e".repeat(100_000);
    let mut args = vec!["-c", "true"];
    args.extend(std::iter::repeat_n(piece.as_str(), 80));
    let total = run(&c, &start_req("/bin/bash", &args, false)).await;
    let (code, msg) = error_of(&total);
    assert_eq!(code, "invalid_argument");
    assert!(msg.contains("the kernel's limit for them here is"), "{msg}");
    // An environment variable over the per-string limit is named.
    let mut req = start_req("/bin/true", &[], false);
    if let Some(p) = req.process.as_mut() {
        p.envs.insert("HUGE".into(), "f".repeat(200_000));
    }
    let env = run(&c, &req).await;
    let (code, msg) = error_of(&env);
    assert_eq!(code, "invalid_argument");
    assert!(
        msg.contains("environment variable HUGE is 200005 bytes"),
        "{msg}"
    );

    // And the agent still serves.
    let ok = run(&c, &start_req("/bin/echo", &["still", "here"], false)).await;
    assert_eq!(ok.stdout, b"still here\n");
    assert_eq!(health(&c).await, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_spawns_leave_health_answering() {
    let g = Guestd::start();
    let c = g.client();
    let mut runs = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        runs.push(tokio::spawn(async move {
            run(
                &c,
                &start_req("/bin/sh", &["-c", &format!("echo {i}")], false),
            )
            .await
        }));
    }
    assert_eq!(health(&c).await, StatusCode::NO_CONTENT);
    for (i, r) in runs.into_iter().enumerate() {
        let r = r.await.expect("task");
        assert_eq!(r.stdout, format!("{i}\n").into_bytes());
    }
}

/// SIGTERM ends guestd within its grace period even with commands running, and the
/// ports are free for the next guestd at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_agent_and_frees_its_port() {
    let mut g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--shutdown-grace-ms",
        "2000",
    ]);
    let c = g.client();
    // Long-lived commands that ignore SIGTERM, with output pipes open.
    let mut streams = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..3 {
        let mut s = c
            .server_stream(
                Codec::Json,
                "/process.Process/Start",
                &start_req("/bin/sh", &["-c", "trap '' TERM; sleep 600"], false),
                &[],
            )
            .await;
        assert_eq!(s.status, StatusCode::OK);
        let first = s.next_message::<pb::StartResponse>().await.expect("start");
        match first.event.and_then(|e| e.event) {
            Some(pb::process_event::Event::Start(st)) => pids.push(st.pid as i32),
            other => panic!("expected a start event, got {other:?}"),
        }
        streams.push(s);
    }
    let pid = g.pid() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + HANG;
    while g.is_alive() {
        assert!(Instant::now() < deadline, "guestd ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The port can be bound again (no child kept the listening socket).
    std::net::TcpListener::bind(("127.0.0.1", g.port)).expect("port still bound");
    drop(streams);
    for p in pids {
        // SAFETY: kill(2) on the process groups this test started.
        unsafe { libc::kill(-p, libc::SIGKILL) };
    }
}
