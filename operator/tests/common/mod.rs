//! What the operator's real-API-server tests share: the CRD installed once
//! per test binary, an operator run in-process, reading a Tidepool, a JSON
//! merge for building specs, and a jobs table for the queue scaler to read.

#![allow(dead_code)]

pub mod shop;

use std::io::{Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use serde_json::Value;
use tidepool::queue::{self, NewJob};
use tidepool_operator::http::{self, Endpoints};
use tidepool_operator::leader::{self, Lease};
use tidepool_operator::metrics::Metrics;
use tidepool_testenv::node::{AppDatabase, Postgres};
use tidepool_testenv::{repo_root, wait_for, Kube};

/// The control plane of `make test`, with the Tidepool CRD installed and
/// served.
pub fn kube_with_crd() -> Result<&'static Kube> {
    static INSTALLED: OnceLock<Kube> = OnceLock::new();
    if let Some(kube) = INSTALLED.get() {
        return Ok(kube);
    }
    let kube = Kube::from_env()?;
    let crd = repo_root()?.join("manifests/crd.yaml");
    kube.kubectl(
        &["apply", "--server-side", "--force-conflicts", "-f", crd.to_str().context("utf-8 path")?],
        None,
    )?;
    kube.wait_established("tidepools.tidepool.dev")?;
    wait_for("Tidepools to be served", Duration::from_secs(30), || {
        Ok(kube.kubectl_output(&["get", "tidepools", "-A"], None)?.status.success().then_some(()))
    })?;
    Ok(INSTALLED.get_or_init(|| kube))
}

/// `patch` merged into `target`, objects key by key.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

/// The operator, in a thread with a runtime of its own, until dropped, its
/// endpoints on a loopback port of their own.
pub struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    port: u16,
}

impl Operator {
    /// An operator watching `namespace`, leading through a Lease there.
    pub fn start(namespace: &str) -> Result<Operator> {
        Self::start_with_lease(namespace, namespace)
    }

    /// An operator watching `namespace`, its Lease in `lease_namespace`.
    pub fn start_with_lease(namespace: &str, lease_namespace: &str) -> Result<Operator> {
        Self::start_as(namespace, lease_namespace, None)
    }

    /// An operator watching `namespace`, its Lease in `lease_namespace`,
    /// talking to the API server as whom the bearer token in `token_file`
    /// names (`None`: as the kubeconfig's user).
    pub fn start_as(
        namespace: &str,
        lease_namespace: &str,
        token_file: Option<&std::path::Path>,
    ) -> Result<Operator> {
        static REPLICAS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let lease = Lease {
            name: "tidepool-operator".into(),
            namespace: lease_namespace.to_owned(),
            identity: format!("replica-{}", REPLICAS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            duration_seconds: 4,
            grace_seconds: 1,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let namespace = namespace.to_owned();
        let runtime = tokio::runtime::Runtime::new()?;
        let client = match token_file {
            None => runtime
                .block_on(tidepool_operator::controller::client())
                .context("a client from KUBECONFIG")?,
            Some(token_file) => {
                let mut config =
                    runtime.block_on(kube::Config::infer()).context("the config from KUBECONFIG")?;
                config.auth_info = kube::config::AuthInfo {
                    token_file: Some(token_file.to_str().context("a UTF-8 path")?.to_owned()),
                    ..Default::default()
                };
                // The client's buffer task is spawned on the runtime.
                let _entered = runtime.enter();
                tidepool_operator::controller::client_from(config)?
            }
        };
        let listener = runtime.block_on(http::bind("127.0.0.1:0".parse()?))?;
        let port = listener.local_addr()?.port();
        let endpoints = Arc::new(Endpoints { metrics: Metrics::new()?, ready: AtomicBool::new(false) });
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let server = tokio::spawn(http::serve(listener, endpoints.clone()));
                let led = leader::run(client, Some(namespace), endpoints, lease, async {
                    let _ = stopped.await;
                })
                .await;
                if let Err(e) = led {
                    eprintln!("operator: {e}");
                }
                server.abort();
            });
        });
        Ok(Operator { stop: Some(stop), thread: Some(thread), port })
    }

    /// The loopback port of the operator's endpoints (`/metrics`, ...).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `GET path` on the operator's endpoints: status code and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).context("a status line")?;
        Ok((code, response))
    }

    /// The value of the metric line that starts with `series`.
    pub fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .with_context(|| format!("no {series} in:\n{body}"))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A database Secret as CloudNativePG writes its `<cluster>-app` Secret:
/// the five keys the pods read, and more that they ignore.
pub const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-app}\ntype: kubernetes.io/basic-auth\nstringData: {username: shop, password: s3cret-value, host: db.example, port: \"5432\", dbname: shop, user: shop, uri: \"postgresql://shop:s3cret-value@db.example:5432/shop\", jdbc-uri: \"jdbc:postgresql://db.example:5432/shop?password=s3cret-value&user=shop\", pgpass: \"db.example:5432:shop:shop:s3cret-value\"}\n";

pub fn tidepool(max_connections: u32) -> String {
    format!(
        "apiVersion: tidepool.dev/v1alpha1\nkind: Tidepool\nmetadata: {{name: shop}}\nspec:\n  database: {{secretRef: {{name: shop-app}}, maxConnections: {max_connections}}}\n"
    )
}

pub fn get(kube: &Kube, ns: &str, what: &str) -> Result<Option<Value>> {
    let output = kube.kubectl_output(&["get", what, "-n", ns, "-o", "json"], None)?;
    Ok(output.status.success().then(|| serde_json::from_slice(&output.stdout)).transpose()?)
}

pub fn condition(tidepool: &Value, type_: &str) -> Option<(String, String, String)> {
    tidepool["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| {
        let field = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        (field("status"), field("reason"), field("message"))
    })
}

/// Waits until the Tidepool's condition `type_` has `status` and `reason`;
/// returns its message.
pub fn wait_condition(kube: &Kube, ns: &str, type_: &str, status: &str, reason: &str) -> Result<String> {
    wait_for(&format!("{type_}={status} ({reason})"), Duration::from_secs(60), || {
        let tidepool = get(kube, ns, "tidepool/shop")?;
        Ok(tidepool
            .as_ref()
            .and_then(|t| condition(t, type_))
            .and_then(|(s, r, m)| (s == status && r == reason).then_some(m)))
    })
}

/// Waits until tidepool/shop in `ns` has the condition `type_` at `status`
/// for `reason` with a message containing `part`; its message.
pub fn wait_condition_containing(
    kube: &Kube,
    ns: &str,
    (type_, status, reason): (&str, &str, &str),
    part: &str,
) -> Result<String> {
    wait_for(&format!("{type_}={status} ({reason}: {part})"), Duration::from_secs(60), || {
        let tidepool = get(kube, ns, "tidepool/shop")?;
        Ok(tidepool
            .as_ref()
            .and_then(|t| condition(t, type_))
            .and_then(|(s, r, m)| (s == status && r == reason && m.contains(part)).then_some(m)))
    })
}

/// Sets the worker scaler's statement of tidepool/shop in `ns`, and its
/// timeout.
pub fn set_query(kube: &Kube, ns: &str, sql: &str, timeout_seconds: u32) -> Result<()> {
    let query = json!({"sql": sql, "statementTimeoutSeconds": timeout_seconds});
    let patch = json!({"spec": {"worker": {"autoscaling": {"query": query}}}});
    kube.kubectl(&["patch", "tidepool/shop", "-n", ns, "--type", "merge", "-p", &patch.to_string()], None)?;
    Ok(())
}

/// Waits up to `limit` until tidepool/shop in `ns` is Ready; the Tidepool.
pub fn wait_ready(kube: &Kube, ns: &str, limit: Duration) -> Result<Value> {
    wait_for("the Tidepool to be Ready", limit, || {
        let tidepool = get(kube, ns, "tidepool/shop")?;
        Ok(tidepool.filter(|t| condition(t, "Ready").is_some_and(|(status, _, _)| status == "True")))
    })
}

/// Waits up to `limit` until tidepool/shop in `ns`, at generation
/// `generation` or later, is Ready with every tier's replicas ready; the
/// Tidepool.
pub fn wait_rolled(kube: &Kube, ns: &str, generation: i64, limit: Duration) -> Result<Value> {
    wait_for("the Tidepool to be Ready", limit, || {
        let Some(tidepool) = get(kube, ns, "tidepool/shop")? else { return Ok(None) };
        let status = &tidepool["status"];
        let ready = condition(&tidepool, "Ready").is_some_and(|(status, _, _)| status == "True");
        let observed = status["observedGeneration"].as_i64().unwrap_or(0) >= generation;
        // The clock, when there is one, is one pod.
        let wanted = |tier: &str| match tier {
            "clock" => json!(1),
            _ => tidepool["spec"][tier]["replicas"].clone(),
        };
        let clock = tidepool["spec"]["clock"].is_object();
        let tiers_ready = ["web", "worker", "clock"]
            .iter()
            .filter(|tier| **tier != "clock" || clock)
            .all(|tier| status[tier]["readyReplicas"] == wanted(tier));
        Ok((ready && observed && tiers_ready).then_some(tidepool))
    })
}

/// The smallest Tidepool `shop` on the test cluster's real node (web 1 ×
/// pool 4, worker 1 × 4; 40 connections, 10 reserved), for the Secret
/// `shop-app`.
pub const REAL_NODE_TIDEPOOL: &str = r#"{
  "apiVersion": "tidepool.dev/v1alpha1", "kind": "Tidepool",
  "metadata": {"name": "shop"},
  "spec": {
    "imagePullPolicy": "IfNotPresent",
    "database": {"secretRef": {"name": "shop-app"}, "maxConnections": 40, "reservedConnections": 10},
    "web": {"replicas": 1, "concurrency": 8, "databasePool": 4},
    "worker": {"replicas": 1, "concurrency": 4},
    "nodeSelector": {"type": "real"},
    "tolerations": [{"key": "tidepool.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}]
  }
}"#;

/// `helm install` (`which`: `helm` or `helm4`) of the chart as `release`
/// in `ns`, watching only `ns` (an operator for the whole cluster would
/// reconcile the other tests' Tidepools too), its pods on the real node;
/// `extra` values beside. Waits until its pods are ready.
pub fn helm_install_operator(
    kube: &Kube,
    which: &str,
    ns: &str,
    release: &str,
    extra: &[&str],
) -> Result<()> {
    let chart = repo_root()?.join("charts/tidepool");
    let tolerations = format!(
        r#"tolerations=[{{"key":"{}","operator":"Exists","effect":"NoSchedule"}}]"#,
        tidepool_testenv::node::Node::TAINT
    );
    let output = tidepool_testenv::helm(which, Some(kube))?
        .args(["install", release, tidepool_testenv::node::path_arg(&chart)?, "--namespace", ns])
        .args(["--wait", "--timeout", "180s", "--set", &format!("watchNamespace={ns}")])
        .args(["--set", "nodeSelector.type=real", "--set-json", &tolerations])
        .args(extra)
        .output()?;
    anyhow::ensure!(output.status.success(), "{which} install: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// The names of the operator's pods `selector` in `ns`, once one of them
/// holds the Lease `tidepool-operator` there; before, checks that they are
/// two replicas, Running on the test cluster's real node as the service
/// account `service_account`.
pub fn operator_leads_on_the_real_node(
    kube: &Kube,
    ns: &str,
    selector: &str,
    service_account: &str,
) -> Result<Vec<String>> {
    let pods = kube.get_json(&["-n", ns, "pods", "-l", selector])?;
    let pods = pods["items"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(pods.len() == 2, "two operator replicas, not {}", pods.len());
    for pod in &pods {
        anyhow::ensure!(
            pod["spec"]["nodeName"] == tidepool_testenv::node::Node::NAME,
            "on the real node: {pod}"
        );
        anyhow::ensure!(pod["spec"]["serviceAccountName"] == service_account, "as {service_account}: {pod}");
        anyhow::ensure!(pod["status"]["phase"] == "Running", "Running: {pod}");
    }
    let names: Vec<String> =
        pods.iter().filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned)).collect();
    wait_for("a replica to hold the Lease", Duration::from_secs(60), || {
        let lease = kube.get_json(&["-n", ns, "lease/tidepool-operator"])?;
        let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
        Ok(names.iter().any(|n| n == holder).then_some(()))
    })?;
    Ok(names)
}

/// The app image of a Deployment's pods.
pub fn image(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]["image"]
}

/// Waits until the web Deployment satisfies `check`.
pub fn wait_web(kube: &Kube, ns: &str, what: &str, check: impl Fn(&Value) -> bool) -> Result<()> {
    wait_for(what, Duration::from_secs(60), || {
        Ok(get(kube, ns, "deployment/shop-web")?.filter(|w| check(w)).map(drop))
    })
}

/// The test control plane's audit log of every write
/// (scripts/kube/audit-policy.yaml), read from where it ended when opened.
pub struct AuditLog {
    path: std::path::PathBuf,
    from: u64,
}

impl AuditLog {
    pub fn open() -> Result<AuditLog> {
        let path = tidepool_testenv::env_path("TIDEPOOL_TEST_STATE_DIR")?.join("kube/log/audit.log");
        let from = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?.len();
        Ok(AuditLog { path, from })
    }

    /// The entries written since opening.
    pub fn entries(&self) -> Result<Vec<Value>> {
        let mut file = std::fs::File::open(&self.path)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(self.from))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(text.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()).collect())
    }

    /// The writes since opening by the client whose `User-Agent` is
    /// `user_agent`, in `namespace`: "verb resource name" each.
    pub fn writes_by(&self, user_agent: &str, namespace: &str) -> Result<Vec<String>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|entry| entry["userAgent"] == user_agent && entry["objectRef"]["namespace"] == namespace)
            .map(|entry| {
                let object = &entry["objectRef"];
                let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                let subresource = object["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
                format!(
                    "{} {}{subresource} {}",
                    text(&entry["verb"]),
                    text(&object["resource"]),
                    text(&object["name"])
                )
            })
            .collect())
    }
}

/// A database with Tidepool's schema, a role that may only read the jobs
/// table (docs/operator.md, "Autoscaling"), and a client to enqueue with.
pub struct Queue {
    pub pg: Postgres,
    pub db: AppDatabase,
    pub runtime: tokio::runtime::Runtime,
    pub client: tokio_postgres::Client,
}

impl Queue {
    pub fn create(pg: &Postgres, name: &str) -> Result<Queue> {
        let db = AppDatabase::create(pg, name)?;
        let runtime = tokio::runtime::Runtime::new()?;
        let client = runtime.block_on(async {
            let config: tokio_postgres::Config = db.url(pg).parse()?;
            let mut client = tidepool::db::connect(config, Duration::from_secs(10)).await?;
            tidepool::migrate::run(&mut client, &[tidepool::migrate::TIDEPOOL], Duration::from_secs(10))
                .await?;
            anyhow::Ok(client)
        })?;
        pg.psql(
            name,
            &format!(
                "CREATE ROLE {name}_scaler LOGIN PASSWORD '{password}-scaler';
                 GRANT SELECT ON tidepool_jobs TO {name}_scaler",
                password = db.password
            ),
        )?;
        Ok(Queue { pg: pg.clone(), db, runtime, client })
    }

    /// The Secrets `shop-app` (the app's role) and `shop-scaler` (the
    /// read-only one), both pointing at the server on loopback, where the
    /// in-process operator reads it.
    pub fn secrets(&self) -> String {
        let scaler = AppDatabase {
            name: format!("{}_scaler", self.db.name),
            password: format!("{}-scaler", self.db.password),
        };
        let mut scaler_secret: Value =
            serde_json::from_str(&scaler.secret("shop-scaler", "127.0.0.1", self.pg.port))
                .unwrap_or_default();
        scaler_secret["stringData"]["dbname"] = json!(self.db.name);
        format!("{}\n---\n{}", self.db.secret("shop-app", "127.0.0.1", self.pg.port), scaler_secret)
    }

    pub fn enqueue(&self, jobs: &[NewJob]) -> Result<()> {
        for batch in jobs.chunks(queue::MAX_BATCH) {
            self.runtime.block_on(queue::enqueue_many(&self.client, batch))?;
        }
        Ok(())
    }

    /// Removes every job, as finished workers would.
    pub fn drain(&self) -> Result<()> {
        self.pg.psql(&self.db.name, "DELETE FROM tidepool_jobs")?;
        Ok(())
    }
}
