//! A Tidepool on a CloudNativePG cluster, as a CloudNativePG user sets it
//! up: CloudNativePG's operator (from its release manifest, the image built
//! from its Go module), a `Cluster` of one PostgreSQL 17 instance on the
//! real node, and a Tidepool whose `secretRef` is the cluster's
//! `<cluster>-app` and whose TLS is `verify-full` with `<cluster>-ca`, with
//! nothing copied or edited by hand; then the app user's password rotated
//! through `<cluster>-app` under load, as CloudNativePG documents it, and
//! the instance's pod deleted under load.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::shop::{failures_at, record_figures, Load};
use common::{condition, kube_with_crd, Operator};
use serde_json::json;
use tidepool_testenv::cloudnative_pg::{self, Cluster};
use tidepool_testenv::node::Node;
use tidepool_testenv::wait_for;

#[test]
fn a_tidepool_on_a_cloudnative_pg_cluster_goes_ready_verified_on_postgresql_17() -> Result<()> {
    let kube = kube_with_crd()?;
    cloudnative_pg::install(kube)?;
    let ns = kube.namespace("cnpg")?;
    let cluster = Cluster::create(kube, &ns.name, "pg", 100)?;
    let version: u32 = cluster.psql("postgres", "SHOW server_version_num")?.parse()?;
    assert!((170_000..180_000).contains(&version), "PostgreSQL 17: {version}");

    let _operator = Operator::start(&ns.name)?;
    let tidepool = json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "metadata": {"name": "shop"},
        "spec": {
            "imagePullPolicy": "IfNotPresent",
            "database": {"secretRef": {"name": "pg-app"}, "maxConnections": 100, "reservedConnections": 10,
                "tls": {"mode": "verify-full", "caSecretRef": {"name": "pg-ca"}}},
            "web": {"replicas": 1},
            "worker": {"replicas": 1, "listen": true},
            "nodeSelector": {"type": "real"},
            "tolerations": [{"key": Node::TAINT, "operator": "Exists", "effect": "NoSchedule"}]
        }
    });
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&tidepool.to_string()))?;
    let ready =
        common::wait_ready(kube, &ns.name, Duration::from_secs(300)).with_context(|| cluster.describe())?;
    let (status, reason, _) = condition(&ready, "DatabaseTLSVerified").context("the TLS condition")?;
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
    let ip = service["spec"]["clusterIP"].as_str().context("a ClusterIP")?;
    let url = format!("http://{ip}/row/");
    let (code, body) = node.curl(&[&url])?;
    assert_eq!(code, 200, "{body}");

    // CloudNativePG's own sessions, which `reservedConnections` covers
    // beside PostgreSQL's superuser_reserved_connections.
    let own: u32 = cluster
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename <> 'app'",
        )?
        .parse()?;
    let superuser_reserved: u32 = cluster.psql("postgres", "SHOW superuser_reserved_connections")?.parse()?;
    assert!(
        own + superuser_reserved <= 10,
        "reservedConnections 10 covers {own} sessions and {superuser_reserved} reserved"
    );

    // A rotation as CloudNativePG documents it: a new password in
    // `<cluster>-app`; its instance manager sets it in PostgreSQL, the
    // operator rolls the pods. Under 10 clients.
    let started = Instant::now();
    let load = Load::steady_timed(&node, &url, 10, "10s")?;
    wait_for("the load to be answered", Duration::from_secs(30), || {
        Ok((node.curl(&[&url])?.0 == 200).then_some(()))
    })?;
    let changing = started.elapsed();
    let changed_at = cluster.psql("postgres", "SELECT now()::text")?;
    let patch = json!({"stringData": {"password": "rotated-by-the-test-0123456789"}});
    kube.kubectl(
        &["patch", "secret/pg-app", "-n", &ns.name, "--type", "merge", "-p", &patch.to_string()],
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
    .with_context(|| format!("backends: {:?}; {}", stale().ok(), cluster.describe()))?;
    let rolled = started.elapsed();
    common::wait_ready(kube, &ns.name, Duration::from_secs(120))?;
    let report = load.finish()?;
    let window = changing.as_secs_f64() - 1.0..rolled.as_secs_f64() + 10.0;
    let failures = failures_at(&report);
    assert!(failures.iter().all(|at| window.contains(at)), "failures outside {window:?}: {failures:?}");
    assert!(report["succeeded"].as_i64().unwrap_or(0) > 0, "{report}");
    // The new password is PostgreSQL's: a login with it over TCP succeeds.
    let login = kube.kubectl(
        &[
            "exec",
            "-n",
            &ns.name,
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
    instance_pod_deleted_under_load(kube, &ns.name, &cluster, &node, &url)?;
    record_figures(
        "cloudnative_pg_rotation",
        json!({"requests": report["requests"], "failed": failures.len(),
            "rolled_seconds": (rolled - changing).as_secs_f64(),
            "cloudnative_pg_sessions": own, "superuser_reserved_connections": superuser_reserved}),
    )?;
    Ok(())
}

/// The instance's pod deleted under 5 clients: CloudNativePG starts it again
/// on its volume; the Tidepool's pods ride it out with no container
/// restarts, every request answered (200, or 503 from the app's own bounds)
/// within them, then 200s again.
fn instance_pod_deleted_under_load(
    kube: &tidepool_testenv::Kube,
    ns: &str,
    cluster: &Cluster<'_>,
    node: &Node,
    url: &str,
) -> Result<()> {
    let restarts = || -> Result<i64> {
        let pods = kube.get_json(&["-n", ns, "pods", "-l", "app.kubernetes.io/instance=shop"])?;
        Ok(pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["status"]["containerStatuses"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["restartCount"].as_i64())
            .sum())
    };
    let before = restarts()?;
    let instance = cluster.get()?["status"]["currentPrimary"].as_str().unwrap_or("pg-1").to_owned();
    let uid = kube.get_json(&["-n", ns, "pod", &instance])?["metadata"]["uid"].clone();
    let load = Load::steady_timed(node, url, 5, "60s")?;
    let deleted_at = Instant::now();
    kube.kubectl(&["delete", "pod", "-n", ns, &instance, "--wait=false"], None)?;
    wait_for("a new instance pod", Duration::from_secs(120), || {
        let pod = kube.get_json(&["-n", ns, "pod", &instance]).ok();
        Ok(pod.filter(|p| p["metadata"]["uid"] != uid).map(drop))
    })?;
    cluster.wait_healthy()?;
    let healthy_seconds = deleted_at.elapsed().as_secs_f64();
    wait_for("/row/ to answer 200 again", Duration::from_secs(120), || {
        Ok((node.curl(&[url])?.0 == 200).then_some(()))
    })?;
    let serving_seconds = deleted_at.elapsed().as_secs_f64();
    common::wait_ready(kube, ns, Duration::from_secs(120))?;
    let report = load.finish()?;
    assert_eq!(restarts()?, before, "no container of the Tidepool restarted");
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
