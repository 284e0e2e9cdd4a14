//! Test cgroups: a private cgroup root per test (`--cgroup-root`), cleaned up on drop.

#![allow(dead_code, clippy::disallowed_methods)]

use std::time::Duration;

pub struct TestCgroup {
    pub rel: String,
    pub dirs: Vec<std::path::PathBuf>,
}

impl TestCgroup {
    pub fn create() -> TestCgroup {
        // Unique per test: tests of this binary run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rel = format!("/guestd-ci-{}-{n}", std::process::id());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let mut dirs = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let usable = f[2] == "cgroup2"
                || (f[2] == "cgroup"
                    && f[3]
                        .split(',')
                        .any(|o| matches!(o, "pids" | "memory" | "cpu" | "blkio")));
            if usable {
                let d = std::path::Path::new(f[1]).join(&rel[1..]);
                if std::fs::create_dir_all(&d).is_ok() {
                    dirs.push(d);
                }
            }
        }
        assert!(
            !dirs.is_empty(),
            "the test needs a writable cgroup hierarchy"
        );
        TestCgroup { rel, dirs }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Stragglers first (a failed test may leave processes behind), then bottom-up
        // removal of everything below our directories (leaves, then groups).
        for d in &self.dirs {
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cat $(find {} -name cgroup.procs) 2>/dev/null | xargs -r kill -9",
                    d.display()
                ))
                .status();
        }
        std::thread::sleep(Duration::from_millis(200));
        for d in &self.dirs {
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "find {} -depth -type d -exec rmdir {{}} \\; 2>/dev/null",
                    d.display()
                ))
                .status();
        }
    }
}

/// Processes in the command leaves of the test's user group (largest hierarchy count).
pub fn count_leaf_members(cg: &TestCgroup) -> usize {
    cg.dirs
        .iter()
        .filter_map(|d| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cat {}/user/*/cgroup.procs 2>/dev/null | wc -l",
                    d.display()
                ))
                .output()
                .ok()?;
            String::from_utf8(out.stdout)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

pub fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0
}
