//! The web tier's HorizontalPodAutoscaler. It scales the Tidepool (its
//! scale subresource), not the Deployment: the Tidepool is the one source of
//! replicas, and the operator applies them to the Deployment within the
//! planned bounds (DESIGN, "Who sets replicas").

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};

use super::labels;
use crate::crd::WebAutoscaling;
use crate::plan::Tier;
use crate::validate::Owner;

pub fn web_hpa(owner: &Owner, autoscaling: &WebAutoscaling) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: labels::metadata(owner, Tier::Web),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("tidepool.dev/v1alpha1".to_owned()),
                kind: "Tidepool".to_owned(),
                name: owner.name.clone(),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".to_owned(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".to_owned(),
                    target: MetricTarget {
                        type_: "Utilization".to_owned(),
                        average_utilization: Some(autoscaling.target_cpu_utilization_percentage),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: None,
        }),
        status: None,
    }
}
