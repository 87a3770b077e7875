//! The daemon's client, so that nobody needs curl: `auditor submit | status | wait | list |
//! report | cancel --daemon URL`.
//!
//! Tokens never go on the command line (where `ps` shows them): the daemon's comes from
//! `--token-file` or `$AUDITOR_TOKEN`, a trainer's from `--trainer-token-file` or
//! `$TRAINER_TOKEN`. Errors keep the exit-code contract: a refused token, an unknown audit or a
//! request the daemon rejects is a usage error (64); a daemon that cannot be reached or fails is
//! "could not decide" (2). `wait` and `report` end with the verdict's code (0 consistent, 1
//! adverse, 2 when the audit failed without one).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use auditor::VerdictKind;
use auditor::daemon::job::{AuditRequest, JobState};
use auditor::report::verify;
use engine::output::OutputKind;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::exit::{Exit, Failure, undecided, usage};
use super::keys::public_key_arg;
use super::output::{emit, writable};

/// Where the daemon is and how to authenticate; every client command takes these.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// The daemon's base URL (default: $TIEBREAK_DAEMON, else http://127.0.0.1:8420).
    #[arg(long, value_name = "URL")]
    daemon: Option<String>,
    /// A file holding the daemon's bearer token (default: $AUDITOR_TOKEN; no token when unset).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// A private CA (PEM) an `https://` daemon's certificate may chain to, besides the
    /// system's roots.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Print the daemon's JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// The trainer's record server, http://host:port.
    #[arg(long, value_name = "URL")]
    trainer_url: String,
    /// The run id on that server.
    #[arg(long)]
    run: String,
    /// A file holding the record server's token (default: $TRAINER_TOKEN; none when unset).
    #[arg(long, value_name = "PATH")]
    trainer_token_file: Option<PathBuf>,
    /// Replay profile (default: the daemon's).
    #[arg(long)]
    device: Option<String>,
    /// full (default), intervals or spot.
    #[arg(long)]
    mode: Option<String>,
    #[arg(long)]
    from: Option<u64>,
    #[arg(long)]
    to: Option<u64>,
    #[arg(long)]
    spot_count: Option<usize>,
    #[arg(long)]
    spot_seed: Option<u64>,
    /// random (default) or largest-update.
    #[arg(long)]
    spot_by: Option<String>,
    /// Pin the trainer's ed25519 public key (64 hex digits).
    #[arg(long, value_name = "HEX")]
    trainer_pubkey: Option<String>,
    /// Resubmitting with the same key returns the same audit.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// The daemon's dataset to replay with (a name it was given with --data NAME=PATH or
    /// [data]); default: the one whose contents are the run's committed data.
    #[arg(long, value_name = "NAME")]
    data: Option<String>,
    /// Then wait for the verdict, as `auditor wait` does (and exit with its code).
    #[arg(long)]
    wait: bool,
}

#[derive(clap::Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// The audit id (`audit-1`, …) that `submit` printed.
    id: String,
}

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    id: String,
    /// Give up after this many seconds (exit 2); default: wait as long as it takes.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Poll every this many milliseconds.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    interval_ms: u64,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Only audits in this state: queued, running, done or failed.
    #[arg(long)]
    state: Option<String>,
    /// At most this many (newest first), 1 to 1000.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=auditor::daemon::api::LIST_LIMIT_MAX))]
    limit: u64,
}

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    id: String,
    /// Also write the signed report, byte for byte, to this file.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Also download the evidence bundle (for `auditor adjudicate`) to this file.
    #[arg(long, value_name = "PATH")]
    evidence: Option<PathBuf>,
    /// Require the report to be signed by this auditor key (64 hex digits or @FILE).
    #[arg(long, value_name = "HEX|@FILE")]
    auditor_key: Option<String>,
}

/// A connection to one daemon.
struct Client {
    base: reqwest::Url,
    token: Option<String>,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    json: bool,
}

/// A secret from `file`, else from the environment variable `var`; `None` when neither is set.
fn secret(flag: &str, file: Option<&Path>, var: &str) -> Result<Option<String>, Failure> {
    match file {
        Some(path) => {
            let text = common::files::read_regular_text(path, service::TOKEN_FILE_BYTES_MAX)
                .map_err(|e| usage(format_args!("{flag} {}: {e}", path.display())))?;
            let t = text.trim();
            if t.is_empty() {
                return Err(usage(format_args!("{flag} {}: the file is empty", path.display())));
            }
            Ok(Some(t.to_string()))
        }
        None => Ok(std::env::var(var).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())),
    }
}

impl Client {
    fn new(args: &DaemonArgs) -> Result<Client, Failure> {
        let url = args
            .daemon
            .clone()
            .or_else(|| std::env::var("TIEBREAK_DAEMON").ok())
            .unwrap_or_else(|| "http://127.0.0.1:8420".into());
        let base = reqwest::Url::parse(&url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| usage(format_args!("--daemon {url:?}: not an http:// URL")))?;
        let token = secret("--token-file", args.token_file.as_deref(), "AUDITOR_TOKEN")?;
        service::tls::install_provider();
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        if let Some(ca) = &args.ca_file {
            for der in service::tls::read_ca_file(ca).map_err(|e| usage(format_args!("--ca-file {e}")))? {
                let cert = reqwest::Certificate::from_der(&der).map_err(|e| usage(format_args!("--ca-file: {e}")))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| undecided(format_args!("building the HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| undecided(format_args!("starting the I/O runtime: {e}")))?;
        Ok(Client { base, token, http, runtime, json: args.json })
    }

    /// Sends a request to `path` and returns the answer's status and body, turning the
    /// daemon's refusals into usage errors and its failures into "could not decide".
    fn send(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Vec<u8>, Failure> {
        let url = self.base.join(path).map_err(|e| usage(format_args!("{path}: {e}")))?;
        let mut req = self.http.request(method.clone(), url.clone());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b.to_string());
        }
        let (status, bytes) = self
            .runtime
            .block_on(async {
                let resp = req.send().await?;
                let status = resp.status();
                Ok::<_, reqwest::Error>((status, resp.bytes().await?))
            })
            .map_err(|e| {
                // The whole chain (reqwest's own text leaves out the cause: an untrusted
                // certificate, TLS spoken to a plain port), and the flag that fixes the first.
                let chain = service::error_text(&e);
                let hint = if chain.to_ascii_lowercase().contains("certificate") {
                    " (a daemon whose certificate is from a private CA needs --ca-file)"
                } else {
                    ""
                };
                undecided(format_args!("daemon {}: {method} {path}: {chain}{hint}", self.base))
            })?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let said = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned());
        let what = format!("daemon {}: {method} {path}: {status}: {said}", self.base);
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                usage(format_args!("{what} (give the daemon's token with --token-file or $AUDITOR_TOKEN)"))
            }
            s if s.is_client_error() && s != StatusCode::REQUEST_TIMEOUT && s != StatusCode::TOO_MANY_REQUESTS => {
                usage(what)
            }
            _ => undecided(what),
        })
    }

    fn get_json(&self, path: &str) -> Result<Value, Failure> {
        let bytes = self.send(reqwest::Method::GET, path, None)?;
        self.json_of(path, &bytes)
    }

    fn json_of(&self, path: &str, bytes: &[u8]) -> Result<Value, Failure> {
        serde_json::from_slice(bytes)
            .map_err(|e| undecided(format_args!("daemon {}: {path}: not JSON: {e}", self.base)))
    }

    /// An audit's status, which must be one: an `id` and a known `state` (an answer that is
    /// not is the daemon's trouble, never shown as if it were an audit's state).
    fn status_of(&self, path: &str, bytes: &[u8]) -> Result<Value, Failure> {
        let s = self.json_of(path, bytes)?;
        if is_status(&s) {
            Ok(s)
        } else {
            let mut shown = s.to_string();
            shown.truncate(200);
            Err(undecided(format_args!("daemon {}: {path}: not an audit's status: {shown}", self.base)))
        }
    }
}

/// Whether `v` is an audit's status as the API gives it: an `id` and a known `state`.
fn is_status(v: &Value) -> bool {
    v["id"].is_string() && v["state"].as_str().and_then(JobState::parse).is_some()
}

/// An audit id as the daemon makes them (checked before it goes into a URL).
fn check_id(id: &str) -> Result<&str, Failure> {
    if auditor::daemon::job::is_job_id(id) {
        Ok(id)
    } else {
        Err(usage(format_args!("{id:?} is not an audit id (audit-<n>)")))
    }
}

/// One line about an audit's status JSON.
fn describe(s: &Value) -> String {
    let id = s["id"].as_str().unwrap_or("?");
    let state = s["state"].as_str().unwrap_or("?");
    let mut line = format!("{id}: {state}");
    if let Some(v) = s["verdict"].as_str() {
        line += &format!(", verdict {v}");
        if let Some(step) = s["first_diverging_step"].as_u64() {
            line += &format!(" at step {step}");
        }
    }
    if let Some(r) = s["reason"].as_str() {
        line += &format!(", reason {r}");
    }
    let p = &s["progress"];
    if p.is_object() {
        line += &format!(
            ", {}/{} steps ({} %)",
            p["steps_done"].as_u64().unwrap_or(0),
            p["steps_total"].as_u64().unwrap_or(0),
            p["percent"].as_f64().unwrap_or(0.0)
        );
        if let (Some(rate), Some(eta)) = (p["steps_per_second"].as_f64(), p["eta_seconds"].as_u64()) {
            line += &format!(", {rate} steps/s, ETA {eta} s");
        }
    } else {
        line += &format!(", {} steps replayed", s["steps_replayed"].as_u64().unwrap_or(0));
    }
    line += &format!(", attempts {}", s["attempts"].as_u64().unwrap_or(0));
    if let Some(e) = s["error"].as_str() {
        line += &format!("; last error: {e}");
    }
    line
}

/// The exit code a finished audit's status calls for.
fn exit_for(s: &Value) -> Exit {
    match s["verdict"].as_str().and_then(|v| v.parse::<VerdictKind>().ok()) {
        Some(v) if v.is_adverse() => Exit::Adverse,
        Some(_) => Exit::Ok,
        None => Exit::Undecided,
    }
}

fn print(client: &Client, value: &Value, text: String) -> Result<(), Failure> {
    if client.json { emit(&format!("{value}\n")) } else { emit(&(text + "\n")) }
}

pub fn submit(args: SubmitArgs) -> Result<Exit, Failure> {
    let client = Client::new(&args.daemon)?;
    let request = AuditRequest {
        trainer_url: args.trainer_url,
        run: args.run,
        trainer_token: secret("--trainer-token-file", args.trainer_token_file.as_deref(), "TRAINER_TOKEN")?,
        device: args.device,
        from: args.from,
        to: args.to,
        mode: args.mode,
        spot_count: args.spot_count,
        spot_seed: args.spot_seed,
        spot_by: args.spot_by,
        spot_seed_fresh: None,
        trainer_pubkey: args.trainer_pubkey,
        idempotency_key: args.idempotency_key,
        data: args.data,
    };
    let body = serde_json::to_value(&request).expect("a request serialises");
    let bytes = client.send(reqwest::Method::POST, "/v1/audits", Some(&body))?;
    let answer = client.status_of("/v1/audits", &bytes)?;
    let id = check_id(answer["id"].as_str().unwrap_or_default())
        .map_err(|_| undecided(format_args!("daemon {}: submit: {:?} is not an audit id", client.base, answer["id"])))?
        .to_string();
    if !args.wait {
        print(&client, &answer, format!("{id} {}", answer["state"].as_str().unwrap_or("queued")))?;
        return Ok(Exit::Ok);
    }
    if !client.json {
        super::exit::warn(format_args!("submitted {id}"));
    }
    wait_for(&client, &id, None, Duration::from_millis(500))
}

pub fn status(args: IdArgs) -> Result<Exit, Failure> {
    let client = Client::new(&args.daemon)?;
    let path = format!("/v1/audits/{}", check_id(&args.id)?);
    let s = client.status_of(&path, &client.send(reqwest::Method::GET, &path, None)?)?;
    print(&client, &s, describe(&s))?;
    Ok(Exit::Ok)
}

pub fn cancel(args: IdArgs) -> Result<Exit, Failure> {
    let client = Client::new(&args.daemon)?;
    let id = check_id(&args.id)?;
    let path = format!("/v1/audits/{id}");
    let s = client.status_of(&path, &client.send(reqwest::Method::DELETE, &path, None)?)?;
    print(&client, &s, describe(&s))?;
    Ok(Exit::Ok)
}

pub fn list(args: ListArgs) -> Result<Exit, Failure> {
    let client = Client::new(&args.daemon)?;
    let mut path = format!("/v1/audits?limit={}", args.limit);
    if let Some(s) = &args.state {
        let state = JobState::parse(s)
            .ok_or_else(|| usage(format_args!("--state {s:?}: not one of queued, running, done, failed")))?;
        path += &format!("&state={}", state.name());
    }
    let v = client.get_json(&path)?;
    // An answer without the list is the daemon's trouble, never shown as "no audits".
    let audits = v["audits"]
        .as_array()
        .filter(|a| a.iter().all(is_status))
        .cloned()
        .ok_or_else(|| undecided(format_args!("daemon {}: {path}: not a list of audits", client.base)))?;
    let text = if audits.is_empty() {
        "no audits".to_string()
    } else {
        audits.iter().map(describe).collect::<Vec<_>>().join("\n")
    };
    print(&client, &v, text)?;
    Ok(Exit::Ok)
}

pub fn wait(args: WaitArgs) -> Result<Exit, Failure> {
    let client = Client::new(&args.daemon)?;
    let id = check_id(&args.id)?.to_string();
    wait_for(&client, &id, args.timeout.map(Duration::from_secs), Duration::from_millis(args.interval_ms.max(50)))
}

/// How long `wait` keeps asking a daemon that fails to answer.
const WAIT_OUTAGE_MAX: Duration = Duration::from_secs(60);

/// Polls until the audit is done or failed, with a progress bar on a terminal's stderr.
fn wait_for(client: &Client, id: &str, timeout: Option<Duration>, every: Duration) -> Result<Exit, Failure> {
    let began = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    if client.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(id.to_string());
    let path = format!("/v1/audits/{id}");
    // Since when the daemon has failed to answer: a short outage (a restart, its database
    // away for a moment) is waited out, a long one ends the wait.
    let mut failing: Option<Instant> = None;
    let s = loop {
        // (An answer that is not an audit's status is no outage: it ends the wait at once.)
        let bytes = match client.send(reqwest::Method::GET, &path, None) {
            Ok(b) => {
                failing = None;
                b
            }
            Err(Failure::Undecided(e))
                if failing.get_or_insert_with(Instant::now).elapsed() < WAIT_OUTAGE_MAX
                    && timeout.is_none_or(|t| began.elapsed() < t) =>
            {
                bar.set_message(format!("the daemon did not answer ({e:#}); asking again"));
                std::thread::sleep(every.max(Duration::from_secs(1)));
                continue;
            }
            Err(e) => return Err(e),
        };
        let s = client.status_of(&path, &bytes)?;
        match s["state"].as_str().and_then(JobState::parse) {
            Some(JobState::Done | JobState::Failed) => break s,
            state => {
                let p = &s["progress"];
                if p.is_object() {
                    bar.set_length(p["steps_total"].as_u64().unwrap_or(0));
                    bar.set_position(p["steps_done"].as_u64().unwrap_or(0));
                    bar.set_message(match p["eta_seconds"].as_u64() {
                        Some(eta) => format!("ETA {eta} s"),
                        None => String::new(),
                    });
                } else {
                    bar.set_message(state.map_or("?", JobState::name).to_string());
                }
            }
        }
        if let Some(t) = timeout
            && began.elapsed() >= t
        {
            bar.abandon();
            return Err(undecided(format_args!("{id} did not finish within {} s: {}", t.as_secs(), describe(&s))));
        }
        std::thread::sleep(every);
    };
    bar.finish_and_clear();
    print(client, &s, describe(&s))?;
    Ok(exit_for(&s))
}

pub fn report(args: ReportArgs) -> Result<Exit, Failure> {
    let client = Client::new(&args.daemon)?;
    let id = check_id(&args.id)?;
    let expected = args.auditor_key.as_deref().map(|k| public_key_arg("--auditor-key", k)).transpose()?;
    writable("--out", args.out.as_deref(), OutputKind::Json)?;
    writable("--evidence", args.evidence.as_deref(), OutputKind::Magic(auditor::evidence::MAGIC))?;
    let path = format!("/v1/reports/{id}");
    let bytes = client.send(reqwest::Method::GET, &path, None)?;
    // Something that is not even a signed report is the daemon's trouble (exit 2); a signed
    // report that does not verify is the finding `report` exists for (exit 1).
    if !serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| v.get("signature").is_some_and(Value::is_string)) {
        return Err(undecided(format_args!("daemon {}: {path}: not a signed report", client.base)));
    }
    if let Some(out) = &args.out {
        write_file("--out", out, &bytes)?;
    }
    let text = String::from_utf8_lossy(&bytes);
    let (valid, summary) = match verify(&text) {
        Err(e) => (false, json!({"id": id, "valid": false, "error": e.to_string()})),
        Ok(v) if expected.as_ref().is_some_and(|k| *k != v.auditor_public_key) => (
            false,
            json!({"id": id, "valid": false, "error": format!("signed by {}, not by the expected key", v.auditor_public_key)}),
        ),
        Ok(v) => {
            let report: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            (
                true,
                json!({
                    "id": id,
                    "valid": true,
                    "verdict": v.verdict_kind.as_str(),
                    "report": report,
                }),
            )
        }
    };
    if let Some(path) = &args.evidence {
        match client.send(reqwest::Method::GET, &format!("/v1/reports/{id}/evidence"), None) {
            Ok(bundle) => write_file("--evidence", path, &bundle)?,
            // A verdict without a disputed step has no bundle: say so, keep the report's answer.
            Err(Failure::Usage(e)) => {
                super::exit::warn(format_args!("--evidence {}: not written: {e:#}", path.display()));
                super::audit::remove_stale_bundle("--evidence", path);
            }
            Err(e) => return Err(e),
        }
    }
    let text = if !valid {
        format!("report {id} does NOT verify: {}", summary["error"].as_str().unwrap_or_default())
    } else {
        let r = &summary["report"];
        let v = &r["verdict"];
        let mut t = format!("report {id} verifies: verdict {}", summary["verdict"].as_str().unwrap_or_default());
        if let Some(step) = v["step"].as_u64() {
            t += &format!(" at step {step}");
        }
        let at = &r["at_step"];
        for (label, leaf) in [("trainer state", &at["trainer"]["leaf"]), ("auditor state", &at["auditor"])] {
            if let Some(d) = leaf["state"].as_str() {
                t += &format!("\n  {label} {d}");
            }
        }
        t += &format!(
            "\n  signed by {}\n  trainer root {}",
            r["auditor_public_key"].as_str().unwrap_or("?"),
            r["trainer_root"].as_str().unwrap_or("?")
        );
        t
    };
    print(&client, &summary, text)?;
    Ok(match summary["verdict"].as_str().and_then(|v| v.parse::<VerdictKind>().ok()) {
        Some(v) if valid && !v.is_adverse() => Exit::Ok,
        _ => Exit::Adverse,
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename (a partial download never
/// replaces a good file).
fn write_file(flag: &str, path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    engine::output::write_output(path, bytes).map_err(|e| undecided(format_args!("{flag} {}: {e}", path.display())))
}
