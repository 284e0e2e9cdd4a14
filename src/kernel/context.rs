//! A context: one kernel (restarted as needed) behind a worker task that runs
//! executions one at a time in FIFO order (contract §5.2, §7).
//!
//! The worker owns the kernel. It takes commands (execute, restart, remove) from an
//! unbounded channel, so queued requests cost nothing but memory, and runs each job:
//! per-execution env set (silent), the user's code, per-execution env reset (silent),
//! always in that order, so the next job never reaches the kernel before the cleanup.
//! While user code runs, the worker keeps listening: a restart/remove cuts the
//! execution (`UnexpectedEndOfExecution`), a kernel exit ends it (`ContextRestarting`)
//! and triggers an automatic restart, a client that goes away interrupts the kernel.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};

use super::KernelError;
use super::exec::{ExecError, ExecSender, Output};
use super::instance::{Channel, Event, Kernel, StartParams, describe_exit};
use super::js;
use super::lang::{EnvOp, chdir_code, env_code};
use super::spec::{KernelSpec, SpecResolver};
use crate::env::{EnvMap, GlobalEnv};

/// Kernel deaths within [`DEATH_WINDOW`] after which a context stops restarting.
const MAX_DEATHS: usize = 5;
const DEATH_WINDOW: Duration = Duration::from_secs(60);
/// How long an interrupted execution may take to finish before the kernel is restarted
/// (contract §10 #13: some kernels, Deno's among them, cannot interrupt every kind of
/// code; without the restart the context would stay blocked for good).
pub const DEFAULT_INTERRUPT_RESTART: Duration = Duration::from_secs(10);
/// How long to wait for `execute_reply` after `idle` (§4.3).
const REPLY_GRACE: Duration = Duration::from_secs(3);
/// Bound on silent setup requests (cwd, env).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle kernel whose heartbeat stays silent this long is killed and restarted.
const HEARTBEAT_IDLE_LIMIT: Duration = Duration::from_secs(15);

/// What a context reports about itself (contract §2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

/// One execution to run.
pub(crate) struct Job {
    pub code: String,
    pub env_vars: Vec<(String, String)>,
    pub out: ExecSender,
}

pub(crate) enum Command {
    Execute(Job),
    Restart(oneshot::Sender<Result<(), KernelError>>),
    Remove(oneshot::Sender<()>),
}

/// The manager's handle to a context's worker.
pub(crate) struct ContextHandle {
    pub info: ContextInfo,
    tx: mpsc::UnboundedSender<Command>,
    failed: Arc<Mutex<Option<String>>>,
}

impl ContextHandle {
    /// Starts the kernel (ready, cwd and global env applied), then the worker. On any
    /// failure the half-started kernel is torn down.
    pub async fn create(
        info: ContextInfo,
        spec: KernelSpec,
        resolver: SpecResolver,
        env: GlobalEnv,
        interrupt_restart: Duration,
        cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
    ) -> Result<ContextHandle, KernelError> {
        let (handle, started) =
            ContextHandle::spawn(info, spec, resolver, env, interrupt_restart, cgroups);
        match started.await {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(KernelError::Start("the context's worker stopped".into())),
        }
    }

    /// The handle at once, the kernel starting in the worker: executions sent meanwhile
    /// wait for it. `started` tells when the kernel is ready, or why it could not start
    /// (then the worker has stopped, ending what was queued with that reason).
    pub fn spawn(
        info: ContextInfo,
        spec: KernelSpec,
        resolver: SpecResolver,
        env: GlobalEnv,
        interrupt_restart: Duration,
        cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
    ) -> (ContextHandle, oneshot::Receiver<Result<(), KernelError>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(None));
        let mut env_rx = env.subscribe();
        env_rx.borrow_and_update();
        let mut worker = Worker {
            info: info.clone(),
            spec,
            resolver,
            kernel: None,
            cmds: rx,
            queue: VecDeque::new(),
            env,
            env_rx,
            env_open: true,
            applied: Arc::default(),
            env_dirty: false,
            deaths: VecDeque::new(),
            failed: failed.clone(),
            hb_lost_since: None,
            idle_since: Instant::now(),
            interrupt_restart,
            cgroups,
        };
        let (started_tx, started) = oneshot::channel();
        tokio::spawn(async move {
            match worker.start_kernel().await {
                Ok(()) => {
                    let _ = started_tx.send(Ok(()));
                    worker.run().await;
                }
                Err(e) => {
                    worker.refuse_queued(&e);
                    let _ = started_tx.send(Err(e));
                }
            }
        });
        (ContextHandle { info, tx, failed }, started)
    }

    /// Why the context no longer runs code, if it gave up restarting its kernel.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn execute(&self, job: Job) -> Result<(), KernelError> {
        self.tx.send(Command::Execute(job)).map_err(|_| {
            KernelError::Unavailable(self.info.id.clone(), "its worker has stopped".into())
        })
    }

    pub async fn restart(&self) -> Result<(), KernelError> {
        let (tx, rx) = oneshot::channel();
        let gone =
            || KernelError::Unavailable(self.info.id.clone(), "its worker has stopped".into());
        self.tx.send(Command::Restart(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn remove(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Remove(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// How driving the user's code ended.
enum Drive {
    Complete,
    /// The client went away; interrupted and drained.
    Abandoned,
    /// The client went away and the interrupt did not end the execution in time.
    Stuck,
    Died(ExitStatus),
    /// A restart/remove arrived (or the manager went away: `None`).
    Cut(Option<Command>),
}

/// How a silent setup request ended.
enum Silent {
    Ok,
    /// A summary for logs, and the kernel's error when it reported one.
    Failed(String, Option<ExecError>),
    Died(ExitStatus),
    TimedOut,
}

struct Worker {
    info: ContextInfo,
    spec: KernelSpec,
    resolver: SpecResolver,
    kernel: Option<Kernel>,
    cmds: mpsc::UnboundedReceiver<Command>,
    queue: VecDeque<Job>,
    env: GlobalEnv,
    env_rx: watch::Receiver<EnvMap>,
    env_open: bool,
    /// The global env as last applied to the current kernel.
    applied: EnvMap,
    env_dirty: bool,
    deaths: VecDeque<Instant>,
    failed: Arc<Mutex<Option<String>>>,
    hb_lost_since: Option<Instant>,
    /// When the worker last became idle (no execution running).
    idle_since: Instant,
    /// How long an interrupted execution may run on before the kernel is restarted.
    interrupt_restart: Duration,
    /// Where each (re)started kernel gets its own leaf of the user cgroup.
    cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
}

/// Runs a silent request to completion (or error/death/timeout), discarding output.
async fn run_silent(kernel: &mut Kernel, code: &str, label: &str) -> Silent {
    let mut tracker = match kernel.execute(code, true).await {
        Ok(t) => t,
        Err(e) => return Silent::Failed(e.to_string(), None),
    };
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut idle_at: Option<Instant> = None;
    loop {
        let grace = idle_at.map(|t| t + REPLY_GRACE);
        let ev = tokio::select! {
            ev = kernel.next_event() => ev,
            _ = sleep_until(deadline) => return Silent::TimedOut,
            _ = sleep_until(grace.unwrap_or(deadline)), if grace.is_some() => break,
        };
        match ev {
            Event::Msg(Channel::Iopub, mut m) => {
                for o in tracker.on_iopub(&mut m) {
                    tracing::debug!(context = label, output = ?o, "setup output (discarded)");
                }
                if tracker.idle_seen() && idle_at.is_none() {
                    idle_at = Some(Instant::now());
                }
            }
            Event::Msg(Channel::Shell, m) => tracker.on_shell(&m),
            Event::Exited(s) => return Silent::Died(s),
            _ => {}
        }
        if tracker.is_complete() {
            break;
        }
    }
    tracker.finish();
    if tracker.failed() {
        Silent::Failed(
            tracker
                .error_summary()
                .unwrap_or_else(|| "setup code failed".into()),
            tracker.first_error().cloned(),
        )
    } else {
        Silent::Ok
    }
}

/// Whether the diagnostic's error says more than the blank one did.
fn says_why(found: &ExecError, blank: &ExecError) -> bool {
    let same_blank = found.is_blank() && found.value == blank.value;
    !(js::Diagnostic::found_nothing(&found.value) || same_blank)
}

/// An error the kernel reported with no traceback gets the reason the kernel did not
/// give: for Deno's `Error: Execution failed` (a cell that failed before it ran), the
/// exception of loading the same cell as a module (`js::diagnostic_code`); otherwise,
/// or when that finds nothing, what the kernel wrote to stderr during the execution.
async fn explain_blank_error(
    kernel: &mut Kernel,
    error: ExecError,
    prepared: Option<&js::Prepared>,
    cwd: &str,
    stderr_mark: u64,
    label: &str,
) -> ExecError {
    let stderr = kernel.stderr_since(stderr_mark);
    if let Some(p) = prepared
        && error.value == "Execution failed"
    {
        let d = js::diagnostic_code(&p.code, p.prefix_len, cwd);
        match run_silent(kernel, &d.code, label).await {
            Silent::Failed(_, Some(found)) if says_why(&found, &error) => {
                // Deno's traceback chunks carry no newlines; the message has them.
                let value = d.clean(&found.value);
                let traceback = format!("{}: {value}", found.name);
                return ExecError {
                    name: found.name,
                    value,
                    traceback,
                };
            }
            other => {
                let why = match other {
                    Silent::Ok | Silent::Failed(..) => "it parses and its imports load",
                    Silent::Died(_) => "the kernel exited",
                    Silent::TimedOut => "that timed out",
                };
                tracing::debug!(
                    context = label,
                    why,
                    "no reason found for a blank Deno error"
                );
            }
        }
    }
    if stderr.is_empty() {
        return error;
    }
    let detail = format!(
        "{}: {}\n(the kernel gave no traceback; its stderr during this execution:)\n{}",
        error.name,
        error.value,
        stderr.join("\n")
    );
    error.with_detail(detail)
}

/// The ops that turn `from` into `to`.
fn env_diff(from: &EnvMap, to: &EnvMap) -> Vec<EnvOp> {
    let mut ops: Vec<EnvOp> = to
        .iter()
        .filter(|(k, v)| from.get(*k) != Some(*v))
        .map(|(k, v)| EnvOp::Set(k.clone(), v.clone()))
        .collect();
    ops.extend(
        from.keys()
            .filter(|k| !to.contains_key(*k))
            .map(|k| EnvOp::Unset(k.clone())),
    );
    ops
}

impl Worker {
    /// The kernel could not start: ends every command that arrived meanwhile with
    /// the reason (the worker stops after this).
    fn refuse_queued(&mut self, e: &KernelError) {
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Command::Execute(job) => job
                    .out
                    .end(Some(ExecError::unexpected_end().with_detail(e.to_string()))),
                Command::Restart(reply) => {
                    let _ = reply.send(Err(KernelError::Start(e.to_string())));
                }
                Command::Remove(reply) => {
                    let _ = reply.send(());
                }
            }
        }
    }

    fn set_failed(&self, reason: Option<String>) {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts a kernel for this context and applies cwd and the global env.
    async fn start_kernel(&mut self) -> Result<(), KernelError> {
        if let Some(fresh) = self.resolver.resolve(&self.info.language) {
            self.spec = fresh;
        }
        let snapshot = self.env.snapshot();
        let pairs: Vec<(String, String)> = snapshot
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut kernel = Kernel::start(StartParams {
            spec: &self.spec,
            label: &self.info.id,
            cwd: Path::new(&self.info.cwd),
            env: &pairs,
            cgroups: self.cgroups.as_deref(),
        })
        .await?;
        let lang = self.info.language.clone();
        if let Some(code) = chdir_code(&lang, &self.info.cwd) {
            match run_silent(&mut kernel, &code, &self.info.id).await {
                Silent::Ok => {}
                other => {
                    let why = match other {
                        Silent::Failed(e, _) => e,
                        Silent::Died(s) => format!("kernel exited ({})", describe_exit(&s)),
                        _ => "timed out".into(),
                    };
                    kernel.shutdown().await;
                    return Err(KernelError::Cwd(self.info.cwd.clone(), why));
                }
            }
        }
        if kernel.is_deno()
            && matches!(lang.as_str(), "javascript" | "typescript")
            && let Silent::Failed(e, _) = run_silent(&mut kernel, js::PRELUDE, &self.info.id).await
        {
            tracing::warn!(context = %self.info.id, error = %e, "defining require() failed");
        }
        let ops = env_diff(&Arc::default(), &snapshot);
        if let Some(code) = env_code(&lang, &ops) {
            match run_silent(&mut kernel, &code, &self.info.id).await {
                Silent::Ok => {}
                Silent::Failed(e, _) => {
                    tracing::warn!(context = %self.info.id, error = %e, "applying global env failed")
                }
                Silent::Died(s) => {
                    kernel.shutdown().await;
                    return Err(KernelError::Start(format!(
                        "kernel exited while applying the environment ({})",
                        describe_exit(&s)
                    )));
                }
                Silent::TimedOut => {
                    tracing::warn!(context = %self.info.id, "applying global env timed out")
                }
            }
        }
        self.applied = snapshot;
        self.env_dirty = false;
        self.hb_lost_since = None;
        self.kernel = Some(kernel);
        tracing::info!(context = %self.info.id, language = %lang, kernel = %self.spec.name, "context ready");
        Ok(())
    }

    async fn run(mut self) {
        loop {
            // A change of the global env that happened before a queued request reached
            // us must be applied before that request runs.
            if self.env_open && self.env_rx.has_changed().unwrap_or(false) {
                self.env_rx.borrow_and_update();
                self.env_dirty = true;
            }
            if self.kernel.is_some() && self.failure().is_none() {
                if self.env_dirty {
                    self.apply_global_env().await;
                    continue;
                }
                if let Some(job) = self.queue.pop_front() {
                    let deferred = self.run_job(job).await;
                    self.idle_since = Instant::now();
                    if let Some(cmd) = deferred
                        && self.handle_command(cmd).await
                    {
                        return;
                    }
                    continue;
                }
            } else if let Some(job) = self.queue.pop_front() {
                self.run_without_kernel(job).await;
                continue;
            }
            // Only an idle kernel is expected to answer its heartbeat (some kernels do not
            // while they execute).
            let hb_deadline = self
                .hb_lost_since
                .map(|t| t.max(self.idle_since) + HEARTBEAT_IDLE_LIMIT);
            let has_kernel = self.kernel.is_some();
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(c) => if self.handle_command(c).await { return },
                    None => { self.stop().await; return }
                },
                ev = async { match self.kernel.as_mut() { Some(k) => k.next_event().await, None => std::future::pending().await } }, if has_kernel => {
                    self.on_idle_event(ev).await;
                }
                r = self.env_rx.changed(), if self.env_open => match r {
                    Ok(()) => self.env_dirty = true,
                    Err(_) => self.env_open = false,
                },
                _ = sleep_until(hb_deadline.unwrap_or_else(Instant::now)), if hb_deadline.is_some() && has_kernel => {
                    tracing::warn!(context = %self.info.id, "idle kernel does not answer its heartbeat; killing it");
                    self.hb_lost_since = None;
                    if let Some(k) = &self.kernel {
                        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(k.pid), nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
        }
    }

    /// Returns true when the worker must stop (the context was removed).
    async fn handle_command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Execute(job) => {
                self.queue.push_back(job);
                false
            }
            Command::Restart(reply) => {
                let r = self.restart().await;
                let _ = reply.send(r);
                false
            }
            Command::Remove(reply) => {
                self.stop().await;
                let _ = reply.send(());
                true
            }
        }
    }

    /// Ends queued jobs and shuts the kernel down.
    async fn stop(&mut self) {
        for job in self.queue.drain(..) {
            job.out.end(Some(ExecError::unexpected_end()));
        }
        if let Some(k) = self.kernel.take() {
            k.shutdown().await;
        }
        tracing::info!(context = %self.info.id, "context removed");
    }

    async fn restart(&mut self) -> Result<(), KernelError> {
        tracing::info!(context = %self.info.id, "restarting context");
        if let Some(k) = self.kernel.take() {
            k.shutdown().await;
        }
        self.deaths.clear();
        self.set_failed(None);
        self.start_kernel().await
    }

    /// A kernel event while no execution runs.
    async fn on_idle_event(&mut self, ev: Event) {
        match ev {
            Event::Exited(status) => self.on_death(status).await,
            Event::Heartbeat(false) => {
                self.hb_lost_since.get_or_insert_with(Instant::now);
            }
            Event::Heartbeat(true) => self.hb_lost_since = None,
            Event::Msg(ch, m) => {
                tracing::trace!(context = %self.info.id, ?ch, msg_type = m.msg_type(), "ignoring message outside an execution");
            }
        }
    }

    /// What a client learns when the kernel died under its execution: the exit status
    /// and the last lines the kernel wrote to stderr (a fatal error, a crash report).
    fn death_detail(&self, status: &ExitStatus) -> String {
        let how = describe_exit(status);
        let tail = self
            .kernel
            .as_ref()
            .map(Kernel::stderr_tail)
            .unwrap_or_default();
        let mut detail = format!("The kernel process exited ({how}) while running this code");
        if status.signal() == Some(libc::SIGKILL) {
            detail.push_str(" (killed: out of memory, or by a signal from outside)");
        }
        detail.push_str("; the context restarts with a new kernel (its state is lost).");
        if !tail.trim().is_empty() {
            detail.push_str("\nLast lines of the kernel's stderr:\n");
            detail.push_str(&tail);
        }
        detail
    }

    /// The kernel process exited on its own: restart it, unless it keeps dying.
    async fn on_death(&mut self, status: ExitStatus) {
        if !self.record_death(status).await {
            self.restart_after_death().await;
        }
    }

    /// Cleans up a dead kernel and counts the death; returns true when the context gives
    /// up (too many deaths in a row), failing the queued jobs.
    async fn record_death(&mut self, status: ExitStatus) -> bool {
        let tail = self
            .kernel
            .as_ref()
            .map(Kernel::stderr_tail)
            .unwrap_or_default();
        tracing::warn!(context = %self.info.id, status = %describe_exit(&status), stderr = %tail, "kernel died");
        if let Some(k) = self.kernel.take() {
            k.shutdown().await;
        }
        self.count_death()
    }

    fn count_death(&mut self) -> bool {
        let now = Instant::now();
        self.deaths.push_back(now);
        while self
            .deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > DEATH_WINDOW)
        {
            self.deaths.pop_front();
        }
        if self.deaths.len() < MAX_DEATHS {
            return false;
        }
        let reason = format!(
            "its kernel died {MAX_DEATHS} times within {} s; restart or remove the context",
            DEATH_WINDOW.as_secs()
        );
        tracing::error!(context = %self.info.id, "{reason}");
        for job in self.queue.drain(..) {
            job.out.end(Some(
                ExecError::unexpected_end().with_detail(format!("Context unavailable: {reason}")),
            ));
        }
        self.set_failed(Some(reason));
        true
    }

    /// Starts a new kernel after a death (cwd and global env re-applied); a failed start
    /// counts as another death.
    async fn restart_after_death(&mut self) {
        loop {
            match self.start_kernel().await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(context = %self.info.id, error = %e, "automatic kernel restart failed");
                    if self.count_death() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// A job arriving while there is no kernel (a restart failed) or the context gave up.
    async fn run_without_kernel(&mut self, job: Job) {
        if job.out.is_abandoned() {
            return;
        }
        if let Some(reason) = self.failure() {
            job.out.end(Some(
                ExecError::unexpected_end().with_detail(format!("Context unavailable: {reason}")),
            ));
            return;
        }
        match self.start_kernel().await {
            Ok(()) => self.queue.push_front(job),
            Err(e) => job
                .out
                .end(Some(ExecError::unexpected_end().with_detail(e.to_string()))),
        }
    }

    async fn apply_global_env(&mut self) {
        self.env_dirty = false;
        let target = self.env.snapshot();
        let ops = env_diff(&self.applied, &target);
        let Some(code) = env_code(&self.info.language, &ops) else {
            self.applied = target;
            return;
        };
        let Some(kernel) = self.kernel.as_mut() else {
            return;
        };
        match run_silent(kernel, &code, &self.info.id).await {
            Silent::Died(s) => self.on_death(s).await,
            Silent::Failed(e, _) => {
                tracing::warn!(context = %self.info.id, error = %e, "applying global env failed");
                self.applied = target;
            }
            Silent::TimedOut => {
                tracing::warn!(context = %self.info.id, "applying global env timed out")
            }
            Silent::Ok => self.applied = target,
        }
    }

    /// Runs one job. Returns a restart/remove command that cut it, for the caller.
    async fn run_job(&mut self, job: Job) -> Option<Command> {
        if job.out.is_abandoned() {
            tracing::debug!(context = %self.info.id, "dropping execution abandoned while queued");
            return None;
        }
        let lang = self.info.language.clone();
        let set_ops: Vec<EnvOp> = job
            .env_vars
            .iter()
            .map(|(k, v)| EnvOp::Set(k.clone(), v.clone()))
            .collect();
        let set_code = env_code(&lang, &set_ops);
        if let Some(code) = &set_code {
            let kernel = self.kernel.as_mut()?;
            match run_silent(kernel, code, &self.info.id).await {
                Silent::Ok => {}
                Silent::Failed(e, _) => {
                    tracing::warn!(context = %self.info.id, error = %e, "setting execution env failed")
                }
                Silent::TimedOut => {
                    tracing::warn!(context = %self.info.id, "setting execution env timed out")
                }
                Silent::Died(s) => {
                    let gave_up = self.record_death(s).await;
                    job.out.end(Some(ExecError::context_restarting()));
                    if !gave_up {
                        self.restart_after_death().await;
                    }
                    return None;
                }
            }
        }

        let outcome = self.drive_user_code(&job).await;
        let mut deferred = None;
        let mut kernel_alive = true;
        match outcome {
            Drive::Complete | Drive::Abandoned => job.out.end(None),
            Drive::Stuck => {
                job.out.end(Some(ExecError::context_restarting()));
                tracing::warn!(context = %self.info.id, "restarting the kernel to end an execution it could not interrupt");
                if let Some(k) = self.kernel.take() {
                    k.shutdown().await;
                }
                if let Err(e) = self.start_kernel().await {
                    tracing::warn!(context = %self.info.id, error = %e, "kernel restart failed; retrying on the next execution");
                }
                return None;
            }
            Drive::Died(status) => {
                let detail = self.death_detail(&status);
                // Count the death first: if the context gives up, the next request
                // already sees it (500) instead of queueing.
                let gave_up = self.record_death(status).await;
                job.out
                    .end(Some(ExecError::context_restarting().with_detail(detail)));
                if !gave_up {
                    self.restart_after_death().await;
                }
                return None;
            }
            Drive::Cut(cmd) => {
                job.out.end(Some(ExecError::unexpected_end()));
                kernel_alive = false;
                match cmd {
                    Some(c) => deferred = Some(c),
                    None => {
                        self.stop().await;
                        return None;
                    }
                }
            }
        }

        // Reset the per-execution env to the global values (or unset), always, unless the
        // kernel is about to be replaced anyway.
        if set_code.is_some() && kernel_alive {
            let reset: Vec<EnvOp> = job
                .env_vars
                .iter()
                .map(|(k, _)| match self.applied.get(k) {
                    Some(v) => EnvOp::Set(k.clone(), v.clone()),
                    None => EnvOp::Unset(k.clone()),
                })
                .collect();
            if let (Some(code), Some(kernel)) = (env_code(&lang, &reset), self.kernel.as_mut()) {
                match run_silent(kernel, &code, &self.info.id).await {
                    Silent::Ok => {}
                    Silent::Died(s) => self.on_death(s).await,
                    Silent::Failed(e, _) => {
                        tracing::warn!(context = %self.info.id, error = %e, "resetting execution env failed")
                    }
                    Silent::TimedOut => {
                        tracing::warn!(context = %self.info.id, "resetting execution env timed out")
                    }
                }
            }
        }
        deferred
    }

    /// Sends the user's code and streams its outputs until completion.
    async fn drive_user_code(&mut self, job: &Job) -> Drive {
        let Worker {
            kernel,
            cmds,
            queue,
            env_rx,
            env_open,
            env_dirty,
            hb_lost_since,
            info,
            interrupt_restart,
            ..
        } = self;
        let Some(kernel) = kernel.as_mut() else {
            job.out.push(Output::Error(
                ExecError::unexpected_end().with_detail("no kernel"),
            ));
            return Drive::Complete;
        };
        // JavaScript/TypeScript on Deno: npm imports and require() (kernel::js).
        let prepared = (kernel.is_deno()
            && matches!(info.language.as_str(), "javascript" | "typescript"))
        .then(|| js::prepare(&job.code));
        let code = prepared
            .as_ref()
            .map_or(job.code.as_str(), |p| p.code.as_str());
        let stderr_mark = kernel.stderr_mark();
        let mut tracker = match kernel.execute(code, false).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(context = %info.id, error = %e, "cannot send execute_request");
                job.out.push(Output::Error(
                    ExecError::unexpected_end().with_detail(e.to_string()),
                ));
                return Drive::Complete;
            }
        };
        tracing::debug!(context = %info.id, msg_id = tracker.msg_id(), "execution started");
        let mut interrupted_at: Option<Instant> = None;
        let mut idle_at: Option<Instant> = None;
        loop {
            let drain_deadline = interrupted_at.map(|t| t + *interrupt_restart);
            let grace_deadline = idle_at.map(|t| t + REPLY_GRACE);
            let watching_client = interrupted_at.is_none();
            tokio::select! {
                ev = kernel.next_event() => match ev {
                    Event::Msg(Channel::Iopub, mut m) => {
                        let outs = tracker.on_iopub(&mut m);
                        if watching_client {
                            job.out.push_all(outs);
                        }
                        if tracker.idle_seen() && idle_at.is_none() {
                            idle_at = Some(Instant::now());
                        }
                    }
                    Event::Msg(Channel::Shell, m) => tracker.on_shell(&m),
                    Event::Msg(..) => {}
                    Event::Heartbeat(ok) => {
                        if ok { *hb_lost_since = None } else { hb_lost_since.get_or_insert_with(Instant::now); }
                    }
                    Event::Exited(status) => return Drive::Died(status),
                },
                _ = job.out.abandoned(), if watching_client => {
                    tracing::info!(context = %info.id, "client went away; interrupting the execution");
                    interrupted_at = Some(Instant::now());
                    if let Err(e) = kernel.interrupt().await {
                        tracing::warn!(context = %info.id, error = %e, "interrupt failed");
                    }
                }
                _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                    tracing::warn!(context = %info.id, "interrupted execution did not finish in time");
                    return Drive::Stuck;
                }
                _ = sleep_until(grace_deadline.unwrap_or_else(Instant::now)), if grace_deadline.is_some() => {
                    tracing::debug!(context = %info.id, "no execute_reply after idle; treating as complete");
                    break;
                }
                cmd = cmds.recv() => match cmd {
                    Some(Command::Execute(j)) => queue.push_back(j),
                    other => return Drive::Cut(other),
                },
                r = env_rx.changed(), if *env_open => match r {
                    Ok(()) => *env_dirty = true,
                    Err(_) => *env_open = false,
                },
            }
            if tracker.is_complete() {
                break;
            }
        }
        if interrupted_at.is_some() {
            return Drive::Abandoned;
        }
        // Output that trails the completion signals (see Kernel::output_linger): keep
        // taking it until the kernel has been quiet for the linger time (bounded).
        let linger = kernel.output_linger();
        if !linger.is_zero() {
            let cap = Instant::now() + linger * 10;
            let mut quiet_until = Instant::now() + linger;
            loop {
                let ev = tokio::select! {
                    ev = kernel.next_event() => ev,
                    _ = sleep_until(quiet_until.min(cap)) => break,
                };
                match ev {
                    Event::Msg(Channel::Iopub, mut m) => {
                        let outs = tracker.on_iopub(&mut m);
                        if !outs.is_empty() {
                            job.out.push_all(outs);
                            quiet_until = Instant::now() + linger;
                        }
                    }
                    Event::Exited(status) => {
                        job.out.push_all(tracker.finish());
                        return Drive::Died(status);
                    }
                    _ => {}
                }
            }
        }
        let mut outs = tracker.finish();
        for out in &mut outs {
            if let Output::Error(e) = out
                && e.is_blank()
            {
                let blank = std::mem::replace(e, ExecError::aborted());
                *e = explain_blank_error(
                    kernel,
                    blank,
                    prepared.as_ref(),
                    &info.cwd,
                    stderr_mark,
                    &info.id,
                )
                .await;
            }
        }
        job.out.push_all(outs);
        Drive::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn env_diff_sets_changes_and_unsets_removed() {
        let a: EnvMap = Arc::new(BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "2".to_string()),
        ]));
        let b: EnvMap = Arc::new(BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "3".to_string()),
            ("C".to_string(), "4".to_string()),
        ]));
        assert_eq!(
            env_diff(&a, &b),
            vec![
                EnvOp::Set("B".into(), "3".into()),
                EnvOp::Set("C".into(), "4".into())
            ]
        );
        assert_eq!(
            env_diff(&b, &a),
            vec![EnvOp::Set("B".into(), "2".into()), EnvOp::Unset("C".into())]
        );
    }
}
