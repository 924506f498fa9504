//! The supervise scenario: the agent's real supervisor actor (`cs_agent::supervise`) runs a
//! workspace definition's start sequence with scripted processes ([`crate::procs`]) that
//! succeed, fail a few times, crash, hang and ignore SIGTERM, while the seed's faults strike:
//! partitions, lost datagrams, agent crashes in the middle of the sequence, laptop crashes.
//! The laptop follows a daemon's log over the real link and asks for the status; then
//! everything heals.
//!
//! Always: the page's order is never violated (a step starts only after every earlier step of
//! this start succeeded; checkout daemons after every build ended); a once-only step never
//! runs again after its success was remembered; at most one instance of each daemon runs; a
//! log follow never loses or repeats a line; after the heal nothing an earlier agent left
//! runs. Liveness: after the heal the sequence finishes (or, with a hook that hangs, stalls
//! visibly at it) and the follow catches up with the log, before the deadline.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use cs_agent::serve::{accept_loop, Served};
use cs_agent::supervise::{Config, Supervisor};
use cs_cli::link::{open_on_link, Link};
use cs_protocol::supervise::{LogsMsg, LogsOpen, StatusView, SuperviseReply, SuperviseRequest};
use cs_protocol::{Canary, StreamOpen};
use cs_transport::{read_frame, Identity, TransportLimits};
use rand::{Rng, SeedableRng};

use crate::clock::Sleep;
use crate::faults::{FaultKind, Options};
use crate::procs::{now_ms, Event, ScriptHost, Table, EPOCH_MS};
use crate::scenario::{
    agent_endpoint, guarded, heal, laptop_endpoint, quinn_seed, ws_host, Failure, FaultDriver,
    Outcome, SimConnector,
};
use crate::trace::Trace;

/// After the heal, the sequence must be done and the follow caught up by then.
const LIVENESS_BUDGET_MS: u64 = 90_000;
/// Wall-clock budget of one seed.
const WALL_LIMIT_MS: u64 = 60_000;
/// Lines the followed daemon writes per instance.
const PRINTED_LINES: u32 = 200;
/// Attempts of the user's stop and start, 300 ms apart.
const USER_TRIES_MAX: u32 = 100;
/// How often the laptop asks for the status.
const STATUS_EVERY_MS: u64 = 250;

/// A seed's supervise options: the fault schedule (one workspace) and the workspace.
#[derive(Debug, Clone)]
pub struct SupOptions {
    pub faults: Options,
    pub setup: String,
    pub user_setup: String,
    pub global: Option<String>,
    /// Per checkout: clone script, post-checkout hook, build hook, daemons (name, script).
    pub checkouts: Vec<CheckoutOpts>,
    /// The user stops a daemon at this time and starts it this much later.
    pub user_stop: Option<(u64, String, u64)>,
}

#[derive(Debug, Clone)]
pub struct CheckoutOpts {
    pub clone: String,
    pub post_checkout: Option<String>,
    pub build: String,
    pub daemons: Vec<(String, String)>,
}

impl SupOptions {
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
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5a9e_7715);
        fn pick(rng: &mut rand::rngs::StdRng, v: &[&str]) -> String {
            v[rng.gen_range(0..v.len())].to_string()
        }
        let setup = pick(&mut rng, &["ok 20", "ok 200", "failfirst 1 30 7"]);
        let user_setup = pick(&mut rng, &["ok 10", "failfirst 2 10 1", "ok 400"]);
        let global = [None, Some("serve"), Some("crash 300 1"), Some("stubborn")]
            [rng.gen_range(0..4)]
        .map(str::to_string);
        let n = rng.gen_range(1..=2);
        let mut checkouts = Vec::new();
        for i in 0..n {
            let clone = pick(&mut rng, &["ok-50", "ok-600", "failfirst-1-40-128"]);
            let post_checkout = [
                None,
                Some("ok 20"),
                Some("failfirst 1 20 2"),
                Some("ok 500"),
            ][rng.gen_range(0..4)]
            .map(str::to_string);
            // A hook that hangs in a few seeds: the sequence must stall visibly there.
            let build = if rng.gen_bool(0.08) {
                "hang".to_string()
            } else {
                pick(&mut rng, &["ok 30", "failfirst 1 30 2", "ok 700"])
            };
            let mut daemons = Vec::new();
            if i == 0 {
                daemons.push(("printer".to_string(), format!("print {PRINTED_LINES} 20")));
            }
            for j in 0..rng.gen_range(0..=2) {
                daemons.push((
                    format!("d{i}{j}"),
                    pick(&mut rng, &["serve", "crash 400 1", "stubborn", "crash 5 3"]),
                ));
            }
            checkouts.push(CheckoutOpts {
                clone,
                post_checkout,
                build,
                daemons,
            });
        }
        let names: Vec<String> = checkouts
            .iter()
            .flat_map(|c| c.daemons.iter().map(|d| d.0.clone()))
            .collect();
        let user_stop = rng.gen_bool(0.4).then(|| {
            (
                rng.gen_range(500..faults.safety_ms.max(600)),
                names[rng.gen_range(0..names.len())].clone(),
                rng.gen_range(0..2_000),
            )
        });
        Self {
            faults,
            setup,
            user_setup,
            global,
            checkouts,
            user_stop,
        }
    }

    /// The workspace definition.
    pub fn definition(&self) -> String {
        let mut s = String::from("workspaces:\n- name: agent0\n  system:\n    files:\n");
        for (path, script) in [
            ("/etc/sandbox.d/setup", &self.setup),
            ("~/.sandbox/setup", &self.user_setup),
            ("/etc/sandbox.d/post-setup", &"ok 10".to_string()),
        ] {
            s.push_str(&format!(
                "    - {{path: '{path}', mode: '0755', content: \"#!/bin/sh\\n{script}\\n\"}}\n"
            ));
        }
        if let Some(g) = &self.global {
            s.push_str(&format!(
                "    daemons:\n    - {{name: g0, run: {{cmd: '{g}'}}}}\n"
            ));
        }
        s.push_str("  checkouts:\n");
        for (i, c) in self.checkouts.iter().enumerate() {
            s.push_str(&format!(
                "  - path: c{i}\n    repo: {{git: 'sim:{}'}}\n    manifest:\n      overlays:\n      - inline:\n          hooks:\n            build: {{cmd: '{}'}}\n",
                c.clone, c.build
            ));
            if let Some(p) = &c.post_checkout {
                s.push_str(&format!("            post-checkout: {{cmd: '{p}'}}\n"));
            }
            if !c.daemons.is_empty() {
                s.push_str("          daemons:\n");
                for (name, script) in &c.daemons {
                    s.push_str(&format!(
                        "            {name}: {{run: {{cmd: '{script}'}}}}\n"
                    ));
                }
            }
        }
        s
    }

    fn daemon_names(&self) -> Vec<String> {
        self.global
            .iter()
            .map(|_| "g0".to_string())
            .chain(
                self.checkouts
                    .iter()
                    .flat_map(|c| c.daemons.iter().map(|d| d.0.clone())),
            )
            .collect()
    }

    /// Daemons whose script exits on its own.
    fn crashing_daemons(&self) -> Vec<String> {
        let global = self
            .global
            .iter()
            .filter(|g| g.starts_with("crash"))
            .map(|_| "g0".to_string());
        global
            .chain(self.checkouts.iter().flat_map(|c| {
                c.daemons
                    .iter()
                    .filter(|d| d.1.starts_with("crash"))
                    .map(|d| d.0.clone())
            }))
            .collect()
    }

    fn hung_step(&self) -> Option<String> {
        self.checkouts
            .iter()
            .enumerate()
            .find(|(_, c)| c.build == "hang")
            .map(|(i, _)| format!("build:c{i}"))
    }
}

impl std::fmt::Display for SupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; setup '{}' user-setup '{}' global {:?}",
            self.faults, self.setup, self.user_setup, self.global
        )?;
        for (i, c) in self.checkouts.iter().enumerate() {
            write!(
                f,
                "; c{i}: clone {} post-checkout {:?} build '{}' daemons {:?}",
                c.clone, c.post_checkout, c.build, c.daemons
            )?;
        }
        if let Some((at, d, len)) = &self.user_stop {
            write!(f, "; user stops {d} at {at} ms for {len} ms")?;
        }
        Ok(())
    }
}

/// What the laptop saw.
#[derive(Debug, Default)]
struct World {
    status: Option<(u64, StatusView)>,
    /// Sequence numbers the follow printed, in order.
    followed: Vec<u64>,
    follow_reopened: bool,
    violations: Vec<String>,
    user_done: bool,
    /// A daemon the user stopped and has not started again (a laptop crash can end the
    /// user's session in between): it stays stopped, and is not flagged.
    user_stopped: Option<String>,
    crashing_seen: bool,
    hang_seen: bool,
}

pub fn run_supervise_seed(
    seed: u64,
    trace: Trace,
    canaries: &[Canary],
) -> Result<Outcome, Failure> {
    guarded(seed, &trace, canaries, || inner(seed, trace.clone()))
}

fn inner(seed: u64, trace: Trace) -> Result<Outcome, String> {
    let opts = SupOptions::draw(seed);
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
    let def = cs_supervisor::definition::Definition::parse(&opts.definition())
        .map_err(|e| format!("the seed's definition: {e}\n{}", opts.definition()))?;
    let ws_def = def.workspaces.into_iter().next().ok_or("no workspace")?;
    // The workspace's disk: it survives agent crashes.
    let disk = tempfile::Builder::new()
        .prefix("cs-sim-supervise-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let home = disk.path().join("home");
    let root = disk.path().join("root");
    std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
    let paths = cs_agent::state::AgentPaths::new(&root);
    paths.create().map_err(|e| e.to_string())?;
    let table = Rc::new(RefCell::new(Table::default()));
    let world = Rc::new(RefCell::new(World::default()));
    let sleep = Arc::new(Sleep::default());
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .simulation_duration(Duration::from_millis(
            fo.safety_ms + LIVENESS_BUDGET_MS + 10_000,
        ))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(fo.latency_max_ms))
        .build();
    crate::net::unheal_all();
    let daemons = opts.daemon_names();

    {
        let (id, fp, trace, limits, table) = (
            agent_id.clone(),
            laptop_id.fingerprint(),
            trace.clone(),
            limits.clone(),
            table.clone(),
        );
        let cfg = Config {
            workspace: Some(ws_def),
            home: home.clone(),
            root: root.clone(),
            etc: paths.etc.clone(),
            state: paths.state.clone(),
            shell: "/bin/sh".into(),
            env: vec![("HOME".into(), home.display().to_string())],
            root_env: vec![],
            owner: None,
            secrets: None,
            auto_retry: true,
            auto_poll_ms: 30_000,
            auto_flag: Default::default(),
        };
        let log_dir = paths.log.clone();
        let dg = fo.datagrams;
        let daemons = daemons.clone();
        sim.host(ws_host(0), move || {
            let (id, trace, limits, table, cfg, log_dir, daemons) = (
                id.clone(),
                trace.clone(),
                limits.clone(),
                table.clone(),
                cfg.clone(),
                log_dir.clone(),
                daemons.clone(),
            );
            let inc = {
                let mut t = table.borrow_mut();
                t.incarnation += 1;
                t.incarnation
            };
            async move {
                trace.event(&ws_host(0), "start", inc);
                let (ep, trust) =
                    agent_endpoint(seed, 0, inc, dg, &trace, &id, &limits, fp).await?;
                let logs = cs_agent::logs::LogHub::with_clock(
                    log_dir,
                    cs_log::rotate::Policy {
                        file_bytes_max: 16 * 1024,
                        keep: 3,
                    },
                    Arc::new(|| EPOCH_MS + now_ms()),
                );
                let host = Rc::new(ScriptHost { table, daemons });
                let supervisor = Supervisor::new(cfg, logs.clone(), host).start();
                let exec = cs_exec::ExecActor::new(Rc::new(crate::script::ScriptSpawner)).start();
                accept_loop(
                    ep,
                    Served {
                        workspace: ws_host(0),
                        trust,
                        exec,
                        roots: Arc::new(cs_agent::sync::HomeRoots {
                            home: std::path::PathBuf::from("/nonexistent"),
                            caches: None,
                        }),
                        sync_permits: Arc::new(tokio::sync::Semaphore::new(1)),
                        supervisor: Some(supervisor),
                        logs: Some(logs),
                        log_permits: Arc::new(tokio::sync::Semaphore::new(4)),
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
        let (trace, world, sleep) = (trace.clone(), world.clone(), sleep.clone());
        let agent_fp = agent_id.fingerprint();
        let dg = fo.datagrams;
        let user_stop = opts.user_stop.clone();
        let incarnation = Rc::new(std::cell::Cell::new(0u64));
        sim.host("laptop", move || {
            let (trace, world, sleep, me, user_stop) = (
                trace.clone(),
                world.clone(),
                sleep.clone(),
                laptop_id.clone(),
                user_stop.clone(),
            );
            let inc = incarnation.get() + 1;
            incarnation.set(inc);
            async move {
                trace.event("laptop", "start", inc);
                let ep = laptop_endpoint(seed, inc, dg, &trace, sleep).await?;
                let link = SimConnector::to_agent(ep, me, 0, agent_fp, trace.clone()).start_link(0);
                {
                    let (link, world) = (link.clone(), world.clone());
                    tokio::task::spawn_local(async move { follow(link, world).await });
                }
                if let Some((at, name, len)) = user_stop.filter(|_| inc == 1) {
                    let (link, world) = (link.clone(), world.clone());
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep(Duration::from_millis(at)).await;
                        // Until the daemon exists and the request gets through (bounded).
                        let asked = |req: SuperviseRequest| {
                            let link = link.clone();
                            async move {
                                for _ in 0..USER_TRIES_MAX {
                                    if let Some(SuperviseReply::Done(_)) =
                                        ask(&link, req.clone()).await
                                    {
                                        return true;
                                    }
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                }
                                false
                            }
                        };
                        if asked(SuperviseRequest::Stop(name.clone())).await {
                            world.borrow_mut().user_stopped = Some(name.clone());
                            tokio::time::sleep(Duration::from_millis(len)).await;
                            if asked(SuperviseRequest::Start(name)).await {
                                let mut w = world.borrow_mut();
                                w.user_done = true;
                                w.user_stopped = None;
                            }
                        }
                    });
                }
                loop {
                    if let Some(SuperviseReply::Status(s)) =
                        ask(&link, SuperviseRequest::Status).await
                    {
                        let mut w = world.borrow_mut();
                        if !s.crashing.is_empty() {
                            w.crashing_seen = true;
                        }
                        if s.running.as_ref().is_some_and(|(_, ms)| *ms >= 2_000) {
                            w.hang_seen = true;
                        }
                        w.status = Some((now_ms(), *s));
                    }
                    tokio::time::sleep(Duration::from_millis(STATUS_EVERY_MS)).await;
                }
            }
        });
    }

    drive(&mut sim, &opts, &trace, &world, &table, &sleep, &paths.log)?;
    check(&opts, &table.borrow(), &world.borrow(), &trace)?;
    let t = table.borrow();
    Ok(Outcome {
        seed,
        options: opts.faults.clone(),
        hash: trace.hash(),
        events: trace.events(),
        commands_ok: t.events.len(),
        commands_failed: t
            .events
            .iter()
            .filter(|e| matches!(e.3, Event::Reported { ok: false, .. }))
            .count(),
        virtual_ms: sim.elapsed().as_millis() as u64,
        reached: trace.reached(),
    })
}

/// One supervise request over the link; `None` when it could not be asked.
async fn ask(link: &actix::Addr<Link>, req: SuperviseRequest) -> Option<SuperviseReply> {
    let opened = open_on_link(link, "agent0", "agent0", &StreamOpen::Supervise(req))
        .await
        .ok()?;
    cs_protocol::decode::<SuperviseReply>(
        &opened.first_frame[cs_protocol::codec::FRAME_HEADER_BYTES..],
    )
    .ok()
}

/// Follows the printer's log from its first line, reopening after any loss and resuming
/// after the last line printed, as `cs logs -f` does.
async fn follow(link: actix::Addr<Link>, world: Rc<RefCell<World>>) {
    loop {
        let after = world.borrow().followed.last().copied();
        if after.is_some() {
            world.borrow_mut().follow_reopened = true;
        }
        let open = StreamOpen::Logs(LogsOpen {
            name: "printer".into(),
            follow: true,
            after_seq: Some(after.unwrap_or(0)),
            last: 0,
        });
        if let Ok(mut opened) = open_on_link(&link, "agent0", "agent0", &open).await {
            let first = cs_protocol::decode::<LogsMsg>(
                &opened.first_frame[cs_protocol::codec::FRAME_HEADER_BYTES..],
            );
            let mut next = first.ok();
            while let Some(msg) = next.take() {
                match msg {
                    LogsMsg::Lines(lines) => {
                        let mut w = world.borrow_mut();
                        for (seq, _, _) in lines {
                            if let Some(&last) = w.followed.last() {
                                if seq <= last {
                                    let v = format!(
                                        "invariant: the follow got line {seq} after {last}"
                                    );
                                    w.violations.push(v);
                                    continue;
                                }
                                if seq != last + 1 {
                                    let v = format!(
                                        "invariant: the follow skipped from line {last} to {seq}"
                                    );
                                    w.violations.push(v);
                                }
                            } else if seq != 1 {
                                w.violations
                                    .push(format!("invariant: the follow began at line {seq}"));
                            }
                            w.followed.push(seq);
                        }
                    }
                    LogsMsg::End | LogsMsg::Error(_) => break,
                }
                next = read_frame::<_, LogsMsg>(&mut opened.recv)
                    .await
                    .ok()
                    .flatten();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last record's sequence number in a log's files.
fn stored_last_seq(log_dir: &std::path::Path, name: &str) -> Option<u64> {
    let policy = cs_log::rotate::Policy {
        file_bytes_max: 16 * 1024,
        keep: 3,
    };
    let mut last = None;
    for f in policy.files(name) {
        if let Ok(text) = std::fs::read_to_string(log_dir.join(f)) {
            if let Some(r) = text
                .lines()
                .filter_map(cs_log::line::Record::parse)
                .next_back()
            {
                last = Some(r.seq);
            }
        }
    }
    last
}

fn drive(
    sim: &mut turmoil::Sim<'_>,
    opts: &SupOptions,
    trace: &Trace,
    world: &Rc<RefCell<World>>,
    table: &Rc<RefCell<Table>>,
    sleep: &Arc<Sleep>,
    log_dir: &std::path::Path,
) -> Result<(), String> {
    let fo = &opts.faults;
    let mut faults = FaultDriver::new(fo);
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
        let crashed = faults.apply_due(sim, now, trace, sleep, &|_| false);
        if !crashed.is_empty() {
            let mut t = table.borrow_mut();
            let inc = t.incarnation;
            t.crashes.insert(inc, now);
        }
        if !healed && now >= fo.safety_ms {
            healed = true;
            heal(sim, 1, now, trace, sleep);
        }
        if let Some(v) = table.borrow().violations.first() {
            return Err(v.clone());
        }
        if let Some(v) = world.borrow().violations.first() {
            return Err(v.clone());
        }
        if healed {
            let w = world.borrow();
            let fresh = w.status.as_ref().filter(|(at, _)| *at > fo.safety_ms + 500);
            let settled = match (fresh, opts.hung_step()) {
                (Some((_, s)), Some(hung)) => {
                    // Stalled visibly at the hung hook (another build's failure may make the
                    // state Problematic meanwhile; the running step is named either way).
                    s.running.as_ref().is_some_and(|(step, _)| *step == hung)
                        && (s.state == "Problematic" || s.step.as_deref() == Some(hung.as_str()))
                }
                (Some((_, s)), None) => {
                    // Every daemon that exits on its own is flagged in the end (each of its
                    // runs is shorter than a stable run), and nothing else is.
                    let crashing: BTreeSet<&str> = s.crashing.iter().map(String::as_str).collect();
                    s.step.is_none()
                        && crashing
                            == opts
                                .crashing_daemons()
                                .iter()
                                .map(String::as_str)
                                .filter(|d| w.user_stopped.as_deref() != Some(*d))
                                .collect()
                        && (if crashing.is_empty() {
                            s.state == "Ready"
                        } else {
                            s.why
                                .as_deref()
                                .is_some_and(|w| w.starts_with("daemons keep crashing"))
                        })
                }
                (None, _) => false,
            };
            let printer_runs = opts.hung_step().is_none();
            let caught_up = !printer_runs || {
                let stored = stored_last_seq(log_dir, "printer");
                stored.is_some() && w.followed.last().copied() == stored
            };
            // Settled, caught up, and the printer done with its lines (the log is still).
            let quiet = table.borrow().procs.values().all(|p| {
                p.log != "printer"
                    || !p.alive_at(now)
                    || now >= p.started_ms + u64::from(PRINTED_LINES) * 20 + 200
            });
            if settled && caught_up && quiet {
                trace.event_at(u128::from(now) * 1000, "net", "settled", 0);
                return Ok(());
            }
            if now > fo.safety_ms + LIVENESS_BUDGET_MS {
                return Err(format!(
                    "liveness: not settled {LIVENESS_BUDGET_MS} ms after the heal: status {:?}; followed up to {:?} of {:?}",
                    w.status.as_ref().map(|(at, s)| (at, &s.state, &s.step, &s.why)),
                    w.followed.last(),
                    stored_last_seq(log_dir, "printer")
                ));
            }
        }
        sim.step().map_err(|e| e.to_string())?;
    }
}

/// The page's rank of a step or program, by its log name.
fn rank(name: &str, global: bool) -> u32 {
    match name {
        "setup" => 1,
        "user-setup" => 2,
        "post-setup" => 8,
        n if n.starts_with("checkout:") => 4,
        n if n.starts_with("post-checkout:") => 5,
        n if n.starts_with("build:") => 6,
        _ if global => 3,
        _ => 7,
    }
}

fn once_only(name: &str) -> bool {
    name.starts_with("checkout:")
        || name.starts_with("post-checkout:")
        || name.starts_with("build:")
}

fn check(opts: &SupOptions, t: &Table, w: &World, trace: &Trace) -> Result<(), String> {
    let daemons: BTreeSet<String> = opts.daemon_names().into_iter().collect();
    let is_daemon = |n: &str| daemons.contains(n);
    let incarnations: BTreeSet<u64> = t.events.iter().map(|e| e.1).collect();
    for &inc in &incarnations {
        let evs: Vec<&(u64, u64, String, Event)> = t.events.iter().filter(|e| e.1 == inc).collect();
        let started: BTreeSet<&str> = evs
            .iter()
            .filter(|e| matches!(e.3, Event::Start { .. }))
            .map(|e| e.2.as_str())
            .collect();
        for (at, _, name, ev) in &evs {
            let Event::Start { .. } = ev else { continue };
            let r = rank(name, name == "g0");
            for other in &started {
                if is_daemon(other) || rank(other, *other == "g0") >= r {
                    continue;
                }
                let builds_any = r == 7 && other.starts_with("build:");
                let done = evs.iter().any(|(t2, _, n2, e2)| {
                    n2 == other
                        && t2 <= at
                        && matches!(e2, Event::Reported { ok, .. } if *ok || builds_any)
                });
                if !done {
                    return Err(format!(
                        "invariant: {name} started at {at} ms (agent incarnation {inc}) before {other} {}",
                        if builds_any { "ended" } else { "succeeded" }
                    ));
                }
            }
        }
    }
    // Once-only steps never start again after their success was remembered.
    let mut skipped = false;
    for (at, inc, name, ev) in &t.events {
        if !once_only(name) || !matches!(ev, Event::Reported { ok: true, .. }) {
            continue;
        }
        let remembered = t.crashes.get(inc).is_none_or(|c| c > at);
        for (at2, inc2, name2, ev2) in &t.events {
            if name2 == name && at2 > at && matches!(ev2, Event::Start { .. }) && remembered {
                return Err(format!(
                    "invariant: {name} succeeded at {at} ms (incarnation {inc}) and started again at {at2} ms (incarnation {inc2})"
                ));
            }
        }
        if remembered && incarnations.iter().any(|i| i > inc) {
            skipped = true;
        }
    }
    // After the heal nothing an earlier agent started still runs.
    if let Some((pid, p)) = t
        .procs
        .iter()
        .find(|(_, p)| p.incarnation < t.incarnation && p.alive_at(u64::MAX - 1))
    {
        return Err(format!(
            "invariant: pid {pid} ({}) of agent incarnation {} still runs under incarnation {}",
            p.log, p.incarnation, t.incarnation
        ));
    }
    // Coverage.
    if skipped {
        trace.sometimes("supervise: once-only step skipped after a restart");
    }
    if t.leftovers_ended > 0 {
        trace.sometimes("supervise: leftover ended by a restarted agent");
    }
    let mut starts: BTreeMap<(u64, &str), u32> = BTreeMap::new();
    let mut failed: BTreeSet<(u64, &str)> = BTreeSet::new();
    for (_, inc, name, ev) in &t.events {
        match ev {
            Event::Start { .. } => {
                *starts.entry((*inc, name.as_str())).or_default() += 1;
                if failed.contains(&(*inc, name.as_str())) && !is_daemon(name) {
                    trace.sometimes("supervise: step failed and was retried");
                }
            }
            Event::Reported { ok: false, .. } => {
                failed.insert((*inc, name.as_str()));
            }
            Event::Reported { .. } => {}
        }
    }
    if starts.iter().any(|((_, n), c)| is_daemon(n) && *c > 1) {
        trace.sometimes("supervise: daemon restarted after it stopped");
    }
    if w.crashing_seen {
        trace.sometimes("supervise: workspace flagged for a crashing daemon");
    }
    if w.hang_seen && opts.hung_step().is_some() {
        trace.sometimes("supervise: hung hook reported");
    }
    if w.follow_reopened {
        trace.sometimes("supervise: log follow resumed");
    }
    if w.user_done {
        trace.sometimes("supervise: daemon stopped and started by the user");
    }
    Ok(())
}
