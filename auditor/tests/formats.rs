//! Record formats. This build writes format 5 (BLAKE3 state hashes; batch norm's and average
//! pooling's sums correctly rounded) and reads formats 3 (SHA-256) and 4 (those sums in each
//! profile's order) too: records made by the 0.3.0 build (`tests/fixtures/format3`) audit,
//! bisect, adjudicate, serve and export as they did, and one made by the 0.4.0 build
//! (`tests/fixtures/format4`) replays with its own sums. A record of an earlier format is not a
//! wrong record: this build cannot read it, so the audit cannot decide (exit 2) and says which format to audit it
//! with, from a local directory and from a record server alike. A format no build has written
//! (0, or one from the future) stays a `commitment-invalid` verdict, so a trainer cannot make an
//! auditor undecided by naming one.

mod support;

use std::process::Command;

use std::path::{Path, PathBuf};

use auditor::evidence::{Evidence, Side, adjudicate};
use auditor::http::{HttpTrainer, RetryPolicy};
use auditor::{AuditError, AuditOptions, NoProgress, TrainerSource, Verdict, audit_dir};
use common::state::StateHash;
use engine::record::Record;
use engine::spec::{FORMAT_OLDEST_READ, FORMAT_VERSION};
use engine::train::{Run, StepMode};
use kernels::{Profile, Sums};
use support::tamper::{tamper_checkpoint, tamper_spec};
use support::{Drill, SGD, copy_dir, scratch, write_record};

/// A copy of a record made by the 0.3.0 build (format 3, SHA-256 state hashes): `honest`, or
/// `guilty` (one weight's last bit flipped after step 7). See `fixtures/format3/README.md`.
fn format3(dir: &Path, which: &str) -> PathBuf {
    format3_as(dir, which, which)
}

fn format3_as(dir: &Path, which: &str, name: &str) -> PathBuf {
    let to = dir.join(name);
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format3").join(which), &to);
    to
}

#[test]
fn a_format_3_record_is_read_with_sha256_and_this_build_writes_blake3() {
    let dir = scratch("formats-hash");
    let old = Record::open(&format3(&dir, "honest")).unwrap();
    assert_eq!((old.spec().format_version, old.spec().state_hash()), (3, StateHash::Sha256));
    let state = old.checkpoint(12).unwrap();
    assert_eq!(state.digest(StateHash::Sha256), old.leaf(12).unwrap().state);
    let new = Record::open(&write_record(&dir.join("new"), Profile::Cpu, SGD, Drill::default())).unwrap();
    assert_eq!((new.spec().format_version, new.spec().state_hash()), (FORMAT_VERSION, StateHash::Blake3));
    assert_eq!(new.manifest().unwrap().format_version, FORMAT_VERSION);
    let last = new.n_steps();
    assert_eq!(new.checkpoint(last).unwrap().digest(StateHash::Blake3), new.leaf(last).unwrap().state);
}

#[test]
fn records_made_by_the_format_3_build_audit_as_they_did() {
    let dir = scratch("formats-3");
    let honest = format3(&dir, "honest");
    let guilty = format3(&dir, "guilty");
    for auditor in [Profile::CpuAlt, Profile::CpuSeq, Profile::CpuSplitK] {
        let a = audit_dir(&honest, &AuditOptions::new(auditor), &NoProgress).unwrap();
        assert!(matches!(a.verdict, Verdict::Consistent), "{auditor}: {:?}", a.verdict);
        let a = audit_dir(&guilty, &AuditOptions::new(auditor), &NoProgress).unwrap();
        assert!(matches!(a.verdict, Verdict::Diverged { step: 7, .. }), "{auditor}: {:?}", a.verdict);
        // The disputed step re-executes with the record's own hash, on any profile.
        let ev = a.evidence.unwrap();
        assert_eq!(adjudicate(&ev, Profile::Cpu, None).unwrap().reproduces, Side::Auditor, "{auditor}");
    }
    // The 0.3.0 auditor's signed report still verifies, and its evidence bundle re-executes
    // with SHA-256 on every profile.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format3");
    let report = std::fs::read_to_string(fixtures.join("guilty.report.json")).unwrap();
    let verified = auditor::report::verify(&report).unwrap();
    assert_eq!((verified.verdict_kind, verified.proofs_checked), (auditor::VerdictKind::Diverged, 2));
    let old = Evidence::read(&fixtures.join("guilty.evidence")).unwrap();
    for p in Profile::CPU {
        assert_eq!(adjudicate(&old, p, None).unwrap().reproduces, Side::Auditor, "{p}");
    }
    // A format-3 checkpoint whose leaf is BLAKE3 of it (a trainer mixing the formats) is a
    // mismatch against SHA-256, a verdict.
    let mixed = format3_as(&dir, "honest", "mixed");
    tamper_checkpoint(&mixed, 8, |s| s.clone());
    let leaf = Record::open(&mixed).unwrap().leaf(8).unwrap().state;
    let (sha, b3) = {
        let s = Record::open(&honest).unwrap().checkpoint(8).unwrap();
        (s.digest(StateHash::Sha256), s.digest(StateHash::Blake3))
    };
    assert_eq!(leaf, sha, "tamper_checkpoint recommits with the record's own hash");
    support::tamper::recommit(&mixed, Some((8, b3)), |_| {});
    let a = audit_dir(&mixed, &AuditOptions::new(Profile::CpuAlt), &NoProgress).unwrap();
    assert!(matches!(&a.verdict, Verdict::CommitmentInvalid { .. }), "{:?}", a.verdict);
}

/// The record made by the format-4 build (`tests/fixtures/format4`): a CNN with a batch norm,
/// whose sums format 5 redefined (correctly rounded). It replays with format 4's definition and
/// audits `consistent` on every other CPU profile. The same run on this build logs fewer
/// tie-breaks, and the old log replayed with format 5's definition has entries that do not hold
/// up, so the record's format, not the build, must decide how its steps are checked.
#[test]
fn a_format_4_batch_norm_record_replays_with_its_own_definition() {
    let dir = scratch("formats-4");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format4");
    let honest = dir.join("honest");
    copy_dir(&fixtures.join("honest"), &honest);
    let old = Record::open(&honest).unwrap();
    assert_eq!((old.spec().format_version, old.spec().sums()), (4, Sums::ProfileOrder));
    for auditor in [Profile::CpuAlt, Profile::CpuSeq, Profile::CpuSplitK] {
        let a = audit_dir(&honest, &AuditOptions::new(auditor), &NoProgress).unwrap();
        assert!(matches!(a.verdict, Verdict::Consistent), "{auditor}: {:?}", a.verdict);
    }
    // The same run on this build: format 5, the fixture's spec otherwise.
    let text = std::fs::read_to_string(fixtures.join("config.toml")).unwrap();
    let cfg = engine::spec::Config::from_toml(&text, "format4/config.toml").unwrap();
    let new = Run::from_config(&cfg, None, Profile::CpuAlt, old.n_steps()).unwrap();
    assert_eq!((new.spec.format_version, new.spec.sums()), (FORMAT_VERSION, Sums::CorrectlyRounded));
    let mut spec4 = new.spec.clone();
    (spec4.format_version, spec4.software_version, spec4.device_profile) = (4, "0.4.0".into(), "cpu".into());
    assert_eq!(&spec4, old.spec(), "the fixture is its config's run");
    // Its commits log fewer tie-breaks, and the fixture's log replayed with format 5's definition
    // does not hold up: entries where no format-5 machine could round two ways.
    let run4 = Run::new(old.spec().clone(), new.data.clone(), kernels::Device::new(Profile::CpuAlt).unwrap()).unwrap();
    let (mut logged4, mut logged5, mut forged) = (0, 0, 0);
    let mut state = old.checkpoint(0).unwrap();
    for step in 1..=old.n_steps() {
        let log = old.log(step).unwrap();
        logged4 += log.n_entries();
        logged5 += new.step(&state, step, StepMode::Commit { paper: false }, None).unwrap().log.n_entries();
        forged += new.step(&state, step, StepMode::Replay(&log), None).unwrap().forged.len();
        state = run4.step(&state, step, StepMode::Replay(&log), None).unwrap().state;
        assert_eq!(run4.state_digest(&state), old.leaf(step).unwrap().state, "step {step}");
    }
    assert!(logged5 < logged4 && forged > 0, "format 4 logged {logged4}, format 5 {logged5}, {forged} forged");
}

/// A signed record whose spec says `format`.
fn record_of_format(dir: &std::path::Path, format: u32) -> std::path::PathBuf {
    let rec = write_record(dir, Profile::Cpu, SGD, Drill::default());
    tamper_spec(&rec, |v| v["format_version"] = format.into());
    rec
}

fn earlier_and_unknown() -> (Vec<u32>, Vec<u32>) {
    ((1..FORMAT_OLDEST_READ).collect(), vec![0, FORMAT_VERSION + 1, 99])
}

#[test]
fn a_local_record_of_an_earlier_format_is_undecided_and_an_unknown_one_invalid() {
    let dir = scratch("formats-local");
    let (earlier, unknown) = earlier_and_unknown();
    let opts = AuditOptions::new(Profile::CpuAlt);
    for format in earlier {
        let rec = record_of_format(&dir.join(format!("f{format}")), format);
        match audit_dir(&rec, &opts, &NoProgress) {
            Err(AuditError::Source(what)) => assert!(
                what.contains(&format!("made by format {format} (an earlier build)"))
                    && what.contains(&format!("a build that reads format {format}")),
                "{what}"
            ),
            other => panic!("format {format}: expected could-not-decide, got {other:?}"),
        }
    }
    for format in unknown {
        let rec = record_of_format(&dir.join(format!("f{format}")), format);
        let a = audit_dir(&rec, &opts, &NoProgress).unwrap();
        assert!(
            matches!(&a.verdict, Verdict::CommitmentInvalid { file: Some(f), .. } if f == "spec.json"),
            "format {format}: {:?}",
            a.verdict
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_served_record_of_an_earlier_format_is_undecided_and_an_unknown_one_invalid() {
    let dir = scratch("formats-http");
    let records = dir.join("records");
    let (earlier, unknown) = earlier_and_unknown();
    let mut runs = Vec::new();
    for &format in earlier.iter().chain(&unknown) {
        let rec = record_of_format(&dir.join(format!("f{format}")), format);
        support::place(&rec, &records, &format!("f{format}"));
        runs.push((format, earlier.contains(&format)));
    }
    // Records of the format-3 build, served by this one: consistent, and diverged at step 7.
    for which in ["honest", "guilty"] {
        support::place(&format3(&dir, which), &records, &format!("f3-{which}"));
    }
    let trainer = support::start_trainer(&records, None).await;
    let url = trainer.url.clone();
    // The server recomputes a state between checkpoints by replay and checks every step on the
    // way against its leaf: with SHA-256 for these records.
    let (u, honest) = (url.clone(), records.join("f3-honest"));
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let src = HttpTrainer::new(&u, "f3-honest", None, RetryPolicy::default(), rt.handle().clone()).unwrap();
        let rec = Record::open(&honest).unwrap();
        for step in [5, 6, 7, 11] {
            let state = src.state(step).unwrap_or_else(|e| panic!("state {step}: {e}"));
            assert_eq!(state.digest(StateHash::Sha256), rec.leaf(step).unwrap().state, "state {step}");
        }
    })
    .await
    .unwrap();
    let d = dir.clone();
    let u = url.clone();
    let served3 = tokio::task::spawn_blocking(move || {
        ["honest", "guilty"].map(|which| {
            let run = format!("f3-{which}");
            let out = Command::new(env!("CARGO_BIN_EXE_auditor"))
                .current_dir(&d)
                .args(["audit", "--trainer-url", &u, "--run", &run, "--device", "cpu-alt", "--json"])
                .output()
                .unwrap();
            (which, out)
        })
    })
    .await
    .unwrap();
    for (which, out) in served3 {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{which}: {e}: {stderr}"));
        match which {
            "honest" => assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}"),
            _ => {
                assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
                assert_eq!((v["verdict"]["kind"].as_str(), v["verdict"]["step"].as_u64()), (Some("diverged"), Some(7)));
            }
        }
    }
    let d = dir.clone();
    let outputs = tokio::task::spawn_blocking(move || {
        runs.into_iter()
            .map(|(format, is_earlier)| {
                let run = format!("f{format}");
                let out = Command::new(env!("CARGO_BIN_EXE_auditor"))
                    .current_dir(&d)
                    .args(["audit", "--trainer-url", &url, "--run", &run])
                    .output()
                    .unwrap();
                (format, is_earlier, out)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (format, is_earlier, out) in outputs {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if is_earlier {
            assert_eq!(out.status.code(), Some(2), "format {format}: {stdout}{stderr}");
            assert!(stderr.contains(&format!("made by format {format} (an earlier build)")), "{stderr}");
        } else {
            assert_eq!(out.status.code(), Some(1), "format {format}: {stdout}{stderr}");
            assert!(stdout.contains("commitment-invalid"), "format {format}: {stdout}");
        }
    }
    trainer.stop().await;
}
