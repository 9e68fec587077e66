//! Prometheus metrics of a `tidepool web` process, served at `/metrics`.
//!
//! Names follow Prometheus conventions: a `tidepool_` prefix, base units
//! (seconds), `_total` on counters. Route labels are route *templates*
//! (`/slow-query/`), and unknown paths share the label `unmatched`, so a
//! scanner cannot blow up the series count. Pool gauges are read from the
//! pool at scrape time rather than kept up to date on every checkout.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::db::PoolStatus;

/// Request latency buckets, seconds: from a cache hit to the 60 s slow query.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Connection wait buckets, seconds: mostly zero, up to a generous pool wait.
const POOL_WAIT_BUCKETS: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub http_requests_in_flight: IntGauge,
    pub http_requests_shed: IntCounterVec,
    pub db_pool_wait: Histogram,
    db_pool_max_size: IntGauge,
    db_pool_size: IntGauge,
    db_pool_available: IntGauge,
    db_pool_waiting: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("tidepool_http_requests_total", "HTTP requests answered, by route, method and status."),
            &["route", "method", "status"],
        )?;
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tidepool_http_request_duration_seconds",
                "Time from a request's headers to its response, by route, method and status.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )?;
        let http_requests_in_flight = IntGauge::new(
            "tidepool_http_requests_in_flight",
            "HTTP requests being handled now, probes included.",
        )?;
        let http_requests_shed = IntCounterVec::new(
            Opts::new(
                "tidepool_http_requests_shed_total",
                "Requests refused with 503 because a limit was reached: reason=in_flight_limit (too many requests at once) or db_pool_wait (no database connection within the wait).",
            ),
            &["reason"],
        )?;
        let db_pool_wait = Histogram::with_opts(
            HistogramOpts::new(
                "tidepool_db_pool_wait_seconds",
                "Time spent waiting for a pooled database connection, shed waits included.",
            )
            .buckets(POOL_WAIT_BUCKETS.to_vec()),
        )?;
        let db_pool_max_size = IntGauge::new(
            "tidepool_db_pool_max_size",
            "Configured maximum of pooled client connections to PgBouncer.",
        )?;
        let db_pool_size = IntGauge::new(
            "tidepool_db_pool_connections",
            "Client connections to PgBouncer currently open in the pool.",
        )?;
        let db_pool_available =
            IntGauge::new("tidepool_db_pool_available_connections", "Open pooled connections not in use.")?;
        let db_pool_waiting =
            IntGauge::new("tidepool_db_pool_waiting", "Requests waiting for a pooled connection.")?;

        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_request_duration.clone()))?;
        registry.register(Box::new(http_requests_in_flight.clone()))?;
        registry.register(Box::new(http_requests_shed.clone()))?;
        registry.register(Box::new(db_pool_wait.clone()))?;
        registry.register(Box::new(db_pool_max_size.clone()))?;
        registry.register(Box::new(db_pool_size.clone()))?;
        registry.register(Box::new(db_pool_available.clone()))?;
        registry.register(Box::new(db_pool_waiting.clone()))?;
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;

        Ok(Self {
            registry,
            http_requests,
            http_request_duration,
            http_requests_in_flight,
            http_requests_shed,
            db_pool_wait,
            db_pool_max_size,
            db_pool_size,
            db_pool_available,
            db_pool_waiting,
        })
    }

    /// Renders every metric in the Prometheus text format, after refreshing
    /// the pool gauges from `pool`.
    pub fn render(&self, pool: PoolStatus) -> Result<Vec<u8>, prometheus::Error> {
        self.db_pool_max_size.set(to_i64(pool.max_size));
        self.db_pool_size.set(to_i64(pool.size));
        self.db_pool_available.set(to_i64(pool.available));
        self.db_pool_waiting.set(to_i64(pool.waiting));
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
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
}
