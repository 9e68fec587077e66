//! A Tidepool on the real node for the end-to-end tests: [`Shop`] (a
//! namespace, its database and role, an operator, the Tidepool), the load
//! generator in the node's network namespace ([`Load`]), and the figures a
//! benchmark reads back ([`record_figures`]).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tidepool_testenv::node::{output, path_arg, release_binary, AppDatabase, Node, Postgres};
use tidepool_testenv::{wait_for, Kube, Namespace};

use super::{kube_with_crd, merge, Operator};

/// A Tidepool named `shop` on the real node, in a namespace of its own,
/// with its own database and role on `pg`, reconciled by an operator
/// running in the test.
pub struct Shop {
    pub kube: &'static Kube,
    pub ns: Namespace<'static>,
    pub db: AppDatabase,
    pub pg: Postgres,
    pub node: Node,
    pub operator: Operator,
}

impl Shop {
    /// Deploys `spec` (merged over the base: real node, the Secret) and
    /// waits until the Tidepool is Ready. `prepare` runs on the new role
    /// before any pod connects (e.g. `ALTER ROLE ... SET`).
    pub fn deploy(pg: &Postgres, prefix: &str, spec: Value, prepare: Option<&str>) -> Result<Shop> {
        Self::deploy_with(pg, prefix, spec, Setup { prepare, ..Setup::default() })
    }

    /// [`Shop::deploy`] as `setup` says.
    pub fn deploy_with(pg: &Postgres, prefix: &str, spec: Value, setup: Setup<'_>) -> Result<Shop> {
        let Setup { prepare, database, beside } = setup;
        let kube = kube_with_crd()?;
        let node = Node::from_env()?;
        let ns = kube.namespace(prefix)?;
        let db = AppDatabase::create(pg, &ns.name.replace('-', "_"))?;
        if let Some(sql) = prepare {
            pg.psql("postgres", &sql.replace("{role}", &db.name))?;
        }
        let objects = match database {
            Database::HostAddress => db.secret("shop-app", &node.host_ip, pg.port),
            Database::ServiceName => {
                let scaler = AppDatabase {
                    name: format!("{}_scaler", db.name),
                    password: format!("{}-scaler", db.password),
                };
                pg.psql(
                    "postgres",
                    &format!(
                        "CREATE ROLE {0} LOGIN PASSWORD '{1}' CONNECTION LIMIT 2",
                        scaler.name, scaler.password
                    ),
                )?;
                // The tables the migration creates as the app's role are
                // readable by the scaler's.
                pg.psql(
                    &db.name,
                    &format!(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT SELECT ON TABLES TO {}",
                        db.name, scaler.name
                    ),
                )?;
                let mut scaler_secret: Value =
                    serde_json::from_str(&scaler.secret("shop-scaler", "127.0.0.1", pg.port))?;
                scaler_secret["stringData"]["dbname"] = json!(db.name);
                let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop-db"},
                    "spec": {"ports": [{"name": "postgres", "port": pg.port, "protocol": "TCP"}]}});
                let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "shop-db-host", "labels": {"kubernetes.io/service-name": "shop-db"}},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [node.host_ip], "conditions": {"ready": true}}],
                    "ports": [{"name": "postgres", "port": pg.port, "protocol": "TCP"}]});
                format!(
                    "{}\n---\n{scaler_secret}\n---\n{service}\n---\n{slice}",
                    db.secret("shop-app", "shop-db", pg.port)
                )
            }
        };
        kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&objects))?;
        if !beside.is_empty() {
            kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(beside))?;
        }
        let operator = Operator::start(&ns.name)?;
        let mut tidepool = json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool",
            "metadata": {"name": "shop"},
            "spec": {
                "imagePullPolicy": "IfNotPresent",
                "database": {"secretRef": {"name": "shop-app"}},
                "nodeSelector": {"type": "real"},
                "tolerations": [{"key": Node::TAINT, "operator": "Exists", "effect": "NoSchedule"}]
            }
        });
        merge(&mut tidepool["spec"], &spec);
        kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&tidepool.to_string()))?;
        let shop = Shop { kube, ns, db, pg: pg.clone(), node, operator };
        shop.wait_ready(1)?;
        // kube-proxy programs the new Service's rules a moment after its
        // endpoints are ready (until then its ClusterIP refuses).
        shop.wait_serving()?;
        Ok(shop)
    }

    pub fn tidepool(&self) -> Result<Value> {
        self.kube.get_json(&["-n", &self.ns.name, "tidepool/shop"])
    }

    /// Waits until the Tidepool of generation `generation` or later is
    /// Ready with every replica ready; its status.
    pub fn wait_ready(&self, generation: i64) -> Result<Value> {
        super::wait_rolled(self.kube, &self.ns.name, generation, Duration::from_secs(300))
            .with_context(|| self.describe())
    }

    /// Waits until `/readyz` through the web Service's ClusterIP answers
    /// 200 (the demo and an application's image alike serve it).
    pub fn wait_serving(&self) -> Result<()> {
        let url = self.web_url("/readyz")?;
        wait_for("the web Service to serve", Duration::from_secs(60), || {
            let (code, _) = self.node.curl(&[&url])?;
            Ok((code == 200).then_some(()))
        })
        .with_context(|| self.describe())
    }

    pub fn pods(&self, tier: &str) -> Result<Vec<Value>> {
        let selector = format!("app.kubernetes.io/component={tier}");
        let pods = self.kube.get_json(&["-n", &self.ns.name, "pods", "-l", &selector])?;
        Ok(pods["items"].as_array().cloned().unwrap_or_default())
    }

    /// The web Service's URL for `path`, by its ClusterIP.
    pub fn web_url(&self, path: &str) -> Result<String> {
        let service = self.kube.get_json(&["-n", &self.ns.name, "service/shop-web"])?;
        let ip = service["spec"]["clusterIP"].as_str().context("the web Service has no ClusterIP")?;
        Ok(format!("http://{ip}{path}"))
    }

    /// `tidepool enqueue` on the host, straight to PostgreSQL as the app's
    /// role, one statement per job (as the seed's loop of `delay()`).
    pub fn enqueue(&self, task: &str, args: &str, count: u32) -> Result<()> {
        let result = output(
            Command::new(release_binary("tidepool")?)
                .args(["enqueue", task, "--args", args, "--count", &count.to_string(), "--batch-size", "1"])
                .env("DATABASE_URL", self.db.url(&self.pg)),
        )?;
        ensure!(result.status.success(), "enqueue failed: {}", String::from_utf8_lossy(&result.stderr));
        Ok(())
    }

    pub fn sql(&self, sql: &str) -> Result<String> {
        self.pg.psql(&self.db.name, sql)
    }

    pub fn count(&self, sql: &str) -> Result<i64> {
        self.sql(sql)?.parse().with_context(|| format!("a count from {sql:?}"))
    }

    /// Waits until no job is left in the queue; the finished ones, by
    /// state: `succeeded` (results) and the dead jobs' states.
    pub fn wait_drained(&self, limit: Duration) -> Result<BTreeMap<String, i64>> {
        wait_drained(|sql| self.sql(sql), limit)
    }

    pub fn restart_counts(&self) -> Result<BTreeMap<String, i64>> {
        let pods = self.kube.get_json(&["-n", &self.ns.name, "pods"])?;
        let mut counts = BTreeMap::new();
        for pod in pods["items"].as_array().into_iter().flatten() {
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let statuses = pod["status"]["containerStatuses"].as_array().into_iter().flatten();
            let init = pod["status"]["initContainerStatuses"].as_array().into_iter().flatten();
            for status in statuses.chain(init) {
                let container = status["name"].as_str().unwrap_or_default();
                counts.insert(format!("{name}/{container}"), status["restartCount"].as_i64().unwrap_or(0));
            }
        }
        Ok(counts)
    }

    /// The restart counts once `container` (`pod/name`) has restarted
    /// `times`: the kubelet starts the container again before it reports
    /// the restart to the API server, so a pod that already serves again
    /// may still show the old count for a while.
    pub fn wait_restarted(&self, container: &str, times: i64) -> Result<BTreeMap<String, i64>> {
        wait_for(&format!("{container} to show {times} restart(s)"), Duration::from_secs(60), || {
            let counts = self.restart_counts()?;
            Ok((counts.get(container).copied().unwrap_or(0) >= times).then_some(counts))
        })
        .with_context(|| self.describe())
    }

    pub fn describe(&self) -> String {
        let ns = &self.ns.name;
        let pods = self.kube.kubectl(&["get", "pods", "-n", ns, "-o", "wide"], None).unwrap_or_default();
        let events = self
            .kube
            .kubectl(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"], None)
            .unwrap_or_default();
        let tidepool =
            self.kube.kubectl(&["get", "tidepool/shop", "-n", ns, "-o", "yaml"], None).unwrap_or_default();
        format!("pods:\n{pods}\nevents:\n{events}\ntidepool:\n{tidepool}")
    }
}

/// How [`Shop::deploy_with`] sets up around the Tidepool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup<'a> {
    /// SQL run on the new role before any pod connects (`{role}` is its
    /// name).
    pub prepare: Option<&'a str>,
    /// How the pods reach PostgreSQL.
    pub database: Database,
    /// More objects (JSON or YAML documents: a broker for an application's
    /// workers, say) applied before the Tidepool.
    pub beside: &'a str,
}

/// How the pods reach the test's PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Database {
    /// The Secret's `host` is the veth's host end.
    #[default]
    HostAddress,
    /// The Secret's `host` is `shop-db`, a Service without a selector whose
    /// EndpointSlice names the host end, as a CloudNativePG Secret names its
    /// `-rw` Service: the pods resolve it through the cluster's CoreDNS.
    /// Also a role that may only read the jobs table and its Secret
    /// `shop-scaler` (on loopback, for the operator in the test), for the
    /// queue scaler.
    ServiceName,
}

/// A `tidepool-loadgen` run in the node's namespace, in the background.
pub struct Load {
    child: Option<Child>,
    stop_file: Option<PathBuf>,
    timeline: Option<PathBuf>,
}

impl Load {
    /// `burst`: `requests` requests to `url` at once.
    pub fn burst(node: &Node, url: &str, requests: usize, timeout: &str) -> Result<Load> {
        let child = node
            .loadgen()?
            .args(["burst", "--url", url, "--requests", &requests.to_string(), "--timeout", timeout])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tidepool-loadgen")?;
        Ok(Load { child: Some(child), stop_file: None, timeline: None })
    }

    /// `steady`: `clients` clients back to back until [`Load::finish`].
    pub fn steady(node: &Node, url: &str, clients: usize, request_timeout: &str) -> Result<Load> {
        Self::steady_posting(node, url, clients, request_timeout, None)
    }

    /// [`Load::steady`], each request a POST of `json_body` when given.
    pub fn steady_posting(
        node: &Node,
        url: &str,
        clients: usize,
        request_timeout: &str,
        json_body: Option<&str>,
    ) -> Result<Load> {
        Self::spawn_steady(node, url, clients, request_timeout, json_body, false)
    }

    /// [`Load::steady`], its report with every request's `timeline`:
    /// `[seconds after the start at which it finished, its status]`.
    pub fn steady_timed(node: &Node, url: &str, clients: usize, request_timeout: &str) -> Result<Load> {
        Self::spawn_steady(node, url, clients, request_timeout, None, true)
    }

    fn spawn_steady(
        node: &Node,
        url: &str,
        clients: usize,
        request_timeout: &str,
        json_body: Option<&str>,
        timed: bool,
    ) -> Result<Load> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let run = format!("tidepool-steady-{}-{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
        let stop_file = std::env::temp_dir().join(&run);
        let timeline = timed.then(|| std::env::temp_dir().join(format!("{run}.timeline")));
        for file in std::iter::once(&stop_file).chain(&timeline) {
            let _ = std::fs::remove_file(file);
        }
        let mut command = node.loadgen()?;
        command
            .args(["steady", "--url", url, "--clients", &clients.to_string(), "--timeout", "600s"])
            .args(["--request-timeout", request_timeout, "--stop-file", path_arg(&stop_file)?])
            .args(json_body.map(|body| ["--json-body", body]).into_iter().flatten());
        if let Some(timeline) = &timeline {
            command.args(["--timeline", path_arg(timeline)?]);
        }
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tidepool-loadgen")?;
        Ok(Load { child: Some(child), stop_file: Some(stop_file), timeline })
    }

    /// Stops a steady run (a burst ends by itself) and returns its report.
    pub fn finish(mut self) -> Result<Value> {
        if let Some(stop_file) = &self.stop_file {
            std::fs::write(stop_file, "stop")?;
        }
        let result = self.child.take().context("finished already")?.wait_with_output()?;
        ensure!(
            result.status.success(),
            "tidepool-loadgen failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let mut report: Value =
            serde_json::from_slice(&result.stdout).context("tidepool-loadgen's report")?;
        if let Some(timeline) = &self.timeline {
            let text = std::fs::read_to_string(timeline).context("tidepool-loadgen's timeline")?;
            // Each line: finished latency status.
            let requests: Vec<Value> = text
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split_whitespace();
                    let finished: f64 = fields.next()?.parse().ok()?;
                    Some(json!([finished, fields.nth(1)?]))
                })
                .collect();
            report["timeline"] = Value::Array(requests);
        }
        Ok(report)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for file in self.stop_file.iter().chain(&self.timeline) {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Appends `figures` of test `name` as a JSON line to the file named by
/// `TIDEPOOL_E2E_FIGURES`, when set: scripts/bench-e2e.sh runs these tests
/// and writes what they measured into docs/benchmarks.md. Tests assert no
/// timing; the benchmark reports it.
pub fn record_figures(name: &str, figures: Value) -> Result<()> {
    let Some(path) = std::env::var_os("TIDEPOOL_E2E_FIGURES") else { return Ok(()) };
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    writeln!(file, "{}", json!({"test": name, "figures": figures}))?;
    Ok(())
}

/// From when the jobs' span is counted.
#[derive(Debug, Clone, Copy)]
pub enum SpanFrom {
    /// The first job's enqueue (its `created_at`).
    Created,
    /// The first job's start (its `started_at`), as a Celery task's run is
    /// timed.
    Started,
}

/// Seconds from the first job's creation or start to the last one's
/// finish, of the results kept.
pub fn jobs_span_seconds(shop: &Shop, from: SpanFrom) -> Result<f64> {
    jobs_span_seconds_by(|sql| shop.sql(sql), from)
}

/// [`jobs_span_seconds`] with `sql` run where the app's tables are (its
/// unaligned output): on another server than the Shop's.
pub fn jobs_span_seconds_by(sql: impl Fn(&str) -> Result<String>, from: SpanFrom) -> Result<f64> {
    let column = match from {
        SpanFrom::Created => "created_at",
        SpanFrom::Started => "started_at",
    };
    sql(&format!("SELECT extract(epoch FROM max(finished_at) - min({column})) FROM tidepool_job_results"))?
        .parse()
        .context("the jobs' span")
}

/// Waits until no job is left in the queue, `sql` run where the app's
/// tables are (its unaligned output); the finished ones, by state:
/// `succeeded` (results) and the dead jobs' states.
pub fn wait_drained(sql: impl Fn(&str) -> Result<String>, limit: Duration) -> Result<BTreeMap<String, i64>> {
    let count = |query: &str| -> Result<i64> {
        sql(query)?.parse().with_context(|| format!("a count from {query:?}"))
    };
    wait_for("the queue to drain", limit, || {
        Ok((count("SELECT count(*) FROM tidepool_jobs")? == 0).then_some(()))
    })
    .with_context(|| {
        sql("SELECT id, state, attempt, worker, errors FROM tidepool_jobs").unwrap_or_default()
    })?;
    let mut finished = BTreeMap::new();
    finished.insert("succeeded".to_owned(), count("SELECT count(*) FROM tidepool_job_results")?);
    for line in sql("SELECT state, count(*) FROM tidepool_dead_jobs GROUP BY state")?.lines() {
        if let Some((state, n)) = line.split_once('|') {
            finished.insert(state.to_owned(), n.parse()?);
        }
    }
    Ok(finished)
}

/// An overload of the connection budget, as the budget tests run it: a
/// burst of `requests` slow requests through the web Service beside the
/// worker pods' jobs, `offered` server connections asked for at once, with
/// `planned` the Tidepool's `plannedPeak`.
#[derive(Clone, Copy)]
pub struct Overload<'a> {
    pub requests: i64,
    pub offered: i64,
    pub planned: i64,
    /// What PostgreSQL logged meanwhile.
    pub server_log: &'a str,
    /// The app's connections, sampled throughout.
    pub samples: &'a [(Duration, i64)],
    /// The burst's loadgen report.
    pub report: &'a Value,
}

impl Overload<'_> {
    /// Asserts that the budget held: the load asked for at least twice
    /// the plan, PostgreSQL refused no connection, the app's connections
    /// stayed within the plan, and every request was answered 200 or shed
    /// with 503 (some shed), in bounded time. Returns the peak, the 200s
    /// and the 503s.
    pub fn assert_held(self) -> (i64, i64, i64) {
        let Overload { requests, offered, planned, server_log, samples, report } = self;
        assert!(offered >= 2 * planned, "the load asks for {offered}, planned {planned}");
        for refusal in ["too many clients", "remaining connection slots"] {
            assert!(
                !server_log.contains(refusal),
                "PostgreSQL refused connections ({refusal}):\n{server_log}"
            );
        }
        let peak = tidepool_testenv::node::peak(samples);
        assert!(peak <= planned, "the app held {peak} connections, planned {planned}");
        let (ok, shed) = (status_count(report, "200"), status_count(report, "503"));
        assert_eq!(ok + shed, requests, "only 200s and 503s: {report}");
        assert!(shed > 0, "the overload is shed: {report}");
        assert!(report["latency_max_seconds"].as_f64().unwrap_or(f64::MAX) < 30.0, "bounded: {report}");
        (peak, ok, shed)
    }
}

/// When each request of a [`Load::steady_timed`] report that was not
/// answered 200 finished, in seconds after the load's start.
pub fn failures_at(report: &Value) -> Vec<f64> {
    report["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|request| request[1] != "200")
        .filter_map(|request| request[0].as_f64())
        .collect()
}

/// The number of requests a loadgen report counts under `status`.
pub fn status_count(report: &Value, status: &str) -> i64 {
    report["statuses"][status].as_i64().unwrap_or(0)
}

/// The Shop's pods as a watch of them sees them after each event (running,
/// pending or terminating; gone once deleted, succeeded or failed), by
/// name: what [`PodWatch::fold`]'s function is given, event by event.
pub type LivePods = BTreeMap<String, Value>;

/// A watch of every event of the namespace's pods (`kubectl get --watch`),
/// folding each state of the live pods into a figure, until dropped.
pub struct PodWatch<T> {
    child: Child,
    figure: Arc<Mutex<T>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl<T: Clone + Send + 'static> PodWatch<T> {
    /// Starts the watch: `fold(figure, pods)` after every event.
    pub fn fold(shop: &Shop, initial: T, fold: impl Fn(&mut T, &LivePods) + Send + 'static) -> Result<Self> {
        let mut child = Command::new(shop.kube.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&shop.kube.kubeconfig)
            .args(["get", "pods", "-n", &shop.ns.name, "--watch", "--output-watch-events", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("kubectl get --watch")?;
        let stdout = child.stdout.take().context("kubectl's output")?;
        let figure = Arc::new(Mutex::new(initial));
        let folded = figure.clone();
        let thread = std::thread::spawn(move || {
            let mut live = LivePods::new();
            for event in serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>() {
                let event = event?;
                let pod = event["object"].clone();
                let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let phase = pod["status"]["phase"].as_str().unwrap_or_default();
                if event["type"] == "DELETED" || phase == "Succeeded" || phase == "Failed" {
                    live.remove(&name);
                } else {
                    live.insert(name, pod);
                }
                let mut figure = folded.lock().map_err(|_| anyhow::anyhow!("the watch's figure"))?;
                fold(&mut figure, &live);
            }
            Ok(())
        });
        Ok(PodWatch { child, figure, thread: Some(thread) })
    }

    /// The figure so far.
    pub fn figure(&self) -> T {
        match self.figure.lock() {
            Ok(figure) => figure.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl<T> Drop for PodWatch<T> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The largest sum of the annotated shares of the pods alive at once
/// (running or terminating), over every event of a watch of the
/// namespace's pods.
pub fn watch_shares(shop: &Shop) -> Result<PodWatch<i64>> {
    PodWatch::fold(shop, 0, |peak, pods| {
        *peak = (*peak).max(pods.values().filter_map(pod_share).sum());
    })
}

/// A pod's annotated share, when it has one.
pub fn pod_share(pod: &Value) -> Option<i64> {
    pod["metadata"]["annotations"]["tidepool.dev/max-db-connections"].as_str().and_then(|s| s.parse().ok())
}

/// Whether the operator has admitted `pod` (its connection-budget gate is
/// gone): from then on its containers may run and connect.
pub fn admitted(pod: &Value) -> bool {
    let gates = pod["spec"]["schedulingGates"].as_array().map_or(&[][..], Vec::as_slice);
    !gates.iter().any(|g| g["name"] == "tidepool.dev/connection-budget")
}

/// `pod`'s tier, by its component label.
pub fn pod_tier(pod: &Value) -> &str {
    pod["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap_or_default()
}
