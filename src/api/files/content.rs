//! Pure HTTP helpers of `GET /files`: content type, `Content-Disposition`,
//! `Accept-Encoding` negotiation, `Range` and conditional requests (RFC 9110).

use std::time::SystemTime;

/// Content type by file extension (case-insensitive); `None` when unknown.
pub fn type_from_extension(path: &str) -> Option<&'static str> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let (_, ext) = name.rsplit_once('.')?;
    let ext = ext.to_ascii_lowercase();
    Some(match ext.as_str() {
        "txt" | "text" | "log" | "conf" | "cfg" | "ini" => "text/plain; charset=utf-8",
        "md" | "markdown" => "text/markdown; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "tsv" => "text/tab-separated-values; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" | "cjs" => "text/javascript; charset=utf-8",
        "ts" => "text/x-typescript; charset=utf-8",
        "py" => "text/x-python; charset=utf-8",
        "sh" => "text/x-shellscript; charset=utf-8",
        "rs" => "text/x-rust; charset=utf-8",
        "go" => "text/x-go; charset=utf-8",
        "c" | "h" => "text/x-c; charset=utf-8",
        "cpp" | "cc" | "hpp" => "text/x-c++; charset=utf-8",
        "java" => "text/x-java; charset=utf-8",
        "xml" => "text/xml; charset=utf-8",
        "svg" => "image/svg+xml",
        "json" => "application/json",
        "jsonl" | "ndjson" => "application/x-ndjson",
        "yaml" | "yml" => "application/yaml",
        "toml" => "application/toml",
        "ipynb" => "application/x-ipynb+json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "bz2" => "application/x-bzip2",
        "xz" => "application/x-xz",
        "zst" => "application/zstd",
        "7z" => "application/x-7z-compressed",
        "wasm" => "application/wasm",
        "bin" | "exe" | "so" | "o" => "application/octet-stream",
        "parquet" => "application/vnd.apache.parquet",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "ico" => "image/x-icon",
        "tif" | "tiff" => "image/tiff",
        "avif" => "image/avif",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "flac" => "audio/flac",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "avi" => "video/x-msvideo",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        _ => return None,
    })
}

/// Content type from the first bytes of a file (a small subset of the WHATWG sniffing
/// rules): well-known magic numbers, HTML/XML, text, else `application/octet-stream`.
pub fn sniff(head: &[u8]) -> &'static str {
    const MAGIC: &[(&[u8], &str)] = &[
        (b"%PDF-", "application/pdf"),
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"PK\x03\x04", "application/zip"),
        (b"\x1f\x8b\x08", "application/x-gzip"),
        (b"\x00asm", "application/wasm"),
    ];
    for (magic, t) in MAGIC {
        if head.starts_with(magic) {
            return t;
        }
    }
    let trimmed = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&head[..0], |i| &head[i..]);
    let starts_ci =
        |p: &[u8]| trimmed.len() >= p.len() && trimmed[..p.len()].eq_ignore_ascii_case(p);
    if starts_ci(b"<!doctype html") || starts_ci(b"<html") {
        return "text/html; charset=utf-8";
    }
    if starts_ci(b"<?xml") {
        return "text/xml; charset=utf-8";
    }
    let binary = head
        .iter()
        .any(|&b| matches!(b, 0x00..=0x08 | 0x0b | 0x0e..=0x1a | 0x1c..=0x1f));
    if binary {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    }
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b)
}

/// `<disposition>; filename=<name>` as Go's `mime.FormatMediaType` writes it: a bare
/// token, a quoted string for other printable ASCII, RFC 2231 `filename*=utf-8''…`
/// for anything else (non-ASCII, control characters).
pub fn content_disposition(disposition: &str, name: &str) -> String {
    let bytes = name.as_bytes();
    if !bytes.is_empty() && bytes.iter().all(|&b| is_token_char(b)) {
        return format!("{disposition}; filename={name}");
    }
    if bytes.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        let mut quoted = String::with_capacity(name.len() + 2);
        for c in name.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        return format!("{disposition}; filename=\"{quoted}\"");
    }
    let mut enc = String::with_capacity(name.len() * 3);
    for &b in bytes {
        if is_token_char(b) && b != b'*' && b != b'\'' && b != b'%' {
            enc.push(char::from(b));
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{disposition}; filename*=utf-8''{enc}")
}

/// What `Accept-Encoding` allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accepted {
    /// Identity is acceptable (not refused by `identity;q=0`, or `*;q=0` without an
    /// identity entry).
    pub identity: bool,
    /// gzip is acceptable and preferred over identity.
    pub prefer_gzip: bool,
    /// gzip is acceptable at all.
    pub gzip: bool,
}

/// Parses `Accept-Encoding` (every header line). Absent or empty → identity only.
/// Choice by q-value; gzip wins ties against identity; `*` stands for gzip and identity
/// when they are not listed, but prefers identity.
pub fn accept_encoding<'a>(values: impl Iterator<Item = &'a str>) -> Accepted {
    let mut gzip_q: Option<f32> = None;
    let mut identity_q: Option<f32> = None;
    let mut star_q: Option<f32> = None;
    for value in values {
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if coding.is_empty() {
                continue;
            }
            let mut q = 1.0f32;
            for p in parts {
                if let Some((k, v)) = p.split_once('=')
                    && k.trim().eq_ignore_ascii_case("q")
                {
                    q = v.trim().parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0);
                }
            }
            let slot = match coding.as_str() {
                "gzip" | "x-gzip" => &mut gzip_q,
                "identity" => &mut identity_q,
                "*" => &mut star_q,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(q);
            }
        }
    }
    // identity: explicit q, else `*`'s q, else acceptable (implicitly, lowest preference).
    let identity_q_eff = identity_q.or(star_q);
    let identity = identity_q_eff.is_none_or(|q| q > 0.0);
    let gzip_q_eff = gzip_q.or_else(|| {
        // `*` offers gzip only when identity is refused (prefer identity otherwise).
        star_q.filter(|&q| q > 0.0 && !identity)
    });
    let gzip = gzip_q_eff.is_some_and(|q| q > 0.0);
    let prefer_gzip = gzip
        && match (gzip_q_eff, identity_q) {
            (Some(g), Some(i)) => g >= i,
            _ => true,
        };
    Accepted {
        identity,
        prefer_gzip,
        gzip,
    }
}

/// The outcome of a `Range` header against a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Serve the whole file (no range, several ranges, or a syntactically invalid one:
    /// RFC 9110 lets the server ignore those).
    Full,
    /// Serve `len` bytes from `start` (206).
    Partial { start: u64, len: u64 },
    /// 416 with `Content-Range: bytes */<size>`.
    Unsatisfiable,
}

/// Evaluates one `Range` header value.
pub fn parse_range(value: &str, size: u64) -> RangeOutcome {
    let value = value.trim();
    let Some((unit, specs)) = value.split_once('=') else {
        return RangeOutcome::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeOutcome::Full;
    }
    let specs: Vec<&str> = specs
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if specs.len() != 1 {
        return RangeOutcome::Full;
    }
    let Some((a, b)) = specs[0].split_once('-') else {
        return RangeOutcome::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if a.is_empty() {
        // Suffix: the last n bytes.
        let Some(n) = num(b) else {
            return RangeOutcome::Full;
        };
        if n == 0 || size == 0 {
            return RangeOutcome::Unsatisfiable;
        }
        let len = n.min(size);
        return RangeOutcome::Partial {
            start: size - len,
            len,
        };
    }
    let Some(start) = num(a) else {
        return RangeOutcome::Full;
    };
    let end = if b.is_empty() {
        None
    } else {
        match num(b) {
            Some(e) if e >= start => Some(e),
            _ => return RangeOutcome::Full,
        }
    };
    if start >= size {
        return RangeOutcome::Unsatisfiable;
    }
    let last = end.map_or(size - 1, |e| e.min(size - 1));
    RangeOutcome::Partial {
        start,
        len: last - start + 1,
    }
}

/// The validators of a file: strong ETag and modification time (whole seconds).
#[derive(Debug, Clone)]
pub struct Validators {
    pub etag: String,
    pub modified: Option<SystemTime>,
}

impl Validators {
    fn modified_secs(&self) -> Option<u64> {
        self.modified
            .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }
}

/// The result of the preconditions (RFC 9110 §13.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Go on (maybe with a range).
    Proceed,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

fn etag_list_matches(list: &str, etag: &str, weak: bool) -> bool {
    let strip = |t: &str| t.trim().strip_prefix("W/").unwrap_or(t.trim()).to_string();
    list.split(',').map(str::trim).any(|t| {
        if t == "*" {
            return true;
        }
        if weak {
            strip(t) == strip(etag)
        } else {
            !t.starts_with("W/") && t == etag
        }
    })
}

fn http_date_secs(v: &str) -> Option<u64> {
    httpdate::parse_http_date(v.trim())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

/// Evaluates `If-Match`, `If-Unmodified-Since`, `If-None-Match` and `If-Modified-Since`
/// for a GET of an existing file.
pub fn preconditions(headers: &http::HeaderMap, v: &Validators) -> Precondition {
    let get = |name: http::header::HeaderName| {
        let all: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .collect();
        if all.is_empty() {
            None
        } else {
            Some(all.join(","))
        }
    };
    let mtime = v.modified_secs();
    if let Some(im) = get(http::header::IF_MATCH) {
        if !etag_list_matches(&im, &v.etag, false) {
            return Precondition::Failed;
        }
    } else if let Some(ius) = get(http::header::IF_UNMODIFIED_SINCE)
        && let (Some(date), Some(m)) = (http_date_secs(&ius), mtime)
        && m > date
    {
        return Precondition::Failed;
    }
    if let Some(inm) = get(http::header::IF_NONE_MATCH) {
        if etag_list_matches(&inm, &v.etag, true) {
            return Precondition::NotModified;
        }
    } else if let Some(ims) = get(http::header::IF_MODIFIED_SINCE)
        && let (Some(date), Some(m)) = (http_date_secs(&ims), mtime)
        && m <= date
    {
        return Precondition::NotModified;
    }
    Precondition::Proceed
}

/// `If-Range`: the range applies only when the validator matches exactly (a strong ETag,
/// or the exact `Last-Modified` date).
pub fn if_range_allows(value: &str, v: &Validators) -> bool {
    let value = value.trim();
    if value.starts_with('"') {
        return value == v.etag;
    }
    if value.starts_with("W/") {
        return false;
    }
    matches!((http_date_secs(value), v.modified_secs()), (Some(d), Some(m)) if d == m)
}

/// True when the request carries headers that only identity responses honour.
pub fn has_range_or_conditional(headers: &http::HeaderMap) -> bool {
    use http::header::*;
    [
        RANGE,
        IF_MATCH,
        IF_NONE_MATCH,
        IF_MODIFIED_SINCE,
        IF_UNMODIFIED_SINCE,
        IF_RANGE,
    ]
    .iter()
    .any(|h| headers.contains_key(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(v: &str) -> Accepted {
        accept_encoding(std::iter::once(v))
    }

    #[test]
    fn accept_encoding_rules() {
        let a = accept_encoding(std::iter::empty());
        assert!(a.identity && !a.gzip);
        let a = acc("gzip, deflate");
        assert!(a.identity && a.gzip && a.prefer_gzip);
        let a = acc("identity");
        assert!(a.identity && !a.gzip);
        let a = acc("gzip;q=0.5, identity");
        assert!(a.identity && a.gzip && !a.prefer_gzip);
        let a = acc("gzip;q=0");
        assert!(a.identity && !a.gzip);
        let a = acc("*");
        assert!(a.identity && !a.prefer_gzip);
        // Identity refused, gzip not offered: nothing acceptable (406).
        let a = acc("identity;q=0");
        assert!(!a.identity && !a.gzip);
        let a = acc("*;q=0");
        assert!(!a.identity && !a.gzip);
        let a = acc("br, *;q=0");
        assert!(!a.identity && !a.gzip);
        // `*` with identity refused stands for gzip.
        let a = acc("*, identity;q=0");
        assert!(!a.identity && a.gzip && a.prefer_gzip);
        let a = acc("gzip, identity;q=0");
        assert!(!a.identity && a.gzip);
        let a = acc("GZIP;Q=0.8, Identity;q=0.9");
        assert!(a.gzip && !a.prefer_gzip);
    }

    #[test]
    fn ranges() {
        use RangeOutcome::*;
        assert_eq!(parse_range("bytes=0-4", 10), Partial { start: 0, len: 5 });
        assert_eq!(parse_range("bytes=5-", 10), Partial { start: 5, len: 5 });
        assert_eq!(parse_range("bytes=-3", 10), Partial { start: 7, len: 3 });
        assert_eq!(parse_range("bytes=-30", 10), Partial { start: 0, len: 10 });
        assert_eq!(parse_range("bytes=8-100", 10), Partial { start: 8, len: 2 });
        assert_eq!(parse_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 10), Full);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Full);
        assert_eq!(parse_range("items=0-1", 10), Full);
        assert_eq!(parse_range("bytes=x-1", 10), Full);
    }

    #[test]
    fn dispositions() {
        assert_eq!(
            content_disposition("inline", "a.txt"),
            "inline; filename=a.txt"
        );
        assert_eq!(
            content_disposition("inline", "a b\"c.txt"),
            "inline; filename=\"a b\\\"c.txt\""
        );
        assert_eq!(
            content_disposition("inline", "naïve €.txt"),
            "inline; filename*=utf-8''na%C3%AFve%20%E2%82%AC.txt"
        );
        assert_eq!(
            content_disposition("attachment", "x\ny"),
            "attachment; filename*=utf-8''x%0Ay"
        );
    }

    #[test]
    fn types() {
        assert_eq!(
            type_from_extension("/a/b/Report.JSON"),
            Some("application/json")
        );
        assert_eq!(type_from_extension("/a/b.c/noext"), None);
        assert_eq!(sniff(b"hello\n"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b""), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nxxxx"), "image/png");
        assert_eq!(sniff(b"\x00\x01\x02"), "application/octet-stream");
        assert_eq!(sniff(b"  <!DOCTYPE html><p>"), "text/html; charset=utf-8");
    }

    #[test]
    fn conditionals() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let v = Validators {
            etag: "\"abc\"".into(),
            modified: Some(t),
        };
        let date = httpdate::fmt_http_date(t);
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, val) in pairs {
                m.append(*k, http::HeaderValue::from_str(val).expect("value"));
            }
            m
        };
        assert_eq!(preconditions(&h(&[]), &v), Precondition::Proceed);
        assert_eq!(
            preconditions(&h(&[("if-none-match", "\"abc\"")]), &v),
            Precondition::NotModified
        );
        assert_eq!(
            preconditions(&h(&[("if-none-match", "W/\"abc\", \"x\"")]), &v),
            Precondition::NotModified
        );
        assert_eq!(
            preconditions(&h(&[("if-none-match", "\"other\"")]), &v),
            Precondition::Proceed
        );
        assert_eq!(
            preconditions(&h(&[("if-modified-since", &date)]), &v),
            Precondition::NotModified
        );
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(
            preconditions(
                &h(&[("if-none-match", "\"other\""), ("if-modified-since", &date)]),
                &v
            ),
            Precondition::Proceed
        );
        assert_eq!(
            preconditions(&h(&[("if-match", "\"nope\"")]), &v),
            Precondition::Failed
        );
        assert_eq!(
            preconditions(&h(&[("if-match", "*")]), &v),
            Precondition::Proceed
        );
        let earlier = httpdate::fmt_http_date(t - std::time::Duration::from_secs(10));
        assert_eq!(
            preconditions(&h(&[("if-unmodified-since", &earlier)]), &v),
            Precondition::Failed
        );
        assert!(if_range_allows("\"abc\"", &v));
        assert!(!if_range_allows("W/\"abc\"", &v));
        assert!(if_range_allows(&date, &v));
        assert!(!if_range_allows(&earlier, &v));
    }
}
