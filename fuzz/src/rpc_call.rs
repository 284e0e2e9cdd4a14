//! A whole Connect or gRPC call through `transport::rpc::{unary, server_stream,
//! client_stream}` over HTTP/1.1, with echoing handlers: content type, timeout and
//! compression headers, envelopes (gzip-flagged or not), and the response side. The
//! response must be well-formed for its protocol: a Connect unary error is JSON with
//! a code and the matching status; a stream ends with exactly one end-of-stream
//! envelope (Connect) or carries `grpc-status` (gRPC); messages decode.

use std::io::Write as _;

use arbitrary::{Arbitrary, Unstructured};
use futures_util::StreamExt as _;

use guestd::proto::filesystem as fs;
use guestd::proto::process as pr;
use guestd::transport::rpc::{self, Codec, Limits, RpcMessage};

use crate::http::{chunk_body, exchange, header_safe};

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
}

#[derive(Arbitrary, Debug)]
enum ContentType {
    Json,
    Proto,
    ConnectJson,
    ConnectProto,
    Grpc,
    GrpcProto,
    GrpcJson,
    Missing,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Encoding {
    Gzip,
    Identity,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Envelope {
    flags: u8,
    /// Compress the payload (and set flag 0x01).
    gzip: bool,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum BodyShape {
    Raw(Vec<u8>),
    Envelopes(Vec<Envelope>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: Kind,
    content_type: ContentType,
    connect_timeout: Option<Vec<u8>>,
    grpc_timeout: Option<Vec<u8>>,
    /// Sent as the encoding header that matches the protocol and call kind.
    encoding: Option<Encoding>,
    /// Gzip the whole body (Connect unary compression).
    gzip_whole_body: bool,
    max_message_bytes: u16,
    chunked: Option<Vec<u8>>,
    body: BodyShape,
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

/// Envelopes of a response body: (flags, payload); panics on broken framing.
fn envelopes(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "truncated envelope header in a response");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert!(body.len() >= 5 + len, "truncated envelope in a response");
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    out
}

fn assert_connect_error_json(raw: &[u8]) {
    let v: serde_json::Value = serde_json::from_slice(raw).unwrap_or_else(|e| {
        panic!(
            "error body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(raw)
        )
    });
    let code = v.get("code").and_then(|c| c.as_str()).unwrap_or("");
    assert!(!code.is_empty(), "error JSON without a code: {v}");
    let msg = v.get("message").and_then(|c| c.as_str()).unwrap_or("");
    assert!(!msg.is_empty(), "error JSON without a message: {v}");
}

fn check_messages<T: RpcMessage>(codec: Codec, envs: &[(u8, Vec<u8>)]) {
    for (flags, payload) in envs {
        assert_eq!(*flags, 0, "response message with flags");
        rpc::decode::<T>(codec, payload).expect("response message decodes");
    }
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let kind = input.kind;
    let ct: Option<Vec<u8>> = match &input.content_type {
        ContentType::Json => Some(b"application/json".to_vec()),
        ContentType::Proto => Some(b"application/proto".to_vec()),
        ContentType::ConnectJson => Some(b"application/connect+json".to_vec()),
        ContentType::ConnectProto => Some(b"application/connect+proto".to_vec()),
        ContentType::Grpc => Some(b"application/grpc".to_vec()),
        ContentType::GrpcProto => Some(b"application/grpc+proto".to_vec()),
        ContentType::GrpcJson => Some(b"application/grpc+json".to_vec()),
        ContentType::Missing => None,
        ContentType::Raw(r) => Some(header_safe(r)),
    };
    let media = ct
        .as_deref()
        .and_then(|c| std::str::from_utf8(c).ok())
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let grpc = media.starts_with("application/grpc");
    let json = media.ends_with("json");
    let codec = if json { Codec::Json } else { Codec::Proto };

    let mut body = match &input.body {
        BodyShape::Raw(r) => r.clone(),
        BodyShape::Envelopes(list) => {
            let mut out = Vec::new();
            for e in list {
                let (flags, payload) = if e.gzip {
                    (e.flags | 1, gzip(&e.payload))
                } else {
                    (e.flags, e.payload.clone())
                };
                out.push(flags);
                out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                out.extend_from_slice(&payload);
            }
            out
        }
    };
    if input.gzip_whole_body {
        body = gzip(&body);
    }

    let path = match kind {
        Kind::Unary => "/process.Process/Start",
        Kind::ServerStream => "/filesystem.Filesystem/WatchDir",
        Kind::ClientStream => "/process.Process/StreamInput",
    };
    let mut req =
        format!("POST {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n").into_bytes();
    let mut header = |name: &str, value: &[u8]| {
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(&header_safe(value));
        req.extend_from_slice(b"\r\n");
    };
    if let Some(ct) = &ct {
        header("Content-Type", ct);
    }
    if let Some(t) = &input.connect_timeout {
        header("Connect-Timeout-Ms", t);
    }
    if let Some(t) = &input.grpc_timeout {
        header("Grpc-Timeout", t);
    }
    if let Some(enc) = &input.encoding {
        let name = match (grpc, kind) {
            (true, _) => "Grpc-Encoding",
            (false, Kind::Unary) => "Content-Encoding",
            (false, _) => "Connect-Content-Encoding",
        };
        let value: &[u8] = match enc {
            Encoding::Gzip => b"gzip",
            Encoding::Identity => b"identity",
            Encoding::Raw(r) => r,
        };
        header(name, value);
    }
    if grpc {
        header("TE", b"trailers");
    }
    match &input.chunked {
        Some(splits) => {
            header("Transfer-Encoding", b"chunked");
            req.extend_from_slice(b"\r\n");
            chunk_body(&mut req, &body, splits);
        }
        None => {
            header("Content-Length", body.len().to_string().as_bytes());
            req.extend_from_slice(b"\r\n");
            req.extend_from_slice(&body);
        }
    }

    let limits = Limits {
        max_message_bytes: usize::from(input.max_message_bytes),
    };
    let resp = exchange(req, move |r| async move {
        match kind {
            Kind::Unary => {
                rpc::unary(r, limits, |_ctx, m: pr::StartRequest| async move { Ok(m) }).await
            }
            Kind::ServerStream => {
                rpc::server_stream(r, limits, |_ctx, m: fs::WatchDirRequest| async move {
                    let s: rpc::ResponseStream<fs::WatchDirRequest> =
                        futures_util::stream::iter([Ok(m.clone()), Ok(m)]).boxed();
                    Ok(s)
                })
                .await
            }
            Kind::ClientStream => {
                rpc::client_stream(
                    r,
                    limits,
                    |_ctx, mut s: rpc::RequestStream<pr::StreamInputRequest>| async move {
                        let mut last = pr::StreamInputRequest::default();
                        while let Some(m) = s.message().await? {
                            last = m;
                        }
                        Ok(last)
                    },
                )
                .await
            }
        }
    })
    .expect("a well-formed HTTP request gets a response");

    let status = resp.status;
    let resp_ct = resp
        .header("content-type")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    if status == 415 {
        assert!(!resp.body.is_empty(), "415 without a body");
        return;
    }
    if status == 400 && resp_ct.is_empty() && resp.body.is_empty() {
        // hyper refused the request line or a header (not ours to answer).
        return;
    }
    let connect_unary = !grpc && kind == Kind::Unary;
    if connect_unary {
        if status == 200 {
            rpc::decode::<pr::StartRequest>(codec, &resp.body).expect("unary response decodes");
        } else {
            assert_eq!(
                resp_ct, "application/json",
                "Connect unary error content type"
            );
            assert_connect_error_json(&resp.body);
        }
        return;
    }
    assert_eq!(status, 200, "streams and gRPC answer 200: {resp:?}");
    if grpc {
        let envs = envelopes(&resp.body);
        let grpc_status = resp
            .header("grpc-status")
            .or_else(|| resp.trailer("grpc-status"))
            .unwrap_or_else(|| panic!("gRPC response without grpc-status: {resp:?}"));
        if grpc_status == b"0" {
            match kind {
                Kind::ServerStream => check_messages::<fs::WatchDirRequest>(codec, &envs),
                _ => check_messages::<pr::StreamInputRequest>(codec, &envs),
            }
        } else {
            let msg = resp
                .header("grpc-message")
                .or_else(|| resp.trailer("grpc-message"))
                .unwrap_or_default();
            assert!(!msg.is_empty(), "gRPC error without grpc-message");
        }
        return;
    }
    let envs = envelopes(&resp.body);
    let (last, messages) = envs
        .split_last()
        .expect("Connect stream without an end message");
    assert_eq!(
        last.0 & 2,
        2,
        "the last Connect envelope is not end-of-stream"
    );
    let end: serde_json::Value =
        serde_json::from_slice(&last.1).expect("end-of-stream message is JSON");
    if let Some(err) = end.get("error") {
        assert_connect_error_json(err.to_string().as_bytes());
    }
    match kind {
        Kind::ServerStream => check_messages::<fs::WatchDirRequest>(codec, messages),
        _ => check_messages::<pr::StreamInputRequest>(codec, messages),
    }
}
