//! Phases 5 and 6: the bisection that cross-checks the step-by-step comparison, and the
//! verdict with its details, the state comparison and the evidence bundle.

use common::leaf::Leaf;
use common::merkle::{Bisection, BisectionOutcome, MerkleTree, ProvenLeaf, leaf_hash};
use common::rounding::RoundingError;
use common::state::TrainingState;
use engine::record;

use super::commit::Committed;
use super::job::{Finding, Found, Merged, StepFinding};
use super::{Audit, AuditOptions, BisectionSummary, Phase, StateComparison, StepDetail, Stop, TensorDiff, source_stop};
use crate::evidence::Evidence;
use crate::source::TrainerSource;
use crate::{AuditError, LeafPart, Verdict};

/// A finding that is already a verdict (or the auditor's own failure) ends the audit here;
/// only a step finding goes on to bisection and evidence.
pub(super) fn stop_early(mut merged: Merged) -> Result<Merged, Stop> {
    match merged.finding.take() {
        Some(Finding { found: Found::Stop(stop), .. }) => Err(stop),
        finding => {
            merged.finding = finding;
            Ok(merged)
        }
    }
}

/// Bisection over the auditor's tree (its own leaves where it replayed, up to the first
/// finding; the trainer's elsewhere) against the trainer's root. It must land on the step the
/// step-by-step comparison found, within ⌈log₂ n⌉ + 1 queries.
pub(super) fn bisect(src: &dyn TrainerSource, c: &Committed, merged: &Merged) -> Result<BisectionSummary, Stop> {
    let last = merged.finding.as_ref().map_or(u64::MAX, |f| f.step);
    let own_tree = MerkleTree::from_leaf_hashes(c.leaves.iter().map(|l| {
        let leaf = if l.step <= last { merged.own.get(&l.step).unwrap_or(l) } else { l };
        leaf_hash(&leaf.encode())
    }));
    let size = c.commitment.n_leaves;
    let mut bisection = Bisection::new(&own_tree, size, c.commitment.root)
        .map_err(|e| AuditError::Internal(format!("bisection could not start: {e}")))?;
    while let Some((lo, hi)) = bisection.next_query() {
        let (l, r) = src.child_hashes(lo, hi, size).map_err(|e| source_stop(e, Phase::Committed))?;
        bisection
            .answer(l, r)
            .map_err(|e| Verdict::invalid(record::LEAVES_FILE, None, format!("bisection answer: {e}")))?;
    }
    let limit = Bisection::query_limit(size);
    if bisection.queries() > limit {
        return Err(
            AuditError::Internal(format!("bisection took {} queries, more than {limit}", bisection.queries())).into()
        );
    }
    let located = match bisection.outcome() {
        Some(BisectionOutcome::Diverged { first_differing_leaf, .. }) => Some(first_differing_leaf),
        _ => None,
    };
    let expected = match &merged.finding {
        Some(Finding { step, found: Found::Step(s), .. }) if s.diverged => Some(*step),
        _ => None,
    };
    if located != expected {
        return Err(AuditError::Internal(format!(
            "bisection located leaf {located:?} but the step-by-step comparison found {expected:?}"
        ))
        .into());
    }
    Ok(BisectionSummary { queries: bisection.queries(), query_limit: limit, first_differing_leaf: located })
}

/// A record without a signed manifest, audited with the trainer's key pinned: its committed
/// steps replayed consistently, but the pinned key signed nothing, so the record is not that
/// trainer's. The signature is withheld, whatever the reason: a finished run signs its root, and
/// a run still in progress is audited without a pin (its report says the root is unsigned). A
/// divergence in such a record is still `diverged`: withholding the manifest hides nothing.
fn unsigned_under_a_pin(c: &Committed, opts: &AuditOptions) -> Option<Verdict> {
    let key = opts.trainer_key.as_ref().filter(|_| c.commitment.manifest.is_none())?;
    Some(Verdict::invalid(
        record::MANIFEST_FILE,
        None,
        format!(
            "withheld: no manifest, so the pinned trainer key {key} signed nothing in this record ({} committed \
             steps, unsigned; those replayed agree)",
            c.n_steps
        ),
    ))
}

/// The verdict of a merged replay, with its details and evidence written into `audit`.
pub(super) fn conclude(
    src: &dyn TrainerSource,
    c: &Committed,
    merged: Merged,
    opts: &AuditOptions,
    init_weights: Option<Vec<u8>>,
    audit: &mut Audit,
) -> Result<Verdict, Stop> {
    let Some(finding) = merged.finding else {
        return Ok(unsigned_under_a_pin(c, opts).unwrap_or(Verdict::Consistent));
    };
    let s = finding.step;
    let sf = match finding.found {
        Found::Step(sf) => sf,
        Found::Stop(stop) => return Err(stop),
    };
    let trainer_leaf = c.leaves[s as usize];
    let verdict = if sf.diverged { diverged_verdict(s, &sf, &trainer_leaf) } else { forged_verdict(s, &sf.forged) };
    // A step that did not stay finite has the "no state" leaf (re-executing the step reproduces
    // it), so the dispute has its bundle like any other.
    let own_leaf = sf.own_leaf;
    let size = c.commitment.n_leaves;
    let proven = |i: u64| -> Result<ProvenLeaf, Stop> {
        let proof = src.inclusion_proof(i, size).map_err(|e| source_stop(e, Phase::Committed))?;
        let p = ProvenLeaf { leaf: c.leaves[i as usize], proof };
        p.verify(i, size, &c.commitment.root)
            .map_err(|e| Verdict::invalid(record::LEAVES_FILE, None, format!("inclusion proof of leaf {i}: {e}")))?;
        Ok(p)
    };
    let trainer = proven(s)?;
    let previous = if s == 0 { None } else { Some(proven(s - 1)?) };
    let state = match (&verdict, &sf.own_state) {
        (Verdict::Diverged { differs, .. }, Some(own)) if differs.contains(&LeafPart::State) => {
            Some(compare_state(src, c, s, own))
        }
        (Verdict::Diverged { .. }, None) if sf.overflow.is_some() => Some(StateComparison::Unavailable(format!(
            "replaying step {s} did not stay finite: the auditor has no state to compare (its leaf's state digest is \
             all zeros)"
        ))),
        (Verdict::Diverged { .. }, _) => Some(StateComparison::Compared(Vec::new())),
        _ => None,
    };
    audit.detail = Some(StepDetail {
        step: s,
        trainer: trainer.clone(),
        auditor_leaf: own_leaf,
        previous: previous.clone(),
        trainer_batch: sf.trainer_batch.clone(),
        auditor_batch: sf.own_batch.clone(),
        forged: sf.forged.iter().map(|e| e.to_string()).collect(),
        state,
    });
    audit.evidence = Some(Evidence {
        verdict_kind: verdict.kind(),
        step: s,
        spec_json: c.commitment.spec_bytes.clone(),
        manifest_json: c
            .commitment
            .manifest
            .as_ref()
            .map(|m| serde_json::to_vec(m).expect("manifest serialises"))
            .unwrap_or_default(),
        root: c.commitment.root,
        n_leaves: size,
        trainer,
        auditor_leaf: own_leaf,
        auditor_device: opts.device.name().to_string(),
        previous,
        // At step 0 of a fine-tune the "previous state" is the committed starting weights.
        prev_state: match (&sf.prev, s) {
            (Some(prev), _) => prev.encode(),
            (None, 0) => init_weights.unwrap_or_default(),
            (None, _) => Vec::new(),
        },
        trainer_batch: sf.trainer_batch,
        trainer_log: sf.log,
    });
    Ok(verdict)
}

fn diverged_verdict(step: u64, sf: &StepFinding, trainer: &Leaf) -> Verdict {
    let own = &sf.own_leaf;
    let parts = [(LeafPart::State, own.state != trainer.state), (LeafPart::Batch, own.batch != trainer.batch)];
    let differs = parts.into_iter().filter_map(|(p, d)| d.then_some(p)).collect();
    let detail = sf
        .overflow
        .as_ref()
        .map(|(_, msg)| format!("replaying step {step} from the agreed state does not stay finite: {msg}"));
    let site = sf.overflow.as_ref().map(|(site, _)| site.clone()).or_else(|| sf.forged.iter().find_map(forged_site));
    Verdict::Diverged { step, site, differs, detail }
}

/// The trainer's state at `step` (if its side hands it out and it matches the committed leaf)
/// against the auditor's, tensor by tensor.
fn compare_state(src: &dyn TrainerSource, c: &Committed, step: u64, own: &TrainingState) -> StateComparison {
    match src.state(step) {
        Ok(t) if t.step == step && t.digest(c.spec.state_hash()) == c.leaves[step as usize].state => {
            StateComparison::Compared(diff_states(&t, own))
        }
        Ok(_) => StateComparison::Unavailable(format!(
            "the state the trainer side handed out for step {step} does not match its committed leaf"
        )),
        Err(e) => {
            StateComparison::Unavailable(format!("the trainer side did not hand out its state at step {step}: {e}"))
        }
    }
}

/// Every tensor whose bits differ, in name order.
pub(crate) fn diff_states(trainer: &TrainingState, auditor: &TrainingState) -> Vec<TensorDiff> {
    let mut names: Vec<&str> = trainer.tensors().map(|(n, _)| n).chain(auditor.tensors().map(|(n, _)| n)).collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let (t, a) = (trainer.get(name), auditor.get(name));
        let mut d = TensorDiff {
            tensor: name.to_string(),
            elements: 0,
            first_index: None,
            trainer: None,
            auditor: None,
            max_abs_diff: None,
            trainer_shape: None,
            auditor_shape: None,
        };
        match (t, a) {
            (Some(t), Some(a)) if t.shape == a.shape && t.data.len() == a.data.len() => {
                let mut max = 0.0f64;
                for (i, (x, y)) in t.data.iter().zip(&a.data).enumerate() {
                    if x.to_bits() != y.to_bits() {
                        if d.first_index.is_none() {
                            d.first_index = Some(i as u64);
                            d.trainer = Some(*x);
                            d.auditor = Some(*y);
                        }
                        d.elements += 1;
                        max = max.max((f64::from(*x) - f64::from(*y)).abs());
                    }
                }
                if d.elements == 0 {
                    continue;
                }
                d.max_abs_diff = Some(max);
            }
            (t, a) => {
                d.elements = t.map_or(0, |t| t.data.len()).max(a.map_or(0, |a| a.data.len())) as u64;
                d.trainer_shape = t.map(|t| t.shape.clone());
                d.auditor_shape = a.map(|a| a.shape.clone());
            }
        }
        out.push(d);
    }
    out
}

fn forged_site(e: &RoundingError) -> Option<String> {
    match e {
        RoundingError::ForgedEntry { site, .. }
        | RoundingError::UnusedSite { site }
        | RoundingError::LengthMismatch { site, .. } => Some(site.clone()),
        _ => None,
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// The `forged-log` verdict from the forged entries at a step: the first `ForgedEntry` if there
/// is one, else the first other finding (a site never rounded, or a log of the wrong length).
fn forged_verdict(step: u64, forged: &[RoundingError]) -> Verdict {
    let first = forged.iter().find(|e| matches!(e, RoundingError::ForgedEntry { .. })).or(forged.first());
    let (site, index, value, midpoint, bound) = match first {
        Some(RoundingError::ForgedEntry { site, index, value, midpoint, bound, .. }) => {
            (site.clone(), Some(*index), finite(*value), finite(*midpoint), finite(*bound))
        }
        Some(other) => (forged_site(other).unwrap_or_default(), None, None, None, None),
        None => (String::new(), None, None, None, None),
    };
    Verdict::ForgedLog {
        step,
        site,
        index,
        value,
        midpoint,
        bound,
        detail: first.map(|e| e.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::state::Tensor;

    fn state(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> TrainingState {
        let mut s = TrainingState::new(3);
        for (n, shape, data) in tensors {
            s.insert(n, Tensor::new(shape.clone(), data.clone()).unwrap()).unwrap();
        }
        s
    }

    #[test]
    fn state_diff_names_each_differing_tensor_with_count_first_index_and_values() {
        let t = state(&[
            ("param/a", vec![4], vec![1.0, 2.0, 3.0, 4.0]),
            ("param/b", vec![2], vec![0.5, 0.5]),
            ("param/only_trainer", vec![1], vec![9.0]),
        ]);
        let a = state(&[
            ("param/a", vec![4], vec![1.0, 2.5, 3.0, 4.5]),
            ("param/b", vec![2], vec![0.5, 0.5]),
            ("param/c", vec![1, 2], vec![0.0, -0.0]),
        ]);
        let d = diff_states(&t, &a);
        let names: Vec<&str> = d.iter().map(|x| x.tensor.as_str()).collect();
        assert_eq!(names, ["param/a", "param/c", "param/only_trainer"]);
        assert_eq!((d[0].elements, d[0].first_index, d[0].trainer, d[0].auditor), (2, Some(1), Some(2.0), Some(2.5)));
        assert_eq!(d[0].max_abs_diff, Some(0.5));
        assert_eq!((d[1].trainer_shape.clone(), d[1].auditor_shape.clone()), (None, Some(vec![1, 2])));
        assert_eq!(d[2].elements, 1);
        assert!(diff_states(&t, &t).is_empty());
    }
}
