//! The operator's scaling against the real API server of `make test` (the
//! kwok node: pods are scheduled and report Ready, nothing runs in them)
//! and a real PostgreSQL: the queue scaler reads a real jobs table, as a
//! role that may only read it, and sets the worker replicas; the web tier
//! follows its scale subresource. Jobs are enqueued and drained by the
//! tests themselves, since no worker runs.

mod common;

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use common::{condition, get, kube_with_crd, wait_condition, Operator, Queue};
use serde_json::{json, Value};
use tidepool::queue::{NewJob, Schedule};
use tidepool_testenv::node::{Postgres, PrivatePostgres};
use tidepool_testenv::{wait_for, Kube};

fn jobs(count: usize) -> Vec<NewJob> {
    (0..count).map(|i| NewJob::new("noop", json!({ "i": i }))).collect()
}

/// A Tidepool whose worker tier scales by `autoscaling`, with windows of
/// seconds so the tests take seconds.
fn tidepool(worker_replicas: u32, autoscaling: Value) -> String {
    let mut scaling = json!({"pollingIntervalSeconds": 1, "scaleUpStabilizationSeconds": 2,
        "scaleDownStabilizationSeconds": 5, "secretRef": {"name": "shop-scaler"}});
    common::merge(&mut scaling, &autoscaling);
    json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "metadata": {"name": "shop"},
        "spec": {
            "database": {"secretRef": {"name": "shop-app"}, "maxConnections": 1000},
            "web": {"replicas": 1},
            "worker": {"replicas": worker_replicas, "autoscaling": scaling},
        }
    })
    .to_string()
}

fn deployment_replicas(kube: &Kube, ns: &str) -> Result<Option<i64>> {
    Ok(get(kube, ns, "deployment/shop-worker")?.and_then(|d| d["spec"]["replicas"].as_i64()))
}

fn wait_worker_replicas(kube: &Kube, ns: &str, replicas: i64, limit: Duration) -> Result<()> {
    wait_for(&format!("the worker Deployment at {replicas} replicas"), limit, || {
        Ok((deployment_replicas(kube, ns)? == Some(replicas)).then_some(()))
    })
}

/// The Events about `kind`/`name` with `reason`, oldest first, as (time in
/// microseconds since the epoch, note).
fn events(kube: &Kube, ns: &str, kind: &str, name_prefix: &str, reason: &str) -> Result<Vec<(i64, String)>> {
    let list = kube.get_json(&["events.events.k8s.io", "-n", ns])?;
    let mut found: Vec<(i64, String)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["regarding"]["kind"] == kind
                && e["regarding"]["name"].as_str().is_some_and(|n| n.starts_with(name_prefix))
                && e["reason"] == reason
        })
        .map(|e| {
            let time = e["eventTime"]
                .as_str()
                .or_else(|| e["deprecatedFirstTimestamp"].as_str())
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .map_or(0, |t| t.as_microsecond());
            (time, e["note"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    found.sort();
    Ok(found)
}

fn now_micros() -> Result<i64> {
    Ok(i64::try_from(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_micros())?)
}

/// Starts the operator and the Tidepool in `ns`; waits until the scaler
/// has read the queues.
fn deploy(kube: &Kube, ns: &str, queue: &Queue, spec: &str) -> Result<Operator> {
    let operator = Operator::start(ns)?;
    kube.kubectl(&["apply", "-n", ns, "-f", "-"], Some(&format!("{}\n---\n{spec}", queue.secrets())))?;
    wait_condition(kube, ns, "WorkerAutoscaling", "True", "QueuesRead")?;
    Ok(operator)
}

#[test]
fn a_backlog_scales_the_workers_up_and_draining_brings_them_down() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("scale-backlog")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("scale_backlog_{}", std::process::id()))?;
    let spec = tidepool(
        1,
        json!({"minReplicas": 1, "maxReplicas": 12,
               "queues": [{"name": "default", "targetAvailableJobsPerReplica": 1000}]}),
    );
    let operator = deploy(kube, &ns.name, &queue, &spec)?;
    wait_worker_replicas(kube, &ns.name, 1, Duration::from_secs(60))?;
    let planned = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?["status"]["connections"]
        ["plannedOfAvailable"]
        .clone();

    let enqueued = now_micros()?;
    queue.enqueue(&jobs(10_000))?;
    wait_worker_replicas(kube, &ns.name, 10, Duration::from_secs(60))?;

    // The order: the backlog seen and the decision (the operator's Event,
    // naming what it saw), then the Deployment's replicas (its controller's
    // Event).
    let decided = events(kube, &ns.name, "Tidepool", "shop", "ScaledUp")?;
    let (decided_at, note) = decided.last().context("a ScaledUp Event on the Tidepool")?.clone();
    assert!(note.starts_with("worker replicas 1 → 10 (QueueBacklog)"), "{note}");
    assert!(note.contains("default 10000 at 1000 per replica"), "{note}");
    assert!(decided_at >= enqueued, "the decision ({decided_at}) came before the backlog ({enqueued})");
    let scaled = wait_for("the Deployment's scaling Event", Duration::from_secs(30), || {
        let scaled = events(kube, &ns.name, "Deployment", "shop-worker", "ScalingReplicaSet")?;
        Ok(scaled.into_iter().find(|(_, note)| note.contains("to 10")))
    })?;
    // The Deployment controller's Events carry whole seconds.
    assert!(scaled.0 >= decided_at / 1_000_000 * 1_000_000, "{scaled:?} before the decision at {decided_at}");

    let tidepool = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?;
    let worker = &tidepool["status"]["worker"];
    assert_eq!(worker["desiredReplicas"], 10);
    assert_eq!(
        (&worker["lastScale"]["from"], &worker["lastScale"]["to"], &worker["lastScale"]["reason"]),
        (&json!(1), &json!(10), &json!("QueueBacklog"))
    );
    assert_eq!(
        tidepool["status"]["connections"]["plannedOfAvailable"], planned,
        "the plan is for maxReplicas: scaling does not move it"
    );
    let fields = kube.get_json(&["tidepool/shop", "-n", &ns.name, "--show-managed-fields"])?;
    let managers: Vec<&str> = fields["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["fieldsV1"]["f:spec"]["f:worker"]["f:replicas"].is_object())
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, ["tidepool-operator/scaler"], "who set the worker replicas");
    let metric = |series: &str| operator.metric(&series.replace("NS", &ns.name));
    assert_eq!(metric("tidepool_operator_scaling_decisions_total{direction=\"up\",tier=\"worker\"}")?, 1.0);
    wait_for("the desired gauge", Duration::from_secs(10), || {
        Ok((metric("tidepool_operator_tier_replicas{namespace=\"NS\",state=\"desired\",tidepool=\"shop\",tier=\"worker\"}")?
            == 10.0)
            .then_some(()))
    })?;
    assert!(metric("tidepool_operator_database_query_duration_seconds_count{outcome=\"ok\"}")? >= 2.0);
    assert_eq!(metric("tidepool_operator_database_connections_opened_total")?, 1.0, "one connection, kept");

    // Drained: down to the minimum, not before the down window.
    let drained = std::time::Instant::now();
    queue.drain()?;
    wait_worker_replicas(kube, &ns.name, 1, Duration::from_secs(60))?;
    assert!(
        drained.elapsed() >= Duration::from_secs(5),
        "down after {:?}, inside the window",
        drained.elapsed()
    );
    let down = events(kube, &ns.name, "Tidepool", "shop", "ScaledDown")?;
    assert_eq!(down.len(), 1, "{down:?}");
    assert!(down[0].1.starts_with("worker replicas 10 → 1 (QueuesIdle)"), "{down:?}");

    // Never outside [min, max]: every decision's target.
    for (_, note) in decided.iter().chain(&down) {
        let to: u32 = note
            .split(" → ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .context("a target")?;
        assert!((1..=12).contains(&to), "{note}");
    }
    Ok(())
}

#[test]
fn workers_scale_from_zero_when_a_job_arrives_and_to_zero_when_idle() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("scale-zero")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("scale_zero_{}", std::process::id()))?;
    let spec = tidepool(0, json!({"minReplicas": 0, "maxReplicas": 3}));
    let _operator = deploy(kube, &ns.name, &queue, &spec)?;
    wait_worker_replicas(kube, &ns.name, 0, Duration::from_secs(60))?;

    queue.enqueue(&jobs(1))?;
    wait_worker_replicas(kube, &ns.name, 1, Duration::from_secs(60))?;
    let tidepool = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?;
    assert_eq!(tidepool["status"]["worker"]["lastScale"]["reason"], "JobsWaiting", "{tidepool}");

    queue.drain()?;
    wait_worker_replicas(kube, &ns.name, 0, Duration::from_secs(60))?;
    let tidepool = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?;
    assert_eq!(tidepool["status"]["worker"]["lastScale"]["reason"], "QueuesIdle");
    assert_eq!(tidepool["spec"]["worker"]["replicas"], 0);
    Ok(())
}

#[test]
fn an_old_job_scales_up_under_the_count_target() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("scale-age")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("scale_age_{}", std::process::id()))?;
    let spec = tidepool(
        1,
        json!({"minReplicas": 1, "maxReplicas": 5, "queues": [{"name": "default",
               "targetAvailableJobsPerReplica": 1000, "maxOldestJobAgeSeconds": 30}]}),
    );
    let _operator = deploy(kube, &ns.name, &queue, &spec)?;
    wait_worker_replicas(kube, &ns.name, 1, Duration::from_secs(60))?;

    // Five jobs, far under the count target, due for a minute.
    let a_minute_ago = chrono::Utc::now() - chrono::Duration::seconds(60);
    let old: Vec<NewJob> = jobs(5).into_iter().map(|j| j.schedule(Schedule::At(a_minute_ago))).collect();
    queue.enqueue(&old)?;
    let tidepool = wait_for("the worker tier to grow", Duration::from_secs(60), || {
        let tidepool = get(kube, &ns.name, "tidepool/shop")?;
        Ok(tidepool.filter(|t| t["spec"]["worker"]["replicas"].as_i64().is_some_and(|r| r >= 2)))
    })?;
    let last = &tidepool["status"]["worker"]["lastScale"];
    wait_for("the status to record it", Duration::from_secs(30), || {
        let tidepool = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?;
        Ok((tidepool["status"]["worker"]["lastScale"]["reason"] == "OldestJobAge").then_some(()))
    })
    .with_context(|| format!("{last}"))?;
    let note = events(kube, &ns.name, "Tidepool", "shop", "ScaledUp")?;
    assert!(
        note.iter().any(|(_, n)| n.contains("the oldest available job of default has waited")),
        "{note:?}"
    );
    Ok(())
}

#[test]
fn the_database_going_away_holds_the_replicas_and_says_why() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("scale-dbaway")?;
    let private = PrivatePostgres::start("scale", 50)?;
    let queue = Queue::create(&private.postgres, "scale_away")?;
    let spec = tidepool(
        1,
        json!({"minReplicas": 1, "maxReplicas": 6,
               "queues": [{"name": "default", "targetAvailableJobsPerReplica": 100}]}),
    );
    let operator = deploy(kube, &ns.name, &queue, &spec)?;
    queue.enqueue(&jobs(300))?;
    wait_worker_replicas(kube, &ns.name, 3, Duration::from_secs(60))?;

    private.stop()?;
    let message = wait_condition(kube, &ns.name, "WorkerAutoscaling", "False", "QueuesUnreadable")?;
    assert!(message.contains("the worker replicas hold at 3"), "{message}");
    assert!(!message.contains(&queue.db.password), "no secret in status");
    // Failed readings, one a second, for longer than the down window (5 s):
    // still 3.
    let failed =
        || operator.metric("tidepool_operator_database_query_duration_seconds_count{outcome=\"error\"}");
    let before = failed()?;
    wait_for("readings to fail through a whole down window", Duration::from_secs(60), || {
        Ok((failed()? >= before + 7.0).then_some(()))
    })?;
    assert_eq!(deployment_replicas(kube, &ns.name)?, Some(3));
    let tidepool = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?;
    assert_eq!(tidepool["spec"]["worker"]["replicas"], 3);
    assert!(events(kube, &ns.name, "Tidepool", "shop", "ScaledDown")?.is_empty());

    // Back: read again, and scaling resumes.
    private.start_again()?;
    wait_condition(kube, &ns.name, "WorkerAutoscaling", "True", "QueuesRead")?;
    let queue = Queue {
        client: queue.runtime.block_on(async {
            let config: tokio_postgres::Config = queue.db.url(&queue.pg).parse()?;
            anyhow::Ok(tidepool::db::connect(config, Duration::from_secs(10)).await?)
        })?,
        ..queue
    };
    queue.drain()?;
    wait_worker_replicas(kube, &ns.name, 1, Duration::from_secs(60))?;
    let tidepool = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?;
    ensure!(condition(&tidepool, "WorkerAutoscaling").is_some_and(|(s, _, _)| s == "True"), "{tidepool}");
    Ok(())
}

#[test]
fn kubectl_scale_sets_the_web_tier_within_its_bounds() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("scale-web")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("scale_web_{}", std::process::id()))?;
    let mut spec: Value = serde_json::from_str(&tidepool(1, json!({"minReplicas": 1, "maxReplicas": 2})))?;
    spec["spec"]["web"] = json!({"replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}});
    let operator = deploy(kube, &ns.name, &queue, &spec.to_string())?;
    let web_replicas = |replicas: i64| {
        wait_for(&format!("the web Deployment at {replicas}"), Duration::from_secs(60), || {
            Ok((get(kube, &ns.name, "deployment/shop-web")?.and_then(|d| d["spec"]["replicas"].as_i64())
                == Some(replicas))
            .then_some(()))
        })
    };
    web_replicas(2)?;
    let planned = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?["status"]["connections"]
        ["plannedPeak"]
        .clone();
    assert_eq!(planned, json!((4 + 1) * 20 + 3 * 54), "web planned for its maximum");

    kube.kubectl(&["scale", "-n", &ns.name, "tidepool/shop", "--replicas=4"], None)?;
    web_replicas(4)?;
    let tidepool = wait_for("the status to record the change", Duration::from_secs(30), || {
        let tidepool = get(kube, &ns.name, "tidepool/shop")?.context("the Tidepool")?;
        Ok((tidepool["status"]["web"]["lastScale"]["to"] == 4).then_some(tidepool))
    })?;
    let last = &tidepool["status"]["web"]["lastScale"];
    assert_eq!((&last["from"], &last["reason"]), (&json!(2), &json!("ReplicasChanged")));
    assert!(
        last["message"].as_str().is_some_and(|m| m.contains("kubectl") && m.contains("scale subresource")),
        "{last}"
    );
    assert_eq!(tidepool["status"]["connections"]["plannedPeak"], planned, "the plan holds");
    let up = events(kube, &ns.name, "Tidepool", "shop", "ScaledUp")?;
    assert!(up.iter().any(|(_, n)| n.starts_with("web replicas 2 → 4")), "{up:?}");
    assert_eq!(
        operator.metric("tidepool_operator_scaling_decisions_total{direction=\"up\",tier=\"web\"}")?,
        1.0
    );

    // Outside the bounds: refused, with the rule's message; nothing moves.
    let refused = kube.kubectl_output(&["scale", "-n", &ns.name, "tidepool/shop", "--replicas=9"], None)?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("web.replicas must be within [autoscaling.minReplicas, autoscaling.maxReplicas]"),
        "{stderr}"
    );
    web_replicas(4)?;

    kube.kubectl(&["scale", "-n", &ns.name, "tidepool/shop", "--replicas=1"], None)?;
    web_replicas(1)?;
    Ok(())
}
