//! `auditor verify-report`: check a report's signature and inclusion proofs, and optionally
//! that the expected auditor signed it.

use std::path::PathBuf;

use auditor::report::verify;
use serde::Serialize;

use super::exit::{Exit, Failure, undecided, usage};
use super::keys::{public_key_arg, public_key_file};
use super::output::{emit, require_exists};

/// Reports are a few kilobytes (a verdict, two leaves with proofs, a batch's indices); a file
/// far larger is not one, and is not read into memory.
pub const REPORT_BYTES_MAX: u64 = 16 << 20;

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The report: JSON written by `auditor audit --report` or served at /v1/reports/{id}.
    file: PathBuf,
    /// Print the outcome as JSON: {"valid", "verdict", "auditor_public_key", "error"?}.
    #[arg(long)]
    json: bool,
    /// Require the report to be signed by this auditor's ed25519 key (64 hex digits, or @FILE
    /// holding them). Without it, any key's valid signature is accepted.
    #[arg(long, value_name = "HEX|@FILE", conflicts_with = "auditor_key_file")]
    auditor_key: Option<String>,
    /// The same, read from a file holding the 64 hex digits.
    #[arg(long, value_name = "PATH")]
    auditor_key_file: Option<PathBuf>,
}

/// What `verify-report --json` prints (a CLI output, not a signed format: it lives with the CLI).
#[derive(Debug, Serialize)]
struct VerifyJson {
    valid: bool,
    /// The verdict kind of a report that verifies (`null` otherwise: an unverified report's
    /// verdict is only a claim).
    verdict: Option<String>,
    /// The key whose signature verified (`null` when none did).
    auditor_public_key: Option<String>,
    /// `--auditor-key`, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_auditor_key: Option<String>,
    /// Inclusion proofs checked, for a report whose signature verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    proofs_checked: Option<usize>,
    /// Why the report is not valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn run(args: VerifyArgs) -> Result<Exit, Failure> {
    let expected = match (&args.auditor_key, &args.auditor_key_file) {
        (Some(v), _) => Some(public_key_arg("--auditor-key", v)?),
        (None, Some(path)) => Some(public_key_file("--auditor-key-file", path)?),
        (None, None) => None,
    };
    let file = &args.file;
    require_exists("report", file)?;
    // One byte past the limit is read, so that an oversized report is refused by `check` below.
    let bytes = common::files::read_regular_prefix(file, REPORT_BYTES_MAX + 1).map_err(|e| match e {
        common::files::ReadError::Unfit(what) => {
            usage(format_args!("report {}: {what}, not a report file", file.display()))
        }
        e => undecided(format_args!("report {}: {e}", file.display())),
    })?;

    let out = check(&bytes, expected);
    let shown = file.display();
    let text = if args.json {
        serde_json::to_string_pretty(&out).expect("plain data serialises") + "\n"
    } else if out.valid {
        let pinned = if out.expected_auditor_key.is_some() { " (the expected key)" } else { "" };
        format!(
            "report {shown} verifies: verdict {}, signed by {}{pinned}, {} inclusion proofs checked\n",
            out.verdict.as_deref().unwrap_or_default(),
            out.auditor_public_key.as_deref().unwrap_or_default(),
            out.proofs_checked.unwrap_or_default(),
        )
    } else {
        format!("report {shown} does NOT verify: {}\n", out.error.as_deref().unwrap_or_default())
    };
    emit(&text)?;
    Ok(if out.valid { Exit::Ok } else { Exit::Adverse })
}

/// A report file's bytes (read up to one byte past [`REPORT_BYTES_MAX`]) as its text, or why
/// they cannot be a report.
pub fn report_text(bytes: &[u8]) -> Result<&str, String> {
    if bytes.len() as u64 > REPORT_BYTES_MAX {
        return Err(format!("more than {REPORT_BYTES_MAX} bytes: not a report"));
    }
    std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text: not a report".to_string())
}

/// The outcome for the report's bytes.
fn check(bytes: &[u8], expected: Option<String>) -> VerifyJson {
    let mut out = VerifyJson {
        valid: false,
        verdict: None,
        auditor_public_key: None,
        expected_auditor_key: expected.clone(),
        proofs_checked: None,
        error: None,
    };
    let text = match report_text(bytes) {
        Ok(text) => text,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    match verify(text) {
        Err(e) => out.error = Some(e.to_string()),
        Ok(v) => {
            out.proofs_checked = Some(v.proofs_checked);
            out.auditor_public_key = Some(v.auditor_public_key.clone());
            match expected {
                Some(want) if want != v.auditor_public_key => {
                    out.error =
                        Some(format!("signed by auditor key {}, not by the expected key {want}", v.auditor_public_key));
                }
                _ => {
                    out.valid = true;
                    out.verdict = Some(v.verdict_kind.as_str().to_string());
                }
            }
        }
    }
    out
}
