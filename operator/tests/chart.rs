//! The Helm chart (`charts/tidepool`) with the project's Helm 3 and Helm 4:
//! it lints, renders what each value asks for (least-privilege RBAC,
//! namespaced or cluster-wide; a hardened operator Deployment; monitors
//! only where their API is served), refuses bad values with a clear
//! message, and `manifests/install.yaml` is the chart rendered with its
//! defaults; installed into the test cluster, the operator runs as pods on
//! the real node and reconciles, and the monitors, checked by
//! prometheus-operator's own CRDs, find the pods that run.

mod common;

use std::collections::BTreeSet;
use std::io::BufReader;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tidepool_testenv::node::{AppDatabase, Node, Postgres};
use tidepool_testenv::{helm, repo_root, wait_for, Kube};

const HELMS: [&str; 2] = ["helm", "helm4"];

fn chart() -> Result<String> {
    Ok(repo_root()?.join("charts/tidepool").to_string_lossy().into_owned())
}

/// `helm template` of the chart as release `tidepool` in `tidepool-system`,
/// with `args` (`--set ...`, `--api-versions ...`): the objects.
fn render(which: &str, args: &[&str]) -> Result<Vec<Value>> {
    let output = helm(which, None)?
        .args(["template", "tidepool", &chart()?, "--namespace", "tidepool-system"])
        .args(args)
        .output()?;
    ensure!(
        output.status.success(),
        "{which} template {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).context("helm template's YAML")?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects.iter().filter_map(|o| o["kind"].as_str().map(str::to_owned)).collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Result<&'a Value> {
    objects.iter().find(|o| o["kind"] == kind).with_context(|| format!("no {kind} rendered"))
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().into_iter().flatten().filter_map(Value::as_str).collect()
}

#[test]
fn the_chart_lints_with_helm_3_and_4() -> Result<()> {
    for which in HELMS {
        let output = helm(which, None)?.args(["lint", "--strict", &chart()?]).output()?;
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "{which} lint: {text}{}", String::from_utf8_lossy(&output.stderr));
        ensure!(text.contains("0 chart(s) failed"), "{which} lint: {text}");
    }
    Ok(())
}

#[test]
fn the_defaults_render_a_hardened_operator_with_cluster_wide_least_privilege() -> Result<()> {
    for which in HELMS {
        let objects = render(which, &[])?;
        let expected: BTreeSet<String> = [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
        .map(str::to_owned)
        .into();
        assert_eq!(kinds(&objects), expected, "{which}");

        let deployment = find(&objects, "Deployment")?;
        assert_eq!(deployment["spec"]["replicas"], 2, "{which}");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "localhost/tidepool-operator:0.1.0", "{which}");
        assert!(strings(&container["args"]).contains(&"--lease-duration=15"), "{which}: {container}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
        let env: Vec<&str> =
            container["env"].as_array().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();
        assert!(env.contains(&"POD_NAMESPACE") && env.contains(&"POD_NAME"), "{env:?}");
        assert!(!env.contains(&"TIDEPOOL_OPERATOR_NAMESPACE"), "cluster-wide by default");
        assert_eq!(pod["serviceAccountName"], find(&objects, "ServiceAccount")?["metadata"]["name"]);

        // The metrics Service selects the operator's pods, on their port.
        let service = find(&objects, "Service")?;
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        for (key, value) in service["spec"]["selector"].as_object().context("selector")? {
            assert_eq!(&labels[key], value, "{which}: the Service selects {key}");
        }
        assert_eq!(service["spec"]["ports"][0]["targetPort"], container["ports"][0]["name"]);

        // No wildcard anywhere; the Lease only in the operator's namespace.
        for object in objects.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role") {
            for rule in object["rules"].as_array().context("rules")? {
                for field in ["apiGroups", "resources", "verbs"] {
                    assert!(!strings(&rule[field]).contains(&"*"), "{which}: a wildcard in {rule}");
                }
                let leases = strings(&rule["resources"]).contains(&"leases");
                assert_eq!(leases, object["kind"] == "Role", "{which}: {rule}");
            }
        }
        let role = find(&objects, "Role")?;
        assert_eq!(role["metadata"]["namespace"], "tidepool-system");
    }
    Ok(())
}

#[test]
fn values_narrow_the_rights_and_the_replicas() -> Result<()> {
    for which in HELMS {
        // One namespace: its Role, nothing cluster-wide.
        let objects = render(which, &["--set", "watchNamespace=shop"])?;
        let scoped: Vec<&Value> =
            objects.iter().filter(|o| o["kind"] == "Role" || o["kind"] == "RoleBinding").collect();
        assert!(scoped.iter().any(|o| o["metadata"]["namespace"] == "shop"), "{which}");
        assert!(!kinds(&objects).contains("ClusterRole") && !kinds(&objects).contains("ClusterRoleBinding"));
        let container = &find(&objects, "Deployment")?["spec"]["template"]["spec"]["containers"][0];
        let watched = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "TIDEPOOL_OPERATOR_NAMESPACE");
        assert_eq!(watched.map(|e| &e["value"]), Some(&Value::from("shop")), "{which}");

        // A single replica without leader election: no Lease rights, no PDB.
        let objects = render(which, &["--set", "leaderElection.enabled=false", "--set", "replicaCount=1"])?;
        let container = &find(&objects, "Deployment")?["spec"]["template"]["spec"]["containers"][0];
        assert!(strings(&container["args"]).contains(&"--no-leader-election"), "{which}");
        assert!(!objects.iter().any(|o| o["metadata"]["name"] == "tidepool-leader-election"), "{which}");
        assert!(!kinds(&objects).contains("PodDisruptionBudget"), "{which}");

        // Without RBAC or a service account of its own, the named one.
        let objects = render(
            which,
            &[
                "--set",
                "rbac.create=false",
                "--set",
                "serviceAccount.create=false",
                "--set",
                "serviceAccount.name=ops",
            ],
        )?;
        let kinds = kinds(&objects);
        assert!(!kinds.iter().any(|k| k.contains("Role") || k == "ServiceAccount"), "{which}: {kinds:?}");
        assert_eq!(find(&objects, "Deployment")?["spec"]["template"]["spec"]["serviceAccountName"], "ops");
    }
    Ok(())
}

/// The values that turn on the ServiceMonitor, PodMonitor and PrometheusRule.
const MONITORS_ON: [&str; 6] = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
];

/// The rule groups of the chart's files/prometheus-rules.yaml: the spec of
/// its PrometheusRule.
fn alert_groups() -> Result<Value> {
    let text = std::fs::read_to_string(repo_root()?.join("charts/tidepool/files/prometheus-rules.yaml"))?;
    Ok(serde_norway::from_str(&text)?)
}

/// Every alert's runbook_url in rule groups, in order.
fn runbook_urls(groups: &Value) -> Vec<String> {
    groups["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["annotations"]["runbook_url"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn monitors_render_only_when_enabled_and_their_api_is_served() -> Result<()> {
    let on = MONITORS_ON;
    let served = [
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
        "--api-versions",
        "monitoring.coreos.com/v1/PodMonitor",
        "--api-versions",
        "monitoring.coreos.com/v1/PrometheusRule",
    ];
    let monitor_kinds = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];
    let alerts = alert_groups()?;
    for which in HELMS {
        let without_api = kinds(&render(which, &on)?);
        assert!(monitor_kinds.iter().all(|k| !without_api.contains(*k)), "{which}: {without_api:?}");
        let by_default = kinds(&render(which, &served)?);
        assert!(monitor_kinds.iter().all(|k| !by_default.contains(*k)), "{which}: off by default");

        // The alerts of files/prometheus-rules.yaml, as they are, and with
        // the runbook links pointed at a served copy.
        let objects = render(which, &[&on[..], &served[..]].concat())?;
        assert_eq!(find(&objects, "PrometheusRule")?["spec"], alerts, "{which}");
        let url = "https://runbooks.example/tidepool.md";
        let moved = render(
            which,
            &[&on[..], &served[..], &["--set", &format!("metrics.prometheusRule.runbookURL={url}")]].concat(),
        )?;
        let links = runbook_urls(&find(&moved, "PrometheusRule")?["spec"]);
        assert!(!links.is_empty() && links.iter().all(|l| l.starts_with(&format!("{url}#"))), "{links:?}");
        assert_eq!(
            links,
            runbook_urls(&alerts).iter().map(|l| l.replace("docs/runbooks.md", url)).collect::<Vec<_>>()
        );

        let objects = render(which, &[&on[..], &served[..]].concat())?;
        let monitor = find(&objects, "ServiceMonitor")?;
        let service = find(&objects, "Service")?;
        for (key, value) in monitor["spec"]["selector"]["matchLabels"].as_object().context("matchLabels")? {
            assert_eq!(
                &service["metadata"]["labels"][key], value,
                "{which}: the ServiceMonitor selects {key}"
            );
        }
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"]);

        // The PodMonitor's ports are the names the operator gives the
        // tiers' containers' ports, and it selects what it renders.
        let pod_monitor = find(&objects, "PodMonitor")?;
        // Tidepool's own pods and an application's (whose own port, `app`,
        // serves no metrics: its exporter's does).
        let mut port_names = BTreeSet::new();
        for example in ["minimal", "django-celery"] {
            let text =
                std::fs::read_to_string(repo_root()?.join(format!("manifests/examples/{example}.yaml")))?;
            let rendered = tidepool_operator::cli::render(&text, "shop")?;
            for document in serde_norway::Deserializer::from_str(&rendered) {
                let object = Value::deserialize(document)?;
                if object["kind"] != "Deployment" {
                    continue;
                }
                let labels = &object["spec"]["template"]["metadata"]["labels"];
                for (key, value) in
                    pod_monitor["spec"]["selector"]["matchLabels"].as_object().context("matchLabels")?
                {
                    assert_eq!(&labels[key], value, "{which}: the PodMonitor selects {key}");
                }
                // Every tier's pods (web, worker, an application's clock).
                let components = pod_monitor["spec"]["selector"]["matchExpressions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["key"] == "app.kubernetes.io/component")
                    .context("the PodMonitor's component expression")?;
                let component = &labels["app.kubernetes.io/component"];
                assert!(
                    components["values"].as_array().is_some_and(|v| v.contains(component)),
                    "{which}: the PodMonitor selects the {component} pods: {components}"
                );
                let pod = &object["spec"]["template"]["spec"];
                let containers =
                    pod["containers"].as_array().into_iter().chain(pod["initContainers"].as_array());
                port_names.extend(
                    containers
                        .flatten()
                        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                        .filter_map(|p| p["name"].as_str())
                        .filter(|name| *name != tidepool_operator::crd::PROCESS_PORT_NAME)
                        .map(str::to_owned),
                );
            }
        }
        let monitored: BTreeSet<String> = pod_monitor["spec"]["podMetricsEndpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["port"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(monitored, port_names, "{which}");
    }
    Ok(())
}

#[test]
fn the_values_schema_refuses_each_kind_of_bad_value_clearly() -> Result<()> {
    let cases = [
        ("replicaCount=0", "at '/replicaCount': minimum: got 0, want 1"),
        ("replicaCount=two", "at '/replicaCount'"),
        (
            "image.pullPolicy=Sometimes",
            "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
        ),
        ("image.repository=", "at '/image/repository'"),
        ("metrics.port=70000", "at '/metrics/port': maximum"),
        ("watchNamespace=Not_A_Namespace", "at '/watchNamespace'"),
        ("metrics.serviceMonitor.interval=soon", "at '/metrics/serviceMonitor/interval'"),
        ("leaderElection.leaseDurationSeconds=1", "at '/leaderElection/leaseDurationSeconds': minimum"),
        ("leaderElection.enabled=false", "at '/replicaCount': value must be 1"),
        ("replicas=3", "additional properties 'replicas' not allowed"),
        ("podLabels.team=3", "at '/podLabels/team'"),
        ("metrics.prometheusRule.runbookURL=ftp://runbooks", "at '/metrics/prometheusRule/runbookURL'"),
    ];
    for which in HELMS {
        for (set, message) in cases {
            let output =
                helm(which, None)?.args(["template", "tidepool", &chart()?, "--set", set]).output()?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{which}: --set {set} was accepted");
            assert!(stderr.contains("values don't meet the specifications"), "{which} --set {set}: {stderr}");
            assert!(stderr.contains(message), "{which} --set {set}: wanted {message:?} in {stderr}");
        }
    }
    Ok(())
}

#[test]
fn install_yaml_is_the_chart_rendered_with_its_defaults() -> Result<()> {
    let root = repo_root()?;
    let fresh = std::env::temp_dir().join(format!("tidepool-manifests-{}", std::process::id()));
    let output = Command::new(root.join("scripts/render-manifests.sh")).arg(&fresh).output()?;
    ensure!(output.status.success(), "render-manifests.sh: {}", String::from_utf8_lossy(&output.stderr));
    for file in [
        "install.yaml",
        "prometheus/tidepool.rules.yaml",
        "dashboards/tidepool.json",
        "dashboards/tidepool-operator.json",
    ] {
        let rendered = std::fs::read_to_string(fresh.join(file))?;
        let checked_in = std::fs::read_to_string(root.join("manifests").join(file))?;
        assert!(rendered == checked_in, "manifests/{file} is stale: run scripts/render-manifests.sh");
    }
    std::fs::remove_dir_all(&fresh)?;
    let checked_in = std::fs::read_to_string(root.join("manifests/install.yaml"))?;
    let kinds: Vec<Value> = serde_norway::Deserializer::from_str(&checked_in)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()?;
    assert_eq!(kinds[0]["kind"], "Namespace");
    assert_eq!(kinds[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
    assert!(kinds.iter().any(|k| k["kind"] == "CustomResourceDefinition"));
    let rules = std::fs::read_to_string(root.join("manifests/prometheus/tidepool.rules.yaml"))?;
    assert_eq!(serde_norway::from_str::<Value>(&rules)?, alert_groups()?);
    Ok(())
}

/// `promtool` (Debian's Prometheus package, `make deps`) checks the rules
/// and runs manifests/prometheus/tests/, where every alert has a case that
/// fires it, with its labels and the numbers of its description, and one
/// that does not.
#[test]
fn every_alert_fires_when_it_should_and_only_then() -> Result<()> {
    let root = repo_root()?;
    let promtool = |args: &[&str]| -> Result<String> {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(&root)
            .output()
            .context("promtool (Debian's prometheus package; run make deps)")?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        ensure!(output.status.success(), "promtool {args:?}:\n{text}");
        Ok(text)
    };
    promtool(&["check", "rules", "manifests/prometheus/tidepool.rules.yaml"])?;
    let tests = "manifests/prometheus/tests/tidepool.test.yaml";
    assert!(promtool(&["test", "rules", tests])?.contains("SUCCESS"));

    let cases: Value = serde_norway::from_str(&std::fs::read_to_string(root.join(tests))?)?;
    let cases: Vec<&Value> = cases["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    let groups = alert_groups()?;
    let alerts = groups["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str());
    for alert in alerts {
        let of_alert = || cases.iter().filter(|c| c["alertname"] == alert);
        let fires = of_alert().any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let quiet = of_alert().any(|c| c["exp_alerts"].as_array().is_some_and(Vec::is_empty));
        assert!(fires && quiet, "{alert}: a case that fires it ({fires}) and one that does not ({quiet})");
    }
    Ok(())
}

/// The chart's Grafana dashboards (files/dashboards/), each in a ConfigMap
/// labelled for Grafana's sidecar, as they are in the files.
#[test]
fn dashboards_render_as_configmaps_for_grafanas_sidecar() -> Result<()> {
    let dir = repo_root()?.join("charts/tidepool/files/dashboards");
    for which in HELMS {
        let objects = render(which, &["--set", "dashboards.namespace=grafana"])?;
        let maps: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "ConfigMap").collect();
        assert_eq!(maps.len(), 2, "{which}: one per dashboard");
        for map in maps {
            assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1", "{which}");
            assert_eq!(map["metadata"]["namespace"], "grafana", "{which}");
            let (file, json) = map["data"].as_object().and_then(|d| d.iter().next()).context("one key")?;
            let on_disk = std::fs::read_to_string(dir.join(file))?;
            assert_eq!(json.as_str().map(str::trim_end), Some(on_disk.trim_end()), "{which}: {file}");
        }
        assert!(!kinds(&render(which, &["--set", "dashboards.enabled=false"])?).contains("ConfigMap"));
    }
    Ok(())
}

/// Every dashboard query selects through the dashboard's variables, never
/// hides missing data behind a constant, and counts each figure once (the
/// queue gauges that every worker exports with `max`).
#[test]
fn dashboards_are_laid_out_select_by_their_variables_and_count_each_figure_once() -> Result<()> {
    for file in ["tidepool.json", "tidepool-operator.json"] {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
            repo_root()?.join("charts/tidepool/files/dashboards").join(file),
        )?)?;
        let variables: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        // Every panel on Grafana's 24-column grid, none over another.
        let mut cells = BTreeSet::new();
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            let at = &panel["gridPos"];
            let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| at[k].as_u64());
            let (Some(h), Some(w), Some(x), Some(y)) = (h, w, x, y) else {
                panic!("{file}: {}: gridPos {at} is not four numbers", panel["title"]);
            };
            assert!(w > 0 && h > 0 && x + w <= 24, "{file}: {}: {at}", panel["title"]);
            for cell in (x..x + w).flat_map(|c| (y..y + h).map(move |r| (c, r))) {
                assert!(cells.insert(cell), "{file}: {} overlaps another panel at {cell:?}", panel["title"]);
            }
        }
        let panels: Vec<&Value> =
            dashboard["panels"].as_array().into_iter().flatten().filter(|p| p["type"] != "row").collect();
        assert!(!panels.is_empty(), "{file}");
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{file}: {title} undescribed"
            );
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{file}: {title}");
            let targets = panel["targets"].as_array().context("targets")?;
            assert!(!targets.is_empty(), "{file}: {title}");
            for target in targets {
                let expr = target["expr"].as_str().context("expr")?;
                for constant in ["vector(", "or on", " or "] {
                    assert!(!expr.contains(constant), "{file}: {title}: {expr} hides missing data");
                }
                if file == "tidepool.json" {
                    assert_eq!(variables, ["datasource", "namespace", "tidepool", "tier"]);
                    assert!(
                        expr.contains(r#"namespace="$namespace""#)
                            && expr.contains(r#"tidepool="$tidepool""#),
                        "{title}: {expr}"
                    );
                    if expr.contains("tidepool_queue_") {
                        assert!(expr.starts_with("max by"), "{title}: every worker exports it: {expr}");
                    }
                    // A pod of an application's process exports only the
                    // pgbouncer_* series: a panel of Tidepool's own says so.
                    let own = expr
                        .match_indices("tidepool_")
                        .any(|(at, _)| !expr[at..].starts_with("tidepool_operator_"));
                    if own {
                        let description = panel["description"].as_str().unwrap_or_default();
                        assert!(
                            description.contains("Tidepool's own processes only"),
                            "{title}: say that an application's tier has none of {expr}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Every alert's runbook link names a section of docs/runbooks.md.
#[test]
fn every_alert_has_a_runbook() -> Result<()> {
    let runbooks = std::fs::read_to_string(repo_root()?.join("docs/runbooks.md"))?;
    let sections: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| format!("docs/runbooks.md#{}", h.to_lowercase()))
        .collect();
    let groups = alert_groups()?;
    let alerts: Vec<&Value> = groups["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r["alert"].is_string())
        .collect();
    ensure!(!alerts.is_empty(), "no alerts in files/prometheus-rules.yaml");
    for alert in alerts {
        let name = alert["alert"].as_str().unwrap_or_default();
        let link = alert["annotations"]["runbook_url"].as_str().unwrap_or_default();
        assert_eq!(link, format!("docs/runbooks.md#{}", name.to_lowercase()), "{name}");
        assert!(sections.contains(link), "{name}: no section {link} in docs/runbooks.md");
        for annotation in ["summary", "description"] {
            assert!(
                alert["annotations"][annotation].as_str().is_some_and(|a| !a.is_empty()),
                "{name}: {annotation}"
            );
        }
    }
    Ok(())
}

/// `helm install` into the test cluster, watching one namespace (an operator
/// for the whole cluster would reconcile the other tests' Tidepools too):
/// every object is accepted, the operator runs as two pods on the real node
/// under the chart's service account and Role, one of them holds the Lease,
/// and a Tidepool applied after goes Ready with its pods running. `helm
/// uninstall` removes the operator and leaves the CRD, the Tidepool and its
/// children, which go when the Tidepool is deleted.
#[test]
fn helm_install_runs_the_operator_on_the_real_node_and_it_reconciles() -> Result<()> {
    let kube = common::kube_with_crd()?;
    let node = Node::from_env()?;
    let pg = Postgres::from_env()?;
    let ns = kube.namespace("chart")?;
    let db = AppDatabase::create(&pg, &ns.name.replace('-', "_"))?;
    install_monitoring_crds(kube)?;
    for which in HELMS {
        let release = format!("tidepool-{which}");
        common::helm_install_operator(kube, which, &ns.name, &release, &MONITORS_ON)?;
        let selector = format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=operator");
        let names = common::operator_leads_on_the_real_node(kube, &ns.name, &selector, &release)
            .with_context(|| which.to_owned())?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();

        if which == "helm" {
            // The Tidepool, reconciled by the replica that leads.
            kube.kubectl(
                &["apply", "-n", &ns.name, "-f", "-"],
                Some(&db.secret("shop-app", &node.host_ip, pg.port)),
            )?;
            kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(common::REAL_NODE_TIDEPOOL))?;
            common::wait_ready(kube, &ns.name, Duration::from_secs(240)).with_context(|| {
                kube.kubectl(&["get", "pods,events", "-n", &ns.name], None).unwrap_or_default()
            })?;
            monitors_find_what_runs(kube, &ns.name, &release)?;

            // An upgrade with a changed value rolls both replicas; the Lease
            // passes on without a gap in renewals longer than its duration.
            let renewals = LeaseWatch::start(kube, &ns.name)?;
            let output = helm(which, Some(kube))?
                .args(["upgrade", &release, &chart()?, "--namespace", &ns.name, "--reuse-values"])
                .args(["--set", "logLevel=debug", "--wait", "--timeout", "180s"])
                .output()?;
            ensure!(output.status.success(), "{which} upgrade: {}", String::from_utf8_lossy(&output.stderr));
            let pods = kube.get_json(&["-n", &ns.name, "pods", "-l", &selector])?;
            let new: Vec<String> = pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
                .collect();
            ensure!(new.iter().all(|n| !names.contains(&n.as_str())), "{which}: not rolled: {new:?}");
            wait_for("a new replica to hold the Lease", Duration::from_secs(60), || {
                let lease = kube.get_json(&["-n", &ns.name, "lease/tidepool-operator"])?;
                let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
                Ok(new.iter().any(|n| n == holder).then_some(()))
            })?;
            let renewals = renewals.finish()?;
            eprintln!("{which}: the Lease across the upgrade: {renewals:?}");
            let lease_duration = Duration::from_secs(15);
            assert!(renewals.longest_gap <= lease_duration, "{which}: a gap in leadership: {renewals:?}");
            assert!(renewals.holders.len() >= 2, "{which}: the Lease passed to a new replica: {renewals:?}");
        }

        let output = helm(which, Some(kube))?
            .args(["uninstall", &release, "--namespace", &ns.name, "--wait", "--timeout", "120s"])
            .output()?;
        ensure!(output.status.success(), "{which} uninstall: {}", String::from_utf8_lossy(&output.stderr));
        let left = kube.kubectl(
            &[
                "get",
                "deployment,serviceaccount,role,rolebinding,service,pdb,servicemonitor,podmonitor,prometheusrule,configmap",
                "-n",
                &ns.name,
                "-l",
                &format!("app.kubernetes.io/instance={release}"),
                "-o",
                "name",
            ],
            None,
        )?;
        assert_eq!(left.trim(), "", "{which} uninstall left: {left}");
        kube.kubectl(&["get", "crd/tidepools.tidepool.dev"], None)?;
        // The Tidepool and its children outlive the operator.
        kube.kubectl(
            &["get", "-n", &ns.name, "tidepool/shop", "deployment/shop-web", "deployment/shop-worker"],
            None,
        )?;
    }
    // Until the Tidepool goes: then its children go with it (their owner
    // references, by the garbage collector), with no operator running.
    kube.kubectl(&["delete", "-n", &ns.name, "tidepool/shop", "--wait=true", "--timeout=60s"], None)?;
    wait_for("the Tidepool's children to go with it", Duration::from_secs(120), || {
        let left = kube.kubectl(
            &[
                "get",
                "-n",
                &ns.name,
                "deployments,services,jobs",
                "-l",
                "app.kubernetes.io/managed-by=tidepool-operator",
                "-o",
                "name",
            ],
            None,
        )?;
        Ok(left.trim().is_empty().then_some(()))
    })?;
    Ok(())
}

/// prometheus-operator's CRDs of the chart's monitors, generated from its Go
/// API module (`scripts/kube-build.sh monitoring`), installed and served.
fn install_monitoring_crds(kube: &Kube) -> Result<()> {
    let dir = tidepool_testenv::env_path("TIDEPOOL_MONITORING_CRDS")?;
    for plural in ["servicemonitors", "podmonitors", "prometheusrules"] {
        let file = dir.join(format!("monitoring.coreos.com_{plural}.yaml"));
        let file = file.to_str().context("a UTF-8 path")?;
        kube.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", file], None)?;
        kube.wait_established(&format!("{plural}.monitoring.coreos.com"))?;
        wait_for(&format!("{plural} to be served"), Duration::from_secs(30), || {
            Ok(kube.kubectl_output(&["get", plural, "-A"], None)?.status.success().then_some(()))
        })?;
    }
    Ok(())
}

/// A label selector (`matchLabels`, `matchExpressions`) as `kubectl -l`
/// takes it.
fn selector_arg(selector: &Value) -> Result<String> {
    let mut terms = Vec::new();
    for (key, value) in selector["matchLabels"].as_object().into_iter().flatten() {
        terms.push(format!("{key}={}", value.as_str().context("a label value")?));
    }
    for expression in selector["matchExpressions"].as_array().into_iter().flatten() {
        let key = expression["key"].as_str().context("a key")?;
        let values = strings(&expression["values"]).join(",");
        terms.push(match expression["operator"].as_str() {
            Some("In") => format!("{key} in ({values})"),
            Some("NotIn") => format!("{key} notin ({values})"),
            Some("Exists") => key.to_owned(),
            Some("DoesNotExist") => format!("!{key}"),
            other => anyhow::bail!("operator {other:?} in {selector}"),
        });
    }
    Ok(terms.join(","))
}

/// The names of a pod's container ports.
fn port_names(pod: &Value) -> BTreeSet<String> {
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// The release's monitors, as the API server keeps them, find what really
/// runs: the PodMonitor selects the Tidepool's web and worker pods (and no
/// other) in the watched namespace, each on a port it has; the
/// ServiceMonitor selects the metrics Service, on a port it has, whose
/// endpoints are the operator's pods; the PrometheusRule holds the alerts.
fn monitors_find_what_runs(kube: &Kube, ns: &str, release: &str) -> Result<()> {
    let pod_monitor = kube.get_json(&["-n", ns, &format!("podmonitor/{release}-pods")])?;
    assert_eq!(strings(&pod_monitor["spec"]["namespaceSelector"]["matchNames"]), [ns]);
    let selected =
        kube.get_json(&["-n", ns, "pods", "-l", &selector_arg(&pod_monitor["spec"]["selector"])?])?;
    let selected = selected["items"].as_array().cloned().unwrap_or_default();
    let tiers: Vec<&str> = selected
        .iter()
        .filter_map(|p| p["metadata"]["labels"]["app.kubernetes.io/component"].as_str())
        .collect();
    assert_eq!(BTreeSet::from_iter(tiers.iter().copied()), BTreeSet::from(["web", "worker"]), "{tiers:?}");
    let app_pods =
        kube.get_json(&["-n", ns, "pods", "-l", "app.kubernetes.io/managed-by=tidepool-operator"])?;
    let running_apps = app_pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["status"]["phase"] == "Running")
        .count();
    assert_eq!(selected.len(), running_apps, "the PodMonitor selects every running app pod");
    let endpoints: BTreeSet<String> = pod_monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["port"].as_str().map(str::to_owned))
        .collect();
    for pod in &selected {
        let ports = port_names(pod);
        assert!(ports.intersection(&endpoints).next().is_some(), "{endpoints:?} name none of {ports:?}");
    }
    // The exporter's port is on pods of an application's process only
    // (operator/tests/real_node_django.rs scrapes it); these are Tidepool's.
    let exporter = tidepool_operator::render::deployment::EXPORTER_PORT_NAME;
    for endpoint in endpoints.iter().filter(|e| *e != exporter) {
        assert!(selected.iter().any(|p| port_names(p).contains(endpoint)), "no pod has the port {endpoint}");
    }
    // The `tidepool` and `tier` labels come from labels every pod has.
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"].as_array().into_iter().flatten() {
        for relabeling in endpoint["relabelings"].as_array().into_iter().flatten() {
            for source in strings(&relabeling["sourceLabels"]) {
                let label = source.strip_prefix("__meta_kubernetes_pod_label_").context("a pod label")?;
                for pod in &selected {
                    let labels = pod["metadata"]["labels"].as_object().context("labels")?;
                    let has = labels.keys().any(|k| k.replace(['.', '/', '-'], "_") == label);
                    assert!(has, "{} has no label for {source}", pod["metadata"]["name"]);
                }
            }
        }
    }

    let monitor = kube.get_json(&["-n", ns, &format!("servicemonitor/{release}")])?;
    let services =
        kube.get_json(&["-n", ns, "services", "-l", &selector_arg(&monitor["spec"]["selector"])?])?;
    let services = services["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(services.len(), 1, "the ServiceMonitor selects one Service");
    let service = &services[0];
    assert_eq!(service["metadata"]["name"], format!("{release}-metrics"));
    let service_ports: Vec<&Value> = service["spec"]["ports"].as_array().into_iter().flatten().collect();
    assert!(service_ports.iter().any(|p| p["name"] == monitor["spec"]["endpoints"][0]["port"]), "{service}");
    let operators = kube.get_json(&[
        "-n",
        ns,
        "pods",
        "-l",
        &format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"),
    ])?;
    let operators: BTreeSet<&str> = operators["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    let slices = kube.get_json(&[
        "-n",
        ns,
        "endpointslices",
        "-l",
        &format!("kubernetes.io/service-name={release}-metrics"),
    ])?;
    let targets: BTreeSet<&str> = slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .filter_map(|e| e["targetRef"]["name"].as_str())
        .collect();
    assert_eq!(targets, operators, "the metrics Service's endpoints are the operator's pods");

    let rule = kube.get_json(&["-n", ns, &format!("prometheusrule/{release}")])?;
    assert_eq!(rule["spec"], alert_groups()?);
    Ok(())
}

/// A watch of the Lease `tidepool-operator`: the longest time between two
/// renewals by any holder (or from the last one to the end), and the
/// holders seen in order.
struct LeaseWatch {
    child: Child,
    thread: Option<JoinHandle<Result<Renewals>>>,
    started: Instant,
}

/// What a [`LeaseWatch`] saw.
#[derive(Debug)]
struct Renewals {
    longest_gap: Duration,
    holders: Vec<String>,
}

impl LeaseWatch {
    fn start(kube: &Kube, namespace: &str) -> Result<LeaseWatch> {
        let mut child = Command::new(kube.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kube.kubeconfig)
            .args(["get", "lease/tidepool-operator", "-n", namespace, "--watch", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("kubectl get --watch")?;
        let stdout = child.stdout.take().context("kubectl's output")?;
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let (mut longest, mut last, mut holders) = (Duration::ZERO, started, Vec::<String>::new());
            let mut last_renewal = String::new();
            for lease in serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>() {
                let lease = lease?;
                let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_owned();
                let renewal = lease["spec"]["renewTime"].as_str().unwrap_or_default().to_owned();
                if holder.is_empty() || renewal == last_renewal {
                    continue;
                }
                longest = longest.max(last.elapsed());
                last = Instant::now();
                last_renewal = renewal;
                if holders.last() != Some(&holder) {
                    holders.push(holder);
                }
            }
            Ok(Renewals { longest_gap: longest.max(last.elapsed()), holders })
        });
        Ok(LeaseWatch { child, thread: Some(thread), started })
    }

    fn finish(mut self) -> Result<Renewals> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let thread = self.thread.take().context("finished already")?;
        let renewals = thread.join().map_err(|_| anyhow::anyhow!("the Lease watch panicked"))??;
        ensure!(self.started.elapsed() >= renewals.longest_gap, "a gap longer than the watch");
        Ok(renewals)
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
