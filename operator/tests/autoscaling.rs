//! The operator's scaling against the real API server of `make test` (the
//! kwok node: pods are scheduled and report Ready, nothing runs in them)
//! and a real PostgreSQL: the queue scaler reads a real jobs table, as a
//! role that may only read it, and sets the worker replicas; the web tier
//! follows its scale subresource. Jobs are enqueued and drained by the
//! tests themselves, since no worker runs.

mod common;

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use common::{
    condition, get, kube_with_crd, set_query, wait_condition, wait_condition_containing, Operator, Queue,
};
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

/// Waits until the Tidepool's status says its worker tier was last scaled
/// for `reason`; the Tidepool then.
fn wait_last_scale(kube: &Kube, ns: &str, reason: &str) -> Result<Value> {
    wait_for(&format!("the status to say the workers scaled for {reason}"), Duration::from_secs(30), || {
        let tidepool = get(kube, ns, "tidepool/shop")?.context("the Tidepool")?;
        Ok((tidepool["status"]["worker"]["lastScale"]["reason"] == reason).then_some(tidepool))
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
    deploy_until(kube, ns, queue, spec, "QueuesRead")
}

/// Starts the operator and the Tidepool in `ns`; waits until the scaler's
/// condition is True for `reason`.
fn deploy_until(kube: &Kube, ns: &str, queue: &Queue, spec: &str, reason: &str) -> Result<Operator> {
    let operator = Operator::start(ns)?;
    kube.kubectl(&["apply", "-n", ns, "-f", "-"], Some(&format!("{}\n---\n{spec}", queue.secrets())))?;
    wait_condition(kube, ns, "WorkerAutoscaling", "True", reason)?;
    Ok(operator)
}

/// The app's own backlog table `backlog` (one row per task not yet done,
/// as the Django example keeps it), readable by the scaler's role, and a
/// table `private` it may not read.
fn backlog_table(queue: &Queue) -> Result<()> {
    let name = &queue.db.name;
    queue.pg.psql(
        name,
        &format!(
            "SET ROLE {name}; CREATE TABLE backlog (id bigserial PRIMARY KEY); CREATE TABLE private (id int);
             RESET ROLE; GRANT SELECT ON backlog TO {name}_scaler"
        ),
    )?;
    Ok(())
}

/// Sets the backlog table to `rows` rows.
fn set_backlog(queue: &Queue, rows: u32) -> Result<()> {
    queue.pg.psql(
        &queue.db.name,
        &format!(
            "BEGIN; DELETE FROM backlog; INSERT INTO backlog SELECT FROM generate_series(1, {rows}); COMMIT"
        ),
    )?;
    Ok(())
}

/// A worker tier between 0 and 6 replicas on the rows of `backlog`, 10 per
/// replica.
fn query_tidepool() -> String {
    tidepool(
        0,
        json!({"minReplicas": 0, "maxReplicas": 6,
               "query": {"sql": "SELECT count(*) FROM backlog", "targetValuePerReplica": 10}}),
    )
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
    // The status follows the Deployment: it is written at the end of the
    // reconcile that applied it.
    wait_last_scale(kube, &ns.name, "JobsWaiting")?;

    queue.drain()?;
    wait_worker_replicas(kube, &ns.name, 0, Duration::from_secs(60))?;
    let tidepool = wait_last_scale(kube, &ns.name, "QueuesIdle")?;
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
fn a_query_scales_the_workers_up_and_back_down_after_the_window() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("scale-query")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("scale_query_{}", std::process::id()))?;
    backlog_table(&queue)?;
    let operator = deploy_until(kube, &ns.name, &queue, &query_tidepool(), "QueryRead")?;
    let message = wait_condition(kube, &ns.name, "WorkerAutoscaling", "True", "QueryRead")?;
    assert_eq!(
        message,
        "the query (statement timeout 5 s) is read every 1 s with the credentials of the Secret shop-scaler; worker replicas 0..6"
    );
    wait_worker_replicas(kube, &ns.name, 0, Duration::from_secs(60))?;

    let filled = now_micros()?;
    set_backlog(&queue, 35)?;
    wait_worker_replicas(kube, &ns.name, 4, Duration::from_secs(60))?;
    let up = events(kube, &ns.name, "Tidepool", "shop", "ScaledUp")?;
    let (decided_at, note) = up.last().context("a ScaledUp Event on the Tidepool")?.clone();
    assert_eq!(note, "worker replicas 0 → 4 (ValueAboveTarget): the query returned 35, at 10 per replica");
    assert!(decided_at >= filled, "the decision ({decided_at}) came before the backlog ({filled})");
    let tidepool = wait_last_scale(kube, &ns.name, "ValueAboveTarget")?;
    assert_eq!(tidepool["spec"]["worker"]["replicas"], 4);
    assert_eq!(
        operator.metric("tidepool_operator_scaling_decisions_total{direction=\"up\",tier=\"worker\"}")?,
        1.0
    );

    // Emptied: down to the minimum, not before the down window (5 s).
    let emptied = std::time::Instant::now();
    set_backlog(&queue, 0)?;
    wait_worker_replicas(kube, &ns.name, 0, Duration::from_secs(60))?;
    assert!(
        emptied.elapsed() >= Duration::from_secs(5),
        "down after {:?}, inside the window",
        emptied.elapsed()
    );
    let down = events(kube, &ns.name, "Tidepool", "shop", "ScaledDown")?;
    assert_eq!(
        down.iter().map(|(_, note)| note.as_str()).collect::<Vec<_>>(),
        ["worker replicas 4 → 0 (ValueIdle): the query returned 0, at or below the activation value 0"]
    );
    wait_last_scale(kube, &ns.name, "ValueIdle")?;
    assert_eq!(
        operator.metric("tidepool_operator_database_connections_opened_total")?,
        1.0,
        "one connection, kept"
    );
    Ok(())
}

#[test]
fn a_query_that_fails_or_runs_past_its_timeout_holds_the_replicas() -> Result<()> {
    let kube = kube_with_crd()?;
    let ns = kube.namespace("scale-query-fail")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("scale_query_fail_{}", std::process::id()))?;
    backlog_table(&queue)?;
    let operator = deploy_until(kube, &ns.name, &queue, &query_tidepool(), "QueryRead")?;
    set_backlog(&queue, 25)?;
    wait_worker_replicas(kube, &ns.name, 3, Duration::from_secs(60))?;
    let failed =
        || operator.metric("tidepool_operator_database_query_duration_seconds_count{outcome=\"error\"}");

    // A table the scaler's role may not read; the backlog gone meanwhile,
    // so a reading that worked would take the tier down.
    set_query(kube, &ns.name, "SELECT count(*) FROM private", 5)?;
    let message = wait_condition(kube, &ns.name, "WorkerAutoscaling", "False", "QueryFailed")?;
    assert!(message.contains("permission denied for table private"), "{message}");
    assert!(message.contains("the worker replicas hold at 3"), "{message}");
    assert!(!message.contains(&queue.db.password), "no secret in status");
    set_backlog(&queue, 0)?;
    let before = failed()?;
    wait_for("readings to fail through a whole down window", Duration::from_secs(60), || {
        Ok((failed()? >= before + 7.0).then_some(()))
    })?;
    assert_eq!(deployment_replicas(kube, &ns.name)?, Some(3));

    // A statement past its timeout: cancelled by the server, the same hold.
    set_query(kube, &ns.name, "SELECT count(*) FROM backlog, pg_sleep(30)", 1)?;
    let message = wait_condition_containing(
        kube,
        &ns.name,
        ("WorkerAutoscaling", "False", "QueryFailed"),
        "statement timeout of 1 s",
    )?;
    assert!(message.contains("ran past its statement timeout of 1 s and was cancelled"), "{message}");
    let before = failed()?;
    wait_for("slow readings through a whole down window", Duration::from_secs(60), || {
        Ok((failed()? >= before + 4.0).then_some(()))
    })?;
    assert_eq!(deployment_replicas(kube, &ns.name)?, Some(3));
    assert!(events(kube, &ns.name, "Tidepool", "shop", "ScaledDown")?.is_empty());
    let sleeping = queue.pg.psql(
        &queue.db.name,
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()",
    )?;
    assert!(sleeping.trim() == "0" || sleeping.trim() == "1", "at most the reading under way: {sleeping}");

    // Mended: read again, and the tier follows the empty backlog.
    set_query(kube, &ns.name, "SELECT count(*) FROM backlog", 5)?;
    wait_condition(kube, &ns.name, "WorkerAutoscaling", "True", "QueryRead")?;
    wait_worker_replicas(kube, &ns.name, 0, Duration::from_secs(60))?;
    // One connection per statement set (a new setting restarts the
    // scaler): a statement that failed, even by its timeout, kept it.
    assert_eq!(
        operator.metric("tidepool_operator_database_connections_opened_total")?,
        4.0,
        "a login per setting, none per failed reading"
    );
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

/// Appends `figures` as a JSON line to the file named by
/// `TIDEPOOL_SCALING_FIGURES`, when set (scripts/bench-autoscaling.sh).
fn record_figures(name: &str, figures: Value) -> Result<()> {
    let Ok(path) = std::env::var("TIDEPOOL_SCALING_FIGURES") else { return Ok(()) };
    let line = json!({"name": name, "figures": figures}).to_string();
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes())?;
    Ok(())
}

/// The `q`-quantile of a Prometheus histogram's cumulative buckets
/// `(upper bound, count)`, interpolated within its bucket as
/// `histogram_quantile` does.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, c)| *c);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return lower.0;
            }
            let within = if count > lower.1 { (rank - lower.1) / (count - lower.1) } else { 1.0 };
            return lower.0 + (bound - lower.0) * within;
        }
        lower = (bound, count);
    }
    lower.0
}

/// The operator's readings of the queues: count, and the buckets of their
/// duration, from its `/metrics`.
fn readings(operator: &Operator) -> Result<(f64, Vec<(f64, f64)>)> {
    let (_, body) = operator.get("/metrics")?;
    let prefix = "tidepool_operator_database_query_duration_seconds_bucket{outcome=\"ok\",le=\"";
    let mut buckets = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(prefix) else { continue };
        let Some((bound, rest)) = rest.split_once("\"} ") else { continue };
        let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse()? };
        buckets.push((bound, rest.trim().parse()?));
    }
    let count = operator.metric("tidepool_operator_database_query_duration_seconds_count{outcome=\"ok\"}")?;
    ensure!(
        buckets.len() > 2 && buckets.last().is_some_and(|(_, c)| *c == count),
        "the buckets of {count} readings: {buckets:?}"
    );
    Ok((count, buckets))
}

/// The time until the worker Deployment's `spec.replicas` is a number,
/// read every 10 ms through the API (the benchmarks' clock).
struct ReplicaTimer<'a> {
    queue: &'a Queue,
    deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment>,
}

impl<'a> ReplicaTimer<'a> {
    fn new(queue: &'a Queue, ns: &str) -> Result<Self> {
        let client = queue.runtime.block_on(kube::Client::try_default())?;
        Ok(ReplicaTimer { queue, deployments: kube::Api::namespaced(client, ns) })
    }

    /// From `since` until `wanted` replicas (at most 60 s).
    fn since(&self, wanted: i32, since: std::time::Instant) -> Result<Duration> {
        self.queue.runtime.block_on(async {
            loop {
                let deployment = self.deployments.get_opt("shop-worker").await?;
                if deployment.and_then(|d| d.spec).and_then(|s| s.replicas) == Some(wanted) {
                    return anyhow::Ok(since.elapsed());
                }
                ensure!(since.elapsed() < Duration::from_secs(60), "no {wanted} replicas within 60 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }
}

/// Benchmark (scripts/bench-autoscaling.sh): from a backlog committed to
/// the worker Deployment's replicas set, 20 times. Readings every second,
/// no stabilization window: the mechanism's own delay (reading, decision,
/// Event, the Tidepool's patch, the reconcile, the Deployment); a spec's
/// up window and polling interval add to it.
#[test]
#[ignore = "a benchmark: scripts/bench-autoscaling.sh"]
fn bench_backlog_to_target_replicas() -> Result<()> {
    let trials: usize =
        std::env::var("TIDEPOOL_BENCH_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(20);
    let kube = kube_with_crd()?;
    let ns = kube.namespace("bench-backlog")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("bench_backlog_{}", std::process::id()))?;
    let spec = tidepool(
        1,
        json!({"minReplicas": 1, "maxReplicas": 12, "scaleUpStabilizationSeconds": 0,
               "scaleDownStabilizationSeconds": 0,
               "queues": [{"name": "default", "targetAvailableJobsPerReplica": 1000}]}),
    );
    let _operator = deploy(kube, &ns.name, &queue, &spec)?;
    let timer = ReplicaTimer::new(&queue, &ns.name)?;
    let replicas = |wanted: i32| timer.since(wanted, std::time::Instant::now());
    replicas(1)?;
    let mut seconds = Vec::new();
    for trial in 0..trials {
        // The backlog at a different moment of the scaler's 1 s cycle each
        // time (the trials would otherwise start in step with it).
        std::thread::sleep(Duration::from_millis((trial as u64 * 379) % 1000));
        queue.enqueue(&jobs(10_000))?;
        seconds.push(replicas(10)?.as_secs_f64());
        queue.drain()?;
        replicas(1)?;
    }
    seconds.sort_by(f64::total_cmp);
    let at = |q: f64| seconds[((seconds.len() - 1) as f64 * q).round() as usize];
    eprintln!("backlog to 10 replicas over {trials} trials: p50 {:.3} s, p99 {:.3} s", at(0.5), at(0.99));
    record_figures("backlog", json!({"trials": trials, "seconds": seconds, "p50": at(0.5), "p99": at(0.99)}))
}

/// Benchmark (scripts/bench-autoscaling.sh, right after the queues'): the
/// same for the SQL signal, `TIDEPOOL_BENCH_QUERY_TRIALS` (10) times: 100
/// rows committed to a table of the app's own, `SELECT count(*) FROM
/// backlog` at 10 per replica, so 1 → 10; readings every second, no
/// stabilization window.
#[test]
#[ignore = "a benchmark: scripts/bench-autoscaling.sh"]
fn bench_query_backlog_to_target_replicas() -> Result<()> {
    let trials: usize =
        std::env::var("TIDEPOOL_BENCH_QUERY_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(10);
    let kube = kube_with_crd()?;
    let ns = kube.namespace("bench-query")?;
    let queue = Queue::create(&Postgres::from_env()?, &format!("bench_query_{}", std::process::id()))?;
    backlog_table(&queue)?;
    let spec = tidepool(
        1,
        json!({"minReplicas": 1, "maxReplicas": 12, "scaleUpStabilizationSeconds": 0,
               "scaleDownStabilizationSeconds": 0,
               "query": {"sql": "SELECT count(*) FROM backlog", "targetValuePerReplica": 10}}),
    );
    let _operator = deploy_until(kube, &ns.name, &queue, &spec, "QueryRead")?;
    let timer = ReplicaTimer::new(&queue, &ns.name)?;
    let replicas = |wanted: i32, since: std::time::Instant| timer.since(wanted, since);
    let run = |sql: &str| queue.runtime.block_on(queue.client.batch_execute(sql));
    replicas(1, std::time::Instant::now())?;
    let mut seconds = Vec::new();
    for trial in 0..trials {
        // The rows at a different moment of the scaler's 1 s cycle each time.
        std::thread::sleep(Duration::from_millis((trial as u64 * 379) % 1000));
        run("INSERT INTO backlog SELECT FROM generate_series(1, 100)")?;
        let committed = std::time::Instant::now();
        seconds.push(replicas(10, committed)?.as_secs_f64());
        run("DELETE FROM backlog")?;
        replicas(1, std::time::Instant::now())?;
    }
    seconds.sort_by(f64::total_cmp);
    let at = |q: f64| seconds[((seconds.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "query backlog to 10 replicas over {trials} trials: p50 {:.3} s, p99 {:.3} s",
        at(0.5),
        at(0.99)
    );
    record_figures(
        "query_backlog",
        json!({"trials": trials, "seconds": seconds, "p50": at(0.5), "p99": at(0.99)}),
    )
}

/// Benchmark (scripts/bench-autoscaling.sh): a steady load whose backlog
/// wavers around a threshold (260 to 340 available jobs, anew each second;
/// 100 per replica: 3 or 4 replicas by each reading, its peaks needing 4),
/// for `TIDEPOOL_BENCH_STEADY_SECONDS`
/// (600), on two Tidepools side by side: the default windows (up 15 s,
/// down 300 s) and none. Counts their replica changes, and the operator's
/// readings per minute and their p99.
#[test]
#[ignore = "a benchmark: scripts/bench-autoscaling.sh"]
fn bench_steady_load_near_a_threshold() -> Result<()> {
    let seconds: u64 =
        std::env::var("TIDEPOOL_BENCH_STEADY_SECONDS").ok().and_then(|t| t.parse().ok()).unwrap_or(600);
    let kube = kube_with_crd()?;
    let pg = Postgres::from_env()?;
    let settings = [
        ("default windows", json!({})),
        ("no windows", json!({"scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0})),
    ];
    let mut shops = Vec::new();
    for (i, (name, windows)) in settings.iter().enumerate() {
        let ns = kube.namespace("bench-steady")?;
        let queue = Queue::create(&pg, &format!("bench_steady_{}_{i}", std::process::id()))?;
        let mut autoscaling = json!({"minReplicas": 1, "maxReplicas": 8, "pollingIntervalSeconds": 10,
            "scaleUpStabilizationSeconds": 15, "scaleDownStabilizationSeconds": 300,
            "queues": [{"name": "default", "targetAvailableJobsPerReplica": 100}]});
        common::merge(&mut autoscaling, windows);
        let mut spec: Value = serde_json::from_str(&tidepool(3, json!({})))?;
        spec["spec"]["worker"]["autoscaling"] = autoscaling;
        let operator = deploy(kube, &ns.name, &queue, &spec.to_string())?;
        wait_worker_replicas(kube, &ns.name, 3, Duration::from_secs(60))?;
        shops.push((*name, ns, queue, operator));
    }
    let started = std::time::Instant::now();
    let mut step: u64 = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        // 260 to 340 each second, pseudo-random, the same for both.
        step += 1;
        let level = 300 + ((step.wrapping_mul(2_654_435_761) >> 7) % 81) as i64 - 40;
        for (_, _, queue, _) in &shops {
            let count: i64 = queue.pg.psql(&queue.db.name, "SELECT count(*) FROM tidepool_jobs")?.parse()?;
            if level > count {
                let missing = usize::try_from(level - count)?;
                queue.enqueue(&jobs(missing))?;
            } else if level < count {
                queue.pg.psql(
                    &queue.db.name,
                    &format!("DELETE FROM tidepool_jobs WHERE id IN (SELECT id FROM tidepool_jobs ORDER BY id LIMIT {})", count - level),
                )?;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let mut results = Vec::new();
    for (name, ns, _, operator) in &shops {
        let changes = events(kube, &ns.name, "Tidepool", "shop", "ScaledUp")?.len()
            + events(kube, &ns.name, "Tidepool", "shop", "ScaledDown")?.len();
        let decisions = operator
            .metric("tidepool_operator_scaling_decisions_total{direction=\"up\",tier=\"worker\"}")?
            + operator
                .metric("tidepool_operator_scaling_decisions_total{direction=\"down\",tier=\"worker\"}")?;
        let (count, buckets) = readings(operator)?;
        let replicas = deployment_replicas(kube, &ns.name)?;
        eprintln!(
            "{name}: {decisions} replica changes ({changes} distinct Events) in {minutes:.1} min; {:.1} readings/min, p99 {:.2} ms",
            count / minutes,
            histogram_quantile(0.99, &buckets) * 1000.0
        );
        results.push(json!({"name": name, "decisions": decisions, "events": changes, "minutes": minutes,
            "readings_per_minute": count / minutes, "p50_ms": histogram_quantile(0.5, &buckets) * 1000.0,
            "p99_ms": histogram_quantile(0.99, &buckets) * 1000.0, "final_replicas": replicas}));
    }
    record_figures("steady", json!(results))
}
