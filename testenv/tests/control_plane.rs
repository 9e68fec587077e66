//! Smoke test of the control plane the project builds and starts: it must
//! behave like a real cluster for what the operator relies on.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use tidepool_testenv::{env_path, pinned_version, wait_for, Kube};

const KWOK_NODE: &str = "kwok-node-0";

fn deployment(name: &str, replicas: u32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - {{name: app, image: tidepool.invalid/app:1}}
"#
    )
}

/// A Deployment gets a ReplicaSet and Pods from the controller manager; the
/// scheduler binds them to the kwok node; kwok makes them Ready; deleting
/// the Deployment garbage-collects the ReplicaSet and the Pods.
#[test]
fn deployments_run_on_the_kwok_node_and_are_garbage_collected() -> Result<()> {
    let kube = Kube::from_env()?;
    let ns = kube.namespace("smoke")?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&deployment("web", 2)))?;

    let pods = wait_for("2 Ready pods of the Deployment", Duration::from_secs(60), || {
        let pods = kube.get_json(&["pods", "-n", &ns.name, "-l", "app=web"])?;
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let ready = items.iter().filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        });
        Ok((items.len() == 2 && ready.count() == 2).then_some(items))
    })?;
    for pod in &pods {
        assert_eq!(pod["spec"]["nodeName"], KWOK_NODE, "scheduled on the kwok node");
        assert_eq!(pod["status"]["phase"], "Running");
        let owner = &pod["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "ReplicaSet", "{pod}");
    }
    let replica_sets = kube.get_json(&["replicasets", "-n", &ns.name, "-l", "app=web"])?;
    assert_eq!(replica_sets["items"].as_array().map(Vec::len), Some(1));

    kube.kubectl(&["delete", "deployment", "web", "-n", &ns.name, "--wait=false"], None)?;
    wait_for("the ReplicaSet and Pods to be garbage-collected", Duration::from_secs(60), || {
        let rs = kube.get_json(&["replicasets", "-n", &ns.name, "-l", "app=web"])?;
        let pods = kube.get_json(&["pods", "-n", &ns.name, "-l", "app=web"])?;
        let empty = |v: &serde_json::Value| v["items"].as_array().is_some_and(Vec::is_empty);
        Ok((empty(&rs) && empty(&pods)).then_some(()))
    })
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: ranges.smoke.tidepool.dev}
spec:
  group: smoke.tidepool.dev
  scope: Namespaced
  names: {plural: ranges, singular: range, kind: Range}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              min: {type: integer}
              max: {type: integer}
            x-kubernetes-validations:
            - rule: "self.min <= self.max"
              message: "min must not exceed max"
"#;

/// CEL validation rules in a CRD are enforced with the rule's message.
#[test]
fn crd_validation_rules_reject_invalid_objects() -> Result<()> {
    let kube = Kube::from_env()?;
    kube.kubectl(&["apply", "-f", "-"], Some(CRD))?;
    kube.wait_established("ranges.smoke.tidepool.dev")?;
    let ns = kube.namespace("cel")?;
    let object = |min: i32, max: i32| {
        format!("apiVersion: smoke.tidepool.dev/v1\nkind: Range\nmetadata: {{name: r{min}-{max}}}\nspec: {{min: {min}, max: {max}}}\n")
    };
    // The API server may take a moment to serve a newly established CRD.
    wait_for("the CRD to be served", Duration::from_secs(30), || {
        Ok(kube
            .kubectl_output(&["apply", "-n", &ns.name, "-f", "-"], Some(&object(1, 2)))?
            .status
            .success()
            .then_some(()))
    })?;
    let invalid = kube.kubectl_output(&["apply", "-n", &ns.name, "-f", "-"], Some(&object(3, 2)))?;
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert!(!invalid.status.success(), "an object breaking the rule must be rejected");
    assert!(stderr.contains("min must not exceed max"), "{stderr}");
    Ok(())
}

/// Native sidecars (an init container with restartPolicy: Always) are
/// accepted and kept: the PgBouncer sidecar depends on them.
#[test]
fn native_sidecars_are_accepted() -> Result<()> {
    let kube = Kube::from_env()?;
    let ns = kube.namespace("sidecar")?;
    let pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: with-sidecar}
spec:
  initContainers:
  - {name: pooler, image: tidepool.invalid/pgbouncer:1, restartPolicy: Always}
  containers:
  - {name: app, image: tidepool.invalid/app:1}
"#;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(pod))?;
    let stored = kube.get_json(&["pod", "with-sidecar", "-n", &ns.name])?;
    assert_eq!(stored["spec"]["initContainers"][0]["restartPolicy"], "Always");
    Ok(())
}

/// The API server and kubectl report the release pinned in go.mod, not
/// v0.0.0.
#[test]
fn versions_match_the_pinned_release() -> Result<()> {
    let kube = Kube::from_env()?;
    let pinned = pinned_version("kubernetes", "k8s.io/kubernetes")?;
    let version: serde_json::Value = serde_json::from_str(&kube.kubectl(&["version", "-o", "json"], None)?)?;
    assert_eq!(version["serverVersion"]["gitVersion"], pinned.as_str(), "{version}");
    assert_eq!(version["clientVersion"]["gitVersion"], pinned.as_str(), "{version}");
    Ok(())
}

/// `go version -m` on each binary lists the module versions pinned in
/// tools/kube/*/go.mod.
#[test]
fn binaries_embed_the_pinned_module_versions() -> Result<()> {
    let kube = Kube::from_env()?;
    let mut checks = vec![
        (kube.bin.join("kube-apiserver"), "kubernetes", "k8s.io/kubernetes"),
        (kube.bin.join("kube-controller-manager"), "kubernetes", "k8s.io/kubernetes"),
        (kube.bin.join("kube-scheduler"), "kubernetes", "k8s.io/kubernetes"),
        (kube.bin.join("kubectl"), "kubernetes", "k8s.io/kubernetes"),
        (kube.bin.join("kube-apiserver"), "kubernetes", "k8s.io/apiserver"),
    ];
    let (etcd, kwok, helm) =
        (env_path("TIDEPOOL_ETCD_BIN")?, env_path("TIDEPOOL_KWOK_BIN")?, env_path("TIDEPOOL_HELM_BIN")?);
    checks.push((etcd.join("etcd"), "etcd", "go.etcd.io/etcd/server/v3"));
    checks.push((kwok.join("kwok"), "kwok", "sigs.k8s.io/kwok"));
    checks.push((helm.join("helm"), "helm", "helm.sh/helm/v3"));
    checks.push((helm.join("helm4"), "helm", "helm.sh/helm/v4"));
    checks.push((helm.join("helm"), "helm", "k8s.io/client-go"));
    for (binary, tool, module) in checks {
        let pinned = pinned_version(tool, module)?;
        let output = Command::new("go").arg("version").arg("-m").arg(&binary).output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let listed = text.lines().any(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            matches!(words.as_slice(), ["dep" | "mod", m, v, ..] if *m == module && *v == pinned)
                || matches!(words.as_slice(), ["=>", m, v, ..] if *m == module && *v == pinned)
        });
        ensure!(listed, "{} does not embed {module} {pinned}:\n{text}", binary.display());
    }
    Ok(())
}

/// Helm 3 and Helm 4 install a chart into the cluster and see its real
/// version; offline, they assume the Kubernetes minor release they were
/// built against (the ldflags Helm's own build sets).
#[test]
fn helm_installs_into_the_cluster_and_sees_its_version() -> Result<()> {
    let kube = Kube::from_env()?;
    let pinned = pinned_version("kubernetes", "k8s.io/kubernetes")?;
    let minor = pinned.trim_start_matches('v').split('.').take(2).collect::<Vec<_>>().join(".");

    let chart = std::env::temp_dir().join(format!("tidepool-helm-smoke-{}", std::process::id()));
    std::fs::create_dir_all(chart.join("templates"))?;
    std::fs::write(chart.join("Chart.yaml"), "apiVersion: v2\nname: smoke\nversion: 0.1.0\n")?;
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: smoke}\ndata:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n",
    )?;

    for helm in ["helm", "helm4"] {
        let ns = kube.namespace(helm)?;
        let run = |args: &[&str]| -> Result<String> {
            let output = tidepool_testenv::helm(helm, Some(&kube))?.args(args).output()?;
            ensure!(
                output.status.success(),
                "{helm} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        };
        let chart_path = chart.to_string_lossy().into_owned();
        let offline = run(&["template", "smoke", &chart_path])?;
        ensure!(offline.contains(&format!("kubeVersion: \"v{minor}.")), "{helm} offline: {offline}");

        run(&["install", "smoke", &chart_path, "--namespace", &ns.name, "--wait", "--timeout", "60s"])?;
        let config_map = kube.get_json(&["configmap", "smoke", "-n", &ns.name])?;
        assert_eq!(config_map["data"]["kubeVersion"], pinned.as_str(), "{helm} in the cluster");
        ensure!(run(&["list", "--namespace", &ns.name])?.contains("smoke"), "{helm} list shows the release");
    }
    std::fs::remove_dir_all(&chart)?;
    Ok(())
}
