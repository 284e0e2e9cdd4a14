//! Request heads hyper rejects get an answer that names the problem.
//!
//! hyper parses HTTP/1 request heads itself and, when one is malformed (a control byte
//! in a header, a raw space in the target, conflicting `Content-Length`s, junk), writes
//! `400`/`414`/`431` with an empty body and closes the connection; the service never
//! sees the request and hyper offers no hook. [`Guarded`] wraps each accepted socket
//! and watches both directions without changing a byte:
//!
//! * the read side ([`request::RequestTracker`]) frames the request stream as hyper
//!   does, so the bytes of the head hyper is reading are at hand;
//! * the write side ([`response::ResponseTracker`]) frames the responses; together with
//!   the [`Dispatches`] the service records, it knows when a response head begins while
//!   every dispatched request has been answered. Only hyper writes such a response,
//!   and only for a head it failed to parse.
//!
//! That response is swallowed and replaced by one with the same status, a body in the
//! listener's error shape ([`ErrorPage`]) with the diagnosis of the captured head
//! ([`diagnose::diagnose`]), and `Connection: close`. HTTP/2 connections (the preface)
//! are passed through untouched.

pub mod diagnose;
pub mod request;
pub mod response;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use request::RequestTracker;
use response::{DispatchLog, ResponseTracker};

/// A request hyper rejected before any handler saw it.
#[derive(Debug, Clone, Copy)]
pub struct BadRequest<'a> {
    /// hyper's status: 400, 414 or 431.
    pub status: StatusCode,
    /// What is wrong, for the client.
    pub message: &'a str,
    /// The request target, when the request line could be read that far.
    pub target: Option<&'a str>,
}

/// An error body: its media type and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// How a listener words a [`BadRequest`] (Connect JSON on RPC paths, its REST shape
/// elsewhere).
pub type ErrorPage = fn(&BadRequest<'_>) -> ErrorBody;

/// The requests hyper handed to the service on one connection, shared between the
/// service (which records them) and [`Guarded`] (which matches responses to them).
#[derive(Debug, Default)]
pub struct Dispatches {
    log: Mutex<DispatchLog>,
    /// HTTP/2: nothing is recorded.
    off: AtomicBool,
}

impl Dispatches {
    /// Records a request the service is about to answer.
    pub fn dispatched(&self, method: &http::Method, version: http::Version) {
        if version == http::Version::HTTP_2 || self.off.load(Ordering::Relaxed) {
            return;
        }
        self.lock().dispatched(method == http::Method::HEAD);
    }

    fn lock(&self) -> MutexGuard<'_, DispatchLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's socket, watched for hyper's own error responses (see the module
/// docs).
pub struct Guarded<T> {
    io: T,
    reader: RequestTracker,
    writer: ResponseTracker,
    dispatches: Arc<Dispatches>,
    page: ErrorPage,
    /// Set once hyper's own response began: what it wrote, and ours.
    own: Option<Own>,
}

struct Own {
    /// The start of hyper's response (for its status).
    hyper_head: Vec<u8>,
    /// Our response, built at the first flush.
    out: Option<Vec<u8>>,
    written: usize,
}

impl<T> Guarded<T> {
    pub fn new(io: T, dispatches: Arc<Dispatches>, page: ErrorPage) -> Self {
        Guarded {
            io,
            reader: RequestTracker::default(),
            writer: ResponseTracker::default(),
            dispatches,
            page,
            own: None,
        }
    }

    fn begin_own(&mut self, hyper_bytes: &[u8]) {
        let mut own = Own {
            hyper_head: Vec::new(),
            out: None,
            written: 0,
        };
        own.capture(hyper_bytes);
        self.own = Some(own);
    }

    /// Our response for hyper's: same status, a body naming the problem.
    fn build(&self, hyper_head: &[u8]) -> Vec<u8> {
        let status = hyper_head
            .get(9..12)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| s.is_client_error())
            .unwrap_or(StatusCode::BAD_REQUEST);
        // A cut head belongs to the rejected request only if hyper did not take it.
        let cut = self
            .reader
            .cut_head()
            .filter(|_| self.dispatches.lock().count() == self.reader.good_heads());
        let diagnosis = match (self.reader.current_head(), cut) {
            (Some(head), _) => Some((diagnose::diagnose(head), true)),
            // Only the start of a head too long to keep: its target, hyper's reason.
            (None, Some(start)) => Some((diagnose::diagnose(start), false)),
            (None, None) => None,
        };
        let (detail, target) = match &diagnosis {
            Some((d, whole)) => (
                d.message
                    .clone()
                    .filter(|_| *whole)
                    .unwrap_or_else(|| diagnose::generic(status.as_u16())),
                d.target.as_deref(),
            ),
            None => (diagnose::generic(status.as_u16()), None),
        };
        let message = match status {
            StatusCode::BAD_REQUEST => format!("malformed HTTP request: {detail}"),
            _ => detail,
        };
        tracing::debug!(status = status.as_u16(), %message, "answering a request head hyper rejected");
        let page = (self.page)(&BadRequest {
            status,
            message: &message,
            target,
        });
        response_bytes(status, &page)
    }
}

/// The wire bytes of an error response that closes the connection.
fn response_bytes(status: StatusCode, page: &ErrorBody) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n\
         x-content-type-options: nosniff\r\naccess-control-allow-origin: *\r\n\
         connection: close\r\ndate: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        page.content_type,
        page.body.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    )
    .into_bytes();
    out.extend_from_slice(&page.body);
    out
}

impl Own {
    fn capture(&mut self, bytes: &[u8]) {
        let room = 32usize.saturating_sub(self.hyper_head.len());
        self.hyper_head
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl<T: AsyncWrite + Unpin> Guarded<T> {
    /// Starts writing our response from a write call, once hyper's status line is
    /// known (hyper writes its head at once; a flush or shutdown builds it regardless).
    fn push_own_early(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.own {
            Some(own) if own.out.is_some() || own.hyper_head.len() >= 12 => self.push_own(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Writes our response; `Ready(Ok)` once all of it is out.
    fn push_own(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(own) = self.own.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        if own.out.is_none() {
            let built = self.build(&own.hyper_head);
            if let Some(own) = self.own.as_mut() {
                own.out = Some(built);
            }
        }
        let Some(own) = self.own.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let out = own.out.as_deref().unwrap_or_default();
        while own.written < out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &out[own.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            own.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T> Guarded<T> {
    /// Follows the first `n` bytes of `bufs`, which the socket took.
    fn commit(&mut self, bufs: &[io::IoSlice<'_>], n: usize) {
        let mut log = self.dispatches.lock();
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            self.writer.feed(&b[..take], &log);
            left -= take;
        }
        self.writer.prune(&mut log);
    }
}

/// At most this much of a rejected request is read and dropped before closing.
const DRAIN_MAX: usize = 1 << 20;

impl<T: AsyncRead + AsyncWrite + Unpin> Guarded<T> {
    /// Reads and drops what the client already sent (the rest of a rejected request):
    /// closing a socket with unread data sends a reset, which can destroy our answer
    /// before the client has read it.
    fn drain_received(&mut self, cx: &mut Context<'_>) {
        let mut buf = [0u8; 8192];
        let mut drained = 0;
        while drained < DRAIN_MAX {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => drained += rb.filled().len(),
                _ => return,
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.reader.is_following() {
            this.reader.feed(&buf.filled()[before..]);
            if this.reader.is_h2() {
                this.writer.turn_off();
                this.dispatches.off.store(true, Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(own) = this.own.as_mut() {
            // hyper's own response: swallowed (nothing follows it).
            own.capture(buf);
            if let Poll::Ready(Err(e)) = this.push_own_early(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        if this.writer.inside_body(buf.len()) {
            // The common case of a large body: no boundary can be in these bytes.
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
            this.writer.advance_body(n);
            return Poll::Ready(Ok(n));
        }
        let limit = {
            let log = this.dispatches.lock();
            let mut probe = this.writer;
            probe.feed(buf, &log)
        };
        if limit == 0 && !buf.is_empty() {
            this.begin_own(buf);
            if let Poll::Ready(Err(e)) = this.push_own_early(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, &buf[..limit]))?;
        {
            let mut log = this.dispatches.lock();
            this.writer.feed(&buf[..n], &log);
            this.writer.prune(&mut log);
        }
        if n == limit && limit < buf.len() {
            this.begin_own(&buf[limit..]);
            return Poll::Ready(Ok(buf.len()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.own.is_none() && this.writer.inside_body(total) {
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
            this.writer.advance_body(n);
            return Poll::Ready(Ok(n));
        }
        let limit = if this.own.is_some() {
            0
        } else {
            let log = this.dispatches.lock();
            let mut probe = this.writer;
            let mut at = 0;
            for b in bufs {
                let n = probe.feed(b, &log);
                at += n;
                if n < b.len() {
                    break;
                }
            }
            at
        };
        if limit == total {
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
            this.commit(bufs, n);
            return Poll::Ready(Ok(n));
        }
        // hyper's own response starts inside these buffers: write what comes before
        // it, then swallow the rest.
        if limit > 0 {
            let mut before = Vec::with_capacity(bufs.len());
            let mut at = 0;
            for b in bufs {
                if at >= limit {
                    break;
                }
                let take = (limit - at).min(b.len());
                before.push(io::IoSlice::new(&b[..take]));
                at += take;
            }
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &before))?;
            this.commit(&before, n);
            if n < limit {
                return Poll::Ready(Ok(n));
            }
        }
        let mut rest = Vec::new();
        let mut at = 0;
        for b in bufs {
            let start = limit.saturating_sub(at).min(b.len());
            rest.extend_from_slice(&b[start..]);
            at += b.len();
            if rest.len() >= 32 {
                break;
            }
        }
        match this.own.as_mut() {
            Some(own) => own.capture(&rest),
            None => this.begin_own(&rest),
        }
        if let Poll::Ready(Err(e)) = this.push_own_early(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.push_own(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.push_own(cx))?;
        if this.own.is_some() {
            this.drain_received(cx);
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A socket that takes at most `max` bytes per write and yields `input` once.
    struct Mock {
        input: Vec<u8>,
        out: Vec<u8>,
        max: usize,
    }

    impl AsyncRead for Mock {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.input.len().min(buf.remaining());
            let taken: Vec<u8> = self.input.drain(..n).collect();
            buf.put_slice(&taken);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Mock {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.max {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn page(bad: &BadRequest<'_>) -> ErrorBody {
        ErrorBody {
            content_type: "text/plain",
            body: format!("{}|{}", bad.target.unwrap_or("-"), bad.message).into_bytes(),
        }
    }

    const GOOD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const HYPER_OWN: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
        content-length: 0\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n";

    /// A connection where one good request is followed by a bad head.
    async fn guarded(max: usize) -> Guarded<Mock> {
        let input =
            b"GET /a HTTP/1.1\r\n\r\nPOST /process.Process/List HTTP/1.1\r\nX: \x01\r\n\r\n";
        let d = Arc::new(Dispatches::default());
        let mut g = Guarded::new(
            Mock {
                input: input.to_vec(),
                out: Vec::new(),
                max,
            },
            d.clone(),
            page,
        );
        let mut buf = vec![0u8; 200];
        let n = g.read(&mut buf).await.expect("read");
        assert_eq!(n, input.len());
        d.dispatched(&http::Method::GET, http::Version::HTTP_11);
        g
    }

    fn check(out: &[u8]) {
        let text = String::from_utf8_lossy(out);
        assert!(out.starts_with(GOOD), "{text}");
        let ours = &text[GOOD.len()..];
        assert!(
            ours.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n"),
            "{text}"
        );
        assert!(ours.contains("connection: close\r\n"), "{text}");
        assert!(
            ours.ends_with(
                "\r\n\r\n/process.Process/List|malformed HTTP request: invalid byte 0x01 in the \
                 value of header \"X\" (line 2 of the request head): control characters other \
                 than tab are not allowed in header values"
            ),
            "{text}"
        );
        assert!(!text.contains("content-length: 0"), "{text}");
    }

    #[tokio::test]
    async fn replaces_hyper_own_response_after_a_partial_write() {
        for max in [1, 3, 7, 40, 1000] {
            let mut g = guarded(max).await;
            let mut all = GOOD.to_vec();
            all.extend_from_slice(HYPER_OWN);
            g.write_all(&all).await.expect("write");
            g.flush().await.expect("flush");
            g.shutdown().await.expect("shutdown");
            check(&g.io.out);
        }
    }

    #[tokio::test]
    async fn replaces_hyper_own_response_in_vectored_writes() {
        for max in [1, 5, 38, 39, 41, 1000] {
            let mut g = guarded(max).await;
            let parts: [&[u8]; 3] = [&GOOD[..GOOD.len() - 2], &GOOD[GOOD.len() - 2..], HYPER_OWN];
            let mut skip = 0;
            let total: usize = parts.iter().map(|p| p.len()).sum();
            while skip < total {
                let mut slices = Vec::new();
                let mut at = 0;
                for p in parts {
                    if at + p.len() > skip {
                        slices.push(io::IoSlice::new(&p[skip.saturating_sub(at)..]));
                    }
                    at += p.len();
                }
                let n = g.write_vectored(&slices).await.expect("write");
                assert!(n > 0);
                skip += n;
            }
            g.shutdown().await.expect("shutdown");
            check(&g.io.out);
        }
    }

    #[tokio::test]
    async fn answered_connections_pass_through() {
        // hyper answered the one request it dispatched: nothing is replaced.
        let mut g = guarded(7).await;
        g.write_all(GOOD).await.expect("write");
        g.shutdown().await.expect("shutdown");
        assert_eq!(g.io.out, GOOD);
    }
}
