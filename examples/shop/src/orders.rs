//! `POST /orders` and `GET /orders/{id}`.

use tidepool::axum::extract::Path;
use tidepool::axum::http::StatusCode;
use tidepool::axum::routing::{get, post};
use tidepool::axum::{Json, Router};
use tidepool::chrono::{DateTime, Utc};
use tidepool::db::{Conn, Tx, Type};
use tidepool::queue::{self, EnqueueOptions};
use tidepool::serde::{Deserialize, Serialize};
use tidepool::serde_json::Value;
use tidepool::web::ApiError;

use crate::receipts::SendReceipt;

/// Most lines in one order.
pub const MAX_ITEMS: usize = 100;
/// Most of one item in a line.
pub const MAX_QUANTITY: i32 = 1_000;
/// Highest price of one item, in cents.
pub const MAX_PRICE_CENTS: i64 = 10_000_000;

/// The shop's routes.
pub fn router() -> Router {
    Router::new().route("/orders", post(create)).route("/orders/{id}", get(show))
}

/// An order as a client sends it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(crate = "tidepool::serde", deny_unknown_fields)]
pub struct NewOrder {
    /// The customer's email address.
    pub customer: String,
    /// What they buy.
    pub items: Vec<Item>,
}

/// One line of an order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(crate = "tidepool::serde", deny_unknown_fields)]
pub struct Item {
    /// The product.
    pub sku: String,
    /// How many, 1 to [`MAX_QUANTITY`].
    pub quantity: i32,
    /// The price of one, in cents.
    pub price_cents: i64,
}

impl NewOrder {
    /// The order's total in cents, or what is wrong with it.
    pub fn total_cents(&self) -> Result<i64, String> {
        let customer = self.customer.trim();
        if !(3..=254).contains(&customer.len()) || !customer.contains('@') {
            return Err(format!("customer must be an email address, got {:?}", self.customer));
        }
        if self.items.is_empty() || self.items.len() > MAX_ITEMS {
            return Err(format!("an order has 1 to {MAX_ITEMS} items, got {}", self.items.len()));
        }
        let mut total: i64 = 0;
        for (i, item) in self.items.iter().enumerate() {
            if item.sku.trim().is_empty() || item.sku.len() > 64 {
                return Err(format!("items[{i}].sku must be 1 to 64 characters"));
            }
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                return Err(format!(
                    "items[{i}].quantity must be from 1 to {MAX_QUANTITY}, got {}",
                    item.quantity
                ));
            }
            if !(0..=MAX_PRICE_CENTS).contains(&item.price_cents) {
                return Err(format!(
                    "items[{i}].price_cents must be from 0 to {MAX_PRICE_CENTS}, got {}",
                    item.price_cents
                ));
            }
            total += i64::from(item.quantity) * item.price_cents;
        }
        Ok(total)
    }
}

/// An order placed: its id and its receipt's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// The order.
    pub id: i64,
    /// The `send_receipt` job.
    pub receipt_job: i64,
}

/// Writes `order` and enqueues its receipt in `tx`: both exist once `tx`
/// commits, neither if it rolls back.
pub async fn place(tx: &Tx<'_>, order: &NewOrder) -> Result<Placed, ApiError> {
    let id = write(tx, order).await?;
    let job = queue::enqueue(tx, &SendReceipt { order_id: id }, EnqueueOptions::default()).await?;
    tx.execute(
        "UPDATE shop_order SET receipt_job = $1 WHERE id = $2",
        &[(&job.id, Type::INT8), (&id, Type::INT8)],
    )
    .await?;
    Ok(Placed { id, receipt_job: job.id })
}

/// Writes `order` alone, with no receipt to follow, and returns its id: what
/// [`place`] does before it enqueues the receipt (the benchmark's baseline,
/// `examples/without_receipts.rs`).
pub async fn write(tx: &Tx<'_>, order: &NewOrder) -> Result<i64, ApiError> {
    let total = order.total_cents().map_err(ApiError::unprocessable)?;
    let items = tidepool::serde_json::to_value(&order.items)
        .map_err(|e| ApiError::internal(format!("could not encode the items: {e}")))?;
    let row = tx
        .query_one(
            "INSERT INTO shop_order (customer, items, total_cents) VALUES ($1, $2, $3) RETURNING id",
            &[(&order.customer.trim(), Type::TEXT), (&items, Type::JSONB), (&total, Type::INT8)],
        )
        .await?;
    Ok(row.get(0))
}

async fn create(
    mut conn: Conn,
    Json(order): Json<NewOrder>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let tx = conn.transaction().await?;
    let placed = place(&tx, &order).await?;
    tx.commit().await?;
    let view =
        find(&conn, placed.id).await?.ok_or_else(|| ApiError::internal("the order just placed is gone"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn show(conn: Conn, Path(id): Path<i64>) -> Result<Json<OrderView>, ApiError> {
    find(&conn, id).await?.map(Json).ok_or_else(|| ApiError::not_found(format!("there is no order {id}")))
}

/// An order as `GET /orders/{id}` shows it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(crate = "tidepool::serde")]
pub struct OrderView {
    /// The order.
    pub id: i64,
    /// The customer's email address.
    pub customer: String,
    /// Its lines.
    pub items: Value,
    /// Its total, in cents.
    pub total_cents: i64,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
    /// Its receipt.
    pub receipt: ReceiptView,
}

/// Where an order's receipt is.
#[derive(Debug, Serialize, Deserialize)]
#[serde(crate = "tidepool::serde")]
pub struct ReceiptView {
    /// `sent`, or the state of its job while it is not (`available`,
    /// `running`, `scheduled` for a retry, `dead`).
    pub state: String,
    /// Its job.
    pub job_id: Option<i64>,
    /// Its number, once sent.
    pub number: Option<String>,
    /// When it was sent.
    pub sent_at: Option<DateTime<Utc>>,
}

/// Order `id` with its receipt's state, or `None` if there is none.
pub async fn find(db: &Conn, id: i64) -> Result<Option<OrderView>, ApiError> {
    let Some(row) = db
        .query_opt(
            "SELECT id, customer, items, total_cents, created_at, receipt_job, receipt_number, receipt_sent_at
             FROM shop_order WHERE id = $1",
            &[(&id, Type::INT8)],
        )
        .await?
    else {
        return Ok(None);
    };
    let job_id: Option<i64> = row.get(5);
    let sent_at: Option<DateTime<Utc>> = row.get(7);
    let state = match (sent_at, job_id) {
        (Some(_), _) => "sent".to_owned(),
        (None, Some(job)) => match queue::lookup(db, job).await? {
            Some(view) => view.state.as_str().to_owned(),
            None => "unknown".to_owned(),
        },
        (None, None) => "unknown".to_owned(),
    };
    Ok(Some(OrderView {
        id: row.get(0),
        customer: row.get(1),
        items: row.get(2),
        total_cents: row.get(3),
        created_at: row.get(4),
        receipt: ReceiptView { state, job_id, number: row.get(6), sent_at },
    }))
}
