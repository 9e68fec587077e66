//! Database access that stays correct behind PgBouncer in transaction mode.
//!
//! PgBouncer lends a server connection to a client for one transaction only.
//! Anything that outlives a transaction on the server is therefore unsafe:
//! session `SET`, session advisory locks, `LISTEN`, and named prepared
//! statements. The last one is the trap: tokio-postgres' `Client::query(&str)`
//! prepares a *named* statement in one round trip and executes it in another,
//! and outside a transaction the two can land on different servers
//! ("prepared statement does not exist"). PgBouncer 1.18, Debian bookworm's,
//! has no prepared statement support at all.
//!
//! So the handles this module lends, [`Conn`] and its transaction [`Tx`],
//! offer nothing else than what is safe there:
//! - only unnamed statements whose parameter types are given, sent in one
//!   round trip (tokio-postgres' `query_typed`), inside a transaction too:
//!   PgBouncer runs no `server_reset_query` in transaction mode, so a named
//!   statement prepared inside a transaction would stay on that server
//!   connection and collide with the next client's of the same name;
//! - no statement cache (deadpool's `prepare_cached` is never used);
//! - no session state: transactions are the unit, and they end (commit,
//!   roll back, or roll back when the [`Tx`] is dropped) before the
//!   connection goes back to the pool.
//!
//! Result columns must be of built-in types: for an enum, a domain or a
//! composite tokio-postgres looks the type up with a named statement (cast
//! such columns to `text`).
//!
//! ```no_run
//! # async fn example(db: tidepool::db::Database) -> Result<(), tidepool::db::DbError> {
//! use tidepool::db::Type;
//!
//! let mut conn = db.get().await?;
//! let tx = conn.transaction().await?;
//! tx.execute("UPDATE accounts SET balance = balance - $1 WHERE id = $2", &[(&10_i64, Type::INT8), (&1_i64, Type::INT8)])
//!     .await?;
//! tx.commit().await?;
//! # Ok(())
//! # }
//! ```
//!
//! At start a process opens its pools' connections, and the pooler's server
//! connections behind them, before it says it is ready ([`warm_up`]).
//!
//! Every wait is bounded: the wait for a pooled connection
//! ([`DbError::PoolExhausted`]), opening one ([`DbError::Unavailable`]) and a
//! query ([`DbError::QueryTimeout`]). A query that is abandoned, by its
//! timeout or because the request that ran it went away, is cancelled on the
//! server and its connection is discarded rather than returned to the pool
//! with a reply still pending.
//!
//! Cancelling through PgBouncer 1.18 needs care: tokio-postgres'
//! `CancelToken::cancel_query` writes the CancelRequest and shuts its socket
//! at once, and PgBouncer 1.18 drops a cancel whose sender hung up before it
//! was forwarded (measured: the statement ran to its end). The cancel here does
//! what libpq does: it sends the request, then waits for the pooler to close
//! the connection. Worse, PgBouncer before 1.20 *crashes* (FATAL "bad client
//! state: 0", pgbouncer#801, fixed by pgbouncer#846) when a cancel request's
//! connection is closed by its sender before PgBouncer has finished with it,
//! which is what exiting with a cancel in flight does. So a process calls
//! [`Database::finish_cancels`] before it exits.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use prometheus::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_postgres::config::Host;
pub use tokio_postgres::types::{ToSql, Type};
pub use tokio_postgres::Row;
use tokio_postgres::{AsyncMessage, CancelToken, Client, NoTls, SimpleQueryMessage, Transaction};

use crate::tls::{MakeRustlsConnect, RustlsStream, SslMode, TlsSettings};

/// Longest a best-effort cancel request may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Parameters of a statement, each with its PostgreSQL type:
/// `&[(&id, Type::INT8), (&name, Type::TEXT)]`.
pub type Params<'a> = &'a [(&'a (dyn ToSql + Sync), Type)];

/// Why a database call failed. In a web handler each becomes its status:
/// 503 with `Retry-After` for the first two, 504 for a timeout, 500 else.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No pooled connection became free within the pool wait.
    #[error("no database connection became free within {}", humantime::format_duration(*.waited))]
    PoolExhausted {
        /// How long the caller waited.
        waited: Duration,
    },
    /// PgBouncer or PostgreSQL cannot be reached.
    #[error("the database is unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// The statement outlived its bound; it was cancelled on the server.
    #[error("the database did not answer within {}", humantime::format_duration(*.after))]
    QueryTimeout {
        /// The bound.
        after: Duration,
    },
    /// The statement failed (a constraint, a syntax error).
    #[error("database query failed: {0}")]
    Query(#[source] tokio_postgres::Error),
    /// `query_one` found no row.
    #[error("the query returned no row")]
    NoRow,
    /// The pool could not be built.
    #[error("invalid pool configuration: {0}")]
    Config(String),
}

impl DbError {
    /// The error of a statement that failed: unavailable when it says the
    /// database cannot be reached, else a query error.
    pub fn from_statement(e: tokio_postgres::Error) -> Self {
        if is_unavailable(&e) {
            Self::unavailable_because(&e)
        } else {
            Self::Query(e)
        }
    }

    /// The SQLSTATE of a failed statement (`23505` for a unique violation).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Query(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    fn unavailable(reason: impl std::fmt::Display) -> Self {
        Self::Unavailable { reason: reason.to_string() }
    }

    fn unavailable_because(e: &(dyn std::error::Error + 'static)) -> Self {
        Self::Unavailable { reason: crate::error_chain(e) }
    }
}

/// Where a connection goes: tokio-postgres' settings, and the TLS it is
/// made with ([`crate::tls`]: libpq's `sslmode` meanings).
#[derive(Debug, Clone)]
pub struct Target {
    /// Host, port, user, database, password, timeouts.
    pub pg: tokio_postgres::Config,
    /// The `sslmode` and its files.
    pub tls: TlsSettings,
}

impl std::str::FromStr for Target {
    type Err = crate::settings::InvalidUrl;

    /// A `postgres://` URL with libpq's TLS parameters, or a key=value
    /// string (its `sslmode` as tokio-postgres reads it).
    fn from_str(url: &str) -> Result<Target, Self::Err> {
        crate::settings::SecretUrl::new(url).to_connection("the database URL")
    }
}

impl From<tokio_postgres::Config> for Target {
    /// The config with the `sslmode` it names (tokio-postgres knows
    /// `disable`, `prefer` and `require`), verifying nothing.
    fn from(pg: tokio_postgres::Config) -> Target {
        let mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        Target { pg, tls: TlsSettings { mode, ..TlsSettings::default() } }
    }
}

/// How the pool of client connections to PgBouncer behaves.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most client connections.
    pub max_size: usize,
    /// Longest wait for a free one.
    pub wait: Duration,
    /// Longest to open one.
    pub connect_timeout: Duration,
    /// Longest a statement may take beyond its expected duration.
    pub query_timeout: Duration,
}

/// How long [`warm_up`] waits for the pooler to grant one more
/// server connection before it concludes that the pooler's cap is reached.
/// PgBouncer opens one in a few milliseconds (and retries a refused login
/// after `server_login_retry`, 1 s in Tidepool's configuration).
pub const WARM_UP_STALL: Duration = Duration::from_secs(1);

enum WarmUpEvent {
    Connected,
    Failed,
    InTransaction,
}

/// What [`warm_up`] got done.
#[derive(Debug)]
pub struct WarmUp {
    /// Client connections opened, now idle in the pool.
    pub open: usize,
    /// Server connections the pooler held for them at once.
    pub server_connections: usize,
    /// The pool's size.
    pub wanted: usize,
    /// Why some were not opened, if any were not.
    pub error: Option<DbError>,
}

impl WarmUp {
    /// One log line: info when every client connection opened, else a
    /// warning with the reason (the rest open on demand).
    pub fn log(&self, pool: &'static str) {
        let (open, server_connections, wanted) = (self.open, self.server_connections, self.wanted);
        match &self.error {
            None => tracing::info!(pool, open, server_connections, "database connections open"),
            Some(e) => tracing::warn!(
                pool,
                open,
                server_connections,
                wanted,
                error = %e,
                "not every database connection opened at start; the rest open on demand"
            ),
        }
    }
}

/// What [`Database::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// An idle connection ran `SELECT 1`.
    Ready,
    /// Every connection is lent out: nothing to check without waiting.
    Busy,
}

impl Health {
    /// Its name in `/readyz`'s answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ready => "ready",
            Health::Busy => "busy",
        }
    }
}

/// A snapshot of the pool, as deadpool reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Most connections.
    pub max_size: usize,
    /// Connections open.
    pub size: usize,
    /// Open and idle.
    pub available: usize,
    /// Callers waiting for one.
    pub waiting: usize,
}

/// The pool of client connections to PgBouncer.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    settings: PoolSettings,
    wait_seconds: Histogram,
    /// Where cancel requests go: the pooler's host and port. Shared, as
    /// every checkout carries it.
    cancel_target: Option<Arc<CancelTarget>>,
}

/// The host and port a cancel request is sent to, and the requests in flight.
#[derive(Debug)]
struct CancelTarget {
    host: String,
    port: u16,
    in_flight: AtomicUsize,
    finished: Notify,
}

impl Database {
    /// Builds the pool; no connection is opened until one is needed.
    /// `wait_seconds` observes every wait for a connection.
    pub fn new(
        target: impl Into<Target>,
        settings: PoolSettings,
        wait_seconds: Histogram,
    ) -> Result<Self, DbError> {
        let Target { mut pg, tls } = target.into();
        pg.connect_timeout(settings.connect_timeout);
        let connector = tls.connector(&mut pg).map_err(|e| DbError::Config(e.to_string()))?;
        let cancel_target = match (pg.get_hosts().first(), pg.get_ports().first()) {
            (Some(Host::Tcp(host)), port) => Some(Arc::new(CancelTarget {
                host: host.clone(),
                port: port.copied().unwrap_or(5432),
                in_flight: AtomicUsize::new(0),
                finished: Notify::new(),
            })),
            _ => None,
        };
        let manager =
            Manager::from_config(pg, connector, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(settings.max_size)
            .wait_timeout(Some(settings.wait))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Self { pool, settings, wait_seconds, cancel_target })
    }

    /// A pooled connection, waiting at most the configured pool wait.
    pub async fn get(&self) -> Result<Conn, DbError> {
        let started = Instant::now();
        let conn = self.checkout().await;
        self.wait_seconds.observe(started.elapsed().as_secs_f64());
        conn
    }

    /// [`Database::get`] without the wait histogram.
    async fn checkout(&self) -> Result<Conn, DbError> {
        let object = self.pool.get().await.map_err(|e| self.pool_error(e))?;
        Ok(self.lend(object, self.settings.query_timeout))
    }

    fn lend(&self, object: Object, query_timeout: Duration) -> Conn {
        Conn {
            object: Some(object),
            guard: Guard { query_timeout, state: AtomicU8::new(ConnState::Idle as u8) },
            cancel_target: self.cancel_target.clone(),
        }
    }

    fn pool_error(&self, e: PoolError) -> DbError {
        match e {
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                DbError::PoolExhausted { waited: self.settings.wait }
            }
            PoolError::Timeout(_) => DbError::unavailable(format!(
                "no connection to the pooler within {}",
                humantime::format_duration(self.settings.connect_timeout)
            )),
            PoolError::Backend(e) => DbError::unavailable_because(&e),
            e => DbError::unavailable(e),
        }
    }

    /// Waits until the cancel requests this pool started have finished (each
    /// is bounded by its own timeout). Call it before the process exits: see
    /// the module's note on PgBouncer. Returns whether none was left.
    pub async fn finish_cancels(&self) -> bool {
        let Some(target) = &self.cancel_target else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + CANCEL_TIMEOUT + Duration::from_secs(1);
        loop {
            let finished = target.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if target.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return false;
            }
        }
    }

    /// Whether queries can run, for readiness probes, without waiting
    /// behind a saturated pool: with every connection lent out the process
    /// is busy, not broken ([`Health::Busy`]); otherwise an idle connection
    /// runs `SELECT 1` through PgBouncer within `timeout`. PgBouncer gives it
    /// a server connection at once, as a pod's pools add up to its
    /// PgBouncer's pool. It fails while PgBouncer or PostgreSQL is down and
    /// recovers by itself when both are back.
    pub async fn check(&self, timeout: Duration) -> Result<Health, DbError> {
        let no_wait = Timeouts { wait: Some(Duration::ZERO), create: Some(timeout), recycle: Some(timeout) };
        let checked = tokio::time::timeout(timeout, async {
            let object = match self.pool.timeout_get(&no_wait).await {
                Ok(object) => object,
                Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => return Ok(Health::Busy),
                Err(e) => return Err(self.pool_error(e)),
            };
            let conn = self.lend(object, timeout);
            let messages = conn.run(Duration::ZERO, conn.client().simple_query("SELECT 1")).await?;
            if messages.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))) {
                Ok(Health::Ready)
            } else {
                Err(DbError::unavailable("SELECT 1 returned no row"))
            }
        });
        checked.await.map_err(|_| DbError::QueryTimeout { after: timeout })?
    }

    /// A snapshot of the pool.
    pub fn status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus { max_size: s.max_size, size: s.size, available: s.available, waiting: s.waiting }
    }
}

/// Opens every connection of `pools` (a process's pools, together, as they
/// share the pooler's server connections) before traffic arrives, so the
/// first burst of requests or jobs does not wait for them to open.
///
/// Two levels are opened: the client connections to the pooler (TCP and
/// authentication), and behind them the pooler's server connections to
/// PostgreSQL, which PgBouncer opens on demand, one login at a time.
/// Each connection begins a transaction and holds it until all of them
/// are in one, so the pooler has to give each its own server
/// connection; then all commit and go back to the pool idle. The hold
/// ends early when the pooler grants no server connection for
/// [`WARM_UP_STALL`] (its cap is below the pool's size) and at `limit`
/// in any case; what is not open by then opens on demand. A connection
/// still in its transaction at `limit` is discarded, never pooled. The
/// pool-wait histogram does not see these checkouts.
pub async fn warm_up(pools: &[&Database], limit: Duration) -> WarmUp {
    let deadline = tokio::time::Instant::now() + limit;
    let wanted = pools.iter().map(|db| db.settings.max_size).sum();
    let (progress, mut events) = tokio::sync::mpsc::unbounded_channel::<WarmUpEvent>();
    let (release, released) = tokio::sync::watch::channel(false);
    let mut opening = tokio::task::JoinSet::new();
    for db in pools.iter().flat_map(|db| std::iter::repeat(*db).take(db.settings.max_size)) {
        let (db, progress, mut released) = (db.clone(), progress.clone(), released.clone());
        opening.spawn(async move {
            let conn = db.checkout().await;
            let _ = progress.send(if conn.is_ok() { WarmUpEvent::Connected } else { WarmUpEvent::Failed });
            let conn = conn?;
            let hold = async {
                conn.client().batch_execute("BEGIN").await?;
                let _ = progress.send(WarmUpEvent::InTransaction);
                let _ = released.wait_for(|released| *released).await;
                conn.client().batch_execute("COMMIT").await
            };
            conn.run(limit, hold).await?;
            Ok::<Conn, DbError>(conn)
        });
    }
    drop(progress);
    // Client connections open in parallel, each bounded by the connect
    // timeout; server connections one at a time, so a stall in those is
    // watched for only once every client connection has settled.
    let (mut settled, mut in_transaction) = (0, 0);
    while in_transaction < wanted {
        let stalled = async {
            if settled == wanted {
                tokio::time::sleep(WARM_UP_STALL).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            event = events.recv() => match event {
                Some(WarmUpEvent::Connected | WarmUpEvent::Failed) => settled += 1,
                Some(WarmUpEvent::InTransaction) => in_transaction += 1,
                None => break,
            },
            () = stalled => break,
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let _ = release.send(true);
    // Every connection is held until all are done: one returned early
    // would be handed to the next checkout instead of a new one opening.
    let mut open = Vec::with_capacity(wanted);
    let mut error = None;
    let collect = async {
        while let Some(joined) = opening.join_next().await {
            match joined {
                Ok(Ok(conn)) => open.push(conn),
                Ok(Err(e)) => error = Some(e),
                Err(e) => error = Some(DbError::unavailable(e)),
            }
        }
    };
    if tokio::time::timeout_at(deadline, collect).await.is_err() && error.is_none() {
        error = Some(DbError::unavailable(format!(
            "not every connection opened within {}",
            humantime::format_duration(limit)
        )));
    }
    WarmUp { open: open.len(), server_connections: in_transaction, wanted, error }
}

/// A connection borrowed from the pool. Returned to the pool when dropped,
/// unless it broke (then it is closed) or it was dropped in the middle of a
/// query, by a timeout or because the request that ran it went away (then
/// the query is cancelled and the connection closed).
///
/// Every statement is unnamed and bounded by the query timeout (plus what
/// it is expected to take, for [`Conn::query_slow`]). In a web handler it
/// is an extractor: the pool wait's bound answers 503 with `Retry-After`.
pub struct Conn {
    /// Always `Some` until `drop`, which alone takes it.
    object: Option<Object>,
    guard: Guard,
    cancel_target: Option<Arc<CancelTarget>>,
}

/// What bounds a connection's statements, apart from its client so that a
/// transaction borrowing the client can use it too.
struct Guard {
    query_timeout: Duration,
    /// A [`ConnState`]; atomic so statements can run through `&self` while
    /// the client is borrowed.
    state: AtomicU8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum ConnState {
    Idle = 0,
    InQuery = 1,
    Broken = 2,
}

impl Guard {
    fn set(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Awaits `statement` bounded by `expected` plus the query timeout; an
    /// abandoned statement stays `InQuery`, so the connection's drop cancels
    /// it; a statement that says the database is gone marks it broken.
    async fn run<T>(
        &self,
        expected: Duration,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
        closed: impl Fn() -> bool,
    ) -> Result<T, DbError> {
        let budget = expected.saturating_add(self.query_timeout);
        self.set(ConnState::InQuery);
        match tokio::time::timeout(budget, statement).await {
            Ok(Ok(value)) => {
                self.set(ConnState::Idle);
                Ok(value)
            }
            Ok(Err(e)) if is_unavailable(&e) || closed() => {
                self.set(ConnState::Broken);
                Err(DbError::unavailable_because(&e))
            }
            Ok(Err(e)) => {
                self.set(ConnState::Idle);
                Err(DbError::Query(e))
            }
            // Still `InQuery`: the query is cancelled when the conn drops.
            Err(_) => Err(DbError::QueryTimeout { after: budget }),
        }
    }
}

impl Conn {
    /// The underlying client. Crate-internal: it offers named statements,
    /// which the module's rules forbid.
    pub(crate) fn client(&self) -> &Client {
        match &self.object {
            Some(object) => object,
            None => unreachable!("the pooled object is taken only in drop"),
        }
    }

    /// Runs a statement and returns its rows.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
        self.query_slow(sql, params, Duration::ZERO).await
    }

    /// [`Conn::query`] for a statement meant to take `expected` (a slow
    /// query's sleep): the query timeout is added to it.
    pub async fn query_slow(
        &self,
        sql: &str,
        params: Params<'_>,
        expected: Duration,
    ) -> Result<Vec<Row>, DbError> {
        self.run(expected, self.client().query_typed(sql, params)).await
    }

    /// The one row of a statement; [`DbError::NoRow`] without one.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
        self.query_opt(sql, params).await?.ok_or(DbError::NoRow)
    }

    /// The first row of a statement, if any.
    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// Runs a statement and returns how many rows it changed.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        self.run(Duration::ZERO, execute(self.client(), sql, params)).await
    }

    /// Begins a transaction. It ends with [`Tx::commit`] or
    /// [`Tx::rollback`]; dropped before either, it rolls back.
    pub async fn transaction(&mut self) -> Result<Tx<'_>, DbError> {
        let Conn { object, guard, .. } = self;
        let Some(object) = object.as_mut() else { unreachable!("the pooled object is taken only in drop") };
        let client: &mut Client = object;
        let tx = guard.run(Duration::ZERO, client.transaction(), || false).await?;
        Ok(Tx { tx, guard })
    }

    /// Awaits `statement`, a future that uses [`Conn::client`] (for example
    /// a function of [`crate::queue`]'s SQL), under the same rules as
    /// [`Conn::query`]: bounded by `expected` plus the query timeout,
    /// cancelled on the server if abandoned, the connection discarded if it
    /// broke.
    pub(crate) async fn run<T>(
        &self,
        expected: Duration,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        self.guard.run(expected, statement, || self.client().is_closed()).await
    }
}

/// A transaction on a [`Conn`]: the same unnamed, bounded statements, and
/// whatever it enqueues ([`crate::queue::enqueue`]) exists only if it
/// commits. Dropped without [`Tx::commit`] it rolls back.
pub struct Tx<'a> {
    tx: Transaction<'a>,
    guard: &'a Guard,
}

impl Tx<'_> {
    /// Runs a statement and returns its rows.
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
        self.run(Duration::ZERO, self.tx.query_typed(sql, params)).await
    }

    /// The one row of a statement; [`DbError::NoRow`] without one.
    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
        self.query_opt(sql, params).await?.ok_or(DbError::NoRow)
    }

    /// The first row of a statement, if any.
    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// Runs a statement and returns how many rows it changed.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        self.run(Duration::ZERO, execute(self.tx.client(), sql, params)).await
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), DbError> {
        let Tx { tx, guard } = self;
        guard.run(Duration::ZERO, tx.commit(), || false).await
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), DbError> {
        let Tx { tx, guard } = self;
        guard.run(Duration::ZERO, tx.rollback(), || false).await
    }

    async fn run<T>(
        &self,
        expected: Duration,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        self.guard.run(expected, statement, || self.tx.client().is_closed()).await
    }
}

/// An unnamed statement's changed-row count.
async fn execute(client: &Client, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let rows = client.query_typed_raw(sql, params.iter().map(|(value, ty)| (*value, ty.clone()))).await?;
    futures_util::pin_mut!(rows);
    while rows.try_next().await?.is_some() {}
    Ok(rows.rows_affected().unwrap_or(0))
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for tokio_postgres::Client {}
    impl Sealed for tokio_postgres::Transaction<'_> {}
    impl Sealed for super::Conn {}
    impl Sealed for super::Tx<'_> {}
}

/// A statement's future, boxed: what [`Executor`] takes and gives.
pub type StatementFuture<'a, T, E = tokio_postgres::Error> =
    Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'a>>;

/// Where Tidepool's statements (an enqueue, a lookup) can run: a [`Conn`]
/// or [`Tx`], bounded and cancelled as they are, or a plain tokio-postgres
/// `Client` or `Transaction`, unbounded. Sealed: the queue's statements
/// rely on every implementation sending unnamed statements only.
pub trait Executor: sealed::Sealed + Sync {
    #[doc(hidden)]
    fn query_unnamed<'a>(&'a self, sql: &'a str, params: Params<'a>) -> StatementFuture<'a, Vec<Row>>;

    #[doc(hidden)]
    fn bounded<'a, T: Send + 'a>(
        &'a self,
        statement: StatementFuture<'a, T>,
    ) -> StatementFuture<'a, T, DbError>;
}

/// A plain tokio-postgres client or transaction: statements unbounded,
/// their errors classified.
macro_rules! unbounded_executor {
    ($($client:ty),*) => {$(
        impl Executor for $client {
            fn query_unnamed<'a>(&'a self, sql: &'a str, params: Params<'a>) -> StatementFuture<'a, Vec<Row>> {
                Box::pin(self.query_typed(sql, params))
            }

            fn bounded<'a, T: Send + 'a>(
                &'a self,
                statement: StatementFuture<'a, T>,
            ) -> StatementFuture<'a, T, DbError> {
                Box::pin(async move { statement.await.map_err(DbError::from_statement) })
            }
        }
    )*};
}

unbounded_executor!(Client, Transaction<'_>);

impl Executor for Conn {
    fn query_unnamed<'a>(&'a self, sql: &'a str, params: Params<'a>) -> StatementFuture<'a, Vec<Row>> {
        Box::pin(self.client().query_typed(sql, params))
    }

    fn bounded<'a, T: Send + 'a>(
        &'a self,
        statement: StatementFuture<'a, T>,
    ) -> StatementFuture<'a, T, DbError> {
        Box::pin(self.run(Duration::ZERO, statement))
    }
}

impl Executor for Tx<'_> {
    fn query_unnamed<'a>(&'a self, sql: &'a str, params: Params<'a>) -> StatementFuture<'a, Vec<Row>> {
        Box::pin(self.tx.query_typed(sql, params))
    }

    fn bounded<'a, T: Send + 'a>(
        &'a self,
        statement: StatementFuture<'a, T>,
    ) -> StatementFuture<'a, T, DbError> {
        Box::pin(self.run(Duration::ZERO, statement))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        match *self.guard.state.get_mut() {
            s if s == ConnState::Idle as u8 => return drop(object),
            s if s == ConnState::InQuery as u8 => {}
            _ => return drop(Object::take(object)),
        }
        // Detached from the pool, the client closes when the task below ends:
        // PgBouncer routes a cancel only for a client it still has.
        let client = Object::take(object);
        let token = client.cancel_token();
        let Some(target) = self.cancel_target.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        target.in_flight.fetch_add(1, Ordering::SeqCst);
        runtime.spawn(async move {
            match tokio::time::timeout(CANCEL_TIMEOUT, cancel(&token, &target)).await {
                Ok(Ok(())) => tracing::debug!("cancelled an abandoned query"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not cancel an abandoned query"),
                Err(_) => tracing::warn!("cancelling an abandoned query timed out"),
            }
            drop(client);
            target.in_flight.fetch_sub(1, Ordering::SeqCst);
            target.finished.notify_waiters();
        });
    }
}

/// Sends a cancel request for `token` to `target` (host, port) and waits,
/// as libpq does, until the pooler closes the connection: PgBouncer 1.18
/// ignores a cancel whose sender has already hung up.
async fn cancel(token: &CancelToken, target: &CancelTarget) -> Result<(), std::io::Error> {
    let mut stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
    token.cancel_query_raw(KeepOpen(&mut stream), NoTls).await.map_err(std::io::Error::other)?;
    let mut rest = [0u8; 64];
    while stream.read(&mut rest).await? > 0 {}
    Ok(())
}

/// A stream whose shutdown does nothing, so `cancel_query_raw` leaves the
/// socket open for [`cancel`] to wait on.
struct KeepOpen<'a>(&'a mut TcpStream);

impl AsyncRead for KeepOpen<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for KeepOpen<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Whether `e` says the database cannot be reached, rather than that the
/// statement failed: a closed connection, SQLSTATE class 08 (connection
/// exception, also what PgBouncer reports when it cannot reach the server),
/// or PostgreSQL shutting down or starting up.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_some_and(|state| {
            let code = state.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        })
}

/// A connection that is not in a pool, and its client.
type Unpooled =
    (Client, tokio_postgres::Connection<tokio_postgres::Socket, RustlsStream<tokio_postgres::Socket>>);

/// Opens one connection, bounded by `timeout` (TCP, TLS and login), and
/// hands back its client and the connection to drive.
async fn open(target: Target, timeout: Duration) -> Result<Unpooled, DbError> {
    let Target { mut pg, tls } = target;
    let connector = tls.connector(&mut pg).map_err(|e| DbError::Config(e.to_string()))?;
    open_with(pg, connector, timeout).await
}

/// [`open`] with a connector the caller built ([`crate::tls::TlsMaterial`],
/// which has set the negotiation on `pg`).
async fn open_with(
    mut pg: tokio_postgres::Config,
    connector: MakeRustlsConnect,
    timeout: Duration,
) -> Result<Unpooled, DbError> {
    pg.connect_timeout(timeout);
    tokio::time::timeout(timeout, pg.connect(connector))
        .await
        .map_err(|_| {
            DbError::unavailable(format!("no connection within {}", humantime::format_duration(timeout)))
        })?
        .map_err(|e| DbError::unavailable_because(&e))
}

/// Opens one unpooled connection, bounded by `timeout` (TCP, TLS and
/// login).
pub async fn connect(target: impl Into<Target>, timeout: Duration) -> Result<Client, DbError> {
    let Target { mut pg, tls } = target.into();
    let connector = tls.connector(&mut pg).map_err(|e| DbError::Config(e.to_string()))?;
    connect_with(pg, connector, timeout).await
}

/// [`connect`] with TLS the caller holds in memory (the operator's CA from
/// a Secret): `connector` from [`crate::tls::TlsMaterial::connector`] on
/// the same `pg`.
pub async fn connect_with(
    pg: tokio_postgres::Config,
    connector: MakeRustlsConnect,
    timeout: Duration,
) -> Result<Client, DbError> {
    let (client, connection) = open_with(pg, connector, timeout).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "unpooled connection ended with an error");
        }
    });
    Ok(client)
}

/// Opens a direct connection (LISTEN needs a session: never through
/// PgBouncer in transaction mode), listens on `channel` (an identifier), calls
/// `on_listening` once it listens and `on_notify` with each payload, until
/// the connection fails. It never returns `Ok`: the caller reconnects.
pub async fn listen(
    target: impl Into<Target>,
    timeout: Duration,
    channel: &str,
    on_listening: impl FnOnce(),
    mut on_notify: impl FnMut(&str),
) -> Result<std::convert::Infallible, DbError> {
    let mut target = target.into();
    target.pg.keepalives(true).keepalives_idle(Duration::from_secs(30));
    let (client, mut connection) = open(target, timeout).await?;
    let statement = format!("LISTEN {channel}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut on_listening = Some(on_listening);
    loop {
        tokio::select! {
            done = &mut listen, if on_listening.is_some() => {
                done.map_err(|e| DbError::unavailable_because(&e))?;
                if let Some(f) = on_listening.take() {
                    f();
                }
            }
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => on_notify(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(DbError::unavailable_because(&e)),
                None => return Err(DbError::unavailable("the listening connection closed")),
            },
        }
    }
}
