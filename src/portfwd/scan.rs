//! Reading TCP listeners from `/proc/net/tcp` and `/proc/net/tcp6`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// A socket in LISTEN state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    /// The socket's inode (`socket:[inode]` in its holders' `/proc/<pid>/fd`), 0 when
    /// the table does not say.
    pub inode: u64,
}

const TCP_LISTEN: &str = "0A";

/// All TCP listeners of the machine (this network namespace).
pub fn listeners() -> std::io::Result<Vec<Listener>> {
    let mut out = parse(&std::fs::read_to_string("/proc/net/tcp")?, Family::V4);
    if let Ok(v6) = std::fs::read_to_string("/proc/net/tcp6") {
        out.extend(parse(&v6, Family::V6));
    }
    Ok(out)
}

/// Parses a `/proc/net/tcp{,6}` table.
pub fn parse(text: &str, family: Family) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _slot = f.next()?;
            let local = f.next()?;
            let _remote = f.next()?;
            let state = f.next()?;
            if state != TCP_LISTEN {
                return None;
            }
            let (addr_hex, port_hex) = local.split_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            let addr = parse_addr(addr_hex, family)?;
            // queues, timer, retransmits, uid, timeout, then the inode.
            let inode = f.nth(5).and_then(|i| i.parse().ok()).unwrap_or(0);
            Some(Listener {
                family,
                addr,
                port,
                inode,
            })
        })
        .collect()
}

/// The kernel prints addresses as host-order 32-bit words in hex.
fn parse_addr(hex: &str, family: Family) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(|w| w.to_ne_bytes());
    match family {
        Family::V4 if hex.len() == 8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        Family::V6 if hex.len() == 32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

fn is_loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Ports (per family) bound to a loopback address and not also to the wildcard
/// address, minus `exclude`. These need a forwarder.
pub fn loopback_only(listeners: &[Listener], exclude: &[u16]) -> BTreeSet<(Family, u16)> {
    loopback_only_listeners(listeners, exclude)
        .map(|l| (l.family, l.port))
        .collect()
}

/// The listeners behind [`loopback_only`] (a port may have several: one per loopback
/// address, or `SO_REUSEPORT` groups).
pub fn loopback_only_listeners<'a>(
    listeners: &'a [Listener],
    exclude: &'a [u16],
) -> impl Iterator<Item = &'a Listener> + 'a {
    let wildcard: BTreeSet<u16> = listeners
        .iter()
        .filter(|l| l.addr.is_unspecified())
        .map(|l| l.port)
        .collect();
    listeners.iter().filter(move |l| {
        is_loopback(&l.addr) && !wildcard.contains(&l.port) && !exclude.contains(&l.port)
    })
}

/// Inodes of the sockets process `pid` holds (`self` for guestd), from the
/// `socket:[inode]` links in `/proc/<pid>/fd`; empty when the process is gone.
pub fn socket_inodes(pid: &str) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in dir.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(inode) = socket_inode(target.as_os_str().as_encoded_bytes())
        {
            out.insert(inode);
        }
    }
    out
}

/// The inode of a `/proc/<pid>/fd` link that names a socket.
pub fn socket_inode(link: &[u8]) -> Option<u64> {
    let n = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(n).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:C34F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D2C4 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   4: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
    const TCP6: &str =
        "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1388 00000000000000000000000000000000:0000 0A 0
   1: 0000000000000000FFFF00000100007F:1389 00000000000000000000000000000000:0000 0A 0
";

    #[test]
    fn parses_listen_sockets_only() {
        let l = parse(TCP, Family::V4);
        assert_eq!(l.len(), 4);
        assert_eq!(
            l[0],
            Listener {
                family: Family::V4,
                addr: "127.0.0.1".parse().unwrap(),
                port: 3000,
                inode: 1,
            }
        );
        assert_eq!(l[1].inode, 2);
        assert_eq!(l[1].addr, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(l[1].port, 49999);
        let l6 = parse(TCP6, Family::V6);
        assert_eq!(l6[0].addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(l6[0].port, 5000);
        assert_eq!(l6[1].addr, "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(l6[0].inode, 0, "no inode column");
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode(b"socket:[1487617]"), Some(1487617));
        assert_eq!(socket_inode(b"pipe:[1487617]"), None);
        assert_eq!(socket_inode(b"socket:[x]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
    }

    #[test]
    fn own_sockets_are_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mine = socket_inodes("self");
        let listed = listeners()
            .unwrap()
            .into_iter()
            .find(|x| x.port == port && x.addr.is_loopback())
            .expect("our listener is in /proc/net/tcp");
        assert!(listed.inode != 0 && mine.contains(&listed.inode));
    }

    #[test]
    fn forwards_loopback_only_ports() {
        let mut all = parse(TCP, Family::V4);
        all.extend(parse(TCP6, Family::V6));
        let want = loopback_only(&all, &[5001]);
        // 3000: loopback only; 8081: also on the wildcard → no forward; 5000 on ::1;
        // 5001 excluded.
        assert_eq!(
            want,
            BTreeSet::from([(Family::V4, 3000), (Family::V6, 5000)])
        );
    }

    #[test]
    fn reads_this_machine() {
        assert!(listeners().is_ok());
    }
}
