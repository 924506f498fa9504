//! File sync with Mutagen's semantics: a deterministic core and two thin filesystem shells.
//!
//! Core (no IO, no clock, no threads; runs unchanged in the simulation):
//! - [`path`]: `RelPath`, a path inside a sync root, parsed once.
//! - [`tree`]: `Entry` and `Snapshot`, what a scan sees.
//! - [`reconcile`]: three-way reconciliation into a `Plan` of ops, conflicts and problems,
//!   or a `Halt`; and the ancestor after the plan was applied.
//! - [`symlink`]: which symlink targets are portable.
//! - [`ignore`]: gitignore-syntax ignores, VCS directories, nested `.gitignore` files.
//! - [`delta`]: rsync-style signatures, deltas and bounded patching.
//! - [`changes`]: which paths filesystem events say changed, or "rescan everything".
//!
//! Shells (real filesystem; never called from simulated code):
//! - [`scan`]: walk a root into a `Snapshot`, with a content-hash cache and parallel hashing.
//! - [`apply`]: apply one op to a root atomically, re-checking what it replaces or deletes.
//! - [`fs`]: `RootFs`, the seam the session and endpoint use (`OsRoot` here; the simulation
//!   has one in memory).

pub mod apply;
pub mod canary;
pub mod changes;
pub mod delta;
pub mod fs;
pub mod ignore;
pub mod path;
pub mod reconcile;
pub mod rsync;
pub mod rsync_fs;
pub mod scan;
pub mod symlink;
pub mod tree;

pub use path::{PathError, RelPath};
pub use reconcile::{
    ancestor_after, apply_to_snapshot, reconcile, reconcile_dirty, record_applied, replay_records,
    update_ancestor, Applied, Conflict, ConflictReason, Halt, HaltReason, Intent, Mode, Op, Plan,
    Problem, ProblemReason, Side,
};
pub use tree::{content_hash, Change, ContentHash, Entry, Snapshot, SnapshotError};
