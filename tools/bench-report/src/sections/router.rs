//! Section 14, `make bench-router`: one `tidepool web` answering `GET
//! /row/`, the router of commit `base` beside the current one, round by
//! round, at saturation (wrk) and at a fixed rate (`tidepool-loadgen
//! rate`), with pgbench's simple and extended protocol on the same
//! PgBouncer.

use std::path::Path;

use super::{Provenance, Section};
use crate::parse::Wrk;
use crate::stats::{max, median, min, paired, ratio, verdict};
use crate::{column, numbers, rows, ReportError};

pub const SECTION: Section<'static> = Section {
    start: "<!-- router benchmark: scripts/bench-router.sh -->",
    end: "<!-- end of the router benchmark -->",
    heading: None,
};

/// How the rounds were run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub provenance: Provenance,
    /// The commit whose hand-written router is the baseline.
    pub base: String,
    pub rounds: u32,
    pub seconds: u32,
    /// The fixed rate, in requests per second.
    pub rate: u32,
}

/// One server's rounds: per round, wrk's requests/s, p50 and p99 (ms), the
/// CPU µs per request at saturation, then at the fixed rate, and the p50
/// (ms) at the fixed rate.
pub type ServerRounds = Vec<Vec<f64>>;

/// What the rounds measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    pub old: ServerRounds,
    pub new: ServerRounds,
    /// pgbench's transactions per second, simple protocol, per round.
    pub simple: Vec<f64>,
    pub extended: Vec<f64>,
}

/// One server's round, as [`ServerRounds`] keeps it, from wrk's report
/// and `tidepool-loadgen rate`'s, and the web process's CPU time (µs) over
/// each: refused when the fixed-rate run failed requests or fell behind
/// its rate by more than a second's worth.
pub fn round(
    wrk: &Wrk,
    cpu_us: f64,
    at_rate: &serde_json::Value,
    rate_cpu_us: f64,
) -> Result<[f64; 6], ReportError> {
    let figure = |key: &str| {
        at_rate[key]
            .as_f64()
            .ok_or_else(|| ReportError::invalid("the fixed-rate report", format!("has no {key}")))
    };
    let (failed, missed, rate) = (figure("failed")?, figure("missed")?, figure("rate")?);
    if failed > 0.0 {
        return Err(ReportError::invalid(
            "the fixed-rate run",
            format!("{failed} requests failed: {}", at_rate["statuses"]),
        ));
    }
    if missed > rate {
        return Err(ReportError::invalid(
            "the fixed-rate run",
            format!("the server did not keep up with {rate} requests/s ({missed} missed): lower BENCH_ROUTER_RATE"),
        ));
    }
    Ok([
        wrk.requests_per_second,
        wrk.p50_ms,
        wrk.p99_ms,
        cpu_us / wrk.requests as f64,
        rate_cpu_us / figure("requests")?,
        1000.0 * figure("latency_p50_seconds")?,
    ])
}

/// A round as `scripts/bench-router.sh` appends it to its file.
pub fn round_line(round: &[f64; 6]) -> String {
    let [rps, p50, p99, cpu, rate_cpu, rate_p50] = round;
    format!("{rps:.1} {p50:.3} {p99:.3} {cpu:.1} {rate_cpu:.1} {rate_p50:.3}")
}

/// The files `scripts/bench-router.sh` writes into `work`: `old`, `new`,
/// `simple`, `extended`.
pub fn load(work: &Path) -> Result<Runs, ReportError> {
    Ok(Runs {
        old: rows(&work.join("old"))?,
        new: rows(&work.join("new"))?,
        simple: numbers(&work.join("simple"))?,
        extended: numbers(&work.join("extended"))?,
    })
}

/// `min to max (±% to ±%)` around the median.
fn spread(values: &[f64]) -> String {
    let m = median(values);
    let (low, high) = (min(values), max(values));
    format!("{low:.0} to {high:.0} ({:+.1} % to {:+.1} %)", 100.0 * (low / m - 1.0), 100.0 * (high / m - 1.0))
}

/// Within 3 % at the median.
fn within_three_percent(values: &[f64]) -> &'static str {
    verdict(median(values).abs() <= 3.0)
}

pub fn render(setup: &Setup, runs: &Runs) -> String {
    let Setup { provenance: Provenance { date, commit: new }, base, rounds, seconds, rate } = setup;
    let (old, cur) = (&runs.old, &runs.new);
    let col = |rows: &ServerRounds, i| column(rows, i);
    let by_round = paired(&col(cur, 0), &col(old, 0));
    let cpu_by_round = paired(&col(cur, 3), &col(old, 3));
    let rate_by_round = paired(&col(cur, 4), &col(old, 4));
    let server_row = |name: &str, rows: &ServerRounds| {
        format!(
            "| {name} | {:.0} | {} | {:.2} ms | {:.2} ms | {:.1} | {:.1} | {:.2} ms |",
            median(&col(rows, 0)),
            spread(&col(rows, 0)),
            median(&col(rows, 1)),
            median(&col(rows, 2)),
            median(&col(rows, 3)),
            median(&col(rows, 4)),
            median(&col(rows, 5)),
        )
    };
    let (simple, extended) = (&runs.simple, &runs.extended);
    let lines = [
        SECTION.start.to_owned(),
        "## 14. The router layer".into(),
        String::new(),
        format!("Written by `make bench-router` (scripts/bench-router.sh) on {date}, commit {new}, same machine."),
        format!("`GET /row/` with `wrk -t2 -c64 -d{seconds}s --latency` against one `tidepool web` (release build, a pool"),
        "of 20 connections to PgBouncer in transaction mode with 20 server connections): the demo as an".into(),
        format!("application (an axum Router behind Tidepool's server, commit {new}) beside the hand-written router"),
        format!("of commit {base}, alternating in each of {rounds} rounds (the order flips every round), after a 2 s"),
        "warm-up each. CPU per request is the web process's user and system time over the run (from".into(),
        "`/proc`) divided by the requests it answered. Then, on the same server, `tidepool-loadgen rate".into(),
        format!("--rate {rate} --connections 64 --duration {seconds}s` (after a 2 s warm-up): the same load for both,"),
        "so their CPU per request is compared at equal throughput (at saturation it also depends on how".into(),
        "many requests each wake-up finds, which moves with the throughput itself). pgbench runs the same".into(),
        "`SELECT` through the same PgBouncer in the same rounds".into(),
        format!("(`pgbench -n -M simple|extended -c 64 -j 2 -T {seconds}`)."),
        String::new(),
        format!("| server | requests/s (median) | runs: min to max | p50 | p99 | CPU µs per request | at {rate}/s: CPU µs per request | at {rate}/s: p50 |"),
        "|---|---|---|---|---|---|---|---|".into(),
        server_row(&format!("hand-written router ({base})"), old),
        server_row(&format!("axum Router behind Tidepool ({new})"), cur),
        format!("| pgbench, simple protocol | {:.0} | {} | | | | | |", median(simple), spread(simple)),
        format!("| pgbench, extended protocol | {:.0} | {} | | | | | |", median(extended), spread(extended)),
        String::new(),
        format!("- The router layer at saturation: the new server answers **{:.1} %** of the old one's requests per", ratio(&col(cur, 0), &col(old, 0))),
        format!("  second (medians); round by round the difference runs from {:+.1} % to {:+.1} % (median {:+.1} %), and", min(&by_round), max(&by_round), median(&by_round)),
        format!("  the CPU time per request from {:+.1} % to {:+.1} % (median {:+.1} %). Goal within 3 %: {}.", min(&cpu_by_round), max(&cpu_by_round), median(&cpu_by_round), within_three_percent(&by_round)),
        format!("- At the same {rate} requests/s: the new server's CPU time per request is **{:+.1} %** against the old one's", median(&rate_by_round)),
        format!("  (paired median; round by round from {:+.1} % to {:+.1} %). Goal within 3 %: {}.", min(&rate_by_round), max(&rate_by_round), within_three_percent(&rate_by_round)),
        format!("- Beside pgbench: `/row/` (HTTP, JSON, a pooled connection per request) reaches {:.0} % of pgbench's", ratio(&col(cur, 0), simple)),
        format!("  transactions per second in the simple protocol and {:.0} % in the extended one, which is what", ratio(&col(cur, 0), extended)),
        format!("  tokio-postgres sends; pgbench's extended protocol reaches {:.0} % of its simple one.", ratio(extended, simple)),
        String::new(),
        SECTION.end.to_owned(),
        String::new(),
        String::new(),
    ];
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrk() -> Wrk {
        Wrk { requests_per_second: 3000.0, p50_ms: 20.0, p99_ms: 40.0, requests: 30_000 }
    }

    #[test]
    fn a_round_divides_the_cpu_time_by_the_requests() {
        let at_rate = serde_json::json!({"failed": 0, "missed": 3, "rate": 3000, "requests": 30000, "latency_p50_seconds": 0.0006, "statuses": {"200": 30000}});
        let figures = round(&wrk(), 5_400_000.0, &at_rate, 5_100_000.0).expect("a round");
        assert_eq!(round_line(&figures), "3000.0 20.000 40.000 180.0 170.0 0.600");
    }

    #[test]
    fn a_round_that_failed_or_fell_behind_is_refused() {
        let failed = serde_json::json!({"failed": 2, "missed": 0, "rate": 3000, "requests": 30000, "latency_p50_seconds": 0.0006, "statuses": {"503": 2}});
        let message = round(&wrk(), 1.0, &failed, 1.0).expect_err("failed").to_string();
        assert_eq!(message, r#"the fixed-rate run: 2 requests failed: {"503":2}"#);
        let behind = serde_json::json!({"failed": 0, "missed": 3001, "rate": 3000, "requests": 27000, "latency_p50_seconds": 0.0006});
        let message = round(&wrk(), 1.0, &behind, 1.0).expect_err("behind").to_string();
        assert!(message.contains("did not keep up with 3000 requests/s (3001 missed)"), "{message}");
    }
}
