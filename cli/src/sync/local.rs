//! The laptop side's filesystem work for a session, off the actor thread: scans and applies
//! run on blocking threads (cs-sync's `scan` and `apply` shells), and a `notify` watcher turns
//! filesystem events into wake-ups.

use std::path::{Path, PathBuf};

use cs_sync::ignore::Ignorer;
use std::sync::{Arc, Mutex};

use cs_sync::changes::ChangeSet;
use cs_sync::scan::{HashCache, ScanOutput};
use cs_sync::{Op, RelPath};
use futures_util::future::LocalBoxFuture;
use tokio::sync::mpsc;

/// Wake-ups queued from the watcher; more are merged (one is enough to start a cycle).
const EVENTS_QUEUED_MAX: usize = 1;

/// Scans `root`: the paths in `changed` on top of `prev`, or all of it (without `prev` or
/// `changed`). Returns the scan (with the cache for the next one).
pub async fn scan(
    root: PathBuf,
    ignorer: Ignorer,
    prev: Option<ScanOutput>,
    changed: Option<Vec<RelPath>>,
) -> Result<ScanOutput, String> {
    tokio::task::spawn_blocking(move || match (prev, changed) {
        (Some(p), Some(c)) => cs_sync::scan::rescan(&root, &ignorer, &p, &c),
        (Some(p), None) => cs_sync::scan::scan(&root, &ignorer, &p.cache),
        (None, _) => cs_sync::scan::scan(&root, &ignorer, &HashCache::new()),
    })
    .await
    .map_err(|e| format!("scan task failed: {e}"))?
    .map_err(|e| e.to_string())
}

/// Applies an op that needs no content.
pub async fn apply(root: PathBuf, op: Op) -> Result<(), String> {
    tokio::task::spawn_blocking(move || cs_sync::apply::apply(&root, &op, None))
        .await
        .map_err(|e| format!("apply task failed: {e}"))?
        .map_err(|e| e.to_string())
}

/// Applies a file op whose content is still arriving: feed the chunks to the sender, drop it
/// at the end, then await the result.
pub fn apply_streaming(
    root: PathBuf,
    op: Op,
) -> (
    mpsc::Sender<Vec<u8>>,
    LocalBoxFuture<'static, Result<(), String>>,
) {
    let (tx, mut reader) = cs_transport::chunks::ChunkReader::channel();
    let task = tokio::task::spawn_blocking(move || {
        let r = cs_sync::apply::apply(&root, &op, Some(&mut reader));
        // Drain what is left so the sender never blocks on a refused op.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
        r
    });
    (
        tx,
        Box::pin(async move {
            task.await
                .map_err(|e| format!("apply task failed: {e}"))?
                .map_err(|e| e.to_string())
        }),
    )
}

/// Rebuilds a file op's content from the laptop's copy and a delta, and applies it (which
/// re-checks that copy against the op's `expected`).
pub async fn apply_delta(
    root: PathBuf,
    op: Op,
    delta: cs_sync::delta::Delta,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        let max = cs_protocol::sync::DELTA_FILE_BYTES_MAX;
        let basis = cs_transport::chunks::read_file_max(&op.path().to_fs_path(&root), max)?;
        let data = cs_sync::delta::patch(&basis, &delta, max)
            .map_err(|e| format!("{}: {e}", op.path()))?;
        cs_sync::apply::apply(&root, &op, Some(&mut std::io::Cursor::new(data)))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("apply task failed: {e}"))?
}

/// Watches a root recursively: notes what changed in a [`ChangeSet`], and turns each burst of
/// events into one wake-up.
#[derive(Debug)]
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
    rx: mpsc::Receiver<()>,
    changes: Arc<Mutex<ChangeSet>>,
}

impl Watcher {
    pub fn new(root: &Path) -> Result<Self, String> {
        use notify::Watcher as _;
        let (tx, rx) = mpsc::channel(EVENTS_QUEUED_MAX);
        let changes = Arc::new(Mutex::new(ChangeSet::default()));
        let (c, root_buf) = (changes.clone(), root.to_owned());
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            match &ev {
                // Access events (reads, opens) change nothing.
                Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
                Ok(e) if !e.need_rescan() => {
                    let mut c = lock(&c);
                    for p in &e.paths {
                        c.note(&root_buf, p);
                    }
                }
                // Lost events: only a full scan can be trusted.
                _ => lock(&c).note_everything(),
            }
            let _ = tx.try_send(());
        })
        .map_err(|e| e.to_string())?;
        w.watch(root, notify::RecursiveMode::Recursive)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            _inner: w,
            rx,
            changes,
        })
    }
}

fn lock(c: &Mutex<ChangeSet>) -> std::sync::MutexGuard<'_, ChangeSet> {
    // Poisoned only if a watcher callback panicked; the set itself stays consistent.
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// What changed since the last call: `None` means scan everything (no watcher, lost events,
/// or `full` asked for).
pub fn take_changes(w: &Result<Watcher, String>, full: bool) -> Option<Vec<RelPath>> {
    match w {
        Ok(w) => lock(&w.changes).take().filter(|_| !full),
        Err(_) => None,
    }
}

/// Waits for the next wake-up; forever when there is no watcher (rescans still run).
pub async fn next_event(w: &mut Result<Watcher, String>) {
    match w {
        Ok(w) => {
            if w.rx.recv().await.is_none() {
                std::future::pending::<()>().await
            }
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

/// Forgets wake-ups that arrived while a cycle was about to start anyway.
pub fn drain_events(w: &mut Result<Watcher, String>) {
    if let Ok(w) = w {
        while w.rx.try_recv().is_ok() {}
    }
}
