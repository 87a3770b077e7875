//! The evidence bundle of a `diverged` or `forged-log` verdict, and one-step adjudication.
//!
//! The bundle carries exactly what a third party needs to re-execute step `s` and check that
//! it is the step both sides committed to: the spec and the trainer's signed manifest (root,
//! size), leaf `s − 1` with its inclusion proof and the agreed state after `s − 1`, the
//! trainer's leaf `s` with its proof, the log and batch it committed for step `s`, and the
//! auditor's leaf `s`.
//!
//! # Encoding (version 1)
//! ```text
//! "TBEV" | version: u8 = 1 | zstd(body)
//! body: kind: u8 (1 diverged, 2 forged-log) | step: u64 | n_leaves: u64 | root: 32
//!       | auditor_device: blob | spec_json: blob | manifest_json: blob (empty: unfinished run)
//!       | trainer leaf: 109 | proof | auditor leaf: 109
//!       | has_previous: u8 (0/1) | [previous leaf: 109 | proof]
//!       | previous state: blob (canonical state encoding; empty at step 0 of a run from the
//!         seed; at step 0 of a fine-tune, the committed starting-weights file)
//!       | trainer batch: blob (canonical) | trainer log: blob (canonical)
//!       | sha256 of the body before it: 32
//! blob: len: u64 LE | bytes          proof: n: u32 LE | n × 32-byte hashes
//! ```
//! Decoding checks every length against what is left, rejects trailing bytes, checks the
//! digest, and re-encodes to make sure the input was canonical.

use std::path::Path;

use common::codec::{self, DecodeError, Hash, Reader, to_hex};
use common::leaf::{BatchIndices, LEAF_BYTES, Leaf};
use common::merkle::{ProvenLeaf, inclusion_proof_len, leaf_hash, verify_inclusion};
use common::state::TrainingState;
use common::tielog::{self, TieBreakLog};
use engine::record::Manifest;
use engine::spec::RunSpec;
use engine::train::StepMode;
use kernels::Profile;

use crate::report::{LeafJson, Report};
use crate::setup::build_run;
use crate::{AuditError, VerdictKind};

pub const MAGIC: &[u8; 4] = b"TBEV";
/// The state digest of an auditor leaf whose step did not stay finite (a value overflowed from
/// the agreed state): no state was computed, and no real digest is all zeros. Such a leaf is in
/// the report and the bundle like any other; re-executing the step overflows again and
/// reproduces it.
pub const NOT_FINITE_STATE: Hash = [0; 32];
const VERSION: u8 = 1;
/// Largest decompressed bundle accepted (a state of up to 4 GiB plus its log and spec).
pub const EVIDENCE_RAW_BYTES_MAX: usize = engine::record::STATE_RAW_BYTES_MAX + (512 << 20);

/// What a bundle holds; see the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// `diverged` or `forged-log`.
    pub verdict_kind: VerdictKind,
    pub step: u64,
    pub spec_json: Vec<u8>,
    /// The trainer's signed manifest (JSON); empty for an unfinished run.
    pub manifest_json: Vec<u8>,
    pub root: Hash,
    pub n_leaves: u64,
    pub trainer: ProvenLeaf,
    pub auditor_leaf: Leaf,
    pub auditor_device: String,
    pub previous: Option<ProvenLeaf>,
    /// Canonical encoding of the agreed state after step − 1 (empty at step 0).
    pub prev_state: Vec<u8>,
    pub trainer_batch: BatchIndices,
    pub trainer_log: TieBreakLog,
}

/// The bundle's code for a verdict kind; 0 (refused on decoding) for kinds that have no bundle.
fn kind_code(kind: VerdictKind) -> u8 {
    match kind {
        VerdictKind::Diverged => 1,
        VerdictKind::ForgedLog => 2,
        _ => 0,
    }
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_proof(out: &mut Vec<u8>, p: &[Hash]) {
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    for h in p {
        out.extend_from_slice(h);
    }
}

fn blob<'a>(r: &mut Reader<'a>, what: &str) -> Result<&'a [u8], DecodeError> {
    let n = r.u64_le(what)?;
    if n > r.remaining() as u64 {
        return Err(r.error(format!("{what}: length {n} exceeds the remaining input")));
    }
    r.bytes(n as usize, what)
}

fn proof(r: &mut Reader<'_>, what: &str) -> Result<Vec<Hash>, DecodeError> {
    let n = r.u32_le(what)? as usize;
    if n > 64 || n * 32 > r.remaining() {
        return Err(r.error(format!("{what}: {n} hashes cannot be an inclusion proof here")));
    }
    (0..n).map(|_| r.hash(what)).collect()
}

fn leaf(r: &mut Reader<'_>, what: &str) -> Result<Leaf, DecodeError> {
    let at = r.offset();
    Leaf::decode(r.bytes(LEAF_BYTES, what)?)
        .map_err(|e| DecodeError { what: format!("{what}: {}", e.what), offset: at + e.offset })
}

impl Evidence {
    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prev_state.len() + self.spec_json.len() + 4096);
        out.push(kind_code(self.verdict_kind));
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.n_leaves.to_le_bytes());
        out.extend_from_slice(&self.root);
        put_blob(&mut out, self.auditor_device.as_bytes());
        put_blob(&mut out, &self.spec_json);
        put_blob(&mut out, &self.manifest_json);
        out.extend_from_slice(&self.trainer.leaf.encode());
        put_proof(&mut out, &self.trainer.proof);
        out.extend_from_slice(&self.auditor_leaf.encode());
        match &self.previous {
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p.leaf.encode());
                put_proof(&mut out, &p.proof);
            }
            None => out.push(0),
        }
        put_blob(&mut out, &self.prev_state);
        put_blob(&mut out, &self.trainer_batch.encode());
        put_blob(&mut out, &self.trainer_log.encode());
        let digest = codec::sha256(&out);
        out.extend_from_slice(&digest);
        out
    }

    /// The bundle's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&tielog::compress_canonical(&self.body()));
        out
    }

    /// Decodes a bundle. Never panics; rejects anything [`Evidence::encode`] would not write.
    pub fn decode(bytes: &[u8]) -> Result<Evidence, AuditError> {
        let err = |what: String, offset: Option<u64>| AuditError::Evidence { what, offset };
        if bytes.len() < 5 || &bytes[..4] != MAGIC {
            return Err(err("not an evidence bundle (bad magic)".into(), Some(0)));
        }
        if bytes[4] != VERSION {
            return Err(err(format!("unsupported evidence version {}", bytes[4]), Some(4)));
        }
        let body = tielog::decompress_bounded(&bytes[5..], EVIDENCE_RAW_BYTES_MAX)
            .map_err(|e| err(format!("compressed body: {e}"), Some(5)))?;
        let ev = Self::decode_body(&body).map_err(|e| err(format!("body: {}", e.what), None))?;
        if ev.body() != body {
            return Err(err("not in canonical form".into(), None));
        }
        Ok(ev)
    }

    fn decode_body(body: &[u8]) -> Result<Evidence, DecodeError> {
        if body.len() < 32 {
            return Err(DecodeError { what: "shorter than its digest".into(), offset: 0 });
        }
        let (content, digest) = body.split_at(body.len() - 32);
        if codec::sha256(content) != digest {
            return Err(DecodeError { what: "digest does not match the content".into(), offset: content.len() });
        }
        let mut r = Reader::new(content);
        let verdict_kind = match r.u8("verdict kind")? {
            1 => VerdictKind::Diverged,
            2 => VerdictKind::ForgedLog,
            k => return Err(DecodeError { what: format!("unknown verdict kind {k}"), offset: 0 }),
        };
        let step = r.u64_le("step")?;
        let n_leaves = r.u64_le("leaf count")?;
        let root = r.hash("root")?;
        let auditor_device = String::from_utf8(blob(&mut r, "auditor device")?.to_vec())
            .map_err(|_| r.error("auditor device is not UTF-8"))?;
        let spec_json = blob(&mut r, "spec")?.to_vec();
        let manifest_json = blob(&mut r, "manifest")?.to_vec();
        let trainer_leaf = leaf(&mut r, "trainer leaf")?;
        let trainer_proof = proof(&mut r, "trainer leaf proof")?;
        let auditor_leaf = leaf(&mut r, "auditor leaf")?;
        let previous = match r.u8("previous flag")? {
            0 => None,
            1 => {
                Some(ProvenLeaf { leaf: leaf(&mut r, "previous leaf")?, proof: proof(&mut r, "previous leaf proof")? })
            }
            f => return Err(r.error(format!("previous flag {f} is neither 0 nor 1"))),
        };
        let prev_state = blob(&mut r, "previous state")?.to_vec();
        let trainer_batch = BatchIndices::decode(blob(&mut r, "trainer batch")?)
            .map_err(|e| DecodeError { what: format!("trainer batch: {}", e.what), offset: r.offset() })?;
        let trainer_log = TieBreakLog::decode(blob(&mut r, "trainer log")?)
            .map_err(|e| DecodeError { what: format!("trainer log: {e}"), offset: r.offset() })?;
        r.finish("evidence")?;
        Ok(Evidence {
            verdict_kind,
            step,
            spec_json,
            manifest_json,
            root,
            n_leaves,
            trainer: ProvenLeaf { leaf: trainer_leaf, proof: trainer_proof },
            auditor_leaf,
            auditor_device,
            previous,
            prev_state,
            trainer_batch,
            trainer_log,
        })
    }

    /// Checks that this bundle is the one behind `report`, a report whose signature the caller
    /// has verified ([`crate::report::verified`]): the same verdict, record, auditor device and
    /// leaves. The bundle itself is unsigned; bound to the signed report, its auditor leaf is
    /// the auditor's signed word, so an edited one is refused here instead of re-executing to
    /// "neither". The first field that differs is named, with both values.
    pub fn check_against(&self, report: &Report) -> Result<(), AuditError> {
        let at = report
            .at_step
            .as_ref()
            .ok_or_else(|| bad(format!("the report's verdict ({}) has no disputed step", report.verdict.kind)))?;
        let leaf = |l: &LeafJson| l.to_leaf().map(|l| LeafJson::from_leaf(&l).leaf_hash).unwrap_or_default();
        let fields: [(&str, String, String); 10] = [
            ("verdict kind", report.verdict.kind.clone(), self.verdict_kind.as_str().into()),
            ("record root", report.trainer_root.clone().unwrap_or_default(), to_hex(&self.root)),
            ("leaf count", report.n_leaves.map(|n| n.to_string()).unwrap_or_default(), self.n_leaves.to_string()),
            ("spec digest", report.spec_hash.clone().unwrap_or_default(), to_hex(&codec::sha256(&self.spec_json))),
            ("auditor device", report.auditor_device.clone(), self.auditor_device.clone()),
            ("step", at.step.to_string(), self.step.to_string()),
            ("trainer leaf", leaf(&at.trainer.leaf), LeafJson::from_leaf(&self.trainer.leaf).leaf_hash),
            ("auditor leaf", leaf(&at.auditor), LeafJson::from_leaf(&self.auditor_leaf).leaf_hash),
            (
                "previous leaf",
                at.previous.as_ref().map(|p| leaf(&p.leaf)).unwrap_or_default(),
                self.previous.as_ref().map(|p| LeafJson::from_leaf(&p.leaf).leaf_hash).unwrap_or_default(),
            ),
            (
                "trainer batch's digest",
                to_hex(&BatchIndices(at.batch_indices.clone()).digest()),
                to_hex(&self.trainer_batch.digest()),
            ),
        ];
        for (what, signed, bundle) in fields {
            if signed != bundle {
                return Err(bad(format!(
                    "the bundle is not the signed report's: its {what} is {bundle}, the report's {signed}"
                )));
            }
        }
        Ok(())
    }

    /// Writes the bundle to `path`.
    pub fn write(&self, path: &Path) -> Result<(), AuditError> {
        engine::output::write_output(path, &self.encode()).map_err(|source| AuditError::Io {
            op: "write",
            path: path.into(),
            source,
        })
    }

    /// Reads a bundle from `path` (size-checked before reading).
    pub fn read(path: &Path) -> Result<Evidence, AuditError> {
        use common::files::ReadError;
        let bytes = common::files::read_regular(path, EVIDENCE_RAW_BYTES_MAX as u64).map_err(|e| match e {
            ReadError::Io { op, source } => AuditError::Io { op, path: path.into(), source },
            ReadError::Unfit(what) => AuditError::Evidence { what: format!("not a bundle: {what}"), offset: None },
        })?;
        Evidence::decode(&bytes)
    }
}

/// The auditor's leaf of step `s` when replaying it overflowed: [`NOT_FINITE_STATE`], the log it
/// followed and the batch it drew.
pub fn not_finite_leaf(s: u64, log: &TieBreakLog, batch: &BatchIndices) -> Leaf {
    Leaf { step: s, state: NOT_FINITE_STATE, log: log.digest(), batch: batch.digest() }
}

/// Whose leaf an adjudicator reproduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Auditor,
    Trainer,
    Neither,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Auditor => "auditor",
            Side::Trainer => "trainer",
            Side::Neither => "neither",
        }
    }
}

/// The result of re-executing the disputed step.
#[derive(Debug, Clone, PartialEq)]
pub struct Adjudication {
    /// For `diverged`: whose leaf the re-execution equals. For `forged-log` (both leaves are
    /// equal): `auditor` if the re-execution also finds log entries that do not hold up,
    /// `trainer` if the log holds up, `neither` if the leaf differs from both.
    pub reproduces: Side,
    pub verdict_kind: VerdictKind,
    pub step: u64,
    pub device: Profile,
    pub computed_leaf: Leaf,
    pub trainer_leaf: Leaf,
    pub auditor_leaf: Leaf,
    /// Log entries that did not hold up on the adjudicator's side.
    pub forged: Vec<String>,
    /// Whether the root is the trainer's signed manifest's (not only the bundle's claim).
    pub root_signed: bool,
}

fn bad(what: impl Into<String>) -> AuditError {
    AuditError::Evidence { what: what.into(), offset: None }
}

/// Checks a bundle's commitments and re-executes its step on `device`. `data` is the dataset
/// (checked against the spec's commitment); synthetic specs need none.
pub fn adjudicate(ev: &Evidence, device: Profile, data: Option<&Path>) -> Result<Adjudication, AuditError> {
    let spec = RunSpec::from_committed_json(&ev.spec_json).map_err(|e| bad(format!("spec: {e}")))?;
    if spec.canonical_json() != ev.spec_json {
        return Err(bad("spec is not in canonical form"));
    }
    let root_signed = !ev.manifest_json.is_empty();
    if root_signed {
        let m: Manifest = serde_json::from_slice(&ev.manifest_json).map_err(|e| bad(format!("manifest: {e}")))?;
        m.verify_signature().map_err(|e| bad(format!("manifest: {e}")))?;
        if m.spec_hash != to_hex(&spec.digest()) {
            return Err(bad("manifest commits to another spec"));
        }
        if m.root != to_hex(&ev.root) || m.n_steps + 1 != ev.n_leaves {
            return Err(bad("root or size differs from the signed manifest's"));
        }
    }
    let check = |p: &ProvenLeaf, index: u64, what: &str| {
        if p.leaf.step != index || p.proof.len() != inclusion_proof_len(index, ev.n_leaves.max(1)) {
            return Err(bad(format!("{what} is not leaf {index}")));
        }
        verify_inclusion(&leaf_hash(&p.leaf.encode()), index, ev.n_leaves, &p.proof, &ev.root)
            .map_err(|e| bad(format!("{what}: {e}")))
    };
    let s = ev.step;
    check(&ev.trainer, s, "trainer leaf")?;
    if ev.auditor_leaf.step != s || ev.auditor_leaf.log != ev.trainer.leaf.log {
        return Err(bad("auditor leaf is not for the trainer's step and log"));
    }
    if ev.trainer_log.digest() != ev.trainer.leaf.log {
        return Err(bad("trainer log does not match the trainer's leaf"));
    }
    if s > 0 && ev.trainer_batch.digest() != ev.trainer.leaf.batch {
        return Err(bad("trainer batch does not match the trainer's leaf"));
    }
    let mut run = build_run(&spec, data, device, 1)?;
    let (computed_leaf, forged) = if s == 0 {
        if ev.previous.is_some() {
            return Err(bad("step 0 has no previous leaf"));
        }
        match (&spec.init_weights, ev.prev_state.is_empty()) {
            // A fine-tune: the bundle carries the committed starting weights.
            (Some(_), false) => {
                run.load_init_weights(&ev.prev_state).map_err(|p| bad(format!("starting weights: {}", p.detail())))?
            }
            (Some(_), true) => return Err(bad("a fine-tune's step 0 needs its starting weights in the bundle")),
            (None, false) => return Err(bad("step 0 of a run from the seed has no previous state")),
            (None, true) => {}
        }
        (Leaf::initial(run.state_digest(&run.initial_state()?)), Vec::new())
    } else {
        let prev = ev.previous.as_ref().ok_or_else(|| bad("no previous leaf"))?;
        check(prev, s - 1, "previous leaf")?;
        let state = TrainingState::decode(&ev.prev_state).map_err(|e| bad(format!("previous state: {e}")))?;
        if run.state_digest(&state) != prev.leaf.state || state.step != s - 1 {
            return Err(bad("previous state does not match leaf s − 1"));
        }
        match run.step(&state, s, StepMode::Replay(&ev.trainer_log), None) {
            Ok(out) => {
                let leaf = Leaf {
                    step: s,
                    state: run.state_digest(&out.state),
                    log: ev.trainer_log.digest(),
                    batch: out.batch.digest(),
                };
                (leaf, out.forged.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            }
            // From the agreed state the step overflows: no honest trainer committed a state for it.
            Err(e) if e.is_overflow() => (not_finite_leaf(s, &ev.trainer_log, &run.batch_indices(s)), Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    // Decided from what the re-execution itself finds in the trainer's committed bytes, never
    // from the bundle's unsigned claims (its verdict kind, the auditor's leaf): log entries that
    // do not hold up convict the trainer whatever the bundle says the verdict was.
    let reproduces = if !forged.is_empty() {
        Side::Auditor
    } else if computed_leaf == ev.trainer.leaf {
        Side::Trainer
    } else if computed_leaf == ev.auditor_leaf {
        Side::Auditor
    } else {
        Side::Neither
    };
    Ok(Adjudication {
        reproduces,
        verdict_kind: ev.verdict_kind,
        step: s,
        device,
        computed_leaf,
        trainer_leaf: ev.trainer.leaf,
        auditor_leaf: ev.auditor_leaf,
        forged,
        root_signed,
    })
}
