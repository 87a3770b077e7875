//! The daemon's web pages over HTTP: the audit list, an audit's page and the public report
//! pages of a consistent and a diverged audit show the verdicts, the diverging step, both
//! digests and the plots; private pages refuse without the token and accept the bearer token or
//! the session cookie the login form sets; nothing the pages print is unescaped.

mod support;

use auditor::daemon::Config;
use serde_json::{Value, json};
use support::{finished, honest_and_faulty, scratch, start_daemon, start_trainer};

const TOKEN: &str = "ui-secret";

async fn get(c: &reqwest::Client, url: &str, auth: Option<&str>, cookie: Option<&str>) -> (u16, String) {
    let mut r = c.get(url);
    if let Some(t) = auth {
        r = r.bearer_auth(t);
    }
    if let Some(k) = cookie {
        r = r.header("cookie", k);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = resp.text().await.unwrap();
    if status == 200 {
        assert!(ctype.starts_with("text/html"), "{url}: {ctype}");
    }
    (status, body)
}

async fn submit(c: &reqwest::Client, daemon: &str, trainer: &str, run: &str) -> String {
    let body = json!({"trainer_url": trainer, "run": run, "mode": "intervals"});
    let resp = c.post(format!("{daemon}/v1/audits")).bearer_auth(TOKEN).body(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_verdicts_steps_digests_and_plots_and_private_pages_need_the_token() {
    let dir = scratch("web-ui");
    let records = honest_and_faulty(&dir);
    let trainer = start_trainer(&records, None).await;
    let mut cfg = Config { state_dir: dir.join("state"), progress_interval_ms: 0, ..Config::default() };
    cfg.token = Some(TOKEN.into());
    let daemon = start_daemon(cfg).await;
    let d = daemon.url.as_str();
    let c = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let honest = submit(&c, d, &trainer.url, "honest").await;
    let faulty = submit(&c, d, &trainer.url, "faulty").await;
    for id in [&honest, &faulty] {
        assert_eq!(finished(&c, d, id, Some(TOKEN)).await["state"], "done");
    }
    let report: Value =
        serde_json::from_slice(&c.get(format!("{d}/v1/reports/{faulty}")).send().await.unwrap().bytes().await.unwrap())
            .unwrap();

    // Private pages refuse without the token, with the login form.
    for path in ["/ui", &format!("/ui/audits/{faulty}")] {
        let (status, body) = get(&c, &format!("{d}{path}"), None, None).await;
        assert_eq!(status, 401, "{path}");
        assert!(
            body.contains("<form method=\"post\" action=\"/ui/login\"") && !body.contains(&faulty),
            "{path}: {body}"
        );
        let (status, _) = get(&c, &format!("{d}{path}"), Some("wrong"), Some("tiebreak_session=forged")).await;
        assert_eq!(status, 401, "{path}");
    }

    // The login form: a wrong token is refused; the right one sets an HttpOnly, SameSite=Strict
    // cookie that opens the private pages (and holds no token). Secure only over HTTPS: over
    // plain HTTP a browser would drop it, and sign-in would silently fail.
    let login = |t: &str| {
        c.post(format!("{d}/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={t}"))
    };
    assert_eq!(login("nope").send().await.unwrap().status().as_u16(), 401);
    let resp = login(TOKEN).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    let set = resp.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly")
            && !set.contains("Secure")
            && set.contains("SameSite=Strict")
            && set.contains("Max-Age=43200")
            && !set.contains(TOKEN),
        "{set}"
    );
    // Every page: no sniffing, no framing (the form cannot be clickjacked), no scripts.
    for (name, value) in service::SECURITY_HEADERS {
        assert_eq!(resp.headers().get(name).and_then(|v| v.to_str().ok()), Some(value), "{name}");
    }
    let cookie = set.split(';').next().unwrap().to_string();

    // The list, newest first, with verdicts in words and the diverging step.
    let (status, list) = get(&c, &format!("{d}/ui"), None, Some(&cookie)).await;
    assert_eq!(status, 200);
    let (hi, fi) = (list.find(&format!(">{honest}<")).unwrap(), list.find(&format!(">{faulty}<")).unwrap());
    assert!(fi < hi, "newest first");
    assert!(list.contains("✔ consistent") && list.contains("✖ diverged") && list.contains("at step 6"), "{list}");
    let (_, only_done) = get(&c, &format!("{d}/ui?state=done"), Some(TOKEN), None).await;
    assert!(only_done.contains(&faulty));
    let (_, only_failed) = get(&c, &format!("{d}/ui?state=failed"), Some(TOKEN), None).await;
    assert!(only_failed.contains("No audits.") && !only_failed.contains(&faulty));
    assert_eq!(get(&c, &format!("{d}/ui?state=sideways"), Some(TOKEN), None).await.0, 404);

    // One audit: intervals, bisection, verdict, the link to its report.
    let (status, page) = get(&c, &format!("{d}/ui/audits/{faulty}"), Some(TOKEN), None).await;
    assert_eq!(status, 200);
    assert!(page.contains("replayed (0, 4]") && page.contains("Bisection") && page.contains("step 6"), "{page}");
    assert!(page.contains("Diverged at step 6") && page.contains(&format!("href=\"/reports/{faulty}\"")), "{page}");
    assert!(
        page.contains("<li>leaves [0, 14)</li>") && page.contains("<li>leaves [6, 7)</li>"),
        "the bisection path: {page}"
    );

    // The public report pages, without any token.
    let (status, page) = get(&c, &format!("{d}/reports/{faulty}"), None, None).await;
    assert_eq!(status, 200);
    let trainer_state = report["at_step"]["trainer"]["leaf"]["state"].as_str().unwrap();
    let auditor_state = report["at_step"]["auditor"]["state"].as_str().unwrap();
    assert!(
        page.contains("Diverged at step 6") && page.contains(trainer_state) && page.contains(auditor_state),
        "{page}"
    );
    assert!(page.contains("Which tensors differ") && page.contains(report["trainer_root"].as_str().unwrap()));
    assert!(page.contains(&format!("href=\"/v1/reports/{faulty}/evidence\"")), "the evidence download");
    assert!(page.contains("auditor verify-report") && page.contains("auditor adjudicate --evidence"), "{page}");
    assert_eq!(page.matches("diverged at step 6").count(), 2, "marked in the strip and on the plot: {page}");
    let points = page.split("<polyline").nth(1).expect("a replay-time line").split("points=\"").nth(1).unwrap();
    assert!(points.split('"').next().unwrap().split(' ').count() >= 6, "a point per replayed step");
    let (status, page) = get(&c, &format!("{d}/reports/{honest}"), None, None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("✔ consistent") && page.contains("no evidence bundle") && !page.contains("diverged at step"),
        "{page}"
    );
    assert_eq!(get(&c, &format!("{d}/reports/audit-999"), None, None).await.0, 404);
    assert_eq!(get(&c, &format!("{d}/reports/..%2F..%2Fetc"), None, None).await.0, 404);

    // Signing out clears the cookie.
    let resp = c.post(format!("{d}/ui/logout")).send().await.unwrap();
    assert!(resp.headers().get("set-cookie").unwrap().to_str().unwrap().contains("Max-Age=0"));
    daemon.stop().await;
    trainer.stop().await;
}
