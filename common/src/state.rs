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
//! The state hash is SHA-256 of this encoding, computed in a streaming pass. Values are hashed
//! as their FP32 bits, with no further conversion; NaN and infinities never reach a state (the
//! rounding step refuses them).

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use crate::codec::{DecodeError, Hash, Reader};

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
    fn write_canonical(&self, sink: &mut impl FnMut(&[u8])) {
        sink(MAGIC);
        sink(&[VERSION]);
        sink(&self.step.to_le_bytes());
        sink(&(self.tensors.len() as u32).to_le_bytes());
        let mut buf = Vec::with_capacity(64 * 1024);
        for (name, t) in &self.tensors {
            sink(&(name.len() as u16).to_le_bytes());
            sink(name.as_bytes());
            sink(&[t.shape.len() as u8]);
            for &d in &t.shape {
                sink(&(d as u64).to_le_bytes());
            }
            for chunk in t.data.chunks(16 * 1024) {
                buf.clear();
                for x in chunk {
                    buf.extend_from_slice(&x.to_bits().to_le_bytes());
                }
                sink(&buf);
            }
        }
    }

    /// The canonical encoding (what checkpoints store, before compression).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.n_values() * 4);
        self.write_canonical(&mut |b| out.extend_from_slice(b));
        out
    }

    /// SHA-256 of the canonical encoding: what a leaf commits to.
    pub fn digest(&self) -> Hash {
        let mut h = Sha256::new();
        self.write_canonical(&mut |b| h.update(b));
        h.finalize().into()
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
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.encode(), b.encode());
        assert_eq!(a.digest(), crate::codec::sha256(&a.encode()));
    }

    #[test]
    fn digest_sees_every_bit_and_the_step() {
        let a = sample();
        let mut b = a.clone();
        b.step = 8;
        assert_ne!(a.digest(), b.digest());
        let mut c = a.clone();
        let w = c.get_mut("param/fc1.weight").unwrap();
        w.data[3] = 0.0; // -0.0 → +0.0: different bits, equal as numbers
        assert_ne!(a.digest(), c.digest());
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
                assert_ne!(d.digest(), s.digest(), "flip at {i}");
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
