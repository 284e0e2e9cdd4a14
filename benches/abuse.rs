//! Latency of the agent while user code abuses the machine (issue 8, item 4): a fork
//! bomb, a CPU hog on every core and a memory hog at once, as a non-root user, with
//! guestd's default limits (machine-sized pids and memory, default CPU weight, a tenth of the I/O weight).
//!
//! The floor is the same polling (`/health` every ~100 ms, `Start(/bin/true)` every
//! fifth poll) against the same guestd while nothing else runs, measured first in the
//! same run.
//!
//! Run: `cargo bench --bench abuse -- [seconds]` (default 20); `GUESTD_BENCH_ARGS` adds
//! guestd flags; `GUESTD_BENCH_USER` names the user (default `user`).

#![allow(clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Guestd;
use common::storm::{Storm, quantile, storm};
use http::{Method, StatusCode};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

async fn idle_polling(base: &str, user: &str, secs: u64) -> Storm {
    let c = common::Client::new(base);
    let auth = common::basic_auth(user);
    let mut out = Storm::default();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    let req = guestd::proto::process::StartRequest {
        process: Some(guestd::proto::process::ProcessConfig {
            cmd: "/bin/true".into(),
            args: vec![],
            envs: Default::default(),
            cwd: Some("/".into()),
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    while Instant::now() < until {
        let t = Instant::now();
        let (st, _, _) = common::Client::new(base)
            .fetch(Method::GET, "/health", &[], "")
            .await;
        out.health
            .push((st == StatusCode::NO_CONTENT).then(|| t.elapsed()));
        if n.is_multiple_of(5) {
            let t = Instant::now();
            let mut s = c
                .server_stream(
                    common::Codec::Json,
                    "/process.Process/Start",
                    &req,
                    &[("authorization", &auth)],
                )
                .await;
            let r = common::collect(&mut s).await;
            out.starts.push(match r.end {
                Some(e) if e.exit_code == 0 => Ok(t.elapsed()),
                other => Err(format!("{other:?}")),
            });
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out
}

fn row(name: &str, s: &Storm) {
    let health: Vec<Duration> = s.health.iter().flatten().copied().collect();
    let starts: Vec<Duration> = s
        .starts
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .copied()
        .collect();
    println!(
        "| {name} | {} / {} | {:.1} | {:.1} | {:.1} | {} / {} | {:.0} | {:.0} |",
        health.len(),
        s.health.len(),
        ms(quantile(&health, 0.5)),
        ms(quantile(&health, 0.99)),
        ms(quantile(&health, 1.0)),
        starts.len(),
        s.starts.len(),
        ms(quantile(&starts, 0.5)),
        ms(quantile(&starts, 0.99)),
    );
}

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let user = std::env::var("GUESTD_BENCH_USER").unwrap_or_else(|_| "user".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let extra = std::env::var("GUESTD_BENCH_ARGS").unwrap_or_default();
    let mut args = vec!["--default-user", "root", "--no-code-interpreter"];
    args.extend(extra.split_whitespace());
    let g = Guestd::start_with(&args);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    let idle = rt.block_on(idle_polling(&g.base(), &user, secs));
    let before = mem_available_mib();
    let min_avail = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let watcher = {
        let min_avail = min_avail.clone();
        std::thread::spawn(move || {
            for _ in 0..(secs * 20 + 2400) {
                min_avail.fetch_min(mem_available_mib(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let t = Instant::now();
    let s = rt.block_on(storm(&g.base(), &user, cpus, secs));
    let storm_s = t.elapsed().as_secs_f64();
    drop(watcher);

    println!(
        "## guestd under a fork bomb, {cpus} CPU hogs and a memory hog ({secs} s, as `{user}`)\n"
    );
    println!(
        "| phase | /health answered | p50 ms | p99 ms | max ms | Start(/bin/true) ok | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    row("idle (floor)", &idle);
    row("storm", &s);
    let h_idle: Vec<Duration> = idle.health.iter().flatten().copied().collect();
    let h_storm: Vec<Duration> = s.health.iter().flatten().copied().collect();
    println!(
        "\n/health p99 storm / idle: {:.1}×",
        quantile(&h_storm, 0.99).as_secs_f64() / quantile(&h_idle, 0.99).as_secs_f64().max(1e-9)
    );
    match &s.hog_end {
        Some(e) => println!(
            "memory hog: {} (oom_killed: {}); MemAvailable before {} MiB, lowest during the storm {} MiB",
            e.status,
            e.oom_killed,
            before,
            min_avail.load(std::sync::atomic::Ordering::Relaxed)
        ),
        None => println!("memory hog: no end seen"),
    }
    println!(
        "killed after the storm: {} commands ended; storm phase took {storm_s:.1} s",
        s.killed_ends.len()
    );
    if let Some(at) = s.hog_end_at {
        println!("memory hog ended {:.2} s into the storm", at.as_secs_f64());
    }
    for (at, r) in s.start_at.iter().zip(&s.starts) {
        match r {
            Ok(d) if *d >= Duration::from_millis(200) => println!(
                "slow Start(/bin/true): sent {:.2} s into the storm, took {:.0} ms",
                at.as_secs_f64(),
                ms(*d)
            ),
            _ => {}
        }
    }
    let errors: Vec<_> = s.starts.iter().filter_map(|r| r.as_ref().err()).collect();
    if !errors.is_empty() {
        println!("Start errors: {errors:?}");
    }
}
