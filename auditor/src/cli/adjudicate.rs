//! `auditor adjudicate`: re-execute the disputed step of an evidence bundle and exit by whom
//! the re-execution sides with.

use std::path::{Path, PathBuf};

use anyhow::Context;
use auditor::VerdictKind;
use auditor::evidence::{Adjudication, Evidence, Side, adjudicate};
use auditor::report::{AdjudicationJson, verified};

use super::audit::device_arg;
use super::exit::{Exit, Failure, undecided};
use super::output::{emit, require_exists};
use super::verify::{REPORT_BYTES_MAX, report_text};

/// The exit codes of `adjudicate` (shown in its `--help`).
pub const EXIT_CODES: &str = "\
Exit codes:
  0   sides with the trainer: the re-execution reproduces the trainer's leaf and every entry
      of the trainer's log holds up
  1   sides with the auditor: the accusation stands (log entries that do not hold up, whatever
      the bundle's verdict kind; or the auditor's leaf is reproduced, not the trainer's)
  3   sides with neither: the re-execution reproduces neither leaf
  2   could not decide (an unreadable or inconsistent bundle, a dataset that does not match;
      with --report, a report that does not verify or a bundle that is not that report's;
      without it, a bundle of an unfinished run, whose root nobody signed)
  64  usage error (bad flags, an unknown or unavailable --device, a missing file)
The JSON's `reproduces` field is the side.";

#[derive(clap::Args, Debug)]
pub struct AdjudicateArgs {
    /// The evidence bundle (`auditor audit --evidence`, or /v1/reports/{id}/evidence).
    #[arg(long)]
    evidence: PathBuf,
    /// The device profile to re-execute the step on.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The signed report the bundle belongs to (`auditor audit --report`, or /v1/reports/{id}).
    /// The bundle is not signed; with its report, whose signature is checked, a bundle whose
    /// record, leaves or verdict differ from the report's is refused (exit 2) before anything
    /// is re-executed, so the auditor leaf compared with is the one the auditor signed.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Dataset files, for specs that are not synthetic.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print the adjudication as JSON.
    #[arg(long)]
    json: bool,
}

/// The exit code of a side.
pub fn exit_of(side: Side) -> Exit {
    match side {
        Side::Trainer => Exit::Ok,
        Side::Auditor => Exit::Adverse,
        Side::Neither => Exit::Neither,
    }
}

pub fn run(args: AdjudicateArgs) -> Result<Exit, Failure> {
    let device = device_arg("--device", &args.device)?;
    require_exists("--evidence", &args.evidence)?;
    if let Some(data) = &args.data {
        require_exists("--data", data)?;
    }
    if let Some(report) = &args.report {
        require_exists("--report", report)?;
    }
    let ev = Evidence::read(&args.evidence).with_context(|| format!("--evidence {}", args.evidence.display()))?;
    let signer = match &args.report {
        Some(path) => Some(bind_to_report(&ev, path)?),
        // Without a signed manifest (an unfinished run) nothing in the bundle is signed: its
        // leaves, proofs and root could all be made up, so a side taken on them would prove
        // nothing about the trainer's record. The auditor's signed report binds them.
        None if ev.manifest_json.is_empty() => {
            return Err(undecided(format_args!(
                "--evidence {}: the bundle's root is not signed (the run had no manifest when it was \
                 audited), so nothing binds its leaves to the trainer's record; give its signed report \
                 with --report",
                args.evidence.display()
            )));
        }
        None => None,
    };
    let a = adjudicate(&ev, device, args.data.as_deref())
        .with_context(|| format!("adjudicating {}", args.evidence.display()))?;
    let mut out = AdjudicationJson::from_adjudication(&a);
    out.report_signed_by = signer;
    let text = if args.json {
        serde_json::to_string_pretty(&out).expect("plain data serialises") + "\n"
    } else {
        human(&a, &out)
    };
    emit(&text)?;
    Ok(exit_of(a.reproduces))
}

/// Verifies the report at `path` and checks that `ev` is its bundle; the report's signer.
fn bind_to_report(ev: &Evidence, path: &Path) -> Result<String, Failure> {
    let shown = path.display();
    let bytes = common::files::read_regular_prefix(path, REPORT_BYTES_MAX + 1)
        .map_err(|e| undecided(format_args!("--report {shown}: {e}")))?;
    let text = report_text(&bytes).map_err(|e| undecided(format_args!("--report {shown}: {e}")))?;
    let (report, verified) =
        verified(text).map_err(|e| undecided(format_args!("--report {shown} does not verify: {e}")))?;
    ev.check_against(&report).map_err(|e| undecided(format_args!("--report {shown}: {e}")))?;
    Ok(verified.auditor_public_key)
}

fn human(a: &Adjudication, out: &AdjudicationJson) -> String {
    let forged_log = a.verdict_kind == VerdictKind::ForgedLog;
    let why = match (a.reproduces, forged_log) {
        (Side::Trainer, false) => "the re-execution reproduces the trainer's leaf".to_string(),
        (Side::Trainer, true) => "the trainer's log holds up".to_string(),
        (Side::Auditor, false) => "the re-execution reproduces the auditor's leaf, not the trainer's".to_string(),
        (Side::Auditor, true) => format!("{} log entries do not hold up", a.forged.len()),
        (Side::Neither, _) => "the re-execution reproduces neither leaf".to_string(),
    };
    let mut text = format!(
        "step {} ({}) re-executed on {}: sides with {}: {why}\n",
        out.step,
        out.verdict_kind,
        out.device,
        match a.reproduces {
            Side::Neither => "neither side",
            Side::Trainer => "the trainer",
            Side::Auditor => "the auditor",
        }
    );
    text += &format!("  computed state {}\n", out.computed_leaf.state);
    text += &format!("  trainer  state {}\n", out.trainer_leaf.state);
    text += &format!("  auditor  state {}\n", out.auditor_leaf.state);
    if a.computed_leaf.state == auditor::evidence::NOT_FINITE_STATE {
        text += "  the step does not stay finite from the agreed state (a state digest of zeros: no state)\n";
    }
    for entry in &a.forged {
        text += &format!("  does not hold up: {entry}\n");
    }
    if let Some(key) = &out.report_signed_by {
        text += &format!("  the bundle is the signed report's (auditor key {key})\n");
    }
    if !a.root_signed {
        text += "  the root is the one the signed report names (an unfinished run has no signed manifest)\n";
    }
    text
}
