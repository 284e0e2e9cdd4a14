//! Command-line flags (clap) and the configuration they produce.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, ValueEnum};

use crate::sys::users::{UserDb, UserError};

pub mod goflags;

/// The envd release whose behaviour guestd implements and reports (contract §6.6):
/// high enough to enable every current SDK feature (≥ 0.6.4), and not higher, so SDK
/// feature gates for behaviour guestd lacks stay closed.
pub const ENVD_COMPAT_VERSION: &str = "0.6.13";

/// guestd's own version.
pub const GUESTD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The source commit guestd was built from (`build.rs`: `$GUESTD_COMMIT`, else
/// `git rev-parse HEAD`, else `unknown`), printed by `-commit` as the reference does.
pub const GUESTD_COMMIT: &str = env!("GUESTD_COMMIT");

/// The reference agent's built-in default user, used when the configured one does not
/// exist on this machine.
pub const FALLBACK_USER: &str = "root";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// guestd: the guest agent of a sandbox VM (E2B envd-compatible API on --port, the
/// code-interpreter kernel bridge on --code-port).
///
/// Flags are read the way the reference agent (Go's `flag` package) reads them: one or
/// two dashes, `-flag=value` or `-flag value`; flag parsing stops at the first
/// argument that is not a flag.
#[derive(Debug, Clone, Parser)]
#[command(name = "guestd", disable_version_flag = true)]
pub struct Cli {
    /// Print the envd-compatible version and exit (what the reference's `-version`
    /// prints, which control planes parse).
    #[arg(long = "version")]
    pub version: bool,

    /// Print the source commit and exit.
    #[arg(long)]
    pub commit: bool,

    /// Print the envd-compatible version, then guestd's own version, and exit.
    #[arg(long = "guestd-version", short = 'V')]
    pub guestd_version: bool,

    /// Accepted for the reference's command line (it then also logs to stdout);
    /// guestd always writes its log to stderr.
    #[arg(long)]
    pub verbose: bool,

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
    /// 100; v1 `cpu.shares` get weight × 1024 / 100). The agent's priority comes from
    /// `--agent-nice`; a lower weight throttles user code whenever the agent is busy.
    #[arg(long, default_value_t = crate::sys::cgroup::USER_CPU_WEIGHT)]
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

/// The command line could not be read.
#[derive(Debug)]
pub enum CliError {
    /// Go's `flag` package would refuse it (undefined flag, missing value, bad syntax).
    Flags(goflags::FlagError),
    /// clap refused a value, or asked for `--help` (print it and exit with its code).
    Clap(clap::Error),
}

impl Cli {
    /// Parses a command line (program name first) spelled as the reference agent's
    /// (see [`goflags`]), then with clap. Also returns the arguments after the flags,
    /// which the reference ignores (the caller should warn about them).
    pub fn parse_envd_style<I>(args: I) -> Result<(Cli, Vec<std::ffi::OsString>), CliError>
    where
        I: IntoIterator,
        I::Item: Into<std::ffi::OsString>,
    {
        let mut cmd = Cli::command();
        let n = goflags::normalize(&cmd, args).map_err(CliError::Flags)?;
        let mut matches = cmd
            .try_get_matches_from_mut(n.args)
            .map_err(CliError::Clap)?;
        let cli = Cli::from_arg_matches_mut(&mut matches)
            .map_err(|e| CliError::Clap(e.format(&mut cmd)))?;
        Ok((cli, n.ignored))
    }
}

/// The default user guestd starts with: the configured one if it exists, else the
/// reference's `root`, with a warning to log (an image without the configured account
/// must still serve, as the reference does, whose default is `root`).
pub fn effective_default_user(configured: &str, users: &dyn UserDb) -> (String, Option<String>) {
    match users.user_by_name(configured) {
        Ok(_) => (configured.to_string(), None),
        Err(UserError::Unknown(_)) if configured != FALLBACK_USER => (
            FALLBACK_USER.to_string(),
            Some(format!(
                "default user '{configured}' does not exist; using '{FALLBACK_USER}' until /init names another"
            )),
        ),
        Err(e) => (
            configured.to_string(),
            Some(format!("default user '{configured}': {e}")),
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::users::User;

    fn parse(args: &[&str]) -> Cli {
        let mut argv = vec!["guestd"];
        argv.extend_from_slice(args);
        match Cli::parse_envd_style(argv) {
            Ok((cli, ignored)) => {
                assert!(ignored.is_empty(), "{ignored:?}");
                cli
            }
            Err(CliError::Flags(e)) => panic!("{args:?}: {e}"),
            Err(CliError::Clap(e)) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn the_reference_flags_reach_the_config() {
        for argv in [
            &[
                "-port",
                "4000",
                "-isnotfc",
                "-verbose",
                "-cgroup-root",
                "/cg",
                "-no-cgroups",
            ][..],
            &[
                "--port=4000",
                "--isnotfc",
                "--verbose",
                "--cgroup-root=/cg",
                "--no-cgroups",
            ],
            &[
                "--port",
                "4000",
                "-isnotfc=true",
                "--verbose=1",
                "-cgroup-root=/cg",
                "--no-cgroups=T",
            ],
        ] {
            let cli = parse(argv);
            assert_eq!(cli.port, 4000, "{argv:?}");
            assert!(cli.not_in_vm && cli.verbose && cli.no_cgroups, "{argv:?}");
            assert_eq!(
                cli.cgroup_root.as_deref(),
                Some(std::path::Path::new("/cg"))
            );
            let config = Config::from(&cli);
            assert!(!config.in_vm && !config.cgroups);
        }
        let cli = parse(&["-isnotfc=false", "-port=0xC33F"]);
        assert!(!cli.not_in_vm);
        assert_eq!(cli.port, 49983);
    }

    #[test]
    fn version_and_commit_flags() {
        for v in ["-version", "--version", "-version=true", "--version=1"] {
            let cli = parse(&[v]);
            assert!(cli.version && !cli.guestd_version, "{v}");
        }
        assert!(!parse(&["-version=false"]).version);
        assert!(parse(&["-commit"]).commit && parse(&["--commit"]).commit);
        assert!(parse(&["-V"]).guestd_version);
        assert!(parse(&["--guestd-version"]).guestd_version);
        assert!(!GUESTD_COMMIT.is_empty());
    }

    #[test]
    fn guestds_own_flags_keep_working() {
        let cli = parse(&[
            "--listen",
            "127.0.0.1",
            "--default-user",
            "root",
            "--no-code-interpreter",
            "--log-format",
            "json",
            "--kernelspec-dir",
            "/a",
            "--kernelspec-dir=/b",
        ]);
        assert_eq!(cli.default_user, "root");
        assert!(cli.no_code_interpreter);
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.kernelspec_dirs.len(), 2);
        // And their single-dash spellings.
        let cli = parse(&["-default-user", "x", "-user-pids-max=7"]);
        assert_eq!(
            (cli.default_user.as_str(), cli.user_pids_max),
            ("x", Some(7))
        );
    }

    #[test]
    fn bad_command_lines_are_refused() {
        let err = |args: &[&str]| {
            let mut argv = vec!["guestd"];
            argv.extend_from_slice(args);
            Cli::parse_envd_style(argv).expect_err("refused")
        };
        match err(&["-verbos"]) {
            CliError::Flags(e) => {
                assert_eq!(e.to_string(), "flag provided but not defined: -verbos")
            }
            CliError::Clap(e) => panic!("{e}"),
        }
        // A value clap refuses (out of u16) names the flag.
        match err(&["-port", "70000"]) {
            CliError::Clap(e) => assert!(e.to_string().contains("--port"), "{e}"),
            CliError::Flags(e) => panic!("{e}"),
        }
        match err(&["-h"]) {
            CliError::Clap(e) => assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp),
            CliError::Flags(e) => panic!("{e}"),
        }
    }

    #[test]
    fn trailing_arguments_are_returned_as_ignored() {
        let (cli, ignored) = Cli::parse_envd_style(["guestd", "-isnotfc", "extra", "-port", "1"])
            .ok()
            .unwrap();
        assert!(cli.not_in_vm);
        assert_eq!(cli.port, 49983);
        assert_eq!(ignored, ["extra", "-port", "1"]);
    }

    struct Table(&'static [&'static str]);
    impl UserDb for Table {
        fn user_by_name(&self, name: &str) -> Result<User, UserError> {
            if !self.0.contains(&name) {
                return Err(UserError::Unknown(name.into()));
            }
            Ok(User {
                name: name.into(),
                uid: 1000,
                gid: 1000,
                groups: vec![1000],
                home: "/home/x".into(),
                shell: "/bin/sh".into(),
            })
        }
        fn user_name(&self, _: u32) -> Option<String> {
            None
        }
        fn group_name(&self, _: u32) -> Option<String> {
            None
        }
    }

    #[test]
    fn a_missing_default_user_falls_back_to_root_with_a_warning() {
        let db = Table(&["root", "user"]);
        assert_eq!(effective_default_user("user", &db), ("user".into(), None));
        let (user, warning) = effective_default_user("user", &Table(&["root"]));
        assert_eq!(user, "root");
        assert_eq!(
            warning.as_deref(),
            Some("default user 'user' does not exist; using 'root' until /init names another")
        );
        // Without even root there is nothing better to choose: keep it and say so.
        let (user, warning) = effective_default_user("root", &Table(&[]));
        assert_eq!(user, "root");
        assert_eq!(
            warning.as_deref(),
            Some("default user 'root': invalid username: 'root'")
        );
    }
}
