//! Why reading a request body failed, in words a client can act on.
//!
//! hyper reports every body failure as one opaque "error reading a body from
//! connection"; the cause underneath tells a malformed body (the client's error: a bad
//! chunk-size line, a bare LF, an overflowing size, too many extensions or trailer
//! bytes) from a connection that ended early (the client went away). The first is
//! answered `400` / `invalid_argument` naming the defect, the second `canceled`.

use std::error::Error as StdError;
use std::io;

/// A request-body read failure, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFault {
    /// The bytes on the wire break the framing (`Transfer-Encoding: chunked`).
    Malformed(String),
    /// The connection ended (or failed) before the body was complete.
    Incomplete(String),
}

impl BodyFault {
    /// Classifies any error a body read returned (hyper's, possibly boxed or wrapped).
    pub fn classify(err: &(dyn StdError + 'static)) -> BodyFault {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return Self::from_io(io);
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>()
                && h.is_incomplete_message()
            {
                return BodyFault::Incomplete(
                    "the connection closed before the request body was complete".into(),
                );
            }
            cur = e.source();
        }
        BodyFault::Incomplete(format!("the request body could not be read: {err}"))
    }

    fn from_io(io: &io::Error) -> BodyFault {
        match io.kind() {
            // hyper's chunked decoder: "Invalid chunk size line: Invalid Size", "Invalid
            // chunk size LF", "invalid chunk size: overflow", "chunk extensions over
            // limit", …
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
                BodyFault::Malformed(format!(
                    "malformed chunked request body (Transfer-Encoding: chunked): {io}; each \
                     chunk is `<hex size>\\r\\n<data>\\r\\n` and the body ends with \
                     `0\\r\\n\\r\\n`"
                ))
            }
            io::ErrorKind::UnexpectedEof => BodyFault::Incomplete(format!(
                "the connection closed before the request body was complete ({io})"
            )),
            _ => BodyFault::Incomplete(format!(
                "the connection failed while reading the request body: {io}"
            )),
        }
    }

    /// The message for the client.
    pub fn message(&self) -> &str {
        match self {
            BodyFault::Malformed(m) | BodyFault::Incomplete(m) => m,
        }
    }

    pub fn is_malformed(&self) -> bool {
        matches!(self, BodyFault::Malformed(_))
    }
}

impl std::fmt::Display for BodyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error reading a body from connection")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn decoder_errors_are_malformed_and_named() {
        let e = Wrapper(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Invalid chunk size line: Invalid Size",
        ));
        let f = BodyFault::classify(&e);
        assert!(f.is_malformed());
        assert!(
            f.message().starts_with(
                "malformed chunked request body (Transfer-Encoding: chunked): Invalid chunk \
                 size line: Invalid Size; each chunk is `<hex size>\\r\\n<data>\\r\\n`"
            ),
            "{f}"
        );
        let e = Wrapper(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid chunk size: overflow",
        ));
        assert!(BodyFault::classify(&e).message().contains("overflow"));
    }

    #[test]
    fn early_end_is_incomplete() {
        let e = Wrapper(io::Error::new(io::ErrorKind::UnexpectedEof, "early eof"));
        let f = BodyFault::classify(&e);
        assert!(!f.is_malformed());
        assert!(f.message().contains("closed before"), "{f}");
        let e = Wrapper(io::Error::from_raw_os_error(libc::ECONNRESET));
        assert!(!BodyFault::classify(&e).is_malformed());
    }
}
