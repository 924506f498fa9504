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
    /// A stream that carries one large file for the session (so small edits never wait
    /// behind it): no watcher, no hash cache, no `Changed`.
    pub bulk: bool,
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
    /// Files larger than this many bytes are problems, not synced (`None`: no limit).
    pub max_file_size: Option<u64>,
}

impl IgnoreSpec {
    /// The scanner's rules for this spec; a bad pattern is an error naming it.
    pub fn ignorer(&self) -> Result<cs_sync::ignore::Ignorer, cs_sync::ignore::IgnoreError> {
        let ig = cs_sync::ignore::Ignorer::new(&self.patterns, self.vcs, self.gitignored)?;
        Ok(match self.max_file_size {
            Some(max) => ig.with_max_file_size(max),
            None => ig,
        })
    }
}

/// The laptop to the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// Scan the root: all of it when `full`, else what its filesystem events say changed
    /// since the last scan of this stream, the paths that ops touched since, and `paths`
    /// (what the laptop's other streams applied: events may lag behind the writes). The
    /// first scan of a stream (and one after a failed scan) is answered by `Entries` chunks,
    /// the whole snapshot; later ones by `Changes` chunks that bring the laptop's copy
    /// (the snapshots sent, patched with every op reported applied on this stream) up to
    /// date. The last chunk has `last: true`.
    Scan { full: bool, paths: Vec<RelPath> },
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
    Ready {
        root: String,
        /// The workspace watches the root: it says `Changed` when the root differs from
        /// what the laptop holds. Without a watcher, only scans find changes.
        watched: bool,
    },
    /// The endpoint cannot serve this stream (a bad root, ...); it closes after this.
    Refused { reason: String },
    /// A chunk of a scan's snapshot; entries in snapshot order.
    Entries {
        entries: Vec<(RelPath, Entry)>,
        /// Paths the scan could not read, with why (reported, never synced).
        problems: Vec<(RelPath, String)>,
        last: bool,
    },
    /// A chunk of a scan's snapshot as changes against the previous scan's (see
    /// `cs_sync::Snapshot::changes_to`), in snapshot order.
    Changes {
        changes: Vec<cs_sync::Change>,
        /// As in `Entries`.
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

/// Files smaller than this move whole: a delta would not save a round trip's worth.
pub const DELTA_FILE_BYTES_MIN: u64 = 64 * 1024;
/// Files larger than this move whole, streamed: a delta holds basis and target in memory.
pub const DELTA_FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Ops one assembled delta may have (a 256 MiB target in 700-byte copies fits).
pub const DELTA_OPS_MAX: usize = 1 << 20;

/// Whether the sender follows this op of an `Apply` (or answers a `Read` for it) with file
/// content: a file created, or replaced by other content (an executable-bit change is not).
pub fn needs_content(op: &Op) -> bool {
    match op {
        Op::Create {
            entry: Entry::File { .. },
            ..
        } => true,
        Op::Replace {
            expected,
            entry: Entry::File { hash, .. },
            ..
        } => !matches!(expected, Entry::File { hash: old, .. } if old == hash),
        _ => false,
    }
}

/// Whether an op's content should move as a delta: a file replaced by other content, both
/// within the delta size range.
pub fn wants_delta(op: &Op) -> bool {
    match op {
        Op::Replace {
            expected:
                Entry::File {
                    size: old,
                    hash: old_hash,
                    ..
                },
            entry: Entry::File {
                size: new, hash, ..
            },
            ..
        } => {
            old_hash != hash
                && (DELTA_FILE_BYTES_MIN..=DELTA_FILE_BYTES_MAX).contains(old)
                && *new <= DELTA_FILE_BYTES_MAX
        }
        _ => false,
    }
}

/// Literal bytes one [`DeltaPart`] carries at most (well under the frame limit).
pub const DELTA_PART_LITERAL_BYTES_MAX: usize = 512 * 1024;
/// Ops one [`DeltaPart`] carries at most.
pub const DELTA_PART_OPS_MAX: usize = 8192;

/// Splits a delta into parts that each fit a frame; the last part carries its end.
pub fn split_delta(d: cs_sync::delta::Delta) -> Vec<DeltaPart> {
    let mut parts = Vec::new();
    let mut cur = Vec::new();
    let mut literal = 0usize;
    for op in d.ops {
        let len = match &op {
            DeltaOp::Literal(b) => b.len(),
            DeltaOp::Copy { .. } => 0,
        };
        if !cur.is_empty()
            && (literal + len > DELTA_PART_LITERAL_BYTES_MAX || cur.len() >= DELTA_PART_OPS_MAX)
        {
            parts.push(DeltaPart {
                ops: std::mem::take(&mut cur),
                end: None,
            });
            literal = 0;
        }
        literal += len;
        cur.push(op);
    }
    parts.push(DeltaPart {
        ops: cur,
        end: Some((d.target_bytes, d.target_hash)),
    });
    parts
}

/// Gathers [`DeltaPart`]s back into a delta, refusing one that grows past `ops_max` ops or
/// announces a target over `target_bytes_max`.
#[derive(Debug, Default)]
pub struct DeltaAssembler {
    ops: Vec<DeltaOp>,
}

/// Why parts could not be assembled: a peer sent too much.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("delta has more than {0} ops")]
    TooManyOps(usize),
    #[error("delta target of {0} bytes is over the limit of {1}")]
    TooLarge(u64, u64),
}

impl DeltaAssembler {
    /// Adds a part; returns the whole delta after the last one.
    pub fn push(
        &mut self,
        part: DeltaPart,
        ops_max: usize,
        target_bytes_max: u64,
    ) -> Result<Option<cs_sync::delta::Delta>, AssembleError> {
        if self.ops.len() + part.ops.len() > ops_max {
            return Err(AssembleError::TooManyOps(ops_max));
        }
        self.ops.extend(part.ops);
        match part.end {
            None => Ok(None),
            Some((bytes, _)) if bytes > target_bytes_max => {
                Err(AssembleError::TooLarge(bytes, target_bytes_max))
            }
            Some((target_bytes, target_hash)) => Ok(Some(cs_sync::delta::Delta {
                ops: std::mem::take(&mut self.ops),
                target_bytes,
                target_hash,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_splits_into_frame_sized_parts_and_comes_back_whole() {
        let basis: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut target = basis.clone();
        for i in (0..target.len()).step_by(40_000) {
            target[i] ^= 0xff;
        }
        let target: Vec<u8> = target
            .into_iter()
            .chain((0..900_000u32).map(|i| (i % 241) as u8))
            .collect();
        let d = cs_sync::delta::delta(&cs_sync::delta::signature(&basis), &target);
        let parts = split_delta(d.clone());
        assert!(parts.len() > 1);
        for p in &parts {
            let bytes = crate::encode_frame(&SyncRequest::Delta(p.clone())).unwrap();
            assert!(bytes.len() <= crate::FRAME_BYTES_MAX, "{}", bytes.len());
        }
        let mut a = DeltaAssembler::default();
        let mut out = None;
        for p in parts {
            out = a.push(p, 1 << 20, 1 << 30).unwrap();
        }
        let out = out.unwrap();
        assert_eq!(out, d);
        assert_eq!(
            cs_sync::delta::patch(&basis, &out, 1 << 30).unwrap(),
            target
        );
    }

    #[test]
    fn an_oversized_delta_is_refused() {
        let mut a = DeltaAssembler::default();
        let part = DeltaPart {
            ops: vec![],
            end: Some((u64::MAX, [0; 32])),
        };
        assert_eq!(
            a.push(part, 10, 1 << 20),
            Err(AssembleError::TooLarge(u64::MAX, 1 << 20))
        );
    }
}
