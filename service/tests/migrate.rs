//! `tidepool migrate`: idempotent, safe to run concurrently, safe through
//! PgBouncer in transaction mode, and strict about edited migrations.

mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use support::{connect, PgBouncer, TestDb};
use tidepool::migrate::{self, MigrateError, Migration, MIGRATIONS};

fn migrate_via(env_var: &str, url: &str) -> Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env_remove("TIDEPOOL_DIRECT_DATABASE_URL")
        .env(env_var, url)
        .output()?)
}

#[tokio::test]
async fn migrations_are_idempotent_and_seed_the_world_table() -> Result<()> {
    let db = TestDb::create().await?; // migrated once already
    let again = migrate_via("TIDEPOOL_DIRECT_DATABASE_URL", &db.direct_url())?;
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains(" applied=[] already_applied=[1, 2]"));

    let admin = db.admin().await?;
    let rows: i64 = admin.query_one("SELECT count(*) FROM world", &[]).await?.get(0);
    assert_eq!(rows, 10_000);
    let out_of_range: i64 = admin
        .query_one("SELECT count(*) FROM world WHERE randomnumber NOT BETWEEN 1 AND 10000", &[])
        .await?
        .get(0);
    assert_eq!(out_of_range, 0);
    let recorded: i64 = admin.query_one("SELECT count(*) FROM tidepool_schema_migrations", &[]).await?.get(0);
    assert_eq!(recorded, MIGRATIONS.len() as i64);
    let queue_tables: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('tidepool_jobs', 'tidepool_job_results', 'tidepool_dead_jobs')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(queue_tables, 3);
    Ok(())
}

/// Migrators started at once through a transaction-mode PgBouncer apply
/// each migration exactly once: the lock is transaction-scoped, so it cannot
/// be lost when PgBouncer hands the session to someone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_through_pgbouncer_apply_once() -> Result<()> {
    let db = TestDb::create().await?;
    let admin = db.admin().await?;
    admin
        .batch_execute(
            "DROP TABLE world, tidepool_jobs, tidepool_job_results, tidepool_dead_jobs, tidepool_schema_migrations;
             DROP FUNCTION tidepool_jobs_notify()",
        )
        .await?;
    let bouncer = PgBouncer::start(&db, 2).await?;

    let url = bouncer.url();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || migrate_via("DATABASE_URL", &url))
        })
        .collect();
    let mut applied_once = 0;
    for run in runs {
        let output = run.await??;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{stderr}");
        if stderr.contains(" applied=[1, 2] already_applied=[]") {
            applied_once += 1;
        }
    }
    assert_eq!(applied_once, 1, "exactly one migrator applies the migrations");
    let rows: i64 = admin.query_one("SELECT count(*) FROM world", &[]).await?.get(0);
    assert_eq!(rows, 10_000);
    Ok(())
}

#[tokio::test]
async fn an_edited_migration_is_refused() -> Result<()> {
    let db = TestDb::create().await?;
    let mut client = connect(&db.direct_url()).await?;
    let edited = [Migration { sql: "SELECT 'edited'", ..MIGRATIONS[0] }];
    let err = migrate::run(&mut client, &edited, Duration::from_secs(5)).await.expect_err("must refuse");
    assert!(matches!(err, MigrateError::Changed { version: 1, .. }), "{err}");
    assert!(err.to_string().contains("was changed after it was applied"));
    Ok(())
}

#[tokio::test]
async fn a_failing_migration_leaves_nothing_half_written() -> Result<()> {
    let db = TestDb::create().await?;
    let mut client = connect(&db.direct_url()).await?;
    let broken = [
        MIGRATIONS[0],
        MIGRATIONS[1],
        Migration { version: 3, name: "half", sql: "CREATE TABLE half_written (id int); SELECT 1/0;" },
    ];
    let err = migrate::run(&mut client, &broken, Duration::from_secs(5)).await.expect_err("must fail");
    assert!(matches!(err, MigrateError::Failed { version: 3, .. }), "{err}");
    let exists: bool = client.query_one("SELECT to_regclass('half_written') IS NOT NULL", &[]).await?.get(0);
    assert!(!exists, "the failed migration's table must have been rolled back");
    Ok(())
}

#[test]
fn migrate_without_a_url_says_what_to_set() -> Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env_remove("TIDEPOOL_DIRECT_DATABASE_URL")
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("set TIDEPOOL_DIRECT_DATABASE_URL or DATABASE_URL")
    );
    Ok(())
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() -> Result<()> {
    let db = TestDb::create().await?;
    let output = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("migrate")
        .env("TIDEPOOL_DIRECT_DATABASE_URL", db.direct_url())
        .env("TIDEPOOL_LOG_FORMAT", "json")
        .output()?;
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<serde_json::Value> = stderr.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert!(lines.iter().any(|l| l["message"] == "migrations complete" && l["level"] == "INFO"), "{stderr}");
    assert!(!stderr.contains(&support::env().app_password), "a log line carried the password");
    Ok(())
}
