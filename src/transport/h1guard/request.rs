//! The read side: follows the request stream of an HTTP/1 connection the way hyper
//! frames it (httparse with hyper's defaults, then Content-Length / chunked), so that
//! when hyper rejects a head the bytes of exactly that head are at hand to say what is
//! wrong with it.
//!
//! It never changes a byte and never decides anything for hyper: when it cannot follow
//! (an upgrade, a head over [`MAX_HEAD`], a body whose framing it does not understand)
//! it stops ([`RequestTracker::is_following`] turns false) and the error message falls
//! back to a generic one.

/// hyper's default limit on header fields; more is `431`.
pub const MAX_HEADERS: usize = 100;
/// Heads longer than this are not kept (hyper answers 431 past ~400 KiB anyway).
pub const MAX_HEAD: usize = 64 * 1024;

/// Of a head over [`MAX_HEAD`], this much is kept (the request target is in it).
const CUT_HEAD_KEEP: usize = 4096;

/// The HTTP/2 connection preface (h2c with prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Start of the connection: the first bytes may be the h2 preface.
    Start,
    /// Reading a head (possibly partial, kept in `buf`).
    Head,
    /// A body of a known length: bytes left.
    Body(u64),
    Chunked(Chunk),
    /// The head in `buf` is one hyper rejects.
    Bad,
    /// The stream can no longer be followed.
    Lost,
    /// HTTP/2: nothing to follow.
    H2,
}

/// Where a chunked body is (hyper's decoder states, leniently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size(u64),
    SizeLws(u64),
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk's CRLF: an empty line ends the body, else a trailer line.
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

/// The request framing of one connection.
#[derive(Debug)]
pub struct RequestTracker {
    state: State,
    /// The head being read (partial), or the rejected head (`Bad`).
    buf: Vec<u8>,
    /// Heads parsed successfully so far (hyper dispatched, or will dispatch, each).
    good_heads: u64,
    /// The start of a head too long to keep (for its request target).
    cut_head: Vec<u8>,
}

impl Default for RequestTracker {
    fn default() -> Self {
        RequestTracker {
            state: State::Start,
            buf: Vec::new(),
            good_heads: 0,
            cut_head: Vec::new(),
        }
    }
}

/// What a complete, valid head says about the body that follows.
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// CONNECT or `Upgrade`: the bytes after the head may not be HTTP/1 any more.
    Unfollowable,
}

impl RequestTracker {
    /// Follows bytes hyper is about to read.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match self.state {
                State::Start => self.start(data),
                State::Head => self.head(data),
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                    &data[n..]
                }
                State::Chunked(c) => self.chunked(c, data),
                State::Bad | State::Lost | State::H2 => return,
            };
        }
    }

    /// True once the connection turned out to be HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.state == State::H2
    }

    /// False once the stream could not be followed any more.
    pub fn is_following(&self) -> bool {
        !matches!(self.state, State::Lost | State::H2)
    }

    /// The bytes of the head hyper is reading or rejected, when that is where the
    /// stream is (a partial head counts: hyper rejects an invalid byte before the end).
    pub fn current_head(&self) -> Option<&[u8]> {
        match self.state {
            State::Head | State::Bad | State::Start if !self.buf.is_empty() => Some(&self.buf),
            _ => None,
        }
    }

    /// The first bytes of a head that was too long to keep, when that is where the
    /// stream stopped being followed.
    pub fn cut_head(&self) -> Option<&[u8]> {
        (self.state == State::Lost && !self.cut_head.is_empty()).then_some(&self.cut_head[..])
    }

    /// True when a complete head was read that hyper rejects.
    pub fn saw_bad_head(&self) -> bool {
        self.state == State::Bad
    }

    /// Heads parsed successfully so far.
    pub fn good_heads(&self) -> u64 {
        self.good_heads
    }

    fn start<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        // hyper-util reads up to the preface's length to choose the protocol.
        let have = self.buf.len();
        let take = (H2_PREFACE.len() - have).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if !H2_PREFACE.starts_with(&self.buf) {
            // HTTP/1: what was kept is the start of the first head.
            self.state = State::Head;
            let kept = std::mem::take(&mut self.buf);
            self.feed(&kept);
            return &data[take..];
        }
        if self.buf.len() == H2_PREFACE.len() {
            self.buf = Vec::new();
            self.state = State::H2;
            return &[];
        }
        &data[take..]
    }

    /// Appends to the partial head and parses it once it may be complete; returns the
    /// bytes after the head (or nothing).
    fn head<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.buf.is_empty() && find_head_end(data, 0).is_some() {
            // Fast path: a whole head in one read, parsed in place.
            match parse(data) {
                Parsed::Complete(len, framing) => {
                    self.after_head(framing);
                    return &data[len..];
                }
                Parsed::Partial => {}
                Parsed::Bad => {
                    self.buf
                        .extend_from_slice(&data[..data.len().min(MAX_HEAD)]);
                    self.state = State::Bad;
                    return &[];
                }
            }
        }
        let before = self.buf.len();
        let take = data.len().min(MAX_HEAD.saturating_sub(before));
        self.buf.extend_from_slice(&data[..take]);
        if find_head_end(&self.buf, before.saturating_sub(3)).is_none() {
            if take < data.len() || self.buf.len() >= MAX_HEAD {
                // Too long to keep: hyper will answer 414 or 431 (or accept it; either
                // way this connection is no longer followed). The start is kept for the
                // request target.
                self.buf.truncate(CUT_HEAD_KEEP);
                self.cut_head = std::mem::take(&mut self.buf);
                self.state = State::Lost;
                return &[];
            }
            return &[];
        }
        // The whole buffer: a terminator among leading empty lines must not hide
        // the real one.
        match parse(&self.buf) {
            Parsed::Complete(len, framing) => {
                let buf = std::mem::take(&mut self.buf);
                self.after_head(framing);
                if len >= before {
                    &data[len - before..]
                } else {
                    // Cannot happen (the head would have completed earlier), but the
                    // leftover bytes must still be followed.
                    self.feed(&buf[len..]);
                    &[]
                }
            }
            Parsed::Partial if take < data.len() => {
                self.buf.truncate(CUT_HEAD_KEEP);
                self.cut_head = std::mem::take(&mut self.buf);
                self.state = State::Lost;
                &[]
            }
            Parsed::Partial => &[],
            Parsed::Bad => {
                self.state = State::Bad;
                &[]
            }
        }
    }

    fn after_head(&mut self, framing: Framing) {
        self.good_heads += 1;
        self.state = match framing {
            Framing::None | Framing::Length(0) => State::Head,
            Framing::Length(n) => State::Body(n),
            Framing::Chunked => State::Chunked(Chunk::Size(0)),
            Framing::Unfollowable => State::Lost,
        };
    }

    fn chunked<'a>(&mut self, c: Chunk, data: &'a [u8]) -> &'a [u8] {
        if let Chunk::Data(left) = c {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
            let left = left - n as u64;
            self.state = State::Chunked(if left == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(left)
            });
            return &data[n..];
        }
        let b = data[0];
        let next = match (c, b) {
            (Chunk::Size(size), b) if b.is_ascii_hexdigit() => {
                let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                size.checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .map(Chunk::Size)
            }
            (Chunk::Size(s) | Chunk::SizeLws(s), b' ' | b'\t') => Some(Chunk::SizeLws(s)),
            (Chunk::Size(s) | Chunk::SizeLws(s), b';') => Some(Chunk::Ext(s)),
            (Chunk::Size(s) | Chunk::SizeLws(s) | Chunk::Ext(s), b'\r') => Some(Chunk::SizeLf(s)),
            (Chunk::Ext(_), b'\n') => None,
            (Chunk::Ext(s), _) => Some(Chunk::Ext(s)),
            (Chunk::SizeLf(0), b'\n') => Some(Chunk::EndCr),
            (Chunk::SizeLf(s), b'\n') => Some(Chunk::Data(s)),
            (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
            (Chunk::DataLf, b'\n') => Some(Chunk::Size(0)),
            (Chunk::EndCr, b'\r') => Some(Chunk::EndLf),
            (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
            (Chunk::EndCr | Chunk::Trailer, _) => Some(Chunk::Trailer),
            (Chunk::TrailerLf, b'\n') => Some(Chunk::EndCr),
            (Chunk::EndLf, b'\n') => {
                self.state = State::Head;
                return &data[1..];
            }
            _ => None,
        };
        self.state = match next {
            Some(c) => State::Chunked(c),
            // hyper fails the body read here and reads no further heads.
            None => State::Lost,
        };
        &data[1..]
    }
}

/// Index of the last byte of a possible head terminator (`\n\n` or `\n\r\n`) at or
/// after `from`. Leading empty lines can match too; the parser then says `Partial`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(off) = memchr::memchr(b'\n', &buf[i..]) {
        let nl = i + off;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 1),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 2),
            _ => {}
        }
        i = nl + 1;
    }
    None
}

enum Parsed {
    /// Head length and body framing.
    Complete(usize, Framing),
    Partial,
    Bad,
}

/// hyper's server-side head rules: httparse (default config, 100 headers), the URI
/// length and syntax, and the Content-Length / Transfer-Encoding checks.
fn parse(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Bad,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Bad;
    };
    if path.len() > super::diagnose::MAX_URI_LEN || http::Uri::try_from(path).is_err() {
        return Parsed::Bad;
    }
    let mut content_length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut upgrade = method.eq_ignore_ascii_case("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if version == 0 {
                return Parsed::Bad;
            }
            te = true;
            chunked = super::diagnose::is_chunked_last(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            if te {
                continue;
            }
            let Some(n) = super::diagnose::content_length(h.value) else {
                return Parsed::Bad;
            };
            if content_length.is_some_and(|prev| prev != n) {
                return Parsed::Bad;
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("upgrade") && version == 1 {
            upgrade = true;
        }
    }
    if te && !chunked {
        return Parsed::Bad;
    }
    let framing = if upgrade {
        Framing::Unfollowable
    } else if chunked {
        Framing::Chunked
    } else {
        match content_length {
            Some(n) => Framing::Length(n),
            None => Framing::None,
        }
    };
    Parsed::Complete(len, framing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(chunks: &[&[u8]]) -> RequestTracker {
        let mut t = RequestTracker::default();
        for c in chunks {
            t.feed(c);
        }
        t
    }

    #[test]
    fn follows_heads_and_bodies_in_any_split() {
        let stream: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nT: v\r\n\r\n\
            GET /d HTTP/1.1\r\nX: \x01\r\n\r\n";
        for split in 1..stream.len() {
            let t = fed(&[&stream[..split], &stream[split..]]);
            assert!(t.saw_bad_head(), "split {split}");
            assert_eq!(t.good_heads(), 3, "split {split}");
            assert!(
                t.current_head().unwrap().starts_with(b"GET /d"),
                "split {split}"
            );
        }
        // Byte by byte.
        let mut t = RequestTracker::default();
        for b in stream {
            t.feed(std::slice::from_ref(b));
        }
        assert!(t.saw_bad_head());
        assert_eq!(t.good_heads(), 3);
    }

    #[test]
    fn partial_head_is_current() {
        let t = fed(&[b"GET /x HTTP/1.1\r\nHo st: y"]);
        assert!(!t.saw_bad_head());
        assert_eq!(t.current_head(), Some(&b"GET /x HTTP/1.1\r\nHo st: y"[..]));
        let t = fed(&[b"GE"]);
        assert_eq!(t.current_head(), Some(&b"GE"[..]));
    }

    #[test]
    fn hyper_rejections_are_bad() {
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"junk\r\n\r\n",
        ] {
            assert!(fed(&[bad]).saw_bad_head(), "{}", bad.escape_ascii());
        }
        // Equal duplicates are fine, as in hyper.
        let t = fed(&[b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"]);
        assert!(!t.saw_bad_head());
        assert_eq!(t.good_heads(), 1);
    }

    #[test]
    fn h2_preface_stops_following() {
        let t = fed(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"]);
        assert!(t.is_h2());
        let t = fed(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"]);
        assert!(t.is_h2());
        let t = fed(&[b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"]);
        assert!(!t.is_h2());
        assert!(t.saw_bad_head());
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let t = fed(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"]);
        assert_eq!(t.good_heads(), 2);
        assert!(!t.saw_bad_head());
    }

    #[test]
    fn malformed_chunks_stop_following() {
        let t = fed(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2x\r\n"]);
        assert!(!t.is_following());
        let t = fed(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
        ]);
        assert!(!t.is_following());
    }

    #[test]
    fn oversized_heads_are_dropped() {
        let mut t = RequestTracker::default();
        t.feed(b"GET / HTTP/1.1\r\n");
        let big = vec![b'a'; MAX_HEAD];
        t.feed(&big);
        assert!(!t.is_following());
        assert!(t.current_head().is_none());
        assert_eq!(t.cut_head().map(<[u8]>::len), Some(CUT_HEAD_KEEP));
        assert!(t.cut_head().unwrap().starts_with(b"GET / HTTP/1.1\r\naaa"));
    }
}
