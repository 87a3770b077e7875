//! Datasets: a deterministic synthetic task, MNIST from IDX files (gzip or raw), plain text for
//! a character-level model, and a user's own files (safetensors, CSV, token ids: one module
//! each); and the dataset commitment (an RFC 6962 Merkle root over the examples) that goes in
//! the run spec.
//!
//! Every file is read through [`read_bounded`]: a regular file, at most
//! [`DATA_FILE_BYTES_MAX`] bytes, and every size derived from its contents is checked before
//! anything is allocated from it, so a hostile file or spec cannot panic either side.
//!
//! Inputs are FP32 values computed with correctly rounded operations only (no transcendental
//! functions), so every machine derives the same bits from the same files and seed.

use std::io::Read;
use std::path::{Path, PathBuf};

use common::merkle::MerkleTree;
use common::prng::Stream;

use crate::EngineError;
use crate::spec::{DataConfig, DataKind, DatasetCommitment};

mod csv;
mod find;
pub(crate) mod tensors;
mod tokens;
pub use csv::parse_csv;
pub use find::DatasetFinder;
pub use tensors::parse_tensors;
pub use tokens::parse_tokens;

/// Bytes of text per committed leaf for text datasets.
pub const TEXT_CHUNK_BYTES: usize = 4096;
/// Height and width of an MNIST image.
pub const MNIST_SIDE: usize = 28;
/// Largest data file accepted (a corrupt header cannot make us read without limit).
pub const DATA_FILE_BYTES_MAX: u64 = 1 << 30;

/// Most examples a user's file (safetensors or CSV) may hold: each takes at least 4 bytes.
pub const USER_EXAMPLES_MAX: usize = (DATA_FILE_BYTES_MAX / 4) as usize;

/// A loaded dataset. Examples `0..n_train` are for training; the held-out examples follow.
#[derive(Debug, Clone)]
pub enum Dataset {
    /// Fixed-size inputs with a class label each.
    Classification {
        kind: DataKind,
        /// Shape of one input, e.g. `[784]` or `[1, 28, 28]`.
        input_shape: Vec<usize>,
        inputs: Vec<f32>,
        labels: Vec<u32>,
        classes: usize,
        n_train: usize,
        n_holdout: usize,
    },
    /// Fixed-size inputs with F32 targets of a fixed shape each (regression).
    Regression {
        kind: DataKind,
        input_shape: Vec<usize>,
        inputs: Vec<f32>,
        /// Shape of one example's targets.
        target_shape: Vec<usize>,
        targets: Vec<f32>,
        n_train: usize,
        n_holdout: usize,
    },
    /// A token stream; example `i` is the window of `context` tokens starting at `i`, with the
    /// next tokens as targets. `raw` is the file as committed (the text's bytes, or the token
    /// file's little-endian ids); `vocab` is the number of token ids (for text, the distinct
    /// bytes, numbered in byte order).
    Text {
        kind: DataKind,
        raw: Vec<u8>,
        vocab: usize,
        tokens: Vec<u32>,
        context: usize,
        n_train: usize,
        n_holdout: usize,
    },
}

fn data_err(path: &Path, detail: impl Into<String>) -> EngineError {
    EngineError::Data { path: path.to_path_buf(), detail: detail.into() }
}

/// Reads a whole regular file of at most [`DATA_FILE_BYTES_MAX`] bytes (the limit is enforced
/// on the bytes read, not only on the size the file system reports).
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, EngineError> {
    common::files::read_regular(path, DATA_FILE_BYTES_MAX).map_err(|e| data_err(path, e.to_string()))
}

/// Reads a whole file, transparently gunzipping it if it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, EngineError> {
    let raw = read_bounded(path)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(DATA_FILE_BYTES_MAX)
            .read_to_end(&mut out)
            .map_err(|e| data_err(path, format!("corrupt gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses IDX images (magic 0x00000803) into `(n, rows, cols, pixels)`.
pub fn parse_idx_images(bytes: &[u8], path: &Path) -> Result<(usize, usize, usize, Vec<u8>), EngineError> {
    if bytes.len() < 16 || be_u32(bytes, 0) != 0x0000_0803 {
        return Err(data_err(path, "not an IDX image file (bad magic or shorter than its 16-byte header)"));
    }
    let (n, rows, cols) = (be_u32(bytes, 4) as usize, be_u32(bytes, 8) as usize, be_u32(bytes, 12) as usize);
    let need = n.checked_mul(rows).and_then(|x| x.checked_mul(cols)).and_then(|x| x.checked_add(16));
    if need != Some(bytes.len()) {
        return Err(data_err(
            path,
            format!("header says {n}×{rows}×{cols} pixels but the file holds {} bytes", bytes.len() - 16),
        ));
    }
    Ok((n, rows, cols, bytes[16..].to_vec()))
}

/// Parses IDX labels (magic 0x00000801).
pub fn parse_idx_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, EngineError> {
    if bytes.len() < 8 || be_u32(bytes, 0) != 0x0000_0801 {
        return Err(data_err(path, "not an IDX label file (bad magic or shorter than its 8-byte header)"));
    }
    let n = be_u32(bytes, 4) as usize;
    if bytes.len() != 8 + n {
        return Err(data_err(path, format!("header says {n} labels but the file holds {}", bytes.len() - 8)));
    }
    Ok(bytes[8..].to_vec())
}

/// Finds `<prefix>-{images-idx3,labels-idx1}-ubyte[.gz]` in `dir`, preferring the `train` split.
fn find_mnist(dir: &Path) -> Result<(PathBuf, PathBuf), EngineError> {
    for prefix in ["train", "t10k"] {
        let pick = |stem: &str| {
            [format!("{prefix}-{stem}-ubyte.gz"), format!("{prefix}-{stem}-ubyte")]
                .into_iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_file())
        };
        if let (Some(img), Some(lbl)) = (pick("images-idx3"), pick("labels-idx1")) {
            return Ok((img, lbl));
        }
    }
    Err(data_err(
        dir,
        "no MNIST IDX files here (expected train-* or t10k-* images-idx3-ubyte and labels-idx1-ubyte, .gz optional)",
    ))
}

impl Dataset {
    /// Loads the dataset a config names. `path` is `--data`; `seed` drives synthetic data;
    /// `context` is the text model's context length.
    pub fn load(config: &DataConfig, path: Option<&Path>, seed: u64, context: usize) -> Result<Dataset, EngineError> {
        match config {
            DataConfig::Synthetic(_) if path.is_some() => Err(EngineError::Usage(format!(
                "--data {}: this config's data is synthetic (generated from the seed), so no data file is read; drop --data",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            ))),
            DataConfig::Synthetic(s) => Ok(Self::synthetic(s.examples, s.holdout, s.features, s.classes, seed)),
            DataConfig::Mnist(m) => {
                let dir = path
                    .ok_or_else(|| EngineError::Usage("this config needs --data <dir with MNIST IDX files>".into()))?;
                if !dir.is_dir() {
                    return Err(data_err(dir, "--data must name a directory of MNIST IDX files"));
                }
                let (img_path, lbl_path) = find_mnist(dir)?;
                let (n, rows, cols, pixels) = parse_idx_images(&read_maybe_gz(&img_path)?, &img_path)?;
                // The spec names MNIST, so it determines the model's input size from it.
                if (rows, cols) != (MNIST_SIDE, MNIST_SIDE) {
                    return Err(data_err(
                        &img_path,
                        format!("images are {rows}×{cols}; MNIST's are {MNIST_SIDE}×{MNIST_SIDE}"),
                    ));
                }
                let labels = parse_idx_labels(&read_maybe_gz(&lbl_path)?, &lbl_path)?;
                if labels.len() != n {
                    return Err(data_err(&lbl_path, format!("{} labels for {n} images", labels.len())));
                }
                if let Some(i) = labels.iter().position(|&l| l > 9) {
                    return Err(data_err(&lbl_path, format!("label {} at index {i} is not a digit", labels[i])));
                }
                let used = m.train.saturating_add(m.holdout);
                if used > n {
                    return Err(data_err(&img_path, format!("config asks for {used} examples, the file has {n}")));
                }
                let dim = rows * cols;
                let inputs = pixels[..used * dim].iter().map(|&p| p as f32 / 255.0).collect();
                Ok(Dataset::Classification {
                    kind: DataKind::Mnist,
                    input_shape: vec![1, rows, cols],
                    inputs,
                    labels: labels[..used].iter().map(|&l| l as u32).collect(),
                    classes: 10,
                    n_train: m.train,
                    n_holdout: m.holdout,
                })
            }
            DataConfig::Text(t) => {
                let file = path.ok_or_else(|| EngineError::Usage("this config needs --data <text file>".into()))?;
                if !file.is_file() {
                    return Err(data_err(file, "--data must name a text file"));
                }
                let raw = read_maybe_gz(file)?;
                Self::text(raw, context, t.holdout_fraction).map_err(|d| data_err(file, d))
            }
            DataConfig::Tensors(c) => {
                let file = user_file(path, "a safetensors file with tensors x and y")?;
                parse_tensors(&read_bounded(file)?, c).map_err(|d| data_err(file, d))
            }
            DataConfig::Csv(c) => {
                let file = user_file(path, "a CSV file")?;
                parse_csv(&read_bounded(file)?, c).map_err(|d| data_err(file, d))
            }
            DataConfig::Tokens(c) => {
                let file = user_file(path, "a file of token ids")?;
                parse_tokens(read_bounded(file)?, c, context).map_err(|d| data_err(file, d))
            }
        }
    }

    /// A deterministic synthetic classification task: `classes` random centres in
    /// `[-1, 1]^features`, each example its centre plus Irwin–Hall noise of scale 1.5 (hard enough that learning shows).
    pub fn synthetic(examples: usize, holdout: usize, features: usize, classes: usize, seed: u64) -> Dataset {
        let mut centres = Stream::new(seed, "data/synthetic/centres", 0, 0);
        let centre: Vec<f64> = (0..classes * features).map(|_| centres.uniform(-1.0, 1.0)).collect();
        let mut s = Stream::new(seed, "data/synthetic/examples", 0, 0);
        let mut inputs = Vec::with_capacity(examples * features);
        let mut labels = Vec::with_capacity(examples);
        for _ in 0..examples {
            let y = s.below(classes as u64) as usize;
            labels.push(y as u32);
            for f in 0..features {
                inputs.push((centre[y * features + f] + 1.5 * s.irwin_hall_normal()) as f32);
            }
        }
        Dataset::Classification {
            kind: DataKind::Synthetic,
            input_shape: vec![features],
            inputs,
            labels,
            classes,
            n_train: examples - holdout,
            n_holdout: holdout,
        }
    }

    /// This classification dataset with each example read as an input of `shape` (e.g. a
    /// synthetic task's `[784]` as `[1, 28, 28]` for a CNN); `shape` must hold as many values as
    /// an example has.
    pub fn with_input_shape(self, shape: Vec<usize>) -> Result<Dataset, String> {
        match self {
            Dataset::Classification { kind, input_shape, inputs, labels, classes, n_train, n_holdout } => {
                let (have, want) = (input_shape.iter().product::<usize>(), shape.iter().product::<usize>());
                if have != want {
                    return Err(format!("examples of {have} values cannot be read as {shape:?}"));
                }
                Ok(Dataset::Classification { kind, input_shape: shape, inputs, labels, classes, n_train, n_holdout })
            }
            Dataset::Regression { .. } | Dataset::Text { .. } => {
                Err("only a classification dataset is read with another input shape".into())
            }
        }
    }

    /// A character-level text dataset: the vocabulary is the sorted set of bytes in the text.
    pub fn text(raw: Vec<u8>, context: usize, holdout_fraction: f64) -> Result<Dataset, String> {
        if text_split(raw.len(), context, holdout_fraction).is_none() {
            return Err(format!(
                "text of {} bytes is too short for context {context}: it needs at least 2·(context + 2) = {} bytes",
                raw.len(),
                context.saturating_add(2).saturating_mul(2)
            ));
        }
        let vocab = distinct_bytes(&raw);
        let mut index = [0u32; 256];
        vocab.iter().enumerate().for_each(|(i, &b)| index[b as usize] = i as u32);
        let tokens: Vec<u32> = raw.iter().map(|&b| index[b as usize]).collect();
        let (n_train, n_holdout) = text_split(tokens.len(), context, holdout_fraction)
            .ok_or_else(|| format!("text of {} bytes is too short for context {context}", raw.len()))?;
        Ok(Dataset::Text { kind: DataKind::Text, raw, vocab: vocab.len(), tokens, context, n_train, n_holdout })
    }

    /// A text dataset's vocabulary: token `i` is byte `vocab[i]` (the text's distinct bytes in
    /// byte order). `None` for other data (a token file's ids have no bytes).
    pub fn byte_vocabulary(&self) -> Option<Vec<u8>> {
        match self {
            Dataset::Text { kind: DataKind::Text, raw, .. } => Some(distinct_bytes(raw)),
            _ => None,
        }
    }

    /// Loads the dataset a whole config names (the GPT's context sets the text windows). A CNN
    /// reads a synthetic task of `s²` features as `1×s×s` images.
    pub fn for_config(config: &crate::spec::Config, path: Option<&Path>) -> Result<Dataset, EngineError> {
        let context = match &config.model {
            crate::spec::ModelConfig::Gpt(g) => g.context,
            crate::spec::ModelConfig::Graph(g) => g.context.unwrap_or(0),
            _ => 0,
        };
        let data = Self::load(&config.data, path, config.train.seed, context)?;
        match (&config.model, &config.data) {
            (crate::spec::ModelConfig::Cnn(_), DataConfig::Synthetic(s)) => {
                let side = square_side(s.features).ok_or_else(|| {
                    EngineError::Usage(format!("a CNN needs square images; {} features are not s²", s.features))
                })?;
                data.with_input_shape(vec![1, side, side]).map_err(EngineError::Usage)
            }
            _ => Ok(data),
        }
    }

    pub fn n_train(&self) -> usize {
        match self {
            Dataset::Classification { n_train, .. }
            | Dataset::Regression { n_train, .. }
            | Dataset::Text { n_train, .. } => *n_train,
        }
    }

    pub fn n_holdout(&self) -> usize {
        match self {
            Dataset::Classification { n_holdout, .. }
            | Dataset::Regression { n_holdout, .. }
            | Dataset::Text { n_holdout, .. } => *n_holdout,
        }
    }

    /// The index of held-out example `k` in the example numbering.
    pub fn holdout_index(&self, k: usize) -> usize {
        match self {
            Dataset::Classification { n_train, .. } | Dataset::Regression { n_train, .. } => n_train + k,
            Dataset::Text { n_train, context, .. } => n_train + context + k,
        }
    }

    /// The commitment: an RFC 6962 root over example encodings (`label u32 LE ‖ inputs as f32 LE`
    /// for classification, whatever file they came from; raw 4 KiB chunks of the file for text
    /// and token files, whose ids are 2 or 4 bytes, so no id straddles a chunk).
    pub fn commitment(&self) -> DatasetCommitment {
        let mut tree = MerkleTree::new();
        let (kind, n_train, n_holdout) = match self {
            Dataset::Classification { kind, input_shape, inputs, labels, n_train, n_holdout, .. } => {
                let dim: usize = input_shape.iter().product();
                let mut buf = Vec::with_capacity(4 + dim * 4);
                for (i, &y) in labels.iter().enumerate() {
                    buf.clear();
                    buf.extend_from_slice(&y.to_le_bytes());
                    for x in &inputs[i * dim..(i + 1) * dim] {
                        buf.extend_from_slice(&x.to_bits().to_le_bytes());
                    }
                    tree.push_entry(&buf);
                }
                (*kind, *n_train, *n_holdout)
            }
            Dataset::Regression { kind, input_shape, inputs, target_shape, targets, n_train, n_holdout } => {
                // An example: its targets' bits, then its inputs' (both little-endian).
                let (dim, per) = (input_shape.iter().product::<usize>(), target_shape.iter().product::<usize>());
                let mut buf = Vec::with_capacity((per + dim) * 4);
                for i in 0..n_train + n_holdout {
                    buf.clear();
                    for v in targets[i * per..(i + 1) * per].iter().chain(&inputs[i * dim..(i + 1) * dim]) {
                        buf.extend_from_slice(&v.to_bits().to_le_bytes());
                    }
                    tree.push_entry(&buf);
                }
                (*kind, *n_train, *n_holdout)
            }
            Dataset::Text { kind, raw, n_train, n_holdout, .. } => {
                raw.chunks(TEXT_CHUNK_BYTES).for_each(|c| {
                    tree.push_entry(c);
                });
                (*kind, *n_train, *n_holdout)
            }
        };
        DatasetCommitment {
            kind,
            leaves: tree.len(),
            n_train: n_train as u64,
            n_holdout: n_holdout as u64,
            root: common::codec::to_hex(&tree.root()),
        }
    }
}

/// The train/held-out split of a text of `len` tokens read in windows of `context` (integer
/// arithmetic only, so the split does not depend on FP rounding of the fraction), or `None` if
/// the text is too short (fewer than `2·(context + 2)` tokens). The run spec's validation uses
/// the same function to check a text commitment's counts.
pub fn text_split(len: usize, context: usize, holdout_fraction: f64) -> Option<(usize, usize)> {
    if len < context.checked_add(2)?.checked_mul(2)? {
        return None;
    }
    let windows = len - context - 1;
    let n_holdout_tokens = ((len as f64) * holdout_fraction) as usize;
    let n_train = windows.saturating_sub(n_holdout_tokens).max(1);
    let n_holdout = windows.saturating_sub(n_train + context);
    Some((n_train, n_holdout))
}

/// A classification dataset from a user's file: `labels.len()` examples of `input_shape`, the
/// last `holdout` held out (at least one must remain for training).
fn user_classification(
    kind: DataKind,
    input_shape: Vec<usize>,
    inputs: Vec<f32>,
    labels: Vec<u32>,
    classes: usize,
    holdout: usize,
) -> Result<Dataset, String> {
    let n = labels.len();
    if holdout >= n {
        return Err(format!("the file has {n} examples; holding out {holdout} leaves none for training"));
    }
    Ok(Dataset::Classification { kind, input_shape, inputs, labels, classes, n_train: n - holdout, n_holdout: holdout })
}

/// The distinct bytes of `raw`, in byte order: a text's vocabulary (token `i` is byte `i` of it).
fn distinct_bytes(raw: &[u8]) -> Vec<u8> {
    let mut present = [false; 256];
    raw.iter().for_each(|&b| present[b as usize] = true);
    (0..=255u8).filter(|&b| present[b as usize]).collect()
}

fn user_regression(
    input_shape: Vec<usize>,
    inputs: Vec<f32>,
    target_shape: Vec<usize>,
    targets: Vec<f32>,
    holdout: usize,
) -> Result<Dataset, String> {
    let per: usize = target_shape.iter().product();
    let n = targets.len() / per.max(1);
    if holdout >= n {
        return Err(format!("the file has {n} examples; holding out {holdout} leaves none for training"));
    }
    Ok(Dataset::Regression {
        kind: DataKind::Tensors,
        input_shape,
        inputs,
        target_shape,
        targets,
        n_train: n - holdout,
        n_holdout: holdout,
    })
}

/// The `--data` path of a user's file kind, which must be given.
fn user_file<'p>(path: Option<&'p Path>, what: &str) -> Result<&'p Path, EngineError> {
    path.ok_or_else(|| EngineError::Usage(format!("this config needs --data <{what}>")))
}

/// `s` with `s² = n`, if there is one.
pub fn square_side(n: usize) -> Option<usize> {
    let s = (n as f64).sqrt() as usize;
    (s.saturating_sub(1)..=s + 1).find(|&c| c.checked_mul(c) == Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_seeded() {
        let a = Dataset::synthetic(100, 10, 8, 3, 1).commitment();
        let b = Dataset::synthetic(100, 10, 8, 3, 1).commitment();
        let c = Dataset::synthetic(100, 10, 8, 3, 2).commitment();
        assert_eq!(a, b);
        assert_ne!(a.root, c.root);
        assert_eq!((a.n_train, a.n_holdout, a.leaves), (90, 10, 100));
    }

    #[test]
    fn idx_parsing_rejects_bad_headers() {
        let p = Path::new("x");
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        img.extend([1u8; 8]);
        assert_eq!(parse_idx_images(&img, p).unwrap().0, 2);
        assert!(parse_idx_images(&img[..20], p).unwrap_err().to_string().contains("holds"));
        img[3] = 1;
        assert!(parse_idx_images(&img, p).is_err());
        assert!(parse_idx_labels(&[0, 0, 8, 1, 0, 0, 0, 3, 1, 2], p).is_err());
        assert_eq!(parse_idx_labels(&[0, 0, 8, 1, 0, 0, 0, 2, 1, 2], p).unwrap(), vec![1, 2]);
    }

    #[test]
    fn text_vocab_and_split() {
        let d = Dataset::text(b"hello world, hello tiebreak! ".repeat(20), 8, 0.1).unwrap();
        let Dataset::Text { vocab, tokens, n_train, n_holdout, .. } = &d else { panic!() };
        assert_eq!(*vocab, 15, "h e l o space w r d , t i b a k !");
        assert!(tokens.iter().all(|&t| (t as usize) < *vocab));
        assert_eq!(tokens.len(), 580);
        assert!(*n_train > 400 && *n_holdout > 0);
        assert!(d.holdout_index(0) >= n_train + 8);
        let e = Dataset::text(b"short".to_vec(), 8, 0.0).unwrap_err();
        assert!(e.contains("5 bytes") && e.contains("at least 2·(context + 2) = 20 bytes"), "{e}");
        assert!(Dataset::text(b"x".repeat(20), 8, 0.0).is_ok(), "the minimum the message names is enough");
    }
}
