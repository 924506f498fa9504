//! What changed since the last scan, as filesystem events report it: the paths to rescan, or
//! "everything" when the events cannot be trusted to be complete (a queue overflow, a path
//! outside the root, too many paths). Pure bookkeeping; the watcher that feeds it is a shell.

use std::collections::BTreeSet;
use std::path::Path;

use crate::path::RelPath;

/// Paths remembered before a change set gives up and asks for a full scan.
pub const CHANGED_PATHS_MAX: usize = 4096;

/// Paths changed since the last [`ChangeSet::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSet {
    paths: BTreeSet<RelPath>,
    full: bool,
}

impl Default for ChangeSet {
    /// A new change set asks for a full scan: nothing was scanned yet.
    fn default() -> Self {
        Self {
            paths: BTreeSet::new(),
            full: true,
        }
    }
}

impl ChangeSet {
    /// Notes that `path` (absolute, as an event names it) changed under `root`.
    pub fn note(&mut self, root: &Path, path: &Path) {
        if self.full {
            return;
        }
        let rel = path
            .strip_prefix(root)
            .ok()
            .and_then(|p| p.to_str())
            .and_then(|p| RelPath::parse(p).ok());
        match rel {
            Some(r) if self.paths.len() < CHANGED_PATHS_MAX => {
                self.paths.insert(r);
            }
            _ => self.note_everything(),
        }
    }

    /// Notes that `path` (relative to the root) changed.
    pub fn note_rel(&mut self, path: RelPath) {
        if self.full {
            return;
        }
        if self.paths.len() < CHANGED_PATHS_MAX {
            self.paths.insert(path);
        } else {
            self.note_everything();
        }
    }

    /// Notes that anything may have changed (events were lost, or a periodic rescan is due).
    pub fn note_everything(&mut self) {
        self.full = true;
        self.paths.clear();
    }

    /// Whether nothing was noted.
    pub fn is_empty(&self) -> bool {
        !self.full && self.paths.is_empty()
    }

    /// The paths to rescan, or `None` for a full scan; starts a new, empty set.
    pub fn take(&mut self) -> Option<Vec<RelPath>> {
        let full = std::mem::replace(&mut self.full, false);
        let paths = std::mem::take(&mut self.paths);
        (!full).then(|| paths.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_kept_relative_and_anything_doubtful_asks_for_a_full_scan() {
        let root = Path::new("/r");
        let mut c = ChangeSet::default();
        assert_eq!(c.take(), None, "the first scan is full");
        assert!(c.is_empty());
        c.note(root, Path::new("/r/a/b.txt"));
        c.note(root, Path::new("/r/a/b.txt"));
        c.note(root, Path::new("/r/c"));
        let got: Vec<String> = c.take().unwrap().iter().map(|p| p.to_string()).collect();
        assert_eq!(got, ["a/b.txt", "c"]);
        assert_eq!(c.take(), Some(vec![]));
        c.note(root, Path::new("/elsewhere/x"));
        assert_eq!(c.take(), None);
        for i in 0..=CHANGED_PATHS_MAX {
            c.note(root, Path::new(&format!("/r/f{i}")));
        }
        assert_eq!(c.take(), None, "too many paths");
        c.note(root, Path::new("/r/x"));
        c.note_everything();
        assert_eq!(c.take(), None);
    }
}
