//! Messages of a sync stream: the laptop's sync session (alpha, the controller) asks the
//! workspace's sync endpoint (beta) to scan its root, to apply ops, and to send file contents;
//! the endpoint also says, unasked, when its root changed.
//!
//! Requests are answered in order, one reply sequence each. Anything large moves in chunks so
//! that no frame exceeds [`crate::FRAME_BYTES_MAX`]: a snapshot as [`SyncReply::Entries`]
//! chunks, file contents as [`SyncRequest::Data`] / [`SyncReply::Data`] chunks of at most
//! [`crate::DATA_CHUNK_BYTES_MAX`], **ended by an empty chunk** (so a file that changed size
//! since the scan still ends cleanly; the receiver checks size and hash before using it).

use cs_sync::delta::{DeltaOp, Signature};
use cs_sync::{ContentHash, Entry, Op, RelPath};
use serde::{Deserialize, Serialize};

/// Opens a sync stream (the payload of `StreamOpen::Sync`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOpen {
    /// The session's name, for the agent's logs.
    pub session: String,
    /// The workspace root: relative to the workspace home, or starting with `~/`. Created if
    /// missing when `create` is set (the first connection of a new session).
    pub root: String,
    pub create: bool,
    pub ignore: IgnoreSpec,
}

/// What a session ignores, on both sides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoreSpec {
    /// Gitignore-syntax patterns, in order.
    pub patterns: Vec<String>,
    /// Ignore version-control directories (`.git`, `.hg`, ...).
    pub vcs: bool,
    /// Honour the tree's own `.gitignore` files.
    pub gitignored: bool,
}

/// The laptop to the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// Scan the root. Answered by `Entries` chunks, the last with `last: true`.
    Scan,
    /// Apply these ops, in order. Each `Create`/`Replace` of a file is followed by its content:
    /// `Data` chunks totalling the file's size, or, when `deltas` names the op's index,
    /// `Delta` parts against the file the endpoint has there. Answered by `Applied`.
    Apply {
        ops: Vec<Op>,
        /// Indexes of ops whose content comes as a delta.
        deltas: Vec<u32>,
    },
    /// Content of a file of an `Apply`.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Content of a file of an `Apply`, as part of a delta against the file being replaced.
    Delta(DeltaPart),
    /// Send the signatures of these files (for a delta upload). Answered by `Signatures`.
    Signatures { paths: Vec<RelPath> },
    /// Send these files. With a signature, as a delta against the laptop's basis. Answered by
    /// `File` then `Data` chunks (or one `Delta`) for each path, in order.
    Read {
        files: Vec<(RelPath, Option<Signature>)>,
    },
}

/// The endpoint to the laptop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncReply {
    /// The stream is open: the absolute root in the workspace.
    Ready { root: String },
    /// The endpoint cannot serve this stream (a bad root, ...); it closes after this.
    Refused { reason: String },
    /// A chunk of a scan's snapshot; entries in snapshot order.
    Entries {
        entries: Vec<(RelPath, Entry)>,
        /// Paths the scan could not read, with why (reported, never synced).
        problems: Vec<(RelPath, String)>,
        last: bool,
    },
    /// The outcome of each op of an `Apply`, in order: `None` when it was applied.
    Applied { errors: Vec<Option<String>> },
    /// The signatures asked for (`None`: the file is not there or not readable).
    Signatures { signatures: Vec<Option<Signature>> },
    /// A file of a `Read` follows: `Ok` then its content, or `Err(why)` and nothing.
    File(Result<(), String>),
    /// Content of a file of a `Read`.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Content of a file of a `Read`, as part of a delta against the laptop's basis.
    Delta(DeltaPart),
    /// Unasked: something under the root changed since the last scan.
    Changed,
}

/// Part of a delta: its ops in order; the last part says what the result must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaPart {
    pub ops: Vec<DeltaOp>,
    /// On the last part: the target's size and blake3 hash.
    pub end: Option<(u64, ContentHash)>,
}

/// Entries per `Entries` chunk are limited by their encoded size, about this many bytes.
pub const ENTRIES_CHUNK_BYTES: usize = 256 * 1024;
