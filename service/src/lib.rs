//! Tidepool: a web tier and a task tier that run at high concurrency on
//! PostgreSQL without exhausting its connections.
//!
//! The crate is both the `tidepool` binary and a library. The design in one
//! paragraph: one tokio process serves thousands of concurrent HTTP requests
//! ([`web`]), but only a few of them touch the database at a time, through a
//! small [`db`] pool of client connections to a PgBouncer in *transaction*
//! mode on loopback ([`pooler`] writes its configuration). Every limit is
//! explicit and bounded: requests in flight, the wait for a database
//! connection, the time a query may take; past a limit the answer is a fast
//! `503` with `Retry-After`, never an invisible queue.
//!
//! Because PgBouncer hands a server connection to a client only for one
//! transaction, the code never relies on session state: no named prepared
//! statements outside a transaction (see [`db`]), no session `SET`, no session
//! advisory locks ([`migrate`] uses a transaction-scoped one).
//!
//! Modules:
//! - [`cli`]: the command line and environment knobs of every subcommand.
//! - [`db`]: the PgBouncer-safe connection pool and its error type.
//! - [`migrate`]: versioned, idempotent schema migrations.
//! - [`pooler`]: renders PgBouncer's configuration from a connection URL.
//! - [`queue`]: the PostgreSQL task queue: enqueue, the task registry and
//!   the `tidepool worker` runtime.
//! - [`web`]: the hyper server, its routes, limits and graceful shutdown.
//! - [`worker`]: the `tidepool worker` process around the queue runtime.
//! - [`enqueue`]: the `tidepool enqueue` command.
//! - [`metrics`]: the Prometheus metrics every process exports.
//! - [`pooler_metrics`]: PgBouncer's own figures, read from its admin
//!   console, under pgbouncer_exporter's names.
//! - [`telemetry`]: structured logging.

pub mod cli;
pub mod db;
pub mod enqueue;
pub mod metrics;
pub mod migrate;
pub mod pooler;
pub mod pooler_metrics;
pub mod queue;
pub mod shutdown;
pub mod telemetry;
pub mod web;
pub mod worker;

/// Why a server process (`tidepool web` or `tidepool worker`) could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid settings: {0}")]
    Invalid(String),
    #[error("cannot listen on {addr}: {source} (is another process using port {}?)", .addr.port())]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Url(#[from] cli::InvalidUrl),
    #[error(transparent)]
    PasswordFile(#[from] cli::PasswordFileError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("could not set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Binds `addr`, with a clear error when the port is taken.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
}

/// An error and its sources on one line, each cause added once: tokio-postgres
/// and std::io keep the useful part ("connection refused") in the source.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
