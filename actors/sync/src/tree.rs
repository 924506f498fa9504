//! What a scan sees: `Entry` (one directory, file or symlink) and `Snapshot` (a whole tree
//! as a flat, ordered map). Snapshots are values: scanned, persisted as the ancestor, sent to
//! the peer, compared by the reconciler.
//!
//! **The root is stored explicitly**, under the empty path [`RelPath::root`]: an empty
//! snapshot means "the root does not exist", a snapshot holding only the root means "the root
//! is an empty directory". The reconciler needs that difference (a deleted root halts sync).
//! The root, when present, is always a directory.
//!
//! Invariant, checked on every insert and on deserialization (a peer's snapshot is untrusted):
//! every entry except the root has its parent in the map, and that parent is a `Dir`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::path::RelPath;

/// A blake3 digest of a file's contents.
pub type ContentHash = [u8; 32];

/// Hashes file contents the way every snapshot does (blake3, 32 bytes).
pub fn content_hash(data: &[u8]) -> ContentHash {
    *blake3::hash(data).as_bytes()
}

/// One filesystem object. Directories carry no content here: their children are the
/// entries below them in the [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    Dir,
    File {
        size: u64,
        /// Any executable bit set (the only permission sync carries, as in Mutagen's
        /// portable mode).
        exec: bool,
        hash: ContentHash,
    },
    /// Recorded, never followed. The target is kept verbatim; see `symlink` for which
    /// targets sync accepts.
    Symlink {
        target: String,
    },
    /// Something a scan found but cannot represent (unreadable, a socket or device, changed
    /// while being hashed). The reconciler never propagates it, never overwrites or deletes
    /// it, and never records it in an ancestor; it only reports it.
    Problem {
        reason: String,
    },
}

impl Entry {
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self, Entry::Dir)
    }

    /// A short lowercase name of the kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Dir => "directory",
            Entry::File { .. } => "file",
            Entry::Symlink { .. } => "symlink",
            Entry::Problem { .. } => "problem entry",
        }
    }
}

/// Why an entry cannot go into a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The root must be a directory (sync roots are directories).
    #[error("the root must be a directory, not a {0}")]
    RootNotDir(&'static str),
    /// An entry was added below a parent that is not in the snapshot: add the parent first.
    #[error("parent of {0} is missing")]
    ParentMissing(RelPath),
    /// An entry was added below a file or symlink.
    #[error("parent of {path} is a {kind}, not a directory")]
    ParentNotDir { path: RelPath, kind: &'static str },
}

/// One entry's change between two snapshots: its new entry, or `None` where it went.
pub type Change = (RelPath, Option<Entry>);

/// Appends to `out` what turns the entries `old` into `new` (both in component order).
pub fn merge_changes<'a>(
    old: impl Iterator<Item = (&'a RelPath, &'a Entry)>,
    new: impl Iterator<Item = (&'a RelPath, &'a Entry)>,
    out: &mut Vec<Change>,
) {
    let (mut old, mut new) = (old.peekable(), new.peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((po, _)), Some((pn, _))) => po.cmp(pn),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (p, _) = old.next().expect("peeked");
                out.push((p.clone(), None));
            }
            std::cmp::Ordering::Greater => {
                let (p, e) = new.next().expect("peeked");
                out.push((p.clone(), Some(e.clone())));
            }
            std::cmp::Ordering::Equal => {
                let ((_, eo), (p, en)) = (old.next().expect("peeked"), new.next().expect("peeked"));
                if eo != en {
                    out.push((p.clone(), Some(en.clone())));
                }
            }
        }
    }
}

/// A whole tree: path to entry, in component order (parents before children).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<RelPath, Entry>",
    into = "BTreeMap<RelPath, Entry>"
)]
pub struct Snapshot {
    entries: BTreeMap<RelPath, Entry>,
}

impl Snapshot {
    /// A snapshot whose root does not exist.
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot whose root is an empty directory.
    pub fn with_root() -> Self {
        let mut entries = BTreeMap::new();
        entries.insert(RelPath::root(), Entry::Dir);
        Snapshot { entries }
    }

    /// Builds a snapshot from entries in any order, checking the tree invariant.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (RelPath, Entry)>,
    ) -> Result<Self, SnapshotError> {
        let map: BTreeMap<RelPath, Entry> = entries.into_iter().collect();
        Self::try_from(map)
    }

    /// Adds or replaces one entry. Replacing a directory by a non-directory drops the old
    /// subtree; replacing a directory by a directory keeps it.
    pub fn insert(&mut self, path: RelPath, entry: Entry) -> Result<(), SnapshotError> {
        self.check_parent(&path, &entry)?;
        if !entry.is_dir() {
            self.remove(&path);
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Removes `path` and everything below it; returns how many entries went.
    pub fn remove(&mut self, path: &RelPath) -> usize {
        let doomed: Vec<RelPath> = self.subtree(path).map(|(p, _)| p.clone()).collect();
        for p in &doomed {
            self.entries.remove(p);
        }
        doomed.len()
    }

    /// The entry at `path`.
    pub fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Whether the root exists.
    pub fn has_root(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the root does not exist (no entries at all).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All entries in component order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&RelPath, &Entry)> {
        self.entries.iter()
    }

    /// `path` itself (if present) and everything below it, in component order.
    pub fn subtree(
        &self,
        path: &RelPath,
    ) -> std::collections::btree_map::Range<'_, RelPath, Entry> {
        // Component order makes a subtree one contiguous range starting at `path`.
        let end = self
            .entries
            .range(path.clone()..)
            .find(|(p, _)| !p.starts_with(path))
            .map(|(p, _)| p.clone());
        match end {
            Some(end) => self.entries.range(path.clone()..end),
            None => self.entries.range(path.clone()..),
        }
    }

    /// `path` itself (if present) and everything below it, in component order, found as it
    /// goes (where [`Snapshot::subtree`] first looks for the subtree's end).
    pub fn below(&self, path: &RelPath) -> impl Iterator<Item = (&RelPath, &Entry)> {
        let path = path.clone();
        self.entries
            .range(path.clone()..)
            .take_while(move |(p, _)| p.starts_with(&path))
    }

    /// The immediate children of `path`, in order.
    pub fn children<'s>(&'s self, path: &RelPath) -> impl Iterator<Item = &'s RelPath> + 's {
        let depth = path.depth() + 1;
        self.subtree(path)
            .map(|(p, _)| p)
            .filter(move |p| p.depth() == depth)
    }

    /// Number of entries directly in the root.
    pub fn top_level_count(&self) -> usize {
        let root = RelPath::root();
        self.children(&root).count()
    }

    /// Whether the two snapshots hold the same entries at and below `path`.
    pub fn subtree_eq(&self, other: &Snapshot, path: &RelPath) -> bool {
        self.subtree(path).eq(other.subtree(path))
    }

    /// The subtree at `path` as its own map (empty if `path` is absent).
    pub fn subtree_map(&self, path: &RelPath) -> BTreeMap<RelPath, Entry> {
        self.subtree(path)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }

    /// What turns `self` into `newer`, entry by entry, in component order: each path whose
    /// entry differs, with its new entry or `None` where `newer` has none. One merge walk.
    pub fn changes_to(&self, newer: &Snapshot) -> Vec<Change> {
        let mut out = Vec::new();
        merge_changes(self.entries.iter(), newer.entries.iter(), &mut out);
        out
    }

    /// Removes `path` and everything below it, returning them in order.
    pub fn take_subtree(&mut self, path: &RelPath) -> Vec<(RelPath, Entry)> {
        let keys: Vec<RelPath> = self.subtree(path).map(|(p, _)| p.clone()).collect();
        keys.into_iter()
            .filter_map(|k| self.entries.remove_entry(&k))
            .collect()
    }

    /// Applies changes as [`Snapshot::changes_to`] makes them, then checks the tree invariant
    /// around every changed path (its parent, and children left under a path that is no
    /// longer a directory). The changes come from a peer, so they are untrusted: on an error
    /// the snapshot is left half-changed and must be thrown away.
    pub fn apply_changes(&mut self, changes: Vec<Change>) -> Result<(), SnapshotError> {
        let mut touched = Vec::with_capacity(changes.len());
        for (path, entry) in changes {
            match entry {
                Some(e) => {
                    self.entries.insert(path.clone(), e);
                }
                None => {
                    self.entries.remove(&path);
                }
            }
            touched.push(path);
        }
        for path in &touched {
            if let Some(entry) = self.entries.get(path) {
                self.check_parent(path, entry)?;
            }
            if self.entries.get(path).is_some_and(Entry::is_dir) {
                continue;
            }
            // Not a directory (or gone): nothing may remain below it.
            use std::ops::Bound::{Excluded, Unbounded};
            if let Some((child, _)) = self.entries.range((Excluded(path), Unbounded)).next() {
                if child.starts_with(path) {
                    return Err(match self.entries.get(path) {
                        None => SnapshotError::ParentMissing(child.clone()),
                        Some(e) => SnapshotError::ParentNotDir {
                            path: child.clone(),
                            kind: e.kind(),
                        },
                    });
                }
            }
        }
        Ok(())
    }

    fn check_parent(&self, path: &RelPath, entry: &Entry) -> Result<(), SnapshotError> {
        match path.parent() {
            None if entry.is_dir() => Ok(()),
            None => Err(SnapshotError::RootNotDir(entry.kind())),
            Some(parent) => match self.entries.get(&parent) {
                None => Err(SnapshotError::ParentMissing(path.clone())),
                Some(Entry::Dir) => Ok(()),
                Some(other) => Err(SnapshotError::ParentNotDir {
                    path: path.clone(),
                    kind: other.kind(),
                }),
            },
        }
    }
}

impl TryFrom<BTreeMap<RelPath, Entry>> for Snapshot {
    type Error = SnapshotError;
    fn try_from(entries: BTreeMap<RelPath, Entry>) -> Result<Self, SnapshotError> {
        let snapshot = Snapshot { entries };
        // Parents sort before children, so one pass in order checks every entry against a
        // parent that was itself already checked.
        for (path, entry) in &snapshot.entries {
            snapshot.check_parent(path, entry)?;
        }
        Ok(snapshot)
    }
}

impl From<Snapshot> for BTreeMap<RelPath, Entry> {
    fn from(s: Snapshot) -> Self {
        s.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    fn file(n: u8) -> Entry {
        Entry::File {
            size: 1,
            exec: false,
            hash: content_hash(&[n]),
        }
    }

    /// Builds a snapshot from `(path, kind)` pairs where kind is `d`, `f` or `l`.
    fn check(entries: &[(&str, char)], expect: Result<usize, &str>) {
        let built = Snapshot::from_entries(entries.iter().map(|(s, k)| {
            let e = match k {
                'd' => Entry::Dir,
                'f' => file(0),
                _ => Entry::Symlink { target: "x".into() },
            };
            (p(s), e)
        }));
        match (built, expect) {
            (Ok(s), Ok(n)) => assert_eq!(s.len(), n, "{entries:?}"),
            (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{entries:?}: {e}"),
            (got, want) => panic!("{entries:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn invariant_table() {
        check(&[], Ok(0));
        check(&[("", 'd')], Ok(1));
        check(&[("", 'd'), ("a", 'd'), ("a/b", 'f'), ("c", 'l')], Ok(4));
        check(&[("", 'f')], Err("root must be a directory, not a file"));
        check(&[("a", 'f')], Err("parent of a is missing"));
        check(&[("", 'd'), ("a/b", 'f')], Err("parent of a/b is missing"));
        check(
            &[("", 'd'), ("a", 'f'), ("a/b", 'f')],
            Err("parent of a/b is a file"),
        );
        check(
            &[("", 'd'), ("l", 'l'), ("l/x", 'd')],
            Err("parent of l/x is a symlink"),
        );
    }

    #[test]
    fn subtree_and_children() {
        let s = Snapshot::from_entries([
            (p(""), Entry::Dir),
            (p("a"), Entry::Dir),
            (p("a/b"), Entry::Dir),
            (p("a/b/c"), file(1)),
            (p("a/d"), file(2)),
            (p("a-x"), file(3)),
            (p("b"), file(4)),
        ])
        .unwrap();
        let sub: Vec<&str> = s.subtree(&p("a")).map(|(p, _)| p.as_str()).collect();
        assert_eq!(sub, ["a", "a/b", "a/b/c", "a/d"]);
        let kids: Vec<&str> = s.children(&p("a")).map(|p| p.as_str()).collect();
        assert_eq!(kids, ["a/b", "a/d"]);
        assert_eq!(s.top_level_count(), 3);
        assert_eq!(s.subtree(&p("zz")).count(), 0);

        let mut t = s.clone();
        assert_eq!(t.remove(&p("a")), 4);
        assert!(!t.subtree_eq(&s, &p("a")));
        assert!(t.subtree_eq(&s, &p("b")));
        // Replacing a directory by a file drops its subtree.
        let mut u = s.clone();
        u.insert(p("a"), file(9)).unwrap();
        assert_eq!(u.subtree(&p("a")).count(), 1);
    }

    #[test]
    fn changes_carry_one_snapshot_to_another_and_bad_ones_are_refused() {
        let a = Snapshot::from_entries([
            (p(""), Entry::Dir),
            (p("a"), Entry::Dir),
            (p("a/b"), file(1)),
            (p("a/c"), file(2)),
            (p("d"), file(3)),
        ])
        .unwrap();
        let b = Snapshot::from_entries([
            (p(""), Entry::Dir),
            (p("a"), file(4)),
            (p("d"), Entry::Dir),
            (p("d/e"), file(5)),
            (p("f"), Entry::Symlink { target: "d".into() }),
        ])
        .unwrap();
        for (from, to) in [
            (&a, &b),
            (&b, &a),
            (&a, &Snapshot::new()),
            (&Snapshot::new(), &b),
        ] {
            let mut x = from.clone();
            x.apply_changes(from.changes_to(to)).unwrap();
            assert_eq!(&x, to);
        }
        assert!(a.changes_to(&a).is_empty());
        // A peer's changes that would break the tree: a child left under a file, an orphan.
        let mut x = a.clone();
        let err = x.apply_changes(vec![(p("a"), Some(file(9)))]).unwrap_err();
        assert!(err.to_string().contains("parent of a/b is a file"), "{err}");
        let mut x = a.clone();
        let err = x.apply_changes(vec![(p("a"), None)]).unwrap_err();
        assert!(
            err.to_string().contains("parent of a/b is missing"),
            "{err}"
        );
        let mut x = a.clone();
        let err = x
            .apply_changes(vec![(p("q/r"), Some(file(1)))])
            .unwrap_err();
        assert!(
            err.to_string().contains("parent of q/r is missing"),
            "{err}"
        );
    }

    #[test]
    fn serde_round_trip_checks_invariant() {
        let good = Snapshot::from_entries([(p(""), Entry::Dir), (p("a"), file(1))]).unwrap();
        let json = serde_json::to_string(&good).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), good);
        let bad = r#"{"x/y":{"Symlink":{"target":"t"}}}"#;
        let err = serde_json::from_str::<Snapshot>(bad).unwrap_err();
        assert!(
            err.to_string().contains("parent of x/y is missing"),
            "{err}"
        );
        let escaping = r#"{"":"Dir","../y":"Dir"}"#;
        let err = serde_json::from_str::<Snapshot>(escaping).unwrap_err();
        assert!(err.to_string().contains("\"..\" component"), "{err}");
    }
}
