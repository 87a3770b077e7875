//! TLS end to end: a record server and a daemon serving HTTPS with a certificate from a private
//! CA (made here with the `openssl` command), the daemon reaching the `https://` trainer through
//! its `trainer.ca_file`, and the client CLI reaching the daemon with `--ca-file`. The verdicts
//! are those of plain HTTP, the report names the trainer's real `https://` URL, and a missing
//! CA is never a verdict: the client exits 2, the daemon fails the audit as undecided.

mod support;

use std::path::Path;
use std::process::Command;

use auditor::daemon::Config;
use serde_json::Value;
use support::{finished, honest_and_faulty, scratch, start_daemon};

/// A CA and a server certificate for localhost and 127.0.0.1, signed by it, in `dir`.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command (Debian package openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[
        &["req", "-x509"],
        &ec[..],
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tiebreak test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    run(&[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

async fn cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_auditor"))
            .args(&args)
            .env_remove("AUDITOR_TOKEN")
            .env("AUDITOR_TOKEN", "tls-secret")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_run_over_https_with_a_private_ca_and_a_missing_ca_is_never_a_verdict() {
    let dir = scratch("tls");
    make_certs(&dir);
    let (cert, key, ca) = (dir.join("server.pem"), dir.join("server.key"), dir.join("ca.pem"));
    let records = honest_and_faulty(&dir);

    // The record server over HTTPS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trainer_url = format!("https://localhost:{}", listener.local_addr().unwrap().port());
    let mut opts = trainer_agent::serve::ServeOptions::new(&records);
    opts.tls = Some(service::tls::ServerTls::from_pem_files(&cert, &key).unwrap());
    let (stop_trainer, stopped) = tokio::sync::oneshot::channel::<()>();
    let trainer = tokio::spawn(trainer_agent::serve::serve(listener, opts, async {
        let _ = stopped.await;
    }));

    // A daemon over HTTPS that trusts the private CA for trainers.
    let mut cfg = Config { state_dir: dir.join("state"), progress_interval_ms: 0, ..Config::default() };
    cfg.token = Some("tls-secret".into());
    (cfg.tls_cert, cfg.tls_key) = (Some(cert.clone()), Some(key.clone()));
    cfg.trainer.ca_file = Some(ca.clone());
    let daemon = start_daemon(cfg).await;
    let d = daemon.url.replace("http://127.0.0.1", "https://localhost");
    let ca_arg = ca.to_str().unwrap().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--daemon".into(), d.clone(), "--ca-file".into(), ca_arg.clone()]);
        v
    };

    let o = cli(args(&["submit", "--trainer-url", &trainer_url, "--run", "honest", "--wait"])).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = cli(args(&["submit", "--trainer-url", &trainer_url, "--run", "faulty", "--wait", "--json"])).await;
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let status: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((status["verdict"].as_str(), status["first_diverging_step"].as_u64()), (Some("diverged"), Some(6)));
    let report_file = dir.join("report.json");
    let id = status["id"].as_str().unwrap().to_string();
    let o = cli(args(&["report", &id, "--out", report_file.to_str().unwrap()])).await;
    assert_eq!(o.status.code(), Some(1), "verifies, adverse: {}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    assert!(report["record"].as_str().unwrap().starts_with(&trainer_url), "the real URL: {}", report["record"]);

    // The client without the CA, or over plain HTTP: could not decide (2), never a verdict.
    let plain = vec!["status".to_string(), id.clone(), "--daemon".into(), d.clone()];
    let o = cli(plain).await;
    assert_eq!(o.status.code(), Some(2), "unknown issuer: {}", String::from_utf8_lossy(&o.stderr));
    let o = cli(vec![
        "status".into(),
        id.clone(),
        "--daemon".into(),
        d.replace("https://", "http://"),
        "--ca-file".into(),
        ca_arg.clone(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(2), "plain HTTP to a TLS port: {}", String::from_utf8_lossy(&o.stderr));

    // A daemon that does not trust the CA: the audit fails, undecided, not against the trainer.
    let mut cfg = Config { state_dir: dir.join("state2"), progress_interval_ms: 0, ..Config::default() };
    cfg.trainer.request_timeout_ms = 500;
    cfg.trainer.backoff_initial_ms = 20;
    cfg.trainer.backoff_max_ms = 100;
    cfg.trainer.deadline_ms = 1_000;
    let untrusting = start_daemon(cfg).await;
    let c = reqwest::Client::new();
    let body = serde_json::json!({"trainer_url": trainer_url, "run": "honest"});
    let resp = c.post(format!("{}/v1/audits", untrusting.url)).body(body.to_string()).send().await.unwrap();
    let id2 =
        serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).unwrap()["id"].as_str().unwrap().to_string();
    let s = finished(&c, &untrusting.url, &id2, None).await;
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["verdict"].is_null() && s["reason"] == "undecided", "{s}");

    untrusting.stop().await;
    daemon.stop().await;
    let _ = stop_trainer.send(());
    trainer.await.unwrap().unwrap();
}
