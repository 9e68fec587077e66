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
//!
//! Where to read on: this module wires the watches and runs the
//! reconciles; `steps` is one reconcile as named steps, each failing with
//! its own [`Error`] variant; `pace` (pure) decides what each Deployment
//! does in a pass; `apply` writes children, `pods` admits pods,
//! `scaling` reports the replica changes, and `memory` is what the
//! controller keeps about each Tidepool between reconciles.

mod apply;
mod error;
mod memory;
mod pace;
mod pods;
mod scaling;
mod steps;

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
use k8s_openapi::NamespaceResourceScope;
use kube::api::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

pub use error::Error;
use memory::Memory;

use crate::autoscaler::{self, Autoscalers};
use crate::crd::Tidepool;
use crate::http::Endpoints;
use crate::index::{Key, ServerIndex};
use crate::metrics::Outcome;
use crate::plan::Plan;
use crate::render::labels;

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

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub store: Store<Tidepool>,
    pub endpoints: Arc<Endpoints>,
    /// Planned peaks by database server, and where to ask for the
    /// reconcile of Tidepools whose server total changed.
    servers: Arc<Servers>,
    /// What is remembered of each Tidepool between reconciles.
    memory: Memory,
    /// The queue scalers of the Tidepools whose worker tier autoscales.
    autoscalers: Arc<Autoscalers>,
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
    fn new(
        client: Client,
        endpoints: Arc<Endpoints>,
        store: Store<Tidepool>,
        retrigger: mpsc::Sender<ObjectRef<Tidepool>>,
    ) -> Context {
        let servers = Arc::new(Servers { index: Mutex::new(ServerIndex::default()), retrigger });
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
        Context { client, recorder, store, endpoints, servers, memory: Memory::default(), autoscalers }
    }

    /// Everything kept about a deleted Tidepool goes with it, here only:
    /// its server total, its gauges, its memory, its queue scaler.
    fn forget(&self, gone: &Tidepool) {
        let (namespace, name) = (gone.namespace().unwrap_or_default(), gone.name_any());
        self.servers.remove(&(namespace.clone(), name.clone()));
        self.endpoints.metrics.forget(&namespace, &name);
        self.memory.forget(&ObjectRef::from_obj(gone));
        self.autoscalers.stop(&ObjectRef::from_obj(gone));
    }

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
    // The Tidepools' own reflector, so /readyz can say when the first list
    // has arrived (the store's own readiness wakes a single waiter, and the
    // controller is that waiter).
    let (store, writer) = reflector::store::<Tidepool>();
    let (retrigger, retriggered) = mpsc::channel(RETRIGGER_QUEUE);
    let context = Arc::new(Context::new(client.clone(), endpoints, store.clone(), retrigger));
    let watched = context.clone();
    let tidepools = watcher(api::<Tidepool>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::InitDone) => {
                watched.endpoints.ready.store(true, std::sync::atomic::Ordering::Relaxed)
            }
            Ok(watcher::Event::Delete(gone)) => watched.forget(gone),
            _ => {}
        })
        .applied_objects();
    let controller = Controller::for_stream(tidepools, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES));
    let running = with_triggers(controller, &client, ns, &store)
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

/// What else starts a Tidepool's reconcile: its children (`owns`), its
/// pods, and the Secrets Tidepools refer to. Metadata-only watches: a
/// reconcile reads what it needs afresh, and no Secret's values are held.
fn with_triggers(
    controller: Controller<Tidepool>,
    client: &Client,
    ns: Option<&str>,
    store: &Store<Tidepool>,
) -> Controller<Tidepool> {
    let children = watcher::Config::default().labels(&labels::managed_selector());
    let secrets = watcher(api::<PartialObjectMeta<Secret>>(client, ns), watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let store = store.clone();
    controller
        .owns_stream(metadata::<Deployment>(client, ns, &children))
        .owns_stream(metadata::<Service>(client, ns, &children))
        .owns_stream(metadata::<PodDisruptionBudget>(client, ns, &children))
        .owns_stream(metadata::<HorizontalPodAutoscaler>(client, ns, &children))
        .owns_stream(metadata::<Job>(client, ns, &children))
        .watches_stream(metadata::<Pod>(client, ns, &children), |pod| owner_of(&pod))
        .watches_stream(secrets, move |secret| tidepools_using(&store, &secret))
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
    let instance = pod.labels().get(labels::INSTANCE)?;
    Some(ObjectRef::new(instance).within(pod.namespace().as_deref()?))
}

/// The Tidepools whose database connections read this Secret (its
/// coordinates, its CA, its client certificate, the scaler's credentials):
/// a change (a rotated password) reconciles them.
fn tidepools_using(store: &Store<Tidepool>, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<Tidepool>> {
    let (name, namespace) = (secret.name_any(), secret.namespace());
    store
        .state()
        .iter()
        .filter(|tp| tp.namespace() == namespace && tp.spec.secret_names().any(|n| n == name))
        .map(|tp| ObjectRef::from_obj(tp.as_ref()))
        .collect()
}

fn error_policy(tidepool: Arc<Tidepool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.endpoints.metrics.error(error.kind());
    let failures = ctx.memory.failed(&ObjectRef::from_obj(tidepool.as_ref()));
    let delay = retry_delay(failures);
    tracing::warn!(tidepool = %tidepool.name_any(), error = %error, failures, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// The pause after the `failures`-th failure in a row.
fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1))).min(RETRY_MAX)
}

async fn reconcile(tidepool: Arc<Tidepool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = if tidepool.metadata.deletion_timestamp.is_some() {
        // Its children go with it (owner references): nothing to write.
        Ok(Outcome::Deleting)
    } else {
        match steps::reconcile_once(&tidepool, &ctx).await {
            Err(e) if e.namespace_terminating() => Ok(Outcome::Deleting),
            result => result,
        }
    };
    ctx.endpoints.metrics.record(result.as_ref().map_or(Outcome::Error, |outcome| *outcome), started);
    if result.is_ok() {
        ctx.memory.succeeded(&ObjectRef::from_obj(tidepool.as_ref()));
    }
    result.map(|_| Action::await_change())
}

/// What arrives on `receiver`, as a stream.
fn stream_of<T: Send + 'static>(receiver: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
}

#[cfg(test)]
mod tests {
    use super::{retry_delay, RETRY_MAX};
    use std::time::Duration;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let delays: Vec<u64> = [1, 2, 3, 4].map(|n| retry_delay(n).as_secs()).to_vec();
        assert_eq!(delays, [1, 2, 4, 8]);
        assert_eq!(retry_delay(9), Duration::from_secs(256));
        assert_eq!(retry_delay(10), RETRY_MAX);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }
}
