//! Issue 16's acceptance test: a fleet of three `auditor serve` processes on one PostgreSQL
//! database shares the interval replays of two audits (one in full mode, one in intervals mode)
//! submitted to one of them. One daemon is killed with SIGKILL while it holds an interval's
//! lease, then the coordinator of an audit still running; the survivor takes the intervals and
//! the audit over once their leases expire, and each audit still ends exactly once, with the
//! verdict (and the first diverging step) of a single-process audit of the same record, in a
//! report signed with the firm's one key.
//!
//! The records are real MNIST (an MLP, 480 steps, a checkpoint every 40: 12 intervals of a few
//! hundred milliseconds each), so that intervals are in flight long enough to kill a daemon
//! holding one on a 2-core machine, and the whole test stays well under a minute there.
//!
//! Needs a PostgreSQL server: `TIEBREAK_PG_URL` names one (`eval "$(scripts/pg-throwaway.sh)"`
//! starts a throwaway cluster) and the test makes a fresh database on it. Without it the test
//! says it is skipped, unless `TIEBREAK_PG_REQUIRED=1` (CI), where that is a failure.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auditor::daemon::job::{ItemState, JobState, Store};
use auditor::daemon::store::PgStore;
use auditor::report::verify;
use auditor::{AuditOptions, Mode, NoProgress, audit_dir};
use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{FaultKind, Run, StepMode};
use kernels::Profile;
use serde_json::{Value, json};
use support::{DaemonProcess, scratch, spawn_daemon, start_trainer};

const STEPS: u64 = 480;
const CHECKPOINT_INTERVAL: u64 = 40;
/// Where the faulty record's weights are perturbed: inside the 8th of 12 intervals.
const FAULT_STEP: u64 = 290;
/// Short, so that the killed daemon's interval is taken over within seconds.
const LEASE_MS: u64 = 2_000;
const NODES: [&str; 3] = ["fleet-a", "fleet-b", "fleet-c"];
/// Each record and the mode it is audited in: a full audit is shared out by checkpoint
/// intervals too.
const MODES: [(&str, Mode); 2] = [("faulty", Mode::Full), ("honest", Mode::Intervals)];
/// The firm's signing key, shared by every daemon of the fleet.
const FIRM_KEY: [u8; 32] = [0x42; 32];

/// The shared server, or `None` (with a line saying the test is skipped) when there is none and
/// none is required.
fn pg_url() -> Option<String> {
    match std::env::var("TIEBREAK_PG_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let required = std::env::var("TIEBREAK_PG_REQUIRED").is_ok_and(|v| v.trim() == "1");
            assert!(
                !required,
                "TIEBREAK_PG_REQUIRED=1 but TIEBREAK_PG_URL is unset: start a server with \
                 `eval \"$(scripts/pg-throwaway.sh)\"`"
            );
            eprintln!(
                "fleet: SKIPPED, TIEBREAK_PG_URL is unset (start a throwaway server with \
                 `eval \"$(scripts/pg-throwaway.sh)\"`; TIEBREAK_PG_REQUIRED=1 makes this a failure)"
            );
            None
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

/// A fresh database on the server at `url`, dropped (with its connections) when the test ends.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    fn create(admin_url: &str) -> Database {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
        let name = format!("tiebreak_fleet_{}_{stamp}", std::process::id());
        let mut c = postgres::Client::connect(admin_url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to TIEBREAK_PG_URL to create a database: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        Database { admin_url: admin_url.to_string(), url: with_database(admin_url, &name), name }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // On a thread of its own: the `postgres` client starts a runtime, which panics inside
        // the test's.
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        })
        .join();
    }
}

/// The MNIST files shared with every developer and CI run.
fn shared_mnist() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist");
    assert!(
        d.join("t10k-images-idx3-ubyte.gz").exists(),
        "the fleet test audits MNIST records: {} holds no MNIST files",
        d.display()
    );
    d
}

/// Trains `STEPS` MNIST steps on `cpu` and writes the record to `out`, perturbing a weight at
/// `FAULT_STEP` when `faulty`.
fn mnist_record(out: &Path, data: &Path, faulty: bool) {
    let text = format!(
        "[model]\nkind = \"mlp\"\nhidden = [128]\n[data]\nkind = \"mnist\"\ntrain = 9000\nholdout = 1000\n\
         [train]\nbatch_size = 64\nsteps = {STEPS}\nseed = 3\ncheckpoint_interval = {CHECKPOINT_INTERVAL}\n\
         [optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\nweight_decay = 0.0001"
    );
    let cfg = Config::from_toml(&text, "fleet-test").unwrap();
    let r = Run::from_config(&cfg, Some(data), Profile::Cpu, STEPS).unwrap();
    let mut w = RecordWriter::create(out, &r.spec).unwrap();
    let mut state = r.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=STEPS {
        let fault = (faulty && t == FAULT_STEP).then_some(FaultKind::PerturbWeight);
        let o = r.step(&state, t, StepMode::Commit { paper: false }, fault).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[7; 32])).unwrap();
}

/// One daemon of the fleet: its node name, its process while it lives, its log file.
struct Member {
    node: &'static str,
    process: Option<DaemonProcess>,
    log: PathBuf,
}

/// The fleet's processes; dropping it kills those still alive, and prints the end of every
/// daemon's log when the test is failing.
struct Fleet {
    members: Vec<Member>,
}

impl Fleet {
    fn start(dir: &Path, db_url: &str, key: &Path, mnist: &Path) -> Fleet {
        let members = NODES
            .iter()
            .map(|&node| {
                let config = dir.join(format!("{node}.toml"));
                std::fs::write(
                    &config,
                    format!(
                        "workers = 1\nprogress_interval_ms = 100\nkey_file = {key:?}\n\
                         [store]\nurl = {db_url:?}\nnode = {node:?}\nlease_ms = {LEASE_MS}\n\
                         [data]\nmnist = {mnist:?}\n",
                        key = key.display().to_string(),
                        mnist = mnist.display().to_string(),
                    ),
                )
                .unwrap();
                let log = dir.join(format!("{node}.log"));
                let stderr = Stdio::from(std::fs::File::create(&log).unwrap());
                let process = spawn_daemon(&config, &dir.join(format!("state-{node}")), stderr);
                Member { node, process: Some(process), log }
            })
            .collect();
        Fleet { members }
    }

    fn url(&self, node: &str) -> String {
        let m = self.members.iter().find(|m| m.node == node).unwrap();
        m.process.as_ref().unwrap_or_else(|| panic!("{node} was killed")).url.clone()
    }

    /// A daemon still alive.
    fn survivor(&self) -> String {
        self.members.iter().find_map(|m| m.process.as_ref()).unwrap().url.clone()
    }

    /// SIGKILL: no graceful stop, its leases stay until they expire.
    fn kill(&mut self, node: &str) {
        let m = self.members.iter_mut().find(|m| m.node == node).unwrap();
        let mut p = m.process.take().unwrap_or_else(|| panic!("{node} was killed already"));
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(p) = &mut m.process {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
            if std::thread::panicking() {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                // The test's status polls would drown everything else.
                let lines: Vec<&str> = text.lines().filter(|l| !l.contains("request method=GET")).collect();
                eprintln!("----- {} ({}), last lines -----", m.node, m.log.display());
                for l in &lines[lines.len().saturating_sub(80)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// The store as the test reads it: each audit's coordinator and items.
#[derive(Debug)]
struct Snapshot {
    /// audit id → (state, coordinator while running).
    jobs: BTreeMap<String, (JobState, Option<String>)>,
    /// (audit id, item).
    items: Vec<(String, auditor::daemon::job::Item)>,
}

impl Snapshot {
    fn take(store: &PgStore, ids: &[String]) -> Snapshot {
        let mut s = Snapshot { jobs: BTreeMap::new(), items: Vec::new() };
        for id in ids {
            let job = store.get(id).unwrap().unwrap();
            s.jobs.insert(id.clone(), (job.state, job.owner));
            s.items.extend(store.items(id).unwrap().into_iter().map(|i| (id.clone(), i)));
        }
        s
    }

    /// Nodes that claimed an item (holding it now, or having finished it).
    fn replayers(&self) -> BTreeSet<String> {
        self.items.iter().filter(|(_, i)| i.state != ItemState::Pending).filter_map(|(_, i)| i.owner.clone()).collect()
    }

    /// The items `node` holds: (audit id, start, node).
    fn held_by(&self, node: &str) -> Vec<(String, u64, String)> {
        self.items
            .iter()
            .filter(|(_, i)| i.state == ItemState::Claimed && i.owner.as_deref() == Some(node))
            .map(|(id, i)| (id.clone(), i.start, node.to_string()))
            .collect()
    }

    /// Nodes holding an item's lease now.
    fn holders(&self) -> Vec<String> {
        self.items.iter().filter(|(_, i)| i.state == ItemState::Claimed).filter_map(|(_, i)| i.owner.clone()).collect()
    }

    fn coordinators(&self) -> BTreeSet<String> {
        self.jobs.values().filter(|(s, _)| *s == JobState::Running).filter_map(|(_, o)| o.clone()).collect()
    }

    fn all_ended(&self) -> bool {
        self.jobs.values().all(|(s, _)| matches!(s, JobState::Done | JobState::Failed))
    }

    /// One line per item: `audit [start, end] state owner claims/takeovers`.
    fn table(&self) -> String {
        self.items
            .iter()
            .map(|(id, i)| {
                format!(
                    "{id} ({}, {}] {} {} claims={} takeovers={}\n",
                    i.start,
                    i.end,
                    i.state.name(),
                    i.owner.as_deref().unwrap_or("-"),
                    i.claims,
                    i.takeovers
                )
            })
            .collect()
    }
}

/// Runs a blocking store call off the async runtime (the `postgres` client has its own).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shares_intervals_survives_a_kill_9_and_reports_each_audit_once_like_one_process() {
    let Some(admin_url) = pg_url() else { return };
    let t_test = Instant::now();
    let dir = scratch("fleet");
    let mnist = shared_mnist();
    let records = dir.join("records");
    std::fs::create_dir_all(&records).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| mnist_record(&records.join("honest"), &mnist, false));
        s.spawn(|| mnist_record(&records.join("faulty"), &mnist, true));
    });
    eprintln!("fleet: records written in {:.1} s", t_test.elapsed().as_secs_f64());

    let db = {
        let admin = admin_url.clone();
        blocking(move || Database::create(&admin)).await
    };
    let store = {
        let url = db.url.clone();
        // Migrates the fresh database before the daemons race to.
        Arc::new(blocking(move || PgStore::connect(&url).unwrap()).await)
    };
    let key = dir.join("firm.key");
    std::fs::write(&key, format!("{}\n", common::codec::to_hex(&FIRM_KEY))).unwrap();
    let firm_public = common::codec::to_hex(SigningKey::from_bytes(&FIRM_KEY).verifying_key().as_bytes());

    let trainer = start_trainer(&records, None).await;
    let mut fleet = Fleet::start(&dir, &db.url, &key, &mnist);
    let c = reqwest::Client::new();
    let t_fleet = Instant::now();
    let mut ids = Vec::new();
    for (run, mode) in MODES {
        let body = json!({"trainer_url": trainer.url, "run": run, "mode": mode.name()});
        let resp = c.post(format!("{}/v1/audits", fleet.url(NODES[0]))).body(body.to_string()).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        ids.push((run, v["id"].as_str().unwrap().to_string()));
    }
    let id_list: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    let snapshot = || {
        let (store, ids) = (store.clone(), id_list.clone());
        blocking(move || Snapshot::take(&store, &ids))
    };

    // Once intervals are replayed by two daemons or more, kill one that holds an interval's
    // lease, preferably one that coordinates no audit (then only the interval is taken over).
    let mut spread_since = None;
    let (victim, coordinated) = loop {
        let s = snapshot().await;
        if s.replayers().len() >= 2 {
            let since = *spread_since.get_or_insert_with(Instant::now);
            let coordinators = s.coordinators();
            let holders = s.holders();
            let pick = holders.iter().find(|h| !coordinators.contains(*h)).or_else(|| {
                // Every holder coordinates an audit: wait a little for a helper, then take one.
                (since.elapsed() > Duration::from_secs(3)).then(|| holders.first()).flatten()
            });
            if let Some(v) = pick {
                break (v.clone(), coordinators.contains(v));
            }
        }
        assert!(!s.all_ended(), "the audits ended before a daemon holding an interval could be killed:\n{}", s.table());
        assert!(t_fleet.elapsed() < Duration::from_secs(60), "intervals never spread:\n{}", s.table());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let node = NODES.iter().copied().find(|n| *n == victim).unwrap_or_else(|| panic!("unknown node {victim}"));
    let at_kill = snapshot().await;
    fleet.kill(node);
    let t_kill = t_fleet.elapsed();
    let mut held = at_kill.held_by(node);
    eprintln!(
        "fleet: killed {node} (coordinating an audit: {coordinated}) at {:.1} s, holding {held:?}\n{}",
        t_kill.as_secs_f64(),
        at_kill.table()
    );
    // Then, once the two left have each finished an interval, the coordinator of an audit
    // still running: once its lease expires, the survivor takes the audit over and resumes it
    // from every interval's durable progress.
    let at_second = loop {
        let s = snapshot().await;
        let finished: BTreeSet<&String> =
            s.items.iter().filter(|(_, i)| i.state == ItemState::Done).filter_map(|(_, i)| i.owner.as_ref()).collect();
        if finished.len() >= 2 || s.all_ended() || t_fleet.elapsed() > Duration::from_secs(60) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let coordinator = at_second.jobs.iter().find_map(|(id, (state, owner))| {
        let owner = owner.as_deref().filter(|o| *state == JobState::Running && *o != node)?;
        Some((id.clone(), NODES.iter().copied().find(|n| *n == owner)?))
    });
    match &coordinator {
        Some((id, second)) => {
            let second = *second;
            fleet.kill(second);
            held.extend(at_second.held_by(second));
            eprintln!(
                "fleet: killed {second}, coordinating {id}, at {:.1} s\n{}",
                t_fleet.elapsed().as_secs_f64(),
                at_second.table()
            );
        }
        None => eprintln!("fleet: NOTE no audit had a live coordinator left to kill:\n{}", at_second.table()),
    }

    // Both audits end, on the survivors, exactly once.
    let poll = fleet.survivor();
    let mut statuses = BTreeMap::new();
    for (run, id) in &ids {
        let status = support::finished(&c, &poll, id, None).await;
        assert_eq!(status["state"], "done", "{run}: {status}");
        statuses.insert(*run, status);
    }
    let t_done = t_fleet.elapsed();
    let end = snapshot().await;
    eprintln!("fleet: both audits done {:.1} s after submission\n{}", t_done.as_secs_f64(), end.table());
    for (run, id) in &ids {
        let (store, id2) = (store.clone(), id.clone());
        let count = blocking(move || store.report_count(&id2).unwrap()).await;
        assert_eq!(count, 1, "{run}: exactly one report");
    }

    // The work was shared, and the killed daemon's interval was taken over by another.
    assert!(end.items.iter().all(|(_, i)| i.state == ItemState::Done), "{}", end.table());
    assert!(end.items.len() as u64 == 2 * STEPS / CHECKPOINT_INTERVAL, "12 items per audit:\n{}", end.table());
    let finishers: BTreeSet<String> = end.items.iter().filter_map(|(_, i)| i.owner.clone()).collect();
    assert!(finishers.len() >= 2, "items done by {finishers:?} only:\n{}", end.table());
    for (id, start, holder) in &held {
        let (_, item) = end.items.iter().find(|(i, it)| i == id && it.start == *start).unwrap();
        assert!(
            item.takeovers >= 1,
            "{id} interval {start} held by the killed {holder} was not taken over:\n{}",
            end.table()
        );
        assert_ne!(item.owner.as_ref(), Some(holder), "{id} interval {start}");
    }
    if let Some((id, second)) = coordinator {
        let finisher = end.jobs[&id].1.clone();
        assert!(finisher.is_some() && finisher.as_deref() != Some(second), "{id} finished by {finisher:?}");
    }
    if held.is_empty() {
        // Each finished its interval between the look and the kill (a few microseconds).
        eprintln!("fleet: NOTE no killed daemon held an interval when it died; no takeover to check");
    }
    for (id, item) in &end.items {
        assert_eq!(
            item.claims,
            1 + item.takeovers,
            "{id} interval {} replayed twice without a lease expiry:\n{}",
            item.start,
            end.table()
        );
    }

    // The verdicts, the first diverging step and the reports are those of one process.
    for (run, id) in &ids {
        let mut opts = AuditOptions::new(Profile::CpuSeq);
        opts.mode = MODES.iter().find(|(r, _)| r == run).unwrap().1;
        opts.data = Some(mnist.clone());
        let local = audit_dir(&records.join(run), &opts, &NoProgress).unwrap();
        let status = &statuses[run];
        assert_eq!(status["verdict"], local.verdict.kind().as_str(), "{run}: {status}");
        assert_eq!(status["first_diverging_step"], json!(local.verdict.step()), "{run}: {status}");
        let text = c.get(format!("{poll}/v1/reports/{id}")).send().await.unwrap().text().await.unwrap();
        let checked = verify(&text).unwrap_or_else(|e| panic!("{run}: the report does not verify: {e}\n{text}"));
        assert_eq!(checked.auditor_public_key, firm_public, "{run}: signed with the firm's key");
        assert_eq!(checked.verdict_kind, local.verdict.kind(), "{run}");
        let report: Value = serde_json::from_str(&text).unwrap();
        // Steps checked up to the finding: what helpers replayed past it does not count.
        assert_eq!(report["steps_replayed"], local.steps_replayed, "{run}");
        if *run == "faulty" {
            assert_eq!(local.verdict.step(), Some(FAULT_STEP));
            let detail = local.detail.unwrap();
            assert_eq!(report["at_step"]["step"], FAULT_STEP);
            assert_eq!(report["at_step"]["auditor"]["state"], common::codec::to_hex(&detail.auditor_leaf.state));
            assert_eq!(
                report["at_step"]["trainer"]["leaf"]["state"],
                common::codec::to_hex(&detail.trainer.leaf.state)
            );
        }
    }
    drop(fleet);
    trainer.stop().await;
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "fleet: passed in {:.1} s (kill at {:.1} s, audits done at {:.1} s after submission)",
        t_test.elapsed().as_secs_f64(),
        t_kill.as_secs_f64(),
        t_done.as_secs_f64()
    );
}
