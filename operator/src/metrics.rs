//! The operator's own Prometheus metrics, served on `/metrics`
//! ([`crate::http`]): reconciles and their duration by result, errors by
//! kind (a bounded set, never an object's name), and whether this replica
//! leads, and its writes to the API by kind (none at rest).

use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// How a reconcile ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The children were applied.
    Applied,
    /// The spec could not be applied (missing Secret or key, invalid spec,
    /// budget that cannot fit); status says why.
    Blocked,
    /// The Tidepool or its namespace is being deleted: nothing is written.
    Deleting,
    /// The API refused or failed; retried.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Blocked => "blocked",
            Outcome::Deleting => "deleting",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    writes: IntCounterVec,
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("tidepool_operator".into()), None)?;
        let reconciles =
            IntCounterVec::new(Opts::new("reconciles_total", "Reconciles, by result."), &["result"])?;
        let errors = IntCounterVec::new(
            Opts::new("reconcile_errors_total", "Failed reconciles, by kind of error."),
            &["kind"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "How long a reconcile took, by result.")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["result"],
        )?;
        let leader = IntGauge::new("leader", "1 while this replica leads (writes), else 0.")?;
        let writes = IntCounterVec::new(
            Opts::new(
                "api_writes_total",
                "Writes to the Kubernetes API (applies, status patches, deletes), by kind.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(writes.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        for result in [Outcome::Applied, Outcome::Blocked, Outcome::Deleting, Outcome::Error] {
            reconciles.with_label_values(&[result.label()]);
        }
        Ok(Self { registry, reconciles, errors, duration, writes, leader })
    }

    /// Records one reconcile that started at `started`.
    pub fn record(&self, outcome: Outcome, started: Instant) {
        self.reconciles.with_label_values(&[outcome.label()]).inc();
        self.histogram(outcome).observe(started.elapsed().as_secs_f64());
    }

    /// The counter of writes of objects of `kind`.
    pub fn writes(&self, kind: &str) -> IntCounter {
        self.writes.with_label_values(&[kind])
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    fn histogram(&self, outcome: Outcome) -> Histogram {
        self.duration.with_label_values(&[outcome.label()])
    }

    /// The Prometheus text format.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_result() {
        let metrics = Metrics::new().expect("metrics");
        metrics.record(Outcome::Applied, Instant::now());
        metrics.error("kube_api");
        let text = String::from_utf8(metrics.render().expect("renders")).expect("utf-8");
        assert!(text.contains("tidepool_operator_reconciles_total{result=\"applied\"} 1"), "{text}");
        assert!(text.contains("tidepool_operator_reconciles_total{result=\"error\"} 0"), "{text}");
        assert!(text.contains("tidepool_operator_reconcile_errors_total{kind=\"kube_api\"} 1"), "{text}");
        assert!(
            text.contains("tidepool_operator_reconcile_duration_seconds_count{result=\"applied\"} 1"),
            "{text}"
        );
    }
}
