//! `api::files::content`: `Range`, `Accept-Encoding`, the conditional headers
//! (`If-Match`, `If-None-Match`, `If-Modified-Since`, `If-Unmodified-Since`, `If-Range`),
//! `Content-Disposition` and content-type guessing. Ranges stay inside the file; a
//! `Content-Disposition` is always a valid header value that names the file.

use std::time::{Duration, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderValue};

use guestd::api::files::content::{
    Precondition, RangeOutcome, Validators, accept_encoding, content_disposition, if_range_allows,
    parse_range, preconditions, sniff, type_from_extension,
};

#[derive(Arbitrary, Debug)]
enum Conditional {
    IfMatch,
    IfNoneMatch,
    IfModifiedSince,
    IfUnmodifiedSince,
    IfRange,
    Range,
}

#[derive(Arbitrary, Debug)]
struct Input {
    range: String,
    size: u64,
    small_size: u8,
    accept: Vec<String>,
    headers: Vec<(Conditional, Vec<u8>)>,
    etag: String,
    mtime: Option<u32>,
    if_range: String,
    disposition_name: String,
    head: Vec<u8>,
}

fn check_range(value: &str, size: u64) {
    match parse_range(value, size) {
        RangeOutcome::Partial { start, len } => {
            assert!(len >= 1, "empty range for {value:?}");
            let end = start.checked_add(len).expect("range end overflows");
            assert!(end <= size, "range {start}+{len} past a {size}-byte file");
        }
        RangeOutcome::Unsatisfiable | RangeOutcome::Full => {}
    }
}

/// Parameters of `filename*=utf-8''…` / `filename="…"` / `filename=…`, decoded.
fn disposition_filename(v: &str) -> String {
    let (_, rest) = v.split_once("; ").expect("disposition; parameter");
    if let Some(enc) = rest.strip_prefix("filename*=utf-8''") {
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(enc).collect();
        return String::from_utf8(bytes).expect("percent-encoded UTF-8");
    }
    let raw = rest.strip_prefix("filename=").expect("filename parameter");
    if let Some(q) = raw.strip_prefix('"') {
        let q = q.strip_suffix('"').expect("closing quote");
        let mut out = String::new();
        let mut chars = q.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                out.push(chars.next().expect("escaped character"));
            } else {
                out.push(c);
            }
        }
        return out;
    }
    raw.to_string()
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    check_range(&input.range, input.size);
    check_range(&input.range, u64::from(input.small_size));
    check_range(&input.range, 0);

    let a = accept_encoding(input.accept.iter().map(String::as_str));
    assert!(
        !a.prefer_gzip || a.gzip,
        "gzip preferred but not acceptable"
    );

    let mut headers = HeaderMap::new();
    for (which, raw) in &input.headers {
        let Ok(v) = HeaderValue::from_bytes(raw) else {
            continue;
        };
        let name = match which {
            Conditional::IfMatch => http::header::IF_MATCH,
            Conditional::IfNoneMatch => http::header::IF_NONE_MATCH,
            Conditional::IfModifiedSince => http::header::IF_MODIFIED_SINCE,
            Conditional::IfUnmodifiedSince => http::header::IF_UNMODIFIED_SINCE,
            Conditional::IfRange => http::header::IF_RANGE,
            Conditional::Range => http::header::RANGE,
        };
        headers.append(name, v);
    }
    let v = Validators {
        etag: format!("\"{}\"", input.etag.replace('"', "")),
        modified: input
            .mtime
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(s))),
    };
    let p = preconditions(&headers, &v);
    if headers.is_empty() {
        assert_eq!(p, Precondition::Proceed);
    }
    let _ = if_range_allows(&input.if_range, &v);
    // The file's own validators always satisfy If-Range.
    assert!(if_range_allows(&v.etag, &v), "own ETag refused by If-Range");
    if let Some(m) = v.modified {
        assert!(if_range_allows(&httpdate::fmt_http_date(m), &v));
    }

    for disp in ["inline", "attachment"] {
        let cd = content_disposition(disp, &input.disposition_name);
        let hv = HeaderValue::from_str(&cd)
            .unwrap_or_else(|e| panic!("Content-Disposition {cd:?} is no header value: {e}"));
        let text = hv.to_str().expect("ASCII");
        assert_eq!(
            disposition_filename(text),
            input.disposition_name,
            "Content-Disposition does not carry the name"
        );
    }
    let _ = type_from_extension(&input.disposition_name);
    let _ = sniff(&input.head);
}
