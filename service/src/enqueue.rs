//! `tidepool enqueue`: enqueues jobs from the command line and prints their
//! ids, one per line (`ID duplicate` when a pending job holds the unique key),
//! with a summary on standard error.
//!
//! Three paces: batches of `--batch-size` jobs per statement, as fast as the
//! database takes them; one statement per job (`--batch-size 1`); or one job
//! at a time at a steady `--rate`, pipelined on one connection, for latency
//! measurements.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinSet;

use crate::cli::EnqueueArgs;
use crate::db::{self, DbError};
use crate::queue::job::parse_run_at;
use crate::queue::{self, EnqueueError, Enqueued, InvalidJob, NewJob, Schedule};
use crate::settings::{apply_password_file, InvalidUrl, PasswordFileError};
use crate::task::Registry;

/// Longest one statement may take.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most enqueues in flight at once in `--rate` mode.
const MAX_IN_FLIGHT: usize = 1_000;

/// Why `enqueue` stopped.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueCommandError {
    #[error("--args is not valid JSON: {0}")]
    ArgsJson(serde_json::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidJob),
    #[error(transparent)]
    Url(#[from] InvalidUrl),
    #[error(transparent)]
    PasswordFile(#[from] PasswordFileError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
    #[error("the database did not answer within {}", humantime::format_duration(STATEMENT_TIMEOUT))]
    Timeout,
    #[error("could not print the job ids: {0}")]
    Output(#[from] std::io::Error),
    #[error("an enqueue task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What a run enqueued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub created: u64,
    pub duplicates: u64,
    pub elapsed: Duration,
}

/// The job the command line describes, checked against `registry`.
pub fn job_from_args(args: &EnqueueArgs, registry: &Registry) -> Result<NewJob, EnqueueCommandError> {
    let task_args: Value = serde_json::from_str(&args.args).map_err(EnqueueCommandError::ArgsJson)?;
    let schedule = match (&args.run_at, args.delay) {
        (Some(at), _) => Schedule::At(parse_run_at(at)?),
        (None, Some(delay)) => Schedule::After(delay),
        (None, None) => Schedule::Now,
    };
    let mut job = registry.new_job(&args.task, task_args)?.priority(args.priority).schedule(schedule);
    if let Some(queue) = &args.queue {
        job.queue = queue.clone();
    }
    if let Some(attempts) = args.max_attempts {
        job.max_attempts = attempts;
    }
    job.unique_key = args.unique_key.clone();
    registry.check(&job, chrono::Utc::now())?;
    Ok(job)
}

/// Enqueues what `args` says, printing ids to `out` unless `--quiet`.
pub async fn run(
    args: &EnqueueArgs,
    registry: &Registry,
    out: &mut impl Write,
) -> Result<Summary, EnqueueCommandError> {
    let job = job_from_args(args, registry)?;
    let mut target = args.database_url.to_connection("DATABASE_URL")?;
    target.pg = apply_password_file(target.pg, args.password_file.as_deref())?;
    let client = Arc::new(db::connect(target, args.db_connect_timeout).await?);
    let started = Instant::now();
    let mut summary = Summary { created: 0, duplicates: 0, elapsed: Duration::ZERO };
    let mut record = |enqueued: Enqueued, out: &mut dyn Write| -> std::io::Result<()> {
        if enqueued.duplicate {
            summary.duplicates += 1;
        } else {
            summary.created += 1;
        }
        match (args.quiet, enqueued.duplicate) {
            (true, _) => Ok(()),
            (false, false) => writeln!(out, "{}", enqueued.id),
            (false, true) => writeln!(out, "{} duplicate", enqueued.id),
        }
    };

    if let Some(rate) = args.rate {
        let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
        let mut in_flight = JoinSet::new();
        for _ in 0..args.count {
            ticks.tick().await;
            while in_flight.len() >= MAX_IN_FLIGHT {
                if let Some(done) = in_flight.join_next().await {
                    record(flatten(done)?, out)?;
                }
            }
            let (client, job) = (client.clone(), job.clone());
            in_flight.spawn(async move { bounded(queue::enqueue_job(&*client, &job)).await });
        }
        while let Some(done) = in_flight.join_next().await {
            record(flatten(done)?, out)?;
        }
    } else {
        let batch = u64::from(args.batch_size);
        let mut left = args.count;
        while left > 0 {
            let n = left.min(batch);
            left -= n;
            if n == 1 {
                record(bounded(queue::enqueue_job(&*client, &job)).await?, out)?;
            } else {
                let jobs = vec![job.clone(); usize::try_from(n).unwrap_or(usize::MAX)];
                for enqueued in bounded(queue::enqueue_many(&*client, &jobs)).await? {
                    record(enqueued, out)?;
                }
            }
        }
    }
    out.flush()?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

async fn bounded<T>(
    enqueue: impl std::future::Future<Output = Result<T, EnqueueError>>,
) -> Result<T, EnqueueCommandError> {
    Ok(tokio::time::timeout(STATEMENT_TIMEOUT, enqueue).await.map_err(|_| EnqueueCommandError::Timeout)??)
}

fn flatten(
    done: Result<Result<Enqueued, EnqueueCommandError>, tokio::task::JoinError>,
) -> Result<Enqueued, EnqueueCommandError> {
    done?
}
