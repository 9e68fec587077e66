//! The environment variables the operator sets on an app container and the
//! runtime's command line reads (each is also a flag: `tidepool web
//! --help` lists them). Only those the operator sets are here; the others
//! are the runtime's own.

/// The pooled connection URL (through the pod's PgBouncer), without the
/// password.
pub const DATABASE_URL: &str = "DATABASE_URL";
/// A direct connection URL to PostgreSQL: the worker's LISTEN session, the
/// migration Job.
pub const DIRECT_DATABASE_URL: &str = "TIDEPOOL_DIRECT_DATABASE_URL";
/// The file holding the database password (the mounted Secret's key).
pub const DB_PASSWORD_FILE: &str = "TIDEPOOL_DB_PASSWORD_FILE";
/// The app's pool of connections to PgBouncer.
pub const DB_POOL_SIZE: &str = "TIDEPOOL_DB_POOL_SIZE";
/// PgBouncer's admin console, for the `pgbouncer_*` series of `/metrics`.
pub const POOLER_STATS_URL: &str = "TIDEPOOL_POOLER_STATS_URL";
/// The stats user's password file.
pub const POOLER_STATS_PASSWORD_FILE: &str = "TIDEPOOL_POOLER_STATS_PASSWORD_FILE";
/// How long a draining process may take before it gives up.
pub const SHUTDOWN_TIMEOUT: &str = "TIDEPOOL_SHUTDOWN_TIMEOUT";
/// `text` or `json`.
pub const LOG_FORMAT: &str = "TIDEPOOL_LOG_FORMAT";
/// Where `web` listens.
pub const LISTEN: &str = "TIDEPOOL_LISTEN";
/// Requests `web` serves at once (the tier's concurrency).
pub const MAX_IN_FLIGHT: &str = "TIDEPOOL_MAX_IN_FLIGHT";
/// How long `web` keeps serving after SIGTERM, while endpoints update.
pub const DRAIN_DELAY: &str = "TIDEPOOL_DRAIN_DELAY";
/// Where `worker` serves its probes and metrics.
pub const WORKER_LISTEN: &str = "TIDEPOOL_WORKER_LISTEN";
/// Jobs a worker runs at once (its task pool).
pub const WORKER_CONCURRENCY: &str = "TIDEPOOL_WORKER_CONCURRENCY";
/// The queues a worker claims from, comma-separated.
pub const WORKER_QUEUES: &str = "TIDEPOOL_WORKER_QUEUES";

/// Every variable above, for a test that the runtime reads them all.
pub const ALL: [&str; 14] = [
    DATABASE_URL,
    DIRECT_DATABASE_URL,
    DB_PASSWORD_FILE,
    DB_POOL_SIZE,
    POOLER_STATS_URL,
    POOLER_STATS_PASSWORD_FILE,
    SHUTDOWN_TIMEOUT,
    LOG_FORMAT,
    LISTEN,
    MAX_IN_FLIGHT,
    DRAIN_DELAY,
    WORKER_LISTEN,
    WORKER_CONCURRENCY,
    WORKER_QUEUES,
];
