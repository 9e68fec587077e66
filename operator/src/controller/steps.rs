//! One reconcile of one Tidepool, as named steps:
//!
//! 1. [`check`]: read the database Secret (and the TLS ones), validate the
//!    spec, plan the budget, fingerprint what the pods read from the
//!    Secrets ([`crate::credentials`]). A missing Secret or key, an invalid
//!    spec or a budget that cannot fit close the gate: nothing is applied,
//!    status says why.
//! 2. [`apply_children`]: read the live Deployments and pods, pace the
//!    Deployments ([`super::pace`]), apply every rendered child (the pods of
//!    a new image wait for its migration Job), then
//! 3. [`sweep_orphans`]: delete the children the spec no longer has, and
//! 4. [`super::pods::admit`]: admit the pods the budget has room for;
//! 5. [`observe_scaling`]: the shared-server sum, the queue scaler, the web
//!    tier's replica changes;
//! 6. [`write_status`]: the status, and an Event per condition that
//!    changed, written only when it changed.
//!
//! Each step that talks to the API server fails with its own
//! [`Error`] variant.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use tidepool_contract::secret::{DatabaseSecret, SecretError};

use super::apply::{apply_one, delete_orphans, migration_of, observe, scale};
use super::pace::{pace, Move};
use super::{pods, scaling, Context, Error, STATUS_MANAGER};
use crate::autoscaler;
use crate::crd::{DatabaseTls, Tidepool, TidepoolStatus};
use crate::credentials;
use crate::metrics::{Metrics, Outcome};
use crate::plan::{self, PerTier, Plan, Tier};
use crate::render::labels;
use crate::render::tls::{CA_KEY, CLIENT_CERT_KEY, CLIENT_KEY_KEY};
use crate::render::{self, Child};
use crate::status::{self, Applied, Blocked, Migration, ObservedTier, ScaleCause};
use crate::validate::{self, Validated};

/// One pass; whether it applied the children or was blocked.
pub async fn reconcile_once(tidepool: &Tidepool, ctx: &Context) -> Result<Outcome, Error> {
    let namespace = tidepool.namespace().ok_or(Error::NoNamespace)?;
    let previous = tidepool.status.as_ref();
    let (next, outcome) = match check(tidepool, &namespace, &ctx.client).await? {
        Gate::Closed(blocked) => {
            (status::status(previous, tidepool.metadata.generation, Err(blocked), now()), Outcome::Blocked)
        }
        Gate::Open(ready) => {
            let key = ObjectRef::from_obj(tidepool);
            let generation = tidepool.metadata.generation.unwrap_or(0);
            let children = apply_children(ctx, &namespace, &ready).await?;
            if children.migration == Migration::Done {
                sweep_orphans::<Job>(ctx, &namespace, tidepool, &children.kept).await?;
            }
            // Children the spec no longer has can appear only with a new
            // spec: swept once per generation (and once per process).
            if ctx.memory.needs_sweep(&key, generation) {
                sweep_orphans::<Deployment>(ctx, &namespace, tidepool, &children.kept).await?;
                sweep_orphans::<Service>(ctx, &namespace, tidepool, &children.kept).await?;
                sweep_orphans::<PodDisruptionBudget>(ctx, &namespace, tidepool, &children.kept).await?;
                sweep_orphans::<HorizontalPodAutoscaler>(ctx, &namespace, tidepool, &children.kept).await?;
                ctx.memory.swept(&key, generation);
            }
            let admission = pods::admit(
                &ctx.client,
                &namespace,
                &children.pods,
                ready.plan.available,
                &ctx.endpoints.metrics,
            )
            .await?;
            let mut pacing = children.pacing;
            if admission.waiting > 0 {
                pacing.push(format!(
                    "{} pods wait for the connection budget: the live pods may hold {} of the {} available, the next needs {}",
                    admission.waiting,
                    admission.live_cost,
                    ready.plan.available,
                    admission.next_cost.unwrap_or(0)
                ));
            }
            if admission.singleton_waits {
                pacing.push(
                    "the clock's new pod waits until the one it replaces has gone: it never runs twice"
                        .into(),
                );
            }
            let scaling = observe_scaling(ctx, tidepool, &namespace, &ready, previous).await?;
            let applied = Applied {
                plan: &ready.plan,
                observed: children.observed,
                selectors: ready
                    .plan
                    .tiers
                    .iter()
                    .map(|t| (t.tier, labels::selector_string(&ready.validated.owner, t.tier)))
                    .collect(),
                live_peak: i32::try_from(admission.live_cost).unwrap_or(i32::MAX),
                over_commit: scaling.over_commit,
                migration: children.migration,
                pacing,
                scale_causes: scaling.causes,
                autoscaling: scaling.autoscaling,
                database_tls: &ready.validated.spec.database.tls,
            };
            (status::status(previous, tidepool.metadata.generation, Ok(applied), now()), Outcome::Applied)
        }
    };
    write_status(ctx, tidepool, &namespace, previous, &next).await?;
    Ok(outcome)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Whether the spec can be applied now.
enum Gate {
    Open(Box<Ready>),
    Closed(Blocked),
}

/// A spec that can be applied: validated, planned, and its database
/// server (`host:port`, kept in memory, never written anywhere).
struct Ready {
    validated: Validated,
    plan: Plan,
    server: String,
    /// The database Secret's resourceVersion: the queue scaler connects
    /// again when it changes.
    secret_version: String,
}

/// Step 1: the Secrets, the spec, the budget; the fingerprint of what the
/// pods will read from the Secrets ([`credentials`]: a new one rolls them).
async fn check(tidepool: &Tidepool, namespace: &str, client: &Client) -> Result<Gate, Error> {
    let name = &tidepool.spec.database.secret_ref.name;
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadSecret { secret: name.clone(), source })?;
    let Some(secret) = secret else {
        return Ok(Gate::Closed(Blocked {
            reason: "SecretMissing",
            message: format!("the database Secret {name} does not exist in namespace {namespace}"),
        }));
    };
    let secret_version = secret.resource_version().unwrap_or_default();
    let data = secret.data.unwrap_or_default();
    let database = match DatabaseSecret::parse(|key| data.get(key).map(|bytes| bytes.0.as_slice())) {
        Ok(parsed) => parsed,
        Err(e) => {
            let reason = match e {
                SecretError::Missing(_) => "SecretIncomplete",
                SecretError::NotText(_) | SecretError::BadPort => "SecretInvalid",
            };
            return Ok(Gate::Closed(Blocked { reason, message: format!("the database Secret {name}: {e}") }));
        }
    };
    let tls_values = match read_tls_secrets(&tidepool.spec.database.tls, namespace, client).await? {
        Ok(values) => values,
        Err(blocked) => return Ok(Gate::Closed(blocked)),
    };
    let mut validated = match validate::validate(tidepool, namespace) {
        Ok(validated) => validated,
        Err(e) => return Ok(Gate::Closed(Blocked { reason: "InvalidSpec", message: e.to_string() })),
    };
    let port = database.port.to_string();
    let database_values = [
        ("username", database.username.as_bytes()),
        ("password", database.password.as_bytes()),
        ("host", database.host.as_bytes()),
        ("port", port.as_bytes()),
        ("dbname", database.dbname.as_bytes()),
    ]
    .map(|(key, value)| credentials::Part { origin: format!("{name}/{key}"), value });
    let tls_parts =
        tls_values.iter().map(|(origin, value)| credentials::Part { origin: origin.clone(), value });
    validated.credentials =
        Some(credentials::fingerprint(&validated.owner.uid, database_values.into_iter().chain(tls_parts)));
    Ok(match plan::plan(&validated.input) {
        Ok(plan) => {
            Gate::Open(Box::new(Ready { validated, plan, server: database.server(), secret_version }))
        }
        Err(e) => Gate::Closed(Blocked { reason: "BudgetDoesNotFit", message: e.to_string() }),
    })
}

/// The values the pods read from the Secrets `database.tls` names, each
/// with its `<secret>/<key>`; blocked when one is missing or lacks a key
/// (a pod whose Secret volume cannot be mounted would wait for it unseen).
async fn read_tls_secrets(
    tls: &DatabaseTls,
    namespace: &str,
    client: &Client,
) -> Result<Result<Vec<(String, Vec<u8>)>, Blocked>, Error> {
    let wanted = [
        (&tls.ca_secret_ref, "database.tls.caSecretRef", &[CA_KEY][..]),
        (
            &tls.client_certificate_secret_ref,
            "database.tls.clientCertificateSecretRef",
            &[CLIENT_CERT_KEY, CLIENT_KEY_KEY][..],
        ),
    ];
    let mut values = Vec::new();
    for (reference, field, keys) in wanted {
        let Some(reference) = reference else { continue };
        let name = &reference.name;
        let secret = Api::<Secret>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|source| Error::ReadSecret { secret: name.clone(), source })?;
        let Some(secret) = secret else {
            return Ok(Err(Blocked {
                reason: "SecretMissing",
                message: format!("the Secret {name} ({field}) does not exist in namespace {namespace}"),
            }));
        };
        let mut data = secret.data.unwrap_or_default();
        for key in keys {
            let Some(value) = data.remove(*key) else {
                return Ok(Err(Blocked {
                    reason: "SecretIncomplete",
                    message: format!("the Secret {name} ({field}) has no key {key}"),
                }));
            };
            values.push((format!("{name}/{key}"), value.0));
        }
    }
    Ok(Ok(values))
}

/// What applying the children found.
struct AppliedChildren {
    observed: PerTier<ObservedTier>,
    /// Every child rendered this pass, by kind and name: the rest is swept.
    kept: BTreeSet<(&'static str, String)>,
    /// The Tidepool's pods, as listed before applying.
    pods: Vec<pods::ListedPod>,
    migration: Migration,
    /// What holds the change back: a paced step.
    pacing: Vec<String>,
}

/// Step 2: every rendered child in order, the Deployments paced; while the
/// image's migration Job has not succeeded, the rest waits (what runs
/// stays).
async fn apply_children(ctx: &Context, namespace: &str, ready: &Ready) -> Result<AppliedChildren, Error> {
    let (client, metrics) = (&ctx.client, &ctx.endpoints.metrics);
    let owner = &ready.validated.owner;
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let mut live = PerTier::new();
    for tier in ready.plan.tiers.iter().map(|t| t.tier) {
        let deployment = deployments
            .get_opt(&labels::tier_name(owner, tier))
            .await
            .map_err(|source| Error::ReadChildren { what: "Deployment", source })?;
        live.extend(deployment.map(|d| (tier, d)));
    }
    let pods = pods::list(client, namespace, &labels::children_selector(&owner.name)).await?;
    let paced = pace(&ready.validated, &ready.plan, &live, &pods);
    let mut observed: PerTier<ObservedTier> = ready
        .plan
        .tiers
        .iter()
        .map(|t| (t.tier, live.get(&t.tier).map(observe).unwrap_or_default()))
        .collect();
    let mut kept = BTreeSet::new();
    let mut migration = Migration::Done;
    for child in render::children(&ready.validated, &paced.plan) {
        let name = child.name().to_owned();
        let body = child.to_json();
        let writes = metrics.writes(child.kind());
        kept.insert((child.kind(), name.clone()));
        match child {
            // The pods of this spec wait for its migration: what runs stays.
            _ if migration != Migration::Done => {}
            Child::Job(_) => {
                let job = apply_one::<Job>(client, namespace, &name, body, &writes).await?;
                let failed: Vec<_> = pods.iter().filter_map(|pod| pod.failed_job.as_ref()).collect();
                migration = migration_of(&job, &name, &failed);
            }
            Child::Service(_) => drop(apply_one::<Service>(client, namespace, &name, body, &writes).await?),
            Child::PodDisruptionBudget(_) => {
                drop(apply_one::<PodDisruptionBudget>(client, namespace, &name, body, &writes).await?)
            }
            Child::HorizontalPodAutoscaler(_) => {
                drop(apply_one::<HorizontalPodAutoscaler>(client, namespace, &name, body, &writes).await?)
            }
            // Every tier of the paced plan has its move.
            Child::Deployment(tier, _) => match paced.moves.get(&tier).copied().unwrap_or(Move::Apply) {
                Move::Apply => {
                    let deployment = apply_one::<Deployment>(client, namespace, &name, body, &writes).await?;
                    observed.insert(tier, observe(&deployment));
                }
                Move::Scale(replicas) => scale(client, namespace, &name, replicas, &writes).await?,
                Move::Hold => {}
            },
        }
    }
    Ok(AppliedChildren { observed, kept, pods, migration, pacing: paced.note })
}

/// Step 3: deletes the children of kind `K` the Tidepool owns and did not
/// render this pass.
async fn sweep_orphans<K>(
    ctx: &Context,
    namespace: &str,
    tidepool: &Tidepool,
    kept: &BTreeSet<(&'static str, String)>,
) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let selector = labels::children_selector(&tidepool.name_any());
    let uid = tidepool.uid().unwrap_or_default();
    delete_orphans::<K>(&ctx.client, namespace, &selector, &uid, kept, &ctx.endpoints.metrics).await
}

/// What step 5 found.
struct Scaling {
    over_commit: Option<String>,
    causes: PerTier<ScaleCause>,
    autoscaling: Option<status::AutoscalingHealth>,
}

/// Step 5: the Tidepools on the same server, the queue scaler (started,
/// changed or stopped with the spec), and who changed the replicas.
async fn observe_scaling(
    ctx: &Context,
    tidepool: &Tidepool,
    namespace: &str,
    ready: &Ready,
    previous: Option<&TidepoolStatus>,
) -> Result<Scaling, Error> {
    let plan = &ready.plan;
    let over_commit = ctx.shared_server(&(namespace.to_owned(), tidepool.name_any()), &ready.server, plan);
    let settings = autoscaler::settings(tidepool, plan);
    // The version of the Secret the scaler reads: a new one, and it
    // connects again with what the Secret holds now.
    let secret_version = match &settings {
        Some(settings) if settings.secret != tidepool.spec.database.secret_ref.name => {
            Api::<Secret>::namespaced(ctx.client.clone(), namespace)
                .get_metadata_opt(&settings.secret)
                .await
                .map_err(|source| Error::ReadSecret { secret: settings.secret.clone(), source })?
                .and_then(|secret| secret.resource_version())
                .unwrap_or_default()
        }
        _ => ready.secret_version.clone(),
    };
    let report = ctx.autoscalers.ensure(tidepool, settings.clone(), secret_version);
    let workers = plan.tier(Tier::Worker).map_or(0, |t| t.replicas);
    let autoscaling = settings
        .zip(report.as_ref())
        .map(|(settings, report)| scaling::scaler_health(&settings, report, workers));
    let worker = report
        .and_then(|r| r.last_change)
        .filter(|change| change.to == workers)
        .map(|change| ScaleCause { reason: change.because.reason.into(), message: change.because.message });
    let web = scaling::web_scaled(ctx, tidepool, previous, plan).await;
    let causes = [(Tier::Web, web), (Tier::Worker, worker)];
    let causes = causes.into_iter().filter_map(|(tier, cause)| Some((tier, cause?))).collect();
    Ok(Scaling { over_commit, causes, autoscaling })
}

/// Step 6: the status, when it says something new, after an Event for
/// each condition that changed; its gauges in any case.
async fn write_status(
    ctx: &Context,
    tidepool: &Tidepool,
    namespace: &str,
    previous: Option<&TidepoolStatus>,
    next: &TidepoolStatus,
) -> Result<(), Error> {
    let metrics: &Metrics = &ctx.endpoints.metrics;
    metrics.record_status(namespace, &tidepool.name_any(), next);
    if previous.is_some_and(|p| status::same_ignoring_times(p, next)) {
        return Ok(());
    }
    publish_transitions(&ctx.recorder, tidepool, previous, next).await;
    metrics.writes("TidepoolStatus").inc();
    let body = serde_json::json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "status": next});
    Api::<Tidepool>::namespaced(ctx.client.clone(), namespace)
        .patch_status(&tidepool.name_any(), &PatchParams::apply(STATUS_MANAGER).force(), &Patch::Apply(body))
        .await
        .map_err(|source| Error::WriteStatus { source })?;
    Ok(())
}

/// An Event for each condition whose status changed: what a user should know.
async fn publish_transitions(
    recorder: &Recorder,
    tidepool: &Tidepool,
    previous: Option<&TidepoolStatus>,
    next: &TidepoolStatus,
) {
    for condition in &next.conditions {
        let before = status::find(previous, &condition.type_);
        if before.is_some_and(|b| b.status == condition.status && b.reason == condition.reason) {
            continue;
        }
        let bad = match condition.type_.as_str() {
            status::DEGRADED => condition.status == "True",
            status::CONNECTION_BUDGET => condition.status == "False",
            _ => continue,
        };
        if before.is_none() && !bad {
            continue;
        }
        let event = Event {
            type_: if bad { EventType::Warning } else { EventType::Normal },
            reason: condition.reason.clone(),
            note: Some(condition.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &tidepool.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
}
