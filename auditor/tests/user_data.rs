//! A run on a user's CSV file, with gradient clipping, gradient accumulation and a schedule,
//! audits `consistent` on every other profile in every mode when the auditor has the same file;
//! a changed byte in its copy is "could not decide" naming the file (the auditor's own data is
//! its own trouble, never a verdict against the trainer, as for MNIST and text).

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
    let mut text = String::from("a,b,c,d,class\n");
    for i in 0..64u32 {
        let c = i % 3;
        // Exact binary fractions and a class-dependent shift.
        let f = |k: u32| ((i * 13 + k * 7) % 16) as f32 / 16.0 - 0.5 + if k == c { 1.0 } else { 0.0 };
        text += &format!("{},{},{},{},{c}\n", f(0), f(1), f(2), f(3));
    }
    let path = dir.join("user.csv");
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
