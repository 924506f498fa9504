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
    /// Content of a file of an `Apply`, compressed ([`pack`]); never the empty end chunk.
    Packed(#[serde(with = "serde_bytes")] Vec<u8>),
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
    /// Content of a file of a `Read`, compressed ([`pack`]); never the empty end chunk.
    Packed(#[serde(with = "serde_bytes")] Vec<u8>),
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

/// Files smaller than this move whole when the laptop fetches them: the delta is against the
/// laptop's copy and costs no round trip, but its signature is not worth sending for less.
pub const DELTA_FILE_BYTES_MIN: u64 = 64 * 1024;
/// Files smaller than this move whole (packed) when the laptop sends them: a delta against the
/// workspace's copy first waits a round trip for its signature, longer than a third of this
/// (what source code packs to) takes on any link a person edits over. Through a relay with 50
/// ms round trips and 5% loss, edits of 64-75 KB files were the slowest twentieth of all
/// edits when they went as deltas.
pub const DELTA_UPLOAD_BYTES_MIN: u64 = 256 * 1024;
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
/// within the delta size range, which starts at `min` ([`DELTA_FILE_BYTES_MIN`] when the
/// laptop fetches, [`DELTA_UPLOAD_BYTES_MIN`] when it sends).
pub fn wants_delta(op: &Op, min: u64) -> bool {
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
                && (min.max(1)..=DELTA_FILE_BYTES_MAX).contains(old)
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

/// Content is packed on links whose base round trip (the least seen: a busy loopback link
/// shows tens of milliseconds of queueing) is at least this long: a link that far away
/// is slower than zstd (hundreds of MB/s per core), and a save packed to a third is a third
/// of the packets to lose. On loopback, a LAN or within a region it would only cost CPU:
/// packing made the benchmark's initial sync over loopback 40% slower.
pub const PACK_RTT_MS_MIN: u64 = 5;

/// zstd level of [`pack`]: the fastest, which still shrinks source code about threefold.
const PACK_LEVEL: i32 = 1;

/// A chunk of file content as it goes on the wire: compressed when that saves at least an
/// eighth (source code shrinks about threefold, so an edit's save is a third of the packets
/// to lose on a lossy link), as it is otherwise (already compressed content, tiny chunks).
/// `Ok` holds the packed bytes, `Err` gives the chunk back unchanged.
pub fn pack(chunk: Vec<u8>) -> Result<Vec<u8>, Vec<u8>> {
    if chunk.len() < PACK_BYTES_MIN || chunk.len() > crate::DATA_CHUNK_BYTES_MAX {
        return Err(chunk);
    }
    match zstd::bulk::compress(&chunk, PACK_LEVEL) {
        Ok(z) if z.len() <= chunk.len() - chunk.len() / 8 => Ok(z),
        _ => Err(chunk),
    }
}

/// Chunks smaller than this are not worth compressing.
const PACK_BYTES_MIN: usize = 128;

/// The content of a packed chunk. It must be non-empty and unpack to at most
/// [`crate::DATA_CHUNK_BYTES_MAX`] bytes: anything else is a malformed message.
pub fn unpack(packed: &[u8]) -> Result<Vec<u8>, String> {
    let data = zstd::bulk::decompress(packed, crate::DATA_CHUNK_BYTES_MAX)
        .map_err(|e| format!("a packed chunk does not unpack: {e}"))?;
    if data.is_empty() {
        return Err("a packed chunk unpacks to nothing".into());
    }
    Ok(data)
}

/// How a stream's content chunks go, chosen by the agent for the link its stream is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Packing {
    /// As they are.
    Raw,
    /// LZ4 ([`pack_lz4`]): about 500 MB/s per core to pack and GB/s to unpack, source code
    /// shrinks about 2.4-fold. Cheaper than the QUIC packets it saves: a near link.
    Lz4,
    /// zstd level 1 ([`pack`]): half LZ4's speed, about 3.4-fold: a distant link.
    Zstd,
}

/// A chunk packed with LZ4's block format behind its length (four bytes, little-endian),
/// under the same rule as [`pack`]: `Ok` when that saves at least an eighth, else `Err` with
/// the chunk unchanged.
pub fn pack_lz4(chunk: Vec<u8>) -> Result<Vec<u8>, Vec<u8>> {
    if chunk.len() < PACK_BYTES_MIN || chunk.len() > crate::DATA_CHUNK_BYTES_MAX {
        return Err(chunk);
    }
    let bound = 4 + lz4_flex::block::get_maximum_output_size(chunk.len());
    let mut out = vec![0u8; bound];
    out[..4].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
    match lz4_flex::block::compress_into(&chunk, &mut out[4..]) {
        Ok(n) if 4 + n <= chunk.len() - chunk.len() / 8 => {
            out.truncate(4 + n);
            Ok(out)
        }
        _ => Err(chunk),
    }
}

/// The content of a chunk packed by [`pack_lz4`]. Its length must be between 1 and
/// [`crate::DATA_CHUNK_BYTES_MAX`] and the block must unpack to exactly that: anything else is
/// a malformed message.
pub fn unpack_lz4(packed: &[u8]) -> Result<Vec<u8>, String> {
    let (len, block) = packed
        .split_first_chunk::<4>()
        .ok_or("an LZ4 chunk is shorter than its length")?;
    let len = u32::from_le_bytes(*len) as usize;
    if len == 0 || len > crate::DATA_CHUNK_BYTES_MAX {
        return Err(format!("an LZ4 chunk claims {len} bytes"));
    }
    let data = lz4_flex::block::decompress(block, len)
        .map_err(|e| format!("an LZ4 chunk does not unpack: {e}"))?;
    if data.len() != len {
        return Err(format!(
            "an LZ4 chunk unpacks to {} bytes, not {len}",
            data.len()
        ));
    }
    Ok(data)
}

/// A chunk packed when asked and worth it (`Ok`), else as it is (`Err`).
fn pack_if(chunk: Vec<u8>, packed: bool) -> Result<Vec<u8>, Vec<u8>> {
    if packed {
        pack(chunk)
    } else {
        Err(chunk)
    }
}

impl SyncRequest {
    /// A chunk of an `Apply`'s file content, packed when asked and worth it (`Data` when
    /// empty).
    pub fn data(chunk: Vec<u8>, packed: bool) -> Self {
        pack_if(chunk, packed).map_or_else(Self::Data, Self::Packed)
    }

    /// The request with a packed chunk unpacked to `Data`; other requests unchanged.
    pub fn unpacked(self) -> Result<Self, String> {
        match self {
            Self::Packed(z) => unpack(&z).map(Self::Data),
            other => Ok(other),
        }
    }
}

impl SyncReply {
    /// A chunk of a `Read`'s file content, packed when asked and worth it (`Data` when
    /// empty).
    pub fn data(chunk: Vec<u8>, packed: bool) -> Self {
        pack_if(chunk, packed).map_or_else(Self::Data, Self::Packed)
    }

    /// The reply with a packed chunk unpacked to `Data`; other replies unchanged.
    pub fn unpacked(self) -> Result<Self, String> {
        match self {
            Self::Packed(z) => unpack(&z).map(Self::Data),
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` bytes that do not compress (a seeded LCG's high bytes).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    }

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

    #[test]
    fn a_delta_is_wanted_from_the_given_size_for_changed_content_only() {
        let file = |size: u64, h: u8| Entry::File {
            size,
            exec: false,
            hash: [h; 32],
        };
        let replace = |old: Entry, new: Entry| Op::Replace {
            path: RelPath::parse("a.c").unwrap(),
            expected: old,
            entry: new,
        };
        let k = 1024;
        let mid = replace(file(100 * k, 1), file(100 * k + 40, 2));
        assert!(wants_delta(&mid, DELTA_FILE_BYTES_MIN));
        assert!(!wants_delta(&mid, DELTA_UPLOAD_BYTES_MIN));
        let big = replace(file(300 * k, 1), file(300 * k, 2));
        assert!(wants_delta(&big, DELTA_UPLOAD_BYTES_MIN));
        // Same content (an executable-bit change), too small, too large, or a new file: whole.
        assert!(!wants_delta(
            &replace(file(300 * k, 1), file(300 * k, 1)),
            1
        ));
        assert!(!wants_delta(
            &replace(file(10 * k, 1), file(10 * k, 2)),
            DELTA_FILE_BYTES_MIN
        ));
        let huge = DELTA_FILE_BYTES_MAX + 1;
        assert!(!wants_delta(&replace(file(huge, 1), file(huge, 2)), 1));
        assert!(!wants_delta(&replace(Entry::Dir, file(300 * k, 2)), 1));
    }

    #[test]
    fn content_is_packed_only_when_it_shrinks_and_comes_back_the_same() {
        let source: Vec<u8> = (0..2000)
            .flat_map(|i| format!("static int f{i}(void) {{ return {i}; }}\n").into_bytes())
            .take(crate::DATA_CHUNK_BYTES_MAX)
            .collect();
        assert_eq!(
            SyncRequest::data(source.clone(), false),
            SyncRequest::Data(source.clone())
        );
        let req = SyncRequest::data(source.clone(), true);
        let SyncRequest::Packed(z) = &req else {
            panic!("source code was not packed: {req:?}");
        };
        assert!(
            z.len() < source.len() / 3,
            "{} of {}",
            z.len(),
            source.len()
        );
        assert_eq!(req.unpacked().unwrap(), SyncRequest::Data(source.clone()));
        let reply = SyncReply::data(source.clone(), true);
        assert_eq!(reply.unpacked().unwrap(), SyncReply::Data(source));
        // Random bytes do not shrink; the end chunk and tiny chunks are never packed.
        let noise = noise(1, 40_000);
        assert_eq!(
            SyncRequest::data(noise.clone(), true),
            SyncRequest::Data(noise)
        );
        assert_eq!(
            SyncRequest::data(Vec::new(), true),
            SyncRequest::Data(Vec::new())
        );
        assert_eq!(
            SyncReply::data(b"ab".to_vec(), true),
            SyncReply::Data(b"ab".to_vec())
        );
    }

    #[test]
    fn a_packed_chunk_that_is_too_big_empty_or_garbage_is_refused() {
        let bomb = zstd::bulk::compress(&vec![0u8; crate::DATA_CHUNK_BYTES_MAX + 1], 1).unwrap();
        assert!(bomb.len() < 100);
        assert!(SyncRequest::Packed(bomb).unpacked().is_err());
        let empty = zstd::bulk::compress(&[], 1).unwrap();
        let e = SyncReply::Packed(empty).unpacked().unwrap_err();
        assert!(e.contains("nothing"), "{e}");
        assert!(SyncReply::Packed(b"not zstd at all".to_vec())
            .unpacked()
            .is_err());
        let fits = zstd::bulk::compress(&vec![7u8; crate::DATA_CHUNK_BYTES_MAX], 1).unwrap();
        assert_eq!(
            SyncRequest::Packed(fits).unpacked().unwrap(),
            SyncRequest::Data(vec![7u8; crate::DATA_CHUNK_BYTES_MAX])
        );
    }

    #[test]
    fn lz4_packs_only_what_shrinks_and_comes_back_the_same() {
        let source: Vec<u8> = (0..2000)
            .flat_map(|i| format!("static int f{i}(void) {{ return {i}; }}\n").into_bytes())
            .take(crate::DATA_CHUNK_BYTES_MAX)
            .collect();
        let z = pack_lz4(source.clone()).expect("source code shrinks");
        assert!(
            z.len() < source.len() / 2,
            "{} of {}",
            z.len(),
            source.len()
        );
        assert_eq!(unpack_lz4(&z).unwrap(), source);
        let noise = noise(7, 40_000);
        assert_eq!(pack_lz4(noise.clone()), Err(noise));
        assert_eq!(pack_lz4(b"ab".to_vec()), Err(b"ab".to_vec()));
        let over = vec![0u8; crate::DATA_CHUNK_BYTES_MAX + 1];
        assert_eq!(pack_lz4(over.clone()), Err(over));
    }

    #[test]
    fn an_lz4_chunk_with_a_wrong_length_or_garbage_is_refused() {
        let zeros = vec![0u8; 1000];
        let block = lz4_flex::block::compress(&zeros);
        let with_len = |n: u32| [n.to_le_bytes().as_slice(), &block].concat();
        assert_eq!(unpack_lz4(&with_len(1000)).unwrap(), zeros);
        // A length over the chunk limit, none, or one the block does not fill.
        let e = unpack_lz4(&with_len(crate::DATA_CHUNK_BYTES_MAX as u32 + 1)).unwrap_err();
        assert!(e.contains("65537"), "{e}");
        assert!(unpack_lz4(&with_len(0)).is_err());
        assert!(unpack_lz4(&with_len(999)).is_err());
        assert!(unpack_lz4(&with_len(2000)).is_err());
        assert!(unpack_lz4(&[1, 0]).is_err());
        assert!(unpack_lz4(&[16, 0, 0, 0, 0xff, 0xff, 0xff]).is_err());
        // More than the limit, however it claims its length.
        let bomb = lz4_flex::block::compress(&vec![0u8; crate::DATA_CHUNK_BYTES_MAX + 1]);
        let bomb = [
            (crate::DATA_CHUNK_BYTES_MAX as u32)
                .to_le_bytes()
                .as_slice(),
            &bomb,
        ]
        .concat();
        assert!(unpack_lz4(&bomb).is_err());
    }
}
