//! The upload body path of `POST /files`: hyper's body (Content-Length, well-formed
//! chunked framing, or raw fuzzer-made chunked framing such as `ffffffffffffffffffff`,
//! `2x` or bare LF lines), `api::files::body::BodySource` with and without streaming
//! gzip decoding, then optionally the multipart parser. Decoded bytes must equal a
//! one-shot decode of the same body (flate2 `MultiGzDecoder`), and the multipart parts
//! the ones parsed from those bytes in one chunk.

use std::io::Read as _;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use std::sync::{Arc, Mutex};

use http::Response;

use guestd::api::files::body::{BodyError, BodySource, ChunkSource};
use guestd::transport::full_body;

use crate::http::{chunk_body, exchange};
use crate::multipart::{Chunks, parse_all};

#[derive(Arbitrary, Debug)]
enum Framing {
    ContentLength,
    Chunked(Vec<u8>),
    /// The fuzzer writes the chunked framing itself.
    RawChunked,
}

#[derive(Arbitrary, Debug)]
struct Input {
    framing: Framing,
    gzip: bool,
    /// Compress `body` first (else it is sent as is, gzip flag or not).
    compress: bool,
    multipart: bool,
    body: Vec<u8>,
}

const BOUNDARY: &str = "fuzzb";

fn gunzip_all(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .read_to_end(&mut out)
        .map(|_| out)
        .map_err(|e| e.to_string())
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let body = if input.compress {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &input.body).expect("gzip");
        e.finish().expect("gzip")
    } else {
        input.body.clone()
    };
    let mut req = b"POST /files HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n".to_vec();
    match &input.framing {
        Framing::ContentLength => {
            req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            req.extend_from_slice(&body);
        }
        Framing::Chunked(splits) => {
            req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            chunk_body(&mut req, &body, splits);
        }
        Framing::RawChunked => {
            req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            req.extend_from_slice(&body);
        }
    }
    let (gzip, multipart) = (input.gzip, input.multipart);
    let seen: Arc<Mutex<Option<Outcome>>> = Arc::default();
    let slot = seen.clone();
    let resp = exchange(req, move |r| {
        let slot = slot.clone();
        async move {
            let mut src = BodySource::new(r.into_body(), Duration::from_secs(5));
            if gzip {
                src.gunzip();
            }
            let mut decoded = Vec::new();
            let (parts, body_error) = if multipart {
                let mut tee = Tee {
                    src: &mut src,
                    seen: &mut decoded,
                    error: None,
                };
                let parsed = parse_all(BOUNDARY, &mut tee).await;
                let err = tee.error.take();
                (Some(parsed), err)
            } else {
                let err = loop {
                    match src.next().await {
                        Ok(Some(c)) => {
                            assert!(!c.is_empty(), "BodySource handed out an empty chunk");
                            decoded.extend_from_slice(&c);
                        }
                        Ok(None) => break None,
                        Err(e) => break Some(e.to_string()),
                    }
                };
                (None, err)
            };
            *slot.lock().expect("lock") = Some(Outcome {
                decoded,
                parts,
                body_error,
            });
            Response::new(full_body("done"))
        }
    });
    let Some(resp) = resp else { return };
    let Some(out) = seen.lock().expect("lock").take() else {
        // hyper refused the framing before calling the handler.
        assert_ne!(resp.status, 200);
        return;
    };
    let raw = matches!(input.framing, Framing::RawChunked);
    if let Some(e) = &out.body_error {
        assert!(!e.is_empty());
        // Only a body the one-shot decoder refuses may fail, unless hyper's framing
        // failed (raw chunked framing).
        if !raw {
            assert!(
                gzip && gunzip_all(&body).is_err(),
                "reading a well-framed body failed ({e}) where one-shot decoding succeeds"
            );
        }
    }
    if !raw {
        let expected = if gzip {
            gunzip_all(&body)
        } else {
            Ok(body.clone())
        };
        match (&out.body_error, expected) {
            (None, Ok(exp)) if !multipart => assert_eq!(out.decoded, exp, "decoded body differs"),
            (_, Ok(exp)) => assert!(
                exp.starts_with(&out.decoded),
                "decoded bytes are not a prefix"
            ),
            (None, Err(e)) if !multipart => {
                panic!("streaming gunzip accepted a body one-shot decoding refuses: {e}")
            }
            _ => {}
        }
    }
    if let (Some(parts), None) = (out.parts, &out.body_error) {
        // Over the decoded bytes in one chunk, the parser must agree (it may have
        // stopped reading early: parse the bytes it saw).
        let one = crate::http::block_on(parse_all(
            BOUNDARY,
            &mut Chunks(std::iter::once(Bytes::from(out.decoded.clone())).collect()),
        ));
        if parts.1.is_ok() {
            assert_eq!(parts, one, "multipart over the body stream differs");
        }
    }
}

struct Outcome {
    decoded: Vec<u8>,
    parts: Option<crate::multipart::Parsed>,
    body_error: Option<String>,
}

/// Records the decoded stream (and a body error) while the parser consumes it.
struct Tee<'a> {
    src: &'a mut BodySource,
    seen: &'a mut Vec<u8>,
    error: Option<String>,
}

impl ChunkSource for Tee<'_> {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        match self.src.next().await {
            Ok(c) => {
                if let Some(c) = &c {
                    assert!(!c.is_empty(), "BodySource handed out an empty chunk");
                    self.seen.extend_from_slice(c);
                }
                Ok(c)
            }
            Err(e) => {
                self.error = Some(e.to_string());
                Err(e)
            }
        }
    }
}
