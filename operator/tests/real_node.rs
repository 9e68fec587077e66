//! A Tidepool on the test cluster's real node (scripts/kube-node.sh): the
//! images built from the repository's Dockerfiles really run, under the
//! operator's sizing, against the test PostgreSQL on the veth's host end, as
//! an external database. Every client is on loopback or inside the node's
//! (or a pod's) network namespace.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{kube_with_crd, wait_ready, Operator, REAL_NODE_TIDEPOOL};
use serde_json::Value;
use tidepool_testenv::node::{output, pod_processes, AppDatabase, Node, Postgres};
use tidepool_testenv::{env_path, wait_for, Kube};

/// The uid the operator renders (its `RUN_AS`); the pod's security context
/// applies to its sandbox (pause) too.
const APP_UID: u32 = 65532;

/// A DNS query of type A for `argv[2]` to `argv[1]`:53 over UDP, printing
/// the response code and the last answer's address.
const DNS_QUERY: &str = r#"
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
query = struct.pack(">HHHHHH", 0x7469, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(query, (server, 53))
reply = s.recv(512)
answers = struct.unpack(">H", reply[6:8])[0]
print(reply[3] & 0xF, ".".join(map(str, reply[-4:])) if answers else "")
"#;

#[test]
fn the_real_node_is_ready_with_containerd_and_tainted() -> Result<()> {
    let kube = Kube::from_env()?;
    let node = kube.get_json(&["node", Node::NAME])?;
    let runtime = node["status"]["nodeInfo"]["containerRuntimeVersion"].as_str().unwrap_or_default();
    ensure!(runtime.starts_with("containerd://"), "runtime {runtime:?}");
    let ready = node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .context("no Ready condition")?;
    assert_eq!(ready["status"], "True", "{ready}");
    let taints = node["spec"]["taints"].as_array().cloned().unwrap_or_default();
    assert!(taints.iter().any(|t| t["key"] == Node::TAINT && t["effect"] == "NoSchedule"), "{taints:?}");
    Ok(())
}

#[test]
fn a_tidepool_runs_on_the_real_node() -> Result<()> {
    let kube = kube_with_crd()?;
    let node = Node::from_env()?;
    let pg = Postgres::from_env()?;
    let ns = kube.namespace("real")?;
    let db = AppDatabase::create(&pg, &ns.name.replace('-', "_"))?;
    kube.kubectl(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&db.secret("shop-app", &node.host_ip, pg.port)),
    )?;
    let _operator = Operator::start(&ns.name)?;
    kube.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(REAL_NODE_TIDEPOOL))?;

    // The migration Job, then both tiers, with their sidecars, probes passed.
    let tidepool =
        wait_ready(kube, &ns.name, Duration::from_secs(240)).with_context(|| describe(kube, &ns.name))?;
    let jobs = kube.get_json(&["-n", &ns.name, "jobs"])?;
    assert_eq!(jobs["items"][0]["status"]["succeeded"], 1, "the migration Job: {jobs}");
    assert_eq!(pg.psql(&db.name, "SELECT count(*) FROM pg_tables WHERE tablename = 'tidepool_jobs'")?, "1");

    let pods =
        kube.get_json(&["-n", &ns.name, "pods", "-l", "app.kubernetes.io/component in (web,worker)"])?;
    let pods = pods["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(pods.len(), 2, "one web and one worker pod");
    for pod in &pods {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        assert_eq!(pod["spec"]["nodeName"], Node::NAME, "{name}");
        let tier = pod["metadata"]["labels"]["app.kubernetes.io/component"].as_str().context("tier")?;
        let planned = &tidepool["status"][tier];
        let share = planned["serverConnectionsPerPod"].as_i64().context("share")?;
        let annotated = pod["metadata"]["annotations"]["tidepool.dev/max-db-connections"].as_str();
        assert_eq!(annotated, Some(share.to_string().as_str()), "{name}");

        // What PgBouncer really runs with, from its admin console inside
        // the pod's network namespace.
        let config = pooler_config(pod)?;
        for key in ["max_db_connections", "default_pool_size", "min_pool_size"] {
            assert_eq!(
                config.get(key).map(String::as_str),
                Some(share.to_string().as_str()),
                "{name}: {key}"
            );
        }
        assert_eq!(config.get("pool_mode").map(String::as_str), Some("transaction"), "{name}");
        assert_eq!(config.get("listen_addr").map(String::as_str), Some("127.0.0.1"), "{name}");

        // The app's pool, from its metrics on the pod IP.
        let pod_ip = pod["status"]["podIP"].as_str().context("pod IP")?;
        let port = if tier == "web" { 8000 } else { 8001 };
        let (code, metrics) = node.curl(&[&format!("http://{pod_ip}:{port}/metrics")])?;
        assert_eq!(code, 200, "{name}: {metrics}");
        let pool = metric(&metrics, "tidepool_db_pool_max_size").context("pool size metric")?;
        assert_eq!(pool, planned["appPoolPerPod"].as_f64().context("appPoolPerPod")?, "{name}");
        // And its sidecar's, read as the stats user from the admin console:
        // the share is PgBouncer's max_db_connections for the database.
        assert_eq!(metric(&metrics, "pgbouncer_up"), Some(1.0), "{name}: {metrics}");
        let limit = metrics
            .lines()
            .find(|l| {
                l.starts_with("pgbouncer_databases_max_connections{")
                    && l.contains(&format!("name=\"{}\"", db.name))
            })
            .and_then(|l| l.rsplit(" ").next()?.parse::<i64>().ok());
        assert_eq!(limit, Some(share), "{name}: {metrics}");

        // Non-root with a read-only root file system, every container.
        let uid = pod["metadata"]["uid"].as_str().context("uid")?;
        let processes = pod_processes(uid)?;
        for wanted in ["pgbouncer", "tidepool", "pause"] {
            ensure!(
                processes.iter().any(|p| p.comm == wanted),
                "{name}: no {wanted} process in {processes:?}"
            );
        }
        for process in &processes {
            let uids = process.uids()?;
            assert!(uids.iter().all(|u| *u == APP_UID), "{name}: {process:?} runs as {uids:?}");
            assert!(process.root_is_read_only()?, "{name}: {process:?} has a writable root file system");
        }
    }

    // From inside a pod: the API server through the `kubernetes` Service
    // (its endpoint is the veth's host end), and one name server, the
    // cluster's (`kube-dns`, whose endpoint is CoreDNS on the host end): it
    // answers cluster names and forwards nothing, so no DNS query can leave
    // the machine.
    let web_pod = pods.iter().find(|p| p["metadata"]["labels"]["app.kubernetes.io/component"] == "web");
    let web_uid = web_pod.and_then(|p| p["metadata"]["uid"].as_str()).context("the web pod")?;
    let app = pod_processes(web_uid)?.into_iter().find(|p| p.comm == "tidepool").context("web's process")?;
    let endpoints = kube.get_json(&["-n", "default", "endpoints/kubernetes"])?;
    assert_eq!(endpoints["subsets"][0]["addresses"][0]["ip"], node.host_ip.as_str(), "{endpoints}");
    let kubernetes = kube.get_json(&["-n", "default", "service/kubernetes"])?;
    let api = format!("https://{}/readyz", kubernetes["spec"]["clusterIP"].as_str().context("ClusterIP")?);
    let reached = output(app.in_netns("curl").args([
        "-sk",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &api,
    ]))?;
    assert_eq!(String::from_utf8_lossy(&reached.stdout), "200", "{api} from the web pod");
    let resolv = std::fs::read_to_string(format!("/proc/{}/root/etc/resolv.conf", app.pid))?;
    let servers: Vec<_> = resolv.lines().filter(|l| l.starts_with("nameserver")).collect();
    let dns = kube.get_json(&["-n", "kube-system", "service/kube-dns"])?;
    let dns_ip = dns["spec"]["clusterIP"].as_str().context("kube-dns's ClusterIP")?;
    assert_eq!(servers, [format!("nameserver {dns_ip}")], "{resolv}");
    let slices =
        kube.get_json(&["-n", "kube-system", "endpointslices", "-l", "kubernetes.io/service-name=kube-dns"])?;
    assert_eq!(slices["items"][0]["endpoints"][0]["addresses"][0], node.host_ip.as_str(), "{slices}");
    // One query of type A from the pod's network namespace: (rcode, the
    // answer's address).
    let ask = |name: &str| -> Result<(u8, String)> {
        let asked = output(app.in_netns("python3").args(["-c", DNS_QUERY, dns_ip, name]))?;
        ensure!(asked.status.success(), "asking for {name}: {}", String::from_utf8_lossy(&asked.stderr));
        let answer = String::from_utf8_lossy(&asked.stdout).trim().to_owned();
        let (rcode, address) = answer.split_once(' ').unwrap_or((&answer, ""));
        Ok((rcode.parse()?, address.to_owned()))
    };
    let kubernetes_ip = kubernetes["spec"]["clusterIP"].as_str().unwrap_or_default().to_owned();
    assert_eq!(ask("kubernetes.default.svc.cluster.local")?, (0, kubernetes_ip));
    let (rcode, _) = ask("example.com")?;
    assert_ne!(rcode, 0, "a name outside the cluster is not resolved (nothing is forwarded)");

    // Through the web Service's ClusterIP, from inside the node's namespace:
    // a query reaches PostgreSQL, and a job enqueued through it is run by
    // the worker pod (the only worker on this database).
    let service = kube.get_json(&["-n", &ns.name, "service/shop-web"])?;
    let cluster_ip = service["spec"]["clusterIP"].as_str().context("ClusterIP")?;
    let (code, body) = node.curl(&[&format!("http://{cluster_ip}/row/")])?;
    assert_eq!(code, 200, "{body}");
    let (code, body) = node.curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"task": "slow_query", "args": {"seconds": 0.1}}"#,
        &format!("http://{cluster_ip}/tasks/"),
    ])?;
    assert_eq!(code, 202, "{body}");
    let id = serde_json::from_str::<Value>(&body)?["id"].as_i64().context("job id")?;
    let state = wait_for("the job to succeed", Duration::from_secs(60), || {
        let (code, body) = node.curl(&[&format!("http://{cluster_ip}/tasks/{id}")])?;
        let job: Value = serde_json::from_str(&body).with_context(|| format!("{code}: {body}"))?;
        Ok((job["state"] == "succeeded").then_some(job))
    })?;
    assert_eq!(state["attempts"], 1, "{state}");
    assert_eq!(
        pg.psql(&db.name, &format!("SELECT count(*) FROM tidepool_job_results WHERE id = {id}"))?,
        "1"
    );

    // The password is in the Secret and in files the pods mount, nowhere
    // else: not in pod specs, ConfigMaps, Events, the Tidepool's status or
    // any container's log.
    for what in [
        vec!["-n", &ns.name, "pods", "-o", "json"],
        vec!["-n", &ns.name, "jobs,deployments,replicasets,services", "-o", "json"],
        vec!["configmaps", "-A", "-o", "json"],
        vec!["-n", &ns.name, "events", "-o", "json"],
        vec!["-n", &ns.name, "tidepool/shop", "-o", "json"],
    ] {
        let mut args = vec!["get"];
        args.extend(what.iter().copied());
        let text = kube.kubectl(&args, None)?;
        assert!(!text.contains(&db.password), "the password appears in `kubectl {}`", args.join(" "));
    }
    let all_pods = kube.get_json(&["-n", &ns.name, "pods"])?;
    for pod in all_pods["items"].as_array().into_iter().flatten() {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let containers = pod["spec"]["initContainers"].as_array().into_iter().flatten();
        for container in containers.chain(pod["spec"]["containers"].as_array().into_iter().flatten()) {
            let container = container["name"].as_str().unwrap_or_default();
            let log = kube.kubectl(&["logs", "-n", &ns.name, name, "-c", container], None)?;
            assert!(!log.contains(&db.password), "the password appears in the log of {name}/{container}");
        }
    }
    Ok(())
}

/// `SHOW CONFIG` of a pod's PgBouncer, as the stats user, over its admin
/// console on the pod's 127.0.0.1 (from inside the pod's network
/// namespace). The stats user's password is the one the init container
/// generated into the pod's in-memory volume, read from the kubelet's
/// folder of it.
fn pooler_config(pod: &Value) -> Result<BTreeMap<String, String>> {
    let uid = pod["metadata"]["uid"].as_str().context("uid")?;
    let pgbouncer = pod_processes(uid)?
        .into_iter()
        .find(|p| p.comm == "pgbouncer")
        .context("no pgbouncer process in the pod")?;
    let volume = env_path("TIDEPOOL_TEST_STATE_DIR")?
        .join("kube/node/kubelet/pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/pgbouncer/stats.password");
    let password =
        std::fs::read_to_string(&volume).with_context(|| format!("reading {}", volume.display()))?;
    let result = output(
        pgbouncer
            .in_netns("psql")
            .args([
                "-X",
                "-At",
                "-F",
                "|",
                "-h",
                "127.0.0.1",
                "-p",
                "6432",
                "-U",
                "tidepool_stats",
                "-d",
                "pgbouncer",
            ])
            .args(["-c", "SHOW CONFIG"])
            .env("PGPASSWORD", password.trim()),
    )?;
    ensure!(result.status.success(), "SHOW CONFIG failed: {}", String::from_utf8_lossy(&result.stderr));
    Ok(String::from_utf8_lossy(&result.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('|');
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect())
}

/// The value of an unlabelled series in Prometheus' text format.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What a person would look at when the Tidepool does not become Ready.
fn describe(kube: &Kube, ns: &str) -> String {
    let pods = kube.kubectl(&["get", "pods", "-n", ns, "-o", "wide"], None).unwrap_or_default();
    let events =
        kube.kubectl(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"], None).unwrap_or_default();
    let tidepool = kube.kubectl(&["get", "tidepool/shop", "-n", ns, "-o", "yaml"], None).unwrap_or_default();
    format!("pods:\n{pods}\nevents:\n{events}\ntidepool:\n{tidepool}")
}
