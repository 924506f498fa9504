//! Messages of a `cs rsync` stream: the laptop drives, the agent lists, receives (a push) or
//! sends (a pull) inside one root in the workspace home.
//!
//! Requests are answered in order. Large things move in chunks so that no frame exceeds
//! [`crate::FRAME_BYTES_MAX`]: a listing as `Listing` parts ended by `ListingEnd`, content as
//! `Data` chunks of at most [`crate::DATA_CHUNK_BYTES_MAX`] (ended by `PutEnd` one way and by an
//! empty chunk and `DataEnd` the other), deltas as
//! `DeltaPart`s ended by `DeltaEnd`.

use cs_sync::delta::{DeltaOp, Signature};
use cs_sync::rsync::{Entry, Op};
use serde::{Deserialize, Serialize};

/// Entries per `Listing` frame.
pub const LISTING_CHUNK_ENTRIES: usize = 2_000;
/// Delta ops per `DeltaPart` frame (each literal is at most 64 KiB).
pub const DELTA_CHUNK_OPS: usize = 8;

/// Opens an rsync stream (the payload of `StreamOpen::Rsync`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RsyncOpen {
    /// The root in the workspace: relative to the home, `~/...`, or absolute inside the home.
    pub root: String,
}

/// The laptop's requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RsyncRequest {
    /// List the root (`Listing`... `ListingEnd`).
    List {
        recursive: bool,
        hash: bool,
    },
    /// The signature of a file under the root (`Sig`).
    Signature {
        path: String,
    },
    /// Carry out an op other than `Send` (answered only if it fails).
    Apply(Op),
    /// New content for `path`: `Data` chunks follow, then `PutEnd` with what they add up to
    /// (answered only if it fails).
    Put {
        path: String,
        /// `--partial`: if the transfer is cut off, keep what arrived as the file (the next
        /// run's basis) instead of discarding it.
        partial: bool,
    },
    PutEnd {
        size: u64,
        hash: [u8; 32],
    },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// New content for `path` as a delta against its current content: `DeltaPart`s follow,
    /// ended by `DeltaEnd`.
    PutDelta {
        path: String,
        size: u64,
        hash: [u8; 32],
    },
    DeltaPart(Vec<DeltaOp>),
    DeltaEnd,
    /// A file's content (`Data` chunks ended by an empty one, then `DataEnd`).
    Get {
        path: String,
    },
    /// A file's content as a delta against the laptop's basis (`DeltaPart`s, `DeltaEnd`).
    GetDelta {
        path: String,
        sig: Signature,
    },
    /// No more requests: answer `Finished`.
    Finish,
}

/// The agent's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RsyncReply {
    /// The stream's first frame: the root is accepted (or `Error`).
    Opened,
    Listing(Vec<Entry>),
    ListingEnd,
    Sig(Signature),
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The content sent (after the empty `Data`): its size and hash, or why it failed.
    DataEnd(Result<(u64, [u8; 32]), String>),
    DeltaPart(Vec<DeltaOp>),
    DeltaEnd(Result<(u64, [u8; 32]), String>),
    /// A request about `path` failed; the transfer goes on (rsync's "partial transfer").
    Failed {
        path: String,
        reason: String,
    },
    /// Every request was handled; `failed` of them failed.
    Finished {
        failed: u64,
    },
    /// The stream cannot go on (a root outside the home, a broken request): a line.
    Error(String),
}
