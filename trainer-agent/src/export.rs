//! Export of trained FP32 parameters as safetensors, named as candle-nn's `VarBuilder` expects
//! (`fc1.weight`, `tok_emb.weight`, `blk0.ln1.bias`, …), so a candle-nn model of the same
//! architecture loads them directly. The file's `__metadata__` says where the weights come
//! from: the record's root and spec digest, the step, the model's graph and, for text, the
//! vocabulary (token `i` is byte `vocab[i]`).

use std::collections::BTreeMap;
use std::path::Path;

use common::codec::to_hex;
use common::state::TrainingState;
use engine::data::Dataset;
use engine::record::Record;
use engine::spec::DataConfig;

use crate::TrainerError;

/// The safetensors encoding of the parameters in `state` (tensors named `param/<name>`), in
/// name order, with `metadata` (if any) as `__metadata__`: 8-byte little-endian header length,
/// JSON header padded with spaces to a multiple of 8, then the raw little-endian data.
pub fn safetensors_bytes_with(state: &TrainingState, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
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

/// [`safetensors_bytes_with`] without metadata.
pub fn safetensors_bytes(state: &TrainingState) -> Vec<u8> {
    safetensors_bytes_with(state, &BTreeMap::new())
}

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions<'a> {
    pub record: &'a Path,
    pub out: &'a Path,
    /// A checkpointed step; the final step if `None`.
    pub step: Option<u64>,
    /// The run's data: needed for a text run, whose vocabulary the metadata carries.
    pub data: Option<&'a Path>,
}

/// What was exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub step: u64,
    pub tensors: usize,
    pub metadata: BTreeMap<String, String>,
}

/// Writes the parameters of a finished record at a checkpointed step to `out` as safetensors
/// with metadata. The file is written beside `out` and renamed, so a failed export leaves no
/// partial file.
pub fn export(opts: &ExportOptions<'_>) -> Result<Exported, TrainerError> {
    check_out(opts.out)?;
    let rec = Record::open(opts.record)?;
    let Some(manifest) = rec.manifest() else {
        return Err(TrainerError::Usage(format!("{} is not a finished run (no manifest)", opts.record.display())));
    };
    let spec = rec.spec();
    let n_steps = rec.n_steps();
    let interval = spec.config.train.checkpoint_interval;
    let step = opts.step.unwrap_or(n_steps);
    if step > n_steps {
        return Err(TrainerError::Usage(format!("--step {step}: the run has {n_steps} steps")));
    }
    if !step.is_multiple_of(interval) && step != n_steps {
        let before = step / interval * interval;
        let after = (before + interval).min(n_steps);
        return Err(TrainerError::Usage(format!(
            "--step {step}: the record keeps states every {interval} steps and at the final step {n_steps}; the \
             nearest are {before} and {after}"
        )));
    }
    let state = rec.checkpoint(step)?;
    let mut metadata = BTreeMap::new();
    let mut put = |k: &str, v: String| metadata.insert(format!("tiebreak.{k}"), v);
    put("format_version", spec.format_version.to_string());
    put("software_version", spec.software_version.clone());
    put("root", manifest.root.clone());
    put("spec_sha256", manifest.spec_hash.clone());
    put("step", step.to_string());
    // Named by the hash the record's format uses: `state_sha256` (format 3), `state_blake3`.
    let hash = spec.state_hash();
    put(&format!("state_{}", hash.name()), to_hex(&state.digest(hash)));
    let json = |e: serde_json::Error| TrainerError::Usage(format!("export metadata: {e}"));
    put(
        "model",
        serde_json::to_value(&spec.config.model).map_err(json)?["kind"].as_str().unwrap_or_default().to_string(),
    );
    put("graph", serde_json::to_string(&*spec.config.model.graph()).map_err(json)?);
    if let DataConfig::Tokens(t) = &spec.config.data {
        put("vocab_size", t.vocab.to_string());
    }
    if let DataConfig::Text(_) = spec.config.data {
        let Some(path) = opts.data else {
            return Err(TrainerError::Usage(
                "a text run's vocabulary comes from its text: pass --data with the file it trained on".into(),
            ));
        };
        let data = Dataset::for_config(&spec.config, Some(path))?;
        if data.commitment() != spec.dataset {
            return Err(TrainerError::Usage(format!(
                "{} is not the text this run committed to (dataset root {} expected, {} found)",
                path.display(),
                spec.dataset.root,
                data.commitment().root
            )));
        }
        if let Some(vocab) = data.byte_vocabulary() {
            put("vocab", serde_json::to_string(&vocab).map_err(json)?);
        }
    }
    let bytes = safetensors_bytes_with(&state, &metadata);
    let tensors = state.tensors().filter(|(n, _)| n.starts_with("param/")).count();
    // Named by the path given, not the partial file beside it that the user never asked for.
    engine::output::write_output(opts.out, &bytes).map_err(|source| TrainerError::Io {
        op: "write",
        path: opts.out.to_path_buf(),
        source,
    })?;
    Ok(Exported { step, tensors, metadata })
}

/// Refuses an output path export must not write (see `engine::output`): inside a record (the
/// one it reads or another), a directory, a FIFO, a link, or a file that is not a safetensors
/// file (a signing key, a config). An earlier export is replaced.
fn check_out(out: &Path) -> Result<(), TrainerError> {
    engine::output::check_output(out, engine::output::OutputKind::Safetensors)
        .map_err(|why| TrainerError::Usage(format!("--out {}: {why}", out.display())))
}

/// Writes the final parameters of a finished (non-text) record to `out`; see [`export`].
pub fn export_record(record: &Path, out: &Path) -> Result<(), TrainerError> {
    export(&ExportOptions { record, out, step: None, data: None }).map(|_| ())
}
