#!/usr/bin/env bash
# End to end on the real node: section 11 of docs/benchmarks.md. Run by
# scripts/bench.sh after the real node's section; run alone (`make
# bench-e2e`), it replaces section 11 of an existing report.
#
# BENCH_REPEATS (3) rounds, each:
#   - operator/tests/real_node_e2e.rs, one test at a time, on the test
#     cluster (scripts/test-env.sh: the control plane, the real node, the
#     test PostgreSQL): the seed's experiments through the web Service and a
#     worker pod, the overload run, the rolling update under load, the
#     worker faults, a PgBouncer sidecar killed, PostgreSQL restarted. Each
#     test appends what it measured to $TIDEPOOL_E2E_FIGURES;
#   - then the seed's experiments through the local stack (scripts/stack.sh
#     on loopback, sized by scripts/local-tidepool.yaml): ten /slow-query/
#     at once, and 100 slow_query jobs enqueued one by one for one worker of
#     concurrency 50.
# Needs the machine's one real node: stop the test cluster first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_REPEATS:=3}"
OUT=$REPO_ROOT/docs/benchmarks.md
MARKER='<!-- end-to-end benchmarks: scripts/bench-e2e.sh -->'
END_MARKER='<!-- end of end-to-end benchmarks -->'
[ ! -e "/run/netns/$TIDEPOOL_NODE_NETNS" ] || die "a real node is up already (network namespace $TIDEPOOL_NODE_NETNS); stop it first (make kube-down, or the test cluster's)"
[ -x "$TIDEPOOL_BIN" ] && [ -x "$TIDEPOOL_LOADGEN_BIN" ] || die "the release binaries are not built (run: make build)"
WORK=$(mktemp -d)
# PostgreSQL runs as $TIDEPOOL_RUN_AS, which must reach its folders.
chmod 755 "$WORK"
FIGURES=$WORK/figures.jsonl
LOCAL=$WORK/local.txt

# The local stack, on ports of its own, in a state folder of its own.
local_stack() {
  TIDEPOOL_STATE_DIR=$WORK/local TIDEPOOL_PG_PORT=15651 TIDEPOOL_POOLER_PORT=16451 \
    TIDEPOOL_WEB_PORT=18051 TIDEPOOL_WORKER_PORT=18052 "$REPO_ROOT/scripts/stack.sh" "$@"
}
source "$REPO_ROOT/scripts/test-env.sh"
cleanup() {
  local_stack down >/dev/null 2>&1 || true
  test_env_down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say "11. building the tests"
cargo test --quiet -p tidepool-operator --test real_node_e2e --no-run
test_env_up
load_local_plan
local_stack up >/dev/null

local_psql() {
  PGPASSWORD=$(cat "$WORK/local/secrets/postgres.password") \
    psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 15651 -U postgres -d "$APP_DB" -c "$1"
}
json_of() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# One round of the seed's experiments on the local stack: "requests jobs"
# seconds, appended to $LOCAL.
local_seed() {
  local burst ids
  burst=$("$TIDEPOOL_LOADGEN_BIN" burst --requests 10 --url "http://127.0.0.1:18051/slow-query/")
  [ "$(json_of "$burst" succeeded)" = 10 ] || die "the local burst failed: $burst"
  ids=$(DATABASE_URL="postgres://$APP_USER:$(cat "$WORK/local/secrets/app.password")@127.0.0.1:16451/$APP_DB" \
    "$TIDEPOOL_BIN" enqueue slow_query --count 100 --batch-size 1 2>/dev/null | sort -n | sed -n '1p;$p' | paste -sd ' ' | sed 's/ / AND /')
  wait_until "[ \"\$(local_psql 'SELECT count(*) FROM tidepool_job_results WHERE id BETWEEN $ids')\" = 100 ]" 120 \
    "the local stack's 100 jobs"
  printf '%s %s\n' "$(json_of "$burst" total_seconds)" \
    "$(local_psql "SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM tidepool_job_results WHERE id BETWEEN $ids")" >> "$LOCAL"
}

for round in $(seq 1 "$BENCH_REPEATS"); do
  say "11. round $round of $BENCH_REPEATS: the end-to-end tests on the real node, one at a time"
  TIDEPOOL_E2E_FIGURES=$FIGURES cargo test --quiet -p tidepool-operator --test real_node_e2e -- --test-threads=1 \
    > "$WORK/tests-$round.log" 2>&1 || { cat "$WORK/tests-$round.log" >&2; die "the end-to-end tests failed"; }
  say "11. round $round of $BENCH_REPEATS: the seed's experiments on the local stack"
  local_seed
done

python3 - "$WORK/section.md" "$MARKER" "$END_MARKER" "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$FIGURES" "$LOCAL" <<'PY'
import json, statistics, sys
out, marker, end_marker, when, commit, figures_file, local_file = sys.argv[1:]
runs = {}
for line in open(figures_file):
    record = json.loads(line)
    runs.setdefault(record["test"], []).append(record["figures"])
local = [tuple(map(float, line.split())) for line in open(local_file) if line.strip()]

def med(values):
    return statistics.median(values)

def fmt(values, digits=2):
    return ", ".join(f"{v:.{digits}f}" for v in values)

seed = runs["seed"]
k8s_requests = [f["requests_seconds"] for f in seed]
k8s_jobs = [f["jobs_seconds"] for f in seed]
local_requests = [r for r, _ in local]
local_jobs = [j for _, j in local]
def verdict(ok):
    return "met" if ok else "**missed**"
def ratio(a, b):
    return round((med(a) / med(b) - 1) * 100, 1) + 0.0

budget = runs["budget"]
b_last = budget[-1]
rps = [f["requests"] / f["burst"]["total_seconds"] for f in budget]
budget_rows = "\n".join(
    f"| {i + 1} | {f['ok']} | {f['shed']} | {f['burst']['latency_p99_seconds']:.2f} s | {f['burst']['total_seconds']:.2f} s | {f['jobs_seconds']:.1f} s | {f['peak']} | {f['live_pods']} | {f['planned']} | {f['available']} |"
    for i, f in enumerate(budget))
rollout = runs["rollout"]
rollout_rows = "\n".join(
    f"| {i + 1} | {f['rollout_seconds']:.1f} s | {f['load']['requests']:,} | {f['load']['requests_per_second']:,.0f} | {f['load']['failed']} | {f['load']['latency_p99_seconds'] * 1000:.1f} ms | {f['load']['latency_max_seconds'] * 1000:.0f} ms | {f['load']['connections_opened']} | {f['peak_shares']} of {f['available']} |"
    for i, f in enumerate(rollout))
sidecar = runs["sidecar"]
restart = runs["postgres_restart"]
worker = runs["worker"]

section = f"""{marker}

## 11. End to end on the real node

Written by `scripts/bench-e2e.sh` on {when}, commit {commit}, same machine.
The tests of `operator/tests/real_node_e2e.rs`, one at a time, {len(seed)}
rounds; each records what it measured (the tests assert no timing). Pods:
the images of section 10 on the real node, PgBouncer 1.24.1 sidecars sized
by the operator; PostgreSQL 15 on the veth's host end (the test cluster's,
or one of the test's own where it restarts it or sets `max_connections`).
Clients: `tidepool-loadgen` inside the node's network namespace, through the
web Service's ClusterIP (kube-proxy, iptables). The local stack: the same
binaries on loopback with PgBouncer 1.18 (scripts/stack.sh), in the same run,
alternating with the tests.

### The seed's experiments: Kubernetes beside the local stack

| experiment | through Kubernetes (median) | runs | local stack (median) | runs | difference | target |
|---|---|---|---|---|---|---|
| 10 × `/slow-query/` (5 s) at once, web pool 10 | {med(k8s_requests):.2f} s | {fmt(k8s_requests)} | {med(local_requests):.2f} s | {fmt(local_requests)} | {ratio(k8s_requests, local_requests):+.1f} % | ≤ 5.2 s: {verdict(med(k8s_requests) <= 5.2)}; within 2 %: {verdict(abs(ratio(k8s_requests, local_requests)) <= 2)} |
| 100 × `slow_query` (5 s), one worker, concurrency 50 | {med(k8s_jobs):.2f} s | {fmt(k8s_jobs)} | {med(local_jobs):.2f} s | {fmt(local_jobs)} | {ratio(k8s_jobs, local_jobs):+.1f} % | ≤ 10.5 s: {verdict(med(k8s_jobs) <= 10.5)}; within 2 %: {verdict(abs(ratio(k8s_jobs, local_jobs)) <= 2)} |

Jobs: the first enqueue (`created_at`) to the last completion
(`finished_at`), enqueued one statement each (`tidepool enqueue --batch-size 1`,
as the seed's loop of `delay()`); on Kubernetes the worker pod polls through
its PgBouncer (no LISTEN), locally it also LISTENs. In every Kubernetes run the
worker pod ran 50 `pg_sleep` backends at once (sampled peaks:
{fmt([f['jobs_peak'] for f in seed], 0)}).

### The budget under overload

PostgreSQL's `max_connections` = {b_last['max_connections']} = reserved 10 + available
{b_last['available']}; web 2 replicas (pool ask 20), worker 2 replicas (concurrency
20); the planner gives each web pod {b_last['web_share']} and each worker pod
{b_last['worker_share']} server connections (3 pods per tier with the surge:
planned peak {b_last['planned']}). Offered at once: 200 ×
`/slow-query/?seconds=1` and 100 `slow_query` jobs of 1 s, against 4 live
pods' {b_last['live_pods']} server connections.

| run | 200 | 503 (shed) | p99 | burst total | 100 jobs drained | peak app connections (sampled) | live pods' shares | planned peak | available |
|---|---|---|---|---|---|---|---|---|---|
{budget_rows}

Requests per second of the burst (served and shed): median {med(rps):.1f}.
PostgreSQL refused no connection in any run ("too many clients" and
"remaining connection slots" absent from its log); the excess waited in the
app's pool up to `TIDEPOOL_DB_POOL_WAIT` (5 s), then got a 503.

### Rolling update under load

20 clients, `GET /row/` back to back through the Service, for the whole
rollout of `spec.web.concurrency` 100 → 150 (2 web pods with pool 10, surge 1;
available 50). "Live shares" is the largest sum of the annotated shares of
the pods alive at once (running or terminating), over every event of a watch.

| run | patch to old pods gone | requests | per second | failed | p99 | max | connections opened | live shares (peak) |
|---|---|---|---|---|---|---|---|---|
{rollout_rows}

### Recovery

| fault | figure | median | runs |
|---|---|---|---|
| PgBouncer sidecar killed (kill -9) with its 5 server connections in 60 s queries | old backends gone after (`client_connection_check_interval` 1 s) | {med([f['overlap_seconds'] for f in sidecar]):.2f} s | {fmt([f['overlap_seconds'] for f in sidecar])} |
| | `/row/` through the Service 200 again after | {med([f['recovered_seconds'] for f in sidecar]):.2f} s | {fmt([f['recovered_seconds'] for f in sidecar])} |
| | peak app connections during the overlap (web share {sidecar[-1]['share']}, worker share {sidecar[-1]['worker_share']}) | {med([f['peak'] for f in sidecar]):.0f} | {fmt([f['peak'] for f in sidecar], 0)} |
| PostgreSQL restarted (`pg_ctl stop -m fast`, start) under 5 clients of `/row/` | the restart itself | {med([f['restart_seconds'] for f in restart]):.2f} s | {fmt([f['restart_seconds'] for f in restart])} |
| | from the restart's start to `/row/` 200 again | {med([f['recovered_seconds'] for f in restart]):.2f} s | {fmt([f['recovered_seconds'] for f in restart])} |
| | requests answered 503 meanwhile | {med([f['load']['statuses'].get('503', 0) for f in restart]):.0f} | {fmt([f['load']['statuses'].get('503', 0) for f in restart], 0)} |
| | slowest request | {med([f['load']['latency_max_seconds'] for f in restart]):.2f} s | {fmt([f['load']['latency_max_seconds'] for f in restart])} |
| worker container killed (kill -9) holding {worker[-1]['held']}+ of 20 jobs (5 s) | all 20 done after the kill (lease 30 s) | {med([f['kill_drained_seconds'] for f in worker]):.1f} s | {fmt([f['kill_drained_seconds'] for f in worker], 1)} |
| worker pod deleted holding 12 jobs (35 s) | all 12 done after the delete (shutdown deadline 20 s, hand-back, rerun) | {med([f['delete_drained_seconds'] for f in worker]):.1f} s | {fmt([f['delete_drained_seconds'] for f in worker], 1)} |

{end_marker}
"""
open(out, "w").write(section)
PY

replace_report_section "$OUT" "$MARKER" "$END_MARKER" "$WORK/section.md"
say "wrote section 11 of $OUT"
