//! The product's promises on pods that really run (scripts/kube-node.sh),
//! with PgBouncer sidecars the operator sized, against a PostgreSQL outside
//! the cluster: the seed's experiments through Kubernetes, the connection
//! budget under overload with `max_connections` at exactly the budget, a
//! rolling update under load, and faults (a worker killed or deleted, the
//! sidecar killed, PostgreSQL restarted); and the dashboards' queries,
//! against a real Prometheus scraping those pods under a workload.
//!
//! Every client runs on loopback or inside the node's network namespace
//! (`tidepool-loadgen` with the cluster's ranges, `curl`), and every load
//! is bounded in count and time. Timing targets are the benchmark's
//! (scripts/bench-e2e.sh); these tests assert what must always hold.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::shop::{
    jobs_span_seconds, record_figures, status_count, watch_shares, Database, Load, Overload, Setup, Shop,
    SpanFrom,
};
use serde_json::{json, Value};
use tidepool_testenv::node::{
    output, path_arg, peak, pod_processes, release_binary, Postgres, PrivatePostgres, Sampler,
};
use tidepool_testenv::prometheus::Prometheus;
use tidepool_testenv::wait_for;

/// The example application under the operator, from its own image
/// (examples/shop, built by `make images`), as a team's image would run:
/// its migration Job applies both tracks, an order through the web Service
/// gets its receipt from the worker pod, and under 20 clients ordering for
/// 30 s the app's connections stay within the budget's `available`,
/// every order written gets its receipt.
#[test]
fn the_shop_example_runs_under_the_operator_from_its_own_image() -> Result<()> {
    let pg = Postgres::from_env()?;
    let shop = Shop::deploy(
        &pg,
        "example",
        json!({
            "image": "localhost/tidepool-shop:0.1.0",
            "database": {"maxConnections": 200, "reservedConnections": 10},
            "web": {"replicas": 1, "concurrency": 200, "databasePool": 10},
            "worker": {"replicas": 1, "concurrency": 20}
        }),
        None,
    )?;
    let tracks = shop.sql("SELECT track || '/' || version FROM tidepool_schema_migrations ORDER BY 1")?;
    let tracks: Vec<&str> = tracks.lines().collect();
    assert!(tracks.contains(&"shop/1") && tracks.contains(&"tidepool/1"), "both tracks applied: {tracks:?}");

    let url = shop.web_url("/orders")?;
    let order =
        r#"{"customer": "ada@example.com", "items": [{"sku": "tea", "quantity": 2, "price_cents": 450}]}"#;
    let (code, created) =
        shop.node.curl(&["-X", "POST", "-H", "content-type: application/json", "-d", order, &url])?;
    ensure!(code == 201, "POST /orders: {code} {created}");
    let id = serde_json::from_str::<Value>(&created)?["id"].as_i64().context("an order id")?;
    let order_url = shop.web_url(&format!("/orders/{id}"))?;
    wait_for("the order's receipt from the worker pod", Duration::from_secs(60), || {
        let (code, shown) = shop.node.curl(&[&order_url])?;
        let shown: Value = serde_json::from_str(&shown).unwrap_or_default();
        Ok((code == 200 && shown["receipt"]["state"] == "sent").then_some(()))
    })
    .with_context(|| shop.describe())?;

    let available = shop.tidepool()?["status"]["connections"]["available"].as_i64().context("available")?;
    let sampler = Sampler::start(&shop.pg, &shop.db.name, &shop.db.connections_sql());
    let load = Load::steady_posting(&shop.node, &url, 20, "10s", Some(order))?;
    // The load's length (30 s of orders), not a wait for something to happen.
    std::thread::sleep(Duration::from_secs(30));
    let report = load.finish()?;
    let samples = sampler.finish()?;
    let peak = peak(&samples);
    assert!(peak <= available, "the app's connections stay within the budget: {peak} of {available}");
    let placed = status_count(&report, "201");
    assert!(placed > 0, "orders were placed: {report}");
    assert_eq!(
        placed + status_count(&report, "503"),
        report["requests"].as_i64().unwrap_or(-1),
        "every order placed or shed with 503, nothing else: {report}"
    );
    assert_eq!(shop.count("SELECT count(*) FROM shop_order")?, placed + 1, "each 201 is one order: {report}");
    wait_for("every order's receipt", Duration::from_secs(300), || {
        Ok((shop.count("SELECT count(*) FROM shop_order WHERE receipt_sent_at IS NULL")? == 0).then_some(()))
    })
    .with_context(|| shop.describe())?;
    record_figures("shop", json!({"orders": placed, "connections_peak": peak, "available": available}))?;
    Ok(())
}

/// The seed's two experiments through Kubernetes: ten slow requests through
/// the web Service run at once, and a hundred slow jobs run fifty at a time
/// in one worker pod of concurrency 50.
#[test]
fn the_seeds_experiments_run_through_the_web_service_and_a_worker_pod() -> Result<()> {
    let pg = Postgres::from_env()?;
    let shop = Shop::deploy(
        &pg,
        "seed",
        json!({
            "database": {"maxConnections": 200, "reservedConnections": 10},
            "web": {"replicas": 1, "concurrency": 100, "databasePool": 10},
            "worker": {"replicas": 1, "concurrency": 50}
        }),
        None,
    )?;

    let sleeping = Sampler::start(&shop.pg, &shop.db.name, &shop.db.sleeping_sql());
    let report = Load::burst(&shop.node, &shop.web_url("/slow-query/?seconds=5")?, 10, "60s")?.finish()?;
    let samples = sleeping.finish()?;
    assert_eq!(report["succeeded"], 10, "{report}");
    let together = peak(&samples);
    assert_eq!(together, 10, "the ten requests' queries run at once: {report}");

    let sampler = Sampler::start(&shop.pg, &shop.db.name, &shop.db.sleeping_sql());
    shop.enqueue("slow_query", r#"{"seconds": 5}"#, 100)?;
    wait_for("50 slow jobs at once", Duration::from_secs(60), || {
        Ok((shop.count(&shop.db.sleeping_sql())? >= 50).then_some(()))
    })?;
    let finished = shop.wait_drained(Duration::from_secs(120))?;
    let samples = sampler.finish()?;
    assert_eq!(finished, BTreeMap::from([("succeeded".to_owned(), 100)]));
    let peak = peak(&samples);
    assert!(peak <= 50, "at most the worker's concurrency runs at once: {peak}");
    record_figures(
        "seed",
        json!({
            "requests_seconds": report["total_seconds"], "requests_peak": together,
            "jobs_seconds": jobs_span_seconds(&shop, SpanFrom::Created)?,
            "jobs_run_seconds": jobs_span_seconds(&shop, SpanFrom::Started)?, "jobs_peak": peak,
        }),
    )?;
    Ok(())
}

/// PostgreSQL's `max_connections` is exactly `reserved + available`, both
/// tiers run at their replicas, and the load offered asks for more than
/// twice the planned server connections: PostgreSQL never refuses a
/// connection, the app's connections stay within the plan, and the excess
/// is shed or waits, bounded.
#[test]
fn the_connection_budget_holds_under_overload() -> Result<()> {
    let (max_connections, reserved) = (60, 10);
    let private = PrivatePostgres::start("budget", max_connections)?;
    let shop = Shop::deploy(
        &private.postgres,
        "budget",
        json!({
            "database": {"maxConnections": max_connections, "reservedConnections": reserved},
            "web": {"replicas": 2, "concurrency": 200, "databasePool": 20},
            "worker": {"replicas": 2, "concurrency": 20}
        }),
        None,
    )?;
    let status = shop.tidepool()?["status"].clone();
    let planned = status["connections"]["plannedPeak"].as_i64().context("plannedPeak")?;
    let available = status["connections"]["available"].as_i64().context("available")?;
    assert_eq!(available, i64::from(max_connections - reserved), "{status}");
    assert!(planned <= available, "{status}");
    let web_share = status["web"]["serverConnectionsPerPod"].as_i64().context("web share")?;
    let worker_share = status["worker"]["serverConnectionsPerPod"].as_i64().context("worker share")?;

    let connections = Sampler::start(&shop.pg, &shop.db.name, &shop.db.connections_sql());
    let requests = 200;
    let burst = Load::burst(&shop.node, &shop.web_url("/slow-query/?seconds=1")?, requests, "120s")?;
    shop.enqueue("slow_query", r#"{"seconds": 1}"#, 100)?;
    let report = burst.finish()?;
    let finished = shop.wait_drained(Duration::from_secs(180))?;
    let jobs_seconds = jobs_span_seconds(&shop, SpanFrom::Created)?;
    let samples = connections.finish()?;

    let (peak, ok, shed) = Overload {
        requests: requests as i64,
        // Jobs offered at once: 2 worker pods × concurrency 20.
        offered: requests as i64 + 2 * 20,
        planned,
        server_log: &shop.pg.log()?,
        samples: &samples,
        report: &report,
    }
    .assert_held();
    assert_eq!(finished, BTreeMap::from([("succeeded".to_owned(), 100)]));
    record_figures(
        "budget",
        json!({
            "requests": requests, "ok": ok, "shed": shed, "burst": report,
            "jobs": 100, "jobs_seconds": jobs_seconds,
            "peak": peak, "planned": planned, "available": available, "max_connections": max_connections,
            "web_share": web_share, "worker_share": worker_share, "live_pods": 2 * web_share + 2 * worker_share,
        }),
    )?;
    Ok(())
}

/// Twenty clients send requests through the web Service for the whole
/// rollout of a change of web concurrency: none fails, and the shares of
/// the pods alive at once (old ones draining, new ones starting) never pass
/// `available`.
#[test]
fn a_rolling_update_under_load_fails_no_request() -> Result<()> {
    let pg = Postgres::from_env()?;
    let shop = Shop::deploy(
        &pg,
        "rollout",
        json!({
            "database": {"maxConnections": 60, "reservedConnections": 10},
            "web": {"replicas": 2, "concurrency": 100, "databasePool": 10},
            "worker": {"replicas": 1, "concurrency": 4}
        }),
        None,
    )?;
    let available = shop.tidepool()?["status"]["connections"]["available"].as_i64().context("available")?;
    let old_pods: Vec<String> =
        shop.pods("web")?.iter().filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned)).collect();
    let shares = watch_shares(&shop)?;
    let load = Load::steady(&shop.node, &shop.web_url("/row/")?, 20, "30s")?;

    let patched = Instant::now();
    shop.kube.kubectl(
        &[
            "patch",
            "-n",
            &shop.ns.name,
            "tidepool/shop",
            "--type=merge",
            "-p",
            r#"{"spec":{"web":{"concurrency":150}}}"#,
        ],
        None,
    )?;
    let generation = shop.tidepool()?["metadata"]["generation"].as_i64().context("generation")?;
    shop.wait_ready(generation)?;
    wait_for("the old web pods to be gone", Duration::from_secs(120), || {
        let names: Vec<String> = shop
            .pods("web")?
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        Ok(names.iter().all(|n| !old_pods.contains(n)).then_some(()))
    })
    .with_context(|| shop.describe())?;
    let rollout_seconds = patched.elapsed().as_secs_f64();
    let report = load.finish()?;
    record_figures(
        "rollout",
        json!({"rollout_seconds": rollout_seconds, "load": report, "peak_shares": shares.figure(), "available": available}),
    )?;

    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["requests"].as_i64().unwrap_or(0) >= 100, "{report}");
    let peak = shares.figure();
    assert!(peak > 0 && peak <= available, "live shares peaked at {peak}, available {available}");
    for pod in shop.pods("web")? {
        let env = pod["spec"]["containers"][0]["env"].as_array().cloned().unwrap_or_default();
        let in_flight =
            env.iter().find(|e| e["name"] == "TIDEPOOL_MAX_IN_FLIGHT").map(|e| e["value"].clone());
        assert_eq!(in_flight, Some(json!("150")), "{pod}");
    }
    Ok(())
}

/// The ids of jobs in state `running`, at least `at_least` of them.
fn wait_running(shop: &Shop, at_least: usize) -> Result<Vec<i64>> {
    wait_for(&format!("{at_least} jobs running"), Duration::from_secs(60), || {
        let ids: Vec<i64> = shop
            .sql("SELECT id FROM tidepool_jobs WHERE state = 'running' ORDER BY id")?
            .lines()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        Ok((ids.len() >= at_least).then_some(ids))
    })
}

fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// kill -9 of the worker container while it runs jobs: the kubelet
/// restarts it, the jobs it held run again once their lease expires, none
/// is lost. Deleting the worker pod while its jobs run: it hands them back
/// when its shutdown deadline passes (no lease wait, no failed attempt),
/// its replacement runs them, none is lost.
#[test]
fn a_killed_or_deleted_worker_loses_no_job() -> Result<()> {
    let pg = Postgres::from_env()?;
    let shop = Shop::deploy(
        &pg,
        "worker-faults",
        json!({
            "database": {"maxConnections": 80, "reservedConnections": 10},
            "web": {"replicas": 1, "concurrency": 10, "databasePool": 2},
            "worker": {"replicas": 1, "concurrency": 12}
        }),
        None,
    )?;

    // kill -9.
    shop.enqueue("slow_query", r#"{"seconds": 5}"#, 20)?;
    let held = wait_running(&shop, 10)?;
    let pod = shop.pods("worker")?.into_iter().next().context("a worker pod")?;
    let uid = pod["metadata"]["uid"].as_str().context("uid")?;
    let app =
        pod_processes(uid)?.into_iter().find(|p| p.comm == "tidepool").context("the worker's process")?;
    let killed_at = Instant::now();
    let killed = output(Command::new("kill").args(["-KILL", &app.pid.to_string()]))?;
    ensure!(killed.status.success(), "kill: {}", String::from_utf8_lossy(&killed.stderr));
    // Held at the kill: running before it and still running after it
    // (nothing else may run them until their lease expires).
    let still_running = wait_running(&shop, 0)?;
    let held: Vec<i64> = held.into_iter().filter(|id| still_running.contains(id)).collect();
    ensure!(held.len() >= 10, "the worker was killed holding {} jobs", held.len());
    let finished = shop.wait_drained(Duration::from_secs(180)).with_context(|| shop.describe())?;
    let kill_drained_seconds = killed_at.elapsed().as_secs_f64();
    assert_eq!(finished, BTreeMap::from([("succeeded".to_owned(), 20)]), "none lost");
    let rerun = shop.count(&format!(
        "SELECT count(*) FROM tidepool_job_results WHERE id IN ({}) AND attempts = 2 \
         AND errors::text LIKE '%lease expired%'",
        id_list(&held)
    ))?;
    assert_eq!(rerun, held.len() as i64, "every job the killed worker held ran again after its lease");
    let worker_app = format!("{}/worker", pod["metadata"]["name"].as_str().unwrap_or_default());
    let restarts = shop.wait_restarted(&worker_app, 1)?;
    assert_eq!(restarts.get(&worker_app), Some(&1), "{restarts:?}");

    // A pod deleted gracefully.
    shop.sql("TRUNCATE tidepool_job_results")?;
    shop.enqueue("slow_query", r#"{"seconds": 35}"#, 12)?;
    let held = wait_running(&shop, 10)?;
    let name = pod["metadata"]["name"].as_str().context("name")?;
    let deleted_at = Instant::now();
    let deleted_at_db = shop.sql("SELECT now()")?;
    shop.kube.kubectl(&["delete", "pod", "-n", &shop.ns.name, name, "--wait=false"], None)?;
    let finished = shop.wait_drained(Duration::from_secs(180)).with_context(|| shop.describe())?;
    let delete_drained_seconds = deleted_at.elapsed().as_secs_f64();
    assert_eq!(finished, BTreeMap::from([("succeeded".to_owned(), 12)]), "none lost");
    // Handed back at the shutdown deadline (20 s, before any of these 35 s
    // jobs could finish) and run again by the next pod: the attempt it ran
    // is not counted and no error is recorded, which a lease's expiry
    // always does.
    let handed_back = shop.count(&format!(
        "SELECT count(*) FROM tidepool_job_results WHERE id IN ({}) AND attempts = 1 AND errors = '[]' \
         AND started_at > '{deleted_at_db}'",
        id_list(&held)
    ))?;
    assert_eq!(handed_back, held.len() as i64, "every job the deleted pod held was handed back");
    record_figures(
        "worker",
        json!({"kill_drained_seconds": kill_drained_seconds, "delete_drained_seconds": delete_drained_seconds, "held": held.len()}),
    )?;
    Ok(())
}

/// kill -9 of a pod's PgBouncer: the kubelet restarts the sidecar and
/// requests recover. Its old server connections (queries still running for
/// clients that are gone) overlap with the new PgBouncer's; the app role's
/// `client_connection_check_interval` bounds how long: PostgreSQL ends a
/// query whose client went away at its next check.
#[test]
fn a_killed_pgbouncer_is_restarted_and_its_old_connections_end_in_bounded_time() -> Result<()> {
    let pg = Postgres::from_env()?;
    let shop = Shop::deploy(
        &pg,
        "sidecar",
        json!({
            "database": {"maxConnections": 60, "reservedConnections": 10},
            "web": {"replicas": 1, "concurrency": 50, "databasePool": 5},
            "worker": {"replicas": 1, "concurrency": 4}
        }),
        Some("ALTER ROLE {role} SET client_connection_check_interval = '1s'"),
    )?;
    let share = shop.tidepool()?["status"]["web"]["serverConnectionsPerPod"].as_i64().context("share")?;
    let pod = shop.pods("web")?.into_iter().next().context("a web pod")?;
    let uid = pod["metadata"]["uid"].as_str().context("uid")?;

    let burst = Load::burst(&shop.node, &shop.web_url("/slow-query/?seconds=60")?, share as usize, "90s")?;
    wait_for("the web pod's share busy in pg_sleep", Duration::from_secs(30), || {
        Ok((shop.count(&shop.db.sleeping_sql())? >= share).then_some(()))
    })?;
    // The web pod's server connections, all busy (the worker's stay).
    let old_backends = shop.sql(&shop.db.sleeping_sql().replace("count(*)", "string_agg(pid::text, ',')"))?;
    let connections = Sampler::start(&shop.pg, &shop.db.name, &shop.db.connections_sql());
    let pgbouncer =
        pod_processes(uid)?.into_iter().find(|p| p.comm == "pgbouncer").context("the pod's pgbouncer")?;
    let killed_at = Instant::now();
    let killed = output(Command::new("kill").args(["-KILL", &pgbouncer.pid.to_string()]))?;
    ensure!(killed.status.success(), "kill: {}", String::from_utf8_lossy(&killed.stderr));

    // The bound: a check interval (1 s) after the kill, plus PostgreSQL's
    // own latency on a busy machine; far below the queries' 60 s.
    wait_for("the old server connections to end", Duration::from_secs(15), || {
        let left =
            shop.count(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid IN ({old_backends})"))?;
        Ok((left == 0).then_some(()))
    })?;
    let overlap_ended = killed_at.elapsed();
    let report = burst.finish()?;
    assert_eq!(report["succeeded"], 0, "the requests whose queries were cut off fail: {report}");
    assert!(report["latency_max_seconds"].as_f64().unwrap_or(f64::MAX) < 30.0, "and fast: {report}");

    shop.wait_serving()?;
    let recovered = killed_at.elapsed();
    shop.wait_ready(1)?;
    let samples = connections.finish()?;
    let peak = peak(&samples);
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let restarts = shop.wait_restarted(&format!("{pod_name}/pgbouncer"), 1)?;
    assert_eq!(restarts.get(&format!("{pod_name}/pgbouncer")), Some(&1), "{restarts:?}");
    assert_eq!(restarts.get(&format!("{pod_name}/web")), Some(&0), "{restarts:?}");
    // Old and new together are at most two shares of the web pod, plus the
    // worker's share, for at most the time measured above.
    let worker_share = shop.tidepool()?["status"]["worker"]["serverConnectionsPerPod"].as_i64().unwrap_or(0);
    assert!(peak <= 2 * share + worker_share, "peak {peak} during the overlap ({overlap_ended:?})");
    record_figures(
        "sidecar",
        json!({
            "recovered_seconds": recovered.as_secs_f64(), "overlap_seconds": overlap_ended.as_secs_f64(),
            "peak": peak, "share": share, "worker_share": worker_share,
        }),
    )?;
    Ok(())
}

/// PostgreSQL restarted under load: the pods recover by themselves (no
/// container restarts), and no request waits past the app's own bounds.
#[test]
fn the_pods_ride_out_a_postgresql_restart() -> Result<()> {
    let private = PrivatePostgres::start("restart", 100)?;
    let shop = Shop::deploy(
        &private.postgres,
        "db-restart",
        json!({
            "database": {"maxConnections": 100, "reservedConnections": 10},
            "web": {"replicas": 1, "concurrency": 50, "databasePool": 5},
            "worker": {"replicas": 1, "concurrency": 4}
        }),
        None,
    )?;
    let restarts_before = shop.restart_counts()?;
    let load = Load::steady(&shop.node, &shop.web_url("/row/")?, 5, "60s")?;
    let restarted_at = Instant::now();
    private.restart()?;
    let restart_seconds = restarted_at.elapsed().as_secs_f64();
    shop.wait_serving()?;
    let recovered_seconds = restarted_at.elapsed().as_secs_f64();
    shop.wait_ready(1)?;
    let report = load.finish()?;
    record_figures(
        "postgres_restart",
        json!({"restart_seconds": restart_seconds, "recovered_seconds": recovered_seconds, "load": report}),
    )?;

    assert_eq!(shop.restart_counts()?, restarts_before, "no container restarted");
    let statuses = report["statuses"].as_object().cloned().unwrap_or_default();
    assert!(
        statuses.keys().all(|s| s == "200" || s == "503" || s == "500"),
        "every request was answered: {report}"
    );
    // The web app's own bounds, a pool wait (5 s) and a query timeout
    // (10 s), and slack for a busy machine; the load's own limit is 60 s.
    let slowest = report["latency_max_seconds"].as_f64().unwrap_or(f64::MAX);
    assert!(slowest <= 20.0, "a request took {slowest} s: {report}");
    Ok(())
}

/// The dashboards against a real Prometheus (Debian's package) that scrapes
/// the Tidepool's pods as the chart's PodMonitor would (their `http` and
/// `metrics` ports, labelled `tidepool` and `tier`) and the operator,
/// while a workload makes their figures move: steady requests, a burst past
/// the web tier's concurrency and pool (shed for both reasons), jobs queued
/// past the worker's concurrency, and jobs whose queries are terminated
/// (failed, then retried, or dead with no attempt left). Every query of
/// every panel returns series, those of "Tidepool" with the Tidepool's
/// labels; the figures the workload moves are seen above zero.
#[test]
fn the_dashboards_see_a_tidepool_under_load() -> Result<()> {
    // The operator's target label, as a ServiceMonitor in its namespace
    // would give it (its per-Tidepool gauges keep their own).
    const OPERATOR_NAMESPACE: &str = "tidepool-system";
    let pg = Postgres::from_env()?;
    let shop = Shop::deploy(
        &pg,
        "dashboards",
        json!({
            "database": {"maxConnections": 40, "reservedConnections": 10},
            "web": {"replicas": 1, "concurrency": 4, "databasePool": 2},
            "worker": {"replicas": 1, "concurrency": 2}
        }),
        None,
    )?;
    let ns = shop.ns.name.clone();
    // The pods as the chart's PodMonitor selects them (Debian's Prometheus
    // is built without Kubernetes discovery: the test discovers them).
    let pods_file = std::env::temp_dir().join(format!("tidepool-pods-{ns}.json"));
    let mut targets = Vec::new();
    for tier in ["web", "worker"] {
        for pod in shop.pods(tier)? {
            let ip = pod["status"]["podIP"].as_str().context("a pod IP")?;
            let labels = &pod["metadata"]["labels"];
            for port in pod["spec"]["containers"][0]["ports"].as_array().into_iter().flatten() {
                if !matches!(port["name"].as_str(), Some("http" | "metrics")) {
                    continue;
                }
                targets.push(json!({
                    "targets": [format!("{ip}:{}", port["containerPort"])],
                    "labels": {
                        "namespace": ns, "pod": pod["metadata"]["name"],
                        "tidepool": labels["app.kubernetes.io/instance"], "tier": labels["app.kubernetes.io/component"]
                    }
                }));
            }
        }
    }
    std::fs::write(&pods_file, serde_json::to_string(&targets)?)?;
    let _pods_file = RemoveOnDrop(pods_file.clone());
    let prometheus = Prometheus::start(&format!(
        r#"  - job_name: tidepool-pods
    file_sd_configs: [{{files: ["{}"], refresh_interval: 1s}}]
  - job_name: tidepool-operator
    honor_labels: true
    static_configs: [{{targets: ["127.0.0.1:{}"], labels: {{namespace: {OPERATOR_NAMESPACE}}}}}]
"#,
        path_arg(&pods_file)?,
        shop.operator.port()
    ))?;
    wait_for("Prometheus to scrape both pods and the operator", Duration::from_secs(60), || {
        let targets = prometheus.targets()?;
        Ok((targets.len() == 3 && targets.iter().all(|(_, health)| health == "up")).then_some(()))
    })
    .with_context(|| format!("{:?}\n{}", prometheus.targets(), prometheus.log()))?;

    // The workload.
    let steady = Load::steady(&shop.node, &shop.web_url("/row/")?, 2, "10s")?;
    let burst = Load::burst(&shop.node, &shop.web_url("/slow-query/?seconds=7")?, 24, "30s")?.finish()?;
    ensure!(status_count(&burst, "503") > 0, "the burst was shed: {burst}");
    // Two jobs die with their one attempt, two fail and are retried; ten
    // more wait behind them (the worker runs two at once).
    for (max_attempts, count) in [("1", 2), ("3", 2)] {
        let result = output(
            Command::new(release_binary("tidepool")?)
                .args([
                    "enqueue",
                    "slow_query",
                    "--args",
                    r#"{"seconds": 60}"#,
                    "--count",
                    &count.to_string(),
                ])
                .args(["--max-attempts", max_attempts])
                .env("DATABASE_URL", shop.db.url(&shop.pg)),
        )?;
        ensure!(result.status.success(), "enqueue: {}", String::from_utf8_lossy(&result.stderr));
        let sleeping = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND query LIKE '%pg_sleep%' AND state = 'active'",
            shop.db.name
        );
        wait_for("the jobs' queries to run", Duration::from_secs(60), || {
            Ok((shop.pg.psql("postgres", &sleeping)?.parse::<i64>()? == count).then_some(()))
        })?;
        shop.pg.psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{}' AND query LIKE '%pg_sleep%' AND state = 'active'",
                shop.db.name
            ),
        )?;
    }
    // Ten more through the web tier (POST /tasks/), which counts them.
    let tasks = shop.web_url("/tasks/")?;
    for _ in 0..10 {
        let body = r#"{"task": "slow_query", "args": {"seconds": 2}}"#;
        let (code, answer) =
            shop.node.curl(&["-X", "POST", "-H", "Content-Type: application/json", "-d", body, &tasks])?;
        ensure!(code == 202, "POST /tasks/: {code} {answer}");
    }

    let dashboards = tidepool_testenv::repo_root()?.join("charts/tidepool/files/dashboards");
    let mut checked = 0;
    for file in ["tidepool.json", "tidepool-operator.json"] {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(dashboards.join(file))?)?;
        for panel in dashboard["panels"].as_array().into_iter().flatten().filter(|p| p["type"] != "row") {
            let title = panel["title"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .context("expr")?
                    .replace("$namespace", if file == "tidepool.json" { &ns } else { OPERATOR_NAMESPACE })
                    .replace("$tidepool", "shop")
                    .replace("$tier", "web|worker")
                    .replace("$__rate_interval", "5s");
                let series = wait_for(&format!("{file}: {title}: {expr}"), Duration::from_secs(90), || {
                    let series = prometheus.query(&expr)?;
                    Ok((!series.is_empty()).then_some(series))
                })?;
                if file == "tidepool.json" {
                    for one in &series {
                        let labels = &one["metric"];
                        ensure!(
                            labels["namespace"] == ns.as_str() && labels["tidepool"] == "shop",
                            "{title}: {one}"
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    // What the workload moved, seen above zero at some scrape.
    let sel = format!(r#"namespace="{ns}",tidepool="shop""#);
    for (what, expr) in [
        ("in flight", format!("sum(tidepool_http_requests_in_flight{{{sel}}})")),
        (
            "shed for the concurrency",
            format!(r#"sum(tidepool_http_requests_shed_total{{{sel},reason="in_flight_limit"}})"#),
        ),
        (
            "shed for the pool wait",
            format!(r#"sum(tidepool_http_requests_shed_total{{{sel},reason="db_pool_wait"}})"#),
        ),
        ("waiting in the app's pool", format!("sum(tidepool_db_pool_waiting{{{sel}}})")),
        ("queue depth", format!("max(tidepool_queue_available_jobs{{{sel}}})")),
        ("failed attempts", format!("sum(tidepool_jobs_failed_total{{{sel}}})")),
        ("retried attempts", format!("sum(tidepool_jobs_retried_total{{{sel}}})")),
        ("dead jobs", format!("sum(tidepool_jobs_dead_total{{{sel}}})")),
        ("server connections", format!("sum(pgbouncer_pools_server_active_connections{{{sel}}})")),
    ] {
        wait_for(&format!("{what} above zero"), Duration::from_secs(60), || {
            Ok((!prometheus.query(&format!("max_over_time(({expr})[10m:1s]) > 0"))?.is_empty()).then_some(()))
        })?;
    }
    let requests = steady.finish()?;
    record_figures(
        "dashboards",
        json!({"queries": checked, "steady": requests["requests"], "burst": burst}),
    )?;
    eprintln!("dashboards: {checked} queries answered with the Tidepool's series");
    Ok(())
}

/// A file of the test's, removed when it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The deployment's replicas of `tier` (spec) and its ready pods.
fn tier_replicas(shop: &Shop, tier: &str) -> Result<(i64, i64)> {
    let deployment = shop.kube.get_json(&["-n", &shop.ns.name, &format!("deployment/shop-{tier}")])?;
    Ok((
        deployment["spec"]["replicas"].as_i64().unwrap_or(-1),
        deployment["status"]["readyReplicas"].as_i64().unwrap_or(0),
    ))
}

/// Both tiers scale on the real node: a backlog of slow jobs takes the
/// worker tier from zero to its maximum, the real pods drain it, and it
/// goes back to zero; a load on the web Service takes the web tier up
/// through the HorizontalPodAutoscaler on CPU (metrics-server); the pods
/// reach PostgreSQL by a Service name (CoreDNS) and the operator reads the
/// queue as a role that may only read it. Through all of it, the app's
/// PostgreSQL connections, sampled from `pg_stat_activity`, stay within
/// `available`.
#[test]
fn both_tiers_scale_on_the_real_node_within_the_budget() -> Result<()> {
    let pg = Postgres::from_env()?;
    let (max_connections, reserved) = (60, 10);
    let shop = Shop::deploy_with(
        &pg,
        "e2e-scale",
        json!({
            "database": {"maxConnections": max_connections, "reservedConnections": reserved},
            "web": {"replicas": 1, "concurrency": 200, "databasePool": 5,
                    "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetCPUUtilizationPercentage": 50}},
            "worker": {"replicas": 1, "concurrency": 4,
                       "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "pollingIntervalSeconds": 1,
                                       "scaleUpStabilizationSeconds": 2, "scaleDownStabilizationSeconds": 10,
                                       "secretRef": {"name": "shop-scaler"},
                                       "queues": [{"name": "default", "targetAvailableJobsPerReplica": 8}]}}
        }),
        Setup { database: Database::ServiceName, ..Setup::default() },
    )?;
    let available = i64::from(max_connections - reserved);
    let status = shop.tidepool()?["status"].clone();
    assert_eq!(status["connections"]["available"], available);
    let planned = status["connections"]["plannedPeak"].as_i64().context("plannedPeak")?;
    assert!(planned <= available, "{status}");
    wait_for("the queue scaler to read the queue", Duration::from_secs(60), || {
        Ok(common::condition(&shop.tidepool()?, "WorkerAutoscaling").filter(|(s, _, _)| s == "True"))
    })?;
    // Idle: the worker tier goes to zero.
    wait_for("the worker tier at zero", Duration::from_secs(120), || {
        Ok((tier_replicas(&shop, "worker")?.0 == 0).then_some(()))
    })
    .with_context(|| shop.describe())?;

    let connections = Sampler::start(&shop.pg, &shop.db.name, &shop.db.connections_sql());
    let started = Instant::now();
    shop.enqueue("slow_query", r#"{"seconds": 3}"#, 48)?;
    let load = Load::steady(&shop.node, &shop.web_url("/row/")?, 8, "10s")?;
    let workers_set = wait_for("the worker tier set to 2", Duration::from_secs(120), || {
        Ok((tier_replicas(&shop, "worker")?.0 == 2).then(|| started.elapsed()))
    })
    .with_context(|| shop.describe())?;
    let workers_ready = wait_for("2 worker pods ready", Duration::from_secs(180), || {
        Ok((tier_replicas(&shop, "worker")?.1 == 2).then(|| started.elapsed()))
    })
    .with_context(|| shop.describe())?;
    let web_scaled = wait_for("the HPA to scale the web tier", Duration::from_secs(240), || {
        Ok((tier_replicas(&shop, "web")?.0 >= 2).then(|| started.elapsed()))
    })
    .with_context(|| shop.describe())?;
    let finished = shop.wait_drained(Duration::from_secs(240))?;
    let drained = started.elapsed();
    let report = load.finish()?;
    wait_for("the worker tier back at zero", Duration::from_secs(120), || {
        Ok((tier_replicas(&shop, "worker")? == (0, 0)).then_some(()))
    })
    .with_context(|| shop.describe())?;
    let scaled_down = started.elapsed();
    let samples = connections.finish()?;

    assert_eq!(finished, BTreeMap::from([("succeeded".to_owned(), 48)]));
    let peak = peak(&samples);
    assert!(peak <= available, "the app held {peak} connections, {available} available");
    assert!(peak > 0, "the sampler saw the app's connections");
    let tidepool = shop.tidepool()?;
    let web = &tidepool["status"]["web"]["lastScale"];
    assert_eq!(web["reason"], "ReplicasChanged", "{web}");
    assert!(web["message"].as_str().is_some_and(|m| m.contains("through the scale subresource")), "{web}");
    let hpa = shop.kube.get_json(&["-n", &shop.ns.name, "hpa/shop-web"])?;
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Tidepool");
    assert!(
        hpa["status"]["currentMetrics"][0]["resource"]["current"]["averageUtilization"].is_number(),
        "{hpa}"
    );
    let events = shop.kube.get_json(&["-n", &shop.ns.name, "events.events.k8s.io"])?;
    let notes: Vec<&str> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reportingController"] == "tidepool-operator")
        .filter_map(|e| e["note"].as_str())
        .collect();
    // Up from zero, to 2 for the backlog (through 1 when a reading came
    // while the jobs were still being enqueued, one statement each).
    assert!(notes.iter().any(|n| n.starts_with("worker replicas 0 → ")), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains(" → 2 (QueueBacklog)")), "{notes:?}");
    // Down from 2 (to 0, or through 1 while the last jobs ran).
    assert!(notes.iter().any(|n| n.starts_with("worker replicas 2 → ")), "{notes:?}");
    assert!(notes.iter().any(|n| n.starts_with("web replicas 1 → ")), "{notes:?}");
    record_figures(
        "scaling",
        json!({
            "workers_set_seconds": workers_set.as_secs_f64(), "workers_ready_seconds": workers_ready.as_secs_f64(),
            "web_scaled_seconds": web_scaled.as_secs_f64(), "drained_seconds": drained.as_secs_f64(),
            "workers_at_zero_seconds": scaled_down.as_secs_f64(), "peak": peak, "planned": planned,
            "available": available, "requests": report["requests"],
        }),
    )?;
    Ok(())
}
