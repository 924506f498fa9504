//! rsync-style deltas, so an edit to a large file moves only the changed blocks.
//!
//! The receiver, which holds the old version (the basis), sends a [`Signature`]: per block a
//! weak rolling checksum and a strong hash. The sender slides a window over the new version
//! (the target) one byte at a time, rolling the weak checksum; a weak hit confirmed by the
//! strong hash becomes a copy of that basis block, everything else a literal. The receiver
//! [`patch`]es the basis, bounded by a maximum output size, and checks the result's blake3
//! hash, which the [`Delta`] carries.
//!
//! - Block size ([`block_bytes_for`]): twice rsync's. [`BLOCK_BYTES_MIN`] (700 B) up to a
//!   122,500 B basis; above that `2·sqrt(len)` rounded down to a multiple of 8, capped at
//!   [`BLOCK_BYTES_MAX`] (128 KiB, reached at 4 GiB). So a signature has about
//!   `sqrt(len)/2` blocks and a changed byte costs one block of literal: for the usual small
//!   edit of a large file, half rsync's signature outweighs the larger literal (a 1 KiB edit
//!   of 100 MiB: 5,120 blocks of 12 bytes, one or two 20 KiB blocks of literal).
//! - Weak checksum: rsync's Adler-32 variant, two 16-bit sums packed in a `u32`, sent as 4
//!   fixed bytes.
//! - Strong hash: blake3 truncated to [`STRONG_BYTES`] (8) bytes, as rsync truncates its
//!   own. A false match needs a 32-bit weak match and a 64-bit strong collision; the
//!   whole-file hash catches any wrong result, and the shells then move that file whole.
//!
//! Everything is a value in memory; the shells feed files in and out.

use serde::{Deserialize, Serialize};

use crate::tree::{content_hash, ContentHash};

/// Smallest block, in bytes (rsync's `BLOCK_SIZE`).
pub const BLOCK_BYTES_MIN: u32 = 700;
/// Largest block, in bytes (rsync's `MAX_BLOCK_SIZE`).
pub const BLOCK_BYTES_MAX: u32 = 128 * 1024;
/// Up to this basis size, blocks are [`BLOCK_BYTES_MIN`] (where `2·sqrt` reaches it).
pub const SMALL_BASIS_BYTES_MAX: u64 = 122_500;
/// Bytes of blake3 kept per block.
pub const STRONG_BYTES: usize = 8;
/// Largest literal op, in bytes, so each op fits a frame on its own.
pub const LITERAL_BYTES_MAX: usize = 64 * 1024;
/// At most this many weak-checksum candidates are compared per target offset, so a basis
/// crafted with many equal weak sums cannot make delta quadratic (it can only miss matches).
pub const CANDIDATES_PER_OFFSET_MAX: usize = 1024;
/// Initial allocation cap of [`patch`], in bytes; the output grows past it only as data
/// actually arrives.
const PATCH_RESERVE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Block size for a basis of `basis_bytes` (see the module doc).
pub fn block_bytes_for(basis_bytes: u64) -> u32 {
    if basis_bytes <= SMALL_BASIS_BYTES_MAX {
        return BLOCK_BYTES_MIN;
    }
    let root = (basis_bytes.isqrt() * 2) & !7;
    root.clamp(u64::from(BLOCK_BYTES_MIN), u64::from(BLOCK_BYTES_MAX)) as u32
}

/// Checksums of one basis block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSum {
    #[serde(with = "fixed_u32")]
    pub weak: u32,
    pub strong: [u8; STRONG_BYTES],
}

/// A `u32` as 4 fixed bytes: a rolling checksum is uniformly spread, so the codec's
/// variable-length integers would spend 5 bytes on most.
mod fixed_u32 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
        v.to_le_bytes().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        <[u8; 4]>::deserialize(d).map(u32::from_le_bytes)
    }
}

/// Why a received signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The block size is outside `BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX`.
    #[error("block size {0} is outside {BLOCK_BYTES_MIN}..={BLOCK_BYTES_MAX}")]
    BlockBytes(u32),
    /// The number of blocks does not match the basis size.
    #[error(
        "{blocks} blocks do not cover a {basis_bytes} byte basis in {block_bytes} byte blocks"
    )]
    BlockCount {
        blocks: usize,
        basis_bytes: u64,
        block_bytes: u32,
    },
}

/// The receiver's summary of its basis. Fields are private so every signature, including
/// one deserialized from a peer, has a valid block size and block count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SignatureParts")]
pub struct Signature {
    block_bytes: u32,
    basis_bytes: u64,
    blocks: Vec<BlockSum>,
}

#[derive(Deserialize)]
struct SignatureParts {
    block_bytes: u32,
    basis_bytes: u64,
    blocks: Vec<BlockSum>,
}

impl TryFrom<SignatureParts> for Signature {
    type Error = SignatureError;
    fn try_from(p: SignatureParts) -> Result<Self, SignatureError> {
        if !(BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX).contains(&p.block_bytes) {
            return Err(SignatureError::BlockBytes(p.block_bytes));
        }
        if p.blocks.len() as u64 != p.basis_bytes.div_ceil(u64::from(p.block_bytes)) {
            return Err(SignatureError::BlockCount {
                blocks: p.blocks.len(),
                basis_bytes: p.basis_bytes,
                block_bytes: p.block_bytes,
            });
        }
        Ok(Signature {
            block_bytes: p.block_bytes,
            basis_bytes: p.basis_bytes,
            blocks: p.blocks,
        })
    }
}

impl Signature {
    /// Block size in bytes.
    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    /// Size of the basis in bytes.
    pub fn basis_bytes(&self) -> u64 {
        self.basis_bytes
    }

    /// Per-block checksums, in order (the last block may be short).
    pub fn blocks(&self) -> &[BlockSum] {
        &self.blocks
    }
}

/// One step of rebuilding the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaOp {
    /// Copy `len` bytes of the basis starting at `offset`.
    Copy { offset: u64, len: u64 },
    /// Bytes not found in the basis (at most [`LITERAL_BYTES_MAX`]).
    Literal(Vec<u8>),
}

/// How to turn the basis into the target, and what the target must hash to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub ops: Vec<DeltaOp>,
    pub target_bytes: u64,
    pub target_hash: ContentHash,
}

impl Delta {
    /// Total literal bytes (what the delta costs on the wire, roughly).
    pub fn literal_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                DeltaOp::Literal(b) => b.len() as u64,
                DeltaOp::Copy { .. } => 0,
            })
            .sum()
    }
}

/// Why a delta could not be applied. Each means a corrupt or malicious delta, or a basis
/// that changed since its signature: fall back to a whole-file transfer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The delta announces a target larger than the caller allows.
    #[error("target of {target_bytes} bytes exceeds the {max_bytes} byte limit")]
    TooLarge { target_bytes: u64, max_bytes: u64 },
    /// A copy reaches past the end of the basis.
    #[error("copy of {len} bytes at offset {offset} is outside the {basis_bytes} byte basis")]
    CopyOutOfRange {
        offset: u64,
        len: u64,
        basis_bytes: u64,
    },
    /// The ops produce more bytes than the delta announced.
    #[error("ops produce more than the announced {target_bytes} bytes")]
    Overrun { target_bytes: u64 },
    /// The ops produce fewer bytes than the delta announced.
    #[error("ops produce {got_bytes} bytes, {target_bytes} announced")]
    Short { got_bytes: u64, target_bytes: u64 },
    /// The result does not hash to the announced hash.
    #[error("result hash {got} does not match the announced {want}")]
    HashMismatch { got: String, want: String },
}

/// Whether an apply error (as text: errors cross the wire as messages) says that a patched
/// result did not hash to what the delta announced: a false block match, or a basis that
/// changed under the delta. Other failures (a file that changed since the scan) are not.
pub fn is_wrong_result(error: &str) -> bool {
    error.contains("does not match the announced")
}

/// Rolling weak checksum over a window (rsync's `get_checksum1` with `CHAR_OFFSET` 0).
#[derive(Clone, Copy, Debug)]
struct Rolling {
    s1: u32,
    s2: u32,
    len: u32,
}

impl Rolling {
    fn new(window: &[u8]) -> Self {
        let (mut s1, mut s2) = (0u32, 0u32);
        for &b in window {
            s1 = s1.wrapping_add(u32::from(b));
            s2 = s2.wrapping_add(s1);
        }
        Rolling {
            s1,
            s2,
            len: window.len() as u32,
        }
    }

    /// Slides the window one byte: `out` leaves at the front, `inn` enters at the back.
    fn roll(&mut self, out: u8, inn: u8) {
        self.s1 = self
            .s1
            .wrapping_sub(u32::from(out))
            .wrapping_add(u32::from(inn));
        self.s2 = self
            .s2
            .wrapping_sub(self.len.wrapping_mul(u32::from(out)))
            .wrapping_add(self.s1);
    }

    fn value(&self) -> u32 {
        (self.s1 & 0xffff) | (self.s2 << 16)
    }
}

fn strong(data: &[u8]) -> [u8; STRONG_BYTES] {
    let full = blake3::hash(data);
    let mut out = [0u8; STRONG_BYTES];
    out.copy_from_slice(&full.as_bytes()[..STRONG_BYTES]);
    out
}

/// The signature of `basis`.
pub fn signature(basis: &[u8]) -> Signature {
    let basis_bytes = basis.len() as u64;
    let block_bytes = block_bytes_for(basis_bytes);
    let blocks = basis
        .chunks(block_bytes as usize)
        .map(|block| BlockSum {
            weak: Rolling::new(block).value(),
            strong: strong(block),
        })
        .collect();
    Signature {
        block_bytes,
        basis_bytes,
        blocks,
    }
}

const BUCKETS: usize = 1 << 16;
const NONE: u32 = u32::MAX;

/// Weak-checksum lookup: 2^16 bucket heads chaining block indices (rsync's table). A flat
/// table rather than a `HashMap`: deterministic and allocation-free per lookup.
struct Table {
    heads: Vec<u32>,
    next: Vec<u32>,
}

impl Table {
    fn new(blocks: &[BlockSum]) -> Self {
        let mut heads = vec![NONE; BUCKETS];
        let mut next = vec![NONE; blocks.len()];
        // Insert in reverse so each chain lists lower block indices first.
        for (i, b) in blocks.iter().enumerate().rev() {
            let bucket = bucket(b.weak);
            next[i] = heads[bucket];
            heads[bucket] = i as u32;
        }
        Table { heads, next }
    }
}

fn bucket(weak: u32) -> usize {
    ((weak ^ (weak >> 16)) & 0xffff) as usize
}

/// Collects ops, merging adjacent copies and literals.
#[derive(Default)]
struct Builder {
    ops: Vec<DeltaOp>,
}

impl Builder {
    fn copy(&mut self, offset: u64, len: u64) {
        if let Some(DeltaOp::Copy { offset: o, len: l }) = self.ops.last_mut() {
            if *o + *l == offset {
                *l += len;
                return;
            }
        }
        self.ops.push(DeltaOp::Copy { offset, len });
    }

    fn literal(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if let Some(DeltaOp::Literal(last)) = self.ops.last_mut() {
                let room = LITERAL_BYTES_MAX - last.len();
                if room > 0 {
                    let n = room.min(bytes.len());
                    last.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    continue;
                }
            }
            let n = LITERAL_BYTES_MAX.min(bytes.len());
            self.ops.push(DeltaOp::Literal(bytes[..n].to_vec()));
            bytes = &bytes[n..];
        }
    }
}

/// The delta that turns the basis described by `sig` into `target`.
pub fn delta(sig: &Signature, target: &[u8]) -> Delta {
    let b = sig.block_bytes as usize;
    let n = target.len();
    let full_blocks = (sig.basis_bytes / sig.block_bytes as u64) as usize;
    let table = Table::new(&sig.blocks[..full_blocks]);
    let mut out = Builder::default();
    let mut lit_start = 0usize;
    let mut i = 0usize;
    let mut roll: Option<Rolling> = None;
    // Offset in the basis right after the last copy: that block is preferred, so runs of
    // unchanged blocks coalesce into one copy.
    let mut next_offset: Option<u64> = None;
    while full_blocks > 0 && i + b <= n {
        let window = &target[i..i + b];
        let r = *roll.get_or_insert_with(|| Rolling::new(window));
        if let Some(block) = find(sig, &table, r.value(), window, next_offset) {
            out.literal(&target[lit_start..i]);
            let offset = block as u64 * b as u64;
            out.copy(offset, b as u64);
            next_offset = Some(offset + b as u64);
            i += b;
            lit_start = i;
            roll = None;
            continue;
        }
        if i + b < n {
            if let Some(r) = roll.as_mut() {
                r.roll(target[i], target[i + b]);
            }
        }
        i += 1;
    }
    // The basis's short last block can only match the target's end.
    let tail_bytes = (sig.basis_bytes % sig.block_bytes as u64) as usize;
    if tail_bytes > 0 && n >= tail_bytes && n - tail_bytes >= lit_start {
        let window = &target[n - tail_bytes..];
        let tail = &sig.blocks[full_blocks];
        if tail.weak == Rolling::new(window).value() && tail.strong == strong(window) {
            out.literal(&target[lit_start..n - tail_bytes]);
            out.copy(full_blocks as u64 * b as u64, tail_bytes as u64);
            lit_start = n;
        }
    }
    out.literal(&target[lit_start..]);
    Delta {
        ops: out.ops,
        target_bytes: n as u64,
        target_hash: content_hash(target),
    }
}

fn find(
    sig: &Signature,
    table: &Table,
    weak: u32,
    window: &[u8],
    preferred_offset: Option<u64>,
) -> Option<usize> {
    let mut window_strong: Option<[u8; STRONG_BYTES]> = None;
    let mut matches = |block: usize| {
        let sum = &sig.blocks[block];
        sum.weak == weak && sum.strong == *window_strong.get_or_insert_with(|| strong(window))
    };
    if let Some(offset) = preferred_offset {
        let block = (offset / u64::from(sig.block_bytes)) as usize;
        if block < table.next.len() && matches(block) {
            return Some(block);
        }
    }
    let mut cur = table.heads[bucket(weak)];
    let mut steps = 0;
    while cur != NONE && steps < CANDIDATES_PER_OFFSET_MAX {
        let block = cur as usize;
        if matches(block) {
            return Some(block);
        }
        cur = table.next[block];
        steps += 1;
    }
    None
}

/// Rebuilds the target from `basis` and `delta`, producing at most `output_bytes_max`
/// bytes, and checks the announced length and hash. Never panics and never allocates more
/// than the output actually written (plus a bounded initial reserve), whatever the delta.
pub fn patch(basis: &[u8], delta: &Delta, output_bytes_max: u64) -> Result<Vec<u8>, PatchError> {
    let target_bytes = delta.target_bytes;
    if target_bytes > output_bytes_max {
        return Err(PatchError::TooLarge {
            target_bytes,
            max_bytes: output_bytes_max,
        });
    }
    let mut out = Vec::with_capacity(target_bytes.min(PATCH_RESERVE_BYTES_MAX) as usize);
    for op in &delta.ops {
        let piece: &[u8] = match op {
            DeltaOp::Copy { offset, len } => {
                let out_of_range = || PatchError::CopyOutOfRange {
                    offset: *offset,
                    len: *len,
                    basis_bytes: basis.len() as u64,
                };
                let end = offset.checked_add(*len).ok_or_else(out_of_range)?;
                if end > basis.len() as u64 {
                    return Err(out_of_range());
                }
                // Both bounds are within `basis.len()`, which fits a usize.
                &basis[*offset as usize..end as usize]
            }
            DeltaOp::Literal(bytes) => bytes,
        };
        if out.len() as u64 + piece.len() as u64 > target_bytes {
            return Err(PatchError::Overrun { target_bytes });
        }
        out.extend_from_slice(piece);
    }
    if out.len() as u64 != target_bytes {
        return Err(PatchError::Short {
            got_bytes: out.len() as u64,
            target_bytes,
        });
    }
    let got = content_hash(&out);
    if got != delta.target_hash {
        return Err(PatchError::HashMismatch {
            got: short_hex(&got),
            want: short_hex(&delta.target_hash),
        });
    }
    Ok(out)
}

/// Whether `data` hashes to `expected` (whole-file verification after any transfer).
pub fn verify(data: &[u8], expected: &ContentHash) -> bool {
    content_hash(data) == *expected
}

/// The first 8 bytes of a hash in hex, for messages.
pub fn short_hex(hash: &ContentHash) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round-trips `target` against `basis` and checks the literal bytes sent.
    fn check(basis: &[u8], target: &[u8], literal_bytes_max: u64) {
        let sig = signature(basis);
        let d = delta(&sig, target);
        let got = patch(basis, &d, target.len() as u64).expect("patch");
        assert!(got == target, "round trip differs");
        assert!(
            d.literal_bytes() <= literal_bytes_max,
            "{} literal bytes, expected at most {literal_bytes_max}",
            d.literal_bytes()
        );
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn only_a_wrong_result_counts_as_one() {
        let wrong = PatchError::HashMismatch {
            got: "a".into(),
            want: "b".into(),
        };
        assert!(is_wrong_result(&format!("big.bin: {wrong}")));
        let short = PatchError::Short {
            got_bytes: 1,
            target_bytes: 2,
        };
        assert!(!is_wrong_result(&short.to_string()));
        assert!(!is_wrong_result("big.bin changed since the scan"));
    }

    #[test]
    fn block_size_rule() {
        let cases = [
            (0, 700),
            (122_500, 700),
            (122_501, 700),
            (1_000_000, 2000),
            (10 * 1024 * 1024, 6472),
            (100 << 20, 20480),
            (1 << 32, 128 * 1024),
            (u64::MAX, 128 * 1024),
        ];
        for (len, want) in cases {
            assert_eq!(block_bytes_for(len), want, "len {len}");
        }
    }

    #[test]
    fn rolling_matches_fresh() {
        let data = pseudo_random(3000, 7);
        let w = 700;
        let mut r = Rolling::new(&data[..w]);
        for i in 0..data.len() - w {
            r.roll(data[i], data[i + w]);
            assert_eq!(
                r.value(),
                Rolling::new(&data[i + 1..i + 1 + w]).value(),
                "at {i}"
            );
        }
    }

    #[test]
    fn round_trip_table() {
        let base = pseudo_random(100_000, 1);
        let mut insert = base.clone();
        insert.splice(500..500, b"inserted bytes".iter().copied());
        let mut delete = base.clone();
        delete.drain(40_000..40_100);
        let mut append = base.clone();
        append.extend_from_slice(b"tail");
        check(b"", b"", 0);
        check(b"", b"abc", 3);
        check(b"abc", b"", 0);
        check(&base, &base, 0);
        check(&base, &insert, 2 * 700);
        check(&base, &delete, 2 * 700);
        check(&base, &append, 700 + 4);
        check(&base, &base[..50_000], 700);
        check(&base, &pseudo_random(5000, 9), 5000);
        check(&[0u8; 10_000], &[0u8; 20_000], 700);
    }

    #[test]
    fn adjacent_copies_coalesce() {
        let base = pseudo_random(100_000, 3);
        let d = delta(&signature(&base), &base);
        assert_eq!(
            d.ops,
            vec![DeltaOp::Copy {
                offset: 0,
                len: 100_000
            }]
        );
    }

    #[test]
    fn one_kib_edit_in_ten_mib_is_small() {
        let base = pseudo_random(10 * 1024 * 1024, 5);
        let mut target = base.clone();
        for b in &mut target[5_000_000..5_001_024] {
            *b = !*b;
        }
        let d = delta(&signature(&base), &target);
        assert!(
            d.literal_bytes() < 64 * 1024,
            "{} literal bytes",
            d.literal_bytes()
        );
        assert_eq!(patch(&base, &d, u64::MAX).unwrap(), target);
    }

    #[test]
    fn hostile_deltas_are_errors() {
        let basis = b"hello world".to_vec();
        let good = delta(&signature(&basis), b"hello world!");
        let check_err = |d: Delta, max: u64, msg: &str| {
            let e = patch(&basis, &d, max).unwrap_err();
            assert!(e.to_string().contains(msg), "{e} should contain {msg:?}");
        };
        check_err(good.clone(), 5, "exceeds the 5 byte limit");
        let mut d = good.clone();
        d.ops = vec![DeltaOp::Copy {
            offset: u64::MAX,
            len: 2,
        }];
        check_err(d, 100, "outside the 11 byte basis");
        let mut d = good.clone();
        d.ops = vec![DeltaOp::Copy { offset: 5, len: 7 }];
        check_err(d, 100, "offset 5 is outside");
        let mut d = good.clone();
        d.ops.push(DeltaOp::Literal(vec![0; 3]));
        check_err(d, 100, "more than the announced 12");
        let mut d = good.clone();
        d.target_bytes = u64::MAX;
        check_err(d, u64::MAX, "announced");
        let mut d = good.clone();
        d.target_hash = [0; 32];
        check_err(d, 100, "does not match");
    }

    #[test]
    fn hostile_signatures_are_refused() {
        let json = |bb: u32, basis: u64, n: usize| {
            let blocks: Vec<BlockSum> = vec![
                BlockSum {
                    weak: 0,
                    strong: [0; STRONG_BYTES]
                };
                n
            ];
            let v = serde_json::json!({"block_bytes": bb, "basis_bytes": basis, "blocks": blocks});
            serde_json::from_value::<Signature>(v).map(|_| ())
        };
        assert!(json(700, 1400, 2).is_ok());
        assert!(json(0, 0, 0)
            .unwrap_err()
            .to_string()
            .contains("block size 0"));
        assert!(json(700, 1401, 2)
            .unwrap_err()
            .to_string()
            .contains("2 blocks"));
        // Many blocks with one weak sum and a target that never matches: still linear.
        let sig: Signature = serde_json::from_value(serde_json::json!({
            "block_bytes": 700, "basis_bytes": 700 * 5000,
            "blocks": vec![BlockSum { weak: Rolling::new(&[0u8; 700]).value(), strong: [1; STRONG_BYTES] }; 5000],
        }))
        .unwrap();
        let d = delta(&sig, &[0u8; 20_000]);
        assert_eq!(d.literal_bytes(), 20_000);
    }
}
