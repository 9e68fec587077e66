//! Tidepool: a web tier and a task tier that run at high concurrency on
//! PostgreSQL without exhausting its connections, for applications to be
//! built on.
//!
//! An application is an [`Application`]: an [`axum::Router`] of its own,
//! typed [`task::Task`]s, its own [`migrate`] track and its state. Its
//! `main` hands it to [`run`], and its binary has the whole command line:
//! `web`, `worker`, `migrate`, `enqueue`, `pooler-config`.
//!
//! ```no_run
//! use std::process::ExitCode;
//! use tidepool::axum::{extract::Path, routing::get, Json, Router};
//! use tidepool::db::{Conn, Type};
//! use tidepool::web::ApiError;
//! use tidepool::Application;
//!
//! async fn greeting(Path(id): Path<i32>, conn: Conn) -> Result<Json<String>, ApiError> {
//!     let row = conn.query_opt("SELECT text FROM greetings WHERE id = $1", &[(&id, Type::INT4)]).await?;
//!     let row = row.ok_or_else(|| ApiError::not_found(format!("no greeting {id}")))?;
//!     Ok(Json(row.get(0)))
//! }
//!
//! fn main() -> ExitCode {
//!     tidepool::run(Application::new("greeter").routes(Router::new().route("/greetings/{id}", get(greeting))))
//! }
//! ```
//!
//! The design in one paragraph: one tokio process serves thousands of
//! concurrent HTTP requests ([`web`]), but only a few of them touch the
//! database at a time, through a small [`db`] pool of client connections to
//! a PgBouncer in *transaction* mode on loopback ([`pooler`] writes its
//! configuration). Every limit is explicit and bounded: requests in flight,
//! the wait for a database connection, the time a query may take; past a
//! limit the answer is a fast `503` with `Retry-After`, never an invisible
//! queue. Because PgBouncer hands a server connection to a client only for
//! one transaction, the database handles offer nothing that relies on
//! session state (see [`db`]).
//!
//! Modules:
//! - [`app`]: an application and [`run`], its command line.
//! - [`settings`]: the web and worker processes' settings as plain values.
//! - [`web`]: the HTTP server around the application's router.
//! - [`db`]: the PgBouncer-safe pool, connection and transaction handles.
//! - [`task`]: typed tasks and the registry a worker runs them from.
//! - [`queue`]: the PostgreSQL task queue: enqueue, look up, cancel, and
//!   the worker runtime.
//! - [`migrate`]: versioned migrations in tracks, Tidepool's and the
//!   application's.
//! - [`pooler`]: renders PgBouncer's configuration.
//! - [`metrics`]: the Prometheus metrics every process exports.
//! - [`testing`]: for an application's own tests: run one task, drain a
//!   queue, against a real database.
//!
//! Tidepool re-exports what an application writes against ([`axum`],
//! [`serde`], [`serde_json`], [`tokio`], [`tokio_postgres`], [`chrono`],
//! [`tracing`]), so a dependency on `tidepool` alone builds one. Its axum
//! has the `form`, `json`, `matched-path` and `query` features, not axum's
//! own server (Tidepool serves) nor `original-uri` (an insert and a URI
//! copy on every request); an application that wants another feature
//! depends on `axum = "0.8"` with it, and Cargo builds one axum with both.

#![warn(missing_docs)]

pub mod app;
mod cli;
pub mod db;
mod enqueue;
pub mod metrics;
pub mod migrate;
pub mod pooler;
mod pooler_metrics;
pub mod queue;
pub mod settings;
mod shutdown;
pub mod task;
mod telemetry;
pub mod testing;
pub mod tls;
pub mod web;
mod worker;

pub use app::{run, Application};
pub use {axum, chrono, serde, serde_json, tokio, tokio_postgres, tracing};

/// Why a server process (`web` or `worker`) could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings do not work.
    #[error(transparent)]
    Invalid(#[from] settings::InvalidSettings),
    /// An application route sits on one of Tidepool's own paths.
    #[error("the application has a route on {0}, which Tidepool serves itself (its probes and metrics: {paths}); move the route elsewhere", paths = web::RESERVED_PATHS.join(", "))]
    ReservedRoute(String),
    /// Two of the application's tasks share a name, or one is out of bounds.
    #[error(transparent)]
    Tasks(#[from] task::RegistryError),
    /// The port is taken.
    #[error("cannot listen on {addr}: {source} (is another process using port {}?)", .addr.port())]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A connection URL does not parse.
    #[error(transparent)]
    Url(#[from] settings::InvalidUrl),
    /// The password file cannot be read.
    #[error(transparent)]
    PasswordFile(#[from] settings::PasswordFileError),
    /// The pool cannot be built.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The metrics cannot be registered.
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

/// Raises the soft limit of open files to the hard limit: each client
/// connection is a file descriptor, and the usual soft limit of 1024 is far
/// below what one process can serve.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "raised the open files limit");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open files limit");
    }
}
