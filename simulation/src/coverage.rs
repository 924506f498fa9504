//! Coverage markers ("sometimes" assertions): each names a fault class or an interesting path
//! that some seed of a large enough run must reach. A marker nobody reaches means the swarm
//! does not test what it claims to, and the runner says which.

/// Every marker; [`crate::trace::Trace::sometimes`] accepts only these.
pub const MARKERS: &[&str] = &[
    "fault: datagram lost",
    "fault: datagram duplicated",
    "fault: datagram corrupted",
    "fault: datagrams reordered",
    "fault: partition",
    "fault: one-way partition",
    "fault: link clogged",
    "fault: agent crashed",
    "fault: laptop crashed",
    "fault: laptop slept",
    "fault: child crashed",
    "path: two workspaces",
    "path: command reported failed",
    "path: command interrupted by a signal",
    "path: command in flight when the laptop crashed",
    "path: command abandoned by the laptop",
    "path: link reconnected",
    "path: stream retried on a fresh connection",
];

/// The sync scenario's markers (it reaches most of [`MARKERS`]' fault classes too).
pub const SYNC_MARKERS: &[&str] = &[
    "fault: datagram lost",
    "fault: partition",
    "fault: agent crashed",
    "fault: laptop crashed",
    "fault: laptop slept",
    "fault: disk error",
    "fault: applied writes lost in a crash",
    "sync: conflict reported",
    "sync: files sent to the workspace",
    "sync: files fetched from the workspace",
    "sync: file moved on its own stream",
    "sync: reconciled around the changed paths only",
    "sync: content packed over a distant link",
];

/// The supervise scenario's markers.
pub const SUPERVISE_MARKERS: &[&str] = &[
    "fault: agent crashed",
    "fault: partition",
    "fault: laptop crashed",
    "supervise: step failed and was retried",
    "supervise: daemon restarted after it stopped",
    "supervise: workspace flagged for a crashing daemon",
    "supervise: leftover ended by a restarted agent",
    "supervise: once-only step skipped after a restart",
    "supervise: hung hook reported",
    "supervise: log follow resumed",
    "supervise: daemon stopped and started by the user",
];

/// The forward scenario's markers.
pub const FORWARD_MARKERS: &[&str] = &[
    "fault: datagram lost",
    "fault: partition",
    "fault: agent crashed",
    "fault: laptop crashed",
    "fault: laptop slept",
    "forward: half-close completed",
    "forward: server reset reached the client",
    "forward: client reset carried",
    "forward: refused target",
    "forward: connection lost mid-transfer",
    "forward: slow server held the writer back",
    "forward: slow client reader held the pump back",
    "forward: new connection after the heal",
    "forward: more connections at once than the agent allows streams",
];

/// The markers of `MARKERS` that are not in `reached`.
pub fn missing<'a>(reached: impl IntoIterator<Item = &'a &'static str>) -> Vec<&'static str> {
    missing_of(MARKERS, reached)
}

/// The markers of `markers` that are not in `reached`.
pub fn missing_of<'a>(
    markers: &[&'static str],
    reached: impl IntoIterator<Item = &'a &'static str>,
) -> Vec<&'static str> {
    let reached: std::collections::BTreeSet<&str> = reached.into_iter().copied().collect();
    markers
        .iter()
        .copied()
        .filter(|m| !reached.contains(m))
        .collect()
}
