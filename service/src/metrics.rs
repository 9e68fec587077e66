//! Prometheus metrics of `tidepool web` ([`Metrics`]) and `tidepool worker`
//! ([`WorkerMetrics`]), each served at its process's `/metrics`.
//!
//! Who exports what, so a dashboard never counts a thing twice:
//! - `tidepool_jobs_enqueued_total`: the process that enqueued (`web`, for
//!   `POST /tasks/`); sum it across pods.
//! - job counters and histograms (`tidepool_jobs_started_total`, ...): the
//!   worker that ran the attempt; sum them across pods.
//! - `tidepool_queue_available_jobs` and `tidepool_queue_oldest_job_age_seconds`
//!   describe the database, not the process: every worker exports them for
//!   the queues it serves, so aggregate them with `max by (queue)`, never `sum`.
//!
//! Names follow Prometheus conventions: a `tidepool_` prefix, base units
//! (seconds), `_total` on counters. Route labels are route *templates*
//! (`/slow-query/`), and unknown paths share the label `unmatched`, so a
//! scanner cannot blow up the series count. Pool gauges are read from the
//! pool at scrape time rather than kept up to date on every checkout.

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::db::PoolStatus;

/// Request latency buckets, seconds: from a cache hit to the 60 s slow query.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Connection wait buckets, seconds: mostly zero, up to a generous pool wait.
const POOL_WAIT_BUCKETS: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Job duration buckets, seconds: from a no-op to a long report.
const JOB_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Queue latency buckets, seconds: from due to claimed.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

/// A counter's value summed over its labels (what a `sum` over the
/// series would give).
pub fn counter_total(counter: &IntCounterVec) -> u64 {
    counter_total_where(counter, |_| true)
}

/// [`counter_total`] over the series whose label `name` is `value`.
pub fn counter_total_with(counter: &IntCounterVec, name: &str, value: &str) -> u64 {
    counter_total_where(counter, |labels| labels.iter().any(|l| l.name() == name && l.value() == value))
}

fn counter_total_where(
    counter: &IntCounterVec,
    keep: impl Fn(&[prometheus::proto::LabelPair]) -> bool,
) -> u64 {
    use prometheus::core::Collector;
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter(|m| keep(m.get_label()))
        .map(|m| m.get_counter().value() as u64)
        .sum()
}

fn schedule_gauge(registry: &Registry, name: &str, help: &str) -> Result<GaugeVec, prometheus::Error> {
    register(registry, GaugeVec::new(Opts::new(name, help), &["schedule"])?)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> Result<Histogram, prometheus::Error> {
    register(registry, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?)
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    register(registry, HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?)
}

/// A registry holding the `process_*` metrics every Tidepool process exports.
fn process_registry() -> Result<Registry, prometheus::Error> {
    let registry = Registry::new();
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    Ok(registry)
}

/// The gauges of one database pool, read from the pool at scrape time.
#[derive(Clone)]
struct PoolGauges {
    max_size: IntGauge,
    size: IntGauge,
    available: IntGauge,
    waiting: IntGauge,
}

impl PoolGauges {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(Self {
            max_size: register(
                registry,
                IntGauge::new(
                    "tidepool_db_pool_max_size",
                    "Configured maximum of pooled client connections to PgBouncer.",
                )?,
            )?,
            size: register(
                registry,
                IntGauge::new(
                    "tidepool_db_pool_connections",
                    "Client connections to PgBouncer currently open in the pool.",
                )?,
            )?,
            available: register(
                registry,
                IntGauge::new(
                    "tidepool_db_pool_available_connections",
                    "Open pooled connections not in use.",
                )?,
            )?,
            waiting: register(
                registry,
                IntGauge::new("tidepool_db_pool_waiting", "Callers waiting for a pooled connection.")?,
            )?,
        })
    }

    fn set(&self, pool: PoolStatus) {
        self.max_size.set(to_i64(pool.max_size));
        self.size.set(to_i64(pool.size));
        self.available.set(to_i64(pool.available));
        self.waiting.set(to_i64(pool.waiting));
    }
}

fn encode(registry: &Registry) -> Result<Vec<u8>, prometheus::Error> {
    let mut out = Vec::with_capacity(16 * 1024);
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(out)
}

/// Metrics of a web process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `tidepool_http_requests_total`: HTTP requests answered, by route, method and status.
    pub http_requests: IntCounterVec,
    /// `tidepool_http_request_duration_seconds`: Time from a request's headers to its response, by route, method and status.
    pub http_request_duration: HistogramVec,
    /// `tidepool_http_requests_in_flight`: HTTP requests being handled now, probes included.
    pub http_requests_in_flight: IntGauge,
    /// `TIDEPOOL_MAX_IN_FLIGHT`, for dashboards to put beside the gauge.
    pub http_requests_in_flight_limit: IntGauge,
    /// `tidepool_http_requests_shed_total`: Requests refused with 503 because a limit was reached: reason=in_flight_limit (too many requests at once) or db_pool_wait (no database connection within the wait).
    pub http_requests_shed: IntCounterVec,
    /// Handlers that panicked (each answered 500; the process lives on).
    pub http_handler_panics: IntCounter,
    /// `tidepool_db_pool_wait_seconds`: Time tasks spent waiting for a pooled database connection.
    pub db_pool_wait: Histogram,
    /// `tidepool_jobs_enqueued_total`: Jobs enqueued by this process (duplicates of a pending unique key not counted), by task and queue.
    pub jobs_enqueued: IntCounterVec,
    pool: PoolGauges,
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = process_registry()?;
        let by_request = &["route", "method", "status"];
        Ok(Self {
            http_requests: counter_vec(
                &registry,
                "tidepool_http_requests_total",
                "HTTP requests answered, by route, method and status.",
                by_request,
            )?,
            http_request_duration: histogram_vec(
                &registry,
                "tidepool_http_request_duration_seconds",
                "Time from a request's headers to its response, by route, method and status.",
                REQUEST_BUCKETS,
                by_request,
            )?,
            http_requests_in_flight: register(
                &registry,
                IntGauge::new(
                    "tidepool_http_requests_in_flight",
                    "HTTP requests being handled now, probes included.",
                )?,
            )?,
            http_requests_in_flight_limit: register(
                &registry,
                IntGauge::new(
                    "tidepool_http_requests_in_flight_limit",
                    "Requests handled at once before more are shed (TIDEPOOL_MAX_IN_FLIGHT; probes are not counted against it).",
                )?,
            )?,
            http_requests_shed: counter_vec(
                &registry,
                "tidepool_http_requests_shed_total",
                "Requests refused with 503 because a limit was reached: reason=in_flight_limit (too many requests at once) or db_pool_wait (no database connection within the wait).",
                &["reason"],
            )?,
            http_handler_panics: register(
                &registry,
                IntCounter::new(
                    "tidepool_http_handler_panics_total",
                    "Request handlers that panicked; each was answered 500 and the process went on serving.",
                )?,
            )?,
            db_pool_wait: histogram(
                &registry,
                "tidepool_db_pool_wait_seconds",
                "Time spent waiting for a pooled database connection, shed waits included.",
                POOL_WAIT_BUCKETS,
            )?,
            jobs_enqueued: counter_vec(
                &registry,
                "tidepool_jobs_enqueued_total",
                "Jobs enqueued by this process (duplicates of a pending unique key not counted), by task and queue.",
                &["task", "queue"],
            )?,
            pool: PoolGauges::new(&registry)?,
            registry,
        })
    }

    /// Renders every metric in the Prometheus text format, after refreshing
    /// the pool gauges from `pool`.
    pub fn render(&self, pool: PoolStatus) -> Result<Vec<u8>, prometheus::Error> {
        self.pool.set(pool);
        encode(&self.registry)
    }
}

/// Metrics of a `tidepool worker`. Job counters are labelled by task
/// (registered names only; anything else is `unknown`) and queue (the
/// worker's own `--queues`), so the series count is bounded.
#[derive(Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    /// `tidepool_jobs_started_total`.
    pub jobs_started: IntCounterVec,
    /// `tidepool_jobs_succeeded_total`.
    pub jobs_succeeded: IntCounterVec,
    /// `tidepool_jobs_failed_total`.
    pub jobs_failed: IntCounterVec,
    /// `tidepool_jobs_retried_total`.
    pub jobs_retried: IntCounterVec,
    /// `tidepool_jobs_dead_total`.
    pub jobs_dead: IntCounterVec,
    /// `tidepool_jobs_cancelled_total`.
    pub jobs_cancelled: IntCounterVec,
    /// `tidepool_jobs_handed_back_total`.
    pub jobs_handed_back: IntCounterVec,
    /// `tidepool_jobs_lease_lost_total`.
    pub jobs_lease_lost: IntCounterVec,
    /// `tidepool_jobs_rescued_total`: Jobs of other (dead) workers whose lease expired, failed by this worker's maintenance, by outcome.
    pub jobs_rescued: IntCounterVec,
    /// `tidepool_job_duration_seconds`: Time an attempt ran, by task, queue and outcome (succeeded, failed, timeout, cancelled, handed_back, lease_lost).
    pub job_duration: HistogramVec,
    /// `tidepool_job_queue_latency_seconds`: Time from when a job was due (enqueued, scheduled time or retry time) to when it was claimed, by queue.
    pub job_queue_latency: HistogramVec,
    /// `tidepool_jobs_running`: Jobs this worker holds now: running or being recorded.
    pub jobs_running: IntGauge,
    /// `tidepool_queue_available_jobs`.
    pub queue_available: IntGaugeVec,
    /// `tidepool_queue_oldest_job_age_seconds`.
    pub queue_oldest_age: GaugeVec,
    /// `tidepool_db_pool_wait_seconds`: Time tasks spent waiting for a pooled database connection.
    pub db_pool_wait: Histogram,
    /// `tidepool_worker_queue_pool_wait_seconds`: Time the worker's own queue operations (claims, completions, heartbeats) waited for one of its fixed connections.
    pub queue_db_pool_wait: Histogram,
    /// `tidepool_worker_claim_loop_turns_total`: Rounds of the claim loop, failed claims included; liveness fails when it stops going round.
    pub claim_loop_turns: IntCounter,
    /// `tidepool_schedule_last_run_timestamp_seconds`.
    pub schedule_last_run: GaugeVec,
    /// `tidepool_schedule_next_run_timestamp_seconds`.
    pub schedule_next_run: GaugeVec,
    /// `tidepool_schedule_grace_seconds`.
    pub schedule_grace: GaugeVec,
    /// `tidepool_schedule_missed_occurrences`.
    pub schedule_missed: IntGaugeVec,
    /// `tidepool_schedule_occurrences_enqueued_total`.
    pub schedule_enqueued: IntCounterVec,
    pool: PoolGauges,
}

impl WorkerMetrics {
    /// Registers every series.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = process_registry()?;
        let by_task = &["task", "queue"];
        let counter = |name: &str, help: &str| counter_vec(&registry, name, help, by_task);
        Ok(Self {
            jobs_started: counter("tidepool_jobs_started_total", "Attempts started, by task and queue.")?,
            jobs_succeeded: counter(
                "tidepool_jobs_succeeded_total",
                "Attempts that succeeded and were recorded, by task and queue.",
            )?,
            jobs_failed: counter(
                "tidepool_jobs_failed_total",
                "Attempts that failed (error, timeout or panic), by task and queue; each is then retried or dead.",
            )?,
            jobs_retried: counter(
                "tidepool_jobs_retried_total",
                "Failed attempts scheduled to run again after a backoff, by task and queue.",
            )?,
            jobs_dead: counter(
                "tidepool_jobs_dead_total",
                "Jobs moved to the dead table: out of attempts or a fatal error, by task and queue.",
            )?,
            jobs_cancelled: counter(
                "tidepool_jobs_cancelled_total",
                "Running jobs this worker stopped because they were cancelled, by task and queue.",
            )?,
            jobs_handed_back: counter(
                "tidepool_jobs_handed_back_total",
                "Claimed jobs given back unfinished at shutdown (they run again elsewhere), by task and queue.",
            )?,
            jobs_lease_lost: counter(
                "tidepool_jobs_lease_lost_total",
                "Attempts abandoned because their lease was taken away (the worker stalled past it), by task and queue.",
            )?,
            jobs_rescued: counter_vec(
                &registry,
                "tidepool_jobs_rescued_total",
                "Jobs of other (dead) workers whose lease expired, failed by this worker's maintenance, by outcome.",
                &["outcome"],
            )?,
            job_duration: histogram_vec(
                &registry,
                "tidepool_job_duration_seconds",
                "Time an attempt ran, by task, queue and outcome (succeeded, failed, timeout, cancelled, handed_back, lease_lost).",
                JOB_BUCKETS,
                &["task", "queue", "outcome"],
            )?,
            job_queue_latency: histogram_vec(
                &registry,
                "tidepool_job_queue_latency_seconds",
                "Time from when a job was due (enqueued, scheduled time or retry time) to when it was claimed, by queue.",
                LATENCY_BUCKETS,
                &["queue"],
            )?,
            jobs_running: register(
                &registry,
                IntGauge::new("tidepool_jobs_running", "Jobs this worker holds now: running or being recorded.")?,
            )?,
            queue_available: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tidepool_queue_available_jobs",
                        "Due jobs waiting in the queue (database-wide; every worker exports it: use max by (queue)).",
                    ),
                    &["queue"],
                )?,
            )?,
            queue_oldest_age: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "tidepool_queue_oldest_job_age_seconds",
                        "Age of the oldest due job waiting in the queue, 0 when empty (database-wide: use max by (queue)).",
                    ),
                    &["queue"],
                )?,
            )?,
            db_pool_wait: histogram(
                &registry,
                "tidepool_db_pool_wait_seconds",
                "Time tasks spent waiting for a pooled database connection.",
                POOL_WAIT_BUCKETS,
            )?,
            queue_db_pool_wait: histogram(
                &registry,
                "tidepool_worker_queue_pool_wait_seconds",
                "Time the worker's own queue operations (claims, completions, heartbeats) waited for one of its fixed connections.",
                POOL_WAIT_BUCKETS,
            )?,
            claim_loop_turns: register(
                &registry,
                IntCounter::new(
                    "tidepool_worker_claim_loop_turns_total",
                    "Rounds of the claim loop, failed claims included; /healthz fails when it stops going round.",
                )?,
            )?,
            schedule_last_run: schedule_gauge(
                &registry,
                "tidepool_schedule_last_run_timestamp_seconds",
                "The latest occurrence of the schedule enqueued, as a Unix time; 0 if none yet (database-wide: use max by (schedule)).",
            )?,
            schedule_next_run: schedule_gauge(
                &registry,
                "tidepool_schedule_next_run_timestamp_seconds",
                "The schedule's next occurrence, as a Unix time (database-wide: use max by (schedule)).",
            )?,
            schedule_grace: schedule_gauge(
                &registry,
                "tidepool_schedule_grace_seconds",
                "How late an occurrence of the schedule may be enqueued and still be on time.",
            )?,
            schedule_missed: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tidepool_schedule_missed_occurrences",
                        "Occurrences of the schedule skipped as missed (older than its grace when found), in all (database-wide: use max by (schedule)).",
                    ),
                    &["schedule"],
                )?,
            )?,
            schedule_enqueued: counter_vec(
                &registry,
                "tidepool_schedule_occurrences_enqueued_total",
                "Occurrences of the schedule this worker enqueued (sum by (schedule) over workers).",
                &["schedule"],
            )?,
            pool: PoolGauges::new(&registry)?,
            registry,
        })
    }

    /// Starts every job counter of each `task` and `queue` at 0, so that
    /// dashboards and `rate()` see the first event of each (a series that
    /// appears at 2 shows no increase).
    pub fn start_counters<'a>(&self, tasks: impl Iterator<Item = &'a str>, queues: &[String]) {
        let counters = [
            &self.jobs_started,
            &self.jobs_succeeded,
            &self.jobs_failed,
            &self.jobs_retried,
            &self.jobs_dead,
            &self.jobs_cancelled,
            &self.jobs_handed_back,
            &self.jobs_lease_lost,
        ];
        for task in tasks {
            for queue in queues {
                for counter in counters {
                    counter.with_label_values(&[task, queue]);
                }
            }
        }
    }

    /// Renders every metric, after refreshing the task pool's gauges.
    pub fn render(&self, task_pool: PoolStatus) -> Result<Vec<u8>, prometheus::Error> {
        self.pool.set(task_pool);
        encode(&self.registry)
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pool_gauges_and_counters() {
        let metrics = Metrics::new().expect("metric definitions are valid");
        metrics.http_requests.with_label_values(&["/row/", "GET", "200"]).inc();
        metrics.http_requests_shed.with_label_values(&["db_pool_wait"]).inc();
        let text = String::from_utf8(
            metrics.render(PoolStatus { max_size: 20, size: 3, available: 1, waiting: 7 }).expect("encodes"),
        )
        .expect("utf-8");
        assert!(text.contains("tidepool_db_pool_max_size 20"), "{text}");
        assert!(text.contains("tidepool_db_pool_waiting 7"), "{text}");
        assert!(
            text.contains(r#"tidepool_http_requests_total{method="GET",route="/row/",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"tidepool_http_requests_shed_total{reason="db_pool_wait"} 1"#), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn worker_metrics_render_jobs_queues_and_pools() {
        let metrics = WorkerMetrics::new().expect("metric definitions are valid");
        metrics.jobs_succeeded.with_label_values(&["noop", "default"]).inc();
        metrics.queue_available.with_label_values(&["default"]).set(7);
        let text = String::from_utf8(
            metrics.render(PoolStatus { max_size: 50, size: 2, available: 2, waiting: 0 }).expect("encodes"),
        )
        .expect("utf-8");
        assert!(text.contains(r#"tidepool_jobs_succeeded_total{queue="default",task="noop"} 1"#), "{text}");
        assert!(text.contains(r#"tidepool_queue_available_jobs{queue="default"} 7"#), "{text}");
        assert!(text.contains("tidepool_db_pool_max_size 50"), "{text}");
        assert!(text.contains("tidepool_worker_queue_pool_wait_seconds_bucket"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn job_counters_start_at_zero_for_each_task_and_queue() {
        let metrics = WorkerMetrics::new().expect("metrics");
        metrics
            .start_counters(["noop", "slow_query"].into_iter(), &["default".to_owned(), "mail".to_owned()]);
        let pool = PoolStatus { max_size: 2, size: 0, available: 0, waiting: 0 };
        let text = String::from_utf8(metrics.render(pool).expect("renders")).expect("utf-8");
        for line in [
            r#"tidepool_jobs_dead_total{queue="mail",task="slow_query"} 0"#,
            r#"tidepool_jobs_retried_total{queue="default",task="noop"} 0"#,
            r#"tidepool_jobs_started_total{queue="default",task="slow_query"} 0"#,
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
