//! A streaming `multipart/form-data` parser (RFC 7578 / RFC 2046 §5.1): parts are read
//! in order while the body arrives; a part's data is handed out chunk by chunk as
//! zero-copy slices of the input, so memory stays at one input chunk plus a
//! delimiter's length however large the parts are.
//!
//! Only what uploads need is parsed: each part's `Content-Disposition` `name` and
//! `filename` (quoted strings with backslash escapes, or RFC 2231/5987
//! `filename*=charset''percent-encoded`, which wins). Other part headers are skipped.

use bytes::{Bytes, BytesMut};

use super::body::{BodyError, ChunkSource};

/// Longest accepted header block of one part.
const MAX_HEADER_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    #[error("malformed multipart body: {0}")]
    Malformed(String),
    #[error(transparent)]
    Body(#[from] BodyError),
}

fn malformed(what: impl Into<String>) -> MultipartError {
    MultipartError::Malformed(what.into())
}

/// The boundary of a `multipart/*` content type, validated (1–70 characters, RFC 2046).
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let (_, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    for (k, v) in parse_params(params) {
        if k.eq_ignore_ascii_case("boundary") {
            if v.is_empty() || v.len() > 70 {
                return Err(malformed(format!(
                    "the boundary must have 1 to 70 characters, got {}",
                    v.len()
                )));
            }
            return Ok(v);
        }
    }
    Err(malformed("the Content-Type has no boundary parameter"))
}

/// The headers of a part that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHeaders {
    /// The form field name.
    pub name: Option<String>,
    /// The file name, verbatim (directories included).
    pub filename: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Right after a delimiter line's boundary.
    AfterDelimiter,
    /// In the data of a part.
    Data,
    /// After the close delimiter.
    Done,
}

/// The parser. Drive it with [`next_part`](Self::next_part), then
/// [`next_chunk`](Self::next_chunk) until `None`, for each part.
pub struct Multipart {
    /// `\r\n--<boundary>`
    delimiter: Vec<u8>,
    finder: memchr::memmem::Finder<'static>,
    buf: BytesMut,
    state: State,
    eof: bool,
    parts: usize,
}

impl Multipart {
    pub fn new(boundary: &str) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        let finder = memchr::memmem::Finder::new(&delimiter).into_owned();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // A virtual CRLF before the body: the first delimiter may start the body.
        buf.extend_from_slice(b"\r\n");
        Multipart {
            delimiter,
            finder,
            buf,
            state: State::Preamble,
            eof: false,
            parts: 0,
        }
    }

    /// Parts started so far.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Reads more input into the buffer; false at the end of the body.
    async fn fill(&mut self, src: &mut impl ChunkSource) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        match src.next_chunk().await? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk);
                Ok(true)
            }
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// Skips to the next part and returns its headers; `None` after the last part.
    /// Data of the current part not read yet is skipped.
    pub async fn next_part(
        &mut self,
        src: &mut impl ChunkSource,
    ) -> Result<Option<PartHeaders>, MultipartError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Data => while self.next_chunk(src).await?.is_some() {},
                State::Preamble => {
                    if let Some(i) = self.finder.find(&self.buf) {
                        let _ = self.buf.split_to(i + self.delimiter.len());
                        self.state = State::AfterDelimiter;
                    } else {
                        // Keep a tail that may be the start of the delimiter.
                        let keep = self.delimiter.len() - 1;
                        if self.buf.len() > keep {
                            let _ = self.buf.split_to(self.buf.len() - keep);
                        }
                        if !self.fill(src).await? {
                            return Err(malformed(
                                "no boundary delimiter found (is the boundary in the \
                                 Content-Type the one used in the body?)",
                            ));
                        }
                    }
                }
                State::AfterDelimiter => return self.after_delimiter(src).await,
            }
        }
    }

    async fn after_delimiter(
        &mut self,
        src: &mut impl ChunkSource,
    ) -> Result<Option<PartHeaders>, MultipartError> {
        // `--` closes the body; otherwise optional whitespace, then CRLF.
        loop {
            if self.buf.len() >= 2 {
                if &self.buf[..2] == b"--" {
                    self.state = State::Done;
                    return Ok(None);
                }
                let ws = self
                    .buf
                    .iter()
                    .take_while(|&&b| b == b' ' || b == b'\t')
                    .count();
                if self.buf.len() >= ws + 2 {
                    if &self.buf[ws..ws + 2] != b"\r\n" {
                        return Err(malformed(format!(
                            "the boundary delimiter of part #{} is not followed by CRLF",
                            self.parts + 1
                        )));
                    }
                    // Keep the CRLF: the header block is searched as "\r\n...\r\n\r\n".
                    let _ = self.buf.split_to(ws);
                    break;
                }
            }
            if !self.fill(src).await? {
                return Err(malformed("the body ends right after a boundary delimiter"));
            }
        }
        let headers = loop {
            if let Some(i) = memchr::memmem::find(&self.buf, b"\r\n\r\n") {
                let block = self.buf.split_to(i + 4);
                break parse_headers(&block[2..i + 2]);
            }
            if self.buf.len() > MAX_HEADER_BYTES {
                return Err(malformed(format!(
                    "the headers of part #{} exceed {MAX_HEADER_BYTES} bytes",
                    self.parts + 1
                )));
            }
            if !self.fill(src).await? {
                return Err(malformed(format!(
                    "the body ends inside the headers of part #{}",
                    self.parts + 1
                )));
            }
        };
        self.parts += 1;
        self.state = State::Data;
        // The data starts right away: the buffer begins with it.
        Ok(Some(headers))
    }

    /// The next chunk of the current part's data; `None` at its end.
    pub async fn next_chunk(
        &mut self,
        src: &mut impl ChunkSource,
    ) -> Result<Option<Bytes>, MultipartError> {
        if self.state != State::Data {
            return Ok(None);
        }
        loop {
            if let Some(i) = self.finder.find(&self.buf) {
                if i > 0 {
                    return Ok(Some(self.buf.split_to(i).freeze()));
                }
                let _ = self.buf.split_to(self.delimiter.len());
                self.state = State::AfterDelimiter;
                return Ok(None);
            }
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep {
                let n = self.buf.len() - keep;
                return Ok(Some(self.buf.split_to(n).freeze()));
            }
            if !self.fill(src).await? {
                return Err(malformed(format!(
                    "the body ends inside part #{} (no closing boundary delimiter)",
                    self.parts
                )));
            }
        }
    }
}

/// Parses a part's header lines (those other than `Content-Disposition` are ignored).
fn parse_headers(block: &[u8]) -> PartHeaders {
    let mut out = PartHeaders::default();
    let text = String::from_utf8_lossy(block);
    for line in text.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        let (_, params) = value.split_once(';').unwrap_or((value, ""));
        let mut ext_filename = None;
        for (k, v) in parse_params(params) {
            match k.to_ascii_lowercase().as_str() {
                "name" if out.name.is_none() => out.name = Some(v),
                "filename" if out.filename.is_none() => out.filename = Some(v),
                "filename*" => ext_filename = decode_ext_value(&v),
                _ => {}
            }
        }
        if ext_filename.is_some() {
            out.filename = ext_filename;
        }
    }
    out
}

/// `; key=value; key="quoted \"value\""` → pairs (keys as written).
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ';' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ';' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() && chars.peek().is_none() {
            return out;
        }
        let key = key.trim().to_string();
        if chars.peek() != Some(&'=') {
            if chars.peek().is_none() {
                return out;
            }
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ';' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        if !key.is_empty() {
            out.push((key, value));
        }
    }
}

/// RFC 5987 `charset'lang'percent-encoded` → text (UTF-8 and Latin-1 charsets).
fn decode_ext_value(v: &str) -> Option<String> {
    let mut it = v.splitn(3, '\'');
    let charset = it.next()?.to_ascii_lowercase();
    let _lang = it.next()?;
    let encoded = it.next()?;
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
    match charset.as_str() {
        "utf-8" | "utf8" => String::from_utf8(bytes).ok(),
        "iso-8859-1" | "latin1" | "us-ascii" => {
            Some(bytes.iter().map(|&b| char::from(b)).collect())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc123").expect("b"),
            "abc123"
        );
        assert_eq!(
            boundary("multipart/form-data; charset=utf-8; Boundary=\"a b\"").expect("b"),
            "a b"
        );
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))).is_err());
    }

    #[test]
    fn header_parsing() {
        let h = parse_headers(
            b"Content-Disposition: form-data; name=\"file\"; filename=\"dir/a \\\"b\\\".txt\"\r\n\
              Content-Type: text/plain",
        );
        assert_eq!(h.name.as_deref(), Some("file"));
        assert_eq!(h.filename.as_deref(), Some("dir/a \"b\".txt"));
        let h = parse_headers(
            b"content-disposition: form-data; name=file; filename=plain.txt; \
              filename*=UTF-8''na%C3%AFve.txt",
        );
        assert_eq!(h.name.as_deref(), Some("file"));
        assert_eq!(h.filename.as_deref(), Some("naïve.txt"));
        let h = parse_headers(
            "Content-Disposition: form-data; name=\"file\"; filename=\"日本.txt\"".as_bytes(),
        );
        assert_eq!(h.filename.as_deref(), Some("日本.txt"));
        let h = parse_headers(b"Content-Disposition: form-data; name=\"other\"");
        assert_eq!(h.filename, None);
    }

    /// Chunks handed out as given.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl ChunkSource for Chunks {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
            Ok(self.0.pop_front())
        }
    }

    fn body() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"preamble\r\n--XyZ\r\n");
        b.extend_from_slice(
            b"Content-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n",
        );
        b.extend_from_slice(b"Content-Type: text/plain\r\n\r\n");
        b.extend_from_slice(b"line1\r\n--XyNOT a delimiter\r\n");
        b.extend_from_slice(b"\r\n--XyZ  \r\n");
        b.extend_from_slice(b"Content-Disposition: form-data; name=\"note\"\r\n\r\nskip me");
        b.extend_from_slice(b"\r\n--XyZ\r\n\r\n");
        b.extend_from_slice(b"\r\n--XyZ\r\n");
        b.extend_from_slice(
            b"Content-Disposition: form-data; name=\"file\"; filename=\"d/b.bin\"\r\n\r\n",
        );
        b.extend_from_slice(&[0u8, 13, 10, 45, 45, 255]);
        b.extend_from_slice(b"\r\n--XyZ--\r\nepilogue");
        b
    }

    async fn parse_all(data: &[u8], chunk: usize) -> Vec<(PartHeaders, Vec<u8>)> {
        let chunks = data.chunks(chunk).map(Bytes::copy_from_slice).collect();
        let mut src = Chunks(chunks);
        let mut m = Multipart::new("XyZ");
        let mut out = Vec::new();
        while let Some(h) = m.next_part(&mut src).await.expect("part") {
            let mut data = Vec::new();
            while let Some(c) = m.next_chunk(&mut src).await.expect("chunk") {
                assert!(!c.is_empty());
                data.extend_from_slice(&c);
            }
            out.push((h, data));
        }
        out
    }

    #[tokio::test]
    async fn parts_in_any_chunking() {
        let data = body();
        for chunk in [1, 2, 3, 5, 7, 16, 64, 1 << 20] {
            let parts = parse_all(&data, chunk).await;
            assert_eq!(parts.len(), 4, "chunk {chunk}");
            assert_eq!(parts[0].0.filename.as_deref(), Some("a.txt"));
            assert_eq!(parts[0].1, b"line1\r\n--XyNOT a delimiter\r\n");
            assert_eq!(parts[1].0.name.as_deref(), Some("note"));
            assert_eq!(parts[1].1, b"skip me");
            assert_eq!(parts[2].0, PartHeaders::default(), "no headers");
            assert!(parts[2].1.is_empty());
            assert_eq!(parts[3].0.filename.as_deref(), Some("d/b.bin"));
            assert_eq!(parts[3].1, [0u8, 13, 10, 45, 45, 255]);
        }
    }

    #[tokio::test]
    async fn body_starting_with_the_delimiter_and_errors() {
        let ok = b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\nhi\r\n--b--";
        let mut src = Chunks([Bytes::from_static(ok)].into_iter().collect());
        let mut m = Multipart::new("b");
        let h = m.next_part(&mut src).await.expect("ok").expect("part");
        assert_eq!(h.filename.as_deref(), Some("x"));
        assert_eq!(
            m.next_chunk(&mut src).await.expect("data").as_deref(),
            Some(&b"hi"[..])
        );
        assert!(m.next_chunk(&mut src).await.expect("end").is_none());
        assert!(m.next_part(&mut src).await.expect("done").is_none());

        for bad in [
            &b"no delimiter at all"[..],
            b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\ntruncated",
            b"--b\r\nContent-Disposition: form-data; name=file",
            b"--bX\r\n",
        ] {
            let mut src = Chunks([Bytes::copy_from_slice(bad)].into_iter().collect());
            let mut m = Multipart::new("b");
            let r = async {
                while m.next_part(&mut src).await?.is_some() {
                    while m.next_chunk(&mut src).await?.is_some() {}
                }
                Ok::<(), MultipartError>(())
            }
            .await;
            let e = r.expect_err("malformed");
            assert!(
                e.to_string().starts_with("malformed multipart body: "),
                "{e}"
            );
        }
    }
}
