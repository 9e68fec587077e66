//! The controller: reads, calls the pure pipeline, applies.
//!
//! For each Tidepool: read the referenced Secret (which keys it has, and
//! its host and port for the shared-server sum, kept in memory only; no
//! value is logged or written anywhere), validate, plan, render, then
//! server-side apply every child with the field manager
//! [`FIELD_MANAGER`] (forced, so a child changed by hand is put back),
//! delete the children it owns that the spec no longer has, and write the
//! status ([`crate::status`]) with [`STATUS_MANAGER`] when it changed. A
//! missing Secret or key, an invalid spec or a budget that cannot fit leave
//! the children as they are and say why in status and an Event.
//!
//! Triggers: the Tidepool, its children (`owns`), its pods (admission and
//! `livePeak`), the Secrets Tidepools refer to (so a Secret created after
//! its Tidepool starts it), all but the Tidepools watched as metadata only
//! (a reconcile reads what it needs afresh), and
//! the other Tidepools on the same database server when their total
//! changes ([`crate::index`]: an over-commit shows in every one's
//! `ConnectionBudget`), and the queue scalers ([`crate::autoscaler`]) when
//! what they report changes.
//!
//! Replicas come from the Tidepool alone: `spec.web.replicas` (set through
//! the scale subresource by the web HPA or `kubectl scale`) and
//! `spec.worker.replicas` (set by the queue scaler when the worker tier
//! autoscales). A change of either is an Event and is recorded in the
//! tier's `lastScale`.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::admission::{self, LivePod};
use crate::autoscaler::{self, Autoscalers};
use crate::crd::{Tidepool, TidepoolStatus};
use crate::http::Endpoints;
use crate::index::{Key, ServerIndex};
use crate::metrics::{Metrics, Outcome};
use crate::plan::{self, Plan, Tier};
use crate::render::deployment::SECRET_KEYS;
use crate::render::labels::{self, MANAGED_BY};
use crate::render::{self, Child};
use crate::status::{self, Applied, AutoscalingHealth, Blocked, Migration, ObservedTier, ScaleCause};
use crate::validate;

/// The field manager of every child.
pub const FIELD_MANAGER: &str = "tidepool-operator";
/// The field manager of the Tidepools' status.
pub const STATUS_MANAGER: &str = "tidepool-operator/status";
/// Reconciles running at once. Each holds a few requests in flight (and a
/// connection each): unbounded, a thousand new Tidepools at once meant a
/// thousand TLS connections and an operator of 150 MB.
const MAX_CONCURRENT_RECONCILES: u16 = 16;
/// Reconciles of Tidepools whose server total changed, queued at most.
const RETRIGGER_QUEUE: usize = 1024;
/// Pause before a failed reconcile is tried again, doubled after each
/// further failure of that Tidepool up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long reconciles in flight may finish after shutdown begins; then
/// they are dropped. Well within the pod's termination grace period (30 s),
/// so the Lease is still released. Without it, an operator whose first list
/// of Tidepools never arrives (its RBAC lacks `list`) would never stop: the
/// controller holds its runner until that list.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes API refused or failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the Tidepool has no namespace")]
    NoNamespace,
}

impl Error {
    /// Every [`Error::kind`], for the metrics to start each at 0.
    pub const KINDS: [&'static str; 2] = ["kube_api", "no_namespace"];

    /// The `kind` label of `tidepool_operator_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => Self::KINDS[0],
            Error::NoNamespace => Self::KINDS[1],
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub store: Store<Tidepool>,
    pub endpoints: Arc<Endpoints>,
    /// Planned peaks by database server, and where to ask for the
    /// reconcile of Tidepools whose server total changed.
    servers: Arc<Servers>,
    /// Failures in a row by Tidepool, for the retry backoff (an entry goes
    /// with the next success or the Tidepool's deletion).
    failures: Arc<Mutex<HashMap<ObjectRef<Tidepool>, u32>>>,
    /// The generation whose orphans (Deployments, Services, PDBs, HPAs)
    /// were last deleted, by Tidepool.
    swept: Arc<Mutex<HashMap<ObjectRef<Tidepool>, i64>>>,
    /// The queue scalers of the Tidepools whose worker tier autoscales.
    autoscalers: Arc<Autoscalers>,
    /// The web replicas whose change was last announced, by Tidepool: a
    /// reconcile that runs on an object read before the last status write
    /// sees the same change again.
    announced: Arc<Mutex<HashMap<ObjectRef<Tidepool>, u32>>>,
}

/// The server index and the reconciles it asks for.
struct Servers {
    index: Mutex<ServerIndex>,
    retrigger: mpsc::Sender<ObjectRef<Tidepool>>,
}

impl Servers {
    fn retrigger(&self, keys: Vec<Key>) {
        for (namespace, name) in keys {
            if self.retrigger.try_send(ObjectRef::new(&name).within(&namespace)).is_err() {
                tracing::warn!(%namespace, %name, "too many reconciles queued; this Tidepool's server total waits for its next one");
            }
        }
    }

    fn remove(&self, key: &Key) {
        let mates = self.index.lock().map(|mut index| index.remove(key)).unwrap_or_default();
        self.retrigger(mates);
    }
}

impl Context {
    /// Records this Tidepool's planned peak on `server` and says whether the
    /// Tidepools there plan more together than this one's budget.
    fn shared_server(&self, key: &Key, server: &str, plan: &Plan) -> Option<String> {
        let alive =
            |(namespace, name): &Key| self.store.get(&ObjectRef::new(name).within(namespace)).is_some();
        let Ok(mut index) = self.servers.index.lock() else {
            return None;
        };
        // Under the lock: a deletion updates the store first, then removes
        // the entry under the lock, so a reconcile that finishes after the
        // deletion cannot put the entry back.
        if !alive(key) {
            return None;
        }
        let mates = index.record(key, server, plan.planned_peak, plan.available);
        let together = index.together(key, alive);
        drop(index);
        self.servers.retrigger(mates);
        let together = together.filter(|t| t.total > u64::from(plan.available))?;
        let others: Vec<String> =
            together.others.iter().map(|((ns, name), peak)| format!("{ns}/{name} {peak}")).collect();
        Some(format!(
            "the Tidepools on this database server plan {} connections together, over the {} available: this one {}, {}",
            together.total,
            plan.available,
            plan.planned_peak,
            others.join(", ")
        ))
    }
}

/// The `User-Agent` of the operator's requests: how the API server's audit
/// log and metrics tell its writes from everyone else's.
pub const USER_AGENT: &str = concat!("tidepool-operator/", env!("CARGO_PKG_VERSION"));

/// A client from the in-cluster config or the kubeconfig, naming itself
/// [`USER_AGENT`].
pub async fn client() -> Result<Client, kube::Error> {
    client_from(kube::Config::infer().await.map_err(kube::Error::InferConfig)?)
}

/// A client from `config`, naming itself [`USER_AGENT`].
pub fn client_from(mut config: kube::Config) -> Result<Client, kube::Error> {
    config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT)));
    Client::try_from(config)
}

/// The operator's scope: one namespace, or the whole cluster.
fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves (and the reconciles in
/// flight finish, for at most [`SHUTDOWN_GRACE`]), reporting to `endpoints`.
/// `namespace` limits it to one namespace (the operator then needs rights
/// there only).
pub async fn run(
    client: Client,
    namespace: Option<String>,
    endpoints: Arc<Endpoints>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();
    let ns = namespace.as_deref();
    let children = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    // The Tidepools' own reflector, so /readyz can say when the first list
    // has arrived (the store's own readiness wakes a single waiter, and the
    // controller is that waiter).
    let (store, writer) = reflector::store::<Tidepool>();
    let readiness = endpoints.clone();
    let (retrigger, retriggered) = mpsc::channel(RETRIGGER_QUEUE);
    let servers = Arc::new(Servers { index: Mutex::new(ServerIndex::default()), retrigger });
    let forget = servers.clone();
    let forget_gauges = endpoints.clone();
    let failures: Arc<Mutex<HashMap<ObjectRef<Tidepool>, u32>>> = Arc::default();
    let forget_failures = failures.clone();
    let swept: Arc<Mutex<HashMap<ObjectRef<Tidepool>, i64>>> = Arc::default();
    let forget_swept = swept.clone();
    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() },
    );
    let autoscalers = Arc::new(Autoscalers::new(autoscaler::Shared {
        client: client.clone(),
        recorder: recorder.clone(),
        store: store.clone(),
        metrics: endpoints.metrics.clone(),
        retrigger: servers.retrigger.clone(),
    }));
    let forget_autoscaler = autoscalers.clone();
    let announced: Arc<Mutex<HashMap<ObjectRef<Tidepool>, u32>>> = Arc::default();
    let forget_announced = announced.clone();
    let tidepools = watcher(api::<Tidepool>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::InitDone) => readiness.ready.store(true, std::sync::atomic::Ordering::Relaxed),
            Ok(watcher::Event::Delete(gone)) => {
                forget.remove(&(gone.namespace().unwrap_or_default(), gone.name_any()));
                forget_gauges.metrics.forget(&gone.namespace().unwrap_or_default(), &gone.name_any());
                if let Ok(mut failures) = forget_failures.lock() {
                    failures.remove(&ObjectRef::from_obj(gone));
                }
                if let Ok(mut swept) = forget_swept.lock() {
                    swept.remove(&ObjectRef::from_obj(gone));
                }
                forget_autoscaler.stop(&ObjectRef::from_obj(gone));
                if let Ok(mut announced) = forget_announced.lock() {
                    announced.remove(&ObjectRef::from_obj(gone));
                }
            }
            _ => {}
        })
        .applied_objects();
    let controller = Controller::for_stream(tidepools, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES));
    let secret_store = store.clone();
    // Metadata only: the watch holds no Secret's values (a reconcile reads
    // its one Secret when it runs).
    let secrets = watcher(api::<PartialObjectMeta<Secret>>(&client, ns), watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let context = Arc::new(Context {
        client: client.clone(),
        recorder,
        store,
        endpoints,
        servers,
        failures,
        swept,
        autoscalers,
        announced,
    });
    // Children and pods only start reconciles, which read what they need:
    // their watches hold metadata only.
    let running = controller
        .owns_stream(metadata::<Deployment>(&client, ns, &children))
        .owns_stream(metadata::<Service>(&client, ns, &children))
        .owns_stream(metadata::<PodDisruptionBudget>(&client, ns, &children))
        .owns_stream(metadata::<HorizontalPodAutoscaler>(&client, ns, &children))
        .owns_stream(metadata::<Job>(&client, ns, &children))
        .watches_stream(metadata::<Pod>(&client, ns, &children), |pod| owner_of(&pod))
        .watches_stream(secrets, move |secret| tidepools_using(&secret_store, &secret))
        .reconcile_on(stream_of(retriggered))
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(tidepool = %object, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        });
    tokio::select! {
        () = running => {}
        () = async {
            shutdown.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!(grace = ?SHUTDOWN_GRACE, "reconciles still running at the end of the shutdown grace: dropped"),
    }
}

/// A metadata-only watch of the operator's objects of kind `K`.
fn metadata<K>(
    client: &Client,
    namespace: Option<&str>,
    children: &watcher::Config,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
{
    watcher(api::<PartialObjectMeta<K>>(client, namespace), children.clone())
        .default_backoff()
        .touched_objects()
}

/// The Tidepool a pod of a tier belongs to, by its labels.
fn owner_of(pod: &PartialObjectMeta<Pod>) -> Option<ObjectRef<Tidepool>> {
    let instance = pod.labels().get("app.kubernetes.io/instance")?;
    Some(ObjectRef::new(instance).within(pod.namespace().as_deref()?))
}

/// The Tidepools whose `secretRef` names this Secret.
fn tidepools_using(store: &Store<Tidepool>, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<Tidepool>> {
    let (name, namespace) = (secret.name_any(), secret.namespace());
    store
        .state()
        .iter()
        .filter(|tp| tp.namespace() == namespace && tp.spec.database.secret_ref.name == name)
        .map(|tp| ObjectRef::from_obj(tp.as_ref()))
        .collect()
}

fn error_policy(tidepool: Arc<Tidepool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.endpoints.metrics.error(error.kind());
    let failures = ctx
        .failures
        .lock()
        .map(|mut failures| {
            let count = failures.entry(ObjectRef::from_obj(tidepool.as_ref())).or_insert(0);
            *count = count.saturating_add(1);
            *count
        })
        .unwrap_or(1);
    let delay = retry_delay(failures);
    tracing::warn!(tidepool = %tidepool.name_any(), error = %error, failures, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// The pause after the `failures`-th failure in a row.
fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1))).min(RETRY_MAX)
}

/// The database server (`host:port`, from the Secret: kept in memory,
/// never written anywhere), or why the spec cannot be applied now.
async fn dereference(
    tidepool: &Tidepool,
    namespace: &str,
    client: &Client,
) -> Result<Result<String, Blocked>, Error> {
    let name = &tidepool.spec.database.secret_ref.name;
    let Some(secret) = Api::<Secret>::namespaced(client.clone(), namespace).get_opt(name).await? else {
        return Ok(Err(Blocked {
            reason: "SecretMissing",
            message: format!("the database Secret {name} does not exist in namespace {namespace}"),
        }));
    };
    let keys: BTreeSet<&str> = secret
        .data
        .iter()
        .flat_map(|data| data.keys())
        .chain(secret.string_data.iter().flat_map(|data| data.keys()))
        .map(String::as_str)
        .collect();
    let missing: Vec<&str> = SECRET_KEYS.iter().copied().filter(|key| !keys.contains(key)).collect();
    if missing.is_empty() {
        let value = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
        };
        Ok(Ok(format!("{}:{}", value("host").unwrap_or_default(), value("port").unwrap_or_default())))
    } else {
        Ok(Err(Blocked {
            reason: "SecretIncomplete",
            message: format!(
                "the database Secret {name} lacks the keys {} (it needs {})",
                missing.join(", "),
                SECRET_KEYS.join(", ")
            ),
        }))
    }
}

async fn reconcile(tidepool: Arc<Tidepool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = if tidepool.metadata.deletion_timestamp.is_some() {
        // Its children go with it (owner references): nothing to write.
        Ok(Outcome::Deleting)
    } else {
        match reconcile_once(&tidepool, &ctx).await {
            Ok(true) => Ok(Outcome::Applied),
            Ok(false) => Ok(Outcome::Blocked),
            Err(e) if namespace_terminating(&e) => Ok(Outcome::Deleting),
            Err(e) => Err(e),
        }
    };
    ctx.endpoints.metrics.record(result.as_ref().map_or(Outcome::Error, |outcome| *outcome), started);
    if result.is_ok() {
        if let Ok(mut failures) = ctx.failures.lock() {
            failures.remove(&ObjectRef::from_obj(tidepool.as_ref()));
        }
    }
    result.map(|_| Action::await_change())
}

/// A write refused because the namespace is being deleted: nothing more is
/// applied there, and it is no failure.
fn namespace_terminating(error: &Error) -> bool {
    let Error::Kube(kube::Error::Api(status)) = error else {
        return false;
    };
    status.is_forbidden()
        && status
            .details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
}

/// One pass of the pipeline; whether the children were applied.
async fn reconcile_once(tidepool: &Tidepool, ctx: &Context) -> Result<bool, Error> {
    let namespace = tidepool.namespace().ok_or(Error::NoNamespace)?;
    let outcome = match dereference(tidepool, &namespace, &ctx.client).await? {
        Err(blocked) => Err(blocked),
        Ok(server) => match validate::validate(tidepool, &namespace) {
            Err(e) => Err(Blocked { reason: "InvalidSpec", message: e.to_string() }),
            Ok(validated) => match plan::plan(&validated.input) {
                Err(e) => Err(Blocked { reason: "BudgetDoesNotFit", message: e.to_string() }),
                Ok(plan) => Ok((validated, plan, server)),
            },
        },
    };
    let previous = tidepool.status.as_ref();
    let applied = outcome.is_ok();
    let next = match outcome {
        Err(blocked) => status::status(previous, tidepool.metadata.generation, Err(blocked), now()),
        Ok((validated, plan, server)) => {
            // Children the spec no longer has can appear only with a new
            // spec: swept once per generation (and once per process).
            let key = ObjectRef::from_obj(tidepool);
            let generation = tidepool.metadata.generation.unwrap_or(0);
            let sweep = ctx.swept.lock().map_or(true, |swept| swept.get(&key) != Some(&generation));
            let applied =
                apply(&ctx.client, &namespace, tidepool, &validated, &plan, sweep, &ctx.endpoints.metrics)
                    .await?;
            if let Ok(mut swept) = ctx.swept.lock() {
                swept.insert(key, generation);
            }
            let over_commit = ctx.shared_server(&(namespace.clone(), tidepool.name_any()), &server, &plan);
            let settings = autoscaler::settings(tidepool, &plan);
            let report = ctx.autoscalers.ensure(tidepool, settings.clone());
            let autoscaling = settings
                .zip(report.as_ref())
                .map(|(settings, report)| scaler_health(&settings, report, plan.tier(Tier::Worker).replicas));
            let worker_cause = report
                .and_then(|r| r.last_change)
                .filter(|change| change.to == plan.tier(Tier::Worker).replicas)
                .map(|change| ScaleCause {
                    reason: change.because.reason.into(),
                    message: change.because.message,
                });
            let web_cause = web_scaled(ctx, tidepool, previous, &plan).await;
            let applied = Applied {
                over_commit,
                scale_causes: [web_cause, worker_cause],
                autoscaling,
                ..applied.as_applied(&plan)
            };
            status::status(previous, tidepool.metadata.generation, Ok(applied), now())
        }
    };
    ctx.endpoints.metrics.record_status(&namespace, &tidepool.name_any(), &next);
    if previous.is_none_or(|p| !status::same_ignoring_times(p, &next)) {
        publish_transitions(&ctx.recorder, tidepool, previous, &next).await;
        ctx.endpoints.metrics.writes("TidepoolStatus").inc();
        let body =
            serde_json::json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "status": next});
        Api::<Tidepool>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(
                &tidepool.name_any(),
                &PatchParams::apply(STATUS_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await?;
    }
    Ok(applied)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// What applying the children found.
struct AppliedChildren {
    web: ObservedTier,
    worker: ObservedTier,
    selectors: [String; 2],
    live_peak: i32,
    migration: Migration,
    /// What holds the change back, if anything: a paced step, pods waiting.
    pacing: Vec<String>,
}

impl AppliedChildren {
    fn as_applied<'a>(&self, plan: &'a Plan) -> Applied<'a> {
        Applied {
            plan,
            web: self.web,
            worker: self.worker,
            selectors: self.selectors.clone(),
            live_peak: self.live_peak,
            over_commit: None,
            migration: self.migration.clone(),
            pacing: self.pacing.clone(),
            scale_causes: [None, None],
            autoscaling: None,
        }
    }
}

/// The `WorkerAutoscaling` condition from the scaler's report.
fn scaler_health(
    settings: &autoscaler::Settings,
    report: &autoscaler::Report,
    replicas: u32,
) -> AutoscalingHealth {
    let bounds = format!("{}..{}", settings.policy.min_replicas, settings.policy.max_replicas);
    match (&report.failure, report.read) {
        (Some((error, since)), _) => AutoscalingHealth {
            status: "False",
            reason: "QueuesUnreadable",
            message: format!(
                "the queues cannot be read since {}: {error}; the worker replicas hold at {replicas}",
                since.0
            ),
        },
        (None, false) => AutoscalingHealth {
            status: "Unknown",
            reason: "NotReadYet",
            message: format!("the queue scaler has not read the queues yet; worker replicas {replicas} ({bounds})"),
        },
        (None, true) => AutoscalingHealth {
            status: "True",
            reason: "QueuesRead",
            message: format!(
                "the queues {} are read every {} s with the credentials of the Secret {}; worker replicas {bounds}",
                settings.queues.join(", "),
                settings.interval.as_secs(),
                settings.secret
            ),
        },
    }
}

/// When the web tier's desired replicas changed since the last status (the
/// HPA, `kubectl scale` or an edit set `spec.web.replicas`): an Event, the
/// decision counted, and its cause naming who set them.
async fn web_scaled(
    ctx: &Context,
    tidepool: &Tidepool,
    previous: Option<&TidepoolStatus>,
    plan: &Plan,
) -> Option<ScaleCause> {
    let from = u32::try_from(previous?.web.as_ref()?.desired_replicas).ok()?;
    let to = plan.tier(Tier::Web).replicas;
    if from == to {
        return None;
    }
    let direction = crate::scaler::Direction::of(from, to);
    let by = replicas_set_by(tidepool, "f:web").unwrap_or_else(|| "an unknown client".into());
    let message = format!("web replicas {from} → {to}, set by {by}");
    let cause = Some(ScaleCause { reason: "ReplicasChanged".into(), message: message.clone() });
    let new = ctx
        .announced
        .lock()
        .map(|mut announced| announced.insert(ObjectRef::from_obj(tidepool), to) != Some(to))
        .unwrap_or(true);
    if !new {
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

async fn apply_one<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    body: serde_json::Value,
    writes: &prometheus::IntCounter,
) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    // At rest nothing is written: a child that already says all the
    // rendered object says (the server adds defaults, never removes) is
    // left alone. A child changed by hand no longer does, and is put back.
    if let Some(live) = api.get_opt(name).await? {
        if serde_json::to_value(&live).is_ok_and(|live| contains(&live, &body)) {
            return Ok(live);
        }
    }
    writes.inc();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(name, &params, &Patch::Apply(body)).await?)
}

/// Whether `live` holds everything `wanted` says: every key of an object
/// (extra keys allowed), lists of the same length item by item, equal
/// scalars.
fn contains(live: &serde_json::Value, wanted: &serde_json::Value) -> bool {
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

/// Applies every child in order (the Deployments paced, see [`pace`]),
/// deletes what this Tidepool owns and no longer renders, admits the pods
/// the budget has room for, and reads what the Deployments and pods report.
async fn apply(
    client: &Client,
    namespace: &str,
    tidepool: &Tidepool,
    validated: &validate::Validated,
    plan: &Plan,
    sweep: bool,
    metrics: &Metrics,
) -> Result<AppliedChildren, Error> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let mut live: [Option<Deployment>; 2] = [None, None];
    for tier in Tier::ALL {
        live[tier as usize] = deployments.get_opt(&labels::tier_name(&validated.owner, tier)).await?;
    }
    let owner = &validated.owner;
    let selector =
        format!("app.kubernetes.io/instance={},app.kubernetes.io/managed-by={MANAGED_BY}", owner.name);
    let pods: Vec<ListedPod> = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .map(listed_pod)
        .collect();
    let paced = pace(validated, plan, &live, &pods);
    let mut observed = live.clone().map(|d| d.as_ref().map(observe).unwrap_or_default());
    let mut kept: BTreeSet<(&'static str, String)> = BTreeSet::new();
    let mut migration = Migration::Done;
    for child in render::children(validated, &paced.plan) {
        let name = child.name().to_owned();
        let body = child.to_json();
        let writes = metrics.writes(child.kind());
        kept.insert((child.kind(), name.clone()));
        match child {
            // The pods of this spec wait for its migration: what runs stays.
            _ if migration != Migration::Done => {}
            Child::Job(_) => {
                let job = apply_one::<Job>(client, namespace, &name, body, &writes).await?;
                migration = migration_of(&job, &name);
            }
            Child::Service(_) => drop(apply_one::<Service>(client, namespace, &name, body, &writes).await?),
            Child::PodDisruptionBudget(_) => {
                drop(apply_one::<PodDisruptionBudget>(client, namespace, &name, body, &writes).await?)
            }
            Child::HorizontalPodAutoscaler(_) => {
                drop(apply_one::<HorizontalPodAutoscaler>(client, namespace, &name, body, &writes).await?)
            }
            Child::Deployment(_) => {
                let tier = if name.ends_with("-worker") { Tier::Worker } else { Tier::Web };
                match paced.moves[tier as usize] {
                    Move::Apply => {
                        let deployment =
                            apply_one::<Deployment>(client, namespace, &name, body, &writes).await?;
                        observed[tier as usize] = observe(&deployment);
                    }
                    Move::Scale(replicas) => {
                        writes.inc();
                        let scale = serde_json::json!({"spec": {"replicas": replicas}});
                        let params =
                            PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
                        deployments.patch_scale(&name, &params, &Patch::Merge(scale)).await?;
                    }
                    Move::Hold => {}
                }
            }
        }
    }
    let uid = tidepool.uid().unwrap_or_default();
    if migration == Migration::Done {
        delete_orphans::<Job>(client, namespace, &selector, &uid, &kept, metrics).await?;
    }
    if sweep {
        delete_orphans::<Deployment>(client, namespace, &selector, &uid, &kept, metrics).await?;
        delete_orphans::<Service>(client, namespace, &selector, &uid, &kept, metrics).await?;
        delete_orphans::<PodDisruptionBudget>(client, namespace, &selector, &uid, &kept, metrics).await?;
        delete_orphans::<HorizontalPodAutoscaler>(client, namespace, &selector, &uid, &kept, metrics).await?;
    }
    let admission = admit_pods(client, namespace, &pods, plan.available, metrics).await?;
    let mut pacing = paced.note;
    if admission.waiting > 0 {
        pacing.push(format!(
            "{} pods wait for the connection budget: the live pods may hold {} of the {} available, the next needs {}",
            admission.waiting,
            admission.live_cost,
            plan.available,
            admission.next_cost.unwrap_or(0)
        ));
    }
    Ok(AppliedChildren {
        web: observed[0],
        worker: observed[1],
        selectors: [labels::selector_string(owner, Tier::Web), labels::selector_string(owner, Tier::Worker)],
        live_peak: i32::try_from(admission.live_cost).unwrap_or(i32::MAX),
        migration,
        pacing,
    })
}

/// What the controller does to a tier's Deployment in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    /// Apply the rendered Deployment (with the step's replicas and surge).
    Apply,
    /// Keep the old template, set only the replicas (scale subresource).
    Scale(i32),
    /// Leave it as it is.
    Hold,
}

/// The Deployments' next step: the plan to render them from, what to do
/// to each, and what the status should say about it.
struct Paced {
    plan: Plan,
    moves: [Move; 2],
    note: Vec<String>,
}

/// Where the Deployments go next ([`plan::next_step`]), from what they are.
/// A tier's template "rolls" when the live one lacks what is rendered now.
fn pace(
    validated: &validate::Validated,
    plan: &Plan,
    live: &[Option<Deployment>; 2],
    pods: &[ListedPod],
) -> Paced {
    let mut live_step = plan::Step::at(plan);
    let mut rolls = [false, false];
    let mut settled = true;
    for tier in Tier::ALL {
        let step = live_step.tier_mut(tier);
        let Some(deployment) = &live[tier as usize] else {
            // A new Deployment: from nothing, with the new template.
            step.replicas = 0;
            rolls[tier as usize] = true;
            continue;
        };
        let spec = deployment.spec.as_ref();
        let template = spec.map(|s| &s.template);
        let rendered = render::deployment::deployment(validated, plan, tier).spec.map(|s| s.template);
        rolls[tier as usize] =
            match (template.map(serde_json::to_value), rendered.map(|t| serde_json::to_value(&t))) {
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
    let next = plan::next_step(live_step, plan, |tier| rolls[tier as usize], settled, other_costs);
    let mut stepped = plan.clone();
    let mut note = Vec::new();
    let moves = Tier::ALL.map(|tier| {
        let (now, to) = (live_step.tier(tier), next.tier(tier));
        let stepped_tier = stepped.tier_mut(tier);
        stepped_tier.replicas = to.replicas;
        stepped_tier.surge = to.surge;
        if rolls[tier as usize] && to.template == plan::Template::Old {
            if now.per_pod != plan.tier(tier).per_pod() {
                note.push(format!(
                    "{} pods change from {} to {} connections each once the other changes have rolled out",
                    tier,
                    now.per_pod,
                    plan.tier(tier).per_pod()
                ));
            }
            if to.replicas != now.replicas {
                Move::Scale(i32::try_from(to.replicas).unwrap_or(i32::MAX))
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
fn rolled_out(deployment: &Deployment) -> bool {
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

/// Removes the admission gate of the pods the budget has room for
/// ([`admission`]). `pods` is a fresh list: since only this controller
/// admits, the live pods can only have become fewer since. A pod changed
/// meanwhile (a conflict) or gone is left to the next pass, which its
/// change triggers.
async fn admit_pods(
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
            Err(e) => return Err(e.into()),
        }
    }
    Ok(pass)
}

/// A pod of the Tidepool as the controller lists it.
struct ListedPod {
    live: LivePod,
    /// Its tier, by its component label (none for a migration pod).
    tier: Option<Tier>,
    resource_version: Option<String>,
    /// Scheduling gates other than the operator's, kept when it admits.
    other_gates: Vec<String>,
}

fn listed_pod(pod: &Pod) -> ListedPod {
    let gates: Vec<String> =
        pod.spec.iter().flat_map(|s| s.scheduling_gates.iter().flatten()).map(|g| g.name.clone()).collect();
    let tier = match pod.labels().get("app.kubernetes.io/component").map(String::as_str) {
        Some("web") => Some(Tier::Web),
        Some("worker") => Some(Tier::Worker),
        _ => None,
    };
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
        },
        tier,
        resource_version: pod.metadata.resource_version.clone(),
        other_gates: gates.into_iter().filter(|gate| gate != admission::GATE).collect(),
    }
}

/// Where the migration Job `name` stands.
fn migration_of(job: &Job, name: &str) -> Migration {
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    let holds =
        |type_: &str| conditions.and_then(|c| c.iter().find(|c| c.type_ == type_ && c.status == "True"));
    if holds("Complete").is_some() {
        Migration::Done
    } else if let Some(failed) = holds("Failed") {
        Migration::Failed { name: name.to_owned(), message: failed.message.clone().unwrap_or_default() }
    } else {
        Migration::Running { name: name.to_owned() }
    }
}

fn observe(deployment: &Deployment) -> ObservedTier {
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
async fn delete_orphans<K>(
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
    for object in api.list_metadata(&ListParams::default().labels(selector)).await? {
        let owned = object.owner_references().iter().any(|r| r.uid == uid && r.controller == Some(true));
        let name = object.name_any();
        if owned && !kept.contains(&(<K as k8s_openapi::Resource>::KIND, name.clone())) {
            tracing::info!(kind = <K as k8s_openapi::Resource>::KIND, %name, "deleting a child the spec no longer has");
            metrics.writes(<K as k8s_openapi::Resource>::KIND).inc();
            api.delete(&name, &DeleteParams::background()).await?;
        }
    }
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

/// What arrives on `receiver`, as a stream.
fn stream_of<T: Send + 'static>(receiver: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
}

#[cfg(test)]
mod tests {
    use super::{contains, retry_delay, RETRY_MAX};
    use std::time::Duration;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let delays: Vec<u64> = [1, 2, 3, 4].map(|n| retry_delay(n).as_secs()).to_vec();
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!(retry_delay(9), Duration::from_secs(256));
        assert_eq!(retry_delay(10), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }
    use serde_json::json;

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
