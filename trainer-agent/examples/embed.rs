//! Embedding the trainer agent in your own training loop.
//!
//! ```text
//! cargo run --release -p tiebreak-trainer-agent --example embed -- /tmp/tiebreak-embed
//! ```
//! The five phases: create a run from a spec, get each step's batch, run the step through the
//! verified layers, commit it, and finish with the signed commitment.

use std::path::PathBuf;

use engine::spec::Config;
use kernels::Profile;
use trainer_agent::{Session, SessionOptions};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp/tiebreak-embed".into()));
    let _ = std::fs::remove_dir_all(&out);
    let config_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/synthetic-mlp.toml");
    let config = Config::from_toml(&std::fs::read_to_string(config_path)?, config_path)?;

    // 1. Create a run from a spec (dataset committed, record opened, initial state committed).
    let opts = SessionOptions {
        config,
        data: None,
        out: out.join("record"),
        device: Profile::Cpu,
        steps: Some(40),
        resume: false,
        faults: Vec::new(),
        key: Some(out.join("trainer.key")),
        init_weights: None,
    };
    let mut session = Session::create(&opts)?;

    while let Some(step) = session.next_step() {
        // 2. The batch the committed seed dictates for this step (your loader would use it).
        let batch = session.batch(step);
        // 3. Run the step through the verified layers: FP64 compute, FP32 rounding, tie-breaks.
        let output = session.run_step()?;
        assert_eq!(output.batch, batch);
        let logged = output.log.n_entries();
        // 4. Commit it: log, batch (and checkpoint) on disk, then the leaf.
        let leaf = session.commit(output)?;
        if step % 10 == 0 {
            println!(
                "step {step:3}  loss {:.4}  tie-breaks logged {logged}  leaf state {}",
                session.last_loss().unwrap_or(f32::NAN),
                common::codec::to_hex(&leaf.state)
            );
        }
    }
    // 5. Finish: final checkpoint and the signed manifest carrying the root.
    let manifest = session.finish()?;
    println!("root {} over {} steps, signed by {}", manifest.root, manifest.n_steps, manifest.public_key);
    Ok(())
}
