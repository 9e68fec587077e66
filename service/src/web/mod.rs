//! `tidepool web`: a hyper HTTP/1.1 server on tokio.
//!
//! One process serves thousands of concurrent requests, the way gunicorn's
//! gevent worker does, because a request waiting on the database is a parked
//! future, not a blocked thread. What bounds it:
//! - open connections (`--max-connections`): the accept loop waits for a
//!   free slot, leaving new connections in the kernel's backlog;
//! - requests in flight (`--max-in-flight`) and the wait for a database
//!   connection (`--db-pool-wait`): past either, a fast 503;
//! - header and body read timeouts and a body size limit; a refused body
//!   is drained for a bounded time before the connection closes, so the
//!   client reads its 413 (see [`linger`]).
//!
//! At start, `/readyz` answers 503 until the database pool's connections are
//! open ([`warm_up`]), so the first burst does not pay for opening them.
//!
//! Shutdown follows what Kubernetes needs. At the first SIGTERM or SIGINT:
//! 1. `/readyz` answers 503 at once, while everything else is still served
//!    for `--drain-delay` (Endpoints and load balancers take that long to
//!    stop sending traffic);
//! 2. the listener closes: new connections are refused, idle keep-alive
//!    connections are closed, busy ones close after their current response;
//! 3. requests in flight get up to `--shutdown-timeout` to finish. The
//!    outcome ([`Shutdown`]) becomes the exit code.

pub mod linger;
pub mod response;
pub mod routes;
pub mod tasks;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::cli::WebArgs;
use crate::db::Database;
use crate::metrics::Metrics;
use crate::queue::Registry;
use crate::StartError;
use linger::{Linger, LingeringStream, UnreadBody};
pub use routes::App;

/// Client connections to PgBouncer when `--db-pool-size` is not given.
pub const DEFAULT_DB_POOL_SIZE: u32 = 20;
/// Largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How a graceful shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Every request in flight finished before the deadline.
    Clean,
    /// The deadline passed with connections still serving requests.
    DeadlineExceeded,
}

/// Limits of the HTTP layer, independent of the routes.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub linger: Linger,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
}

/// Builds the application state from the command line.
pub fn app_from_args(args: &WebArgs) -> Result<(App, ServerSettings), StartError> {
    let db_args = &args.database;
    let pg = db_args.password_file.apply(db_args.database_url.to_pg_config("DATABASE_URL")?)?;
    let metrics = Metrics::new()?;
    metrics.http_requests_in_flight_limit.set(i64::from(args.max_in_flight));
    // Each reason's series from the start at 0, so a rate sees the first shed.
    for reason in response::Shed::ALL {
        metrics.http_requests_shed.with_label_values(&[reason.label()]);
    }
    let db = Database::new(pg, db_args.pool_settings(DEFAULT_DB_POOL_SIZE), metrics.db_pool_wait.clone())?;
    let app = App {
        db,
        metrics,
        pooler: db_args.pooler_stats.admin_console()?,
        readiness_timeout: db_args.readiness_timeout,
        in_flight: Semaphore::new(args.max_in_flight as usize),
        registry: Arc::new(Registry::with_builtins()),
        max_body_bytes: args.max_body_bytes,
        body_read_timeout: args.body_read_timeout,
        starting: AtomicBool::new(true),
        draining: AtomicBool::new(false),
    };
    let settings = ServerSettings {
        max_connections: args.max_connections as usize,
        header_read_timeout: args.header_read_timeout,
        linger: Linger { timeout: args.lingering_close_timeout, max_bytes: args.lingering_close_max_bytes },
        drain_delay: args.drain_delay,
        shutdown_timeout: args.shutdown_timeout,
    };
    Ok((app, settings))
}

/// Opens the pool's connections, bounded by `limit`, then lets `/readyz`
/// answer: a pod takes traffic once its first burst will not wait for
/// connections to open. Runs while [`serve`] already answers `/healthz`.
pub async fn warm_up(app: Arc<App>, limit: Duration) {
    crate::db::warm_up(&[&app.db], limit).await.log("web");
    app.starting.store(false, Ordering::Relaxed);
    tracing::info!("tidepool web is ready");
}

/// Serves until `shutdown` resolves, then drains and shuts down as the
/// module describes.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) -> Shutdown {
    let connection_slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);

    let stop_accepting = async {
        shutdown.await;
        app.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            drain_delay = %humantime::format_duration(settings.drain_delay),
            "draining: /readyz answers 503; still serving until the listener closes"
        );
        tokio::time::sleep(settings.drain_delay).await;
    };
    tokio::pin!(stop_accepting);

    loop {
        let next = async {
            let slot = connection_slots.clone().acquire_owned().await;
            (slot, listener.accept().await)
        };
        let (slot, accepted) = tokio::select! {
            biased;
            () = &mut stop_accepting => break,
            next = next => next,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "could not set TCP_NODELAY");
        }
        let app = app.clone();
        let unread_body = UnreadBody::default();
        let stream = LingeringStream::new(stream, unread_body.clone(), settings.linger);
        let service = service_fn(move |request| routes::handle(app.clone(), unread_body.clone(), request));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }

    drop(listener);
    tracing::info!(
        deadline = %humantime::format_duration(settings.shutdown_timeout),
        "listener closed; waiting for requests in flight"
    );
    let outcome = match tokio::time::timeout(settings.shutdown_timeout, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("all requests finished; shutdown complete");
            Shutdown::Clean
        }
        Err(_) => {
            tracing::warn!(
                in_flight = app.metrics.http_requests_in_flight.get(),
                "shutdown deadline passed with requests still in flight"
            );
            Shutdown::DeadlineExceeded
        }
    };
    // Queries of requests that went away are being cancelled: see db's note
    // on PgBouncer before exiting with a cancel in flight.
    if !app.db.finish_cancels().await {
        tracing::warn!("exiting with a query cancel still in flight");
    }
    outcome
}
