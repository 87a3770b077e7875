//! A record of an earlier format is not a wrong record: this build cannot read it, so the audit
//! cannot decide (exit 2) and says which format to audit it with, from a local directory and
//! from a record server alike. A format no build has written (0, or one from the future) stays a
//! `commitment-invalid` verdict, so a trainer cannot make an auditor undecided by naming one.

mod support;

use std::process::Command;

use auditor::{AuditError, AuditOptions, NoProgress, Verdict, audit_dir};
use engine::spec::FORMAT_VERSION;
use kernels::Profile;
use support::tamper::tamper_spec;
use support::{Drill, SGD, scratch, write_record};

/// A signed record whose spec says `format`.
fn record_of_format(dir: &std::path::Path, format: u32) -> std::path::PathBuf {
    let rec = write_record(dir, Profile::Cpu, SGD, Drill::default());
    tamper_spec(&rec, |v| v["format_version"] = format.into());
    rec
}

fn earlier_and_unknown() -> (Vec<u32>, Vec<u32>) {
    ((1..FORMAT_VERSION).collect(), vec![0, FORMAT_VERSION + 1, 99])
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
    let trainer = support::start_trainer(&records, None).await;
    let url = trainer.url.clone();
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
