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
    /// The file holding the password of the pooled connection: the pod's
    /// own PgBouncer user's, written at the pod's start (the migration Job:
    /// the mounted Secret's key).
    DB_PASSWORD_FILE = "TIDEPOOL_DB_PASSWORD_FILE";
    /// The file holding the direct connection's password (the mounted
    /// Secret's key), for the worker's LISTEN session alone.
    DIRECT_DB_PASSWORD_FILE = "TIDEPOOL_DIRECT_DB_PASSWORD_FILE";
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

/// The plan as every container of a tier gets it, whatever the container
/// runs (Tidepool's own process or an application's: gunicorn, Celery, a
/// Node server), beside [`DATABASE_URL`] and [`DB_PASSWORD_FILE`]. An
/// application maps them onto its framework's knobs with Kubernetes'
/// `$(NAME)` expansion (docs/foreign-apps.md).
pub mod plan {
    variables! {
        /// PgBouncer's address in the pod (libpq's variables: psycopg2,
        /// Rails and node-postgres read them).
        HOST = "PGHOST";
        /// PgBouncer's port in the pod.
        PORT = "PGPORT";
        /// The database, as PgBouncer names it.
        DATABASE = "PGDATABASE";
        /// The pod's own PgBouncer user (not a role of the server).
        USER = "PGUSER";
        /// A libpq password file (0600) with that user's pod-local password.
        PASSFILE = "PGPASSFILE";
        /// `disable`: the sidecar is on loopback.
        SSLMODE = "PGSSLMODE";
        /// What one pod of the tier does at once: web, requests (gunicorn's
        /// `--worker-connections`); worker, jobs (Celery's `--concurrency`).
        CONCURRENCY = "TIDEPOOL_CONCURRENCY";
        /// The pod's share: server connections its PgBouncer may hold
        /// (`max_db_connections`). An application pool sized to it never
        /// waits inside PgBouncer.
        DB_CONNECTIONS = "TIDEPOOL_DB_CONNECTIONS";
    }
}

/// libpq's TLS files for a direct connection to PostgreSQL (an
/// application's migration Job), from the Tidepool's `database.tls`, beside
/// [`plan::SSLMODE`] with its mode. Set only when the spec gives the file.
pub mod direct {
    variables! {
        /// The roots the server's certificate must lead to.
        SSLROOTCERT = "PGSSLROOTCERT";
        /// A client certificate.
        SSLCERT = "PGSSLCERT";
        /// Its key.
        SSLKEY = "PGSSLKEY";
    }
}

/// The database Secret's keys as variables, from which Kubernetes composes
/// the connection URLs (`$(TIDEPOOL_DB_USER)`): the operator's own, which
/// the runtime never reads.
pub mod composed {
    variables! {
        /// The Secret's `username`.
        DB_USER = "TIDEPOOL_DB_USER";
        /// The Secret's `dbname`.
        DB_NAME = "TIDEPOOL_DB_NAME";
        /// The Secret's `host`.
        DB_HOST = "TIDEPOOL_DB_HOST";
        /// The Secret's `port`.
        DB_PORT = "TIDEPOOL_DB_PORT";
    }
}
