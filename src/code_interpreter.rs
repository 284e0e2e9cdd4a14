//! The HTTP surface of the code-interpreter port (49999): routes, JSON bodies, the
//! NDJSON framing of `/execute` and CORS (contract §1-§3). Everything else is
//! `kernel`'s job.
//!
//! `/execute` streams one ASCII-only JSON object per line (non-ASCII escaped as
//! `\uXXXX`, so neither SDK's line splitting nor chunk decoding can break a line), a
//! `keepalive` line after 5 s of silence, and `end_of_execution` last. The response body
//! pulls straight from the execution's output queue; when the client disconnects, the
//! HTTP stack drops the body (hyper notices the peer's EOF even mid-response), which
//! drops the queue's consuming end, which interrupts the kernel.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kernel::{
    ContextInfo, ErrorKind, ExecStream, ExecuteRequest, KernelError, KernelManager, Output,
};
use crate::server::Handler;
use crate::transport::{Body, BoxError, full_body};

pub mod ndjson;
pub use ndjson::encode_line;

/// Silence after which a `keepalive` line is written.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Largest accepted request body.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The request handler of the code-interpreter listener.
/// Requests hyper rejects before routing get the JSON error shape
/// `{"code":<status>,"message"}`.
pub fn handler(mgr: Arc<KernelManager>) -> Handler {
    Handler::new(
        move |req: Request<Incoming>| {
            let mgr = mgr.clone();
            Box::pin(async move { route(mgr, req).await })
        },
        crate::server::rest_error_page,
    )
}

async fn route(mgr: Arc<KernelManager>, req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::OPTIONS {
        return preflight(&req);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let mut resp = match (&method, segs.as_slice()) {
        (&Method::GET, ["health"]) => json_response(StatusCode::OK, &"OK"),
        (&Method::POST, ["execute"]) => execute(&mgr, req).await,
        (&Method::POST, ["contexts"]) => create_context(&mgr, req).await,
        (&Method::GET, ["contexts"]) => {
            let contexts = mgr.list_contexts();
            let list: Vec<ContextJson> = contexts.iter().map(ContextJson::from).collect();
            json_response(StatusCode::OK, &list)
        }
        (&Method::POST, ["contexts", id, "restart"]) => match mgr.restart_context(id).await {
            Ok(()) => json_response(StatusCode::OK, &Value::Null),
            Err(e) => error_response(&e),
        },
        (&Method::DELETE, ["contexts", id]) => match mgr.remove_context(id).await {
            Ok(()) => json_response(StatusCode::OK, &Value::Null),
            Err(e) => error_response(&e),
        },
        (
            _,
            ["health"] | ["execute"] | ["contexts"] | ["contexts", _] | ["contexts", _, "restart"],
        ) => text_response(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
        _ => text_response(StatusCode::NOT_FOUND, "Not Found"),
    };
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "code-interpreter request");
    resp
}

/// CORS preflight: every origin, the requested method and headers.
fn preflight(req: &Request<Incoming>) -> Response<Body> {
    let h = req.headers();
    let methods = h
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_static("DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT")
        });
    let mut resp = Response::new(full_body("OK"));
    let out = resp.headers_mut();
    out.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
    if let Some(hdrs) = h.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, hdrs.clone());
    }
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    out.insert(header::VARY, HeaderValue::from_static("Origin"));
    resp
}

fn text_response(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut resp = Response::new(full_body(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    let mut resp = Response::new(full_body(to_ascii_json(value)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &KernelError) -> Response<Body> {
    let status = match e.kind() {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_server_error() {
        tracing::warn!(error = %e, "code-interpreter request failed");
    }
    text_response(status, e.to_string())
}

/// An early error response (boxed: responses are large).
type Reject = Box<Response<Body>>;

/// Reads the whole request body (bounded).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reject> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BYTES);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Box::new(text_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
            )))
        }
        Err(e) => Err(Box::new(text_response(
            StatusCode::BAD_REQUEST,
            format!(
                "Cannot read request body: {}",
                crate::transport::body::BodyFault::classify(&*e)
            ),
        ))),
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(raw: &[u8], empty_ok: bool) -> Result<T, Reject> {
    let raw: &[u8] = if empty_ok && raw.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        raw
    };
    serde_json::from_slice(raw).map_err(|e| {
        Box::new(text_response(
            StatusCode::BAD_REQUEST,
            format!("Invalid request body: {e}"),
        ))
    })
}

/// `env_vars` values: strings; numbers and booleans are accepted as their text.
#[derive(Deserialize)]
#[serde(untagged)]
enum EnvValue {
    Str(String),
    Num(serde_json::Number),
    Bool(bool),
}

impl EnvValue {
    fn into_string(self) -> String {
        match self {
            EnvValue::Str(s) => s,
            EnvValue::Num(n) => n.to_string(),
            EnvValue::Bool(b) => if b { "True" } else { "False" }.to_string(),
        }
    }
}

#[derive(Deserialize)]
struct ExecuteBody {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, EnvValue>>,
}

#[derive(Deserialize, Default)]
struct CreateContextBody {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Serialize)]
struct ContextJson<'a> {
    id: &'a str,
    language: &'a str,
    cwd: &'a str,
}

impl<'a> From<&'a ContextInfo> for ContextJson<'a> {
    fn from(c: &'a ContextInfo) -> Self {
        ContextJson {
            id: &c.id,
            language: &c.language,
            cwd: &c.cwd,
        }
    }
}

async fn create_context(mgr: &KernelManager, req: Request<Incoming>) -> Response<Body> {
    let raw = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let body: CreateContextBody = match parse_json(&raw, true) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match mgr
        .create_context(body.language.as_deref(), body.cwd.as_deref())
        .await
    {
        Ok(info) => json_response(StatusCode::OK, &ContextJson::from(&info)),
        Err(e) => error_response(&e),
    }
}

async fn execute(mgr: &KernelManager, req: Request<Incoming>) -> Response<Body> {
    let raw = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let body: ExecuteBody = match parse_json(&raw, false) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let request = ExecuteRequest {
        code: body.code,
        context_id: body.context_id,
        language: body.language,
        env_vars: body
            .env_vars
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_string()))
            .collect(),
    };
    match mgr.execute(request).await {
        Ok(stream) => {
            let mut resp = Response::new(http_body_util::BodyExt::boxed_unsync(NdjsonBody::new(
                stream,
            )));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        Err(e) => error_response(&e),
    }
}

// ---------------------------------------------------------------------------------------
// NDJSON stream

/// The `/execute` response body.
struct NdjsonBody {
    stream: ExecStream,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    interval: Duration,
    done: bool,
}

impl NdjsonBody {
    fn new(stream: ExecStream) -> NdjsonBody {
        NdjsonBody::with_interval(stream, KEEPALIVE_INTERVAL)
    }

    fn with_interval(stream: ExecStream, interval: Duration) -> NdjsonBody {
        NdjsonBody {
            stream,
            keepalive: Box::pin(tokio::time::sleep(interval)),
            interval,
            done: false,
        }
    }

    fn reset_keepalive(&mut self) {
        let next = tokio::time::Instant::now() + self.interval;
        self.keepalive.as_mut().reset(next);
    }
}

impl http_body::Body for NdjsonBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.stream.poll_next(cx) {
            Poll::Ready(Some(out)) => {
                if matches!(out, Output::End) {
                    self.done = true;
                }
                self.reset_keepalive();
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(encode_line(&out))))));
            }
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if self.keepalive.as_mut().poll(cx).is_ready() {
            self.reset_keepalive();
            // Register the new deadline's waker.
            let _ = self.keepalive.as_mut().poll(cx);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b"{\"type\":\"keepalive\"}\n",
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A serde_json formatter that writes every non-ASCII character as `\uXXXX` (UTF-16
/// surrogate pairs above U+FFFF), like Python's `json.dumps(ensure_ascii=True)`.
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let bytes = fragment.as_bytes();
        if bytes.is_ascii() {
            return writer.write_all(bytes);
        }
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if ch.is_ascii() {
                continue;
            }
            writer.write_all(&bytes[start..i])?;
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{u:04x}")?;
            }
            start = i + ch.len_utf8();
        }
        writer.write_all(&bytes[start..])
    }
}

/// Serializes `value` as ASCII-only JSON.
pub fn to_ascii_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    if let Err(e) = value.serialize(&mut ser) {
        // Only possible for maps with non-string keys, which these types never have.
        tracing::error!(error = %e, "cannot serialize response line");
        return br#"{"type": "error", "name": "SerializationError", "value": "", "traceback": ""}"#
            .to_vec();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::exec::output_channel;
    use serde_json::json;

    #[test]
    fn ascii_escapes_including_surrogates_and_line_separators() {
        let s = to_ascii_json(&json!({"t": "é\u{2028}\u{85}😀\n\"x\u{7f}"}));
        let text = std::str::from_utf8(&s).expect("utf8");
        assert!(text.is_ascii());
        assert_eq!(
            text,
            r#"{"t":"\u00e9\u2028\u0085\ud83d\ude00\n\"x"}"#.replace("x\"", "x\u{7f}\"")
        );
        let back: Value = serde_json::from_slice(&s).expect("parse");
        assert_eq!(back["t"], "é\u{2028}\u{85}😀\n\"x\u{7f}");
    }

    #[tokio::test]
    async fn body_sends_keepalives_then_lines_then_ends() {
        let (tx, rx) = output_channel();
        let interval = Duration::from_millis(200);
        let mut body = NdjsonBody::with_interval(rx, interval);
        async fn next(b: &mut NdjsonBody) -> Option<Result<Frame<Bytes>, BoxError>> {
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *b), cx)).await
        }
        let t0 = tokio::time::Instant::now();
        let f = next(&mut body).await.expect("frame").expect("ok");
        assert_eq!(
            f.into_data().expect("data"),
            Bytes::from_static(b"{\"type\":\"keepalive\"}\n")
        );
        assert!(t0.elapsed() >= interval);
        tx.push(Output::ExecutionCount(1));
        tx.end(None);
        let f = next(&mut body).await.expect("frame").expect("ok");
        assert_eq!(
            f.into_data().expect("data"),
            Bytes::from_static(b"{\"type\":\"number_of_executions\",\"execution_count\":1}\n")
        );
        let f = next(&mut body).await.expect("frame").expect("ok");
        assert_eq!(
            f.into_data().expect("data"),
            Bytes::from_static(b"{\"type\":\"end_of_execution\"}\n")
        );
        assert!(next(&mut body).await.is_none());
    }
}
