//! One kernel process and its five ZeroMQ channels (contract §7.2).
//!
//! Start: connection file with fresh ports and a random HMAC key, spawn the kernelspec
//! `argv` through `sys::launch` in its own process group, connect shell/control/stdin
//! (DEALER), iopub (SUB, everything) and heartbeat (REQ), then wait until the kernel is
//! ready: a `kernel_info_reply` **and** an iopub message parented to a
//! `kernel_info_request` (without the latter, early iopub output of the first execution
//! can be lost to PUB/SUB slow joining).
//!
//! Every received message (iopub drained continuously, since PUB drops what a slow
//! subscriber does not take) goes into one unbounded queue, followed by the process
//! exit once the reaper reports it.

use std::collections::{HashSet, VecDeque};
use std::ffi::CString;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use zeromq::util::PeerIdentity;
use zeromq::{
    DealerSendHalf, DealerSocket, ReqSocket, Socket, SocketOptions, SocketRecv, SocketSend,
    SubSocket, ZmqMessage,
};

use super::KernelError;
use super::exec::Tracker;
use super::spec::{InterruptMode, KernelSpec};
use super::wire::{Message, Signer};
use crate::sys::launch;

/// Longest time a kernel may take from spawn to ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(45);
/// How long after a `kernel_info_reply` its iopub status may take before the request
/// is repeated (the first status can be lost to PUB/SUB slow joining).
const IOPUB_GRACE: Duration = Duration::from_millis(30);
/// Grace period after `shutdown_request` before signals.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// Grace period after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Lines of kernel stderr kept for error messages.
const STDERR_TAIL: usize = 40;

/// The last lines a kernel wrote to stderr, and how many it wrote in all.
#[derive(Default)]
struct StderrTail {
    lines: VecDeque<String>,
    total: u64,
}

/// The channel a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Shell,
    Control,
    Iopub,
    Stdin,
}

/// Something that happened to a kernel.
#[derive(Debug)]
pub enum Event {
    Msg(Channel, Box<Message>),
    /// The heartbeat stopped answering (`false`) or answers again (`true`).
    Heartbeat(bool),
    /// The kernel process exited.
    Exited(ExitStatus),
}

/// Describes an exit status for logs and error messages.
pub fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("signal {sig}"),
            Err(_) => format!("signal {s}"),
        },
        _ => "unknown status".to_string(),
    }
}

/// A running kernel.
pub struct Kernel {
    pub spec: KernelSpec,
    /// Process id, also the process group id.
    pub pid: i32,
    session: String,
    signer: Signer,
    shell: DealerSendHalf,
    control: DealerSendHalf,
    events: mpsc::UnboundedReceiver<Event>,
    exit: watch::Receiver<Option<ExitStatus>>,
    exited: Option<ExitStatus>,
    conn_file: PathBuf,
    tasks: Vec<JoinHandle<()>>,
    channel_tasks: Vec<JoinHandle<()>>,
    stderr_tail: Arc<Mutex<StderrTail>>,
    label: String,
    /// `implementation` from `kernel_info_reply` (e.g. `ipython`, `deno`).
    implementation: String,
    /// The kernel's cgroup leaf, removed once the kernel is gone.
    leaf: Option<Arc<crate::sys::cgroup::Leaf>>,
    /// The kernel's own listeners (its channels, ipykernel's IOPub pipe) stay out of
    /// port forwarding while it lives.
    sockets: crate::portfwd::KernelSockets,
    /// Where the channels listen (IPC socket files are removed with the kernel).
    ports: Ports,
}

/// How the kernel's channels are reached (D70).
#[derive(Debug, Clone)]
enum Transport {
    /// Loopback TCP ports picked free by guestd.
    Tcp,
    /// Unix sockets `<base>-<port>` in guestd's private runtime directory: no ports,
    /// nothing another user (or the network) can connect to.
    Ipc(PathBuf),
}

/// The five channels' "ports" (for IPC, the suffixes of the socket paths).
#[derive(Debug, Clone)]
struct Ports {
    shell: u16,
    iopub: u16,
    stdin: u16,
    control: u16,
    hb: u16,
    transport: Transport,
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL), less room for
/// the `-<n>` suffix.
const MAX_IPC_BASE: usize = 100;

impl Ports {
    fn tcp() -> std::io::Result<Ports> {
        // Bind all five at once so they are distinct, then release them for the kernel.
        let ls: Vec<TcpListener> = (0..5)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let p: Vec<u16> = ls
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        Ok(Ports {
            shell: p[0],
            iopub: p[1],
            stdin: p[2],
            control: p[3],
            hb: p[4],
            transport: Transport::Tcp,
        })
    }

    /// IPC sockets under `base`, or `None` when the path would be too long.
    fn ipc(base: PathBuf) -> Option<Ports> {
        (base.as_os_str().len() <= MAX_IPC_BASE).then_some(Ports {
            shell: 1,
            iopub: 2,
            stdin: 3,
            control: 4,
            hb: 5,
            transport: Transport::Ipc(base),
        })
    }

    fn all(&self) -> [u16; 5] {
        [self.shell, self.iopub, self.stdin, self.control, self.hb]
    }

    fn ipc_path(base: &Path, port: u16) -> PathBuf {
        let mut p = base.as_os_str().to_owned();
        p.push(format!("-{port}"));
        PathBuf::from(p)
    }

    fn endpoint(&self, port: u16) -> String {
        match &self.transport {
            Transport::Tcp => format!("tcp://127.0.0.1:{port}"),
            Transport::Ipc(base) => format!("ipc://{}", Self::ipc_path(base, port).display()),
        }
    }

    /// Whether the kernel listens on `port` yet. zeromq's own connect retries back off
    /// exponentially (50, 100, 200, 400 ms…), which made a kernel that binds after
    /// 0.4 s wait until 0.75 s; probing every few milliseconds first does not.
    async fn bound(&self, port: u16) -> bool {
        match &self.transport {
            // A probe connection the kernel sees close before any greeting (ZeroMQ
            // ignores those).
            Transport::Tcp => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok(),
            Transport::Ipc(base) => tokio::net::UnixStream::connect(Self::ipc_path(base, port))
                .await
                .is_ok(),
        }
    }

    /// Removes IPC socket files a kernel that was killed left behind.
    fn cleanup(&self) {
        if let Transport::Ipc(base) = &self.transport {
            for port in self.all() {
                let _ = std::fs::remove_file(Self::ipc_path(base, port));
            }
        }
    }
}

/// `GUESTD_KERNEL_TRANSPORT=tcp` keeps every kernel on loopback TCP (to compare, or
/// should a kernel misbehave over IPC); by default kernels that speak IPC use it.
fn ipc_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        !std::env::var("GUESTD_KERNEL_TRANSPORT").is_ok_and(|v| v.eq_ignore_ascii_case("tcp"))
    })
}

/// Kernels a dead guestd left behind: their connection files (and IPC sockets) in the
/// runtime directory carry that guestd's pid. A guestd that was SIGKILLed or crashed
/// leaves its kernels running, unreachable (their keys were in its memory) and holding
/// memory; each new guestd SIGKILLs the process groups of kernels whose guestd is gone
/// and removes their files. Files of a live guestd (another instance sharing the
/// directory) are left alone. Returns how many kernel processes were killed.
pub fn reap_stale_kernels() -> usize {
    let Ok(dir) = runtime_dir() else { return 0 };
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let alive = |pid: u32| pid == me || Path::new(&format!("/proc/{pid}")).exists();
    let mut stale_files = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix("kernel-")
            .or_else(|| name.strip_prefix("k-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && !alive(pid)
        {
            stale_files.push(e.path());
        }
    }
    if stale_files.is_empty() {
        return 0;
    }
    // Kernels are started with their connection file's path on the command line.
    let conn_files: Vec<String> = stale_files
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut killed = 0;
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for e in procs.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let stale = cmdline
                .split(|b| *b == 0)
                .any(|arg| conn_files.iter().any(|f| arg == f.as_bytes()));
            if stale {
                // The kernel leads its own process group (D5): its children go too.
                let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)));
                let target = match pgid {
                    Ok(g) if g.as_raw() == pid => nix::unistd::Pid::from_raw(-pid),
                    _ => nix::unistd::Pid::from_raw(pid),
                };
                if nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
        }
    }
    for f in &stale_files {
        let _ = std::fs::remove_file(f);
    }
    tracing::warn!(
        kernels = killed,
        files = stale_files.len(),
        "killed kernels a previous guestd left running"
    );
    killed
}

/// Directory for connection files and IPC sockets (private to guestd: mode 0700).
fn runtime_dir() -> std::io::Result<PathBuf> {
    let candidates = [
        PathBuf::from("/run/guestd/kernels"),
        std::env::temp_dir().join(format!("guestd-kernels-{}", nix::unistd::getuid())),
    ];
    let mut last = None;
    for dir in candidates {
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
        {
            Ok(()) => {
                let meta = std::fs::metadata(&dir)?;
                use std::os::unix::fs::MetadataExt;
                if meta.uid() != nix::unistd::getuid().as_raw() {
                    last = Some(std::io::Error::other(format!(
                        "{} is owned by another user",
                        dir.display()
                    )));
                    continue;
                }
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no runtime directory")))
}

fn write_connection_file(path: &Path, ports: &Ports, key: &str, spec: &str) -> std::io::Result<()> {
    let (transport, ip) = match &ports.transport {
        Transport::Tcp => ("tcp", "127.0.0.1".to_string()),
        Transport::Ipc(base) => ("ipc", base.to_string_lossy().into_owned()),
    };
    let body = json!({
        "ip": ip,
        "transport": transport,
        "shell_port": ports.shell,
        "iopub_port": ports.iopub,
        "stdin_port": ports.stdin,
        "control_port": ports.control,
        "hb_port": ports.hb,
        "key": key,
        "signature_scheme": "hmac-sha256",
        "kernel_name": spec,
    });
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(body.to_string().as_bytes())?;
    f.sync_all()
}

fn socket_options(identity: Option<&PeerIdentity>) -> SocketOptions {
    let mut o = SocketOptions::default();
    o.connect_timeout(READY_TIMEOUT);
    if let Some(id) = identity {
        o.peer_identity(id.clone());
    }
    o
}

/// Everything needed to start a kernel.
pub struct StartParams<'a> {
    pub spec: &'a KernelSpec,
    /// Used in file names and logs (the context id).
    pub label: &'a str,
    pub cwd: &'a Path,
    /// Extra process environment (the global env), below the kernelspec's `env`.
    pub env: &'a [(String, String)],
    /// The user cgroup; the kernel gets its own leaf in it.
    pub cgroups: Option<&'a crate::sys::cgroup::Cgroups>,
}

impl Kernel {
    /// Spawns the kernel and waits until it is ready.
    pub async fn start(p: StartParams<'_>) -> Result<Kernel, KernelError> {
        let fail = |detail: String| KernelError::Start(detail);
        match std::fs::metadata(p.cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(KernelError::Cwd(
                    p.cwd.display().to_string(),
                    "not a directory".into(),
                ));
            }
            Err(e) => return Err(KernelError::Cwd(p.cwd.display().to_string(), e.to_string())),
        }
        let key = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let dir = runtime_dir().map_err(|e| KernelError::start_io("no runtime directory", &e))?;
        let file_id = uuid::Uuid::new_v4().simple().to_string();
        // guestd's pid leads both names: a later guestd finds what a dead one left
        // (reap_stale_kernels).
        let me = std::process::id();
        let conn_file = dir.join(format!("kernel-{me}-{}-{file_id}.json", p.label));
        let ipc = (p.spec.speaks_ipc() && ipc_allowed())
            .then(|| Ports::ipc(dir.join(format!("k-{me}-{}", &file_id[..16]))))
            .flatten();
        let ports = match ipc {
            Some(p) => p,
            None => Ports::tcp().map_err(|e| KernelError::start_io("cannot allocate ports", &e))?,
        };
        write_connection_file(&conn_file, &ports, &key, &p.spec.name)
            .map_err(|e| KernelError::start_io("cannot write connection file", &e))?;
        // From here on, the file is removed by Kernel's drop (or below on early failure).
        let argv = p.spec.command_line(&conn_file);
        // Kernels run user code: like user commands they join their own leaf of the user
        // cgroup (its pids and memory limits) and the OOM killer should prefer them to
        // the agent (contract 6.2).
        let leaf = p.cgroups.and_then(|c| match c.create_leaf() {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                tracing::warn!(error = %e, "kernel runs without its own cgroup");
                None
            }
        });
        let spawned = Instant::now();
        let launched = match kernel_command(&p, &argv, leaf.as_deref()) {
            Ok((cmd, out_r, err_r)) => match launch::launch(cmd).await {
                Ok(l) => Ok((l, out_r, err_r)),
                Err(launch::LaunchError::Failed { stage, source }) => Err(KernelError::start_io(
                    &format!("cannot run {} ({stage})", argv[0]),
                    &source,
                )),
                Err(e) => Err(KernelError::Start(format!("cannot run {}: {e}", argv[0]))),
            },
            Err(e) => Err(KernelError::Start(format!("cannot run {}: {e}", argv[0]))),
        };
        let (launched, out_r, err_r) = match launched {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&conn_file);
                if let Some(l) = &leaf {
                    l.remove();
                }
                return Err(e);
            }
        };
        let waiter = launched.waiter;
        let pid = waiter.pid();
        // Before the kernel can listen on anything: its sockets are not the user's.
        let own_sockets = crate::portfwd::register_kernel(pid);
        tracing::info!(context = p.label, kernel = %p.spec.name, pid, "kernel process started");

        let (ev_tx, events) = mpsc::unbounded_channel();
        let (exit_tx, exit) = watch::channel(None);
        let mut tasks = Vec::new();
        let stderr_tail = Arc::new(Mutex::new(StderrTail::default()));
        let label = p.label.to_string();
        tasks.push(spawn_log_reader(out_r, label.clone(), None));
        tasks.push(spawn_log_reader(
            err_r,
            label.clone(),
            Some(stderr_tail.clone()),
        ));
        {
            let ev_tx = ev_tx.clone();
            let label = label.clone();
            tasks.push(tokio::spawn(async move {
                let status = waiter.await;
                tracing::info!(context = %label, pid, status = %describe_exit(&status), "kernel process exited");
                let _ = exit_tx.send(Some(status));
                let _ = ev_tx.send(Event::Exited(status));
            }));
        }

        let session = uuid::Uuid::new_v4().to_string();
        let signer = Signer::new(key.as_bytes());
        let mut kernel_partial = PartialKernel {
            pid,
            tasks,
            conn_file: Some(conn_file),
            leaf,
            ports: Some(ports.clone()),
        };
        let identity = PeerIdentity::try_from(Bytes::from(session.clone().into_bytes()))
            .map_err(|e| fail(format!("bad identity: {e}")))?;

        let connect = async {
            let mut shell = DealerSocket::with_options(socket_options(Some(&identity)));
            let mut control = DealerSocket::with_options(socket_options(None));
            let mut stdin = DealerSocket::with_options(socket_options(Some(&identity)));
            let mut iopub = SubSocket::with_options(socket_options(None));
            let (a, b, c, d) = tokio::join!(
                connect_when_bound(&mut shell, &ports, ports.shell),
                connect_when_bound(&mut control, &ports, ports.control),
                connect_when_bound(&mut stdin, &ports, ports.stdin),
                connect_when_bound(&mut iopub, &ports, ports.iopub),
            );
            a.and(b).and(c).and(d)?;
            iopub.subscribe("").await?;
            Ok::<_, zeromq::ZmqError>((shell, control, stdin, iopub))
        };
        let mut exit_rx = exit.clone();
        let sockets = tokio::select! {
            r = timeout(READY_TIMEOUT, connect) => match r {
                Ok(Ok(s)) => s,
                Ok(Err(zeromq::ZmqError::Network(e))) => {
                    kernel_partial.kill();
                    return Err(KernelError::start_io("cannot connect to the kernel", &e));
                }
                Ok(Err(e)) => {
                    kernel_partial.kill();
                    return Err(fail(format!("cannot connect to the kernel: {e}")));
                }
                Err(_) => {
                    kernel_partial.kill();
                    return Err(fail("timed out connecting to the kernel".into()));
                }
            },
            status = async { exit_rx.wait_for(Option::is_some).await.ok().and_then(|s| *s) } => {
                kernel_partial.kill();
                return Err(fail(exit_detail(status.as_ref(), &stderr_tail)));
            }
        };
        let (shell, control, stdin, iopub) = sockets;
        let (shell_tx, shell_rx) = shell.split();
        let (control_tx, control_rx) = control.split();
        let (_stdin_tx, stdin_rx) = stdin.split();
        // The socket readers and the heartbeat: stopped first at shutdown, so that no
        // socket tries to reconnect to a kernel that is going away.
        // Over IPC the directory's permissions authenticate the kernel (D70).
        let trusted = matches!(ports.transport, Transport::Ipc(_));
        let channel_tasks = vec![
            spawn_reader(
                shell_rx,
                Channel::Shell,
                signer.clone(),
                trusted,
                ev_tx.clone(),
                label.clone(),
            ),
            spawn_reader(
                control_rx,
                Channel::Control,
                signer.clone(),
                trusted,
                ev_tx.clone(),
                label.clone(),
            ),
            spawn_reader(
                stdin_rx,
                Channel::Stdin,
                signer.clone(),
                trusted,
                ev_tx.clone(),
                label.clone(),
            ),
            spawn_reader(
                iopub,
                Channel::Iopub,
                signer.clone(),
                trusted,
                ev_tx.clone(),
                label.clone(),
            ),
            spawn_heartbeat(ports.endpoint(ports.hb), ev_tx.clone(), label.clone()),
        ];
        drop(ev_tx);

        let mut kernel = Kernel {
            spec: p.spec.clone(),
            pid,
            session,
            signer,
            shell: shell_tx,
            control: control_tx,
            events,
            exit,
            exited: None,
            conn_file: kernel_partial.conn_file.take().unwrap_or_default(),
            tasks: std::mem::take(&mut kernel_partial.tasks),
            channel_tasks,
            stderr_tail,
            label,
            implementation: String::new(),
            leaf: kernel_partial.leaf.take(),
            sockets: own_sockets,
            ports: kernel_partial.ports.take().unwrap_or(ports),
        };
        kernel_partial.disarm();
        kernel.wait_ready().await?;
        tracing::info!(
            context = %kernel.label,
            pid,
            implementation = %kernel.implementation,
            elapsed_ms = spawned.elapsed().as_millis() as u64,
            "kernel answered kernel_info"
        );
        // From here on the kernel runs user code: what it listens on next is the user's.
        let held = kernel.sockets.ready();
        tracing::debug!(context = %kernel.label, sockets = held, "kernel's own sockets kept from port forwarding");
        Ok(kernel)
    }

    /// Repeats `kernel_info_request` until the reply and an iopub message parented to
    /// one of them both arrived.
    async fn wait_ready(&mut self) -> Result<(), KernelError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut sent: HashSet<String> = HashSet::new();
        let mut got_reply_at: Option<Instant> = None;
        let mut got_iopub = false;
        let mut interval = Duration::from_millis(250);
        while Instant::now() < deadline {
            let req = Message::new("kernel_info_request", &self.session, json!({}));
            sent.insert(req.msg_id().to_string());
            self.send_shell(&req).await?;
            let mut round_end = (Instant::now() + interval).min(deadline);
            interval = (interval * 2).min(Duration::from_secs(2));
            loop {
                let ev = tokio::select! {
                    ev = self.next_event() => ev,
                    _ = tokio::time::sleep_until(round_end) => break,
                };
                match ev {
                    Event::Msg(Channel::Shell, m)
                        if m.msg_type() == "kernel_info_reply"
                            && m.parent_id().is_some_and(|p| sent.contains(p)) =>
                    {
                        got_reply_at.get_or_insert_with(Instant::now);
                        // The kernel answers; its iopub status follows within
                        // milliseconds unless our subscription reached it too late
                        // (PUB/SUB slow joining): then ask again soon.
                        round_end = round_end.min(Instant::now() + IOPUB_GRACE);
                        if let Some(i) = m.content_str("implementation") {
                            tracing::debug!(context = %self.label, implementation = i, "kernel_info_reply");
                            self.implementation = i.to_string();
                        }
                    }
                    Event::Msg(Channel::Iopub, m)
                        if m.parent_type() == Some("kernel_info_request")
                            || m.parent_id().is_some_and(|p| sent.contains(p)) =>
                    {
                        got_iopub = true;
                    }
                    Event::Exited(status) => {
                        return Err(KernelError::Start(exit_detail(
                            Some(&status),
                            &self.stderr_tail,
                        )));
                    }
                    _ => {}
                }
                if got_reply_at.is_some() && got_iopub {
                    tracing::debug!(context = %self.label, "kernel ready");
                    return Ok(());
                }
            }
            // A kernel that answers but never publishes status for kernel_info is
            // accepted after a while rather than failing the context.
            if let Some(t) = got_reply_at
                && t.elapsed() > Duration::from_secs(10)
            {
                tracing::warn!(context = %self.label, "kernel publishes no iopub status for kernel_info; assuming ready");
                return Ok(());
            }
        }
        Err(KernelError::Start(format!(
            "kernel did not become ready within {} s",
            READY_TIMEOUT.as_secs()
        )))
    }

    /// The next event; after the process exited and every message was taken, keeps
    /// returning `Exited`.
    pub async fn next_event(&mut self) -> Event {
        if let Some(status) = self.exited {
            return Event::Exited(status);
        }
        match self.events.recv().await {
            Some(Event::Exited(s)) => {
                self.exited = Some(s);
                Event::Exited(s)
            }
            Some(ev) => ev,
            None => {
                // Every task ended without reporting an exit (cannot happen while the
                // exit task runs); wait for the watch instead.
                let status = match self.exit.wait_for(Option::is_some).await {
                    Ok(s) => s.unwrap_or_else(|| ExitStatus::from_raw(libc::SIGKILL)),
                    Err(_) => ExitStatus::from_raw(libc::SIGKILL),
                };
                self.exited = Some(status);
                Event::Exited(status)
            }
        }
    }

    /// The exit status once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exited.or(*self.exit.borrow())
    }

    /// How long to keep listening after an execution completed, for output the kernel
    /// publishes after its `idle` status. Deno's kernel publishes stream output and
    /// results from separate tasks, so they can trail `idle`/`execute_reply` by a hair
    /// (the protocol says output precedes `idle`; every other kernel keeps to that).
    pub fn output_linger(&self) -> Duration {
        if self.is_deno() {
            Duration::from_millis(100)
        } else {
            Duration::ZERO
        }
    }

    pub fn stderr_tail(&self) -> String {
        tail_text(&self.stderr_tail)
    }

    /// A mark for [`Kernel::stderr_since`]: the number of stderr lines so far.
    pub fn stderr_mark(&self) -> u64 {
        self.stderr_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
    }

    /// The stderr lines written after `mark` (at most the retained tail).
    pub fn stderr_since(&self, mark: u64) -> Vec<String> {
        let t = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        let n = usize::try_from(t.total.saturating_sub(mark)).unwrap_or(usize::MAX);
        let skip = t.lines.len().saturating_sub(n);
        t.lines.iter().skip(skip).cloned().collect()
    }

    /// Whether this is Deno's kernel (see [`Kernel::output_linger`] and `kernel::js`).
    pub fn is_deno(&self) -> bool {
        self.implementation.to_ascii_lowercase().starts_with("deno")
    }

    async fn send(
        sock: &mut DealerSendHalf,
        signer: &Signer,
        msg: &Message,
    ) -> Result<(), KernelError> {
        let frames = signer.encode(msg);
        let zmsg = ZmqMessage::try_from(frames)
            .map_err(|e| KernelError::Channel(format!("empty message: {e:?}")))?;
        match timeout(Duration::from_secs(10), sock.send(zmsg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(KernelError::Channel(format!("send failed: {e}"))),
            Err(_) => Err(KernelError::Channel("send timed out".into())),
        }
    }

    pub async fn send_shell(&mut self, msg: &Message) -> Result<(), KernelError> {
        Self::send(&mut self.shell, &self.signer, msg).await
    }

    pub async fn send_control(&mut self, msg: &Message) -> Result<(), KernelError> {
        Self::send(&mut self.control, &self.signer, msg).await
    }

    /// Sends an `execute_request` and returns its tracker.
    pub async fn execute(&mut self, code: &str, silent: bool) -> Result<Tracker, KernelError> {
        let msg = Message::new(
            "execute_request",
            &self.session,
            json!({
                "code": code,
                "silent": silent,
                "store_history": !silent,
                "user_expressions": {},
                "allow_stdin": false,
                "stop_on_error": !silent,
            }),
        );
        self.send_shell(&msg).await?;
        Ok(Tracker::new(msg.msg_id()))
    }

    /// Interrupts the running execution (SIGINT to the group, or `interrupt_request`).
    pub async fn interrupt(&mut self) -> Result<(), KernelError> {
        tracing::info!(context = %self.label, pid = self.pid, "interrupting kernel");
        match self.spec.interrupt_mode {
            InterruptMode::Signal => {
                signal_group(self.pid, Signal::SIGINT);
                Ok(())
            }
            InterruptMode::Message => {
                let msg = Message::new("interrupt_request", &self.session, json!({}));
                self.send_control(&msg).await
            }
        }
    }

    /// Polite shutdown, then SIGTERM and SIGKILL to the process group.
    pub async fn shutdown(mut self) {
        for t in &self.channel_tasks {
            t.abort();
        }
        if self.exit_status().is_none() {
            let msg = Message::new("shutdown_request", &self.session, json!({"restart": false}));
            if let Err(e) = self.send_control(&msg).await {
                tracing::debug!(context = %self.label, error = %e, "shutdown_request not sent");
            }
            if !self.wait_exit(SHUTDOWN_GRACE).await {
                signal_group(self.pid, Signal::SIGTERM);
                if !self.wait_exit(TERM_GRACE).await {
                    signal_group(self.pid, Signal::SIGKILL);
                    self.wait_exit(TERM_GRACE).await;
                }
            }
        }
        // Leftover children of the kernel (shell commands, helpers) share its group.
        signal_group(self.pid, Signal::SIGKILL);
        tracing::info!(context = %self.label, pid = self.pid, "kernel shut down");
    }

    async fn wait_exit(&mut self, within: Duration) -> bool {
        let mut rx = self.exit.clone();
        timeout(within, rx.wait_for(Option::is_some)).await.is_ok()
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            signal_group(self.pid, Signal::SIGKILL);
        }
        // Aborting the exit watcher is harmless: the reaper still reaps the process
        // and discards the status nobody waits for any more.
        for t in self.tasks.iter().chain(&self.channel_tasks) {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.conn_file);
        self.ports.cleanup();
        if let Some(leaf) = self.leaf.take() {
            leaf.remove_when_empty();
        }
    }
}

/// Cleans up a kernel whose start failed before `Kernel` existed.
struct PartialKernel {
    pid: i32,
    tasks: Vec<JoinHandle<()>>,
    conn_file: Option<PathBuf>,
    leaf: Option<Arc<crate::sys::cgroup::Leaf>>,
    ports: Option<Ports>,
}

impl PartialKernel {
    fn kill(&mut self) {
        signal_group(self.pid, Signal::SIGKILL);
    }
    fn disarm(&mut self) {
        self.tasks.clear();
        self.conn_file = None;
        self.pid = 0;
    }
}

impl Drop for PartialKernel {
    fn drop(&mut self) {
        if self.pid > 0 {
            signal_group(self.pid, Signal::SIGKILL);
        }
        for t in &self.tasks {
            t.abort();
        }
        if let Some(f) = &self.conn_file {
            let _ = std::fs::remove_file(f);
        }
        if let Some(p) = &self.ports {
            p.cleanup();
        }
        if let Some(leaf) = self.leaf.take() {
            leaf.remove_when_empty();
        }
    }
}

fn signal_group(pgid: i32, sig: Signal) {
    if pgid <= 1 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(pgid), sig)
        && e != nix::errno::Errno::ESRCH
    {
        tracing::warn!(pgid, ?sig, error = %e, "cannot signal kernel process group");
    }
}

fn tail_text(tail: &Mutex<StderrTail>) -> String {
    let t = tail.lock().unwrap_or_else(|p| p.into_inner());
    t.lines.iter().cloned().collect::<Vec<_>>().join("\n")
}

fn exit_detail(status: Option<&ExitStatus>, tail: &Mutex<StderrTail>) -> String {
    let how = status
        .map(describe_exit)
        .unwrap_or_else(|| "unknown status".into());
    let t = tail_text(tail);
    if t.is_empty() {
        format!("kernel exited during startup ({how})")
    } else {
        format!("kernel exited during startup ({how}): {t}")
    }
}

fn spawn_log_reader(
    pipe: OwnedFd,
    label: String,
    tail: Option<Arc<Mutex<StderrTail>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let reader = match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(context = %label, error = %e, "cannot read kernel output");
                return;
            }
        };
        let mut lines = tokio::io::BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(context = %label, "kernel: {line}");
            if let Some(t) = &tail {
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                if t.lines.len() == STDERR_TAIL {
                    t.lines.pop_front();
                }
                t.lines.push_back(line);
                t.total += 1;
            }
        }
    })
}

/// The launch of a kernel: the kernelspec's argv with guestd's environment, the global
/// env and the kernelspec's `env` on top, in its own process group and cgroup leaf,
/// stdout and stderr to pipes guestd logs. Returns the command and the pipes' read ends.
fn kernel_command(
    p: &StartParams<'_>,
    argv: &[String],
    leaf: Option<&crate::sys::cgroup::Leaf>,
) -> Result<(launch::Command, OwnedFd, OwnedFd), String> {
    let mut env: std::collections::BTreeMap<std::ffi::OsString, std::ffi::OsString> =
        std::env::vars_os().collect();
    if !env.contains_key(std::ffi::OsStr::new("LANG"))
        && !env.contains_key(std::ffi::OsStr::new("LC_ALL"))
    {
        env.insert("LANG".into(), "C.UTF-8".into());
    }
    for (k, v) in p.env {
        env.insert(k.into(), v.into());
    }
    // `${NAME}` in the kernelspec's env expands from what the kernel would get
    // otherwise (guestd's environment under the global variables), as in Jupyter.
    let expanded: Vec<(String, String)> = {
        let inherited = |k: &str| {
            env.get(std::ffi::OsStr::new(k))
                .map(|v| v.to_string_lossy().into_owned())
        };
        p.spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), super::spec::expand_env_value(v, &inherited)))
            .collect()
    };
    for (k, v) in expanded {
        env.insert(k.into(), v.into());
    }
    let cstr = |b: Vec<u8>| {
        CString::new(b).map_err(|_| "a NUL byte in the kernel's argv or env".to_string())
    };
    let envp = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstr(kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let argv_c = argv
        .iter()
        .map(|a| cstr(a.clone().into_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let first = argv.first().ok_or("the kernelspec's argv is empty")?;
    let path = env
        .get(std::ffi::OsStr::new("PATH"))
        .and_then(|p| p.to_str())
        .map(str::to_owned);
    let exec = launch::ExecTarget::lookup(first, path.as_deref())
        .ok_or("a NUL byte in the kernel's program name")?;
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let cmd = launch::Command {
        argv: argv_c,
        envp,
        exec,
        cwd: Some(cstr(p.cwd.as_os_str().as_bytes().to_vec())?),
        creds: None,
        session: launch::Session::NewGroup,
        stdio: [
            launch::Stdio::Null,
            launch::Stdio::Fd(out_w),
            launch::Stdio::Fd(err_w),
        ],
        cgroup_procs: leaf.map(|l| l.procs_files().to_vec()).unwrap_or_default(),
        cgroup_at_clone: leaf.and_then(|l| l.v2_dir()),
        oom_score_adj: Some(100),
        nice: Some(0),
        ioprio: Some((launch::IOPRIO_CLASS_BE, 4)),
        rlimits: Vec::new(),
        shell_errors: None,
    };
    Ok((cmd, out_r, err_r))
}

/// Connects `sock` to the kernel's `port` once the kernel listens there.
async fn connect_when_bound<S: Socket>(
    sock: &mut S,
    ports: &Ports,
    port: u16,
) -> Result<(), zeromq::ZmqError> {
    while !ports.bound(port).await {
        sleep(Duration::from_millis(5)).await;
    }
    sock.connect(&ports.endpoint(port)).await
}

fn spawn_reader<S>(
    mut sock: S,
    channel: Channel,
    signer: Signer,
    trusted: bool,
    tx: mpsc::UnboundedSender<Event>,
    label: String,
) -> JoinHandle<()>
where
    S: SocketRecv + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match sock.recv().await {
                Ok(zmsg) => {
                    let frames = zmsg.into_vec();
                    let decoded = if trusted {
                        signer.decode_trusted(&frames)
                    } else {
                        signer.decode(&frames)
                    };
                    match decoded {
                        Ok(msg) => {
                            tracing::trace!(context = %label, ?channel, msg_type = msg.msg_type(), "kernel message");
                            if tx.send(Event::Msg(channel, Box::new(msg))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(context = %label, ?channel, error = %e, "dropping undecodable kernel message")
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(context = %label, ?channel, error = %e, "kernel channel closed");
                    return;
                }
            }
        }
    })
}

/// Pings the heartbeat channel every 3 s; reports a loss after 3 missed beats and the
/// recovery after that.
fn spawn_heartbeat(
    endpoint: String,
    tx: mpsc::UnboundedSender<Event>,
    label: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut misses = 0u32;
        let mut lost = false;
        let mut sock: Option<ReqSocket> = None;
        loop {
            sleep(Duration::from_secs(3)).await;
            if sock.is_none() {
                let mut s = ReqSocket::with_options(socket_options(None));
                match timeout(Duration::from_secs(3), s.connect(&endpoint)).await {
                    Ok(Ok(())) => sock = Some(s),
                    _ => {
                        misses += 1;
                    }
                }
            }
            if let Some(s) = sock.as_mut() {
                let beat = async {
                    s.send(ZmqMessage::from("ping")).await?;
                    s.recv().await
                };
                match timeout(Duration::from_secs(3), beat).await {
                    Ok(Ok(_)) => misses = 0,
                    _ => {
                        misses += 1;
                        // A REQ socket that missed its reply cannot send again.
                        sock = None;
                    }
                }
            }
            if misses >= 3 && !lost {
                lost = true;
                tracing::warn!(context = %label, "kernel heartbeat lost");
                if tx.send(Event::Heartbeat(false)).is_err() {
                    return;
                }
            } else if misses == 0 && lost {
                lost = false;
                tracing::info!(context = %label, "kernel heartbeat back");
                if tx.send(Event::Heartbeat(true)).is_err() {
                    return;
                }
            }
        }
    })
}
