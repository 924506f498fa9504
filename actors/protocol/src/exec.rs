//! Messages of an exec stream: one remote command, or one interactive shell on a PTY.
//!
//! Output chunks carry their byte offset within their stream, and the exit message carries the
//! totals, so a receiver can prove it saw every byte exactly once, in order.

/// The request that opens an exec stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecStart {
    /// Run through `$SHELL -c`; `None` starts an interactive login shell.
    pub command: Option<String>,
    /// Allocate a PTY of this kind and size.
    pub pty: Option<PtySpec>,
}

/// Terminal type and size for a PTY session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PtySpec {
    /// Value for `TERM` in the remote session.
    pub term: String,
    pub size: WindowSize,
}

/// Terminal window size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// Laptop to agent, after [`ExecStart`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExecInput {
    /// Bytes for the command's stdin (at most [`crate::DATA_CHUNK_BYTES_MAX`]).
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The laptop's stdin reached end of file.
    StdinEof,
    /// The laptop terminal was resized.
    Resize(WindowSize),
    /// Deliver this signal to the command's process group.
    Signal(i32),
}

/// Agent to laptop.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExecOutput {
    /// A line for the user from the agent, before the command starts (the workspace is in
    /// Auto Mode). Not part of the command's output.
    Notice(String),
    /// The command is running.
    Started { pid: u32 },
    /// Bytes the command wrote to stdout (or to the PTY), starting at `offset`.
    Stdout {
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Bytes the command wrote to stderr, starting at `offset`.
    Stderr {
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The command ended; the totals let the receiver check nothing was lost.
    Exited {
        status: ExitStatus,
        stdout_bytes: u64,
        stderr_bytes: u64,
    },
    /// The command could not be run or its output could not be delivered.
    Failed { reason: String },
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The exit code a shell would report: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}
