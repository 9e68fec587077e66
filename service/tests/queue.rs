//! The task queue as a library: enqueue, claim, retry, lease, cancel and
//! prune against a real PostgreSQL through a real PgBouncer in transaction
//! mode. Workers run in this process (the runtime of `tidepool worker`),
//! with tasks of the tests' own that record what they did.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use support::queue::{harness, settings};
use support::wait_for;
use tidepool::metrics::WorkerMetrics;
use tidepool::queue::sql::{self, Lease};
use tidepool::queue::{
    self, Cancelled, Enqueued, JobState, JobView, NewJob, RetryPolicy, Schedule, ShutdownReport,
};
use tidepool::settings::{DatabaseSettings, WorkerSettings};
use tidepool::task::{Registry, Task, TaskContext, TaskError};

/// Does nothing.
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

/// `SELECT pg_sleep(seconds)` on the task pool, as the demo's task does.
#[derive(Serialize, Deserialize)]
struct SlowQuery {
    seconds: f64,
}

impl Task for SlowQuery {
    const NAME: &'static str = "slow_query";
    type State = ();
    type Output = Value;

    async fn run(self, ctx: TaskContext<()>) -> Result<Value, TaskError> {
        let conn = ctx.db.get().await?;
        let expected = Duration::from_secs_f64(self.seconds);
        conn.query_slow("SELECT pg_sleep($1)", &[(&self.seconds, tidepool::db::Type::FLOAT8)], expected)
            .await?;
        Ok(json!({ "slept": self.seconds }))
    }
}

/// `noop` and `slow_query`.
fn builtins() -> Result<Registry> {
    Ok(Registry::new().with::<Noop>(())?.with::<SlowQuery>(())?)
}

fn error_times(view: &JobView) -> Result<Vec<DateTime<Utc>>> {
    let errors = view.errors.as_array().context("errors is an array")?;
    errors
        .iter()
        .map(|e| {
            let at = e["at"].as_str().context("error has an `at`")?;
            Ok(DateTime::parse_from_rfc3339(at)?.to_utc())
        })
        .collect()
}

#[tokio::test]
async fn enqueue_in_a_transaction_commits_or_rolls_back_with_it() -> Result<()> {
    let h = harness(4).await?;
    // Through PgBouncer in transaction mode: one server connection for the
    // whole transaction.
    let mut client = support::connect(&h.bouncer.url()).await?;
    client.batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY)").await?;

    let tx = client.transaction().await?;
    tx.execute_typed("INSERT INTO orders VALUES (1)", &[]).await?;
    let rolled_back = queue::enqueue_job(&tx, &NewJob::new("noop", json!({"order": 1}))).await?;
    tx.rollback().await?;

    let tx = client.transaction().await?;
    tx.execute_typed("INSERT INTO orders VALUES (2)", &[]).await?;
    let committed = queue::enqueue_job(&tx, &NewJob::new("noop", json!({"order": 2}))).await?;
    tx.commit().await?;

    assert_eq!(
        h.view(rolled_back.id).await?,
        None,
        "a job enqueued in a rolled-back transaction must not exist"
    );
    let view = h.view(committed.id).await?.context("the committed job exists")?;
    assert_eq!(view.args, json!({"order": 2}));
    assert_eq!(view.state, JobState::Available);
    let count: i64 = h.client.query_typed_one("SELECT count(*) FROM tidepool_jobs", &[]).await?.get(0);
    assert_eq!(count, 1);
    Ok(())
}

#[tokio::test]
async fn batch_enqueue_keeps_input_order_and_unique_keys() -> Result<()> {
    let h = harness(4).await?;
    let jobs: Vec<NewJob> = (0..1000).map(|i| NewJob::new("noop", json!({ "i": i }))).collect();
    let out = queue::enqueue_many(&h.client, &jobs).await?;
    assert_eq!(out.len(), 1000);
    assert!(out.windows(2).all(|w| w[0].id < w[1].id), "ids follow input order");
    for i in [0usize, 1, 499, 999] {
        let view = h.view(out[i].id).await?.context("enqueued job exists")?;
        assert_eq!(view.args, json!({ "i": i }));
    }

    let pending = h.enqueue(NewJob::new("noop", json!({})).unique_key("a")).await?;
    let mixed = vec![
        NewJob::new("noop", json!({"n": 1})).unique_key("a"),
        NewJob::new("noop", json!({"n": 2})).unique_key("b"),
        NewJob::new("noop", json!({"n": 3})),
        NewJob::new("noop", json!({"n": 4})).unique_key("b"),
    ];
    let out = queue::enqueue_many(&h.client, &mixed).await?;
    assert_eq!(out[0], Enqueued { id: pending, duplicate: true });
    assert!(!out[1].duplicate && !out[2].duplicate);
    assert_eq!(out[3], Enqueued { id: out[1].id, duplicate: true });
    assert_eq!(h.view(out[1].id).await?.map(|v| v.args), Some(json!({"n": 2})));
    assert_eq!(h.view(out[2].id).await?.map(|v| v.args), Some(json!({"n": 3})));

    let too_many = vec![NewJob::new("noop", json!({})); queue::MAX_BATCH + 1];
    assert!(queue::enqueue_many(&h.client, &too_many).await.is_err());
    let one_bad = vec![NewJob::new("noop", json!({})), NewJob::new("noop", json!({})).queue("bad queue")];
    let before: i64 = h.client.query_typed_one("SELECT count(*) FROM tidepool_jobs", &[]).await?.get(0);
    assert!(queue::enqueue_many(&h.client, &one_bad).await.is_err());
    let after: i64 = h.client.query_typed_one("SELECT count(*) FROM tidepool_jobs", &[]).await?.get(0);
    assert_eq!(before, after, "a batch with one invalid job writes nothing");
    Ok(())
}

#[tokio::test]
async fn unique_keys_hold_only_while_the_job_is_pending() -> Result<()> {
    let h = harness(8).await?;
    let first =
        queue::enqueue_job(&h.client, &NewJob::new("noop", json!({})).unique_key("report-42")).await?;
    let second =
        queue::enqueue_job(&h.client, &NewJob::new("noop", json!({})).unique_key("report-42")).await?;
    assert!(!first.duplicate);
    assert_eq!(second, Enqueued { id: first.id, duplicate: true });

    let worker = h.start_worker(builtins()?, settings("w"))?;
    h.wait_gone(first.id, Duration::from_secs(10)).await?;
    let third =
        queue::enqueue_job(&h.client, &NewJob::new("noop", json!({})).unique_key("report-42")).await?;
    assert!(!third.duplicate, "the key is free once its job finished");
    assert_ne!(third.id, first.id);
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn claims_take_due_jobs_by_priority_then_age() -> Result<()> {
    let h = harness(4).await?;
    let low = h.enqueue(NewJob::new("noop", json!({})).priority(-1)).await?;
    let old_normal = h.enqueue(NewJob::new("noop", json!({}))).await?;
    let young_normal = h.enqueue(NewJob::new("noop", json!({}))).await?;
    let high = h.enqueue(NewJob::new("noop", json!({})).priority(5)).await?;
    let later = h
        .enqueue(
            NewJob::new("noop", json!({})).priority(9).schedule(Schedule::After(Duration::from_millis(500))),
        )
        .await?;
    let elsewhere = h.enqueue(NewJob::new("noop", json!({})).priority(9).queue("other")).await?;
    assert_eq!(h.view(later).await?.map(|v| v.state), Some(JobState::Scheduled));

    let mut order = Vec::new();
    for _ in 0..4 {
        let claimed = sql::claim(&h.client, "default", 1, "test", Duration::from_secs(60)).await?;
        order.extend(claimed.iter().map(|j| j.id));
    }
    assert_eq!(order, vec![high, old_normal, young_normal, low], "priority first, then the oldest");
    assert!(
        sql::claim(&h.client, "default", 10, "test", Duration::from_secs(60)).await?.is_empty(),
        "the scheduled job is not due yet"
    );

    let claimed = wait_for("the scheduled job to become due", Duration::from_secs(5), || async {
        sql::claim(&h.client, "default", 10, "test", Duration::from_secs(60))
            .await
            .ok()
            .filter(|c| !c.is_empty())
    })
    .await?;
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![later]);
    assert!(claimed[0].latency_seconds < 5.0);
    assert_eq!(
        h.view(elsewhere).await?.map(|v| v.state),
        Some(JobState::Available),
        "other queues are untouched"
    );
    Ok(())
}

/// A completion that waits for a job's row while its heartbeat renews the
/// lease (a new version of the row, committed after the completion's
/// snapshot) still finishes it, and the job beside it: neither is left
/// running to be rescued and run again.
#[tokio::test]
async fn a_completion_that_waits_for_a_renewed_lease_still_finishes_the_job() -> Result<()> {
    let h = harness(4).await?;
    let renewed = h.enqueue(NewJob::new("noop", json!({}))).await?;
    let beside = h.enqueue(NewJob::new("noop", json!({}))).await?;
    let claimed = sql::claim(&h.client, "default", 2, "test", Duration::from_secs(60)).await?;
    assert_eq!(claimed.len(), 2);
    let leases: Vec<(Lease, Option<Value>)> = claimed
        .iter()
        .map(|j| (Lease { id: j.id, attempt: j.attempt }, Some(json!({ "job": j.id }))))
        .collect();

    // The heartbeat's renewal, held open: the completion queues on the row.
    let heartbeat = support::connect(&h.bouncer.url()).await?;
    heartbeat.batch_execute("BEGIN").await?;
    let renew =
        "UPDATE tidepool_jobs SET lease_expires_at = now() + interval '1 minute' WHERE id = $1 RETURNING id";
    assert_eq!(heartbeat.query_typed(renew, &[(&renewed, tidepool::db::Type::INT8)]).await?.len(), 1);
    let recorder = support::connect(&h.bouncer.url()).await?;
    let completion = tokio::spawn(async move { sql::complete(&recorder, &leases).await });
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                   AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE OF j%'";
    wait_for("the completion to wait for the row", Duration::from_secs(10), || async {
        let row = h.client.query_typed_one(waiting, &[]).await.ok()?;
        (row.get::<_, i64>(0) == 1).then_some(())
    })
    .await?;
    heartbeat.batch_execute("COMMIT").await?;

    let mut finished = completion.await??;
    finished.sort_unstable();
    assert_eq!(finished, vec![renewed.min(beside), renewed.max(beside)], "both finished");
    for id in [renewed, beside] {
        let view = h.view(id).await?.context("the job's result is kept")?;
        assert_eq!(view.state, JobState::Succeeded);
        assert_eq!(view.result, Some(json!({ "job": id })));
    }
    Ok(())
}

/// What the operator's queue scaler reads: per queue, the due jobs not
/// claimed, how long the oldest has been due, and the running ones; a
/// scheduled job is not counted until it is due, and a queue without jobs
/// still has its row.
#[tokio::test]
async fn queue_stats_count_available_running_and_the_oldest_age() -> Result<()> {
    let h = harness(4).await?;
    let two_minutes_ago = Utc::now() - chrono::Duration::seconds(120);
    h.enqueue(NewJob::new("noop", json!({})).priority(-1).schedule(Schedule::At(two_minutes_ago))).await?;
    h.enqueue(NewJob::new("noop", json!({}))).await?;
    h.enqueue(NewJob::new("noop", json!({}))).await?;
    h.enqueue(NewJob::new("noop", json!({})).schedule(Schedule::After(Duration::from_secs(3600)))).await?;
    for _ in 0..2 {
        h.enqueue(NewJob::new("noop", json!({})).queue("other")).await?;
    }
    let claimed = sql::claim(&h.client, "default", 1, "test", Duration::from_secs(60)).await?;
    assert_eq!(claimed.len(), 1);

    let queues = ["default", "other", "empty"].map(String::from);
    let stats = sql::queue_stats(&h.client, &queues).await?;
    let by_queue: HashMap<&str, &sql::QueueStats> = stats.iter().map(|s| (s.queue.as_str(), s)).collect();
    let default = by_queue["default"];
    assert_eq!((default.available, default.running), (2, 1));
    assert!(
        (119.0..600.0).contains(&default.oldest_available_age),
        "the job due two minutes ago is the oldest: {}",
        default.oldest_available_age
    );
    let other = by_queue["other"];
    assert_eq!((other.available, other.running), (2, 0));
    assert!(other.oldest_available_age < 119.0);
    assert_eq!(
        (by_queue["empty"].available, by_queue["empty"].running, by_queue["empty"].oldest_available_age),
        (0, 0, 0.0)
    );
    assert_eq!(stats.len(), 3);
    Ok(())
}

/// Fails until attempt `succeed_on` (its state), then returns the attempt.
#[derive(Serialize, Deserialize)]
struct Flaky {}

impl Task for Flaky {
    const NAME: &'static str = "flaky";
    type State = i32;
    type Output = Value;

    async fn run(self, ctx: TaskContext<i32>) -> Result<Value, TaskError> {
        if ctx.job.attempt >= ctx.state {
            Ok(json!({ "succeeded_on": ctx.job.attempt }))
        } else {
            Err(TaskError::retry(format!("boom on attempt {}", ctx.job.attempt)))
        }
    }
}

/// Fails fatally.
#[derive(Serialize, Deserialize)]
struct Hopeless {}

impl Task for Hopeless {
    const NAME: &'static str = "hopeless";
    type State = ();
    type Output = ();

    async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
        Err(TaskError::fatal("bad input; not retrying"))
    }
}

/// Panics.
#[derive(Serialize, Deserialize)]
struct Panics {}

impl Task for Panics {
    const NAME: &'static str = "panics";
    type State = ();
    type Output = ();

    async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
        panic!("task bug")
    }
}

/// A registry with a task that fails until attempt `succeed_on`, one that
/// fails fatally and one that panics.
fn flaky_registry(succeed_on: i32) -> Result<Registry> {
    Ok(Registry::new().with::<Flaky>(succeed_on)?.with::<Hopeless>(())?.with::<Panics>(())?)
}

#[tokio::test]
async fn failed_attempts_back_off_then_die_with_their_errors() -> Result<()> {
    let h = harness(8).await?;
    let worker = h.start_worker(flaky_registry(i32::MAX)?, settings("w"))?;
    let id = h.enqueue(NewJob::new("flaky", json!({})).max_attempts(3)).await?;
    let dead = h.wait_state(id, JobState::Dead, Duration::from_secs(20)).await?;
    assert_eq!(dead.attempts, 3);
    let errors = dead.errors.as_array().context("errors")?;
    let messages: Vec<&str> = errors.iter().filter_map(|e| e["error"].as_str()).collect();
    assert_eq!(messages, vec!["boom on attempt 1", "boom on attempt 2", "boom on attempt 3"]);
    // Equal jitter keeps at least half of base · 2^(n−1): 50 ms, then 100 ms.
    let at = error_times(&dead)?;
    assert!(at[1] - at[0] >= chrono::Duration::milliseconds(50), "{at:?}");
    assert!(at[2] - at[1] >= chrono::Duration::milliseconds(100), "{at:?}");

    let fatal = h.enqueue(NewJob::new("hopeless", json!({})).max_attempts(5)).await?;
    let view = h.wait_state(fatal, JobState::Dead, Duration::from_secs(10)).await?;
    assert_eq!(view.attempts, 1, "a fatal error is not retried");

    let panicked = h.enqueue(NewJob::new("panics", json!({})).max_attempts(1)).await?;
    let view = h.wait_state(panicked, JobState::Dead, Duration::from_secs(10)).await?;
    assert!(view.errors.to_string().contains("task panicked: task bug"), "{}", view.errors);

    let unknown = h.enqueue(NewJob::new("not_registered", json!({})).max_attempts(1)).await?;
    let view = h.wait_state(unknown, JobState::Dead, Duration::from_secs(10)).await?;
    assert!(view.errors.to_string().contains("has no task"), "{}", view.errors);
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_retried_job_succeeds_with_its_result_and_earlier_errors() -> Result<()> {
    let h = harness(8).await?;
    let worker = h.start_worker(flaky_registry(3)?, settings("w"))?;
    let id = h.enqueue(NewJob::new("flaky", json!({})).max_attempts(5)).await?;
    let view = h.wait_state(id, JobState::Succeeded, Duration::from_secs(20)).await?;
    assert_eq!(view.attempts, 3);
    assert_eq!(view.result, Some(json!({"succeeded_on": 3})));
    assert_eq!(view.errors.as_array().map(Vec::len), Some(2));
    worker.shutdown().await?;
    Ok(())
}

/// Sleeps 30 s in the database, past its 300 ms timeout.
#[derive(Serialize, Deserialize)]
struct TooSlow {}

impl Task for TooSlow {
    const NAME: &'static str = "too_slow";
    const TIMEOUT: Duration = Duration::from_millis(300);
    type State = ();
    type Output = ();

    async fn run(self, ctx: TaskContext<()>) -> Result<(), TaskError> {
        let conn = ctx.db.get().await?;
        conn.query_slow("SELECT pg_sleep(30)", &[], Duration::from_secs(30)).await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_timed_out_attempt_fails_and_its_query_is_cancelled() -> Result<()> {
    let h = harness(8).await?;
    let admin = h.db.admin().await?;
    let registry = builtins()?.with::<TooSlow>(())?;
    let worker = h.start_worker(registry, settings("w"))?;
    let id = h.enqueue(NewJob::new("too_slow", json!({})).max_attempts(1)).await?;
    let view = h.wait_state(id, JobState::Dead, Duration::from_secs(10)).await?;
    assert!(view.errors.to_string().contains("timed out after 300ms"), "{}", view.errors);
    wait_for("the abandoned pg_sleep to be cancelled", Duration::from_secs(10), || async {
        h.db.active_sleeps(&admin).await.ok().filter(|n| *n == 0)
    })
    .await?;
    worker.shutdown().await?;
    Ok(())
}

/// Runs until stopped, and counts its starts and drops (its state).
#[derive(Serialize, Deserialize)]
struct Endless {}

/// How many `endless` attempts started, and how many were dropped.
type Counts = (Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Task for Endless {
    const NAME: &'static str = "endless";
    type State = Counts;
    type Output = ();

    async fn run(self, ctx: TaskContext<Counts>) -> Result<(), TaskError> {
        let (started, dropped) = ctx.state;
        started.fetch_add(1, Ordering::SeqCst);
        let _guard = OnDrop(Some(move || {
            dropped.fetch_add(1, Ordering::SeqCst);
        }));
        tokio::time::sleep(Duration::from_secs(600)).await;
        Ok(())
    }
}

fn endless_registry(started: Arc<AtomicUsize>, dropped: Arc<AtomicUsize>) -> Result<Registry> {
    Ok(Registry::new().with::<Endless>((started, dropped))?)
}

struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[tokio::test]
async fn cancellation_stops_pending_and_running_jobs() -> Result<()> {
    let h = harness(8).await?;
    let pending = h
        .enqueue(NewJob::new("endless", json!({})).schedule(Schedule::After(Duration::from_secs(3600))))
        .await?;
    assert_eq!(queue::cancel(&h.client, pending).await?, Cancelled::Cancelled);
    assert_eq!(h.view(pending).await?.map(|v| v.state), Some(JobState::Cancelled));
    assert_eq!(queue::cancel(&h.client, pending).await?, Cancelled::NotPending);
    assert_eq!(queue::cancel(&h.client, 987_654_321).await?, Cancelled::NotPending);

    let (started, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let worker = h.start_worker(endless_registry(started.clone(), dropped.clone())?, settings("w"))?;
    let running = h.enqueue(NewJob::new("endless", json!({}))).await?;
    h.wait_state(running, JobState::Running, Duration::from_secs(10)).await?;
    assert_eq!(queue::cancel(&h.client, running).await?, Cancelled::Requested);
    assert_eq!(h.view(running).await?.map(|v| v.cancel_requested), Some(true));
    let view = h.wait_state(running, JobState::Cancelled, Duration::from_secs(10)).await?;
    assert_eq!(view.attempts, 1);
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the running task's future was dropped");
    assert_eq!(started.load(Ordering::SeqCst), 1);
    worker.shutdown().await?;
    Ok(())
}

/// One run of a job: id, worker, start, end.
type Run = (i64, String, Instant, Instant);

/// Runs 1.5 s (longer than the lease in its test), then records its run
/// under its worker's name (its state).
#[derive(Serialize, Deserialize)]
struct Long {
    i: u32,
}

impl Task for Long {
    const NAME: &'static str = "long";
    type State = (Arc<Mutex<Vec<Run>>>, &'static str);
    type Output = ();

    async fn run(self, ctx: TaskContext<Self::State>) -> Result<(), TaskError> {
        let (runs, name) = ctx.state;
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        runs.lock().map_err(|_| TaskError::retry("poisoned"))?.push((
            ctx.job.id,
            name.to_owned(),
            start,
            Instant::now(),
        ));
        Ok(())
    }
}

#[tokio::test]
async fn workers_never_run_a_job_twice_at_once_while_its_lease_is_valid() -> Result<()> {
    let h = harness(40).await?;
    // Jobs run longer than the lease: only heartbeats keep them.
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let registry = |name: &'static str| Registry::new().with::<Long>((runs.clone(), name));
    let fast_lease = |name| WorkerSettings {
        lease: Duration::from_secs(1),
        heartbeat_interval: Duration::from_millis(250),
        concurrency: 5,
        ..settings(name)
    };
    let jobs: Vec<NewJob> = (0..30).map(|i| NewJob::new("long", json!({ "i": i }))).collect();
    let ids: Vec<i64> = queue::enqueue_many(&h.client, &jobs).await?.iter().map(|e| e.id).collect();
    let workers = [
        h.start_worker(registry("a")?, fast_lease("a"))?,
        h.start_worker(registry("b")?, fast_lease("b"))?,
        h.start_worker(registry("c")?, fast_lease("c"))?,
    ];
    wait_for("all 30 jobs to finish", Duration::from_secs(60), || async {
        let left: i64 =
            h.client.query_typed_one("SELECT count(*) FROM tidepool_jobs", &[]).await.ok()?.get(0);
        (left == 0).then_some(())
    })
    .await?;
    for worker in workers {
        worker.shutdown().await?;
    }
    let runs = runs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let mut by_job: HashMap<i64, Vec<(String, Instant, Instant)>> = HashMap::new();
    for (id, worker, start, end) in runs {
        by_job.entry(id).or_default().push((worker, start, end));
    }
    assert_eq!(by_job.len(), ids.len(), "every job ran");
    for (id, runs) in &by_job {
        assert_eq!(runs.len(), 1, "job {id} ran more than once under valid leases: {runs:?}");
    }
    let workers_used: std::collections::HashSet<&str> = by_job.values().map(|r| r[0].0.as_str()).collect();
    assert!(workers_used.len() >= 2, "the jobs were spread over the workers: {workers_used:?}");
    Ok(())
}

#[tokio::test]
async fn an_expired_lease_is_rescued_and_fences_out_its_old_holder() -> Result<()> {
    let h = harness(8).await?;
    let id = h.enqueue(NewJob::new("noop", json!({}))).await?;
    // A worker claims it with a short lease, then stalls (never heartbeats).
    let stalled = sql::claim(&h.client, "default", 1, "stalled", Duration::from_millis(200)).await?;
    assert_eq!(stalled.len(), 1);
    let old_lease = Lease { id, attempt: stalled[0].attempt };

    let worker = h.start_worker(builtins()?, settings("rescuer"))?;
    h.wait_gone(id, Duration::from_secs(10)).await?;
    // The stalled worker comes back: its completion matches nothing.
    assert!(sql::complete(&h.client, &[(old_lease, None)]).await?.is_empty());
    assert!(sql::heartbeat(&h.client, &[old_lease], Duration::from_secs(30)).await?.is_empty());
    worker.shutdown().await?;

    // Out of attempts when its lease expires: dead, with the reason.
    let last = h.enqueue(NewJob::new("noop", json!({})).max_attempts(1)).await?;
    sql::claim(&h.client, "default", 1, "stalled", Duration::from_millis(100)).await?;
    let worker = h.start_worker(builtins()?, settings("rescuer"))?;
    let view = h.wait_state(last, JobState::Dead, Duration::from_secs(10)).await?;
    assert!(view.errors.to_string().contains("lease expired: worker stalled"), "{}", view.errors);
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn shutdown_hands_unfinished_jobs_back_at_once() -> Result<()> {
    let h = harness(8).await?;
    let (started, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let long_lease = WorkerSettings {
        lease: Duration::from_secs(600),
        heartbeat_interval: Duration::from_secs(60),
        shutdown_timeout: Duration::from_millis(300),
        ..settings("w")
    };
    let worker = h.start_worker(endless_registry(started.clone(), dropped.clone())?, long_lease)?;
    let jobs: Vec<NewJob> = (0..4).map(|_| NewJob::new("endless", json!({}))).collect();
    let mut ids: Vec<i64> = queue::enqueue_many(&h.client, &jobs).await?.iter().map(|e| e.id).collect();
    wait_for("4 jobs to start", Duration::from_secs(10), || async {
        (started.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await?;
    // Cancelled while running, but no heartbeat comes before the shutdown.
    let cancelled = ids.pop().context("four ids")?;
    assert_eq!(queue::cancel(&h.client, cancelled).await?, Cancelled::Requested);
    let report = worker.shutdown().await?;
    assert_eq!(report, ShutdownReport { handed_back: 4 });
    assert_eq!(dropped.load(Ordering::SeqCst), 4);
    assert_eq!(
        h.view(cancelled).await?.map(|v| v.state),
        Some(JobState::Cancelled),
        "not handed back to run again"
    );
    // At once: the 600 s lease has not expired, yet the jobs are available
    // again, and the interrupted attempt does not count.
    for id in ids {
        let view = h.view(id).await?.context("handed-back job is pending")?;
        assert_eq!((view.state, view.attempts), (JobState::Available, 0), "job {id}");
    }

    // A job that finishes within the deadline is simply done.
    let quick = h.enqueue(NewJob::new("slow_query", json!({"seconds": 0.3}))).await?;
    let worker = h.start_worker(
        builtins()?,
        WorkerSettings { shutdown_timeout: Duration::from_secs(10), ..settings("quick") },
    )?;
    h.wait_state(quick, JobState::Running, Duration::from_secs(10)).await?;
    let report = worker.shutdown().await?;
    assert_eq!(report.handed_back, 0);
    assert_eq!(h.view(quick).await?.map(|v| v.state), Some(JobState::Succeeded));
    Ok(())
}

#[tokio::test]
async fn results_and_dead_jobs_are_pruned_after_their_retention() -> Result<()> {
    let h = harness(8).await?;
    let worker = h.start_worker(
        flaky_registry(1)?,
        WorkerSettings {
            result_retention: Duration::from_millis(500),
            dead_retention: Duration::from_millis(500),
            ..settings("w")
        },
    )?;
    let kept = h.enqueue(NewJob::new("flaky", json!({}))).await?;
    let dead = h.enqueue(NewJob::new("hopeless", json!({}))).await?;
    h.wait_state(kept, JobState::Succeeded, Duration::from_secs(10)).await?;
    h.wait_state(dead, JobState::Dead, Duration::from_secs(10)).await?;
    for id in [kept, dead] {
        h.wait_gone(id, Duration::from_secs(10)).await?;
    }
    worker.shutdown().await?;

    // Retention zero keeps no result at all.
    let worker = h.start_worker(
        flaky_registry(1)?,
        WorkerSettings { result_retention: Duration::ZERO, ..settings("w") },
    )?;
    let id = h.enqueue(NewJob::new("flaky", json!({}))).await?;
    h.wait_gone(id, Duration::from_secs(10)).await?;
    let results: i64 =
        h.client.query_typed_one("SELECT count(*) FROM tidepool_job_results", &[]).await?.get(0);
    assert_eq!(results, 0);
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_sleeping_task_runs_on_the_task_pool() -> Result<()> {
    let h = harness(16).await?;
    let admin = h.db.admin().await?;
    let worker = h.start_worker(builtins()?, WorkerSettings { concurrency: 5, ..settings("w") })?;
    let jobs: Vec<NewJob> = (0..5).map(|_| NewJob::new("slow_query", json!({"seconds": 1}))).collect();
    let ids: Vec<i64> = queue::enqueue_many(&h.client, &jobs).await?.iter().map(|e| e.id).collect();
    support::wait_for_sleeps(&h.db, &admin, 5).await?;
    for id in ids {
        let view = h.wait_state(id, JobState::Succeeded, Duration::from_secs(10)).await?;
        assert_eq!(view.result, Some(json!({"slept": 1.0})));
    }
    worker.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn a_worker_rides_out_a_pooler_restart() -> Result<()> {
    let mut h = harness(8).await?;
    let worker = h.start_worker(builtins()?, settings("w"))?;
    let before = h.enqueue(NewJob::new("slow_query", json!({"seconds": 0}))).await?;
    h.wait_state(before, JobState::Succeeded, Duration::from_secs(10)).await?;

    // Every pooled connection of the worker breaks; its claims fail until
    // PgBouncer is back, then it carries on by itself.
    h.bouncer.restart().await?;
    h.client = support::connect(&h.bouncer.url()).await?;
    let after = h.enqueue(NewJob::new("slow_query", json!({"seconds": 0}))).await?;
    h.wait_state(after, JobState::Succeeded, Duration::from_secs(20)).await?;
    assert_eq!(worker.shutdown().await?, ShutdownReport { handed_back: 0 });
    Ok(())
}

#[tokio::test]
async fn a_worker_serves_only_its_queues_round_robin() -> Result<()> {
    let h = harness(8).await?;
    let mut jobs = Vec::new();
    for queue in ["emails", "reports", "elsewhere"] {
        for _ in 0..5 {
            jobs.push(NewJob::new("slow_query", json!({"seconds": 0})).queue(queue));
        }
    }
    let ids: Vec<i64> = queue::enqueue_many(&h.client, &jobs).await?.iter().map(|e| e.id).collect();
    let worker = h.start_worker(
        builtins()?,
        WorkerSettings { queues: vec!["emails".into(), "reports".into()], ..settings("w") },
    )?;
    for &id in &ids[..10] {
        h.wait_state(id, JobState::Succeeded, Duration::from_secs(10)).await?;
    }
    worker.shutdown().await?;
    for &id in &ids[10..] {
        assert_eq!(
            h.view(id).await?.map(|v| v.state),
            Some(JobState::Available),
            "job {id} is not its queue's"
        );
    }
    Ok(())
}

/// A worker kept busy by one queue still looks at its quiet one: a job
/// there starts long before the busy queue's backlog is worked off (the
/// claimer passes over a queue it found empty only for a back-off).
#[tokio::test]
async fn a_quiet_queue_is_served_while_a_busy_one_keeps_the_worker_busy() -> Result<()> {
    const BACKLOG: usize = 30_000;
    let h = harness(8).await?;
    let busy = vec![NewJob::new("noop", json!({})).queue("busy"); queue::MAX_BATCH];
    for _ in 0..BACKLOG / queue::MAX_BATCH {
        queue::enqueue_many(&h.client, &busy).await?;
    }
    let pending = "SELECT count(*) FROM tidepool_jobs WHERE queue = 'busy'";
    let worker = h.start_worker(
        builtins()?,
        WorkerSettings { queues: vec!["quiet".into(), "busy".into()], ..settings("w") },
    )?;
    // Long enough for the quiet queue to be found empty again and again.
    wait_for("the worker to be well into the backlog", Duration::from_secs(60), || async {
        let left: i64 = h.client.query_typed_one(pending, &[]).await.ok()?.get(0);
        (left <= (BACKLOG - 2_000) as i64).then_some(())
    })
    .await?;
    let quiet =
        queue::enqueue_job(&h.client, &NewJob::new("slow_query", json!({"seconds": 0})).queue("quiet"))
            .await?;
    h.wait_state(quiet.id, JobState::Succeeded, Duration::from_secs(30)).await?;
    let left: i64 = h.client.query_typed_one(pending, &[]).await?.get(0);
    worker.shutdown().await?;
    assert!(left > 0, "the quiet queue's job waited for the busy queue's whole backlog");
    Ok(())
}

/// Doubles its number; refuses a negative one; fails fatally on 13 and
/// for another attempt on 7.
#[derive(Debug, Serialize, Deserialize)]
struct Double {
    n: i64,
}

impl Task for Double {
    const NAME: &'static str = "double";
    const MAX_ATTEMPTS: i32 = 3;
    type State = i64;
    type Output = i64;

    fn validate(&self) -> Result<(), String> {
        if self.n < 0 {
            return Err(format!("n must not be negative, got {}", self.n));
        }
        Ok(())
    }

    async fn run(self, ctx: TaskContext<i64>) -> Result<i64, TaskError> {
        match self.n {
            13 => Err(TaskError::fatal("13 is unlucky")),
            7 => Err(TaskError::retry("7 fails this time")),
            n => {
                let conn = ctx.db.get().await?;
                let row = conn.query_one("SELECT $1::int8 * 2", &[(&n, tidepool::db::Type::INT8)]).await?;
                Ok(row.get::<_, i64>(0) + ctx.state)
            }
        }
    }
}

/// Sleeps on the database far past its timeout.
#[derive(Debug, Serialize, Deserialize)]
struct Sleepy {}

impl Task for Sleepy {
    const NAME: &'static str = "sleepy";
    const TIMEOUT: Duration = Duration::from_millis(200);
    type State = ();
    type Output = ();

    async fn run(self, ctx: TaskContext<()>) -> Result<(), TaskError> {
        ctx.db.get().await?.query("SELECT pg_sleep(30)", &[]).await?;
        Ok(())
    }
}

#[tokio::test]
async fn perform_runs_one_task_and_gives_its_typed_output_or_error() -> Result<()> {
    use tidepool::testing::{perform, PerformError};
    let h = harness(4).await?;
    let db = h.pool(4, &WorkerMetrics::new()?)?;
    assert_eq!(perform(&db, 1, Double { n: 21 }).await?, 43, "doubled by the database, plus the state");
    match perform(&db, 0, Double { n: -1 }).await {
        Err(PerformError::InvalidArgs { task: "double", reason }) => {
            assert!(reason.contains("negative"), "{reason}")
        }
        other => bail!("a negative n must be refused: {other:?}"),
    }
    match perform(&db, 0, Double { n: 13 }).await {
        Err(PerformError::Failed { error: TaskError::Fatal(message), .. }) => {
            assert_eq!(message, "13 is unlucky")
        }
        other => bail!("13 must fail fatally: {other:?}"),
    }
    match perform(&db, (), Sleepy {}).await {
        Err(PerformError::TimedOut { task: "sleepy", after }) => assert_eq!(after, Sleepy::TIMEOUT),
        other => bail!("a task past its timeout must be reported so: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn drain_runs_every_due_job_through_the_worker_and_counts_how_they_ended() -> Result<()> {
    let h = harness(4).await?;
    let app = tidepool::Application::with_state("drained", 100_i64).task::<Double>();
    let mut ids = Vec::new();
    for n in [1, 2, 3, 13, 7] {
        let job = NewJob::new("double", json!({ "n": n })).max_attempts(3);
        ids.push(h.enqueue(job).await?);
    }
    // Retries are due only after a backoff far longer than the drain.
    let worker = WorkerSettings {
        database: DatabaseSettings::new(h.bouncer.url()),
        retry: RetryPolicy { base: Duration::from_secs(3600), max: Duration::from_secs(3600) },
        ..settings("drain")
    };
    let drained = tidepool::testing::drain(&app, worker.clone(), Duration::from_secs(60)).await?;
    assert_eq!(
        drained,
        tidepool::testing::Drained { succeeded: 3, failed: 2, retried: 1, dead: 1 },
        "three doubled, 13 dead, 7 scheduled again"
    );
    for (id, n) in ids.iter().zip([1, 2, 3]) {
        let view = h.view(*id).await?.context("a completed job with a result is kept")?;
        assert_eq!((view.state, view.result), (JobState::Succeeded, Some(json!(2 * n + 100))));
    }
    assert_eq!(h.view(ids[3]).await?.context("the dead job")?.state, JobState::Dead);
    assert_eq!(h.view(ids[4]).await?.context("the retried job")?.state, JobState::Scheduled);
    // Nothing due: a second drain runs nothing.
    assert_eq!(tidepool::testing::drain(&app, worker, Duration::from_secs(60)).await?, Default::default());
    Ok(())
}
