//! `tidepool`, the default binary: the seed's demo, an application built on
//! Tidepool's public API like any other (see `routes.rs` and `tasks.rs`).
//!
//! - `GET /slow-query/?seconds=S`: `SELECT pg_sleep(S)` (S from 0 to 60,
//!   default 5), the seed's slow endpoint;
//! - `GET /row/`: one random row of the 10,000-row `world` table (the
//!   TechEmpower single query);
//! - the queue's JSON API, `POST /tasks/`, `GET` and `DELETE /tasks/{id}`
//!   ([`tidepool::web::tasks_api`]), mounted on purpose;
//! - the tasks `slow_query` (`{"seconds": S}`, a `pg_sleep` on the task
//!   pool) and `noop`;
//! - its migration track `demo`: the `world` table.
//!
//! The operator runs this image when a Tidepool names no other.

mod routes;
mod tasks;

use std::process::ExitCode;

use tidepool::migrate::Migration;
use tidepool::Application;

/// The demo's own migrations (its track is named after the application).
const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, name: "world", sql: include_str!("migrations/0001_world.sql") }];

fn main() -> ExitCode {
    let demo = Application::new("demo")
        .version(env!("CARGO_PKG_VERSION"))
        .routes(routes::router())
        .task::<tasks::SlowQuery>()
        .task::<tasks::Noop>()
        .migrations(MIGRATIONS);
    tidepool::run(demo)
}
