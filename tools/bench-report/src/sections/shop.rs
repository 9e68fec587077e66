//! Section 16, `make bench-shop`: the shop's `POST /orders` written alone,
//! with its transactional receipt job (worker stopped), and with the worker
//! sending the receipts, round by round; pgbench's same statements; and how
//! long the receipts took.

use std::path::Path;

use super::{Provenance, Section};
use crate::stats::{max, median, min, paired};
use crate::{column, numbers, rows, ReportError};

pub const SECTION: Section<'static> = Section {
    start: "<!-- shop benchmark: scripts/bench-shop.sh -->",
    end: "<!-- end of the shop benchmark -->",
    heading: None,
};

/// How the rounds were run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub provenance: Provenance,
    pub rounds: u32,
    pub seconds: u32,
}

/// What the rounds measured. Each variant's rows: wrk's requests/s, p50 and
/// p99 (ms) per round.
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    pub write: Vec<Vec<f64>>,
    pub enqueue: Vec<Vec<f64>>,
    pub shop: Vec<Vec<f64>>,
    /// Per round of the shop: the last order's wait for its receipt, the
    /// last receipt after the last order, the p50 and p99 wait (s), and the
    /// orders.
    pub receipts: Vec<Vec<f64>>,
    /// pgbench's transactions per second: the write alone, with the job,
    /// with the job and the NOTIFY trigger disabled.
    pub pgbench_write: Vec<f64>,
    pub pgbench_enqueue: Vec<f64>,
    pub pgbench_quiet: Vec<f64>,
}

/// The files `scripts/bench-shop.sh` writes into `work`.
pub fn load(work: &Path) -> Result<Runs, ReportError> {
    Ok(Runs {
        write: rows(&work.join("write"))?,
        enqueue: rows(&work.join("enqueue"))?,
        shop: rows(&work.join("shop"))?,
        receipts: rows(&work.join("receipts"))?,
        pgbench_write: numbers(&work.join("pgbench-write"))?,
        pgbench_enqueue: numbers(&work.join("pgbench-enqueue"))?,
        pgbench_quiet: numbers(&work.join("pgbench-quiet"))?,
    })
}

/// The median over rounds of `100 × a / b`.
fn paired_share(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(a, b)| 100.0 * a / b).collect::<Vec<_>>())
}

pub fn render(setup: &Setup, runs: &Runs) -> String {
    let Setup { provenance: Provenance { date, commit }, rounds, seconds } = setup;
    let col = |rows: &Vec<Vec<f64>>, i| column(rows, i);
    let row = |name: &str, rows: &Vec<Vec<f64>>| {
        let rps = col(rows, 0);
        format!(
            "| {name} | {:.0} | {:.0} to {:.0} | {:.2} ms | {:.2} ms |",
            median(&rps),
            min(&rps),
            max(&rps),
            median(&col(rows, 1)),
            median(&col(rows, 2))
        )
    };
    let (write, enqueue, shop, receipts) = (&runs.write, &runs.enqueue, &runs.shop, &runs.receipts);
    let by_round_enqueue = paired(&col(enqueue, 0), &col(write, 0));
    let by_round_shop = paired(&col(shop, 0), &col(write, 0));
    let share = |rows: &Vec<Vec<f64>>| 100.0 * median(&col(rows, 0)) / median(&col(write, 0));
    let with_job = paired_share(&runs.pgbench_enqueue, &runs.pgbench_write);
    let quiet = paired_share(&runs.pgbench_quiet, &runs.pgbench_write);
    let notify = 100.0 - paired_share(&runs.pgbench_enqueue, &runs.pgbench_quiet);
    let last_wait = col(receipts, 0);
    let lines = [
        SECTION.start.to_owned(),
        "## 16. The shop: `POST /orders` with its receipt job".into(),
        String::new(),
        format!("Written by `make bench-shop` (scripts/bench-shop.sh) on {date}, commit {commit}, same machine."),
        "`POST /orders` of the example application (examples/shop: a three-line order, JSON) with".into(),
        format!("`wrk -t2 -c64 -d{seconds}s --latency` on the local stack as the local plan sizes it (release"),
        "builds; PgBouncer in transaction mode; `web` with a pool of 20, `worker` of concurrency 50), three".into(),
        format!("variants in each of {rounds} rounds (the order rotates every round), each on empty tables after a"),
        "2 s warm-up:".into(),
        String::new(),
        "- *write*: the same handler with `orders::write` in place of `orders::place`: the order's `INSERT`".into(),
        "  and the answer's `SELECT`, no job (examples/shop/examples/without_receipts.rs); the worker idle;".into(),
        "- *write + enqueue*: the shop as it is, the order, its `send_receipt` job and the order's".into(),
        "  `receipt_job` in one transaction, and the job's state looked up for the answer; the worker".into(),
        "  stopped, so this is the request's own cost;".into(),
        "- *the shop*: the same with the worker sending the receipts meanwhile, on the same two cores.".into(),
        String::new(),
        "| variant | requests/s (median) | runs: min to max | p50 | p99 |".into(),
        "|---|---|---|---|---|".into(),
        row("write", write),
        row("write + enqueue, worker stopped", enqueue),
        row("the shop, worker running", shop),
        String::new(),
        format!("- The transactional enqueue: **{:.1} %** of the write-alone requests per second (paired by round:", share(enqueue)),
        format!(
            "  {:+.1} % to {:+.1} %, median {:+.1} %); p99 {:.2} ms against {:.2} ms.",
            min(&by_round_enqueue),
            max(&by_round_enqueue),
            median(&by_round_enqueue),
            median(&col(enqueue, 2)),
            median(&col(write, 2))
        ),
        format!("- With the worker sending receipts beside it: **{:.1} %** of the write-alone requests per second", share(shop)),
        format!(
            "  (paired: {:+.1} % to {:+.1} %, median {:+.1} %); p99 {:.2} ms.",
            min(&by_round_shop),
            max(&by_round_shop),
            median(&by_round_shop),
            median(&col(shop, 2))
        ),
        format!("- The same statements from pgbench (`-M extended -c 20 -j 2 -T {seconds}` through the same PgBouncer, in"),
        format!(
            "  the same rounds): the write alone {:.0} transactions/s, with the job {:.0} ({with_job:.0} %, paired), with",
            median(&runs.pgbench_write),
            median(&runs.pgbench_enqueue)
        ),
        format!("  the job but the queue's `NOTIFY` trigger disabled {:.0} ({quiet:.0} %): the enqueue's cost is the", median(&runs.pgbench_quiet)),
        format!("  database's, and the trigger's `NOTIFY` alone takes {notify:.0} % of the enqueuing throughput"),
        "  (PostgreSQL serializes the commits of notifying transactions on one lock).".into(),
        "- Orders to receipts (the shop, from each order's `created_at` and its `receipt_sent_at`, both the".into(),
        format!("  start of their transactions; {:.0} orders per run, median): the last order had its receipt", median(&col(receipts, 4))),
        format!(
            "  **{:.2} s** after it was placed (runs: {:.2} to {:.2} s), the last receipt of the run came {:.2} s",
            median(&last_wait),
            min(&last_wait),
            max(&last_wait),
            median(&col(receipts, 1))
        ),
        format!(
            "  after the last order; an order waited {:.2} s for its receipt at the median and {:.2} s at p99.",
            median(&col(receipts, 2)),
            median(&col(receipts, 3))
        ),
        String::new(),
        SECTION.end.to_owned(),
        String::new(),
        String::new(),
    ];
    lines.join("\n")
}
