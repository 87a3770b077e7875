//! Records whose every commitment is consistent (leaves, root, spec hash, signature), whatever
//! they commit to: what a guilty trainer with its own key can produce.

use std::path::Path;

use common::codec::{Hash, to_hex};
use common::leaf::LEAF_BYTES;
use common::merkle::{MerkleTree, leaf_hash};
use common::state::{Tensor, TrainingState};
use common::tielog;
use ed25519_dalek::Signer;
use engine::record::{self, Manifest, Record, SigningKey};

/// The key `support::write_record` signs with.
pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// Rewrites leaf `step`'s state digest (when given), then the manifest's root and spec hash,
/// signed again: a record whose every commitment is consistent, whatever it commits to.
pub fn recommit(dir: &Path, state_digest: Option<(u64, Hash)>, edit_manifest: impl FnOnce(&mut Manifest)) {
    let leaves_path = dir.join(record::LEAVES_FILE);
    let mut leaves = record::read_leaves(&leaves_path, false).unwrap();
    if let Some((step, digest)) = state_digest {
        leaves[step as usize].state = digest;
    }
    let bytes: Vec<u8> = leaves.iter().flat_map(|l| l.encode()).collect();
    assert_eq!(bytes.len(), leaves.len() * LEAF_BYTES);
    std::fs::write(&leaves_path, bytes).unwrap();
    let tree = MerkleTree::from_leaf_hashes(leaves.iter().map(|l| leaf_hash(&l.encode())));
    let manifest_path = dir.join(record::MANIFEST_FILE);
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    m.root = to_hex(&tree.root());
    m.spec_hash = to_hex(&common::codec::sha256(&std::fs::read(dir.join(record::SPEC_FILE)).unwrap()));
    // Signed by the test key (records from fixtures carry another).
    m.public_key = to_hex(key().verifying_key().as_bytes());
    edit_manifest(&mut m);
    m.signature = to_hex(&key().sign(&m.signing_payload()).to_bytes());
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Replaces step `step`'s log by the canonical bytes `raw` (stored as the trainer would), under
/// a correct leaf, root and signature.
pub fn tamper_log(dir: &Path, step: u64, raw: &[u8]) {
    std::fs::write(record::log_path(dir, step), tielog::compress_canonical(raw)).unwrap();
    let leaves_path = dir.join(record::LEAVES_FILE);
    let mut leaves = record::read_leaves(&leaves_path, false).unwrap();
    leaves[step as usize].log = common::codec::sha256(raw);
    std::fs::write(&leaves_path, leaves.iter().flat_map(|l| l.encode()).collect::<Vec<u8>>()).unwrap();
    recommit(dir, None, |_| {});
}

/// Replaces checkpoint `step` by `edit` of it, under a correct hash, leaf, root and signature.
pub fn tamper_checkpoint(dir: &Path, step: u64, edit: impl FnOnce(&TrainingState) -> TrainingState) {
    let rec = Record::open(dir).unwrap();
    let bad = edit(&rec.checkpoint(step).unwrap());
    std::fs::write(record::checkpoint_path(dir, step), tielog::compress_canonical(&bad.encode())).unwrap();
    recommit(dir, Some((step, bad.digest(rec.spec().state_hash()))), |_| {});
}

/// Replaces the spec by `edit` of its JSON, and signs a manifest that commits to it.
pub fn tamper_spec(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(record::SPEC_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    let spec: engine::spec::RunSpec = serde_json::from_value(v).unwrap();
    std::fs::write(&path, spec.canonical_json()).unwrap();
    recommit(dir, None, |_| {});
}

/// A copy of `s` with its tensors passed through `f` (name, tensor) → kept entries.
pub fn rebuilt(s: &TrainingState, f: impl Fn(&str, &Tensor) -> Vec<(String, Tensor)>) -> TrainingState {
    let mut out = TrainingState::new(s.step);
    for (n, t) in s.tensors() {
        for (n2, t2) in f(n, t) {
            out.insert(&n2, t2).unwrap();
        }
    }
    out
}
