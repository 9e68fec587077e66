//! The tasks a worker can run: a name, an async function, a timeout and an
//! optional check of the arguments (so `POST /tasks/` can refuse bad ones
//! with 422 before anything is written).
//!
//! Applications extend [`Registry::with_builtins`] with their own:
//!
//! ```no_run
//! use std::time::Duration;
//! use tidepool::queue::{Registry, TaskOptions, TaskError};
//!
//! let mut registry = Registry::with_builtins();
//! registry.register("send_email", TaskOptions::default().timeout(Duration::from_secs(30)), |ctx, args| async move {
//!     let to = args["to"].as_str().ok_or_else(|| TaskError::fatal("args.to must be a string"))?;
//!     tracing::info!(job = ctx.job_id, to, "sending");
//!     Ok(None)
//! });
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_postgres::types::Type;

use super::job::{InvalidJob, NewJob};
use crate::db::{Database, DbError};

/// Default and limits of the built-in `slow_query` task's `seconds`.
pub const SLOW_QUERY_DEFAULT_SECONDS: f64 = 5.0;
pub const SLOW_QUERY_MAX_SECONDS: f64 = 3600.0;
/// How long a task may run when its options do not say.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(300);

/// What a task returns: a result to keep (if the worker keeps results), or
/// nothing.
pub type TaskResult = Result<Option<Value>, TaskError>;
pub type TaskFuture = Pin<Box<dyn Future<Output = TaskResult> + Send>>;
type Handler = Arc<dyn Fn(TaskContext, Value) -> TaskFuture + Send + Sync>;
/// Checks a task's arguments before it is enqueued; the error says what is wrong.
pub type ArgsCheck = fn(&Value) -> Result<(), String>;

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// Worth another attempt, after a backoff, while attempts remain.
    #[error("{0}")]
    Retry(String),
    /// Retrying cannot help (bad arguments, say): the job is dead at once.
    #[error("{0}")]
    Fatal(String),
}

impl TaskError {
    pub fn retry(message: impl Into<String>) -> Self {
        Self::Retry(message.into())
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Fatal(message.into())
    }
}

impl From<DbError> for TaskError {
    fn from(e: DbError) -> Self {
        Self::Retry(crate::error_chain(&e))
    }
}

/// What a running task knows about its job, and the pool it may use.
#[derive(Clone)]
pub struct TaskContext {
    pub job_id: i64,
    pub attempt: i32,
    pub max_attempts: i32,
    pub queue: String,
    /// The worker's pool for tasks, `--concurrency` connections to PgBouncer
    /// by default; separate from the worker's own queue connections.
    pub db: Database,
}

#[derive(Clone, Copy)]
pub struct TaskOptions {
    /// Past it the attempt is abandoned (its future dropped, its query
    /// cancelled) and counts as failed.
    pub timeout: Duration,
    pub check_args: Option<ArgsCheck>,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self { timeout: DEFAULT_TASK_TIMEOUT, check_args: None }
    }
}

impl TaskOptions {
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn check_args(mut self, check: ArgsCheck) -> Self {
        self.check_args = Some(check);
        self
    }
}

/// One registered task.
#[derive(Clone)]
pub struct Task {
    handler: Handler,
    pub options: TaskOptions,
}

impl Task {
    /// Starts one attempt.
    pub fn start(&self, ctx: TaskContext, args: Value) -> TaskFuture {
        (self.handler)(ctx, args)
    }
}

/// Tasks by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, Task>,
}

impl Registry {
    pub fn empty() -> Self {
        Self::default()
    }

    /// `noop` and `slow_query`.
    pub fn with_builtins() -> Self {
        let mut registry = Self::empty();
        registry.register("noop", TaskOptions::default(), |_, _| async { Ok(None) });
        registry.register(
            "slow_query",
            TaskOptions::default()
                .timeout(Duration::from_secs_f64(SLOW_QUERY_MAX_SECONDS) + Duration::from_secs(60))
                .check_args(|args| slow_query_seconds(args).map(|_| ())),
            slow_query,
        );
        registry
    }

    /// Adds (or replaces) task `name`.
    pub fn register<F, Fut>(&mut self, name: &str, options: TaskOptions, handler: F) -> &mut Self
    where
        F: Fn(TaskContext, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx, args| Box::pin(handler(ctx, args)));
        self.tasks.insert(name.to_owned(), Task { handler, options });
        self
    }

    /// Everything that can be known about `job` before it is written: its
    /// task is registered, its fields are within limits ([`NewJob::validate`],
    /// `now` being the caller's clock), and its task accepts its args.
    pub fn check(&self, job: &NewJob, now: DateTime<Utc>) -> Result<(), InvalidJob> {
        let task =
            self.get(&job.task).ok_or_else(|| InvalidJob::UnknownTask(job.task.clone(), self.names()))?;
        job.validate(now)?;
        match task.options.check_args {
            Some(check) => {
                check(&job.args).map_err(|reason| InvalidJob::InvalidArgs { task: job.task.clone(), reason })
            }
            None => Ok(()),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Task> {
        self.tasks.get(name)
    }

    /// The registered names, in order.
    pub fn task_names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// The registered names, comma-separated, for error messages.
    pub fn names(&self) -> String {
        self.task_names().collect::<Vec<_>>().join(", ")
    }

    /// The task's name as a metric label: registered names only, so a job
    /// enqueued with a made-up name cannot add series.
    pub fn label<'a>(&'a self, name: &'a str) -> &'a str {
        if self.tasks.contains_key(name) {
            name
        } else {
            "unknown"
        }
    }
}

/// `seconds` of `slow_query`'s args: a number from 0 to 3600, 5 if absent.
pub fn slow_query_seconds(args: &Value) -> Result<f64, String> {
    match args.get("seconds") {
        None => Ok(SLOW_QUERY_DEFAULT_SECONDS),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if (0.0..=SLOW_QUERY_MAX_SECONDS).contains(&s) => Ok(s),
            _ => Err(format!("seconds must be from 0 to {SLOW_QUERY_MAX_SECONDS}, got {n}")),
        },
        Some(other) => Err(format!("seconds must be a number, got {other}")),
    }
}

/// The seed's task: `SELECT pg_sleep(seconds)` through the task pool.
async fn slow_query(ctx: TaskContext, args: Value) -> TaskResult {
    let seconds = slow_query_seconds(&args).map_err(TaskError::fatal)?;
    let conn = ctx.db.get().await?;
    conn.query_typed("SELECT pg_sleep($1)", &[(&seconds, Type::FLOAT8)], Duration::from_secs_f64(seconds))
        .await?;
    Ok(Some(json!({ "slept": seconds })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_registered_and_labels_are_bounded() {
        let registry = Registry::with_builtins();
        assert!(registry.get("noop").is_some());
        assert!(registry.get("slow_query").is_some());
        assert_eq!(registry.names(), "noop, slow_query");
        assert_eq!(registry.label("noop"), "noop");
        assert_eq!(registry.label("made-up"), "unknown");
    }

    #[test]
    fn check_names_the_unknown_task_then_the_limits_then_the_args() {
        let registry = Registry::with_builtins();
        let now = Utc::now();
        let check = |job: NewJob| registry.check(&job, now);
        assert_eq!(check(NewJob::new("slow_query", json!({"seconds": 1}))), Ok(()));
        assert!(matches!(check(NewJob::new("nope", json!({}))), Err(InvalidJob::UnknownTask(..))));
        let too_big = json!({"seconds": 1, "pad": "x".repeat(crate::queue::job::MAX_ARGS_BYTES)});
        assert!(matches!(check(NewJob::new("slow_query", too_big)), Err(InvalidJob::ArgsTooLarge { .. })));
        let bad_args = NewJob::new("slow_query", json!({"seconds": -1}));
        assert!(matches!(check(bad_args), Err(InvalidJob::InvalidArgs { .. })));
    }

    #[test]
    fn slow_query_takes_seconds_within_range() {
        assert_eq!(slow_query_seconds(&json!({})), Ok(5.0));
        assert_eq!(slow_query_seconds(&json!({"seconds": 0.5})), Ok(0.5));
        assert_eq!(slow_query_seconds(&json!({"seconds": 0})), Ok(0.0));
        for bad in [json!({"seconds": -1}), json!({"seconds": 3601}), json!({"seconds": "5"})] {
            assert!(slow_query_seconds(&bad).is_err(), "{bad}");
        }
    }
}
