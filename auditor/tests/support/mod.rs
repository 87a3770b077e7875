//! Writes small synthetic records with the engine directly (the auditor never depends on the
//! trainer agent): an MLP on synthetic data, 13 steps, a checkpoint every 4 steps.

#![allow(dead_code, reason = "each test binary uses a different part of the helpers")]

pub mod pg;
pub mod tamper;

use std::path::{Path, PathBuf};

use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{Fault, Run, StepMode};
use kernels::Profile;

pub const STEPS: u64 = 13;
pub const INTERVAL: u64 = 4;

pub const SGD: &str = "[optimizer]\nkind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 0.0001";
pub const ADAMW: &str =
    "[optimizer]\nkind = \"adamw\"\nlr = 0.01\nbeta1 = 0.9\nbeta2 = 0.999\neps = 1e-8\nweight_decay = 0.01";

pub fn config(optimizer: &str) -> Config {
    let text = format!(
        r#"
[model]
kind = "mlp"
hidden = [24, 12]
[data]
kind = "synthetic"
examples = 192
holdout = 16
features = 32
classes = 4
[train]
batch_size = 16
steps = {STEPS}
seed = 5
checkpoint_interval = {INTERVAL}
{optimizer}
"#
    );
    Config::from_toml(&text, "test").unwrap()
}

pub fn run(cfg: &Config, profile: Profile) -> Run {
    Run::from_config(cfg, None, profile, STEPS).unwrap()
}

/// A fresh, empty scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    // reqwest is built without a rustls provider; every client in these tests needs one.
    service::tls::install_provider();
    let dir = std::env::temp_dir().join(format!("tiebreak-auditor-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How the trainer misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Drill {
    pub fault: Option<Fault>,
    /// Commit an initial state that does not follow the seed.
    pub bad_init: bool,
    /// Stop before writing the manifest (an unfinished run).
    pub unfinished: bool,
    /// Sign the root after this many steps, fewer than the spec plans (a run stopped early).
    pub stop_after: Option<u64>,
}

/// Trains `STEPS` steps on `profile` and writes the record to `dir/record`.
pub fn write_record(dir: &Path, profile: Profile, optimizer: &str, drill: Drill) -> PathBuf {
    let cfg = config(optimizer);
    let r = run(&cfg, profile);
    let out = dir.join("record");
    let mut w = RecordWriter::create(&out, &r.spec).unwrap();
    let mut state = r.initial_state().unwrap();
    if drill.bad_init {
        let name = state.tensors().next().unwrap().0.to_string();
        let t = state.get_mut(&name).unwrap();
        t.data[0] = f32::from_bits(t.data[0].to_bits() ^ 1);
    }
    w.commit_initial(&state).unwrap();
    for t in 1..=drill.stop_after.unwrap_or(STEPS) {
        let fault = drill.fault.filter(|f| f.step == t).map(|f| f.kind);
        let o = r.step(&state, t, StepMode::Commit { paper: false }, fault).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    if !drill.unfinished {
        w.finish(&state, &SigningKey::from_bytes(&[7; 32])).unwrap();
    }
    out
}

/// Moves a record written by [`write_record`] to `records/<run>`, where a record server finds
/// it under that run id.
pub fn place(record: &Path, records: &Path, run: &str) -> PathBuf {
    std::fs::create_dir_all(records).unwrap();
    let to = records.join(run);
    std::fs::rename(record, &to).unwrap();
    to
}

/// `dir/records` holding `honest` and `faulty` (perturb-weight at step 6) SGD records
/// trained on `cpu`: what the service tests audit.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn honest_and_faulty(dir: &Path) -> PathBuf {
    let records = dir.join("records");
    place(&write_record(&dir.join("h"), Profile::Cpu, SGD, Drill::default()), &records, "honest");
    let fault = Fault { kind: engine::train::FaultKind::PerturbWeight, step: 6 };
    place(
        &write_record(&dir.join("f"), Profile::Cpu, SGD, Drill { fault: Some(fault), ..Drill::default() }),
        &records,
        "faulty",
    );
    records
}

/// Polls audit `id` on the daemon at `url` (with `token`, if any) until it is done or failed,
/// failing the test after two minutes.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub async fn finished(c: &reqwest::Client, url: &str, id: &str, token: Option<&str>) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    loop {
        let mut r = c.get(format!("{url}/v1/audits/{id}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let v: serde_json::Value = serde_json::from_slice(&r.send().await.unwrap().bytes().await.unwrap()).unwrap();
        if v["state"] == "done" || v["state"] == "failed" {
            return v;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(120), "audit {id} did not finish: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The real `auditor serve` binary on 127.0.0.1:0.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub struct DaemonProcess {
    pub child: std::process::Child,
    pub url: String,
}

/// Starts `auditor serve --config CONFIG --state-dir STATE` and reads the address it prints;
/// its log lines go to `stderr`.
#[allow(dead_code, reason = "not every test binary uses every helper")]
pub fn spawn_daemon(config: &Path, state: &Path, stderr: std::process::Stdio) -> DaemonProcess {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_auditor"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    DaemonProcess { child, url }
}

/// A server running in-process on 127.0.0.1:0; dropping the handle stops it.
pub struct Running {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn bound() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

/// The trainer's record server over `records`.
pub async fn start_trainer(records: &Path, token: Option<&str>) -> Running {
    let mut opts = trainer_agent::serve::ServeOptions::new(records);
    opts.token = token.map(String::from);
    start_trainer_with(opts).await
}

/// The trainer's record server with `opts`.
pub async fn start_trainer_with(opts: trainer_agent::serve::ServeOptions) -> Running {
    let (listener, url) = bound().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        trainer_agent::serve::serve(listener, opts, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running { url, stop: Some(tx), task: Some(task) }
}

/// An auditor daemon with `config` (its `listen` is ignored).
pub async fn start_daemon(config: auditor::daemon::Config) -> Running {
    let (listener, url) = bound().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        auditor::daemon::serve(listener, config, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running { url, stop: Some(tx), task: Some(task) }
}

/// `impl Store for $ty` where every call goes through `self.op(write, |s| s.<call>)`, `write`
/// saying whether the call may be followed by an injected crash (a simulation's faulty store:
/// `tests/daemon_sim.rs`, `tests/fleet_sim.rs`). `insert` and `recover` are not: the drivers
/// call them outside a crash boundary.
#[allow(unused_macros, reason = "two of the test binaries use it")]
macro_rules! delegate_store {
    ($ty:ty) => {
        impl auditor::daemon::job::Store for $ty {
            fn insert(&self, request: &auditor::daemon::job::AuditRequest, queued_max: u64, now_ms: u64) -> Result<auditor::daemon::job::Inserted, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.insert(request, queued_max, now_ms))
            }
            fn claim(&self, node: &str, now_ms: u64, lease_ms: u64) -> Result<Option<auditor::daemon::job::Job>, auditor::daemon::job::StoreError> {
                self.op(true, |s| s.claim(node, now_ms, lease_ms))
            }
            fn renew(&self, id: &str, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, auditor::daemon::job::StoreError> {
                self.op(true, |s| s.renew(id, node, now_ms, lease_ms))
            }
            fn publish(&self, id: &str, intervals: &[(u64, u64)], now_ms: u64) -> Result<(), auditor::daemon::job::StoreError> {
                self.op(true, |s| s.publish(id, intervals, now_ms))
            }
            fn claim_item(
                &self,
                node: &str,
                only: Option<&str>,
                now_ms: u64,
                lease_ms: u64,
            ) -> Result<Option<(auditor::daemon::job::Job, auditor::daemon::job::Item)>, auditor::daemon::job::StoreError> {
                self.op(true, |s| s.claim_item(node, only, now_ms, lease_ms))
            }
            fn renew_item(&self, id: &str, start: u64, node: &str, now_ms: u64, lease_ms: u64) -> Result<bool, auditor::daemon::job::StoreError> {
                self.op(true, |s| s.renew_item(id, start, node, now_ms, lease_ms))
            }
            fn item_done(&self, id: &str, start: u64, node: &str, now_ms: u64) -> Result<(), auditor::daemon::job::StoreError> {
                self.op(true, |s| s.item_done(id, start, node, now_ms))
            }
            fn release_item(&self, id: &str, start: u64, node: &str, refund: bool, now_ms: u64) -> Result<(), auditor::daemon::job::StoreError> {
                self.op(true, |s| s.release_item(id, start, node, refund, now_ms))
            }
            fn items(&self, id: &str) -> Result<Vec<auditor::daemon::job::Item>, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.items(id))
            }
            fn bind(&self, id: &str, node: &str, commitment: &str, keep: bool, now_ms: u64) -> Result<bool, auditor::daemon::job::StoreError> {
                self.op(true, |s| s.bind(id, node, commitment, keep, now_ms))
            }
            fn save_progress(&self, id: &str, start: u64, through: u64, steps: u64, commitment: &str, now_ms: u64) -> Result<(), auditor::daemon::job::StoreError> {
                self.op(true, |s| s.save_progress(id, start, through, steps, commitment, now_ms))
            }
            fn finish(&self, id: &str, decided: &auditor::daemon::job::Decided, now_ms: u64) -> Result<(), auditor::daemon::job::StoreError> {
                self.op(true, |s| s.finish(id, decided, now_ms))
            }
            fn fail(&self, id: &str, reason: auditor::daemon::job::FailReason, error: &str, now_ms: u64) -> Result<(), auditor::daemon::job::StoreError> {
                self.op(true, |s| s.fail(id, reason, error, now_ms))
            }
            fn requeue(&self, id: &str, node: &str, refund: bool, now_ms: u64) -> Result<(), auditor::daemon::job::StoreError> {
                self.op(true, |s| s.requeue(id, node, refund, now_ms))
            }
            fn recover(&self, node: &str, now_ms: u64) -> Result<u64, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.recover(node, now_ms))
            }
            fn get(&self, id: &str) -> Result<Option<auditor::daemon::job::Job>, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.get(id))
            }
            fn cancel(&self, id: &str, now_ms: u64) -> Result<Option<auditor::daemon::job::JobState>, auditor::daemon::job::StoreError> {
                self.op(true, |s| s.cancel(id, now_ms))
            }
            fn retry(&self, id: &str, queued_max: u64, now_ms: u64) -> Result<Option<(bool, auditor::daemon::job::JobState)>, auditor::daemon::job::StoreError> {
                self.op(true, |s| s.retry(id, queued_max, now_ms))
            }
            fn still_running(&self, id: &str) -> Result<bool, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.still_running(id))
            }
            fn list(&self, state: Option<auditor::daemon::job::JobState>, limit: u64, before: Option<&str>) -> Result<Vec<auditor::daemon::job::Job>, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.list(state, limit, before))
            }
            fn report(&self, id: &str) -> Result<Option<String>, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.report(id))
            }
            fn evidence(&self, id: &str) -> Result<Option<Vec<u8>>, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.evidence(id))
            }
            fn report_count(&self, id: &str) -> Result<u64, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.report_count(id))
            }
            fn count(&self, state: auditor::daemon::job::JobState) -> Result<u64, auditor::daemon::job::StoreError> {
                self.op(false, |s| s.count(state))
            }
        }
    };
}
#[allow(unused_imports, reason = "two of the test binaries use it")]
pub(crate) use delegate_store;

/// Copies a record directory (its files, `steps/` and `checkpoints/`) to `to`, replacing it.
pub fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    for sub in ["", "steps", "checkpoints"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, to.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
}
