//! The `auditor` binary: exit codes, `--json`, report and evidence files, `verify-report` and
//! `adjudicate`.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

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

    // The re-execution sides with the auditor: the accusation stands, exit 1.
    let out = auditor(&dir, &["adjudicate", "--evidence", "e.tbev", "--device", "cpu-seq", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["reproduces"], "auditor");

    // Usage errors, not "could not decide": not a record, an unknown profile, a segment
    // outside the record (the full list is in `usage_and_configuration_errors_exit_64`).
    for args in [
        vec!["audit", "--record", "nowhere"],
        vec!["audit", "--record", honest.to_str().unwrap(), "--device", "tpu"],
        vec!["audit", "--record", honest.to_str().unwrap(), "--from", "3", "--to", "40"],
    ] {
        let out = auditor(&dir, &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage error"), "{args:?}");
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

/// `--device cuda` without CUDA support or a driver: a configuration error (exit 64) with the
/// reason, never a panic.
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
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--device cuda") && err.contains("device profile cuda is unavailable: "), "{err}");
    let why = if cfg!(feature = "cuda") { "CUDA driver" } else { "rebuild with `--features cuda`" };
    assert!(err.contains(why), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs the binary with stdin closed and both outputs captured.
fn auditor_owned(dir: &Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_auditor")).current_dir(dir).args(args).stdin(Stdio::null()).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The trainer's public key, as its signed manifest names it.
fn manifest_key(record: &Path) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record.join(engine::record::MANIFEST_FILE)).unwrap()).unwrap();
    m["public_key"].as_str().unwrap().to_string()
}

/// The public key of the secret key in an `auditor.key`-style file (64 hex digits).
fn public_key_of(key_file: &Path) -> String {
    let text = std::fs::read_to_string(key_file).unwrap();
    let seed = common::codec::from_hex::<32>(text.trim()).unwrap();
    common::codec::to_hex(ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().as_bytes())
}

#[test]
fn usage_and_configuration_errors_exit_64_and_help_exits_0() {
    let dir = scratch("cli-usage");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let rec = honest.to_str().unwrap().to_string();
    std::fs::write(dir.join("short.key"), "abcd\n").unwrap();
    // Datasets named in the config are checked at start, as on the command line.
    std::fs::write(dir.join("no-mnist.toml"), "[data]\nmnist = \"no-such-mnist\"\n").unwrap();
    std::fs::write(dir.join("text-dir.toml"), "[data]\ntext = \".\"\n").unwrap();
    std::fs::write(dir.join("no-file.toml"), "[data.files]\nclinic = \"no-such.csv\"\n").unwrap();
    let audit = |extra: &[&str]| {
        let mut a = vec!["audit".to_string(), "--record".into(), rec.clone()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Each case, and a word its message must contain (the flag or file it is about).
    let cases: Vec<(Vec<String>, &str)> = vec![
        (audit(&["--device", "gpu"]), "--device gpu"),
        (audit(&["--device", "tpu"]), "unknown device profile"),
        (audit(&["--frobnicate"]), "--frobnicate"),
        (audit(&["--mode", "sideways"]), "sideways"),
        (audit(&["--trainer-pubkey", "abc"]), "--trainer-pubkey"),
        (audit(&["--trainer-pubkey", &"g".repeat(64)]), "--trainer-pubkey"),
        (audit(&["--trainer-pubkey", "@no-such.key"]), "no-such.key"),
        (audit(&["--trainer-pubkey", "@short.key"]), "short.key"),
        (audit(&["--mode", "spot", "--spot-count", "0"]), "--spot-count"),
        (audit(&["--spot-seed", "5"]), "--spot-seed"),
        (audit(&["--mode", "spot", "--spot-by", "largest-update", "--spot-seed", "5"]), "--spot-seed"),
        (audit(&["--from", "9", "--to", "3"]), "--from 9"),
        (audit(&["--from", "3", "--to", "40"]), "40"),
        (audit(&["--data", "no-such-data"]), "--data no-such-data"),
        (audit(&["--data", "short.key"]), "--data short.key: this run's data is synthetic"),
        (audit(&["--key", "short.key"]), "--key short.key"),
        (owned(&["audit", "--record", "nowhere"]), "--record nowhere"),
        (owned(&["audit", "--trainer-url", "ftp://x", "--run", "r"]), "--trainer-url"),
        (owned(&["audit"]), "--record"),
        (owned(&[]), "Usage"),
        (owned(&["frobnicate"]), "frobnicate"),
        (owned(&["serve", "--config", "no-such.toml"]), "--config no-such.toml"),
        (owned(&["serve", "--listen", "not an address", "--state-dir", "st"]), "not an address"),
        (owned(&["serve", "--state-dir", "st", "--data", "a b=short.key"]), "--data a b="),
        (owned(&["serve", "--state-dir", "st", "--data", "clinic=no-such.csv"]), "no-such.csv"),
        (
            owned(&["serve", "--state-dir", "st", "--data", "c=short.key", "--data", "c=short.key"]),
            "--data c=…: given twice",
        ),
        (owned(&["serve", "--state-dir", "st", "--config", "no-mnist.toml"]), "data.mnist = no-such-mnist"),
        (owned(&["serve", "--state-dir", "st", "--config", "text-dir.toml"]), "data.text = .: a directory"),
        (owned(&["serve", "--state-dir", "st", "--config", "no-file.toml"]), "data.files.clinic = no-such.csv"),
        (owned(&["verify-report", "no-such.json"]), "no-such.json"),
        (owned(&["verify-report", "--auditor-key", "zz", "r.json"]), "--auditor-key"),
        (owned(&["verify-report", "--auditor-key-file", "no-such.key", "r.json"]), "no-such.key"),
        (owned(&["adjudicate", "--evidence", "e.tbev", "--device", "gpu"]), "--device gpu"),
        (owned(&["adjudicate", "--evidence", "no-such.tbev"]), "--evidence no-such.tbev"),
    ];
    for (args, names) in &cases {
        let out = auditor_owned(&dir, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: the message should name {names:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: usage errors print nothing on stdout");
    }
    assert!(!dir.join("st").exists(), "a daemon with a bad address creates no state");

    for args in [vec!["--help"], vec!["audit", "--help"], vec!["help", "adjudicate"], vec!["--version"]] {
        let out = auditor(&dir, &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
    let help = stdout(&auditor(&dir, &["--help"]));
    assert!(help.contains("Exit codes") && help.contains("64  usage"), "{help}");
    let help = stdout(&auditor(&dir, &["adjudicate", "--help"]));
    assert!(help.contains("3   sides with neither"), "{help}");
}

/// Faulty at step 1, so the evidence bundle also carries leaf 0 with its proof.
fn faulty_at_step_one_with_evidence(dir: &Path) -> auditor::evidence::Evidence {
    let bad = write_record(
        &dir.join("bad"),
        Profile::Cpu,
        SGD,
        Drill { fault: Some(Fault { kind: FaultKind::ScaleLr, step: 1 }), ..Drill::default() },
    );
    let out = auditor(
        dir,
        &["audit", "--record", bad.to_str().unwrap(), "--evidence", "e.tbev", "--report", "r.json", "--key", "k.key"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // The human output says why the states could not be compared (no checkpoint at step 1).
    let text = stdout(&out);
    assert!(text.starts_with("verdict: diverged at step 1\n"), "{text}");
    assert!(text.contains("states not compared: ") && text.contains("step 1"), "{text}");
    auditor::evidence::Evidence::read(&dir.join("e.tbev")).unwrap()
}

#[test]
fn adjudicate_exits_by_the_side_it_takes() {
    use common::leaf::{BatchIndices, Leaf};
    use common::tielog::TieBreakLog;

    let dir = scratch("cli-adjudicate");
    let ev = faulty_at_step_one_with_evidence(&dir);
    assert_eq!((ev.verdict_kind.as_str(), ev.step), ("diverged", 1));

    // The accusation stands: 1.
    let out = auditor(&dir, &["adjudicate", "--evidence", "e.tbev", "--device", "cpu-seq", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json(&out)["reproduces"], "auditor");
    let out = auditor(&dir, &["adjudicate", "--evidence", "e.tbev"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("sides with the auditor"), "{}", stdout(&out));

    // An auditor leaf that nobody computes: the re-execution reproduces neither, 3.
    let mut neither = ev.clone();
    neither.auditor_leaf.state[0] ^= 1;
    neither.write(&dir.join("neither.tbev")).unwrap();
    let out = auditor(&dir, &["adjudicate", "--evidence", "neither.tbev", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(json(&out)["reproduces"], "neither");
    let out = auditor(&dir, &["adjudicate", "--evidence", "neither.tbev"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout(&out).contains("sides with neither side"), "{}", stdout(&out));

    // Bound to its signed report, the bundle's auditor leaf is the auditor's signed word: the
    // true bundle adjudicates as before and names the signer; the edited one is refused (2)
    // before anything is re-executed, naming the field, instead of reproducing "neither".
    let signer = public_key_of(&dir.join("k.key"));
    let out = auditor(&dir, &["adjudicate", "--evidence", "e.tbev", "--report", "r.json", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json(&out)["reproduces"], "auditor");
    assert_eq!(json(&out)["report_signed_by"], signer.as_str());
    let out = auditor(&dir, &["adjudicate", "--evidence", "neither.tbev", "--report", "r.json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not the signed report's: its auditor leaf"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "nothing is adjudicated");
    // Without a signed manifest nothing in a bundle is signed: a made-up tree could side with
    // anyone, so it is adjudicated only against its signed report.
    let mut unsigned = ev.clone();
    unsigned.manifest_json.clear();
    unsigned.write(&dir.join("unsigned.tbev")).unwrap();
    let out = auditor(&dir, &["adjudicate", "--evidence", "unsigned.tbev"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("root is not signed") && stderr(&out).contains("--report"), "{}", stderr(&out));
    let out = auditor(&dir, &["adjudicate", "--evidence", "unsigned.tbev", "--report", "r.json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).contains("the root is the one the signed report names"), "{}", stdout(&out));
    // A report that does not verify binds nothing; neither does one without a disputed step.
    let report = std::fs::read_to_string(dir.join("r.json")).unwrap();
    let auditor_state =
        json(&auditor(&dir, &["adjudicate", "--evidence", "e.tbev", "--json"]))["auditor_leaf"]["state"]
            .as_str()
            .unwrap()
            .to_string();
    let mut edited_state = auditor_state.clone().into_bytes();
    edited_state[0] = if edited_state[0] == b'0' { b'1' } else { b'0' };
    let forged = report.replace(&auditor_state, std::str::from_utf8(&edited_state).unwrap());
    assert_ne!(forged, report);
    std::fs::write(dir.join("forged.json"), forged).unwrap();
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let out = auditor(&dir, &["audit", "--record", honest.to_str().unwrap(), "--key", "k.key", "--report", "ok.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for (report, says) in [("forged.json", "does not verify"), ("ok.json", "has no disputed step")] {
        let out = auditor(&dir, &["adjudicate", "--evidence", "e.tbev", "--report", report]);
        assert_eq!(out.status.code(), Some(2), "{report}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{report}: {}", stderr(&out));
    }

    // A false accusation of the honest initial state (leaf 0, proven against the signed root):
    // the re-execution reproduces the trainer's leaf, 0.
    let leaf0 = ev.previous.clone().expect("the bundle of step 1 carries leaf 0");
    assert_eq!(leaf0.leaf.step, 0);
    let mut accused = leaf0.leaf;
    accused.state[0] ^= 1;
    let mut trainer = ev.clone();
    trainer.step = 0;
    trainer.trainer = leaf0;
    trainer.auditor_leaf = Leaf { step: 0, ..accused };
    trainer.previous = None;
    trainer.prev_state = Vec::new();
    trainer.trainer_log = TieBreakLog::default();
    trainer.trainer_batch = BatchIndices::default();
    trainer.write(&dir.join("trainer.tbev")).unwrap();
    let out = auditor(&dir, &["adjudicate", "--evidence", "trainer.tbev", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json(&out)["reproduces"], "trainer");
    let out = auditor(&dir, &["adjudicate", "--evidence", "trainer.tbev"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("sides with the trainer"), "{}", stdout(&out));

    // A bundle that does not hold together cannot be decided: 2, not a side.
    let mut bytes = std::fs::read(dir.join("e.tbev")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(dir.join("broken.tbev"), bytes).unwrap();
    let out = auditor(&dir, &["adjudicate", "--evidence", "broken.tbev"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("could not decide") && stderr(&out).contains("broken.tbev"), "{}", stderr(&out));
}

#[test]
fn verify_report_json_and_the_expected_auditor_key() {
    let dir = scratch("cli-verify");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let out = auditor(&dir, &["audit", "--record", honest.to_str().unwrap(), "--key", "k.key", "--report", "r.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let signer = public_key_of(&dir.join("k.key"));
    let other = common::codec::to_hex(ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key().as_bytes());
    std::fs::write(dir.join("signer.pub"), format!("{signer}\n")).unwrap();

    let out = auditor(&dir, &["verify-report", "r.json", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["valid"], true);
    assert_eq!(v["verdict"], "consistent");
    assert_eq!(v["auditor_public_key"], signer.as_str());
    assert!(v.get("error").is_none(), "{v}");

    // The expected key, in every way it can be given (upper case too).
    let at_file = format!("@{}", dir.join("signer.pub").display());
    for args in [
        vec!["--auditor-key", signer.as_str()],
        vec!["--auditor-key", &at_file],
        vec!["--auditor-key-file", "signer.pub"],
    ] {
        let mut a = vec!["verify-report", "r.json", "--json"];
        a.extend(args.iter().copied());
        let out = auditor(&dir, &a);
        assert_eq!(out.status.code(), Some(0), "{a:?}: {}", stderr(&out));
        assert_eq!(json(&out)["valid"], true, "{a:?}");
        assert_eq!(json(&out)["expected_auditor_key"], signer.as_str(), "{a:?}");
    }
    let upper = signer.to_ascii_uppercase();
    assert_eq!(auditor(&dir, &["verify-report", "r.json", "--auditor-key", &upper]).status.code(), Some(0));

    // Another key: not valid, and both keys are named.
    let out = auditor(&dir, &["verify-report", "r.json", "--json", "--auditor-key", &other]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["valid"], false);
    assert_eq!(v["verdict"], serde_json::Value::Null);
    let e = v["error"].as_str().unwrap();
    assert!(e.contains(&signer) && e.contains(&other), "{e}");
    let out = auditor(&dir, &["verify-report", "r.json", "--auditor-key", &other]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("does NOT verify") && text.contains(&signer) && text.contains(&other), "{text}");

    // An altered report: not valid, with the reason.
    let text = std::fs::read_to_string(dir.join("r.json")).unwrap();
    std::fs::write(dir.join("t.json"), text.replace("\"consistent\"", "\"diverged\"")).unwrap();
    let out = auditor(&dir, &["verify-report", "t.json", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["valid"], false);
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");
    std::fs::write(dir.join("bin.json"), [0xff, 0xfe, 0x00]).unwrap();
    let out = auditor(&dir, &["verify-report", "bin.json", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json(&out)["valid"], false);

    // A report that exists but cannot be read: could not decide (2), not "invalid".
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::copy(dir.join("r.json"), dir.join("locked.json")).unwrap();
        std::fs::set_permissions(dir.join("locked.json"), std::fs::Permissions::from_mode(0o000)).unwrap();
        // Root reads anything; the case only exists for other users.
        if std::fs::read(dir.join("locked.json")).is_err() {
            let out = auditor(&dir, &["verify-report", "locked.json", "--json"]);
            assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
            assert!(out.stdout.is_empty());
        }
    }
}

#[test]
fn trainer_pubkey_pins_the_records_own_key() {
    let dir = scratch("cli-trainer-key");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let key = manifest_key(&honest);
    std::fs::write(dir.join("trainer.pub"), format!("{key}\n")).unwrap();
    let rec = honest.to_str().unwrap();
    for pinned in [key.clone(), key.to_ascii_uppercase(), "@trainer.pub".to_string()] {
        let out = auditor(&dir, &["audit", "--record", rec, "--trainer-pubkey", &pinned, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{pinned}: {}", stderr(&out));
        let v = json(&out);
        assert_eq!(v["verdict"]["kind"], "consistent");
        assert_eq!(v["trainer_public_key"], key.as_str());
    }
    // Another key: the record is not the pinned trainer's.
    let other = common::codec::to_hex(ed25519_dalek::SigningKey::from_bytes(&[2; 32]).verifying_key().as_bytes());
    let out = auditor(&dir, &["audit", "--record", rec, "--trainer-pubkey", &other, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["verdict"]["kind"], "commitment-invalid");
    let what = v["verdict"]["what"].as_str().unwrap();
    assert!(what.contains(&key) && what.contains(&other), "{what}");

    // Unfinished, or its manifest withheld: nothing is signed. Without a pin the audit says the
    // committed steps agree and that the root is unsigned; with one, the record is not the pinned
    // trainer's (a withheld signature), even though every step agrees. A divergence stays
    // `diverged` either way (`hostile_server.rs`).
    std::fs::remove_file(honest.join("manifest.json")).unwrap();
    let out = auditor(&dir, &["audit", "--record", rec]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.starts_with("verdict: consistent\n"), "{text}");
    assert!(
        text.contains("unfinished run: 13 of 13 planned steps committed so far; root ") && text.contains("not signed"),
        "{text}"
    );
    let out = auditor(&dir, &["audit", "--record", rec, "--trainer-pubkey", &key, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(
        (v["verdict"]["kind"].as_str(), v["verdict"]["file"].as_str()),
        (Some("commitment-invalid"), Some("manifest.json"))
    );
    let what = v["verdict"]["what"].as_str().unwrap();
    assert!(what.starts_with("withheld") && what.contains(&key) && what.contains("13 committed steps"), "{what}");
    // A run whose trainer signed its root before the steps its spec plans: the steps it signed
    // agree, and the audit says it stopped early.
    let early = write_record(&dir.join("early"), Profile::Cpu, SGD, Drill { stop_after: Some(10), ..Drill::default() });
    let out = auditor(&dir, &["audit", "--record", early.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(text.contains("stopped early: the trainer signed its root after 10 of 13 planned steps"), "{text}");
    // A spot check asking for more intervals than there are says how many it replayed.
    let out = auditor(&dir, &["audit", "--record", rec, "--mode", "spot", "--spot-count", "100", "--spot-seed", "1"]);
    assert!(stdout(&out).contains("spot check: 4 intervals, every one the record has (100 asked)"), "{}", stdout(&out));
}

#[test]
fn a_diverged_verdict_names_the_tensors_that_differ() {
    let dir = scratch("cli-tensors");
    // Step 4 ends a checkpoint interval, so the trainer's state there is on record.
    let bad = write_record(
        &dir.join("bad"),
        Profile::Cpu,
        SGD,
        Drill { fault: Some(Fault { kind: FaultKind::ScaleLr, step: 4 }), ..Drill::default() },
    );
    let out = auditor(&dir, &["audit", "--record", bad.to_str().unwrap(), "--key", "k.key"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("verdict: diverged at step 4\n"), "{text}");
    // A 10x learning rate moves the weights: each differing tensor, with a count, the first
    // index and both values, as the JSON report has them.
    let out = auditor(&dir, &["audit", "--record", bad.to_str().unwrap(), "--key", "k.key", "--json"]);
    let tensors = json(&out)["at_step"]["state"]["tensors"].as_array().cloned().unwrap_or_default();
    assert!(!tensors.is_empty(), "{}", stdout(&out));
    for t in tensors.iter().take(20) {
        let name = t["tensor"].as_str().unwrap();
        let want = format!(
            "tensor {name}: {} elements differ, first at index {}: trainer {}, auditor {}",
            t["elements"], t["first_index"], t["trainer"], t["auditor"]
        );
        assert!(text.contains(&want), "{want:?} not in\n{text}");
    }
}

/// The intervals line of the human output.
fn intervals_line(text: &str) -> String {
    text.lines().find(|l| l.contains("intervals replayed:")).unwrap_or_else(|| panic!("{text}")).to_string()
}

/// The seed in "spot seed N (how".
fn spot_seed(text: &str) -> (u64, String) {
    let rest = text.split("spot seed ").nth(1).unwrap_or_else(|| panic!("no spot seed in {text}"));
    let mut words = rest.split_whitespace();
    let seed = words.next().unwrap().parse().unwrap();
    let how = words.next().unwrap().trim_start_matches('(').trim_end_matches(':').to_string();
    (seed, how)
}

#[test]
fn spot_checks_draw_a_fresh_seed_unless_given_one() {
    let dir = scratch("cli-spot");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let rec = honest.to_str().unwrap();
    let spot = |extra: &[&str]| {
        let mut a = vec!["audit", "--record", rec, "--mode", "spot", "--spot-count", "1"];
        a.extend(extra.iter().copied());
        let out = auditor(&dir, &a);
        assert_eq!(out.status.code(), Some(0), "{a:?}: {}", stderr(&out));
        stdout(&out)
    };
    let first = spot(&[]);
    let (seed, how) = spot_seed(&first);
    assert_eq!(how, "fresh", "{first}");
    let (second_seed, second_how) = spot_seed(&spot(&[]));
    assert_eq!(second_how, "fresh");
    assert_ne!(seed, second_seed, "two fresh draws (a 2^-64 chance of equal seeds)");

    // The printed seed reproduces the draw, and says it was given.
    let again = spot(&["--spot-seed", &seed.to_string()]);
    assert_eq!(spot_seed(&again), (seed, "given".to_string()), "{again}");
    assert_eq!(intervals_line(&again), intervals_line(&first));

    // The JSON (the signed report) says the same.
    let v: serde_json::Value = serde_json::from_str(&spot(&["--json"])).unwrap();
    assert_eq!(v["spot_seed_chosen"], "fresh", "{v}");
    assert!(v["spot_seed"].as_u64().is_some(), "{v}");
    let v: serde_json::Value = serde_json::from_str(&spot(&["--json", "--spot-seed", &seed.to_string()])).unwrap();
    assert_eq!((v["spot_seed"].as_u64(), v["spot_seed_chosen"].as_str()), (Some(seed), Some("given")), "{v}");
}

/// Spawns the binary with stdout a pipe whose read end is closed before it writes.
fn with_closed_stdout(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_auditor"))
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().code(), err)
}

#[test]
fn a_reader_that_closes_early_ends_the_output_quietly() {
    let dir = scratch("cli-pipe");
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let rec = honest.to_str().unwrap();
    let ev = faulty_at_step_one_with_evidence(&dir);
    assert_eq!(ev.step, 1);
    let out = auditor(&dir, &["audit", "--record", rec, "--report", "r.json"]);
    assert_eq!(out.status.code(), Some(0));
    // Each command keeps the exit code of its answer.
    for (args, code) in [
        (vec!["audit", "--record", rec], 0),
        (vec!["audit", "--record", rec, "--json"], 0),
        (vec!["audit", "--record", "bad/record", "--json"], 1),
        (vec!["verify-report", "r.json", "--json"], 0),
        (vec!["verify-report", "r.json"], 0),
        (vec!["adjudicate", "--evidence", "e.tbev", "--json"], 1),
        (vec!["--help"], 0),
    ] {
        let (status, err) = with_closed_stdout(&dir, &args);
        assert_eq!(status, Some(code), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.to_lowercase().contains("broken pipe"), "{args:?}: {err}");
    }

    // stderr closed too (`2>&1 | head -1` after the reader left): a usage error still exits 64.
    let status = Command::new(env!("CARGO_BIN_EXE_auditor"))
        .current_dir(&dir)
        .args(["audit", "--record", rec, "--device", "gpu"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(|mut c| {
            drop(c.stdout.take());
            drop(c.stderr.take());
            c.wait().unwrap()
        })
        .unwrap();
    assert_eq!(status.code(), Some(64));
}

/// The CLI gives one adverse verdict for a guilty record whatever the mode, the starting step
/// or the number of replay workers: here a checkpoint with a tensor missing, under a correct
/// hash, leaf, root and signature.
#[test]
fn a_guilty_record_gets_the_same_verdict_from_every_mode_and_thread_count() {
    use support::tamper::{rebuilt, tamper_checkpoint};
    let dir = scratch("cli-guilty");
    let record = write_record(&dir.join("g"), Profile::Cpu, SGD, Drill::default());
    tamper_checkpoint(&record, 8, |s| {
        rebuilt(s, |n, t| if n.contains("momentum") { vec![] } else { vec![(n.into(), t.clone())] })
    });
    let rec = record.to_str().unwrap();
    let runs: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--from", "9"],
        vec!["--mode", "intervals", "--threads", "1"],
        vec!["--mode", "intervals", "--threads", "2"],
        vec!["--mode", "intervals", "--threads", "8"],
        vec!["--mode", "spot", "--spot-count", "8"],
        vec!["--mode", "spot", "--spot-count", "8", "--spot-by", "largest-update"],
    ];
    let mut verdicts = Vec::new();
    for extra in runs {
        let mut args = vec!["audit", "--record", rec, "--json"];
        args.extend(&extra);
        let out = auditor(&dir, &args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        verdicts.push((extra, json(&out)["verdict"].clone()));
    }
    let first = &verdicts[0].1;
    assert_eq!(first["kind"], "commitment-invalid", "{first}");
    assert_eq!(first["file"], "checkpoints/0000000008.state.zst", "{first}");
    assert!(first["what"].as_str().unwrap().contains("momentum"), "names the tensor: {first}");
    for (extra, v) in &verdicts[1..] {
        assert_eq!(v, first, "{extra:?}");
    }
    let out = auditor(&dir, &["audit", "--record", rec, "--threads", "0"]);
    assert_eq!(out.status.code(), Some(64));
}

/// Issue 16: a fleet's key is made once with `keygen`; an existing file is never overwritten.
#[test]
fn keygen_makes_a_key_once_and_never_overwrites_one() {
    let dir = scratch("keygen");
    let out = auditor(&dir, &["keygen", "--out", "firm.key"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8(out.stdout).unwrap();
    assert!(public.trim().len() == 64 && public.trim().bytes().all(|b| b.is_ascii_hexdigit()), "{public}");
    let secret = std::fs::read(dir.join("firm.key")).unwrap();
    let again = auditor(&dir, &["keygen", "--out", "firm.key"]);
    assert_eq!(again.status.code(), Some(64), "a usage error");
    assert!(String::from_utf8_lossy(&again.stderr).contains("firm.key"), "the message names the file");
    assert_eq!(std::fs::read(dir.join("firm.key")).unwrap(), secret, "the key is untouched");
}

/// Runs the auditor with a 10 s limit: a command waiting on a FIFO fails the test instead of
/// hanging the suite.
fn auditor_within_10s(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_auditor"));
    cmd.current_dir(dir).args(args).stdin(Stdio::null());
    common::files::within_10s(move || cmd.output().unwrap())
}

/// A FIFO (or a device) wherever a path is read, named by the user or inside a trainer's record,
/// is refused at once, naming the file, never waited on or read without end. Inside the record
/// it is the trainer's finding; on the command line it is the user's mistake.
#[test]
fn special_files_are_refused_not_waited_on() {
    let dir = scratch("cli-special-files");
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let f = fifo.to_str().unwrap();
    let honest = write_record(&dir.join("honest"), Profile::Cpu, SGD, Drill::default());
    let rec = honest.to_str().unwrap();

    // The record's spec.json a FIFO, with no --device: the default profile is picked from the
    // spec, which must not block; the audit then finds the record's fault.
    let odd = dir.join("odd");
    std::fs::create_dir(&odd).unwrap();
    for e in std::fs::read_dir(&honest).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), odd.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(odd.join("spec.json")).unwrap();
    std::os::unix::fs::symlink(&fifo, odd.join("spec.json")).unwrap();
    let out = auditor_within_10s(&dir, &["audit", "--record", odd.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(
        (v["verdict"]["kind"].as_str(), v["verdict"]["file"].as_str()),
        (Some("commitment-invalid"), Some("spec.json"))
    );
    assert!(v["verdict"]["what"].as_str().unwrap().contains("a FIFO"), "{v}");

    let zero = "/dev/zero";
    for (args, code, needle) in [
        (vec!["audit", "--record", rec, "--trainer-pubkey", &format!("@{f}")], 64, "a FIFO"),
        (vec!["verify-report", f], 64, "a FIFO"),
        (vec!["verify-report", zero], 64, "a character device"),
        (vec!["adjudicate", "--evidence", f], 2, "a FIFO"),
        (vec!["serve", "--config", f], 64, "a FIFO"),
        (vec!["serve", "--token-file", f, "--state-dir", "st"], 64, "a FIFO"),
        (vec!["list", "--daemon", "http://127.0.0.1:9", "--token-file", f], 64, "a FIFO"),
    ] {
        let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
        let out = auditor_within_10s(&dir, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.contains(needle) && (err.contains(f) || err.contains(zero)),
            "{args:?}: names the file and its kind: {err}"
        );
    }
}

/// Every file under `dir`, by relative path.
fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// `--report` and `--evidence` never damage what is stored: a path inside the record (whose
/// trainer a later audit would blame), the signing key, a file of another kind, a directory that
/// does not exist are refused as usage (64) before the replay, and nothing changes. A report
/// replaces an earlier report.
#[test]
fn output_paths_that_would_damage_something_are_refused() {
    let dir = scratch("cli-outputs");
    let rec = write_record(&dir.join("rec"), Profile::Cpu, SGD, Drill::default());
    let r = rec.to_str().unwrap();
    let key = format!("{}\n", "ab".repeat(32));
    std::fs::write(dir.join("k.key"), &key).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine\n").unwrap();
    let before = files(&rec);
    for (flag, path, says) in [
        ("--report", format!("{r}/spec.json"), "inside the record"),
        ("--report", format!("{r}/report.json"), "inside the record"),
        ("--evidence", format!("{r}/manifest.json"), "inside the record"),
        ("--report", "k.key".into(), "left as it is"),
        ("--report", "notes.txt".into(), "left as it is"),
        ("--report", "nowhere/r.json".into(), "does not exist"),
    ] {
        let out = auditor(&dir, &["audit", "--record", r, "--key", "k.key", flag, &path]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{flag} {path}: {err}");
        assert!(err.contains(says) && err.contains(&path) && !err.contains("replay"), "{flag} {path}: {err}");
    }
    assert!(files(&rec) == before, "the record is unchanged");
    assert_eq!(std::fs::read_to_string(dir.join("k.key")).unwrap(), key, "the key is unchanged");
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine\n");
    // The record still audits consistent, and a report replaces a report.
    for _ in 0..2 {
        let out = auditor(&dir, &["audit", "--record", r, "--key", "k.key", "--report", "r.json"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert!(std::fs::read_to_string(dir.join("r.json")).unwrap().contains("\"consistent\""));
    // The auditor's secret key is not kept in a record either (a record is published).
    let out = auditor(&dir, &["audit", "--record", r, "--key", &format!("{r}/auditor.key")]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("keep the signing key outside") && !rec.join("auditor.key").exists());
    // A stream takes the report as it is (`--report /dev/stdout` into a pipe).
    let out = auditor(&dir, &["audit", "--record", r, "--key", "k.key", "--report", "/dev/stdout"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"signature\""), "{}", stdout(&out));
    // A consistent audit leaves no earlier bundle beside its report, to be read as its own.
    std::fs::write(dir.join("old.tbev"), b"TBEV-an-earlier-bundle").unwrap();
    let out =
        auditor(&dir, &["audit", "--record", r, "--key", "k.key", "--report", "r.json", "--evidence", "old.tbev"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!dir.join("old.tbev").exists() && stderr(&out).contains("removed"), "{}", stderr(&out));
    // A report named like a key that does not exist yet: the key is made first, and the report
    // does not replace it.
    let out = auditor(&dir, &["audit", "--record", r, "--key", "new.key", "--report", "new.key"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(!std::fs::read_to_string(dir.join("new.key")).unwrap().contains('{'), "the new key is a key");
}

/// A run this machine has not the memory for is the auditor's own limit (exit 2), said before
/// anything is allocated; the same record audits consistent with the memory there.
#[test]
fn too_little_memory_is_the_auditors_limit() {
    let dir = scratch("cli-memory");
    let rec = write_record(&dir.join("rec"), Profile::Cpu, SGD, Drill::default());
    let out = Command::new(env!("CARGO_BIN_EXE_auditor"))
        .current_dir(&dir)
        .env(engine::memory::AVAILABLE_ENV, "4096")
        .args(["audit", "--record", rec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("this auditor's memory") && err.contains("needs at least"), "{err}");
    let out = auditor(&dir, &["audit", "--record", rec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Each replay thread holds a step: memory for one is enough for one thread, not for two.
    let spec = engine::spec::RunSpec::from_committed_json(&std::fs::read(rec.join("spec.json")).unwrap()).unwrap();
    let one = engine::memory::run_bytes(&spec.config.sizes().unwrap(), 1);
    let limited = |threads: &str| {
        Command::new(env!("CARGO_BIN_EXE_auditor"))
            .current_dir(&dir)
            .env(engine::memory::AVAILABLE_ENV, (one + 1).to_string())
            .args(["audit", "--record", rec.to_str().unwrap(), "--mode", "intervals", "--threads", threads])
            .output()
            .unwrap()
    };
    let out = limited("2");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("with 2 replay threads"), "{}", stderr(&out));
    assert_eq!(limited("1").status.code(), Some(0));
}
