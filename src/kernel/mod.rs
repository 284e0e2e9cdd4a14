//! The kernel bridge's domain: kernelspecs, kernel processes, the Jupyter messaging
//! protocol over ZeroMQ, contexts and executions. No HTTP here; the port-49999 surface
//! lives in `code_interpreter`.
//!
//! Module map:
//! * [`spec`]: kernelspec discovery and the language -> kernel mapping
//! * [`wire`]: message envelopes, HMAC signing, frame layout
//! * `instance`: one kernel process and its sockets (start, readiness, interrupt, teardown)
//! * `context`: a context's worker (FIFO executions, env and cwd, restarts)
//! * [`exec`]: execution outputs, completion tracking, the output queue
//! * [`lang`]: language normalization and per-language setup snippets
//! * [`js`]: JavaScript/TypeScript cells on Deno (npm imports, `require`, blank errors)
//! * `manager`: the registry ([`KernelManager`])

pub mod exec;
pub mod js;
pub mod lang;
pub mod spec;
pub mod time;
pub mod wire;

mod context;
mod instance;
mod manager;

use std::sync::Arc;

pub use context::ContextInfo;
pub use exec::{ExecError, ExecResult, ExecStream, Output};
pub use manager::{DEFAULT_CWD, ExecuteRequest, KernelManager, KernelOptions};
pub use spec::{LanguageMap, SpecResolver};

/// Errors of the kernel bridge. Display texts are the HTTP bodies the contract asks
/// for; [`KernelError::kind`] tells the transport which status class applies.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("Context {0} not found")]
    NotFound(String),
    #[error("Only one of context_id or language can be provided")]
    BothTargets,
    #[error("{0}")]
    InvalidEnv(#[from] lang::EnvKeyError),
    #[error("Failed to create context: no kernel is installed for language '{0}'")]
    NoKernel(String),
    #[error("Failed to set working directory: {0}: {1}")]
    Cwd(String, String),
    #[error("Failed to create context: {0}")]
    Start(String),
    /// Starting a kernel ran out of descriptors, memory or processes (the errno is in
    /// the text): 503, not 500, since retrying later may work.
    #[error("Failed to create context: out of resources: {0}")]
    Exhausted(String),
    #[error("kernel channel error: {0}")]
    Channel(String),
    #[error("Failed to restart context {0}: {1}")]
    Restart(String, String),
    #[error("Context {0} is unavailable: {1}")]
    Unavailable(String, String),
}

/// How a [`KernelError`] maps onto the transport's status classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Unknown context (404).
    NotFound,
    /// The request itself is invalid (400).
    BadRequest,
    /// The agent is out of a resource (503).
    Unavailable,
    /// The server failed (500).
    Internal,
}

impl KernelError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            KernelError::NotFound(_) => ErrorKind::NotFound,
            KernelError::BothTargets | KernelError::InvalidEnv(_) => ErrorKind::BadRequest,
            KernelError::Exhausted(_) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }

    /// A kernel start step that failed with `e`: [`KernelError::Exhausted`] when the
    /// errno says the agent ran out of a resource, else [`KernelError::Start`].
    pub(crate) fn start_io(what: &str, e: &std::io::Error) -> KernelError {
        let detail = format!("{what}: {e}");
        if crate::sys::limits::is_resource_exhaustion(e) {
            KernelError::Exhausted(detail)
        } else {
            KernelError::Start(detail)
        }
    }
}

impl KernelOptions {
    /// Options from guestd's configuration: `--kernelspec-dir` first, then the standard
    /// Jupyter data dirs; language map from `GUESTD_KERNEL_MAP`; contexts default to
    /// `/home/user`; `GUESTD_INTERRUPT_RESTART_SECS` sets how long an interrupted
    /// execution may run on before its kernel is restarted (default 10; 0 = never).
    pub fn from_config(config: &crate::config::Config) -> KernelOptions {
        KernelOptions {
            resolver: SpecResolver {
                dirs: spec::default_search_dirs(&config.kernelspec_dirs),
                languages: LanguageMap::from_env(),
            },
            default_cwd: DEFAULT_CWD.to_string(),
            interrupt_restart: std::env::var("GUESTD_INTERRUPT_RESTART_SECS")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                // 0: never restart (wait for the interrupted execution however long).
                .map(|s| std::time::Duration::from_secs(if s == 0 { 30 * 86_400 } else { s }))
                .unwrap_or(context::DEFAULT_INTERRUPT_RESTART),
            cgroups: None,
        }
    }
}

/// Starts the kernel bridge's domain (contract §6.3, §9): creates the default Python
/// context, and registers the JavaScript one (starting in the background) when a
/// JavaScript kernel is installed, before returning. `Ok(None)` when the bridge is disabled or no Python kernelspec exists;
/// the caller binds the code-interpreter port only on `Ok(Some(_))`.
pub async fn start(
    config: &crate::config::Config,
    env: crate::env::GlobalEnv,
    cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
) -> Result<Option<Arc<KernelManager>>, KernelError> {
    if !config.code_interpreter {
        tracing::info!("kernel bridge disabled");
        return Ok(None);
    }
    // Off the runtime: it reads /proc.
    let _ = tokio::task::spawn_blocking(instance::reap_stale_kernels).await;
    let mut opts = KernelOptions::from_config(config);
    opts.cgroups = cgroups;
    let mgr = Arc::new(KernelManager::new(opts, env));
    start_with(mgr).await
}

/// [`start`] with a prepared manager (tests and custom setups).
pub async fn start_with(
    mgr: Arc<KernelManager>,
) -> Result<Option<Arc<KernelManager>>, KernelError> {
    if !mgr.has_kernel("python") {
        tracing::warn!("no Python kernelspec found; the code interpreter is not served");
        return Ok(None);
    }
    let started = std::time::Instant::now();
    // Python first, alone: the bridge is ready (its port bound, `/health` 200) as soon
    // as a Python context can run (issue 11). The JavaScript default is registered
    // right after it, so `GET /contexts` lists both in creation order at once, and its
    // kernel starts in the background; JavaScript executions wait for it (D71).
    let py = mgr.default_context("python").await?;
    tracing::info!(
        context = %py.id,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "default Python context ready"
    );
    if mgr.has_kernel("javascript") {
        mgr.start_default_in_background("javascript");
    } else {
        tracing::info!("no JavaScript kernel installed");
    }
    Ok(Some(mgr))
}
