//! What Tidepool wraps around an application's router: the route template
//! of each answer (for its metric label), panics turned into 500s, the
//! trailing-slash twin of a path that matches no route, and the check that
//! the application leaves Tidepool's own paths alone.
//!
//! While a request is routed, its server and the template of the route
//! that took it live in a task-local [`Routing`] scope rather than in the
//! request's and the response's extensions: nothing is allocated for them
//! per request, and the route's guard future needs no box.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use futures_util::future::CatchUnwind;
use futures_util::FutureExt;
use http::{StatusCode, Uri};
use tower::{Service, ServiceExt};

use super::response::ApiError;
use super::Server;

/// Tidepool's own paths, and their trailing-slash twins: no application
/// route may be on one of them.
pub const RESERVED_PATHS: [&str; 6] =
    ["/healthz", "/healthz/", "/readyz", "/readyz/", "/metrics", "/metrics/"];

tokio::task_local! {
    static ROUTING: Routing;
}

/// The request being routed: the server serving it, and the template of
/// the route that took it (set by the route's [`Guarded`]).
struct Routing {
    server: Arc<Server>,
    route: Cell<Option<MatchedPath>>,
}

/// Routes `request` through `server`'s router; the answer and the template
/// of the route that took it (`None` when none did).
pub(super) async fn route(server: &Arc<Server>, request: Request) -> (Response, Option<MatchedPath>) {
    let router = server.router.clone();
    let scope = Routing { server: server.clone(), route: Cell::new(None) };
    ROUTING
        .scope(scope, async move {
            let Ok(response) = router.oneshot(request).await;
            (response, ROUTING.with(|routing| routing.route.take()))
        })
        .await
}

/// The server of the request being routed; `None` outside [`route`] (a
/// router served by something else than Tidepool's server).
pub(super) fn current_server() -> Option<Arc<Server>> {
    ROUTING.try_with(|routing| routing.server.clone()).ok()
}

/// axum's own limit on the body its extractors read, when none is set.
const AXUM_DEFAULT_BODY_LIMIT: u64 = 2 * 1024 * 1024;

/// The router as Tidepool serves it: every route and fallback labelled and
/// guarded against panics; a path no route matches tried once more with
/// its trailing slash added or removed. The server reads the body within
/// `max_body_bytes` before routing, so axum's own limit is lifted when it
/// is lower than that.
pub(super) fn prepare(router: Router, max_body_bytes: u64) -> Router {
    let mut routes = router.layer(tower::layer::layer_fn(|inner| Guarded { inner }));
    if max_body_bytes > AXUM_DEFAULT_BODY_LIMIT {
        routes = routes.layer(DefaultBodyLimit::disable());
    }
    let twin = routes.clone();
    routes.fallback_service(tower::service_fn(move |request: Request| {
        let twin = twin.clone();
        async move { Ok::<_, Infallible>(try_twin(twin, request).await) }
    }))
}

/// A route (or fallback) that labels its answer with the route's template
/// and answers 500 when its handler panics.
#[derive(Clone)]
struct Guarded<S> {
    inner: S,
}

impl<S> Service<Request> for Guarded<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(template) = request.extensions().get::<MatchedPath>() {
            // Outside Tidepool's server there is no scope: nothing to label.
            let _ = ROUTING.try_with(|routing| routing.route.set(Some(template.clone())));
        }
        let inner = &mut self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))) {
            Ok(future) => GuardedFuture::Running { future: AssertUnwindSafe(future).catch_unwind() },
            Err(panic) => GuardedFuture::Panicked { message: panic_message(&*panic).to_owned() },
        }
    }
}

pin_project_lite::pin_project! {
    /// A guarded route's answer: its handler's, or a 500 if that panicked.
    #[project = GuardedProjection]
    enum GuardedFuture<F> {
        Running { #[pin] future: CatchUnwind<AssertUnwindSafe<F>> },
        Panicked { message: String },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for GuardedFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let message = match self.project() {
            GuardedProjection::Running { future } => match ready!(future.poll(cx)) {
                Ok(answer) => return Poll::Ready(answer),
                Err(panic) => panic_message(&*panic).to_owned(),
            },
            GuardedProjection::Panicked { message } => std::mem::take(message),
        };
        if let Some(server) = current_server() {
            server.metrics.http_handler_panics.inc();
        }
        let cause = format!("handler panicked: {message}");
        Poll::Ready(Ok(ApiError::internal("the handler failed").because(cause).into_response()))
    }
}

/// Serves a request that matched no route on its trailing-slash twin, with
/// the application's own fallback (or a 404) if that matches none either.
async fn try_twin(routes: Router, mut request: Request) -> Response {
    if let Some(uri) = slash_twin(request.uri()) {
        *request.uri_mut() = uri;
    }
    match routes.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// `/a` for `/a/` and `/a/` for `/a`, query kept; `None` for `/`.
fn slash_twin(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    if path == "/" {
        return None;
    }
    let twin = match path.strip_suffix('/') {
        Some(stripped) => stripped.to_owned(),
        None => format!("{path}/"),
    };
    let twin = match uri.query() {
        Some(query) => format!("{twin}?{query}"),
        None => twin,
    };
    twin.parse().ok()
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Marks an answer of the probe router below with the template of the
/// route that was found.
#[derive(Clone)]
struct Taken(Option<MatchedPath>);

/// The first of [`RESERVED_PATHS`] that `router` has a route on, of any
/// method (a pattern that merely matches it, such as `/{*rest}`, does not
/// count: Tidepool answers its paths before routing). No handler of the
/// application runs: every route is wrapped to answer at once with its
/// template, and the fallback replaced.
pub(super) async fn reserved_route_taken(router: &Router) -> Option<String> {
    if !router.has_routes() {
        return None;
    }
    let probe = router
        .clone()
        .route_layer(middleware::from_fn(|request: Request, _: Next| async move {
            axum::Extension(Taken(request.extensions().get::<MatchedPath>().cloned()))
        }))
        .fallback(|| async { StatusCode::NOT_FOUND });
    for path in RESERVED_PATHS {
        let request = Request::get(path).body(axum::body::Body::empty()).ok()?;
        let Ok(response) = probe.clone().oneshot(request).await;
        let template = response.extensions().get::<Taken>().and_then(|t| t.0.clone());
        if template.is_some_and(|t| t.as_str() == path) {
            return Some(path.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    #[test]
    fn twins_add_or_remove_the_trailing_slash() {
        let twin = |uri: &str| slash_twin(&uri.parse().expect("valid")).map(|u| u.to_string());
        assert_eq!(twin("/row").as_deref(), Some("/row/"));
        assert_eq!(twin("/row/").as_deref(), Some("/row"));
        assert_eq!(twin("/slow-query?seconds=1").as_deref(), Some("/slow-query/?seconds=1"));
        assert_eq!(twin("/tasks/42/").as_deref(), Some("/tasks/42"));
        assert_eq!(twin("/"), None);
    }

    #[tokio::test]
    async fn a_route_on_a_reserved_path_is_found_without_running_it() {
        async fn panics() -> &'static str {
            panic!("a probe must not run the handler")
        }
        for (path, router) in [
            ("/readyz", Router::new().route("/orders", get(panics)).route("/readyz", get(panics))),
            ("/metrics", Router::new().route("/metrics", post(panics))),
            ("/healthz/", Router::new().route("/healthz/", get(panics))),
        ] {
            assert_eq!(reserved_route_taken(&router).await.as_deref(), Some(path));
        }
        for fine in [
            Router::new().route("/orders", get(panics)).route("/{page}", get(panics)).fallback(panics),
            Router::new().route("/{*rest}", post(panics)),
        ] {
            assert_eq!(reserved_route_taken(&fine).await, None);
        }
        assert_eq!(reserved_route_taken(&Router::new()).await, None);
    }

    #[test]
    fn the_reserved_paths_are_the_pod_contracts_and_their_twins() {
        for path in
            [tidepool_contract::HEALTH_PATH, tidepool_contract::READY_PATH, tidepool_contract::METRICS_PATH]
        {
            assert!(RESERVED_PATHS.contains(&path), "{path}");
            assert!(RESERVED_PATHS.contains(&format!("{path}/").as_str()), "{path}/");
        }
        assert_eq!(RESERVED_PATHS.len(), 6);
    }
}
