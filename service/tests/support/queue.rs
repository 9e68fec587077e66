//! The queue's test harness: a database, a PgBouncer in transaction mode in
//! front of it, a client through it, and workers of the runtime started in
//! the test's own process (for the queue's and the periodic tasks' tests).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tidepool::db::{Database, PoolSettings};
use tidepool::metrics::WorkerMetrics;
use tidepool::queue::periodic::Clock;
use tidepool::queue::worker::QUEUE_POOL_SIZE;
use tidepool::queue::{self, JobState, JobView, NewJob, RetryPolicy, ShutdownReport, Worker};
use tidepool::settings::{DatabaseSettings, WorkerSettings};
use tidepool::task::Registry;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{wait_for, PgBouncer, TestDb};

/// A database, a PgBouncer in front of it, and a client through it.
pub struct Harness {
    pub db: TestDb,
    pub bouncer: PgBouncer,
    pub client: tokio_postgres::Client,
}

pub async fn harness(server_connections: u32) -> Result<Harness> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, server_connections).await?;
    let client = super::connect(&bouncer.url()).await?;
    Ok(Harness { db, bouncer, client })
}

impl Harness {
    pub async fn view(&self, id: i64) -> Result<Option<JobView>> {
        Ok(queue::lookup(&self.client, id).await?)
    }

    pub async fn wait_state(&self, id: i64, state: JobState, limit: Duration) -> Result<JobView> {
        wait_for(&format!("job {id} to be {state:?}"), limit, || async {
            self.view(id).await.ok().flatten().filter(|v| v.state == state)
        })
        .await
    }

    /// Waits until job `id` has left every table: it succeeded without a
    /// result to keep, or its record was pruned.
    pub async fn wait_gone(&self, id: i64, limit: Duration) -> Result<()> {
        wait_for(&format!("job {id} to leave every table"), limit, || async {
            self.view(id).await.ok().filter(Option::is_none).map(drop)
        })
        .await
    }

    pub async fn enqueue(&self, job: NewJob) -> Result<i64> {
        let enqueued = queue::enqueue_job(&self.client, &job).await?;
        if enqueued.duplicate {
            bail!("unexpected duplicate");
        }
        Ok(enqueued.id)
    }

    pub fn pool(&self, max_size: usize, metrics: &WorkerMetrics) -> Result<Database> {
        let settings = PoolSettings {
            max_size,
            wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(10),
        };
        Ok(Database::new(
            self.bouncer.url().parse::<tokio_postgres::Config>()?,
            settings,
            metrics.db_pool_wait.clone(),
        )?)
    }

    /// Starts a worker in this process.
    pub fn start_worker(&self, registry: Registry, settings: WorkerSettings) -> Result<RunningWorker> {
        let worker = self.new_worker(registry, settings, None)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        Ok(RunningWorker { stop: Some(stop), handle })
    }

    /// A worker through this harness's PgBouncer, with pools of its own,
    /// whose scheduler reads `clock` (the system's if `None`).
    pub fn new_worker(
        &self,
        registry: Registry,
        settings: WorkerSettings,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Worker> {
        let metrics = WorkerMetrics::new()?;
        let queue_db = self.pool(QUEUE_POOL_SIZE, &metrics)?;
        let task_db = self.pool(settings.concurrency as usize, &metrics)?;
        let settings = WorkerSettings { database: DatabaseSettings::new(self.bouncer.url()), ..settings };
        let worker = Worker::new(settings, Arc::new(registry), queue_db, task_db, metrics)?;
        Ok(match clock {
            Some(clock) => worker.with_clock(clock),
            None => worker,
        })
    }
}

pub struct RunningWorker {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<ShutdownReport>,
}

impl RunningWorker {
    pub async fn shutdown(mut self) -> Result<ShutdownReport> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), &mut self.handle)
            .await
            .context("worker shutdown")??)
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// A worker on a tokio runtime of its own, so that [`KillableWorker::kill`]
/// stops every task of it at once, as a killed process would: no shutdown,
/// its connections dropped.
pub struct KillableWorker {
    runtime: Option<Runtime>,
}

impl KillableWorker {
    pub fn start(
        h: &Harness,
        registry: Registry,
        settings: WorkerSettings,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let worker = h.new_worker(registry, settings, clock)?;
        runtime.spawn(worker.run(std::future::pending::<()>()));
        Ok(Self { runtime: Some(runtime) })
    }

    /// Stops every task of the worker where it is.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for KillableWorker {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Fast settings for tests: short lease, heartbeat, polls and backoff.
pub fn settings(name: &str) -> WorkerSettings {
    WorkerSettings {
        name: name.to_owned(),
        queues: vec!["default".to_owned()],
        concurrency: 10,
        batch_size: 100,
        lease: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(300),
        poll_interval_min: Duration::from_millis(10),
        poll_interval_max: Duration::from_millis(100),
        shutdown_timeout: Duration::from_secs(5),
        result_retention: Duration::from_secs(3600),
        dead_retention: Duration::from_secs(3600),
        maintenance_interval: Duration::from_millis(200),
        retry: RetryPolicy { base: Duration::from_millis(100), max: Duration::from_secs(1) },
        ..WorkerSettings::default()
    }
}
