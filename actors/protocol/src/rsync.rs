//! Messages of a `cs rsync` stream: the laptop drives, the agent lists, receives (a push) or
//! sends (a pull) inside one root in the workspace home.
//!
//! Requests are answered in order. Large things move in chunks so that no frame exceeds
//! [`crate::FRAME_BYTES_MAX`]: a listing as packed `Listing` parts ended by `ListingEnd`
//! (see [`pack_listing`]), content as
//! `Data` chunks of at most [`crate::DATA_CHUNK_BYTES_MAX`] (ended by `PutEnd` one way and by an
//! empty chunk and `DataEnd` the other), deltas as
//! `DeltaPart`s ended by `DeltaEnd`.

use cs_sync::delta::{DeltaOp, Signature};
use cs_sync::rsync::{Entry, FileAttrs, Op};
use serde::{Deserialize, Serialize};

pub use crate::sync::Packing;

/// Encoded bytes of entries per `Listing` frame, before packing (the last entry may take a
/// chunk past it; one entry is at most a few KiB, so a chunk stays far below
/// [`crate::FRAME_BYTES_MAX`], which bounds what a chunk may unpack to).
pub const LISTING_CHUNK_BYTES: usize = 256 * 1024;
/// zstd level of a packed listing: a tree's paths repeat their directories, so a listing
/// packs about fivefold, and at this level a kernel tree's 4.7 MB take tens of milliseconds.
const LISTING_PACK_LEVEL: i32 = 3;
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
        /// The file's own attributes when its `Attrs` op follows it in the plan (set on the
        /// new file before it goes in place; the op itself is then not sent).
        attrs: Option<FileAttrs>,
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
    /// The end of a `PutDelta`, with the file's attributes as in `PutEnd`.
    DeltaEnd(Option<FileAttrs>),
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
    /// A `Data` chunk packed with zstd ([`crate::sync::pack`]): sent instead of `Data` when
    /// the agent said `Opened { pack: true }` and the chunk shrinks.
    Packed(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A `Data` chunk packed with LZ4 ([`crate::sync::pack_lz4`]): sent instead of `Data` when
    /// the agent said `Opened { pack: Packing::Lz4 }` and the chunk shrinks.
    Lz4(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl RsyncRequest {
    /// A chunk of a file's content: packed as the stream's `pack` says if that is worth it,
    /// else `Data`.
    pub fn data(chunk: Vec<u8>, pack: Packing) -> Self {
        match pack {
            Packing::Raw => Self::Data(chunk),
            Packing::Zstd => crate::sync::pack(chunk).map_or_else(Self::Data, Self::Packed),
            Packing::Lz4 => crate::sync::pack_lz4(chunk).map_or_else(Self::Data, Self::Lz4),
        }
    }

    /// The request with a packed chunk unpacked to `Data`; other requests unchanged.
    pub fn unpacked(self) -> Result<Self, String> {
        match self {
            Self::Packed(z) => crate::sync::unpack(&z).map(Self::Data),
            Self::Lz4(z) => crate::sync::unpack_lz4(&z).map(Self::Data),
            other => Ok(other),
        }
    }
}

/// The agent's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RsyncReply {
    /// The stream's first frame: the root is accepted (or `Error`). `pack`: how content goes
    /// both ways: `Lz4` chunks on a near link, `Packed` (zstd) chunks on a distant one
    /// ([`crate::sync::PACK_RTT_MS_MIN`]).
    Opened {
        pack: Packing,
    },
    /// Part of a listing, packed ([`pack_listing`]).
    Listing(#[serde(with = "serde_bytes")] Vec<u8>),
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
    /// A `Data` chunk packed with zstd, as [`RsyncRequest::Packed`].
    Packed(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A `Data` chunk packed with LZ4, as [`RsyncRequest::Lz4`].
    Lz4(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl RsyncReply {
    /// A chunk of a file's content, as [`RsyncRequest::data`].
    pub fn data(chunk: Vec<u8>, pack: Packing) -> Self {
        match pack {
            Packing::Raw => Self::Data(chunk),
            Packing::Zstd => crate::sync::pack(chunk).map_or_else(Self::Data, Self::Packed),
            Packing::Lz4 => crate::sync::pack_lz4(chunk).map_or_else(Self::Data, Self::Lz4),
        }
    }

    /// The reply with a packed chunk unpacked to `Data`; other replies unchanged.
    pub fn unpacked(self) -> Result<Self, String> {
        match self {
            Self::Packed(z) => crate::sync::unpack(&z).map(Self::Data),
            Self::Lz4(z) => crate::sync::unpack_lz4(&z).map(Self::Data),
            other => Ok(other),
        }
    }
}

/// The listing `entries` as packed `Listing` chunks: each chunk is the encoded entries (at
/// least one, about [`LISTING_CHUNK_BYTES`]) compressed with zstd. Full paths in a listing
/// repeat their directories entry after entry: packed, a kernel tree's listing takes fewer
/// bytes than rsync's prefix-coded file list.
pub fn pack_listing(entries: &[Entry]) -> Result<Vec<Vec<u8>>, String> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        // Grow the chunk until its entries' encoding reaches the target (estimated from the
        // paths, then encoded once).
        let mut end = start;
        let mut estimate = 0;
        while end < entries.len() && (end == start || estimate < LISTING_CHUNK_BYTES) {
            let e = &entries[end];
            estimate += 24 + e.path.len() + e.target.as_ref().map_or(0, String::len);
            estimate += if e.hash.is_some() { 33 } else { 1 };
            end += 1;
        }
        let encoded = crate::codec::encode_frame(&entries[start..end].to_vec())
            .map_err(|e| format!("cannot encode a listing: {e}"))?;
        let packed = zstd::bulk::compress(
            &encoded[crate::codec::FRAME_HEADER_BYTES..],
            LISTING_PACK_LEVEL,
        )
        .map_err(|e| format!("cannot pack a listing: {e}"))?;
        chunks.push(packed);
        start = end;
    }
    Ok(chunks)
}

/// The entries of a packed `Listing` chunk. It must unpack to at most
/// [`crate::FRAME_BYTES_MAX`] bytes of valid entries: anything else is a malformed message.
pub fn unpack_listing(packed: &[u8]) -> Result<Vec<Entry>, String> {
    let raw = zstd::bulk::decompress(packed, crate::FRAME_BYTES_MAX)
        .map_err(|e| format!("a listing chunk does not unpack: {e}"))?;
    crate::codec::decode(&raw).map_err(|e| format!("a listing chunk is malformed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cs_sync::rsync::Kind;

    fn entry(i: usize) -> Entry {
        Entry {
            path: format!("drivers/net/ethernet/vendor{}/chip/file{i}.c", i / 100),
            kind: Kind::File,
            size: i as u64 * 37,
            mtime: 1_700_000_000 + i as i64,
            mtime_nsec: 0,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            target: None,
            hash: i.is_multiple_of(3).then_some([i as u8; 32]),
        }
    }

    #[test]
    fn a_listing_packs_into_bounded_chunks_and_back() {
        let entries: Vec<Entry> = (0..30_000).map(entry).collect();
        let chunks = pack_listing(&entries).unwrap();
        assert!(chunks.len() > 1, "{} chunks", chunks.len());
        let mut back = Vec::new();
        let mut packed = 0;
        for c in &chunks {
            packed += c.len();
            let raw = zstd::bulk::decompress(c, crate::FRAME_BYTES_MAX).unwrap();
            assert!(raw.len() <= LISTING_CHUNK_BYTES + 4096, "{}", raw.len());
            back.extend(unpack_listing(c).unwrap());
        }
        assert_eq!(back, entries);
        let raw = crate::codec::encode_state(&entries).unwrap().len();
        assert!(packed * 4 < raw, "packed {packed} of {raw}");
        assert!(pack_listing(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_bad_listing_chunk_is_refused() {
        assert!(unpack_listing(b"not zstd").is_err());
        let bomb = zstd::bulk::compress(&vec![0u8; crate::FRAME_BYTES_MAX + 1], 1).unwrap();
        assert!(unpack_listing(&bomb).is_err());
        let garbage = zstd::bulk::compress(&[0xff; 100], 1).unwrap();
        assert!(unpack_listing(&garbage).is_err());
    }
}
