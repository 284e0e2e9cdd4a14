//! Test harness: starts the built `guestd` binary on free ports and talks to it over
//! its real sockets with a small Connect client (JSON and binary proto, HTTP/1.1) and
//! raw HTTP helpers. The gRPC interop tests use tonic instead (see `grpc.rs`).

#![allow(dead_code, clippy::disallowed_methods)] // tests spawn the binary under test directly

pub mod bench;
pub mod cgroup;
pub mod storm;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use guestd::transport::rpc::RpcMessage;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A running guestd; killed on drop.
pub struct Guestd {
    child: Child,
    pub port: u16,
    pub code_port: u16,
    pub log: std::path::PathBuf,
    _logdir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Guestd {
    /// guestd on free ports, default user root, kernel bridge off.
    pub fn start() -> Guestd {
        Self::start_with(&["--default-user", "root", "--no-code-interpreter"])
    }

    /// guestd with `extra` flags. Port forwarding is machine-wide (it would forward the
    /// listeners of other tests), so it is off unless `forward` is used.
    pub fn start_with(extra: &[&str]) -> Guestd {
        let mut args = vec!["--no-port-forward"];
        args.extend_from_slice(extra);
        Self::launch(&[], &args)
    }

    /// guestd with port forwarding on (the default of the binary).
    pub fn start_forwarding(extra: &[&str]) -> Guestd {
        Self::launch(&[], extra)
    }

    /// guestd run through `wrapper` (a command and its arguments that exec the rest of
    /// the command line, e.g. `unshare -U -r`), with `extra` flags (forwarding off).
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Guestd {
        let mut args = vec!["--no-port-forward"];
        args.extend_from_slice(extra);
        Self::launch(wrapper, &args)
    }

    fn launch(wrapper: &[&str], extra: &[&str]) -> Guestd {
        let port = free_port();
        let code_port = free_port();
        let logdir = tempfile::tempdir().expect("tempdir");
        let log = logdir.path().join("guestd.log");
        let logfile = std::fs::File::create(&log).expect("log file");
        // GUESTD_BIN: another build of guestd to run (the benches compare the static
        // musl build that ships with the glibc build they were compiled with).
        let bin =
            std::env::var("GUESTD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_guestd").into());
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(["--listen", "127.0.0.1", "--port", &port.to_string()])
            .args(["--code-port", &code_port.to_string()])
            .args(extra)
            .env("GUESTD_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn guestd");
        let g = Guestd {
            child,
            port,
            code_port,
            log,
            _logdir: logdir,
        };
        g.wait_healthy();
        g
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("guestd did not start listening; log:\n{}", self.log_text());
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the guestd process has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Guestd {
    /// SIGTERM first, so guestd shuts its kernels down; SIGKILL after 10 s.
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own child; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    pub fn unary_ct(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        }
    }
    pub fn stream_ct(self) -> &'static str {
        match self {
            Codec::Json => "application/connect+json",
            Codec::Proto => "application/connect+proto",
        }
    }
    pub fn encode<T: RpcMessage>(self, m: &T) -> Bytes {
        match self {
            Codec::Json => Bytes::from(serde_json::to_vec(m).expect("json")),
            Codec::Proto => Bytes::from(m.encode_to_vec()),
        }
    }
    pub fn decode<T: RpcMessage>(self, b: &[u8]) -> T {
        match self {
            Codec::Json => serde_json::from_slice(b)
                .unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", String::from_utf8_lossy(b))),
            Codec::Proto => T::decode(b).expect("proto"),
        }
    }
}

/// A Connect error as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub http_status: StatusCode,
    pub code: String,
    pub message: String,
}

pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Minimal Connect client over HTTP/1.1.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client {
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
            base: base.to_string(),
        }
    }

    /// Sends any request; returns the response with its body still streaming.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> http::Response<Incoming> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).expect("request");
        self.http.request(req).await.expect("HTTP request failed")
    }

    /// Sends a request and reads the whole response.
    pub async fn fetch(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let resp = self.send(method, path, headers, body).await;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, body)
    }

    /// A Connect unary call.
    pub async fn unary<Req: RpcMessage, Res: RpcMessage>(
        &self,
        codec: Codec,
        path: &str,
        req: &Req,
        headers: &[(&str, &str)],
    ) -> Result<Res, ConnectError> {
        let mut h = vec![("content-type", codec.unary_ct())];
        h.extend_from_slice(headers);
        let (status, rh, body) = self.fetch(Method::POST, path, &h, codec.encode(req)).await;
        if status == StatusCode::OK {
            assert_eq!(
                rh["content-type"],
                codec.unary_ct(),
                "unary response content type"
            );
            return Ok(codec.decode(&body));
        }
        Err(parse_error(status, &body))
    }

    /// Opens a Connect server stream.
    pub async fn server_stream<Req: RpcMessage>(
        &self,
        codec: Codec,
        path: &str,
        req: &Req,
        headers: &[(&str, &str)],
    ) -> RawStream {
        let mut h = vec![("content-type", codec.stream_ct())];
        h.extend_from_slice(headers);
        let body = envelope(0, &codec.encode(req));
        let resp = self.send(Method::POST, path, &h, body).await;
        RawStream::new(resp, codec)
    }
}

pub fn parse_error(status: StatusCode, body: &[u8]) -> ConnectError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    ConnectError {
        http_status: status,
        code: v["code"].as_str().unwrap_or_default().to_string(),
        message: v["message"].as_str().unwrap_or_default().to_string(),
    }
}

/// What a Connect stream yields.
#[derive(Debug)]
pub enum Frame {
    Message(Bytes),
    /// The end-of-stream JSON.
    End(serde_json::Value),
}

/// A Connect server-stream response read envelope by envelope.
pub struct RawStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub codec: Codec,
    body: Incoming,
    buf: BytesMut,
    ended: bool,
}

impl RawStream {
    pub fn new(resp: http::Response<Incoming>, codec: Codec) -> RawStream {
        let (parts, body) = resp.into_parts();
        RawStream {
            status: parts.status,
            headers: parts.headers,
            codec,
            body,
            buf: BytesMut::new(),
            ended: false,
        }
    }

    /// The next envelope, or None when the body ended.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len).freeze();
                    if flags & 0x02 != 0 {
                        return Some(Frame::End(
                            serde_json::from_slice(&payload).expect("end-of-stream JSON"),
                        ));
                    }
                    return Some(Frame::Message(payload));
                }
            }
            if self.ended {
                assert!(self.buf.is_empty(), "stream ended mid-envelope");
                return None;
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => panic!("stream body error: {e}"),
                None => self.ended = true,
            }
        }
    }

    /// The next frame, failing the test after `timeout`.
    pub async fn next_frame_within(&mut self, timeout: Duration) -> Option<Frame> {
        tokio::time::timeout(timeout, self.next_frame())
            .await
            .expect("timed out waiting for a stream message")
    }

    /// The next message decoded, or Err(end-of-stream JSON).
    pub async fn next_message<T: RpcMessage>(&mut self) -> Result<T, serde_json::Value> {
        match self.next_frame_within(Duration::from_secs(30)).await {
            Some(Frame::Message(b)) => Ok(self.codec.decode(&b)),
            Some(Frame::End(v)) => Err(v),
            None => panic!("stream ended without an end-of-stream envelope"),
        }
    }
}

pub fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header value")
}

/// A non-root account for ownership tests (`guestdtest`, home `/home/guestdtest`),
/// created when missing. Returns (name, uid, gid, home).
pub fn ensure_test_user() -> (&'static str, u32, u32, std::path::PathBuf) {
    const NAME: &str = "guestdtest";
    let lookup = || nix::unistd::User::from_name(NAME).ok().flatten();
    if lookup().is_none() {
        let _ = Command::new("groupadd").arg("guestdextra").status();
        let _ = Command::new("useradd")
            .args(["-m", "-s", "/bin/bash", "-G", "guestdextra", NAME])
            .status();
    }
    let u = lookup().expect("test user exists");
    let _ = std::fs::create_dir_all(&u.dir);
    (NAME, u.uid.as_raw(), u.gid.as_raw(), u.dir)
}

/// `/files?…` with the pairs form-encoded.
pub fn files_url(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    format!("/files?{}", s.finish())
}

/// A multipart/form-data body: (field name, filename, data) per part.
pub fn multipart_body(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, filename, data) in parts {
        b.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => b.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    b
}

/// `Authorization: Basic base64("<user>:")`.
pub fn basic_auth(user: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

// Process streams

/// Everything a finished Start stream produced.
#[derive(Debug, Default)]
pub struct Run {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub end: Option<guestd::proto::process::process_event::EndEvent>,
    pub keepalives: usize,
    pub end_of_stream: serde_json::Value,
}

pub async fn collect(stream: &mut RawStream) -> Run {
    collect_from(stream, Run::default()).await
}

/// Collects the rest of a stream whose start event was already read.
pub async fn collect_rest(stream: &mut RawStream, pid: u32) -> Run {
    collect_from(
        stream,
        Run {
            pid,
            ..Default::default()
        },
    )
    .await
}

pub async fn collect_from(stream: &mut RawStream, mut run: Run) -> Run {
    loop {
        match stream
            .next_message::<guestd::proto::process::StartResponse>()
            .await
        {
            Ok(msg) => match msg.event.and_then(|e| e.event) {
                Some(guestd::proto::process::process_event::Event::Start(s)) => {
                    assert_eq!(run.pid, 0, "second start event");
                    run.pid = s.pid;
                }
                Some(guestd::proto::process::process_event::Event::Data(d)) => {
                    assert!(run.pid != 0, "data before start");
                    assert!(run.end.is_none(), "data after end");
                    use guestd::proto::process::process_event::data_event::Output;
                    match d.output {
                        Some(Output::Stdout(b)) => run.stdout.extend_from_slice(&b),
                        Some(Output::Stderr(b)) => run.stderr.extend_from_slice(&b),
                        Some(Output::Pty(b)) => run.pty.extend_from_slice(&b),
                        None => panic!("empty data event"),
                    }
                }
                Some(guestd::proto::process::process_event::Event::End(e)) => {
                    assert!(run.end.is_none(), "second end event");
                    run.end = Some(e);
                }
                Some(guestd::proto::process::process_event::Event::Keepalive(_)) => {
                    run.keepalives += 1
                }
                None => panic!("empty event"),
            },
            Err(end) => {
                run.end_of_stream = end;
                return run;
            }
        }
    }
}
