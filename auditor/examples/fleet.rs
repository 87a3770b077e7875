//! Fleet benchmark (issue 16): one MNIST audit replayed by 1, 2 and 4 `auditor serve` processes
//! on one PostgreSQL database, then once more by 2 where one is killed with SIGKILL mid-run.
//!
//! ```text
//! cargo build --release -p tiebreak-auditor --bin auditor --example fleet
//! target/release/examples/fleet --pg-url postgres://user@host:port/db [--steps 800] [--daemons 1,2,4]
//! ```
//! (`TIEBREAK_PG_URL` stands in for `--pg-url`; `eval "$(scripts/pg-throwaway.sh)"` starts a
//! throwaway server.) Each run gets a fresh database on that server, dropped afterwards.
//!
//! The record is the MNIST preset (`configs/mnist-mlp.toml`: an MLP, a checkpoint every 50
//! steps) trained for `--steps` steps; the audit is in `intervals` mode, whose checkpoint
//! intervals are the fleet's work items. (`full` mode replays the record as one chain from step
//! 0, one item, so a fleet cannot share it.) Every daemon replays one interval at a time
//! (`workers = 1`), so a fleet of `n` daemons runs at most `n` replays at once, and **on a machine
//! with `c` cores the speed-up stops at `c`**: on a 2-core machine 4 daemons are no faster than
//! 2. The single-process CLI audit of the same record, which replays intervals on every core
//! itself, is timed beside them.
//!
//! Prints one JSON document to stdout: per daemon count the wall time from submission to the
//! stored report, the intervals each daemon replayed (from the store's items), and takeovers;
//! for the killed run, which daemon died holding which interval, the takeovers, and every item's
//! claims, checking that no interval was claimed twice except after its lease expired
//! (`claims = 1 + takeovers` for every item). Progress goes to stderr.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use auditor::daemon::job::{ItemState, JobState, Store};
use auditor::daemon::store::PgStore;
use clap::Parser;
use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(name = "fleet", about = "Replay one MNIST audit with fleets of 1, 2 and 4 auditor daemons on PostgreSQL")]
struct Args {
    /// The PostgreSQL server (a fresh database is made on it per run); default `TIEBREAK_PG_URL`.
    #[arg(long)]
    pg_url: Option<String>,
    /// MNIST IDX directory.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/mnist"))]
    data: PathBuf,
    /// Steps of the MNIST preset to train and audit (a checkpoint every 50: steps / 50 intervals).
    #[arg(long, default_value_t = 800)]
    steps: u64,
    /// Fleet sizes to time, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    daemons: Vec<usize>,
    /// Lease of every claim: how soon the killed daemon's interval is taken over.
    #[arg(long, default_value_t = 2000)]
    lease_ms: u64,
    /// The `auditor` binary (default: beside this example's directory, the same profile).
    #[arg(long)]
    auditor: Option<PathBuf>,
    /// Skip the run with a daemon killed.
    #[arg(long)]
    no_kill: bool,
    /// Keep the working directory (records, daemon configs and logs) and say where it is.
    #[arg(long)]
    keep: bool,
}

/// See the workspace manifest: glibc's malloc returns large op buffers to the OS after every op;
/// `main` tells mimalloc to keep freed pages too ([`kernels::keep_freed_pages`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    kernels::keep_freed_pages();
    let args = Args::parse();
    let pg_url = match args.pg_url.clone().or_else(|| std::env::var("TIEBREAK_PG_URL").ok()) {
        Some(u) if !u.trim().is_empty() => u,
        _ => bail!("no PostgreSQL server: pass --pg-url or set TIEBREAK_PG_URL (eval \"$(scripts/pg-throwaway.sh)\")"),
    };
    ensure!(args.steps >= 100, "--steps {}: at least 100 (two intervals of the preset)", args.steps);
    ensure!(args.daemons.iter().all(|&n| (1..=16).contains(&n)), "--daemons: each 1..=16");
    let auditor = match &args.auditor {
        Some(p) => p.clone(),
        None => {
            let exe = std::env::current_exe()?;
            // target/<profile>/examples/fleet → target/<profile>/auditor
            exe.parent().and_then(Path::parent).context("locating the auditor binary")?.join("auditor")
        }
    };
    ensure!(
        auditor.is_file(),
        "{} not found: build it with the same profile (cargo build [--release] -p tiebreak-auditor --bin auditor) \
         or pass --auditor",
        auditor.display()
    );
    ensure!(
        args.data.join("t10k-images-idx3-ubyte.gz").is_file(),
        "--data {}: no MNIST IDX files there",
        args.data.display()
    );
    service::tls::install_provider();
    let work = std::env::temp_dir().join(format!("tiebreak-fleet-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = bench(&args, &pg_url, &auditor, &work);
    if args.keep {
        eprintln!("fleet: records, configs and daemon logs kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    let doc = result?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

fn bench(args: &Args, pg_url: &str, auditor: &Path, work: &Path) -> Result<Value> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let records = work.join("records");
    std::fs::create_dir_all(&records)?;
    let t = Instant::now();
    let (n_intervals, checkpoint_interval) = write_record(&records.join("mnist"), &args.data, args.steps)?;
    eprintln!("fleet: {} MNIST steps trained and recorded in {:.1} s", args.steps, t.elapsed().as_secs_f64());
    let key = work.join("firm.key");
    std::fs::write(&key, format!("{}\n", common::codec::to_hex(&[0x42; 32])))?;

    let single = single_process(auditor, &records.join("mnist"), &args.data)?;
    eprintln!("fleet: one process (the CLI, every core): {:.2} s", single);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let (trainer_url, stop_trainer) = rt.block_on(start_trainer(&records))?;
    let env = Env { args, pg_url, auditor, work, key: &key, trainer_url: &trainer_url, rt: &rt };

    let mut runs = Vec::new();
    let mut wall_1 = None;
    for &n in &args.daemons {
        let r = env.run(n, false)?;
        let wall = r["wall_s"].as_f64().unwrap_or(f64::NAN);
        if n == 1 {
            wall_1 = Some(wall);
        }
        let mut r = r;
        if let Some(w1) = wall_1 {
            r["speedup_vs_1_daemon"] = json!(round2(w1 / wall));
        }
        eprintln!("fleet: {n} daemon(s): {wall:.2} s");
        runs.push(r);
    }
    let killed = if args.no_kill { Value::Null } else { env.run(2, true)? };
    let _ = stop_trainer.send(());
    Ok(json!({
        "bench": "fleet",
        "cores": cores,
        "note": format!(
            "each daemon replays one interval at a time (workers = 1): with {cores} cores the speed-up stops at \
             {cores} daemons; more daemons only share the same cores"
        ),
        "record": {
            "preset": "configs/mnist-mlp.toml",
            "steps": args.steps,
            "checkpoint_interval": checkpoint_interval,
            "intervals": n_intervals,
        },
        "mode": "intervals",
        "lease_ms": args.lease_ms,
        "single_process_cli_s": round2(single),
        "runs": runs,
        "killed_run": killed,
    }))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Trains the MNIST preset for `steps` steps and writes its record to `out`; the number of
/// intervals and the checkpoint interval.
fn write_record(out: &Path, data: &Path, steps: u64) -> Result<(u64, u64)> {
    let preset = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/mnist-mlp.toml");
    let text = std::fs::read_to_string(&preset).with_context(|| format!("reading {}", preset.display()))?;
    let cfg = Config::from_toml(&text, &preset.display().to_string())?;
    let r = Run::from_config(&cfg, Some(data), Profile::Cpu, steps)?;
    let every = r.spec.config.train.checkpoint_interval;
    let mut w = RecordWriter::create(out, &r.spec)?;
    let mut state = r.initial_state()?;
    w.commit_initial(&state)?;
    for t in 1..=steps {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None)?;
        w.commit_step(&o.state, &o.log, &o.batch)?;
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[7; 32]))?;
    Ok((steps.div_ceil(every), every))
}

/// Seconds the `auditor audit` CLI takes for the same audit in one process.
fn single_process(auditor: &Path, record: &Path, data: &Path) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(auditor)
        .args(["audit", "--mode", "intervals", "--device", "cpu-seq", "--json", "--record"])
        .arg(record)
        .arg("--data")
        .arg(data)
        .output()?;
    ensure!(out.status.success(), "auditor audit: {}", String::from_utf8_lossy(&out.stderr));
    Ok(t.elapsed().as_secs_f64())
}

async fn start_trainer(records: &Path) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let opts = trainer_agent::serve::ServeOptions::new(records);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = trainer_agent::serve::serve(listener, opts, async {
            let _ = rx.await;
        })
        .await;
    });
    Ok((url, tx))
}

/// What every run shares.
struct Env<'a> {
    args: &'a Args,
    pg_url: &'a str,
    auditor: &'a Path,
    work: &'a Path,
    key: &'a Path,
    trainer_url: &'a str,
    rt: &'a tokio::runtime::Runtime,
}

/// A daemon process and its node name.
struct Daemon {
    node: String,
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SIGTERM first: an idle daemon stops at once; SIGKILL after a grace period.
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let t = Instant::now();
            while self.child.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Env<'_> {
    /// One audit by `n` daemons on a fresh database; with `kill`, the first daemon seen holding
    /// an interval of an audit it does not coordinate is killed with SIGKILL.
    fn run(&self, n: usize, kill: bool) -> Result<Value> {
        let label = if kill { format!("kill-{n}") } else { format!("n{n}") };
        let db = Database::create(self.pg_url, &label)?;
        let result = self.run_on(&db.url, n, kill, &label);
        drop(db);
        result
    }

    fn run_on(&self, db_url: &str, n: usize, kill: bool, label: &str) -> Result<Value> {
        // Migrated here, before the daemons race to.
        let store = PgStore::connect(db_url)?;
        let mut daemons: Vec<Daemon> =
            (1..=n).map(|i| self.spawn(db_url, &format!("{label}-d{i}"))).collect::<Result<_>>()?;
        let body = json!({"trainer_url": self.trainer_url, "run": "mnist", "mode": "intervals"});
        let client = reqwest::Client::new();
        let t0 = Instant::now();
        let submitted: Value = self.rt.block_on(async {
            let resp = client.post(format!("{}/v1/audits", daemons[0].url)).body(body.to_string()).send().await?;
            anyhow::Ok(serde_json::from_slice(&resp.bytes().await?)?)
        })?;
        let id = submitted["id"].as_str().with_context(|| format!("submitting: {submitted}"))?.to_string();
        let mut coordinators = Vec::<String>::new();
        let mut killed: Option<(String, f64, Vec<u64>)> = None;
        let job = loop {
            let job = store.get(&id)?.context("the audit vanished")?;
            if let Some(o) = &job.owner
                && coordinators.last() != Some(o)
            {
                coordinators.push(o.clone());
            }
            if matches!(job.state, JobState::Done | JobState::Failed) {
                break job;
            }
            if kill && killed.is_none() {
                let items = store.items(&id)?;
                let victim = items
                    .iter()
                    .filter(|i| i.state == ItemState::Claimed)
                    .filter_map(|i| i.owner.clone())
                    .find(|o| job.owner.as_ref() != Some(o));
                if let Some(v) = victim {
                    let d = daemons.iter_mut().find(|d| d.node == v).context("an unknown node holds an item")?;
                    d.child.kill()?;
                    d.child.wait()?;
                    let held = store
                        .items(&id)?
                        .into_iter()
                        .filter(|i| i.state == ItemState::Claimed && i.owner.as_deref() == Some(v.as_str()))
                        .map(|i| i.start)
                        .collect();
                    eprintln!(
                        "fleet: killed {v} at {:.2} s, holding intervals from {held:?}",
                        t0.elapsed().as_secs_f64()
                    );
                    killed = Some((v, t0.elapsed().as_secs_f64(), held));
                }
            }
            ensure!(t0.elapsed() < Duration::from_secs(600), "{label}: the audit did not end in 10 minutes");
            std::thread::sleep(Duration::from_millis(10));
        };
        let wall = t0.elapsed().as_secs_f64();
        ensure!(job.state == JobState::Done, "{label}: the audit failed: {:?}", job.error);
        let items = store.items(&id)?;
        let mut per_daemon: BTreeMap<String, u64> = daemons.iter().map(|d| (d.node.clone(), 0)).collect();
        for i in &items {
            *per_daemon.entry(i.owner.clone().unwrap_or_else(|| "-".into())).or_default() += 1;
        }
        let takeovers: u64 = items.iter().map(|i| u64::from(i.takeovers)).sum();
        let twice: Vec<u64> = items.iter().filter(|i| i.claims != 1 + i.takeovers).map(|i| i.start).collect();
        let mut out = json!({
            "daemons": n,
            "wall_s": round2(wall),
            "verdict": job.verdict.map(|v| v.as_str()),
            "report_count": store.report_count(&id)?,
            "intervals": items.len(),
            "intervals_per_daemon": per_daemon,
            "coordinators": coordinators,
            "takeovers": takeovers,
            "claimed_again_without_lease_expiry": twice,
        });
        if kill {
            let (node, at, held) = killed.unwrap_or_default();
            out["killed"] = json!({"node": node, "at_s": round2(at), "holding_intervals_from": held});
            out["items"] = items
                .iter()
                .map(|i| {
                    json!({"start": i.start, "end": i.end, "owner": i.owner, "claims": i.claims, "takeovers": i.takeovers})
                })
                .collect();
        }
        drop(daemons);
        Ok(out)
    }

    fn spawn(&self, db_url: &str, node: &str) -> Result<Daemon> {
        let config = self.work.join(format!("{node}.toml"));
        std::fs::write(
            &config,
            format!(
                "workers = 1\nkey_file = {key:?}\n[store]\nurl = {db_url:?}\nnode = {node:?}\nlease_ms = {lease}\n\
                 [data]\nmnist = {mnist:?}\n",
                key = self.key.display().to_string(),
                lease = self.args.lease_ms,
                mnist = self.args.data.display().to_string(),
            ),
        )?;
        let log = std::fs::File::create(self.work.join(format!("{node}.log")))?;
        let mut child = Command::new(self.auditor)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(self.work.join(format!("state-{node}")))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().context("daemon stdout")?).read_line(&mut line)?;
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.kill();
            bail!("{node}: no address in {line:?} (log: {})", self.work.join(format!("{node}.log")).display());
        };
        Ok(Daemon { node: node.to_string(), url: url.to_string(), child })
    }
}

/// A fresh database on the server at `admin_url`, dropped with its connections at the end.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    fn create(admin_url: &str, label: &str) -> Result<Database> {
        let name = format!("tiebreak_fleet_bench_{}_{}", std::process::id(), label.replace('-', "_"));
        let mut c = postgres::Client::connect(admin_url, postgres::NoTls).context("connecting to the server")?;
        // Two statements: CREATE DATABASE may not share a (implicit) transaction.
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))?;
        Ok(Database { admin_url: admin_url.to_string(), url: with_database(admin_url, &name), name })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// `url` with its database replaced by `db` (URL or key=value form).
fn with_database(url: &str, db: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return format!("{url} dbname={db}");
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    format!("{scheme}://{authority}/{db}{query}")
}
