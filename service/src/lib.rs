//! What the two HTTP services, the trainer's record server (`trainer-agent serve`) and the
//! auditor daemon (`auditor serve`), share, and nothing else: both depend on it, it depends on
//! no crate of ours (it knows HTTP and tokio, not records or audits).
//!
//! - [`serve`]: the accept loop. `axum::serve` sets no header-read or idle timeout and takes
//!   every connection, so a client holding a thousand idle or half-sent connections starved
//!   `/healthz` (issue 14). Here a connection must send a request head within
//!   [`Limits::header_read_timeout`] (also the idle limit between requests on a kept-alive
//!   connection), and past [`Limits::connections_max`] new connections are closed at once
//!   rather than queued behind the held ones.
//! - [`shutdown_signal`]: SIGTERM or Ctrl-C; SIGHUP is logged and ignored, never fatal.
//! - [`secret`]: a token from a flag, a file or the environment, never empty.
//! - [`init_logs`] and [`log_requests`]: `tracing` to stderr as text or JSON, one line per request.
//! - [`error_text`]: an error and its causes for a CLI's last line, each said once.
//! - [`svg`]: line charts as standalone SVG, for `trainer-agent inspect --plot` and the daemon's
//!   report pages.

#![forbid(unsafe_code)]

mod logs;
pub mod svg;
pub mod tls;

pub use logs::{LogFormat, init_logs};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connection limits of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub connections_max: usize,
    /// Time to send a whole request head, counted from the connection's start or the end of its
    /// previous response (so it is also how long an idle kept-alive connection is kept).
    pub header_read_timeout: Duration,
    /// How long a graceful shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: CONNECTIONS_MAX_DEFAULT,
            header_read_timeout: HEADER_READ_TIMEOUT_DEFAULT,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Below the common 1024 open-file limit, with room for the services' own files and requests.
pub const CONNECTIONS_MAX_DEFAULT: usize = 512;
pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Prometheus text for the process itself, every name prefixed `<prefix>_process_`: resident
/// memory, peak resident memory, threads and open file descriptors, read from `/proc/self`
/// (absent where there is no procfs).
pub fn process_metrics(prefix: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    let mut gauge = |name: &str, help: &str, value: Option<u64>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {prefix}_process_{name} {help}");
            let _ = writeln!(out, "# TYPE {prefix}_process_{name} gauge");
            let _ = writeln!(out, "{prefix}_process_{name} {v}");
        }
    };
    gauge("resident_memory_bytes", "Resident memory (VmRSS)", field("VmRSS:").map(|kb| kb * 1024));
    gauge("resident_memory_peak_bytes", "Peak resident memory (VmHWM)", field("VmHWM:").map(|kb| kb * 1024));
    gauge("threads", "Threads of the process", field("Threads:"));
    let fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    gauge("open_fds", "Open file descriptors", fds);
    out
}

/// The body length a request announces (`Content-Length`), so that a server refuses a body over
/// its limit before reading any of it.
pub fn announced_body_len(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers.get(axum::http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The bearer token of a request's `Authorization` header (the scheme's name in any case, as
/// RFC 9110 has it). A request with several `Authorization` headers has none: which one counts
/// would be a guess, and a proxy in front may have guessed otherwise.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let mut all = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let (v, None) = (all.next()?.to_str().ok()?, all.next()) else {
        return None;
    };
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start_matches(' '))
}

/// A bearer token that can be replaced while a server runs: given a file, SIGHUP re-reads it
/// ([`Token::reload_on_hangup`]), so an operator rotates the token without a restart. Cloning
/// shares the token.
///
/// The token a reload replaces is still accepted for a grace period ([`TOKEN_GRACE_DEFAULT`],
/// [`Token::set_grace`]; zero revokes it at once): a client in the middle of its work (an
/// auditor replaying a run, a user waiting on an audit) is not cut off by a routine rotation.
#[derive(Clone, Default)]
pub struct Token(Arc<std::sync::RwLock<Tokens>>);

/// How long a replaced token stays valid by default.
pub const TOKEN_GRACE_DEFAULT: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Tokens {
    current: Option<String>,
    /// The token the last reload replaced, and when.
    previous: Option<(String, std::time::Instant)>,
    grace: Option<Duration>,
}

/// Whether `given` is `want`, in time independent of where they differ (both are hashed first,
/// so their lengths do not show either).
pub fn same_secret(given: &str, want: &str) -> bool {
    let (a, b) = (common::codec::sha256(given.as_bytes()), common::codec::sha256(want.as_bytes()));
    std::hint::black_box(a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.get().is_some() { "Token(<redacted>)" } else { "Token(none)" })
    }
}

impl Token {
    pub fn new(token: Option<String>) -> Token {
        Token(Arc::new(std::sync::RwLock::new(Tokens { current: token, ..Tokens::default() })))
    }

    /// How long a token that a reload replaces stays valid (zero: not at all).
    pub fn set_grace(&self, grace: Duration) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).grace = Some(grace);
    }

    /// The token now (`None`: no token is required).
    pub fn get(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).current.clone()
    }

    /// Whether a request bearing `given` may pass: no token is set, `given` is the token, or it
    /// is the one the last reload replaced, within the grace period.
    pub fn accepts(&self, given: Option<&str>) -> bool {
        let t = self.0.read().unwrap_or_else(|p| p.into_inner());
        let Some(current) = &t.current else { return true };
        let Some(given) = given else { return false };
        let grace = t.grace.unwrap_or(TOKEN_GRACE_DEFAULT);
        let previous = t.previous.as_ref().filter(|(_, at)| at.elapsed() < grace);
        // Both compared, whichever matches, so the time taken does not say which did.
        let now = same_secret(given, current);
        let before = previous.is_some_and(|(p, _)| same_secret(given, p));
        now | before
    }

    /// Reads the token from `path` again, under [`secret`]'s rules. A file that cannot be read,
    /// or holds an empty token, leaves the current token in place: the error says why.
    pub fn reload_from(&self, path: &Path) -> Result<(), String> {
        let new = secret(None, Some(path), "")?.ok_or_else(|| format!("{}: no token", path.display()))?;
        let mut t = self.0.write().unwrap_or_else(|p| p.into_inner());
        if t.current.as_deref() != Some(new.as_str()) {
            let old = t.current.replace(new);
            t.previous = old.map(|o| (o, std::time::Instant::now()));
        }
        Ok(())
    }

    /// On every SIGHUP, reloads the token from `path` and logs the outcome (never the token).
    /// Call from within the runtime; the listener lives as long as the runtime.
    pub fn reload_on_hangup(&self, path: PathBuf) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
            let token = self.clone();
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match token.reload_from(&path) {
                        Ok(()) => tracing::info!(file = %path.display(), "SIGHUP: token reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: token not reloaded; the current one stays"),
                    }
                }
            });
        }
        #[cfg(not(unix))]
        let _ = path;
    }
}

/// Blocking-pool threads a server keeps for its request handlers (store and record reads),
/// beyond those its own long-running work holds.
pub const HANDLER_BLOCKING_THREADS: usize = 16;

/// The tokio runtime of a server: `blocking_threads` at most in the blocking pool (tokio's
/// default is 512, so a burst of concurrent reads would leave hundreds of threads and their
/// memory behind), idle ones ended after two seconds.
pub fn runtime(blocking_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(blocking_threads.max(1))
        .thread_keep_alive(Duration::from_secs(2))
        .enable_all()
        .build()
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes; then stops accepting,
/// lets requests in flight finish (up to `limits.shutdown_grace`) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls(listener, app, limits, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given: each accepted connection's handshake must finish
/// within `limits.header_read_timeout` (a slow or silent client holds its permit no longer).
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<tls::ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.connections_max.clamp(1, Semaphore::MAX_PERMITS)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused_logged = Instant::now() - Duration::from_secs(60);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if refused_logged.elapsed() >= Duration::from_secs(10) {
                tracing::warn!(%peer, connections_max = limits.connections_max, "at the connection limit; closing new connections");
                refused_logged = Instant::now();
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        match &tls {
            None => {
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(permit);
                });
            }
            Some(t) => {
                let (acceptor, http, watcher) = (t.0.clone(), http.clone(), graceful.watcher());
                let limit = limits.header_read_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let _ = watcher.watch(http.serve_connection(TokioIo::new(tls_stream), service)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            grace_ms = limits.shutdown_grace.as_millis() as u64,
            "connections still open after the grace period"
        );
    }
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C. SIGHUP (a closed terminal, a reload sent by habit) is logged
/// and ignored: it must never stop a service. The handlers are installed when this is called,
/// not when the future is first polled, so call it before serving.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (term, hup) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate()).ok(), signal(SignalKind::hangup()).ok())
    };
    async move {
        let ctrl_c = async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let term = async move {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(unix)]
        let hup = async move {
            match hup {
                Some(mut s) => {
                    while s.recv().await.is_some() {
                        tracing::info!("SIGHUP: never stops the server (a --token-file token is reloaded)");
                    }
                    std::future::pending::<()>().await
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let (term, hup) = (std::future::pending::<()>(), std::future::pending::<()>());
        tokio::select! {
            () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
            () = term => tracing::info!("SIGTERM: shutting down"),
            () = hup => {}
        }
    }
}

/// A secret (a bearer token) from, in this order: the command-line value, the file, the
/// environment variable `env`. None of them set: `Ok(None)`. An empty or blank one is an
/// error (an empty token would start a server that turns every request away, or accepts any).
/// A file's trailing newline is not part of the token. The message names the source, never the
/// secret.
/// `e` and its causes, `: `-separated, leaving out a cause whose text already ends the line
/// (an error that prints its source, as `"{path}: {source}"` does, would otherwise say the OS
/// error twice).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.ends_with(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

/// A token file holds one line; anything much longer is not one.
pub const TOKEN_FILE_BYTES_MAX: u64 = 64 << 10;

pub fn secret(flag: Option<String>, file: Option<&Path>, env: &str) -> Result<Option<String>, String> {
    let (value, from) = if let Some(v) = flag {
        (v, "--token".to_string())
    } else if let Some(path) = file {
        let text = common::files::read_regular_text(path, TOKEN_FILE_BYTES_MAX)
            .map_err(|e| format!("--token-file {}: reading it: {e}", path.display()))?;
        (text.trim_end_matches(['\n', '\r']).to_string(), format!("--token-file {}", path.display()))
    } else if let Some(v) = std::env::var_os(env) {
        (v.into_string().map_err(|_| format!("{env}: not UTF-8"))?, env.to_string())
    } else {
        return Ok(None);
    };
    if value.trim().is_empty() {
        return Err(format!("{from}: the token is empty; leave it out for an open server"));
    }
    Ok(Some(value))
}

/// The headers every response of both servers carries: no content sniffing, no framing (the
/// sign-in form cannot be clickjacked), no referrer, and a content policy that allows the
/// pages' inline style and nothing else (they have no scripts).
pub const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    ),
];

/// Middleware: [`SECURITY_HEADERS`] on every response (a handler's own value wins).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    for (name, value) in SECURITY_HEADERS {
        let headers = response.headers_mut();
        if !headers.contains_key(name) {
            headers.insert(name, axum::http::HeaderValue::from_static(value));
        }
    }
    response
}

/// Middleware: one log line per request (method, path, status, milliseconds). Never the query
/// string or headers, where secrets might be.
pub async fn log_requests(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let t0 = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if response.status().is_server_error() {
        tracing::warn!(%method, %path, status, ms, "request");
    } else {
        tracing::info!(%method, %path, status, ms, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Debug)]
    struct Wrapped(std::io::Error, &'static str);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.1, self.0)
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_text_says_each_cause_once() {
        let e = Wrapped(std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"), "stat x/spec.json");
        assert_eq!(error_text(&e), "stat x/spec.json: no such file");
        let outer = std::io::Error::other(e);
        assert_eq!(error_text(&outer), "stat x/spec.json: no such file");
        let quiet = std::io::Error::other("context only");
        assert_eq!(error_text(&quiet), "context only");
    }

    /// The raw answer; empty when the server closed the connection (at its limit) first.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return String::new() };
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if s.write_all(request.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    async fn start(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        addr
    }

    /// Issue 14: 1,100 idle or half-sent connections starved `/healthz`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_sent_requests_neither_starve_nor_outlive_the_header_timeout() {
        let limits =
            Limits { connections_max: 100, header_read_timeout: Duration::from_millis(500), ..Limits::default() };
        let addr = start(limits).await;
        let mut loris = Vec::new();
        for _ in 0..300 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
            loris.push(s);
        }
        // The slots are all held: new connections are closed at once, never left hanging; once
        // the header timeout has freed them, /healthz answers.
        let t0 = Instant::now();
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz")).await.expect("no hang");
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(3), "still starved after the header timeout");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // And the half-sent connections were closed by the server.
        for s in &mut loris[..100] {
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("closed by the server");
            let closed = match &n {
                Ok(k) => *k == 0 || buf[..*k].starts_with(b"HTTP/1.1 408"),
                Err(_) => true,
            };
            assert!(closed, "{n:?}");
        }
    }

    #[test]
    fn secrets_come_from_the_flag_a_file_or_the_environment_and_are_never_empty() {
        let dir = std::env::temp_dir().join(format!("tiebreak-service-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let env = "TIEBREAK_SERVICE_TEST_TOKEN";
        assert_eq!(secret(Some("a".into()), Some(&file), env), Ok(Some("a".into())));
        assert_eq!(secret(None, Some(&file), env), Ok(Some("s3cret".into())));
        assert_eq!(secret(None, None, env), Ok(None));
        assert!(secret(Some(String::new()), None, env).unwrap_err().contains("empty"));
        std::fs::write(&file, "\n").unwrap();
        assert!(secret(None, Some(&file), env).unwrap_err().contains("empty"));
        assert!(secret(None, Some(&dir.join("missing")), env).unwrap_err().contains("missing"));
    }

    /// Issue 14: a burst of concurrent reads (50-way report GETs) left 75–113 threads behind.
    /// The server runtime runs at most its bound of blocking tasks at once, and ends idle
    /// threads.
    #[test]
    fn the_server_runtime_bounds_its_blocking_threads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let rt = runtime(4).unwrap();
        let (running, most) = (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicUsize::new(0)));
        rt.block_on(async {
            let tasks: Vec<_> = (0..50)
                .map(|_| {
                    let (running, most) = (running.clone(), most.clone());
                    tokio::task::spawn_blocking(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let most = most.load(Ordering::SeqCst);
        assert!((2..=4).contains(&most), "{most} blocking tasks ran at once");
    }

    #[test]
    fn process_metrics_report_memory_and_threads() {
        let text = process_metrics("tiebreak_test");
        if std::path::Path::new("/proc/self/status").exists() {
            for name in ["resident_memory_bytes", "threads", "open_fds"] {
                let line = text.lines().find(|l| l.starts_with(&format!("tiebreak_test_process_{name} "))).unwrap();
                let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
                assert!(v > 0, "{line}");
            }
        }
    }

    #[test]
    fn a_token_reloads_from_its_file_and_a_bad_file_keeps_the_current_one() {
        let dir = std::env::temp_dir().join(format!("tiebreak-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "first\n").unwrap();
        let token = Token::new(secret(None, Some(&file), "").unwrap());
        let shared = token.clone();
        assert_eq!(token.get().as_deref(), Some("first"));
        std::fs::write(&file, "second\n").unwrap();
        token.reload_from(&file).unwrap();
        assert_eq!(shared.get().as_deref(), Some("second"), "clones share the token");
        std::fs::write(&file, "  \n").unwrap();
        assert!(token.reload_from(&file).is_err());
        std::fs::remove_file(&file).unwrap();
        assert!(token.reload_from(&file).is_err());
        assert_eq!(token.get().as_deref(), Some("second"), "a bad reload keeps the current token");
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        // The replaced token stays valid for the grace period, and only for it.
        assert!(token.accepts(Some("second")) && token.accepts(Some("first")) && !token.accepts(Some("third")));
        assert!(!token.accepts(None) && !token.accepts(Some("")));
        token.set_grace(Duration::ZERO);
        assert!(token.accepts(Some("second")) && !token.accepts(Some("first")), "grace 0 revokes it at once");
        token.set_grace(Duration::from_secs(60));
        std::fs::write(&file, "third\n").unwrap();
        token.reload_from(&file).unwrap();
        assert!(token.accepts(Some("third")) && token.accepts(Some("second")) && !token.accepts(Some("first")));
        token.reload_from(&file).unwrap();
        assert!(token.accepts(Some("second")), "reloading the same token keeps the one before it in grace");
        assert!(Token::new(None).accepts(None), "no token: every request passes");
        let exact = Token::new(Some("s3cret".into()));
        for wrong in ["", "s3cre", "s3cret ", "S3cret", "s3cret\0"] {
            assert!(!exact.accepts(Some(wrong)), "{wrong:?}");
        }
        let mut h = axum::http::HeaderMap::new();
        for (value, token) in
            [("Bearer s3cret", Some("s3cret")), ("bearer s3cret", Some("s3cret")), ("Basic s3cret", None)]
        {
            h.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&h), token, "{value}");
        }
        // Two headers, whatever their order: no token at all.
        for second in ["Bearer wrong", "Bearer s3cret"] {
            h.insert(axum::http::header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
            h.append(axum::http::header::AUTHORIZATION, second.parse().unwrap());
            assert_eq!(bearer(&h), None, "{second}");
        }
    }
}
