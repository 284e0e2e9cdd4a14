//! gRPC interop: an independent tonic client (its own prost types, generated from our
//! protos at build time) drives `process.Process` on the same port over h2c.

mod common;

use std::time::Duration;

use common::Guestd;
use tonic::Code;

#[allow(clippy::all, dead_code)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/grpc_client/process.rs"));
}

use pb::process_client::ProcessClient;
use pb::process_event::Event;

async fn client(g: &Guestd) -> ProcessClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", g.port))
        .expect("endpoint")
        .connect()
        .await
        .expect("gRPC connect");
    ProcessClient::new(channel)
}

fn bash(script: &str) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), script.into()],
            envs: Default::default(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(true),
    }
}

fn pid_sel(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Pid(pid)),
    })
}

#[tokio::test]
async fn start_streams_events_over_grpc() {
    let g = Guestd::start();
    let mut c = client(&g).await;
    let mut stream = c
        .start(bash("echo hi; echo err >&2; exit 2"))
        .await
        .expect("start")
        .into_inner();
    let mut pid = 0;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut end = None;
    while let Some(msg) = stream.message().await.expect("stream") {
        match msg.event.and_then(|e| e.event).expect("event") {
            Event::Start(s) => pid = s.pid,
            Event::Data(d) => match d.output.expect("output") {
                pb::process_event::data_event::Output::Stdout(b) => out.extend_from_slice(&b),
                pb::process_event::data_event::Output::Stderr(b) => err.extend_from_slice(&b),
                pb::process_event::data_event::Output::Pty(_) => panic!("no pty"),
            },
            Event::End(e) => end = Some(e),
            Event::Keepalive(_) => {}
        }
    }
    assert!(pid > 0);
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"hi\n"[..], &b"err\n"[..])
    );
    let end = end.expect("end");
    assert_eq!(
        (end.exit_code, end.status.as_str(), end.error.as_deref()),
        (2, "exit status 2", Some("exit status 2"))
    );
}

#[tokio::test]
async fn unary_calls_and_errors_over_grpc() {
    let g = Guestd::start();
    let mut c = client(&g).await;
    let mut req = bash("cat");
    req.tag = Some("grpc-cat".into());
    let mut stream = c.start(req).await.expect("start").into_inner();
    let pid = match stream
        .message()
        .await
        .unwrap()
        .unwrap()
        .event
        .and_then(|e| e.event)
    {
        Some(Event::Start(s)) => s.pid,
        other => panic!("{other:?}"),
    };
    let list = c.list(pb::ListRequest {}).await.expect("list").into_inner();
    let info = list
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .expect("listed");
    assert_eq!(info.tag.as_deref(), Some("grpc-cat"));

    // Client streaming over gRPC.
    let inputs = vec![
        pb::StreamInputRequest {
            event: Some(pb::stream_input_request::Event::Start(
                pb::stream_input_request::StartEvent {
                    process: pid_sel(pid),
                },
            )),
        },
        pb::StreamInputRequest {
            event: Some(pb::stream_input_request::Event::Data(
                pb::stream_input_request::DataEvent {
                    input: Some(pb::ProcessInput {
                        input: Some(pb::process_input::Input::Stdin(
                            b"via grpc\n".to_vec().into(),
                        )),
                    }),
                },
            )),
        },
    ];
    c.stream_input(tokio_stream_iter(inputs))
        .await
        .expect("stream input");
    let mut got = Vec::new();
    while !got.ends_with(b"via grpc\n") {
        match stream
            .message()
            .await
            .unwrap()
            .unwrap()
            .event
            .and_then(|e| e.event)
        {
            Some(Event::Data(d)) => {
                if let Some(pb::process_event::data_event::Output::Stdout(b)) = d.output {
                    got.extend_from_slice(&b)
                }
            }
            Some(Event::Keepalive(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    c.close_stdin(pb::CloseStdinRequest {
        process: pid_sel(pid),
    })
    .await
    .expect("close stdin");
    let mut ended = false;
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(Event::End(e)) = m.event.and_then(|e| e.event) {
            assert_eq!(e.exit_code, 0);
            ended = true;
        }
    }
    assert!(ended);

    let status = c
        .send_signal(pb::SendSignalRequest {
            process: pid_sel(4_000_001),
            signal: pb::Signal::Sigkill as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "process with pid 4000001 not found");

    let status = c
        .connect(pb::ConnectRequest {
            process: None,
            replay_from: None,
        })
        .await;
    let status = match status {
        Err(s) => s,
        Ok(resp) => resp.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn grpc_timeout_bounds_the_process() {
    let g = Guestd::start();
    let mut c = client(&g).await;
    let mut req = tonic::Request::new(bash("sleep 100"));
    req.set_timeout(Duration::from_millis(500));
    let mut stream = c.start(req).await.expect("start").into_inner();
    let mut status = None;
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(s) => {
                status = Some(s);
                break;
            }
        }
    }
    assert_eq!(
        status.expect("deadline error").code(),
        Code::DeadlineExceeded
    );
}

fn tokio_stream_iter<T: Send + 'static>(
    items: Vec<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::iter(items)
}
