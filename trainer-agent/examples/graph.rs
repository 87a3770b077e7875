//! Bring your own model, in Rust: build a graph with `engine::graph::GraphBuilder`, train it
//! with the embedding API, and replay the record on another device profile from the record
//! alone (the spec carries the graph; the replayer never sees this file).
//!
//! ```text
//! cargo run --release -p tiebreak-trainer-agent --example graph -- /tmp/tiebreak-graph
//! cargo run --release -p tiebreak-auditor -- audit --record /tmp/tiebreak-graph/record
//! ```

use std::path::PathBuf;

use engine::data::Dataset;
use engine::graph::GraphBuilder;
use engine::record::Record;
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::{Device, Profile};
use trainer_agent::{Session, SessionOptions};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp/tiebreak-graph".into()));
    let _ = std::fs::remove_dir_all(&out);

    // A residual MLP with GELU, in the style of candle-nn.
    let mut g = GraphBuilder::new();
    let x = g.input();
    let h = g.linear("fc1", &x, 64);
    let h = g.gelu("act1", &h);
    let r = g.linear("fc2", &h, 64);
    let r = g.gelu("act2", &r);
    let h = g.add("res", &h, &r);
    let logits = g.linear("head", &h, 8);
    g.cross_entropy("loss", &logits);

    // Data, schedule and optimizer from the synthetic demo config; the model is the graph.
    let config_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/synthetic-mlp.toml");
    let mut config = Config::from_toml(&std::fs::read_to_string(config_path)?, config_path)?;
    config.model = g.build().into();

    let opts = SessionOptions {
        config,
        data: None,
        out: out.join("record"),
        device: Profile::Cpu,
        steps: Some(60),
        resume: false,
        faults: Vec::new(),
        key: Some(out.join("trainer.key")),
        init_weights: None,
    };
    let mut session = Session::create(&opts)?;
    while session.next_step().is_some() {
        session.step()?;
    }
    let eval = session.evaluate(256)?;
    let manifest = session.finish()?;
    println!("trained: root {} over {} steps, held-out accuracy {:?}", manifest.root, manifest.n_steps, eval.accuracy);

    // Replay from the record alone, on another profile, following the committed tie-breaks.
    let record = Record::open(&out.join("record"))?;
    let spec = record.spec().clone();
    let data = Dataset::for_config(&spec.config, None)?;
    let run = Run::new(spec, data, Device::new(Profile::CpuSeq)?)?;
    let mut state = run.initial_state()?;
    for step in 1..=record.n_steps() {
        state = run.step(&state, step, StepMode::Replay(&record.log(step)?), None)?.state;
        anyhow::ensure!(state.digest(record.spec().state_hash()) == record.leaf(step)?.state, "step {step} diverged");
    }
    println!("replayed {} steps on cpu-seq: every state matches its leaf", record.n_steps());
    Ok(())
}
