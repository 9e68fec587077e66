//! `tidepool worker`, the process: turns the command line into the queue
//! runtime's settings ([`crate::queue::worker`] does the work), opens its two
//! pools' connections before it claims its first job, and serves `/healthz`,
//! `/readyz` (200 once those connections are open, while an idle queue
//! connection answers `SELECT 1` or none is idle: [`Database::check`]) and
//! `/metrics` on its own port while it runs.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use crate::cli::WorkerArgs;
use crate::db::{self, Database, PoolSettings};
use crate::metrics::WorkerMetrics;
use crate::pooler_metrics::AdminConsole;
use crate::queue::job::{is_valid_queue_name, MAX_SCHEDULE_AHEAD};
use crate::queue::retry::RetryPolicy;
use crate::queue::worker::QUEUE_POOL_SIZE;
use crate::queue::{Registry, ShutdownReport, Worker, WorkerSettings};
use crate::web::response::{json, with_body, ApiError, Body};
use crate::StartError;

/// Connections the probe server serves at once; more wait in the backlog.
const PROBE_CONNECTIONS: usize = 64;
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks the command line and builds the runtime's settings. `name`
/// identifies this worker in the jobs it holds.
pub fn settings_from_args(args: &WorkerArgs, name: String) -> Result<WorkerSettings, StartError> {
    let invalid = |m: String| Err(StartError::Invalid(m));
    let mut queues: Vec<String> = Vec::new();
    for queue in &args.queues {
        let queue = queue.trim();
        if !is_valid_queue_name(queue) {
            return invalid(format!(
                "queue {queue:?} is not a valid name: use 1 to 64 of a-z, A-Z, 0-9, '_', '-', '.'"
            ));
        }
        if !queues.iter().any(|q| q == queue) {
            queues.push(queue.to_owned());
        }
    }
    if queues.is_empty() {
        return invalid("--queues names no queue".into());
    }
    if args.heartbeat_interval.is_zero() || args.heartbeat_interval * 2 > args.lease {
        return invalid(format!(
            "--heartbeat-interval ({}) must be above zero and at most half of --lease ({}), so a lease is renewed at least twice before it expires",
            humantime::format_duration(args.heartbeat_interval),
            humantime::format_duration(args.lease)
        ));
    }
    if args.poll_interval_min.is_zero() || args.poll_interval_min > args.poll_interval_max {
        return invalid("--poll-interval-min must be above zero and at most --poll-interval-max".into());
    }
    if args.maintenance_interval.is_zero() {
        return invalid("--maintenance-interval must be above zero".into());
    }
    if args.result_retention > MAX_SCHEDULE_AHEAD || args.dead_retention > MAX_SCHEDULE_AHEAD {
        return invalid("--result-retention and --dead-retention are at most 366 days".into());
    }
    if args.retry_base.is_zero() || args.retry_base > args.retry_max {
        return invalid("--retry-base must be above zero and at most --retry-max".into());
    }
    Ok(WorkerSettings {
        name,
        queues,
        concurrency: args.concurrency as usize,
        batch_size: args.batch_size as usize,
        lease: args.lease,
        heartbeat_interval: args.heartbeat_interval,
        poll_interval_min: args.poll_interval_min,
        poll_interval_max: args.poll_interval_max,
        shutdown_timeout: args.shutdown_timeout,
        result_retention: args.result_retention,
        dead_retention: args.dead_retention,
        maintenance_interval: args.maintenance_interval,
        retry: RetryPolicy { base: args.retry_base, max: args.retry_max },
    })
}

/// `host-pid`: unique among live workers, and says where to look.
pub fn default_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "worker".to_owned()
    };
    format!("{host}-{}", std::process::id())
}

/// Runs a worker with `registry`'s tasks until `shutdown` resolves and the
/// runtime has shut down.
pub async fn run(
    args: &WorkerArgs,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<ShutdownReport, StartError> {
    let settings = settings_from_args(args, default_name())?;
    let password = &args.database.password_file;
    let pg = password.apply(args.database.database_url.to_pg_config("DATABASE_URL")?)?;
    let direct_pg = match &args.direct_database_url {
        Some(url) => Some(password.apply(url.to_pg_config("TIDEPOOL_DIRECT_DATABASE_URL")?)?),
        None => None,
    };
    let metrics = WorkerMetrics::new()?;
    metrics.start_counters(registry.task_names(), &settings.queues);
    let task_pool = args.database.pool_settings(args.concurrency);
    let queue_pool = PoolSettings { max_size: QUEUE_POOL_SIZE, ..task_pool.clone() };
    let task_db = Database::new(pg.clone(), task_pool, metrics.db_pool_wait.clone())?;
    let queue_db = Database::new(pg, queue_pool, metrics.queue_db_pool_wait.clone())?;
    let probe_listener = crate::bind(args.listen).await?;

    tracing::info!(listen = %args.listen, "worker /healthz, /readyz and /metrics are serving; opening database connections");
    let (stop_probes, probes_stopped) = watch::channel(false);
    let probe_state = Arc::new(ProbeState {
        metrics: metrics.clone(),
        pooler: args.database.pooler_stats.admin_console()?,
        task_db: task_db.clone(),
        queue_db: queue_db.clone(),
        readiness_timeout: args.database.readiness_timeout,
        ready: AtomicBool::new(false),
    });
    let probes = tokio::spawn(serve_probes(probe_listener, probe_state.clone(), probes_stopped));
    let limit = args.database.db_connect_timeout;
    db::warm_up(&[&queue_db, &task_db], limit).await.log("worker");
    probe_state.ready.store(true, Ordering::Relaxed);
    tracing::info!(concurrency = settings.concurrency, queues = ?settings.queues, "tidepool worker is ready");
    let queues = settings.queues.clone();
    let worker = Worker::new(settings, Arc::new(registry), queue_db, task_db, metrics);
    let listening = direct_pg.map(|pg| {
        tokio::spawn(listen_for_jobs(pg, args.database.db_connect_timeout, queues, worker.waker()))
    });
    let report = worker.run(shutdown).await;
    if let Some(task) = listening {
        task.abort();
    }
    let _ = stop_probes.send(true);
    let _ = probes.await;
    Ok(report)
}

/// Pauses between attempts to re-open the listening connection.
const LISTEN_RETRY_MIN: Duration = Duration::from_secs(1);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

/// Keeps a LISTEN session open on the direct connection and wakes the
/// claimer for notifications about its queues (and after each reconnect,
/// in case one was missed). Failures only cost latency: the worker polls.
async fn listen_for_jobs(
    pg: tokio_postgres::Config,
    timeout: Duration,
    queues: Vec<String>,
    wake: Arc<Notify>,
) {
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
}

async fn serve_probes(listener: TcpListener, state: Arc<ProbeState>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(PROBE_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(PROBE_HEADER_TIMEOUT);
    loop {
        let next = async {
            let slot = slots.clone().acquire_owned().await;
            (slot, listener.accept().await)
        };
        let (slot, accepted) = tokio::select! {
            _ = stop.changed() => return,
            next = next => next,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        let service = service_fn(move |request| probe(state.clone(), request));
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
}

async fn probe(state: Arc<ProbeState>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let jobs_running = state.metrics.jobs_running.get();
    let response = match request.uri().path() {
        _ if request.method() != http::Method::GET => ApiError::method_not_allowed("GET").into_response(),
        "/healthz" => json(StatusCode::OK, &Health { status: "ok", jobs_running, error: None }),
        "/readyz" if state.ready.load(Ordering::Relaxed) => {
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
        "/readyz" => {
            json(StatusCode::SERVICE_UNAVAILABLE, &Health { status: "starting", jobs_running, error: None })
        }
        "/metrics" => match state.metrics.render(state.task_db.status()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(extra: &[&str]) -> WorkerArgs {
        let mut argv = vec!["tidepool", "worker", "--database-url", "postgres://u@h/db"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(|cli| cli.command) {
            Ok(Command::Worker(args)) => args,
            other => panic!("not a worker command line: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_match_the_seed() {
        let settings = settings_from_args(&args(&[]), "w".into()).expect("defaults are valid");
        assert_eq!(settings.concurrency, 50);
        assert_eq!(settings.queues, vec!["default".to_owned()]);
        assert!(settings.heartbeat_interval * 2 <= settings.lease);
    }

    #[test]
    fn queues_are_validated_and_deduplicated() {
        let settings = settings_from_args(&args(&["--queues", "a,b, a"]), "w".into()).expect("valid");
        assert_eq!(settings.queues, vec!["a".to_owned(), "b".to_owned()]);
        let err = settings_from_args(&args(&["--queues", "a,b c"]), "w".into()).expect_err("space");
        assert!(err.to_string().contains("\"b c\""), "{err}");
    }

    #[test]
    fn the_heartbeat_must_fit_twice_in_the_lease() {
        let err = settings_from_args(&args(&["--lease", "10s", "--heartbeat-interval", "6s"]), "w".into())
            .expect_err("too slow a heartbeat");
        assert!(err.to_string().contains("at most half of --lease"), "{err}");
        assert!(
            settings_from_args(&args(&["--lease", "10s", "--heartbeat-interval", "5s"]), "w".into()).is_ok()
        );
    }

    #[test]
    fn other_bounds_are_checked() {
        for bad in [
            &["--poll-interval-min", "2s", "--poll-interval-max", "1s"][..],
            &["--retry-base", "2h"],
            &["--result-retention", "400days"],
            &["--maintenance-interval", "0s"],
        ] {
            assert!(settings_from_args(&args(bad), "w".into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_name_names_host_and_process() {
        assert!(default_name().ends_with(&format!("-{}", std::process::id())));
    }
}
