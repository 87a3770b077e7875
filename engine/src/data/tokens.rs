//! A user's token file for the GPT: little-endian `u16` or `u32` ids, as a tokenizer wrote
//! them, every id below the config's `vocab`. Committed like text, by 4 KiB chunks of the file.

use super::{DataKind, Dataset, text_split};
use crate::spec::{TokenDtype, TokensConfig};

/// Parses a token file against its config, read in windows of `context` tokens.
pub fn parse_tokens(raw: Vec<u8>, config: &TokensConfig, context: usize) -> Result<Dataset, String> {
    let width = config.dtype.bytes();
    if !raw.len().is_multiple_of(width) {
        return Err(format!("{} bytes is not a whole number of {width}-byte token ids", raw.len()));
    }
    let tokens: Vec<u32> = match config.dtype {
        TokenDtype::U16 => raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]).into()).collect(),
        TokenDtype::U32 => raw.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    };
    if let Some(i) = tokens.iter().position(|&t| t as usize >= config.vocab) {
        return Err(format!(
            "token {i} (byte offset {}) is id {}, not below data.vocab = {}",
            i * width,
            tokens[i],
            config.vocab
        ));
    }
    let (n_train, n_holdout) = text_split(tokens.len(), context, config.holdout_fraction)
        .ok_or_else(|| format!("{} tokens are too few for context {context}", tokens.len()))?;
    Ok(Dataset::Text { kind: DataKind::Tokens, raw, vocab: config.vocab, tokens, context, n_train, n_holdout })
}
