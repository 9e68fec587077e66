//! An application of the tests' own on Tidepool's public API, served in
//! this process through a real PgBouncer in transaction mode: its routes
//! (a path parameter, a panicking handler, a query past its timeout, a
//! transaction that enqueues), its typed task, its migration track and its
//! state; and what Tidepool refuses at start-up.

mod support;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use support::{get, metric, request, wait_for, PgBouncer, TestDb};
use tidepool::axum::extract::{Path, Query, State};
use tidepool::axum::routing::{get as get_route, post};
use tidepool::axum::{Json, Router};
use tidepool::db::{Conn, Type};
use tidepool::migrate::Migration;
use tidepool::queue::{self, EnqueueOptions};
use tidepool::settings::{DatabaseSettings, WebSettings, WorkerSettings};
use tidepool::task::{Task, TaskContext, TaskError};
use tidepool::web::{self, ApiError};
use tidepool::{Application, StartError};
use tokio::sync::oneshot;

/// What the handlers and the task share.
#[derive(Clone)]
struct AppState {
    greeting: &'static str,
}

/// The application's task: typed arguments, queue and attempts of its own.
#[derive(Serialize, Deserialize)]
struct SendReceipt {
    order_id: i64,
}

impl Task for SendReceipt {
    const NAME: &'static str = "send_receipt";
    const QUEUE: &'static str = "receipts";
    const MAX_ATTEMPTS: i32 = 3;
    type State = AppState;
    type Output = String;

    async fn run(self, ctx: TaskContext<AppState>) -> Result<String, TaskError> {
        Ok(format!("{} {}", ctx.state.greeting, self.order_id))
    }
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "orders",
    sql: "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, total bigint NOT NULL)",
}];

#[derive(Serialize)]
struct Item {
    id: i64,
    greeting: &'static str,
}

async fn item(Path(id): Path<i64>, State(state): State<AppState>) -> Json<Item> {
    Json(Item { id, greeting: state.greeting })
}

async fn panics() -> &'static str {
    panic!("a handler bug")
}

/// Sleeps in the database far past the query timeout (1 s in these tests).
async fn slow(conn: Conn) -> Result<&'static str, ApiError> {
    conn.query("SELECT pg_sleep(30)", &[]).await?;
    Ok("never")
}

#[derive(Deserialize)]
struct OrderQuery {
    #[serde(default)]
    roll_back: bool,
}

#[derive(Deserialize)]
struct NewOrder {
    total: i64,
}

#[derive(Serialize)]
struct Ordered {
    order_id: i64,
    job_id: i64,
    committed: bool,
}

/// Writes an order and enqueues its receipt in one transaction, then
/// commits, or rolls back when asked.
async fn order(
    Query(query): Query<OrderQuery>,
    mut conn: Conn,
    Json(order): Json<NewOrder>,
) -> Result<Json<Ordered>, ApiError> {
    let tx = conn.transaction().await?;
    let row = tx
        .query_one("INSERT INTO orders (total) VALUES ($1) RETURNING id", &[(&order.total, Type::INT8)])
        .await?;
    let order_id: i64 = row.get(0);
    let job = queue::enqueue(&tx, &SendReceipt { order_id }, EnqueueOptions::default()).await?;
    if query.roll_back {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(Json(Ordered { order_id, job_id: job.id, committed: !query.roll_back }))
}

fn application() -> Application<AppState> {
    let routes = Router::new()
        .route("/items/{id}", get_route(item))
        .route("/panic", get_route(panics))
        .route("/slow", get_route(slow))
        .route("/orders", post(order))
        .route("/paths/{*rest}", get_route(|| async { "ok" }));
    Application::with_state("testapp", AppState { greeting: "thanks for order" })
        .routes(routes)
        .task::<SendReceipt>()
        .migrations(MIGRATIONS)
}

/// The application served in this process on a port of its own, with its
/// database, PgBouncer and a superuser connection to look at the server.
struct Running {
    addr: std::net::SocketAddr,
    db: TestDb,
    admin: tokio_postgres::Client,
    bouncer: PgBouncer,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<web::Shutdown>,
}

impl Running {
    async fn start() -> Result<Running> {
        let db = TestDb::create().await?;
        let app = application();
        let mut client = support::connect(&db.direct_url()).await?;
        let report = app.migrate(&mut client, Duration::from_secs(10)).await?;
        ensure!(tidepool::migrate::list(&report.applied) == "[testapp/1]", "{report:?}");
        let bouncer = PgBouncer::start(&db, 4).await?;
        let settings = WebSettings {
            database: DatabaseSettings {
                pool_size: Some(4),
                query_timeout: Duration::from_secs(1),
                ..DatabaseSettings::new(bouncer.url())
            },
            drain_delay: Duration::ZERO,
            ..WebSettings::default()
        };
        let server = app.web_server(settings).await?;
        let listener = tidepool::bind("127.0.0.1:0".parse()?).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(web::warm_up(server.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(web::serve(listener, server, async move {
            let _ = stopped.await;
        }));
        let admin = db.admin().await?;
        let running = Running { addr, db, admin, bouncer, stop: Some(stop), served };
        support::wait_for_status(&running.url("/readyz"), 200, Duration::from_secs(20)).await?;
        Ok(running)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn metrics(&self) -> Result<String> {
        Ok(get(&self.url("/metrics")).await?.body)
    }

    async fn stop(mut self) -> Result<web::Shutdown> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), &mut self.served).await.context("shutdown")??)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_parameters_and_state_are_served_and_labelled_by_template() -> Result<()> {
    let app = Running::start().await?;
    let item = get(&app.url("/items/42")).await?;
    assert_eq!(item.status, 200, "{}", item.body);
    assert_eq!(item.json()?, serde_json::json!({"id": 42, "greeting": "thanks for order"}));
    assert_eq!(get(&app.url("/items/42/")).await?.status, 200, "a trailing slash matches too");

    let bad = get(&app.url("/items/x")).await?;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()?["error"].as_str().unwrap_or_default().contains("x"),
        "axum's rejection as JSON: {}",
        bad.body
    );
    let missing = get(&app.url("/nowhere")).await?;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()?["error"], "no route for /nowhere");
    let wrong_method = request(http::Method::DELETE, &app.url("/items/1"), "").await?;
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.json()?["error"].as_str().unwrap_or_default().starts_with("method not allowed"));

    let metrics = app.metrics().await?;
    let series = |route: &str, status: &str| {
        format!(r#"tidepool_http_requests_total{{method="GET",route="{route}",status="{status}"}}"#)
    };
    assert_eq!(metric(&metrics, &series("/items/{id}", "200")), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, &series("/items/{id}", "400")), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, &series("unmatched", "404")), Some(1.0), "{metrics}");
    assert!(!metrics.contains("/items/42"), "a raw path never becomes a label");
    assert_eq!(app.stop().await?, web::Shutdown::Clean);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_distinct_paths_on_one_route_are_one_series() -> Result<()> {
    let app = Running::start().await?;
    let client: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    for i in 0..10_000 {
        let uri: http::Uri = app.url(&format!("/paths/{i}/of/{}", i * 7)).parse()?;
        let response = tokio::time::timeout(Duration::from_secs(30), client.get(uri)).await??;
        ensure!(response.status() == 200, "request {i}: {}", response.status());
        response.into_body().collect().await?;
    }
    let metrics = app.metrics().await?;
    let route_series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tidepool_http_requests_total{") && l.contains("/paths/"))
        .collect();
    assert_eq!(
        route_series,
        [r#"tidepool_http_requests_total{method="GET",route="/paths/{*rest}",status="200"} 10000"#]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_is_counted_and_the_server_goes_on() -> Result<()> {
    let app = Running::start().await?;
    let panicked = get(&app.url("/panic")).await?;
    assert_eq!(panicked.status, 500);
    assert_eq!(panicked.json()?["error"], "the handler failed");
    assert_eq!(get(&app.url("/items/1")).await?.status, 200, "the next request is served");
    let metrics = app.metrics().await?;
    assert_eq!(metric(&metrics, "tidepool_http_handler_panics_total"), Some(1.0), "{metrics}");
    assert_eq!(
        metric(&metrics, r#"tidepool_http_requests_total{method="GET",route="/panic",status="500"}"#),
        Some(1.0)
    );
    Ok(())
}

/// Past the query timeout the request answers 504, and the statement is
/// cancelled on the server: PgBouncer may keep the server connection, so
/// what is checked is what the server runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_timeout_answers_504_and_stops_running_on_the_server() -> Result<()> {
    let app = Running::start().await?;
    let late = get(&app.url("/slow")).await?;
    assert_eq!(late.status, 504, "{}", late.body);
    assert!(late.json()?["error"].as_str().unwrap_or_default().contains("did not answer within 1s"));
    wait_for("no backend to run the abandoned pg_sleep", Duration::from_secs(10), || async {
        app.db.active_sleeps(&app.admin).await.ok().filter(|n| *n == 0)
    })
    .await?;
    assert_eq!(get(&app.url("/items/1")).await?.status, 200);
    Ok(())
}

/// A job enqueued in a transaction exists only if the transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_leaves_no_job_and_a_committed_one_its_typed_job() -> Result<()> {
    let app = Running::start().await?;
    let rolled_back =
        request(http::Method::POST, &app.url("/orders?roll_back=true"), r#"{"total": 5}"#).await?;
    assert_eq!(rolled_back.status, 200, "{}", rolled_back.body);
    let gone = rolled_back.json()?["job_id"].as_i64().context("a job id")?;
    let committed = request(http::Method::POST, &app.url("/orders"), r#"{"total": 7}"#).await?;
    assert_eq!(committed.status, 200, "{}", committed.body);
    let (order, job) = (committed.json()?["order_id"].as_i64(), committed.json()?["job_id"].as_i64());

    let jobs = app.admin.query("SELECT id, task, queue, args, max_attempts FROM tidepool_jobs", &[]).await?;
    assert_eq!(jobs.len(), 1, "only the committed order's job");
    let row = &jobs[0];
    assert_eq!(Some(row.get::<_, i64>(0)), job);
    assert_ne!(row.get::<_, i64>(0), gone);
    assert_eq!((row.get::<_, &str>(1), row.get::<_, &str>(2)), ("send_receipt", "receipts"));
    assert_eq!(row.get::<_, serde_json::Value>(3), serde_json::json!({ "order_id": order }));
    assert_eq!(row.get::<_, i32>(4), 3);
    let orders: i64 = app.admin.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
    assert_eq!(orders, 1);

    // The worker runs the typed task with the application's state.
    let settings = WorkerSettings {
        listen: "127.0.0.1:0".parse()?,
        database: DatabaseSettings::new(app.bouncer.url()),
        queues: vec!["receipts".into()],
        concurrency: 2,
        ..WorkerSettings::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(async move {
        application()
            .work(settings, async move {
                let _ = stopped.await;
            })
            .await
    });
    let job = job.context("a job id")?;
    let view = wait_for("the receipt job to succeed", Duration::from_secs(20), || async {
        queue::lookup(&app.admin, job).await.ok().flatten().filter(|v| v.state == queue::JobState::Succeeded)
    })
    .await?;
    assert_eq!(
        view.result,
        Some(serde_json::json!(format!("thanks for order {}", order.unwrap_or_default())))
    );
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(30), worker).await???;
    assert_eq!(report.handed_back, 0);

    let bad = request(http::Method::POST, &app.url("/orders"), r#"{"total": "lots"}"#).await?;
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert!(
        bad.json()?["error"].as_str().is_some(),
        "axum's JSON rejection as Tidepool's JSON: {}",
        bad.body
    );
    Ok(())
}

/// An application route on one of Tidepool's paths is refused before
/// anything is served, with an error that names it.
#[tokio::test]
async fn an_application_route_on_a_reserved_path_is_refused_at_start_up() -> Result<()> {
    let settings = WebSettings {
        database: DatabaseSettings::new("postgres://u@127.0.0.1:1/db"),
        ..WebSettings::default()
    };
    for path in ["/readyz", "/metrics", "/healthz/"] {
        let app = Application::new("clash").routes(Router::new().route(path, get_route(|| async { "mine" })));
        let err = match app.web_server(settings.clone()).await {
            Err(err) => err,
            Ok(_) => anyhow::bail!("a route on {path} was accepted"),
        };
        assert!(matches!(&err, StartError::ReservedRoute(p) if p == path), "{err}");
        assert!(err.to_string().contains(&format!("route on {path}")), "{err}");
    }
    let fine =
        Application::new("fine").routes(Router::new().route("/{page}", get_route(|| async { "page" })));
    assert!(fine.web_server(settings).await.is_ok(), "a pattern that merely matches a probe path is fine");
    Ok(())
}

/// Settings built in code are checked exactly as the command line's.
#[tokio::test]
async fn invalid_settings_built_in_code_are_refused() -> Result<()> {
    let app = application();
    let settings = WebSettings {
        database: DatabaseSettings {
            pool_size: Some(0),
            ..DatabaseSettings::new("postgres://u@127.0.0.1:1/db")
        },
        ..WebSettings::default()
    };
    let err = app.web_server(settings).await.err().context("a pool of 0 was accepted")?;
    assert_eq!(err.to_string(), "invalid settings: --db-pool-size must be from 1 to 10000, got 0");
    Ok(())
}
