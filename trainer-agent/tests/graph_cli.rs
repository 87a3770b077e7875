//! A user's graph through the documented CLI: `trainer-agent train --config
//! configs/synthetic-graph.toml` trains it, twice to the same root, and `export` writes its
//! parameters under their candle-nn names. (The auditor's side: `auditor/tests/graph.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_trainer-agent");

fn graph_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("configs/synthetic-graph.toml")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tb-graph-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train(out: &Path, config: &Path, extra: &[&str]) -> Output {
    Command::new(BIN).args(["train", "--config"]).arg(config).arg("--out").arg(out).args(extra).output().unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn a_graph_config_trains_deterministically_and_exports_with_candle_names() {
    let base = tmp("train");
    let a = json(&train(&base.join("a"), &graph_config(), &["--steps", "12", "--json"]));
    let b = json(&train(&base.join("b"), &graph_config(), &["--steps", "12", "--json"]));
    assert_eq!(a["root"], b["root"], "same graph and seed must give the same root");
    assert_eq!(a["n_steps"], 12);

    let file = base.join("model.safetensors");
    let o = Command::new(BIN).arg("export").arg(base.join("a")).arg("--out").arg(&file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["fc1.weight"]["shape"], serde_json::json!([64, 32]));
    assert_eq!(header["fc2.weight"]["shape"], serde_json::json!([64, 64]));
    assert_eq!(header["head.bias"]["shape"], serde_json::json!([8]));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn an_invalid_graph_is_refused_naming_the_node_and_field_and_nothing_is_written() {
    let base = tmp("bad");
    let text = std::fs::read_to_string(graph_config()).unwrap();
    let bad = base.join("bad.toml");
    std::fs::write(&bad, text.replace(r#"inputs = ["act1", "act2"]"#, r#"inputs = ["act1", "act3"]"#)).unwrap();
    let out = base.join("r");
    let o = train(&out, &bad, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("model.nodes[4].inputs[1]") && err.contains("act3"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "nothing is written for an invalid graph");
    let _ = std::fs::remove_dir_all(&base);
}
