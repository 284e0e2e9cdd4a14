//! Process benchmarks, each side by side with its floor measured in the same run:
//!
//! * `Start(/bin/true)` → `end` round trip over Connect JSON, Connect proto and gRPC,
//!   against a bare spawn-and-wait of `/bin/true` from this process;
//! * 1 GiB of a process's stdout streamed to a client (Connect proto and JSON), against
//!   a plain pipe copy of the same command's output into this process;
//! * where a command's cgroup placement goes: the leaves made and the moves into each
//!   hierarchy guestd placed a command in, done by the bench on a sleeping process;
//! * what a Start costs guestd itself (CPU time and context switches of all its threads)
//!   and what waking a thread costs on this machine (pipe ping-pong);
//! * guestd's RSS (current and peak) after the runs.
//!
//! Run: `cargo bench --bench process` (optionally `-- <iterations>`).

#![allow(clippy::disallowed_methods)] // the floor spawns /bin/true directly, on purpose

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read as _;
use std::time::{Duration, Instant};

use common::bench::{rss_kib, start_req};
use common::{Codec, Guestd};
use guestd::proto::process as pb;

#[allow(clippy::all, dead_code)]
mod grpc {
    include!(concat!(env!("OUT_DIR"), "/grpc_client/process.rs"));
}

struct Stats {
    median: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median: at(0.5),
        p99: at(0.99),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs one Start over Connect and returns when the end event arrived; returns the
/// number of stdout bytes seen.
async fn connect_run(c: &common::Client, codec: Codec, req: &pb::StartRequest) -> usize {
    let mut s = c
        .server_stream(codec, "/process.Process/Start", req, &[])
        .await;
    let mut bytes = 0;
    loop {
        match s.next_frame().await {
            Some(common::Frame::Message(b)) => {
                let m: pb::StartResponse = codec.decode(&b);
                match m.event.and_then(|e| e.event) {
                    Some(pb::process_event::Event::Data(d)) => {
                        if let Some(pb::process_event::data_event::Output::Stdout(b)) = d.output {
                            bytes += b.len();
                        }
                    }
                    Some(pb::process_event::Event::End(_)) => {}
                    _ => {}
                }
            }
            Some(common::Frame::End(v)) => {
                assert_eq!(v, serde_json::json!({}), "stream failed");
                return bytes;
            }
            None => panic!("stream ended without end-of-stream"),
        }
    }
}

async fn grpc_run(c: &mut grpc::process_client::ProcessClient<tonic::transport::Channel>) {
    let req = grpc::StartRequest {
        process: Some(grpc::ProcessConfig {
            cmd: "/bin/true".into(),
            args: vec![],
            envs: Default::default(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    let mut s = c.start(req).await.expect("start").into_inner();
    while s.message().await.expect("stream").is_some() {}
}

fn main() {
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Extra guestd flags for experiments, e.g. GUESTD_BENCH_ARGS=--no-cgroups.
    let extra = std::env::var("GUESTD_BENCH_ARGS").unwrap_or_default();
    let mut args = vec!["--default-user", "root", "--no-code-interpreter"];
    args.extend(extra.split_whitespace());
    let g = Guestd::start_with(&args);
    let client = g.client();

    // Warm up both sides.
    for _ in 0..20 {
        std::process::Command::new("/bin/true")
            .status()
            .expect("true");
        rt.block_on(connect_run(
            &client,
            Codec::Proto,
            &start_req("/bin/true", &[]),
        ));
    }

    let mut bare = Vec::new();
    let mut json = Vec::new();
    let mut proto = Vec::new();
    let mut grpc_t = Vec::new();
    let mut gc = rt.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", g.port))
                .expect("endpoint")
                .connect()
                .await
                .expect("grpc");
        grpc::process_client::ProcessClient::new(channel)
    });
    let req = start_req("/bin/true", &[]);
    // Interleave the variants so drift on the machine hits all of them alike.
    for _ in 0..iterations {
        let t = Instant::now();
        let st = std::process::Command::new("/bin/true")
            .status()
            .expect("true");
        bare.push(t.elapsed());
        assert!(st.success());

        let t = Instant::now();
        rt.block_on(connect_run(&client, Codec::Json, &req));
        json.push(t.elapsed());

        let t = Instant::now();
        rt.block_on(connect_run(&client, Codec::Proto, &req));
        proto.push(t.elapsed());

        let t = Instant::now();
        rt.block_on(grpc_run(&mut gc));
        grpc_t.push(t.elapsed());
    }
    let bare = stats(bare);
    println!("## Start(/bin/true) -> end round trip ({iterations} iterations each)\n");
    println!("| variant | median µs | p99 µs | median ratio to bare spawn |");
    println!("|---|---:|---:|---:|");
    println!(
        "| bare spawn+wait (floor) | {:.0} | {:.0} | 1.00 |",
        us(bare.median),
        us(bare.p99)
    );
    for (name, v) in [
        ("Connect JSON", json),
        ("Connect proto", proto),
        ("gRPC", grpc_t),
    ] {
        let s = stats(v);
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} |",
            us(s.median),
            us(s.p99),
            s.median.as_secs_f64() / bare.median.as_secs_f64()
        );
    }

    // 1 GiB through a plain pipe vs through guestd (median of three, interleaved).
    const GIB: usize = 1 << 30;
    let cmd = ["-c", "1073741824", "/dev/zero"];
    let (mut pipe_t, mut proto_t, mut json_t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let mut child = std::process::Command::new("head")
            .args(cmd)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("head");
        let mut out = child.stdout.take().expect("stdout");
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        loop {
            let r = out.read(&mut buf).expect("read");
            if r == 0 {
                break;
            }
            n += r;
        }
        child.wait().expect("wait");
        pipe_t.push(t.elapsed());
        assert_eq!(n, GIB);

        for (codec, v) in [(Codec::Proto, &mut proto_t), (Codec::Json, &mut json_t)] {
            let t = Instant::now();
            let got = rt.block_on(connect_run(&client, codec, &start_req("head", &cmd)));
            v.push(t.elapsed());
            assert_eq!(got, GIB);
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let pipe_s = median(pipe_t);
    let mbps = |s: f64| GIB as f64 / s / 1e6;
    println!("\n## 1 GiB of stdout (median of 3)\n");
    println!("| path | seconds | MB/s | throughput / pipe |");
    println!("|---|---:|---:|---:|");
    println!(
        "| plain pipe copy (floor) | {pipe_s:.2} | {:.0} | 1.00 |",
        mbps(pipe_s)
    );
    for (name, v) in [("Connect proto", proto_t), ("Connect JSON", json_t)] {
        let s = median(v);
        println!(
            "| guestd Start stream, {name} | {s:.2} | {:.0} | {:.2} |",
            mbps(s),
            pipe_s / s
        );
    }

    cgroup_costs(&rt, &client, iterations.min(200));
    agent_costs(&rt, &client, g.pid(), iterations.max(300));
    wake_costs();

    let (rss, hwm) = rss_kib(g.pid());
    println!("\n## guestd memory\n");
    println!(
        "RSS after the runs: {} KiB; peak RSS (VmHWM): {} KiB",
        rss, hwm
    );
}

/// Nanoseconds on CPU of every thread of `pid` so far, and its context switches.
fn cpu_and_switches(pid: u32) -> (u64, u64) {
    let (mut ns, mut sw) = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for t in tasks.flatten() {
        let p = t.path();
        if let Ok(s) = std::fs::read_to_string(p.join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(s) = std::fs::read_to_string(p.join("status")) {
            sw += s
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    (ns, sw)
}

/// What one `Start(/bin/true)` costs guestd itself: CPU time over all its threads and
/// context switches (from /proc, around `n` sequential Connect JSON round trips), next to
/// the floor's wall time and the floor's own spawning thread.
fn agent_costs(rt: &tokio::runtime::Runtime, client: &common::Client, pid: u32, n: usize) {
    let req = start_req("/bin/true", &[]);
    let (ns0, sw0) = cpu_and_switches(pid);
    let t = Instant::now();
    for _ in 0..n {
        rt.block_on(connect_run(client, Codec::Json, &req));
    }
    let wall = t.elapsed();
    let (ns1, sw1) = cpu_and_switches(pid);
    let me = std::process::id();
    let thread_ns = || {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (f0, t0) = (thread_ns(), Instant::now());
    for _ in 0..n {
        std::process::Command::new("/bin/true")
            .status()
            .expect("true");
    }
    let (f1, fwall) = (thread_ns(), t0.elapsed());
    let per = |d: u64| d as f64 / n as f64 / 1e3;
    println!("\n## What a Start costs guestd ({n} sequential Connect JSON `/bin/true`)\n");
    println!("| figure | per Start |");
    println!("|---|---:|");
    println!(
        "| round trip, wall (floor: bare spawn + wait, {:.0} µs) | {:.0} µs |",
        fwall.as_secs_f64() * 1e6 / n as f64,
        wall.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "| guestd's CPU time, all threads | {:.0} µs |",
        per(ns1.saturating_sub(ns0))
    );
    println!(
        "| the floor's spawning thread's CPU time (pid {me}) | {:.0} µs |",
        per(f1.saturating_sub(f0))
    );
    println!(
        "| guestd's context switches, all threads | {:.1} |",
        sw1.saturating_sub(sw0) as f64 / n as f64
    );
}

/// What waking a thread costs on this machine: two threads pass a byte back and forth
/// through pipes, on different CPUs and then both on CPU 0.
fn wake_costs() {
    fn pingpong(pin: Option<usize>, rounds: usize) -> f64 {
        let (a_r, a_w) = nix::unistd::pipe().expect("pipe");
        let (b_r, b_w) = nix::unistd::pipe().expect("pipe");
        let pin_to = |cpu: usize| {
            // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it;
            // sched_setaffinity reads it for the calling thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
        };
        let other = std::thread::spawn(move || {
            if let Some(c) = pin {
                pin_to(c);
            }
            let mut b = [0u8; 1];
            for _ in 0..rounds {
                nix::unistd::read(&a_r, &mut b).expect("read");
                nix::unistd::write(&b_w, &b).expect("write");
            }
        });
        let me = std::thread::spawn(move || {
            if let Some(c) = pin {
                pin_to(c);
            }
            let mut b = [0u8; 1];
            let t = Instant::now();
            for _ in 0..rounds {
                nix::unistd::write(&a_w, &b).expect("write");
                nix::unistd::read(&b_r, &mut b).expect("read");
            }
            t.elapsed()
        });
        let took = me.join().expect("pingpong");
        other.join().expect("pingpong");
        // Two wakeups per round.
        took.as_secs_f64() * 1e6 / rounds as f64 / 2.0
    }
    let cross = pingpong(None, 20_000);
    let same = pingpong(Some(0), 20_000);
    println!("\n## Waking a thread here (pipe ping-pong, 20,000 rounds)\n");
    println!("| case | µs per wakeup |");
    println!("|---|---:|");
    println!("| threads free to run on either CPU | {cross:.1} |");
    println!("| both threads on CPU 0 | {same:.1} |");
}

/// Where a command's cgroup placement goes: the kernel work guestd does for every
/// `Start` (a leaf made in each leaf hierarchy, the child moved into each), done here
/// on a sleeping process in the same hierarchies, timed step by step.
fn cgroup_costs(rt: &tokio::runtime::Runtime, client: &common::Client, n: usize) {
    // Where guestd puts a command: its own /proc/self/cgroup.
    let mut s = rt.block_on(client.server_stream(
        Codec::Json,
        "/process.Process/Start",
        &start_req("cat", &["/proc/self/cgroup"]),
        &[],
    ));
    let run = rt.block_on(common::collect(&mut s));
    let placed = String::from_utf8_lossy(&run.stdout).into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // (mount point, fs type, super options) of every cgroup mount.
    let cg_mounts: Vec<(String, String, String)> = mounts
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mnt = pre.split_whitespace().nth(4)?.to_string();
            let mut post = post.split_whitespace();
            let fstype = post.next()?.to_string();
            let opts = post.nth(1).unwrap_or("").to_string();
            fstype.starts_with("cgroup").then_some((mnt, fstype, opts))
        })
        .collect();
    // Directories guestd's child joined (path within its hierarchy's mount).
    let mut joined = Vec::new();
    for line in placed.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let mount = cg_mounts.iter().find(|(_, t, o)| {
            if ctrl.is_empty() {
                t == "cgroup2"
            } else {
                t == "cgroup" && ctrl.split(',').all(|c| o.split(',').any(|x| x == c))
            }
        });
        let Some((mnt, _, _)) = mount else { continue };
        let dir = std::path::PathBuf::from(format!("{mnt}{path}"));
        // Only what guestd placed the command in (its user group or a leaf of it).
        if path.contains("/guestd-user") || path.contains("/user/") || path.ends_with("/user") {
            joined.push(dir);
        }
    }
    if joined.is_empty() {
        println!(
            "\n## cgroup placement\n\nguestd placed commands in no cgroup of its own (cgroups off or unavailable)."
        );
        return;
    }
    let mut sleeper = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("sleep");
    let pid = sleeper.id().to_string();
    let home: Vec<std::path::PathBuf> = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            let (mnt, _, _) = cg_mounts.iter().find(|(_, t, o)| {
                if ctrl.is_empty() {
                    t == "cgroup2"
                } else {
                    t == "cgroup" && ctrl.split(',').all(|c| o.split(',').any(|x| x == c))
                }
            })?;
            Some(std::path::PathBuf::from(format!("{mnt}{path}")))
        })
        .collect();
    let mut mkdir_t = Vec::new();
    let mut moves: Vec<Vec<Duration>> = vec![Vec::new(); joined.len()];
    let mut total = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let mut targets = Vec::new();
        let t = Instant::now();
        for d in &joined {
            let is_leaf = d
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("cmd-"));
            if is_leaf {
                let leaf = d.with_file_name(format!("bench-{}-{i}", std::process::id()));
                std::fs::create_dir(&leaf).expect("mkdir leaf");
                targets.push((leaf, true));
            } else {
                targets.push((d.clone(), false));
            }
        }
        mkdir_t.push(t.elapsed());
        for (k, (dir, _)) in targets.iter().enumerate() {
            let t = Instant::now();
            std::fs::write(dir.join("cgroup.procs"), &pid).expect("join");
            moves[k].push(t.elapsed());
        }
        total.push(t0.elapsed());
        // Back home (untimed), then remove the leaves.
        for h in &home {
            let _ = std::fs::write(h.join("cgroup.procs"), &pid);
        }
        for (dir, leaf) in &targets {
            if *leaf {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    println!("\n## cgroup placement per command ({n} times, a sleeping process)\n");
    println!("| step | median µs | p99 µs |");
    println!("|---|---:|---:|");
    let m = stats(mkdir_t);
    println!(
        "| mkdir of the leaves (guestd: made ahead and reused, D73) | {:.0} | {:.0} |",
        us(m.median),
        us(m.p99)
    );
    for (k, v) in moves.into_iter().enumerate() {
        let s = stats(v);
        let v2 = cg_mounts
            .iter()
            .any(|(mnt, t, _)| t == "cgroup2" && joined[k].starts_with(mnt));
        let note = if v2 {
            " (guestd: created there by clone3, no move)"
        } else {
            ""
        };
        println!(
            "| move into {}{note} | {:.0} | {:.0} |",
            joined[k].display(),
            us(s.median),
            us(s.p99)
        );
    }
    let t = stats(total);
    println!(
        "| **all of it** | **{:.0}** | {:.0} |",
        us(t.median),
        us(t.p99)
    );
}
