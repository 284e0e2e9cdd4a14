//! The code-interpreter port (`code_interpreter::handler`) with a kernel manager that
//! has no kernelspecs (nothing is ever launched): routing with percent-decoded
//! segments, CORS preflight, and the `/execute` and `/contexts` bodies (structured
//! JSON or raw bytes). Every error has a body; the only 5xx is "no kernel". Then the
//! per-language environment code (`kernel::lang`): a value set through bash or Python
//! setup code reads back exactly.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use serde_json::{Value, json};

use guestd::code_interpreter::handler;
use guestd::env::GlobalEnv;
use guestd::kernel::lang::{EnvOp, env_code, normalize, validate_env};
use guestd::kernel::{KernelManager, KernelOptions, LanguageMap, SpecResolver};
use guestd::server::Handler;

use crate::http::{exchange, header_safe};

#[derive(Arbitrary, Debug)]
enum EnvValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    List(Vec<String>),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Execute {
        code: Option<String>,
        context_id: Option<String>,
        language: Option<String>,
        env_vars: Option<Vec<(String, EnvValue)>>,
    },
    Context {
        language: Option<String>,
        cwd: Option<String>,
    },
    Raw(Vec<u8>),
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Post,
    Delete,
    Options,
    Put,
}

#[derive(Arbitrary, Debug)]
enum Target {
    Execute,
    Contexts,
    Context(String),
    Restart(String),
    Health,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: Method,
    target: Target,
    preflight_headers: Option<(Vec<u8>, Vec<u8>)>,
    body: Body,
    lang: String,
    env: Vec<(String, String)>,
}

fn manager_handler() -> Handler {
    static H: OnceLock<Handler> = OnceLock::new();
    H.get_or_init(|| {
        let empty = crate::scratch_dir("kernelspecs");
        let opts = KernelOptions {
            resolver: SpecResolver {
                dirs: vec![empty],
                languages: LanguageMap::default(),
            },
            default_cwd: "/home/user".to_string(),
            interrupt_restart: Duration::from_secs(10),
            cgroups: None,
        };
        handler(Arc::new(KernelManager::new(
            opts,
            GlobalEnv::new(BTreeMap::new()),
        )))
    })
    .clone()
}

fn env_json(v: &EnvValue) -> Value {
    match v {
        EnvValue::Str(s) => json!(s),
        EnvValue::Int(i) => json!(i),
        EnvValue::Float(f) => json!(f),
        EnvValue::Bool(b) => json!(b),
        EnvValue::Null => Value::Null,
        EnvValue::List(l) => json!(l),
    }
}

fn pct(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `'…'` words of a bash `export K=<word>` line, unquoted the way bash does.
fn bash_word(w: &str) -> String {
    let mut out = String::new();
    let mut rest = w;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('\'') {
            let end = r.find('\'').expect("unterminated single quote");
            out.push_str(&r[..end]);
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("\\'") {
            out.push('\'');
            rest = r;
        } else {
            panic!("unquoted text in a bash word: {w:?}");
        }
    }
    out
}

fn check_env_code(lang: &str, env: &[(String, String)]) {
    let language = normalize(Some(lang));
    let valid = validate_env(&language, env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).is_ok();
    if !valid {
        return;
    }
    let ops: Vec<EnvOp> = env
        .iter()
        .map(|(k, v)| EnvOp::Set(k.clone(), v.clone()))
        .collect();
    let Some(code) = env_code(&language, &ops) else {
        return;
    };
    match language.as_str() {
        "bash" => {
            let lines: Vec<&str> = code.split('\n').collect();
            // Values may hold newlines inside their quotes: re-join by reading words.
            let joined = lines.join("\n");
            let mut rest = joined.as_str();
            for (k, v) in env {
                let prefix = format!("export {k}=");
                rest = rest.strip_prefix(&prefix).expect("export line");
                // The word runs to the next newline outside quotes.
                let mut in_q = false;
                let mut end = rest.len();
                for (i, c) in rest.char_indices() {
                    match c {
                        '\'' => in_q = !in_q,
                        '\n' if !in_q => {
                            end = i;
                            break;
                        }
                        _ => {}
                    }
                }
                assert_eq!(&bash_word(&rest[..end]), v, "bash export of {k:?}");
                rest = rest[end..].strip_prefix('\n').unwrap_or("");
            }
            assert!(rest.is_empty(), "trailing bash code: {rest:?}");
        }
        "python" => {
            let lines: Vec<&str> = code.split('\n').collect();
            assert_eq!(lines.first(), Some(&"import os as __guestd_os"));
            assert_eq!(lines.last(), Some(&"del __guestd_os"));
            assert_eq!(lines.len(), env.len() + 2, "one line per variable");
            for (line, (k, v)) in lines[1..lines.len() - 1].iter().zip(env) {
                let rest = line
                    .strip_prefix("__guestd_os.environ[")
                    .expect("environ assignment");
                let mut de = serde_json::Deserializer::from_str(rest).into_iter::<String>();
                let key = de
                    .next()
                    .expect("key literal")
                    .expect("key is a JSON string");
                let after = &rest[de.byte_offset()..];
                let value: String =
                    serde_json::from_str(after.strip_prefix("] = ").expect("assignment"))
                        .expect("value is a JSON string");
                assert_eq!((&key, &value), (k, v), "python assignment");
            }
        }
        _ => {}
    }
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    check_env_code(&input.lang, &input.env);

    let method = match input.method {
        Method::Get => "GET",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Options => "OPTIONS",
        Method::Put => "PUT",
    };
    let target = match &input.target {
        Target::Execute => "/execute".to_string(),
        Target::Contexts => "/contexts".to_string(),
        Target::Context(id) => format!("/contexts/{}", pct(id)),
        Target::Restart(id) => format!("/contexts/{}/restart", pct(id)),
        Target::Health => "/health".to_string(),
        Target::Raw(r) => {
            let t = String::from_utf8_lossy(r)
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .collect::<String>();
            format!("/{t}")
        }
    };
    let body: Vec<u8> = match &input.body {
        Body::Execute {
            code,
            context_id,
            language,
            env_vars,
        } => {
            let mut o = serde_json::Map::new();
            if let Some(c) = code {
                o.insert("code".into(), json!(c));
            }
            if let Some(c) = context_id {
                o.insert("context_id".into(), json!(c));
            }
            if let Some(l) = language {
                o.insert("language".into(), json!(l));
            }
            if let Some(e) = env_vars {
                let m: serde_json::Map<String, Value> =
                    e.iter().map(|(k, v)| (k.clone(), env_json(v))).collect();
                o.insert("env_vars".into(), Value::Object(m));
            }
            serde_json::to_vec(&o).expect("json")
        }
        Body::Context { language, cwd } => {
            serde_json::to_vec(&json!({ "language": language, "cwd": cwd })).expect("json")
        }
        Body::Raw(r) => r.clone(),
        Body::Empty => Vec::new(),
    };
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    if let Some((m, h)) = &input.preflight_headers {
        for (name, v) in [
            ("Access-Control-Request-Method", m),
            ("Access-Control-Request-Headers", h),
        ] {
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(&header_safe(v));
            req.extend_from_slice(b"\r\n");
        }
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(&body);
    let h = manager_handler();
    let Some(resp) = exchange(req, move |r| h.call(r)) else {
        return;
    };
    if resp.status == 400 && resp.header("content-type").is_none() && resp.body.is_empty() {
        return; // hyper refused the request line or a header
    }
    if resp.status >= 500 {
        // The only server-side failure possible without kernelspecs.
        let text = String::from_utf8_lossy(&resp.body);
        assert!(
            text.starts_with("Failed to create context: no kernel is installed"),
            "server error {}: {text:?}",
            resp.status
        );
    }
    if resp.status >= 400 {
        assert!(
            !resp.body.is_empty(),
            "error {} without a body",
            resp.status
        );
    }
}
