//! Names, labels and the owner reference every child carries.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::plan::Tier;
use crate::validate::Owner;

/// `app.kubernetes.io/managed-by` of every child: how the operator finds
/// what it made.
pub const MANAGED_BY: &str = "tidepool-operator";
/// The label with the Tidepool a child or pod belongs to.
pub const INSTANCE: &str = "app.kubernetes.io/instance";
/// The label with a child's or pod's tier (its [`Tier::name`]), or `migrate`.
pub const COMPONENT: &str = "app.kubernetes.io/component";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The pod annotation with the pod's share of server connections, from the
/// same plan field as its PgBouncer's `max_db_connections`.
pub const SHARE_ANNOTATION: &str = "tidepool.dev/max-db-connections";
/// The pod annotation with its connections outside PgBouncer (LISTEN).
pub const DIRECT_ANNOTATION: &str = "tidepool.dev/direct-connections";

/// What a pod (or a pod template) with these annotations costs the
/// database: its share plus its direct connections (0 for what it lacks).
pub fn pod_cost(annotations: &BTreeMap<String, String>) -> u32 {
    let number = |key: &str| annotations.get(key).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
    number(SHARE_ANNOTATION) + number(DIRECT_ANNOTATION)
}

/// `<tidepool>-<tier>`: the name of a tier's Deployment, Service, PDB and HPA.
pub fn tier_name(owner: &Owner, tier: Tier) -> String {
    format!("{}-{}", owner.name, tier.name())
}

/// The labels that select a tier's pods. Never change them: a Deployment's
/// selector is immutable.
pub fn selector(owner: &Owner, tier: Tier) -> BTreeMap<String, String> {
    component_selector(owner, tier.name())
}

/// The labels that select one component's objects (a tier, or `migrate`).
pub fn component_selector(owner: &Owner, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "tidepool".to_owned()),
        (INSTANCE.to_owned(), owner.name.clone()),
        (COMPONENT.to_owned(), component.to_owned()),
    ])
}

/// The selector as the string the scale subresource and `kubectl -l` take.
pub fn selector_string(owner: &Owner, tier: Tier) -> String {
    selector(owner, tier).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The selector of every child and pod the operator made for the Tidepool
/// `name`.
pub fn children_selector(name: &str) -> String {
    format!("{INSTANCE}={name},{}", managed_selector())
}

/// The selector of everything the operator made.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// Every label of a tier's objects: the selector's and the managed-by.
pub fn labels(owner: &Owner, tier: Tier) -> BTreeMap<String, String> {
    component_labels(owner, tier.name())
}

/// Every label of one component's objects.
pub fn component_labels(owner: &Owner, component: &str) -> BTreeMap<String, String> {
    let mut labels = component_selector(owner, component);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels.insert("app.kubernetes.io/part-of".to_owned(), owner.name.clone());
    labels
}

/// The Tidepool as the controlling owner, so children go with it. Offline
/// (no uid) there is none.
pub fn owner_reference(owner: &Owner) -> Option<OwnerReference> {
    (!owner.uid.is_empty()).then(|| OwnerReference {
        api_version: "tidepool.dev/v1alpha1".to_owned(),
        kind: "Tidepool".to_owned(),
        name: owner.name.clone(),
        uid: owner.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Metadata of a tier's object.
pub fn metadata(owner: &Owner, tier: Tier) -> ObjectMeta {
    component_metadata(owner, tier_name(owner, tier), tier.name())
}

/// Metadata of an object `name` of one component.
pub fn component_metadata(owner: &Owner, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(owner.namespace.clone()),
        labels: Some(component_labels(owner, component)),
        owner_references: owner_reference(owner).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}
