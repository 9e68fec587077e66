//! PgBouncer's own figures, read from its admin console at each scrape and
//! served after the process's metrics on its `/metrics`, under the names and
//! labels of prometheus-community's pgbouncer_exporter (0.12), so that
//! dashboards and alerts written for it work unchanged.
//!
//! Why a collector in the app rather than that exporter as one more
//! sidecar: every Tidepool pod already runs its PgBouncer next to exactly
//! one app process, so the app can read it over loopback with no extra
//! image, container, port or memory per pod; the stats user's password
//! never leaves the pod's in-memory volume; and one scrape gives the app's
//! pool and its PgBouncer's at the same instant, which is what a panel of
//! "requests waiting in the app vs clients waiting in PgBouncer" needs.
//!
//! What a scrape does: one connection as the stats user (`stats_users`: it
//! may run `SHOW`, nothing else) to the admin database `pgbouncer`, the
//! statements below in the simple query protocol (the only one the admin
//! console speaks), then the connection closes. It is a client of the admin
//! console, never a server connection to PostgreSQL, so it costs nothing of
//! the connection budget. The whole scrape is bounded by a timeout; when it
//! fails, `pgbouncer_up` is 0 and the reason is logged.
//!
//! | statement | series |
//! |---|---|
//! | `SHOW POOLS` | `pgbouncer_pools_*` by `database`, `user` (clients active and waiting, servers active, idle, used, tested, logging in, the oldest wait) |
//! | `SHOW STATS_TOTALS` | `pgbouncer_stats_totals_*_total` by `database` (queries, transactions, bytes, time in queries, transactions and waits) |
//! | `SHOW DATABASES` | `pgbouncer_databases_*` by `name`, `host`, `port`, `database`, `force_user`, `pool_mode` (pool size, `max_db_connections` as `max_connections`, current connections) |
//! | `SHOW LISTS` | `pgbouncer_databases`, `pgbouncer_pools`, `pgbouncer_used_clients`, ... |
//! | `SHOW CONFIG` | `pgbouncer_config_max_client_connections`, `pgbouncer_config_max_user_connections` |
//! | `SHOW VERSION` | `pgbouncer_version_info{version}` |
//!
//! A pod whose app is not Tidepool's (gunicorn, Celery) gets the same
//! series from [`export`], `tidepool pooler-exporter`: a second sidecar
//! that serves only them on pgbouncer_exporter's port, 9127.
//!
//! One difference from the exporter: `pgbouncer_pools_client_maxwait_seconds`
//! adds the `maxwait_us` column to `maxwait`, where the exporter reads whole
//! seconds only (a wait of 0.4 s would show as 0).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tidepool_contract::server::{self, Limits};
use tidepool_contract::{HEALTH_PATH, METRICS_PATH};
use tokio::net::TcpListener;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::web::response::{with_body, ApiError, Body};

/// The exporter serves a scraper and a probe: a few connections at once.
const EXPORTER_LIMITS: Limits = Limits { connections: 16, header_read_timeout: Duration::from_secs(10) };

/// Serves `console`'s figures on `/metrics` (each scrape reads the console
/// afresh) and `/healthz` on `listener` until `stop` resolves.
pub async fn export(listener: TcpListener, console: AdminConsole, stop: impl Future<Output = ()>) {
    let handler = move |request: Request<Incoming>| {
        let console = console.clone();
        async move { Ok::<_, Infallible>(exporter_response(&console, &request).await) }
    };
    server::serve(listener, EXPORTER_LIMITS, handler, stop).await;
}

async fn exporter_response(console: &AdminConsole, request: &Request<Incoming>) -> Response<Body> {
    match request.uri().path() {
        _ if request.method() != http::Method::GET => ApiError::method_not_allowed("GET").into_response(),
        METRICS_PATH => with_body(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            console.render().await.into_bytes(),
        ),
        HEALTH_PATH => with_body(StatusCode::OK, "text/plain; charset=utf-8", b"ok\n".to_vec()),
        path => ApiError::not_found(path).into_response(),
    }
}

/// Why PgBouncer's figures could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("PgBouncer's admin console did not answer within {0:?}")]
    Timeout(Duration),
    #[error("PgBouncer's admin console: {0}")]
    Postgres(String),
}

impl From<tokio_postgres::Error> for ScrapeError {
    fn from(e: tokio_postgres::Error) -> Self {
        ScrapeError::Postgres(crate::error_chain(&e))
    }
}

/// What PgBouncer's admin console answers a `SHOW`: its rows, each a map
/// from column name to value (`None` for NULL).
pub type Rows = Vec<BTreeMap<String, Option<String>>>;

/// The admin console of one PgBouncer, as its stats user.
#[derive(Clone)]
pub struct AdminConsole {
    config: tokio_postgres::Config,
    timeout: Duration,
}

impl std::fmt::Debug for AdminConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConsole").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// Each statement a scrape runs, in order.
const STATEMENTS: [&str; 6] =
    ["SHOW POOLS", "SHOW STATS_TOTALS", "SHOW DATABASES", "SHOW LISTS", "SHOW CONFIG", "SHOW VERSION"];

impl AdminConsole {
    /// The console at `config` (database `pgbouncer`), each scrape bounded
    /// by `timeout`.
    pub fn new(mut config: tokio_postgres::Config, timeout: Duration) -> Self {
        config.connect_timeout(timeout);
        config.application_name("tidepool-metrics");
        Self { config, timeout }
    }

    /// The `pgbouncer_*` series in the Prometheus text format: PgBouncer's
    /// figures and `pgbouncer_up 1`, or only `pgbouncer_up 0` when they
    /// could not be read (the reason is logged).
    pub async fn render(&self) -> String {
        let mut out = Exposition::default();
        match self.read().await {
            Ok(answers) => {
                out.gauge(
                    "pgbouncer_up",
                    "1 if PgBouncer's admin console answered this scrape, else 0.",
                    &[],
                    1.0,
                );
                render_answers(&mut out, &answers);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read PgBouncer's figures");
                out.gauge(
                    "pgbouncer_up",
                    "1 if PgBouncer's admin console answered this scrape, else 0.",
                    &[],
                    0.0,
                );
            }
        }
        out.finish()
    }

    /// The answers to [`STATEMENTS`], in order.
    pub async fn read(&self) -> Result<Vec<Rows>, ScrapeError> {
        tokio::time::timeout(self.timeout, self.read_unbounded())
            .await
            .map_err(|_| ScrapeError::Timeout(self.timeout))?
    }

    async fn read_unbounded(&self) -> Result<Vec<Rows>, ScrapeError> {
        let (client, connection) = self.config.connect(NoTls).await?;
        let connection = tokio::spawn(connection);
        let mut answers = Vec::with_capacity(STATEMENTS.len());
        for statement in STATEMENTS {
            let mut rows = Rows::new();
            for message in client.simple_query(statement).await? {
                if let SimpleQueryMessage::Row(row) = message {
                    let columns = row.columns().iter().enumerate();
                    rows.push(
                        columns.map(|(i, c)| (c.name().to_owned(), row.get(i).map(str::to_owned))).collect(),
                    );
                }
            }
            answers.push(rows);
        }
        drop(client);
        let _ = connection.await;
        Ok(answers)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// A column of a `SHOW` that becomes a series: its metric name (after the
/// statement's prefix), kind, the factor to base units, and help.
struct Column(&'static str, &'static str, Kind, f64, &'static str);

/// A `SHOW` whose rows each give one sample of every mapped column.
struct Table {
    prefix: &'static str,
    labels: &'static [&'static str],
    columns: &'static [Column],
}

const MICROS: f64 = 1e-6;

const POOLS: Table = Table {
    prefix: "pgbouncer_pools_",
    labels: &["database", "user"],
    columns: &[
        Column("cl_active", "client_active_connections", Kind::Gauge, 1.0, "Client connections linked to a server connection and able to process queries."),
        Column("cl_active_cancel_req", "client_active_cancel_connections", Kind::Gauge, 1.0, "Client connections that have forwarded query cancellations to the server and are waiting for the server response."),
        Column("cl_waiting", "client_waiting_connections", Kind::Gauge, 1.0, "Client connections waiting on a server connection."),
        Column("cl_waiting_cancel_req", "client_waiting_cancel_connections", Kind::Gauge, 1.0, "Client connections that have not forwarded query cancellations to the server yet."),
        Column("sv_active", "server_active_connections", Kind::Gauge, 1.0, "Server connections linked to a client connection."),
        Column("sv_active_cancel", "server_active_cancel_connections", Kind::Gauge, 1.0, "Server connections that are currently forwarding a cancel request."),
        Column("sv_being_canceled", "server_being_canceled_connections", Kind::Gauge, 1.0, "Server connections waiting to become idle until the cancel requests sent for them complete."),
        Column("sv_idle", "server_idle_connections", Kind::Gauge, 1.0, "Server connections idle and ready for a client query."),
        Column("sv_used", "server_used_connections", Kind::Gauge, 1.0, "Server connections idle for more than server_check_delay, needing server_check_query."),
        Column("sv_tested", "server_testing_connections", Kind::Gauge, 1.0, "Server connections running server_reset_query or server_check_query."),
        Column("sv_login", "server_login_connections", Kind::Gauge, 1.0, "Server connections in the process of logging in."),
    ],
};

const STATS_TOTALS: Table = Table {
    prefix: "pgbouncer_stats_totals_",
    labels: &["database"],
    columns: &[
        Column("server_assignment_count", "server_assignments_total", Kind::Counter, 1.0, "Times a server connection was assigned to a client."),
        Column("xact_count", "sql_transactions_pooled_total", Kind::Counter, 1.0, "SQL transactions pooled."),
        Column("query_count", "queries_pooled_total", Kind::Counter, 1.0, "SQL queries pooled."),
        Column("bytes_received", "received_bytes_total", Kind::Counter, 1.0, "Bytes of network traffic received by PgBouncer."),
        Column("bytes_sent", "sent_bytes_total", Kind::Counter, 1.0, "Bytes of network traffic sent by PgBouncer."),
        Column("xact_time", "server_in_transaction_seconds_total", Kind::Counter, MICROS, "Seconds PgBouncer was connected to PostgreSQL in a transaction, idle in transaction or executing queries."),
        Column("query_time", "queries_duration_seconds_total", Kind::Counter, MICROS, "Seconds PgBouncer was actively connected to PostgreSQL, executing queries."),
        Column("wait_time", "client_wait_seconds_total", Kind::Counter, MICROS, "Seconds clients waited for a server connection."),
        Column("client_parse_count", "client_parses_total", Kind::Counter, 1.0, "Prepared statement Parse messages received from clients."),
        Column("server_parse_count", "server_parses_total", Kind::Counter, 1.0, "Prepared statement Parse messages sent to PostgreSQL."),
        Column("bind_count", "binds_total", Kind::Counter, 1.0, "Prepared statements readied for execution with a Bind message."),
    ],
};

const DATABASES: Table = Table {
    prefix: "pgbouncer_databases_",
    labels: &["name", "host", "port", "database", "force_user", "pool_mode"],
    columns: &[
        Column(
            "pool_size",
            "pool_size",
            Kind::Gauge,
            1.0,
            "Maximum number of server connections (default_pool_size or the database's pool_size).",
        ),
        Column(
            "reserve_pool_size",
            "reserve_pool",
            Kind::Gauge,
            1.0,
            "Maximum number of additional connections for this database.",
        ),
        Column(
            "max_connections",
            "max_connections",
            Kind::Gauge,
            1.0,
            "Maximum number of allowed server connections for this database (max_db_connections).",
        ),
        Column(
            "current_connections",
            "current_connections",
            Kind::Gauge,
            1.0,
            "Current number of server connections for this database.",
        ),
        Column("paused", "paused", Kind::Gauge, 1.0, "1 if this database is paused, else 0."),
        Column("disabled", "disabled", Kind::Gauge, 1.0, "1 if this database is disabled, else 0."),
    ],
};

/// `SHOW LISTS`' rows: list name, series name, help.
const LISTS: &[(&str, &str, &str)] = &[
    ("databases", "pgbouncer_databases", "Count of databases."),
    ("users", "pgbouncer_users", "Count of users."),
    ("pools", "pgbouncer_pools", "Count of pools."),
    ("free_clients", "pgbouncer_free_clients", "Count of free clients."),
    ("used_clients", "pgbouncer_used_clients", "Count of used clients."),
    ("login_clients", "pgbouncer_login_clients", "Count of clients in login state."),
    ("free_servers", "pgbouncer_free_servers", "Count of free servers."),
    ("used_servers", "pgbouncer_used_servers", "Count of used servers."),
    ("dns_names", "pgbouncer_cached_dns_names", "Count of DNS names in the cache."),
    ("dns_zones", "pgbouncer_cached_dns_zones", "Count of DNS zones in the cache."),
    ("dns_queries", "pgbouncer_in_flight_dns_queries", "Count of in-flight DNS queries."),
];

/// `SHOW CONFIG`'s keys that become series: key, series name, help.
const CONFIG: &[(&str, &str, &str)] = &[
    (
        "max_client_conn",
        "pgbouncer_config_max_client_connections",
        "Config maximum number of client connections.",
    ),
    (
        "max_user_connections",
        "pgbouncer_config_max_user_connections",
        "Config maximum number of server connections per user.",
    ),
];

/// The series of every answer (in [`STATEMENTS`]' order).
pub fn render_answers(out: &mut Exposition, answers: &[Rows]) {
    let empty = Rows::new();
    let answer = |i: usize| answers.get(i).unwrap_or(&empty);
    render_table(out, &POOLS, answer(0));
    for row in answer(0) {
        let seconds =
            number(row, "maxwait").unwrap_or(0.0) + number(row, "maxwait_us").unwrap_or(0.0) * MICROS;
        let labels = labels(row, POOLS.labels);
        out.gauge(
            "pgbouncer_pools_client_maxwait_seconds",
            "Age of the oldest unserved client connection, in seconds.",
            &labels,
            seconds,
        );
    }
    render_table(out, &STATS_TOTALS, answer(1));
    render_table(out, &DATABASES, answer(2));
    for row in answer(3) {
        let list = text(row, "list");
        if let Some((_, name, help)) = LISTS.iter().find(|(l, _, _)| *l == list) {
            if let Some(items) = number(row, "items") {
                out.gauge(name, help, &[], items);
            }
        }
    }
    for row in answer(4) {
        let key = text(row, "key");
        if let Some((_, name, help)) = CONFIG.iter().find(|(k, _, _)| *k == key) {
            if let Some(value) = number(row, "value") {
                out.gauge(name, help, &[], value);
            }
        }
    }
    if let Some(row) = answer(5).first() {
        let version = text(row, "version");
        out.gauge("pgbouncer_version_info", "The PgBouncer version info.", &[("version", version)], 1.0);
    }
}

fn render_table(out: &mut Exposition, table: &Table, rows: &Rows) {
    for row in rows {
        let labels = labels(row, table.labels);
        for Column(column, metric, kind, factor, help) in table.columns {
            // A column this PgBouncer's version does not have is left out.
            let Some(value) = number(row, column) else { continue };
            let name = format!("{}{metric}", table.prefix);
            match kind {
                Kind::Gauge => out.gauge(&name, help, &labels, value * factor),
                Kind::Counter => out.counter(&name, help, &labels, value * factor),
            }
        }
    }
}

fn text<'a>(row: &'a BTreeMap<String, Option<String>>, column: &str) -> &'a str {
    row.get(column).and_then(Option::as_deref).unwrap_or_default()
}

fn number(row: &BTreeMap<String, Option<String>>, column: &str) -> Option<f64> {
    row.get(column)?.as_deref()?.parse().ok()
}

fn labels<'a>(
    row: &'a BTreeMap<String, Option<String>>,
    names: &[&'static str],
) -> Vec<(&'static str, &'a str)> {
    names.iter().map(|name| (*name, text(row, name))).collect()
}

/// Series in the Prometheus text format (0.0.4), grouped by family in the
/// order first seen, each family with its HELP and TYPE once.
#[derive(Default)]
pub struct Exposition {
    families: Vec<(String, String, &'static str, String)>,
}

impl Exposition {
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample(name, help, "gauge", labels, value);
    }

    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample(name, help, "counter", labels, value);
    }

    fn sample(&mut self, name: &str, help: &str, kind: &'static str, labels: &[(&str, &str)], value: f64) {
        let index = match self.families.iter().position(|(n, ..)| n == name) {
            Some(index) => index,
            None => {
                self.families.push((name.to_owned(), help.to_owned(), kind, String::new()));
                self.families.len() - 1
            }
        };
        let samples = &mut self.families[index].3;
        samples.push_str(name);
        if !labels.is_empty() {
            samples.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    samples.push(',');
                }
                let _ = write!(samples, "{label}=\"{}\"", escape_label(value));
            }
            samples.push('}');
        }
        let _ = writeln!(samples, " {value}");
    }

    pub fn finish(self) -> String {
        let mut out = String::new();
        for (name, help, kind, samples) in self.families {
            let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
            let _ = writeln!(out, "# TYPE {name} {kind}");
            out.push_str(&samples);
        }
        out
    }
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned))).collect()
    }

    #[test]
    fn pools_become_the_exporters_series_with_the_wait_in_seconds() {
        let pools = vec![row(&[
            ("database", Some("app")),
            ("user", Some("app")),
            ("cl_active", Some("3")),
            ("cl_waiting", Some("2")),
            ("sv_active", Some("3")),
            ("sv_idle", Some("1")),
            ("maxwait", Some("1")),
            ("maxwait_us", Some("250000")),
            ("pool_mode", Some("transaction")),
        ])];
        let mut out = Exposition::default();
        render_answers(&mut out, &[pools]);
        let text = out.finish();
        assert!(text.contains("# TYPE pgbouncer_pools_client_waiting_connections gauge\n"), "{text}");
        assert!(
            text.contains("pgbouncer_pools_client_waiting_connections{database=\"app\",user=\"app\"} 2\n")
        );
        assert!(text.contains("pgbouncer_pools_server_active_connections{database=\"app\",user=\"app\"} 3\n"));
        assert!(text.contains("pgbouncer_pools_client_maxwait_seconds{database=\"app\",user=\"app\"} 1.25\n"));
        // A column this version lacks is left out, not made up.
        assert!(!text.contains("server_login_connections"), "{text}");
    }

    #[test]
    fn stats_are_counters_in_base_units() {
        let stats = vec![row(&[
            ("database", Some("app")),
            ("query_count", Some("10")),
            ("query_time", Some("2500000")),
            ("wait_time", Some("500")),
        ])];
        let mut out = Exposition::default();
        render_answers(&mut out, &[Rows::new(), stats]);
        let text = out.finish();
        assert!(text.contains("# TYPE pgbouncer_stats_totals_queries_pooled_total counter\n"), "{text}");
        assert!(
            text.contains("pgbouncer_stats_totals_queries_duration_seconds_total{database=\"app\"} 2.5\n")
        );
        assert!(text.contains("pgbouncer_stats_totals_client_wait_seconds_total{database=\"app\"} 0.0005\n"));
    }

    #[test]
    fn lists_config_and_version_by_name_and_label_values_escaped() {
        let lists = vec![row(&[("list", Some("used_clients")), ("items", Some("7"))])];
        let config = vec![
            row(&[("key", Some("max_client_conn")), ("value", Some("1000"))]),
            row(&[("key", Some("listen_addr")), ("value", Some("127.0.0.1"))]),
        ];
        let version = vec![row(&[("version", Some("PgBouncer \"1.24.1\""))])];
        let mut out = Exposition::default();
        render_answers(&mut out, &[Rows::new(), Rows::new(), Rows::new(), lists, config, version]);
        let text = out.finish();
        assert!(text.contains("pgbouncer_used_clients 7\n"), "{text}");
        assert!(text.contains("pgbouncer_config_max_client_connections 1000\n"), "{text}");
        assert!(!text.contains("listen_addr"), "{text}");
        assert!(text.contains("pgbouncer_version_info{version=\"PgBouncer \\\"1.24.1\\\"\"} 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 3, "{text}");
    }
}
