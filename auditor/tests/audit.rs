//! End-to-end audits of records written by the engine: every fault kind at step 1, at a
//! checkpoint boundary and at the last step; honest records across every pair of profiles;
//! corrupted records; the bisection bound; reports, evidence and adjudication.

mod support;

use std::path::Path;

use auditor::evidence::{Evidence, Side, adjudicate};
use auditor::replay::SeedChoice;
use auditor::report::{Report, verify};
use auditor::{Audit, AuditOptions, Mode, NoProgress, SpotPick, Verdict, audit_dir};
use common::leaf::Leaf;
use common::merkle::ProvenLeaf;
use engine::record::{Record, SigningKey};
use engine::train::{Fault, FaultKind};
use kernels::Profile;
use support::{ADAMW, Drill, INTERVAL, SGD, STEPS, copy_dir, scratch, write_record};

fn opts(device: Profile, mode: Mode) -> AuditOptions {
    AuditOptions { mode, ..AuditOptions::new(device) }
}

fn run_audit(record: &Path, device: Profile, mode: Mode) -> Audit {
    audit_dir(record, &opts(device, mode), &NoProgress).unwrap()
}

/// ⌈log₂ n⌉ + 1, computed independently of `common::merkle`.
fn query_bound(n: u64) -> u32 {
    let mut c = 0;
    while (1u64 << c) < n {
        c += 1;
    }
    c + 1
}

fn expect_step_verdict(a: &Audit, kind: FaultKind, step: u64, ctx: &str) {
    match (&a.verdict, kind) {
        (Verdict::ForgedLog { step: s, site, index, value, bound, .. }, FaultKind::ForgeLog) => {
            assert_eq!(*s, step, "{ctx}: {:?}", a.verdict);
            assert!(site.starts_with("opt/") && site.ends_with("/param"), "{ctx}: {site}");
            assert!(index.is_some() && value.is_some() && bound.is_some(), "{ctx}: {:?}", a.verdict);
        }
        (Verdict::Diverged { step: s, .. }, k) if k != FaultKind::ForgeLog => assert_eq!(*s, step, "{ctx}"),
        (v, _) => panic!("{ctx}: unexpected verdict {v:?}"),
    }
    let b = a.bisection.expect("bisection ran");
    let n = a.commitment.as_ref().unwrap().n_leaves;
    assert!(b.queries <= query_bound(n), "{ctx}: {} queries for {n} leaves", b.queries);
    if kind == FaultKind::ForgeLog {
        assert_eq!(b.first_differing_leaf, None, "{ctx}");
        assert_eq!(b.queries, 0, "{ctx}: equal roots need no query");
    } else {
        assert_eq!(b.first_differing_leaf, Some(step), "{ctx}");
        assert!(b.queries >= 1, "{ctx}");
    }
    let d = a.detail.as_ref().expect("step detail");
    assert_eq!(d.step, step);
    assert_eq!(d.previous.as_ref().map(|p| p.leaf.step), Some(step - 1));
    assert!(a.evidence.is_some());
}

#[test]
fn every_fault_kind_at_step_one_a_checkpoint_and_the_last_step_gets_the_exact_verdict() {
    let dir = scratch("faults");
    for kind in FaultKind::ALL {
        for step in [1, INTERVAL, STEPS] {
            let d = dir.join(format!("{}-{step}", kind.name()));
            let record =
                write_record(&d, Profile::Cpu, SGD, Drill { fault: Some(Fault { kind, step }), ..Drill::default() });
            let ctx = format!("{} at {step}", kind.name());
            let a = run_audit(&record, Profile::CpuSeq, Mode::Full);
            expect_step_verdict(&a, kind, step, &format!("{ctx} (full)"));
            // Interval-parallel replay reaches the same verdict.
            let b = run_audit(&record, Profile::CpuSplitK, Mode::Intervals);
            expect_step_verdict(&b, kind, step, &format!("{ctx} (intervals)"));
            assert_eq!(a.verdict, b.verdict, "{ctx}");
            assert_eq!(a.detail.as_ref().unwrap().trainer.leaf, b.detail.as_ref().unwrap().trainer.leaf);
            std::fs::remove_dir_all(&d).unwrap();
        }
    }
}

#[test]
fn an_initial_state_that_does_not_follow_the_seed_diverges_at_step_zero() {
    let dir = scratch("bad-init");
    let record = write_record(&dir, Profile::Cpu, SGD, Drill { bad_init: true, ..Drill::default() });
    let a = run_audit(&record, Profile::CpuSeq, Mode::Full);
    assert!(matches!(a.verdict, Verdict::Diverged { step: 0, .. }), "{:?}", a.verdict);
    assert_eq!(a.bisection.unwrap().first_differing_leaf, Some(0));
    let ev = a.evidence.unwrap();
    assert!(ev.previous.is_none());
    assert_eq!(adjudicate(&ev, Profile::CpuSplitK, None).unwrap().reproduces, Side::Auditor);
}

#[test]
fn honest_records_from_every_profile_are_consistent_on_every_other_profile() {
    let dir = scratch("honest");
    for (i, opt) in [SGD, ADAMW].into_iter().enumerate() {
        for trainer in Profile::CPU {
            let record = write_record(&dir.join(format!("{i}-{trainer}")), trainer, opt, Drill::default());
            for auditor in Profile::CPU.into_iter().filter(|&p| p != trainer) {
                for mode in [Mode::Full, Mode::Intervals] {
                    let a = run_audit(&record, auditor, mode);
                    assert_eq!(a.verdict, Verdict::Consistent, "trainer {trainer}, auditor {auditor}, {mode:?}");
                    assert_eq!(a.steps_replayed, STEPS);
                    assert_eq!(a.bisection.unwrap().queries, 0);
                }
            }
        }
    }
}

#[test]
fn intervals_cover_the_record_and_spot_checks_pick_the_faulty_interval() {
    let dir = scratch("modes");
    let record = write_record(
        &dir,
        Profile::Cpu,
        SGD,
        Drill { fault: Some(Fault { kind: FaultKind::ScaleLr, step: 6 }), ..Drill::default() },
    );
    let a = run_audit(&record, Profile::CpuSeq, Mode::Intervals);
    assert_eq!(a.intervals, vec![(0, 4), (4, 8), (8, 12), (12, 13)]);
    assert!(matches!(a.verdict, Verdict::Diverged { step: 6, .. }));
    // A spot check of every interval finds it too; a seeded draw is reproducible.
    let all = run_audit(
        &record,
        Profile::CpuSeq,
        Mode::Spot { count: 4, pick: SpotPick::Random { seed: 1, chosen: SeedChoice::Given } },
    );
    assert!(matches!(all.verdict, Verdict::Diverged { step: 6, .. }));
    let one = |seed| {
        run_audit(
            &record,
            Profile::CpuSeq,
            Mode::Spot { count: 1, pick: SpotPick::Random { seed, chosen: SeedChoice::Given } },
        )
    };
    assert_eq!(one(3).intervals, one(3).intervals);
    assert_eq!(one(3).intervals.len(), 1);
    let picked: std::collections::BTreeSet<_> = (0..16).map(|s| one(s).intervals[0]).collect();
    assert!(picked.len() > 1, "the draw depends on the seed");
    for s in 0..16 {
        let a = one(s);
        let expected_diverged = a.intervals[0] == (4, 8);
        assert_eq!(!a.verdict.is_consistent(), expected_diverged, "seed {s}: {:?} {:?}", a.intervals, a.verdict);
    }
    // The 10× learning rate is the largest update: proof-of-learning's rule picks its interval.
    let largest = run_audit(&record, Profile::CpuSeq, Mode::Spot { count: 1, pick: SpotPick::LargestUpdates });
    assert_eq!(largest.intervals, vec![(4, 8)]);
    assert!(matches!(largest.verdict, Verdict::Diverged { step: 6, .. }));
}

#[test]
fn a_segment_is_replayed_from_the_checkpoint_before_it() {
    let dir = scratch("segment");
    let record = write_record(
        &dir,
        Profile::CpuSplitK,
        SGD,
        Drill { fault: Some(Fault { kind: FaultKind::PerturbWeight, step: 10 }), ..Drill::default() },
    );
    let seg = |from, to| {
        audit_dir(
            &record,
            &AuditOptions { from: Some(from), to: Some(to), ..AuditOptions::new(Profile::Cpu) },
            &NoProgress,
        )
        .unwrap()
    };
    let a = seg(6, 9);
    assert_eq!(a.verdict, Verdict::Consistent);
    assert_eq!(a.intervals, vec![(4, 9)]);
    assert_eq!(a.steps_replayed, 5);
    assert!(matches!(seg(9, 11).verdict, Verdict::Diverged { step: 10, .. }));
    assert!(
        audit_dir(
            &record,
            &AuditOptions { from: Some(5), to: Some(99), ..AuditOptions::new(Profile::Cpu) },
            &NoProgress
        )
        .is_err()
    );
}

#[test]
fn an_unfinished_run_is_audited_against_the_root_over_its_leaves() {
    let dir = scratch("unfinished");
    let record = write_record(&dir, Profile::Cpu, SGD, Drill { unfinished: true, ..Drill::default() });
    let a = run_audit(&record, Profile::CpuSeq, Mode::Full);
    assert_eq!(a.verdict, Verdict::Consistent);
    let r = Report::build(&a, &SigningKey::from_bytes(&[3; 32]));
    assert!(!r.trainer_root_signed);
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

fn truncate(path: &Path, by: usize) {
    let b = std::fs::read(path).unwrap();
    std::fs::write(path, &b[..b.len() - by]).unwrap();
}

fn expect_invalid(record: &Path, file: &str, ctx: &str) {
    for mode in [Mode::Full, Mode::Intervals] {
        let a = run_audit(record, Profile::CpuSeq, mode);
        match &a.verdict {
            Verdict::CommitmentInvalid { file: Some(f), .. } => assert_eq!(f, file, "{ctx}: {:?}", a.verdict),
            v => panic!("{ctx}: expected commitment-invalid naming {file}, got {v:?}"),
        }
    }
}

/// A way to damage one file of a record.
type Damage = Box<dyn Fn(&Path)>;

#[test]
fn corrupted_records_are_commitment_invalid_naming_the_file() {
    let base = scratch("corrupt");
    let honest = write_record(&base.join("honest"), Profile::Cpu, SGD, Drill::default());
    let cases: Vec<(&str, Damage)> = vec![
        ("checkpoints/0000000004.state.zst", Box::new(|p| flip(p, 20))),
        ("checkpoints/0000000000.state.zst", Box::new(|p| flip(p, 30))),
        ("checkpoints/0000000013.state.zst", Box::new(|p| truncate(p, 7))),
        ("steps/0000000003.log.zst", Box::new(|p| flip(p, 6))),
        ("steps/0000000013.log.zst", Box::new(|p| truncate(p, 3))),
        ("steps/0000000007.batch", Box::new(|p| flip(p, 6))),
        ("manifest.json", Box::new(|p| flip(p, 40))),
        ("spec.json", Box::new(|p| flip(p, 40))),
        ("leaves.bin", Box::new(|p| truncate(p, 10))),
        ("leaves.bin", Box::new(|p| truncate(p, common::leaf::LEAF_BYTES))),
        ("leaves.bin", Box::new(|p| flip(p, 3 * common::leaf::LEAF_BYTES + 50))),
        ("steps/0000000009.batch", Box::new(|p| std::fs::remove_file(p).unwrap())),
    ];
    for (i, (file, damage)) in cases.iter().enumerate() {
        let copy = base.join(format!("case{i}"));
        copy_dir(&honest, &copy);
        damage(&copy.join(file));
        let expected = if *file == "spec.json" { "manifest.json" } else { file };
        expect_invalid(&copy, expected, &format!("case {i}: {file}"));
    }
}

#[test]
fn a_flipped_byte_anywhere_in_a_record_is_never_consistent_and_never_a_panic() {
    let base = scratch("flip-any");
    let honest = write_record(&base.join("honest"), Profile::CpuSeq, SGD, Drill::default());
    let mut files = Vec::new();
    for sub in ["", "steps", "checkpoints"] {
        for e in std::fs::read_dir(honest.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(p.strip_prefix(&honest).unwrap().to_path_buf());
            }
        }
    }
    files.sort();
    assert!(files.len() > 30, "{files:?}");
    let copy = base.join("copy");
    for f in files {
        let len = std::fs::metadata(honest.join(&f)).unwrap().len() as usize;
        for at in [0, len / 2, len - 1] {
            copy_dir(&honest, &copy);
            flip(&copy.join(&f), at);
            let a = run_audit(&copy, Profile::Cpu, Mode::Full);
            assert!(
                matches!(a.verdict, Verdict::CommitmentInvalid { .. }),
                "{} byte {at}: {:?}",
                f.display(),
                a.verdict
            );
        }
    }
}

fn diverged_audit(name: &str, kind: FaultKind, step: u64) -> Audit {
    let dir = scratch(name);
    let record = write_record(&dir, Profile::Cpu, SGD, Drill { fault: Some(Fault { kind, step }), ..Drill::default() });
    run_audit(&record, Profile::CpuSplitK, Mode::Full)
}

/// Every scalar in a JSON tree, as a path of keys and indices.
fn scalar_paths(v: &serde_json::Value, path: &mut Vec<serde_json::Value>, out: &mut Vec<Vec<serde_json::Value>>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                path.push(k.clone().into());
                scalar_paths(x, path, out);
                path.pop();
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(i.into());
                scalar_paths(x, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn at_mut<'a>(v: &'a mut serde_json::Value, path: &[serde_json::Value]) -> &'a mut serde_json::Value {
    path.iter().fold(v, |v, k| match k {
        serde_json::Value::String(s) => &mut v[s.as_str()],
        serde_json::Value::Number(n) => &mut v[n.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

#[test]
fn a_report_verifies_and_altering_any_field_breaks_it() {
    for (name, kind) in [("report-div", FaultKind::SkipStep), ("report-forged", FaultKind::ForgeLog)] {
        let a = diverged_audit(name, kind, 5);
        let key = SigningKey::from_bytes(&[9; 32]);
        let report = Report::build(&a, &key);
        let text = report.to_json();
        let ok = verify(&text).unwrap();
        assert_eq!(ok.proofs_checked, 2);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["verdict"]["step"], 5);
        assert_eq!(value["verdict"]["kind"], a.verdict.kind().as_str());
        assert_eq!(value["at_step"]["trainer"]["leaf"]["state"].as_str().unwrap().len(), 64);
        let mut paths = Vec::new();
        scalar_paths(&value, &mut Vec::new(), &mut paths);
        assert!(paths.len() > 40, "{}", paths.len());
        for p in &paths {
            let mut v = value.clone();
            let x = at_mut(&mut v, p);
            *x = match x.take() {
                serde_json::Value::String(s) if s.is_empty() => "x".into(),
                serde_json::Value::String(s) => {
                    let mut c: Vec<char> = s.chars().collect();
                    c[0] = if c[0] == '0' { '1' } else { '0' };
                    c.into_iter().collect::<String>().into()
                }
                serde_json::Value::Number(n) if n.is_u64() => (n.as_u64().unwrap() + 1).into(),
                serde_json::Value::Number(n) => (n.as_f64().unwrap() * 1.5 + 1.0).into(),
                serde_json::Value::Bool(b) => (!b).into(),
                _ => 0.into(),
            };
            let altered = serde_json::to_string_pretty(&v).unwrap();
            assert!(verify(&altered).is_err(), "{name}: altering {p:?} went unnoticed");
        }
        // Extra fields and a different signer are refused too.
        let mut v = value.clone();
        v["extra"] = 1.into();
        assert!(verify(&v.to_string()).is_err());
        let other = Report::build(&a, &SigningKey::from_bytes(&[10; 32]));
        let mut v = value.clone();
        v["signature"] = other.signature.clone().into();
        assert!(verify(&v.to_string()).is_err());
    }
}

#[test]
fn evidence_round_trips_canonically_and_rejects_damage() {
    let a = diverged_audit("evidence-codec", FaultKind::FlipLabel, 6);
    let ev = a.evidence.unwrap();
    let bytes = ev.encode();
    assert_eq!(Evidence::decode(&bytes).unwrap(), ev);
    for cut in (0..bytes.len()).step_by(61) {
        assert!(Evidence::decode(&bytes[..cut]).is_err(), "truncated at {cut}");
    }
    for at in (0..bytes.len()).step_by(37) {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        assert!(Evidence::decode(&bad).is_err(), "flip at {at}");
    }
}

#[test]
fn adjudication_reproduces_the_side_that_was_right() {
    for kind in FaultKind::ALL {
        let a = diverged_audit(&format!("adj-{}", kind.name()), kind, 5);
        let ev = a.evidence.unwrap();
        for p in Profile::CPU {
            let adj = adjudicate(&ev, p, None).unwrap();
            assert_eq!(adj.reproduces, Side::Auditor, "{} on {p}: {adj:?}", kind.name());
            assert!(adj.root_signed);
        }
        // A wrong auditor leaf reproduces nobody, unless the trainer's log itself does not
        // hold up: that is found in the trainer's committed bytes, whatever the bundle claims.
        let mut lie = ev.clone();
        lie.auditor_leaf.state = [0xab; 32];
        let adj = adjudicate(&lie, Profile::Cpu, None).unwrap();
        if kind == FaultKind::ForgeLog {
            assert_eq!(adj.reproduces, Side::Auditor, "forged-log bundle with a bogus auditor leaf");
        } else {
            assert_eq!(adj.reproduces, Side::Neither, "{}", kind.name());
        }
        // Nor does the bundle's (unsigned) verdict kind decide: a forged log relabelled as a
        // divergence, or a divergence relabelled as a forged log, sides as before.
        for relabel in [auditor::VerdictKind::Diverged, auditor::VerdictKind::ForgedLog] {
            let relabelled = Evidence { verdict_kind: relabel, ..ev.clone() };
            let adj = adjudicate(&relabelled, Profile::Cpu, None).unwrap();
            assert_eq!(adj.reproduces, Side::Auditor, "{} relabelled {relabel:?}", kind.name());
        }
    }
}

#[test]
fn adjudication_sides_with_an_honest_trainer_against_a_false_accusation() {
    let dir = scratch("false-accusation");
    let record_dir = write_record(&dir, Profile::CpuSeq, ADAMW, Drill::default());
    let rec = Record::open(&record_dir).unwrap();
    let (s, n) = (6u64, rec.tree().len());
    let proven =
        |i: u64| ProvenLeaf { leaf: rec.leaves()[i as usize], proof: rec.tree().inclusion_proof(i, n).unwrap() };
    // The state after step 5: replay from checkpoint 4.
    let run = support::run(&support::config(ADAMW), Profile::Cpu);
    let prev = run
        .step(&rec.checkpoint(4).unwrap(), 5, engine::train::StepMode::Replay(&rec.log(5).unwrap()), None)
        .unwrap()
        .state;
    let trainer = proven(s);
    let ev = Evidence {
        verdict_kind: auditor::VerdictKind::Diverged,
        step: s,
        spec_json: rec.spec_bytes().to_vec(),
        manifest_json: serde_json::to_vec(rec.manifest().unwrap()).unwrap(),
        root: rec.tree().root(),
        n_leaves: n,
        auditor_leaf: Leaf { state: [1; 32], ..trainer.leaf },
        trainer,
        auditor_device: "cpu".into(),
        previous: Some(proven(s - 1)),
        prev_state: prev.encode(),
        trainer_batch: rec.batch(s).unwrap(),
        trainer_log: rec.log(s).unwrap(),
    };
    let ev = Evidence::decode(&ev.encode()).unwrap();
    for p in Profile::CPU {
        assert_eq!(adjudicate(&ev, p, None).unwrap().reproduces, Side::Trainer, "{p}");
    }
    // A bundle whose previous state is not the committed one is refused, not adjudicated.
    let mut bad = ev.clone();
    bad.prev_state = rec.checkpoint(4).unwrap().encode();
    assert!(adjudicate(&bad, Profile::Cpu, None).is_err());
}

/// Steps checked stop at the first finding whatever the thread count: intervals past it that
/// ran in parallel before they learnt of it do not count, so the figure in the report is the
/// same on one thread, on many, and in a fleet.
#[test]
fn steps_checked_stop_at_the_finding_whatever_the_thread_count() {
    let dir = scratch("steps-threads");
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 7 };
    let record = write_record(&dir, Profile::Cpu, SGD, Drill { fault: Some(fault), ..Drill::default() });
    for threads in [1, 4] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let a = pool.install(|| run_audit(&record, Profile::CpuSeq, Mode::Intervals));
        assert!(matches!(a.verdict, Verdict::Diverged { step: 7, .. }), "{threads} threads: {:?}", a.verdict);
        assert_eq!(a.steps_replayed, 7, "{threads} threads: every step up to the finding, none past it");
    }
}
