//! Section 9, `make bench-operator`: the release operator on a control
//! plane of its own, driven by `operator/benches/scale.rs`, whose JSON
//! report this section lays out.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Provenance, Section};
use crate::ReportError;

pub const SECTION: Section<'static> = Section {
    start: "<!-- operator benchmarks: scripts/bench-operator.sh -->",
    end: "<!-- end of operator benchmarks -->",
    heading: None,
};

/// How the run went, beside the benchmark's own report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub provenance: Provenance,
    /// The whole run's seconds.
    pub elapsed_seconds: u64,
    /// Pods on the control plane at the end.
    pub pods: u64,
    /// The machine's cores.
    pub cores: u64,
}

/// `operator/benches/scale.rs`'s report.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Scale {
    pub paced: Applied,
    pub burst: Applied,
    pub burst_created_s: f64,
    pub burst_all_children_s: f64,
    pub total: u64,
    pub rest_seconds: u64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub cpu_percent_at_rest: f64,
    pub cpu_seconds_total: f64,
    pub reconciles_at_rest: f64,
    /// By "user agent resource" (the audit log's), writes per minute.
    pub writes_per_minute_at_rest: BTreeMap<String, f64>,
}

/// Tidepools applied one way: how long until their children were seen.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Applied {
    pub count: u64,
    pub first_child_ms: Percentiles,
    pub all_children_ms: Percentiles,
    pub after_migration_ms: Percentiles,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// The benchmark's report, from its JSON.
pub fn load(json: &str) -> Result<Scale, ReportError> {
    serde_json::from_str(json)
        .map_err(|e| ReportError::invalid("the scale benchmark's report", e.to_string()))
}

pub fn render(setup: &Setup, scale: &Scale) -> String {
    let Setup { provenance: Provenance { date, commit }, elapsed_seconds, pods, cores } = setup;
    let applied_row = |label: &str, a: &Applied| {
        format!(
            "| {label} | {} | {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} |",
            a.count,
            a.first_child_ms.p50,
            a.first_child_ms.p99,
            a.all_children_ms.p50,
            a.all_children_ms.p99,
            a.all_children_ms.max,
            a.after_migration_ms.p50,
            a.after_migration_ms.p99
        )
    };
    let rows = [
        applied_row("10 per second", &scale.paced),
        applied_row("all at once (32 requests in flight)", &scale.burst),
    ]
    .join("\n");
    let mut writes: Vec<(&String, &f64)> = scale.writes_per_minute_at_rest.iter().collect();
    writes.sort_by(|a, b| b.1.total_cmp(a.1));
    let write_rows = if writes.is_empty() {
        "| (none) | | 0 |".to_owned()
    } else {
        writes
            .iter()
            .map(|(key, per_minute)| {
                let (client, resource) = key.split_once(' ').unwrap_or((key.as_str(), ""));
                let client = if client.is_empty() { "(none)" } else { client };
                format!("| {client} | {resource} | {per_minute:.1} |")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // A sum of none is -0.0 in Rust: + 0.0 makes it the 0.0 it means.
    let operator_writes: f64 = scale
        .writes_per_minute_at_rest
        .iter()
        .filter(|(key, _)| key.starts_with("tidepool-operator/"))
        .map(|(_, per_minute)| per_minute)
        .sum::<f64>()
        + 0.0;
    format!(
        "{start}

## 9. The operator at scale

Written by `scripts/bench-operator.sh` on {date}, commit {commit}, same machine;
{elapsed_seconds} s in all. A control plane of its own (etcd, API server, controller
manager, scheduler, the kwok node; {pods} pods at the end), the release
`tidepool-operator run` (cluster-wide, no leader election, log level warn) and
`operator/benches/scale.rs`. Each Tidepool has a Secret of its own (its own
database server), 1 web and 1 worker pod. Times run from the create's answer
to the first sight, on a watch, of the migration Job (the operator's first
child) and of the worker Deployment (its last: applied once the controller
manager and kwok have run and completed the migration Job); the last column
runs from the first sight of the Job's success to the worker Deployment, the
operator's own part of that second half.

| Tidepools applied | count | first child p50 / p99 (ms) | all children p50 / p99 / max (ms) | migrated → Deployments p50 / p99 (ms) |
|---|---|---|---|---|
{rows}

The {burst} at once took {created:.1} s to create and {all:.1} s until the last one's children existed.

Everything here (etcd, the API server, the controller manager, the scheduler,
kwok, the operator and the client) shares the machine's {cores} cores. The
operator's own part is the first-child column and the last one; the time to
all children is mostly the migration Job's way through the controller
manager, the scheduler and kwok, which fall behind at these rates.

With {total} Tidepools, at rest (no reconcile for 10 s, then {rest} s measured):

| | |
|---|---|
| operator RSS | {rss:.1} MiB (peak {peak:.1} MiB while they were created; target ≤ 64 MB) |
| operator CPU at rest | {cpu:.2} % of one core ({cpu_total:.1} CPU seconds since start, all phases) |
| reconciles at rest | {reconciles:.0} |
| the operator's writes at rest | {operator_writes:.1} per minute |

Writes per minute at rest, by client (the API server's audit log, `userAgent` and resource):

| client | resource | writes per minute |
|---|---|---|
{write_rows}

{end}
",
        start = SECTION.start,
        end = SECTION.end,
        burst = scale.burst.count,
        created = scale.burst_created_s,
        all = scale.burst_all_children_s,
        total = scale.total,
        rest = scale.rest_seconds,
        rss = scale.rss_mib,
        peak = scale.peak_rss_mib,
        cpu = scale.cpu_percent_at_rest,
        cpu_total = scale.cpu_seconds_total,
        reconciles = scale.reconciles_at_rest,
    )
}
