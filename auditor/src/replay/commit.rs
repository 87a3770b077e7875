//! Phase 1: what the trainer committed to. Nothing is replayed until the spec, the signed
//! manifest, the leaves, the pinned key and the checkpoint list hold up against each other.

use std::collections::BTreeSet;

use common::codec::to_hex;
use common::leaf::{LEAF_BYTES, Leaf};
use common::merkle::{MerkleTree, leaf_hash};
use engine::record::{self, Manifest};
use engine::spec::RunSpec;

use super::{AuditOptions, Commitment, Phase, Stop, source_stop};
use crate::source::{TrainerSource, record_file};
use crate::{AuditError, Verdict};

/// The commitment phase's result: everything later phases check the trainer's pieces against.
#[derive(Debug)]
pub(super) struct Committed {
    pub commitment: Commitment,
    pub spec: RunSpec,
    pub leaves: Vec<Leaf>,
    /// Steps with a committed checkpoint: every multiple of the checkpoint interval up to the
    /// last step, and the last step of a finished run.
    pub checkpoints: BTreeSet<u64>,
    pub n_steps: u64,
    /// The Merkle tree over the leaves.
    pub tree: MerkleTree,
}

/// Checks the spec, manifest, leaves and checkpoint list the trainer side hands out.
pub(super) fn check(src: &dyn TrainerSource, opts: &AuditOptions) -> Result<Committed, Stop> {
    let spec_bytes = src.spec_bytes().map_err(|e| source_stop(e, Phase::FirstContact))?;
    let spec = committed_spec(&spec_bytes)?;
    let spec_hash = common::codec::sha256(&spec_bytes);
    let manifest = src.manifest().map_err(|e| source_stop(e, Phase::Committing))?;
    // Once a signed manifest is out, its leaves are committed: refusing them is withholding.
    let leaves_phase = if manifest.is_some() { Phase::Committed } else { Phase::Committing };
    // The signature first: its step count then bounds what the leaves may be (a source's own
    // count, such as a record server's run info, is not signed).
    if let Some(m) = &manifest {
        check_signed(m, &spec, &spec_hash)?;
    }
    let leaves = src.leaves(manifest.as_ref().map(|m| m.n_steps)).map_err(|e| source_stop(e, leaves_phase))?;
    if leaves.is_empty() {
        return Err(Verdict::invalid(record::LEAVES_FILE, Some(0), "no initial leaf").into());
    }
    if let Some(i) = leaves.iter().enumerate().position(|(i, l)| l.step != i as u64) {
        return Err(Verdict::invalid(
            record::LEAVES_FILE,
            Some((i * LEAF_BYTES) as u64 + 5),
            format!("leaf {i} claims step {}", leaves[i].step),
        )
        .into());
    }
    let n_steps = leaves.len() as u64 - 1;
    if n_steps > spec.n_steps {
        return Err(Verdict::invalid(
            record::LEAVES_FILE,
            None,
            format!("{} leaves, more than the {} steps the spec plans (+1)", leaves.len(), spec.n_steps),
        )
        .into());
    }
    let tree = MerkleTree::from_leaf_hashes(leaves.iter().map(|l| leaf_hash(&l.encode())));
    if let Some(m) = &manifest {
        check_manifest(m, &tree)?;
    }
    if let Some(key) = &opts.trainer_key {
        match &manifest {
            Some(m) if m.public_key == key.to_ascii_lowercase() => {}
            Some(m) => {
                return Err(Verdict::invalid(
                    record::MANIFEST_FILE,
                    None,
                    format!("signed by key {}, not by the pinned trainer key {key}", m.public_key),
                )
                .into());
            }
            // Unfinished (or its manifest withheld): no key has signed anything yet. The audit
            // goes on, so a run that diverged is `diverged` (refusing here would let a trainer
            // escape that verdict by withholding its manifest); if it does not, the withheld
            // signature is the verdict (`conclude::unsigned_under_a_pin`).
            None => {}
        }
    }
    let checkpoints = checkpoint_list(src, &spec, n_steps, manifest.is_some())?;
    let commitment = Commitment {
        spec_bytes,
        spec_hash,
        trainer_device: spec.device_profile.clone(),
        root: tree.root(),
        n_leaves: tree.len(),
        manifest,
    };
    Ok(Committed { commitment, spec, leaves, checkpoints, n_steps, tree })
}

/// The spec's bytes as a run spec: JSON in canonical form, every field in range (the engine's
/// own validation, the one the trainer ran), so nothing later panics, overflows or hangs on it.
pub(crate) fn committed_spec(bytes: &[u8]) -> Result<RunSpec, Stop> {
    check_format(bytes)?;
    let spec =
        RunSpec::from_committed_json(bytes).map_err(|e| Verdict::invalid(record::SPEC_FILE, None, e.to_string()))?;
    if spec.canonical_json() != bytes {
        return Err(Verdict::invalid(record::SPEC_FILE, None, "not in canonical form").into());
    }
    Ok(spec)
}

/// A spec of an earlier record format ([`RunSpec::earlier_format`]) is a record this build
/// cannot read, not a wrong one: the audit cannot decide, and says which format to audit it
/// with, as a local record's [`engine::record::RecordError::EarlierFormat`] does.
fn check_format(bytes: &[u8]) -> Result<(), Stop> {
    match RunSpec::earlier_format(bytes) {
        Some(version) => Err(Stop::Undecided(AuditError::Source(
            engine::record::RecordError::EarlierFormat { path: record::SPEC_FILE.into(), version }.to_string(),
        ))),
        None => Ok(()),
    }
}

/// The signed manifest against the spec and the leaves.
/// The manifest's signature and what it says of the spec, before its leaves are fetched.
fn check_signed(m: &Manifest, spec: &RunSpec, spec_hash: &common::codec::Hash) -> Result<(), Stop> {
    let bad = |what: String| Stop::Verdict(Verdict::invalid(record::MANIFEST_FILE, None, what));
    m.verify_signature().map_err(bad)?;
    if m.spec_hash != to_hex(spec_hash) {
        return Err(bad(format!("spec hash {} does not match spec.json's {}", m.spec_hash, to_hex(spec_hash))));
    }
    m.check_against(spec).map_err(bad)
}

/// The signed manifest against the leaves: their number and their root.
fn check_manifest(m: &Manifest, tree: &MerkleTree) -> Result<(), Stop> {
    if m.n_steps + 1 != tree.len() {
        return Err(Stop::Verdict(Verdict::invalid(
            record::LEAVES_FILE,
            None,
            format!("{} leaves, the manifest commits to {}", tree.len(), m.n_steps + 1),
        )));
    }
    if m.root != to_hex(&tree.root()) {
        return Err(Stop::Verdict(Verdict::invalid(
            record::LEAVES_FILE,
            None,
            format!("root over the leaves {} is not the manifest's {}", to_hex(&tree.root()), m.root),
        )));
    }
    Ok(())
}

/// The checkpoints the trainer must hold: every multiple of the interval up to `n_steps`, and
/// the final state of a finished run. A list that omits one is the trainer withholding it.
fn checkpoint_list(
    src: &dyn TrainerSource,
    spec: &RunSpec,
    n_steps: u64,
    finished: bool,
) -> Result<BTreeSet<u64>, Stop> {
    let listed: BTreeSet<u64> =
        src.checkpoint_steps().map_err(|e| source_stop(e, Phase::Committed))?.into_iter().collect();
    let k = spec.config.train.checkpoint_interval.max(1);
    let mut committed: BTreeSet<u64> = (0..=n_steps / k).map(|i| i * k).collect();
    if finished {
        committed.insert(n_steps);
    }
    if let Some(&missing) = committed.iter().find(|s| !listed.contains(s)) {
        let what = if missing == n_steps && finished {
            format!("the finished run has no checkpoint of its final state (step {missing})")
        } else {
            format!("no checkpoint at step {missing}, which the checkpoint interval {k} commits to")
        };
        return Err(Verdict::invalid(record_file(record::checkpoint_path, missing), None, what).into());
    }
    Ok(committed)
}
