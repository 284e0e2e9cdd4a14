//! Port forwarding for services that listen only on loopback (contract §6.1).
//!
//! The host reaches sandbox ports through the guest's external interface, so a dev
//! server bound to `127.0.0.1:3000` would be unreachable. Once a second guestd lists
//! TCP sockets in LISTEN state (`/proc/net/tcp`, `/proc/net/tcp6`); for every port
//! that is bound to loopback and not also to a wildcard address, it listens on the same
//! port of each external interface address and relays connections to loopback. When
//! the loopback listener goes away, the forwarder's listeners close. The relay runs in
//! guestd itself (no `socat` processes to spawn, place in cgroups and reap).

pub mod scan;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use scan::{Family, Listener};

/// How often listeners are scanned.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Loopback ports guestd's own components listen on (the kernels' ZeroMQ sockets):
/// never forwarded, since a kernel's iopub socket publishes every execution's output.
static PRIVATE: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());

/// Keeps ports out of forwarding while it lives.
#[derive(Debug)]
pub struct PrivatePorts(Vec<u16>);

/// Marks `ports` as private to guestd until the returned guard is dropped.
pub fn hold_private(ports: &[u16]) -> PrivatePorts {
    PRIVATE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(ports.iter().copied());
    PrivatePorts(ports.to_vec())
}

impl Drop for PrivatePorts {
    fn drop(&mut self) {
        let mut set = PRIVATE.lock().unwrap_or_else(|p| p.into_inner());
        for p in &self.0 {
            set.remove(p);
        }
    }
}

fn private_ports() -> Vec<u16> {
    PRIVATE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect()
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
/// own listeners).
pub async fn run(exclude: Vec<u16>, stats: Arc<Stats>, shutdown: CancellationToken) {
    let mut forwards: HashMap<(Family, u16), Forward> = HashMap::new();
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
        let mut excluded = exclude.clone();
        excluded.extend(private_ports());
        let wanted = scan::loopback_only(&listeners, &excluded);
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
