//! `/execute` lines written directly into one buffer: ASCII-only JSON (every non-ASCII
//! character as `\uXXXX`, UTF-16 surrogate pairs above U+FFFF, like Python's
//! `json.dumps(ensure_ascii=True)`), compact, one object per line.
//!
//! Stream text and MIME strings can be megabytes, so strings are scanned eight bytes at
//! a time for the few bytes that need an escape (`"`, `\`, controls, non-ASCII) and
//! copied in runs; the output is byte for byte what serde_json with an ASCII-escaping
//! formatter writes (the tests compare the two), at a fraction of the cost (issue 11:
//! escaping was the largest part of guestd's time on 50 MB of output).

use serde_json::{Map, Value};

use crate::kernel::{ExecResult, Output};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Nonzero when any byte of `w` needs an escape: below 0x20, `"`, `\` or non-ASCII.
/// (Bits of bytes after a match may be wrong; only zero/nonzero is used.)
#[inline]
fn word_needs_escape(w: u64) -> u64 {
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    control
        | zero_byte(w ^ (ONES * u64::from(b'"')))
        | zero_byte(w ^ (ONES * u64::from(b'\\')))
        | (w & HIGHS)
}

#[inline]
fn byte_needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\' || b >= 0x80
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_u16_escape(out: &mut Vec<u8>, u: u16) {
    out.extend_from_slice(&[
        b'\\',
        b'u',
        HEX[usize::from(u >> 12)],
        HEX[usize::from((u >> 8) & 0xf)],
        HEX[usize::from((u >> 4) & 0xf)],
        HEX[usize::from(u & 0xf)],
    ]);
}

/// Appends `s` as an ASCII-only JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // `run` is the start of the bytes not yet copied; `i` is always at a character
    // boundary (words are skipped only when all eight bytes are plain ASCII).
    let mut run = 0;
    let mut i = 0;
    while i < bytes.len() {
        while let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if word_needs_escape(u64::from_le_bytes(w)) != 0 {
                break;
            }
            i += 8;
        }
        let Some(&b) = bytes.get(i) else { break };
        if !byte_needs_escape(b) {
            i += 1;
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        if b < 0x80 {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                _ => push_u16_escape(out, u16::from(b)),
            }
            i += 1;
        } else {
            let Some(ch) = s[i..].chars().next() else {
                break;
            };
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                push_u16_escape(out, *u);
            }
            i += ch.len_utf8();
        }
        run = i;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Appends `v` as compact ASCII-only JSON (object keys in the map's order, numbers as
/// serde_json writes them).
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            // Writing a number into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, n);
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_map(out, map),
    }
}

fn write_map(out: &mut Vec<u8>, map: &Map<String, Value>) {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_value(out, v);
    }
    out.push(b'}');
}

/// Writes `{"type":"<type>"` and then `,"key":value` pairs.
struct Line(Vec<u8>);

impl Line {
    fn new(r#type: &str, capacity: usize) -> Line {
        let mut buf = Vec::with_capacity(capacity + 48);
        buf.extend_from_slice(b"{\"type\":");
        write_str(&mut buf, r#type);
        Line(buf)
    }

    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        self.0.push(b',');
        write_str(&mut self.0, key);
        self.0.push(b':');
        &mut self.0
    }

    fn str(&mut self, key: &str, value: &str) {
        write_str(self.key(key), value);
    }

    fn opt_str(&mut self, key: &str, value: &Option<String>) {
        if let Some(v) = value {
            self.str(key, v);
        }
    }

    fn opt_value(&mut self, key: &str, value: &Option<Value>) {
        if let Some(v) = value {
            write_value(self.key(key), v);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(b"}\n");
        self.0
    }
}

fn result_line(r: &ExecResult) -> Vec<u8> {
    let len = |o: &Option<String>| o.as_ref().map_or(0, String::len);
    let capacity = len(&r.text)
        + len(&r.html)
        + len(&r.markdown)
        + len(&r.svg)
        + len(&r.png)
        + len(&r.jpeg)
        + len(&r.pdf)
        + len(&r.latex)
        + len(&r.javascript)
        + 128;
    let mut l = Line::new("result", capacity);
    l.opt_str("text", &r.text);
    l.opt_str("html", &r.html);
    l.opt_str("markdown", &r.markdown);
    l.opt_str("svg", &r.svg);
    l.opt_str("png", &r.png);
    l.opt_str("jpeg", &r.jpeg);
    l.opt_str("pdf", &r.pdf);
    l.opt_str("latex", &r.latex);
    l.opt_value("json", &r.json);
    l.opt_str("javascript", &r.javascript);
    l.opt_value("data", &r.data);
    l.opt_value("chart", &r.chart);
    write_map(l.key("extra"), &r.extra);
    l.key("is_main_result")
        .extend_from_slice(if r.is_main_result { b"true" } else { b"false" });
    l.finish()
}

/// One NDJSON line (ASCII-only JSON + `\n`) for an output.
pub fn encode_line(out: &Output) -> Vec<u8> {
    match out {
        Output::ExecutionCount(n) => {
            let mut l = Line::new("number_of_executions", 24);
            let _ = serde_json::to_writer(l.key("execution_count"), n);
            l.finish()
        }
        Output::Stdout { text, timestamp } | Output::Stderr { text, timestamp } => {
            let kind = if matches!(out, Output::Stdout { .. }) {
                "stdout"
            } else {
                "stderr"
            };
            let mut l = Line::new(kind, text.len() + timestamp.len() + 32);
            l.str("text", text);
            l.str("timestamp", timestamp);
            l.finish()
        }
        Output::Result(r) => result_line(r),
        Output::Error(e) => {
            let mut l = Line::new(
                "error",
                e.name.len() + e.value.len() + e.traceback.len() + 48,
            );
            l.str("name", &e.name);
            l.str("value", &e.value);
            l.str("traceback", &e.traceback);
            l.finish()
        }
        Output::End => Line::new("end_of_execution", 0).finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ExecError;
    use serde::Serialize;
    use serde_json::json;

    /// The previous implementation (serde_json with an ASCII-escaping formatter): the
    /// reference the direct writer must match byte for byte.
    mod reference {
        use super::*;

        #[derive(Serialize)]
        struct ResultLine<'a> {
            r#type: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            text: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            html: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            markdown: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            svg: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            png: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            jpeg: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            pdf: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            latex: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            json: Option<&'a Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            javascript: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<&'a Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            chart: Option<&'a Value>,
            extra: &'a Map<String, Value>,
            is_main_result: bool,
        }

        #[derive(Serialize)]
        struct StreamLine<'a> {
            r#type: &'static str,
            text: &'a str,
            timestamp: &'a str,
        }

        #[derive(Serialize)]
        struct ErrorLine<'a> {
            r#type: &'static str,
            name: &'a str,
            value: &'a str,
            traceback: &'a str,
        }

        #[derive(Serialize)]
        struct CountLine {
            r#type: &'static str,
            execution_count: i64,
        }

        #[derive(Serialize)]
        struct TypeLine {
            r#type: &'static str,
        }

        pub fn encode_line(out: &Output) -> Vec<u8> {
            use crate::code_interpreter::to_ascii_json;
            let mut line = match out {
                Output::ExecutionCount(n) => to_ascii_json(&CountLine {
                    r#type: "number_of_executions",
                    execution_count: *n,
                }),
                Output::Stdout { text, timestamp } => to_ascii_json(&StreamLine {
                    r#type: "stdout",
                    text,
                    timestamp,
                }),
                Output::Stderr { text, timestamp } => to_ascii_json(&StreamLine {
                    r#type: "stderr",
                    text,
                    timestamp,
                }),
                Output::Result(r) => to_ascii_json(&ResultLine {
                    r#type: "result",
                    text: r.text.as_deref(),
                    html: r.html.as_deref(),
                    markdown: r.markdown.as_deref(),
                    svg: r.svg.as_deref(),
                    png: r.png.as_deref(),
                    jpeg: r.jpeg.as_deref(),
                    pdf: r.pdf.as_deref(),
                    latex: r.latex.as_deref(),
                    json: r.json.as_ref(),
                    javascript: r.javascript.as_deref(),
                    data: r.data.as_ref(),
                    chart: r.chart.as_ref(),
                    extra: &r.extra,
                    is_main_result: r.is_main_result,
                }),
                Output::Error(e) => to_ascii_json(&ErrorLine {
                    r#type: "error",
                    name: &e.name,
                    value: &e.value,
                    traceback: &e.traceback,
                }),
                Output::End => to_ascii_json(&TypeLine {
                    r#type: "end_of_execution",
                }),
            };
            line.push(b'\n');
            line
        }
    }

    /// Deterministic pseudo-random strings over an alphabet rich in escapes: quotes,
    /// backslashes, every control character, DEL, two-, three- and four-byte UTF-8,
    /// U+2028 and plain ASCII, in runs long and short enough to cross 8-byte words.
    fn strings() -> Vec<String> {
        let alphabet: Vec<char> = (0u8..0x20)
            .map(char::from)
            .chain("\"\\/\u{7f}abcXYZ 09é\u{85}\u{2028}€😀\u{10ffff}".chars())
            .collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut out = vec![String::new(), "a".repeat(1000), "x".repeat(7) + "\""];
        for _ in 0..2000 {
            let len = (next() % 40) as usize;
            let plain = next() % 3 == 0;
            let s: String = (0..len)
                .map(|_| {
                    if plain && next() % 8 != 0 {
                        'q'
                    } else {
                        alphabet[(next() % alphabet.len() as u64) as usize]
                    }
                })
                .collect();
            out.push(s);
        }
        out
    }

    #[test]
    fn strings_match_the_serde_reference_byte_for_byte() {
        for s in strings() {
            let mut mine = Vec::new();
            write_str(&mut mine, &s);
            let theirs = crate::code_interpreter::to_ascii_json(&s);
            assert_eq!(
                String::from_utf8_lossy(&mine),
                String::from_utf8_lossy(&theirs),
                "{s:?}"
            );
            assert!(mine.is_ascii());
            let back: String = serde_json::from_slice(&mine).expect("valid JSON");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn lines_match_the_serde_reference_byte_for_byte() {
        let strings = strings();
        let value = json!({
            "b": [1, -2, 3.5, 1e300, 0.1, null, true, false, "é\"\n"],
            "a": {"x\u{0}": {}, "": []},
            "n": 18446744073709551615u64,
        });
        let mut outputs = vec![
            Output::ExecutionCount(0),
            Output::ExecutionCount(-7),
            Output::ExecutionCount(i64::MAX),
            Output::End,
            Output::Error(ExecError::aborted()),
        ];
        for (i, s) in strings.iter().enumerate().take(300) {
            let other = &strings[(i * 7 + 3) % strings.len()];
            outputs.push(Output::Stdout {
                text: s.clone(),
                timestamp: "2026-01-01T00:00:00.000000+00:00".into(),
            });
            outputs.push(Output::Stderr {
                text: s.clone(),
                timestamp: other.clone(),
            });
            outputs.push(Output::Error(ExecError {
                name: other.clone(),
                value: s.clone(),
                traceback: s.repeat(3),
            }));
            let mut extra = Map::new();
            extra.insert(s.clone(), json!(other));
            extra.insert("application/x".into(), value.clone());
            outputs.push(Output::Result(Box::new(ExecResult {
                text: Some(s.clone()),
                html: (i % 2 == 0).then(|| other.clone()),
                markdown: (i % 3 == 0).then(|| s.clone()),
                svg: (i % 5 == 0).then(|| s.clone()),
                png: (i % 2 == 1).then(|| "iVBORw0KGgo=".repeat(i)),
                jpeg: (i % 7 == 0).then(|| s.clone()),
                pdf: (i % 11 == 0).then(|| s.clone()),
                latex: (i % 13 == 0).then(|| s.clone()),
                json: (i % 2 == 0).then(|| value.clone()),
                javascript: (i % 17 == 0).then(|| s.clone()),
                data: (i % 3 == 1).then(|| json!({ s.clone(): [other.clone()] })),
                chart: (i % 4 == 1).then(|| value.clone()),
                extra,
                is_main_result: i % 2 == 0,
            })));
        }
        for o in &outputs {
            let mine = encode_line(o);
            let theirs = reference::encode_line(o);
            assert_eq!(
                String::from_utf8_lossy(&mine),
                String::from_utf8_lossy(&theirs)
            );
        }
    }

    #[test]
    fn ascii_escapes_including_surrogates_and_line_separators() {
        let mut s = Vec::new();
        write_str(&mut s, "é\u{2028}\u{85}😀\n\"x\u{7f}");
        assert_eq!(
            std::str::from_utf8(&s).expect("utf8"),
            "\"\\u00e9\\u2028\\u0085\\ud83d\\ude00\\n\\\"x\u{7f}\""
        );
    }

    #[test]
    fn line_shapes() {
        let line = |o: Output| {
            let raw = encode_line(&o);
            assert_eq!(raw.last(), Some(&b'\n'));
            assert_eq!(raw.iter().filter(|b| **b == b'\n').count(), 1);
            serde_json::from_slice::<Value>(&raw).expect("json")
        };
        assert_eq!(
            line(Output::ExecutionCount(2)),
            json!({"type": "number_of_executions", "execution_count": 2})
        );
        assert_eq!(
            line(Output::Stdout {
                text: "a\n".into(),
                timestamp: "t".into()
            }),
            json!({"type": "stdout", "text": "a\n", "timestamp": "t"})
        );
        assert_eq!(
            line(Output::Error(ExecError::aborted())),
            json!({"type": "error", "name": "ExecutionAborted", "value": "Execution was aborted", "traceback": ""})
        );
        let r = ExecResult {
            text: Some("2".into()),
            json: Some(json!([1])),
            is_main_result: true,
            ..ExecResult::default()
        };
        assert_eq!(
            line(Output::Result(Box::new(r))),
            json!({"type": "result", "text": "2", "json": [1], "extra": {}, "is_main_result": true})
        );
        assert_eq!(line(Output::End), json!({"type": "end_of_execution"}));
    }
}
