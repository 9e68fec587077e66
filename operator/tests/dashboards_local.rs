//! The "Tidepool" dashboard on the local stack (scripts/stack.sh, on ports
//! of its own), scraped by a real Prometheus as the chart's PodMonitor
//! labels pods (`namespace` and `tidepool` "local", `tier`): every query of
//! every panel that reads the app or its PgBouncer returns series with those
//! labels. The two panels that read the operator (the budget, the replicas)
//! have data only on Kubernetes: real_node_e2e.rs checks them, and every
//! other panel moving under load, on the real node.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use tidepool_testenv::node::release_binary;
use tidepool_testenv::prometheus::Prometheus;
use tidepool_testenv::stack::LocalStack;
use tidepool_testenv::{repo_root, wait_for};

fn curl(args: &[&str]) -> Result<u16> {
    let output = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"])
        .args(args)
        .output()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().context("curl's status")
}

#[test]
fn the_dashboard_reads_the_local_stack() -> Result<()> {
    let stack = LocalStack::new("local-dashboards", release_binary("tidepool")?)?;
    stack.up(&[])?;
    let prometheus = Prometheus::start(&format!(
        r#"  - job_name: tidepool-local
    static_configs:
      - {{targets: ["127.0.0.1:{}"], labels: {{namespace: local, tidepool: local, tier: web}}}}
      - {{targets: ["127.0.0.1:{}"], labels: {{namespace: local, tidepool: local, tier: worker}}}}
"#,
        stack.web_port(),
        stack.worker_port()
    ))?;
    wait_for("Prometheus to scrape web and worker", Duration::from_secs(30), || {
        let targets = prometheus.targets()?;
        Ok((targets.len() == 2 && targets.iter().all(|(_, health)| health == "up")).then_some(()))
    })?;
    // A request and a job, so that the series labelled by route and task exist.
    ensure!(curl(&[&stack.web("/row/")])? == 200);
    let job = r#"{"task": "slow_query", "args": {"seconds": 0}}"#;
    ensure!(
        curl(&["-X", "POST", "-H", "Content-Type: application/json", "-d", job, &stack.web("/tasks/")])?
            == 202
    );

    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root()?.join("charts/tidepool/files/dashboards/tidepool.json"),
    )?)?;
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().into_iter().flatten().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("expr")?;
            if expr.contains("tidepool_operator_") {
                continue;
            }
            let expr = expr
                .replace("$namespace", "local")
                .replace("$tidepool", "local")
                .replace("$tier", "web|worker")
                .replace("$__rate_interval", "5s");
            let series = wait_for(&format!("{title}: {expr}"), Duration::from_secs(60), || {
                let series = prometheus.query(&expr)?;
                Ok((!series.is_empty()).then_some(series))
            })?;
            for one in &series {
                ensure!(
                    one["metric"]["namespace"] == "local" && one["metric"]["tidepool"] == "local",
                    "{title}: {one}"
                );
            }
            checked += 1;
        }
    }
    ensure!(checked >= 20, "only {checked} queries read the app");
    Ok(())
}
