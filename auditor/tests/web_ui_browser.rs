//! The web pages in a real headless browser (Debian's Chromium, which `.ci/run` installs): the
//! rendered DOM of the audit list, an audit page and both report pages shows the verdicts, the
//! diverging step and the plot; a private page, opened without the token, renders the login
//! form instead. Screenshots of every page at desktop (1280×900) and phone (390×844) widths go
//! to `$TIEBREAK_SCREENSHOTS` (default `target/ui-screenshots`); the README links a copy.
//!
//! Without a browser the test says so and passes, unless `TIEBREAK_REQUIRE_BROWSER=1` (CI).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use auditor::daemon::Config;
use serde_json::{Value, json};
use support::{finished, honest_and_faulty, scratch, start_daemon, start_trainer};

fn browser() -> Option<PathBuf> {
    let candidates = [std::env::var("TIEBREAK_BROWSER").ok(), Some("/usr/bin/chromium".into())];
    let found = candidates.into_iter().flatten().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("TIEBREAK_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "TIEBREAK_REQUIRE_BROWSER=1 but no browser at $TIEBREAK_BROWSER or /usr/bin/chromium"
        );
    }
    found
}

/// Runs headless Chromium on `url` with `args` (off the async runtime, which serves the page).
async fn chromium(bin: &Path, profile: &Path, url: &str, args: &[String]) -> String {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url);
    // Chromium itself failing to start (seen once in CI: "Zygote could not fork" for its GPU
    // process, on a run whose pages were fine) is retried twice; what it renders is not.
    let out = tokio::task::spawn_blocking(move || {
        let mut out = cmd.output().unwrap();
        for _ in 0..2 {
            if out.status.success() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
            out = cmd.output().unwrap();
        }
        out
    })
    .await
    .unwrap();
    assert!(out.status.success(), "chromium {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn audit(c: &reqwest::Client, daemon: &str, trainer: &str, run: &str) -> String {
    let body = json!({"trainer_url": trainer, "run": run, "mode": "intervals"});
    let resp = c.post(format!("{daemon}/v1/audits")).body(body.to_string()).send().await.unwrap();
    let id = serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(finished(c, daemon, &id, None).await["state"], "done");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_browser_renders_the_pages_and_private_pages_ask_for_the_token() {
    let Some(bin) = browser() else {
        println!("skipped: no headless browser (set TIEBREAK_BROWSER or install chromium)");
        return;
    };
    let dir = scratch("web-ui-browser");
    let records = honest_and_faulty(&dir);
    let trainer = start_trainer(&records, None).await;
    // Pages open (no token) for the screenshots; a second daemon with a token for the refusal.
    let open = start_daemon(Config { state_dir: dir.join("open"), progress_interval_ms: 0, ..Config::default() }).await;
    let mut locked_cfg = Config { state_dir: dir.join("locked"), ..Config::default() };
    locked_cfg.token = Some("browser-secret".into());
    let locked = start_daemon(locked_cfg).await;
    let c = reqwest::Client::new();
    let honest = audit(&c, &open.url, &trainer.url, "honest").await;
    let faulty = audit(&c, &open.url, &trainer.url, "faulty").await;

    let shots = std::env::var("TIEBREAK_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots"));
    std::fs::create_dir_all(&shots).unwrap();
    let profile = dir.join("chromium-profile");
    let pages = [
        ("audits", format!("{}/ui", open.url), vec!["✔ consistent", "✖ diverged", "at step 6"]),
        (
            "audit-diverged",
            format!("{}/ui/audits/{faulty}", open.url),
            vec!["Diverged at step 6", "Bisection", "replayed (0, 4]"],
        ),
        (
            "report-diverged",
            format!("{}/reports/{faulty}", open.url),
            vec!["Diverged at step 6", "diverged at step 6", "<polyline", "Download the evidence bundle"],
        ),
        (
            "report-consistent",
            format!("{}/reports/{honest}", open.url),
            vec!["✔ consistent", "Consistent: the auditor replayed", "<polyline"],
        ),
    ];
    for (name, url, expect) in &pages {
        let dom = chromium(&bin, &profile, url, &["--dump-dom".into()]).await;
        for e in expect {
            assert!(dom.contains(e), "{name}: the rendered page lacks {e:?}:\n{dom}");
        }
        for (suffix, size) in [("desktop", "1280,900"), ("phone", "390,844")] {
            let file = shots.join(format!("{name}-{suffix}.png"));
            let _ = std::fs::remove_file(&file);
            chromium(
                &bin,
                &profile,
                url,
                &[format!("--screenshot={}", file.display()), format!("--window-size={size}")],
            )
            .await;
            let png = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "{}: not a real screenshot", file.display());
        }
    }
    // A private page of a daemon with a token: the browser, which has none, gets the login form.
    let dom = chromium(&bin, &profile, &format!("{}/ui", locked.url), &["--dump-dom".into()]).await;
    assert!(dom.contains("Daemon token") && dom.contains("action=\"/ui/login\""), "{dom}");
    println!("screenshots in {}", shots.display());
    open.stop().await;
    locked.stop().await;
    trainer.stop().await;
}
