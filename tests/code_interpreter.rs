//! Integration tests of the code-interpreter port (kernel bridge) against real Jupyter
//! kernels, driving the built binary over HTTP/1.1 on a free port.
//!
//! Needs the kernels from `packaging/kernels/install.sh` (Python is required; Deno,
//! bash, R and Java tests skip with a notice when their kernel is missing, unless
//! `GUESTD_REQUIRE_ALL_KERNELS` is set, as `tests/run.sh` does) and a
//! writable `/home/user` (created here if missing: the tests run as root, like CI).
//!
//! Binary: `guestd --port P --code-port C` (the agent API on P, where `/init` sets the
//! sandbox's global environment, and the kernel bridge on C).

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Server processes

struct Server {
    port: u16,
    code_port: u16,
    pid: i32,
    log: std::path::PathBuf,
}

impl Server {
    fn terminate(&self) {
        // SAFETY: kill(2) with a pid we spawned; no memory is involved.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Spawns children from one thread that lives as long as the test process, so their
/// PR_SET_PDEATHSIG (tied to the spawning thread) fires only when the tests end.
fn spawn_server_process(
    bin: &str,
    port: u16,
    code_port: u16,
    log: &std::path::Path,
    env: Vec<(String, String)>,
) -> (i32, guestd::sys::reaper::ExitWaiter) {
    type Req = (
        String,
        u16,
        u16,
        std::path::PathBuf,
        Vec<(String, String)>,
        std_mpsc::Sender<std::io::Result<(i32, guestd::sys::reaper::ExitWaiter)>>,
    );
    static SPAWNER: OnceLock<std::sync::Mutex<std_mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<Req>();
        std::thread::spawn(move || {
            for (bin, port, code_port, log, env, reply) in rx {
                let r = (|| {
                    let logf = std::fs::File::create(&log)?;
                    let mut cmd = std::process::Command::new(&bin);
                    cmd.args([
                        "--listen",
                        "127.0.0.1",
                        "--port",
                        &port.to_string(),
                        "--code-port",
                        &code_port.to_string(),
                        "--no-port-forward",
                    ])
                    .env("RUST_LOG", "info,guestd=debug")
                    .envs(env)
                    .stdin(Stdio::null())
                    .stdout(logf.try_clone()?)
                    .stderr(logf);
                    // SAFETY: prctl is async-signal-safe and touches no parent memory.
                    unsafe {
                        cmd.pre_exec(|| {
                            libc::prctl(
                                libc::PR_SET_PDEATHSIG,
                                libc::SIGTERM as libc::c_ulong,
                                0,
                                0,
                                0,
                            );
                            Ok(())
                        });
                    }
                    let (child, waiter) = guestd::sys::reaper::global().spawn_command(&mut cmd)?;
                    Ok((child.id() as i32, waiter))
                })();
                let _ = reply.send(r);
            }
            // Keep the thread (the children's parent) alive until the process exits.
            loop {
                std::thread::park();
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (rtx, rrx) = std_mpsc::channel();
    tx.lock()
        .expect("spawner lock")
        .send((
            bin.to_string(),
            port,
            code_port,
            log.to_path_buf(),
            env,
            rtx,
        ))
        .expect("spawner alive");
    rrx.recv().expect("spawner reply").expect("spawn server")
}

/// Starts guestd, waits until its code port answers `/health`, then sets the sandbox's
/// global environment (`global_env`) through `/init` on the agent port, as a control
/// plane would.
async fn start_server(global_env: Vec<(String, String)>) -> Server {
    std::fs::create_dir_all("/home/user").expect("create /home/user");
    let server = start_server_process().await;
    if !global_env.is_empty() {
        let vars: serde_json::Map<String, Value> = global_env
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        let body = json!({ "envVars": vars }).to_string();
        let r = request(server.port, "POST", "/init", Some(&body))
            .await
            .expect("/init");
        assert_eq!(r.status, 204, "/init: {}", r.text());
    }
    server
}

async fn start_server_process() -> Server {
    start_server_process_with(Vec::new()).await
}

/// Starts guestd with extra environment variables (e.g. `JUPYTER_PATH` to put a test
/// kernelspec in front of the installed ones).
async fn start_server_process_with(env: Vec<(String, String)>) -> Server {
    {
        let bin = env!("CARGO_BIN_EXE_guestd");
        let port = free_port();
        let code_port = free_port();
        let log = std::env::temp_dir().join(format!("guestd-ci-test-{code_port}.log"));
        let (pid, mut waiter) = spawn_server_process(bin, port, code_port, &log, env);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = tokio::time::timeout(
                Duration::from_secs(2),
                request(code_port, "GET", "/health", None),
            )
            .await
                && let Ok(r) = r
                && r.status == 200
            {
                return Server {
                    port,
                    code_port,
                    pid,
                    log,
                };
            }
            tokio::select! {
                status = &mut waiter => {
                    panic!("guestd exited ({status:?}) without serving the code port; log: {}", log.display());
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            assert!(
                Instant::now() < deadline,
                "server did not become healthy; log: {}",
                log.display()
            );
        }
    }
}

/// The server shared by tests that only use their own contexts.
async fn shared() -> u16 {
    static PORT: tokio::sync::OnceCell<u16> = tokio::sync::OnceCell::const_new();
    *PORT
        .get_or_init(|| async {
            // A dedicated runtime thread owns nothing here: the server is a process.
            let s = start_server(vec![("GLOBAL_A".into(), "ga".into())]).await;
            eprintln!("shared server on {} (log {})", s.code_port, s.log.display());
            let port = s.code_port;
            std::mem::forget(s); // ends with the test process (PDEATHSIG)
            port
        })
        .await
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client (raw socket, so tests see exact bytes and can disconnect)

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

async fn send_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    extra: &[(&str, &str)],
) -> TcpStream {
    try_send_request(port, method, path, body, extra)
        .await
        .expect("send request")
}

async fn try_send_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    extra: &[(&str, &str)],
) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await?;
    Ok(s)
}

/// Reads the status line and headers.
async fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).await.expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.expect("header");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// Incremental reader of a chunked (or close-delimited) body, by lines.
struct LineReader {
    r: BufReader<TcpStream>,
    chunked: bool,
    buf: Vec<u8>,
    eof: bool,
}

impl LineReader {
    async fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        if !self.chunked {
            let mut tmp = [0u8; 8192];
            let n = self.r.read(&mut tmp).await.unwrap_or(0);
            if n == 0 {
                self.eof = true;
                return false;
            }
            self.buf.extend_from_slice(&tmp[..n]);
            return true;
        }
        let mut size_line = String::new();
        if self.r.read_line(&mut size_line).await.unwrap_or(0) == 0 {
            self.eof = true;
            return false;
        }
        let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or(""), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
        if size == 0 {
            self.eof = true;
            return false;
        }
        let mut chunk = vec![0u8; size + 2];
        self.r.read_exact(&mut chunk).await.expect("chunk");
        chunk.truncate(size);
        self.buf.extend_from_slice(&chunk);
        true
    }

    /// The next raw line (without `\n`), or None at the end of the body.
    async fn next_raw(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(line[..line.len() - 1].to_vec());
            }
            if !self.fill().await {
                assert!(
                    self.buf.is_empty(),
                    "body ended mid-line: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        }
    }

    /// The next line as JSON, checking the framing rules of contract §3.1.
    async fn next(&mut self) -> Option<Value> {
        let raw = self.next_raw().await?;
        assert!(!raw.is_empty(), "blank line in the stream");
        assert!(
            raw.is_ascii(),
            "non-ASCII byte in line {:?}",
            String::from_utf8_lossy(&raw)
        );
        let v: Value = serde_json::from_slice(&raw).unwrap_or_else(|e| {
            panic!(
                "line is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
        assert!(v["type"].is_string(), "line without type: {v}");
        Some(v)
    }
}

async fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<Resp> {
    let s = try_send_request(port, method, path, body, &[]).await?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).await;
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    if chunked {
        let mut lr = LineReader {
            r,
            chunked,
            buf: Vec::new(),
            eof: false,
        };
        while lr.fill().await {}
        body = lr.buf;
    } else if let Some(n) = len {
        body.resize(n, 0);
        r.read_exact(&mut body).await?;
    } else {
        r.read_to_end(&mut body).await?;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

async fn req(port: u16, method: &str, path: &str, body: Option<&str>) -> Resp {
    request(port, method, path, body).await.expect("request")
}

/// Starts `/execute` and returns the status and a line reader.
async fn open_execute(port: u16, body: &Value) -> (u16, LineReader) {
    let s = send_request(port, "POST", "/execute", Some(&body.to_string()), &[]).await;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).await;
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    (
        status,
        LineReader {
            r,
            chunked,
            buf: Vec::new(),
            eof: false,
        },
    )
}

/// Runs code to completion; returns every line except keepalives. Checks that
/// `end_of_execution` is the last line.
async fn run(port: u16, body: Value) -> Vec<Value> {
    let (status, mut lines) = open_execute(port, &body).await;
    assert_eq!(status, 200, "execute {body}");
    let mut out = Vec::new();
    let mut ended = false;
    while let Some(v) = tokio::time::timeout(Duration::from_secs(120), lines.next())
        .await
        .expect("line within 120 s")
    {
        assert!(!ended, "line after end_of_execution: {v}");
        match v["type"].as_str() {
            Some("keepalive") => continue,
            Some("end_of_execution") => ended = true,
            _ => {}
        }
        out.push(v);
    }
    assert!(ended, "stream ended without end_of_execution: {out:?}");
    out
}

fn of_type<'a>(lines: &'a [Value], t: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == t).collect()
}

fn stdout_text(lines: &[Value]) -> String {
    of_type(lines, "stdout")
        .iter()
        .map(|l| l["text"].as_str().unwrap_or(""))
        .collect()
}

fn main_text(lines: &[Value]) -> Option<String> {
    of_type(lines, "result")
        .iter()
        .find(|r| r["is_main_result"] == true)
        .and_then(|r| r["text"].as_str().map(String::from))
}

fn error_of(lines: &[Value]) -> Option<(String, String)> {
    of_type(lines, "error").last().map(|e| {
        (
            e["name"].as_str().unwrap_or("").to_string(),
            e["value"].as_str().unwrap_or("").to_string(),
        )
    })
}

async fn create_context(port: u16, body: Value) -> Resp {
    req(port, "POST", "/contexts", Some(&body.to_string())).await
}

/// Creates a context, or returns None (with a notice) when its kernel is not installed.
async fn context_for(port: u16, language: &str, cwd: Option<&str>) -> Option<String> {
    let mut body = json!({"language": language});
    if let Some(c) = cwd {
        body["cwd"] = json!(c);
    }
    let r = create_context(port, body).await;
    if r.status == 500 && r.text().contains("no kernel is installed") {
        // tests/run.sh (and so CI) installs every kernel and sets this: there a missing
        // kernel is a failure, never a silent skip.
        assert!(
            std::env::var_os("GUESTD_REQUIRE_ALL_KERNELS").is_none(),
            "no kernel installed for {language}: {}",
            r.text()
        );
        eprintln!("SKIP: no kernel installed for {language}");
        return None;
    }
    assert_eq!(r.status, 200, "create {language}: {}", r.text());
    let v = r.json();
    assert_eq!(v["language"], language);
    Some(v["id"].as_str().expect("id").to_string())
}

async fn python_context(port: u16) -> String {
    context_for(port, "python", None)
        .await
        .expect("the Python kernel is required: run packaging/kernels/install.sh")
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_default_contexts() {
    let port = shared().await;
    let h = req(port, "GET", "/health", None).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.text(), "\"OK\"");
    assert!(
        h.header("content-type")
            .unwrap_or("")
            .starts_with("application/json")
    );
    let list = req(port, "GET", "/contexts", None).await.json();
    let arr = list.as_array().expect("array");
    assert_eq!(arr[0]["language"], "python", "{list}");
    assert_eq!(arr[0]["cwd"], "/home/user");
    for c in arr {
        let keys: HashSet<&str> = c
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, HashSet::from(["id", "language", "cwd"]));
    }
    if std::path::Path::new("/opt/guestd/python/share/jupyter/kernels/deno/kernel.json").exists() {
        assert_eq!(arr[1]["language"], "javascript", "{list}");
    }
    // Language-less execution goes to the default Python context.
    let lines = run(port, json!({"code": "1 + 1"})).await;
    assert_eq!(main_text(&lines).as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_type_and_framing() {
    let port = shared().await;
    let ctx = python_context(port).await;
    let code = "print('h\u{e9}llo \u{1F600} \\u2028x')\nimport sys; print('err', file=sys.stderr)\nfrom IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))\n'bar'";
    let lines = run(
        port,
        json!({"code": code, "context_id": ctx, "language": null, "env_vars": null}),
    )
    .await;
    assert_eq!(
        lines[0],
        json!({"type": "number_of_executions", "execution_count": 1})
    );
    let out = of_type(&lines, "stdout");
    assert_eq!(out.len(), 1, "{lines:?}");
    assert_eq!(out[0]["text"], "h\u{e9}llo \u{1F600} \u{2028}x\n");
    let ts = out[0]["timestamp"].as_str().expect("timestamp");
    assert!(
        ts.len() == 32 && ts.ends_with("+00:00") && &ts[10..11] == "T",
        "timestamp {ts}"
    );
    let err = of_type(&lines, "stderr");
    assert_eq!(err[0]["text"], "err\n");
    assert!(err[0]["timestamp"].is_string());
    let results = of_type(&lines, "result");
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["html"], "<b>hi</b>");
    assert_eq!(results[0]["is_main_result"], false);
    assert_eq!(results[0]["extra"], json!({}));
    assert_eq!(results[1]["text"], "bar", "quote stripping");
    assert_eq!(results[1]["is_main_result"], true);
    assert_eq!(lines.last().expect("end")["type"], "end_of_execution");

    // Errors: one error line, traceback joined, no main result; counts keep going.
    let lines = run(
        port,
        json!({"code": "undefined_name_xyz", "context_id": ctx}),
    )
    .await;
    assert_eq!(lines[0]["execution_count"], 2);
    assert_eq!(
        error_of(&lines),
        Some((
            "NameError".into(),
            "name 'undefined_name_xyz' is not defined".into()
        ))
    );
    let e = of_type(&lines, "error")[0];
    assert!(
        e["traceback"]
            .as_str()
            .expect("traceback")
            .contains("NameError")
    );
    assert!(
        !e["traceback"].as_str().unwrap_or("").contains('\u{1b}'),
        "no ANSI colours"
    );
    assert_eq!(of_type(&lines, "error").len(), 1);
    assert!(main_text(&lines).is_none());

    // A syntax error still counts; env setup requests never do.
    let lines = run(
        port,
        json!({"code": "1 +", "context_id": ctx, "env_vars": {"X": "1"}}),
    )
    .await;
    assert_eq!(lines[0]["execution_count"], 3);
    assert_eq!(error_of(&lines).map(|e| e.0), Some("SyntaxError".into()));
    let lines = run(port, json!({"code": "3", "context_id": ctx})).await;
    assert_eq!(lines[0]["execution_count"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_rich_outputs() {
    let port = shared().await;
    let ctx = python_context(port).await;
    let lines = run(
        port,
        json!({"context_id": ctx, "code": "import pandas as pd\npd.DataFrame({'a': [1, 2, 3]})"}),
    )
    .await;
    let r = of_type(&lines, "result")[0];
    assert_eq!(r["data"], json!({"a": [1, 2, 3]}));
    assert!(r["html"].as_str().expect("html").contains("<table"));
    assert!(r["text"].is_string());

    let code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('Line')\nplt.xlabel('x (s)')\nplt.show()";
    let lines = run(port, json!({"context_id": ctx, "code": code})).await;
    let r = of_type(&lines, "result");
    assert_eq!(r.len(), 1, "{lines:?}");
    assert_eq!(r[0]["is_main_result"], false);
    assert!(r[0]["png"].as_str().expect("png").starts_with("iVBOR"));
    assert_eq!(r[0]["chart"]["type"], "line");
    assert_eq!(r[0]["chart"]["title"], "Line");
    assert_eq!(r[0]["chart"]["x_unit"], "s");

    let lines = run(
        port,
        json!({"context_id": ctx, "code": "{'a': [1, 2], 'b': None}"}),
    )
    .await;
    let r = of_type(&lines, "result")[0];
    assert_eq!(r["json"], json!({"a": [1, 2], "b": null}));

    let lines = run(port, json!({"context_id": ctx, "code": "from PIL import Image\nImage.new('RGB', (4, 4), 'red').show()"})).await;
    assert!(
        of_type(&lines, "result")
            .iter()
            .any(|r| r["png"].is_string()),
        "{lines:?}"
    );

    let lines = run(port, json!({"context_id": ctx, "code": "from IPython.display import display\ndisplay({'text/latex': '$x$', 'application/x-custom': {'k': 1}}, raw=True)"})).await;
    let r = of_type(&lines, "result")[0];
    assert_eq!(r["latex"], "$x$");
    assert_eq!(r["extra"], json!({"application/x-custom": {"k": 1}}));
    assert!(r.get("text").is_none(), "absent MIME fields are omitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_and_fifo_queue() {
    let port = shared().await;
    let ctx = python_context(port).await;
    let t0 = Instant::now();
    let (s1, mut first) = open_execute(
        port,
        &json!({"context_id": ctx, "code": "import time\ntime.sleep(6)\n'first'"}),
    )
    .await;
    assert_eq!(s1, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Queued behind the first: headers arrive at once, then keepalives while waiting.
    let (s2, mut second) = tokio::time::timeout(
        Duration::from_secs(2),
        open_execute(port, &json!({"context_id": ctx, "code": "'second'"})),
    )
    .await
    .expect("headers of a queued request arrive immediately");
    assert_eq!(s2, 200);
    let mut keepalive_at = None;
    let mut first_lines = Vec::new();
    while let Some(v) = first.next().await {
        if v["type"] == "keepalive" && keepalive_at.is_none() {
            keepalive_at = Some(t0.elapsed());
        }
        first_lines.push(v);
    }
    let ka = keepalive_at.expect("keepalive during a 6 s silence");
    assert!(
        ka >= Duration::from_millis(4500) && ka <= Duration::from_millis(6500),
        "keepalive after {ka:?}"
    );
    assert_eq!(main_text(&first_lines).as_deref(), Some("first"));
    let mut second_lines = Vec::new();
    while let Some(v) = second.next().await {
        second_lines.push(v);
    }
    assert!(
        second_lines.iter().any(|l| l["type"] == "keepalive"),
        "the queued request got keepalives"
    );
    assert_eq!(main_text(&second_lines).as_deref(), Some("second"));
    let c1 = first_lines[0]["execution_count"].as_i64();
    let c2 = second_lines
        .iter()
        .find(|l| l["type"] == "number_of_executions")
        .and_then(|l| l["execution_count"].as_i64());
    assert_eq!(c2, c1.map(|c| c + 1), "FIFO order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_interrupts_and_frees_the_context() {
    let port = shared().await;
    let ctx = python_context(port).await;
    run(port, json!({"context_id": ctx, "code": "state = 41"})).await;
    let (status, mut lines) = open_execute(port, &json!({"context_id": ctx, "code": "import time\nprint('started', flush=True)\ntime.sleep(300)"})).await;
    assert_eq!(status, 200);
    loop {
        let v = lines.next().await.expect("line");
        if v["type"] == "stdout" {
            break;
        }
    }
    drop(lines); // the client goes away mid-execution
    let t = Instant::now();
    let out = run(port, json!({"context_id": ctx, "code": "state + 1"})).await;
    assert_eq!(
        main_text(&out).as_deref(),
        Some("42"),
        "state survives an interrupt: {out:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "context usable {:?} after the disconnect",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_killed_mid_execution_restarts_with_cwd_and_env() {
    let port = shared().await;
    let ctx = context_for(port, "python", Some("/tmp"))
        .await
        .expect("python");
    let (status, mut lines) = open_execute(port, &json!({"context_id": ctx, "code": "import os, time\nprint('x', flush=True)\ntime.sleep(0.5)\nos.kill(os.getpid(), 9)"})).await;
    assert_eq!(status, 200);
    let mut got = Vec::new();
    let mut killed_at = None;
    while let Some(v) = tokio::time::timeout(Duration::from_secs(10), lines.next())
        .await
        .expect("line")
    {
        if v["type"] == "stdout" {
            killed_at = Some(Instant::now() + Duration::from_millis(500));
        }
        got.push(v);
    }
    let error_seen = Instant::now();
    assert_eq!(
        error_of(&got),
        Some(("ContextRestarting".into(), "Context was restarted".into())),
        "{got:?}"
    );
    assert_eq!(got.last().expect("end")["type"], "end_of_execution");
    if let Some(k) = killed_at {
        assert!(
            error_seen.saturating_duration_since(k) < Duration::from_secs(1),
            "error line within 1 s of the death"
        );
    }
    let out = run(port, json!({"context_id": ctx, "code": "import os\nos.getcwd(), os.environ.get('GLOBAL_A'), os.environ.get('E2B_SANDBOX')"})).await;
    assert_eq!(
        main_text(&out).as_deref(),
        Some("('/tmp', 'ga', 'true')"),
        "{out:?}"
    );
    assert_eq!(out[0]["execution_count"], 1, "fresh kernel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_identity_and_cuts_running_execution() {
    let port = shared().await;
    let ctx = context_for(port, "python", Some("/tmp"))
        .await
        .expect("python");
    run(port, json!({"context_id": ctx, "code": "x = 5"})).await;
    let (status, mut lines) = open_execute(
        port,
        &json!({"context_id": ctx, "code": "import time\nprint('go', flush=True)\ntime.sleep(60)"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        lines.next().await.expect("count")["type"],
        "number_of_executions"
    );
    let r = req(port, "POST", &format!("/contexts/{ctx}/restart"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "null");
    let mut rest = Vec::new();
    while let Some(v) = lines.next().await {
        rest.push(v);
    }
    assert_eq!(
        error_of(&rest).map(|e| e.0),
        Some("UnexpectedEndOfExecution".into()),
        "{rest:?}"
    );
    let out = run(
        port,
        json!({"context_id": ctx, "code": "import os\nprint(os.getcwd())\n'x' in globals()"}),
    )
    .await;
    assert_eq!(stdout_text(&out), "/tmp\n");
    assert_eq!(main_text(&out).as_deref(), Some("False"));
    assert_eq!(out[0]["execution_count"], 1);
    let list = req(port, "GET", "/contexts", None).await.json();
    let mine: Vec<&Value> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["id"] == ctx.as_str())
        .collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["cwd"], "/tmp");
    assert_eq!(
        req(port, "POST", "/contexts/no-such-id/restart", None)
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_context() {
    let port = shared().await;
    let ctx = python_context(port).await;
    let (_, mut lines) = open_execute(
        port,
        &json!({"context_id": ctx, "code": "import time\ntime.sleep(60)"}),
    )
    .await;
    assert_eq!(
        lines.next().await.expect("count")["type"],
        "number_of_executions"
    );
    let r = req(port, "DELETE", &format!("/contexts/{ctx}"), None).await;
    assert_eq!((r.status, r.text()), (200, "null".to_string()));
    let mut rest = Vec::new();
    while let Some(v) = lines.next().await {
        rest.push(v);
    }
    assert_eq!(
        error_of(&rest).map(|e| e.0),
        Some("UnexpectedEndOfExecution".into())
    );
    let list = req(port, "GET", "/contexts", None).await.json();
    assert!(
        !list
            .as_array()
            .expect("array")
            .iter()
            .any(|c| c["id"] == ctx.as_str())
    );
    let r = req(
        port,
        "POST",
        "/execute",
        Some(&json!({"code": "1", "context_id": ctx}).to_string()),
    )
    .await;
    assert_eq!(
        (r.status, r.text()),
        (404, format!("Context {ctx} not found"))
    );
    assert_eq!(
        req(port, "DELETE", &format!("/contexts/{ctx}"), None)
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_contexts_run_concurrently() {
    let port = shared().await;
    let a = python_context(port).await;
    let b = python_context(port).await;
    let t = Instant::now();
    let code = "import time\ntime.sleep(2)\n'done'";
    let (ra, rb) = tokio::join!(
        run(port, json!({"context_id": a, "code": code})),
        run(port, json!({"context_id": b, "code": code}))
    );
    assert_eq!(main_text(&ra).as_deref(), Some("done"));
    assert_eq!(main_text(&rb).as_deref(), Some("done"));
    assert!(
        t.elapsed() < Duration::from_millis(3800),
        "took {:?}",
        t.elapsed()
    );
    // Contexts are listed in creation order.
    let list = req(port, "GET", "/contexts", None).await.json();
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    let pa = ids.iter().position(|i| *i == a).expect("a listed");
    let pb = ids.iter().position(|i| *i == b).expect("b listed");
    assert!(pa < pb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input() {
    let port = shared().await;
    let r = req(
        port,
        "POST",
        "/execute",
        Some(r#"{"code": "1", "context_id": "nope"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.text()),
        (404, "Context nope not found".to_string())
    );
    let r = req(
        port,
        "POST",
        "/execute",
        Some(r#"{"code": "1", "context_id": "x", "language": "python"}"#),
    )
    .await;
    assert_eq!(
        (r.status, r.text()),
        (
            400,
            "Only one of context_id or language can be provided".to_string()
        )
    );
    let r = req(port, "POST", "/execute", Some(r#"{"code": "1""#)).await;
    assert_eq!(r.status, 400);
    let r = req(port, "POST", "/execute", Some(r#"{"context_id": null}"#)).await;
    assert_eq!(r.status, 400, "missing code");
    let r = req(
        port,
        "POST",
        "/execute",
        Some(r#"{"code": "1", "language": "cobol"}"#),
    )
    .await;
    assert_eq!(r.status, 500);
    assert!(r.text().contains("cobol"), "{}", r.text());
    let r = create_context(port, json!({"language": "cobol"})).await;
    assert_eq!(r.status, 500);
    assert!(
        r.text().starts_with("Failed to create context"),
        "{}",
        r.text()
    );
    let before = req(port, "GET", "/contexts", None)
        .await
        .json()
        .as_array()
        .map(Vec::len);
    let r = create_context(port, json!({"cwd": "/definitely/not/here"})).await;
    assert_eq!(r.status, 500);
    assert!(r.text().contains("working directory"), "{}", r.text());
    let after = req(port, "GET", "/contexts", None)
        .await
        .json()
        .as_array()
        .map(Vec::len);
    assert_eq!(before, after, "failed context is not listed");
    let r = req(
        port,
        "POST",
        "/execute",
        Some(r#"{"code": "echo", "language": "bash", "env_vars": {"NOT OK": "1"}}"#),
    )
    .await;
    if r.status != 500 {
        assert_eq!(r.status, 400, "{}", r.text());
    }
    assert_eq!(req(port, "GET", "/nope", None).await.status, 404);
    // js/ts aliases normalize; both SDK body shapes are accepted.
    let r = create_context(port, json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["language"], "python");
    assert_eq!(r.json()["cwd"], "/home/user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight() {
    let port = shared().await;
    let s = send_request(
        port,
        "OPTIONS",
        "/execute",
        None,
        &[
            ("Origin", "http://example.com"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type,e2b-sandbox-id",
            ),
        ],
    )
    .await;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).await;
    assert_eq!(status, 200);
    let h = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h("access-control-allow-origin").as_deref(), Some("*"));
    assert_eq!(h("access-control-allow-methods").as_deref(), Some("POST"));
    assert_eq!(
        h("access-control-allow-headers").as_deref(),
        Some("content-type,e2b-sandbox-id")
    );
    assert_eq!(
        req(port, "GET", "/contexts", None)
            .await
            .header("access-control-allow-origin"),
        Some("*")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_vars_per_execution() {
    let port = shared().await;
    let ctx = python_context(port).await;
    let code = "import os\nos.environ.get('FOO'), os.environ.get('GLOBAL_A')";
    let out = run(port, json!({"context_id": ctx, "code": code, "env_vars": {"FOO": "it's \"quoted\" \\ é\n", "GLOBAL_A": "override"}})).await;
    assert_eq!(
        main_text(&out).as_deref(),
        Some(r#"('it\'s "quoted" \\ é\n', 'override')"#)
    );
    // Reset afterwards: FOO unset, GLOBAL_A back to the global value.
    let out = run(port, json!({"context_id": ctx, "code": code})).await;
    assert_eq!(main_text(&out).as_deref(), Some("(None, 'ga')"));
    // Reset also after an error.
    run(
        port,
        json!({"context_id": ctx, "code": "raise RuntimeError()", "env_vars": {"FOO": "1"}}),
    )
    .await;
    let out = run(port, json!({"context_id": ctx, "code": code})).await;
    assert_eq!(main_text(&out).as_deref(), Some("(None, 'ga')"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_languages() {
    let port = shared().await;
    if let Some(js) = context_for(port, "javascript", None).await {
        let out = run(
            port,
            json!({"context_id": js, "code": "console.log('Hello, World!')"}),
        )
        .await;
        assert_eq!(stdout_text(&out), "Hello, World!\n", "{out:?}");
        let out = run(port, json!({"context_id": js, "code": "import { readFileSync } from 'fs'\nconsole.log(typeof readFileSync)"})).await;
        assert_eq!(stdout_text(&out), "function\n", "{out:?}");
        let out = run(
            port,
            json!({"context_id": js, "code": "await Promise.resolve('Hello World!')"}),
        )
        .await;
        assert_eq!(main_text(&out).as_deref(), Some("Hello World!"));
        let out = run(port, json!({"context_id": js, "code": "process.cwd() + ':' + process.env.FOO", "env_vars": {"FOO": "b'a\\r"}})).await;
        assert_eq!(
            main_text(&out).as_deref(),
            Some("/home/user:b'a\\\\r"),
            "Deno escapes the backslash in its repr"
        );
        // `js` normalizes to the same language (its default context).
        let out = run(port, json!({"language": "js", "code": "1 + 2"})).await;
        assert_eq!(main_text(&out).as_deref(), Some("3"));
    }
    if let Some(ts) = context_for(port, "typescript", None).await {
        let out = run(port, json!({"context_id": ts, "code": "const message: string = 'Hello, TS'; console.log(message)"})).await;
        assert_eq!(stdout_text(&out), "Hello, TS\n", "{out:?}");
    }
    if let Some(b) = context_for(port, "bash", None).await {
        let out = run(
            port,
            json!({"context_id": b, "code": "echo $FOO; pwd", "env_vars": {"FOO": "bar 'q'"}}),
        )
        .await;
        assert_eq!(stdout_text(&out), "bar 'q'\n/home/user\n", "{out:?}");
        let out = run(
            port,
            json!({"context_id": b, "code": "echo \"[$FOO][$GLOBAL_A]\""}),
        )
        .await;
        assert_eq!(stdout_text(&out), "[][ga]\n");
        let r = req(
            port,
            "POST",
            "/execute",
            Some(
                &json!({"code": "echo", "context_id": b, "env_vars": {"NOT OK": "1"}}).to_string(),
            ),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.text());
    }
    if let Some(r) = context_for(port, "r", None).await {
        let out = run(
            port,
            json!({"context_id": r, "code": "print(\"Hello, World!\")"}),
        )
        .await;
        assert_eq!(stdout_text(&out), "[1] \"Hello, World!\"\n");
        let out = run(
            port,
            json!({"context_id": r, "code": "Sys.getenv('FOO')", "env_vars": {"FOO": "bar"}}),
        )
        .await;
        let first = of_type(&out, "result")
            .first()
            .and_then(|x| x["text"].as_str())
            .map(|s| s.trim().to_string());
        assert_eq!(first.as_deref(), Some("[1] \"bar\""), "{out:?}");
    }
    if let Some(j) = context_for(port, "java", None).await {
        let out = run(port, json!({"context_id": j, "code": "System.getProperty(\"FOO\")", "env_vars": {"FOO": "bar"}})).await;
        assert_eq!(main_text(&out).as_deref(), Some("bar"), "{out:?}");
        let out = run(
            port,
            json!({"context_id": j, "code": "System.getProperty(\"user.dir\")"}),
        )
        .await;
        assert_eq!(main_text(&out).as_deref(), Some("/home/user"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_default_context_recreates_it_lazily() {
    let server = start_server(Vec::new()).await;
    let port = server.code_port;
    let list = req(port, "GET", "/contexts", None).await.json();
    let py = list[0]["id"].as_str().expect("default python").to_string();
    run(port, json!({"code": "marker = 1"})).await;
    assert_eq!(
        req(port, "DELETE", &format!("/contexts/{py}"), None)
            .await
            .status,
        200
    );
    let out = run(port, json!({"code": "'marker' in globals()"})).await;
    assert_eq!(
        main_text(&out).as_deref(),
        Some("False"),
        "a new default Python context"
    );
    let out = run(port, json!({"language": "python", "code": "'ok'"})).await;
    assert_eq!(main_text(&out).as_deref(), Some("ok"));
    let list = req(port, "GET", "/contexts", None).await.json();
    let pythons: Vec<&Value> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["language"] == "python")
        .collect();
    assert_eq!(pythons.len(), 1, "one default context per language: {list}");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_that_keeps_dying_is_given_up_until_restarted() {
    let port = shared().await;
    let ctx = python_context(port).await;
    let kill = json!({"context_id": ctx, "code": "import os\nos.kill(os.getpid(), 9)"});
    for i in 0..5 {
        let out = run(port, kill.clone()).await;
        assert_eq!(
            error_of(&out).map(|e| e.0),
            Some("ContextRestarting".into()),
            "death {i}: {out:?}"
        );
    }
    let r = req(
        port,
        "POST",
        "/execute",
        Some(&json!({"context_id": ctx, "code": "1"}).to_string()),
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("died 5 times"), "{}", r.text());
    assert_eq!(
        req(port, "POST", &format!("/contexts/{ctx}/restart"), None)
            .await
            .status,
        200
    );
    let out = run(port, json!({"context_id": ctx, "code": "40 + 2"})).await;
    assert_eq!(main_text(&out).as_deref(), Some("42"));
}

/// The global env (GlobalEnv) is applied to kernels at start and re-applied when it
/// changes, before the next execution. Runs the manager in-process (the agent API that
/// changes the env on a real guestd lives elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_env_changes_are_reapplied_in_process() {
    use guestd::kernel::{
        ExecuteRequest, KernelManager, KernelOptions, LanguageMap, Output, SpecResolver,
    };
    std::fs::create_dir_all("/home/user").expect("home");
    let env = guestd::env::GlobalEnv::new(guestd::env::internal_vars());
    env.replace_user_vars(
        [
            ("G_ONE".to_string(), "1".to_string()),
            ("G_TWO".to_string(), "2".to_string()),
        ]
        .into(),
    );
    let mgr = KernelManager::new(
        KernelOptions {
            resolver: SpecResolver {
                dirs: guestd::kernel::spec::default_search_dirs(&[]),
                languages: LanguageMap::default(),
            },
            default_cwd: "/home/user".into(),
            interrupt_restart: Duration::from_secs(10),
            cgroups: None,
        },
        env.clone(),
    );
    let ctx = mgr
        .create_context(Some("python"), None)
        .await
        .expect("python context");
    let read = || async {
        let stream = mgr
            .execute(ExecuteRequest {
                code: "import os\nos.environ.get('G_ONE'), os.environ.get('G_TWO'), os.environ.get('E2B_SANDBOX')".into(),
                context_id: Some(ctx.id.clone()),
                ..ExecuteRequest::default()
            })
            .await
            .expect("execute");
        let mut text = None;
        while let Some(o) = stream.next().await {
            if let Output::Result(r) = o {
                text = r.text.clone();
            }
        }
        text
    };
    assert_eq!(read().await.as_deref(), Some("('1', '2', 'true')"));
    env.replace_user_vars([("G_ONE".to_string(), "uno".to_string())].into());
    assert_eq!(read().await.as_deref(), Some("('uno', None, 'true')"));
    mgr.shutdown().await;
    assert!(mgr.list_contexts().is_empty());
}

/// Every error carries what the kernel knows, and for JavaScript/TypeScript bare npm
/// imports and require() go through `npm:` (kernel::js). Deno's kernel here gets a
/// registry that refuses connections (NPM_CONFIG_REGISTRY in a copy of the installed
/// kernelspec), so loading a package fails: without guestd's diagnosis Deno answers
/// only `Error: Execution failed` with an empty traceback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_errors_are_never_blank() {
    let installed =
        std::path::Path::new("/opt/guestd/python/share/jupyter/kernels/deno/kernel.json");
    if !installed.exists() {
        assert!(
            std::env::var_os("GUESTD_REQUIRE_ALL_KERNELS").is_none(),
            "no Deno kernelspec at {}",
            installed.display()
        );
        eprintln!("SKIP: no Deno kernel installed");
        return;
    }
    let mut spec: Value =
        serde_json::from_slice(&std::fs::read(installed).expect("read kernelspec")).expect("json");
    let closed = free_port(); // bound and released: nothing listens there
    spec["env"]["NPM_CONFIG_REGISTRY"] = json!(format!("http://127.0.0.1:{closed}/"));
    // Deno keeps npm packages it fetched in its cache; a fresh one must fetch.
    let dir = tempfile::tempdir().expect("tmp");
    spec["env"]["DENO_DIR"] = json!(dir.path().join("deno-cache").display().to_string());
    std::fs::create_dir_all(dir.path().join("kernels/deno")).expect("mkdir");
    std::fs::write(
        dir.path().join("kernels/deno/kernel.json"),
        serde_json::to_vec(&spec).expect("json"),
    )
    .expect("write kernelspec");
    std::fs::create_dir_all("/home/user").expect("create /home/user");
    let server = start_server_process_with(vec![(
        "JUPYTER_PATH".into(),
        dir.path().display().to_string(),
    )])
    .await;
    let port = server.code_port;
    let ts = context_for(port, "typescript", None)
        .await
        .expect("typescript context");
    let error_line = |out: &[Value]| -> Value {
        (*of_type(out, "error")
            .last()
            .unwrap_or_else(|| panic!("no error: {out:?}")))
        .clone()
    };

    // A bare import becomes npm:ms; the error names the package and the reason.
    let out = run(
        port,
        json!({"context_id": ts, "code": "import ms from \"ms\"\nms(1000)"}),
    )
    .await;
    let e = error_line(&out);
    let value = e["value"].as_str().unwrap_or("");
    assert_ne!(value, "Execution failed", "{out:?}");
    assert!(
        value.contains("\"ms\"") || value.contains("'ms'"),
        "names the package: {out:?}"
    );
    assert!(
        value.contains(&format!("127.0.0.1:{closed}")) && value.to_lowercase().contains("connect"),
        "says why: {out:?}"
    );
    assert!(!e["traceback"].as_str().unwrap_or("").is_empty(), "{out:?}");

    // The same for an explicit npm: specifier (the case Deno leaves blank) and require().
    let out = run(
        port,
        json!({"context_id": ts, "code": "import pad from \"npm:left-pad@1.3.0\""}),
    )
    .await;
    let v = error_line(&out)["value"].as_str().unwrap_or("").to_string();
    assert!(
        v.contains("left-pad") && v.contains(&format!("127.0.0.1:{closed}")),
        "{out:?}"
    );
    let out = run(
        port,
        json!({"context_id": ts, "code": "const _ = require('lodash')\n_.chunk([1, 2, 3], 2)"}),
    )
    .await;
    let v = error_line(&out)["value"].as_str().unwrap_or("").to_string();
    assert!(
        v.contains("lodash") && v.contains(&format!("127.0.0.1:{closed}")),
        "{out:?}"
    );

    // A TypeScript syntax error: Deno's own parser message, located in the cell.
    let out = run(
        port,
        json!({"context_id": ts, "code": "const x: number = ;"}),
    )
    .await;
    let e = error_line(&out);
    let value = e["value"].as_str().unwrap_or("");
    assert!(value.contains("Expression expected"), "{out:?}");
    assert!(
        value.contains("<cell>:1:19"),
        "position in the cell: {out:?}"
    );
    assert!(
        value.contains("1 | const x: number = ;"),
        "source excerpt without guestd's prefix: {out:?}"
    );
    assert!(!value.contains("data:"), "{out:?}");

    // Nothing of a cell that fails to load has run, and the context still works.
    let out = run(
        port,
        json!({"context_id": ts, "code": "globalThis.ran = 1;\nconst y: = 2"}),
    )
    .await;
    assert!(
        error_line(&out)["value"]
            .as_str()
            .unwrap_or("")
            .contains("SyntaxError"),
        "{out:?}"
    );
    let out = run(
        port,
        json!({"context_id": ts, "code": "typeof globalThis.ran"}),
    )
    .await;
    assert_eq!(main_text(&out).as_deref(), Some("undefined"), "{out:?}");

    // Built-ins need no registry: require('fs') and import from 'node:path'.
    let out = run(port, json!({"context_id": ts, "code": "import { basename } from 'node:path'\nrequire('fs').existsSync('/') + ':' + basename('/a/b.txt')"})).await;
    assert_eq!(main_text(&out).as_deref(), Some("true:b.txt"), "{out:?}");

    // A kernel that dies says how, in the traceback of the ContextRestarting line.
    let out = run(port, json!({"context_id": ts, "code": "Deno.exit(7)"})).await;
    let e = error_line(&out);
    assert_eq!(e["name"], "ContextRestarting", "{out:?}");
    assert_eq!(e["value"], "Context was restarted", "{out:?}");
    let tb = e["traceback"].as_str().unwrap_or("");
    assert!(tb.contains("exit code 7"), "{out:?}");
    // Deno's start-up warning is the last thing it wrote to stderr.
    assert!(
        tb.contains("Last lines of the kernel's stderr:") && tb.contains("deno jupyter"),
        "{out:?}"
    );
    server.terminate();
}

/// A Python kernel that exits under an execution: the client learns the exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_death_reports_exit_status() {
    let port = shared().await;
    let ctx = python_context(port).await;
    let out = run(
        port,
        json!({"context_id": ctx, "code": "import os\nos._exit(3)"}),
    )
    .await;
    let e = of_type(&out, "error");
    let e = e.last().expect("error line");
    assert_eq!(e["name"], "ContextRestarting", "{out:?}");
    let tb = e["traceback"].as_str().unwrap_or("");
    assert!(tb.contains("exited (exit code 3)"), "{out:?}");
    assert!(tb.contains("state is lost"), "{out:?}");
}

/// Live (not zombie) processes whose parent is `ppid` and whose command line contains
/// `needle`.
fn live_children_with(ppid: i32, needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if !process_is_live(pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let parent: i32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if parent == ppid && String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn process_is_live(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let after = &s[s.rfind(')').map_or(0, |i| i + 2)..];
        !after.starts_with('Z') && !after.starts_with('X')
    })
}

/// A guestd that was SIGKILLed leaves its kernels running (nothing can reach them: their
/// keys were in its memory); the next guestd kills them and removes their files, and
/// leaves the kernels of a guestd that still runs alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernels_of_a_killed_guestd_are_reaped_by_the_next() {
    let bystander = start_server_process().await;
    let killed = start_server_process().await;
    let orphans = live_children_with(killed.pid, "ipykernel");
    assert!(!orphans.is_empty(), "the killed guestd's Python kernel");
    let kept = live_children_with(bystander.pid, "ipykernel");
    assert!(!kept.is_empty(), "the other guestd's Python kernel");
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(killed.pid, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        orphans.iter().all(|p| process_is_live(*p)),
        "the kernels outlive a SIGKILLed guestd (what this test is about)"
    );
    let next = start_server_process().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while orphans.iter().any(|p| process_is_live(*p)) {
        assert!(
            Instant::now() < deadline,
            "the next guestd left the dead one's kernels running: {orphans:?}; log: {}",
            next.log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        kept.iter().all(|p| process_is_live(*p)),
        "a live guestd's kernels were killed"
    );
    let log = std::fs::read_to_string(&next.log).unwrap_or_default();
    assert!(
        log.contains("killed kernels a previous guestd left running"),
        "{log}"
    );
    // Its own kernels answer.
    let lines = run(next.code_port, json!({"code": "print(6 * 7)"})).await;
    assert_eq!(stdout_text(&lines), "42\n", "{lines:?}");
    bystander.terminate();
    next.terminate();
}
