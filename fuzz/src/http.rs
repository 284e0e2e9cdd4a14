//! One HTTP/1.1 exchange with a handler over an in-memory pipe: the request is written
//! as raw bytes (so framing is under the fuzzer's control), the response is read to
//! EOF and parsed here.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use guestd::transport::Body;

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
}

/// Runs a future on the harness's (single-threaded) runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    RT.with(|rt| rt.block_on(f))
}

/// A parsed response.
#[derive(Debug, Default)]
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Chunked trailers (names lowercased).
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn trailer(&self, name: &str) -> Option<&[u8]> {
        self.trailers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Upper bound for one exchange: every handler here answers at once, so a response
/// that takes longer is a hang.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(20);

/// Sends `request` (raw bytes, should say `Connection: close`) to `handler` and returns
/// the response, or `None` when hyper closed the connection without one.
pub fn exchange<H, Fut>(request: Vec<u8>, handler: H) -> Option<RawResponse>
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    block_on(async move {
        let (client, server) = tokio::io::duplex(1 << 16);
        let svc = hyper::service::service_fn(move |req| {
            let h = handler.clone();
            async move { Ok::<_, Infallible>(h(req).await) }
        });
        let conn = tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&request).await;
            let _ = wr.shutdown().await;
            wr
        });
        let mut out = Vec::new();
        let read = tokio::time::timeout(EXCHANGE_LIMIT, rd.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "no complete response within {EXCHANGE_LIMIT:?}"
        );
        let _ = writer.await;
        conn.abort();
        parse_response(&out)
    })
}

/// Parses one HTTP/1.1 response (status line, headers, body by Content-Length, chunked
/// framing or EOF).
pub fn parse_response(raw: &[u8]) -> Option<RawResponse> {
    let end = memchr::memmem::find(raw, b"\r\n\r\n")?;
    // Header values may carry obs-text bytes (echoed request headers): bytes, not str.
    let mut lines = raw[..end]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = std::str::from_utf8(lines.next()?).expect("ASCII status line");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let mut resp = RawResponse {
        status,
        ..RawResponse::default()
    };
    for l in lines {
        let colon = l.iter().position(|&b| b == b':').expect("header line");
        let name = std::str::from_utf8(&l[..colon]).expect("ASCII header name");
        resp.headers.push((
            name.trim().to_ascii_lowercase(),
            l[colon + 1..].trim_ascii().to_vec(),
        ));
    }
    let rest = &raw[end + 4..];
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
    if chunked {
        let (body, trailers) = dechunk(rest).expect("well-formed chunked response body");
        resp.body = body;
        resp.trailers = trailers;
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = std::str::from_utf8(len)
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("numeric Content-Length");
        assert!(
            rest.len() >= len,
            "response body shorter than Content-Length"
        );
        resp.body = rest[..len].to_vec();
    } else {
        resp.body = rest.to_vec();
    }
    Some(resp)
}

type Trailers = Vec<(String, Vec<u8>)>;

fn dechunk(mut s: &[u8]) -> Option<(Vec<u8>, Trailers)> {
    let mut body = Vec::new();
    loop {
        let eol = memchr::memmem::find(s, b"\r\n")?;
        let size_text = std::str::from_utf8(&s[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        s = &s[eol + 2..];
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let eol = memchr::memmem::find(s, b"\r\n")?;
                if eol == 0 {
                    return Some((body, trailers));
                }
                let line = std::str::from_utf8(&s[..eol]).ok()?;
                let (n, v) = line.split_once(':')?;
                trailers.push((n.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()));
                s = &s[eol + 2..];
            }
        }
        if s.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&s[..size]);
        s = &s[size + 2..];
    }
}

/// Removes the bytes that cannot appear in a header value (CR, LF, NUL), so generated
/// headers reach the handler instead of hyper's 400.
pub fn header_safe(v: &[u8]) -> Vec<u8> {
    v.iter()
        .copied()
        .filter(|b| !matches!(b, b'\r' | b'\n' | 0))
        .collect()
}

/// Appends `body` with chunked framing, one chunk per piece of `splits`.
pub fn chunk_body(out: &mut Vec<u8>, body: &[u8], splits: &[u8]) {
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = splits
            .get(i)
            .map_or(rest.len(), |&s| usize::from(s).max(1))
            .min(rest.len());
        i += 1;
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
}
