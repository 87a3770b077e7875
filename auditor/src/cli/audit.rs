//! `auditor audit`: parse the flags into [`AuditOptions`] (every usage error found here, before
//! any replay), run the library's audit, sign the report, print it.

use std::path::PathBuf;

use anyhow::Context;
use auditor::evidence::MAGIC;
use auditor::http::{HttpTrainer, RetryPolicy};
use auditor::replay::SeedChoice;
use auditor::report::{Report, TensorDiffJson};
use auditor::{Audit, AuditOptions, Mode, Progress, SpotPick, TrainerSource, audit, audit_dir};
use clap::ValueEnum;
use engine::output::{OutputKind, write_output};
use engine::record::RecordError;
use kernels::Profile;

use super::exit::{Exit, Failure, undecided, usage};
use super::keys::public_key_arg;
use super::output::{emit, require_exists, writable};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Full,
    Intervals,
    Spot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SpotByArg {
    /// A uniform draw, seeded by `--spot-seed` or by fresh randomness.
    Random,
    /// Proof-of-learning's largest parameter updates between checkpoints.
    LargestUpdate,
}

/// Spot checks replay this many intervals unless `--spot-count` says otherwise.
const SPOT_COUNT_DEFAULT: usize = 4;

/// The most replay threads `--threads` may ask for (each holds a model and its buffers).
const THREADS_MAX: usize = 256;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// A record directory on this machine.
    #[arg(long, required_unless_present = "trainer_url", conflicts_with = "trainer_url")]
    record: Option<PathBuf>,
    /// Or a trainer's record server (`trainer-agent serve`), with `--run`.
    #[arg(long, requires = "run")]
    trainer_url: Option<String>,
    /// The run id on the record server.
    #[arg(long, requires = "trainer_url")]
    run: Option<String>,
    /// Bearer token for the record server.
    #[arg(long, requires = "trainer_url")]
    trainer_token: Option<String>,
    /// A private CA (PEM) an `https://` record server's certificate may chain to, besides the
    /// system's roots.
    #[arg(long, value_name = "PEM", requires = "trainer_url")]
    trainer_ca_file: Option<PathBuf>,
    /// The trainer's ed25519 public key (64 hex digits, or @FILE holding them): a record not
    /// signed by this key is `commitment-invalid`. Without it, any key that signs the record.
    #[arg(long, value_name = "HEX|@FILE")]
    trainer_pubkey: Option<String>,
    /// First step to check (0 also checks the initial state).
    #[arg(long)]
    from: Option<u64>,
    /// Last step to check (default: the last step).
    #[arg(long)]
    to: Option<u64>,
    /// The auditor's device profile (default: `cpu-alt` for a `cpu` trainer, else `cpu`).
    #[arg(long)]
    device: Option<String>,
    #[arg(long, value_enum, default_value = "full")]
    mode: ModeArg,
    /// Intervals to replay in spot mode [default: 4].
    #[arg(long)]
    spot_count: Option<usize>,
    /// How spot mode picks its intervals [default: random].
    #[arg(long, value_enum)]
    spot_by: Option<SpotByArg>,
    /// Seed of a random spot draw, to reproduce one. Without it the auditor draws a fresh seed
    /// from the operating system, so the trainer cannot know the intervals in advance; the seed
    /// and how it was chosen are printed and recorded in the report.
    #[arg(long)]
    spot_seed: Option<u64>,
    /// Dataset files, for specs that are not synthetic.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Replay workers for intervals and spot mode (default: one per core; at most 256). The
    /// verdict does not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// The auditor's ed25519 key (generated if absent).
    #[arg(long, default_value = "auditor.key")]
    key: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Write the report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the evidence bundle (diverged / forged-log only) to this file.
    #[arg(long)]
    evidence: Option<PathBuf>,
}

/// A progress bar on stderr (indicatif hides it when stderr is not a terminal).
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn begin(&self, steps_total: u64) {
        self.0.set_length(steps_total);
    }
    fn replayed(&self, _step: u64, _seconds: f64) {
        self.0.inc(1);
    }
}

/// `name` as given with `flag`, checked to be a profile this build and machine can run: an
/// unknown or unavailable profile is a usage error, found before anything is read.
pub fn device_arg(flag: &str, name: &str) -> Result<Profile, Failure> {
    let profile = name.parse::<Profile>().map_err(|e| usage(format_args!("{flag} {name}: {e}")))?;
    // A CUDA device shares one context per process, so this check costs the audit nothing.
    kernels::Device::new(profile).map_err(|e| usage(format_args!("{flag} {name}: {e}")))?;
    Ok(profile)
}

/// A fast profile other than the trainer's ([`Profile::auditor_default`]), the trainer's read
/// from the record's spec (best effort: if the spec cannot be read, the audit itself reports
/// why).
fn other_profile(spec_bytes: Option<Vec<u8>>) -> Profile {
    let trainer = spec_bytes
        .and_then(|b| serde_json::from_slice::<engine::spec::RunSpec>(&b).ok())
        .and_then(|s| s.device_profile.parse::<Profile>().ok());
    Profile::auditor_default(trainer)
}

/// The mode the flags ask for. Spot flags outside spot mode are refused rather than ignored: a
/// user who wrote `--spot-seed` expects it to matter.
fn mode(args: &AuditArgs) -> Result<Mode, Failure> {
    if args.mode != ModeArg::Spot {
        for (given, flag) in [
            (args.spot_count.is_some(), "--spot-count"),
            (args.spot_by.is_some(), "--spot-by"),
            (args.spot_seed.is_some(), "--spot-seed"),
        ] {
            if given {
                return Err(usage(format_args!("{flag} applies only to --mode spot")));
            }
        }
    }
    Ok(match args.mode {
        ModeArg::Full => Mode::Full,
        ModeArg::Intervals => Mode::Intervals,
        ModeArg::Spot => {
            let count = args.spot_count.unwrap_or(SPOT_COUNT_DEFAULT);
            if count == 0 {
                return Err(usage("--spot-count 0: must be at least 1"));
            }
            let pick = match (args.spot_by.unwrap_or(SpotByArg::Random), args.spot_seed) {
                (SpotByArg::Random, Some(seed)) => SpotPick::Random { seed, chosen: SeedChoice::Given },
                (SpotByArg::Random, None) => SpotPick::Random {
                    seed: SeedChoice::fresh_seed().map_err(|e| undecided(format_args!("{e}")))?,
                    chosen: SeedChoice::Fresh,
                },
                (SpotByArg::LargestUpdate, None) => SpotPick::LargestUpdates,
                (SpotByArg::LargestUpdate, Some(_)) => {
                    return Err(usage("--spot-seed applies only to --spot-by random"));
                }
            };
            Mode::Spot { count, pick }
        }
    })
}

pub fn run(args: AuditArgs) -> Result<Exit, Failure> {
    // Every flag is checked before the first byte of the record is read.
    if let Some(dir) = &args.record {
        require_exists("--record", dir)?;
        if !dir.is_dir() {
            return Err(usage(format_args!("--record {}: not a directory", dir.display())));
        }
    }
    if let Some(data) = &args.data {
        require_exists("--data", data)?;
    }
    outputs_writable(&args)?;
    engine::output::check_key_path(&args.key)
        .map_err(|why| usage(format_args!("--key {}: {why}", args.key.display())))?;
    let trainer_key = args.trainer_pubkey.as_deref().map(|v| public_key_arg("--trainer-pubkey", v)).transpose()?;
    let explicit_device = args.device.as_deref().map(|d| device_arg("--device", d)).transpose()?;
    let mode = mode(&args)?;
    if let Some(n) = args.threads.filter(|n| !(1..=THREADS_MAX).contains(n)) {
        return Err(usage(format_args!("--threads {n}: must be 1 to {THREADS_MAX}")));
    }
    if let (Some(from), Some(to)) = (args.from, args.to)
        && from > to
    {
        return Err(usage(format_args!("--from {from} is after --to {to}")));
    }
    let key = engine::record::load_or_create_key(&args.key).map_err(|e| match e {
        // A key file that is not a key is the user's to fix (it is no record file); failing to
        // write a new one is not.
        RecordError::Corrupt { what, .. } => {
            usage(format_args!("--key {}: not a signing key: {what}", args.key.display()))
        }
        e => Failure::Undecided(anyhow::Error::new(e).context(format!("--key {}", args.key.display()))),
    })?;

    // Over HTTP, requests go through a runtime this thread is not inside (the trait is
    // synchronous; see auditor::http).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let mut policy = RetryPolicy::default();
    if let Some(ca) = &args.trainer_ca_file {
        policy.ca_certs = service::tls::read_ca_file(ca).map_err(|e| usage(format_args!("--trainer-ca-file {e}")))?;
    }
    let remote = match (&args.trainer_url, &args.run) {
        (Some(url), Some(run)) => Some(
            // Every error here is about the URL or the run id as given.
            HttpTrainer::new(url, run, args.trainer_token.clone(), policy, runtime.handle().clone())
                .map_err(|e| usage(format_args!("--trainer-url/--run: {e}")))?,
        ),
        _ => None,
    };
    let device = match explicit_device {
        Some(d) => d,
        None => other_profile(match (&remote, &args.record) {
            (Some(src), _) => src.spec_bytes().ok(),
            // Only to pick the default profile: a spec that cannot be read is the audit's finding.
            (None, Some(dir)) => {
                common::files::read_regular(&dir.join(engine::record::SPEC_FILE), engine::record::JSON_FILE_BYTES_MAX)
                    .ok()
            }
            (None, None) => None,
        }),
    };
    let opts = AuditOptions {
        from: args.from,
        to: args.to,
        mode,
        data: args.data.clone(),
        trainer_key,
        ..AuditOptions::new(device)
    };

    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{spinner} replay [{bar:30}] {pos}/{len} steps {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let progress = Bar(bar);
    let pool = {
        let mut b = rayon::ThreadPoolBuilder::new();
        if let Some(n) = args.threads {
            b = b.num_threads(n);
        }
        b.build().context("starting the replay workers")?
    };
    let (result, what) = match (&remote, &args.record) {
        (Some(src), _) => (pool.install(|| audit(src, &opts, &progress)), src.describe()),
        (None, Some(dir)) => (pool.install(|| audit_dir(dir, &opts, &progress)), dir.display().to_string()),
        (None, None) => return Err(usage("give --record DIR or --trainer-url URL --run ID")),
    };
    progress.0.finish_and_clear();
    let audit = result.map_err(anyhow::Error::from).with_context(|| format!("audit of {what}"))?;
    let rep = Report::build(&audit, &key);
    let text = rep.to_json();
    // Checked again: the audit may have taken hours, and the key now exists (a report named
    // like the key would replace it).
    outputs_writable(&args)?;
    if let Some(path) = &args.report {
        write_output(path, format!("{text}\n").as_bytes())
            .with_context(|| format!("--report {}: writing", path.display()))?;
    }
    match (&args.evidence, &audit.evidence) {
        (Some(path), Some(ev)) => ev.write(path).with_context(|| format!("--evidence {}", path.display()))?,
        // No disputed step: a bundle left there by an earlier audit would read as this one's.
        (Some(path), None) => remove_stale_bundle("--evidence", path),
        (None, _) => {}
    }
    if args.json {
        emit(&format!("{text}\n"))?;
    } else {
        emit(&human(&rep, &audit, args.evidence.is_some()))?;
    }
    Ok(if audit.verdict.is_consistent() { Exit::Ok } else { Exit::Adverse })
}

/// `--report` and `--evidence` name files this audit may write (`engine::output`): before the
/// replay, so that a long audit does not end on a path, and again before writing.
fn outputs_writable(args: &AuditArgs) -> Result<(), Failure> {
    writable("--report", args.report.as_deref(), OutputKind::Json)?;
    writable("--evidence", args.evidence.as_deref(), OutputKind::Magic(MAGIC))
}

/// Removes an earlier evidence bundle at `path` (checked to be one), saying so: beside this
/// audit's report it would read as this audit's.
pub fn remove_stale_bundle(flag: &str, path: &std::path::Path) {
    // `read_regular_prefix` reads regular files only: a stream (`/dev/stdout`) is left alone.
    if common::files::read_regular_prefix(path, MAGIC.len() as u64).is_ok_and(|h| h == MAGIC)
        && std::fs::remove_file(path).is_ok()
    {
        super::exit::warn(format_args!(
            "{flag} {}: no bundle for this verdict; the earlier audit's bundle there was removed",
            path.display()
        ));
    }
}

/// Differing tensors listed in the human output; the JSON report lists every one.
const TENSORS_SHOWN_MAX: usize = 20;

/// One differing tensor: how many elements, the first, both values (FP32 printed exactly by
/// `{:?}`: the shortest form that round-trips).
fn tensor_line(t: &TensorDiffJson) -> String {
    let mut s = format!("tensor {}: {} elements differ", t.tensor, t.elements);
    if let Some(i) = t.first_index {
        let v = |x: Option<f32>| x.map_or("non-finite".to_string(), |x| format!("{x:?}"));
        s += &format!(", first at index {i}: trainer {}, auditor {}", v(t.trainer), v(t.auditor));
    }
    if let Some(d) = t.max_abs_diff {
        s += &format!(" (max |difference| {d:.3e})");
    }
    if t.trainer_shape != t.auditor_shape {
        s += &format!("; shapes: trainer {:?}, auditor {:?}", t.trainer_shape, t.auditor_shape);
    }
    s
}

/// The verdict for a reader: the first line is the verdict, so `| head -1` is useful.
fn human(rep: &Report, audit: &Audit, evidence_asked: bool) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    let v = &rep.verdict;
    let step = v.step.map(|s| format!(" at step {s}")).unwrap_or_default();
    line(format!("verdict: {}{step}", v.kind));
    if let Some(what) = &v.what {
        line(format!("  {what}"));
    }
    if let Some(Some(file)) = &v.file {
        let at = v.offset.flatten().map(|o| format!(" (byte {o})")).unwrap_or_default();
        line(format!("  file: {file}{at}"));
    }
    let planned = audit
        .commitment
        .as_ref()
        .and_then(|c| serde_json::from_slice::<engine::spec::RunSpec>(&c.spec_bytes).ok())
        .map(|s| s.n_steps);
    let of_planned = planned.map(|p| format!(" of {p} planned")).unwrap_or_default();
    if let (Some(root), false) = (&rep.trainer_root, rep.trainer_root_signed) {
        let steps = rep
            .n_leaves
            .map(|n| format!("{}{of_planned} steps committed so far; ", n.saturating_sub(1)))
            .unwrap_or_default();
        line(format!("  unfinished run: {steps}root {root} is not signed by the trainer (no manifest yet)"));
    }
    if let (true, Some(n), Some(p)) = (rep.trainer_root_signed, rep.n_leaves.map(|n| n.saturating_sub(1)), planned)
        && n < p
    {
        line(format!("  stopped early: the trainer signed its root after {n}{of_planned} steps"));
    }
    if let Some(at) = &rep.at_step {
        line(format!("  trainer state {}", at.trainer.leaf.state));
        line(format!("  auditor state {}", at.auditor.state));
        match &at.state {
            Some(c) if c.compared => {
                for t in c.tensors.iter().take(TENSORS_SHOWN_MAX) {
                    line(format!("  {}", tensor_line(t)));
                }
                if c.tensors.len() > TENSORS_SHOWN_MAX {
                    line(format!("  … and {} more tensors (all in --json)", c.tensors.len() - TENSORS_SHOWN_MAX));
                }
            }
            Some(c) => {
                line(format!("  states not compared: {}", c.unavailable.as_deref().unwrap_or("no reason given")))
            }
            None => {}
        }
    }
    if let Some(b) = &rep.bisection {
        line(format!("  bisection: {} queries (limit {})", b.queries, b.query_limit));
    }
    if let Mode::Spot { count, pick } = &audit.mode {
        let how = match pick {
            SpotPick::Random { seed, chosen: SeedChoice::Fresh } => {
                format!(
                    "drawn with spot seed {seed} (fresh: drawn for this audit; --spot-seed {seed} repeats the draw)"
                )
            }
            SpotPick::Random { seed, chosen: SeedChoice::Given } => {
                format!("drawn with spot seed {seed} (given: --spot-seed, known to whoever chose it)")
            }
            SpotPick::LargestUpdates => "with the largest parameter updates".to_string(),
        };
        let drawn = rep.intervals.len();
        if drawn < *count {
            let n = if drawn == 1 { "1 interval".to_string() } else { format!("{drawn} intervals") };
            line(format!("  spot check: {n}, every one the record has ({count} asked), {how}"));
        } else {
            line(format!("  spot check: {count} intervals {how}"));
        }
    }
    if !rep.intervals.is_empty() && !matches!(audit.mode, Mode::Full) {
        let list: Vec<String> = rep.intervals.iter().map(|[a, b]| format!("({a}, {b}]")).collect();
        line(format!("  intervals replayed: {}", list.join(" ")));
    }
    line(format!(
        "  {} steps replayed on {} (trainer: {}), {} ms",
        rep.steps_replayed,
        rep.auditor_device,
        rep.trainer_device.as_deref().unwrap_or("?"),
        rep.timings.total_ms
    ));
    if evidence_asked && audit.evidence.is_none() {
        line("  no evidence bundle: the verdict has no disputed step".to_string());
    }
    out
}
