//! The guestd binary: flags, logging, runtime, then `guestd::app::run`.

use anyhow::Context as _;
use guestd::config::{
    Cli, CliError, Config, ENVD_COMPAT_VERSION, GUESTD_COMMIT, GUESTD_VERSION, LogFormat,
};
use guestd::sys::users::SystemUsers;

fn main() -> anyhow::Result<()> {
    // The reference agent's command line, in any spelling Go's `flag` package accepts
    // (`-isnotfc`, `--port=49983`, `-port 49983`...): see `config::goflags`.
    let (cli, ignored) = match Cli::parse_envd_style(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Flags(e)) => {
            eprintln!("guestd: {e}\nRun 'guestd --help' to list the flags.");
            std::process::exit(2);
        }
    };
    // Like the reference: `-version` first, then `-commit`, each alone on stdout.
    if cli.version {
        println!("{ENVD_COMPAT_VERSION}");
        return Ok(());
    }
    if cli.commit {
        println!("{GUESTD_COMMIT}");
        return Ok(());
    }
    if cli.guestd_version {
        println!("{ENVD_COMPAT_VERSION}");
        println!("guestd {GUESTD_VERSION}");
        return Ok(());
    }
    init_logging(cli.log_format);
    guestd::sys::memory::tune_allocator();
    // Before any thread exists: threads inherit the nice value.
    match guestd::sys::priority::set_own(cli.agent_nice) {
        Ok(guestd::sys::priority::Applied::Set) => {
            tracing::info!(nice = cli.agent_nice, "agent priority set")
        }
        Ok(guestd::sys::priority::Applied::AlreadyHigher(n)) => tracing::info!(
            nice = n,
            asked = cli.agent_nice,
            "guestd already runs at a higher priority; kept"
        ),
        Err(e) => tracing::warn!(
            nice = cli.agent_nice,
            error = %e,
            "cannot raise guestd's priority; it keeps nice {}",
            guestd::sys::priority::own_nice()
        ),
    }
    let nofile = raise_nofile_limit();
    if !ignored.is_empty() {
        tracing::warn!(
            ignored = ?ignored,
            "ignoring arguments after the flags (flag parsing stops at the first non-flag argument, as the reference agent's does)"
        );
    }
    let mut config = Config::from(&cli);
    let (user, warning) =
        guestd::config::effective_default_user(&config.default_user, &SystemUsers);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    config.default_user = user;
    // User commands get the open-file limit guestd was started with: programs that
    // use select(2) break with a soft limit over 1024.
    if let Some((soft, hard)) = nofile {
        #[allow(clippy::unnecessary_cast)] // a c_int on musl, a c_uint on glibc
        config.child_rlimits.push(guestd::sys::launch::Rlimit {
            resource: libc::RLIMIT_NOFILE as u32,
            soft,
            hard,
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("guestd")
        // Blocking threads (launches, filesystem calls) pile up in bursts; idle ones go
        // after 2 s instead of 10 so their stacks do not outlive the burst by long.
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(guestd::app::run(config));
    // Never wait for blocking work (a launch, a filesystem call on a hung mount) once
    // the agent has decided to exit: the grace period was spent in `app::run`.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    result.context("guestd failed")
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GUESTD_LOG")
        // zeromq logs every reconnect attempt to a dead kernel at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zeromq=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Before any thread or descriptor exists: the soft open-file limit goes up to the hard
/// one (every connection, watch, pipe and kernel socket is a descriptor).
/// Returns the limit guestd started with (soft, hard) when it raised it.
fn raise_nofile_limit() -> Option<(u64, u64)> {
    match guestd::sys::limits::raise_nofile_limit() {
        Ok(l) if l.soft_before < l.soft => {
            tracing::info!(
                soft_before = l.soft_before,
                soft = l.soft,
                hard = l.hard,
                "raised the open-file limit (RLIMIT_NOFILE) to the hard limit"
            );
            Some((l.soft_before, l.hard))
        }
        Ok(l) => {
            tracing::info!(
                soft = l.soft,
                hard = l.hard,
                "open-file limit (RLIMIT_NOFILE) already at the hard limit"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
            None
        }
    }
}
