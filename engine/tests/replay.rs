//! The property the product rests on: a step committed on one device profile replays
//! bit-identically on every other profile when the replayer follows the trainer's tie-break log.

use common::state::StateHash;
use common::state::TrainingState;
use engine::spec::Config;
use engine::train::{FaultKind, Run, StepMode};
use kernels::Profile;

fn config(model: &str, optimizer: &str) -> Config {
    let text = format!(
        r#"
{model}
[data]
kind = "synthetic"
examples = 256
holdout = 32
features = 64
classes = 4
[train]
batch_size = 16
steps = 6
seed = 11
checkpoint_interval = 2
{optimizer}
"#
    );
    Config::from_toml(&text, "test").unwrap()
}

const MLP: &str = "[model]\nkind = \"mlp\"\nhidden = [32, 16]";
const SGD: &str = "[optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 0.0001";
const ADAMW: &str =
    "[optimizer]\nkind = \"adamw\"\nlr = 0.01\nbeta1 = 0.9\nbeta2 = 0.999\neps = 1e-8\nweight_decay = 0.01";

fn run(cfg: &Config, profile: Profile) -> Run {
    Run::from_config(cfg, None, profile, 6).unwrap()
}

/// Replays a trainer's `steps` on `auditor` with its logs, asserting every state is reproduced
/// bit for bit and no honest entry is called forged.
fn replay_exactly(auditor: &Run, steps: &[(TrainingState, common::tielog::TieBreakLog)], what: &str) {
    let mut state = auditor.initial_state().unwrap();
    for (t, (expected, log)) in steps.iter().enumerate() {
        let o = auditor.step(&state, t as u64 + 1, StepMode::Replay(log), None).unwrap();
        assert!(o.forged.is_empty(), "{what}: honest log flagged: {:?}", o.forged);
        assert_eq!(
            o.state.digest(StateHash::Blake3),
            expected.digest(StateHash::Blake3),
            "{what}: step {} diverged",
            t + 1
        );
        state = o.state;
    }
}

fn train(r: &Run, steps: u64) -> Vec<(TrainingState, common::tielog::TieBreakLog)> {
    let mut state = r.initial_state().unwrap();
    let mut out = Vec::new();
    for t in 1..=steps {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        state = o.state.clone();
        out.push((o.state, o.log));
    }
    out
}

#[test]
fn every_profile_replays_every_other_profiles_steps_bit_identically() {
    for opt in [SGD, ADAMW] {
        let cfg = config(MLP, opt);
        for trainer in Profile::CPU {
            let steps = train(&run(&cfg, trainer), 6);
            for auditor in Profile::CPU {
                replay_exactly(&run(&cfg, auditor), &steps, &format!("trainer {trainer} auditor {auditor}"));
            }
        }
    }
}

/// A batch of one: every weight gradient is a sum of one product, `−0` on some machines when
/// an input is negative and the unit's gradient is zero (an inactive ReLU), unless the sum
/// starts from `+0`; with plain SGD (no momentum, no weight decay) a `−0` reaches the state.
/// Every profile must give `+0` there: an honest `cpu-seq` run was accused at step 5 on `cpu`
/// before the fast profiles' products mapped `−0` to `+0`.
#[test]
fn a_batch_of_one_replays_on_every_profile() {
    let plain_sgd = "[optimizer]\nkind = \"sgd\"\nlr = 0.01\nmomentum = 0.0\nweight_decay = 0.0";
    for opt in [plain_sgd, ADAMW] {
        let mut cfg = config(MLP, opt);
        cfg.train.batch_size = 1;
        for trainer in Profile::CPU {
            let steps = train(&run(&cfg, trainer), 6);
            for auditor in Profile::CPU {
                replay_exactly(&run(&cfg, auditor), &steps, &format!("batch 1: trainer {trainer} auditor {auditor}"));
            }
        }
    }
}

#[test]
fn only_a_tiny_fraction_of_rounded_values_is_logged() {
    // The log is what makes replay exact: count how many entries the trainer needed against
    // how many values it rounded (the paper's dense log covers every one of them).
    let cfg = config(MLP, SGD);
    let r = run(&cfg, Profile::Cpu);
    let mut state = r.initial_state().unwrap();
    let (mut entries, mut values) = (0usize, 0u64);
    for t in 1..=6 {
        let o = r.step(&state, t, StepMode::Commit { paper: true }, None).unwrap();
        entries += o.log.n_entries();
        values += o.paper.unwrap().n_values();
        state = o.state;
    }
    assert!(values > 50_000, "{values}");
    assert!((entries as f64) < 1e-3 * values as f64, "{entries} entries for {values} values");
}

#[test]
fn forged_log_is_caught_on_replay_and_other_faults_change_the_state() {
    let cfg = config(MLP, SGD);
    let r = run(&cfg, Profile::CpuSeq);
    let s0 = r.initial_state().unwrap();
    let honest = r.step(&s0, 1, StepMode::Commit { paper: false }, None).unwrap();
    for kind in FaultKind::ALL {
        let bad = r.step(&s0, 1, StepMode::Commit { paper: false }, Some(kind)).unwrap();
        let auditor = run(&cfg, Profile::CpuSplitK);
        let replay = auditor.step(&s0, 1, StepMode::Replay(&bad.log), None);
        match kind {
            FaultKind::ForgeLog => {
                let replay = replay.unwrap();
                assert_eq!(replay.forged.len(), 1, "{:?}", replay.forged);
                assert!(replay.forged[0].to_string().contains("forged tie-break"), "{}", replay.forged[0]);
                assert_eq!(bad.state.digest(StateHash::Blake3), honest.state.digest(StateHash::Blake3));
                assert_eq!(replay.state.digest(StateHash::Blake3), honest.state.digest(StateHash::Blake3));
            }
            FaultKind::SwapBatch => {
                assert_ne!(bad.batch, honest.batch);
                assert_ne!(bad.state.digest(StateHash::Blake3), honest.state.digest(StateHash::Blake3));
            }
            _ => {
                assert_ne!(
                    bad.state.digest(StateHash::Blake3),
                    honest.state.digest(StateHash::Blake3),
                    "{kind:?} left the state unchanged"
                );
                // The honest replay does not reproduce the faulty state.
                assert_eq!(
                    replay.unwrap().state.digest(StateHash::Blake3),
                    honest.state.digest(StateHash::Blake3),
                    "{kind:?}"
                );
            }
        }
    }
}

#[test]
fn training_learns_the_synthetic_task() {
    let cfg = config(MLP, SGD);
    let r = run(&cfg, Profile::Cpu);
    let mut state = r.initial_state().unwrap();
    let before = r.evaluate(&state, 32).unwrap();
    let mut losses = Vec::new();
    for t in 1..=30 {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        losses.push(o.loss);
        state = o.state;
    }
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[25..].iter().sum::<f32>() / 5.0;
    assert!(last < 0.75 * first, "training loss {first} -> {last}");
    let after = r.evaluate(&state, 32).unwrap();
    assert!(after.accuracy.unwrap() > 0.6 && before.accuracy.unwrap() < 0.5, "chance is 0.25: {before:?} -> {after:?}");
}

#[test]
fn steps_are_independent_of_the_thread_count() {
    // A resumed run must reproduce its logs, so nothing in a step may depend on how many
    // threads the kernels get.
    let cfg = config(MLP, ADAMW);
    let digests = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            train(&run(&cfg, Profile::Cpu), 3)
                .iter()
                .map(|(s, l)| (s.digest(StateHash::Blake3), l.digest()))
                .collect::<Vec<_>>()
        })
    };
    let one = digests(1);
    assert_eq!(one, digests(2));
    assert_eq!(one, digests(3));
}

/// Every model kind the presets and graphs offer, small, with its data: MLP (SGD, ADAMW) on
/// the synthetic task; a CNN on 8×8 images; a GPT with dropout on text; a transformer graph
/// and a residual CNN graph with batch norm, tanh, sigmoid and an MSE loss.
fn every_model() -> Vec<(&'static str, (Config, Option<engine::data::Dataset>))> {
    use engine::data::Dataset;
    let mlp = |opt| (config(MLP, opt), None);
    let mut cnn = config("[model]\nkind = \"cnn\"\nchannels = [3, 4]", ADAMW);
    cnn.train.batch_size = 4;
    let images = Dataset::synthetic(256, 32, 64, 4, 11).with_input_shape(vec![1, 8, 8]).unwrap();
    // The GPT trains on text: its config names text data from the start (a spec must agree).
    let gpt = Config::from_toml(
        &format!(
            "[model]\nkind = \"gpt\"\nlayers = 1\nd_model = 16\nheads = 2\ncontext = 8\ndropout = 0.1\n\
             [data]\nkind = \"text\"\nholdout_fraction = 0.1\n\
             [train]\nbatch_size = 3\nsteps = 6\nseed = 11\ncheckpoint_interval = 2\n{ADAMW}"
        ),
        "test",
    )
    .unwrap();
    let text = b"to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer".repeat(4);
    let words = Dataset::text(text, 8, 0.1).unwrap();
    // Graphs: a transformer (multi-head attention, dropout, embeddings) on the same text, and
    // a residual CNN with batch norm, tanh, sigmoid and an MSE loss on the images.
    let mut graph_gpt = gpt.clone();
    graph_gpt.model = engine::graph::presets::transformer(8, 16, 2, 1, 0.1).into();
    let mut resnet = engine::graph::presets::resnet(&[3, 4], 1, 1);
    // The synthetic task's 64 features, read as an 8×8 image by the graph itself.
    resnet.nodes[0].inputs = vec!["img".into()];
    resnet.nodes.insert(0, node("img", engine::graph::Op::Reshape { shape: vec![1, 8, 8] }, "x"));
    let n = resnet.nodes.len();
    resnet.nodes[n - 1].op = engine::graph::Op::Mse {};
    resnet.nodes.insert(n - 1, node("sig", engine::graph::Op::Sigmoid {}, "head"));
    resnet.nodes[n].inputs[0] = "sig".into();
    resnet.nodes.insert(n - 2, node("squash", engine::graph::Op::Tanh {}, "pool"));
    resnet.nodes[n - 1].inputs[0] = "squash".into();
    let mut graph_cnn = config(MLP, ADAMW);
    graph_cnn.train.batch_size = 4;
    graph_cnn.model = resnet.into();
    vec![
        ("mlp/sgd", mlp(SGD)),
        ("mlp/adamw", mlp(ADAMW)),
        ("cnn", (cnn, Some(images))),
        ("gpt", (gpt, Some(words.clone()))),
        ("graph/transformer", (graph_gpt, Some(words))),
        ("graph/resnet", (graph_cnn, None)),
    ]
}

/// Trains 3 steps of every model on `trainer` and replays them on `auditor`, and the other way
/// round: every state bit-identical, no honest entry called forged.
fn both_ways(trainer: &kernels::Device, auditor: &kernels::Device, label: &str) {
    use engine::data::Dataset;
    use engine::spec::RunSpec;
    for (model, (cfg, data)) in every_model() {
        let data = data.unwrap_or_else(|| Dataset::for_config(&cfg, None).unwrap());
        let on = |device: kernels::Device| {
            let cfg = cfg.clone().with_planned_steps(3, data.n_train() as u64);
            let spec = RunSpec::new(cfg, data.commitment(), device.profile().name(), 3);
            Run::new(spec, data.clone(), device).unwrap()
        };
        for (t, a) in [(trainer, auditor), (auditor, trainer)] {
            let what = format!("{model}: {} → {} ({label})", t.profile(), a.profile());
            replay_exactly(&on(a.clone()), &train(&on(t.clone()), 3), &what);
        }
        println!("{model}: {} ↔ {label}: 3 steps each way bit-identical", trainer.profile());
    }
}

/// The pair a default audit uses, `cpu` and `cpu-alt` (`Profile::auditor_default`), replays
/// each other's steps bit-identically for every model kind, presets and graphs.
#[test]
fn cpu_and_cpu_alt_replay_each_others_steps_for_every_model() {
    assert_eq!(Profile::auditor_default(Some(Profile::Cpu)), Profile::CpuAlt);
    assert_eq!(Profile::auditor_default(Some(Profile::CpuAlt)), Profile::Cpu);
    let cpu = kernels::Device::new(Profile::Cpu).unwrap();
    let alt = kernels::Device::new(Profile::CpuAlt).unwrap();
    both_ways(&cpu, &alt, "cpu-alt");
}

/// The `cuda` profile's code path replays CPU-trained steps of every model kind bit-identically,
/// and a CPU replays its steps: on the host emulation of the profile (its kernels compiled for
/// the host; needs a C compiler) and on the real GPU where one is present.
#[cfg(feature = "cuda")]
#[test]
fn cuda_profile_and_cpu_replay_each_others_steps_for_every_model() {
    use kernels::Device;

    let mut gpus: Vec<(&str, Device)> = Vec::new();
    match Device::cuda_emulated() {
        Ok(d) => gpus.push(("cuda (host emulation)", d)),
        Err(e) => println!("skipped the emulation: {e}"),
    }
    match Device::new(Profile::Cuda) {
        Ok(d) => gpus.push(("cuda", d)),
        Err(e) => println!("no GPU: {e}"),
    }
    let cpu = Device::new(Profile::Cpu).unwrap();
    for (gpu_name, gpu) in &gpus {
        both_ways(&cpu, gpu, gpu_name);
    }
}

fn node(name: &str, op: engine::graph::Op, input: &str) -> engine::graph::Node {
    engine::graph::Node { name: name.into(), inputs: vec![input.into()], op }
}

/// A cosine schedule with warm-up changes the run (its states differ from a constant rate's)
/// and replays bit-identically on every other profile: the factor is computed from basic
/// operations only, the same on every machine.
#[test]
fn a_scheduled_learning_rate_replays_on_every_profile() {
    let plain = config(MLP, SGD);
    let text = format!(
        "{MLP}\n[data]\nkind = \"synthetic\"\nexamples = 256\nholdout = 32\nfeatures = 64\nclasses = 4\n\
         [train]\nbatch_size = 16\nsteps = 6\nseed = 11\ncheckpoint_interval = 2\n{SGD}\n\
         [schedule]\nkind = \"cosine\"\nwarmup_steps = 2\nmin_ratio = 0.1\n"
    );
    let scheduled = Config::from_toml(&text, "cosine").unwrap();
    let trained = train(&run(&scheduled, Profile::Cpu), 6);
    let constant = train(&run(&plain, Profile::Cpu), 6);
    assert_ne!(
        trained[0].0.digest(StateHash::Blake3),
        constant[0].0.digest(StateHash::Blake3),
        "warm-up starts at a smaller rate"
    );
    for p in [Profile::CpuSeq, Profile::CpuSplitK] {
        replay_exactly(&run(&scheduled, p), &trained, &format!("cosine on {p:?}"));
    }
    // A schedule the run cannot follow is refused, naming the field.
    let bad = text.replace("warmup_steps = 2", "warmup_steps = 7");
    let e = Config::from_toml(&bad, "cosine").unwrap_err().to_string();
    assert!(e.contains("schedule.warmup_steps"), "{e}");
}
