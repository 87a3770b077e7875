//! The daemon's web pages, server-rendered HTML with inline CSS and SVG (no scripts, no CDN,
//! nothing fetched by the browser but the page itself):
//!
//! | route | auth | page |
//! | --- | --- | --- |
//! | `GET /ui[?state=]` | token | audits, newest first, filterable by state: progress (steps of total, rate, ETA), verdict, attempts, last error |
//! | `GET /ui/audits/{id}` | token | one audit: progress, its intervals (replayed, resumed, skipped), bisection, verdict |
//! | `GET /reports/{id}` | open | the public report: verdict in words, both digests, differing tensors, replay time per step with the diverging step marked, where the run diverged, the evidence download and the commands that check it |
//! | `GET /ui/login`, `POST /ui/login`, `POST /ui/logout` | — | a form that sets (or clears) the session cookie |
//!
//! Private pages take the daemon's bearer token or the session cookie, an HttpOnly,
//! SameSite=Strict cookie (Secure when the daemon serves HTTPS) holding the session's end and a
//! MAC of it keyed by the token (`session_value`): the token itself is never stored in the
//! browser, a session ends after 12 hours, and rotating the token (SIGHUP) ends every session. Without either, a
//! private page answers 401 with the login form. Pages refresh themselves every 3 s while an
//! audit on them is queued or running.

use std::fmt::Write;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::Shared;
use super::api::{ApiResult, authorized, blocking};
use super::job::{Job, JobState, is_job_id};
use crate::VerdictKind;

const COOKIE: &str = "tiebreak_session";

/// How long a sign-in lasts.
const SESSION_SECONDS: u64 = 12 * 3600;

/// Seconds since the Unix epoch, now.
fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The cookie value for a session under `token` that ends at `expires` (Unix seconds):
/// `EXPIRES.MAC`, the MAC a keyed BLAKE3 of the expiry under a key derived from the token. It
/// cannot be made without the token, names its end, and any daemon of a fleet sharing the token
/// checks it.
fn session_value(token: &str, expires: u64) -> String {
    let key = common::codec::sha256(format!("tiebreak-ui-session\0{token}").as_bytes());
    let mac = blake3::keyed_hash(&key, format!("expires\0{expires}").as_bytes());
    format!("{expires}.{}", mac.to_hex())
}

/// Whether cookie value `value` is a session under `token` that has not ended at `now`.
fn session_holds(value: &str, token: &str, now: u64) -> bool {
    let Some(expires) = value.split_once('.').and_then(|(e, _)| e.parse::<u64>().ok()) else { return false };
    expires > now
        && expires <= now.saturating_add(SESSION_SECONDS)
        && service::same_secret(value, &session_value(token, expires))
}

/// Whether a private page may be shown: no token configured, the bearer token, or the cookie.
fn may_see(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = shared.token.get() else { return true };
    if authorized(shared, headers) {
        return true;
    }
    let now = now_s();
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')))
        .any(|v| session_holds(v, &token, now))
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#111;background:#fff;line-height:1.45}\
header{background:#1f3b5a;padding:.6rem 1rem}header a{color:#fff;margin-right:1rem;font-weight:600}\
main{max-width:64rem;margin:0 auto;padding:1rem}h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:1.6rem}\
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ccc;padding:.35rem .5rem;text-align:left;vertical-align:top}\
.scroll{overflow-x:auto}.digest,code,pre{font-family:ui-monospace,monospace;word-break:break-all;white-space:pre-wrap}\
.verdict{font-weight:700;padding:.1rem .4rem;border:2px solid}.adverse{color:#8a0018;border-color:#8a0018}\
.good{color:#135c1f;border-color:#135c1f}.pending{color:#4a4a4a;border-color:#4a4a4a}\
nav.filter a{margin-right:.8rem}progress{width:12rem}.button{display:inline-block;padding:.5rem .9rem;\
border:2px solid #1f3b5a;color:#1f3b5a;font-weight:600;text-decoration:none}svg{max-width:100%;height:auto}\
@media (max-width:40rem){td,th{display:block;border:0}tr{display:block;border-bottom:1px solid #ccc;padding:.4rem 0}\
thead{display:none}main{padding:.6rem}td[data-label]::before{content:attr(data-label) \": \";font-weight:600}}";

/// A whole page.
fn page(title: &str, body: &str, refresh: bool) -> String {
    let refresh = if refresh { "<meta http-equiv=\"refresh\" content=\"3\">" } else { "" };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}\
         <title>{t} — tiebreak auditor</title><style>{CSS}</style></head>\n<body><header><nav aria-label=\"main\">\
         <a href=\"/ui\">Audits</a><a href=\"/metrics\">Metrics</a></nav></header>\n<main>\n<h1>{t}</h1>\n{body}\n</main></body></html>\n",
        t = esc(title)
    )
}

fn html(status: StatusCode, doc: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], doc)
        .into_response()
}

/// The login form, answered 401.
fn login_page(message: &str) -> Response {
    let body = format!(
        "<p>{}</p><form method=\"post\" action=\"/ui/login\"><label for=\"token\">Daemon token</label><br>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required> \
         <button type=\"submit\">Sign in</button></form>",
        esc(message)
    );
    html(StatusCode::UNAUTHORIZED, page("Sign in", &body, false))
}

fn not_found(what: &str) -> Response {
    html(StatusCode::NOT_FOUND, page("Not found", &format!("<p>{}</p>", esc(what)), false))
}

/// A verdict as a badge with its words (never colour alone).
fn badge(job: &Job) -> String {
    match (job.state, job.verdict) {
        (_, Some(v)) if v.is_adverse() => format!("<span class=\"verdict adverse\">✖ {}</span>", v.as_str()),
        (_, Some(v)) => format!("<span class=\"verdict good\">✔ {}</span>", v.as_str()),
        (JobState::Failed, None) => "<span class=\"verdict pending\">could not decide</span>".into(),
        _ => "<span class=\"verdict pending\">no verdict yet</span>".into(),
    }
}

/// The verdict in words.
fn verdict_words(kind: VerdictKind, step: Option<u64>) -> String {
    let at = step.map(|s| format!(" at step {s}")).unwrap_or_default();
    match kind {
        VerdictKind::Consistent => {
            "Consistent: the auditor replayed the record on its own hardware and reproduced every committed state bit for bit.".into()
        }
        VerdictKind::Diverged => format!(
            "Diverged{at}: replaying that step from the agreed state before it does not give the state the trainer committed. Steps before it reproduce exactly."
        ),
        VerdictKind::ForgedLog => format!(
            "Forged tie-break log{at}: the trainer's log claims rounding decisions that an honest computation could not have faced."
        ),
        VerdictKind::CommitmentInvalid => {
            "Commitment invalid: the record's signature, root, spec or committed files do not check out.".into()
        }
        VerdictKind::TrainerUnresponsive => {
            "Trainer unresponsive: the trainer's record server stopped answering with what it had committed.".into()
        }
    }
}

/// The live progress cell of a running audit.
fn progress_cell(shared: &Shared, job: &Job) -> String {
    if job.state != JobState::Running {
        return format!("{} steps", job.steps_replayed);
    }
    match shared.metrics.live.snapshot(&job.id) {
        Some(p) => {
            let (done, total) = (p["steps_done"].as_u64().unwrap_or(0), p["steps_total"].as_u64().unwrap_or(0));
            let mut s = format!(
                "<progress value=\"{done}\" max=\"{}\" aria-label=\"steps replayed\"></progress> {done}/{total} steps ({} %)",
                total.max(1),
                p["percent"]
            );
            if let (Some(r), Some(eta)) = (p["steps_per_second"].as_f64(), p["eta_seconds"].as_u64()) {
                let _ = write!(s, ", {r} steps/s, ETA {eta} s");
            }
            s
        }
        None => format!("{} steps (starting)", job.steps_replayed),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
}

pub async fn audits_page(
    State(shared): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    if !may_see(&shared, &headers) {
        return Ok(login_page("This page lists private audits: sign in with the daemon's token."));
    }
    let state = match query.ok().and_then(|Query(q)| q.state) {
        None => None,
        Some(s) => match JobState::parse(&s) {
            Some(st) => Some(st),
            None => return Ok(not_found(&format!("no state {s:?}: queued, running, done or failed"))),
        },
    };
    let store = shared.store.clone();
    let jobs = blocking(move || store.list(state, 200, None).map_err(super::api::ApiError::store)).await?;
    let mut body = String::from("<nav class=\"filter\" aria-label=\"filter by state\"><a href=\"/ui\">all</a>");
    for s in JobState::ALL {
        let current = if state == Some(s) { " aria-current=\"page\"" } else { "" };
        let _ = write!(body, "<a href=\"/ui?state={0}\"{current}>{0}</a>", s.name());
    }
    body.push_str("</nav>\n");
    if jobs.is_empty() {
        body.push_str("<p>No audits.</p>");
    } else {
        body.push_str(
            "<div class=\"scroll\"><table><thead><tr><th>audit</th><th>state</th><th>verdict</th><th>progress</th>\
             <th>run</th><th>attempts</th><th>last error</th></tr></thead><tbody>\n",
        );
        for j in &jobs {
            let step = j.first_step.map(|s| format!(" at step {s}")).unwrap_or_default();
            let _ = writeln!(
                body,
                "<tr><td data-label=\"audit\"><a href=\"/ui/audits/{id}\">{id}</a></td><td data-label=\"state\">{}</td>\
                 <td data-label=\"verdict\">{}{step}</td><td data-label=\"progress\">{}</td><td data-label=\"run\">{}</td>\
                 <td data-label=\"attempts\">{}</td><td data-label=\"last error\">{}</td></tr>",
                j.state.name(),
                badge(j),
                progress_cell(&shared, j),
                esc(&j.request.run),
                j.attempts,
                esc(j.error.as_deref().unwrap_or("")),
                id = esc(&j.id),
            );
        }
        body.push_str("</tbody></table></div>");
    }
    let live = jobs.iter().any(|j| matches!(j.state, JobState::Queued | JobState::Running));
    Ok(html(StatusCode::OK, page("Audits", &body, live)))
}

/// A job and, when done, its parsed report.
async fn job_and_report(shared: &Shared, id: String) -> ApiResult<Option<(Job, Option<Value>, bool)>> {
    if !is_job_id(&id) {
        return Ok(None);
    }
    let store = shared.store.clone();
    blocking(move || {
        let err = super::api::ApiError::store;
        let Some(job) = store.get(&id).map_err(err)? else { return Ok(None) };
        let (report, evidence) = if job.state == JobState::Done {
            let r = store.report(&id).map_err(err)?.and_then(|t| serde_json::from_str(&t).ok());
            (r, store.has_evidence(&id).map_err(err)?)
        } else {
            (None, false)
        };
        Ok(Some((job, report, evidence)))
    })
    .await
}

pub async fn audit_page(
    State(shared): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    if !may_see(&shared, &headers) {
        return Ok(login_page("Audit pages are private: sign in with the daemon's token."));
    }
    let Ok(Path(id)) = path else { return Ok(not_found("no such audit")) };
    let Some((job, report, _)) = job_and_report(&shared, id.clone()).await? else {
        return Ok(not_found(&format!("no audit {id}")));
    };
    let r = &job.request;
    let mut body = format!(
        "<p>{} — state <strong>{}</strong>, attempt {}</p>\n<table><tbody>\
         <tr><th>trainer</th><td><code>{}</code>, run <code>{}</code></td></tr>\
         <tr><th>mode</th><td>{}</td></tr><tr><th>device</th><td>{}</td></tr>\
         <tr><th>progress</th><td>{}</td></tr><tr><th>resumed</th><td>{} steps verified by earlier attempts</td></tr>",
        badge(&job),
        job.state.name(),
        job.attempts,
        esc(&r.trainer_url),
        esc(&r.run),
        esc(r.mode.as_deref().unwrap_or("full")),
        esc(r.device.as_deref().unwrap_or("the daemon's default")),
        progress_cell(&shared, &job),
        job.steps_resumed,
    );
    if let Some(reason) = job.reason {
        let _ = write!(body, "<tr><th>reason</th><td>{}</td></tr>", reason.as_str());
    }
    if let Some(e) = &job.error {
        let _ = write!(body, "<tr><th>last error</th><td>{}</td></tr>", esc(e));
    }
    body.push_str("</tbody></table>\n<h2>Intervals</h2>\n");
    match &report {
        Some(rep) => {
            let (a, b) = (rep["segment"][0].as_u64().unwrap_or(0), rep["segment"][1].as_u64().unwrap_or(0));
            let _ = write!(body, "<p>Segment ({a}, {b}].</p><ul>");
            let mut covered = a;
            for iv in rep["intervals"].as_array().into_iter().flatten() {
                let (s, e) = (iv[0].as_u64().unwrap_or(0), iv[1].as_u64().unwrap_or(0));
                if s > covered {
                    let _ = write!(body, "<li>skipped ({covered}, {s}]</li>");
                }
                let _ = write!(body, "<li>replayed ({s}, {e}]</li>");
                covered = covered.max(e);
            }
            if covered < b {
                let _ = write!(body, "<li>skipped ({covered}, {b}]</li>");
            }
            let bis = &rep["bisection"];
            let _ = write!(
                body,
                "</ul><h2>Bisection</h2><p>{} queries (limit {}) down to the first differing leaf: {}.</p>",
                bis["queries"],
                bis["query_limit"],
                bis["first_differing_leaf"]
                    .as_u64()
                    .map_or("none, every leaf agreed".to_string(), |l| format!("step {l}"))
            );
            if let (Some(leaf), Some(n)) = (bis["first_differing_leaf"].as_u64(), rep["n_leaves"].as_u64()) {
                body.push_str(
                    "<p>The path through the commitment tree (leaf <i>s</i> is the state after step <i>s</i>):</p><ol>",
                );
                for (lo, hi) in bisection_path(leaf, n) {
                    let _ = write!(body, "<li>leaves [{lo}, {hi})</li>");
                }
                body.push_str("</ol>");
            }
            let _ = write!(
                body,
                "<h2>Verdict</h2><p>{}</p><p><a class=\"button\" href=\"/reports/{id}\">The public report</a></p>",
                esc(&report_words(rep)),
                id = esc(&job.id)
            );
        }
        None => {
            body.push_str("<ul>");
            for (s, t) in &job.progress {
                let _ = write!(body, "<li>replayed and verified ({s}, {t}]</li>");
            }
            body.push_str("</ul><p>The bisection and verdict appear when the audit is done.</p>");
        }
    }
    let live = matches!(job.state, JobState::Queued | JobState::Running);
    Ok(html(StatusCode::OK, page(&format!("Audit {}", job.id), &body, live)))
}

/// The nodes a bisection over `n` leaves visits on its way to `leaf`: the root, then at each
/// level the child holding it (the tree's own split rule, `common::merkle::children`).
fn bisection_path(leaf: u64, n: u64) -> Vec<(u64, u64)> {
    if leaf >= n {
        return Vec::new();
    }
    let mut path = vec![(0, n)];
    let (mut lo, mut hi) = (0, n);
    while let Some((l, r)) = common::merkle::children(lo, hi) {
        (lo, hi) = if leaf < l.1 { l } else { r };
        path.push((lo, hi));
    }
    path
}

/// A report's verdict in words.
fn report_words(rep: &Value) -> String {
    match rep["verdict"]["kind"].as_str().and_then(|k| k.parse::<VerdictKind>().ok()) {
        Some(k) => verdict_words(k, rep["verdict"]["step"].as_u64()),
        None => "The report's verdict is not one this auditor knows.".into(),
    }
}

/// Where the audit looked and where it diverged: the segment, the replayed intervals and the
/// diverging step, as an SVG strip with text labels.
fn where_strip(rep: &Value) -> String {
    let (a, b) = (rep["segment"][0].as_u64().unwrap_or(0), rep["segment"][1].as_u64().unwrap_or(1));
    let span = b.saturating_sub(a).max(1) as f64;
    let (w, left) = (720.0, 20.0);
    let x = |s: u64| left + w * (s.saturating_sub(a)) as f64 / span;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 760 86\" width=\"760\" height=\"86\" role=\"img\" \
         aria-label=\"replayed intervals of steps {a} to {b}\"><rect x=\"{left}\" y=\"26\" width=\"{w}\" height=\"22\" fill=\"#e6e6e6\"/>"
    );
    for iv in rep["intervals"].as_array().into_iter().flatten() {
        let (s, e) = (iv[0].as_u64().unwrap_or(0), iv[1].as_u64().unwrap_or(0));
        let _ = write!(
            out,
            "<rect x=\"{:.1}\" y=\"26\" width=\"{:.1}\" height=\"22\" fill=\"#7da7d9\"/>",
            x(s),
            (x(e) - x(s)).max(1.0)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{left}\" y=\"66\" font-size=\"12\">step {a}</text><text x=\"{:.1}\" y=\"66\" font-size=\"12\" \
         text-anchor=\"end\">step {b}</text><text x=\"{left}\" y=\"18\" font-size=\"12\">replayed intervals (blue) of the segment</text>",
        left + w
    );
    if let Some(step) = rep["verdict"]["step"].as_u64() {
        let sx = x(step);
        let _ = write!(
            out,
            "<line x1=\"{sx:.1}\" y1=\"20\" x2=\"{sx:.1}\" y2=\"54\" stroke=\"#b00020\" stroke-width=\"3\"/>\
             <text x=\"{sx:.1}\" y=\"80\" font-size=\"12\" text-anchor=\"middle\" fill=\"#b00020\">diverged at step {step}</text>"
        );
    }
    out.push_str("</svg>");
    out
}

pub async fn report_page(
    State(shared): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let Ok(Path(id)) = path else { return Ok(not_found("no such report")) };
    let Some((job, report, evidence)) = job_and_report(&shared, id.clone()).await? else {
        return Ok(not_found(&format!("no report {id}")));
    };
    let Some(rep) = report else {
        return Ok(not_found(&format!("audit {id} is {}: its report is published when it is done", job.state.name())));
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1:8420");
    let scheme = if shared.config.tls_cert.is_some() { "https" } else { "http" };
    let daemon = format!("{scheme}://{}", esc(host));
    let id = esc(&job.id);
    let v = &rep["verdict"];
    let kind = v["kind"].as_str().unwrap_or("?");
    let class = if kind == "consistent" { "good" } else { "adverse" };
    let mut body = format!(
        "<p><span class=\"verdict {class}\">{} {}</span></p><p>{}</p>\n<table><tbody>\
         <tr><th>trainer root</th><td class=\"digest\">{}</td></tr>\
         <tr><th>trainer key</th><td class=\"digest\">{}</td></tr>\
         <tr><th>auditor key</th><td class=\"digest\">{}</td></tr>\
         <tr><th>replayed on</th><td>{} (trainer: {}), {} steps, mode {}</td></tr>",
        if class == "good" { "✔" } else { "✖" },
        esc(kind),
        esc(&report_words(&rep)),
        esc(rep["trainer_root"].as_str().unwrap_or("")),
        esc(rep["trainer_public_key"].as_str().unwrap_or("")),
        esc(rep["auditor_public_key"].as_str().unwrap_or("")),
        esc(rep["auditor_device"].as_str().unwrap_or("")),
        esc(rep["trainer_device"].as_str().unwrap_or("")),
        rep["steps_replayed"],
        esc(rep["mode"].as_str().unwrap_or("")),
    );
    let at = &rep["at_step"];
    if at.is_object() {
        let _ = write!(
            body,
            "<tr><th>trainer's state at step {s}</th><td class=\"digest\">{}</td></tr>\
             <tr><th>auditor's state at step {s}</th><td class=\"digest\">{}</td></tr>",
            esc(at["trainer"]["leaf"]["state"].as_str().unwrap_or("")),
            esc(at["auditor"]["state"].as_str().unwrap_or("")),
            s = at["step"]
        );
    }
    body.push_str("</tbody></table>\n");
    if at.is_object() {
        body.push_str("<h2>Which tensors differ</h2>\n");
        let st = &at["state"];
        match st["tensors"].as_array() {
            Some(ts) if st["compared"] == true && !ts.is_empty() => {
                body.push_str(
                    "<div class=\"scroll\"><table><thead><tr><th>tensor</th><th>elements differing</th><th>first index</th>\
                     <th>trainer</th><th>auditor</th><th>largest |difference|</th></tr></thead><tbody>",
                );
                for t in ts {
                    let _ = write!(
                        body,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(t["tensor"].as_str().unwrap_or("")),
                        t["elements"],
                        t["first_index"],
                        t["trainer"],
                        t["auditor"],
                        t["max_abs_diff"]
                    );
                }
                body.push_str("</tbody></table></div>");
            }
            _ if st["compared"] == true => body.push_str("<p>The states agree; the batch or the log differs.</p>"),
            _ => {
                let _ = write!(
                    body,
                    "<p>Not compared: {}</p>",
                    esc(st["unavailable"].as_str().unwrap_or("the trainer's state was not available"))
                );
            }
        }
    }
    body.push_str("<h2>Where</h2>\n");
    body.push_str(&where_strip(&rep));
    let times = shared.metrics.live.step_times(&job.id);
    let marks: Vec<(u64, String)> =
        v["step"].as_u64().map(|s| (s, format!("diverged at step {s}"))).into_iter().collect();
    let (first, last) = (rep["segment"][0].as_u64().unwrap_or(0) + 1, rep["segment"][1].as_u64().unwrap_or(1));
    body.push_str("<h2>Replay time per step</h2>\n");
    body.push_str(&service::svg::svg(
        &format!("audit {}: replay seconds per step", job.id),
        first,
        last.max(first),
        &[service::svg::Series { title: "seconds per replayed step".into(), points: times }],
        &marks,
    ));
    body.push_str("<h2>Check it yourself</h2>\n");
    if evidence {
        let _ = write!(
            body,
            "<p><a class=\"button\" href=\"/v1/reports/{id}/evidence\" download=\"{id}.tbev\">Download the evidence bundle</a> \
             <a class=\"button\" href=\"/v1/reports/{id}\" download=\"{id}.json\">Download the signed report</a></p>"
        );
    } else {
        let _ = write!(
            body,
            "<p><a class=\"button\" href=\"/v1/reports/{id}\" download=\"{id}.json\">Download the signed report</a> \
             (no evidence bundle: the verdict is not about one step)</p>"
        );
    }
    let auditor_key = esc(rep["auditor_public_key"].as_str().unwrap_or(""));
    let _ = write!(
        body,
        "<pre><code>auditor report {id} --daemon {daemon} --out {id}.json{ev}\n\
         auditor verify-report {id}.json --auditor-key {auditor_key}{adj}</code></pre>",
        ev = if evidence { format!(" --evidence {id}.tbev") } else { String::new() },
        adj = if evidence {
            format!(
                "\nauditor adjudicate --evidence {id}.tbev --report {id}.json   # re-executes the disputed step (add --data for MNIST or text runs)"
            )
        } else {
            String::new()
        },
    );
    Ok(html(StatusCode::OK, page(&format!("Report {id}"), &body, false)))
}

pub async fn login_form(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if shared.token.get().is_none() {
        return html(StatusCode::OK, page("Sign in", "<p>This daemon has no token: every page is open.</p>", false));
    }
    if may_see(&shared, &headers) {
        return html(StatusCode::OK, page("Sign in", "<p>Signed in. <a href=\"/ui\">The audits</a>.</p>", false));
    }
    login_page("Sign in with the daemon's token.")
}

/// Decodes one `application/x-www-form-urlencoded` value.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let raw = text.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b'%' => return None,
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

pub async fn login(State(shared): State<Shared>, body: Bytes) -> Response {
    let Some(token) = shared.token.get() else {
        return html(StatusCode::OK, page("Sign in", "<p>This daemon has no token: every page is open.</p>", false));
    };
    let given = form_value(&body, "token").unwrap_or_default();
    if !service::same_secret(given.trim(), &token) {
        return login_page("That is not the daemon's token.");
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly;{} SameSite=Strict; Max-Age={SESSION_SECONDS}",
        session_value(&token, now_s() + SESSION_SECONDS),
        secure(&shared)
    );
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/ui".to_string())]).into_response()
}

/// ` Secure` on a daemon that serves HTTPS. Over plain HTTP a browser would not keep a Secure
/// cookie (except on localhost), and sign-in would silently fail.
fn secure(shared: &Shared) -> &'static str {
    if shared.config.tls_cert.is_some() { " Secure;" } else { "" }
}

pub async fn logout(State(shared): State<Shared>) -> Response {
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly;{} SameSite=Strict; Max-Age=0", secure(&shared));
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/ui/login".to_string())]).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_the_tokens_and_ends() {
        let now = 1_800_000_000;
        let v = session_value("secret", now + SESSION_SECONDS);
        assert!(session_holds(&v, "secret", now) && session_holds(&v, "secret", now + SESSION_SECONDS - 1));
        assert!(!session_holds(&v, "secret", now + SESSION_SECONDS), "it ends");
        assert!(!session_holds(&v, "other", now), "another token's daemon refuses it");
        assert!(!v.contains("secret"));
        // A later end cannot be written in without the token, nor one signed too far ahead.
        let (_, mac) = v.split_once('.').unwrap();
        assert!(!session_holds(&format!("{}.{mac}", now + 2 * SESSION_SECONDS), "secret", now + SESSION_SECONDS));
        assert!(!session_holds(&session_value("secret", now + 2 * SESSION_SECONDS), "secret", now));
        for junk in ["", ".", "x.y", &format!("{}.", now + 10), &v[..v.len() - 1]] {
            assert!(!session_holds(junk, "secret", now), "{junk:?}");
        }
    }

    #[test]
    fn form_values_decode_and_bad_escapes_are_refused() {
        assert_eq!(form_value(b"token=a%2Bb+c&x=1", "token").as_deref(), Some("a+b c"));
        assert_eq!(form_value(b"x=1&token=t0k", "token").as_deref(), Some("t0k"));
        assert_eq!(form_value(b"token=%zz", "token"), None);
        assert_eq!(form_value(b"token=%4", "token"), None);
        assert_eq!(form_value(b"other=1", "token"), None);
    }

    #[test]
    fn the_bisection_path_halves_down_to_the_leaf() {
        assert_eq!(bisection_path(6, 14), vec![(0, 14), (0, 8), (4, 8), (6, 8), (6, 7)]);
        assert_eq!(bisection_path(13, 14), vec![(0, 14), (8, 14), (12, 14), (13, 14)]);
        assert!(bisection_path(14, 14).is_empty());
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(esc("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
