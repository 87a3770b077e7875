//! The record server end to end, in-process on `127.0.0.1:0`: every route against what the
//! verifying `Record` reader gives locally, unfinished runs, tokens, path traversal, bad
//! parameters, corrupt files, size limits, the recomputation limit, and the real binary's
//! startup line and SIGTERM shutdown.

use common::state::StateHash;
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::codec::{from_hex, hash_from_hex, to_hex};
use common::leaf::{BatchIndices, LEAF_BYTES};
use common::merkle::{self, verify_inclusion};
use common::state::TrainingState;
use common::tielog::{Direction, SiteLog, TieBreakLog, decompress_bounded};
use engine::data::Dataset;
use engine::record::{self, Record, RecordWriter, load_or_create_key};
use engine::spec::{Config, RunSpec};
use engine::train::{Run, StepMode};
use engine::wire::{self, ErrorBody, path};
use kernels::{Device, Profile};
use trainer_agent::serve::{ServeOptions, serve};
use trainer_agent::{Session, SessionOptions};

const BIN: &str = env!("CARGO_BIN_EXE_trainer-agent");
/// Steps of the test runs, and their checkpoint interval: checkpoints 0, 5, 10 and the final 12,
/// so most states must be recomputed.
const STEPS: u64 = 12;
const INTERVAL: u64 = 5;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tb-serve-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("records")).unwrap();
    d
}

fn session(base: &Path, run: &str, steps: u64) -> Session {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/synthetic-mlp.toml");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("checkpoint_interval = 20"), "the test config changed; update the test");
    let text = text.replace("checkpoint_interval = 20", &format!("checkpoint_interval = {INTERVAL}"));
    let opts = SessionOptions {
        config: Config::from_toml(&text, path).unwrap(),
        data: None,
        out: base.join("records").join(run),
        device: Profile::Cpu,
        steps: Some(steps),
        resume: false,
        faults: Vec::new(),
        key: Some(base.join("trainer.key")),
        init_weights: None,
    };
    Session::create(&opts).unwrap()
}

/// A finished record of [`STEPS`] steps at `records/<run>`.
fn finished(base: &Path, run: &str) -> PathBuf {
    let mut s = session(base, run, STEPS);
    while s.next_step().is_some() {
        s.step().unwrap();
    }
    s.finish().unwrap();
    base.join("records").join(run)
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    client: reqwest::Client,
    token: Option<String>,
}

async fn start(opts: ServeOptions) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = opts.token.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, opts, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    service::tls::install_provider();
    Server { addr, stop: Some(tx), task, client: reqwest::Client::new(), token }
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn ok(self) -> Vec<u8> {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        self.body
    }

    fn json<T: serde::de::DeserializeOwned>(self) -> T {
        let body = self.ok();
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
    }

    /// The error body, checking that its status is the one its code goes with.
    fn error(&self, code: &str) -> ErrorBody {
        let e: ErrorBody = serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("not an error body ({err}): {}", String::from_utf8_lossy(&self.body)));
        assert_eq!(e.code, code, "{e:?}");
        assert_eq!(self.status, wire::code::status(code), "{e:?}");
        e
    }

    /// A zstd body: checks the headers and returns the raw bytes.
    fn zstd(self) -> Vec<u8> {
        assert_eq!(self.headers["content-type"], wire::ZSTD_CONTENT_TYPE);
        let raw_bytes: usize = self.headers[wire::RAW_BYTES_HEADER].to_str().unwrap().parse().unwrap();
        let raw = decompress_bounded(&self.ok(), raw_bytes).unwrap();
        assert_eq!(raw.len(), raw_bytes);
        raw
    }
}

impl Server {
    async fn get(&self, route: &str) -> Reply {
        let mut req = self.client.get(format!("http://{}{route}", self.addr));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Reply { status, headers, body: r.bytes().await.unwrap().to_vec() }
    }

    /// A request written by hand, so that the path reaches the server exactly as given (a client
    /// library would normalise `..` and encodings). Returns the status and the body.
    async fn raw(&self, head: String) -> (u16, String) {
        let addr = self.addr;
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            let text = String::from_utf8_lossy(&out).to_string();
            let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
            (status, body)
        })
        .await
        .unwrap()
    }

    async fn raw_get(&self, target: &str) -> (u16, String) {
        self.raw(format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")).await
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("server shuts down").unwrap();
    }
}

fn raw_state_digest(raw: &[u8]) -> [u8; 32] {
    let state = TrainingState::decode(raw).unwrap();
    assert_eq!(state.digest(StateHash::Blake3), StateHash::Blake3.of(raw));
    state.digest(StateHash::Blake3)
}

#[tokio::test]
async fn every_route_serves_what_the_record_holds() {
    let base = tmp("routes");
    let dir = finished(&base, "run1");
    let rec = Record::open(&dir).unwrap();
    let leaves = rec.leaves().to_vec();
    let n = leaves.len() as u64;
    assert_eq!(n, STEPS + 1);
    let srv = start(ServeOptions::new(base.join("records"))).await;

    let list: wire::RunList = srv.get(&path::runs()).await.json();
    assert_eq!(list.runs, ["run1"]);
    let info: wire::RunInfo = srv.get(&path::run("run1")).await.json();
    let manifest = rec.manifest().unwrap();
    assert_eq!(
        info,
        wire::RunInfo {
            run: "run1".into(),
            n_steps: STEPS,
            complete: true,
            root: manifest.root.clone(),
            spec_hash: manifest.spec_hash.clone(),
            device_profile: "cpu".into(),
        }
    );
    assert_eq!(srv.get(&path::spec("run1")).await.ok(), std::fs::read(dir.join(record::SPEC_FILE)).unwrap());
    assert_eq!(srv.get(&path::manifest("run1")).await.ok(), std::fs::read(dir.join(record::MANIFEST_FILE)).unwrap());

    // Leaves in pages; a page running past the end is short; a start past the end is not found.
    let mut paged = Vec::new();
    for start in (0..n).step_by(5) {
        let page = srv.get(&path::leaves("run1", start, 5)).await.ok();
        assert_eq!(page.len() as u64, 5.min(n - start) * LEAF_BYTES as u64);
        paged.extend(page);
    }
    assert_eq!(paged, std::fs::read(dir.join(record::LEAVES_FILE)).unwrap());
    let all = srv.get(&path::leaves("run1", 0, wire::LEAVES_PAGE_MAX)).await.ok();
    assert_eq!(all, paged);
    srv.get(&path::leaves("run1", n, 1)).await.error(wire::code::NOT_FOUND);

    // Every node of every tree size, and every inclusion proof, against the local tree.
    let mut nodes = 0;
    for size in 1..=n {
        for lo in 0..size {
            for hi in lo + 2..=size {
                if !merkle::is_node(lo, hi, size) {
                    continue;
                }
                let pair: wire::NodePair = srv.get(&path::nodes("run1", lo, hi, size)).await.json();
                let (l, r) = rec.tree().child_hashes(lo, hi, size).unwrap();
                assert_eq!((pair.left, pair.right), (to_hex(&l), to_hex(&r)), "[{lo}, {hi}) of {size}");
                nodes += 1;
            }
        }
        let root = rec.tree().root_at(size).unwrap();
        for index in 0..size {
            let p: wire::LeafProof = srv.get(&path::proof("run1", index, size)).await.json();
            assert_eq!((p.index, p.size), (index, size));
            let leaf: [u8; LEAF_BYTES] = from_hex(&p.leaf).unwrap();
            assert_eq!(leaf, leaves[index as usize].encode());
            let proof: Vec<_> = p.proof.iter().map(|h| hash_from_hex(h).unwrap()).collect();
            verify_inclusion(&merkle::leaf_hash(&leaf), index, size, &proof, &root).unwrap();
        }
    }
    assert!(nodes > 30, "{nodes}");
    let signed_root = hash_from_hex(&manifest.root).unwrap();
    assert_eq!(rec.tree().root_at(n).unwrap(), signed_root);

    // Logs and batches of every step hash to their leaves.
    for step in 1..=STEPS {
        let raw = srv.get(&path::log("run1", step)).await.zstd();
        assert_eq!(TieBreakLog::decode(&raw).unwrap().digest(), leaves[step as usize].log, "log {step}");
        let batch = srv.get(&path::batch("run1", step)).await.ok();
        assert_eq!(BatchIndices::decode(&batch).unwrap().digest(), leaves[step as usize].batch, "batch {step}");
    }
    for step in [0, STEPS + 1] {
        srv.get(&path::log("run1", step)).await.error(wire::code::NOT_FOUND);
        srv.get(&path::batch("run1", step)).await.error(wire::code::NOT_FOUND);
    }

    // Checkpoints, and the state of every step: stored or recomputed, each equal to its leaf.
    let cps: wire::CheckpointList = srv.get(&path::checkpoints("run1")).await.json();
    assert_eq!(cps.steps, [0, 5, 10, 12]);
    for &c in &cps.steps {
        let raw = srv.get(&path::checkpoint("run1", c)).await.zstd();
        assert_eq!(raw_state_digest(&raw), leaves[c as usize].state, "checkpoint {c}");
    }
    srv.get(&path::checkpoint("run1", 3)).await.error(wire::code::NOT_FOUND);
    // Ascending (each from the previous one), then descending (each from its checkpoint).
    let order: Vec<u64> = (0..=STEPS).chain((0..=STEPS).rev()).collect();
    for step in order {
        let raw = srv.get(&path::state("run1", step)).await.zstd();
        assert_eq!(raw_state_digest(&raw), leaves[step as usize].state, "state {step}");
        assert_eq!(TrainingState::decode(&raw).unwrap().step, step);
    }
    srv.get(&path::state("run1", STEPS + 1)).await.error(wire::code::NOT_FOUND);
    srv.get(&path::run("nope")).await.error(wire::code::NO_SUCH_RUN);
    srv.get(&path::state("nope", 1)).await.error(wire::code::NO_SUCH_RUN);
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

/// A record whose spec names the `cuda` profile, written by the engine directly (its steps
/// computed on `cpu`, as a GPU's would be within the bounds): a server that cannot run `cuda`
/// (this build, or this machine) replays it on `cpu`, following the logs, and still serves only
/// states that reproduce their leaves.
fn finished_on_cuda_spec(base: &Path, run: &str) -> PathBuf {
    let config_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/synthetic-mlp.toml");
    let config = Config::from_toml(&std::fs::read_to_string(config_path).unwrap(), config_path).unwrap();
    let data = Dataset::for_config(&config, None).unwrap();
    let config = config.with_planned_steps(STEPS, data.n_train() as u64);
    let spec = RunSpec::new(config, data.commitment(), Profile::Cuda.name(), STEPS);
    let run_ = Run::new(spec.clone(), data, Device::new(Profile::Cpu).unwrap()).unwrap();
    let dir = base.join("records").join(run);
    let mut writer = RecordWriter::create(&dir, &spec).unwrap();
    let mut state = run_.initial_state().unwrap();
    writer.commit_initial(&state).unwrap();
    for step in 1..=STEPS {
        let out = run_.step(&state, step, StepMode::Commit { paper: false }, None).unwrap();
        writer.commit_step(&out.state, &out.log, &out.batch).unwrap();
        state = out.state;
    }
    writer.finish(&state, &load_or_create_key(&base.join("trainer.key")).unwrap()).unwrap();
    dir
}

#[tokio::test]
async fn a_cuda_record_is_recomputed_on_cpu_where_cuda_is_unavailable() {
    if Device::new(Profile::Cuda).is_ok() {
        eprintln!("skipped: this machine runs cuda, so the server would not fall back to cpu");
        return;
    }
    let base = tmp("cuda-spec");
    let dir = finished_on_cuda_spec(&base, "gpu");
    let leaves = Record::open(&dir).unwrap().leaves().to_vec();
    let srv = start(ServeOptions::new(base.join("records"))).await;
    let info: wire::RunInfo = srv.get(&path::run("gpu")).await.json();
    assert_eq!(info.device_profile, "cuda");
    // Steps between checkpoints are not stored: each is recomputed from its checkpoint.
    for step in [1, 3, 7, 11] {
        let raw = srv.get(&path::state("gpu", step)).await.zstd();
        assert_eq!(raw_state_digest(&raw), leaves[step as usize].state, "state {step}");
    }
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn an_unfinished_run_serves_its_committed_prefix_and_follows_training() {
    let base = tmp("unfinished");
    let mut training = session(&base, "live", STEPS);
    for _ in 0..7 {
        training.step().unwrap();
    }
    let srv = start(ServeOptions::new(base.join("records"))).await;
    let e = srv.get(&path::manifest("live")).await.error(wire::code::UNFINISHED);
    assert!(e.error.contains("7 steps"), "{e:?}");
    let info: wire::RunInfo = srv.get(&path::run("live")).await.json();
    assert_eq!((info.n_steps, info.complete), (7, false));
    assert_eq!(srv.get(&path::leaves("live", 0, 100)).await.ok().len(), 8 * LEAF_BYTES);
    let raw = srv.get(&path::state("live", 7)).await.zstd();
    assert_eq!(raw_state_digest(&raw), training.state().digest(StateHash::Blake3));
    srv.get(&path::state("live", 8)).await.error(wire::code::NOT_FOUND);
    // A run caught between writing its spec and its first leaf is not a record yet (not corrupt).
    let starting = base.join("records/starting");
    std::fs::create_dir_all(&starting).unwrap();
    std::fs::copy(base.join("records/live/spec.json"), starting.join(record::SPEC_FILE)).unwrap();
    std::fs::write(starting.join(record::LEAVES_FILE), b"").unwrap();
    srv.get(&path::run("starting")).await.error(wire::code::NO_SUCH_RUN);

    // The server re-opens the record when it grows, and when the manifest appears.
    for _ in 0..3 {
        training.step().unwrap();
    }
    let info: wire::RunInfo = srv.get(&path::run("live")).await.json();
    assert_eq!((info.n_steps, info.complete), (10, false));
    let raw = srv.get(&path::state("live", 9)).await.zstd();
    assert_eq!(raw_state_digest(&raw), Record::open(&base.join("records/live")).unwrap().leaves()[9].state);
    while training.next_step().is_some() {
        training.step().unwrap();
    }
    let m = training.finish().unwrap();
    let info: wire::RunInfo = srv.get(&path::run("live")).await.json();
    assert_eq!((info.n_steps, info.complete, info.root), (STEPS, true, m.root));
    srv.get(&path::manifest("live")).await.ok();
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn a_token_is_required_on_every_route_when_set() {
    let base = tmp("token");
    finished(&base, "run1");
    let srv = start(ServeOptions { token: Some("s3cret".into()), ..ServeOptions::new(base.join("records")) }).await;
    let url = |route: &str| format!("http://{}{route}", srv.addr);
    for route in [path::runs(), path::run("run1"), path::leaves("run1", 0, 1), "/nope".to_string()] {
        for auth in [None, Some("Bearer wrong"), Some("Bearer s3cret2"), Some("s3cret"), Some("Basic s3cret")] {
            let mut req = srv.client.get(url(&route));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let reply = Reply { status, headers: r.headers().clone(), body: r.bytes().await.unwrap().to_vec() };
            reply.error(wire::code::UNAUTHORIZED);
            assert_eq!(reply.headers["www-authenticate"], "Bearer");
        }
    }
    // With the token (Server::get sends it).
    let list: wire::RunList = srv.get(&path::runs()).await.json();
    assert_eq!(list.runs, ["run1"]);
    srv.get(&path::leaves("run1", 0, 1)).await.ok();
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn paths_cannot_leave_the_records_directory() {
    let base = tmp("traversal");
    finished(&base, "run1");
    // A real record outside the records directory, reachable only through a symlink, and a
    // file beside the records directory.
    let outside = finished(&tmp("traversal-outside"), "elsewhere");
    std::os::unix::fs::symlink(&outside, base.join("records/escape")).unwrap();
    std::os::unix::fs::symlink("../../", base.join("records/up")).unwrap();
    std::fs::write(base.join("secret"), "TOP-SECRET").unwrap();
    let spec = String::from_utf8(std::fs::read(outside.join(record::SPEC_FILE)).unwrap()).unwrap();
    let srv = start(ServeOptions::new(base.join("records"))).await;

    let list: wire::RunList = srv.get(&path::runs()).await.json();
    assert_eq!(list.runs, ["run1"], "a symlink out of the records directory is not a run");
    for target in [
        "/v1/runs/escape/spec".to_string(),
        "/v1/runs/up/spec".to_string(),
        "/v1/runs/../spec".to_string(),
        "/v1/runs/../../secret".to_string(),
        "/v1/runs/%2e%2e/spec".to_string(),
        "/v1/runs/%2E%2E/leaves?start=0&count=1".to_string(),
        "/v1/runs/..%2F..%2Fsecret/spec".to_string(),
        "/v1/runs/run1%2F..%2F..%2Ftraversal-outside%2Frecords%2Felsewhere/spec".to_string(),
        "/v1/runs/%2Fetc%2Fpasswd/spec".to_string(),
        "/v1/runs/%252e%252e/spec".to_string(),
        format!("/v1/runs/{}/spec", outside.display()),
        format!("/v1/runs/{}/spec", outside.display().to_string().replace('/', "%2F")),
        "/v1/runs/.hidden/spec".to_string(),
        "/v1/runs/run1%00/spec".to_string(),
        "/v1/runs/run1\\..\\escape/spec".replace('\\', "%5C"),
        "//etc/passwd".to_string(),
        "/v1/runs//spec".to_string(),
        "/v1/runs/escape/states/3".to_string(),
    ] {
        let (status, body) = srv.raw_get(&target).await;
        assert!(status == 400 || status == 404, "{target}: {status} {body}");
        let e: ErrorBody = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"));
        assert_eq!(wire::code::status(&e.code), status, "{target}: {e:?}");
        assert!(!body.contains("TOP-SECRET") && !body.contains(&spec), "{target} leaked a file: {body}");
    }
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(outside.parent().unwrap().parent().unwrap());
}

#[tokio::test]
async fn bad_parameters_are_refused_naming_the_parameter() {
    let base = tmp("params");
    finished(&base, "run1");
    let srv = start(ServeOptions::new(base.join("records"))).await;
    let r = "/v1/runs/run1";
    let max = wire::LEAVES_PAGE_MAX;
    for (target, named) in [
        (format!("{r}/leaves?start=0"), "count"),
        (format!("{r}/leaves?count=1"), "start"),
        (format!("{r}/leaves?start=abc&count=1"), "start"),
        (format!("{r}/leaves?start=-1&count=1"), "start"),
        (format!("{r}/leaves?start=0&count=0"), "count"),
        (format!("{r}/leaves?start=0&count={}", max + 1), "count"),
        (format!("{r}/leaves?start=0&count=99999999999999999999999"), "count"),
        (format!("{r}/leaves?start=0&count=1&count=2"), "count"),
        (format!("{r}/leaves?start=0&count=1&colour=red"), "colour"),
        (format!("{r}/nodes?lo=3&hi=5&size=13"), "lo"),
        (format!("{r}/nodes?lo=0&hi=1&size=13"), "lo"),
        (format!("{r}/nodes?lo=0&hi=16&size=13"), "hi"),
        (format!("{r}/nodes?lo=0&hi=16&size=16"), "size"),
        (format!("{r}/nodes?lo=0&hi=8"), "size"),
        (format!("{r}/nodes?lo=0&hi=8&size=0x10"), "size"),
        (format!("{r}/proofs/13?size=13"), "index"),
        (format!("{r}/proofs/0?size=14"), "size"),
        (format!("{r}/proofs/0"), "size"),
        (format!("{r}/proofs/x?size=3"), "index"),
        (format!("{r}/logs/one"), "step"),
        (format!("{r}/states/-1"), "step"),
        (format!("{r}/checkpoints/1e3"), "step"),
        (format!("{r}/spec?verbose=1"), "verbose"),
    ] {
        let (status, body) = srv.raw_get(&target).await;
        let e: ErrorBody = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"));
        assert_eq!((status, e.code.as_str()), (400, wire::code::BAD_REQUEST), "{target}: {body}");
        assert!(e.error.contains(named), "{target}: the error should name {named:?}: {}", e.error);
    }
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at.min(bytes.len() - 1);
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_corrupt_file_is_answered_422_naming_it() {
    let base = tmp("corrupt");
    let dir = finished(&base, "run1");
    let other = finished(&base, "run2");
    let srv = start(ServeOptions::new(base.join("records"))).await;
    // Served fine first, so the server holds the record open when the files change.
    srv.get(&path::state("run1", 7)).await.zstd();

    let cp = "checkpoints/0000000005.state.zst";
    flip_byte(&dir.join(cp), 40);
    // (State 8 would be replayed from the verified state 7 the server has just computed, so it
    // does not need the checkpoint; state 6 does.)
    for route in [path::checkpoint("run1", 5), path::state("run1", 5), path::state("run1", 6)] {
        let e = srv.get(&route).await.error(wire::code::CORRUPT);
        assert_eq!(e.file.as_deref(), Some(cp), "{route}: {e:?}");
    }
    let log = "steps/0000000003.log.zst";
    flip_byte(&dir.join(log), 20);
    for route in [path::log("run1", 3), path::state("run1", 4)] {
        let e = srv.get(&route).await.error(wire::code::CORRUPT);
        assert_eq!(e.file.as_deref(), Some(log), "{route}: {e:?}");
    }
    let batch = "steps/0000000002.batch";
    flip_byte(&dir.join(batch), 12);
    let e = srv.get(&path::batch("run1", 2)).await.error(wire::code::CORRUPT);
    assert_eq!(e.file.as_deref(), Some(batch), "{e:?}");
    // Files that are not corrupt are still served.
    srv.get(&path::log("run1", 4)).await.zstd();
    srv.get(&path::state("run1", 12)).await.zstd();
    srv.get(&path::state("run1", 11)).await.zstd();
    // A missing file is not found, not corrupt.
    std::fs::remove_file(dir.join("steps/0000000006.log.zst")).unwrap();
    srv.get(&path::log("run1", 6)).await.error(wire::code::NOT_FOUND);

    // A leaf that no longer matches the signed root: nothing of that run is served.
    flip_byte(&other.join(record::LEAVES_FILE), 3 * LEAF_BYTES + 20);
    for route in [path::run("run2"), path::leaves("run2", 0, 1), path::state("run2", 1)] {
        let e = srv.get(&route).await.error(wire::code::CORRUPT);
        assert_eq!(e.file.as_deref(), Some(record::LEAVES_FILE), "{route}: {e:?}");
        assert!(!e.error.contains(base.to_str().unwrap()), "no server paths in answers: {e:?}");
    }
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn a_state_is_served_only_if_replay_reproduces_its_leaf() {
    let base = tmp("replay");
    // Unfinished (no signed root), so a leaf can be changed without the record failing to open.
    let mut training = session(&base, "run1", STEPS);
    for _ in 0..8 {
        training.step().unwrap();
    }
    drop(training);
    let dir = base.join("records/run1");
    let srv = start(ServeOptions::new(base.join("records"))).await;
    srv.get(&path::state("run1", 7)).await.zstd();
    // Leaf 7 now commits to another state: the replay from checkpoint 5 cannot reproduce it.
    let leaves = dir.join(record::LEAVES_FILE);
    flip_byte(&leaves, 7 * LEAF_BYTES + 13);
    // The server notices a changed record by the length and modification time of its files; a
    // rewrite of the same length within one file-system timestamp tick would look unchanged.
    let later = std::fs::metadata(&leaves).unwrap().modified().unwrap() + Duration::from_secs(1);
    std::fs::File::options().write(true).open(&leaves).unwrap().set_modified(later).unwrap();
    let e = srv.get(&path::state("run1", 7)).await.error(wire::code::CORRUPT);
    assert_eq!((e.file.as_deref(), e.offset), (Some(record::LEAVES_FILE), Some(7 * LEAF_BYTES as u64)), "{e:?}");
    let leaf7 = Record::open(&dir).unwrap().leaves()[7].state;
    assert!(e.error.contains(&to_hex(&leaf7)), "both full digests are named: {e:?}");
    // The states before it still replay.
    srv.get(&path::state("run1", 6)).await.zstd();
    // A checkpoint replaced by another step's: the file fails its own leaf. (State 6 would now
    // come from the verified state 6 the server just computed, without the checkpoint.)
    std::fs::copy(dir.join("checkpoints/0000000000.state.zst"), dir.join("checkpoints/0000000005.state.zst")).unwrap();
    for route in [path::checkpoint("run1", 5), path::state("run1", 5)] {
        let e = srv.get(&route).await.error(wire::code::CORRUPT);
        assert_eq!(e.file.as_deref(), Some("checkpoints/0000000005.state.zst"), "{route}: {e:?}");
    }
    // A log replaced by another well-formed log fails its leaf before it is replayed.
    let mut site = SiteLog::new(64);
    site.push_direction(3, Direction::Up);
    let mut forged = TieBreakLog::default();
    forged.insert(0, site).unwrap();
    std::fs::write(dir.join("steps/0000000001.log.zst"), forged.compress()).unwrap();
    let e = srv.get(&path::state("run1", 3)).await.error(wire::code::CORRUPT);
    assert_eq!(e.file.as_deref(), Some("steps/0000000001.log.zst"), "{e:?}");
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn oversized_requests_and_responses_are_refused() {
    let base = tmp("limits");
    finished(&base, "run1");
    let srv = start(ServeOptions { response_bytes_max: 1000, ..ServeOptions::new(base.join("records")) }).await;
    assert_eq!(srv.get(&path::leaves("run1", 0, 9)).await.ok().len(), 9 * LEAF_BYTES);
    let e = srv.get(&path::leaves("run1", 0, 10)).await.error(wire::code::TOO_LARGE);
    assert!(e.error.contains("1090") && e.error.contains("1000"), "{e:?}");
    let (status, body) = srv
        .raw(format!(
            "GET {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 1000000\r\n\r\n",
            path::runs()
        ))
        .await;
    assert_eq!(status, 413, "{body}");
    let e: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(e.code, wire::code::TOO_LARGE);
    // A small body is tolerated (and ignored).
    let (status, body) = srv
        .raw(format!("GET {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", path::runs()))
        .await;
    assert_eq!(status, 200, "{body}");
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn recomputation_beyond_the_limit_is_answered_busy() {
    let base = tmp("busy");
    let dir = finished(&base, "run1");
    let srv = start(ServeOptions {
        recompute_max: 0,
        recompute_wait: Duration::from_millis(20),
        ..ServeOptions::new(base.join("records"))
    })
    .await;
    srv.get(&path::state("run1", 3)).await.error(wire::code::BUSY);
    // Stored checkpoints need no recomputation.
    let raw = srv.get(&path::state("run1", 5)).await.zstd();
    assert_eq!(raw_state_digest(&raw), Record::open(&dir).unwrap().leaves()[5].state);
    srv.stop().await;

    // One slot: concurrent requests either get the state or are told to retry; never anything
    // else, and at least one gets through.
    let srv = start(ServeOptions {
        recompute_max: 1,
        recompute_wait: Duration::from_millis(0),
        ..ServeOptions::new(base.join("records"))
    })
    .await;
    let srv = std::sync::Arc::new(srv);
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let srv = srv.clone();
            tokio::spawn(async move { srv.get(&path::state("run1", 1 + i % 4)).await })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 200 {
            served += 1;
        } else {
            r.error(wire::code::BUSY);
        }
    }
    assert!(served >= 1);
    std::sync::Arc::into_inner(srv).unwrap().stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let base = tmp("routes404");
    finished(&base, "run1");
    let srv = start(ServeOptions::new(base.join("records"))).await;
    srv.get("/v2/runs").await.error(wire::code::NOT_FOUND);
    srv.get("/v1/runs/run1/everything").await.error(wire::code::NOT_FOUND);
    let (status, body) =
        srv.raw(format!("DELETE {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", path::run("run1"))).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(serde_json::from_str::<ErrorBody>(&body).unwrap().code, wire::code::METHOD_NOT_ALLOWED);
    assert!(base.join("records/run1/manifest.json").exists());
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn the_binary_prints_its_address_and_exits_cleanly_on_sigterm() {
    let base = tmp("bin");
    finished(&base, "run1");
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--token", "t0k", "--records"])
        .arg(base.join("records"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("{line:?}"));
    let addr: SocketAddr = addr.parse().unwrap();
    assert_ne!(addr.port(), 0);

    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let req =
        format!("GET {} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer t0k\r\nConnection: close\r\n\r\n", path::runs());
    s.write_all(req.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with(r#"{"runs":["run1"]}"#), "{reply}");

    let kill = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("the server did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");

    // A missing records directory is a clear error, not a server.
    let o = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--records"])
        .arg(base.join("nowhere"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nowhere"));
    let _ = std::fs::remove_dir_all(&base);
}

/// Issue 14: the record server had no `/healthz` or `/metrics`; a state of a run whose dataset
/// the server lacks was a 500 (retried by auditors until their deadline), and one `--data`
/// could not serve MNIST and text runs together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_are_open_and_a_missing_dataset_is_a_plain_404() {
    let dir = std::env::temp_dir().join(format!("tb-serve-health-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let records = dir.join("records");
    std::fs::create_dir_all(&records).unwrap();
    let text = dir.join("tiny.txt");
    std::fs::write(&text, "to be or not to be, that is the question. ".repeat(40)).unwrap();
    let cfg = engine::spec::Config::from_toml(
        r#"
[model]
kind = "gpt"
layers = 1
d_model = 16
heads = 2
context = 8
dropout = 0.0
[data]
kind = "text"
holdout_fraction = 0.1
[train]
batch_size = 2
steps = 3
seed = 1
checkpoint_interval = 2
[optimizer]
kind = "sgd"
lr = 0.1
momentum = 0.9
weight_decay = 0.0
"#,
        "test",
    )
    .unwrap();
    let run = engine::train::Run::from_config(&cfg, Some(&text), kernels::Profile::Cpu, 3).unwrap();
    let mut w = engine::record::RecordWriter::create(&records.join("gpt"), &run.spec).unwrap();
    let mut state = run.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=3 {
        let o = run.step(&state, t, engine::train::StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &engine::record::SigningKey::from_bytes(&[7; 32])).unwrap();

    service::tls::install_provider();
    let c = reqwest::Client::new();
    use engine::spec::DataKind;
    for (datasets, status) in
        [(vec![], 404u16), (vec![(DataKind::Mnist, dir.join("no-mnist")), (DataKind::Text, text.clone())], 200)]
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut opts = trainer_agent::serve::ServeOptions::new(&records);
        opts.token = Some("tok".into());
        opts.datasets = datasets;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(trainer_agent::serve::serve(listener, opts, async {
            let _ = rx.await;
        }));
        let r = c.get(format!("{url}/v1/runs/gpt/states/1")).bearer_auth("tok").send().await.unwrap();
        let got = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(got, status, "{body}");
        if status == 404 {
            assert!(body.contains("--data text=PATH"), "{body}");
        }
        let health = c.get(format!("{url}/healthz")).send().await.unwrap().text().await.unwrap();
        let health: serde_json::Value = serde_json::from_str(&health).unwrap();
        assert_eq!((health["status"].as_str(), health["runs"].as_u64()), (Some("ok"), Some(1)), "{health}");
        let metrics = c.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("tiebreak_record_server_build_info{"), "{metrics}");
        assert!(metrics.contains("tiebreak_record_server_http_requests_total{class=\"4xx\"}"), "{metrics}");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }
}
