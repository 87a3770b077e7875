//! Replay cost against training cost on the same machine (the issue asks for ≤ 1.1×):
//! trains an MLP on synthetic data with the engine, writing a record, then audits the record
//! in full mode on each profile, and prints both times.
//!
//! `cargo run --release -p tiebreak-auditor --example replay_speed [steps] [hidden]`

use std::time::Instant;

use auditor::{AuditOptions, NoProgress, audit_dir};
use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;

fn main() {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().map_or(40, |s| s.parse().expect("steps"));
    let hidden: usize = args.next().map_or(256, |s| s.parse().expect("hidden width"));
    let text = format!(
        "[model]\nkind = \"mlp\"\nhidden = [{hidden}, {hidden}]\n[data]\nkind = \"synthetic\"\nexamples = 4096\n\
         holdout = 64\nfeatures = 256\nclasses = 10\n[train]\nbatch_size = 64\nsteps = {steps}\nseed = 1\n\
         checkpoint_interval = 10\n[optimizer]\nkind = \"adamw\"\nlr = 0.001\nbeta1 = 0.9\nbeta2 = 0.999\neps = 1e-8\n"
    );
    let cfg = Config::from_toml(&text, "replay_speed").expect("config");
    for trainer in Profile::CPU {
        let run = Run::from_config(&cfg, None, trainer, steps).unwrap();
        let spec = run.spec.clone();
        let dir = std::env::temp_dir().join(format!("tiebreak-replay-speed-{}-{trainer}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = Instant::now();
        let mut w = RecordWriter::create(&dir, &spec).unwrap();
        let mut state = run.initial_state().unwrap();
        w.commit_initial(&state).unwrap();
        for t in 1..=steps {
            let o = run.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
            w.commit_step(&o.state, &o.log, &o.batch).unwrap();
            state = o.state;
        }
        w.finish(&state, &SigningKey::from_bytes(&[1; 32])).unwrap();
        let train_s = t0.elapsed().as_secs_f64();
        for auditor in Profile::CPU {
            let t1 = Instant::now();
            let a = audit_dir(&dir, &AuditOptions::new(auditor), &NoProgress).unwrap();
            let audit_s = t1.elapsed().as_secs_f64();
            println!(
                "trainer {trainer:<10} {train_s:7.3} s | auditor {auditor:<10} {audit_s:7.3} s ({:.2}x) {}",
                audit_s / train_s,
                a.verdict.kind()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
