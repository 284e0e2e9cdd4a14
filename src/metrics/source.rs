//! Where samples come from: `/proc/stat`, `/proc/meminfo`, `statfs("/")`, and the
//! limits of the cgroup guestd runs in when it runs under one.

use std::path::{Path, PathBuf};

/// Aggregate CPU jiffies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    /// Busy percentage since `prev`, rounded to two decimals; 0 when no time passed.
    pub fn busy_pct_since(&self, prev: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(prev.total);
        if total == 0 {
            return 0.0;
        }
        let busy = self.busy.saturating_sub(prev.busy).min(total);
        ((busy as f64 / total as f64) * 10_000.0).round() / 100.0
    }
}

/// Memory in bytes, in the contract's definitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemInfo {
    pub total: u64,
    pub used: u64,
    pub cache: u64,
}

/// Readings of the machine.
pub trait Source: Send + 'static {
    fn now_unix(&self) -> i64;
    fn cpu_count(&self) -> u32;
    fn cpu_times(&self) -> Option<CpuTimes>;
    fn mem_info(&self) -> MemInfo;
    /// (total, used) bytes of the root filesystem.
    fn disk_usage(&self) -> (u64, u64);
}

/// The real machine, with the cgroup (v2) guestd runs in when it sets limits.
#[derive(Debug, Clone)]
pub struct SystemSource {
    /// The cgroup v2 directory of this process, when cgroup2 is mounted.
    cgroup: Option<PathBuf>,
}

impl SystemSource {
    pub fn detect() -> Self {
        SystemSource {
            cgroup: own_cgroup_dir(),
        }
    }

    fn cgroup_file(&self, name: &str) -> Option<String> {
        let dir = self.cgroup.as_ref()?;
        std::fs::read_to_string(dir.join(name)).ok()
    }
}

/// The cgroup v2 directory of this process (`0::<path>` in /proc/self/cgroup under the
/// cgroup2 mount), if any.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mount = cgroup2_mount()?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// Where cgroup2 is mounted (`/sys/fs/cgroup` on pure v2 hosts, often
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

fn parse_limit(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" { None } else { s.parse().ok() }
}

/// `/proc/stat`'s first line into busy and total jiffies (iowait counts as idle).
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest fields are in user/nice).
    // Saturating: counters near u64::MAX (a fake or corrupt /proc) must not overflow.
    let idle = v[3].saturating_add(v.get(4).copied().unwrap_or(0));
    let total = v.iter().take(8).fold(0u64, |a, &b| a.saturating_add(b));
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// `/proc/meminfo` into the contract's memory figures (bytes, saturating).
pub fn parse_meminfo(text: &str) -> MemInfo {
    let kb = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    let total = kb("MemTotal:");
    let cache = kb("Cached:").saturating_add(kb("SReclaimable:"));
    let used = total
        .saturating_sub(kb("MemFree:"))
        .saturating_sub(kb("Buffers:"))
        .saturating_sub(cache);
    MemInfo { total, used, cache }
}

impl Source for SystemSource {
    fn now_unix(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    fn cpu_count(&self) -> u32 {
        let online = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        // A cgroup CPU quota caps the usable CPUs (rounded up).
        if let Some(max) = self.cgroup_file("cpu.max") {
            let mut f = max.split_whitespace();
            if let (Some(q), Some(p)) = (f.next(), f.next())
                && let (Some(q), Ok(p)) = (parse_limit(q), p.parse::<u64>())
                && p > 0
            {
                return online.min(q.div_ceil(p).max(1) as u32);
            }
        }
        online
    }

    fn cpu_times(&self) -> Option<CpuTimes> {
        parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn mem_info(&self) -> MemInfo {
        let mut m = parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
        // Under a cgroup memory limit, the limit is the machine as far as we can tell.
        if let Some(limit) = self
            .cgroup_file("memory.max")
            .as_deref()
            .and_then(parse_limit)
            && limit < m.total
        {
            let current = self
                .cgroup_file("memory.current")
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let file = self
                .cgroup_file("memory.stat")
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("file "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            m = MemInfo {
                total: limit,
                used: current.saturating_sub(file),
                cache: file,
            };
        }
        m
    }

    fn disk_usage(&self) -> (u64, u64) {
        disk_usage(Path::new("/"))
    }
}

/// (total, used) bytes of the filesystem holding `path`; reserved blocks count as used.
pub fn disk_usage(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let bsize = s.fragment_size();
            let blocks = s.blocks();
            let avail = s.blocks_available();
            (
                blocks.saturating_mul(bsize),
                blocks.saturating_sub(avail).saturating_mul(bsize),
            )
        }
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_counts_iowait_as_idle() {
        let t = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            t,
            CpuTimes {
                busy: 150,
                total: 1000
            }
        );
    }

    /// Fuzz regression (fuzz/regressions/proc_text): counters whose sum overflows u64
    /// panicked with overflow checks on (and wrapped without them).
    #[test]
    fn proc_stat_saturates_huge_counters() {
        let t = parse_proc_stat("cpu 44 .44 4 444 4 44444 4 18446744073709551615\n").unwrap();
        assert_eq!(t.total, u64::MAX);
        assert!(t.busy <= t.total);
        let t = parse_proc_stat("cpu 1 1 1 18446744073709551615 18446744073709551615\n").unwrap();
        assert_eq!(
            t,
            CpuTimes {
                busy: 0,
                total: u64::MAX
            }
        );
    }

    #[test]
    fn busy_pct_rounds_to_two_decimals_and_survives_counter_resets() {
        let a = CpuTimes { busy: 0, total: 0 };
        let b = CpuTimes { busy: 1, total: 3 };
        assert_eq!(b.busy_pct_since(&a), 33.33);
        assert_eq!(a.busy_pct_since(&b), 0.0);
    }

    #[test]
    fn meminfo_follows_the_contract_and_saturates() {
        let m = parse_meminfo(
            "MemTotal: 1000 kB\nMemFree: 200 kB\nBuffers: 100 kB\nCached: 300 kB\nSReclaimable: 50 kB\n",
        );
        assert_eq!(m.total, 1000 * 1024);
        assert_eq!(m.cache, 350 * 1024);
        assert_eq!(m.used, (1000 - 200 - 100 - 350) * 1024);
        let weird = parse_meminfo("MemTotal: 10 kB\nMemFree: 200 kB\n");
        assert_eq!(weird.used, 0);
    }

    #[test]
    fn real_machine_readings_are_plausible() {
        let s = SystemSource::detect();
        assert!(s.cpu_count() >= 1);
        assert!(s.cpu_times().is_some());
        let m = s.mem_info();
        assert!(m.total > 0 && m.used <= m.total);
        let (total, used) = s.disk_usage();
        assert!(total > 0 && used <= total);
    }
}
