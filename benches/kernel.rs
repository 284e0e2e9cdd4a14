//! Kernel bridge benchmarks, side by side with a bare `jupyter_client` (the floor) in
//! the same run, both on kernels from the same `python3` kernelspec. Floor and guestd
//! runs are interleaved (the machine may be shared) and medians are reported.
//!
//! `cargo bench --bench kernel -- [iterations] [rounds]` (defaults 200 and 7):
//! * `x = 1` round trip (median, p99 of `iterations`);
//! * 50 MB written to stdout by the kernel, delivered to the client (median of
//!   `rounds`), with the CPU time of what sits between kernel and client: guestd, or the
//!   jupyter_client process;
//! * one matplotlib figure (PNG + chart description) displayed (median of `rounds`);
//! * guestd's RSS after the runs.
//!
//! `cargo bench --bench kernel -- startup [rounds]` (default 7): from starting guestd
//! to the answer of the first `run_code("1+1")` (polling `:49999/health` first, as a
//! client must), against a bare ipykernel's cold start to its first answer through
//! jupyter_client (no startup files), and the same with guestd's `python3` kernelspec
//! (its IPython startup files); guestd's phases from its log.
//!
//! guestd runs with its defaults except: its own cgroup root (the machine's shared
//! `guestd-user` group may hold other people's processes) with the user CPU weight at
//! the default 100, so the kernel competes for CPU like the floor's kernel does.
//! Needs `packaging/kernels/install.sh`. `GUESTD_BENCH_BIN=<path>` measures another
//! guestd binary (an older build) with the same harness.

#![allow(clippy::disallowed_methods)] // the floor runs a Python script directly

#[path = "../tests/common/mod.rs"]
mod common;

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::cgroup::TestCgroup;
use http::{Method, StatusCode};
use http_body_util::BodyExt as _;

const PYTHON: &str = "/opt/guestd/python/bin/python";
const BASELINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/jupyter_baseline.py");
const STDOUT_50MB: &str = "import sys\nchunk = 'a' * (1 << 20)\nfor _ in range(50):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()";
const FIGURE: &str =
    "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2, 4])\nplt.title('bench')\nplt.show()";

// ------------------------------------------------------------------------------------
// guestd

/// A guestd started by the bench (own cgroup root, JSON logs); SIGTERM on drop.
struct Agent {
    child: Child,
    code_port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn spawn(cg: &TestCgroup) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("guestd.log");
        let port = common::free_port();
        let code_port = common::free_port();
        // GUESTD_BENCH_BIN: another build to measure (e.g. before a change).
        let bin = std::env::var("GUESTD_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_guestd").to_string());
        let child = Command::new(bin)
            .args(["--listen", "127.0.0.1", "--port", &port.to_string()])
            .args(["--code-port", &code_port.to_string()])
            .args(["--default-user", "root", "--no-port-forward"])
            .args(["--cgroup-root", &cg.rel, "--user-cpu-weight", "100"])
            .args(["--log-format", "json"])
            .env("GUESTD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn guestd");
        Agent {
            child,
            code_port,
            log,
            _dir: dir,
        }
    }

    fn client(&self) -> common::Client {
        common::Client::new(&format!("http://127.0.0.1:{}", self.code_port))
    }

    /// Polls `/health` of the code port every 2 ms until it answers 200.
    async fn wait_ready(&self, c: &common::Client, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.code_port)).is_ok()
                && c.fetch(Method::GET, "/health", &[], "").await.0 == StatusCode::OK
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kernel bridge not ready; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// CPU time of all of guestd's threads so far.
    fn cpu(&self) -> Duration {
        cpu_of(self.child.id())
    }

    /// Seconds from guestd's first log line to the first line containing each of
    /// `marks` (in order of the marks).
    fn phases(&self, marks: &[&str]) -> Vec<Option<f64>> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let stamps: Vec<(f64, &str)> = text
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                let t = guestd::kernel::time::parse_iso(v["timestamp"].as_str()?)?;
                Some((t as f64 / 1e6, l))
            })
            .collect();
        let Some(&(t0, _)) = stamps.first() else {
            return vec![None; marks.len()];
        };
        marks
            .iter()
            .map(|m| {
                stamps
                    .iter()
                    .find(|(_, l)| l.contains(m))
                    .map(|(t, _)| t - t0)
            })
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own child; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) of every live thread of `pid`, from their schedstat.
fn cpu_of(pid: u32) -> Duration {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Duration::from_nanos(ns)
}

struct Outcome {
    stdout_bytes: usize,
    pngs: usize,
    results: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    png: Option<serde::de::IgnoredAny>,
}

/// One `/execute` on the default Python context, read to the end; every line is
/// parsed (as the floor's client parses every message).
async fn execute(c: &common::Client, code: &str) -> Outcome {
    let body = serde_json::json!({ "code": code }).to_string();
    let resp = c
        .send(
            Method::POST,
            "/execute",
            &[("content-type", "application/json")],
            body,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Outcome {
        stdout_bytes: 0,
        pngs: 0,
        results: Vec::new(),
    };
    let mut line = |raw: &[u8]| {
        let l: Line = serde_json::from_slice(raw).expect("NDJSON line");
        match l.kind.as_ref() {
            "stdout" => out.stdout_bytes += l.text.map_or(0, |t| t.len()),
            "result" => {
                if l.png.is_some() {
                    out.pngs += 1;
                }
                out.results
                    .push(l.text.map(Cow::into_owned).unwrap_or_default());
            }
            "error" => panic!("execution failed: {}", String::from_utf8_lossy(raw)),
            _ => {}
        }
    };
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("body").into_data() else {
            continue;
        };
        // Only the new bytes are searched for line ends; a line that arrives whole is
        // parsed in place.
        let mut rest: &[u8] = &data;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            if buf.is_empty() {
                line(&rest[..i]);
            } else {
                buf.extend_from_slice(&rest[..i]);
                line(&buf);
                buf.clear();
            }
            rest = &rest[i + 1..];
        }
        buf.extend_from_slice(rest);
    }
    out
}

// ------------------------------------------------------------------------------------
// The floor

/// `jupyter_baseline.py serve`: one kernel, commands on stdin, JSON answers.
struct Floor {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Floor {
    fn start() -> Floor {
        let mut child = Command::new(PYTHON)
            .args([BASELINE, "serve"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("baseline");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut f = Floor {
            child,
            stdin,
            stdout,
        };
        assert_eq!(f.answer()["ready"], true);
        f
    }

    fn answer(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("baseline answer");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("baseline said {line:?}: {e}"))
    }

    fn ask(&mut self, cmd: &str) -> serde_json::Value {
        writeln!(self.stdin, "{cmd}").expect("baseline command");
        self.stdin.flush().expect("flush");
        let a = self.answer();
        assert!(a.get("error").is_none(), "baseline: {a}");
        a
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// A bare kernelspec (ipykernel without any IPython profile or startup file) in a
/// Jupyter data dir of its own.
fn bare_kernelspec(dir: &std::path::Path) {
    let spec = dir.join("kernels/guestd-bench-bare");
    std::fs::create_dir_all(&spec).expect("kernelspec dir");
    std::fs::create_dir_all(dir.join("ipython")).expect("ipython dir");
    let json = serde_json::json!({
        "argv": [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bare",
        "language": "python",
        "env": {"IPYTHONDIR": dir.join("ipython")},
    });
    std::fs::write(spec.join("kernel.json"), json.to_string()).expect("kernel.json");
}

/// One cold start of a kernel to its first answer through jupyter_client, in seconds.
fn floor_startup(jupyter_path: &std::path::Path, kernel: &str) -> f64 {
    let out = Command::new(PYTHON)
        .args([BASELINE, "startup", kernel])
        .env("JUPYTER_PATH", jupyter_path)
        .stderr(Stdio::null())
        .output()
        .expect("baseline startup");
    assert!(out.status.success(), "baseline startup failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["seconds"].as_f64().expect("seconds")
}

// ------------------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn quantiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64();
    (at(0.5), at(0.99))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn throughput(n: usize, rounds: usize) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let load_before = loadavg();
    let mut floor = Floor::start();
    let cg = TestCgroup::create();
    let g = Agent::spawn(&cg);
    let c = g.client();
    rt.block_on(g.wait_ready(&c, Duration::from_secs(120)));
    rt.block_on(async {
        for _ in 0..20 {
            execute(&c, "x = 1").await;
        }
    });

    // x = 1: the floor's n, then guestd's n.
    let fx = floor.ask(&format!("x1 {n}"));
    let xs = rt.block_on(async {
        let mut xs = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            execute(&c, "x = 1").await;
            xs.push(t.elapsed());
        }
        xs
    });
    let (x_med, x_p99) = quantiles(xs);

    // 50 MB and figures: floor and guestd alternate, the first of each pair alternating.
    let (mut f_big, mut f_cpu, mut g_big, mut g_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut f_fig, mut g_fig) = (vec![], vec![]);
    for r in 0..rounds {
        let guestd_big = || {
            rt.block_on(async {
                let cpu = g.cpu();
                let t = Instant::now();
                let o = execute(&c, STDOUT_50MB).await;
                assert_eq!(o.stdout_bytes, 50 << 20);
                (t.elapsed().as_secs_f64(), (g.cpu() - cpu).as_secs_f64())
            })
        };
        let guestd_fig = || {
            rt.block_on(async {
                let t = Instant::now();
                let o = execute(&c, FIGURE).await;
                assert_eq!(o.pngs, 1);
                t.elapsed().as_secs_f64()
            })
        };
        let mut floor_big = || {
            let a = floor.ask("stdout");
            assert_eq!(a["bytes"], 50 << 20);
            (a["seconds"].as_f64().unwrap(), a["cpu_s"].as_f64().unwrap())
        };
        if r % 2 == 0 {
            let (t, cpu) = floor_big();
            f_big.push(t);
            f_cpu.push(cpu);
            let (t, cpu) = guestd_big();
            g_big.push(t);
            g_cpu.push(cpu);
        } else {
            let (t, cpu) = guestd_big();
            g_big.push(t);
            g_cpu.push(cpu);
            let (t, cpu) = floor_big();
            f_big.push(t);
            f_cpu.push(cpu);
        }
        let a = floor.ask("figure");
        assert_eq!(a["pngs"], 1);
        f_fig.push(a["seconds"].as_f64().unwrap());
        g_fig.push(guestd_fig());
    }
    let load_after = loadavg();

    println!(
        "## Kernel bridge vs bare jupyter_client ({n} × `x = 1`, {rounds} interleaved rounds of the rest)\n"
    );
    println!("| work | jupyter_client (floor) | guestd /execute | ratio |");
    println!("|---|---:|---:|---:|");
    let row = |what: &str, f: f64, g: f64, unit: &str, scale: f64, digits: usize| {
        println!(
            "| {what} | {:.digits$} {unit} | {:.digits$} {unit} | {:.2} |",
            f * scale,
            g * scale,
            g / f
        );
    };
    let (f_med, f_p99) = (
        fx["median_s"].as_f64().unwrap(),
        fx["p99_s"].as_f64().unwrap(),
    );
    row("`x = 1` median", f_med, x_med, "ms", 1e3, 2);
    row("`x = 1` p99", f_p99, x_p99, "ms", 1e3, 2);
    row(
        "50 MB stdout, median",
        median(f_big.clone()),
        median(g_big.clone()),
        "s",
        1.0,
        3,
    );
    row(
        "50 MB stdout, CPU between kernel and client (jupyter_client process / guestd), median",
        median(f_cpu),
        median(g_cpu),
        "s",
        1.0,
        3,
    );
    row(
        "matplotlib figure, median",
        median(f_fig),
        median(g_fig),
        "ms",
        1e3,
        0,
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "\n50 MB runs (s): floor {}; guestd {}",
        fmt(&f_big),
        fmt(&g_big)
    );
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", g.child.id())).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "guestd RSS after the runs: {}; peak (VmHWM): {}",
        field("VmRSS:"),
        field("VmHWM:")
    );
    println!("load average before: {load_before}; after: {load_after}");
}

fn startup(rounds: usize) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let load_before = loadavg();
    let jupyter = tempfile::tempdir().expect("tempdir");
    bare_kernelspec(jupyter.path());
    // Warm the page cache once (and check both sides work).
    floor_startup(jupyter.path(), "guestd-bench-bare");
    let marks = [
        "kernel process started",
        "kernel answered kernel_info",
        "default Python context ready",
        "kernel bridge listening",
    ];
    let (mut bare, mut spec, mut ours) = (vec![], vec![], vec![]);
    let mut phases: Vec<Vec<f64>> = vec![vec![]; marks.len()];
    let mut js_ready = vec![];
    for r in 0..=rounds {
        let cg = TestCgroup::create();
        let t = Instant::now();
        let g = Agent::spawn(&cg);
        let c = g.client();
        rt.block_on(async {
            g.wait_ready(&c, Duration::from_secs(120)).await;
            let o = execute(&c, "1+1").await;
            assert_eq!(o.results, vec!["2".to_string()]);
        });
        let took = t.elapsed().as_secs_f64();
        // Let the rest of the start (the JavaScript context) finish before the phases
        // are read and guestd is stopped.
        std::thread::sleep(Duration::from_millis(1500));
        let p = g.phases(&marks);
        let js = g.phases(&["default context ready (started in the background)"])[0];
        drop(g);
        drop(cg);
        if r == 0 {
            continue; // warm-up
        }
        ours.push(took);
        for (i, v) in p.into_iter().enumerate() {
            if let Some(v) = v {
                phases[i].push(v);
            }
        }
        if let Some(js) = js {
            js_ready.push(js);
        }
        bare.push(floor_startup(jupyter.path(), "guestd-bench-bare"));
        spec.push(floor_startup(jupyter.path(), "python3"));
    }
    let load_after = loadavg();
    let (b, s, o) = (
        median(bare.clone()),
        median(spec.clone()),
        median(ours.clone()),
    );
    println!(
        "## Start → first `run_code(\"1+1\")` answered ({rounds} interleaved rounds, medians)\n"
    );
    println!("| what | seconds | ratio to the bare kernel |");
    println!("|---|---:|---:|");
    println!(
        "| bare ipykernel cold start → first answer (jupyter_client; floor) | {b:.3} | 1.00 |"
    );
    println!(
        "| same, guestd's `python3` kernelspec (its IPython startup files) | {s:.3} | {:.2} |",
        s / b
    );
    println!(
        "| guestd start → `:49999/health` 200 → `1+1` answered | {o:.3} | {:.2} |",
        o / b
    );
    println!("\nguestd's phases (ms after its first log line, medians):");
    for (m, v) in marks.iter().zip(phases) {
        if !v.is_empty() {
            println!("- {m}: {:.0}", median(v) * 1e3);
        }
    }
    if !js_ready.is_empty() {
        println!(
            "- default JavaScript context ready: {:.0}",
            median(js_ready) * 1e3
        );
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "\nruns (s): bare {}; kernelspec {}; guestd {}",
        fmt(&bare),
        fmt(&spec),
        fmt(&ours)
    );
    println!("load average before: {load_before}; after: {load_after}");
}

fn main() {
    assert!(
        std::path::Path::new(PYTHON).exists(),
        "run packaging/kernels/install.sh first"
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if args.iter().any(|a| a == "startup") {
        startup(nums.first().copied().unwrap_or(7));
    } else {
        throughput(
            nums.first().copied().unwrap_or(200),
            nums.get(1).copied().unwrap_or(7),
        );
    }
}
