//! The language `cs` and `cs-agent` speak: wire messages, the protocol version, and the codec.
//!
//! This crate does no IO. It turns typed messages into length-prefixed frames and back, with a
//! hard size limit checked before anything is allocated. Everything decoded from the network
//! goes through [`codec`], so the limit cannot be bypassed.

pub mod canary;
pub mod codec;
pub mod exec;
pub mod forward;
pub mod hello;
pub mod rsync;
pub mod supervise;
pub mod sync;

pub use canary::Canary;
pub use codec::{decode, encode_frame, DecodeError, EncodeError, FrameDecoder, FRAME_BYTES_MAX};

/// The wire protocol version. Bump it on any incompatible change to a message in this crate;
/// peers with different versions refuse each other in the hello with both numbers named.
pub const PROTOCOL_VERSION: u32 = 7;

/// The version of the software, for messages that name it to a person.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// ALPN identifier of the QUIC connection between `cs` and `cs-agent`.
pub const ALPN: &[u8] = b"cs/1";

/// Largest payload of one data-carrying message (stdin, stdout, stderr chunks). Smaller than
/// [`FRAME_BYTES_MAX`] so that a data frame always fits with its header.
pub const DATA_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// What a newly opened bidirectional stream is for: the first frame on every stream after the
/// hello. Later actors (sync, forward, log) add variants here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StreamOpen {
    /// Run a command (or a login shell) in the workspace.
    Exec(exec::ExecStart),
    /// Serve one sync session's workspace side.
    Sync(sync::SyncOpen),
    /// Ask the workspace's supervisor (one request, one reply).
    Supervise(supervise::SuperviseRequest),
    /// Read or follow a daemon's, job's or step's log.
    Logs(supervise::LogsOpen),
    /// Carry one connection to a TCP port or Unix socket in the workspace.
    Forward(forward::ForwardOpen),
    /// Follow the workspace's listening TCP ports.
    ForwardWatch(forward::WatchOpen),
    /// Listen in the workspace for a reverse forward (`-R`).
    ReverseListen(forward::ReverseOpen),
    /// Take one connection a reverse listener accepted.
    ReverseAccept(forward::ReverseAccept),
    /// One `cs rsync` transfer's workspace side.
    Rsync(rsync::RsyncOpen),
}
