//! A state the trainer hands out (a checkpoint, a resumed state) is checked against the model
//! before the auditor steps from it: a malformed state under a correct hash is the trainer's
//! commitment failing, never a panic or an error of the auditor's.

use std::collections::BTreeMap;

use common::state::TrainingState;
use engine::train::Run;

use crate::AuditError;

/// The tensors (names and shapes) a state of this run must have.
#[derive(Debug)]
pub(super) struct StateChecks {
    layout: BTreeMap<String, Vec<usize>>,
}

/// What is wrong with a state, naming the tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StateProblem {
    pub tensor: String,
    pub what: String,
}

impl std::fmt::Display for StateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor {}: {}", self.tensor, self.what)
    }
}

impl StateChecks {
    /// The layout of `run`'s states: the initial state's tensors (parameters and optimizer
    /// slots; every later state has the same ones).
    pub fn new(run: &Run) -> Result<StateChecks, AuditError> {
        let init = run.initial_state()?;
        Ok(StateChecks { layout: init.tensors().map(|(n, t)| (n.to_string(), t.shape.clone())).collect() })
    }

    /// Names, shapes, lengths and finiteness; the step counter is the caller's to check.
    pub fn check(&self, state: &TrainingState) -> Result<(), StateProblem> {
        let problem = |tensor: &str, what: String| Err(StateProblem { tensor: tensor.to_string(), what });
        for (name, shape) in &self.layout {
            let Some(t) = state.get(name) else {
                return problem(name, "missing".into());
            };
            if &t.shape != shape {
                return problem(name, format!("shape {:?}, the model's is {shape:?}", t.shape));
            }
            let len: usize = shape.iter().product();
            if t.data.len() != len {
                return problem(name, format!("{} values, its shape {shape:?} holds {len}", t.data.len()));
            }
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return problem(name, format!("element {i} is not finite ({})", t.data[i]));
            }
        }
        if let Some((name, _)) = state.tensors().find(|(n, _)| !self.layout.contains_key(*n)) {
            return problem(name, "not a tensor of this model and optimizer".into());
        }
        Ok(())
    }
}
