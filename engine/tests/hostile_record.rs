//! A hostile trainer's record on disk: special files in place of record files are refused
//! quickly (no hang, no unbounded read) as `Corrupt`; the manifest must agree with the spec; a
//! finished record must checkpoint its final state; checkpoints decompress within the bound the
//! spec implies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::record::{
    self, CHECKPOINTS_DIR, MANIFEST_FILE, Manifest, Record, RecordError, RecordWriter, SPEC_FILE, SigningKey,
};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;

const CONFIG: &str = r#"
[model]
kind = "mlp"
hidden = [8]
[data]
kind = "synthetic"
examples = 96
holdout = 16
features = 6
classes = 3
[train]
batch_size = 8
steps = 5
seed = 3
checkpoint_interval = 2
[optimizer]
kind = "sgd"
lr = 0.1
momentum = 0.9
"#;

const KEY: [u8; 32] = [7; 32];

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tiebreak-hostile-record-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A finished 5-step record (checkpoints at 0, 2, 4 and the final 5).
fn record(name: &str) -> PathBuf {
    let cfg = Config::from_toml(CONFIG, "test").unwrap();
    let run = Run::from_config(&cfg, None, Profile::Cpu, 5).unwrap();
    let dir = scratch(name).join("rec");
    let mut w = RecordWriter::create(&dir, &run.spec).unwrap();
    let mut state = run.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=5 {
        let o = run.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&KEY)).unwrap();
    dir
}

/// Runs `f` on a helper thread; fails if it takes more than 10 s (a blocked open, an endless
/// read).
fn quickly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("did not return within 10 s")
}

/// Replaces `path` with a special file of `kind`.
fn replace(path: &Path, kind: &str) {
    std::fs::remove_file(path).unwrap();
    match kind {
        "directory" => std::fs::create_dir(path).unwrap(),
        "fifo" => assert!(std::process::Command::new("mkfifo").arg(path).status().unwrap().success()),
        "dev-zero" => std::os::unix::fs::symlink("/dev/zero", path).unwrap(),
        "loop" => {
            let other = path.with_extension("loop");
            std::os::unix::fs::symlink(&other, path).unwrap();
            std::os::unix::fs::symlink(path, &other).unwrap();
        }
        _ => unreachable!(),
    }
}

fn expect_corrupt(r: Result<impl std::fmt::Debug, RecordError>, path: &Path, what: &str) {
    match r {
        Err(RecordError::Corrupt { path: p, what: w, .. }) => {
            assert_eq!(p, path, "{what}: {w}");
            assert!(w.contains("not a regular file"), "{what}: {w}");
        }
        other => panic!("{what}: expected Corrupt naming {}, got {other:?}", path.display()),
    }
}

#[test]
fn special_files_in_place_of_record_files_are_corrupt_and_quick() {
    for kind in ["directory", "fifo", "dev-zero", "loop"] {
        let dir = record(&format!("special-{kind}"));
        // A step's log and batch, and a checkpoint, read through an opened record.
        let log = record::log_path(&dir, 3);
        let batch = record::batch_path(&dir, 3);
        let ckpt = record::checkpoint_path(&dir, 2);
        for p in [&log, &batch, &ckpt] {
            replace(p, kind);
        }
        let (d, l, b, c) = (dir.clone(), log.clone(), batch.clone(), ckpt.clone());
        quickly(move || {
            let rec = Record::open(&d).unwrap();
            expect_corrupt(rec.log(3), &l, kind);
            expect_corrupt(rec.log_bytes(3), &l, kind);
            expect_corrupt(rec.batch(3), &b, kind);
            expect_corrupt(rec.checkpoint(2), &c, kind);
            assert_eq!(rec.checkpoint_at_or_before(3), Some(2), "the listing does not probe files");
        });
        // The files every open reads: spec, manifest, leaves.
        for name in [SPEC_FILE, MANIFEST_FILE, record::LEAVES_FILE] {
            let dir = record(&format!("special-{kind}-{name}"));
            let path = dir.join(name);
            replace(&path, kind);
            let d = dir.clone();
            expect_corrupt(quickly(move || Record::open(&d)), &path, &format!("{kind} {name}"));
        }
    }
}

#[test]
fn a_missing_file_stays_not_found() {
    let dir = record("missing");
    std::fs::remove_file(record::log_path(&dir, 3)).unwrap();
    let rec = Record::open(&dir).unwrap();
    assert!(matches!(rec.log(3), Err(RecordError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound));
}

#[test]
fn a_finished_record_without_its_final_checkpoint_is_corrupt() {
    let dir = record("final");
    let last = record::checkpoint_path(&dir, 5);
    assert!(last.is_file(), "finish writes the off-interval final checkpoint");
    assert_eq!(Record::open(&dir).unwrap().checkpoint_steps(), vec![0, 2, 4, 5]);
    std::fs::remove_file(&last).unwrap();
    match Record::open(&dir) {
        Err(RecordError::Corrupt { path, .. }) => {
            assert_eq!(path, last);
            assert!(path.starts_with(dir.join(CHECKPOINTS_DIR)));
        }
        other => panic!("expected Corrupt naming the final checkpoint, got {other:?}"),
    }
}

/// Rewrites the manifest with `edit` applied and signs it again with the trainer's key: a
/// manifest the trainer could really have signed.
fn resign(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = dir.join(MANIFEST_FILE);
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    use ed25519_dalek::Signer as _;
    m.signature = common::codec::to_hex(&SigningKey::from_bytes(&KEY).sign(&m.signing_payload()).to_bytes());
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn manifest_fields_must_agree_with_the_spec() {
    type Edit = fn(&mut Manifest);
    let cases: [(&str, Edit); 4] = [
        ("checkpoint_interval", |m| m.checkpoint_interval = 3),
        ("device_profile", |m| m.device_profile = "cpu-seq".into()),
        ("format_version", |m| m.format_version = engine::spec::FORMAT_VERSION + 1),
        ("n_steps", |m| m.n_steps = 6),
    ];
    for (field, edit) in cases {
        let dir = record(&format!("manifest-{field}"));
        Record::open(&dir).unwrap();
        resign(&dir, edit);
        match Record::open(&dir) {
            Err(RecordError::Corrupt { path, what, .. }) => {
                assert_eq!(path, dir.join(MANIFEST_FILE));
                assert!(what.starts_with(field), "{field}: {what}");
            }
            other => panic!("{field}: expected Corrupt, got {other:?}"),
        }
    }
}

#[test]
fn an_invalid_spec_in_a_record_is_corrupt_naming_the_field() {
    let dir = record("spec");
    let path = dir.join(SPEC_FILE);
    let text = std::fs::read_to_string(&path).unwrap().replace("\"batch_size\":8", "\"batch_size\":0");
    std::fs::write(&path, text).unwrap();
    match Record::open(&dir) {
        Err(RecordError::Corrupt { path: p, what, .. }) => {
            assert_eq!(p, path);
            assert!(what.contains("config.train.batch_size"), "{what}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn leaves_beyond_the_spec_are_refused_before_reading() {
    let dir = record("leaves");
    let path = dir.join(record::LEAVES_FILE);
    let f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    // A sparse 1 TiB leaves file: reading it would take forever.
    f.set_len(1 << 40).unwrap();
    let d = dir.clone();
    match quickly(move || Record::open(&d)) {
        Err(RecordError::Corrupt { path: p, what, .. }) => {
            assert_eq!(p, path);
            assert!(what.contains("more than"), "{what}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn checkpoints_decompress_within_the_spec_s_state_size() {
    let dir = record("bound");
    let rec = Record::open(&dir).unwrap();
    let state = rec.checkpoint(4).unwrap();
    // The bound is the exact size of this model's state: an honest checkpoint fits it exactly.
    assert_eq!(rec.state_bytes_max(), state.encode().len());
    assert_eq!(rec.spec().state_bytes_max().unwrap(), state.encode().len());
    // A checkpoint that decompresses to one byte more than a state of this model is refused.
    let mut raw = state.encode();
    raw.push(0);
    let path = record::checkpoint_path(&dir, 4);
    std::fs::write(&path, common::tielog::compress_canonical(&raw)).unwrap();
    match rec.checkpoint(4) {
        Err(RecordError::Corrupt { path: p, what, .. }) => {
            assert_eq!(p, path);
            assert!(what.contains("more than"), "{what}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn resume_refuses_a_special_entry_in_the_record_s_directories() {
    let cfg = Config::from_toml(CONFIG, "test").unwrap();
    let run = Run::from_config(&cfg, None, Profile::Cpu, 5).unwrap();
    let dir = scratch("resume").join("rec");
    let mut w = RecordWriter::create(&dir, &run.spec).unwrap();
    let mut state = run.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=3 {
        let o = run.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    drop(w);
    // Resuming removes later steps' files; a directory among them is not removed blindly.
    let odd = record::checkpoint_path(&dir, 4);
    std::fs::create_dir(&odd).unwrap();
    match RecordWriter::resume(&dir, &run.spec) {
        Err(RecordError::Corrupt { path, what, .. }) => {
            assert_eq!(path, odd);
            assert!(what.contains("not a regular file"), "{what}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
    }
    std::fs::remove_dir(&odd).unwrap();
    let (_, point) = RecordWriter::resume(&dir, &run.spec).unwrap();
    assert_eq!(point.state.step, 2);
}
