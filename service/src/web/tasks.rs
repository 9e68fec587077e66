//! The task routes of `tidepool web`:
//!
//! | route | answer |
//! |---|---|
//! | `POST /tasks/` | 202 `{"id", "state"}` (and `Location`); 409 `{"error", "id"}` when a pending job holds the unique key |
//! | `GET /tasks/{id}` | 200 the job (state, attempts, errors, result); 404 if unknown |
//! | `DELETE /tasks/{id}` | 200 cancelled; 202 a running job will be stopped; 409 already finished; 404 unknown |
//!
//! The body of `POST /tasks/` is `{"task", "args", "queue", "priority",
//! "run_at" | "delay", "unique_key", "max_attempts"}`; only `task` is
//! required. Refusals, before anything is written: malformed JSON or a bad
//! field 400, `run_at` not RFC 3339 400, args over the limit 413, unknown
//! task or args the task rejects 422.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::LOCATION;
use http::{HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::response::{json, ApiError, Body};
use super::routes::App;
use crate::queue::job::parse_run_at;
use crate::queue::{self, Cancelled, InvalidJob, JobState, NewJob, Registry, Schedule};

/// `delay`: seconds as a number, or a duration such as "1m 30s".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Delay {
    Seconds(f64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueRequest {
    task: String,
    #[serde(default = "empty_object")]
    args: Value,
    queue: Option<String>,
    priority: Option<i16>,
    run_at: Option<String>,
    delay: Option<Delay>,
    unique_key: Option<String>,
    max_attempts: Option<i32>,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

impl From<InvalidJob> for ApiError {
    fn from(e: InvalidJob) -> Self {
        let status = match e {
            InvalidJob::UnknownTask(..) | InvalidJob::InvalidArgs { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            InvalidJob::ArgsTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::with_status(status, e.to_string())
    }
}

/// The job a `POST /tasks/` body describes, fully checked: nothing is
/// written for a body this refuses.
pub fn parse_enqueue(body: &[u8], registry: &Registry, now: DateTime<Utc>) -> Result<NewJob, ApiError> {
    let request: EnqueueRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a valid task request: {e}")))?;
    let schedule = match (request.run_at, request.delay) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give run_at or delay, not both")),
        (Some(at), None) => Schedule::At(parse_run_at(&at)?),
        (None, Some(delay)) => Schedule::After(parse_delay(delay)?),
        (None, None) => Schedule::Now,
    };
    let mut job = NewJob::new(request.task, request.args).schedule(schedule);
    if let Some(queue) = request.queue {
        job.queue = queue;
    }
    if let Some(priority) = request.priority {
        job.priority = priority;
    }
    if let Some(attempts) = request.max_attempts {
        job.max_attempts = attempts;
    }
    job.unique_key = request.unique_key;
    registry.check(&job, now)?;
    Ok(job)
}

fn parse_delay(delay: Delay) -> Result<Duration, ApiError> {
    let invalid =
        || ApiError::bad_request("delay must be seconds (a number from 0) or a duration such as \"90s\"");
    match delay {
        Delay::Seconds(s) => Duration::try_from_secs_f64(s).map_err(|_| invalid()),
        Delay::Text(text) => humantime::parse_duration(&text).map_err(|_| invalid()),
    }
}

#[derive(Serialize)]
struct Accepted {
    id: i64,
    state: JobState,
}

#[derive(Serialize)]
struct Duplicate {
    error: String,
    id: i64,
}

pub async fn enqueue(app: &App, body: Bytes) -> Result<Response<Body>, ApiError> {
    let job = parse_enqueue(&body, &app.registry, Utc::now())?;
    let conn = app.db.get().await?;
    let enqueued = conn
        .run(Duration::ZERO, queue::sql::enqueue(conn.client(), &job))
        .await?
        .ok_or_else(|| ApiError::unavailable("the unique key kept changing hands; retry"))?;
    if enqueued.duplicate {
        let error = format!(
            "a pending job (scheduled, available or running) already has unique_key {:?}",
            job.unique_key.as_deref().unwrap_or_default()
        );
        return Ok(json(StatusCode::CONFLICT, &Duplicate { error, id: enqueued.id }));
    }
    app.metrics.jobs_enqueued.with_label_values(&[&job.task, &job.queue]).inc();
    let state = match job.schedule {
        Schedule::Now => JobState::Available,
        Schedule::At(at) if at <= Utc::now() => JobState::Available,
        Schedule::After(d) if d.is_zero() => JobState::Available,
        _ => JobState::Scheduled,
    };
    let mut response = json(StatusCode::ACCEPTED, &Accepted { id: enqueued.id, state });
    if let Ok(location) = HeaderValue::from_str(&format!("/tasks/{}", enqueued.id)) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

fn job_id(id: Option<i64>) -> Result<i64, ApiError> {
    id.ok_or_else(|| ApiError::bad_request("a job id is a positive integer, as returned by POST /tasks/"))
}

fn not_found(id: i64) -> ApiError {
    ApiError::with_status(
        StatusCode::NOT_FOUND,
        format!(
            "no job {id}: it never existed, succeeded without a result to keep, or its record was pruned after its retention"
        ),
    )
}

pub async fn get(app: &App, id: Option<i64>) -> Result<Response<Body>, ApiError> {
    let id = job_id(id)?;
    let conn = app.db.get().await?;
    match conn.run(Duration::ZERO, queue::lookup(conn.client(), id)).await? {
        Some(view) => Ok(json(StatusCode::OK, &view)),
        None => Err(not_found(id)),
    }
}

#[derive(Serialize)]
struct CancelAnswer {
    id: i64,
    state: JobState,
    cancel_requested: bool,
}

pub async fn cancel(app: &App, id: Option<i64>) -> Result<Response<Body>, ApiError> {
    let id = job_id(id)?;
    let conn = app.db.get().await?;
    match conn.run(Duration::ZERO, queue::cancel(conn.client(), id)).await? {
        Cancelled::Cancelled => Ok(json(
            StatusCode::OK,
            &CancelAnswer { id, state: JobState::Cancelled, cancel_requested: false },
        )),
        Cancelled::Requested => Ok(json(
            StatusCode::ACCEPTED,
            &CancelAnswer { id, state: JobState::Running, cancel_requested: true },
        )),
        Cancelled::NotPending => match conn.run(Duration::ZERO, queue::lookup(conn.client(), id)).await? {
            Some(view) => Err(ApiError::with_status(
                StatusCode::CONFLICT,
                format!(
                    "job {id} has already finished: {}",
                    serde_json::to_string(&view.state).unwrap_or_default()
                ),
            )),
            None => Err(not_found(id)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::job::MAX_ARGS_BYTES;
    use serde_json::json;

    fn parse(body: Value) -> Result<NewJob, ApiError> {
        parse_enqueue(body.to_string().as_bytes(), &Registry::with_builtins(), Utc::now())
    }

    fn status(body: Value) -> StatusCode {
        parse(body).map_or_else(|e| e.status, |_| StatusCode::ACCEPTED)
    }

    #[test]
    fn a_full_request_becomes_a_job() {
        let job = parse(json!({
            "task": "slow_query", "args": {"seconds": 0.5}, "queue": "reports", "priority": 5,
            "delay": 30, "unique_key": "k", "max_attempts": 3
        }))
        .expect("valid");
        assert_eq!(job.task, "slow_query");
        assert_eq!(job.queue, "reports");
        assert_eq!(job.priority, 5);
        assert_eq!(job.schedule, Schedule::After(Duration::from_secs(30)));
        assert_eq!(job.unique_key.as_deref(), Some("k"));
        assert_eq!(job.max_attempts, 3);
        let job = parse(json!({"task": "noop", "delay": "1m 30s"})).expect("valid");
        assert_eq!(job.schedule, Schedule::After(Duration::from_secs(90)));
        assert_eq!(job.args, json!({}));
    }

    #[test]
    fn run_at_takes_rfc3339_with_any_offset() {
        let job = parse(json!({"task": "noop", "run_at": "2027-01-02T03:04:05+02:00"})).expect("valid");
        let expected = DateTime::parse_from_rfc3339("2027-01-02T01:04:05Z").map(|t| t.to_utc()).ok();
        assert_eq!(Some(job.schedule), expected.map(Schedule::At));
    }

    #[test]
    fn each_bad_input_gets_its_status() {
        assert_eq!(status(json!({"task": "nope"})), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            status(json!({"task": "slow_query", "args": {"seconds": -1}})),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(status(json!({"task": "noop", "run_at": "tomorrow"})), StatusCode::BAD_REQUEST);
        assert_eq!(status(json!({"task": "noop", "run_at": "2030-01-02 03:04"})), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(json!({"task": "noop", "run_at": "2999-01-01T00:00:00Z"})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(json!({"task": "noop", "run_at": "2030-01-01T00:00:00Z", "delay": 1})),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(status(json!({"task": "noop", "delay": -1})), StatusCode::BAD_REQUEST);
        assert_eq!(status(json!({"task": "noop", "args": [1, 2]})), StatusCode::BAD_REQUEST);
        assert_eq!(status(json!({"task": "noop", "queue": "a b"})), StatusCode::BAD_REQUEST);
        assert_eq!(status(json!({"task": "noop", "max_attempts": 0})), StatusCode::BAD_REQUEST);
        assert_eq!(status(json!({"task": "noop", "priority": 70000})), StatusCode::BAD_REQUEST);
        assert_eq!(status(json!({"task": "noop", "colour": "blue"})), StatusCode::BAD_REQUEST);
        assert_eq!(status(json!({"args": {}})), StatusCode::BAD_REQUEST);
        let big = json!({"task": "slow_query", "args": {"pad": "x".repeat(MAX_ARGS_BYTES)}});
        assert_eq!(status(big), StatusCode::PAYLOAD_TOO_LARGE);
        for malformed in [&b"{"[..], b"", b"null", b"[]", b"{\"task\": \"noop\",}"] {
            let err =
                parse_enqueue(malformed, &Registry::with_builtins(), Utc::now()).expect_err("malformed");
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(malformed));
        }
    }

    #[test]
    fn unknown_task_errors_list_the_known_ones() {
        let err = parse(json!({"task": "nope"})).expect_err("unknown");
        assert!(err.message.contains("noop, slow_query"), "{}", err.message);
    }
}
