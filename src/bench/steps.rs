//! The paired step loop every timing of the benchmark comes from: for each step `t`, the
//! trainer's verified step beside the plain FP32 candle step on the same batch, then each
//! replayer's replay of step `t` with the trainer's log beside a rerun of the trainer's step,
//! alternating which member of a pair goes first (see [`super::stats`]).
//!
//! The per-preset report (`measure_model`) and the scaling sweep ([`super::scaling`]) both run
//! this loop; the preset report adds its own per-step work (graph against hand-written passes,
//! the paper's dense log) through the `each` hook, after the pairs of the step are timed.

use anyhow::{Context, Result, ensure};
use common::codec::to_hex;
use common::state::TrainingState;
use engine::model::Batch;
use engine::train::{Run, StepMode, StepOutput};
use kernels::Profile;

use super::baseline::Baseline;
use super::stats::Paired;
use super::timed;

/// What the loop measured, one entry per step unless said otherwise. Timings and ratios have
/// one entry per *timed* step: with more than one step, step 1 is a warm-up, run and checked
/// like the others but not timed (every side's first step paid one-off costs, about 3× a
/// later step's at the sweep's small points, which biased the first pairs).
#[derive(Debug)]
pub struct StepTimings {
    /// Seconds of the trainer's step (`Commit`, no paper log, its new state hashed for the leaf)
    /// and of the FP32 step beside it. A replay's seconds include hashing its state too.
    pub train_s: Vec<f64>,
    pub fp32_s: Vec<f64>,
    /// Per-step ratios trainer / FP32.
    pub vs_fp32: Paired,
    /// Per replayer (in the order given): seconds of each replay, and the ratios replay /
    /// rerun of the trainer's step beside it.
    pub replay_s: Vec<Vec<f64>>,
    pub replay_vs: Vec<Paired>,
    /// The trainer's compressed tie-break log of each step.
    pub logs: Vec<Vec<u8>>,
    /// Tie-breaks logged per step.
    pub entries: Vec<f64>,
    pub losses: Vec<f32>,
    pub fp32_losses: Vec<f32>,
    /// The trainer's state after the last step.
    pub state: TrainingState,
}

/// Whether step `t` of `steps` is timed: every step but the first (the warm-up), unless it is
/// the only one.
pub fn is_timed(t: u64, steps: u64) -> bool {
    t > 1 || steps == 1
}

/// Runs `steps` steps of `trainer` from its initial state, timing them in pairs as the module
/// docs say; every replay in `replayers` must give the trainer's state bits. After each step's
/// pairs, `each(t, state before the step, batch, trainer's output)` runs untimed by the loop.
pub fn paired_steps(
    name: &str,
    trainer: &Run,
    replayers: &[(Profile, Run)],
    steps: u64,
    mut each: impl FnMut(u64, &TrainingState, &Batch, &StepOutput) -> Result<()>,
) -> Result<StepTimings> {
    ensure!(steps >= 1, "--steps must be at least 1");
    let init = trainer.initial_state()?;
    let mut fp32 = Baseline::for_run(trainer, &init)?;
    let mut m = StepTimings {
        train_s: Vec::new(),
        fp32_s: Vec::new(),
        vs_fp32: Paired::default(),
        replay_s: replayers.iter().map(|_| Vec::new()).collect(),
        replay_vs: replayers.iter().map(|_| Paired::default()).collect(),
        logs: Vec::new(),
        entries: Vec::new(),
        losses: Vec::new(),
        fp32_losses: Vec::new(),
        state: init,
    };

    for t in 1..=steps {
        let timing = is_timed(t, steps);
        let batch_idx = trainer.batch_indices(t);
        let batch = Batch::gather(&trainer.data, &batch_idx.0);
        // A trainer's step includes hashing its new state for the leaf, and a replay hashes its
        // state to compare with the leaf: both are timed with their hash.
        let train = |s: &TrainingState| {
            trainer.step(s, t, StepMode::Commit { paper: false }, None).map(|o| {
                let h = trainer.state_digest(&o.state);
                (o, h)
            })
        };
        let state = &m.state;
        let ((out, dt_train), (fp32_loss, dt_fp32)) = if t % 2 == 1 {
            let out = timed(|| train(state));
            (out, timed(|| fp32.step(&batch)))
        } else {
            let l = timed(|| fp32.step(&batch));
            (timed(|| train(state)), l)
        };
        let ((out, out_hash), fp32_loss) = (out?, fp32_loss?);
        if timing {
            m.train_s.push(dt_train);
            m.fp32_s.push(dt_fp32);
            m.vs_fp32.push(dt_train, dt_fp32);
        }
        let mut replay_dt = Vec::with_capacity(replayers.len());
        for (k, (profile, r)) in replayers.iter().enumerate() {
            // Each replay is paired with a run of the same trainer step beside it (the first run
            // made the log), alternating which goes first; the rerun must give the same state.
            // Both start from the state before the step (every replay so far gave the trainer's
            // bits, checked below), so neither finds other inputs in the caches.
            // Whichever runs first is reduced to its digest and dropped before the second
            // starts, so neither runs while the other's output (hundreds of MB at the sweep's
            // largest point) is still held. Before this and `kernels::keep_freed_pages`, a
            // replay run second (after the rerun) took 0.89–1.03 s at d_model 512 × batch 8
            // against 0.67–0.72 s run first.
            let from = state;
            let replay = || {
                let (rep, dt) = timed(|| {
                    r.step(from, t, StepMode::Replay(&out.log), None)
                        .map(|o| (r.state_digest(&o.state), o.forged.len()))
                });
                let rep = rep.with_context(|| format!("{name}: replay of step {t} on {profile}"))?;
                anyhow::Ok((rep, dt))
            };
            let rerun = || {
                let (again, dt) = timed(|| train(from));
                anyhow::Ok((again?.1, dt))
            };
            let (((rep, forged), dt), (again, dt_train)) = if t % 2 == 1 {
                (replay()?, rerun()?)
            } else {
                let again = rerun()?;
                (replay()?, again)
            };
            ensure!(again == out_hash, "{name}: step {t} gave another state when rerun");
            replay_dt.push(dt);
            if timing {
                m.replay_s[k].push(dt);
                m.replay_vs[k].push(dt, dt_train);
            }
            ensure!(
                rep == out_hash && forged == 0,
                "{name}: replay of step {t} on {profile} differs from the trainer: state {} vs {}, {forged} forged entries",
                to_hex(&rep),
                to_hex(&out_hash)
            );
        }
        each(t, state, &batch, &out)?;

        m.logs.push(out.log.compress());
        m.entries.push(out.log.n_entries() as f64);
        m.losses.push(out.loss);
        m.fp32_losses.push(fp32_loss);
        eprintln!(
            "bench: {name}: step {t}/{steps}{}: trainer {:.3}s fp32 {:.3}s replay {} loss {:.4} (fp32 {:.4}), {} tie-breaks",
            if timing { "" } else { " (warm-up, not timed)" },
            dt_train,
            dt_fp32,
            replay_dt.iter().map(|dt| format!("{dt:.3}s")).collect::<Vec<_>>().join("/"),
            out.loss,
            fp32_loss,
            out.log.n_entries()
        );
        m.state = out.state;
    }
    Ok(m)
}
