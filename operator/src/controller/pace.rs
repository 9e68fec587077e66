//! Pacing: where the Deployments go in this pass, from where they are.
//!
//! A change that alters what a pod may hold (its share) is walked one step
//! of [`plan::transition`] at a time ([`plan::next_step`] picks it), the
//! next once the Deployments have rolled out and no pod of another cost is
//! left; so no mix of old and new pods passes the budget. Other changes go
//! at once. Pure: it reads the live Deployments and pods it is given.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use std::collections::BTreeSet;

use super::apply::contains;
use super::pods::ListedPod;
use crate::plan::{self, PerTier, Plan};
use crate::render::{self, labels};
use crate::validate;

/// What the controller does to a tier's Deployment in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Apply the rendered Deployment (with the step's replicas and surge).
    Apply,
    /// Keep the old template, set only the replicas (scale subresource).
    Scale(i32),
    /// Leave it as it is.
    Hold,
}

/// The Deployments' next step: the plan to render them from, what to do
/// to each, and what the status should say about it.
pub struct Paced {
    /// The plan to render the Deployments from: the target's, with this
    /// step's replicas and surge.
    pub plan: Plan,
    pub moves: PerTier<Move>,
    /// What the status should say about a tier held back.
    pub note: Vec<String>,
}

/// Where the Deployments go next ([`plan::next_step`]), from what they are
/// (`live`: each tier's Deployment, where it has one). A tier's template
/// "rolls" when the live one lacks what is rendered now.
pub fn pace(
    validated: &validate::Validated,
    plan: &Plan,
    live: &PerTier<Deployment>,
    pods: &[ListedPod],
) -> Paced {
    let mut live_step = plan::Step::default();
    let mut rolls = BTreeSet::new();
    let mut settled = true;
    for tier in &plan.tiers {
        let Some(deployment) = live.get(&tier.tier) else {
            // A new Deployment: from nothing, with the new template.
            rolls.insert(tier.tier);
            continue;
        };
        let spec = deployment.spec.as_ref();
        let template = spec.map(|s| &s.template);
        let rendered = render::deployment::deployment(validated, tier).spec.map(|s| s.template);
        let lacks_rendered =
            match (template.map(serde_json::to_value), rendered.map(|t| serde_json::to_value(&t))) {
                (Some(Ok(live)), Some(Ok(rendered))) => !contains(&live, &rendered),
                _ => true,
            };
        if lacks_rendered {
            rolls.insert(tier.tier);
        }
        let mut step = plan::TierStep::at(tier);
        step.per_pod = template
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .map_or(0, labels::pod_cost);
        step.replicas = spec.and_then(|s| s.replicas).and_then(|r| u32::try_from(r).ok()).unwrap_or(0);
        if let Some(IntOrString::Int(surge)) = spec
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_surge.clone())
        {
            step.surge = u32::try_from(surge).unwrap_or(0);
        }
        live_step.tiers.insert(tier.tier, step);
        settled &= rolled_out(deployment);
    }
    let other_costs = pods.iter().any(|pod| {
        !pod.live.finished
            && pod.tier.and_then(|tier| plan.tier(tier)).is_some_and(|tier| pod.live.cost != tier.per_pod())
    });
    let next = plan::next_step(&live_step, plan, |tier| rolls.contains(&tier), settled, other_costs);
    let mut stepped = plan.clone();
    let mut note = Vec::new();
    let mut moves = PerTier::new();
    for tier in &mut stepped.tiers {
        let Some(to) = next.tier(tier.tier).copied() else { continue };
        let now = live_step.of(tier);
        let cost = tier.per_pod();
        tier.replicas = to.replicas;
        tier.surge = to.surge;
        let step = if rolls.contains(&tier.tier) && to.template == plan::Template::Old {
            if now.per_pod != cost {
                note.push(format!(
                    "{} pods change from {} to {} connections each once the other changes have rolled out",
                    tier.tier, now.per_pod, cost
                ));
            }
            if to.replicas != now.replicas {
                Move::Scale(crate::to_i32(to.replicas))
            } else {
                Move::Hold
            }
        } else {
            Move::Apply
        };
        moves.insert(tier.tier, step);
    }
    Paced { plan: stepped, moves, note }
}

/// Whether a Deployment has finished its last change: every pod it wants
/// is of the current template and available, or it gave up (its progress
/// deadline passed: waiting longer would not help).
pub fn rolled_out(deployment: &Deployment) -> bool {
    let Some(status) = &deployment.status else { return false };
    let wanted = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let gave_up = status.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let observed = status.observed_generation >= deployment.metadata.generation;
    observed
        && (gave_up
            || (status.updated_replicas.unwrap_or(0) == wanted
                && status.replicas.unwrap_or(0) == wanted
                && status.available_replicas.unwrap_or(0) == wanted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::LivePod;
    use crate::crd::Tidepool;
    use crate::plan::Tier;
    use crate::validate::{validate, Validated};
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use serde_json::json;

    /// A Tidepool with web `pool` connections per pod and worker
    /// `concurrency`, `web` web replicas, validated and planned.
    fn planned(pool: u32, concurrency: u32, web: u32) -> (Validated, Plan) {
        let object = json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool",
            "metadata": {"name": "shop", "namespace": "prod", "uid": "0e5c6a55-0000-4000-8000-000000000001", "generation": 1},
            "spec": {
                "database": {"secretRef": {"name": "db"}, "maxConnections": 400},
                "web": {"replicas": web, "databasePool": pool},
                "worker": {"replicas": 1, "concurrency": concurrency},
            },
        });
        let tidepool: Tidepool = serde_json::from_value(object).unwrap_or_else(|e| panic!("a Tidepool: {e}"));
        let validated = validate(&tidepool, "prod").unwrap_or_else(|e| panic!("valid: {e}"));
        let plan = plan::plan(&validated.input).unwrap_or_else(|e| panic!("fits: {e}"));
        (validated, plan)
    }

    /// Each tier's Deployment as `plan` renders it, rolled out (`settled`)
    /// or still rolling.
    fn live(validated: &Validated, plan: &Plan, settled: bool) -> PerTier<Deployment> {
        plan.tiers
            .iter()
            .map(|tier| {
                let mut deployment = render::deployment::deployment(validated, tier);
                let replicas = crate::to_i32(tier.replicas);
                let ready = if settled { replicas } else { 0 };
                deployment.status = Some(DeploymentStatus {
                    replicas: Some(replicas),
                    updated_replicas: Some(ready),
                    available_replicas: Some(ready),
                    ready_replicas: Some(ready),
                    ..Default::default()
                });
                (tier.tier, deployment)
            })
            .collect()
    }

    /// The running pods of `plan`, at its costs.
    fn pods(plan: &Plan) -> Vec<ListedPod> {
        plan.tiers
            .iter()
            .flat_map(|tier| {
                (0..tier.replicas).map(move |i| {
                    ListedPod::of(
                        LivePod {
                            name: format!("shop-{}-{i}", tier.tier),
                            created: i64::from(i),
                            gated: false,
                            terminating: false,
                            finished: false,
                            cost: tier.per_pod(),
                            singleton: tier.tier == Tier::Clock,
                        },
                        Some(tier.tier),
                    )
                })
            })
            .collect()
    }

    fn moves(web: Move, worker: Move) -> PerTier<Move> {
        PerTier::from([(Tier::Web, web), (Tier::Worker, worker)])
    }

    fn cost(plan: &Plan, tier: Tier) -> u32 {
        plan.tier(tier).map_or(0, |t| t.per_pod())
    }

    #[test]
    fn new_deployments_are_applied_whole() {
        let (validated, plan) = planned(10, 20, 2);
        let paced = pace(&validated, &plan, &PerTier::new(), &[]);
        assert_eq!(paced.moves, moves(Move::Apply, Move::Apply));
        assert_eq!(paced.plan, plan, "nothing runs yet: no mix to pace");
        assert!(paced.note.is_empty());
    }

    #[test]
    fn deployments_at_the_plan_are_applied_as_they_are() {
        let (validated, plan) = planned(10, 20, 2);
        let paced = pace(&validated, &plan, &live(&validated, &plan, true), &pods(&plan));
        assert_eq!(paced.moves, moves(Move::Apply, Move::Apply));
        assert_eq!(paced.plan, plan);
    }

    #[test]
    fn a_share_that_grows_waits_for_the_one_that_shrinks() {
        let (old_validated, old) = planned(20, 20, 2);
        let (validated, new) = planned(10, 40, 2);
        assert!(
            cost(&new, Tier::Web) < cost(&old, Tier::Web)
                && cost(&new, Tier::Worker) > cost(&old, Tier::Worker)
        );
        let paced = pace(&validated, &new, &live(&old_validated, &old, true), &pods(&old));
        assert_eq!(paced.moves, moves(Move::Apply, Move::Hold));
        assert_eq!(
            paced.note,
            [format!(
                "worker pods change from {} to {} connections each once the other changes have rolled out",
                cost(&old, Tier::Worker),
                cost(&new, Tier::Worker)
            )]
        );
    }

    #[test]
    fn fewer_replicas_go_first_on_the_old_template() {
        let (old_validated, old) = planned(20, 20, 3);
        let (validated, new) = planned(10, 20, 2);
        let paced = pace(&validated, &new, &live(&old_validated, &old, true), &pods(&old));
        assert_eq!(paced.moves, moves(Move::Scale(2), Move::Apply));
        assert_eq!(paced.plan.tier(Tier::Web).map(|t| t.replicas), Some(2));
    }

    #[test]
    fn a_cost_change_waits_while_a_deployment_still_rolls() {
        let (old_validated, old) = planned(20, 20, 2);
        let (validated, new) = planned(10, 40, 2);
        let paced = pace(&validated, &new, &live(&old_validated, &old, false), &pods(&old));
        assert_eq!(paced.moves, moves(Move::Hold, Move::Hold));
        assert_eq!(paced.note.len(), 2, "{:?}", paced.note);
    }

    #[test]
    fn a_deployment_has_rolled_out_when_every_pod_is_new_and_available_or_it_gave_up() {
        let (validated, plan) = planned(10, 20, 2);
        let done = live(&validated, &plan, true).remove(&Tier::Web).expect("rendered");
        assert!(rolled_out(&done));
        let mut rolling = live(&validated, &plan, false).remove(&Tier::Web).expect("rendered");
        assert!(!rolled_out(&rolling));
        let gave_up =
            json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]);
        if let Some(status) = rolling.status.as_mut() {
            status.conditions = serde_json::from_value(gave_up).ok();
        }
        assert!(rolled_out(&rolling), "waiting longer would not help");
        let mut unobserved = done.clone();
        unobserved.metadata.generation = Some(2);
        assert!(!rolled_out(&unobserved), "the controller has not seen the last change");
        assert!(!rolled_out(&Deployment { status: None, ..done }));
    }
}
