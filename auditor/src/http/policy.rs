//! What the auditor asks of a trainer's record server before any request: timeouts, retries,
//! size limits and how slow its answers may be ([`RetryPolicy`], [`AnswerClock`]), and which
//! URLs it may be reached at ([`parse_trainer_url`]).

use std::time::{Duration, Instant};

use crate::source::SourceError;

/// Timeouts, retries and size limits for requests to a trainer.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// One request, connect to last byte.
    pub request_timeout: Duration,
    /// Wait before the first retry; doubled after each, up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A request still failing this long after its first attempt makes the trainer
    /// unresponsive. It is the only way to that verdict: failed attempts are retried (with
    /// backoff) until it passes, however many there were.
    pub deadline: Duration,
    /// Largest response body accepted.
    pub response_bytes_max: u64,
    /// The most time the trainer's answers may be slow in all, over one source and its clones
    /// (requests in flight at once count each): an answer is slow for the time it takes beyond
    /// [`SLOW_ANSWER_FREE`] plus one second per [`SLOW_ANSWER_BYTES_PER_S`] of its body (so the
    /// size of what is fetched, and a slow link, never count: only waiting does). Past it, the
    /// next request is not made and the trainer is unresponsive: a trainer answering each request
    /// just inside `deadline` would otherwise hold an audit for as long as it likes. `None`: no
    /// bound.
    pub slow_answers_max: Option<Duration>,
    /// Extra trust anchors (DER) for `https://` trainers, besides the system's roots.
    pub ca_certs: Vec<Vec<u8>>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            request_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
            response_bytes_max: 512 << 20,
            slow_answers_max: Some(Duration::from_secs(6 * 3600)),
            ca_certs: Vec::new(),
        }
    }
}

/// The time spent waiting for a trainer's answers, those still in flight included (each
/// request counts: requests in flight at once are each counted).
#[derive(Debug)]
pub struct AnswerClock {
    base: Instant,
    /// Answers received (or given up on): microseconds waited for them.
    done_us: std::sync::atomic::AtomicU64,
    /// Requests in flight: how many, and the sum of their starts (microseconds since `base`).
    in_flight: std::sync::Mutex<(u64, u64)>,
}

impl Default for AnswerClock {
    fn default() -> Self {
        AnswerClock { base: Instant::now(), done_us: Default::default(), in_flight: Default::default() }
    }
}

impl AnswerClock {
    fn now_us(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub(super) fn started(&self) -> u64 {
        let at = self.now_us();
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        *f = (f.0 + 1, f.1.saturating_add(at));
        at
    }

    pub(super) fn ended(&self, started_us: u64) {
        let now = self.now_us();
        {
            let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            *f = (f.0.saturating_sub(1), f.1.saturating_sub(started_us));
        }
        self.done_us.fetch_add(now.saturating_sub(started_us), std::sync::atomic::Ordering::Relaxed);
    }

    /// Time waited so far, for answers received and for those still in flight.
    pub fn waited(&self) -> Duration {
        let now = self.now_us();
        let (n, starts) = *self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight = n.saturating_mul(now).saturating_sub(starts);
        Duration::from_micros(self.done_us.load(std::sync::atomic::Ordering::Relaxed).saturating_add(in_flight))
    }
}

/// What an answer may take before it is slow ([`RetryPolicy::slow_answers_max`]), besides the
/// time its size explains.
pub const SLOW_ANSWER_FREE: Duration = Duration::from_secs(1);
/// The least rate an answer's body is expected at (1 MiB/s): its size at this rate is never
/// slow.
pub const SLOW_ANSWER_BYTES_PER_S: f64 = 1048576.0;

impl RetryPolicy {
    /// The wait before attempt `attempt` (1 = the first retry).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff_initial.saturating_mul(factor).min(self.backoff_max)
    }
}

/// Checks a record server's URL: `http[s]://host[:port]` (an optional path prefix, no query or
/// fragment) and no credentials in it: a URL is published in reports (their `record` field)
/// and shown in statuses; a token goes in `trainer_token`. The message names the problem,
/// never the URL's password.
pub fn parse_trainer_url(url: &str) -> Result<reqwest::Url, String> {
    // The URL parser drops tabs and newlines and trims spaces, so such a URL would be fetched as
    // another string than the one stored, logged, printed and signed into the report.
    if let Some((at, c)) = url.char_indices().find(|&(_, c)| c.is_control() || c.is_whitespace()) {
        return Err(format!("has a control or space character ({c:?}) at byte {at}"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("has credentials in it (user:password@); pass a bearer token as trainer_token instead".into());
    }
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("scheme {:?}: only http:// and https:// are spoken", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("has a query or fragment; give the server's base URL".into());
    }
    Ok(parsed)
}

/// The HTTP(S) client for record servers: no redirects, the policy's timeouts, the system's
/// roots plus the policy's private CA.
pub(super) fn trainer_client(policy: &RetryPolicy) -> Result<reqwest::Client, SourceError> {
    service::tls::install_provider();
    let unavailable = |e: String| SourceError::Unavailable(format!("building the HTTP client: {e}"));
    let mut builder = reqwest::Client::builder()
        // A record server's redirect is a refusal to serve, never a hop to another host.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(policy.request_timeout)
        .connect_timeout(policy.request_timeout);
    for der in &policy.ca_certs {
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_der(der).map_err(|e| unavailable(e.to_string()))?);
    }
    builder.build().map_err(|e| unavailable(e.to_string()))
}

/// `host:port` of a parsed trainer URL (the port made explicit), as an allow-list names it.
pub fn host_port(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    format!("{host}:{}", url.port_or_known_default().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_clock_counts_answers_in_flight_and_received() {
        let clock = AnswerClock::default();
        assert_eq!(clock.waited(), Duration::ZERO);
        let (a, b) = (clock.started(), clock.started());
        std::thread::sleep(Duration::from_millis(30));
        let in_flight = clock.waited();
        assert!(in_flight >= Duration::from_millis(60), "two requests in flight count each: {in_flight:?}");
        clock.ended(a);
        clock.ended(b);
        let done = clock.waited();
        assert!(done >= in_flight, "{done:?} < {in_flight:?}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.waited(), done, "nothing in flight: the clock stands still");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = RetryPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(750),
            ..RetryPolicy::default()
        };
        let waits: Vec<u128> = (1..=6).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 750, 750, 750]);
        assert_eq!(p.backoff(200), Duration::from_millis(750), "no overflow on long retries");
    }
}
