//! The registry of contexts: creation order, language default contexts (created lazily,
//! one per language even under concurrent first use), target selection for executions
//! (contract §2.2), restart and removal.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::KernelError;
use super::context::{ContextHandle, ContextInfo, Job};
use super::exec::{ExecStream, output_channel};
use super::lang::{normalize, validate_env};
use super::spec::SpecResolver;
use crate::env::GlobalEnv;

/// Default working directory of contexts (contract §2.3).
pub const DEFAULT_CWD: &str = "/home/user";

/// What `/execute` asks for.
#[derive(Debug, Clone, Default)]
pub struct ExecuteRequest {
    pub code: String,
    pub context_id: Option<String>,
    pub language: Option<String>,
    pub env_vars: BTreeMap<String, String>,
}

/// Settings of a [`KernelManager`].
#[derive(Debug, Clone)]
pub struct KernelOptions {
    pub resolver: SpecResolver,
    pub default_cwd: String,
    /// After a client disconnect, how long the interrupted execution may run on before
    /// the kernel is restarted.
    pub interrupt_restart: std::time::Duration,
    /// Each kernel runs in its own leaf of the user cgroup (its code is user code).
    pub cgroups: Option<Arc<crate::sys::cgroup::Cgroups>>,
}

#[derive(Default)]
struct Registry {
    /// Live contexts in creation order.
    contexts: Vec<Arc<ContextHandle>>,
    /// Normalized language -> id of its default context.
    defaults: HashMap<String, String>,
}

/// Owns every context of the kernel bridge.
pub struct KernelManager {
    opts: KernelOptions,
    env: GlobalEnv,
    registry: Mutex<Registry>,
    /// Serializes lazy creation of each language's default context.
    default_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

impl KernelManager {
    pub fn new(opts: KernelOptions, env: GlobalEnv) -> KernelManager {
        KernelManager {
            opts,
            env,
            registry: Mutex::new(Registry::default()),
            default_locks: Mutex::new(HashMap::new()),
        }
    }

    fn reg(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a kernelspec exists for the (normalized) language.
    pub fn has_kernel(&self, language: &str) -> bool {
        self.opts
            .resolver
            .resolve(&normalize(Some(language)))
            .is_some()
    }

    /// Creates a context (contract §2.3): ready to execute when this returns.
    pub async fn create_context(
        &self,
        language: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<ContextInfo, KernelError> {
        let language = normalize(language);
        Ok(self.create(&language, cwd).await?.info.clone())
    }

    async fn create(
        &self,
        language: &str,
        cwd: Option<&str>,
    ) -> Result<Arc<ContextHandle>, KernelError> {
        let spec = self
            .opts
            .resolver
            .resolve(language)
            .ok_or_else(|| KernelError::NoKernel(language.to_string()))?;
        let cwd = cwd
            .filter(|c| !c.is_empty())
            .unwrap_or(&self.opts.default_cwd)
            .to_string();
        let info = ContextInfo {
            id: uuid::Uuid::new_v4().to_string(),
            language: language.to_string(),
            cwd,
        };
        tracing::info!(context = %info.id, language, kernel = %spec.name, cwd = %info.cwd, "creating context");
        let handle = Arc::new(
            ContextHandle::create(
                info,
                spec,
                self.opts.resolver.clone(),
                self.env.clone(),
                self.opts.interrupt_restart,
                self.opts.cgroups.clone(),
            )
            .await?,
        );
        self.reg().contexts.push(handle.clone());
        Ok(handle)
    }

    /// Registers the default context of `language` at once and starts its kernel in the
    /// background (startup, D71): `GET /contexts` lists it right away and executions on
    /// it wait for the kernel; if the kernel cannot start, the context is removed again
    /// (the language then gets a new default on first use, or its error).
    pub fn start_default_in_background(self: &Arc<Self>, language: &str) {
        let language = normalize(Some(language));
        let Some(spec) = self.opts.resolver.resolve(&language) else {
            return;
        };
        let info = ContextInfo {
            id: uuid::Uuid::new_v4().to_string(),
            language: language.clone(),
            cwd: self.opts.default_cwd.clone(),
        };
        tracing::info!(context = %info.id, language, kernel = %spec.name, cwd = %info.cwd, "creating context");
        let (handle, started) = ContextHandle::spawn(
            info,
            spec,
            self.opts.resolver.clone(),
            self.env.clone(),
            self.opts.interrupt_restart,
            self.opts.cgroups.clone(),
        );
        let id = handle.info.id.clone();
        {
            let mut reg = self.reg();
            if reg.defaults.contains_key(&language) {
                return; // someone made it meanwhile; the spawned worker ends unused
            }
            reg.contexts.push(Arc::new(handle));
            reg.defaults.insert(language.clone(), id.clone());
        }
        let mgr = Arc::downgrade(self);
        tokio::spawn(async move {
            match started.await {
                Ok(Ok(())) => {
                    tracing::info!(context = %id, language, "default context ready (started in the background)")
                }
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "its worker stopped".to_string(),
                    };
                    tracing::warn!(context = %id, language, error = %why, "default context failed to start; it is created again on first use");
                    if let Some(mgr) = mgr.upgrade() {
                        let mut reg = mgr.reg();
                        reg.contexts.retain(|c| c.info.id != id);
                        reg.defaults.retain(|_, v| *v != id);
                    }
                }
            }
        });
    }

    /// The default context of a language, created if missing (contract §2.2, §6.3).
    pub async fn default_context(&self, language: &str) -> Result<ContextInfo, KernelError> {
        Ok(self
            .ensure_default(&normalize(Some(language)))
            .await?
            .info
            .clone())
    }

    async fn ensure_default(&self, language: &str) -> Result<Arc<ContextHandle>, KernelError> {
        let lock = {
            let mut locks = self.default_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(language.to_string()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(h) = self.find_default(language) {
            return Ok(h);
        }
        let h = self.create(language, None).await?;
        self.reg()
            .defaults
            .insert(language.to_string(), h.info.id.clone());
        Ok(h)
    }

    fn find_default(&self, language: &str) -> Option<Arc<ContextHandle>> {
        let reg = self.reg();
        let id = reg.defaults.get(language)?;
        reg.contexts.iter().find(|c| &c.info.id == id).cloned()
    }

    fn find(&self, id: &str) -> Option<Arc<ContextHandle>> {
        self.reg()
            .contexts
            .iter()
            .find(|c| c.info.id == id)
            .cloned()
    }

    /// Every live context in creation order.
    pub fn list_contexts(&self) -> Vec<ContextInfo> {
        self.reg().contexts.iter().map(|c| c.info.clone()).collect()
    }

    /// Starts an execution; the returned stream yields its outputs. The request is queued
    /// behind running executions of the same context.
    pub async fn execute(&self, req: ExecuteRequest) -> Result<ExecStream, KernelError> {
        let ctx = match (non_empty(&req.context_id), non_empty(&req.language)) {
            (Some(_), Some(_)) => return Err(KernelError::BothTargets),
            (None, Some(lang)) => self.ensure_default(&normalize(Some(lang))).await?,
            (Some(id), None) => self
                .find(id)
                .ok_or_else(|| KernelError::NotFound(id.to_string()))?,
            (None, None) => self.ensure_default("python").await?,
        };
        validate_env(
            &ctx.info.language,
            req.env_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )?;
        if let Some(reason) = ctx.failure() {
            return Err(KernelError::Unavailable(ctx.info.id.clone(), reason));
        }
        let (out, stream) = output_channel();
        ctx.execute(Job {
            code: req.code,
            env_vars: req.env_vars.into_iter().collect(),
            out,
        })?;
        Ok(stream)
    }

    /// Replaces the context's kernel (same id, language, cwd) and waits until it is ready.
    pub async fn restart_context(&self, id: &str) -> Result<(), KernelError> {
        let ctx = self
            .find(id)
            .ok_or_else(|| KernelError::NotFound(id.to_string()))?;
        ctx.restart().await.map_err(|e| {
            tracing::warn!(context = id, error = %e, "restart failed");
            KernelError::Restart(id.to_string(), e.to_string())
        })
    }

    /// Ends running work, shuts the kernel down and forgets the context (and the
    /// language default alias pointing at it).
    pub async fn remove_context(&self, id: &str) -> Result<(), KernelError> {
        let ctx = {
            let mut reg = self.reg();
            let pos = reg
                .contexts
                .iter()
                .position(|c| c.info.id == id)
                .ok_or_else(|| KernelError::NotFound(id.to_string()))?;
            let ctx = reg.contexts.remove(pos);
            reg.defaults.retain(|_, v| v != id);
            ctx
        };
        ctx.remove().await;
        Ok(())
    }

    /// Removes every context (guestd shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<Arc<ContextHandle>> = {
            let mut reg = self.reg();
            reg.defaults.clear();
            std::mem::take(&mut reg.contexts)
        };
        futures_util::future::join_all(all.iter().map(|c| c.remove())).await;
    }
}
