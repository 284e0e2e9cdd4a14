//! Small header and text parsers: `Authorization: Basic` (`transport::auth`),
//! `X-Metadata-*` upload headers (`filesystem::metadata_from_headers`),
//! `Keepalive-Ping-Interval` (`CallContext::keepalive_interval`) and kernel header
//! dates (`kernel::time::parse_iso`).

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use http::{HeaderMap, HeaderValue};

use guestd::filesystem::{metadata_from_headers, validate_metadata};
use guestd::kernel::time::{format_micros, parse_iso};
use guestd::transport::auth::basic_username;
use guestd::transport::rpc::{CallContext, Codec, Protocol};

#[derive(Arbitrary, Debug)]
struct Input {
    authorization: Vec<u8>,
    metadata: Vec<(String, Vec<u8>)>,
    keepalive: Vec<u8>,
    date: String,
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(&input.authorization) {
        h.insert(http::header::AUTHORIZATION, v);
    }
    if let Some(name) = basic_username(&h) {
        assert!(!name.contains(':'), "username with a colon");
        // The SDK's header for that name carries the same name.
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{name}:"));
        let mut h2 = HeaderMap::new();
        h2.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 header"),
        );
        assert_eq!(basic_username(&h2).as_deref(), Some(name.as_str()));
    }

    match metadata_from_headers(
        input
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice())),
    ) {
        Ok(md) => {
            validate_metadata(&md).expect("accepted metadata validates");
            for (k, v) in &md {
                assert!(!k.is_empty() && k.len() <= 246);
                assert!(
                    k.bytes()
                        .chain(v.bytes())
                        .all(|b| (0x20..=0x7e).contains(&b))
                );
            }
        }
        Err(e) => assert!(e.to_string().starts_with("invalid metadata: ")),
    }

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(&input.keepalive) {
        headers.insert("keepalive-ping-interval", v);
    }
    let ctx = CallContext {
        protocol: Protocol::Connect,
        codec: Codec::Json,
        headers,
        timeout: None,
        deadline: None,
        extensions: http::Extensions::new(),
    };
    assert!(ctx.keepalive_interval().as_secs() > 0);

    if let Some(t) = parse_iso(&input.date) {
        // Years 1..=9999 print as four digits and parse back.
        if (-62_135_596_800_000_000..=253_402_300_799_999_999).contains(&t) {
            let s = format_micros(t);
            assert_eq!(parse_iso(&s), Some(t), "{:?} → {t} → {s:?}", input.date);
        }
    }
}
