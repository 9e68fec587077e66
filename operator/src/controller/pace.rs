//! Pacing: where the Deployments go in this pass, from where they are.
//!
//! A change that alters what a pod may hold (its share) is walked one step
//! of [`plan::transition`] at a time ([`plan::next_step`] picks it), the
//! next once the Deployments have rolled out and no pod of another cost is
//! left; so no mix of old and new pods passes the budget. Other changes go
//! at once. Pure: it reads the live Deployments and pods it is given.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::apply::contains;
use super::pods::ListedPod;
use crate::plan::{self, PerTier, Plan, Tier};
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

/// Where the Deployments go next ([`plan::next_step`]), from what they are.
/// A tier's template "rolls" when the live one lacks what is rendered now.
pub fn pace(
    validated: &validate::Validated,
    plan: &Plan,
    live: &PerTier<Option<Deployment>>,
    pods: &[ListedPod],
) -> Paced {
    let mut live_step = plan::Step::at(plan);
    let mut rolls = PerTier::<bool>::default();
    let mut settled = true;
    for tier in Tier::ALL {
        let step = live_step.tier_mut(tier);
        let Some(deployment) = &live[tier] else {
            // A new Deployment: from nothing, with the new template.
            step.replicas = 0;
            rolls[tier] = true;
            continue;
        };
        let spec = deployment.spec.as_ref();
        let template = spec.map(|s| &s.template);
        let rendered = render::deployment::deployment(validated, plan, tier).spec.map(|s| s.template);
        rolls[tier] = match (template.map(serde_json::to_value), rendered.map(|t| serde_json::to_value(&t))) {
            (Some(Ok(live)), Some(Ok(rendered))) => !contains(&live, &rendered),
            _ => true,
        };
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
        settled &= rolled_out(deployment);
    }
    let other_costs = pods.iter().any(|pod| {
        !pod.live.finished && pod.tier.is_some_and(|tier| pod.live.cost != plan.tier(tier).per_pod())
    });
    let next = plan::next_step(live_step, plan, |tier| rolls[tier], settled, other_costs);
    let mut stepped = plan.clone();
    let mut note = Vec::new();
    let moves = PerTier::from_fn(|tier| {
        let (now, to) = (live_step.tier(tier), next.tier(tier));
        let stepped_tier = stepped.tier_mut(tier);
        stepped_tier.replicas = to.replicas;
        stepped_tier.surge = to.surge;
        if rolls[tier] && to.template == plan::Template::Old {
            if now.per_pod != plan.tier(tier).per_pod() {
                note.push(format!(
                    "{} pods change from {} to {} connections each once the other changes have rolled out",
                    tier,
                    now.per_pod,
                    plan.tier(tier).per_pod()
                ));
            }
            if to.replicas != now.replicas {
                Move::Scale(crate::to_i32(to.replicas))
            } else {
                Move::Hold
            }
        } else {
            Move::Apply
        }
    });
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

    /// Both Deployments as `plan` renders them, rolled out (`settled`) or
    /// still rolling.
    fn live(validated: &Validated, plan: &Plan, settled: bool) -> PerTier<Option<Deployment>> {
        PerTier::from_fn(|tier| {
            let mut deployment = render::deployment::deployment(validated, plan, tier);
            let replicas = crate::to_i32(plan.tier(tier).replicas);
            let ready = if settled { replicas } else { 0 };
            deployment.status = Some(DeploymentStatus {
                replicas: Some(replicas),
                updated_replicas: Some(ready),
                available_replicas: Some(ready),
                ready_replicas: Some(ready),
                ..Default::default()
            });
            Some(deployment)
        })
    }

    /// The running pods of `plan`, at its costs.
    fn pods(plan: &Plan) -> Vec<ListedPod> {
        Tier::ALL
            .iter()
            .flat_map(|&tier| {
                (0..plan.tier(tier).replicas).map(move |i| {
                    ListedPod::of(
                        LivePod {
                            name: format!("shop-{tier}-{i}"),
                            created: i64::from(i),
                            gated: false,
                            terminating: false,
                            finished: false,
                            cost: plan.tier(tier).per_pod(),
                        },
                        Some(tier),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn new_deployments_are_applied_whole() {
        let (validated, plan) = planned(10, 20, 2);
        let paced = pace(&validated, &plan, &PerTier::default(), &[]);
        assert_eq!(paced.moves, PerTier { web: Move::Apply, worker: Move::Apply });
        assert_eq!(paced.plan, plan, "nothing runs yet: no mix to pace");
        assert!(paced.note.is_empty());
    }

    #[test]
    fn deployments_at_the_plan_are_applied_as_they_are() {
        let (validated, plan) = planned(10, 20, 2);
        let paced = pace(&validated, &plan, &live(&validated, &plan, true), &pods(&plan));
        assert_eq!(paced.moves, PerTier { web: Move::Apply, worker: Move::Apply });
        assert_eq!(paced.plan, plan);
    }

    #[test]
    fn a_share_that_grows_waits_for_the_one_that_shrinks() {
        let (old_validated, old) = planned(20, 20, 2);
        let (validated, new) = planned(10, 40, 2);
        assert!(new.web.per_pod() < old.web.per_pod() && new.worker.per_pod() > old.worker.per_pod());
        let paced = pace(&validated, &new, &live(&old_validated, &old, true), &pods(&old));
        assert_eq!(paced.moves, PerTier { web: Move::Apply, worker: Move::Hold });
        assert_eq!(
            paced.note,
            [format!(
                "worker pods change from {} to {} connections each once the other changes have rolled out",
                old.worker.per_pod(),
                new.worker.per_pod()
            )]
        );
    }

    #[test]
    fn fewer_replicas_go_first_on_the_old_template() {
        let (old_validated, old) = planned(20, 20, 3);
        let (validated, new) = planned(10, 20, 2);
        let paced = pace(&validated, &new, &live(&old_validated, &old, true), &pods(&old));
        assert_eq!(paced.moves, PerTier { web: Move::Scale(2), worker: Move::Apply });
        assert_eq!(paced.plan.web.replicas, 2);
    }

    #[test]
    fn a_cost_change_waits_while_a_deployment_still_rolls() {
        let (old_validated, old) = planned(20, 20, 2);
        let (validated, new) = planned(10, 40, 2);
        let paced = pace(&validated, &new, &live(&old_validated, &old, false), &pods(&old));
        assert_eq!(paced.moves, PerTier { web: Move::Hold, worker: Move::Hold });
        assert_eq!(paced.note.len(), 2, "{:?}", paced.note);
    }

    #[test]
    fn a_deployment_has_rolled_out_when_every_pod_is_new_and_available_or_it_gave_up() {
        let (validated, plan) = planned(10, 20, 2);
        let PerTier { web: Some(done), .. } = live(&validated, &plan, true) else { panic!("rendered") };
        assert!(rolled_out(&done));
        let PerTier { web: Some(mut rolling), .. } = live(&validated, &plan, false) else {
            panic!("rendered")
        };
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
