//! The command line: every subcommand's flags, each with the environment
//! variable that sets it, its default and what it is for.
//!
//! Connection URLs carry passwords, so they are read as [`SecretUrl`] (whose
//! `Debug` is redacted) with clap told never to echo environment values in
//! `--help`. They are parsed into a `tokio_postgres::Config` by
//! [`SecretUrl::to_pg_config`], whose errors never quote the URL.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Tidepool: a high-concurrency web and task runtime for PostgreSQL behind PgBouncer.
#[derive(Debug, Parser)]
#[command(name = "tidepool", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP: the demo endpoints, probes and /metrics.
    Web(WebArgs),
    /// Create or update the database schema (idempotent; safe to run concurrently).
    Migrate(MigrateArgs),
    /// Write a PgBouncer configuration (pgbouncer.ini and its auth file) for one upstream database.
    PoolerConfig(PoolerConfigArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, global = true, env = "TIDEPOOL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `tidepool=debug,info`.
    #[arg(long, global = true, env = "TIDEPOOL_LOG", default_value = "info")]
    pub log: String,
}

/// A connection URL that may contain a password. Never printed.
#[derive(Clone)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// Parses the URL (or key=value string) into a tokio-postgres config.
    /// `what` names the setting in the error, e.g. `DATABASE_URL`.
    pub fn to_pg_config(&self, what: &'static str) -> Result<tokio_postgres::Config, InvalidUrl> {
        tokio_postgres::Config::from_str(&self.0).map_err(|source| InvalidUrl { what, source })
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
    source: tokio_postgres::Error,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 5s, 2m)"))
}

/// The pooled database connection and the client pool in front of it.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Pooled connection URL: the local PgBouncer in transaction mode,
    /// e.g. postgres://app:PASSWORD@127.0.0.1:6432/app. Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: SecretUrl,

    /// Client connections this process keeps to PgBouncer: how many requests
    /// can run a query at once. Size it close to this pod's share of server
    /// connections, so waiting happens here, bounded and measured.
    #[arg(long, env = "TIDEPOOL_DB_POOL_SIZE", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub db_pool_size: u32,

    /// Longest a request waits for a free pooled connection before it is shed
    /// with 503 and Retry-After.
    #[arg(long, env = "TIDEPOOL_DB_POOL_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub db_pool_wait: Duration,

    /// Longest to open one connection to PgBouncer (TCP and authentication).
    #[arg(long, env = "TIDEPOOL_DB_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_connect_timeout: Duration,

    /// Longest a query may take beyond its intended duration (a slow query's
    /// own sleep is added to it). Past it the query is cancelled and the
    /// request answers 504.
    #[arg(long, env = "TIDEPOOL_QUERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub query_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct WebArgs {
    /// Address to listen on for HTTP, /metrics included.
    #[arg(long, env = "TIDEPOOL_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Requests handled at once, probes excepted; past it a request is shed
    /// at once with 503 and Retry-After.
    #[arg(long, env = "TIDEPOOL_MAX_IN_FLIGHT", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Open client connections (TCP). At the limit, new connections wait in
    /// the kernel's accept queue until one closes.
    #[arg(long, env = "TIDEPOOL_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Longest a client may take to send a request's headers, and longest a
    /// keep-alive connection may sit idle between requests.
    #[arg(long, env = "TIDEPOOL_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "TIDEPOOL_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: u64,

    /// Longest a client may take to send a request's body; slower gets 408.
    #[arg(long, env = "TIDEPOOL_BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// Longest /readyz waits for PgBouncer to connect and answer `SELECT 1`.
    #[arg(long, env = "TIDEPOOL_READINESS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub readiness_timeout: Duration,

    /// After SIGTERM, how long to keep serving while /readyz answers 503, so
    /// load balancers and Endpoints stop sending traffic before the listener
    /// closes.
    #[arg(long, env = "TIDEPOOL_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// After the listener closes, how long requests in flight may take to
    /// finish. The exit code is 0 if they all did, 3 if the deadline passed.
    /// Keep drain delay + this below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "TIDEPOOL_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: MigrateDatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateDatabaseArgs {
    /// Pooled connection URL, used when no direct URL is given (migrations run
    /// in one transaction, so they are safe through transaction pooling).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: Option<SecretUrl>,

    /// Direct connection URL to PostgreSQL, bypassing PgBouncer; preferred for
    /// migrations when set.
    #[arg(long, env = "TIDEPOOL_DIRECT_DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub direct_database_url: Option<SecretUrl>,

    /// Longest to open the connection.
    #[arg(long, env = "TIDEPOOL_DB_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub db_connect_timeout: Duration,

    /// Longest to wait for another migrator's lock or a table lock.
    #[arg(long, env = "TIDEPOOL_MIGRATE_LOCK_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub lock_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct PoolerConfigArgs {
    /// Upstream PostgreSQL URL with the credentials PgBouncer logs in with,
    /// e.g. postgres://app:PASSWORD@db:5432/app. The password goes only into
    /// the auth file (mode 0600), never into pgbouncer.ini or a log.
    #[arg(long, env = "TIDEPOOL_POOLER_UPSTREAM_URL", hide_env_values = true, value_name = "URL")]
    pub upstream_url: SecretUrl,

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

    /// Client connections PgBouncer accepts: max_client_conn.
    #[arg(long, env = "TIDEPOOL_POOLER_MAX_CLIENT_CONN", default_value_t = 1000)]
    pub max_client_conn: u32,

    /// Longest a client's query waits for a server connection inside
    /// PgBouncer: the backstop behind the application's own bounded wait.
    #[arg(long, env = "TIDEPOOL_POOLER_QUERY_WAIT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub query_wait_timeout: Duration,

    /// Where PgBouncer writes its pid file; none if unset.
    #[arg(long, env = "TIDEPOOL_POOLER_PIDFILE")]
    pub pidfile: Option<PathBuf>,

    /// Where PgBouncer writes its log; standard error if unset.
    #[arg(long, env = "TIDEPOOL_POOLER_LOGFILE")]
    pub logfile: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn secret_url_debug_is_redacted() {
        let url = SecretUrl::new("postgres://u:hunter2@h/db");
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn invalid_url_error_does_not_quote_the_url() {
        let url = SecretUrl::new("postgres://u:hunter2@h:notaport/db");
        let err = url.to_pg_config("DATABASE_URL").unwrap_err().to_string();
        assert!(err.starts_with("DATABASE_URL is not a valid"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
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
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("5").unwrap_err().contains("examples"));
    }
}
