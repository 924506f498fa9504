//! Continuous sync sessions (`cs sync`, `cs mutagen`): their specs, status and the commands
//! that drive them. Sessions live in the laptop daemon ([`hub::SyncHub`]); each runs the loop
//! of [`session`]: scan both sides, reconcile against the ancestor, move what changed, wait for
//! the next change.

pub mod commands;
pub mod hub;
pub mod session;

use std::path::PathBuf;

use cs_protocol::sync::IgnoreSpec;
use cs_sync::Mode;
use serde::{Deserialize, Serialize};

/// Sessions one daemon runs at most.
pub const SESSIONS_MAX: usize = 64;

/// What a session syncs, as created; persisted by the daemon so sessions outlive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSpec {
    pub name: String,
    /// Alpha: an absolute directory on this laptop.
    pub local: PathBuf,
    /// Beta: `SANDBOX/WORKSPACE`.
    pub workspace: String,
    /// Beta's root in the workspace: relative to its home, or `~/...`.
    pub remote: String,
    pub mode: Mode,
    pub ignore: IgnoreSpec,
    /// A side with more entries than this halts the session (`--max-entry-count`).
    #[serde(default = "default_entry_count_max")]
    pub max_entry_count: u64,
    pub paused: bool,
}

/// Default `--max-entry-count`: a million entries (a session's state for that many fits in
/// well under 1 GB; see the README's benchmark).
pub const ENTRY_COUNT_MAX_DEFAULT: u64 = 1_000_000;
/// Default `--max-file-size`: 16 GiB.
pub const FILE_SIZE_MAX_DEFAULT: u64 = 16 << 30;

fn default_entry_count_max() -> u64 {
    ENTRY_COUNT_MAX_DEFAULT
}

impl SyncStatus {
    /// Counts one file of the cycle's transfer as done.
    pub fn advance(&mut self, op: &cs_sync::Op) {
        if let (Some(p), Some(cs_sync::Entry::File { size, .. })) =
            (&mut self.progress, op.result())
        {
            p.files_done += 1;
            p.bytes_done += size;
        }
    }
}

impl SyncSpec {
    /// `SANDBOX/WORKSPACE:PATH`, as the user wrote it.
    pub fn beta(&self) -> String {
        format!("{}:{}", self.workspace, self.remote)
    }
}

/// A session's state, as `cs sync list` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub name: String,
    pub alpha: String,
    pub beta: String,
    pub mode: String,
    /// connecting, scanning, reconciling, transferring, watching, paused, halted, error.
    pub state: String,
    /// Sync cycles completed.
    pub cycles: u64,
    /// Of those, the ones that reconciled only around what changed (the others walked the
    /// whole tree: the first after a start or reconnection, after a full rescan or a failed
    /// cycle).
    pub cycles_dirty: u64,
    pub conflicts: usize,
    pub problems: usize,
    pub last_error: Option<String>,
    /// Why the session halted instead of propagating a wipe (`cs sync resume` after checking).
    pub halted: Option<String>,
    pub files_to_beta: u64,
    pub files_to_alpha: u64,
    pub bytes_to_beta: u64,
    pub bytes_to_alpha: u64,
    /// Entries in the last agreed tree.
    pub entries: usize,
    /// The content the current cycle moves, while it moves it.
    pub progress: Option<Progress>,
    /// Large files on their way on streams of their own, and how many made it so far.
    pub bulk_in_flight: usize,
    pub files_bulk: u64,
    /// Content chunks that moved packed (zstd), both ways: only over a distant link.
    #[serde(default)]
    pub chunks_packed: u64,
}

/// How far a cycle's transfer is: files with content (both ways) and their sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// One conflict, as `cs sync conflicts` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictView {
    pub path: String,
    pub reason: String,
    pub ancestor: String,
    pub alpha: String,
    pub beta: String,
}

impl ConflictView {
    pub fn of(c: &cs_sync::Conflict) -> Self {
        let show = |e: &Option<cs_sync::Entry>| match e {
            None => "absent".to_string(),
            Some(cs_sync::Entry::Dir) => "directory".to_string(),
            Some(cs_sync::Entry::Symlink { target }) => format!("symlink -> {target}"),
            Some(cs_sync::Entry::Problem { reason }) => format!("unsyncable: {reason}"),
            Some(cs_sync::Entry::File { size, exec, hash }) => format!(
                "file {size} bytes{} blake3:{}",
                if *exec { " executable" } else { "" },
                cs_sync::delta::short_hex(hash)
            ),
        };
        Self {
            path: c.path.to_string(),
            reason: format!("{:?}", c.reason),
            ancestor: show(&c.ancestor),
            alpha: show(&c.alpha),
            beta: show(&c.beta),
        }
    }
}

/// Parses a mode as Mutagen spells it.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "two-way-safe" => Ok(Mode::TwoWaySafe),
        "two-way-resolved" => Ok(Mode::TwoWayResolved),
        "one-way-safe" => Ok(Mode::OneWaySafe),
        "one-way-replica" => Ok(Mode::OneWayReplica),
        other => Err(format!(
            "unknown sync mode '{other}': expected two-way-safe, two-way-resolved, one-way-safe or one-way-replica"
        )),
    }
}

/// A mode as Mutagen spells it.
pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::TwoWaySafe => "two-way-safe",
        Mode::TwoWayResolved => "two-way-resolved",
        Mode::OneWaySafe => "one-way-safe",
        Mode::OneWayReplica => "one-way-replica",
    }
}
