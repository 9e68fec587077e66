//! Section 11, `make bench-e2e`: the end-to-end tests on the real node,
//! round by round (each writes what it measured, a JSON object a line),
//! beside the seed's experiments on the local stack in the same rounds.

use std::path::Path;

use super::{Provenance, Section};
use crate::stats::{list, median, number};
use crate::{column, figure, rows, Figures, ReportError};

pub const SECTION: Section<'static> = Section {
    start: "<!-- end-to-end benchmarks: scripts/bench-e2e.sh -->",
    end: "<!-- end of end-to-end benchmarks -->",
    heading: None,
};

/// What the rounds measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    /// Each test's figures, a record per round.
    pub tests: Figures,
    /// Per round on the local stack: the burst's and the jobs' seconds.
    pub local: Vec<Vec<f64>>,
}

/// The tests' figures (`figures`) and the local rounds (`local`).
pub fn load(figures: &Path, local: &Path) -> Result<Runs, ReportError> {
    let needed = ["seed", "budget", "rollout", "sidecar", "postgres_restart", "worker"];
    Ok(Runs { tests: Figures::load(figures, &needed)?, local: rows(local)? })
}

/// A target's verdict, a miss in bold.
fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

/// How much median `a` differs from median `b`, in percent, to one decimal
/// (a negative zero is zero).
fn difference(a: &[f64], b: &[f64]) -> f64 {
    let rounded: f64 = format!("{:.1}", (median(a) / median(b) - 1.0) * 100.0).parse().unwrap_or(f64::NAN);
    rounded + 0.0
}

/// `median unit | runs` of a table row, `digits` decimals.
fn median_and_runs(values: &[f64], digits: usize, unit: &str) -> String {
    format!("{}{unit} | {}", number(median(values), digits, false), list(values, digits, false))
}

pub fn render(provenance: &Provenance, runs: &Runs) -> String {
    let Provenance { date, commit } = provenance;
    format!(
        "{start}

## 11. End to end on the real node

Written by `scripts/bench-e2e.sh` on {date}, commit {commit}, same machine.
The tests of `operator/tests/real_node_e2e.rs`, one at a time, {rounds}
rounds; each records what it measured (the tests assert no timing). Pods:
the images of section 10 on the real node, PgBouncer 1.24.1 sidecars sized
by the operator; PostgreSQL 15 on the veth's host end (the test cluster's,
or one of the test's own where it restarts it or sets `max_connections`).
Clients: `tidepool-loadgen` inside the node's network namespace, through the
web Service's ClusterIP (kube-proxy, iptables). The local stack: the same
binaries on loopback with PgBouncer 1.18 (scripts/stack.sh), in the same run,
alternating with the tests.

{seed}

{budget}

{rollout}

{recovery}

{end}
",
        start = SECTION.start,
        end = SECTION.end,
        rounds = runs.tests.test("seed").len(),
        seed = seed(runs),
        budget = budget(runs),
        rollout = rollout(runs),
        recovery = recovery(runs),
    )
}

/// The seed's experiments through Kubernetes beside the local stack.
fn seed(runs: &Runs) -> String {
    let row = |label: &str, k8s: &[f64], local: &[f64], target: f64| {
        let difference = difference(k8s, local);
        format!(
            "| {label} | {:.2} s | {} | {:.2} s | {} | {difference:+.1} % | ≤ {target} s: {}; within 2 %: {} |",
            median(k8s),
            list(k8s, 2, false),
            median(local),
            list(local, 2, false),
            verdict(median(k8s) <= target),
            verdict(difference.abs() <= 2.0)
        )
    };
    let requests = row(
        "10 × `/slow-query/` (5 s) at once, web pool 10",
        &runs.tests.of("seed", &["requests_seconds"]),
        &column(&runs.local, 0),
        5.2,
    );
    let jobs = row(
        "100 × `slow_query` (5 s), one worker, concurrency 50",
        &runs.tests.of("seed", &["jobs_seconds"]),
        &column(&runs.local, 1),
        10.5,
    );
    format!(
        "### The seed's experiments: Kubernetes beside the local stack

| experiment | through Kubernetes (median) | runs | local stack (median) | runs | difference | target |
|---|---|---|---|---|---|---|
{requests}
{jobs}

Jobs: the first enqueue (`created_at`) to the last completion
(`finished_at`), enqueued one statement each (`tidepool enqueue --batch-size 1`,
as the seed's loop of `delay()`); on Kubernetes the worker pod polls through
its PgBouncer (no LISTEN), locally it also LISTENs. In every Kubernetes run the
worker pod ran 50 `pg_sleep` backends at once (sampled peaks:
{peaks}).",
        peaks = list(&runs.tests.of("seed", &["jobs_peak"]), 0, false),
    )
}

/// The budget under overload.
fn budget(runs: &Runs) -> String {
    let budget = runs.tests.test("budget");
    let last = runs.tests.last("budget");
    let rows = budget
        .iter()
        .enumerate()
        .map(|(i, f)| {
            format!(
                "| {} | {} | {} | {:.2} s | {:.2} s | {:.1} s | {} | {} | {} | {} |",
                i + 1,
                f["ok"],
                f["shed"],
                figure(&f["burst"], "latency_p99_seconds"),
                figure(&f["burst"], "total_seconds"),
                figure(f, "jobs_seconds"),
                f["peak"],
                f["live_pods"],
                f["planned"],
                f["available"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let rps: Vec<f64> =
        budget.iter().map(|f| figure(f, "requests") / figure(&f["burst"], "total_seconds")).collect();
    format!(
        "### The budget under overload

PostgreSQL's `max_connections` = {max_connections} = reserved 10 + available
{available}; web 2 replicas (pool ask 20), worker 2 replicas (concurrency
20); the planner gives each web pod {web_share} and each worker pod
{worker_share} server connections (3 pods per tier with the surge:
planned peak {planned}). Offered at once: 200 ×
`/slow-query/?seconds=1` and 100 `slow_query` jobs of 1 s, against 4 live
pods' {live_pods} server connections.

| run | 200 | 503 (shed) | p99 | burst total | 100 jobs drained | peak app connections (sampled) | live pods' shares | planned peak | available |
|---|---|---|---|---|---|---|---|---|---|
{rows}

Requests per second of the burst (served and shed): median {rps:.1}.
PostgreSQL refused no connection in any run (\"too many clients\" and
\"remaining connection slots\" absent from its log); the excess waited in the
app's pool up to `TIDEPOOL_DB_POOL_WAIT` (5 s), then got a 503.",
        max_connections = last["max_connections"],
        available = last["available"],
        web_share = last["web_share"],
        worker_share = last["worker_share"],
        planned = last["planned"],
        live_pods = last["live_pods"],
        rps = median(&rps),
    )
}

/// A rolling update under load.
fn rollout(runs: &Runs) -> String {
    let rows = runs
        .tests
        .test("rollout")
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let load = &f["load"];
            format!(
                "| {} | {:.1} s | {} | {} | {} | {:.1} ms | {:.0} ms | {} | {} of {} |",
                i + 1,
                figure(f, "rollout_seconds"),
                number(figure(load, "requests"), 0, true),
                number(figure(load, "requests_per_second"), 0, true),
                load["failed"],
                figure(load, "latency_p99_seconds") * 1000.0,
                figure(load, "latency_max_seconds") * 1000.0,
                load["connections_opened"],
                f["peak_shares"],
                f["available"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "### Rolling update under load

20 clients, `GET /row/` back to back through the Service, for the whole
rollout of `spec.web.concurrency` 100 → 150 (2 web pods with pool 10, surge 1;
available 50). \"Live shares\" is the largest sum of the annotated shares of
the pods alive at once (running or terminating), over every event of a watch.

| run | patch to old pods gone | requests | per second | failed | p99 | max | connections opened | live shares (peak) |
|---|---|---|---|---|---|---|---|---|
{rows}"
    )
}

/// Recovery from a killed sidecar, a restarted PostgreSQL, a killed or
/// deleted worker.
fn recovery(runs: &Runs) -> String {
    let sidecar = |key: &str| median_and_runs(&runs.tests.of("sidecar", &[key]), 2, " s");
    let restart = |path: &[&str]| median_and_runs(&runs.tests.of("postgres_restart", path), 2, " s");
    let worker = |key: &str| median_and_runs(&runs.tests.of("worker", &[key]), 1, " s");
    let shed: Vec<f64> = runs
        .tests
        .test("postgres_restart")
        .iter()
        .map(|f| f["load"]["statuses"]["503"].as_f64().unwrap_or(0.0))
        .collect();
    let (sidecar_last, worker_last) = (runs.tests.last("sidecar"), runs.tests.last("worker"));
    format!(
        "### Recovery

| fault | figure | median | runs |
|---|---|---|---|
| PgBouncer sidecar killed (kill -9) with its 5 server connections in 60 s queries | old backends gone after (`client_connection_check_interval` 1 s) | {overlap} |
| | `/row/` through the Service 200 again after | {recovered} |
| | peak app connections during the overlap (web share {share}, worker share {worker_share}) | {peak} |
| PostgreSQL restarted (`pg_ctl stop -m fast`, start) under 5 clients of `/row/` | the restart itself | {restart_s} |
| | from the restart's start to `/row/` 200 again | {restart_recovered} |
| | requests answered 503 meanwhile | {shed} |
| | slowest request | {slowest} |
| worker container killed (kill -9) holding {held}+ of 20 jobs (5 s) | all 20 done after the kill (lease 30 s) | {kill} |
| worker pod deleted holding 12 jobs (35 s) | all 12 done after the delete (shutdown deadline 20 s, hand-back, rerun) | {delete} |",
        overlap = sidecar("overlap_seconds"),
        recovered = sidecar("recovered_seconds"),
        share = sidecar_last["share"],
        worker_share = sidecar_last["worker_share"],
        peak = median_and_runs(&runs.tests.of("sidecar", &["peak"]), 0, ""),
        restart_s = restart(&["restart_seconds"]),
        restart_recovered = restart(&["recovered_seconds"]),
        shed = median_and_runs(&shed, 0, ""),
        slowest = restart(&["load", "latency_max_seconds"]),
        held = worker_last["held"],
        kill = worker("kill_drained_seconds"),
        delete = worker("delete_drained_seconds"),
    )
}
