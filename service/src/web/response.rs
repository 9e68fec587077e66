//! JSON responses and the error type every route returns.
//!
//! Every error leaves as `{"error": "<message>"}` with the right status, and
//! the shedding ones (503) carry `Retry-After`. Messages say what was wrong
//! and what is accepted; they never carry a secret or an internal detail a
//! client cannot act on (those go to the log).

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::db::DbError;

pub type Body = Full<Bytes>;

/// A response with `value` as its JSON body.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(status, "application/json", body),
        Err(e) => ApiError::internal(format!("could not encode the response: {e}")).into_response(),
    }
}

pub fn with_body(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Why a request was shed, for `tidepool_http_requests_shed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    InFlightLimit,
    DbPoolWait,
}

impl Shed {
    pub const ALL: [Shed; 2] = [Shed::InFlightLimit, Shed::DbPoolWait];

    pub fn label(self) -> &'static str {
        match self {
            Shed::InFlightLimit => "in_flight_limit",
            Shed::DbPoolWait => "db_pool_wait",
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub shed: Option<Shed>,
    /// What went wrong inside, for the log only: never sent to the client.
    pub cause: Option<String>,
    allow: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), shed: None, cause: None, allow: None }
    }

    pub fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no route for {path}"))
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; use {allow}"))
        }
    }

    pub fn payload_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn request_timeout() -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request body was not received in time")
    }

    pub fn shed(reason: Shed, message: impl Into<String>) -> Self {
        Self { shed: Some(reason), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message) }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn into_response(self) -> Response<Body> {
        let mut response = json(self.status, &ErrorBody { error: &self.message });
        let headers = response.headers_mut();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::PoolExhausted { .. } => ApiError::shed(Shed::DbPoolWait, e.to_string()),
            DbError::Unavailable { .. } => ApiError::unavailable(e.to_string()),
            DbError::QueryTimeout { .. } => ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
            DbError::Query(_) | DbError::Config(_) => ApiError {
                cause: Some(crate::error_chain(&e)),
                ..ApiError::internal("database query failed")
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shed_errors_carry_retry_after() {
        let response =
            ApiError::from(DbError::PoolExhausted { waited: Duration::from_secs(2) }).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
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
}
