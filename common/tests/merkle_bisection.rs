//! The sans-IO bisection: it finds the first differing leaf for every tree size up to 200 and
//! every divergence position, and at 100,000 leaves, within ⌈log₂ n⌉ + 1 queries, and it
//! refuses a trainer whose answers do not hash to what it committed.

use common::merkle::{Bisection, BisectionOutcome, EMPTY_ROOT, Hash, MerkleError, MerkleTree, leaf_hash, node_hash};

fn honest_leaf(i: u64) -> Hash {
    leaf_hash(format!("state after step {i}").as_bytes())
}

fn diverged_leaf(i: u64) -> Hash {
    leaf_hash(format!("other state after step {i}").as_bytes())
}

/// Runs a bisection to the end against `trainer`, answering honestly from its tree.
fn bisect(own: &MerkleTree, trainer: &MerkleTree, n: u64) -> (BisectionOutcome, u32) {
    let mut b = Bisection::new(own, n, trainer.root_at(n).unwrap()).unwrap();
    while let Some((lo, hi)) = b.next_query() {
        let (l, r) = trainer.child_hashes(lo, hi, n).unwrap();
        b.answer(l, r).unwrap();
        assert!(b.queries() <= Bisection::query_limit(n), "n = {n}: too many queries");
    }
    (b.outcome().expect("finished"), b.queries())
}

fn ceil_log2(n: u64) -> u32 {
    (0..64).find(|&k| (1u64 << k) >= n).unwrap()
}

fn expect_divergence(outcome: BisectionOutcome, at: u64, own: &MerkleTree, trainer: &MerkleTree) {
    assert_eq!(
        outcome,
        BisectionOutcome::Diverged {
            first_differing_leaf: at,
            own_leaf_hash: own.leaf_hash(at).unwrap(),
            trainer_leaf_hash: trainer.leaf_hash(at).unwrap(),
        }
    );
}

#[test]
fn finds_every_divergence_for_every_size_up_to_200() {
    let own = MerkleTree::from_leaf_hashes((0..200).map(honest_leaf));
    let mut bisections = 0;
    for n in 1..=200u64 {
        let limit = ceil_log2(n) + 1;
        assert_eq!(Bisection::query_limit(n), limit);
        for at in 0..n {
            // A trainer that diverges at `at` and stays diverged (as a real run would), and
            // one whose only differing leaf is `at`.
            let stays =
                MerkleTree::from_leaf_hashes((0..n).map(|i| if i < at { honest_leaf(i) } else { diverged_leaf(i) }));
            let single =
                MerkleTree::from_leaf_hashes((0..n).map(|i| if i == at { diverged_leaf(i) } else { honest_leaf(i) }));
            for trainer in [&stays, &single] {
                let (outcome, queries) = bisect(&own, trainer, n);
                expect_divergence(outcome, at, &own, trainer);
                assert!(queries <= ceil_log2(n), "n = {n}, at = {at}: {queries} queries");
                bisections += 1;
            }
        }
    }
    assert_eq!(bisections, 200 * 201);
}

#[test]
fn finds_divergences_among_100_000_leaves_within_18_queries() {
    let n = 100_000u64;
    let own = MerkleTree::from_leaf_hashes((0..n).map(honest_leaf));
    assert_eq!(Bisection::query_limit(n), 18);
    for at in [0, 1, 2, 31_337, 50_000, 65_535, 65_536, 65_537, 98_303, 99_998, 99_999] {
        let mut trainer = MerkleTree::new();
        for i in 0..n {
            trainer.push_leaf_hash(if i < at { honest_leaf(i) } else { diverged_leaf(i) });
        }
        let (outcome, queries) = bisect(&own, &trainer, n);
        expect_divergence(outcome, at, &own, &trainer);
        assert!(queries <= 17, "at = {at}: {queries} queries");
    }
}

#[test]
fn only_the_last_leaf_differs() {
    for n in [1u64, 2, 3, 5, 8, 9, 100, 1025] {
        let own = MerkleTree::from_leaf_hashes((0..n).map(honest_leaf));
        let trainer =
            MerkleTree::from_leaf_hashes((0..n).map(|i| if i + 1 == n { diverged_leaf(i) } else { honest_leaf(i) }));
        let (outcome, queries) = bisect(&own, &trainer, n);
        expect_divergence(outcome, n - 1, &own, &trainer);
        // The last leaf sits on the right spine, which is at most ⌈log₂ n⌉ deep.
        assert!(queries <= ceil_log2(n));
    }
}

#[test]
fn equal_roots_need_no_queries() {
    let own = MerkleTree::from_leaf_hashes((0..37).map(honest_leaf));
    let b = Bisection::new(&own, 37, own.root()).unwrap();
    assert_eq!(b.next_query(), None);
    assert_eq!(b.outcome(), Some(BisectionOutcome::Agreed));
    assert_eq!(b.queries(), 0);
}

#[test]
fn a_single_leaf_tree_diverges_without_queries() {
    let own = MerkleTree::from_leaf_hashes([honest_leaf(0)]);
    let b = Bisection::new(&own, 1, diverged_leaf(0)).unwrap();
    assert_eq!(b.next_query(), None);
    assert_eq!(b.queries(), 0);
    assert_eq!(
        b.outcome(),
        Some(BisectionOutcome::Diverged {
            first_differing_leaf: 0,
            own_leaf_hash: honest_leaf(0),
            trainer_leaf_hash: diverged_leaf(0),
        })
    );
}

#[test]
fn bisects_a_prefix_of_a_longer_own_tree() {
    // The auditor may have replayed past the trainer's committed size; only the first n count.
    let own = MerkleTree::from_leaf_hashes((0..50).map(honest_leaf));
    let n = 21;
    let trainer = MerkleTree::from_leaf_hashes((0..n).map(|i| if i < 13 { honest_leaf(i) } else { diverged_leaf(i) }));
    let (outcome, _) = bisect(&own, &trainer, n);
    expect_divergence(outcome, 13, &own, &trainer);
    let agreeing = MerkleTree::from_leaf_hashes((0..n).map(honest_leaf));
    assert_eq!(bisect(&own, &agreeing, n).0, BisectionOutcome::Agreed);
}

#[test]
fn an_inconsistent_answer_is_refused_with_both_full_digests() {
    let n = 40;
    let own = MerkleTree::from_leaf_hashes((0..n).map(honest_leaf));
    let trainer = MerkleTree::from_leaf_hashes((0..n).map(|i| if i < 30 { honest_leaf(i) } else { diverged_leaf(i) }));
    let mut b = Bisection::new(&own, n, trainer.root()).unwrap();
    let (lo, hi) = b.next_query().unwrap();
    assert_eq!((lo, hi), (0, 40));
    let (l, r) = trainer.child_hashes(lo, hi, n).unwrap();
    // A trainer that tries to blame the left half by sending the auditor's own right child.
    let (_, own_r) = own.child_hashes(lo, hi, n).unwrap();
    let err = b.answer(l, own_r).unwrap_err();
    let computed = node_hash(&l, &own_r);
    assert_eq!(err, MerkleError::InconsistentAnswer { lo: 0, hi: 40, computed, expected: trainer.root() });
    let msg = err.to_string();
    let hex = |h: &Hash| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert!(msg.contains(&hex(&computed)) && msg.contains(&hex(&trainer.root())), "{msg}");
    assert!(msg.contains("inconsistent answer"), "{msg}");
    // The refused answer changed nothing: the same query is still pending, and an honest
    // answer then finishes the bisection.
    assert_eq!(b.next_query(), Some((0, 40)));
    assert_eq!(b.queries(), 0);
    b.answer(l, r).unwrap();
    while let Some((lo, hi)) = b.next_query() {
        let (l, r) = trainer.child_hashes(lo, hi, n).unwrap();
        b.answer(l, r).unwrap();
    }
    expect_divergence(b.outcome().unwrap(), 30, &own, &trainer);
    assert_eq!(b.answer(l, r), Err(MerkleError::BisectionFinished));
}

#[test]
fn swapped_children_are_refused() {
    let n = 16;
    let own = MerkleTree::from_leaf_hashes((0..n).map(honest_leaf));
    let trainer = MerkleTree::from_leaf_hashes((0..n).map(diverged_leaf));
    let mut b = Bisection::new(&own, n, trainer.root()).unwrap();
    let (l, r) = trainer.child_hashes(0, n, n).unwrap();
    assert!(matches!(b.answer(r, l), Err(MerkleError::InconsistentAnswer { .. })));
}

#[test]
fn sizes_outside_the_own_tree_and_empty_records() {
    let own = MerkleTree::from_leaf_hashes((0..5).map(honest_leaf));
    assert_eq!(Bisection::new(&own, 6, EMPTY_ROOT).unwrap_err(), MerkleError::SizeBeyondTree { size: 6, len: 5 });
    let b = Bisection::new(&own, 0, EMPTY_ROOT).unwrap();
    assert_eq!(b.outcome(), Some(BisectionOutcome::Agreed));
    let bogus = honest_leaf(0);
    let err = Bisection::new(&own, 0, bogus).unwrap_err();
    assert_eq!(err, MerkleError::EmptyTreeRootMismatch { trainer_root: bogus });
}
