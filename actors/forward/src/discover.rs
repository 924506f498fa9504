//! Auto-discovered forwards: which to add and which to remove when the workspace's listening
//! ports change.
//!
//! One forward per port: a port listened on for IPv4 and IPv6 (or on several addresses) is
//! one forward, reaching the IPv4 listener when there is one. Ports the user forwards by a
//! `-L` rule are left to that rule.

use std::collections::{BTreeMap, BTreeSet};

use cs_protocol::forward::{Endpoint, Listening};

use crate::procnet::connect_host;

/// What to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// New ports: where to connect in the workspace, and who listens.
    pub add: Vec<(Endpoint, Listening)>,
    /// Ports no longer listened on.
    pub remove: Vec<u16>,
    /// Ports still listened on, with who listens now (a restarted daemon keeps its forward).
    pub keep: Vec<Listening>,
}

/// The one listener per port a forward reaches.
pub fn by_port(now: &[Listening]) -> BTreeMap<u16, Listening> {
    let mut out: BTreeMap<u16, Listening> = BTreeMap::new();
    for l in now {
        let v4 = |l: &Listening| !l.addr.contains(':');
        match out.get(&l.port) {
            Some(have) if v4(have) || !v4(l) => {}
            _ => {
                out.insert(l.port, l.clone());
            }
        }
    }
    out
}

/// Where a forward to `l` connects in the workspace.
pub fn target(l: &Listening) -> Endpoint {
    let host = match l.addr.parse::<std::net::IpAddr>() {
        Ok(a) => connect_host(a),
        Err(_) => l.addr.clone(),
    };
    Endpoint::Tcp { host, port: l.port }
}

/// The changes from the forwarded ports `current` to the listening ports `now`, leaving
/// `declared` (ports of `-L` rules' targets) alone.
pub fn diff(now: &[Listening], current: &BTreeSet<u16>, declared: &BTreeSet<u16>) -> Diff {
    let now = by_port(now);
    let mut d = Diff::default();
    for (port, l) in &now {
        if declared.contains(port) {
            continue;
        }
        if current.contains(port) {
            d.keep.push(l.clone());
        } else {
            d.add.push((target(l), l.clone()));
        }
    }
    d.remove = current
        .iter()
        .filter(|p| !now.contains_key(p) || declared.contains(p))
        .copied()
        .collect();
    d
}

/// The line that says a forward could not have its own port on the laptop (`why` names
/// the port and, when known, who holds it).
pub fn moved_note(remote: u16, local: u16, why: &str) -> String {
    format!("workspace port {remote}: {why}; forwarding it on 127.0.0.1:{local} instead")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn l(addr: &str, port: u16) -> Listening {
        Listening {
            port,
            addr: addr.into(),
            pid: None,
            command: None,
            daemon: None,
        }
    }

    #[test]
    fn one_forward_per_port_preferring_ipv4() {
        let now = [l("::", 80), l("0.0.0.0", 80), l("::1", 3000)];
        let d = diff(&now, &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(d.add.len(), 2);
        assert_eq!(
            d.add[0].0,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 80
            }
        );
        assert_eq!(
            d.add[1].0,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 3000
            }
        );
    }

    #[test]
    fn declared_ports_are_left_to_their_rule() {
        let now = [l("127.0.0.1", 80), l("127.0.0.1", 81)];
        let cur: BTreeSet<u16> = [80].into();
        let d = diff(&now, &cur, &[80, 81].into());
        assert!(d.add.is_empty());
        assert_eq!(d.remove, vec![80]);
    }

    proptest! {
        /// Applying a diff makes the forwarded set exactly the listening ports not declared.
        #[test]
        fn applying_a_diff_reaches_the_listening_set(
            now in proptest::collection::vec((0u16..20, any::<bool>()), 0..20),
            cur in proptest::collection::btree_set(0u16..20, 0..20),
            declared in proptest::collection::btree_set(0u16..20, 0..5),
        ) {
            let now: Vec<Listening> = now.iter().map(|(p, v6)| l(if *v6 { "::" } else { "0.0.0.0" }, *p)).collect();
            let d = diff(&now, &cur, &declared);
            let mut after = cur.clone();
            for p in &d.remove { prop_assert!(after.remove(p)); }
            for (t, w) in &d.add {
                prop_assert!(after.insert(w.port));
                let ok = matches!(t, Endpoint::Tcp { port, .. } if *port == w.port);
                prop_assert!(ok);
            }
            let want: BTreeSet<u16> = now.iter().map(|w| w.port).filter(|p| !declared.contains(p)).collect();
            prop_assert_eq!(after, want);
        }
    }
}
