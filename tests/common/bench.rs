//! Helpers the benches share (`benches/*.rs` include `tests/common` by path).

#![allow(dead_code)]

use guestd::proto::process as pb;

/// A `Start` of `cmd` with `args`, no PTY, stdin /dev/null.
pub fn start_req(cmd: &str, args: &[&str]) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: Default::default(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    }
}

/// Fields of `/proc/<pid>/status` read at one moment, in KiB each (`VmRSS:` …); 0 where
/// unreadable.
pub fn status_kib<const N: usize>(pid: u32, names: [&str; N]) -> [u64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// (VmRSS, VmHWM) of `pid` in KiB; 0 where unreadable.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let [rss, hwm] = status_kib(pid, ["VmRSS:", "VmHWM:"]);
    (rss, hwm)
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
