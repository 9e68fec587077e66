//! The task queue: PostgreSQL is the broker.
//!
//! A job is a row. Producers insert it ([`enqueue`] a typed task,
//! [`enqueue_job`] by name, [`enqueue_many`]) through a pooled connection
//! **or a transaction**, so a handler can enqueue in
//! the same transaction as its own write: if the write rolls back, the job
//! was never sent (what a separate broker cannot promise). Workers
//! ([`worker`]) claim due jobs in batches with one statement
//! (`FOR UPDATE SKIP LOCKED` in a CTE: concurrent claimers skip each
//! other's rows instead of queueing on them), run them, and record the
//! outcomes in batches. No transaction stays open while a job runs, so the
//! whole protocol works through PgBouncer in transaction mode.
//!
//! Delivery is at least once. A claimed job carries a lease that its worker
//! renews by heartbeat; when a worker dies (kill -9, lost node) its leases
//! run out and maintenance on any other worker makes the jobs available
//! again. The attempt number fences a lease: a stalled worker that comes
//! back cannot finish an attempt that has been given to someone else.
//! Failed attempts are retried after an exponential backoff with jitter
//! ([`RetryPolicy`]), up to `max_attempts`; then the job is dead, with its
//! errors.
//!
//! The table that is claimed from holds only pending jobs; a job leaves it
//! in the statement that finishes it, for the results table (if its task
//! returned a result) or the dead table. Both are pruned after their
//! retention. So the hot table and its indexes stay the size of the
//! backlog, not of history. The schema is the `tidepool` migration track;
//! every statement is in [`sql`].
//!
//! Beyond single jobs: global rate limits ([`rate_limit`]) decided in the
//! claim, and workflows ([`workflow`]: chains, groups, chords) decided in
//! the statement that finishes a member.
//!
//! Modules: [`job`] (what a job is, validation), [`sql`] (every statement;
//! public for the operator's queue scaler, [`sql::queue_stats`], and the
//! benchmark's bare loop, not for applications), [`worker`] (the runtime).
//! Tasks, what jobs run, are [`crate::task`]'s.

/// Runs one of [`sql`]'s statements on a connection of `db` (a worker's
/// queue pool), bounded by its query timeout:
/// `queue_op!(db, |client| sql::claim(client, ..))`.
macro_rules! queue_op {
    ($db:expr, |$client:ident| $statement:expr) => {
        async {
            let conn: crate::db::Conn = $db.get().await?;
            let $client = conn.client();
            conn.run(std::time::Duration::ZERO, $statement).await
        }
    };
}

pub mod cron;
pub mod job;
pub mod periodic;
pub mod rate_limit;
pub(crate) mod retry;
mod rotation;
mod scheduler;
pub mod sql;
pub mod worker;
pub mod workflow;

use std::time::Duration;

use crate::db::{DbError, Executor};
use crate::task::Task;

pub use job::{Cancelled, Enqueued, InvalidJob, JobState, JobView, NewJob, Schedule};
pub use retry::RetryPolicy;
pub use worker::{ShutdownReport, Worker};
pub use workflow::{EnqueuedWorkflow, InvalidWorkflow, Workflow, WorkflowView};

/// Most jobs one [`enqueue_many`] call takes.
pub const MAX_BATCH: usize = 10_000;

/// Why nothing was enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The job is out of bounds, or its args do not fit its task.
    #[error(transparent)]
    Invalid(#[from] InvalidJob),
    /// The workflow's shape is out of bounds.
    #[error(transparent)]
    Workflow(#[from] InvalidWorkflow),
    /// More than [`MAX_BATCH`] jobs at once.
    #[error("a batch holds at most {MAX_BATCH} jobs, got {0}")]
    BatchTooLarge(usize),
    /// The statement failed or timed out.
    #[error("could not enqueue: {0}")]
    Database(#[from] DbError),
    /// The unique key's holders kept finishing between the conflict and
    /// the lookup.
    #[error("unique key {0:?} kept changing hands; try again")]
    UniqueKeyContended(String),
}

/// How a typed job is enqueued beyond its arguments. Each field left
/// `None` takes the task's own default ([`Task::QUEUE`],
/// [`Task::MAX_ATTEMPTS`]).
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// Another queue than the task's.
    pub queue: Option<String>,
    /// Higher runs first; 0 by default.
    pub priority: i16,
    /// When it becomes available; at once by default.
    pub schedule: Schedule,
    /// While a job with this key is pending, enqueuing another with the
    /// same key returns the pending job's id instead.
    pub unique_key: Option<String>,
    /// Other attempts than the task's.
    pub max_attempts: Option<i32>,
}

impl EnqueueOptions {
    /// Run no earlier than `delay` from now (by the database's clock).
    pub fn delay(delay: Duration) -> Self {
        Self { schedule: Schedule::After(delay), ..Self::default() }
    }
}

/// The job that enqueuing `task` with `options` would write, checked:
/// its fields within limits and its args passing [`Task::validate`].
pub fn typed_job<T: Task>(task: &T, options: EnqueueOptions) -> Result<NewJob, EnqueueError> {
    task.validate().map_err(|reason| InvalidJob::InvalidArgs { task: T::NAME.to_owned(), reason })?;
    let args = serde_json::to_value(task)
        .map_err(|e| InvalidJob::InvalidArgs { task: T::NAME.to_owned(), reason: e.to_string() })?;
    let job = NewJob {
        task: T::NAME.to_owned(),
        args,
        queue: options.queue.unwrap_or_else(|| T::QUEUE.to_owned()),
        priority: options.priority,
        schedule: options.schedule,
        unique_key: options.unique_key,
        max_attempts: options.max_attempts.unwrap_or(T::MAX_ATTEMPTS),
    };
    job.validate(chrono::Utc::now())?;
    Ok(job)
}

/// Enqueues `task` through `db`: a [`crate::db::Conn`], a
/// [`crate::db::Tx`] (then the job exists only if the transaction
/// commits) or a plain tokio-postgres client. With a unique key held by a
/// pending job, returns that job's id with `duplicate` set and inserts
/// nothing.
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # use tidepool::task::{Task, TaskContext, TaskError};
/// # #[derive(Serialize, Deserialize)] struct SendReceipt { order_id: i64 }
/// # impl Task for SendReceipt {
/// #     const NAME: &'static str = "send_receipt";
/// #     type State = (); type Output = ();
/// #     async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> { Ok(()) }
/// # }
/// # async fn example(mut conn: tidepool::db::Conn) -> Result<(), Box<dyn std::error::Error>> {
/// use tidepool::db::Type;
/// use tidepool::queue::{self, EnqueueOptions};
///
/// let tx = conn.transaction().await?;
/// let row = tx.query_one("INSERT INTO orders (total) VALUES ($1) RETURNING id", &[(&25_i64, Type::INT8)]).await?;
/// queue::enqueue(&tx, &SendReceipt { order_id: row.get(0) }, EnqueueOptions::default()).await?;
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
pub async fn enqueue<T: Task>(
    db: &impl Executor,
    task: &T,
    options: EnqueueOptions,
) -> Result<Enqueued, EnqueueError> {
    let job = typed_job(task, options)?;
    enqueue_job(db, &job).await
}

/// Enqueues one job given by name and JSON args (the untyped path of
/// `POST /tasks/` and `enqueue`; check it against the application's
/// tasks first with [`crate::task::Registry::check`]).
pub async fn enqueue_job(db: &impl Executor, job: &NewJob) -> Result<Enqueued, EnqueueError> {
    job.validate(chrono::Utc::now())?;
    db.bounded(Box::pin(sql::enqueue(db, job)))
        .await?
        .ok_or_else(|| EnqueueError::UniqueKeyContended(job.unique_key.clone().unwrap_or_default()))
}

/// Enqueues up to [`MAX_BATCH`] jobs in one statement (all or none, as any
/// statement), returning their outcomes in order. Every job is validated
/// before anything is written.
pub async fn enqueue_many(db: &impl Executor, jobs: &[NewJob]) -> Result<Vec<Enqueued>, EnqueueError> {
    if jobs.len() > MAX_BATCH {
        return Err(EnqueueError::BatchTooLarge(jobs.len()));
    }
    let now = chrono::Utc::now();
    for job in jobs {
        job.validate(now)?;
    }
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let outcomes = db.bounded(Box::pin(sql::enqueue_many(db, jobs))).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for (job, outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Some(enqueued) => out.push(enqueued),
            // The key's holder finished meanwhile: this job is new after all.
            None => out.push(enqueue_job(db, job).await?),
        }
    }
    Ok(out)
}

/// Enqueues a workflow ([`workflow`]: a chain, a group, a chord) in one
/// statement: its stages, and its first stage's jobs. Every job is
/// validated first; check jobs given by name against the application's
/// tasks with [`crate::task::Registry::check`].
pub async fn enqueue_workflow(
    db: &impl Executor,
    workflow: &Workflow,
) -> Result<EnqueuedWorkflow, EnqueueError> {
    workflow.validate(chrono::Utc::now())?;
    let (id, jobs) = db.bounded(Box::pin(sql::enqueue_workflow(db, workflow))).await?;
    Ok(EnqueuedWorkflow { id, jobs })
}

/// A workflow and its stages; `None` if it never existed or its record was
/// pruned (after the workers' result retention once it succeeded, their
/// dead retention once it failed).
pub async fn lookup_workflow(db: &impl Executor, id: i64) -> Result<Option<WorkflowView>, DbError> {
    db.bounded(Box::pin(sql::lookup_workflow(db, id))).await
}

/// Cancels a job: a pending one at once, a running one at its worker's next
/// heartbeat.
pub async fn cancel(db: &impl Executor, id: i64) -> Result<Cancelled, DbError> {
    db.bounded(Box::pin(sql::cancel(db, id))).await
}

/// A job wherever it is: pending, succeeded with a kept result, dead or
/// cancelled. `None` if it never existed, succeeded without a result to
/// keep, or its record was pruned.
pub async fn lookup(db: &impl Executor, id: i64) -> Result<Option<JobView>, DbError> {
    db.bounded(Box::pin(sql::lookup(db, id))).await
}
