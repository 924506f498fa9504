//! The forward scenario: the laptop carries many concurrent forwarded connections
//! (`cs_cli::forward::session::carry`, the daemon's own code for one connection of
//! `cs portforward`) over the real link and quinn to the real agent (`accept_loop`, whose
//! `Served::dial` reaches scripted in-memory servers instead of the OS's sockets), while the
//! seed's faults strike; then everything heals.
//!
//! Each connection sends its own random payload (drawn from the seed and the connection's id,
//! so bytes of another connection are recognised). Servers echo what they read: at once, or
//! slowly through a small pipe (a slow reader), or only the first bytes before closing their
//! sending side (a half-close) or the whole connection (a reset); some targets refuse. Clients
//! half-close after sending, or read the whole echo and close, or drop the connection part way
//! (a reset); some read slowly through a small pipe. In some seeds the agent allows fewer
//! streams at once than there are connections, which then wait for one.
//!
//! Always: what a server reads is a prefix of what its own client sent; what a client receives
//! is a prefix of the echo of what it sent (intact, in order, no byte of another connection);
//! a connection that ended cleanly, whose client read to the end, received the whole echo;
//! bytes a client wrote that its server has not read never exceed what the buffers on the way
//! hold (backpressure reaches the writer); a connection to a refusing target ends refused, with
//! no byte; on a healthy network (no datagram fault, before the first fault event) every
//! connection whose client reads to the end and whose server does not reset ends cleanly with
//! the whole echo. Liveness: after the heal, a new connection carries its whole echo, every
//! connection of the running laptop ends, and no server the agent dialed is left open, before
//! the deadline.
//!
//! Not modelled: reverse forwards (`-R`), the watch of listening ports, and backpressure from
//! the workspace to a slow reader on the laptop end to end (the laptop's receive window is
//! always production's 8 MiB, so a slow client reader fills its pipe and stalls the laptop's
//! pump, but QUIC's flow control toward the agent is not reached).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix::Actor;
use cs_agent::forward::{Dialer, FORWARD_STREAMS_MAX};
use cs_agent::serve::{accept_loop, Served};
use cs_cli::forward::session::{carry, Carried, LinkRef};
use cs_forward::pump::PUMP_BUFFER_BYTES;
use cs_forward::{Counters, End, Sock};
use cs_protocol::forward::Endpoint;
use cs_protocol::Canary;
use cs_transport::{Identity, TransportLimits};
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::clock::Sleep;
use crate::faults::{FaultKind, Options};
use crate::scenario::{
    agent_endpoint, guarded, heal, laptop_endpoint, quinn_seed, ws_host, Failure, FaultDriver,
    Outcome, SimConnector,
};
use crate::trace::Trace;

/// After the heal, a new connection must have carried its echo, and everything ended, by then.
const LIVENESS_BUDGET_MS: u64 = 40_000;
/// Wall-clock budget of one seed.
const WALL_LIMIT_MS: u64 = 60_000;
/// Connections a seed opens in the safety phase.
pub const CONNS_MIN: usize = 10;
pub const CONNS_MAX: usize = 60;
/// The agent's flow-control window per stream: small (production: 8 MiB) so that a slow
/// server holds its client's writer back within a few hundred KiB.
const STREAM_WINDOW_BYTES: usize = 128 * 1024;
/// The pipe between the agent and a server that is not slow.
const SERVER_PIPE_BYTES: usize = 16 * 1024;
/// The pipe between a client that reads at once and the laptop's pump.
const CLIENT_PIPE_BYTES: usize = 64 * 1024;
/// Liveness connections are numbered from here.
const LIVE_ID_BASE: u16 = 10_000;
/// The liveness connection's payload.
const LIVE_BYTES: usize = 32 * 1024;
/// Between liveness attempts.
const LIVE_RETRY_MS: u64 = 200;

/// A connection's target in the workspace: how the scripted server there behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// Echoes every byte; closes its side after the client's half-close.
    Echo,
    /// Echoes, reading through a pipe of `chunk` bytes, `chunk` at a time, `pause_ms` apart.
    Slow { chunk: usize, pause_ms: u64 },
    /// Echoes the first `after` bytes, closes its sending side, and reads the rest.
    HalfClose { after: usize },
    /// Echoes the first `after` bytes and drops the connection.
    Reset { after: usize },
    /// Nothing listens there: the agent's dial is refused.
    Refuse,
}

impl Server {
    fn host(&self) -> &'static str {
        match self {
            Server::Echo => "echo",
            Server::Slow { .. } => "slow",
            Server::HalfClose { .. } => "halfclose",
            Server::Reset { .. } => "reset",
            Server::Refuse => "refuse",
        }
    }

    /// The bytes of a `len`-byte payload it echoes.
    fn echoes(&self, len: usize) -> usize {
        match self {
            Server::Echo | Server::Slow { .. } => len,
            Server::HalfClose { after } | Server::Reset { after } => (*after).min(len),
            Server::Refuse => 0,
        }
    }

    fn pipe_bytes(&self) -> usize {
        match self {
            Server::Slow { chunk, .. } => *chunk,
            _ => SERVER_PIPE_BYTES,
        }
    }
}

/// What the client on the laptop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Sends its payload, half-closes, and reads to the end.
    HalfClose,
    /// Sends its payload, reads the whole echo (or to the end), and closes.
    ReadAll,
    /// Sends the first `after` bytes and drops the connection `wait_ms` later.
    Reset { after: usize, wait_ms: u64 },
}

/// One forwarded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnPlan {
    pub id: u16,
    /// When the client connects, in virtual ms.
    pub at_ms: u64,
    /// Its payload's length.
    pub len: usize,
    pub server: Server,
    pub client: Client,
    /// The pipe between the client and the laptop's pump.
    pub pipe: usize,
    /// Pause before each read: a slow reader when not 0.
    pub read_pause_ms: u64,
    /// Bytes per write.
    pub write_chunk: usize,
}

impl ConnPlan {
    fn target(&self) -> Endpoint {
        Endpoint::Tcp {
            host: self.server.host().to_string(),
            port: self.id,
        }
    }

    fn live(id: u16) -> Self {
        Self {
            id,
            at_ms: 0,
            len: LIVE_BYTES,
            server: Server::Echo,
            client: Client::HalfClose,
            pipe: CLIENT_PIPE_BYTES,
            read_pause_ms: 0,
            write_chunk: 8 * 1024,
        }
    }
}

/// A seed's forward options: the fault schedule of [`Options`] (one workspace) and the
/// connections.
#[derive(Debug, Clone)]
pub struct FwdOptions {
    pub faults: Options,
    pub conns: Vec<ConnPlan>,
    /// Streams the agent lets the laptop have open at once: in some seeds fewer than the
    /// connections open at once, which then wait for a stream.
    pub streams_max: u32,
}

impl FwdOptions {
    pub fn draw(seed: u64) -> Self {
        let mut faults = Options::draw(seed);
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
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xf0_4a_4d);
        let n = rng.gen_range(CONNS_MIN..=CONNS_MAX);
        let last = faults.safety_ms.saturating_sub(300).max(1);
        // Half the seeds open their connections in bursts, so that many run at once.
        let bursts: Vec<u64> = (0..rng.gen_range(1..=3))
            .map(|_| rng.gen_range(0..last))
            .collect();
        let bursty = rng.gen_bool(0.5);
        let conns = (0..n)
            .map(|i| {
                let at_ms = if bursty {
                    (bursts[rng.gen_range(0..bursts.len())] + rng.gen_range(0..200)).min(last)
                } else {
                    rng.gen_range(0..last)
                };
                let kind = rng.gen_range(0..20);
                // Slow servers get large payloads more often: they must hold their writer back.
                let slow = (8..=10).contains(&kind);
                let large = rng.gen_range(0..20) < if slow { 8 } else { 1 };
                let len = if large && slow {
                    rng.gen_range(384 * 1024..1024 * 1024)
                } else if large {
                    rng.gen_range(256 * 1024..512 * 1024)
                } else if rng.gen_bool(0.3) {
                    rng.gen_range(16 * 1024..128 * 1024)
                } else {
                    rng.gen_range(0..16 * 1024)
                };
                let server = match kind {
                    0..=7 => Server::Echo,
                    8..=10 => Server::Slow {
                        chunk: rng.gen_range(1024..16 * 1024),
                        pause_ms: rng.gen_range(1..10),
                    },
                    11..=13 => Server::HalfClose {
                        after: rng.gen_range(0..=len),
                    },
                    14..=16 => Server::Reset {
                        after: rng.gen_range(0..=len),
                    },
                    _ => Server::Refuse,
                };
                let client = match rng.gen_range(0..20) {
                    0..=8 => Client::HalfClose,
                    9..=15 => Client::ReadAll,
                    _ => Client::Reset {
                        after: rng.gen_range(0..=len),
                        wait_ms: rng.gen_range(0..500),
                    },
                };
                let slow_reader = rng.gen_bool(0.25);
                ConnPlan {
                    id: i as u16,
                    at_ms,
                    len,
                    server,
                    client,
                    pipe: if slow_reader {
                        rng.gen_range(1024..8 * 1024)
                    } else {
                        CLIENT_PIPE_BYTES
                    },
                    read_pause_ms: if slow_reader { rng.gen_range(1..5) } else { 0 },
                    write_chunk: rng.gen_range(1..16 * 1024),
                }
            })
            .collect();
        let streams_max = if rng.gen_bool(0.3) {
            rng.gen_range(8..32)
        } else {
            TransportLimits::default().streams_bidi_max
        };
        Self {
            faults,
            conns,
            streams_max,
        }
    }

    /// The plan of connection `id` (a liveness connection's too).
    fn plan(&self, id: u16) -> Option<ConnPlan> {
        if id >= LIVE_ID_BASE {
            return Some(ConnPlan::live(id));
        }
        self.conns.get(usize::from(id)).copied()
    }
}

impl std::fmt::Display for FwdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut servers: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &self.conns {
            *servers.entry(c.server.host()).or_default() += 1;
        }
        let count = |p: &dyn Fn(&ConnPlan) -> bool| self.conns.iter().filter(|c| p(c)).count();
        write!(
            f,
            "{}; connections {} streams<={} servers {servers:?} client half-close {} read-all {} reset {} slow readers {} bytes {}",
            self.faults,
            self.conns.len(),
            self.streams_max,
            count(&|c| c.client == Client::HalfClose),
            count(&|c| c.client == Client::ReadAll),
            count(&|c| matches!(c.client, Client::Reset { .. })),
            count(&|c| c.read_pause_ms > 0),
            self.conns.iter().map(|c| c.len).sum::<usize>(),
        )
    }
}

/// A connection's payload: random bytes from the seed and its id.
fn payload(seed: u64, id: u16, len: usize) -> Vec<u8> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (u64::from(id) << 40) ^ 0x9a71_0ad5_eed5);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

/// How a connection ended, as the laptop saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnEnd {
    Carried(End),
    Refused(String),
    /// The laptop crashed while it was open.
    LaptopCrashed,
}

/// One connection's record, outside the nodes (it survives their crashes).
#[derive(Debug, Default)]
struct ConnState {
    laptop_inc: u64,
    /// Bytes the client wrote into its pipe.
    sent: usize,
    /// Bytes the client read from its pipe.
    received: usize,
    /// Bytes each server dialed for it read (a stream retried on a fresh connection is dialed
    /// again).
    server_read: Vec<usize>,
    /// The client half-closed before the whole echo had arrived.
    half_closed_early: bool,
    end: Option<ConnEnd>,
}

/// What the nodes share with the checker; nothing in it crosses the simulated network. A
/// mutex because the agent's dialer must be `Send + Sync`; everything runs on one thread.
#[derive(Debug, Default)]
struct World {
    /// The heal happened: the liveness connection may start.
    healed: bool,
    /// Until this virtual ms the network is healthy: no datagram faults, no fault event yet.
    healthy_until_ms: u64,
    laptop_inc: u64,
    agent_inc: u64,
    conns: BTreeMap<u16, ConnState>,
    /// Servers open, by the agent incarnation that dialed them.
    servers_open: BTreeMap<u64, usize>,
    /// Virtual ms at which the liveness connection carried its echo.
    live_ok_at: Option<u64>,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

pub fn run_forward_seed(seed: u64, trace: Trace, canaries: &[Canary]) -> Result<Outcome, Failure> {
    guarded(seed, &trace, canaries, || inner(seed, trace.clone()))
}

fn inner(seed: u64, trace: Trace) -> Result<Outcome, String> {
    let opts = Arc::new(FwdOptions::draw(seed));
    let fo = &opts.faults;
    let limits = TransportLimits {
        idle_timeout_ms: 4_000,
        keep_alive_ms: 1_000,
        stream_window_bytes: STREAM_WINDOW_BYTES as u32,
        streams_bidi_max: opts.streams_max,
        ..TransportLimits::default()
    };
    let laptop_id =
        Identity::from_seed("sim laptop", quinn_seed(seed, 0xf0, 0)).map_err(|e| e.to_string())?;
    let agent_id =
        Identity::from_seed("sim agent", quinn_seed(seed, 0xf1, 0)).map_err(|e| e.to_string())?;
    let world: Shared = Arc::default();
    {
        let d = &fo.datagrams;
        let lossless = d.loss == 0.0 && d.duplicate == 0.0 && d.corrupt == 0.0 && d.reorder == 0.0;
        lock(&world).healthy_until_ms = match (lossless, fo.events.first()) {
            (false, _) => 0,
            (true, Some(e)) => e.at_ms,
            (true, None) => fo.safety_ms,
        };
    }
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
        let (id, fp, trace, limits, world, opts) = (
            agent_id.clone(),
            laptop_id.fingerprint(),
            trace.clone(),
            limits.clone(),
            world.clone(),
            opts.clone(),
        );
        let dg = fo.datagrams;
        sim.host(ws_host(0), move || {
            let (id, trace, limits, world, opts) = (
                id.clone(),
                trace.clone(),
                limits.clone(),
                world.clone(),
                opts.clone(),
            );
            let inc = {
                let mut w = lock(&world);
                w.agent_inc += 1;
                w.agent_inc
            };
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
                        roots: Arc::new(cs_agent::sync::HomeRoots {
                            home: std::path::PathBuf::from("/nonexistent/sim-home"),
                            caches: None,
                        }),
                        sync_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        supervisor: None,
                        logs: None,
                        log_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        reverse: Default::default(),
                        dial: dialer(seed, opts, world, trace),
                        forward_permits: Arc::new(tokio::sync::Semaphore::new(FORWARD_STREAMS_MAX)),
                        rsync_home: None,
                        rsync_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        auto_mode: Default::default(),
                    },
                )
                .await;
                Ok(())
            }
        });
    }

    {
        let (trace, world, sleep, opts) =
            (trace.clone(), world.clone(), sleep.clone(), opts.clone());
        let agent_fp = agent_id.fingerprint();
        let dg = fo.datagrams;
        sim.host("laptop", move || {
            let (trace, world, sleep, me, opts) = (
                trace.clone(),
                world.clone(),
                sleep.clone(),
                laptop_id.clone(),
                opts.clone(),
            );
            let inc = {
                let mut w = lock(&world);
                w.laptop_inc += 1;
                // What was open when the laptop crashed ends with it.
                for c in w.conns.values_mut().filter(|c| c.end.is_none()) {
                    c.end = Some(ConnEnd::LaptopCrashed);
                }
                w.laptop_inc
            };
            async move {
                trace.event("laptop", "start", inc);
                let ep = laptop_endpoint(seed, inc, dg, &trace, sleep).await?;
                let connector = SimConnector::to_agent(ep, me, 0, agent_fp, trace.clone());
                let addr = connector.addr.to_string();
                let link = LinkRef {
                    link: connector.start_link(0),
                    name: ws_host(0),
                    addr,
                    local: false,
                };
                // The connections not opened yet (a crashed laptop's are not opened again).
                let todo: Vec<ConnPlan> = {
                    let w = lock(&world);
                    opts.conns
                        .iter()
                        .filter(|c| !w.conns.contains_key(&c.id))
                        .copied()
                        .collect()
                };
                let streams_max = opts.streams_max;
                for plan in todo {
                    let (link, world, trace) = (link.clone(), world.clone(), trace.clone());
                    tokio::task::spawn_local(async move {
                        let wait = plan.at_ms.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        run_conn(seed, streams_max, plan, &link, &world, &trace, inc).await;
                    });
                }
                // Liveness: after the heal, a new connection carries its whole echo.
                loop {
                    if lock(&world).healed {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                for attempt in 0.. {
                    let plan = ConnPlan::live(LIVE_ID_BASE + attempt);
                    if lock(&world).conns.contains_key(&plan.id) {
                        continue;
                    }
                    if run_conn(seed, streams_max, plan, &link, &world, &trace, inc).await {
                        trace.sometimes("forward: new connection after the heal");
                        lock(&world).live_ok_at = Some(now_ms());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(LIVE_RETRY_MS)).await;
                }
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }

    drive(&mut sim, &opts, &trace, &world, &sleep)?;
    let w = lock(&world);
    let clean = w
        .conns
        .values()
        .filter(|c| c.end == Some(ConnEnd::Carried(End::Clean)))
        .count();
    Ok(Outcome {
        seed,
        options: opts.faults.clone(),
        hash: trace.hash(),
        events: trace.events(),
        commands_ok: clean,
        commands_failed: w.conns.len() - clean,
        virtual_ms: sim.elapsed().as_millis() as u64,
        reached: trace.reached(),
    })
}

/// The agent's way to its targets: a pipe to a scripted server, or a refusal.
fn dialer(seed: u64, opts: Arc<FwdOptions>, world: Shared, trace: Trace) -> Dialer {
    Arc::new(move |target: Endpoint| {
        let (opts, world, trace) = (opts.clone(), world.clone(), trace.clone());
        Box::pin(async move {
            let refused =
                || format!("nothing listens on {target} in the workspace (connection refused)");
            let Endpoint::Tcp { host, port } = &target else {
                return Err(refused());
            };
            let Some(plan) = opts.plan(*port).filter(|p| p.server.host() == host) else {
                let v = format!("invariant: the agent dialed {target}, which no connection names");
                lock(&world).violations.push(v);
                return Err(refused());
            };
            if plan.server == Server::Refuse {
                trace.event(&ws_host(0), &format!("dial.refused {}", plan.id), 0);
                return Err(refused());
            }
            let (theirs, ours) = tokio::io::duplex(plan.server.pipe_bytes());
            let (dial, inc) = {
                let mut w = lock(&world);
                let inc = w.agent_inc;
                let Some(c) = w.conns.get_mut(&plan.id) else {
                    let v =
                        format!("invariant: the agent dialed {target} before its client opened");
                    w.violations.push(v);
                    return Err(refused());
                };
                c.server_read.push(0);
                let dial = c.server_read.len() - 1;
                *w.servers_open.entry(inc).or_default() += 1;
                (dial, inc)
            };
            trace.event(&ws_host(0), &format!("dial {} #{dial}", plan.id), 0);
            let open = Open {
                world: world.clone(),
                inc,
            };
            tokio::spawn(serve_target(seed, plan, theirs, world, dial, open));
            Ok(Sock::Pipe(ours))
        })
    })
}

/// Counts a server as open while it lives.
struct Open {
    world: Shared,
    inc: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.world).servers_open.get_mut(&self.inc) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One scripted server: reads, checks that what it reads is its client's payload, echoes as
/// its kind says.
async fn serve_target(
    seed: u64,
    plan: ConnPlan,
    mut pipe: DuplexStream,
    world: Shared,
    dial: usize,
    _open: Open,
) {
    let payload = payload(seed, plan.id, plan.len);
    let echo = plan.server.echoes(plan.len);
    let (chunk, pause_ms) = match plan.server {
        Server::Slow { chunk, pause_ms } => (chunk, pause_ms),
        _ => (SERVER_PIPE_BYTES, 0),
    };
    let mut buf = vec![0u8; chunk];
    let (mut read, mut echoed, mut shut) = (0usize, 0usize, false);
    loop {
        if echoed == echo {
            match plan.server {
                Server::HalfClose { .. } if !shut => {
                    shut = true;
                    let _ = pipe.shutdown().await;
                }
                Server::Reset { .. } => return,
                _ => {}
            }
        }
        if pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut w = lock(&world);
            let sent = w.conns.get(&plan.id).map_or(0, |c| c.sent);
            if read + n > sent || payload.get(read..read + n) != Some(&buf[..n]) {
                let v = format!(
                    "invariant: the server of connection {} read {n} bytes at offset {read} that its client did not send there (it sent {sent})",
                    plan.id
                );
                w.violations.push(v);
                return;
            }
            if let Some(r) = w
                .conns
                .get_mut(&plan.id)
                .and_then(|c| c.server_read.get_mut(dial))
            {
                *r = read + n;
            }
        }
        read += n;
        let take = n.min(echo - echoed);
        if take > 0 {
            if pipe.write_all(&buf[..take]).await.is_err() {
                break;
            }
            echoed += take;
        }
    }
    // The client's end: close ours.
    let _ = pipe.shutdown().await;
}

/// Opens one connection and runs its client; true when it ended cleanly with the whole echo.
async fn run_conn(
    seed: u64,
    streams_max: u32,
    plan: ConnPlan,
    link: &LinkRef,
    world: &Shared,
    trace: &Trace,
    inc: u64,
) -> bool {
    let open = {
        let mut w = lock(world);
        w.conns.insert(
            plan.id,
            ConnState {
                laptop_inc: inc,
                ..ConnState::default()
            },
        );
        w.conns
            .values()
            .filter(|c| c.laptop_inc == inc && c.end.is_none())
            .count()
    };
    if open > streams_max as usize {
        // The ones over the agent's limit wait for a stream.
        trace.sometimes("forward: more connections at once than the agent allows streams");
    }
    trace.event(
        "laptop",
        &format!(
            "fwd.open {} {} {:?} pipe {} pause {}",
            plan.id,
            plan.server.host(),
            plan.client,
            plan.pipe,
            plan.read_pause_ms
        ),
        plan.len as u64,
    );
    let (mine, theirs) = tokio::io::duplex(plan.pipe);
    let counters = Counters::default();
    let (carried, ()) = tokio::join!(
        carry(link, plan.target(), Sock::Pipe(theirs), &counters),
        client(seed, plan, mine, world, trace)
    );
    let end = match carried {
        Carried::Ended(e) => ConnEnd::Carried(e),
        Carried::Refused(r) => ConnEnd::Refused(r),
    };
    check_end(&plan, &end, world, trace)
}

/// The client: writes its payload, reads the echo, checking every byte as it arrives.
async fn client(seed: u64, plan: ConnPlan, pipe: DuplexStream, world: &Shared, trace: &Trace) {
    let payload = payload(seed, plan.id, plan.len);
    let echo = plan.server.echoes(plan.len);
    let (mut r, mut w) = tokio::io::split(pipe);
    let send = match plan.client {
        Client::Reset { after, .. } => after.min(plan.len),
        _ => plan.len,
    };
    let bound = plan.pipe
        + PUMP_BUFFER_BYTES
        + STREAM_WINDOW_BYTES
        // The chunks the far pump holds between reading them and its local write: all of
        // them had arrived at once, so within one stream window.
        + STREAM_WINDOW_BYTES
        + plan.server.pipe_bytes();
    let writer = async {
        let mut off = 0;
        while off < send {
            let end = (off + plan.write_chunk).min(send);
            let n = match w.write(&payload[off..end]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            off += n;
            let mut g = lock(world);
            let Some(c) = g.conns.get_mut(&plan.id) else {
                return;
            };
            c.sent = off;
            // Always: what the writer got ahead of its server is what the buffers on the way
            // hold, no more (backpressure reaches the writer).
            let ahead = off - c.server_read.iter().copied().max().unwrap_or(0);
            if ahead > bound {
                let v = format!(
                    "invariant: connection {} wrote {ahead} bytes its server has not read, more than the {bound} the pipes, pumps and stream window hold",
                    plan.id
                );
                g.violations.push(v);
            } else if ahead >= STREAM_WINDOW_BYTES && matches!(plan.server, Server::Slow { .. }) {
                trace.sometimes("forward: slow server held the writer back");
            }
        }
        if plan.client == Client::HalfClose {
            {
                let mut g = lock(world);
                if let Some(c) = g.conns.get_mut(&plan.id) {
                    c.half_closed_early = c.received < echo;
                }
            }
            let _ = w.shutdown().await;
        }
        if let Client::Reset { wait_ms, .. } = plan.client {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
    };
    let reader = async {
        let mut buf = vec![0u8; plan.pipe];
        let mut got = 0usize;
        loop {
            if plan.client == Client::ReadAll && got >= echo {
                return;
            }
            if plan.read_pause_ms > 0 {
                tokio::time::sleep(Duration::from_millis(plan.read_pause_ms)).await;
            }
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if n == plan.pipe && plan.read_pause_ms > 0 {
                trace.sometimes("forward: slow client reader held the pump back");
            }
            let mut g = lock(world);
            let sent = g.conns.get(&plan.id).map_or(0, |c| c.sent);
            // Always: the bytes received are the echo of what this client sent, in order.
            if got + n > sent.min(echo) || payload.get(got..got + n) != Some(&buf[..n]) {
                let v = format!(
                    "invariant: connection {} ({} server, {:?} client) received {n} bytes at offset {got} that are not the echo of what it sent there (sent {sent}, echo {echo})",
                    plan.id,
                    plan.server.host(),
                    plan.client
                );
                g.violations.push(v);
                return;
            }
            got += n;
            if let Some(c) = g.conns.get_mut(&plan.id) {
                c.received = got;
            }
        }
    };
    match plan.client {
        // A reset: the connection is dropped once the writer is done and its wait over,
        // whatever the reader got by then.
        Client::Reset { .. } => {
            tokio::pin!(writer, reader);
            let mut reader_done = false;
            loop {
                tokio::select! {
                    biased;
                    () = &mut writer => break,
                    () = &mut reader, if !reader_done => reader_done = true,
                }
            }
        }
        Client::HalfClose | Client::ReadAll => {
            tokio::join!(writer, reader);
        }
    }
}

/// Checks how a connection ended; true when it was clean with the whole echo.
fn check_end(plan: &ConnPlan, end: &ConnEnd, world: &Shared, trace: &Trace) -> bool {
    let mut w = lock(world);
    let Some(c) = w.conns.get_mut(&plan.id) else {
        return false;
    };
    let echo = plan.server.echoes(plan.len);
    let (sent, received, early) = (c.sent, c.received, c.half_closed_early);
    c.end = Some(end.clone());
    trace.event(
        "laptop",
        &format!("fwd.end {} {}", plan.id, describe(end)),
        received as u64,
    );
    let mut violation = None;
    match end {
        ConnEnd::Refused(reason) => {
            if received > 0 {
                violation = Some(format!("was refused ({reason}) after {received} bytes"));
            } else if plan.server == Server::Refuse && reason.contains("(connection refused)") {
                trace.sometimes("forward: refused target");
            } else if plan.server != Server::Refuse && reason.contains("(connection refused)") {
                violation = Some(format!("to a listening target was refused: {reason}"));
            }
        }
        ConnEnd::Carried(e) if plan.server == Server::Refuse => {
            violation = Some(format!("to a refusing target was carried and ended {e:?}"));
        }
        ConnEnd::Carried(End::Clean) => {
            // A client that read to the end got the whole echo.
            let reads_all = !matches!(plan.client, Client::Reset { .. });
            if reads_all && received != echo {
                violation = Some(format!(
                    "ended cleanly with {received} of the {echo} bytes its server echoes"
                ));
            } else if reads_all && plan.client == Client::HalfClose && early && echo > 0 {
                trace.sometimes("forward: half-close completed");
            }
        }
        ConnEnd::Carried(End::RemoteReset(_)) => {
            if matches!(plan.server, Server::Reset { .. }) {
                trace.sometimes("forward: server reset reached the client");
            }
        }
        ConnEnd::Carried(End::LocalReset(_)) => {
            if matches!(plan.client, Client::Reset { .. }) {
                trace.sometimes("forward: client reset carried");
            }
        }
        ConnEnd::Carried(End::Lost(_)) => {
            if received < echo && sent > 0 {
                trace.sometimes("forward: connection lost mid-transfer");
            }
        }
        ConnEnd::LaptopCrashed => {}
    }
    // Always: on a healthy network, a connection whose client reads to the end and whose
    // server does not reset ends cleanly with the whole echo (nothing fails for no reason).
    let healthy = now_ms() < w.healthy_until_ms;
    let whole = *end == ConnEnd::Carried(End::Clean) && received == echo;
    if violation.is_none()
        && healthy
        && !whole
        && matches!(plan.client, Client::HalfClose | Client::ReadAll)
        && matches!(
            plan.server,
            Server::Echo | Server::Slow { .. } | Server::HalfClose { .. }
        )
    {
        violation = Some(format!(
            "ended {end:?} with {received} of {echo} echoed bytes on a healthy network"
        ));
    }
    if let Some(v) = violation {
        let v = format!(
            "invariant: connection {} ({} server, {:?} client, {} bytes) {v}",
            plan.id,
            plan.server.host(),
            plan.client,
            plan.len
        );
        w.violations.push(v);
        return false;
    }
    *end == ConnEnd::Carried(End::Clean) && received == echo
}

fn describe(end: &ConnEnd) -> &'static str {
    match end {
        ConnEnd::Carried(End::Clean) => "clean",
        ConnEnd::Carried(End::LocalReset(_)) => "local-reset",
        ConnEnd::Carried(End::RemoteReset(_)) => "remote-reset",
        ConnEnd::Carried(End::Lost(_)) => "lost",
        ConnEnd::Refused(_) => "refused",
        ConnEnd::LaptopCrashed => "laptop-crashed",
    }
}

fn drive(
    sim: &mut turmoil::Sim<'_>,
    opts: &FwdOptions,
    trace: &Trace,
    world: &Shared,
    sleep: &Arc<Sleep>,
) -> Result<(), String> {
    let fo = &opts.faults;
    let mut faults = FaultDriver::new(fo);
    // The watchdog measures real time on purpose: virtual time is what it guards.
    #[allow(clippy::disallowed_methods)]
    let wall = std::time::Instant::now();
    let mut healed = false;
    loop {
        if wall.elapsed() > Duration::from_millis(WALL_LIMIT_MS) {
            return Err(format!(
                "wall-clock watchdog fired after {WALL_LIMIT_MS} ms (frozen virtual time?)"
            ));
        }
        let now = sim.elapsed().as_millis() as u64;
        faults.apply_due(sim, now, trace, sleep, &|_| false);
        if !healed && now >= fo.safety_ms {
            healed = true;
            heal(sim, 1, now, trace, sleep);
            lock(world).healed = true;
        }
        {
            let w = lock(world);
            if let Some(v) = w.violations.first() {
                return Err(v.clone());
            }
            if healed {
                let open: Vec<u16> = w
                    .conns
                    .iter()
                    .filter(|(_, c)| c.laptop_inc == w.laptop_inc && c.end.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                let servers = w.servers_open.get(&w.agent_inc).copied().unwrap_or(0);
                if w.live_ok_at.is_some() && open.is_empty() && servers == 0 {
                    trace.event_at(u128::from(now) * 1000, "net", "done", 0);
                    return Ok(());
                }
                if now > fo.safety_ms + LIVENESS_BUDGET_MS {
                    return Err(format!(
                        "liveness: {LIVENESS_BUDGET_MS} ms after the heal: new connection {}; connections still open {open:?}; servers still open {servers}",
                        if w.live_ok_at.is_some() { "carried" } else { "never carried" }
                    ));
                }
            }
        }
        sim.step().map_err(|e| e.to_string())?;
    }
}
