//! `auditor`: the CLI over the auditor library: audit a record directory, verify a report,
//! adjudicate an evidence bundle, or run the daemon (`serve`). Parsing and printing only; the
//! work is in the library.
//!
//! Exit codes: 0 consistent (or a report that verifies, or a daemon that shut down cleanly), 1
//! any adverse verdict (or a report that does not verify), 2 the command could not decide (or
//! the daemon could not start), with a message saying why.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use auditor::evidence::{Evidence, adjudicate};
use auditor::http::{HttpTrainer, RetryPolicy};
use auditor::report::{AdjudicationJson, Report, verify};
use auditor::{AuditOptions, Mode, Progress, SpotPick, TrainerSource, audit, audit_dir};
use clap::{Parser, Subcommand, ValueEnum};
use kernels::Profile;

/// See the workspace manifest: glibc's malloc returns large op buffers to the OS after every op.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "auditor", version, about = "Audit a tiebreak training record on another device profile")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Full,
    Intervals,
    Spot,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SpotByArg {
    /// A seeded uniform draw (`--spot-seed`).
    Random,
    /// Proof-of-learning's largest parameter updates between checkpoints.
    LargestUpdate,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay a record (or a segment of it) and report the verdict.
    Audit {
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
        /// First step to check (0 also checks the initial state).
        #[arg(long)]
        from: Option<u64>,
        /// Last step to check (default: the last step).
        #[arg(long)]
        to: Option<u64>,
        /// The auditor's device profile (default: one other than the trainer's).
        #[arg(long)]
        device: Option<String>,
        #[arg(long, value_enum, default_value = "full")]
        mode: ModeArg,
        /// Intervals to replay in spot mode.
        #[arg(long, default_value_t = 4)]
        spot_count: usize,
        #[arg(long, value_enum, default_value = "random")]
        spot_by: SpotByArg,
        /// Seed of the spot draw (published in advance, or drawn by the client).
        #[arg(long, default_value_t = 0)]
        spot_seed: u64,
        /// Dataset files, for specs that are not synthetic.
        #[arg(long)]
        data: Option<PathBuf>,
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
    },
    /// Check a report's signature and inclusion proofs.
    VerifyReport { file: PathBuf },
    /// Run the auditor daemon: audits over HTTP against trainers' record servers, signed
    /// reports at /v1/reports/{id}, metrics at /metrics. Stops gracefully on SIGTERM or Ctrl-C.
    Serve {
        /// The daemon's config (TOML); without it, the built-in defaults (those of
        /// configs/auditor.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides the config's `listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Overrides the config's `state_dir`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Overrides the config's `token` (bearer token required on /v1/audits).
        #[arg(long)]
        token: Option<String>,
    },
    /// Re-execute the disputed step of an evidence bundle and say whose leaf it reproduces.
    Adjudicate {
        #[arg(long)]
        evidence: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
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

fn profile(name: &str) -> Result<Profile> {
    name.parse::<Profile>().map_err(|e| anyhow::anyhow!("--device: {e}"))
}

/// A profile other than the trainer's, read from the record's spec (best effort: if the spec
/// cannot be read, the audit itself reports why).
fn other_profile(spec_bytes: Option<Vec<u8>>) -> Profile {
    let trainer = spec_bytes
        .and_then(|b| serde_json::from_slice::<engine::spec::RunSpec>(&b).ok())
        .and_then(|s| s.device_profile.parse::<Profile>().ok());
    Profile::CPU.into_iter().find(|p| Some(*p) != trainer).unwrap_or_default()
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Audit {
            record,
            trainer_url,
            run,
            trainer_token,
            from,
            to,
            device,
            mode,
            spot_count,
            spot_by,
            spot_seed,
            data,
            key,
            json,
            report,
            evidence,
        } => {
            // Over HTTP, requests go through a runtime this thread is not inside (the trait is
            // synchronous; see auditor::http).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the HTTP runtime")?;
            let remote = match (&trainer_url, &run) {
                (Some(url), Some(run)) => Some(
                    HttpTrainer::new(url, run, trainer_token, RetryPolicy::default(), runtime.handle().clone())
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                ),
                _ => None,
            };
            let device = match device {
                Some(d) => profile(&d)?,
                None => other_profile(match (&remote, &record) {
                    (Some(src), _) => src.spec_bytes().ok(),
                    (None, Some(dir)) => std::fs::read(dir.join(engine::record::SPEC_FILE)).ok(),
                    (None, None) => None,
                }),
            };
            let mode = match mode {
                ModeArg::Full => Mode::Full,
                ModeArg::Intervals => Mode::Intervals,
                ModeArg::Spot => {
                    anyhow::ensure!(spot_count > 0, "--spot-count must be at least 1");
                    let pick = match spot_by {
                        SpotByArg::Random => {
                            SpotPick::Random { seed: spot_seed, chosen: auditor::replay::SeedChoice::Given }
                        }
                        SpotByArg::LargestUpdate => SpotPick::LargestUpdates,
                    };
                    Mode::Spot { count: spot_count, pick }
                }
            };
            let key =
                engine::record::load_or_create_key(&key).with_context(|| format!("auditor key {}", key.display()))?;
            let opts = AuditOptions { device, from, to, mode, data, resume: Default::default(), trainer_key: None };
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template("{spinner} replay [{bar:30}] {pos}/{len} steps {elapsed}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            let progress = Bar(bar);
            let (result, what) = match (&remote, &record) {
                (Some(src), _) => (audit(src, &opts, &progress), src.describe()),
                (None, Some(dir)) => (audit_dir(dir, &opts, &progress), dir.display().to_string()),
                (None, None) => anyhow::bail!("give --record DIR or --trainer-url URL --run ID"),
            };
            progress.0.finish_and_clear();
            let audit = result.with_context(|| format!("audit of {what}"))?;
            let rep = Report::build(&audit, &key);
            let text = rep.to_json();
            if let Some(path) = &report {
                std::fs::write(path, format!("{text}\n"))
                    .with_context(|| format!("write report {}", path.display()))?;
            }
            if let (Some(path), Some(ev)) = (&evidence, &audit.evidence) {
                ev.write(path)?;
            }
            if json {
                println!("{text}");
            } else {
                let v = &rep.verdict;
                let step = v.step.map(|s| format!(" at step {s}")).unwrap_or_default();
                println!("verdict: {}{step}", v.kind);
                if let Some(what) = &v.what {
                    println!("  {what}");
                }
                if let Some(Some(file)) = &v.file {
                    let at = v.offset.flatten().map(|o| format!(" (byte {o})")).unwrap_or_default();
                    println!("  file: {file}{at}");
                }
                if let Some(at) = &rep.at_step {
                    println!("  trainer state {}", at.trainer.leaf.state);
                    println!("  auditor state {}", at.auditor.state);
                }
                if let Some(b) = &rep.bisection {
                    println!("  bisection: {} queries (limit {})", b.queries, b.query_limit);
                }
                println!(
                    "  {} steps replayed on {} (trainer: {}), {} ms",
                    rep.steps_replayed,
                    rep.auditor_device,
                    rep.trainer_device.as_deref().unwrap_or("?"),
                    rep.timings.total_ms
                );
                if evidence.is_some() && audit.evidence.is_none() {
                    println!("  no evidence bundle: the verdict has no disputed step");
                }
            }
            Ok(if audit.verdict.is_consistent() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::VerifyReport { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
            match verify(&text) {
                Ok(v) => {
                    println!(
                        "report verifies: verdict {}, signed by {}, {} inclusion proofs checked",
                        v.verdict_kind, v.auditor_public_key, v.proofs_checked
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("report does NOT verify: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Serve { config, listen, state_dir, token } => {
            let mut cfg = match &config {
                Some(path) => auditor::daemon::Config::load(path)?,
                None => auditor::daemon::Config::default(),
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = state_dir {
                cfg.state_dir = d;
            }
            if token.is_some() {
                cfg.token = token;
            }
            cfg.validate().map_err(|e| anyhow::anyhow!("config: {e}"))?;
            let rt =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
            rt.block_on(async move {
                let (listener, addr) =
                    auditor::daemon::bind(&cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
                println!("auditor daemon listening on http://{addr} (state in {})", cfg.state_dir.display());
                use std::io::Write;
                let _ = std::io::stdout().flush();
                auditor::daemon::serve(listener, cfg, shutdown_signal()).await?;
                println!("auditor daemon stopped");
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Adjudicate { evidence, device, data, json } => {
            let device = profile(&device)?;
            let ev = Evidence::read(&evidence)?;
            let a = adjudicate(&ev, device, data.as_deref())?;
            let out = AdjudicationJson::from_adjudication(&a);
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "step {} ({}) re-executed on {}: reproduces the {}'s leaf",
                    out.step, out.verdict_kind, out.device, out.reproduces
                );
                println!("  computed state {}", out.computed_leaf.state);
                println!("  trainer  state {}", out.trainer_leaf.state);
                println!("  auditor  state {}", out.auditor_leaf.state);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Completes on SIGTERM or Ctrl-C. (The same as `trainer-agent`'s: the two binaries share no
/// crate that knows tokio, and 15 lines do not justify one.)
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No Ctrl-C handler could be installed: rely on SIGTERM alone, rather than stop now.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("auditor: could not decide: {e:#}");
            ExitCode::from(2)
        }
    }
}
