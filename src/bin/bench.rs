//! The headline benchmark: verifiable training against a plain FP32 candle step, auditor replay
//! against training, log sizes against the paper and proof-of-learning, peak memory, bisection.
//!
//! ```text
//! cargo run --release --bin bench -- --json [--data <dir>] [--steps N] [--models a,b|none]
//!     [--scaling [--scaling-steps N] [--scaling-widths 64,128,256,512] [--scaling-batches 4,8,16]
//!      [--scaling-svg docs/scaling.svg]]
//! ```
//! `<dir>` holds `mnist/` (IDX files) and `shakespeare.txt`; without it, synthetic data of the
//! same shapes is used and the output says so. Progress goes to stderr, the JSON to stdout.
//! `--scaling` adds the GPT's scaling sweep (`"scaling"`; minutes), and prints its table to
//! stderr; `--models none` leaves out the per-preset reports.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tiebreak::bench::{self, MODELS, Options, scaling};

/// See the workspace manifest: glibc's malloc returns large op buffers to the OS after every op;
/// `main` tells mimalloc to keep freed pages too ([`kernels::keep_freed_pages`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "bench", about = "Measure tiebreak against the paper, proof-of-learning and plain FP32 training")]
struct Args {
    /// Print the JSON document (the only output format).
    #[arg(long)]
    json: bool,
    /// Directory with `mnist/` and `shakespeare.txt`; synthetic data of the same shapes if absent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Steps per model; with more than one, the first is a warm-up, run and checked but not timed.
    #[arg(long, default_value_t = 9)]
    steps: u64,
    /// Steps each peak-memory child process runs.
    #[arg(long, default_value_t = 2)]
    rss_steps: u64,
    /// Paired interval-parallel audits (one thread, every core) per model.
    #[arg(long, default_value_t = 3)]
    interval_reps: usize,
    /// Comma-separated subset of models (`none`: only the bisection and, with --scaling, the sweep).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Sweep the GPT preset over widths and batch sizes (the JSON's `"scaling"`).
    #[arg(long)]
    scaling: bool,
    /// Steps per point of the sweep (the first a warm-up, not timed).
    #[arg(long, default_value_t = scaling::STEPS, requires = "scaling")]
    scaling_steps: u64,
    /// Widths (d_model) of the sweep.
    #[arg(long, value_delimiter = ',', default_values_t = scaling::WIDTHS, requires = "scaling")]
    scaling_widths: Vec<usize>,
    /// Batch sizes of the sweep.
    #[arg(long, value_delimiter = ',', default_values_t = scaling::BATCH_SIZES, requires = "scaling")]
    scaling_batches: Vec<usize>,
    /// Write the sweep's curves as an SVG to this path.
    #[arg(long, requires = "scaling")]
    scaling_svg: Option<PathBuf>,
    /// Internal: run as a peak-memory child process in this role (trainer, auditor, fp32).
    #[arg(long, hide = true)]
    child: Option<String>,
    /// Internal: the model of a child process.
    #[arg(long, hide = true)]
    model: Option<String>,
    /// Internal: where a child finds the trainer's logs.
    #[arg(long, hide = true)]
    logs: Option<PathBuf>,
}

fn main() -> Result<()> {
    kernels::keep_freed_pages();
    let args = Args::parse();
    if let Some(role) = &args.child {
        let (Some(model), Some(logs)) = (&args.model, &args.logs) else { bail!("--child needs --model and --logs") };
        let v = bench::child(role, model, args.data.as_deref(), args.steps, logs)?;
        println!("{v}");
        return Ok(());
    }
    if !args.json {
        bail!("pass --json: the benchmark prints one JSON document");
    }
    let mut models = args.models.unwrap_or_else(|| MODELS.iter().map(|m| m.to_string()).collect());
    models.retain(|m| m != "none");
    let sweep = args.scaling.then(|| scaling::Options {
        data: args.data.clone(),
        widths: args.scaling_widths,
        batch_sizes: args.scaling_batches,
        steps: args.scaling_steps,
    });
    let opts = Options {
        data: args.data,
        steps: args.steps,
        rss_steps: args.rss_steps,
        models,
        skip_rss: false,
        interval_reps: args.interval_reps,
        scaling: sweep,
    };
    let doc = bench::run(&opts)?;
    if let Some(sweep) = doc.get("scaling") {
        eprint!("{}", scaling::table(sweep));
        if let Some(path) = &args.scaling_svg {
            std::fs::write(path, scaling::plot(sweep)).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("bench: wrote {}", path.display());
        }
    }
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
