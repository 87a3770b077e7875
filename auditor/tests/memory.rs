//! The auditor runs in a container without overcommit: it audits the synthetic and the MNIST
//! records under a 2 GB address-space limit (`ulimit -v 2000000`), which it could not while
//! every decompression reserved 4 GiB up front.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;
use support::{Drill, SGD, scratch, write_record};

/// `auditor audit --record RECORD [--data DATA]` under `ulimit -v 2000000`.
fn audit_limited(dir: &Path, record: &Path, data: Option<&Path>) -> std::process::Output {
    let mut cmd = format!(
        "ulimit -v 2000000 && exec '{}' audit --record '{}' --mode intervals",
        env!("CARGO_BIN_EXE_auditor"),
        record.display()
    );
    if let Some(d) = data {
        cmd += &format!(" --data '{}'", d.display());
    }
    Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().unwrap()
}

/// The MNIST files shared with every developer and CI run, when they are there.
fn shared_mnist() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist");
    d.join("t10k-images-idx3-ubyte.gz").exists().then_some(d)
}

fn mnist_record(dir: &Path, data: &Path) -> PathBuf {
    let cfg = Config::from_toml(
        "[model]\nkind = \"mlp\"\nhidden = [128]\n[data]\nkind = \"mnist\"\ntrain = 9000\nholdout = 1000\n\
         [train]\nbatch_size = 64\nsteps = 6\nseed = 1\ncheckpoint_interval = 3\n\
         [optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9",
        "mnist-test",
    )
    .unwrap();
    let r = Run::from_config(&cfg, Some(data), Profile::Cpu, 6).unwrap();
    let out = dir.join("mnist");
    let mut w = RecordWriter::create(&out, &r.spec).unwrap();
    let mut state = r.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=6 {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[7; 32])).unwrap();
    out
}

#[test]
fn the_auditor_audits_under_a_two_gigabyte_address_space_limit() {
    let dir = scratch("memory");
    let record = write_record(&dir.join("synthetic"), Profile::Cpu, SGD, Drill::default());
    let out = audit_limited(&dir, &record, None);
    assert_eq!(out.status.code(), Some(0), "synthetic: {}", String::from_utf8_lossy(&out.stderr));
    match shared_mnist() {
        Some(data) => {
            let record = mnist_record(&dir, &data);
            let out = audit_limited(&dir, &record, Some(&data));
            assert_eq!(out.status.code(), Some(0), "mnist: {}", String::from_utf8_lossy(&out.stderr));
        }
        None => eprintln!("shared/data/mnist not found beside the repository: MNIST part skipped"),
    }
}
