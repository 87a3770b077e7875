//! `common::merkle` against independent implementations: a direct, recursive transcription of
//! RFC 6962 §2.1 (MTH, PATH, PROOF) written here without the module, `rs_merkle` with CT hashing
//! plugged in, and the published CT test vectors.

use common::merkle::{
    EMPTY_ROOT, Hash, MerkleError, MerkleTree, children, consistency_proof_len, inclusion_proof_len,
    verify_consistency, verify_inclusion,
};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// The reference: RFC 6962 §2.1 word for word, on leaf hashes, with its own SHA-256 calls.
// ---------------------------------------------------------------------------------------------

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn ref_leaf(entry: &[u8]) -> Hash {
    sha256(&[&[0x00], entry])
}

fn ref_node(l: &Hash, r: &Hash) -> Hash {
    sha256(&[&[0x01], l, r])
}

/// The largest power of two strictly less than `n` (n ≥ 2), found by doubling.
fn ref_k(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH(D[n]).
fn ref_mth(d: &[Hash]) -> Hash {
    match d.len() {
        0 => sha256(&[]),
        1 => d[0],
        n => {
            let k = ref_k(n);
            ref_node(&ref_mth(&d[..k]), &ref_mth(&d[k..]))
        }
    }
}

/// PATH(m, D[n]).
fn ref_path(m: usize, d: &[Hash]) -> Vec<Hash> {
    let n = d.len();
    if n == 1 {
        return Vec::new();
    }
    let k = ref_k(n);
    if m < k {
        let mut p = ref_path(m, &d[..k]);
        p.push(ref_mth(&d[k..]));
        p
    } else {
        let mut p = ref_path(m - k, &d[k..]);
        p.push(ref_mth(&d[..k]));
        p
    }
}

/// For each element of PATH(m, D[n]): whether the sibling lies to the left.
fn ref_path_shape(m: usize, n: usize) -> Vec<bool> {
    if n == 1 {
        return Vec::new();
    }
    let k = ref_k(n);
    if m < k {
        let mut s = ref_path_shape(m, k);
        s.push(false);
        s
    } else {
        let mut s = ref_path_shape(m - k, n - k);
        s.push(true);
        s
    }
}

/// PROOF(m, D[n]) = SUBPROOF(m, D[n], true).
fn ref_proof(m: usize, d: &[Hash]) -> Vec<Hash> {
    fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { Vec::new() } else { vec![ref_mth(d)] };
        }
        let k = ref_k(n);
        if m <= k {
            let mut p = subproof(m, &d[..k], b);
            p.push(ref_mth(&d[k..]));
            p
        } else {
            let mut p = subproof(m - k, &d[k..], false);
            p.push(ref_mth(&d[..k]));
            p
        }
    }
    subproof(m, d, true)
}

fn leaves(n: usize) -> Vec<Hash> {
    (0..n as u32).map(|i| ref_leaf(format!("step {i}").as_bytes())).collect()
}

fn hex32(s: &str) -> Hash {
    assert_eq!(s.len(), 64);
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    h
}

// ---------------------------------------------------------------------------------------------
// Known answers.
// ---------------------------------------------------------------------------------------------

/// The CT reference test data (transparency-dev/merkle `testonly`, from the C++ CT log): the
/// entries, the roots of every prefix, and a few proofs.
const CT_ENTRIES: [&[u8]; 8] = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
];
const CT_ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

#[test]
fn empty_tree_root_is_rfc6962_known_answer() {
    let expected = hex32("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(EMPTY_ROOT, expected);
    let t = MerkleTree::new();
    assert_eq!(t.root(), expected);
    assert_eq!(t.root_at(0), Ok(expected));
    assert_eq!(ref_mth(&[]), expected);
}

#[test]
fn ct_reference_roots_and_proofs() {
    let mut t = MerkleTree::new();
    for e in CT_ENTRIES {
        t.push_entry(e);
    }
    for (size, root) in CT_ROOTS.iter().enumerate() {
        assert_eq!(t.root_at(size as u64), Ok(hex32(root)), "size {size}");
    }
    let inclusion: [(u64, [&str; 3]); 2] = [
        (
            0,
            [
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            [
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    let root8 = hex32(CT_ROOTS[8]);
    for (index, proof) in inclusion {
        let proof: Vec<Hash> = proof.iter().map(|h| hex32(h)).collect();
        assert_eq!(t.inclusion_proof(index, 8).unwrap(), proof, "leaf {index}");
        let leaf = t.leaf_hash(index).unwrap();
        assert_eq!(verify_inclusion(&leaf, index, 8, &proof, &root8), Ok(()));
    }
    let consistency: [(u64, &[&str]); 2] = [
        (
            2,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    for (old, proof) in consistency {
        let proof: Vec<Hash> = proof.iter().map(|h| hex32(h)).collect();
        assert_eq!(t.consistency_proof(old, 8).unwrap(), proof, "from {old}");
        let old_root = hex32(CT_ROOTS[old as usize]);
        assert_eq!(verify_consistency(old, 8, &old_root, &root8, &proof), Ok(()));
    }
}

// ---------------------------------------------------------------------------------------------
// Exhaustive agreement with the reference for n = 1..=64.
// ---------------------------------------------------------------------------------------------

#[test]
fn roots_and_nodes_match_reference_for_every_size_up_to_64() {
    let d = leaves(64);
    let mut t = MerkleTree::new();
    for (n, h) in d.iter().enumerate() {
        assert_eq!(t.push_leaf_hash(*h), n as u64);
        assert_eq!(t.root(), ref_mth(&d[..=n]), "root of {} leaves", n + 1);
    }
    for size in 0..=64u64 {
        assert_eq!(t.root_at(size).unwrap(), ref_mth(&d[..size as usize]));
        // Every node of the tree of this size, by walking the reference shape.
        let mut stack = vec![(0u64, size)];
        let mut nodes = 0;
        while let Some((lo, hi)) = stack.pop().filter(|_| size > 0) {
            let expected = ref_mth(&d[lo as usize..hi as usize]);
            assert_eq!(t.node_at(lo, hi, size), Ok(expected), "[{lo}, {hi}) of {size}");
            if size == 64 {
                assert_eq!(t.node(lo, hi), Ok(expected));
            }
            nodes += 1;
            if let Some((l, r)) = children(lo, hi) {
                assert_eq!(
                    t.child_hashes(lo, hi, size),
                    Ok((ref_mth(&d[l.0 as usize..l.1 as usize]), ref_mth(&d[r.0 as usize..r.1 as usize])))
                );
                stack.push(l);
                stack.push(r);
            }
        }
        // A tree over n leaves has 2n − 1 nodes.
        assert_eq!(nodes, (2 * size).saturating_sub(1));
    }
}

#[test]
fn non_nodes_are_refused() {
    let t = MerkleTree::from_leaf_hashes(leaves(7));
    // 7 leaves: [0,4) [4,7) [4,6) [6,7) ... are nodes; [2,6), [4,8), [0,3) and [5,7) are not.
    for (lo, hi) in [(2, 6), (0, 3), (5, 7), (3, 3), (4, 3), (0, 8), (7, 8)] {
        assert_eq!(t.node(lo, hi), Err(MerkleError::NotANode { lo, hi, size: 7 }), "[{lo}, {hi})");
    }
    assert!(t.node(4, 7).is_ok() && t.node(6, 7).is_ok() && t.node(0, 4).is_ok());
    // [0, 4) is a node of the size-7 tree but [4, 6) is not a node of the size-5 tree.
    assert!(t.node_at(4, 6, 5).is_err());
    assert_eq!(t.node_at(0, 4, 8), Err(MerkleError::SizeBeyondTree { size: 8, len: 7 }));
    // A leaf has no children to ask for.
    assert!(t.child_hashes(6, 7, 7).is_err());
}

#[test]
fn inclusion_proofs_match_reference_and_verify_for_every_index_and_size() {
    let d = leaves(64);
    let t = MerkleTree::from_leaf_hashes(d.clone());
    let mut checked = 0;
    for size in 1..=64usize {
        let root = ref_mth(&d[..size]);
        for index in 0..size {
            let proof = t.inclusion_proof(index as u64, size as u64).unwrap();
            assert_eq!(proof, ref_path(index, &d[..size]), "leaf {index} of {size}");
            assert_eq!(proof.len(), inclusion_proof_len(index as u64, size as u64));
            assert_eq!(verify_inclusion(&d[index], index as u64, size as u64, &proof, &root), Ok(()));
            // Any other index fails, with its own leaf or with this one.
            for other in (0..size).filter(|&o| o != index) {
                assert!(verify_inclusion(&d[index], other as u64, size as u64, &proof, &root).is_err());
                assert!(verify_inclusion(&d[other], other as u64, size as u64, &proof, &root).is_err());
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 64 * 65 / 2);
}

#[test]
fn inclusion_with_a_wrong_size_fails_exactly_when_the_path_shape_differs() {
    // RFC 6962 roots do not commit to the tree size: a proof is accepted under another size
    // whose audit path has the same shape. Against the root *of that other size*, which is what
    // a verifier holds for it (sizes are signed with roots), every wrong size fails.
    let d = leaves(70);
    let t = MerkleTree::from_leaf_hashes(d.clone());
    let (mut same_shape, mut refused) = (0, 0);
    for size in 1..=64usize {
        let root = ref_mth(&d[..size]);
        for index in 0..size {
            let proof = t.inclusion_proof(index as u64, size as u64).unwrap();
            for wrong in (index + 1..=70).filter(|&w| w != size) {
                let accepted = verify_inclusion(&d[index], index as u64, wrong as u64, &proof, &root).is_ok();
                let same = ref_path_shape(index, wrong) == ref_path_shape(index, size);
                assert_eq!(accepted, same, "leaf {index}: proof for {size} checked as {wrong}");
                if same {
                    same_shape += 1;
                } else {
                    refused += 1;
                }
                let wrong_root = ref_mth(&d[..wrong]);
                assert!(verify_inclusion(&d[index], index as u64, wrong as u64, &proof, &wrong_root).is_err());
            }
        }
    }
    // Both branches really happen.
    assert!(same_shape > 0 && refused > same_shape);
}

#[test]
fn consistency_proofs_match_reference_and_verify_for_every_pair_of_sizes() {
    let d = leaves(64);
    let t = MerkleTree::from_leaf_hashes(d.clone());
    for new in 0..=64usize {
        let new_root = ref_mth(&d[..new]);
        for old in 0..=new {
            let old_root = ref_mth(&d[..old]);
            let proof = t.consistency_proof(old as u64, new as u64).unwrap();
            let expected = if old == 0 || old == new { Vec::new() } else { ref_proof(old, &d[..new]) };
            assert_eq!(proof, expected, "{old} -> {new}");
            assert_eq!(proof.len(), consistency_proof_len(old as u64, new as u64));
            assert_eq!(
                verify_consistency(old as u64, new as u64, &old_root, &new_root, &proof),
                Ok(()),
                "{old} -> {new}"
            );
            // Wrong sizes, each with the root a verifier holds for it, never verify.
            for (o2, n2) in [(old + 1, new), (old.wrapping_sub(1), new), (old, new + 1), (old, new.wrapping_sub(1))] {
                if o2 > n2 || n2 > 64 || (o2, n2) == (old, new) {
                    continue;
                }
                let r = verify_consistency(o2 as u64, n2 as u64, &ref_mth(&d[..o2]), &ref_mth(&d[..n2]), &proof);
                // Same-size and empty-old trivial cases need an empty proof; a non-empty one is
                // refused, and an empty one is genuinely valid there.
                if proof.is_empty() && (o2 == 0 || o2 == n2) {
                    assert!(r.is_ok());
                } else {
                    assert!(r.is_err(), "{old}->{new} accepted as {o2}->{n2}");
                }
            }
        }
    }
}

#[test]
fn consistency_roots_alone_do_not_commit_to_the_new_size() {
    // Documented RFC 6962 behaviour, pinned so nobody relies on the opposite: a 9 → 64 proof
    // also checks as 9 → 63 with the same two roots. Sizes must come signed with their roots.
    let d = leaves(64);
    let t = MerkleTree::from_leaf_hashes(d.clone());
    let proof = t.consistency_proof(9, 64).unwrap();
    let (r9, r64) = (ref_mth(&d[..9]), ref_mth(&d[..64]));
    assert_eq!(verify_consistency(9, 64, &r9, &r64, &proof), Ok(()));
    assert_eq!(verify_consistency(9, 63, &r9, &r64, &proof), Ok(()));
    assert!(verify_consistency(9, 63, &r9, &ref_mth(&d[..63]), &proof).is_err());
}

#[test]
fn trivial_consistency_cases() {
    let d = leaves(8);
    let (r4, r5) = (ref_mth(&d[..4]), ref_mth(&d[..5]));
    assert_eq!(verify_consistency(4, 4, &r4, &r4, &[]), Ok(()));
    assert!(matches!(verify_consistency(4, 4, &r4, &r5, &[]), Err(MerkleError::ConsistencyNewRootMismatch { .. })));
    assert!(matches!(
        verify_consistency(4, 4, &r4, &r4, &[r4]),
        Err(MerkleError::ConsistencyProofLength { got: 1, expected: 0, .. })
    ));
    assert_eq!(verify_consistency(0, 8, &EMPTY_ROOT, &r5, &[]), Ok(()));
    assert!(verify_consistency(0, 8, &r4, &r5, &[]).is_err());
    assert!(verify_consistency(0, 8, &EMPTY_ROOT, &r5, &[r4]).is_err());
    assert!(verify_consistency(4, 5, &r4, &r5, &[]).is_err());
    assert_eq!(
        verify_consistency(5, 4, &r5, &r4, &[]),
        Err(MerkleError::OldSizeAfterNewSize { old_size: 5, new_size: 4 })
    );
}

#[test]
fn tree_errors_name_what_was_asked() {
    let t = MerkleTree::from_leaf_hashes(leaves(5));
    assert_eq!(t.root_at(6), Err(MerkleError::SizeBeyondTree { size: 6, len: 5 }));
    assert_eq!(t.leaf_hash(5), Err(MerkleError::LeafIndexOutOfRange { index: 5, size: 5 }));
    assert_eq!(t.inclusion_proof(3, 3), Err(MerkleError::LeafIndexOutOfRange { index: 3, size: 3 }));
    assert_eq!(t.inclusion_proof(0, 6), Err(MerkleError::SizeBeyondTree { size: 6, len: 5 }));
    assert_eq!(t.consistency_proof(4, 3), Err(MerkleError::OldSizeAfterNewSize { old_size: 4, new_size: 3 }));
}

#[test]
fn mismatch_messages_carry_both_full_digests() {
    let d = leaves(6);
    let t = MerkleTree::from_leaf_hashes(d.clone());
    let proof = t.inclusion_proof(2, 6).unwrap();
    let wrong_root = ref_mth(&d[..5]);
    let err = verify_inclusion(&d[2], 2, 6, &proof, &wrong_root).unwrap_err();
    let msg = err.to_string();
    let hex = |h: &Hash| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert!(msg.contains(&hex(&wrong_root)), "{msg}");
    assert!(msg.contains(&hex(&ref_mth(&d))), "{msg}");
    assert!(msg.starts_with("inclusion proof for leaf 2 of a tree of size 6"), "{msg}");

    let cproof = t.consistency_proof(3, 6).unwrap();
    let err = verify_consistency(3, 6, &d[0], &ref_mth(&d), &cproof).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&hex(&d[0])) && msg.contains(&hex(&ref_mth(&d[..3]))), "{msg}");
    assert!(msg.starts_with("consistency proof from tree size 3 to 6"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// rs_merkle as a second, unrelated implementation.
// ---------------------------------------------------------------------------------------------

/// `rs_merkle` hashing made CT-compatible: leaves are hashed by the caller with the 0x00
/// prefix; interior nodes get the 0x01 prefix; a lone left node is promoted unchanged, which is
/// what makes its bottom-up pairing build exactly the RFC 6962 tree.
#[derive(Clone)]
struct CtSha256;

impl rs_merkle::Hasher for CtSha256 {
    type Hash = Hash;

    fn hash(data: &[u8]) -> Hash {
        sha256(&[data])
    }

    fn concat_and_hash(left: &Hash, right: Option<&Hash>) -> Hash {
        match right {
            Some(right) => ref_node(left, right),
            None => *left,
        }
    }
}

fn rs_merkle_root(leaf_hashes: &[Hash]) -> Hash {
    rs_merkle::MerkleTree::<CtSha256>::from_leaves(leaf_hashes).root().expect("a non-empty tree has a root")
}

#[test]
fn roots_agree_with_rs_merkle() {
    let d = leaves(10_000);
    let t = MerkleTree::from_leaf_hashes(d.clone());
    for size in (1..=64).chain([65, 100, 127, 128, 129, 1000, 4095, 4096, 4097, 10_000]) {
        assert_eq!(t.root_at(size as u64).unwrap(), rs_merkle_root(&d[..size]), "size {size}");
    }
}

#[test]
fn large_tree_appends_and_proves_in_logarithmic_time() {
    // 100,000 leaves with a root after every append and a proof for every leaf: with O(n) root
    // or proof costs this would be ~10^10 hashes and never finish; here it is a few million.
    let n = 100_000u64;
    let d = leaves(n as usize);
    let mut t = MerkleTree::new();
    let mut roots = Vec::with_capacity(n as usize);
    for h in &d {
        t.push_leaf_hash(*h);
        roots.push(t.root());
    }
    for size in [1u64, 2, 3, 1000, 65_536, 65_537, 99_999, 100_000] {
        assert_eq!(roots[size as usize - 1], rs_merkle_root(&d[..size as usize]), "size {size}");
        assert_eq!(t.root_at(size).unwrap(), roots[size as usize - 1]);
    }
    let root = t.root();
    for index in 0..n {
        let proof = t.inclusion_proof(index, n).unwrap();
        assert!(proof.len() <= 17);
        verify_inclusion(&d[index as usize], index, n, &proof, &root).unwrap();
    }
    for old in [1u64, 7, 4096, 65_536, 77_777, 99_999] {
        let proof = t.consistency_proof(old, n).unwrap();
        verify_consistency(old, n, &roots[old as usize - 1], &root, &proof).unwrap();
    }
}
