//! The write side: follows the responses hyper writes on an HTTP/1 connection (status
//! line, `Content-Length` or chunked framing, trailers, HEAD and 1xx/204/304 without a
//! body) to know where each one ends. A response head that begins while every
//! dispatched request has been answered can only be hyper's own: hyper writes a
//! response for a request it did not hand to the service only when it failed to parse
//! that request's head.

use std::collections::VecDeque;

/// Requests hyper handed to the service on one connection, in order, with what the
/// write side needs to know about each (whether it was a HEAD request).
#[derive(Debug, Default)]
pub struct DispatchLog {
    /// Requests answered (and dropped from `heads`) so far.
    base: u64,
    heads: VecDeque<bool>,
}

impl DispatchLog {
    /// A request was handed to the service.
    pub fn dispatched(&mut self, is_head: bool) {
        self.heads.push_back(is_head);
    }

    /// Requests dispatched so far.
    pub fn count(&self) -> u64 {
        self.base + self.heads.len() as u64
    }

    /// Whether request number `n` (0-based) was dispatched, and if it was a HEAD.
    fn get(&self, n: u64) -> Option<bool> {
        let i = n.checked_sub(self.base)?;
        self.heads.get(usize::try_from(i).ok()?).copied()
    }

    /// Forgets requests before number `answered`.
    fn prune(&mut self, answered: u64) {
        while self.base < answered && self.heads.pop_front().is_some() {
            self.base += 1;
        }
    }
}

const LINE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between responses.
    Boundary,
    /// Inside a response head.
    Head,
    Body(u64),
    Chunked(Chunk),
    /// Not followed any more (a close-delimited body, an unreadable head line): no
    /// response of hyper's own can be recognised on this connection.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The size line's hex digits.
    Size(u64),
    /// The rest of the size line (`\r`, extensions) up to its `\n`.
    SizeSkip(u64),
    Data(u64),
    /// The CRLF after a chunk's data, up to its `\n`.
    DataEnd,
    /// A trailer line (or the final empty line) after the last chunk.
    Trailer {
        empty: bool,
    },
}

/// Where the response stream of one connection is. `Copy`, so a write can be looked
/// at on a copy before it is known how much of it the socket takes.
#[derive(Debug, Clone, Copy)]
pub struct ResponseTracker {
    state: State,
    /// Final responses completed.
    answered: u64,
    // The head being read.
    line: [u8; LINE],
    line_len: usize,
    line_overflow: bool,
    first_line: bool,
    status: u16,
    content_length: Option<u64>,
    chunked: bool,
}

impl Default for ResponseTracker {
    fn default() -> Self {
        ResponseTracker {
            state: State::Boundary,
            answered: 0,
            line: [0; LINE],
            line_len: 0,
            line_overflow: false,
            first_line: true,
            status: 0,
            content_length: None,
            chunked: false,
        }
    }
}

impl ResponseTracker {
    /// Stops following (HTTP/2, or anything unexpected).
    pub fn turn_off(&mut self) {
        self.state = State::Off;
    }

    /// Follows `data` (bytes hyper writes). Returns how many of them come before a
    /// response of hyper's own, or `data.len()` when there is none in `data`.
    pub fn feed(&mut self, data: &[u8], log: &DispatchLog) -> usize {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Off => return data.len(),
                State::Boundary => {
                    if log.get(self.answered).is_none() {
                        // Nothing dispatched is unanswered: this head is hyper's own.
                        return i;
                    }
                    self.start_head();
                }
                State::Head => {
                    let b = data[i];
                    i += 1;
                    self.head_byte(b, log);
                }
                State::Body(left) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    i += n;
                    let left = left - n as u64;
                    if left == 0 {
                        self.complete();
                    } else {
                        self.state = State::Body(left);
                    }
                }
                State::Chunked(c) => i += self.chunk(c, &data[i..]),
            }
        }
        data.len()
    }

    fn start_head(&mut self) {
        self.state = State::Head;
        self.line_len = 0;
        self.line_overflow = false;
        self.first_line = true;
        self.status = 0;
        self.content_length = None;
        self.chunked = false;
    }

    fn head_byte(&mut self, b: u8, log: &DispatchLog) {
        if b != b'\n' {
            if self.line_len < LINE {
                self.line[self.line_len] = b;
                self.line_len += 1;
            } else {
                self.line_overflow = true;
            }
            return;
        }
        let mut line = &self.line[..self.line_len];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if self.first_line {
            self.first_line = false;
            // "HTTP/1.1 200 OK"
            self.status = line
                .get(9..12)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if !line.starts_with(b"HTTP/1.") || self.status == 0 {
                self.state = State::Off;
            }
        } else if line.is_empty() {
            self.end_head(log);
            return;
        } else if let Some(v) = header_value(line, b"content-length") {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) if !self.line_overflow => self.content_length = Some(n),
                _ => self.state = State::Off,
            }
        } else if let Some(v) = header_value(line, b"transfer-encoding") {
            if self.line_overflow {
                self.state = State::Off;
            } else {
                self.chunked = super::diagnose::is_chunked_last(v);
            }
        }
        self.line_len = 0;
        self.line_overflow = false;
    }

    fn end_head(&mut self, log: &DispatchLog) {
        if (100..200).contains(&self.status) {
            // 100 Continue and friends: the final response is still to come.
            self.state = State::Boundary;
            return;
        }
        let is_head = log.get(self.answered).unwrap_or(false);
        if is_head || self.status == 204 || self.status == 304 {
            self.complete();
        } else if self.chunked {
            self.state = State::Chunked(Chunk::Size(0));
        } else {
            match self.content_length {
                Some(0) => self.complete(),
                Some(n) => self.state = State::Body(n),
                // Delimited by the connection's end: nothing can follow it.
                None => self.state = State::Off,
            }
        }
    }

    fn complete(&mut self) {
        self.answered += 1;
        self.state = State::Boundary;
    }

    /// True when the next `n` bytes are all inside the current body and do not reach
    /// its end (or nothing is followed): they need no look at the dispatch log.
    pub fn inside_body(&self, n: usize) -> bool {
        let n = n as u64;
        match self.state {
            State::Body(left) | State::Chunked(Chunk::Data(left)) => n < left,
            State::Off => true,
            _ => false,
        }
    }

    /// Follows `n` bytes for which [`ResponseTracker::inside_body`] was true.
    pub fn advance_body(&mut self, n: usize) {
        let n = n as u64;
        match self.state {
            State::Body(left) => self.state = State::Body(left - n.min(left)),
            State::Chunked(Chunk::Data(left)) => {
                self.state = State::Chunked(Chunk::Data(left - n.min(left)));
            }
            _ => {}
        }
    }

    /// Answered responses, for [`DispatchLog::prune`] after a committed write.
    pub fn prune(&self, log: &mut DispatchLog) {
        log.prune(self.answered);
    }

    /// True between responses with every dispatched request answered.
    pub fn idle(&self, log: &DispatchLog) -> bool {
        self.state == State::Boundary && log.get(self.answered).is_none()
    }

    /// Consumes bytes of a chunked body; returns how many.
    fn chunk(&mut self, c: Chunk, data: &[u8]) -> usize {
        match c {
            Chunk::Data(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                let left = left - n as u64;
                self.state = State::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                n
            }
            Chunk::Size(size) => {
                let b = data[0];
                self.state = match b {
                    b'\n' if size == 0 => State::Chunked(Chunk::Trailer { empty: true }),
                    b'\n' => State::Chunked(Chunk::Data(size)),
                    _ => match (b as char).to_digit(16) {
                        Some(d) => match size.checked_mul(16).and_then(|s| s.checked_add(d.into()))
                        {
                            Some(s) => State::Chunked(Chunk::Size(s)),
                            None => State::Off,
                        },
                        // `\r`, or extensions (hyper writes none): skip to the `\n`.
                        None => State::Chunked(Chunk::SizeSkip(size)),
                    },
                };
                1
            }
            Chunk::SizeSkip(size) => {
                if data[0] == b'\n' {
                    self.state = State::Chunked(if size == 0 {
                        Chunk::Trailer { empty: true }
                    } else {
                        Chunk::Data(size)
                    });
                }
                1
            }
            Chunk::DataEnd => {
                if data[0] == b'\n' {
                    self.state = State::Chunked(Chunk::Size(0));
                }
                1
            }
            Chunk::Trailer { empty } => {
                match data[0] {
                    b'\n' if empty => self.complete(),
                    b'\n' => self.state = State::Chunked(Chunk::Trailer { empty: true }),
                    b'\r' => {}
                    _ => self.state = State::Chunked(Chunk::Trailer { empty: false }),
                }
                1
            }
        }
    }
}

/// The value of `line` when it is the header field `name` (lowercase).
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (n, v) = line.split_at_checked(name.len())?;
    if !n.eq_ignore_ascii_case(name) {
        return None;
    }
    v.strip_prefix(b":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(heads: &[bool]) -> DispatchLog {
        let mut l = DispatchLog::default();
        for &h in heads {
            l.dispatched(h);
        }
        l
    }

    const OWN: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

    /// Where hyper's own response starts in `stream`, fed in pieces of `step` bytes.
    fn own_at(stream: &[u8], l: &DispatchLog, step: usize) -> Option<usize> {
        let mut t = ResponseTracker::default();
        let mut at = 0;
        for piece in stream.chunks(step) {
            let n = t.feed(piece, l);
            if n < piece.len() {
                return Some(at + n);
            }
            at += piece.len();
        }
        None
    }

    #[test]
    fn finds_hyper_own_response_after_every_kind_of_body() {
        let responses: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello\
            HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nHTTP/\r\n0\r\ngrpc-status: 0\r\n\r\n\
            HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n\
            HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n";
        let l = log(&[false, false, false, true]);
        let mut stream = responses.to_vec();
        stream.extend_from_slice(OWN);
        for step in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(
                own_at(&stream, &l, step),
                Some(responses.len()),
                "step {step}"
            );
        }
        // One request fewer answered: no response of hyper's own.
        let l = log(&[false, false, false, true, false]);
        assert_eq!(own_at(&stream, &l, 5), None);
    }

    #[test]
    fn body_bytes_need_no_log() {
        let l = log(&[false]);
        let mut t = ResponseTracker::default();
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
        assert!(!t.inside_body(1));
        assert_eq!(t.feed(head, &l), head.len());
        assert!(t.inside_body(9));
        assert!(!t.inside_body(10));
        t.advance_body(9);
        assert!(!t.inside_body(1));
        assert_eq!(t.feed(b"x", &l), 1);
        assert!(t.idle(&l));
        assert_eq!(t.feed(OWN, &l), 0);
    }

    #[test]
    fn first_response_of_a_connection() {
        assert_eq!(own_at(OWN, &log(&[]), 4), Some(0));
        assert_eq!(own_at(OWN, &log(&[false]), 4), None);
    }

    #[test]
    fn close_delimited_bodies_turn_it_off() {
        let stream = b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 400 Bad Request\r\n\r\n";
        assert_eq!(own_at(stream, &log(&[false]), 3), None);
    }

    #[test]
    fn pruning_keeps_lookups_right() {
        let mut l = log(&[true, false]);
        let mut t = ResponseTracker::default();
        let first = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(t.feed(first, &l), first.len());
        t.prune(&mut l);
        assert_eq!(l.count(), 2);
        assert!(!t.idle(&l));
        let second = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(t.feed(second, &l), second.len());
        t.prune(&mut l);
        assert!(t.idle(&l));
    }
}
