//! Idle memory of guestd (issue 11): RSS 3 s after it answers, for the glibc build
//! (`target/release/guestd`) and the static musl build that ships
//! (`target/x86_64-unknown-linux-musl/ship/guestd`, built first by
//! `cargo build --profile ship --target x86_64-unknown-linux-musl --bin guestd`), each without
//! the kernel bridge (`--no-code-interpreter`) and with it (until `:49999/health`
//! answers, i.e. the Python kernel is ready; guestd's own RSS, not the kernels').
//! Next to them, in the same run: `sleep`, the smallest process this machine runs.
//! RSS is split into anonymous memory (heap, stacks) and file pages (the binary's
//! code that was touched).
//!
//! Run: `cargo bench --bench memory`. Default log level (info), cgroups on.

#![allow(clippy::disallowed_methods)] // it starts the binaries itself, on purpose

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::mib;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

fn rss(pid: u32) -> Rss {
    let [total, anon, file, shmem] =
        common::bench::status_kib(pid, ["VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"]);
    Rss {
        total,
        anon,
        file: file + shmem,
    }
}

/// Status line of `GET /health` on `port`, if it answers.
fn health(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.lines().next().map(str::to_string)
}

struct Running(Child);

impl Drop for Running {
    /// SIGTERM first: guestd then shuts its kernels down (a SIGKILLed guestd leaves
    /// them running).
    fn drop(&mut self) {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin` and waits until it answers on the agent port and, with the bridge,
/// until the code port's `/health` says 200. Returns its RSS 3 s later.
fn measure(bin: &Path, bridge: bool) -> Result<Rss, String> {
    let port = common::free_port();
    let code_port = common::free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1", "--port", &port.to_string()])
        .args(["--code-port", &code_port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !bridge {
        cmd.arg("--no-code-interpreter");
    }
    let child = Running(cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = health(port).is_some_and(|l| l.contains(" 204") || l.contains(" 200"));
        let code_up = !bridge || health(code_port).is_some_and(|l| l.contains(" 200"));
        if up && code_up {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not become ready (bridge: {bridge})",
                bin.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    Ok(rss(child.0.id()))
}

fn main() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let glibc = PathBuf::from(env!("CARGO_BIN_EXE_guestd"));
    let musl = manifest.join("target/x86_64-unknown-linux-musl/ship/guestd");

    let floor = {
        let c = Running(
            Command::new("sleep")
                .arg("1000")
                .spawn()
                .expect("spawn sleep"),
        );
        std::thread::sleep(Duration::from_millis(300));
        rss(c.0.id())
    };

    println!("## Idle RSS, 3 s after ready\n");
    println!("| process | RSS MiB | anonymous MiB | file pages MiB |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, r: Rss| {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            mib(r.total),
            mib(r.anon),
            mib(r.file)
        );
    };
    row("`sleep 1000` (floor: the smallest process here)", floor);
    for (name, bin) in [("glibc build", &glibc), ("static musl build", &musl)] {
        if !bin.exists() {
            println!(
                "| {name}: not built (`cargo build --profile ship --target x86_64-unknown-linux-musl --bin guestd`) | | | |"
            );
            continue;
        }
        for bridge in [false, true] {
            let label = format!(
                "guestd, {name}, {}",
                if bridge {
                    "with the kernel bridge (Python ready)"
                } else {
                    "no kernels"
                }
            );
            match measure(bin, bridge) {
                Ok(r) => row(&label, r),
                Err(e) => println!("| {label}: {e} | | | |"),
            }
        }
    }
}
