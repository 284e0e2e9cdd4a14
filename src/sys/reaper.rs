//! The one place in guestd that reaps children.
//!
//! guestd is a child-subreaper (and may be PID 1), so orphaned descendants of user
//! commands are re-parented to it and must be reaped, while the processes it tracks
//! must get their exit status delivered exactly once. Two reapers (for example tokio's
//! `process` driver calling `waitpid(pid)` and a `waitpid(-1)` loop) would race and one
//! of them would lose statuses, so every child guestd starts goes through [`Reaper`]:
//!
//! * [`Reaper::spawn_with`] runs the fork (a closure returning the new pid) while holding
//!   the reaper lock and registers the pid before the lock is released;
//! * the reaper loop takes the same lock before each `waitpid(-1, WNOHANG)` round, so it
//!   can never reap a child between its fork and its registration (and never reaps a
//!   child that `std::process::Command::spawn` reaps itself when `exec` fails);
//! * statuses of registered pids go to their [`ExitWaiter`]; any other pid is an orphan
//!   and its status is discarded.
//!
//! [`Reaper::spawn_unlocked`] is the second protocol, for spawns that must not hold the
//! lock while the child starts (a `CLONE_VFORK` spawn waits until the child's `exec`,
//! which can take long): while such a spawn is in flight, statuses of unknown pids are
//! kept for a short while instead of being discarded, and the spawn picks its child's
//! status up from there when the child was reaped before it could register.
//!
//! `clippy.toml` forbids `std::process::Command::{spawn, output, status}` and
//! `tokio::process` elsewhere in the crate, so no other code path can steal a status.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

/// Process-wide reaper; [`global`] returns it and starts its thread on first use.
pub struct Reaper {
    inner: Mutex<Inner>,
    children_changed: std::sync::Condvar,
    reaped_orphans: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
    /// Spawns in flight through [`Reaper::spawn_unlocked`].
    unlocked_spawns: usize,
    /// Statuses of unknown pids reaped while such spawns were in flight: one may belong
    /// to a child whose registration is still to come.
    early: Vec<(i32, ExitStatus, std::time::Instant)>,
}

/// How long an early status is kept (far longer than any spawn takes to register).
const EARLY_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Resolves to the exit status of a child registered with the reaper.
#[derive(Debug)]
#[must_use = "an ExitWaiter does nothing unless awaited"]
pub struct ExitWaiter {
    pid: i32,
    rx: oneshot::Receiver<ExitStatus>,
}

impl ExitWaiter {
    /// The pid this waiter belongs to.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Future for ExitWaiter {
    type Output = ExitStatus;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ExitStatus> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(status)) => Poll::Ready(status),
            // The sender lives in the reaper's map until the status is delivered; it is
            // only dropped without a value if the reaper itself is torn down. Report the
            // child as killed rather than hanging forever.
            Poll::Ready(Err(_)) => Poll::Ready(ExitStatus::from_raw(libc::SIGKILL)),
            Poll::Pending => Poll::Pending,
        }
    }
}

static GLOBAL: OnceLock<Arc<Reaper>> = OnceLock::new();

/// The process-wide reaper, starting its reaping thread on first use.
pub fn global() -> Arc<Reaper> {
    GLOBAL
        .get_or_init(|| {
            let reaper = Arc::new(Reaper {
                inner: Mutex::new(Inner::default()),
                children_changed: std::sync::Condvar::new(),
                reaped_orphans: Default::default(),
            });
            Reaper::start(reaper.clone());
            reaper
        })
        .clone()
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // operation is a single insert/remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `fork` with the reaper lock held; `fork` must create exactly one child and
    /// return its pid alongside any value of its own. The pid is registered before the
    /// lock is released, so its exit status is delivered to the returned waiter.
    pub fn spawn_with<T>(
        &self,
        fork: impl FnOnce() -> io::Result<(T, i32)>,
    ) -> io::Result<(T, ExitWaiter)> {
        let mut inner = self.lock();
        let (value, pid) = fork()?;
        let (tx, rx) = oneshot::channel();
        inner.waiters.insert(pid, tx);
        drop(inner);
        self.children_changed.notify_all();
        Ok((value, ExitWaiter { pid, rx }))
    }

    /// Like [`Reaper::spawn_with`], but `fork` runs without the reaper lock, so a child
    /// that is slow to start blocks nobody else. Its status is still delivered exactly
    /// once: if the reaper collects the child before this call registers it, the status
    /// waits in the early list. `fork` must not reap its child itself (so this is not for
    /// `std::process::Command`, which reaps a child whose `exec` failed).
    pub fn spawn_unlocked<T>(
        &self,
        fork: impl FnOnce() -> io::Result<(T, i32)>,
    ) -> io::Result<(T, ExitWaiter)> {
        self.lock().unlocked_spawns += 1;
        let forked = fork();
        let mut inner = self.lock();
        inner.unlocked_spawns -= 1;
        let result = forked.map(|(value, pid)| {
            let (tx, rx) = oneshot::channel();
            match inner.early.iter().position(|(p, _, _)| *p == pid) {
                Some(i) => {
                    let (_, status, _) = inner.early.swap_remove(i);
                    let _ = tx.send(status);
                }
                None => {
                    inner.waiters.insert(pid, tx);
                }
            }
            (value, ExitWaiter { pid, rx })
        });
        if inner.unlocked_spawns == 0 {
            // Whatever is left belonged to orphans.
            let orphans = inner.early.len() as u64;
            inner.early.clear();
            self.reaped_orphans
                .fetch_add(orphans, std::sync::atomic::Ordering::Relaxed);
        }
        drop(inner);
        self.children_changed.notify_all();
        result
    }

    /// Spawns a `std::process::Command` under the reaper. Never call `wait` on the
    /// returned `Child`: await the [`ExitWaiter`] instead.
    pub fn spawn_command(
        &self,
        cmd: &mut std::process::Command,
    ) -> io::Result<(std::process::Child, ExitWaiter)> {
        self.spawn_with(|| {
            #[allow(clippy::disallowed_methods)] // the one sanctioned call site
            let child = cmd.spawn()?;
            let pid = i32::try_from(child.id())
                .map_err(|_| io::Error::other("child pid out of range"))?;
            Ok((child, pid))
        })
    }

    /// Number of orphaned descendants reaped so far (children nobody registered).
    pub fn reaped_orphans(&self) -> u64 {
        self.reaped_orphans
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reaps every child that has exited, delivering statuses to registered waiters.
    /// Returns the number of children reaped.
    fn reap_now(&self) -> usize {
        let mut inner = self.lock();
        let mut count = 0;
        loop {
            let mut raw: libc::c_int = 0;
            // SAFETY: waitpid with a valid pointer to a c_int; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                // 0: children exist but none exited; -1: ECHILD (no children) or EINTR.
                if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            count += 1;
            let status = ExitStatus::from_raw(raw);
            match inner.waiters.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None if inner.unlocked_spawns > 0 => {
                    let now = std::time::Instant::now();
                    inner
                        .early
                        .retain(|(_, _, at)| now.duration_since(*at) < EARLY_TTL);
                    inner.early.push((pid, status, now));
                }
                None => {
                    self.reaped_orphans
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(pid, ?status, "reaped orphan");
                }
            }
        }
        count
    }

    /// Starts the reaping thread. It blocks in `waitid(P_ALL, WEXITED | WNOWAIT)`, which
    /// returns once some child is a zombie without reaping it, then reaps every exited
    /// child under the lock. Nothing depends on signals or on an async runtime, so the
    /// reaper keeps working for the whole life of the process (and in unit tests, where
    /// every test has its own runtime).
    fn start(reaper: Arc<Reaper>) {
        let spawned = std::thread::Builder::new()
            .name("guestd-reaper".into())
            .spawn(move || {
                loop {
                    // SAFETY: siginfo_t is plain old data; zeroed is a valid value and
                    // waitid only writes into it.
                    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                    // SAFETY: valid pointer to a siginfo_t; WNOWAIT leaves the child
                    // waitable, so the status is still there for reap_now.
                    let rc = unsafe {
                        libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT)
                    };
                    if rc == 0 {
                        reaper.reap_now();
                        continue;
                    }
                    match io::Error::last_os_error().raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // No children right now: a spawn or a re-parented orphan will
                        // give us one; check again shortly.
                        _ => {
                            let guard = reaper.lock();
                            let _ = reaper
                                .children_changed
                                .wait_timeout(guard, std::time::Duration::from_millis(200));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the reaper thread; children will become zombies");
        }
    }
}

/// Makes this process a child-subreaper: orphaned descendants are re-parented to it
/// instead of to PID 1, so the reaper collects them.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_exit_status_of_tracked_child() {
        let reaper = global();
        let (_child, waiter) = reaper
            .spawn_command(std::process::Command::new("/bin/sh").args(["-c", "exit 7"]))
            .expect("spawn");
        let status = waiter.await;
        assert_eq!(status.code(), Some(7));
    }

    #[tokio::test]
    async fn unlocked_spawn_gets_the_status_even_when_reaped_before_registration() {
        let reaper = global();
        let (_child, waiter) = reaper
            .spawn_unlocked(|| {
                // A valid command, so std never reaps the child itself.
                #[allow(clippy::disallowed_methods)]
                let child = std::process::Command::new("/bin/sh")
                    .args(["-c", "exit 5"])
                    .spawn()?;
                // Let the child exit and the reaper collect it before we register.
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok((child.id(), child.id() as i32))
            })
            .expect("spawn");
        assert_eq!(waiter.await.code(), Some(5));
    }

    #[tokio::test]
    async fn reports_signals() {
        let reaper = global();
        let (_child, waiter) = reaper
            .spawn_command(std::process::Command::new("/bin/sh").args(["-c", "kill -9 $$"]))
            .expect("spawn");
        let status = waiter.await;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn failed_exec_is_an_error_not_a_lost_child() {
        let reaper = global();
        let err = reaper
            .spawn_command(&mut std::process::Command::new("/nonexistent/guestd-test"))
            .expect_err("spawn must fail");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
