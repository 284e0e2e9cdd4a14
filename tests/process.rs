//! `process.Process` over the real port, with Connect JSON and Connect binary proto.

#![allow(clippy::disallowed_methods)] // the tests run `id`, `useradd` directly; the reaper rule is for guestd

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    Client, Codec, Frame, Guestd, RawStream, Run, basic_auth, collect, collect_rest, envelope,
};
use guestd::proto::process::{self as pb, process_event::Event};
use http::{Method, StatusCode};

const CODECS: [Codec; 2] = [Codec::Json, Codec::Proto];

fn config(cmd: &str, args: &[&str]) -> pb::ProcessConfig {
    pb::ProcessConfig {
        cmd: cmd.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        envs: Default::default(),
        cwd: None,
    }
}

fn sh(script: &str) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(config("/bin/bash", &["-c", script])),
        pty: None,
        tag: None,
        stdin: Some(false),
    }
}

fn by_pid(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Pid(pid)),
    })
}

fn by_tag(tag: &str) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Tag(tag.into())),
    })
}

async fn start(
    c: &Client,
    codec: Codec,
    req: &pb::StartRequest,
    headers: &[(&str, &str)],
) -> RawStream {
    let s = c
        .server_stream(codec, "/process.Process/Start", req, headers)
        .await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(s.headers["content-type"], codec.stream_ct());
    assert_eq!(s.headers["x-accel-buffering"], "no");
    s
}

async fn run(c: &Client, codec: Codec, req: &pb::StartRequest) -> Run {
    let mut s = start(c, codec, req, &[]).await;
    collect(&mut s).await
}

fn end_error(v: &serde_json::Value) -> (String, String) {
    (
        v["error"]["code"].as_str().unwrap_or("").to_string(),
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

/// Waits for the first start event of a stream and returns the pid.
async fn started(s: &mut RawStream) -> u32 {
    match s.next_message::<pb::StartResponse>().await {
        Ok(pb::StartResponse {
            event:
                Some(pb::ProcessEvent {
                    event: Some(Event::Start(st)),
                }),
        }) => st.pid,
        other => panic!("expected a start event, got {other:?}"),
    }
}

/// Reads a stream until `needle` appeared in its output (any stream).
async fn read_until(s: &mut RawStream, needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !out.windows(needle.len()).any(|w| w == needle) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {:?}; got {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&out)
        );
        match s.next_message::<pb::StartResponse>().await {
            Ok(m) => {
                if let Some(Event::Data(d)) = m.event.and_then(|e| e.event) {
                    use pb::process_event::data_event::Output;
                    match d.output {
                        Some(Output::Stdout(b))
                        | Some(Output::Stderr(b))
                        | Some(Output::Pty(b)) => out.extend_from_slice(&b),
                        None => {}
                    }
                }
            }
            Err(end) => panic!(
                "stream ended before {:?}: {end}; output {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}

async fn send_stdin(
    c: &Client,
    codec: Codec,
    pid: u32,
    data: &[u8],
) -> Result<pb::SendInputResponse, common::ConnectError> {
    c.unary(
        codec,
        "/process.Process/SendInput",
        &pb::SendInputRequest {
            process: by_pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Stdin(data.to_vec().into())),
            }),
        },
        &[],
    )
    .await
}

async fn send_pty(c: &Client, pid: u32, data: &[u8]) {
    c.unary::<_, pb::SendInputResponse>(
        Codec::Json,
        "/process.Process/SendInput",
        &pb::SendInputRequest {
            process: by_pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Pty(data.to_vec().into())),
            }),
        },
        &[],
    )
    .await
    .expect("pty input");
}

async fn signal(
    c: &Client,
    sel: Option<pb::ProcessSelector>,
    sig: pb::Signal,
) -> Result<pb::SendSignalResponse, common::ConnectError> {
    c.unary(
        Codec::Json,
        "/process.Process/SendSignal",
        &pb::SendSignalRequest {
            process: sel,
            signal: sig as i32,
        },
        &[],
    )
    .await
}

async fn list(c: &Client) -> Vec<pb::ProcessInfo> {
    c.unary::<_, pb::ListResponse>(
        Codec::Json,
        "/process.Process/List",
        &pb::ListRequest {},
        &[],
    )
    .await
    .expect("list")
    .processes
}

/// Pids of live processes in process group `pgid` (zombies excluded).
fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

/// Zombie children of `ppid`.
fn zombie_children(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[1] == ppid.to_string() && fields[0] == "Z" {
            out.push(pid);
        }
    }
    out
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ------------------------------------------------------------------------------
// Start, output and end events

#[tokio::test]
async fn start_reports_pid_output_and_end_in_both_codecs() {
    let g = Guestd::start();
    let c = g.client();
    for codec in CODECS {
        let r = run(&c, codec, &sh("printf out; printf err >&2; exit 0")).await;
        assert!(r.pid > 0);
        assert_eq!(r.stdout, b"out");
        assert_eq!(r.stderr, b"err");
        let end = r.end.expect("end event");
        assert_eq!(
            (end.exit_code, end.exited, end.status.as_str(), end.error),
            (0, true, "exit status 0", None)
        );
        assert_eq!(r.end_of_stream, serde_json::json!({}));
    }
}

#[tokio::test]
async fn end_event_json_matches_the_contract_exactly() {
    let g = Guestd::start();
    let c = g.client();
    let mut s = start(&c, Codec::Json, &sh("exit 3"), &[]).await;
    let mut frames = Vec::new();
    while let Some(f) = s.next_frame().await {
        frames.push(f);
    }
    let msgs: Vec<String> = frames
        .iter()
        .map(|f| match f {
            Frame::Message(b) => String::from_utf8(b.to_vec()).unwrap(),
            Frame::End(v) => format!("END {v}"),
        })
        .collect();
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    assert!(
        msgs[0].starts_with(r#"{"event":{"start":{"pid":"#),
        "{}",
        msgs[0]
    );
    assert_eq!(
        msgs[1],
        r#"{"event":{"end":{"exitCode":3,"exited":true,"status":"exit status 3","error":"exit status 3"}}}"#
    );
    assert_eq!(msgs[2], "END {}");
}

#[tokio::test]
async fn output_bytes_are_exact_including_broken_utf8_and_long_output() {
    let g = Guestd::start();
    let c = g.client();
    let r = run(
        &c,
        Codec::Json,
        &sh(r"printf '\xff\xfe\xc3'; printf 'ok\n'"),
    )
    .await;
    assert_eq!(r.stdout, b"\xff\xfe\xc3ok\n");
    // 5 MB in many chunks, byte-exact.
    let r = run(
        &c,
        Codec::Proto,
        &sh("head -c 5000000 /dev/urandom | base64 -w 0 | head -c 5000000"),
    )
    .await;
    assert_eq!(r.stdout.len(), 5_000_000);
    assert!(
        r.stdout
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
    );
}

#[tokio::test]
async fn killed_by_signal_reports_signal_fields() {
    let g = Guestd::start();
    let c = g.client();
    let r = run(&c, Codec::Json, &sh("kill -TERM $$")).await;
    let end = r.end.unwrap();
    assert_eq!((end.exit_code, end.exited), (-1, false));
    assert_eq!(end.status, "signal: terminated");
    assert_eq!(end.error.as_deref(), Some("signal: terminated"));
    let r = run(&c, Codec::Json, &sh("kill -SEGV $$")).await;
    assert!(
        r.end
            .unwrap()
            .status
            .starts_with("signal: segmentation fault")
    );
}

#[tokio::test]
async fn missing_command_starts_and_exits_127() {
    let g = Guestd::start();
    let c = g.client();
    let req = pb::StartRequest {
        process: Some(config("no-such-command-guestd", &[])),
        ..Default::default()
    };
    let r = run(&c, Codec::Json, &req).await;
    assert!(r.pid > 0, "a pid is reported");
    assert_eq!(r.end.unwrap().exit_code, 127);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("no-such-command-guestd") && err.contains("not found"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_cwd_is_invalid_argument_without_start() {
    let g = Guestd::start();
    let c = g.client();
    let mut req = sh("true");
    req.process.as_mut().unwrap().cwd = Some("/does/not/exist".into());
    let r = run(&c, Codec::Json, &req).await;
    assert_eq!(r.pid, 0, "no start event");
    assert_eq!(
        end_error(&r.end_of_stream),
        (
            "invalid_argument".into(),
            "cwd '/does/not/exist' does not exist".into()
        )
    );
}

// ------------------------------------------------------------------------------
// Environment, cwd and users

#[tokio::test]
async fn environment_is_layered_and_nothing_else_is_inherited() {
    let g = Guestd::start();
    let c = g.client();
    let mut req = pb::StartRequest {
        process: Some(config("/usr/bin/env", &[])),
        ..Default::default()
    };
    req.process.as_mut().unwrap().envs = [
        ("FOO".to_string(), "bar baz".to_string()),
        ("HOME".to_string(), "/custom".to_string()),
    ]
    .into_iter()
    .collect();
    let r = run(&c, Codec::Json, &req).await;
    let env: BTreeMap<String, String> = String::from_utf8(r.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(env["FOO"], "bar baz");
    assert_eq!(
        env["HOME"], "/custom",
        "request envs override the user's HOME"
    );
    assert_eq!(env["USER"], "root");
    assert_eq!(env["LOGNAME"], "root");
    assert!(env.contains_key("PATH"));
    let keys: Vec<&str> = env.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        vec!["E2B_SANDBOX", "FOO", "HOME", "LOGNAME", "PATH", "USER"]
    );
}

#[tokio::test]
async fn cwd_resolves_against_home_and_default_workdir() {
    let work = tempfile::tempdir().unwrap();
    let g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--default-workdir",
        work.path().to_str().unwrap(),
    ]);
    let c = g.client();
    let r = run(&c, Codec::Json, &sh("pwd")).await;
    assert_eq!(
        String::from_utf8(r.stdout).unwrap().trim(),
        work.path().to_str().unwrap(),
        "default workdir"
    );
    let mut req = sh("pwd");
    req.process.as_mut().unwrap().cwd = Some(".".into());
    let r = run(&c, Codec::Json, &req).await;
    assert_eq!(
        String::from_utf8(r.stdout).unwrap().trim(),
        "/root",
        "relative cwd joins the home"
    );
    req.process.as_mut().unwrap().cwd = Some("/tmp".into());
    let r = run(&c, Codec::Json, &req).await;
    assert_eq!(String::from_utf8(r.stdout).unwrap().trim(), "/tmp");
}

fn ensure_test_user() -> &'static str {
    const NAME: &str = "guestdtest";
    let exists = std::process::Command::new("id")
        .arg(NAME)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        let _ = std::process::Command::new("groupadd")
            .arg("guestdextra")
            .status();
        let st = std::process::Command::new("useradd")
            .args(["-m", "-s", "/bin/bash", "-G", "guestdextra", NAME])
            .status()
            .expect("useradd");
        assert!(
            st.success()
                || std::process::Command::new("id")
                    .arg(NAME)
                    .status()
                    .unwrap()
                    .success()
        );
    }
    NAME
}

#[tokio::test]
async fn runs_as_the_user_from_basic_auth_with_groups() {
    let name = ensure_test_user();
    let g = Guestd::start();
    let c = g.client();
    let expected = |flag: &str| {
        String::from_utf8(
            std::process::Command::new("id")
                .args([flag, name])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
    };
    let auth = basic_auth(name);
    let mut s = start(
        &c,
        Codec::Json,
        &sh("id -u; id -g; id -G; echo $HOME; pwd"),
        &[("authorization", &auth)],
    )
    .await;
    let r = collect(&mut s).await;
    let out = String::from_utf8(r.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], expected("-u").trim());
    assert_eq!(lines[1], expected("-g").trim());
    let mut got: Vec<&str> = lines[2].split(' ').collect();
    let exp_g = expected("-G");
    let mut exp: Vec<&str> = exp_g.trim().split(' ').collect();
    got.sort();
    exp.sort();
    assert_eq!(got, exp, "supplementary groups");
    assert_eq!(lines[3], format!("/home/{name}"));
    assert_eq!(
        lines[4],
        format!("/home/{name}"),
        "cwd defaults to the user's home"
    );
}

#[tokio::test]
async fn unknown_user_is_unauthenticated() {
    let g = Guestd::start();
    let c = g.client();
    let auth = basic_auth("nobody-guestd-x");
    let mut s = start(&c, Codec::Json, &sh("true"), &[("authorization", &auth)]).await;
    let r = collect(&mut s).await;
    assert_eq!(
        end_error(&r.end_of_stream),
        (
            "unauthenticated".into(),
            "invalid username: 'nobody-guestd-x'".into()
        )
    );
}

// ------------------------------------------------------------------------------
// stdin

#[tokio::test]
async fn stdin_pipe_send_input_and_close() {
    let g = Guestd::start();
    let c = g.client();
    for codec in CODECS {
        // The sleep keeps the process alive across both CloseStdin calls: once it has
        // ended, CloseStdin is `not_found` (as in the reference).
        let mut req = sh("cat; echo closed; sleep 1");
        req.stdin = Some(true);
        let mut s = start(&c, codec, &req, &[]).await;
        let pid = started(&mut s).await;
        send_stdin(&c, codec, pid, b"hello\n").await.expect("send");
        read_until(&mut s, b"hello\n").await;
        for _ in 0..2 {
            // idempotent
            c.unary::<_, pb::CloseStdinResponse>(
                codec,
                "/process.Process/CloseStdin",
                &pb::CloseStdinRequest {
                    process: by_pid(pid),
                },
                &[],
            )
            .await
            .expect("close stdin");
        }
        let r = collect_rest(&mut s, pid).await;
        assert_eq!(r.stdout, b"closed\n");
        assert_eq!(r.end.unwrap().exit_code, 0);
    }
}

#[tokio::test]
async fn stdin_defaults() {
    let g = Guestd::start();
    let c = g.client();
    // stdin=false: /dev/null, so cat ends at once.
    let r = run(&c, Codec::Json, &sh("cat; readlink /proc/self/fd/0")).await;
    assert_eq!(String::from_utf8(r.stdout).unwrap().trim(), "/dev/null");
    // stdin unset: a pipe (legacy default).
    let mut req = sh("readlink /proc/self/fd/0");
    req.stdin = None;
    let r = run(&c, Codec::Json, &req).await;
    assert!(String::from_utf8(r.stdout).unwrap().starts_with("pipe:"));
}

#[tokio::test]
async fn input_to_a_process_without_stdin_is_internal() {
    let g = Guestd::start();
    let c = g.client();
    let mut s = start(&c, Codec::Json, &sh("sleep 5"), &[]).await;
    let pid = started(&mut s).await;
    let e = send_stdin(&c, Codec::Json, pid, b"x").await.unwrap_err();
    assert_eq!(
        (e.http_status, e.code.as_str(), e.message.as_str()),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "stdin not enabled or closed"
        )
    );
    // CloseStdin on it is still fine (idempotent).
    c.unary::<_, pb::CloseStdinResponse>(
        Codec::Json,
        "/process.Process/CloseStdin",
        &pb::CloseStdinRequest {
            process: by_pid(pid),
        },
        &[],
    )
    .await
    .expect("close stdin");
    signal(&c, by_pid(pid), pb::Signal::Sigkill).await.unwrap();
}

#[tokio::test]
async fn stream_input_writes_in_order() {
    let g = Guestd::start();
    let c = g.client();
    let mut req = sh("cat");
    req.stdin = Some(true);
    let mut s = start(&c, Codec::Json, &req, &[]).await;
    let pid = started(&mut s).await;
    let msgs = [
        pb::StreamInputRequest {
            event: Some(pb::stream_input_request::Event::Start(
                pb::stream_input_request::StartEvent {
                    process: by_pid(pid),
                },
            )),
        },
        pb::StreamInputRequest {
            event: Some(pb::stream_input_request::Event::Data(
                pb::stream_input_request::DataEvent {
                    input: Some(pb::ProcessInput {
                        input: Some(pb::process_input::Input::Stdin(b"one ".to_vec().into())),
                    }),
                },
            )),
        },
        pb::StreamInputRequest {
            event: Some(pb::stream_input_request::Event::Keepalive(
                pb::stream_input_request::KeepAlive {},
            )),
        },
        pb::StreamInputRequest {
            event: Some(pb::stream_input_request::Event::Data(
                pb::stream_input_request::DataEvent {
                    input: Some(pb::ProcessInput {
                        input: Some(pb::process_input::Input::Stdin(b"two\n".to_vec().into())),
                    }),
                },
            )),
        },
    ];
    let mut body = Vec::new();
    for m in &msgs {
        body.extend_from_slice(&envelope(0, &serde_json::to_vec(m).unwrap()));
    }
    let resp = c
        .send(
            Method::POST,
            "/process.Process/StreamInput",
            &[("content-type", "application/connect+json")],
            body,
        )
        .await;
    let mut rs = RawStream::new(resp, Codec::Json);
    assert_eq!(rs.status, StatusCode::OK);
    match rs.next_frame().await {
        Some(Frame::Message(b)) => assert_eq!(&b[..], b"{}"),
        other => panic!("expected the empty response message, got {other:?}"),
    }
    assert!(matches!(rs.next_frame().await, Some(Frame::End(v)) if v == serde_json::json!({})));
    read_until(&mut s, b"one two\n").await;
    signal(&c, by_pid(pid), pb::Signal::Sigkill).await.unwrap();
}

#[tokio::test]
async fn stream_input_data_before_start_is_rejected() {
    let g = Guestd::start();
    let c = g.client();
    let m = pb::StreamInputRequest {
        event: Some(pb::stream_input_request::Event::Data(
            pb::stream_input_request::DataEvent {
                input: Some(pb::ProcessInput {
                    input: Some(pb::process_input::Input::Stdin(b"x".to_vec().into())),
                }),
            },
        )),
    };
    let body = envelope(0, &serde_json::to_vec(&m).unwrap());
    let resp = c
        .send(
            Method::POST,
            "/process.Process/StreamInput",
            &[("content-type", "application/connect+json")],
            body,
        )
        .await;
    let mut rs = RawStream::new(resp, Codec::Json);
    match rs.next_frame().await {
        Some(Frame::End(v)) => {
            let (code, msg) = end_error(&v);
            assert_eq!(code, "invalid_argument");
            assert!(msg.contains("before `start`"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------------------------
// PTY

#[tokio::test]
async fn pty_io_resize_and_misuse() {
    let g = Guestd::start();
    let c = g.client();
    let req = pb::StartRequest {
        process: Some(config("/bin/bash", &["-i"])),
        pty: Some(pb::Pty {
            size: Some(pb::pty::Size { cols: 80, rows: 24 }),
        }),
        tag: Some("term".into()),
        stdin: None,
    };
    let mut s = start(&c, Codec::Json, &req, &[]).await;
    let pid = started(&mut s).await;
    send_pty(&c, pid, b"tty; stty size\n").await;
    let out = read_until(&mut s, b"24 80").await;
    assert!(String::from_utf8_lossy(&out).contains("/dev/pts/"));
    c.unary::<_, pb::UpdateResponse>(
        Codec::Json,
        "/process.Process/Update",
        &pb::UpdateRequest {
            process: by_pid(pid),
            pty: Some(pb::Pty {
                size: Some(pb::pty::Size {
                    cols: 100,
                    rows: 30,
                }),
            }),
        },
        &[],
    )
    .await
    .expect("resize");
    send_pty(&c, pid, b"stty size\n").await;
    read_until(&mut s, b"30 100").await;
    // stdin input and CloseStdin are PTY misuse.
    let e = send_stdin(&c, Codec::Json, pid, b"x").await.unwrap_err();
    assert_eq!(e.code, "internal");
    let e = c
        .unary::<_, pb::CloseStdinResponse>(
            Codec::Json,
            "/process.Process/CloseStdin",
            &pb::CloseStdinRequest {
                process: by_pid(pid),
            },
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "unknown");
    assert!(e.message.contains("0x04"), "{}", e.message);
    // Ctrl-D ends the shell.
    send_pty(&c, pid, b"exit 4\n").await;
    let r = collect_rest(&mut s, pid).await;
    assert_eq!(r.end.unwrap().exit_code, 4);
}

#[tokio::test]
async fn pty_input_and_resize_on_a_pipe_process_are_internal() {
    let g = Guestd::start();
    let c = g.client();
    let mut s = start(&c, Codec::Json, &sh("sleep 5"), &[]).await;
    let pid = started(&mut s).await;
    let e = c
        .unary::<_, pb::UpdateResponse>(
            Codec::Json,
            "/process.Process/Update",
            &pb::UpdateRequest {
                process: by_pid(pid),
                pty: Some(pb::Pty {
                    size: Some(pb::pty::Size { cols: 10, rows: 10 }),
                }),
            },
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "internal");
    // Update without a size is a no-op.
    c.unary::<_, pb::UpdateResponse>(
        Codec::Json,
        "/process.Process/Update",
        &pb::UpdateRequest {
            process: by_pid(pid),
            pty: None,
        },
        &[],
    )
    .await
    .expect("no-op update");
    signal(&c, by_pid(pid), pb::Signal::Sigkill).await.unwrap();
}

// ------------------------------------------------------------------------------
// List, Connect, tags, retention

#[tokio::test]
async fn list_shows_live_processes_with_their_original_config() {
    let g = Guestd::start();
    let c = g.client();
    let mut req = sh("sleep 30");
    req.tag = Some("sleeper".into());
    req.process.as_mut().unwrap().envs = [("A".to_string(), "1".to_string())].into_iter().collect();
    req.process.as_mut().unwrap().cwd = Some("/tmp".into());
    let mut s = start(&c, Codec::Json, &req, &[]).await;
    let pid = started(&mut s).await;
    let l = list(&c).await;
    let p = l.iter().find(|p| p.pid == pid).expect("listed");
    assert_eq!(p.tag.as_deref(), Some("sleeper"));
    assert_eq!(p.config.as_ref(), req.process.as_ref());
    signal(&c, by_tag("sleeper"), pb::Signal::Sigterm)
        .await
        .expect("signal by tag");
    let r = collect_rest(&mut s, pid).await;
    assert_eq!(r.end.unwrap().status, "signal: terminated");
    assert!(
        list(&c).await.iter().all(|p| p.pid != pid),
        "ended processes leave the list"
    );
}

#[tokio::test]
async fn connect_follows_live_output_and_retains_the_end() {
    let g = Guestd::start();
    let c = g.client();
    let mut req = sh("echo before; read x; echo after; exit 5");
    req.stdin = Some(true);
    let mut s = start(&c, Codec::Json, &req, &[]).await;
    let pid = started(&mut s).await;
    read_until(&mut s, b"before\n").await;
    let mut conn = c
        .server_stream(
            Codec::Proto,
            "/process.Process/Connect",
            &pb::ConnectRequest {
                process: by_pid(pid),
                replay_from: None,
            },
            &[],
        )
        .await;
    assert_eq!(started(&mut conn).await, pid);
    send_stdin(&c, Codec::Json, pid, b"\n").await.unwrap();
    let rc = collect_rest(&mut conn, pid).await;
    assert_eq!(rc.stdout, b"after\n", "no replay of earlier output");
    assert_eq!(rc.end.unwrap().exit_code, 5);
    drop(s);
    // After exit, within retention: start then the retained end, no data.
    let mut again = c
        .server_stream(
            Codec::Json,
            "/process.Process/Connect",
            &pb::ConnectRequest {
                process: by_pid(pid),
                replay_from: None,
            },
            &[],
        )
        .await;
    let r = collect(&mut again).await;
    assert_eq!(r.pid, pid);
    assert!(r.stdout.is_empty());
    assert_eq!(r.end.unwrap().exit_code, 5);
}

#[tokio::test]
async fn connect_to_unknown_process_is_not_found() {
    let g = Guestd::start();
    let c = g.client();
    let mut s = c
        .server_stream(
            Codec::Json,
            "/process.Process/Connect",
            &pb::ConnectRequest {
                process: by_pid(999_999),
                replay_from: None,
            },
            &[],
        )
        .await;
    assert_eq!(s.status, StatusCode::OK);
    let r = collect(&mut s).await;
    assert_eq!(
        end_error(&r.end_of_stream),
        (
            "not_found".into(),
            "process with pid 999999 not found".into()
        )
    );
    let e = signal(&c, by_tag("no-such-tag"), pb::Signal::Sigkill)
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status, e.code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert!(e.message.contains("no-such-tag"), "{}", e.message);
}

#[tokio::test]
async fn replay_on_connect_returns_retained_output() {
    let g = Guestd::start();
    let c = g.client();
    let mut req = sh("printf 'first\\n'; read x; printf 'second\\n'");
    req.stdin = Some(true);
    let mut s = start(&c, Codec::Json, &req, &[]).await;
    let pid = started(&mut s).await;
    read_until(&mut s, b"first\n").await;
    drop(s); // the client goes away; the process keeps running
    // Replay everything retained.
    let mut all = c
        .server_stream(
            Codec::Json,
            "/process.Process/Connect",
            &pb::ConnectRequest {
                process: by_pid(pid),
                replay_from: Some(0),
            },
            &[],
        )
        .await;
    match all.next_message::<pb::ConnectResponse>().await {
        Ok(pb::ConnectResponse {
            event:
                Some(pb::ProcessEvent {
                    event: Some(Event::Start(st)),
                }),
        }) => {
            assert_eq!((st.pid, st.replay_offset), (pid, Some(0)));
        }
        other => panic!("{other:?}"),
    }
    read_until(&mut all, b"first\n").await;
    // Resume from offset 3: the tail of the first chunk only.
    let mut tail = c
        .server_stream(
            Codec::Proto,
            "/process.Process/Connect",
            &pb::ConnectRequest {
                process: by_pid(pid),
                replay_from: Some(3),
            },
            &[],
        )
        .await;
    let _ = started(&mut tail).await;
    let got = read_until(&mut tail, b"st\n").await;
    assert_eq!(got, b"st\n");
    send_stdin(&c, Codec::Json, pid, b"\n").await.unwrap();
    let r = collect_rest(&mut tail, pid).await;
    assert_eq!(r.stdout, b"second\n");
    // After exit, replay still works within retention.
    let mut after = c
        .server_stream(
            Codec::Json,
            "/process.Process/Connect",
            &pb::ConnectRequest {
                process: by_pid(pid),
                replay_from: Some(0),
            },
            &[],
        )
        .await;
    let r = collect(&mut after).await;
    assert_eq!(r.stdout, b"first\nsecond\n");
    assert_eq!(r.end.unwrap().exit_code, 0);
}

// ------------------------------------------------------------------------------
// Signals, timeouts, tree kill, reaping

#[tokio::test]
async fn sigkill_takes_down_the_whole_tree() {
    let g = Guestd::start();
    let c = g.client();
    let mut s = start(&c, Codec::Json, &sh("sleep 1000 & sleep 1000"), &[]).await;
    let pid = started(&mut s).await;
    eventually("both sleeps run", || group_members(pid).len() >= 3).await;
    signal(&c, by_pid(pid), pb::Signal::Sigkill).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), collect_rest(&mut s, pid))
        .await
        .expect("end promptly");
    assert_eq!(r.end.unwrap().status, "signal: killed");
    eventually("no process of the tree is left", || {
        group_members(pid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn start_timeout_is_the_process_lifetime() {
    let g = Guestd::start();
    let c = g.client();
    let mut s = start(
        &c,
        Codec::Json,
        &sh("sleep 1000 & sleep 1000"),
        &[("connect-timeout-ms", "700")],
    )
    .await;
    let pid = started(&mut s).await;
    let r = collect_rest(&mut s, pid).await;
    assert_eq!(end_error(&r.end_of_stream).0, "deadline_exceeded");
    eventually("the timeout killed the tree", || {
        group_members(pid).is_empty()
    })
    .await;
    eventually("the process left the list", || true).await;
    let l = list(&c).await;
    assert!(l.iter().all(|p| p.pid != pid));
}

#[tokio::test]
async fn orphans_are_reaped_and_tracked_statuses_survive() {
    let g = Guestd::start();
    let c = g.client();
    // The middle shell exits at once; its background child is re-parented to guestd
    // (a subreaper) and exits later.
    for _ in 0..5 {
        let r = run(&c, Codec::Json, &sh("( (sleep 0.2; exit 9) & ); exit 6")).await;
        assert_eq!(r.end.unwrap().exit_code, 6, "tracked status not stolen");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let gpid = g.pid();
    eventually("no zombie children of guestd", || {
        zombie_children(gpid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn keepalives_flow_after_silence() {
    let g = Guestd::start();
    let c = g.client();
    let mut s = start(
        &c,
        Codec::Json,
        &sh("sleep 2.5"),
        &[("keepalive-ping-interval", "1")],
    )
    .await;
    let r = collect(&mut s).await;
    assert!(r.keepalives >= 1, "keepalives: {}", r.keepalives);
    assert_eq!(r.end.unwrap().exit_code, 0);
}

#[tokio::test]
async fn a_stalled_subscriber_never_blocks_the_process_or_others() {
    let g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--output-stall-timeout-ms",
        "500",
    ]);
    let c = g.client();
    let mut req = sh("read x; head -c 30000000 /dev/zero | tr '\\0' a; echo; echo done");
    req.stdin = Some(true);
    // The Start stream stalls: we stop reading it after the start event.
    let mut stalled = start(&c, Codec::Json, &req, &[]).await;
    let pid = started(&mut stalled).await;
    let mut reader = c
        .server_stream(
            Codec::Proto,
            "/process.Process/Connect",
            &pb::ConnectRequest {
                process: by_pid(pid),
                replay_from: None,
            },
            &[],
        )
        .await;
    let _ = started(&mut reader).await;
    send_stdin(&c, Codec::Json, pid, b"\n").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), collect_rest(&mut reader, pid))
        .await
        .expect("the reader finishes");
    assert_eq!(r.stdout.len(), 30_000_000 + "\ndone\n".len());
    assert!(r.stdout.ends_with(b"a\ndone\n"));
    assert_eq!(r.end.unwrap().exit_code, 0);
    // The stalled subscriber was dropped with a clear error after what it had queued.
    let s = collect_rest(&mut stalled, pid).await;
    assert!(s.end.is_none());
    let (code, msg) = end_error(&s.end_of_stream);
    assert_eq!(code, "resource_exhausted");
    assert!(msg.contains("replay"), "{msg}");
}

// ------------------------------------------------------------------------------
// Bad input

#[tokio::test]
async fn bad_input_gets_clear_connect_errors() {
    let g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--max-message-bytes",
        "4096",
    ]);
    let c = g.client();
    let json = [("content-type", "application/json")];

    // Invalid JSON.
    let (st, _, body) = c
        .fetch(Method::POST, "/process.Process/List", &json, "{\"x\":")
        .await;
    let e = common::parse_error(st, &body);
    assert_eq!(
        (st, e.code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
    assert!(e.message.contains("invalid JSON"), "{}", e.message);

    // Unknown enum value.
    let (st, _, body) = c
        .fetch(
            Method::POST,
            "/process.Process/SendSignal",
            &json,
            r#"{"process":{"pid":1},"signal":"SIGNAL_SIGFOO"}"#,
        )
        .await;
    let e = common::parse_error(st, &body);
    assert_eq!(
        (st, e.code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
    assert!(e.message.contains("SIGNAL_SIGFOO"), "{}", e.message);

    // A known-but-unsupported signal number (proto codec keeps unknown enum values).
    let e = c
        .unary::<_, pb::SendSignalResponse>(
            Codec::Proto,
            "/process.Process/SendSignal",
            &pb::SendSignalRequest {
                process: by_pid(1),
                signal: 2,
            },
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status, e.code.as_str()),
        (StatusCode::NOT_IMPLEMENTED, "unimplemented")
    );
    assert!(e.message.contains("invalid signal"), "{}", e.message);

    // Empty selector.
    let e = c
        .unary::<_, pb::SendSignalResponse>(
            Codec::Json,
            "/process.Process/SendSignal",
            &pb::SendSignalRequest {
                process: None,
                signal: 9,
            },
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "unimplemented");

    // Unknown pid.
    let e = signal(&c, by_pid(4_000_000), pb::Signal::Sigkill)
        .await
        .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.message.as_str()),
        ("not_found", "process with pid 4000000 not found")
    );

    // Oversized message.
    let big = pb::SendInputRequest {
        process: by_pid(1),
        input: Some(pb::ProcessInput {
            input: Some(pb::process_input::Input::Stdin(vec![b'x'; 10_000].into())),
        }),
    };
    let e = c
        .unary::<_, pb::SendInputResponse>(Codec::Json, "/process.Process/SendInput", &big, &[])
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status, e.code.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted")
    );
    assert!(e.message.contains("4096"), "{}", e.message);

    // Malformed envelope on a stream: declares 100 bytes, sends 3.
    let mut body = vec![0u8, 0, 0, 0, 100];
    body.extend_from_slice(b"{}}");
    let resp = c
        .send(
            Method::POST,
            "/process.Process/Start",
            &[("content-type", "application/connect+json")],
            body,
        )
        .await;
    let mut rs = RawStream::new(resp, Codec::Json);
    assert_eq!(rs.status, StatusCode::OK);
    match rs.next_frame().await {
        Some(Frame::End(v)) => {
            let (code, msg) = end_error(&v);
            assert_eq!(code, "invalid_argument");
            assert!(msg.contains("malformed envelope"), "{msg}");
        }
        other => panic!("{other:?}"),
    }

    // Invalid timeout header.
    let (st, _, body) = c
        .fetch(
            Method::POST,
            "/process.Process/List",
            &[
                ("content-type", "application/json"),
                ("connect-timeout-ms", "soon"),
            ],
            "{}",
        )
        .await;
    assert_eq!(
        (st, common::parse_error(st, &body).code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );

    // Wrong content type, wrong method, unknown route and method.
    let (st, _, _) = c
        .fetch(
            Method::POST,
            "/process.Process/List",
            &[("content-type", "text/plain")],
            "{}",
        )
        .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (st, _, _) = c.fetch(Method::GET, "/process.Process/List", &[], "").await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    let (st, h, _) = c
        .fetch(Method::POST, "/process.Process/Nope", &json, "{}")
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let (st, _, _) = c.fetch(Method::GET, "/nowhere", &[], "").await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // The agent is still fine.
    let r = run(&c, Codec::Json, &sh("echo alive")).await;
    assert_eq!(r.stdout, b"alive\n");
}

#[tokio::test]
async fn health_is_204_no_store() {
    let g = Guestd::start();
    let (st, h, body) = g.client().fetch(Method::GET, "/health", &[], "").await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(h["cache-control"], "no-store");
    assert!(body.is_empty());
}
