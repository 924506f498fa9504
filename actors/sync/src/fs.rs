//! The seam between the sync shells and a filesystem: [`RootFs`] is one sync root. The agent
//! and the laptop daemon use [`OsRoot`] (the real filesystem, through the `scan` and `apply`
//! shells); the simulation plugs in a tree held in memory, so the same session and endpoint
//! code runs on virtual time.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::apply::{apply, check_parents};
use crate::ignore::Ignorer;
use crate::path::RelPath;
use crate::reconcile::Op;
use crate::scan::{rescan, rescan_all, scan, HashCache, ScanOutput};

/// One sync root's filesystem.
pub trait RootFs: Send + Sync {
    /// Whether calls may block the thread (a real filesystem): callers then make them off
    /// the actor thread. An in-memory root answers at once.
    fn blocking(&self) -> bool;
    /// Where the root is, for messages.
    fn describe(&self) -> String;
    /// Creates the root directory (and its parents) if it is missing.
    fn create_root(&self) -> Result<(), String>;
    /// Scans: `changed` paths on top of `prev`, or everything.
    fn scan(
        &self,
        ignorer: &Ignorer,
        prev: Option<ScanOutput>,
        changed: Option<Vec<RelPath>>,
    ) -> Result<ScanOutput, String>;
    /// Applies one op, re-checking what it replaces or deletes; file content from `content`.
    fn apply(&self, op: &Op, content: Option<&mut dyn Read>) -> Result<(), String>;
    /// Makes the ops applied at `paths` durable (the real root: each file and its directory
    /// for a few, one `syncfs` for more); called after a batch, before it is reported applied.
    fn sync(&self, _paths: &[RelPath]) -> Result<(), String> {
        Ok(())
    }
    /// Opens a file for reading, never through a symlink or out of the root.
    fn open(&self, path: &RelPath) -> Result<Box<dyn Read + Send>, String>;
    /// Reads a whole file of at most `max` bytes.
    fn read(&self, path: &RelPath, max: u64) -> Result<Vec<u8>, String> {
        let mut data = Vec::new();
        self.open(path)?
            .take(max + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("{path}: {e}"))?;
        if data.len() as u64 > max {
            return Err(format!("{path}: larger than {max} bytes"));
        }
        Ok(data)
    }
}

/// Rebuilds an op's new content from the file it replaces (at most `max` bytes) and `delta`,
/// and applies it (which re-checks that file against the op's `expected`).
pub fn apply_delta(
    fs: &dyn RootFs,
    op: &Op,
    delta: crate::delta::Delta,
    max: u64,
) -> Result<(), String> {
    let basis = fs.read(op.path(), max)?;
    let data =
        crate::delta::patch(&basis, &delta, max).map_err(|e| format!("{}: {e}", op.path()))?;
    fs.apply(op, Some(&mut std::io::Cursor::new(data)))
}

/// A sync root on the real filesystem.
#[derive(Debug, Clone)]
pub struct OsRoot {
    root: PathBuf,
}

impl OsRoot {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
}

impl RootFs for OsRoot {
    fn blocking(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn create_root(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| format!("cannot create sync root {}: {e}", self.root.display()))
    }

    fn scan(
        &self,
        ignorer: &Ignorer,
        prev: Option<ScanOutput>,
        changed: Option<Vec<RelPath>>,
    ) -> Result<ScanOutput, String> {
        match (prev, changed) {
            (Some(p), Some(c)) => rescan(&self.root, ignorer, p, &c),
            (Some(p), None) => rescan_all(&self.root, ignorer, p),
            (None, _) => scan(&self.root, ignorer, &HashCache::new()),
        }
        .map_err(|e| e.to_string())
    }

    fn apply(&self, op: &Op, content: Option<&mut dyn Read>) -> Result<(), String> {
        apply(&self.root, op, content).map_err(|e| e.to_string())
    }

    fn sync(&self, paths: &[RelPath]) -> Result<(), String> {
        crate::apply::sync_paths(&self.root, paths)
            .map_err(|e| format!("cannot sync {}: {e}", self.root.display()))
    }

    fn open(&self, path: &RelPath) -> Result<Box<dyn Read + Send>, String> {
        use std::os::unix::fs::OpenOptionsExt;
        check_parents(&self.root, path).map_err(|e| e.to_string())?;
        // O_NOFOLLOW: a symlink at the final component is refused, not followed.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path.to_fs_path(&self.root))
            .map_err(|e| format!("{path}: {e}"))?;
        Ok(Box::new(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_root_never_reads_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("link")).unwrap();
        std::fs::write(dir.path().join("f"), "hello").unwrap();
        let r = OsRoot::new(dir.path().to_owned());
        let p = |s: &str| RelPath::parse(s).unwrap();
        assert_eq!(r.read(&p("f"), 100).unwrap(), b"hello");
        assert!(r.read(&p("f"), 2).unwrap_err().contains("larger"));
        assert!(
            r.read(&p("out/secret"), 100).is_err(),
            "through a symlinked parent"
        );
        assert!(r.read(&p("link"), 100).is_err(), "a final symlink");
    }
}

#[cfg(feature = "watch")]
pub use watch::{os_watch, Watch, WatchGuard};

#[cfg(all(feature = "watch", target_os = "linux"))]
#[path = "inotify.rs"]
mod inotify;

#[cfg(feature = "watch")]
mod watch {
    use std::path::{Path, PathBuf};

    use crate::path::RelPath;

    /// What changed under a root since the last scan, and a wake-up when something does. Fed by
    /// [`os_watch`] on a real root, by the in-memory root itself in the simulation.
    #[derive(Clone, Debug)]
    pub struct Watch {
        changes: std::sync::Arc<std::sync::Mutex<crate::changes::ChangeSet>>,
        wake: std::sync::Arc<tokio::sync::Notify>,
    }

    impl Default for Watch {
        fn default() -> Self {
            Self {
                changes: Default::default(),
                wake: std::sync::Arc::new(tokio::sync::Notify::new()),
            }
        }
    }

    impl Watch {
        fn lock(&self) -> std::sync::MutexGuard<'_, crate::changes::ChangeSet> {
            // Poisoned only if a watcher callback panicked; the set itself stays consistent.
            self.changes.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Notes changed paths (absolute, as events name them) under `root`, and wakes.
        pub fn note_fs(&self, root: &Path, paths: &[PathBuf]) {
            {
                let mut c = self.lock();
                for p in paths {
                    c.note(root, p);
                }
            }
            self.wake.notify_one();
        }

        /// Notes a changed path relative to the root, and wakes.
        pub fn note(&self, path: RelPath) {
            self.lock().note_rel(path);
            self.wake.notify_one();
        }

        /// Notes that anything may have changed (events were lost), and wakes.
        pub fn note_everything(&self) {
            self.lock().note_everything();
            self.wake.notify_one();
        }

        /// The paths to rescan, or `None` for a full scan (also when `full` is asked for).
        pub fn take(&self, full: bool) -> Option<Vec<RelPath>> {
            self.lock().take().filter(|_| !full)
        }

        /// Whether every other holder of this watch dropped it (its stream or session ended).
        pub fn abandoned(&self) -> bool {
            std::sync::Arc::strong_count(&self.changes) == 1
        }

        /// Waits until something changed since the last wait.
        pub async fn changed(&self) {
            self.wake.notified().await
        }
    }

    /// Keeps a root's watcher running; dropping it stops the watcher.
    pub struct WatchGuard {
        #[cfg(target_os = "linux")]
        _inner: super::inotify::Guard,
        #[cfg(not(target_os = "linux"))]
        _inner: notify::RecommendedWatcher,
    }

    impl std::fmt::Debug for WatchGuard {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("WatchGuard")
        }
    }

    /// Watches a real root recursively into a [`Watch`]; keep the returned guard alive.
    /// On Linux this is inotify without `IN_OPEN`: notify watches every open, so each file the
    /// scanner hashed, and each one a build in the workspace read, queued an event and woke
    /// the watcher thread for nothing (about a tenth of the CPU of an initial sync).
    #[cfg(target_os = "linux")]
    pub fn os_watch(root: &Path) -> Result<(WatchGuard, Watch), String> {
        let watch = Watch::default();
        let guard = super::inotify::watch(root, watch.clone())?;
        Ok((WatchGuard { _inner: guard }, watch))
    }

    /// Watches a real root recursively into a [`Watch`]; keep the returned guard alive.
    #[cfg(not(target_os = "linux"))]
    pub fn os_watch(root: &Path) -> Result<(WatchGuard, Watch), String> {
        use notify::Watcher as _;
        let watch = Watch::default();
        let (w2, root_buf) = (watch.clone(), root.to_owned());
        let mut w =
            notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match &ev {
                // Access events (reads, opens) change nothing.
                Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => {}
                Ok(e) if !e.need_rescan() => w2.note_fs(&root_buf, &e.paths),
                // Lost events: only a full scan can be trusted.
                _ => w2.note_everything(),
            })
            .map_err(|e| e.to_string())?;
        w.watch(root, notify::RecursiveMode::Recursive)
            .map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
        Ok((WatchGuard { _inner: w }, watch))
    }
}
