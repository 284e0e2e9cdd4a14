//! The request body of an upload as a pull source of byte chunks: each read bounded by
//! an idle timeout, `Content-Encoding: gzip` decompressed on the fly (multi-member,
//! CRC-checked), memory bounded by one input chunk plus ~64 KiB of output.

use std::io::Write as _;
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

/// Decompressed bytes handed out per chunk at most (roughly: one decoder step may add
/// up to 32 KiB more).
const GUNZIP_OUT: usize = 64 * 1024;

/// Why the body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// No data for the idle timeout.
    #[error("the upload stalled: no data received for {} s", .0.as_secs())]
    Stalled(Duration),
    /// The body is malformed (bad chunked framing), or the connection failed or the
    /// client went away mid-body; the message says which.
    #[error("{0}")]
    Read(crate::transport::body::BodyFault),
    /// `Content-Encoding: gzip` but the data is not valid gzip.
    #[error("invalid gzip-encoded body: {0}")]
    Gzip(#[source] std::io::Error),
}

/// Raw body frames with the idle timeout.
struct Raw {
    body: Incoming,
    idle: Duration,
    done: bool,
    received: u64,
}

impl Raw {
    async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        while !self.done {
            let frame = match tokio::time::timeout(self.idle, self.body.frame()).await {
                Err(_) => return Err(BodyError::Stalled(self.idle)),
                Ok(None) => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(Err(e))) => {
                    return Err(BodyError::Read(
                        crate::transport::body::BodyFault::classify(&e),
                    ));
                }
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                self.received += data.len() as u64;
                return Ok(Some(data));
            }
        }
        Ok(None)
    }
}

struct Gunzip {
    dec: flate2::write::MultiGzDecoder<Vec<u8>>,
    input: Bytes,
    finished: bool,
}

/// Where the multipart parser gets its input.
pub trait ChunkSource: Send {
    /// The next chunk; `None` at the end.
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, BodyError>> + Send;
}

impl ChunkSource for BodySource {
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, BodyError>> + Send {
        self.next()
    }
}

/// The (decoded) request body.
pub struct BodySource {
    raw: Raw,
    gunzip: Option<Box<Gunzip>>,
}

impl BodySource {
    pub fn new(body: Incoming, idle: Duration) -> Self {
        BodySource {
            raw: Raw {
                body,
                idle,
                done: false,
                received: 0,
            },
            gunzip: None,
        }
    }

    /// Decodes the body as gzip from now on (call before the first read).
    pub fn gunzip(&mut self) {
        self.gunzip = Some(Box::new(Gunzip {
            dec: flate2::write::MultiGzDecoder::new(Vec::new()),
            input: Bytes::new(),
            finished: false,
        }));
    }

    /// The next chunk of (decoded) data; `None` at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        let Some(g) = self.gunzip.as_mut() else {
            return self.raw.next().await;
        };
        loop {
            if g.finished {
                return Ok(None);
            }
            while !g.input.is_empty() && g.dec.get_ref().len() < GUNZIP_OUT {
                let n = g.dec.write(&g.input).map_err(BodyError::Gzip)?;
                if n == 0 {
                    return Err(BodyError::Gzip(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the decoder accepts no more input",
                    )));
                }
                g.input.advance(n);
            }
            if !g.dec.get_ref().is_empty() {
                return Ok(Some(Bytes::from(std::mem::take(g.dec.get_mut()))));
            }
            match self.raw.next().await? {
                Some(chunk) => g.input = chunk,
                None => {
                    g.dec.try_finish().map_err(BodyError::Gzip)?;
                    g.finished = true;
                    let rest = std::mem::take(g.dec.get_mut());
                    return Ok((!rest.is_empty()).then(|| Bytes::from(rest)));
                }
            }
        }
    }

    /// Raw bytes received so far.
    pub fn received(&self) -> u64 {
        self.raw.received
    }

    /// Reads and discards the rest of the raw body, up to `max_bytes` or `max_time`, so
    /// a client that is still sending gets to read the error response instead of a
    /// connection reset.
    pub async fn drain(&mut self, max_bytes: u64, max_time: Duration) {
        let start = self.raw.received;
        let deadline = tokio::time::Instant::now() + max_time;
        while self.raw.received - start < max_bytes {
            match tokio::time::timeout_at(deadline, self.raw.next()).await {
                Ok(Ok(Some(_))) => {}
                _ => return,
            }
        }
    }
}
