//! 1,000 processes streaming at once to 100 clients (issue 11), every byte checked.
//!
//! 1. The floor: the same `<procs>` commands spawned by this process itself, all at
//!    once, each stdout read to the end and compared; wall time.
//! 2. guestd idle: `Start(/bin/true)` round trips (Connect JSON) from a probe client,
//!    one after another, for a few seconds: p50 and p99.
//! 3. Load: `<clients>` clients (one HTTP client each) start `<procs>` / `<clients>`
//!    commands each at once over Connect JSON; every command waits until all have
//!    started (a barrier file, polled every 0.25 s), then writes `seq 1 100000`
//!    (588,895 bytes). Each
//!    output is compared with the expected bytes; errors and wrong outputs are counted.
//!    Meanwhile the probe keeps running `Start(/bin/true)`: its p50 and p99 under load
//!    next to the idle figures, and the Start → start-event latency of the 1,000.
//! 4. guestd's RSS: idle, peak (VmHWM), 5 s and 10 s after the load.
//!
//! Run: `cargo bench --bench streams -- [procs] [clients]` (defaults 1000 100);
//! `GUESTD_BENCH_ARGS` adds guestd flags.

#![allow(clippy::disallowed_methods)] // the floor spawns commands directly, on purpose

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::bench::{mib, rss_kib, start_req};
use common::storm::quantile;
use common::{Codec, Guestd};
use guestd::proto::process as pb;
use tokio::io::AsyncReadExt as _;

const SEQ_TO: u32 = 100_000;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One `Start` over Connect JSON: (time to the start event, stdout, exit code).
async fn run_one(
    c: &common::Client,
    req: &pb::StartRequest,
    started: &AtomicU64,
) -> Result<(Duration, Vec<u8>, i32), String> {
    let t = Instant::now();
    let mut s = c
        .server_stream(Codec::Json, "/process.Process/Start", req, &[])
        .await;
    if s.status != http::StatusCode::OK {
        return Err(format!("HTTP {}", s.status));
    }
    let first: pb::StartResponse = s
        .next_message()
        .await
        .map_err(|e| format!("no start event: {e}"))?;
    let latency = t.elapsed();
    let pid = match first.event.and_then(|e| e.event) {
        Some(pb::process_event::Event::Start(st)) => st.pid,
        other => return Err(format!("first event is not start: {other:?}")),
    };
    started.fetch_add(1, Ordering::SeqCst);
    let r = common::collect_rest(&mut s, pid).await;
    match r.end {
        Some(e) => Ok((latency, r.stdout, e.exit_code)),
        None => Err(r.end_of_stream.to_string()),
    }
}

/// `Start(/bin/true)` round trips until `stop`; the latencies.
async fn probe(c: common::Client, stop: Arc<AtomicBool>, min: Duration) -> Vec<Duration> {
    let req = start_req("/bin/true", &[]);
    let mut v = Vec::new();
    let t0 = Instant::now();
    let started = AtomicU64::new(0);
    while !stop.load(Ordering::Relaxed) || t0.elapsed() < min {
        let t = Instant::now();
        match run_one(&c, &req, &started).await {
            Ok((_, _, 0)) => v.push(t.elapsed()),
            other => panic!("probe /bin/true failed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    v
}

fn main() {
    let mut nums = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<usize>().ok());
    let procs = nums.next().unwrap_or(1000).max(1);
    let clients = nums.next().unwrap_or(100).clamp(1, procs);
    // A thousand connections and the floor's pipes need more than a default 1024 fds.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let expected: Arc<Vec<u8>> = Arc::new(
        (1..=SEQ_TO)
            .map(|i| format!("{i}\n"))
            .collect::<String>()
            .into_bytes(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let barrier = dir.path().join("go");
    // Waits until the barrier file exists, polling every 0.25 s with a `read` timeout on
    // its open stdin pipe (no extra process per poll: one pid per command).
    let script = format!(
        "while [ ! -e {b} ]; do read -t 0.25 _; done; exec seq 1 {SEQ_TO}",
        b = barrier.display()
    );
    let mut req = start_req("/bin/bash", &["-c", &script]);
    req.stdin = Some(true);

    // 1. The floor.
    let t = Instant::now();
    let floor_ok = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..procs {
            let expected = expected.clone();
            tasks.push(tokio::spawn(async move {
                let mut child = tokio::process::Command::new("seq")
                    .args(["1", &SEQ_TO.to_string()])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn seq");
                let mut out = Vec::new();
                child
                    .stdout
                    .take()
                    .expect("stdout")
                    .read_to_end(&mut out)
                    .await
                    .expect("read");
                child.wait().await.expect("wait").success() && out == *expected
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.expect("floor task"));
        }
        ok
    });
    let floor = t.elapsed();
    assert_eq!(floor_ok, procs, "the floor's own outputs are wrong");

    let extra = std::env::var("GUESTD_BENCH_ARGS").unwrap_or_default();
    let pids = (procs * 3 + 256).to_string();
    let mut args = vec![
        "--default-user",
        "root",
        "--no-code-interpreter",
        "--user-pids-max",
        &pids,
    ];
    args.extend(extra.split_whitespace());
    let g = Guestd::start_with(&args);
    let base = g.base();
    let pid = g.pid();
    std::thread::sleep(Duration::from_secs(2));
    let (idle_rss, _) = rss_kib(pid);

    // 2. Idle probe.
    let idle = rt.block_on(probe(
        common::Client::new(&base),
        Arc::new(AtomicBool::new(true)),
        Duration::from_secs(3),
    ));

    // 3. Load.
    let errors = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let (start_lat, loaded, all_started, wall) = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let probe_task = tokio::spawn(probe(
            common::Client::new(&base),
            stop.clone(),
            Duration::ZERO,
        ));
        let mut handles = Vec::new();
        let per = procs.div_ceil(clients);
        for chunk in 0..clients {
            let c = common::Client::new(&base);
            let n = per.min(procs.saturating_sub(chunk * per));
            for _ in 0..n {
                let (c, req, expected) = (c.clone(), req.clone(), expected.clone());
                let (errors, wrong, ok, started) =
                    (errors.clone(), wrong.clone(), ok.clone(), started.clone());
                handles.push(tokio::spawn(async move {
                    match run_one(&c, &req, &started).await {
                        Ok((lat, out, code)) => {
                            if code == 0 && out == *expected {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                wrong.fetch_add(1, Ordering::Relaxed);
                                eprintln!(
                                    "wrong output: exit {code}, {} bytes of {}",
                                    out.len(),
                                    expected.len()
                                );
                            }
                            Some(lat)
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("error: {e}");
                            None
                        }
                    }
                }));
            }
        }
        // Open the barrier once every process has started (or after 120 s).
        let deadline = Instant::now() + Duration::from_secs(120);
        while started.load(Ordering::SeqCst) < procs as u64 && Instant::now() < deadline {
            if errors.load(Ordering::Relaxed) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all_started = t.elapsed();
        std::fs::write(&barrier, b"").expect("barrier");
        let mut lat = Vec::new();
        for h in handles {
            if let Some(l) = h.await.expect("stream task") {
                lat.push(l);
            }
        }
        let wall = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        let loaded = probe_task.await.expect("probe");
        (lat, loaded, all_started, wall)
    });
    let (_, peak) = rss_kib(pid);
    std::thread::sleep(Duration::from_secs(5));
    let (after, _) = rss_kib(pid);
    // The allocator janitor gives memory back every 5 s at most (D20).
    std::thread::sleep(Duration::from_secs(5));
    let (after10, _) = rss_kib(pid);

    let (ok, errors, wrong) = (
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed),
    );
    let streamed = wall.saturating_sub(all_started);
    println!(
        "## {procs} processes streaming at once to {clients} clients (seq 1 {SEQ_TO} each, {:.0} MB in all)",
        (procs * expected.len()) as f64 / 1e6
    );
    println!("| | figure |");
    println!("|---|---:|");
    println!("| outputs intact | {ok} / {procs} (errors {errors}, wrong {wrong}) |");
    println!(
        "| floor: {procs} × seq spawned and read by the bench, wall | {:.2} s |",
        floor.as_secs_f64()
    );
    println!(
        "| guestd: all {procs} started (barrier opened) | {:.2} s |",
        all_started.as_secs_f64()
    );
    println!(
        "| guestd: barrier → last end (all outputs streamed) | {:.2} s = {:.2} × floor |",
        streamed.as_secs_f64(),
        streamed.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "| Start → start event of the {procs}, p50 / p99 | {:.1} / {:.1} ms |",
        ms(quantile(&start_lat, 0.5)),
        ms(quantile(&start_lat, 0.99))
    );
    println!(
        "| probe Start(/bin/true) idle, p50 / p99 ({} runs) | {:.2} / {:.2} ms |",
        idle.len(),
        ms(quantile(&idle, 0.5)),
        ms(quantile(&idle, 0.99))
    );
    println!(
        "| probe Start(/bin/true) under load, p50 / p99 ({} runs) | {:.2} / {:.2} ms (p99 = {:.2} × p50) |",
        loaded.len(),
        ms(quantile(&loaded, 0.5)),
        ms(quantile(&loaded, 0.99)),
        quantile(&loaded, 0.99).as_secs_f64() / quantile(&loaded, 0.5).as_secs_f64().max(1e-9)
    );
    println!(
        "| guestd RSS idle / peak / 5 s after / 10 s after | {:.1} / {:.1} / {:.1} / {:.1} MiB |",
        mib(idle_rss),
        mib(peak),
        mib(after),
        mib(after10)
    );
    assert_eq!(ok as usize, procs, "outputs lost or wrong");
    drop(g);
}
