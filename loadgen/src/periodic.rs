//! `tidepool-loadgen periodic`: the periodic tasks' benchmarks
//! (docs/benchmarks.md, section 21), with workers of the runtime
//! ([`tidepool::queue::Worker`], each with pools of its own, as a
//! `tidepool worker` process has) in this process, through PgBouncer.
//!
//! - `delay`: `--schedules` schedules every second on `--workers` workers
//!   until `--occurrences` occurrences have started; per occurrence, from
//!   its instant to its job's start (the task reads the clock first thing;
//!   one machine, one clock).
//! - `cost`: `--workers` idle workers for `--window`, with `--schedules`
//!   hourly schedules (looked at, rarely due) and with none, alternating
//!   `--rounds` times: what PostgreSQL did per minute (transactions,
//!   scans and updates of `tidepool_schedules`, its processes' CPU time).
//! - `throughput`: `--jobs` no-op jobs worked by one worker with
//!   `--schedules` schedules present (every minute, enqueuing to a queue it
//!   does not serve) and with none, alternating `--rounds` times.
//!
//! The schedules are named `bench-*`; their rows, occurrences and jobs are
//! removed before and after. Prints one JSON object.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tidepool::chrono::{DateTime, Utc};
use tidepool::db::Type;
use tidepool::queue::periodic::{Cadence, Periodic};
use tidepool::queue::{self, EnqueueOptions, NewJob};
use tidepool::settings::WorkerSettings;
use tidepool::task::{Registry, Task, TaskContext, TaskError};

use crate::inprocess::{connect, quantile, wait_until, Running};

/// The benchmark's own table: when each job started.
const STARTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_periodic_starts (
    job_id bigint PRIMARY KEY, started_at timestamptz NOT NULL)";
/// The queue the throughput run's schedules enqueue to, which no worker serves.
const UNSERVED_QUEUE: &str = "bench-unserved";

/// Which benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Experiment {
    Delay,
    Cost,
    Throughput,
}

/// `tidepool-loadgen periodic`'s command line.
#[derive(clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    experiment: Experiment,
    /// The pooler the workers use, loopback only. Never printed.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// PostgreSQL itself, loopback only, for the benchmark's own reads and
    /// writes. Never printed.
    #[arg(long, env = "TIDEPOOL_DIRECT_DATABASE_URL", hide_env_values = true)]
    direct_url: String,
    #[arg(long, default_value_t = 3)]
    workers: usize,
    #[arg(long, default_value_t = 10)]
    schedules: usize,
    /// `delay`: occurrences to measure.
    #[arg(long, default_value_t = 600)]
    occurrences: usize,
    /// `cost`: how long each round is measured.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    window: Duration,
    /// `cost` and `throughput`: rounds of each side.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// `throughput`: jobs per round.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Longest the whole run may take.
    #[arg(long, default_value = "1800s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
}

/// The command line, its URLs checked and parsed.
struct Options {
    args: Args,
    pooled: tokio_postgres::Config,
    direct: tokio_postgres::Config,
}

/// Records when it started, by this machine's clock, before anything else.
#[derive(Serialize, Deserialize)]
struct Stamp {}

impl Task for Stamp {
    const NAME: &'static str = "bench_stamp";
    type State = ();
    type Output = ();

    async fn run(self, ctx: TaskContext<()>) -> Result<(), TaskError> {
        let started = Utc::now();
        let conn = ctx.db.get().await?;
        conn.execute(
            "INSERT INTO bench_periodic_starts (job_id, started_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[(&ctx.job.id, Type::INT8), (&started, Type::TIMESTAMPTZ)],
        )
        .await?;
        Ok(())
    }
}

/// Does nothing (the demo's `noop`).
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

fn start_worker(
    options: &Options,
    name: String,
    concurrency: u32,
    batch_size: u32,
    schedules: Vec<Periodic>,
) -> Result<Running> {
    let mut registry = Registry::new().with::<Stamp>(())?.with::<Noop>(())?;
    for periodic in schedules {
        registry.periodic(periodic)?;
    }
    let settings = WorkerSettings { name, concurrency, batch_size, ..WorkerSettings::default() };
    Running::start(&options.pooled, &options.args.database_url, registry, settings)
}

/// Removes what earlier runs left: the benchmark's schedules, their
/// occurrences and their jobs, and the starts table's rows.
async fn clean(db: &tokio_postgres::Client) -> Result<()> {
    db.batch_execute(&format!(
        "{STARTS_TABLE};
         TRUNCATE bench_periodic_starts;
         DELETE FROM tidepool_schedules WHERE name LIKE 'bench-%';
         DELETE FROM tidepool_occurrences WHERE schedule LIKE 'bench-%';
         DELETE FROM tidepool_jobs WHERE task IN ('bench_stamp', 'noop');
         DELETE FROM tidepool_job_results WHERE task IN ('bench_stamp', 'noop');
         DELETE FROM tidepool_dead_jobs WHERE task IN ('bench_stamp', 'noop');"
    ))
    .await?;
    Ok(())
}

fn schedules(count: usize, period: Duration, queue: Option<&str>) -> Result<Vec<Periodic>> {
    (0..count)
        .map(|i| {
            let options = EnqueueOptions { queue: queue.map(str::to_owned), ..EnqueueOptions::default() };
            Ok(Periodic::with_options(&format!("bench-{i}"), Cadence::every(period)?, &Stamp {}, options)?)
        })
        .collect()
}

#[derive(Serialize)]
struct DelayReport {
    workers: usize,
    schedules: usize,
    occurrences: usize,
    /// Milliseconds from an occurrence's instant to its job's start.
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Occurrences with more than one job: 0.
    duplicates: i64,
    /// Who enqueued how many of them.
    enqueued_by: Vec<(String, i64)>,
}

async fn delay(options: &Options, db: &tokio_postgres::Client) -> Result<DelayReport> {
    let mut workers = Vec::new();
    for n in 0..options.args.workers {
        let schedules = schedules(options.args.schedules, Duration::from_secs(1), None)?;
        workers.push(start_worker(options, format!("bench-worker-{n}"), 50, 100, schedules)?);
    }
    // The occurrences that started, oldest first.
    let started = "SELECT o.scheduled_at, s.started_at FROM tidepool_occurrences o
                   JOIN bench_periodic_starts s USING (job_id)
                   WHERE o.schedule LIKE 'bench-%' ORDER BY o.scheduled_at, o.schedule LIMIT $1";
    let wanted = i64::try_from(options.args.occurrences)?;
    wait_until("the occurrences to start", || async {
        Ok(db.query(started, &[&wanted]).await?.len() >= options.args.occurrences)
    })
    .await?;
    for worker in workers {
        worker.stop().await?;
    }
    let rows = db.query(started, &[&wanted]).await?;
    let mut delays: Vec<f64> = rows
        .iter()
        .map(|r| {
            let (at, started): (DateTime<Utc>, DateTime<Utc>) = (r.get(0), r.get(1));
            (started - at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    let duplicates: i64 = db
        .query_one(
            "SELECT count(*) - count(DISTINCT (schedule, scheduled_at)) FROM tidepool_occurrences WHERE schedule LIKE 'bench-%'",
            &[],
        )
        .await?
        .get(0);
    let enqueued_by = db
        .query(
            "SELECT enqueued_by, count(*) FROM tidepool_occurrences WHERE schedule LIKE 'bench-%' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(DelayReport {
        workers: options.args.workers,
        schedules: options.args.schedules,
        occurrences: delays.len(),
        p50_ms: quantile(&delays, 0.50),
        p90_ms: quantile(&delays, 0.90),
        p99_ms: quantile(&delays, 0.99),
        max_ms: delays.last().copied().unwrap_or(0.0),
        duplicates,
        enqueued_by,
    })
}

/// PostgreSQL's counters for the app's database and `tidepool_schedules`,
/// and its processes' CPU ticks by pid.
#[derive(Debug, Clone, Default)]
struct Counters {
    transactions: i64,
    schedule_scans: i64,
    schedule_updates: i64,
    cpu_ticks: HashMap<u32, u64>,
}

async fn counters(db: &tokio_postgres::Client) -> Result<Counters> {
    db.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
    let row = db
        .query_one(
            "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()),
                    coalesce(seq_scan, 0) + coalesce(idx_scan, 0), n_tup_upd + n_tup_ins
             FROM pg_stat_user_tables WHERE relname = 'tidepool_schedules'",
            &[],
        )
        .await?;
    Ok(Counters {
        transactions: row.get(0),
        schedule_scans: row.get(1),
        schedule_updates: row.get(2),
        cpu_ticks: postgres_cpu_ticks()?,
    })
}

/// User and system CPU ticks of every `postgres` process, by pid, from /proc.
fn postgres_cpu_ticks() -> Result<HashMap<u32, u64>> {
    let mut ticks = HashMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Some(pid) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        let Some((name, rest)) = stat.split_once(") ") else { continue };
        if !name.ends_with("(postgres") {
            continue;
        }
        // After the name: state is field 3; utime and stime are 14 and 15.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks.insert(pid, field(14) + field(15));
    }
    Ok(ticks)
}

/// CPU seconds PostgreSQL's processes used from `before` to `after` (those
/// that were still running at `after`: the workers' connections stay open
/// through a window).
fn cpu_seconds(before: &Counters, after: &Counters) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = after
        .cpu_ticks
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.cpu_ticks.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / per_second
}

#[derive(Serialize)]
struct CostRound {
    schedules: usize,
    transactions_per_minute: f64,
    schedule_scans_per_minute: f64,
    schedule_rows_written_per_minute: f64,
    postgres_cpu_ms_per_minute: f64,
}

#[derive(Serialize)]
struct CostReport {
    workers: usize,
    window_seconds: f64,
    rounds: Vec<CostRound>,
}

async fn cost(options: &Options, db: &tokio_postgres::Client) -> Result<CostReport> {
    let mut rounds = Vec::new();
    for round in 0..options.args.rounds * 2 {
        let count = if round % 2 == 0 { 0 } else { options.args.schedules };
        let mut workers = Vec::new();
        for n in 0..options.args.workers {
            let schedules = schedules(count, Duration::from_secs(3600), None)?;
            workers.push(start_worker(options, format!("bench-worker-{n}"), 50, 100, schedules)?);
        }
        // Settled: every worker's first looks and declarations are done.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before = counters(db).await?;
        let started = Instant::now();
        tokio::time::sleep(options.args.window).await;
        let after = counters(db).await?;
        let minutes = started.elapsed().as_secs_f64() / 60.0;
        for worker in workers {
            worker.stop().await?;
        }
        rounds.push(CostRound {
            schedules: count,
            transactions_per_minute: (after.transactions - before.transactions) as f64 / minutes,
            schedule_scans_per_minute: (after.schedule_scans - before.schedule_scans) as f64 / minutes,
            schedule_rows_written_per_minute: (after.schedule_updates - before.schedule_updates) as f64
                / minutes,
            postgres_cpu_ms_per_minute: cpu_seconds(&before, &after) * 1000.0 / minutes,
        });
        clean(db).await?;
    }
    Ok(CostReport {
        workers: options.args.workers,
        window_seconds: options.args.window.as_secs_f64(),
        rounds,
    })
}

#[derive(Serialize)]
struct ThroughputRound {
    schedules: usize,
    jobs: usize,
    seconds: f64,
    jobs_per_second: f64,
}

#[derive(Serialize)]
struct ThroughputReport {
    rounds: Vec<ThroughputRound>,
}

async fn throughput(options: &Options, db: &tokio_postgres::Client) -> Result<ThroughputReport> {
    let mut rounds = Vec::new();
    let batch: Vec<NewJob> =
        (0..queue::MAX_BATCH).map(|_| NewJob::new("noop", serde_json::json!({}))).collect();
    for round in 0..options.args.rounds * 2 {
        let count = if round % 2 == 0 { 0 } else { options.args.schedules };
        let mut left = options.args.jobs;
        while left > 0 {
            let n = left.min(batch.len());
            queue::enqueue_many(db, &batch[..n]).await?;
            left -= n;
        }
        db.batch_execute("VACUUM ANALYZE tidepool_jobs").await?;
        let schedules = schedules(count, Duration::from_secs(60), Some(UNSERVED_QUEUE))?;
        let started = Instant::now();
        let worker = start_worker(options, "bench-worker".to_owned(), 2000, 1000, schedules)?;
        let jobs = options.args.jobs as u64;
        wait_until("the jobs to be worked", || std::future::ready(Ok(worker.succeeded() >= jobs))).await?;
        let seconds = started.elapsed().as_secs_f64();
        worker.stop().await?;
        rounds.push(ThroughputRound {
            schedules: count,
            jobs: options.args.jobs,
            seconds,
            jobs_per_second: jobs as f64 / seconds,
        });
        clean(db).await?;
    }
    Ok(ThroughputReport { rounds })
}

/// Runs the experiment `args` names and returns its report as JSON.
pub async fn run(args: Args) -> Result<serde_json::Value> {
    let pooled = crate::loopback_database(&args.database_url, "--database-url")?;
    let direct = crate::loopback_database(&args.direct_url, "--direct-url")?;
    let options = Options { args, pooled, direct };
    if options.args.workers == 0 || options.args.workers > 16 {
        bail!("--workers must be from 1 to 16");
    }
    if options.args.schedules > 1000 || options.args.rounds == 0 || options.args.rounds > 20 {
        bail!("--schedules must be at most 1000 and --rounds from 1 to 20");
    }
    if options.args.jobs == 0
        || options.args.jobs > 10_000_000
        || options.args.occurrences == 0
        || options.args.occurrences > 100_000
    {
        bail!("--jobs must be from 1 to 10,000,000 and --occurrences from 1 to 100,000");
    }
    let db = connect(&options.direct).await?;
    clean(&db).await?;
    let report = match options.args.experiment {
        Experiment::Delay => serde_json::to_value(delay(&options, &db).await?)?,
        Experiment::Cost => serde_json::to_value(cost(&options, &db).await?)?,
        Experiment::Throughput => serde_json::to_value(throughput(&options, &db).await?)?,
    };
    clean(&db).await?;
    Ok(report)
}
