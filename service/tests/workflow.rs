//! Global rate limits and workflows (chains, groups, chords) against a real
//! PostgreSQL through a real PgBouncer in transaction mode, with several
//! workers of the runtime in this process: a limit of 20 a second across
//! four workers, a chord of 100 finishing across four workers (with result
//! retention and without), a member that dies, a member cancelled (pending
//! and running), a chain of three, and a worker killed while it holds a
//! chord's last member.

mod support;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use support::queue::{harness, settings, Harness, KillableWorker, RunningWorker};
use support::wait_for;
use tidepool::db::Type;
use tidepool::queue::rate_limit::RateLimit;
use tidepool::queue::workflow::{StageState, Workflow, WorkflowView};
use tidepool::queue::{self, sql, Cancelled, JobState};
use tidepool::settings::WorkerSettings;
use tidepool::task::{Registry, Task, TaskContext, TaskError};

/// A member: sleeps `sleep_ms` on its first attempt, then outputs `n * 2`;
/// or dies at once when `fatal`.
#[derive(Serialize, Deserialize)]
struct Member {
    n: i64,
    sleep_ms: u64,
    fatal: bool,
}

impl Member {
    fn quick(n: i64) -> Self {
        Self { n, sleep_ms: 0, fatal: false }
    }
}

impl Task for Member {
    const NAME: &'static str = "member";
    type State = ();
    type Output = i64;

    async fn run(self, ctx: TaskContext<()>) -> Result<i64, TaskError> {
        if self.fatal {
            return Err(TaskError::fatal(format!("member {} cannot", self.n)));
        }
        if ctx.job.attempt == 1 && self.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.sleep_ms)).await;
        }
        Ok(self.n * 2)
    }
}

/// A chord's callback: records the outputs it read, once per job.
#[derive(Serialize, Deserialize)]
struct Collect {}

impl Task for Collect {
    const NAME: &'static str = "collect";
    type State = ();
    type Output = usize;

    async fn run(self, ctx: TaskContext<()>) -> Result<usize, TaskError> {
        let outputs: Vec<i64> = ctx.inputs().await?;
        let conn = ctx.db.get().await?;
        conn.execute(
            "INSERT INTO callbacks (job_id, workflow_stage, outputs) VALUES ($1, $2, $3)
             ON CONFLICT (job_id) DO NOTHING",
            &[
                (&ctx.job.id, Type::INT8),
                (&ctx.job.stage, Type::INT8),
                (&serde_json::to_value(&outputs).map_err(|e| TaskError::fatal(e.to_string()))?, Type::JSONB),
            ],
        )
        .await?;
        Ok(outputs.len())
    }
}

/// A chain's link: the output before it (none for the first) plus `add`.
#[derive(Serialize, Deserialize)]
struct Add {
    add: i64,
    first: bool,
}

impl Task for Add {
    const NAME: &'static str = "add";
    type State = ();
    type Output = i64;

    async fn run(self, ctx: TaskContext<()>) -> Result<i64, TaskError> {
        let before: i64 = if self.first { 0 } else { ctx.input().await? };
        let output = before + self.add;
        let conn = ctx.db.get().await?;
        conn.execute(
            "INSERT INTO links (job_id, output) VALUES ($1, $2) ON CONFLICT (job_id) DO NOTHING",
            &[(&ctx.job.id, Type::INT8), (&output, Type::INT8)],
        )
        .await?;
        Ok(output)
    }
}

/// At most 20 claims in any second, across every worker.
#[derive(Serialize, Deserialize)]
struct Limited {}

impl Task for Limited {
    const NAME: &'static str = "limited";
    const RATE_LIMIT: Option<RateLimit> = Some(RateLimit::per_second(20));
    type State = ();
    type Output = bool;

    async fn run(self, _: TaskContext<()>) -> Result<bool, TaskError> {
        Ok(true)
    }
}

const TABLES: &str = "
CREATE TABLE callbacks (job_id bigint PRIMARY KEY, workflow_stage bigint, outputs jsonb NOT NULL);
CREATE TABLE links (job_id bigint PRIMARY KEY, output bigint NOT NULL);";

async fn workflow_harness() -> Result<Harness> {
    let h = harness(60).await?;
    h.client.batch_execute(TABLES).await?;
    Ok(h)
}

fn registry() -> Result<Registry> {
    Ok(Registry::new().with::<Member>(())?.with::<Collect>(())?.with::<Add>(())?.with::<Limited>(())?)
}

fn worker_settings(name: &str, concurrency: u32) -> WorkerSettings {
    WorkerSettings { concurrency, ..settings(name) }
}

fn start_workers(
    h: &Harness,
    n: usize,
    tune: impl Fn(WorkerSettings) -> WorkerSettings,
) -> Result<Vec<RunningWorker>> {
    (0..n).map(|i| h.start_worker(registry()?, tune(worker_settings(&format!("w{i}"), 25)))).collect()
}

async fn shutdown(workers: Vec<RunningWorker>) -> Result<()> {
    for worker in workers {
        worker.shutdown().await?;
    }
    Ok(())
}

async fn wait_workflow(h: &Harness, id: i64, state: StageState, limit: Duration) -> Result<WorkflowView> {
    wait_for(&format!("workflow {id} to be {state:?}"), limit, || async {
        queue::lookup_workflow(&h.client, id).await.ok().flatten().filter(|w| w.state == state)
    })
    .await
}

/// The callbacks recorded: (job, outputs).
async fn callbacks(h: &Harness) -> Result<Vec<(i64, Vec<i64>)>> {
    let rows = h.client.query("SELECT job_id, outputs FROM callbacks ORDER BY job_id", &[]).await?;
    rows.iter().map(|r| Ok((r.get(0), serde_json::from_value(r.get::<_, serde_json::Value>(1))?))).collect()
}

/// Jobs of `task` anywhere: pending, kept results, dead.
async fn jobs_of(h: &Harness, task: &str) -> Result<i64> {
    let row = h
        .client
        .query_one(
            "SELECT (SELECT count(*) FROM tidepool_jobs WHERE task = $1)
                  + (SELECT count(*) FROM tidepool_job_results WHERE task = $1)
                  + (SELECT count(*) FROM tidepool_dead_jobs WHERE task = $1)",
            &[&task],
        )
        .await?;
    Ok(row.get(0))
}

async fn no_pending_jobs(h: &Harness) -> Result<()> {
    wait_for("every job to have finished", Duration::from_secs(60), || async {
        let row = h.client.query_one("SELECT count(*) FROM tidepool_jobs", &[]).await.ok()?;
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await
}

#[tokio::test]
async fn a_rate_limit_holds_across_four_workers() -> Result<()> {
    let h = workflow_harness().await?;
    let jobs: Vec<_> =
        (0..400).map(|_| queue::typed_job(&Limited {}, Default::default())).collect::<Result<_, _>>()?;
    queue::enqueue_many(&h.client, &jobs).await?;
    let workers = start_workers(&h, 4, |s| s)?;

    // Every claim of a no-op ends as a kept result: the first one's start is the first claim.
    let first: DateTime<Utc> = wait_for("the first claim", Duration::from_secs(30), || async {
        let row = h.client.query_one("SELECT min(started_at) FROM tidepool_job_results", &[]).await.ok()?;
        row.get::<_, Option<DateTime<Utc>>>(0)
    })
    .await?;
    let end = first + chrono::Duration::seconds(10);
    // Jobs that wait for the limit are available, not failed.
    let stats = sql::queue_stats(&h.client, &["default".to_owned()]).await?;
    ensure!(stats[0].available > 0, "jobs wait for the limit as available: {stats:?}");
    wait_for("10 s of claims", Duration::from_secs(40), || async {
        let row = h.client.query_one("SELECT now() > $1", &[&end]).await.ok()?;
        row.get::<_, bool>(0).then_some(())
    })
    .await?;
    shutdown(workers).await?;

    let starts: Vec<DateTime<Utc>> = h
        .client
        .query("SELECT started_at FROM tidepool_job_results WHERE task = 'limited' ORDER BY started_at", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // No window of one second holds more than 20: any 21 claims span a second at least.
    for (i, pair) in starts.windows(21).enumerate() {
        let span = pair[20] - pair[0];
        ensure!(span >= chrono::Duration::seconds(1), "claims {i}..{} span only {span}", i + 20);
    }
    let dead = h.client.query_one("SELECT count(*) FROM tidepool_dead_jobs", &[]).await?.get::<_, i64>(0);
    ensure!(dead == 0, "{dead} jobs died");
    let in_ten = starts.iter().filter(|t| **t >= first && **t < end).count();
    ensure!((180..=200).contains(&in_ten), "{in_ten} claims in the first 10 s, expected close to 200");
    Ok(())
}

#[tokio::test]
async fn a_queue_rate_limit_holds_across_two_workers() -> Result<()> {
    let h = workflow_harness().await?;
    let jobs: Vec<_> = (0..60)
        .map(|n| {
            queue::typed_job(
                &Member::quick(n),
                queue::EnqueueOptions { queue: Some("slow".into()), ..Default::default() },
            )
        })
        .collect::<Result<_, _>>()?;
    queue::enqueue_many(&h.client, &jobs).await?;
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut registry = registry()?;
        registry.rate_limit_queue("slow", RateLimit::per(5, Duration::from_millis(500)))?;
        let settings =
            WorkerSettings { queues: vec!["slow".into()], ..worker_settings(&format!("q{i}"), 10) };
        workers.push(h.start_worker(registry, settings)?);
    }
    no_pending_jobs(&h).await?;
    shutdown(workers).await?;
    let starts: Vec<DateTime<Utc>> = h
        .client
        .query("SELECT started_at FROM tidepool_job_results ORDER BY started_at", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(starts.len() == 60, "{} results", starts.len());
    for pair in starts.windows(6) {
        ensure!(pair[5] - pair[0] >= chrono::Duration::milliseconds(500), "6 claims within 500 ms: {pair:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_chord_of_100_across_four_workers_calls_back_once() -> Result<()> {
    for retention in [Duration::from_secs(3600), Duration::ZERO] {
        let h = workflow_harness().await?;
        let workers = start_workers(&h, 4, |s| WorkerSettings { result_retention: retention, ..s })?;
        // All 100 run at once (4 x 25) and end together.
        let members: Vec<Member> = (0..100).map(|n| Member { n, sleep_ms: 300, fatal: false }).collect();
        let chord = queue::enqueue_workflow(&h.client, &Workflow::chord(&members, &Collect {})?).await?;
        ensure!(chord.jobs.len() == 100, "{} members", chord.jobs.len());
        let done = wait_workflow(&h, chord.id, StageState::Succeeded, Duration::from_secs(60)).await;
        no_pending_jobs(&h).await?;
        if retention.is_zero() {
            // Once the callback has run, nothing keeps the record.
            wait_for("the workflow to be pruned", Duration::from_secs(30), || async {
                queue::lookup_workflow(&h.client, chord.id).await.ok().filter(Option::is_none).map(drop)
            })
            .await?;
        }
        shutdown(workers).await?;

        let called = callbacks(&h).await?;
        ensure!(called.len() == 1, "retention {retention:?}: the callback ran {} times", called.len());
        let expected: Vec<i64> = (0..100).map(|n| n * 2).collect();
        ensure!(called[0].1 == expected, "retention {retention:?}: outputs {:?}", called[0].1);
        ensure!(jobs_of(&h, "collect").await? <= 1, "one callback job at most is kept");
        if retention.is_zero() {
            let left = h.client.query_one("SELECT count(*) FROM tidepool_group_outputs", &[]).await?;
            ensure!(left.get::<_, i64>(0) == 0, "outputs left behind");
        } else {
            let view = done?;
            let counts: Vec<(i32, i32, StageState)> =
                view.stages.iter().map(|s| (s.total, s.succeeded, s.state)).collect();
            ensure!(
                counts == [(100, 100, StageState::Succeeded), (1, 1, StageState::Succeeded)],
                "{counts:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_member_fails_the_chord_with_its_error() -> Result<()> {
    let h = workflow_harness().await?;
    let members: Vec<Member> = (0..5).map(|n| Member { n, sleep_ms: 0, fatal: n == 3 }).collect();
    let chord = queue::enqueue_workflow(&h.client, &Workflow::chord(&members, &Collect {})?).await?;
    let workers = start_workers(&h, 2, |s| s)?;
    let view = wait_workflow(&h, chord.id, StageState::Failed, Duration::from_secs(30)).await?;
    no_pending_jobs(&h).await?;
    shutdown(workers).await?;

    ensure!(view.error() == Some("member 3 cannot"), "{view:?}");
    ensure!(view.stages.iter().all(|s| s.state == StageState::Failed), "{view:?}");
    ensure!(view.stages[0].failed_job == Some(chord.jobs[3]), "{view:?}");
    ensure!(callbacks(&h).await?.is_empty(), "no callback");
    ensure!(jobs_of(&h, "collect").await? == 0, "the callback was never enqueued");
    Ok(())
}

#[tokio::test]
async fn a_cancelled_member_cancels_the_chord() -> Result<()> {
    let h = workflow_harness().await?;
    let members: Vec<Member> = (0..3).map(Member::quick).collect();
    let chord = queue::enqueue_workflow(&h.client, &Workflow::chord(&members, &Collect {})?).await?;
    ensure!(
        queue::cancel(&h.client, chord.jobs[1]).await? == Cancelled::Cancelled,
        "cancelled while pending"
    );
    let view = wait_workflow(&h, chord.id, StageState::Cancelled, Duration::from_secs(5)).await?;
    ensure!(view.stages[0].failed_job == Some(chord.jobs[1]), "{view:?}");
    ensure!(view.error() == Some("cancelled before it ran"), "{view:?}");

    // The others still run; their ends no longer count.
    let workers = start_workers(&h, 1, |s| s)?;
    no_pending_jobs(&h).await?;
    shutdown(workers).await?;
    for id in [chord.jobs[0], chord.jobs[2]] {
        ensure!(h.view(id).await?.map(|v| v.state) == Some(JobState::Succeeded), "member {id} ran");
    }
    let view = queue::lookup_workflow(&h.client, chord.id).await?.context("kept")?;
    ensure!(view.state == StageState::Cancelled && view.stages[0].succeeded == 0, "{view:?}");
    ensure!(jobs_of(&h, "collect").await? == 0, "the callback was never enqueued");
    Ok(())
}

#[tokio::test]
async fn a_member_cancelled_while_running_cancels_the_chord() -> Result<()> {
    let h = workflow_harness().await?;
    let mut members: Vec<Member> = (0..3).map(Member::quick).collect();
    // Runs until it is cancelled.
    members[1].sleep_ms = 600_000;
    let chord = queue::enqueue_workflow(&h.client, &Workflow::chord(&members, &Collect {})?).await?;
    let workers = start_workers(&h, 1, |s| s)?;
    let running = chord.jobs[1];
    wait_for("the others done and member 1 running", Duration::from_secs(30), || async {
        let view = queue::lookup_workflow(&h.client, chord.id).await.ok().flatten()?;
        let state = h.view(running).await.ok().flatten()?.state;
        (view.stages[0].succeeded == 2 && state == JobState::Running).then_some(())
    })
    .await?;
    ensure!(
        queue::cancel(&h.client, running).await? == Cancelled::Requested,
        "cancel requested while running"
    );

    // Its worker stops it at the next heartbeat; the end it records ends the chord.
    let view = wait_workflow(&h, chord.id, StageState::Cancelled, Duration::from_secs(30)).await?;
    no_pending_jobs(&h).await?;
    shutdown(workers).await?;
    ensure!(view.stages[0].failed_job == Some(running), "{view:?}");
    ensure!(view.error() == Some("cancelled while running"), "{view:?}");
    ensure!(view.stages.iter().all(|s| s.state == StageState::Cancelled), "{view:?}");
    ensure!(view.stages[0].succeeded == 2, "the two others had succeeded: {view:?}");
    ensure!(h.view(running).await?.map(|v| v.state) == Some(JobState::Cancelled), "member 1 cancelled");
    ensure!(jobs_of(&h, "collect").await? == 0, "the callback was never enqueued");
    ensure!(callbacks(&h).await?.is_empty(), "no callback");
    Ok(())
}

#[tokio::test]
async fn a_chain_of_three_passes_each_output_on() -> Result<()> {
    let h = workflow_harness().await?;
    let chain = Workflow::chain(&Add { add: 1, first: true })?
        .then(&Add { add: 10, first: false })?
        .then(&Add { add: 100, first: false })?;
    let enqueued = queue::enqueue_workflow(&h.client, &chain).await?;
    let workers = start_workers(&h, 2, |s| s)?;
    wait_workflow(&h, enqueued.id, StageState::Succeeded, Duration::from_secs(30)).await?;
    shutdown(workers).await?;
    let outputs: Vec<i64> = h
        .client
        .query("SELECT output FROM links ORDER BY job_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(outputs == [1, 11, 111], "{outputs:?}");
    Ok(())
}

#[tokio::test]
async fn a_killed_worker_holding_the_last_member_is_rescued_into_one_callback() -> Result<()> {
    let h = workflow_harness().await?;
    let mut members: Vec<Member> = (0..3).map(Member::quick).collect();
    // Its first attempt outlives the worker that claims it.
    members.push(Member { n: 3, sleep_ms: 600_000, fatal: false });
    let chord = queue::enqueue_workflow(&h.client, &Workflow::chord(&members, &Collect {})?).await?;
    let doomed = KillableWorker::start(&h, registry()?, worker_settings("doomed", 10), None)?;
    let last = chord.jobs[3];
    wait_for("three members done and the last one running", Duration::from_secs(30), || async {
        let view = queue::lookup_workflow(&h.client, chord.id).await.ok().flatten()?;
        let running = h.view(last).await.ok().flatten()?.state == JobState::Running;
        (view.stages[0].succeeded == 3 && running).then_some(())
    })
    .await?;
    doomed.kill();

    let rescuer = h.start_worker(registry()?, worker_settings("rescuer", 10))?;
    wait_workflow(&h, chord.id, StageState::Succeeded, Duration::from_secs(60)).await?;
    no_pending_jobs(&h).await?;
    rescuer.shutdown().await?;

    let called = callbacks(&h).await?;
    ensure!(called.len() == 1 && called[0].1 == [0, 2, 4, 6], "{called:?}");
    let view = h.view(last).await?.context("the last member's result")?;
    ensure!(view.attempts == 2, "the rescued member ran twice: {view:?}");
    Ok(())
}
