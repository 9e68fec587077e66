//! Scaling as the status reports it: the worker scaler's health (the
//! `WorkerAutoscaling` condition) and a change of the web replicas (set
//! through the scale subresource by the HPA or `kubectl scale`, or by an
//! edit), announced once with an Event naming who set them.

use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::Resource;

use super::Context;
use crate::autoscaler::{self, Signal};
use crate::crd::{Tidepool, TidepoolStatus};
use crate::plan::{Plan, Tier};
use crate::status::{AutoscalingHealth, ScaleCause};

/// The `WorkerAutoscaling` condition from the scaler's report.
pub fn scaler_health(
    settings: &autoscaler::Settings,
    report: &autoscaler::Report,
    replicas: u32,
) -> AutoscalingHealth {
    let bounds = format!("{}..{}", settings.policy.min_replicas, settings.policy.max_replicas);
    let (what, is, fails, read, unreadable) = match &settings.signal {
        Signal::Queues { queues, .. } => (
            format!("the queues {}", queues.join(", ")),
            "are",
            "cannot be read",
            "QueuesRead",
            "QueuesUnreadable",
        ),
        Signal::Query { statement_timeout, .. } => (
            format!("the query (statement timeout {} s)", statement_timeout.as_secs()),
            "is",
            "fails",
            "QueryRead",
            "QueryFailed",
        ),
    };
    match (&report.failure, report.read) {
        (Some((error, since)), _) => AutoscalingHealth {
            status: "False",
            reason: unreadable,
            message: format!(
                "{what} {fails} since {}: {error}; the worker replicas hold at {replicas}",
                since.0
            ),
        },
        (None, false) => AutoscalingHealth {
            status: "Unknown",
            reason: "NotReadYet",
            message: format!(
                "the worker scaler has not read {what} yet; worker replicas {replicas} ({bounds})"
            ),
        },
        (None, true) => AutoscalingHealth {
            status: "True",
            reason: read,
            message: format!(
                "{what} {is} read every {} s with the credentials of the Secret {}; worker replicas {bounds}",
                settings.interval.as_secs(),
                settings.secret
            ),
        },
    }
}

/// When the web tier's desired replicas changed since the last status (the
/// HPA, `kubectl scale` or an edit set `spec.web.replicas`): an Event, the
/// decision counted, and its cause naming who set them.
pub async fn web_scaled(
    ctx: &Context,
    tidepool: &Tidepool,
    previous: Option<&TidepoolStatus>,
    plan: &Plan,
) -> Option<ScaleCause> {
    let from = u32::try_from(previous?.web.as_ref()?.desired_replicas).ok()?;
    let to = plan.tier(Tier::Web)?.replicas;
    if from == to {
        return None;
    }
    let direction = crate::scaler::Direction::of(from, to);
    let by = replicas_set_by(tidepool, "f:web").unwrap_or_else(|| "an unknown client".into());
    let message = format!("web replicas {from} → {to}, set by {by}");
    let cause = Some(ScaleCause { reason: "ReplicasChanged".into(), message: message.clone() });
    if !ctx.memory.announce(&ObjectRef::from_obj(tidepool), to) {
        return cause;
    }
    ctx.endpoints.metrics.scaling_decision(Tier::Web, direction);
    let event = Event {
        type_: EventType::Normal,
        reason: direction.event_reason().into(),
        note: Some(message.clone()),
        action: format!("ScaleWebFrom{from}To{to}"),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &tidepool.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
    cause
}

/// The field manager (and subresource) that last set `spec.<tier>.replicas`.
fn replicas_set_by(tidepool: &Tidepool, tier_field: &str) -> Option<String> {
    tidepool
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            entry.fields_v1.as_ref().is_some_and(|fields| {
                fields
                    .0
                    .get("f:spec")
                    .and_then(|s| s.get(tier_field))
                    .and_then(|t| t.get("f:replicas"))
                    .is_some()
            })
        })
        .max_by_key(|entry| entry.time.as_ref().map(|t| t.0))
        .map(|entry| match entry.subresource.as_deref() {
            Some(subresource) if !subresource.is_empty() => {
                format!("{} through the {subresource} subresource", entry.manager.as_deref().unwrap_or("?"))
            }
            _ => entry.manager.clone().unwrap_or_else(|| "?".into()),
        })
}
