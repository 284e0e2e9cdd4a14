//! cgroups for user processes: a `user` group with a pids and a memory limit, next to
//! guestd's own cgroup, and one leaf per command inside it.
//!
//! The leaf gives each command three things a process group cannot: membership that
//! `setsid`/`setpgid` cannot escape (kill = `cgroup.kill`, or every member), an exact
//! OOM attribution (the leaf's `oom_kill` counter), and a place under the group limits,
//! so a fork bomb or a memory hog runs out of *its* pids and memory, never guestd's.
//!
//! Hierarchies used: cgroup v2 when mounted and writable (always for membership and
//! `cgroup.kill`; for limits when it has the `pids`/`memory` controllers), and on hybrid
//! hosts the cgroup v1 `pids` and `memory` hierarchies for the controllers v2 lacks.
//! Anything unavailable is skipped with a log line, never fatal.
//!
//! Paths given to guestd (`--cgroup-root`) are cgroup paths (as in `/proc/self/cgroup`),
//! resolved in every hierarchy.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Leaves kept made ahead of time. Making a leaf is a `mkdir` in each hierarchy
/// (~120–150 µs of kernel work on a hybrid host, benches/process.rs): a command takes a
/// ready one and the background thread makes the next, so no `Start` waits on it unless
/// more than this many arrive at once.
const POOL_LEAVES: usize = 16;

/// Leaves kept for reuse at most. An ended command's leaf, once empty, goes back to the
/// pool instead of being removed: removing and making leaves costs the kernel ~400 µs
/// of system time per command on a hybrid host (`rmdir` and `mkdir` of a directory in
/// four hierarchies, memory cgroups included), which competes with the commands
/// themselves on a small VM.
const POOL_MAX: usize = 32;

/// How long the janitor thread lets work gather between rounds.
const BATCH: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    V2,
    V1Pids,
    V1Memory,
    /// v1 `cpu`: the group carries the weight of all user work together; each command
    /// gets a leaf, so commands share the group fairly however many processes each runs.
    V1Cpu,
    /// v1 `blkio`: only the group, no leaves.
    V1Blkio,
}

#[derive(Debug, Clone)]
struct Hier {
    kind: Kind,
    /// The `user` group's directory in this hierarchy.
    group: PathBuf,
    /// v2 only: the group has the memory controller for its leaves (memory.events).
    v2_memory: bool,
}

/// Limits and weights of the `user` group.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub pids_max: Option<u64>,
    pub memory_max: Option<u64>,
    /// CPU weight on cgroup v2's scale (1..=10000, default 100); v1 `cpu.shares` get
    /// `weight * 1024 / 100`.
    pub cpu_weight: Option<u64>,
    /// I/O weight on cgroup v2's scale (1..=10000, default 100); v1 `blkio.weight`
    /// (10..=1000, default 500) gets `weight * 5`, clamped.
    pub io_weight: Option<u64>,
}

/// Default CPU weight of the user group: the default (100). The agent's own priority
/// (`--agent-nice`, −10) already serves it first however many processes user code
/// starts (benches/abuse.rs: /health p99 1.1 ms under a fork bomb and CPU hogs at
/// weight 100, 3.4 ms at 10); a lower group weight only slowed user code whenever the
/// agent was busy streaming its output (1 GiB of stdout took 2.3-3.5 s at 10, 1.1 s
/// at 100: D12).
pub const USER_CPU_WEIGHT: u64 = 100;

/// Default I/O weight of the user group: a tenth of everything else's, so a disk filler
/// does not hold up the agent's own reads and writes.
pub const USER_IO_WEIGHT: u64 = 10;

/// Memory figures from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
}

impl MemInfo {
    pub fn read() -> Option<MemInfo> {
        Self::parse(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }

    pub fn parse(text: &str) -> Option<MemInfo> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        };
        let total = field("MemTotal:")?;
        Some(MemInfo {
            total,
            available: field("MemAvailable:").unwrap_or(total),
        })
    }
}

impl Limits {
    /// Limits sized to this machine (see [`Limits::for_machine`]).
    pub fn defaults() -> Limits {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Limits::for_machine(MemInfo::read(), cpus)
    }

    /// * memory: what is available now minus the agent's headroom (a sixteenth of the
    ///   memory, 64 MiB..512 MiB). Taking `MemTotal` instead (the reference's rule)
    ///   ignores what the kernel and everything outside the group already use: the
    ///   group then never reaches its limit and the machine-wide OOM killer, which may
    ///   pick the agent or a kernel, fires first.
    /// * pids: 1024 per CPU (at least 1024, at most 16384), but no more than one per MiB
    ///   of memory (never under 1024): enough for builds and browsers, few enough that a
    ///   fork bomb fills it before it floods the scheduler.
    /// * CPU weight [`USER_CPU_WEIGHT`], I/O weight [`USER_IO_WEIGHT`].
    pub fn for_machine(mem: Option<MemInfo>, cpus: u64) -> Limits {
        let memory_max = mem.map(|m| {
            let headroom = (m.total / 16).clamp(64 << 20, 512 << 20);
            m.available.saturating_sub(headroom).max(64 << 20)
        });
        let by_cpu = (1024 * cpus.max(1)).min(16_384);
        let by_mem = mem.map_or(u64::MAX, |m| (m.total >> 20).max(1024));
        Limits {
            pids_max: Some(by_cpu.min(by_mem)),
            memory_max,
            cpu_weight: Some(USER_CPU_WEIGHT),
            io_weight: Some(USER_IO_WEIGHT),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy (cgroup2 not mounted or not writable, no v1 pids/memory)")]
    Unavailable,
    #[error("cannot create cgroup {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The `user` group in every usable hierarchy, with a pool of ready leaves.
#[derive(Debug)]
pub struct Cgroups {
    inner: Arc<Inner>,
    janitor: Mutex<Option<mpsc::Sender<Job>>>,
}

#[derive(Debug)]
struct Inner {
    hiers: Vec<Hier>,
    next: AtomicU64,
    /// Leaves made ahead of time by the janitor thread.
    pool: Mutex<Vec<Leaf>>,
}

/// Work for the `guestd-cgroups` thread: cgroup directories are made and removed there,
/// never on a request's path.
enum Job {
    Refill,
    Remove(Arc<Leaf>),
}

/// One command's cgroup (a directory per hierarchy).
#[derive(Debug)]
pub struct Leaf {
    dirs: Vec<(Kind, PathBuf, bool)>,
    procs: Vec<CString>,
    /// The cgroup v2 directory (`O_PATH`) and its index in `procs`: the child can be
    /// created in it (`clone3(CLONE_INTO_CGROUP)`) instead of moving there.
    v2_dir: Option<(Arc<OwnedFd>, usize)>,
    /// Where [`Leaf::remove_when_empty`] hands the removal (none: removed inline).
    janitor: Option<mpsc::Sender<Job>>,
    /// The OOM kill counter when this command got the leaf (a reused leaf keeps the
    /// kernel's count of its earlier commands).
    oom_base: u64,
    /// The directories were handed to another command: this handle no longer touches
    /// them.
    released: std::sync::atomic::AtomicBool,
    /// `cgroup.kill` was written. Such a leaf is never reused: on Linux 6.18 a child
    /// created in a cgroup that was ever killed this way (`clone3(CLONE_INTO_CGROUP)`)
    /// is SIGKILLed at birth, even when the kill was long over and the cgroup empty.
    killed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Refill => f.write_str("Refill"),
            Job::Remove(l) => write!(f, "Remove({:?})", l.dirs),
        }
    }
}

struct Mounts {
    v2: Option<PathBuf>,
    v1_pids: Option<PathBuf>,
    v1_memory: Option<PathBuf>,
    v1_cpu: Option<PathBuf>,
    v1_blkio: Option<PathBuf>,
}

fn mounts() -> Mounts {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut m = Mounts {
        v2: None,
        v1_pids: None,
        v1_memory: None,
        v1_cpu: None,
        v1_blkio: None,
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let (path, fstype, opts) = (PathBuf::from(f[1]), f[2], f[3]);
        match fstype {
            "cgroup2" if m.v2.is_none() => m.v2 = Some(path),
            "cgroup" => {
                let opts: Vec<&str> = opts.split(',').collect();
                if opts.contains(&"pids") {
                    m.v1_pids = Some(path.clone());
                }
                if opts.contains(&"memory") {
                    m.v1_memory = Some(path.clone());
                }
                if opts.contains(&"cpu") {
                    m.v1_cpu = Some(path.clone());
                }
                if opts.contains(&"blkio") {
                    m.v1_blkio = Some(path);
                }
            }
            _ => {}
        }
    }
    m
}

/// This process's cgroup path in the v2 hierarchy (`0::`) or a v1 controller's.
fn own_path(controller: Option<&str>) -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_id, ctrls, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        if hit {
            return PathBuf::from(path);
        }
    }
    PathBuf::from("/")
}

fn under(mount: &Path, cgroup_path: &Path) -> PathBuf {
    mount.join(cgroup_path.strip_prefix("/").unwrap_or(cgroup_path))
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value)
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Cgroups {
    /// Creates the `user` group under `root` (a cgroup path; default: next to guestd's
    /// own cgroup in v2, inside it in v1) in every usable hierarchy and applies `limits`.
    pub fn setup(root: Option<&Path>, limits: Limits) -> Result<Cgroups, CgroupError> {
        let m = mounts();
        let name = if root.is_some() {
            "user"
        } else {
            "guestd-user"
        };
        let mut hiers = Vec::new();
        let mut v2_has = (false, false);
        let mut v2_weights = (false, false);

        if let Some(mount) = &m.v2 {
            let base = match root {
                Some(r) => r.to_path_buf(),
                None => {
                    let own = own_path(None);
                    own.parent().map(Path::to_path_buf).unwrap_or(own)
                }
            };
            let base_dir = under(mount, &base);
            let group = base_dir.join(name);
            match mkdir(&group) {
                Ok(()) => {
                    let available = std::fs::read_to_string(base_dir.join("cgroup.controllers"))
                        .unwrap_or_default();
                    let has = |c: &str| available.split_whitespace().any(|x| x == c);
                    let mut enable = Vec::new();
                    if has("pids") {
                        enable.push("+pids");
                    }
                    if has("memory") {
                        enable.push("+memory");
                    }
                    if has("cpu") {
                        enable.push("+cpu");
                    }
                    if has("io") {
                        enable.push("+io");
                    }
                    for e in &enable {
                        if let Err(err) = write(&base_dir.join("cgroup.subtree_control"), e) {
                            tracing::warn!(controller = e, error = %err, "cannot enable a cgroup v2 controller");
                        }
                    }
                    let group_has = std::fs::read_to_string(group.join("cgroup.controllers"))
                        .unwrap_or_default();
                    v2_has = (
                        group_has.split_whitespace().any(|x| x == "pids"),
                        group_has.split_whitespace().any(|x| x == "memory"),
                    );
                    // Leaves need the memory controller for their own memory.events.
                    let v2_memory =
                        v2_has.1 && write(&group.join("cgroup.subtree_control"), "+memory").is_ok();
                    // And the cpu controller to be scheduled as one entity each: a fork
                    // bomb in one command gets the share of one command, not of its
                    // every process, against the others (and against a `kill`).
                    if group_has.split_whitespace().any(|x| x == "cpu") {
                        let _ = write(&group.join("cgroup.subtree_control"), "+cpu");
                    }
                    if v2_has.0 {
                        apply(&group.join("pids.max"), limits.pids_max);
                    }
                    if v2_has.1 {
                        apply(&group.join("memory.max"), limits.memory_max);
                        apply(&group.join("memory.high"), limits.memory_max);
                    }
                    v2_weights = (
                        group_has.split_whitespace().any(|x| x == "cpu"),
                        group_has.split_whitespace().any(|x| x == "io"),
                    );
                    if v2_weights.0 {
                        apply(&group.join("cpu.weight"), limits.cpu_weight);
                    }
                    if v2_weights.1 {
                        apply(
                            &group.join("io.weight"),
                            limits.io_weight.map(|w| w.clamp(1, 10_000)),
                        );
                    }
                    hiers.push(Hier {
                        kind: Kind::V2,
                        group,
                        v2_memory,
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cgroup v2 is not writable"),
            }
        }
        if !v2_has.0
            && let Some(mount) = &m.v1_pids
        {
            let base = root
                .map(Path::to_path_buf)
                .unwrap_or_else(|| own_path(Some("pids")));
            let group = under(mount, &base).join(name);
            match mkdir(&group) {
                Ok(()) => {
                    apply(&group.join("pids.max"), limits.pids_max);
                    hiers.push(Hier {
                        kind: Kind::V1Pids,
                        group,
                        v2_memory: false,
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cgroup v1 pids is not writable"),
            }
        }
        if !v2_has.1
            && let Some(mount) = &m.v1_memory
        {
            let base = root
                .map(Path::to_path_buf)
                .unwrap_or_else(|| own_path(Some("memory")));
            let group = under(mount, &base).join(name);
            match mkdir(&group) {
                Ok(()) => {
                    apply(&group.join("memory.limit_in_bytes"), limits.memory_max);
                    hiers.push(Hier {
                        kind: Kind::V1Memory,
                        group,
                        v2_memory: false,
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cgroup v1 memory is not writable"),
            }
        }
        // Weights on the group (user work as a whole against the agent); commands get
        // a cpu leaf each (like pids and memory), blkio is joined as the group itself.
        let v1_weights = [
            (
                !v2_weights.0,
                &m.v1_cpu,
                "cpu",
                Kind::V1Cpu,
                "cpu.shares",
                limits.cpu_weight.map(|w| (w * 1024 / 100).max(2)),
            ),
            (
                !v2_weights.1,
                &m.v1_blkio,
                "blkio",
                Kind::V1Blkio,
                "blkio.weight",
                limits.io_weight.map(|w| (w * 5).clamp(10, 1000)),
            ),
        ];
        for (wanted, mount, controller, kind, file, value) in v1_weights {
            let (true, Some(mount), Some(value)) = (wanted, mount, value) else {
                continue;
            };
            if hiers.is_empty() {
                // Weights alone are no reason to manage cgroups.
                break;
            }
            let base = root
                .map(Path::to_path_buf)
                .unwrap_or_else(|| own_path(Some(controller)));
            let group = under(mount, &base).join(name);
            match mkdir(&group) {
                Ok(()) => {
                    // blkio.weight exists only with a proportional I/O scheduler (CFQ,
                    // BFQ). Without one the group would change nothing, and joining it
                    // costs every command one more cgroup migration (~50 µs).
                    if !group.join(file).exists() {
                        tracing::debug!(controller, "no {file} here: not applied");
                        let _ = std::fs::remove_dir(&group);
                        continue;
                    }
                    apply(&group.join(file), Some(value));
                    hiers.push(Hier {
                        kind,
                        group,
                        v2_memory: false,
                    });
                }
                Err(e) => tracing::warn!(controller, error = %e, "cgroup v1 is not writable"),
            }
        }
        if hiers.is_empty() {
            return Err(CgroupError::Unavailable);
        }
        tracing::info!(
            groups = ?hiers.iter().map(|h| h.group.display().to_string()).collect::<Vec<_>>(),
            pids_max = limits.pids_max,
            memory_max = limits.memory_max,
            cpu_weight = limits.cpu_weight,
            io_weight = limits.io_weight,
            "user processes run in their own cgroup"
        );
        let inner = Arc::new(Inner {
            hiers,
            next: AtomicU64::new(1),
            pool: Mutex::new(Vec::new()),
        });
        let janitor = start_janitor(Arc::downgrade(&inner));
        Ok(Cgroups {
            inner,
            janitor: Mutex::new(janitor),
        })
    }

    /// The `user` group directories (for tests and logs).
    pub fn group_dirs(&self) -> Vec<PathBuf> {
        self.inner.hiers.iter().map(|h| h.group.clone()).collect()
    }

    fn janitor(&self) -> Option<mpsc::Sender<Job>> {
        self.janitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A fresh leaf for one command: a ready one from the pool (the janitor thread
    /// makes its replacement), or one made now when the pool is empty.
    pub fn create_leaf(&self) -> Result<Leaf, CgroupError> {
        let janitor = self.janitor();
        let (ready, left) = {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|p| p.into_inner());
            (pool.pop(), pool.len())
        };
        // Ended commands' leaves come back to the pool; new ones are made only when it
        // runs low (each message wakes the janitor thread).
        if left < POOL_LEAVES / 2
            && let Some(tx) = &janitor
        {
            let _ = tx.send(Job::Refill);
        }
        let mut leaf = match ready {
            Some(l) => l,
            None => self.inner.make_leaf()?,
        };
        leaf.janitor = janitor;
        Ok(leaf)
    }

    /// Removes the pooled leaves and stops the janitor thread once the leaves in use
    /// are gone (for shutdown).
    pub fn shutdown(&self) {
        self.janitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.drain_pool();
    }
}

/// Puts an ended command's leaf back into the pool, or removes it when the pool is
/// full; false while it still has members or cannot be read (out of descriptors): the
/// caller tries again later, and nothing is freed or reused meanwhile.
fn settle(inner: &Weak<Inner>, leaf: &Arc<Leaf>) -> bool {
    match leaf.is_empty() {
        Some(true) => inner.upgrade().is_some_and(|i| i.recycle(leaf)) || leaf.remove(),
        Some(false) | None => false,
    }
}

/// Starts the `guestd-cgroups` thread. It first removes empty leaves that dead guestd
/// instances left behind, then fills the pool, and from then on refills it and removes
/// the leaves of ended commands (retrying with backoff while members still live). It
/// ends when every sender is gone.
fn start_janitor(inner: Weak<Inner>) -> Option<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name("guestd-cgroups".into())
        .spawn(move || {
            if let Some(i) = inner.upgrade() {
                i.sweep_stale();
                i.refill();
            }
            let mut retry: Vec<(Instant, Duration, Arc<Leaf>)> = Vec::new();
            loop {
                let first = match retry.iter().map(|r| r.0).min() {
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                };
                let mut jobs = Vec::new();
                match first {
                    Ok(job) => jobs.push(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        // Leaves still waiting get one last try.
                        for (_, _, leaf) in retry {
                            leaf.remove();
                        }
                        return;
                    }
                }
                jobs.extend(rx.try_iter());
                let mut refill = false;
                for job in jobs {
                    match job {
                        Job::Refill => refill = true,
                        Job::Remove(leaf) => {
                            if !settle(&inner, &leaf) {
                                let delay = Duration::from_millis(200);
                                retry.push((Instant::now() + delay, delay, leaf));
                            }
                        }
                    }
                }
                if refill && let Some(i) = inner.upgrade() {
                    i.refill();
                }
                let now = Instant::now();
                retry.retain_mut(|(at, delay, leaf)| {
                    if *at > now {
                        return true;
                    }
                    if settle(&inner, leaf) {
                        return false;
                    }
                    *delay = (*delay * 2).min(Duration::from_secs(30));
                    *at = now + *delay;
                    true
                });
                // Let ended commands' leaves gather: one wakeup handles them all
                // instead of one per command (senders wake this thread only while it
                // waits in recv).
                if !refill {
                    std::thread::sleep(BATCH);
                }
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "no cgroup janitor thread: leaves are made per command");
            None
        }
    }
}

impl Inner {
    /// Tops the pool up to [`POOL_LEAVES`].
    fn refill(&self) {
        loop {
            let have = self.pool.lock().unwrap_or_else(|p| p.into_inner()).len();
            if have >= POOL_LEAVES {
                return;
            }
            match self.make_leaf() {
                Ok(l) => self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make a cgroup leaf ahead of time");
                    return;
                }
            }
        }
    }

    /// Puts an ended command's (empty) leaf back into the pool if it has room; the old
    /// handle is released (it no longer signals, lists or removes).
    fn recycle(&self, leaf: &Leaf) -> bool {
        if leaf.released.load(Ordering::SeqCst) || leaf.killed.load(Ordering::SeqCst) {
            return false;
        }
        // Read before taking the lock a Start may be waiting on.
        let oom_base = leaf.oom_count();
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() >= POOL_MAX {
            return false;
        }
        leaf.released.store(true, Ordering::SeqCst);
        let mut fresh = Leaf::new(leaf.dirs.clone(), leaf.procs.clone(), leaf.v2_dir.clone());
        fresh.oom_base = oom_base;
        pool.push(fresh);
        true
    }

    fn drain_pool(&self) {
        let leaves = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|p| p.into_inner()));
        for l in leaves {
            l.remove();
        }
    }

    /// Removes empty `cmd-<pid>-<n>` leaves whose guestd (`pid`) is gone. Leaves with
    /// members stay (rmdir refuses them), and so do those of live instances.
    fn sweep_stale(&self) {
        let me = std::process::id();
        for h in &self.hiers {
            let Ok(entries) = std::fs::read_dir(&h.group) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("cmd-"))
                    .and_then(|n| n.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }

    /// Makes a leaf: a directory in each leaf hierarchy.
    fn make_leaf(&self) -> Result<Leaf, CgroupError> {
        // guestd's pid in the name: leaves of another instance (tests run several) or
        // of a previous run (with stray members) are never reused.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("cmd-{}-{n}", std::process::id());
        let mut dirs = Vec::new();
        let mut procs = Vec::new();
        let mut v2_dir = None;
        for h in &self.hiers {
            if h.kind == Kind::V1Blkio {
                // A group-only hierarchy: the command joins the group itself.
                if let Ok(c) = CString::new(h.group.join("cgroup.procs").as_os_str().as_bytes()) {
                    procs.push(c);
                }
                continue;
            }
            let dir = h.group.join(&name);
            if let Err(source) = std::fs::create_dir(&dir) {
                let e = CgroupError::Create { path: dir, source };
                // Roll back what was made: a half-placed command is worse than none.
                for (_, d, _) in &dirs {
                    let _ = std::fs::remove_dir(d);
                }
                return Err(e);
            }
            let p = dir.join("cgroup.procs");
            if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
                if h.kind == Kind::V2 {
                    v2_dir = open_path(&dir).map(|fd| (Arc::new(fd), procs.len()));
                }
                procs.push(c);
            }
            dirs.push((h.kind, dir, h.v2_memory));
        }
        Ok(Leaf::new(dirs, procs, v2_dir))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.drain_pool();
    }
}

/// Opens a directory as an `O_PATH` descriptor (what `CLONE_INTO_CGROUP` takes).
pub(crate) fn open_path(dir: &Path) -> Option<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .ok()
        .map(OwnedFd::from)
}

fn apply(file: &Path, value: Option<u64>) {
    if let Some(v) = value
        && let Err(e) = write(file, &v.to_string())
    {
        tracing::warn!(file = %file.display(), error = %e, "cannot set a cgroup limit");
    }
}

impl Leaf {
    fn new(
        dirs: Vec<(Kind, PathBuf, bool)>,
        procs: Vec<CString>,
        v2_dir: Option<(Arc<OwnedFd>, usize)>,
    ) -> Leaf {
        Leaf {
            dirs,
            procs,
            v2_dir,
            janitor: None,
            oom_base: 0,
            released: std::sync::atomic::AtomicBool::new(false),
            killed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `cgroup.procs` files the child writes `0` into before exec (joining the leaf
    /// in every hierarchy, and the group in the weight-only v1 hierarchies, without a
    /// window in which it could fork outside).
    pub fn procs_files(&self) -> &[CString] {
        &self.procs
    }

    /// The leaf's cgroup v2 directory and the index in [`Leaf::procs_files`] of the
    /// move it makes unnecessary when the child is created in it.
    pub fn v2_dir(&self) -> Option<(Arc<OwnedFd>, usize)> {
        self.v2_dir.clone()
    }

    /// Processes killed by the OOM killer in this leaf so far.
    pub fn oom_kills(&self) -> u64 {
        if self.released.load(Ordering::SeqCst) {
            return 0;
        }
        self.oom_count().saturating_sub(self.oom_base)
    }

    /// The kernel's OOM kill counter of the leaf (the largest over its hierarchies).
    fn oom_count(&self) -> u64 {
        let mut total = 0;
        for (kind, dir, v2_memory) in &self.dirs {
            let (file, key) = match kind {
                Kind::V2 if *v2_memory => ("memory.events", "oom_kill "),
                Kind::V1Memory => ("memory.oom_control", "oom_kill "),
                _ => continue,
            };
            let n = std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            total = total.max(n);
        }
        total
    }

    /// Whether no process is in the leaf. Every member is in every hierarchy's leaf (the child
    /// joins them all before it can fork), so one directory tells: the first, v2's
    /// where there is one.
    /// `None`: it cannot be read now.
    fn is_empty(&self) -> Option<bool> {
        let Some((_, dir, _)) = self.dirs.first() else {
            return Some(true);
        };
        std::fs::read(dir.join("cgroup.procs"))
            .ok()
            .map(|t| t.is_empty())
    }

    /// Every process in the leaf (any hierarchy).
    pub fn members(&self) -> Vec<i32> {
        let mut out = Vec::new();
        if self.released.load(Ordering::SeqCst) {
            return out;
        }
        for (_, dir, _) in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    if !out.contains(&pid) {
                        out.push(pid);
                    }
                }
            }
        }
        out
    }

    /// Signals every member. SIGKILL uses `cgroup.kill` where the kernel has it (atomic,
    /// even against a fork bomb); otherwise members are signalled until none is left
    /// or a bounded number of rounds passed.
    pub fn signal_all(&self, sig: libc::c_int) {
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        if sig == libc::SIGKILL {
            for (kind, dir, _) in &self.dirs {
                if *kind == Kind::V2 {
                    // Marked before the write: a leaf with a kill in flight is not reused.
                    self.killed.store(true, Ordering::SeqCst);
                    if write(&dir.join("cgroup.kill"), "1").is_ok() {
                        return;
                    }
                }
            }
        }
        let rounds = if sig == libc::SIGKILL { 50 } else { 1 };
        for _ in 0..rounds {
            let members = self.members();
            if members.is_empty() {
                return;
            }
            for pid in members {
                // SAFETY: kill takes no pointers.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }

    /// Removes the leaf once it is empty, on the janitor thread (which retries with
    /// backoff: members such as daemons may outlive their command); without one, now
    /// if possible, else from a background task.
    pub fn remove_when_empty(self: std::sync::Arc<Self>) {
        if let Some(tx) = &self.janitor {
            let tx = tx.clone();
            if tx.send(Job::Remove(self.clone())).is_ok() {
                return;
            }
        }
        if self.remove() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut delay = std::time::Duration::from_millis(200);
            while !self.remove() {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        });
    }

    /// Removes the leaf directories; false while a member still lives (retry later).
    pub fn remove(&self) -> bool {
        if self.released.load(Ordering::SeqCst) {
            // Another command's now.
            return true;
        }
        let mut all = true;
        for (_, dir, _) in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => all = false,
            }
        }
        all
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn meminfo_is_parsed() {
        let m = MemInfo::parse(
            "MemTotal:       24576000 kB\nMemFree: 1 kB\nMemAvailable:   20480000 kB\n",
        )
        .unwrap();
        assert_eq!(m.total, 24_576_000 * 1024);
        assert_eq!(m.available, 20_480_000 * 1024);
        assert_eq!(MemInfo::parse("nothing"), None);
    }

    #[test]
    fn memory_leaves_the_agent_headroom_below_what_is_available() {
        // A 512 MiB sandbox VM right after boot.
        let l = Limits::for_machine(
            Some(MemInfo {
                total: 512 * MIB,
                available: 430 * MIB,
            }),
            2,
        );
        assert_eq!(l.memory_max, Some(430 * MIB - 64 * MIB));
        // This host: 24 GiB, some already used by others.
        let l = Limits::for_machine(
            Some(MemInfo {
                total: 24 * GIB,
                available: 20 * GIB,
            }),
            2,
        );
        assert_eq!(l.memory_max, Some(20 * GIB - 512 * MIB));
        // Nearly nothing available: still a usable floor.
        let l = Limits::for_machine(
            Some(MemInfo {
                total: 512 * MIB,
                available: 10 * MIB,
            }),
            1,
        );
        assert_eq!(l.memory_max, Some(64 * MIB));
    }

    #[test]
    fn pids_follow_cpus_and_memory() {
        let mem = |gib: u64| {
            Some(MemInfo {
                total: gib * GIB,
                available: gib * GIB,
            })
        };
        assert_eq!(Limits::for_machine(mem(24), 2).pids_max, Some(2048));
        assert_eq!(Limits::for_machine(mem(64), 32).pids_max, Some(16_384));
        assert_eq!(Limits::for_machine(mem(8), 16).pids_max, Some(8192));
        // Half a GiB: one per MiB, but never under 1024.
        assert_eq!(
            Limits::for_machine(
                Some(MemInfo {
                    total: 512 * MIB,
                    available: 512 * MIB
                }),
                4
            )
            .pids_max,
            Some(1024)
        );
        assert_eq!(Limits::for_machine(None, 1).pids_max, Some(1024));
        let l = Limits::for_machine(mem(24), 2);
        assert_eq!(
            (l.cpu_weight, l.io_weight),
            (Some(USER_CPU_WEIGHT), Some(USER_IO_WEIGHT))
        );
    }
}
