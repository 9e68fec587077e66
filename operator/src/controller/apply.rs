//! The primitives that write children: server-side apply, only when the
//! live object lacks something rendered ([`contains`]: at rest nothing is
//! written), the sweep of children the spec no longer has, and what a
//! migration Job and a Deployment report.

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::pods::FailedJobPod;
use super::{Error, FIELD_MANAGER};
use crate::metrics::Metrics;
use crate::status::{Migration, ObservedTier};

/// Applies `body` as the child `name` of kind `K` unless the live one
/// already holds all of it; the live or applied object.
pub async fn apply_one<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    body: serde_json::Value,
    writes: &prometheus::IntCounter,
) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let failed = |source| Error::ApplyChild {
        kind: <K as k8s_openapi::Resource>::KIND,
        name: name.to_owned(),
        source,
    };
    let api = Api::<K>::namespaced(client.clone(), namespace);
    // At rest nothing is written: a child that already says all the
    // rendered object says (the server adds defaults, never removes) is
    // left alone. A child changed by hand no longer does, and is put back.
    if let Some(live) = api.get_opt(name).await.map_err(failed)? {
        if serde_json::to_value(&live).is_ok_and(|live| contains(&live, &body)) {
            return Ok(live);
        }
    }
    writes.inc();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(body)).await.map_err(failed)
}

/// Sets only the replicas of Deployment `name` (its scale subresource),
/// keeping its template.
pub async fn scale(
    client: &Client,
    namespace: &str,
    name: &str,
    replicas: i32,
    writes: &prometheus::IntCounter,
) -> Result<(), Error> {
    writes.inc();
    let scale = serde_json::json!({"spec": {"replicas": replicas}});
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch_scale(name, &params, &Patch::Merge(scale))
        .await
        .map_err(|source| Error::ApplyChild { kind: "Deployment", name: name.to_owned(), source })?;
    Ok(())
}

/// The most of a failed migration pod's message quoted in status.
const MIGRATION_MESSAGE_MAX: usize = 600;

/// Whether `live` holds everything `wanted` says: every key of an object
/// (extra keys allowed), lists of the same length item by item, equal
/// scalars.
pub fn contains(live: &serde_json::Value, wanted: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (live, wanted) {
        (Value::Object(live), Value::Object(wanted)) => {
            wanted.iter().all(|(key, value)| live.get(key).is_some_and(|l| contains(l, value)))
        }
        (Value::Array(live), Value::Array(wanted)) => {
            live.len() == wanted.len() && live.iter().zip(wanted).all(|(l, w)| contains(l, w))
        }
        (live, wanted) => live == wanted,
    }
}

/// Where the migration Job `name` stands; a failure quotes the last line
/// its pods (`failed`, of any Job) ended with.
pub fn migration_of(job: &Job, name: &str, failed: &[&FailedJobPod]) -> Migration {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    let holds =
        |type_: &str| conditions.and_then(|c| c.iter().find(|c| c.type_ == type_ && c.status == "True"));
    if holds("Complete").is_some() {
        Migration::Done
    } else if let Some(condition) = holds("Failed") {
        let mut message = condition.message.clone().unwrap_or_default();
        let said = failed
            .iter()
            .filter(|pod| pod.job == name)
            .filter_map(|pod| pod.message.as_deref())
            .filter_map(|m| m.lines().rev().find(|line| !line.trim().is_empty()))
            .next();
        if let Some(said) = said {
            let said: String = said.trim().chars().take(MIGRATION_MESSAGE_MAX).collect();
            message = format!("{message}; its pod ended with: {said}");
        }
        Migration::Failed { name: name.to_owned(), message }
    } else {
        Migration::Running { name: name.to_owned() }
    }
}

/// What a Deployment reports of its pods.
pub fn observe(deployment: &Deployment) -> ObservedTier {
    let status = deployment.status.clone().unwrap_or_default();
    ObservedTier {
        replicas: status.replicas.unwrap_or(0),
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        observed: status.observed_generation >= deployment.metadata.generation,
    }
}

/// Deletes the objects of kind `K` with this Tidepool's labels that it owns
/// (by uid: a copy of the labels is not enough) and did not apply this time.
pub async fn delete_orphans<K>(
    client: &Client,
    namespace: &str,
    selector: &str,
    uid: &str,
    kept: &BTreeSet<(&'static str, String)>,
    metrics: &Metrics,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let kind = <K as k8s_openapi::Resource>::KIND;
    let listed = api
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::ReadChildren { what: kind, source })?;
    for object in listed {
        let owned = object.owner_references().iter().any(|r| r.uid == uid && r.controller == Some(true));
        let name = object.name_any();
        if owned && !kept.contains(&(kind, name.clone())) {
            tracing::info!(kind, %name, "deleting a child the spec no longer has");
            metrics.writes(kind).inc();
            if let Err(source) = api.delete(&name, &DeleteParams::background()).await {
                return Err(Error::DeleteOrphan { kind, name, source });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{contains, migration_of, FailedJobPod};
    use crate::status::Migration;
    use serde_json::json;

    /// A failed migration quotes the last line its own pods ended with, not
    /// another Job's.
    #[test]
    fn a_failed_migration_quotes_its_pods_last_line() {
        let job: k8s_openapi::api::batch::v1::Job = serde_json::from_value(json!({
            "metadata": {"name": "shop-migrate-1"},
            "status": {"conditions": [{"type": "Failed", "status": "True", "message": "Job has reached the specified backoff limit"}]},
        }))
        .expect("a Job");
        let ours = FailedJobPod {
            job: "shop-migrate-1".into(),
            message: Some(
                "starting\ntidepool failed: db.example:5432: invalid peer certificate: UnknownIssuer\n\n"
                    .into(),
            ),
        };
        let other = FailedJobPod { job: "shop-migrate-0".into(), message: Some("old news".into()) };
        let Migration::Failed { message, .. } = migration_of(&job, "shop-migrate-1", &[&other, &ours]) else {
            panic!("failed")
        };
        assert_eq!(
            message,
            "Job has reached the specified backoff limit; its pod ended with: tidepool failed: db.example:5432: invalid peer certificate: UnknownIssuer"
        );
        let Migration::Failed { message, .. } = migration_of(&job, "shop-migrate-1", &[&other]) else {
            panic!("failed")
        };
        assert_eq!(message, "Job has reached the specified backoff limit");
    }

    #[test]
    fn a_live_object_with_server_defaults_contains_what_was_rendered() {
        let wanted = json!({"spec": {"replicas": 2, "ports": [{"name": "http", "port": 80}]}});
        let live = json!({"spec": {"replicas": 2, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}, "status": {}});
        assert!(contains(&live, &wanted));
        let scaled = json!({"spec": {"replicas": 5, "ports": [{"name": "http", "port": 80}]}});
        assert!(!contains(&scaled, &wanted), "a hand edit is seen");
        let extra_port =
            json!({"spec": {"replicas": 2, "ports": [{"name": "http", "port": 80}, {"port": 81}]}});
        assert!(!contains(&extra_port, &wanted), "lists must match item by item");
        assert!(!contains(&json!({"spec": {}}), &wanted));
    }
}
