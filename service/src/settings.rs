//! The settings of the web and worker processes, as plain values.
//!
//! [`WebSettings`] and [`WorkerSettings`] hold every knob, with the same
//! defaults as the command line, and share their [`DatabaseSettings`]. Each
//! has one `validate()` that every path goes through: the command line
//! parses into these types and validates them, and so do
//! [`crate::web::serve`] and [`crate::queue::Worker::new`] for a library
//! caller who builds them in code. A combination the command line refuses is
//! refused there too, with the same message, which names the setting by its
//! flag (each field's doc gives the flag and its variable).
//!
//! ```
//! use std::time::Duration;
//! use tidepool::settings::{DatabaseSettings, WorkerSettings};
//!
//! let settings = WorkerSettings {
//!     database: DatabaseSettings::new("postgres://app@127.0.0.1:6432/app"),
//!     lease: Duration::from_secs(10),
//!     heartbeat_interval: Duration::from_secs(6),
//!     ..WorkerSettings::default()
//! };
//! let err = settings.validate().unwrap_err();
//! assert!(err.to_string().contains("at most half of --lease"));
//! ```
//!
//! Connection URLs carry passwords, so they are held as [`SecretUrl`], whose
//! `Debug` is redacted and whose parse errors never quote it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::queue::job::{is_valid_queue_name, MAX_SCHEDULE_AHEAD};
use crate::queue::retry::RetryPolicy;
use crate::tls::TlsSettings;

/// Settings that cannot work together, or a value out of its range. The
/// message names the setting by its command-line flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct InvalidSettings(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, InvalidSettings> {
    Err(InvalidSettings(message.into()))
}

fn duration(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// A connection URL that may contain a password. Never printed.
#[derive(Clone, Default)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL such as `postgres://app:PASSWORD@127.0.0.1:6432/app`
    /// (or a libpq key=value string).
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// Whether no URL was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the URL into a tokio-postgres config. `what` names the
    /// setting in the error, e.g. `DATABASE_URL`.
    pub fn to_pg_config(&self, what: &'static str) -> Result<tokio_postgres::Config, InvalidUrl> {
        tokio_postgres::Config::from_str(&self.0).map_err(|source| InvalidUrl { what, source: source.into() })
    }

    /// Parses the URL of a connection Tidepool opens with its own TLS
    /// ([`crate::tls`]): libpq's `sslmode`, `sslrootcert`, `sslcert` and
    /// `sslkey` taken out of it first (tokio-postgres refuses `verify-ca`,
    /// `verify-full` and the files).
    pub fn to_connection(&self, what: &'static str) -> Result<crate::db::Target, InvalidUrl> {
        let invalid = |source: Box<dyn std::error::Error + Send + Sync>| InvalidUrl { what, source };
        let (rest, tls) = TlsSettings::split_url(&self.0).map_err(|e| invalid(e.into()))?;
        let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| invalid(e.into()))?;
        // A key=value string keeps the sslmode tokio-postgres read from it.
        Ok(if crate::tls::is_url(&self.0) { crate::db::Target { pg, tls } } else { pg.into() })
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretUrl(<redacted>)")
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;

    // Never fails: clap would quote the rejected value, password included.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A connection URL that could not be parsed. The URL itself is not quoted.
#[derive(Debug, thiserror::Error)]
#[error("{what} is not a valid PostgreSQL connection URL: {source}")]
pub struct InvalidUrl {
    what: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// The password file could not be read. Its contents are never quoted.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the password file {}: {source}", .path.display())]
pub struct PasswordFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// `pg` with the password from `file` when it has none of its own (a
/// trailing newline is ignored): a mounted Secret key, so the password never
/// sits in the environment or on a command line.
pub fn apply_password_file(
    mut pg: tokio_postgres::Config,
    file: Option<&std::path::Path>,
) -> Result<tokio_postgres::Config, PasswordFileError> {
    if pg.get_password().is_some() {
        return Ok(pg);
    }
    if let Some(path) = file {
        let bytes =
            std::fs::read(path).map_err(|source| PasswordFileError { path: path.to_owned(), source })?;
        let end = bytes.iter().rposition(|b| !matches!(b, b'\n' | b'\r')).map_or(0, |i| i + 1);
        pg.password(&bytes[..end]);
    }
    Ok(pg)
}

/// The pooled database connection (the local PgBouncer in transaction mode)
/// and the client pool in front of it, as web and worker share them.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// Pooled connection URL (`--database-url`, `DATABASE_URL`). Required.
    pub url: SecretUrl,
    /// File holding the password, for a URL that has none
    /// (`--db-password-file`, `TIDEPOOL_DB_PASSWORD_FILE`).
    pub password_file: Option<PathBuf>,
    /// Client connections this process keeps to PgBouncer
    /// (`--db-pool-size`, `TIDEPOOL_DB_POOL_SIZE`): 1 to 10,000; `None` is
    /// 20 for web and the concurrency for a worker's task pool.
    pub pool_size: Option<u32>,
    /// Longest wait for a free pooled connection (`--db-pool-wait`, 5 s).
    pub pool_wait: Duration,
    /// Longest to open one connection (`--db-connect-timeout`, 5 s).
    pub connect_timeout: Duration,
    /// Longest a query may take beyond its intended duration
    /// (`--query-timeout`, 10 s): then it is cancelled on the server.
    pub query_timeout: Duration,
    /// Longest `/readyz` waits for `SELECT 1` (`--readiness-timeout`, 2 s).
    pub readiness_timeout: Duration,
    /// PgBouncer's admin console for the `pgbouncer_*` series, if any.
    pub pooler_stats: Option<PoolerStatsSettings>,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretUrl::default(),
            password_file: None,
            pool_size: None,
            pool_wait: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(10),
            readiness_timeout: Duration::from_secs(2),
            pooler_stats: None,
        }
    }
}

/// Most client connections one pool may have.
pub const MAX_DB_POOL_SIZE: u32 = 10_000;

impl DatabaseSettings {
    /// The defaults, with `url` as the pooled connection.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: SecretUrl::new(url), ..Self::default() }
    }

    /// Checks every field (the URL is parsed, never quoted).
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        if self.url.is_empty() {
            return invalid("the database URL is not set (--database-url or DATABASE_URL)");
        }
        self.url.to_connection("DATABASE_URL").map_err(|e| InvalidSettings(e.to_string()))?;
        if let Some(size) = self.pool_size {
            if !(1..=MAX_DB_POOL_SIZE).contains(&size) {
                return invalid(format!("--db-pool-size must be from 1 to {MAX_DB_POOL_SIZE}, got {size}"));
            }
        }
        for (flag, value) in [
            ("--db-connect-timeout", self.connect_timeout),
            ("--query-timeout", self.query_timeout),
            ("--readiness-timeout", self.readiness_timeout),
        ] {
            if value.is_zero() {
                return invalid(format!("{flag} must be above zero"));
            }
        }
        if let Some(stats) = &self.pooler_stats {
            stats
                .url
                .to_pg_config("TIDEPOOL_POOLER_STATS_URL")
                .map_err(|e| InvalidSettings(e.to_string()))?;
            if stats.timeout.is_zero() {
                return invalid("--pooler-stats-timeout must be above zero");
            }
        }
        Ok(())
    }

    /// The pooled connection's target (its TLS from the URL's `sslmode`),
    /// with the password file applied.
    pub fn pg_config(&self) -> Result<crate::db::Target, crate::StartError> {
        let mut target = self.url.to_connection("DATABASE_URL")?;
        target.pg = apply_password_file(target.pg, self.password_file.as_deref())?;
        Ok(target)
    }

    /// The pool's settings; `default_size` when no pool size is given.
    pub fn pool_settings(&self, default_size: u32) -> crate::db::PoolSettings {
        crate::db::PoolSettings {
            max_size: self.pool_size.unwrap_or(default_size) as usize,
            wait: self.pool_wait,
            connect_timeout: self.connect_timeout,
            query_timeout: self.query_timeout,
        }
    }
}

/// PgBouncer's admin console, read at each scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct PoolerStatsSettings {
    /// The console as a stats user (`--pooler-stats-url`,
    /// `TIDEPOOL_POOLER_STATS_URL`), e.g.
    /// `postgres://tidepool_stats@127.0.0.1:6432/pgbouncer`.
    pub url: SecretUrl,
    /// The stats user's password file, when the URL has none
    /// (`--pooler-stats-password-file`).
    pub password_file: Option<PathBuf>,
    /// Longest one scrape of the console may take (`--pooler-stats-timeout`, 2 s).
    pub timeout: Duration,
}

impl PoolerStatsSettings {
    /// The admin console to read.
    pub(crate) fn admin_console(&self) -> Result<crate::pooler_metrics::AdminConsole, crate::StartError> {
        let config = apply_password_file(
            self.url.to_pg_config("TIDEPOOL_POOLER_STATS_URL")?,
            self.password_file.as_deref(),
        )?;
        Ok(crate::pooler_metrics::AdminConsole::new(config, self.timeout))
    }
}

/// Client connections to PgBouncer of `web` when no pool size is given.
pub const DEFAULT_WEB_DB_POOL_SIZE: u32 = 20;

/// Everything `web` needs: where it listens, its database, and the limits
/// of its HTTP layer.
#[derive(Debug, Clone)]
pub struct WebSettings {
    /// HTTP, `/metrics` included (`--listen`, `TIDEPOOL_LISTEN`, 127.0.0.1:8000).
    pub listen: SocketAddr,
    /// The pooled database and its client pool.
    pub database: DatabaseSettings,
    /// Requests handled at once, probes excepted; past it a request is shed
    /// with 503 and `Retry-After` (`--max-in-flight`, 10,000; at least 1).
    pub max_in_flight: u32,
    /// Open client connections; more wait in the kernel's accept queue
    /// (`--max-connections`, 16,384; at least 1).
    pub max_connections: u32,
    /// Longest to send a request's headers, and longest a keep-alive
    /// connection sits idle (`--header-read-timeout`, 30 s).
    pub header_read_timeout: Duration,
    /// Largest request body; larger gets 413 (`--max-body-bytes`, 1 MiB).
    pub max_body_bytes: u64,
    /// Longest to send a request's body; slower gets 408 (`--body-read-timeout`, 10 s).
    pub body_read_timeout: Duration,
    /// How long a refused body is read and discarded before the connection
    /// closes, so the client reads the answer (`--lingering-close-timeout`, 5 s).
    pub lingering_close_timeout: Duration,
    /// Most bytes a lingering close discards (`--lingering-close-max-bytes`, 16 MiB).
    pub lingering_close_max_bytes: u64,
    /// After SIGTERM, how long to keep serving while `/readyz` answers 503
    /// (`--drain-delay`, 5 s).
    pub drain_delay: Duration,
    /// After the listener closes, how long requests in flight may take
    /// (`--shutdown-timeout`, 20 s).
    pub shutdown_timeout: Duration,
}

impl Default for WebSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            database: DatabaseSettings::default(),
            max_in_flight: 10_000,
            max_connections: 16_384,
            header_read_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            body_read_timeout: Duration::from_secs(10),
            lingering_close_timeout: Duration::from_secs(5),
            lingering_close_max_bytes: 16 * 1024 * 1024,
            drain_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(20),
        }
    }
}

impl WebSettings {
    /// Checks every field and the database's.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        self.database.validate()?;
        if self.max_in_flight == 0 {
            return invalid("--max-in-flight must be at least 1");
        }
        if self.max_connections == 0 {
            return invalid("--max-connections must be at least 1");
        }
        for (flag, value) in [
            ("--header-read-timeout", self.header_read_timeout),
            ("--body-read-timeout", self.body_read_timeout),
        ] {
            if value.is_zero() {
                return invalid(format!("{flag} must be above zero"));
            }
        }
        Ok(())
    }
}

/// Everything `worker` needs: its probe port, its database, and the queue
/// runtime's knobs ([`crate::queue::Worker`] reads them).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// This worker's name in the jobs it holds and in logs; `host-pid` by default.
    pub name: String,
    /// `/healthz`, `/readyz` and `/metrics` (`--listen`,
    /// `TIDEPOOL_WORKER_LISTEN`, 127.0.0.1:8001).
    pub listen: SocketAddr,
    /// The pooled database; the task pool's size defaults to the concurrency.
    pub database: DatabaseSettings,
    /// A direct connection to PostgreSQL for LISTEN, so an idle worker
    /// claims new jobs at once (`TIDEPOOL_DIRECT_DATABASE_URL`); polling
    /// without it.
    pub direct_database_url: Option<SecretUrl>,
    /// The direct connection's password file, for a URL that has none
    /// (`--direct-db-password-file`); default the pooled connection's.
    pub direct_password_file: Option<PathBuf>,
    /// Queues to take jobs from, served round-robin (`--queues`, `default`).
    pub queues: Vec<String>,
    /// Jobs run (and held) at once (`--concurrency`, 50; 1 to 100,000).
    pub concurrency: u32,
    /// Most jobs per claim and per recording statement (`--batch-size`, 100; 1 to 10,000).
    pub batch_size: u32,
    /// How long a claimed job stays this worker's without a heartbeat (`--lease`, 30 s).
    pub lease: Duration,
    /// How often leases are renewed, at most half the lease (`--heartbeat-interval`, 5 s).
    pub heartbeat_interval: Duration,
    /// Pause after a claim that found some jobs but not a full batch (`--poll-interval-min`, 10 ms).
    pub poll_interval_min: Duration,
    /// Longest pause between claims while the queues stay empty (`--poll-interval-max`, 250 ms).
    pub poll_interval_max: Duration,
    /// After SIGTERM, how long running jobs may take (`--shutdown-timeout`, 20 s).
    pub shutdown_timeout: Duration,
    /// How long results of succeeded jobs are kept; zero keeps none
    /// (`--result-retention`, 24 h; at most 366 days).
    pub result_retention: Duration,
    /// How long dead and cancelled jobs are kept (`--dead-retention`, 7 days; at most 366 days).
    pub dead_retention: Duration,
    /// How often expired leases are rescued and archives pruned (`--maintenance-interval`, 5 s).
    pub maintenance_interval: Duration,
    /// Backoff between attempts (`--retry-base` 1 s, `--retry-max` 1 h).
    pub retry: RetryPolicy,
    /// How long the claim loop may go without a round, beyond the longest
    /// a round may take, before `/healthz` fails (`--stall-timeout`, 30 s;
    /// see [`WorkerSettings::stall_limit`]).
    pub stall_timeout: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            name: default_worker_name(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            database: DatabaseSettings::default(),
            direct_database_url: None,
            direct_password_file: None,
            queues: vec![crate::queue::job::DEFAULT_QUEUE.to_owned()],
            concurrency: 50,
            batch_size: 100,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            poll_interval_min: Duration::from_millis(10),
            poll_interval_max: Duration::from_millis(250),
            shutdown_timeout: Duration::from_secs(20),
            result_retention: Duration::from_secs(24 * 3600),
            dead_retention: Duration::from_secs(7 * 24 * 3600),
            maintenance_interval: Duration::from_secs(5),
            retry: RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(3600) },
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Most jobs one worker runs at once.
pub const MAX_CONCURRENCY: u32 = 100_000;
/// Most jobs one claim or recording statement handles.
pub const MAX_BATCH_SIZE: u32 = 10_000;

impl WorkerSettings {
    /// Checks every field and the database's. The queue names are also
    /// trimmed and deduplicated by [`WorkerSettings::normalized`].
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        self.database.validate()?;
        if let Some(direct) = &self.direct_database_url {
            direct
                .to_connection("TIDEPOOL_DIRECT_DATABASE_URL")
                .map_err(|e| InvalidSettings(e.to_string()))?;
        }
        if self.name.is_empty() {
            return invalid("the worker's name must not be empty");
        }
        for queue in &self.queues {
            let queue = queue.trim();
            if !is_valid_queue_name(queue) {
                return invalid(format!(
                    "queue {queue:?} is not a valid name: use 1 to 64 of a-z, A-Z, 0-9, '_', '-', '.'"
                ));
            }
        }
        if self.queues.is_empty() {
            return invalid("--queues names no queue");
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return invalid(format!(
                "--concurrency must be from 1 to {MAX_CONCURRENCY}, got {}",
                self.concurrency
            ));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return invalid(format!(
                "--batch-size must be from 1 to {MAX_BATCH_SIZE}, got {}",
                self.batch_size
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.lease {
            return invalid(format!(
                "--heartbeat-interval ({}) must be above zero and at most half of --lease ({}), so a lease is renewed at least twice before it expires",
                duration(self.heartbeat_interval),
                duration(self.lease)
            ));
        }
        if self.poll_interval_min.is_zero() || self.poll_interval_min > self.poll_interval_max {
            return invalid("--poll-interval-min must be above zero and at most --poll-interval-max");
        }
        if self.maintenance_interval.is_zero() {
            return invalid("--maintenance-interval must be above zero");
        }
        if self.result_retention > MAX_SCHEDULE_AHEAD || self.dead_retention > MAX_SCHEDULE_AHEAD {
            return invalid("--result-retention and --dead-retention are at most 366 days");
        }
        if self.retry.base.is_zero() || self.retry.base > self.retry.max {
            return invalid("--retry-base must be above zero and at most --retry-max");
        }
        if self.stall_timeout.is_zero() {
            return invalid("--stall-timeout must be above zero");
        }
        Ok(())
    }

    /// How long the claim loop may go without a round before the worker
    /// is not live: `--stall-timeout` beyond the longest a healthy round
    /// takes (per queue, the wait for a connection, its connect timeout and
    /// the statement's timeout; then its longest pause). A database outage
    /// makes rounds fail fast, within that bound, so it never counts as a
    /// stall.
    pub fn stall_limit(&self) -> Duration {
        let database = &self.database;
        let per_queue = database.pool_wait + database.connect_timeout + database.query_timeout;
        let queues = u32::try_from(self.queues.len()).unwrap_or(u32::MAX);
        let pause = self.poll_interval_max.max(crate::queue::worker::CLAIM_FAILURE_PAUSE_MAX);
        self.stall_timeout.saturating_add(per_queue.saturating_mul(queues)).saturating_add(pause)
    }

    /// The settings validated, with the queue names trimmed and each named once.
    pub fn normalized(mut self) -> Result<Self, InvalidSettings> {
        self.validate()?;
        let mut queues: Vec<String> = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            let queue = queue.trim();
            if !queues.iter().any(|q| q == queue) {
                queues.push(queue.to_owned());
            }
        }
        self.queues = queues;
        Ok(self)
    }
}

/// `host-pid`: unique among live workers, and says where to look.
pub fn default_worker_name() -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> WorkerSettings {
        WorkerSettings { database: DatabaseSettings::new("postgres://u@h/db"), ..WorkerSettings::default() }
    }

    #[test]
    fn defaults_are_valid_once_a_url_is_given() {
        assert!(worker().validate().is_ok());
        let web =
            WebSettings { database: DatabaseSettings::new("postgres://u@h/db"), ..WebSettings::default() };
        assert!(web.validate().is_ok());
        let err = WebSettings::default().validate().expect_err("no URL");
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn urls_take_libpqs_tls_parameters() {
        let tls = "sslmode=verify-full&sslrootcert=/etc/db-ca/ca.crt";
        let settings = WorkerSettings {
            database: DatabaseSettings::new(format!("postgres://u@h/db?{tls}")),
            direct_database_url: Some(SecretUrl::new(format!("postgres://u@h:5432/db?{tls}"))),
            ..WorkerSettings::default()
        };
        assert!(settings.validate().is_ok(), "{:?}", settings.validate());
        let bad = WorkerSettings {
            direct_database_url: Some(SecretUrl::new("postgres://u:hunter2@h/db?sslmode=verify")),
            ..worker()
        };
        let err = bad.validate().expect_err("no such mode").to_string();
        assert!(err.contains("TIDEPOOL_DIRECT_DATABASE_URL") && err.contains("sslmode=\"verify\""), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_bad_url_is_refused_without_being_quoted() {
        let web = WebSettings {
            database: DatabaseSettings::new("postgres://u:hunter2@h:notaport/db"),
            ..WebSettings::default()
        };
        let err = web.validate().expect_err("bad URL").to_string();
        assert!(err.contains("DATABASE_URL is not a valid PostgreSQL connection URL"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(!format!("{:?}", web.database.url).contains("hunter2"));
    }

    #[test]
    fn queues_are_validated_and_deduplicated() {
        let settings = WorkerSettings { queues: vec!["a".into(), "b".into(), " a".into()], ..worker() };
        assert_eq!(settings.normalized().expect("valid").queues, vec!["a".to_owned(), "b".to_owned()]);
        let err = WorkerSettings { queues: vec!["a".into(), "b c".into()], ..worker() }.validate();
        assert!(err.expect_err("space").to_string().contains("\"b c\""));
        assert!(WorkerSettings { queues: vec![], ..worker() }.validate().is_err());
    }

    #[test]
    fn the_heartbeat_must_fit_twice_in_the_lease() {
        let settings = |heartbeat| WorkerSettings {
            lease: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(heartbeat),
            ..worker()
        };
        let err = settings(6).validate().expect_err("too slow a heartbeat");
        assert!(err.to_string().contains("at most half of --lease (10s)"), "{err}");
        assert!(settings(5).validate().is_ok());
        assert!(settings(0).validate().is_err());
    }

    #[test]
    fn other_bounds_are_checked() {
        let ms = Duration::from_millis;
        let bad = [
            WorkerSettings { poll_interval_min: ms(2000), poll_interval_max: ms(1000), ..worker() },
            WorkerSettings { retry: RetryPolicy { base: ms(7_200_000), max: ms(3_600_000) }, ..worker() },
            WorkerSettings { result_retention: Duration::from_secs(400 * 86_400), ..worker() },
            WorkerSettings { maintenance_interval: Duration::ZERO, ..worker() },
            WorkerSettings { concurrency: 0, ..worker() },
            WorkerSettings { concurrency: MAX_CONCURRENCY + 1, ..worker() },
            WorkerSettings { batch_size: 0, ..worker() },
            WorkerSettings { name: String::new(), ..worker() },
            WorkerSettings { direct_database_url: Some(SecretUrl::new("postgres://h:port/x")), ..worker() },
        ];
        for settings in bad {
            assert!(settings.validate().is_err(), "{settings:?}");
        }
        let db = |pool_size| DatabaseSettings {
            pool_size: Some(pool_size),
            ..DatabaseSettings::new("postgres://h/d")
        };
        assert!(db(0).validate().is_err());
        assert!(db(MAX_DB_POOL_SIZE + 1).validate().is_err());
        assert!(db(MAX_DB_POOL_SIZE).validate().is_ok());
        let web = |max_in_flight| WebSettings { max_in_flight, database: db(1), ..WebSettings::default() };
        assert!(web(0).validate().is_err());
        assert!(web(1).validate().is_ok());
    }

    #[test]
    fn the_default_name_names_host_and_process() {
        assert!(default_worker_name().ends_with(&format!("-{}", std::process::id())));
    }
}
