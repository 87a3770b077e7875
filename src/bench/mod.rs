//! The `bench` binary's measurements: for each model, verifiable training against a plain FP32
//! candle step, auditor replay against training, tie-break log size against the paper's dense
//! log, record size against proof-of-learning's storage, peak memory; plus a 100,000-leaf
//! bisection. Everything is measured in one run; nothing is tuned per model.
//!
//! # How the timings are taken
//! For every step `t` of a model, in this process and back to back: the trainer's verified step
//! (`Commit`, no paper log) and the candle FP32 step on the same batch, in alternating order;
//! then, for each CPU profile, the auditor's replay of step `t` with the trainer's log (each
//! profile keeps its own chain of states, which must stay bit-identical to the trainer's) and a
//! rerun of the trainer's step `t` beside it, again in alternating order. Every ratio is the
//! median of these per-step pairs, printed with its minimum and maximum (`*_spread`, see
//! [`stats`]): background load on a shared machine hits both members of a pair alike. The
//! JSON also names the CPU, its SIMD level and the load average at the start and the end.
//!
//! The paper's dense log needs the same step run again with `Commit { paper: true }` (the trits
//! are computed inside the rounding); that run is timed separately and must give the same
//! state bits.
//!
//! # Peak memory
//! `VmHWM` is per process, and this process holds every model at once, so the trainer, the
//! auditor and the FP32 baseline are each run for a few steps in a child process of this
//! binary (`bench --child <role> --model <name>`), which prints its own `VmHWM`.

pub mod baseline;
pub mod handwritten;
pub mod intervals;
pub mod scaling;
pub mod stats;
pub mod steps;
pub mod svg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use common::codec::to_hex;
use common::leaf::LEAF_BYTES;
use common::merkle::{Bisection, BisectionOutcome, MerkleTree};
use common::prng::Stream;
use common::rounding::Rounder;
use common::state::TrainingState;
use common::tielog::{SiteLog, TieBreakLog, compress_canonical};
use engine::data::Dataset;
use engine::graph::{GraphConfig, INPUT, Node, Op};
use engine::model::{Batch, Ctx};
use engine::spec::{
    Config, DataConfig, FORMAT_VERSION, ModelConfig, OptimizerConfig, RunSpec, SOFTWARE_VERSION, SyntheticConfig,
};
use engine::train::{Run, StepMode};
use kernels::{Device, Profile};
use serde_json::{Value, json};

use baseline::Baseline;
use stats::{Paired, load_average, machine, mean, median, min};

/// The models measured, in output order.
pub const MODELS: [&str; 5] = ["mnist-mlp", "mnist-cnn", "shakespeare-gpt", "mnist-resnet", "shakespeare-graph"];

/// Leaves of the bisection benchmark's trees.
pub const BISECTION_LEAVES: u64 = 100_000;

/// The device profile the trainer uses (the default one).
pub const TRAINER_PROFILE: Profile = Profile::Cpu;

fn config_text(model: &str) -> Result<&'static str> {
    Ok(match model {
        "mnist-mlp" => include_str!("../../configs/mnist-mlp.toml"),
        "mnist-cnn" => include_str!("../../configs/mnist-cnn.toml"),
        "shakespeare-gpt" => include_str!("../../configs/shakespeare-gpt.toml"),
        "mnist-resnet" => include_str!("../../configs/mnist-resnet.toml"),
        "shakespeare-graph" => include_str!("../../configs/shakespeare-graph.toml"),
        other => bail!("unknown model {other:?} (known: {})", MODELS.join(", ")),
    })
}

/// The auditor's default profile for the trainer's (what the `auditor` CLI picks when
/// `--device` is not given): `cpu-alt`.
pub fn auditor_profile() -> Profile {
    Profile::auditor_default(Some(TRAINER_PROFILE))
}

/// A model's run, built from its config and either the real data under `data_dir` or
/// synthetic data of the same shapes.
#[derive(Debug, Clone)]
pub struct Setup {
    pub config: Config,
    pub data: Dataset,
    /// `"real"` or `"synthetic"`.
    pub data_kind: &'static str,
    /// What the data is, in words.
    pub data_source: String,
}

impl Setup {
    pub fn new(model: &str, data_dir: Option<&Path>) -> Result<Setup> {
        let mut config = Config::from_toml(config_text(model)?, &format!("configs/{model}.toml"))?;
        let seed = config.train.seed;
        let context = match &config.model {
            ModelConfig::Gpt(g) => g.context,
            ModelConfig::Graph(g) => g.context.unwrap_or(0),
            _ => 0,
        };
        if let Some(dir) = data_dir {
            let path = if context > 0 { dir.join("shakespeare.txt") } else { dir.join("mnist") };
            let data = Dataset::load(&config.data, Some(&path), seed, context)
                .with_context(|| format!("loading data for {model}"))?;
            return Ok(Setup { config, data, data_kind: "real", data_source: path.display().to_string() });
        }
        // Synthetic data of the real data's shapes.
        let (data, source) = match &config.data {
            DataConfig::Mnist(m) => {
                let (train, holdout) = (m.train, m.holdout);
                // The MLP flattens [1, 28, 28] to 784; the CNN needs the image shape.
                let data = Dataset::synthetic(train + holdout, holdout, 784, 10, seed)
                    .with_input_shape(vec![1, 28, 28])
                    .map_err(anyhow::Error::msg)?;
                config.data = DataConfig::Synthetic(SyntheticConfig {
                    examples: train + holdout,
                    holdout,
                    features: 784,
                    classes: 10,
                });
                // A synthetic run's spec has 784 features, not images: a graph reads them as
                // the 1×28×28 images it was written for through a reshape node of its own.
                if let ModelConfig::Graph(g) = &mut config.model {
                    read_features_as(g, &[1, 28, 28]);
                }
                (data, format!("synthetic: {} examples of 1×28×28, 10 classes (engine's generator)", train + holdout))
            }
            DataConfig::Text(t) => {
                let raw = synthetic_text(seed, 1_115_394);
                let n = raw.len();
                let data = Dataset::text(raw, context, t.holdout_fraction).map_err(anyhow::Error::msg)?;
                (data, format!("synthetic: {n} bytes of random words over 26 letters, space, newline and '.'"))
            }
            DataConfig::Synthetic(_) => (Dataset::load(&config.data, None, seed, context)?, "synthetic".to_string()),
            DataConfig::Tensors(_) | DataConfig::Csv(_) | DataConfig::Tokens(_) => {
                anyhow::bail!("{model}: benchmarks run on the built-in datasets, not a user's file")
            }
        };
        Ok(Setup { config, data, data_kind: "synthetic", data_source: source })
    }

    /// The run on `profile`, with a spec for `n_steps`.
    pub fn run(&self, profile: Profile, n_steps: u64) -> Result<Run> {
        Ok(Run::new(self.spec(n_steps), self.data.clone(), Device::new(profile)?)?)
    }

    /// The trainer's run spec for `n_steps` of this setup.
    pub fn spec(&self, n_steps: u64) -> RunSpec {
        RunSpec {
            format_version: FORMAT_VERSION,
            software_version: SOFTWARE_VERSION.to_string(),
            // A spec's config plans exactly its steps (RunSpec::validate checks).
            config: self.config.clone().with_planned_steps(n_steps, self.data.n_train() as u64),
            dataset: self.data.commitment(),
            device_profile: TRAINER_PROFILE.name().to_string(),
            n_steps,
            init_weights: None,
        }
    }
}

/// Makes `graph` read the batch's input through a new first node `x.image` that reshapes it to
/// `shape` per example.
fn read_features_as(graph: &mut GraphConfig, shape: &[usize]) {
    const IMAGE: &str = "x.image";
    for input in graph.nodes.iter_mut().flat_map(|node| node.inputs.iter_mut()) {
        if input == INPUT {
            *input = IMAGE.to_string();
        }
    }
    let reshape =
        Node { name: IMAGE.to_string(), inputs: vec![INPUT.to_string()], op: Op::Reshape { shape: shape.to_vec() } };
    graph.nodes.insert(0, reshape);
}

/// Text of roughly Shakespeare's size and alphabet size, from the seeded PRNG.
fn synthetic_text(seed: u64, len: usize) -> Vec<u8> {
    let mut s = Stream::new(seed, "bench/text", 0, 0);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let word = 1 + s.below(9) as usize;
        for _ in 0..word {
            out.push(b'a' + s.below(26) as u8);
        }
        out.push(match s.below(12) {
            0 => b'\n',
            1 => b'.',
            _ => b' ',
        });
    }
    out.truncate(len);
    out
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t0 = Instant::now();
    let out = f();
    (out, t0.elapsed().as_secs_f64())
}

/// Logged and total values per site kind (`fwd`, `bwd`, `grad`, `opt`).
#[derive(Debug, Default)]
struct KindCounts(BTreeMap<String, (u64, u64)>);

impl KindCounts {
    /// Counts the step's logged entries against every value it rounded (the log itself keeps
    /// only the sites that have entries).
    fn add(&mut self, log: &TieBreakLog, rounded: &BTreeMap<String, u64>, order: &[String]) {
        for (ordinal, name) in order.iter().enumerate() {
            let kind = name.split('/').next().unwrap_or(name).to_string();
            let e = self.0.entry(kind).or_default();
            e.0 += log.site(ordinal as u32).map_or(0, |s| s.n_entries() as u64);
            e.1 += rounded.get(name).copied().unwrap_or(0);
        }
    }

    fn fractions(&self) -> Value {
        let mut out = serde_json::Map::new();
        let (mut logged, mut total) = (0u64, 0u64);
        for (k, &(l, n)) in &self.0 {
            out.insert(k.clone(), json!(l as f64 / n.max(1) as f64));
            logged += l;
            total += n;
        }
        out.insert("all".into(), json!(logged as f64 / total.max(1) as f64));
        Value::Object(out)
    }
}

/// Ops each model's step uses, by their names in `kernels::parity::tightness`: those of its
/// graph's nodes (the presets' graphs too) and its optimizer's update.
fn ops_of(model: &ModelConfig, optimizer: &OptimizerConfig) -> Vec<&'static str> {
    let mut ops: Vec<&'static str> = model.graph().nodes.iter().flat_map(|node| graph_ops(&node.op)).copied().collect();
    ops.push(match optimizer {
        OptimizerConfig::Sgd(_) => "sgd",
        OptimizerConfig::Adamw(_) => "adamw",
    });
    ops.sort_unstable();
    ops.dedup();
    ops
}

/// The kernels (by their names in `kernels::parity::tightness`) a graph node's forward and
/// backward run; shape ops, additions and products run none that round.
fn graph_ops(op: &Op) -> &'static [&'static str] {
    match op {
        Op::Linear { .. } => &["matmul", "matmul_backward", "sum_rows"],
        Op::Matmul { .. } => &["matmul_scaled", "matmul_backward"],
        Op::Conv2d { .. } => &["conv2d", "conv2d_backward"],
        Op::MaxPool2d { .. } => &["max_pool2d", "max_pool2d_backward"],
        Op::AvgPool2d { .. } | Op::GlobalAvgPool {} => &["avg_pool2d", "avg_pool2d_backward"],
        Op::BatchNorm { .. } => &["batch_norm", "batch_norm_backward"],
        Op::LayerNorm { .. } => &["layer_norm", "layer_norm_backward"],
        Op::Embedding { .. } => &["embedding", "embedding_backward"],
        Op::PositionalEmbedding {} => &["sum_rows"],
        Op::Attention { dropout, .. } if *dropout > 0.0 => {
            &["matmul", "matmul_scaled", "matmul_backward", "softmax", "softmax_backward", "dropout", "sum_rows"]
        }
        Op::Attention { .. } => {
            &["matmul", "matmul_scaled", "matmul_backward", "softmax", "softmax_backward", "sum_rows"]
        }
        Op::Softmax { .. } => &["softmax", "softmax_backward"],
        Op::LogSoftmax {} => &["log_softmax", "log_softmax_backward"],
        Op::Dropout { .. } => &["dropout"],
        Op::Relu {} => &["relu"],
        Op::Gelu {} => &["gelu", "gelu_backward"],
        Op::Tanh {} => &["tanh", "tanh_backward"],
        Op::Sigmoid {} => &["sigmoid", "sigmoid_backward"],
        Op::CrossEntropy {} => &["cross_entropy"],
        Op::Mse {} => &["mse"],
        _ => &[],
    }
}

/// Options of a whole benchmark run.
#[derive(Debug, Clone)]
pub struct Options {
    pub data: Option<PathBuf>,
    /// Timed steps per model.
    pub steps: u64,
    /// Steps each peak-memory child process runs.
    pub rss_steps: u64,
    pub models: Vec<String>,
    /// Skip the peak-memory child processes (for tests).
    pub skip_rss: bool,
    /// Paired interval-parallel audits (one thread, every core) per model.
    pub interval_reps: usize,
    /// The GPT scaling sweep (`"scaling"` in the JSON), when asked for: it takes minutes.
    pub scaling: Option<scaling::Options>,
}

/// Runs every measurement and returns the JSON document.
pub fn run(opts: &Options) -> Result<Value> {
    let t0 = Instant::now();
    let load_start = load_average();
    let m = machine();
    eprintln!(
        "bench: {} ({} SIMD, {}), load average {:?}",
        m["cpu_model"].as_str().unwrap_or("unknown CPU"),
        m["simd_level"].as_str().unwrap_or("?"),
        m["cpu_flags"],
        load_start
    );
    let (tightness, tightness_s) = timed(|| kernels::parity::tightness(1));
    let mut models = Vec::new();
    let mut data_kinds = Vec::new();
    for name in &opts.models {
        eprintln!("bench: {name}: {} steps", opts.steps);
        let (report, kind) = measure_model(name, opts, &tightness)?;
        data_kinds.push(kind);
        models.push(report);
    }
    let bisection = bisection(BISECTION_LEAVES, 61_803)?;
    let data_kind = if data_kinds.iter().all(|k| *k == "real") { "real" } else { "synthetic" };
    let sweep = opts.scaling.as_ref().map(scaling::run).transpose()?;
    let mut doc = json!({
        "format": "tiebreak-bench/1",
        "software_version": SOFTWARE_VERSION,
        // What the timed steps hash their states with (the record format's state hash).
        "record_format": FORMAT_VERSION,
        "state_hash": engine::spec::state_hash_of_format(FORMAT_VERSION).name(),
        "machine": m,
        "load_average_start_end": [load_start, load_average()],
        "data": {
            "kind": data_kind,
            "dir": opts.data.as_ref().map(|d| d.display().to_string()),
        },
        "trainer_profile": TRAINER_PROFILE.name(),
        "auditor_profile": auditor_profile().name(),
        "steps_per_model": opts.steps,
        "timed_steps_per_model": opts.steps.saturating_sub(1).max(1),
        "models": models,
        "bisection": bisection,
        "bound_tightness_seconds": tightness_s,
        "total_seconds": t0.elapsed().as_secs_f64(),
    });
    if let Some(sweep) = sweep {
        doc["scaling"] = sweep;
    }
    Ok(doc)
}

fn measure_model(name: &str, opts: &Options, tightness: &[(&'static str, f64)]) -> Result<(Value, &'static str)> {
    let setup = Setup::new(name, opts.data.as_deref())?;
    let steps = opts.steps;
    ensure!(steps >= 1, "--steps must be at least 1");
    let trainer = setup.run(TRAINER_PROFILE, steps)?;
    let replayers: Vec<(Profile, Run)> =
        Profile::CPU.into_iter().map(|p| Ok((p, setup.run(p, steps)?))).collect::<Result<_>>()?;
    let (mut t_graph, mut t_hand, mut graph_ties, mut hand_ties) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut t_paper, mut graph_vs_hand) = (Vec::new(), Paired::default());
    let (mut paper_bytes, mut batch_bytes) = (Vec::new(), Vec::new());
    let (mut values, mut paper_values) = (0u64, 0u64);
    let mut kinds = KindCounts::default();

    // The presets have a hand-written model to compare the graph interpreter with; a model
    // that only exists as a graph (the residual CNN) has none.
    let handwritten = !matches!(setup.config.model, ModelConfig::Graph(_));
    let timings = steps::paired_steps(name, &trainer, &replayers, steps, |t, state, batch, out| {
        if handwritten {
            // The graph interpreter against the hand-written model: forward and backward of
            // this step from the same state and batch, alternating which goes first.
            let (graph, hand) = if t % 2 == 1 {
                let g = timed(|| graph_pass(&trainer, state, batch));
                (g, timed(|| hand_pass(&trainer, state, batch)))
            } else {
                let h = timed(|| hand_pass(&trainer, state, batch));
                (timed(|| graph_pass(&trainer, state, batch)), h)
            };
            let ((graph_loss, g_ties), dt_graph) = (graph.0.with_context(|| format!("{name}: graph pass"))?, graph.1);
            let ((hand_loss, h_ties), dt_hand) =
                (hand.0.with_context(|| format!("{name}: hand-written pass"))?, hand.1);
            if steps::is_timed(t, steps) {
                // Step 1 is the loop's warm-up (see `steps::StepTimings`).
                t_graph.push(dt_graph);
                t_hand.push(dt_hand);
                graph_vs_hand.push(dt_graph, dt_hand);
            }
            ensure!(
                (graph_loss - hand_loss).abs() <= 1e-5 * hand_loss.abs().max(1.0),
                "{name}: step {t}: the graph's loss {graph_loss} and the hand-written model's {hand_loss} differ"
            );
            graph_ties.push(g_ties as f64);
            hand_ties.push(h_ties as f64);
        }
        let (paper, dt) = timed(|| trainer.step(state, t, StepMode::Commit { paper: true }, None));
        let paper = paper?;
        if steps::is_timed(t, steps) {
            t_paper.push(dt);
        }
        ensure!(
            trainer.state_digest(&paper.state) == trainer.state_digest(&out.state),
            "{name}: the paper-log run of step {t} changed the state"
        );
        let dense = paper.paper.context("commit with paper: true gave no dense log")?;
        paper_bytes.push(dense.compressed_bytes() as f64);
        paper_values = dense.n_values();

        batch_bytes.push(out.batch.encode().len() as f64);
        values = out.rounded.values().sum();
        kinds.add(&out.log, &out.rounded, &out.order);
        Ok(())
    })?;
    let steps::StepTimings {
        train_s: t_train,
        fp32_s: t_fp32,
        vs_fp32,
        replay_s: t_replay,
        replay_vs,
        logs,
        entries,
        losses,
        fp32_losses,
        state,
    } = timings;
    let log_bytes: Vec<f64> = logs.iter().map(|l| l.len() as f64).collect();
    let (train_min, train_med) = (min(&t_train), median(&t_train));
    let (fp32_min, fp32_med) = (min(&t_fp32), median(&t_fp32));
    let auditor = auditor_profile();
    let mut replay_by_profile = serde_json::Map::new();
    let mut replay_vs_trainer = Paired::default();
    for (((p, _), ts), pairs) in replayers.iter().zip(&t_replay).zip(&replay_vs) {
        if *p == auditor {
            replay_vs_trainer = pairs.clone();
        }
        replay_by_profile.insert(
            p.name().into(),
            json!({
                "replay_step_seconds_min": min(ts),
                "replay_step_seconds_median": median(ts),
                "replay_vs_trainer": pairs.median(),
                "replay_vs_trainer_spread": pairs.spread(),
            }),
        );
    }
    // The log's fixed part: the same sites with no entries (ordinals and lengths only).
    let mut skeleton = TieBreakLog::default();
    for (ordinal, len) in tielog_sites(logs.last()) {
        skeleton.insert(ordinal, SiteLog::new(len))?;
    }
    let skeleton_bytes = skeleton.compress().len();

    let checkpoint_bytes = compress_canonical(&state.encode()).len() as f64;
    let interval = setup.config.train.checkpoint_interval as f64;
    let log_mean = mean(&log_bytes);
    let paper_mean = mean(&paper_bytes);
    let record = log_mean + LEAF_BYTES as f64 + mean(&batch_bytes) + checkpoint_bytes / interval;
    let pol = state.n_values() as f64 * 4.0;

    let ops = ops_of(&setup.config.model, &setup.config.optimizer);
    let per_op: serde_json::Map<String, Value> =
        tightness.iter().filter(|(op, _)| ops.contains(op)).map(|(op, r)| ((*op).to_string(), json!(r))).collect();
    let worst = tightness.iter().filter(|(op, _)| ops.contains(op)).map(|(_, r)| *r).fold(0.0f64, f64::max);

    let rss = if opts.skip_rss { Value::Null } else { peak_rss(name, opts, &logs)? };
    eprintln!("bench: {name}: interval-parallel replay on one thread and on every core");
    let interval_replay = intervals::speedup(name, &setup, steps, opts.interval_reps)?;

    // A graph-only model has no hand-written twin to compare with (see above).
    let graph_vs_handwritten = if !handwritten {
        Value::Null
    } else {
        json!({
            "graph_pass_seconds_min": min(&t_graph),
            "handwritten_pass_seconds_min": min(&t_hand),
            "graph_overhead": graph_vs_hand.median(),
            "graph_overhead_spread": graph_vs_hand.spread(),
            "graph_tie_breaks_per_step": mean(&graph_ties),
            "handwritten_tie_breaks_per_step": mean(&hand_ties),
            "method": "forward and backward of each step from the same state and batch, rounding at every site, alternating order; the hand-written models are the engine's before it interpreted every model as a graph (src/bench/handwritten.rs)",
        })
    };
    let report = json!({
        "model": name,
        "data": {"kind": setup.data_kind, "source": setup.data_source},
        "steps": steps,
        "batch_size": setup.config.train.batch_size,
        "parameters_and_optimizer_values": state.n_values(),
        "rounded_values_per_step": values,
        "trainer_step_seconds_min": train_min,
        "trainer_step_seconds_median": train_med,
        "fp32_step_seconds_min": fp32_min,
        "fp32_step_seconds_median": fp32_med,
        "trainer_overhead_vs_fp32": vs_fp32.median(),
        "trainer_overhead_vs_fp32_spread": vs_fp32.spread(),
        "trainer_overhead_vs_fp32_of_minima": train_min / fp32_min,
        "replay_vs_trainer": replay_vs_trainer.median(),
        "replay_vs_trainer_spread": replay_vs_trainer.spread(),
        "replay_profile": auditor.name(),
        "replay_by_profile": replay_by_profile,
        "paper_commit_step_seconds_min": min(&t_paper),
        "log_bytes_per_step": log_mean,
        "paper_log_bytes_per_step": paper_mean,
        "paper_log_values_per_step": paper_values,
        "log_ratio_vs_paper": paper_mean / log_mean,
        "log_skeleton_bytes": skeleton_bytes,
        "log_sites": skeleton.sites().count(),
        "tie_breaks_per_step": mean(&entries),
        "logged_fraction": kinds.fractions(),
        "bound_tightness": {
            "max": worst,
            "per_op": per_op,
            "method": "kernels::parity::tightness(1): largest |vA - vB| / d over all ordered pairs of CPU profiles and adversarial input families, for the ops this model uses",
        },
        "record_bytes_per_step": record,
        "record_parts": {
            "log_bytes": log_mean,
            "leaf_bytes": LEAF_BYTES,
            "batch_bytes": mean(&batch_bytes),
            "checkpoint_bytes": checkpoint_bytes,
            "checkpoint_interval": setup.config.train.checkpoint_interval,
        },
        "pol_bytes_per_step": pol,
        "record_ratio_vs_pol": pol / record,
        "peak_rss_bytes": rss,
        "interval_replay": interval_replay,
        "graph_vs_handwritten": graph_vs_handwritten,
        "loss_first_last": [losses.first(), losses.last()],
        "fp32_loss_first_last": [fp32_losses.first(), fp32_losses.last()],
    });
    Ok((report, setup.data_kind))
}

/// The engine's forward and backward of `batch` from `state` (the graph interpreter): the loss
/// and the number of tie-breaks logged.
fn graph_pass(run: &Run, state: &TrainingState, batch: &Batch) -> Result<(f32, usize)> {
    let mut rounder = Rounder::commit();
    let mut ctx = Ctx::new(&run.device, &mut rounder, state.step + 1, &run.spec);
    let (loss, _) = run.model.loss_and_grads(&mut ctx, state, batch)?;
    Ok((loss, rounder.finish().log.n_entries()))
}

/// [`graph_pass`] with the hand-written model of the same preset.
fn hand_pass(run: &Run, state: &TrainingState, batch: &Batch) -> Result<(f32, usize)> {
    let get = |name: &str| -> Result<&[f32], engine::EngineError> {
        state
            .get(&engine::model::param_key(name))
            .map(|t| t.data.as_slice())
            .ok_or_else(|| engine::EngineError::Usage(format!("state has no parameter {name}")))
    };
    let shape = match &run.data {
        Dataset::Classification { input_shape, .. } | Dataset::Regression { input_shape, .. } => input_shape.clone(),
        Dataset::Text { .. } => Vec::new(),
    };
    let mut rounder = Rounder::commit();
    let mut ctx = Ctx::new(&run.device, &mut rounder, state.step + 1, &run.spec);
    let (loss, _) =
        handwritten::loss_and_grads(&mut ctx, &run.spec.config.model, &shape, run.model.classes(), &get, batch)?;
    Ok((loss, rounder.finish().log.n_entries()))
}

/// Site ordinals and lengths of a stored log.
fn tielog_sites(stored: Option<&Vec<u8>>) -> Vec<(u32, u64)> {
    let Some(stored) = stored else { return Vec::new() };
    match TieBreakLog::decompress(stored, engine::record::LOG_RAW_BYTES_MAX) {
        Ok(log) => log.sites().map(|(k, s)| (k, s.len())).collect(),
        Err(_) => Vec::new(),
    }
}

/// Two trees of `leaves` leaves that differ from leaf `first_bad` on; the auditor bisects its
/// tree against the trainer's root, the trainer answering from its own tree.
pub fn bisection(leaves: u64, first_bad: u64) -> Result<Value> {
    let leaf = |i: u64, bad: bool| {
        let mut entry = i.to_le_bytes().to_vec();
        entry.push(u8::from(bad));
        common::merkle::leaf_hash(&entry)
    };
    let (trees, build_s) = timed(|| {
        let own = MerkleTree::from_leaf_hashes((0..leaves).map(|i| leaf(i, false)));
        let theirs = MerkleTree::from_leaf_hashes((0..leaves).map(|i| leaf(i, i >= first_bad)));
        (own, theirs)
    });
    let (own, theirs) = trees;
    let (found, seconds) = timed(|| -> Result<_> {
        let mut b = Bisection::new(&own, leaves, theirs.root())?;
        while let Some((lo, hi)) = b.next_query() {
            let (l, r) = theirs.child_hashes(lo, hi, leaves)?;
            b.answer(l, r)?;
        }
        Ok((b.outcome(), b.queries()))
    });
    let (outcome, queries) = found?;
    let Some(BisectionOutcome::Diverged { first_differing_leaf, .. }) = outcome else {
        bail!("bisection did not find the divergence: {outcome:?}");
    };
    ensure!(first_differing_leaf == first_bad, "bisection found leaf {first_differing_leaf}, not {first_bad}");
    ensure!(queries <= Bisection::query_limit(leaves), "bisection took {queries} queries");
    Ok(json!({
        "leaves": leaves,
        "queries": queries,
        "query_limit": Bisection::query_limit(leaves),
        "seconds": seconds,
        "first_differing_leaf": first_differing_leaf,
        "tree_build_seconds_both": build_s,
    }))
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
pub fn vm_hwm_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the trainer, the auditor and the FP32 baseline for `opts.rss_steps` steps each in a
/// child process and collects their `VmHWM`.
fn peak_rss(name: &str, opts: &Options, logs: &[Vec<u8>]) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("tiebreak-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let steps = opts.rss_steps.min(logs.len() as u64).max(1);
    for (t, log) in logs.iter().enumerate().take(steps as usize) {
        let p = dir.join(format!("{}.log.zst", t + 1));
        std::fs::write(&p, log).with_context(|| format!("writing {}", p.display()))?;
    }
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let mut out = serde_json::Map::new();
    for role in ["trainer", "auditor", "fp32"] {
        let mut cmd = Command::new(&exe);
        cmd.args(["--child", role, "--model", name, "--steps", &steps.to_string()]);
        cmd.arg("--logs").arg(&dir);
        if let Some(d) = &opts.data {
            cmd.arg("--data").arg(d);
        }
        let output = cmd.output().with_context(|| format!("running the {role} child"))?;
        ensure!(output.status.success(), "{role} child for {name} failed: {}", String::from_utf8_lossy(&output.stderr));
        let v: Value = serde_json::from_slice(&output.stdout).context("parsing the child's output")?;
        out.insert(role.into(), v["peak_rss_bytes"].clone());
    }
    let _ = std::fs::remove_dir_all(&dir);
    out.insert("steps_per_child".into(), json!(steps));
    out.insert(
        "method".into(),
        json!("VmHWM of a child process that loads the data and runs the steps (auditor: replay on its default profile with the trainer's logs)"),
    );
    Ok(Value::Object(out))
}

/// A peak-memory child: runs `steps` steps in `role` and returns `{"peak_rss_bytes": …}`.
pub fn child(role: &str, model: &str, data: Option<&Path>, steps: u64, logs: &Path) -> Result<Value> {
    let setup = Setup::new(model, data)?;
    let mut digest = None;
    match role {
        "trainer" => {
            let run = setup.run(TRAINER_PROFILE, steps)?;
            let mut state = run.initial_state()?;
            for t in 1..=steps {
                state = run.step(&state, t, StepMode::Commit { paper: false }, None)?.state;
            }
            digest = Some(to_hex(&run.state_digest(&state)));
        }
        "auditor" => {
            let run = setup.run(auditor_profile(), steps)?;
            let mut state = run.initial_state()?;
            for t in 1..=steps {
                let p = logs.join(format!("{t}.log.zst"));
                let stored = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                let log = TieBreakLog::decompress(&stored, engine::record::LOG_RAW_BYTES_MAX)?;
                let out = run.step(&state, t, StepMode::Replay(&log), None)?;
                ensure!(out.forged.is_empty(), "replay of step {t} rejected trainer log entries");
                state = out.state;
            }
            digest = Some(to_hex(&run.state_digest(&state)));
        }
        "fp32" => {
            let run = setup.run(TRAINER_PROFILE, steps)?;
            let init = run.initial_state()?;
            let mut b = Baseline::for_run(&run, &init)?;
            drop(init);
            for t in 1..=steps {
                b.step(&Batch::gather(&run.data, &run.batch_indices(t).0))?;
            }
        }
        other => bail!("unknown child role {other:?}"),
    }
    Ok(json!({"role": role, "peak_rss_bytes": vm_hwm_bytes(), "state_digest": digest}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_finds_the_first_bad_leaf_within_the_limit() {
        let v = bisection(1000, 377).unwrap();
        assert_eq!(v["first_differing_leaf"], 377);
        assert!(v["queries"].as_u64().unwrap() <= 11);
    }

    #[test]
    fn synthetic_setups_have_the_real_shapes() {
        let s = Setup::new("mnist-cnn", None).unwrap();
        let Dataset::Classification { input_shape, .. } = &s.data else { panic!() };
        assert_eq!(input_shape, &vec![1, 28, 28]);
        assert_eq!(s.data_kind, "synthetic");
        s.run(TRAINER_PROFILE, 1).unwrap();
    }

    /// Each model's ops come from its graph (presets included) and optimizer; every name is one
    /// the parity suite measures, so each has a tightness entry.
    #[test]
    fn each_models_ops_are_its_graphs_kernels() {
        let conv = ["conv2d", "conv2d_backward", "relu", "matmul", "matmul_backward", "sum_rows", "cross_entropy"];
        let text = [
            "embedding",
            "embedding_backward",
            "layer_norm",
            "layer_norm_backward",
            "matmul",
            "matmul_scaled",
            "matmul_backward",
            "softmax",
            "softmax_backward",
            "gelu",
            "gelu_backward",
            "sum_rows",
            "cross_entropy",
            "adamw",
        ];
        let mut want: Vec<(&str, Vec<&str>)> = vec![
            ("mnist-mlp", vec!["matmul", "matmul_backward", "sum_rows", "relu", "cross_entropy", "sgd"]),
            ("mnist-cnn", [&conv[..], &["max_pool2d", "max_pool2d_backward", "adamw"]].concat()),
            ("shakespeare-gpt", text.to_vec()),
            (
                "mnist-resnet",
                [&conv[..], &["batch_norm", "batch_norm_backward", "avg_pool2d", "avg_pool2d_backward", "adamw"]]
                    .concat(),
            ),
            ("shakespeare-graph", text.to_vec()),
        ];
        let measured: Vec<&str> = kernels::parity::tightness(1).iter().map(|(op, _)| *op).collect();
        for (model, ops) in &mut want {
            let config = Config::from_toml(config_text(model).unwrap(), model).unwrap();
            ops.sort_unstable();
            assert_eq!(&ops_of(&config.model, &config.optimizer), ops, "{model}");
            assert!(ops.iter().all(|op| measured.contains(op)), "{model}: {ops:?}");
        }
    }
}
