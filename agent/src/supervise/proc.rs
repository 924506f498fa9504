//! Real processes for the supervisor: setup scripts, hooks, checkouts, daemons and jobs.
//!
//! Each runs `$SHELL -c CMD` in a process group of its own, stdin from /dev/null, stdout and
//! stderr into one pipe (so their lines stay in the order written) that the agent reads into
//! the program's log. How a run ended is its leader's exit: a hook that leaves a background
//! child holding the pipe does not hang the sequence, its output keeps going to the log until
//! the child closes the pipe.
//!
//! Stopping is SIGTERM to the group, a grace period, then SIGKILL to the group; members left
//! behind by a leader that exited on its own are sent the same, so a daemon never leaves an
//! orphan (and a restarted one never finds its old self holding its port). Only `tokio`
//! reaps: every process started here is a child of the agent and waited for.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::logs::LogHub;

/// Time a stopped program gets between SIGTERM and SIGKILL (supervisord's `stopwaitsecs`).
pub const STOP_GRACE_MS: u64 = 10_000;
/// Time the log reader gets after a leader exits to read what is still in the pipe before the
/// exit is reported.
const DRAIN_AFTER_EXIT_MS: u64 = 200;

/// What to run.
#[derive(Debug, Clone)]
pub struct Launch {
    pub shell: PathBuf,
    pub cmd: String,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    /// The log its output goes to.
    pub log: String,
    /// Run as this user instead of the agent's (the agent runs as root).
    pub user: Option<crate::supervise::identity::User>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// It could not be started (the error, for the log and the status).
    NotStarted(String),
}

impl Exit {
    pub fn ok(&self) -> bool {
        *self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| "?".into());
                write!(f, "signal {s} ({name})")
            }
            Exit::NotStarted(e) => write!(f, "not started: {e}"),
        }
    }
}

/// A running program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    pub pid: u32,
}

/// Starts `l`; `exited` is called once with how its leader ended, after its output so far is
/// in the log. Returns the running program, or how it failed to start.
pub fn launch(
    l: Launch,
    logs: LogHub,
    exited: impl FnOnce(Exit) + 'static,
) -> Result<Running, Exit> {
    match spawn(&l) {
        Ok((child, out)) => {
            let pid = child.id().unwrap_or(0);
            let running = Running { pid };
            logs.note(&l.log, &format!("started pid {pid}: {}", one_line(&l.cmd)));
            let log = l.log.clone();
            let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
            let reader_logs = logs.clone();
            actix_rt::spawn(async move {
                pump(out, &reader_logs, &log).await;
                let _ = drained_tx.send(());
            });
            actix_rt::spawn(async move {
                let exit = wait(child).await;
                // The output the leader wrote before it exited is in the pipe: read it first.
                // A background child keeping the pipe open only costs this short wait.
                let _ =
                    tokio::time::timeout(Duration::from_millis(DRAIN_AFTER_EXIT_MS), drained_rx)
                        .await;
                logs.finish(&l.log);
                logs.note(&l.log, &format!("pid {pid} ended: {exit}"));
                exited(exit);
            });
            Ok(running)
        }
        Err(e) => {
            let exit = Exit::NotStarted(format!("cannot run {}: {e}", l.cmd));
            logs.note(&l.log, &exit.to_string());
            Err(exit)
        }
    }
}

fn spawn(l: &Launch) -> io::Result<(tokio::process::Child, tokio::net::unix::pipe::Receiver)> {
    if !l.dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("working directory {} does not exist", l.dir.display()),
        ));
    }
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let wr2: OwnedFd = wr.try_clone()?;
    let mut cmd = std::process::Command::new(&l.shell);
    cmd.arg("-c")
        .arg(&l.cmd)
        .current_dir(&l.dir)
        .env_clear()
        .envs(l.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::from(wr2))
        .process_group(0);
    if let Some(u) = &l.user {
        // SAFETY: the closure makes only async-signal-safe calls (see `switch_fn`).
        unsafe {
            cmd.pre_exec(u.switch_fn());
        }
    }
    // SAFETY: reset_signals only calls async-signal-safe functions.
    unsafe {
        cmd.pre_exec(crate::spawn::reset_signals);
    }
    let mut tcmd = tokio::process::Command::from(cmd);
    tcmd.kill_on_drop(false);
    let child = tcmd.spawn()?;
    // The command's copies of the write end are closed in this process by dropping `cmd`
    // (inside `tcmd`) here, so the pipe ends when the program and its children are done.
    drop(tcmd);
    let out = tokio::net::unix::pipe::Receiver::from_owned_fd(rd)?;
    Ok((child, out))
}

async fn pump(mut out: tokio::net::unix::pipe::Receiver, logs: &LogHub, log: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match out.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => logs.write(log, &buf[..n]),
        }
    }
}

async fn wait(mut child: tokio::process::Child) -> Exit {
    match child.wait().await {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Code(255),
        },
        Err(e) => Exit::NotStarted(format!("waiting for it failed: {e}")),
    }
}

/// A command as one log line: its first line, and how many more there are.
fn one_line(cmd: &str) -> String {
    let mut lines = cmd.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("").trim();
    match lines.count() {
        0 => first.to_string(),
        n => format!("{first} (and {n} more lines)"),
    }
}
