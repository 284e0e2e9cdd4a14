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

    /// Output retained per process for replay on Connect, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub replay_buffer_bytes: usize,

    /// A stream subscriber whose full output queue makes no progress for this many
    /// milliseconds is disconnected, so it cannot stall the process or other clients.
    #[arg(long, default_value_t = 10_000)]
    pub output_stall_timeout_ms: u64,

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

    /// Process limit of the user cgroup (all user processes together).
    #[arg(long, default_value_t = 16_384)]
    pub user_pids_max: u64,

    /// Memory limit of the user cgroup in bytes (default: total memory minus
    /// min(total/8, 128 MiB), leaving the agent room).
    #[arg(long)]
    pub user_memory_max: Option<u64>,

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
    pub output_stall_timeout: Duration,
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
            output_stall_timeout: Duration::from_millis(c.output_stall_timeout_ms),
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
                    pids_max: Some(c.user_pids_max),
                    memory_max: c.user_memory_max.or(d.memory_max),
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
