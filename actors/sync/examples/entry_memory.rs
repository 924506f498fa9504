//! What a sync session holds per tracked entry, measured: builds the state a laptop session
//! keeps for a tree of N entries (the ancestor, the last local scan with its hash cache, the
//! workspace's last tree decoded from the wire) and reports the resident memory it takes,
//! then times one reconciliation and one change computation over it.
//!
//! `cargo run --release -p cs-sync --example entry_memory [-- ENTRIES]` (default 1,000,000)

use std::time::Instant;

use cs_sync::scan::{CacheEntry, HashCache, ScanOutput};
use cs_sync::{content_hash, reconcile, Entry, Mode, RelPath, Snapshot};

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A kernel-like tree: directories four levels deep, 14 entries per directory, names of
/// 8 to 20 characters.
fn tree(n: usize) -> Vec<(RelPath, Entry)> {
    let mut out = vec![(RelPath::root(), Entry::Dir)];
    let mut dirs = vec![RelPath::root()];
    let mut next = 0usize;
    while out.len() < n {
        let dir = dirs[next % dirs.len()].clone();
        next += 1;
        for i in 0..14 {
            if out.len() >= n {
                break;
            }
            let name = format!(
                "{}_{:x}{}",
                ["drivers", "net", "fs", "include"][i % 4],
                out.len(),
                "x".repeat(i % 9)
            );
            let path = dir.join(&name).expect("valid name");
            if i == 0 && dir.depth() < 4 {
                dirs.push(path.clone());
                out.push((path, Entry::Dir));
            } else {
                let n = out.len() as u64;
                out.push((
                    path,
                    Entry::File {
                        size: n % 40_000,
                        exec: false,
                        hash: content_hash(&n.to_le_bytes()),
                    },
                ));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

// A benchmark is a shell: it reads the wall clock to report figures.
#[allow(clippy::disallowed_methods)]
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ENTRIES must be a number"))
        .unwrap_or(1_000_000);
    let base = rss();
    let entries = tree(n);
    let alpha = Snapshot::from_entries(entries.iter().cloned()).expect("a valid tree");
    let cache = HashCache::from_entries(entries.iter().filter_map(|(p, e)| match e {
        Entry::File { size, hash, .. } => Some((
            p.clone(),
            CacheEntry {
                size: *size,
                mtime_ns: 1_700_000_000_000_000_000,
                inode: *size,
                mode: 0o100644,
                hash: *hash,
            },
        )),
        _ => None,
    }));
    let scan = ScanOutput {
        snapshot: alpha,
        cache,
        ..ScanOutput::default()
    };
    drop(entries);
    let after_alpha = rss();
    // The workspace's tree arrives over the wire: its own allocations, as decoding makes them.
    let beta = Snapshot::from_entries(
        scan.snapshot
            .iter()
            .map(|(p, e)| (RelPath::parse(p.as_str()).expect("valid"), e.clone())),
    )
    .expect("a valid tree");
    // The ancestor is built from the sides' entries, sharing their paths.
    let ancestor = scan.snapshot.clone();
    let total = rss() - base;
    let t = Instant::now();
    let plan = reconcile(&ancestor, &scan.snapshot, &beta, Mode::TwoWaySafe).expect("no halt");
    let reconcile_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(plan.is_empty());
    let t = Instant::now();
    let changes = ancestor.changes_to(&beta);
    let changes_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(changes.is_empty());
    println!(
        "{n} entries: local scan with hash cache {:.0} B/entry; with the workspace's tree and the ancestor {:.0} B/entry, {:.0} MiB in all",
        (after_alpha - base) as f64 / n as f64,
        total as f64 / n as f64,
        total as f64 / f64::from(1 << 20)
    );
    println!("reconcile (nothing to do) {reconcile_ms:.1} ms; changes between two trees {changes_ms:.1} ms");
}
