//! The `auditor` binary: exit codes, `--json`, report and evidence files, `verify-report` and
//! `adjudicate`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use engine::train::{Fault, FaultKind};
use kernels::Profile;
use support::{Drill, SGD, scratch, write_record};

fn auditor(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_auditor")).current_dir(dir).args(args).output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn audit_exit_codes_reports_evidence_and_adjudication() {
    let dir = scratch("cli");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let out = auditor(&dir, &["audit", "--record", honest.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["verdict"]["kind"], "consistent");
    assert_eq!(v["trainer_device"], "cpu");
    assert_ne!(v["auditor_device"], "cpu", "the default device differs from the trainer's");
    assert!(dir.join("auditor.key").exists(), "key generated in the current directory");

    let bad = write_record(
        &dir.join("bad"),
        Profile::Cpu,
        SGD,
        Drill { fault: Some(Fault { kind: FaultKind::SwapBatch, step: 7 }), ..Drill::default() },
    );
    let out = auditor(
        &dir,
        &[
            "audit",
            "--record",
            bad.to_str().unwrap(),
            "--device",
            "cpu-splitk",
            "--mode",
            "intervals",
            "--json",
            "--report",
            "r.json",
            "--evidence",
            "e.tbev",
            "--key",
            "k.key",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["verdict"]["kind"], "diverged");
    assert_eq!(v["verdict"]["step"], 7);
    assert_eq!(v["verdict"]["differs"], serde_json::json!(["state", "batch"]));
    assert_eq!(v["at_step"]["batch_indices"].as_array().unwrap().len(), 16);

    let out = auditor(&dir, &["verify-report", "r.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let text = std::fs::read_to_string(dir.join("r.json")).unwrap();
    std::fs::write(dir.join("t.json"), text.replace("\"step\": 7", "\"step\": 6")).unwrap();
    assert_eq!(auditor(&dir, &["verify-report", "t.json"]).status.code(), Some(1));

    let out = auditor(&dir, &["adjudicate", "--evidence", "e.tbev", "--device", "cpu-seq", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["reproduces"], "auditor");

    // Could not decide: not a record, an unknown profile, a segment outside the record.
    for args in [
        vec!["audit", "--record", "nowhere"],
        vec!["audit", "--record", honest.to_str().unwrap(), "--device", "tpu"],
        vec!["audit", "--record", honest.to_str().unwrap(), "--from", "3", "--to", "40"],
    ] {
        let out = auditor(&dir, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("could not decide"), "{args:?}");
    }

    // A corrupted record is an adverse verdict naming the file.
    std::fs::write(honest.join("steps/0000000002.log.zst"), b"garbage").unwrap();
    let out = auditor(&dir, &["audit", "--record", honest.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["verdict"]["kind"], "commitment-invalid");
    assert_eq!(v["verdict"]["file"], "steps/0000000002.log.zst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_a_run_on_a_record_server_over_http() {
    let dir = scratch("cli-http");
    let records = dir.join("records");
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 5 };
    let rec = write_record(&dir.join("f"), Profile::Cpu, SGD, Drill { fault: Some(fault), ..Drill::default() });
    support::place(&rec, &records, "faulty");
    let trainer = support::start_trainer(&records, Some("s3cret")).await;
    let url = trainer.url.clone();
    let d = dir.clone();
    let (ok, unauthorized) = tokio::task::spawn_blocking(move || {
        let args = |token: &str| {
            vec![
                "audit".to_string(),
                "--trainer-url".into(),
                url.clone(),
                "--run".into(),
                "faulty".into(),
                "--trainer-token".into(),
                token.into(),
                "--json".into(),
            ]
        };
        let run =
            |a: Vec<String>| Command::new(env!("CARGO_BIN_EXE_auditor")).current_dir(&d).args(a).output().unwrap();
        (run(args("s3cret")), run(args("wrong")))
    })
    .await
    .unwrap();
    assert_eq!(ok.status.code(), Some(1), "{}", String::from_utf8_lossy(&ok.stderr));
    let v = json(&ok);
    assert_eq!(v["verdict"]["kind"], "diverged");
    assert_eq!(v["verdict"]["step"], 5);
    assert!(v["record"].as_str().unwrap().starts_with("http://"), "{}", v["record"]);
    assert_eq!(unauthorized.status.code(), Some(2), "a wrong token is the auditor's problem, not a verdict");
    assert!(String::from_utf8_lossy(&unauthorized.stderr).contains("401"));
    trainer.stop().await;
}

/// `--device cuda` without CUDA support or a driver: "could not decide" (exit 2) with the reason,
/// never a panic.
#[test]
fn audit_on_cuda_without_support_or_driver_is_a_clear_error() {
    if let Ok(d) = kernels::Device::new(Profile::Cuda) {
        println!("skipped: a GPU is present ({})", d.gpu_description().unwrap_or_default());
        return;
    }
    let dir = scratch("cli-cuda");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let out = auditor(&dir, &["audit", "--record", honest.to_str().unwrap(), "--device", "cuda"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("could not decide") && err.contains("device profile cuda is unavailable: "), "{err}");
    let why = if cfg!(feature = "cuda") { "CUDA driver" } else { "rebuild with `--features cuda`" };
    assert!(err.contains(why), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
