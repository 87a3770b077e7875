//! A run on a user's CSV file, with gradient clipping, gradient accumulation and a schedule,
//! audits `consistent` on every other profile in every mode when the auditor has the same file;
//! a changed byte in its copy is "could not decide" naming the file (the auditor's own data is
//! its own trouble, never a verdict against the trainer, as for MNIST and text). The daemon
//! keeps users' datasets by name and finds the run's among them by its contents.

mod support;

use std::path::{Path, PathBuf};

use auditor::{AuditError, AuditOptions, Mode, NoProgress, SpotPick, Verdict, audit_dir};
use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;
use support::scratch;

const STEPS: u64 = 9;

fn csv_file(dir: &Path) -> PathBuf {
    csv_file_named(dir, "user.csv", 13)
}

/// 64 rows of 4 features and a class; `mix` changes the numbers (13: the run's file).
fn csv_file_named(dir: &Path, name: &str, mix: u32) -> PathBuf {
    let mut text = String::from("a,b,c,d,class\n");
    for i in 0..64u32 {
        let c = i % 3;
        // Exact binary fractions and a class-dependent shift.
        let f = |k: u32| ((i * mix + k * 7) % 16) as f32 / 16.0 - 0.5 + if k == c { 1.0 } else { 0.0 };
        text += &format!("{},{},{},{},{c}\n", f(0), f(1), f(2), f(3));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn config() -> Config {
    let text = format!(
        r#"
[model]
kind = "mlp"
hidden = [8]
[data]
kind = "csv"
label_column = "class"
header = true
features = 4
classes = 3
holdout = 8
[train]
batch_size = 8
steps = {STEPS}
seed = 21
checkpoint_interval = 3
clip_norm = 0.25
accumulate = 2
[optimizer]
kind = "sgd"
lr = 0.2
momentum = 0.9
[schedule]
kind = "warmup"
warmup_steps = 3
"#
    );
    Config::from_toml(&text, "user.toml").unwrap()
}

fn write_record(dir: &Path, data: &Path) -> PathBuf {
    let r = Run::from_config(&config(), Some(data), Profile::Cpu, STEPS).unwrap();
    let out = dir.join("record");
    let mut w = RecordWriter::create(&out, &r.spec).unwrap();
    let mut state = r.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=STEPS {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[7; 32])).unwrap();
    out
}

#[test]
fn a_csv_run_with_clipping_and_accumulation_audits_consistent_and_a_changed_file_is_named() {
    let dir = scratch("user-data");
    let data = csv_file(&dir);
    let record = write_record(&dir, &data);
    let opts = |device, mode| AuditOptions { mode, data: Some(data.clone()), ..AuditOptions::new(device) };
    for device in [Profile::CpuSeq, Profile::CpuSplitK] {
        for mode in [Mode::Full, Mode::Intervals, Mode::Spot { count: 2, pick: SpotPick::LargestUpdates }] {
            let a = audit_dir(&record, &opts(device, mode), &NoProgress).unwrap();
            assert_eq!(a.verdict, Verdict::Consistent, "{device:?} {mode:?}");
        }
    }

    // Without the file the auditor cannot start.
    let none = AuditOptions::new(Profile::CpuSeq);
    assert!(audit_dir(&record, &none, &NoProgress).is_err());

    // One changed feature value in the auditor's copy: not the committed dataset.
    let text = std::fs::read_to_string(&data).unwrap();
    let line = text.lines().nth(5).unwrap();
    let changed = line.replacen(line.split(',').next().unwrap(), "0.4375", 1);
    assert_ne!(changed, line);
    std::fs::write(&data, text.replacen(line, &changed, 1)).unwrap();
    match audit_dir(&record, &opts(Profile::CpuSeq, Mode::Full), &NoProgress) {
        Err(AuditError::Data(what)) => {
            assert!(what.contains("user.csv") && what.contains("does not match the run's commitment"), "{what}");
        }
        other => panic!("a changed data file must be could-not-decide naming it, got {other:?}"),
    }
}

/// A daemon given several CSV files by name audits the run with the one that is its data,
/// whichever order they come in; a request can name one; a named file that is not the run's,
/// or none that is, fails `undecided` naming the files (the daemon's own data); an unknown name
/// is refused at submission; and a record that does not check out is still a verdict, whatever
/// its spec says of its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_finds_the_runs_dataset_among_its_own() {
    use serde_json::{Value, json};
    use support::{finished, place, start_daemon, start_trainer_with};

    let dir = scratch("user-data-daemon");
    let data = csv_file(&dir);
    let (other, third) = (csv_file_named(&dir, "other.csv", 5), csv_file_named(&dir, "third.csv", 11));
    let records = dir.join("records");
    place(&write_record(&dir.join("a"), &data), &records, "csv-run");
    let broken = place(&write_record(&dir.join("b"), &data), &records, "csv-broken");
    // The spec's bytes changed without a new signature: commitment-invalid.
    let spec_path = broken.join(engine::record::SPEC_FILE);
    let spec = std::fs::read_to_string(&spec_path).unwrap();
    let root = serde_json::from_str::<Value>(&spec).unwrap()["dataset"]["root"].as_str().unwrap().to_string();
    std::fs::write(&spec_path, spec.replace(&root, &"0".repeat(64))).unwrap();

    // The record server too keeps several files of a kind and recomputes a run's states with
    // the one that is its data; with none that is, such a state is 404 naming the files (an
    // auditor resumes from a checkpoint instead).
    let csv = engine::spec::DataKind::Csv;
    let server_with = |files: &[&PathBuf]| {
        let mut opts = trainer_agent::serve::ServeOptions::new(&records);
        opts.datasets = files.iter().map(|p| (csv, p.to_path_buf())).collect();
        start_trainer_with(opts)
    };
    let c = reqwest::Client::new();
    let wrong = server_with(&[&other]).await;
    let r = c.get(format!("{}/v1/runs/csv-run/states/2", wrong.url)).send().await.unwrap();
    let (code, body) = (r.status().as_u16(), r.text().await.unwrap());
    assert!(code == 404 && body.contains("other.csv") && body.contains("does not match"), "{code} {body}");
    wrong.stop().await;
    let trainer = server_with(&[&other, &third, &data]).await;
    let r = c.get(format!("{}/v1/runs/csv-run/states/2", trainer.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    let daemon_with = |files: &[(&str, &PathBuf)]| {
        let mut c = auditor::daemon::Config {
            state_dir: dir.join(format!("state-{}", files.len())),
            progress_interval_ms: 0,
            ..Default::default()
        };
        c.data.files = files.iter().map(|(n, p)| (n.to_string(), p.to_path_buf())).collect();
        c
    };
    let submit = |url: String, body: Value| {
        let c = c.clone();
        async move {
            let r = c.post(format!("{url}/v1/audits")).header("content-type", "application/json");
            let r = r.body(serde_json::to_vec(&body).unwrap()).send().await.unwrap();
            (r.status().as_u16(), serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap())
        }
    };

    // The run's file sorts between two that are not: found by its contents.
    let daemon = start_daemon(daemon_with(&[("a-other", &other), ("clinic", &data), ("z-third", &third)])).await;
    let req = |extra: Value| {
        let mut b = json!({"trainer_url": trainer.url, "run": "csv-run", "mode": "intervals"});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    for extra in [json!({}), json!({"data": "clinic"}), json!({"mode": "full", "device": "cpu-splitk"})] {
        let (code, v) = submit(daemon.url.clone(), req(extra.clone())).await;
        assert_eq!(code, 202, "{v}");
        let s = finished(&c, &daemon.url, v["id"].as_str().unwrap(), None).await;
        assert_eq!((&s["state"], &s["verdict"]), (&json!("done"), &json!("consistent")), "{extra}: {s}");
    }
    // A named file that is not the run's: the daemon's own trouble, naming the file.
    let (code, v) = submit(daemon.url.clone(), req(json!({"data": "a-other"}))).await;
    assert_eq!(code, 202, "{v}");
    let s = finished(&c, &daemon.url, v["id"].as_str().unwrap(), None).await;
    let error = s["error"].as_str().unwrap_or_default();
    assert_eq!((&s["state"], &s["reason"]), (&json!("failed"), &json!("undecided")), "{s}");
    assert!(error.contains("other.csv") && error.contains("does not match"), "{error}");
    // An unknown name is refused at once, listing the names there are.
    let (code, v) = submit(daemon.url.clone(), req(json!({"data": "nowhere"}))).await;
    assert_eq!(code, 400, "{v}");
    let msg = v.to_string();
    assert!(msg.contains("nowhere") && msg.contains("a-other, clinic, z-third"), "{msg}");
    // A record that does not check out is a verdict, before any data is looked for.
    let (_, v) = submit(daemon.url.clone(), json!({"trainer_url": trainer.url, "run": "csv-broken"})).await;
    let s = finished(&c, &daemon.url, v["id"].as_str().unwrap(), None).await;
    assert_eq!(s["verdict"], "commitment-invalid", "{s}");
    daemon.stop().await;

    // None of the daemon's files is the run's: undecided, naming each and its root.
    let daemon = start_daemon(daemon_with(&[("a-other", &other), ("z-third", &third)])).await;
    let (_, v) = submit(daemon.url.clone(), req(json!({}))).await;
    let s = finished(&c, &daemon.url, v["id"].as_str().unwrap(), None).await;
    let error = s["error"].as_str().unwrap_or_default();
    assert_eq!((&s["state"], &s["reason"]), (&json!("failed"), &json!("undecided")), "{s}");
    assert!(error.contains(&root) && error.contains("other.csv") && error.contains("third.csv"), "{error}");
    let (_, v) = submit(daemon.url.clone(), json!({"trainer_url": trainer.url, "run": "csv-broken"})).await;
    let s = finished(&c, &daemon.url, v["id"].as_str().unwrap(), None).await;
    assert_eq!(s["verdict"], "commitment-invalid", "{s}");
    daemon.stop().await;
    trainer.stop().await;
}
