//! The daemon end to end over HTTP, in-process on 127.0.0.1:0: real records behind the
//! trainer's record server, audits submitted, polled and reported; the report verifies and the
//! evidence adjudicates; bad requests get JSON 4xx; a trainer that stops answering during
//! bisection ends `trainer-unresponsive`; metrics count what happened.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use auditor::daemon::Config;
use auditor::daemon::job::{JobState, Store};
use auditor::daemon::store::SqliteStore;
use auditor::evidence::{Evidence, Side, adjudicate};
use auditor::report::verify;
use auditor::{AuditOptions, NoProgress, audit_dir};
use engine::train::{Fault, FaultKind};
use kernels::Profile;
use serde_json::{Value, json};
use support::{Drill, SGD, place, scratch, start_daemon, start_trainer, write_record};

fn config(state: &Path) -> Config {
    let mut c = Config { state_dir: state.to_path_buf(), progress_interval_ms: 0, ..Config::default() };
    c.trainer.request_timeout_ms = 2_000;
    c.trainer.backoff_initial_ms = 20;
    c.trainer.backoff_max_ms = 100;
    c.trainer.deadline_ms = 1_500;
    c
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value, Vec<u8>) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap().to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json, bytes)
}

fn post(c: &reqwest::Client, url: &str, body: &Value, token: Option<&str>) -> reqwest::RequestBuilder {
    let mut r = c
        .post(format!("{url}/v1/audits"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap());
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r
}

/// Polls an audit until it is done or failed.
async fn wait_done(c: &reqwest::Client, url: &str, id: &str, token: Option<&str>) -> Value {
    let t0 = Instant::now();
    loop {
        let mut r = c.get(format!("{url}/v1/audits/{id}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let (status, v, _) = send(r).await;
        assert_eq!(status, 200, "{v}");
        if v["state"] == "done" || v["state"] == "failed" {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "audit {id} did not finish: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_over_http_reach_the_verdicts_of_local_audits_and_publish_verifiable_reports() {
    let dir = scratch("daemon-http");
    let records = dir.join("records");
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 6 };
    let honest = place(&write_record(&dir.join("h"), Profile::Cpu, SGD, Drill::default()), &records, "honest");
    let faulty = place(
        &write_record(&dir.join("f"), Profile::Cpu, SGD, Drill { fault: Some(fault), ..Drill::default() }),
        &records,
        "faulty-6",
    );
    let trainer = start_trainer(&records, Some("trainer-secret")).await;
    let mut cfg = config(&dir.join("state"));
    cfg.token = Some("daemon-secret".into());
    let daemon = start_daemon(cfg).await;
    let c = reqwest::Client::new();
    let tok = Some("daemon-secret");

    let mut ids = Vec::new();
    for (run, mode) in [("faulty-6", "full"), ("honest", "intervals"), ("faulty-6", "intervals")] {
        let body = json!({"trainer_url": trainer.url, "run": run, "trainer_token": "trainer-secret", "mode": mode});
        let (status, v, _) = send(post(&c, &daemon.url, &body, tok)).await;
        assert_eq!(status, 202, "{v}");
        assert_eq!(v["state"], "queued");
        ids.push((run, v["id"].as_str().unwrap().to_string()));
    }
    for (run, id) in &ids {
        let record = if *run == "honest" { &honest } else { &faulty };
        let local = audit_dir(record, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
        let status = wait_done(&c, &daemon.url, id, tok).await;
        assert_eq!(status["state"], "done", "{status}");
        assert_eq!(status["verdict"], local.verdict.kind().as_str(), "{run}: {status}");
        assert_eq!(status["first_diverging_step"], json!(local.verdict.step()), "{run}");
        assert!(status.get("trainer_token").is_none() && !status.to_string().contains("trainer-secret"));

        // The report endpoint is open: anyone can fetch and check it.
        let (code, _, report) = send(c.get(format!("{}/v1/reports/{id}", daemon.url))).await;
        assert_eq!(code, 200);
        let text = String::from_utf8(report).unwrap();
        let checked = verify(&text).unwrap();
        assert_eq!(checked.verdict_kind, local.verdict.kind());
        let (code, err, bundle) = send(c.get(format!("{}/v1/reports/{id}/evidence", daemon.url))).await;
        if *run == "honest" {
            assert_eq!((code, err["code"].as_str()), (404, Some("not-found")), "{err}");
        } else {
            assert_eq!(code, 200);
            let ev = Evidence::decode(&bundle).unwrap();
            assert_eq!(ev.step, fault.step);
            let adj = adjudicate(&ev, Profile::CpuSplitK, None).unwrap();
            assert_eq!(adj.reproduces, Side::Auditor, "re-executing the step sides with the auditor");
        }
    }

    // Listing, metrics and health.
    let (code, list, _) = send(c.get(format!("{}/v1/audits", daemon.url)).bearer_auth("daemon-secret")).await;
    assert_eq!(code, 200);
    assert_eq!(list["audits"].as_array().unwrap().len(), 3);
    let (code, _, text) = send(c.get(format!("{}/metrics", daemon.url))).await;
    assert_eq!(code, 200);
    let text = String::from_utf8(text).unwrap();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.starts_with("tiebreak_auditor_"), "metric outside the tiebreak_auditor_ namespace: {line}");
    }
    let metric = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(metric("tiebreak_auditor_audits{state=\"done\"}"), 3.0);
    assert_eq!(metric("tiebreak_auditor_divergences_total"), 2.0);
    assert!(metric("tiebreak_auditor_steps_replayed_total") >= 13.0);
    assert!(metric("tiebreak_auditor_replay_step_seconds_count") >= 13.0);
    assert!(metric("tiebreak_auditor_bisection_queries_total") >= 2.0);
    let (code, health, _) = send(c.get(format!("{}/healthz", daemon.url))).await;
    assert_eq!((code, health["status"].as_str()), (200, Some("ok")));

    // A second daemon on the same state directory is refused; the first keeps its audits.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = auditor::daemon::serve(listener, config(&dir.join("state")), async {}).await;
    let e = second.expect_err("two daemons on one state directory").to_string();
    assert!(e.contains("another auditor daemon"), "{e}");
    let (_, list, _) = send(c.get(format!("{}/v1/audits?state=done", daemon.url)).bearer_auth("daemon-secret")).await;
    assert_eq!(list["audits"].as_array().unwrap().len(), 3);
    daemon.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let dir = scratch("daemon-bad");
    let mut cfg = config(&dir.join("state"));
    cfg.token = Some("t0k3n".into());
    cfg.queue_max = 2;
    cfg.body_bytes_max = 1024;
    // No worker may take the queued audits away while the queue bound is probed: the trainer
    // below does not exist, so they sit in retries.
    cfg.workers = 1;
    let daemon = start_daemon(cfg).await;
    let c = reqwest::Client::new();
    let url = &daemon.url;
    let ok = json!({"trainer_url": "http://127.0.0.1:9", "run": "r"});
    let raw = |body: &str| {
        c.post(format!("{url}/v1/audits"))
            .bearer_auth("t0k3n")
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    for (req, status, code) in [
        (post(&c, url, &ok, None), 401, "unauthorized"),
        (post(&c, url, &ok, Some("wrong")), 401, "unauthorized"),
        (raw("{not json"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"r\", \"typo\": 1}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"../../etc\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"file:///etc/passwd\", \"run\": \"r\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"r\", \"mode\": \"half\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"r\", \"device\": \"tpu\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"r\", \"from\": 5, \"to\": 2}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"r\", \"trainer_token\": \"a\\nb\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"r\", \"trainer_token\": \" \"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://x\", \"run\": \"r\", \"data\": \"../x\"}"), 400, "bad-request"),
        // The URL parser drops tabs and newlines: stored, logged and signed as given, fetched as
        // another string, and a way to forge log lines or send escapes to a terminal.
        (raw("{\"trainer_url\": \"http://127.0.0.1:9\\n\", \"run\": \"r\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://127.0.0.1:9\\t/x\", \"run\": \"r\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://127.0.0.1:9/\\u001b[2J\", \"run\": \"r\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \" http://127.0.0.1:9\", \"run\": \"r\"}"), 400, "bad-request"),
        (raw(&format!("{{\"trainer_url\": \"http://x\", \"run\": \"{}\"}}", "r".repeat(5000))), 413, "too-large"),
        (c.get(format!("{url}/v1/audits/audit-999")).bearer_auth("t0k3n"), 404, "not-found"),
        (c.get(format!("{url}/v1/audits/..%2F..%2Fetc")).bearer_auth("t0k3n"), 404, "not-found"),
        (c.get(format!("{url}/v1/reports/audit-999")), 404, "not-found"),
        (c.get(format!("{url}/v1/audits?state=sleeping")).bearer_auth("t0k3n"), 400, "bad-request"),
        (c.get(format!("{url}/v1/nothing")), 404, "not-found"),
        (c.delete(format!("{url}/v1/audits")).bearer_auth("t0k3n"), 405, "method-not-allowed"),
        // Credentials in a URL would be published in the report's `record` field.
        (raw("{\"trainer_url\": \"http://user:hunter2@127.0.0.1:9\", \"run\": \"r\"}"), 400, "bad-request"),
        (raw("{\"trainer_url\": \"http://user@127.0.0.1:9\", \"run\": \"r\"}"), 400, "bad-request"),
        // An id that is not UTF-8: the token first, then a JSON 404.
        (c.get(format!("{url}/v1/audits/%FF")), 401, "unauthorized"),
        (c.get(format!("{url}/v1/audits/%FF")).bearer_auth("t0k3n"), 404, "not-found"),
        (c.get(format!("{url}/v1/reports/%FF")), 404, "not-found"),
        (c.get(format!("{url}/v1/reports/%FF/evidence")), 404, "not-found"),
    ] {
        let (s, v, body) = send(req).await;
        assert!(!String::from_utf8_lossy(&body).contains("hunter2"), "a password echoed");
        assert_eq!((s, v["code"].as_str()), (status, Some(code)), "{}", String::from_utf8_lossy(&body));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    let (_, list, _) = send(c.get(format!("{url}/v1/audits")).bearer_auth("t0k3n")).await;
    assert_eq!(list["audits"], json!([]), "nothing was queued by a bad request");

    // A body announced over the limit and never sent: 413 at once, not a 408 after the
    // request time limit spent waiting for it.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = url.trim_start_matches("http://");
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = "POST /v1/audits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0k3n\r\nContent-Type: \
                    application/json\r\nContent-Length: 1000000000000\r\n\r\n{";
        sock.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut answer)).await.expect("answered at once");
        let answer = String::from_utf8_lossy(&answer[..n.unwrap()]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("too-large"), "{answer}");
    }

    // Idempotency: the same key gives the same audit; a different body under it is a conflict.
    let keyed = json!({"trainer_url": "http://127.0.0.1:9", "run": "r", "idempotency_key": "k1"});
    let (s1, a, _) = send(post(&c, url, &keyed, Some("t0k3n"))).await;
    let (s2, b, _) = send(post(&c, url, &keyed, Some("t0k3n"))).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(a["id"], b["id"]);
    let other = json!({"trainer_url": "http://127.0.0.1:9", "run": "other", "idempotency_key": "k1"});
    let (s, v, _) = send(post(&c, url, &other, Some("t0k3n"))).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("idempotency-conflict")), "{v}");
    let id = a["id"].as_str().unwrap();
    let (s, v, _) = send(c.get(format!("{url}/v1/reports/{id}"))).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not-ready")), "{v}");

    // The queue bound: the worker holds one audit, two more fill the queue, the next is refused.
    let mut codes = Vec::new();
    for i in 0..5 {
        let resp = post(&c, url, &json!({"trainer_url": "http://127.0.0.1:9", "run": format!("r{i}")}), Some("t0k3n"))
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            assert_eq!(
                resp.headers().get("retry-after").and_then(|v| v.to_str().ok()),
                Some("10"),
                "when to ask again"
            );
        }
        codes.push(resp.status().as_u16());
    }
    assert!(codes.contains(&429), "{codes:?}");
    let (_, queued, _) = send(c.get(format!("{url}/v1/audits?state=queued")).bearer_auth("t0k3n")).await;
    assert!(queued["audits"].as_array().unwrap().len() <= 2);
    // The trainer behind those audits never answered anything: the auditor cannot tell that
    // from its own network failing, so the audit fails without a verdict against anyone.
    let done = wait_done(&c, url, id, Some("t0k3n")).await;
    assert_eq!((done["state"].as_str(), done["verdict"].as_str()), (Some("failed"), None), "{done}");
    assert!(done["error"].as_str().unwrap().contains("did not answer"), "{done}");
    let (s, _, _) = send(c.get(format!("{url}/v1/reports/{id}"))).await;
    assert_eq!(s, 404, "no report is signed for an audit that could not decide");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_that_stops_answering_during_bisection_is_unresponsive_after_the_deadline() {
    let dir = scratch("daemon-silent");
    let records = dir.join("records");
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 9 };
    place(
        &write_record(&dir.join("f"), Profile::Cpu, SGD, Drill { fault: Some(fault), ..Drill::default() }),
        &records,
        "f",
    );
    let trainer = start_trainer(&records, None).await;
    // A proxy that forwards everything but never answers a bisection query.
    let upstream = trainer.url.clone();
    let proxy = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let upstream = upstream.clone();
        async move {
            if uri.path().ends_with("/nodes") {
                std::future::pending::<()>().await;
            }
            let resp = reqwest::get(format!("{upstream}{uri}")).await.unwrap();
            let status = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
            (status, resp.bytes().await.unwrap().to_vec())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, proxy).await.unwrap() });

    let daemon = start_daemon(config(&dir.join("state"))).await;
    let c = reqwest::Client::new();
    let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": proxy_url, "run": "f"}), None)).await;
    assert_eq!(s, 202, "{v}");
    let t0 = Instant::now();
    let status = wait_done(&c, &daemon.url, v["id"].as_str().unwrap(), None).await;
    assert_eq!(status["verdict"], "trainer-unresponsive", "{status}");
    assert!(t0.elapsed() < Duration::from_secs(30), "gave up after the deadline, not much later");
    let (_, _, report) = send(c.get(format!("{}/v1/reports/{}", daemon.url, v["id"].as_str().unwrap()))).await;
    let report: Value = serde_json::from_slice(&report).unwrap();
    assert!(report["verdict"].to_string().contains("nodes"), "the report says which request: {}", report["verdict"]);
    let (_, _, text) = send(c.get(format!("{}/metrics", daemon.url))).await;
    assert!(
        String::from_utf8(text).unwrap().contains("tiebreak_auditor_trainer_request_errors_total{kind=\"timeout\"}")
    );
    daemon.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_behind_the_server_is_commitment_invalid_naming_the_file() {
    let dir = scratch("daemon-corrupt");
    let records = dir.join("records");
    let record = place(&write_record(&dir.join("c"), Profile::Cpu, SGD, Drill::default()), &records, "corrupt");
    let log = engine::record::log_path(&record, 3);
    let mut bytes = std::fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&log, &bytes).unwrap();
    let local = audit_dir(&record, &AuditOptions::new(Profile::CpuSeq), &NoProgress).unwrap();
    assert_eq!(local.verdict.kind(), "commitment-invalid");

    let trainer = start_trainer(&records, None).await;
    let daemon = start_daemon(config(&dir.join("state"))).await;
    let c = reqwest::Client::new();
    let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": trainer.url, "run": "corrupt"}), None)).await;
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_str().unwrap();
    let status = wait_done(&c, &daemon.url, id, None).await;
    assert_eq!(status["verdict"], "commitment-invalid", "{status}");
    let (_, report, _) = send(c.get(format!("{}/v1/reports/{id}", daemon.url))).await;
    let verdict = report["verdict"].to_string();
    assert!(verdict.contains("0000000003.log.zst"), "the report names the file: {verdict}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "nothing on the trainer's side was touched");
    daemon.stop().await;
    trainer.stop().await;
}

/// A record server that hands out the spec, manifest and leaves, then refuses the disputed
/// step's log, its batch or a checkpoint (with each refusal status), or redirects elsewhere:
/// the daemon signs the same adverse verdict every time, naming the request, and nothing the
/// server said (its body, a redirect target) appears in the signed report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_after_committing_is_convicted_and_its_words_stay_out_of_the_report() {
    let dir = scratch("daemon-refusing");
    let records = dir.join("records");
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 6 };
    place(
        &write_record(&dir.join("f"), Profile::Cpu, SGD, Drill { fault: Some(fault), ..Drill::default() }),
        &records,
        "f",
    );
    let trainer = start_trainer(&records, None).await;
    let daemon = start_daemon(config(&dir.join("state"))).await;
    let c = reqwest::Client::new();
    let marker = "SECRET-INTERNAL-BODY";
    for (target, status) in [
        ("/logs/6", 400u16),
        ("/logs/6", 401),
        ("/batches/6", 403),
        ("/checkpoints/4", 404),
        ("/logs/6", 302),
        ("/batches/6", 307),
    ] {
        let upstream = trainer.url.clone();
        let proxy = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let upstream = upstream.clone();
            async move {
                if uri.path().ends_with(target) {
                    let code = axum::http::StatusCode::from_u16(status).unwrap();
                    let body = format!("{{\"error\": \"{marker}\", \"code\": \"{marker}\", \"file\": \"{marker}\"}}");
                    return axum::response::Response::builder()
                        .status(code)
                        .header("location", format!("{upstream}{uri}?{marker}"))
                        .body(axum::body::Body::from(body))
                        .unwrap();
                }
                let resp = reqwest::get(format!("{upstream}{uri}")).await.unwrap();
                let code = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
                let mut b = axum::response::Response::builder().status(code);
                for (k, v) in resp.headers() {
                    b = b.header(k, v);
                }
                b.body(axum::body::Body::from(resp.bytes().await.unwrap())).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, proxy).await.unwrap() });
        let ctx = format!("{status} on {target}");
        let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": proxy_url, "run": "f"}), None)).await;
        assert_eq!(s, 202, "{ctx}: {v}");
        let id = v["id"].as_str().unwrap().to_string();
        let done = wait_done(&c, &daemon.url, &id, None).await;
        assert_eq!(
            (done["state"].as_str(), done["verdict"].as_str()),
            (Some("done"), Some("commitment-invalid")),
            "{ctx}: {done}"
        );
        let (_, report, raw) = send(c.get(format!("{}/v1/reports/{id}", daemon.url))).await;
        let verdict = report["verdict"].to_string();
        let says = if status == 404 { "missing" } else { "withheld" };
        assert!(verdict.contains(says) && verdict.contains(&status.to_string()), "{ctx}: {verdict}");
        assert!(!String::from_utf8_lossy(&raw).contains(marker), "{ctx}: the server's words are in the report");
        assert!(!done.to_string().contains(marker), "{ctx}: the server's words are in the status: {done}");
        server.abort();
    }
    daemon.stop().await;
    trainer.stop().await;
}

/// A spot audit without a seed gets one drawn fresh at submission, kept with the audit and
/// written into the signed report; a given seed is reported as given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_audits_draw_a_fresh_seed_unless_given_one() {
    let dir = scratch("daemon-spot-seed");
    let records = dir.join("records");
    place(&write_record(&dir.join("h"), Profile::Cpu, SGD, Drill::default()), &records, "h");
    let trainer = start_trainer(&records, None).await;
    let daemon = start_daemon(config(&dir.join("state"))).await;
    let c = reqwest::Client::new();
    let mut seeds = Vec::new();
    for body in [
        json!({"trainer_url": trainer.url, "run": "h", "mode": "spot", "spot_count": 2}),
        json!({"trainer_url": trainer.url, "run": "h", "mode": "spot", "spot_count": 2}),
        json!({"trainer_url": trainer.url, "run": "h", "mode": "spot", "spot_count": 2, "spot_seed": 7}),
    ] {
        let (s, v, _) = send(post(&c, &daemon.url, &body, None)).await;
        assert_eq!(s, 202, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let done = wait_done(&c, &daemon.url, &id, None).await;
        assert_eq!(done["verdict"], "consistent", "{done}");
        let (_, report, _) = send(c.get(format!("{}/v1/reports/{id}", daemon.url))).await;
        seeds.push((report["spot_seed"].as_u64().unwrap(), report["spot_seed_chosen"].as_str().unwrap().to_string()));
    }
    assert_eq!((seeds[0].1.as_str(), seeds[1].1.as_str(), seeds[2].1.as_str()), ("fresh", "fresh", "given"));
    assert_ne!(seeds[0].0, seeds[1].0, "two fresh draws differ");
    assert_eq!(seeds[2].0, 7);
    let (s, v, _) = send(post(
        &c,
        &daemon.url,
        &json!({"trainer_url": trainer.url, "run": "h", "mode": "spot", "spot_seed_fresh": true}),
        None,
    ))
    .await;
    assert_eq!(s, 400, "a client cannot claim a seed was drawn fresh: {v}");
    daemon.stop().await;
    trainer.stop().await;
}

/// A proxy in front of `upstream`: every answer is delayed by `delay`, and while `hang` is set,
/// a request whose path ends with `hang_on` is never answered (`hit` is notified when one
/// arrives).
struct Proxy {
    url: String,
    hang: Arc<AtomicBool>,
    hit: Arc<tokio::sync::Notify>,
}

async fn proxy(upstream: String, hang_on: &'static str, delay: Duration) -> Proxy {
    let hang = Arc::new(AtomicBool::new(true));
    let hit = Arc::new(tokio::sync::Notify::new());
    let (h, n) = (hang.clone(), hit.clone());
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (upstream, h, n) = (upstream.clone(), h.clone(), n.clone());
        async move {
            if uri.path().ends_with(hang_on) && h.load(Ordering::SeqCst) {
                n.notify_one();
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(delay).await;
            let resp = reqwest::get(format!("{upstream}{uri}")).await.unwrap();
            let status = axum::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
            (status, resp.bytes().await.unwrap().to_vec())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Proxy { url, hang, hit }
}

/// Issue 14: a shutdown while a trainer request was in flight failed the audit for good ("A
/// Tokio 1.x context was found, but it is being shutdown"). The request is abandoned at once,
/// the audit goes back to the queue with its progress and its claim refunded, and the next
/// daemon finishes it from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_trainer_request_requeues_the_audit_with_its_progress() {
    let dir = scratch("daemon-sigterm");
    let records = dir.join("records");
    place(&write_record(&dir.join("h"), Profile::Cpu, SGD, Drill::default()), &records, "h");
    let trainer = start_trainer(&records, None).await;
    let p = proxy(trainer.url.clone(), "/logs/6", Duration::ZERO).await;
    let mut cfg = config(&dir.join("state"));
    cfg.trainer.request_timeout_ms = 60_000;
    cfg.trainer.deadline_ms = 60_000;
    cfg.shutdown_grace_ms = 5_000;
    let daemon = start_daemon(cfg.clone()).await;
    let c = reqwest::Client::new();
    let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": p.url, "run": "h"}), None)).await;
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    tokio::time::timeout(Duration::from_secs(60), p.hit.notified()).await.expect("the audit reached step 6");
    let t0 = Instant::now();
    daemon.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(3), "the request in flight was abandoned, not waited out");
    {
        let store = SqliteStore::open(&dir.join("state")).unwrap();
        let job = store.get(&id).unwrap().unwrap();
        assert_eq!((job.state, job.attempts, job.error.as_deref()), (JobState::Queued, 0, None), "{job:?}");
        assert_eq!(job.progress, [(0, 5)].into(), "steps 1-5 were verified before the shutdown");
    }
    p.hang.store(false, Ordering::SeqCst);
    let daemon = start_daemon(cfg).await;
    let done = wait_done(&c, &daemon.url, &id, None).await;
    assert_eq!((done["state"].as_str(), done["verdict"].as_str()), (Some("done"), Some("consistent")), "{done}");
    assert_eq!(done["steps_resumed"], 5, "{done}");
    daemon.stop().await;
    trainer.stop().await;
}

/// A trainer request outlasting the lease keeps it: the attempt's heartbeat renews it while it
/// waits. Before, the daemon's own next claim took over its live audit once the lease ran out,
/// and repeated takeovers ended it `gave-up` with nothing crashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_lease_keeps_the_audit_with_its_attempt() {
    let dir = scratch("daemon-heartbeat");
    let records = dir.join("records");
    place(&write_record(&dir.join("h"), Profile::Cpu, SGD, Drill::default()), &records, "h");
    let trainer = start_trainer(&records, None).await;
    let p = proxy(trainer.url.clone(), "/logs/4", Duration::ZERO).await;
    let mut cfg = config(&dir.join("state"));
    // Each hung request times out after 1 s and is retried: the trainer is silent for 3 s in all.
    cfg.trainer.request_timeout_ms = 1_000;
    cfg.trainer.deadline_ms = 60_000;
    cfg.workers = 3;
    cfg.store.lease_ms = 600;
    cfg.attempts_max = 2;
    let daemon = start_daemon(cfg).await;
    let c = reqwest::Client::new();
    let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": p.url, "run": "h"}), None)).await;
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    tokio::time::timeout(Duration::from_secs(60), p.hit.notified()).await.expect("the audit reached step 4");
    // Five leases' time with the request in flight, two idle workers polling for claims.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    p.hang.store(false, Ordering::SeqCst);
    let status = wait_done(&c, &daemon.url, &id, None).await;
    assert_eq!((status["state"].as_str(), status["verdict"].as_str()), (Some("done"), Some("consistent")), "{status}");
    assert_eq!(status["attempts"], 1, "claimed once: {status}");
    daemon.stop().await;
    trainer.stop().await;
}

/// The daemon's `audit_time_max_ms` bounds its own work, not the trainer's answering: a trainer
/// answering everything a little slowly is audited to the end however short that limit is (it
/// was `time-limit` before, not a verdict), and one holding every answer well past the free
/// second is unresponsive once its slowness adds up to `trainer.slow_answers_max_ms`, a signed
/// verdict, never the daemon's time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_trainer_is_unresponsive_not_the_daemons_time_limit() {
    let dir = scratch("daemon-time-limit");
    let records = dir.join("records");
    place(&write_record(&dir.join("h"), Profile::Cpu, SGD, Drill::default()), &records, "h");
    let trainer = start_trainer(&records, None).await;
    let mut cfg = config(&dir.join("state"));
    cfg.trainer.deadline_ms = 60_000;
    cfg.trainer.slow_answers_max_ms = 2_000;
    cfg.audit_time_max_ms = 1_000;
    let daemon = start_daemon(cfg).await;
    let c = reqwest::Client::new();
    for (delay_ms, verdict) in [(150, "consistent"), (1_600, "trainer-unresponsive")] {
        let p = proxy(trainer.url.clone(), "/never", Duration::from_millis(delay_ms)).await;
        let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": p.url, "run": "h"}), None)).await;
        assert_eq!(s, 202, "{v}");
        let id = v["id"].as_str().unwrap();
        let done = wait_done(&c, &daemon.url, id, None).await;
        assert_eq!((done["state"].as_str(), done["verdict"].as_str()), (Some("done"), Some(verdict)), "{done}");
        let (s, report, _) = send(c.get(format!("{}/v1/reports/{id}", daemon.url))).await;
        assert_eq!(s, 200);
        if verdict == "trainer-unresponsive" {
            assert!(report["verdict"]["what"].as_str().unwrap().contains("have been slow for"), "{report}");
        }
    }
    let (_, _, text) = send(c.get(format!("{}/metrics", daemon.url))).await;
    assert!(!String::from_utf8(text).unwrap().contains("reason=\"time-limit\"} 1"));
    daemon.stop().await;
    trainer.stop().await;
}

/// The operator's allow-list of trainers; `/readyz`; a lost database beside its key is refused
/// rather than reissuing `audit-1` under the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_limits_trainers_and_a_lost_database_is_refused() {
    let dir = scratch("daemon-allow");
    let mut cfg = config(&dir.join("state"));
    cfg.trainer.allow = vec!["127.0.0.1:9".into(), "localhost:*".into()];
    cfg.workers = 1;
    let daemon = start_daemon(cfg.clone()).await;
    let c = reqwest::Client::new();
    for (url, status) in [
        ("http://127.0.0.1:10", 403),
        ("http://10.0.0.1:9", 403),
        ("http://127.0.0.1:9", 202),
        ("http://localhost:4444", 202),
    ] {
        let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": url, "run": "r"}), None)).await;
        assert_eq!(s, status, "{url}: {v}");
        if s == 403 {
            assert_eq!(v["code"], "trainer-not-allowed", "{v}");
        }
    }
    let (s, v, _) = send(c.get(format!("{}/readyz", daemon.url))).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ready")), "{v}");
    daemon.stop().await;

    for f in ["auditor.sqlite3", "auditor.sqlite3-wal", "auditor.sqlite3-shm"] {
        let _ = std::fs::remove_file(dir.join("state").join(f));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let announced = AtomicBool::new(false);
    let e = auditor::daemon::serve_then(listener, cfg.clone(), async {}, || announced.store(true, Ordering::SeqCst))
        .await
        .expect_err("a lost database")
        .to_string();
    assert!(!announced.load(Ordering::SeqCst), "a daemon that refuses its state announces nothing");
    assert!(e.contains("auditor.key is there but auditor.sqlite3 is missing or empty") && e.contains("Restore"), "{e}");
    assert!(!dir.join("state/auditor.sqlite3").exists(), "no fresh database was made");
    // A database truncated to nothing is as lost: SQLite would take it for a new one and number
    // audits from audit-1 again under the same key.
    std::fs::write(dir.join("state/auditor.sqlite3"), b"").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = auditor::daemon::serve(listener, cfg, async {}).await.expect_err("an emptied database").to_string();
    assert!(e.contains("missing or empty"), "{e}");
    assert_eq!(std::fs::metadata(dir.join("state/auditor.sqlite3")).unwrap().len(), 0, "left as it was");
}

/// Issue 14: an honest checkpoint larger than `response_bytes_max` was `commitment-invalid`.
/// The auditor's limit follows the model now: the audit of a run whose states are larger than
/// the limit is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_checkpoint_larger_than_the_response_limit_is_audited() {
    use engine::record::{RecordWriter, SigningKey};
    use engine::train::{Run, StepMode};
    let dir = scratch("daemon-big-state");
    let text = r#"
[model]
kind = "mlp"
hidden = [160, 160]
[data]
kind = "synthetic"
examples = 64
holdout = 16
features = 32
classes = 4
[train]
batch_size = 8
steps = 2
seed = 5
checkpoint_interval = 2
[optimizer]
kind = "sgd"
lr = 0.1
momentum = 0.9
weight_decay = 0.0
"#;
    let cfg = engine::spec::Config::from_toml(text, "test").unwrap();
    let run = Run::from_config(&cfg, None, Profile::Cpu, 2).unwrap();
    let record = dir.join("records/big");
    let mut w = RecordWriter::create(&record, &run.spec).unwrap();
    let mut state = run.initial_state().unwrap();
    w.commit_initial(&state).unwrap();
    for t in 1..=2 {
        let o = run.step(&state, t, StepMode::Commit { paper: false }, None).unwrap();
        w.commit_step(&o.state, &o.log, &o.batch).unwrap();
        state = o.state;
    }
    w.finish(&state, &SigningKey::from_bytes(&[7; 32])).unwrap();
    let compressed = std::fs::metadata(engine::record::checkpoint_path(&record, 2)).unwrap().len();
    assert!(compressed > 65_536, "the checkpoint ({compressed} bytes) is over the limit below");

    let trainer = start_trainer(&dir.join("records"), None).await;
    let mut cfg = config(&dir.join("state"));
    cfg.trainer.response_bytes_max = 65_536;
    let daemon = start_daemon(cfg).await;
    let c = reqwest::Client::new();
    let (s, v, _) = send(post(&c, &daemon.url, &json!({"trainer_url": trainer.url, "run": "big"}), None)).await;
    assert_eq!(s, 202, "{v}");
    let done = wait_done(&c, &daemon.url, v["id"].as_str().unwrap(), None).await;
    assert_eq!((done["state"].as_str(), done["verdict"].as_str()), (Some("done"), Some("consistent")), "{done}");
    daemon.stop().await;
    trainer.stop().await;
}

/// Issue 14: idle and half-sent connections from an unauthenticated client starved `/healthz`.
/// Past the connection limit new connections are closed at once, and the header-read timeout
/// frees the held ones, so `/healthz` answers again within about that timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_client_does_not_starve_healthz() {
    use tokio::io::AsyncWriteExt;
    let dir = scratch("daemon-loris");
    let mut cfg = config(&dir.join("state"));
    cfg.connections_max = 100;
    cfg.header_read_timeout_ms = 500;
    let daemon = start_daemon(cfg).await;
    let addr = daemon.url.strip_prefix("http://").unwrap().to_string();
    let mut loris = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
        loris.push(s);
    }
    let c = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let t0 = Instant::now();
    loop {
        if let Ok(r) = c.get(format!("{}/healthz", daemon.url)).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "/healthz still starved after the header timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(loris);
    daemon.stop().await;
}

/// Newest-first listing with a cursor; cancel (`DELETE`) and retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_newest_first_and_audits_can_be_cancelled_and_retried() {
    let dir = scratch("daemon-cancel");
    let mut cfg = config(&dir.join("state"));
    cfg.workers = 1;
    cfg.token = Some("t".into());
    let daemon = start_daemon(cfg).await;
    let c = reqwest::Client::new();
    let url = &daemon.url;
    let mut ids = Vec::new();
    for i in 0..3 {
        // Nobody listens on port 9: each audit ends could-not-decide after the 1.5 s deadline.
        let (s, v, _) =
            send(post(&c, url, &json!({"trainer_url": "http://127.0.0.1:9", "run": format!("r{i}")}), Some("t"))).await;
        assert_eq!(s, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (_, page, _) = send(c.get(format!("{url}/v1/audits?limit=2")).bearer_auth("t")).await;
    let got: Vec<&str> = page["audits"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()], "newest first: {page}");
    assert_eq!(page["next"], ids[1].as_str());
    let (_, page, _) = send(c.get(format!("{url}/v1/audits?limit=2&before={}", ids[1])).bearer_auth("t")).await;
    assert_eq!(page["audits"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!((page["audits"][0]["id"].as_str(), &page["next"]), (Some(ids[0].as_str()), &Value::Null));
    for bad in ["0", "1001", "-1", "x"] {
        let (s, v, _) = send(c.get(format!("{url}/v1/audits?limit={bad}")).bearer_auth("t")).await;
        assert_eq!((s, v["code"].as_str()), (400, Some("bad-request")), "limit={bad}: {v}");
        assert!(v["error"].as_str().unwrap_or("").contains("limit"), "names the parameter: {v}");
    }

    let (s, v, _) = send(c.delete(format!("{url}/v1/audits/{}", ids[2])).bearer_auth("t")).await;
    assert_eq!((s, v["state"].as_str(), v["reason"].as_str()), (200, Some("failed"), Some("cancelled")), "{v}");
    let (s, _, _) = send(c.delete(format!("{url}/v1/audits/{}", ids[2]))).await;
    assert_eq!(s, 401, "cancelling needs the token");
    let (s, v, _) = send(c.delete(format!("{url}/v1/audits/audit-99")).bearer_auth("t")).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not-found")));
    let (s, v, _) = send(c.post(format!("{url}/v1/audits/{}/retry", ids[2])).bearer_auth("t")).await;
    assert_eq!((s, v["state"].as_str(), v["reason"].as_str()), (200, Some("queued"), None), "{v}");
    let (s, v, _) = send(c.post(format!("{url}/v1/audits/{}/retry", ids[2])).bearer_auth("t")).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("not-failed")), "{v}");
    let done = wait_done(&c, url, &ids[2], Some("t")).await;
    assert_eq!((done["state"].as_str(), done["reason"].as_str()), (Some("failed"), Some("undecided")), "{done}");
    daemon.stop().await;
}

/// Issue 16: a named key file is the firm's and is never made; an unreachable shared store stops
/// the start with an error that names it without its password.
#[tokio::test]
async fn a_missing_fleet_key_and_an_unreachable_store_are_clear_start_errors() {
    let dir = scratch("daemon-fleet-start");
    let start = |cfg: Config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        auditor::daemon::serve(listener, cfg, async {}).await.unwrap_err().to_string()
    };
    let mut cfg = config(&dir.join("state"));
    cfg.key_file = Some(dir.join("firm.key"));
    let e = start(cfg.clone()).await;
    assert!(e.contains("firm.key") && e.contains("never created"), "{e}");
    assert!(!dir.join("firm.key").exists(), "no key was made");

    std::fs::write(dir.join("firm.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    // A port nothing listens on (bound, then dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    cfg.store.url = Some(format!("postgres://auditor:s3cret-pw@127.0.0.1:{port}/tiebreak"));
    let e = start(cfg).await;
    assert!(e.contains(&port.to_string()), "the error names the store: {e}");
    assert!(!e.contains("s3cret-pw"), "never the password: {e}");
}

/// A fleet signs with one key: the first daemon on a database records its public key, and a
/// daemon with another key is refused at start, naming both (before, its reports verified under
/// a key the firm did not publish). PostgreSQL only (a SQLite store is one daemon's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_another_key_is_refused_by_its_fleet() {
    // The test database's own client blocks: kept off the runtime's threads.
    let Some(db) = tokio::task::block_in_place(|| support::pg::PgDb::create("fleetkey")) else { return };
    let dir = scratch("daemon-fleet-key");
    let daemon = |n: u8| {
        let mut cfg = config(&dir.join(format!("state-{n}")));
        cfg.store.url = Some(db.url.clone());
        cfg.store.node = Some(format!("node-{n}"));
        let key = dir.join(format!("key-{n}"));
        std::fs::write(&key, format!("{}\n", format!("{n:02x}").repeat(32))).unwrap();
        cfg.key_file = Some(key);
        cfg
    };
    let run = |cfg: Config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        auditor::daemon::serve(listener, cfg, async {}).await
    };
    run(daemon(1)).await.expect("the first daemon sets the fleet's key");
    run(daemon(1)).await.expect("the same key again");
    let e = run(daemon(2)).await.expect_err("another key").to_string();
    let public =
        |n: u8| common::codec::to_hex(ed25519_dalek::SigningKey::from_bytes(&[n; 32]).verifying_key().as_bytes());
    assert!(e.contains("not the fleet's") && e.contains(&public(1)) && e.contains(&public(2)), "{e}");
    tokio::task::block_in_place(|| drop(db));
}

/// A second daemon started under the node name of a live one would release that daemon's
/// leases and take its audits over mid-replay. Leases that are still being renewed refuse the
/// start; leases left by a process that died do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_name_in_use_by_a_live_daemon_is_refused() {
    use auditor::daemon::store::PgStore;
    let Some(db) = tokio::task::block_in_place(|| support::pg::PgDb::create("dupnode")) else { return };
    let dir = scratch("daemon-dup-node");
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let store = Arc::new(tokio::task::block_in_place(|| PgStore::connect(&db.url)).unwrap());
    let request = serde_json::from_value(json!({"trainer_url": "http://127.0.0.1:9", "run": "r"})).unwrap();
    let id = tokio::task::block_in_place(|| {
        store.insert(&request, 10, now()).unwrap();
        store.claim("node-1", now(), 60_000).unwrap().unwrap().id
    });
    // The live node-1: renews its lease all the while.
    let live = Arc::new(AtomicBool::new(true));
    let renewer = {
        let (store, live, id) = (store.clone(), live.clone(), id.clone());
        std::thread::spawn(move || {
            while live.load(Ordering::SeqCst) {
                assert!(store.renew(&id, "node-1", now(), 60_000).unwrap());
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut cfg = config(&dir.join("state"));
    cfg.store.url = Some(db.url.clone());
    cfg.store.node = Some("node-1".into());
    cfg.store.lease_ms = 300;
    cfg.key_file = Some(dir.join("firm.key"));
    std::fs::write(dir.join("firm.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let run = |cfg: Config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        auditor::daemon::serve(listener, cfg, async {}).await
    };
    let e = run(cfg.clone()).await.expect_err("node-1 is live").to_string();
    assert!(e.contains("another live daemon is working as node \"node-1\""), "{e}");
    let job = tokio::task::block_in_place(|| store.get(&id)).unwrap().unwrap();
    assert_eq!(job.state, JobState::Running, "its audit was left with it");
    // node-1 dies: its lease stops moving, and a restart under its name recovers the audit.
    live.store(false, Ordering::SeqCst);
    renewer.join().unwrap();
    run(cfg).await.expect("a restart after a crash");
    tokio::task::block_in_place(|| drop(db));
}
