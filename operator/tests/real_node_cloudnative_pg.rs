//! A Tidepool on a CloudNativePG cluster, as a CloudNativePG user sets it
//! up: CloudNativePG's operator (from its release manifest, the image built
//! from its Go module), a `Cluster` of one PostgreSQL 17 instance on the
//! real node, Tidepool's operator as pods from the chart (they reach
//! `<cluster>-rw` by its name, through the cluster's DNS), and a Tidepool
//! whose `secretRef` is the cluster's `<cluster>-app` and whose TLS is
//! `verify-full` with `<cluster>-ca`, with nothing copied or edited by
//! hand. On it, in turn: the seed's experiments through the web Service;
//! the app user's password rotated through `<cluster>-app` under load, as
//! CloudNativePG documents it; the instance's pod deleted under load; and
//! the connection budget under twice the load it plans for, with
//! `max_connections` the instance's own.
//!
//! One Cluster for all of it: an instance takes a while to make, and each
//! step leaves the Tidepool as the next one needs it.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::shop::{
    failures_at, jobs_span_seconds_by, record_figures, wait_drained, Load, Overload, SpanFrom,
};
use serde_json::{json, Value};
use tidepool_testenv::cloudnative_pg::{self, Cluster, Instance};
use tidepool_testenv::node::{peak, AppDatabase, Node, Sampler};
use tidepool_testenv::{wait_for, Kube};

/// The instance's `max_connections`, which the Tidepool declares as it is.
const MAX_CONNECTIONS: u32 = 150;
/// CloudNativePG's own sessions, PostgreSQL's superuser slots and the
/// queue scaler's connection (checked below).
const RESERVED_CONNECTIONS: u32 = 10;

/// The app's role in `<cluster>-app`, for the SQL that counts its backends.
fn app_role() -> AppDatabase {
    AppDatabase { name: "app".to_owned(), password: String::new() }
}

#[test]
fn a_tidepool_on_a_cloudnative_pg_cluster_goes_ready_verified_on_postgresql_17() -> Result<()> {
    let kube = common::kube_with_crd()?;
    cloudnative_pg::install(kube)?;
    let ns = kube.namespace("cnpg")?;
    let cluster = Cluster::create(kube, &ns.name, "pg", MAX_CONNECTIONS)?;
    let version: u32 = cluster.psql("postgres", "SHOW server_version_num")?.parse()?;
    assert!((170_000..180_000).contains(&version), "PostgreSQL 17: {version}");

    // Tidepool's operator as a user installs it: one replica is enough here
    // (the chart's own test covers two and their Lease).
    common::helm_install_operator(
        kube,
        "helm",
        &ns.name,
        "tidepool",
        &["--set", "replicaCount=1", "--set", "leaderElection.enabled=false"],
    )?;
    let tidepool = json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "metadata": {"name": "shop"},
        "spec": {
            "imagePullPolicy": "IfNotPresent",
            "database": {"secretRef": {"name": "pg-app"}, "maxConnections": MAX_CONNECTIONS,
                "reservedConnections": RESERVED_CONNECTIONS,
                "tls": {"mode": "verify-full", "caSecretRef": {"name": "pg-ca"}}},
            // The seed's sizes: ten slow requests at once, fifty jobs at
            // once in one worker pod.
            "web": {"replicas": 1, "concurrency": 100, "databasePool": 10},
            "worker": {"replicas": 1, "concurrency": 50, "listen": true},
            "nodeSelector": {"type": "real"},
            "tolerations": [{"key": Node::TAINT, "operator": "Exists", "effect": "NoSchedule"}]
        }
    });
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&tidepool.to_string()))?;
    let ready = common::wait_rolled(kube, &ns.name, 1, Duration::from_secs(300))
        .with_context(|| describe(kube, &ns.name, &cluster))?;
    let (status, reason, _) =
        common::condition(&ready, "DatabaseTLSVerified").context("the TLS condition")?;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "VerifyFull"));

    // Every backend of the app's role is encrypted (read as the superuser,
    // in the instance's pod).
    let backends = wait_for("the app's backends", Duration::from_secs(60), || {
        let counts = cluster.psql(
            "postgres",
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'app'",
        )?;
        let (all, encrypted) = counts.split_once('|').context("two counts")?;
        let (all, encrypted): (u32, u32) = (all.parse()?, encrypted.parse()?);
        Ok((all >= 2).then_some((all, encrypted)))
    })?;
    assert_eq!(backends.0, backends.1, "every backend of the app's role is encrypted: {backends:?}");
    let node = Node::from_env()?;
    let service = kube.get_json(&["-n", &ns.name, "service/shop-web"])?;
    let ip = service["spec"]["clusterIP"].as_str().context("a ClusterIP")?.to_owned();
    let web_url = |path: &str| format!("http://{ip}{path}");
    wait_for("the web Service to serve", Duration::from_secs(60), || {
        Ok((node.curl(&[&web_url("/row/")])?.0 == 200).then_some(()))
    })?;

    // CloudNativePG's own sessions, which `reservedConnections` covers
    // beside PostgreSQL's superuser_reserved_connections and the queue
    // scaler's one connection.
    let own: u32 = cluster
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename <> 'app'",
        )?
        .parse()?;
    let superuser_reserved: u32 = cluster.psql("postgres", "SHOW superuser_reserved_connections")?.parse()?;
    assert!(
        own + superuser_reserved < RESERVED_CONNECTIONS,
        "reservedConnections {RESERVED_CONNECTIONS} covers {own} sessions, {superuser_reserved} reserved and the scaler"
    );

    let app = App { kube, ns: &ns.name, instance: cluster.instance(), node: &node, web_url: web_url("") };
    seeds_experiments(&app)?;
    password_rotated_through_the_app_secret(&app, &cluster, &web_url("/row/"), (own, superuser_reserved))?;
    instance_pod_deleted_under_load(&app, &cluster, &web_url("/row/"))?;
    budget_under_twice_the_planned_load(&app)?;
    Ok(())
}

/// What each step reads and drives: the Tidepool `shop` in `ns`, the
/// instance, and the node the load runs in.
struct App<'a> {
    kube: &'static Kube,
    ns: &'a str,
    instance: Instance<'static>,
    node: &'a Node,
    /// The web Service's base URL (`http://<ClusterIP>`).
    web_url: String,
}

impl App<'_> {
    fn tidepool(&self) -> Result<Value> {
        self.kube.get_json(&["-n", self.ns, "tidepool/shop"])
    }

    fn count(&self, sql: &str) -> Result<i64> {
        self.instance.psql("app", sql)?.parse().with_context(|| format!("a count from {sql:?}"))
    }

    /// `tidepool enqueue` in the worker pod, as an operator of the app runs
    /// it: through the pod's PgBouncer, as the pod's own client.
    fn enqueue(&self, task: &str, args: &str, count: u32, batch_size: u32) -> Result<()> {
        let (count, batch_size) = (count.to_string(), batch_size.to_string());
        self.kube.kubectl(
            &[
                "exec",
                "-n",
                self.ns,
                "deployment/shop-worker",
                "-c",
                "worker",
                "--",
                "tidepool",
                "enqueue",
                task,
                "--args",
                args,
                "--count",
                &count,
                "--batch-size",
                &batch_size,
            ],
            None,
        )?;
        Ok(())
    }

    /// Waits until no job is left; the finished ones by state.
    fn wait_drained(&self, limit: Duration) -> Result<BTreeMap<String, i64>> {
        wait_drained(|sql| self.instance.psql("app", sql), limit)
    }

    /// A sampler of `sql` (a count) in the app's database.
    fn sampler(&self, sql: String) -> Sampler {
        let instance = self.instance.clone();
        Sampler::counting(move || instance.psql("app", &sql)?.parse().context("a count"))
    }

    fn restarts(&self) -> Result<i64> {
        let pods = self.kube.get_json(&["-n", self.ns, "pods", "-l", "app.kubernetes.io/instance=shop"])?;
        Ok(pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["status"]["containerStatuses"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["restartCount"].as_i64())
            .sum())
    }
}

/// The seed's two experiments through Kubernetes, on PostgreSQL 17: ten
/// slow requests through the web Service run at once, and a hundred slow
/// jobs run fifty at a time in one worker pod of concurrency 50 (the same
/// as `real_node_e2e`'s on the host's PostgreSQL, for the benchmark's side
/// by side).
fn seeds_experiments(app: &App<'_>) -> Result<()> {
    let sleeping = app.sampler(app_role().sleeping_sql());
    let url = format!("{}/slow-query/?seconds=5", app.web_url);
    let report = Load::burst(app.node, &url, 10, "60s")?.finish()?;
    let samples = sleeping.finish()?;
    assert_eq!(report["succeeded"], 10, "{report}");
    let together = peak(&samples);
    assert_eq!(together, 10, "the ten requests' queries run at once: {report}");

    let sampler = app.sampler(app_role().sleeping_sql());
    app.enqueue("slow_query", r#"{"seconds": 5}"#, 100, 1)?;
    wait_for("50 slow jobs at once", Duration::from_secs(60), || {
        Ok((app.count(&app_role().sleeping_sql())? >= 50).then_some(()))
    })?;
    let finished = app.wait_drained(Duration::from_secs(120))?;
    let samples = sampler.finish()?;
    assert_eq!(finished, BTreeMap::from([("succeeded".to_owned(), 100)]));
    let jobs_peak = peak(&samples);
    assert!(jobs_peak <= 50, "at most the worker's concurrency runs at once: {jobs_peak}");
    record_figures(
        "cloudnative_pg_seed",
        json!({"requests_seconds": report["total_seconds"], "requests_peak": together,
            "jobs_seconds": jobs_span_seconds_by(|sql| app.instance.psql("app", sql), SpanFrom::Created)?, "jobs_peak": jobs_peak}),
    )
}

/// A rotation as CloudNativePG documents it: a new password in
/// `<cluster>-app`; its instance manager sets it in PostgreSQL, the
/// operator rolls the pods. Under 10 clients: the requests that fail fall
/// within the change and the roll, and afterwards every backend of the
/// app's role logged in after the change.
fn password_rotated_through_the_app_secret(
    app: &App<'_>,
    cluster: &Cluster<'_>,
    url: &str,
    (own, superuser_reserved): (u32, u32),
) -> Result<()> {
    let started = Instant::now();
    let load = Load::steady_timed(app.node, url, 10, "10s")?;
    wait_for("the load to be answered", Duration::from_secs(30), || {
        Ok((app.node.curl(&[url])?.0 == 200).then_some(()))
    })?;
    let changing = started.elapsed();
    let changed_at = cluster.psql("postgres", "SELECT now()::text")?;
    let patch = json!({"stringData": {"password": "rotated-by-the-test-0123456789"}});
    app.kube.kubectl(
        &["patch", "secret/pg-app", "-n", app.ns, "--type", "merge", "-p", &patch.to_string()],
        None,
    )?;
    let stale = || -> Result<(u32, u32)> {
        let counts = cluster.psql(
            "postgres",
            &format!(
                "SELECT count(*) FILTER (WHERE backend_start < '{changed_at}'), count(*) \
                 FROM pg_stat_activity WHERE usename = 'app'"
            ),
        )?;
        let (old, all) = counts.split_once('|').context("two counts")?;
        Ok((old.parse()?, all.parse()?))
    };
    wait_for("every backend of the app's role logged in anew", Duration::from_secs(300), || {
        let (old, all) = stale()?;
        Ok((old == 0 && all >= 2).then_some(()))
    })
    .with_context(|| format!("backends: {:?}; {}", stale().ok(), describe(app.kube, app.ns, cluster)))?;
    let rolled = started.elapsed();
    common::wait_ready(app.kube, app.ns, Duration::from_secs(120))?;
    let report = load.finish()?;
    let window = changing.as_secs_f64() - 1.0..rolled.as_secs_f64() + 10.0;
    let failures = failures_at(&report);
    assert!(failures.iter().all(|at| window.contains(at)), "failures outside {window:?}: {failures:?}");
    assert!(report["succeeded"].as_i64().unwrap_or(0) > 0, "{report}");
    // The new password is PostgreSQL's: a login with it over TCP succeeds.
    let login = app.kube.kubectl(
        &[
            "exec",
            "-n",
            app.ns,
            "pg-1",
            "-c",
            "postgres",
            "--",
            "psql",
            "-X",
            "-At",
            "-c",
            "SELECT current_user",
            "postgresql://app:rotated-by-the-test-0123456789@127.0.0.1:5432/app?sslmode=require",
        ],
        None,
    )?;
    assert_eq!(login.trim(), "app");
    record_figures(
        "cloudnative_pg_rotation",
        json!({"requests": report["requests"], "failed": failures.len(),
            "rolled_seconds": (rolled - changing).as_secs_f64(),
            "cloudnative_pg_sessions": own, "superuser_reserved_connections": superuser_reserved}),
    )
}

/// The instance's pod deleted under 5 clients: CloudNativePG starts it again
/// on its volume; the Tidepool's pods ride it out with no container
/// restarts, every request answered (200, or 500/503/504 from the app's
/// own bounds) within them, then 200s again.
fn instance_pod_deleted_under_load(app: &App<'_>, cluster: &Cluster<'_>, url: &str) -> Result<()> {
    let before = app.restarts()?;
    let instance = cluster.get()?["status"]["currentPrimary"].as_str().unwrap_or("pg-1").to_owned();
    let uid = app.kube.get_json(&["-n", app.ns, "pod", &instance])?["metadata"]["uid"].clone();
    let load = Load::steady_timed(app.node, url, 5, "60s")?;
    let deleted_at = Instant::now();
    app.kube.kubectl(&["delete", "pod", "-n", app.ns, &instance, "--wait=false"], None)?;
    wait_for("a new instance pod", Duration::from_secs(120), || {
        let pod = app.kube.get_json(&["-n", app.ns, "pod", &instance]).ok();
        Ok(pod.filter(|p| p["metadata"]["uid"] != uid).map(drop))
    })?;
    cluster.wait_healthy()?;
    let healthy_seconds = deleted_at.elapsed().as_secs_f64();
    wait_for("/row/ to answer 200 again", Duration::from_secs(120), || {
        Ok((app.node.curl(&[url])?.0 == 200).then_some(()))
    })?;
    let serving_seconds = deleted_at.elapsed().as_secs_f64();
    common::wait_ready(app.kube, app.ns, Duration::from_secs(120))?;
    let report = load.finish()?;
    assert_eq!(app.restarts()?, before, "no container of the Tidepool restarted");
    let statuses = report["statuses"].as_object().cloned().unwrap_or_default();
    // 503: no connection within the pool wait; 504: the query's own
    // timeout; 500: the query failed as the server went. Never no answer.
    assert!(
        statuses.keys().all(|s| matches!(s.as_str(), "200" | "500" | "503" | "504")),
        "every request was answered: {}",
        report["statuses"]
    );
    // The web app's bounds (a pool wait of 5 s, a query timeout of 10 s)
    // with slack for a busy machine.
    let slowest = report["latency_max_seconds"].as_f64().unwrap_or(f64::MAX);
    assert!(slowest <= 20.0, "a request took {slowest} s: {report}");
    record_figures(
        "cloudnative_pg_instance_deleted",
        json!({"healthy_seconds": healthy_seconds, "serving_seconds": serving_seconds,
            "requests": report["requests"], "statuses": report["statuses"]}),
    )
}

/// The budget with `max_connections` the instance's own: the Tidepool
/// resized so that its asks pass `available` (the operator shares it out),
/// its worker tier scaled by the queue scaler in the operator's pod (which
/// reads the queue at `pg-rw` by name, verify-full), and a load that asks
/// for more than twice the planned server connections. PostgreSQL refuses
/// no connection, the app's connections stay within the plan, and the
/// excess is shed or waits, bounded.
fn budget_under_twice_the_planned_load(app: &App<'_>) -> Result<()> {
    let patch = json!({"spec": {
        "web": {"replicas": 2, "concurrency": 200, "databasePool": 8},
        "worker": {"replicas": 1, "concurrency": 40,
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "pollingIntervalSeconds": 1,
                "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 600,
                "queues": [{"name": "default", "targetAvailableJobsPerReplica": 40}]}}}});
    app.kube.kubectl(
        &["patch", "tidepool/shop", "-n", app.ns, "--type", "merge", "-p", &patch.to_string()],
        None,
    )?;
    let generation = app.tidepool()?["metadata"]["generation"].as_i64().context("a generation")?;
    common::wait_rolled(app.kube, app.ns, generation, Duration::from_secs(300))?;
    wait_for("the queue scaler to read the queue at pg-rw", Duration::from_secs(60), || {
        Ok(common::condition(&app.tidepool()?, "WorkerAutoscaling").filter(|(s, _, _)| s == "True"))
    })?;
    // Its connection comes from the operator's pod, encrypted.
    let operator_pod =
        app.kube.get_json(&["-n", app.ns, "pods", "-l", "app.kubernetes.io/component=operator"])?;
    let operator_ip =
        operator_pod["items"][0]["status"]["podIP"].as_str().context("the operator's pod IP")?;
    let expected = format!("{operator_ip}|t");
    wait_for("the scaler's connection, from the operator's pod, encrypted", Duration::from_secs(60), || {
        let scaler = app.instance.psql(
            "postgres",
            "SELECT host(client_addr), s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'tidepool-operator'",
        )?;
        Ok((scaler == expected).then_some(()))
    })?;
    app.instance.psql("app", "DELETE FROM tidepool_job_results")?;
    let status = app.tidepool()?["status"].clone();
    let planned = status["connections"]["plannedPeak"].as_i64().context("plannedPeak")?;
    let available = status["connections"]["available"].as_i64().context("available")?;
    assert_eq!(available, i64::from(MAX_CONNECTIONS - RESERVED_CONNECTIONS), "{status}");
    assert!(planned <= available, "{status}");

    // The app's connections, the scaler's (in the reserve) left out.
    let connections =
        app.sampler(format!("{} AND application_name <> 'tidepool-operator'", app_role().connections_sql()));
    let (requests, jobs) = (200, 300);
    app.enqueue("slow_query", r#"{"seconds": 1}"#, jobs, 100)?;
    let burst = Load::burst(app.node, &format!("{}/slow-query/?seconds=1", app.web_url), requests, "120s")?;
    // The queue scaler, reading through the cluster's DNS, asks for the
    // second worker pod.
    wait_for("the worker tier scaled to 2 for the backlog", Duration::from_secs(60), || {
        let last = app.tidepool()?["status"]["worker"]["lastScale"].clone();
        Ok((last["to"] == 2 && last["reason"] == "QueueBacklog").then_some(last))
    })
    .with_context(|| format!("{}", app.tidepool().map(|t| t["status"].clone()).unwrap_or_default()))?;
    let report = burst.finish()?;
    let finished = app.wait_drained(Duration::from_secs(240))?;
    let samples = connections.finish()?;

    let (peak, ok, shed) = Overload {
        requests: requests as i64,
        // At once: the requests and both worker pods' concurrency.
        offered: requests as i64 + 2 * 40,
        planned,
        server_log: &app.instance.log()?,
        samples: &samples,
        report: &report,
    }
    .assert_held();
    assert_eq!(finished, BTreeMap::from([("succeeded".to_owned(), i64::from(jobs))]));
    record_figures(
        "cloudnative_pg_budget",
        json!({"requests": requests, "ok": ok, "shed": shed, "jobs": jobs,
            "peak": peak, "planned": planned, "available": available, "max_connections": MAX_CONNECTIONS}),
    )
}

/// The Tidepool's pods and events, then the Cluster's, for a failure's
/// message.
fn describe(kube: &Kube, ns: &str, cluster: &Cluster<'_>) -> String {
    let pods = kube.kubectl(&["get", "pods,events", "-n", ns, "-o", "wide"], None).unwrap_or_default();
    let tidepool = kube.kubectl(&["get", "tidepool/shop", "-n", ns, "-o", "yaml"], None).unwrap_or_default();
    format!("{pods}\ntidepool:\n{tidepool}\ncluster:\n{}", cluster.describe())
}
