//! One request through Tidepool's server, in the order the gates apply:
//! Tidepool's own paths first (`/healthz`, `/readyz`, `/metrics`, with or
//! without a trailing slash, GET only); then, for the application, the
//! body within its size and time limits (413, 408), the in-flight limit
//! (503), and the router. Whatever answers, the answer is counted and timed
//! by route template, an error answer gets a JSON body, and while the
//! server drains it closes its connection.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::MatchedPath;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};
use serde::Serialize;
use tidepool_contract::{HEALTH_PATH, METRICS_PATH, READY_PATH};

use super::linger::UnreadBody;
use super::response::{json, with_body, ApiError, Body, Shed};
use super::routing;
use super::Server;

/// Largest plain-text error body that is rewritten as JSON; a larger one
/// is passed on as it is.
const MAX_REWRITTEN_ERROR_BYTES: usize = 16 * 1024;

/// The metric label of an answer.
enum Label {
    Fixed(&'static str),
    Route(MatchedPath),
}

impl Label {
    fn as_str(&self) -> &str {
        match self {
            Label::Fixed(label) => label,
            Label::Route(template) => template.as_str(),
        }
    }
}

const UNMATCHED: Label = Label::Fixed("unmatched");

/// Tidepool's own paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Healthz,
    Readyz,
    Metrics,
}

impl Probe {
    fn from_path(path: &str) -> Option<Probe> {
        match path.strip_suffix('/').unwrap_or(path) {
            HEALTH_PATH => Some(Probe::Healthz),
            READY_PATH => Some(Probe::Readyz),
            METRICS_PATH => Some(Probe::Metrics),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Probe::Healthz => HEALTH_PATH,
            Probe::Readyz => READY_PATH,
            Probe::Metrics => METRICS_PATH,
        }
    }
}

/// Handles one request and records its metrics. Never fails: every error
/// becomes a JSON response.
pub(super) async fn handle(
    server: Arc<Server>,
    unread_body: UnreadBody,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    unread_body.set(!request.body().is_end_stream());
    let metrics = &server.metrics;
    metrics.http_requests_in_flight.inc();
    let _in_flight = scopeguard(|| metrics.http_requests_in_flight.dec());

    let method = method_label(request.method());
    // Boxed: hyper keeps room for this future in every connection for the
    // connection's whole life, so it must stay small; the routes' futures
    // (pool checkout, query) are several KB and live only per request.
    let (label, mut response) = match Probe::from_path(request.uri().path()) {
        Some(probe) => (Label::Fixed(probe.label()), Box::pin(answer_probe(&server, probe, request)).await),
        None => Box::pin(answer_application(&server, request, &unread_body)).await,
    };
    if let Some(reason) = response.extensions().get::<Shed>() {
        metrics.http_requests_shed.with_label_values(&[reason.label()]).inc();
    }
    // While draining, every answer closes its connection, so keep-alive
    // clients move to a pod that stays before this one's listener closes
    // (closing an idle connection races with a request being sent on it).
    if server.draining.load(Ordering::Relaxed) {
        response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = response.status();
    let labels = [label.as_str(), method, status.as_str()];
    metrics.http_requests.with_label_values(&labels).inc();
    metrics.http_request_duration.with_label_values(&labels).observe(started.elapsed().as_secs_f64());
    Ok(response)
}

async fn answer_application(
    server: &Arc<Server>,
    request: Request<Incoming>,
    unread_body: &UnreadBody,
) -> (Label, Response<Body>) {
    let (parts, body) = request.into_parts();
    // Most requests (a GET) have no body: nothing to read or to time.
    let body = if body.is_end_stream() {
        Body::empty()
    } else {
        match read_body(server, &parts.headers, body).await {
            Ok(body) => Body::from(body),
            Err(e) => return (UNMATCHED, e.into_response()),
        }
    };
    unread_body.set(false);
    let Ok(_permit) = server.in_flight.try_acquire() else {
        let shed = ApiError::shed(Shed::InFlightLimit, "too many requests in flight; retry shortly");
        return (UNMATCHED, shed.into_response());
    };
    let uri = parts.uri.clone();
    let (response, route) = routing::route(server, Request::from_parts(parts, body)).await;
    let label = route.map_or(UNMATCHED, Label::Route);
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return (label, response);
    }
    (label, as_json_error(response, uri.path()).await)
}

/// Reads the body within the size and time limits, so an oversized or
/// trickled body is refused instead of buffered. A declared length over the
/// limit is refused before any of the body is read (so `Expect:
/// 100-continue` gets the 413 instead of a 100).
async fn read_body(server: &Server, headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    let limit = server.settings.max_body_bytes;
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(server.settings.body_read_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::request_timeout()),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::payload_too_large(limit)),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    }
}

/// An error answer with an empty or plain-text body (axum's 404 and 405,
/// its extractors' rejections) as Tidepool's JSON error, its text the
/// message; any other answer as it is.
async fn as_json_error(response: Response<Body>, path: &str) -> Response<Body> {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let plain = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    let empty = response.body().size_hint().exact() == Some(0);
    if !plain && !empty {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REWRITTEN_ERROR_BYTES).await {
        Ok(text) => String::from_utf8_lossy(&text).trim().to_owned(),
        Err(_) => String::new(),
    };
    let allow = parts.headers.get(ALLOW).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let error = match (status, allow) {
        (StatusCode::METHOD_NOT_ALLOWED, Some(allow)) => ApiError::method_not_allowed(&allow),
        (StatusCode::NOT_FOUND, _) if text.is_empty() => ApiError::no_route(path),
        (_, _) if text.is_empty() => ApiError::with_status(
            status,
            status.canonical_reason().unwrap_or("request failed").to_lowercase(),
        ),
        (_, _) => ApiError::with_status(status, text),
    };
    let mut rewritten = error.into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            rewritten.headers_mut().entry(name).or_insert_with(|| value.clone());
        }
    }
    *rewritten.extensions_mut() = parts.extensions;
    rewritten
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn answer_probe(server: &Server, probe: Probe, request: Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return ApiError::method_not_allowed("GET").into_response();
    }
    match probe {
        Probe::Healthz => json(StatusCode::OK, &Status { status: "ok", error: None }),
        Probe::Readyz => readyz(server).await,
        Probe::Metrics => metrics(server).await,
    }
}

async fn readyz(server: &Server) -> Response<Body> {
    if server.draining.load(Ordering::Relaxed) {
        return json(StatusCode::SERVICE_UNAVAILABLE, &Status { status: "draining", error: None });
    }
    if server.starting.load(Ordering::Relaxed) {
        return json(StatusCode::SERVICE_UNAVAILABLE, &Status { status: "starting", error: None });
    }
    match server.db.check(server.settings.database.readiness_timeout).await {
        Ok(health) => json(StatusCode::OK, &Status { status: health.as_str(), error: None }),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &Status { status: "unavailable", error: Some(e.to_string()) },
        ),
    }
}

async fn metrics(server: &Server) -> Response<Body> {
    let mut body = match server.metrics.render(server.db.status()) {
        Ok(body) => body,
        Err(e) => return ApiError::internal(format!("could not encode metrics: {e}")).into_response(),
    };
    if let Some(pooler) = &server.pooler {
        body.extend_from_slice(pooler.render().await.as_bytes());
    }
    with_body(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
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
    fn probes_accept_an_optional_trailing_slash() {
        assert_eq!(Probe::from_path("/healthz"), Some(Probe::Healthz));
        assert_eq!(Probe::from_path("/healthz/"), Some(Probe::Healthz));
        assert_eq!(Probe::from_path("/readyz/"), Some(Probe::Readyz));
        assert_eq!(Probe::from_path("/metrics"), Some(Probe::Metrics));
        assert_eq!(Probe::from_path("/metrics/x"), None);
        assert_eq!(Probe::from_path("/"), None);
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::from_bytes(b"BREW").expect("valid token")), "OTHER");
    }

    #[tokio::test]
    async fn axums_plain_errors_become_json() {
        let read = |response: Response<Body>| async move {
            let status = response.status();
            let allow = response.headers().get(ALLOW).cloned();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap_or_default();
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            (status, value["error"].as_str().unwrap_or_default().to_owned(), allow)
        };
        let empty = |status| {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = status;
            response
        };
        let (status, error, _) = read(as_json_error(empty(StatusCode::NOT_FOUND), "/nope").await).await;
        assert_eq!((status, error.as_str()), (StatusCode::NOT_FOUND, "no route for /nope"));

        let mut not_allowed = empty(StatusCode::METHOD_NOT_ALLOWED);
        not_allowed.headers_mut().insert(ALLOW, HeaderValue::from_static("GET,HEAD"));
        let (status, error, allow) = read(as_json_error(not_allowed, "/row/").await).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(error, "method not allowed; use GET,HEAD");
        assert_eq!(allow, Some(HeaderValue::from_static("GET,HEAD")));

        let rejection =
            with_body(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", "Invalid URL: bad id");
        let (status, error, _) = read(as_json_error(rejection, "/x").await).await;
        assert_eq!((status, error.as_str()), (StatusCode::BAD_REQUEST, "Invalid URL: bad id"));

        let own = json(StatusCode::CONFLICT, &serde_json::json!({"error": "taken", "id": 4}));
        let response = as_json_error(own, "/x").await;
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap_or_default();
        assert_eq!(&body[..], br#"{"error":"taken","id":4}"#, "an application's JSON is left alone");
    }
}
