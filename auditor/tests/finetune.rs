//! Fine-tunes: a run that starts from committed weights (exported from an earlier run) audits
//! `consistent` on every other profile and in every mode, locally and through the record
//! server; starting weights that are not the committed file, or a leaf 0 that does not follow
//! them, are adverse verdicts naming the file or the step, and adjudication settles step 0.

mod support;

use common::state::StateHash;
use std::path::{Path, PathBuf};

use auditor::evidence::{Side, adjudicate};
use auditor::http::{HttpTrainer, RetryPolicy};
use auditor::{AuditOptions, LocalRecord, Mode, NoProgress, SpotPick, Verdict, audit, audit_dir};
use common::leaf::Leaf;
use engine::init::INIT_WEIGHTS_FILE;
use engine::record::{Record, RecordWriter, SigningKey};
use engine::train::{Run, StepMode};
use kernels::Profile;
use support::{Drill, SGD, config, place, scratch, start_trainer, write_record};
use trainer_agent::{Session, SessionOptions};

/// Trains a base run, exports its final parameters, and fine-tunes from them with another seed
/// (so other data order and, for synthetic data, other examples): the fine-tune's record.
fn fine_tune(dir: &Path) -> (PathBuf, PathBuf) {
    let base = write_record(&dir.join("base"), Profile::Cpu, SGD, Drill::default());
    let rec = Record::open(&base).unwrap();
    let weights = dir.join("base.safetensors");
    std::fs::write(&weights, trainer_agent::export::safetensors_bytes(&rec.checkpoint(rec.n_steps()).unwrap()))
        .unwrap();
    let mut cfg = config(SGD);
    cfg.train.seed = 99;
    let out = dir.join("tuned");
    let opts = SessionOptions {
        config: cfg,
        data: None,
        out: out.clone(),
        device: Profile::Cpu,
        steps: None,
        resume: false,
        faults: Vec::new(),
        key: Some(dir.join("trainer.key")),
        init_weights: Some(weights.clone()),
    };
    let mut s = Session::create(&opts).unwrap();
    while s.next_step().is_some() {
        s.step().unwrap();
    }
    s.finish().unwrap();
    (out, weights)
}

#[test]
fn an_honest_fine_tune_audits_consistent_on_every_profile_and_mode() {
    let dir = scratch("finetune-honest");
    let (record, weights) = fine_tune(&dir);
    let spec = Record::open(&record).unwrap().spec().clone();
    let committed = spec.init_weights.clone().expect("the spec commits to the starting weights");
    assert_eq!(committed, engine::init::WeightsCommitment::of(&std::fs::read(&weights).unwrap()));
    assert_eq!(std::fs::read(record.join(INIT_WEIGHTS_FILE)).unwrap(), std::fs::read(&weights).unwrap());
    // Not the seed's initialisation: the initial state is the exported weights.
    let seeded = Run::from_config(&spec.config, None, Profile::Cpu, spec.n_steps).unwrap().initial_state().unwrap();
    assert_ne!(Leaf::initial(seeded.digest(StateHash::Blake3)), Record::open(&record).unwrap().leaves()[0]);

    for device in [Profile::CpuSeq, Profile::CpuSplitK] {
        for mode in [Mode::Full, Mode::Intervals, Mode::Spot { count: 2, pick: SpotPick::LargestUpdates }] {
            let a = audit_dir(&record, &AuditOptions { mode, ..AuditOptions::new(device) }, &NoProgress).unwrap();
            assert_eq!(a.verdict, Verdict::Consistent, "{device:?} {mode:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fine_tune_audits_through_the_record_server_without_a_copy_of_the_weights() {
    let dir = scratch("finetune-http");
    let (record, weights) = fine_tune(&dir);
    std::fs::remove_file(&weights).unwrap();
    place(&record, &dir.join("records"), "tuned");
    let trainer = start_trainer(&dir.join("records"), None).await;
    let url = trainer.url.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let src = HttpTrainer::new(&url, "tuned", None, RetryPolicy::default(), rt.handle().clone()).unwrap();
        audit(&src, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap().verdict
    })
    .await
    .unwrap();
    assert_eq!(verdict, Verdict::Consistent);
    trainer.stop().await;
}

#[test]
fn starting_weights_that_are_not_the_committed_file_are_convicted_naming_it() {
    let dir = scratch("finetune-tampered");
    let (record, _) = fine_tune(&dir);
    let path = record.join(INIT_WEIGHTS_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    for mode in [Mode::Full, Mode::Intervals] {
        let a = audit_dir(&record, &AuditOptions { mode, ..AuditOptions::new(Profile::CpuSeq) }, &NoProgress).unwrap();
        match &a.verdict {
            Verdict::CommitmentInvalid { file: Some(f), what, .. } => {
                assert_eq!(f, INIT_WEIGHTS_FILE, "{what}");
                assert!(what.contains("starting weights"), "{what}");
            }
            v => panic!("{mode:?}: {v:?}"),
        }
    }
    std::fs::remove_file(&path).unwrap();
    let a = audit_dir(&record, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    assert!(
        matches!(&a.verdict, Verdict::CommitmentInvalid { file: Some(f), .. } if f == INIT_WEIGHTS_FILE),
        "a withheld weights file: {:?}",
        a.verdict
    );
}

/// A trainer that declares starting weights but commits another initial state diverges at
/// step 0; the evidence bundle carries the weights, and adjudication sides with the auditor.
#[test]
fn a_leaf_zero_that_does_not_follow_the_weights_diverges_and_adjudicates() {
    let dir = scratch("finetune-leaf0");
    let (honest, weights) = fine_tune(&dir);
    let spec = Record::open(&honest).unwrap().spec().clone();
    let bytes = std::fs::read(&weights).unwrap();
    let mut run = Run::new(
        spec.clone(),
        engine::data::Dataset::for_config(&spec.config, None).unwrap(),
        kernels::Device::new(Profile::Cpu).unwrap(),
    )
    .unwrap();
    run.load_init_weights(&bytes).unwrap();
    let out = dir.join("liar");
    let mut w = RecordWriter::create(&out, &spec).unwrap();
    w.store_init_weights(&bytes).unwrap();
    let mut state = run.initial_state().unwrap();
    let name = state.tensors().find(|(n, _)| n.starts_with("param/")).unwrap().0.to_string();
    state.get_mut(&name).unwrap().data[0] += 0.25;
    w.commit_initial(&state).unwrap();
    for t in 1..=spec.n_steps {
        let o = run.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[7; 32])).unwrap();

    let src = LocalRecord::open(&out).unwrap();
    let a = audit(&src, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    assert!(matches!(a.verdict, Verdict::Diverged { step: 0, .. }), "{:?}", a.verdict);
    let ev = a.evidence.expect("a bundle for step 0");
    assert_eq!(ev.prev_state, bytes, "the bundle carries the starting weights");
    let decoded = auditor::evidence::Evidence::decode(&ev.encode()).unwrap();
    let adj = adjudicate(&decoded, Profile::CpuSplitK, None).unwrap();
    assert_eq!(adj.reproduces, Side::Auditor);
}

/// A GPT trained on one text, exported (with its vocabulary) and fine-tuned on another with a
/// cosine schedule, global-norm clipping and gradient accumulation: `consistent` on every
/// other profile and in every mode.
#[test]
fn a_gpt_fine_tune_with_a_schedule_clipping_and_accumulation_audits_consistent() {
    let dir = scratch("finetune-gpt");
    let (a, b) = (dir.join("a.txt"), dir.join("b.txt"));
    std::fs::write(&a, "the quality of mercy is not strained; it droppeth as the gentle rain. ".repeat(6)).unwrap();
    // Other text over the same characters (the vocabulary, and so the weights' shapes, agree).
    std::fs::write(&b, "it droppeth as the gentle rain; the quality of mercy is not strained. ".repeat(6)).unwrap();
    let text = |steps: u64, extra: &str| {
        engine::spec::Config::from_toml(
            &format!(
                "[model]\nkind = \"gpt\"\nlayers = 1\nd_model = 16\nheads = 2\ncontext = 8\ndropout = 0.1\n\
                 [data]\nkind = \"text\"\nholdout_fraction = 0.1\n\
                 [train]\nbatch_size = 4\nsteps = {steps}\nseed = 5\ncheckpoint_interval = 4\n{extra}\n\
                 [optimizer]\nkind = \"adamw\"\nlr = 0.003\nbeta1 = 0.9\nbeta2 = 0.99\neps = 1e-8\n"
            ),
            "gpt.toml",
        )
        .unwrap()
    };
    let train = |cfg: engine::spec::Config, data: &Path, out: &str, init: Option<PathBuf>| {
        let opts = SessionOptions {
            config: cfg,
            data: Some(data.to_path_buf()),
            out: dir.join(out),
            device: Profile::Cpu,
            steps: None,
            resume: false,
            faults: Vec::new(),
            key: Some(dir.join("trainer.key")),
            init_weights: init,
        };
        let mut s = Session::create(&opts).unwrap();
        while s.next_step().is_some() {
            s.step().unwrap();
        }
        s.finish().unwrap();
        dir.join(out)
    };
    let base = train(text(6, ""), &a, "base", None);
    let weights = dir.join("base.safetensors");
    let opts = trainer_agent::export::ExportOptions { record: &base, out: &weights, step: None, data: Some(&a) };
    trainer_agent::export::export(&opts).unwrap();
    let mut tuned_cfg = text(8, "clip_norm = 0.5\naccumulate = 2");
    tuned_cfg.train.seed = 17;
    tuned_cfg.schedule =
        toml::from_str::<engine::schedule::Schedule>("kind = \"cosine\"\nwarmup_steps = 2\nmin_ratio = 0.1").unwrap();
    let tuned = train(tuned_cfg, &b, "tuned", Some(weights));
    let spec = Record::open(&tuned).unwrap().spec().clone();
    assert!(spec.init_weights.is_some() && spec.config.train.clip_norm == Some(0.5));
    for device in [Profile::CpuSeq, Profile::CpuSplitK] {
        for mode in [Mode::Full, Mode::Intervals, Mode::Spot { count: 1, pick: SpotPick::LargestUpdates }] {
            let o = AuditOptions { mode, data: Some(b.clone()), ..AuditOptions::new(device) };
            let a = audit_dir(&tuned, &o, &NoProgress).unwrap();
            assert_eq!(a.verdict, Verdict::Consistent, "{device:?} {mode:?}");
        }
    }
}
