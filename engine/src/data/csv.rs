//! A user's dataset as CSV: one example a row, every field a number, one column (by index or
//! header name) the class label. Fields are separated by commas and trimmed of spaces; there is
//! no quoting (numbers need none). Blank lines are skipped. Features parse directly to the
//! nearest FP32 (`str::parse::<f32>` rounds correctly, so every machine gets the same bits);
//! a label must be an integer below `classes` (`3` and `3.0` both read as 3).
//!
//! Errors name the line and column (both 1-based; the column is the field's position).

use super::{DataKind, Dataset, user_classification};
use crate::spec::{CsvConfig, LabelColumn};

/// Parses a CSV dataset against its config.
pub fn parse_csv(bytes: &[u8], config: &CsvConfig) -> Result<Dataset, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text (at byte {})", e.valid_up_to()))?;
    // A byte-order mark (spreadsheets write one) is not part of the first field.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let columns = config.features.checked_add(1).ok_or("data.features overflows")?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.trim().is_empty());
    let label_idx = match (&config.label_column, config.header) {
        (LabelColumn::Index(i), false) => *i,
        (column, true) => {
            let (at, header) = lines.next().ok_or("the file is empty (not even a header line)")?;
            let names: Vec<&str> = header.split(',').map(str::trim).collect();
            if names.len() != columns {
                return Err(format!(
                    "line {at}: the header has {} columns; data.features = {} plus the label needs {columns}",
                    names.len(),
                    config.features
                ));
            }
            match column {
                LabelColumn::Index(i) => *i,
                LabelColumn::Name(name) => {
                    let mut found = names.iter().enumerate().filter(|(_, n)| *n == name);
                    match (found.next(), found.next()) {
                        (Some((i, _)), None) => i,
                        (None, _) => return Err(format!("line {at}: no column is named {name:?} (data.label_column)")),
                        (Some(_), Some(_)) => {
                            return Err(format!(
                                "line {at}: more than one column is named {name:?} (data.label_column)"
                            ));
                        }
                    }
                }
            }
        }
        (LabelColumn::Name(name), false) => {
            return Err(format!("data.label_column names a column ({name:?}) but data.header is false"));
        }
    };
    if label_idx >= columns {
        return Err(format!("data.label_column {label_idx} is not one of the {columns} columns"));
    }
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    for (at, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != columns {
            return Err(format!(
                "line {at}: {} fields, every row needs {columns} (data.features = {} plus the label)",
                fields.len(),
                config.features
            ));
        }
        for (c, &field) in fields.iter().enumerate() {
            let col = c + 1;
            let shown = Shown(field);
            if c == label_idx {
                let v: f64 =
                    field.parse().map_err(|_| format!("line {at}, column {col}: label {shown} is not a number"))?;
                if !(v.fract() == 0.0 && v >= 0.0 && v < config.classes as f64) {
                    return Err(format!(
                        "line {at}, column {col}: label {shown} is not an integer in 0..{} (data.classes)",
                        config.classes
                    ));
                }
                labels.push(v as u32);
            } else {
                let v: f32 = field.parse().map_err(|_| format!("line {at}, column {col}: {shown} is not a number"))?;
                if !v.is_finite() {
                    return Err(format!("line {at}, column {col}: {shown} is not a finite FP32 value"));
                }
                inputs.push(v);
            }
        }
    }
    if labels.is_empty() {
        return Err("the file has no data rows".into());
    }
    user_classification(DataKind::Csv, vec![config.features], inputs, labels, config.classes, config.holdout)
}

/// A cell as an error quotes it: debug-quoted, and cut after 40 characters (a cell may be
/// megabytes long, and the message is for a person).
struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN_MAX: usize = 40;
        match self.0.char_indices().nth(SHOWN_MAX) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}
