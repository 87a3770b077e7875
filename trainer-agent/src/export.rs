//! Export of the trained FP32 parameters as safetensors, named as candle-nn's `VarBuilder`
//! expects (`fc1.weight`, `fc1.bias`, …), so a candle-nn model of the same architecture loads
//! them directly.

use std::path::Path;

use common::state::TrainingState;
use engine::record::Record;

use crate::TrainerError;

/// The safetensors encoding of the parameters in `state` (tensors named `param/<name>`), in
/// name order: 8-byte little-endian header length, JSON header padded with spaces to a multiple
/// of 8, then the raw little-endian data.
pub fn safetensors_bytes(state: &TrainingState) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in state.tensors() {
        let Some(short) = name.strip_prefix("param/") else { continue };
        let start = data.len();
        for x in &t.data {
            data.extend_from_slice(&x.to_le_bytes());
        }
        header.insert(
            short.to_string(),
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [start, data.len()] }),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("header serialises");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    out
}

/// Writes the final parameters of a finished record to `out` as safetensors.
pub fn export_record(record: &Path, out: &Path) -> Result<(), TrainerError> {
    let rec = Record::open(record)?;
    if !rec.is_complete() {
        return Err(TrainerError::Usage(format!("{} is not a finished run (no manifest)", record.display())));
    }
    let state = rec.checkpoint(rec.n_steps())?;
    std::fs::write(out, safetensors_bytes(&state))
        .map_err(|e| TrainerError::Usage(format!("write {}: {e}", out.display())))?;
    Ok(())
}
