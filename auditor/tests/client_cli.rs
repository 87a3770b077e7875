//! The daemon's client CLI (`auditor submit | status | wait | list | report | cancel`) against
//! a daemon and a record server: the README's walkthrough without curl. Exit codes follow the
//! verdicts, tokens come from the environment or a file, and refusals are usage errors that
//! say what to do.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use auditor::daemon::Config;
use serde_json::Value;
use support::{honest_and_faulty, scratch, start_daemon, start_trainer};

/// Runs the `auditor` binary with `args` and the environment `env`, off the async runtime
/// (the servers run on it).
async fn auditor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_auditor"));
        c.args(&args).env_remove("AUDITOR_TOKEN").env_remove("TRAINER_TOKEN").env_remove("TIEBREAK_DAEMON");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_runs_the_walkthrough_and_exits_with_the_verdict() {
    let dir = scratch("client-cli");
    let records = honest_and_faulty(&dir);
    let trainer = start_trainer(&records, Some("trainer-secret")).await;
    let mut cfg = Config { state_dir: dir.join("state"), progress_interval_ms: 0, ..Config::default() };
    cfg.token = Some("daemon-secret".into());
    let daemon = start_daemon(cfg).await;
    let token_file = dir.join("daemon.token");
    std::fs::write(&token_file, "daemon-secret\n").unwrap();
    let tf = token_file.to_str().unwrap();
    let d = daemon.url.as_str();
    let env = [("TRAINER_TOKEN", "trainer-secret")];

    // Without the daemon's token: a usage error (64) that says where the token goes.
    let o = auditor(&["list", "--daemon", d], &[]).await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("AUDITOR_TOKEN"), "{}", text(&o));

    // Honest: submit --wait exits 0 with the verdict; faulty: 1, at the step.
    let o = auditor(
        &["submit", "--daemon", d, "--token-file", tf, "--trainer-url", &trainer.url, "--run", "honest", "--wait"],
        &env,
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("verdict consistent"), "{}", text(&o));
    // Its report verifies (exit 0); a consistent verdict has no evidence bundle, which is said,
    // not an error, and no file appears.
    let honest_id = String::from_utf8_lossy(&o.stdout).split(':').next().unwrap().trim().to_string();
    let none = dir.join("none.tbev");
    let o = auditor(&["report", &honest_id, "--daemon", d, "--evidence", none.to_str().unwrap()], &[]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not written"), "{}", text(&o));
    assert!(!none.exists());

    let o = auditor(
        &["submit", "--daemon", d, "--trainer-url", &trainer.url, "--run", "faulty", "--mode", "intervals", "--json"],
        &[("AUDITOR_TOKEN", "daemon-secret"), env[0]],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let id = json_out(&o)["id"].as_str().unwrap().to_string();
    let o = auditor(&["wait", &id, "--daemon", d, "--token-file", tf, "--timeout", "240"], &[]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("verdict diverged at step 6"), "{}", text(&o));

    // status and list, as text and JSON.
    let o = auditor(&["status", &id, "--daemon", d, "--token-file", tf, "--json"], &[]).await;
    let s = json_out(&o);
    assert_eq!((s["state"].as_str(), s["verdict"].as_str()), (Some("done"), Some("diverged")), "{s}");
    let o = auditor(&["list", "--daemon", d, "--token-file", tf, "--state", "done"], &[]).await;
    let listed = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(listed.lines().count(), 2, "{}", text(&o));
    assert!(listed.lines().next().unwrap().starts_with(&format!("{id}: done, verdict diverged at step 6")), "{listed}");
    let o = auditor(&["list", "--daemon", d, "--token-file", tf, "--state", "sideways"], &[]).await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));

    // report: fetched, verified, saved with its evidence; the digests are in the text.
    let (saved, bundle) = (dir.join("report.json"), dir.join("evidence.tbev"));
    let o = auditor(
        &["report", &id, "--daemon", d, "--out", saved.to_str().unwrap(), "--evidence", bundle.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "an adverse verdict: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("verifies: verdict diverged at step 6") && out.contains("trainer state "), "{out}");
    assert!(auditor::report::verify(&std::fs::read_to_string(&saved).unwrap()).is_ok());
    assert!(std::fs::metadata(&bundle).unwrap().len() > 0);

    // cancel: a finished audit is not cancelled (a usage error naming its state); an unknown
    // id and a malformed one are usage errors; an unreachable daemon is "could not decide".
    let o = auditor(&["cancel", &id, "--daemon", d, "--token-file", tf], &[]).await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let o = auditor(&["status", "audit-999", "--daemon", d, "--token-file", tf], &[]).await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let o = auditor(&["status", "../etc", "--daemon", d, "--token-file", tf], &[]).await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let o = auditor(&["status", &id, "--daemon", "http://127.0.0.1:9", "--token-file", tf], &[]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = auditor(&["status", &id, "--daemon", d, "--token-file", dir.join("missing").to_str().unwrap()], &[]).await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(Path::new(&saved).exists());
    daemon.stop().await;
    trainer.stop().await;
}

/// A daemon whose answers are not what the API says (another server, a broken proxy): the
/// client says so and exits 2 (could not decide), never printing "?: ?" with exit 0, reporting
/// a cancel that did not happen, or polling forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_the_daemons_api_are_could_not_decide() {
    for body in ["<html>hello</html>", r#"{"hello": "world"}"#, r#"{"id": "audit-1", "state": "sleeping"}"#] {
        let app = axum::Router::new().fallback(move || async move { (axum::http::StatusCode::OK, body) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        for args in [
            &["status", "audit-1"][..],
            &["cancel", "audit-1"],
            &["wait", "audit-1"],
            &["list"],
            &["submit", "--trainer-url", "http://127.0.0.1:9", "--run", "r"],
            &["report", "audit-1"],
        ] {
            let cmd = args.join(" ");
            let o = auditor(&[args, &["--daemon", &url]].concat(), &[("AUDITOR_TOKEN", "t")]).await;
            assert_eq!(o.status.code(), Some(2), "{cmd} on {body}: {}", text(&o));
            assert!(String::from_utf8_lossy(&o.stderr).contains("daemon"), "{cmd} on {body}: {}", text(&o));
        }
        server.abort();
    }
}

/// `wait` outlasts a short outage of the daemon (a restart, its database away for a moment):
/// 503s and refused connections are asked again, for up to a minute, and the verdict still
/// decides the exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_outlasts_a_short_outage_of_the_daemon() {
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let a = asked.clone();
    let app = axum::Router::new().fallback(move || {
        let n = a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n < 3 {
                (axum::http::StatusCode::SERVICE_UNAVAILABLE, r#"{"error": "store unavailable"}"#.to_string())
            } else {
                let done = r#"{"id": "audit-1", "state": "done", "verdict": "consistent", "attempts": 1}"#;
                (axum::http::StatusCode::OK, done.to_string())
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let o = auditor(&["wait", "--daemon", &url, "audit-1", "--interval-ms", "50"], &[("AUDITOR_TOKEN", "t")]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    server.abort();
}
