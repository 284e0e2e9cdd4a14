//! The control-plane surface: `/init`, the access token on every route, `/envs`,
//! `/metrics`, port forwarding, version reporting, and the agent surviving its users.

#![allow(clippy::disallowed_methods)] // tests run helper commands directly

mod common;

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use common::cgroup::{TestCgroup, count_leaf_members};
use common::{Codec, Guestd, envelope};
use guestd::proto::process as pb;
use http::{Method, StatusCode};

async fn init(
    c: &common::Client,
    body: serde_json::Value,
) -> (StatusCode, http::HeaderMap, String) {
    let (st, h, b) = c
        .fetch(
            Method::POST,
            "/init",
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await;
    (st, h, String::from_utf8_lossy(&b).into_owned())
}

const UNAUTHORIZED: &str = r#"{"code":401,"message":"unauthorized access, please provide a valid access token or method signing if supported"}"#;

/// One request of the table: method, path, content type, body.
struct Call {
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

fn calls() -> Vec<Call> {
    let json = |m: Method, path: &'static str, body: &str| Call {
        method: m,
        path,
        content_type: Some("application/json"),
        body: body.as_bytes().to_vec(),
    };
    let stream = |path: &'static str, body: &str| Call {
        method: Method::POST,
        path,
        content_type: Some("application/connect+json"),
        body: envelope(0, body.as_bytes()).to_vec(),
    };
    vec![
        json(Method::GET, "/metrics", ""),
        json(Method::GET, "/envs", ""),
        json(Method::POST, "/files/compose", "{}"),
        json(Method::GET, "/no/such/route", ""),
        json(Method::POST, "/process.Process/List", "{}"),
        json(
            Method::POST,
            "/process.Process/SendInput",
            r#"{"process":{"pid":1}}"#,
        ),
        json(
            Method::POST,
            "/process.Process/SendSignal",
            r#"{"process":{"pid":999999},"signal":"SIGNAL_SIGTERM"}"#,
        ),
        json(
            Method::POST,
            "/process.Process/CloseStdin",
            r#"{"process":{"pid":999999}}"#,
        ),
        json(
            Method::POST,
            "/process.Process/Update",
            r#"{"process":{"pid":999999}}"#,
        ),
        stream(
            "/process.Process/Start",
            r#"{"process":{"cmd":"/bin/true"},"stdin":false}"#,
        ),
        stream("/process.Process/Connect", r#"{"process":{"pid":999999}}"#),
        stream("/process.Process/StreamInput", r#"{"keepalive":{}}"#),
        json(
            Method::POST,
            "/filesystem.Filesystem/Stat",
            r#"{"path":"/"}"#,
        ),
        json(
            Method::POST,
            "/filesystem.Filesystem/MakeDir",
            r#"{"path":"/tmp/guestd-token-test"}"#,
        ),
        json(
            Method::POST,
            "/filesystem.Filesystem/Move",
            r#"{"source":"/nope","destination":"/nope2"}"#,
        ),
        json(
            Method::POST,
            "/filesystem.Filesystem/ListDir",
            r#"{"path":"/"}"#,
        ),
        json(
            Method::POST,
            "/filesystem.Filesystem/Remove",
            r#"{"path":"/tmp/guestd-token-test"}"#,
        ),
        json(
            Method::POST,
            "/filesystem.Filesystem/CreateWatcher",
            r#"{"path":"/tmp"}"#,
        ),
        json(
            Method::POST,
            "/filesystem.Filesystem/GetWatcherEvents",
            r#"{"watcherId":"nope"}"#,
        ),
        json(
            Method::POST,
            "/filesystem.Filesystem/RemoveWatcher",
            r#"{"watcherId":"nope"}"#,
        ),
        stream("/filesystem.Filesystem/WatchDir", r#"{"path":"/tmp"}"#),
    ]
}

async fn send(c: &common::Client, call: &Call, token: Option<&str>) -> (StatusCode, Vec<u8>) {
    let mut headers = Vec::new();
    if let Some(ct) = call.content_type {
        headers.push(("content-type", ct));
    }
    if let Some(t) = token {
        headers.push(("x-access-token", t));
    }
    // Streams answer 200 and may run on; read with a bound.
    let resp = c
        .send(call.method.clone(), call.path, &headers, call.body.clone())
        .await;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        use http_body_util::BodyExt as _;
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                out.extend_from_slice(&d);
            }
            if out.len() > 64 {
                break;
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn every_route_and_rpc_needs_the_token_once_set() {
    let g = Guestd::start();
    let c = g.client();
    // Before /init: open.
    for call in calls() {
        let (st, _) = send(&c, &call, None).await;
        assert_ne!(
            st,
            StatusCode::UNAUTHORIZED,
            "{} before any token",
            call.path
        );
    }
    let (st, h, _) = init(&c, serde_json::json!({"accessToken": "s3cret"})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(h["x-envd-version"], "0.6.13");
    for call in calls() {
        for token in [None, Some("wrong"), Some("S3CRET"), Some("s3cret2")] {
            let (st, body) = send(&c, &call, token).await;
            assert_eq!(
                st,
                StatusCode::UNAUTHORIZED,
                "{} {} with {token:?}",
                call.method,
                call.path
            );
            assert_eq!(
                String::from_utf8_lossy(&body),
                UNAUTHORIZED,
                "{}",
                call.path
            );
        }
        let (st, _) = send(&c, &call, Some("s3cret")).await;
        assert_ne!(
            st,
            StatusCode::UNAUTHORIZED,
            "{} {} with the right token",
            call.method,
            call.path
        );
    }
    // /health never needs it.
    let (st, _, _) = c.fetch(Method::GET, "/health", &[], "").await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    // A CORS preflight is answered before auth.
    let (st, h, _) = c
        .fetch(
            Method::OPTIONS,
            "/process.Process/List",
            &[
                ("origin", "https://x.example"),
                (
                    "access-control-request-headers",
                    "x-access-token,content-type",
                ),
            ],
            "",
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(
        h["access-control-allow-headers"],
        "x-access-token,content-type"
    );
    assert_eq!(h["access-control-max-age"], "7200");
}

#[tokio::test]
async fn init_is_idempotent_and_locked_by_its_token() {
    let g = Guestd::start();
    let c = g.client();
    let body =
        serde_json::json!({"accessToken": "t1", "envVars": {"A": "1"}, "timestamp": chrono_now()});
    for _ in 0..2 {
        let (st, h, _) = init(&c, body.clone()).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["x-envd-version"], "0.6.13");
    }
    // A guest process cannot take over with another token (no host anchor here).
    let (st, h, text) = init(&c, serde_json::json!({"accessToken": "evil"})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(h["x-envd-version"], "0.6.13");
    assert!(text.contains("unauthorized"), "{text}");
    // Malformed JSON is a 400 naming the problem.
    let (st, _, text) = c
        .fetch(
            Method::POST,
            "/init",
            &[("content-type", "application/json")],
            "{\"accessToken\": ",
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&text).contains("invalid /init JSON"));
    // Wrong method (with the token: the token check runs before routing).
    let (st, _, _) = c
        .fetch(Method::GET, "/init", &[("x-access-token", "t1")], "")
        .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn init_with_a_host_trust_anchor_rotates_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("anchor");
    let g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--init-trust-file",
        anchor.to_str().unwrap(),
    ]);
    let c = g.client();
    use sha2::Digest as _;
    let hex = |s: &str| -> String {
        sha2::Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    std::fs::write(&anchor, hex("first")).unwrap();
    // With an anchor published, even the first /init must match it.
    assert_eq!(
        init(&c, serde_json::json!({"accessToken": "guess"}))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        init(&c, serde_json::json!({"accessToken": "first"}))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    std::fs::write(&anchor, hex("second")).unwrap();
    assert_eq!(
        init(&c, serde_json::json!({"accessToken": "second"}))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (st, _, _) = c
        .fetch(Method::GET, "/envs", &[("x-access-token", "first")], "")
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = c
        .fetch(Method::GET, "/envs", &[("x-access-token", "second")], "")
        .await;
    assert_eq!(st, StatusCode::OK);
}

fn chrono_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    // RFC 3339 via the `date` tool keeps the test free of a date library.
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", now.as_secs()),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn run_env(
    c: &common::Client,
    envs: &[(&str, &str)],
) -> std::collections::BTreeMap<String, String> {
    let req = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/usr/bin/env".into(),
            args: vec![],
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    let mut s = c
        .server_stream(Codec::Json, "/process.Process/Start", &req, &[])
        .await;
    let mut out = Vec::new();
    while let Ok(m) = s.next_message::<pb::StartResponse>().await {
        if let Some(pb::process_event::Event::Data(d)) = m.event.and_then(|e| e.event)
            && let Some(pb::process_event::data_event::Output::Stdout(b)) = d.output
        {
            out.extend_from_slice(&b);
        }
    }
    String::from_utf8(out)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn init_env_vars_layer_under_request_envs_and_over_nothing_else() {
    let g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--isnotfc",
    ]);
    let c = g.client();
    let (st, _, _) = init(
        &c,
        serde_json::json!({"envVars": {"GLOBAL": "g", "SHARED": "from-init", "E2B_SANDBOX": "hijack"}}),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let env = run_env(&c, &[("SHARED", "from-request")]).await;
    assert_eq!(env["GLOBAL"], "g");
    assert_eq!(env["SHARED"], "from-request", "request envs override /init");
    assert_eq!(
        env["E2B_SANDBOX"], "false",
        "internal variables cannot be replaced (dev mode: false)"
    );
    let (st, h, body) = c.fetch(Method::GET, "/envs", &[], "").await;
    assert_eq!(
        (st, h["cache-control"].to_str().unwrap()),
        (StatusCode::OK, "no-store")
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"E2B_SANDBOX": "false", "GLOBAL": "g", "SHARED": "from-init"})
    );
    // Replace semantics: a later /init drops keys it does not name.
    init(&c, serde_json::json!({"envVars": {"ONLY": "1"}})).await;
    let env = run_env(&c, &[]).await;
    assert!(!env.contains_key("GLOBAL"));
    assert_eq!(env["ONLY"], "1");
}

#[tokio::test]
async fn metrics_json_and_prometheus() {
    let g = Guestd::start();
    let c = g.client();
    let (st, h, body) = c.fetch(Method::GET, "/metrics", &[], "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["cache-control"], "no-store");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let obj = v.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "cpu_count",
            "cpu_used_pct",
            "disk_total",
            "disk_used",
            "mem_cache",
            "mem_total",
            "mem_total_mib",
            "mem_used",
            "mem_used_mib",
            "ts"
        ]
    );
    for k in [
        "ts",
        "cpu_count",
        "mem_total",
        "mem_used",
        "mem_cache",
        "mem_total_mib",
        "mem_used_mib",
        "disk_total",
        "disk_used",
    ] {
        assert!(obj[k].is_u64(), "{k} is an integer: {}", obj[k]);
    }
    assert!(obj["cpu_used_pct"].is_f64() || obj["cpu_used_pct"].is_u64());
    assert!(obj["mem_used"].as_u64() <= obj["mem_total"].as_u64());
    assert_eq!(
        obj["mem_total_mib"].as_u64().unwrap(),
        obj["mem_total"].as_u64().unwrap() >> 20
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now - obj["ts"].as_u64().unwrap() <= 10,
        "the sample is recent"
    );

    for (path, headers) in [
        ("/metrics?format=prometheus", vec![]),
        (
            "/metrics",
            vec![("accept", "text/plain;version=0.0.4;q=0.9,*/*;q=0.1")],
        ),
    ] {
        let (st, h, body) = c.fetch(Method::GET, path, &headers, "").await;
        assert_eq!(st, StatusCode::OK);
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        let text = String::from_utf8(body.to_vec()).unwrap();
        for name in [
            "guestd_process_resident_memory_bytes",
            "guestd_processes",
            "guestd_watchers",
            "guestd_connections",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
            let value: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!(value >= 0.0);
        }
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("guestd_process_resident_memory_bytes "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(rss > 1e6, "guestd's RSS is reported in bytes: {rss}");
        let conns: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("guestd_connections "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(conns >= 1.0, "this very connection counts");
    }
}

#[tokio::test]
async fn loopback_listeners_are_forwarded_to_external_addresses() {
    let _serial = FORWARDING.lock().await;
    let ext = guestd::portfwd::external_addresses()
        .into_iter()
        .find(|a| a.is_ipv4())
        .expect("this test needs a non-loopback IPv4 address (eth0)");
    // A "user service" listening on loopback only.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in service.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).unwrap_or(0);
            let _ =
                conn.write_all(format!("echo:{}", String::from_utf8_lossy(&buf[..n])).as_bytes());
        }
    });
    // Forwarding is on by default.
    let _g = Guestd::start_forwarding(&["--default-user", "root", "--no-code-interpreter"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(ext, port),
            Duration::from_millis(500),
        ) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"ping").unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if !out.is_empty() {
                break out;
            }
        }
        assert!(
            Instant::now() < deadline,
            "nothing forwarded {ext}:{port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(reply, "echo:ping");
}

/// Forwarding is machine-wide: the tests that turn it on or check that it is off must
/// not overlap (tests of one binary run in parallel).
static FORWARDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn port_forwarding_can_be_turned_off() {
    let _serial = FORWARDING.lock().await;
    let ext = guestd::portfwd::external_addresses()
        .into_iter()
        .find(|a| a.is_ipv4())
        .expect("eth0");
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let _g = Guestd::start_with(&["--default-user", "root", "--no-code-interpreter"]);
    tokio::time::sleep(Duration::from_millis(2500)).await; // more than two scan intervals
    assert!(
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(ext, port),
            Duration::from_millis(500)
        )
        .is_err()
    );
    drop(service);
}

// ------------------------------------------------------------------------------
// The agent survives its users.

/// A cgroup (in every hierarchy guestd would use) that this test owns and removes.
/// NDJSON lines of one `/execute`.
async fn execute_lines(c: &common::Client, code: &str) -> Vec<serde_json::Value> {
    let (st, _, body) = c
        .fetch(
            Method::POST,
            "/execute",
            &[("content-type", "application/json")],
            serde_json::json!({ "code": code }).to_string(),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("NDJSON"))
        .collect()
}

#[tokio::test]
async fn a_memory_hog_in_a_kernel_is_confined_to_the_user_cgroup() {
    if !std::path::Path::new("/opt/guestd/python/bin/python").exists() {
        assert!(
            std::env::var_os("GUESTD_REQUIRE_ALL_KERNELS").is_none(),
            "kernels are not installed"
        );
        eprintln!("SKIP: kernels not installed (packaging/kernels/install.sh)");
        return;
    }
    let cg = TestCgroup::create();
    let mut g = Guestd::start_with(&[
        "--default-user",
        "root",
        "--cgroup-root",
        &cg.rel,
        "--user-memory-max",
        "536870912",
    ]);
    let code = common::Client::new(&format!("http://127.0.0.1:{}", g.code_port));
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", g.code_port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "kernel bridge not ready: {}",
            g.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        count_leaf_members(&cg) >= 1,
        "the default kernels run in leaves of the user group"
    );
    let lines = execute_lines(
        &code,
        "x = []\nwhile True:\n    x.append(bytearray(16 << 20))",
    )
    .await;
    let err = lines
        .iter()
        .find(|l| l["type"] == "error")
        .expect("an error line");
    assert_eq!(err["name"], "ContextRestarting", "{lines:?}");
    assert!(g.is_alive());
    let (st, _, _) = g.client().fetch(Method::GET, "/health", &[], "").await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    // The context comes back (restarted kernel) and runs code again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = execute_lines(&code, "1 + 1").await;
        if lines
            .iter()
            .any(|l| l["type"] == "result" && l["text"] == "2")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "context did not recover: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// TCP listeners of the machine as (port, socket inode), from `/proc/net/tcp{,6}`
/// (parsed here, independently of guestd's parser).
fn tcp_listeners() -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let port = u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap();
            out.push((port, f[9].parse().unwrap()));
        }
    }
    out
}

/// Inodes of the sockets a process holds open.
fn socket_inodes(pid: u32) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        if let Ok(target) = std::fs::read_link(e.path())
            && let Some(n) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            out.insert(n.parse().unwrap());
        }
    }
    out
}

/// Children of `parent` (pid, command line).
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid: u32 = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    out
}

/// Ports that `pid` listens on.
fn listening_ports(pid: u32) -> Vec<u16> {
    let mine = socket_inodes(pid);
    tcp_listeners()
        .into_iter()
        .filter(|(_, inode)| mine.contains(inode))
        .map(|(port, _)| port)
        .collect()
}

/// Connects to `addr` until it answers (true) or `within` passed (false).
async fn reachable_within(addr: std::net::SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The boundary of port forwarding (issue 8): every socket a kernel or guestd itself
/// listens on stays private, including listeners a kernel opens for itself that are in
/// no connection file (ipykernel's IOPub pipe for forked subprocesses); servers the
/// user starts later are forwarded, whether they run in a process of their own started
/// from a cell or in the kernel process itself (a thread of the Python kernel, a
/// `Deno.serve` of the JavaScript kernel).
#[tokio::test]
async fn kernel_sockets_are_never_forwarded() {
    let _serial = FORWARDING.lock().await;
    if !std::path::Path::new("/opt/guestd/python/bin/python").exists() {
        assert!(
            std::env::var_os("GUESTD_REQUIRE_ALL_KERNELS").is_none(),
            "kernels are not installed"
        );
        eprintln!("SKIP: kernels not installed (packaging/kernels/install.sh)");
        return;
    }
    let ext = guestd::portfwd::external_addresses()
        .into_iter()
        .find(|a| a.is_ipv4())
        .expect("this test needs a non-loopback IPv4 address (eth0)");
    let g = Guestd::start_forwarding(&["--default-user", "root", "--no-cgroups"]);
    let code = common::Client::new(&format!("http://127.0.0.1:{}", g.code_port));
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", g.code_port)).is_err() {
        assert!(Instant::now() < deadline, "kernel bridge not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kernels = children_of(g.pid());
    assert!(
        kernels.iter().any(|(_, cmd)| cmd.contains("ipykernel")),
        "the default Python kernel runs: {kernels:?}"
    );
    let deno = kernels.iter().find(|(_, cmd)| cmd.contains("deno"));
    if deno.is_none() {
        assert!(
            std::env::var_os("GUESTD_REQUIRE_ALL_KERNELS").is_none(),
            "no default JavaScript kernel: {kernels:?}"
        );
    }
    // What the kernels and guestd listen on before any user code ran.
    let mut private: Vec<(String, u16)> = Vec::new();
    for (pid, cmd) in &kernels {
        for port in listening_ports(*pid) {
            private.push((cmd.clone(), port));
        }
    }
    for port in listening_ports(g.pid()) {
        private.push(("guestd".into(), port));
    }
    assert!(
        private.iter().any(|(c, _)| c.contains("ipykernel")),
        "found the Python kernel's sockets: {private:?}"
    );

    // User servers, started after the kernels: one in a thread of the kernel process,
    // one in a process of its own started from a cell.
    let lines = execute_lines(
        &code,
        "import http.server, socketserver, subprocess, sys, threading, socket\n\
         srv = socketserver.TCPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)\n\
         threading.Thread(target=srv.serve_forever, daemon=True).start()\n\
         s = socket.socket(); s.bind(('127.0.0.1', 0)); child_port = s.getsockname()[1]; s.close()\n\
         child = subprocess.Popen([sys.executable, '-m', 'http.server', '--bind', '127.0.0.1', str(child_port)],\n\
         \x20                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
         print(srv.server_address[1], child_port)",
    )
    .await;
    let out: String = lines
        .iter()
        .filter(|l| l["type"] == "stdout")
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect();
    let user_ports: Vec<u16> = out
        .split_whitespace()
        .map(|p| p.parse().unwrap_or_else(|_| panic!("ports: {lines:?}")))
        .collect();
    assert_eq!(user_ports.len(), 2, "{lines:?}");
    let mut user = vec![
        ("a thread of the Python kernel", user_ports[0]),
        ("a process started from a cell", user_ports[1]),
    ];
    if deno.is_some() {
        let (st, _, body) = code
            .fetch(
                Method::POST,
                "/execute",
                &[("content-type", "application/json")],
                serde_json::json!({
                    "language": "javascript",
                    "code": "const server = Deno.serve({ hostname: '127.0.0.1', port: 0, onListen() {} }, () => new Response('hi'));\nserver.addr.port",
                })
                .to_string(),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let text = String::from_utf8_lossy(&body);
        let port = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["type"] == "result")
            .and_then(|l| l["text"].as_str().and_then(|t| t.parse::<u16>().ok()))
            .unwrap_or_else(|| panic!("Deno.serve port: {text}"));
        user.push(("Deno.serve in the JavaScript kernel", port));
    }
    // Every user server gets forwarded (so the forwarder is working and has seen the
    // kernels' sockets in the same scans)...
    for (what, port) in &user {
        assert!(
            reachable_within(
                std::net::SocketAddr::new(ext, *port),
                Duration::from_secs(10)
            )
            .await,
            "the user's server in {what} (127.0.0.1:{port}) was not forwarded to {ext}"
        );
    }
    // ...one more scan interval, so the scans have bound whatever they wanted...
    tokio::time::sleep(guestd::portfwd::SCAN_INTERVAL + Duration::from_millis(500)).await;
    // ...while nothing a kernel or guestd listened on for itself is.
    for (owner, port) in &private {
        assert!(
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(ext, *port),
                Duration::from_millis(300)
            )
            .is_err(),
            "{owner}'s port {port} is reachable from {ext}"
        );
    }
    let _ = execute_lines(&code, "srv.shutdown(); child.kill()").await;
}

/// Sends `head`, waits, sends `body`, and reads one HTTP/1.1 response (head and a
/// content-length body) from `s`. Returns the status line and the head.
async fn exchange(s: &mut tokio::net::TcpStream, head: &str, body: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(head.as_bytes()).await.expect("write head");
    if !body.is_empty() {
        // The body arrives after guestd has seen the head (as a streaming client sends it).
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(body).await.expect("write body");
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer")
            .expect("read");
        assert!(
            n > 0,
            "connection closed; got so far: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if buf.len() >= end + 4 + len {
                return (head.lines().next().unwrap_or("").to_string(), head);
            }
        }
    }
}

/// A request refused for its token keeps the connection usable, even when its body
/// arrives after the refusal was decided: the SDK sends `/health` on the same pooled
/// connection right after a refused `Start`, and it failed when guestd closed it.
#[tokio::test]
async fn a_refused_request_leaves_the_connection_usable() {
    let g = Guestd::start();
    let c = g.client();
    let (st, _, _) = init(&c, serde_json::json!({"accessToken": "s3cret"})).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", g.port))
        .await
        .expect("connect");
    let body = br#"{"process":{"cmd":"true"}}"#;
    let mut env = vec![0u8];
    env.extend_from_slice(&(body.len() as u32).to_be_bytes());
    env.extend_from_slice(body);
    let head = format!(
        "POST /process.Process/Start HTTP/1.1\r\nhost: x\r\ncontent-type: application/connect+json\r\ncontent-length: {}\r\n\r\n",
        env.len()
    );
    let (status, head) = exchange(&mut s, &head, &env).await;
    assert_eq!(status, "http/1.1 401 unauthorized", "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    // The same connection serves the next request.
    let (status, head) = exchange(&mut s, "GET /health HTTP/1.1\r\nhost: x\r\n\r\n", b"").await;
    assert_eq!(status, "http/1.1 204 no content", "{head}");
}
