//! The task that sends an order's receipt, and the periodic sweep that
//! sends again those whose job ended without sending them.

use std::time::Duration;

use tidepool::db::Type;
use tidepool::queue::periodic::{Cadence, InvalidPeriodic, Periodic};
use tidepool::queue::{self, EnqueueOptions, JobState};
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

/// Orders older than this without a receipt are swept by [`ResendUnsent`].
pub const OVERDUE_AFTER_MINUTES: i32 = 10;
/// Most orders one sweep enqueues receipts for; the rest wait for the next.
pub const SWEEP_LIMIT: i64 = 100;

/// The safety net behind [`SendReceipt`], run on a schedule
/// ([`resend_unsent_schedule`]): enqueues the receipt again for each order
/// older than [`OVERDUE_AFTER_MINUTES`] without one whose receipt job ended
/// without sending it (out of attempts, or cancelled). Returns how many it
/// enqueued.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(crate = "tidepool::serde")]
pub struct ResendUnsent {}

impl Task for ResendUnsent {
    const NAME: &'static str = "resend_unsent_receipts";
    type State = ();
    type Output = u64;

    async fn run(self, ctx: TaskContext<()>) -> Result<u64, TaskError> {
        let mut conn = ctx.db.get().await?;
        let overdue = conn
            .query(
                "SELECT id, receipt_job FROM shop_order
                 WHERE receipt_sent_at IS NULL AND created_at < now() - make_interval(mins => $1)
                 ORDER BY id LIMIT $2",
                &[(&OVERDUE_AFTER_MINUTES, Type::INT4), (&SWEEP_LIMIT, Type::INT8)],
            )
            .await?;
        let mut enqueued = 0;
        for row in overdue {
            let (order_id, job): (i64, Option<i64>) = (row.get(0), row.get(1));
            let ended = match job {
                Some(job) => queue::lookup(&conn, job)
                    .await?
                    .map_or(true, |view| matches!(view.state, JobState::Dead | JobState::Cancelled)),
                None => true,
            };
            if !ended {
                continue; // still pending or running: it may yet send it
            }
            let tx = conn.transaction().await?;
            let options =
                EnqueueOptions { unique_key: Some(format!("receipt-{order_id}")), ..Default::default() };
            let job = queue::enqueue(&tx, &SendReceipt { order_id }, options)
                .await
                .map_err(|e| TaskError::retry(format!("enqueuing the receipt of order {order_id}: {e}")))?;
            tx.execute(
                "UPDATE shop_order SET receipt_job = $1 WHERE id = $2",
                &[(&job.id, Type::INT8), (&order_id, Type::INT8)],
            )
            .await?;
            tx.commit().await?;
            enqueued += 1;
        }
        Ok(enqueued)
    }
}

/// [`ResendUnsent`] every five minutes, on the shop's workers (any of them
/// enqueues each sweep, once).
pub fn resend_unsent_schedule() -> Result<Periodic, InvalidPeriodic> {
    Periodic::new("resend_unsent_receipts", Cadence::every(Duration::from_secs(300))?, &ResendUnsent {})
}
