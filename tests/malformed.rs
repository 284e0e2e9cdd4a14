//! Malformed HTTP against the built binary over raw TCP, on both ports: a generated
//! corpus of request heads hyper rejects (bad header names and values, junk, conflicting
//! or invalid Content-Length, raw spaces in the target, bad versions and methods,
//! Transfer-Encoding, folding, bare CRs, too many fields, an over-long target), sent
//! whole, split in two writes and after a good request on the same connection; and
//! malformed chunked bodies on every route that reads a body. Every answer must carry
//! the right status and a body naming the problem (Connect JSON on RPC paths,
//! `{"code","message"}` elsewhere), and guestd must stay up.

mod common;

use std::time::Duration;

use common::Guestd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Raw HTTP/1 client

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `parts` (pausing between them) on one connection and reads until the server
/// closes it; returns the raw bytes.
async fn exchange(port: u16, parts: &[Vec<u8>], pause: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
            // The server may have answered the first part already: then the rest is
            // not sent (it would only reset the connection).
            let mut buf = [0u8; 8192];
            match s.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(_) => {}
            }
        }
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server neither answered nor closed the connection; got {:?}",
        String::from_utf8_lossy(&out)
    );
    out
}

/// Splits raw bytes into responses (`Content-Length` bodies; 1xx/204/304 without).
fn parse_responses(mut raw: &[u8]) -> Vec<Resp> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("incomplete response head: {:?}", raw.escape_ascii()));
        let head = std::str::from_utf8(&raw[..end]).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status: u16 = status_line
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header line");
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        raw = &raw[end + 4..];
        let len = if (100..200).contains(&status) || status == 204 || status == 304 {
            0
        } else {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse::<usize>().expect("content-length"))
                .unwrap_or_else(|| panic!("no content-length in {head:?}"))
        };
        assert!(raw.len() >= len, "truncated body after {head:?}");
        out.push(Resp {
            status,
            headers,
            body: raw[..len].to_vec(),
        });
        raw = &raw[len..];
    }
    out
}

// ---------------------------------------------------------------------------------------
// The corpus

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Agent,
    Code,
}

#[derive(Debug, Clone)]
struct Case {
    what: String,
    bytes: Vec<u8>,
    status: u16,
    /// The message must contain this.
    needle: &'static str,
    /// The request target the error page is chosen by (RPC paths: Connect JSON).
    rpc: bool,
}

const RPC_PATHS: [&str; 3] = [
    "/process.Process/Start",
    "/filesystem.Filesystem/Stat",
    "/process.Process/List",
];
const REST_PATHS: [&str; 5] = [
    "/files?path=/tmp/x",
    "/health",
    "/files/compose",
    "/init",
    "/nowhere",
];

fn is_rpc(target: &str) -> bool {
    target.starts_with("/process.Process/") || target.starts_with("/filesystem.Filesystem/")
}

fn paths() -> impl Iterator<Item = &'static str> {
    RPC_PATHS.into_iter().chain(REST_PATHS)
}

fn head(method: &str, target: &str, fields: &[u8]) -> Vec<u8> {
    let mut b = format!("{method} {target} HTTP/1.1\r\nHost: guestd\r\n").into_bytes();
    b.extend_from_slice(fields);
    b.extend_from_slice(b"\r\n");
    b
}

fn case(what: String, bytes: Vec<u8>, needle: &'static str, target: &str) -> Case {
    Case {
        what,
        bytes,
        status: 400,
        needle,
        rpc: is_rpc(target),
    }
}

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn corpus() -> Vec<Case> {
    let mut cases = Vec::new();
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);

    // Header names with a byte outside the token set (controls, space, separators,
    // non-UTF-8 / obs-text).
    let bad_name_bytes: Vec<u8> = (0u8..=255)
        .filter(|&b| !tchar(b) && b != b':' && b != b'\r' && b != b'\n')
        .collect();
    for (i, &b) in bad_name_bytes.iter().enumerate() {
        for (j, target) in paths().enumerate() {
            // The byte at the start, inside or at the end of the name.
            let mut f = match (i + j) % 3 {
                0 => vec![],
                1 => b"X-Bad".to_vec(),
                _ => b"X-BadName".to_vec(),
            };
            f.push(b);
            f.extend_from_slice(match (i + j) % 3 {
                0 => &b"X-Name: v\r\n"[..],
                1 => b"Name: v\r\n",
                _ => b": v\r\n",
            });
            cases.push(case(
                format!("header name byte 0x{b:02x} on {target}"),
                head("POST", target, &f),
                if (i + j) % 3 == 0 && (b == b' ' || b == b'\t') {
                    // Whitespace first on a line is folding.
                    "obsolete line folding"
                } else {
                    "in the header name"
                },
                target,
            ));
        }
    }

    // Control bytes in header values, including If-None-Match and a multipart charset.
    let bad_value_bytes: Vec<u8> = (0u8..0x20)
        .filter(|&b| b != b'\t' && b != b'\r' && b != b'\n')
        .chain([0x7f])
        .collect();
    let value_fields: [(&str, &str, &str, &str); 5] = [
        ("GET", "/files?path=/tmp/x", "If-None-Match", "\"etag{}\""),
        (
            "POST",
            "/files?path=/tmp/x",
            "Content-Type",
            "multipart/form-data; boundary=b0undary; charset=utf{}8",
        ),
        (
            "POST",
            "/process.Process/Start",
            "Authorization",
            "Basic dXNl{}cjo=",
        ),
        (
            "POST",
            "/filesystem.Filesystem/ListDir",
            "Connect-Timeout-Ms",
            "10{}00",
        ),
        ("GET", "/health", "X-Custom", "a{}b"),
    ];
    for &b in &bad_value_bytes {
        for (method, target, name, template) in value_fields {
            let (pre, post) = template.split_once("{}").expect("template");
            let mut f = format!("{name}: {pre}").into_bytes();
            f.push(b);
            f.extend_from_slice(post.as_bytes());
            f.extend_from_slice(b"\r\n");
            cases.push(case(
                format!("{name} value byte 0x{b:02x}"),
                head(method, target, &f),
                "in the value of header",
                target,
            ));
        }
        // The same in a value that also holds non-UTF-8 bytes.
        let mut f = b"X-Mixed: \xff\xfe".to_vec();
        f.push(b);
        f.extend_from_slice(b"\r\n");
        cases.push(case(
            format!("non-UTF-8 value with 0x{b:02x}"),
            head("POST", "/files?path=/tmp/y", &f),
            "in the value of header",
            "/files",
        ));
    }

    // Raw junk: bytes that cannot start a request line.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let starts: Vec<u8> = (0u8..=255)
        .filter(|&b| !tchar(b) && b != b'\r' && b != b'\n' && b != 0x16)
        .collect();
    for i in 0..300 {
        let mut b = vec![starts[rng.below(starts.len())]];
        let len = rng.below(200);
        b.extend((0..len).map(|_| rng.next() as u8));
        b.extend_from_slice(b"\r\n\r\n");
        cases.push(Case {
            what: format!("junk #{i}"),
            bytes: b,
            status: 400,
            needle: "does not start with a method",
            rpc: false,
        });
    }
    for i in 0..10 {
        // A TLS ClientHello on the plain-HTTP port.
        let mut b = vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        b.extend((0..64 + i).map(|_| rng.next() as u8));
        cases.push(Case {
            what: format!("TLS hello #{i}"),
            bytes: b,
            status: 400,
            needle: "TLS handshake",
            rpc: false,
        });
    }

    // Conflicting and invalid Content-Length.
    let lens = ["0", "1", "2", "10", "99", "12345"];
    let body_paths = [
        "/process.Process/List",
        "/files?path=/tmp/x",
        "/init",
        "/files/compose",
        "/filesystem.Filesystem/Stat",
    ];
    for a in lens {
        for b in lens {
            if a == b {
                continue;
            }
            for target in body_paths {
                let f = format!("Content-Length: {a}\r\nContent-Length: {b}\r\n");
                cases.push(case(
                    format!("Content-Length {a} then {b} on {target}"),
                    head("POST", target, f.as_bytes()),
                    "conflicting Content-Length",
                    target,
                ));
            }
        }
    }
    let invalid_lens: [&[u8]; 13] = [
        b"-1",
        b"+1",
        b"1.5",
        b"0x10",
        b"abc",
        b"",
        b"1 2",
        b"1,2",
        b"1, 1",
        b"99999999999999999999999",
        b"\xc2\xbd",
        b"1e3",
        b"\xff",
    ];
    for v in invalid_lens {
        for method in ["POST", "PUT"] {
            for target in body_paths {
                let mut f = b"Content-Length: ".to_vec();
                f.extend_from_slice(v);
                f.extend_from_slice(b"\r\n");
                cases.push(case(
                    format!("{method} Content-Length {:?} on {target}", v.escape_ascii()),
                    head(method, target, &f),
                    "invalid Content-Length",
                    target,
                ));
            }
        }
    }

    // A raw space in the target (the 24 bytes hyper-util reads first may cut the line).
    let spaced = [
        "/files?path=/tmp/my file.txt",
        "/files?path=a b",
        "/files?path=/home/user/some dir/f&username=user",
        "/health now",
        "/process.Process/Start extra",
        "/filesystem.Filesystem/Stat ",
        "/a b c",
        "/files?path=x&username=us er",
        "/envs ?",
        "/init ",
    ];
    for target in spaced {
        for method in ["GET", "POST", "PUT", "DELETE"] {
            let first = target.split(' ').next().unwrap_or_default();
            cases.push(case(
                format!("raw space: {method} {target:?}"),
                head(method, target, b""),
                "percent-encoded",
                first,
            ));
        }
    }

    // Versions, methods, transfer codings, folding, colons, bare CRs.
    for version in [
        "HTTP/2.0",
        "HTTP/1.2",
        "HTTP/1",
        "http/1.1",
        "HTTP/1.1x",
        "HTTP/11",
        "HTXP/1.1",
        "HTTP/3",
    ] {
        for target in paths() {
            let b = format!("GET {target} {version}\r\nHost: x\r\n\r\n").into_bytes();
            cases.push(case(
                format!("version {version} on {target}"),
                b,
                "HTTP version",
                target,
            ));
        }
    }
    for method in [
        "G\x00T", "GE(T", "GET\x7f", "\"GET\"", "GET/", "@GET", "GE\tT", "PO,ST",
    ] {
        for target in ["/process.Process/List", "/health", "/files?path=/x"] {
            let mut b = method.as_bytes().to_vec();
            b.extend_from_slice(format!(" {target} HTTP/1.1\r\n\r\n").as_bytes());
            cases.push(Case {
                what: format!("method {method:?}"),
                bytes: b,
                status: 400,
                needle: "method",
                // The request line is not readable as far as the target.
                rpc: false,
            });
        }
    }
    for te in [
        "gzip",
        "identity",
        "chunked, gzip",
        "deflate",
        "chunkedx",
        "",
    ] {
        for target in body_paths {
            let f = format!("Transfer-Encoding: {te}\r\n");
            cases.push(case(
                format!("Transfer-Encoding {te:?} on {target}"),
                head("POST", target, f.as_bytes()),
                "Transfer-Encoding",
                target,
            ));
        }
    }
    for target in body_paths {
        let b =
            format!("POST {target} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
        cases.push(case(
            format!("HTTP/1.0 chunked on {target}"),
            b,
            "HTTP/1.0",
            target,
        ));
    }
    for target in paths() {
        cases.push(case(
            format!("folded header on {target}"),
            head("GET", target, b"X-A: one\r\n two\r\n"),
            "obsolete line folding",
            target,
        ));
        cases.push(case(
            format!("line without colon on {target}"),
            head("GET", target, b"NoColonHere\r\n"),
            "has no colon",
            target,
        ));
        cases.push(case(
            format!("bare CR in a value on {target}"),
            head("GET", target, b"X-A: one\rtwo\r\n"),
            "bare CR",
            target,
        ));
        cases.push(case(
            format!("empty header name on {target}"),
            head("GET", target, b": value\r\n"),
            "empty header name",
            target,
        ));
    }

    // Too many header fields (431) and an over-long target (414).
    for (i, n) in [101usize, 120, 150, 200].into_iter().enumerate() {
        let target = if i % 2 == 0 {
            "/process.Process/List"
        } else {
            "/health"
        };
        let mut f = Vec::new();
        for k in 0..n {
            f.extend_from_slice(format!("X-Field-{k}: v\r\n").as_bytes());
        }
        cases.push(Case {
            what: format!("{n} header fields on {target}"),
            bytes: head("GET", target, &f),
            status: 431,
            needle: "more than 100 header fields",
            rpc: is_rpc(target),
        });
    }
    for target in ["/process.Process/List", "/files"] {
        let long = format!("{target}?{}", "a".repeat(70_000));
        cases.push(Case {
            what: format!("70 kB target {target}"),
            bytes: head("GET", &long, b""),
            status: 414,
            needle: "longer than 65534 bytes",
            rpc: is_rpc(target),
        });
    }
    cases
}

/// Sends one case and checks the answer; `prefix` requests go first on the same
/// connection (each answered 2xx).
async fn check(
    port: u16,
    which: Port,
    c: &Case,
    split: bool,
    prefix: &[u8],
    prefix_answers: usize,
) {
    let mut parts = Vec::new();
    let mut first = prefix.to_vec();
    if split {
        let cut = (c.bytes.len() / 2).max(1);
        first.extend_from_slice(&c.bytes[..cut]);
        parts.push(first);
        parts.push(c.bytes[cut..].to_vec());
    } else {
        first.extend_from_slice(&c.bytes);
        parts.push(first);
    }
    let raw = exchange(port, &parts, Duration::from_millis(15)).await;
    let resps = parse_responses(&raw);
    let ctx = format!(
        "{} ({:?} port, split {split}): {:?}",
        c.what,
        which,
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(resps.len(), prefix_answers + 1, "{ctx}");
    for r in &resps[..prefix_answers] {
        assert!(r.status < 300, "{ctx}");
    }
    let r = &resps[prefix_answers];
    assert_eq!(r.status, c.status, "{ctx}");
    assert!(!r.body.is_empty(), "empty body: {ctx}");
    assert_eq!(r.header("connection"), Some("close"), "{ctx}");
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {ctx}"));
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(c.needle),
        "message does not name the problem ({:?} expected): {ctx}",
        c.needle
    );
    if c.rpc && which == Port::Agent {
        let code = if c.status == 400 {
            "invalid_argument"
        } else {
            "resource_exhausted"
        };
        assert_eq!(v["code"], code, "{ctx}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{ctx}");
    } else {
        assert_eq!(v["code"], c.status, "{ctx}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json; charset=utf-8"),
            "{ctx}"
        );
    }
}

async fn wait_for_port(port: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("port {port} did not open within {within:?}");
}

async fn get_status(port: u16, path: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let raw = exchange(port, &[req.into_bytes()], Duration::ZERO).await;
    parse_responses(&raw)[0].status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_heads_get_an_error_naming_the_problem_on_both_ports() {
    // The kernel bridge is on: the code-interpreter port is checked as well.
    let mut g = Guestd::start_with(&["--default-user", "root"]);
    wait_for_port(g.code_port, Duration::from_secs(120)).await;
    let cases = corpus();
    assert!(cases.len() >= 2000, "corpus has {} cases", cases.len());

    // Every case whole on the agent port; every third also on the code port; every
    // seventh split in two writes; every eleventh after a good request on the same
    // connection.
    let mut jobs = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        jobs.push((Port::Agent, c.clone(), false, false));
        if i % 3 == 0 {
            jobs.push((Port::Code, c.clone(), false, false));
        }
        if i % 7 == 0 {
            jobs.push((Port::Agent, c.clone(), true, false));
        }
        if i % 11 == 0 {
            jobs.push((Port::Agent, c.clone(), false, true));
            jobs.push((Port::Code, c.clone(), false, true));
        }
    }
    let total = jobs.len();
    let (port, code_port) = (g.port, g.code_port);
    let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let jobs = jobs.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let job = jobs.lock().expect("jobs").pop();
                let Some((which, c, split, after_good)) = job else {
                    return;
                };
                let p = match which {
                    Port::Agent => port,
                    Port::Code => code_port,
                };
                if after_good {
                    check(
                        p,
                        which,
                        &c,
                        split,
                        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                        1,
                    )
                    .await;
                } else {
                    check(p, which, &c, split, b"", 0).await;
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    eprintln!("{total} malformed requests answered");

    // Malformed chunked bodies on the code-interpreter port: 400 naming the framing.
    for (name, body, word) in bad_chunked_bodies() {
        for route in ["/execute", "/contexts"] {
            let req = chunked_request("POST", route, "Content-Type: application/json\r\n", &body);
            let raw = exchange(code_port, &[req], Duration::ZERO).await;
            let resps = parse_responses(&raw);
            let ctx = format!("{name} on {route}: {:?}", String::from_utf8_lossy(&raw));
            assert_eq!(resps.len(), 1, "{ctx}");
            assert_eq!(resps[0].status, 400, "{ctx}");
            let text = String::from_utf8_lossy(&resps[0].body);
            assert!(
                text.contains("malformed chunked request body") && text.contains(word),
                "{ctx}"
            );
        }
    }
    assert!(g.is_alive(), "guestd died; log:\n{}", g.log_text());
    assert_eq!(get_status(port, "/health").await, 204);
    assert_eq!(get_status(code_port, "/health").await, 200);
}

#[tokio::test]
async fn hyper_own_error_is_replaced_only_after_every_earlier_answer() {
    // Pipelined: three good requests (one HEAD, one with a body) and a bad head in one
    // write; the answers come in order and the last one names the problem.
    let g = Guestd::start();
    let mut req = Vec::new();
    req.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    req.extend_from_slice(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n");
    req.extend_from_slice(
        b"POST /process.Process/List HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    req.extend_from_slice(b"GET /envs HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n");
    let raw = exchange(g.port, &[req], Duration::ZERO).await;
    let resps = parse_responses(&raw);
    let statuses: Vec<u16> = resps.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [204, 204, 200, 400],
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(resps[2].body, b"{}");
    let v: serde_json::Value = serde_json::from_slice(&resps[3].body).expect("JSON");
    assert_eq!(v["code"], 400);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid byte ' ' (0x20) in the header name \"Bad \""),
        "{v}"
    );
}

#[tokio::test]
async fn valid_requests_with_unusual_bytes_are_untouched() {
    // obs-text in values, leading empty lines, HTTP/1.0, tabs: hyper accepts these,
    // so the handlers answer them (no error page).
    let g = Guestd::start();
    for req in [
        &b"GET /health HTTP/1.1\r\nX-A: caf\xc3\xa9 \xff\r\n\r\n"[..],
        b"\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/1.0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nX-A:\tv\t\r\n\r\n",
    ] {
        let mut r = req.to_vec();
        if !r.starts_with(b"GET /health HTTP/1.0") {
            r.splice(
                r.len() - 2..r.len() - 2,
                b"Connection: close\r\n".iter().copied(),
            );
        }
        let raw = exchange(g.port, &[r], Duration::ZERO).await;
        let resps = parse_responses(&raw);
        assert_eq!(resps.len(), 1, "{:?}", String::from_utf8_lossy(&raw));
        assert_eq!(resps[0].status, 204, "{:?}", req.escape_ascii());
    }
}

// ---------------------------------------------------------------------------------------
// Malformed chunked bodies

/// Chunked bodies hyper's decoder rejects, with a word its reason contains.
fn bad_chunked_bodies() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    vec![
        (
            "size overflow",
            b"ffffffffffffffffffff\r\n".to_vec(),
            "overflow",
        ),
        ("size 2x", b"2x\r\n{}\r\n0\r\n\r\n".to_vec(), "Invalid Size"),
        ("bare LF lines", b"2\n{}\n0\n\n".to_vec(), "Invalid Size"),
        ("negative size", b"-1\r\n".to_vec(), "chunk size"),
        ("no size", b"\r\n{}\r\n".to_vec(), "chunk size"),
        (
            "extension with LF",
            b"2;ext\n{}\r\n0\r\n\r\n".to_vec(),
            "extension",
        ),
        (
            "CR without LF",
            b"2\r{}\r\n0\r\n\r\n".to_vec(),
            "chunk size LF",
        ),
        (
            "data not followed by CRLF",
            b"2\r\n{}XX0\r\n\r\n".to_vec(),
            "chunk",
        ),
        (
            "space inside the size",
            b"1 2\r\nabc\r\n0\r\n\r\n".to_vec(),
            "chunk size",
        ),
    ]
}

fn chunked_request(method: &str, target: &str, fields: &str, body: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\n{fields}Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(body);
    b
}

#[tokio::test]
async fn malformed_chunked_bodies_are_400_naming_the_framing() {
    let g = Guestd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("up.bin");
    let target = target.to_str().expect("utf-8");
    // Route, extra header fields, what the answer looks like.
    #[derive(Clone, Copy)]
    enum Shape {
        /// Connect unary: HTTP 400, {"code":"invalid_argument"}.
        Unary,
        /// Connect stream: HTTP 200, end-of-stream error invalid_argument.
        Stream,
        /// REST JSON: 400 {"code":400}.
        Rest,
        /// Plain text 400 (/init).
        Text,
    }
    let routes: Vec<(String, &str, Shape)> = vec![
        (
            "/process.Process/List".into(),
            "Content-Type: application/json\r\n",
            Shape::Unary,
        ),
        (
            "/filesystem.Filesystem/Stat".into(),
            "Content-Type: application/proto\r\n",
            Shape::Unary,
        ),
        (
            "/process.Process/Start".into(),
            "Content-Type: application/connect+json\r\n",
            Shape::Stream,
        ),
        (
            "/process.Process/StreamInput".into(),
            "Content-Type: application/connect+json\r\n",
            Shape::Stream,
        ),
        (
            format!("/files?path={target}"),
            "Content-Type: application/octet-stream\r\n",
            Shape::Rest,
        ),
        (
            format!("/files?path={target}"),
            "Content-Type: multipart/form-data; boundary=XyZ\r\n",
            Shape::Rest,
        ),
        (
            "/files/compose".into(),
            "Content-Type: application/json\r\n",
            Shape::Rest,
        ),
        (
            "/init".into(),
            "Content-Type: application/json\r\n",
            Shape::Text,
        ),
    ];
    for (name, body, word) in bad_chunked_bodies() {
        for (route, fields, shape) in &routes {
            let req = chunked_request("POST", route, fields, &body);
            let raw = exchange(g.port, &[req], Duration::ZERO).await;
            let resps = parse_responses(&raw);
            let ctx = format!("{name} on {route}: {:?}", String::from_utf8_lossy(&raw));
            assert_eq!(resps.len(), 1, "{ctx}");
            let r = &resps[0];
            let text = String::from_utf8_lossy(&r.body).into_owned();
            assert!(
                text.contains("malformed chunked request body") && text.contains(word),
                "{ctx}"
            );
            match shape {
                Shape::Unary => {
                    assert_eq!(r.status, 400, "{ctx}");
                    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
                    assert_eq!(v["code"], "invalid_argument", "{ctx}");
                }
                Shape::Stream => {
                    assert_eq!(r.status, 200, "{ctx}");
                    // One end-of-stream envelope: flags 0x02, length, JSON.
                    assert_eq!(r.body[0], 2, "{ctx}");
                    let v: serde_json::Value =
                        serde_json::from_slice(&r.body[5..]).expect("end-of-stream JSON");
                    assert_eq!(v["error"]["code"], "invalid_argument", "{ctx}");
                }
                Shape::Rest => {
                    assert_eq!(r.status, 400, "{ctx}");
                    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
                    assert_eq!(v["code"], 400, "{ctx}");
                }
                Shape::Text => assert_eq!(r.status, 400, "{ctx}"),
            }
        }
    }
    // Nothing was written by the failed uploads.
    assert!(!std::path::Path::new(target).exists());
    assert_eq!(get_status(g.port, "/health").await, 204);
}
