//! The seam between the supervisor and the machine: processes, signals, the wall clock and
//! local time. The agent uses [`OsHost`] (real processes in process groups, the system clock);
//! the simulation plugs in scripted processes on virtual time, so the real supervisor actor
//! runs there unchanged.

use std::rc::Rc;
use std::time::Duration;

use cs_supervisor::cron::Minute;

use super::proc::{self, Exit, Launch, Running};
use crate::logs::LogHub;

/// Called once with how a program's leader ended, after its output so far is in its log.
pub type Exited = Box<dyn FnOnce(Exit)>;

/// What the supervisor needs from the machine.
pub trait Host {
    /// Starts `l`, its output going to `logs`.
    fn launch(&self, l: Launch, logs: LogHub, exited: Exited) -> Result<Running, Exit>;
    /// Sends `sig` to a program's whole process group.
    fn signal(&self, r: Running, sig: i32);
    /// Whether anything of a program's process group is alive.
    fn group_alive(&self, r: Running) -> bool;
    /// What tells process `pid` apart from a later one with the same pid (its start time),
    /// or `None` if there is no such process.
    fn start_time(&self, pid: u32) -> Option<u64>;
    /// Unix time in milliseconds.
    fn unix_ms(&self) -> u64;
    /// The local time of Unix second `t` as a cron minute.
    fn local_minute(&self, t: i64) -> Option<Minute>;
    /// The local zone's offset from UTC at Unix second `t`, in seconds.
    fn utc_offset(&self, t: i64) -> i64;
}

/// Stops a program's group: SIGTERM, up to `grace`, then SIGKILL, and waits (briefly) for it
/// to be gone.
pub async fn stop_group(host: Rc<dyn Host>, r: Running, grace: Duration) {
    if !host.group_alive(r) {
        return;
    }
    host.signal(r, libc::SIGTERM);
    if wait_gone(&*host, r, grace).await {
        return;
    }
    host.signal(r, libc::SIGKILL);
    wait_gone(&*host, r, Duration::from_secs(1)).await;
}

/// Waits up to `limit` for a group to be gone; whether it is.
pub async fn wait_gone(host: &dyn Host, r: Running, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !host.group_alive(r) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether any process in group `pgid` is alive and not a zombie (from `/proc`; when it
/// cannot be read, the group counts as alive).
fn group_has_live_member(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name (in parentheses): state, ppid, pgrp.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut f = rest.split(' ');
        let (state, _ppid, pgrp) = (f.next(), f.next(), f.next());
        if pgrp.and_then(|g| g.parse::<u32>().ok()) == Some(pgid) && state != Some("Z") {
            return true;
        }
    }
    false
}

/// Real processes and the system clock.
#[derive(Debug, Default)]
pub struct OsHost;

impl Host for OsHost {
    fn launch(&self, l: Launch, logs: LogHub, exited: Exited) -> Result<Running, Exit> {
        proc::launch(l, logs, exited)
    }

    fn signal(&self, r: Running, sig: i32) {
        crate::spawn::signal_group(nix::unistd::Pid::from_raw(r.pid as i32), sig);
    }

    fn group_alive(&self, r: Running) -> bool {
        if nix::sys::signal::killpg(nix::unistd::Pid::from_raw(r.pid as i32), None).is_err() {
            return false;
        }
        // killpg also finds zombies: members that died, waiting for their parent (init, for
        // a daemon's orphaned children) to reap them. They hold nothing; a group of only
        // zombies is gone.
        group_has_live_member(r.pid)
    }

    fn start_time(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 22, counted after the command name (field 2), which is in parentheses and
        // may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split(' ').nth(19)?.parse().ok()
    }

    fn unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn local_minute(&self, t: i64) -> Option<Minute> {
        // SAFETY: localtime_r writes only into the struct it is given.
        let tm = unsafe {
            let mut tm: libc::tm = std::mem::zeroed();
            if libc::localtime_r(&t, &mut tm).is_null() {
                return None;
            }
            tm
        };
        Minute::new(
            tm.tm_year + 1900,
            (tm.tm_mon + 1) as u8,
            tm.tm_mday as u8,
            tm.tm_hour as u8,
            tm.tm_min as u8,
        )
    }

    fn utc_offset(&self, t: i64) -> i64 {
        // SAFETY: localtime_r writes only into the struct it is given.
        unsafe {
            let mut tm: libc::tm = std::mem::zeroed();
            if libc::localtime_r(&t, &mut tm).is_null() {
                return 0;
            }
            tm.tm_gmtoff
        }
    }
}
