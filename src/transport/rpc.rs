//! The RPC protocols served on the agent port: Connect (JSON and binary proto codecs;
//! unary, server-streaming and client-streaming calls) and gRPC (proto and JSON), told
//! apart by `Content-Type` on the same route.
//!
//! Handlers are plain async functions over typed messages; everything on the wire
//! (envelopes, codecs, compression, deadlines, end-of-stream errors, trailers) is here.

use std::future::Future;
use std::io::Read as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt as _;
use tokio::time::Instant;

use super::envelope::{self, EnvelopeReader, FLAG_COMPRESSED, FLAG_END_STREAM};
use super::error::{Code, RpcError};
use super::{Body, BoxError, full_body};

/// Which RPC protocol a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Connect,
    Grpc,
}

/// How messages are serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Identity,
    Gzip,
}

/// Limits applied to every call.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted request message (after decompression), in bytes.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 32 << 20,
        }
    }
}

/// What a handler knows about the call besides its message.
#[derive(Debug)]
pub struct CallContext {
    pub protocol: Protocol,
    pub codec: Codec,
    pub headers: HeaderMap,
    /// The timeout the client asked for (`Connect-Timeout-Ms` / `grpc-timeout`).
    pub timeout: Option<Duration>,
    /// When the call ends with `deadline_exceeded`.
    pub deadline: Option<Instant>,
    pub extensions: http::Extensions,
}

/// Default stream keepalive interval when the client sends none (contract §1.6).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

impl CallContext {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `Keepalive-Ping-Interval` header as whole seconds, or 90 s when absent or
    /// not a positive integer.
    pub fn keepalive_interval(&self) -> Duration {
        self.header("keepalive-ping-interval")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_KEEPALIVE)
    }
}

/// A message type the transport can decode and encode in both codecs.
pub trait RpcMessage:
    prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static
{
}
impl<T> RpcMessage for T where
    T: prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static
{
}

/// A server stream as handlers return it.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, RpcError>> + Send>>;

/// The request messages of a client-streaming call, read as they arrive.
pub struct RequestStream<T> {
    reader: EnvelopeReader<hyper::body::Incoming>,
    codec: Codec,
    compression: Compression,
    max: usize,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: RpcMessage> RequestStream<T> {
    /// The next message; `Ok(None)` once the client half-closed.
    pub async fn message(&mut self) -> Result<Option<T>, RpcError> {
        match self.reader.next().await? {
            None => Ok(None),
            Some(env) if env.flags & FLAG_END_STREAM != 0 => Ok(None),
            Some(env) => {
                let payload =
                    decompress_envelope(env.flags, env.payload, self.compression, self.max)?;
                decode(self.codec, &payload).map(Some)
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Entry points

/// Serves a unary call.
pub async fn unary<Req, Res, F, Fut>(
    req: Request<hyper::body::Incoming>,
    limits: Limits,
    f: F,
) -> Response<Body>
where
    Req: RpcMessage,
    Res: RpcMessage,
    F: FnOnce(CallContext, Req) -> Fut,
    Fut: Future<Output = Result<Res, RpcError>>,
{
    let call = match Call::prepare(req, Kind::Unary) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let (protocol, codec) = (call.ctx.protocol, call.ctx.codec);
    match call.run_single(limits, f).await {
        Ok(res) => match protocol {
            Protocol::Connect => match encode(codec, &res) {
                Ok(bytes) => {
                    let mut resp = Response::new(full_body(bytes));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(unary_content_type(codec)),
                    );
                    resp
                }
                Err(e) => connect_unary_error(&e),
            },
            Protocol::Grpc => grpc_response(
                codec,
                futures_util::stream::iter([Ok::<Res, RpcError>(res)]).boxed(),
                None,
            ),
        },
        Err(e) => error_response(protocol, codec, Kind::Unary, &e),
    }
}

/// Serves a server-streaming call. The handler validates the request and returns the
/// stream; an error before the stream becomes the end-of-stream error (Connect) or
/// the trailers (gRPC), with HTTP 200 as the Connect protocol requires.
pub async fn server_stream<Req, Res, F, Fut>(
    req: Request<hyper::body::Incoming>,
    limits: Limits,
    f: F,
) -> Response<Body>
where
    Req: RpcMessage,
    Res: RpcMessage,
    F: FnOnce(CallContext, Req) -> Fut,
    Fut: Future<Output = Result<ResponseStream<Res>, RpcError>>,
{
    let call = match Call::prepare(req, Kind::ServerStream) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let (protocol, codec, deadline) = (call.ctx.protocol, call.ctx.codec, call.ctx.deadline);
    let stream = match call.run_single(limits, f).await {
        Ok(s) => s,
        Err(e) => return error_response(protocol, codec, Kind::ServerStream, &e),
    };
    match protocol {
        Protocol::Connect => connect_stream_response(codec, stream, deadline),
        Protocol::Grpc => grpc_response(codec, stream, deadline),
    }
}

/// Serves a client-streaming call.
pub async fn client_stream<Req, Res, F, Fut>(
    req: Request<hyper::body::Incoming>,
    limits: Limits,
    f: F,
) -> Response<Body>
where
    Req: RpcMessage,
    Res: RpcMessage,
    F: FnOnce(CallContext, RequestStream<Req>) -> Fut,
    Fut: Future<Output = Result<Res, RpcError>>,
{
    let call = match Call::prepare(req, Kind::ClientStream) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let (protocol, codec, deadline) = (call.ctx.protocol, call.ctx.codec, call.ctx.deadline);
    let Call {
        ctx,
        body,
        compression,
        ..
    } = call;
    let requests = RequestStream {
        reader: EnvelopeReader::new(body, limits.max_message_bytes),
        codec,
        compression,
        max: limits.max_message_bytes,
        _t: std::marker::PhantomData,
    };
    let stream: ResponseStream<Res> = match within_deadline(deadline, f(ctx, requests)).await {
        Ok(res) => futures_util::stream::iter([Ok(res)]).boxed(),
        Err(e) => return error_response(protocol, codec, Kind::ClientStream, &e),
    };
    match protocol {
        Protocol::Connect => connect_stream_response(codec, stream, None),
        Protocol::Grpc => grpc_response(codec, stream, None),
    }
}

/// Runs `fut` to its result, or `deadline_exceeded` when the call's deadline comes first.
async fn within_deadline<T>(
    deadline: Option<Instant>,
    fut: impl Future<Output = Result<T, RpcError>>,
) -> Result<T, RpcError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut)
            .await
            .unwrap_or_else(|_| Err(RpcError::deadline_exceeded())),
        None => fut.await,
    }
}

// ---------------------------------------------------------------------------------
// Request side

struct Call {
    ctx: CallContext,
    body: hyper::body::Incoming,
    compression: Compression,
    kind: Kind,
}

impl Call {
    /// Recognizes protocol and codec, parses the timeout and compression headers.
    /// `Err` is the complete response to send (415, or a protocol error).
    fn prepare(
        req: Request<hyper::body::Incoming>,
        kind: Kind,
    ) -> Result<Call, Box<Response<Body>>> {
        let (parts, body) = req.into_parts();
        let ct = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let (protocol, codec) = match (media.as_str(), kind) {
            ("application/json", Kind::Unary) => (Protocol::Connect, Codec::Json),
            ("application/proto", Kind::Unary) => (Protocol::Connect, Codec::Proto),
            ("application/connect+json", Kind::ServerStream | Kind::ClientStream) => {
                (Protocol::Connect, Codec::Json)
            }
            ("application/connect+proto", Kind::ServerStream | Kind::ClientStream) => {
                (Protocol::Connect, Codec::Proto)
            }
            ("application/grpc" | "application/grpc+proto", _) => (Protocol::Grpc, Codec::Proto),
            ("application/grpc+json", _) => (Protocol::Grpc, Codec::Json),
            _ => return Err(Box::new(unsupported_media_type(ct, kind))),
        };
        let timeout = match parse_timeout(protocol, &parts.headers) {
            Ok(t) => t,
            Err(e) => return Err(Box::new(error_response(protocol, codec, kind, &e))),
        };
        let compression = match parse_compression(protocol, kind, &parts.headers) {
            Ok(c) => c,
            Err(e) => return Err(Box::new(error_response(protocol, codec, kind, &e))),
        };
        let ctx = CallContext {
            protocol,
            codec,
            timeout,
            deadline: timeout.map(|t| Instant::now() + t),
            headers: parts.headers,
            extensions: parts.extensions,
        };
        Ok(Call {
            ctx,
            body,
            compression,
            kind,
        })
    }

    /// Reads the single request message and runs the handler on it, all within the
    /// call's deadline.
    async fn run_single<Req, T, F, Fut>(self, limits: Limits, f: F) -> Result<T, RpcError>
    where
        Req: RpcMessage,
        F: FnOnce(CallContext, Req) -> Fut,
        Fut: Future<Output = Result<T, RpcError>>,
    {
        let deadline = self.ctx.deadline;
        within_deadline(deadline, async {
            let (ctx, msg) = self.read_single::<Req>(limits).await?;
            f(ctx, msg).await
        })
        .await
    }

    /// Reads the single request message of a unary or server-streaming call.
    async fn read_single<T: RpcMessage>(
        self,
        limits: Limits,
    ) -> Result<(CallContext, T), RpcError> {
        let max = limits.max_message_bytes;
        let Call {
            ctx,
            body,
            compression,
            kind,
        } = self;
        if ctx.protocol == Protocol::Connect && kind == Kind::Unary {
            let raw = read_limited(body, max).await?;
            let raw = match compression {
                Compression::Identity => raw,
                Compression::Gzip => gunzip(&raw, max)?,
            };
            let msg = decode(ctx.codec, &raw)?;
            return Ok((ctx, msg));
        }
        let mut reader = EnvelopeReader::new(body, max);
        let first = reader.next().await?.ok_or_else(|| {
            RpcError::invalid_argument("the request has no message: expected exactly one")
        })?;
        if first.flags & FLAG_END_STREAM != 0 {
            return Err(RpcError::invalid_argument(
                "the request message is marked end-of-stream: expected exactly one message",
            ));
        }
        if reader.next().await?.is_some() {
            return Err(RpcError::invalid_argument(
                "the request has more than one message: expected exactly one",
            ));
        }
        let payload = decompress_envelope(first.flags, first.payload, compression, max)?;
        let msg = decode(ctx.codec, &payload)?;
        Ok((ctx, msg))
    }
}

async fn read_limited(body: hyper::body::Incoming, max: usize) -> Result<Bytes, RpcError> {
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(RpcError::new(
                    Code::ResourceExhausted,
                    format!("request message exceeds the limit of {max} bytes"),
                ))
            } else {
                Err(body_read_error(&*e))
            }
        }
    }
}

/// A failed request-body read: a malformed body is the client's error
/// (`invalid_argument`, 400); a connection that ended early is `canceled`.
pub(crate) fn body_read_error(e: &(dyn std::error::Error + 'static)) -> RpcError {
    let fault = super::body::BodyFault::classify(e);
    let code = if fault.is_malformed() {
        Code::InvalidArgument
    } else {
        Code::Canceled
    };
    RpcError::new(code, fault.message())
}

fn gunzip(raw: &[u8], max: usize) -> Result<Bytes, RpcError> {
    let mut out = Vec::new();
    let mut dec = flate2::read::GzDecoder::new(raw).take(max as u64 + 1);
    dec.read_to_end(&mut out)
        .map_err(|e| RpcError::invalid_argument(format!("invalid gzip-compressed message: {e}")))?;
    if out.len() > max {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("decompressed request message exceeds the limit of {max} bytes"),
        ));
    }
    Ok(Bytes::from(out))
}

fn decompress_envelope(
    flags: u8,
    payload: Bytes,
    c: Compression,
    max: usize,
) -> Result<Bytes, RpcError> {
    if flags & FLAG_COMPRESSED == 0 {
        return Ok(payload);
    }
    match c {
        Compression::Gzip => gunzip(&payload, max),
        Compression::Identity => Err(RpcError::invalid_argument(
            "a message is flagged as compressed but the request declared no message encoding",
        )),
    }
}

fn parse_timeout(protocol: Protocol, headers: &HeaderMap) -> Result<Option<Duration>, RpcError> {
    match protocol {
        Protocol::Connect => {
            let Some(v) = headers.get("connect-timeout-ms") else {
                return Ok(None);
            };
            let s = v.to_str().unwrap_or("");
            if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RpcError::invalid_argument(format!(
                    "invalid Connect-Timeout-Ms header {s:?}: expected 1 to 10 decimal digits"
                )));
            }
            let ms: u64 = s.parse().map_err(|_| {
                RpcError::invalid_argument(format!("invalid Connect-Timeout-Ms header {s:?}"))
            })?;
            Ok(Some(Duration::from_millis(ms)))
        }
        Protocol::Grpc => {
            let Some(v) = headers.get("grpc-timeout") else {
                return Ok(None);
            };
            let s = v.to_str().unwrap_or("");
            let bad = || RpcError::invalid_argument(format!("invalid grpc-timeout header {s:?}"));
            if s.len() < 2 || s.len() > 9 {
                return Err(bad());
            }
            let (num, unit) = s.split_at(s.len() - 1);
            if !num.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = num.parse().map_err(|_| bad())?;
            let d = match unit {
                "H" => Duration::from_secs(n.saturating_mul(3600)),
                "M" => Duration::from_secs(n.saturating_mul(60)),
                "S" => Duration::from_secs(n),
                "m" => Duration::from_millis(n),
                "u" => Duration::from_micros(n),
                "n" => Duration::from_nanos(n),
                _ => return Err(bad()),
            };
            Ok(Some(d))
        }
    }
}

fn parse_compression(
    protocol: Protocol,
    kind: Kind,
    headers: &HeaderMap,
) -> Result<Compression, RpcError> {
    let name = match (protocol, kind) {
        (Protocol::Connect, Kind::Unary) => "content-encoding",
        (Protocol::Connect, _) => "connect-content-encoding",
        (Protocol::Grpc, _) => "grpc-encoding",
    };
    let Some(v) = headers.get(name) else {
        return Ok(Compression::Identity);
    };
    match v
        .to_str()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "" | "identity" => Ok(Compression::Identity),
        "gzip" => Ok(Compression::Gzip),
        other => Err(RpcError::unimplemented(format!(
            "unsupported message encoding {other:?} in {name}: supported are gzip and identity"
        ))),
    }
}

// ---------------------------------------------------------------------------------
// Codecs

/// Decodes one message in the given codec; errors name the problem.
pub fn decode<T: RpcMessage>(codec: Codec, raw: &[u8]) -> Result<T, RpcError> {
    match codec {
        Codec::Proto => T::decode(raw)
            .map_err(|e| RpcError::invalid_argument(format!("invalid protobuf message: {e}"))),
        Codec::Json => {
            let raw = if raw.iter().all(|b| b.is_ascii_whitespace()) {
                &b"{}"[..]
            } else {
                raw
            };
            serde_json::from_slice(raw)
                .map_err(|e| RpcError::invalid_argument(format!("invalid JSON message: {e}")))
        }
    }
}

/// Encodes one stream message in the given codec straight into its envelope (one
/// buffer: process output is copied once here, not once to encode and again to frame).
fn encode_enveloped<T: RpcMessage>(codec: Codec, msg: &T) -> Result<Bytes, RpcError> {
    use bytes::{BufMut as _, BytesMut};
    let too_big = || RpcError::internal("encoding the response failed: message over 4 GiB");
    match codec {
        Codec::Proto => {
            let len = msg.encoded_len();
            let len32 = u32::try_from(len).map_err(|_| too_big())?;
            let mut out = BytesMut::with_capacity(5 + len);
            out.put_u8(0);
            out.put_u32(len32);
            msg.encode(&mut out)
                .map_err(|e| RpcError::internal(format!("encoding the response failed: {e}")))?;
            Ok(out.freeze())
        }
        Codec::Json => {
            // Bytes fields are base64 in JSON: about 4/3 of their proto size.
            let mut w = BytesMut::with_capacity(5 + msg.encoded_len() / 3 * 4 + 128).writer();
            w.get_mut().put_slice(&[0; 5]);
            serde_json::to_writer(&mut w, msg)
                .map_err(|e| RpcError::internal(format!("encoding the response failed: {e}")))?;
            let mut out = w.into_inner();
            let len32 = u32::try_from(out.len() - 5).map_err(|_| too_big())?;
            out[1..5].copy_from_slice(&len32.to_be_bytes());
            Ok(out.freeze())
        }
    }
}

/// Encodes one message in the given codec.
pub fn encode<T: RpcMessage>(codec: Codec, msg: &T) -> Result<Bytes, RpcError> {
    match codec {
        Codec::Proto => Ok(Bytes::from(msg.encode_to_vec())),
        Codec::Json => serde_json::to_vec(msg)
            .map(Bytes::from)
            .map_err(|e| RpcError::internal(format!("encoding the response failed: {e}"))),
    }
}

fn unary_content_type(codec: Codec) -> &'static str {
    match codec {
        Codec::Json => "application/json",
        Codec::Proto => "application/proto",
    }
}

// ---------------------------------------------------------------------------------
// Response side

fn unsupported_media_type(ct: &str, kind: Kind) -> Response<Body> {
    let expected = match kind {
        Kind::Unary => {
            "application/json, application/proto, application/grpc or application/grpc+json"
        }
        Kind::ServerStream | Kind::ClientStream => {
            "application/connect+json, application/connect+proto, application/grpc or application/grpc+json"
        }
    };
    let msg = if ct.is_empty() {
        format!("missing Content-Type: this RPC accepts {expected}\n")
    } else {
        format!("unsupported Content-Type {ct:?}: this RPC accepts {expected}\n")
    };
    let mut resp = Response::new(full_body(msg));
    *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn error_response(protocol: Protocol, codec: Codec, kind: Kind, e: &RpcError) -> Response<Body> {
    match (protocol, kind) {
        (Protocol::Connect, Kind::Unary) => connect_unary_error(e),
        (Protocol::Connect, _) => {
            let end = envelope::encode(FLAG_END_STREAM, &end_of_stream_json(Some(e)));
            let mut resp = Response::new(full_body(end));
            set_stream_headers(resp.headers_mut(), codec);
            resp
        }
        (Protocol::Grpc, _) => {
            // Trailers-only response: the status travels in the headers.
            let mut resp = Response::new(full_body(Bytes::new()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(grpc_content_type(codec)),
            );
            grpc_status_headers(resp.headers_mut(), Some(e));
            resp
        }
    }
}

/// A Connect unary error: the code's HTTP status and `{"code","message"}`.
pub fn connect_unary_error(e: &RpcError) -> Response<Body> {
    let body = serde_json::to_vec(&e.to_connect_json()).unwrap_or_default();
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = e.code.http_status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn end_of_stream_json(e: Option<&RpcError>) -> Vec<u8> {
    let v = match e {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.to_connect_json() }),
    };
    serde_json::to_vec(&v).unwrap_or_else(|_| b"{}".to_vec())
}

fn set_stream_headers(h: &mut HeaderMap, codec: Codec) {
    let ct = match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    // Ask intermediaries not to buffer: every message must reach the client at once.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

fn grpc_content_type(codec: Codec) -> &'static str {
    match codec {
        Codec::Proto => "application/grpc",
        Codec::Json => "application/grpc+json",
    }
}

fn grpc_status_headers(h: &mut HeaderMap, e: Option<&RpcError>) {
    match e {
        None => {
            h.insert("grpc-status", HeaderValue::from_static("0"));
        }
        Some(e) => {
            h.insert("grpc-status", HeaderValue::from(e.code.grpc_code()));
            let encoded =
                percent_encoding::utf8_percent_encode(&e.message, GRPC_MESSAGE_SET).to_string();
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                h.insert("grpc-message", v);
            }
        }
    }
}

/// gRPC percent-encodes every byte outside printable ASCII, and `%` itself.
const GRPC_MESSAGE_SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

fn connect_stream_response<T: RpcMessage>(
    codec: Codec,
    stream: ResponseStream<T>,
    deadline: Option<Instant>,
) -> Response<Body> {
    let frames = EncodedStream::new(stream, deadline, move |item| match item {
        Item::Message(m) => match encode_enveloped(codec, &m) {
            Ok(frame) => Step::Continue(Frame::data(frame)),
            Err(e) => Step::Last(Frame::data(envelope::encode(
                FLAG_END_STREAM,
                &end_of_stream_json(Some(&e)),
            ))),
        },
        Item::End(e) => Step::Last(Frame::data(envelope::encode(
            FLAG_END_STREAM,
            &end_of_stream_json(e.as_ref()),
        ))),
    });
    let mut resp = Response::new(Body::new(http_body_util::StreamBody::new(frames)));
    set_stream_headers(resp.headers_mut(), codec);
    resp
}

fn grpc_response<T: RpcMessage>(
    codec: Codec,
    stream: ResponseStream<T>,
    deadline: Option<Instant>,
) -> Response<Body> {
    let frames = EncodedStream::new(stream, deadline, move |item| match item {
        Item::Message(m) => match encode_enveloped(codec, &m) {
            Ok(frame) => Step::Continue(Frame::data(frame)),
            Err(e) => {
                let mut t = HeaderMap::new();
                grpc_status_headers(&mut t, Some(&e));
                Step::Last(Frame::trailers(t))
            }
        },
        Item::End(e) => {
            let mut t = HeaderMap::new();
            grpc_status_headers(&mut t, e.as_ref());
            Step::Last(Frame::trailers(t))
        }
    });
    let mut resp = Response::new(Body::new(http_body_util::StreamBody::new(frames)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(grpc_content_type(codec)),
    );
    // HTTP/1.1 (hyper) sends only the trailer fields announced here; HTTP/2 sends all.
    resp.headers_mut().insert(
        header::TRAILER,
        HeaderValue::from_static("grpc-status, grpc-message"),
    );
    resp
}

enum Item<T> {
    Message(T),
    /// The stream ended: `None` on success.
    End(Option<RpcError>),
}

enum Step {
    Continue(Frame<Bytes>),
    Last(Frame<Bytes>),
}

/// Turns a handler's message stream into body frames: one frame per message, flushed
/// as produced, then the protocol's end frame (also when the deadline fires first).
/// Dropping it (the client went away) drops the handler's stream at once.
struct EncodedStream<T, F> {
    inner: ResponseStream<T>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    encode: F,
    finished: bool,
}

impl<T, F> EncodedStream<T, F>
where
    F: FnMut(Item<T>) -> Step,
{
    fn new(inner: ResponseStream<T>, deadline: Option<Instant>, encode: F) -> Self {
        EncodedStream {
            inner,
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            encode,
            finished: false,
        }
    }
}

impl<T, F> Stream for EncodedStream<T, F>
where
    F: FnMut(Item<T>) -> Step + Unpin,
{
    type Item = Result<Frame<Bytes>, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        let item = match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(m))) => Item::Message(m),
            Poll::Ready(Some(Err(e))) => Item::End(Some(e)),
            Poll::Ready(None) => Item::End(None),
            Poll::Pending => match this.sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Item::End(Some(RpcError::deadline_exceeded())),
                _ => return Poll::Pending,
            },
        };
        match (this.encode)(item) {
            Step::Continue(f) => Poll::Ready(Some(Ok(f))),
            Step::Last(f) => {
                this.finished = true;
                Poll::Ready(Some(Ok(f)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn enveloped_encoding_is_the_envelope_of_the_encoding() {
        use crate::proto::process as pb;
        let data = |n: usize| pb::StartResponse {
            event: Some(pb::ProcessEvent {
                event: Some(pb::process_event::Event::Data(
                    pb::process_event::DataEvent {
                        output: Some(pb::process_event::data_event::Output::Stdout(Bytes::from(
                            (0..n).map(|i| (i * 7) as u8).collect::<Vec<u8>>(),
                        ))),
                    },
                )),
            }),
        };
        for n in [0, 1, 2, 3, 100, 32 * 1024, 100_000] {
            for codec in [Codec::Proto, Codec::Json] {
                let m = data(n);
                let two_step = envelope::encode(0, &encode(codec, &m).unwrap());
                assert_eq!(encode_enveloped(codec, &m).unwrap(), two_step, "{n} bytes");
            }
        }
    }

    #[test]
    fn connect_timeout_parsing() {
        assert_eq!(
            parse_timeout(Protocol::Connect, &headers(&[])).unwrap(),
            None
        );
        assert_eq!(
            parse_timeout(
                Protocol::Connect,
                &headers(&[("connect-timeout-ms", "1500")])
            )
            .unwrap(),
            Some(Duration::from_millis(1500))
        );
        for bad in ["", "-1", "1.5", "12345678901", "abc"] {
            let h = {
                let mut h = HeaderMap::new();
                h.insert("connect-timeout-ms", HeaderValue::from_str(bad).unwrap());
                h
            };
            let e = parse_timeout(Protocol::Connect, &h).unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeout_parsing() {
        assert_eq!(
            parse_timeout(Protocol::Grpc, &headers(&[("grpc-timeout", "250m")])).unwrap(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_timeout(Protocol::Grpc, &headers(&[("grpc-timeout", "2S")])).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert!(parse_timeout(Protocol::Grpc, &headers(&[("grpc-timeout", "2x")])).is_err());
    }

    #[test]
    fn keepalive_interval_defaults_to_90s() {
        let ctx = |h: HeaderMap| CallContext {
            protocol: Protocol::Connect,
            codec: Codec::Json,
            headers: h,
            timeout: None,
            deadline: None,
            extensions: Default::default(),
        };
        assert_eq!(
            ctx(headers(&[])).keepalive_interval(),
            Duration::from_secs(90)
        );
        assert_eq!(
            ctx(headers(&[("keepalive-ping-interval", "50")])).keepalive_interval(),
            Duration::from_secs(50)
        );
        assert_eq!(
            ctx(headers(&[("keepalive-ping-interval", "0")])).keepalive_interval(),
            Duration::from_secs(90)
        );
    }

    /// Fuzz regression (fuzz/regressions/rpc_call): over HTTP/1.1 hyper drops trailer
    /// fields the response did not announce, so gRPC streams ended without grpc-status.
    #[test]
    fn grpc_streams_announce_their_trailers() {
        let resp = grpc_response::<crate::proto::process::ListRequest>(
            Codec::Json,
            futures_util::stream::empty().boxed(),
            None,
        );
        assert_eq!(resp.headers()[header::TRAILER], "grpc-status, grpc-message");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        let mut h = HeaderMap::new();
        grpc_status_headers(&mut h, Some(&RpcError::not_found("100% gone\névé")));
        assert_eq!(h["grpc-status"], "5");
        assert_eq!(h["grpc-message"], "100%25 gone%0A%C3%A9v%C3%A9");
    }
}
