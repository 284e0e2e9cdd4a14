//! `/init`: how a control plane initialises guestd (contract §5.4), and the access
//! token that locks every other route once set (§2.1).
//!
//! Trust rule (the contract leaves the mechanism to us; it must be host-controlled so
//! a process inside the sandbox cannot re-initialise the agent): a request is accepted
//! when
//! 1. its `accessToken` equals the current token, or
//! 2. SHA-256 of its `accessToken` (empty string when absent) equals the **trust
//!    anchor**: a hex digest the host publishes out of band, read at every `/init`
//!    from the kernel command line (`guestd.init_token_sha256=<hex>`, set by the VMM
//!    at boot and immutable from inside the guest) or from the file named by
//!    `--init-trust-file` (for hosts that inject it into the image or a read-only
//!    mount), or
//! 3. no token is set and no anchor is published (first boot).
//!
//! Everything else is 401. Requests are serialized; a retried `/init` whose
//! `timestamp` is not newer than the newest applied one succeeds without applying its
//! data (the host retries until it sees success).

pub mod token;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use sha2::Digest as _;

pub use token::{AccessToken, ct_eq};

use crate::env::GlobalEnv;
use crate::sys::launch;

/// The `/init` body (every field optional).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    pub access_token: Option<String>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
    pub timestamp: Option<String>,
    pub ca_bundle: Option<String>,
    #[serde(rename = "hyperloopIP")]
    pub hyperloop_ip: Option<String>,
    pub volume_mounts: Option<Vec<VolumeMount>>,
    #[serde(rename = "lifecycleID")]
    pub lifecycle_id: Option<String>,
    /// guestd extension: the sandbox id (env `E2B_SANDBOX_ID`, `/run/e2b/.E2B_SANDBOX_ID`).
    pub sandbox_id: Option<String>,
    /// guestd extension: the template id (env `E2B_TEMPLATE_ID`).
    pub template_id: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct VolumeMount {
    pub nfs_target: String,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "unauthorized: the request's accessToken is neither the current token nor the host's trust anchor"
    )]
    Unauthorized,
    #[error("invalid timestamp {0:?}: expected RFC 3339")]
    Timestamp(String),
    #[error("invalid hyperloopIP {0:?}")]
    HyperloopIp(String),
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting volume {path}: {message}")]
    Mount { path: String, message: String },
}

/// What `/init` changed, for the caller (defaults live in the API state).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    pub default_user: Option<String>,
    pub default_workdir: Option<PathBuf>,
    /// False when the request was a stale retry and its data was skipped.
    pub fresh: bool,
}

/// Where `/init` writes on the machine; tests point these into a tempdir.
#[derive(Debug, Clone)]
pub struct InitPaths {
    pub ca_bundle: PathBuf,
    pub ca_copy: PathBuf,
    pub hosts: PathBuf,
    pub run_dir: PathBuf,
    pub kernel_cmdline: PathBuf,
    pub trust_file: Option<PathBuf>,
}

impl Default for InitPaths {
    fn default() -> Self {
        InitPaths {
            ca_bundle: "/etc/ssl/certs/ca-certificates.crt".into(),
            ca_copy: "/usr/local/share/ca-certificates/e2b-ca.crt".into(),
            hosts: "/etc/hosts".into(),
            run_dir: "/run/e2b".into(),
            kernel_cmdline: "/proc/cmdline".into(),
            trust_file: None,
        }
    }
}

/// Clock adjustment seam (setting CLOCK_REALTIME needs CAP_SYS_TIME).
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    fn set(&self, to: DateTime<Utc>) -> std::io::Result<()>;
}

/// The machine's real-time clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn set(&self, to: DateTime<Utc>) -> std::io::Result<()> {
        let ts =
            nix::sys::time::TimeSpec::new(to.timestamp(), i64::from(to.timestamp_subsec_nanos()));
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(std::io::Error::from)
    }
}

struct State {
    last_timestamp: Option<DateTime<Utc>>,
    last_ca: Option<String>,
    mounted: BTreeMap<String, String>,
}

/// Applies `/init` requests.
pub struct Initializer {
    pub token: Arc<AccessToken>,
    env: GlobalEnv,
    paths: InitPaths,
    clock: Box<dyn Clock>,
    state: tokio::sync::Mutex<State>,
    /// Default settings applied by the last successful `/init` (also read by the API).
    pub applied: RwLock<Applied>,
}

impl Initializer {
    pub fn new(
        token: Arc<AccessToken>,
        env: GlobalEnv,
        paths: InitPaths,
        clock: Box<dyn Clock>,
    ) -> Self {
        Initializer {
            token,
            env,
            paths,
            clock,
            state: tokio::sync::Mutex::new(State {
                last_timestamp: None,
                last_ca: None,
                mounted: BTreeMap::new(),
            }),
            applied: RwLock::new(Applied::default()),
        }
    }

    /// The host's published SHA-256 of the expected token, if any.
    pub fn trust_anchor(&self) -> Option<[u8; 32]> {
        let from_cmdline = std::fs::read_to_string(&self.paths.kernel_cmdline)
            .ok()
            .and_then(|c| {
                c.split_whitespace().find_map(|w| {
                    w.strip_prefix("guestd.init_token_sha256=")
                        .map(str::to_string)
                })
            });
        let from_file = self
            .paths
            .trust_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string());
        from_cmdline.or(from_file).and_then(|hex| parse_hex32(&hex))
    }

    fn authorized(&self, req: &InitRequest) -> bool {
        let body = req.access_token.as_deref().unwrap_or("");
        if let Some(current) = self.token.get()
            && ct_eq(body.as_bytes(), current.as_bytes())
        {
            return true;
        }
        match self.trust_anchor() {
            Some(anchor) => {
                let digest: [u8; 32] = sha2::Sha256::digest(body.as_bytes()).into();
                ct_eq(&digest, &anchor)
            }
            None => !self.token.is_set(),
        }
    }

    /// Authorizes and applies one request, serialized with every other.
    pub async fn init(&self, req: InitRequest) -> Result<Applied, InitError> {
        let mut state = self.state.lock().await;
        if !self.authorized(&req) {
            return Err(InitError::Unauthorized);
        }
        let timestamp = match req.timestamp.as_deref() {
            Some(t) => Some(
                DateTime::parse_from_rfc3339(t)
                    .map_err(|_| InitError::Timestamp(t.to_string()))?
                    .with_timezone(&Utc),
            ),
            None => None,
        };
        if let (Some(ts), Some(last)) = (timestamp, state.last_timestamp)
            && ts <= last
        {
            tracing::info!(%ts, %last, "stale /init retry: data skipped");
            let mut applied = self
                .applied
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            applied.fresh = false;
            return Ok(applied);
        }
        if let Some(ts) = timestamp {
            self.sync_clock(ts);
            state.last_timestamp = Some(ts);
        }
        if let Some(vars) = req.env_vars.clone() {
            self.env.replace_user_vars(vars);
        }
        match req.access_token.as_deref() {
            Some(t) if !t.is_empty() => self.token.set(t.to_string()),
            _ => self.token.clear(),
        }
        if let Some(ip) = req.hyperloop_ip.as_deref().filter(|s| !s.is_empty()) {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| InitError::HyperloopIp(ip.to_string()))?;
            self.set_hyperloop(ip)?;
        }
        if let Some(id) = req.sandbox_id.as_deref().filter(|s| !s.is_empty()) {
            self.env
                .set_internal("E2B_SANDBOX_ID", Some(id.to_string()));
            self.write_run_file(".E2B_SANDBOX_ID", id)?;
        }
        if let Some(id) = req.template_id.as_deref().filter(|s| !s.is_empty()) {
            self.env
                .set_internal("E2B_TEMPLATE_ID", Some(id.to_string()));
            self.write_run_file(".E2B_TEMPLATE_ID", id)?;
        }
        let mut applied = self
            .applied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(u) = req.default_user.as_deref().filter(|s| !s.is_empty()) {
            applied.default_user = Some(u.to_string());
        }
        if let Some(w) = req.default_workdir.as_deref().filter(|s| !s.is_empty()) {
            applied.default_workdir = Some(PathBuf::from(w));
        }
        if let Some(pem) = req.ca_bundle.as_deref().filter(|s| !s.trim().is_empty())
            && state.last_ca.as_deref() != Some(pem)
        {
            self.install_ca(pem, state.last_ca.as_deref())?;
            state.last_ca = Some(pem.to_string());
        }
        if let Some(mounts) = &req.volume_mounts {
            let lifecycle = req.lifecycle_id.clone().unwrap_or_default();
            for m in mounts {
                if state.mounted.get(&m.path) == Some(&lifecycle) {
                    continue;
                }
                mount_nfs(m).await?;
                state.mounted.insert(m.path.clone(), lifecycle.clone());
            }
        }
        applied.fresh = true;
        *self.applied.write().unwrap_or_else(|p| p.into_inner()) = applied.clone();
        Ok(applied)
    }

    /// Sets the clock when it is more than 50 ms behind or 5 s ahead of the host's.
    fn sync_clock(&self, host: DateTime<Utc>) {
        let now = self.clock.now();
        let behind = host - now;
        let needs =
            behind > chrono::Duration::milliseconds(50) || -behind > chrono::Duration::seconds(5);
        if !needs {
            return;
        }
        match self.clock.set(host) {
            Ok(()) => tracing::info!(from = %now, to = %host, "clock set from /init timestamp"),
            Err(e) => tracing::warn!(
                error = %e,
                guest = %now,
                host = %host,
                "the guest clock is off but cannot be set (needs CAP_SYS_TIME)"
            ),
        }
    }

    fn write_run_file(&self, name: &str, value: &str) -> Result<(), InitError> {
        let step = |source| InitError::Step {
            step: "writing sandbox identity",
            source,
        };
        std::fs::create_dir_all(&self.paths.run_dir).map_err(step)?;
        let path = self.paths.run_dir.join(name);
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, value).map_err(step)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).map_err(step)
    }

    fn set_hyperloop(&self, ip: IpAddr) -> Result<(), InitError> {
        let hosts = std::fs::read_to_string(&self.paths.hosts).unwrap_or_default();
        let mut lines: Vec<&str> = hosts
            .lines()
            .filter(|l| {
                !l.split_whitespace()
                    .skip(1)
                    .any(|h| h == "events.e2b.local")
            })
            .collect();
        let entry = format!("{ip} events.e2b.local");
        lines.push(&entry);
        let text = lines.join("\n") + "\n";
        std::fs::write(&self.paths.hosts, text).map_err(|source| InitError::Step {
            step: "writing /etc/hosts",
            source,
        })?;
        self.env
            .set_internal("E2B_EVENTS_ADDRESS", Some(format!("http://{ip}")));
        Ok(())
    }

    /// Appends the bundle to the system trust store, keeps a copy in the CA directory,
    /// and removes the previously installed bundle from the store.
    fn install_ca(&self, pem: &str, previous: Option<&str>) -> Result<(), InitError> {
        let step = |source| InitError::Step {
            step: "installing the CA bundle",
            source,
        };
        let mut store = std::fs::read_to_string(&self.paths.ca_bundle).unwrap_or_default();
        if let Some(prev) = previous {
            store = store.replace(prev, "");
        }
        if !store.is_empty() && !store.ends_with('\n') {
            store.push('\n');
        }
        store.push_str(pem);
        if !store.ends_with('\n') {
            store.push('\n');
        }
        write_atomic(&self.paths.ca_bundle, store.as_bytes()).map_err(step)?;
        if let Some(dir) = self.paths.ca_copy.parent() {
            std::fs::create_dir_all(dir).map_err(step)?;
        }
        write_atomic(&self.paths.ca_copy, pem.as_bytes()).map_err(step)
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.guestd-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

/// Mounts an NFSv3 volume with the reference's options, within 10 s.
async fn mount_nfs(m: &VolumeMount) -> Result<(), InitError> {
    let err = |message: String| InitError::Mount {
        path: m.path.clone(),
        message,
    };
    std::fs::create_dir_all(&m.path).map_err(|e| err(e.to_string()))?;
    let arg = |s: &str| std::ffi::CString::new(s).map_err(|_| err(format!("a NUL byte in {s:?}")));
    let argv = [
        "mount",
        "-t",
        "nfs",
        "-o",
        "vers=3,proto=tcp,port=2049,hard,sync,noac,lookupcache=none,rsize=1048576,wsize=1048576,noacl,nolock",
        &m.nfs_target,
        &m.path,
    ]
    .iter()
    .map(|s| arg(s))
    .collect::<Result<Vec<_>, _>>()?;
    let path = std::env::var("PATH").ok();
    let cmd = launch::Command {
        argv,
        envp: std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                std::ffi::CString::new(kv).ok()
            })
            .collect(),
        exec: launch::ExecTarget::lookup("mount", path.as_deref())
            .unwrap_or(launch::ExecTarget::NotFound),
        cwd: None,
        creds: None,
        session: launch::Session::NewGroup,
        stdio: [
            launch::Stdio::Null,
            launch::Stdio::Null,
            launch::Stdio::Null,
        ],
        cgroup_procs: Vec::new(),
        cgroup_at_clone: None,
        oom_score_adj: None,
        nice: None,
        ioprio: None,
        rlimits: Vec::new(),
        shell_errors: None,
    };
    let launched = launch::launch(cmd)
        .await
        .map_err(|e| err(format!("cannot run mount: {e}")))?;
    let waiter = launched.waiter;
    match tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(err(format!("mount failed ({status})"))),
        Err(_) => Err(err("mount did not finish within 10 s".into())),
    }
}

#[cfg(test)]
mod tests;
