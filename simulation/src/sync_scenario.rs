//! The sync scenario: a laptop runs the daemon's real sync session (`cs_cli::sync::session`)
//! over the real link and quinn, against the agent's real sync endpoint
//! (`cs_agent::sync::serve`), each side on an in-memory root ([`crate::memfs`]). Users on both
//! sides create, overwrite, delete and symlink files during the safety phase, while the seed's
//! faults strike; then edits stop and everything heals.
//!
//! Always: no version a user wrote is lost. Precisely, for every path whose last user action
//! (on either side, in virtual time) wrote content, that content is at the path on at least one
//! side at the end: sync never overwrites or deletes a version it has not seen. (An edit that
//! loses to a later deletion elsewhere is the deletion's user's choice; Mutagen's "the edit
//! wins" only ever keeps more.) Liveness: after the heal, a flush succeeds and both trees are
//! identical apart from the reported conflicts, before the deadline.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use cs_agent::serve::{accept_loop, Served};
use cs_cli::link::open_on_link;
use cs_cli::sync::session::{self, AncestorStore, Control, Env, Opener, Shared};
use cs_cli::sync::{SyncSpec, SyncStatus};
use cs_protocol::Canary;
use cs_sync::fs::RootFs;
use cs_sync::{Entry, Mode, RelPath, Snapshot};
use cs_transport::{Identity, TransportLimits};
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

use crate::clock::Sleep;
use crate::faults::{FaultKind, Options};
use crate::memfs::{MemRoot, MemRoots};
use crate::scenario::{
    agent_endpoint, guarded, heal, laptop_endpoint, quinn_seed, ws_host, Failure, FaultDriver,
    Outcome, SimConnector,
};
use crate::trace::Trace;

/// After the heal, both sides must agree by then.
const LIVENESS_BUDGET_MS: u64 = 40_000;
/// Wall-clock budget of one seed.
const WALL_LIMIT_MS: u64 = 60_000;
/// User edits a seed makes at most.
const EDITS_MAX: usize = 40;
/// Names edits pick from: few, so that both sides often touch the same paths.
const PATHS: &[&str] = &[
    "a", "b", "c", "d/a", "d/b", "d/e/a", "d/e/b", "e/a", "e/f/g",
];
/// Files this large or larger move as deltas when changed.
const LARGE_BYTES: usize = 80 * 1024;

/// Which side a user edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Alpha,
    Beta,
}

/// One user edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditKind {
    /// Write a file: `len` bytes of version `version` (a large one is mostly the same bytes
    /// across versions, so a change is a small delta).
    Write {
        len: usize,
        version: u32,
        exec: bool,
    },
    Remove,
    Symlink {
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub at_ms: u64,
    pub side: Side,
    pub path: &'static str,
    pub kind: EditKind,
}

/// A seed's sync options: the fault schedule of [`Options`] (one workspace) and the edits.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub faults: Options,
    pub edits: Vec<Edit>,
    /// Each side's reads and writes fail at this rate until the heal (0 in half the seeds).
    pub disk_error_rate: f64,
    /// Crashes wait (a little) for a moment when the node holds applied writes it has not
    /// made durable (half the seeds; derived from the seed without drawing from its
    /// generators, so the other options do not move).
    pub aim_crashes: bool,
}

impl SyncOptions {
    pub fn draw(seed: u64) -> Self {
        let mut faults = Options::draw(seed);
        // One workspace: every fault aimed at another one hits the only one.
        faults.workspaces = 1;
        for e in &mut faults.events {
            match &mut e.kind {
                FaultKind::Partition { ws, .. }
                | FaultKind::PartitionOneWay { ws, .. }
                | FaultKind::Clog { ws, .. }
                | FaultKind::AgentCrash { ws, .. } => *ws = 0,
                FaultKind::LaptopCrash | FaultKind::LaptopSleep { .. } => {}
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5ec5_ed17);
        let n = rng.gen_range(1..=EDITS_MAX);
        let mut edits: Vec<Edit> = (0..n)
            .map(|i| {
                let path = PATHS[rng.gen_range(0..PATHS.len())];
                let kind = match rng.gen_range(0..10) {
                    0..=5 => EditKind::Write {
                        len: if rng.gen_bool(0.2) {
                            LARGE_BYTES + rng.gen_range(0..4096)
                        } else {
                            rng.gen_range(0..3000)
                        },
                        version: i as u32,
                        exec: rng.gen_bool(0.2),
                    },
                    6..=8 => EditKind::Remove,
                    _ => EditKind::Symlink {
                        target: "a".to_string(),
                    },
                };
                Edit {
                    at_ms: rng.gen_range(0..faults.safety_ms.saturating_sub(200).max(1)),
                    side: if rng.gen_bool(0.5) {
                        Side::Alpha
                    } else {
                        Side::Beta
                    },
                    path,
                    kind,
                }
            })
            .collect();
        edits.sort_by_key(|e| e.at_ms);
        let disk_error_rate = if rng.gen_bool(0.5) {
            0.0
        } else {
            rng.gen_range(0.02..0.3)
        };
        Self {
            faults,
            edits,
            disk_error_rate,
            aim_crashes: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 63 == 1,
        }
    }
}

impl std::fmt::Display for SyncOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} edits {} disk errors {:.3}{}",
            self.faults,
            self.edits.len(),
            self.disk_error_rate,
            if self.aim_crashes {
                " crashes aimed"
            } else {
                ""
            }
        )
    }
}

/// The content of version `version` of a file of `len` bytes at `path`.
fn content(path: &str, len: usize, version: u32) -> Vec<u8> {
    let seed = path
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let mut out: Vec<u8> = (0..len as u32)
        .map(|i| (seed.wrapping_add(i.wrapping_mul(2_654_435_761)) >> 13) as u8)
        .collect();
    // Each version differs in a small window (and in a short file, everywhere it matters).
    let at = (version as usize * 997) % len.max(1);
    for (k, b) in out.iter_mut().skip(at).take(64).enumerate() {
        *b = (version as u8).wrapping_add(k as u8);
    }
    out
}

/// A user action, for the checker: content written, or content removed or overwritten (which
/// that user saw).
#[derive(Debug, Clone)]
enum Action {
    Wrote(Entry),
    Removed(Entry),
}

/// The ancestor, kept outside the laptop node (it is on the laptop's disk).
#[derive(Debug, Default)]
struct MemStore(
    RefCell<Snapshot>,
    RefCell<BTreeMap<RelPath, cs_sync::Intent>>,
);

impl AncestorStore for MemStore {
    fn load(&self) -> Snapshot {
        self.0.borrow().clone()
    }
    fn save_full(&self, a: &Snapshot) -> Result<(), String> {
        *self.0.borrow_mut() = a.clone();
        Ok(())
    }
    fn append(
        &self,
        records: &[cs_sync::Change],
        settled: &[RelPath],
        _full: &Snapshot,
    ) -> Result<(), String> {
        // Replayed, as the journal is on load, so a bad record would show.
        cs_sync::replay_records(&mut self.0.borrow_mut(), records);
        for p in settled {
            self.1.borrow_mut().remove(p);
        }
        Ok(())
    }
    fn intend(&self, intents: &[cs_sync::Intent]) -> Result<(), String> {
        let mut all = self.1.borrow_mut();
        all.extend(intents.iter().map(|i| (i.path.clone(), i.clone())));
        Ok(())
    }
    fn pending(&self) -> Vec<cs_sync::Intent> {
        self.1.borrow().values().cloned().collect()
    }
}

/// What the laptop node shares with the driver.
#[derive(Default)]
struct World {
    shared: Option<Rc<Shared>>,
    control: Option<mpsc::Sender<Control>>,
}

/// Runs one seed of the sync scenario.
pub fn run_sync_seed(seed: u64, trace: Trace, canaries: &[Canary]) -> Result<Outcome, Failure> {
    guarded(seed, &trace, canaries, || inner(seed, trace.clone()))
}

fn inner(seed: u64, trace: Trace) -> Result<Outcome, String> {
    let opts = SyncOptions::draw(seed);
    let fo = &opts.faults;
    let limits = TransportLimits {
        idle_timeout_ms: 4_000,
        keep_alive_ms: 1_000,
        ..TransportLimits::default()
    };
    let laptop_id =
        Identity::from_seed("sim laptop", quinn_seed(seed, 0xf0, 0)).map_err(|e| e.to_string())?;
    let agent_id =
        Identity::from_seed("sim agent", quinn_seed(seed, 0xf1, 0)).map_err(|e| e.to_string())?;
    let alpha = MemRoot::new("alpha");
    let beta = MemRoot::new("beta");
    alpha.set_disk_errors(seed ^ 0xa1fa, opts.disk_error_rate);
    beta.set_disk_errors(seed ^ 0xbe7a, opts.disk_error_rate);
    // The laptop starts with a tree; the workspace starts empty. `keep` is never edited, so
    // no root is ever emptied (a halt is tested end to end instead).
    alpha.create_root()?;
    alpha.user_write(
        &RelPath::parse("keep").map_err(|e| e.to_string())?,
        b"k",
        false,
    );
    alpha.user_write(
        &RelPath::parse("d/a").map_err(|e| e.to_string())?,
        &content("d/a", 500, 0),
        false,
    );
    let store = Rc::new(MemStore::default());
    let world = Rc::new(RefCell::new(World::default()));
    let sleep = Arc::new(Sleep::default());
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .simulation_duration(Duration::from_millis(
            fo.safety_ms + LIVENESS_BUDGET_MS + 10_000,
        ))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(fo.latency_max_ms))
        .build();
    crate::net::unheal_all();

    {
        let (id, fp, trace, limits, beta) = (
            agent_id.clone(),
            laptop_id.fingerprint(),
            trace.clone(),
            limits.clone(),
            beta.clone(),
        );
        let dg = fo.datagrams;
        let incarnation = Rc::new(std::cell::Cell::new(0u64));
        sim.host(ws_host(0), move || {
            let (id, trace, limits, beta) =
                (id.clone(), trace.clone(), limits.clone(), beta.clone());
            let inc = incarnation.get() + 1;
            incarnation.set(inc);
            async move {
                trace.event(&ws_host(0), "start", inc);
                let (ep, trust) =
                    agent_endpoint(seed, 0, inc, dg, &trace, &id, &limits, fp).await?;
                let exec = cs_exec::ExecActor::new(Rc::new(crate::script::ScriptSpawner)).start();
                accept_loop(
                    ep,
                    Served {
                        workspace: ws_host(0),
                        trust,
                        exec,
                        roots: Arc::new(MemRoots(beta)),
                        sync_permits: Arc::new(tokio::sync::Semaphore::new(4)),
                        supervisor: None,
                        logs: None,
                        log_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        reverse: Default::default(),
                        rsync_home: None,
                        rsync_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        dial: cs_agent::forward::os_dialer(),
                        forward_permits: Arc::new(tokio::sync::Semaphore::new(64)),
                        auto_mode: Default::default(),
                    },
                )
                .await;
                Ok(())
            }
        });
    }

    {
        let (trace, world, sleep, alpha, store) = (
            trace.clone(),
            world.clone(),
            sleep.clone(),
            alpha.clone(),
            store.clone(),
        );
        let agent_fp = agent_id.fingerprint();
        let dg = fo.datagrams;
        let incarnation = Rc::new(std::cell::Cell::new(0u64));
        sim.host("laptop", move || {
            let (trace, world, sleep, alpha, store, me) = (
                trace.clone(),
                world.clone(),
                sleep.clone(),
                alpha.clone(),
                store.clone(),
                laptop_id.clone(),
            );
            let inc = incarnation.get() + 1;
            incarnation.set(inc);
            async move {
                trace.event("laptop", "start", inc);
                let ep = laptop_endpoint(seed, inc, dg, &trace, sleep).await?;
                let link = SimConnector::to_agent(ep, me, 0, agent_fp, trace.clone()).start_link(0);
                let open: Opener = Rc::new(move |open| {
                    let link = link.clone();
                    Box::pin(async move { open_on_link(&link, "agent0", "agent0", &open).await })
                });
                let spec = SyncSpec {
                    name: "sim".into(),
                    local: "/sim/alpha".into(),
                    workspace: "sim/agent0".into(),
                    remote: "proj".into(),
                    mode: Mode::TwoWaySafe,
                    ignore: Default::default(),
                    max_entry_count: cs_cli::sync::ENTRY_COUNT_MAX_DEFAULT,
                    paused: false,
                };
                let shared = Rc::new(Shared {
                    status: RefCell::new(SyncStatus::default()),
                    conflicts: RefCell::new(Vec::new()),
                    flush_waiters: RefCell::new(Vec::new()),
                });
                let (tx, rx) = mpsc::channel(16);
                {
                    let mut w = world.borrow_mut();
                    w.shared = Some(shared.clone());
                    w.control = Some(tx);
                }
                let env = Env {
                    fs: alpha.clone(),
                    watch: Some(alpha.watch()),
                    open,
                    store,
                    // The large (80 KiB) files a seed creates go on streams of their own.
                    bulk_bytes_min: 64 * 1024,
                    guard: None,
                    check_dirty: true,
                };
                session::run(spec, env, shared, rx).await;
                Ok(())
            }
        });
    }

    let log = drive(&mut sim, &opts, &trace, &world, &sleep, &alpha, &beta)?;
    let (a, b) = (alpha.tree(), beta.tree());
    check_no_lost_write(&log, &a, &b)?;
    let w = world.borrow();
    let status = w
        .shared
        .as_ref()
        .map(|s| s.status.borrow().clone())
        .unwrap_or_default();
    if status.conflicts > 0 {
        trace.sometimes("sync: conflict reported");
    }
    if alpha.disk_errors() + beta.disk_errors() > 0 {
        trace.sometimes("fault: disk error");
    }
    if alpha.lost_applies() + beta.lost_applies() > 0 {
        trace.sometimes("fault: applied writes lost in a crash");
    }
    if status.files_to_beta > 0 {
        trace.sometimes("sync: files sent to the workspace");
    }
    if status.files_to_alpha > 0 {
        trace.sometimes("sync: files fetched from the workspace");
    }
    if status.files_bulk > 0 {
        trace.sometimes("sync: file moved on its own stream");
    }
    if status.chunks_packed > 0 {
        trace.sometimes("sync: content packed over a distant link");
    }
    if status.cycles_dirty > 0 {
        trace.sometimes("sync: reconciled around the changed paths only");
    }
    Ok(Outcome {
        seed,
        options: opts.faults.clone(),
        hash: trace.hash(),
        events: trace.events(),
        commands_ok: status.cycles as usize,
        commands_failed: status.conflicts,
        virtual_ms: sim.elapsed().as_millis() as u64,
        reached: trace.reached(),
    })
}

type Log = Vec<(u64, Side, RelPath, Action)>;

/// Steps the simulation: faults, user edits, the heal, then flushes until both sides agree.
fn drive(
    sim: &mut turmoil::Sim<'_>,
    opts: &SyncOptions,
    trace: &Trace,
    world: &Rc<RefCell<World>>,
    sleep: &Arc<Sleep>,
    alpha: &Arc<MemRoot>,
    beta: &Arc<MemRoot>,
) -> Result<Log, String> {
    let fo = &opts.faults;
    let mut faults = FaultDriver::new(fo);
    let mut edits = opts.edits.iter().peekable();
    let mut log: Log = Vec::new();
    #[allow(clippy::disallowed_methods)]
    let wall = std::time::Instant::now();
    let mut healed = false;
    let mut flush: Option<oneshot::Receiver<Result<(), String>>> = None;
    loop {
        if wall.elapsed() > Duration::from_millis(WALL_LIMIT_MS) {
            return Err(format!(
                "wall-clock watchdog fired after {WALL_LIMIT_MS} ms (frozen virtual time?)"
            ));
        }
        let now_ms = sim.elapsed().as_millis() as u64;
        let laptop_crashes = faults.laptop_crashes;
        // A crashed node loses what it applied and had not made durable.
        // On half the seeds a crash waits (a little) until the node has applied writes it
        // has not made durable yet: the moment a crash can take something back.
        let aim = |k: &FaultKind| {
            opts.aim_crashes
                && match k {
                    FaultKind::AgentCrash { .. } => !beta.has_pending(),
                    _ => !alpha.has_pending(),
                }
        };
        if !faults.apply_due(sim, now_ms, trace, sleep, &aim).is_empty() {
            beta.crash();
        }
        if faults.laptop_crashes != laptop_crashes {
            alpha.crash();
        }
        while let Some(e) = edits.next_if(|e| e.at_ms <= now_ms) {
            let root = match e.side {
                Side::Alpha => alpha,
                Side::Beta => beta,
            };
            let path = RelPath::parse(e.path).map_err(|e| e.to_string())?;
            trace.event_at(
                u128::from(now_ms) * 1000,
                "user",
                &format!("{:?} {} {:?}", e.side, e.path, e.kind),
                0,
            );
            let removed = match &e.kind {
                EditKind::Write { len, version, exec } => {
                    let data = content(e.path, *len, *version);
                    let removed = root.user_write(&path, &data, *exec);
                    let entry = Entry::File {
                        size: data.len() as u64,
                        exec: *exec,
                        hash: cs_sync::content_hash(&data),
                    };
                    log_removed(&mut log, now_ms, e.side, removed);
                    log.push((now_ms, e.side, path.clone(), Action::Wrote(entry)));
                    continue;
                }
                EditKind::Remove => root.user_remove(&path),
                EditKind::Symlink { target } => {
                    let removed = root.user_symlink(&path, target);
                    log_removed(&mut log, now_ms, e.side, removed);
                    log.push((
                        now_ms,
                        e.side,
                        path.clone(),
                        Action::Wrote(Entry::Symlink {
                            target: target.clone(),
                        }),
                    ));
                    continue;
                }
            };
            log_removed(&mut log, now_ms, e.side, removed);
        }
        if !healed && now_ms >= fo.safety_ms {
            healed = true;
            heal(sim, 1, now_ms, trace, sleep);
            alpha.set_disk_errors(0, 0.0);
            beta.set_disk_errors(0, 0.0);
        }
        if healed {
            if now_ms > fo.safety_ms + LIVENESS_BUDGET_MS {
                let (a, b) = (alpha.tree(), beta.tree());
                let halted = world
                    .borrow()
                    .shared
                    .as_ref()
                    .map(|s| {
                        let st = s.status.borrow();
                        match &st.halted {
                            Some(h) => format!("; the session halted: {h}"),
                            None => format!(
                                "; the session is {}, {} in flight, last error: {}",
                                st.state,
                                st.bulk_in_flight,
                                st.last_error.as_deref().unwrap_or("none")
                            ),
                        }
                    })
                    .unwrap_or_default();
                return Err(format!(
                    "liveness: the sides did not agree within {LIVENESS_BUDGET_MS} ms of the heal ({} vs {} entries){halted}",
                    a.len(),
                    b.len()
                ));
            }
            let answered = match flush.as_mut().map(|rx| rx.try_recv()) {
                None => None,
                Some(Err(oneshot::error::TryRecvError::Empty)) => Some(None),
                Some(Ok(r)) => Some(Some(r.is_ok())),
                Some(Err(oneshot::error::TryRecvError::Closed)) => Some(Some(false)),
            };
            match answered {
                Some(None) => {}
                Some(Some(true)) if agree(world, &alpha.tree(), &beta.tree()) => {
                    trace.event_at(u128::from(now_ms) * 1000, "net", "agreed", 0);
                    return Ok(log);
                }
                _ => {
                    // Ask (again) for a flush: the session answers after its next quiet cycle.
                    let w = world.borrow();
                    if let (Some(shared), Some(control)) = (&w.shared, &w.control) {
                        let (tx, rx) = oneshot::channel();
                        shared.flush_waiters.borrow_mut().push(tx);
                        let _ = control.try_send(Control::Wake);
                        flush = Some(rx);
                    }
                }
            }
        }
        sim.step().map_err(|e| e.to_string())?;
    }
}

fn log_removed(log: &mut Log, at: u64, side: Side, removed: Vec<(RelPath, Entry)>) {
    for (p, e) in removed {
        log.push((at, side, p, Action::Removed(e)));
    }
}

/// Whether the trees are identical outside the reported conflicts' subtrees.
fn agree(world: &Rc<RefCell<World>>, a: &Snapshot, b: &Snapshot) -> bool {
    let w = world.borrow();
    let conflicts: Vec<RelPath> = w
        .shared
        .as_ref()
        .map(|s| {
            s.conflicts
                .borrow()
                .iter()
                .map(|c| c.path.clone())
                .collect()
        })
        .unwrap_or_default();
    let outside = |t: &Snapshot| -> Vec<(RelPath, Entry)> {
        t.iter()
            .filter(|(p, _)| !conflicts.iter().any(|c| p.starts_with(c)))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    };
    outside(a) == outside(b)
}

/// Always: the content of every path's last user action, when it wrote content, is there on
/// at least one side, unless the other side's user removed or overwrote that very content
/// (which they saw: snapshots cannot tell a version from an identical one).
fn check_no_lost_write(log: &Log, a: &Snapshot, b: &Snapshot) -> Result<(), String> {
    let mut last: std::collections::BTreeMap<&RelPath, &(u64, Side, RelPath, Action)> =
        std::collections::BTreeMap::new();
    for entry in log {
        // The log is in time order: later entries win; a write is logged after what it removed.
        last.insert(&entry.2, entry);
    }
    let same = |got: &Entry, want: &Entry| match (got, want) {
        (
            Entry::File { hash, exec, .. },
            Entry::File {
                hash: h, exec: x, ..
            },
        ) => hash == h && exec == x,
        (got, want) => got == want,
    };
    for (path, (at, side, _, action)) in last {
        let Action::Wrote(want) = action else {
            continue;
        };
        let kept = |t: &Snapshot| t.get(path).is_some_and(|got| same(got, want));
        if kept(a) || kept(b) {
            continue;
        }
        let seen_elsewhere = log.iter().any(|(_, s, p, act)| {
            s != side && p == path && matches!(act, Action::Removed(e) if same(e, want))
        });
        if !seen_elsewhere {
            return Err(format!(
                "invariant: the {side:?} user's last write to {path} at {at} ms ({}) is on neither side",
                want.kind()
            ));
        }
    }
    Ok(())
}
