//! A user's graph end to end: trained from `configs/synthetic-graph.toml` by the trainer
//! agent's session (what `trainer-agent train` runs), audited by the `auditor` binary on the
//! other CPU profiles (`cpu-alt`, the default, among them) and in every mode: `consistent`;
//! with a fault, `diverged` at its step.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use engine::spec::Config;
use engine::train::{Fault, FaultKind};
use kernels::Profile;
use support::scratch;
use trainer_agent::{Session, SessionOptions};

fn auditor(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_auditor")).current_dir(dir).args(args).output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// Trains 30 steps of the example graph (checkpoints at 0 and 20) into `dir/<name>`.
fn train(dir: &Path, name: &str, faults: Vec<Fault>) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/synthetic-graph.toml");
    let config = Config::from_toml(&std::fs::read_to_string(&path).unwrap(), "synthetic-graph.toml").unwrap();
    train_config(dir, name, config, None, faults)
}

fn train_config(dir: &Path, name: &str, config: Config, data: Option<PathBuf>, faults: Vec<Fault>) -> PathBuf {
    let out = dir.join(name);
    let opts = SessionOptions {
        config,
        data,
        out: out.clone(),
        device: Profile::Cpu,
        steps: Some(30),
        resume: false,
        faults,
        key: Some(dir.join("trainer.key")),
        init_weights: None,
    };
    let mut session = Session::create(&opts).unwrap();
    while session.next_step().is_some() {
        session.step().unwrap();
    }
    session.finish().unwrap();
    out
}

#[test]
fn a_graph_record_audits_consistent_on_every_other_profile_and_mode() {
    let dir = scratch("graph");
    let honest = train(&dir, "honest", vec![]);
    let rec = honest.to_str().unwrap();
    for device in ["cpu-seq", "cpu-splitk"] {
        for mode in [&["--mode", "full"][..], &["--mode", "intervals"], &["--mode", "spot", "--spot-count", "1"]] {
            let mut args = vec!["audit", "--record", rec, "--device", device, "--json"];
            args.extend_from_slice(mode);
            let out = auditor(&dir, &args);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            let v = json(&out);
            assert_eq!(v["verdict"]["kind"], "consistent", "{args:?}: {v}");
            assert_eq!(v["auditor_device"], device);
        }
    }
    // Without --device, a `cpu` trainer's record is replayed on the fast `cpu-alt`.
    let out = auditor(&dir, &["audit", "--record", rec, "--mode", "intervals", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!((&v["verdict"]["kind"], &v["auditor_device"]), (&"consistent".into(), &"cpu-alt".into()), "{v}");
    let faulty = train(&dir, "faulty", vec![Fault { kind: FaultKind::PerturbWeight, step: 13 }]);
    let out = auditor(&dir, &["audit", "--record", faulty.to_str().unwrap(), "--device", "cpu-seq", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["verdict"]["kind"], "diverged", "{v}");
    assert_eq!(v["verdict"]["step"], 13, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A transformer written as a graph (multi-head attention with dropout, embeddings, layer norm,
/// GELU, residuals) on text, trained by the agent's session and audited by the binary on every
/// other CPU profile in every mode: `consistent`; a fault is `diverged` at its step.
#[test]
fn a_transformer_graph_on_text_audits_consistent_on_every_other_profile_and_mode() {
    let dir = scratch("graph-text");
    let text = dir.join("words.txt");
    std::fs::write(
        &text,
        "shall i compare thee to a summer's day? thou art more lovely and more temperate. ".repeat(8),
    )
    .unwrap();
    // The shipped text graph's data and training settings, a smaller transformer, 12 steps.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/shakespeare-graph.toml");
    let mut config = Config::from_toml(&std::fs::read_to_string(&path).unwrap(), "shakespeare-graph.toml").unwrap();
    config.train.batch_size = 4;
    config.train.steps = Some(12);
    config.train.checkpoint_interval = 4;
    config.model = engine::graph::presets::transformer(16, 16, 4, 2, 0.1).into();
    let honest = train_config(&dir, "honest", config.clone(), Some(text.clone()), vec![]);
    let (rec, data) = (honest.to_str().unwrap(), text.to_str().unwrap());
    for device in ["cpu-seq", "cpu-splitk"] {
        for mode in [&["--mode", "full"][..], &["--mode", "intervals"], &["--mode", "spot", "--spot-count", "1"]] {
            let mut args = vec!["audit", "--record", rec, "--data", data, "--device", device, "--json"];
            args.extend_from_slice(mode);
            let out = auditor(&dir, &args);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(json(&out)["verdict"]["kind"], "consistent", "{args:?}");
        }
    }
    let faulty = train_config(
        &dir,
        "faulty",
        config,
        Some(text.clone()),
        vec![Fault { kind: FaultKind::PerturbWeight, step: 7 }],
    );
    let out = auditor(
        &dir,
        &["audit", "--record", faulty.to_str().unwrap(), "--data", data, "--device", "cpu-seq", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["verdict"]["kind"], "diverged", "{v}");
    assert_eq!(v["verdict"]["step"], 7, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
