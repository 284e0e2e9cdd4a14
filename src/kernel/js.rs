//! JavaScript/TypeScript cells on Deno's kernel (D17, D40): what LLM-written code
//! expects from Node, bridged before the code reaches the kernel.
//!
//! * Bare npm imports (`import axios from "axios"`, `export * from "x"`, `import("x")`)
//!   become `npm:` specifiers, which Deno fetches from the npm registry on first use.
//!   Node built-ins (`fs`, `node:fs`), relative and absolute paths, and URLs with a
//!   scheme (`npm:`, `jsr:`, `https:`) stay as written.
//! * `require("lodash")` works: the kernel gets a global `require` at start
//!   ([`PRELUDE`]); packages a cell requires by literal name are loaded (from the
//!   registry, asynchronously) by a call put in front of the cell's first line, so the
//!   synchronous `require` finds them.
//! * Deno's kernel answers some failures that happen before a cell runs (a syntax
//!   error, an import that cannot be loaded) with `Error: Execution failed` and nothing
//!   else; [`diagnostic_code`] builds the code that loads the same cell as a module, in
//!   which Deno reports the reason as an exception, without running the cell.
//!
//! Specifiers are found with a small tokenizer that knows strings, template literals,
//! comments and regular expression literals, so text inside them is never rewritten.

use base64::Engine;

/// Run once at kernel start in JavaScript/TypeScript contexts: defines `require`
/// (CommonJS-style loading of Node built-ins, of files and `node_modules` under the
/// current directory, and of the npm packages preloaded for the cell) and the preload
/// function the rewritten cells call.
pub const PRELUDE: &str = r#"{
  const { createRequire } = await import("node:module");
  const loaded = new Map();
  Object.defineProperty(globalThis, "__guestd_preload", {
    configurable: true,
    value: async (specs) => {
      for (const spec of specs) {
        if (loaded.has(spec)) continue;
        // A computed specifier is loaded when this line runs: a failure is an
        // exception naming the package and the reason.
        loaded.set(spec, await import(String(spec)));
      }
    },
  });
  const exportsOf = (ns) => ("default" in ns && ns.default !== undefined ? ns.default : ns);
  Object.defineProperty(globalThis, "require", {
    configurable: true,
    writable: true,
    value: function require(id) {
      id = String(id);
      const ns = loaded.get(id) ?? loaded.get("npm:" + id);
      if (ns !== undefined) return exportsOf(ns);
      return createRequire(Deno.cwd() + "/")(id);
    },
  });
}"#;

/// The global function rewritten cells call to preload required packages.
const PRELOAD_FN: &str = "globalThis.__guestd_preload";

/// Node's built-in modules, importable without `node:` (first path segment).
const NODE_BUILTINS: &[&str] = &[
    "assert",
    "async_hooks",
    "buffer",
    "child_process",
    "cluster",
    "console",
    "constants",
    "crypto",
    "dgram",
    "diagnostics_channel",
    "dns",
    "domain",
    "events",
    "fs",
    "http",
    "http2",
    "https",
    "inspector",
    "module",
    "net",
    "os",
    "path",
    "perf_hooks",
    "process",
    "punycode",
    "querystring",
    "readline",
    "repl",
    "stream",
    "string_decoder",
    "sys",
    "timers",
    "tls",
    "trace_events",
    "tty",
    "url",
    "util",
    "v8",
    "vm",
    "wasi",
    "worker_threads",
    "zlib",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ident,
    Num,
    /// A string literal; `start..end` covers the quotes.
    Str,
    Template,
    Regex,
    Punct(u8),
}

#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Words after which a `/` starts a regular expression rather than a division.
const REGEX_AFTER_WORDS: &[&str] = &[
    "return",
    "typeof",
    "instanceof",
    "in",
    "of",
    "new",
    "delete",
    "void",
    "throw",
    "case",
    "do",
    "else",
    "yield",
    "await",
];

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Splits `src` into tokens, skipping whitespace and comments.
fn tokenize(src: &str) -> Vec<Token> {
    let b = src.as_bytes();
    let mut toks: Vec<Token> = Vec::new();
    // One entry per open `{`: true when it is a template literal's `${`.
    let mut braces: Vec<bool> = Vec::new();
    let mut i = 0;
    let push = |toks: &mut Vec<Token>, kind, start, end| toks.push(Token { kind, start, end });
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = src[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
            }
            b'\'' | b'"' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != c && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                push(&mut toks, Kind::Str, start, i);
            }
            b'`' => {
                let start = i;
                i = scan_template(b, i + 1, &mut braces);
                push(&mut toks, Kind::Template, start, i);
            }
            b'}' if braces.last() == Some(&true) => {
                braces.pop();
                let start = i;
                i = scan_template(b, i + 1, &mut braces);
                push(&mut toks, Kind::Template, start, i);
            }
            b'/' if regex_allowed(src, toks.last()) => {
                let start = i;
                match scan_regex(b, i + 1) {
                    Some(end) => {
                        i = end;
                        push(&mut toks, Kind::Regex, start, i);
                    }
                    None => {
                        i += 1;
                        push(&mut toks, Kind::Punct(c), start, i);
                    }
                }
            }
            b'0'..=b'9' => {
                let start = i;
                while i < b.len() && (is_ident_char(b[i]) || b[i] == b'.') {
                    i += 1;
                }
                push(&mut toks, Kind::Num, start, i);
            }
            _ if is_ident_char(c) => {
                let start = i;
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                push(&mut toks, Kind::Ident, start, i);
            }
            _ => {
                match c {
                    b'{' => braces.push(false),
                    b'}' => {
                        braces.pop();
                    }
                    _ => {}
                }
                push(&mut toks, Kind::Punct(c), i, i + 1);
                i += 1;
            }
        }
    }
    toks
}

/// Scans template text from `i` (after a backquote or the `}` closing a
/// substitution) to the closing backquote or the next `${` (pushed on `braces`).
fn scan_template(b: &[u8], mut i: usize, braces: &mut Vec<bool>) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'`' => return i + 1,
            b'$' if b.get(i + 1) == Some(&b'{') => {
                braces.push(true);
                return i + 2;
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// Scans a regular expression body from `i` (after the `/`); `None` when the line ends
/// first (then it was a division after all).
fn scan_regex(b: &[u8], mut i: usize) -> Option<usize> {
    let mut class = false;
    while i < b.len() {
        match b[i] {
            b'\n' | b'\r' => return None,
            b'\\' => i += 1,
            b'[' => class = true,
            b']' => class = false,
            b'/' if !class => {
                i += 1;
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                return Some(i);
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn regex_allowed(src: &str, prev: Option<&Token>) -> bool {
    match prev {
        None => true,
        Some(t) => match t.kind {
            Kind::Punct(p) => !matches!(p, b')' | b']' | b'}'),
            Kind::Ident => REGEX_AFTER_WORDS.contains(&&src[t.start..t.end]),
            _ => false,
        },
    }
}

/// How a module specifier was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// `import … from`, `export … from`, `import "x"`, `import("x")`.
    Import,
    /// `require("x")`.
    Require,
}

/// A string literal used as a module specifier: its content range and use.
#[derive(Debug, Clone, Copy)]
struct Specifier {
    start: usize,
    end: usize,
    used: Use,
}

fn specifiers(src: &str, toks: &[Token]) -> Vec<Specifier> {
    let text = |t: &Token| &src[t.start..t.end];
    let is = |i: usize, k: Kind| toks.get(i).is_some_and(|t| t.kind == k);
    let after_dot = |i: usize| i > 0 && toks[i - 1].kind == Kind::Punct(b'.');
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if t.kind != Kind::Ident || after_dot(i) {
            continue;
        }
        let lit = |j: usize, used| {
            let s = &toks[j];
            (s.end - s.start >= 2).then_some(Specifier {
                start: s.start + 1,
                end: s.end - 1,
                used,
            })
        };
        let found = match text(t) {
            "import" | "from" if is(i + 1, Kind::Str) => lit(i + 1, Use::Import),
            "import" | "require"
                if is(i + 1, Kind::Punct(b'('))
                    && is(i + 2, Kind::Str)
                    && (is(i + 3, Kind::Punct(b')')) || is(i + 3, Kind::Punct(b','))) =>
            {
                let used = if text(t) == "import" {
                    Use::Import
                } else {
                    Use::Require
                };
                lit(i + 2, used)
            }
            _ => None,
        };
        out.extend(found);
    }
    out
}

/// Whether `spec` names an npm package the way Node resolves bare specifiers
/// (`pkg`, `pkg/sub/path`, `@scope/pkg`, optionally `pkg@version`), and is not a
/// Node built-in.
fn is_bare_npm(spec: &str) -> bool {
    if spec.is_empty() || spec.contains(':') || spec.starts_with(['.', '/', '#']) {
        return false;
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '_'])
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'))
    };
    let mut parts = spec.splitn(3, '/');
    let first = parts.next().unwrap_or("");
    let (name, scoped) = match first.strip_prefix('@') {
        Some(scope) => {
            if !name_ok(scope) {
                return false;
            }
            (parts.next().unwrap_or(""), true)
        }
        None => (first, false),
    };
    let (name, version) = match name.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (name, None),
    };
    if !name_ok(name) || version.is_some_and(|v| v.is_empty() || v.contains(char::is_whitespace)) {
        return false;
    }
    if !scoped && NODE_BUILTINS.contains(&name) {
        return false;
    }
    !spec.contains(|c: char| c.is_whitespace() || c == '\\')
}

/// A cell prepared for Deno's kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The code to send.
    pub code: String,
    /// Characters put in front of the first line (for error positions).
    pub prefix_len: usize,
}

/// Rewrites bare npm specifiers to `npm:` and preloads literally required packages.
pub fn prepare(code: &str) -> Prepared {
    let toks = tokenize(code);
    let mut inserts: Vec<usize> = Vec::new();
    let mut preload: Vec<String> = Vec::new();
    for s in specifiers(code, &toks) {
        let spec = &code[s.start..s.end];
        let bare = is_bare_npm(spec);
        if bare && s.used == Use::Import {
            inserts.push(s.start);
        }
        if s.used == Use::Require {
            let npm = if bare {
                Some(format!("npm:{spec}"))
            } else if spec.starts_with("npm:") && !spec.contains(char::is_whitespace) {
                Some(spec.to_string())
            } else {
                None
            };
            if let Some(n) = npm
                && !preload.contains(&n)
            {
                preload.push(n);
            }
        }
    }
    let mut out = String::with_capacity(code.len() + 8 * inserts.len() + 64);
    let mut prefix_len = 0;
    if !preload.is_empty() {
        let list = serde_json::to_string(&preload).unwrap_or_else(|_| "[]".into());
        out.push_str(&format!("await {PRELOAD_FN}({list}); "));
        prefix_len = out.len();
    }
    let mut last = 0;
    for at in inserts {
        out.push_str(&code[last..at]);
        out.push_str("npm:");
        last = at;
    }
    out.push_str(&code[last..]);
    Prepared {
        code: out,
        prefix_len,
    }
}

/// The value a diagnostic load throws when the cell parsed and every import loaded.
pub const DIAGNOSTIC_OK: &str = "__guestd_cell_loads__";

/// The module text of a diagnostic load: a first import that throws (module
/// dependencies are evaluated in order, so nothing of the cell runs), then the cell
/// with relative specifiers made absolute against `cwd` (a `data:` module has no
/// directory of its own). Returns the text and the length of the first-line prefix.
fn diagnostic_module(cell: &str, cwd: &str) -> (String, usize) {
    let stop = format!("import \"data:text/javascript,throw%20%22{DIAGNOSTIC_OK}%22\"; ");
    let toks = tokenize(cell);
    let mut out = stop.clone();
    let mut last = 0;
    for s in specifiers(cell, &toks) {
        let spec = &cell[s.start..s.end];
        if s.used == Use::Import && (spec.starts_with("./") || spec.starts_with("../")) {
            out.push_str(&cell[last..s.start]);
            out.push_str(&file_url(cwd, spec));
            last = s.end;
        }
    }
    out.push_str(&cell[last..]);
    (out, stop.len())
}

fn file_url(cwd: &str, rel: &str) -> String {
    let mut path = format!("{}/{rel}", cwd.trim_end_matches('/'));
    path = path.replace("/./", "/");
    let mut url = String::from("file://");
    for c in path.chars() {
        match c {
            ' ' => url.push_str("%20"),
            '%' => url.push_str("%25"),
            '#' => url.push_str("%23"),
            '?' => url.push_str("%3F"),
            '"' => url.push_str("%22"),
            _ => url.push(c),
        }
    }
    url
}

/// A diagnostic load of a cell that Deno's kernel rejected without a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Code for the kernel (silent): loads the cell as a module from a computed URL.
    pub code: String,
    /// The module's URL as it appears in Deno's messages.
    url: String,
    /// What stands in front of the cell's own first line in the module (the stop
    /// import and the cell's preload call).
    prefix: String,
}

/// Builds the diagnostic load for the prepared cell `cell` (see [`prepare`]), whose
/// own first line carries `cell_prefix` characters of preload call.
pub fn diagnostic_code(cell: &str, cell_prefix: usize, cwd: &str) -> Diagnostic {
    let (module, stop_len) = diagnostic_module(cell, cwd);
    let prefix = module
        .get(..stop_len + cell_prefix)
        .unwrap_or_default()
        .to_string();
    let b64 = base64::engine::general_purpose::STANDARD.encode(module.as_bytes());
    let url = format!("data:application/typescript;base64,{b64}");
    // Split so that Deno does not see a literal specifier (those are loaded before the
    // code runs, and fail without a message, which is what is being diagnosed).
    let code =
        format!("await import([\"data:application/typescript;base64,\", \"{b64}\"].join(\"\"))");
    Diagnostic { code, url, prefix }
}

/// The frame of the diagnostic's own one-line wrapper, last in Deno's stack traces.
const WRAPPER_FRAME: &str = "    at async <anonymous>:1:";

impl Diagnostic {
    /// Whether the kernel's answer to the diagnostic says that nothing failed.
    pub fn found_nothing(value: &str) -> bool {
        value.trim() == DIAGNOSTIC_OK
    }

    /// Deno's message about the diagnostic module, as if it were about the cell: the
    /// module URL becomes `<cell>`, first-line positions and the source excerpt lose
    /// the prefix, and the wrapper's own stack frame goes.
    pub fn clean(&self, text: &str) -> String {
        let located = self.relocate(text);
        let mut out: Vec<String> = Vec::new();
        let mut after_source = false;
        for line in located.split('\n') {
            if !self.prefix.is_empty() && line.contains(&self.prefix) {
                out.push(line.replacen(&self.prefix, "", 1));
                after_source = true;
                continue;
            }
            if after_source
                && let Some(bar) = line.find('|')
                && line[bar + 1..].trim_start().starts_with(['~', '^'])
            {
                let (head, marks) = line.split_at(bar + 1);
                let spaces = marks.len() - marks.trim_start().len();
                let keep = spaces.saturating_sub(self.prefix.len()).max(1);
                out.push(format!("{head}{}{}", " ".repeat(keep), marks.trim_start()));
            } else {
                out.push(line.to_string());
            }
            after_source = false;
        }
        let mut joined = out.join("\n");
        if let Some(at) = joined.rfind(WRAPPER_FRAME)
            && joined[at + WRAPPER_FRAME.len()..]
                .bytes()
                .all(|c| c.is_ascii_digit())
        {
            joined.truncate(at);
        }
        joined
    }

    /// The module URL replaced by `<cell>`, positions on line 1 moved back by the prefix.
    fn relocate(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find(&self.url) {
            out.push_str(&rest[..at]);
            out.push_str("<cell>");
            rest = &rest[at + self.url.len()..];
            if let Some(pos) = rest.strip_prefix(":1:") {
                let digits = pos.bytes().take_while(u8::is_ascii_digit).count();
                if let Ok(col) = pos[..digits].parse::<usize>() {
                    let col = col.saturating_sub(self.prefix.len()).max(1);
                    out.push_str(&format!(":1:{col}"));
                    rest = &pos[digits..];
                }
            }
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(c: &str) -> String {
        prepare(c).code
    }

    #[test]
    fn bare_imports_become_npm_specifiers() {
        assert_eq!(
            code("import axios from \"axios\"; const r = await axios.get(u)"),
            "import axios from \"npm:axios\"; const r = await axios.get(u)"
        );
        assert_eq!(
            code("import { a, b as c } from 'lodash-es'\nimport * as d3 from \"d3\""),
            "import { a, b as c } from 'npm:lodash-es'\nimport * as d3 from \"npm:d3\""
        );
        assert_eq!(code("import 'dotenv/config'"), "import 'npm:dotenv/config'");
        assert_eq!(
            code("export { x } from \"@scope/pkg/sub\""),
            "export { x } from \"npm:@scope/pkg/sub\""
        );
        assert_eq!(
            code("const m = await import(\"chalk@5\")"),
            "const m = await import(\"npm:chalk@5\")"
        );
        assert_eq!(
            code("import type { AxiosResponse } from \"axios\""),
            "import type { AxiosResponse } from \"npm:axios\""
        );
    }

    #[test]
    fn builtins_paths_urls_and_non_code_stay() {
        for c in [
            "import { readFileSync } from 'fs'",
            "import fsp from 'fs/promises'",
            "import path from \"node:path\"",
            "import x from './local.ts'",
            "import y from '/abs/y.js'",
            "import z from 'npm:zod'",
            "import j from 'jsr:@std/path'",
            "import h from 'https://deno.land/x/y.ts'",
            "const s = 'import x from \"axios\"'",
            "// import x from 'axios'\n1",
            "/* require('lodash') */ 2",
            "const t = `from ${'x'} import 'axios'`",
            "const re = /from 'axios'/g; re",
            "Array.from(\"abc\")",
            "obj.require('lodash')",
            "import x from 'Not Valid'",
        ] {
            assert_eq!(code(c), c, "{c}");
        }
    }

    #[test]
    fn template_substitutions_are_code() {
        assert_eq!(
            code("const t = `${(await import('ms')).default(1000)}`"),
            "const t = `${(await import('npm:ms')).default(1000)}`"
        );
        assert_eq!(
            code("const t = `a${ {a: 1}.a }b`; import x from 'y'"),
            "const t = `a${ {a: 1}.a }b`; import x from 'npm:y'"
        );
    }

    #[test]
    fn division_is_not_a_regex() {
        assert_eq!(
            code("const a = (4) / 2; const b = x / 2; import q from 'q'"),
            "const a = (4) / 2; const b = x / 2; import q from 'npm:q'"
        );
    }

    #[test]
    fn requires_are_preloaded_once() {
        let p = prepare(
            "const _ = require('lodash');\nconst fs = require('fs');\nrequire(\"lodash\"); require('lodash/fp')",
        );
        assert_eq!(
            p.code,
            "await globalThis.__guestd_preload([\"npm:lodash\",\"npm:lodash/fp\"]); const _ = require('lodash');\nconst fs = require('fs');\nrequire(\"lodash\"); require('lodash/fp')"
        );
        assert_eq!(p.prefix_len, p.code.find("const").unwrap());
        assert_eq!(prepare("require('./x.js')").code, "require('./x.js')");
    }

    #[test]
    fn npm_names() {
        for ok in [
            "axios",
            "lodash/fp",
            "@types/node",
            "@a/b/c/d.js",
            "x@1.2.3",
            "a.b-c_d",
        ] {
            assert!(is_bare_npm(ok), "{ok}");
        }
        for bad in [
            "",
            "fs",
            "fs/promises",
            "node:fs",
            "./a",
            "../a",
            "/a",
            "#internal",
            ".hidden",
            "_under",
            "@/x",
            "a b",
            "x@",
            "https://x",
        ] {
            assert!(!is_bare_npm(bad), "{bad}");
        }
    }

    #[test]
    fn diagnostic_module_and_cleaning() {
        let d = diagnostic_code(
            "const x: number = ;\nimport a from './a.ts'",
            0,
            "/home/user",
        );
        let b64 = d
            .url
            .trim_start_matches("data:application/typescript;base64,");
        let module = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        let module = String::from_utf8(module).expect("utf8");
        assert!(module.starts_with("import \"data:text/javascript,throw%20%22"));
        assert!(module.ends_with("const x: number = ;\nimport a from 'file:///home/user/a.ts'"));
        assert!(!d.code.contains(&d.url), "the URL must be computed");
        let msg = format!(
            "SyntaxError: Expression expected\n  |\n1 | {}const x: number = ;\n  | {}~\n    at {}:1:{}",
            d.prefix,
            " ".repeat(d.prefix.len() + 18),
            d.url,
            d.prefix.len() + 19
        );
        assert_eq!(
            d.clean(&msg),
            "SyntaxError: Expression expected\n  |\n1 | const x: number = ;\n  |                   ~\n    at <cell>:1:19"
        );
        assert_eq!(
            d.clean(&format!(
                "TypeError: x    at {}:2:5    at async <anonymous>:1:22",
                d.url
            )),
            "TypeError: x    at <cell>:2:5"
        );
        assert!(Diagnostic::found_nothing(DIAGNOSTIC_OK));
        assert!(!Diagnostic::found_nothing(&format!(
            "SyntaxError: x\n1 | {}",
            d.prefix
        )));
        assert_eq!(file_url("/a b/", "./c#.ts"), "file:///a%20b/c%23.ts");
    }
}
