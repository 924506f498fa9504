//! Scripted processes for the supervisor: a [`Host`] whose programs are tiny scripts with a
//! schedule in virtual time, kept in a [`Table`] that outlives the agent node, as real
//! processes outlive a crashed agent.
//!
//! Scripts (a hook's or daemon's `cmd`, a setup file's content, or a checkout's `sim:` URL):
//! - `ok MS`: runs MS ms, exits 0.
//! - `fail MS CODE`: runs MS ms, exits CODE.
//! - `failfirst N MS CODE`: its first N runs (by log name, across agent restarts) fail like
//!   `fail`, later ones succeed like `ok`.
//! - `crash MS CODE`: a daemon that runs MS ms, then exits CODE.
//! - `hang`, `serve`: never ends by itself.
//! - `stubborn`: never ends and ignores SIGTERM.
//! - `print N MS`: writes `line K` every MS ms, N lines, then serves.
//!
//! A checkout's script is its repository URL, `sim:SCRIPT` with `-` for spaces; when it
//! succeeds, the destination gets a `.git` directory, as a clone leaves. Every signal but an
//! ignored SIGTERM ends a process. When the agent node crashes, the tasks that report exits and
//! write output die with it, but the processes go on in the table (their output is lost, as a
//! broken pipe's) until their schedule ends them or someone signals them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use cs_agent::logs::LogHub;
use cs_agent::supervise::host::{Exited, Host};
use cs_agent::supervise::proc::{Exit, Launch, Running};
use cs_supervisor::cron::Minute;

/// Virtual Unix time at the start of every run (2027-01-15 08:00 UTC, a Friday).
pub const EPOCH_MS: u64 = 1_800_000_000_000;

/// What one process does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    Ok(u64),
    Fail(u64, i32),
    FailFirst(u32, u64, i32),
    Crash(u64, i32),
    Hang,
    Stubborn,
    Print(u32, u64),
}

impl Script {
    pub fn parse(text: &str) -> Result<Self, String> {
        let w: Vec<&str> = text.split_whitespace().collect();
        let n = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("bad number '{s}' in '{text}'"))
        };
        Ok(match w.as_slice() {
            ["ok", ms] => Self::Ok(n(ms)?),
            ["fail", ms, c] => Self::Fail(n(ms)?, n(c)? as i32),
            ["failfirst", k, ms, c] => Self::FailFirst(n(k)? as u32, n(ms)?, n(c)? as i32),
            ["crash", ms, c] => Self::Crash(n(ms)?, n(c)? as i32),
            ["hang"] | ["serve"] => Self::Hang,
            ["stubborn"] => Self::Stubborn,
            ["print", k, ms] => Self::Print(n(k)? as u32, n(ms)?),
            _ => return Err(format!("unknown script '{text}'")),
        })
    }
}

/// One process, alive or not.
#[derive(Debug, Clone)]
pub struct Proc {
    pub log: String,
    pub started_ms: u64,
    /// When its schedule ends it, and how.
    pub ends: Option<(u64, Exit)>,
    /// Ended by a signal at this time.
    pub killed: Option<(u64, i32)>,
    pub ignores_term: bool,
    /// The agent incarnation that started it.
    pub incarnation: u64,
}

impl Proc {
    pub fn alive_at(&self, now: u64) -> bool {
        self.killed.is_none_or(|(t, _)| t > now) && self.ends.as_ref().is_none_or(|(t, _)| *t > now)
    }

    /// How it ended, if it has by `now`.
    pub fn exit_at(&self, now: u64) -> Option<Exit> {
        match (&self.killed, &self.ends) {
            (Some((k, s)), Some((e, x))) => {
                if k <= e {
                    (*k <= now).then_some(Exit::Signal(*s))
                } else {
                    (*e <= now).then(|| x.clone())
                }
            }
            (Some((k, s)), None) => (*k <= now).then_some(Exit::Signal(*s)),
            (None, Some((e, x))) => (*e <= now).then(|| x.clone()),
            (None, None) => None,
        }
    }
}

/// A started or ended process, in virtual time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start {
        pid: u32,
    },
    /// Its exit was reported to the agent (`ok` for exit 0).
    Reported {
        pid: u32,
        ok: bool,
    },
}

/// Every process of a run, and what happened to them.
#[derive(Debug, Default)]
pub struct Table {
    next_pid: u32,
    pub procs: BTreeMap<u32, Proc>,
    /// (virtual ms, incarnation, log name, event), in order.
    pub events: Vec<(u64, u64, String, Event)>,
    /// Runs started per log name (for `failfirst`).
    runs: BTreeMap<String, u32>,
    /// The agent incarnation running now.
    pub incarnation: u64,
    /// Invariant violations seen as they happened.
    pub violations: Vec<String>,
    /// Processes a restarted agent ended (left by an incarnation before it).
    pub leftovers_ended: u32,
    /// When each crashed incarnation crashed, in virtual ms.
    pub crashes: BTreeMap<u64, u64>,
}

/// Virtual ms since the run began (inside a node).
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

/// The scripted host of one agent incarnation.
#[derive(Debug, Clone)]
pub struct ScriptHost {
    pub table: Rc<RefCell<Table>>,
    pub daemons: Vec<String>,
}

impl ScriptHost {
    fn script_of(&self, l: &Launch) -> Result<(Script, Option<PathBuf>), String> {
        if let Some(first) = l
            .cmd
            .lines()
            .next()
            .and_then(|f| f.strip_prefix("# clone "))
        {
            // `# clone URL (SPEC) into DEST`
            let url = first.split_whitespace().next().unwrap_or_default();
            let dest = first.rsplit(" into ").next().unwrap_or_default();
            let script = url
                .strip_prefix("sim:")
                .ok_or_else(|| format!("not a sim URL: {url}"))?;
            return Ok((
                Script::parse(&script.replace('-', " "))?,
                Some(PathBuf::from(dest)),
            ));
        }
        let path = PathBuf::from(l.cmd.trim().trim_matches('\''));
        if path.is_absolute() {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let body = text
                .lines()
                .filter(|l| !l.starts_with("#!"))
                .collect::<Vec<_>>()
                .join(" ");
            return Ok((Script::parse(body.trim())?, None));
        }
        Ok((Script::parse(&l.cmd)?, None))
    }
}

impl Host for ScriptHost {
    fn launch(&self, l: Launch, logs: LogHub, exited: Exited) -> Result<Running, Exit> {
        let (script, clone_dest) = match self.script_of(&l) {
            Ok(s) => s,
            Err(e) => return Err(Exit::NotStarted(e)),
        };
        let now = now_ms();
        let mut t = self.table.borrow_mut();
        t.next_pid += 1;
        let pid = 100 + t.next_pid;
        let runs = {
            let r = t.runs.entry(l.log.clone()).or_insert(0);
            *r += 1;
            *r
        };
        let (ends, ignores_term) = match &script {
            Script::Ok(ms) => (Some((now + ms, Exit::Code(0))), false),
            Script::Fail(ms, c) => (Some((now + ms, Exit::Code(*c))), false),
            Script::FailFirst(k, ms, c) => {
                let code = if runs <= *k { *c } else { 0 };
                (Some((now + ms, Exit::Code(code))), false)
            }
            Script::Crash(ms, c) => (Some((now + ms, Exit::Code(*c))), false),
            Script::Hang | Script::Print(..) => (None, false),
            Script::Stubborn => (None, true),
        };
        if self.daemons.contains(&l.log) {
            let twin = t
                .procs
                .iter()
                .find(|(_, p)| p.log == l.log && p.alive_at(now))
                .map(|(pid, p)| (*pid, p.incarnation));
            if let Some((other, inc)) = twin {
                let v = format!(
                    "invariant: two instances of daemon {} at {now} ms (pid {other} of incarnation {inc} still runs)",
                    l.log
                );
                t.violations.push(v);
            }
        }
        let incarnation = t.incarnation;
        t.procs.insert(
            pid,
            Proc {
                log: l.log.clone(),
                started_ms: now,
                ends,
                killed: None,
                ignores_term,
                incarnation,
            },
        );
        t.events
            .push((now, incarnation, l.log.clone(), Event::Start { pid }));
        drop(t);
        logs.note(
            &l.log,
            &format!("started pid {pid}: {}", l.cmd.lines().next().unwrap_or("")),
        );
        let table = self.table.clone();
        tokio::task::spawn_local(async move {
            let mut printed = 0u32;
            loop {
                let now = now_ms();
                let exit = table.borrow().procs.get(&pid).and_then(|p| p.exit_at(now));
                if let Some(exit) = exit {
                    if let (Exit::Code(0), Some(dest)) = (&exit, &clone_dest) {
                        let _ = std::fs::create_dir_all(dest.join(".git"));
                    }
                    logs.finish(&l.log);
                    logs.note(&l.log, &format!("pid {pid} ended: {exit}"));
                    let mut t = table.borrow_mut();
                    let inc = t.incarnation;
                    t.events.push((
                        now,
                        inc,
                        l.log.clone(),
                        Event::Reported { pid, ok: exit.ok() },
                    ));
                    drop(t);
                    exited(exit);
                    return;
                }
                let step = match &script {
                    Script::Print(n, ms) if printed < *n => {
                        printed += 1;
                        logs.write(&l.log, format!("line {printed}\n").as_bytes());
                        *ms
                    }
                    _ => 5,
                };
                tokio::time::sleep(Duration::from_millis(step.max(1))).await;
            }
        });
        Ok(Running { pid })
    }

    fn signal(&self, r: Running, sig: i32) {
        let now = now_ms();
        let mut t = self.table.borrow_mut();
        let current = t.incarnation;
        let Some(p) = t.procs.get_mut(&r.pid) else {
            return;
        };
        if !p.alive_at(now) || (sig == libc::SIGTERM && p.ignores_term) {
            return;
        }
        p.killed = Some((now, sig));
        let left = p.incarnation < current;
        if left {
            t.leftovers_ended += 1;
        }
    }

    fn group_alive(&self, r: Running) -> bool {
        let now = now_ms();
        self.table
            .borrow()
            .procs
            .get(&r.pid)
            .is_some_and(|p| p.alive_at(now))
    }

    fn start_time(&self, pid: u32) -> Option<u64> {
        let now = now_ms();
        let t = self.table.borrow();
        let p = t.procs.get(&pid)?;
        p.alive_at(now).then_some(p.started_ms)
    }

    fn unix_ms(&self) -> u64 {
        EPOCH_MS + now_ms()
    }

    fn local_minute(&self, t: i64) -> Option<Minute> {
        // UTC: the simulation's zone.
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        Minute::new(
            y as i32,
            m as u8,
            d as u8,
            (secs / 3_600) as u8,
            (secs % 3_600 / 60) as u8,
        )
    }

    fn utc_offset(&self, _t: i64) -> i64 {
        0
    }
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_833), (2027, 1, 15));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn scripts_parse() {
        assert_eq!(
            Script::parse("failfirst 2 30 3").unwrap(),
            Script::FailFirst(2, 30, 3)
        );
        assert_eq!(Script::parse("serve").unwrap(), Script::Hang);
        assert!(Script::parse("rm -rf /")
            .unwrap_err()
            .contains("unknown script"));
    }

    #[test]
    fn a_killed_process_ends_at_its_kill() {
        let p = Proc {
            log: "d".into(),
            started_ms: 0,
            ends: Some((100, Exit::Code(0))),
            killed: Some((50, 15)),
            ignores_term: false,
            incarnation: 1,
        };
        assert!(p.alive_at(49));
        assert!(!p.alive_at(50));
        assert_eq!(p.exit_at(60), Some(Exit::Signal(15)));
    }
}
