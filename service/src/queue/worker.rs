//! The worker runtime: claims jobs, runs them on tokio, records outcomes.
//!
//! Four loops share one small, fixed pool of queue connections
//! ([`QUEUE_POOL_SIZE`]), separate from the pool tasks use, so a heartbeat
//! never waits behind a long task:
//!
//! - the **claimer** takes as many permits as are free (at most
//!   `--concurrency` jobs are held at once: running, or finished and waiting
//!   to be recorded), claims that many due jobs in one statement per queue,
//!   and spawns each. It visits its queues round-robin, and passes over a
//!   queue it just found empty while the others keep it busy (backing off
//!   as an idle worker does; `queue/rotation.rs`). Polling is adaptive: straight on after a full batch, a
//!   short pause after a partial one, and an exponentially growing pause (up
//!   to `--poll-interval-max`) while the queues are empty. A [`Worker::waker`]
//!   cuts a pause short (the process wires it to LISTEN when it has a direct
//!   connection).
//! - each **job** runs its task under the task's timeout, and may be told to
//!   stop (cancelled, lease lost, shutdown); a panic is a failed attempt.
//!   Its outcome goes to the recorder through a channel that can never hold
//!   more than `--concurrency` outcomes.
//! - the **recorder** takes every outcome waiting, up to `--batch-size`, and
//!   records them in one statement per kind (complete, fail, hand back).
//!   Only then are the jobs' permits released.
//! - the **heartbeat** renews the leases of every held job; a job missing
//!   from the answer was taken away (stop it), a job flagged
//!   `cancel_requested` is cancelled.
//! - **maintenance** declares the application's rate limits (every 30 s),
//!   fails jobs whose lease expired (their worker died), prunes kept
//!   results, dead jobs and ended workflows past their retention, and
//!   refreshes the per-queue gauges.
//!
//! A queue under a rate limit ([`super::rate_limit`]) is claimed with
//! [`sql::claim_limited`]; when a limit is full, the claimer sleeps until
//! it has room. A batch of outcomes that holds a workflow member's success
//! is recorded with [`sql::complete_members`] ([`super::workflow`]).
//!
//! Shutdown: stop claiming; give running jobs up to `--shutdown-timeout`;
//! then stop the rest and hand them back at once (not after their lease).

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::job::ClaimedJob;
use super::periodic::{declaration_due, Clock, Periodic, SystemClock, FORGET_AFTER};
use super::rate_limit::RateLimit;
use super::rotation::{Rotation, Visit};
use super::scheduler::Scheduler;
use super::sql::{self, Failure, GiveUp, Lease, Settled};
use crate::db::{Database, DbError};
use crate::metrics::WorkerMetrics;
use crate::settings::{InvalidSettings, WorkerSettings};
use crate::task::{JobInfo, Registry, TaskError, TaskFuture};

/// Connections of the worker's own queue pool: claimer, recorder,
/// heartbeat and maintenance, one each. The worker's server connection need
/// is `--concurrency` (tasks) plus this.
pub use tidepool_contract::QUEUE_POOL_SIZE;
/// Rows a rescue or prune statement touches at most; maintenance repeats it
/// up to [`MAINTENANCE_ROUNDS`] times while it finds a full batch.
const MAINTENANCE_BATCH: i64 = 1_000;
const MAINTENANCE_ROUNDS: usize = 100;
/// Attempts to record a batch of outcomes before leaving the jobs to lease
/// expiry (they then run again: at least once).
const RECORD_ATTEMPTS: u32 = 5;
/// Longest pause between claims while they keep failing.
pub const CLAIM_FAILURE_PAUSE_MAX: Duration = Duration::from_secs(5);
/// How long occurrences of periodic tasks are kept in
/// `tidepool_occurrences` (the cursors alone keep each from running twice).
pub const OCCURRENCE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The test hook of a wedged claim loop: while the file this variable
/// names exists, the claim loop stops going round (for the liveness test;
/// never set in production).
pub const WEDGE_HOOK_VAR: &str = "TIDEPOOL_TEST_WEDGE_CLAIM_LOOP";
/// How long shutdown waits for handed-back jobs to be recorded.
const HAND_BACK_DEADLINE: Duration = Duration::from_secs(15);

/// How a worker's shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs still running at the deadline: stopped and given back (or,
    /// when their cancellation had been asked for, cancelled).
    pub handed_back: usize,
}

/// Why a job was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    LeaseLost,
    Shutdown,
}

#[derive(Debug)]
enum OutcomeKind {
    Succeeded(Option<Value>),
    Failed(TaskError),
    TimedOut(Duration),
    Stopped(Stop),
}

/// The outcome labels of `tidepool_job_duration_seconds`, in
/// [`OutcomeKind::index`] order.
const OUTCOME_LABELS: [&str; 6] =
    ["succeeded", "failed", "timeout", "cancelled", "lease_lost", "handed_back"];

impl OutcomeKind {
    fn index(&self) -> usize {
        match self {
            Self::Succeeded(_) => 0,
            Self::Failed(_) => 1,
            Self::TimedOut(_) => 2,
            Self::Stopped(Stop::Cancelled) => 3,
            Self::Stopped(Stop::LeaseLost) => 4,
            Self::Stopped(Stop::Shutdown) => 5,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Succeeded(_) => "succeeded",
            Self::Failed(_) => "failed",
            Self::TimedOut(_) => "timeout",
            Self::Stopped(Stop::Cancelled) => "cancelled",
            Self::Stopped(Stop::LeaseLost) => "lease_lost",
            Self::Stopped(Stop::Shutdown) => "handed_back",
        }
    }
}

/// The series of one task and queue, looked up once (not per job: a
/// label lookup hashes the labels under a lock, and the plain path runs
/// tens of thousands of jobs a second).
struct JobSeries {
    started: prometheus::IntCounter,
    latency: prometheus::Histogram,
    durations: [prometheus::Histogram; 6],
    succeeded: prometheus::IntCounter,
    failed: prometheus::IntCounter,
    retried: prometheus::IntCounter,
    dead: prometheus::IntCounter,
    cancelled: prometheus::IntCounter,
    handed_back: prometheus::IntCounter,
    lease_lost: prometheus::IntCounter,
}

impl JobSeries {
    fn new(metrics: &WorkerMetrics, task: &str, queue: &str) -> Self {
        let labels = [task, queue];
        Self {
            started: metrics.jobs_started.with_label_values(&labels),
            latency: metrics.job_queue_latency.with_label_values(&[queue]),
            durations: OUTCOME_LABELS
                .map(|outcome| metrics.job_duration.with_label_values(&[task, queue, outcome])),
            succeeded: metrics.jobs_succeeded.with_label_values(&labels),
            failed: metrics.jobs_failed.with_label_values(&labels),
            retried: metrics.jobs_retried.with_label_values(&labels),
            dead: metrics.jobs_dead.with_label_values(&labels),
            cancelled: metrics.jobs_cancelled.with_label_values(&labels),
            handed_back: metrics.jobs_handed_back.with_label_values(&labels),
            lease_lost: metrics.jobs_lease_lost.with_label_values(&labels),
        }
    }
}

/// [`JobSeries`] by task label, then queue: registered task names (or
/// "unknown") and the worker's queues, so it stays small.
#[derive(Default)]
struct SeriesCache(Mutex<HashMap<String, HashMap<String, Arc<JobSeries>>>>);

impl SeriesCache {
    fn get(&self, metrics: &WorkerMetrics, task: &str, queue: &str) -> Arc<JobSeries> {
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let by_queue = match cache.get_mut(task) {
            Some(by_queue) => by_queue,
            None => cache.entry(task.to_owned()).or_default(),
        };
        if let Some(series) = by_queue.get(queue) {
            return series.clone();
        }
        let series = Arc::new(JobSeries::new(metrics, task, queue));
        by_queue.insert(queue.to_owned(), series.clone());
        series
    }
}

struct Outcome {
    lease: Lease,
    series: Arc<JobSeries>,
    /// A member of a workflow: its success goes through
    /// [`sql::complete_members`], its output kept whatever the retention.
    member: bool,
    kind: OutcomeKind,
    /// Released once the outcome is recorded.
    permit: OwnedSemaphorePermit,
}

/// A job this worker holds, for the heartbeat and for stopping it.
struct Held {
    attempt: i32,
    stop: Option<oneshot::Sender<Stop>>,
}

type HeldJobs = Mutex<HashMap<i64, Held>>;

fn lock(held: &HeldJobs) -> std::sync::MutexGuard<'_, HashMap<i64, Held>> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A worker, ready to [`Worker::run`].
pub struct Worker {
    shared: Arc<Shared>,
    /// Where its scheduler reads the wall clock.
    clock: Arc<dyn Clock>,
}

impl Worker {
    /// A worker for `settings` (validated here: [`WorkerSettings::validate`];
    /// the queue names trimmed and deduplicated), running `registry`'s tasks.
    /// `queue_db` should have [`QUEUE_POOL_SIZE`] connections; `task_db` is
    /// lent to tasks.
    pub fn new(
        settings: WorkerSettings,
        registry: Arc<Registry>,
        queue_db: Database,
        task_db: Database,
        metrics: WorkerMetrics,
    ) -> Result<Self, InvalidSettings> {
        let settings = settings.normalized()?;
        let schedules = registry.schedules().to_vec();
        let limit_keys = settings.queues.iter().map(|q| registry.rate_limit_keys(q)).collect();
        let rate_limits = registry.rate_limits().map(|(key, limit)| (key.to_owned(), limit)).collect();
        let liveness = Arc::new(Liveness::new(settings.stall_limit()));
        let shared = Shared {
            liveness,
            schedules,
            limit_keys,
            rate_limits,
            permits: Arc::new(Semaphore::new(settings.concurrency as usize)),
            series: SeriesCache::default(),
            held: HeldJobs::default(),
            wake: Arc::new(Notify::new()),
            settings,
            registry,
            queue_db,
            task_db,
            metrics,
        };
        Ok(Self { shared: Arc::new(shared), clock: Arc::new(SystemClock) })
    }

    /// Wakes the claimer from its pause between polls: call it when jobs
    /// were enqueued (a LISTEN notification). Never needed for correctness.
    pub fn waker(&self) -> Arc<Notify> {
        self.shared.wake.clone()
    }

    /// Whether its claim loop still goes round: what `/healthz` answers.
    pub fn liveness(&self) -> Arc<Liveness> {
        self.shared.liveness.clone()
    }

    /// Reads the wall clock from `clock` where its scheduler would read
    /// the system's (tests inject a skewed one; see [`Clock`]). Call it
    /// before [`Worker::run`].
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        Self { clock, ..self }
    }

    /// Runs until `shutdown` resolves, then shuts down as the module says.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> ShutdownReport {
        let shared = self.shared;
        let (outcomes_tx, outcomes_rx) = mpsc::channel(shared.settings.concurrency.max(1) as usize);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (stop_claiming_tx, stop_claiming_rx) = watch::channel(false);

        let recorder = tokio::spawn(record_outcomes(shared.clone(), outcomes_rx));
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), stop_rx.clone()));
        let maintenance = tokio::spawn(maintenance(shared.clone(), stop_rx.clone()));
        let scheduler = Scheduler {
            schedules: shared.schedules.clone(),
            db: shared.queue_db.clone(),
            metrics: shared.metrics.clone(),
            clock: self.clock,
            worker: shared.settings.name.clone(),
            wake: shared.wake.clone(),
        };
        let scheduler = tokio::spawn(scheduler.run(stop_claiming_rx.clone()));
        tracing::info!(
            worker = %shared.settings.name,
            queues = ?shared.settings.queues,
            concurrency = shared.settings.concurrency,
            "worker started"
        );

        let claimer = tokio::spawn(claim_loop(shared.clone(), outcomes_tx, stop_claiming_rx));
        shutdown.await;
        // The claimer stops between statements, never in the middle of a
        // claim (that would leave claimed jobs to their lease).
        let _ = stop_claiming_tx.send(true);
        let _ = claimer.await;
        let _ = scheduler.await;
        shared.liveness.pause();
        // The claimer (and its sender) is gone; only running jobs hold senders now.
        tracing::info!(
            running = shared.settings.concurrency as usize - shared.permits.available_permits(),
            deadline = %humantime::format_duration(shared.settings.shutdown_timeout),
            "stopped claiming; waiting for running jobs"
        );
        let all = shared.settings.concurrency;
        let mut handed_back = 0;
        if tokio::time::timeout(shared.settings.shutdown_timeout, shared.permits.acquire_many(all))
            .await
            .is_err()
        {
            let stops: Vec<oneshot::Sender<Stop>> =
                lock(&shared.held).values_mut().filter_map(|h| h.stop.take()).collect();
            // A job that has just finished no longer listens: it is recorded as it ended.
            handed_back =
                stops.into_iter().map(|stop| stop.send(Stop::Shutdown)).filter(Result::is_ok).count();
            tracing::warn!(jobs = handed_back, "shutdown deadline passed; handing the running jobs back");
            if tokio::time::timeout(HAND_BACK_DEADLINE, shared.permits.acquire_many(all)).await.is_err() {
                tracing::error!(
                    "could not record every hand-back in time; those jobs run again after their lease"
                );
            }
        }
        let _ = stop_tx.send(true);
        let _ = recorder.await;
        let _ = heartbeat.await;
        let _ = maintenance.await;
        for db in [&shared.task_db, &shared.queue_db] {
            if !db.finish_cancels().await {
                tracing::warn!("exiting with a query cancel still in flight");
            }
        }
        tracing::info!(handed_back, "worker stopped");
        ShutdownReport { handed_back }
    }
}

/// Whether a worker's claim loop still goes round, for `/healthz`. Each
/// round counts, a failed claim too; so does waiting for a running job to
/// free a slot, and shutting down. Stalled is anything else that lasts
/// longer than [`WorkerSettings::stall_limit`].
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    limit: Duration,
    /// Milliseconds from `started` to the loop's latest round.
    last_turn: AtomicU64,
    /// The loop is waiting for a slot, or has stopped for shutdown.
    paused: AtomicBool,
}

/// The claim loop has not gone round for `since`, past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the claim loop has not gone round for {} (limit {})", humantime::format_duration(*.since), humantime::format_duration(*.limit))]
pub struct Stalled {
    /// How long since its latest round.
    pub since: Duration,
    /// How long it may take.
    pub limit: Duration,
}

impl Liveness {
    /// A loop that has just gone round, allowed `limit` between rounds.
    pub fn new(limit: Duration) -> Self {
        Self { started: Instant::now(), limit, last_turn: AtomicU64::new(0), paused: AtomicBool::new(false) }
    }

    fn turned(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_turn.store(now, Ordering::Relaxed);
        self.paused.store(false, Ordering::Relaxed);
    }

    fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    /// `Err` when the loop has stalled.
    pub fn check(&self) -> Result<(), Stalled> {
        if self.paused.load(Ordering::Relaxed) {
            return Ok(());
        }
        let last = Duration::from_millis(self.last_turn.load(Ordering::Relaxed));
        let since = self.started.elapsed().saturating_sub(last);
        // In whole milliseconds, as it is kept and read.
        let since = Duration::from_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        if since > self.limit {
            return Err(Stalled { since, limit: self.limit });
        }
        Ok(())
    }
}

struct Shared {
    settings: WorkerSettings,
    liveness: Arc<Liveness>,
    schedules: Vec<Periodic>,
    /// Per queue of `settings.queues`: the keys of the rate limits its
    /// claims are under (none: the plain claim).
    limit_keys: Vec<Vec<String>>,
    /// Every rate limit of the registry, by key, to declare.
    rate_limits: Vec<(String, RateLimit)>,
    registry: Arc<Registry>,
    queue_db: Database,
    task_db: Database,
    metrics: WorkerMetrics,
    /// One per job held; `--concurrency` in all.
    permits: Arc<Semaphore>,
    series: SeriesCache,
    held: HeldJobs,
    wake: Arc<Notify>,
}

async fn claim_loop(shared: Arc<Shared>, outcomes: mpsc::Sender<Outcome>, mut stop: watch::Receiver<bool>) {
    let settings = &shared.settings;
    let mut idle_pause = settings.poll_interval_min;
    let mut rotation =
        Rotation::new(settings.queues.len(), settings.poll_interval_min, settings.poll_interval_max);
    let mut visits = Vec::with_capacity(settings.queues.len());
    let wedge = std::env::var_os(WEDGE_HOOK_VAR).map(std::path::PathBuf::from);
    while !*stop.borrow_and_update() {
        shared.liveness.turned();
        shared.metrics.claim_loop_turns.inc();
        if wedge.as_deref().is_some_and(std::path::Path::exists) {
            tracing::warn!("the claim loop is wedged by the test hook {WEDGE_HOOK_VAR}");
            let _ = stop.changed().await;
            return;
        }
        // Waiting for a job to finish is not a stall, however long it runs.
        shared.liveness.pause();
        let first = tokio::select! {
            permit = shared.permits.clone().acquire_owned() => permit,
            _ = stop.changed() => return,
        };
        shared.liveness.turned();
        let Ok(first) = first else {
            return;
        };
        let mut permits = vec![first];
        while permits.len() < settings.batch_size as usize {
            match shared.permits.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let wanted = permits.len();
        let mut claimed = 0;
        let mut failed = false;
        if woken_now(&shared.wake) {
            rotation.woken();
        }
        rotation.plan(Instant::now(), &mut visits);
        for &index in &visits {
            if permits.is_empty() {
                break;
            }
            let queue = &settings.queues[index];
            let limit = i64::try_from(permits.len()).unwrap_or(i64::MAX);
            let keys = &shared.limit_keys[index];
            let claim = if keys.is_empty() {
                queue_op!(shared.queue_db, |client| sql::claim(
                    client,
                    queue,
                    limit,
                    &settings.name,
                    settings.lease
                ))
                .await
                .map(|jobs| (jobs, None))
            } else {
                queue_op!(shared.queue_db, |client| sql::claim_limited(
                    client,
                    queue,
                    limit,
                    &settings.name,
                    settings.lease,
                    keys
                ))
                .await
                .map(|claim| (claim.jobs, claim.full_for))
            };
            match claim {
                Ok((jobs, full_for)) => {
                    let visit = match full_for {
                        _ if jobs.len() >= permits.len() => Visit::Full,
                        Some(frees) => Visit::Limited(frees),
                        None => Visit::Short,
                    };
                    rotation.visited(index, visit, Instant::now());
                    claimed += jobs.len();
                    for job in jobs {
                        let Some(permit) = permits.pop() else { break };
                        start_job(&shared, job, permit, outcomes.clone());
                    }
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(error = %crate::error_chain(&e), queue, "claim failed");
                }
            }
        }
        drop(permits);
        // The soonest a full rate limit has room again.
        let limit_frees = rotation.soonest_limit_room(Instant::now());
        let pause = if claimed == wanted {
            idle_pause = settings.poll_interval_min;
            continue;
        } else if let Some(frees) = limit_frees.filter(|_| !failed) {
            // Jobs wait for a rate limit: look again when it has room, not
            // after a poll interval that keeps growing.
            idle_pause = settings.poll_interval_min;
            frees.clamp(Duration::from_millis(1), settings.poll_interval_max)
        } else if claimed > 0 {
            idle_pause = settings.poll_interval_min;
            settings.poll_interval_min
        } else {
            let pause = idle_pause;
            idle_pause = if failed {
                // The database is unreachable: back off further, up to a few seconds.
                (idle_pause * 2).clamp(
                    settings.poll_interval_max,
                    CLAIM_FAILURE_PAUSE_MAX.max(settings.poll_interval_max),
                )
            } else {
                (idle_pause * 2).min(settings.poll_interval_max)
            };
            pause
        };
        rotation.paused();
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shared.wake.notified() => {
                idle_pause = settings.poll_interval_min;
                rotation.woken();
            }
            _ = stop.changed() => return,
        }
    }
}

/// Takes a wake that came while the claimer was busy, if one did.
fn woken_now(wake: &Notify) -> bool {
    use futures_util::FutureExt;
    wake.notified().now_or_never().is_some()
}

fn start_job(
    shared: &Arc<Shared>,
    job: ClaimedJob,
    permit: OwnedSemaphorePermit,
    outcomes: mpsc::Sender<Outcome>,
) {
    let lease = Lease { id: job.id, attempt: job.attempt };
    let series = shared.series.get(&shared.metrics, shared.registry.label(&job.task), &job.queue);
    series.started.inc();
    series.latency.observe(job.latency_seconds);
    shared.metrics.jobs_running.inc();
    let (stop_tx, stop_rx) = oneshot::channel();
    lock(&shared.held).insert(job.id, Held { attempt: job.attempt, stop: Some(stop_tx) });
    tracing::debug!(job = job.id, attempt = job.attempt, task = %job.task, "job started");

    let task = shared.registry.get(&job.task).cloned();
    let info = JobInfo {
        id: job.id,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        queue: job.queue.clone(),
        stage: job.group_id,
    };
    let member = job.group_id.is_some();
    let shared = shared.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let kind = match task {
            None => OutcomeKind::Failed(TaskError::retry(format!(
                "this worker has no task {:?} (known: {})",
                job.task,
                shared.registry.names()
            ))),
            Some(task) => {
                let timeout = task.options.timeout;
                let attempt = CatchUnwind(task.start(info, shared.task_db.clone(), job.args));
                tokio::select! {
                    outcome = tokio::time::timeout(timeout, attempt) => match outcome {
                        Ok(Ok(Ok(result))) => OutcomeKind::Succeeded(result),
                        Ok(Ok(Err(e))) => OutcomeKind::Failed(e),
                        Ok(Err(panic)) => OutcomeKind::Failed(TaskError::retry(format!("task panicked: {}", panic_message(&*panic)))),
                        Err(_) => OutcomeKind::TimedOut(timeout),
                    },
                    stop = stop_rx => OutcomeKind::Stopped(stop.unwrap_or(Stop::Shutdown)),
                }
            }
        };
        series.durations[kind.index()].observe(started.elapsed().as_secs_f64());
        tracing::debug!(job = job.id, attempt = job.attempt, outcome = kind.label(), "job ended");
        let outcome = Outcome { lease, series, member, kind, permit };
        // The recorder outlives every job (it stops when all senders are gone).
        let _ = outcomes.send(outcome).await;
    });
}

/// Turns a panic inside a task's future into an error: a failed attempt,
/// not a lost job. The future is boxed, hence `Unpin`.
struct CatchUnwind(TaskFuture);

impl Future for CatchUnwind {
    type Output = Result<<TaskFuture as Future>::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

async fn record_outcomes(shared: Arc<Shared>, mut outcomes: mpsc::Receiver<Outcome>) {
    let batch_size = shared.settings.batch_size as usize;
    let mut batch = Vec::with_capacity(batch_size);
    while outcomes.recv_many(&mut batch, batch_size).await > 0 {
        record(&shared, &batch).await;
        let mut permits: Option<OwnedSemaphorePermit> = None;
        {
            let mut held = lock(&shared.held);
            for outcome in batch.drain(..) {
                if held.get(&outcome.lease.id).is_some_and(|h| h.attempt == outcome.lease.attempt) {
                    held.remove(&outcome.lease.id);
                }
                match &mut permits {
                    Some(all) => all.merge(outcome.permit),
                    None => permits = Some(outcome.permit),
                }
            }
        }
        // Released together, so the claimer sees the whole batch free at once
        // and claims it in one statement rather than a few at a time.
        shared.metrics.jobs_running.sub(permits.as_ref().map_or(0, |p| p.num_permits() as i64));
        drop(permits);
    }
}

/// Records one batch of outcomes, one statement per kind.
async fn record(shared: &Shared, batch: &[Outcome]) {
    let keep_results = !shared.settings.result_retention.is_zero();
    let series: HashMap<i64, &JobSeries> = batch.iter().map(|o| (o.lease.id, &*o.series)).collect();
    let count = |counter: fn(&JobSeries) -> &prometheus::IntCounter, id: i64| {
        if let Some(series) = series.get(&id) {
            counter(series).inc();
        }
    };

    let mut done = Vec::new();
    let mut members_done = false;
    let mut failures = Vec::new();
    let mut hand_back = Vec::new();
    for outcome in batch {
        let lease = outcome.lease;
        match &outcome.kind {
            OutcomeKind::Succeeded(result) => {
                members_done |= outcome.member;
                done.push((lease, if keep_results || outcome.member { result.clone() } else { None }));
            }
            OutcomeKind::Failed(e) => {
                count(|s| &s.failed, lease.id);
                let give_up = matches!(e, TaskError::Fatal(_)).then_some(GiveUp::Dead);
                failures.push(failure(shared, lease, e.to_string(), give_up));
            }
            OutcomeKind::TimedOut(after) => {
                count(|s| &s.failed, lease.id);
                let error = format!("timed out after {}", humantime::format_duration(*after));
                failures.push(failure(shared, lease, error, None));
            }
            OutcomeKind::Stopped(Stop::Cancelled) => {
                count(|s| &s.cancelled, lease.id);
                let error = "cancelled while running".to_owned();
                failures.push(failure(shared, lease, error, Some(GiveUp::Cancelled)));
            }
            OutcomeKind::Stopped(Stop::Shutdown) => hand_back.push(lease),
            OutcomeKind::Stopped(Stop::LeaseLost) => count(|s| &s.lease_lost, lease.id),
        }
    }

    if !done.is_empty() {
        if let Some(finished) = with_retries("record succeeded jobs", || async {
            if members_done {
                let (finished, started) =
                    queue_op!(shared.queue_db, |client| sql::complete_members(client, &done, keep_results))
                        .await?;
                if started > 0 {
                    // A next stage's jobs (a callback): this worker may claim
                    // them at once rather than at its next poll.
                    shared.wake.notify_one();
                }
                Ok(finished)
            } else {
                queue_op!(shared.queue_db, |client| sql::complete(client, &done)).await
            }
        })
        .await
        {
            for id in finished {
                count(|s| &s.succeeded, id);
            }
        }
    }
    if !failures.is_empty() {
        if let Some(settled) = with_retries("record failed jobs", || {
            queue_op!(shared.queue_db, |client| sql::fail(client, &failures))
        })
        .await
        {
            for (id, how) in settled {
                match how {
                    Settled::Retried => count(|s| &s.retried, id),
                    Settled::Dead => count(|s| &s.dead, id),
                    Settled::Cancelled => {}
                }
            }
        }
    }
    if !hand_back.is_empty() {
        if let Some(ids) = with_retries("hand jobs back", || {
            queue_op!(shared.queue_db, |client| sql::hand_back(client, &hand_back))
        })
        .await
        {
            for id in ids {
                count(|s| &s.handed_back, id);
            }
        }
    }
}

fn failure(shared: &Shared, lease: Lease, error: String, give_up: Option<GiveUp>) -> Failure {
    let retry_in = shared.settings.retry.delay(lease.attempt, rand::random::<f64>());
    Failure { lease, error, retry_in, give_up }
}

/// Runs a recording statement, retrying a few times with a growing pause.
/// After that the jobs stay as they are in the database and run again once
/// their lease expires.
async fn with_retries<T, F, Fut>(what: &'static str, op: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=RECORD_ATTEMPTS {
        match op().await {
            Ok(value) => return Some(value),
            Err(e) if attempt == RECORD_ATTEMPTS => {
                tracing::error!(error = %crate::error_chain(&e), what, "giving up; the jobs run again after their lease expires");
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), what, attempt, "retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
    None
}

async fn heartbeat(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(shared.settings.heartbeat_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let leases: Vec<Lease> =
            lock(&shared.held).iter().map(|(&id, h)| Lease { id, attempt: h.attempt }).collect();
        for chunk in leases.chunks((shared.settings.batch_size as usize).max(1)) {
            let renewed = match queue_op!(shared.queue_db, |client| sql::heartbeat(
                client,
                chunk,
                shared.settings.lease
            ))
            .await
            {
                Ok(renewed) => renewed,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), jobs = chunk.len(), "heartbeat failed");
                    continue;
                }
            };
            let mut held = lock(&shared.held);
            for lease in chunk {
                let stop = match renewed.get(&lease.id) {
                    None => Stop::LeaseLost,
                    Some(true) => Stop::Cancelled,
                    Some(false) => continue,
                };
                if let Some(sender) = held.get_mut(&lease.id).and_then(|h| h.stop.take()) {
                    tracing::info!(job = lease.id, attempt = lease.attempt, reason = ?stop, "stopping a running job");
                    let _ = sender.send(stop);
                }
            }
        }
    }
}

async fn maintenance(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(shared.settings.maintenance_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limits_declared = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = maintain(&shared, &mut limits_declared).await {
            tracing::warn!(error = %crate::error_chain(&e), "maintenance failed; trying again next round");
        }
    }
}

/// One round of maintenance: declare the rate limits (when
/// `limits_declared` is [`DECLARE_EVERY`](super::periodic::DECLARE_EVERY)
/// old), rescue, prune, refresh the queue gauges.
async fn maintain(shared: &Shared, limits_declared: &mut Option<Instant>) -> Result<(), DbError> {
    // First, so that a new worker's limited claims find their rows at once.
    if !shared.rate_limits.is_empty() && declaration_due(*limits_declared) {
        queue_op!(shared.queue_db, |client| sql::declare_rate_limits(
            client,
            &shared.rate_limits,
            FORGET_AFTER
        ))
        .await?;
        *limits_declared = Some(Instant::now());
    }
    for _ in 0..MAINTENANCE_ROUNDS {
        let rescued = queue_op!(shared.queue_db, |client| sql::rescue(client, MAINTENANCE_BATCH)).await?;
        for (id, how) in &rescued {
            let outcome = match how {
                Settled::Retried => "retried",
                Settled::Dead => "dead",
                Settled::Cancelled => "cancelled",
            };
            tracing::warn!(job = id, outcome, "rescued a job whose lease expired");
            shared.metrics.jobs_rescued.with_label_values(&[outcome]).inc();
        }
        if (rescued.len() as i64) < MAINTENANCE_BATCH {
            break;
        }
    }
    let settings = &shared.settings;
    for _ in 0..MAINTENANCE_ROUNDS {
        let (results, dead) = queue_op!(shared.queue_db, |client| sql::prune(
            client,
            settings.result_retention,
            settings.dead_retention,
            MAINTENANCE_BATCH
        ))
        .await?;
        if results > 0 || dead > 0 {
            tracing::debug!(results, dead, "pruned finished jobs past their retention");
        }
        if results < MAINTENANCE_BATCH && dead < MAINTENANCE_BATCH {
            break;
        }
    }
    for _ in 0..MAINTENANCE_ROUNDS {
        let workflows = queue_op!(shared.queue_db, |client| sql::prune_workflows(
            client,
            settings.result_retention,
            settings.dead_retention,
            MAINTENANCE_BATCH
        ))
        .await?;
        if workflows < MAINTENANCE_BATCH {
            break;
        }
    }
    let (forgotten, _) = queue_op!(shared.queue_db, |client| sql::forget_schedules(
        client,
        FORGET_AFTER,
        OCCURRENCE_RETENTION,
        MAINTENANCE_BATCH
    ))
    .await?;
    if forgotten > 0 {
        tracing::info!(
            forgotten,
            "forgot schedules that no worker has declared for {}",
            humantime::format_duration(FORGET_AFTER)
        );
    }
    let stats = queue_op!(shared.queue_db, |client| sql::queue_stats(client, &settings.queues)).await?;
    for queue in stats {
        shared.metrics.queue_available.with_label_values(&[&queue.queue]).set(queue.available);
        shared.metrics.queue_oldest_age.with_label_values(&[&queue.queue]).set(queue.oldest_available_age);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_own_duration_series() {
        let kinds = [
            OutcomeKind::Succeeded(None),
            OutcomeKind::Failed(TaskError::retry("x")),
            OutcomeKind::TimedOut(Duration::from_secs(1)),
            OutcomeKind::Stopped(Stop::Cancelled),
            OutcomeKind::Stopped(Stop::LeaseLost),
            OutcomeKind::Stopped(Stop::Shutdown),
        ];
        for kind in &kinds {
            assert_eq!(OUTCOME_LABELS[kind.index()], kind.label());
        }
        let indexes: std::collections::HashSet<usize> = kinds.iter().map(OutcomeKind::index).collect();
        assert_eq!(indexes.len(), OUTCOME_LABELS.len());
    }

    #[test]
    fn series_are_looked_up_once_per_task_and_queue() -> Result<(), prometheus::Error> {
        let metrics = WorkerMetrics::new()?;
        let cache = SeriesCache::default();
        let a = cache.get(&metrics, "noop", "default");
        a.started.inc();
        assert!(Arc::ptr_eq(&a, &cache.get(&metrics, "noop", "default")));
        assert!(!Arc::ptr_eq(&a, &cache.get(&metrics, "noop", "other")));
        assert_eq!(metrics.jobs_started.with_label_values(&["noop", "default"]).get(), 1);
        Ok(())
    }
}
