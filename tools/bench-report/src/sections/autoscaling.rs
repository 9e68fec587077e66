//! Section 13, `make bench-autoscaling`: a backlog to the target replicas,
//! a load near a threshold with and without the scaling windows, and both
//! tiers scaling on the real node. The tests measure and write their
//! figures (a JSON object a line); this lays them out.

use std::path::Path;

use serde_json::Value;

use super::{Provenance, Section};
use crate::stats::{list, max, median, min};
use crate::{figure, json_lines, ReportError};

pub const SECTION: Section<'static> = Section {
    start: "<!-- scaling benchmarks: scripts/bench-autoscaling.sh -->",
    end: "<!-- end of scaling benchmarks -->",
    heading: Some("## 13. Scaling"),
};

/// How the runs were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub provenance: Provenance,
    pub trials: u32,
    pub steady_seconds: u32,
    pub repeats: u32,
}

/// What the tests wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    /// `backlog`: p50, p99 and every trial's seconds.
    pub backlog: Value,
    /// `query_backlog`: the same for the SQL signal.
    pub query_backlog: Value,
    /// `steady`: one run per Tidepool.
    pub steady: Vec<Value>,
    /// Each run of the real-node test.
    pub e2e: Vec<Value>,
}

/// The figures the tests wrote: `figures` (records named `backlog`,
/// `query_backlog` and `steady`) and `e2e` (a record per run) in `work`.
pub fn load(figures: &Path, e2e: &Path) -> Result<Runs, ReportError> {
    let records = json_lines(figures)?;
    let named = |name: &str| {
        records.iter().rev().find(|r| r["name"] == name).map(|r| r["figures"].clone()).ok_or_else(|| {
            ReportError::invalid(figures.display().to_string(), format!("has no {name} record"))
        })
    };
    let steady = named("steady")?.as_array().cloned().unwrap_or_default();
    Ok(Runs {
        backlog: named("backlog")?,
        query_backlog: named("query_backlog")?,
        steady,
        e2e: json_lines(e2e)?.into_iter().map(|r| r["figures"].clone()).collect(),
    })
}

pub fn render(setup: &Setup, runs: &Runs) -> String {
    let Setup { provenance: Provenance { date, commit }, trials, steady_seconds, repeats } = setup;
    let backlog = &runs.backlog;
    let trial_seconds = |f: &Value| {
        f["seconds"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect::<Vec<_>>()
    };
    let seconds = trial_seconds(backlog);
    let query = &runs.query_backlog;
    let query_seconds = trial_seconds(query);
    let e2e = |key: &str| runs.e2e.iter().map(|f| figure(f, key)).collect::<Vec<_>>();
    let e2e_row = |label: &str, key: &str| {
        format!("| {label} | {:.1} s | {} |", median(&e2e(key)), list(&e2e(key), 1, false))
    };
    let mut lines = vec![
        SECTION.start.to_owned(),
        format!(
            "Measured {date} at commit {commit} by `scripts/bench-autoscaling.sh` (`make bench-autoscaling`) on the test cluster: the operator in-process, the kwok node for the first two, the real node for the third, the test PostgreSQL."
        ),
        String::new(),
        format!(
            "**A backlog to the target replicas** ({trials} trials: 10,000 jobs committed in one statement, 1,000 per replica, so 1 → 10; readings every second, no up window; each trial at another moment of the scaler's cycle): from the commit to the worker Deployment's `spec.replicas` at 10, **p50 {:.2} s, p99 {:.2} s** (min {:.2} s, max {:.2} s). That is up to one polling interval, the reading, the Event, the Tidepool's patch, the reconcile it starts and the Deployment's apply. A spec's `scaleUpStabilizationSeconds` adds its length (the defaults, 10 s readings and a 15 s window, make it 15 to 25 s).",
            figure(backlog, "p50"),
            figure(backlog, "p99"),
            min(&seconds),
            max(&seconds)
        ),
        String::new(),
        format!(
            "**The same on the SQL signal** ({} trials, right after: 100 rows committed to a table of the app's own, counted by `worker.autoscaling.query` (`SELECT count(*) FROM backlog`, read-only under its statement timeout) at 10 per replica, so 1 → 10; the same readings and windows): **p50 {:.2} s, p99 {:.2} s** (min {:.2} s, max {:.2} s), {:.2} times the queues' median. The statement's own time is in it; a count over a large table is the user's to index.",
            figure(query, "trials"),
            figure(query, "p50"),
            figure(query, "p99"),
            min(&query_seconds),
            max(&query_seconds),
            figure(query, "p50") / figure(backlog, "p50").max(1e-9)
        ),
        String::new(),
        format!(
            "**A load near a threshold** ({} minutes, the same load on two Tidepools side by side: each second the backlog is set anew between 260 and 340 jobs at 100 per replica, so each reading asks for 3 or 4 replicas and the peaks need 4; readings every 10 s):",
            steady_seconds / 60
        ),
        String::new(),
        "| windows | replica changes | readings per minute | reading p50 | reading p99 | replicas at the end |".into(),
        "|---|---|---|---|---|---|".into(),
    ];
    for run in &runs.steady {
        let windows =
            if run["name"] == "default windows" { "up 15 s, down 300 s (defaults)" } else { "none" };
        lines.push(format!(
            "| {windows} | {:.0} | {:.1} | {:.2} ms | {:.2} ms | {} |",
            figure(run, "decisions"),
            figure(run, "readings_per_minute"),
            figure(run, "p50_ms"),
            figure(run, "p99_ms"),
            run["final_replicas"]
        ));
    }
    let decisions = |name: &str| {
        runs.steady.iter().find(|r| r["name"] == name).map_or(f64::NAN, |r| figure(r, "decisions"))
    };
    let first = runs.e2e.first().cloned().unwrap_or(Value::Null);
    lines.extend([
        String::new(),
        format!(
            "With the default windows the tier changed {:.0} times (a reading asking for 4 has to last the whole up window, and one asking for 3 the whole down window); without them it followed the readings, {:.0} times. A reading is one statement over the scaler's one connection, kept open; with about 60 readings the p99 is the slowest of them, and the first reading also opens the connection (TCP and SCRAM authentication). The figures are interpolated in the operator's histogram `tidepool_operator_database_query_duration_seconds`, as `histogram_quantile` would.",
            decisions("default windows"),
            decisions("no windows")
        ),
        String::new(),
        format!(
            "**Both tiers on the real node** ({repeats} runs of `both_tiers_scale_on_the_real_node_within_the_budget`: 48 `slow_query` jobs of 3 s enqueued for a worker tier at zero (0 to 2 replicas, 8 available jobs per replica, readings every second, up window 2 s, down 10 s, concurrency 4), 8 clients on `/row/` through the web Service (HPA on CPU, 1 to 3 pods, target 50 %); times from the enqueue):"
        ),
        String::new(),
        "| | median | runs |".into(),
        "|---|---|---|".into(),
        e2e_row("worker replicas set to 2", "workers_set_seconds"),
        e2e_row("2 worker pods ready", "workers_ready_seconds"),
        e2e_row("web scaled by the HPA", "web_scaled_seconds"),
        e2e_row("queue drained", "drained_seconds"),
        e2e_row("workers back at zero", "workers_at_zero_seconds"),
        format!(
            "| the app's peak connections (`pg_stat_activity`) | {:.0} | {} (planned {}, available {}) |",
            median(&e2e("peak")),
            list(&e2e("peak"), 0, false),
            first["planned"],
            first["available"]
        ),
        String::new(),
        "The HPA's delay is metrics-server's resolution (15 s) and the HPA's period (5 s in the test cluster; 15 s by default) before the Tidepool's scale subresource is set.".into(),
        SECTION.end.to_owned(),
    ]);
    lines.join("\n") + "\n"
}
