//! The signed audit report (JSON) and the adjudication output: the auditor's wire types.
//!
//! The report is built from an [`Audit`] and signed with the auditor's ed25519 key over its
//! canonical form: `"tiebreak/report/v1\0"` followed by the report serialised by `serde_json`
//! from [`Report`] (struct field order, no whitespace) with `signature` set to the empty
//! string. [`verify`] re-serialises the parsed report the same way, so any change to any
//! field's value (or an added or missing field: unknown fields are refused) breaks the
//! signature; it then checks the inclusion proofs of leaves s − 1 and s against the trainer
//! root. Timings are integers (milliseconds) so that no float formatting enters the signature.

use common::codec::{Hash, hash_from_hex, to_hex};
use common::leaf::Leaf;
use common::merkle::{leaf_hash, verify_inclusion};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::evidence::Adjudication;
use common::merkle::ProvenLeaf;

use crate::replay::{Audit, StateComparison, TensorDiff};
use crate::{AUDITOR_VERSION, AuditError, Verdict, VerdictKind};

/// The report format identifier.
pub const REPORT_FORMAT: &str = "tiebreak-audit-report/1";
const SIGNING_DOMAIN: &[u8] = b"tiebreak/report/v1\0";

/// The top-level `verdict` object: `kind` plus the fields that go with it (absent otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictJson {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// `diverged`: first differing rounding site when known (null otherwise); `forged-log`:
    /// the site of the forged entry.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub site: Option<Option<String>>,
    /// `diverged`: which parts of the leaf differ (`state`, `batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub index: Option<Option<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub value: Option<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub midpoint: Option<Option<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub bound: Option<Option<f64>>,
    /// `commitment-invalid`: what failed; `forged-log`/`trainer-unresponsive`: the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
    /// `commitment-invalid`: the file (relative to the record), null if none.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub file: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub offset: Option<Option<u64>>,
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value: plain serde would
/// read `null` as absent, and the re-serialised report would then not match its signature.
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl VerdictJson {
    fn kind_only(kind: VerdictKind) -> Self {
        VerdictJson {
            kind: kind.as_str().into(),
            step: None,
            site: None,
            differs: None,
            index: None,
            value: None,
            midpoint: None,
            bound: None,
            what: None,
            file: None,
            offset: None,
        }
    }

    pub fn from_verdict(v: &Verdict) -> Self {
        let mut j = Self::kind_only(v.kind());
        match v {
            Verdict::Consistent => {}
            Verdict::Diverged { step, site, differs, detail } => {
                j.step = Some(*step);
                j.site = Some(site.clone());
                j.differs = Some(differs.iter().map(|p| p.as_str().to_string()).collect());
                j.what = detail.clone();
            }
            Verdict::ForgedLog { step, site, index, value, midpoint, bound, detail } => {
                j.step = Some(*step);
                j.site = Some(Some(site.clone()));
                j.index = Some(*index);
                j.value = Some(*value);
                j.midpoint = Some(*midpoint);
                j.bound = Some(*bound);
                j.what = Some(detail.clone());
            }
            Verdict::CommitmentInvalid { what, file, offset } => {
                j.what = Some(what.clone());
                j.file = Some(file.clone());
                j.offset = Some(*offset);
            }
            Verdict::TrainerUnresponsive { what } => j.what = Some(what.clone()),
        }
        j
    }
}

/// A leaf with all three digests in full hex, and its Merkle leaf hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeafJson {
    pub step: u64,
    pub state: String,
    pub log: String,
    pub batch: String,
    /// `SHA-256(0x00 ‖ leaf entry)`.
    pub leaf_hash: String,
}

impl LeafJson {
    pub fn from_leaf(l: &Leaf) -> Self {
        LeafJson {
            step: l.step,
            state: to_hex(&l.state),
            log: to_hex(&l.log),
            batch: to_hex(&l.batch),
            leaf_hash: to_hex(&leaf_hash(&l.encode())),
        }
    }

    /// The leaf, if every digest parses and the leaf hash matches the fields.
    pub fn to_leaf(&self) -> Result<Leaf, String> {
        let h = |s: &str, what: &str| hash_from_hex(s).ok_or_else(|| format!("{what} is not a 64-digit hex digest"));
        let leaf = Leaf {
            step: self.step,
            state: h(&self.state, "state")?,
            log: h(&self.log, "log")?,
            batch: h(&self.batch, "batch")?,
        };
        if to_hex(&leaf_hash(&leaf.encode())) != self.leaf_hash {
            return Err(format!("leaf_hash of leaf {} does not match its digests", self.step));
        }
        Ok(leaf)
    }
}

/// A trainer leaf with its inclusion proof against `trainer_root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvenLeafJson {
    pub leaf: LeafJson,
    pub proof: Vec<String>,
}

impl ProvenLeafJson {
    fn from_proven(p: &ProvenLeaf) -> Self {
        ProvenLeafJson { leaf: LeafJson::from_leaf(&p.leaf), proof: p.proof.iter().map(|h| to_hex(h)).collect() }
    }
}

/// What the report says about the step of a `diverged` / `forged-log` verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepJson {
    pub step: u64,
    /// The trainer's leaf at the step (full digests) with its inclusion proof.
    pub trainer: ProvenLeafJson,
    /// The auditor's leaf at the step (full digests).
    pub auditor: LeafJson,
    /// Leaf step − 1, which both sides agree on, with its inclusion proof (null at step 0).
    pub previous: Option<ProvenLeafJson>,
    /// The batch indices the trainer committed for the step.
    pub batch_indices: Vec<u64>,
    /// The batch indices the seed dictates.
    pub auditor_batch_indices: Vec<u64>,
    /// Log entries that did not hold up on the auditor's side.
    pub forged_entries: Vec<String>,
    /// `diverged`: the trainer's committed state at the step against the auditor's, tensor by
    /// tensor (absent for `forged-log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateComparisonJson>,
}

/// The state comparison at a diverging step: `compared` lists every differing tensor;
/// `unavailable` says why the trainer's state could not be compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateComparisonJson {
    pub compared: bool,
    #[serde(default)]
    pub tensors: Vec<TensorDiffJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// One differing tensor. Values are FP32 printed as JSON numbers (exact: every FP32 value
/// round-trips through its shortest decimal form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorDiffJson {
    pub tensor: String,
    pub elements: u64,
    pub first_index: Option<u64>,
    pub trainer: Option<f32>,
    pub auditor: Option<f32>,
    pub max_abs_diff: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_shape: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auditor_shape: Option<Vec<usize>>,
}

impl StateComparisonJson {
    fn from_comparison(c: &StateComparison) -> Self {
        let tensor = |d: &TensorDiff| TensorDiffJson {
            tensor: d.tensor.clone(),
            elements: d.elements,
            first_index: d.first_index,
            trainer: d.trainer.filter(|v| v.is_finite()),
            auditor: d.auditor.filter(|v| v.is_finite()),
            max_abs_diff: d.max_abs_diff.filter(|v| v.is_finite()),
            trainer_shape: d.trainer_shape.clone(),
            auditor_shape: d.auditor_shape.clone(),
        };
        match c {
            StateComparison::Compared(diffs) => {
                StateComparisonJson { compared: true, tensors: diffs.iter().map(tensor).collect(), unavailable: None }
            }
            StateComparison::Unavailable(why) => {
                StateComparisonJson { compared: false, tensors: Vec::new(), unavailable: Some(why.clone()) }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BisectionJson {
    pub queries: u32,
    pub query_limit: u32,
    pub first_differing_leaf: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingsJson {
    pub open_ms: u64,
    pub replay_ms: u64,
    pub bisection_ms: u64,
    pub total_ms: u64,
}

/// The signed audit report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub format: String,
    pub verdict: VerdictJson,
    pub auditor_version: String,
    pub auditor_device: String,
    pub trainer_device: Option<String>,
    pub record: String,
    pub spec_hash: Option<String>,
    /// The root the verdict is relative to.
    pub trainer_root: Option<String>,
    /// Whether `trainer_root` is from the trainer's signed manifest (false: unfinished run).
    pub trainer_root_signed: bool,
    pub trainer_public_key: Option<String>,
    /// Leaves in the trainer's tree (steps + 1).
    pub n_leaves: Option<u64>,
    pub mode: String,
    /// Spot mode drawn at random: the seed, and how it was chosen (`fresh` randomness drawn by
    /// the auditor, or `given` by the user and so predictable by whoever knew it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_seed_chosen: Option<String>,
    pub segment: Option<[u64; 2]>,
    /// Replayed jobs as `[start checkpoint, end]`.
    pub intervals: Vec<[u64; 2]>,
    pub steps_replayed: u64,
    pub bisection: Option<BisectionJson>,
    pub at_step: Option<StepJson>,
    pub timings: TimingsJson,
    pub auditor_public_key: String,
    pub signature: String,
}

impl Report {
    /// Builds and signs the report of `audit`.
    pub fn build(audit: &Audit, key: &SigningKey) -> Report {
        let c = audit.commitment.as_ref();
        let m = c.and_then(|c| c.manifest.as_ref());
        let mut r = Report {
            format: REPORT_FORMAT.into(),
            verdict: VerdictJson::from_verdict(&audit.verdict),
            auditor_version: AUDITOR_VERSION.into(),
            auditor_device: audit.auditor_device.name().into(),
            trainer_device: c.map(|c| c.trainer_device.clone()),
            record: audit.source.clone(),
            spec_hash: c.map(|c| to_hex(&c.spec_hash)),
            trainer_root: c.map(|c| to_hex(&c.root)),
            trainer_root_signed: m.is_some(),
            trainer_public_key: m.map(|m| m.public_key.clone()),
            n_leaves: c.map(|c| c.n_leaves),
            mode: audit.mode.name().into(),
            spot_seed: audit.spot_seed().map(|(seed, _)| seed),
            spot_seed_chosen: audit.spot_seed().map(|(_, chosen)| chosen.name().into()),
            segment: audit.segment.map(|(a, b)| [a, b]),
            intervals: audit.intervals.iter().map(|&(a, b)| [a, b]).collect(),
            steps_replayed: audit.steps_replayed,
            bisection: audit.bisection.map(|b| BisectionJson {
                queries: b.queries,
                query_limit: b.query_limit,
                first_differing_leaf: b.first_differing_leaf,
            }),
            at_step: audit.detail.as_ref().map(|d| StepJson {
                step: d.step,
                trainer: ProvenLeafJson::from_proven(&d.trainer),
                auditor: LeafJson::from_leaf(&d.auditor_leaf),
                previous: d.previous.as_ref().map(ProvenLeafJson::from_proven),
                batch_indices: d.trainer_batch.0.clone(),
                auditor_batch_indices: d.auditor_batch.0.clone(),
                forged_entries: d.forged.clone(),
                state: d.state.as_ref().map(StateComparisonJson::from_comparison),
            }),
            timings: TimingsJson {
                open_ms: audit.timings.open_ms,
                replay_ms: audit.timings.replay_ms,
                bisection_ms: audit.timings.bisection_ms,
                total_ms: audit.timings.total_ms,
            },
            auditor_public_key: to_hex(key.verifying_key().as_bytes()),
            signature: String::new(),
        };
        r.signature = to_hex(&key.sign(&r.signing_payload()).to_bytes());
        r
    }

    /// The bytes the auditor signs.
    pub fn signing_payload(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        let mut out = SIGNING_DOMAIN.to_vec();
        out.extend_from_slice(&serde_json::to_vec(&unsigned).expect("report serialises"));
        out
    }

    /// Pretty JSON, as written to files and stdout.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }
}

fn hex_array<const N: usize>(s: &str, what: &str) -> Result<[u8; N], AuditError> {
    common::codec::from_hex::<N>(s)
        .ok_or_else(|| AuditError::Report(format!("{what} is not {N} bytes of lowercase hex")))
}

/// What [`verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedReport {
    pub verdict_kind: VerdictKind,
    pub auditor_public_key: String,
    /// Inclusion proofs checked (0, 1 or 2).
    pub proofs_checked: usize,
}

/// Parses a report and checks its signature and every inclusion proof in it.
pub fn verify(json: &str) -> Result<VerifiedReport, AuditError> {
    verified(json).map(|(_, v)| v)
}

/// [`verify`], also handing back the report whose signature and proofs were checked.
pub fn verified(json: &str) -> Result<(Report, VerifiedReport), AuditError> {
    let r: Report = serde_json::from_str(json).map_err(|e| AuditError::Report(format!("is not a report: {e}")))?;
    if r.format != REPORT_FORMAT {
        return Err(AuditError::Report(format!("format {:?} is not {REPORT_FORMAT:?}", r.format)));
    }
    let pk: [u8; 32] = hex_array(&r.auditor_public_key, "auditor_public_key")?;
    let sig: [u8; 64] = hex_array(&r.signature, "signature")?;
    let key = VerifyingKey::from_bytes(&pk).map_err(|e| AuditError::Report(format!("auditor_public_key: {e}")))?;
    key.verify(&r.signing_payload(), &Signature::from_bytes(&sig)).map_err(|_| {
        AuditError::Report("signature does not verify: the report was altered or signed by another key".into())
    })?;
    let mut proofs_checked = 0;
    if let Some(at) = &r.at_step {
        let root: Hash = r
            .trainer_root
            .as_deref()
            .and_then(hash_from_hex)
            .ok_or_else(|| AuditError::Report("a report with a step detail needs trainer_root".into()))?;
        let size = r.n_leaves.ok_or_else(|| AuditError::Report("a report with a step detail needs n_leaves".into()))?;
        if r.verdict.step != Some(at.step) {
            return Err(AuditError::Report("verdict step and at_step.step differ".into()));
        }
        let mut check = |p: &ProvenLeafJson, index: u64, what: &str| -> Result<(), AuditError> {
            let leaf = p.leaf.to_leaf().map_err(|e| AuditError::Report(format!("{what}: {e}")))?;
            if leaf.step != index {
                return Err(AuditError::Report(format!("{what} is leaf {}, expected {index}", leaf.step)));
            }
            let proof: Vec<Hash> = p
                .proof
                .iter()
                .map(|h| {
                    hash_from_hex(h).ok_or_else(|| AuditError::Report(format!("{what}: proof hash {h:?} is not hex")))
                })
                .collect::<Result<_, _>>()?;
            verify_inclusion(&leaf_hash(&leaf.encode()), index, size, &proof, &root)
                .map_err(|e| AuditError::Report(format!("{what}: inclusion proof fails: {e}")))?;
            proofs_checked += 1;
            Ok(())
        };
        check(&at.trainer, at.step, "trainer leaf")?;
        match (&at.previous, at.step) {
            (None, 0) => {}
            (Some(p), s) if s > 0 => check(p, s - 1, "previous leaf")?,
            _ => return Err(AuditError::Report("previous leaf present at step 0 or missing after it".into())),
        }
        at.auditor.to_leaf().map_err(|e| AuditError::Report(format!("auditor leaf: {e}")))?;
    }
    let verdict_kind = r.verdict.kind.parse().map_err(AuditError::Report)?;
    let v = VerifiedReport { verdict_kind, auditor_public_key: r.auditor_public_key.clone(), proofs_checked };
    Ok((r, v))
}

/// The JSON printed by `auditor adjudicate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjudicationJson {
    pub reproduces: String,
    pub verdict_kind: String,
    pub step: u64,
    pub device: String,
    pub computed_leaf: LeafJson,
    pub trainer_leaf: LeafJson,
    pub auditor_leaf: LeafJson,
    pub forged_entries: Vec<String>,
    pub root_signed: bool,
    pub auditor_version: String,
    /// With `--report`: the key that signed the report the bundle was checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_signed_by: Option<String>,
}

impl AdjudicationJson {
    pub fn from_adjudication(a: &Adjudication) -> Self {
        AdjudicationJson {
            reproduces: a.reproduces.name().into(),
            verdict_kind: a.verdict_kind.as_str().into(),
            step: a.step,
            device: a.device.name().into(),
            computed_leaf: LeafJson::from_leaf(&a.computed_leaf),
            trainer_leaf: LeafJson::from_leaf(&a.trainer_leaf),
            auditor_leaf: LeafJson::from_leaf(&a.auditor_leaf),
            forged_entries: a.forged.clone(),
            root_signed: a.root_signed,
            auditor_version: AUDITOR_VERSION.into(),
            report_signed_by: None,
        }
    }
}
