//! What installs an operator for the whole cluster. Such an operator would
//! reconcile every other test's Tidepools too, so these tests are ignored by
//! a plain `cargo test` and run alone, after the others, by scripts/test.sh
//! (`cargo test --workspace --test cluster_wide -- --ignored`).

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tidepool_testenv::node::{AppDatabase, Node, Postgres};
use tidepool_testenv::repo_root;

/// `kubectl apply -f manifests/install.yaml` installs what `helm install`
/// with the defaults does (the file is the chart rendered with them; a test
/// in chart.rs keeps it so): every object is accepted, the two operator
/// replicas run on the real node as the chart's service account and one
/// leads, and, through its ClusterRole, it reconciles a Tidepool in a
/// namespace of its own to Ready. The only change is where the pods may
/// run (the test cluster's real node is tainted).
#[test]
#[ignore = "cluster-wide: scripts/test.sh runs it alone, after the other tests"]
fn install_yaml_installs_an_operator_for_the_whole_cluster() -> Result<()> {
    let kube = common::kube_with_crd()?;
    let node = Node::from_env()?;
    let pg = Postgres::from_env()?;
    let install = repo_root()?.join("manifests/install.yaml");
    let install = install.to_str().context("a UTF-8 path")?;
    kube.kubectl(&["apply", "-f", install], None)?;
    let placement = json!({"spec": {"template": {"spec": {
        "nodeSelector": {"type": "real"},
        "tolerations": [{"key": Node::TAINT, "operator": "Exists", "effect": "NoSchedule"}]
    }}}});
    kube.kubectl(
        &[
            "patch",
            "deployment/tidepool",
            "-n",
            "tidepool-system",
            "--type=merge",
            "-p",
            &placement.to_string(),
        ],
        None,
    )?;
    let rollout = kube.kubectl_output(
        &["rollout", "status", "deployment/tidepool", "-n", "tidepool-system", "--timeout=180s"],
        None,
    )?;
    ensure!(
        rollout.status.success(),
        "the operator's rollout: {}{}",
        String::from_utf8_lossy(&rollout.stderr),
        kube.kubectl(&["get", "pods,events", "-n", "tidepool-system"], None).unwrap_or_default()
    );
    let selector = "app.kubernetes.io/instance=tidepool,app.kubernetes.io/component=operator";
    common::operator_leads_on_the_real_node(kube, "tidepool-system", selector, "tidepool")?;

    let ns = kube.namespace("install-yaml")?;
    let db = AppDatabase::create(&pg, &ns.name.replace('-', "_"))?;
    kube.kubectl(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&db.secret("shop-app", &node.host_ip, pg.port)),
    )?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(common::REAL_NODE_TIDEPOOL))?;
    common::wait_ready(kube, &ns.name, Duration::from_secs(240))
        .with_context(|| kube.kubectl(&["get", "pods,events", "-n", &ns.name], None).unwrap_or_default())?;
    let pods =
        kube.get_json(&["-n", &ns.name, "pods", "-l", "app.kubernetes.io/managed-by=tidepool-operator"])?;
    let running = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["status"]["phase"] == "Running" && p["spec"]["nodeName"] == Node::NAME)
        .count();
    assert_eq!(running, 2, "the web and worker pods run on the real node");

    // Removed as it came, but for the CRD (and with it every Tidepool),
    // as `helm uninstall` would leave it.
    drop(ns);
    kube.kubectl(&["delete", "namespace", "tidepool-system", "--wait=true", "--timeout=120s"], None)?;
    kube.kubectl(
        &["delete", "clusterrole,clusterrolebinding", "-l", "app.kubernetes.io/instance=tidepool"],
        None,
    )?;
    Ok(())
}
