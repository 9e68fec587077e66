//! The task that sends an order's receipt.

use tidepool::db::Type;
use tidepool::serde::{Deserialize, Serialize};
use tidepool::task::{Task, TaskContext, TaskError};

/// Sends the receipt of order `order_id` and records it on the order.
/// Jobs run at least once, so a second run finds the receipt already sent
/// and returns it unchanged.
#[derive(Debug, Serialize, Deserialize)]
#[serde(crate = "tidepool::serde")]
pub struct SendReceipt {
    /// The order.
    pub order_id: i64,
}

/// A sent receipt, kept as the job's result.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "tidepool::serde")]
pub struct Receipt {
    /// The order.
    pub order_id: i64,
    /// Its receipt number.
    pub number: String,
}

impl Task for SendReceipt {
    const NAME: &'static str = "send_receipt";
    type State = ();
    type Output = Receipt;

    fn validate(&self) -> Result<(), String> {
        if self.order_id < 1 {
            return Err(format!("order_id must be positive, got {}", self.order_id));
        }
        Ok(())
    }

    async fn run(self, ctx: TaskContext<()>) -> Result<Receipt, TaskError> {
        let conn = ctx.db.get().await?;
        // Sending is writing the receipt here; a real shop would call its
        // mail service first, inside the task's timeout.
        let row = conn
            .query_opt(
                "UPDATE shop_order
                 SET receipt_number = 'R-' || lpad(id::text, 8, '0'),
                     receipt_sent_at = coalesce(receipt_sent_at, now())
                 WHERE id = $1 RETURNING receipt_number",
                &[(&self.order_id, Type::INT8)],
            )
            .await?;
        let Some(row) = row else {
            return Err(TaskError::fatal(format!("there is no order {}", self.order_id)));
        };
        Ok(Receipt { order_id: self.order_id, number: row.get(0) })
    }
}
