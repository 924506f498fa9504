//! One sync session's loop, in the laptop daemon. The laptop is alpha and the controller (as
//! in Mutagen): each cycle scans both sides, reconciles them against the ancestor (the last
//! tree both agreed on, persisted under `$CS_HOME/sync/NAME/`), sends beta's ops with their
//! content, fetches alpha's content and applies alpha's ops, then records the new ancestor.
//! Between cycles it waits for a filesystem event on either side, a command, or the periodic
//! safety-net rescan. A lost stream is reopened with capped backoff; nothing is lost meanwhile,
//! because the ancestor only moves for ops that were applied.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use cs_protocol::sync::{
    needs_content, split_delta, wants_delta, DeltaAssembler, SyncOpen, SyncReply, SyncRequest,
    DELTA_FILE_BYTES_MAX, DELTA_OPS_MAX,
};
use cs_protocol::{StreamOpen, DATA_CHUNK_BYTES_MAX};
use cs_sync::delta::Signature;
use cs_sync::fs::{RootFs, Watch};
use cs_sync::scan::{HashCache, ScanOutput, CACHE_MAGIC};
use cs_sync::{Applied, Op, Plan, RelPath, Snapshot};
use cs_transport::chunks::off_thread;
use cs_transport::{read_frame, write_frame};
use tokio::sync::{mpsc, oneshot, Notify};

use super::SyncSpec;
use super::SyncStatus;
use crate::home::CsHome;
use crate::link::Opened;

/// The periodic full rescan, in case an event was missed.
pub const RESCAN_MS: u64 = 30_000;
/// Reconnect delays double from the first to the cap.
const RETRY_DELAY_MS_MIN: u64 = 200;
const RETRY_DELAY_MS_MAX: u64 = 10_000;
/// Ops sent in one `Apply`, and files asked for in one `Read`.
const OPS_PER_BATCH_MAX: usize = 256;
/// Replies buffered from the stream before the reader waits.
const REPLIES_QUEUED_MAX: usize = 64;
/// Entries one snapshot from the workspace may have.
const SNAPSHOT_ENTRIES_MAX: usize = 4_000_000;
/// A busy session saves its ancestor at most this often, and whenever the sides agree. An
/// older ancestor is safe (see `FileStore`); a save of a large tree costs tens of ms, which
/// must not be paid on every edit.
const ANCESTOR_SAVE_MS: u64 = 2_000;
/// The local hash cache is saved at most this often, or after a scan that hashed at least
/// `CACHE_SAVE_HASHED_MIN` files (a first scan): a stale cache only costs some rehashing.
const CACHE_SAVE_MS: u64 = 60_000;
const CACHE_SAVE_HASHED_MIN: usize = 1_000;
/// How long filesystem events are gathered before a cycle starts.
const COALESCE_MS: u64 = 10;

/// What the hub can ask of a running session.
#[derive(Debug)]
pub enum Control {
    /// Run a cycle now (a flush is waiting).
    Wake,
    Pause,
    Resume,
    /// Forget the ancestor (and a halt); the next cycle starts from scratch.
    Reset,
    Terminate,
}

/// State shared between a session and the hub that reports it.
#[derive(Debug)]
pub struct Shared {
    pub status: RefCell<SyncStatus>,
    pub conflicts: RefCell<Vec<cs_sync::Conflict>>,
    /// `cs sync flush` callers, answered after the next cycle that finds nothing to do.
    pub flush_waiters: RefCell<Vec<oneshot::Sender<Result<(), String>>>>,
}

impl Shared {
    fn state(&self, s: &str) {
        self.status.borrow_mut().state = s.into();
    }

    fn error(&self, e: &str) {
        tracing::warn!(session = %self.status.borrow().name, error = %e, "sync error");
        self.status.borrow_mut().last_error = Some(e.to_string());
    }

    fn answer_flushes(&self, r: Result<(), String>) {
        for w in self.flush_waiters.borrow_mut().drain(..) {
            let _ = w.send(r.clone());
        }
    }
}

/// Where a session keeps its ancestor.
pub fn session_dir(home: &CsHome, name: &str) -> PathBuf {
    home.dir.join("sync").join(name)
}

/// Where a session keeps its ancestor.
pub trait AncestorStore {
    fn load(&self) -> Snapshot;
    fn save(&self, a: &Snapshot) -> Result<(), String>;
    /// The local root's hash cache as last saved (so a restart does not rehash the tree).
    fn load_cache(&self) -> HashCache {
        HashCache::new()
    }
    /// Keeps the hash cache for the next start; best effort (a stale cache only misses).
    fn save_cache(&self, _cache: &HashCache) {}
}

/// The ancestor in a file under the session's directory: a magic line, then the snapshot in
/// the codec's encoding (compact: a 32-byte hash stays 32 bytes).
///
/// Saved after every cycle that moved something, through a temporary file and a rename, not
/// synced to disk: an ancestor older than the trees loses nothing (paths that agree need
/// nothing; at worst a path changed since looks like a conflict, or a file deleted since
/// comes back), and a torn or unreadable one only costs a full reconciliation against an
/// empty ancestor.
#[derive(Debug)]
pub struct FileStore(pub PathBuf);

const ANCESTOR_FILE: &str = "ancestor";
const ANCESTOR_MAGIC: &[u8] = b"cs-ancestor/1\n";
const CACHE_FILE: &str = "hash-cache";

impl AncestorStore for FileStore {
    fn load(&self) -> Snapshot {
        cs_transport::state::load(&self.0.join(ANCESTOR_FILE), ANCESTOR_MAGIC)
            .unwrap_or_else(|e| {
                // With an empty ancestor nothing counts as deleted: content is never lost.
                tracing::error!(error = %e, "unreadable ancestor; starting from scratch");
                None
            })
            .unwrap_or_default()
    }

    fn save(&self, a: &Snapshot) -> Result<(), String> {
        cs_transport::state::save(&self.0.join(ANCESTOR_FILE), ANCESTOR_MAGIC, a)
    }

    fn load_cache(&self) -> HashCache {
        cs_transport::state::load(&self.0.join(CACHE_FILE), CACHE_MAGIC)
            .unwrap_or_else(|e| {
                tracing::info!(error = %e, "unreadable hash cache; files will be hashed again");
                None
            })
            .unwrap_or_default()
    }

    fn save_cache(&self, cache: &HashCache) {
        if let Err(e) = cs_transport::state::save(&self.0.join(CACHE_FILE), CACHE_MAGIC, cache) {
            tracing::info!(error = %e, "cannot keep the hash cache");
        }
    }
}

/// Opens a stream to the session's workspace (the daemon's link, or the simulation's).
pub type Opener =
    Rc<dyn Fn(StreamOpen) -> futures_util::future::LocalBoxFuture<'static, Result<Opened, String>>>;

/// What a session needs from the world.
pub struct Env {
    /// Alpha's root.
    pub fs: Arc<dyn RootFs>,
    /// Alpha's filesystem events (`None`: every scan is full).
    pub watch: Option<Watch>,
    pub open: Opener,
    pub store: Rc<dyn AncestorStore>,
    /// Kept alive as long as the session (a real watcher).
    pub guard: Option<Box<dyn std::any::Any>>,
}

/// Runs a session until it is terminated.
pub async fn run(
    spec: SyncSpec,
    env: Env,
    shared: Rc<Shared>,
    mut control: mpsc::Receiver<Control>,
) {
    let mut s = Session {
        ignorer: match spec.ignore.ignorer() {
            Ok(i) => i,
            Err(e) => {
                shared.state("error");
                shared.error(&e.to_string());
                return;
            }
        },
        ancestor: env.store.load(),
        ancestor_dirty: false,
        ancestor_saved: tokio::time::Instant::now(),
        // The first scan is full (events were missed while stopped), but only files whose
        // (size, mtime, inode, mode) changed since the saved cache are hashed.
        prev: Some(Arc::new(ScanOutput {
            cache: env.store.load_cache(),
            ..ScanOutput::default()
        })),
        cache_saved: tokio::time::Instant::now(),
        full_due: true,
        fs: env.fs.clone(),
        watch: env.watch.clone(),
        store: env.store.clone(),
        paused: spec.paused,
        halted: false,
        created: false,
        spec,
        shared,
    };
    let _guard = env.guard;
    let mut failures = 0u32;
    loop {
        if s.paused || s.halted {
            s.shared.state(if s.paused { "paused" } else { "halted" });
            match control.recv().await {
                None | Some(Control::Terminate) => return,
                Some(c) => s.control(c),
            }
            continue;
        }
        s.shared.state("connecting");
        let mut remote = match Remote::open(&s.spec, &env.open, !s.created).await {
            Ok(r) => {
                failures = 0;
                s.created = true;
                r
            }
            Err(e) => {
                s.shared.error(&e);
                s.shared
                    .answer_flushes(Err(format!("cannot reach the workspace: {e}")));
                failures += 1;
                let delay = (RETRY_DELAY_MS_MIN << failures.min(16)).min(RETRY_DELAY_MS_MAX);
                tokio::select! {
                    biased;
                    c = control.recv() => match c {
                        None | Some(Control::Terminate) => return,
                        Some(c) => s.control(c),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                }
                continue;
            }
        };
        // Connected: cycle until the stream breaks or a command interrupts.
        loop {
            match s.cycle(&mut remote).await {
                Ok(Outcome::Quiet) => {
                    s.shared.status.borrow_mut().last_error = None;
                    s.shared.answer_flushes(Ok(()));
                }
                Ok(Outcome::Moved { failed: false }) => continue,
                Ok(Outcome::Moved { failed: true }) => {}
                Ok(Outcome::Halted(why)) => {
                    s.halted = true;
                    s.shared.status.borrow_mut().halted = Some(why.clone());
                    s.shared.answer_flushes(Err(why));
                    break;
                }
                Err(CycleError::Local(e)) => {
                    s.shared.error(&e);
                }
                Err(CycleError::Stream(e)) => {
                    s.shared.error(&e);
                    break;
                }
                Err(CycleError::Violation(e)) => {
                    let why = format!(
                        "{e}; nothing more is taken from the workspace until you check its agent and run `cs sync resume {}`",
                        s.spec.name
                    );
                    s.shared.error(&why);
                    s.halted = true;
                    s.shared.status.borrow_mut().halted = Some(why.clone());
                    s.shared.answer_flushes(Err(why));
                    break;
                }
            }
            s.shared.state("watching");
            let stop = tokio::select! {
                biased;
                c = control.recv() => match c {
                    None | Some(Control::Terminate) => return,
                    Some(c) => { s.control(c); s.paused || s.halted }
                },
                _ = remote.changed.notified() => false,
                _ = local_changed(&s.watch) => false,
                _ = tokio::time::sleep(Duration::from_millis(RESCAN_MS)) => {
                    s.full_due = true;
                    false
                }
                _ = remote.lost.notified() => {
                    s.shared.error("the connection to the workspace was lost");
                    true
                }
            };
            if stop {
                break;
            }
            // Let a burst of events settle into one cycle.
            tokio::time::sleep(Duration::from_millis(COALESCE_MS)).await;
        }
    }
}

/// How a cycle ended.
enum Outcome {
    /// Both sides agreed: nothing moved.
    Quiet,
    /// Changes moved; run again to confirm, unless some failed (then wait for a change).
    Moved { failed: bool },
    /// A side was wiped; sync stopped instead of propagating it.
    Halted(String),
}

enum CycleError {
    /// The stream to the workspace broke.
    Stream(String),
    /// Something on the laptop failed (the local root cannot be scanned...).
    Local(String),
    /// The workspace broke the protocol (a path with `..`, a tree whose entries hang off a
    /// file or symlink, a reply out of turn): the session halts rather than act on it.
    Violation(String),
}

/// Waits for an event under alpha's root; forever without a watch (rescans still run).
async fn local_changed(w: &Option<Watch>) {
    match w {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

struct Session {
    spec: SyncSpec,
    fs: Arc<dyn RootFs>,
    watch: Option<Watch>,
    store: Rc<dyn AncestorStore>,
    shared: Rc<Shared>,
    ignorer: cs_sync::ignore::Ignorer,
    ancestor: Snapshot,
    /// The ancestor changed since it was last saved (saves are spaced; see
    /// `ANCESTOR_SAVE_MS`).
    ancestor_dirty: bool,
    ancestor_saved: tokio::time::Instant,
    /// The last local scan, the basis of the next incremental one.
    prev: Option<Arc<ScanOutput>>,
    /// When the hash cache was last saved (see `CACHE_SAVE_MS`).
    cache_saved: tokio::time::Instant,
    /// The next cycle scans everything on both sides (first cycle, periodic safety net).
    full_due: bool,
    paused: bool,
    halted: bool,
    /// The workspace root was created (or found) by a first successful open.
    created: bool,
}

impl Session {
    fn control(&mut self, c: Control) {
        match c {
            Control::Wake | Control::Terminate => {}
            Control::Pause => {
                self.paused = true;
                if self.ancestor_dirty {
                    if let Err(e) = self.save_ancestor() {
                        self.shared.error(&e);
                    }
                }
            }
            Control::Resume => {
                self.paused = false;
                self.halted = false;
                self.shared.status.borrow_mut().halted = None;
            }
            Control::Reset => {
                self.ancestor = Snapshot::default();
                if let Err(e) = self.store.save(&self.ancestor) {
                    self.shared.error(&e);
                }
                self.halted = false;
                self.shared.status.borrow_mut().halted = None;
            }
        }
    }

    async fn cycle(&mut self, remote: &mut Remote) -> Result<Outcome, CycleError> {
        self.shared.state("scanning");
        self.shared.status.borrow_mut().progress = None;
        let t0 = tokio::time::Instant::now();
        let full = std::mem::replace(&mut self.full_due, false);
        // Without a watch every scan is full.
        let changed = self.watch.as_ref().and_then(|w| w.take(full));
        let (f, ig, prev) = (self.fs.clone(), self.ignorer.clone(), self.prev.take());
        // A failed scan leaves `prev` empty: the changes it took are gone, so the next is full.
        // The last cycle's references are gone, so the previous scan is ours to update.
        let prev = prev.map(|p| Arc::try_unwrap(p).unwrap_or_else(|p| (*p).clone()));
        let scanned = off_thread(self.fs.blocking(), move || f.scan(&ig, prev, changed))
            .await
            .map_err(CycleError::Local)?
            .map_err(CycleError::Local)?;
        let scanned = Arc::new(scanned);
        if scanned.files_hashed >= CACHE_SAVE_HASHED_MIN
            || t0.duration_since(self.cache_saved) >= Duration::from_millis(CACHE_SAVE_MS)
        {
            self.store.save_cache(&scanned.cache);
            self.cache_saved = t0;
        }
        let alpha = &scanned.snapshot;
        let local_problems = scanned.problems.len();
        self.prev = Some(scanned.clone());
        let t1 = tokio::time::Instant::now();
        let (beta, remote_problems) = remote.scan(full).await?;
        let t2 = tokio::time::Instant::now();
        for (side, tree) in [("local", alpha), ("workspace", beta)] {
            if tree.len() as u64 > self.spec.max_entry_count {
                return Ok(Outcome::Halted(format!(
                    "the {side} tree has {} entries, more than this session's --max-entry-count of {}; ignore some of it, or recreate the session with a higher limit",
                    tree.len(),
                    self.spec.max_entry_count
                )));
            }
        }
        self.shared.state("reconciling");
        let plan = match cs_sync::reconcile(&self.ancestor, alpha, beta, self.spec.mode) {
            Ok(p) => p,
            Err(halt) => {
                return Ok(Outcome::Halted(format!(
                    "{halt}; restore it, or run `cs sync reset {}` to sync it from the other side",
                    self.spec.name
                )))
            }
        };
        {
            let mut st = self.shared.status.borrow_mut();
            st.conflicts = plan.conflicts.len();
            st.problems = plan.problems.len() + local_problems + remote_problems;
        }
        *self.shared.conflicts.borrow_mut() = plan.conflicts.clone();
        if plan.is_empty() {
            if self.ancestor_dirty {
                self.save_ancestor().map_err(CycleError::Local)?;
            }
            self.finish_cycle(alpha);
            return Ok(Outcome::Quiet);
        }
        self.shared.state("transferring");
        {
            let sized = |op: &Op| match op.result() {
                Some(cs_sync::Entry::File { size, .. }) if needs_content(op) => Some(*size),
                _ => None,
            };
            let sizes: Vec<u64> = plan
                .to_beta
                .iter()
                .chain(&plan.to_alpha)
                .filter_map(sized)
                .collect();
            self.shared.status.borrow_mut().progress = Some(super::Progress {
                files_total: sizes.len() as u64,
                bytes_total: sizes.iter().sum(),
                ..Default::default()
            });
        }
        let t3 = tokio::time::Instant::now();
        let to_beta = self.send_to_beta(remote, &plan).await?;
        let to_alpha = self.fetch_to_alpha(remote, &plan).await?;
        let t4 = tokio::time::Instant::now();
        let failed = to_beta.iter().chain(&to_alpha).any(|ok| !ok);
        let applied = Applied { to_alpha, to_beta };
        cs_sync::update_ancestor(&mut self.ancestor, &plan, &applied);
        self.ancestor_dirty = true;
        if t0.duration_since(self.ancestor_saved) >= Duration::from_millis(ANCESTOR_SAVE_MS) {
            self.save_ancestor().map_err(CycleError::Local)?;
        }
        tracing::debug!(
            session = %self.spec.name,
            local_scan_us = (t1 - t0).as_micros() as u64,
            remote_scan_us = (t2 - t1).as_micros() as u64,
            reconcile_us = (t3 - t2).as_micros() as u64,
            transfer_us = (t4 - t3).as_micros() as u64,
            save_us = t4.elapsed().as_micros() as u64,
            to_beta = plan.to_beta.len(),
            to_alpha = plan.to_alpha.len(),
            "cycle"
        );
        self.finish_cycle(alpha);
        let moved = !plan.to_alpha.is_empty() || !plan.to_beta.is_empty();
        Ok(if moved {
            Outcome::Moved { failed }
        } else {
            Outcome::Quiet
        })
    }

    /// Saves the ancestor if it changed since the last save.
    fn save_ancestor(&mut self) -> Result<(), String> {
        self.store.save(&self.ancestor)?;
        self.ancestor_dirty = false;
        self.ancestor_saved = tokio::time::Instant::now();
        Ok(())
    }

    fn finish_cycle(&self, alpha: &Snapshot) {
        let mut st = self.shared.status.borrow_mut();
        st.progress = None;
        st.cycles += 1;
        st.entries = alpha.len();
    }

    /// Sends beta's ops with their content. Returns which were applied.
    async fn send_to_beta(
        &mut self,
        remote: &mut Remote,
        plan: &Plan,
    ) -> Result<Vec<bool>, CycleError> {
        let mut applied = Vec::with_capacity(plan.to_beta.len());
        for batch in plan.to_beta.chunks(OPS_PER_BATCH_MAX) {
            // Changed large files move as deltas against what the workspace has.
            let want: Vec<usize> = (0..batch.len())
                .filter(|i| wants_delta(&batch[*i]))
                .collect();
            let mut sigs: BTreeMap<usize, Signature> = BTreeMap::new();
            if !want.is_empty() {
                let paths = want.iter().map(|i| batch[*i].path().clone()).collect();
                remote.send(&SyncRequest::Signatures { paths }).await?;
                match remote.reply().await? {
                    SyncReply::Signatures { signatures } if signatures.len() == want.len() => {
                        for (i, sig) in want.iter().zip(signatures) {
                            if let Some(sig) = sig {
                                sigs.insert(*i, sig);
                            }
                        }
                    }
                    other => return Err(unexpected(&other)),
                }
            }
            remote
                .send(&SyncRequest::Apply {
                    ops: batch.to_vec(),
                    deltas: sigs.keys().map(|i| *i as u32).collect(),
                })
                .await?;
            for (i, op) in batch.iter().enumerate() {
                if let Some(sig) = sigs.remove(&i) {
                    let (f, p) = (self.fs.clone(), op.path().clone());
                    let made = off_thread(self.fs.blocking(), move || {
                        f.read(&p, DELTA_FILE_BYTES_MAX)
                            .map(|data| cs_sync::delta::delta(&sig, &data))
                    })
                    .await
                    .map_err(CycleError::Local)?;
                    // A file that cannot be read now still gets an (empty, wrong) delta, which
                    // the workspace refuses by its hash: the next cycle sees the new state.
                    let d = made.unwrap_or_else(|_| cs_sync::delta::Delta {
                        ops: Vec::new(),
                        target_bytes: 0,
                        target_hash: [0; 32],
                    });
                    let literal = d.literal_bytes();
                    for part in split_delta(d) {
                        remote.send(&SyncRequest::Delta(part)).await?;
                    }
                    let mut st = self.shared.status.borrow_mut();
                    st.files_to_beta += 1;
                    st.bytes_to_beta += literal;
                    st.advance(op);
                } else if needs_content(op) {
                    let sent = remote.send_file(&self.fs, op.path()).await?;
                    let mut st = self.shared.status.borrow_mut();
                    st.files_to_beta += 1;
                    st.bytes_to_beta += sent;
                    st.advance(op);
                }
            }
            match remote.reply().await? {
                SyncReply::Applied { errors } if errors.len() == batch.len() => {
                    for (op, e) in batch.iter().zip(&errors) {
                        if let Some(e) = e {
                            tracing::info!(session = %self.spec.name, path = %op.path(), error = %e, "not applied in the workspace");
                            self.shared.status.borrow_mut().last_error = Some(e.clone());
                        }
                    }
                    applied.extend(errors.iter().map(Option::is_none));
                }
                other => return Err(unexpected(&other)),
            }
        }
        Ok(applied)
    }

    /// Fetches the content alpha's ops need and applies them, in order.
    async fn fetch_to_alpha(
        &mut self,
        remote: &mut Remote,
        plan: &Plan,
    ) -> Result<Vec<bool>, CycleError> {
        let mut applied = Vec::with_capacity(plan.to_alpha.len());
        for batch in plan.to_alpha.chunks(OPS_PER_BATCH_MAX) {
            // For a changed large file, send the signature of the laptop's copy: the
            // workspace answers with a delta against it.
            let mut files = Vec::new();
            for op in batch.iter().filter(|op| needs_content(op)) {
                let sig = if wants_delta(op) {
                    let (f, p) = (self.fs.clone(), op.path().clone());
                    off_thread(self.fs.blocking(), move || {
                        f.read(&p, DELTA_FILE_BYTES_MAX)
                            .ok()
                            .map(|d| cs_sync::delta::signature(&d))
                    })
                    .await
                    .map_err(CycleError::Local)?
                } else {
                    None
                };
                files.push((op.path().clone(), sig));
            }
            if !files.is_empty() {
                remote.send(&SyncRequest::Read { files }).await?;
            }
            for op in batch {
                let result = if needs_content(op) {
                    match remote.reply().await? {
                        SyncReply::File(Ok(())) => match remote.reply().await? {
                            SyncReply::Delta(first) => {
                                let d = remote.receive_delta(first).await?;
                                let literal = d.literal_bytes();
                                let (f, o) = (self.fs.clone(), op.clone());
                                let r = off_thread(self.fs.blocking(), move || {
                                    cs_sync::fs::apply_delta(&*f, &o, d, DELTA_FILE_BYTES_MAX)
                                })
                                .await
                                .and_then(|r| r);
                                if r.is_ok() {
                                    let mut st = self.shared.status.borrow_mut();
                                    st.files_to_alpha += 1;
                                    st.bytes_to_alpha += literal;
                                    st.advance(op);
                                }
                                r
                            }
                            SyncReply::Data(first) => {
                                let (bytes, r) =
                                    remote.receive_and_apply(&self.fs, op, first).await?;
                                if r.is_ok() {
                                    let mut st = self.shared.status.borrow_mut();
                                    st.files_to_alpha += 1;
                                    st.bytes_to_alpha += bytes;
                                    st.advance(op);
                                }
                                r
                            }
                            other => return Err(unexpected(&other)),
                        },
                        SyncReply::File(Err(e)) => Err(e),
                        other => return Err(unexpected(&other)),
                    }
                } else {
                    let (f, o) = (self.fs.clone(), op.clone());
                    off_thread(self.fs.blocking(), move || f.apply(&o, None))
                        .await
                        .and_then(|r| r)
                };
                if let Err(e) = &result {
                    tracing::info!(session = %self.spec.name, path = %op.path(), error = %e, "not applied on the laptop");
                    self.shared.status.borrow_mut().last_error = Some(e.clone());
                }
                applied.push(result.is_ok());
            }
        }
        Ok(applied)
    }
}

fn unexpected(r: &SyncReply) -> CycleError {
    let kind = match r {
        SyncReply::Ready { .. } => "Ready",
        SyncReply::Refused { .. } => "Refused",
        SyncReply::Entries { .. } => "Entries",
        SyncReply::Changes { .. } => "Changes",
        SyncReply::Applied { .. } => "Applied",
        SyncReply::Signatures { .. } => "Signatures",
        SyncReply::File(_) => "File",
        SyncReply::Data(_) => "Data",
        SyncReply::Delta(_) => "Delta",
        SyncReply::Changed => "Changed",
    };
    CycleError::Violation(format!("the workspace answered out of turn ({kind})"))
}

/// The workspace side of a session, over one stream.
struct Remote {
    send: quinn::SendStream,
    replies: mpsc::Receiver<SyncReply>,
    changed: Rc<Notify>,
    lost: Rc<Notify>,
    /// The workspace's tree as this stream's last scan gave it (the base of `Changes`).
    beta: Option<Snapshot>,
    /// Set by the reader when the workspace sent something that does not decode (a path
    /// with `..`, an absolute path, a malformed frame).
    violation: Rc<RefCell<Option<String>>>,
}

impl Remote {
    async fn open(spec: &SyncSpec, opener: &Opener, first: bool) -> Result<Self, String> {
        let open = StreamOpen::Sync(SyncOpen {
            session: spec.name.clone(),
            root: spec.remote.clone(),
            create: first,
            ignore: spec.ignore.clone(),
        });
        let opened = opener(open).await?;
        let payload = &opened.first_frame[cs_protocol::codec::FRAME_HEADER_BYTES..];
        match cs_protocol::decode::<SyncReply>(payload).map_err(|e| e.to_string())? {
            SyncReply::Ready { root } => {
                tracing::info!(session = %spec.name, %root, "sync stream open");
            }
            SyncReply::Refused { reason } => return Err(reason),
            _ => return Err("the workspace did not acknowledge the sync stream".into()),
        }
        let (tx, replies) = mpsc::channel(REPLIES_QUEUED_MAX);
        let changed = Rc::new(Notify::new());
        let lost = Rc::new(Notify::new());
        let violation = Rc::new(RefCell::new(None));
        let (c, l, v) = (changed.clone(), lost.clone(), violation.clone());
        let mut recv = opened.recv;
        tokio::task::spawn_local(async move {
            loop {
                match read_frame::<_, SyncReply>(&mut recv).await {
                    Ok(Some(SyncReply::Changed)) => c.notify_one(),
                    Ok(Some(r)) => {
                        if tx.send(r).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(cs_transport::framed::FrameError::Decode(e)) => {
                        *v.borrow_mut() =
                            Some(format!("the workspace sent an invalid message: {e}"));
                        break;
                    }
                    Err(_) => break,
                }
            }
            l.notify_one();
        });
        Ok(Self {
            send: opened.send,
            replies,
            changed,
            lost,
            violation,
            beta: None,
        })
    }

    async fn send(&mut self, r: &SyncRequest) -> Result<(), CycleError> {
        write_frame(&mut self.send, r)
            .await
            .map_err(|e| CycleError::Stream(format!("sending to the workspace: {e}")))
    }

    async fn reply(&mut self) -> Result<SyncReply, CycleError> {
        match self.replies.recv().await {
            Some(r) => Ok(r),
            None => Err(match self.violation.borrow_mut().take() {
                Some(v) => CycleError::Violation(v),
                None => CycleError::Stream("the workspace closed the sync stream".into()),
            }),
        }
    }

    /// Asks for a scan and gathers the snapshot: whole, or as changes to the stream's last
    /// one. Returns it and the number of problems.
    async fn scan(&mut self, full: bool) -> Result<(&Snapshot, usize), CycleError> {
        self.send(&SyncRequest::Scan { full }).await?;
        let mut entries = Vec::new();
        let mut changes = Vec::new();
        let mut whole = None;
        let mut problems = 0;
        loop {
            let (last, is_whole) = match self.reply().await? {
                SyncReply::Entries {
                    entries: e,
                    problems: p,
                    last,
                } => {
                    entries.extend(e);
                    problems += p.len();
                    (last, true)
                }
                SyncReply::Changes {
                    changes: c,
                    problems: p,
                    last,
                } => {
                    changes.extend(c);
                    problems += p.len();
                    (last, false)
                }
                other => return Err(unexpected(&other)),
            };
            if *whole.get_or_insert(is_whole) != is_whole {
                return Err(CycleError::Violation(
                    "the workspace mixed a whole tree with changes".into(),
                ));
            }
            if entries.len().max(changes.len()) > SNAPSHOT_ENTRIES_MAX {
                return Err(CycleError::Stream(format!(
                    "the workspace tree has more than {SNAPSHOT_ENTRIES_MAX} entries"
                )));
            }
            if last {
                break;
            }
        }
        // Whatever goes wrong below, the stream's last tree is no longer known.
        let base = self.beta.take();
        let snapshot = if whole == Some(false) {
            let mut b = base.ok_or_else(|| {
                CycleError::Violation("the workspace sent changes before a whole tree".into())
            })?;
            b.apply_changes(changes).map_err(|e| {
                CycleError::Violation(format!("the workspace sent an invalid change: {e}"))
            })?;
            if b.len() > SNAPSHOT_ENTRIES_MAX {
                return Err(CycleError::Stream(format!(
                    "the workspace tree has more than {SNAPSHOT_ENTRIES_MAX} entries"
                )));
            }
            b
        } else {
            Snapshot::from_entries(entries).map_err(|e| {
                CycleError::Violation(format!("the workspace sent an invalid tree: {e}"))
            })?
        };
        Ok((self.beta.insert(snapshot), problems))
    }

    /// Sends a local file as `Data` chunks and the empty end chunk. Returns its size. A file
    /// that cannot be read is sent short: the workspace refuses it (wrong size or hash).
    async fn send_file(&mut self, fs: &Arc<dyn RootFs>, path: &RelPath) -> Result<u64, CycleError> {
        let mut sent = 0u64;
        if !fs.blocking() {
            let data = fs.read(path, DELTA_FILE_BYTES_MAX).unwrap_or_default();
            for c in data.chunks(DATA_CHUNK_BYTES_MAX) {
                sent += c.len() as u64;
                self.send(&SyncRequest::Data(c.to_vec())).await?;
            }
        } else {
            let (f, p) = (fs.clone(), path.clone());
            let open = move || f.open(&p).map_err(std::io::Error::other);
            let mut chunks = cs_transport::chunks::read_chunks(open, DATA_CHUNK_BYTES_MAX);
            while let Some(c) = chunks.recv().await {
                match c {
                    Ok(data) => {
                        sent += data.len() as u64;
                        self.send(&SyncRequest::Data(data)).await?;
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "cannot read a file to send; the workspace will refuse it");
                        break;
                    }
                }
            }
        }
        self.send(&SyncRequest::Data(Vec::new())).await?;
        Ok(sent)
    }

    /// Receives a file's `Data` chunks (starting with `first`, up to the empty one) and applies
    /// `op` with them: streamed into the blocking apply on a real root, gathered first in
    /// memory. Returns the bytes received and the apply's result.
    async fn receive_and_apply(
        &mut self,
        fs: &Arc<dyn RootFs>,
        op: &Op,
        first: Vec<u8>,
    ) -> Result<(u64, Result<(), String>), CycleError> {
        if !fs.blocking() {
            let mut data = first;
            let mut done = data.is_empty();
            while !done {
                match self.reply().await? {
                    SyncReply::Data(d) if d.is_empty() => done = true,
                    SyncReply::Data(d) => data.extend_from_slice(&d),
                    other => return Err(unexpected(&other)),
                }
            }
            let n = data.len() as u64;
            return Ok((n, fs.apply(op, Some(&mut std::io::Cursor::new(data)))));
        }
        let (tx, mut reader) = cs_transport::chunks::ChunkReader::channel();
        let (f, o) = (fs.clone(), op.clone());
        let task = tokio::task::spawn_blocking(move || {
            let r = f.apply(&o, Some(&mut reader));
            // Drain what is left so the sender never blocks on a refused op.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            r
        });
        let bytes = self.receive_file(first, tx).await?;
        let r = task
            .await
            .map_err(|e| format!("apply task failed: {e}"))
            .and_then(|r| r);
        Ok((bytes, r))
    }

    /// Receives `Data` chunks, starting with `first`, up to the empty one into `tx`. Returns
    /// the bytes received.
    async fn receive_file(
        &mut self,
        first: Vec<u8>,
        tx: mpsc::Sender<Vec<u8>>,
    ) -> Result<u64, CycleError> {
        let mut got = 0u64;
        let mut tx = Some(tx);
        let mut next = Some(first);
        loop {
            let d = match next.take() {
                Some(d) => d,
                None => match self.reply().await? {
                    SyncReply::Data(d) => d,
                    other => return Err(unexpected(&other)),
                },
            };
            if d.is_empty() {
                return Ok(got);
            }
            got += d.len() as u64;
            // The applier may have given up (a refused op): keep draining.
            if let Some(t) = &tx {
                if t.send(d).await.is_err() {
                    tx = None;
                }
            }
        }
    }

    /// Gathers a delta's parts, starting with `first`.
    async fn receive_delta(
        &mut self,
        first: cs_protocol::sync::DeltaPart,
    ) -> Result<cs_sync::delta::Delta, CycleError> {
        let mut a = DeltaAssembler::default();
        let mut next = Some(first);
        loop {
            let part = match next.take() {
                Some(p) => p,
                None => match self.reply().await? {
                    SyncReply::Delta(p) => p,
                    other => return Err(unexpected(&other)),
                },
            };
            if let Some(d) = a
                .push(part, DELTA_OPS_MAX, DELTA_FILE_BYTES_MAX)
                .map_err(|e| CycleError::Stream(format!("the workspace sent a bad delta: {e}")))?
            {
                return Ok(d);
            }
        }
    }
}
