//! A user's dataset as a safetensors file: tensor `x` (F32, `[N, ..input_shape]`) and tensor
//! `y` (class labels `[N]`, as U8, U16, U32, I32 or I64, converted to `u32`; or, with
//! `data.target_shape`, F32 targets `[N, ..target_shape]`). Nothing else may be in the file, so
//! what is committed is exactly what was read.

use safetensors::{Dtype, SafeTensors};

use super::{DataKind, Dataset, user_classification, user_regression};
use crate::spec::TensorsConfig;

/// A safetensors file's tensors. The crate checks the header's size, its JSON, and that every
/// tensor's byte range lies inside the file and matches its dtype and shape (with checked
/// arithmetic). It reads the header into a map, where a name given twice would silently keep
/// its last entry; such a header is refused here, naming the tensor.
pub(crate) fn open(bytes: &[u8]) -> Result<SafeTensors<'_>, String> {
    // First, where the header can be read: a name given twice explains the offsets that then
    // do not tile the file better than the crate's "invalid offset" would.
    let header = bytes
        .get(..8)
        .map(|n| u64::from_le_bytes(n.try_into().expect("eight bytes")))
        .and_then(|n| bytes.get(8..8usize.checked_add(usize::try_from(n).ok()?)?))
        .and_then(|h| std::str::from_utf8(h).ok());
    if let Some(header) = header {
        let mut de = serde_json::Deserializer::from_str(header);
        if let Ok(Some(name)) = serde::Deserializer::deserialize_map(&mut de, UniqueKeys) {
            return Err(format!("tensor {name:?} is named twice in the file's header"));
        }
    }
    SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))
}

/// A JSON object's first key given twice, if any.
struct UniqueKeys;

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        let mut seen = std::collections::BTreeSet::new();
        let mut twice = None;
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<serde::de::IgnoredAny>()?;
            if !seen.insert(key.clone()) && twice.is_none() {
                twice = Some(key);
            }
        }
        Ok(twice)
    }
}

/// Parses a safetensors dataset against its config; errors say what is wrong with which tensor.
pub fn parse_tensors(bytes: &[u8], config: &TensorsConfig) -> Result<Dataset, String> {
    let st = open(bytes)?;
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    if let Some(extra) = names.iter().find(|n| !matches!(**n, "x" | "y")) {
        return Err(format!("tensor {extra:?} is not x or y (a dataset file holds only those two)"));
    }
    let x = st.tensor("x").map_err(|_| "there is no tensor x (the inputs)".to_string())?;
    let y = st.tensor("y").map_err(|_| "there is no tensor y (the labels)".to_string())?;
    if x.dtype() != Dtype::F32 {
        return Err(format!("tensor x is {:?}; inputs must be F32", x.dtype()));
    }
    let (n, example) = x.shape().split_first().ok_or("tensor x is a scalar; it must be [N, ..input_shape]")?;
    if example != config.input_shape.as_slice() {
        return Err(format!(
            "tensor x has examples of shape {example:?}, data.input_shape is {:?}",
            config.input_shape
        ));
    }
    let n = *n;
    if let Some(target_shape) = &config.target_shape {
        let want: Vec<usize> = std::iter::once(n).chain(target_shape.iter().copied()).collect();
        if y.dtype() != Dtype::F32 || y.shape() != want.as_slice() {
            return Err(format!(
                "tensor y is {:?} {:?}; F32 targets of data.target_shape {target_shape:?} must be F32 {want:?}",
                y.dtype(),
                y.shape()
            ));
        }
    } else if y.shape() != [n] {
        return Err(format!("tensor y has shape {:?}; class labels must be [{n}], one per example of x", y.shape()));
    }
    let dim = example.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("tensor x's shape overflows")?;
    let want = n.checked_mul(dim).and_then(|v| v.checked_mul(4));
    if want != Some(x.data().len()) {
        return Err(format!("tensor x holds {} bytes, its shape needs {want:?}", x.data().len()));
    }
    let inputs: Vec<f32> = x.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if let Some(i) = inputs.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "tensor x: value {} of example {} is not finite ({})",
            i % dim.max(1),
            i / dim.max(1),
            inputs[i]
        ));
    }
    if let Some(target_shape) = &config.target_shape {
        let targets: Vec<f32> =
            y.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let per = target_shape.iter().product::<usize>().max(1);
        if targets.len() != n * per {
            return Err(format!("tensor y holds {} values, its shape needs {}", targets.len(), n * per));
        }
        if let Some(i) = targets.iter().position(|v| !v.is_finite()) {
            return Err(format!("tensor y: value {} of example {} is not finite ({})", i % per, i / per, targets[i]));
        }
        return user_regression(config.input_shape.clone(), inputs, target_shape.clone(), targets, config.holdout);
    }
    let labels = labels_u32(y.dtype(), y.data(), n)?;
    if let Some(i) = labels.iter().position(|&l| l as usize >= config.classes) {
        return Err(format!(
            "tensor y: label {} of example {i} is not below data.classes = {}",
            labels[i], config.classes
        ));
    }
    user_classification(DataKind::Tensors, config.input_shape.clone(), inputs, labels, config.classes, config.holdout)
}

/// `n` class labels of `dtype` (little-endian) as `u32`; a negative or too-large label is an
/// error naming the example.
fn labels_u32(dtype: Dtype, data: &[u8], n: usize) -> Result<Vec<u32>, String> {
    let width = match dtype {
        Dtype::U8 => 1,
        Dtype::U16 => 2,
        Dtype::U32 | Dtype::I32 => 4,
        Dtype::I64 => 8,
        other => return Err(format!("tensor y is {other:?}; class labels must be U8, U16, U32, I32 or I64")),
    };
    if n.checked_mul(width) != Some(data.len()) {
        return Err(format!("tensor y holds {} bytes, {n} labels of {width} bytes need {}", data.len(), n * width));
    }
    data.chunks_exact(width)
        .enumerate()
        .map(|(i, b)| {
            let v: i128 = match dtype {
                Dtype::U8 => b[0].into(),
                Dtype::U16 => u16::from_le_bytes([b[0], b[1]]).into(),
                Dtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]).into(),
                Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]).into(),
                _ => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).into(),
            };
            u32::try_from(v).map_err(|_| format!("tensor y: label {v} of example {i} is not a class index"))
        })
        .collect()
}
