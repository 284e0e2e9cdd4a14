//! [`ProcessManager`]: the registry of processes and the tasks that run each one.
//!
//! Per process: one reader task per pipe / PTY master (publishing into the output
//! [`Hub`]), a supervisor task (awaits the exit status from the reaper, then the readers;
//! produces the End), and, with a lifetime timeout, a timer task.
//!
//! End rule (contract 3.3.5): the End follows the exit **and** EOF on every output
//! stream, except after a SendSignal or a lifetime-timeout kill: then, once the process
//! has exited, output held open by stray descendants is waited for at most
//! [`OUTPUT_GRACE`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::error::ProcessError;
use super::output::{Hub, OutputPolicy};
use super::spawn::{self, ParentIo, Spawned};
use super::{
    CommandConfig, ExitInfo, Input, ManagerConfig, OutputKind, ProcessSummary, PtySize, Selector,
    Signal, StartSpec, Subscription, plan,
};
use crate::sys::cgroup::Leaf;

/// After a kill (SendSignal or lifetime timeout) and the exit, how long output that
/// stray descendants keep open is still read before the End is produced.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(250);
/// Read size for stdout/stderr pipes (contract 3.3.4).
const PIPE_READ: usize = 32 * 1024;
/// Read size for a PTY master (contract 3.3.4).
const PTY_READ: usize = 16 * 1024;

type Fd = Arc<AsyncFd<OwnedFd>>;

/// Starts and tracks user processes. Cheap to share: [`ProcessManager::new`] returns an
/// `Arc`.
pub struct ProcessManager {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: ManagerConfig,
    policy: Arc<OutputPolicy>,
    registry: Mutex<Registry>,
}

/// Fixed bookkeeping cost charged per retained ended process (the record, its queue
/// slot and strings), on top of its retained output.
const ENDED_OVERHEAD: usize = 256;

/// What is kept of an ended process until its retention ends.
struct Ended {
    pid: u32,
    tag: Option<String>,
    info: ExitInfo,
    /// Its output, until the retention budget evicts it (then only the End is left).
    hub: Option<Arc<Hub>>,
    /// Output offset after its last byte.
    final_offset: u64,
    at: Instant,
    /// Bytes charged to the retention budget (overhead, strings, retained output).
    cost: usize,
    /// The retained output's part of `cost`.
    output: usize,
}

impl Ended {
    fn matches(&self, sel: &Selector) -> bool {
        match sel {
            Selector::Pid(pid) => self.pid == *pid,
            Selector::Tag(tag) => self.tag.as_deref() == Some(tag.as_str()),
        }
    }

    fn subscribe(&self, replay_from: Option<u64>) -> Subscription {
        match &self.hub {
            Some(hub) => hub.subscribe(self.pid, replay_from),
            None => Subscription::ended(
                self.pid,
                self.final_offset,
                replay_from.is_some(),
                self.info.clone(),
            ),
        }
    }
}

#[derive(Default)]
struct Registry {
    /// Not yet ended, in start order.
    live: Vec<Arc<Proc>>,
    /// Ended within the retention period, oldest first.
    ended: VecDeque<Ended>,
    /// Sum of the `cost` of `ended`.
    ended_cost: usize,
}

impl Registry {
    /// Forgets ended processes older than `ttl`.
    fn prune(&mut self, ttl: Duration) {
        while let Some(front) = self.ended.front() {
            if front.at.elapsed() < ttl {
                break;
            }
            self.ended_cost -= front.cost;
            self.ended.pop_front();
        }
    }

    /// Keeps the ended processes within `budget` bytes: first the oldest retained
    /// outputs go (their End stays), then the oldest records.
    fn enforce_budget(&mut self, budget: usize) {
        for e in self.ended.iter_mut() {
            if self.ended_cost <= budget {
                return;
            }
            if e.hub.take().is_some() {
                self.ended_cost -= e.output;
                e.cost -= e.output;
                e.output = 0;
            }
        }
        while self.ended_cost > budget {
            match self.ended.pop_front() {
                Some(e) => self.ended_cost -= e.cost,
                None => break,
            }
        }
    }

    fn find_live(&self, sel: &Selector) -> Option<Arc<Proc>> {
        // Newest first: a pid can repeat when an exited process's output is still open.
        self.live.iter().rev().find(|p| p.matches(sel)).cloned()
    }

    fn register(&mut self, p: Arc<Proc>) {
        // A new process replaces the retained End of the same pid or tag.
        let before = self.ended.len();
        self.ended
            .retain(|e| e.pid != p.pid && (p.tag.is_none() || e.tag != p.tag));
        if self.ended.len() != before {
            self.ended_cost = self.ended.iter().map(|e| e.cost).sum();
        }
        self.live.push(p);
    }

    fn mark_ended(&mut self, p: &Arc<Proc>, info: &ExitInfo, budget: usize) {
        self.live.retain(|x| !Arc::ptr_eq(x, p));
        let before = self.ended.len();
        self.ended.retain(|e| e.pid != p.pid);
        if self.ended.len() != before {
            self.ended_cost = self.ended.iter().map(|e| e.cost).sum();
        }
        let strings = p.tag.as_ref().map_or(0, String::len)
            + info.status.len()
            + info.error.as_ref().map_or(0, String::len);
        let output = p.hub.retained_bytes();
        let cost = ENDED_OVERHEAD + strings + output;
        self.ended_cost += cost;
        self.ended.push_back(Ended {
            pid: p.pid,
            tag: p.tag.clone(),
            info: info.clone(),
            hub: (output > 0).then(|| p.hub.clone()),
            final_offset: p.hub.next_offset(),
            at: Instant::now(),
            cost,
            output,
        });
        self.enforce_budget(budget);
    }
}

/// One started process.
struct Proc {
    pid: u32,
    tag: Option<String>,
    config: CommandConfig,
    pty: bool,
    hub: Arc<Hub>,
    /// Signals exactly this process while it is unreaped; dropped once reaped (it is
    /// useless then, and retained entries must not pin descriptors).
    pidfd: Mutex<Option<OwnedFd>>,
    /// The stdin pipe's write end (`None`: disabled, closed, or ended).
    stdin: Mutex<Option<Fd>>,
    /// The PTY master, for input and resize (`None` when not a PTY, or ended).
    master: Mutex<Option<Fd>>,
    /// Serializes writers so concurrent inputs never interleave.
    write_turn: tokio::sync::Mutex<()>,
    /// Set by CloseStdin: aborts writers blocked on a full pipe so the fd really closes.
    stdin_closed: watch::Sender<bool>,
    /// The exit status has been collected (the pid may be reused from now on).
    exited: AtomicBool,
    /// A kill was sent: stop waiting for output shortly after the exit.
    abandon: watch::Sender<bool>,
    /// The End has been determined.
    done: watch::Sender<bool>,
    /// Why guestd killed the process, for the end log.
    kill_reason: Mutex<Option<&'static str>>,
    /// The command's own cgroup, when guestd manages cgroups.
    leaf: Option<Arc<Leaf>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections are single assignments / Vec edits: a poisoned lock is still
    // consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Proc {
    fn matches(&self, sel: &Selector) -> bool {
        match sel {
            Selector::Pid(pid) => self.pid == *pid,
            Selector::Tag(tag) => self.tag.as_deref() == Some(tag.as_str()),
        }
    }

    fn pgid(&self) -> i32 {
        // Pids come from fork's i32 result, so this never saturates.
        i32::try_from(self.pid).unwrap_or(i32::MAX)
    }

    /// Sends `sig` to the whole process group (the PTY session's members too); falls
    /// back to the process itself if the group is gone. ESRCH is not an error: the
    /// process is on its way out.
    fn kill_tree(&self, sig: libc::c_int) -> Result<(), ProcessError> {
        let pgid = self.pgid();
        // SAFETY: kill takes no pointers.
        let group = if unsafe { libc::kill(-pgid, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
        if self.pty {
            // Interactive shells put jobs in their own groups within the session.
            kill_session(pgid, sig);
        }
        if let Some(leaf) = &self.leaf {
            // Descendants that left the group or session are still in the leaf.
            leaf.signal_all(sig);
        }
        match group {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                // The group is gone, but the process may have left it (setpgid/setsid).
                // Its pidfd stays valid after the reap (signalling it then is ESRCH);
                // without one, a reaped pid may already belong to someone else.
                let pidfd = lock(&self.pidfd);
                if pidfd.is_none() && self.exited.load(Ordering::SeqCst) {
                    return Ok(());
                }
                match spawn::kill_exact(pgid, pidfd.as_ref(), sig) {
                    Ok(()) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                    Err(e) => Err(ProcessError::Signal(e)),
                }
            }
            Err(e) => Err(ProcessError::Signal(e)),
        }
    }

    fn set_kill_reason(&self, reason: &'static str) {
        lock(&self.kill_reason).get_or_insert(reason);
    }

    /// Drops guestd's input handles (readers hold their own references).
    fn close_io(&self) {
        lock(&self.stdin).take();
        lock(&self.master).take();
        self.stdin_closed.send_replace(true);
    }
}

/// Signals every process whose session id is `sid` (best effort; a /proc scan).
fn kill_session(sid: i32, sig: libc::c_int) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat_session(&stat) == Some(sid) {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Fields of `/proc/<pid>/stat` after the command name: state, ppid, pgrp, session.
pub(crate) fn stat_fields(stat: &str) -> Option<(char, i32, i32, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    let pgrp = it.next()?.parse().ok()?;
    let session = it.next()?.parse().ok()?;
    Some((state, ppid, pgrp, session))
}

fn stat_session(stat: &str) -> Option<i32> {
    stat_fields(stat).map(|f| f.3)
}

impl ProcessManager {
    pub fn new(cfg: ManagerConfig) -> Arc<Self> {
        let policy = OutputPolicy::new(
            cfg.replay_buffer_bytes,
            cfg.replay_budget_bytes,
            cfg.pace_bytes,
            cfg.subscriber_buffer_bytes,
            cfg.stall_timeout,
        );
        let shared = Arc::new(Shared {
            cfg,
            policy,
            registry: Mutex::new(Registry::default()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep_ended(Arc::downgrade(&shared)));
        }
        Arc::new(ProcessManager { shared })
    }

    /// Starts a process. The returned subscription (the Start stream's) was attached
    /// before the child could write, so it sees all output, then the End.
    ///
    /// Runs to completion even if the caller stops polling: once forked, the child is
    /// always registered and supervised.
    pub async fn start(&self, spec: StartSpec) -> Result<Subscription, ProcessError> {
        let shared = self.shared.clone();
        match tokio::spawn(start_inner(shared, spec)).await {
            Ok(r) => r,
            Err(e) => Err(ProcessError::Io(io::Error::other(format!(
                "process start task failed: {e}"
            )))),
        }
    }

    /// Subscribes to a live process, or to one that ended within the retention period
    /// (which yields the replayed data, if asked, and the End). `replay_from`: `None` =
    /// live output only (reference behaviour); `Some(offset)` = retained output from
    /// `offset` first.
    pub fn connect(
        &self,
        sel: &Selector,
        replay_from: Option<u64>,
    ) -> Result<Subscription, ProcessError> {
        let mut reg = lock(&self.shared.registry);
        reg.prune(self.shared.cfg.exit_retention);
        if let Some(p) = reg.find_live(sel) {
            drop(reg);
            return Ok(p.hub.subscribe(p.pid, replay_from));
        }
        reg.ended
            .iter()
            .rev()
            .find(|e| e.matches(sel))
            .map(|e| e.subscribe(replay_from))
            .ok_or_else(|| ProcessError::NotFound(sel.clone()))
    }

    /// Live (not yet ended) processes.
    pub fn list(&self) -> Vec<ProcessSummary> {
        let mut reg = lock(&self.shared.registry);
        reg.prune(self.shared.cfg.exit_retention);
        reg.live
            .iter()
            .map(|p| ProcessSummary {
                pid: p.pid,
                tag: p.tag.clone(),
                config: p.config.clone(),
            })
            .collect()
    }

    pub fn live_count(&self) -> usize {
        lock(&self.shared.registry).live.len()
    }

    /// Ended processes still retained, and the bytes charged for them.
    pub fn retained(&self) -> (usize, usize) {
        let mut reg = lock(&self.shared.registry);
        reg.prune(self.shared.cfg.exit_retention);
        (reg.ended.len(), reg.ended_cost)
    }

    fn find_live(&self, sel: &Selector) -> Result<Arc<Proc>, ProcessError> {
        lock(&self.shared.registry)
            .find_live(sel)
            .ok_or_else(|| ProcessError::NotFound(sel.clone()))
    }

    /// Writes to the stdin pipe or the PTY master. Waits (asynchronously) while the
    /// child does not read; aborted by CloseStdin or the end of the process.
    pub async fn send_input(&self, sel: &Selector, input: Input) -> Result<(), ProcessError> {
        let p = self.find_live(sel)?;
        let (data, is_stdin) = match input {
            Input::Stdin(data) => {
                if p.pty {
                    return Err(ProcessError::IsPty);
                }
                (data, true)
            }
            Input::Pty(data) => {
                if !p.pty {
                    return Err(ProcessError::NotPty);
                }
                (data, false)
            }
        };
        let _turn = p.write_turn.lock().await;
        let fd = if is_stdin {
            lock(&p.stdin)
                .clone()
                .ok_or(ProcessError::StdinNotAvailable)?
        } else {
            lock(&p.master)
                .clone()
                .ok_or_else(|| ProcessError::NotFound(sel.clone()))?
        };
        if data.is_empty() {
            return Ok(());
        }
        let mut closed = p.stdin_closed.subscribe();
        let mut done = p.done.subscribe();
        tokio::select! {
            r = write_all(&fd, &data) => r.map_err(ProcessError::Io),
            _ = closed.wait_for(|c| *c), if is_stdin => Err(ProcessError::StdinNotAvailable),
            _ = done.wait_for(|d| *d) => Err(ProcessError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "process ended before its input was written",
            ))),
        }
    }

    /// Closes the stdin pipe (EOF for the child). Idempotent.
    pub fn close_stdin(&self, sel: &Selector) -> Result<(), ProcessError> {
        let p = self.find_live(sel)?;
        if p.pty {
            return Err(ProcessError::CloseStdinOnPty);
        }
        let fd = lock(&p.stdin).take();
        // Writers blocked on a full pipe hold a reference; make them let go.
        p.stdin_closed.send_replace(true);
        drop(fd);
        Ok(())
    }

    /// Sends SIGTERM/SIGKILL to the process's whole group (PTY: its session) and stops
    /// waiting for output held open by stray descendants shortly after it exits.
    pub fn signal(&self, sel: &Selector, sig: Signal) -> Result<(), ProcessError> {
        let p = self.find_live(sel)?;
        p.kill_tree(sig.as_raw())?;
        p.set_kill_reason(match sig {
            Signal::Term => "SendSignal SIGTERM",
            Signal::Kill => "SendSignal SIGKILL",
        });
        p.abandon.send_replace(true);
        tracing::debug!(pid = p.pid, ?sig, "signal sent to process group");
        Ok(())
    }

    /// Resizes the PTY; `None` is a no-op.
    pub fn resize(&self, sel: &Selector, size: Option<PtySize>) -> Result<(), ProcessError> {
        let p = self.find_live(sel)?;
        let Some(size) = size else {
            return Ok(());
        };
        if !p.pty {
            return Err(ProcessError::NotPty);
        }
        let master = lock(&p.master)
            .clone()
            .ok_or_else(|| ProcessError::NotFound(sel.clone()))?;
        spawn::set_winsize(master.as_raw_fd(), size).map_err(ProcessError::Io)
    }
}

async fn start_inner(shared: Arc<Shared>, spec: StartSpec) -> Result<Subscription, ProcessError> {
    // The cwd is not checked here: the child's `chdir` reports a missing one or a
    // non-directory (ProcessError::CwdMissing / CwdNotDirectory, from spawn), which
    // saves every Start a `stat` on a blocking thread and the hand-offs around it.
    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    let plan = plan::build(&spec, &shared.cfg.agent_path_env, euid, egid).map_err(|e| {
        ProcessError::Spawn(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    })?;

    let cfg = &shared.cfg;
    let hub = Arc::new(Hub::new(shared.policy.clone()));
    // The Start stream's subscription exists before the child can write.
    let mut sub = hub.subscribe(0, None);
    let stdin = spec.stdin && spec.pty.is_none();
    let leaf = match &cfg.cgroups {
        Some(cg) => match cg.create_leaf() {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                tracing::warn!(error = %e, "command runs without its own cgroup");
                None
            }
        },
        None => None,
    };
    let procs = leaf
        .as_ref()
        .map(|l| l.procs_files().to_vec())
        .unwrap_or_default();
    let at_clone = leaf.as_ref().and_then(|l| l.v2_dir());
    let spawned = spawn::spawn(
        plan,
        spec.pty,
        stdin,
        procs,
        at_clone,
        cfg.child_rlimits.clone(),
    )
    .await;
    let Spawned {
        pid,
        waiter,
        pidfd,
        io,
    } = match spawned {
        Ok(s) => s,
        Err(e) => {
            // Nothing runs in the leaf: back to the pool (or removed) by the janitor,
            // off this path and without giving up its descriptor mid-exhaustion.
            if let Some(l) = leaf {
                l.remove_when_empty();
            }
            return Err(e);
        }
    };
    hub.set_pid(pid);
    sub.set_pid(pid);

    let (stdin_fd, master, readers_io) = match io {
        ParentIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => (
            stdin.map(Arc::new),
            None,
            vec![
                (Arc::new(stdout), OutputKind::Stdout, PIPE_READ),
                (Arc::new(stderr), OutputKind::Stderr, PIPE_READ),
            ],
        ),
        ParentIo::Pty { master } => {
            let master = Arc::new(master);
            (
                None,
                Some(master.clone()),
                vec![(master, OutputKind::Pty, PTY_READ)],
            )
        }
    };

    let proc = Arc::new(Proc {
        pid,
        tag: spec.tag.clone(),
        config: spec.config.clone(),
        pty: spec.pty.is_some(),
        hub: hub.clone(),
        pidfd: Mutex::new(pidfd),
        stdin: Mutex::new(stdin_fd),
        master: Mutex::new(master),
        write_turn: tokio::sync::Mutex::new(()),
        stdin_closed: watch::Sender::new(false),
        exited: AtomicBool::new(false),
        abandon: watch::Sender::new(false),
        done: watch::Sender::new(false),
        kill_reason: Mutex::new(None),
        leaf,
    });
    lock(&shared.registry).register(proc.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    // The readers run inside the supervising task (not a task each): every spawned task
    // can wake the other runtime worker, and a Start paid for three.
    let readers: Vec<_> = readers_io
        .into_iter()
        .map(|(fd, kind, cap)| read_loop(fd, kind, cap, hub.clone(), pid, stop_rx.clone()))
        .collect();

    tracing::info!(
        pid,
        cmd = %spec.config.cmd,
        args = ?spec.config.args,
        tag = spec.tag.as_deref(),
        user = %spec.user.name,
        pty = spec.pty.is_some(),
        stdin,
        timeout_ms = spec.timeout.map(|t| t.as_millis() as u64),
        "process started"
    );

    if let Some(timeout) = spec.timeout {
        tokio::spawn(lifetime_timer(proc.clone(), timeout));
    }
    tokio::spawn(supervise(
        Arc::downgrade(&shared),
        proc,
        waiter,
        readers,
        stop_tx,
        Instant::now(),
    ));
    Ok(sub)
}

/// Kills the process tree when its lifetime (the Start request's deadline) expires.
async fn lifetime_timer(proc: Arc<Proc>, timeout: Duration) {
    let mut done = proc.done.subscribe();
    tokio::select! {
        _ = tokio::time::sleep(timeout) => {}
        _ = done.wait_for(|d| *d) => return,
    }
    if *proc.done.borrow() {
        return;
    }
    tracing::warn!(
        pid = proc.pid,
        cmd = %proc.config.cmd,
        timeout_ms = timeout.as_millis() as u64,
        "process lifetime timeout expired (the Start request's deadline; clients pass \
         timeout=0 for no limit): killing its process group with SIGKILL"
    );
    proc.set_kill_reason("lifetime timeout");
    if let Err(e) = proc.kill_tree(libc::SIGKILL) {
        tracing::warn!(pid = proc.pid, error = %e, "lifetime timeout kill failed");
    }
    proc.abandon.send_replace(true);
}

/// Awaits the exit and the output EOFs (or the grace after a kill), then produces the
/// End and moves the process to the retained set.
async fn supervise<R: std::future::Future<Output = ()>>(
    shared: Weak<Shared>,
    proc: Arc<Proc>,
    waiter: crate::sys::reaper::ExitWaiter,
    readers: Vec<R>,
    stop_readers: watch::Sender<bool>,
    started: Instant,
) {
    // The output is read while the process runs (a full pipe would stop it otherwise).
    let readers = futures_util::future::join_all(readers);
    tokio::pin!(readers);
    tokio::pin!(waiter);
    let mut read_all = false;
    let status = loop {
        tokio::select! {
            status = &mut waiter => break status,
            _ = &mut readers, if !read_all => read_all = true,
        }
    };
    proc.exited.store(true, Ordering::SeqCst);
    lock(&proc.pidfd).take();

    let mut abandon = proc.abandon.subscribe();
    let abandoned = !read_all
        && tokio::select! {
            _ = &mut readers => false,
            _ = async {
                let _ = abandon.wait_for(|a| *a).await;
                tokio::time::sleep(OUTPUT_GRACE).await;
            } => true,
        };
    if abandoned {
        // Readers finish the chunk they are publishing, then stop.
        stop_readers.send_replace(true);
        readers.as_mut().await;
    }

    let mut info = ExitInfo::from_status(status);
    if proc.leaf.as_ref().is_some_and(|l| l.oom_kills() > 0) {
        info = info.with_oom_kill();
    }
    proc.close_io();
    if let Some(shared) = shared.upgrade() {
        let mut reg = lock(&shared.registry);
        reg.prune(shared.cfg.exit_retention);
        reg.mark_ended(&proc, &info, shared.cfg.exit_retention_bytes);
    }
    proc.done.send_replace(true);
    let counts = proc.hub.counts();
    tracing::info!(
        pid = proc.pid,
        cmd = %proc.config.cmd,
        status = %info.status,
        exit_code = info.exit_code,
        stdout_bytes = counts.stdout,
        stderr_bytes = counts.stderr,
        pty_bytes = counts.pty,
        duration_ms = started.elapsed().as_millis() as u64,
        killed_by = *lock(&proc.kill_reason),
        oom_killed = info.oom_killed,
        output_abandoned = abandoned,
        "process ended"
    );
    proc.hub.finish(info).await;
    // After the End went out: removing the leaf is not on the client's path.
    if let Some(leaf) = &proc.leaf {
        leaf.clone().remove_when_empty();
    }
}

/// Drops ended processes past their retention, once a second while there are any (one
/// task per manager, not a timer per process).
async fn sweep_ended(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut reg = lock(&shared.registry);
        if !reg.ended.is_empty() {
            reg.prune(shared.cfg.exit_retention);
            if reg.ended.is_empty() {
                reg.ended.shrink_to(16);
            }
        }
    }
}

thread_local! {
    /// The read buffer of every output reader on this thread: a process waiting for
    /// output holds none (a thousand live processes held 32 KiB each before).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One read of at most `cap` bytes: `None` at EOF, else an exact-size copy (the log
/// accounts for chunk lengths, not capacities).
fn read_chunk(fd: &OwnedFd, cap: usize) -> io::Result<Option<Bytes>> {
    READ_BUF.with(|b| {
        let mut buf = b.borrow_mut();
        if buf.len() < cap {
            buf.resize(cap, 0);
        }
        match nix::unistd::read(fd, &mut buf[..cap]).map_err(io::Error::from)? {
            0 => Ok(None),
            n => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
        }
    })
}

/// Reads one stream until EOF (EIO on a PTY master is the normal end), publishing each
/// read as its own chunk.
async fn read_loop(
    fd: Fd,
    kind: OutputKind,
    cap: usize,
    hub: Arc<Hub>,
    pid: u32,
    mut stop: watch::Receiver<bool>,
) {
    'wait: loop {
        let mut guard = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            g = fd.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(pid, ?kind, error = %e, "error polling process output");
                    break;
                }
            },
        };
        // Read until the pipe is empty (each read is its own chunk), then wake the
        // subscribers once for the whole burst.
        loop {
            if *stop.borrow() {
                break 'wait;
            }
            let r = guard.try_io(|inner| read_chunk(inner.get_ref(), cap));
            match r {
                Ok(Ok(None)) => break 'wait,
                Ok(Ok(Some(chunk))) => hub.append(kind, chunk).await,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) if kind == OutputKind::Pty && e.raw_os_error() == Some(libc::EIO) => {
                    break 'wait;
                }
                Ok(Err(e)) => {
                    tracing::warn!(pid, ?kind, error = %e, "error reading process output");
                    break 'wait;
                }
                Err(_would_block) => {
                    hub.flush();
                    continue 'wait;
                }
            }
        }
    }
    hub.flush();
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}
