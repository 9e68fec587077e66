//! Tidepool's database access is safe behind PgBouncer 1.18 in transaction
//! mode, and this harness can tell: in the same setup, tokio-postgres' plain
//! `Client::query` (a named prepared statement, prepared in one round trip
//! and executed in another) fails, while the pool's unnamed statements (`Conn::query`) do not.

mod support;

use std::time::Duration;

use anyhow::Result;
use prometheus::Histogram;
use support::{connect, PgBouncer, TestDb};
use tidepool::db::{Database, PoolSettings};
use tokio_postgres::types::Type;

const CLIENTS: usize = 100;
const QUERIES_PER_CLIENT: usize = 50;
/// Few server connections for many clients, so consecutive round trips of
/// one client land on different servers.
const SERVER_CONNECTIONS: u32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_fail_and_typed_ones_do_not() -> Result<()> {
    let db = TestDb::create().await?;
    let bouncer = PgBouncer::start(&db, SERVER_CONNECTIONS).await?;

    // Control: the plain API, the way most code would write it.
    let mut tasks = tokio::task::JoinSet::new();
    for client_no in 0..CLIENTS {
        let url = bouncer.url();
        tasks.spawn(async move {
            let client = connect(&url).await?;
            let mut failures = 0usize;
            for i in 0..QUERIES_PER_CLIENT {
                let n = (client_no * QUERIES_PER_CLIENT + i) as i32;
                match client.query("SELECT $1::int4 + 1", &[&n]).await {
                    Ok(rows) if rows[0].get::<_, i32>(0) == n + 1 => {}
                    _ => failures += 1,
                }
            }
            anyhow::Ok(failures)
        });
    }
    let named_failures = total(tasks).await?;

    // Tidepool's way: the pool, unnamed typed statements.
    let database = Database::new(
        bouncer.url().parse::<tokio_postgres::Config>()?,
        PoolSettings {
            max_size: CLIENTS,
            wait: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            query_timeout: Duration::from_secs(30),
        },
        Histogram::with_opts(prometheus::HistogramOpts::new("wait", "wait"))?,
    )?;
    let mut tasks = tokio::task::JoinSet::new();
    for client_no in 0..CLIENTS {
        let database = database.clone();
        tasks.spawn(async move {
            let mut failures = 0usize;
            for i in 0..QUERIES_PER_CLIENT {
                let n = (client_no * QUERIES_PER_CLIENT + i) as i32;
                let conn = database.get().await?;
                match conn.query("SELECT $1 + 1", &[(&n, Type::INT4)]).await {
                    Ok(rows) if rows[0].get::<_, i32>(0) == n + 1 => {}
                    _ => failures += 1,
                }
            }
            anyhow::Ok(failures)
        });
    }
    let typed_failures = total(tasks).await?;

    let total = CLIENTS * QUERIES_PER_CLIENT;
    println!(
        "named statements: {named_failures} of {total} failed; typed: {typed_failures} of {total} failed"
    );
    assert!(
        named_failures > 0,
        "the harness must show plain Client::query failing through transaction pooling"
    );
    assert_eq!(typed_failures, 0, "unnamed statements must never fail through transaction pooling");
    Ok(())
}

/// The sum of the failures every client task counted.
async fn total(mut tasks: tokio::task::JoinSet<Result<usize>>) -> Result<usize> {
    let mut failures = 0;
    while let Some(joined) = tasks.join_next().await {
        failures += joined??;
    }
    Ok(failures)
}
