//! The listening sockets in the text of `/proc/net/tcp` and `/proc/net/tcp6`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The kernel's state number for LISTEN.
const TCP_LISTEN: &str = "0A";

/// One listening socket: its address, port and socket inode (which `/proc/PID/fd` links name
/// as `socket:[INODE]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenSocket {
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

fn ip(hex: &str) -> Option<IpAddr> {
    // Each 32-bit word is printed as the native integer holding network-order bytes.
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The LISTEN lines of one `/proc/net/tcp*` file; lines that do not parse are skipped.
pub fn listening(text: &str) -> Vec<ListenSocket> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != TCP_LISTEN {
            continue;
        }
        let Some((a, p)) = f[1].split_once(':') else {
            continue;
        };
        let (Some(addr), Ok(port), Ok(inode)) =
            (ip(a), u16::from_str_radix(p, 16), f[9].parse::<u64>())
        else {
            continue;
        };
        out.push(ListenSocket { addr, port, inode });
    }
    out
}

/// The inode a `/proc/PID/fd/N` link names, if it is a socket.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The address to connect to in the workspace to reach a socket listening on `addr`: the
/// loopback of its family for a wildcard, the address itself otherwise.
pub fn connect_host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.to_string(),
        IpAddr::V6(a) if a.is_unspecified() => Ipv6Addr::LOCALHOST.to_string(),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => a.to_string(),
        },
        a => a.to_string(),
    }
}

// ---- the shells' readers of /proc (never on a simulated path) ------------------------------

/// Where each socket inode was found: (pid, command, process group) by inode.
pub type Owners = BTreeMap<u64, (u32, String, u32)>;

/// Every listening TCP socket of this network namespace.
pub fn read_sockets() -> Vec<ListenSocket> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            out.extend(listening(&text));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Finds the processes holding `inodes`: (pid, comm, pgid) by inode.
pub fn find_owners(inodes: &BTreeSet<u64>) -> Owners {
    let mut out = Owners::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = link.to_str().and_then(socket_inode) else {
                continue;
            };
            if inodes.contains(&inode) && !out.contains_key(&inode) {
                let comm = std::fs::read_to_string(p.path().join("comm"))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_default();
                let pgid = std::fs::read_to_string(p.path().join("stat"))
                    .ok()
                    .and_then(|s| {
                        // pid (comm) state ppid pgrp: comm may hold spaces and parentheses.
                        let rest = &s[s.rfind(')')? + 1..];
                        rest.split_whitespace().nth(2)?.parse().ok()
                    })
                    .unwrap_or(0);
                out.insert(inode, (pid, comm, pgid));
            }
        }
    }
    out
}

/// Who listens on TCP `port` on this machine, as `pid N (COMMAND)`, if it can be known.
pub fn who_listens(port: u16) -> Option<String> {
    let inodes: BTreeSet<u64> = read_sockets()
        .into_iter()
        .filter(|s| s.port == port)
        .map(|s| s.inode)
        .collect();
    let owners = find_owners(&inodes);
    let (pid, comm, _) = owners.values().next()?;
    Some(format!("pid {pid} ({comm})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from a Linux 6.x box (x86_64), trimmed.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 40123 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 40200 1 0000000000000000 20 4 30 10 -1
   3: garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 555 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 556 1 0000000000000000 100 0 0 10 0
";

    #[test]
    #[cfg(target_endian = "little")]
    fn listening_sockets_of_both_files() {
        let v4 = listening(TCP);
        assert_eq!(
            v4,
            vec![
                ListenSocket {
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 8080,
                    inode: 40123
                },
                ListenSocket {
                    addr: "0.0.0.0".parse().unwrap(),
                    port: 22,
                    inode: 1234
                },
            ]
        );
        let v6 = listening(TCP6);
        assert_eq!(v6[0].addr, "::".parse::<IpAddr>().unwrap());
        assert_eq!(v6[0].port, 8081);
        assert_eq!(v6[1].addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6[1].port, 3000);
        assert_eq!(connect_host(v4[1].addr), "127.0.0.1");
        assert_eq!(connect_host(v6[0].addr), "::1");
        assert_eq!(connect_host(v4[0].addr), "127.0.0.1");
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[40123]"), Some(40123));
        assert_eq!(socket_inode("pipe:[40123]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
