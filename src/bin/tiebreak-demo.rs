//! The main job, end to end on the embedded default (no data files, no server):
//! 1. train `configs/synthetic-mlp.toml` honestly on the `cpu` profile;
//! 2. train it again with an injected fault (default `perturb-weight@37`);
//! 3. audit both records on another profile (`cpu-seq`), interval-parallel;
//! 4. print the verdicts, the first diverging step with both full digests, and write the
//!    signed reports and the evidence bundle.
//!
//! ```text
//! cargo run --release -- [--out DIR] [--fault KIND@STEP]
//! ```
//! The daemon/HTTP flow (serve the record, submit the audit over HTTP) is not built yet; this
//! runs the same trainer and auditor libraries in process.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use auditor::replay::{AuditOptions, Mode, NoProgress, audit_dir};
use auditor::report::Report;
use engine::record::load_or_create_key;
use engine::spec::Config;
use engine::train::Fault;
use kernels::Profile;
use trainer_agent::{Session, SessionOptions};

fn main() -> Result<()> {
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
    let config = Config::from_toml(&std::fs::read_to_string(config_path)?, config_path)?;
    let key = load_or_create_key(&out.join("auditor.key"))?;

    for (name, faults) in [("honest", vec![]), ("faulty", vec![fault])] {
        let record = out.join(name);
        let opts = SessionOptions {
            config: config.clone(),
            data: None,
            out: record.clone(),
            device: Profile::Cpu,
            steps: None,
            resume: false,
            faults: faults.clone(),
            key: Some(out.join("trainer.key")),
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

        let mut opts = AuditOptions::new(Profile::CpuSeq);
        opts.mode = Mode::Intervals;
        let audit = audit_dir(&record, &opts, &NoProgress)?;
        let report = Report::build(&audit, &key);
        let report_path = out.join(format!("{name}.report.json"));
        std::fs::write(&report_path, report.to_json())?;
        let v = serde_json::to_value(&report.verdict)?;
        println!("audited {name:<6} on cpu-seq: verdict {}", v);
        if let Some(at) = &report.at_step {
            println!("  first diverging step {}", at.step);
            println!("  trainer state {}", at.trainer.leaf.state);
            println!("  auditor state {}", at.auditor.state);
        }
        if let Some(ev) = &audit.evidence {
            let path = out.join(format!("{name}.evidence"));
            ev.write(&path)?;
            println!("  evidence {}  (check it: auditor adjudicate --evidence {})", path.display(), path.display());
        }
        println!("  report   {}  (check it: auditor verify-report {})", report_path.display(), report_path.display());
    }
    Ok(())
}
