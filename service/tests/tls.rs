//! TLS to a PostgreSQL that takes TLS connections only (`hostssl` lines,
//! `ssl=on`, the test certificates of `tests/fixtures/tls`: `server.crt`,
//! issued by test CA a for `localhost` and `127.0.0.1`): `tidepool migrate`
//! with each `sslmode`, a CA bundle whose first root is not the issuer, a
//! host name the certificate does not hold, a pool and a LISTEN session
//! under `verify-full`, encrypted by `pg_stat_ssl`, and a real PgBouncer's
//! server connections verified the same way (`server_tls_*` from the URL).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use support::PgBouncer;
use tidepool::db::{self, Database, PoolSettings, Target};
use tidepool_testenv::node::{AppDatabase, PrivatePostgres};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

fn fixture_arg(name: &str) -> Result<String> {
    fixture(name).to_str().map(str::to_owned).context("a UTF-8 path")
}

/// `tidepool migrate` with `TIDEPOOL_DIRECT_DATABASE_URL` = `url`.
fn migrate(url: &str) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .env("TIDEPOOL_DIRECT_DATABASE_URL", url)
        .env("TIDEPOOL_DB_CONNECT_TIMEOUT", "5s")
        .output()?)
}

/// Its exit and what it said.
fn outcome(output: &Output) -> (bool, String) {
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn migrate_connects_with_each_sslmode_as_libpq_means_it() -> Result<()> {
    let private = PrivatePostgres::tls_only("tls", 20, &fixture("."))?;
    let db = AppDatabase::create(&private.postgres, "tls_migrate")?;
    let url = db.url(&private.postgres);
    let with = |query: &str| format!("{url}?{query}");
    // The same server under a name its certificate does not hold; hostaddr
    // says where it is, so nothing is resolved.
    let renamed = url.replacen("@127.0.0.1:", "@db.example:", 1);
    ensure!(renamed != url, "the URL names 127.0.0.1: {url}");
    let renamed = |query: &str| format!("{renamed}?hostaddr=127.0.0.1&{query}");

    let (ok, said) = outcome(&migrate(&with("sslmode=disable"))?);
    assert!(!ok && said.contains("no pg_hba.conf entry") && said.contains("no encryption"), "{said}");
    for query in [
        "sslmode=prefer".to_owned(),
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={}", fixture_arg("ca-a.crt")?),
        format!("sslmode=verify-full&sslrootcert={}", fixture_arg("ca-a.crt")?),
        format!("sslmode=verify-full&sslrootcert={}", fixture_arg("bundle-b-then-a.crt")?),
    ] {
        let (ok, said) = outcome(&migrate(&with(&query))?);
        assert!(ok, "{query}: {said}");
    }
    // The certificate does not name db.example: verify-ca does not ask.
    let query = format!("sslmode=verify-ca&sslrootcert={}", fixture_arg("ca-a.crt")?);
    let (ok, said) = outcome(&migrate(&renamed(&query))?);
    assert!(ok, "{query} as db.example: {said}");

    let (ok, said) =
        outcome(&migrate(&with(&format!("sslmode=verify-full&sslrootcert={}", fixture_arg("ca-b.crt")?)))?);
    assert!(!ok && said.contains("TLS to 127.0.0.1") && said.contains("UnknownIssuer"), "{said}");
    let (ok, said) = outcome(&migrate(&renamed(&format!(
        "sslmode=verify-full&sslrootcert={}",
        fixture_arg("ca-a.crt")?
    )))?);
    assert!(!ok && said.contains("TLS to db.example") && said.contains("not valid for name"), "{said}");
    let (ok, said) = outcome(&migrate(&with("sslmode=verify-full"))?);
    assert!(!ok && said.contains("sslmode=verify-full verifies the server's certificate"), "{said}");
    assert!(!said.contains(&db.password), "no password in what it says: {said}");
    Ok(())
}

#[tokio::test]
async fn a_pool_and_a_listen_session_are_verified_and_encrypted() -> Result<()> {
    let private = PrivatePostgres::tls_only("tlspool", 20, &fixture("."))?;
    let db = AppDatabase::create(&private.postgres, "tls_pool")?;
    let target: Target = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url(&private.postgres),
        fixture_arg("bundle-b-then-a.crt")?
    )
    .parse()?;

    let pool = PoolSettings {
        max_size: 2,
        wait: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        query_timeout: Duration::from_secs(5),
    };
    let histogram = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("wait", "wait"))?;
    let database = Database::new(target.clone(), pool, histogram)?;
    let conn = database.get().await?;
    let one: i32 = conn.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);

    let (listening, listened) = tokio::sync::oneshot::channel();
    let session = tokio::spawn(async move {
        let mut listening = Some(listening);
        db::listen(
            target,
            Duration::from_secs(5),
            "tidepool_jobs",
            move || {
                if let Some(tx) = listening.take() {
                    let _ = tx.send(());
                }
            },
            |_| {},
        )
        .await
    });
    tokio::time::timeout(Duration::from_secs(10), listened).await.context("LISTEN within 10 s")??;
    let (ssl, all) = encrypted_backends(&private, &db.name)?;
    ensure!(all != 0 && ssl == all, "the role's backends, encrypted of all: {ssl} of {all}");
    assert_eq!(all, 2, "the pooled connection and the LISTEN session");
    drop(conn);
    session.abort();
    Ok(())
}

/// Backends of role `user`: (encrypted, all), as `pg_stat_ssl` has them.
fn encrypted_backends(private: &PrivatePostgres, user: &str) -> Result<(u32, u32)> {
    let counts = private.postgres.psql(
        "postgres",
        &format!(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = '{user}'"
        ),
    )?;
    let (ssl, all) = counts.split_once('|').context("two counts")?;
    Ok((ssl.trim().parse()?, all.trim().parse()?))
}

#[tokio::test]
async fn pgbouncer_verifies_the_server_as_the_url_says() -> Result<()> {
    let private = PrivatePostgres::tls_only("tlsbouncer", 20, &fixture("."))?;
    let db = AppDatabase::create(&private.postgres, "tls_bouncer")?;
    let url = db.url(&private.postgres);
    // PgBouncer logs a client in once it has the server's parameters, so
    // a server it cannot log in to shows as a login that does not finish
    // (its log says why, at each retry).
    let query_through = |bouncer: &PgBouncer| {
        let url = bouncer.url();
        async move {
            let client = db::connect(url.parse::<tokio_postgres::Config>()?, Duration::from_secs(5)).await?;
            let row = client.query_one("SELECT 1", &[]).await?;
            anyhow::Ok(row.get::<_, i32>(0))
        }
    };

    let verified = PgBouncer::in_front_of(
        &format!("{url}?sslmode=verify-full&sslrootcert={}", fixture_arg("bundle-b-then-a.crt")?),
        2,
    )
    .await?;
    assert_eq!(query_through(&verified).await?, 1);
    let (ssl, all) = encrypted_backends(&private, &db.name)?;
    assert!(all >= 1 && ssl == all, "PgBouncer's server connections, encrypted of all: {ssl} of {all}");
    drop(verified);

    // The wrong CA: with verify-full, and with require plus roots, which
    // libpq (and so Tidepool) takes as checking the chain; PgBouncer's own
    // require would not.
    for query in [
        format!("sslmode=verify-full&sslrootcert={}", fixture_arg("ca-b.crt")?),
        format!("sslmode=require&sslrootcert={}", fixture_arg("ca-b.crt")?),
    ] {
        let bouncer = PgBouncer::in_front_of(&format!("{url}?{query}"), 2).await?;
        let answer = query_through(&bouncer).await;
        assert!(answer.is_err(), "{query}: PgBouncer must not log in to a server it cannot verify");
        let log = bouncer.log();
        assert!(log.contains("certificate verify failed"), "{query}: PgBouncer's log says why: {log}");
    }
    // Without roots, require encrypts and verifies nothing, as libpq's.
    let unverified = PgBouncer::in_front_of(&format!("{url}?sslmode=require"), 2).await?;
    assert_eq!(query_through(&unverified).await?, 1);
    Ok(())
}
