//! The real `auditor` binary, killed with SIGKILL while it replays, restarted on the same state
//! directory: the audit resumes from its last durable progress point and exactly one report
//! comes out, the same verdict and leaves as an uninterrupted audit. Then SIGTERM: the daemon
//! stops gracefully, the running audit goes back to the queue with its progress, and the next
//! start finishes it.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use auditor::report::verify;
use auditor::{AuditOptions, NoProgress, audit_dir};
use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{FaultKind, Run, StepMode};
use kernels::Profile;
use serde_json::{Value, json};
use support::{DaemonProcess as Daemon, scratch, spawn_daemon, start_trainer};

const STEPS: u64 = 240;
const FAULT_STEP: u64 = 200;

/// A longer record than the other tests' (so that replay takes a few seconds), with a weight
/// perturbed at `FAULT_STEP`.
fn long_record(dir: &Path, run_id: &str, fault: bool) -> PathBuf {
    let text = format!(
        "[model]\nkind = \"mlp\"\nhidden = [96, 48]\n[data]\nkind = \"synthetic\"\nexamples = 4096\nholdout = 64\n\
         features = 96\nclasses = 8\n[train]\nbatch_size = 48\nsteps = {STEPS}\nseed = 11\ncheckpoint_interval = 64\n\
         [optimizer]\nkind = \"adamw\"\nlr = 0.003\nbeta1 = 0.9\nbeta2 = 0.999\neps = 1e-8\nweight_decay = 0.01"
    );
    let cfg = Config::from_toml(&text, "crash-test").unwrap();
    let r = Run::from_config(&cfg, None, Profile::Cpu, STEPS).unwrap();
    let out = dir.join(run_id);
    let mut w = RecordWriter::create(&out, &r.spec).unwrap();
    let mut state = r.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=STEPS {
        let f = (fault && t == FAULT_STEP).then_some(FaultKind::PerturbWeight);
        let o = r.step(&state, t, StepMode::Commit { paper: false }, f).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[9; 32])).unwrap();
    out
}

/// Starts `auditor serve` on `config` and `state`, its logs on this test's stderr.
fn start(config: &Path, state: &Path) -> Daemon {
    spawn_daemon(config, state, Stdio::inherit())
}

fn sqlite_reports(state: &Path, id: &str) -> i64 {
    let conn = rusqlite::Connection::open(state.join(auditor::daemon::store::DB_FILE)).unwrap();
    conn.query_row("SELECT COUNT(*) FROM reports WHERE id = ?1", [id], |r| r.get(0)).unwrap()
}

async fn status(c: &reqwest::Client, d: &Daemon, id: &str) -> Value {
    let resp = c.get(format!("{}/v1/audits/{id}", d.url)).send().await.unwrap();
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

/// Polls until `done(status)` holds.
async fn until(c: &reqwest::Client, d: &Daemon, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = status(c, d, id).await;
        if done(&s) {
            return s;
        }
        assert!(s["state"] != "failed", "{s}");
        assert!(t0.elapsed() < Duration::from_secs(240), "timed out waiting for {what}: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_resumes_and_reports_once_and_sigterm_requeues_with_progress() {
    let dir = scratch("daemon-crash");
    let records = dir.join("records");
    std::fs::create_dir_all(&records).unwrap();
    let faulty = long_record(&records, "faulty", true);
    let honest = long_record(&records, "honest", false);
    let trainer = start_trainer(&records, None).await;
    let state = dir.join("state");
    let config = dir.join("auditor.toml");
    std::fs::write(&config, "workers = 1\nprogress_interval_ms = 0\nshutdown_grace_ms = 20000\n").unwrap();
    let c = reqwest::Client::new();

    // 1. kill -9 in the middle of replay.
    let log = dir.join("first.log");
    let mut d = spawn_daemon(&config, &state, Stdio::from(std::fs::File::create(&log).unwrap()));
    let body = json!({"trainer_url": trainer.url, "run": "faulty"});
    let resp = c.post(format!("{}/v1/audits", d.url)).body(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let id = serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).unwrap()["id"].as_str().unwrap().to_string();
    let s = until(&c, &d, &id, "replay under way", |s| s["steps_replayed"].as_u64().unwrap_or(0) >= 40).await;
    assert_eq!(s["state"], "running", "killed while replaying: {s}");
    // Live progress while it runs: the whole record's steps (full mode), a rate and an ETA once
    // steps are replayed.
    let s = until(&c, &d, &id, "live progress", |s| s["progress"]["eta_seconds"].is_u64()).await;
    let p = &s["progress"];
    assert_eq!(p["steps_total"], STEPS, "{s}");
    let done = p["steps_done"].as_u64().unwrap();
    assert!((1..=STEPS).contains(&done) && p["steps_per_second"].as_f64().unwrap() > 0.0, "{s}");
    d.child.kill().unwrap(); // SIGKILL
    d.child.wait().unwrap();
    assert_eq!(sqlite_reports(&state, &id), 0);
    // Its logs went to a file: plain text, no terminal colour codes.
    let logged = std::fs::read_to_string(&log).unwrap();
    eprint!("{logged}");
    assert!(logged.contains("audit claimed"), "{logged}");
    assert!(!logged.contains('\u{1b}'), "colour codes in a log file");

    let d = start(&config, &state);
    let s = until(&c, &d, &id, "the resumed audit", |s| s["state"] == "done").await;
    // `attempts` counts claims since the audit last moved forward: the resumed attempt did.
    assert_eq!(s["attempts"], 1, "the kill is no strike against an audit that made progress: {s}");
    assert!(s["steps_resumed"].as_u64().unwrap() >= 40, "resumed from its durable progress, not from 0: {s}");
    assert_eq!(s["verdict"], "diverged", "{s}");
    assert_eq!(s["first_diverging_step"], FAULT_STEP, "{s}");
    assert_eq!(sqlite_reports(&state, &id), 1, "exactly one report");
    let report = c.get(format!("{}/v1/reports/{id}", d.url)).send().await.unwrap().text().await.unwrap();
    verify(&report).unwrap();
    let report: Value = serde_json::from_str(&report).unwrap();
    let local = audit_dir(&faulty, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    let detail = local.detail.unwrap();
    assert_eq!(report["at_step"]["step"], FAULT_STEP);
    assert_eq!(report["at_step"]["auditor"]["state"], common::codec::to_hex(&detail.auditor_leaf.state));
    assert_eq!(report["at_step"]["trainer"]["leaf"]["state"], common::codec::to_hex(&detail.trainer.leaf.state));
    assert_eq!(report["steps_replayed"], local.steps_replayed, "resumed steps count as replayed");

    // 2. SIGTERM while replaying: graceful stop, the audit goes back to the queue.
    let mut d = d;
    let body = json!({"trainer_url": trainer.url, "run": "honest", "idempotency_key": "honest-1"});
    let resp = c.post(format!("{}/v1/audits", d.url)).body(body.to_string()).send().await.unwrap();
    let id2 =
        serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).unwrap()["id"].as_str().unwrap().to_string();
    until(&c, &d, &id2, "replay under way", |s| s["steps_replayed"].as_u64().unwrap_or(0) >= 20).await;
    sigterm(&d.child);
    let exit = d.child.wait().unwrap();
    assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
    {
        let conn = rusqlite::Connection::open(state.join(auditor::daemon::store::DB_FILE)).unwrap();
        let (st, through): (String, i64) = conn
            .query_row(
                "SELECT state, (SELECT MAX(through) FROM progress WHERE progress.id = jobs.id) FROM jobs WHERE id = ?1",
                [&id2],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(st, "queued", "requeued on shutdown");
        assert!(through >= 20, "with its progress: {through}");
    }
    let mut d = start(&config, &state);
    let s = until(&c, &d, &id2, "the requeued audit", |s| s["state"] == "done").await;
    assert_eq!(s["verdict"], "consistent", "{s}");
    assert!(s["steps_resumed"].as_u64().unwrap() >= 20, "{s}");
    assert_eq!(s["attempts"], 1, "a graceful shutdown does not use up an attempt: {s}");
    let list: Value =
        serde_json::from_slice(&c.get(format!("{}/v1/audits", d.url)).send().await.unwrap().bytes().await.unwrap())
            .unwrap();
    assert_eq!(list["audits"].as_array().unwrap().len(), 2, "no audit lost or duplicated: {list}");
    assert_eq!(sqlite_reports(&state, &id), 1);
    assert_eq!(sqlite_reports(&state, &id2), 1);
    let _ = honest;
    sigterm(&d.child);
    assert!(d.child.wait().unwrap().success());
    trainer.stop().await;
}

/// Issue 14: SIGHUP killed the daemon. Now it never stops it, and a `--token-file` token is
/// read again (rotation without a restart); a blank file keeps the current token.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_file_and_never_stops_the_daemon() {
    let dir = scratch("daemon-hup");
    let token = dir.join("token");
    std::fs::write(&token, "first\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_auditor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--token-file")
        .arg(&token)
        .env_remove("AUDITOR_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    let c = reqwest::Client::new();
    let code = |t: &'static str| {
        let req = c.get(format!("{url}/v1/audits")).bearer_auth(t).send();
        async move { req.await.unwrap().status().as_u16() }
    };
    assert_eq!((code("first").await, code("second").await), (200, 401));
    let hup = || assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    std::fs::write(&token, "second\n").unwrap();
    hup();
    let t0 = Instant::now();
    while code("second").await != 200 {
        assert!(t0.elapsed() < Duration::from_secs(5), "SIGHUP did not reload the token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The replaced token is still accepted for the grace period (an hour by default), so a
    // client in the middle of its work is not cut off by a routine rotation.
    assert_eq!(code("first").await, 200, "the replaced token, within its grace period");
    assert_eq!(code("third").await, 401);
    std::fs::write(&token, "  \n").unwrap();
    hup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped the daemon");
    assert_eq!(code("second").await, 200, "a blank file keeps the current token");
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}
