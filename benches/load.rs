//! Load and memory: many clients running many commands, every output checked, and
//! guestd's memory before and after (issue 8, items 1 and 8).
//!
//! 1. guestd's idle RSS (after a settle).
//! 2. 300 × `head -c 1000000 /dev/zero`, one after another, each output counted.
//! 3. The floor: `<commands>` × `seq 1 20000` spawned by this process itself with
//!    `<clients>` at a time, each output compared with the expected bytes.
//! 4. The same commands through guestd: `<clients>` concurrent Connect JSON clients,
//!    each output compared; errors and lost bytes counted.
//! 5. guestd's RSS after a 5 s settle (retained ended processes included) and 35 s after
//!    (the exit retention over), against the idle figure.
//!
//! Run: `cargo bench --bench load -- [commands] [clients]` (defaults 20000 200);
//! `GUESTD_BENCH_ARGS` adds guestd flags.

#![allow(clippy::disallowed_methods)] // the floor spawns commands directly, on purpose

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::bench::{mib, rss_kib, start_req};
use common::{Codec, Guestd};
use guestd::proto::process as pb;
use tokio::io::AsyncReadExt as _;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    lost_bytes: AtomicU64,
    wrong: AtomicU64,
}

/// One Start over Connect JSON; the stdout bytes, or the error.
async fn run_one(c: &common::Client, req: &pb::StartRequest) -> Result<(Vec<u8>, i32), String> {
    let mut s = c
        .server_stream(Codec::Json, "/process.Process/Start", req, &[])
        .await;
    if s.status != http::StatusCode::OK {
        return Err(format!("HTTP {}", s.status));
    }
    let r = common::collect(&mut s).await;
    match r.end {
        Some(e) => Ok((r.stdout, e.exit_code)),
        None => Err(r.end_of_stream.to_string()),
    }
}

fn main() {
    let mut nums = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<usize>().ok());
    let commands = nums.next().unwrap_or(20_000);
    let clients = nums.next().unwrap_or(200).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let extra = std::env::var("GUESTD_BENCH_ARGS").unwrap_or_default();
    let mut args = vec!["--default-user", "root", "--no-code-interpreter"];
    args.extend(extra.split_whitespace());
    let g = Guestd::start_with(&args);
    let client = g.client();
    let pid = g.pid();

    // The expected output of `seq 1 20000`.
    let expected: Arc<Vec<u8>> = Arc::new(
        (1..=20000)
            .map(|i| format!("{i}\n"))
            .collect::<String>()
            .into_bytes(),
    );

    std::thread::sleep(Duration::from_secs(2));
    let (idle, _) = rss_kib(pid);

    // 300 × 1 MB, one after another.
    let t = Instant::now();
    let big = start_req("head", &["-c", "1000000", "/dev/zero"]);
    let mut big_lost = 0u64;
    for _ in 0..300 {
        match rt.block_on(run_one(&client, &big)) {
            Ok((out, 0)) => big_lost += 1_000_000u64.saturating_sub(out.len() as u64),
            other => panic!("head failed: {other:?}"),
        }
    }
    let big_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(5));
    let (after_big, _) = rss_kib(pid);

    // The floor: the same commands spawned here, `clients` at a time.
    let floor_s = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(clients));
        let t = Instant::now();
        let mut tasks = Vec::with_capacity(commands);
        for _ in 0..commands {
            let sem = sem.clone();
            let expected = expected.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await.expect("semaphore");
                let mut child = tokio::process::Command::new("seq")
                    .args(["1", "20000"])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("seq");
                let mut out = Vec::new();
                child
                    .stdout
                    .take()
                    .expect("stdout")
                    .read_to_end(&mut out)
                    .await
                    .expect("read");
                assert!(child.wait().await.expect("wait").success());
                assert_eq!(out, *expected);
            }));
        }
        for t in tasks {
            t.await.expect("floor task");
        }
        t.elapsed().as_secs_f64()
    });

    // Through guestd: `clients` concurrent clients share the commands.
    let tally = Arc::new(Tally::default());
    let guestd_s = rt.block_on(async {
        let t = Instant::now();
        let per = commands / clients;
        let extra = commands % clients;
        let mut tasks = Vec::new();
        for i in 0..clients {
            let n = per + usize::from(i < extra);
            let c = common::Client::new(&g.base());
            let tally = tally.clone();
            let expected = expected.clone();
            tasks.push(tokio::spawn(async move {
                let req = start_req("seq", &["1", "20000"]);
                for _ in 0..n {
                    match run_one(&c, &req).await {
                        Ok((out, 0)) if out == *expected => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((out, _)) => {
                            tally.wrong.fetch_add(1, Ordering::Relaxed);
                            tally.lost_bytes.fetch_add(
                                (expected.len() as u64).saturating_sub(out.len() as u64),
                                Ordering::Relaxed,
                            );
                        }
                        Err(e) => {
                            eprintln!("command failed: {e}");
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
        t.elapsed().as_secs_f64()
    });
    let (peak_after_load, hwm) = rss_kib(pid);
    std::thread::sleep(Duration::from_secs(5));
    let (settled, _) = rss_kib(pid);
    // Past the exit retention (30 s): every ended process is gone.
    std::thread::sleep(Duration::from_secs(30));
    let (expired, _) = rss_kib(pid);

    println!("## Load: {commands} × `seq 1 20000` from {clients} concurrent clients\n");
    println!("| path | seconds | commands/s | ratio to floor (time) |");
    println!("|---|---:|---:|---:|");
    println!(
        "| local spawn + read, {clients} at a time (floor) | {floor_s:.2} | {:.0} | 1.00 |",
        commands as f64 / floor_s
    );
    println!(
        "| guestd, Connect JSON | {guestd_s:.2} | {:.0} | {:.2} |",
        commands as f64 / guestd_s,
        guestd_s / floor_s
    );
    println!(
        "\nchecked outputs: {} ok, {} wrong, {} errors, {} bytes lost",
        tally.ok.load(Ordering::Relaxed),
        tally.wrong.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        tally.lost_bytes.load(Ordering::Relaxed),
    );
    println!("\n## guestd memory\n");
    println!("| moment | RSS MiB | RSS − idle MiB |");
    println!("|---|---:|---:|");
    println!("| idle (2 s after start) | {:.1} | 0.0 |", mib(idle));
    println!(
        "| 5 s after 300 × 1 MB (`head`, {big_s:.1} s, {big_lost} bytes lost) | {:.1} | {:.1} |",
        mib(after_big),
        mib(after_big) - mib(idle)
    );
    println!(
        "| right after the load | {:.1} | {:.1} |",
        mib(peak_after_load),
        mib(peak_after_load) - mib(idle)
    );
    println!(
        "| 5 s after the load | {:.1} | {:.1} |",
        mib(settled),
        mib(settled) - mib(idle)
    );
    println!(
        "| 35 s after the load (exit retention over) | {:.1} | {:.1} |",
        mib(expired),
        mib(expired) - mib(idle)
    );
    println!("\npeak RSS (VmHWM): {:.1} MiB", mib(hwm));
}
