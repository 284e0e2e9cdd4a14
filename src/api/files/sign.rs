//! Who may use `/files` (contract §2.5): the access token in `X-Access-Token`, or a URL
//! signed with it.
//!
//! Recipe (both SDKs): `"v1_" + base64(SHA-256("<path>:<operation>:<user>:<token>"
//! [":<exp>"]))` with the standard alphabet and no padding, where `path` and `user` are
//! the query parameters exactly as sent (unresolved; `""` when absent) and `exp` the
//! optional `signature_expiration` (Unix seconds).

use base64::Engine as _;
use sha2::Digest as _;

use super::{FilesError, FilesQuery};
use crate::init::{AccessToken, ct_eq};

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `GET /files`
    Read,
    /// `POST /files`
    Write,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// The v1 signature of `path` for `operation` by `user` with `token`, expiring at `exp`.
pub fn signature(
    path: &str,
    operation: Operation,
    user: &str,
    token: &str,
    exp: Option<i64>,
) -> String {
    let raw = match exp {
        Some(exp) => format!("{path}:{}:{user}:{token}:{exp}", operation.as_str()),
        None => format!("{path}:{}:{user}:{token}", operation.as_str()),
    };
    let digest = sha2::Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Checks a `/files` request in the contract's order, with the reference's messages
/// (all 401): no token set → allowed; `X-Access-Token` present → must match (then the
/// signature is ignored); else a `signature` must be present, match (constant time) and,
/// with `signature_expiration`, not be in the past (`exp == now` is still valid).
pub fn authorize(
    token: &AccessToken,
    header: Option<&[u8]>,
    query: &FilesQuery,
    operation: Operation,
    now: i64,
) -> Result<(), FilesError> {
    let Some(current) = token.get() else {
        return Ok(());
    };
    if let Some(presented) = header {
        if ct_eq(presented, current.as_bytes()) {
            return Ok(());
        }
        return Err(FilesError::unauthorized(
            "access token present in header but does not match",
        ));
    }
    let Some(sig) = query.signature.as_deref() else {
        return Err(FilesError::unauthorized(
            "missing signature query parameter",
        ));
    };
    let expected = signature(
        query.path.as_deref().unwrap_or(""),
        operation,
        query.username.as_deref().unwrap_or(""),
        &current,
        query.signature_expiration,
    );
    if !ct_eq(sig.as_bytes(), expected.as_bytes()) {
        return Err(FilesError::unauthorized("invalid signature"));
    }
    if let Some(exp) = query.signature_expiration
        && exp < now
    {
        return Err(FilesError::unauthorized("signature is already expired"));
    }
    Ok(())
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn query(
        path: Option<&str>,
        user: Option<&str>,
        sig: Option<String>,
        exp: Option<i64>,
    ) -> FilesQuery {
        FilesQuery {
            path: path.map(str::to_string),
            username: user.map(str::to_string),
            signature: sig,
            signature_expiration: exp,
            ..FilesQuery::default()
        }
    }

    #[test]
    fn recipe_matches_the_sdk() {
        // python: get_signature("/home/user/a b.txt", "read", None, "tok") and with
        // expiration 1700000000 (hashlib + base64 without padding).
        assert_eq!(
            signature("/home/user/a b.txt", Operation::Read, "", "tok", None),
            "v1_m19cDbXO/F43G5cx59umbZW/2oYPnQHTX2ja2COKnRs"
        );
        assert_eq!(
            signature("x", Operation::Write, "user", "tok", Some(1_700_000_000)),
            "v1_R9QcUztUt4kyTONHx8e5/B887SiuSCE16e8V9BZNbjQ"
        );
    }

    #[test]
    fn verification_order_and_messages() {
        let t = AccessToken::default();
        let none = query(None, None, None, None);
        authorize(&t, None, &none, Operation::Read, 0).expect("no token: open");
        t.set("secret".into());

        let e = authorize(&t, Some(b"wrong"), &none, Operation::Read, 0).expect_err("header");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            e.message,
            "access token present in header but does not match"
        );
        authorize(&t, Some(b"secret"), &none, Operation::Read, 0).expect("header ok");

        let e = authorize(&t, None, &none, Operation::Read, 0).expect_err("missing");
        assert_eq!(e.message, "missing signature query parameter");

        let good = signature("/f", Operation::Read, "user", "secret", None);
        let q = query(Some("/f"), Some("user"), Some(good.clone()), None);
        authorize(&t, None, &q, Operation::Read, 0).expect("signed");
        let e = authorize(&t, None, &q, Operation::Write, 0).expect_err("wrong op");
        assert_eq!(e.message, "invalid signature");
        let q2 = query(Some("/f"), None, Some(good), None);
        assert_eq!(
            authorize(&t, None, &q2, Operation::Read, 0)
                .expect_err("user differs")
                .message,
            "invalid signature"
        );

        let exp = 1_000;
        let s = signature("/f", Operation::Read, "", "secret", Some(exp));
        let q = query(Some("/f"), None, Some(s), Some(exp));
        authorize(&t, None, &q, Operation::Read, exp).expect("exp == now is valid");
        let e = authorize(&t, None, &q, Operation::Read, exp + 1).expect_err("expired");
        assert_eq!(e.message, "signature is already expired");
        // A tampered expiration is an invalid signature, not an expired one.
        let mut q = q;
        q.signature_expiration = Some(exp + 100);
        assert_eq!(
            authorize(&t, None, &q, Operation::Read, exp + 1)
                .expect_err("tampered")
                .message,
            "invalid signature"
        );
    }
}
