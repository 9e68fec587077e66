//! What a Tidepool's status says, as a pure function of the plan, what the
//! children report and the previous status, so that an unchanged world
//! gives an unchanged status (no write, no event, no loop).
//!
//! Conditions (each with `observedGeneration`, a reason and a message):
//! - `Ready`: every pod of every tier is ready with the current template;
//! - `ConnectionBudget`: the spec fits the database's budget (False with the
//!   numbers when it cannot; the last good children stay);
//! - `Progressing`: a rollout or scale is under way;
//! - `Degraded`: something keeps the operator from applying the spec (a
//!   missing Secret or key, an invalid spec, a refused budget);
//! - `WorkerAutoscaling` (only while the worker tier autoscales): whether
//!   the queue scaler can read the queues; False holds the replicas.
//! - `DatabaseTLSVerified`: whether every connection to PostgreSQL checks
//!   the server's certificate and name (`database.tls.mode: verify-full`);
//!   False says what the mode leaves open.
//!
//! A condition keeps its `lastTransitionTime` while its status stays. A
//! tier's `lastScale` records the last change of its desired replicas, with
//! the scaler's reason when it made it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ConnectionsStatus, DatabaseTls, DatabaseTlsMode, LastScale, TidepoolStatus, TierStatus};
use crate::plan::{PerTier, Plan, Tier};
use crate::to_i32;

pub const READY: &str = "Ready";
pub const CONNECTION_BUDGET: &str = "ConnectionBudget";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const WORKER_AUTOSCALING: &str = "WorkerAutoscaling";
pub const DATABASE_TLS_VERIFIED: &str = "DatabaseTLSVerified";

/// Why a tier's desired replicas changed, when the operator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleCause {
    pub reason: String,
    pub message: String,
}

/// Whether the queue scaler reads the queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoscalingHealth {
    /// `True`, `False` or `Unknown` (no reading yet).
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// Why the spec could not be applied. The children are left as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// `SecretMissing`, `SecretIncomplete`, `SecretInvalid`, `InvalidSpec` or
    /// `BudgetDoesNotFit`.
    pub reason: &'static str,
    pub message: String,
}

impl Blocked {
    fn is_budget(&self) -> bool {
        self.reason == "BudgetDoesNotFit"
    }
}

/// One tier's Deployment as it reports itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObservedTier {
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    /// The Deployment controller has seen the current spec.
    pub observed: bool,
}

/// The migration Job of the current image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migration {
    /// Succeeded: the pods of this image may roll out.
    Done,
    /// Still running (`name`): the Deployments wait.
    Running { name: String },
    /// Gave up (`message`): the Deployments stay as they are.
    Failed { name: String, message: String },
}

/// What was applied and what the children report.
#[derive(Debug, Clone)]
pub struct Applied<'a> {
    pub plan: &'a Plan,
    /// What each tier's Deployment reports.
    pub observed: PerTier<ObservedTier>,
    /// Each tier's pod selector (for the scale subresource).
    pub selectors: PerTier<String>,
    /// The sum of the live pods' annotated shares.
    pub live_peak: i32,
    /// Set when the Tidepools sharing this database server plan more
    /// connections together than this one's budget: what they plan.
    pub over_commit: Option<String>,
    pub migration: Migration,
    /// What holds a change back: a paced step, pods waiting for the budget.
    pub pacing: Vec<String>,
    /// Why each tier's (web, worker) desired replicas changed, if known.
    pub scale_causes: PerTier<ScaleCause>,
    /// The queue scaler's health, while the worker tier autoscales.
    pub autoscaling: Option<AutoscalingHealth>,
    /// The spec's TLS to PostgreSQL.
    pub database_tls: &'a DatabaseTls,
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// The status after a reconcile. `previous` supplies what a blocked spec
/// leaves as it was (the last tiers and budget) and the transition times;
/// `now` stamps the conditions whose status changed.
pub fn status(
    previous: Option<&TidepoolStatus>,
    generation: Option<i64>,
    outcome: Result<Applied<'_>, Blocked>,
    now: Time,
) -> TidepoolStatus {
    let mut next = match &outcome {
        Err(blocked) => {
            let mut kept = previous.cloned().unwrap_or_default();
            kept.conditions = vec![
                condition(READY, false, blocked.reason, blocked.message.clone(), generation),
                if blocked.is_budget() {
                    condition(CONNECTION_BUDGET, false, blocked.reason, blocked.message.clone(), generation)
                } else {
                    previous
                        .and_then(|p| p.conditions.iter().find(|c| c.type_ == CONNECTION_BUDGET).cloned())
                        .unwrap_or_else(|| {
                            condition(
                                CONNECTION_BUDGET,
                                false,
                                "Unknown",
                                "not planned yet".into(),
                                generation,
                            )
                        })
                },
                condition(
                    PROGRESSING,
                    false,
                    blocked.reason,
                    "the last applied children stay as they are".into(),
                    generation,
                ),
                condition(DEGRADED, true, blocked.reason, blocked.message.clone(), generation),
            ];
            kept.conditions.extend(find(previous, WORKER_AUTOSCALING).cloned());
            kept.conditions.extend(find(previous, DATABASE_TLS_VERIFIED).cloned());
            kept
        }
        Ok(applied) => applied_status(applied, generation),
    };
    if let Ok(applied) = &outcome {
        record_scales(previous, &mut next, &applied.scale_causes, &now);
    }
    next.observed_generation = generation;
    for condition in &mut next.conditions {
        let before = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == condition.type_));
        condition.last_transition_time = match before {
            Some(before) if before.status == condition.status => before.last_transition_time.clone(),
            _ => now.clone(),
        };
    }
    next
}

/// Sets each tier's `lastScale`: a new one where the desired replicas
/// differ from `previous`, else the previous one.
fn record_scales(
    previous: Option<&TidepoolStatus>,
    next: &mut TidepoolStatus,
    causes: &PerTier<ScaleCause>,
    now: &Time,
) {
    for tier in Tier::ALL {
        let before = previous.and_then(|p| tier_status(p, tier).as_ref());
        let Some(after) = tier_status_mut(next, tier).as_mut() else { continue };
        after.last_scale = match before {
            Some(before) if before.desired_replicas != after.desired_replicas => {
                let (from, to) = (before.desired_replicas, after.desired_replicas);
                let cause = causes.get(&tier).cloned().unwrap_or_else(|| ScaleCause {
                    reason: "ReplicasChanged".into(),
                    message: format!("the Tidepool's {tier} replicas were set to {to}"),
                });
                Some(LastScale { from, to, reason: cause.reason, message: cause.message, time: now.clone() })
            }
            Some(before) => before.last_scale.clone(),
            None => None,
        };
    }
}

fn tier_status(status: &TidepoolStatus, tier: Tier) -> &Option<TierStatus> {
    match tier {
        Tier::Web => &status.web,
        Tier::Worker => &status.worker,
        Tier::Clock => &status.clock,
    }
}

fn tier_status_mut(status: &mut TidepoolStatus, tier: Tier) -> &mut Option<TierStatus> {
    match tier {
        Tier::Web => &mut status.web,
        Tier::Worker => &mut status.worker,
        Tier::Clock => &mut status.clock,
    }
}

fn applied_status(applied: &Applied<'_>, generation: Option<i64>) -> TidepoolStatus {
    let plan = applied.plan;
    let (tiers, settled, mut pods) = tier_statuses(applied);
    for note in &applied.pacing {
        pods.push_str("; ");
        pods.push_str(note);
    }
    let [ready, progressing, degraded] = rollout_conditions(applied, settled, pods, generation);
    let mut conditions = vec![ready, budget_condition(applied, generation), progressing, degraded];
    conditions.push(tls_condition(applied.database_tls, generation));
    conditions.extend(applied.autoscaling.as_ref().map(|health| Condition {
        type_: WORKER_AUTOSCALING.to_owned(),
        status: health.status.to_owned(),
        reason: health.reason.to_owned(),
        message: health.message.clone(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }));
    TidepoolStatus {
        observed_generation: generation,
        conditions,
        connections: Some(ConnectionsStatus {
            available: to_i32(plan.available),
            planned_peak: to_i32(plan.planned_peak),
            live_peak: Some(applied.live_peak),
            planned_of_available: format!("{}/{}", plan.planned_peak, plan.available),
        }),
        ..tiers
    }
}

/// Each planned tier's status (in a status that has nothing else yet),
/// whether every tier has settled on its desired replicas, and what the
/// pods are (`web 1/2, worker 1/1 ready`).
fn tier_statuses(applied: &Applied<'_>) -> (TidepoolStatus, bool, String) {
    let mut tiers = TidepoolStatus::default();
    let mut all_settled = true;
    let mut ready_of_desired = Vec::new();
    for planned in &applied.plan.tiers {
        let observed = applied.observed.get(&planned.tier).copied().unwrap_or_default();
        let status = TierStatus {
            desired_replicas: to_i32(planned.replicas),
            replicas: observed.replicas,
            ready_replicas: observed.ready,
            ready_of_desired: format!("{}/{}", observed.ready, planned.replicas),
            selector: applied.selectors.get(&planned.tier).cloned().unwrap_or_default(),
            server_connections_per_pod: to_i32(planned.share),
            app_pool_per_pod: to_i32(planned.app_pool_per_pod()),
            limited: planned.limited(),
            last_scale: None,
        };
        all_settled &= observed.observed
            && observed.ready == status.desired_replicas
            && observed.updated == status.desired_replicas
            && observed.replicas == status.desired_replicas;
        ready_of_desired.push(format!("{} {}", planned.tier, status.ready_of_desired));
        *tier_status_mut(&mut tiers, planned.tier) = Some(status);
    }
    (tiers, all_settled, format!("{} ready", ready_of_desired.join(", ")))
}

/// Ready, Progressing and Degraded: from the migration and whether the
/// pods have `settled`, each saying what the `pods` are.
fn rollout_conditions(
    applied: &Applied<'_>,
    settled: bool,
    pods: String,
    generation: Option<i64>,
) -> [Condition; 3] {
    let as_planned =
        || condition(DEGRADED, false, "AsPlanned", "the children match the spec".into(), generation);
    match &applied.migration {
        Migration::Done => [
            condition(
                READY,
                settled,
                if settled { "AllPodsReady" } else { "PodsNotReady" },
                pods.clone(),
                generation,
            ),
            condition(
                PROGRESSING,
                !settled,
                match (settled, applied.pacing.is_empty()) {
                    (true, true) => "Complete",
                    (false, true) => "RollingOut",
                    (_, false) => "Paced",
                },
                pods,
                generation,
            ),
            as_planned(),
        ],
        Migration::Running { name } => {
            let message = format!("the migration Job {name} runs before the pods roll out; {pods}");
            [
                condition(READY, false, "Migrating", message.clone(), generation),
                condition(PROGRESSING, true, "Migrating", message, generation),
                as_planned(),
            ]
        }
        Migration::Failed { name, message } => {
            let message = format!("the migration Job {name} failed, so the pods stay as they are: {message}");
            [
                condition(READY, false, "MigrationFailed", message.clone(), generation),
                condition(PROGRESSING, false, "MigrationFailed", message.clone(), generation),
                condition(DEGRADED, true, "MigrationFailed", message, generation),
            ]
        }
    }
}

/// ConnectionBudget: whether the plan fits and every tier gets its ask, or
/// that the server's Tidepools plan more together than it has.
fn budget_condition(applied: &Applied<'_>, generation: Option<i64>) -> Condition {
    let plan = applied.plan;
    if let Some(message) = &applied.over_commit {
        return condition(CONNECTION_BUDGET, false, "ServerOverCommitted", message.clone(), generation);
    }
    let message = if plan.asks_met {
        format!(
            "planned peak {} of {} available connections; every tier gets what it asks for",
            plan.planned_peak, plan.available
        )
    } else {
        let cuts: Vec<String> = plan
            .tiers
            .iter()
            .filter(|t| t.limited())
            .map(|t| format!("each {} pod gets {} of the {} connections it asks for", t.tier, t.share, t.ask))
            .collect();
        format!(
            "planned peak {} of {} available connections; the budget is short: {}",
            plan.planned_peak,
            plan.available,
            cuts.join(", ")
        )
    };
    condition(CONNECTION_BUDGET, true, if plan.asks_met { "Fits" } else { "Limited" }, message, generation)
}

/// DatabaseTLSVerified: what `database.tls` checks on every connection to
/// PostgreSQL (the pods' PgBouncer, the worker's LISTEN session, the
/// migration, the queue scaler), and what it leaves open.
fn tls_condition(tls: &DatabaseTls, generation: Option<i64>) -> Condition {
    const CLIENTS: &str =
        "the pods' PgBouncer, the worker's LISTEN session, the migration and the queue scaler";
    const ADVICE: &str =
        "set database.tls.mode verify-full with caSecretRef to check the server's certificate and name";
    let (ok, reason, message) = match (tls.mode, tls.ca_secret_ref.is_some()) {
        (DatabaseTlsMode::VerifyFull, _) => (
            true,
            "VerifyFull",
            format!("{CLIENTS} connect with TLS and check that the server's certificate leads to the CA and names the host"),
        ),
        (DatabaseTlsMode::VerifyCa, _) | (DatabaseTlsMode::Require, true) => (
            false,
            "ChainOnly",
            format!("{CLIENTS} connect with TLS and check the server's certificate chain, not that it names the host: {ADVICE}"),
        ),
        (DatabaseTlsMode::Require, false) => (
            false,
            "NotVerified",
            format!("{CLIENTS} connect with TLS but check no certificate, so anyone on the path can pose as the database: {ADVICE}"),
        ),
        (DatabaseTlsMode::Prefer, _) => (
            false,
            "NotVerified",
            format!("database.tls.mode is prefer (the default, as libpq's): {CLIENTS} use TLS when the server offers it, check no certificate and fall back to plaintext when it does not: {ADVICE}"),
        ),
        (DatabaseTlsMode::Disable, _) => (
            false,
            "Plaintext",
            format!("database.tls.mode is disable: {CLIENTS} connect in plaintext: {ADVICE}"),
        ),
    };
    condition(DATABASE_TLS_VERIFIED, ok, reason, message, generation)
}

/// Whether two statuses say the same, transition times aside.
pub fn same_ignoring_times(a: &TidepoolStatus, b: &TidepoolStatus) -> bool {
    let strip = |s: &TidepoolStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// The condition of `type_`, if any.
pub fn find<'a>(status: Option<&'a TidepoolStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, Input, Process, TierInput};

    fn a_plan() -> Plan {
        let tier = |replicas, process| TierInput {
            replicas,
            min_replicas: replicas,
            max_replicas: replicas,
            surge: 1,
            process,
            client_connections: None,
            query_wait_timeout_seconds: crate::plan::POOLER_QUERY_WAIT_TIMEOUT_SECONDS,
        };
        plan(&Input {
            max_connections: 300,
            reserved_connections: 10,
            tiers: vec![
                tier(2, Process::Web { database_pool: 20 }),
                tier(1, Process::Worker { concurrency: 50, listen: false }),
            ],
        })
        .expect("fits")
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid"))
    }

    fn applied(plan: &Plan, web_ready: i32) -> Applied<'_> {
        Applied {
            plan,
            observed: PerTier::from([
                (Tier::Web, ObservedTier { replicas: 2, ready: web_ready, updated: 2, observed: true }),
                (Tier::Worker, ObservedTier { replicas: 1, ready: 1, updated: 1, observed: true }),
            ]),
            selectors: PerTier::from([(Tier::Web, "w".into()), (Tier::Worker, "k".into())]),
            live_peak: 94,
            pacing: Vec::new(),
            over_commit: None,
            migration: Migration::Done,
            scale_causes: PerTier::default(),
            autoscaling: None,
            database_tls: Box::leak(Box::default()),
        }
    }

    #[test]
    fn ready_when_every_pod_is_and_times_move_only_on_transitions() {
        let plan = a_plan();
        let first = status(None, Some(1), Ok(applied(&plan, 1)), at(10));
        assert_eq!(find(Some(&first), READY).map(|c| c.status.as_str()), Some("False"));
        assert_eq!(first.web.as_ref().map(|w| w.ready_of_desired.as_str()), Some("1/2"));
        assert_eq!(first.worker.as_ref().map(|w| (w.selector.as_str(), w.app_pool_per_pod)), Some(("k", 50)));
        let pods = find(Some(&first), PROGRESSING).map(|c| c.message.as_str());
        assert_eq!(pods, Some("web 1/2, worker 1/1 ready"));
        let second = status(Some(&first), Some(1), Ok(applied(&plan, 2)), at(20));
        let ready = find(Some(&second), READY).expect("Ready");
        assert_eq!((ready.status.as_str(), ready.last_transition_time.clone()), ("True", at(20)));
        let budget = find(Some(&second), CONNECTION_BUDGET).expect("budget");
        assert_eq!(budget.last_transition_time, at(10), "unchanged status keeps its time");
        let third = status(Some(&second), Some(1), Ok(applied(&plan, 2)), at(30));
        assert!(same_ignoring_times(&second, &third) && second == third, "a quiet world writes nothing new");
    }

    #[test]
    fn an_over_committed_server_shows_in_the_budget_condition() {
        let plan = a_plan();
        let over = Applied { over_commit: Some("250 together, over 290".into()), ..applied(&plan, 2) };
        let status = status(None, Some(1), Ok(over), at(10));
        let budget = find(Some(&status), CONNECTION_BUDGET).expect("budget");
        assert_eq!((budget.status.as_str(), budget.reason.as_str()), ("False", "ServerOverCommitted"));
        assert_eq!(find(Some(&status), READY).map(|c| c.status.as_str()), Some("True"), "the pods still run");
    }

    #[test]
    fn a_blocked_spec_keeps_the_last_numbers_and_says_why() {
        let plan = a_plan();
        let good = status(None, Some(1), Ok(applied(&plan, 2)), at(10));
        let blocked = Blocked { reason: "SecretMissing", message: "Secret db does not exist".into() };
        let after = status(Some(&good), Some(2), Err(blocked), at(20));
        assert_eq!(after.web, good.web, "the last tiers stay");
        assert_eq!(after.connections, good.connections);
        let degraded = find(Some(&after), DEGRADED).expect("Degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "SecretMissing"));
        assert_eq!(
            find(Some(&after), CONNECTION_BUDGET).map(|c| c.status.as_str()),
            Some("True"),
            "the budget still fits"
        );
        let refused = Blocked { reason: "BudgetDoesNotFit", message: "13 connections, but only 5".into() };
        let after = status(Some(&good), Some(3), Err(refused), at(30));
        let budget = find(Some(&after), CONNECTION_BUDGET).expect("budget");
        assert_eq!(
            (budget.status.as_str(), budget.message.as_str()),
            ("False", "13 connections, but only 5")
        );
        assert_eq!(after.observed_generation, Some(3));
    }

    #[test]
    fn a_change_of_desired_replicas_is_recorded_with_its_cause() {
        let plan = a_plan();
        let first = status(None, Some(1), Ok(applied(&plan, 2)), at(10));
        assert_eq!(first.web.as_ref().and_then(|w| w.last_scale.clone()), None, "nothing changed yet");
        let mut more = plan.clone();
        for (tier, replicas) in [(Tier::Worker, 3), (Tier::Web, 1)] {
            more.tier_mut(tier).expect("planned").replicas = replicas;
        }
        let cause =
            ScaleCause { reason: "QueueBacklog".into(), message: "available jobs: default 300".into() };
        let scaled = Applied { scale_causes: PerTier::from([(Tier::Worker, cause)]), ..applied(&more, 2) };
        let second = status(Some(&first), Some(1), Ok(scaled), at(20));
        let worker = second.worker.as_ref().and_then(|w| w.last_scale.clone()).expect("worker scaled");
        assert_eq!(
            (worker.from, worker.to, worker.reason.as_str(), worker.time),
            (1, 3, "QueueBacklog", at(20))
        );
        let web = second.web.as_ref().and_then(|w| w.last_scale.clone()).expect("web scaled");
        assert_eq!((web.from, web.to, web.reason.as_str()), (2, 1, "ReplicasChanged"));
        let third = status(Some(&second), Some(1), Ok(applied(&more, 2)), at(30));
        assert_eq!(third.worker, second.worker, "the last change stays until the next");
        assert!(same_ignoring_times(&second, &third));
    }

    #[test]
    fn the_scalers_health_is_a_condition_that_a_blocked_spec_keeps() {
        let plan = a_plan();
        let failing = AutoscalingHealth {
            status: "False",
            reason: "QueuesUnreadable",
            message: "the database is unavailable; the worker replicas hold at 1".into(),
        };
        let with = Applied { autoscaling: Some(failing), ..applied(&plan, 2) };
        let first = status(None, Some(1), Ok(with), at(10));
        let condition = find(Some(&first), WORKER_AUTOSCALING).expect("the condition");
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "QueuesUnreadable"));
        let blocked = Blocked { reason: "SecretMissing", message: "gone".into() };
        let after = status(Some(&first), Some(2), Err(blocked), at(20));
        assert_eq!(
            find(Some(&after), WORKER_AUTOSCALING).map(|c| c.reason.as_str()),
            Some("QueuesUnreadable")
        );
        let without = status(Some(&first), Some(3), Ok(applied(&plan, 2)), at(30));
        assert_eq!(find(Some(&without), WORKER_AUTOSCALING), None, "no autoscaling, no condition");
    }

    /// Only verify-full is verified; every other mode says in words what it
    /// leaves open, and a blocked spec keeps the condition as it was.
    #[test]
    fn the_tls_condition_says_what_each_mode_checks() {
        let plan = a_plan();
        let cases = [
            ("verify-full", true, true, "VerifyFull"),
            ("verify-ca", true, false, "ChainOnly"),
            ("require", true, false, "ChainOnly"),
            ("require", false, false, "NotVerified"),
            ("prefer", false, false, "NotVerified"),
            ("disable", false, false, "Plaintext"),
        ];
        for (mode, ca, verified, reason) in cases {
            let mut tls = serde_json::json!({"mode": mode});
            if ca {
                tls["caSecretRef"] = serde_json::json!({"name": "db-ca"});
            }
            let tls: DatabaseTls = serde_json::from_value(tls).expect("a setting");
            let applied = Applied { database_tls: &tls, ..applied(&plan, 2) };
            let next = status(None, Some(1), Ok(applied), at(10));
            let condition = find(Some(&next), DATABASE_TLS_VERIFIED).expect("the condition");
            assert_eq!(condition.status, if verified { "True" } else { "False" }, "{mode}");
            assert_eq!(condition.reason, reason, "{mode} {ca}");
            if !verified {
                assert!(
                    condition.message.contains("verify-full"),
                    "{mode}: says what would: {}",
                    condition.message
                );
            }
            let blocked = Blocked { reason: "SecretMissing", message: "gone".into() };
            let kept = status(Some(&next), Some(2), Err(blocked), at(20));
            assert_eq!(find(Some(&kept), DATABASE_TLS_VERIFIED).map(|c| &c.reason), Some(&condition.reason));
        }
        let default = status(None, Some(1), Ok(applied(&plan, 2)), at(10));
        assert_eq!(
            find(Some(&default), DATABASE_TLS_VERIFIED).map(|c| c.reason.as_str()),
            Some("NotVerified")
        );
    }
}
