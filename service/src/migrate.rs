//! Versioned schema migrations, applied by `migrate`.
//!
//! Migrations come in **tracks**: Tidepool's own ([`TIDEPOOL`], the queue's
//! tables) and each application's (its name, its own numbering from 1), so
//! an application never has to fit its versions around Tidepool's. A
//! migration is SQL compiled into the binary and recorded in
//! `tidepool_schema_migrations` by track and version, with a checksum of its
//! text. A run applies every missing one, track by track in the order given
//! (Tidepool's first), in **one transaction** guarded by a
//! transaction-scoped advisory lock (`pg_advisory_xact_lock`). Nothing here
//! depends on the session outliving the transaction, so it is correct over
//! a direct connection and through PgBouncer in transaction mode alike, and
//! two migrators started at once apply each migration exactly once: the
//! second waits for the lock, then finds nothing left to do. A migration
//! that fails rolls back the whole run: nothing is half-written.
//!
//! What one transaction forbids: statements PostgreSQL refuses inside a
//! transaction block, `CREATE INDEX CONCURRENTLY`, `DROP INDEX
//! CONCURRENTLY`, `ALTER TYPE ... ADD VALUE` before PostgreSQL 12, `VACUUM`,
//! `CREATE DATABASE`. Run those by hand or from a job of your own, and
//! keep a migration's table locks short: every statement waits at most the
//! lock timeout.
//!
//! A recorded migration whose text has changed since it was applied is an
//! error: the database no longer matches what the code describes.
//!
//! ```
//! use tidepool::migrate::{Migration, Track};
//!
//! const SHOP: Track = Track {
//!     name: "shop",
//!     migrations: &[Migration { version: 1, name: "orders", sql: "CREATE TABLE orders (id bigint PRIMARY KEY)" }],
//! };
//! assert!(SHOP.check().is_ok());
//! ```
//!
//! Releases before tracks recorded the demo's `world` table as version 1
//! and the queue as version 2 of one list. The first run of this release
//! upgrades that table in place: each recorded migration is given the track
//! and version of the migration with the same checksum (recorded ones that
//! match none go to the track `legacy` and are reported as unknown), so
//! nothing is applied twice. A release before tracks cannot read the
//! upgraded table: its `migrate` then fails, so roll back the image only
//! together with a restore of the database, as for any schema change.

use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Transaction};

/// The advisory lock key all migrators agree on ("tidepool" in ASCII).
const LOCK_KEY: i64 = 0x7469_6465_706f_6f6c;
/// The track of recorded migrations that an upgrade of the bookkeeping
/// could match to no known migration.
pub const LEGACY_TRACK: &str = "legacy";

/// One migration: a version within its track, a name and its SQL (one or
/// more statements, sent in one simple-protocol batch).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its place in the track: positive, strictly increasing.
    pub version: i32,
    /// A short name, recorded beside the version.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL, in hex: what the database records to notice an
    /// edited migration.
    pub fn checksum(&self) -> String {
        Sha256::digest(self.sql.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A named, ordered list of migrations with versions of its own.
#[derive(Debug, Clone, Copy)]
pub struct Track {
    /// `tidepool` for Tidepool's own; an application's name for its own:
    /// 1 to 64 of a-z, 0-9, '_' and '-'.
    pub name: &'static str,
    /// Strictly increasing versions.
    pub migrations: &'static [Migration],
}

/// Tidepool's own track: the queue's tables.
pub const TIDEPOOL: Track = Track {
    name: "tidepool",
    migrations: &[
        Migration { version: 1, name: "jobs", sql: include_str!("../migrations/0001_jobs.sql") },
        Migration { version: 2, name: "schedules", sql: include_str!("../migrations/0002_schedules.sql") },
        Migration { version: 3, name: "workflows", sql: include_str!("../migrations/0003_workflows.sql") },
    ],
};

impl Track {
    /// Checks the name and the order of the versions.
    pub fn check(&self) -> Result<(), MigrateError> {
        let valid_name = (1..=64).contains(&self.name.len())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name || self.name == LEGACY_TRACK {
            return Err(MigrateError::TrackName(self.name.to_owned()));
        }
        if let Some(first) = self.migrations.first().filter(|m| m.version < 1) {
            return Err(MigrateError::Unordered { track: self.name, version: first.version });
        }
        match self.migrations.windows(2).find(|w| w[0].version >= w[1].version) {
            Some(w) => Err(MigrateError::Unordered { track: self.name, version: w[1].version }),
            None => Ok(()),
        }
    }
}

/// A migration's place: `track/version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The track's name.
    pub track: String,
    /// The version within it.
    pub version: i32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.track, self.version)
    }
}

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Migrations this run applied, in order.
    pub applied: Vec<Version>,
    /// Migrations that were already in place.
    pub already_applied: Vec<Version>,
    /// Migrations recorded in the database that this binary does not know
    /// (a newer release, or another application, migrated it); not an
    /// error, so rollbacks work.
    pub unknown: Vec<Version>,
    /// Recorded migrations that the upgrade of the bookkeeping table moved
    /// to a track, as `(old version, new place)`; empty after the first
    /// run of a release with tracks.
    pub upgraded: Vec<(i32, Version)>,
}

/// A list of versions for a log line: `[tidepool/1, demo/1]`.
pub fn list(versions: &[Version]) -> String {
    let items: Vec<String> = versions.iter().map(Version::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// Why a run applied nothing (its transaction rolled back).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A track's name is not usable.
    #[error(
        "migration track name {0:?} is not valid: use 1 to 64 of a-z, 0-9, '_', '-' (and not \"legacy\")"
    )]
    TrackName(String),
    /// Two tracks share a name.
    #[error("two migration tracks are named {0:?}")]
    DuplicateTrack(&'static str),
    /// A track's versions are not positive and strictly increasing.
    #[error("migration track {track} is not strictly increasing from 1 at version {version}")]
    Unordered {
        /// The track.
        track: &'static str,
        /// The first version out of order.
        version: i32,
    },
    /// A recorded migration's SQL differs from this binary's.
    #[error("migration {track}/{version} ({name}) was changed after it was applied: the database has checksum {recorded}, this binary {expected}")]
    Changed {
        /// The track.
        track: &'static str,
        /// The version.
        version: i32,
        /// Its name.
        name: &'static str,
        /// The checksum in the database.
        recorded: String,
        /// This binary's.
        expected: String,
    },
    /// A migration's SQL failed.
    #[error("migration {track}/{version} ({name}) failed: {source}")]
    Failed {
        /// The track.
        track: &'static str,
        /// The version.
        version: i32,
        /// Its name.
        name: &'static str,
        /// PostgreSQL's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A step of the bookkeeping failed.
    #[error("could not {step}: {source}")]
    Database {
        /// What was being done.
        step: &'static str,
        /// PostgreSQL's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
    move |source| MigrateError::Database { step, source }
}

/// Checks every track and that no two share a name.
pub fn check(tracks: &[Track]) -> Result<(), MigrateError> {
    for (i, track) in tracks.iter().enumerate() {
        track.check()?;
        if tracks[..i].iter().any(|t| t.name == track.name) {
            return Err(MigrateError::DuplicateTrack(track.name));
        }
    }
    Ok(())
}

/// Applies the missing migrations of `tracks`, in order, in one
/// transaction. `lock_timeout` bounds the wait for another migrator and
/// for table locks.
pub async fn run(
    client: &mut Client,
    tracks: &[Track],
    lock_timeout: Duration,
) -> Result<Report, MigrateError> {
    check(tracks)?;
    let tx = client.transaction().await.map_err(step("begin the migration transaction"))?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{}ms'", lock_timeout.as_millis()))
        .await
        .map_err(step("set the lock timeout"))?;
    tx.query_typed("SELECT pg_advisory_xact_lock($1)", &[(&LOCK_KEY, Type::INT8)])
        .await
        .map_err(step("take the migration lock (another migrator may hold it)"))?;
    let mut report = Report { upgraded: prepare_bookkeeping(&tx, tracks).await?, ..Report::default() };
    let recorded = tx
        .query_typed(
            "SELECT track, version, checksum FROM tidepool_schema_migrations ORDER BY track, version",
            &[],
        )
        .await
        .map_err(step("read the applied migrations"))?;
    let recorded: Vec<(String, i32, String)> =
        recorded.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();

    for track in tracks {
        for migration in track.migrations {
            let here = Version { track: track.name.to_owned(), version: migration.version };
            let checksum = recorded
                .iter()
                .find(|(t, v, _)| t == track.name && *v == migration.version)
                .map(|(_, _, checksum)| checksum);
            match checksum {
                Some(checksum) if *checksum == migration.checksum() => report.already_applied.push(here),
                Some(checksum) => {
                    return Err(MigrateError::Changed {
                        track: track.name,
                        version: migration.version,
                        name: migration.name,
                        recorded: checksum.clone(),
                        expected: migration.checksum(),
                    })
                }
                None => {
                    apply(&tx, track.name, migration).await?;
                    report.applied.push(here);
                }
            }
        }
    }
    report.unknown = recorded
        .iter()
        .filter(|(t, v, _)| {
            !tracks.iter().any(|k| k.name == t && k.migrations.iter().any(|m| m.version == *v))
        })
        .map(|(t, v, _)| Version { track: t.clone(), version: *v })
        .collect();
    tx.commit().await.map_err(step("commit the migrations"))?;
    Ok(report)
}

async fn apply(tx: &Transaction<'_>, track: &'static str, migration: &Migration) -> Result<(), MigrateError> {
    let failed =
        |source| MigrateError::Failed { track, version: migration.version, name: migration.name, source };
    tx.batch_execute(migration.sql).await.map_err(failed)?;
    tx.query_typed(
        "INSERT INTO tidepool_schema_migrations (track, version, name, checksum) VALUES ($1, $2, $3, $4)",
        &[
            (&track, Type::TEXT),
            (&migration.version, Type::INT4),
            (&migration.name, Type::TEXT),
            (&migration.checksum(), Type::TEXT),
        ],
    )
    .await
    .map_err(failed)?;
    Ok(())
}

/// Creates the bookkeeping table, or upgrades one written by a release
/// before tracks (see the module's note), returning what it moved.
async fn prepare_bookkeeping(
    tx: &Transaction<'_>,
    tracks: &[Track],
) -> Result<Vec<(i32, Version)>, MigrateError> {
    let exists = tx
        .query_typed(
            "SELECT EXISTS (SELECT FROM pg_attribute
                            WHERE attrelid = to_regclass('tidepool_schema_migrations') AND attname = 'track' AND NOT attisdropped),
                    to_regclass('tidepool_schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(step("look for the migrations table"))?;
    let (has_tracks, has_table): (bool, bool) = (exists[0].get(0), exists[0].get(1));
    if !has_table {
        tx.batch_execute(
            "CREATE TABLE tidepool_schema_migrations (
                 track      text NOT NULL,
                 version    integer NOT NULL,
                 name       text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (track, version)
             )",
        )
        .await
        .map_err(step("create the migrations table"))?;
        return Ok(Vec::new());
    }
    if has_tracks {
        return Ok(Vec::new());
    }
    let legacy = tx
        .query_typed("SELECT version, checksum FROM tidepool_schema_migrations ORDER BY version", &[])
        .await
        .map_err(step("read the migrations recorded before tracks"))?;
    tx.batch_execute(
        "ALTER TABLE tidepool_schema_migrations DROP CONSTRAINT IF EXISTS tidepool_schema_migrations_pkey;
         ALTER TABLE tidepool_schema_migrations ADD COLUMN track text",
    )
    .await
    .map_err(step("add the track column to the migrations table"))?;
    let mut moved = Vec::new();
    for row in &legacy {
        let (old, checksum): (i32, String) = (row.get(0), row.get(1));
        let place = tracks.iter().find_map(|t| {
            t.migrations.iter().find(|m| m.checksum() == checksum).map(|m| (t.name, m.version))
        });
        let (track, version) = place.unwrap_or((LEGACY_TRACK, old));
        tx.query_typed(
            "UPDATE tidepool_schema_migrations SET track = $1, version = $2 WHERE version = $3 AND track IS NULL",
            &[(&track, Type::TEXT), (&version, Type::INT4), (&old, Type::INT4)],
        )
        .await
        .map_err(step("move a recorded migration to its track"))?;
        moved.push((old, Version { track: track.to_owned(), version }));
    }
    tx.batch_execute(
        "ALTER TABLE tidepool_schema_migrations ALTER COLUMN track SET NOT NULL;
         ALTER TABLE tidepool_schema_migrations ADD PRIMARY KEY (track, version)",
    )
    .await
    .map_err(step("key the migrations table by track and version"))?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Migration = Migration { version: 1, name: "a", sql: "SELECT 1" };
    const B: Migration = Migration { version: 2, name: "b", sql: "SELECT 2" };

    #[test]
    fn tidepool_track_is_valid() {
        assert!(check(&[TIDEPOOL]).is_ok());
        assert!(TIDEPOOL.migrations.iter().all(|m| !m.sql.trim().is_empty() && !m.name.is_empty()));
    }

    #[test]
    fn checksum_is_stable_and_content_sensitive() {
        let b = Migration { sql: "SELECT 2", ..A };
        assert_eq!(A.checksum(), A.checksum());
        assert_eq!(A.checksum().len(), 64);
        assert_ne!(A.checksum(), b.checksum());
    }

    #[test]
    fn tracks_are_checked_before_anything_runs() {
        let track = |name, migrations| Track { name, migrations };
        assert!(check(&[track("shop", &[A, B])]).is_ok());
        assert!(check(&[track("shop", &[])]).is_ok());
        assert!(matches!(check(&[track("shop", &[B, A])]), Err(MigrateError::Unordered { version: 1, .. })));
        assert!(matches!(check(&[track("shop", &[A, A])]), Err(MigrateError::Unordered { version: 1, .. })));
        const ZERO: Migration = Migration { version: 0, ..A };
        assert!(matches!(check(&[track("shop", &[ZERO])]), Err(MigrateError::Unordered { version: 0, .. })));
        const TOO_LONG: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
        for bad in ["", "Shop", "a b", "legacy", TOO_LONG] {
            assert!(matches!(check(&[track(bad, &[A])]), Err(MigrateError::TrackName(_))), "{bad:?}");
        }
        let err = check(&[TIDEPOOL, track("tidepool", &[A])]).expect_err("duplicate");
        assert_eq!(err.to_string(), "two migration tracks are named \"tidepool\"");
    }

    #[test]
    fn versions_print_as_track_and_number() {
        let v = |t: &str, n| Version { track: t.to_owned(), version: n };
        assert_eq!(list(&[v("tidepool", 1), v("demo", 1)]), "[tidepool/1, demo/1]");
        assert_eq!(list(&[]), "[]");
    }
}
