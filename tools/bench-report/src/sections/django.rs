//! Section 17, `make bench-django`: an image that is not Tidepool's under
//! the operator. The seed's two experiments on the Django + Celery example
//! on the real node, beside the same image's processes on loopback and the
//! Tidepool app on the real node, round by round; then the example under
//! overload, and the cost of a scrape of its pods' PgBouncer exporter.
//!
//! Everything comes from one file of records, a JSON object a line, each
//! `{"test": name, "figures": {...}}`: the tests' own (`django_seed`,
//! `seed`, `django_budget`, as `TIDEPOOL_E2E_FIGURES` collects them) and
//! the script's (`loopback`, `exporter`).

use std::path::Path;

use serde_json::Value;

use super::{Provenance, Section};
use crate::stats::{list, max, median, min, number, paired};
use crate::{at, Figures, ReportError};

pub const SECTION: Section<'static> = Section {
    start: "<!-- django benchmark: scripts/bench-django.sh -->",
    end: "<!-- end of the django benchmark -->",
    heading: None,
};

/// The records of `figures` (what `scripts/bench-django.sh` collects).
pub fn load(figures: &Path) -> Result<Figures, ReportError> {
    Figures::load(
        figures,
        &["django_seed", "seed", "loopback", "django_budget", "django_rollout", "django_clock", "exporter"],
    )
}

/// `median (runs)` of one cell, `digits` decimals.
fn cell(values: &[f64], digits: usize, unit: &str) -> String {
    format!("{}{unit} ({})", number(median(values), digits, false), list(values, digits, false))
}

/// `median (min to max)` of paired differences, in percent.
fn difference(a: &[f64], b: &[f64]) -> String {
    let by_round = paired(a, b);
    format!("{:+.1} % ({:+.1} to {:+.1} %)", median(&by_round), min(&by_round), max(&by_round))
}

pub fn render(provenance: &Provenance, runs: &Figures) -> String {
    let Provenance { date, commit } = provenance;
    format!(
        "{start}
## 17. Any image: the Django + Celery example

Written by `make bench-django` (scripts/bench-django.sh) on {date}, commit {commit}, same machine.
{rounds} rounds, each running, one after another, the seed's two experiments three ways:

- *Django on the node*: the example of `manifests/examples/django-celery.yaml` under the operator
  (`operator/tests/real_node_django.rs`): `localhost/tidepool-django-celery:0.1.0` (Debian
  trixie's Django, gunicorn with one gevent worker, psycogreen, Celery's gevent pool, Redis as the
  broker), one web pod with a share of 10 and one worker pod of concurrency 50, each with its
  PgBouncer 1.24.1 sidecar sized by the operator; the requests through the web Service from the
  node's network namespace, the tasks started by a view;
- *Django on loopback*: the same image's root filesystem (`scripts/images.sh rootfs`), its
  processes chrooted as the image's user with the same command lines, through one PgBouncer 1.18
  in transaction mode (`scripts/stack.sh`, 60 server connections) and Redis from the example's
  Redis image;
- *Tidepool on the node*: the Tidepool app (`operator/tests/real_node_e2e.rs`'s seed test), web
  pool 10, one worker of concurrency 50.

PostgreSQL 15 on the veth's host end for the node, on loopback for the local stack. A task's
span is from the first one's start to the last one's end (the example's `TaskRun` rows, the
queue's `tidepool_job_results`: not counting the wait between the enqueue and the first
start); the most at once is the tasks' own overlap where they record it, and the `pg_sleep`
backends sampled every 100 ms.

{seed}

{budget}

{rollout}

{clock}

{exporter}

{end}
",
        start = SECTION.start,
        end = SECTION.end,
        rounds = runs.test("django_seed").len(),
        seed = seed(runs),
        budget = budget(runs),
        rollout = rollout(runs),
        clock = clock(runs),
        exporter = exporter(runs),
    )
}

/// The seed's experiments, three ways.
fn seed(runs: &Figures) -> String {
    let node_requests = runs.of("django_seed", &["requests_seconds"]);
    let loopback_requests = runs.of("loopback", &["requests_seconds"]);
    let tidepool_requests = runs.of("seed", &["requests_seconds"]);
    let node_tasks = runs.of("django_seed", &["tasks", "span_seconds"]);
    let loopback_tasks = runs.of("loopback", &["tasks", "span_seconds"]);
    let tidepool_jobs = runs.of("seed", &["jobs_run_seconds"]);
    let at_once = |name: &str, overlap: &[&str], sampled: &str| {
        let (overlap, sampled) = (runs.of(name, overlap), runs.of(name, &[sampled]));
        if overlap.is_empty() || overlap.iter().all(|v| v.is_nan()) {
            format!("{} sampled", number(median(&sampled), 0, false))
        } else {
            format!("{} ({} sampled)", number(median(&overlap), 0, false), number(median(&sampled), 0, false))
        }
    };
    [
        "| experiment (median, runs) | Django on the node | Django on loopback | Tidepool on the node |"
            .to_owned(),
        "|---|---|---|---|".into(),
        format!(
            "| 10 × `/slow-query/` (5 s) at once: all ten answered | {} | {} | {} |",
            cell(&node_requests, 2, " s"),
            cell(&loopback_requests, 2, " s"),
            cell(&tidepool_requests, 2, " s")
        ),
        format!(
            "| their `pg_sleep` backends at once (sampled) | {} | {} | {} |",
            number(median(&runs.of("django_seed", &["requests_peak"])), 0, false),
            number(median(&runs.of("loopback", &["requests_peak"])), 0, false),
            number(median(&runs.of("seed", &["requests_peak"])), 0, false),
        ),
        format!(
            "| 100 slow tasks (5 s), one worker of concurrency 50: first start to last end | {} | {} | {} |",
            cell(&node_tasks, 2, " s"),
            cell(&loopback_tasks, 2, " s"),
            cell(&tidepool_jobs, 2, " s")
        ),
        format!(
            "| tasks at once | {} | {} | {} |",
            at_once("django_seed", &["tasks", "peak_overlap"], "tasks_peak"),
            at_once("loopback", &["tasks", "peak_overlap"], "tasks_peak"),
            at_once("seed", &["none"], "jobs_peak")
        ),
        String::new(),
        format!(
            "Django on the node against Django on loopback, paired by round: the requests {}, the tasks {}.",
            difference(&node_requests, &loopback_requests),
            difference(&node_tasks, &loopback_tasks)
        ),
        format!(
            "Django on the node against Tidepool on the node: the requests {}, the tasks {}.",
            difference(&node_requests, &tidepool_requests),
            difference(&node_tasks, &tidepool_jobs)
        ),
    ]
    .join("\n")
}

/// The overload run, once.
fn budget(runs: &Figures) -> String {
    let last = runs.last("django_budget");
    let n = |path: &[&str]| at(&last, path).as_f64().unwrap_or(f64::NAN);
    let seconds = |path: &[&str]| number(n(path), 1, false);
    let int = |path: &[&str]| number(n(path), 0, false);
    [
        "### Under overload".to_owned(),
        String::new(),
        format!(
            "PostgreSQL's `max_connections` = {} = reserved {} + available {}; web 2 replicas asking 10 each,",
            int(&["max_connections"]),
            number(n(&["max_connections"]) - n(&["available"]), 0, false),
            int(&["available"])
        ),
        format!(
            "`web.concurrency` 200 (gunicorn's `--worker-connections`), `queryWaitTimeoutSeconds` {}; worker 1 replica of",
            int(&["query_wait_timeout_seconds"])
        ),
        format!(
            "concurrency 20. The planner gave each web pod {} and the worker {} (planned peak {}, with the surge pods).",
            int(&["web_share"]),
            int(&["worker_share"]),
            int(&["planned"])
        ),
        format!(
            "Offered at once, once every web pod answered through the Service: {} × `/slow-query/?seconds=1`",
            int(&["requests"])
        ),
        "(each a Django connection of its own) and 60 tasks of 1 s.".into(),
        String::new(),
        "| requests | 200 | 503 | p50 | p99 | max | the burst took | 60 tasks | peak app connections (sampled) | planned | available |".into(),
        "|---|---|---|---|---|---|---|---|---|---|---|".into(),
        format!(
            "| {} | {} | {} | {} s | {} s | {} s | {} s | {} s, {} at once | {} | {} | {} |",
            int(&["requests"]),
            int(&["ok"]),
            int(&["failed"]),
            seconds(&["burst", "latency_p50_seconds"]),
            seconds(&["burst", "latency_p99_seconds"]),
            seconds(&["burst", "latency_max_seconds"]),
            seconds(&["burst", "total_seconds"]),
            seconds(&["tasks", "span_seconds"]),
            int(&["tasks", "peak_overlap"]),
            int(&["peak"]),
            int(&["planned"]),
            int(&["available"])
        ),
        String::new(),
        format!(
            "PostgreSQL refused nothing (the test reads its log). The web tier's {} server connections (2 pods × {})",
            number(2.0 * n(&["web_share"]), 0, false),
            int(&["web_share"])
        ),
        format!(
            "would take {} s for all {} one-second queries; the clients beyond them waited in their PgBouncer,",
            number(n(&["requests"]) / (2.0 * n(&["web_share"])), 1, false),
            int(&["requests"])
        ),
        format!(
            "and those that would have waited past `queryWaitTimeoutSeconds` ({} s) got PgBouncer's `query_wait_timeout`,",
            int(&["query_wait_timeout_seconds"])
        ),
        "which the view answers with 503: the wait is where the bound lives for an application's tier (Tidepool's".into(),
        "own web tier sheds with 503 after its pool wait instead, section 11).".into(),
    ]
    .join("\n")
}

/// A rollout of both tiers under load, once.
fn rollout(runs: &Figures) -> String {
    let last = runs.last("django_rollout");
    let n = |path: &[&str]| at(&last, path).as_f64().unwrap_or(f64::NAN);
    [
        "### A rollout under load".to_owned(),
        String::new(),
        "Both tiers of the example (2 web pods, 1 worker of concurrency 10) roll out, a change of their `env`, while".into(),
        "20 clients send `/slow-query/?seconds=0.05` one after another through the Service and 30 tasks of 2 s run.".into(),
        String::new(),
        "| rollout | requests | failed | sent again | requests/s | p50 | p99 | max | tasks run | peak live shares | available |".into(),
        "|---|---|---|---|---|---|---|---|---|---|---|".into(),
        format!(
            "| {} s | {} | {} | {} | {} | {} ms | {} ms | {} ms | {} of 30 | {} | {} |",
            number(n(&["rollout_seconds"]), 1, false),
            number(n(&["load", "requests"]), 0, true),
            number(n(&["load", "failed"]), 0, false),
            number(n(&["load", "retried"]), 0, false),
            number(n(&["load", "requests_per_second"]), 1, false),
            number(1000.0 * n(&["load", "latency_p50_seconds"]), 0, false),
            number(1000.0 * n(&["load", "latency_p99_seconds"]), 0, false),
            number(1000.0 * n(&["load", "latency_max_seconds"]), 0, false),
            number(n(&["tasks", "runs"]), 0, false),
            number(n(&["peak_shares"]), 0, false),
            number(n(&["available"]), 0, false)
        ),
        String::new(),
        "*Sent again*: requests a client sent once more on a new connection because gunicorn closed their kept-alive".into(),
        "one before answering, as browsers do. The rollout is from the change until no old pod is left. Without the".into(),
        "`preStop` sleep the operator gives the web container (taken out by hand, once, from 25d0302), this test got".into(),
        "13 refused connections of 1,896.".into(),
    ]
    .join("\n")
}

/// The clock deleted and rolled, once.
fn clock(runs: &Figures) -> String {
    let last = runs.last("django_clock");
    let n = |path: &[&str]| at(&last, path).as_f64().unwrap_or(f64::NAN);
    let handover = |i: usize| {
        number(at(&last, &["ticks", "handover_gaps_seconds"])[i].as_f64().unwrap_or(f64::NAN), 1, false)
    };
    [
        "### The clock: Celery beat deleted, then rolled".to_owned(),
        String::new(),
        format!(
            "The example's clock tier (`celery beat`, a `tick` task every {} s recording the beat that sent it): its pod",
            number(n(&["period_seconds"]), 0, false)
        ),
        "deleted while it ran, then a rollout of a change of its `env`. Over every event of a pod watch, clock pods".into(),
        format!(
            "admitted at once: at most **{}**; clock pods at once, the replacement held at the gate included: {}.",
            number(n(&["admitted_at_once"]), 0, false),
            number(n(&["existing_at_once"]), 0, false)
        ),
        String::new(),
        "| hand-over | the last tick of the old beat to the first of the new |".into(),
        "|---|---|".into(),
        format!("| its pod deleted | {} s |", handover(0)),
        format!("| a rollout | {} s |", handover(1)),
        String::new(),
        format!(
            "{} ticks in all, from {} beats one after another ({} hand-overs, {} alternations); the shortest gap",
            number(n(&["ticks", "count"]), 0, false),
            at(&last, &["ticks", "origins"]).as_array().map_or(0, Vec::len),
            number(n(&["ticks", "switches"]), 0, false),
            number(n(&["ticks", "alternations"]), 0, false)
        ),
        format!(
            "between two ticks {} s, the longest {} s. A hand-over's gap is the old beat's shutdown, the new pod's",
            number(n(&["ticks", "shortest_gap_seconds"]), 1, false),
            number(n(&["ticks", "longest_gap_seconds"]), 1, false)
        ),
        "start, and one period (a fresh beat first sends after one interval).".into(),
    ]
    .join("\n")
}

/// The exporter's scrape cost.
fn exporter(runs: &Figures) -> String {
    let last = runs.last("exporter");
    let n = |key: &str| last[key].as_f64().unwrap_or(f64::NAN);
    let times: Vec<f64> =
        last["seconds"].as_array().map_or(Vec::new(), |a| a.iter().filter_map(Value::as_f64).collect());
    let cpu_ms = 1000.0 * n("cpu_seconds") / n("scrapes");
    [
        "### The exporter's scrape cost".to_owned(),
        String::new(),
        format!(
            "`tidepool pooler-exporter` (release build) on loopback against the same PgBouncer: {} scrapes with curl,",
            number(n("scrapes"), 0, false)
        ),
        format!(
            "one after another: median **{} ms**, {} to {} ms; **{} ms** of the exporter's CPU a scrape (`/proc/PID/stat`,",
            number(1000.0 * median(&times), 2, false),
            number(1000.0 * min(&times), 2, false),
            number(1000.0 * max(&times), 2, false),
            number(cpu_ms, 2, false)
        ),
        format!(
            "user + system); {} `pgbouncer_*` series, {} bytes; resident memory {} MB after them. At Prometheus's 15 s",
            number(n("series"), 0, false),
            number(n("bytes"), 0, true),
            number(n("rss_kb") / 1024.0, 1, false)
        ),
        format!("interval that is {} % of a core per pod.", number(cpu_ms / 15_000.0 * 100.0, 3, false)),
    ]
    .join("\n")
}
