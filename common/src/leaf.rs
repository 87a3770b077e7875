//! Leaves and batch-index lists: what the Merkle tree commits to for each step.
//!
//! Leaf `t` commits step `t`: the hash of the FP32 state after the step, the hash of the step's
//! tie-break log and the hash of the batch indices it used. Leaf 0 commits the initial state,
//! with the hashes of an empty log and an empty batch. The log's hash is inside the leaf, so a
//! log cannot be changed after its step is committed.
//!
//! # Encodings (version 1)
//! ```text
//! leaf entry:  "TBLF" | version: u8 = 1 | step: u64 LE | state: 32 | log: 32 | batch: 32   (109 bytes)
//! batch:       "TBBI" | version: u8 = 1 | n: varint | n × varint index | crc32: u32 LE
//! ```
//! The Merkle leaf hash is `SHA-256(0x00 ‖ leaf entry)` (see `merkle`).

use crate::codec::{self, DecodeError, Hash, Reader, put_varint};
use crate::tielog::TieBreakLog;

const LEAF_MAGIC: &[u8; 4] = b"TBLF";
const BATCH_MAGIC: &[u8; 4] = b"TBBI";
const VERSION: u8 = 1;
/// Size of an encoded leaf entry.
pub const LEAF_BYTES: usize = 4 + 1 + 8 + 32 * 3;

/// The commitment to one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    pub step: u64,
    pub state: Hash,
    pub log: Hash,
    pub batch: Hash,
}

impl Leaf {
    /// The leaf of the initial state (step 0): empty log, empty batch.
    pub fn initial(state: Hash) -> Self {
        Leaf { step: 0, state, log: TieBreakLog::default().digest(), batch: BatchIndices::default().digest() }
    }

    /// The entry bytes appended to the Merkle tree.
    pub fn encode(&self) -> [u8; LEAF_BYTES] {
        let mut out = [0u8; LEAF_BYTES];
        out[..4].copy_from_slice(LEAF_MAGIC);
        out[4] = VERSION;
        out[5..13].copy_from_slice(&self.step.to_le_bytes());
        out[13..45].copy_from_slice(&self.state);
        out[45..77].copy_from_slice(&self.log);
        out[77..109].copy_from_slice(&self.batch);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.bytes(4, "leaf magic")? != LEAF_MAGIC {
            return Err(DecodeError { what: "not a leaf (bad magic)".into(), offset: 0 });
        }
        let v = r.u8("leaf version")?;
        if v != VERSION {
            return Err(DecodeError { what: format!("unsupported leaf version {v}"), offset: 4 });
        }
        let leaf = Leaf {
            step: r.u64_le("step")?,
            state: r.hash("state hash")?,
            log: r.hash("log hash")?,
            batch: r.hash("batch hash")?,
        };
        r.finish("leaf")?;
        Ok(leaf)
    }
}

/// The example indices a step trained on, in the order used.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchIndices(pub Vec<u64>);

impl BatchIndices {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.0.len() * 3);
        out.extend_from_slice(BATCH_MAGIC);
        out.push(VERSION);
        put_varint(&mut out, self.0.len() as u64);
        for &i in &self.0 {
            put_varint(&mut out, i);
        }
        codec::put_crc(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let body = codec::check_crc(bytes, "batch indices")?;
        let mut r = Reader::new(body);
        if r.bytes(4, "batch magic")? != BATCH_MAGIC {
            return Err(DecodeError { what: "not a batch-index list (bad magic)".into(), offset: 0 });
        }
        let v = r.u8("batch version")?;
        if v != VERSION {
            return Err(DecodeError { what: format!("unsupported batch version {v}"), offset: 4 });
        }
        let n = r.count("batch size", 1)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(r.varint("batch index")?);
        }
        r.finish("batch indices")?;
        Ok(BatchIndices(out))
    }

    /// SHA-256 of the canonical encoding.
    pub fn digest(&self) -> Hash {
        codec::sha256(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_round_trips_and_has_fixed_size() {
        let leaf = Leaf { step: 42, state: [1; 32], log: [2; 32], batch: [3; 32] };
        let enc = leaf.encode();
        assert_eq!(enc.len(), 109);
        assert_eq!(Leaf::decode(&enc).unwrap(), leaf);
        assert!(Leaf::decode(&enc[..108]).is_err());
        let mut bad = enc;
        bad[0] = b'X';
        assert!(Leaf::decode(&bad).is_err());
    }

    #[test]
    fn batch_detects_every_truncation_and_flip() {
        let b = BatchIndices(vec![0, 5, 8999, 1 << 33, 17]);
        let enc = b.encode();
        assert_eq!(BatchIndices::decode(&enc).unwrap(), b);
        for cut in 0..enc.len() {
            assert!(BatchIndices::decode(&enc[..cut]).is_err());
        }
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(BatchIndices::decode(&bad).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn initial_leaf_commits_empty_log_and_batch() {
        let l = Leaf::initial([9; 32]);
        assert_eq!(l.step, 0);
        assert_eq!(l.log, TieBreakLog::default().digest());
        assert_ne!(l.log, l.batch, "domain-separated encodings");
    }
}
