//! The pod contract: what the operator writes into a pod and the runtime
//! (`tidepool`, or an application built on it) reads there, named once.
//!
//! The operator renders each app container with the [`env`](mod@env) variables
//! below, mounts the database Secret ([`secret`]) as files and the pooler's
//! stats password as [`STATS_PASSWORD_FILE`], probes [`HEALTH_PATH`] and
//! [`READY_PATH`], and sizes a worker pod's PgBouncer share for the task
//! pool plus [`QUEUE_POOL_SIZE`]. The runtime's command line reads the same
//! variables (its clap attributes name these constants), its servers answer
//! on the same paths, and its worker opens exactly that many connections
//! for itself. A rename on one side is a compile error on the other, not a
//! pod that starts with a default.
//!
//! Every Tidepool process serves HTTP with the one bounded server in
//! [`server`]: the web tier, the worker's probes, the operator's endpoints.
//!
//! No dependency on Kubernetes or PostgreSQL: plain names, one parser, one
//! server.

pub mod env;
pub mod secret;
pub mod server;

/// Connections a worker keeps for the queue's own statements (claims,
/// heartbeats, completions, maintenance), beside its task pool: part of a
/// worker pod's share.
pub const QUEUE_POOL_SIZE: usize = 4;

/// The file, in the folder `tidepool pooler-config --out-dir` writes, that
/// holds the PgBouncer stats user's password (the app reads PgBouncer's
/// figures for its `/metrics` as that user).
pub const STATS_PASSWORD_FILE: &str = "stats.password";

/// Liveness: the process runs (web, worker and operator answer it).
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness: the process can do its work (its database answers).
pub const READY_PATH: &str = "/readyz";
/// Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// The file, in the same folder, with the password of the pod's own
/// PgBouncer user (`tidepool pooler-config --client-user`), generated at
/// the pod's start: the app logs in to its PgBouncer with it.
pub const CLIENT_PASSWORD_FILE: &str = "client.password";
/// The same password as a libpq password file (0600), for `PGPASSFILE`.
pub const CLIENT_PASSFILE: &str = "client.pgpass";
