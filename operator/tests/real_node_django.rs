//! An application that is not Tidepool's under the operator, on the real
//! node: the Django + Celery example (examples/django-celery, built by
//! `make images`; manifests/examples/django-celery.yaml, its Redis and its
//! Tidepool, applied as a user would), with the seed's experiments, the
//! connection budget under overload, and the secrets kept out of the
//! application's containers.
//!
//! Every client runs inside the node's network namespace
//! (`tidepool-loadgen`, `curl`); every load is bounded in count and time.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::kube_with_crd;
use common::shop::{
    admitted, pod_tier, record_figures, status_count, watch_shares, Load, PodWatch, Setup, Shop,
};
use serde_json::{json, Value};
use tidepool_testenv::node::{
    path_arg, peak, pod_processes, AppDatabase, Node, Postgres, PrivatePostgres, Sampler,
};
use tidepool_testenv::prometheus::Prometheus;
use tidepool_testenv::{repo_root, wait_for};

/// The example's objects as a user applies them, for the test's namespace:
/// Redis (its Deployment and Service, scheduled on the real node), and the
/// Tidepool's spec (the test's Secret and sizes are merged over it).
struct Example {
    redis: String,
    spec: Value,
}

impl Example {
    /// The example with fixed worker replicas: its worker scaler left out.
    fn load(overrides: Value) -> Result<Example> {
        Self::load_from(overrides, false)
    }

    /// The example with its worker scaler (its query of `shop_backlog`),
    /// `overrides` merged over it.
    fn load_autoscaled(overrides: Value) -> Result<Example> {
        Self::load_from(overrides, true)
    }

    fn load_from(overrides: Value, autoscaled: bool) -> Result<Example> {
        let kube = kube_with_crd()?;
        let file = repo_root()?.join("manifests/examples/django-celery.yaml");
        let file = file.to_str().context("a UTF-8 path")?;
        // One JSON object per document of the file.
        let printed = kube.kubectl(&["create", "--dry-run=client", "-o", "json", "-f", file], None)?;
        let items = serde_json::Deserializer::from_str(&printed)
            .into_iter::<Value>()
            .collect::<Result<Vec<_>, _>>()
            .context("kubectl's objects")?;
        let mut redis = Vec::new();
        let mut spec = None;
        for mut item in items {
            // kubectl filled in its default namespace: the test's is given at apply.
            if let Some(metadata) = item["metadata"].as_object_mut() {
                metadata.remove("namespace");
            }
            match item["kind"].as_str() {
                Some("Tidepool") => spec = Some(item["spec"].take()),
                Some("Deployment") => {
                    let pod = &mut item["spec"]["template"]["spec"];
                    pod["nodeSelector"] = json!({"type": "real"});
                    pod["tolerations"] =
                        json!([{"key": Node::TAINT, "operator": "Exists", "effect": "NoSchedule"}]);
                    redis.push(item);
                }
                Some("Service") => redis.push(item),
                _ => {}
            }
        }
        let mut spec = spec.context("the example's Tidepool")?;
        spec["database"].as_object_mut().context("spec.database")?.remove("secretRef");
        if !autoscaled {
            spec["worker"].as_object_mut().context("spec.worker")?.remove("autoscaling");
        }
        common::merge(&mut spec, &overrides);
        ensure!(redis.len() == 2, "the example's Redis Deployment and Service: {redis:?}");
        Ok(Example { redis: json!({"apiVersion": "v1", "kind": "List", "items": redis}).to_string(), spec })
    }

    fn deploy(self, pg: &Postgres, prefix: &str) -> Result<Shop> {
        Shop::deploy_with(pg, prefix, self.spec, Setup { beside: &self.redis, ..Setup::default() })
    }
}

/// The environment and the files under `dirs` of every process of `pod`'s
/// application containers (PgBouncer's and the exporter's excepted), read
/// from this machine's `/proc`: where the database password must not be.
fn application_processes_hold(pod: &Value, secret: &str, dirs: &[&str]) -> Result<Vec<String>> {
    let uid = pod["metadata"]["uid"].as_str().context("a pod uid")?;
    let mut found = Vec::new();
    let processes = pod_processes(uid)?;
    let apps: Vec<_> =
        processes.iter().filter(|p| !["pgbouncer", "pause", "tidepool"].contains(&p.comm.as_str())).collect();
    ensure!(!apps.is_empty(), "no application process in the pod: {processes:?}");
    for process in apps {
        let environ = std::fs::read(format!("/proc/{}/environ", process.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&environ).contains(secret) {
            found.push(format!("{} ({}): its environment", process.comm, process.pid));
        }
        for dir in dirs {
            let root = format!("/proc/{}/root{dir}", process.pid);
            for file in files_under(Path::new(&root), 4) {
                if std::fs::read(&file).is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains(secret)) {
                    found.push(format!("{} ({}): {}", process.comm, process.pid, file.display()));
                }
            }
        }
    }
    Ok(found)
}

/// The regular files under `dir`, `depth` folders deep at most.
fn files_under(dir: &Path, depth: u32) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_file() => files.push(path),
            Ok(kind) if kind.is_dir() && depth > 0 => files.extend(files_under(&path, depth - 1)),
            _ => {}
        }
    }
    files
}

/// `GET url` from the node; its JSON body.
fn get_json(shop: &Shop, url: &str) -> Result<Value> {
    let (code, body) = shop.node.curl(&[url])?;
    ensure!(code == 200, "GET {url}: {code} {body}");
    serde_json::from_str(&body).with_context(|| format!("GET {url}: {body}"))
}

/// Waits until requests through the web Service reach every web pod (the
/// view names its pod): kube-proxy programs a Service's endpoints a moment
/// after they are ready, and a burst sent before that lands on fewer pods
/// than the plan shares the load across.
fn wait_every_web_pod_serves(shop: &Shop) -> Result<()> {
    let pods: std::collections::BTreeSet<String> =
        shop.pods("web")?.iter().filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned)).collect();
    let url = shop.web_url("/slow-query/?seconds=0")?;
    let mut answered = std::collections::BTreeSet::new();
    wait_for(
        &format!("requests through the Service to reach each of {pods:?}"),
        Duration::from_secs(60),
        || {
            if let Some(pod) = get_json(shop, &url)?["pod"].as_str() {
                answered.insert(pod.to_owned());
            }
            Ok((answered == pods).then_some(()))
        },
    )
    .with_context(|| shop.describe())
}

/// Starts `count` slow tasks of `seconds` in batch `batch` through the web
/// Service (a view calls Celery's `delay`).
fn start_tasks(shop: &Shop, batch: &str, count: u32, seconds: f64) -> Result<()> {
    let url = shop.web_url(&format!("/tasks/slow/?batch={batch}&count={count}&seconds={seconds}"))?;
    let (code, body) = shop.node.curl(&["-X", "POST", &url])?;
    ensure!(code == 202, "POST {url}: {code} {body}");
    Ok(())
}

/// Waits until batch `batch` has `count` runs recorded; its summary.
fn wait_runs(shop: &Shop, batch: &str, count: i64, limit: Duration) -> Result<Value> {
    let url = shop.web_url(&format!("/tasks/runs/?batch={batch}"))?;
    wait_for(&format!("{count} runs of batch {batch}"), limit, || {
        let runs = get_json(shop, &url)?;
        Ok((runs["runs"].as_i64() == Some(count)).then_some(runs))
    })
    .with_context(|| shop.describe())
}

/// The example goes Ready from its own image: each pod's PgBouncer has the
/// plan's share and client limit (read through the pod's exporter, from
/// `SHOW DATABASES` and `SHOW CONFIG`), a request through the web Service
/// reaches PostgreSQL through the sidecar, a task a view starts runs on a
/// worker pod, and no process of the application's containers holds the
/// database password in its environment or files.
#[test]
fn the_django_celery_example_runs_with_its_share_and_without_the_password() -> Result<()> {
    let pg = Postgres::from_env()?;
    let example = Example::load(json!({
        "database": {"maxConnections": 200, "reservedConnections": 10},
        "web": {"replicas": 1},
    }))?;
    let shop = example.deploy(&pg, "django")?;
    let status = shop.tidepool()?["status"].clone();

    for tier in ["web", "worker", "clock"] {
        let share = status[tier]["serverConnectionsPerPod"].as_i64().context("a share")?;
        for pod in shop.pods(tier)? {
            let annotated = pod["metadata"]["annotations"]["tidepool.dev/max-db-connections"].as_str();
            assert_eq!(annotated, Some(share.to_string().as_str()), "{tier}: the annotated share");
            let ip = pod["status"]["podIP"].as_str().context("a pod IP")?;
            let (code, metrics) = shop.node.curl(&[&format!("http://{ip}:9127/metrics")])?;
            ensure!(code == 200, "{tier}'s exporter: {code} {metrics}");
            let series = |prefix: &str| {
                metrics
                    .lines()
                    .find(|l| l.starts_with(prefix))
                    .and_then(|l| l.rsplit(' ').next())
                    .map(str::to_owned)
            };
            assert_eq!(series("pgbouncer_up"), Some("1".into()), "{metrics}");
            assert_eq!(
                series(&format!("pgbouncer_databases_max_connections{{name=\"{}\"", shop.db.name)),
                Some(share.to_string()),
                "{tier}: PgBouncer's max_db_connections is the share: {metrics}"
            );
            // The clock is one process doing one thing at a time.
            let concurrency = shop.tidepool()?["spec"][tier]["concurrency"].as_i64().unwrap_or(1);
            let clients: i64 =
                series("pgbouncer_config_max_client_connections").context("max_client_conn")?.parse()?;
            assert!(
                clients >= concurrency,
                "{tier}: PgBouncer takes every client the app may open: {clients}"
            );
            let holders = application_processes_hold(&pod, &shop.db.password, &["/etc", "/tmp", "/app"])?;
            assert!(holders.is_empty(), "{tier}: the database password is in {holders:?}");
        }
    }

    let answer = get_json(&shop, &shop.web_url("/slow-query/?seconds=0.2")?)?;
    assert_eq!(answer["message"], "Slow query completed", "{answer}");
    start_tasks(&shop, "first", 1, 0.1)?;
    let runs = wait_runs(&shop, "first", 1, Duration::from_secs(120))?;
    let workers: Vec<String> = shop
        .pods("worker")?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let host = runs["hosts"][0].as_str().unwrap_or_default();
    assert!(workers.iter().any(|w| w == host), "the task ran on a worker pod: {runs} {workers:?}");
    Ok(())
}

/// The seed's two experiments on the example: ten `/slow-query/` at once
/// through the Service sleep together in PostgreSQL, and a hundred slow
/// tasks run fifty at a time on one worker of concurrency 50.
#[test]
fn the_seeds_experiments_run_on_the_django_celery_example() -> Result<()> {
    let pg = Postgres::from_env()?;
    let example = Example::load(json!({
        "database": {"maxConnections": 200, "reservedConnections": 10},
        "web": {"replicas": 1, "databasePool": 10},
        "worker": {"replicas": 1, "concurrency": 50},
    }))?;
    let shop = example.deploy(&pg, "djseed")?;

    let sleeping = Sampler::start(&shop.pg, &shop.db.name, &shop.db.sleeping_sql());
    let report = Load::burst(&shop.node, &shop.web_url("/slow-query/?seconds=5")?, 10, "60s")?.finish()?;
    let samples = sleeping.finish()?;
    assert_eq!(report["succeeded"], 10, "{report}");
    let together = peak(&samples);
    assert_eq!(together, 10, "the ten requests' queries run at once: {report}");

    let sampler = Sampler::start(&shop.pg, &shop.db.name, &shop.db.sleeping_sql());
    start_tasks(&shop, "seed", 100, 5.0)?;
    let runs = wait_runs(&shop, "seed", 100, Duration::from_secs(180))?;
    let samples = sampler.finish()?;
    let peak = peak(&samples);
    assert_eq!(runs["peak_overlap"], 50, "fifty tasks at a time: {runs}");
    assert!(peak <= 50, "at most the worker's concurrency sleeps at once: {peak}");
    record_figures(
        "django_seed",
        json!({"requests_seconds": report["total_seconds"], "requests_peak": together, "tasks": runs, "tasks_peak": peak}),
    )?;
    Ok(())
}

/// PostgreSQL's `max_connections` is exactly `reserved + available`, both
/// tiers at their replicas, and more than twice the planned connections
/// offered (requests and tasks), with gunicorn taking far more requests at
/// once than its share: PostgreSQL refuses nothing, the role's sampled peak
/// stays within the plan, and the excess waits in PgBouncer, bounded by
/// the tier's `queryWaitTimeoutSeconds`: past it, a 503.
#[test]
fn the_budget_holds_for_the_django_celery_example_under_overload() -> Result<()> {
    let (max_connections, reserved) = (50, 10);
    let private = PrivatePostgres::start("djbudget", max_connections)?;
    let example = Example::load(json!({
        "database": {"maxConnections": max_connections, "reservedConnections": reserved},
        // The web pods' 16 server connections take 12.5 s for the burst's
        // 200 one-second queries: those that would wait in PgBouncer longer
        // than 5 s get its query_wait_timeout, and the view a 503.
        "web": {"replicas": 2, "concurrency": 200, "databasePool": 10, "queryWaitTimeoutSeconds": 5},
        "worker": {"replicas": 1, "concurrency": 20},
    }))?;
    let shop = example.deploy(&private.postgres, "djbudget")?;
    let status = shop.tidepool()?["status"].clone();
    let planned = status["connections"]["plannedPeak"].as_i64().context("plannedPeak")?;
    let available = status["connections"]["available"].as_i64().context("available")?;
    assert_eq!(available, i64::from(max_connections - reserved), "{status}");
    let web_share = status["web"]["serverConnectionsPerPod"].as_i64().context("web share")?;
    let worker_share = status["worker"]["serverConnectionsPerPod"].as_i64().context("worker share")?;
    let wait = shop.tidepool()?["spec"]["web"]["queryWaitTimeoutSeconds"].as_i64().context("the wait")?;
    wait_every_web_pod_serves(&shop)?;

    let connections = Sampler::start(&shop.pg, &shop.db.name, &shop.db.connections_sql());
    let requests = 200;
    // The tasks first: the view that sends them writes their backlog rows
    // through the web pod's PgBouncer, where the burst would keep it
    // waiting past its bound. They run (three seconds of them, 20 at a
    // time) under the burst.
    start_tasks(&shop, "overload", 60, 1.0)?;
    let burst = Load::burst(&shop.node, &shop.web_url("/slow-query/?seconds=1")?, requests, "120s")?;
    let report = burst.finish()?;
    let runs = wait_runs(&shop, "overload", 60, Duration::from_secs(180))?;
    let samples = connections.finish()?;

    let offered = requests as i64 + 20;
    assert!(offered >= 2 * planned, "the load asks for {offered}, planned {planned}");
    assert!(requests as i64 > 2 * web_share, "the app opens far more clients than its share");
    let log = shop.pg.log()?;
    for refusal in ["too many clients", "remaining connection slots"] {
        assert!(!log.contains(refusal), "PostgreSQL refused connections ({refusal}):\n{log}");
    }
    let peak = peak(&samples);
    assert!(peak <= planned, "the app held {peak} connections, planned {planned}");
    let ok = status_count(&report, "200");
    let failed = status_count(&report, "503");
    assert_eq!(ok + failed, requests as i64, "only 200s and 503s (a wait past its bound): {report}");
    assert!(ok >= 2 * web_share, "each server connection served: {report}");
    assert!(failed > 0, "the wait in PgBouncer is bounded ({wait} s): {report}");
    assert!(report["latency_max_seconds"].as_f64().unwrap_or(f64::MAX) < 60.0, "bounded: {report}");
    record_figures(
        "django_budget",
        json!({
            "requests": requests, "ok": ok, "failed": failed, "burst": report, "tasks": runs,
            "peak": peak, "planned": planned, "available": available, "max_connections": max_connections,
            "web_share": web_share, "worker_share": worker_share, "query_wait_timeout_seconds": wait,
        }),
    )?;
    Ok(())
}

/// Twenty clients send requests through the web Service, and slow tasks
/// run, while both tiers of the example roll out (a change of their `env`,
/// as a new image would be): no request fails (a client sends a request
/// again, once, when gunicorn closed its kept-alive connection before
/// answering, as browsers do), every task runs (Celery's warm shutdown
/// finishes what it holds), and the live pods' shares never pass
/// `available` over every event of a pod watch.
#[test]
fn a_rolling_update_of_the_django_example_under_load_fails_no_request() -> Result<()> {
    let pg = Postgres::from_env()?;
    let example = Example::load(json!({
        "database": {"maxConnections": 80, "reservedConnections": 10},
        "web": {"replicas": 2, "databasePool": 10},
        "worker": {"replicas": 1, "concurrency": 10},
    }))?;
    let shop = example.deploy(&pg, "djroll")?;
    let available = shop.tidepool()?["status"]["connections"]["available"].as_i64().context("available")?;
    let names = |tier: &str| -> Result<Vec<String>> {
        Ok(shop
            .pods(tier)?
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect())
    };
    let old_pods: Vec<String> = [names("web")?, names("worker")?].concat();
    wait_every_web_pod_serves(&shop)?;
    let shares = watch_shares(&shop)?;
    let load = Load::steady(&shop.node, &shop.web_url("/slow-query/?seconds=0.05")?, 20, "30s")?;
    start_tasks(&shop, "rollout", 30, 2.0)?;

    let patched = Instant::now();
    let spec = shop.tidepool()?["spec"].clone();
    let mut patch = json!({"spec": {}});
    for tier in ["web", "worker"] {
        let mut env = spec[tier]["env"].as_array().cloned().unwrap_or_default();
        env.push(json!({"name": "ROLLOUT", "value": "2"}));
        patch["spec"][tier] = json!({"env": env});
    }
    let patch = patch.to_string();
    shop.kube
        .kubectl(&["patch", "-n", &shop.ns.name, "tidepool/shop", "--type=merge", "-p", &patch], None)?;
    let generation = shop.tidepool()?["metadata"]["generation"].as_i64().context("generation")?;
    shop.wait_ready(generation)?;
    wait_for("the old web and worker pods to be gone", Duration::from_secs(180), || {
        let now = [names("web")?, names("worker")?].concat();
        Ok(now.iter().all(|n| !old_pods.contains(n)).then_some(()))
    })
    .with_context(|| shop.describe())?;
    let rollout_seconds = patched.elapsed().as_secs_f64();
    let report = load.finish()?;
    let url = shop.web_url("/tasks/runs/?batch=rollout")?;
    let runs = wait_for("the 30 tasks to have run", Duration::from_secs(180), || {
        let runs = get_json(&shop, &url)?;
        Ok((runs["runs"].as_i64() >= Some(30)).then_some(runs))
    })
    .with_context(|| shop.describe())?;
    record_figures(
        "django_rollout",
        json!({"rollout_seconds": rollout_seconds, "load": report, "tasks": runs, "peak_shares": shares.figure(), "available": available}),
    )?;

    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["requests"].as_i64().unwrap_or(0) >= 100, "{report}");
    let peak = shares.figure();
    assert!(peak > 0 && peak <= available, "live shares peaked at {peak}, available {available}");
    for pod in [shop.pods("web")?, shop.pods("worker")?].concat() {
        let env = pod["spec"]["containers"][0]["env"].as_array().cloned().unwrap_or_default();
        assert!(env.iter().any(|e| e["name"] == "ROLLOUT"), "a pod of the new template: {pod}");
    }
    Ok(())
}

/// The clock's ticks as `/ticks/` sums them up.
fn ticks(shop: &Shop) -> Result<Value> {
    get_json(shop, &shop.web_url("/ticks/")?)
}

/// Waits until the clock's ticks come from `origins` beats, the newest of
/// which has ticked three times; the summary.
fn wait_ticks_from(shop: &Shop, origins: usize) -> Result<Value> {
    wait_for(&format!("three ticks of the beat number {origins}"), Duration::from_secs(180), || {
        let ticks = ticks(shop)?;
        let from = ticks["origins"].as_array().map_or(0, Vec::len);
        Ok((from >= origins && ticks["latest_count"].as_u64() >= Some(3)).then_some(ticks))
    })
    .with_context(|| shop.describe())
}

/// The clock (Celery beat) never runs twice: its pod deleted while it
/// runs, then a rollout of it, and through both a watch of every pod event
/// never sees two clock pods admitted at once, though their replacements
/// exist (held at the gate) while the old pods terminate. The ticks, from
/// the tasks' own rows, come from one beat after another and never
/// alternate between two.
#[test]
fn the_clock_never_runs_twice_when_its_pod_is_deleted_or_rolled() -> Result<()> {
    let pg = Postgres::from_env()?;
    let period = 2;
    let broker = json!({"name": "CELERY_BROKER_URL", "value": "redis://django-shop-redis:6379/0"});
    let tick = json!({"name": "TICK_SECONDS", "value": period.to_string()});
    let example = Example::load(json!({
        "database": {"maxConnections": 200, "reservedConnections": 10},
        "web": {"replicas": 1},
        "clock": {"env": [broker, tick]},
    }))?;
    let shop = example.deploy(&pg, "djclock")?;
    #[derive(Clone, Default)]
    struct Seen {
        /// Clock pods admitted (so able to run) at once, and pods of the
        /// tier at all (a replacement held at the gate included).
        admitted: usize,
        existing: usize,
    }
    let watch = PodWatch::fold(&shop, Seen::default(), |seen, pods| {
        let clocks: Vec<_> = pods.values().filter(|p| pod_tier(p) == "clock").collect();
        seen.existing = seen.existing.max(clocks.len());
        seen.admitted = seen.admitted.max(clocks.iter().filter(|p| admitted(p)).count());
    })?;
    wait_ticks_from(&shop, 1)?;

    // Its pod deleted while it runs: the Deployment makes a new one at once.
    let old = shop.pods("clock")?;
    let old = old.first().and_then(|p| p["metadata"]["name"].as_str()).context("the clock's pod")?.to_owned();
    shop.kube.kubectl(&["delete", "pod", "-n", &shop.ns.name, &old, "--wait=false"], None)?;
    let after_delete = wait_ticks_from(&shop, 2)?;

    // A rollout: a change of the clock's template.
    let env = json!([broker, tick, {"name": "ROLLOUT", "value": "2"}]);
    let patch = json!({"spec": {"clock": {"env": env}}}).to_string();
    shop.kube
        .kubectl(&["patch", "-n", &shop.ns.name, "tidepool/shop", "--type=merge", "-p", &patch], None)?;
    let after_rollout = wait_ticks_from(&shop, 3)?;
    let seen = watch.figure();

    assert_eq!(seen.admitted, 1, "two clock pods were admitted at once");
    assert!(
        seen.existing >= 2,
        "a replacement existed beside the old pod (held at the gate): {}",
        seen.existing
    );
    assert_eq!(after_rollout["alternations"], 0, "two beats sent ticks in turn: {after_rollout}");
    assert_eq!(after_rollout["switches"], 2, "one hand-over each: {after_rollout}");
    record_figures(
        "django_clock",
        json!({
            "period_seconds": period, "ticks": after_rollout, "after_delete": after_delete,
            "admitted_at_once": seen.admitted, "existing_at_once": seen.existing,
        }),
    )?;
    Ok(())
}

/// Prometheus's file of scrape targets (it reads it again every second),
/// removed when the test ends.
struct TargetsFile(std::path::PathBuf);

impl Drop for TargetsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The exporter's `pgbouncer_*` series of the example's pods, scraped by a
/// real Prometheus from the ports the chart's PodMonitor selects (the
/// application's own port, `app`, is not among them): each tier's
/// `max_db_connections` is its share, and the dashboard's PgBouncer panels
/// answer for the Tidepool.
#[test]
fn prometheus_scrapes_the_exporters_of_an_applications_pods() -> Result<()> {
    let pg = Postgres::from_env()?;
    let example = Example::load(json!({
        "database": {"maxConnections": 200, "reservedConnections": 10},
        "web": {"replicas": 1},
    }))?;
    let shop = example.deploy(&pg, "djprom")?;
    let ns = shop.ns.name.clone();
    let monitored = ["http", "metrics", "pooler-metrics"];
    let mut targets = Vec::new();
    for tier in ["web", "worker", "clock"] {
        for pod in shop.pods(tier)? {
            let ip = pod["status"]["podIP"].as_str().context("a pod IP")?;
            let labels = &pod["metadata"]["labels"];
            let spec = &pod["spec"];
            let containers =
                spec["containers"].as_array().into_iter().chain(spec["initContainers"].as_array());
            for port in containers.flatten().flat_map(|c| c["ports"].as_array().into_iter().flatten()) {
                if !port["name"].as_str().is_some_and(|name| monitored.contains(&name)) {
                    continue;
                }
                ensure!(port["name"] == "pooler-metrics", "{tier}: only the exporter is scraped: {port}");
                targets.push(json!({
                    "targets": [format!("{ip}:{}", port["containerPort"])],
                    "labels": {"namespace": ns, "pod": pod["metadata"]["name"],
                        "tidepool": labels["app.kubernetes.io/instance"], "tier": labels["app.kubernetes.io/component"]}
                }));
            }
        }
    }
    ensure!(targets.len() == 3, "one exporter per pod: {targets:?}");
    let pods_file = TargetsFile(std::env::temp_dir().join(format!("tidepool-pods-{ns}.json")));
    std::fs::write(&pods_file.0, serde_json::to_string(&targets)?)?;
    let prometheus = Prometheus::start(&format!(
        "  - job_name: tidepool-pods\n    file_sd_configs: [{{files: [\"{}\"], refresh_interval: 1s}}]\n",
        path_arg(&pods_file.0)?
    ))?;
    wait_for("Prometheus to scrape the three exporters", Duration::from_secs(60), || {
        let targets = prometheus.targets()?;
        Ok((targets.len() == 3 && targets.iter().all(|(_, health)| health == "up")).then_some(()))
    })
    .with_context(|| format!("{:?}\n{}", prometheus.targets(), prometheus.log()))?;

    let status = shop.tidepool()?["status"].clone();
    for tier in ["web", "worker", "clock"] {
        let share = status[tier]["serverConnectionsPerPod"].as_f64().context("a share")?;
        let expr = format!(
            r#"pgbouncer_databases_max_connections{{namespace="{ns}",tier="{tier}",name="{}"}}"#,
            shop.db.name
        );
        let series = wait_for(&expr, Duration::from_secs(60), || {
            let series = prometheus.query(&expr)?;
            Ok((!series.is_empty()).then_some(series))
        })?;
        let value: f64 = series[0]["value"][1].as_str().context("a value")?.parse()?;
        assert_eq!(value, share, "{tier}: {series:?}");
    }
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root()?.join("charts/tidepool/files/dashboards/tidepool.json"),
    )?)?;
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str().filter(|e| e.contains("pgbouncer_")) else { continue };
            let expr = expr
                .replace("$namespace", &ns)
                .replace("$tidepool", "shop")
                .replace("$tier", "web|worker")
                .replace("$__rate_interval", "5s");
            wait_for(&format!("{}: {expr}", panel["title"]), Duration::from_secs(60), || {
                Ok((!prometheus.query(&expr)?.is_empty()).then_some(()))
            })?;
            checked += 1;
        }
    }
    ensure!(checked >= 2, "the dashboard's PgBouncer panels: {checked}");
    Ok(())
}

/// Waits until `spec.worker.replicas` is `replicas`.
fn wait_worker_replicas(shop: &Shop, replicas: i64, limit: Duration) -> Result<Value> {
    wait_for(&format!("worker replicas {replicas}"), limit, || {
        let tidepool = shop.tidepool()?;
        Ok((tidepool["spec"]["worker"]["replicas"] == replicas).then_some(tidepool))
    })
    .with_context(|| shop.describe())
}

/// The example's Celery workers scale on its own count of tasks not yet
/// done (`SELECT count(*) FROM shop_backlog`, the example's query, as a
/// role that may read only that table): up when a view sends a backlog,
/// within the budget over every pod event; a statement that fails (a
/// table the role may not read) or runs past its timeout holds the
/// replicas through the down window after the backlog is gone, and says
/// so in the condition; mended, the tier goes back down after the window.
#[test]
fn the_django_workers_scale_on_their_backlog_table_and_hold_when_the_query_fails() -> Result<()> {
    let pg = Postgres::from_env()?;
    let example = Example::load_autoscaled(json!({
        "database": {"maxConnections": 80, "reservedConnections": 10},
        "web": {"replicas": 1, "databasePool": 5},
        "worker": {"replicas": 1, "concurrency": 4, "autoscaling": {
            "minReplicas": 1, "maxReplicas": 3, "pollingIntervalSeconds": 1,
            "scaleUpStabilizationSeconds": 2, "scaleDownStabilizationSeconds": 5,
            "query": {"targetValuePerReplica": 8}, "secretRef": {"name": "shop-scaler"}}},
    }))?;
    let shop = example.deploy(&pg, "djscale")?;
    let scaler_condition = |status: &str, reason: &str, part: &str| {
        common::wait_condition_containing(
            shop.kube,
            &shop.ns.name,
            ("WorkerAutoscaling", status, reason),
            part,
        )
    };
    let sql = shop.tidepool()?["spec"]["worker"]["autoscaling"]["query"]["sql"].clone();
    assert_eq!(sql, "SELECT count(*) FROM shop_backlog", "the example's own query");
    // No Secret yet: the scaler says so, and the replicas hold.
    let missing = scaler_condition("False", "QueryFailed", "the Secret shop-scaler does not exist")?;
    assert!(missing.contains("the worker replicas hold at 1"), "{missing}");

    // The scaler's role, as docs/foreign-apps.md gives it: the one table.
    let scaler = AppDatabase {
        name: format!("{}_scaler", shop.db.name),
        password: format!("{}-scaler", shop.db.password),
    };
    pg.psql(
        "postgres",
        &format!(
            "CREATE ROLE {0} LOGIN PASSWORD '{1}' CONNECTION LIMIT 2; GRANT CONNECT ON DATABASE {2} TO {0}",
            scaler.name, scaler.password, shop.db.name
        ),
    )?;
    pg.psql(&shop.db.name, &format!("GRANT SELECT ON shop_backlog TO {}", scaler.name))?;
    let mut secret: Value = serde_json::from_str(&scaler.secret("shop-scaler", "127.0.0.1", pg.port))?;
    secret["stringData"]["dbname"] = json!(shop.db.name);
    shop.kube.kubectl(&["apply", "-n", &shop.ns.name, "-f", "-"], Some(&secret.to_string()))?;
    scaler_condition("True", "QueryRead", "the query (statement timeout 2 s)")?;
    let available = shop.tidepool()?["status"]["connections"]["available"].as_i64().context("available")?;
    let shares = watch_shares(&shop)?;

    // 24 tasks of 10 s at 8 per replica: 3 workers.
    start_tasks(&shop, "scale", 24, 10.0)?;
    wait_worker_replicas(&shop, 3, Duration::from_secs(60))?;

    // At once, while the backlog lasts: a table the role may not read.
    common::set_query(shop.kube, &shop.ns.name, "SELECT count(*) FROM shop_taskrun", 2)?;
    let denied = scaler_condition("False", "QueryFailed", "permission denied for table shop_taskrun")?;
    assert!(denied.contains("the worker replicas hold at 3"), "{denied}");
    assert!(!denied.contains(&scaler.password) && !denied.contains(&shop.db.password), "no secret in status");
    wait_for("3 worker pods ready", Duration::from_secs(180), || {
        Ok((shop.tidepool()?["status"]["worker"]["readyReplicas"] == 3).then_some(()))
    })
    .with_context(|| shop.describe())?;
    let runs = wait_runs(&shop, "scale", 24, Duration::from_secs(180))?;
    assert_eq!(runs["backlog"], 0, "every task deleted its row: {runs}");
    assert!(runs["hosts"].as_array().is_some_and(|h| h.len() >= 2), "the new workers took tasks: {runs}");

    // The backlog gone, readings fail through more than the down window: 3.
    let failed =
        || shop.operator.metric("tidepool_operator_database_query_duration_seconds_count{outcome=\"error\"}");
    let before = failed()?;
    wait_for("readings to fail through a whole down window", Duration::from_secs(60), || {
        Ok((failed()? >= before + 7.0).then_some(()))
    })?;
    assert_eq!(shop.tidepool()?["spec"]["worker"]["replicas"], 3);

    // A statement past its timeout: cancelled by the server, the same hold.
    common::set_query(shop.kube, &shop.ns.name, "SELECT count(*) FROM shop_backlog, pg_sleep(30)", 1)?;
    let slow = scaler_condition("False", "QueryFailed", "statement timeout of 1 s and was cancelled")?;
    assert!(slow.contains("the worker replicas hold at 3"), "{slow}");
    let before = failed()?;
    wait_for("slow readings through a whole down window", Duration::from_secs(60), || {
        Ok((failed()? >= before + 4.0).then_some(()))
    })?;
    assert_eq!(shop.tidepool()?["spec"]["worker"]["replicas"], 3);

    // Mended: the empty backlog takes the tier down to its minimum, not
    // before the down window. Timed from before the mend: the first good
    // reading comes after it, and the condition that says so later still.
    let mended = Instant::now();
    common::set_query(shop.kube, &shop.ns.name, "SELECT count(*) FROM shop_backlog", 2)?;
    scaler_condition("True", "QueryRead", "the query")?;
    let tidepool = wait_worker_replicas(&shop, 1, Duration::from_secs(60))?;
    assert!(
        mended.elapsed() >= Duration::from_secs(5),
        "down after {:?}, inside the window",
        mended.elapsed()
    );
    let last = wait_for("the status to record the scale-down", Duration::from_secs(30), || {
        let last = shop.tidepool()?["status"]["worker"]["lastScale"].clone();
        Ok((last["reason"] == "ValueIdle").then_some(last))
    })
    .with_context(|| format!("{tidepool}"))?;
    assert_eq!((&last["from"], &last["to"]), (&json!(3), &json!(1)), "{last}");
    assert_eq!(last["message"], "the query returned 0, at or below the activation value 0");

    let peak = shares.figure();
    assert!(peak > 0 && peak <= available, "live shares peaked at {peak}, available {available}");
    Ok(())
}
