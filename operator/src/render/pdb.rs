//! PodDisruptionBudgets: a drain takes one pod of a tier at a time, the
//! same pace a rolling update keeps.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::labels;
use crate::plan::Tier;
use crate::validate::Owner;

pub fn pdb(owner: &Owner, tier: Tier) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: labels::metadata(owner, tier),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels::selector(owner, tier)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}
