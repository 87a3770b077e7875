//! Interval-parallel replay's speed-up over one thread (issue 20, item 4): a record of the
//! model's first steps with a checkpoint every [`INTERVAL`] steps, audited in `intervals` mode on
//! the auditor's default profile inside a one-thread rayon pool and inside the process's own
//! pool (every core), alternating which goes first; the speed-up is the median of the paired
//! ratios `one thread / all cores`, with its spread.
//!
//! One thread means everything in one thread: the intervals one after another *and* each op's
//! own parallel loops, so the figure is the whole audit's scaling, not the intervals' alone.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use auditor::{AuditOptions, Mode, NoProgress, audit_dir};
use engine::data::Dataset;
use engine::record::{RecordWriter, SigningKey};
use engine::train::StepMode;
use serde_json::{Value, json};

use super::stats::Paired;
use super::{Setup, TRAINER_PROFILE, auditor_profile};

/// Steps between checkpoints of the record: each interval is one parallel task.
pub const INTERVAL: u64 = 2;

/// Trains `steps` (at least 2 intervals' worth) of `setup`'s model into a temporary record and
/// times its interval-parallel audit on one thread and on every core, `reps` (≥ 1) pairs.
pub fn speedup(name: &str, setup: &Setup, steps: u64, reps: usize) -> Result<Value> {
    let steps = steps.max(2 * INTERVAL);
    let mut setup_k = setup.clone();
    setup_k.config.train.checkpoint_interval = INTERVAL;
    let run = setup_k.run(TRAINER_PROFILE, steps)?;
    let dir = std::env::temp_dir().join(format!("tiebreak-bench-intervals-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut w = RecordWriter::create(&dir, &run.spec)?;
    let mut state = run.initial_state()?;
    w.commit_initial(&state)?;
    for t in 1..=steps {
        let o = run.step(&state, t, StepMode::Commit { paper: false }, None)?;
        w.commit_step(&o.state, &o.log, &o.batch)?;
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[7; 32]))?;
    let text = dir.with_extension("txt");
    let data = match &setup.data {
        _ if setup.data_kind == "real" => Some(PathBuf::from(&setup.data_source)),
        // Synthetic text lives only in memory; the auditor reads the same bytes from a file.
        Dataset::Text { raw, .. } => {
            std::fs::write(&text, raw).with_context(|| format!("writing {}", text.display()))?;
            Some(text.clone())
        }
        _ => None,
    };
    let opts = AuditOptions { mode: Mode::Intervals, data, ..AuditOptions::new(auditor_profile()) };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("a one-thread pool")?;
    let audit = || -> Result<f64> {
        let t0 = Instant::now();
        let a = audit_dir(&dir, &opts, &NoProgress)?;
        let s = t0.elapsed().as_secs_f64();
        ensure!(a.verdict.is_consistent(), "{name}: the interval audit of an honest record gave {:?}", a.verdict);
        Ok(s)
    };
    let mut pairs = Paired::default();
    for rep in 0..reps.max(1) {
        let (single, all) = if rep % 2 == 0 {
            let s = one.install(audit)?;
            (s, audit()?)
        } else {
            let a = audit()?;
            (one.install(audit)?, a)
        };
        pairs.push(single, all);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&text);
    Ok(json!({
        "speedup_vs_one_thread": pairs.median(),
        "speedup_spread": pairs.spread(),
        "threads": rayon::current_num_threads(),
        "steps": steps,
        "intervals": steps.div_ceil(INTERVAL),
        "profile": auditor_profile().name(),
        "method": "audit_dir in intervals mode of a fresh honest record, in a one-thread rayon pool and in the process's pool, alternating; median of paired ratios",
    }))
}
