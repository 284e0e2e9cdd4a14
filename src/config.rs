//! Command-line flags (clap) and the configuration they produce.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The envd release whose behaviour guestd implements and reports (contract §6.6):
/// high enough to enable every current SDK feature (≥ 0.6.4), and not higher, so SDK
/// feature gates for behaviour guestd lacks stay closed.
pub const ENVD_COMPAT_VERSION: &str = "0.6.13";

/// guestd's own version.
pub const GUESTD_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// guestd: the guest agent of a sandbox VM (E2B envd-compatible API on --port, the
/// code-interpreter kernel bridge on --code-port).
#[derive(Debug, Clone, Parser)]
#[command(name = "guestd", disable_version_flag = true)]
pub struct Cli {
    /// Print the envd-compatible version on the first line and guestd's own version on
    /// the second, then exit. (`-version`, as the reference agent spells it, prints
    /// only the envd-compatible version.)
    #[arg(long = "version", short = 'V')]
    pub version: bool,

    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", env = "GUESTD_LISTEN")]
    pub listen: IpAddr,

    /// Port of the agent API (Connect RPC + REST).
    #[arg(long, default_value_t = 49983, env = "GUESTD_PORT")]
    pub port: u16,

    /// User for calls that name none, until `/init` sets another.
    #[arg(long, default_value = "user", env = "GUESTD_DEFAULT_USER")]
    pub default_user: String,

    /// Default working directory (empty paths and commands without cwd), until `/init`.
    #[arg(long, env = "GUESTD_DEFAULT_WORKDIR")]
    pub default_workdir: Option<PathBuf>,

    /// Log line format.
    #[arg(long, value_enum, default_value = "human", env = "GUESTD_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Most output one process retains for replay on Connect, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub replay_buffer_bytes: usize,

    /// About how much replay output all running processes retain together, in bytes:
    /// with many processes each keeps less (never under 64 KiB).
    #[arg(long, default_value_t = 64 << 20)]
    pub replay_budget_bytes: usize,

    /// A process's output is paced (its pipe fills, as with a slow reader) while every
    /// stream subscriber is at least this many bytes behind.
    #[arg(long, default_value_t = 256 << 10)]
    pub output_pace_bytes: usize,

    /// A stream subscriber further behind than this many bytes is dropped with an error
    /// telling it where to reconnect with replay.
    #[arg(long, default_value_t = 4 << 20)]
    pub subscriber_buffer_bytes: usize,

    /// How long a process waits for a lagging subscriber to read before it runs on
    /// without it (the subscriber is dropped once a buffer behind), in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub output_stall_timeout_ms: u64,

    /// How long an ended process stays connectable (its End and retained output).
    #[arg(long, default_value_t = 30)]
    pub exit_retention_secs: u64,

    /// Most memory all retained ended processes may hold together, in bytes: beyond it
    /// the oldest retained outputs are dropped (their End stays), then the oldest Ends.
    #[arg(long, default_value_t = 4 << 20)]
    pub exit_retention_bytes: usize,

    /// Largest accepted RPC request message, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_message_bytes: usize,

    /// Port of the code-interpreter kernel bridge (`/execute`, `/contexts`).
    #[arg(long, default_value_t = 49999, env = "GUESTD_CODE_PORT")]
    pub code_port: u16,

    /// Do not serve the kernel bridge (by default it is served when a Python
    /// kernelspec is found).
    #[arg(long)]
    pub no_code_interpreter: bool,

    /// Extra directory to search for kernelspecs (`<dir>/<name>/kernel.json`), searched
    /// before the standard Jupyter data directories. May be repeated.
    #[arg(long = "kernelspec-dir")]
    pub kernelspec_dirs: Vec<PathBuf>,

    /// Do not forward loopback-only listeners to the external interfaces.
    #[arg(long)]
    pub no_port_forward: bool,

    /// A file holding the hex SHA-256 of the access token the host expects: the `/init`
    /// trust anchor when the kernel command line carries no
    /// `guestd.init_token_sha256=` (see docs/ARCHITECTURE.md).
    #[arg(long, env = "GUESTD_INIT_TRUST_FILE")]
    pub init_trust_file: Option<PathBuf>,

    /// Development mode outside a sandbox VM: `E2B_SANDBOX=false` for user processes.
    #[arg(long = "isnotfc")]
    pub not_in_vm: bool,

    /// Do not manage cgroups (user processes then share guestd's cgroup).
    #[arg(long)]
    pub no_cgroups: bool,

    /// The cgroup under which guestd creates its sibling cgroups for user processes
    /// (default: the parent of guestd's own cgroup v2).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,

    /// Process limit of the user cgroup (all user processes together; default: 1024 per
    /// CPU, 1024..16384, at most one per MiB of memory).
    #[arg(long)]
    pub user_pids_max: Option<u64>,

    /// Memory limit of the user cgroup in bytes (default: the memory available at start
    /// minus the agent's headroom, a sixteenth of the total within 64..512 MiB).
    #[arg(long)]
    pub user_memory_max: Option<u64>,

    /// CPU weight of the user cgroup on cgroup v2's 1..10000 scale (everything else has
    /// 100; v1 `cpu.shares` get weight × 1024 / 100).
    #[arg(long, default_value_t = crate::sys::cgroup::USER_WEIGHT)]
    pub user_cpu_weight: u64,

    /// guestd's own nice value (applied at start where permitted; user processes and
    /// kernels run at 0).
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    pub agent_nice: i32,

    /// `POST /files`: an upload whose body sends nothing for this many seconds fails
    /// (408) and leaves the previous file as it was.
    #[arg(long, default_value_t = 60, env = "GUESTD_UPLOAD_IDLE_TIMEOUT_SECS")]
    pub upload_idle_timeout_secs: u64,

    /// Polling watchers (CreateWatcher) not polled for this many seconds are removed.
    #[arg(long, default_value_t = 600)]
    pub watcher_idle_timeout_secs: u64,

    /// Events a polling watcher buffers between two GetWatcherEvents; one more fails the
    /// watcher with an error that says events were lost.
    #[arg(long, default_value_t = 16_384)]
    pub watcher_queue_events: usize,

    /// On SIGTERM/SIGINT, how long guestd waits for kernels to shut down before it
    /// exits anyway (a second signal exits at once).
    #[arg(long, default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,

    /// Files `/init` writes (CA store, hosts, sandbox identity). For tests only.
    #[arg(long, hide = true)]
    pub init_paths_root: Option<PathBuf>,
}

/// The resolved configuration of one guestd instance.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: IpAddr,
    pub port: u16,
    pub default_user: String,
    pub default_workdir: Option<PathBuf>,
    pub replay_buffer_bytes: usize,
    pub replay_budget_bytes: usize,
    pub output_pace_bytes: usize,
    pub subscriber_buffer_bytes: usize,
    pub output_stall_timeout: Duration,
    pub exit_retention: Duration,
    pub exit_retention_bytes: usize,
    /// Limits every user command sets for itself (filled in at startup).
    pub child_rlimits: Vec<crate::sys::launch::Rlimit>,
    pub max_message_bytes: usize,
    pub code_port: u16,
    pub code_interpreter: bool,
    pub kernelspec_dirs: Vec<PathBuf>,
    pub port_forward: bool,
    pub init_paths: crate::init::InitPaths,
    pub in_vm: bool,
    pub cgroups: bool,
    pub cgroup_root: Option<PathBuf>,
    pub cgroup_limits: crate::sys::cgroup::Limits,
    pub upload_idle_timeout: Duration,
    pub watcher_idle_timeout: Duration,
    pub watcher_queue_events: usize,
    pub shutdown_grace: Duration,
}

impl From<&Cli> for Config {
    fn from(c: &Cli) -> Self {
        Config {
            listen: c.listen,
            port: c.port,
            default_user: c.default_user.clone(),
            default_workdir: c.default_workdir.clone(),
            replay_buffer_bytes: c.replay_buffer_bytes,
            replay_budget_bytes: c.replay_budget_bytes,
            output_pace_bytes: c.output_pace_bytes.max(1),
            subscriber_buffer_bytes: c.subscriber_buffer_bytes,
            output_stall_timeout: Duration::from_millis(c.output_stall_timeout_ms),
            exit_retention: Duration::from_secs(c.exit_retention_secs),
            exit_retention_bytes: c.exit_retention_bytes,
            child_rlimits: Vec::new(),
            max_message_bytes: c.max_message_bytes,
            code_port: c.code_port,
            code_interpreter: !c.no_code_interpreter,
            kernelspec_dirs: c.kernelspec_dirs.clone(),
            port_forward: !c.no_port_forward,
            init_paths: init_paths(c),
            in_vm: !c.not_in_vm,
            cgroups: !c.no_cgroups,
            cgroup_root: c.cgroup_root.clone(),
            cgroup_limits: {
                let d = crate::sys::cgroup::Limits::defaults();
                crate::sys::cgroup::Limits {
                    pids_max: c.user_pids_max.or(d.pids_max),
                    memory_max: c.user_memory_max.or(d.memory_max),
                    cpu_weight: Some(c.user_cpu_weight.clamp(1, 10_000)),
                    io_weight: d.io_weight,
                }
            },
            upload_idle_timeout: Duration::from_secs(c.upload_idle_timeout_secs.max(1)),
            watcher_idle_timeout: Duration::from_secs(c.watcher_idle_timeout_secs.max(1)),
            watcher_queue_events: c.watcher_queue_events.max(1),
            shutdown_grace: Duration::from_millis(c.shutdown_grace_ms),
        }
    }
}

fn init_paths(c: &Cli) -> crate::init::InitPaths {
    let mut p = crate::init::InitPaths::default();
    if let Some(root) = &c.init_paths_root {
        let under = |abs: &std::path::Path| root.join(abs.strip_prefix("/").unwrap_or(abs));
        p = crate::init::InitPaths {
            ca_bundle: under(&p.ca_bundle),
            ca_copy: under(&p.ca_copy),
            hosts: under(&p.hosts),
            run_dir: under(&p.run_dir),
            kernel_cmdline: under(&p.kernel_cmdline),
            trust_file: None,
        };
    }
    p.trust_file = c.init_trust_file.clone();
    p
}
