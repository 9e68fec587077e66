//! `tidepool-loadgen workflow`: the benchmarks of rate limits, workflows
//! and the worker's plain path (docs/benchmarks.md, section 22), with
//! workers of the runtime in this process ([`crate::inprocess`]) through
//! PgBouncer.
//!
//! - `throughput`: `--jobs` no-op jobs per round, worked by one and by two
//!   workers (`--concurrency` 2000, `--batch-size` 1000), by the bare loop
//!   on one and on two connections (the queue's own claim and completion
//!   statements back to back), and by one and two workers again with a
//!   rate-limited queue (`bench-metered`, 100 a second, a backlog that
//!   outlasts the round) and a chord of 1,000 members beside them, and by
//!   one worker that also serves an empty queue: a plain one, and one under
//!   a rate limit (present, unused); alternating, `--rounds` times.
//! - `precision`: a queue limited to `--limit` claims a second, served by
//!   `--workers` workers, for `--window`: the claims in the window, the most
//!   in any second (sliding), and per whole second.
//! - `chord`: a chord of `--members` members across `--workers` workers:
//!   from the last member's end to the callback's start.
//! - `latency`: `--rate` jobs a second, each enqueued by its own statement,
//!   for `--window`, one worker woken by LISTEN: enqueue-to-start (the
//!   first 2 s are the warm-up).
//!
//! The jobs, results and workflows of earlier runs are removed before and
//! after. Prints one JSON object.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tidepool::chrono::{DateTime, Utc};
use tidepool::queue::rate_limit::RateLimit;
use tidepool::queue::workflow::Workflow;
use tidepool::queue::{self, NewJob};
use tidepool::settings::WorkerSettings;
use tidepool::task::{Registry, Task, TaskContext, TaskError};

use crate::inprocess::{connect, quantile, wait_for_value, wait_until, Running};

/// The rate-limited queue that runs beside the throughput rounds.
const METERED_QUEUE: &str = "bench-metered";
/// Its limit.
const METERED_LIMIT: RateLimit = RateLimit::per_second(100);
/// Members of the chord that runs beside the throughput rounds.
const BESIDE_CHORD: usize = 1000;

/// Which benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Experiment {
    Throughput,
    Precision,
    Chord,
    Latency,
}

/// `tidepool-loadgen workflow`'s command line.
#[derive(clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    experiment: Experiment,
    /// The pooler the workers use, loopback only. Never printed.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// PostgreSQL itself, loopback only, for the benchmark's own reads and
    /// writes and for LISTEN. Never printed.
    #[arg(long, env = "TIDEPOOL_DIRECT_DATABASE_URL", hide_env_values = true)]
    direct_url: String,
    /// `precision` and `chord`: workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// `throughput`: jobs per round.
    #[arg(long, default_value_t = 200_000)]
    jobs: usize,
    /// `throughput`: each worker's concurrency.
    #[arg(long, default_value_t = 2000)]
    concurrency: u32,
    /// `throughput`: each worker's claim batch, and the bare loop's.
    #[arg(long, default_value_t = 1000)]
    batch_size: u32,
    /// `throughput`: only these ways (every way by default).
    #[arg(long, value_delimiter = ',')]
    ways: Vec<String>,
    /// `throughput`: rounds of each way.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// `precision`: claims a second.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// `precision` and `latency`: how long.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    window: Duration,
    /// `chord`: members.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// `latency`: jobs a second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Longest the whole run may take.
    #[arg(long, default_value = "3600s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
}

struct Options {
    args: Args,
    pooled: tokio_postgres::Config,
    direct: tokio_postgres::Config,
}

/// Does nothing.
#[derive(Clone, Serialize, Deserialize)]
struct Noop {}

impl Task for Noop {
    const NAME: &'static str = "noop";
    type State = ();
    type Output = ();

    async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
        Ok(())
    }
}

/// Ends at once, returning when it ended by this machine's clock; its
/// result (kept) has the claim time as its `started_at`.
#[derive(Serialize, Deserialize)]
struct Stamp {}

impl Task for Stamp {
    const NAME: &'static str = "bench_stamp";
    type State = ();
    type Output = DateTime<Utc>;

    async fn run(self, _: TaskContext<()>) -> Result<DateTime<Utc>, TaskError> {
        Ok(Utc::now())
    }
}

/// A chord's callback: returns, in milliseconds, from the latest of the
/// members' ends (their outputs) to its own start, by this machine's clock.
#[derive(Serialize, Deserialize)]
struct Gather {}

impl Task for Gather {
    const NAME: &'static str = "bench_gather";
    type State = ();
    type Output = serde_json::Value;

    async fn run(self, ctx: TaskContext<()>) -> Result<serde_json::Value, TaskError> {
        let started = Utc::now();
        let ends: Vec<Option<DateTime<Utc>>> = ctx.inputs().await?;
        let last = ends.iter().flatten().max().copied();
        let delay_ms = last.map(|last| (started - last).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        Ok(serde_json::json!({ "members": ends.len(), "delay_ms": delay_ms }))
    }
}

fn registry(limits: &[(&str, RateLimit)]) -> Result<Registry> {
    let mut registry = Registry::new().with::<Noop>(())?.with::<Stamp>(())?.with::<Gather>(())?;
    for (queue, limit) in limits {
        registry.rate_limit_queue(queue, *limit)?;
    }
    Ok(registry)
}

fn start(options: &Options, name: String, registry: Registry, settings: WorkerSettings) -> Result<Running> {
    Running::start(&options.pooled, &options.args.database_url, registry, WorkerSettings { name, ..settings })
}

async fn clean(db: &tokio_postgres::Client) -> Result<()> {
    db.batch_execute(
        "DELETE FROM tidepool_jobs WHERE task IN ('noop', 'bench_stamp', 'bench_gather');
         DELETE FROM tidepool_job_results WHERE task IN ('noop', 'bench_stamp', 'bench_gather');
         DELETE FROM tidepool_dead_jobs WHERE task IN ('noop', 'bench_stamp', 'bench_gather');
         DELETE FROM tidepool_group_outputs;
         DELETE FROM tidepool_groups;
         DELETE FROM tidepool_rate_limits WHERE key LIKE 'queue:bench-%';",
    )
    .await?;
    db.batch_execute("VACUUM ANALYZE tidepool_jobs").await?;
    Ok(())
}

async fn enqueue_copies(db: &tokio_postgres::Client, job: &NewJob, count: usize) -> Result<()> {
    let batch = vec![job.clone(); queue::MAX_BATCH.min(count)];
    let mut left = count;
    while left > 0 {
        let n = left.min(batch.len());
        queue::enqueue_many(db, &batch[..n]).await?;
        left -= n;
    }
    Ok(())
}

#[derive(Serialize)]
struct ThroughputRound {
    round: usize,
    way: &'static str,
    jobs: u64,
    seconds: f64,
    jobs_per_second: f64,
}

const WAYS: [&str; 8] = [
    "worker1",
    "worker2",
    "bare1",
    "bare2",
    "worker1_second",
    "worker1_unused",
    "worker1_beside",
    "worker2_beside",
];

/// The plain queue a `worker1_second` worker also serves, always empty.
const QUIET_QUEUE: &str = "bench-quiet";

async fn throughput(options: &Options, db: &tokio_postgres::Client) -> Result<Vec<ThroughputRound>> {
    let noop = NewJob::new("noop", serde_json::json!({}));
    let mut rounds = Vec::new();
    for round in 1..=options.args.rounds {
        for way in WAYS {
            if !options.args.ways.is_empty() && !options.args.ways.iter().any(|w| w == way) {
                continue;
            }
            clean(db).await?;
            enqueue_copies(db, &noop, options.args.jobs).await?;
            let beside = way.ends_with("_beside");
            if beside {
                let metered = noop.clone().queue(METERED_QUEUE);
                enqueue_copies(db, &metered, 100_000).await?;
                let members = vec![Noop {}; BESIDE_CHORD];
                queue::enqueue_workflow(db, &Workflow::chord(&members, &Gather {})?).await?;
            }
            db.batch_execute("VACUUM ANALYZE tidepool_jobs").await?;
            let started = Instant::now();
            let jobs = match way {
                "bare1" | "bare2" => {
                    let loops = if way == "bare1" { 1 } else { 2 };
                    let batch = i64::from(options.args.batch_size);
                    crate::queue_loop(&options.args.database_url, "default", loops, batch).await?.jobs
                }
                _ => {
                    let wanted = (options.args.jobs + if beside { BESIDE_CHORD + 1 } else { 0 }) as u64;
                    work_with_workers(options, way, wanted).await?
                }
            };
            let seconds = started.elapsed().as_secs_f64();
            rounds.push(ThroughputRound {
                round,
                way,
                jobs,
                seconds,
                jobs_per_second: jobs as f64 / seconds,
            });
        }
    }
    clean(db).await?;
    Ok(rounds)
}

/// Starts the workers of `way`, waits until they have worked `wanted` jobs
/// of the default queue, stops them, and gives the jobs they worked in all.
async fn work_with_workers(options: &Options, way: &'static str, wanted: u64) -> Result<u64> {
    let n = if way.starts_with("worker1") { 1 } else { 2 };
    // The limit is there (and its queue served), but nothing waits for it
    // unless the way runs something beside.
    let limited = way.ends_with("_beside") || way.ends_with("_unused");
    let limits: &[(&str, RateLimit)] = if limited { &[(METERED_QUEUE, METERED_LIMIT)] } else { &[] };
    let mut queues = vec!["default".to_owned()];
    if limited {
        queues.push(METERED_QUEUE.to_owned());
    } else if way.ends_with("_second") {
        queues.push(QUIET_QUEUE.to_owned());
    }
    let mut workers = Vec::new();
    for i in 0..n {
        let settings = WorkerSettings {
            concurrency: options.args.concurrency,
            batch_size: options.args.batch_size,
            queues: queues.clone(),
            ..Default::default()
        };
        workers.push(start(options, format!("bench-{way}-{i}"), registry(limits)?, settings)?);
    }
    let done = |workers: &[Running]| workers.iter().map(|w| w.succeeded_of("default")).sum::<u64>() >= wanted;
    wait_until("the round's jobs to be worked", || std::future::ready(Ok(done(&workers)))).await?;
    let jobs = workers.iter().map(Running::succeeded).sum();
    for worker in workers {
        worker.stop().await?;
    }
    Ok(jobs)
}

#[derive(Serialize)]
struct PrecisionReport {
    limit_per_second: u32,
    workers: usize,
    window_seconds: f64,
    /// Claims from the first claim to the end of the window.
    claims: usize,
    /// `limit_per_second` times the window.
    allowed: u64,
    /// The most claims in any one-second window, wherever it starts.
    max_in_any_second: usize,
    /// Claims in each whole second from the first claim.
    per_second: Vec<usize>,
}

async fn precision(options: &Options, db: &tokio_postgres::Client) -> Result<PrecisionReport> {
    let limit = options.args.limit;
    let queue_name = "bench-precise";
    let window = options.args.window;
    let job = NewJob::new("bench_stamp", serde_json::json!({})).queue(queue_name);
    enqueue_copies(db, &job, (f64::from(limit) * window.as_secs_f64() * 1.5) as usize).await?;
    let limits = [(queue_name, RateLimit::per_second(limit))];
    let mut workers = Vec::new();
    for i in 0..options.args.workers {
        let settings = WorkerSettings {
            concurrency: 50,
            batch_size: 100,
            queues: vec![queue_name.to_owned()],
            ..Default::default()
        };
        workers.push(start(options, format!("bench-precise-{i}"), registry(&limits)?, settings)?);
    }
    let first_claim = "SELECT min(started_at) FROM tidepool_job_results WHERE queue = 'bench-precise'";
    let first: DateTime<Utc> =
        wait_for_value("the first claim", || async { Ok(db.query_one(first_claim, &[]).await?.get(0)) })
            .await?;
    let end = first + tidepool::chrono::Duration::from_std(window)?;
    wait_until("the window to pass", || async {
        Ok(Utc::now() > end + tidepool::chrono::Duration::seconds(1))
    })
    .await?;
    for worker in workers {
        worker.stop().await?;
    }
    let starts: Vec<DateTime<Utc>> = db
        .query(
            "SELECT started_at FROM tidepool_job_results WHERE queue = 'bench-precise' AND started_at < $1 ORDER BY started_at",
            &[&end],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let second = tidepool::chrono::Duration::seconds(1);
    let mut max_in_any_second = 0;
    let mut j = 0;
    for i in 0..starts.len() {
        while j < starts.len() && starts[j] < starts[i] + second {
            j += 1;
        }
        max_in_any_second = max_in_any_second.max(j - i);
    }
    let buckets = window.as_secs() as usize;
    let mut per_second = vec![0; buckets];
    for t in &starts {
        let s = ((*t - first).num_milliseconds() / 1000) as usize;
        if s < buckets {
            per_second[s] += 1;
        }
    }
    clean(db).await?;
    Ok(PrecisionReport {
        limit_per_second: limit,
        workers: options.args.workers,
        window_seconds: window.as_secs_f64(),
        claims: starts.len(),
        allowed: u64::from(limit) * window.as_secs(),
        max_in_any_second,
        per_second,
    })
}

#[derive(Serialize)]
struct ChordReport {
    members: usize,
    workers: usize,
    /// From enqueue to the callback's end.
    seconds: f64,
    /// From the last member's end to the callback's start.
    last_member_to_callback_ms: f64,
}

async fn chord(options: &Options, db: &tokio_postgres::Client) -> Result<ChordReport> {
    let mut workers = Vec::new();
    for i in 0..options.args.workers {
        let settings = WorkerSettings { concurrency: 50, batch_size: 100, ..Default::default() };
        workers.push(start(options, format!("bench-chord-{i}"), registry(&[])?, settings)?);
    }
    let members = (0..options.args.members).map(|_| Stamp {}).collect::<Vec<_>>();
    let started = Instant::now();
    let chord = queue::enqueue_workflow(db, &Workflow::chord(&members, &Gather {})?).await?;
    let callback = "SELECT result FROM tidepool_job_results WHERE task = 'bench_gather' LIMIT 1";
    let result: serde_json::Value =
        wait_for_value("the callback", || async { Ok(db.query_opt(callback, &[]).await?.map(|r| r.get(0))) })
            .await?;
    let seconds = started.elapsed().as_secs_f64();
    for worker in workers {
        worker.stop().await?;
    }
    let members = result["members"].as_u64().unwrap_or(0) as usize;
    if members != options.args.members {
        bail!("workflow {}: the callback read {members} outputs, not {}", chord.id, options.args.members);
    }
    clean(db).await?;
    Ok(ChordReport {
        members,
        workers: options.args.workers,
        seconds,
        last_member_to_callback_ms: result["delay_ms"].as_f64().unwrap_or(f64::NAN),
    })
}

#[derive(Serialize)]
struct LatencyReport {
    rate: u32,
    jobs: usize,
    /// Milliseconds from enqueue (the job's `run_at`) to its claim.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn latency(options: &Options, db: &tokio_postgres::Client) -> Result<LatencyReport> {
    let settings = WorkerSettings { concurrency: 50, batch_size: 100, ..Default::default() };
    let worker = std::sync::Arc::new(start(options, "bench-latency".to_owned(), registry(&[])?, settings)?);
    // LISTEN on the direct connection, as `tidepool worker` does.
    let listener = {
        let worker = worker.clone();
        let direct = options.direct.clone();
        tokio::spawn(async move {
            let _ = tidepool::db::listen(
                direct,
                Duration::from_secs(5),
                "tidepool_jobs",
                || worker.wake(),
                |_| worker.wake(),
            )
            .await;
        })
    };
    let pooled = connect(&options.pooled).await?;
    let job = NewJob::new("bench_stamp", serde_json::json!({}));
    let total = (f64::from(options.args.rate) * options.args.window.as_secs_f64()) as usize;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(options.args.rate)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut first_measured = None;
    let warm_up = options.args.rate as usize * 2;
    for n in 0..total {
        ticks.tick().await;
        let id = queue::enqueue_job(&pooled, &job).await?.id;
        if n == warm_up {
            first_measured = Some(id);
        }
    }
    let from = first_measured.unwrap_or(0);
    let expected = i64::try_from(total.saturating_sub(warm_up))?;
    let count = "SELECT count(*) FROM tidepool_job_results WHERE task = 'bench_stamp' AND id >= $1";
    wait_until("the latency run's jobs", || async {
        Ok(db.query_one(count, &[&from]).await?.get::<_, i64>(0) >= expected)
    })
    .await?;
    listener.abort();
    if let Ok(worker) = std::sync::Arc::try_unwrap(worker) {
        worker.stop().await?;
    }
    let mut delays: Vec<f64> = db
        .query(
            "SELECT (extract(epoch FROM started_at - run_at) * 1000)::float8 FROM tidepool_job_results
             WHERE task = 'bench_stamp' AND id >= $1",
            &[&from],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    delays.sort_by(f64::total_cmp);
    clean(db).await?;
    Ok(LatencyReport {
        rate: options.args.rate,
        jobs: delays.len(),
        p50_ms: quantile(&delays, 0.5),
        p99_ms: quantile(&delays, 0.99),
        max_ms: delays.last().copied().unwrap_or(0.0),
    })
}

/// Runs the experiment `args` names and returns its report as JSON.
pub async fn run(args: Args) -> Result<serde_json::Value> {
    let pooled = crate::loopback_database(&args.database_url, "--database-url")?;
    let direct = crate::loopback_database(&args.direct_url, "--direct-url")?;
    if !(1..=16).contains(&args.workers) || !(1..=20).contains(&args.rounds) {
        bail!("--workers must be from 1 to 16 and --rounds from 1 to 20");
    }
    if !(1..=10_000_000).contains(&args.jobs)
        || !(1..=queue::workflow::MAX_STAGE_JOBS).contains(&args.members)
    {
        bail!("--jobs must be from 1 to 10,000,000 and --members from 1 to 10,000");
    }
    if !(1..=10_000).contains(&args.rate)
        || !(1..=10_000).contains(&args.limit)
        || args.window > Duration::from_secs(600)
    {
        bail!("--rate and --limit must be from 1 to 10,000 and --window at most 10 minutes");
    }
    RateLimit::per_second(args.limit).validate()?;
    let options = Options { args, pooled, direct };
    let db = connect(&options.direct).await?;
    clean(&db).await?;
    Ok(match options.args.experiment {
        Experiment::Throughput => serde_json::to_value(throughput(&options, &db).await?)?,
        Experiment::Precision => serde_json::to_value(precision(&options, &db).await?)?,
        Experiment::Chord => serde_json::to_value(chord(&options, &db).await?)?,
        Experiment::Latency => serde_json::to_value(latency(&options, &db).await?)?,
    })
}
