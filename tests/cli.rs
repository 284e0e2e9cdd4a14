//! envd's command line against the built binary: the spellings the engines use start a
//! serving guestd, the version flags print what control planes parse, bad flags fail
//! with envd's messages, and a missing default user falls back to root.

#![allow(clippy::disallowed_methods)] // tests spawn the binary under test directly

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Codec, free_port};
use guestd::proto::process::{self as pb, process_event::Event};

fn guestd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guestd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run guestd")
}

/// A guestd started with `-no-port-forward -no-code-interpreter` and `args` (port
/// forwarding is machine-wide; kernels are not needed here), listening on 127.0.0.1
/// through the env var; killed on drop.
struct Running {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl Running {
    fn start(args: &[String], port: u16) -> Running {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_guestd"))
            .args(["-no-port-forward", "-no-code-interpreter"])
            .args(args)
            .env("GUESTD_LISTEN", "127.0.0.1")
            .env("GUESTD_CODE_PORT", free_port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("spawn guestd");
        let r = Running { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "not serving on {port}: {}",
                r.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Runs a shell script through Connect (no Authorization: the default user).
    async fn sh(&self, script: &str) -> String {
        let c = Client::new(&format!("http://127.0.0.1:{}", self.port));
        let req = pb::StartRequest {
            process: Some(pb::ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                envs: Default::default(),
                cwd: None,
            }),
            pty: None,
            tag: None,
            stdin: Some(false),
        };
        let mut s = c
            .server_stream(Codec::Json, "/process.Process/Start", &req, &[])
            .await;
        let mut out = Vec::new();
        while let Ok(msg) = s.next_message::<pb::StartResponse>().await {
            if let Some(Event::Data(d)) = msg.event.and_then(|e| e.event)
                && let Some(pb::process_event::data_event::Output::Stdout(b)) = d.output
            {
                out.extend_from_slice(&b);
            }
        }
        String::from_utf8(out).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_engines_spellings_start_a_serving_guestd() {
    let spellings: [&[&str]; 4] = [
        // kubernetes-sigs/agent-sandbox's envd example.
        &["--isnotfc", "--no-cgroups", "--port", "{port}", "--verbose"],
        // Go's single dash, with `=` and with a separate value.
        &["-isnotfc", "-no-cgroups", "-port={port}", "-verbose"],
        &[
            "-port",
            "{port}",
            "-isnotfc=true",
            "-verbose=false",
            "-no-cgroups",
        ],
        &["--port={port}", "-isnotfc", "--no-cgroups=1"],
    ];
    for spelling in spellings {
        let port = free_port();
        let args: Vec<String> = spelling
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect();
        let g = Running::start(&args, port);
        // --isnotfc: user processes are told they are not in a Firecracker VM.
        assert_eq!(g.sh("echo $E2B_SANDBOX").await, "false\n", "{args:?}");
    }
}

#[test]
fn version_and_commit_as_envd_prints_them() {
    for spelling in ["-version", "--version", "-version=true", "--version=T"] {
        let out = guestd(&[spelling]);
        assert!(out.status.success(), "{spelling}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "0.6.13\n",
            "{spelling}"
        );
    }
    let out = guestd(&["-commit"]);
    let commit = String::from_utf8(out.stdout).unwrap();
    assert_eq!(commit.trim(), guestd::config::GUESTD_COMMIT);
    assert!(commit.ends_with('\n') && commit.lines().count() == 1);
    let out = guestd(&["-V"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("0.6.13\nguestd {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_flags_fail_with_envds_messages() {
    for (args, message) in [
        (&["-verbos"][..], "flag provided but not defined: -verbos"),
        (&["--isnotfc", "-x"], "flag provided but not defined: -x"),
        (&["-port"], "flag needs an argument: -port"),
        (
            &["-port", "http"],
            "invalid value \"http\" for flag -port: parse error",
        ),
        (
            &["-isnotfc=yes"],
            "invalid boolean value \"yes\" for -isnotfc: parse error",
        ),
        (&["---port=1"], "bad flag syntax: ---port=1"),
    ] {
        let out = guestd(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with(&format!("guestd: {message}\n")),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty());
    }
    // A value clap refuses names the flag too.
    let out = guestd(&["-port", "70000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("--port"));
    // Help in Go's spellings is clap's help, exit 0.
    let out = guestd(&["-help"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("--isnotfc"));
}

#[tokio::test]
async fn arguments_after_the_flags_are_ignored_with_a_warning() {
    let port = free_port();
    let args: Vec<String> = ["-port", &port.to_string(), "-isnotfc", "serve", "-bogus"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let g = Running::start(&args, port);
    assert_eq!(g.sh("echo $E2B_SANDBOX").await, "false\n");
    let log = g.log_text();
    assert!(log.contains("ignoring arguments after the flags"), "{log}");
    assert!(log.contains("\"serve\""), "{log}");
}

#[tokio::test]
async fn a_missing_default_user_falls_back_to_root() {
    let port = free_port();
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--default-user",
        "no-such-user-7f3a",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let g = Running::start(&args, port);
    assert_eq!(g.sh("id -un").await, "root\n");
    assert!(
        g.log_text().contains(
            "default user 'no-such-user-7f3a' does not exist; using 'root' until /init names another"
        ),
        "{}",
        g.log_text()
    );
}
