//! Paced changes against the real API server of `make test`: while the
//! operator rolls, scales and replaces pods whose predecessors take long to
//! terminate, a watch on the live pods (every change, not samples) never
//! sees the connections they may hold pass the budget.
//!
//! On the kwok node a deleted pod would vanish at once; here every pod of
//! the Tidepool gets a finalizer of the test's own as it appears, and a pod
//! being deleted keeps it for [`TERMINATION`], as a pod draining through
//! its grace period holds its connections on a real node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use common::{get, kube_with_crd, Operator, SECRET};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use tidepool_operator::admission::GATE;
use tidepool_operator::render::labels::{self, SHARE_ANNOTATION};
use tidepool_testenv::{wait_for, Kube};

const HOLD: &str = "test.tidepool.dev/hold";
/// How long a deleted pod stays, terminating.
const TERMINATION: Duration = Duration::from_millis(1500);

/// What the watch saw.
#[derive(Debug, Default)]
struct Seen {
    /// Each pod's cost, whether admitted, terminating.
    pods: BTreeMap<String, (u32, bool, bool)>,
    /// The most the admitted pods could hold at once.
    most: u32,
    /// A pod waited behind its gate while a terminating pod held its share.
    waited_for_a_terminating_pod: bool,
    events: u64,
}

impl Seen {
    fn update(&mut self, pod: &Pod) {
        let cost = Some(labels::pod_cost(pod.annotations())).filter(|_| is_app(pod));
        let gated = pod.spec.iter().flat_map(|s| s.scheduling_gates.iter().flatten()).any(|g| g.name == GATE);
        let finished =
            matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        if let (Some(cost), false) = (cost, finished) {
            self.pods.insert(pod.name_any(), (cost, !gated, pod.metadata.deletion_timestamp.is_some()));
        } else {
            self.pods.remove(&pod.name_any());
        }
    }

    fn account(&mut self) {
        self.events += 1;
        let live: u32 = self.pods.values().filter(|(_, admitted, _)| *admitted).map(|(c, _, _)| c).sum();
        self.most = self.most.max(live);
        let waiting = self.pods.values().any(|(_, admitted, terminating)| !admitted && !terminating);
        let draining = self.pods.values().any(|(_, admitted, terminating)| *admitted && *terminating);
        self.waited_for_a_terminating_pod |= waiting && draining;
    }
}

/// Watches the namespace's pods into a [`Seen`], and holds each deleted pod
/// for [`TERMINATION`] with a finalizer; on drop, lets every pod go.
struct Watch {
    seen: Arc<Mutex<Seen>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    fn start(namespace: &str) -> Result<Watch> {
        let runtime = tokio::runtime::Runtime::new()?;
        let client = runtime.block_on(kube::Client::try_default()).context("a client from KUBECONFIG")?;
        let pods = Api::<Pod>::namespaced(client, namespace);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (recorded, synced) = std::sync::mpsc::channel();
        let into = seen.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let mut events = watcher(pods.clone(), watcher::Config::default()).boxed();
                let mut releasing = BTreeSet::new();
                loop {
                    let event = tokio::select! {
                        _ = &mut stopped => break,
                        event = events.next() => event,
                    };
                    let Some(Ok(event)) = event else { continue };
                    let mut changed = Vec::new();
                    {
                        let Ok(mut seen) = into.lock() else { break };
                        match &event {
                            watcher::Event::Init => seen.pods.clear(),
                            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                                seen.update(pod);
                                changed.push(pod.clone());
                            }
                            watcher::Event::Delete(pod) => {
                                seen.pods.remove(&pod.name_any());
                            }
                            watcher::Event::InitDone => {
                                let _ = recorded.send(());
                            }
                        }
                        seen.account();
                    }
                    for pod in changed {
                        hold_or_release(&pods, &pod, &mut releasing).await;
                    }
                }
                // Let every pod go, so that the namespace can be deleted.
                if let Ok(list) = pods.list(&Default::default()).await {
                    for pod in list {
                        let _ = pods.patch(&pod.name_any(), &PatchParams::default(), &release(&pod)).await;
                    }
                }
            });
        });
        synced.recv_timeout(Duration::from_secs(30)).context("the pod watch to start")?;
        Ok(Watch { seen, stop: Some(stop), thread: Some(thread) })
    }

    fn seen<T>(&self, read: impl Fn(&Seen) -> T) -> T {
        read(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The pod's finalizers without the test's (other controllers' stay).
fn release(pod: &Pod) -> Patch<Value> {
    let others: Vec<&String> = pod.finalizers().iter().filter(|f| *f != HOLD).collect();
    Patch::Merge(json!({"metadata": {"finalizers": others, "resourceVersion": pod.resource_version()}}))
}

/// Whether it is a tier's pod (a migration pod has no share).
fn is_app(pod: &Pod) -> bool {
    pod.annotations().contains_key(SHARE_ANNOTATION)
}

/// Puts the test's finalizer on a new app pod (one with a share); lets a
/// deleted one go after [`TERMINATION`].
async fn hold_or_release(pods: &Api<Pod>, pod: &Pod, releasing: &mut BTreeSet<String>) {
    let held = pod.finalizers().iter().any(|f| f == HOLD);
    let app = is_app(pod);
    let name = pod.name_any();
    if pod.metadata.deletion_timestamp.is_some() {
        if held && releasing.insert(name.clone()) {
            let pods = pods.clone();
            tokio::spawn(async move {
                tokio::time::sleep(TERMINATION).await;
                // Read afresh: the finalizers may have changed meanwhile.
                if let Ok(pod) = pods.get(&name).await {
                    let _ = pods.patch(&name, &PatchParams::default(), &release(&pod)).await;
                }
            });
        }
    } else if app && !held {
        let mut finalizers = pod.finalizers().to_vec();
        finalizers.push(HOLD.to_owned());
        let hold = json!({"metadata": {"finalizers": finalizers, "resourceVersion": pod.resource_version()}});
        let _ = pods.patch(&name, &PatchParams::default(), &Patch::Merge(hold)).await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn tidepool(web_replicas: u32, image: &str) -> String {
    format!(
        "apiVersion: tidepool.dev/v1alpha1\nkind: Tidepool\nmetadata: {{name: shop}}\nspec:\n  image: {image}\n  database: {{secretRef: {{name: shop-app}}, maxConnections: 60}}\n  web: {{replicas: {web_replicas}, databasePool: 20}}\n  worker: {{replicas: 1, concurrency: 6}}\n"
    )
}

/// Waits until the Tidepool's latest spec is rolled out: Ready, every pod
/// of the share `web_share` and `worker_share`, none terminating or waiting.
fn wait_settled(kube: &Kube, ns: &str, web_pods: usize, web_share: &str, worker_share: &str) -> Result<()> {
    wait_for("the change to roll out", Duration::from_secs(120), || {
        let tidepool = get(kube, ns, "tidepool/shop")?.context("the Tidepool")?;
        let ready = tidepool["status"]["observedGeneration"] == tidepool["metadata"]["generation"]
            && common::condition(&tidepool, "Ready").is_some_and(|(status, _, _)| status == "True");
        let pods = kube.get_json(&["pods", "-n", ns, "-l", "app.kubernetes.io/name=tidepool"])?;
        let pods: Vec<&Value> = pods["items"].as_array().map(|p| p.iter().collect()).unwrap_or_default();
        let share = |pod: &Value| pod["metadata"]["annotations"]["tidepool.dev/max-db-connections"].clone();
        let component = |pod: &Value| pod["metadata"]["labels"]["app.kubernetes.io/component"].clone();
        let tier = |name: &str, share_wanted: &str| -> Vec<&Value> {
            pods.iter().copied().filter(|p| component(p) == name && share(p) == share_wanted).collect()
        };
        let settled = pods.iter().all(|p| p["metadata"]["deletionTimestamp"].is_null())
            && pods.iter().all(|p| p["spec"]["schedulingGates"].is_null())
            && tier("web", web_share).len() == web_pods
            && tier("worker", worker_share).len() == 1
            && pods.iter().filter(|p| component(p) != "migrate").count() == web_pods + 1;
        Ok((ready && settled).then_some(()))
    })
    .with_context(|| describe(kube, ns))
}

/// The Tidepool's conditions and its pods, for a failure's message.
fn describe(kube: &Kube, ns: &str) -> String {
    let tidepool = get(kube, ns, "tidepool/shop").ok().flatten().unwrap_or_default();
    let pods = kube
        .kubectl(
            &["get", "pods", "-n", ns, "-o", "custom-columns=NAME:.metadata.name,SHARE:.metadata.annotations.tidepool\\.dev/max-db-connections,GATES:.spec.schedulingGates,DELETED:.metadata.deletionTimestamp,PHASE:.status.phase"],
            None,
        )
        .unwrap_or_default();
    format!("conditions: {}\npods:\n{pods}", tidepool["status"]["conditions"])
}

/// A rollout of both tiers, a change that lowers the shares (more web
/// pods) and one that raises them again (fewer), and every pod deleted by
/// hand at once: the live pods never pass the 50 connections available,
/// and the gate held a new pod back while an old one drained.
#[test]
fn changes_keep_the_live_pods_within_the_budget() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("pacing")?;
    let watch = Watch::start(&ns.name)?;
    let _operator = Operator::start(&ns.name)?;
    let apply = |web_replicas: u32, image: &str| {
        let manifest = format!("{SECRET}---\n{}", tidepool(web_replicas, image));
        kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&manifest)).map(drop)
    };
    // 60 − 10 reserved = 50 available: 3 web pods (2 + surge 1) × 10 and
    // 2 worker pods × 10 plan the whole of it.
    apply(2, "localhost/tidepool:one")?;
    wait_settled(kube, &ns.name, 2, "10", "10")?;

    // A new image rolls both tiers: each new pod waits for the old one it
    // replaces to finish terminating.
    apply(2, "localhost/tidepool:two")?;
    wait_settled(kube, &ns.name, 2, "10", "10")?;
    assert!(
        watch.seen(|s| s.waited_for_a_terminating_pod),
        "no pod ever waited for a terminating one: the test did not test the gate"
    );

    // 4 web pods: shares drop to 7 (5 × 7 + 2 × 7 = 49); the shares shrink
    // at 2 pods first, then the pods are added.
    apply(4, "localhost/tidepool:two")?;
    wait_settled(kube, &ns.name, 4, "7", "7")?;

    // Back to 2: the pods go first, then the shares grow back.
    apply(2, "localhost/tidepool:two")?;
    wait_settled(kube, &ns.name, 2, "10", "10")?;

    // Every pod deleted by hand: 30 terminating, 30 more wanted.
    kube.kubectl(
        &["delete", "pods", "-n", &ns.name, "-l", "app.kubernetes.io/name=tidepool", "--wait=false"],
        None,
    )?;
    wait_settled(kube, &ns.name, 2, "10", "10")?;

    let (most, events) = watch.seen(|s| (s.most, s.events));
    assert!(most <= 50, "the live pods could hold {most} connections, over the 50 available");
    assert!(most >= 40, "the rollouts never used the surge ({most}): the test did not push the budget");
    assert!(events > 50, "the watch saw only {events} changes");
    drop(watch);
    Ok(())
}
