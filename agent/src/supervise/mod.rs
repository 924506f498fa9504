//! The supervisor actor: the start sequence, checkouts, hooks, daemons and jobs of one
//! workspace, run as real processes.
//!
//! The decisions are the cores' (`cs_supervisor`): the sequence's order and failures
//! (`sequence`), restart delays (`backoff`), when jobs fire (`jobs`, `cron`), env expansion,
//! templates and checkout scripts. This shell reads the filesystem and the definition, starts
//! programs and reads clocks through its [`host::Host`] (real processes in the agent, scripted
//! ones in the simulation), keeps what ran once in `ROOT/var/lib/cs-agent/supervisor.json`,
//! written atomically before anything after it starts, so an agent restart never runs a
//! once-only step again, and the running process groups in `running.json`, so an agent that
//! crashed ends them when it starts again.

pub mod host;
pub mod identity;
pub mod proc;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use actix::prelude::*;
use cs_protocol::supervise::{ProcKind, ProcView, StatusView, SuperviseReply, SuperviseRequest};
use cs_supervisor::backoff::{Backoff, Failures};
use cs_supervisor::cron::{Minute, Schedule};
use cs_supervisor::definition::{Checkout, GlobalDaemon, Manifest, Run, Workspace};
use cs_supervisor::env::Env;
use cs_supervisor::jobs::{Due, JobClock, JobView};
use cs_supervisor::sequence::{Effect, Outcome, Sequence, State, Step};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::logs::LogHub;
use host::Host;
use identity::User;
use proc::{Exit, Launch, Running};

/// Lines of a failed step's log `cs status` shows.
const STATUS_TAIL_LINES: u32 = 10;
/// Grace daemons get when the agent itself shuts down (it has 3 s before SIGKILL).
pub const SHUTDOWN_GRACE_MS: u64 = 2_000;
/// How often a daemon waiting for its last instance's group to go checks again.
const LEFTOVER_POLL_MS: u64 = 100;
/// Requests waiting on a daemon's stop, per daemon.
const WAITERS_MAX: usize = 64;

/// What the supervisor needs to know about its workspace.
#[derive(Debug, Clone)]
pub struct Config {
    /// The definition's workspace; `None` without a definition (nothing to run but the
    /// setup scripts and global daemons found under the system root).
    pub workspace: Option<Workspace>,
    pub home: PathBuf,
    /// The system root: absolute injected paths and `/etc/sandbox.d` live under it.
    pub root: PathBuf,
    pub etc: PathBuf,
    pub state: PathBuf,
    pub shell: PathBuf,
    /// The environment of the owner's programs (HOME, USER, PATH, SHELL, ...).
    pub env: Vec<(String, String)>,
    /// The environment of system-level programs (root's, when the agent is root).
    pub root_env: Vec<(String, String)>,
    /// Run the owner's programs as this user (the agent runs as root).
    pub owner: Option<User>,
    /// One file per secret, for `{{secret "NAME"}}` in templates.
    pub secrets: Option<PathBuf>,
    pub auto_retry: bool,
    /// How often Auto Mode polls the checkouts' remote branches.
    pub auto_poll_ms: u64,
    /// Set while the workspace is in Auto Mode (the accept loop warns `cs ssh` with it).
    pub auto_flag: Arc<AtomicBool>,
}

/// What survives an agent restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Persisted {
    done_once: BTreeSet<Step>,
    /// Jobs enabled or disabled by `cs sandbox job enable|disable`.
    jobs: BTreeMap<String, bool>,
    /// Auto Mode.
    #[serde(default)]
    auto: bool,
}

/// A daemon or a job.
#[derive(Debug)]
struct Proc {
    kind: ProcKind,
    checkout: String,
    launch: Launch,
    schedule: Option<Schedule>,
    /// A daemon: meant to run (not stopped by the user, not disabled on start). A job: fires
    /// on its schedule.
    enabled: bool,
    running: Option<(Running, u64)>,
    generation: u64,
    /// It was asked to stop; its exit is not a crash.
    stopping: bool,
    /// Start again once it has stopped (a restart).
    start_after_stop: bool,
    failures: Failures,
    restarts: u32,
    last_exit: Option<String>,
    restart_at: Option<u64>,
    waiters: Vec<oneshot::Sender<()>>,
    /// What its last leader left in its group, being stopped; it starts again only once that
    /// is gone (never two instances).
    leftover: Option<Running>,
}

/// The supervisor of one workspace.
pub struct Supervisor {
    cfg: Config,
    host: Rc<dyn Host>,
    logs: LogHub,
    epoch: Instant,
    seq: Sequence,
    persisted: Persisted,
    steps_done: Vec<String>,
    /// How long each step's last run took, by name (a failed step's shows in `cs status`).
    last_ran: BTreeMap<String, u64>,
    /// The step running now and its process (none for in-process steps).
    step_proc: Option<(Step, Option<Running>)>,
    procs: BTreeMap<String, Proc>,
    clock: JobClock,
    /// `cs build`, or an Auto Mode update, running.
    chore: Option<Chore>,
    /// The last Auto Mode update failed: why (shown as Problematic until one succeeds).
    auto_failed: Option<String>,
    auto_armed: bool,
    /// Timers armed, by due time, so the same wake-up is not armed twice.
    timers: BTreeSet<u64>,
    shutting_down: bool,
}

/// Work outside the start sequence, one program at a time: `cs build`, or an Auto Mode
/// update of the checkouts whose branch moved.
struct Chore {
    /// `Checkout` here is the update of a checkout to its remote branch's new commit;
    /// `PostCheckout` and `Build` are the hooks.
    left: Vec<Step>,
    failed: Vec<String>,
    reply: Option<oneshot::Sender<SuperviseReply>>,
    /// The branch each updated checkout follows.
    branches: BTreeMap<String, String>,
    /// An Auto Mode update: restart the daemons when done.
    relaunch: bool,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of a local minute (for `cs ps`'s next run).
fn minute_unix(host: &dyn Host, m: &Minute) -> u64 {
    let naive = days_from_civil(m.year as i64, m.month as i64, m.day as i64) * 86_400
        + m.hour as i64 * 3_600
        + m.minute as i64 * 60;
    // The offset at the answer, found in two steps (it may differ from now's across a DST
    // change).
    let guess = naive - host.utc_offset(naive);
    (naive - host.utc_offset(guess)).max(0) as u64
}

impl Supervisor {
    pub fn new(cfg: Config, logs: LogHub, host: Rc<dyn Host>) -> Self {
        let persisted = load_persisted(&cfg.state);
        cfg.auto_flag.store(persisted.auto, Ordering::Relaxed);
        let seq = Self::sequence(&cfg, &persisted);
        Self {
            cfg,
            host,
            logs,
            epoch: Instant::now(),
            seq,
            persisted,
            steps_done: Vec::new(),
            last_ran: BTreeMap::new(),
            step_proc: None,
            procs: BTreeMap::new(),
            clock: JobClock::default(),
            chore: None,
            auto_failed: None,
            auto_armed: false,
            timers: BTreeSet::new(),
            shutting_down: false,
        }
    }

    fn sequence(cfg: &Config, p: &Persisted) -> Sequence {
        let checkouts: Vec<String> = cfg
            .workspace
            .iter()
            .flat_map(|w| &w.checkouts)
            .map(|c| c.path.as_str().to_string())
            .collect();
        let snapshot = cfg
            .workspace
            .as_ref()
            .is_some_and(|w| w.home_snapshot.is_some());
        Sequence::new(
            &checkouts,
            snapshot,
            p.auto,
            p.done_once.clone(),
            cfg.auto_retry,
        )
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn checkout(&self, path: &str) -> Option<&Checkout> {
        self.cfg
            .workspace
            .as_ref()?
            .checkouts
            .iter()
            .find(|c| c.path.as_str() == path)
    }

    fn checkout_dir(&self, path: &str) -> PathBuf {
        self.cfg.home.join(path)
    }

    // -----------------------------------------------------------------------------------------
    // The sequence.

    fn apply(&mut self, effects: Vec<Effect>, ctx: &mut Context<Self>) {
        for e in effects {
            match e {
                Effect::Run(step) => self.run_step(step, ctx),
                Effect::WakeAt(at) => self.wake_at(at, ctx),
                Effect::RememberDone(step) => {
                    if cs_protocol::canary::active(cs_protocol::Canary::DoneForgotten) {
                        continue;
                    }
                    self.persisted.done_once.insert(step);
                    self.save();
                }
                Effect::RelaunchDaemons => self.restart_daemons(ctx),
            }
        }
    }

    fn wake_at(&mut self, at: u64, ctx: &mut Context<Self>) {
        if !self.timers.insert(at) {
            return;
        }
        let delay = at.saturating_sub(self.now_ms());
        ctx.run_later(Duration::from_millis(delay), move |act, ctx| {
            act.timers.remove(&at);
            act.tick(ctx);
        });
    }

    /// Time passed: sequence retries and daemon restarts that are due.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        let now = self.now_ms();
        let effects = self.seq.tick(now);
        self.apply(effects, ctx);
        let due: Vec<String> = self
            .procs
            .iter()
            .filter(|(_, p)| p.restart_at.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(p) = self.procs.get_mut(&name) {
                p.restart_at = None;
                if p.enabled && p.running.is_none() {
                    p.restarts += 1;
                    self.start_proc(&name, ctx);
                }
            }
        }
    }

    fn step_finished(&mut self, step: Step, outcome: Outcome, ctx: &mut Context<Self>) {
        let ran = match self.seq.running() {
            Some((s, since)) if s == step => self.now_ms().saturating_sub(since),
            _ => 0,
        };
        if self.last_ran.len() < 1024 || self.last_ran.contains_key(&step.name()) {
            self.last_ran.insert(step.name(), ran);
        }
        let how = match &outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Failed { why } => why.clone(),
        };
        tracing::info!(step = %step.name(), outcome = %how, ran_ms = ran, "step finished");
        self.steps_done.push(format!(
            "{}: {how} ({:.1} s)",
            step.name(),
            ran as f64 / 1000.0
        ));
        if self.steps_done.len() > 256 {
            self.steps_done.remove(0);
        }
        self.step_proc = None;
        self.record_running();
        let now = self.now_ms();
        let effects = self.seq.finished(&step, outcome, now);
        self.apply(effects, ctx);
        if self.seq.state() == State::Done {
            self.arm_auto(ctx);
        }
    }

    /// Finishes `step` from an in-process result, through the mailbox (so effects apply in
    /// order, as they do for a process).
    fn finish_later(&mut self, step: Step, result: Result<(), String>, ctx: &mut Context<Self>) {
        let outcome = match result {
            Ok(()) => Outcome::Ok,
            Err(why) => {
                self.logs.note(&step.name(), &why);
                Outcome::Failed { why }
            }
        };
        self.step_proc = Some((step.clone(), None));
        ctx.notify(StepDone { step, outcome });
    }

    fn run_step(&mut self, step: Step, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        let name = step.name();
        tracing::info!(step = %name, "step starting");
        match &step {
            Step::HomeSnapshot => {
                let archive = self
                    .cfg
                    .workspace
                    .as_ref()
                    .and_then(|w| w.home_snapshot.clone())
                    .unwrap_or_default();
                let cmd = format!(
                    "tar -xf {} -C {}",
                    cs_supervisor::checkout::quote(&archive),
                    cs_supervisor::checkout::quote(&self.cfg.home.display().to_string())
                );
                self.launch_step(
                    step,
                    cmd,
                    self.cfg.home.clone(),
                    self.owner_env(),
                    false,
                    ctx,
                );
            }
            Step::InjectFiles => {
                let r = self.inject_files();
                self.finish_later(step, r, ctx);
            }
            Step::SystemSetup | Step::PostSetup | Step::UserSetup => {
                let (path, system) = match step {
                    Step::SystemSetup => (self.cfg.etc.join("setup"), true),
                    Step::PostSetup => (self.cfg.etc.join("post-setup"), true),
                    _ => (self.cfg.home.join(".sandbox/setup"), false),
                };
                if !is_executable(&path) {
                    self.logs.note(
                        &name,
                        &format!(
                            "{} is not present or not executable: skipped",
                            path.display()
                        ),
                    );
                    return self.finish_later(step, Ok(()), ctx);
                }
                let cmd = cs_supervisor::checkout::quote(&path.display().to_string());
                let env = if system {
                    self.cfg.root_env.clone()
                } else {
                    self.owner_env()
                };
                let dir = if system {
                    self.cfg.root.clone()
                } else {
                    self.cfg.home.clone()
                };
                self.launch_step(step, cmd, dir, env, system, ctx);
            }
            Step::GlobalDaemons => {
                let r = self.launch_global_daemons(ctx);
                self.finish_later(step, r, ctx);
            }
            Step::Checkout(path) => {
                let path = path.clone();
                let Some(c) = self.checkout(&path).cloned() else {
                    return self.finish_later(step, Err(format!("no checkout {path}")), ctx);
                };
                let dest = self.checkout_dir(&path);
                if dest.join(".git").exists() {
                    self.logs.note(
                        &name,
                        &format!("{} is already a git checkout", dest.display()),
                    );
                    return self.finish_later(step, Ok(()), ctx);
                }
                if std::fs::read_dir(&dest).is_ok_and(|mut d| d.next().is_some()) {
                    let why = format!(
                        "{} exists and is not a git checkout: move it away to check out {}",
                        dest.display(),
                        c.repo.url()
                    );
                    return self.finish_later(step, Err(why), ctx);
                }
                let tmp = temp_sibling(&dest);
                let script = cs_supervisor::checkout::clone_script(
                    &c,
                    &dest.display().to_string(),
                    &tmp.display().to_string(),
                );
                let env = self.owner_env();
                self.launch_step(step, script, self.cfg.home.clone(), env, false, ctx);
            }
            Step::PostCheckout(path) | Step::Build(path) => {
                let path = path.clone();
                let manifest = match self.manifest(&path) {
                    Ok(m) => m,
                    Err(why) => return self.finish_later(step, Err(why), ctx),
                };
                let hook = match step {
                    Step::Build(_) => manifest.hooks.build.clone(),
                    _ => manifest.hooks.post_checkout.clone(),
                };
                let Some(run) = hook else {
                    self.logs.note(&name, "no hook defined: skipped");
                    return self.finish_later(step, Ok(()), ctx);
                };
                match self.prepare(&path, &manifest, &run, &name) {
                    Ok(l) => self.launch_step(step, l.cmd, l.dir, l.env, false, ctx),
                    Err(why) => self.finish_later(step, Err(why), ctx),
                }
            }
            Step::LaunchDaemons => {
                let r = self.launch_checkout_daemons(ctx);
                self.finish_later(step, r, ctx);
            }
        }
    }

    fn launch_step(
        &mut self,
        step: Step,
        cmd: String,
        dir: PathBuf,
        env: Vec<(String, String)>,
        system: bool,
        ctx: &mut Context<Self>,
    ) {
        let launch = Launch {
            shell: self.cfg.shell.clone(),
            cmd,
            dir,
            env,
            log: step.name(),
            user: if system { None } else { self.cfg.owner.clone() },
        };
        let addr = ctx.address();
        let s = step.clone();
        let exited = Box::new(move |exit: Exit| {
            addr.do_send(StepDone {
                step: s,
                outcome: outcome_of(&exit),
            });
        });
        let started = self.host.launch(launch, self.logs.clone(), exited);
        match started {
            Ok(r) => {
                self.step_proc = Some((step, Some(r)));
                self.record_running();
            }
            Err(exit) => {
                self.step_proc = Some((step.clone(), None));
                ctx.notify(StepDone {
                    step,
                    outcome: outcome_of(&exit),
                });
            }
        }
    }

    fn owner_env(&self) -> Vec<(String, String)> {
        self.cfg.env.clone()
    }

    // -----------------------------------------------------------------------------------------
    // Manifests, env and commands.

    /// The merged manifest of a checkout: its overlays in order, or `.sandbox/manifest.yaml`.
    fn manifest(&self, path: &str) -> Result<Manifest, String> {
        let Some(c) = self.checkout(path) else {
            return Err(format!("no checkout {path}"));
        };
        let dir = self.checkout_dir(path);
        let read = |rel: &str| -> Result<Option<Manifest>, String> {
            let file = dir.join(rel);
            match std::fs::read_to_string(&file) {
                Ok(text) => Manifest::parse(&text)
                    .map(Some)
                    .map_err(|e| format!("invalid manifest {}: {e}", file.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read manifest {}: {e}", file.display())),
            }
        };
        match c.manifest.as_ref().filter(|m| !m.overlays.is_empty()) {
            None => Ok(read(".sandbox/manifest.yaml")?.unwrap_or_default()),
            Some(spec) => {
                let mut parts = Vec::new();
                for (i, o) in spec.overlays.iter().enumerate() {
                    let what = o.name.clone().unwrap_or_else(|| format!("overlay {i}"));
                    if let Some(m) = &o.inline {
                        parts.push(m.clone());
                    } else if let Some(text) = &o.content {
                        parts.push(Manifest::parse(text).map_err(|e| {
                            format!("checkout {path}: manifest {what}: content: {e}")
                        })?);
                    } else if let Some(f) = &o.file {
                        match read(f.as_str())? {
                            Some(m) => parts.push(m),
                            None if o.optional => {}
                            None => {
                                return Err(format!(
                                    "checkout {path}: manifest {what}: {} does not exist",
                                    dir.join(f.as_str()).display()
                                ))
                            }
                        }
                    }
                }
                Ok(Manifest::merged(parts))
            }
        }
    }

    /// A manifest command ready to launch: `dir` under the checkout (it must exist), the
    /// environment with the manifest's env then the command's own applied.
    fn prepare(
        &self,
        checkout: &str,
        manifest: &Manifest,
        run: &Run,
        log: &str,
    ) -> Result<Launch, String> {
        let base = self.checkout_dir(checkout);
        self.prepare_in(
            &base,
            &manifest.env.0,
            run,
            log,
            self.cfg.env.clone(),
            false,
        )
    }

    fn prepare_in(
        &self,
        base: &Path,
        top_env: &[String],
        run: &Run,
        log: &str,
        env: Vec<(String, String)>,
        system: bool,
    ) -> Result<Launch, String> {
        let dir = match &run.dir {
            Some(d) => base.join(d.as_str()),
            None => base.to_path_buf(),
        };
        let mut env: Env = env.into_iter().collect();
        cs_supervisor::env::apply(&mut env, top_env).map_err(|e| format!("{log}: {e}"))?;
        cs_supervisor::env::apply(&mut env, &run.env.0).map_err(|e| format!("{log}: {e}"))?;
        Ok(Launch {
            shell: self.cfg.shell.clone(),
            cmd: run.cmd.clone(),
            dir,
            env: env.into_iter().collect(),
            log: log.to_string(),
            user: if system { None } else { self.cfg.owner.clone() },
        })
    }

    // -----------------------------------------------------------------------------------------
    // File injection.

    fn inject_files(&self) -> Result<(), String> {
        let Some(w) = &self.cfg.workspace else {
            return Ok(());
        };
        let env: Env = std::env::vars()
            .chain(self.cfg.env.iter().cloned())
            .collect();
        let as_root = nix::unistd::geteuid().is_root();
        for f in &w.system.files {
            use cs_supervisor::definition::InjectPath;
            let (path, in_home) = match &f.path {
                InjectPath::Absolute(p) => (self.cfg.root.join(p.trim_start_matches('/')), false),
                InjectPath::Home(rel) => (self.cfg.home.join(rel.as_str()), true),
            };
            let shown = path.display().to_string();
            if path.exists() && !f.overwrite {
                self.logs.note(
                    "inject-files",
                    &format!("{shown} exists: kept (overwrite is false)"),
                );
                continue;
            }
            let content = match (&f.content, &f.template) {
                (Some(c), _) => c.clone(),
                (None, Some(t)) => {
                    let secret = |name: &str| self.secret(name);
                    cs_supervisor::template::render(t, &env, &secret)
                        .map_err(|e| format!("{shown}: template: {e}"))?
                }
                (None, None) => String::new(),
            };
            if let Some(parent) = path.parent() {
                // Directories this creates inside the home belong to the owner, as the
                // file does.
                let missing: Vec<PathBuf> = parent
                    .ancestors()
                    .take_while(|a| !a.exists())
                    .map(Path::to_path_buf)
                    .collect();
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                if let (true, true, Some(u)) = (as_root, in_home, &self.cfg.owner) {
                    for dir in missing.iter().filter(|d| d.starts_with(&self.cfg.home)) {
                        std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid)).map_err(|e| {
                            format!("cannot give {} to {}: {e}", dir.display(), u.name)
                        })?;
                    }
                }
            }
            let mode = f.mode.map(|m| m.0).unwrap_or(0o644);
            let tmp = temp_sibling(&path);
            std::fs::write(&tmp, content.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
            if as_root {
                // The page's defaults: 0:0 outside the home, 1000:1000 inside it (there the
                // owner is uid 1000); here the owner's own ids when --owner names one.
                let (uid, gid) = match (&f.owner, &self.cfg.owner) {
                    (Some(o), _) => (o.uid, o.gid),
                    (None, Some(u)) if in_home => (u.uid, u.gid),
                    (None, None) if in_home => (1000, 1000),
                    (None, _) => (0, 0),
                };
                std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                    .map_err(|e| format!("cannot give {shown} to {uid}:{gid}: {e}"))?;
            }
            std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {shown}: {e}"))?;
            self.logs
                .note("inject-files", &format!("wrote {shown} (mode {mode:04o})"));
        }
        Ok(())
    }

    fn secret(&self, name: &str) -> Option<String> {
        let dir = self.cfg.secrets.as_ref()?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return None;
        }
        std::fs::read_to_string(dir.join(name)).ok()
    }

    // -----------------------------------------------------------------------------------------
    // Daemons and jobs.

    fn global_daemons(&self) -> Result<Vec<GlobalDaemon>, String> {
        let mut out: Vec<GlobalDaemon> = self
            .cfg
            .workspace
            .iter()
            .flat_map(|w| w.system.daemons.iter().cloned())
            .collect();
        let dir = self.cfg.etc.join("daemons");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("json" | "yaml" | "yml")
                )
            })
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            // JSON is YAML: one parser for the three suffixes.
            let d: GlobalDaemon = serde_yaml_ng::from_str(&text)
                .map_err(|e| format!("invalid global daemon {}: {e}", f.display()))?;
            if out.iter().any(|o| o.name == d.name) {
                return Err(format!(
                    "{}: global daemon '{}' is defined twice",
                    f.display(),
                    d.name
                ));
            }
            out.push(d);
        }
        Ok(out)
    }

    fn launch_global_daemons(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        for d in self.global_daemons()? {
            let name = d.name.as_str().to_string();
            let launch = self.prepare_in(
                &self.cfg.home.clone(),
                &[],
                &d.run,
                &name,
                self.cfg.root_env.clone(),
                true,
            )?;
            self.register(
                name,
                ProcKind::GlobalDaemon,
                String::new(),
                launch,
                None,
                !d.disable_on_start,
                ctx,
            );
        }
        Ok(())
    }

    fn launch_checkout_daemons(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        let paths: Vec<String> = self
            .cfg
            .workspace
            .iter()
            .flat_map(|w| &w.checkouts)
            .map(|c| c.path.as_str().to_string())
            .collect();
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        let mut all = Vec::new();
        for path in &paths {
            let m = self.manifest(path)?;
            for (name, d) in &m.daemons {
                all.push((
                    name.as_str().to_string(),
                    path.clone(),
                    ProcKind::Daemon,
                    self.prepare(path, &m, &d.run, name.as_str())?,
                    None,
                    !d.disable_on_start,
                ));
            }
            for (name, j) in &m.jobs {
                all.push((
                    name.as_str().to_string(),
                    path.clone(),
                    ProcKind::Job,
                    self.prepare(path, &m, &j.run, name.as_str())?,
                    Some(j.schedule.0.clone()),
                    !j.disable_on_start,
                ));
            }
        }
        for (name, path, ..) in &all {
            if let Some(p) = self
                .procs
                .get(name)
                .filter(|p| p.kind == ProcKind::GlobalDaemon)
            {
                let _ = p;
                return Err(format!(
                    "checkout {path}: '{name}' is already a global daemon"
                ));
            }
            if let Some(other) = owner.insert(name.clone(), path.clone()) {
                return Err(format!(
                    "'{name}' is defined by the manifests of checkouts {other} and {path}"
                ));
            }
        }
        for (name, path, kind, launch, schedule, enabled) in all {
            let enabled = match kind {
                ProcKind::Job => self.persisted.jobs.get(&name).copied().unwrap_or(enabled),
                _ => enabled,
            };
            self.register(name, kind, path, launch, schedule, enabled, ctx);
        }
        self.arm_job_clock(ctx);
        Ok(())
    }

    /// Adds (or replaces the definition of) a daemon or job, and starts an enabled daemon.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        name: String,
        kind: ProcKind,
        checkout: String,
        launch: Launch,
        schedule: Option<Schedule>,
        enabled: bool,
        ctx: &mut Context<Self>,
    ) {
        let p = self.procs.entry(name.clone()).or_insert_with(|| Proc {
            kind,
            checkout: checkout.clone(),
            launch: launch.clone(),
            schedule: schedule.clone(),
            enabled,
            running: None,
            generation: 0,
            stopping: false,
            start_after_stop: false,
            failures: Failures::default(),
            restarts: 0,
            last_exit: None,
            restart_at: None,
            waiters: Vec::new(),
            leftover: None,
        });
        p.kind = kind;
        p.checkout = checkout;
        p.launch = launch;
        if let Some(s) = &schedule {
            self.logs.note(
                &name,
                &format!(
                    "job on schedule '{}' ({})",
                    s.text(),
                    if p.enabled { "enabled" } else { "disabled" }
                ),
            );
        }
        p.schedule = schedule;
        if kind != ProcKind::Job && enabled && p.running.is_none() {
            p.enabled = true;
            self.start_proc(&name, ctx);
        }
    }

    fn start_proc(&mut self, name: &str, ctx: &mut Context<Self>) {
        let now = self.now_ms();
        let Some(p) = self.procs.get_mut(name) else {
            return;
        };
        if p.running.is_some() || self.shutting_down {
            return;
        }
        if let Some(l) = p.leftover {
            if self.host.group_alive(l) {
                // Its last instance's group is still being stopped: start after it is gone.
                let at = now + LEFTOVER_POLL_MS;
                p.restart_at = Some(at);
                return self.wake_at(at, ctx);
            }
            p.leftover = None;
        }
        p.generation += 1;
        p.restart_at = None;
        let generation = p.generation;
        let addr = ctx.address();
        let n = name.to_string();
        let exited = Box::new(move |exit: Exit| {
            addr.do_send(ProcExited {
                name: n,
                generation,
                exit,
            });
        });
        match self
            .host
            .launch(p.launch.clone(), self.logs.clone(), exited)
        {
            Ok(r) => {
                p.running = Some((r, now));
                self.record_running();
            }
            Err(exit) => {
                ctx.notify(ProcExited {
                    name: name.to_string(),
                    generation,
                    exit,
                });
            }
        }
    }

    fn proc_exited(&mut self, name: String, generation: u64, exit: Exit, ctx: &mut Context<Self>) {
        let now = self.now_ms();
        let Some(p) = self.procs.get_mut(&name) else {
            return;
        };
        if p.generation != generation {
            return;
        }
        let Some((running, started)) = p.running.take() else {
            // It never started (NotStarted): treat as a crash below.
            p.last_exit = Some(exit.to_string());
            return self.after_stop(name, now, 0, ctx);
        };
        p.last_exit = Some(exit.to_string());
        // Whatever the leader left in its group goes with it: no orphans, and never two
        // instances of a daemon.
        if self.host.group_alive(running) {
            actix_rt::spawn(host::stop_group(
                self.host.clone(),
                running,
                Duration::from_millis(proc::STOP_GRACE_MS),
            ));
            p.leftover = Some(running);
        }
        self.record_running();
        self.after_stop(name, now, now.saturating_sub(started), ctx);
    }

    fn after_stop(&mut self, name: String, now: u64, ran_ms: u64, ctx: &mut Context<Self>) {
        let Some(p) = self.procs.get_mut(&name) else {
            return;
        };
        for w in p.waiters.drain(..) {
            let _ = w.send(());
        }
        if p.stopping {
            p.stopping = false;
            if std::mem::take(&mut p.start_after_stop) {
                p.failures.reset();
                self.start_proc(&name, ctx);
            }
            return;
        }
        if p.kind == ProcKind::Job || !p.enabled || self.shutting_down {
            return;
        }
        let delay = p.failures.stopped(&Backoff::DAEMON, ran_ms);
        let at = now + delay;
        p.restart_at = Some(at);
        let crashing = p.failures.crashing(&Backoff::DAEMON);
        self.logs.note(
            &name,
            &format!(
                "restarting in {:.1} s ({} quick exits in a row{})",
                delay as f64 / 1000.0,
                p.failures.in_row(),
                if crashing { ": crashing" } else { "" }
            ),
        );
        self.wake_at(at, ctx);
    }

    /// Stops a running program; `then_start` starts it again after.
    fn stop_proc(&mut self, name: &str, then_start: bool) -> Option<oneshot::Receiver<()>> {
        let p = self.procs.get_mut(name)?;
        let (running, _) = p.running?;
        p.stopping = true;
        p.start_after_stop |= then_start;
        let (tx, rx) = oneshot::channel();
        if p.waiters.len() < WAITERS_MAX {
            p.waiters.push(tx);
        }
        actix_rt::spawn(host::stop_group(
            self.host.clone(),
            running,
            Duration::from_millis(proc::STOP_GRACE_MS),
        ));
        Some(rx)
    }

    fn restart_daemons(&mut self, ctx: &mut Context<Self>) {
        let names: Vec<String> = self
            .procs
            .iter()
            .filter(|(_, p)| p.kind != ProcKind::Job && p.enabled)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            if self.stop_proc(&n, true).is_none() {
                if let Some(p) = self.procs.get_mut(&n) {
                    p.failures.reset();
                }
                self.start_proc(&n, ctx);
            }
        }
    }

    fn arm_job_clock(&mut self, ctx: &mut Context<Self>) {
        if !self.procs.values().any(|p| p.kind == ProcKind::Job) || self.timers.contains(&u64::MAX)
        {
            return;
        }
        self.timers.insert(u64::MAX);
        let until_next_minute = 60_000 - self.host.unix_ms() % 60_000;
        ctx.run_later(Duration::from_millis(until_next_minute), |act, ctx| {
            act.timers.remove(&u64::MAX);
            act.jobs_minute(ctx);
            act.arm_job_clock(ctx);
        });
    }

    fn jobs_minute(&mut self, ctx: &mut Context<Self>) {
        let Some(now) = self.host.local_minute((self.host.unix_ms() / 1000) as i64) else {
            return;
        };
        let views: Vec<(String, Schedule, bool, bool)> = self
            .procs
            .iter()
            .filter_map(|(n, p)| {
                Some((
                    n.clone(),
                    p.schedule.clone()?,
                    p.enabled,
                    p.running.is_some(),
                ))
            })
            .collect();
        let jobs: Vec<JobView<'_>> = views
            .iter()
            .map(|(n, s, e, r)| JobView {
                name: n,
                schedule: s,
                enabled: *e,
                running: *r,
            })
            .collect();
        for due in self.clock.due(&jobs, now) {
            match due {
                Due::Run(n) => self.start_proc(&n, ctx),
                Due::Skipped(n) => self
                    .logs
                    .note(&n, "due, but the last run is still going: skipped"),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Views.

    fn ps(&self) -> Vec<ProcView> {
        let now_s = (self.host.unix_ms() / 1000) as i64;
        let now_min = self.host.local_minute(now_s);
        self.procs
            .iter()
            .map(|(name, p)| {
                let state = match (&p.running, p.kind) {
                    (Some(_), _) if p.stopping => "stopping",
                    (Some(_), _) => "running",
                    (None, ProcKind::Job) if !p.enabled => "disabled",
                    (None, ProcKind::Job) => "idle",
                    (None, _) if !p.enabled => "stopped",
                    (None, _) if p.failures.crashing(&Backoff::DAEMON) => "crashing",
                    (None, _) if p.restart_at.is_some() => "backoff",
                    (None, _) => "stopped",
                };
                let next_run_unix = match (&p.schedule, &now_min) {
                    (Some(s), Some(m)) if p.enabled => {
                        s.next_after(*m).map(|next| minute_unix(&*self.host, &next))
                    }
                    _ => None,
                };
                ProcView {
                    name: name.clone(),
                    kind: p.kind,
                    state: state.to_string(),
                    pid: p.running.map(|(r, _)| r.pid),
                    restarts: p.restarts,
                    last_exit: p.last_exit.clone(),
                    next_run_unix,
                    checkout: p.checkout.clone(),
                }
            })
            .collect()
    }

    fn status(&self) -> StatusView {
        let now = self.now_ms();
        let crashing: Vec<String> = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.kind != ProcKind::Job
                    && p.enabled
                    && p.running.is_none()
                    && p.failures.crashing(&Backoff::DAEMON)
            })
            .map(|(n, _)| n.clone())
            .collect();
        let mut v = StatusView {
            state: String::new(),
            step: None,
            step_ms: None,
            why: None,
            failures: 0,
            retry_in_ms: None,
            log_tail: Vec::new(),
            crashing: crashing.clone(),
            steps_done: self.steps_done.clone(),
            mode: if self.persisted.auto {
                "AUTO"
            } else {
                "MANUAL"
            }
            .into(),
            running: self
                .seq
                .running()
                .map(|(step, since)| (step.name(), now.saturating_sub(since))),
        };
        match self.seq.state() {
            State::Progressing { step, since_ms } => {
                v.state = "Progressing".into();
                v.step = Some(step.name());
                v.step_ms = Some(now.saturating_sub(since_ms));
            }
            State::Problematic {
                step,
                why,
                failures,
                retry_at_ms,
            } => {
                v.state = "Problematic".into();
                v.log_tail = self.logs.tail(&step.name(), STATUS_TAIL_LINES);
                v.step_ms = self.last_ran.get(&step.name()).copied();
                v.step = Some(step.name());
                v.why = Some(why);
                v.failures = failures;
                v.retry_in_ms = retry_at_ms.map(|t| t.saturating_sub(now));
            }
            State::Done => v.state = "Ready".into(),
        }
        if !crashing.is_empty() && v.state != "Problematic" {
            v.state = "Problematic".into();
            v.why = Some(format!("daemons keep crashing: {}", crashing.join(", ")));
        }
        if let Some(c) = &self.chore {
            if v.state == "Ready" {
                v.state = "Progressing".into();
                v.step = c.left.first().map(Step::name);
            }
        }
        if let (Some(why), "Ready") = (&self.auto_failed, v.state.as_str()) {
            v.state = "Problematic".into();
            v.why = Some(why.clone());
        }
        v
    }

    /// The answer to a start: its pid, or why it is not running.
    fn started_reply(&self, name: &str) -> SuperviseReply {
        let Some(p) = self.procs.get(name) else {
            return self.unknown(name);
        };
        match (p.running, p.leftover) {
            (Some((r, _)), _) => SuperviseReply::Done(format!("started {name} (pid {})", r.pid)),
            (None, Some(_)) => SuperviseReply::Error(format!(
                "{name} did not start: what its last instance left is still running"
            )),
            (None, None) => SuperviseReply::Error(format!(
                "{name} did not start: {}",
                p.last_exit.clone().unwrap_or_default()
            )),
        }
    }

    fn unknown(&self, name: &str) -> SuperviseReply {
        let list = |kind: ProcKind| {
            let v: Vec<&str> = self
                .procs
                .iter()
                .filter(|(_, p)| (p.kind == ProcKind::Job) == (kind == ProcKind::Job))
                .map(|(n, _)| n.as_str())
                .collect();
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        SuperviseReply::Error(format!(
            "no daemon or job named '{name}' (daemons: {}; jobs: {})",
            list(ProcKind::Daemon),
            list(ProcKind::Job)
        ))
    }

    /// Writes down the process groups running now, so an agent that crashed can end them
    /// when it starts again (see [`kill_leftovers`]).
    fn record_running(&self) {
        let mut running: BTreeMap<String, (u32, u64)> = BTreeMap::new();
        let groups = self
            .procs
            .iter()
            .filter_map(|(n, p)| Some((n.clone(), p.running?.0)))
            .chain(
                self.step_proc
                    .iter()
                    .filter_map(|(s, r)| Some((s.name(), (*r)?))),
            );
        for (name, r) in groups {
            if let Some(t) = self.host.start_time(r.pid) {
                running.insert(name, (r.pid, t));
            }
        }
        let file = self.cfg.state.join("running.json");
        let tmp = file.with_extension("json.tmp");
        let written = serde_json::to_vec(&running)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the running processes");
        }
    }

    fn save(&self) {
        if let Err(e) = save_persisted(&self.cfg.state, &self.persisted) {
            tracing::error!(error = %e, "cannot save the supervisor's state");
        }
    }

    // -----------------------------------------------------------------------------------------
    // `cs build`.

    fn next_chore(&mut self, ctx: &mut Context<Self>) {
        loop {
            let Some(step) = self.chore.as_ref().map(|c| c.left.first().cloned()) else {
                return;
            };
            let Some(step) = step else {
                return self.chore_done(ctx);
            };
            let name = step.name();
            let prepared = match &step {
                Step::Checkout(path) => {
                    let branch = self
                        .chore
                        .as_ref()
                        .and_then(|c| c.branches.get(path).cloned())
                        .unwrap_or_default();
                    match self.checkout(path) {
                        Some(c) => {
                            let dest = self.checkout_dir(path).display().to_string();
                            let script = cs_supervisor::checkout::update_script(c, &dest, &branch);
                            Ok(Some(Launch {
                                shell: self.cfg.shell.clone(),
                                cmd: script,
                                dir: self.cfg.home.clone(),
                                env: self.owner_env(),
                                log: name.clone(),
                                user: self.cfg.owner.clone(),
                            }))
                        }
                        None => Err(format!("no checkout {path}")),
                    }
                }
                Step::PostCheckout(path) | Step::Build(path) => self.manifest(path).and_then(|m| {
                    let hook = match step {
                        Step::Build(_) => &m.hooks.build,
                        _ => &m.hooks.post_checkout,
                    };
                    match hook {
                        Some(run) => self.prepare(path, &m, run, &name).map(Some),
                        None => Ok(None),
                    }
                }),
                _ => Ok(None),
            };
            match prepared {
                Ok(Some(l)) => {
                    let addr = ctx.address();
                    let s = step.clone();
                    let exited =
                        Box::new(move |exit: Exit| addr.do_send(ChoreDone { step: s, exit }));
                    let r = self.host.launch(l, self.logs.clone(), exited);
                    if let Err(exit) = r {
                        ctx.notify(ChoreDone { step, exit });
                    }
                    return;
                }
                Ok(None) => self.logs.note(&name, "no hook defined: skipped"),
                Err(why) => {
                    self.logs.note(&name, &why);
                    if let Some(c) = self.chore.as_mut() {
                        c.failed.push(format!("{name}: {why}"));
                    }
                }
            }
            if let Some(c) = self.chore.as_mut() {
                c.left.remove(0);
            }
        }
    }

    fn chore_done(&mut self, ctx: &mut Context<Self>) {
        let Some(c) = self.chore.take() else {
            return;
        };
        let failed = (!c.failed.is_empty()).then(|| c.failed.join(", "));
        if c.relaunch {
            self.auto_failed = failed
                .clone()
                .map(|f| format!("Auto Mode update failed: {f}"));
            self.restart_daemons(ctx);
            self.arm_auto(ctx);
        }
        if let Some(reply) = c.reply {
            let _ = reply.send(match failed {
                None => SuperviseReply::Done("build hooks finished".into()),
                Some(f) => {
                    SuperviseReply::Error(format!("build failed: {f} (see cs logs build:PATH)"))
                }
            });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Auto Mode.

    /// Polls the checkouts' remote branches after the poll interval, if in Auto Mode.
    fn arm_auto(&mut self, ctx: &mut Context<Self>) {
        if !self.persisted.auto || self.auto_armed || self.shutting_down {
            return;
        }
        self.auto_armed = true;
        ctx.run_later(Duration::from_millis(self.cfg.auto_poll_ms), |act, ctx| {
            act.auto_armed = false;
            act.auto_poll(ctx);
        });
    }

    fn auto_poll(&mut self, ctx: &mut Context<Self>) {
        if !self.persisted.auto || self.shutting_down {
            return;
        }
        if self.chore.is_some() || self.seq.state() != State::Done {
            return self.arm_auto(ctx);
        }
        let checkouts: Vec<(String, PathBuf, String)> = self
            .cfg
            .workspace
            .iter()
            .flat_map(|w| &w.checkouts)
            .map(|c| {
                let p = c.path.as_str().to_string();
                let dir = self.checkout_dir(&p);
                (p, dir, c.repo.url())
            })
            .collect();
        let env = self.owner_env();
        let user = self.cfg.owner.clone();
        let addr = ctx.address();
        actix_rt::spawn(async move {
            let mut moved = Vec::new();
            for (path, dir, url) in checkouts {
                let git =
                    |args: Vec<String>| git_output(dir.clone(), args, env.clone(), user.clone());
                let Some(branch) =
                    git(vec!["symbolic-ref".into(), "--short".into(), "HEAD".into()]).await
                else {
                    // A tag or a commit: nothing to follow.
                    continue;
                };
                let Some(local) = git(vec!["rev-parse".into(), "HEAD".into()]).await else {
                    continue;
                };
                let remote = git(vec![
                    "ls-remote".into(),
                    "--".into(),
                    url,
                    format!("refs/heads/{branch}"),
                ])
                .await;
                let Some(remote) =
                    remote.and_then(|r| r.split_whitespace().next().map(str::to_string))
                else {
                    continue;
                };
                if remote != local {
                    moved.push((path, branch, remote));
                }
            }
            addr.do_send(AutoPolled { moved });
        });
    }
}

/// Runs git in `dir` (as `user`), returning its trimmed stdout when it succeeds.
async fn git_output(
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<User>,
) -> Option<String> {
    let mut cmd = tokio::process::Command::new("git");
    cmd.args(&args)
        .current_dir(&dir)
        .env_clear()
        .envs(env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(u) = user {
        // SAFETY: the closure makes only async-signal-safe calls (see `switch_fn`).
        unsafe {
            cmd.pre_exec(u.switch_fn());
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .ok()?
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Ends the process groups an agent that stopped abruptly left running (its daemons, its
/// running step), so a daemon never runs twice: SIGTERM, up to a second, then SIGKILL. A
/// group is ended only if its leader is the very process recorded (same pid, same start
/// time).
async fn kill_leftovers(host: Rc<dyn Host>, state: PathBuf) {
    let file = state.join("running.json");
    let Ok(bytes) = std::fs::read(&file) else {
        return;
    };
    if cs_protocol::canary::active(cs_protocol::Canary::LeftoversKept) {
        return;
    }
    let running: BTreeMap<String, (u32, u64)> = serde_json::from_slice(&bytes).unwrap_or_default();
    let alive: Vec<(String, Running)> = running
        .into_iter()
        .filter(|(_, (pid, t))| host.start_time(*pid) == Some(*t))
        .map(|(n, (pid, _))| (n, Running { pid }))
        .collect();
    let stops = alive.iter().map(|(name, r)| {
        tracing::warn!(%name, pid = r.pid, "ending a process group left by an agent that stopped abruptly");
        host::stop_group(host.clone(), *r, Duration::from_secs(1))
    });
    futures_util::future::join_all(stops).await;
    let _ = std::fs::remove_file(&file);
}

fn outcome_of(exit: &Exit) -> Outcome {
    if exit.ok() {
        Outcome::Ok
    } else {
        Outcome::Failed {
            why: exit.to_string(),
        }
    }
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `dir/.NAME.cs-tmp`: a sibling to build something in and rename into place.
fn temp_sibling(p: &Path) -> PathBuf {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    p.with_file_name(format!(".{name}.cs-tmp"))
}

fn state_file(state: &Path) -> PathBuf {
    state.join("supervisor.json")
}

fn load_persisted(state: &Path) -> Persisted {
    match std::fs::read(state_file(state)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::error!(error = %e, "supervisor state unreadable: starting afresh");
            Persisted::default()
        }),
        Err(_) => Persisted::default(),
    }
}

fn save_persisted(state: &Path, p: &Persisted) -> std::io::Result<()> {
    use std::io::Write;
    let file = state_file(state);
    let tmp = file.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &file)?;
    if let Ok(d) = std::fs::File::open(state) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Messages.

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        // Nothing starts before what a crashed agent left running is gone.
        let leftovers = kill_leftovers(self.host.clone(), self.cfg.state.clone());
        ctx.wait(actix::fut::wrap_future::<_, Self>(leftovers).map(|(), act, ctx| act.begin(ctx)));
    }
}

impl Supervisor {
    fn begin(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ms();
        tracing::info!(
            steps = ?self.seq.steps().iter().map(Step::name).collect::<Vec<_>>(),
            "start sequence"
        );
        let effects = self.seq.start(now);
        self.apply(effects, ctx);
        self.arm_auto(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct StepDone {
    step: Step,
    outcome: Outcome,
}

impl Handler<StepDone> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: StepDone, ctx: &mut Context<Self>) {
        self.step_finished(m.step, m.outcome, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ProcExited {
    name: String,
    generation: u64,
    exit: Exit,
}

impl Handler<ProcExited> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: ProcExited, ctx: &mut Context<Self>) {
        self.proc_exited(m.name, m.generation, m.exit, ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ChoreDone {
    step: Step,
    exit: Exit,
}

impl Handler<ChoreDone> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: ChoreDone, ctx: &mut Context<Self>) {
        if let Some(c) = self.chore.as_mut() {
            if c.left.first() == Some(&m.step) {
                c.left.remove(0);
                if !m.exit.ok() {
                    c.failed.push(format!("{}: {}", m.step.name(), m.exit));
                    if let Step::Checkout(p) = &m.step {
                        // The hooks of a checkout that did not update do not run.
                        c.left.retain(
                            |s| !matches!(s, Step::PostCheckout(q) | Step::Build(q) if q == p),
                        );
                    }
                }
            }
        }
        self.next_chore(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct AutoPolled {
    /// Checkouts whose branch moved: path, branch, the remote's commit.
    moved: Vec<(String, String, String)>,
}

impl Handler<AutoPolled> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: AutoPolled, ctx: &mut Context<Self>) {
        if m.moved.is_empty() || self.chore.is_some() || !self.persisted.auto {
            return self.arm_auto(ctx);
        }
        let mut left = Vec::new();
        let mut branches = BTreeMap::new();
        for (path, branch, commit) in &m.moved {
            tracing::info!(checkout = %path, %branch, %commit, "Auto Mode: the branch moved");
            self.logs.note(
                &Step::Checkout(path.clone()).name(),
                &format!("Auto Mode: {branch} is now {commit} on the remote: updating"),
            );
            left.push(Step::Checkout(path.clone()));
            branches.insert(path.clone(), branch.clone());
        }
        for (path, ..) in &m.moved {
            left.push(Step::PostCheckout(path.clone()));
        }
        for (path, ..) in &m.moved {
            left.push(Step::Build(path.clone()));
        }
        self.chore = Some(Chore {
            left,
            failed: Vec::new(),
            reply: None,
            branches,
            relaunch: true,
        });
        self.next_chore(ctx);
    }
}

/// A request from `cs`.
#[derive(Message)]
#[rtype(result = "SuperviseReply")]
pub struct Ask(pub SuperviseRequest);

impl Handler<Ask> for Supervisor {
    type Result = ResponseFuture<SuperviseReply>;

    fn handle(&mut self, Ask(req): Ask, ctx: &mut Context<Self>) -> Self::Result {
        let now_reply =
            |r: SuperviseReply| -> ResponseFuture<SuperviseReply> { Box::pin(async move { r }) };
        match req {
            SuperviseRequest::Ps => now_reply(SuperviseReply::Ps(self.ps())),
            SuperviseRequest::Status => now_reply(SuperviseReply::Status(Box::new(self.status()))),
            SuperviseRequest::Mode(auto) => {
                let was = self.persisted.auto;
                self.persisted.auto = auto;
                self.save();
                self.cfg.auto_flag.store(auto, Ordering::Relaxed);
                let mode = if auto { "AUTO" } else { "MANUAL" };
                if auto && !was {
                    self.auto_failed = None;
                    // Poll now, then every interval.
                    self.auto_poll(ctx);
                } else if !auto {
                    self.auto_failed = None;
                }
                now_reply(SuperviseReply::Done(format!(
                    "{mode}{}",
                    if auto == was { " (unchanged)" } else { "" }
                )))
            }
            SuperviseRequest::Retry => {
                let now = self.now_ms();
                let effects = self.seq.retry(now);
                if effects.is_empty() {
                    return now_reply(SuperviseReply::Error(
                        "nothing to retry: no step of the start sequence has failed".into(),
                    ));
                }
                let what = match &effects[0] {
                    Effect::Run(s) => s.name(),
                    _ => String::new(),
                };
                self.apply(effects, ctx);
                now_reply(SuperviseReply::Done(format!("retrying {what}")))
            }
            SuperviseRequest::Start(name) => {
                let Some(p) = self.procs.get_mut(&name) else {
                    return now_reply(self.unknown(&name));
                };
                if let Some((r, _)) = p.running {
                    return now_reply(SuperviseReply::Done(format!(
                        "{name} is already running (pid {})",
                        r.pid
                    )));
                }
                if p.kind != ProcKind::Job {
                    p.enabled = true;
                    p.failures.reset();
                }
                self.start_proc(&name, ctx);
                let p = &self.procs[&name];
                match (p.running, p.leftover) {
                    (None, Some(left)) => {
                        // Its last instance's group is still going: answer once this one runs.
                        let (host, addr) = (self.host.clone(), ctx.address());
                        Box::pin(async move {
                            let limit = Duration::from_millis(proc::STOP_GRACE_MS + 2_000);
                            host::wait_gone(&*host, left, limit).await;
                            addr.send(StartNow(name)).await.unwrap_or_else(|_| {
                                SuperviseReply::Error("the supervisor stopped".into())
                            })
                        })
                    }
                    _ => now_reply(self.started_reply(&name)),
                }
            }
            SuperviseRequest::Stop(name) => {
                let Some(p) = self.procs.get_mut(&name) else {
                    return now_reply(self.unknown(&name));
                };
                if p.kind != ProcKind::Job {
                    p.enabled = false;
                }
                p.restart_at = None;
                let group = p.running.map(|(r, _)| r);
                match (self.stop_proc(&name, false), group) {
                    (Some(rx), Some(group)) => {
                        let host = self.host.clone();
                        Box::pin(async move {
                            let _ = rx.await;
                            // Answered when the whole group is gone, not only its leader.
                            host::wait_gone(&*host, group, Duration::from_secs(2)).await;
                            SuperviseReply::Done(format!("stopped {name}"))
                        })
                    }
                    _ => now_reply(SuperviseReply::Done(format!("{name} is not running"))),
                }
            }
            SuperviseRequest::Restart(name) => {
                let Some(p) = self.procs.get_mut(&name) else {
                    return now_reply(self.unknown(&name));
                };
                if p.kind == ProcKind::Job {
                    return now_reply(SuperviseReply::Error(format!(
                        "{name} is a job: `cs start {name}` runs it now"
                    )));
                }
                p.enabled = true;
                p.failures.reset();
                match self.stop_proc(&name, true) {
                    None => {
                        self.start_proc(&name, ctx);
                        now_reply(SuperviseReply::Done(format!("started {name}")))
                    }
                    Some(rx) => Box::pin(async move {
                        let _ = rx.await;
                        SuperviseReply::Done(format!("restarted {name}"))
                    }),
                }
            }
            SuperviseRequest::RestartAll => {
                let n = self
                    .procs
                    .values()
                    .filter(|p| p.kind != ProcKind::Job && p.enabled)
                    .count();
                self.restart_daemons(ctx);
                now_reply(SuperviseReply::Done(format!("restarting {n} daemons")))
            }
            SuperviseRequest::JobEnabled(name, on) => match self.procs.get_mut(&name) {
                Some(p) if p.kind == ProcKind::Job => {
                    p.enabled = on;
                    self.persisted.jobs.insert(name.clone(), on);
                    self.save();
                    now_reply(SuperviseReply::Done(format!(
                        "job {name} {}",
                        if on { "enabled" } else { "disabled" }
                    )))
                }
                Some(_) => now_reply(SuperviseReply::Error(format!(
                    "{name} is a daemon, not a job: use cs start|stop {name}"
                ))),
                None => now_reply(self.unknown(&name)),
            },
            SuperviseRequest::Build => {
                if let Some(c) = &self.chore {
                    return now_reply(SuperviseReply::Error(format!(
                        "{} is running: build when it has finished",
                        c.left.first().map(Step::name).unwrap_or_default()
                    )));
                }
                if let State::Progressing { step, .. } = self.seq.state() {
                    return now_reply(SuperviseReply::Error(format!(
                        "the start sequence is still running ({}): build when it is Ready",
                        step.name()
                    )));
                }
                let left: Vec<Step> = self
                    .cfg
                    .workspace
                    .iter()
                    .flat_map(|w| &w.checkouts)
                    .map(|c| Step::Build(c.path.as_str().to_string()))
                    .collect();
                let (tx, rx) = oneshot::channel();
                self.chore = Some(Chore {
                    left,
                    failed: Vec::new(),
                    reply: Some(tx),
                    branches: BTreeMap::new(),
                    relaunch: false,
                });
                self.next_chore(ctx);
                Box::pin(async move {
                    rx.await.unwrap_or(SuperviseReply::Error(
                        "the agent stopped before the build finished".into(),
                    ))
                })
            }
        }
    }
}

/// Start a daemon whose last instance's group is gone now, and say how it went.
#[derive(Message)]
#[rtype(result = "SuperviseReply")]
struct StartNow(String);

impl Handler<StartNow> for Supervisor {
    type Result = MessageResult<StartNow>;
    fn handle(&mut self, StartNow(name): StartNow, ctx: &mut Context<Self>) -> Self::Result {
        self.start_proc(&name, ctx);
        MessageResult(self.started_reply(&name))
    }
}

/// The agent is shutting down: stop every daemon, job and running step (SIGTERM, a grace,
/// SIGKILL). Answered when they are gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let mut groups: Vec<Running> = self
            .procs
            .values_mut()
            .filter_map(|p| {
                p.stopping = true;
                p.running.map(|(r, _)| r)
            })
            .collect();
        if let Some((_, Some(r))) = &self.step_proc {
            groups.push(*r);
        }
        let host = self.host.clone();
        Box::pin(async move {
            let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
            futures_util::future::join_all(
                groups
                    .into_iter()
                    .map(|g| host::stop_group(host.clone(), g, grace)),
            )
            .await;
        })
    }
}
