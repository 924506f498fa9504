//! The workspace side of a sync session (beta): serves one sync stream. It scans its root
//! when asked, applies the laptop's ops with the content that follows them, sends files the
//! laptop asks for, and says when its root changed. The decisions are the laptop's; every op
//! is re-checked here against what the scan saw before anything is replaced or deleted
//! (cs-sync's `apply`), and no path leaves the root.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cs_protocol::sync::{
    split_delta, DeltaAssembler, SyncOpen, SyncReply, SyncRequest, DELTA_FILE_BYTES_MAX,
    DELTA_OPS_MAX, ENTRIES_CHUNK_BYTES,
};
use cs_protocol::DATA_CHUNK_BYTES_MAX;
use cs_sync::changes::ChangeSet;
use cs_sync::ignore::Ignorer;
use cs_sync::scan::{HashCache, ScanOutput};
use cs_sync::{Entry, Op, RelPath};
use cs_transport::{read_frame, write_frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// Sync streams one agent serves at once.
pub const SYNC_STREAMS_MAX: usize = 64;
/// Replies queued for the writer.
const REPLIES_QUEUED_MAX: usize = 64;
/// Ops one `Apply` may carry.
const OPS_PER_APPLY_MAX: usize = 4096;
/// How long filesystem events are gathered into one `Changed`.
const CHANGED_COALESCE_MS: u64 = 5;

/// Resolves a session root against the workspace home: relative, or `~/...`; never outside.
pub fn resolve_root(home: &Path, root: &str) -> Result<PathBuf, String> {
    let rel = root
        .strip_prefix("~/")
        .unwrap_or(if root == "~" { "" } else { root });
    if rel.starts_with('/') || rel.split('/').any(|c| c == "..") || rel.contains('\0') {
        return Err(format!(
            "invalid sync root '{root}': it must stay inside the workspace home"
        ));
    }
    Ok(home.join(rel.trim_end_matches('/')))
}

/// Serves one sync stream until the laptop closes it.
pub async fn serve<W, R>(open: SyncOpen, home: PathBuf, mut send: W, mut recv: R)
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send,
{
    let prepared = prepare(&open, &home);
    let (root, ignorer) = match prepared {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(session = %open.session, %reason, "sync stream refused");
            let _ = write_frame(&mut send, &SyncReply::Refused { reason }).await;
            return;
        }
    };
    tracing::info!(session = %open.session, root = %root.display(), "sync stream open");
    // One writer task owns the stream's send half: replies and `Changed` share it.
    let (tx, mut rx) = mpsc::channel::<SyncReply>(REPLIES_QUEUED_MAX);
    let writer = tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            if write_frame(&mut send, &r).await.is_err() {
                break;
            }
        }
    });
    let _ = tx
        .send(SyncReply::Ready {
            root: root.display().to_string(),
        })
        .await;
    let changes = Arc::new(Mutex::new(ChangeSet::default()));
    let watcher = watch(&root, tx.clone(), changes.clone());
    let mut prev: Option<ScanOutput> = None;
    loop {
        let req = match read_frame::<_, SyncRequest>(&mut recv).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::info!(session = %open.session, error = %e, "sync stream ended");
                break;
            }
        };
        let r = match req {
            SyncRequest::Scan { full } => {
                // Without a watcher, every scan is a full one.
                let changed = lock(&changes).take().filter(|_| !full && watcher.is_some());
                scan(&root, &ignorer, &mut prev, changed, &tx).await
            }
            SyncRequest::Apply { ops, deltas } => apply(&root, ops, &deltas, &mut recv, &tx).await,
            SyncRequest::Read { files } => read(&root, files, &tx).await,
            SyncRequest::Signatures { paths } => signatures(&root, paths, &tx).await,
            SyncRequest::Data(_) | SyncRequest::Delta(_) => {
                Err("content outside an Apply".to_string())
            }
        };
        if let Err(e) = r {
            tracing::warn!(session = %open.session, error = %e, "sync stream broken");
            break;
        }
    }
    // The watcher's task holds a sender: stop it first, so the writer sees the end.
    drop(watcher);
    drop(tx);
    let _ = writer.await;
}

fn prepare(open: &SyncOpen, home: &Path) -> Result<(PathBuf, Ignorer), String> {
    let root = resolve_root(home, &open.root)?;
    let ignorer = Ignorer::new(
        &open.ignore.patterns,
        open.ignore.vcs,
        open.ignore.gitignored,
    )
    .map_err(|e| e.to_string())?;
    if open.create {
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create sync root {}: {e}", root.display()))?;
    }
    Ok((root, ignorer))
}

/// Scans (or, with `changed` and a previous scan, rescans those paths) and sends the whole
/// snapshot.
async fn scan(
    root: &Path,
    ignorer: &Ignorer,
    prev: &mut Option<ScanOutput>,
    changed: Option<Vec<RelPath>>,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    let (root_buf, ig, before) = (root.to_owned(), ignorer.clone(), prev.take());
    let out = tokio::task::spawn_blocking(move || match (before, changed) {
        (Some(p), Some(c)) => cs_sync::scan::rescan(&root_buf, &ig, &p, &c),
        (Some(p), None) => cs_sync::scan::scan(&root_buf, &ig, &p.cache),
        (None, _) => cs_sync::scan::scan(&root_buf, &ig, &HashCache::new()),
    })
    .await
    .map_err(|e| format!("scan task failed: {e}"))?;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            // The root cannot be examined: report it as a problem of an empty scan, which the
            // laptop's safety checks turn into a halt rather than a wipe.
            let problems = vec![(RelPath::root(), e.to_string())];
            return tx
                .send(SyncReply::Entries {
                    entries: Vec::new(),
                    problems,
                    last: true,
                })
                .await
                .map_err(|_| "writer gone".into());
        }
    };
    let problems: Vec<(RelPath, String)> = out
        .problems
        .iter()
        .map(|p| (RelPath::root(), p.to_string()))
        .collect();
    let mut chunk = Vec::new();
    let mut bytes = 0usize;
    let mut problems = Some(problems);
    for (path, entry) in out.snapshot.iter() {
        bytes += path.as_str().len() + 64;
        chunk.push((path.clone(), entry.clone()));
        if bytes >= ENTRIES_CHUNK_BYTES {
            tx.send(SyncReply::Entries {
                entries: std::mem::take(&mut chunk),
                problems: Vec::new(),
                last: false,
            })
            .await
            .map_err(|_| "writer gone".to_string())?;
            bytes = 0;
        }
    }
    *prev = Some(out);
    tx.send(SyncReply::Entries {
        entries: chunk,
        problems: problems.take().unwrap_or_default(),
        last: true,
    })
    .await
    .map_err(|_| "writer gone".into())
}

fn lock(c: &Mutex<ChangeSet>) -> std::sync::MutexGuard<'_, ChangeSet> {
    // Poisoned only if a watcher callback panicked; the set itself stays consistent.
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the laptop sends content after this op (see `SyncRequest::Apply`).
fn needs_content(op: &Op) -> bool {
    match op {
        Op::Create {
            entry: Entry::File { .. },
            ..
        } => true,
        Op::Replace {
            expected,
            entry: Entry::File { hash, .. },
            ..
        } => !matches!(expected, Entry::File { hash: old, .. } if old == hash),
        _ => false,
    }
}

async fn apply<R: AsyncRead + Unpin>(
    root: &Path,
    ops: Vec<Op>,
    deltas: &[u32],
    recv: &mut R,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    if ops.len() > OPS_PER_APPLY_MAX {
        return Err(format!(
            "an Apply of {} ops (the most is {OPS_PER_APPLY_MAX})",
            ops.len()
        ));
    }
    let mut errors = Vec::with_capacity(ops.len());
    for (i, op) in ops.into_iter().enumerate() {
        let root_buf = root.to_owned();
        let result = if deltas.contains(&(i as u32)) {
            let delta = receive_delta(recv).await?;
            tokio::task::spawn_blocking(move || apply_delta(&root_buf, &op, delta))
                .await
                .map_err(|e| format!("apply task failed: {e}"))?
        } else if needs_content(&op) {
            let (chunks, mut reader) = cs_transport::chunks::ChunkReader::channel();
            let task = tokio::task::spawn_blocking(move || {
                let r = cs_sync::apply::apply(&root_buf, &op, Some(&mut reader));
                // Drain the rest so the stream keeps flowing after a refusal.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                r
            });
            let mut chunks = Some(chunks);
            loop {
                match read_frame::<_, SyncRequest>(recv).await {
                    Ok(Some(SyncRequest::Data(d))) if d.is_empty() => break,
                    Ok(Some(SyncRequest::Data(d))) => {
                        if let Some(c) = &chunks {
                            if c.send(d).await.is_err() {
                                chunks = None;
                            }
                        }
                    }
                    Ok(Some(_)) => return Err("expected file content in an Apply".into()),
                    Ok(None) => return Err("stream ended inside a file".into()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            drop(chunks);
            task.await
                .map_err(|e| format!("apply task failed: {e}"))?
                .map_err(|e| e.to_string())
        } else {
            tokio::task::spawn_blocking(move || cs_sync::apply::apply(&root_buf, &op, None))
                .await
                .map_err(|e| format!("apply task failed: {e}"))?
                .map_err(|e| e.to_string())
        };
        errors.push(result.err());
    }
    tx.send(SyncReply::Applied { errors })
        .await
        .map_err(|_| "writer gone".into())
}

async fn read(
    root: &Path,
    files: Vec<(RelPath, Option<cs_sync::delta::Signature>)>,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    let gone = |_| "writer gone".to_string();
    for (path, signature) in files {
        let fs_path = path.to_fs_path(root);
        // Never read through a symlinked parent: the path must stay inside the root.
        if let Err(e) = parents_are_dirs(root, &path) {
            tx.send(SyncReply::File(Err(e))).await.map_err(gone)?;
            continue;
        }
        if let Some(sig) = signature {
            // The laptop has a basis: answer with a delta against it.
            let p = fs_path.clone();
            let made = tokio::task::spawn_blocking(move || {
                read_small(&p).map(|data| cs_sync::delta::delta(&sig, &data))
            })
            .await
            .map_err(|e| format!("delta task failed: {e}"))?;
            match made {
                Ok(d) => {
                    tx.send(SyncReply::File(Ok(()))).await.map_err(gone)?;
                    for part in split_delta(d) {
                        tx.send(SyncReply::Delta(part)).await.map_err(gone)?;
                    }
                }
                Err(e) => {
                    tx.send(SyncReply::File(Err(format!("{path}: {e}"))))
                        .await
                        .map_err(gone)?;
                }
            }
            continue;
        }
        let mut chunks = cs_transport::chunks::read_chunks(fs_path, DATA_CHUNK_BYTES_MAX);
        let first = chunks.recv().await;
        match first {
            Some(Err(e)) => {
                tx.send(SyncReply::File(Err(format!("{path}: {e}"))))
                    .await
                    .map_err(gone)?;
                continue;
            }
            Some(Ok(data)) => {
                tx.send(SyncReply::File(Ok(()))).await.map_err(gone)?;
                tx.send(SyncReply::Data(data)).await.map_err(gone)?;
            }
            None => tx.send(SyncReply::File(Ok(()))).await.map_err(gone)?,
        }
        // A read error midway ends the file early; the laptop's size and hash check refuses it.
        while let Some(Ok(data)) = chunks.recv().await {
            tx.send(SyncReply::Data(data)).await.map_err(gone)?;
        }
        tx.send(SyncReply::Data(Vec::new())).await.map_err(gone)?;
    }
    Ok(())
}

fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    cs_transport::chunks::read_file_max(path, DELTA_FILE_BYTES_MAX)
}

async fn signatures(
    root: &Path,
    paths: Vec<RelPath>,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    if paths.len() > OPS_PER_APPLY_MAX {
        return Err(format!("signatures of {} files asked at once", paths.len()));
    }
    let root = root.to_owned();
    let signatures = tokio::task::spawn_blocking(move || {
        paths
            .iter()
            .map(|p| {
                parents_are_dirs(&root, p).ok()?;
                read_small(&p.to_fs_path(&root))
                    .ok()
                    .map(|d| cs_sync::delta::signature(&d))
            })
            .collect()
    })
    .await
    .map_err(|e| format!("signature task failed: {e}"))?;
    tx.send(SyncReply::Signatures { signatures })
        .await
        .map_err(|_| "writer gone".into())
}

async fn receive_delta<R: AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<cs_sync::delta::Delta, String> {
    let mut a = DeltaAssembler::default();
    loop {
        match read_frame::<_, SyncRequest>(recv).await {
            Ok(Some(SyncRequest::Delta(part))) => {
                if let Some(d) = a
                    .push(part, DELTA_OPS_MAX, DELTA_FILE_BYTES_MAX)
                    .map_err(|e| e.to_string())?
                {
                    return Ok(d);
                }
            }
            Ok(Some(_)) => return Err("expected a delta in an Apply".into()),
            Ok(None) => return Err("stream ended inside a delta".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Rebuilds the op's new content from the file it replaces and applies it (which re-checks
/// that file against the op's `expected`).
fn apply_delta(root: &Path, op: &Op, delta: cs_sync::delta::Delta) -> Result<(), String> {
    parents_are_dirs(root, op.path())?;
    let basis =
        read_small(&op.path().to_fs_path(root)).map_err(|e| format!("{}: {e}", op.path()))?;
    let data = cs_sync::delta::patch(&basis, &delta, DELTA_FILE_BYTES_MAX)
        .map_err(|e| format!("{}: {e}", op.path()))?;
    cs_sync::apply::apply(root, op, Some(&mut std::io::Cursor::new(data)))
        .map_err(|e| e.to_string())
}

fn parents_are_dirs(root: &Path, path: &RelPath) -> Result<(), String> {
    let mut dir = root.to_owned();
    let comps: Vec<&str> = path.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{path}: parent {} is not a directory",
                    dir.display()
                ))
            }
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    Ok(())
}

/// Watches the root; each burst of changes becomes one `Changed`. `None` if the root cannot
/// be watched (the laptop's periodic rescans still find changes).
fn watch(
    root: &Path,
    tx: mpsc::Sender<SyncReply>,
    changes: Arc<Mutex<ChangeSet>>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
    let root_buf = root.to_owned();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        match &ev {
            Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
            Ok(e) if !e.need_rescan() => {
                let mut c = lock(&changes);
                for p in &e.paths {
                    c.note(&root_buf, p);
                }
            }
            // Lost events: only a full scan can be trusted.
            _ => lock(&changes).note_everything(),
        }
        let _ = ev_tx.try_send(());
    })
    .ok()?;
    if let Err(e) = w.watch(root, notify::RecursiveMode::Recursive) {
        tracing::warn!(root = %root.display(), error = %e, "cannot watch the sync root");
        return None;
    }
    tokio::spawn(async move {
        while ev_rx.recv().await.is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(CHANGED_COALESCE_MS)).await;
            while ev_rx.try_recv().is_ok() {}
            if tx.send(SyncReply::Changed).await.is_err() {
                break;
            }
        }
    });
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_stay_in_the_home() {
        let home = Path::new("/h");
        assert_eq!(resolve_root(home, "src").unwrap(), Path::new("/h/src"));
        assert_eq!(resolve_root(home, "~/a/b/").unwrap(), Path::new("/h/a/b"));
        assert_eq!(resolve_root(home, "~").unwrap(), Path::new("/h/"));
        for bad in ["/etc", "../x", "~/../x", "a/../.."] {
            assert!(resolve_root(home, bad).unwrap_err().contains(bad));
        }
    }
}
