//! `tidepool migrate`: idempotent, safe to run concurrently, safe through
//! PgBouncer in transaction mode, and strict about edited migrations.

mod support;

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use support::{connect, PgBouncer, TestDb};
use tidepool::migrate::{self, MigrateError, Migration, Track, TIDEPOOL};

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
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains(" applied=[] already_applied=[tidepool/1, tidepool/2, tidepool/3, demo/1]"),
        "{stderr}"
    );

    let admin = db.admin().await?;
    let rows: i64 = admin.query_one("SELECT count(*) FROM world", &[]).await?.get(0);
    assert_eq!(rows, 10_000);
    let out_of_range: i64 = admin
        .query_one("SELECT count(*) FROM world WHERE randomnumber NOT BETWEEN 1 AND 10000", &[])
        .await?
        .get(0);
    assert_eq!(out_of_range, 0);
    let recorded: Vec<(String, i32, String)> = admin
        .query("SELECT track, version, name FROM tidepool_schema_migrations ORDER BY track, version", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        recorded,
        [
            ("demo".into(), 1, "world".into()),
            ("tidepool".into(), 1, "jobs".into()),
            ("tidepool".into(), 2, "schedules".into()),
            ("tidepool".into(), 3, "workflows".into())
        ]
    );
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
            "DROP TABLE world, tidepool_jobs, tidepool_job_results, tidepool_dead_jobs, tidepool_schema_migrations,
                 tidepool_schedules, tidepool_occurrences, tidepool_rate_limits, tidepool_groups,
                 tidepool_group_outputs;
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
        if stderr.contains(" applied=[tidepool/1, tidepool/2, tidepool/3, demo/1] already_applied=[]") {
            applied_once += 1;
        }
    }
    assert_eq!(applied_once, 1, "exactly one migrator applies the migrations");
    let rows: i64 = admin.query_one("SELECT count(*) FROM world", &[]).await?.get(0);
    assert_eq!(rows, 10_000);
    Ok(())
}

const SHOP: Track = Track {
    name: "shop",
    migrations: &[
        Migration { version: 1, name: "orders", sql: "CREATE TABLE orders (id bigint PRIMARY KEY)" },
        Migration { version: 2, name: "totals", sql: "ALTER TABLE orders ADD COLUMN total bigint" },
    ],
};

#[tokio::test]
async fn an_edited_migration_is_refused() -> Result<()> {
    let db = TestDb::create().await?;
    let mut client = connect(&db.direct_url()).await?;
    migrate::run(&mut client, &[TIDEPOOL, SHOP], Duration::from_secs(5)).await?;
    const EDITED: &[Migration] =
        &[Migration { version: 1, name: "orders", sql: "CREATE TABLE orders (id int)" }, SHOP.migrations[1]];
    let err =
        migrate::run(&mut client, &[TIDEPOOL, Track { migrations: EDITED, ..SHOP }], Duration::from_secs(5))
            .await
            .expect_err("must refuse");
    assert!(matches!(err, MigrateError::Changed { track: "shop", version: 1, .. }), "{err}");
    assert!(err.to_string().contains("shop/1 (orders) was changed after it was applied"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_failing_migration_leaves_nothing_half_written() -> Result<()> {
    let db = TestDb::create().await?;
    let mut client = connect(&db.direct_url()).await?;
    const BROKEN: &[Migration] = &[
        SHOP.migrations[0],
        SHOP.migrations[1],
        Migration { version: 3, name: "half", sql: "CREATE TABLE half_written (id int); SELECT 1/0;" },
    ];
    let err =
        migrate::run(&mut client, &[TIDEPOOL, Track { migrations: BROKEN, ..SHOP }], Duration::from_secs(5))
            .await
            .expect_err("must fail");
    assert!(matches!(err, MigrateError::Failed { track: "shop", version: 3, .. }), "{err}");
    let exists: bool = client
        .query_one("SELECT to_regclass('half_written') IS NOT NULL OR to_regclass('orders') IS NOT NULL", &[])
        .await?
        .get(0);
    assert!(!exists, "the run's tables must have been rolled back, the good migrations' too");
    let shop: i64 = client
        .query_one("SELECT count(*) FROM tidepool_schema_migrations WHERE track = 'shop'", &[])
        .await?
        .get(0);
    assert_eq!(shop, 0, "nothing of the failed run is recorded");
    Ok(())
}

/// Each track numbers its own versions: an application's version 1 is not
/// Tidepool's, and a track added later is applied on its own.
#[tokio::test]
async fn tracks_number_their_versions_apart() -> Result<()> {
    let db = TestDb::create().await?;
    let mut client = connect(&db.direct_url()).await?;
    let report = migrate::run(&mut client, &[TIDEPOOL, SHOP], Duration::from_secs(5)).await?;
    assert_eq!(migrate::list(&report.applied), "[shop/1, shop/2]");
    assert_eq!(migrate::list(&report.already_applied), "[tidepool/1, tidepool/2, tidepool/3]");
    assert_eq!(migrate::list(&report.unknown), "[demo/1]", "the demo's track, which this run was not given");
    let again = migrate::run(&mut client, &[TIDEPOOL, SHOP], Duration::from_secs(5)).await?;
    assert!(again.applied.is_empty());
    Ok(())
}

/// The previous release recorded one list of versions: the demo's `world`
/// as 1 and the queue as 2, keyed by version alone. This release upgrades
/// that table in place: each row goes to the track of the migration with
/// its checksum, nothing is applied twice (the queue's migration would fail
/// if it ran again: its tables exist).
#[tokio::test]
async fn a_database_migrated_by_the_previous_release_is_upgraded_in_place() -> Result<()> {
    let db = TestDb::create().await?;
    let admin = db.admin().await?;
    let world = Migration {
        version: 1,
        name: "world",
        sql: include_str!("../src/bin/tidepool/migrations/0001_world.sql"),
    };
    let jobs = TIDEPOOL.migrations[0];
    // The bookkeeping exactly as the previous release wrote it, as the
    // application's role.
    let app = connect(&db.direct_url()).await?;
    // The previous release had no periodic tasks, rate limits or workflows.
    app.batch_execute(
        "DROP TABLE tidepool_schema_migrations, tidepool_schedules, tidepool_occurrences,
                 tidepool_rate_limits, tidepool_groups, tidepool_group_outputs;
             ALTER TABLE tidepool_jobs DROP COLUMN group_id;
             CREATE TABLE tidepool_schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
    )
    .await?;
    for (version, migration) in [(1, world), (2, jobs)] {
        app.execute(
            "INSERT INTO tidepool_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&version, &migration.name, &migration.checksum()],
        )
        .await?;
    }
    let enqueued: i64 = app.query_one("INSERT INTO tidepool_jobs (queue, task, args, max_attempts) VALUES ('default', 'noop', '{}', 1) RETURNING id", &[]).await?.get(0);

    let output = migrate_via("TIDEPOOL_DIRECT_DATABASE_URL", &db.direct_url())?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("upgraded the migrations table to tracks")
            && stderr.contains("1 -> demo/1, 2 -> tidepool/1"),
        "{stderr}"
    );
    // The previous release's versions are kept; what came after it is applied.
    assert!(
        stderr.contains(" applied=[tidepool/2, tidepool/3] already_applied=[tidepool/1, demo/1]"),
        "{stderr}"
    );

    let recorded: Vec<(String, i32, String)> = admin
        .query("SELECT track, version, checksum FROM tidepool_schema_migrations ORDER BY track, version", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let (schedules, workflows) = (TIDEPOOL.migrations[1], TIDEPOOL.migrations[2]);
    assert_eq!(
        recorded,
        [
            ("demo".into(), 1, world.checksum()),
            ("tidepool".into(), 1, jobs.checksum()),
            ("tidepool".into(), 2, schedules.checksum()),
            ("tidepool".into(), 3, workflows.checksum())
        ]
    );
    let key: String = admin
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'tidepool_schema_migrations'::regclass AND contype = 'p'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(key, "PRIMARY KEY (track, version)");
    let still_there: i64 =
        admin.query_one("SELECT count(*) FROM tidepool_jobs WHERE id = $1", &[&enqueued]).await?.get(0);
    assert_eq!(still_there, 1, "the queue's data is untouched");

    let again = migrate_via("TIDEPOOL_DIRECT_DATABASE_URL", &db.direct_url())?;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && !stderr.contains("upgraded"), "{stderr}");
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
