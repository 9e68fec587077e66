//! The environment variables the operator sets on an app container and the
//! runtime's command line reads (each is also a flag: `tidepool web
//! --help` lists them). Only those the operator sets are here; the others
//! are the runtime's own.

/// Declares each variable as a constant, and [`ALL`] as the list of them,
/// so no variable is left out of it.
macro_rules! variables {
    ($($(#[$doc:meta])* $name:ident = $value:literal;)*) => {
        $($(#[$doc])* pub const $name: &str = $value;)*

        /// Every variable of this module, for a test that the runtime reads
        /// them all and one that the operator renders no other.
        pub const ALL: &[&str] = &[$($name),*];
    };
}

variables! {
    /// The pooled connection URL (through the pod's PgBouncer), without the
    /// password.
    DATABASE_URL = "DATABASE_URL";
    /// A direct connection URL to PostgreSQL: the worker's LISTEN session, the
    /// migration Job.
    DIRECT_DATABASE_URL = "TIDEPOOL_DIRECT_DATABASE_URL";
    /// The file holding the database password (the mounted Secret's key).
    DB_PASSWORD_FILE = "TIDEPOOL_DB_PASSWORD_FILE";
    /// The app's pool of connections to PgBouncer.
    DB_POOL_SIZE = "TIDEPOOL_DB_POOL_SIZE";
    /// PgBouncer's admin console, for the `pgbouncer_*` series of `/metrics`.
    POOLER_STATS_URL = "TIDEPOOL_POOLER_STATS_URL";
    /// The stats user's password file.
    POOLER_STATS_PASSWORD_FILE = "TIDEPOOL_POOLER_STATS_PASSWORD_FILE";
    /// How long a draining process may take before it gives up.
    SHUTDOWN_TIMEOUT = "TIDEPOOL_SHUTDOWN_TIMEOUT";
    /// `text` or `json`.
    LOG_FORMAT = "TIDEPOOL_LOG_FORMAT";
    /// Where `web` listens.
    LISTEN = "TIDEPOOL_LISTEN";
    /// Requests `web` serves at once (the tier's concurrency).
    MAX_IN_FLIGHT = "TIDEPOOL_MAX_IN_FLIGHT";
    /// How long `web` keeps serving after SIGTERM, while endpoints update.
    DRAIN_DELAY = "TIDEPOOL_DRAIN_DELAY";
    /// Where `worker` serves its probes and metrics.
    WORKER_LISTEN = "TIDEPOOL_WORKER_LISTEN";
    /// Jobs a worker runs at once (its task pool).
    WORKER_CONCURRENCY = "TIDEPOOL_WORKER_CONCURRENCY";
    /// The queues a worker claims from, comma-separated.
    WORKER_QUEUES = "TIDEPOOL_WORKER_QUEUES";
}
