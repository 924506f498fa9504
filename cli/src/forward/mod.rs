//! `cs portforward`: the forward actor's laptop side. Sessions live in the laptop daemon
//! ([`hub::ForwardHub`]), which holds the workspace's one QUIC connection: each forwarded
//! connection is one stream on it. A foreground `cs portforward` attaches to its session and
//! prints what happens until Ctrl-C ends both; `--detach` leaves the session to the daemon
//! (`cs portforward list`, `cs portforward stop NAME`), which keeps it across its restarts.

pub mod commands;
pub mod hub;
pub mod session;

use cs_forward::Rule;
use serde::{Deserialize, Serialize};

/// Sessions one daemon runs at once.
pub const SESSIONS_MAX: usize = 64;

/// What a session forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    pub name: String,
    /// SANDBOX/WORKSPACE.
    pub workspace: String,
    /// `-L` rules: listen on the laptop, connect in the workspace.
    pub local: Vec<Rule>,
    /// `-R` rules: listen in the workspace, connect on the laptop.
    pub remote: Vec<Rule>,
    /// Forward the workspace's listening ports as they appear (off with `-PF`).
    pub auto: bool,
    /// Runs in the daemon without a `cs portforward` attached (kept across daemon restarts).
    pub detached: bool,
}

/// One forward, as `cs portforward list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardView {
    /// local (`-L`), auto (discovered), remote (`-R`).
    pub kind: String,
    /// Where it listens (on the laptop; in the workspace for `-R`).
    pub local: String,
    /// Where it connects.
    pub remote: String,
    /// The supervised daemon that listens on the workspace's port, if any.
    pub daemon: Option<String>,
    /// The process that listens on it, `COMMAND (pid N)`.
    pub process: Option<String>,
    pub open: u64,
    pub total: u64,
    /// Bytes from the listening end to the connecting end, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Connections the other end refused (reset to the client).
    pub refused: u64,
    /// Connections cut by a lost connection to the workspace.
    pub lost: u64,
    pub last_error: Option<String>,
}

/// One session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub name: String,
    pub workspace: String,
    pub detached: bool,
    pub auto: bool,
    pub forwards: Vec<ForwardView>,
    /// The latest notes (forwards added and removed, failures), oldest first.
    pub notes: Vec<String>,
}

/// Checks a session name: what `cs portforward stop NAME` can take.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad session name '{name}': use 1-64 letters, digits, '-', '_' or '.'"
        ))
    }
}
