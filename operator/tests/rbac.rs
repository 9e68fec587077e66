//! The chart's RBAC, rule by rule, against the real API server of `make
//! test` (with OwnerReferencesPermissionEnforcement on, as in clusters that
//! guard owner references): the operator, run in-process as a service
//! account bound to the chart's own Roles, reconciles a Tidepool to Ready,
//! scales it, and is never refused; with any one rule taken out, it is
//! refused (403) what that rule allows. The API server's audit log says
//! which request was refused: it records every request of the service
//! accounts in `tidepool-rbac-probes` (scripts/kube/audit-policy.yaml).

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::{kube_with_crd, AuditLog, Operator, Queue};
use serde::Deserialize;
use serde_json::{json, Value};
use tidepool_testenv::node::Postgres;
use tidepool_testenv::{helm, repo_root, wait_for, Kube};

/// Where the probes' service accounts live (the audit policy names it).
const PROBES: &str = "tidepool-rbac-probes";

/// A Tidepool whose web tier, scaled from 3 to 1 pods, gets a larger share
/// per pod: the operator first scales the old pods down through the
/// Deployment's scale subresource, then rolls them.
fn tidepool(web_replicas: u32) -> String {
    tidepool_with(web_replicas, 60)
}

/// The same with 2 connections for the pods: it does not fit, which the
/// operator says with a Warning Event (the only time a healthy flow
/// publishes one).
fn tidepool_over_budget() -> String {
    tidepool_with(1, 12)
}

/// Its worker tier autoscales on an idle queue, so the queue scaler takes
/// it from 2 replicas to 1 at its first reading.
fn tidepool_with(web_replicas: u32, max_connections: u32) -> String {
    json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool",
        "metadata": {"name": "shop"},
        "spec": {
            "database": {"secretRef": {"name": "shop-app"}, "maxConnections": max_connections},
            "web": {"replicas": web_replicas, "databasePool": 20},
            "worker": {"replicas": 2, "concurrency": 6, "autoscaling": {"minReplicas": 1, "maxReplicas": 2,
                "pollingIntervalSeconds": 1, "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0}}
        }
    })
    .to_string()
}

/// The request refused without a rule: of what resource and subresource
/// (`None`: any), and words of its message.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    resource: Option<&'static str>,
    subresource: Option<&'static str>,
    /// The verb refused (`None`: any).
    verb: Option<&'static str>,
    message: &'static str,
}

impl Refusal {
    fn of(resource: &'static str, subresource: Option<&'static str>) -> Refusal {
        Refusal { resource: Some(resource), subresource, verb: None, message: "" }
    }

    /// What the operator is refused without the rule on `resource` (as a
    /// rule names it, `kind/subresource`) that allows `verbs`.
    fn without(resource: &str, verbs: &[&str]) -> Result<Refusal> {
        Ok(match resource {
            // The queue scaler's write of the worker replicas.
            "tidepools" if verbs == ["patch"] => {
                Refusal { verb: Some("patch"), ..Refusal::of("tidepools", None) }
            }
            "tidepools" => Refusal::of("tidepools", None),
            "tidepools/status" => Refusal::of("tidepools", Some("status")),
            // Any child: each carries an owner reference that blocks the
            // Tidepool's deletion, which the admission plugin allows only to
            // who may update the Tidepool's finalizers.
            "tidepools/finalizers" => {
                Refusal { resource: None, subresource: None, verb: None, message: "blockOwnerDeletion" }
            }
            "deployments/scale" => Refusal::of("deployments", Some("scale")),
            "secrets" => Refusal::of("secrets", None),
            "deployments" => Refusal::of("deployments", None),
            "services" => Refusal::of("services", None),
            "poddisruptionbudgets" => Refusal::of("poddisruptionbudgets", None),
            "horizontalpodautoscalers" => Refusal::of("horizontalpodautoscalers", None),
            "jobs" => Refusal::of("jobs", None),
            "pods" => Refusal::of("pods", None),
            "events" => Refusal::of("events", None),
            "leases" => Refusal::of("leases", None),
            other => bail!("the chart has a rule on {other}: say here what breaks without it"),
        })
    }

    fn matches(&self, entry: &Value) -> bool {
        let object = &entry["objectRef"];
        entry["responseStatus"]["code"] == 403
            && self.resource.is_none_or(|r| object["resource"] == r)
            && object["subresource"].as_str() == self.subresource
            && self.verb.is_none_or(|v| entry["verb"] == v)
            && entry["responseStatus"]["message"].as_str().unwrap_or_default().contains(self.message)
    }
}

/// One of the chart's rules: the Role it is in and its place there.
#[derive(Debug, Clone)]
struct Rule {
    role: String,
    index: usize,
    text: String,
}

/// The chart's Roles and RoleBindings for an operator watching `ns`, its
/// release in `ns` too (a Role for the Tidepools and their children, one for
/// the Lease).
fn chart_rbac(ns: &str) -> Result<Vec<Value>> {
    let chart = repo_root()?.join("charts/tidepool");
    let output = helm("helm", None)?
        .args(["template", "tidepool", chart.to_str().context("a UTF-8 path")?, "--namespace", ns])
        .args(["--set", &format!("watchNamespace={ns}")])
        .output()?;
    ensure!(output.status.success(), "helm template: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let object = Value::deserialize(document)?;
        if object["kind"] == "Role" || object["kind"] == "RoleBinding" {
            objects.push(object);
        }
    }
    ensure!(objects.len() == 4, "a Role and a RoleBinding for the Tidepools and for the Lease: {objects:?}");
    Ok(objects)
}

fn rules(rbac: &[Value]) -> Vec<Rule> {
    rbac.iter()
        .filter(|o| o["kind"] == "Role")
        .flat_map(|role| {
            let name = role["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            role["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(move |(index, rule)| Rule { role: name.clone(), index, text: rule.to_string() })
        })
        .collect()
}

/// The first resource a rule names.
fn resource_of(rule: &Rule) -> Result<String> {
    let rule: Value = serde_json::from_str(&rule.text)?;
    rule["resources"][0].as_str().map(str::to_owned).context("a rule without resources")
}

/// The verbs a rule allows.
fn verbs_of(rule: &Rule) -> Result<Vec<String>> {
    let rule: Value = serde_json::from_str(&rule.text)?;
    Ok(rule["verbs"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect())
}

/// Runs the operator as a service account of its own, bound to the chart's
/// Roles without `removed`, on a Tidepool of its own, until it is refused
/// what `removed` allows (or, with every rule, until the Tidepool is Ready,
/// scaled and Ready again, never refused). Says what happened.
fn probe(kube: &Kube, removed: Option<&Rule>) -> Result<String> {
    let ns = kube.namespace("rbac")?;
    let account = ns.name.clone();
    let user = format!("system:serviceaccount:{PROBES}:{account}");
    kube.kubectl(&["create", "serviceaccount", &account, "-n", PROBES], None)?;
    let result = probe_as(kube, &ns.name, &account, &user, removed);
    let _ = kube.kubectl_output(&["delete", "serviceaccount", &account, "-n", PROBES, "--wait=false"], None);
    result
}

fn probe_as(kube: &Kube, ns: &str, account: &str, user: &str, removed: Option<&Rule>) -> Result<String> {
    let mut rbac = chart_rbac(ns)?;
    for object in &mut rbac {
        if object["kind"] == "RoleBinding" {
            object["subjects"] = json!([{"kind": "ServiceAccount", "name": account, "namespace": PROBES}]);
        }
        if let Some(rule) =
            removed.filter(|r| object["kind"] == "Role" && object["metadata"]["name"] == r.role)
        {
            object["rules"].as_array_mut().context("rules")?.remove(rule.index);
        }
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": rbac}).to_string();
    kube.kubectl(&["apply", "-n", ns, "-f", "-"], Some(&list))?;
    // The authorizer sees Roles and bindings through its own watch: wait
    // until it does, so that a refusal below is the removed rule's.
    for (verb, resource) in [("get", "tidepools.tidepool.dev"), ("get", "leases.coordination.k8s.io")] {
        let kept = removed.is_none_or(|r| !resource.starts_with(&resource_of(r).unwrap_or_default()));
        if kept {
            wait_for(&format!("{user} may {verb} {resource}"), Duration::from_secs(30), || {
                let output =
                    kube.kubectl_output(&["auth", "can-i", verb, resource, "-n", ns, "--as", user], None)?;
                Ok((String::from_utf8_lossy(&output.stdout).trim() == "yes").then_some(()))
            })?;
        }
    }
    let queue = Queue::create(&Postgres::from_env()?, &ns.replace('-', "_"))?;
    kube.kubectl(&["apply", "-n", ns, "-f", "-"], Some(&queue.secrets()))?;
    let removed_resource = removed.map(resource_of).transpose()?;
    let first = match removed_resource.as_deref() {
        Some("events") => tidepool_over_budget(),
        _ => tidepool(3),
    };
    kube.kubectl(&["apply", "-n", ns, "-f", "-"], Some(&first))?;

    let token = kube.kubectl(&["create", "token", account, "-n", PROBES, "--duration", "10m"], None)?;
    let token_file = std::env::temp_dir().join(format!("tidepool-rbac-{account}.token"));
    write_private(&token_file, token.trim())?;
    let audit = AuditLog::open()?;
    let operator = Operator::start_as(ns, ns, Some(&token_file));
    std::fs::remove_file(&token_file).ok();
    let operator = operator?;
    let refused = |refusal: Option<Refusal>| -> Result<Option<String>> {
        Ok(audit
            .entries()?
            .iter()
            .filter(|e| e["user"]["username"] == user && e["responseStatus"]["code"] == 403)
            .find(|e| refusal.is_none_or(|r| r.matches(e)))
            .map(describe))
    };

    if removed_resource.as_deref().is_none_or(|r| r == "deployments/scale") {
        common::wait_ready(kube, ns, Duration::from_secs(90))
            .with_context(|| format!("refused: {:?}", refused(None).ok().flatten()))?;
        kube.kubectl(&["apply", "-n", ns, "-f", "-"], Some(&tidepool(1)))?;
    }
    let Some(rule) = removed else {
        wait_for("the web Deployment scaled through its scale subresource", Duration::from_secs(60), || {
            Ok(audit
                .entries()?
                .iter()
                .find(|e| {
                    e["user"]["username"] == user
                        && e["objectRef"]["subresource"] == "scale"
                        && e["responseStatus"]["code"] == 200
                })
                .map(drop))
        })?;
        wait_for("the web tier at 1 pod of the new share, Ready", Duration::from_secs(90), || {
            let tidepool = common::get(kube, ns, "tidepool/shop")?;
            let deployment = common::get(kube, ns, "deployment/shop-web")?;
            let ready =
                tidepool.as_ref().and_then(|t| common::condition(t, "Ready")).is_some_and(|c| c.0 == "True");
            Ok((ready
                && deployment
                    .is_some_and(|d| d["status"]["replicas"] == 1 && d["status"]["updatedReplicas"] == 1))
            .then_some(()))
        })?;
        wait_for("the queue scaler's patch of the worker replicas", Duration::from_secs(60), || {
            Ok(audit
                .entries()?
                .iter()
                .find(|e| {
                    e["user"]["username"] == user
                        && e["verb"] == "patch"
                        && e["objectRef"]["resource"] == "tidepools"
                        && e["objectRef"]["subresource"].is_null()
                        && e["responseStatus"]["code"] == 200
                })
                .map(drop))
        })?;
        kube.kubectl(&["apply", "-n", ns, "-f", "-"], Some(&tidepool_over_budget()))?;
        wait_for("the operator's Warning Event", Duration::from_secs(60), || {
            let events = kube.get_json(&["-n", ns, "events.v1.events.k8s.io"])?;
            Ok(events["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["reportingController"] == "tidepool-operator" && e["type"] == "Warning")
                .map(drop))
        })?;
        drop(operator);
        if let Some(refused) = refused(None)? {
            bail!("with every rule of the chart the operator was refused: {refused}");
        }
        return Ok(
            "with every rule: Ready, scaled 3 → 1 web pods, Ready again, workers scaled 2 → 1 by the queue scaler, over budget with a Warning Event, never refused"
                .into(),
        );
    };
    let verbs = verbs_of(rule)?;
    let refusal =
        Refusal::without(&resource_of(rule)?, &verbs.iter().map(String::as_str).collect::<Vec<_>>())?;
    let seen =
        wait_for(&format!("a refusal like {refusal:?}"), Duration::from_secs(60), || refused(Some(refusal)))
            .with_context(|| {
                format!("without {}: other refusals: {:?}", rule.text, refused(None).ok().flatten())
            })?;
    drop(operator);
    Ok(format!("without {} ({}): refused {seen}", rule.text, rule.role))
}

/// An audit entry as "verb resource/subresource (reason: message)".
fn describe(entry: &Value) -> String {
    let object = &entry["objectRef"];
    let status = &entry["responseStatus"];
    let subresource = object["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
    format!(
        "{} {}{subresource} ({}: {})",
        entry["verb"].as_str().unwrap_or_default(),
        object["resource"].as_str().unwrap_or_default(),
        status["reason"].as_str().unwrap_or("no reason"),
        status["message"].as_str().unwrap_or_default()
    )
}

/// Writes `text` to a new file only its owner may read.
fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

#[test]
fn every_rule_of_the_chart_is_needed_and_together_they_suffice() -> Result<()> {
    let kube = kube_with_crd()?;
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PROBES}}).to_string();
    kube.kubectl(&["apply", "-f", "-"], Some(&namespace))?;
    let rules = rules(&chart_rbac("tidepool-rbac-template")?);
    ensure!(rules.len() >= 10, "the chart's rules: {rules:?}");
    let cases: Vec<Option<&Rule>> = std::iter::once(None).chain(rules.iter().map(Some)).collect();
    let results: Vec<(Option<&Rule>, Result<String>)> = std::thread::scope(|scope| {
        let running: Vec<_> =
            cases.iter().map(|&case| (case, scope.spawn(move || probe(kube, case)))).collect();
        running
            .into_iter()
            .map(|(case, thread)| (case, thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))))
            .collect()
    });
    let mut failures = Vec::new();
    for (case, result) in results {
        match result {
            Ok(said) => eprintln!("{said}"),
            Err(e) => failures.push(format!("{}: {e:#}", case.map_or("every rule", |r| r.text.as_str()))),
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
