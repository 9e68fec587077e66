//! What the in-process benchmarks (`periodic`, `workflow`) share: workers
//! of the runtime ([`tidepool::queue::Worker`], each with pools of its own,
//! as a `tidepool worker` process has) started and stopped in this process,
//! bounded waits and quantiles.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use std::sync::Arc;
use tidepool::db::{Database, PoolSettings};
use tidepool::metrics::{counter_total, counter_total_with, WorkerMetrics};
use tidepool::queue::worker::QUEUE_POOL_SIZE;
use tidepool::queue::Worker;
use tidepool::settings::{DatabaseSettings, WorkerSettings};
use tidepool::task::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Longest any wait of a run.
pub const WAIT_LIMIT: Duration = Duration::from_secs(900);

/// A worker running in this process until stopped.
pub struct Running {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
    metrics: WorkerMetrics,
    waker: Arc<tokio::sync::Notify>,
}

impl Running {
    /// Starts a worker of `registry` with `settings` through `pooled`
    /// (`url` is the same, as text, for the settings), its pools sized as
    /// `tidepool worker` sizes them.
    pub fn start(
        pooled: &tokio_postgres::Config,
        url: &str,
        registry: Registry,
        settings: WorkerSettings,
    ) -> Result<Self> {
        let metrics = WorkerMetrics::new()?;
        let pool = |max_size: usize| -> Result<Database> {
            let settings = PoolSettings {
                max_size,
                wait: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(5),
                query_timeout: Duration::from_secs(30),
            };
            Ok(Database::new(pooled.clone(), settings, metrics.db_pool_wait.clone())?)
        };
        let concurrency = settings.concurrency as usize;
        let settings = WorkerSettings { database: DatabaseSettings::new(url.to_owned()), ..settings };
        let worker = Worker::new(
            settings,
            Arc::new(registry),
            pool(QUEUE_POOL_SIZE)?,
            pool(concurrency)?,
            metrics.clone(),
        )?;
        let waker = worker.waker();
        let (stop, mut stopped) = watch::channel(false);
        let handle = tokio::spawn(async move {
            worker
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok(Self { stop, handle, metrics, waker })
    }

    /// Shuts it down as `tidepool worker` does on SIGTERM.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(60), self.handle).await.context("a worker's shutdown")??;
        Ok(())
    }

    /// Jobs it recorded as succeeded.
    pub fn succeeded(&self) -> u64 {
        counter_total(&self.metrics.jobs_succeeded)
    }

    /// Jobs of `queue` it recorded as succeeded.
    pub fn succeeded_of(&self, queue: &str) -> u64 {
        counter_total_with(&self.metrics.jobs_succeeded, "queue", queue)
    }

    /// Cuts its claimer's pause short (what a LISTEN notification does).
    pub fn wake(&self) {
        self.waker.notify_one();
    }
}

pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Polls `done` every 20 ms until it holds, at most [`WAIT_LIMIT`].
pub async fn wait_until<F, Fut>(what: &str, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    wait_for_value(what, || {
        let done = done();
        async move { Ok(done.await?.then_some(())) }
    })
    .await
}

/// Polls `value` every 20 ms until it gives one, at most [`WAIT_LIMIT`].
pub async fn wait_for_value<T, F, Fut>(what: &str, mut value: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(value) = value().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {WAIT_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `q` quantile of sorted `values` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
