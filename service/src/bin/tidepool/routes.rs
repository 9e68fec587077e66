//! The demo's routes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidepool::axum::extract::Query;
use tidepool::axum::routing::get;
use tidepool::axum::{Json, Router};
use tidepool::db::{Conn, Type};
use tidepool::web::ApiError;

/// Rows in the `world` table (see the migration).
pub const WORLD_ROWS: i32 = 10_000;
/// Default and maximum of `/slow-query/?seconds=`.
const DEFAULT_SLOW_QUERY_SECONDS: f64 = 5.0;
const MAX_SLOW_QUERY_SECONDS: f64 = 60.0;

pub fn router() -> Router {
    Router::new()
        .route("/slow-query/", get(slow_query))
        .route("/row/", get(row))
        .merge(tidepool::web::tasks_api())
}

#[derive(Serialize)]
struct Message {
    message: &'static str,
}

#[derive(Deserialize)]
struct SlowQueryParams {
    seconds: Option<String>,
}

async fn slow_query(Query(params): Query<SlowQueryParams>, conn: Conn) -> Result<Json<Message>, ApiError> {
    let seconds = parse_seconds(params.seconds.as_deref())?;
    conn.query_slow("SELECT pg_sleep($1)", &[(&seconds, Type::FLOAT8)], Duration::from_secs_f64(seconds))
        .await?;
    Ok(Json(Message { message: "Slow query completed" }))
}

/// `seconds`: a finite number from 0 to 60 (fractions allowed), 5 when absent.
fn parse_seconds(raw: Option<&str>) -> Result<f64, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_SLOW_QUERY_SECONDS);
    };
    let invalid = || {
        ApiError::bad_request(format!(
            "seconds must be a number from 0 to {MAX_SLOW_QUERY_SECONDS} (fractions allowed), got {raw:?}"
        ))
    };
    let seconds: f64 = raw.trim().parse().map_err(|_| invalid())?;
    if seconds.is_finite() && (0.0..=MAX_SLOW_QUERY_SECONDS).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(invalid())
    }
}

#[derive(Serialize)]
struct World {
    id: i32,
    randomnumber: i32,
}

async fn row(conn: Conn) -> Result<Json<World>, ApiError> {
    let id: i32 = rand::random_range(1..=WORLD_ROWS);
    let row = conn
        .query_opt("SELECT id, randomnumber FROM world WHERE id = $1", &[(&id, Type::INT4)])
        .await?
        .ok_or_else(|| ApiError::internal(format!("world has no row {id}; run `tidepool migrate`")))?;
    Ok(Json(World { id: row.get(0), randomnumber: row.get(1) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool::axum::http::StatusCode;

    #[test]
    fn seconds_default_and_range() {
        assert_eq!(parse_seconds(None).ok(), Some(5.0));
        assert_eq!(parse_seconds(Some("0")).ok(), Some(0.0));
        assert_eq!(parse_seconds(Some("0.25")).ok(), Some(0.25));
        assert_eq!(parse_seconds(Some("60")).ok(), Some(60.0));
    }

    #[test]
    fn seconds_rejects_what_is_not_a_number_in_range() {
        for bad in ["abc", "-1", "1000", "60.01", "NaN", "inf", "", "1s", "-0.5"] {
            let err = parse_seconds(Some(bad)).expect_err(bad);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(err.message.contains("from 0 to 60"), "{}", err.message);
        }
    }
}
