//! Phases 1 and 2 together, as an attempt (or a fleet helper) opens a record before it
//! replays anything: the commitments checked, the run built, the plan made ([`Opened`]); and
//! what durable progress from other attempts depends on in that record ([`RecordView`]).

use common::codec::{Hash, to_hex};
use common::merkle::MerkleTree;
use engine::train::Run;
use kernels::Profile;

use super::commit::{self, Committed};
use super::plan::{self, Plan};
use super::{AuditOptions, Phase, Stop, source_stop};
use crate::setup::build_run;
use crate::source::TrainerSource;
use crate::{AuditError, Verdict};

/// A record opened for replay. Nothing in it depends on the attempt: a fleet helper keeps one
/// per audit and replays every interval it takes from it.
#[derive(Debug)]
pub struct Opened {
    pub(super) committed: Committed,
    pub(super) run: Run,
    pub(super) plan: Plan,
    /// A fine-tune's committed starting weights, already loaded into `run` (when the plan
    /// replays from step 0).
    pub(super) init_weights: Option<Vec<u8>>,
    /// The profile `run` replays on.
    pub(super) device: Profile,
}

impl Opened {
    /// Checks the commitments, then builds the run and the plan ([`Opened::from_committed`]).
    pub fn open(src: &dyn TrainerSource, opts: &AuditOptions) -> Result<Opened, Stop> {
        let committed = commit::check(src, opts)?;
        Opened::from_committed(src, opts, committed)
    }

    /// The run on `opts.device` and the plan of `opts.mode`, for a record whose commitments
    /// checked out.
    pub(super) fn from_committed(
        src: &dyn TrainerSource,
        opts: &AuditOptions,
        committed: Committed,
    ) -> Result<Opened, Stop> {
        let chosen = match (&opts.data, &opts.choose_data) {
            (None, Some(choose)) => (choose.0)(&committed.spec).map_err(AuditError::Data)?,
            (data, _) => data.clone(),
        };
        // Each replay thread holds a step (interval and spot audits run one interval per thread).
        let mut run = build_run(&committed.spec, chosen.as_deref(), opts.device, rayon::current_num_threads())?;
        let plan = plan::plan(src, &committed, &run, opts)?;
        let mut init_weights = None;
        if committed.spec.init_weights.is_some() && plan.jobs.iter().any(|j| j.start == 0) {
            // A fine-tune: the initial state comes from the committed starting weights.
            let bytes = src.init_weights().map_err(|e| source_stop(e, Phase::Committed))?;
            run.load_init_weights(&bytes)
                .map_err(|p| Verdict::invalid(engine::init::INIT_WEIGHTS_FILE, None, p.detail()))?;
            init_weights = Some(bytes);
        }
        Ok(Opened { committed, run, plan, init_weights, device: opts.device })
    }

    /// What durable progress depends on in this record.
    pub fn view(&self) -> RecordView<'_> {
        RecordView::new(self.committed.commitment.spec_hash, &self.committed.tree, self.device)
    }

    /// The plan's jobs `(start, end]`.
    pub fn intervals(&self) -> Vec<(u64, u64)> {
        self.plan.jobs.iter().map(|j| (j.start, j.end)).collect()
    }

    /// The intervals `(start, end]` a fleet shares out as work items (in full mode, the
    /// checkpoint intervals of its one job).
    pub fn shared_intervals(&self) -> Vec<(u64, u64)> {
        self.plan.shared.iter().map(|j| (j.start, j.end)).collect()
    }
}

/// Whether an attempt may resume from the durable progress it was handed
/// ([`super::Progress::opened`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The progress was verified against this record (or one it extends): resume from it.
    Keep,
    /// It was verified against another record: replay everything.
    Discard,
}

/// What a verified point depends on in a record: the spec it was replayed under and the
/// committed leaves it reproduced. Progress verified against one record holds for another only
/// if the other has the same spec and its leaves begin with the first one's (a run that went on
/// between two attempts). Anything else (a trainer that serves another record to a later
/// attempt, or to another daemon of the fleet) must be replayed again, or a step checked
/// against one record would count for another.
///
/// The profile the audit replays on is part of it too: every step of one audit is replayed on
/// one profile, the one its report names, whichever daemon of a fleet replays it.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    spec_hash: Hash,
    tree: &'a MerkleTree,
    device: Profile,
}

impl<'a> RecordView<'a> {
    pub fn new(spec_hash: Hash, tree: &'a MerkleTree, device: Profile) -> Self {
        RecordView { spec_hash, tree, device }
    }

    /// `"<SHA-256 of the spec>:<number of leaves>:<Merkle root of the leaves>:<profile>"`,
    /// hashes in hex.
    pub fn binding(&self) -> String {
        format!("{}:{}:{}:{}", to_hex(&self.spec_hash), self.tree.len(), to_hex(&self.tree.root()), self.device.name())
    }

    /// The replay profile a binding names, if it names one this build knows.
    pub fn device_of(binding: &str) -> Option<Profile> {
        binding.split(':').nth(3)?.parse().ok()
    }

    /// Whether progress verified against the record that `binding` ([`RecordView::binding`])
    /// describes holds for this one: the same spec and profile, and leaves that begin with that
    /// record's.
    pub fn extends(&self, binding: &str) -> bool {
        let mut parts = binding.split(':');
        let (Some(spec), Some(n), Some(root), Some(device), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(n) = n.parse::<u64>() else { return false };
        spec == to_hex(&self.spec_hash)
            && device == self.device.name()
            && n >= 1
            && n <= self.tree.len()
            && self.tree.root_at(n).is_ok_and(|r| to_hex(&r) == root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(leaves: &[u8]) -> MerkleTree {
        MerkleTree::from_leaf_hashes(leaves.iter().map(|&b| [b; 32]))
    }

    #[test]
    fn progress_holds_only_for_the_same_spec_and_a_record_that_extends_it() {
        let (short, long, forked) = (tree(&[1, 2, 3]), tree(&[1, 2, 3, 4, 5]), tree(&[1, 9, 3, 4, 5]));
        let spec = [7; 32];
        const D: Profile = Profile::CpuAlt;
        let bound = RecordView::new(spec, &short, D).binding();
        assert!(RecordView::new(spec, &short, D).extends(&bound), "the same record");
        assert!(RecordView::new(spec, &long, D).extends(&bound), "the run went on");
        assert!(!RecordView::new(spec, &forked, D).extends(&bound), "an earlier leaf changed");
        assert!(!RecordView::new([8; 32], &long, D).extends(&bound), "another spec");
        let longer = RecordView::new(spec, &long, D).binding();
        assert!(!RecordView::new(spec, &short, D).extends(&longer), "a record cut short");
        assert!(!RecordView::new(spec, &short, Profile::CpuSeq).extends(&bound), "another replay profile");
        assert_eq!(RecordView::device_of(&bound), Some(D));
        for garbage in ["", "x", &bound.replace(':', ";"), &format!("{bound}:1"), &bound.replacen(":3:", ":0:", 1)] {
            assert!(!RecordView::new(spec, &long, D).extends(garbage), "{garbage:?}");
        }
    }
}
