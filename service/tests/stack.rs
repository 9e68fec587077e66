//! The local stack's script (`make up`/`make down`) and the PgBouncer
//! configuration it writes through `tidepool pooler-config`.

mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

#[test]
fn a_busy_port_stops_the_stack_with_its_name() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let state = support::scratch_dir("stack")?;
    let script = support::script("stack.sh")?;
    let output = Command::new("bash")
        .arg(&script)
        .args(["up", "pooler"])
        .env("TIDEPOOL_STATE_DIR", &state)
        .env("TIDEPOOL_POOLER_PORT", port.to_string())
        .env("TIDEPOOL_BIN", env!("CARGO_BIN_EXE_tidepool"))
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("port {port} (for PgBouncer) is already in use")), "{stderr}");
    assert!(
        !state.join("pgbouncer").join("pgbouncer.ini").exists(),
        "nothing is started or written for a busy port"
    );
    Ok(())
}

/// The local stack as `make up` runs it: PostgreSQL, PgBouncer configured by
/// `tidepool pooler-config`, `tidepool web` and `tidepool worker`, on ports
/// of its own; a job posted to the web tier is run by the worker; then
/// `down` stops every piece by its recorded PID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_stack_comes_up_and_goes_down() -> Result<()> {
    let state = support::scratch_dir("local-stack")?;
    let ports: Vec<u16> = (0..4).map(|_| support::free_port()).collect::<Result<_>>()?;
    let script = support::script("stack.sh")?;
    let stack = |action: &str| {
        Command::new("bash")
            .arg(&script)
            .arg(action)
            .env("TIDEPOOL_STATE_DIR", &state)
            .env("TIDEPOOL_PG_PORT", ports[0].to_string())
            .env("TIDEPOOL_POOLER_PORT", ports[1].to_string())
            .env("TIDEPOOL_WEB_PORT", ports[2].to_string())
            .env("TIDEPOOL_WORKER_PORT", ports[3].to_string())
            .env("TIDEPOOL_BIN", env!("CARGO_BIN_EXE_tidepool"))
            .output()
    };
    let up = stack("up")?;
    let up_log = String::from_utf8_lossy(&up.stderr).into_owned();
    let result = async {
        anyhow::ensure!(up.status.success(), "stack.sh up failed:\n{up_log}");
        let row = support::get(&format!("http://127.0.0.1:{}/row/", ports[2])).await?;
        anyhow::ensure!(row.status == 200, "{}", row.body);
        let posted = support::request(
            http::Method::POST,
            &format!("http://127.0.0.1:{}/tasks/", ports[2]),
            r#"{"task": "slow_query", "args": {"seconds": 0}}"#,
        )
        .await?;
        anyhow::ensure!(posted.status == 202, "{}", posted.body);
        let job = format!("http://127.0.0.1:{}/tasks/{}", ports[2], posted.json()?["id"]);
        support::wait_for("the worker to run the posted job", Duration::from_secs(10), || async {
            let view = support::get(&job).await.ok()?.json().ok()?;
            (view["state"] == "succeeded").then_some(())
        })
        .await?;
        let ini = std::fs::read_to_string(state.join("pgbouncer/pgbouncer.ini"))?;
        anyhow::ensure!(ini.contains("pool_mode = transaction"), "{ini}");
        // One PgBouncer for both processes, its cap the sum of their pools
        // (the worker's 4 queue connections included), all kept warm.
        let pool_size = |port: u16| async move {
            let metrics = support::get(&format!("http://127.0.0.1:{port}/metrics")).await?.body;
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("tidepool_db_pool_max_size ")?.parse::<u32>().ok())
                .with_context(|| format!("no pool size in:\n{metrics}"))
        };
        let (web_pool, task_pool) = (pool_size(ports[2]).await?, pool_size(ports[3]).await?);
        let cap = web_pool + task_pool + 4;
        for line in [format!("max_db_connections = {cap}\n"), format!("min_pool_size = {cap}\n")] {
            anyhow::ensure!(
                ini.contains(&line),
                "{line:?} not in {ini} (web pool {web_pool}, task pool {task_pool})"
            );
        }
        // Both read the one PgBouncer's figures (pgbouncer_exporter's names).
        for port in [ports[2], ports[3]] {
            let metrics = support::get(&format!("http://127.0.0.1:{port}/metrics")).await?.body;
            anyhow::ensure!(metrics.contains("\npgbouncer_up 1\n"), "no PgBouncer figures in:\n{metrics}");
            let limit = "pgbouncer_databases_max_connections{name=\"tidepool\",";
            anyhow::ensure!(
                metrics.lines().any(|l| l.starts_with(limit) && l.ends_with(&format!(" {cap}"))),
                "max_db_connections {cap} not among:\n{metrics}"
            );
        }
        let password = std::fs::read_to_string(state.join("secrets/app.password"))?;
        anyhow::ensure!(!ini.contains(password.trim()), "pgbouncer.ini must not hold the password");
        anyhow::ensure!(!up_log.contains(password.trim()), "stack.sh printed the password");
        Ok(())
    }
    .await;

    let pids: Vec<String> = ["run/worker.pid", "run/web.pid", "run/pgbouncer.pid", "postgres/postmaster.pid"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(state.join(f)).ok()?.lines().next().map(str::to_owned))
        .collect();
    let down = stack("down")?;
    result?;
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert_eq!(pids.len(), 4, "every piece recorded its PID");
    for pid in pids {
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        support::wait_for(&format!("process {pid} to exit after down"), Duration::from_secs(10), || {
            let gone = !proc_dir.exists()
                || std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|stat| stat.contains(") Z "));
            std::future::ready(gone.then_some(()))
        })
        .await?;
    }
    for port in ports {
        assert!(!support::port_accepts(port), "port {port} still accepts after down");
    }
    Ok(())
}

/// `tidepool pooler-config` writes the two files, the password only into
/// the 0600 auth file, and prints nothing secret.
#[test]
fn pooler_config_keeps_the_password_in_the_auth_file() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = support::scratch_dir("pooler-config")?;
    let output = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["pooler-config", "--out-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:7432", "--pool-size", "7"])
        .env("TIDEPOOL_POOLER_UPSTREAM_URL", "postgres://shop:s3cret-pw@db.internal:5433/shop")
        .output()?;
    let printed =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{printed}");
    assert!(!printed.contains("s3cret-pw"), "{printed}");
    let ini = std::fs::read_to_string(dir.join("pgbouncer.ini"))?;
    assert!(ini.contains("listen_port = 7432") && ini.contains("max_db_connections = 7"), "{ini}");
    assert!(!ini.contains("s3cret-pw"));
    let auth = dir.join("userlist.txt");
    assert_eq!(std::fs::read_to_string(&auth)?, "\"shop\" \"s3cret-pw\"\n");
    assert_eq!(std::fs::metadata(&auth)?.permissions().mode() & 0o777, 0o600);

    let refused = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["pooler-config", "--out-dir"])
        .arg(&dir)
        .env("TIDEPOOL_POOLER_UPSTREAM_URL", "postgres://shop@db.internal/shop")
        .output()?;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("the upstream URL has no password"));
    Ok(())
}
