//! Who is calling: the user named by `Authorization: Basic base64("<name>:")`.

use base64::Engine as _;
use http::HeaderMap;

/// The username carried by an `Authorization: Basic` header, if the header is present
/// and parseable (contract §2.2: otherwise the default user applies).
pub fn basic_username(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let name = match text.split_once(':') {
        Some((name, _password)) => name,
        None => text.as_str(),
    };
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(v).unwrap(),
        );
        m
    }

    #[test]
    fn parses_basic_username() {
        // base64("user:")
        assert_eq!(basic_username(&h("Basic dXNlcjo=")), Some("user".into()));
        assert_eq!(basic_username(&h("basic cm9vdDo=")), Some("root".into()));
    }

    #[test]
    fn unparseable_headers_mean_default_user() {
        assert_eq!(basic_username(&HeaderMap::new()), None);
        assert_eq!(basic_username(&h("Bearer abc")), None);
        assert_eq!(basic_username(&h("Basic !!!")), None);
    }
}
