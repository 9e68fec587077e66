//! `tidepool worker`, `tidepool enqueue` and the `/tasks` routes as
//! processes, against a real PostgreSQL through a real PgBouncer in
//! transaction mode: the seed's task experiment, kill -9, SIGTERM, and every
//! bad input.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http::Method;
use serde_json::json;
use support::{
    metric, request, scratch_dir, wait_for, wait_for_sleeps, wait_for_status, PgBouncer, Service, Stack,
    TestDb,
};
use tidepool::queue::worker::WEDGE_HOOK_VAR;
use tidepool::queue::{self, NewJob};
use tidepool_testenv::node::PrivatePostgres;
use tokio_postgres::types::{ToSql, Type};

/// Runs `tidepool enqueue ARGS` against `database_url`: (exit ok, stdout, stderr).
fn enqueue_cli(database_url: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("enqueue")
        .args(args)
        .env("DATABASE_URL", database_url)
        .output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// The name a worker process gives itself: host and pid.
fn worker_name(worker: &Service) -> Result<String> {
    let own = tidepool::settings::default_worker_name();
    let host = own.rsplit_once('-').context("host-pid")?.0;
    Ok(format!("{host}-{}", worker.pid()?))
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> Result<i64> {
    Ok(client.query_typed_one(sql, &[]).await?.get(0))
}

/// The job ids `sql` selects.
async fn ids(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<BTreeSet<i64>> {
    Ok(client.query_typed(sql, params).await?.iter().map(|r| r.get(0)).collect())
}

async fn wait_until_drained(client: &tokio_postgres::Client, limit: Duration) -> Result<()> {
    wait_for("every job to leave the hot table", limit, || async {
        count(client, "SELECT count(*) FROM tidepool_jobs").await.ok().filter(|n| *n == 0).map(drop)
    })
    .await
}

#[tokio::test]
async fn seed_task_experiment_runs_fifty_at_once() -> Result<()> {
    let db = TestDb::create().await?;
    // 50 for the tasks, 4 for the worker's own queue connections, and spare.
    let bouncer = PgBouncer::start(&db, 60).await?;
    let admin = db.admin().await?;
    let worker = Service::worker(&bouncer.url(), &[("TIDEPOOL_WORKER_CONCURRENCY", "50")]).await?;
    // Ready once its connections are open, server connections behind them
    // included, so the first wave of jobs waits for none.
    assert_eq!(support::get(&worker.url("/readyz")).await?.json()?["status"], "ready");
    assert_eq!(db.server_connections(&admin).await?, 54, "{}", worker.log());

    let (ok, stdout, stderr) =
        enqueue_cli(&bouncer.url(), &["slow_query", "--args", r#"{"seconds": 0.5}"#, "--count", "100"])?;
    assert!(ok, "{stderr}");
    let ids: Vec<i64> = stdout.lines().map(str::parse).collect::<Result<_, _>>()?;
    assert_eq!(ids.len(), 100, "{stdout}");
    assert!(stderr.contains("enqueued 100 jobs (0 duplicates)"), "{stderr}");

    wait_for_sleeps(&db, &admin, 50).await.with_context(|| worker.log())?;
    wait_until_drained(&admin, Duration::from_secs(60)).await?;
    let row = admin
        .query_typed_one(
            "SELECT count(*), EXTRACT(epoch FROM max(finished_at) - min(created_at))::float8
             FROM tidepool_job_results WHERE task = 'slow_query'",
            &[],
        )
        .await?;
    let (done, total): (i64, f64) = (row.get(0), row.get(1));
    assert_eq!(done, 100);
    // Serially this is 100 × 0.5 s = 50 s; fifty at a time, two rounds.
    assert!(total < 25.0, "took {total:.2} s: not concurrent");

    // The counters move once the recorder's statement has returned, a
    // moment after the rows the query above saw were committed.
    let succeeded = r#"tidepool_jobs_succeeded_total{queue="default",task="slow_query"} 100"#;
    let metrics_url = worker.url("/metrics");
    let metrics =
        support::wait_for("the succeeded counter to reach 100", Duration::from_secs(10), || async {
            support::get(&metrics_url).await.ok().map(|r| r.body).filter(|body| body.contains(succeeded))
        })
        .await
        .with_context(|| worker.log())?;
    assert!(
        metrics.contains(r#"tidepool_jobs_started_total{queue="default",task="slow_query"} 100"#),
        "{metrics}"
    );
    assert!(metrics.contains("tidepool_job_queue_latency_seconds_bucket"), "{metrics}");
    assert!(metrics.contains(r#"tidepool_queue_available_jobs{queue="default"}"#), "{metrics}");
    let health = support::get(&worker.url("/healthz")).await?;
    assert_eq!(health.json()?["status"], "ok");
    Ok(())
}

/// The worker's /readyz fails while PgBouncer is down and recovers by itself.
#[tokio::test]
async fn worker_readiness_follows_the_pooler() -> Result<()> {
    let db = TestDb::create().await?;
    let mut bouncer = PgBouncer::start(&db, 8).await?;
    let worker = Service::worker(
        &bouncer.url(),
        &[
            ("TIDEPOOL_WORKER_CONCURRENCY", "2"),
            ("TIDEPOOL_READINESS_TIMEOUT", "1s"),
            ("TIDEPOOL_DB_CONNECT_TIMEOUT", "1s"),
        ],
    )
    .await?;
    assert_eq!(support::get(&worker.url("/readyz")).await?.json()?["status"], "ready");

    bouncer.stop();
    let down = support::get(&worker.url("/readyz")).await?;
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.json()?["status"], "unavailable");

    bouncer.restart().await?;
    support::wait_for_status(&worker.url("/readyz"), 200, Duration::from_secs(10)).await?;
    Ok(())
}

/// Short timeouts, so that a stall shows within seconds: the claim loop may
/// go 1 s + (1 s + 1 s + 1 s) + 5 s = 9 s without a round (its stall
/// timeout, then per queue the pool's wait, connect and query timeouts,
/// then the longest pause after failed claims).
const QUICK_STALL: [(&str, &str); 5] = [
    ("TIDEPOOL_WORKER_STALL_TIMEOUT", "1s"),
    ("TIDEPOOL_DB_POOL_WAIT", "1s"),
    ("TIDEPOOL_DB_CONNECT_TIMEOUT", "1s"),
    ("TIDEPOOL_QUERY_TIMEOUT", "1s"),
    ("TIDEPOOL_WORKER_CONCURRENCY", "2"),
];

async fn claim_loop_turns(worker: &Service) -> Result<f64> {
    let body = support::get(&worker.url("/metrics")).await?.body;
    metric(&body, "tidepool_worker_claim_loop_turns_total").context("the claim loop's turns are exported")
}

/// A worker whose claim loop has stopped going round (wedged by the test
/// hook) answers 503 on /healthz, so the kubelet restarts it; until then,
/// 200.
#[tokio::test]
async fn a_wedged_claim_loop_fails_the_liveness_check() -> Result<()> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, 8).await?;
    let hook = scratch_dir("wedge")?.join("wedged");
    let hook_path = hook.to_str().context("a UTF-8 path")?;
    let mut env = QUICK_STALL.to_vec();
    env.push((WEDGE_HOOK_VAR, hook_path));
    let worker = Service::worker(&bouncer.url(), &env).await?;
    let live = support::get(&worker.url("/healthz")).await?;
    assert_eq!((live.status, live.json()?["status"].clone()), (200, json!("ok")), "{}", live.body);
    let before = claim_loop_turns(&worker).await?;
    wait_for("the claim loop to go round", Duration::from_secs(10), || async {
        claim_loop_turns(&worker).await.ok().filter(|turns| *turns > before).map(drop)
    })
    .await?;

    std::fs::write(&hook, b"")?;
    let stalled = wait_for_status(&worker.url("/healthz"), 503, Duration::from_secs(60)).await?;
    let body = stalled.json()?;
    assert_eq!(body["status"], "stalled", "{}", stalled.body);
    let error = body["error"].as_str().context("an error")?;
    assert!(error.contains("the claim loop has not gone round for") && error.contains("limit 9s"), "{error}");
    assert!(worker.log().contains("the claim loop is wedged by the test hook"), "{}", worker.log());
    Ok(())
}

/// With PostgreSQL down, every claim fails, and each failure is a round:
/// the worker is not ready, but stays live (a restart would not bring the
/// database back, and would drop the jobs it runs), for longer than twice
/// the stall limit; it carries on once PostgreSQL is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_not_a_stall() -> Result<()> {
    let postgres = PrivatePostgres::on_loopback("outage", 100)?;
    let db = TestDb::create_on(postgres.postgres.port).await?;
    // PgBouncer holds a query for a server longer than the test lasts: only
    // the worker's own timeouts end a claim.
    let bouncer = PgBouncer::start_with_query_wait(&db, 4, Duration::from_secs(600)).await?;
    let worker = Service::worker(&bouncer.url(), &QUICK_STALL).await?;
    let client = support::connect(&bouncer.url()).await?;
    let job = queue::enqueue_job(&client, &NewJob::new("noop", json!({}))).await?;
    wait_until_drained(&client, Duration::from_secs(10)).await?;
    drop(client);
    assert!(!job.duplicate);

    postgres.stop()?;
    support::wait_for_status(&worker.url("/readyz"), 503, Duration::from_secs(20)).await?;
    let turns_down = claim_loop_turns(&worker).await?;
    // Watched for 20 s, over twice the stall limit of 9 s: live throughout.
    let watched = std::time::Instant::now();
    let mut polls = 0;
    while watched.elapsed() < Duration::from_secs(20) {
        let health = support::get(&worker.url("/healthz")).await?;
        assert_eq!(health.status, 200, "live while PostgreSQL is down: {}", health.body);
        polls += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(polls >= 20, "watched {polls} times");
    let turns_after = claim_loop_turns(&worker).await?;
    assert!(turns_after > turns_down, "failed claims are rounds: {turns_down} then {turns_after}");
    assert!(worker.log().contains("claim failed"), "{}", worker.log());

    postgres.start_again()?;
    wait_for_status(&worker.url("/readyz"), 200, Duration::from_secs(30)).await?;
    let client = support::connect(&bouncer.url()).await?;
    queue::enqueue_job(&client, &NewJob::new("noop", json!({}))).await?;
    wait_until_drained(&client, Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test]
async fn a_killed_worker_loses_no_job_and_only_its_own_run_twice() -> Result<()> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, 40).await?;
    let admin = db.admin().await?;
    let client = support::connect(&bouncer.url()).await?;
    let env = [
        ("TIDEPOOL_WORKER_CONCURRENCY", "10"),
        ("TIDEPOOL_WORKER_LEASE", "2s"),
        ("TIDEPOOL_WORKER_HEARTBEAT_INTERVAL", "500ms"),
        ("TIDEPOOL_WORKER_MAINTENANCE_INTERVAL", "200ms"),
        ("TIDEPOOL_WORKER_POLL_INTERVAL_MAX", "100ms"),
    ];
    let victim = Service::worker(&bouncer.url(), &env).await?;
    let survivor = Service::worker(&bouncer.url(), &env).await?;
    let victim_name = worker_name(&victim)?;

    let jobs: Vec<NewJob> = (0..60).map(|_| NewJob::new("slow_query", json!({"seconds": 0.5}))).collect();
    let enqueued: BTreeSet<i64> = queue::enqueue_many(&client, &jobs).await?.iter().map(|e| e.id).collect();
    let held_by_victim = || async {
        ids(
            &admin,
            "SELECT id FROM tidepool_jobs WHERE state = 'running' AND worker = $1",
            &[(&victim_name, Type::TEXT)],
        )
        .await
    };
    wait_for("the victim to run jobs", Duration::from_secs(10), || async {
        held_by_victim().await.ok().filter(|held| !held.is_empty()).map(drop)
    })
    .await?;
    victim.signal(libc::SIGKILL)?;
    // Dead now: what it held is what it was running when it died.
    let interrupted = held_by_victim().await?;
    assert!(!interrupted.is_empty());

    wait_until_drained(&admin, Duration::from_secs(60)).await.with_context(|| survivor.log())?;
    assert_eq!(count(&admin, "SELECT count(*) FROM tidepool_dead_jobs").await?, 0);
    let finished = ids(&admin, "SELECT id FROM tidepool_job_results", &[]).await?;
    assert_eq!(finished, enqueued, "every job completed");
    let ran_twice = ids(&admin, "SELECT id FROM tidepool_job_results WHERE attempts > 1", &[]).await?;
    assert_eq!(ran_twice, interrupted, "only the jobs the killed worker was running ran again");
    assert_eq!(count(&admin, "SELECT count(*) FROM tidepool_job_results WHERE attempts > 2").await?, 0);
    Ok(())
}

#[tokio::test]
async fn sigterm_hands_running_jobs_back_at_once() -> Result<()> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, 20).await?;
    let admin = db.admin().await?;
    let client = support::connect(&bouncer.url()).await?;
    let env = [
        ("TIDEPOOL_SHUTDOWN_TIMEOUT", "500ms"),
        ("TIDEPOOL_WORKER_LEASE", "600s"),
        ("TIDEPOOL_WORKER_HEARTBEAT_INTERVAL", "60s"),
    ];
    let mut worker = Service::worker(&bouncer.url(), &env).await?;
    let jobs: Vec<NewJob> = (0..3).map(|_| NewJob::new("slow_query", json!({"seconds": 30}))).collect();
    queue::enqueue_many(&client, &jobs).await?;
    wait_for_sleeps(&db, &admin, 3).await?;

    worker.signal(libc::SIGTERM)?;
    let status = worker.wait_exit(Duration::from_secs(20)).await?;
    assert_eq!(status.code(), Some(3), "exit code 3: jobs were handed back; log:\n{}", worker.log());
    let row = admin
        .query_typed_one(
            "SELECT count(*) FILTER (WHERE state = 'available' AND attempt = 0 AND worker IS NULL), count(*)
             FROM tidepool_jobs",
            &[],
        )
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (3, 3),
        "all three are available again, attempt uncounted"
    );
    wait_for("the interrupted pg_sleeps to be cancelled", Duration::from_secs(10), || async {
        db.active_sleeps(&admin).await.ok().filter(|n| *n == 0)
    })
    .await?;
    // PgBouncer before 1.20 crashes if a cancel's sender hangs up first: the
    // worker waited for its cancels before exiting.
    assert!(!bouncer.log().contains("FATAL"), "{}", bouncer.log());

    // A job that finishes within the deadline: a clean exit, the job done.
    admin.batch_execute("DELETE FROM tidepool_jobs").await?;
    let mut worker = Service::worker(&bouncer.url(), &[("TIDEPOOL_SHUTDOWN_TIMEOUT", "20s")]).await?;
    let quick = queue::enqueue_job(&client, &NewJob::new("slow_query", json!({"seconds": 1}))).await?;
    wait_for_sleeps(&db, &admin, 1).await?;
    worker.signal(libc::SIGTERM)?;
    let status = worker.wait_exit(Duration::from_secs(20)).await?;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    let view = queue::lookup(&client, quick.id).await?.context("the job's result is kept")?;
    assert_eq!(view.state, queue::JobState::Succeeded);
    Ok(())
}

#[tokio::test]
async fn listen_wakes_an_idle_worker_long_before_its_next_poll() -> Result<()> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, 8).await?;
    let client = support::connect(&bouncer.url()).await?;
    let direct = db.direct_url();
    // Polls once at start, then not for ten minutes: only a notification
    // can get the job claimed within the wait below.
    let worker = Service::worker(
        &bouncer.url(),
        &[
            ("TIDEPOOL_DIRECT_DATABASE_URL", direct.as_str()),
            ("TIDEPOOL_WORKER_POLL_INTERVAL_MIN", "600s"),
            ("TIDEPOOL_WORKER_POLL_INTERVAL_MAX", "600s"),
        ],
    )
    .await?;
    wait_for("the worker to listen", Duration::from_secs(10), || async {
        worker.log().contains("listening for new jobs").then_some(())
    })
    .await?;
    let job = queue::enqueue_job(&client, &NewJob::new("slow_query", json!({"seconds": 0}))).await?;
    wait_for("the notified worker to run the job", Duration::from_secs(10), || async {
        let view = queue::lookup(&client, job.id).await.ok()??;
        (view.state == queue::JobState::Succeeded).then_some(())
    })
    .await
    .with_context(|| worker.log())?;
    Ok(())
}

#[tokio::test]
async fn task_routes_answer_every_input_and_write_nothing_for_bad_ones() -> Result<()> {
    let stack = Stack::start(4, &[]).await?;
    let tasks = stack.web.url("/tasks/");
    let post = |body: String| request(Method::POST, &tasks, body);
    let jobs = || count(&stack.admin, "SELECT count(*) FROM tidepool_jobs");

    let accepted = post(
        json!({"task": "slow_query", "args": {"seconds": 1}, "unique_key": "k", "delay": 3600}).to_string(),
    )
    .await?;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let id = accepted.json()?["id"].as_i64().context("an id")?;
    assert_eq!(accepted.json()?["state"], "scheduled");
    assert_eq!(
        accepted.headers.get("location").map(|v| v.as_bytes()),
        Some(format!("/tasks/{id}").as_bytes())
    );

    let duplicate = post(json!({"task": "noop", "unique_key": "k"}).to_string()).await?;
    assert_eq!(duplicate.status, 409);
    assert_eq!(duplicate.json()?["id"], id);

    let view = support::get(&stack.web.url(&format!("/tasks/{id}"))).await?;
    assert_eq!(view.status, 200);
    let view = view.json()?;
    assert_eq!((view["state"].as_str(), view["attempts"].as_i64()), (Some("scheduled"), Some(0)));
    assert_eq!(view["args"], json!({"seconds": 1}));

    let before = jobs().await?;
    let oversized_args = json!({"task": "noop", "args": {"pad": "x".repeat(70_000)}}).to_string();
    let oversized_body = json!({"task": "noop", "args": {"pad": "x".repeat(2_000_000)}}).to_string();
    for (body, status, says) in [
        (json!({"task": "nope"}).to_string(), 422, "unknown task"),
        (
            json!({"task": "slow_query", "args": {"seconds": "soon"}}).to_string(),
            422,
            "seconds: invalid type: string",
        ),
        ("{\"task\": ".to_owned(), 400, "not a valid task request"),
        ("not json".to_owned(), 400, "not a valid task request"),
        (json!({"task": "noop", "run_at": "next tuesday"}).to_string(), 400, "RFC 3339"),
        (json!({"task": "noop", "queue": "no spaces"}).to_string(), 400, "not a valid name"),
        (json!({"task": "noop", "max_attempts": 1000}).to_string(), 400, "max_attempts"),
        (oversized_args, 413, "limit is 65536"),
        (oversized_body, 413, "larger than the limit"),
    ] {
        let response = post(body).await?;
        assert_eq!(response.status, status, "{}", response.body);
        assert!(response.body.contains(says), "{says:?} not in {}", response.body);
    }
    assert_eq!(jobs().await?, before, "bad input wrote nothing");

    let wrong_method = request(Method::PUT, &tasks, "").await?;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.headers.get("allow").map(|v| v.as_bytes()), Some(&b"POST"[..]));
    assert_eq!(support::get(&stack.web.url("/tasks/abc")).await?.status, 400);
    assert_eq!(support::get(&stack.web.url("/tasks/987654321")).await?.status, 404);

    let cancel = request(Method::DELETE, &stack.web.url(&format!("/tasks/{id}")), "").await?;
    assert_eq!(cancel.status, 200, "{}", cancel.body);
    assert_eq!(cancel.json()?["state"], "cancelled");
    let again = request(Method::DELETE, &stack.web.url(&format!("/tasks/{id}")), "").await?;
    assert_eq!(again.status, 409, "{}", again.body);
    let view = support::get(&stack.web.url(&format!("/tasks/{id}"))).await?.json()?;
    assert_eq!(view["state"], "cancelled");

    let metrics = support::get(&stack.web.url("/metrics")).await?.body;
    assert!(
        metrics.contains(r#"tidepool_jobs_enqueued_total{queue="default",task="slow_query"} 1"#),
        "{metrics}"
    );
    assert!(!stack.web.log().contains("panicked"));
    Ok(())
}

#[tokio::test]
async fn the_enqueue_command_prints_ids_and_refuses_bad_input() -> Result<()> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, 4).await?;
    let admin = db.admin().await?;
    let url = bouncer.url();

    let (ok, stdout, _) = enqueue_cli(&url, &["noop", "--count", "2500", "--batch-size", "1000"])?;
    assert!(ok);
    let ids: Vec<i64> = stdout.lines().map(str::parse).collect::<Result<_, _>>()?;
    assert_eq!(ids.len(), 2500);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let (ok, first, _) = enqueue_cli(&url, &["noop", "--unique-key", "nightly"])?;
    assert!(ok);
    let (ok, second, _) = enqueue_cli(&url, &["noop", "--unique-key", "nightly"])?;
    assert!(ok);
    assert_eq!(second.trim(), format!("{} duplicate", first.trim()));

    // In a pod the URL has no password and the file has it (TIDEPOOL_DB_PASSWORD_FILE).
    let password = &support::env().app_password;
    let password_file =
        std::env::temp_dir().join(format!("tidepool-enqueue-password-{}", std::process::id()));
    std::fs::write(&password_file, format!("{password}\n"))?;
    let without_password = url.replacen(&format!(":{password}@"), "@", 1);
    assert_ne!(without_password, url);
    let file_arg = password_file.to_str().context("a UTF-8 path")?;
    let (ok, stdout, stderr) = enqueue_cli(&without_password, &["noop", "--db-password-file", file_arg])?;
    assert!(ok, "{stderr}");
    std::fs::remove_file(&password_file)?;
    assert_eq!(stdout.lines().count(), 1, "one id: {stdout}");

    let before = count(&admin, "SELECT count(*) FROM tidepool_jobs").await?;
    let (ok, _, stderr) =
        enqueue_cli(&without_password, &["noop", "--db-password-file", "/nonexistent/password"])?;
    assert!(!ok && stderr.contains("cannot read the password file /nonexistent/password"), "{stderr}");
    for (args, says) in [
        (&["nope"][..], "unknown task \"nope\""),
        (&["noop", "--args", "{oops"], "--args is not valid JSON"),
        (&["noop", "--args", "[1]"], "args must be a JSON object"),
        (&["slow_query", "--args", r#"{"seconds": 99999}"#], "seconds must be from 0 to 3600"),
        (&["noop", "--run-at", "tomorrow"], "RFC 3339"),
        (&["noop", "--queue", "a b"], "not a valid name"),
    ] {
        let (ok, _, stderr) = enqueue_cli(&url, args)?;
        if ok {
            bail!("{args:?} was accepted");
        }
        assert!(stderr.contains(says), "{says:?} not in {stderr}");
        assert!(!stderr.contains(&support::env().app_password), "the password leaked: {stderr}");
    }
    assert_eq!(count(&admin, "SELECT count(*) FROM tidepool_jobs").await?, before);
    Ok(())
}
