//! The main job, end to end on the embedded default (no data files, nothing to set up):
//! 1. train `configs/synthetic-mlp.toml` on the `cpu` profile twice, honestly and with an
//!    injected fault (default `perturb-weight@37`);
//! 2. serve both records with the trainer's record server (`trainer-agent serve`'s library);
//! 3. start the auditor daemon (`auditor serve`'s library) on its embedded SQLite store;
//! 4. submit both audits over HTTP, replayed on another profile (`cpu-alt`, the fast other
//!    profile an audit of a `cpu` trainer picks by default);
//! 5. fetch the signed reports from the report endpoint, check them, and print the verdicts and
//!    the first diverging step with both full digests; write reports and evidence to `--out`.
//!
//! Both servers run in this process on 127.0.0.1 with ephemeral ports and bearer tokens; every
//! exchange between them, and between this client and the daemon, is real HTTP.
//!
//! ```text
//! cargo run --release -- [--out DIR] [--fault KIND@STEP]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use auditor::report::verify;
use engine::spec::Config;
use engine::train::Fault;
use kernels::Profile;
use serde_json::{Value, json};
use trainer_agent::{Session, SessionOptions};

/// See the workspace manifest: glibc's malloc returns large op buffers to the OS after every op;
/// `main` tells mimalloc to keep freed pages too ([`kernels::keep_freed_pages`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TRAINER_TOKEN: &str = "demo-trainer-token";
const DAEMON_TOKEN: &str = "demo-auditor-token";

fn main() -> Result<()> {
    kernels::keep_freed_pages();
    let mut out = std::env::temp_dir().join("tiebreak-demo");
    let mut fault: Fault = "perturb-weight@37".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(args.next().context("--out needs a directory")?),
            "--fault" => fault = args.next().context("--fault needs KIND@STEP")?.parse()?,
            "-h" | "--help" => {
                println!("usage: tiebreak-demo [--out DIR] [--fault KIND@STEP]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clear {}", out.display()))?;
    }
    let config_path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/synthetic-mlp.toml");
    let config = Config::load(std::path::Path::new(config_path))?;
    let records = out.join("records");

    // 1. Train.
    for (name, faults) in [("honest", vec![]), ("faulty", vec![fault])] {
        let opts = SessionOptions {
            config: config.clone(),
            data: None,
            out: records.join(name),
            device: Profile::Cpu,
            steps: None,
            resume: false,
            faults: faults.clone(),
            key: Some(out.join("trainer.key")),
            init_weights: None,
        };
        let mut session = Session::create(&opts)?;
        let mut entries = 0usize;
        while session.next_step().is_some() {
            let step = session.run_step()?;
            entries += step.log.n_entries();
            session.commit(step)?;
        }
        let eval = session.evaluate(1000)?;
        let manifest = session.finish()?;
        println!(
            "trained {name:<6} {} steps on cpu{}: loss {:.4}, held-out accuracy {:.1}%, {entries} tie-breaks logged, root {}",
            manifest.n_steps,
            faults.first().map(|f| format!(" with {}@{}", f.kind.name(), f.step)).unwrap_or_default(),
            eval.loss.unwrap_or(f64::NAN),
            100.0 * eval.accuracy.unwrap_or(f64::NAN),
            manifest.root
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(serve_and_audit(out, records))
}

async fn serve_and_audit(out: PathBuf, records: PathBuf) -> Result<()> {
    // 2. The trainer's record server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let trainer_url = format!("http://{}", listener.local_addr()?);
    let mut opts = trainer_agent::serve::ServeOptions::new(&records);
    opts.token = Some(TRAINER_TOKEN.into());
    let (stop_trainer, stopped) = tokio::sync::oneshot::channel::<()>();
    let trainer = tokio::spawn(trainer_agent::serve::serve(listener, opts, async {
        let _ = stopped.await;
    }));
    println!("trainer record server on {trainer_url}, serving runs honest and faulty");

    // 3. The auditor daemon.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let daemon_url = format!("http://{}", listener.local_addr()?);
    let state_dir = out.join("auditor-state");
    let cfg = auditor::daemon::Config {
        state_dir: state_dir.clone(),
        token: Some(DAEMON_TOKEN.into()),
        device: Profile::auditor_default(Some(Profile::Cpu)).name().into(),
        ..auditor::daemon::Config::default()
    };
    let (stop_daemon, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(auditor::daemon::serve(listener, cfg, async {
        let _ = stopped.await;
    }));
    println!("auditor daemon on {daemon_url}, state in {}", state_dir.display());

    // 4. Submit both audits.
    service::tls::install_provider();
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for run in ["honest", "faulty"] {
        let body = json!({"trainer_url": trainer_url, "run": run, "trainer_token": TRAINER_TOKEN, "mode": "intervals"});
        let (status, v) = call(
            client
                .post(format!("{daemon_url}/v1/audits"))
                .bearer_auth(DAEMON_TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await?;
        if status != 202 {
            bail!("POST /v1/audits for {run}: HTTP {status}: {v}");
        }
        let id = v["id"].as_str().context("no id in the answer")?.to_string();
        println!("submitted audit {id} of run {run}: POST {daemon_url}/v1/audits -> 202");
        ids.push((run, id));
    }

    // 5. Wait, fetch, check and print.
    for (run, id) in &ids {
        let t0 = Instant::now();
        let status = loop {
            let (_, s) = call(client.get(format!("{daemon_url}/v1/audits/{id}")).bearer_auth(DAEMON_TOKEN)).await?;
            match s["state"].as_str() {
                Some("done") => break s,
                Some("failed") => bail!("audit {id} of {run} failed: {}", s["error"]),
                _ if t0.elapsed() > Duration::from_secs(600) => bail!("audit {id} of {run} did not finish: {s}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let text = client.get(format!("{daemon_url}/v1/reports/{id}")).send().await?.error_for_status()?.text().await?;
        let checked = verify(&text).with_context(|| format!("the report of {id} does not verify"))?;
        let report: Value = serde_json::from_str(&text)?;
        let report_path = out.join(format!("{run}.report.json"));
        std::fs::write(&report_path, &text)?;
        println!(
            "audit {id} of {run:<6} on {}: verdict {} ({} steps replayed, {} bisection queries, {} inclusion proofs verified)",
            report["auditor_device"].as_str().unwrap_or("?"),
            status["verdict"].as_str().unwrap_or("?"),
            status["steps_replayed"],
            report["bisection"]["queries"],
            checked.proofs_checked
        );
        if let Some(step) = status["first_diverging_step"].as_u64() {
            println!("  first diverging step {step}");
            println!("  trainer state {}", report["at_step"]["trainer"]["leaf"]["state"].as_str().unwrap_or("?"));
            println!("  auditor state {}", report["at_step"]["auditor"]["state"].as_str().unwrap_or("?"));
            let ev = client.get(format!("{daemon_url}/v1/reports/{id}/evidence")).send().await?.error_for_status()?;
            let path = out.join(format!("{run}.evidence"));
            std::fs::write(&path, ev.bytes().await?)?;
            println!(
                "  evidence {}  (check it: auditor adjudicate --evidence {} --report {})",
                path.display(),
                path.display(),
                report_path.display()
            );
        }
        println!("  report   {}  (check it: auditor verify-report {})", report_path.display(), report_path.display());
    }
    let (_, metrics) = raw(client.get(format!("{daemon_url}/metrics"))).await?;
    let wanted = [
        "tiebreak_auditor_audits{state=\"done\"}",
        "tiebreak_auditor_steps_replayed_total",
        "tiebreak_auditor_divergences_total",
    ];
    for line in metrics.lines().filter(|l| wanted.iter().any(|w| l.starts_with(w))) {
        println!("  metric {line}");
    }

    let _ = stop_daemon.send(());
    daemon.await?.context("auditor daemon")?;
    let _ = stop_trainer.send(());
    trainer.await?.context("trainer record server")?;
    Ok(())
}

async fn raw(req: reqwest::RequestBuilder) -> Result<(u16, String)> {
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

async fn call(req: reqwest::RequestBuilder) -> Result<(u16, Value)> {
    let (status, text) = raw(req).await?;
    let v = serde_json::from_str(&text).with_context(|| format!("HTTP {status}: not JSON: {text}"))?;
    Ok((status, v))
}
