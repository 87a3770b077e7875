//! A hostile record server in front of an honest one: whatever it does to escape a verdict on a
//! run that diverged — an endless answer to a request whose honest answer is small, a run info
//! claiming more steps than there are, a withheld or refused manifest when the auditor pins the
//! key, states answered busy forever — the
//! audit ends in an adverse verdict, in bounded time and memory, and never panics.

mod support;

use std::sync::Arc;
use std::time::Duration;

use auditor::http::{HttpTrainer, RetryPolicy};
use auditor::{AuditOptions, NoProgress, Verdict, audit};
use engine::train::{Fault, FaultKind};
use kernels::Profile;
use support::{Drill, SGD, place, scratch, start_trainer, write_record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the hostile server does to requests whose path contains its needle.
#[derive(Debug, Clone, Copy)]
enum Trick {
    /// 200 with a chunked body that never ends.
    Endless(&'static str),
    /// The run info claims 2⁶² committed steps.
    ClaimSteps,
    /// The run info claims this many committed steps.
    ClaimStepsOf(u64),
    /// The manifest answered `404 unfinished`.
    WithholdManifest,
    /// Every state answered `503 busy`, forever.
    BusyStates,
    /// The manifest refused (`403`) after the spec was served.
    RefuseManifest,
}

/// A whole JSON answer with `status`.
fn answer(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves `upstream`'s answers, one request per connection, except where `trick` applies.
async fn hostile(upstream: String, trick: Trick) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = Arc::new(upstream);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let path = target.split('?').next().unwrap_or("").to_string();
                match trick {
                    Trick::Endless(needle) if path.contains(needle) => {
                        let header = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                        if sock.write_all(header.as_bytes()).await.is_err() {
                            return;
                        }
                        let chunk = [b"10000\r\n".as_slice(), &[b'7'; 0x10000], b"\r\n"].concat();
                        while sock.write_all(&chunk).await.is_ok() {}
                        return;
                    }
                    Trick::WithholdManifest if path.ends_with("/manifest") => {
                        let body = r#"{"code":"unfinished","error":"the run is unfinished"}"#;
                        let _ = sock.write_all(answer("404 Not Found", body).as_bytes()).await;
                        return;
                    }
                    Trick::RefuseManifest if path.ends_with("/manifest") => {
                        let body = r#"{"code":"forbidden","error":"no"}"#;
                        let _ = sock.write_all(answer("403 Forbidden", body).as_bytes()).await;
                        return;
                    }
                    Trick::BusyStates if path.contains("/states/") => {
                        let body = r#"{"code":"busy","error":"busy"}"#;
                        let _ = sock.write_all(answer("503 Service Unavailable", body).as_bytes()).await;
                        return;
                    }
                    _ => {}
                }
                let resp = reqwest::get(format!("{upstream}{target}")).await.unwrap();
                let status = resp.status();
                let mut headers = String::new();
                for (k, v) in resp.headers() {
                    if !["content-length", "transfer-encoding", "connection"].contains(&k.as_str()) {
                        headers += &format!("{k}: {}\r\n", v.to_str().unwrap());
                    }
                }
                let mut body = resp.bytes().await.unwrap().to_vec();
                let claim = match trick {
                    Trick::ClaimSteps => Some(1u64 << 62),
                    Trick::ClaimStepsOf(n) => Some(n),
                    _ => None,
                };
                if let Some(n) = claim.filter(|_| path.split('/').count() == 4 && status.is_success()) {
                    let mut info: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    info["n_steps"] = n.into();
                    body = serde_json::to_vec(&info).unwrap();
                }
                let head = format!(
                    "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(&[head.as_bytes(), &body].concat()).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_record_server_cannot_turn_a_divergence_into_could_not_decide() {
    let dir = scratch("hostile-server");
    let fault = Fault { kind: FaultKind::PerturbWeight, step: 6 };
    let drill = Drill { fault: Some(fault), ..Drill::default() };
    let record = place(&write_record(&dir.join("f"), Profile::Cpu, SGD, drill), &dir.join("records"), "f");
    let key = serde_json::from_slice::<serde_json::Value>(&std::fs::read(record.join("manifest.json")).unwrap())
        .unwrap()["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let trainer = start_trainer(&dir.join("records"), None).await;
    let policy = RetryPolicy {
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        deadline: Duration::from_secs(5),
        ..RetryPolicy::default()
    };
    for trick in [
        Trick::Endless("/nodes"),
        Trick::Endless("/proofs/"),
        Trick::Endless("/checkpoints"),
        Trick::Endless("/manifest"),
        Trick::Endless("/spec"),
        Trick::Endless("/batches/"),
        Trick::ClaimSteps,
        Trick::WithholdManifest,
        Trick::BusyStates,
        Trick::RefuseManifest,
    ] {
        let url = hostile(trainer.url.clone(), trick).await;
        let (mut policy, key) = (policy.clone(), key.clone());
        if let Trick::BusyStates = trick {
            // A state only names the differing tensors: a busy trainer does not hold back the
            // verdict for the whole deadline.
            policy.deadline = Duration::from_secs(120);
        }
        let t0 = std::time::Instant::now();
        let verdict = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let src = HttpTrainer::new(&url, "f", None, policy, rt.handle().clone()).unwrap();
            // The auditor pins the trainer's key: a withheld manifest must not make that a way out.
            let opts = AuditOptions { trainer_key: Some(key), ..AuditOptions::new(Profile::CpuSeq) };
            audit(&src, &opts, &NoProgress).map(|a| a.verdict)
        })
        .await
        .unwrap();
        match (trick, &verdict) {
            (Trick::WithholdManifest | Trick::BusyStates, Ok(Verdict::Diverged { step: 6, .. })) => {}
            (Trick::Endless(_), Ok(Verdict::CommitmentInvalid { what, .. })) => {
                assert!(what.contains("more than the"), "{trick:?}: {what}");
            }
            (Trick::RefuseManifest, Ok(Verdict::CommitmentInvalid { what, .. })) => {
                assert!(what.contains("withheld after the trainer's server served its spec"), "{what}");
            }
            (Trick::ClaimSteps, Ok(Verdict::CommitmentInvalid { what, .. })) => {
                assert!(what.contains("more than the 13 its spec plans"), "{trick:?}: {what}");
            }
            _ => panic!("{trick:?}: {verdict:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{trick:?}: {:?}", t0.elapsed());
    }
    trainer.stop().await;
}

/// The run info is not signed: a server claiming every planned step of a run whose signed
/// manifest commits to fewer must not make the auditor size, and refuse as its own limit, leaves
/// that were never committed (the limit here fits the 11 signed leaves, not the 14 planned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_count_the_signed_manifest_contradicts_is_a_finding() {
    let dir = scratch("hostile-server-count");
    let drill = Drill {
        fault: Some(Fault { kind: FaultKind::PerturbWeight, step: 6 }),
        stop_after: Some(10),
        ..Drill::default()
    };
    place(&write_record(&dir.join("f"), Profile::Cpu, SGD, drill), &dir.join("records"), "f");
    let trainer = start_trainer(&dir.join("records"), None).await;
    let policy =
        RetryPolicy { deadline: Duration::from_secs(5), response_bytes_max: 12 * 109, ..RetryPolicy::default() };
    for (claim, expect) in [(10, "diverged"), (13, "its signed manifest 10")] {
        let url = hostile(trainer.url.clone(), Trick::ClaimStepsOf(claim)).await;
        let policy = policy.clone();
        let verdict = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let src = HttpTrainer::new(&url, "f", None, policy, rt.handle().clone()).unwrap();
            audit(&src, &AuditOptions::new(Profile::CpuSeq), &NoProgress).map(|a| a.verdict)
        })
        .await
        .unwrap();
        match (&verdict, expect) {
            (Ok(Verdict::Diverged { step: 6, .. }), "diverged") => {}
            (Ok(Verdict::CommitmentInvalid { what, .. }), _) if what.contains(expect) => {}
            _ => panic!("a claim of {claim} steps: {verdict:?}"),
        }
    }
    trainer.stop().await;
}

/// An address that is not a record server at all (a typo in the path, another web server) has
/// presented no record: could not decide, never a signed verdict against a trainer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_is_not_a_record_server_is_no_verdict() {
    for (status, body) in [(404u16, "<html>not found</html>"), (200, "<html>welcome</html>")] {
        let app = axum::Router::new().fallback(move || async move {
            (axum::http::StatusCode::from_u16(status).unwrap(), [("content-type", "text/html")], body)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/typo", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let got = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let src = HttpTrainer::new(&url, "f", None, RetryPolicy::default(), rt.handle().clone()).unwrap();
            audit(&src, &AuditOptions::new(Profile::CpuSeq), &NoProgress).map(|a| a.verdict)
        })
        .await
        .unwrap();
        match got {
            Err(e) => assert!(e.to_string().contains("record server"), "{status}: {e}"),
            Ok(v) => panic!("{status}: a verdict against an address that served no record: {v:?}"),
        }
        server.abort();
    }
}
