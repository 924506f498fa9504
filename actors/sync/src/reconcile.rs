//! Three-way reconciliation: from the last agreed tree (the ancestor) and fresh scans of both
//! sides (alpha = laptop, beta = workspace), decide what to change on each side, what is a
//! conflict and what must halt the session. Pure: no IO, no clock; the same inputs give the
//! same plan, in the same order.
//!
//! The semantics are Mutagen's (`pkg/synchronization/core/reconcile.go`), re-derived on a flat
//! [`Snapshot`]:
//!
//! - Where alpha and beta agree on a path, nothing moves; the ancestor is updated to match.
//!   So identical edits on both sides are never conflicts.
//! - Where only one side changed a subtree relative to the ancestor, that side wins.
//! - Where both changed it: if both only deleted, the fuller deletion wins; if one only
//!   deleted and the other created or edited, **the edit wins** and is propagated back whole
//!   (a directory deleted on one side and edited on the other is recreated with its new
//!   content). Otherwise: `TwoWaySafe` reports a [`Conflict`] and **leaves both sides
//!   untouched** (like Mutagen, no conflict copies are written: the user resolves by deleting
//!   the losing version, which then counts as a deletion and the edit wins); `TwoWayResolved`
//!   lets alpha win.
//! - `OneWaySafe`: alpha to beta; beta content that was created or edited and not deleted on
//!   alpha is never overwritten (a conflict), beta-only creations are left in place and
//!   dropped from the ancestor. `OneWayReplica`: beta becomes alpha.
//! - A symlink that is not portable ([`crate::symlink`]) or an [`Entry::Problem`] from the
//!   scan (unreadable, special file) is a [`Problem`]: nothing is done at its path (it is
//!   never taken for a deletion), it is never created elsewhere, and a change that would
//!   delete or overwrite it is a conflict (content sync cannot restore).
//!
//! Safety halts (Mutagen's `safety.go`), returned as `Err(Halt)` instead of a plan:
//! - a side whose root is missing while the ancestor had a root, if that deletion would
//!   propagate (in one-way modes only alpha's can);
//! - a side whose root became empty while the ancestor had at least
//!   [`ROOT_EMPTIED_TOP_LEVEL_MIN`] top-level entries and the other side still has content,
//!   if that wipe would propagate (so one-way-replica with a full alpha and an emptied beta
//!   just refills beta);
//! - any plan that would delete a root (e.g. one-way-replica from a missing alpha).
//!
//! Ancestor update: the plan carries the ancestor updates for paths where the sides already
//! agree, and the ops. [`ancestor_after`] applies those updates plus the effect of each op
//! the caller reports as applied. A failed op leaves its path's ancestor as it was, so the
//! next cycle sees the same disagreement again (never a silent loss, at worst a conflict).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::path::RelPath;
use crate::symlink::{check_portable, SymlinkError};
use crate::tree::{Change, Entry, Snapshot, SnapshotError};

/// An emptied root halts sync only if the ancestor had at least this many top-level entries
/// (Mutagen's threshold: deleting the only file of a one-file tree is an ordinary edit).
pub const ROOT_EMPTIED_TOP_LEVEL_MIN: usize = 2;

/// How changes flow between alpha (the laptop) and beta (the workspace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Both ways; a change is never overwritten by another it has not seen: such paths are
    /// conflicts, left untouched on both sides.
    #[default]
    TwoWaySafe,
    /// Both ways; alpha wins every conflict.
    TwoWayResolved,
    /// Alpha to beta; beta's own creations and edits are never overwritten or deleted.
    OneWaySafe,
    /// Alpha to beta; beta becomes an exact copy of alpha.
    OneWayReplica,
}

impl Mode {
    /// Whether changes flow only from alpha to beta.
    pub fn is_one_way(self) -> bool {
        matches!(self, Mode::OneWaySafe | Mode::OneWayReplica)
    }
}

/// One endpoint of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Side {
    Alpha,
    Beta,
}

impl Side {
    /// The other endpoint.
    pub fn other(self) -> Side {
        match self {
            Side::Alpha => Side::Beta,
            Side::Beta => Side::Alpha,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Alpha => "alpha",
            Side::Beta => "beta",
        })
    }
}

/// One change to one side. Ops that replace or delete carry `expected`, the entry the last
/// scan saw there: the shell re-checks it right before acting and refuses if it differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create `entry` where nothing exists (files need content with `entry`'s hash).
    Create { path: RelPath, entry: Entry },
    /// Replace a file or symlink by another file or symlink (never a directory). A file
    /// replaced by a file with the same hash is an executable-bit change.
    Replace {
        path: RelPath,
        expected: Entry,
        entry: Entry,
    },
    /// Delete `expected` (a directory only once empty: its children come first).
    Delete { path: RelPath, expected: Entry },
}

impl Op {
    /// The path this op acts on.
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Create { path, .. } | Op::Replace { path, .. } | Op::Delete { path, .. } => path,
        }
    }

    /// What exists at the path after the op.
    pub fn result(&self) -> Option<&Entry> {
        match self {
            Op::Create { entry, .. } | Op::Replace { entry, .. } => Some(entry),
            Op::Delete { .. } => None,
        }
    }
}

/// An update to the ancestor at a path where both sides already agree (`None`: both lack it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AncestorUpdate {
    pub path: RelPath,
    pub entry: Option<Entry>,
}

/// Why a path is a conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConflictReason {
    /// Both sides created or edited content in this subtree (two-way-safe).
    BothModified,
    /// Beta created or edited content that alpha's version would overwrite (one-way-safe).
    BetaModified,
    /// The side that would be changed holds content sync cannot represent (a non-portable
    /// symlink) in this subtree.
    Unsynchronizable(Side),
}

/// A subtree left untouched on both sides until the user resolves it (by deleting the
/// version they do not want).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub path: RelPath,
    pub reason: ConflictReason,
    pub ancestor: Option<Entry>,
    pub alpha: Option<Entry>,
    pub beta: Option<Entry>,
}

/// Why content is reported and never propagated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProblemReason {
    /// A symlink that is not portable.
    #[error(transparent)]
    Symlink(#[from] SymlinkError),
    /// An [`Entry::Problem`] from the scan.
    #[error("{0}")]
    Scan(String),
}

/// Content that is reported and never propagated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub side: Side,
    pub path: RelPath,
    pub reason: ProblemReason,
}

/// What one reconciliation decided.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Ops for alpha, in order: within a subtree deletions bottom-up, then creations top-down.
    pub to_alpha: Vec<Op>,
    /// Ops for beta, same order.
    pub to_beta: Vec<Op>,
    /// Ancestor updates where the sides agree; apply them whatever the ops' fate.
    pub ancestor_updates: Vec<AncestorUpdate>,
    pub conflicts: Vec<Conflict>,
    pub problems: Vec<Problem>,
}

impl Plan {
    /// Whether there is nothing to do (conflicts and problems may remain).
    pub fn is_empty(&self) -> bool {
        self.to_alpha.is_empty() && self.to_beta.is_empty() && self.ancestor_updates.is_empty()
    }

    /// The ops for one side.
    pub fn ops(&self, side: Side) -> &[Op] {
        match side {
            Side::Alpha => &self.to_alpha,
            Side::Beta => &self.to_beta,
        }
    }

    /// Every path this plan decides something at: its ops, ancestor updates, conflicts and
    /// problems. The paths a session reconciles again next cycle (with what its scans
    /// report changed, they make the dirty set of [`reconcile_dirty`]).
    pub fn paths(&self) -> BTreeSet<RelPath> {
        let ops = self.to_alpha.iter().chain(&self.to_beta).map(Op::path);
        ops.chain(self.ancestor_updates.iter().map(|u| &u.path))
            .chain(self.conflicts.iter().map(|c| &c.path))
            .chain(self.problems.iter().map(|p| &p.path))
            .cloned()
            .collect()
    }

    /// An [`Applied`] that says every op succeeded.
    pub fn all_applied(&self) -> Applied {
        Applied {
            to_alpha: vec![true; self.to_alpha.len()],
            to_beta: vec![true; self.to_beta.len()],
        }
    }
}

/// Which ops of a plan the shell applied successfully, by index (a missing index counts as
/// failed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub to_alpha: Vec<bool>,
    pub to_beta: Vec<bool>,
}

/// Why a side's wipe was not propagated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaltReason {
    /// The root directory no longer exists.
    RootDeleted,
    /// The root is empty, though the ancestor had this many top-level entries.
    RootEmptied { ancestor_top_level: usize },
}

/// Sync stopped instead of propagating a wipe. Check that side's root (a container restart,
/// an unmounted volume), then restore it or reset the session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("sync halted: {side} root {}", match reason {
    HaltReason::RootDeleted => "was deleted".to_owned(),
    HaltReason::RootEmptied { ancestor_top_level } =>
        format!("was emptied (it had {ancestor_top_level} top-level entries)"),
})]
pub struct Halt {
    pub side: Side,
    pub reason: HaltReason,
}

/// Reconciles `alpha` and `beta` against their last agreed state `ancestor`.
pub fn reconcile(
    ancestor: &Snapshot,
    alpha: &Snapshot,
    beta: &Snapshot,
    mode: Mode,
) -> Result<Plan, Halt> {
    reconcile_from(ancestor, alpha, beta, mode, vec![RelPath::root()])
}

/// [`reconcile`] around the paths in `dirty` only: the work is proportional to the change,
/// not to the tree. It gives exactly the plan `reconcile` gives, provided `dirty` holds every
/// path at which the three trees do not hold the same entry and every problem entry
/// (unreadable, special, non-portable symlink) of alpha or beta. What a session does between
/// full rescans: the paths its scans reported changed, plus those the last plan left
/// unsettled.
///
/// Under that condition a path outside the subtrees of the dirty paths agrees on all three
/// trees (so the full walk finds nothing to do there), and a dirty path's ancestors are
/// clean directories the walk descends through, or themselves dirty: walking the subtree of
/// each dirty path that is not below another visits what the full walk visits there.
pub fn reconcile_dirty(
    ancestor: &Snapshot,
    alpha: &Snapshot,
    beta: &Snapshot,
    mode: Mode,
    dirty: &BTreeSet<RelPath>,
) -> Result<Plan, Halt> {
    // In component order a subtree is one run: a path below an earlier point follows it.
    let mut points: Vec<RelPath> = Vec::new();
    for path in dirty {
        if !points.last().is_some_and(|last| path.starts_with(last)) {
            points.push(path.clone());
        }
    }
    reconcile_from(ancestor, alpha, beta, mode, points)
}

/// Reconciles the subtrees at `points` (disjoint, in component order), each one reached as
/// the full walk reaches it.
fn reconcile_from(
    ancestor: &Snapshot,
    alpha: &Snapshot,
    beta: &Snapshot,
    mode: Mode,
    points: Vec<RelPath>,
) -> Result<Plan, Halt> {
    check_wipe(ancestor, alpha, beta, mode)?;
    let mut problems = Vec::new();
    let alpha_problems = find_problems(alpha, Side::Alpha, &points, &mut problems);
    let beta_problems = find_problems(beta, Side::Beta, &points, &mut problems);
    let mut r = Reconciler {
        mode,
        ancestor,
        alpha,
        beta,
        alpha_problems,
        beta_problems,
        plan: Plan {
            problems,
            ..Plan::default()
        },
    };
    for point in &points {
        r.walk(point);
    }
    let plan = r.plan;
    for side in [Side::Alpha, Side::Beta] {
        let deletes_root = plan
            .ops(side)
            .iter()
            .any(|op| matches!(op, Op::Delete { path, .. } if path.is_root()));
        if deletes_root {
            return Err(Halt {
                side: side.other(),
                reason: HaltReason::RootDeleted,
            });
        }
    }
    Ok(plan)
}

/// The ancestor after the caller applied `plan`, `applied` saying which ops succeeded.
pub fn ancestor_after(ancestor: &Snapshot, plan: &Plan, applied: &Applied) -> Snapshot {
    let mut next = ancestor.clone();
    update_ancestor(&mut next, plan, applied);
    next
}

/// [`ancestor_after`] in place: what a session does, without copying the tree. Returns the
/// records it applied, in order: replaying them with [`replay_records`] on the same tree
/// gives the same result (a session journals them).
pub fn update_ancestor(next: &mut Snapshot, plan: &Plan, applied: &Applied) -> Vec<Change> {
    let mut records: Vec<Change> = plan
        .ancestor_updates
        .iter()
        .map(|u| (u.path.clone(), u.entry.clone()))
        .collect();
    for (ops, ok) in [
        (&plan.to_alpha, &applied.to_alpha),
        (&plan.to_beta, &applied.to_beta),
    ] {
        for (i, op) in ops.iter().enumerate() {
            if ok.get(i).copied().unwrap_or(false) {
                records.push((op.path().clone(), op.result().cloned()));
            }
        }
    }
    replay_records(next, &records);
    records
}

/// What a copy of a side's tree becomes when `op` was applied there: `path` holds the op's
/// result and nothing below it (a deleted or replaced directory's children went first); an
/// entry whose parent is missing is left out. Both ends of a sync stream patch the laptop's
/// copy of the workspace tree with it for every op the workspace reports applied, in the
/// same order, so that the two copies stay the same without a scan. Returns the paths it
/// touched.
pub fn record_applied(tree: &mut Snapshot, op: &Op) -> Vec<RelPath> {
    let path = op.path();
    let mut touched: Vec<RelPath> = tree
        .take_subtree(path)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    if let Some(e) = op.result() {
        // An error means the parent is missing: left out, on both ends alike.
        let _ = tree.insert(path.clone(), e.clone());
    }
    if touched.first() != Some(path) {
        touched.insert(0, path.clone());
    }
    touched
}

/// An op sent to a side whose outcome is not known yet: written down before it goes, so that
/// a session that loses the answer (a dropped connection, a crash) can tell afterwards from
/// what that side holds whether it was applied. Without it the ancestor keeps the old entry,
/// and a side that meanwhile went back to that old entry would look unchanged and lose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub path: RelPath,
    /// What the side held there when the op was planned.
    pub old: Option<Entry>,
    /// What it holds if the op was applied.
    pub new: Option<Entry>,
}

impl Intent {
    /// The intent of `op`, unless it involves a directory (which carries no content to
    /// lose, and whose children have intents of their own).
    pub fn of(op: &Op) -> Option<Intent> {
        let (old, new) = match op {
            Op::Create { entry, .. } => (None, Some(entry)),
            Op::Replace {
                expected, entry, ..
            } => (Some(expected), Some(entry)),
            Op::Delete { expected, .. } => (Some(expected), None),
        };
        if old.is_some_and(Entry::is_dir) || new.is_some_and(Entry::is_dir) {
            return None;
        }
        Some(Intent {
            path: op.path().clone(),
            old: old.cloned(),
            new: new.cloned(),
        })
    }

    /// The ancestor record that settles this intent, given what the side holds there now:
    /// the new entry if it holds that (applied), the old one if it holds that (not applied),
    /// else none at all (it changed since: both sides then count as changed there, so a
    /// difference is a conflict, never a silent overwrite).
    pub fn settle(&self, now: Option<&Entry>) -> Change {
        let entry = if now == self.new.as_ref() {
            self.new.clone()
        } else if now == self.old.as_ref() {
            self.old.clone()
        } else {
            None
        };
        (self.path.clone(), entry)
    }
}

/// Applies ancestor records as [`update_ancestor`] made them.
pub fn replay_records(ancestor: &mut Snapshot, records: &[Change]) {
    for (path, entry) in records {
        record(ancestor, path, entry.as_ref());
    }
}

/// Sets the ancestor at `path` to exactly what the side now holds there: `entry` and, for
/// now, nothing below it (the children's own updates and ops follow it in order). An entry
/// whose parent is not (yet) in the ancestor is left out: the next cycle finds both sides
/// agreeing on it and records it then.
fn record(ancestor: &mut Snapshot, path: &RelPath, entry: Option<&Entry>) {
    ancestor.remove(path);
    if let Some(e) = entry {
        // An error means the parent is missing or not a directory: left out, see above.
        let _ = ancestor.insert(path.clone(), e.clone());
    }
}

/// Why an op could not be applied to a [`Snapshot`] standing in for a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Something already exists where the op would create.
    #[error("{path} already exists as a {kind}")]
    Exists { path: RelPath, kind: &'static str },
    /// What is there differs from what the plan expected: it changed since the scan.
    #[error("{path} changed since the scan")]
    Changed { path: RelPath },
    /// The directory to delete still has children.
    #[error("directory {path} is not empty")]
    NotEmpty { path: RelPath },
    /// A replace involving a directory (directories are deleted and created instead).
    #[error("cannot replace {path}: a replace never involves a directory")]
    ReplaceDir { path: RelPath },
    /// An op that would write a problem entry (plans never contain one).
    #[error("cannot write a problem entry at {path}")]
    WriteProblem { path: RelPath },
    #[error(transparent)]
    Tree(#[from] SnapshotError),
}

/// Applies `op` to `tree` as a filesystem would, with the same re-checks as the real shell.
/// The reference model of the property tests and the simulation's in-memory filesystem.
pub fn apply_to_snapshot(tree: &mut Snapshot, op: &Op) -> Result<(), OpError> {
    if let Some(Entry::Problem { .. }) = op.result() {
        return Err(OpError::WriteProblem {
            path: op.path().clone(),
        });
    }
    match op {
        Op::Create { path, entry } => {
            if let Some(e) = tree.get(path) {
                return Err(OpError::Exists {
                    path: path.clone(),
                    kind: e.kind(),
                });
            }
            tree.insert(path.clone(), entry.clone())?;
        }
        Op::Replace {
            path,
            expected,
            entry,
        } => {
            if expected.is_dir() || entry.is_dir() {
                return Err(OpError::ReplaceDir { path: path.clone() });
            }
            if tree.get(path) != Some(expected) {
                return Err(OpError::Changed { path: path.clone() });
            }
            tree.insert(path.clone(), entry.clone())?;
        }
        Op::Delete { path, expected } => {
            if tree.get(path) != Some(expected) {
                return Err(OpError::Changed { path: path.clone() });
            }
            if tree.children(path).next().is_some() {
                return Err(OpError::NotEmpty { path: path.clone() });
            }
            tree.remove(path);
        }
    }
    Ok(())
}

fn check_wipe(
    ancestor: &Snapshot,
    alpha: &Snapshot,
    beta: &Snapshot,
    mode: Mode,
) -> Result<(), Halt> {
    for (side, this, other) in [(Side::Alpha, alpha, beta), (Side::Beta, beta, alpha)] {
        if side == Side::Beta && mode.is_one_way() {
            // Nothing flows from beta: its wipe is repaired, not propagated.
            continue;
        }
        if ancestor.has_root() && !this.has_root() && other.has_root() {
            return Err(Halt {
                side,
                reason: HaltReason::RootDeleted,
            });
        }
        // A root with no entries below it is the snapshot's only entry.
        if this.len() == 1 && other.len() > 1 {
            let ancestor_top_level = ancestor.top_level_count();
            if ancestor_top_level >= ROOT_EMPTIED_TOP_LEVEL_MIN {
                return Err(Halt {
                    side,
                    reason: HaltReason::RootEmptied { ancestor_top_level },
                });
            }
        }
    }
    Ok(())
}

/// The problem entries and non-portable symlinks of `snapshot` at and below `points`
/// (reported in `problems`), by path. Reconciliation treats them as absent and never acts on
/// them.
fn find_problems(
    snapshot: &Snapshot,
    side: Side,
    points: &[RelPath],
    problems: &mut Vec<Problem>,
) -> BTreeSet<RelPath> {
    let mut bad = BTreeSet::new();
    for point in points {
        for (path, entry) in snapshot.below(point) {
            let reason = match entry {
                Entry::Symlink { target } => match check_portable(path, target) {
                    Ok(()) => continue,
                    Err(e) => ProblemReason::Symlink(e),
                },
                Entry::Problem { reason } => ProblemReason::Scan(reason.clone()),
                Entry::Dir | Entry::File { .. } => continue,
            };
            problems.push(Problem {
                side,
                path: path.clone(),
                reason,
            });
            bad.insert(path.clone());
        }
    }
    bad
}

struct Reconciler<'a> {
    mode: Mode,
    ancestor: &'a Snapshot,
    alpha: &'a Snapshot,
    beta: &'a Snapshot,
    alpha_problems: BTreeSet<RelPath>,
    beta_problems: BTreeSet<RelPath>,
    plan: Plan,
}

impl<'a> Reconciler<'a> {
    /// Visits every path of the three trees at and below `point` top-down (one merge walk
    /// over their keys, which are in component order, so a parent comes before its children
    /// and a subtree is one run of keys), skipping the subtree below every path that was
    /// decided as a whole. The same visits as a recursion from `point` into every directory
    /// both sides agree on, in linear time and without recursion.
    fn walk(&mut self, point: &RelPath) {
        let (ancestor, alpha, beta): (&'a Snapshot, &'a Snapshot, &'a Snapshot) =
            (self.ancestor, self.alpha, self.beta);
        let mut heads =
            [ancestor.below(point), alpha.below(point), beta.below(point)].map(Iterator::peekable);
        let mut skip: Option<&'a RelPath> = None;
        loop {
            let Some(path) = heads
                .iter_mut()
                .filter_map(|h| h.peek().map(|(p, _)| *p))
                .min()
            else {
                return;
            };
            let [ancestor, alpha, beta] = heads
                .each_mut()
                .map(|h| h.next_if(|(p, _)| *p == path).map(|(_, e)| e));
            if let Some(s) = skip {
                if path.starts_with(s) {
                    continue;
                }
                skip = None;
            }
            if !self.visit(path, ancestor, alpha, beta) {
                skip = Some(path);
            }
        }
    }

    /// A side's tree and its problem paths.
    fn side(&self, side: Side) -> (&'a Snapshot, &BTreeSet<RelPath>) {
        match side {
            Side::Alpha => (self.alpha, &self.alpha_problems),
            Side::Beta => (self.beta, &self.beta_problems),
        }
    }

    /// A side's entry at `path`; a problem entry counts as none.
    fn get(&self, side: Side, path: &RelPath) -> Option<&'a Entry> {
        let (tree, bad) = self.side(side);
        match tree.get(path) {
            Some(_) if !bad.is_empty() && bad.contains(path) => None,
            e => e,
        }
    }

    /// A side's subtree at `path`, without its problem entries.
    fn sub<'s>(
        &'s self,
        side: Side,
        path: &RelPath,
    ) -> impl Iterator<Item = (&'a RelPath, &'a Entry)> + 's {
        let (tree, bad) = self.side(side);
        tree.subtree(path)
            .filter(move |(p, _)| bad.is_empty() || !bad.contains(*p))
    }

    /// Whether `side`'s subtree at `path` holds anything the ancestor does not (a creation
    /// or an edit, as opposed to only deletions).
    fn creates_or_edits(&self, side: Side, path: &RelPath) -> bool {
        self.sub(side, path)
            .any(|(p, e)| self.ancestor.get(p) != Some(e))
    }

    /// Whether `side`'s subtree at `path` is the ancestor's.
    fn unchanged(&self, side: Side, path: &RelPath) -> bool {
        self.ancestor.subtree(path).eq(self.sub(side, path))
    }

    /// Decides `path`, given its entries; returns whether its children are to be visited
    /// one by one (both sides agree that it is a directory).
    fn visit(
        &mut self,
        path: &RelPath,
        ancestor: Option<&Entry>,
        alpha: Option<&Entry>,
        beta: Option<&Entry>,
    ) -> bool {
        let problem = |set: &BTreeSet<RelPath>| !set.is_empty() && set.contains(path);
        if problem(&self.alpha_problems) || problem(&self.beta_problems) {
            // Already reported; nothing is known well enough here to act on.
            return false;
        }
        if alpha.is_none() && beta.is_none() {
            if ancestor.is_some() {
                self.update_ancestor(path, None);
            }
            return false;
        }
        if alpha == beta {
            if ancestor != alpha {
                self.update_ancestor(path, alpha.cloned());
            }
            return alpha.is_some_and(Entry::is_dir);
        }
        match self.mode {
            Mode::TwoWaySafe | Mode::TwoWayResolved => self.bidirectional(path),
            Mode::OneWaySafe => self.one_way_safe(path),
            Mode::OneWayReplica => self.propagate(Side::Beta, path),
        }
        false
    }

    fn bidirectional(&mut self, path: &RelPath) {
        if self.unchanged(Side::Beta, path) {
            return self.propagate(Side::Beta, path);
        }
        if self.unchanged(Side::Alpha, path) {
            return self.propagate(Side::Alpha, path);
        }
        let alpha_creates = self.creates_or_edits(Side::Alpha, path);
        let beta_creates = self.creates_or_edits(Side::Beta, path);
        match (alpha_creates, beta_creates) {
            // Both only deleted, one of them everything: the fuller deletion wins.
            (false, false) if self.get(Side::Alpha, path).is_none() => {
                self.propagate(Side::Beta, path)
            }
            (false, false) => self.propagate(Side::Alpha, path),
            // Canary (simulation only): the deletion wins, losing the edit.
            (true, false) if crate::canary::delete_wins() => self.propagate(Side::Alpha, path),
            (false, true) if crate::canary::delete_wins() => self.propagate(Side::Beta, path),
            // Deletion against an edit: the edit wins.
            (true, false) => self.propagate(Side::Beta, path),
            (false, true) => self.propagate(Side::Alpha, path),
            (true, true) if self.mode == Mode::TwoWayResolved => self.propagate(Side::Beta, path),
            (true, true) => self.conflict(path, ConflictReason::BothModified),
        }
    }

    fn one_way_safe(&mut self, path: &RelPath) {
        if !self.creates_or_edits(Side::Beta, path) {
            return self.propagate(Side::Beta, path);
        }
        let ancestor = self.ancestor.get(path);
        let beta_is_dir = self.get(Side::Beta, path).is_some_and(Entry::is_dir);
        let ancestor_is_dir = ancestor.is_some_and(Entry::is_dir);
        if self.get(Side::Alpha, path).is_none() && !(ancestor_is_dir && beta_is_dir) {
            // Beta's own content where alpha has nothing: leave it, stop tracking it.
            if ancestor.is_some() {
                self.update_ancestor(path, None);
            }
            return;
        }
        self.conflict(path, ConflictReason::BetaModified);
    }

    /// Makes `target`'s subtree at `path` equal to the other side's.
    fn propagate(&mut self, target: Side, path: &RelPath) {
        let blocked = self
            .side(target)
            .1
            .range(path.clone()..)
            .next()
            .is_some_and(|p| p.starts_with(path));
        if blocked {
            return self.conflict(path, ConflictReason::Unsynchronizable(target));
        }
        let owned = |(p, e): (&RelPath, &Entry)| (p.clone(), e.clone());
        let old_sub: BTreeMap<RelPath, Entry> = self.sub(target, path).map(owned).collect();
        let new_sub: BTreeMap<RelPath, Entry> = self.sub(target.other(), path).map(owned).collect();
        let mut ops = Vec::new();
        // Deletions first, children before parents.
        for (p, was) in old_sub.iter().rev() {
            let keep = match new_sub.get(p) {
                Some(now) => now == was || (!now.is_dir() && !was.is_dir()),
                None => false,
            };
            if !keep {
                ops.push(Op::Delete {
                    path: p.clone(),
                    expected: was.clone(),
                });
            }
        }
        // Then creations and replacements, parents before children.
        for (p, now) in &new_sub {
            match old_sub.get(p) {
                Some(was) if was == now => {}
                Some(was) if !was.is_dir() && !now.is_dir() => ops.push(Op::Replace {
                    path: p.clone(),
                    expected: was.clone(),
                    entry: now.clone(),
                }),
                _ => ops.push(Op::Create {
                    path: p.clone(),
                    entry: now.clone(),
                }),
            }
        }
        match target {
            Side::Alpha => self.plan.to_alpha.extend(ops),
            Side::Beta => self.plan.to_beta.extend(ops),
        }
    }

    fn conflict(&mut self, path: &RelPath, reason: ConflictReason) {
        self.plan.conflicts.push(Conflict {
            path: path.clone(),
            reason,
            ancestor: self.ancestor.get(path).cloned(),
            alpha: self.get(Side::Alpha, path).cloned(),
            beta: self.get(Side::Beta, path).cloned(),
        });
    }

    fn update_ancestor(&mut self, path: &RelPath, entry: Option<Entry>) {
        self.plan.ancestor_updates.push(AncestorUpdate {
            path: path.clone(),
            entry,
        });
    }
}

#[cfg(test)]
mod tests;
