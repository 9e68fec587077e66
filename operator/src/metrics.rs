//! The operator's own Prometheus metrics, served on `/metrics`
//! ([`crate::http`]): reconciles and their duration by result, errors by
//! kind (a bounded set, never an object's name), and whether this replica
//! leads, and its writes to the API by kind (none at rest).
//!
//! And each Tidepool's status as gauges (the leader's only: it is the one
//! that reconciles), labelled `namespace` and `tidepool`, for the
//! dashboards and alerts that put the plan beside what runs: the budget
//! (`tidepool_operator_connections{kind="available|planned_peak|live_peak"}`),
//! each tier's replicas and per-pod share, and the conditions (1 when True).
//! A Tidepool's series go when it does. The scaling decisions by tier and
//! direction, and the queue scalers' readings of PostgreSQL (their number,
//! duration and outcome, and the connections they opened). Scrape them with `honorLabels` (the
//! chart's ServiceMonitor does) so `namespace` stays the Tidepool's.

use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::crd::TidepoolStatus;
use crate::plan::Tier;
use crate::scaler::Direction;
use crate::status::{
    CONNECTION_BUDGET, DATABASE_TLS_VERIFIED, DEGRADED, PROGRESSING, READY, WORKER_AUTOSCALING,
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

/// The step of a reconcile that failed, as the `kind` label of
/// `tidepool_operator_reconcile_errors_total` says it (the controller's
/// `Error::kind` maps each of its variants to one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The Tidepool has no namespace.
    NoNamespace,
    /// Reading the database Secret.
    ReadSecret,
    /// Reading the live Deployments and pods.
    ReadChildren,
    /// Applying (or scaling) a child.
    ApplyChild,
    /// Listing or deleting children the spec no longer has.
    DeleteOrphan,
    /// Admitting a pod (removing its scheduling gate).
    AdmitPod,
    /// Writing the Tidepool's status.
    WriteStatus,
}

impl ErrorKind {
    /// Every kind, for the counters to start at 0.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::NoNamespace,
        ErrorKind::ReadSecret,
        ErrorKind::ReadChildren,
        ErrorKind::ApplyChild,
        ErrorKind::DeleteOrphan,
        ErrorKind::AdmitPod,
        ErrorKind::WriteStatus,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NoNamespace => "no_namespace",
            ErrorKind::ReadSecret => "read_secret",
            ErrorKind::ReadChildren => "read_children",
            ErrorKind::ApplyChild => "apply_child",
            ErrorKind::DeleteOrphan => "delete_orphan",
            ErrorKind::AdmitPod => "admit_pod",
            ErrorKind::WriteStatus => "write_status",
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
    connections: IntGaugeVec,
    replicas: IntGaugeVec,
    share: IntGaugeVec,
    condition: IntGaugeVec,
    scaling_decisions: IntCounterVec,
    database_queries: HistogramVec,
    /// Connections the queue scalers opened to PostgreSQL.
    pub database_connects: IntCounter,
}

const CONNECTION_KINDS: [&str; 3] = ["available", "planned_peak", "live_peak"];
const TIERS: [&str; 2] = ["web", "worker"];
const REPLICA_STATES: [&str; 3] = ["desired", "current", "ready"];
const CONDITIONS: [&str; 6] =
    [READY, CONNECTION_BUDGET, PROGRESSING, DEGRADED, WORKER_AUTOSCALING, DATABASE_TLS_VERIFIED];
const DIRECTIONS: [Direction; 2] = [Direction::Up, Direction::Down];
const QUERY_OUTCOMES: [&str; 2] = ["ok", "error"];

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
        let connections = IntGaugeVec::new(
            Opts::new(
                "connections",
                "A Tidepool's connection budget: available (maxConnections - reservedConnections), \
                 planned_peak (the most its pods may hold, rollouts included), live_peak (the live pods' shares).",
            ),
            &["namespace", "tidepool", "kind"],
        )?;
        let replicas = IntGaugeVec::new(
            Opts::new("tier_replicas", "A Tidepool tier's pods, desired and ready."),
            &["namespace", "tidepool", "tier", "state"],
        )?;
        let share = IntGaugeVec::new(
            Opts::new(
                "tier_server_connections_per_pod",
                "Server connections each pod's PgBouncer of the tier may hold (its share).",
            ),
            &["namespace", "tidepool", "tier"],
        )?;
        let condition = IntGaugeVec::new(
            Opts::new("condition", "A Tidepool's condition: 1 when True, else 0."),
            &["namespace", "tidepool", "type"],
        )?;
        let scaling_decisions = IntCounterVec::new(
            Opts::new(
                "scaling_decisions_total",
                "Changes of a tier's desired replicas: the queue scaler's (worker) and those the operator \
                 applied from the Tidepool's scale subresource (web), by direction.",
            ),
            &["tier", "direction"],
        )?;
        let database_queries = HistogramVec::new(
            HistogramOpts::new(
                "database_query_duration_seconds",
                "The queue scalers' readings of the queues from PostgreSQL (one statement, after opening \
                 the connection when there was none), by outcome.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["outcome"],
        )?;
        let database_connects = IntCounter::new(
            "database_connections_opened_total",
            "Connections the queue scalers opened to PostgreSQL (one per scaler, again after a failure).",
        )?;
        registry.register(Box::new(scaling_decisions.clone()))?;
        registry.register(Box::new(database_queries.clone()))?;
        registry.register(Box::new(database_connects.clone()))?;
        for tier in Tier::ALL {
            for direction in DIRECTIONS {
                scaling_decisions.with_label_values(&[tier.name(), direction.label()]);
            }
        }
        for outcome in QUERY_OUTCOMES {
            database_queries.with_label_values(&[outcome]);
        }
        for gauge in [&connections, &replicas, &share, &condition] {
            registry.register(Box::new(gauge.clone()))?;
        }
        registry.register(Box::new(writes.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        // Every label value a counter can take starts at 0, so dashboards and
        // alerts see the series before the first of its kind.
        for result in [Outcome::Applied, Outcome::Blocked, Outcome::Deleting, Outcome::Error] {
            reconciles.with_label_values(&[result.label()]);
        }
        for kind in ErrorKind::ALL {
            errors.with_label_values(&[kind.label()]);
        }
        Ok(Self {
            registry,
            reconciles,
            errors,
            duration,
            writes,
            leader,
            connections,
            replicas,
            share,
            condition,
            scaling_decisions,
            database_queries,
            database_connects,
        })
    }

    /// Sets the gauges of the Tidepool `name` in `namespace` from `status`.
    pub fn record_status(&self, namespace: &str, name: &str, status: &TidepoolStatus) {
        self.forget(namespace, name);
        if let Some(connections) = &status.connections {
            let figures =
                [Some(connections.available), Some(connections.planned_peak), connections.live_peak];
            for (kind, figure) in CONNECTION_KINDS.iter().zip(figures) {
                if let Some(figure) = figure {
                    self.connections.with_label_values(&[namespace, name, kind]).set(i64::from(figure));
                }
            }
        }
        for (tier, tier_status) in TIERS.iter().zip([&status.web, &status.worker]) {
            let Some(tier_status) = tier_status else { continue };
            for (state, count) in REPLICA_STATES.iter().zip([
                tier_status.desired_replicas,
                tier_status.replicas,
                tier_status.ready_replicas,
            ]) {
                self.replicas.with_label_values(&[namespace, name, tier, state]).set(i64::from(count));
            }
            self.share
                .with_label_values(&[namespace, name, tier])
                .set(i64::from(tier_status.server_connections_per_pod));
        }
        for condition in status.conditions.iter().filter(|c| CONDITIONS.contains(&c.type_.as_str())) {
            self.condition
                .with_label_values(&[namespace, name, &condition.type_])
                .set(i64::from(condition.status == "True"));
        }
    }

    /// Removes the gauges of the Tidepool `name` in `namespace`.
    pub fn forget(&self, namespace: &str, name: &str) {
        for kind in CONNECTION_KINDS {
            let _ = self.connections.remove_label_values(&[namespace, name, kind]);
        }
        for tier in TIERS {
            for state in REPLICA_STATES {
                let _ = self.replicas.remove_label_values(&[namespace, name, tier, state]);
            }
            let _ = self.share.remove_label_values(&[namespace, name, tier]);
        }
        for type_ in CONDITIONS {
            let _ = self.condition.remove_label_values(&[namespace, name, type_]);
        }
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

    /// Counts a change of `tier`'s desired replicas.
    pub fn scaling_decision(&self, tier: Tier, direction: Direction) {
        self.scaling_decisions.with_label_values(&[tier.name(), direction.label()]).inc();
    }

    /// Records one reading of the queues that took `took`.
    pub fn database_query(&self, outcome: &'static str, took: std::time::Duration) {
        self.database_queries.with_label_values(&[outcome]).observe(took.as_secs_f64());
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.label()]).inc();
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
        metrics.error(ErrorKind::ApplyChild);
        let text = String::from_utf8(metrics.render().expect("renders")).expect("utf-8");
        assert!(text.contains("tidepool_operator_reconciles_total{result=\"applied\"} 1"), "{text}");
        assert!(text.contains("tidepool_operator_reconciles_total{result=\"error\"} 0"), "{text}");
        assert!(text.contains("tidepool_operator_reconcile_errors_total{kind=\"apply_child\"} 1"), "{text}");
        for kind in ErrorKind::ALL.iter().filter(|&&k| k != ErrorKind::ApplyChild) {
            let series = format!("tidepool_operator_reconcile_errors_total{{kind=\"{}\"}} 0", kind.label());
            assert!(text.contains(&series), "{series} in {text}");
        }
        assert!(
            text.contains("tidepool_operator_reconcile_duration_seconds_count{result=\"applied\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_tidepools_status_becomes_gauges_until_it_goes() {
        let metrics = Metrics::new().expect("metrics");
        let status: TidepoolStatus = serde_json::from_value(serde_json::json!({
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Ready", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "ConnectionBudget", "status": "False", "reason": "BudgetDoesNotFit", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ],
            "web": {"desiredReplicas": 3, "replicas": 3, "readyReplicas": 2, "readyOfDesired": "2/3", "selector": "", "serverConnectionsPerPod": 14, "appPoolPerPod": 14, "limited": true},
            "connections": {"available": 50, "plannedPeak": 48, "plannedOfAvailable": "48/50"}
        }))
        .expect("a status");
        metrics.record_status("shop", "tp", &status);
        let text = String::from_utf8(metrics.render().expect("renders")).expect("utf-8");
        for line in [
            "tidepool_operator_connections{kind=\"available\",namespace=\"shop\",tidepool=\"tp\"} 50",
            "tidepool_operator_connections{kind=\"planned_peak\",namespace=\"shop\",tidepool=\"tp\"} 48",
            "tidepool_operator_tier_replicas{namespace=\"shop\",state=\"ready\",tidepool=\"tp\",tier=\"web\"} 2",
            "tidepool_operator_tier_server_connections_per_pod{namespace=\"shop\",tidepool=\"tp\",tier=\"web\"} 14",
            "tidepool_operator_condition{namespace=\"shop\",tidepool=\"tp\",type=\"Ready\"} 1",
            "tidepool_operator_condition{namespace=\"shop\",tidepool=\"tp\",type=\"ConnectionBudget\"} 0",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        assert!(!text.contains("kind=\"live_peak\""), "no live pods counted yet: {text}");
        assert!(!text.contains("tidepool=\"tp\",tier=\"worker\""), "{text}");
        metrics.forget("shop", "tp");
        let text = String::from_utf8(metrics.render().expect("renders")).expect("utf-8");
        assert!(!text.contains("tidepool=\"tp\""), "{text}");
    }
}
