//! Property tests: any tampering with an inclusion or consistency proof — one flipped bit of any
//! proof hash, of the leaf or of a root, a wrong index, a wrong size (with the root committed for
//! that size), a dropped or extra hash — makes verification fail.

use common::merkle::{Hash, MerkleTree, leaf_hash, verify_consistency, verify_inclusion};
use proptest::prelude::*;

const MAX_LEAVES: u64 = 400;

fn tree(seed: u64) -> MerkleTree {
    MerkleTree::from_leaf_hashes((0..MAX_LEAVES).map(|i| leaf_hash(&[seed.to_le_bytes(), i.to_le_bytes()].concat())))
}

fn flip(mut h: Hash, byte: usize, bit: u8) -> Hash {
    h[byte] ^= 1 << bit;
    h
}

/// (seed, size in 2..=300, index < size).
fn size_and_index() -> impl Strategy<Value = (u64, u64, u64)> {
    (any::<u64>(), 2..=300u64).prop_flat_map(|(seed, n)| (Just(seed), Just(n), 0..n))
}

proptest! {
    #[test]
    fn inclusion_rejects_any_flipped_proof_bit(
        (seed, n, index) in size_and_index(),
        which in any::<prop::sample::Index>(),
        byte in 0..32usize,
        bit in 0..8u8,
    ) {
        let t = tree(seed);
        let (leaf, root) = (t.leaf_hash(index).unwrap(), t.root_at(n).unwrap());
        let mut proof = t.inclusion_proof(index, n).unwrap();
        prop_assert!(verify_inclusion(&leaf, index, n, &proof, &root).is_ok());
        let j = which.index(proof.len());
        proof[j] = flip(proof[j], byte, bit);
        prop_assert!(verify_inclusion(&leaf, index, n, &proof, &root).is_err());
    }

    #[test]
    fn inclusion_rejects_a_flipped_leaf_or_root_bit(
        (seed, n, index) in size_and_index(),
        byte in 0..32usize,
        bit in 0..8u8,
    ) {
        let t = tree(seed);
        let (leaf, root) = (t.leaf_hash(index).unwrap(), t.root_at(n).unwrap());
        let proof = t.inclusion_proof(index, n).unwrap();
        prop_assert!(verify_inclusion(&flip(leaf, byte, bit), index, n, &proof, &root).is_err());
        prop_assert!(verify_inclusion(&leaf, index, n, &proof, &flip(root, byte, bit)).is_err());
    }

    #[test]
    fn inclusion_rejects_a_wrong_index(
        (seed, n, index) in size_and_index(),
        other in any::<prop::sample::Index>(),
    ) {
        let t = tree(seed);
        let other = other.index(n as usize) as u64;
        prop_assume!(other != index);
        let root = t.root_at(n).unwrap();
        let proof = t.inclusion_proof(index, n).unwrap();
        // Claiming this leaf sits elsewhere, or passing another leaf off with this proof.
        let leaf = t.leaf_hash(index).unwrap();
        prop_assert!(verify_inclusion(&leaf, other, n, &proof, &root).is_err());
        let other_leaf = t.leaf_hash(other).unwrap();
        prop_assert!(verify_inclusion(&other_leaf, other, n, &proof, &root).is_err());
        prop_assert!(verify_inclusion(&other_leaf, index, n, &proof, &root).is_err());
    }

    #[test]
    fn inclusion_rejects_a_wrong_size(
        (seed, n, index) in size_and_index(),
        wrong in 1..=MAX_LEAVES,
    ) {
        prop_assume!(wrong != n && index < wrong);
        let t = tree(seed);
        let leaf = t.leaf_hash(index).unwrap();
        let proof = t.inclusion_proof(index, n).unwrap();
        // The verifier checks against the root committed together with the size it was given.
        let wrong_root = t.root_at(wrong).unwrap();
        prop_assert!(verify_inclusion(&leaf, index, wrong, &proof, &wrong_root).is_err());
    }

    #[test]
    fn inclusion_rejects_a_dropped_or_extra_hash(
        (seed, n, index) in size_and_index(),
        extra in any::<[u8; 32]>(),
    ) {
        let t = tree(seed);
        let (leaf, root) = (t.leaf_hash(index).unwrap(), t.root_at(n).unwrap());
        let proof = t.inclusion_proof(index, n).unwrap();
        prop_assert!(verify_inclusion(&leaf, index, n, &proof[..proof.len() - 1], &root).is_err());
        let mut longer = proof.clone();
        longer.push(extra);
        prop_assert!(verify_inclusion(&leaf, index, n, &longer, &root).is_err());
    }

    #[test]
    fn consistency_rejects_any_flipped_bit(
        (seed, n, old) in size_and_index(),
        which in any::<prop::sample::Index>(),
        byte in 0..32usize,
        bit in 0..8u8,
    ) {
        let old = old.max(1);
        let t = tree(seed);
        let (old_root, new_root) = (t.root_at(old).unwrap(), t.root_at(n).unwrap());
        let proof = t.consistency_proof(old, n).unwrap();
        prop_assert!(verify_consistency(old, n, &old_root, &new_root, &proof).is_ok());
        let mut tampered = proof.clone();
        let j = which.index(proof.len());
        tampered[j] = flip(tampered[j], byte, bit);
        prop_assert!(verify_consistency(old, n, &old_root, &new_root, &tampered).is_err());
        let bad_old = flip(old_root, byte, bit);
        prop_assert!(verify_consistency(old, n, &bad_old, &new_root, &proof).is_err());
        let bad_new = flip(new_root, byte, bit);
        prop_assert!(verify_consistency(old, n, &old_root, &bad_new, &proof).is_err());
    }

    #[test]
    fn consistency_rejects_wrong_sizes_and_lengths(
        (seed, n, old) in size_and_index(),
        wrong_old in 1..=MAX_LEAVES,
        wrong_new in 1..=MAX_LEAVES,
        extra in any::<[u8; 32]>(),
    ) {
        let old = old.max(1);
        let t = tree(seed);
        let root = |size: u64| t.root_at(size).unwrap();
        let proof = t.consistency_proof(old, n).unwrap();
        if wrong_old != old && wrong_old < n {
            prop_assert!(verify_consistency(wrong_old, n, &root(wrong_old), &root(n), &proof).is_err());
        }
        if wrong_new != n && wrong_new > old {
            prop_assert!(verify_consistency(old, wrong_new, &root(old), &root(wrong_new), &proof).is_err());
        }
        prop_assert!(verify_consistency(old, n, &root(old), &root(n), &proof[..proof.len() - 1]).is_err());
        let mut longer = proof.clone();
        longer.push(extra);
        prop_assert!(verify_consistency(old, n, &root(old), &root(n), &longer).is_err());
    }
}
