//! One sync session's loop, in the laptop daemon. The laptop is alpha and the controller (as
//! in Mutagen): each cycle scans both sides, reconciles them against the ancestor (the last
//! tree both agreed on, persisted under `$CS_HOME/sync/NAME/`), sends beta's ops with their
//! content, fetches alpha's content and applies alpha's ops, then records the new ancestor.
//! Between cycles it waits for a filesystem event on either side, a command, or the periodic
//! safety-net rescan. A lost stream is reopened with capped backoff; nothing is lost meanwhile,
//! because the ancestor only moves for ops that were applied. Large whole files move on bulk
//! streams of their own while cycles go on (see `Session::transfer`).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use std::collections::{BTreeMap, BTreeSet};

use cs_protocol::sync::{
    needs_content, split_delta, wants_delta, DeltaAssembler, SyncOpen, SyncReply, SyncRequest,
    DELTA_FILE_BYTES_MAX, DELTA_OPS_MAX,
};
use cs_protocol::{StreamOpen, DATA_CHUNK_BYTES_MAX};
use cs_sync::delta::Signature;
use cs_sync::fs::{RootFs, Watch};
use cs_sync::scan::{HashCache, ScanOutput, CACHE_MAGIC};
use cs_sync::{Applied, Intent, Op, Plan, RelPath, Side, Snapshot};
use cs_transport::chunks::off_thread;
use cs_transport::{read_frame, write_frame};
use tokio::sync::{mpsc, oneshot, Notify};

use super::SyncSpec;
use super::SyncStatus;
use crate::home::CsHome;
use crate::link::Opened;

/// The periodic full rescan, in case an event was missed (a lost event batch already forces
/// one). Each costs a stat of every entry on both sides, so it is rare: an idle session
/// should cost next to nothing.
pub const RESCAN_MS: u64 = 300_000;
/// Reconnect delays double from the first to the cap.
const RETRY_DELAY_MS_MIN: u64 = 200;
const RETRY_DELAY_MS_MAX: u64 = 10_000;
/// Ops sent in one `Apply`, and files asked for in one `Read`.
const OPS_PER_BATCH_MAX: usize = 256;
/// `Apply` batches sent to the workspace before the first one's answer is read.
const APPLIES_IN_FLIGHT_MAX: usize = 8;
/// Replies buffered from the stream before the reader waits.
const REPLIES_QUEUED_MAX: usize = 64;
/// Entries one snapshot from the workspace may have.
const SNAPSHOT_ENTRIES_MAX: usize = 4_000_000;
/// The local hash cache is saved at most this often, or after a scan that hashed at least
/// `CACHE_SAVE_HASHED_MIN` files (a first scan): a stale cache only costs some rehashing.
const CACHE_SAVE_MS: u64 = 60_000;
const CACHE_SAVE_HASHED_MIN: usize = 1_000;
/// While an answer is late, the session probes the link at most this often (`Remote::reply`).
const WAITING_PROBE_MS_MIN: u64 = 20;

/// The daemon's `Env::bulk_bytes_min`.
pub const BULK_BYTES_MIN: u64 = 1 << 20;
/// Bulk streams one session runs at once.
const BULK_STREAMS_MAX: usize = 4;
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

/// The directory of a session's state (its ancestor, journal and hash cache).
pub fn session_dir(home: &CsHome, name: &str) -> PathBuf {
    home.dir.join("sync").join(name)
}

/// Where a session keeps its ancestor.
pub trait AncestorStore {
    fn load(&self) -> Snapshot;
    /// Replaces what is stored by `a` (pending intents stay).
    fn save_full(&self, a: &Snapshot) -> Result<(), String>;
    /// Makes the ancestor's latest `records` durable (`full` is the ancestor after them),
    /// and settles the intents at `settled`, before the session decides anything else. An
    /// ancestor older than the trees is not safe: a side that changed a path back to an old
    /// version would look unchanged.
    fn append(
        &self,
        records: &[cs_sync::Change],
        settled: &[RelPath],
        full: &Snapshot,
    ) -> Result<(), String>;
    /// Makes these intents durable before their ops go to the workspace.
    fn intend(&self, intents: &[Intent]) -> Result<(), String>;
    /// The intents not settled yet (after `load`: those a crash left).
    fn pending(&self) -> Vec<Intent>;
    /// The local root's hash cache as last saved (so a restart does not rehash the tree).
    fn load_cache(&self) -> HashCache {
        HashCache::new()
    }
    /// Keeps the hash cache for the next start; best effort (a stale cache only misses).
    fn save_cache(&self, _cache: &HashCache) {}
}

/// One entry of the ancestor's journal.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Journaled {
    /// A cycle's ancestor records, and the intents whose outcome they settle.
    Records {
        records: Vec<cs_sync::Change>,
        settled: Vec<RelPath>,
    },
    /// Ops about to go to the workspace.
    Intents(Vec<Intent>),
}

/// The ancestor in files under the session's directory: a base (`ancestor`: a magic line,
/// then a generation number and the snapshot in the codec's encoding) and a journal
/// (`ancestor.log`: each cycle's records and intents with the generation of the base they
/// follow, length-prefixed), replayed on load. Records of another generation (a journal left by a
/// crash between writing a new base and removing the old journal) are skipped. A cycle appends a few records and
/// syncs them (cheap, whatever the tree's size); the base is rewritten when the journal
/// grows past `JOURNAL_BYTES_MAX`, and the pending intents are written again after it. A
/// torn last record (a crash mid-append) is ignored: the cycle that wrote it did not finish.
/// An unreadable base starts from an empty ancestor, which only costs a full
/// reconciliation (nothing counts as deleted). A journal of the previous format
/// (`ancestor.journal`, records only) is replayed before the log.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    generation: Cell<u64>,
    intents: RefCell<BTreeMap<RelPath, Intent>>,
}

impl FileStore {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            generation: Cell::new(0),
            intents: RefCell::default(),
        }
    }

    /// Appends one entry to the log and syncs it.
    fn log(&self, entry: &Journaled) -> Result<(), String> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.dir.join(LOG_FILE);
        let body = cs_protocol::codec::encode_state(&(self.generation.get(), entry))
            .map_err(|e| e.to_string())?;
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend(body);
        let fail =
            |e: std::io::Error| format!("cannot save the ancestor in {}: {e}", path.display());
        std::fs::create_dir_all(&self.dir).map_err(fail)?;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(fail)?;
        f.write_all(&frame).map_err(fail)?;
        f.sync_data().map_err(fail)
    }
}

const ANCESTOR_FILE: &str = "ancestor";
/// The journal of the previous format (records only), replayed if present.
const JOURNAL_FILE: &str = "ancestor.journal";
const LOG_FILE: &str = "ancestor.log";
const ANCESTOR_MAGIC: &[u8] = b"cs-ancestor/1\n";
const CACHE_FILE: &str = "hash-cache";
/// The journal is folded into the base past this size.
const JOURNAL_BYTES_MAX: u64 = 4 << 20;

/// The length-prefixed frames of a journal file, up to a torn one.
fn frames(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let body = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(body)
    })
}

impl AncestorStore for FileStore {
    fn load(&self) -> Snapshot {
        let (generation, mut a): (u64, Snapshot) =
            cs_transport::state::load(&self.dir.join(ANCESTOR_FILE), ANCESTOR_MAGIC)
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "unreadable ancestor; starting from scratch");
                    None
                })
                .unwrap_or_default();
        self.generation.set(generation);
        let old = std::fs::read(self.dir.join(JOURNAL_FILE)).unwrap_or_default();
        for body in frames(&old) {
            match cs_protocol::codec::decode_state::<(u64, Vec<cs_sync::Change>)>(body) {
                Ok((g, records)) if g == generation => cs_sync::replay_records(&mut a, &records),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let log = std::fs::read(self.dir.join(LOG_FILE)).unwrap_or_default();
        let mut intents = self.intents.borrow_mut();
        intents.clear();
        for body in frames(&log) {
            match cs_protocol::codec::decode_state::<(u64, Journaled)>(body) {
                Ok((g, _)) if g != generation => {}
                Ok((_, Journaled::Records { records, settled })) => {
                    cs_sync::replay_records(&mut a, &records);
                    for p in &settled {
                        intents.remove(p);
                    }
                }
                Ok((_, Journaled::Intents(new))) => {
                    intents.extend(new.into_iter().map(|i| (i.path.clone(), i)));
                }
                Err(_) => break,
            }
        }
        a
    }

    fn save_full(&self, a: &Snapshot) -> Result<(), String> {
        let generation = self.generation.get() + 1;
        let base = self.dir.join(ANCESTOR_FILE);
        cs_transport::state::save(&base, ANCESTOR_MAGIC, &(generation, a))?;
        sync_file(&base)?;
        self.generation.set(generation);
        for file in [JOURNAL_FILE, LOG_FILE] {
            match std::fs::remove_file(self.dir.join(file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("cannot reset the ancestor journal: {e}"))
                }
                _ => {}
            }
        }
        let pending = self.pending();
        if pending.is_empty() {
            return Ok(());
        }
        self.log(&Journaled::Intents(pending))
    }

    fn append(
        &self,
        records: &[cs_sync::Change],
        settled: &[RelPath],
        full: &Snapshot,
    ) -> Result<(), String> {
        {
            let mut intents = self.intents.borrow_mut();
            let before = intents.len();
            for p in settled {
                intents.remove(p);
            }
            if records.is_empty() && intents.len() == before {
                return Ok(());
            }
        }
        let path = self.dir.join(LOG_FILE);
        let grown = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if grown > JOURNAL_BYTES_MAX || !self.dir.join(ANCESTOR_FILE).exists() {
            return self.save_full(full);
        }
        self.log(&Journaled::Records {
            records: records.to_vec(),
            settled: settled.to_vec(),
        })
    }

    fn intend(&self, intents: &[Intent]) -> Result<(), String> {
        if intents.is_empty() {
            return Ok(());
        }
        self.log(&Journaled::Intents(intents.to_vec()))?;
        let mut all = self.intents.borrow_mut();
        all.extend(intents.iter().map(|i| (i.path.clone(), i.clone())));
        Ok(())
    }

    fn pending(&self) -> Vec<Intent> {
        self.intents.borrow().values().cloned().collect()
    }

    fn load_cache(&self) -> HashCache {
        cs_transport::state::load(&self.dir.join(CACHE_FILE), CACHE_MAGIC)
            .unwrap_or_else(|e| {
                tracing::info!(error = %e, "unreadable hash cache; files will be hashed again");
                None
            })
            .unwrap_or_default()
    }

    fn save_cache(&self, cache: &HashCache) {
        if let Err(e) = cs_transport::state::save(&self.dir.join(CACHE_FILE), CACHE_MAGIC, cache) {
            tracing::info!(error = %e, "cannot keep the hash cache");
        }
    }
}

/// Makes a file's content durable.
fn sync_file(path: &std::path::Path) -> Result<(), String> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))
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
    /// Files at least this large whose content moves whole go on a QUIC stream of their own
    /// ([`BULK_BYTES_MIN`] for the daemon), so that small edits never wait behind them.
    pub bulk_bytes_min: u64,
    /// Kept alive as long as the session (a real watcher).
    pub guard: Option<Box<dyn std::any::Any>>,
    /// Also reconcile the whole trees after each reconciliation around the dirty paths, and
    /// halt if the plans differ (the simulation's check of the dirty tracking).
    pub check_dirty: bool,
}

/// Runs a session until it is terminated.
pub async fn run(
    spec: SyncSpec,
    env: Env,
    shared: Rc<Shared>,
    mut control: mpsc::Receiver<Control>,
) {
    let (bulk_tx, bulk_rx) = mpsc::channel(BULK_STREAMS_MAX);
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
        mover: Mover {
            fs: env.fs.clone(),
            shared: shared.clone(),
            name: spec.name.clone(),
            whole: Rc::default(),
        },
        open: env.open.clone(),
        bulk_bytes_min: env.bulk_bytes_min,
        inflight: BTreeMap::new(),
        dirty: None,
        check_dirty: env.check_dirty,
        settle: Vec::new(),
        applied_alpha: Vec::new(),
        recheck_beta: BTreeSet::new(),
        bulk_tx,
        bulk_rx,
        spec,
        shared,
    };
    let _guard = env.guard;
    let mut failures = 0u32;
    // After a cycle in which some op failed (a disk error, content that changed meanwhile),
    // the next runs after this delay even if nothing else happens; it doubles up to
    // `RETRY_DELAY_MS_MAX` while ops keep failing.
    let mut op_retry: Option<u64> = None;
    loop {
        if s.paused || s.halted {
            s.shared.state(if s.paused { "paused" } else { "halted" });
            if s.halted {
                // A flush asked after the halt gets its reason, not a wait for ever (the
                // watcher can halt the session before the flush that was to see it arrives).
                let why = s.shared.status.borrow().halted.clone();
                s.shared
                    .answer_flushes(Err(why.unwrap_or_else(|| "the session halted".into())));
            }
            match control.recv().await {
                None | Some(Control::Terminate) => return,
                Some(c) => s.control(c),
            }
            continue;
        }
        s.shared.state("connecting");
        let mut remote = match Remote::open(&s.spec, &env.open, !s.created, false).await {
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
                    op_retry = None;
                    s.shared.status.borrow_mut().last_error = None;
                    // Agreement is not reached while a file is still on its way.
                    if s.inflight.is_empty() {
                        s.shared.answer_flushes(Ok(()));
                    }
                }
                // Confirm at once only when someone waits for agreement (or nothing watches
                // this side): otherwise the events of what was just applied wake the next
                // cycle anyway, and an edit arriving meanwhile need not wait for an extra one.
                Ok(Outcome::Moved { failed: false })
                    if s.watch.is_none() || !s.shared.flush_waiters.borrow().is_empty() =>
                {
                    continue
                }
                Ok(Outcome::Moved { failed: false }) => op_retry = None,
                Ok(Outcome::Moved { failed: true }) => {
                    op_retry = Some(
                        op_retry.map_or(RETRY_DELAY_MS_MIN, |d| (d * 2).min(RETRY_DELAY_MS_MAX)),
                    );
                }
                Ok(Outcome::Halted(why)) => {
                    s.abort_bulk();
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
                    s.abort_bulk();
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
                Some(d) = s.bulk_rx.recv() => {
                    s.bulk_done(d);
                    false
                }
                _ = local_changed(&s.watch) => false,
                _ = tokio::time::sleep(Duration::from_millis(op_retry.unwrap_or(0))), if op_retry.is_some() => false,
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
    mover: Mover,
    open: Opener,
    /// Files at least this large whose content moves whole go on a stream of their own.
    bulk_bytes_min: u64,
    /// Bulk transfers under way, by path.
    inflight: BTreeMap<RelPath, tokio::task::JoinHandle<()>>,
    /// The paths the last completed cycle left to look at again (its plan's paths, see
    /// [`Plan::paths`], and those bulk streams settled since); with what the next scans
    /// report changed, the dirty set of the next reconciliation. `None`: the next one walks
    /// the whole trees (at the start, after a full rescan, after a cycle that did not
    /// complete, after a reset).
    dirty: Option<BTreeSet<RelPath>>,
    check_dirty: bool,
    /// Paths whose ops went to the workspace on the main stream this cycle: their outcome
    /// is known, so their intents are settled with the cycle's records.
    settle: Vec<RelPath>,
    /// Ops applied here since the last local scan, which records them in the scan before.
    applied_alpha: Vec<Op>,
    /// Paths bulk streams applied in the workspace since the last remote scan, which
    /// rescans them (the main stream's own ops are in both ends' copies already).
    recheck_beta: BTreeSet<RelPath>,
    bulk_tx: mpsc::Sender<BulkDone>,
    bulk_rx: mpsc::Receiver<BulkDone>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.abort_bulk();
    }
}

/// What a bulk stream reports: its op, for which side, and whether it was applied.
struct BulkDone {
    op: Op,
    target: Side,
    ok: bool,
}

impl Session {
    fn control(&mut self, c: Control) {
        match c {
            Control::Wake | Control::Terminate => {}
            Control::Pause => {
                self.paused = true;
                self.abort_bulk();
            }
            Control::Resume => {
                self.paused = false;
                self.halted = false;
                self.shared.status.borrow_mut().halted = None;
            }
            Control::Reset => {
                self.abort_bulk();
                self.dirty = None;
                self.ancestor = Snapshot::default();
                if let Err(e) = self.store.save_full(&self.ancestor) {
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
        // Record the bulk transfers that ended meanwhile, so their paths do not hold up
        // this cycle's ops.
        while let Ok(d) = self.bulk_rx.try_recv() {
            self.bulk_done(d);
        }
        let t0 = tokio::time::Instant::now();
        let full = std::mem::replace(&mut self.full_due, false);
        // Taken: a cycle that does not complete leaves the next one to walk everything.
        let mut dirty = self.dirty.take().filter(|_| !full);
        // Without a watch every scan is full.
        let changed = self.watch.as_ref().and_then(|w| w.take(full));
        let (f, ig, prev) = (self.fs.clone(), self.ignorer.clone(), self.prev.take());
        // A failed scan leaves `prev` empty: the changes it took are gone, so the next is full.
        // The last cycle's references are gone, so the previous scan is ours to update.
        let prev = prev.map(|p| Arc::try_unwrap(p).unwrap_or_else(|p| (*p).clone()));
        // What was applied here is in the root now, whenever its events arrive (they may
        // lag behind the writes, and a stale entry would look like an edit undone): the
        // previous scan takes it, and a later change there is an event like any other.
        let applied = std::mem::take(&mut self.applied_alpha);
        let prev = prev.map(|mut p| {
            for op in &applied {
                cs_sync::record_applied(&mut p.snapshot, op);
            }
            p
        });
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
        match (&mut dirty, &scanned.changes) {
            (Some(d), Some(changes)) => d.extend(changes.iter().map(|(p, _)| p.clone())),
            _ => dirty = None,
        }
        let t1 = tokio::time::Instant::now();
        // The workspace says when its root differs from our copy of it: without that, its
        // scan would only confirm the copy, a round trip an edit need not wait for. (An op
        // planned on a copy that just went stale is refused by the workspace's re-check.)
        // Paths the bulk streams applied there are rescanned (from the disk) there.
        // A flush asks the workspace too: it must see what changed there before it was
        // asked for, even if the workspace's `Changed` is still on its way.
        let remote_scan_why = if full {
            Some("full")
        } else if dirty.is_none() {
            Some("local scan was whole")
        } else if !remote.watched {
            Some("the workspace is not watched")
        } else if remote.beta_changed.get() {
            Some("the workspace changed")
        } else if !self.recheck_beta.is_empty() {
            Some("rechecks")
        } else if !self.shared.flush_waiters.borrow().is_empty() {
            Some("a flush")
        } else {
            None
        };
        let current = remote_scan_why.is_none();
        let (beta, remote_problems, remote_changed) = match &remote.beta {
            Some(b) if current => (b, remote.problems, Some(Vec::new())),
            _ => {
                let paths = std::mem::take(&mut self.recheck_beta);
                remote.scan(full, paths.into_iter().collect()).await?
            }
        };
        match (&mut dirty, remote_changed) {
            (Some(d), Some(changed)) => d.extend(changed),
            _ => dirty = None,
        }
        // Ops whose answer was lost (a dropped stream, a crash): what the workspace holds
        // now says whether they were applied.
        let unsettled: Vec<Intent> = self
            .store
            .pending()
            .into_iter()
            .filter(|i| !self.inflight.contains_key(&i.path))
            .collect();
        if !unsettled.is_empty() {
            let records: Vec<cs_sync::Change> = unsettled
                .iter()
                .map(|i| i.settle(beta.get(&i.path)))
                .collect();
            cs_sync::replay_records(&mut self.ancestor, &records);
            let settled: Vec<RelPath> = unsettled.into_iter().map(|i| i.path).collect();
            self.store
                .append(&records, &settled, &self.ancestor)
                .map_err(CycleError::Local)?;
            if let Some(d) = &mut dirty {
                d.extend(settled);
            }
        }
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
        let reconciled = match &dirty {
            Some(d) => cs_sync::reconcile_dirty(&self.ancestor, alpha, beta, self.spec.mode, d),
            None => cs_sync::reconcile(&self.ancestor, alpha, beta, self.spec.mode),
        };
        if self.check_dirty && dirty.is_some() {
            let whole = cs_sync::reconcile(&self.ancestor, alpha, beta, self.spec.mode);
            if whole != reconciled {
                return Ok(Outcome::Halted(format!(
                    "internal error: reconciling around {:?} gave {reconciled:?}, the whole trees {whole:?}",
                    dirty.as_ref().map(|d| d.len())
                )));
            }
        }
        let plan = match reconciled {
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
            self.shared.status.borrow_mut().chunks_packed += remote.packed.take();
            self.finish_cycle(alpha, &plan, dirty.is_some());
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
        let (to_beta, beta_moved, beta_failed) =
            self.transfer(remote, &plan.to_beta, Side::Beta).await?;
        let (to_alpha, alpha_moved, alpha_failed) =
            self.transfer(remote, &plan.to_alpha, Side::Alpha).await?;
        let t4 = tokio::time::Instant::now();
        let failed = beta_failed || alpha_failed;
        let applied = Applied { to_alpha, to_beta };
        let records = cs_sync::update_ancestor(&mut self.ancestor, &plan, &applied);
        let settled = std::mem::take(&mut self.settle);
        self.store
            .append(&records, &settled, &self.ancestor)
            .map_err(CycleError::Local)?;
        tracing::debug!(
            session = %self.spec.name,
            local_scan_us = (t1 - t0).as_micros() as u64,
            remote_scan_us = (t2 - t1).as_micros() as u64,
            reconcile_us = (t3 - t2).as_micros() as u64,
            transfer_us = (t4 - t3).as_micros() as u64,
            save_us = t4.elapsed().as_micros() as u64,
            to_beta = plan.to_beta.len(),
            to_alpha = plan.to_alpha.len(),
            remote_scan = remote_scan_why.unwrap_or("none"),
            "cycle"
        );
        self.shared.status.borrow_mut().chunks_packed += remote.packed.take();
        self.finish_cycle(alpha, &plan, dirty.is_some());
        // Ops waiting for a bulk stream do not count: its report wakes the session.
        let moved = beta_moved || alpha_moved;
        Ok(if moved {
            Outcome::Moved { failed }
        } else {
            Outcome::Quiet
        })
    }

    /// Moves the ops for `target`: an op on or above a path whose content is on its way on
    /// a bulk stream waits; a file of at least `bulk_bytes_min` whose content moves whole goes
    /// on a stream of its own (at most `BULK_STREAMS_MAX` at once), started after the other
    /// ops so its directory exists; the rest go on the main stream, in order. Returns which
    /// ops were applied now (a bulk op is recorded when its stream reports), whether any op
    /// moved on the main stream, and whether any of those failed.
    async fn transfer(
        &mut self,
        remote: &mut Remote,
        ops: &[Op],
        target: Side,
    ) -> Result<(Vec<bool>, bool, bool), CycleError> {
        let mut applied = vec![false; ops.len()];
        let (mut main, mut bulk) = (Vec::new(), Vec::new());
        for (i, op) in ops.iter().enumerate() {
            let path = op.path();
            let waits = self
                .inflight
                .range(path.clone()..)
                .next()
                .is_some_and(|(p, _)| p.starts_with(path));
            if waits {
                continue;
            }
            let large = matches!(op.result(), Some(cs_sync::Entry::File { size, .. }) if *size >= self.bulk_bytes_min);
            if large && needs_content(op) && !self.mover.delta_for(op, target) {
                if self.inflight.len() + bulk.len() < BULK_STREAMS_MAX {
                    bulk.push(i);
                }
                continue;
            }
            main.push(i);
        }
        let main_ops: Vec<Op> = main.iter().map(|i| ops[*i].clone()).collect();
        if target == Side::Beta {
            // Written down (and synced) once for the cycle, before anything goes out.
            let intents: Vec<Intent> = main
                .iter()
                .chain(&bulk)
                .filter_map(|i| Intent::of(&ops[*i]))
                .collect();
            self.store.intend(&intents).map_err(CycleError::Local)?;
        }
        let done = match target {
            Side::Beta => self.mover.send_to_beta(remote, &main_ops).await?,
            Side::Alpha => self.mover.fetch_to_alpha(remote, &main_ops).await?,
        };
        let failed = done.iter().any(|ok| !ok);
        if target == Side::Beta {
            self.settle
                .extend(main_ops.iter().map(|op| op.path().clone()));
        }
        for (op, _) in main_ops.iter().zip(&done).filter(|(_, ok)| **ok) {
            match (target, &mut remote.beta) {
                (Side::Beta, Some(copy)) => {
                    cs_sync::record_applied(copy, op);
                }
                (Side::Beta, None) => {}
                (Side::Alpha, _) => self.applied_alpha.push(op.clone()),
            }
        }
        for (i, ok) in main.iter().zip(done) {
            applied[*i] = ok;
        }
        let mut held = false;
        for i in bulk {
            // Only into a directory that is there: an op on an ancestor that waits or failed
            // holds the file back (else its stream fails, and keeps that ancestor waiting).
            let path = ops[i].path();
            let blocked = (0..i).any(|j| !applied[j] && path.starts_with(ops[j].path()));
            if blocked {
                held = true;
                continue;
            }
            self.spawn_bulk(ops[i].clone(), target);
        }
        Ok((applied, !main.is_empty(), failed || held))
    }

    /// Moves one op's content on a stream of its own; its outcome comes back as a
    /// [`BulkDone`].
    fn spawn_bulk(&mut self, op: Op, target: Side) {
        let (mover, open, spec, tx) = (
            self.mover.clone(),
            self.open.clone(),
            self.spec.clone(),
            self.bulk_tx.clone(),
        );
        let path = op.path().clone();
        let task = tokio::task::spawn_local(async move {
            let ops = [op];
            let moved = async {
                let mut r = Remote::open(&spec, &open, false, true)
                    .await
                    .map_err(CycleError::Stream)?;
                match target {
                    Side::Beta => mover.send_to_beta(&mut r, &ops).await,
                    Side::Alpha => mover.fetch_to_alpha(&mut r, &ops).await,
                }
            }
            .await;
            let ok = match moved {
                Ok(done) => done.first().copied().unwrap_or(false),
                Err(CycleError::Stream(e) | CycleError::Local(e) | CycleError::Violation(e)) => {
                    tracing::info!(session = %spec.name, path = %ops[0].path(), error = %e, "bulk transfer failed; the next cycle retries it");
                    false
                }
            };
            let [op] = ops;
            let _ = tx.send(BulkDone { op, target, ok }).await;
        });
        self.inflight.insert(path, task);
        self.shared.status.borrow_mut().bulk_in_flight = self.inflight.len();
    }

    /// Records what a bulk stream reported.
    fn bulk_done(&mut self, d: BulkDone) {
        self.inflight.remove(d.op.path());
        // A failed transfer may still have been applied (its answer lost): its intent
        // stays, and the next cycle settles it from what the workspace then holds.
        let settled = match (d.target, d.ok) {
            (Side::Beta, true) => vec![d.op.path().clone()],
            _ => Vec::new(),
        };
        if let Some(dirty) = &mut self.dirty {
            dirty.insert(d.op.path().clone());
        }
        match d.target {
            Side::Alpha if d.ok => self.applied_alpha.push(d.op.clone()),
            Side::Alpha => {}
            Side::Beta => {
                self.recheck_beta.insert(d.op.path().clone());
            }
        }
        let mut plan = Plan::default();
        match d.target {
            Side::Beta => plan.to_beta.push(d.op),
            Side::Alpha => plan.to_alpha.push(d.op),
        }
        let applied = Applied {
            to_alpha: vec![d.ok; plan.to_alpha.len()],
            to_beta: vec![d.ok; plan.to_beta.len()],
        };
        let records = cs_sync::update_ancestor(&mut self.ancestor, &plan, &applied);
        if let Err(e) = self.store.append(&records, &settled, &self.ancestor) {
            self.shared.error(&e);
        }
        if d.ok {
            self.shared.status.borrow_mut().files_bulk += 1;
        }
        self.shared.status.borrow_mut().bulk_in_flight = self.inflight.len();
    }

    /// Stops every bulk transfer (pause, reset, halt, terminate): their ops are re-planned.
    fn abort_bulk(&mut self) {
        for (_, t) in std::mem::take(&mut self.inflight) {
            t.abort();
        }
        self.shared.status.borrow_mut().bulk_in_flight = 0;
    }

    /// Ends a completed cycle: what `plan` decided is looked at again next cycle.
    fn finish_cycle(&mut self, alpha: &Snapshot, plan: &Plan, was_dirty: bool) {
        self.dirty = Some(plan.paths());
        let mut st = self.shared.status.borrow_mut();
        st.progress = None;
        st.cycles += 1;
        st.cycles_dirty += u64::from(was_dirty);
        st.entries = alpha.len();
    }
}

/// What moves content between the sides: the session's main stream and its bulk streams
/// share it.
#[derive(Clone)]
struct Mover {
    fs: Arc<dyn RootFs>,
    shared: Rc<Shared>,
    name: String,
    /// Paths whose last delta was refused (a wrong result, which the whole-file hash
    /// caught): their next transfer moves the whole file, so a rare false block match
    /// cannot fail forever.
    whole: Rc<RefCell<std::collections::BTreeSet<RelPath>>>,
}

/// Paths remembered in `Mover::whole`, at most.
const WHOLE_NEXT_MAX: usize = 4096;

impl Mover {
    /// Whether `op`'s content moves to `target` as a delta.
    fn delta_for(&self, op: &Op, target: Side) -> bool {
        let min = match target {
            Side::Alpha => cs_protocol::sync::DELTA_FILE_BYTES_MIN,
            Side::Beta => cs_protocol::sync::DELTA_UPLOAD_BYTES_MIN,
        };
        wants_delta(op, min) && !self.whole.borrow().contains(op.path())
    }

    /// Records how a delta for `path` went: only a wrong result moves it whole next time.
    fn delta_outcome(&self, path: &RelPath, r: Result<(), &str>) {
        let mut w = self.whole.borrow_mut();
        match r {
            Ok(()) => {
                w.remove(path);
            }
            Err(e) if !cs_sync::delta::is_wrong_result(e) => {}
            Err(_) => {
                if w.len() >= WHOLE_NEXT_MAX {
                    w.clear();
                }
                w.insert(path.clone());
            }
        }
    }

    /// Sends beta's ops with their content, in batches; up to `APPLIES_IN_FLIGHT_MAX`
    /// batches go out before the first one's `Applied` is read, so the workspace applies
    /// and syncs one while the next is on its way. Returns which ops were applied.
    async fn send_to_beta(&self, remote: &mut Remote, ops: &[Op]) -> Result<Vec<bool>, CycleError> {
        let mut applied = Vec::with_capacity(ops.len());
        // Batches sent whose `Applied` has not been read, oldest first, with the indexes of
        // their ops that went as deltas.
        let mut waiting: std::collections::VecDeque<(&[Op], Vec<usize>)> =
            std::collections::VecDeque::new();
        for batch in ops.chunks(OPS_PER_BATCH_MAX) {
            // Changed large files move as deltas against what the workspace has.
            let want: Vec<usize> = (0..batch.len())
                .filter(|i| self.delta_for(&batch[*i], Side::Beta))
                .collect();
            let mut sigs: BTreeMap<usize, Signature> = BTreeMap::new();
            if !want.is_empty() {
                // Answers come in order: the batches before are answered first.
                while let Some(w) = waiting.pop_front() {
                    self.read_applied(remote, w, &mut applied).await?;
                }
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
            let delta_sent: Vec<usize> = sigs.keys().copied().collect();
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
            waiting.push_back((batch, delta_sent));
            if waiting.len() >= APPLIES_IN_FLIGHT_MAX {
                let w = waiting.pop_front().expect("not empty");
                self.read_applied(remote, w, &mut applied).await?;
            }
        }
        while let Some(w) = waiting.pop_front() {
            self.read_applied(remote, w, &mut applied).await?;
        }
        Ok(applied)
    }

    /// Reads the `Applied` of a batch sent earlier and notes its outcome in `applied`.
    async fn read_applied(
        &self,
        remote: &mut Remote,
        (batch, delta_sent): (&[Op], Vec<usize>),
        applied: &mut Vec<bool>,
    ) -> Result<(), CycleError> {
        match remote.reply().await? {
            SyncReply::Applied { errors } if errors.len() == batch.len() => {
                for i in &delta_sent {
                    self.delta_outcome(batch[*i].path(), errors[*i].as_deref().map_or(Ok(()), Err));
                }
                for (op, e) in batch.iter().zip(&errors) {
                    if let Some(e) = e {
                        tracing::info!(session = %self.name, path = %op.path(), error = %e, "not applied in the workspace");
                        self.shared.status.borrow_mut().last_error = Some(e.clone());
                    }
                }
                applied.extend(errors.iter().map(Option::is_none));
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Fetches the content alpha's ops need and applies them, in order.
    async fn fetch_to_alpha(
        &self,
        remote: &mut Remote,
        ops: &[Op],
    ) -> Result<Vec<bool>, CycleError> {
        let mut applied = Vec::with_capacity(ops.len());
        for batch in ops.chunks(OPS_PER_BATCH_MAX) {
            // For a changed large file, send the signature of the laptop's copy: the
            // workspace answers with a delta against it.
            let mut files = Vec::new();
            for op in batch.iter().filter(|op| needs_content(op)) {
                let sig = if self.delta_for(op, Side::Alpha) {
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
                                self.delta_outcome(
                                    op.path(),
                                    r.as_ref().map(|_| ()).map_err(String::as_str),
                                );
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
                    tracing::info!(session = %self.name, path = %op.path(), error = %e, "not applied on the laptop");
                    self.shared.status.borrow_mut().last_error = Some(e.clone());
                }
                applied.push(result.is_ok());
            }
            // Durable before recorded: the ancestor must never hold what a power loss could
            // take back.
            let f = self.fs.clone();
            let paths: Vec<RelPath> = batch.iter().map(|op| op.path().clone()).collect();
            if let Err(e) = off_thread(self.fs.blocking(), move || f.sync(&paths))
                .await
                .and_then(|r| r)
            {
                tracing::warn!(session = %self.name, error = %e, "applied files are not durable; they count as not applied");
                let start = applied.len() - batch.len();
                applied[start..].iter_mut().for_each(|ok| *ok = false);
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
        SyncReply::Packed(_) => "Packed",
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
    /// The workspace's tree as this stream's scans gave it (the base of `Changes`), patched
    /// with every op the workspace reported applied, as the workspace patches its record of
    /// it ([`cs_sync::record_applied`]).
    beta: Option<Snapshot>,
    /// The last scan's problem count.
    problems: usize,
    /// The workspace watches its root, so it says `Changed` when it differs from `beta`.
    watched: bool,
    /// A `Changed` came since the last `Scan` went out (or none went out yet).
    beta_changed: Rc<Cell<bool>>,
    /// Set by the reader when the workspace sent something that does not decode (a path
    /// with `..`, an absolute path, a malformed frame).
    violation: Rc<RefCell<Option<String>>>,
    /// Poked after every frame sent: the end of each burst is probed.
    probe: cs_transport::TailProbe,
    /// Content chunks sent or received packed since the session last took the count.
    packed: Rc<Cell<u64>>,
}

impl Remote {
    /// Opens a stream for the session: its main one, or with `bulk` one that carries a
    /// single large file (the agent gives it no watcher, cache or `Changed` pushes).
    async fn open(
        spec: &SyncSpec,
        opener: &Opener,
        first: bool,
        bulk: bool,
    ) -> Result<Self, String> {
        let open = StreamOpen::Sync(SyncOpen {
            session: spec.name.clone(),
            root: spec.remote.clone(),
            create: first,
            ignore: spec.ignore.clone(),
            bulk,
        });
        let opened = opener(open).await?;
        let payload = &opened.first_frame[cs_protocol::codec::FRAME_HEADER_BYTES..];
        let watched = match cs_protocol::decode::<SyncReply>(payload).map_err(|e| e.to_string())? {
            SyncReply::Ready { root, watched } => {
                tracing::info!(session = %spec.name, %root, watched, "sync stream open");
                watched
            }
            SyncReply::Refused { reason } => return Err(reason),
            _ => return Err("the workspace did not acknowledge the sync stream".into()),
        };
        let (tx, replies) = mpsc::channel(REPLIES_QUEUED_MAX);
        let changed = Rc::new(Notify::new());
        let lost = Rc::new(Notify::new());
        let violation = Rc::new(RefCell::new(None));
        let beta_changed = Rc::new(Cell::new(true));
        let (c, l, v, bc) = (
            changed.clone(),
            lost.clone(),
            violation.clone(),
            beta_changed.clone(),
        );
        let mut recv = opened.recv;
        let packed = Rc::new(Cell::new(0));
        let pk = packed.clone();
        tokio::task::spawn_local(async move {
            loop {
                match read_frame::<_, SyncReply>(&mut recv).await {
                    Ok(Some(SyncReply::Changed)) => {
                        bc.set(true);
                        c.notify_one();
                    }
                    Ok(Some(r)) => {
                        pk.set(pk.get() + u64::from(matches!(r, SyncReply::Packed(_))));
                        match r.unpacked() {
                            Ok(r) => {
                                if tx.send(r).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                *v.borrow_mut() =
                                    Some(format!("the workspace sent an invalid message: {e}"));
                                break;
                            }
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
            packed,
            probe: opened.probe,
            send: opened.send,
            replies,
            changed,
            lost,
            violation,
            beta: None,
            problems: 0,
            watched,
            beta_changed,
        })
    }

    async fn send(&mut self, r: &SyncRequest) -> Result<(), CycleError> {
        write_frame(&mut self.send, r)
            .await
            .map_err(|e| CycleError::Stream(format!("sending to the workspace: {e}")))?;
        self.probe.poke();
        Ok(())
    }

    async fn reply(&mut self) -> Result<SyncReply, CycleError> {
        // While the answer is late, probe every half round trip: each probe carries our
        // acknowledgements again (one of them may be what got lost) and draws the workspace's,
        // so a lost request or answer, or a lost retransmission of either, is found within
        // about a round trip instead of a probe timeout that doubles each time.
        let every = self
            .probe
            .rtt()
            .map(|r| (r / 2).max(Duration::from_millis(WAITING_PROBE_MS_MIN)));
        let got = loop {
            let Some(every) = every else {
                break self.replies.recv().await;
            };
            tokio::select! {
                biased;
                r = self.replies.recv() => break r,
                () = tokio::time::sleep(every) => self.probe.poke(),
            }
        };
        match got {
            Some(r) => Ok(r),
            None => Err(match self.violation.borrow_mut().take() {
                Some(v) => CycleError::Violation(v),
                None => CycleError::Stream("the workspace closed the sync stream".into()),
            }),
        }
    }

    /// Asks for a scan and gathers the snapshot: whole, or as changes to the stream's last
    /// one. Returns it, the number of problems, and the changed paths (`None`: a whole tree).
    async fn scan(
        &mut self,
        full: bool,
        paths: Vec<RelPath>,
    ) -> Result<(&Snapshot, usize, Option<Vec<RelPath>>), CycleError> {
        self.beta_changed.set(false);
        self.send(&SyncRequest::Scan { full, paths }).await?;
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
        let mut changed = None;
        let snapshot = if whole == Some(false) {
            changed = Some(changes.iter().map(|(p, _)| p.clone()).collect());
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
        self.problems = problems;
        Ok((self.beta.insert(snapshot), problems, changed))
    }

    /// Sends a chunk of file content, packed if `packed` and worth it.
    async fn send_data(&mut self, chunk: Vec<u8>, packed: bool) -> Result<(), CycleError> {
        let r = SyncRequest::data(chunk, packed);
        if matches!(r, SyncRequest::Packed(_)) {
            self.packed.set(self.packed.get() + 1);
        }
        self.send(&r).await
    }

    /// Sends a local file as `Data` chunks and the empty end chunk. Returns its size. A file
    /// that cannot be read is sent short: the workspace refuses it (wrong size or hash).
    async fn send_file(&mut self, fs: &Arc<dyn RootFs>, path: &RelPath) -> Result<u64, CycleError> {
        let mut sent = 0u64;
        // Content goes packed only over a distant link (`PACK_RTT_MS_MIN`).
        let packed = self
            .probe
            .base_rtt()
            .is_some_and(|r| r >= Duration::from_millis(cs_protocol::sync::PACK_RTT_MS_MIN));
        if !fs.blocking() {
            let data = fs.read(path, DELTA_FILE_BYTES_MAX).unwrap_or_default();
            for c in data.chunks(DATA_CHUNK_BYTES_MAX) {
                sent += c.len() as u64;
                self.send_data(c.to_vec(), packed).await?;
            }
        } else {
            let (f, p) = (fs.clone(), path.clone());
            let open = move || f.open(&p).map_err(std::io::Error::other);
            let mut chunks = cs_transport::chunks::read_chunks(open, DATA_CHUNK_BYTES_MAX);
            while let Some(c) = chunks.recv().await {
                match c {
                    Ok(data) => {
                        sent += data.len() as u64;
                        self.send_data(data, packed).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use cs_sync::{content_hash, Entry};

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

    #[test]
    fn the_ancestor_journal_replays_skips_torn_and_stale_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().to_path_buf());
        assert_eq!(store.load(), Snapshot::default());
        let mut a = Snapshot::default();
        let step = |a: &mut Snapshot, records: Vec<cs_sync::Change>| {
            cs_sync::replay_records(a, &records);
            store.append(&records, &[], a).unwrap();
        };
        step(
            &mut a,
            vec![(p(""), Some(Entry::Dir)), (p("x"), Some(file(1)))],
        );
        step(&mut a, vec![(p("y"), Some(file(2)))]);
        step(&mut a, vec![(p("x"), None)]);
        let fresh = || FileStore::new(dir.path().to_path_buf()).load();
        assert_eq!(fresh(), a);
        assert!(a.get(&p("x")).is_none() && a.get(&p("y")).is_some());
        // A crash mid-append leaves a torn record: it is ignored.
        let journal = dir.path().join(LOG_FILE);
        let mut bytes = std::fs::read(&journal).unwrap();
        let whole = bytes.clone();
        bytes.extend([200, 0, 0, 0, 1, 2]);
        std::fs::write(&journal, &bytes).unwrap();
        assert_eq!(fresh(), a);
        // A crash between a new base and the removal of the old journal: the old records
        // (which would take `x` back) belong to the old generation and are skipped.
        let store = FileStore::new(dir.path().to_path_buf());
        store.load();
        store.save_full(&a).unwrap();
        std::fs::write(&journal, &whole).unwrap();
        assert_eq!(fresh(), a);
    }

    #[test]
    fn intents_stay_pending_until_settled_across_restarts_and_rebases() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("session");
        let fresh = || {
            let s = FileStore::new(dir.clone());
            let a = s.load();
            (s, a)
        };
        let intent = |name: &str, n: u8| Intent {
            path: p(name),
            old: Some(file(n)),
            new: Some(file(n + 1)),
        };
        let (store, a) = fresh();
        // The session's directory does not exist yet: the first intent makes it.
        store.intend(&[intent("x", 1), intent("y", 3)]).unwrap();
        let (store, _) = fresh();
        assert_eq!(store.pending(), vec![intent("x", 1), intent("y", 3)]);
        // Settling one (with or without records) leaves the other.
        store.append(&[], &[p("x")], &a).unwrap();
        let (store, _) = fresh();
        assert_eq!(store.pending(), vec![intent("y", 3)]);
        // A new base keeps what is still pending.
        store.save_full(&a).unwrap();
        let (store, _) = fresh();
        assert_eq!(store.pending(), vec![intent("y", 3)]);
        store
            .append(&[(p(""), Some(Entry::Dir))], &[p("y")], &a)
            .unwrap();
        let (store, a2) = fresh();
        assert!(store.pending().is_empty());
        assert!(a2.has_root());
    }

    #[test]
    fn a_journal_of_the_previous_format_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().to_path_buf());
        store.load();
        store.save_full(&Snapshot::with_root()).unwrap();
        let records: Vec<cs_sync::Change> = vec![(p("x"), Some(file(1)))];
        let body = cs_protocol::codec::encode_state(&(1u64, &records)).unwrap();
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend(body);
        std::fs::write(dir.path().join(JOURNAL_FILE), frame).unwrap();
        let a = FileStore::new(dir.path().to_path_buf()).load();
        assert_eq!(a.get(&p("x")), Some(&file(1)));
    }
}
