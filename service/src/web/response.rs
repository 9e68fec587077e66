//! JSON responses and [`ApiError`], the error every route returns.
//!
//! Every error leaves as `{"error": "<message>"}` with the right status, and
//! the shedding ones (503) carry `Retry-After`. Messages say what was wrong
//! and what is accepted; they never carry a secret or an internal detail a
//! client cannot act on (those go to the log). An application's handlers
//! return `Result<_, ApiError>`: a [`DbError`] or an
//! [`crate::queue::EnqueueError`] converts with `?`.

use axum::response::IntoResponse;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::db::DbError;
use crate::queue::{EnqueueError, InvalidJob};

/// The body of every response: axum's.
pub type Body = axum::body::Body;

/// A response with `value` as its JSON body.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(status, "application/json", body),
        Err(e) => ApiError::internal(format!("could not encode the response: {e}")).into_response(),
    }
}

/// A response with `body` of `content_type`.
pub fn with_body(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Body::from(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Why a request was shed, for `tidepool_http_requests_shed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// `--max-in-flight` requests were being handled.
    InFlightLimit,
    /// No database connection became free within `--db-pool-wait`.
    DbPoolWait,
}

impl Shed {
    /// Every reason, for the counters' first values.
    pub const ALL: [Shed; 2] = [Shed::InFlightLimit, Shed::DbPoolWait];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Shed::InFlightLimit => "in_flight_limit",
            Shed::DbPoolWait => "db_pool_wait",
        }
    }
}

/// An error answer: a status and a message for the client, and what went
/// wrong inside for the log only.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// What the client reads.
    pub message: String,
    /// Why it was shed, if it was (counted by the server).
    pub shed: Option<Shed>,
    /// What went wrong inside, for the log only: never sent to the client.
    pub cause: Option<String>,
    allow: Option<HeaderValue>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl ApiError {
    /// An error with any status.
    pub fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), shed: None, cause: None, allow: None }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::BAD_REQUEST, message)
    }

    /// 404 with a message of the application's.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::NOT_FOUND, message)
    }

    /// 404 for a path no route serves.
    pub fn no_route(path: &str) -> Self {
        Self::not_found(format!("no route for {path}"))
    }

    /// 409: the request conflicts with the state of a resource.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::CONFLICT, message)
    }

    /// 422: well-formed, but not acceptable.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// 405 with the `Allow` header (e.g. `GET, DELETE`).
    pub fn method_not_allowed(allow: &str) -> Self {
        Self {
            allow: HeaderValue::from_str(allow).ok(),
            ..Self::with_status(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; use {allow}"))
        }
    }

    /// 413 for a body over `limit` bytes.
    pub fn payload_too_large(limit: u64) -> Self {
        Self::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 408 for a body not received in time.
    pub fn request_timeout() -> Self {
        Self::with_status(StatusCode::REQUEST_TIMEOUT, "request body was not received in time")
    }

    /// 503 with `Retry-After`, counted as shed for `reason`.
    pub fn shed(reason: Shed, message: impl Into<String>) -> Self {
        Self { shed: Some(reason), ..Self::with_status(StatusCode::SERVICE_UNAVAILABLE, message) }
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// 500; the message is for the client, so keep details for [`ApiError::cause`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The same error, with what went wrong inside kept for the log.
    pub fn because(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// The JSON response; a 5xx is logged with its cause.
    pub fn into_response(self) -> Response<Body> {
        if self.status.is_server_error() {
            tracing::warn!(
                status = self.status.as_u16(),
                error = %self.message,
                cause = self.cause.as_deref().unwrap_or(""),
                "request failed"
            );
        }
        let mut response = json(self.status, &ErrorBody { error: &self.message });
        let headers = response.headers_mut();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, allow);
        }
        if let Some(reason) = self.shed {
            response.extensions_mut().insert(reason);
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        ApiError::into_response(self)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::PoolExhausted { .. } => ApiError::shed(Shed::DbPoolWait, e.to_string()),
            DbError::Unavailable { .. } => ApiError::unavailable(e.to_string()),
            DbError::QueryTimeout { .. } => ApiError::with_status(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
            DbError::Query(_) | DbError::NoRow | DbError::Config(_) => {
                ApiError::internal("database query failed").because(crate::error_chain(&e))
            }
        }
    }
}

impl From<InvalidJob> for ApiError {
    fn from(e: InvalidJob) -> Self {
        let status = match e {
            InvalidJob::UnknownTask(..) | InvalidJob::InvalidArgs { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            InvalidJob::ArgsTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::with_status(status, e.to_string())
    }
}

impl From<EnqueueError> for ApiError {
    fn from(e: EnqueueError) -> Self {
        match e {
            EnqueueError::Invalid(invalid) => invalid.into(),
            EnqueueError::Workflow(_) => {
                ApiError::with_status(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            EnqueueError::BatchTooLarge(_) => {
                ApiError::with_status(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            EnqueueError::Database(db) => db.into(),
            EnqueueError::UniqueKeyContended(_) => ApiError::unavailable(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shed_errors_carry_retry_after_and_their_reason() {
        let response =
            ApiError::from(DbError::PoolExhausted { waited: Duration::from_secs(2) }).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(response.extensions().get::<Shed>(), Some(&Shed::DbPoolWait));
    }

    #[test]
    fn method_not_allowed_names_the_allowed_methods() {
        let response = ApiError::method_not_allowed("GET").into_response();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET");
    }

    #[test]
    fn internal_details_go_to_the_log_not_the_client() {
        let e = ApiError::from(DbError::Config("pool misconfigured: detail".into()));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "database query failed");
        assert!(e.cause.as_deref().unwrap_or_default().contains("detail"));
    }

    #[test]
    fn query_timeouts_are_gateway_timeouts() {
        let e = ApiError::from(DbError::QueryTimeout { after: Duration::from_secs(1) });
        assert_eq!(e.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(e.shed.is_none());
    }

    #[test]
    fn refused_jobs_get_their_status() {
        let unknown = ApiError::from(InvalidJob::UnknownTask("x".into(), "a, b".into()));
        assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
        let large = ApiError::from(EnqueueError::Invalid(InvalidJob::ArgsTooLarge { size: 1 }));
        assert_eq!(large.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ApiError::from(InvalidJob::UniqueKey).status, StatusCode::BAD_REQUEST);
    }
}
