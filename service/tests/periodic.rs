//! Periodic tasks against a real PostgreSQL through a real PgBouncer in
//! transaction mode: several workers with one schedule, skewed clocks, a
//! worker killed and restarted, downtime under each missed-occurrence
//! policy, a cron schedule run live, two versions of a schedule at once,
//! and schedules removed with a deploy.
//!
//! Each worker runs in this process on a tokio runtime of its own, so that
//! killing it ([`KillableWorker::kill`]) stops every task of it at once, as
//! a killed process would: no shutdown, its connections dropped.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, DurationRound, Utc};
use serde::{Deserialize, Serialize};
use support::queue::{harness, settings, Harness, KillableWorker};
use support::wait_for;
use tidepool::db::Type;
use tidepool::queue::periodic::{Cadence, Clock, Missed, Periodic};
use tidepool::queue::sql;
use tidepool::task::{Registry, Task, TaskContext, TaskError};

/// Records each run of it in `ticks`: its job, its version, when it started
/// by the database's clock.
#[derive(Serialize, Deserialize)]
struct Tick {
    version: i32,
}

impl Task for Tick {
    const NAME: &'static str = "tick";
    type State = ();
    type Output = ();

    async fn run(self, ctx: TaskContext<()>) -> Result<(), TaskError> {
        let conn = ctx.db.get().await?;
        conn.execute(
            "INSERT INTO ticks (job_id, version, started_at) VALUES ($1, $2, now())
             ON CONFLICT (job_id) DO NOTHING",
            &[(&ctx.job.id, Type::INT8), (&self.version, Type::INT4)],
        )
        .await?;
        Ok(())
    }
}

const TICKS: &str =
    "CREATE TABLE ticks (job_id bigint PRIMARY KEY, version int NOT NULL, started_at timestamptz NOT NULL)";

/// A harness with the `ticks` table.
async fn ticking_harness(server_connections: u32) -> Result<Harness> {
    let h = harness(server_connections).await?;
    h.client.batch_execute(TICKS).await?;
    Ok(h)
}

/// A registry with `tick` and these schedules.
fn registry(schedules: impl IntoIterator<Item = Periodic>) -> Result<Registry> {
    let mut registry = Registry::new().with::<Tick>(())?;
    for periodic in schedules {
        registry.periodic(periodic)?;
    }
    Ok(registry)
}

fn every(seconds: u64, name: &str, version: i32) -> Result<Periodic> {
    Ok(Periodic::new(name, Cadence::every(Duration::from_secs(seconds))?, &Tick { version })?)
}

/// A clock `skew` ahead of the system's (behind if negative).
struct Skewed(chrono::Duration);

impl Clock for Skewed {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.0
    }
}

/// An occurrence as `tidepool_occurrences` recorded it.
#[derive(Debug, Clone)]
struct Occurrence {
    scheduled_at: DateTime<Utc>,
    job_id: i64,
    enqueued_by: String,
    enqueued_at: DateTime<Utc>,
}

async fn occurrences(h: &Harness, schedule: &str) -> Result<Vec<Occurrence>> {
    let rows = h
        .client
        .query(
            "SELECT scheduled_at, job_id, enqueued_by, enqueued_at FROM tidepool_occurrences
             WHERE schedule = $1 ORDER BY scheduled_at",
            &[&schedule],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Occurrence {
            scheduled_at: r.get(0),
            job_id: r.get(1),
            enqueued_by: r.get(2),
            enqueued_at: r.get(3),
        })
        .collect())
}

/// Waits until `schedule` has `n` occurrences enqueued.
async fn wait_occurrences(h: &Harness, schedule: &str, n: usize, limit: Duration) -> Result<Vec<Occurrence>> {
    wait_for(&format!("{n} occurrences of {schedule}"), limit, || async {
        occurrences(h, schedule).await.ok().filter(|o| o.len() >= n)
    })
    .await
}

/// Waits until every job in `ids` has run, and returns, per job, its
/// version and when it started.
async fn wait_ran(h: &Harness, ids: &[i64], limit: Duration) -> Result<HashMap<i64, (i32, DateTime<Utc>)>> {
    wait_for(&format!("{} jobs to run", ids.len()), limit, || async {
        let rows = h.client.query("SELECT job_id, version, started_at FROM ticks", &[]).await.ok()?;
        let ran: HashMap<i64, (i32, DateTime<Utc>)> =
            rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        ids.iter().all(|id| ran.contains_key(id)).then_some(ran)
    })
    .await
}

/// How many `tick` jobs exist in any table (pending, dead, or finished:
/// `tick` returns no result, so a finished one is gone and `ticks` holds
/// it) beside how many occurrences were enqueued, in one snapshot.
async fn jobs_and_occurrences(h: &Harness) -> Result<(i64, i64)> {
    let row = h
        .client
        .query_one(
            "SELECT (SELECT count(*) FROM tidepool_jobs WHERE task = 'tick')
                  + (SELECT count(*) FROM tidepool_dead_jobs WHERE task = 'tick')
                  + (SELECT count(*) FROM ticks t WHERE NOT EXISTS (SELECT 1 FROM tidepool_jobs j WHERE j.id = t.job_id)),
                    (SELECT count(*) FROM tidepool_occurrences)",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Checks that every `tick` job there ever was is one occurrence's.
async fn assert_one_job_per_occurrence(h: &Harness) -> Result<()> {
    let (jobs, occurrences) = jobs_and_occurrences(h).await?;
    ensure!(jobs == occurrences, "{jobs} tick jobs for {occurrences} occurrences");
    Ok(())
}

async fn db_now(h: &Harness) -> Result<DateTime<Utc>> {
    Ok(h.client.query_one("SELECT now()", &[]).await?.get(0))
}

/// The schedule's row: its cursor and missed count.
async fn schedule_row(h: &Harness, name: &str) -> Result<(DateTime<Utc>, i64)> {
    let row = h
        .client
        .query_one("SELECT cursor_at, missed FROM tidepool_schedules WHERE name = $1", &[&name])
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Checks that `occurrences` fall on consecutive multiples of `period`,
/// none twice, none enqueued before its time by the database's clock.
fn assert_consecutive(occurrences: &[Occurrence], period: chrono::Duration) -> Result<()> {
    for pair in occurrences.windows(2) {
        ensure!(
            pair[1].scheduled_at - pair[0].scheduled_at == period,
            "a gap or a repeat between {} and {}",
            pair[0].scheduled_at,
            pair[1].scheduled_at
        );
    }
    for o in occurrences {
        ensure!(o.scheduled_at.timestamp_subsec_nanos() == 0, "{} is not on a whole second", o.scheduled_at);
        ensure!(o.enqueued_at >= o.scheduled_at, "{o:?} was enqueued before its time");
    }
    Ok(())
}

/// Three workers with one schedule every second, for 60 s: one of them
/// 30 s ahead by its clock, one 30 s behind and killed and restarted
/// meanwhile. Every second's occurrence is one job, enqueued at or after
/// its time by the database's clock, whichever worker enqueued it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_enqueue_each_second_once_whatever_their_clocks() -> Result<()> {
    let h = ticking_harness(30).await?;
    let schedule = || registry([every(1, "each_second", 1)?]);
    let started = db_now(&h).await?;
    let ahead: Arc<dyn Clock> = Arc::new(Skewed(chrono::Duration::seconds(30)));
    let behind: Arc<dyn Clock> = Arc::new(Skewed(chrono::Duration::seconds(-30)));
    let _plain = KillableWorker::start(&h, schedule()?, settings("plain"), None)?;
    let _ahead = KillableWorker::start(&h, schedule()?, settings("ahead"), Some(ahead))?;
    let behind_worker = KillableWorker::start(&h, schedule()?, settings("behind"), Some(behind.clone()))?;

    wait_occurrences(&h, "each_second", 20, Duration::from_secs(60)).await?;
    behind_worker.kill();
    wait_occurrences(&h, "each_second", 25, Duration::from_secs(60)).await?;
    let _behind = KillableWorker::start(&h, schedule()?, settings("behind"), Some(behind))?;
    let found = wait_occurrences(&h, "each_second", 60, Duration::from_secs(120)).await?;

    let first = found.first().context("occurrences")?;
    ensure!(first.scheduled_at > started, "a new schedule does not run its past: {first:?} before {started}");
    assert_consecutive(&found, chrono::Duration::seconds(1))?;
    let by: BTreeSet<&str> = found.iter().map(|o| o.enqueued_by.as_str()).collect();
    for name in ["plain", "ahead", "behind"] {
        ensure!(by.contains(name), "worker {name} enqueued none of them: {by:?}");
    }
    let ids: Vec<i64> = found.iter().map(|o| o.job_id).collect();
    let distinct: BTreeSet<i64> = ids.iter().copied().collect();
    ensure!(distinct.len() == ids.len(), "one job per occurrence");
    let ran = wait_ran(&h, &ids, Duration::from_secs(30)).await?;
    for o in &found {
        let (_, started_at) = ran[&o.job_id];
        ensure!(started_at >= o.scheduled_at, "{o:?} started at {started_at}, before its time");
    }
    assert_one_job_per_occurrence(&h).await
}

/// A schedule every second with a grace of 2 s, its only worker down for
/// 10 s, under `missed`; returns how many of the occurrences missed in the
/// downtime ran, as bounds (see below), after checking what every policy
/// shares: the occurrences after the last one before the downtime are a
/// run of skipped ones, then a run of enqueued ones up to the schedule's
/// cursor, one job each, the skipped ones counted as missed.
async fn missed_that_ran(missed: Missed) -> Result<(usize, usize)> {
    let (at_least, at_most, skipped) = downtime(missed).await?;
    // 10 s down with a grace of 2 s: 7 missed at least, run or skipped.
    ensure!(skipped + at_most as i64 >= 7, "{skipped} skipped and {at_least}..={at_most} run");
    Ok((at_least, at_most))
}

async fn downtime(missed: Missed) -> Result<(usize, usize, i64)> {
    let h = ticking_harness(10).await?;
    let name = "after_downtime";
    let grace = chrono::Duration::seconds(2);
    let periodic =
        || -> Result<Periodic> { Ok(every(1, name, 1)?.grace(Duration::from_secs(2)).missed(missed)) };
    let worker = h.start_worker(registry([periodic()?])?, settings("before"))?;
    wait_occurrences(&h, name, 3, Duration::from_secs(30)).await?;
    worker.shutdown().await?;
    let last_before = occurrences(&h, name).await?.last().context("occurrences before")?.scheduled_at;
    let stopped = db_now(&h).await?;
    // The downtime, by the database's clock.
    wait_for("10 s of downtime", Duration::from_secs(30), || async {
        db_now(&h).await.ok().filter(|now| *now - stopped >= chrono::Duration::seconds(10)).map(drop)
    })
    .await?;
    let restarted = db_now(&h).await?;
    let worker = h.start_worker(registry([periodic()?])?, settings("after"))?;
    let all = wait_for("two occurrences on time after the downtime", Duration::from_secs(30), || async {
        let all = occurrences(&h, name).await.ok()?;
        (all.iter().filter(|o| o.scheduled_at > restarted).count() >= 2).then_some(all)
    })
    .await?;
    let ids: Vec<i64> = all.iter().map(|o| o.job_id).collect();
    wait_ran(&h, &ids, Duration::from_secs(30)).await?;
    worker.shutdown().await?;

    let all = occurrences(&h, name).await?;
    let (cursor, missed_count) = schedule_row(&h, name).await?;
    assert_one_job_per_occurrence(&h).await?;
    let after: Vec<&Occurrence> = all.iter().filter(|o| o.scheduled_at > last_before).collect();
    assert_consecutive(
        &after.iter().map(|o| (*o).clone()).collect::<Vec<_>>(),
        chrono::Duration::seconds(1),
    )?;
    let first_run = after.first().context("runs after the downtime")?;
    let last_run = after.last().context("runs after the downtime")?;
    ensure!(last_run.scheduled_at == cursor, "the cursor {cursor} is the latest run {last_run:?}");
    let skipped = (first_run.scheduled_at - last_before).num_seconds() - 1;
    ensure!(skipped == missed_count, "{skipped} skipped, the schedule counted {missed_count}");

    // The first look after the downtime enqueued the runs it found at its
    // now, `look`; those older than `look - grace` were missed. `look` is
    // at or before the statement that enqueued them (`enqueued_at`,
    // `first`), and later than `first - 2 s` on any machine that runs this
    // test: so the missed ones that ran are between these two counts.
    let first = first_run.enqueued_at;
    let late_by = |look: DateTime<Utc>| after.iter().filter(|o| o.scheduled_at < look - grace).count();
    Ok((late_by(first - chrono::Duration::seconds(2)), late_by(first), skipped))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_skip_runs_none_of_the_missed() -> Result<()> {
    let (at_least, at_most) = missed_that_ran(Missed::Skip).await?;
    ensure!(at_least == 0, "skip ran {at_least}..={at_most} of the missed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_run_once_runs_the_latest_missed_once() -> Result<()> {
    let (at_least, at_most) = missed_that_ran(Missed::RunOnce).await?;
    ensure!((at_least..=at_most).contains(&1), "run once ran {at_least}..={at_most} of the missed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_run_each_runs_the_latest_missed_up_to_its_bound() -> Result<()> {
    let (at_least, at_most) = missed_that_ran(Missed::RunEach { at_most: 4 }).await?;
    ensure!(
        (at_least..=at_most).contains(&4),
        "run each (at most 4) ran {at_least}..={at_most} of the missed"
    );
    Ok(())
}

/// A cron schedule in a zone half an hour off UTC, through the SQL: an
/// hourly `30 * * * *` in Asia/Kolkata falls on UTC's full hours. Its row
/// is set as if a worker had settled the previous hour's occurrence, so
/// the latest one is due at once and on time (grace 2 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_in_its_zone_runs_live_through_the_sql() -> Result<()> {
    let h = ticking_harness(10).await?;
    let name = "kolkata_half_past";
    let cron = Cadence::cron("30 * * * *", chrono_tz::Asia::Kolkata)?;
    let periodic = Periodic::new(name, cron, &Tick { version: 7 })?.grace(Duration::from_secs(2 * 3600));
    let settled: DateTime<Utc> = h
        .client
        .query_one(
            "INSERT INTO tidepool_schedules (name, cursor_at)
             VALUES ($1, date_trunc('hour', now()) - interval '1 hour') RETURNING cursor_at",
            &[&name],
        )
        .await?
        .get(0);
    let worker = h.start_worker(registry([periodic])?, settings("cron"))?;
    let found = wait_occurrences(&h, name, 1, Duration::from_secs(30)).await?;
    let ran = wait_ran(&h, &[found[0].job_id], Duration::from_secs(30)).await?;
    worker.shutdown().await?;
    let hour = settled + chrono::Duration::hours(1);
    ensure!(hour.duration_trunc(chrono::Duration::hours(1))? == hour, "{hour} is a full hour");
    ensure!(found[0].scheduled_at == hour, "Kolkata's :30 is UTC's full hour {hour}: {:?}", found[0]);
    ensure!(found[0].enqueued_at >= hour, "{:?}", found[0]);
    ensure!(ran[&found[0].job_id].0 == 7, "the schedule's arguments: {ran:?}");
    let (cursor, missed) = schedule_row(&h, name).await?;
    let latest = occurrences(&h, name).await?.last().map(|o| o.scheduled_at);
    ensure!(Some(cursor) == latest && missed == 0, "cursor {cursor}, missed {missed}, latest {latest:?}");
    Ok(())
}

/// A deploy in which old and new workers disagree on a schedule: one
/// every second (version 1) beside one every two seconds (version 2),
/// under one name, for 10 s. Each instant is enqueued once, by one version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_of_a_schedule_at_once_never_run_an_instant_twice() -> Result<()> {
    let h = ticking_harness(20).await?;
    let name = "changing";
    let old = KillableWorker::start(&h, registry([every(1, name, 1)?])?, settings("old"), None)?;
    let new = KillableWorker::start(&h, registry([every(2, name, 2)?])?, settings("new"), None)?;
    let found = wait_occurrences(&h, name, 8, Duration::from_secs(60)).await?;
    let ids: Vec<i64> = found.iter().map(|o| o.job_id).collect();
    let ran = wait_ran(&h, &ids, Duration::from_secs(30)).await?;
    old.kill();
    new.kill();
    let instants: BTreeSet<DateTime<Utc>> = found.iter().map(|o| o.scheduled_at).collect();
    ensure!(instants.len() == found.len(), "an instant twice: {found:?}");
    for o in &found {
        let (version, _) = ran[&o.job_id];
        let seconds = o.scheduled_at.timestamp();
        ensure!(version == 1 || seconds % 2 == 0, "version 2 runs on even seconds only: {o:?}");
        let by = if version == 1 { "old" } else { "new" };
        ensure!(o.enqueued_by == by, "{o:?} ran version {version}");
    }
    // Between two instants, the later version's cursor never went back:
    // the instants enqueued are strictly increasing in the order enqueued.
    let mut by_enqueue = found.clone();
    by_enqueue.sort_by_key(|o| (o.enqueued_at, o.scheduled_at));
    ensure!(
        by_enqueue.windows(2).all(|w| w[0].scheduled_at < w[1].scheduled_at),
        "enqueued out of order: {by_enqueue:?}"
    );
    assert_one_job_per_occurrence(&h).await
}

/// A schedule removed from the code is forgotten once no worker has
/// declared it for the forget time; one still declared is kept, and its
/// cursor with it.
#[tokio::test]
async fn a_schedule_no_worker_declares_is_forgotten() -> Result<()> {
    let h = ticking_harness(4).await?;
    sql::declare_schedules(&h.client, &["kept", "removed"]).await?;
    let (kept_cursor, _) = schedule_row(&h, "kept").await?;
    let declared = db_now(&h).await?;
    wait_for("the declarations to age", Duration::from_secs(10), || async {
        db_now(&h).await.ok().filter(|now| *now - declared >= chrono::Duration::milliseconds(200)).map(drop)
    })
    .await?;
    sql::declare_schedules(&h.client, &["kept"]).await?;
    let (forgotten, _) =
        sql::forget_schedules(&h.client, Duration::from_millis(100), Duration::from_secs(3600), 100).await?;
    ensure!(forgotten == 1, "forgot {forgotten}");
    let names: Vec<String> =
        h.client.query("SELECT name FROM tidepool_schedules", &[]).await?.iter().map(|r| r.get(0)).collect();
    ensure!(names == ["kept"], "{names:?}");
    ensure!(schedule_row(&h, "kept").await?.0 == kept_cursor, "declaring again keeps the cursor");
    Ok(())
}
