//! The operator's HTTP endpoints: `/metrics`, `/healthz` (the process
//! serves) and `/readyz` (a follower waiting for the Lease is ready; a
//! leader once its controller has its first view of the Tidepools), on
//! the pod contract's bounded probe server ([`tidepool_contract::server`]).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
pub use tidepool_contract::server::bind;
use tidepool_contract::server::{self, Limits};
use tidepool_contract::{HEALTH_PATH, METRICS_PATH, READY_PATH};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

const LIMITS: Limits = Limits { connections: 64, header_read_timeout: Duration::from_secs(10) };

/// What the endpoints report.
pub struct Endpoints {
    pub metrics: Metrics,
    /// Set once the controller's first list of Tidepools has arrived.
    pub ready: AtomicBool,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

async fn handle(
    endpoints: Arc<Endpoints>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (request.method() == http::Method::GET, request.uri().path()) {
        (false, _) => text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (true, HEALTH_PATH) => text(StatusCode::OK, "ok\n"),
        (true, READY_PATH) if endpoints.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
        (true, READY_PATH) => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        (true, METRICS_PATH) => match endpoints.metrics.render() {
            Ok(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")),
        },
        (true, _) => text(StatusCode::NOT_FOUND, "/metrics, /healthz or /readyz\n"),
    })
}

/// Serves until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>) {
    let handler = move |request| handle(endpoints.clone(), request);
    server::serve(listener, LIMITS, handler, std::future::pending()).await;
}
