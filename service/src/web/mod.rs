//! The `web` process: an application's [`axum::Router`] behind Tidepool's
//! hyper HTTP/1.1 server on tokio.
//!
//! One process serves thousands of concurrent requests, the way gunicorn's
//! gevent worker does, because a request waiting on the database is a parked
//! future, not a blocked thread. The application writes ordinary axum
//! handlers; what Tidepool adds around its router, for every request:
//! - open connections are bounded (`--max-connections`): the accept loop
//!   (the one every Tidepool server shares, [`tidepool_contract::server`])
//!   waits for a free slot, leaving new connections in the kernel's backlog;
//! - the body is read before routing, within a size and a time limit
//!   (413, 408); a refused body is drained for a bounded time before the
//!   connection closes, so the client reads its answer (a lingering close);
//! - requests in flight are bounded (`--max-in-flight`): past it, an
//!   immediate 503 with `Retry-After`;
//! - a path matches its route with or without a trailing slash;
//! - a handler that panics answers 500 (counted in
//!   `tidepool_http_handler_panics_total`) and the process goes on;
//! - error answers are JSON (`{"error": ...}`): axum's own 404, 405 and
//!   extractor rejections (plain text or empty) are rewritten as such;
//! - every answer is counted and timed by route *template* (`/orders/{id}`,
//!   never the raw path; requests no route serves are `unmatched`);
//! - a handler gets its database connection as an extractor ([`Conn`]):
//!   the pool wait's bound becomes 503 with `Retry-After`, the query timeout
//!   cancels the query on the server and becomes 504.
//!
//! `/healthz`, `/readyz` and `/metrics` are Tidepool's (probes skip the
//! in-flight limit, so a busy pod is neither restarted nor pulled from its
//! Service for being busy); an application route on one of them, or on its
//! trailing-slash twin, is refused at start-up ([`StartError::ReservedRoute`]).
//!
//! At start, `/readyz` answers 503 until the database pool's connections are
//! open ([`warm_up`]), so the first burst does not pay for opening them.
//!
//! Shutdown follows what Kubernetes needs. At the first SIGTERM or SIGINT:
//! 1. `/readyz` answers 503 at once, while everything else is still served
//!    for `--drain-delay` (Endpoints and load balancers take that long to
//!    stop sending traffic), each answer with `Connection: close`;
//! 2. the listener closes: new connections are refused, idle keep-alive
//!    connections are closed, busy ones close after their current response;
//! 3. requests in flight get up to `--shutdown-timeout` to finish. The
//!    outcome ([`Shutdown`]) becomes the exit code.

mod linger;
mod request;
pub mod response;
mod routing;
pub mod tasks;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::FromRequestParts;
use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::db::{Conn, Database};
use crate::metrics::Metrics;
use crate::pooler_metrics::AdminConsole;
use crate::settings::{WebSettings, DEFAULT_WEB_DB_POOL_SIZE};
use crate::task::Registry;
use crate::StartError;
use linger::{Linger, LingeringStream, UnreadBody};
pub use response::{ApiError, Body};
pub use routing::RESERVED_PATHS;
pub use tasks::tasks_api;
use tidepool_contract::server::{accept, Limits};

/// Largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How a graceful shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Every request in flight finished before the deadline.
    Clean,
    /// The deadline passed with connections still serving requests.
    DeadlineExceeded,
}

/// A web process ready to serve: the application's router prepared, its
/// pool and metrics. Build it with [`Server::new`], then [`serve`] it.
pub struct Server {
    router: axum::Router,
    db: Database,
    registry: Arc<Registry>,
    metrics: Metrics,
    pooler: Option<AdminConsole>,
    settings: WebSettings,
    in_flight: Semaphore,
    /// Set until the pool's connections are open ([`warm_up`]): `/readyz`
    /// answers 503 until then.
    starting: AtomicBool,
    /// Set at the first shutdown signal: `/readyz` answers 503 from then on.
    draining: AtomicBool,
}

impl Server {
    /// Validates `settings`, checks that `router` leaves Tidepool's paths
    /// alone, and builds the pool (no connection opens yet). `registry` is
    /// the application's tasks, for [`tasks_api`].
    pub async fn new(
        router: axum::Router,
        registry: Registry,
        settings: WebSettings,
    ) -> Result<Self, StartError> {
        settings.validate()?;
        if let Some(path) = routing::reserved_route_taken(&router).await {
            return Err(StartError::ReservedRoute(path));
        }
        let metrics = Metrics::new()?;
        metrics.http_requests_in_flight_limit.set(i64::from(settings.max_in_flight));
        // Each reason's series from the start at 0, so a rate sees the first shed.
        for reason in response::Shed::ALL {
            metrics.http_requests_shed.with_label_values(&[reason.label()]);
        }
        let database = &settings.database;
        let db = Database::new(
            database.pg_config()?,
            database.pool_settings(DEFAULT_WEB_DB_POOL_SIZE),
            metrics.db_pool_wait.clone(),
        )?;
        let pooler = database.pooler_stats.as_ref().map(|stats| stats.admin_console()).transpose()?;
        Ok(Self {
            router: routing::prepare(router, settings.max_body_bytes),
            db,
            registry: Arc::new(registry),
            metrics,
            pooler,
            in_flight: Semaphore::new(settings.max_in_flight as usize),
            settings,
            starting: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        })
    }

    /// The process's pool.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Where it is to listen.
    pub fn listen(&self) -> std::net::SocketAddr {
        self.settings.listen
    }
}

/// Opens the pool's connections, bounded by the connect timeout, then lets
/// `/readyz` answer: a pod takes traffic once its first burst will not wait
/// for connections to open. Runs while [`serve`] already answers `/healthz`.
pub async fn warm_up(server: Arc<Server>) {
    crate::db::warm_up(&[&server.db], server.settings.database.connect_timeout).await.log("web");
    server.starting.store(false, Ordering::Relaxed);
    tracing::info!("tidepool web is ready");
}

/// Serves on `listener` until `shutdown` resolves, then drains and shuts
/// down as the module describes.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    shutdown: impl Future<Output = ()>,
) -> Shutdown {
    let settings = &server.settings;
    let linger =
        Linger { timeout: settings.lingering_close_timeout, max_bytes: settings.lingering_close_max_bytes };
    let graceful = GracefulShutdown::new();
    let limits = Limits {
        connections: settings.max_connections as usize,
        header_read_timeout: settings.header_read_timeout,
    };
    let mut http = tidepool_contract::server::http1(&limits);
    http.max_buf_size(MAX_HEAD_BYTES).keep_alive(true);

    let stop_accepting = async {
        shutdown.await;
        server.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            drain_delay = %humantime::format_duration(settings.drain_delay),
            "draining: /readyz answers 503; still serving until the listener closes"
        );
        tokio::time::sleep(settings.drain_delay).await;
    };

    accept(&listener, limits.connections, stop_accepting, |stream, peer| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "could not set TCP_NODELAY");
        }
        let server = server.clone();
        let unread_body = UnreadBody::default();
        let stream = LingeringStream::new(stream, unread_body.clone(), linger);
        let service =
            service_fn(move |request| request::handle(server.clone(), unread_body.clone(), request));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connection.map(move |ended| {
            if let Err(e) = ended {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        })
    })
    .await;

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
                in_flight = server.metrics.http_requests_in_flight.get(),
                "shutdown deadline passed with requests still in flight"
            );
            Shutdown::DeadlineExceeded
        }
    };
    // Queries of requests that went away are being cancelled: see db's note
    // on PgBouncer before exiting with a cancel in flight.
    if !server.db.finish_cancels().await {
        tracing::warn!("exiting with a query cancel still in flight");
    }
    outcome
}

/// The server of the request a handler serves.
fn current_server() -> Result<Arc<Server>, ApiError> {
    routing::current_server().ok_or_else(|| {
        ApiError::internal("this handler needs Tidepool's server: serve the router with tidepool::web::serve")
    })
}

/// A pooled connection for the handler, waiting at most the pool wait:
/// past it the request is shed with 503 and `Retry-After`.
impl<S: Send + Sync> FromRequestParts<S> for Conn {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(current_server()?.db.get().await?)
    }
}
