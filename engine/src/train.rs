//! One verified training step, identical for the trainer (committing tie-breaks) and the
//! auditor (following them): data order from the seed, forward/backward through the model,
//! optimizer update, and the new FP32 state.
//!
//! Adversary drills (`Fault`) are applied here too, because they must act *inside* the step;
//! only the trainer agent ever passes one, and the record still claims the honest spec.

use std::collections::BTreeMap;
use std::str::FromStr;

use common::leaf::BatchIndices;
use common::prng::Stream;
use common::rounding::{Rounder, paper::DenseLog};
use common::state::{Tensor, TrainingState};
use common::tielog::{Direction, SiteLog, TieBreakLog};
use kernels::{AdamWConfig, Bounded, Device, SgdConfig};

use crate::EngineError;
use crate::data::Dataset;
use crate::model::{Batch, Ctx, Model, param_key, slot_key};
use crate::spec::{OptimizerConfig, RunSpec};

/// An adversary drill: what a dishonest trainer does at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Changes one label in the step's batch.
    FlipLabel,
    /// Uses other examples than the seed dictates (and commits the indices it used).
    SwapBatch,
    /// Uses 10× the learning rate.
    ScaleLr,
    /// Makes no update, but commits the step.
    SkipStep,
    /// Flips the last mantissa bit of one weight after the step.
    PerturbWeight,
    /// Adds a log entry for an element nowhere near a rounding midpoint.
    ForgeLog,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::FlipLabel,
        FaultKind::SwapBatch,
        FaultKind::ScaleLr,
        FaultKind::SkipStep,
        FaultKind::PerturbWeight,
        FaultKind::ForgeLog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::FlipLabel => "flip-label",
            FaultKind::SwapBatch => "swap-batch",
            FaultKind::ScaleLr => "scale-lr",
            FaultKind::SkipStep => "skip-step",
            FaultKind::PerturbWeight => "perturb-weight",
            FaultKind::ForgeLog => "forge-log",
        }
    }
}

impl FromStr for FaultKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, EngineError> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let valid: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
            EngineError::Usage(format!("unknown fault kind {s:?} (valid: {})", valid.join(", ")))
        })
    }
}

/// A drill at a given step, written `<kind>@<step>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    pub kind: FaultKind,
    pub step: u64,
}

impl FromStr for Fault {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, EngineError> {
        let (kind, step) = s
            .split_once('@')
            .ok_or_else(|| EngineError::Usage(format!("fault {s:?} must be written <kind>@<step>")))?;
        let step: u64 =
            step.parse().map_err(|_| EngineError::Usage(format!("fault {s:?}: step {step:?} is not a number")))?;
        if step == 0 {
            return Err(EngineError::Usage(format!("fault {s:?}: steps start at 1")));
        }
        Ok(Fault { kind: kind.parse()?, step })
    }
}

/// Whose rounding a step does.
#[derive(Debug, Clone, Copy)]
pub enum StepMode<'a> {
    /// Trainer: record tie-breaks (and, with `paper`, the paper's dense log for comparison).
    Commit { paper: bool },
    /// Auditor: follow the trainer's log for this step.
    Replay(&'a TieBreakLog),
}

/// What a step produced.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub state: TrainingState,
    pub log: TieBreakLog,
    pub batch: BatchIndices,
    pub loss: f32,
    /// The paper's dense log, when requested.
    pub paper: Option<DenseLog>,
    /// Replay only: trainer log entries that did not hold up on this side (the elements were
    /// rounded by the replayer's own values instead). With a matching state this is a forged
    /// log; with a differing state, a divergence.
    pub forged: Vec<common::rounding::RoundingError>,
    /// Every site the step rounded and its number of values (the log keeps only sites with
    /// entries).
    pub rounded: std::collections::BTreeMap<String, u64>,
    /// Every site the step rounded, in order: the log's site `k` is `order[k]`.
    pub order: Vec<String>,
}

/// A run ready to execute steps: spec, data, model and device.
#[derive(Debug)]
pub struct Run {
    pub spec: RunSpec,
    pub data: Dataset,
    pub model: Model,
    pub device: Device,
    /// The last epoch's permutation of the training indices (a cache: recomputing it is
    /// deterministic, only slow for a text dataset of a million windows).
    order: std::sync::Mutex<Option<(u64, std::sync::Arc<Vec<u64>>)>>,
    /// The parameters of the committed starting weights, once loaded
    /// ([`Run::load_init_weights`]); only for specs with `init_weights`.
    init_params: Option<Vec<Tensor>>,
    /// Every tensor a state of this run holds: computed once, since [`Run::check_state`] runs
    /// before every step.
    layout: StateLayout,
}

/// Every tensor a state of a run holds (parameters and optimizer slots), by name, with its
/// shape and what it is.
#[derive(Debug, Clone)]
pub struct StateLayout(BTreeMap<String, (Vec<usize>, String)>);

impl StateLayout {
    /// The layout of `params` trained by `optimizer`.
    pub fn of(params: &[crate::model::ParamSpec], optimizer: &OptimizerConfig) -> StateLayout {
        let slots = slots_of(optimizer);
        let mut layout = BTreeMap::new();
        for p in params {
            layout.insert(param_key(&p.name), (p.shape.clone(), format!("parameter {}", p.name)));
            for slot in slots {
                layout
                    .insert(slot_key(&p.name, slot), (p.shape.clone(), format!("optimizer slot {slot} of {}", p.name)));
            }
        }
        StateLayout(layout)
    }

    /// Checks that `state` has exactly the tensors the model and optimizer define (every
    /// parameter and every optimizer slot, nothing else), each of the model's shape with as many
    /// values as its shape holds, all finite. The first problem in tensor-name order is
    /// reported.
    pub fn check(&self, state: &TrainingState) -> Result<(), StateInvalid> {
        let bad = |tensor: &str, what: String| StateInvalid { tensor: tensor.to_string(), what };
        let mut given = state.tensors().peekable();
        let mut wanted = self.0.iter().peekable();
        loop {
            // Walk both name-ordered lists together, so the first problem by name is reported.
            let order = match (given.peek(), wanted.peek()) {
                (None, None) => return Ok(()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((g, _)), Some((w, _))) => (*g).cmp(w.as_str()),
            };
            match order {
                std::cmp::Ordering::Less => {
                    let Some((name, _)) = given.next() else { unreachable!("peeked") };
                    return Err(bad(name, "is not a parameter or optimizer slot of this run's model".into()));
                }
                std::cmp::Ordering::Greater => {
                    let Some((name, (_, what))) = wanted.next() else { unreachable!("peeked") };
                    return Err(bad(name, format!("is missing (the {what})")));
                }
                std::cmp::Ordering::Equal => {
                    let (Some((name, t)), Some((_, (shape, _)))) = (given.next(), wanted.next()) else {
                        unreachable!("peeked")
                    };
                    if &t.shape != shape {
                        return Err(bad(name, format!("has shape {:?}, the model's is {shape:?}", t.shape)));
                    }
                    let n: usize = shape.iter().product();
                    if t.data.len() != n {
                        return Err(bad(name, format!("holds {} values, its shape {shape:?} needs {n}", t.data.len())));
                    }
                    if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
                        return Err(bad(name, format!("element {i} is not finite ({})", t.data[i])));
                    }
                }
            }
        }
    }
}

/// Optimizer slots per parameter.
fn slots_of(optimizer: &OptimizerConfig) -> &'static [&'static str] {
    match optimizer {
        OptimizerConfig::Sgd(_) => &["momentum"],
        OptimizerConfig::Adamw(_) => &["m", "v"],
    }
}

impl Run {
    /// Builds a run. The spec must be valid ([`RunSpec::validate`]: `InvalidSpec`) and the
    /// dataset must match its commitment (`DatasetMismatch`).
    pub fn new(spec: RunSpec, data: Dataset, device: Device) -> Result<Run, EngineError> {
        spec.validate().map_err(EngineError::InvalidSpec)?;
        let commitment = data.commitment();
        if commitment != spec.dataset {
            return Err(EngineError::DatasetMismatch { spec: Box::new(spec.dataset), data: Box::new(commitment) });
        }
        let model = Model::new(&spec.config.model, &data)?;
        let layout = StateLayout::of(model.params(), &spec.config.optimizer);
        Ok(Run { spec, data, model, device, order: std::sync::Mutex::new(None), init_params: None, layout })
    }

    /// Loads the starting weights the spec commits to: `bytes` must be the committed file
    /// (SHA-256 and size) and hold every parameter of the model, F32, with its shape, and
    /// nothing else. The problem names the file and the tensor.
    pub fn load_init_weights(&mut self, bytes: &[u8]) -> Result<(), crate::init::WeightsProblem> {
        let Some(commitment) = &self.spec.init_weights else {
            return Err(crate::init::WeightsProblem {
                tensor: None,
                what: "this run's spec starts from the seed, not from starting weights".into(),
            });
        };
        commitment.check(bytes)?;
        self.init_params = Some(crate::init::params_from_safetensors(bytes, self.model.params())?);
        Ok(())
    }

    /// Loads the config's dataset, commits it, and builds a run of `n_steps` on `profile`. If
    /// `n_steps` is not what the config plans, the spec's config says `train.steps = n_steps`
    /// (a spec's steps must agree with its config).
    pub fn from_config(
        config: &crate::spec::Config,
        data: Option<&std::path::Path>,
        profile: kernels::Profile,
        n_steps: u64,
    ) -> Result<Run, EngineError> {
        let dataset = Dataset::for_config(config, data)?;
        let config = config.clone().with_planned_steps(n_steps, dataset.n_train() as u64);
        let spec = RunSpec::new(config, dataset.commitment(), profile.name(), n_steps);
        Run::new(spec, dataset, Device::new(profile).map_err(EngineError::Kernel)?)
    }

    /// Steps in one pass over the training split (at least 1).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.data.n_train() / self.spec.config.train.batch_size).max(1) as u64
    }

    /// The honest batch of step `step` (≥ 1): epoch `e = (step−1) / steps_per_epoch` shuffles the
    /// training indices with stream `data/order` (step field = epoch), and the step takes its
    /// slice. Batches larger than the training split wrap around.
    pub fn batch_indices(&self, step: u64) -> BatchIndices {
        let spe = self.steps_per_epoch();
        // Steps start at 1; step 0 (which has no batch) is read as step 1 rather than panic.
        let epoch = step.saturating_sub(1) / spe;
        let pos = (step.saturating_sub(1) % spe) as usize;
        let n = self.data.n_train();
        let perm = self.epoch_order(epoch);
        let b = self.spec.config.train.batch_size;
        BatchIndices((0..b).map(|i| perm[(pos * b + i) % n]).collect())
    }

    /// The permutation of the training indices for `epoch` (stream `data/order`, step field =
    /// epoch), cached for the last epoch asked.
    fn epoch_order(&self, epoch: u64) -> std::sync::Arc<Vec<u64>> {
        let mut cache = self.order.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((e, perm)) = cache.as_ref()
            && *e == epoch
        {
            return perm.clone();
        }
        let mut perm: Vec<u64> = (0..self.data.n_train() as u64).collect();
        Stream::new(self.spec.config.train.seed, "data/order", epoch, 0).shuffle(&mut perm);
        let perm = std::sync::Arc::new(perm);
        *cache = Some((epoch, perm.clone()));
        perm
    }

    /// Optimizer slots per parameter.
    fn slots(&self) -> &'static [&'static str] {
        slots_of(&self.spec.config.optimizer)
    }

    /// The hash a leaf of this run's record commits `state` with (the spec's format decides:
    /// [`RunSpec::state_hash`]).
    pub fn state_digest(&self, state: &TrainingState) -> common::codec::Hash {
        state.digest(self.spec.state_hash())
    }

    /// Checks that `state` has exactly the tensors the model and optimizer define; see
    /// [`StateLayout::check`]. The step counter is the caller's to check.
    pub fn check_state(&self, state: &TrainingState) -> Result<(), StateInvalid> {
        self.layout.check(state)
    }

    /// The initial state (step 0): parameters from the seed or from the committed starting
    /// weights, optimizer slots zero.
    pub fn initial_state(&self) -> Result<TrainingState, EngineError> {
        let mut state = TrainingState::new(0);
        match (&self.spec.init_weights, &self.init_params) {
            (None, _) => self.model.init_params(self.spec.config.train.seed, &mut state)?,
            (Some(_), Some(params)) => {
                for (p, t) in self.model.params().iter().zip(params) {
                    state.insert(&param_key(&p.name), t.clone()).map_err(EngineError::State)?;
                }
            }
            (Some(_), None) => {
                return Err(EngineError::Usage(
                    "the spec starts from committed weights that were not loaded (Run::load_init_weights)".into(),
                ));
            }
        }
        for p in self.model.params() {
            for slot in self.slots() {
                state.insert(&slot_key(&p.name, slot), Tensor::zeros(p.shape.clone())).map_err(EngineError::State)?;
            }
        }
        Ok(state)
    }

    /// Executes step `step` from `prev` (the state after step `step − 1`).
    ///
    /// The step runs on a thread of rayon's pool (the caller's, when it is one already): its
    /// many small parallel loops then start where they run, instead of each being handed to the
    /// pool from outside it and waited for (a wake-up and a sleep per loop). Every loop's result
    /// is independent of where and on how many threads it runs, so this changes no bits.
    pub fn step(
        &self,
        prev: &TrainingState,
        step: u64,
        mode: StepMode<'_>,
        fault: Option<FaultKind>,
    ) -> Result<StepOutput, EngineError> {
        rayon::scope(|_| self.step_here(prev, step, mode, fault))
    }

    fn step_here(
        &self,
        prev: &TrainingState,
        step: u64,
        mode: StepMode<'_>,
        fault: Option<FaultKind>,
    ) -> Result<StepOutput, EngineError> {
        if prev.step.checked_add(1) != Some(step) {
            return Err(EngineError::Usage(format!("step {step} must follow state {}", prev.step)));
        }
        // No malformed state may reach a kernel (a wrong length would panic there).
        self.check_state(prev).map_err(EngineError::InvalidState)?;
        let mut batch_idx = self.batch_indices(step);
        if fault == Some(FaultKind::SwapBatch) {
            let n = self.data.n_train() as u64;
            batch_idx.0.iter_mut().for_each(|i| *i = (*i + n / 2 + 1) % n);
        }
        let mut rounder = match mode {
            StepMode::Commit { paper: false } => Rounder::commit(),
            StepMode::Commit { paper: true } => Rounder::commit_with_paper(),
            StepMode::Replay(log) => Rounder::replay(log),
        };
        let mut ctx = Ctx::new(&self.device, &mut rounder, step, &self.spec);
        let (loss, grads) = self.accumulated_grads(&mut ctx, prev, &batch_idx, fault)?;
        let grads = self.clip(&mut ctx, grads)?;
        let mut state = TrainingState::new(step);
        if fault == Some(FaultKind::SkipStep) {
            for (name, t) in prev.tensors() {
                state.insert(name, t.clone()).map_err(EngineError::State)?;
            }
        } else {
            let fault_scale = if fault == Some(FaultKind::ScaleLr) { 10.0 } else { 1.0 };
            let lr_scale = self.spec.config.schedule.factor(step, self.spec.n_steps) * fault_scale;
            self.optimize(&mut ctx, prev, &grads, lr_scale, &mut state)?;
        }
        let common::rounding::Finished { mut log, paper, forged, rounded, order } = rounder.finish();
        if fault == Some(FaultKind::PerturbWeight) {
            let first = param_key(&self.model.params()[0].name);
            if let Some(t) = state.get_mut(&first) {
                t.data[0] = f32::from_bits(t.data[0].to_bits() ^ 1);
            }
        }
        if fault == Some(FaultKind::ForgeLog) {
            let first = &self.model.params()[0];
            let len = first.shape.iter().product::<usize>() as u64;
            let site = format!("opt/{}/param", first.name);
            if let Some(ordinal) = order.iter().position(|s| *s == site) {
                forge_entry(&mut log, ordinal as u32, len);
            }
        }
        Ok(StepOutput { state, log, batch: batch_idx, loss, paper, forged, rounded, order })
    }

    /// The step's loss and gradients. With `train.accumulate = k > 1` the batch is split into
    /// `k` consecutive micro-batches of `batch_size / k` examples, each run through the model
    /// with its sites under `micro/<j>/`; the gradients are then averaged per parameter as
    /// `(Σ_j g_j) / k`, summed in micro-batch order in FP64 and rounded at `accum/<param>`.
    /// That fixed sequence of correctly rounded operations is the op's definition, so every
    /// machine computes the same FP64 values (`ErrorBound::Exact`). The loss is the mean of the
    /// micro-batch losses.
    fn accumulated_grads(
        &self,
        ctx: &mut Ctx<'_, '_>,
        prev: &TrainingState,
        batch_idx: &BatchIndices,
        fault: Option<FaultKind>,
    ) -> Result<(f32, Vec<Vec<f32>>), EngineError> {
        let k = self.spec.config.train.accumulate.max(1);
        let micro = batch_idx.0.len() / k;
        if k == 1 {
            let mut batch = Batch::gather(&self.data, &batch_idx.0);
            if fault == Some(FaultKind::FlipLabel) {
                batch.flip_one_label(self.model.classes());
            }
            return self.model.loss_and_grads(ctx, prev, &batch);
        }
        let mut loss_sum = 0.0f64;
        let mut sums: Vec<Vec<f64>> = Vec::new();
        for (j, idx) in batch_idx.0.chunks(micro).enumerate() {
            let mut batch = Batch::gather(&self.data, idx);
            if j == 0 && fault == Some(FaultKind::FlipLabel) {
                batch.flip_one_label(self.model.classes());
            }
            ctx.site_prefix = format!("micro/{j}/");
            let result = self.model.loss_and_grads(ctx, prev, &batch);
            ctx.site_prefix.clear();
            let (loss, grads) = result?;
            loss_sum += loss as f64;
            if sums.is_empty() {
                sums = grads.iter().map(|g| g.iter().map(|&x| x as f64).collect()).collect();
            } else {
                for (s, g) in sums.iter_mut().zip(&grads) {
                    s.iter_mut().zip(g).for_each(|(s, &x)| *s += x as f64);
                }
            }
        }
        let mut grads = Vec::with_capacity(sums.len());
        for (p, s) in self.model.params().iter().zip(sums) {
            let mean = s.into_iter().map(|x| x / k as f64).collect();
            grads.push(ctx.round(&format!("accum/{}", p.name), Bounded::exact(mean))?);
        }
        Ok(((loss_sum / k as f64) as f32, grads))
    }

    /// Global-norm gradient clipping (`train.clip_norm = c`), in three rounded steps:
    /// `clip/norm` = ‖g‖ over every parameter's gradient in [`Model::params`] order (a
    /// reduction with its own bound, see `kernels::Device::global_norm`); `clip/scale` =
    /// `min(1, c / norm)` from that FP32 norm (one correctly rounded division and a comparison
    /// of values every machine shares: exact); `clip/<param>` = `g · scale` (a product of two
    /// FP32 values, exact in FP64). The scaled gradients are rounded even when the scale is 1,
    /// so the sites a step visits do not depend on the data.
    fn clip(&self, ctx: &mut Ctx<'_, '_>, grads: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        let Some(max_norm) = self.spec.config.train.clip_norm else { return Ok(grads) };
        let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let norm = ctx.dev.global_norm(&refs).map_err(EngineError::Kernel)?;
        let norm = ctx.round("clip/norm", norm)?[0];
        // A zero norm gives c / 0 = +∞, so the scale is 1.
        let scale = ctx.round("clip/scale", Bounded::exact(vec![(max_norm / norm as f64).min(1.0)]))?[0];
        let mut out = Vec::with_capacity(grads.len());
        for (p, g) in self.model.params().iter().zip(&grads) {
            let scaled = g.iter().map(|&x| x as f64 * scale as f64).collect();
            out.push(ctx.round(&format!("clip/{}", p.name), Bounded::exact(scaled))?);
        }
        Ok(out)
    }

    /// Applies the optimizer to every parameter, in [`Model::params`] order.
    fn optimize(
        &self,
        ctx: &mut Ctx<'_, '_>,
        prev: &TrainingState,
        grads: &[Vec<f32>],
        lr_scale: f64,
        state: &mut TrainingState,
    ) -> Result<(), EngineError> {
        let k = EngineError::Kernel;
        let tensor = |key: &str| prev.get(key).ok_or_else(|| EngineError::Usage(format!("state has no tensor {key}")));
        for (p, g) in self.model.params().iter().zip(grads) {
            let w = tensor(&param_key(&p.name))?;
            let put = |state: &mut TrainingState, key: String, data: Vec<f32>| {
                state.insert(&key, Tensor { shape: p.shape.clone(), data }).map_err(EngineError::State)
            };
            match &self.spec.config.optimizer {
                OptimizerConfig::Sgd(s) => {
                    let v = tensor(&slot_key(&p.name, "momentum"))?;
                    let cfg = SgdConfig { lr: s.lr * lr_scale, momentum: s.momentum, weight_decay: s.weight_decay };
                    let out = ctx.dev.sgd(&w.data, g, &v.data, cfg).map_err(k)?;
                    let v = ctx.round(&format!("opt/{}/momentum", p.name), out.v)?;
                    let w = ctx.round(&format!("opt/{}/param", p.name), out.w)?;
                    put(state, slot_key(&p.name, "momentum"), v)?;
                    put(state, param_key(&p.name), w)?;
                }
                OptimizerConfig::Adamw(a) => {
                    let m = tensor(&slot_key(&p.name, "m"))?;
                    let v = tensor(&slot_key(&p.name, "v"))?;
                    let cfg = AdamWConfig {
                        lr: a.lr * lr_scale,
                        beta1: a.beta1,
                        beta2: a.beta2,
                        eps: a.eps,
                        weight_decay: a.weight_decay,
                    };
                    let out = ctx.dev.adamw(&w.data, g, &m.data, &v.data, ctx.step, cfg).map_err(k)?;
                    let m = ctx.round(&format!("opt/{}/m", p.name), out.m)?;
                    let v = ctx.round(&format!("opt/{}/v", p.name), out.v)?;
                    let w = ctx.round(&format!("opt/{}/param", p.name), out.w)?;
                    put(state, slot_key(&p.name, "m"), m)?;
                    put(state, slot_key(&p.name, "v"), v)?;
                    put(state, param_key(&p.name), w)?;
                }
            }
        }
        Ok(())
    }

    /// Mean loss and (for classification) accuracy over up to `max` held-out examples. Not part
    /// of the verified path: its rounding log is discarded.
    pub fn evaluate(&self, state: &TrainingState, max: usize) -> Result<Evaluation, EngineError> {
        self.check_state(state).map_err(EngineError::InvalidState)?;
        let n = self.data.n_holdout().min(max);
        if n == 0 {
            return Ok(Evaluation { examples: 0, loss: None, accuracy: None });
        }
        let chunk = if matches!(self.data, Dataset::Text { .. }) { 16 } else { 250 };
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let mut start = 0;
        while start < n {
            let end = (start + chunk).min(n);
            let idx: Vec<u64> = (start..end).map(|k| self.data.holdout_index(k) as u64).collect();
            let batch = Batch::gather(&self.data, &idx);
            let mut rounder = Rounder::commit();
            let mut ctx = Ctx::new(&self.device, &mut rounder, state.step, &self.spec);
            let (loss, logits) = self.model.forward_logits(&mut ctx, state, &batch)?;
            loss_sum += loss as f64 * (end - start) as f64;
            if let (Some(logits), Batch::Classes { y, .. }) = (logits, &batch) {
                let c = self.model.classes();
                for (r, &label) in y.iter().enumerate() {
                    let row = &logits[r * c..(r + 1) * c];
                    let best = (0..c).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                    correct += usize::from(best == label as usize);
                }
            }
            start = end;
        }
        let classification = matches!(self.data, Dataset::Classification { .. });
        Ok(Evaluation {
            examples: n,
            loss: Some(loss_sum / n as f64),
            accuracy: classification.then(|| correct as f64 / n as f64),
        })
    }
}

/// Why a state does not fit a run's model and optimizer; names the tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tensor {tensor} {what}")]
pub struct StateInvalid {
    pub tensor: String,
    pub what: String,
}

/// Held-out evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub examples: usize,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
}

/// Adds a direction entry at the first unlogged element of site `ordinal` (which rounds `len`
/// values) — the `forge-log` drill.
fn forge_entry(log: &mut TieBreakLog, ordinal: u32, len: u64) {
    let mut forged = log.site(ordinal).cloned().unwrap_or_else(|| SiteLog::new(len));
    let taken: std::collections::BTreeSet<u64> =
        forged.directions().map(|(i, _)| i).chain(forged.exacts().map(|(i, _)| i)).collect();
    let Some(index) = (0..len).find(|i| !taken.contains(i)) else { return };
    forged.insert_direction(index, Direction::Up);
    if log.replace(ordinal, forged.clone()).is_none() {
        // The site had no entries, so it was not stored; inserting it cannot fail.
        let _ = log.insert(ordinal, forged);
    }
}
