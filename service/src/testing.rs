//! Helpers for an application's own tests, against a real database (the
//! author's, by URL), in the spirit of Oban's `perform_job` and River's
//! `rivertest`:
//! - [`perform`] runs one task as a worker would run one attempt of its
//!   job: the arguments validated and taken through JSON (what a job
//!   carries), the task's timeout, its typed output or its error back;
//! - [`drain`] runs every due job of the worker's queues through the real
//!   worker (the queue's own claim, run and record) until none is left,
//!   and says how they ended.
//!
//! ```no_run
//! # use tidepool::task::{Task, TaskContext, TaskError};
//! # #[derive(serde::Serialize, serde::Deserialize)]
//! # struct SendReceipt { order_id: i64 }
//! # impl Task for SendReceipt {
//! #     const NAME: &'static str = "send_receipt";
//! #     type State = ();
//! #     type Output = String;
//! #     async fn run(self, _: TaskContext<()>) -> Result<String, TaskError> { Ok(String::new()) }
//! # }
//! # async fn example(db: tidepool::db::Database, app: tidepool::Application) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tidepool::settings::{DatabaseSettings, WorkerSettings};
//!
//! let receipt = tidepool::testing::perform(&db, (), SendReceipt { order_id: 7 }).await?;
//! assert!(!receipt.is_empty());
//!
//! # let test_database_url = String::new();
//! let settings = WorkerSettings { database: DatabaseSettings::new(test_database_url), ..WorkerSettings::default() };
//! let drained = tidepool::testing::drain(&app, settings, Duration::from_secs(30)).await?;
//! assert_eq!((drained.succeeded, drained.failed), (3, 0));
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use crate::app::Application;
use crate::db::{Database, DbError};
use crate::metrics::{counter_total, WorkerMetrics};
use crate::queue::sql;
use crate::queue::worker::Worker;
use crate::settings::WorkerSettings;
use crate::task::{check_args, JobInfo, Task, TaskContext, TaskError};
use crate::StartError;

/// Pause between two looks at the queues while draining.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Why [`perform`] did not return the task's output.
#[derive(Debug, thiserror::Error)]
pub enum PerformError {
    /// The arguments would be refused at enqueue, or do not survive JSON.
    #[error("task {task}: invalid arguments: {reason}")]
    InvalidArgs {
        /// The task's name.
        task: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The attempt failed.
    #[error("task {task} failed: {error}")]
    Failed {
        /// The task's name.
        task: &'static str,
        /// Its error, as the worker would record it.
        error: TaskError,
    },
    /// The attempt outlived the task's timeout.
    #[error("task {task} did not finish within {}", humantime::format_duration(*.after))]
    TimedOut {
        /// The task's name.
        task: &'static str,
        /// [`Task::TIMEOUT`].
        after: Duration,
    },
}

/// Runs one attempt of `task` with `state` and `db` as its context's
/// pool, as a worker runs a job of it: checked as an enqueue checks it,
/// its arguments through JSON, bounded by [`Task::TIMEOUT`]. The job in
/// its context is attempt 1 of [`Task::MAX_ATTEMPTS`] on [`Task::QUEUE`],
/// with id 0 (no job is written).
pub async fn perform<T: Task>(db: &Database, state: T::State, task: T) -> Result<T::Output, PerformError> {
    let invalid = |reason: String| PerformError::InvalidArgs { task: T::NAME, reason };
    task.validate().map_err(invalid)?;
    let args = serde_json::to_value(&task).map_err(|e| invalid(format!("not JSON: {e}")))?;
    check_args::<T>(&args).map_err(invalid)?;
    let task: T =
        serde_json::from_value(args).map_err(|e| invalid(format!("do not read back from JSON: {e}")))?;
    let job =
        JobInfo { id: 0, attempt: 1, max_attempts: T::MAX_ATTEMPTS, queue: T::QUEUE.to_owned(), stage: None };
    let ctx = TaskContext { job, db: db.clone(), state };
    match tokio::time::timeout(T::TIMEOUT, task.run(ctx)).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(error)) => Err(PerformError::Failed { task: T::NAME, error }),
        Err(_) => Err(PerformError::TimedOut { task: T::NAME, after: T::TIMEOUT }),
    }
}

/// How the jobs a [`drain`] ran ended, in attempts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Attempts that succeeded (their jobs completed).
    pub succeeded: u64,
    /// Attempts that failed or timed out.
    pub failed: u64,
    /// Of those, jobs scheduled for another attempt (not yet due, so not
    /// run again by this drain).
    pub retried: u64,
    /// Of those, jobs that are dead: out of attempts, or failed fatally.
    pub dead: u64,
}

/// Why [`drain`] could not finish.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The settings or the application's tasks were refused.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The queues could not be read.
    #[error("could not read the queues: {0}")]
    Database(#[from] DbError),
    /// Jobs were still due or running after the limit.
    #[error("the queues still had jobs after {}", humantime::format_duration(*.after))]
    TimedOut {
        /// The limit.
        after: Duration,
    },
}

/// Runs `app`'s worker with `settings` (its queues, its database) until
/// none of its queues has a job that is due or running, at most `limit`,
/// and counts how the attempts ended. A job that failed and was scheduled
/// for a later attempt is not waited for. The app's schedules are not
/// enqueued meanwhile (a drain works off what is due).
pub async fn drain<S: Clone + Send + Sync + 'static>(
    app: &Application<S>,
    settings: WorkerSettings,
    limit: Duration,
) -> Result<Drained, DrainError> {
    let settings = settings.normalized().map_err(StartError::from)?;
    let registry = app.tasks_only().map_err(StartError::from)?;
    let pg = settings.database.pg_config()?;
    let metrics = WorkerMetrics::new().map_err(StartError::from)?;
    let (task_db, queue_db) = crate::worker::pools(&settings, pg, &metrics)?;
    let queues = settings.queues.clone();
    let worker = Worker::new(settings, registry.into(), queue_db.clone(), task_db, metrics.clone())
        .map_err(StartError::from)?;

    let (idle_tx, idle_rx) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let _ = idle_tx.send(idle(&queue_db, &queues).await);
    };
    let run = worker.run(shutdown);
    tokio::time::timeout(limit, run).await.map_err(|_| DrainError::TimedOut { after: limit })?;
    match idle_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DrainError::Database(e)),
        Err(_) => return Err(DrainError::TimedOut { after: limit }),
    }
    Ok(Drained {
        succeeded: counter_total(&metrics.jobs_succeeded),
        failed: counter_total(&metrics.jobs_failed),
        retried: counter_total(&metrics.jobs_retried),
        dead: counter_total(&metrics.jobs_dead),
    })
}

/// Resolves once none of `queues` has a job that is due or running.
async fn idle(db: &Database, queues: &[String]) -> Result<(), DbError> {
    loop {
        let conn = db.get().await?;
        let stats = conn.run(Duration::ZERO, sql::queue_stats(conn.client(), queues)).await?;
        drop(conn);
        if stats.iter().all(|q| q.available == 0 && q.running == 0) {
            return Ok(());
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
