//! `/files` throughput, each case side by side with its floor measured in the same run.
//!
//! The floor is a raw loopback copy of the same bytes: a plain TCP connection to a
//! server thread that reads and discards them (upload) or writes them from memory
//! (download), with no HTTP, no file and no filesystem work. Nothing serving files over
//! this machine's loopback can beat it, so `guestd / floor` is the share of the raw
//! transfer rate guestd reaches, with everything it does on top (HTTP, path resolution,
//! the atomic temp file + rename, chown, metadata, reading the file).
//!
//! * upload: `POST /files`, octet-stream, identity; 4 KiB, 4 MiB, 1 GiB;
//! * download: `GET /files`, identity, same sizes;
//! * download with `Accept-Encoding: gzip` (what the Python SDK sends on every read) of
//!   incompressible data: the cost of compression (level 1), against the same floor;
//! * guestd's peak RSS (`VmHWM`) after all runs.
//!
//! Both sides use the same client code (blocking sockets, 1 MiB writes, reads into a
//! 1 MiB buffer) and a new connection per operation. guestd's files live on `/dev/shm`
//! when it has room (so the disk does not dominate), else in a temp dir. Floor and
//! guestd iterations alternate, so machine noise hits both alike. Numbers are the
//! median of the iterations, in MB/s (10^6 bytes per second).
//!
//! Run: `cargo bench --bench files` (optionally `-- <1 GiB iterations>`, default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::Guestd;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const BUF: usize = 1 << 20;

/// One buffer of incompressible bytes, sent again and again.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..BUF)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn send_bytes(s: &mut TcpStream, size: u64, data: &[u8]) {
    let mut left = size;
    while left > 0 {
        let n = left.min(data.len() as u64) as usize;
        s.write_all(&data[..n]).expect("send");
        left -= n as u64;
    }
}

/// Reads exactly `size` bytes (discarding them) after `already` bytes were read.
fn recv_bytes(s: &mut TcpStream, mut left: u64, buf: &mut [u8]) {
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want]).expect("recv");
        assert!(n > 0, "connection closed with {left} bytes missing");
        left -= n as u64;
    }
}

/// Reads an HTTP/1.1 response head; returns (status, content-length, body bytes read
/// past the head).
fn read_head(s: &mut TcpStream, buf: &mut [u8]) -> (u16, u64, usize) {
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).expect("read head");
        assert!(n > 0, "connection closed in the response head");
        have += n;
        if let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("status");
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            return (status, len, have - end - 4);
        }
    }
}

fn url_path(p: &Path) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("path", &p.to_string_lossy())
        .finish()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn guestd_upload(port: u16, target: &Path, size: u64, data: &[u8], buf: &mut [u8]) {
    let mut s = connect(port);
    let head = format!(
        "POST /files?{} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {size}\r\nConnection: close\r\n\r\n",
        url_path(target)
    );
    s.write_all(head.as_bytes()).expect("head");
    send_bytes(&mut s, size, data);
    let (status, len, got) = read_head(&mut s, buf);
    assert_eq!(status, 200, "upload failed");
    recv_bytes(&mut s, len - got as u64, buf);
}

fn guestd_download(port: u16, target: &Path, size: u64, gzip: bool, buf: &mut [u8]) -> u64 {
    let mut s = connect(port);
    let ae = if gzip { "gzip" } else { "identity" };
    let head = format!(
        "GET /files?{} HTTP/1.1\r\nHost: bench\r\nAccept-Encoding: {ae}\r\nConnection: close\r\n\r\n",
        url_path(target)
    );
    s.write_all(head.as_bytes()).expect("head");
    let (status, len, got) = read_head(&mut s, buf);
    assert_eq!(status, 200, "download failed");
    if gzip {
        // Chunked and compressed: read to the end (Connection: close).
        let mut total = got as u64;
        loop {
            let n = s.read(buf).expect("recv");
            if n == 0 {
                return total;
            }
            total += n as u64;
        }
    }
    assert_eq!(len, size);
    recv_bytes(&mut s, len - got as u64, buf);
    size
}

/// The floor's server: `u` = receive N bytes (discarded) then ack; `d` = send N bytes.
fn floor_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; BUF];
        let data = pattern();
        for conn in l.incoming() {
            let mut s = conn.expect("accept");
            s.set_nodelay(true).expect("nodelay");
            let mut op = [0u8; 9];
            s.read_exact(&mut op).expect("op");
            let size = u64::from_be_bytes(op[1..].try_into().expect("8 bytes"));
            match op[0] {
                b'u' => {
                    recv_bytes(&mut s, size, &mut buf);
                    s.write_all(b"k").expect("ack");
                }
                _ => send_bytes(&mut s, size, &data),
            }
        }
    });
    port
}

fn floor_upload(port: u16, size: u64, data: &[u8]) {
    let mut s = connect(port);
    let mut op = [b'u'; 9];
    op[1..].copy_from_slice(&size.to_be_bytes());
    s.write_all(&op).expect("op");
    send_bytes(&mut s, size, data);
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).expect("ack");
}

fn floor_download(port: u16, size: u64, buf: &mut [u8]) {
    let mut s = connect(port);
    let mut op = [b'd'; 9];
    op[1..].copy_from_slice(&size.to_be_bytes());
    s.write_all(&op).expect("op");
    recv_bytes(&mut s, size, buf);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mbps(size: u64, d: Duration) -> f64 {
    size as f64 / d.as_secs_f64() / 1e6
}

fn timed(f: &mut impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Runs `a` and `b` alternately `n` times; the median time of each.
fn pair(n: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        ta.push(timed(&mut a));
        tb.push(timed(&mut b));
    }
    (median(ta), median(tb))
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn bench_dir() -> (tempfile::TempDir, &'static str) {
    let shm = Path::new("/dev/shm");
    let roomy = nix::sys::statvfs::statvfs(shm)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()) > 3 * GIB)
        .unwrap_or(false);
    if roomy && let Ok(d) = tempfile::tempdir_in(shm) {
        return (d, "/dev/shm (tmpfs)");
    }
    (tempfile::tempdir().expect("tempdir"), "a temp dir")
}

fn main() {
    let big_iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let (dir, where_) = bench_dir();
    let g = Guestd::start();
    let floor = floor_server();
    let data = pattern();
    let mut buf = vec![0u8; BUF];
    let target = dir.path().join("guestd.bin");

    println!(
        "files benchmark: guestd's files on {where_}; floor = raw loopback TCP copy \
         (memory to memory); median of iterations; MB/s = 10^6 B/s"
    );
    println!();
    println!("| operation | size | raw loopback floor | guestd | guestd / floor |");
    println!("|---|---|---|---|---|");
    let sizes = [
        (4 * KIB, "4 KiB", 300),
        (4 * MIB, "4 MiB", 30),
        (GIB, "1 GiB", big_iterations),
    ];
    for (size, label, n) in sizes {
        // Warm-up (and the files the downloads read).
        floor_upload(floor, size, &data);
        guestd_upload(g.port, &target, size, &data, &mut buf);

        let (f, o) = pair(
            n,
            || floor_upload(floor, size, &data),
            || guestd_upload(g.port, &target, size, &data, &mut buf),
        );
        row("upload", label, size, f, o);

        let mut fbuf = vec![0u8; BUF];
        let (f, o) = pair(
            n,
            || floor_download(floor, size, &mut fbuf),
            || {
                guestd_download(g.port, &target, size, false, &mut buf);
            },
        );
        row("download", label, size, f, o);

        let (f, o) = pair(
            n,
            || floor_download(floor, size, &mut fbuf),
            || {
                guestd_download(g.port, &target, size, true, &mut buf);
            },
        );
        row("download, gzip", label, size, f, o);
    }
    let _ = std::fs::remove_file(&target);
    println!();
    println!(
        "guestd peak RSS (VmHWM) after all runs: {:.1} MiB",
        vm_hwm_kib(g.pid()) as f64 / 1024.0
    );
}

fn row(op: &str, label: &str, size: u64, floor: Duration, ours: Duration) {
    println!(
        "| {op} | {label} | {:.0} MB/s | {:.0} MB/s | {:.2} |",
        mbps(size, floor),
        mbps(size, ours),
        floor.as_secs_f64() / ours.as_secs_f64()
    );
}
