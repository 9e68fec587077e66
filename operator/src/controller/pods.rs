//! The Tidepool's pods as the controller sees them, and their admission:
//! every app pod starts behind the scheduling gate [`admission::GATE`], and
//! the controller removes it, oldest first, while the budget has room
//! ([`admission::admit`] decides; this only lists and patches).

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use super::Error;
use crate::admission::{self, LivePod};
use crate::metrics::Metrics;
use crate::plan::Tier;
use crate::render::labels;

/// A pod of the Tidepool as the controller lists it.
pub struct ListedPod {
    pub live: LivePod,
    /// Its tier, by its component label (none for a migration pod).
    pub tier: Option<Tier>,
    resource_version: Option<String>,
    /// Scheduling gates other than the operator's, kept when it admits.
    other_gates: Vec<String>,
    /// A failed Job pod's: the Job, and what its container said as it ended.
    pub failed_job: Option<FailedJobPod>,
}

/// A Job's pod that failed, as its status tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedJobPod {
    /// The Job's name (its pods' `batch.kubernetes.io/job-name`).
    pub job: String,
    /// The first container's termination message, if it left one.
    pub message: Option<String>,
}

/// Every pod with the Tidepool's labels (`selector`).
pub async fn list(client: &Client, namespace: &str, selector: &str) -> Result<Vec<ListedPod>, Error> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::ReadChildren { what: "Pod", source })?;
    Ok(pods.items.iter().map(listed_pod).collect())
}

/// Removes the admission gate of the pods the budget has room for
/// ([`admission`]). `pods` is a fresh list: since only this controller
/// admits, the live pods can only have become fewer since. A pod changed
/// meanwhile (a conflict) or gone is left to the next pass, which its
/// change triggers.
pub async fn admit(
    client: &Client,
    namespace: &str,
    pods: &[ListedPod],
    available: u32,
    metrics: &Metrics,
) -> Result<admission::Admission, Error> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let live: Vec<LivePod> = pods.iter().map(|pod| pod.live.clone()).collect();
    let pass = admission::admit(&live, available);
    for name in &pass.admit {
        let Some(pod) = pods.iter().find(|p| &p.live.name == name) else { continue };
        let gates = if pod.other_gates.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(pod
                .other_gates
                .iter()
                .map(|name| serde_json::json!({"name": name}))
                .collect::<Vec<_>>())
        };
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": pod.resource_version},
            "spec": {"schedulingGates": gates},
        });
        metrics.writes("Pod").inc();
        match api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await {
            Ok(_) => tracing::debug!(pod = %name, "admitted"),
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_not_found() => {
                tracing::debug!(pod = %name, "changed while being admitted; the next pass sees it");
                break;
            }
            Err(source) => return Err(Error::AdmitPod { pod: name.clone(), source }),
        }
    }
    Ok(pass)
}

fn listed_pod(pod: &Pod) -> ListedPod {
    let gates: Vec<String> =
        pod.spec.iter().flat_map(|s| s.scheduling_gates.iter().flatten()).map(|g| g.name.clone()).collect();
    let tier = pod.labels().get(labels::COMPONENT).and_then(|name| Tier::named(name));
    ListedPod {
        live: LivePod {
            name: pod.name_any(),
            created: pod.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
            gated: gates.iter().any(|gate| gate == admission::GATE),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            finished: matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            cost: labels::pod_cost(pod.annotations()),
            singleton: tier == Some(Tier::Clock),
        },
        tier,
        resource_version: pod.metadata.resource_version.clone(),
        other_gates: gates.into_iter().filter(|gate| gate != admission::GATE).collect(),
        failed_job: failed_job(pod),
    }
}

fn failed_job(pod: &Pod) -> Option<FailedJobPod> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Failed") {
        return None;
    }
    let job = pod.labels().get("batch.kubernetes.io/job-name")?.clone();
    let message = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .filter(|m| !m.trim().is_empty());
    Some(FailedJobPod { job, message })
}

#[cfg(test)]
impl ListedPod {
    /// A pod as listed, with no other gates.
    pub fn of(live: LivePod, tier: Option<Tier>) -> Self {
        ListedPod { live, tier, resource_version: None, other_gates: Vec::new(), failed_job: None }
    }
}
