//! The demo's tasks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidepool::db::Type;
use tidepool::task::{Task, TaskContext, TaskError};

/// Default and limits of `slow_query`'s `seconds`.
const DEFAULT_SECONDS: f64 = 5.0;
const MAX_SECONDS: f64 = 3600.0;

fn default_seconds() -> f64 {
    DEFAULT_SECONDS
}

/// The seed's task: `SELECT pg_sleep(seconds)` through the task pool.
#[derive(Serialize, Deserialize)]
pub struct SlowQuery {
    #[serde(default = "default_seconds")]
    seconds: f64,
}

#[derive(Serialize)]
pub struct Slept {
    slept: f64,
}

impl Task for SlowQuery {
    const NAME: &'static str = "slow_query";
    const TIMEOUT: Duration = Duration::from_secs(MAX_SECONDS as u64 + 60);
    type State = ();
    type Output = Slept;

    fn validate(&self) -> Result<(), String> {
        if (0.0..=MAX_SECONDS).contains(&self.seconds) {
            Ok(())
        } else {
            Err(format!("seconds must be from 0 to {MAX_SECONDS}, got {}", self.seconds))
        }
    }

    async fn run(self, ctx: TaskContext<()>) -> Result<Slept, TaskError> {
        let conn = ctx.db.get().await?;
        let expected = Duration::from_secs_f64(self.seconds);
        conn.query_slow("SELECT pg_sleep($1)", &[(&self.seconds, Type::FLOAT8)], expected).await?;
        Ok(Slept { slept: self.seconds })
    }
}

/// Does nothing: the queue's own cost, for benchmarks.
#[derive(Serialize, Deserialize)]
pub struct Noop {}

impl Task for Noop {
    const NAME: &'static str = "noop";
    type State = ();
    type Output = ();

    async fn run(self, _: TaskContext<()>) -> Result<(), TaskError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool::serde_json::json;
    use tidepool::task::check_args;

    #[test]
    fn slow_query_takes_seconds_within_range() {
        assert_eq!(check_args::<SlowQuery>(&json!({})), Ok(()));
        assert_eq!(check_args::<SlowQuery>(&json!({"seconds": 0.5})), Ok(()));
        for bad in [json!({"seconds": -1}), json!({"seconds": 3601}), json!({"seconds": "5"})] {
            assert!(check_args::<SlowQuery>(&bad).is_err(), "{bad}");
        }
        assert_eq!(check_args::<Noop>(&json!({})), Ok(()));
    }
}
