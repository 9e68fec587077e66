//! An example application on Tidepool, the shape of a real service:
//! - `POST /orders` writes an order and enqueues its `send_receipt` job in
//!   the same transaction: the job exists only if the order does;
//! - `GET /orders/{id}` shows the order and its receipt's state;
//! - the task `send_receipt` writes the receipt back to the order and
//!   returns it (the worker keeps it as the job's result);
//! - every five minutes, on any one of its workers, `resend_unsent_receipts`
//!   sends again the receipts whose job ended without sending them;
//! - its migrations, on the track `shop`, after Tidepool's own.
//!
//! Bad input gets Tidepool's JSON errors: 400 for a body that is not JSON
//! or a path that is not an order id, 422 for an order that is JSON but not
//! a valid order (with what is wrong), 404 for an unknown order.

pub mod orders;
pub mod receipts;

use tidepool::migrate::Migration;
use tidepool::Application;

/// The shop's own migrations (the track `shop`).
pub const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, name: "orders", sql: include_str!("../migrations/0001_orders.sql") }];

/// The shop: its routes, its tasks, its schedule and its migrations.
pub fn app() -> Application {
    // Constant arguments, no input: valid (its test says so) or a bug.
    let sweep = receipts::resend_unsent_schedule().expect("the sweep's schedule is valid");
    Application::new("shop")
        .version(env!("CARGO_PKG_VERSION"))
        .routes(orders::router())
        .task::<receipts::SendReceipt>()
        .task::<receipts::ResendUnsent>()
        .periodic(sweep)
        .migrations(MIGRATIONS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shop_declares_its_sweep() {
        let registry = super::app().registry().expect("the shop's tasks and schedule fit together");
        let names: Vec<&str> = registry.schedules().iter().map(|s| s.name()).collect();
        assert_eq!(names, ["resend_unsent_receipts"]);
        assert_eq!(registry.schedules()[0].cadence().to_string(), "every 5m");
    }
}
