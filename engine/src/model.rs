//! The model of a run: always a graph (`crate::graph`). A config's `mlp`, `cnn` and `gpt`
//! kinds are presets that expand to graphs (`crate::graph::presets`); the engine has no other
//! model code. This module holds what every model shares: the step context that rounds at
//! named sites, batches, parameter lists and their seeded initialisation.
//!
//! Rounding sites are named from the graph's nodes and visited in the order the graph module
//! documents; ops whose FP64 result is exact or correctly rounded from FP32 inputs carry
//! `ErrorBound::Exact` and are never logged.

use std::borrow::Cow;

use common::prng::Stream;
use common::rounding::Rounder;
use common::state::{Tensor, TrainingState};
use kernels::{Bounded, Device};

use crate::EngineError;
use crate::data::Dataset;
use crate::graph::{Graph, GraphConfig, Labels, presets};
use crate::spec::ModelConfig;

/// Everything one step's ops need: the device, the rounder and the step number.
#[derive(Debug)]
pub struct Ctx<'a, 'r> {
    pub dev: &'a Device,
    pub rounder: &'a mut Rounder<'r>,
    pub step: u64,
    pub seed: u64,
    /// Put before every site name (`micro/<j>/` while a step accumulates micro-batch `j`, so the
    /// model's sites stay unique within the step); empty otherwise.
    pub site_prefix: String,
    /// How batch norm and average pooling sum (the record format's definition,
    /// [`crate::spec::RunSpec::sums`]).
    pub sums: kernels::Sums,
}

impl<'a, 'r> Ctx<'a, 'r> {
    /// A context for step `step` of a run of `spec` (its seed and its format's definitions),
    /// with no site prefix.
    pub fn new(dev: &'a Device, rounder: &'a mut Rounder<'r>, step: u64, spec: &crate::spec::RunSpec) -> Self {
        Ctx { dev, rounder, step, seed: spec.config.train.seed, site_prefix: String::new(), sums: spec.sums() }
    }

    /// Rounds one op's FP64 result at a named site.
    pub fn round(&mut self, site: &str, b: Bounded) -> Result<Vec<f32>, EngineError> {
        let prefixed;
        let site = if self.site_prefix.is_empty() {
            site
        } else {
            prefixed = format!("{}{site}", self.site_prefix);
            &prefixed
        };
        self.rounder.round(site, &b.values, &b.bound).map_err(|error| EngineError::Rounding { step: self.step, error })
    }
}

/// A batch of examples, assembled from batch indices.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// `n` inputs of `dim` values each, and their labels.
    Classes { x: Vec<f32>, y: Vec<u32>, n: usize },
    /// `b` windows of `t` token ids, and the next-token targets.
    Tokens { ids: Vec<u32>, targets: Vec<u32>, b: usize, t: usize },
    /// `n` inputs and their F32 targets (regression).
    Targets { x: Vec<f32>, t: Vec<f32>, n: usize },
}

impl Batch {
    /// Assembles the examples named by `indices`.
    pub fn gather(data: &Dataset, indices: &[u64]) -> Batch {
        match data {
            Dataset::Classification { input_shape, inputs, labels, .. } => {
                let dim: usize = input_shape.iter().product();
                let mut x = Vec::with_capacity(indices.len() * dim);
                let mut y = Vec::with_capacity(indices.len());
                for &i in indices {
                    let i = i as usize;
                    x.extend_from_slice(&inputs[i * dim..(i + 1) * dim]);
                    y.push(labels[i]);
                }
                Batch::Classes { x, y, n: indices.len() }
            }
            Dataset::Regression { input_shape, inputs, target_shape, targets, .. } => {
                let (dim, per) = (input_shape.iter().product::<usize>(), target_shape.iter().product::<usize>());
                let mut x = Vec::with_capacity(indices.len() * dim);
                let mut t = Vec::with_capacity(indices.len() * per);
                for &i in indices {
                    let i = i as usize;
                    x.extend_from_slice(&inputs[i * dim..(i + 1) * dim]);
                    t.extend_from_slice(&targets[i * per..(i + 1) * per]);
                }
                Batch::Targets { x, t, n: indices.len() }
            }
            Dataset::Text { tokens, context, .. } => {
                let t = *context;
                let mut ids = Vec::with_capacity(indices.len() * t);
                let mut targets = Vec::with_capacity(indices.len() * t);
                for &i in indices {
                    let i = i as usize;
                    ids.extend_from_slice(&tokens[i..i + t]);
                    targets.extend_from_slice(&tokens[i + 1..i + t + 1]);
                }
                Batch::Tokens { ids, targets, b: indices.len(), t }
            }
        }
    }

    /// Changes one label (or target token) — the `flip-label` adversary drill.
    pub fn flip_one_label(&mut self, classes: usize) {
        match self {
            Batch::Classes { y, .. } => y[0] = (y[0] + 1) % classes as u32,
            Batch::Tokens { targets, .. } => targets[0] = (targets[0] + 1) % classes as u32,
            Batch::Targets { t, .. } => t[0] += 1.0,
        }
    }
}

/// How a parameter is initialised (uniform in `[-bound, bound]`, or a constant).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Uniform(f64),
    Const(f32),
}

/// A parameter's name, shape and initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// The key of a parameter in the training state.
pub fn param_key(name: &str) -> String {
    format!("param/{name}")
}

/// The key of an optimizer slot in the training state.
pub fn slot_key(name: &str, slot: &str) -> String {
    format!("opt/{name}/{slot}")
}

impl ModelConfig {
    /// The graph a config describes: its own for `graph`, the preset's for the others.
    pub fn graph(&self) -> Cow<'_, GraphConfig> {
        match self {
            ModelConfig::Mlp(m) => Cow::Owned(presets::mlp(&m.hidden)),
            ModelConfig::Cnn(c) => Cow::Owned(presets::cnn(c.channels)),
            ModelConfig::Gpt(g) => Cow::Owned(presets::gpt(g)),
            ModelConfig::Graph(g) => Cow::Borrowed(g),
        }
    }
}

/// A model: a checked graph, ready to run on its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    graph: Box<Graph>,
}

impl Model {
    /// Resolves a model config against the dataset it trains on.
    pub fn new(cfg: &ModelConfig, data: &Dataset) -> Result<Model, EngineError> {
        let bad = |d: &str| EngineError::Usage(format!("model/data mismatch: {d}"));
        let graph_cfg = cfg.graph();
        let graph = match (cfg, data) {
            (ModelConfig::Gpt(_), Dataset::Classification { .. }) => return Err(bad("the GPT trains on text data")),
            (ModelConfig::Mlp(_) | ModelConfig::Cnn(_), Dataset::Text { .. }) => {
                return Err(bad("MLP and CNN models train on classification data"));
            }
            (ModelConfig::Cnn(_), Dataset::Classification { input_shape, .. })
                if input_shape.len() != 3
                    || input_shape[0] != 1
                    || input_shape[1] % 4 != 0
                    || input_shape[2] % 4 != 0 =>
            {
                return Err(bad("the CNN needs 1×H×W images with H and W divisible by 4"));
            }
            (ModelConfig::Graph(_), Dataset::Regression { input_shape, target_shape, .. }) => {
                Graph::resolve_regression(&graph_cfg, input_shape, target_shape)
            }
            (_, Dataset::Regression { .. }) => {
                return Err(bad("the presets classify; F32 targets need a graph with an mse loss against labels"));
            }
            (_, Dataset::Classification { input_shape, classes, .. }) => {
                Graph::resolve(&graph_cfg, input_shape, *classes)
            }
            (_, Dataset::Text { vocab, context, .. }) => {
                if graph_cfg.context != Some(*context) {
                    return Err(bad("text context differs from model.context"));
                }
                Graph::resolve_text(&graph_cfg, *vocab)
            }
        }
        .map_err(EngineError::InvalidSpec)?;
        Ok(Model { graph: Box::new(graph) })
    }

    /// The model's graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Number of output classes (vocabulary size for text).
    pub fn classes(&self) -> usize {
        self.graph.classes()
    }

    /// The parameters, in a fixed order (the graph's node order).
    pub fn params(&self) -> &[ParamSpec] {
        self.graph.params()
    }

    /// Initial parameters from the committed seed (stream `init`, layer = parameter position).
    pub fn init_params(&self, seed: u64, state: &mut TrainingState) -> Result<(), EngineError> {
        for (pos, p) in self.params().iter().enumerate() {
            let n: usize = p.shape.iter().product();
            let data = match p.init {
                Init::Const(c) => vec![c; n],
                Init::Uniform(b) => {
                    let mut s = Stream::new(seed, "init", 0, pos as u32);
                    (0..n).map(|_| s.uniform(-b, b) as f32).collect()
                }
            };
            let t = Tensor::new(p.shape.clone(), data).map_err(EngineError::State)?;
            state.insert(&param_key(&p.name), t).map_err(EngineError::State)?;
        }
        Ok(())
    }

    /// Forward and backward pass: returns the loss and one gradient per parameter (in
    /// [`Model::params`] order), every intermediate rounded at its site.
    pub fn loss_and_grads(
        &self,
        ctx: &mut Ctx<'_, '_>,
        state: &TrainingState,
        batch: &Batch,
    ) -> Result<(f32, Vec<Vec<f32>>), EngineError> {
        self.pass(ctx, state, batch).map(|(l, g, _)| (l, g))
    }

    /// The loss and, for a cross-entropy loss, the logits (for evaluation; the backward pass
    /// runs too).
    pub fn forward_logits(
        &self,
        ctx: &mut Ctx<'_, '_>,
        state: &TrainingState,
        batch: &Batch,
    ) -> Result<(f32, Option<Vec<f32>>), EngineError> {
        self.pass(ctx, state, batch).map(|(l, _, logits)| (l, logits))
    }

    fn pass(&self, ctx: &mut Ctx<'_, '_>, state: &TrainingState, batch: &Batch) -> Result<Pass, EngineError> {
        let get = |name: &str| -> Result<&[f32], EngineError> {
            state
                .get(&param_key(name))
                .map(|t| t.data.as_slice())
                .ok_or_else(|| EngineError::Usage(format!("state has no parameter {name}")))
        };
        match batch {
            Batch::Classes { x, y, n } => self.graph.pass(ctx, &get, x, Labels::Classes(y), *n),
            Batch::Targets { x, t, n } => self.graph.pass(ctx, &get, x, Labels::Values(t), *n),
            Batch::Tokens { ids, targets, b, .. } => {
                // Token ids below 2²⁴ are exact in FP32; the embedding reads them back.
                let x: Vec<f32> = ids.iter().map(|&id| id as f32).collect();
                self.graph.pass(ctx, &get, &x, Labels::Classes(targets), *b)
            }
        }
    }
}

/// Loss, gradients in parameter order, and the logits of a cross-entropy loss.
type Pass = (f32, Vec<Vec<f32>>, Option<Vec<f32>>);
