//! Guilty records never get "could not decide": every way a trainer can sign, commit, serve or
//! withhold something wrong ends in the same adverse verdict in full, `--from`, intervals (1, 2
//! and 8 threads) and spot audits, naming the file and what is wrong.

mod support;

use std::path::{Path, PathBuf};

use auditor::replay::{SeedChoice, StateComparison};
use auditor::{
    AuditError, AuditOptions, LocalRecord, Mode, NoProgress, SourceError, SpotPick, TrainerSource, Verdict, audit,
};
use common::codec::{Hash, to_hex};
use common::leaf::{BatchIndices, Leaf};
use common::state::{Tensor, TrainingState};
use common::tielog::{Direction, SiteLog, TieBreakLog};
use engine::record::{self, Manifest, SigningKey};
use engine::train::{Fault, FaultKind};
use kernels::Profile;
use support::tamper::{key, rebuilt, recommit, tamper_checkpoint, tamper_log, tamper_spec};
use support::{Drill, INTERVAL, SGD, STEPS, scratch, write_record};

fn fresh_record(dir: &Path, drill: Drill) -> PathBuf {
    write_record(dir, Profile::Cpu, SGD, drill)
}

/// Every audit mode the issue names, on `src`: (label, verdict or error).
fn every_mode(src: &dyn TrainerSource, from: u64) -> Vec<(String, Result<Verdict, String>)> {
    let base = AuditOptions::new(Profile::CpuSeq);
    let all_intervals = (STEPS / INTERVAL + 1) as usize;
    let mut runs: Vec<(String, AuditOptions, usize)> = vec![
        ("full".into(), base.clone(), 0),
        (format!("full --from {from}"), AuditOptions { from: Some(from), ..base.clone() }, 0),
    ];
    for threads in [1, 2, 8] {
        runs.push((format!("intervals x{threads}"), AuditOptions { mode: Mode::Intervals, ..base.clone() }, threads));
    }
    let spot = |pick| Mode::Spot { count: all_intervals, pick };
    runs.push((
        "spot random".into(),
        AuditOptions { mode: spot(SpotPick::Random { seed: 3, chosen: SeedChoice::Given }), ..base.clone() },
        2,
    ));
    runs.push(("spot largest".into(), AuditOptions { mode: spot(SpotPick::LargestUpdates), ..base.clone() }, 2));
    runs.into_iter()
        .map(|(label, opts, threads)| {
            let go = || audit(src, &opts, &NoProgress).map(|a| a.verdict).map_err(|e| e.to_string());
            let r = if threads == 0 {
                go()
            } else {
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(go)
            };
            (label, r)
        })
        .collect()
}

/// Every mode gives the same adverse verdict; returns it.
fn same_adverse_verdict(src: &dyn TrainerSource, from: u64, ctx: &str) -> Verdict {
    let results = every_mode(src, from);
    let (first_label, first) = &results[0];
    let first = first.clone().unwrap_or_else(|e| panic!("{ctx}: {first_label}: could not decide: {e}"));
    assert!(!first.is_consistent(), "{ctx}: {first_label}: consistent");
    for (label, r) in &results[1..] {
        assert_eq!(r.as_ref(), Ok(&first), "{ctx}: {label} differs from {first_label}");
    }
    first
}

fn assert_invalid(v: &Verdict, file_part: &str, what_part: &str, ctx: &str) {
    match v {
        Verdict::CommitmentInvalid { what, file: Some(file), .. } => {
            assert!(file.contains(file_part), "{ctx}: file {file:?} does not name {file_part:?} ({what})");
            assert!(what.contains(what_part), "{ctx}: {what:?} does not say {what_part:?}");
        }
        other => panic!("{ctx}: expected commitment-invalid about {file_part}, got {other:?}"),
    }
}

#[test]
fn a_malformed_committed_state_is_the_same_finding_in_every_mode() {
    let dir = scratch("malformed-state");
    let c = 2 * INTERVAL;
    type Edit = Box<dyn Fn(&TrainingState) -> TrainingState>;
    let first_param =
        |s: &TrainingState| s.tensors().map(|(n, _)| n.to_string()).find(|n| n.starts_with("param/")).unwrap();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing tensor",
            Box::new(move |s| {
                let p = first_param(s);
                rebuilt(s, |n, t| if n == p { vec![] } else { vec![(n.into(), t.clone())] })
            }),
            "missing",
        ),
        (
            // The same length, so that the state's size still fits the model's.
            "renamed tensor",
            Box::new(move |s| {
                let p = first_param(s);
                rebuilt(s, |n, t| vec![(if n == p { format!("{}Z", &n[..n.len() - 1]) } else { n.into() }, t.clone())])
            }),
            "not a parameter",
        ),
        (
            "short tensor",
            Box::new(move |s| {
                let p = first_param(s);
                rebuilt(s, |n, t| {
                    let t = if n == p {
                        Tensor::new(vec![t.data.len() - 1], t.data[1..].to_vec()).unwrap()
                    } else {
                        t.clone()
                    };
                    vec![(n.into(), t)]
                })
            }),
            "shape",
        ),
        // Larger than any state of this model: refused before it is decoded.
        (
            "long tensor",
            Box::new(move |s| {
                let p = first_param(s);
                rebuilt(s, |n, t| {
                    let t = if n == p {
                        let mut d = t.data.clone();
                        d.push(0.5);
                        Tensor::new(vec![d.len()], d).unwrap()
                    } else {
                        t.clone()
                    };
                    vec![(n.into(), t)]
                })
            }),
            "more than",
        ),
        (
            "missing optimizer slot",
            Box::new(|s| rebuilt(s, |n, t| if n.contains("momentum") { vec![] } else { vec![(n.into(), t.clone())] })),
            "missing",
        ),
        (
            "extra tensor",
            Box::new(|s| rebuilt(s, |n, t| vec![(n.into(), t.clone()), (format!("{n}.extra"), t.clone())])),
            // Larger than any state of this model: refused before it is decoded.
            "more than",
        ),
    ];
    for (i, (name, edit, says)) in cases.into_iter().enumerate() {
        let record = fresh_record(&dir.join(format!("case{i}")), Drill::default());
        tamper_checkpoint(&record, c, |s| edit(s));
        let src = LocalRecord::open(&record).unwrap_or_else(|e| panic!("{name}: the record opens: {e}"));
        let v = same_adverse_verdict(&src, c + 1, name);
        assert_invalid(&v, &format!("{c:010}.state.zst"), says, name);
        // What export, inspect, a resume and the record server read it through refuses it too.
        let e = engine::record::Record::open(&record).unwrap().checkpoint(c).unwrap_err().to_string();
        assert!(e.contains(&format!("{c:010}.state.zst")) && e.contains(says), "{name}: {e}");
    }
}

/// A record server that has handed out everything committed, then refuses one piece.
struct Refusing {
    inner: LocalRecord,
    log: Option<u64>,
    batch: Option<u64>,
    checkpoint: Option<u64>,
    leaves: bool,
}

impl Refusing {
    fn refused(what: &str) -> SourceError {
        SourceError::Refused { file: what.into(), what: "GET: HTTP 403".into() }
    }
}

impl TrainerSource for Refusing {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn spec_bytes(&self) -> Result<Vec<u8>, SourceError> {
        self.inner.spec_bytes()
    }
    fn manifest(&self) -> Result<Option<Manifest>, SourceError> {
        self.inner.manifest()
    }
    fn leaves(&self, signed_steps: Option<u64>) -> Result<Vec<Leaf>, SourceError> {
        if self.leaves {
            return Err(Self::refused("leaves"));
        }
        self.inner.leaves(signed_steps)
    }
    fn child_hashes(&self, lo: u64, hi: u64, size: u64) -> Result<(Hash, Hash), SourceError> {
        self.inner.child_hashes(lo, hi, size)
    }
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, SourceError> {
        self.inner.inclusion_proof(index, size)
    }
    fn log(&self, step: u64) -> Result<TieBreakLog, SourceError> {
        if self.log == Some(step) {
            return Err(Self::refused("steps/log"));
        }
        self.inner.log(step)
    }
    fn batch(&self, step: u64) -> Result<BatchIndices, SourceError> {
        if self.batch == Some(step) {
            return Err(Self::refused("steps/batch"));
        }
        self.inner.batch(step)
    }
    fn checkpoint_steps(&self) -> Result<Vec<u64>, SourceError> {
        self.inner.checkpoint_steps()
    }
    fn checkpoint(&self, step: u64) -> Result<TrainingState, SourceError> {
        if self.checkpoint == Some(step) {
            return Err(Self::refused("checkpoints/state"));
        }
        self.inner.checkpoint(step)
    }
}

/// A committed log names a site by its ordinal in the step. An entry under an ordinal past the
/// step's last site, or under a site of another length, is a forged log at that step; a log in
/// the version that named sites (format 2) is a malformed file. Each is the same finding in
/// every mode, and the honest part of the log is not what is blamed.
#[test]
fn log_entries_under_the_wrong_site_ordinal_are_forged_in_every_mode() {
    let dir = scratch("wrong-ordinal");
    let honest = fresh_record(&dir.join("honest"), Drill::default());
    let step = 5;
    let rounded = {
        let rec = engine::record::Record::open(&honest).unwrap();
        rec.log(step).unwrap()
    };
    let with = |ordinal: u32, len: u64| {
        let mut log = rounded.clone();
        let mut site = log.site(ordinal).cloned().unwrap_or_else(|| SiteLog::new(len));
        if site.n_entries() == 0 {
            site.push_direction(len - 1, Direction::Up);
        }
        if log.replace(ordinal, site.clone()).is_none() {
            log.insert(ordinal, site).unwrap();
        }
        log.encode()
    };
    let mut v1 = TieBreakLog::default().encode();
    v1.truncate(v1.len() - 4);
    v1[4] = 1;
    common::codec::put_crc(&mut v1);
    for (name, raw) in [
        ("an ordinal past the last site", with(100_000, 3)),
        ("the first site with another length", with(0, 7)),
        ("a version-1 log", v1),
    ] {
        let copy = dir.join(name.replace(' ', "-"));
        support::copy_dir(&honest, &copy);
        tamper_log(&copy, step, &raw);
        let src = LocalRecord::open(&copy).unwrap();
        let v = same_adverse_verdict(&src, 1, name);
        match (name, &v) {
            ("a version-1 log", _) => assert_invalid(&v, "0000000005.log.zst", "version 1", name),
            ("an ordinal past the last site", Verdict::ForgedLog { step: s, site, detail, .. }) => {
                assert_eq!(*s, step, "{name}");
                assert!(site.starts_with("#100000 (the step rounds "), "{name}: {site}");
                assert!(detail.contains("never rounds"), "{name}: {detail}");
            }
            ("the first site with another length", Verdict::ForgedLog { step: s, site, detail, .. }) => {
                assert_eq!(*s, step, "{name}");
                assert!(!site.is_empty() && !site.starts_with('#'), "{name}: the replayer's own site name: {site}");
                assert!(detail.contains("covers 7 values"), "{name}: {detail}");
            }
            _ => panic!("{name}: {v:?}"),
        }
    }
}

#[test]
fn a_refusal_after_the_run_is_committed_is_withholding_in_every_mode() {
    let dir = scratch("refusing");
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 6 };
    let record = fresh_record(&dir, Drill { fault: Some(fault), ..Drill::default() });
    for (name, log, batch, checkpoint, leaves, from) in [
        ("log of the diverging step", Some(6), None, None, false, 5),
        ("batch of the diverging step", None, Some(6), None, false, 5),
        ("checkpoint before it", None, None, Some(INTERVAL), false, INTERVAL + 1),
        ("leaves under a signed manifest", None, None, None, true, 5),
    ] {
        let src = Refusing { inner: LocalRecord::open(&record).unwrap(), log, batch, checkpoint, leaves };
        let v = same_adverse_verdict(&src, from, name);
        assert_invalid(&v, "", "withheld", name);
    }
}

#[test]
fn a_signed_spec_that_is_invalid_in_itself_is_commitment_invalid_naming_the_field() {
    let dir = scratch("bad-spec");
    type SpecEdit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, SpecEdit, &str)> = vec![
        ("batch size 0", Box::new(|v| v["config"]["train"]["batch_size"] = 0.into()), "batch_size"),
        (
            "checkpoint interval 0",
            Box::new(|v| v["config"]["train"]["checkpoint_interval"] = 0.into()),
            "checkpoint_interval",
        ),
        ("zero classes", Box::new(|v| v["config"]["data"]["classes"] = 0.into()), "classes"),
        (
            "zero heads",
            Box::new(
                |v| v["config"]["model"] = serde_json::json!({"kind": "gpt", "layers": 1, "d_model": 8, "heads": 0, "context": 4, "dropout": 0.0}),
            ),
            "heads",
        ),
        (
            "dropout 1",
            Box::new(
                |v| v["config"]["model"] = serde_json::json!({"kind": "gpt", "layers": 1, "d_model": 8, "heads": 2, "context": 4, "dropout": 1.0}),
            ),
            "dropout",
        ),
        (
            "adam beta 1",
            Box::new(
                |v| v["config"]["optimizer"] = serde_json::json!({"kind": "adamw", "lr": 0.01, "beta1": 1.0, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}),
            ),
            "beta1",
        ),
    ];
    for (i, (name, edit, field)) in cases.into_iter().enumerate() {
        let record = fresh_record(&dir.join(format!("case{i}")), Drill::default());
        tamper_spec(&record, |v| edit(v));
        // Both ways in: the record directory as a whole, and the trainer-side trait.
        let local = auditor::audit_dir(&record, &AuditOptions::new(Profile::CpuSeq), &NoProgress)
            .unwrap_or_else(|e| panic!("{name}: could not decide: {e}"));
        assert_invalid(&local.verdict, "spec.json", field, name);
        if let Ok(src) = LocalRecord::open(&record) {
            let v = same_adverse_verdict(&src, 1, name);
            assert_invalid(&v, "spec.json", field, name);
        }
    }
}

#[test]
fn manifest_fields_must_equal_the_spec_and_a_finished_run_needs_its_final_checkpoint() {
    let dir = scratch("manifest-fields");
    type ManifestEdit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, ManifestEdit)> = vec![
        ("checkpoint_interval", Box::new(|m| m.checkpoint_interval = INTERVAL + 1)),
        ("device_profile", Box::new(|m| m.device_profile = "cpu-seq".into())),
        ("format_version", Box::new(|m| m.format_version += 1)),
        ("software_version", Box::new(|m| m.software_version.push_str("-other"))),
    ];
    for (i, (field, edit)) in cases.into_iter().enumerate() {
        let record = fresh_record(&dir.join(format!("case{i}")), Drill::default());
        recommit(&record, None, |m| edit(m));
        let a = auditor::audit_dir(&record, &AuditOptions::new(Profile::CpuSeq), &NoProgress)
            .unwrap_or_else(|e| panic!("{field}: could not decide: {e}"));
        assert_invalid(&a.verdict, "manifest.json", field, field);
    }
    // 13 is off the interval: its checkpoint is written by `finish` alone.
    let record = fresh_record(&dir.join("final"), Drill::default());
    assert_ne!(STEPS % INTERVAL, 0);
    std::fs::remove_file(record::checkpoint_path(&record, STEPS)).unwrap();
    let a = auditor::audit_dir(&record, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    assert_invalid(&a.verdict, &format!("{STEPS:010}.state.zst"), "final", "missing final checkpoint");
}

#[test]
fn a_diverged_report_names_each_differing_tensor_or_says_why_it_cannot() {
    let dir = scratch("state-diff");
    // At a checkpoint step the trainer's own state is on record: compared tensor by tensor.
    let at = 2 * INTERVAL;
    let record = fresh_record(
        &dir.join("on"),
        Drill { fault: Some(Fault { kind: FaultKind::ScaleLr, step: at }), ..Drill::default() },
    );
    let a = auditor::audit_dir(&record, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    assert!(matches!(a.verdict, Verdict::Diverged { step, .. } if step == at), "{:?}", a.verdict);
    let Some(StateComparison::Compared(diffs)) = a.detail.as_ref().and_then(|d| d.state.clone()) else {
        panic!("no comparison: {:?}", a.detail.map(|d| d.state));
    };
    assert!(!diffs.is_empty());
    for d in &diffs {
        assert!(d.elements > 0 && d.first_index.is_some() && d.trainer != d.auditor, "{d:?}");
    }
    assert!(diffs.iter().any(|d| d.tensor.starts_with("param/")), "{diffs:?}");
    let json = auditor::report::Report::build(&a, &key()).to_json();
    assert!(json.contains(&diffs[0].tensor) && json.contains("\"compared\": true"), "{json}");

    // Between checkpoints the trainer side cannot hand its state out: the report says so.
    let record = fresh_record(
        &dir.join("off"),
        Drill { fault: Some(Fault { kind: FaultKind::ScaleLr, step: 6 }), ..Drill::default() },
    );
    let a = auditor::audit_dir(&record, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    match a.detail.as_ref().and_then(|d| d.state.clone()) {
        Some(StateComparison::Unavailable(why)) => assert!(why.contains("step 6"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn honest_records_stay_consistent_in_every_mode() {
    let dir = scratch("honest-modes");
    let record = fresh_record(&dir, Drill::default());
    let src = LocalRecord::open(&record).unwrap();
    for (label, r) in every_mode(&src, 5) {
        assert_eq!(r, Ok(Verdict::Consistent), "{label}");
    }
    // Pinning the trainer's own key changes nothing; another key is a finding.
    let own = to_hex(key().verifying_key().as_bytes());
    let opts = AuditOptions { trainer_key: Some(own), ..AuditOptions::new(Profile::CpuSeq) };
    assert_eq!(audit(&src, &opts, &NoProgress).unwrap().verdict, Verdict::Consistent);
    let other = to_hex(SigningKey::from_bytes(&[8; 32]).verifying_key().as_bytes());
    let opts = AuditOptions { trainer_key: Some(other), ..AuditOptions::new(Profile::CpuSeq) };
    assert_invalid(&audit(&src, &opts, &NoProgress).unwrap().verdict, "manifest.json", "pinned", "other key");
    // A usage error is not a verdict.
    let opts = AuditOptions { from: Some(STEPS + 5), ..AuditOptions::new(Profile::CpuSeq) };
    assert!(matches!(audit(&src, &opts, &NoProgress), Err(AuditError::Usage(_))));
}

#[test]
fn special_files_in_a_local_record_are_findings_not_hangs() {
    let dir = scratch("special-files");
    type Make = fn(&Path);
    let kinds: [(&str, Make); 5] = [
        ("directory", |p| std::fs::create_dir(p).unwrap()),
        ("fifo", |p| assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success())),
        ("link to /dev/zero", |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
        // A "regular file" whose every read fails (EIO): the link is the trainer's doing.
        ("link to /proc/self/mem", |p| std::os::unix::fs::symlink("/proc/self/mem", p).unwrap()),
        ("symlink loop", |p| std::os::unix::fs::symlink(p, p).unwrap()),
    ];
    for (i, (kind, make)) in kinds.into_iter().enumerate() {
        for (what, file) in [
            ("log", record::log_path as fn(&Path, u64) -> PathBuf),
            ("batch", record::batch_path),
            ("checkpoint", record::checkpoint_path),
        ] {
            let ctx = format!("{kind} as the {what} of step 8");
            let record = fresh_record(&dir.join(format!("{i}-{what}")), Drill::default());
            let path = file(&record, 8);
            std::fs::remove_file(&path).unwrap();
            make(&path);
            // A hang would never end: the audit runs on a thread the test only waits 60 s for.
            let (tx, rx) = std::sync::mpsc::channel();
            let r = record.clone();
            std::thread::spawn(move || {
                let _ = tx.send(LocalRecord::open(&r).map(|src| every_mode(&src, 5)).map_err(|e| e.to_string()));
            });
            let results = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{ctx}: the audit hangs"))
                .unwrap_or_else(|e| panic!("{ctx}: the record does not open: {e}"));
            let name = path.strip_prefix(&record).unwrap().display().to_string();
            for (label, v) in results {
                let v = v.unwrap_or_else(|e| panic!("{ctx}: {label}: could not decide: {e}"));
                assert_invalid(&v, &name, "", &format!("{ctx}: {label}"));
            }
        }
    }
}

/// A trainer that committed a state for a step which, replayed from the agreed state, overflows
/// (no honest machine could have computed that step): `diverged` at the step, with a report and
/// an evidence bundle like any divergence, whose auditor leaf says "did not stay finite", and
/// re-executing the step sides with the auditor.
#[test]
fn a_step_that_cannot_stay_finite_is_a_dispute_with_its_evidence() {
    use auditor::evidence::{NOT_FINITE_STATE, Side, adjudicate};
    use engine::record::RecordWriter;
    use engine::train::{Run, StepMode};
    let dir = scratch("not-finite");
    let cfg = support::config("[optimizer]\nkind = \"sgd\"\nlr = 1e30\nmomentum = 0.99\nweight_decay = 0.0");
    let run = Run::from_config(&cfg, None, Profile::Cpu, 3).unwrap();
    let out = dir.join("record");
    let mut w = RecordWriter::create(&out, &run.spec).unwrap();
    let mut state = run.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    let mut t = 1;
    loop {
        match run.step(&state, t, StepMode::Commit { paper: false }, None) {
            Ok(o) => {
                w.commit_step(&o.state, &o.log, &o.batch).unwrap();
                state = o.state;
                t += 1;
            }
            Err(e) => {
                assert!(e.is_overflow(), "{e}");
                break;
            }
        }
    }
    // Step t overflows: the trainer commits a made-up state for it and signs the root.
    let mut made_up = state.clone();
    made_up.step = t;
    w.commit_step(&made_up, &TieBreakLog::default(), &run.batch_indices(t)).unwrap();
    w.finish(&made_up, &SigningKey::from_bytes(&[7; 32])).unwrap();

    let src = LocalRecord::open(&out).unwrap();
    let a = audit(&src, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    match &a.verdict {
        Verdict::Diverged { step, detail: Some(d), .. } if *step == t => {
            assert!(d.contains("does not stay finite"), "{d}")
        }
        v => panic!("{v:?}"),
    }
    let bisection = a.bisection.expect("bisected");
    assert_eq!(bisection.first_differing_leaf, Some(t), "the bisection lands on the step too: {bisection:?}");
    let detail = a.detail.as_ref().expect("the report names the disputed step");
    assert_eq!(detail.auditor_leaf.state, NOT_FINITE_STATE);
    assert!(matches!(&detail.state, Some(StateComparison::Unavailable(why)) if why.contains("did not stay finite")));
    let ev = a.evidence.as_ref().expect("an evidence bundle");
    let report = auditor::report::Report::build(&a, &SigningKey::from_bytes(&[3; 32]));
    auditor::report::verify(&report.to_json()).unwrap();
    ev.check_against(&report).unwrap();
    for p in [Profile::Cpu, Profile::CpuSeq, Profile::CpuSplitK] {
        let adj = adjudicate(&auditor::evidence::Evidence::decode(&ev.encode()).unwrap(), p, None).unwrap();
        assert_eq!(adj.reproduces, Side::Auditor, "{p}");
        assert_eq!(adj.computed_leaf, detail.auditor_leaf, "{p}");
    }
}
