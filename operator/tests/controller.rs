//! The controller against the real API server of `make test`: each test runs
//! its own operator, limited to a namespace of its own, on the kwok node
//! (pods are scheduled and report Ready; nothing runs in them).

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{
    condition, get, image, kube_with_crd, tidepool, wait_condition, wait_web, AuditLog, Operator, SECRET,
};
use tidepool_testenv::wait_for;

#[test]
fn a_tidepool_gets_its_children_its_status_and_keeps_them() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("operator")?;
    let operator = Operator::start(&ns.name)?;
    assert_eq!(operator.get("/healthz")?.0, 200);
    wait_for("the operator to be ready", Duration::from_secs(30), || {
        Ok((operator.get("/readyz")?.0 == 200).then_some(()))
    })?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&format!("{SECRET}---\n{}", tidepool(200))))?;

    // The migration Job first; the Deployments once it has succeeded.
    let job = wait_for("the migration Job to succeed", Duration::from_secs(60), || {
        let jobs = kube.get_json(&["jobs", "-n", &ns.name, "-l", "app.kubernetes.io/component=migrate"])?;
        Ok(jobs["items"]
            .as_array()
            .and_then(|j| j.first())
            .filter(|j| j["status"]["succeeded"] == 1)
            .cloned())
    })?;
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["args"][0], "migrate");
    // Children, owned by the Tidepool, sized by the plan (200 − 10: every ask fits).
    let web = wait_for("the web Deployment", Duration::from_secs(60), || {
        get(kube, &ns.name, "deployment/shop-web")
    })?;
    let created = web["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_owned();
    let migrated = job["status"]["completionTime"].as_str().unwrap_or_default().to_owned();
    assert!(created >= migrated, "the Deployment ({created}) came before its migration ended ({migrated})");
    assert_eq!(web["metadata"]["ownerReferences"][0]["kind"], "Tidepool");
    assert_eq!(web["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(web["spec"]["template"]["metadata"]["annotations"]["tidepool.dev/max-db-connections"], "20");
    for child in ["deployment/shop-worker", "service/shop-web", "pdb/shop-web", "pdb/shop-worker"] {
        assert!(get(kube, &ns.name, child)?.is_some(), "{child} missing");
    }

    // Ready once kwok reports the pods ready; the numbers are the plan's.
    wait_condition(kube, &ns.name, "Ready", "True", "AllPodsReady")?;
    let status = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?["status"].clone();
    assert_eq!(status["connections"]["plannedOfAvailable"], "168/190", "{status}");
    assert_eq!(status["web"]["readyOfDesired"], "2/2");
    assert_eq!(status["worker"]["serverConnectionsPerPod"], 54);
    assert_eq!(
        status["web"]["selector"],
        "app.kubernetes.io/component=web,app.kubernetes.io/instance=shop,app.kubernetes.io/name=tidepool"
    );
    let live = wait_for("livePeak to count every pod", Duration::from_secs(60), || {
        let status = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?["status"].clone();
        Ok(status["connections"]["livePeak"].as_i64().filter(|live| *live == 2 * 20 + 54))
    })?;
    assert_eq!(live, 94);
    // The status, as the leader's gauges for dashboards and alerts.
    let gauge = |series: &str| operator.metric(&series.replace("NS", &ns.name));
    wait_for("the live_peak gauge", Duration::from_secs(10), || {
        Ok((gauge("tidepool_operator_connections{kind=\"live_peak\",namespace=\"NS\",tidepool=\"shop\"}")?
            == 94.0)
            .then_some(()))
    })?;
    assert_eq!(
        gauge("tidepool_operator_connections{kind=\"available\",namespace=\"NS\",tidepool=\"shop\"}")?,
        190.0
    );
    assert_eq!(gauge("tidepool_operator_condition{namespace=\"NS\",tidepool=\"shop\",type=\"Ready\"}")?, 1.0);
    assert!(operator.metric("tidepool_operator_reconciles_total{result=\"applied\"}")? >= 1.0);
    assert!(operator.metric("tidepool_operator_api_writes_total{kind=\"Deployment\"}")? >= 2.0);
    assert_eq!(operator.metric("tidepool_operator_leader")?, 1.0);
    let printed = kube.kubectl(&["get", "tp", "shop", "-n", &ns.name], None)?;
    assert!(printed.contains("2/2") && printed.contains("168/190"), "{printed}");

    // At rest, a restarted operator writes nothing: no apply, no status, no
    // Event. Its own count says so, and so does the API server's audit log:
    // while it renews its Lease, that is all it writes.
    drop(operator);
    let audit = AuditLog::open()?;
    let operator = Operator::start(&ns.name)?;
    wait_for("the new operator to lead and reconcile", Duration::from_secs(60), || {
        Ok((operator.metric("tidepool_operator_reconciles_total{result=\"applied\"}")? >= 1.0).then_some(()))
    })?;
    let (_, metrics) = operator.get("/metrics")?;
    let writes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tidepool_operator_api_writes_total") && !l.ends_with(" 0"))
        .collect();
    assert!(writes.is_empty(), "writes at rest: {writes:?}");
    let writes = wait_for("the operator to renew its Lease twice", Duration::from_secs(60), || {
        let writes = audit.writes_by(tidepool_operator::controller::USER_AGENT, &ns.name)?;
        Ok((writes
            .iter()
            .filter(|w| w.starts_with("update leases") || w.starts_with("patch leases"))
            .count()
            >= 2)
            .then_some(writes))
    })?;
    let others: Vec<&String> =
        writes.iter().filter(|w| !w.starts_with("update leases") && !w.starts_with("patch leases")).collect();
    assert!(others.is_empty(), "the operator wrote at rest: {others:?} (all: {writes:?})");

    // A child changed by hand is put back.
    kube.kubectl(&["scale", "deployment/shop-web", "--replicas=5", "-n", &ns.name], None)?;
    wait_web(kube, &ns.name, "the web Deployment back at 2 replicas", |w| w["spec"]["replicas"] == 2)?;

    // A rotated password rolls every tier's pods (their template's
    // credentials fingerprint); a label on the Secret does not; the
    // migration Job stays as it is.
    let fingerprint = |deployment: &serde_json::Value| {
        deployment["spec"]["template"]["metadata"]["annotations"]["tidepool.dev/credentials"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let deployment = |name: &str| get(kube, &ns.name, name)?.with_context(|| format!("{name} is gone"));
    let before = fingerprint(&deployment("deployment/shop-web")?);
    assert_eq!(before.len(), 32, "a fingerprint: {before:?}");
    assert!(!before.contains("s3cret"), "{before}");
    let reconciles = || operator.metric("tidepool_operator_reconciles_total{result=\"applied\"}");
    let counted = reconciles()?;
    kube.kubectl(&["label", "secret/shop-app", "-n", &ns.name, "rotated=not-yet"], None)?;
    wait_for("a reconcile after the label", Duration::from_secs(60), || {
        Ok((reconciles()? > counted).then_some(()))
    })?;
    for name in ["deployment/shop-web", "deployment/shop-worker"] {
        assert_eq!(fingerprint(&deployment(name)?), before, "{name} rolled on a label");
    }
    let rotated = r#"{"stringData":{"password":"n3w-s3cret"}}"#;
    kube.kubectl(&["patch", "secret/shop-app", "-n", &ns.name, "--type=merge", "-p", rotated], None)?;
    wait_web(kube, &ns.name, "the web pods to roll with the new password", |w| {
        let now = fingerprint(w);
        now.len() == 32 && now != before
    })?;
    let worker = fingerprint(&deployment("deployment/shop-worker")?);
    assert_eq!(worker, fingerprint(&deployment("deployment/shop-web")?), "one fingerprint for every tier");
    let jobs = kube.get_json(&["jobs", "-n", &ns.name, "-l", "app.kubernetes.io/component=migrate"])?;
    let names: Vec<&str> = jobs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, [job["metadata"]["name"].as_str().unwrap_or_default()], "the migration Job stays");

    // A new image migrates again, under a new Job, before its pods roll;
    // the old Job goes once the new one has succeeded.
    let old_job = job["metadata"]["name"].as_str().context("a name")?.to_owned();
    let next_image = r#"{"spec":{"image":"localhost/tidepool:next"}}"#;
    kube.kubectl(&["patch", "tidepool/shop", "-n", &ns.name, "--type=merge", "-p", next_image], None)?;
    wait_web(kube, &ns.name, "the web pods to roll to the new image", |w| {
        image(w) == "localhost/tidepool:next"
    })?;
    let jobs = kube.get_json(&["jobs", "-n", &ns.name, "-l", "app.kubernetes.io/component=migrate"])?;
    let new_job = jobs["items"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["metadata"]["name"] != old_job.as_str()).cloned())
        .context("a new migration Job")?;
    assert_eq!(new_job["status"]["succeeded"], 1, "the pods rolled before the migration ended: {new_job}");
    wait_for("the old Job to go", Duration::from_secs(60), || {
        Ok(get(kube, &ns.name, &format!("job/{old_job}"))?.is_none().then_some(()))
    })?;

    // The scale subresource drives the web Deployment.
    kube.kubectl(&["scale", "tidepool/shop", "--replicas=3", "-n", &ns.name], None)?;
    wait_web(kube, &ns.name, "the web Deployment at 3 replicas", |w| w["spec"]["replicas"] == 3)?;

    // Deleting the Tidepool deletes its children (the garbage collector).
    // The collector learns of a new resource type at its discovery resync,
    // every 30 s: on a fresh control plane that comes first.
    kube.kubectl(&["delete", "tidepool/shop", "-n", &ns.name, "--wait=false"], None)?;
    wait_for("the children to be garbage-collected", Duration::from_secs(120), || {
        let left = kube.get_json(&[
            "deployments,services,pdb",
            "-n",
            &ns.name,
            "-l",
            "app.kubernetes.io/instance=shop",
        ])?;
        Ok(left["items"].as_array().is_some_and(Vec::is_empty).then_some(()))
    })?;
    Ok(())
}

#[test]
fn a_missing_secret_key_or_budget_leaves_the_children_and_says_why() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("blocked")?;
    let operator = Operator::start(&ns.name)?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&tidepool(200)))?;

    let message = wait_condition(kube, &ns.name, "Degraded", "True", "SecretMissing")?;
    assert!(message.contains("shop-app does not exist"), "{message}");
    assert!(get(kube, &ns.name, "deployment/shop-web")?.is_none(), "nothing is applied without the Secret");
    assert!(operator.metric("tidepool_operator_reconciles_total{result=\"blocked\"}")? >= 1.0);
    wait_for("a SecretMissing Event", Duration::from_secs(30), || {
        let events = kube.kubectl(&["get", "events", "-n", &ns.name, "-o", "json"], None)?;
        Ok(events.contains("\"SecretMissing\"").then_some(()))
    })?;

    let without_password = SECRET.replace("password: s3cret-value, ", "");
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&without_password))?;
    let message = wait_condition(kube, &ns.name, "Degraded", "True", "SecretIncomplete")?;
    assert!(message.contains("lacks the keys password"), "{message}");

    // The Secret, completed, starts the Tidepool without touching it.
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(SECRET))?;
    wait_condition(kube, &ns.name, "ConnectionBudget", "True", "Fits")?;
    let before = wait_for("the web Deployment, after the migration", Duration::from_secs(60), || {
        get(kube, &ns.name, "deployment/shop-web")
    })?;

    // A budget that cannot fit is refused with its numbers; the running
    // children stay as they were.
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&tidepool(15)))?;
    let message = wait_condition(kube, &ns.name, "ConnectionBudget", "False", "BudgetDoesNotFit")?;
    assert!(message.contains("13 connections, but only 5 are available"), "{message}");
    let after = get(kube, &ns.name, "deployment/shop-web")?.context("still there")?;
    assert_eq!(
        before["metadata"]["generation"], after["metadata"]["generation"],
        "the Deployment was changed"
    );

    // No Secret value reached the status, the events or a log of the Tidepool.
    let everything = format!(
        "{}{}",
        kube.kubectl(&["get", "tidepool/shop", "-n", &ns.name, "-o", "yaml"], None)?,
        kube.kubectl(&["get", "events", "-n", &ns.name, "-o", "yaml"], None)?
    );
    assert!(!everything.contains("s3cret-value"));
    Ok(())
}

/// Two replicas: one holds the Lease and writes, the other waits and writes
/// nothing; when the leader stops, the other takes over.
#[test]
fn only_the_leader_writes_and_another_takes_over() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("leader")?;
    let first = Operator::start(&ns.name)?;
    wait_for("the first replica to lead", Duration::from_secs(30), || {
        Ok((first.metric("tidepool_operator_leader")? == 1.0).then_some(()))
    })?;
    let second = Operator::start(&ns.name)?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&format!("{SECRET}---\n{}", tidepool(200))))?;
    wait_condition(kube, &ns.name, "ConnectionBudget", "True", "Fits")?;
    let reconciles = |operator: &Operator| -> Result<f64> {
        ["applied", "blocked", "error"]
            .iter()
            .map(|result| {
                operator.metric(&format!("tidepool_operator_reconciles_total{{result=\"{result}\"}}"))
            })
            .sum()
    };
    assert!(reconciles(&first)? >= 1.0);
    assert_eq!(second.metric("tidepool_operator_leader")?, 0.0);
    assert_eq!(second.get("/readyz")?.0, 200, "a waiting follower is ready");
    assert_eq!(reconciles(&second)?, 0.0, "the follower reconciled");

    drop(first);
    wait_for("the second replica to lead", Duration::from_secs(60), || {
        Ok((second.metric("tidepool_operator_leader")? == 1.0).then_some(()))
    })?;
    kube.kubectl(&["scale", "tidepool/shop", "--replicas=3", "-n", &ns.name], None)?;
    wait_web(kube, &ns.name, "the new leader to apply a change", |w| w["spec"]["replicas"] == 3)?;
    assert!(reconciles(&second)? >= 1.0);
    Ok(())
}

/// Two Tidepools whose Secrets point at one database server: each fits its
/// own budget, together they do not, and both say so; when one goes, the
/// other fits again.
#[test]
fn tidepools_over_committing_one_server_both_say_so() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("shared")?;
    let _operator = Operator::start(&ns.name)?;
    let blog = SECRET.replace("shop-app", "blog-app").replace("dbname: shop", "dbname: blog");
    let blog_tidepool = tidepool(200).replace("name: shop}", "name: blog}").replace("shop-app", "blog-app");
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&format!("{SECRET}---\n{}", tidepool(200))))?;
    wait_condition(kube, &ns.name, "ConnectionBudget", "True", "Fits")?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&format!("{blog}---\n{blog_tidepool}")))?;
    let message = wait_condition(kube, &ns.name, "ConnectionBudget", "False", "ServerOverCommitted")?;
    assert!(message.contains("plan 336 connections together, over the 190 available"), "{message}");
    assert!(message.contains(&format!("{}/blog 168", ns.name)), "{message}");
    wait_for("the other Tidepool to say so too", Duration::from_secs(60), || {
        let blog = get(kube, &ns.name, "tidepool/blog")?;
        Ok(blog
            .and_then(|b| condition(&b, "ConnectionBudget"))
            .filter(|(s, r, _)| s == "False" && r == "ServerOverCommitted"))
    })?;
    assert!(!message.contains("db.example"), "the server's address is a Secret value: {message}");

    kube.kubectl(&["delete", "tidepool/blog", "-n", &ns.name], None)?;
    wait_condition(kube, &ns.name, "ConnectionBudget", "True", "Fits")?;
    Ok(())
}

/// A namespace being deleted gets nothing applied into it, and that is no
/// failure: its Tidepool (held by a finalizer of the test's own, so the
/// namespace stays terminating) is seen being deleted and left alone.
#[test]
fn nothing_is_applied_into_a_terminating_namespace() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("ending")?;
    let lease_ns = kube.namespace("ending-lease")?;
    let operator = Operator::start_with_lease(&ns.name, &lease_ns.name)?;
    let held = tidepool(200)
        .replace("metadata: {name: shop}", "metadata: {name: shop, finalizers: [test.tidepool.dev/hold]}");
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&format!("{SECRET}---\n{held}")))?;
    wait_condition(kube, &ns.name, "ConnectionBudget", "True", "Fits")?;

    kube.kubectl(&["delete", "namespace", &ns.name, "--wait=false"], None)?;
    wait_for("the operator to see the Tidepool being deleted", Duration::from_secs(60), || {
        Ok((operator.metric("tidepool_operator_reconciles_total{result=\"deleting\"}")? >= 1.0).then_some(()))
    })?;
    wait_for("the namespace's Deployments to be deleted", Duration::from_secs(120), || {
        let left = kube.get_json(&["deployments", "-n", &ns.name])?;
        Ok(left["items"].as_array().is_some_and(Vec::is_empty).then_some(()))
    })?;
    assert_eq!(operator.metric("tidepool_operator_reconciles_total{result=\"error\"}")?, 0.0);
    for kind in tidepool_operator::metrics::ErrorKind::ALL {
        let series = format!("tidepool_operator_reconcile_errors_total{{kind=\"{}\"}}", kind.label());
        assert_eq!(operator.metric(&series)?, 0.0, "{series}");
    }

    kube.kubectl(
        &[
            "patch",
            "tidepool/shop",
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    )?;
    Ok(())
}

/// The pods of a new image wait for its migration: with that image's Job
/// held (suspended, made beforehand with the rendered template), the
/// Deployment keeps the old image and the Tidepool says it is migrating;
/// once the Job runs and succeeds, the pods roll.
#[test]
fn pods_wait_for_their_migration() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("migrate")?;
    let _operator = Operator::start(&ns.name)?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&format!("{SECRET}---\n{}", tidepool(200))))?;
    wait_condition(kube, &ns.name, "Ready", "True", "AllPodsReady")?;

    // The Job the next image will need, rendered by the same code, held.
    let next = tidepool(200).replace("spec:\n", "spec:\n  image: localhost/tidepool:held\n");
    let mut object: tidepool_operator::crd::Tidepool = serde_norway::from_str(&next)?;
    object.metadata.namespace = Some(ns.name.clone());
    let validated = tidepool_operator::validate::validate(&object, &ns.name)?;
    let mut job = serde_json::to_value(tidepool_operator::render::migration::job(&validated))?;
    job["apiVersion"] = "batch/v1".into();
    job["kind"] = "Job".into();
    job["spec"]["suspend"] = true.into();
    let job_name = tidepool_operator::render::migration::job_name(&validated);
    kube.kubectl(
        &["apply", "--server-side", "--field-manager=test", "-n", &ns.name, "-f", "-"],
        Some(&job.to_string()),
    )?;

    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&next))?;
    let message = wait_condition(kube, &ns.name, "Ready", "False", "Migrating")?;
    assert!(message.contains(&job_name), "{message}");
    let web = get(kube, &ns.name, "deployment/shop-web")?.context("the web Deployment")?;
    assert_ne!(image(&web), "localhost/tidepool:held");

    kube.kubectl(
        &[
            "patch",
            &format!("job/{job_name}"),
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            r#"{"spec":{"suspend":false}}"#,
        ],
        None,
    )?;
    wait_web(kube, &ns.name, "the pods to roll to the new image", |w| image(w) == "localhost/tidepool:held")?;
    Ok(())
}
