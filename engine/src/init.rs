//! Starting weights for a fine-tune: a safetensors file whose tensors are the model's
//! parameters under their candle-nn names (`fc1.weight`, …; what `trainer-agent export`
//! writes). The spec commits to the file by SHA-256 and size; the trainer stores the file in
//! its record as [`INIT_WEIGHTS_FILE`], so an auditor (local, or through the record server)
//! reads the very bytes the trainer committed to. The initial state is those parameters with
//! every optimizer slot zero.

use common::codec::{sha256, to_hex};
use common::state::Tensor;
use serde::{Deserialize, Serialize};

use crate::model::ParamSpec;

/// The starting weights' file name inside a record directory.
pub const INIT_WEIGHTS_FILE: &str = "init.safetensors";

/// Largest starting-weights file accepted (the record format's state limit).
pub const INIT_WEIGHTS_BYTES_MAX: u64 = crate::record::STATE_RAW_BYTES_MAX as u64;

/// What a spec commits to about its starting weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsCommitment {
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// The file's length in bytes.
    pub bytes: u64,
}

impl WeightsCommitment {
    /// The commitment to `bytes`.
    pub fn of(bytes: &[u8]) -> WeightsCommitment {
        WeightsCommitment { sha256: to_hex(&sha256(bytes)), bytes: bytes.len() as u64 }
    }

    /// Whether `bytes` is the committed file; the message says how it differs.
    pub fn check(&self, bytes: &[u8]) -> Result<(), WeightsProblem> {
        let found = WeightsCommitment::of(bytes);
        if found != *self {
            return Err(WeightsProblem::file(format!(
                "does not match the spec's commitment: {} bytes with SHA-256 {}, the spec commits to {} bytes with SHA-256 {}",
                found.bytes, found.sha256, self.bytes, self.sha256
            )));
        }
        Ok(())
    }
}

/// What is wrong with a starting-weights file, naming the tensor where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{INIT_WEIGHTS_FILE}: {}{what}", tensor.as_ref().map(|t| format!("tensor {t}: ")).unwrap_or_default())]
pub struct WeightsProblem {
    pub tensor: Option<String>,
    pub what: String,
}

impl WeightsProblem {
    /// The problem without the file name (for messages that name the file elsewhere).
    pub fn detail(&self) -> String {
        match &self.tensor {
            Some(t) => format!("tensor {t}: {}", self.what),
            None => self.what.clone(),
        }
    }

    fn file(what: impl Into<String>) -> Self {
        WeightsProblem { tensor: None, what: what.into() }
    }

    fn tensor(name: &str, what: impl Into<String>) -> Self {
        WeightsProblem { tensor: Some(name.to_string()), what: what.into() }
    }
}

/// Each of `params` from a safetensors file, in `params` order: every parameter present under
/// its name, F32, with exactly its shape, and finite; no other tensor in the file.
pub fn params_from_safetensors(bytes: &[u8], params: &[ParamSpec]) -> Result<Vec<Tensor>, WeightsProblem> {
    let st = crate::data::tensors::open(bytes).map_err(WeightsProblem::file)?;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort_unstable();
    if let Some(extra) = names.iter().find(|n| !params.iter().any(|p| &p.name == *n)) {
        return Err(WeightsProblem::tensor(extra, "is not a parameter of this run's model"));
    }
    let mut out = Vec::with_capacity(params.len());
    for p in params {
        let view = st
            .tensor(&p.name)
            .map_err(|_| WeightsProblem::tensor(&p.name, format!("is missing (a parameter of shape {:?})", p.shape)))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(WeightsProblem::tensor(&p.name, format!("is {:?}, not F32", view.dtype())));
        }
        if view.shape() != p.shape.as_slice() {
            return Err(WeightsProblem::tensor(
                &p.name,
                format!("has shape {:?}, the model's is {:?}", view.shape(), p.shape),
            ));
        }
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(WeightsProblem::tensor(&p.name, format!("element {i} is not finite ({})", data[i])));
        }
        out.push(Tensor::new(p.shape.clone(), data).map_err(|e| WeightsProblem::tensor(&p.name, e.to_string()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Init;

    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec { name: "fc1.bias".into(), shape: vec![2], init: Init::Const(0.0) },
            ParamSpec { name: "fc1.weight".into(), shape: vec![2, 3], init: Init::Const(0.0) },
        ]
    }

    /// A safetensors file of `(name, dtype, shape, values as little-endian bytes)`.
    fn file(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut json = serde_json::to_vec(&header).unwrap();
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        out.extend(data);
        out
    }

    /// A safetensors file with `header` as it is (a JSON object may name a key twice).
    fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn every_parameter_must_be_there_as_f32_with_its_shape_and_nothing_else() {
        let good = file(&[
            ("fc1.bias", "F32", vec![2], f32s(&[1.0, 2.0])),
            ("fc1.weight", "F32", vec![2, 3], f32s(&[0.5; 6])),
        ]);
        let t = params_from_safetensors(&good, &params()).unwrap();
        assert_eq!((t[0].data.clone(), t[1].shape.clone()), (vec![1.0, 2.0], vec![2, 3]));

        let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
            (file(&[("fc1.bias", "F32", vec![2], f32s(&[1.0, 2.0]))]), Some("fc1.weight"), "missing"),
            (
                file(&[
                    ("fc1.bias", "F32", vec![2], f32s(&[1.0, 2.0])),
                    ("fc1.weight", "F32", vec![3, 2], f32s(&[0.5; 6])),
                ]),
                Some("fc1.weight"),
                "shape",
            ),
            (
                file(&[
                    ("fc1.bias", "F64", vec![2], [1.0f64.to_le_bytes(), 2.0f64.to_le_bytes()].concat()),
                    ("fc1.weight", "F32", vec![2, 3], f32s(&[0.5; 6])),
                ]),
                Some("fc1.bias"),
                "F32",
            ),
            (
                file(&[
                    ("fc1.bias", "F32", vec![2], f32s(&[1.0, f32::NAN])),
                    ("fc1.weight", "F32", vec![2, 3], f32s(&[0.5; 6])),
                ]),
                Some("fc1.bias"),
                "finite",
            ),
            (
                file(&[
                    ("fc1.bias", "F32", vec![2], f32s(&[1.0, 2.0])),
                    ("fc1.weight", "F32", vec![2, 3], f32s(&[0.5; 6])),
                    ("fc2.weight", "F32", vec![1], f32s(&[0.5])),
                ]),
                Some("fc2.weight"),
                "not a parameter",
            ),
            (b"not safetensors at all".to_vec(), None, "not a safetensors file"),
            (
                raw(
                    r#"{"fc1.bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"fc1.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]},"fc1.bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    &[f32s(&[1.0, 2.0]), f32s(&[0.5; 6])].concat(),
                ),
                None,
                "\"fc1.bias\" is named twice",
            ),
        ];
        for (bytes, tensor, says) in cases {
            let e = params_from_safetensors(&bytes, &params()).unwrap_err();
            assert_eq!(e.tensor.as_deref(), tensor, "{e}");
            assert!(e.to_string().contains(says) && e.to_string().starts_with(INIT_WEIGHTS_FILE), "{e}");
        }
    }

    #[test]
    fn the_commitment_is_the_file_hash_and_size() {
        let c = WeightsCommitment::of(b"abc");
        assert_eq!(c.bytes, 3);
        assert_eq!(c.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(c.check(b"abc").is_ok());
        let e = c.check(b"abd").unwrap_err();
        assert!(e.what.contains("does not match the spec's commitment"), "{e}");
    }
}
