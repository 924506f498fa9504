//! Messages between `cs` and the laptop daemon over the Unix socket. After `Opened`, the
//! socket carries the opened QUIC stream's bytes unchanged, end to end.

use cs_protocol::StreamOpen;

use crate::sync::{ConflictView, SyncSpec, SyncStatus};
use serde::{Deserialize, Serialize};

/// `cs` to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Open a stream to a workspace and splice it to this socket.
    Open {
        build: String,
        workspace: String,
        open: StreamOpen,
    },
    /// Report the daemon's links.
    Status { build: String },
    /// Close the links of a sandbox that is being deleted.
    Forget { sandbox: String },
    /// Act on sync sessions.
    Sync { build: String, cmd: SyncCommand },
    /// Exit.
    Stop,
    /// Act on port-forward sessions. (New variants go last: a daemon of an older build must
    /// still read `Status` and `Stop`, which is how it gets replaced.)
    Forward { build: String, cmd: ForwardCommand },
}

/// What `cs portforward` asks of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardCommand {
    /// Start a session. Detached, the daemon answers `Started`; attached, it then sends its
    /// notes as `Note`s until this socket closes, which stops the session.
    Start(crate::forward::ForwardSpec),
    List,
    Stop(String),
}

/// The daemon's answers to [`ForwardCommand`]s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardAnswer {
    Started(String),
    Note(String),
    /// An attached client fell behind by this many notes.
    Skipped(u64),
    List(Vec<crate::forward::SessionView>),
    Done,
}

/// The daemon to `cs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
/// (New variants go last, so that an older `cs` still reads `WrongBuild` and `Done`.)
pub enum Reply {
    /// The stream is open; from now on the socket carries its bytes.
    Opened,
    Status(DaemonStatus),
    Sync(SyncAnswer),
    Done,
    /// The daemon runs another build of cs and must be restarted.
    WrongBuild {
        daemon_build: String,
    },
    Error {
        message: String,
    },
    Forward(ForwardAnswer),
}

/// What `cs sync` asks of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SyncCommand {
    Create(SyncSpec),
    List,
    /// Answer once a full cycle found both sides in agreement.
    Flush(String),
    Pause(String),
    Resume(String),
    /// Forget the ancestor: the next cycle reconciles from scratch (nothing is deleted).
    Reset(String),
    Terminate(String),
    Conflicts(String),
}

/// The daemon's answers to [`SyncCommand`]s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SyncAnswer {
    Created(String),
    List(Vec<SyncStatus>),
    Conflicts(Vec<ConflictView>),
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub build: String,
    pub links: Vec<LinkStatus>,
}

/// The state of the connection to one workspace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkStatus {
    pub workspace: String,
    pub addr: String,
    /// idle, connecting, connected, retrying.
    pub state: String,
    pub last_error: Option<String>,
    /// Streams opened on this link since the daemon started.
    pub streams_opened: u64,
    /// Connections established since the daemon started.
    pub connects: u64,
    /// UDP payload bytes sent and received on the current connection (0 without one): what
    /// went over the wire, headers, retransmissions and encryption included.
    #[serde(default)]
    pub udp_tx_bytes: u64,
    #[serde(default)]
    pub udp_rx_bytes: u64,
}

/// Identifies this build of cs, so that a daemon left over from another build is replaced.
pub fn build_id() -> String {
    let exe = std::env::current_exe().ok();
    let meta = exe.as_ref().and_then(|p| std::fs::metadata(p).ok());
    let stamp = meta
        .and_then(|m| m.modified().ok().map(|t| (t, m.len())))
        .map(|(t, len)| {
            let nanos = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{nanos:x}-{len:x}")
        })
        .unwrap_or_default();
    format!("{}+{}", cs_protocol::SOFTWARE_VERSION, stamp)
}
