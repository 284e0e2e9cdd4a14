//! `POST /init` (`init::Initializer::init`) with every write pointed into a scratch
//! directory and a fake clock: the JSON body (`serde` into `InitRequest`), the RFC 3339
//! `timestamp`, `hyperloopIP`, env vars, the CA bundle, and the trust anchor read from a
//! fuzzer-written kernel command line and trust file (`parse_hex32`). Volume mounts are
//! dropped (they run `mount`). The token afterwards is the one the request set.

use std::collections::BTreeMap;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use chrono::{DateTime, Utc};

use guestd::env::GlobalEnv;
use guestd::init::{AccessToken, Clock, InitError, InitPaths, InitRequest, Initializer};

#[derive(Arbitrary, Debug)]
struct Input {
    cmdline: Option<Vec<u8>>,
    trust_file: Option<Vec<u8>>,
    preset_token: Option<String>,
    /// The body: JSON built by the harness from fields, or raw bytes.
    body: Body,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    Fields {
        access_token: Option<String>,
        env_vars: Option<Vec<(String, String)>>,
        default_user: Option<String>,
        default_workdir: Option<String>,
        timestamp: Option<String>,
        ca_bundle: Option<String>,
        hyperloop_ip: Option<String>,
        sandbox_id: Option<String>,
    },
}

struct FakeClock;

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }
    fn set(&self, _to: DateTime<Utc>) -> std::io::Result<()> {
        Err(std::io::Error::other("the fuzz clock cannot be set"))
    }
}

pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let body = match &input.body {
        Body::Raw(r) => r.clone(),
        Body::Fields {
            access_token,
            env_vars,
            default_user,
            default_workdir,
            timestamp,
            ca_bundle,
            hyperloop_ip,
            sandbox_id,
        } => serde_json::to_vec(&serde_json::json!({
            "accessToken": access_token,
            "envVars": env_vars.as_ref().map(|v| v.iter().cloned().collect::<BTreeMap<_, _>>()),
            "defaultUser": default_user,
            "defaultWorkdir": default_workdir,
            "timestamp": timestamp,
            "caBundle": ca_bundle,
            "hyperloopIP": hyperloop_ip,
            "sandboxID": sandbox_id,
        }))
        .expect("json"),
    };
    // As `api::control::init` does: blank → defaults, else JSON.
    let mut request: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        }
    };
    request.volume_mounts = None;

    let dir = crate::scratch_dir("init");
    let cmdline = dir.join("cmdline");
    let trust = dir.join("trust");
    let _ = std::fs::remove_file(&cmdline);
    let _ = std::fs::remove_file(&trust);
    if let Some(c) = &input.cmdline {
        std::fs::write(&cmdline, c).expect("write cmdline");
    }
    if let Some(t) = &input.trust_file {
        std::fs::write(&trust, t).expect("write trust file");
    }
    let paths = InitPaths {
        ca_bundle: dir.join("ca/bundle.crt"),
        ca_copy: dir.join("ca-copy/e2b-ca.crt"),
        hosts: dir.join("hosts"),
        run_dir: dir.join("run"),
        kernel_cmdline: cmdline,
        trust_file: Some(trust),
    };
    let token = Arc::new(AccessToken::default());
    if let Some(t) = input.preset_token.as_ref().filter(|t| !t.is_empty()) {
        token.set(t.clone());
    }
    let init = Initializer::new(
        token.clone(),
        GlobalEnv::new(BTreeMap::new()),
        paths,
        Box::new(FakeClock),
    );
    let anchor = init.trust_anchor();
    if let Some(a) = anchor {
        // Only 64 hex digits make an anchor.
        assert_eq!(a.len(), 32);
    }
    let wanted = request.access_token.clone();
    match crate::http::block_on(init.init(request)) {
        Ok(applied) => {
            assert!(applied.fresh, "the first /init is never a stale retry");
            match wanted.as_deref() {
                Some(t) if !t.is_empty() => assert_eq!(token.get().as_deref(), Some(t)),
                _ => assert!(!token.is_set(), "an /init without a token leaves one set"),
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if let InitError::Unauthorized = e {
                assert!(token.is_set() || anchor.is_some(), "first boot refused");
            }
        }
    }
}
