//! The process domain: starting user commands, fanning out their output, input, signals,
//! PTY resizing, and the registry that Start / Connect / List / SendInput / SendSignal /
//! CloseStdin / Update operate on (contract section 3).
//!
//! This module knows nothing about protobuf or HTTP: the API layer maps its messages to
//! the types below and back.
//!
//! Layout:
//! * [`plan`]: the pure part of a spawn (environment layering, PATH candidates, argv,
//!   credentials), unit-tested without forking;
//! * `spawn`: the fork/exec executor (pipes, PTY, the async-signal-safe child side);
//! * `output`: the per-process output hub (serialized publishing, bounded per-subscriber
//!   queues with stall detection, the replay ring);
//! * `manager`: [`ProcessManager`], the registry and the per-process tasks (readers,
//!   supervisor, lifetime timeout);
//! * `exit`: exit status to [`ExitInfo`] (contract 3.3.5).

mod error;
mod exit;
mod manager;
mod output;
pub mod plan;
mod spawn;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::sys::users::User;

pub use error::{ProcessError, SubscriptionError};
pub use manager::ProcessManager;
pub use output::Subscription;

/// Tunables of the [`ProcessManager`] (the flags of the same names; see `guestd --help`).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Most output one process retains for replay, in bytes (all streams combined).
    pub replay_buffer_bytes: usize,
    /// About how much replay output all live processes retain together: each keeps
    /// `min(replay_buffer_bytes, max(budget / live processes, 64 KiB))`.
    pub replay_budget_bytes: usize,
    /// The process is paced (its output pipe fills) while every subscriber is at least
    /// this many bytes behind.
    pub pace_bytes: usize,
    /// A subscriber further behind than this is dropped with an error.
    pub subscriber_buffer_bytes: usize,
    /// Longest wait for a lagging subscriber to read before the process runs free.
    pub stall_timeout: Duration,
    /// How long an ended process stays connectable.
    pub exit_retention: Duration,
    /// Most bytes all retained ended processes may hold (records and their output);
    /// beyond it the oldest outputs, then the oldest records, go first.
    pub exit_retention_bytes: usize,
    /// `PATH` copied into every child environment (guestd's own `PATH`).
    pub agent_path_env: String,
    /// Where each command gets its own cgroup leaf (`None`: no cgroups).
    pub cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
    /// Resource limits every command sets for itself (e.g. the soft `RLIMIT_NOFILE`
    /// guestd started with, after guestd raised its own).
    pub child_rlimits: Vec<crate::sys::launch::Rlimit>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            replay_buffer_bytes: 1 << 20,
            replay_budget_bytes: 64 << 20,
            pace_bytes: 256 << 10,
            subscriber_buffer_bytes: 4 << 20,
            stall_timeout: Duration::from_millis(100),
            exit_retention: Duration::from_secs(30),
            exit_retention_bytes: 4 << 20,
            agent_path_env: std::env::var("PATH").unwrap_or_default(),
            cgroups: None,
            child_rlimits: Vec::new(),
        }
    }
}

/// The request's process config, kept verbatim and echoed by [`ProcessManager::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

/// Everything needed to start one process.
#[derive(Debug, Clone)]
pub struct StartSpec {
    /// The request's config (cmd, args and envs are used; `cwd` is only echoed).
    pub config: CommandConfig,
    /// The working directory, already resolved by the caller (`paths::resolve`).
    pub cwd: PathBuf,
    /// Whose credentials (uid, gid, groups) and identity (HOME, USER, LOGNAME) to use.
    pub user: User,
    /// Environment layer 3 (internal globals and `/init` env vars).
    pub global_env: Vec<(String, String)>,
    /// `Some`: PTY mode with this initial size.
    pub pty: Option<PtySize>,
    /// `true`: stdin is a pipe; `false`: `/dev/null`. Ignored in PTY mode.
    pub stdin: bool,
    pub tag: Option<String>,
    /// Process lifetime: the whole process group is SIGKILLed when it expires.
    pub timeout: Option<Duration>,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// Selects a process by pid or by tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    Pid(u32),
    Tag(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Pid(pid) => write!(f, "pid {pid}"),
            Selector::Tag(tag) => write!(f, "tag '{tag}'"),
        }
    }
}

/// Bytes for a process: to its stdin pipe or to its PTY master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin(Bytes),
    Pty(Bytes),
}

/// The signals a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn as_raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputKind {
    Stdout,
    Stderr,
    Pty,
}

/// One item of a process's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One read's worth of output (its own allocation).
    Data(OutputKind, Bytes),
    /// The process ended; always the last event.
    End(ExitInfo),
}

/// How a process ended (contract 3.3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, or -1 when killed by a signal.
    pub exit_code: i32,
    /// `true` when the process called exit; `false` when a signal killed it.
    pub exited: bool,
    /// `"exit status N"` or `"signal: <name>"` (plus `" (core dumped)"`).
    pub status: String,
    /// `None` for exit code 0; otherwise the same text as `status` (without the core
    /// dump note for signals), plus an out-of-memory note when `oom_killed`.
    pub error: Option<String>,
    /// The OOM killer ended a process of this command (the command itself or one of
    /// its descendants); known when the command ran in its own cgroup.
    pub oom_killed: bool,
}

/// One live process, as [`ProcessManager::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSummary {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: CommandConfig,
}
