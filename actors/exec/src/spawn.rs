//! The seam between an exec session and whatever runs the command.
//!
//! A spawner returns a [`ChildHandle`]: bounded channels in both directions. Bounded channels
//! carry backpressure: a child that writes faster than the network drains blocks on its pipe.

use cs_protocol::exec::{ExitStatus, PtySpec, WindowSize};
use tokio::sync::mpsc;

/// Chunks buffered between a child and its session, each at most a data chunk.
pub const CHILD_CHANNEL_CHUNKS_MAX: usize = 16;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnRequest {
    /// Run through `$SHELL -c`; `None` is an interactive login shell.
    pub command: Option<String>,
    /// Allocate a PTY.
    pub pty: Option<PtySpec>,
}

/// Something the child did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The child's stdout (or PTY) reached end of file.
    StdoutEof,
    /// The child's stderr reached end of file (immediately, for a PTY).
    StderrEof,
    /// The child ended.
    Exited(ExitStatus),
}

/// Bytes for the child's stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdinMsg {
    Data(Vec<u8>),
    Eof,
}

/// Out-of-band requests to the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Resize(WindowSize),
    /// Deliver a signal to the child's process group.
    Signal(i32),
}

/// A running child, as seen by its session.
#[derive(Debug)]
pub struct ChildHandle {
    pub pid: u32,
    pub stdin: mpsc::Sender<StdinMsg>,
    pub control: mpsc::Sender<Control>,
    pub events: mpsc::Receiver<ChildEvent>,
}

/// Starts children. Implemented with real processes by the agent and with scripts by the
/// simulation.
pub trait Spawner {
    /// Starts `req`. An error is a message for the user (the shell is missing, ...).
    fn spawn(&self, req: &SpawnRequest) -> Result<ChildHandle, String>;
}
