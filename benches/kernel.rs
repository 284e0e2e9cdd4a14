//! Kernel bridge benchmarks, side by side with a bare `jupyter_client` (the floor) in
//! the same run, both on kernels from the same `python3` kernelspec:
//!
//! * `x = 1` round trip (median, p99);
//! * 50 MB written to stdout by the kernel, delivered to the client;
//! * one matplotlib figure (PNG + chart description) displayed;
//! * guestd's RSS after the runs.
//!
//! Run: `cargo bench --bench kernel` (needs `packaging/kernels/install.sh`; optionally
//! `-- <iterations>`).

#![allow(clippy::disallowed_methods)] // the floor runs a Python script directly

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Guestd;
use http::{Method, StatusCode};
use http_body_util::BodyExt as _;

const PYTHON: &str = "/opt/guestd/python/bin/python";
const STDOUT_50MB: &str = "import sys\nchunk = 'a' * (1 << 20)\nfor _ in range(50):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()";
const FIGURE: &str =
    "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2, 4])\nplt.title('bench')\nplt.show()";

struct Outcome {
    stdout_bytes: usize,
    pngs: usize,
}

/// One `/execute` on the default Python context, read to the end.
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
    let mut buf = Vec::new();
    let mut out = Outcome {
        stdout_bytes: 0,
        pngs: 0,
    };
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("body").into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let v: serde_json::Value = serde_json::from_slice(&line).expect("NDJSON line");
            match v["type"].as_str() {
                Some("stdout") => out.stdout_bytes += v["text"].as_str().map_or(0, str::len),
                Some("result") if v.get("png").is_some() => out.pngs += 1,
                Some("error") => panic!("execution failed: {v}"),
                _ => {}
            }
        }
    }
    out
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64();
    (at(0.5), at(0.99))
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    assert!(
        std::path::Path::new(PYTHON).exists(),
        "run packaging/kernels/install.sh first"
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // The floor first (its kernel is gone before guestd's start).
    let out = std::process::Command::new(PYTHON)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/jupyter_baseline.py"
        ))
        .arg(n.to_string())
        .output()
        .expect("baseline");
    assert!(
        out.status.success(),
        "baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base: serde_json::Value = serde_json::from_slice(&out.stdout).expect("baseline JSON");
    let f = |k: &str| base[k].as_f64().expect(k);

    let g = Guestd::start_with(&["--default-user", "root"]);
    let c = common::Client::new(&format!("http://127.0.0.1:{}", g.code_port));
    let deadline = Instant::now() + Duration::from_secs(120);
    // The code port opens once the default contexts are ready.
    while std::net::TcpStream::connect(("127.0.0.1", g.code_port)).is_err()
        || rt.block_on(c.fetch(Method::GET, "/health", &[], "")).0 != StatusCode::OK
    {
        assert!(Instant::now() < deadline, "kernel bridge not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (xs, big, figs) = rt.block_on(async {
        for _ in 0..20 {
            execute(&c, "x = 1").await;
        }
        let mut xs = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            execute(&c, "x = 1").await;
            xs.push(t.elapsed());
        }
        let t = Instant::now();
        let o = execute(&c, STDOUT_50MB).await;
        assert_eq!(o.stdout_bytes, 50 << 20);
        let big = t.elapsed().as_secs_f64();
        let mut figs = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let o = execute(&c, FIGURE).await;
            assert_eq!(o.pngs, 1);
            figs.push(t.elapsed());
        }
        (xs, big, figs)
    });
    let (x_med, x_p99) = stats(xs);
    let (fig_med, _) = stats(figs);

    println!("## Kernel bridge vs bare jupyter_client ({n} iterations of x = 1)\n");
    println!("| work | jupyter_client (floor) | guestd /execute | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| `x = 1` median | {:.2} ms | {:.2} ms | {:.2} |",
        f("x1_median_s") * 1e3,
        x_med * 1e3,
        x_med / f("x1_median_s")
    );
    println!(
        "| `x = 1` p99 | {:.2} ms | {:.2} ms | {:.2} |",
        f("x1_p99_s") * 1e3,
        x_p99 * 1e3,
        x_p99 / f("x1_p99_s")
    );
    println!(
        "| 50 MB stdout | {:.2} s | {:.2} s | {:.2} |",
        f("stdout_50mb_s"),
        big,
        big / f("stdout_50mb_s")
    );
    println!(
        "| matplotlib figure (median of 5) | {:.0} ms | {:.0} ms | {:.2} |",
        f("figure_median_s") * 1e3,
        fig_med * 1e3,
        fig_med / f("figure_median_s")
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", g.pid())).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "\nguestd RSS after the runs: {}; peak (VmHWM): {}",
        field("VmRSS:"),
        field("VmHWM:")
    );
}
