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
//! The rules this module follows, and that code using [`Conn::client`] must
//! follow too:
//! - outside an explicit transaction, only `query_typed*` (an unnamed
//!   statement whose parameter types are given, sent in one round trip),
//!   `simple_query` and `batch_execute`;
//! - no statement cache (deadpool's `prepare_cached` is never used);
//! - result columns of built-in types only: for an enum, a domain or a
//!   composite tokio-postgres looks the type up with a named statement (cast
//!   such columns to `text`).
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
//! was forwarded (measured: the statement ran to its end). [`cancel`] does
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

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use prometheus::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_postgres::config::Host;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, CancelToken, Client, NoTls, Row, SimpleQueryMessage};

/// Longest a best-effort cancel request may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("no database connection became free within {}", humantime::format_duration(*.waited))]
    PoolExhausted { waited: Duration },
    #[error("the database is unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("the database did not answer within {}", humantime::format_duration(*.after))]
    QueryTimeout { after: Duration },
    #[error("database query failed: {0}")]
    Query(#[source] tokio_postgres::Error),
    #[error("invalid pool configuration: {0}")]
    Config(String),
}

impl DbError {
    fn unavailable(reason: impl std::fmt::Display) -> Self {
        Self::Unavailable { reason: reason.to_string() }
    }

    fn unavailable_because(e: &(dyn std::error::Error + 'static)) -> Self {
        Self::Unavailable { reason: crate::error_chain(e) }
    }
}

/// How the pool of client connections to PgBouncer behaves.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_size: usize,
    pub wait: Duration,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
}

/// A snapshot of the pool, as deadpool reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub max_size: usize,
    pub size: usize,
    pub available: usize,
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
        mut pg: tokio_postgres::Config,
        settings: PoolSettings,
        wait_seconds: Histogram,
    ) -> Result<Self, DbError> {
        pg.connect_timeout(settings.connect_timeout);
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
            Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
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
        let result = self.pool.get().await;
        self.wait_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(object) => Ok(Conn {
                object: Some(object),
                query_timeout: self.settings.query_timeout,
                state: AtomicU8::new(ConnState::Idle as u8),
                cancel_target: self.cancel_target.clone(),
            }),
            Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => {
                Err(DbError::PoolExhausted { waited: self.settings.wait })
            }
            Err(PoolError::Timeout(_)) => Err(DbError::unavailable(format!(
                "no connection to the pooler within {}",
                humantime::format_duration(self.settings.connect_timeout)
            ))),
            Err(PoolError::Backend(e)) => Err(DbError::unavailable_because(&e)),
            Err(e) => Err(DbError::unavailable(e)),
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

    pub fn status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus { max_size: s.max_size, size: s.size, available: s.available, waiting: s.waiting }
    }
}

/// A connection borrowed from the pool. Returned to the pool when dropped,
/// unless it broke (then it is closed) or it was dropped in the middle of a
/// query, by a timeout or because the request that ran it went away (then
/// the query is cancelled and the connection closed).
pub struct Conn {
    /// Always `Some` until `drop`, which alone takes it.
    object: Option<Object>,
    query_timeout: Duration,
    /// A [`ConnState`]; atomic so statements can run through `&self` while
    /// the client is borrowed.
    state: AtomicU8,
    cancel_target: Option<Arc<CancelTarget>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum ConnState {
    Idle = 0,
    InQuery = 1,
    Broken = 2,
}

impl Conn {
    /// The underlying client, for transactions and `simple_query`. Follow the
    /// module's rules: no `Client::query(&str, ..)` outside a transaction.
    pub fn client(&self) -> &Client {
        match &self.object {
            Some(object) => object,
            None => unreachable!("the pooled object is taken only in drop"),
        }
    }

    /// Runs one unnamed, typed statement. `expected` is how long the statement
    /// is meant to take (a slow query's sleep); the query timeout is added.
    pub async fn query_typed(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
        expected: Duration,
    ) -> Result<Vec<Row>, DbError> {
        self.run(expected, self.client().query_typed(sql, params)).await
    }

    /// Awaits `statement`, a future that uses [`Conn::client`] (for example
    /// a function of [`crate::queue`]'s SQL), under the same rules as
    /// [`Conn::query_typed`]: bounded by `expected` plus the query timeout,
    /// cancelled on the server if abandoned, the connection discarded if it
    /// broke.
    pub async fn run<T>(
        &self,
        expected: Duration,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        let budget = expected.saturating_add(self.query_timeout);
        self.set_state(ConnState::InQuery);
        match tokio::time::timeout(budget, statement).await {
            Ok(Ok(value)) => {
                self.set_state(ConnState::Idle);
                Ok(value)
            }
            Ok(Err(e)) if is_unavailable(&e) || self.client().is_closed() => {
                self.set_state(ConnState::Broken);
                Err(DbError::unavailable_because(&e))
            }
            Ok(Err(e)) => {
                self.set_state(ConnState::Idle);
                Err(DbError::Query(e))
            }
            // Still `InQuery`: the query is cancelled when the conn drops.
            Err(_) => Err(DbError::QueryTimeout { after: budget }),
        }
    }

    fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        match *self.state.get_mut() {
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
    (Client, tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>);

/// Opens one connection, bounded by `timeout` (TCP and login), and hands
/// back its client and the connection to drive.
async fn open(mut pg: tokio_postgres::Config, timeout: Duration) -> Result<Unpooled, DbError> {
    pg.connect_timeout(timeout);
    tokio::time::timeout(timeout, pg.connect(NoTls))
        .await
        .map_err(|_| {
            DbError::unavailable(format!("no connection within {}", humantime::format_duration(timeout)))
        })?
        .map_err(|e| DbError::unavailable_because(&e))
}

/// Opens one unpooled connection, bounded by `timeout` (TCP and login).
pub async fn connect(pg: tokio_postgres::Config, timeout: Duration) -> Result<Client, DbError> {
    let (client, connection) = open(pg, timeout).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "unpooled connection ended with an error");
        }
    });
    Ok(client)
}

/// Checks that a fresh connection through `pg` (the pooler) can run
/// `SELECT 1`, all within `timeout`. Used by readiness probes: it fails while
/// PgBouncer or PostgreSQL is down and recovers by itself when both are back.
pub async fn ping(pg: tokio_postgres::Config, timeout: Duration) -> Result<(), DbError> {
    tokio::time::timeout(timeout, async {
        let client = connect(pg, timeout).await?;
        let messages = client.simple_query("SELECT 1").await.map_err(|e| DbError::unavailable_because(&e))?;
        if messages.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))) {
            Ok(())
        } else {
            Err(DbError::unavailable("SELECT 1 returned no row"))
        }
    })
    .await
    .map_err(|_| DbError::QueryTimeout { after: timeout })?
}

/// Opens a direct connection (LISTEN needs a session: never through
/// PgBouncer in transaction mode), listens on `channel` (an identifier), calls
/// `on_listening` once it listens and `on_notify` with each payload, until
/// the connection fails. It never returns `Ok`: the caller reconnects.
pub async fn listen(
    mut pg: tokio_postgres::Config,
    timeout: Duration,
    channel: &str,
    on_listening: impl FnOnce(),
    mut on_notify: impl FnMut(&str),
) -> Result<std::convert::Infallible, DbError> {
    pg.keepalives(true).keepalives_idle(Duration::from_secs(30));
    let (client, mut connection) = open(pg, timeout).await?;
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
