//! `code_interpreter::ndjson::write_str`, the word-at-a-time ASCII JSON string writer of
//! `/execute` lines (D72), against a one-character-at-a-time reference written here
//! from the rules of Python's `json.dumps(ensure_ascii=True)`: the bytes must be equal,
//! all ASCII, and parse back (serde_json) to the same string. Inputs are arbitrary
//! bytes made valid UTF-8 (lossily), so every escape class and every alignment of an
//! escape within an eight-byte word is reached.

use guestd::code_interpreter::ndjson::write_str;

fn reference(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x80 => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{:04x}", u).as_bytes());
                }
            }
            c => out.push(c as u8),
        }
    }
    out.push(b'"');
    out
}

pub fn run(data: &[u8]) {
    // The first byte shifts the string within the output buffer (alignment).
    let (pad, rest) = match data.split_first() {
        Some((p, r)) => (usize::from(*p % 8), r),
        None => (0, data),
    };
    let s = String::from_utf8_lossy(rest);
    let mut out = vec![b' '; pad];
    write_str(&mut out, &s);
    let written = &out[pad..];
    assert!(written.is_ascii(), "non-ASCII output for {s:?}");
    assert_eq!(
        written,
        reference(&s).as_slice(),
        "escape mismatch for {s:?}"
    );
    let back: String = serde_json::from_slice(written).expect("output parses as a JSON string");
    assert_eq!(back, s);
}
