//! The operator at scale, against the control plane of `make kube-up` (kwok
//! pods): run by scripts/bench-operator.sh, which writes the report.
//!
//! Starts the release `tidepool-operator run` (cluster-wide, no leader
//! election) as a process, then:
//! 1. applies `BENCH_TIDEPOOLS` (200) Tidepools at 10 per second, and
//! 2. as many more at once (32 requests in flight),
//!
//! each with a Secret of its own (its own database server), and times from
//! each create's answer until its first child (the migration Job) and its
//! last (the worker Deployment, applied once kwok has completed the Job)
//! appear on a Deployment and Job watch, and from the Job's success to the
//! last child (the operator's part of the second half); then
//! 3. adds Tidepools up to `BENCH_TOTAL` (1,000), waits until the operator
//!    is at rest (its reconcile count unchanged for 10 s), and for
//!    `BENCH_REST_SECONDS` (60) reads its RSS and CPU time and counts the
//!    writes per client in the API server's audit log.
//!
//! Prints one JSON object with every figure. Every wait is bounded.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Seek};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::PostParams;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use tidepool_operator::crd::Tidepool;

const METRICS: &str = "127.0.0.1:18380";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// When each Tidepool was created and when its children appeared.
#[derive(Default)]
struct Timeline {
    created: HashMap<String, Instant>,
    first_child: HashMap<String, Instant>,
    /// When its migration Job was first seen complete.
    migrated: HashMap<String, Instant>,
    last_child: HashMap<String, Instant>,
}

/// Latencies in milliseconds of `seen` after `created`, sorted.
fn latencies(
    created: &HashMap<String, Instant>,
    seen: &HashMap<String, Instant>,
    names: &[String],
) -> Vec<f64> {
    let mut all: Vec<f64> = names
        .iter()
        .filter_map(|n| Some(seen.get(n)?.saturating_duration_since(*created.get(n)?).as_secs_f64() * 1000.0))
        .collect();
    all.sort_by(f64::total_cmp);
    all
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(timeline: &Timeline, names: &[String]) -> Value {
    let first = latencies(&timeline.created, &timeline.first_child, names);
    let last = latencies(&timeline.created, &timeline.last_child, names);
    let after_migration = latencies(&timeline.migrated, &timeline.last_child, names);
    json!({
        "count": names.len(),
        "after_migration_ms": {"p50": percentile(&after_migration, 50.0), "p99": percentile(&after_migration, 99.0), "max": percentile(&after_migration, 100.0)},
        "first_child_ms": {"p50": percentile(&first, 50.0), "p99": percentile(&first, 99.0), "max": percentile(&first, 100.0)},
        "all_children_ms": {"p50": percentile(&last, 50.0), "p99": percentile(&last, 99.0), "max": percentile(&last, 100.0), "seen": last.len()},
    })
}

fn secret(name: &str, index: usize) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "stringData": {"username": "app", "password": "bench-only", "host": format!("db-{index}.example"), "port": "5432", "dbname": "app"},
    }))
    .unwrap_or_default()
}

fn tidepool(name: &str) -> Result<Tidepool> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool", "metadata": {"name": name},
        "spec": {
            "database": {"secretRef": {"name": name}, "maxConnections": 100},
            "web": {"replicas": 1, "databasePool": 10},
            "worker": {"replicas": 1, "concurrency": 10},
        },
    }))?)
}

/// The operator process, killed when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metrics() -> Result<String> {
    let mut stream = std::net::TcpStream::connect(METRICS)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    std::io::Write::write_all(
        &mut stream,
        b"GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n",
    )?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

fn reconciles() -> Result<f64> {
    Ok(metrics()?
        .lines()
        .filter(|l| l.starts_with("tidepool_operator_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// RSS and its peak (MiB), and CPU seconds (user + system) of `pid`.
fn usage(pid: u32) -> Result<(f64, f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; 11 and 12 after the name.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0, cpu))
}

/// Waits until `check` holds, polling every 200 ms, for at most `limit`.
async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check()? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

async fn namespace(client: &Client, name: &str) -> Result<()> {
    let object: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating namespace {name} (the benchmark wants a fresh control plane)"))?;
    Ok(())
}

/// Creates Secrets then Tidepools `from..to` in `ns`: paced at `per_second`,
/// or all at once with 32 in flight when `per_second` is 0.
async fn create(
    client: &Client,
    ns: &str,
    range: std::ops::Range<usize>,
    per_second: u32,
    timeline: &Arc<Mutex<Timeline>>,
) -> Result<Vec<String>> {
    let names: Vec<String> = range.clone().map(|i| format!("tp-{i:04}")).collect();
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    futures::stream::iter(names.iter().zip(range.clone()))
        .map(|(name, i)| {
            let secrets = secrets.clone();
            async move { secrets.create(&PostParams::default(), &secret(name, i)).await.map(drop) }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let tidepools = Api::<Tidepool>::namespaced(client.clone(), ns);
    let create_one = |name: String| {
        let (tidepools, timeline) = (tidepools.clone(), timeline.clone());
        async move {
            tidepools.create(&PostParams::default(), &tidepool(&name)?).await?;
            if let Ok(mut timeline) = timeline.lock() {
                timeline.created.insert(format!("{ns}/{name}"), Instant::now());
            }
            anyhow::Ok(())
        }
    };
    if per_second == 0 {
        futures::stream::iter(names.iter().cloned().map(create_one))
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await?;
    } else {
        let mut ticks = tokio::time::interval(Duration::from_secs(1) / per_second);
        for name in &names {
            ticks.tick().await;
            create_one(name.clone()).await?;
        }
    }
    Ok(names.iter().map(|n| format!("{ns}/{n}")).collect())
}

/// Records when each Tidepool's Job and worker Deployment first appear.
fn watch_children(client: &Client, timeline: Arc<Mutex<Timeline>>) {
    let jobs = watcher(
        Api::<Job>::all(client.clone()),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=tidepool-operator"),
    )
    .default_backoff()
    .applied_objects();
    let record_jobs = timeline.clone();
    tokio::spawn(jobs.for_each(move |job| {
        if let (Ok(job), Ok(mut timeline)) = (job, record_jobs.lock()) {
            if let Some(owner) = job.labels().get("app.kubernetes.io/instance") {
                let key = format!("{}/{owner}", job.namespace().unwrap_or_default());
                timeline.first_child.entry(key.clone()).or_insert_with(Instant::now);
                if job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) >= 1 {
                    timeline.migrated.entry(key).or_insert_with(Instant::now);
                }
            }
        }
        async {}
    }));
    let deployments = watcher(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=tidepool-operator"),
    )
    .default_backoff()
    .applied_objects();
    tokio::spawn(deployments.for_each(move |deployment| {
        if let (Ok(deployment), Ok(mut timeline)) = (deployment, timeline.lock()) {
            let name = deployment.name_any();
            if let Some(owner) = name.strip_suffix("-worker") {
                let key = format!("{}/{owner}", deployment.namespace().unwrap_or_default());
                timeline.last_child.entry(key).or_insert_with(Instant::now);
            }
        }
        async {}
    }));
}

/// Writes per client (`userAgent`, up to its first space) in the audit log
/// after byte `from`.
fn audit_writes(path: &str, from: u64) -> Result<BTreeMap<String, u64>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut writes = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(entry) = serde_json::from_str::<Value>(&line?) else { continue };
        let agent = entry["userAgent"].as_str().unwrap_or("").split(' ').next().unwrap_or("").to_owned();
        let resource = entry["objectRef"]["resource"].as_str().unwrap_or("").to_owned();
        *writes.entry(format!("{agent} {resource}")).or_insert(0) += 1;
    }
    Ok(writes)
}

async fn run() -> Result<Value> {
    let count = env_number("BENCH_TIDEPOOLS", 200);
    let total = env_number("BENCH_TOTAL", 1000).max(2 * count);
    let rest = Duration::from_secs(env_number("BENCH_REST_SECONDS", 60) as u64);
    let binary = std::env::var("TIDEPOOL_OPERATOR_BIN").context("TIDEPOOL_OPERATOR_BIN")?;
    let audit = std::env::var("BENCH_AUDIT_LOG").context("BENCH_AUDIT_LOG")?;
    let client = Client::try_default().await.context("a client from KUBECONFIG")?;
    let log = std::fs::File::create(std::env::var("BENCH_OPERATOR_LOG").unwrap_or("/dev/null".into()))?;
    let operator = Operator(
        Command::new(&binary)
            .args(["run", "--no-leader-election", "--listen", METRICS, "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {binary}"))?,
    );
    let pid = operator.0.id();
    until("the operator to answer", Duration::from_secs(30), || Ok(reconciles().is_ok())).await?;
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    watch_children(&client, timeline.clone());
    let all_children = |names: &[String]| {
        let timeline = timeline.clone();
        let names = names.to_vec();
        move || {
            Ok(timeline.lock().map(|t| names.iter().all(|n| t.last_child.contains_key(n))).unwrap_or(false))
        }
    };

    namespace(&client, "bench-paced").await?;
    let paced = create(&client, "bench-paced", 0..count, 10, &timeline).await?;
    until("the paced Tidepools' children", Duration::from_secs(600), all_children(&paced)).await?;

    namespace(&client, "bench-burst").await?;
    let burst_started = Instant::now();
    let burst = create(&client, "bench-burst", count..2 * count, 0, &timeline).await?;
    let burst_created = burst_started.elapsed();
    until("the burst's children", Duration::from_secs(600), all_children(&burst)).await?;
    let burst_done = burst_started.elapsed();

    namespace(&client, "bench-many").await?;
    let many = create(&client, "bench-many", 2 * count..total, 0, &timeline).await?;
    until("the children of all", Duration::from_secs(1200), all_children(&many)).await?;
    // At rest: no reconcile for 10 s.
    let mut last = (reconciles()?, Instant::now());
    until("the operator to come to rest", Duration::from_secs(600), || {
        let now = reconciles()?;
        if now != last.0 {
            last = (now, Instant::now());
        }
        Ok(last.1.elapsed() >= Duration::from_secs(10))
    })
    .await?;
    let audit_from = std::fs::metadata(&audit)?.len();
    let (_, _, cpu_before) = usage(pid)?;
    let reconciles_before = reconciles()?;
    tokio::time::sleep(rest).await;
    let (rss, peak, cpu_after) = usage(pid)?;
    let writes = audit_writes(&audit, audit_from)?;
    let per_minute: BTreeMap<String, f64> =
        writes.into_iter().map(|(k, n)| (k, n as f64 * 60.0 / rest.as_secs_f64())).collect();
    let timeline = timeline.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(json!({
        "paced": summary(&timeline, &paced),
        "burst": summary(&timeline, &burst),
        "burst_created_s": burst_created.as_secs_f64(),
        "burst_all_children_s": burst_done.as_secs_f64(),
        "total": total,
        "rest_seconds": rest.as_secs(),
        "rss_mib": rss,
        "peak_rss_mib": peak,
        "cpu_percent_at_rest": (cpu_after - cpu_before) * 100.0 / rest.as_secs_f64(),
        "cpu_seconds_total": cpu_after,
        "reconciles_at_rest": reconciles()? - reconciles_before,
        "writes_per_minute_at_rest": per_minute,
    }))
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; nothing else is taken.
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(run())?;
    println!("{report}");
    Ok(())
}
