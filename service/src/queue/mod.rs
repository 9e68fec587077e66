//! The task queue: PostgreSQL is the broker.
//!
//! A job is a row. Producers insert it ([`enqueue`], [`enqueue_many`]) with
//! any tokio-postgres client **or transaction**, so a handler can enqueue in
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
//! ([`retry`]), up to `max_attempts`; then the job is dead, with its
//! errors.
//!
//! The table that is claimed from holds only pending jobs; a job leaves it
//! in the statement that finishes it, for the results table (if its task
//! returned a result) or the dead table. Both are pruned after their
//! retention. So the hot table and its indexes stay the size of the
//! backlog, not of history. The schema is migration 0002; every statement
//! is in [`sql`].
//!
//! Modules: [`job`] (what a job is, validation), [`sql`] (every statement),
//! [`registry`] (tasks by name, built-ins), [`retry`] (backoff), [`worker`]
//! (the runtime).

pub mod job;
pub mod registry;
pub mod retry;
pub mod sql;
pub mod worker;

use tokio_postgres::GenericClient;

pub use job::{Cancelled, Enqueued, InvalidJob, JobState, JobView, NewJob, Schedule};
pub use registry::{Registry, TaskContext, TaskError, TaskOptions, TaskResult};
pub use worker::{ShutdownReport, Worker, WorkerSettings};

/// Most jobs one [`enqueue_many`] call takes.
pub const MAX_BATCH: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    Invalid(#[from] InvalidJob),
    #[error("a batch holds at most {MAX_BATCH} jobs, got {0}")]
    BatchTooLarge(usize),
    #[error("could not enqueue: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("unique key {0:?} kept changing hands; try again")]
    UniqueKeyContended(String),
}

/// Enqueues one job through `client`, a `Client` or a `Transaction`:
/// inside a transaction the job exists only if the transaction commits.
/// With a unique key held by a pending job, returns that job's id with
/// `duplicate` set and inserts nothing.
pub async fn enqueue(client: &impl GenericClient, job: &NewJob) -> Result<Enqueued, EnqueueError> {
    job.validate(chrono::Utc::now())?;
    sql::enqueue(client, job)
        .await?
        .ok_or_else(|| EnqueueError::UniqueKeyContended(job.unique_key.clone().unwrap_or_default()))
}

/// Enqueues up to [`MAX_BATCH`] jobs in one statement (all or none, as any
/// statement), returning their outcomes in order. Every job is validated
/// before anything is written.
pub async fn enqueue_many(
    client: &impl GenericClient,
    jobs: &[NewJob],
) -> Result<Vec<Enqueued>, EnqueueError> {
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
    let outcomes = sql::enqueue_many(client, jobs).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for (job, outcome) in jobs.iter().zip(outcomes) {
        match outcome {
            Some(enqueued) => out.push(enqueued),
            // The key's holder finished meanwhile: this job is new after all.
            None => out.push(enqueue(client, job).await?),
        }
    }
    Ok(out)
}

/// Cancels a job: a pending one at once, a running one at its worker's next
/// heartbeat.
pub async fn cancel(client: &impl GenericClient, id: i64) -> Result<Cancelled, tokio_postgres::Error> {
    sql::cancel(client, id).await
}

/// A job wherever it is: pending, succeeded with a kept result, dead or
/// cancelled. `None` if it never existed, succeeded without a result to
/// keep, or its record was pruned.
pub async fn lookup(client: &impl GenericClient, id: i64) -> Result<Option<JobView>, tokio_postgres::Error> {
    sql::lookup(client, id).await
}
