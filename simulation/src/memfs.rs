//! A sync root in memory, for the simulation: a [`Snapshot`] plus the content of its files,
//! implementing cs-sync's `RootFs` with the same re-checks as the real root (through the
//! core's `apply_to_snapshot`) and feeding its `Watch` on every change, as inotify would.
//! It lives outside the nodes, so it survives their crashes: it is the node's disk. What sync
//! applies is pending until the applying side calls `sync` (the real root: one `syncfs`
//! per batch, before the batch is reported applied); a crash of the node
//! ([`MemRoot::crash`]) loses pending applies, newest first. Users' own writes are durable,
//! and a user write to a path drops the pending apply there (it is superseded).
//!
//! The scenario's users edit it directly ([`MemRoot::user_write`] and friends); every user
//! action is logged for the checker.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

use cs_sync::fs::{RootFs, Watch};
use cs_sync::ignore::Ignorer;
use cs_sync::scan::ScanOutput;
use cs_sync::{apply_to_snapshot, ContentHash, Entry, Op, RelPath, Snapshot};

/// Largest file a simulated root holds.
pub const FILE_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Default)]
struct State {
    tree: Snapshot,
    contents: BTreeMap<ContentHash, Vec<u8>>,
    /// Applies not yet made durable: each path with what was there before, oldest first.
    pending: Vec<(RelPath, Option<Entry>)>,
    /// Pending applies a crash took back.
    lost: u64,
}

/// One root in memory.
#[derive(Debug, Default)]
pub struct MemRoot {
    name: String,
    state: Mutex<State>,
    /// Every watch handed out and still held: each stream (and each laptop session) gets a
    /// watcher of its own, as on a real root.
    watches: Mutex<Vec<Watch>>,
    disk: Mutex<Disk>,
}

/// Simulated disk faults: each write (`apply`) and read (`open`) fails with an I/O error
/// with probability `rate`, drawn from the seed. Scans do not fail: a root that cannot be
/// examined halts a session until the user resumes it, which a seed cannot do.
#[derive(Debug, Default)]
struct Disk {
    rng: Option<rand::rngs::StdRng>,
    rate: f64,
    errors: u64,
}

impl MemRoot {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            state: Mutex::default(),
            watches: Mutex::default(),
            disk: Mutex::default(),
        })
    }

    /// Makes reads and writes fail at `rate`, decided by a generator seeded with `seed`.
    pub fn set_disk_errors(&self, seed: u64, rate: f64) {
        use rand::SeedableRng;
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        d.rng = Some(rand::rngs::StdRng::seed_from_u64(seed));
        d.rate = rate;
    }

    /// How many reads and writes failed on purpose.
    pub fn disk_errors(&self) -> u64 {
        self.disk.lock().unwrap_or_else(|p| p.into_inner()).errors
    }

    /// `Err` when the simulated disk fails this operation.
    fn disk_op(&self, what: &str, path: &RelPath) -> Result<(), String> {
        use rand::Rng;
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let rate = d.rate;
        let fail = match d.rng.as_mut() {
            Some(rng) if rate > 0.0 => rng.gen_bool(rate),
            _ => false,
        };
        if fail {
            d.errors += 1;
            return Err(format!("{what} {path}: Input/output error (simulated)"));
        }
        Ok(())
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Poisoned only by a panic on this single thread; the seed fails anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new watcher of this root: it sees every change from now on.
    pub fn watch(&self) -> Watch {
        let w = Watch::default();
        let mut all = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| !w.abandoned());
        all.push(w.clone());
        w
    }

    fn note(&self, path: &RelPath) {
        for w in self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.note(path.clone());
        }
    }

    fn note_everything(&self) {
        for w in self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.note_everything();
        }
    }

    /// Whether applies are waiting for a `sync` (a crash now would take them back).
    pub fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }

    /// The node crashed: every apply since the last `sync` is lost, newest first.
    pub fn crash(&self) {
        let mut s = self.lock();
        let pending = std::mem::take(&mut s.pending);
        s.lost += pending.len() as u64;
        for (path, before) in pending.into_iter().rev() {
            s.tree.remove(&path);
            if let Some(e) = before {
                // Its parent existed when the apply ran, and later undos restore parents
                // before children are needed: an error leaves the path absent, as a crash
                // may.
                let _ = s.tree.insert(path.clone(), e);
            }
        }
        drop(s);
        self.note_everything();
    }

    /// Pending applies that crashes took back.
    pub fn lost_applies(&self) -> u64 {
        self.lock().lost
    }

    /// The tree now.
    pub fn tree(&self) -> Snapshot {
        self.lock().tree.clone()
    }

    /// A user creates or overwrites the file at `path` (creating parent directories and
    /// removing whatever is in the way, as `mkdir -p` and `rm -rf` would). Returns what the
    /// user removed or overwrote on the way.
    pub fn user_write(&self, path: &RelPath, data: &[u8], exec: bool) -> Vec<(RelPath, Entry)> {
        self.supersede(path);
        let mut removed = self.user_make_parents(path);
        removed.extend(self.user_remove_if(path, |e| !matches!(e, Entry::File { .. })));
        if let Some(old) = self.lock().tree.get(path).cloned() {
            removed.push((path.clone(), old));
        }
        let hash = cs_sync::content_hash(data);
        let mut s = self.lock();
        s.contents.insert(hash, data.to_vec());
        let entry = Entry::File {
            size: data.len() as u64,
            exec,
            hash,
        };
        // Parents exist now: the insert cannot fail.
        let _ = s.tree.insert(path.clone(), entry);
        drop(s);
        self.note(path);
        removed
    }

    /// A user creates a relative symlink at `path`.
    pub fn user_symlink(&self, path: &RelPath, target: &str) -> Vec<(RelPath, Entry)> {
        self.supersede(path);
        let mut removed = self.user_make_parents(path);
        removed.extend(self.user_remove_if(path, |_| true));
        let _ = self.lock().tree.insert(
            path.clone(),
            Entry::Symlink {
                target: target.to_string(),
            },
        );
        self.note(path);
        removed
    }

    /// A user removes `path` and everything below it (`rm -rf`). Returns what was removed.
    pub fn user_remove(&self, path: &RelPath) -> Vec<(RelPath, Entry)> {
        self.supersede(path);
        self.user_remove_if(path, |_| true)
    }

    fn user_remove_if(
        &self,
        path: &RelPath,
        pred: impl Fn(&Entry) -> bool,
    ) -> Vec<(RelPath, Entry)> {
        let mut s = self.lock();
        let Some(e) = s.tree.get(path) else {
            return Vec::new();
        };
        if path.is_root() || !pred(e) {
            return Vec::new();
        }
        let removed: Vec<(RelPath, Entry)> = s
            .tree
            .subtree(path)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        s.tree.remove(path);
        drop(s);
        self.note(path);
        removed
    }

    /// A user acted at `path`: pending applies at, above or below it are superseded (the
    /// user's writes are durable; a crash must not take them back with an apply).
    fn supersede(&self, path: &RelPath) {
        self.lock()
            .pending
            .retain(|(p, _)| !p.starts_with(path) && !path.starts_with(p));
    }

    /// Makes every parent of `path` a directory, removing files in the way.
    fn user_make_parents(&self, path: &RelPath) -> Vec<(RelPath, Entry)> {
        let mut removed = Vec::new();
        for dir in path.ancestors() {
            let kind = self.lock().tree.get(&dir).cloned();
            match kind {
                Some(Entry::Dir) => continue,
                Some(_) => removed.extend(self.user_remove(&dir)),
                None => {}
            }
            let _ = self.lock().tree.insert(dir.clone(), Entry::Dir);
            self.note(&dir);
        }
        removed
    }
}

impl RootFs for MemRoot {
    fn blocking(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("memory:{}", self.name)
    }

    fn create_root(&self) -> Result<(), String> {
        let mut s = self.lock();
        if !s.tree.has_root() {
            let _ = s.tree.insert(RelPath::root(), Entry::Dir);
        }
        Ok(())
    }

    fn scan(
        &self,
        _ignorer: &Ignorer,
        prev: Option<ScanOutput>,
        _changed: Option<Vec<RelPath>>,
    ) -> Result<ScanOutput, String> {
        // A rescan of changed paths gives the same snapshot as a full one (cs-sync's tests
        // check that on the real filesystem); in memory the whole tree is at hand.
        let snapshot = self.lock().tree.clone();
        let changes = prev.map(|p| p.snapshot.changes_to(&snapshot));
        Ok(ScanOutput {
            snapshot,
            changes,
            ..ScanOutput::default()
        })
    }

    fn apply(&self, op: &Op, content: Option<&mut dyn Read>) -> Result<(), String> {
        self.disk_op("write", op.path())?;
        let mut data = None;
        if let Some(Entry::File { size, hash, .. }) = op.result() {
            let same = matches!(op, Op::Replace { expected: Entry::File { hash: old, .. }, .. } if old == hash);
            if !same {
                let Some(r) = content else {
                    return Err(format!("no content supplied for file {}", op.path()));
                };
                let mut buf = Vec::new();
                r.take(FILE_BYTES_MAX + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| e.to_string())?;
                if buf.len() as u64 != *size || cs_sync::content_hash(&buf) != *hash {
                    return Err(format!("content for {} does not match", op.path()));
                }
                data = Some((*hash, buf));
            }
        }
        let mut s = self.lock();
        let before = s.tree.get(op.path()).cloned();
        apply_to_snapshot(&mut s.tree, op).map_err(|e| e.to_string())?;
        s.pending.push((op.path().clone(), before));
        if let Some((h, d)) = data {
            s.contents.insert(h, d);
        }
        drop(s);
        self.note(op.path());
        Ok(())
    }

    fn sync(&self, paths: &[RelPath]) -> Result<(), String> {
        // Only what is named becomes durable: a shell that forgot a path leaves it pending.
        self.lock().pending.retain(|(p, _)| !paths.contains(p));
        Ok(())
    }

    fn open(&self, path: &RelPath) -> Result<Box<dyn Read + Send>, String> {
        self.disk_op("read", path)?;
        let s = self.lock();
        match s.tree.get(path) {
            Some(Entry::File { hash, .. }) => {
                let data = s.contents.get(hash).cloned().unwrap_or_default();
                Ok(Box::new(std::io::Cursor::new(data)))
            }
            Some(e) => Err(format!("{path} is a {}", e.kind())),
            None => Err(format!("{path}: not found")),
        }
    }
}

/// The agent's roots in the simulation: one root, whatever the stream names.
#[derive(Debug)]
pub struct MemRoots(pub Arc<MemRoot>);

impl cs_agent::sync::Roots for MemRoots {
    fn open(
        &self,
        open: &cs_protocol::sync::SyncOpen,
    ) -> Result<cs_agent::sync::OpenedRoot, String> {
        if open.create {
            self.0.create_root()?;
        }
        Ok(cs_agent::sync::OpenedRoot {
            fs: self.0.clone(),
            // As the real agent: a bulk stream carries one file and watches nothing.
            watch: (!open.bulk).then(|| self.0.watch()),
            guard: None,
            cache_file: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn users_edit_and_apply_rechecks_like_the_real_root() {
        let r = MemRoot::new("t");
        r.create_root().unwrap();
        r.user_write(&p("a/b"), b"one", false);
        let tree = r.tree();
        assert_eq!(tree.get(&p("a")), Some(&Entry::Dir));
        let seen = tree.get(&p("a/b")).unwrap().clone();
        // The user changes the file after the scan: a replace based on the scan is refused.
        r.user_write(&p("a/b"), b"two", false);
        let new = Entry::File {
            size: 3,
            exec: false,
            hash: cs_sync::content_hash(b"new"),
        };
        let op = Op::Replace {
            path: p("a/b"),
            expected: seen,
            entry: new,
        };
        assert!(r.apply(&op, Some(&mut &b"new"[..])).is_err());
        let mut out = String::new();
        r.open(&p("a/b")).unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "two");
        // Writing a file where a directory is removes the directory first.
        let removed = r.user_write(&p("a"), b"x", true);
        let paths: Vec<RelPath> = removed.into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths, vec![p("a"), p("a/b")]);
    }
}
