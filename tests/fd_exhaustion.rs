//! Fault test: guestd out of file descriptors. Started under a small `RLIMIT_NOFILE`
//! (hard 256, soft 64), it must raise the soft limit to the hard one; with every
//! descriptor taken by idle connections, requests on a connection opened before answer
//! `resource_exhausted` / 503 naming "Too many open files" (never `unauthenticated`),
//! and once the idle connections close, new connections are served again.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Codec, Guestd, RawStream, envelope};
use guestd::proto::filesystem as fspb;
use guestd::proto::process::{self as pb, process_event::Event};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const HARD: usize = 256;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The soft and hard "Max open files" of `pid`.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

/// An HTTP/1.1 client on one TCP connection (kept alive across requests).
async fn connection(port: u16) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn send(
    s: &mut SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> http::Response<hyper::body::Incoming> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "guestd");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    s.ready().await.expect("connection ready");
    tokio::time::timeout(
        Duration::from_secs(20),
        s.send_request(req.body(Full::new(body.into())).expect("request")),
    )
    .await
    .expect("no answer within 20 s")
    .expect("request failed")
}

/// Runs Start on `s`; returns (stdout, exit code) or the end-of-stream error.
async fn start(
    s: &mut SendRequest<Full<Bytes>>,
    cmd: &str,
    args: &[&str],
) -> Result<(Vec<u8>, i32), serde_json::Value> {
    let body = envelope(0, &Codec::Json.encode(&common::bench::start_req(cmd, args)));
    let resp = send(
        s,
        Method::POST,
        "/process.Process/Start",
        &[("content-type", "application/connect+json")],
        body,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = RawStream::new(resp, Codec::Json);
    let mut out = Vec::new();
    loop {
        let msg = stream.next_message::<pb::StartResponse>().await?;
        match msg.event.and_then(|e| e.event) {
            Some(Event::Data(d)) => {
                if let Some(pb::process_event::data_event::Output::Stdout(b)) = d.output {
                    out.extend_from_slice(&b);
                }
            }
            Some(Event::End(e)) => return Ok((out, e.exit_code)),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_is_resource_exhausted_and_the_agent_recovers() {
    let mut g = Guestd::start_wrapped(
        &["prlimit", &format!("--nofile=64:{HARD}")],
        &["--default-user", "root", "--no-code-interpreter"],
    );
    let pid = g.pid();

    // The soft limit was raised to the hard one at start, and logged.
    assert_eq!(nofile(pid), (HARD.to_string(), HARD.to_string()));
    assert!(
        g.log_text()
            .contains("raised the open-file limit (RLIMIT_NOFILE) to the hard limit"),
        "{}",
        g.log_text()
    );

    // A connection opened (and used) while descriptors are still free.
    let mut early = connection(g.port).await;
    let r = send(&mut early, Method::GET, "/health", &[], Bytes::new()).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // Idle connections until guestd holds every descriptor it may have; the rest wait
    // in the listen backlog.
    let mut idle = Vec::new();
    for _ in 0..HARD + 100 {
        idle.push(
            TcpStream::connect(("127.0.0.1", g.port))
                .await
                .expect("connect"),
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fd_count(pid) < HARD {
        assert!(
            tokio::time::Instant::now() < deadline,
            "guestd holds {} descriptors, expected {HARD}",
            fd_count(pid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Start: resource_exhausted naming the errno, never an authentication error.
    let end = start(&mut early, "/bin/echo", &["hi"])
        .await
        .expect_err("Start must fail without descriptors");
    let code = end["error"]["code"].as_str().unwrap_or_default();
    let message = end["error"]["message"].as_str().unwrap_or_default();
    eprintln!("Start under exhaustion: {end}");
    assert_eq!(code, "resource_exhausted", "{end}");
    assert!(message.contains("Too many open files"), "{end}");
    assert!(message.contains("os error 24"), "{end}");

    // A filesystem RPC: the same.
    let req = fspb::ListDirRequest {
        path: "/".into(),
        depth: 1,
    };
    let r = send(
        &mut early,
        Method::POST,
        "/filesystem.Filesystem/ListDir",
        &[("content-type", "application/json")],
        Codec::Json.encode(&req),
    )
    .await;
    let status = r.status();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("Connect error JSON");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["code"], "resource_exhausted", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Too many open files"),
        "{v}"
    );

    // REST: 503 with Retry-After, the JSON error shape.
    let r = send(
        &mut early,
        Method::GET,
        "/files?path=/etc/hostname&username=root",
        &[],
        Bytes::new(),
    )
    .await;
    let status = r.status();
    let retry = r.headers().get("retry-after").cloned();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], 503, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Too many open files"),
        "{v}"
    );
    assert_eq!(retry.as_ref().map(|h| h.as_bytes()), Some(&b"1"[..]));

    // What needs no new descriptor still works on the open connection.
    let r = send(
        &mut early,
        Method::POST,
        "/process.Process/List",
        &[("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(g.is_alive());

    // The descriptors come back: new connections are accepted and served again.
    drop(idle);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = connection(g.port).await;
            send(&mut c, Method::GET, "/health", &[], Bytes::new())
                .await
                .status()
        })
        .await;
        if attempt == Ok(StatusCode::NO_CONTENT) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/health did not answer again after the idle connections closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = connection(g.port).await;
    let (out, exit) = start(&mut fresh, "/bin/echo", &["hi"])
        .await
        .unwrap_or_else(|e| panic!("Start after recovery failed: {e}"));
    assert_eq!((out.as_slice(), exit), (&b"hi\n"[..], 0));
    let log = g.log_text();
    assert!(log.contains("accept failed"), "{log}");
    assert!(log.contains("accepting connections again"), "{log}");
}
