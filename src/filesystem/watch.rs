//! Directory watches (contract §4.5): WatchDir (a stream) and the polling watchers of
//! CreateWatcher / GetWatcherEvents / RemoveWatcher ([`WatcherRegistry`]).
//!
//! Each watch owns one inotify instance and one OS thread that blocks in `poll(2)` on it
//! (and on a pipe whose write end the consumer holds: dropping the consumer closes it and
//! the thread ends). The thread maps inotify records to [`FsEvent`]s and hands them to its
//! consumer:
//! * a [`WatchStream`] gets them through a bounded channel; when its reader is slow the
//!   thread waits and the kernel queue absorbs the rest; if that overflows too, the stream
//!   ends with a [`FsError::QueueOverflow`];
//! * a polling watcher buffers at most [`RegistryConfig::queue_capacity`] events; past that it
//!   fails (every later GetWatcherEvents returns the error). Watchers nobody polls for
//!   [`RegistryConfig::idle_timeout`] are removed.
//!
//! Never silent: an inotify queue overflow, a read error, or the watch limit reached while
//! adding a new subdirectory end the watch with an error that says so.
//!
//! Details:
//! * recursive watches add newly created and moved-in subdirectories; entries found in a
//!   freshly *created* subdirectory when its watch is added get synthesized CREATE events
//!   (and WRITE for non-empty files): they were created in the race window between the
//!   mkdir and the watch (duplicates of real events are possible, losses are not);
//! * events for the temporary files of uploads ([`super::upload::is_temp_name`]) are hidden;
//! * the recursive walk does not descend into pseudo filesystems (proc, sysfs, cgroup,
//!   debugfs, tracefs, …) mounted below the watched directory, nor follows symlinks;
//! * events on a watched subdirectory itself are reported once, through its parent
//!   (`sub` CHMOD/REMOVE/RENAME), not twice.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::sync::mpsc;

use crate::sys::users::UserDb;

use super::entry::{self, EntryInfo};
use super::error::FsError;
use super::random_token;
use super::upload::is_temp_name;

/// Filesystem event types (`EventType` of the proto, minus UNSPECIFIED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

/// One event, `name` relative to the watched directory (`.` for the directory itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEvent {
    pub name: String,
    pub event_type: EventType,
    /// With `include_entry`, for CREATE, WRITE and CHMOD when the entry can still be stat-ed.
    pub entry: Option<EntryInfo>,
}

/// The request flags of WatchDir / CreateWatcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchOptions {
    pub recursive: bool,
    pub include_entry: bool,
    pub allow_network_mounts: bool,
}

const PROC_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";
const PROC_INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";
const PROC_QUEUED: &str = "/proc/sys/fs/inotify/max_queued_events";

/// What the agent raises the inotify limits to at startup (contract §7 "Watch limits").
pub const MIN_USER_WATCHES: u64 = 65_536;
pub const MIN_USER_INSTANCES: u64 = 1_024;

/// Events buffered between a WatchDir thread and its stream.
const STREAM_CHANNEL: usize = 1_024;

/// Statfs magics of network filesystems (contract §4.5).
const NETWORK_FS_MAGICS: [u32; 5] = [
    0x6969,      // NFS
    0xFF53_4D42, // CIFS
    0x517B,      // SMB
    0xFE53_4D42, // SMB2
    0x6573_5546, // FUSE
];

/// Pseudo filesystems a recursive watch does not descend into.
const PSEUDO_FS_MAGICS: [u32; 10] = [
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x0027_e0eb, // cgroup
    0x6367_7270, // cgroup2
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x7363_6673, // securityfs
    0xcafe_4a11, // bpf
    0x1cd1,      // devpts
    0x4249_4e4d, // binfmt_misc
];

/// True for the statfs magic of a filesystem whose changes inotify cannot see.
pub fn is_network_fs_magic(magic: u32) -> bool {
    NETWORK_FS_MAGICS.contains(&magic)
}

fn fs_magic(path: &Path) -> Option<u32> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    #[allow(clippy::unnecessary_cast)]
    let raw = st.filesystem_type().0 as i64;
    // f_type is a signed long on glibc: keep the low 32 bits of the magic.
    Some((raw as u64 & 0xffff_ffff) as u32)
}

fn read_sysctl(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The inotify limits in force after [`raise_inotify_limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InotifyLimits {
    pub max_user_watches: Option<u64>,
    pub max_user_instances: Option<u64>,
}

/// Raises `fs.inotify.max_user_watches` to at least 65536 and `max_user_instances` to at
/// least 1024 (a recursive watch of a template's tree needs ~8–16k watches; the kernel
/// default is 8192). Logs what it did, or why it could not. Call once at startup.
pub fn raise_inotify_limits() -> InotifyLimits {
    InotifyLimits {
        max_user_watches: raise_sysctl(PROC_WATCHES, MIN_USER_WATCHES),
        max_user_instances: raise_sysctl(PROC_INSTANCES, MIN_USER_INSTANCES),
    }
}

fn raise_sysctl(path: &str, min: u64) -> Option<u64> {
    let Some(current) = read_sysctl(path) else {
        tracing::warn!(sysctl = path, "cannot read inotify limit");
        return None;
    };
    if current >= min {
        tracing::debug!(
            sysctl = path,
            value = current,
            "inotify limit is sufficient"
        );
        return Some(current);
    }
    match fs::write(path, min.to_string()) {
        Ok(()) => {
            tracing::info!(
                sysctl = path,
                from = current,
                to = min,
                "raised inotify limit"
            );
            Some(min)
        }
        Err(e) => {
            tracing::warn!(
                sysctl = path,
                value = current,
                wanted = min,
                error = %e,
                "cannot raise inotify limit; large recursive watches may fail"
            );
            Some(current)
        }
    }
}

/// Maps an `inotify_add_watch` failure on `path`.
fn add_watch_error(path: &Path, e: Errno) -> FsError {
    match e {
        Errno::ENOSPC => FsError::WatchLimit {
            path: path.to_path_buf(),
            limit: read_sysctl(PROC_WATCHES),
        },
        _ => FsError::io("cannot watch", path, e.into()),
    }
}

/// Maps an `inotify_init1` failure. EMFILE means either the per-user instance limit or
/// the agent's own descriptor limit: the latter is resource exhaustion with its errno.
fn init_error(path: &Path, e: Errno) -> FsError {
    match e {
        Errno::EMFILE if !out_of_descriptors() => FsError::InstanceLimit {
            path: path.to_path_buf(),
            limit: read_sysctl(PROC_INSTANCES),
        },
        _ => FsError::io("cannot create an inotify instance to watch", path, e.into()),
    }
}

/// True when this process cannot open one more descriptor (RLIMIT_NOFILE reached).
fn out_of_descriptors() -> bool {
    matches!(
        nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty()
        ),
        Err(Errno::EMFILE)
    )
}

fn overflow_error(root: &Path) -> FsError {
    let limit = read_sysctl(PROC_QUEUED)
        .map(|n| n.to_string())
        .unwrap_or_else(|| "unknown".into());
    FsError::QueueOverflow(format!(
        "the inotify event queue of the watch on {} overflowed (fs.inotify.max_queued_events = \
         {limit}); events were lost and the watch has stopped",
        root.display()
    ))
}

/// The event types of one inotify record, in the contract's order:
/// CREATE, RENAME, CHMOD, WRITE, REMOVE.
pub(crate) fn event_types(mask: AddWatchFlags) -> Vec<EventType> {
    let mut v = Vec::with_capacity(2);
    if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
        v.push(EventType::Create);
    }
    if mask.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVE_SELF) {
        v.push(EventType::Rename);
    }
    if mask.contains(AddWatchFlags::IN_ATTRIB) {
        v.push(EventType::Chmod);
    }
    if mask.contains(AddWatchFlags::IN_MODIFY) {
        v.push(EventType::Write);
    }
    if mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
        v.push(EventType::Remove);
    }
    v
}

fn watch_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_ONLYDIR
}

/// Where a consumer wants the watch to go after a delivery.
enum Flow {
    Continue,
    Stop,
}

/// The consumer side of a watch thread.
trait Sink: Send + 'static {
    fn deliver(&mut self, ev: FsEvent) -> Flow;
    fn fail(&mut self, e: FsError);
}

/// An armed inotify watch (validated, watches added), not yet running.
struct Armed {
    inotify: Inotify,
    root: PathBuf,
    opts: WatchOptions,
    /// wd → directory relative to the root ("" for the root).
    wds: HashMap<WatchDescriptor, PathBuf>,
    /// A directory seen leaving (IN_MOVED_FROM): cookie and relative path, until the next
    /// record tells whether it arrived elsewhere in the tree.
    pending_move: Option<(u32, PathBuf)>,
    users: Arc<dyn UserDb>,
}

/// Validates `path` and arms the watch (contract §4.5 "common validation").
fn arm(path: &Path, opts: WatchOptions, users: Arc<dyn UserDb>) -> Result<Armed, FsError> {
    super::ops::require_dir(path, || format!("path {} not found", path.display()))?;
    if !opts.allow_network_mounts && fs_magic(path).is_some_and(is_network_fs_magic) {
        return Err(FsError::NetworkMount {
            path: path.to_path_buf(),
        });
    }
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| init_error(path, e))?;
    // The root may be a symlink to a directory: followed.
    let wd = inotify
        .add_watch(path, watch_mask())
        .map_err(|e| add_watch_error(path, e))?;
    let mut armed = Armed {
        inotify,
        root: path.to_path_buf(),
        opts,
        wds: HashMap::from([(wd, PathBuf::new())]),
        pending_move: None,
        users,
    };
    if opts.recursive {
        let mut ignored = Vec::new();
        armed.add_children(path, Path::new(""), false, &mut ignored)?;
    }
    Ok(armed)
}

impl Armed {
    /// Adds watches for every directory below `abs` (relative path `rel`), not following
    /// symlinks. With `synthesize`, pushes CREATE events for what it finds.
    fn add_children(
        &mut self,
        abs: &Path,
        rel: &Path,
        synthesize: bool,
        out: &mut Vec<FsEvent>,
    ) -> Result<(), FsError> {
        let mut stack = vec![(abs.to_path_buf(), rel.to_path_buf())];
        while let Some((dir, dir_rel)) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            let parent_dev = fs::symlink_metadata(&dir).map(|m| m.dev()).ok();
            let mut children: Vec<_> = rd.filter_map(Result::ok).collect();
            children.sort_by_key(|e| e.file_name());
            for child in children {
                let name = child.file_name();
                if is_temp_name(name.as_bytes()) {
                    continue;
                }
                let child_abs = dir.join(&name);
                let child_rel = dir_rel.join(&name);
                let Ok(ft) = child.file_type() else { continue };
                if synthesize {
                    out.push(self.event(&child_rel, EventType::Create));
                    // Content written before the watch existed: report it as a WRITE too.
                    if ft.is_file() && child.metadata().is_ok_and(|m| m.len() > 0) {
                        out.push(self.event(&child_rel, EventType::Write));
                    }
                }
                if !ft.is_dir() {
                    continue;
                }
                if let (Some(pd), Ok(m)) = (parent_dev, fs::symlink_metadata(&child_abs))
                    && m.dev() != pd
                    && fs_magic(&child_abs).is_some_and(|mg| PSEUDO_FS_MAGICS.contains(&mg))
                {
                    continue;
                }
                match self
                    .inotify
                    .add_watch(&child_abs, watch_mask() | AddWatchFlags::IN_DONT_FOLLOW)
                {
                    Ok(wd) => {
                        self.wds.insert(wd, child_rel.clone());
                        stack.push((child_abs, child_rel));
                    }
                    // Vanished or replaced by a non-directory meanwhile.
                    Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
                    Err(Errno::ENOSPC) => return Err(add_watch_error(&child_abs, Errno::ENOSPC)),
                    Err(e) => {
                        tracing::debug!(path = %child_abs.display(), error = %e, "not watching subdirectory");
                    }
                }
            }
        }
        Ok(())
    }

    fn event(&self, rel: &Path, event_type: EventType) -> FsEvent {
        let name = if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.to_string_lossy().into_owned()
        };
        let entry = if self.opts.include_entry
            && matches!(
                event_type,
                EventType::Create | EventType::Write | EventType::Chmod
            ) {
            let abs = if rel.as_os_str().is_empty() {
                self.root.clone()
            } else {
                self.root.join(rel)
            };
            entry::entry_info(&abs, self.users.as_ref()).ok()
        } else {
            None
        };
        FsEvent {
            name,
            event_type,
            entry,
        }
    }

    /// Maps one inotify record to events (in `out`). Errors end the watch.
    fn process(&mut self, ev: &InotifyEvent, out: &mut Vec<FsEvent>) -> Result<(), FsError> {
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            return Err(overflow_error(&self.root));
        }
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            self.wds.remove(&ev.wd);
            return Ok(());
        }
        // A directory moved away by the previous record: if this record is its arrival
        // (same cookie), it moved within the tree and its watches are renamed below;
        // otherwise it left the tree and its watches go.
        let mut moved_from = None;
        if let Some((cookie, old)) = self.pending_move.take() {
            if ev.mask.contains(AddWatchFlags::IN_MOVED_TO) && ev.cookie == cookie {
                moved_from = Some(old);
            } else {
                self.forget_subtree(&old);
            }
        }
        let Some(dir_rel) = self.wds.get(&ev.wd).cloned() else {
            return Ok(());
        };
        let rel = match &ev.name {
            Some(name) => {
                if is_temp_name(name.as_bytes()) {
                    return Ok(());
                }
                dir_rel.join(name)
            }
            // An event on a watched directory itself: reported for the root only (a
            // subdirectory's own events arrive through its parent as well).
            None if dir_rel.as_os_str().is_empty() => dir_rel.clone(),
            None => return Ok(()),
        };
        for t in event_types(ev.mask) {
            out.push(self.event(&rel, t));
        }
        if self.opts.recursive && ev.mask.contains(AddWatchFlags::IN_ISDIR) && ev.name.is_some() {
            if ev.mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                self.pending_move = Some((ev.cookie, rel.clone()));
            }
            if let Some(old) = &moved_from {
                self.rename_subtree(old, &rel);
            }
            if ev
                .mask
                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            {
                self.add_subdir(&rel, ev.mask.contains(AddWatchFlags::IN_CREATE), out)?;
            }
        }
        Ok(())
    }

    /// A directory appeared at `rel`: watch it and everything below.
    fn add_subdir(
        &mut self,
        rel: &Path,
        created: bool,
        out: &mut Vec<FsEvent>,
    ) -> Result<(), FsError> {
        let abs = self.root.join(rel);
        match self
            .inotify
            .add_watch(&abs, watch_mask() | AddWatchFlags::IN_DONT_FOLLOW)
        {
            Ok(wd) => {
                self.wds.insert(wd, rel.to_path_buf());
            }
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return Ok(()),
            Err(e) => return Err(add_watch_error(&abs, e)),
        }
        self.add_children(&abs, rel, created, out)
    }

    /// A directory moved within the tree from `old` to `new`: its watches (and those below
    /// it) keep working under the new names, including events already queued.
    fn rename_subtree(&mut self, old: &Path, new: &Path) {
        for r in self.wds.values_mut() {
            if let Ok(rest) = r.strip_prefix(old) {
                *r = new.join(rest);
            }
        }
    }

    /// A directory left `rel` (moved out of the tree): stop watching it and its
    /// subdirectories, so events from its new place are not reported under old names.
    fn forget_subtree(&mut self, rel: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .wds
            .iter()
            .filter(|(_, r)| r.starts_with(rel))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.wds.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// The watch thread: until the consumer leaves (stop pipe closed, or the sink says
    /// stop) or the watch fails.
    fn run(mut self, stop: OwnedFd, mut sink: Box<dyn Sink>) {
        let mut out = Vec::new();
        loop {
            let (inotify_ready, stopped) = {
                let mut fds = [
                    PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                ];
                match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        sink.fail(FsError::io(
                            "cannot wait for inotify events of",
                            &self.root,
                            e.into(),
                        ));
                        return;
                    }
                }
                (
                    fds[0].revents().is_some_and(|r| !r.is_empty()),
                    fds[1].revents().is_some_and(|r| !r.is_empty()),
                )
            };
            if stopped {
                return;
            }
            if !inotify_ready {
                continue;
            }
            loop {
                let events = match self.inotify.read_events() {
                    Ok(evs) => evs,
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        sink.fail(FsError::io(
                            "cannot read inotify events of",
                            &self.root,
                            e.into(),
                        ));
                        return;
                    }
                };
                for ev in &events {
                    let result = self.process(ev, &mut out);
                    for e in out.drain(..) {
                        if let Flow::Stop = sink.deliver(e) {
                            return;
                        }
                    }
                    if let Err(e) = result {
                        sink.fail(e);
                        return;
                    }
                }
            }
        }
    }
}

/// Starts the thread of an armed watch. Returns the stop handle (drop it to end the watch).
fn spawn(armed: Armed, sink: Box<dyn Sink>) -> Result<OwnedFd, FsError> {
    let (stop_rx, stop_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| FsError::io("cannot start the watch of", &armed.root, e.into()))?;
    let root = armed.root.clone();
    std::thread::Builder::new()
        .name("fs-watch".into())
        .spawn(move || armed.run(stop_rx, sink))
        .map_err(|e| FsError::io("cannot start the watch thread for", &root, e))?;
    Ok(stop_tx)
}

// ---------------------------------------------------------------------------------------
// WatchDir: a stream.

/// The events of one WatchDir call. Dropping it stops the watch.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<FsEvent, FsError>>,
    _stop: OwnedFd,
}

impl WatchStream {
    /// The next event; `Some(Err(_))` is final (the watch failed); `None` after that.
    pub async fn recv(&mut self) -> Option<Result<FsEvent, FsError>> {
        self.rx.recv().await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<FsEvent, FsError>>> {
        self.rx.poll_recv(cx)
    }
}

impl futures_util::Stream for WatchStream {
    type Item = Result<FsEvent, FsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

struct StreamSink {
    tx: mpsc::Sender<Result<FsEvent, FsError>>,
}

impl Sink for StreamSink {
    fn deliver(&mut self, ev: FsEvent) -> Flow {
        // Waits while the reader is behind (the kernel queue buffers meanwhile); fails
        // when the reader is gone.
        match self.tx.blocking_send(Ok(ev)) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }

    fn fail(&mut self, e: FsError) {
        tracing::warn!(error = %e, "watch failed");
        let _ = self.tx.blocking_send(Err(e));
    }
}

/// WatchDir: validates `path`, arms the watch and returns its events. Blocking (the
/// recursive walk); when it returns the watch is armed, so the API sends `start` then.
pub fn watch_dir(
    path: &Path,
    opts: WatchOptions,
    users: Arc<dyn UserDb>,
) -> Result<WatchStream, FsError> {
    watch_dir_with_capacity(path, opts, users, STREAM_CHANNEL)
}

fn watch_dir_with_capacity(
    path: &Path,
    opts: WatchOptions,
    users: Arc<dyn UserDb>,
    capacity: usize,
) -> Result<WatchStream, FsError> {
    let armed = arm(path, opts, users)?;
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let stop = spawn(armed, Box::new(StreamSink { tx }))?;
    Ok(WatchStream { rx, _stop: stop })
}

// ---------------------------------------------------------------------------------------
// Polling watchers.

/// Limits of the polling watchers.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Events a watcher buffers between two polls; one more fails the watcher.
    pub queue_capacity: usize,
    /// A watcher not polled for this long is removed.
    pub idle_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            queue_capacity: 16_384,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Counts for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatcherStats {
    /// Watchers registered (running or failed).
    pub watchers: usize,
    /// Of those, failed ones (waiting to report their error).
    pub failed: usize,
    /// Events buffered over all watchers.
    pub queued_events: usize,
    /// Watchers removed for being idle since the registry started.
    pub expired_total: u64,
}

#[derive(Default)]
struct PollState {
    events: VecDeque<FsEvent>,
    failed: Option<FsError>,
}

struct PollSink {
    state: Arc<Mutex<PollState>>,
    capacity: usize,
    root: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sink for PollSink {
    fn deliver(&mut self, ev: FsEvent) -> Flow {
        let mut st = lock(&self.state);
        if st.failed.is_some() {
            return Flow::Stop;
        }
        if st.events.len() >= self.capacity {
            let e = FsError::QueueOverflow(format!(
                "the watcher of {} buffered {} events without being polled; events were lost \
                 and the watcher has stopped (poll GetWatcherEvents more often)",
                self.root.display(),
                self.capacity
            ));
            tracing::warn!(error = %e, "watcher failed");
            st.events = VecDeque::new();
            st.failed = Some(e);
            return Flow::Stop;
        }
        st.events.push_back(ev);
        Flow::Continue
    }

    fn fail(&mut self, e: FsError) {
        tracing::warn!(error = %e, "watcher failed");
        let mut st = lock(&self.state);
        st.events = VecDeque::new();
        st.failed = Some(e);
    }
}

struct Registered {
    state: Arc<Mutex<PollState>>,
    last_access: Instant,
    _stop: OwnedFd,
}

/// The polling watchers of CreateWatcher / GetWatcherEvents / RemoveWatcher.
pub struct WatcherRegistry {
    cfg: RegistryConfig,
    watchers: Mutex<HashMap<String, Registered>>,
    expired_total: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for WatcherRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatcherRegistry")
            .field("cfg", &self.cfg)
            .field("watchers", &lock(&self.watchers).len())
            .finish()
    }
}

impl Default for WatcherRegistry {
    fn default() -> Self {
        Self::new(RegistryConfig::default())
    }
}

impl WatcherRegistry {
    pub fn new(cfg: RegistryConfig) -> Self {
        WatcherRegistry {
            cfg,
            watchers: Mutex::new(HashMap::new()),
            expired_total: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// CreateWatcher: validates and arms like WatchDir; returns the id (`w` + 20 chars
    /// `[a-z0-9]`). Blocking.
    pub fn create(
        &self,
        path: &Path,
        opts: WatchOptions,
        users: Arc<dyn UserDb>,
    ) -> Result<String, FsError> {
        let armed = arm(path, opts, users)?;
        let state = Arc::new(Mutex::new(PollState::default()));
        let stop = spawn(
            armed,
            Box::new(PollSink {
                state: Arc::clone(&state),
                capacity: self.cfg.queue_capacity.max(1),
                root: path.to_path_buf(),
            }),
        )?;
        let mut map = lock(&self.watchers);
        let id = loop {
            let id = format!("w{}", random_token(20));
            if !map.contains_key(&id) {
                break id;
            }
        };
        map.insert(
            id.clone(),
            Registered {
                state,
                last_access: Instant::now(),
                _stop: stop,
            },
        );
        Ok(id)
    }

    /// GetWatcherEvents: the events since the previous call, oldest first; a failed watcher
    /// returns its failure on every call. Unknown id → `NotFound`.
    pub fn get_events(&self, id: &str) -> Result<Vec<FsEvent>, FsError> {
        let mut map = lock(&self.watchers);
        let Some(w) = map.get_mut(id) else {
            return Err(unknown_watcher(id));
        };
        w.last_access = Instant::now();
        let mut st = lock(&w.state);
        if let Some(e) = &st.failed {
            return Err(e.clone());
        }
        Ok(std::mem::take(&mut st.events).into())
    }

    /// RemoveWatcher: stops and forgets the watcher. Unknown id → `NotFound`.
    pub fn remove(&self, id: &str) -> Result<(), FsError> {
        match lock(&self.watchers).remove(id) {
            Some(_) => Ok(()),
            None => Err(unknown_watcher(id)),
        }
    }

    /// Removes watchers not polled for the idle timeout (as of `now`); returns how many.
    pub fn sweep_at(&self, now: Instant) -> usize {
        let idle = self.cfg.idle_timeout;
        let mut map = lock(&self.watchers);
        let before = map.len();
        map.retain(|id, w| {
            let keep = now.saturating_duration_since(w.last_access) < idle;
            if !keep {
                tracing::info!(watcher = %id, idle_secs = idle.as_secs(), "removing idle watcher");
            }
            keep
        });
        let n = before - map.len();
        self.expired_total
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// [`sweep_at`](Self::sweep_at) now.
    pub fn sweep(&self) -> usize {
        self.sweep_at(Instant::now())
    }

    /// Runs [`sweep`](Self::sweep) every `every` until the registry is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(reg) => {
                        reg.sweep();
                    }
                    None => return,
                }
            }
        })
    }

    pub fn stats(&self) -> WatcherStats {
        let map = lock(&self.watchers);
        let mut s = WatcherStats {
            watchers: map.len(),
            expired_total: self
                .expired_total
                .load(std::sync::atomic::Ordering::Relaxed),
            ..WatcherStats::default()
        };
        for w in map.values() {
            let st = lock(&w.state);
            if st.failed.is_some() {
                s.failed += 1;
            }
            s.queued_events += st.events.len();
        }
        s
    }
}

fn unknown_watcher(id: &str) -> FsError {
    FsError::NotFound(format!("watcher with id {id} not found"))
}

#[cfg(test)]
// The `LIMITS` guard is held across awaits on purpose: it only orders these tests against
// the (synchronous, ignored-by-default) test that lowers a global inotify limit.
#[allow(clippy::await_holding_lock)]
mod tests {
    use super::*;
    use crate::filesystem::entry::FileType;
    use crate::filesystem::entry::tests::FakeUsers;
    use crate::filesystem::error::ErrorClass;
    use crate::filesystem::upload::{AtomicWriter, CommitOptions};
    use crate::filesystem::{Owner, ops};
    use std::os::unix::fs::PermissionsExt;

    fn users() -> Arc<dyn UserDb> {
        Arc::new(FakeUsers)
    }

    /// Serializes the test that lowers a global inotify limit against the others.
    static LIMITS: std::sync::RwLock<()> = std::sync::RwLock::new(());

    fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
        LIMITS.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Collects events until `until` matches one, or the timeout.
    async fn collect_until(s: &mut WatchStream, until: impl Fn(&FsEvent) -> bool) -> Vec<FsEvent> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, s.recv()).await {
                Ok(Some(Ok(ev))) => {
                    let done = until(&ev);
                    got.push(ev);
                    if done {
                        return got;
                    }
                }
                Ok(Some(Err(e))) => panic!("watch failed: {e}; got {got:?}"),
                Ok(None) => panic!("watch ended; got {got:?}"),
                Err(_) => panic!("timed out; got {got:?}"),
            }
        }
    }

    fn has(evs: &[FsEvent], name: &str, t: EventType) -> bool {
        evs.iter().any(|e| e.name == name && e.event_type == t)
    }

    #[test]
    fn event_type_order() {
        let m = AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE;
        assert_eq!(
            event_types(m),
            [
                EventType::Create,
                EventType::Rename,
                EventType::Chmod,
                EventType::Write,
                EventType::Remove
            ]
        );
        assert_eq!(event_types(AddWatchFlags::IN_MOVED_TO), [EventType::Create]);
        assert_eq!(
            event_types(AddWatchFlags::IN_MOVE_SELF),
            [EventType::Rename]
        );
        assert_eq!(
            event_types(AddWatchFlags::IN_DELETE_SELF),
            [EventType::Remove]
        );
        assert!(event_types(AddWatchFlags::IN_IGNORED).is_empty());
    }

    #[test]
    fn network_magics_and_limit_errors() {
        assert!(is_network_fs_magic(0x6969));
        assert!(is_network_fs_magic(0xFF53_4D42));
        assert!(is_network_fs_magic(0x6573_5546));
        assert!(!is_network_fs_magic(0xEF53)); // ext4
        let e = add_watch_error(Path::new("/big/tree"), Errno::ENOSPC);
        assert!(matches!(e, FsError::WatchLimit { .. }));
        let text = e.to_string();
        assert!(text.contains("/big/tree"), "{text}");
        assert!(text.contains("fs.inotify.max_user_watches = "), "{text}");
        assert!(!text.contains("unknown"), "reads the sysctl: {text}");
        assert_eq!(e.class(), ErrorClass::Internal);
        let e = init_error(Path::new("/d"), Errno::EMFILE);
        assert!(
            e.to_string().contains("fs.inotify.max_user_instances"),
            "{e}"
        );
        let e = overflow_error(Path::new("/q"));
        assert!(e.to_string().contains("max_queued_events"), "{e}");
    }

    #[test]
    fn validation_errors() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let e = watch_dir(&missing, WatchOptions::default(), users()).expect_err("missing");
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert_eq!(
            e.to_string(),
            format!("path {} not found", missing.display())
        );
        let f = dir.path().join("f");
        fs::write(&f, b"").expect("write");
        let e = watch_dir(&f, WatchOptions::default(), users()).expect_err("file");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
        let reg = WatcherRegistry::default();
        let e = reg
            .create(&f, WatchOptions::default(), users())
            .expect_err("file");
        assert_eq!(e.class(), ErrorClass::InvalidArgument);
    }

    #[tokio::test]
    async fn basic_events_with_relative_names() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let mut s = watch_dir(&root, WatchOptions::default(), users()).expect("watch");
        let f = root.join("a.txt");
        fs::write(&f, b"hi").expect("write");
        let evs = collect_until(&mut s, |e| e.event_type == EventType::Write).await;
        assert!(has(&evs, "a.txt", EventType::Create), "{evs:?}");
        assert!(evs.iter().all(|e| e.entry.is_none()));

        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).expect("chmod");
        collect_until(&mut s, |e| {
            e.name == "a.txt" && e.event_type == EventType::Chmod
        })
        .await;

        fs::rename(&f, root.join("b.txt")).expect("rename");
        let evs = collect_until(&mut s, |e| e.name == "b.txt").await;
        assert!(has(&evs, "a.txt", EventType::Rename), "{evs:?}");
        assert_eq!(evs.last().map(|e| e.event_type), Some(EventType::Create));

        fs::remove_file(root.join("b.txt")).expect("rm");
        collect_until(&mut s, |e| {
            e.name == "b.txt" && e.event_type == EventType::Remove
        })
        .await;

        // Non-recursive: a subdirectory's contents are not reported; the dir itself is.
        fs::create_dir(root.join("sub")).expect("mkdir");
        collect_until(&mut s, |e| {
            e.name == "sub" && e.event_type == EventType::Create
        })
        .await;
        fs::write(root.join("sub/inner"), b"x").expect("write");
        fs::write(root.join("marker"), b"x").expect("write");
        let evs = collect_until(&mut s, |e| e.name == "marker").await;
        assert!(!evs.iter().any(|e| e.name.contains("inner")), "{evs:?}");

        // Events on the watched directory itself are named ".".
        fs::set_permissions(&root, fs::Permissions::from_mode(0o711)).expect("chmod");
        collect_until(&mut s, |e| {
            e.name == "." && e.event_type == EventType::Chmod
        })
        .await;
        ops::remove(&root).expect("rm -rf");
        collect_until(&mut s, |e| {
            e.name == "." && e.event_type == EventType::Remove
        })
        .await;
    }

    #[tokio::test]
    async fn recursive_new_subdirs_and_include_entry() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        fs::create_dir_all(root.join("old/deep")).expect("mkdir");
        let opts = WatchOptions {
            recursive: true,
            include_entry: true,
            allow_network_mounts: false,
        };
        let mut s = watch_dir(&root, opts, users()).expect("watch");
        fs::write(root.join("old/deep/x"), b"1").expect("write");
        let evs = collect_until(&mut s, |e| {
            e.name == "old/deep/x" && e.event_type == EventType::Write
        })
        .await;
        let create = evs
            .iter()
            .find(|e| e.name == "old/deep/x" && e.event_type == EventType::Create)
            .expect("create");
        let entry = create.entry.as_ref().expect("entry");
        assert_eq!(entry.path, root.join("old/deep/x"));
        assert_eq!(entry.file_type, FileType::File);

        // A new subdirectory (and one created inside it right away) is watched.
        fs::create_dir_all(root.join("new/inner")).expect("mkdir");
        fs::write(root.join("new/inner/f"), b"1").expect("write");
        collect_until(&mut s, |e| {
            e.name == "new/inner/f" && e.event_type == EventType::Write
        })
        .await;

        // A directory moved in from outside is watched under its new name.
        let outside = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(outside.path().join("m/n")).expect("mkdir");
        fs::rename(outside.path().join("m"), root.join("moved")).expect("mv");
        collect_until(&mut s, |e| {
            e.name == "moved" && e.event_type == EventType::Create
        })
        .await;
        fs::write(root.join("moved/n/g"), b"1").expect("write");
        collect_until(&mut s, |e| {
            e.name == "moved/n/g" && e.event_type == EventType::Write
        })
        .await;

        // Renamed within the tree: new names from then on.
        fs::rename(root.join("moved"), root.join("renamed")).expect("mv");
        fs::write(root.join("renamed/n/h"), b"1").expect("write");
        let evs = collect_until(&mut s, |e| {
            e.name == "renamed/n/h" && e.event_type == EventType::Write
        })
        .await;
        assert!(has(&evs, "moved", EventType::Rename), "{evs:?}");
        // REMOVE/RENAME never carry an entry.
        assert!(
            evs.iter()
                .filter(|e| matches!(e.event_type, EventType::Rename | EventType::Remove))
                .all(|e| e.entry.is_none())
        );
    }

    #[tokio::test]
    async fn uploads_show_create_chmod_write_for_the_target_only() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let mut s = watch_dir(&root, WatchOptions::default(), users()).expect("watch");
        let owner = Owner { uid: 0, gid: 0 };
        let mut w = AtomicWriter::create(&root.join("up.txt"), owner).expect("create");
        w.write_all(b"content").expect("write");
        w.commit(CommitOptions::default()).expect("commit");
        let evs = collect_until(&mut s, |e| {
            e.name == "up.txt" && e.event_type == EventType::Write
        })
        .await;
        assert!(has(&evs, "up.txt", EventType::Create), "{evs:?}");
        assert!(has(&evs, "up.txt", EventType::Chmod), "{evs:?}");
        assert!(
            evs.iter().all(|e| e.name == "up.txt"),
            "temp hidden: {evs:?}"
        );
        // Overwrite: again a WRITE for the name.
        let mut w = AtomicWriter::create(&root.join("up.txt"), owner).expect("create");
        w.write_all(b"again").expect("write");
        w.commit(CommitOptions::default()).expect("commit");
        let evs = collect_until(&mut s, |e| {
            e.name == "up.txt" && e.event_type == EventType::Write
        })
        .await;
        assert!(
            evs.iter().all(|e| e.name == "up.txt"),
            "temp hidden: {evs:?}"
        );
    }

    #[tokio::test]
    async fn stream_kernel_queue_overflow_is_an_error() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let limit = read_sysctl(PROC_QUEUED).unwrap_or(16_384) as usize;
        // A stalled reader: channel of 1, nothing read while the kernel queue fills.
        let mut s =
            watch_dir_with_capacity(&root, WatchOptions::default(), users(), 1).expect("watch");
        // Two events per file; the thread holds up to one read() batch outside the queue.
        let n = limit / 2 + 2_048;
        let r2 = root.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..n {
                // CREATE + MODIFY per file.
                fs::write(r2.join(format!("f{i}")), b"x").expect("write");
            }
        })
        .await
        .expect("join");
        let mut seen = 0usize;
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(10), s.recv()).await {
                Ok(Some(Ok(_))) => seen += 1,
                Ok(Some(Err(e))) => break e,
                Ok(None) => panic!("ended without error after {seen}"),
                Err(_) => panic!("no overflow error after {seen} events"),
            }
        };
        assert!(matches!(err, FsError::QueueOverflow(_)), "{err}");
        assert!(err.to_string().contains("overflowed"), "{err}");
        assert!(s.recv().await.is_none(), "error is final");
    }

    #[test]
    fn polling_watcher_lifecycle() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let reg = WatcherRegistry::new(RegistryConfig::default());
        let id = reg
            .create(&root, WatchOptions::default(), users())
            .expect("create");
        assert_eq!(id.len(), 21);
        assert!(id.starts_with('w'));
        assert!(
            id[1..]
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        fs::write(root.join("one"), b"1").expect("write");
        fs::write(root.join("two"), b"2").expect("write");
        let mut all = Vec::new();
        for _ in 0..100 {
            all.extend(reg.get_events(&id).expect("events"));
            if has(&all, "two", EventType::Write) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let first_one = all.iter().position(|e| e.name == "one").expect("one");
        let first_two = all.iter().position(|e| e.name == "two").expect("two");
        assert!(first_one < first_two, "oldest first: {all:?}");
        assert!(reg.get_events(&id).expect("drained").is_empty());
        assert_eq!(reg.stats().watchers, 1);

        reg.remove(&id).expect("remove");
        let e = reg.get_events(&id).expect_err("removed");
        assert_eq!(e.class(), ErrorClass::NotFound);
        assert_eq!(e.to_string(), format!("watcher with id {id} not found"));
        assert_eq!(
            reg.remove(&id).expect_err("twice").class(),
            ErrorClass::NotFound
        );
    }

    #[test]
    fn polling_watcher_queue_overflow_fails_on_every_call() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let reg = WatcherRegistry::new(RegistryConfig {
            queue_capacity: 5,
            idle_timeout: Duration::from_secs(60),
        });
        let id = reg
            .create(&root, WatchOptions::default(), users())
            .expect("create");
        for i in 0..10 {
            fs::write(root.join(format!("f{i}")), b"x").expect("write");
        }
        let mut err = None;
        for _ in 0..200 {
            if reg.stats().failed == 1 {
                err = Some(reg.get_events(&id).expect_err("failed"));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = err.expect("watcher must fail");
        assert!(matches!(err, FsError::QueueOverflow(_)), "{err}");
        assert!(err.to_string().contains("5 events"), "{err}");
        let again = reg.get_events(&id).expect_err("still failed");
        assert_eq!(again.to_string(), err.to_string());
        assert_eq!(reg.stats().queued_events, 0);
    }

    #[test]
    fn idle_polling_watchers_expire() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = WatcherRegistry::new(RegistryConfig {
            queue_capacity: 100,
            idle_timeout: Duration::from_secs(30),
        });
        let idle = reg
            .create(dir.path(), WatchOptions::default(), users())
            .expect("create");
        let busy = reg
            .create(dir.path(), WatchOptions::default(), users())
            .expect("create");
        let t0 = Instant::now();
        assert_eq!(reg.sweep_at(t0 + Duration::from_secs(10)), 0);
        // Polling `busy` later refreshes it.
        std::thread::sleep(Duration::from_millis(20));
        reg.get_events(&busy).expect("poll");
        let later = Instant::now() + Duration::from_secs(30) - Duration::from_millis(10);
        assert_eq!(reg.sweep_at(later), 1);
        assert_eq!(
            reg.get_events(&idle).expect_err("expired").class(),
            ErrorClass::NotFound
        );
        reg.get_events(&busy).expect("still there");
        assert_eq!(reg.stats().expired_total, 1);
        assert_eq!(reg.stats().watchers, 1);
    }

    #[tokio::test]
    async fn sweeper_task_removes_idle_watchers() {
        let _g = shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Arc::new(WatcherRegistry::new(RegistryConfig {
            queue_capacity: 100,
            idle_timeout: Duration::from_millis(50),
        }));
        let id = reg
            .create(dir.path(), WatchOptions::default(), users())
            .expect("create");
        let task = reg.spawn_sweeper(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(reg.get_events(&id).is_err());
        drop(reg);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("sweeper ends with the registry")
            .expect("join");
    }

    /// Restores a sysctl when dropped.
    struct SysctlGuard(&'static str, u64);

    impl Drop for SysctlGuard {
        fn drop(&mut self) {
            let _ = fs::write(self.0, self.1.to_string());
        }
    }

    /// Lowers the global watch limit for a moment; run with `--ignored` (it affects every
    /// inotify user of this uid on the machine while it runs).
    #[test]
    #[ignore]
    fn real_watch_limit_is_a_clear_error() {
        let _g = LIMITS.write().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..50 {
            fs::create_dir_all(dir.path().join(format!("d{i}/e"))).expect("mkdir");
        }
        let Some(old) = read_sysctl(PROC_WATCHES) else {
            return;
        };
        let opts = WatchOptions {
            recursive: true,
            ..WatchOptions::default()
        };
        let err = {
            let _restore = SysctlGuard(PROC_WATCHES, old);
            fs::write(PROC_WATCHES, "20").expect("lower limit");
            watch_dir(dir.path(), opts, users()).map(|_| ())
        };
        let err = err.expect_err("limit");
        assert!(
            matches!(
                err,
                FsError::WatchLimit {
                    limit: Some(20),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("fs.inotify.max_user_watches = 20"),
            "{err}"
        );
        assert_eq!(read_sysctl(PROC_WATCHES), Some(old));
    }

    #[test]
    fn raise_limits_keeps_or_raises() {
        let _g = shared();
        // Put the machine's values back afterwards.
        let _w = read_sysctl(PROC_WATCHES).map(|v| SysctlGuard(PROC_WATCHES, v));
        let _i = read_sysctl(PROC_INSTANCES).map(|v| SysctlGuard(PROC_INSTANCES, v));
        let limits = raise_inotify_limits();
        assert!(
            limits
                .max_user_watches
                .is_some_and(|n| n >= MIN_USER_WATCHES)
        );
        assert!(
            limits
                .max_user_instances
                .is_some_and(|n| n >= MIN_USER_INSTANCES)
        );
    }
}
