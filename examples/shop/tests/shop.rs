//! The shop on the local stack (`scripts/stack.sh`: a real PostgreSQL,
//! PgBouncer in transaction mode, `tidepool-shop web` and `worker`), run
//! with the shop's binary exactly as the stack runs the default one.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tidepool::db::{Database, PoolSettings, Type};
use tidepool::metrics::WorkerMetrics;
use tidepool::serde_json::{self, json, Value};
use tidepool::settings::{DatabaseSettings, WorkerSettings};
use tidepool::testing::{self, Drained, PerformError};
use tidepool::tokio;
use tidepool::tokio::io::{AsyncReadExt, AsyncWriteExt};
use tidepool_shop::orders::{self, Item, NewOrder};
use tidepool_shop::receipts::{Receipt, ResendUnsent, SendReceipt};
use tidepool_testenv::stack::LocalStack;

/// The body limit the shop's web runs with here.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// One HTTP/1.1 request to the shop's web on `stack`; its status and JSON body.
async fn request(stack: &LocalStack, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Value)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", stack.web_port())).await?;
    let body = body.unwrap_or_default();
    let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
    stream.write_all(head.as_bytes()).await?;
    // An oversized body may be refused before it is all read.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of the response head")?;
    let status = head.split(' ').nth(1).context("no status")?.parse()?;
    let value = serde_json::from_str(body).with_context(|| format!("not JSON: {body:?}"))?;
    Ok((status, value))
}

fn order(customer: &str, items: &[(&str, i32, i64)]) -> NewOrder {
    NewOrder {
        customer: customer.to_owned(),
        items: items
            .iter()
            .map(|(sku, quantity, price_cents)| Item {
                sku: (*sku).to_owned(),
                quantity: *quantity,
                price_cents: *price_cents,
            })
            .collect(),
    }
}

fn error_of(value: &Value) -> &str {
    value["error"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_on_the_local_stack() -> Result<()> {
    let stack = LocalStack::new("shop", env!("CARGO_BIN_EXE_tidepool-shop"))?
        .with("TIDEPOOL_MAX_BODY_BYTES", MAX_BODY_BYTES);
    stack.up(&[])?;

    // An order and its receipt, end to end through the web and the worker.
    let body = json!({"customer": "ada@example.com", "items": [
        {"sku": "tea", "quantity": 2, "price_cents": 450},
        {"sku": "cup", "quantity": 1, "price_cents": 1200}
    ]});
    let (status, created) = request(&stack, "POST", "/orders", Some(body.to_string().as_bytes())).await?;
    ensure!(status == 201, "POST /orders: {status} {created}");
    assert_eq!(created["total_cents"], 2100);
    let id = created["id"].as_i64().context("an id")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let (status, shown) = request(&stack, "GET", &format!("/orders/{id}"), None).await?;
        ensure!(status == 200, "GET /orders/{id}: {status} {shown}");
        if shown["receipt"]["state"] == "sent" {
            break shown;
        }
        ensure!(Instant::now() < deadline, "no receipt within 60 s: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shown["receipt"]["number"], format!("R-{id:08}"));
    assert_eq!(shown["customer"], "ada@example.com");

    // Bad input: what is wrong, with its status, as JSON.
    for (body, want, says) in [
        (&b"{\"customer\": "[..], 400, "parse"),
        (&br#"{"customer": 5, "items": []}"#[..], 422, "customer"),
        (&br#"{"customer": "ada@example.com", "items": []}"#[..], 422, "1 to 100 items"),
        (&br#"{"customer": "ada@example.com", "items": [{"sku": "tea", "quantity": 0, "price_cents": 1}]}"#[..], 422, "items[0].quantity"),
        (&br#"{"customer": "ada@example.com", "items": [], "coupon": "x"}"#[..], 422, "coupon"),
    ] {
        let (status, answer) = request(&stack, "POST", "/orders", Some(body)).await?;
        assert_eq!(status, want, "{} -> {answer}", String::from_utf8_lossy(body));
        assert!(error_of(&answer).contains(says), "{} -> {answer}", String::from_utf8_lossy(body));
    }
    let (status, answer) = request(&stack, "GET", "/orders/999999", None).await?;
    assert_eq!((status, error_of(&answer)), (404, "there is no order 999999"));
    let (status, answer) = request(&stack, "GET", "/orders/tea", None).await?;
    assert_eq!(status, 400, "{answer}");
    let oversized = vec![b' '; MAX_BODY_BYTES + 1];
    let (status, answer) = request(&stack, "POST", "/orders", Some(&oversized)).await?;
    assert_eq!(status, 413, "{answer}");

    // The shop's own code through the library, on the stack's pooler.
    let url = stack.pooled_url()?;
    let pool = PoolSettings {
        max_size: 2,
        wait: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        query_timeout: Duration::from_secs(10),
    };
    let db = Database::new(url.parse::<tidepool::db::Target>()?, pool, WorkerMetrics::new()?.db_pool_wait)?;

    // A rolled-back order leaves neither the order nor its job.
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let placed = orders::place(&tx, &order("bob@example.com", &[("tea", 1, 450)])).await.map_err(api)?;
    tx.rollback().await?;
    assert!(tidepool::queue::lookup(&conn, placed.receipt_job).await?.is_none(), "the job rolled back");
    let left = conn.query("SELECT 1 FROM shop_order WHERE id = $1", &[(&placed.id, Type::INT8)]).await?;
    assert!(left.is_empty(), "the order rolled back");

    // The receipt task through the test helpers: one attempt, then a drain
    // of the queue (the stack's worker stopped, so the drain runs them all).
    stack.down(&["worker"])?;
    let tx = conn.transaction().await?;
    let mut placed = Vec::new();
    for customer in ["cy@example.com", "di@example.com", "ed@example.com"] {
        placed.push(orders::place(&tx, &order(customer, &[("cup", 1, 1200)])).await.map_err(api)?);
    }
    tx.commit().await?;
    let receipt = testing::perform(&db, (), SendReceipt { order_id: placed[0].id }).await?;
    assert_eq!(receipt, Receipt { order_id: placed[0].id, number: format!("R-{:08}", placed[0].id) });
    match testing::perform(&db, (), SendReceipt { order_id: 999_999 }).await {
        Err(PerformError::Failed { error, .. }) => assert_eq!(error.to_string(), "there is no order 999999"),
        other => bail!("a receipt for no order must fail: {other:?}"),
    }
    match testing::perform(&db, (), SendReceipt { order_id: 0 }).await {
        Err(PerformError::InvalidArgs { reason, .. }) => assert!(reason.contains("positive"), "{reason}"),
        other => bail!("order 0 must be refused: {other:?}"),
    }
    // The stack's worker may have enqueued a sweep before it stopped (every
    // five minutes, on the clock): the drain runs it too.
    let sweeps =
        conn.query("SELECT 1 FROM tidepool_jobs WHERE task = 'resend_unsent_receipts'", &[]).await?.len()
            as u64;
    let drained = testing::drain(&tidepool_shop::app(), settings_for(&url), Duration::from_secs(60)).await?;
    assert_eq!(
        drained,
        Drained { succeeded: 3 + sweeps, ..Drained::default() },
        "the three jobs, the first one's again"
    );
    for p in &placed {
        let (status, shown) = request(&stack, "GET", &format!("/orders/{}", p.id), None).await?;
        assert_eq!((status, shown["receipt"]["state"].as_str()), (200, Some("sent")), "{shown}");
    }

    // The sweep: an order an hour old whose receipt was never sent and
    // whose job is gone gets a new one, once; a young one does not.
    let overdue = placed[1].id;
    conn.execute(
        "UPDATE shop_order SET created_at = now() - interval '1 hour', receipt_sent_at = NULL,
             receipt_number = NULL, receipt_job = NULL WHERE id = $1",
        &[(&overdue, Type::INT8)],
    )
    .await?;
    let young = placed[2].id;
    conn.execute(
        "UPDATE shop_order SET receipt_sent_at = NULL, receipt_number = NULL, receipt_job = NULL WHERE id = $1",
        &[(&young, Type::INT8)],
    )
    .await?;
    assert_eq!(testing::perform(&db, (), ResendUnsent {}).await?, 1, "the overdue order's receipt");
    assert_eq!(testing::perform(&db, (), ResendUnsent {}).await?, 0, "its new job is pending");
    let drained = testing::drain(&tidepool_shop::app(), settings_for(&url), Duration::from_secs(60)).await?;
    assert_eq!(drained, Drained { succeeded: 1, ..Drained::default() }, "the swept receipt");
    let (_, shown) = request(&stack, "GET", &format!("/orders/{overdue}"), None).await?;
    assert_eq!(shown["receipt"]["state"], "sent", "{shown}");
    let (_, shown) = request(&stack, "GET", &format!("/orders/{young}"), None).await?;
    assert_ne!(shown["receipt"]["state"], "sent", "too young to sweep: {shown}");
    Ok(())
}

fn settings_for(url: &str) -> WorkerSettings {
    WorkerSettings { database: DatabaseSettings::new(url.to_owned()), ..WorkerSettings::default() }
}

fn api(e: tidepool::web::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.status, e.message)
}
