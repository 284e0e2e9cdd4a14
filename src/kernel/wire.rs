//! Jupyter messaging protocol (version 5.3) on the wire: message envelopes, HMAC-SHA256
//! signing and verification, and the multipart frame layout used on every ZeroMQ
//! channel:
//!
//! `[identities…, "<IDS|MSG>", signature, header, parent_header, metadata, content, buffers…]`
//!
//! Contents stay `serde_json::Value`: the bridge passes MIME bundles through untouched
//! and only reads the few fields it needs.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Sha256;

/// Protocol version written into every header the bridge sends.
pub const PROTOCOL_VERSION: &str = "5.3";

const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Errors decoding a multipart message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message has no <IDS|MSG> delimiter")]
    NoDelimiter,
    #[error("message has {0} frames after the delimiter, at least 5 are required")]
    TooFewFrames(usize),
    #[error("message signature does not match")]
    BadSignature,
    #[error("invalid {part} JSON: {detail}")]
    Json { part: &'static str, detail: String },
}

/// A message header (`header` and `parent_header` share this shape).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Header {
    #[serde(default)]
    pub msg_id: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    #[serde(default)]
    pub msg_type: String,
    #[serde(default)]
    pub version: String,
}

/// One Jupyter message.
#[derive(Debug, Clone)]
pub struct Message {
    pub header: Header,
    /// `None` when the parent header is `{}` (messages not caused by a request).
    pub parent: Option<Header>,
    pub metadata: Value,
    pub content: Value,
}

impl Message {
    /// A new request or reply of `msg_type` for `session`, with a fresh UUIDv4 id and
    /// the current time.
    pub fn new(msg_type: &str, session: &str, content: Value) -> Message {
        Message {
            header: Header {
                msg_id: uuid::Uuid::new_v4().to_string(),
                session: session.to_string(),
                username: "guestd".to_string(),
                date: Some(super::time::now_iso()),
                msg_type: msg_type.to_string(),
                version: PROTOCOL_VERSION.to_string(),
            },
            parent: None,
            metadata: Value::Object(Map::new()),
            content,
        }
    }

    pub fn msg_type(&self) -> &str {
        &self.header.msg_type
    }

    pub fn msg_id(&self) -> &str {
        &self.header.msg_id
    }

    /// The `msg_id` of the request this message answers, if any.
    pub fn parent_id(&self) -> Option<&str> {
        self.parent
            .as_ref()
            .map(|p| p.msg_id.as_str())
            .filter(|id| !id.is_empty())
    }

    /// The `msg_type` of the request this message answers, if any.
    pub fn parent_type(&self) -> Option<&str> {
        self.parent
            .as_ref()
            .map(|p| p.msg_type.as_str())
            .filter(|t| !t.is_empty())
    }

    /// A string field of the content, if present.
    pub fn content_str(&self, key: &str) -> Option<&str> {
        self.content.get(key).and_then(Value::as_str)
    }
}

/// Signs and verifies messages with the connection's key (HMAC-SHA256). An empty key
/// disables signing, as the protocol specifies.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl Signer {
    pub fn new(key: &[u8]) -> Signer {
        Signer { key: key.to_vec() }
    }

    fn mac(&self, parts: &[&[u8]]) -> Option<HmacSha256> {
        if self.key.is_empty() {
            return None;
        }
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        for p in parts {
            mac.update(p);
        }
        Some(mac)
    }

    /// Lowercase hex signature of the four JSON parts (empty without a key).
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        match self.mac(parts) {
            Some(mac) => hex(&mac.finalize().into_bytes()),
            None => String::new(),
        }
    }

    /// Constant-time check of a received signature.
    pub fn verify(&self, signature: &[u8], parts: &[&[u8]]) -> bool {
        match self.mac(parts) {
            None => true,
            Some(mac) => match unhex(signature) {
                Some(raw) => mac.verify_slice(&raw).is_ok(),
                None => false,
            },
        }
    }

    /// Serializes `msg` into frames (no routing identities: DEALER sockets add none).
    pub fn encode(&self, msg: &Message) -> Vec<Bytes> {
        let header = to_vec(&msg.header);
        let parent = match &msg.parent {
            Some(p) => to_vec(p),
            None => b"{}".to_vec(),
        };
        let metadata = to_vec(&msg.metadata);
        let content = to_vec(&msg.content);
        let sig = self.sign(&[&header, &parent, &metadata, &content]);
        vec![
            Bytes::from_static(DELIMITER),
            Bytes::from(sig.into_bytes()),
            Bytes::from(header),
            Bytes::from(parent),
            Bytes::from(metadata),
            Bytes::from(content),
        ]
    }

    /// Parses frames received on any channel, verifying the signature.
    pub fn decode(&self, frames: &[Bytes]) -> Result<Message, WireError> {
        self.decode_checked(frames, true)
    }

    /// Parses frames without checking their signature: only for channels whose peer
    /// the transport already vouches for. A kernel on IPC listens in guestd's private
    /// (0700) runtime directory, so only root could have bound the socket, and root can
    /// read the key in the connection file next to it; checking costs a SHA-256 pass
    /// over every byte of output (D70).
    pub fn decode_trusted(&self, frames: &[Bytes]) -> Result<Message, WireError> {
        self.decode_checked(frames, false)
    }

    fn decode_checked(&self, frames: &[Bytes], check: bool) -> Result<Message, WireError> {
        let pos = frames
            .iter()
            .position(|f| f.as_ref() == DELIMITER)
            .ok_or(WireError::NoDelimiter)?;
        let rest = &frames[pos + 1..];
        if rest.len() < 5 {
            return Err(WireError::TooFewFrames(rest.len()));
        }
        let (sig, header, parent, metadata, content) =
            (&rest[0], &rest[1], &rest[2], &rest[3], &rest[4]);
        if check && !self.verify(sig, &[header, parent, metadata, content]) {
            return Err(WireError::BadSignature);
        }
        let header: Header = parse("header", header)?;
        let parent_value: Value = parse("parent_header", parent)?;
        let parent = match &parent_value {
            Value::Object(m) if m.is_empty() => None,
            _ => Some(serde_json::from_value::<Header>(parent_value).map_err(|e| {
                WireError::Json {
                    part: "parent_header",
                    detail: e.to_string(),
                }
            })?),
        };
        Ok(Message {
            header,
            parent,
            metadata: parse("metadata", metadata)?,
            content: parse("content", content)?,
        })
    }
}

fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing headers and `Value`s cannot fail (string keys, no custom impls).
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}

fn parse<T: serde::de::DeserializeOwned>(part: &'static str, raw: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(raw).map_err(|e| WireError::Json {
        part,
        detail: e.to_string(),
    })
}

/// Lowercase hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    s.chunks(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roundtrip_with_signature() {
        let signer = Signer::new(b"secret");
        let mut msg = Message::new("execute_request", "sess", json!({"code": "1+1"}));
        msg.parent = Some(Header {
            msg_id: "p1".into(),
            msg_type: "kernel_info_request".into(),
            ..Header::default()
        });
        let mut frames = vec![Bytes::from_static(b"topic")];
        frames.extend(signer.encode(&msg));
        let back = signer.decode(&frames).expect("decode");
        assert_eq!(back.msg_type(), "execute_request");
        assert_eq!(back.parent_id(), Some("p1"));
        assert_eq!(back.parent_type(), Some("kernel_info_request"));
        assert_eq!(back.content_str("code"), Some("1+1"));
        assert_eq!(back.msg_id(), msg.msg_id());
    }

    /// Fuzz regression (fuzz/regressions/jupyter_wire): without serde_json's
    /// `float_roundtrip`, a long number literal parsed one ulp off and the bridge
    /// changed a kernel's numbers on their way to the client.
    #[test]
    fn numbers_pass_through_exactly() {
        let literal = "75555555555555555555555555";
        let exact: f64 = literal.parse().expect("f64");
        let signer = Signer::new(b"k");
        let mut msg = Message::new("display_data", "s", json!({}));
        msg.content = serde_json::from_str(&format!("{{\"x\": {literal}}}")).expect("json");
        assert_eq!(msg.content["x"].as_f64(), Some(exact));
        let back = signer.decode(&signer.encode(&msg)).expect("decode");
        assert_eq!(back.content, msg.content);
        assert_eq!(back.content["x"].as_f64(), Some(exact));
    }

    #[test]
    fn known_signature() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog")
        let s = Signer::new(b"key");
        assert_eq!(
            s.sign(&[b"The quick brown fox ", b"jumps over the lazy dog"]),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn tampered_message_is_rejected() {
        let signer = Signer::new(b"secret");
        let msg = Message::new("status", "s", json!({"execution_state": "idle"}));
        let mut frames = signer.encode(&msg);
        frames[5] = Bytes::from_static(b"{\"execution_state\":\"busy\"}");
        assert_eq!(signer.decode(&frames).unwrap_err(), WireError::BadSignature);
        assert_eq!(
            Signer::new(b"other")
                .decode(&signer.encode(&msg))
                .unwrap_err(),
            WireError::BadSignature
        );
    }

    #[test]
    fn trusted_decoding_skips_only_the_signature() {
        let signer = Signer::new(b"secret");
        let msg = Message::new("status", "s", json!({"execution_state": "idle"}));
        let mut frames = signer.encode(&msg);
        frames[1] = Bytes::from_static(b"not-a-signature");
        assert_eq!(signer.decode(&frames).unwrap_err(), WireError::BadSignature);
        let back = signer.decode_trusted(&frames).expect("decode");
        assert_eq!(back.content, msg.content);
        frames[5] = Bytes::from_static(b"{");
        assert!(matches!(
            signer.decode_trusted(&frames),
            Err(WireError::Json {
                part: "content",
                ..
            })
        ));
    }

    #[test]
    fn empty_parent_is_none_and_short_messages_fail() {
        let signer = Signer::new(b"");
        let msg = Message::new("status", "s", json!({}));
        let back = signer.decode(&signer.encode(&msg)).expect("decode");
        assert!(back.parent.is_none());
        assert_eq!(back.parent_id(), None);
        assert_eq!(
            signer.decode(&[Bytes::from_static(b"x")]).unwrap_err(),
            WireError::NoDelimiter
        );
        assert_eq!(
            signer
                .decode(&[Bytes::from_static(DELIMITER), Bytes::new()])
                .unwrap_err(),
            WireError::TooFewFrames(1)
        );
    }
}
