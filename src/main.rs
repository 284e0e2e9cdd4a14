//! The guestd binary: flags, logging, runtime, then `guestd::app::run`.

use anyhow::Context as _;
use clap::Parser as _;
use guestd::config::{Cli, Config, ENVD_COMPAT_VERSION, GUESTD_VERSION, LogFormat};

fn main() -> anyhow::Result<()> {
    // The reference agent's `-version` (single dash): a control plane runs it at
    // template build time and parses the bare version.
    if std::env::args().nth(1).as_deref() == Some("-version") {
        println!("{ENVD_COMPAT_VERSION}");
        return Ok(());
    }
    let cli = Cli::parse();
    if cli.version {
        println!("{ENVD_COMPAT_VERSION}");
        println!("guestd {GUESTD_VERSION}");
        return Ok(());
    }
    init_logging(cli.log_format);
    raise_nofile_limit();
    let config = Config::from(&cli);
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

/// Before any thread or descriptor exists: the soft open-file limit goes up to the hard
/// one (every connection, watch, pipe and kernel socket is a descriptor).
fn raise_nofile_limit() {
    match guestd::sys::limits::raise_nofile_limit() {
        Ok(l) if l.soft_before < l.soft => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard = l.hard,
            "raised the open-file limit (RLIMIT_NOFILE) to the hard limit"
        ),
        Ok(l) => tracing::info!(
            soft = l.soft,
            hard = l.hard,
            "open-file limit (RLIMIT_NOFILE) already at the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
    }
}
