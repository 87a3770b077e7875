//! Memory and threads of the real daemon binary stay bounded under the mixed load that once
//! pushed it from ~160 MiB to 450–750 MiB and 75–113 threads (issue 14): audits replaying
//! while 50 clients fetch a report as fast as they can. The daemon's resident set is sampled
//! from `/proc` throughout; the peak must stay under 250 MiB, and once the load stops the
//! thread count must come back near where it started (idle blocking threads end after 2 s).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use engine::record::{RecordWriter, SigningKey};
use engine::spec::Config;
use engine::train::{Run, StepMode};
use kernels::Profile;
use serde_json::{Value, json};
use support::{scratch, spawn_daemon, start_trainer};

/// A record heavy enough that its replay takes a while (a 256-128 MLP over 4096 examples).
fn record(dir: &Path, run: &str, steps: u64) {
    let text = format!(
        "[model]\nkind = \"mlp\"\nhidden = [256, 128]\n[data]\nkind = \"synthetic\"\nexamples = 4096\nholdout = 64\n\
         features = 256\nclasses = 10\n[train]\nbatch_size = 64\nsteps = {steps}\nseed = 3\ncheckpoint_interval = 16\n\
         [optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9"
    );
    let cfg = Config::from_toml(&text, "memory-test").unwrap();
    let r = Run::from_config(&cfg, None, Profile::Cpu, steps).unwrap();
    let mut w = RecordWriter::create(&dir.join(run), &r.spec).unwrap();
    let mut state = r.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=steps {
        let o = r.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[5; 32])).unwrap();
}

/// (resident KiB, threads) of process `pid`.
fn sample(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

async fn status(c: &reqwest::Client, url: &str, id: &str) -> Value {
    serde_json::from_slice(&c.get(format!("{url}/v1/audits/{id}")).send().await.unwrap().bytes().await.unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_and_threads_stay_bounded_under_audits_and_50_way_report_gets() {
    let dir = scratch("daemon-memory");
    let records = dir.join("records");
    std::fs::create_dir_all(&records).unwrap();
    record(&records, "small", 8);
    record(&records, "long", 96);
    let trainer = start_trainer(&records, None).await;
    let config = dir.join("auditor.toml");
    std::fs::write(&config, "workers = 2\n").unwrap();
    let daemon = spawn_daemon(&config, &dir.join("state"), Stdio::null());
    let (mut child, url) = (daemon.child, daemon.url);
    let pid = child.id();
    let c = reqwest::Client::new();
    let submit = |run: &str| {
        let body = json!({"trainer_url": trainer.url, "run": run, "mode": "intervals"});
        c.post(format!("{url}/v1/audits")).body(body.to_string()).send()
    };

    // A finished report to fetch, then the baseline.
    let first: Value = serde_json::from_slice(&submit("small").await.unwrap().bytes().await.unwrap()).unwrap();
    let report_id = first["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    while status(&c, &url, &report_id).await["state"] != "done" {
        assert!(t0.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss0, threads0) = sample(pid);

    // The load: four long audits, and 50 clients fetching the report until they are done.
    let mut ids = Vec::new();
    for _ in 0..4 {
        let v: Value = serde_json::from_slice(&submit("long").await.unwrap().bytes().await.unwrap()).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let fetched = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..50 {
        let (c, url, id, stop, fetched) =
            (reqwest::Client::new(), url.clone(), report_id.clone(), stop.clone(), fetched.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = c.get(format!("{url}/v1/reports/{id}")).send().await
                    && r.bytes().await.is_ok()
                {
                    fetched.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let (mut peak_rss, mut peak_threads) = (rss0, threads0);
    let t0 = Instant::now();
    loop {
        let (rss, threads) = sample(pid);
        (peak_rss, peak_threads) = (peak_rss.max(rss), peak_threads.max(threads));
        let mut done = 0;
        for id in &ids {
            let s = status(&c, &url, id).await;
            assert!(s["state"] != "failed", "{s}");
            done += usize::from(s["state"] == "done");
        }
        if done == ids.len() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "audits did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    let load_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (rss1, threads1) = sample(pid);
    println!(
        "daemon memory: baseline {} MiB / {threads0} threads; peak {} MiB / {peak_threads} threads over {load_s:.1} s \
         ({} report GETs, 4 audits); after {} MiB / {threads1} threads",
        rss0 / 1024,
        peak_rss / 1024,
        fetched.load(Ordering::Relaxed),
        rss1 / 1024
    );
    assert!(fetched.load(Ordering::Relaxed) > 50, "the load ran");
    assert!(peak_rss < 250 * 1024, "peak resident {} MiB", peak_rss / 1024);
    assert!(rss1 < 250 * 1024, "resident after the load {} MiB", rss1 / 1024);
    assert!(threads1 <= threads0 + 4, "threads after the load: {threads1} (baseline {threads0})");
    child.kill().unwrap();
    child.wait().unwrap();
    trainer.stop().await;
}
