//! `api::files::multipart`: the boundary from a `Content-Type`, then the streaming
//! parser over the body in fuzzer-chosen chunks. The parts (headers and data) and the
//! outcome must be the same as with the whole body in one chunk, and data chunks are
//! never empty.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;

use guestd::api::files::body::{BodyError, ChunkSource};
use guestd::api::files::multipart::{Multipart, PartHeaders, boundary};

#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Used as the `Content-Type`'s boundary when the raw content type has none.
    pub boundary: String,
    pub content_type: Option<String>,
    pub splits: Vec<u8>,
    pub body: Vec<u8>,
}

/// Chunks handed out as given.
pub struct Chunks(pub std::collections::VecDeque<Bytes>);

impl ChunkSource for Chunks {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        Ok(self.0.pop_front())
    }
}

pub type Parsed = (Vec<(PartHeaders, Vec<u8>)>, Result<(), String>);

/// Every part of `src` (data concatenated), and how parsing ended.
pub async fn parse_all(boundary: &str, src: &mut impl ChunkSource) -> Parsed {
    let mut m = Multipart::new(boundary);
    let mut parts = Vec::new();
    let end = async {
        while let Some(h) = m.next_part(src).await? {
            parts.push((h, Vec::new()));
            while let Some(c) = m.next_chunk(src).await? {
                assert!(!c.is_empty(), "empty data chunk");
                if let Some(last) = parts.last_mut() {
                    last.1.extend_from_slice(&c);
                }
            }
        }
        Ok::<(), guestd::api::files::multipart::MultipartError>(())
    }
    .await
    .map_err(|e| e.to_string());
    assert_eq!(
        m.parts(),
        parts.len(),
        "parts() disagrees with the parts read"
    );
    (parts, end)
}

pub fn split(body: &[u8], splits: &[u8]) -> std::collections::VecDeque<Bytes> {
    let mut out = std::collections::VecDeque::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = splits
            .get(i)
            .map_or(rest.len(), |&s| usize::from(s).max(1))
            .min(rest.len());
        i += 1;
        out.push_back(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    out
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let ct = input
        .content_type
        .clone()
        .unwrap_or_else(|| format!("multipart/form-data; boundary=\"{}\"", input.boundary));
    let b = match boundary(&ct) {
        Ok(b) => b,
        Err(e) => {
            assert!(e.to_string().starts_with("malformed multipart body: "));
            return;
        }
    };
    assert!(
        !b.is_empty() && b.len() <= 70,
        "boundary of {} bytes accepted",
        b.len()
    );
    let one = crate::http::block_on(parse_all(
        &b,
        &mut Chunks(std::iter::once(Bytes::from(input.body.clone())).collect()),
    ));
    let many = crate::http::block_on(parse_all(
        &b,
        &mut Chunks(split(&input.body, &input.splits)),
    ));
    assert_eq!(one, many, "the parse depends on how the body is chunked");
    if let Err(e) = &one.1 {
        assert!(e.starts_with("malformed multipart body: "), "{e}");
    }
}
