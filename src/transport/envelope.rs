//! Length-prefixed message framing shared by Connect streaming and gRPC:
//! one flag byte, a 4-byte big-endian length, then the payload.

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt as _;

use super::error::{Code, RpcError};

/// Payload is compressed with the negotiated encoding.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Connect end-of-stream message (JSON, never a user message).
pub const FLAG_END_STREAM: u8 = 0x02;

/// Encodes one envelope.
pub fn encode(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.freeze()
}

/// One decoded envelope.
#[derive(Debug)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

/// Reads envelopes from a request body as they arrive, without buffering more than one
/// message, and rejects a declared length above `max_message_bytes` before reading it.
pub struct EnvelopeReader<B> {
    body: B,
    buf: BytesMut,
    max_message_bytes: usize,
    done: bool,
}

impl<B> EnvelopeReader<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    pub fn new(body: B, max_message_bytes: usize) -> Self {
        EnvelopeReader {
            body,
            buf: BytesMut::new(),
            max_message_bytes,
            done: false,
        }
    }

    /// The next envelope; `Ok(None)` at a clean end of the body (between envelopes).
    pub async fn next(&mut self) -> Result<Option<Envelope>, RpcError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > self.max_message_bytes {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!(
                            "message of {len} bytes exceeds the limit of {} bytes",
                            self.max_message_bytes
                        ),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len).freeze();
                    return Ok(Some(Envelope { flags, payload }));
                }
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(RpcError::invalid_argument(incomplete_message(&self.buf)));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(super::rpc::body_read_error(&e)),
                None => self.done = true,
            }
        }
    }
}

fn incomplete_message(buf: &[u8]) -> String {
    if buf.len() < 5 {
        format!(
            "malformed envelope: the body ended after {} byte(s) of a 5-byte envelope header",
            buf.len()
        )
    } else {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        format!(
            "malformed envelope: declared a {len}-byte message but the body ended after {} byte(s)",
            buf.len() - 5
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn reads_consecutive_envelopes() {
        let mut data = encode(0, b"abc").to_vec();
        data.extend_from_slice(&encode(FLAG_END_STREAM, b"{}"));
        let mut r = EnvelopeReader::new(Full::new(Bytes::from(data)), 100);
        let a = r.next().await.unwrap().unwrap();
        assert_eq!((a.flags, &a.payload[..]), (0, &b"abc"[..]));
        let b = r.next().await.unwrap().unwrap();
        assert_eq!((b.flags, &b.payload[..]), (FLAG_END_STREAM, &b"{}"[..]));
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_envelope_is_invalid_argument() {
        let mut data = encode(0, b"abcdef").to_vec();
        data.truncate(8);
        let mut r = EnvelopeReader::new(Full::new(Bytes::from(data)), 100);
        let err = r.next().await.unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        assert!(
            err.message.contains("declared a 6-byte message"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn oversized_envelope_is_rejected_before_reading_it() {
        let data = vec![0u8, 0xff, 0xff, 0xff, 0xff];
        let mut r = EnvelopeReader::new(Full::new(Bytes::from(data)), 1024);
        let err = r.next().await.unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
    }
}
