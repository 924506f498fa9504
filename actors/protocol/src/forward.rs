//! Messages of the port-forwarding streams (`cs portforward`).
//!
//! - A forward stream ([`crate::StreamOpen::Forward`]) carries one TCP (or Unix-socket)
//!   connection: the agent connects to the [`Endpoint`] in the workspace and answers one
//!   [`ForwardReply`]; after `Connected` the stream carries the connection's bytes unchanged,
//!   with QUIC's finish as the half-close and a reset as the connection's reset.
//! - A watch stream ([`crate::StreamOpen::ForwardWatch`]) carries [`WatchMsg`]s: the
//!   workspace's listening TCP ports, sent whenever they change.
//! - A reverse stream ([`crate::StreamOpen::ReverseListen`]) asks the agent to listen in the
//!   workspace; it answers [`ReverseMsg`]s, one `Accepted` per incoming connection, which the
//!   laptop claims with a [`ReverseAccept`] on a stream of its own (the laptop opens every
//!   stream; the agent never does).

/// One end of a forward: a TCP address or a Unix socket's path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix { path } => f.write_str(path),
        }
    }
}

/// Open a connection to `target` in the workspace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForwardOpen {
    pub target: Endpoint,
}

/// The agent's answer on a forward stream (and on a reverse accept).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ForwardReply {
    /// Connected; raw bytes follow both ways.
    Connected,
    /// Nothing could be reached there (refused, no such socket, timed out): a line naming it.
    Refused { reason: String },
}

/// Follow the workspace's listening TCP ports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchOpen {}

/// A listening TCP socket in the workspace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Listening {
    pub port: u16,
    /// The address it listens on, as text (`0.0.0.0`, `127.0.0.1`, `::`, ...).
    pub addr: String,
    /// The process that owns it, when it could be found.
    pub pid: Option<u32>,
    /// That process's command name (`/proc/PID/comm`).
    pub command: Option<String>,
    /// The supervised daemon it belongs to (its process group's), if any.
    pub daemon: Option<String>,
}

/// The agent's messages on a watch stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WatchMsg {
    /// Every listening port now (the agent's own excluded), sorted by port.
    Listening(Vec<Listening>),
    /// The watch cannot go on; a line for the user.
    Error(String),
}

/// Listen at `bind` in the workspace and hand each connection to the laptop.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReverseOpen {
    pub bind: Endpoint,
}

/// The agent's messages on a reverse stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReverseMsg {
    /// Listening (the address actually bound, with the port chosen when 0 was asked).
    Listening { bound: Endpoint },
    /// Cannot listen there; a line naming the address and why.
    Refused { reason: String },
    /// A connection arrived: claim it with [`ReverseAccept`] (within
    /// [`REVERSE_CLAIM_MS`]) or it is reset.
    Accepted { id: u64, peer: String },
}

/// How long an accepted reverse connection waits for the laptop to claim it.
pub const REVERSE_CLAIM_MS: u64 = 10_000;

/// Claim an accepted reverse connection. `refused` says the laptop could not reach its own
/// end: the agent resets the workspace's connection instead of carrying bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReverseAccept {
    pub id: u64,
    pub refused: Option<String>,
}

/// The application error code of a stream reset that stands for a TCP reset.
pub const RESET_CODE: u32 = 1;
