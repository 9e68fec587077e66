//! Routing and the handlers of `tidepool web`.
//!
//! | route | what it does |
//! |---|---|
//! | `GET /slow-query/?seconds=S` | `SELECT pg_sleep(S)` (S from 0 to 60, default 5), the seed's slow endpoint |
//! | `GET /row/` | one random row of the 10,000-row `world` table |
//! | `POST /tasks/`, `GET` and `DELETE /tasks/{id}` | enqueue, read and cancel jobs (see [`super::tasks`]) |
//! | `GET /healthz` | the process is alive (no database) |
//! | `GET /readyz` | an idle pooled connection runs `SELECT 1` through the pooler (`ready`); with none idle the pod is `busy` and still ready; 503 when that fails (PgBouncer or PostgreSQL down), while the pool's connections open at start, and while draining |
//! | `GET /metrics` | Prometheus text format |
//!
//! While the server drains (see [`super`]), every response carries
//! `Connection: close`.
//!
//! Every request passes the same gates, in this order: known route (404),
//! method (405), body size and read time (413, 408), then, for all but the
//! probes, the in-flight limit (503). Probes skip that limit so a busy pod
//! is not restarted or pulled from its Service for being busy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use rand::Rng;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_postgres::types::Type;

use super::linger::UnreadBody;
use super::response::{json, with_body, ApiError, Body, Shed};
use super::tasks;
use crate::db::Database;
use crate::metrics::Metrics;
use crate::pooler_metrics::AdminConsole;
use crate::queue::Registry;

/// Rows in the `world` table (see migration 0001).
pub const WORLD_ROWS: i32 = 10_000;
/// Default and maximum of `/slow-query/?seconds=`.
pub const DEFAULT_SLOW_QUERY_SECONDS: f64 = 5.0;
pub const MAX_SLOW_QUERY_SECONDS: f64 = 60.0;

/// Shared state of every request.
pub struct App {
    pub db: Database,
    pub metrics: Metrics,
    /// The sidecar's admin console, for the `pgbouncer_*` series.
    pub pooler: Option<AdminConsole>,
    /// Longest `/readyz` waits for `SELECT 1` ([`Database::check`]).
    pub readiness_timeout: Duration,
    pub in_flight: Semaphore,
    /// The tasks `POST /tasks/` accepts.
    pub registry: Arc<Registry>,
    pub max_body_bytes: u64,
    pub body_read_timeout: Duration,
    /// Set until the pool's connections are open ([`super::warm_up`]):
    /// `/readyz` answers 503 until then.
    pub starting: AtomicBool,
    /// Set at the first shutdown signal: `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    SlowQuery,
    Row,
    Tasks,
    /// `/tasks/{id}`; `None` when the id is not a positive integer.
    Task(Option<i64>),
    Healthz,
    Readyz,
    Metrics,
}

impl Route {
    /// The route for `path`; the trailing slash is optional.
    pub fn from_path(path: &str) -> Option<Route> {
        let path = path.strip_suffix('/').unwrap_or(path);
        if let Some(id) = path.strip_prefix("/tasks/") {
            return Some(Route::Task(id.parse().ok().filter(|id| *id > 0)));
        }
        match path {
            "/slow-query" => Some(Route::SlowQuery),
            "/row" => Some(Route::Row),
            "/tasks" => Some(Route::Tasks),
            "/healthz" => Some(Route::Healthz),
            "/readyz" => Some(Route::Readyz),
            "/metrics" => Some(Route::Metrics),
            _ => None,
        }
    }

    /// The methods the route answers, as the `Allow` header lists them.
    fn allowed_methods(self) -> &'static str {
        match self {
            Route::Tasks => "POST",
            Route::Task(_) => "GET, DELETE",
            _ => "GET",
        }
    }

    /// The metrics label: the route's canonical path.
    pub fn label(self) -> &'static str {
        match self {
            Route::SlowQuery => "/slow-query/",
            Route::Row => "/row/",
            Route::Tasks => "/tasks/",
            Route::Task(_) => "/tasks/{id}",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
        }
    }

    fn is_probe(self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz | Route::Metrics)
    }
}

/// Handles one request and records its metrics. Never fails: every error
/// becomes a JSON response.
pub async fn handle(
    app: Arc<App>,
    unread_body: UnreadBody,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let started = Instant::now();
    unread_body.set(!request.body().is_end_stream());
    let metrics = &app.metrics;
    metrics.http_requests_in_flight.inc();
    let _in_flight = scopeguard(|| metrics.http_requests_in_flight.dec());

    let method = method_label(request.method());
    let route = Route::from_path(request.uri().path());
    let route_label = route.map_or("unmatched", Route::label);
    // Boxed: hyper keeps room for this future in every connection for the
    // connection's whole life, so it must stay small; the routes' futures
    // (pool checkout, query) are several KB and live only per request.
    let response = match route {
        Some(route) => Box::pin(dispatch(&app, route, request, &unread_body)).await,
        None => Err(ApiError::not_found(request.uri().path())),
    };
    let response = response.unwrap_or_else(|e| {
        if let Some(reason) = e.shed {
            metrics.http_requests_shed.with_label_values(&[reason.label()]).inc();
        }
        if e.status.is_server_error() {
            tracing::warn!(
                route = route_label,
                status = e.status.as_u16(),
                error = %e.message,
                cause = e.cause.as_deref().unwrap_or(""),
                "request failed"
            );
        }
        e.into_response()
    });

    // While draining, every answer closes its connection, so keep-alive
    // clients move to a pod that stays before this one's listener closes
    // (closing an idle connection races with a request being sent on it).
    let mut response = response;
    if app.draining.load(Ordering::Relaxed) {
        response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    let status = response.status();
    let labels = [route_label, method, status.as_str()];
    metrics.http_requests.with_label_values(&labels).inc();
    metrics.http_request_duration.with_label_values(&labels).observe(started.elapsed().as_secs_f64());
    Ok(response)
}

async fn dispatch(
    app: &App,
    route: Route,
    request: Request<Incoming>,
    unread_body: &UnreadBody,
) -> Result<Response<Body>, ApiError> {
    let allowed = route.allowed_methods();
    if !allowed.split(", ").any(|m| m == request.method().as_str()) {
        return Err(ApiError::method_not_allowed(allowed));
    }
    let (parts, body) = request.into_parts();
    let body = read_body(app, &parts.headers, body).await?;
    unread_body.set(false);
    let _permit =
        if route.is_probe() {
            None
        } else {
            Some(app.in_flight.try_acquire().map_err(|_| {
                ApiError::shed(Shed::InFlightLimit, "too many requests in flight; retry shortly")
            })?)
        };
    match route {
        Route::SlowQuery => slow_query(app, parts.uri.query()).await,
        Route::Row => row(app).await,
        Route::Tasks => tasks::enqueue(app, body).await,
        Route::Task(id) if parts.method == Method::DELETE => tasks::cancel(app, id).await,
        Route::Task(id) => tasks::get(app, id).await,
        Route::Healthz => Ok(json(StatusCode::OK, &Status { status: "ok", error: None })),
        Route::Readyz => Ok(readyz(app).await),
        Route::Metrics => metrics(app).await,
    }
}

/// Reads the body within the size and time limits, so an oversized or
/// trickled body is refused instead of buffered. A declared length over the
/// limit is refused before any of the body is read (so `Expect:
/// 100-continue` gets the 413 instead of a 100).
async fn read_body(app: &App, headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body_bytes) {
        return Err(ApiError::payload_too_large(app.max_body_bytes));
    }
    let limited = Limited::new(body, usize::try_from(app.max_body_bytes).unwrap_or(usize::MAX));
    match tokio::time::timeout(app.body_read_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::request_timeout()),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(app.max_body_bytes))
        }
        Ok(Err(e)) => Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    }
}

#[derive(Serialize)]
struct Message {
    message: &'static str,
}

async fn slow_query(app: &App, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let seconds = parse_seconds(query)?;
    let conn = app.db.get().await?;
    conn.query_typed("SELECT pg_sleep($1)", &[(&seconds, Type::FLOAT8)], Duration::from_secs_f64(seconds))
        .await?;
    Ok(json(StatusCode::OK, &Message { message: "Slow query completed" }))
}

/// `seconds` from the query string: a finite number from 0 to 60 (fractions
/// allowed), 5 when absent.
pub fn parse_seconds(query: Option<&str>) -> Result<f64, ApiError> {
    let raw = query.and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "seconds"));
    let Some((_, raw)) = raw else {
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

async fn row(app: &App) -> Result<Response<Body>, ApiError> {
    let id: i32 = rand::rng().random_range(1..=WORLD_ROWS);
    let conn = app.db.get().await?;
    let rows = conn
        .query_typed("SELECT id, randomnumber FROM world WHERE id = $1", &[(&id, Type::INT4)], Duration::ZERO)
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::internal(format!("world has no row {id}; run `tidepool migrate`")))?;
    Ok(json(StatusCode::OK, &World { id: row.get(0), randomnumber: row.get(1) }))
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn readyz(app: &App) -> Response<Body> {
    if app.draining.load(Ordering::Relaxed) {
        return json(StatusCode::SERVICE_UNAVAILABLE, &Status { status: "draining", error: None });
    }
    if app.starting.load(Ordering::Relaxed) {
        return json(StatusCode::SERVICE_UNAVAILABLE, &Status { status: "starting", error: None });
    }
    match app.db.check(app.readiness_timeout).await {
        Ok(health) => json(StatusCode::OK, &Status { status: health.as_str(), error: None }),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Status { status: "unavailable", error: Some(e.to_string()) },
        ),
    }
}

async fn metrics(app: &App) -> Result<Response<Body>, ApiError> {
    let mut body = app
        .metrics
        .render(app.db.status())
        .map_err(|e| ApiError::internal(format!("could not encode metrics: {e}")))?;
    if let Some(pooler) = &app.pooler {
        body.extend_from_slice(pooler.render().await.as_bytes());
    }
    Ok(with_body(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body))
}

/// A bounded label for the request method.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Runs `f` when dropped, also when the request's future is cancelled.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_default_and_range() {
        assert_eq!(parse_seconds(None).ok(), Some(5.0));
        assert_eq!(parse_seconds(Some("other=1")).ok(), Some(5.0));
        assert_eq!(parse_seconds(Some("seconds=0")).ok(), Some(0.0));
        assert_eq!(parse_seconds(Some("seconds=0.25")).ok(), Some(0.25));
        assert_eq!(parse_seconds(Some("seconds=60")).ok(), Some(60.0));
    }

    #[test]
    fn seconds_rejects_what_is_not_a_number_in_range() {
        for bad in ["abc", "-1", "1000", "60.01", "NaN", "inf", "", "1s", "-0.5"] {
            let err = parse_seconds(Some(&format!("seconds={bad}"))).expect_err(bad);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(err.message.contains("from 0 to 60"), "{}", err.message);
        }
    }

    #[test]
    fn routes_accept_an_optional_trailing_slash() {
        assert_eq!(Route::from_path("/slow-query/"), Some(Route::SlowQuery));
        assert_eq!(Route::from_path("/slow-query"), Some(Route::SlowQuery));
        assert_eq!(Route::from_path("/healthz"), Some(Route::Healthz));
        assert_eq!(Route::from_path("/nope"), None);
        assert_eq!(Route::from_path("/tasks/"), Some(Route::Tasks));
        assert_eq!(Route::from_path("/tasks/42"), Some(Route::Task(Some(42))));
        assert_eq!(Route::from_path("/tasks/42/"), Some(Route::Task(Some(42))));
        assert_eq!(Route::from_path("/tasks/x"), Some(Route::Task(None)));
        assert_eq!(Route::from_path("/tasks/-1"), Some(Route::Task(None)));
        assert_eq!(Route::from_path("/"), None);
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::from_bytes(b"BREW").expect("valid token")), "OTHER");
    }
}
