//! The standard scenario: a laptop runs commands in one or two workspaces over a faulty
//! network, through the daemon's real `Link` actor, while the seed's faults (datagram loss,
//! duplication, corruption and reordering, partitions both ways and one way, clogged links,
//! agent crashes, laptop crashes and sleeps, crashing children) strike. Then everything heals.
//!
//! Always (checked on every finished command): a command reported as exited delivered its
//! exact exit status and every byte of its output, in order, exactly once; anything else must
//! be reported as failed. At the end: no session is left running on any agent.
//! Liveness: after the heal, a command succeeds in every workspace before the deadline.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Actor;
use cs_agent::serve::{accept_loop, Served, Trust};
use cs_agent::state::EnrollError;
use cs_cli::connect::{connect_on, ConnectError, Connected};
use cs_cli::link::{open_on_link, Connector, GetStatus, Link};
use cs_exec::{ActiveSessions, ClientEvent, ExecActor, ExecClient};
use cs_protocol::exec::{ExecInput, ExecOutput, ExecStart, ExitStatus};
use cs_protocol::{Canary, StreamOpen};
use cs_transport::endpoint::{agent_endpoint_config, endpoint_on_socket};
use cs_transport::{read_frame, write_frame, Fingerprint, Identity, TransportLimits, TrustPolicy};
use futures_util::future::LocalBoxFuture;
use rand::{Rng, SeedableRng};

use crate::clock::{Sleep, SleepyRuntime};
use crate::faults::{FaultKind, Options, SAFETY_MS_MAX};
use crate::net::{DatagramFaults, SimSocket};
use crate::script::{pattern, Script, Then};
use crate::trace::Trace;

/// After the heal, every workspace must have run a command by then.
const LIVENESS_BUDGET_MS: u64 = 40_000;
/// After liveness, how long agents get to notice lost sessions before the orphan check:
/// the idle timeout plus the exit linger, with room.
const GRACE_MS: u64 = 7_000;
/// One command's budget before the laptop gives up on it.
const COMMAND_TIMEOUT_MS: u64 = 12_000;
/// The simulation's idle timeout and keep-alive: shorter than production's, so that a dead
/// connection is noticed within the safety phase.
const IDLE_TIMEOUT_MS: u64 = 4_000;
const KEEP_ALIVE_MS: u64 = 1_000;
/// How often an agent reports its running sessions to the checker.
const ACTIVE_POLL_MS: u64 = 250;
/// Wall-clock budget of one seed: an always-ready task would freeze virtual time.
const WALL_LIMIT_MS: u64 = 60_000;
const AGENT_PORT: u16 = 4433;

/// What one seed did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub options: Options,
    pub hash: u64,
    pub events: u64,
    pub commands_ok: usize,
    pub commands_failed: usize,
    pub virtual_ms: u64,
    pub reached: std::collections::BTreeSet<&'static str>,
}

/// A failed seed: what broke, and the coverage it reached anyway.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub message: String,
    pub hash: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seed {}: {}", self.seed, self.message)
    }
}

/// Trusts exactly one laptop key, in memory (a real agent's trust store is on disk and
/// survives its crashes; this one is rebuilt identically on every restart).
#[derive(Debug)]
pub(crate) struct MemTrust(pub(crate) Fingerprint);

impl TrustPolicy for MemTrust {
    fn admits(&self, client: &Fingerprint, _now_unix: u64) -> bool {
        client.ct_eq(&self.0)
    }
}

impl Trust for MemTrust {
    fn is_trusted(&self, fp: &Fingerprint) -> bool {
        fp.ct_eq(&self.0)
    }
    fn enroll(
        &self,
        _: Fingerprint,
        id: &str,
        _: &[u8],
        _: &[u8],
        _: u64,
    ) -> anyhow::Result<Result<(), EnrollError>> {
        Ok(Err(EnrollError::UnknownToken(id.to_string())))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Safety,
    Liveness,
}

/// What the nodes share with the checker. It lives outside the nodes, so it survives their
/// crashes; nothing in it crosses the simulated network.
#[derive(Debug)]
struct World {
    phase: Phase,
    next_command: usize,
    in_flight: Option<usize>,
    ok: usize,
    failed: usize,
    /// Workspaces whose liveness command succeeded.
    live: Vec<bool>,
    liveness_done: bool,
    /// Sessions each running agent reports; `None` while it is down.
    active: Vec<Option<usize>>,
    /// Virtual ms of each agent's last report.
    active_at: Vec<Option<u64>>,
    violations: Vec<String>,
    laptop_incarnation: u64,
}

pub(crate) fn quinn_seed(seed: u64, node: u8, incarnation: u64) -> [u8; 32] {
    let mut out = [node; 32];
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out[8..16].copy_from_slice(&incarnation.to_le_bytes());
    out
}

/// Connection IDs as quinn's default generator makes them (a 3-byte nonce and a 5-byte keyed
/// signature, so that packets for IDs this endpoint never issued are dropped without a
/// stateless reset), but with the nonce from a seeded RNG instead of the thread's.
struct SeededCids {
    rng: Arc<Mutex<rand::rngs::StdRng>>,
    key: u64,
}

const CID_NONCE_BYTES: usize = 3;
const CID_BYTES: usize = 8;

impl SeededCids {
    fn signature(&self, nonce: &[u8]) -> [u8; CID_BYTES - CID_NONCE_BYTES] {
        use std::hash::Hasher;
        // SipHash with fixed keys: the same in every process.
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new_with_keys(self.key, !self.key);
        h.write(nonce);
        let mut out = [0u8; CID_BYTES - CID_NONCE_BYTES];
        out.copy_from_slice(&h.finish().to_le_bytes()[..CID_BYTES - CID_NONCE_BYTES]);
        out
    }
}

impl quinn::ConnectionIdGenerator for SeededCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_BYTES];
        self.rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fill(&mut bytes[..CID_NONCE_BYTES]);
        let sig = self.signature(&bytes[..CID_NONCE_BYTES]);
        bytes[CID_NONCE_BYTES..].copy_from_slice(&sig);
        quinn::ConnectionId::new(&bytes)
    }
    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() == CID_BYTES
            && cid[CID_NONCE_BYTES..] == self.signature(&cid[..CID_NONCE_BYTES])
        {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }
    fn cid_len(&self) -> usize {
        CID_BYTES
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

pub(crate) fn endpoint_config(
    mut cfg: quinn::EndpointConfig,
    seed: [u8; 32],
) -> quinn::EndpointConfig {
    // Not quinn's own seed: the same sequence would make the client's first connection ID
    // equal the initial destination ID it draws from that seed, and the peers then answer
    // each other's packets with stateless resets.
    let mut cid_seed = seed;
    cid_seed[31] ^= 0xc1;
    let rng = Arc::new(Mutex::new(rand::rngs::StdRng::from_seed(cid_seed)));
    cfg.rng_seed(Some(seed));
    let key = u64::from_le_bytes([
        cid_seed[0],
        cid_seed[1],
        cid_seed[2],
        cid_seed[3],
        cid_seed[4],
        cid_seed[5],
        cid_seed[6],
        cid_seed[31],
    ]);
    cfg.cid_generator(move || {
        Box::new(SeededCids {
            rng: rng.clone(),
            key,
        })
    });
    cfg
}

pub(crate) static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    pub(crate) static PANICKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tasks and actors swallow panics; this hook records them so that the seed fails.
pub(crate) fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if PANICKED.with(|p| !p.replace(true)) {
                PANICS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(info.to_string());
            }
            default(info);
        }));
    });
}

/// Runs one seed with `canaries` switched on. `Err` is a violated invariant, a panic or a
/// missed deadline.
pub fn run_seed(seed: u64, trace: Trace, canaries: &[Canary]) -> Result<Outcome, Failure> {
    guarded(seed, &trace, canaries, || {
        run_seed_inner(seed, trace.clone())
    })
}

/// Runs one seed of a scenario with `canaries` on, turning panics into failures.
pub(crate) fn guarded(
    seed: u64,
    trace: &Trace,
    canaries: &[Canary],
    run: impl FnOnce() -> Result<Outcome, String>,
) -> Result<Outcome, Failure> {
    install_panic_hook();
    PANICKED.with(|p| p.set(false));
    cs_protocol::canary::set(canaries);
    let outcome = run();
    cs_protocol::canary::set(&[]);
    let panicked = PANICKED.with(|p| p.replace(false));
    let hash = trace.hash();
    match outcome {
        _ if panicked => {
            let p = PANICS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_default();
            Err(Failure {
                seed,
                message: format!("panic: {p}"),
                hash,
            })
        }
        Ok(o) => Ok(o),
        Err(message) => Err(Failure {
            seed,
            message,
            hash,
        }),
    }
}

pub(crate) fn ws_host(ws: usize) -> String {
    format!("agent{ws}")
}

fn run_seed_inner(seed: u64, trace: Trace) -> Result<Outcome, String> {
    let opts = Options::draw(seed);
    crate::net::unheal_all();
    let sim_limits = TransportLimits {
        idle_timeout_ms: IDLE_TIMEOUT_MS,
        keep_alive_ms: KEEP_ALIVE_MS,
        ..TransportLimits::default()
    };
    // Keys from the seed: certificates, reset and token keys are the same bytes every run.
    let laptop_id =
        Identity::from_seed("sim laptop", quinn_seed(seed, 0xf0, 0)).map_err(|e| e.to_string())?;
    let agent_ids = (0..opts.workspaces)
        .map(|ws| {
            Identity::from_seed("sim agent", quinn_seed(seed, 0xf1 + ws as u8, 0))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let world = Rc::new(RefCell::new(World {
        phase: Phase::Safety,
        next_command: 0,
        in_flight: None,
        ok: 0,
        failed: 0,
        live: vec![false; opts.workspaces],
        liveness_done: false,
        active: vec![None; opts.workspaces],
        active_at: vec![None; opts.workspaces],
        violations: Vec::new(),
        laptop_incarnation: 0,
    }));
    let sleep = Arc::new(Sleep::default());
    if opts.workspaces > 1 {
        trace.sometimes("path: two workspaces");
    }
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .simulation_duration(Duration::from_millis(
            SAFETY_MS_MAX + LIVENESS_BUDGET_MS + GRACE_MS + 10_000,
        ))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(opts.latency_max_ms))
        .build();

    for (ws, id) in agent_ids.iter().enumerate() {
        let (id, laptop_fp, trace, world, limits) = (
            id.clone(),
            laptop_id.fingerprint(),
            trace.clone(),
            world.clone(),
            sim_limits.clone(),
        );
        let dg = opts.datagrams;
        let incarnation = Rc::new(std::cell::Cell::new(0u64));
        sim.host(ws_host(ws), move || {
            let (id, trace, world, limits) =
                (id.clone(), trace.clone(), world.clone(), limits.clone());
            let inc = incarnation.get() + 1;
            incarnation.set(inc);
            async move {
                trace.event(&ws_host(ws), "start", inc);
                let (ep, trust) =
                    agent_endpoint(seed, ws, inc, dg, &trace, &id, &limits, laptop_fp).await?;
                let exec = ExecActor::new(Rc::new(crate::script::ScriptSpawner)).start();
                {
                    let (exec, world) = (exec.clone(), world.clone());
                    tokio::task::spawn_local(async move {
                        loop {
                            if let Ok(n) = exec.send(ActiveSessions).await {
                                let mut w = world.borrow_mut();
                                w.active[ws] = Some(n);
                                w.active_at[ws] =
                                    turmoil::sim_elapsed().map(|d| d.as_millis() as u64);
                            }
                            tokio::time::sleep(Duration::from_millis(ACTIVE_POLL_MS)).await;
                        }
                    });
                }
                accept_loop(
                    ep,
                    Served {
                        workspace: ws_host(ws),
                        trust,
                        exec,
                        roots: Arc::new(cs_agent::sync::HomeRoots {
                            home: std::path::PathBuf::from("/nonexistent/sim-home"),
                            caches: None,
                        }),
                        sync_permits: Arc::new(tokio::sync::Semaphore::new(1)),
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
        let (opts, trace, world, sleep) =
            (opts.clone(), trace.clone(), world.clone(), sleep.clone());
        let agents: Vec<Fingerprint> = agent_ids.iter().map(|i| i.fingerprint()).collect();
        sim.host("laptop", move || {
            let (opts, trace, world, sleep, agents, laptop_id) = (
                opts.clone(),
                trace.clone(),
                world.clone(),
                sleep.clone(),
                agents.clone(),
                laptop_id.clone(),
            );
            async move {
                laptop(opts, trace, world, sleep, agents, laptop_id)
                    .await
                    .map_err(|e| e.into())
            }
        });
    }

    drive(&mut sim, &opts, &trace, &world, &sleep)?;
    let w = world.borrow();
    Ok(Outcome {
        seed,
        options: opts.clone(),
        hash: trace.hash(),
        events: trace.events(),
        commands_ok: w.ok,
        commands_failed: w.failed,
        virtual_ms: sim.elapsed().as_millis() as u64,
        reached: trace.reached(),
    })
}

pub(crate) fn node_name(ws: usize) -> &'static str {
    ["agent0", "agent1", "agent2", "agent3"][ws.min(3)]
}

/// Steps the simulation, applies the fault schedule, heals, and checks the deadlines.
fn drive(
    sim: &mut turmoil::Sim<'_>,
    opts: &Options,
    trace: &Trace,
    world: &Rc<RefCell<World>>,
    sleep: &Arc<Sleep>,
) -> Result<(), String> {
    let mut faults = FaultDriver::new(opts);
    // The watchdog measures real time on purpose: virtual time is what it guards.
    #[allow(clippy::disallowed_methods)]
    let wall = std::time::Instant::now();
    let mut healed = false;
    let mut done_at: Option<u64> = None;
    loop {
        if wall.elapsed() > Duration::from_millis(WALL_LIMIT_MS) {
            return Err(format!(
                "wall-clock watchdog fired after {WALL_LIMIT_MS} ms (frozen virtual time?)"
            ));
        }
        let now_ms = sim.elapsed().as_millis() as u64;
        for ws in faults.apply_due(sim, now_ms, trace, sleep, &|_| false) {
            world.borrow_mut().active[ws] = None;
        }
        if !healed && now_ms >= opts.safety_ms {
            healed = true;
            heal(sim, opts.workspaces, now_ms, trace, sleep);
            world.borrow_mut().phase = Phase::Liveness;
        }
        {
            let w = world.borrow();
            if let Some(v) = w.violations.first() {
                return Err(format!("invariant: {v}"));
            }
            if w.liveness_done && done_at.is_none() {
                done_at = Some(now_ms);
            }
        }
        if healed && done_at.is_none() && now_ms > opts.safety_ms + LIVENESS_BUDGET_MS {
            let w = world.borrow();
            let stuck: Vec<usize> = (0..opts.workspaces).filter(|ws| !w.live[*ws]).collect();
            return Err(format!(
                "liveness: no command succeeded in workspace(s) {stuck:?} within {LIVENESS_BUDGET_MS} ms of the heal"
            ));
        }
        if let Some(at) = done_at {
            // Always: no session outlives its laptop side. Done as soon as every agent reports
            // none running after the laptop finished; a failure if one still does at the end
            // of the grace period.
            let w = world.borrow();
            let reported_since = w.active_at.iter().all(|t| t.is_some_and(|t| t > at));
            let busy: Vec<(usize, usize)> = w
                .active
                .iter()
                .enumerate()
                .filter_map(|(ws, n)| n.filter(|n| *n > 0).map(|n| (ws, n)))
                .collect();
            if reported_since && busy.is_empty() {
                trace.event_at(u128::from(now_ms) * 1000, "net", "done", 0);
                return Ok(());
            }
            if now_ms >= at + GRACE_MS {
                return Err(format!(
                    "invariant: sessions (workspace, count) {busy:?} still run {GRACE_MS} ms after the laptop finished"
                ));
            }
        }
        if let Err(e) = sim.step() {
            return Err(e.to_string());
        }
    }
}

/// Heals every fault: links repaired and released, crashed agents restarted, the laptop
/// awake, datagram faults off.
pub(crate) fn heal(
    sim: &mut turmoil::Sim<'_>,
    workspaces: usize,
    now_ms: u64,
    trace: &Trace,
    sleep: &Sleep,
) {
    trace.event_at(u128::from(now_ms) * 1000, "net", "heal", 0);
    for ws in 0..workspaces {
        sim.repair("laptop", ws_host(ws));
        sim.release("laptop", ws_host(ws));
        if !sim.is_host_running(ws_host(ws)) {
            sim.bounce(ws_host(ws));
        }
    }
    sleep.end(sim.elapsed());
    crate::net::heal_all();
}

/// How long a crash may wait for the moment a scenario aims it at.
pub(crate) const CRASH_HOLD_MS_MAX: u64 = 500;

/// The seed's fault schedule, applied as virtual time passes.
pub(crate) struct FaultDriver {
    plan: std::iter::Peekable<std::vec::IntoIter<(u64, Act)>>,
    /// Laptop crashes applied so far.
    pub(crate) laptop_crashes: u32,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Act {
    Start(FaultKind),
    End(FaultKind),
}

impl FaultDriver {
    pub(crate) fn new(opts: &Options) -> Self {
        let mut plan: Vec<(u64, Act)> = Vec::new();
        for e in &opts.events {
            plan.push((e.at_ms, Act::Start(e.kind)));
            let len = match e.kind {
                FaultKind::Partition { len_ms, .. }
                | FaultKind::PartitionOneWay { len_ms, .. }
                | FaultKind::Clog { len_ms, .. }
                | FaultKind::LaptopSleep { len_ms } => Some(len_ms),
                FaultKind::AgentCrash { down_ms, .. } => Some(down_ms),
                FaultKind::LaptopCrash => None,
            };
            if let Some(len) = len {
                // Every fault ends by the heal at the latest.
                plan.push(((e.at_ms + len).min(opts.safety_ms), Act::End(e.kind)));
            }
        }
        plan.sort_by_key(|(t, _)| *t);
        Self {
            plan: plan.into_iter().peekable(),
            laptop_crashes: 0,
        }
    }

    /// Applies every fault due by `now_ms`. Returns the workspaces whose agent crashed.
    /// A crash for which `hold` says "not yet" waits for it, at most `CRASH_HOLD_MS_MAX`
    /// (with everything due after it): a scenario aims crashes at a moment that matters.
    pub(crate) fn apply_due(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now_ms: u64,
        trace: &Trace,
        sleep: &Sleep,
        hold: &dyn Fn(&FaultKind) -> bool,
    ) -> Vec<usize> {
        let laptop = "laptop";
        let mut crashed = Vec::new();
        while let Some((_, act)) = self.plan.next_if(|(t, act)| {
            let crash = matches!(
                act,
                Act::Start(k @ (FaultKind::AgentCrash { .. } | FaultKind::LaptopCrash)) if hold(k)
            );
            *t <= now_ms && !(crash && now_ms < t + CRASH_HOLD_MS_MAX)
        }) {
            let at = u128::from(now_ms) * 1000;
            match act {
                Act::Start(k) => {
                    trace.event_at(at, "net", &format!("fault.start {k:?}"), 0);
                    match k {
                        FaultKind::Partition { ws, .. } => {
                            trace.sometimes("fault: partition");
                            sim.partition(laptop, ws_host(ws));
                        }
                        FaultKind::PartitionOneWay { ws, to_laptop, .. } => {
                            trace.sometimes("fault: one-way partition");
                            if to_laptop {
                                sim.partition_oneway(ws_host(ws), laptop);
                            } else {
                                sim.partition_oneway(laptop, ws_host(ws));
                            }
                        }
                        FaultKind::Clog { ws, .. } => {
                            trace.sometimes("fault: link clogged");
                            sim.hold(laptop, ws_host(ws));
                        }
                        FaultKind::AgentCrash { ws, .. } => {
                            trace.sometimes("fault: agent crashed");
                            crashed.push(ws);
                            sim.crash(ws_host(ws));
                        }
                        FaultKind::LaptopCrash => {
                            trace.sometimes("fault: laptop crashed");
                            self.laptop_crashes += 1;
                            sim.bounce(laptop);
                        }
                        FaultKind::LaptopSleep { .. } => {
                            trace.sometimes("fault: laptop slept");
                            sleep.begin(sim.elapsed());
                        }
                    }
                }
                Act::End(k) => {
                    trace.event_at(at, "net", &format!("fault.end {k:?}"), 0);
                    match k {
                        FaultKind::Partition { ws, .. } | FaultKind::PartitionOneWay { ws, .. } => {
                            sim.repair(laptop, ws_host(ws))
                        }
                        FaultKind::Clog { ws, .. } => sim.release(laptop, ws_host(ws)),
                        FaultKind::AgentCrash { ws, .. } => {
                            if !sim.is_host_running(ws_host(ws)) {
                                sim.bounce(ws_host(ws));
                            }
                        }
                        FaultKind::LaptopSleep { .. } => sleep.end(sim.elapsed()),
                        FaultKind::LaptopCrash => {}
                    }
                }
            }
        }
        crashed
    }
}

/// Agent `ws`'s endpoint in its incarnation `inc`: a server that admits only the laptop
/// `laptop`, on a simulated socket at `AGENT_PORT` with the datagram faults `dg`, its
/// randomness drawn from the seed (the same for the same seed, node and incarnation).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn agent_endpoint(
    seed: u64,
    ws: usize,
    inc: u64,
    dg: DatagramFaults,
    trace: &Trace,
    id: &Identity,
    limits: &TransportLimits,
    laptop: Fingerprint,
) -> Result<(quinn::Endpoint, Arc<MemTrust>), Box<dyn std::error::Error>> {
    let trust = Arc::new(MemTrust(laptop));
    let server = cs_transport::server_config(id, trust.clone(), limits)?;
    let cfg = endpoint_config(
        agent_endpoint_config(id),
        quinn_seed(seed, 1 + ws as u8, inc),
    );
    let sock = SimSocket::bind(
        ([0, 0, 0, 0], AGENT_PORT).into(),
        node_name(ws),
        trace.clone(),
        dg,
        seed ^ 0xa6e7 ^ (ws as u64) << 8 ^ inc << 16,
        None,
    )
    .await?;
    let ep = endpoint_on_socket(cfg, Some(server), sock, Arc::new(quinn::TokioRuntime))?;
    Ok((ep, trust))
}

/// The laptop's endpoint in its incarnation `inc`, on a simulated socket with the datagram
/// faults `dg`; its timers sleep through `sleep`.
pub(crate) async fn laptop_endpoint(
    seed: u64,
    inc: u64,
    dg: DatagramFaults,
    trace: &Trace,
    sleep: Arc<Sleep>,
) -> Result<quinn::Endpoint, Box<dyn std::error::Error>> {
    let sock = SimSocket::bind(
        ([0, 0, 0, 0], 0).into(),
        "laptop",
        trace.clone(),
        dg,
        seed ^ 0x1a97 ^ inc << 16,
        Some(sleep.clone()),
    )
    .await?;
    let cfg = endpoint_config(quinn::EndpointConfig::default(), quinn_seed(seed, 0, inc));
    Ok(endpoint_on_socket(
        cfg,
        None,
        sock,
        Arc::new(SleepyRuntime(sleep)),
    )?)
}

/// Connects over the simulated network with the daemon's own hello code.
pub(crate) struct SimConnector {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) me: Identity,
    pub(crate) addr: SocketAddr,
    pub(crate) pinned: Fingerprint,
    pub(crate) trace: Trace,
}

impl SimConnector {
    /// Reaches agent `ws` through `endpoint`, pinning its key `pinned`.
    pub(crate) fn to_agent(
        endpoint: quinn::Endpoint,
        me: Identity,
        ws: usize,
        pinned: Fingerprint,
        trace: Trace,
    ) -> Self {
        SimConnector {
            endpoint,
            me,
            addr: (turmoil::lookup(ws_host(ws)), AGENT_PORT).into(),
            pinned,
            trace,
        }
    }

    /// A link to agent `ws` through this connector.
    pub(crate) fn start_link(self, ws: usize) -> actix::Addr<Link> {
        let addr = self.addr.to_string();
        Link::new(ws_host(ws), addr, Rc::new(self)).start()
    }
}

impl Connector for SimConnector {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Connected, ConnectError>> {
        let (ep, me, addr, pinned, trace) = (
            self.endpoint.clone(),
            self.me.clone(),
            self.addr,
            self.pinned,
            self.trace.clone(),
        );
        Box::pin(async move {
            let r = connect_on(ep, &me, addr, pinned, None).await;
            trace.event(
                "laptop",
                match &r {
                    Ok(_) => "connected",
                    Err(ConnectError::Timeout { .. }) => "connect.timeout",
                    Err(_) => "connect.failed",
                },
                0,
            );
            r
        })
    }
}

/// The laptop node: the daemon's links and a driver that runs the seed's commands. A crash
/// restarts it from here; the checker's state outside survives.
async fn laptop(
    opts: Options,
    trace: Trace,
    world: Rc<RefCell<World>>,
    sleep: Arc<Sleep>,
    agents: Vec<Fingerprint>,
    me: Identity,
) -> Result<(), String> {
    let incarnation = {
        let mut w = world.borrow_mut();
        w.laptop_incarnation += 1;
        if let Some(i) = w.in_flight.take() {
            // The command that was running when the laptop crashed: never a success.
            w.failed += 1;
            trace.sometimes("path: command in flight when the laptop crashed");
            trace.event("laptop", "cmd.interrupted", i as u64);
        }
        w.laptop_incarnation
    };
    trace.event("laptop", "start", incarnation);
    let ep = laptop_endpoint(opts.seed, incarnation, opts.datagrams, &trace, sleep)
        .await
        .map_err(|e| e.to_string())?;
    let links: Vec<actix::Addr<Link>> = agents
        .iter()
        .enumerate()
        .map(|(ws, fp)| {
            SimConnector::to_agent(ep.clone(), me.clone(), ws, *fp, trace.clone()).start_link(ws)
        })
        .collect();

    // Safety phase: the seed's commands, one after another.
    loop {
        let next = {
            let mut w = world.borrow_mut();
            if w.phase != Phase::Safety {
                break;
            }
            let i = w.next_command;
            match opts.commands.get(i) {
                Some(c) => {
                    w.next_command += 1;
                    w.in_flight = Some(i);
                    Some(*c)
                }
                None => None,
            }
        };
        let Some((ws, script)) = next else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let ok = run_command(&links[ws], ws, script, &trace, &world).await;
        let mut w = world.borrow_mut();
        w.in_flight = None;
        if ok {
            w.ok += 1;
        } else {
            w.failed += 1;
            trace.sometimes("path: command reported failed");
        }
    }

    // Liveness phase: every workspace must run a command, retried until the deadline.
    let liveness = Script {
        bytes: 1_000,
        then: Then::Exit(0),
    };
    for (ws, link) in links.iter().enumerate() {
        while !world.borrow().live[ws] {
            if run_command(link, ws, liveness, &trace, &world).await {
                world.borrow_mut().live[ws] = true;
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    world.borrow_mut().liveness_done = true;
    trace.event("laptop", "done", 0);
    std::future::pending::<()>().await;
    Ok(())
}

/// Runs one script through the link, checking what comes back. True: the exit was delivered
/// with exactly the expected status and output. False: reported failed. A delivery that is
/// wrong but not reported as a failure is a violation, recorded in the world.
async fn run_command(
    link: &actix::Addr<Link>,
    ws: usize,
    script: Script,
    trace: &Trace,
    world: &Rc<RefCell<World>>,
) -> bool {
    trace.event(
        "laptop",
        &format!("cmd.start ws{ws} {}", script.command()),
        script.bytes,
    );
    let name = ws_host(ws);
    let fut = async {
        let open = StreamOpen::Exec(ExecStart {
            command: Some(script.command()),
            pty: None,
        });
        let opened = open_on_link(link, &name, &name, &open).await?;
        if opened.attempts > 1 {
            trace.sometimes("path: stream retried on a fresh connection");
        }
        let (mut send, mut recv) = (opened.send, opened.recv);
        // Half of the hanging commands are abandoned, as when `cs ssh` is killed: the daemon
        // finishes the stream's laptop side, and the laptop stops reading once the output is
        // there. The agent must then hang the command up (checked at the end: no orphans).
        let abandon = script.then == Then::Hang && script.bytes % 2 == 1;
        if abandon {
            let _ = send.finish();
        }
        let mut client = ExecClient::new();
        let first = cs_protocol::decode::<ExecOutput>(
            &opened.first_frame[cs_protocol::codec::FRAME_HEADER_BYTES..],
        )
        .map_err(|e| e.to_string())?;
        let mut pending = Some(first);
        let mut out: Vec<u8> = Vec::new();
        let mut interrupted = false;
        loop {
            let ev = match pending.take() {
                Some(m) => client.handle_output(m),
                None => match read_frame::<_, ExecOutput>(&mut recv).await {
                    Ok(Some(m)) => client.handle_output(m),
                    Ok(None) => client.handle_stream_end("ended"),
                    Err(e) => client.handle_stream_end(&e.to_string()),
                },
            };
            match ev {
                Some(ClientEvent::Stdout(d)) => {
                    out.extend_from_slice(&d);
                    // A hanging command is interrupted once its output is all there.
                    if abandon && out.len() as u64 >= script.bytes {
                        trace.sometimes("path: command abandoned by the laptop");
                        return Err("abandoned".to_string());
                    }
                    if script.then == Then::Hang && !interrupted && out.len() as u64 >= script.bytes
                    {
                        interrupted = true;
                        let _ = write_frame(&mut send, &ExecInput::Signal(2)).await;
                    }
                }
                Some(ClientEvent::Started { .. }) => {
                    if script.then == Then::Hang && script.bytes == 0 {
                        // bytes == 0 is even: never abandoned.
                        interrupted = true;
                        let _ = write_frame(&mut send, &ExecInput::Signal(2)).await;
                    }
                }
                Some(ClientEvent::Exited(st)) => return Ok::<_, String>(Some((st, out))),
                Some(ClientEvent::Failed(e)) => return Err(e),
                Some(ClientEvent::Stderr(_) | ClientEvent::Notice(_)) | None => {}
            }
        }
    };
    let res = match tokio::time::timeout(Duration::from_millis(COMMAND_TIMEOUT_MS), fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => None,
    };
    if let Ok(status) = link.send(GetStatus).await {
        if status.connects > 1 {
            trace.sometimes("path: link reconnected");
        }
    }
    let Some((status, out)) = res else {
        trace.event("laptop", "cmd.failed", 0);
        return false;
    };
    trace.event("laptop", "cmd.exited", out.len() as u64);
    let expected = match script.then {
        Then::Exit(c) => ExitStatus::Code(c),
        Then::Crash(s) => ExitStatus::Signal(s),
        Then::Hang => ExitStatus::Signal(2),
    };
    // Always: a delivered exit comes with its true status and the whole output, in order,
    // exactly once.
    let mut w = world.borrow_mut();
    if status != expected {
        w.violations.push(format!(
            "`{}` in ws{ws}: delivered exit {status:?}, the script ended with {expected:?}",
            script.command()
        ));
        return false;
    }
    if out.len() as u64 != script.bytes
        || out.iter().enumerate().any(|(i, b)| *b != pattern(i as u64))
    {
        w.violations.push(format!(
            "`{}` in ws{ws}: delivered {} bytes of output that differ from the {} it wrote",
            script.command(),
            out.len(),
            script.bytes
        ));
        return false;
    }
    match script.then {
        Then::Crash(_) => trace.sometimes("fault: child crashed"),
        Then::Hang => trace.sometimes("path: command interrupted by a signal"),
        Then::Exit(_) => {}
    }
    true
}
