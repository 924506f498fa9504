//! The workspace side of a sync session (beta): serves one sync stream. It scans its root
//! when asked, applies the laptop's ops with the content that follows them, sends files the
//! laptop asks for, and says when its root changed. The decisions are the laptop's; every op
//! is re-checked against what the scan saw before anything is replaced or deleted (the
//! root's `apply`), and no path leaves the root.
//!
//! The root comes from [`Roots`]: the workspace home on the real filesystem ([`HomeRoots`]),
//! or the simulation's in-memory trees.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cs_protocol::sync::{
    needs_content, split_delta, DeltaAssembler, SyncOpen, SyncReply, SyncRequest,
    DELTA_FILE_BYTES_MAX, DELTA_OPS_MAX, ENTRIES_CHUNK_BYTES,
};
use cs_protocol::DATA_CHUNK_BYTES_MAX;
use cs_sync::fs::{OsRoot, RootFs, Watch};
use cs_sync::ignore::Ignorer;
use cs_sync::scan::{HashCache, ScanOutput, CACHE_MAGIC};
use cs_sync::{Op, RelPath};
use cs_transport::chunks::{off_thread, read_chunks, ChunkReader};
use cs_transport::{read_frame, write_frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// Sync streams one agent serves at once.
pub const SYNC_STREAMS_MAX: usize = 64;
/// Replies queued for the writer.
const REPLIES_QUEUED_MAX: usize = 64;
/// Requests decoded ahead of the loop that serves them (each at most a frame).
const REQUESTS_QUEUED_MAX: usize = 8;
/// Ops one `Apply` may carry, and signatures one request may ask for.
const OPS_PER_APPLY_MAX: usize = 4096;
/// How long filesystem events are gathered into one `Changed`.
const CHANGED_COALESCE_MS: u64 = 5;
/// A file of at most this size arrives whole before it is written, in a batch with the ops
/// around it; a larger one streams to its blocking writer as it arrives.
const SMALL_FILE_BYTES_MAX: u64 = 256 * 1024;
/// A batch of small files and ops without content goes to one blocking thread once it holds
/// this much content or this many ops: one handoff per batch instead of per file (a spawn,
/// a channel send and a join per file cost the agent about a quarter of its CPU in an
/// initial sync of the kernel tree).
const BATCH_BYTES_MAX: u64 = 1 << 20;
const BATCH_OPS_MAX: usize = 256;

/// A root opened for a stream: its filesystem, what watches it (`None`: no events, so every
/// scan is full), and whatever must live as long as the stream (a real watcher).
pub struct OpenedRoot {
    pub fs: Arc<dyn RootFs>,
    pub watch: Option<Watch>,
    pub guard: Option<Box<dyn Send>>,
    /// Where the root's hash cache is kept between streams and agent restarts (`None`: it
    /// is not, and every stream hashes the tree once).
    pub cache_file: Option<PathBuf>,
}

/// Where a workspace's sync roots live.
pub trait Roots: Send + Sync {
    /// The root a stream names, created if `open.create`.
    fn open(&self, open: &SyncOpen) -> Result<OpenedRoot, String>;
}

/// Roots inside the workspace home on the real filesystem.
#[derive(Debug, Clone)]
pub struct HomeRoots {
    pub home: PathBuf,
    /// The directory of the roots' hash caches, one file per root and ignore rules.
    pub caches: Option<PathBuf>,
}

impl Roots for HomeRoots {
    fn open(&self, open: &SyncOpen) -> Result<OpenedRoot, String> {
        let root = resolve_root(&self.home, &open.root)?;
        let fs = OsRoot::new(root.clone());
        if open.create {
            fs.create_root()?;
        }
        if open.bulk {
            // One file's transfer: nothing to watch, scan or cache.
            return Ok(OpenedRoot {
                fs: Arc::new(fs),
                watch: None,
                guard: None,
                cache_file: None,
            });
        }
        let (guard, watch) = match cs_sync::fs::os_watch(&root) {
            Ok((w, watch)) => (Some(Box::new(w) as Box<dyn Send>), Some(watch)),
            Err(e) => {
                tracing::warn!(root = %root.display(), error = %e, "no filesystem events; every scan will be full");
                (None, None)
            }
        };
        let cache_file = self.caches.as_ref().map(|dir| {
            // What is ignored changes what is hashed: the rules are part of the key.
            let key = format!("{}\0{:?}", root.display(), open.ignore);
            dir.join(blake3::hash(key.as_bytes()).to_hex().as_str())
        });
        Ok(OpenedRoot {
            fs: Arc::new(fs),
            watch,
            guard,
            cache_file,
        })
    }
}

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
pub async fn serve<W, R>(
    open: SyncOpen,
    roots: Arc<dyn Roots>,
    mut send: W,
    mut recv: R,
    probe: cs_transport::TailProbe,
) where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let prepared = open
        .ignore
        .ignorer()
        .map_err(|e| e.to_string())
        .and_then(|ig| roots.open(&open).map(|r| (r, ig)));
    let (root, ignorer) = match prepared {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(session = %open.session, %reason, "sync stream refused");
            let _ = write_frame(&mut send, &SyncReply::Refused { reason }).await;
            return;
        }
    };
    let fs = root.fs.clone();
    tracing::info!(session = %open.session, root = %fs.describe(), "sync stream open");
    // One writer task owns the stream's send half: replies and `Changed` share it. File
    // content is packed here, on its way out.
    let (tx, mut rx) = mpsc::channel::<SyncReply>(REPLIES_QUEUED_MAX);
    let writer = tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let r = match r {
                SyncReply::Data(d) => SyncReply::data(d, packs(&probe)),
                other => other,
            };
            if write_frame(&mut send, &r).await.is_err() {
                break;
            }
            probe.poke();
        }
    });
    // One reader task decodes requests, so that the loop below can wait for a request and
    // for filesystem events at once without cutting a frame in half.
    let (req_tx, mut requests) = mpsc::channel::<Result<SyncRequest, String>>(REQUESTS_QUEUED_MAX);
    let reader = tokio::spawn(async move {
        loop {
            let next = match read_frame::<_, SyncRequest>(&mut recv).await {
                Ok(Some(r)) => r.unpacked(),
                Ok(None) => break,
                Err(e) => Err(e.to_string()),
            };
            let end = next.is_err();
            if req_tx.send(next).await.is_err() || end {
                break;
            }
        }
    });
    let _ = tx
        .send(SyncReply::Ready {
            root: fs.describe(),
            watched: root.watch.is_some(),
        })
        .await;
    let mut state = ScanState::open(&fs, root.cache_file.clone()).await;
    // When gathered filesystem events are due to be scanned.
    let mut event_due: Option<tokio::time::Instant> = None;
    loop {
        // Between requests, events are scanned as they come (once the laptop holds a tree),
        // and `Changed` goes out only when the root now differs from the laptop's copy: the
        // events of the laptop's own applies say nothing new.
        let listen = state.sent.is_some() && !state.told && event_due.is_none();
        let event = async {
            match (&root.watch, listen) {
                (Some(w), true) => w.changed().await,
                _ => std::future::pending().await,
            }
        };
        let due = async {
            match event_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let req = tokio::select! {
            biased;
            r = requests.recv() => r,
            // Events are gathered for a moment; requests keep being served meanwhile.
            () = event => {
                event_due = Some(
                    tokio::time::Instant::now() + Duration::from_millis(CHANGED_COALESCE_MS),
                );
                continue;
            }
            () = due => {
                event_due = None;
                let changed = root.watch.as_ref().and_then(|w| w.take(false));
                let r = match rescan(&fs, &ignorer, &mut state, changed).await {
                    Err(e) => Err(e),
                    Ok(_) if !state.differs() => Ok(()),
                    Ok(_) => {
                        state.told = true;
                        tx.send(SyncReply::Changed).await.map_err(|_| GONE.to_string())
                    }
                };
                if let Err(e) = r {
                    tracing::warn!(session = %open.session, error = %e, "sync stream broken");
                    break;
                }
                continue;
            }
        };
        let req = match req {
            Some(Ok(r)) => r,
            None => break,
            Some(Err(e)) => {
                tracing::info!(session = %open.session, error = %e, "sync stream ended");
                break;
            }
        };
        let r = match req {
            SyncRequest::Scan { paths, .. } if paths.len() > OPS_PER_APPLY_MAX => Err(format!(
                "a Scan naming {} paths (the most is {OPS_PER_APPLY_MAX})",
                paths.len()
            )),
            SyncRequest::Scan { full, paths } => {
                // Without a watcher, every scan is a full one.
                let changed = root.watch.as_ref().and_then(|w| w.take(full)).map(|mut c| {
                    c.extend(paths);
                    c
                });
                scan(&fs, &ignorer, &mut state, changed, &tx).await
            }
            SyncRequest::Apply { ops, deltas } => {
                apply(&fs, ops, &deltas, &mut requests, &mut state, &tx).await
            }
            SyncRequest::Read { files } => read(&fs, files, &tx).await,
            SyncRequest::Signatures { paths } => signatures(&fs, paths, &tx).await,
            SyncRequest::Data(_) | SyncRequest::Packed(_) | SyncRequest::Delta(_) => {
                Err("content outside an Apply".to_string())
            }
        };
        if let Err(e) = r {
            tracing::warn!(session = %open.session, error = %e, "sync stream broken");
            break;
        }
    }
    reader.abort();
    state.close(&fs).await;
    drop(tx);
    let _ = writer.await;
    drop(root);
}

const GONE: &str = "the stream's writer stopped";

/// What a stream remembers between scans.
struct ScanState {
    /// The last scan; its cache is the next scan's.
    prev: Option<ScanOutput>,
    /// The laptop's copy of the tree: what the stream's scan replies told it, patched with
    /// every op this stream reported applied exactly as the laptop patches it
    /// ([`cs_sync::record_applied`]). `None` until a whole tree went out; later replies send
    /// changes against it.
    sent: Option<cs_sync::Snapshot>,
    /// Paths at which `prev` may differ from `sent` (everywhere else they agree).
    unsent: BTreeSet<RelPath>,
    /// A `Changed` went out and no scan was asked for since.
    told: bool,
    /// The last scan's problems, sent with every reply.
    problems: Vec<(RelPath, String)>,
    cache_file: Option<PathBuf>,
    cache_saved: tokio::time::Instant,
}

/// The hash cache is saved at most this often, or after a scan that hashed at least
/// `CACHE_SAVE_HASHED_MIN` files, and when the stream ends.
const CACHE_SAVE_MS: u64 = 60_000;
const CACHE_SAVE_HASHED_MIN: usize = 1_000;

impl ScanState {
    /// Starts from the root's saved hash cache, if any.
    async fn open(fs: &Arc<dyn RootFs>, cache_file: Option<PathBuf>) -> Self {
        let file = cache_file.clone();
        let cache = off_thread(fs.blocking(), move || {
            let file = file?;
            cs_transport::state::load(&file, CACHE_MAGIC).unwrap_or_else(|e| {
                tracing::info!(error = %e, "unreadable hash cache; files will be hashed again");
                None
            })
        })
        .await
        .ok()
        .flatten();
        ScanState {
            prev: cache.map(|cache| ScanOutput {
                cache,
                ..ScanOutput::default()
            }),
            sent: None,
            unsent: BTreeSet::new(),
            told: false,
            problems: Vec::new(),
            cache_file,
            cache_saved: tokio::time::Instant::now(),
        }
    }

    /// Whether the last scan differs from the laptop's copy somewhere (`unsent` holds
    /// exactly those paths once pruned, which every scan and apply does).
    fn differs(&self) -> bool {
        self.sent.is_none() || self.prev.is_none() || !self.unsent.is_empty()
    }

    /// Notes that the laptop recorded `op` as applied in its copy, and that the root now
    /// holds its result (a later change there shows up as an event, and is rescanned).
    fn applied(&mut self, op: &Op) {
        let Some(sent) = &mut self.sent else {
            return;
        };
        let mut touched = cs_sync::record_applied(sent, op);
        if let Some(prev) = &mut self.prev {
            touched.extend(cs_sync::record_applied(&mut prev.snapshot, op));
        }
        self.unsent.extend(touched);
        self.prune();
    }

    /// Drops from `unsent` the paths where the last scan and the laptop's copy agree.
    fn prune(&mut self) {
        if let (Some(sent), Some(prev)) = (&self.sent, &self.prev) {
            self.unsent.retain(|p| sent.get(p) != prev.snapshot.get(p));
        }
    }

    /// Keeps the last scan's hash cache for the next stream.
    async fn close(self, fs: &Arc<dyn RootFs>) {
        if let (Some(file), Some(prev)) = (self.cache_file, self.prev) {
            let _ = off_thread(fs.blocking(), move || save_cache(&file, &prev.cache)).await;
        }
    }
}

fn save_cache(file: &Path, cache: &HashCache) {
    if let Err(e) = cs_transport::state::save(file, CACHE_MAGIC, cache) {
        tracing::info!(error = %e, "cannot keep the hash cache");
    }
}

/// Scans (or, with `changed` and a previous scan, rescans those paths) into `state.prev`,
/// noting what changed in `state.unsent`. `Ok(Err(_))`: the root cannot be examined (the
/// laptop's copy is then forgotten: the next reply is whole).
async fn rescan(
    fs: &Arc<dyn RootFs>,
    ignorer: &Ignorer,
    state: &mut ScanState,
    changed: Option<Vec<RelPath>>,
) -> Result<Result<(), String>, String> {
    let (f, ig, before) = (fs.clone(), ignorer.clone(), state.prev.take());
    let now = tokio::time::Instant::now();
    let time_due = now.duration_since(state.cache_saved) >= Duration::from_millis(CACHE_SAVE_MS);
    let file = state.cache_file.clone();
    let out = off_thread(fs.blocking(), move || {
        let out = f.scan(&ig, before, changed)?;
        let due = time_due || out.files_hashed >= CACHE_SAVE_HASHED_MIN;
        let saved = match file {
            Some(file) if due => {
                save_cache(&file, &out.cache);
                true
            }
            _ => false,
        };
        Ok::<_, String>((out, saved))
    })
    .await?;
    let mut out = match out {
        Ok((o, saved)) => {
            if saved {
                state.cache_saved = now;
            }
            o
        }
        Err(e) => {
            state.sent = None;
            state.unsent.clear();
            return Ok(Err(e));
        }
    };
    state.problems = out
        .problems
        .iter()
        .map(|p| (RelPath::root(), p.to_string()))
        .collect();
    match out.changes.take() {
        Some(changes) if state.sent.is_some() => {
            state.unsent.extend(changes.into_iter().map(|(p, _)| p));
        }
        // A whole scan: the laptop's copy may differ anywhere.
        _ => {
            state.sent = None;
            state.unsent.clear();
        }
    }
    state.prev = Some(out);
    state.prune();
    Ok(Ok(()))
}

/// Answers a `Scan`: rescans, then sends the tree whole on the stream's first scan (or after
/// the root could not be examined), else the changes that bring the laptop's copy up to it.
async fn scan(
    fs: &Arc<dyn RootFs>,
    ignorer: &Ignorer,
    state: &mut ScanState,
    changed: Option<Vec<RelPath>>,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    state.told = false;
    if let Err(e) = rescan(fs, ignorer, state, changed).await? {
        // The root cannot be examined: report it as a problem of an empty scan, which the
        // laptop's safety checks turn into a halt rather than a wipe. The next reply is
        // whole again.
        let problems = vec![(RelPath::root(), e)];
        return tx
            .send(SyncReply::Entries {
                entries: Vec::new(),
                problems,
                last: true,
            })
            .await
            .map_err(|_| GONE.into());
    }
    let prev = &state
        .prev
        .as_ref()
        .expect("a successful scan leaves its output")
        .snapshot;
    let bad = bad_tree_canary(prev);
    let problems = state.problems.clone();
    match &mut state.sent {
        Some(sent) => {
            let changes: Vec<cs_sync::Change> = std::mem::take(&mut state.unsent)
                .into_iter()
                .filter_map(|p| {
                    let now = prev.get(&p);
                    (sent.get(&p) != now).then(|| {
                        let now = now.cloned();
                        (p, now)
                    })
                })
                .collect();
            // Outside `unsent` the two agree, so this makes them equal; it cannot fail.
            sent.apply_changes(changes.clone())
                .map_err(|e| format!("the laptop's copy went wrong: {e}"))?;
            send_chunked(
                changes.into_iter().chain(bad.map(|(p, e)| (p, Some(e)))),
                problems,
                tx,
                |changes, problems, last| SyncReply::Changes {
                    changes,
                    problems,
                    last,
                },
            )
            .await
        }
        None => {
            let entries = prev.iter().map(|(p, e)| (p.clone(), e.clone()));
            send_chunked(
                entries.chain(bad),
                problems,
                tx,
                |entries, problems, last| SyncReply::Entries {
                    entries,
                    problems,
                    last,
                },
            )
            .await?;
            state.sent = Some(prev.clone());
            state.unsent.clear();
            Ok(())
        }
    }
}

/// With `Canary::BadTree` on (simulation only): an entry below the tree's first file.
fn bad_tree_canary(tree: &cs_sync::Snapshot) -> Option<(RelPath, cs_sync::Entry)> {
    if !cs_protocol::canary::active(cs_protocol::Canary::BadTree) {
        return None;
    }
    let (file, e) = tree
        .iter()
        .find(|(_, e)| matches!(e, cs_sync::Entry::File { .. }))?;
    Some((file.join("planted").ok()?, e.clone()))
}

/// Sends `items` in chunks of about [`ENTRIES_CHUNK_BYTES`], the problems with the last.
async fn send_chunked<E>(
    items: impl Iterator<Item = (RelPath, E)>,
    problems: Vec<(RelPath, String)>,
    tx: &mpsc::Sender<SyncReply>,
    make: impl Fn(Vec<(RelPath, E)>, Vec<(RelPath, String)>, bool) -> SyncReply,
) -> Result<(), String> {
    let mut chunk = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        bytes += item.0.as_str().len() + 64;
        chunk.push(item);
        if bytes >= ENTRIES_CHUNK_BYTES {
            tx.send(make(std::mem::take(&mut chunk), Vec::new(), false))
                .await
                .map_err(|_| GONE.to_string())?;
            bytes = 0;
        }
    }
    tx.send(make(chunk, problems, true))
        .await
        .map_err(|_| GONE.into())
}

/// Requests as the stream's reader decoded them; an `Err` ends the stream.
type Requests = mpsc::Receiver<Result<SyncRequest, String>>;

/// The next request of the stream (`None`: it ended).
async fn next_request(r: &mut Requests) -> Result<Option<SyncRequest>, String> {
    r.recv().await.transpose()
}

async fn apply(
    fs: &Arc<dyn RootFs>,
    ops: Vec<Op>,
    deltas: &[u32],
    recv: &mut Requests,
    state: &mut ScanState,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    if ops.len() > OPS_PER_APPLY_MAX {
        return Err(format!(
            "an Apply of {} ops (the most is {OPS_PER_APPLY_MAX})",
            ops.len()
        ));
    }
    let mut errors = Vec::with_capacity(ops.len());
    let kept = ops.clone();
    let mut batch = Batch::default();
    for (i, op) in ops.into_iter().enumerate() {
        if deltas.contains(&(i as u32)) {
            batch.flush(fs, &mut errors).await?;
            let delta = receive_delta(recv).await?;
            let f = fs.clone();
            let result = off_thread(fs.blocking(), move || {
                cs_sync::fs::apply_delta(&*f, &op, delta, DELTA_FILE_BYTES_MAX)
            })
            .await?;
            errors.push(result.err());
        } else if let Some(size) = content_size(&op) {
            if size <= SMALL_FILE_BYTES_MAX {
                let data = receive_small(recv, size).await?;
                batch.push(op, Some(data));
            } else {
                batch.flush(fs, &mut errors).await?;
                errors.push(apply_streamed(fs, op, recv).await?.err());
            }
        } else {
            batch.push(op, None);
        }
        if batch.full() {
            batch.flush(fs, &mut errors).await?;
        }
    }
    batch.flush(fs, &mut errors).await?;
    // Durable before reported: the laptop records what it is told was applied.
    let f = fs.clone();
    let skip = cs_protocol::canary::active(cs_protocol::Canary::UnsyncedApply);
    let paths: Vec<RelPath> = kept.iter().map(|op| op.path().clone()).collect();
    if let Err(e) = off_thread(
        fs.blocking(),
        move || if skip { Ok(()) } else { f.sync(&paths) },
    )
    .await?
    {
        for err in errors.iter_mut().filter(|e| e.is_none()) {
            *err = Some(e.clone());
        }
    }
    // The laptop records these in its copy of the tree as it reads the reply.
    for (op, err) in kept.iter().zip(&errors) {
        if err.is_none() {
            state.applied(op);
        }
    }
    tx.send(SyncReply::Applied { errors })
        .await
        .map_err(|_| GONE.into())
}

/// Ops waiting to be applied together on one blocking thread, in order.
#[derive(Default)]
struct Batch {
    ops: Vec<(Op, Option<Vec<u8>>)>,
    bytes: u64,
}

impl Batch {
    fn push(&mut self, op: Op, content: Option<Vec<u8>>) {
        self.bytes += content.as_ref().map_or(0, |c| c.len() as u64);
        self.ops.push((op, content));
    }

    fn full(&self) -> bool {
        self.bytes >= BATCH_BYTES_MAX || self.ops.len() >= BATCH_OPS_MAX
    }

    /// Applies what is waiting, one op after another, and records each op's error.
    async fn flush(
        &mut self,
        fs: &Arc<dyn RootFs>,
        errors: &mut Vec<Option<String>>,
    ) -> Result<(), String> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.ops);
        self.bytes = 0;
        let f = fs.clone();
        let results = off_thread(fs.blocking(), move || {
            ops.into_iter()
                .map(|(op, content)| match content {
                    Some(data) => f.apply(&op, Some(&mut std::io::Cursor::new(data))),
                    None => f.apply(&op, None),
                })
                .collect::<Vec<_>>()
        })
        .await?;
        errors.extend(results.into_iter().map(Result::err));
        Ok(())
    }
}

/// The size of the file an op writes, when its content follows on the stream.
fn content_size(op: &Op) -> Option<u64> {
    match op.result() {
        Some(cs_sync::Entry::File { size, .. }) if needs_content(op) => Some(*size),
        _ => None,
    }
}

/// The `Data` chunks of a file announced as `size` bytes, gathered. What comes past the
/// announced size is not kept beyond one chunk (the apply then refuses the file as longer
/// than announced), but is read, so the stream stays in step.
async fn receive_small(recv: &mut Requests, size: u64) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(size as usize);
    loop {
        let d = next_data(recv).await?;
        if d.is_empty() {
            return Ok(data);
        }
        if data.len() as u64 <= size {
            data.extend_from_slice(&d);
        }
    }
}

/// Applies a file op whose content follows on the stream as `Data` chunks. On a real root the
/// chunks stream into the blocking apply; in memory they are gathered first.
async fn apply_streamed(
    fs: &Arc<dyn RootFs>,
    op: Op,
    recv: &mut Requests,
) -> Result<Result<(), String>, String> {
    if !fs.blocking() {
        let mut data = Vec::new();
        loop {
            let d = next_data(recv).await?;
            if d.is_empty() {
                break;
            }
            if data.len() as u64 + d.len() as u64 > DELTA_FILE_BYTES_MAX {
                return Err("a file over the in-memory limit".into());
            }
            data.extend_from_slice(&d);
        }
        return Ok(fs.apply(&op, Some(&mut std::io::Cursor::new(data))));
    }
    let (chunks, mut reader) = ChunkReader::channel();
    let f = fs.clone();
    let task = tokio::task::spawn_blocking(move || {
        let r = f.apply(&op, Some(&mut reader));
        // Drain the rest so the stream keeps flowing after a refusal.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
        r
    });
    let mut chunks = Some(chunks);
    loop {
        let d = next_data(recv).await?;
        if d.is_empty() {
            break;
        }
        if let Some(c) = &chunks {
            if c.send(d).await.is_err() {
                chunks = None;
            }
        }
    }
    drop(chunks);
    task.await.map_err(|e| format!("apply task failed: {e}"))
}

/// Whether content goes packed on this stream's connection: only on a distant link
/// ([`cs_protocol::sync::PACK_RTT_MS_MIN`]).
pub(crate) fn packs(probe: &cs_transport::TailProbe) -> bool {
    probe
        .base_rtt()
        .is_some_and(|r| r >= Duration::from_millis(cs_protocol::sync::PACK_RTT_MS_MIN))
}

/// The next `Data` chunk of a file in an `Apply`.
async fn next_data(recv: &mut Requests) -> Result<Vec<u8>, String> {
    match next_request(recv).await? {
        Some(SyncRequest::Data(d)) => Ok(d),
        Some(_) => Err("expected file content in an Apply".to_string()),
        None => Err("stream ended inside a file".to_string()),
    }
}

async fn read(
    fs: &Arc<dyn RootFs>,
    files: Vec<(RelPath, Option<cs_sync::delta::Signature>)>,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    let gone = |_| GONE.to_string();
    if files.len() > OPS_PER_APPLY_MAX {
        return Err(format!("a Read of {} files", files.len()));
    }
    for (path, signature) in files {
        if let Some(sig) = signature {
            // The laptop has a basis: answer with a delta against it.
            let (f, p) = (fs.clone(), path.clone());
            let made = off_thread(fs.blocking(), move || {
                f.read(&p, DELTA_FILE_BYTES_MAX)
                    .map(|data| cs_sync::delta::delta(&sig, &data))
            })
            .await?;
            match made {
                Ok(d) => {
                    tx.send(SyncReply::File(Ok(()))).await.map_err(gone)?;
                    for part in split_delta(d) {
                        tx.send(SyncReply::Delta(part)).await.map_err(gone)?;
                    }
                }
                Err(e) => tx.send(SyncReply::File(Err(e))).await.map_err(gone)?,
            }
            continue;
        }
        if !fs.blocking() {
            match fs.read(&path, DELTA_FILE_BYTES_MAX) {
                Ok(data) => {
                    tx.send(SyncReply::File(Ok(()))).await.map_err(gone)?;
                    for c in data.chunks(DATA_CHUNK_BYTES_MAX) {
                        tx.send(SyncReply::Data(c.to_vec())).await.map_err(gone)?;
                    }
                    tx.send(SyncReply::Data(Vec::new())).await.map_err(gone)?;
                }
                Err(e) => tx.send(SyncReply::File(Err(e))).await.map_err(gone)?,
            }
            continue;
        }
        let (f, p) = (fs.clone(), path.clone());
        let open = move || f.open(&p).map_err(std::io::Error::other);
        let mut chunks = read_chunks(open, DATA_CHUNK_BYTES_MAX);
        match chunks.recv().await {
            Some(Err(e)) => {
                tx.send(SyncReply::File(Err(e.to_string())))
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

async fn signatures(
    fs: &Arc<dyn RootFs>,
    paths: Vec<RelPath>,
    tx: &mpsc::Sender<SyncReply>,
) -> Result<(), String> {
    if paths.len() > OPS_PER_APPLY_MAX {
        return Err(format!("signatures of {} files asked at once", paths.len()));
    }
    let f = fs.clone();
    let signatures = off_thread(fs.blocking(), move || {
        paths
            .iter()
            .map(|p| {
                f.read(p, DELTA_FILE_BYTES_MAX)
                    .ok()
                    .map(|d| cs_sync::delta::signature(&d))
            })
            .collect()
    })
    .await?;
    tx.send(SyncReply::Signatures { signatures })
        .await
        .map_err(|_| GONE.into())
}

async fn receive_delta(recv: &mut Requests) -> Result<cs_sync::delta::Delta, String> {
    let mut a = DeltaAssembler::default();
    loop {
        match next_request(recv).await? {
            Some(SyncRequest::Delta(part)) => {
                if let Some(d) = a
                    .push(part, DELTA_OPS_MAX, DELTA_FILE_BYTES_MAX)
                    .map_err(|e| e.to_string())?
                {
                    return Ok(d);
                }
            }
            Some(_) => return Err("expected a delta in an Apply".into()),
            None => return Err("stream ended inside a delta".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cs_sync::{content_hash, Entry};

    fn create_file(path: &str, content: &[u8]) -> Op {
        Op::Create {
            path: RelPath::parse(path).unwrap(),
            entry: Entry::File {
                size: content.len() as u64,
                exec: false,
                hash: content_hash(content),
            },
        }
    }

    /// Small files go in batches, a large one streams between them, and a file whose content
    /// runs past its announced size is refused on its own: every op gets its own result, in
    /// order, and the stream is left exactly after the Apply's last chunk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_apply_of_small_and_large_files_writes_each_and_stays_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn RootFs> = Arc::new(OsRoot::new(dir.path().to_path_buf()));
        let mut state = ScanState::open(&fs, None).await;
        let big: Vec<u8> = (0..(SMALL_FILE_BYTES_MAX as u32 + 70_000))
            .map(|i| (i % 249) as u8)
            .collect();
        // (op, the chunks sent for it)
        let mut plan: Vec<(Op, Vec<Vec<u8>>)> = vec![(
            Op::Create {
                path: RelPath::parse("d").unwrap(),
                entry: Entry::Dir,
            },
            vec![],
        )];
        for i in 0..(BATCH_OPS_MAX + 40) {
            let content = format!("file {i}\n").repeat(i % 7).into_bytes();
            plan.push((create_file(&format!("d/f{i}"), &content), vec![content]));
            if i == 100 {
                let chunks = big
                    .chunks(DATA_CHUNK_BYTES_MAX)
                    .map(<[u8]>::to_vec)
                    .collect();
                plan.push((create_file("d/big", &big), chunks));
                let liar = create_file("d/liar", b"abc");
                plan.push((liar, vec![b"abcdefghij".to_vec()]));
            }
        }
        let (req_tx, mut recv) = mpsc::channel(4096);
        let mut ops = Vec::new();
        let mut liar = None;
        for (i, (op, chunks)) in plan.iter().enumerate() {
            if op.path().as_str() == "d/liar" {
                liar = Some(i);
            }
            ops.push(op.clone());
            if !needs_content(op) {
                continue;
            }
            // As the laptop sends them: an empty chunk only ends a file.
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                req_tx.send(Ok(SyncRequest::Data(c.clone()))).await.unwrap();
            }
            req_tx
                .send(Ok(SyncRequest::Data(Vec::new())))
                .await
                .unwrap();
        }
        // What follows the Apply on the stream.
        req_tx.send(Ok(SyncRequest::Data(vec![7]))).await.unwrap();
        let (tx, mut replies) = mpsc::channel(4);
        apply(&fs, ops, &[], &mut recv, &mut state, &tx)
            .await
            .unwrap();
        let Some(SyncReply::Applied { errors }) = replies.recv().await else {
            panic!("no Applied reply");
        };
        assert_eq!(errors.len(), plan.len());
        for (i, ((op, chunks), err)) in plan.iter().zip(&errors).enumerate() {
            let path = dir.path().join(op.path().as_str());
            if Some(i) == liar {
                assert!(err.is_some(), "content past its size was accepted");
                assert!(!path.exists());
            } else if needs_content(op) {
                assert_eq!(err, &None, "{}", op.path().as_str());
                assert_eq!(std::fs::read(&path).unwrap(), chunks.concat());
            } else {
                assert_eq!(err, &None);
                assert!(path.is_dir());
            }
        }
        match recv.recv().await {
            Some(Ok(SyncRequest::Data(d))) => assert_eq!(d, [7]),
            _ => panic!("the Apply did not leave the stream in step"),
        }
    }

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
