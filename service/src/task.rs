//! Tasks: typed arguments, a typed output, and the code that runs them.
//!
//! A task is a type. Its fields are the job's arguments, stored as JSON in
//! the queue (`#[derive(Serialize, Deserialize)]`); [`Task`] gives it a name,
//! a queue, a timeout and attempts, the application state it needs, and
//! `run`. Enqueue it with [`crate::queue::enqueue`]; a worker whose
//! [`Registry`] holds it runs it.
//!
//! ```
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use tidepool::task::{Task, TaskContext, TaskError};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendReceipt {
//!     order_id: i64,
//! }
//!
//! #[derive(Serialize)]
//! struct Receipt {
//!     sent_to: String,
//! }
//!
//! impl Task for SendReceipt {
//!     const NAME: &'static str = "send_receipt";
//!     const QUEUE: &'static str = "emails";
//!     const TIMEOUT: Duration = Duration::from_secs(30);
//!     type State = ();
//!     type Output = Receipt;
//!
//!     async fn run(self, ctx: TaskContext<()>) -> Result<Receipt, TaskError> {
//!         let conn = ctx.db.get().await?;
//!         let row = conn
//!             .query_one("SELECT email FROM orders WHERE id = $1", &[(&self.order_id, tidepool::db::Type::INT8)])
//!             .await?;
//!         Ok(Receipt { sent_to: row.get(0) })
//!     }
//! }
//! ```
//!
//! Application state (clients, configuration) reaches a task through
//! [`Task::State`]: an application with state `S` can register a task only
//! if the task's state can be taken from `S` ([`axum::extract::FromRef`],
//! implemented for `S` itself), so a task that needs something the
//! application does not have is a compile error, not a failed job.
//!
//! The arguments are checked before a job is written: they must deserialize
//! into the task's type and pass [`Task::validate`], or `POST /tasks/` and
//! `enqueue` refuse them (422) and the typed enqueue returns the error.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::db::{Database, DbError};
use crate::queue::job::{is_valid_queue_name, InvalidJob, NewJob, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE};
use crate::queue::periodic::Periodic;
use crate::queue::rate_limit::{self, RateLimit};

/// How long a task may run when it does not say.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(300);

/// A kind of job: its arguments are the type's fields.
pub trait Task: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The name jobs carry in the queue: unique within an application,
    /// 1 to 64 bytes. Renaming a task orphans the jobs already enqueued.
    const NAME: &'static str;
    /// The queue its jobs go to unless the enqueue says otherwise.
    const QUEUE: &'static str = DEFAULT_QUEUE;
    /// Past it an attempt is abandoned (its future dropped, its query
    /// cancelled) and counts as failed.
    const TIMEOUT: Duration = DEFAULT_TASK_TIMEOUT;
    /// Attempts a job gets unless the enqueue says otherwise (1 to 100).
    const MAX_ATTEMPTS: i32 = DEFAULT_MAX_ATTEMPTS;
    /// A global limit on how often its jobs are claimed, across every
    /// worker ([`crate::queue::rate_limit`]); none by default.
    const RATE_LIMIT: Option<RateLimit> = None;

    /// What the task needs of the application's state; `()` for nothing.
    type State: Clone + Send + Sync + 'static;
    /// What a successful attempt returns, kept as the job's result (for
    /// the worker's result retention); `()` keeps none.
    type Output: Serialize + Send;

    /// Checks the arguments beyond their types; the error says what is
    /// wrong. Runs before a job is written.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Runs one attempt.
    fn run(
        self,
        ctx: TaskContext<Self::State>,
    ) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;
}

/// What a running attempt knows about its job.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// The job's id.
    pub id: i64,
    /// This attempt's number, from 1.
    pub attempt: i32,
    /// Attempts the job may have.
    pub max_attempts: i32,
    /// The queue it came from.
    pub queue: String,
    /// The workflow stage it is a member of, if any
    /// ([`crate::queue::workflow`]); [`TaskContext::inputs`] reads the
    /// outputs of the stage before it.
    pub stage: Option<i64>,
}

/// What a running attempt gets: its job, the worker's task pool and the
/// task's share of the application's state.
#[derive(Clone)]
pub struct TaskContext<S> {
    /// The job being run.
    pub job: JobInfo,
    /// The worker's pool for tasks (its concurrency in connections to
    /// PgBouncer by default), separate from the worker's own queue
    /// connections.
    pub db: Database,
    /// The task's state ([`Task::State`]).
    pub state: S,
}

impl<S> TaskContext<S> {
    /// The outputs of the stage before this job's, in member order: what a
    /// chord's callback or a chain's next link reads
    /// ([`crate::queue::workflow`]). Empty for a job outside a workflow and
    /// in a first stage. An output that is not a `T` is a fatal error.
    pub async fn inputs<T: DeserializeOwned>(&self) -> Result<Vec<T>, TaskError> {
        let Some(stage) = self.job.stage else {
            return Ok(Vec::new());
        };
        let conn = self.db.get().await?;
        let outputs = conn.run(Duration::ZERO, crate::queue::sql::stage_inputs(conn.client(), stage)).await?;
        outputs
            .into_iter()
            .map(|output| {
                serde_json::from_value(output).map_err(|e| {
                    TaskError::fatal(format!("an output of the stage before does not fit this task: {e}"))
                })
            })
            .collect()
    }

    /// The one output of the stage before: a chain's previous link. Fatal
    /// when that stage had not exactly one job.
    pub async fn input<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        let mut inputs = self.inputs::<T>().await?;
        match (inputs.pop(), inputs.is_empty()) {
            (Some(input), true) => Ok(input),
            (last, _) => Err(TaskError::fatal(format!(
                "input() reads the one output of the stage before; it had {}",
                inputs.len() + usize::from(last.is_some())
            ))),
        }
    }
}

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
    /// A failure worth another attempt.
    pub fn retry(message: impl Into<String>) -> Self {
        Self::Retry(message.into())
    }

    /// A failure no attempt can mend.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Fatal(message.into())
    }
}

impl From<DbError> for TaskError {
    fn from(e: DbError) -> Self {
        Self::Retry(crate::error_chain(&e))
    }
}

/// What an attempt returns to the worker: a result to keep, or none.
pub(crate) type TaskResult = Result<Option<Value>, TaskError>;
pub(crate) type TaskFuture = Pin<Box<dyn Future<Output = TaskResult> + Send>>;
type Runner = Arc<dyn Fn(JobInfo, Database, Value) -> TaskFuture + Send + Sync>;

/// A task's defaults, as its type declares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskOptions {
    /// [`Task::QUEUE`].
    pub queue: &'static str,
    /// [`Task::TIMEOUT`].
    pub timeout: Duration,
    /// [`Task::MAX_ATTEMPTS`].
    pub max_attempts: i32,
}

/// One registered task, its type erased.
#[derive(Clone)]
pub(crate) struct Registered {
    pub(crate) options: TaskOptions,
    check: fn(&Value) -> Result<(), String>,
    run: Runner,
}

impl Registered {
    /// Starts one attempt.
    pub(crate) fn start(&self, job: JobInfo, db: Database, args: Value) -> TaskFuture {
        (self.run)(job, db, args)
    }
}

/// Why a task or a schedule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The name is taken.
    #[error("two tasks are named {0:?}")]
    Duplicate(&'static str),
    /// The name or a default is out of bounds.
    #[error("task {name:?}: {reason}")]
    Invalid {
        /// The task.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A queue's rate limit is out of bounds.
    #[error("rate limit of queue {queue:?}: {reason}")]
    RateLimit {
        /// The queue.
        queue: String,
        /// What is wrong.
        reason: String,
    },
    /// A schedule is out of bounds, is named twice, or runs a task the
    /// application does not have.
    #[error("schedule {name:?}: {reason}")]
    Schedule {
        /// The schedule.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// The tasks an application's processes know, by name, each with its
/// state: what a worker runs, and what `POST /tasks/` and `enqueue` accept.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Registered>,
    schedules: Vec<Periodic>,
    /// By key ([`crate::queue::rate_limit::task_key`], `queue_key`).
    rate_limits: BTreeMap<String, RateLimit>,
}

impl Registry {
    /// No tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds task `T` with its state. Refused if the name is taken or the
    /// task's defaults are out of bounds.
    pub fn register<T: Task>(&mut self, state: T::State) -> Result<&mut Self, RegistryError> {
        let defaults = NewJob::new(T::NAME, Value::Object(Default::default()))
            .queue(T::QUEUE)
            .max_attempts(T::MAX_ATTEMPTS);
        if let Err(e) = defaults.validate(Utc::now()) {
            return Err(RegistryError::Invalid { name: T::NAME, reason: e.to_string() });
        }
        if T::TIMEOUT.is_zero() {
            return Err(RegistryError::Invalid {
                name: T::NAME,
                reason: "its timeout must be above zero".into(),
            });
        }
        if self.tasks.contains_key(T::NAME) {
            return Err(RegistryError::Duplicate(T::NAME));
        }
        if let Some(limit) = T::RATE_LIMIT {
            limit.validate().map_err(|e| RegistryError::Invalid { name: T::NAME, reason: e.to_string() })?;
            self.rate_limits.insert(rate_limit::task_key(T::NAME), limit);
        }
        let run: Runner = Arc::new(move |job, db, args| {
            let state = state.clone();
            Box::pin(async move {
                let task: T = args_of(args).map_err(|e| {
                    TaskError::fatal(format!("the job's args do not fit task {}: {e}", T::NAME))
                })?;
                let output = task.run(TaskContext { job, db, state }).await?;
                let value = serde_json::to_value(output).map_err(|e| {
                    TaskError::fatal(format!("the result of task {} is not JSON: {e}", T::NAME))
                })?;
                Ok(if value.is_null() { None } else { Some(value) })
            })
        });
        let options = TaskOptions { queue: T::QUEUE, timeout: T::TIMEOUT, max_attempts: T::MAX_ATTEMPTS };
        self.tasks.insert(T::NAME, Registered { options, check: check_args::<T>, run });
        Ok(self)
    }

    /// [`Registry::register`], by value.
    pub fn with<T: Task>(mut self, state: T::State) -> Result<Self, RegistryError> {
        self.register::<T>(state)?;
        Ok(self)
    }

    /// Adds a schedule of one of its tasks. Refused if the task is not
    /// registered, another schedule has the name, or it is out of bounds.
    pub fn periodic(&mut self, periodic: Periodic) -> Result<&mut Self, RegistryError> {
        let name = periodic.name().to_owned();
        let refuse = |reason: String| RegistryError::Schedule { name: name.clone(), reason };
        periodic.validate().map_err(|e| refuse(e.to_string()))?;
        if self.schedules.iter().any(|p| p.name() == periodic.name()) {
            return Err(refuse("another schedule has this name".into()));
        }
        if let Err(e) = self.check(periodic.job(), Utc::now()) {
            return Err(refuse(e.to_string()));
        }
        self.schedules.push(periodic);
        Ok(self)
    }

    /// Limits how often jobs are claimed from `queue`, across every worker
    /// ([`crate::queue::rate_limit`]). Refused if out of bounds, or the
    /// queue's name is not valid; a second limit on a queue replaces the first.
    pub fn rate_limit_queue(&mut self, queue: &str, limit: RateLimit) -> Result<&mut Self, RegistryError> {
        let refuse = |reason: String| RegistryError::RateLimit { queue: queue.to_owned(), reason };
        limit.validate().map_err(|e| refuse(e.to_string()))?;
        if !is_valid_queue_name(queue) {
            return Err(refuse(InvalidJob::QueueName(queue.to_owned()).to_string()));
        }
        self.rate_limits.insert(rate_limit::queue_key(queue), limit);
        Ok(self)
    }

    /// Every rate limit, by key.
    pub fn rate_limits(&self) -> impl Iterator<Item = (&str, RateLimit)> + '_ {
        self.rate_limits.iter().map(|(key, limit)| (key.as_str(), *limit))
    }

    /// The keys of the limits a claim from `queue` is under: the queue's,
    /// and every task's (a task's jobs may be enqueued to any queue).
    pub fn rate_limit_keys(&self, queue: &str) -> Vec<String> {
        let queue = rate_limit::queue_key(queue);
        self.rate_limits.keys().filter(|key| key.starts_with("task:") || **key == queue).cloned().collect()
    }

    /// Its schedules, in the order they were added.
    pub fn schedules(&self) -> &[Periodic] {
        &self.schedules
    }

    /// A job of task `name` with `args`, with the task's own queue and
    /// attempts; refused if the task is unknown.
    pub fn new_job(&self, name: &str, args: Value) -> Result<NewJob, InvalidJob> {
        let task =
            self.tasks.get(name).ok_or_else(|| InvalidJob::UnknownTask(name.to_owned(), self.names()))?;
        Ok(NewJob::new(name, args).queue(task.options.queue).max_attempts(task.options.max_attempts))
    }

    /// Everything that can be known about `job` before it is written: its
    /// task is registered, its fields are within limits ([`NewJob::validate`],
    /// `now` being the caller's clock), and its args fit the task.
    pub fn check(&self, job: &NewJob, now: DateTime<Utc>) -> Result<(), InvalidJob> {
        let task = self
            .tasks
            .get(job.task.as_str())
            .ok_or_else(|| InvalidJob::UnknownTask(job.task.clone(), self.names()))?;
        job.validate(now)?;
        (task.check)(&job.args).map_err(|reason| InvalidJob::InvalidArgs { task: job.task.clone(), reason })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Registered> {
        self.tasks.get(name)
    }

    /// The options of task `name`, if registered.
    pub fn options(&self, name: &str) -> Option<TaskOptions> {
        self.tasks.get(name).map(|t| t.options)
    }

    /// The registered names, in order.
    pub fn task_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.tasks.keys().copied()
    }

    /// The registered names, comma-separated, for messages.
    pub fn names(&self) -> String {
        self.task_names().collect::<Vec<_>>().join(", ")
    }

    /// The task's name as a metric label: registered names only, so a job
    /// enqueued with a made-up name cannot add series.
    pub fn label<'a>(&self, name: &'a str) -> &'a str {
        if self.tasks.contains_key(name) {
            name
        } else {
            "unknown"
        }
    }
}

/// Whether `args` fit task `T`: its type, then its own check. A type
/// error names the argument: `seconds: invalid type: string "soon",
/// expected f64`.
pub fn check_args<T: Task>(args: &Value) -> Result<(), String> {
    args_of::<T>(args.clone())?.validate()
}

/// `args` as task `T`'s type.
fn args_of<T: Task>(args: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(args).map_err(|e| match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Serialize, Deserialize)]
    struct Sleep {
        seconds: f64,
    }

    impl Task for Sleep {
        const NAME: &'static str = "sleep";
        const QUEUE: &'static str = "slow";
        type State = ();
        type Output = ();

        fn validate(&self) -> Result<(), String> {
            if (0.0..=60.0).contains(&self.seconds) {
                Ok(())
            } else {
                Err(format!("seconds must be from 0 to 60, got {}", self.seconds))
            }
        }

        async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[derive(Serialize, Deserialize)]
    struct AlsoSleep;

    impl Task for AlsoSleep {
        const NAME: &'static str = "sleep";
        type State = ();
        type Output = ();

        async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[derive(Serialize, Deserialize)]
    struct BadQueue;

    impl Task for BadQueue {
        const NAME: &'static str = "bad_queue";
        const QUEUE: &'static str = "no spaces";
        type State = ();
        type Output = ();

        async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[test]
    fn args_are_checked_by_type_then_by_the_task() {
        let registry = Registry::new().with::<Sleep>(()).expect("registers");
        let now = Utc::now();
        let job = |args| registry.new_job("sleep", args).expect("known");
        assert_eq!(registry.check(&job(json!({"seconds": 1})), now), Ok(()));
        let wrong_type = registry.check(&job(json!({"seconds": "1"})), now).expect_err("a string");
        assert!(
            wrong_type.to_string().contains("seconds: invalid type: string \"1\", expected f64"),
            "{wrong_type}"
        );
        let out_of_range = registry.check(&job(json!({"seconds": 61})), now).expect_err("too long");
        assert!(out_of_range.to_string().contains("from 0 to 60, got 61"), "{out_of_range}");
        assert!(matches!(registry.new_job("nope", json!({})), Err(InvalidJob::UnknownTask(..))));
    }

    #[test]
    fn a_job_gets_its_tasks_queue_and_attempts() {
        let registry = Registry::new().with::<Sleep>(()).expect("registers");
        let job = registry.new_job("sleep", json!({"seconds": 0})).expect("known");
        assert_eq!(job.queue, "slow");
        assert_eq!(job.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(registry.label("sleep"), "sleep");
        assert_eq!(registry.label("made-up"), "unknown");
        assert_eq!(registry.names(), "sleep");
    }

    #[test]
    fn names_are_unique_and_defaults_valid() {
        let err = Registry::new().with::<Sleep>(()).and_then(|r| r.with::<AlsoSleep>(())).err();
        assert_eq!(err, Some(RegistryError::Duplicate("sleep")));
        let err = Registry::new().with::<BadQueue>(()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("bad_queue") && err.contains("\"no spaces\""), "{err}");
    }
}
