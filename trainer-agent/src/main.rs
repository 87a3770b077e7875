//! `trainer-agent`: train verifiably and write a committed record; inspect or export a record;
//! serve records to auditors over HTTP.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use common::codec::to_hex;
use engine::record::Record;
use engine::spec::{Config, DataKind};
use engine::train::Fault;
use kernels::Profile;
use trainer_agent::serve::ServeOptions;
use trainer_agent::{Session, SessionOptions};

/// `println!` through [`emit`].
macro_rules! out {
    ($($t:tt)*) => { emit(&format!($($t)*)) };
}

/// Writes `line` and a newline to stdout and flushes. A reader that has gone
/// (`trainer-agent inspect … | head -1`) ends the output quietly: Rust ignores `SIGPIPE`, so
/// the write fails with `BrokenPipe`, and what was done (a record written, a server started)
/// stands, with its exit code. Any other write error is an error.
fn emit(line: &str) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match writeln!(o, "{line}").and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(e).context("writing to stdout")),
        _ => Ok(()),
    }
}

/// See the workspace manifest: glibc's malloc returns large op buffers to the OS after every op;
/// `main` tells mimalloc to keep freed pages too, except for `serve` ([`kernels::keep_freed_pages`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "trainer-agent",
    version,
    about = "Verifiable training: FP64 compute, FP32 states, committed tie-break logs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a config and write its record.
    Train {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        steps: Option<u64>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// MNIST IDX directory or text file, as the config needs.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Continue an interrupted record in --out.
        #[arg(long)]
        resume: bool,
        /// Adversary drill `<kind>@<step>`; may be repeated.
        #[arg(long = "fault")]
        faults: Vec<String>,
        /// Signing key file (holding a hex ed25519 secret); default `trainer.key` beside --out.
        /// A file that does not exist is generated (not for a bare 64-hex-digit value: that is
        /// taken for a secret given by mistake, and refused).
        #[arg(long)]
        key: Option<PathBuf>,
        /// A fine-tune's starting weights: safetensors with candle-nn names (what `export`
        /// writes). Committed by SHA-256 in the spec and copied into the record.
        #[arg(long)]
        init_weights: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print a record's root, steps, leaves and log sizes.
    Inspect {
        record: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also list one step's tie-break log, site by site (a site is named by its ordinal: its
        /// place in the order the step rounds its sites).
        #[arg(long)]
        step: Option<u64>,
        /// Draw loss (from the trainer's uncommitted losses.txt), tie-breaks per step and log
        /// bytes per step into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Export a finished record's parameters as safetensors (candle-nn names), with metadata:
    /// root, spec digest, step, the model's graph, and the vocabulary of a text run.
    Export {
        record: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A checkpointed step (default: the final one).
        #[arg(long)]
        step: Option<u64>,
        /// The run's data (required for text runs: the vocabulary comes from the text).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Serve every record directory under --records over HTTP (the `engine::wire` protocol)
    /// until SIGTERM or Ctrl-C.
    Serve {
        /// Directory whose subdirectories are records; each is served under its name.
        #[arg(long)]
        records: PathBuf,
        /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
        #[arg(long)]
        listen: String,
        /// Require `Authorization: Bearer <token>` on every request. Shows in process lists:
        /// prefer --token-file or the TRAINER_TOKEN environment variable. Never empty.
        #[arg(long)]
        token: Option<String>,
        /// Reads the token from this file (a trailing newline is dropped).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Seconds the token a SIGHUP reload replaces is still accepted, so an audit in progress
        /// is not refused by a routine rotation (a refusal mid-audit is withholding); 0 revokes
        /// it at once.
        #[arg(long, default_value_t = service::TOKEN_GRACE_DEFAULT.as_secs())]
        token_grace_s: u64,
        /// Connections served at once; more are closed as soon as they are accepted.
        #[arg(long, default_value_t = service::CONNECTIONS_MAX_DEFAULT)]
        connections_max: usize,
        /// Milliseconds a client has to send a request head (also the idle limit of a
        /// kept-alive connection).
        #[arg(long, default_value_t = service::HEADER_READ_TIMEOUT_DEFAULT.as_millis() as u64)]
        header_read_timeout_ms: u64,
        /// Log lines on stderr as `text` or `json` (`RUST_LOG` sets the level).
        #[arg(long, default_value = "text")]
        log_format: service::LogFormat,
        /// Datasets for recomputing states of runs that need one: KIND=PATH with KIND one of
        /// mnist (IDX directory), text, tensors, csv, tokens, or one bare PATH for every kind.
        /// Repeatable, several of a kind too: a run uses the one whose contents are its
        /// committed dataset.
        #[arg(long, value_name = "[NAME=]PATH")]
        data: Vec<String>,
        /// Refuse (413) responses larger than this. The default serves any file an honest
        /// record can hold; an auditor reads a committed file refused as withheld, so a lower
        /// limit must stay above the records' largest checkpoint.
        #[arg(long, default_value_t = trainer_agent::serve::RESPONSE_BYTES_MAX_DEFAULT)]
        max_response_bytes: u64,
        /// Most state recomputations at once; more are answered 503 busy.
        #[arg(long, default_value_t = trainer_agent::serve::RECOMPUTE_MAX_DEFAULT)]
        recompute_max: usize,
        /// Serve HTTPS with this certificate chain (PEM, leaf first).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    // The record server keeps mimalloc's default, so memory goes back to the OS when idle.
    if !matches!(cli.command, Command::Serve { .. }) {
        kernels::keep_freed_pages();
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {}", service::error_text(e.as_ref()));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { config, out, steps, device, data, resume, faults, key, init_weights, json } => {
            let config = Config::load(&config)?;
            let device: Profile = device.parse()?;
            let faults = faults.iter().map(|f| f.parse::<Fault>()).collect::<Result<Vec<_>, _>>()?;
            let opts =
                SessionOptions { config, data, out: out.clone(), device, steps, resume, faults, key, init_weights };
            train(opts, json)
        }
        Command::Inspect { record, json, step, plot } => {
            if let Some(path) = &plot {
                engine::output::check_output(path, engine::output::OutputKind::Svg)
                    .map_err(|why| anyhow::anyhow!("--plot {}: {why}", path.display()))?;
                plot_record(&record, path)?;
            }
            inspect(&record, json, step)
        }
        Command::Export { record, out, step, data } => {
            let opts = trainer_agent::export::ExportOptions { record: &record, out: &out, step, data: data.as_deref() };
            let done = trainer_agent::export::export(&opts)?;
            eprintln!("wrote {} ({} tensors, step {})", out.display(), done.tensors, done.step);
            Ok(())
        }
        Command::Serve {
            records,
            listen,
            token,
            token_file,
            token_grace_s,
            data,
            max_response_bytes,
            recompute_max,
            connections_max,
            header_read_timeout_ms,
            log_format,
            tls_cert,
            tls_key,
        } => {
            service::init_logs(log_format);
            let token = service::secret(token, token_file.as_deref(), "TRAINER_TOKEN").map_err(anyhow::Error::msg)?;
            if connections_max == 0 || header_read_timeout_ms == 0 {
                bail!("--connections-max and --header-read-timeout-ms must be positive");
            }
            let limits = service::Limits {
                connections_max,
                header_read_timeout: std::time::Duration::from_millis(header_read_timeout_ms),
                ..service::Limits::default()
            };
            let (fallback, datasets) = serve_datasets(&data)?;
            let opts = ServeOptions {
                token_file: token_file.filter(|_| token.is_some()),
                token,
                token_grace: std::time::Duration::from_secs(token_grace_s),
                data: fallback,
                datasets,
                response_bytes_max: max_response_bytes,
                recompute_max,
                limits,
                tls: match (&tls_cert, &tls_key) {
                    (Some(c), Some(k)) => {
                        Some(service::tls::ServerTls::from_pem_files(c, k).map_err(anyhow::Error::msg)?)
                    }
                    _ => None,
                },
                ..ServeOptions::new(records)
            };
            serve(&listen, opts)
        }
    }
}

fn serve(listen: &str, opts: ServeOptions) -> Result<()> {
    // Checked before listening, so a typo never leaves a server that serves nothing.
    if !opts.records.is_dir() {
        bail!("records directory {} is not a directory", opts.records.display());
    }
    let rt = service::runtime(service::HANDLER_BLOCKING_THREADS).context("start the tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listen on {listen}"))?;
        let addr = listener.local_addr().context("local address of the listener")?;
        eprintln!("serving records under {}", opts.records.display());
        if opts.token.is_none() {
            tracing::warn!(
                listen = %addr,
                "no token (--token, --token-file, TRAINER_TOKEN): anyone who reaches this address may read every \
                 record served"
            );
        }
        // One line on stdout that scripts and tests wait for.
        out!("listening on {}://{addr}", if opts.tls.is_some() { "https" } else { "http" })?;
        trainer_agent::serve::serve(listener, opts, service::shutdown_signal()).await?;
        eprintln!("shut down");
        Ok(())
    })
}

fn train(opts: SessionOptions, json: bool) -> Result<()> {
    let started = Instant::now();
    let mut session = Session::create(&opts)?;
    let total = session.n_steps();
    let bar = indicatif::ProgressBar::new(total);
    if total < 20 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} train [{bar:30}] {pos}/{len} steps  loss {msg}  eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    if let Some(from) = session.resumed_from() {
        bar.set_position(from);
        bar.println(format!("resuming {} from checkpoint at step {from}", opts.out.display()));
    }
    let mut first_loss = None;
    while session.next_step().is_some() {
        session.step()?;
        first_loss = first_loss.or(session.last_loss());
        bar.inc(1);
        if let Some(l) = session.last_loss() {
            bar.set_message(format!("{l:.4}"));
        }
    }
    bar.finish_and_clear();
    // Held-out evaluation: 1,000 examples for classifiers; 128 windows for a text model (each
    // window is a full forward pass over the context).
    let eval_max = if matches!(session.run().data, engine::data::Dataset::Text { .. }) { 128 } else { 1000 };
    let eval = session.evaluate(eval_max)?;
    let final_loss = session.last_loss();
    let resumed_from = session.resumed_from();
    let manifest = session.finish()?;
    let record = Record::open(&opts.out)?;
    let log_bytes: u64 = (1..=record.n_steps()).map(|s| record.log_bytes(s)).sum::<Result<u64, _>>()?;
    let summary = serde_json::json!({
        "record": opts.out,
        "root": manifest.root,
        "n_steps": manifest.n_steps,
        "device": manifest.device_profile,
        "first_loss": first_loss,
        "final_loss": final_loss,
        "eval_examples": eval.examples,
        "eval_loss": eval.loss,
        "eval_accuracy": eval.accuracy,
        "log_bytes_total": log_bytes,
        "resumed_from": resumed_from,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if json {
        out!("{summary}")?;
    } else {
        out!("trained {} steps on {} -> {}", manifest.n_steps, manifest.device_profile, opts.out.display())?;
        out!("root      {}", manifest.root)?;
        if let Some(l) = final_loss {
            out!("loss      {l:.5}")?;
        }
        if let Some(a) = eval.accuracy {
            out!("accuracy  {:.2}% on {} held-out examples", 100.0 * a, eval.examples)?;
        }
        out!("logs      {log_bytes} bytes stored in total")?;
    }
    Ok(())
}

/// Writes `inspect --plot`'s SVG for the record in `dir` (through a temporary file and a
/// rename, so a failed write leaves no half a picture).
fn plot_record(dir: &std::path::Path, path: &std::path::Path) -> Result<()> {
    use service::svg::{Series, svg};
    let record = Record::open(dir)?;
    let n = record.n_steps();
    let mut ties = Vec::new();
    let mut bytes = Vec::new();
    for s in 1..=n {
        let log = record.log(s)?;
        let count: usize = log.sites().map(|(_, l)| l.directions().count() + l.exacts().count()).sum();
        ties.push((s, count as f64));
        bytes.push((s, record.log_bytes(s)? as f64));
    }
    let losses: Vec<(u64, f64)> =
        trainer_agent::read_losses(dir).into_iter().filter(|(s, _)| (1..=n).contains(s)).collect();
    let title = format!("{} — {} steps on {}", dir.display(), n, record.spec().device_profile);
    let doc = svg(
        &title,
        1,
        n.max(1),
        &[
            Series { title: "loss (reported by the trainer, not committed)".into(), points: losses },
            Series { title: "tie-breaks per step".into(), points: ties },
            Series { title: "tie-break log bytes per step (stored)".into(), points: bytes },
        ],
        &[],
    );
    engine::output::write_output(path, doc.as_bytes()).with_context(|| format!("--plot {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn inspect(dir: &std::path::Path, json: bool, step: Option<u64>) -> Result<()> {
    let record = Record::open(dir)?;
    let sites = match step {
        Some(0) => bail!(
            "--step 0: step 0 is the initial state, which rounds nothing and has no tie-break log (steps 1..={})",
            record.n_steps()
        ),
        Some(s) => {
            let log = record.log(s)?;
            let rows: Vec<serde_json::Value> = log
                .sites()
                .map(|(ordinal, l)| {
                    serde_json::json!({
                        "ordinal": ordinal,
                        "values": l.len(),
                        "directions": l.directions().count(),
                        "exact": l.exacts().count(),
                    })
                })
                .collect();
            Some(rows)
        }
        None => None,
    };
    let n = record.n_steps();
    let log_bytes: Vec<u64> = (1..=n).map(|s| record.log_bytes(s)).collect::<Result<_, _>>()?;
    // Every committed file against its leaf or the spec, as an audit reads them: a record that
    // inspects cleanly has nothing an auditor would refuse before replaying it.
    for s in 1..=n {
        record.log(s)?;
        record.batch(s)?;
    }
    for s in record.checkpoint_steps() {
        record.checkpoint(s)?;
    }
    record.init_weights()?;
    let leaves: Vec<String> = record.leaves().iter().map(|l| to_hex(&l.encode())).collect();
    let root = to_hex(&record.tree().root());
    if let Some(m) = record.manifest()
        && m.root != root
    {
        bail!("manifest root {} differs from the leaves' root {root}", m.root);
    }
    if json {
        let v = serde_json::json!({
            "record": dir,
            "complete": record.is_complete(),
            "root": root,
            "n_steps": n,
            "device_profile": record.spec().device_profile,
            "spec_hash": to_hex(&record.spec().digest()),
            "leaves": leaves,
            "log_bytes": log_bytes,
            "checkpoints": record.checkpoint_steps(),
            "sites": sites,
        });
        out!("{v}")?;
    } else {
        out!("record    {}", dir.display())?;
        out!("complete  {}", record.is_complete())?;
        out!("root      {root}")?;
        out!("steps     {n}")?;
        out!("device    {}", record.spec().device_profile)?;
        let total: u64 = log_bytes.iter().sum();
        out!("logs      {total} bytes ({:.1} per step)", total as f64 / n.max(1) as f64)?;
        for row in sites.iter().flatten() {
            out!(
                "  site #{:<6} {:>9} values {:>6} directions {:>6} exact",
                row["ordinal"],
                row["values"],
                row["directions"],
                row["exact"]
            )?;
        }
    }
    Ok(())
}

/// Datasets by the kind of data they hold (`ServeOptions::datasets`).
type Datasets = Vec<(DataKind, PathBuf)>;

/// `serve --data` arguments: the bare path (at most one) and the datasets by kind, each path
/// required to exist.
fn serve_datasets(args: &[String]) -> Result<(Option<PathBuf>, Datasets)> {
    const KINDS: [DataKind; 5] = [DataKind::Mnist, DataKind::Text, DataKind::Tensors, DataKind::Csv, DataKind::Tokens];
    let (mut fallback, mut datasets) = (None, Vec::new());
    for d in args {
        let kind = d.split_once('=').and_then(|(k, p)| KINDS.iter().find(|x| x.as_str() == k).map(|&x| (x, p)));
        let path = PathBuf::from(kind.map_or(d.as_str(), |(_, p)| p));
        if std::fs::metadata(&path).is_err() {
            let hint = match d.split_once('=') {
                Some((k, _)) if kind.is_none() => {
                    format!(" ({k:?} is not a kind of data: mnist, text, tensors, csv, tokens)")
                }
                _ => String::new(),
            };
            bail!("--data {d}: {} does not exist{hint}", path.display());
        }
        match kind {
            Some((k, _)) => datasets.push((k, path)),
            None if fallback.is_some() => {
                bail!("--data {d}: a second bare PATH; name each dataset's kind (KIND=PATH) when there are several")
            }
            None => fallback = Some(path),
        }
    }
    Ok((fallback, datasets))
}
