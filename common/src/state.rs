//! Canonical FP32 training states: what a leaf's state hash commits to and what a checkpoint
//! stores.
//!
//! A state is the step counter plus named FP32 tensors: model parameters (`param/<name>`) and
//! optimizer state (`opt/<name>/<slot>`, e.g. `opt/fc1.weight/m`). Tensors live in a `BTreeMap`,
//! so the encoding is in name order whatever order they were inserted in.
//!
//! # Canonical encoding (version 1)
//! ```text
//! "TBST" | version: u8 = 1 | step: u64 LE | n_tensors: u32 LE
//! per tensor, by name: name_len: u16 LE | name (printable ASCII) | rank: u8 |
//!                      dims: rank × u64 LE | data: Π dims × f32 LE (raw IEEE bits)
//! ```
//! The state hash ([`StateHash`]) is a hash of this encoding, computed in a streaming pass:
//! SHA-256 in records of format 3, BLAKE3 from format 4. A state is hashed after every step;
//! BLAKE3 runs at several GB/s on one core with or without the CPU's SHA extensions, where
//! SHA-256 runs at about 2 GB/s with them and a fraction of that without. The record's spec
//! names its format, so every reader picks the hash per record. Values are hashed as their FP32
//! bits, with no further conversion; NaN and infinities never reach a state (the rounding step
//! refuses them).

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use crate::codec::{DecodeError, Hash, Reader};

/// Which hash a leaf's state hash is: fixed by the record's format (its spec says which), so a
/// state is only ever compared with a leaf through the hash of that leaf's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateHash {
    /// Records of format 3.
    Sha256,
    /// Records of format 4 on.
    Blake3,
}

impl StateHash {
    /// The state hash of a state's canonical encoding ([`TrainingState::encode`]): equal to
    /// [`TrainingState::digest`] of the state it encodes. What a checkpoint's bytes are checked
    /// against.
    pub fn of(self, canonical: &[u8]) -> Hash {
        self.streamed(|feed| feed(canonical))
    }

    /// The hash of every piece `write` feeds it, in order (pieces of [`PARALLEL_HASH_BYTES`] or
    /// more hashed on all threads where the hash allows it, the same value at any thread count).
    fn streamed(self, write: impl FnOnce(&mut dyn FnMut(&[u8]))) -> Hash {
        match self {
            StateHash::Sha256 => {
                let mut h = Sha256::new();
                write(&mut |b| h.update(b));
                h.finalize().into()
            }
            StateHash::Blake3 => {
                let mut h = blake3::Hasher::new();
                write(&mut |b| blake3_update(&mut h, b));
                *h.finalize().as_bytes()
            }
        }
    }

    /// The hash's name, as the export's metadata and error messages write it.
    pub fn name(self) -> &'static str {
        match self {
            StateHash::Sha256 => "sha256",
            StateHash::Blake3 => "blake3",
        }
    }
}

/// Feeds FP32 values to `sink` as their little-endian IEEE bits: on a little-endian CPU the
/// values as they lie in memory, in one piece (no copy); elsewhere converted in 64 KiB pieces.
#[cfg(target_endian = "little")]
fn write_values(values: &[f32], sink: &mut (impl FnMut(&[u8]) + ?Sized)) {
    sink(bytemuck::cast_slice(values));
}

#[cfg(not(target_endian = "little"))]
fn write_values(values: &[f32], sink: &mut (impl FnMut(&[u8]) + ?Sized)) {
    let mut buf = Vec::with_capacity(64 * 1024);
    for chunk in values.chunks(16 * 1024) {
        buf.clear();
        for x in chunk {
            buf.extend_from_slice(&x.to_bits().to_le_bytes());
        }
        sink(&buf);
    }
}

/// Pieces at least this long are hashed with BLAKE3 on every core (`Hasher::update_rayon`; the
/// hash does not depend on how the work is split). Below it, threads cost more than they save.
const PARALLEL_HASH_BYTES: usize = 256 * 1024;

fn blake3_update(h: &mut blake3::Hasher, bytes: &[u8]) {
    if bytes.len() >= PARALLEL_HASH_BYTES {
        h.update_rayon(bytes);
    } else {
        h.update(bytes);
    }
}

const MAGIC: &[u8; 4] = b"TBST";
const VERSION: u8 = 1;
/// Largest tensor rank accepted.
pub const RANK_MAX: usize = 8;
/// Longest tensor name accepted.
pub const TENSOR_NAME_MAX: usize = 256;

/// A dense row-major FP32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor; `data.len()` must equal the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, StateError> {
        let n: Option<usize> = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if shape.len() > RANK_MAX || n != Some(data.len()) {
            return Err(StateError::Shape { shape, len: data.len() });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor { shape, data: vec![0.0; n] }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Why a state could not be built or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("tensor shape {shape:?} does not hold {len} values (or has rank > {RANK_MAX})")]
    Shape { shape: Vec<usize>, len: usize },
    #[error("tensor name {name:?} is invalid: 1..={TENSOR_NAME_MAX} printable ASCII characters required")]
    BadName { name: String },
    #[error("tensor {name} is not finite at element {index}")]
    NonFinite { name: String, index: usize },
    #[error("malformed state: {0}")]
    Decode(#[from] DecodeError),
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= TENSOR_NAME_MAX && name.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// The FP32 state after a step: step counter, parameters and optimizer state.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainingState {
    pub step: u64,
    tensors: BTreeMap<String, Tensor>,
}

impl TrainingState {
    /// An empty state at `step`.
    pub fn new(step: u64) -> Self {
        TrainingState { step, tensors: BTreeMap::new() }
    }

    /// Inserts or replaces a named tensor. Non-finite values are refused.
    pub fn insert(&mut self, name: &str, tensor: Tensor) -> Result<(), StateError> {
        if !valid_name(name) {
            return Err(StateError::BadName { name: name.to_string() });
        }
        if let Some(index) = tensor.data.iter().position(|x| !x.is_finite()) {
            return Err(StateError::NonFinite { name: name.to_string(), index });
        }
        self.tensors.insert(name.to_string(), tensor);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.get_mut(name)
    }

    /// Tensors in canonical (name) order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Total number of FP32 values.
    pub fn n_values(&self) -> usize {
        self.tensors.values().map(Tensor::len).sum()
    }

    /// Feeds the canonical encoding to `sink` in pieces (no full copy of the state).
    fn write_canonical(&self, sink: &mut (impl FnMut(&[u8]) + ?Sized)) {
        sink(MAGIC);
        sink(&[VERSION]);
        sink(&self.step.to_le_bytes());
        sink(&(self.tensors.len() as u32).to_le_bytes());
        for (name, t) in &self.tensors {
            sink(&(name.len() as u16).to_le_bytes());
            sink(name.as_bytes());
            sink(&[t.shape.len() as u8]);
            for &d in &t.shape {
                sink(&(d as u64).to_le_bytes());
            }
            write_values(&t.data, sink);
        }
    }

    /// The canonical encoding (what checkpoints store, before compression).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.n_values() * 4);
        self.write_canonical(&mut |b| out.extend_from_slice(b));
        out
    }

    /// The state hash of the canonical encoding, computed in a streaming pass: what a leaf of a
    /// record whose format uses `hash` commits to.
    pub fn digest(&self, hash: StateHash) -> Hash {
        hash.streamed(|feed| self.write_canonical(feed))
    }

    /// Decodes a canonical encoding. Never panics; rejects non-canonical input (unsorted or
    /// repeated names, non-finite values, trailing bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::new(bytes);
        if r.bytes(4, "magic")? != MAGIC {
            return Err(DecodeError { what: "not a training state (bad magic)".into(), offset: 0 }.into());
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError { what: format!("unsupported state version {version}"), offset: 4 }.into());
        }
        let step = r.u64_le("step")?;
        let n = r.u32_le("tensor count")? as usize;
        if n > r.remaining() / 3 {
            return Err(r.error(format!("tensor count {n} exceeds the remaining input")).into());
        }
        let mut tensors = BTreeMap::new();
        let mut prev: Option<String> = None;
        for _ in 0..n {
            let at = r.offset();
            let b = r.bytes(2, "name length")?;
            let name_len = u16::from_le_bytes([b[0], b[1]]) as usize;
            let name = std::str::from_utf8(r.bytes(name_len, "tensor name")?)
                .ok()
                .filter(|s| valid_name(s))
                .ok_or_else(|| DecodeError { what: "invalid tensor name".into(), offset: at })?
                .to_string();
            if prev.as_deref().is_some_and(|p| p >= name.as_str()) {
                return Err(DecodeError { what: format!("tensor {name} out of order or repeated"), offset: at }.into());
            }
            let rank = r.u8("rank")? as usize;
            if rank > RANK_MAX {
                return Err(r.error(format!("tensor {name} has rank {rank} > {RANK_MAX}")).into());
            }
            let mut shape = Vec::with_capacity(rank);
            let mut count: u64 = 1;
            for _ in 0..rank {
                let d = r.u64_le("dimension")?;
                count = count.checked_mul(d).ok_or_else(|| r.error(format!("tensor {name} size overflows")))?;
                shape.push(d as usize);
            }
            if count > (r.remaining() / 4) as u64 {
                return Err(r
                    .error(format!("tensor {name} claims {count} values, more than the remaining input"))
                    .into());
            }
            let raw = r.bytes(count as usize * 4, "tensor data")?;
            let data: Vec<f32> =
                raw.chunks_exact(4).map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect();
            if let Some(index) = data.iter().position(|x| !x.is_finite()) {
                return Err(StateError::NonFinite { name, index });
            }
            prev = Some(name.clone());
            tensors.insert(name, Tensor { shape, data });
        }
        r.finish("state")?;
        Ok(TrainingState { step, tensors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASHES: [StateHash; 2] = [StateHash::Sha256, StateHash::Blake3];

    fn sample() -> TrainingState {
        let mut s = TrainingState::new(7);
        s.insert("param/fc1.weight", Tensor::new(vec![2, 3], vec![1.0, -2.0, 0.5, -0.0, 3.25, 1e-40]).unwrap())
            .unwrap();
        s.insert("opt/fc1.weight/m", Tensor::zeros(vec![2, 3])).unwrap();
        s.insert("param/fc1.bias", Tensor::new(vec![2], vec![0.25, -0.25]).unwrap()).unwrap();
        s
    }

    #[test]
    fn digest_is_independent_of_insertion_order() {
        let a = sample();
        let mut b = TrainingState::new(7);
        for name in ["param/fc1.bias", "param/fc1.weight", "opt/fc1.weight/m"] {
            b.insert(name, a.get(name).unwrap().clone()).unwrap();
        }
        assert_eq!(a.encode(), b.encode());
        for hash in HASHES {
            assert_eq!(a.digest(hash), b.digest(hash));
            assert_eq!(a.digest(hash), hash.of(&a.encode()));
        }
        assert_eq!(a.digest(StateHash::Sha256), crate::codec::sha256(&a.encode()));
        assert_ne!(a.digest(StateHash::Sha256), a.digest(StateHash::Blake3));
    }

    /// Both hashes, pinned to their published definitions: SHA-256 and BLAKE3 of the empty input
    /// and of "abc" (FIPS 180-2 and the BLAKE3 reference vectors).
    #[test]
    fn state_hashes_are_the_published_functions() {
        let hex = |h: Hash| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(StateHash::Sha256.of(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex(StateHash::Blake3.of(b"")), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
        assert_eq!(
            hex(StateHash::Blake3.of(b"abc")),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    /// A tensor large enough to be hashed on every core gives the hash of its encoding in one
    /// piece, whatever the number of threads.
    #[test]
    fn a_large_state_hashes_the_same_on_any_number_of_threads() {
        let mut s = sample();
        let n = 3 * PARALLEL_HASH_BYTES / 4 + 12_345;
        let values = (0..n).map(|i| (i as f32 * 0.37).sin() * if i % 7 == 0 { -0.0 } else { 1.0 }).collect();
        s.insert("param/big", Tensor::new(vec![n], values).unwrap()).unwrap();
        let whole = *blake3::hash(&s.encode()).as_bytes();
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            assert_eq!(pool.install(|| s.digest(StateHash::Blake3)), whole, "{threads} threads");
            assert_eq!(pool.install(|| StateHash::Blake3.of(&s.encode())), whole, "{threads} threads");
            assert_eq!(pool.install(|| s.digest(StateHash::Sha256)), StateHash::Sha256.of(&s.encode()));
        }
    }

    #[test]
    fn digest_sees_every_bit_and_the_step() {
        let a = sample();
        let mut b = a.clone();
        b.step = 8;
        let mut c = a.clone();
        let w = c.get_mut("param/fc1.weight").unwrap();
        w.data[3] = 0.0; // -0.0 → +0.0: different bits, equal as numbers
        for hash in HASHES {
            assert_ne!(a.digest(hash), b.digest(hash));
            assert_ne!(a.digest(hash), c.digest(hash));
        }
    }

    #[test]
    fn round_trips_and_rejects_corruption() {
        let s = sample();
        let enc = s.encode();
        assert_eq!(TrainingState::decode(&enc).unwrap(), s);
        for cut in 0..enc.len() {
            assert!(TrainingState::decode(&enc[..cut]).is_err(), "truncation at {cut}");
        }
        // A flipped byte either fails to decode or changes the digest: never the same state.
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x40;
            if let Ok(d) = TrainingState::decode(&bad) {
                for hash in HASHES {
                    assert_ne!(d.digest(hash), s.digest(hash), "flip at {i}");
                }
            }
        }
    }

    #[test]
    fn non_finite_and_bad_shapes_are_refused() {
        let mut s = TrainingState::new(0);
        assert!(matches!(
            s.insert("w", Tensor::new(vec![1], vec![f32::NAN]).unwrap()),
            Err(StateError::NonFinite { index: 0, .. })
        ));
        assert!(Tensor::new(vec![2, 2], vec![0.0; 3]).is_err());
        assert!(s.insert("bad name", Tensor::zeros(vec![1])).is_err());
    }
}
