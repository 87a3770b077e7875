//! The daemon's HTTP API (axum).
//!
//! | route | auth | answer |
//! | --- | --- | --- |
//! | `POST /v1/audits` | token | 202 `{"id", "state"}` ([`AuditRequest`] body) |
//! | `GET /v1/audits[?state=&limit=&before=]` | token | `{"audits": [status…], "next"}`, newest first, `limit` 1 to 1000 (default 100); `next` (when there are more) is the `before` of the next page |
//! | `GET /v1/audits/{id}` | token | status: `id`, `state`, `steps_replayed`, `verdict`, `reason`, …; while running, `progress`: `steps_done`, `steps_total`, `percent`, `steps_per_second`, `eta_seconds` |
//! | `DELETE /v1/audits/{id}` | token | cancels a queued or running audit: `failed`, reason `cancelled` |
//! | `POST /v1/audits/{id}/retry` | token | a failed audit queued again (its progress kept) |
//! | `GET /v1/reports/{id}` | open | the signed report JSON, byte for byte as stored |
//! | `GET /v1/reports/{id}/evidence` | open | the evidence bundle (binary) |
//! | `GET /metrics` | open | Prometheus text |
//! | `GET /healthz` | open | `{"status": "ok", …}`; 503 `{"status": "unhealthy", "why"}` when the store fails its check |
//! | `GET /readyz` | open | 200 `{"status": "ready"}`; 503 while shutting down or with an unhealthy store |
//! | `GET /ui…`, `GET /reports/{id}` | token / open | the web pages ([`super::ui`]) |
//!
//! Reports and evidence are open because they are meant to be published: anyone can check
//! them. Audit requests carry trainer URLs and tokens, so listing and submitting need the
//! daemon's token when it has one. Every error is JSON `{"error", "code"}` with a 4xx/5xx
//! status; trainer tokens are never echoed.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Shared;
use super::job::{AuditRequest, Inserted, Job, JobState, is_job_id};
use super::live::Live;

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    pub(super) fn store(e: super::job::StoreError) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", e.to_string())
    }
}

/// A write through the API that failed counts as the worker's failed writes do (the store-errors
/// metric, and `/healthz`'s "a store write failed recently"): a daemon on a full disk that refuses
/// every submission must not look healthy to a load balancer.
fn write_failed(shared: &Shared, op: &'static str) -> impl FnOnce(super::job::StoreError) -> ApiError + Send + 'static {
    let metrics = shared.metrics.clone();
    move |e| {
        super::job::Observer::store_error(&metrics, op);
        ApiError::store(e)
    }
}

/// Seconds a client is asked to wait before retrying a 429 or a 503.
const RETRY_AFTER_S: &str = "10";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(json!({"error": self.message, "code": self.code}))).into_response();
        // A full queue or an unavailable store: when to ask again (RFC 9110).
        if matches!(self.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_S));
        }
        r
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// The routes, with the body limit and the JSON fallbacks.
pub fn router(shared: Shared) -> Router {
    let limit = shared.config.body_bytes_max;
    Router::new()
        .route("/v1/audits", post(submit).get(list))
        .route("/v1/audits/{id}", get(status).delete(cancel))
        .route("/v1/audits/{id}/retry", post(retry))
        .route("/v1/reports/{id}", get(report))
        .route("/v1/reports/{id}/evidence", get(evidence))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/ui", get(super::ui::audits_page))
        .route("/ui/audits/{id}", get(super::ui::audit_page))
        .route("/ui/login", get(super::ui::login_form).post(super::ui::login))
        .route("/ui/logout", post(super::ui::logout))
        .route("/reports/{id}", get(super::ui::report_page))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "method not allowed on this route")
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), time_limit))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), count_requests))
        .layer(axum::middleware::from_fn(service::security_headers))
        .layer(axum::middleware::from_fn(service::log_requests))
        .with_state(shared)
}

/// A request that takes longer than `request_time_max_ms` (a body sent a byte at a time) is
/// answered 408 and its connection freed. One that announces a body over `body_bytes_max` is
/// answered 413 at once, not after waiting for a body it will refuse.
async fn time_limit(
    State(shared): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(n) = service::announced_body_len(request.headers())
        && n > shared.config.body_bytes_max as u64
    {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("request body of {n} bytes, over the {} bytes allowed", shared.config.body_bytes_max),
        )
        .into_response();
    }
    let limit = std::time::Duration::from_millis(shared.config.request_time_max_ms);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            format!("the request took longer than {} ms", limit.as_millis()),
        )
        .into_response(),
    }
}

/// Counts answered requests by method and status (bounded label sets: no paths).
async fn count_requests(
    State(shared): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        _ => "other",
    };
    let response = next.run(request).await;
    shared.metrics.http_requests.with_label_values(&[method, response.status().as_str()]).inc();
    response
}

/// Whether the request carries the daemon's bearer token (or the one a reload just replaced,
/// within its grace period; or the daemon has none).
pub(super) fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    shared.token.accepts(service::bearer(headers))
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> ApiResult<()> {
    if authorized(shared, headers) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token"))
    }
}

/// Runs a store call on a blocking thread.
pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("worker thread: {e}")))?
}

async fn submit(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    authorize(&shared, &headers)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("request body over the {} bytes allowed", shared.config.body_bytes_max),
            )
        } else {
            ApiError::bad_request(format!("reading the body: {e}"))
        }
    })?;
    let request: AuditRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("body is not an audit request (line {}, column {}): {e}", e.line(), e.column()))
    })?;
    request.validate().map_err(ApiError::bad_request)?;
    if let Some(name) = &request.data
        && shared.config.data.path_of(name).is_none()
    {
        return Err(ApiError::bad_request(shared.config.data.unknown(name)));
    }
    shared
        .config
        .trainer
        .check_allowed(&request.trainer_url)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "trainer-not-allowed", e))?;
    // A spot draw nobody can predict: the seed is drawn here, once, and kept with the audit.
    let mut request = request;
    if request.mode.as_deref() == Some("spot")
        && request.spot_seed.is_none()
        && request.spot_by.as_deref() != Some("largest-update")
    {
        let seed = crate::replay::SeedChoice::fresh_seed().map_err(|e| ApiError::internal(e.to_string()))?;
        request.spot_seed = Some(seed);
        request.spot_seed_fresh = Some(true);
    }
    let store = shared.store.clone();
    let queued_max = shared.config.queue_max;
    let now = shared.clock.now_ms();
    let failed = write_failed(&shared, "insert");
    let inserted = blocking(move || store.insert(&request, queued_max, now).map_err(failed)).await?;
    match inserted {
        Inserted::New(id) => {
            shared.metrics.submitted.inc();
            shared.queued.notify_waiters();
            Ok((StatusCode::ACCEPTED, axum::Json(json!({"id": id, "state": "queued"}))).into_response())
        }
        Inserted::Existing(id) => {
            let store = shared.store.clone();
            let lookup = id.clone();
            let state = blocking(move || store.get(&lookup).map_err(ApiError::store)).await?.map(|j| j.state);
            let state = state.map_or("queued", JobState::name);
            Ok((StatusCode::ACCEPTED, axum::Json(json!({"id": id, "state": state}))).into_response())
        }
        Inserted::Conflict(id) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency-conflict",
            format!("idempotency_key was used for audit {id} with a different request"),
        )),
        Inserted::QueueFull => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue-full",
            format!("{} audits are open (queued or running), the most this daemon takes; retry later", queued_max),
        )),
    }
}

/// A job as clients see it (no token).
pub fn status_json(job: &Job, live: &Live) -> Value {
    let r = &job.request;
    let mut v = json!({
        "id": job.id,
        "state": job.state.name(),
        "trainer_url": r.trainer_url,
        "run": r.run,
        "device": r.device,
        "mode": r.mode.as_deref().unwrap_or("full"),
        "data": r.data,
        "from": r.from,
        "to": r.to,
        "attempts": job.attempts,
        "steps_replayed": job.steps_replayed,
        "steps_resumed": job.steps_resumed,
        "verdict": job.verdict.map(|k| k.as_str()),
        "first_diverging_step": job.first_step,
        "error": job.error,
        "reason": job.reason.map(|r| r.as_str()),
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
    });
    if job.state == JobState::Done {
        v["report"] = json!(format!("/v1/reports/{}", job.id));
    }
    if job.state == JobState::Running
        && let Some(p) = live.snapshot(&job.id)
    {
        v["progress"] = p;
    }
    v
}

/// The most audits one page of `GET /v1/audits` lists.
pub const LIST_LIMIT_MAX: u64 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u64>,
    before: Option<String>,
}

async fn list(
    State(shared): State<Shared>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&shared, &headers)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!("state: {s:?} is not one of queued, running, done, failed"))
        })?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=LIST_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit: {limit} is not 1 to {LIST_LIMIT_MAX}")));
    }
    if let Some(b) = &q.before {
        check_id(b).map_err(|_| ApiError::bad_request(format!("before: {b:?} is not an audit id")))?;
    }
    let store = shared.store.clone();
    // One more than asked, to know whether there is a next page.
    let mut jobs = blocking(move || store.list(state, limit + 1, q.before.as_deref()).map_err(ApiError::store)).await?;
    let more = jobs.len() as u64 > limit;
    jobs.truncate(limit as usize);
    let next = if more { jobs.last().map(|j| j.id.clone()) } else { None };
    Ok(axum::Json(
        json!({"audits": jobs.iter().map(|j| status_json(j, &shared.metrics.live)).collect::<Vec<_>>(), "next": next}),
    )
    .into_response())
}

fn check_id(id: &str) -> ApiResult<()> {
    if is_job_id(id) { Ok(()) } else { Err(ApiError::not_found(format!("no audit {id:?}"))) }
}

/// The `{id}` of a route, as JSON 404 when it does not even decode (`%FF`): taken as a
/// `Result` so that the token is checked first and axum's plain-text rejection never answers.
fn path_id(path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(id) = path.map_err(|_| ApiError::not_found("no such audit (the id is not valid UTF-8)"))?;
    check_id(&id)?;
    Ok(id)
}

async fn status(
    State(shared): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    authorize(&shared, &headers)?;
    let id = path_id(path)?;
    let store = shared.store.clone();
    let lookup = id.clone();
    let job = blocking(move || store.get(&lookup).map_err(ApiError::store)).await?;
    let job = job.ok_or_else(|| ApiError::not_found(format!("no audit {id:?}")))?;
    Ok(axum::Json(status_json(&job, &shared.metrics.live)).into_response())
}

/// The report of a done audit, or why there is none.
async fn stored<T: Send + 'static>(
    shared: &Shared,
    id: String,
    get: impl FnOnce(&dyn super::job::Store, &str) -> Result<Option<T>, super::job::StoreError> + Send + 'static,
) -> ApiResult<Option<T>> {
    check_id(&id)?;
    let store = shared.store.clone();
    blocking(move || {
        let job =
            store.get(&id).map_err(ApiError::store)?.ok_or_else(|| ApiError::not_found(format!("no audit {id:?}")))?;
        if job.state != JobState::Done {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not-ready",
                format!("audit {id} is {}; its report is written when it is done", job.state.name()),
            ));
        }
        get(&*store, &id).map_err(ApiError::store)
    })
    .await
}

async fn report(State(shared): State<Shared>, path: Result<Path<String>, PathRejection>) -> ApiResult<Response> {
    let id = path_id(path)?;
    let r = stored(&shared, id.clone(), |s, id| s.report(id)).await?;
    let r = r.ok_or_else(|| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("audit {id} is done without a report"))
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], r).into_response())
}

async fn evidence(State(shared): State<Shared>, path: Result<Path<String>, PathRejection>) -> ApiResult<Response> {
    let id = path_id(path)?;
    let e = stored(&shared, id.clone(), |s, id| s.evidence(id)).await?;
    let e = e.ok_or_else(|| {
        ApiError::not_found(format!("audit {id} has no evidence bundle (its verdict is not about a step)"))
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], e).into_response())
}

async fn metrics(State(shared): State<Shared>) -> ApiResult<Response> {
    let s = shared.clone();
    let text = blocking(move || Ok(s.metrics.render(&*s.store))).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// 503 with `{"status": "unhealthy", "why"}`.
fn unhealthy(status: &str, why: String) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": status, "why": why}))).into_response()
}

async fn healthz(State(shared): State<Shared>) -> ApiResult<Response> {
    let store = shared.store.clone();
    let counts = blocking(move || {
        store.check().map_err(ApiError::store)?;
        JobState::ALL
            .into_iter()
            .map(|s| store.count(s).map(|n| (s.name(), n)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::store)
    })
    .await;
    let counts = match counts {
        Ok(c) => c,
        Err(e) => return Ok(unhealthy("unhealthy", e.message)),
    };
    // The check reads; writes can fail on their own (a full disk, a read-only store).
    if let Some((op, ago)) = shared.metrics.recent_store_error(STORE_ERROR_RECENT) {
        return Ok(unhealthy(
            "unhealthy",
            format!(
                "a store write failed {:.0} s ago ({op}): {}",
                ago.as_secs_f64(),
                if shared.config.store.is_shared() {
                    "was the database unreachable, or is it read-only or out of space? (the log has the error)"
                } else {
                    "is its disk full or read-only? (the log has the error)"
                }
            ),
        ));
    }
    let audits: serde_json::Map<String, Value> = counts.into_iter().map(|(k, n)| (k.to_string(), json!(n))).collect();
    Ok(axum::Json(json!({
        "status": "ok",
        "version": crate::AUDITOR_VERSION,
        "workers": shared.config.workers,
        "queue_max": shared.config.queue_max,
        "audits": audits,
        "auditor_public_key": shared.auditor_public_key,
    }))
    .into_response())
}

/// A failed store operation this recent makes `/healthz` unhealthy.
const STORE_ERROR_RECENT: std::time::Duration = std::time::Duration::from_secs(30);

/// Ready for traffic: not shutting down, and the store passes its check.
async fn readyz(State(shared): State<Shared>) -> ApiResult<Response> {
    if shared.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(unhealthy("not-ready", "shutting down".into()));
    }
    let store = shared.store.clone();
    match blocking(move || store.check().map_err(ApiError::store)).await {
        Ok(()) => Ok(axum::Json(json!({"status": "ready"})).into_response()),
        Err(e) => Ok(unhealthy("not-ready", e.message)),
    }
}

async fn cancel(
    State(shared): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    authorize(&shared, &headers)?;
    let id = path_id(path)?;
    let (store, lookup, now) = (shared.store.clone(), id.clone(), shared.clock.now_ms());
    let failed = write_failed(&shared, "cancel");
    let state = blocking(move || store.cancel(&lookup, now).map_err(failed)).await?;
    match state {
        None => Err(ApiError::not_found(format!("no audit {id:?}"))),
        Some(JobState::Done) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already-done",
            format!("audit {id} is done; its report stays published"),
        )),
        Some(_) => status_of(&shared, id).await,
    }
}

async fn retry(
    State(shared): State<Shared>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    authorize(&shared, &headers)?;
    let id = path_id(path)?;
    let (store, lookup, now, max) = (shared.store.clone(), id.clone(), shared.clock.now_ms(), shared.config.queue_max);
    let failed = write_failed(&shared, "retry");
    let state = blocking(move || store.retry(&lookup, max, now).map_err(failed)).await?;
    match state {
        None => Err(ApiError::not_found(format!("no audit {id:?}"))),
        Some((true, _)) => {
            shared.queued.notify_waiters();
            status_of(&shared, id).await
        }
        Some((false, JobState::Failed)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-retried",
            format!("audit {id} stays failed: it was quarantined, or {max} audits are queued already"),
        )),
        Some((false, s)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-failed",
            format!("audit {id} is {}; only a failed audit is retried", s.name()),
        )),
    }
}

/// The status of audit `id`.
async fn status_of(shared: &Shared, id: String) -> ApiResult<Response> {
    let store = shared.store.clone();
    let lookup = id.clone();
    let job = blocking(move || store.get(&lookup).map_err(ApiError::store)).await?;
    let job = job.ok_or_else(|| ApiError::not_found(format!("no audit {id:?}")))?;
    Ok(axum::Json(status_json(&job, &shared.metrics.live)).into_response())
}
