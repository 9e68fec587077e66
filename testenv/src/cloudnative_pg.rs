//! CloudNativePG on the test cluster, as a user runs it: its operator from
//! its release manifest (`scripts/kube/cloudnative-pg`, with the image
//! built from its Go module), and [`Cluster`]s of one PostgreSQL 17
//! instance on the real node, each on a local PersistentVolume made for it
//! (the test cluster has no provisioner).
//!
//! The operator is installed once per cluster ([`install`]: idempotent,
//! every test that needs it calls it) and serves every namespace, as it does
//! in production. A [`Cluster`] lives in a test's namespace and goes with
//! it; its volume is deleted when the [`Cluster`] is dropped.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::node::Node;
use crate::{env_path, repo_root, wait_for, Kube};

/// The PostgreSQL 17 image the instances run (`scripts/images.sh
/// postgresql`): CloudNativePG reads the major version from its tag.
pub const POSTGRESQL_IMAGE: &str = "localhost/tidepool-postgresql:17-trixie";
/// The StorageClass of the volumes made here: no provisioner, bound when
/// the instance's pod is scheduled.
pub const STORAGE_CLASS: &str = "tidepool-local";
/// The operator's namespace (the release manifest's).
pub const OPERATOR_NAMESPACE: &str = "cnpg-system";

/// Installs CloudNativePG's operator (server-side apply of the release
/// manifest through the kustomization) and waits until it serves its
/// webhooks: a dry run of a `Cluster` is admitted.
pub fn install(kube: &Kube) -> Result<()> {
    let manifests = env_path("TIDEPOOL_CNPG_MANIFESTS")?;
    let dir = crate::scratch_dir("cloudnative-pg")?;
    std::fs::copy(manifests.join("cnpg.yaml"), dir.join("cnpg.yaml")).context("copying cnpg.yaml")?;
    std::fs::copy(
        repo_root()?.join("scripts/kube/cloudnative-pg/kustomization.yaml"),
        dir.join("kustomization.yaml"),
    )
    .context("copying the kustomization")?;
    let path = dir.to_string_lossy().into_owned();
    kube.kubectl(&["apply", "--server-side", "--force-conflicts", "-k", &path], None)?;
    let _ = std::fs::remove_dir_all(&dir);
    let class = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS}, "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"});
    kube.kubectl(&["apply", "-f", "-"], Some(&class.to_string()))?;
    kube.kubectl(
        &[
            "rollout",
            "status",
            "-n",
            OPERATOR_NAMESPACE,
            "deployment/cnpg-controller-manager",
            "--timeout=180s",
        ],
        None,
    )
    .context("CloudNativePG's operator did not become available")?;
    let probe = cluster_object("webhook-probe", 100, None);
    wait_for("CloudNativePG's webhooks", Duration::from_secs(120), || {
        let output = kube.kubectl_output(
            &["create", "-n", "default", "--dry-run=server", "-o", "name", "-f", "-"],
            Some(&probe.to_string()),
        )?;
        Ok(output.status.success().then_some(()))
    })
}

/// A `Cluster` of one instance in a test's namespace, on a volume of its
/// own on the real node.
pub struct Cluster<'a> {
    kube: &'a Kube,
    pub namespace: String,
    pub name: String,
    volume: String,
    path: PathBuf,
}

impl<'a> Cluster<'a> {
    /// Creates the volume and the `Cluster` `name` in `namespace` with
    /// `max_connections`, and waits until it is healthy.
    ///
    /// CloudNativePG creates the first instance's claim, then writes the
    /// Cluster's status, then creates its initdb Job; a reconcile that
    /// fails in between (seen once in CI, cause unknown) leaves the claim
    /// "initializing" with no Job, which its operator then waits on for
    /// ever ("Selected PVC is not ready yet"). Found in that state, the
    /// Cluster, its claim and its volume are made once more, with what the
    /// operator logged printed for the next reader.
    pub fn create(kube: &'a Kube, namespace: &str, name: &str, max_connections: u32) -> Result<Cluster<'a>> {
        let volume = format!("{namespace}-{name}");
        let path = env_path("TIDEPOOL_TEST_STATE_DIR")?.join("volumes").join(&volume);
        let cluster = Cluster { kube, namespace: namespace.to_owned(), name: name.to_owned(), volume, path };
        for attempt in 1..=2 {
            cluster.make_volume()?;
            let object = cluster_object(name, max_connections, Some(namespace));
            kube.kubectl(&["apply", "-f", "-"], Some(&object.to_string()))?;
            match cluster.wait_healthy_or_stuck()? {
                Some(_) => return Ok(cluster),
                None if attempt == 1 => {
                    eprintln!(
                        "CloudNativePG left {namespace}/{name}'s claim initializing with no initdb Job; \
                         making the Cluster again:\n{}",
                        cluster.describe()
                    );
                    cluster.delete()?;
                }
                None => {}
            }
        }
        anyhow::bail!("CloudNativePG left the claim initializing twice:\n{}", cluster.describe())
    }

    /// A local volume on the real node for the first instance's claim,
    /// owned by the instance's postgres user (26:26), empty.
    fn make_volume(&self) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.path);
        std::fs::create_dir_all(&self.path)?;
        let status = std::process::Command::new("chown").arg("26:26").arg(&self.path).status()?;
        ensure!(status.success(), "chown 26:26 {}", self.path.display());
        let pv = json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": self.volume, "labels": {"tidepool.dev/test-volume": "cloudnative-pg"}},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                "claimRef": {"namespace": self.namespace, "name": format!("{}-1", self.name)},
                "local": {"path": self.path.to_string_lossy()},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [Node::NAME]}]}]}}}});
        self.kube.kubectl(&["apply", "-f", "-"], Some(&pv.to_string()))?;
        Ok(())
    }

    /// The Cluster healthy (`Some`), or its claim initializing for a minute
    /// with no initdb Job and no pod (`None`).
    fn wait_healthy_or_stuck(&self) -> Result<Option<Value>> {
        let claim = format!("pvc/{}-1", self.name);
        let selector = format!("cnpg.io/cluster={}", self.name);
        let mut stuck_since: Option<std::time::Instant> = None;
        wait_for("the CloudNativePG cluster to be healthy", Duration::from_secs(300), || {
            let cluster = self.get()?;
            let status = &cluster["status"];
            if healthy(status) {
                return Ok(Some(Some(cluster)));
            }
            let initializing = self
                .kube
                .get_json(&["-n", &self.namespace, &claim])
                .ok()
                .is_some_and(|c| c["metadata"]["annotations"]["cnpg.io/pvcStatus"] == "initializing");
            let running = self.kube.get_json(&["-n", &self.namespace, "jobs,pods", "-l", &selector])?;
            let none = running["items"].as_array().map_or(true, Vec::is_empty);
            if !(initializing && none) {
                stuck_since = None;
                return Ok(None);
            }
            let since = *stuck_since.get_or_insert_with(std::time::Instant::now);
            Ok((since.elapsed() >= Duration::from_secs(60)).then_some(None))
        })
        .with_context(|| self.describe())
    }

    /// Deletes the Cluster, its claim and its volume, and waits until they
    /// are gone.
    fn delete(&self) -> Result<()> {
        let claim = format!("pvc/{}-1", self.name);
        let (ns, name) = (self.namespace.as_str(), self.name.as_str());
        self.kube
            .kubectl(&["delete", "-n", ns, "cluster.postgresql.cnpg.io", name, "--timeout=60s"], None)?;
        self.kube.kubectl(&["delete", "-n", ns, &claim, "--ignore-not-found", "--timeout=60s"], None)?;
        self.kube.kubectl(&["delete", "pv", &self.volume, "--ignore-not-found", "--timeout=60s"], None)?;
        Ok(())
    }

    /// Waits until CloudNativePG reports the cluster healthy with its
    /// instance ready.
    pub fn wait_healthy(&self) -> Result<Value> {
        wait_for("the CloudNativePG cluster to be healthy", Duration::from_secs(300), || {
            let cluster = self.get()?;
            let status = &cluster["status"];
            Ok(healthy(status).then_some(cluster))
        })
        .with_context(|| self.describe())
    }

    /// The `Cluster` as the API server has it.
    pub fn get(&self) -> Result<Value> {
        self.kube.get_json(&["-n", &self.namespace, "cluster.postgresql.cnpg.io", &self.name])
    }

    /// `sql` run by `psql` in the instance's pod as the superuser over its
    /// local socket, in database `db`; its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        self.instance().psql(db, sql)
    }

    /// The first instance, apart from the Cluster (which goes when
    /// dropped): for a thread that reads it, such as a sampler's.
    pub fn instance(&self) -> Instance<'a> {
        Instance { kube: self.kube, namespace: self.namespace.clone(), pod: format!("{}-1", self.name) }
    }

    /// The pods, the Cluster's status and the operator's last lines, for a
    /// failure's message.
    pub fn describe(&self) -> String {
        let pods = self
            .kube
            .kubectl(&["get", "pods,jobs,pvc,events", "-n", &self.namespace], None)
            .unwrap_or_default();
        let cluster = self.get().map(|c| c["status"].to_string()).unwrap_or_default();
        let selector = format!("cnpg.io/cluster={}", self.name);
        let instances = self
            .kube
            .kubectl(
                &[
                    "logs",
                    "-n",
                    &self.namespace,
                    "-l",
                    &selector,
                    "--all-containers",
                    "--prefix",
                    "--tail=15",
                ],
                None,
            )
            .unwrap_or_default();
        // Its errors, then its last lines.
        let log = self
            .kube
            .kubectl(
                &["logs", "-n", OPERATOR_NAMESPACE, "deployment/cnpg-controller-manager", "--tail=2000"],
                None,
            )
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let errors: Vec<&str> = lines.iter().copied().filter(|l| l.contains(r#""level":"error""#)).collect();
        let operator = [&errors[errors.len().saturating_sub(10)..], &lines[lines.len().saturating_sub(5)..]]
            .concat()
            .join("\n");
        format!("{pods}\nstatus: {cluster}\ninstances:\n{instances}\noperator:\n{operator}")
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        let _ = self.kube.kubectl_output(
            &[
                "delete",
                "-n",
                &self.namespace,
                "cluster.postgresql.cnpg.io",
                &self.name,
                "--wait=true",
                "--timeout=60s",
            ],
            None,
        );
        let _ = self.kube.kubectl_output(&["delete", "pv", &self.volume, "--wait=false"], None);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A Cluster's instance pod, to run `psql` in and read the log of.
#[derive(Clone)]
pub struct Instance<'a> {
    kube: &'a Kube,
    namespace: String,
    pod: String,
}

impl Instance<'_> {
    /// `sql` run by `psql` in the pod as the superuser over its local
    /// socket, in database `db`; its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let args = ["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql];
        self.kube
            .kubectl(
                &[&["exec", "-n", &self.namespace, &self.pod, "-c", "postgres", "--", "psql"][..], &args]
                    .concat(),
                None,
            )
            .map(|out| out.trim().to_owned())
    }

    /// What PostgreSQL has logged since the pod started (CloudNativePG's
    /// JSON lines, one per record).
    pub fn log(&self) -> Result<String> {
        self.kube.kubectl(&["logs", "-n", &self.namespace, &self.pod, "-c", "postgres"], None)
    }
}

/// Whether a `Cluster`'s status says it is healthy with its one instance
/// ready.
fn healthy(status: &Value) -> bool {
    status["phase"] == "Cluster in healthy state" && status["readyInstances"] == 1
}

/// A `Cluster` of one instance of [`POSTGRESQL_IMAGE`] on the real node,
/// its volume of [`STORAGE_CLASS`].
fn cluster_object(name: &str, max_connections: u32, namespace: Option<&str>) -> Value {
    let mut metadata = json!({"name": name});
    if let Some(namespace) = namespace {
        metadata["namespace"] = json!(namespace);
    }
    json!({"apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster", "metadata": metadata,
    "spec": {
        "instances": 1,
        "imageName": POSTGRESQL_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        // A smart shutdown waits for every client to leave, and the pods'
        // PgBouncers keep their server connections open: after 5 s (not
        // the default 180), a fast one.
        "smartShutdownTimeout": 5,
        "postgresql": {"parameters": {"max_connections": max_connections.to_string()}},
        "storage": {"size": "1Gi", "storageClass": STORAGE_CLASS},
        "affinity": {"nodeSelector": {"type": "real"},
            "tolerations": [{"key": Node::TAINT, "operator": "Exists", "effect": "NoSchedule"}]},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    }})
}
