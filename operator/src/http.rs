//! The operator's HTTP endpoints: `/metrics`, `/healthz` (the process
//! serves) and `/readyz` (a follower waiting for the Lease is ready; a
//! leader once its controller has its first view of the Tidepools). Bounded: a fixed number of connections at once and a header
//! timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tidepool_contract::{HEALTH_PATH, METRICS_PATH, READY_PATH};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

const CONNECTIONS: usize = 64;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Binds `addr`; the error names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Serves until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let endpoints = endpoints.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| handle(endpoints.clone(), request)),
        );
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
}
