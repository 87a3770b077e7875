//! Certificate-Transparency style Merkle commitments (RFC 6962 §2.1, RFC 9162 §2.1) over the
//! leaves of a training record, and the bisection that finds the first step where an auditor's
//! leaves and a trainer's committed leaves differ.
//!
//! Hashing is SHA-256 with RFC 6962's domain separation: a leaf is `SHA-256(0x00 ‖ entry)`, an
//! interior node `SHA-256(0x01 ‖ left ‖ right)`, so no leaf can pass for a node. The tree over
//! `n` leaves splits at `k`, the largest power of two strictly less than `n`; the empty tree's
//! root is `SHA-256("")`. These are exactly the trees of CT logs and of `pymerkle`, the library
//! the paper's reference code uses, so a root can be cross-checked by an independent program.
//!
//! Why our own tree rather than `rs_merkle`: bisection needs the hash of an *arbitrary* CT node
//! `[lo, hi)` (not only the root), inclusion proofs must be produced against an *earlier* tree
//! size (the one published in a manifest), RFC 6962 consistency proofs between two published
//! roots are not offered by `rs_merkle` at all, and a trainer appends one leaf per step to a
//! tree of 10⁵+ leaves, so each append must cost O(1) amortised hashes and every root, node or
//! proof O(log n), not a rebuild. `rs_merkle` stays as a dev-dependency: a test checks that its
//! roots (with our hasher plugged in) agree with ours.
//!
//! Storage: [`MerkleTree`] keeps, for every height `h`, the hashes of all *complete* perfect
//! subtrees of `2^h` leaves aligned to a multiple of `2^h`. Every node of the CT tree of any
//! size `m ≤ len` is either such a perfect subtree or lies on the right spine of a subtree, so
//! its hash is a lookup plus at most `log₂ m` node hashes. Memory is about `2n` hashes.

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, node hash or root.
pub use crate::codec::Hash;
/// Full lowercase hex of a digest. Mismatches are always reported with this, never a prefix.
pub use crate::codec::to_hex;

/// The root of the empty tree, `SHA-256("")` (RFC 6962 §2.1).
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae, 0x41,
    0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// `SHA-256(0x00 ‖ entry)`: the hash of one leaf entry.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`: the hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The CT split point of a node covering `width ≥ 2` leaves: the largest power of two strictly
/// less than `width`.
fn split_width(width: u64) -> u64 {
    debug_assert!(width >= 2);
    1 << (63 - (width - 1).leading_zeros())
}

/// The two children of the CT node `[lo, hi)` (which must cover at least two leaves):
/// `([lo, mid), [mid, hi))` with `mid - lo` the largest power of two below `hi - lo`.
/// Returns `None` for a single leaf or an empty range.
pub fn children(lo: u64, hi: u64) -> Option<((u64, u64), (u64, u64))> {
    if hi <= lo || hi - lo < 2 {
        return None;
    }
    let mid = lo + split_width(hi - lo);
    Some(((lo, mid), (mid, hi)))
}

/// Whether `[lo, hi)` is a node of the CT tree over `size` leaves.
pub fn is_node(lo: u64, hi: u64, size: u64) -> bool {
    if lo >= hi || hi > size {
        return false;
    }
    let (mut a, mut b) = (0, size);
    loop {
        if (a, b) == (lo, hi) {
            return true;
        }
        let Some(((_, mid), _)) = children(a, b) else {
            return false;
        };
        if hi <= mid {
            b = mid;
        } else if lo >= mid {
            a = mid;
        } else {
            return false;
        }
    }
}

/// Everything that can go wrong building, proving or checking a Merkle commitment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("tree size {size} asked for, but only {len} leaves have been committed")]
    SizeBeyondTree { size: u64, len: u64 },
    #[error("leaf index {index} is out of range for a tree of size {size}")]
    LeafIndexOutOfRange { index: u64, size: u64 },
    #[error("leaf {index} of the tree claims step {step}")]
    LeafStepMismatch { index: u64, step: u64 },
    #[error("[{lo}, {hi}) is not a node of the merkle tree over {size} leaves")]
    NotANode { lo: u64, hi: u64, size: u64 },
    #[error("consistency asked from tree size {old_size} to the smaller size {new_size}")]
    OldSizeAfterNewSize { old_size: u64, new_size: u64 },
    #[error(
        "inclusion proof for leaf {index} of a tree of size {size} has {got} hashes, but such a proof has {expected}"
    )]
    InclusionProofLength { index: u64, size: u64, got: usize, expected: usize },
    #[error(
        "inclusion proof for leaf {index} of a tree of size {size} leads to root {}, but the committed root is {}",
        to_hex(.computed),
        to_hex(.expected)
    )]
    InclusionRootMismatch { index: u64, size: u64, computed: Hash, expected: Hash },
    #[error(
        "consistency proof from tree size {old_size} to {new_size} has {got} hashes, but such a proof has {expected}"
    )]
    ConsistencyProofLength { old_size: u64, new_size: u64, got: usize, expected: usize },
    #[error(
        "consistency proof from tree size {old_size} to {new_size} leads to old root {}, but the committed old root is {}",
        to_hex(.computed),
        to_hex(.expected)
    )]
    ConsistencyOldRootMismatch { old_size: u64, new_size: u64, computed: Hash, expected: Hash },
    #[error(
        "consistency proof from tree size {old_size} to {new_size} leads to new root {}, but the committed new root is {}",
        to_hex(.computed),
        to_hex(.expected)
    )]
    ConsistencyNewRootMismatch { old_size: u64, new_size: u64, computed: Hash, expected: Hash },
    #[error(
        "trainer committed root {} for an empty record, but the empty-tree root is {}",
        to_hex(.trainer_root),
        to_hex(&EMPTY_ROOT)
    )]
    EmptyTreeRootMismatch { trainer_root: Hash },
    #[error(
        "trainer's children of node [{lo}, {hi}) hash to {}, but the trainer's own hash for that node is {}: the trainer gave an inconsistent answer",
        to_hex(.computed),
        to_hex(.expected)
    )]
    InconsistentAnswer { lo: u64, hi: u64, computed: Hash, expected: Hash },
    #[error("bisection answer given, but the bisection has already finished")]
    BisectionFinished,
}

/// An append-only CT Merkle tree that keeps every complete perfect subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    /// `levels[h][i]` is the hash of leaves `[i·2^h, (i+1)·2^h)`; `levels[0]` are the leaf
    /// hashes. Invariants: `levels[0]` always exists (also for the empty tree), and
    /// `levels[h+1].len() == levels[h].len() / 2` for every stored level; no level past the
    /// highest complete subtree is stored.
    levels: Vec<Vec<Hash>>,
}

impl Default for MerkleTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self { levels: vec![Vec::new()] }
    }

    /// A tree over already-hashed leaves.
    pub fn from_leaf_hashes<I: IntoIterator<Item = Hash>>(leaf_hashes: I) -> Self {
        let mut tree = Self::new();
        for h in leaf_hashes {
            tree.push_leaf_hash(h);
        }
        tree
    }

    /// Appends the leaf `entry` (hashed here as `SHA-256(0x00 ‖ entry)`); returns its index.
    pub fn push_entry(&mut self, entry: &[u8]) -> u64 {
        self.push_leaf_hash(leaf_hash(entry))
    }

    /// Appends an already-computed leaf hash; returns its index. Costs one node hash amortised
    /// (at most `log₂ n`): each completed pair of perfect subtrees is merged once.
    pub fn push_leaf_hash(&mut self, hash: Hash) -> u64 {
        let index = self.levels[0].len() as u64;
        self.levels[0].push(hash);
        let mut h = 0;
        while self.levels[h].len().is_multiple_of(2) {
            let n = self.levels[h].len();
            let parent = node_hash(&self.levels[h][n - 2], &self.levels[h][n - 1]);
            if self.levels.len() == h + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[h + 1].push(parent);
            h += 1;
        }
        index
    }

    /// The number of leaves.
    pub fn len(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The root over all leaves ([`EMPTY_ROOT`] when empty).
    pub fn root(&self) -> Hash {
        self.range_hash_or_empty(self.len())
    }

    /// The root the tree had when it held its first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, MerkleError> {
        self.check_size(size)?;
        Ok(self.range_hash_or_empty(size))
    }

    /// The hash of leaf `index`.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash, MerkleError> {
        if index >= self.len() {
            return Err(MerkleError::LeafIndexOutOfRange { index, size: self.len() });
        }
        Ok(self.levels[0][index as usize])
    }

    /// The hash of the node `[lo, hi)` of the CT tree over all current leaves.
    pub fn node(&self, lo: u64, hi: u64) -> Result<Hash, MerkleError> {
        self.node_at(lo, hi, self.len())
    }

    /// The hash of the node `[lo, hi)` of the CT tree over the first `size` leaves. Errors when
    /// `[lo, hi)` is not a node of that tree: only nodes are ever committed to.
    pub fn node_at(&self, lo: u64, hi: u64, size: u64) -> Result<Hash, MerkleError> {
        self.check_size(size)?;
        if !is_node(lo, hi, size) {
            return Err(MerkleError::NotANode { lo, hi, size });
        }
        Ok(self.range_hash(lo, hi))
    }

    /// The trainer's answer to a bisection query: the hashes of the two children of the CT node
    /// `[lo, hi)` of the tree over the first `size` leaves.
    pub fn child_hashes(&self, lo: u64, hi: u64, size: u64) -> Result<(Hash, Hash), MerkleError> {
        self.check_size(size)?;
        let Some(((_, mid), _)) = children(lo, hi).filter(|_| is_node(lo, hi, size)) else {
            // A single leaf has no children either, so it is not a node one can ask about.
            return Err(MerkleError::NotANode { lo, hi, size });
        };
        Ok((self.range_hash(lo, mid), self.range_hash(mid, hi)))
    }

    /// The audit path of leaf `index` in the tree over the first `size` leaves (RFC 6962
    /// §2.1.1 `PATH`), ordered from the leaf's sibling up to the root's child.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(size)?;
        if index >= size {
            return Err(MerkleError::LeafIndexOutOfRange { index, size });
        }
        let mut proof = Vec::new();
        let (mut lo, mut hi) = (0, size);
        while let Some(((_, mid), _)) = children(lo, hi) {
            if index < mid {
                proof.push(self.range_hash(mid, hi));
                hi = mid;
            } else {
                proof.push(self.range_hash(lo, mid));
                lo = mid;
            }
        }
        // The recursion in the RFC appends the sibling *after* the deeper path.
        proof.reverse();
        Ok(proof)
    }

    /// The consistency proof between the trees over the first `old_size` and `new_size` leaves
    /// (RFC 6962 §2.1.2 `PROOF`). Empty when `old_size` is 0 or equals `new_size`.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, MerkleError> {
        self.check_size(new_size)?;
        if old_size > new_size {
            return Err(MerkleError::OldSizeAfterNewSize { old_size, new_size });
        }
        let mut proof = Vec::new();
        if old_size == 0 || old_size == new_size {
            return Ok(proof);
        }
        // Iterative SUBPROOF(m, D[lo:hi], b): `m` counts old leaves inside [lo, hi).
        let (mut lo, mut hi, mut m, mut whole_old_tree) = (0, new_size, old_size, true);
        loop {
            if m == hi - lo {
                if !whole_old_tree {
                    proof.push(self.range_hash(lo, hi));
                }
                break;
            }
            let mid = lo + split_width(hi - lo);
            if lo + m <= mid {
                proof.push(self.range_hash(mid, hi));
                hi = mid;
            } else {
                proof.push(self.range_hash(lo, mid));
                m -= mid - lo;
                lo = mid;
                whole_old_tree = false;
            }
        }
        proof.reverse();
        Ok(proof)
    }

    fn check_size(&self, size: u64) -> Result<(), MerkleError> {
        if size > self.len() {
            return Err(MerkleError::SizeBeyondTree { size, len: self.len() });
        }
        Ok(())
    }

    fn range_hash_or_empty(&self, size: u64) -> Hash {
        if size == 0 { EMPTY_ROOT } else { self.range_hash(0, size) }
    }

    /// `MTH(D[lo:hi])` for `lo < hi ≤ len`. O(log n) when `[lo, hi)` is a node of some CT tree
    /// (then every perfect piece is aligned and found in `levels`); callers only ask for those.
    fn range_hash(&self, lo: u64, hi: u64) -> Hash {
        debug_assert!(lo < hi && hi <= self.len());
        let width = hi - lo;
        if width.is_power_of_two() && lo.is_multiple_of(width) {
            let h = width.trailing_zeros() as usize;
            return self.levels[h][(lo / width) as usize];
        }
        let mid = lo + split_width(width);
        node_hash(&self.range_hash(lo, mid), &self.range_hash(mid, hi))
    }
}

/// The number of hashes in an inclusion proof for leaf `index` of a tree of `size` leaves.
pub fn inclusion_proof_len(index: u64, size: u64) -> usize {
    let (mut lo, mut hi, mut len) = (0, size, 0);
    while let Some(((_, mid), _)) = children(lo, hi) {
        if index < mid {
            hi = mid;
        } else {
            lo = mid;
        }
        len += 1;
    }
    len
}

/// The number of hashes in a consistency proof from `old_size` to `new_size` leaves.
pub fn consistency_proof_len(old_size: u64, new_size: u64) -> usize {
    if old_size == 0 || old_size >= new_size {
        return 0;
    }
    let (mut lo, mut hi, mut m, mut whole_old_tree, mut len) = (0, new_size, old_size, true, 0);
    loop {
        if m == hi - lo {
            return len + usize::from(!whole_old_tree);
        }
        let mid = lo + split_width(hi - lo);
        if lo + m <= mid {
            hi = mid;
        } else {
            m -= mid - lo;
            lo = mid;
            whole_old_tree = false;
        }
        len += 1;
    }
}

/// Checks that `leaf_hash` is leaf `index` of the tree of `size` leaves with root `root`
/// (RFC 9162 §2.1.3.2).
///
/// As in RFC 6962, the root does not commit to the tree size by itself: two sizes whose audit
/// paths for `index` have the same shape (e.g. leaf 0 of sizes 3 and 4) accept the same proof.
/// The size must therefore come from the same signed manifest as the root.
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    if index >= size {
        return Err(MerkleError::LeafIndexOutOfRange { index, size });
    }
    let wrong_length = || MerkleError::InclusionProofLength {
        index,
        size,
        got: proof.len(),
        expected: inclusion_proof_len(index, size),
    };
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if sn == 0 {
            return Err(wrong_length());
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            // Skip the levels where this node is the lone rightmost node and is promoted.
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(wrong_length());
    }
    if r != *root {
        return Err(MerkleError::InclusionRootMismatch { index, size, computed: r, expected: *root });
    }
    Ok(())
}

/// A training leaf with its audit path in the tree of committed leaves: what a report and an
/// evidence bundle carry for the leaves they are about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenLeaf {
    pub leaf: crate::leaf::Leaf,
    pub proof: Vec<Hash>,
}

impl ProvenLeaf {
    /// Checks that this is leaf `index` of the tree of `size` leaves with root `root`.
    pub fn verify(&self, index: u64, size: u64, root: &Hash) -> Result<(), MerkleError> {
        if self.leaf.step != index {
            return Err(MerkleError::LeafStepMismatch { index, step: self.leaf.step });
        }
        verify_inclusion(&leaf_hash(&self.leaf.encode()), index, size, &self.proof, root)
    }
}

/// Checks that the tree of `new_size` leaves with root `new_root` extends the tree of
/// `old_size` leaves with root `old_root` (RFC 9162 §2.1.4.2).
///
/// Two trivial cases the RFC leaves aside, handled as the transparency-dev libraries do: equal
/// sizes need an empty proof and equal roots; an old size of 0 needs an empty proof and the
/// empty-tree root as old root (the empty tree is a prefix of every tree).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old_size > new_size {
        return Err(MerkleError::OldSizeAfterNewSize { old_size, new_size });
    }
    let wrong_length = || MerkleError::ConsistencyProofLength {
        old_size,
        new_size,
        got: proof.len(),
        expected: consistency_proof_len(old_size, new_size),
    };
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(wrong_length());
        }
        if old_size == 0 && *old_root != EMPTY_ROOT {
            return Err(MerkleError::ConsistencyOldRootMismatch {
                old_size,
                new_size,
                computed: EMPTY_ROOT,
                expected: *old_root,
            });
        }
        if old_size == new_size && old_root != new_root {
            return Err(MerkleError::ConsistencyNewRootMismatch {
                old_size,
                new_size,
                computed: *old_root,
                expected: *new_root,
            });
        }
        return Ok(());
    }
    // 1. An empty path cannot prove anything between two different non-empty sizes.
    if proof.is_empty() {
        return Err(wrong_length());
    }
    // 2. When the old tree is a perfect subtree, its root is the path's implicit first node.
    let old_is_perfect = old_size.is_power_of_two();
    let mut path = std::iter::once(old_root).filter(|_| old_is_perfect).chain(proof.iter());
    // 3.–4.
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5.
    let first = *path.next().unwrap_or(old_root);
    let (mut fr, mut sr) = (first, first);
    // 6.
    for c in path {
        if sn == 0 {
            return Err(wrong_length());
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    // 7.
    if sn != 0 {
        return Err(wrong_length());
    }
    if fr != *old_root {
        return Err(MerkleError::ConsistencyOldRootMismatch { old_size, new_size, computed: fr, expected: *old_root });
    }
    if sr != *new_root {
        return Err(MerkleError::ConsistencyNewRootMismatch { old_size, new_size, computed: sr, expected: *new_root });
    }
    Ok(())
}

/// How a bisection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BisectionOutcome {
    /// The trainer's root equals the auditor's: every leaf agrees.
    Agreed,
    /// Leaf `first_differing_leaf` is the first leaf whose hashes differ; all earlier leaves
    /// agree. Both full leaf hashes are kept for the report.
    Diverged { first_differing_leaf: u64, own_leaf_hash: Hash, trainer_leaf_hash: Hash },
}

#[derive(Debug, Clone, Copy)]
enum BisectionState {
    /// Waiting for the trainer's hashes of the children of `[lo, hi)`. Invariant: the
    /// trainer's hash `trainer` of `[lo, hi)` differs from the auditor's.
    Asking {
        lo: u64,
        hi: u64,
        trainer: Hash,
    },
    Done(BisectionOutcome),
}

/// A sans-IO bisection between the auditor's tree and a trainer's committed root.
///
/// The auditor holds its own tree; the trainer has committed a root over the same `size` leaves.
/// Starting from the root, while the current node's hashes differ, the auditor asks the trainer
/// for the hashes of that node's two children ([`next_query`](Self::next_query)), checks that
/// they hash to the trainer's hash of the node (so every answer is bound to the committed root),
/// and descends into the *leftmost* child whose hash differs from its own. The leaf it reaches
/// is the first diverging step. Each query descends one level, so there are at most
/// ⌈log₂ size⌉ queries.
///
/// No I/O happens here, so the same machine runs locally (answers from a [`MerkleTree`] via
/// [`MerkleTree::child_hashes`]) and from an async HTTP client awaiting each answer.
///
/// ```
/// use common::merkle::{Bisection, BisectionOutcome, MerkleTree};
/// let own = MerkleTree::from_leaf_hashes((0..10u8).map(|i| [i; 32]));
/// let theirs = MerkleTree::from_leaf_hashes((0..10u8).map(|i| [if i < 7 { i } else { 99 }; 32]));
/// let mut b = Bisection::new(&own, 10, theirs.root()).unwrap();
/// while let Some((lo, hi)) = b.next_query() {
///     let (l, r) = theirs.child_hashes(lo, hi, 10).unwrap();
///     b.answer(l, r).unwrap();
/// }
/// assert!(matches!(b.outcome(), Some(BisectionOutcome::Diverged { first_differing_leaf: 7, .. })));
/// ```
#[derive(Debug, Clone)]
pub struct Bisection<'a> {
    own: &'a MerkleTree,
    size: u64,
    queries: u32,
    state: BisectionState,
}

impl<'a> Bisection<'a> {
    /// The most queries a bisection over `size` leaves may take, ⌈log₂ size⌉ + 1 (the house
    /// limit; the descent itself needs at most ⌈log₂ size⌉).
    pub fn query_limit(size: u64) -> u32 {
        let ceil_log2 = if size <= 1 { 0 } else { 64 - (size - 1).leading_zeros() };
        ceil_log2 + 1
    }

    /// Starts a bisection of the auditor's tree `own`, restricted to its first `size` leaves,
    /// against the trainer's committed root over `size` leaves.
    pub fn new(own: &'a MerkleTree, size: u64, trainer_root: Hash) -> Result<Self, MerkleError> {
        let own_root = own.root_at(size)?;
        let state = if own_root == trainer_root {
            BisectionState::Done(BisectionOutcome::Agreed)
        } else if size == 0 {
            return Err(MerkleError::EmptyTreeRootMismatch { trainer_root });
        } else {
            Self::enter(own, 0, size, trainer_root)
        };
        Ok(Self { own, size, queries: 0, state })
    }

    /// The node `(lo, hi)` whose two children's hashes the trainer must send next, or `None`
    /// when the bisection has finished.
    pub fn next_query(&self) -> Option<(u64, u64)> {
        match self.state {
            BisectionState::Asking { lo, hi, .. } => Some((lo, hi)),
            BisectionState::Done(_) => None,
        }
    }

    /// Takes the trainer's hashes of the two children of the node from
    /// [`next_query`](Self::next_query). Errors, leaving the state unchanged, when they do not
    /// hash to the trainer's earlier hash of that node.
    pub fn answer(&mut self, left: Hash, right: Hash) -> Result<(), MerkleError> {
        let BisectionState::Asking { lo, hi, trainer } = self.state else {
            return Err(MerkleError::BisectionFinished);
        };
        let computed = node_hash(&left, &right);
        if computed != trainer {
            return Err(MerkleError::InconsistentAnswer { lo, hi, computed, expected: trainer });
        }
        self.queries += 1;
        let ((_, mid), _) = children(lo, hi).expect("a node being asked about has two children");
        self.state = if left != self.own.range_hash(lo, mid) {
            Self::enter(self.own, lo, mid, left)
        } else {
            // The right child must differ: equal children would give equal parents, and the
            // parents differ by the invariant.
            Self::enter(self.own, mid, hi, right)
        };
        debug_assert!(self.queries <= Self::query_limit(self.size));
        Ok(())
    }

    /// How the bisection ended, or `None` while queries remain.
    pub fn outcome(&self) -> Option<BisectionOutcome> {
        match self.state {
            BisectionState::Done(o) => Some(o),
            BisectionState::Asking { .. } => None,
        }
    }

    /// The number of answered queries so far.
    pub fn queries(&self) -> u32 {
        self.queries
    }

    /// The number of leaves being compared.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The state for a node `[lo, hi)` known to differ, with the trainer's hash `trainer`.
    fn enter(own: &MerkleTree, lo: u64, hi: u64, trainer: Hash) -> BisectionState {
        if hi - lo == 1 {
            BisectionState::Done(BisectionOutcome::Diverged {
                first_differing_leaf: lo,
                own_leaf_hash: own.levels[0][lo as usize],
                trainer_leaf_hash: trainer,
            })
        } else {
            BisectionState::Asking { lo, hi, trainer }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        let h: Hash = Sha256::digest([]).into();
        assert_eq!(h, EMPTY_ROOT);
        assert_eq!(MerkleTree::new().root(), EMPTY_ROOT);
    }

    #[test]
    fn split_width_is_largest_power_of_two_below() {
        for w in 2u64..2000 {
            let k = split_width(w);
            assert!(k.is_power_of_two() && k < w && 2 * k >= w, "w={w} k={k}");
        }
        assert_eq!(split_width(u64::MAX), 1 << 63);
    }

    #[test]
    fn is_node_matches_enumeration_of_the_tree() {
        fn collect(lo: u64, hi: u64, out: &mut Vec<(u64, u64)>) {
            out.push((lo, hi));
            if let Some((l, r)) = children(lo, hi) {
                collect(l.0, l.1, out);
                collect(r.0, r.1, out);
            }
        }
        for size in 1..=40 {
            let mut nodes = Vec::new();
            collect(0, size, &mut nodes);
            for lo in 0..=size {
                for hi in lo..=size + 1 {
                    assert_eq!(is_node(lo, hi, size), nodes.contains(&(lo, hi)), "{lo} {hi} {size}");
                }
            }
        }
    }

    #[test]
    fn levels_hold_only_complete_subtrees() {
        let mut t = MerkleTree::new();
        for i in 0..37u8 {
            t.push_entry(&[i]);
            let n = t.len() as usize;
            for (h, level) in t.levels.iter().enumerate() {
                assert_eq!(level.len(), n >> h);
            }
        }
    }

    #[test]
    fn query_limit_is_ceil_log2_plus_one() {
        assert_eq!(Bisection::query_limit(1), 1);
        assert_eq!(Bisection::query_limit(2), 2);
        assert_eq!(Bisection::query_limit(3), 3);
        assert_eq!(Bisection::query_limit(4), 3);
        assert_eq!(Bisection::query_limit(5), 4);
        assert_eq!(Bisection::query_limit(100_000), 18);
    }
}
