//! The shop with `POST /orders` writing the order alone: the same handler
//! as the shop's, with [`orders::write`] in place of [`orders::place`], so
//! no receipt job is enqueued (and none is looked up for the answer). It is
//! the baseline of `make bench-shop` (docs/benchmarks.md, section 16), which
//! measures what the transactional enqueue costs a request; the same
//! migrations, so it runs on the shop's database.
//!
//! ```sh
//! cargo build --release -p tidepool-shop --example without_receipts
//! ```

use std::process::ExitCode;

use tidepool::axum::http::StatusCode;
use tidepool::axum::routing::post;
use tidepool::axum::{Json, Router};
use tidepool::db::Conn;
use tidepool::web::ApiError;
use tidepool::Application;
use tidepool_shop::orders::{self, NewOrder, OrderView};

async fn create(
    mut conn: Conn,
    Json(order): Json<NewOrder>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let tx = conn.transaction().await?;
    let id = orders::write(&tx, &order).await?;
    tx.commit().await?;
    let view =
        orders::find(&conn, id).await?.ok_or_else(|| ApiError::internal("the order just written is gone"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

fn main() -> ExitCode {
    let app = Application::new("shop")
        .version(env!("CARGO_PKG_VERSION"))
        .routes(Router::new().route("/orders", post(create)))
        .migrations(tidepool_shop::MIGRATIONS);
    tidepool::run(app)
}
