//! Says what is wrong with a request head hyper rejected: the first byte or field that
//! breaks HTTP/1.1 syntax (as httparse reads it) or one of hyper's framing rules, in a
//! sentence that names the line, the field and the byte.

/// hyper's limit on the request target (`u16::MAX - 1`); longer is `414`.
pub const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// What a rejected head says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// The first problem, for the client; `None` when none of the checks finds one.
    pub message: Option<String>,
    /// The request target, when the request line got that far (it picks the shape of
    /// the error body: Connect JSON on RPC paths).
    pub target: Option<String>,
}

/// Finds the first problem in `head` (a request head, possibly cut short).
pub fn diagnose(head: &[u8]) -> Diagnosis {
    let mut d = Diagnoser { head, target: None };
    let message = d.run();
    Diagnosis {
        message,
        target: d.target,
    }
}

/// The message for a status hyper chose when the head itself gives no better one.
pub fn generic(status: u16) -> String {
    match status {
        414 => format!("the request target is longer than {MAX_URI_LEN} bytes"),
        431 => format!(
            "the request head is too large: at most {} header fields and about 400 KiB of \
             request line and headers are accepted",
            super::request::MAX_HEADERS
        ),
        _ => "the request line or a header field is not valid HTTP/1.1".to_string(),
    }
}

/// `chunked` is the last transfer coding (hyper's rule for requests).
pub(crate) fn is_chunked_last(value: &[u8]) -> bool {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// A Content-Length value as hyper reads it: decimal digits only, no sign, no list.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// RFC 9110 token characters (httparse's header-name and method set).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// httparse's request-target set: visible ASCII and obs-text.
fn is_uri_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// httparse's header-value set: HTAB, SP, visible ASCII, obs-text.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80
}

/// At most 80 bytes of `s`, escaped, quoted.
fn show(s: &[u8]) -> String {
    const MAX: usize = 80;
    if s.len() > MAX {
        format!("\"{}…\"", s[..MAX].escape_ascii())
    } else {
        format!("\"{}\"", s.escape_ascii())
    }
}

fn byte(b: u8) -> String {
    match b {
        0x20..=0x7e => format!("{:?} (0x{b:02x})", b as char),
        _ => format!("0x{b:02x}"),
    }
}

/// A header field: name and value (trimmed).
type Field<'a> = (&'a [u8], &'a [u8]);

struct Diagnoser<'a> {
    head: &'a [u8],
    target: Option<String>,
}

/// A line of the head: its bytes without the line ending, and whether it was cut off.
struct Line<'a> {
    bytes: &'a [u8],
    complete: bool,
}

impl<'a> Diagnoser<'a> {
    fn run(&mut self) -> Option<String> {
        let mut rest = self.head;
        // httparse skips empty lines before the request line.
        loop {
            if let Some(r) = rest.strip_prefix(b"\r\n") {
                rest = r;
            } else if let Some(r) = rest.strip_prefix(b"\n") {
                rest = r;
            } else {
                break;
            }
        }
        if rest.first() == Some(&b'\r') && rest.len() > 1 {
            return Some("an empty line before the request line ends in a bare CR".into());
        }
        if rest.len() >= 3 && rest[0] == 0x16 && rest[1] == 0x03 {
            return Some(
                "the request is a TLS handshake, but this port speaks plain HTTP \
                 (HTTP/1.1, or h2c with prior knowledge): use http://, not https://"
                    .into(),
            );
        }
        let (line, after) = next_line(rest);
        let version = match self.request_line(&line) {
            Ok(v) => v,
            Err(m) => return Some(m),
        };
        let fields = match self.header_fields(after) {
            Ok(f) => f,
            Err(m) => return Some(m),
        };
        self.semantics(version?, &fields?)
    }

    /// Checks the request line; `Ok(Some(minor version))` when it is complete. The
    /// first offending byte is reported: the part before a bare CR is checked first.
    fn request_line(&mut self, line: &Line<'_>) -> Result<Option<u8>, String> {
        let (before_cr, cr) = split_bare_cr(line);
        let version = self.request_line_until_cr(&before_cr)?;
        if let Some(pos) = cr {
            return Err(format!(
                "the request line {} contains a bare CR at byte {pos}: lines end with CRLF",
                show(line.bytes)
            ));
        }
        Ok(version)
    }

    fn request_line_until_cr(&mut self, line: &Line<'_>) -> Result<Option<u8>, String> {
        let l = line.bytes;
        let method_len = l.iter().take_while(|&&b| is_tchar(b)).count();
        if method_len == l.len() {
            if line.complete {
                return Err(format!(
                    "the request line {} is not `METHOD TARGET HTTP/1.1`",
                    show(l)
                ));
            }
            return Ok(None);
        }
        let b = l[method_len];
        if method_len == 0 {
            return Err(format!(
                "the request does not start with a method: the first byte of the request line \
                 {} is {}",
                show(l),
                byte(b)
            ));
        }
        if b != b' ' {
            return Err(format!(
                "invalid byte {} in the method {} of the request line {}: a method is a token \
                 followed by one space",
                byte(b),
                show(&l[..=method_len]),
                show(l)
            ));
        }
        let rest = &l[method_len + 1..];
        let target_len = rest.iter().take_while(|&&b| is_uri_byte(b)).count();
        if target_len == 0 {
            return Err(match rest.first() {
                Some(b' ') => format!(
                    "the request line {} has more than one space after the method",
                    show(l)
                ),
                Some(&b) => format!(
                    "invalid byte {} at the start of the request target in {}",
                    byte(b),
                    show(l)
                ),
                None if line.complete => {
                    format!("the request line {} has no request target", show(l))
                }
                None => return Ok(None),
            });
        }
        let target = &rest[..target_len];
        self.target = Some(String::from_utf8_lossy(target).into_owned());
        let rest = &rest[target_len..];
        match rest.first() {
            None if line.complete => {
                return Err(format!(
                    "the request line {} has no HTTP version: expected `METHOD TARGET \
                     HTTP/1.1`",
                    show(l)
                ));
            }
            None => return Ok(None),
            Some(b' ') => {}
            Some(&b) => {
                return Err(format!(
                    "invalid byte {} in the request target {}: control characters, DEL and \
                     spaces must be percent-encoded",
                    byte(b),
                    show(&l[method_len + 1..method_len + 1 + target_len + 1])
                ));
            }
        }
        let version = &rest[1..];
        match version {
            b"HTTP/1.1" => return Ok(line.complete.then_some(1)),
            b"HTTP/1.0" => return Ok(line.complete.then_some(0)),
            _ => {}
        }
        if !line.complete && b"HTTP/1.1".starts_with(version) {
            return Ok(None);
        }
        // Text after the target that is not a version: a space inside the target.
        let looks_like_version = |v: &[u8]| {
            v.starts_with(b"HTTP/")
                || (!line.complete && !v.is_empty() && b"HTTP/1.1".starts_with(v))
        };
        if version.contains(&b' ') || (!line.complete && !looks_like_version(version)) {
            let last_space = l.iter().rposition(|&b| b == b' ').unwrap_or(l.len());
            let last = &l[last_space + 1..];
            if looks_like_version(last) || (!line.complete && last.is_empty()) {
                let spaced = &l[method_len + 1..last_space];
                return Err(format!(
                    "the request target {} contains a raw space: spaces in the path or query \
                     must be percent-encoded as %20",
                    show(spaced)
                ));
            }
            if !line.complete {
                return Err(format!(
                    "the request line {} continues after the request target {} with {}, which \
                     does not begin the HTTP version `HTTP/1.1`: a space in the target must be \
                     percent-encoded as %20",
                    show(l),
                    show(target),
                    show(version)
                ));
            }
            let parts = l.split(|&b| b == b' ').count();
            return Err(format!(
                "the request line {} has {parts} space-separated parts instead of 3 \
                 (`METHOD TARGET HTTP/1.1`)",
                show(l)
            ));
        }
        if version.starts_with(b"HTTP/") {
            return Err(format!(
                "unsupported HTTP version {} in the request line: this port speaks HTTP/1.0, \
                 HTTP/1.1 and h2c (with prior knowledge)",
                show(version)
            ));
        }
        Err(format!(
            "invalid HTTP version {} in the request line {}: expected HTTP/1.1",
            show(version),
            show(l)
        ))
    }

    /// Checks each header line; `Ok(Some(fields))` when the head is complete.
    fn header_fields(&self, mut rest: &'a [u8]) -> Result<Option<Vec<Field<'a>>>, String> {
        let mut fields = Vec::new();
        let mut n = 1;
        loop {
            if rest.is_empty() {
                return Ok(None);
            }
            n += 1;
            let (line, after) = next_line(rest);
            rest = after;
            if line.bytes.is_empty() && line.complete {
                return Ok(Some(fields));
            }
            let (before_cr, cr) = split_bare_cr(&line);
            let field = header_line(n, &before_cr)?;
            if let Some(pos) = cr {
                return Err(format!(
                    "line {n} of the request head {} contains a bare CR at byte {pos}: lines \
                     end with CRLF",
                    show(line.bytes)
                ));
            }
            let Some(field) = field else {
                return Ok(None);
            };
            fields.push(field);
            if fields.len() > super::request::MAX_HEADERS {
                return Err(format!(
                    "the request has more than {} header fields",
                    super::request::MAX_HEADERS
                ));
            }
        }
    }

    /// hyper's checks after a syntactically valid head.
    fn semantics(&self, version: u8, fields: &[Field<'_>]) -> Option<String> {
        let target = self.target.as_deref().unwrap_or_default();
        if target.len() > MAX_URI_LEN {
            return Some(generic(414));
        }
        if let Err(e) = http::Uri::try_from(target) {
            return Some(format!(
                "invalid request target {}: {e}",
                show(target.as_bytes())
            ));
        }
        let mut content_length: Option<(u64, &[u8])> = None;
        let mut te = None;
        for &(name, value) in fields {
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                if version == 0 {
                    return Some(
                        "Transfer-Encoding is not allowed in an HTTP/1.0 request".to_string(),
                    );
                }
                te = Some(value);
            } else if name.eq_ignore_ascii_case(b"content-length") && te.is_none() {
                let Some(n) = content_length_of(value) else {
                    return Some(format!(
                        "invalid Content-Length {}: expected one decimal number of bytes",
                        show(value)
                    ));
                };
                if let Some((prev, prev_raw)) = content_length
                    && prev != n
                {
                    return Some(format!(
                        "conflicting Content-Length headers {} and {}: a request has one \
                         body length",
                        show(prev_raw),
                        show(value)
                    ));
                }
                content_length = Some((n, value));
            }
        }
        if let Some(v) = te
            && !is_chunked_last(v)
        {
            return Some(format!(
                "unsupported Transfer-Encoding {}: chunked must be the last transfer coding \
                 of a request",
                show(v)
            ));
        }
        None
    }
}

/// One header line: `Ok(Some((name, value)))` when complete and valid, `Ok(None)`
/// when cut short without a problem so far.
fn header_line<'a>(n: usize, line: &Line<'a>) -> Result<Option<Field<'a>>, String> {
    let l = line.bytes;
    if matches!(l.first(), Some(b' ' | b'\t')) {
        return Err(format!(
            "line {n} of the request head {} starts with whitespace: obsolete line folding \
             is not accepted",
            show(l)
        ));
    }
    let name_len = l.iter().take_while(|&&b| is_tchar(b)).count();
    let name = &l[..name_len];
    match l.get(name_len) {
        None if !line.complete => return Ok(None),
        None => {
            return Err(format!(
                "line {n} of the request head {} has no colon: a header field is `Name: value`",
                show(l)
            ));
        }
        Some(b':') if name_len == 0 => {
            return Err(format!(
                "line {n} of the request head {} has an empty header name",
                show(l)
            ));
        }
        Some(b':') => {}
        Some(&b) => {
            let hint = if b == b' ' || b == b'\t' {
                ": no whitespace is allowed in a header name or before its colon"
            } else if !l.contains(&b':') {
                ": the line has no colon either"
            } else {
                ""
            };
            return Err(format!(
                "invalid byte {} in the header name {} (line {n} of the request head){hint}",
                byte(b),
                show(&l[..=name_len]),
            ));
        }
    }
    let value = &l[name_len + 1..];
    if let Some(pos) = value.iter().position(|&b| !is_value_byte(b)) {
        return Err(format!(
            "invalid byte {} in the value of header {} (line {n} of the request head): control \
             characters other than tab are not allowed in header values",
            byte(value[pos]),
            show(name),
        ));
    }
    if !line.complete {
        return Ok(None);
    }
    Ok(Some((name, trim_ows(value))))
}

/// The part of `line` before its first bare CR, as a line cut short there, and the
/// CR's position. A CR that ends a line cut short may be followed by its LF: it is
/// only dropped.
fn split_bare_cr<'a>(line: &Line<'a>) -> (Line<'a>, Option<usize>) {
    let l = line.bytes;
    match l.iter().position(|&b| b == b'\r') {
        Some(pos) if !line.complete && pos + 1 == l.len() => (
            Line {
                bytes: &l[..pos],
                complete: false,
            },
            None,
        ),
        Some(pos) => (
            Line {
                bytes: &l[..pos],
                complete: false,
            },
            Some(pos),
        ),
        None => (
            Line {
                bytes: l,
                complete: line.complete,
            },
            None,
        ),
    }
}

fn content_length_of(value: &[u8]) -> Option<u64> {
    content_length(value)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The next line (without `\n` / `\r\n`) and what follows it.
fn next_line(buf: &[u8]) -> (Line<'_>, &[u8]) {
    match memchr::memchr(b'\n', buf) {
        Some(i) => {
            let bytes = buf[..i].strip_suffix(b"\r").unwrap_or(&buf[..i]);
            (
                Line {
                    bytes,
                    complete: true,
                },
                &buf[i + 1..],
            )
        }
        None => (
            Line {
                bytes: buf,
                complete: false,
            },
            &[],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(head: &[u8]) -> String {
        diagnose(head)
            .message
            .unwrap_or_else(|| panic!("no problem found in {}", head.escape_ascii()))
    }

    #[test]
    fn names_the_problem() {
        let cases: &[(&[u8], &str)] = &[
            (b"junk junk junk\r\n\r\n", "invalid HTTP version \"junk\""),
            (b"\x16\x03\x01\x02\x00\x01\x00", "TLS handshake"),
            (
                b"GET /files?path=a b HTTP/1.1\r\nHost: x\r\n\r\n",
                "\"/files?path=a b\" contains a raw space",
            ),
            // hyper-util reads 24 bytes first and hyper rejects them at once.
            (
                b"GET /files?path=a b HTTP",
                "\"/files?path=a b\" contains a raw space",
            ),
            (
                b"GET /files?path=a b c HT",
                "\"/files?path=a b c\" contains a raw space",
            ),
            (
                b"GET /files?path=abcdef b",
                "continues after the request target",
            ),
            (b"GET /a b c d\r\n\r\n", "has 5 space-separated parts"),
            (
                b"GET / HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
                "invalid byte 0x01 in the value of header \"X-A\"",
            ),
            (
                b"GET / HTTP/1.1\r\nIf-None-Match: \"a\x7f\"\r\n\r\n",
                "invalid byte 0x7f in the value of header \"If-None-Match\"",
            ),
            (
                b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
                "invalid byte ' ' (0x20) in the header name \"Ho \"",
            ),
            (
                b"GET / HTTP/1.1\r\nX\xffY: z\r\n\r\n",
                "invalid byte 0xff in the header name",
            ),
            (b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", "has no colon"),
            (
                b"GET / HTTP/1.1\r\n folded\r\n\r\n",
                "obsolete line folding",
            ),
            (
                b"GET / HTTP/2.0\r\n\r\n",
                "unsupported HTTP version \"HTTP/2.0\"",
            ),
            (
                b"G(T / HTTP/1.1\r\n\r\n",
                "invalid byte '(' (0x28) in the method",
            ),
            (b"\x00\x01\x02", "does not start with a method"),
            (
                b"GET /\x01 HTTP/1.1\r\n\r\n",
                "invalid byte 0x01 in the request target",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting Content-Length headers \"1\" and \"2\"",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length \"-1\"",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                "unsupported Transfer-Encoding \"gzip\"",
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "not allowed in an HTTP/1.0 request",
            ),
            (
                b"GET http://[::1 HTTP/1.1\r\n\r\n",
                "invalid request target",
            ),
            (b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", "bare CR"),
            (
                b"GET /x\r HTTP/1.1\r\n\r\n",
                "the request line \"GET /x\\r HTTP/1.1\" contains a bare CR",
            ),
            (b"\xa4\xa5\r\xfc", "does not start with a method"),
            (
                b"GET / HTTP/1.1\r\nA\x01: b\rc\r\n\r\n",
                "invalid byte 0x01 in the header name",
            ),
        ];
        for (head, want) in cases {
            let m = msg(head);
            assert!(m.contains(want), "{}: {m}", head.escape_ascii());
        }
    }

    #[test]
    fn partial_heads_are_judged_on_what_is_there() {
        assert!(msg(b"GET / HTTP/1.1\r\nX: \x02").contains("0x02"));
        assert!(diagnose(b"GET / HTTP/1.1\r\nX: fine").message.is_none());
        assert!(diagnose(b"GET / HT").message.is_none());
        assert!(diagnose(b"GE").message.is_none());
        // A CR that ends a cut-short line may be followed by its LF.
        assert!(diagnose(b"GET / HTTP/1.1\r").message.is_none());
        assert!(msg(b"DELETE /envs ? HTTP/1.1\r").contains("\"/envs ?\" contains a raw space"));
    }

    #[test]
    fn valid_heads_have_no_problem() {
        assert!(
            diagnose(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
                .message
                .is_none()
        );
        assert!(
            diagnose(b"\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
                .message
                .is_none()
        );
    }

    #[test]
    fn target_is_reported() {
        let d = diagnose(b"POST /process.Process/Start HTTP/1.1\r\nX: \x01\r\n\r\n");
        assert_eq!(d.target.as_deref(), Some("/process.Process/Start"));
        let d = diagnose(b"GET /files?path=a b HTTP/1.1\r\n\r\n");
        assert_eq!(d.target.as_deref(), Some("/files?path=a"));
        // A head cut short: no problem found, but the target is known.
        let d = diagnose(b"GET /process.Process/List?aaaaaaaa");
        assert_eq!(d.message, None);
        assert_eq!(d.target.as_deref(), Some("/process.Process/List?aaaaaaaa"));
    }

    #[test]
    fn too_many_fields() {
        let mut h = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            h.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        assert!(msg(&h).contains("more than 100 header fields"));
    }
}
