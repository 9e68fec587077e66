//! A JSON API over the queue, for an application to mount on purpose
//! ([`tasks_api`]; the demo does):
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

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::LOCATION;
use http::{HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::response::{json, ApiError, Body};
use super::Server;
use crate::db::Conn;
use crate::queue::job::parse_run_at;
use crate::queue::{self, Cancelled, JobState, NewJob, Schedule};
use crate::task::Registry;

/// The routes above, for an application to mount on purpose: they enqueue
/// any of its tasks for whoever reaches the port.
///
/// ```
/// let app: axum::Router = axum::Router::new().merge(tidepool::web::tasks_api());
/// ```
pub fn tasks_api<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/tasks/", post(enqueue)).route("/tasks/{id}", get(lookup).delete(cancel))
}

/// The server of the request being served.
struct Tidepool(Arc<Server>);

impl<S: Send + Sync> FromRequestParts<S> for Tidepool {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Tidepool(super::current_server()?))
    }
}

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
    let mut job = registry.new_job(&request.task, request.args)?.schedule(schedule);
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

async fn enqueue(Tidepool(server): Tidepool, body: Bytes) -> Result<Response<Body>, ApiError> {
    // Checked before a connection is taken: a bad request never waits for one.
    let job = parse_enqueue(&body, &server.registry, Utc::now())?;
    let conn = server.db.get().await?;
    let enqueued = queue::enqueue_job(&conn, &job).await?;
    if enqueued.duplicate {
        let error = format!(
            "a pending job (scheduled, available or running) already has unique_key {:?}",
            job.unique_key.as_deref().unwrap_or_default()
        );
        return Ok(json(StatusCode::CONFLICT, &Duplicate { error, id: enqueued.id }));
    }
    server.metrics.jobs_enqueued.with_label_values(&[&job.task, &job.queue]).inc();
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

/// A job id from the path: a positive integer.
fn job_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::bad_request("a job id is a positive integer, as returned by POST /tasks/"))
}

fn not_found(id: i64) -> ApiError {
    ApiError::not_found(format!(
        "no job {id}: it never existed, succeeded without a result to keep, or its record was pruned after its retention"
    ))
}

async fn lookup(Path(id): Path<String>, conn: Conn) -> Result<Response<Body>, ApiError> {
    let id = job_id(&id)?;
    match queue::lookup(&conn, id).await? {
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

async fn cancel(Path(id): Path<String>, conn: Conn) -> Result<Response<Body>, ApiError> {
    let id = job_id(&id)?;
    match queue::cancel(&conn, id).await? {
        Cancelled::Cancelled => Ok(json(
            StatusCode::OK,
            &CancelAnswer { id, state: JobState::Cancelled, cancel_requested: false },
        )),
        Cancelled::Requested => Ok(json(
            StatusCode::ACCEPTED,
            &CancelAnswer { id, state: JobState::Running, cancel_requested: true },
        )),
        Cancelled::NotPending => match queue::lookup(&conn, id).await? {
            Some(view) => Err(ApiError::conflict(format!(
                "job {id} has already finished: {}",
                serde_json::to_string(&view.state).unwrap_or_default()
            ))),
            None => Err(not_found(id)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::job::MAX_ARGS_BYTES;
    use crate::task::{Task, TaskContext, TaskError};
    use serde_json::json;

    /// Stand-ins for the demo's tasks: what the parser checks is theirs.
    #[derive(Serialize, Deserialize)]
    struct Noop {}

    impl Task for Noop {
        const NAME: &'static str = "noop";
        type State = ();
        type Output = ();
        async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[derive(Serialize, Deserialize)]
    struct SlowQuery {
        #[serde(default)]
        seconds: f64,
    }

    impl Task for SlowQuery {
        const NAME: &'static str = "slow_query";
        type State = ();
        type Output = ();
        fn validate(&self) -> Result<(), String> {
            if self.seconds >= 0.0 {
                Ok(())
            } else {
                Err("seconds must be from 0".into())
            }
        }
        async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
            Ok(())
        }
    }

    fn registry() -> Registry {
        Registry::new().with::<Noop>(()).and_then(|r| r.with::<SlowQuery>(())).unwrap_or_default()
    }

    fn parse(body: Value) -> Result<NewJob, ApiError> {
        parse_enqueue(body.to_string().as_bytes(), &registry(), Utc::now())
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
            let err = parse_enqueue(malformed, &registry(), Utc::now()).expect_err("malformed");
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(malformed));
        }
    }

    #[test]
    fn unknown_task_errors_list_the_known_ones() {
        let err = parse(json!({"task": "nope"})).expect_err("unknown");
        assert!(err.message.contains("noop, slow_query"), "{}", err.message);
    }
}
