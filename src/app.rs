//! Assembles one guestd instance: state, listeners, background tasks.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server::{self, ConnCounter};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs guestd until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartupError> {
    protect_self();
    let shutdown = CancellationToken::new();
    let env = crate::env::GlobalEnv::new(crate::env::internal_vars_for(config.in_vm));
    let metrics = crate::metrics::start();
    let connections = Arc::new(ConnCounter::default());
    let cgroups = if config.cgroups {
        match crate::sys::cgroup::Cgroups::setup(
            config.cgroup_root.as_deref(),
            config.cgroup_limits,
        ) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "user processes share guestd's cgroup");
                None
            }
        }
    } else {
        None
    };
    let agent =
        crate::api::Agent::new(&config, &env, metrics, connections.clone(), cgroups.clone());

    // Give memory back after bursts (thousands of ended commands, many streams).
    tokio::spawn(crate::sys::memory::janitor(
        std::time::Duration::from_secs(5),
        4 << 20,
    ));

    let addr = SocketAddr::new(config.listen, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })?;
    tracing::info!(
        %addr,
        version = crate::config::GUESTD_VERSION,
        envd_version = crate::config::ENVD_COMPAT_VERSION,
        "agent API listening"
    );
    tokio::spawn(server::serve(
        listener,
        crate::api::handler(agent),
        connections,
        shutdown.clone(),
    ));

    let kernels = if config.code_interpreter {
        Some(tokio::spawn(serve_code_interpreter(
            config.clone(),
            env.clone(),
            cgroups.clone(),
            shutdown.clone(),
        )))
    } else {
        None
    };

    if config.port_forward {
        let stats = Arc::new(crate::portfwd::Stats::default());
        tokio::spawn(crate::portfwd::run(
            vec![config.port, config.code_port],
            stats,
            shutdown.clone(),
        ));
    }

    let mut signals = Signals::new();
    signals.recv().await;
    let grace = config.shutdown_grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
    shutdown.cancel();
    // A child stuck between clone and exec holds copies of every guestd descriptor
    // (the listening sockets too): it must not outlive the agent.
    let stragglers = crate::sys::launch::kill_inflight();
    if stragglers > 0 {
        tracing::warn!(stragglers, "killed children that had not reached exec");
    }
    let orderly = async {
        if let Some(task) = kernels
            && let Ok(Some(mgr)) = task.await
        {
            mgr.shutdown().await;
        }
    };
    tokio::select! {
        _ = orderly => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "shutdown grace period over: exiting now");
        }
        _ = signals.recv() => {
            tracing::warn!("second signal: exiting now");
        }
    }
    // The leaves made ahead of time would outlive guestd otherwise (the next one also
    // sweeps the empty leaves of dead instances).
    if let Some(cg) = &cgroups {
        cg.shutdown();
    }
    Ok(())
}

/// Starts the default kernel contexts, then serves the kernel bridge. The port is bound
/// only once they are ready (contract §9: `/health` on it means "ready"); the agent API
/// is up meanwhile.
async fn serve_code_interpreter(
    config: Config,
    env: crate::env::GlobalEnv,
    cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
    shutdown: CancellationToken,
) -> Option<Arc<crate::kernel::KernelManager>> {
    let mgr = match crate::kernel::start(&config, env, cgroups).await {
        Ok(Some(mgr)) => mgr,
        Ok(None) => {
            tracing::info!("no Python kernelspec found: the kernel bridge is off");
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "the kernel bridge could not start");
            return None;
        }
    };
    let addr = SocketAddr::new(config.listen, config.code_port);
    match TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!(%addr, "kernel bridge listening");
            tokio::spawn(server::serve(
                listener,
                crate::code_interpreter::handler(mgr.clone()),
                Arc::new(ConnCounter::default()),
                shutdown,
            ));
        }
        Err(e) => tracing::error!(%addr, error = %e, "cannot listen for the kernel bridge"),
    }
    Some(mgr)
}

/// The agent must outlive whatever user code does: it reaps orphans as a subreaper and
/// asks the OOM killer to pick anything but itself.
fn protect_self() {
    if let Err(e) = crate::sys::reaper::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to PID 1");
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!(error = %e, "cannot lower guestd's OOM score");
    }
}

/// SIGTERM and SIGINT.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = one(&mut self.term) => {}
            _ = one(&mut self.int) => {}
        }
    }
}
