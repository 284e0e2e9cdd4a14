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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("guestd")
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(guestd::app::run(config))
        .context("guestd failed")
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
