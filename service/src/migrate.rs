//! Versioned schema migrations, applied by `tidepool migrate`.
//!
//! Migrations are SQL files compiled into the binary, numbered, and recorded
//! in `tidepool_schema_migrations` with a checksum of their text. A run
//! applies every missing one, in order, in **one transaction** guarded by a
//! transaction-scoped advisory lock (`pg_advisory_xact_lock`). Nothing here
//! depends on the session outliving the transaction, so it is correct over a
//! direct connection and through PgBouncer in transaction mode alike, and two
//! migrators started at once apply each migration exactly once: the second
//! waits for the lock, then finds nothing left to do.
//!
//! A recorded migration whose text has changed since it was applied is an
//! error: the database no longer matches what the code describes.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

/// The advisory lock key all migrators agree on ("tidepool" in ASCII).
const LOCK_KEY: i64 = 0x7469_6465_706f_6f6c;

#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    pub fn checksum(&self) -> String {
        Sha256::digest(self.sql.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Every migration of this release, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "world", sql: include_str!("../migrations/0001_world.sql") },
    Migration { version: 2, name: "jobs", sql: include_str!("../migrations/0002_jobs.sql") },
];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Versions this run applied, in order.
    pub applied: Vec<i32>,
    /// Versions that were already in place.
    pub already_applied: Vec<i32>,
    /// Versions recorded in the database that this binary does not know
    /// (a newer release migrated it); not an error, so rollbacks work.
    pub unknown: Vec<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration list is not strictly increasing at version {0}")]
    Unordered(i32),
    #[error("migration {version} ({name}) was changed after it was applied: the database has checksum {recorded}, this binary {expected}")]
    Changed { version: i32, name: &'static str, recorded: String, expected: String },
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("could not {step}: {source}")]
    Database {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
    move |source| MigrateError::Database { step, source }
}

/// Applies the missing `migrations` in one transaction. `lock_timeout`
/// bounds the wait for another migrator and for table locks.
pub async fn run(
    client: &mut Client,
    migrations: &[Migration],
    lock_timeout: Duration,
) -> Result<Report, MigrateError> {
    if let Some(w) = migrations.windows(2).find(|w| w[0].version >= w[1].version) {
        return Err(MigrateError::Unordered(w[1].version));
    }
    let tx = client.transaction().await.map_err(step("begin the migration transaction"))?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{}ms'", lock_timeout.as_millis()))
        .await
        .map_err(step("set the lock timeout"))?;
    tx.query_typed("SELECT pg_advisory_xact_lock($1)", &[(&LOCK_KEY, Type::INT8)])
        .await
        .map_err(step("take the migration lock (another migrator may hold it)"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tidepool_schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(step("create the migrations table"))?;
    let recorded = tx
        .query_typed("SELECT version, checksum FROM tidepool_schema_migrations ORDER BY version", &[])
        .await
        .map_err(step("read the applied migrations"))?;
    let recorded: Vec<(i32, String)> = recorded.iter().map(|r| (r.get(0), r.get(1))).collect();

    let mut report = Report::default();
    for migration in migrations {
        match recorded.iter().find(|(v, _)| *v == migration.version) {
            Some((_, checksum)) if *checksum == migration.checksum() => {
                report.already_applied.push(migration.version);
            }
            Some((_, checksum)) => {
                return Err(MigrateError::Changed {
                    version: migration.version,
                    name: migration.name,
                    recorded: checksum.clone(),
                    expected: migration.checksum(),
                });
            }
            None => {
                let failed = |source| MigrateError::Failed {
                    version: migration.version,
                    name: migration.name,
                    source,
                };
                tx.batch_execute(migration.sql).await.map_err(failed)?;
                tx.query_typed(
                    "INSERT INTO tidepool_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[
                        (&migration.version, Type::INT4),
                        (&migration.name, Type::TEXT),
                        (&migration.checksum(), Type::TEXT),
                    ],
                )
                .await
                .map_err(failed)?;
                report.applied.push(migration.version);
            }
        }
    }
    report.unknown =
        recorded.iter().map(|(v, _)| *v).filter(|v| !migrations.iter().any(|m| m.version == *v)).collect();
    tx.commit().await.map_err(step("commit the migrations"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_migrations_are_ordered_and_distinct() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert!(MIGRATIONS.iter().all(|m| !m.sql.trim().is_empty() && !m.name.is_empty()));
    }

    #[test]
    fn checksum_is_stable_and_content_sensitive() {
        let a = Migration { version: 1, name: "a", sql: "SELECT 1" };
        let b = Migration { sql: "SELECT 2", ..a };
        assert_eq!(a.checksum(), a.checksum());
        assert_eq!(a.checksum().len(), 64);
        assert_ne!(a.checksum(), b.checksum());
    }
}
