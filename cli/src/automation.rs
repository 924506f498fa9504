//! Workspace automation from the laptop: `cs ps`, `cs status`, `cs start|stop|restart`,
//! `cs build`, `cs sandbox job enable|disable` (one request, one reply on a supervise stream)
//! and `cs logs` (a logs stream; a follow reopens after a lost connection and resumes after
//! the last line it printed, so nothing is skipped or printed twice).

use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use cs_protocol::supervise::{
    LogsMsg, LogsOpen, ProcKind, ProcView, StatusView, SuperviseReply, SuperviseRequest,
};
use cs_protocol::StreamOpen;
use cs_transport::read_frame;

use crate::home::CsHome;
use crate::wire::{build_id, Reply, Request};

/// Delays between a follow's attempts to reopen its stream (the daemon reconnects on its own).
const FOLLOW_RETRY_MS: [u64; 6] = [100, 200, 500, 1_000, 2_000, 5_000];

/// Opens a stream to `workspace` through the daemon; the socket then carries its bytes.
pub async fn open(
    home: &CsHome,
    workspace: &str,
    open: StreamOpen,
) -> anyhow::Result<tokio::net::UnixStream> {
    let req = Request::Open {
        build: build_id(),
        workspace: workspace.to_string(),
        open,
    };
    let (stream, reply) = crate::client::request(home, &req).await?;
    match reply {
        Reply::Opened => Ok(stream),
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

/// Sends one request to the workspace's supervisor.
pub async fn ask(
    home: &CsHome,
    workspace: &str,
    req: SuperviseRequest,
) -> anyhow::Result<SuperviseReply> {
    let mut stream = open(home, workspace, StreamOpen::Supervise(req)).await?;
    match read_frame::<_, SuperviseReply>(&mut stream).await? {
        Some(r) => Ok(r),
        None => bail!("the workspace {workspace} closed the stream without answering"),
    }
}

/// Prints a `Done` line, or fails with the `Error` line.
pub fn done(reply: SuperviseReply) -> anyhow::Result<()> {
    match reply {
        SuperviseReply::Done(msg) => {
            println!("{msg}");
            Ok(())
        }
        SuperviseReply::Error(msg) => bail!("{msg}"),
        other => bail!("unexpected answer from the workspace: {other:?}"),
    }
}

fn kind(k: ProcKind) -> &'static str {
    match k {
        ProcKind::Daemon => "daemon",
        ProcKind::GlobalDaemon => "global",
        ProcKind::Job => "job",
    }
}

fn when(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let d = unix.saturating_sub(now);
    if d < 120 {
        format!("in {d} s")
    } else if d < 7_200 {
        format!("in {} min", d / 60)
    } else {
        format!("in {} h", d / 3_600)
    }
}

/// `cs ps`.
pub fn print_ps(procs: &[ProcView], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(procs)?);
        return Ok(());
    }
    if procs.is_empty() {
        println!("no daemons or jobs");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:<7} {:<9} {:>8} {:>8}  {:<24} NEXT RUN",
        "NAME", "KIND", "STATE", "PID", "RESTARTS", "LAST EXIT"
    )?;
    for p in procs {
        writeln!(
            out,
            "{:<20} {:<7} {:<9} {:>8} {:>8}  {:<24} {}",
            p.name,
            kind(p.kind),
            p.state,
            p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            p.restarts,
            p.last_exit.as_deref().unwrap_or("-"),
            p.next_run_unix.map(when).unwrap_or_else(|| "-".into()),
        )?;
    }
    Ok(())
}

/// `cs status`.
pub fn print_status(s: &StatusView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let secs = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    let mut line = s.state.clone();
    match (s.state.as_str(), &s.step) {
        ("Progressing", Some(step)) => {
            line.push_str(&format!(
                ": {step} running for {}",
                s.step_ms.map(secs).unwrap_or_default()
            ));
        }
        ("Problematic", Some(step)) => {
            line.push_str(&format!(
                ": {step} failed ({}) after {}, {} time{} in a row",
                s.why.as_deref().unwrap_or("?"),
                s.step_ms.map(secs).unwrap_or_else(|| "?".into()),
                s.failures,
                if s.failures == 1 { "" } else { "s" }
            ));
            match s.retry_in_ms {
                Some(ms) => line.push_str(&format!("; retrying in {}", secs(ms))),
                None => line.push_str("; automatic retry is off: `cs status --retry` retries it"),
            }
        }
        ("Problematic", None) => {
            line.push_str(&format!(": {}", s.why.as_deref().unwrap_or("?")));
        }
        _ => {}
    }
    println!("{line}");
    if let (Some((step, ms)), "Problematic") = (&s.running, s.state.as_str()) {
        println!("running: {step} for {}", secs(*ms));
    }
    println!("mode: {}", s.mode);
    if !s.crashing.is_empty() && s.step.is_some() {
        println!("crashing daemons: {}", s.crashing.join(", "));
    }
    if !s.log_tail.is_empty() {
        println!("last lines of its log:");
        for l in &s.log_tail {
            println!("  {l}");
        }
    }
    Ok(())
}

/// `cs logs`: prints the records; with `follow`, keeps printing until interrupted and
/// reopens the stream after a lost connection, resuming after the last line printed.
pub async fn logs(
    home: &CsHome,
    workspace: &str,
    name: &str,
    follow: bool,
    last: u32,
    stamps: bool,
) -> anyhow::Result<()> {
    let mut after: Option<u64> = None;
    let mut failures = 0usize;
    loop {
        let req = LogsOpen {
            name: name.to_string(),
            follow,
            after_seq: after,
            last,
        };
        let result = match open(home, workspace, StreamOpen::Logs(req)).await {
            Ok(stream) => read_logs(stream, &mut after, stamps).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(true) => return Ok(()),
            Ok(false) if !follow => bail!("the log stream of {name} ended early"),
            Err(e) if !follow || is_refusal(&e) => return Err(e),
            _ => {}
        }
        let delay = FOLLOW_RETRY_MS[failures.min(FOLLOW_RETRY_MS.len() - 1)];
        failures += 1;
        tracing::debug!(delay, "log follow lost its stream; reopening");
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}

/// A refusal from the agent is final; a lost stream is retried.
fn is_refusal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>().is_some()
}

#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Reads one logs stream; `Ok(true)` when it ended as asked (`End`).
async fn read_logs(
    mut stream: tokio::net::UnixStream,
    after: &mut Option<u64>,
    stamps: bool,
) -> anyhow::Result<bool> {
    loop {
        let msg = match read_frame::<_, LogsMsg>(&mut stream).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        match msg {
            LogsMsg::Lines(lines) => {
                let mut out = std::io::stdout().lock();
                for (seq, ms, text) in lines {
                    if after.is_some_and(|a| seq <= a) {
                        continue;
                    }
                    *after = Some(seq);
                    if stamps {
                        writeln!(out, "{seq} {ms} {text}")?;
                    } else {
                        writeln!(out, "{text}")?;
                    }
                }
                out.flush()?;
            }
            LogsMsg::End => return Ok(true),
            LogsMsg::Error(msg) => return Err(Refused(msg).into()),
        }
    }
}
