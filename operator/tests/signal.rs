//! The SQL signal's statement runner (`tidepool_operator::signal::read`)
//! against the real PostgreSQL of `make test`, as a scaler's role that may
//! only read one table, and as the table's owner: the numbers it takes,
//! the shapes it refuses with a message that says what to do, and the
//! limits a user's statement cannot lift (read-only, one statement, the
//! statement timeout).

use std::time::{Duration, Instant};

use anyhow::Result;
use tidepool_operator::signal::{read, SignalError};
use tidepool_testenv::node::{AppDatabase, Postgres};

struct Database {
    pg: Postgres,
    db: AppDatabase,
    runtime: tokio::runtime::Runtime,
    /// As the owner of `backlog`, which may write it.
    owner: tokio_postgres::Client,
    /// As `<db>_scaler`, which may only read `backlog`.
    scaler: tokio_postgres::Client,
}

impl Database {
    fn create(name: &str) -> Result<Database> {
        let pg = Postgres::from_env()?;
        let db = AppDatabase::create(&pg, name)?;
        pg.psql(
            name,
            &format!(
                "SET ROLE {name};
                 CREATE TABLE backlog (id bigserial PRIMARY KEY, weight numeric NOT NULL DEFAULT 1.5);
                 CREATE TABLE private (id int);
                 INSERT INTO backlog (weight) SELECT 1.5 FROM generate_series(1, 7);
                 RESET ROLE;
                 CREATE ROLE {name}_scaler LOGIN PASSWORD '{password}-scaler';
                 GRANT SELECT ON backlog TO {name}_scaler",
                password = db.password
            ),
        )?;
        let runtime = tokio::runtime::Runtime::new()?;
        let connect = |user: String, password: String| {
            let mut config = tokio_postgres::Config::new();
            config.host("127.0.0.1").port(pg.port).dbname(name).user(&user).password(&password);
            runtime.block_on(tidepool::db::connect(config, Duration::from_secs(10)))
        };
        let owner = connect(db.name.clone(), db.password.clone())?;
        let scaler = connect(format!("{name}_scaler"), format!("{}-scaler", db.password))?;
        Ok(Database { pg, db, runtime, owner, scaler })
    }

    fn as_scaler(&mut self, sql: &str) -> Result<f64, SignalError> {
        self.runtime.block_on(read(&mut self.scaler, sql, Duration::from_secs(2)))
    }

    fn as_owner(&mut self, sql: &str) -> Result<f64, SignalError> {
        self.runtime.block_on(read(&mut self.owner, sql, Duration::from_secs(2)))
    }

    fn rows(&self) -> Result<String> {
        Ok(self.pg.psql(&self.db.name, "SELECT count(*) FROM backlog")?.trim().to_owned())
    }
}

#[test]
fn every_number_type_is_read() -> Result<()> {
    let mut db = Database::create(&format!("signal_numbers_{}", std::process::id()))?;
    assert_eq!(db.as_scaler("SELECT count(*) FROM backlog")?, 7.0, "int8");
    assert_eq!(db.as_scaler("SELECT sum(weight) FROM backlog")?, 10.5, "numeric");
    assert_eq!(db.as_scaler("SELECT count(*)::int4 FROM backlog")?, 7.0);
    assert_eq!(db.as_scaler("SELECT 3::int2")?, 3.0);
    assert_eq!(db.as_scaler("SELECT 2.25::float4")?, 2.25);
    assert_eq!(db.as_scaler("SELECT 1e15::float8")?, 1e15);
    assert_eq!(db.as_scaler("SELECT -12345678.0625::numeric")?, -12_345_678.062_5);
    assert_eq!(db.as_scaler("SELECT 0.0001::numeric")?, 0.0001);
    assert_eq!(db.as_scaler("SELECT 'Infinity'::numeric")?, f64::INFINITY);
    assert_eq!(db.as_scaler("SELECT coalesce(sum(weight), 0) FROM backlog WHERE id < 0")?, 0.0);
    // Trailing semicolons and comments are the user's to write.
    assert_eq!(db.as_scaler("-- the backlog\nSELECT count(*) FROM backlog;")?, 7.0);
    Ok(())
}

#[test]
fn other_shapes_are_refused_with_what_to_do() -> Result<()> {
    let mut db = Database::create(&format!("signal_shapes_{}", std::process::id()))?;
    assert_eq!(db.as_scaler("SELECT sum(weight) FROM backlog WHERE id < 0"), Err(SignalError::Null));
    assert_eq!(db.as_scaler("SELECT id FROM backlog WHERE id < 0"), Err(SignalError::NoRow));
    assert_eq!(db.as_scaler("SELECT id FROM backlog"), Err(SignalError::Rows));
    assert_eq!(db.as_scaler("SELECT 1, 2"), Err(SignalError::Columns(2)));
    assert_eq!(db.as_scaler("SELECT 'many'"), Err(SignalError::NotANumber("text".into())));
    assert_eq!(db.as_scaler("SELECT 'NaN'::float8"), Err(SignalError::NaN));
    let failed = |e: Result<f64, SignalError>| match e {
        Err(SignalError::Failed(message)) => message,
        other => format!("not a failure: {other:?}"),
    };
    let denied = failed(db.as_scaler("SELECT count(*) FROM private"));
    assert!(denied.contains("permission denied for table private"), "{denied}");
    let syntax = failed(db.as_scaler("SELEC 1"));
    assert!(syntax.contains("syntax error"), "{syntax}");
    // The same connection reads again after each failure.
    assert_eq!(db.as_scaler("SELECT count(*) FROM backlog")?, 7.0);
    Ok(())
}

#[test]
fn a_statement_may_not_write_run_twice_or_run_long() -> Result<()> {
    let mut db = Database::create(&format!("signal_limits_{}", std::process::id()))?;
    let failed = |e: Result<f64, SignalError>| match e {
        Err(SignalError::Failed(message)) => message,
        other => format!("not a failure: {other:?}"),
    };
    // Even the table's owner, who may delete, deletes nothing.
    let write =
        failed(db.as_owner("WITH gone AS (DELETE FROM backlog RETURNING 1) SELECT count(*) FROM gone"));
    assert!(write.contains("in a read-only transaction"), "{write}");
    let delete = failed(db.as_owner("DELETE FROM backlog"));
    assert!(delete.contains("cannot execute DELETE in a read-only transaction"), "{delete}");
    let sequence = failed(db.as_owner("SELECT nextval('backlog_id_seq')"));
    assert!(sequence.contains("read-only transaction"), "{sequence}");
    let twice = failed(db.as_owner("SELECT count(*) FROM backlog; DELETE FROM backlog"));
    assert!(twice.contains("cannot insert multiple commands into a prepared statement"), "{twice}");
    let settings = failed(db.as_owner("SELECT count(*) FROM backlog; SET statement_timeout = 0"));
    assert!(settings.contains("multiple commands"), "{settings}");
    assert_eq!(db.rows()?, "7", "nothing was deleted");

    let started = Instant::now();
    let slow = db.as_scaler("SELECT count(*) FROM backlog, pg_sleep(30)");
    let took = started.elapsed();
    assert_eq!(slow, Err(SignalError::Timeout(Duration::from_secs(2))));
    assert!(took < Duration::from_secs(25), "the server cancelled it, not the sleep's end: {took:?}");
    // The timeout was the transaction's: the session's own is untouched,
    // and no backend still runs it.
    let session = db.runtime.block_on(db.scaler.query_one("SHOW statement_timeout", &[]))?;
    assert_eq!(session.get::<_, String>(0), "0");
    let sleeping = db.pg.psql(
        &db.db.name,
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()",
    )?;
    assert_eq!(sleeping.trim(), "0");
    assert_eq!(db.as_scaler("SELECT count(*) FROM backlog")?, 7.0);
    Ok(())
}
