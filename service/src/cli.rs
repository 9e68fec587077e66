//! The command line of every application built on Tidepool (and of the
//! default `tidepool` binary): each subcommand's flags, each with the
//! environment variable that sets it, its default and what it is for. It
//! only parses: the flags become [`crate::settings`]' plain values, whose
//! `validate()` checks them, and their defaults are those values' defaults.
//!
//! Connection URLs carry passwords, so they are read as [`SecretUrl`]
//! (whose `Debug` is redacted) with clap told never to echo environment
//! values in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
// The variables the operator sets on a pod: named in the pod contract.
use tidepool_contract::env as pod;

use crate::queue::RetryPolicy;
use crate::settings::{DatabaseSettings, PoolerStatsSettings, SecretUrl, WebSettings, WorkerSettings};
use crate::tls::SslMode;

/// A default of the settings types, as clap prints and parses it.
fn default_of(d: Duration) -> humantime::Duration {
    d.into()
}

/// Tidepool: a high-concurrency web and task runtime for PostgreSQL behind PgBouncer.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve HTTP: the application's routes, probes and /metrics.
    Web(WebArgs),
    /// Create or update the database schema: Tidepool's migrations, then the application's (idempotent; safe to run concurrently).
    Migrate(MigrateArgs),
    /// Run background jobs from the PostgreSQL queue; /healthz and /metrics on its own port.
    Worker(WorkerArgs),
    /// Enqueue jobs and print their ids, one per line ("ID duplicate" for a pending unique key's holder).
    Enqueue(EnqueueArgs),
    /// Write a PgBouncer configuration (pgbouncer.ini and its auth file) for one upstream database.
    PoolerConfig(PoolerConfigArgs),
    /// Write a libpq password file (0600) from a mounted database Secret, for a process that reads PGPASSFILE.
    Pgpass(PgpassArgs),
    /// Serve the pod's PgBouncer figures (the pgbouncer_* series) on /metrics, for a pod whose app is not Tidepool's.
    PoolerExporter(PoolerExporterArgs),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct LogArgs {
    /// Log format.
    #[arg(long, global = true, env = pod::LOG_FORMAT, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `tidepool=debug,info`.
    #[arg(long, global = true, env = "TIDEPOOL_LOG", default_value = "info")]
    pub log: String,
}

fn parse_duration(s: &str) -> Result<humantime::Duration, String> {
    s.parse::<humantime::Duration>().map_err(|e| format!("{e} (examples: 500ms, 5s, 2m)"))
}

fn parse_std_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map(Into::into)
}

/// The pooled database connection and the client pool in front of it.
#[derive(Debug, Clone, Args)]
pub(crate) struct DatabaseArgs {
    /// Pooled connection URL: the local PgBouncer in transaction mode,
    /// e.g. postgres://app:PASSWORD@127.0.0.1:6432/app. Never logged.
    #[arg(long, env = pod::DATABASE_URL, hide_env_values = true, value_name = "URL")]
    pub database_url: SecretUrl,

    /// File holding the database password, used for every connection URL
    /// that has none (in Kubernetes, the mounted Secret's `password` key).
    /// A trailing newline is ignored.
    #[arg(long = "db-password-file", env = pod::DB_PASSWORD_FILE, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Client connections this process keeps to PgBouncer (1 to 10000):
    /// how many requests (web) or tasks (worker) can run a query at once.
    /// Size it close to this pod's share of server connections, so waiting
    /// happens here, bounded and measured. Default: 20 for web,
    /// --concurrency for worker.
    #[arg(long, env = pod::DB_POOL_SIZE)]
    pub db_pool_size: Option<u32>,

    /// Longest a request (or a task) waits for a free pooled connection;
    /// a request is then shed with 503 and Retry-After, a task's attempt fails.
    #[arg(long, env = "TIDEPOOL_DB_POOL_WAIT", default_value_t = default_of(DatabaseSettings::default().pool_wait), value_parser = parse_duration)]
    pub db_pool_wait: humantime::Duration,

    /// Longest to open one connection to PgBouncer (TCP and authentication).
    #[arg(long, env = "TIDEPOOL_DB_CONNECT_TIMEOUT", default_value_t = default_of(DatabaseSettings::default().connect_timeout), value_parser = parse_duration)]
    pub db_connect_timeout: humantime::Duration,

    /// Longest a query may take beyond its intended duration (a slow query's
    /// own sleep is added to it). Past it the query is cancelled and the
    /// request answers 504.
    #[arg(long, env = "TIDEPOOL_QUERY_TIMEOUT", default_value_t = default_of(DatabaseSettings::default().query_timeout), value_parser = parse_duration)]
    pub query_timeout: humantime::Duration,

    /// Longest /readyz waits for an idle pooled connection to answer
    /// `SELECT 1` through PgBouncer (a pool with none idle is busy, and
    /// ready).
    #[arg(long, env = "TIDEPOOL_READINESS_TIMEOUT", default_value_t = default_of(DatabaseSettings::default().readiness_timeout), value_parser = parse_duration)]
    pub readiness_timeout: humantime::Duration,

    #[command(flatten)]
    pub pooler_stats: PoolerStatsArgs,
}

/// PgBouncer's admin console, read at each scrape of `/metrics` for its own
/// figures (the `pgbouncer_*` series).
#[derive(Debug, Clone, Args)]
pub(crate) struct PoolerStatsArgs {
    /// The admin console as a stats user, e.g.
    /// postgres://tidepool_stats@127.0.0.1:6432/pgbouncer. Unset: no
    /// pgbouncer_* series. Never logged.
    #[arg(long, env = pod::POOLER_STATS_URL, hide_env_values = true, value_name = "URL")]
    pub pooler_stats_url: Option<SecretUrl>,

    /// File holding the stats user's password, when the URL has none (what
    /// `pooler-config --stats-user` writes: stats.password).
    #[arg(long, env = pod::POOLER_STATS_PASSWORD_FILE, value_name = "FILE")]
    pub pooler_stats_password_file: Option<PathBuf>,

    /// Longest one scrape of the admin console may take.
    #[arg(long, env = "TIDEPOOL_POOLER_STATS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub pooler_stats_timeout: humantime::Duration,
}

impl DatabaseArgs {
    fn into_settings(self) -> DatabaseSettings {
        let stats = self.pooler_stats;
        DatabaseSettings {
            url: self.database_url,
            password_file: self.password_file,
            pool_size: self.db_pool_size,
            pool_wait: self.db_pool_wait.into(),
            connect_timeout: self.db_connect_timeout.into(),
            query_timeout: self.query_timeout.into(),
            readiness_timeout: self.readiness_timeout.into(),
            pooler_stats: stats.pooler_stats_url.map(|url| PoolerStatsSettings {
                url,
                password_file: stats.pooler_stats_password_file,
                timeout: stats.pooler_stats_timeout.into(),
            }),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct WebArgs {
    /// Address to listen on for HTTP, /metrics included.
    #[arg(long, env = pod::LISTEN, default_value_t = WebSettings::default().listen)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Requests handled at once, probes excepted (at least 1); past it a
    /// request is shed at once with 503 and Retry-After.
    #[arg(long, env = pod::MAX_IN_FLIGHT, default_value_t = WebSettings::default().max_in_flight)]
    pub max_in_flight: u32,

    /// Open client connections (TCP; at least 1). At the limit, new
    /// connections wait in the kernel's accept queue until one closes.
    #[arg(long, env = "TIDEPOOL_MAX_CONNECTIONS", default_value_t = WebSettings::default().max_connections)]
    pub max_connections: u32,

    /// Longest a client may take to send a request's headers, and longest a
    /// keep-alive connection may sit idle between requests.
    #[arg(long, env = "TIDEPOOL_HEADER_READ_TIMEOUT", default_value_t = default_of(WebSettings::default().header_read_timeout), value_parser = parse_duration)]
    pub header_read_timeout: humantime::Duration,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "TIDEPOOL_MAX_BODY_BYTES", default_value_t = WebSettings::default().max_body_bytes)]
    pub max_body_bytes: u64,

    /// Longest a client may take to send a request's body; slower gets 408.
    #[arg(long, env = "TIDEPOOL_BODY_READ_TIMEOUT", default_value_t = default_of(WebSettings::default().body_read_timeout), value_parser = parse_duration)]
    pub body_read_timeout: humantime::Duration,

    /// After refusing a request body it has not read (413, 408), the server
    /// answers, then reads and discards what the client still sends for up
    /// to this long before closing, so the client reads the answer instead
    /// of a connection reset (a lingering close).
    #[arg(long, env = "TIDEPOOL_LINGERING_CLOSE_TIMEOUT", default_value_t = default_of(WebSettings::default().lingering_close_timeout), value_parser = parse_duration)]
    pub lingering_close_timeout: humantime::Duration,

    /// Most bytes a lingering close discards; a client that sends more is
    /// cut off.
    #[arg(long, env = "TIDEPOOL_LINGERING_CLOSE_MAX_BYTES", default_value_t = WebSettings::default().lingering_close_max_bytes)]
    pub lingering_close_max_bytes: u64,

    /// After SIGTERM, how long to keep serving while /readyz answers 503, so
    /// load balancers and Endpoints stop sending traffic before the listener
    /// closes.
    #[arg(long, env = pod::DRAIN_DELAY, default_value_t = default_of(WebSettings::default().drain_delay), value_parser = parse_duration)]
    pub drain_delay: humantime::Duration,

    /// After the listener closes, how long requests in flight may take to
    /// finish. The exit code is 0 if they all did, 3 if the deadline passed.
    /// Keep drain delay + this below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = pod::SHUTDOWN_TIMEOUT, default_value_t = default_of(WebSettings::default().shutdown_timeout), value_parser = parse_duration)]
    pub shutdown_timeout: humantime::Duration,
}

impl WebArgs {
    pub(crate) fn into_settings(self) -> WebSettings {
        WebSettings {
            listen: self.listen,
            database: self.database.into_settings(),
            max_in_flight: self.max_in_flight,
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout.into(),
            max_body_bytes: self.max_body_bytes,
            body_read_timeout: self.body_read_timeout.into(),
            lingering_close_timeout: self.lingering_close_timeout.into(),
            lingering_close_max_bytes: self.lingering_close_max_bytes,
            drain_delay: self.drain_delay.into(),
            shutdown_timeout: self.shutdown_timeout.into(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct WorkerArgs {
    /// Address of the worker's own HTTP server: /healthz and /metrics.
    #[arg(long, env = pod::WORKER_LISTEN, default_value_t = WorkerSettings::default().listen)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Optional direct connection URL to PostgreSQL, bypassing PgBouncer:
    /// one session that LISTENs for new jobs, so an idle worker claims them
    /// at once rather than at its next poll. Without it the worker polls.
    /// It is one more server connection per worker, outside PgBouncer's cap.
    #[arg(long, env = pod::DIRECT_DATABASE_URL, hide_env_values = true, value_name = "URL")]
    pub direct_database_url: Option<SecretUrl>,

    /// File holding the direct connection's password, for a URL that has
    /// none; default the pooled connection's (`--db-password-file`). In a
    /// pod they differ: the pooled one is the pod's own PgBouncer user's.
    #[arg(long = "direct-db-password-file", env = pod::DIRECT_DB_PASSWORD_FILE, value_name = "FILE")]
    pub direct_password_file: Option<PathBuf>,

    /// Jobs run at once (and held at once, counting those being recorded),
    /// 1 to 100000. The worker's server connection need is this (for tasks
    /// that use the database) plus its 4 own queue connections.
    #[arg(long, env = pod::WORKER_CONCURRENCY, default_value_t = WorkerSettings::default().concurrency)]
    pub concurrency: u32,

    /// Queues to take jobs from, comma-separated, served round-robin.
    #[arg(long, env = pod::WORKER_QUEUES, value_delimiter = ',', default_value = "default")]
    pub queues: Vec<String>,

    /// Most jobs claimed by one statement, and most outcomes recorded by
    /// one (1 to 10000).
    #[arg(long, env = "TIDEPOOL_WORKER_BATCH_SIZE", default_value_t = WorkerSettings::default().batch_size)]
    pub batch_size: u32,

    /// How long a claimed job stays this worker's without a heartbeat. A job
    /// whose worker died runs again this long (plus up to one maintenance
    /// interval) after the last heartbeat.
    #[arg(long, env = "TIDEPOOL_WORKER_LEASE", default_value_t = default_of(WorkerSettings::default().lease), value_parser = parse_duration)]
    pub lease: humantime::Duration,

    /// How often leases are renewed (at most half the lease), and how soon a
    /// cancelled running job is stopped.
    #[arg(long, env = "TIDEPOOL_WORKER_HEARTBEAT_INTERVAL", default_value_t = default_of(WorkerSettings::default().heartbeat_interval), value_parser = parse_duration)]
    pub heartbeat_interval: humantime::Duration,

    /// Pause between claims when the last one found some jobs but not a full batch.
    #[arg(long, env = "TIDEPOOL_WORKER_POLL_INTERVAL_MIN", default_value_t = default_of(WorkerSettings::default().poll_interval_min), value_parser = parse_duration)]
    pub poll_interval_min: humantime::Duration,

    /// Longest pause between claims while the queues stay empty (the pause
    /// doubles from the minimum up to this): the worst added latency of a
    /// polling worker. An idle worker costs the database this many claims
    /// per second per queue (cheap index probes).
    #[arg(long, env = "TIDEPOOL_WORKER_POLL_INTERVAL_MAX", default_value_t = default_of(WorkerSettings::default().poll_interval_max), value_parser = parse_duration)]
    pub poll_interval_max: humantime::Duration,

    /// After SIGTERM, how long running jobs may take to finish; the rest are
    /// stopped and handed back at once (exit code 3). Keep it below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = pod::SHUTDOWN_TIMEOUT, default_value_t = default_of(WorkerSettings::default().shutdown_timeout), value_parser = parse_duration)]
    pub shutdown_timeout: humantime::Duration,

    /// How long results of succeeded jobs are kept (for GET /tasks/{id});
    /// 0 keeps none. At most 366 days.
    #[arg(long, env = "TIDEPOOL_RESULT_RETENTION", default_value_t = default_of(WorkerSettings::default().result_retention), value_parser = parse_duration)]
    pub result_retention: humantime::Duration,

    /// How long dead and cancelled jobs are kept, with their errors. At most 366 days.
    #[arg(long, env = "TIDEPOOL_DEAD_RETENTION", default_value_t = default_of(WorkerSettings::default().dead_retention), value_parser = parse_duration)]
    pub dead_retention: humantime::Duration,

    /// How often the worker rescues jobs with expired leases, prunes results
    /// and dead jobs past their retention, and refreshes the queue gauges.
    #[arg(long, env = "TIDEPOOL_WORKER_MAINTENANCE_INTERVAL", default_value_t = default_of(WorkerSettings::default().maintenance_interval), value_parser = parse_duration)]
    pub maintenance_interval: humantime::Duration,

    /// Backoff after a job's first failed attempt; it doubles per attempt,
    /// with jitter (between half and all of it).
    #[arg(long, env = "TIDEPOOL_RETRY_BASE", default_value_t = default_of(WorkerSettings::default().retry.base), value_parser = parse_duration)]
    pub retry_base: humantime::Duration,

    /// Longest backoff between attempts.
    #[arg(long, env = "TIDEPOOL_RETRY_MAX", default_value_t = default_of(WorkerSettings::default().retry.max), value_parser = parse_duration)]
    pub retry_max: humantime::Duration,

    /// How long the claim loop may go without a round, beyond the longest
    /// a healthy round takes (per queue, --db-pool-wait,
    /// --db-connect-timeout and --query-timeout; then a pause of up to
    /// 5 s), before /healthz
    /// answers 503 and the kubelet restarts the worker. Failed claims
    /// (the database is down) count as rounds.
    #[arg(long, env = "TIDEPOOL_WORKER_STALL_TIMEOUT", default_value_t = default_of(WorkerSettings::default().stall_timeout), value_parser = parse_duration)]
    pub stall_timeout: humantime::Duration,
}

impl WorkerArgs {
    pub(crate) fn into_settings(self) -> WorkerSettings {
        WorkerSettings {
            name: crate::settings::default_worker_name(),
            listen: self.listen,
            database: self.database.into_settings(),
            direct_database_url: self.direct_database_url,
            direct_password_file: self.direct_password_file,
            queues: self.queues,
            concurrency: self.concurrency,
            batch_size: self.batch_size,
            lease: self.lease.into(),
            heartbeat_interval: self.heartbeat_interval.into(),
            poll_interval_min: self.poll_interval_min.into(),
            poll_interval_max: self.poll_interval_max.into(),
            shutdown_timeout: self.shutdown_timeout.into(),
            result_retention: self.result_retention.into(),
            dead_retention: self.dead_retention.into(),
            maintenance_interval: self.maintenance_interval.into(),
            retry: RetryPolicy { base: self.retry_base.into(), max: self.retry_max.into() },
            stall_timeout: self.stall_timeout.into(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct EnqueueArgs {
    /// The task to run, by its name.
    pub task: String,

    /// The task's arguments: a JSON object, e.g. '{"seconds": 0.5}'.
    #[arg(long, default_value = "{}")]
    pub args: String,

    /// How many identical jobs to enqueue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub count: u64,

    /// The queue; the task's own by default.
    #[arg(long)]
    pub queue: Option<String>,

    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i16,

    /// Run no earlier than this long from now, e.g. 30s.
    #[arg(long, value_parser = parse_std_duration, conflicts_with = "run_at")]
    pub delay: Option<Duration>,

    /// Run no earlier than this RFC 3339 time, e.g. 2026-12-01T09:00:00Z.
    #[arg(long)]
    pub run_at: Option<String>,

    /// Enqueue only if no pending job holds this key (else print its id, "duplicate").
    #[arg(long)]
    pub unique_key: Option<String>,

    /// Attempts the job gets; the task's own by default.
    #[arg(long)]
    pub max_attempts: Option<i32>,

    /// Jobs per INSERT statement; 1 sends one statement per job.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,

    /// Enqueue one job at a time at this steady rate (jobs per second)
    /// instead of as fast as possible.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: Option<u32>,

    /// Print only the summary (on standard error), not the ids.
    #[arg(long)]
    pub quiet: bool,

    /// Connection URL (PgBouncer or PostgreSQL). Never logged.
    #[arg(long, env = pod::DATABASE_URL, hide_env_values = true, value_name = "URL")]
    pub database_url: SecretUrl,

    /// File holding the database password, for a URL that has none (in a
    /// Tidepool's pod, where `kubectl exec ... tidepool enqueue` finds it
    /// set, as web and worker have it).
    #[arg(long = "db-password-file", env = pod::DB_PASSWORD_FILE, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Longest to open a connection, and longest one statement may take.
    #[arg(long, env = "TIDEPOOL_DB_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_std_duration)]
    pub db_connect_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct MigrateArgs {
    /// Pooled connection URL, used when no direct URL is given (migrations run
    /// in one transaction, so they are safe through transaction pooling).
    #[arg(long, env = pod::DATABASE_URL, hide_env_values = true, value_name = "URL")]
    pub database_url: Option<SecretUrl>,

    /// Direct connection URL to PostgreSQL, bypassing PgBouncer; preferred for
    /// migrations when set.
    #[arg(long, env = pod::DIRECT_DATABASE_URL, hide_env_values = true, value_name = "URL")]
    pub direct_database_url: Option<SecretUrl>,

    /// Longest to open the connection.
    #[arg(long, env = "TIDEPOOL_DB_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_std_duration)]
    pub db_connect_timeout: Duration,

    /// File holding the database password, for a URL that has none.
    #[arg(long = "db-password-file", env = pod::DB_PASSWORD_FILE, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Longest to wait for another migrator's lock or a table lock.
    #[arg(long, env = "TIDEPOOL_MIGRATE_LOCK_TIMEOUT", default_value = "60s", value_parser = parse_std_duration)]
    pub lock_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PoolerConfigArgs {
    /// Upstream PostgreSQL URL with the credentials PgBouncer logs in with,
    /// e.g. postgres://app:PASSWORD@db:5432/app. The password goes only into
    /// the auth file (mode 0600), never into pgbouncer.ini or a log.
    #[arg(
        long,
        env = "TIDEPOOL_POOLER_UPSTREAM_URL",
        hide_env_values = true,
        value_name = "URL",
        required_unless_present = "upstream_from_dir",
        conflicts_with = "upstream_from_dir"
    )]
    pub upstream_url: Option<SecretUrl>,

    /// Instead of a URL, a folder with one file per key, as a mounted
    /// database Secret in CloudNativePG's shape has: `username`,
    /// `password`, `host`, `port` and `dbname`, all required (the operator
    /// checks the Secret by the same rule).
    #[arg(long, env = "TIDEPOOL_POOLER_UPSTREAM_FROM_DIR", value_name = "DIR")]
    pub upstream_from_dir: Option<PathBuf>,

    /// A user allowed to read PgBouncer's statistics on its admin console
    /// (`stats_users`), with a password generated here and written to
    /// `stats.password` (0600) next to the auth file.
    #[arg(long, env = "TIDEPOOL_POOLER_STATS_USER", value_name = "NAME")]
    pub stats_user: Option<String>,

    /// A user for the clients, other than the upstream's, with a password
    /// generated here and written to `client.password` and the libpq
    /// password file `client.pgpass` (both 0600): PgBouncer logs in
    /// upstream as the upstream's user for every client, so the clients
    /// never hold the upstream password.
    #[arg(long, env = "TIDEPOOL_POOLER_CLIENT_USER", value_name = "NAME")]
    pub client_user: Option<String>,

    /// With --upstream-from-dir, libpq's sslmode for PgBouncer's
    /// connections to the upstream (server_tls_sslmode): disable, prefer,
    /// require, verify-ca or verify-full. With --upstream-url, the URL's
    /// own sslmode, sslrootcert, sslcert and sslkey say it.
    #[arg(long, env = "TIDEPOOL_POOLER_SERVER_TLS_SSLMODE", value_name = "MODE", default_value = "prefer", value_parser = SslMode::parse, conflicts_with = "upstream_url")]
    pub server_tls_sslmode: SslMode,

    /// The roots the upstream's certificate must lead to (PEM, one or
    /// more): server_tls_ca_file.
    #[arg(
        long,
        env = "TIDEPOOL_POOLER_SERVER_TLS_CA_FILE",
        value_name = "FILE",
        conflicts_with = "upstream_url"
    )]
    pub server_tls_ca_file: Option<PathBuf>,

    /// A client certificate for the upstream (PEM), with
    /// --server-tls-key-file: server_tls_cert_file.
    #[arg(
        long,
        env = "TIDEPOOL_POOLER_SERVER_TLS_CERT_FILE",
        value_name = "FILE",
        conflicts_with = "upstream_url"
    )]
    pub server_tls_cert_file: Option<PathBuf>,

    /// Its key (PEM): server_tls_key_file.
    #[arg(
        long,
        env = "TIDEPOOL_POOLER_SERVER_TLS_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "upstream_url"
    )]
    pub server_tls_key_file: Option<PathBuf>,

    /// One more PgBouncer setting, KEY=VALUE (repeatable): settings this
    /// command writes itself cannot be set again, but for its defaults of
    /// server_connect_timeout (5) and server_login_retry (1); the
    /// server_tls_* keys come from the upstream's TLS settings only.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,

    /// Folder to write pgbouncer.ini and userlist.txt into (created if missing).
    #[arg(long, env = "TIDEPOOL_POOLER_CONFIG_DIR")]
    pub out_dir: PathBuf,

    /// Address PgBouncer listens on.
    #[arg(long, env = "TIDEPOOL_POOLER_LISTEN", default_value = "127.0.0.1:6432")]
    pub listen: SocketAddr,

    /// Server connections per (database, user) pair: PgBouncer's default_pool_size.
    #[arg(long, env = "TIDEPOOL_POOLER_POOL_SIZE", default_value_t = 20)]
    pub pool_size: u32,

    /// Hard cap of server connections to the database: max_db_connections.
    /// Defaults to the pool size.
    #[arg(long, env = "TIDEPOOL_POOLER_MAX_DB_CONNECTIONS")]
    pub max_db_connections: Option<u32>,

    /// Server connections PgBouncer keeps open even when idle
    /// (min_pool_size), so a burst after a quiet spell does not wait for
    /// PostgreSQL logins; at most the pool size. 0 opens them on demand.
    #[arg(long, env = "TIDEPOOL_POOLER_MIN_POOL_SIZE", default_value_t = 0)]
    pub min_pool_size: u32,

    /// Client connections PgBouncer accepts: max_client_conn.
    #[arg(long, env = "TIDEPOOL_POOLER_MAX_CLIENT_CONN", default_value_t = 1000)]
    pub max_client_conn: u32,

    /// Longest a client's query waits for a server connection inside
    /// PgBouncer: the backstop behind the application's own bounded wait.
    #[arg(long, env = "TIDEPOOL_POOLER_QUERY_WAIT_TIMEOUT", default_value = "30s", value_parser = parse_std_duration)]
    pub query_wait_timeout: Duration,

    /// Where PgBouncer writes its pid file; none if unset.
    #[arg(long, env = "TIDEPOOL_POOLER_PIDFILE")]
    pub pidfile: Option<PathBuf>,

    /// Where PgBouncer writes its log; standard error if unset.
    #[arg(long, env = "TIDEPOOL_POOLER_LOGFILE")]
    pub logfile: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PoolerExporterArgs {
    /// Where /metrics and /healthz are served (pgbouncer_exporter's port).
    #[arg(long, env = "TIDEPOOL_POOLER_EXPORTER_LISTEN", default_value = "0.0.0.0:9127")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub pooler_stats: PoolerStatsArgs,
}

impl PoolerExporterArgs {
    /// The admin console to read, or why there is none.
    pub(crate) fn stats(self) -> Option<PoolerStatsSettings> {
        let stats = self.pooler_stats;
        stats.pooler_stats_url.map(|url| PoolerStatsSettings {
            url,
            password_file: stats.pooler_stats_password_file,
            timeout: stats.pooler_stats_timeout.into(),
        })
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PgpassArgs {
    /// A folder with one file per key, as a mounted database Secret has
    /// them (`username`, `password`, `host`, `port`, `dbname`).
    #[arg(long, value_name = "DIR")]
    pub from_dir: PathBuf,

    /// The password file to write (its folder is created if missing).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(argv: &[&str]) -> Command {
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{argv:?} does not parse: {e}"),
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_never_shows_environment_secrets() {
        std::env::set_var("DATABASE_URL", "postgres://u:hunter2@h/db");
        let help = Cli::command()
            .find_subcommand_mut("web")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        std::env::remove_var("DATABASE_URL");
        assert!(help.contains("DATABASE_URL"), "help should name the variable");
        assert!(!help.contains("hunter2"), "{help}");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_std_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_std_duration("5").unwrap_err().contains("examples"));
    }

    #[test]
    fn the_command_line_defaults_are_the_settings_defaults() {
        let Command::Worker(worker) = parse(&["app", "worker", "--database-url", "postgres://u@h/db"]) else {
            panic!("not a worker")
        };
        let (parsed, defaults) = (worker.into_settings(), WorkerSettings::default());
        assert_eq!(
            (parsed.concurrency, parsed.batch_size, parsed.lease, parsed.heartbeat_interval, parsed.retry),
            (
                defaults.concurrency,
                defaults.batch_size,
                defaults.lease,
                defaults.heartbeat_interval,
                defaults.retry
            )
        );
        assert_eq!(
            (parsed.result_retention, parsed.dead_retention),
            (defaults.result_retention, defaults.dead_retention)
        );
        assert_eq!(parsed.queues, defaults.queues);
        assert!(parsed.validate().is_ok());
        let Command::Web(web) = parse(&["app", "web", "--database-url", "postgres://u@h/db"]) else {
            panic!("not web")
        };
        let (parsed, defaults) = (web.into_settings(), WebSettings::default());
        assert_eq!(
            (
                parsed.listen,
                parsed.max_in_flight,
                parsed.max_body_bytes,
                parsed.drain_delay,
                parsed.shutdown_timeout
            ),
            (
                defaults.listen,
                defaults.max_in_flight,
                defaults.max_body_bytes,
                defaults.drain_delay,
                defaults.shutdown_timeout
            )
        );
        let db = DatabaseSettings::default();
        assert_eq!(
            (parsed.database.pool_wait, parsed.database.query_timeout, parsed.database.readiness_timeout),
            (db.pool_wait, db.query_timeout, db.readiness_timeout)
        );
    }

    #[test]
    fn a_combination_the_settings_refuse_parses_and_is_refused_by_them() {
        let argv = [
            "app",
            "worker",
            "--database-url",
            "postgres://u@h/db",
            "--lease",
            "10s",
            "--heartbeat-interval",
            "6s",
        ];
        let Command::Worker(worker) = parse(&argv) else { panic!("not a worker") };
        let from_the_command_line = worker.into_settings().validate().expect_err("refused");
        let in_code = WorkerSettings {
            database: DatabaseSettings::new("postgres://u@h/db"),
            lease: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(6),
            ..WorkerSettings::default()
        }
        .validate()
        .expect_err("refused");
        assert_eq!(from_the_command_line, in_code);
    }

    /// Every variable the operator sets on a pod is one a subcommand reads.
    #[test]
    fn the_command_line_reads_every_variable_of_the_pod_contract() {
        let cli = Cli::command();
        let read: Vec<String> = cli
            .get_subcommands()
            .flat_map(|command| command.get_arguments().chain(cli.get_arguments()))
            .filter_map(|arg| arg.get_env().map(|name| name.to_string_lossy().into_owned()))
            .collect();
        for name in tidepool_contract::env::ALL {
            assert!(read.iter().any(|r| r == name), "no flag reads {name}");
        }
    }

    /// Every flag and variable the runtime's reference names is one a
    /// subcommand reads, and every default its tables quote is the
    /// command line's (docs/runtime.md from "The command line" on, and
    /// docs/queue.md).
    #[test]
    fn the_reference_quotes_the_command_line() {
        let runtime = include_str!("../../docs/runtime.md");
        let reference = [
            runtime.split_once("## The command line").map_or(runtime, |(_, rest)| rest),
            include_str!("../../docs/queue.md"),
        ]
        .concat();
        let cli = Cli::command();
        let args: Vec<&clap::Arg> =
            cli.get_subcommands().flat_map(|c| c.get_arguments()).chain(cli.get_arguments()).collect();
        let by_env = |name: &str| args.iter().copied().find(|a| a.get_env().is_some_and(|e| e == name));
        let words = |prefix: &'static str| {
            reference
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .filter(move |w| w.starts_with(prefix) && w.len() > prefix.len())
        };
        let is_flag = |f: &&str| f.as_bytes().get(2).is_some_and(u8::is_ascii_lowercase) && *f != "--help";
        for flag in words("--").filter(is_flag) {
            let long = &flag[2..];
            assert!(
                args.iter().any(|a| a.get_long() == Some(long)),
                "docs name {flag}, which no subcommand has"
            );
        }
        for variable in words("TIDEPOOL_") {
            assert!(by_env(variable).is_some(), "docs name {variable}, which no flag reads");
        }
        // Table rows: | `VARIABLE` | default | meaning |
        let mut checked = 0;
        for row in reference.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (Some(name), Some(quoted)) = (cells.get(1), cells.get(2)) else { continue };
            let name = name.trim_matches('`');
            let Some(arg) = by_env(name) else { continue };
            let Some(default) = arg.get_default_values().first() else { continue };
            let default = default.to_string_lossy();
            let in_bytes = quoted
                .strip_suffix(" MiB")
                .and_then(|n| n.parse::<u64>().ok())
                .map(|n| (n * 1024 * 1024).to_string());
            assert!(
                *quoted == default || in_bytes.as_deref() == Some(&*default),
                "docs give {name} the default {quoted}, the command line {default}"
            );
            checked += 1;
        }
        assert!(checked >= 5, "the tables' defaults were found ({checked})");
    }
}
