//! `/files` query parameters (`api::files::FilesQuery::parse`: form decoding, first
//! value wins, `signature_expiration` and `fsync` parsing) and signed-URL checks
//! (`api::files::sign`). A URL signed with the token by the SDK recipe is accepted
//! until it expires; a wrong operation, user, path, expiration or token is refused.

use arbitrary::{Arbitrary, Unstructured};
use http::StatusCode;

use guestd::api::files::FilesQuery;
use guestd::api::files::sign::{Operation, authorize, signature};
use guestd::init::AccessToken;

#[derive(Arbitrary, Debug)]
struct Input {
    query: Vec<u8>,
    token: String,
    header: Option<Vec<u8>>,
    now: i64,
    write: bool,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let Ok(query) = std::str::from_utf8(&input.query) else {
        return;
    };
    let Ok(uri) = format!("/files?{query}").parse::<http::Uri>() else {
        return;
    };
    let q = match FilesQuery::parse(&uri) {
        Ok(q) => q,
        Err(e) => {
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(!e.message.is_empty());
            return;
        }
    };
    let op = if input.write {
        Operation::Write
    } else {
        Operation::Read
    };
    let token = AccessToken::default();
    // No token set: everything is allowed.
    authorize(&token, input.header.as_deref(), &q, op, input.now).expect("open without a token");
    if input.token.is_empty() {
        return;
    }
    token.set(input.token.clone());
    let verdict = authorize(&token, input.header.as_deref(), &q, op, input.now);
    if let Err(e) = &verdict {
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(!e.message.is_empty());
    }
    if let Some(h) = &input.header {
        assert_eq!(
            verdict.is_ok(),
            h == input.token.as_bytes(),
            "header token check"
        );
        return;
    }
    let path = q.path.as_deref().unwrap_or("");
    let user = q.username.as_deref().unwrap_or("");
    let exp = q.signature_expiration;
    let good = signature(path, op, user, &input.token, exp);
    let expired = exp.is_some_and(|e| e < input.now);
    let presented_ok = q.signature.as_deref() == Some(good.as_str());
    assert_eq!(
        verdict.is_ok(),
        presented_ok && !expired,
        "verdict for {q:?}"
    );

    // The SDK's URL for the same request: form-encode the fields and parse it back.
    let mut ser = form_urlencoded::Serializer::new(String::new());
    if let Some(p) = &q.path {
        ser.append_pair("path", p);
    }
    if let Some(u) = &q.username {
        ser.append_pair("username", u);
    }
    ser.append_pair("signature", &good);
    if let Some(e) = exp {
        ser.append_pair("signature_expiration", &e.to_string());
    }
    let uri: http::Uri = format!("/files?{}", ser.finish())
        .parse()
        .expect("a form-encoded query is a valid URI");
    let signed = FilesQuery::parse(&uri).expect("our own signed query parses");
    assert_eq!(signed.path, q.path);
    assert_eq!(signed.username, q.username);
    assert_eq!(signed.signature_expiration, exp);
    assert_eq!(
        authorize(&token, None, &signed, op, input.now).is_ok(),
        !expired,
        "a correctly signed URL"
    );
    let other = match op {
        Operation::Read => Operation::Write,
        Operation::Write => Operation::Read,
    };
    assert!(
        authorize(&token, None, &signed, other, input.now).is_err(),
        "wrong operation accepted"
    );
    let mut wrong_token = input.token.clone();
    wrong_token.push('x');
    token.set(wrong_token);
    assert!(
        authorize(&token, None, &signed, op, input.now).is_err(),
        "wrong token accepted"
    );
}
