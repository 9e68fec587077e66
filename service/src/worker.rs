//! The `worker` process: validates its [`WorkerSettings`] (the queue
//! runtime, [`crate::queue::worker`], does the work), opens its two
//! pools' connections before it claims its first job, and serves `/healthz`
//! (503 while the claim loop is stalled: [`Liveness`]; never for a database
//! outage), `/readyz` (200 once those connections are open, while an idle queue
//! connection answers `SELECT 1` or none is idle: [`Database::check`]) and
//! `/metrics` on its own port while it runs.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tidepool_contract::server::{self, Limits};
use tidepool_contract::{HEALTH_PATH, METRICS_PATH, READY_PATH};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::db::{self, Database, DbError, PoolSettings};
use crate::metrics::WorkerMetrics;
use crate::pooler_metrics::AdminConsole;
use crate::queue::worker::{Liveness, QUEUE_POOL_SIZE};
use crate::queue::{ShutdownReport, Worker};
use crate::settings::{apply_password_file, WorkerSettings};
use crate::task::Registry;
use crate::web::response::{json, with_body, ApiError, Body};
use crate::StartError;

/// Connections the probe server serves at once; more wait in the backlog.
const PROBE_LIMITS: Limits = Limits { connections: 64, header_read_timeout: Duration::from_secs(10) };

/// Runs a worker with `registry`'s tasks until `shutdown` resolves and the
/// runtime has shut down. `settings` are validated first.
pub async fn run(
    settings: WorkerSettings,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<ShutdownReport, StartError> {
    let settings = settings.normalized()?;
    let database = &settings.database;
    let pg = database.pg_config()?;
    let direct_pg = match &settings.direct_database_url {
        Some(url) => {
            let mut target = url.to_connection("TIDEPOOL_DIRECT_DATABASE_URL")?;
            target.pg = apply_password_file(
                target.pg,
                settings.direct_password_file.as_deref().or(database.password_file.as_deref()),
            )?;
            Some(target)
        }
        None => None,
    };
    let metrics = WorkerMetrics::new()?;
    metrics.start_counters(registry.task_names(), &settings.queues);
    let (task_db, queue_db) = pools(&settings, pg, &metrics)?;
    let pooler = database.pooler_stats.as_ref().map(|stats| stats.admin_console()).transpose()?;
    let probe_listener = crate::bind(settings.listen).await?;

    tracing::info!(listen = %settings.listen, "worker /healthz, /readyz and /metrics are serving; opening database connections");
    let (stop_probes, probes_stopped) = watch::channel(false);
    let probe_state = Arc::new(ProbeState {
        metrics: metrics.clone(),
        pooler,
        task_db: task_db.clone(),
        queue_db: queue_db.clone(),
        readiness_timeout: database.readiness_timeout,
        ready: AtomicBool::new(false),
        liveness: OnceLock::new(),
    });
    let probes = tokio::spawn(serve_probes(probe_listener, probe_state.clone(), probes_stopped));
    let limit = database.connect_timeout;
    db::warm_up(&[&queue_db, &task_db], limit).await.log("worker");
    probe_state.ready.store(true, Ordering::Relaxed);
    tracing::info!(concurrency = settings.concurrency, queues = ?settings.queues, "tidepool worker is ready");
    let queues = settings.queues.clone();
    let worker = Worker::new(settings, Arc::new(registry), queue_db, task_db, metrics)?;
    let _ = probe_state.liveness.set(worker.liveness());
    let listening = direct_pg.map(|pg| tokio::spawn(listen_for_jobs(pg, limit, queues, worker.waker())));
    let report = worker.run(shutdown).await;
    if let Some(task) = listening {
        task.abort();
    }
    let _ = stop_probes.send(true);
    let _ = probes.await;
    Ok(report)
}

/// A worker's two pools on `pg`: its tasks' (`--concurrency` connections)
/// and its own for the queue's statements ([`QUEUE_POOL_SIZE`]).
pub(crate) fn pools(
    settings: &WorkerSettings,
    pg: db::Target,
    metrics: &WorkerMetrics,
) -> Result<(Database, Database), DbError> {
    let task_pool = settings.database.pool_settings(settings.concurrency);
    let queue_pool = PoolSettings { max_size: QUEUE_POOL_SIZE, ..task_pool.clone() };
    let task_db = Database::new(pg.clone(), task_pool, metrics.db_pool_wait.clone())?;
    let queue_db = Database::new(pg, queue_pool, metrics.queue_db_pool_wait.clone())?;
    Ok((task_db, queue_db))
}

/// Pauses between attempts to re-open the listening connection.
const LISTEN_RETRY_MIN: Duration = Duration::from_secs(1);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

/// Keeps a LISTEN session open on the direct connection and wakes the
/// claimer for notifications about its queues (and after each reconnect,
/// in case one was missed). Failures only cost latency: the worker polls.
async fn listen_for_jobs(pg: db::Target, timeout: Duration, queues: Vec<String>, wake: Arc<Notify>) {
    let mut pause = LISTEN_RETRY_MIN;
    loop {
        let mut connected = false;
        let listening = || {
            tracing::info!("listening for new jobs on the direct connection");
            connected = true;
            wake.notify_one();
        };
        let on_notify = |queue: &str| {
            if queues.iter().any(|q| q == queue) {
                wake.notify_one();
            }
        };
        match db::listen(pg.clone(), timeout, "tidepool_jobs", listening, on_notify).await {
            Err(e) => {
                tracing::warn!(error = %e, retry_in = %humantime::format_duration(pause), "LISTEN connection failed; polling until it is back")
            }
            Ok(never) => match never {},
        }
        if connected {
            pause = LISTEN_RETRY_MIN;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LISTEN_RETRY_MAX);
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    jobs_running: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What the probe server reads.
struct ProbeState {
    metrics: WorkerMetrics,
    /// The sidecar's admin console, for the `pgbouncer_*` series.
    pooler: Option<AdminConsole>,
    task_db: Database,
    /// Checked by `/readyz`: the pool that claims jobs, idle most of the time.
    queue_db: Database,
    readiness_timeout: Duration,
    /// Set once the pools' connections are open: `/readyz` answers 200.
    ready: AtomicBool,
    /// The claim loop's, once the worker is made: `/healthz` answers 503
    /// while it is stalled.
    liveness: OnceLock<Arc<Liveness>>,
}

async fn serve_probes(listener: TcpListener, state: Arc<ProbeState>, mut stop: watch::Receiver<bool>) {
    let handler = move |request| probe(state.clone(), request);
    server::serve(listener, PROBE_LIMITS, handler, async move {
        let _ = stop.changed().await;
    })
    .await;
}

async fn probe(state: Arc<ProbeState>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let jobs_running = state.metrics.jobs_running.get();
    let response = match request.uri().path() {
        _ if request.method() != http::Method::GET => ApiError::method_not_allowed("GET").into_response(),
        HEALTH_PATH => match state.liveness.get().map(|l| l.check()) {
            Some(Err(stalled)) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &Health { status: "stalled", jobs_running, error: Some(stalled.to_string()) },
            ),
            _ => json(StatusCode::OK, &Health { status: "ok", jobs_running, error: None }),
        },
        READY_PATH if state.ready.load(Ordering::Relaxed) => {
            match state.queue_db.check(state.readiness_timeout).await {
                Ok(health) => {
                    json(StatusCode::OK, &Health { status: health.as_str(), jobs_running, error: None })
                }
                Err(e) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &Health { status: "unavailable", jobs_running, error: Some(e.to_string()) },
                ),
            }
        }
        READY_PATH => {
            json(StatusCode::SERVICE_UNAVAILABLE, &Health { status: "starting", jobs_running, error: None })
        }
        METRICS_PATH => match state.metrics.render(state.task_db.status()) {
            Ok(mut body) => {
                if let Some(pooler) = &state.pooler {
                    body.extend_from_slice(pooler.render().await.as_bytes());
                }
                with_body(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
            }
            Err(e) => ApiError::internal(format!("could not encode metrics: {e}")).into_response(),
        },
        path => ApiError::not_found(path).into_response(),
    };
    Ok(response)
}
