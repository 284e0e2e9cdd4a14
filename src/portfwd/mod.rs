//! Port forwarding for services that listen only on loopback (contract §6.1).
//!
//! The host reaches sandbox ports through the guest's external interface, so a dev
//! server bound to `127.0.0.1:3000` would be unreachable. Once a second guestd lists
//! TCP sockets in LISTEN state (`/proc/net/tcp`, `/proc/net/tcp6`); for every port
//! that is bound to loopback and not also to a wildcard address, it listens on the same
//! port of each external interface address and relays connections to loopback. When
//! the loopback listener goes away, the forwarder's listeners close. The relay runs in
//! guestd itself (no `socat` processes to spawn, place in cgroups and reap).
//!
//! Never forwarded, identified by socket inode: sockets guestd itself holds, and the
//! sockets a kernel listens on for itself (everything it opened before it was ready;
//! see [`register_kernel`]).

pub mod scan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use scan::{Family, Listener};

/// How often listeners are scanned.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Kernels whose listening sockets are theirs, not the user's (issue 8): a kernel
/// listens on its connection file's ports and may open more for itself (ipykernel's
/// IOPub pipe for forked subprocesses is in no connection file), and its iopub socket
/// publishes every execution's output. The boundary is the kernel's readiness:
/// whatever the kernel process listens on until then is its infrastructure and never
/// forwarded; whatever it opens later runs the user's code (a server started in a
/// cell, in the kernel's own process or in a child) and is forwarded like any other.
static KERNELS: std::sync::Mutex<BTreeMap<u64, KernelEntry>> =
    std::sync::Mutex::new(BTreeMap::new());

enum KernelEntry {
    /// Not ready yet: every socket of this process is private.
    Starting(i32),
    /// Ready: the sockets it held then are private; later ones are the user's.
    Ready(BTreeSet<u64>),
}

fn kernels() -> std::sync::MutexGuard<'static, BTreeMap<u64, KernelEntry>> {
    KERNELS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps a kernel's own listeners out of forwarding while it lives (drop = gone).
#[derive(Debug)]
pub struct KernelSockets(u64);

/// Registers kernel process `pid` right after it was spawned (before it can listen
/// on anything): until [`KernelSockets::ready`], all its sockets are private.
pub fn register_kernel(pid: i32) -> KernelSockets {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    kernels().insert(id, KernelEntry::Starting(pid));
    KernelSockets(id)
}

impl KernelSockets {
    /// The kernel answered its readiness handshake: the sockets it holds now stay
    /// private, sockets it opens from now on are forwarded. Returns how many there are.
    pub fn ready(&self) -> usize {
        let pid = match kernels().get(&self.0) {
            Some(KernelEntry::Starting(pid)) => *pid,
            _ => return 0,
        };
        let held = scan::socket_inodes(&pid.to_string());
        let n = held.len();
        if let Some(e) = kernels().get_mut(&self.0) {
            *e = KernelEntry::Ready(held);
        }
        n
    }
}

impl Drop for KernelSockets {
    fn drop(&mut self) {
        kernels().remove(&self.0);
    }
}

/// Decides, per socket inode, whether a loopback listener is guestd's or a kernel's
/// (private) or the user's (forwarded). Decisions are kept while the socket listens:
/// a socket's owner never changes from infrastructure to user or back.
#[derive(Default)]
struct Classifier {
    decided: HashMap<u64, bool>,
}

impl Classifier {
    /// Drops decisions about sockets that no longer listen.
    fn retain_listening(&mut self, listeners: &[Listener]) {
        let live: BTreeSet<u64> = listeners.iter().map(|l| l.inode).collect();
        self.decided.retain(|inode, _| live.contains(inode));
    }

    /// Whether each of `candidates` is private; `/proc` is read only for sockets not
    /// decided before, at most once per process per scan.
    fn private(&mut self, candidates: &[&Listener]) -> Vec<bool> {
        let mut own: Option<BTreeSet<u64>> = None;
        let mut starting: Option<BTreeSet<u64>> = None;
        candidates
            .iter()
            .map(|l| {
                if l.inode == 0 {
                    // Nothing to identify it by (an unusual /proc): the port decides.
                    return false;
                }
                if let Some(d) = self.decided.get(&l.inode) {
                    return *d;
                }
                let (ready_private, starting_pids) = {
                    let k = kernels();
                    let ready = k
                        .values()
                        .any(|e| matches!(e, KernelEntry::Ready(held) if held.contains(&l.inode)));
                    let pids: Vec<i32> = k
                        .values()
                        .filter_map(|e| match e {
                            KernelEntry::Starting(pid) => Some(*pid),
                            _ => None,
                        })
                        .collect();
                    (ready, pids)
                };
                if ready_private {
                    return true;
                }
                let own = own.get_or_insert_with(|| scan::socket_inodes("self"));
                let private = own.contains(&l.inode)
                    || (!starting_pids.is_empty()
                        && starting
                            .get_or_insert_with(|| {
                                starting_pids
                                    .iter()
                                    .flat_map(|p| scan::socket_inodes(&p.to_string()))
                                    .collect()
                            })
                            .contains(&l.inode));
                // A starting kernel's socket is decided for good (it is private for
                // the kernel's life); a socket nobody claims stays the user's.
                self.decided.insert(l.inode, private);
                private
            })
            .collect()
    }
}

/// One forwarded loopback port.
struct Forward {
    cancel: CancellationToken,
    /// External addresses already served for this port.
    bound: BTreeSet<IpAddr>,
}

/// The forwarder task's state, visible for metrics and tests.
#[derive(Default)]
pub struct Stats {
    pub forwarded_ports: AtomicUsize,
    pub connections: AtomicUsize,
}

/// Scans and forwards until `shutdown`. `exclude` lists ports never forwarded (guestd's
/// configured ports, whoever listens on them); guestd's own sockets and the kernels'
/// are never forwarded in any case.
pub async fn run(exclude: Vec<u16>, stats: Arc<Stats>, shutdown: CancellationToken) {
    let mut forwards: HashMap<(Family, u16), Forward> = HashMap::new();
    let mut classifier = Classifier::default();
    let mut tick = tokio::time::interval(SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let listeners = match scan::listeners() {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read TCP listeners");
                continue;
            }
        };
        classifier.retain_listening(&listeners);
        let candidates: Vec<&Listener> =
            scan::loopback_only_listeners(&listeners, &exclude).collect();
        let private = classifier.private(&candidates);
        // A port is forwarded when none of its loopback listeners is private (the
        // relay connects to the port, whichever socket answers).
        let mut wanted = BTreeSet::new();
        let mut held = BTreeSet::new();
        for (l, private) in candidates.iter().zip(private) {
            if private {
                held.insert((l.family, l.port));
            } else {
                wanted.insert((l.family, l.port));
            }
        }
        let wanted: BTreeSet<(Family, u16)> = wanted.difference(&held).copied().collect();
        let external = external_addresses();
        // Stop forwards whose loopback listener is gone.
        forwards.retain(|key, f| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(port = key.1, family = ?key.0, "loopback listener gone; forwarder stopped");
                f.cancel.cancel();
            }
            keep
        });
        for key in &wanted {
            let (family, port) = *key;
            let fwd = forwards.entry(*key).or_insert_with(|| Forward {
                cancel: shutdown.child_token(),
                bound: BTreeSet::new(),
            });
            for ip in external.iter().filter(|ip| family.matches(ip)) {
                if fwd.bound.contains(ip) {
                    continue;
                }
                let target = SocketAddr::new(family.loopback(), port);
                match TcpListener::bind(SocketAddr::new(*ip, port)).await {
                    Ok(l) => {
                        tracing::info!(%ip, port, "forwarding to loopback listener");
                        fwd.bound.insert(*ip);
                        tokio::spawn(relay(l, target, stats.clone(), fwd.cancel.clone()));
                    }
                    Err(e) => {
                        // Someone else serves this address (or it vanished); retry next scan.
                        tracing::debug!(%ip, port, error = %e, "cannot bind forwarder");
                    }
                }
            }
        }
        stats
            .forwarded_ports
            .store(forwards.len(), Ordering::Relaxed);
    }
    for f in forwards.values() {
        f.cancel.cancel();
    }
}

async fn relay(
    listener: TcpListener,
    target: SocketAddr,
    stats: Arc<Stats>,
    cancel: CancellationToken,
) {
    loop {
        let (mut inbound, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "forwarder accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let stats = stats.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            let mut outbound = match TcpStream::connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, %target, error = %e, "forward target refused");
                    return;
                }
            };
            let _ = outbound.set_nodelay(true);
            stats.connections.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cancel.cancelled() => {}
            }
            stats.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Every non-loopback address of every interface that is up (IPv6 link-local skipped:
/// binding it needs a scope id and the host proxy never uses it).
pub fn external_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for a in addrs {
        if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let skip = match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if !skip && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

impl Family {
    fn matches(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }

    fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
}
