//! The abusive-user-code storm of issue 8: a fork bomb, a CPU hog on every core and a
//! memory hog at once, all as a non-root user, while `/health` is polled and
//! `Start(/bin/true)` is run. Used by the behaviour test (`tests/abuse.rs`: nothing may
//! fail) and by the bench (`benches/abuse.rs`: the latencies).

#![allow(dead_code)]

use std::time::{Duration, Instant};

use guestd::proto::process as pb;
use http::{Method, StatusCode};

use super::{Client, Codec, Frame, RawStream};

/// What the storm saw.
#[derive(Debug, Default)]
pub struct Storm {
    /// Latency of each `/health` poll; `None`: no 204 within 5 s (the SDKs' timeout).
    pub health: Vec<Option<Duration>>,
    /// Latency of each `Start(/bin/true)` to its end; `Err`: what went wrong.
    pub starts: Vec<Result<Duration, String>>,
    /// When each `Start(/bin/true)` was sent, from the start of the storm.
    pub start_at: Vec<Duration>,
    /// The memory hog's end, and when it came (from the start of the storm).
    pub hog_end: Option<pb::process_event::EndEvent>,
    pub hog_end_at: Option<Duration>,
    /// The fork bomb's end after SIGKILL, and the CPU hogs'.
    pub killed_ends: Vec<pb::process_event::EndEvent>,
}

fn req(script: &str, tag: &str) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), script.into()],
            envs: Default::default(),
            cwd: Some("/".into()),
        }),
        pty: None,
        tag: Some(tag.into()),
        stdin: Some(false),
    }
}

async fn start(c: &Client, r: &pb::StartRequest, auth: &str) -> RawStream {
    let s = c
        .server_stream(
            Codec::Json,
            "/process.Process/Start",
            r,
            &[("authorization", auth)],
        )
        .await;
    assert_eq!(s.status, StatusCode::OK, "start {:?}", r.tag);
    s
}

/// Reads a Start stream to its end event.
async fn end_of(s: &mut RawStream) -> Result<pb::process_event::EndEvent, String> {
    loop {
        match s.next_frame().await {
            Some(Frame::Message(b)) => {
                let m: pb::StartResponse = Codec::Json.decode(&b);
                if let Some(pb::process_event::Event::End(e)) = m.event.and_then(|e| e.event) {
                    return Ok(e);
                }
            }
            Some(Frame::End(v)) => return Err(v.to_string()),
            None => return Err("stream ended without an end event".into()),
        }
    }
}

async fn kill(c: &Client, tag: &str) {
    let (st, _, body) = c
        .fetch(
            Method::POST,
            "/process.Process/SendSignal",
            &[("content-type", "application/json")],
            format!(r#"{{"process":{{"tag":"{tag}"}},"signal":"SIGNAL_SIGKILL"}}"#),
        )
        .await;
    // A command the group's OOM killer already chose (the bomb's shells fill the memory
    // limit too, and a CPU hog's shell is as big as theirs) has ended: not_found. Its
    // end is still checked by the caller.
    let ended =
        st == StatusCode::NOT_FOUND && String::from_utf8_lossy(&body).contains("\"not_found\"");
    assert!(st == StatusCode::OK || ended, "kill {tag}: {st} {body:?}");
}

/// Runs the storm for `secs` seconds as `user` against the guestd at `base`.
pub async fn storm(base: &str, user: &str, cpus: usize, secs: u64) -> Storm {
    let c = Client::new(base);
    let auth = super::basic_auth(user);
    let mut out = Storm::default();

    let mut bomb = start(
        &c,
        &req("b() { b | b & }; b; exec sleep 1000", "bomb"),
        &auth,
    )
    .await;
    let mut hogs = Vec::new();
    for i in 0..cpus {
        hogs.push(start(&c, &req("while :; do :; done", &format!("cpu{i}")), &auth).await);
    }
    let hog = req(
        "exec python3 -c 'x = []\nwhile True: x.append(bytearray(16 << 20))'",
        "memhog",
    );
    let began = Instant::now();
    let mut memhog = start(&c, &hog, &auth).await;
    let hog_end = tokio::spawn(async move {
        let e = end_of(&mut memhog).await;
        (e, began.elapsed())
    });

    let until = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < until {
        let t = Instant::now();
        let h = tokio::time::timeout(
            Duration::from_secs(5),
            Client::new(base).fetch(Method::GET, "/health", &[], ""),
        )
        .await;
        out.health.push(match h {
            Ok((StatusCode::NO_CONTENT, _, _)) => Some(t.elapsed()),
            _ => None,
        });
        if n.is_multiple_of(5) {
            let t = Instant::now();
            out.start_at.push(began.elapsed());
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                let mut s = start(&c, &req("exec /bin/true", "true"), &auth).await;
                end_of(&mut s).await
            })
            .await;
            out.starts.push(match r {
                Ok(Ok(e)) if e.exit_code == 0 => Ok(t.elapsed()),
                Ok(Ok(e)) => Err(format!("/bin/true ended {e:?}")),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("no end within 30 s".into()),
            });
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Ok(Ok((Ok(e), at))) = tokio::time::timeout(Duration::from_secs(120), hog_end).await {
        out.hog_end = Some(e);
        out.hog_end_at = Some(at);
    }

    kill(&c, "bomb").await;
    for i in 0..cpus {
        kill(&c, &format!("cpu{i}")).await;
    }
    for s in std::iter::once(&mut bomb).chain(hogs.iter_mut()) {
        if let Ok(Ok(e)) = tokio::time::timeout(Duration::from_secs(60), end_of(s)).await {
            out.killed_ends.push(e);
        }
    }
    out
}

/// The p-quantile of the answered latencies.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}
