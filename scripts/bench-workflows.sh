#!/usr/bin/env bash
# Rate limits, workflows and the worker's plain path: section 22 of
# docs/benchmarks.md (`make bench-workflows`).
#
# `tidepool-loadgen workflow` (loadgen/src/workflow.rs) runs workers of the
# runtime in its process, each with pools of its own, through the local
# stack's PgBouncer in transaction mode:
#   throughput  BENCH_WORKFLOW_JOBS (200,000) no-op jobs a round, worked by
#               1 and 2 workers, the bare loop on 1 and 2 connections, 1
#               worker also serving an empty plain queue, and an empty
#               rate-limited one, and 1 and 2 workers with a rate-limited
#               queue and a chord beside; the eight ways alternating,
#               BENCH_WORKFLOW_ROUNDS (9) rounds;
#   precision   a queue limited to 100 claims a second, 4 workers, 60 s;
#   chord       a chord of 10,000 members, 4 workers: the last member's end
#               to the callback's start;
#   latency     1,000 jobs a second for 15 s, one worker woken by LISTEN:
#               enqueue to start;
#   profile     1 worker and 2, alternating, BENCH_WORKFLOW_PROFILE_ROUNDS
#               (3) rounds, PostgreSQL restarted with pg_stat_statements:
#               per job, the buffers and time of the claim and the
#               completion statements, and PostgreSQL's CPU a round.
# Everything on loopback, every wait bounded; the stack runs in a state
# folder of its own, removed at the end.
set -euo pipefail
unset TIDEPOOL_POOLER_POOL_SIZE TIDEPOOL_POOLER_MIN_POOL_SIZE
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_WORKFLOW_JOBS:=200000}"
: "${BENCH_WORKFLOW_ROUNDS:=9}"
: "${BENCH_WORKFLOW_WINDOW:=60s}"
: "${BENCH_WORKFLOW_MEMBERS:=10000}"
: "${BENCH_WORKFLOW_PROFILE_ROUNDS:=3}"
OUT=$REPO_ROOT/docs/benchmarks.md
START="<!-- workflow benchmark: scripts/bench-workflows.sh -->"
END="<!-- end of the workflow benchmark -->"
[ -x "$TIDEPOOL_LOADGEN_BIN" ] || die "tidepool-loadgen is not built (run: make build)"
WORK=$(mktemp -d)
export TIDEPOOL_STATE_DIR=$TIDEPOOL_STATE_DIR/bench-workflows
stack() { "$REPO_ROOT/scripts/stack.sh" "$@" >> "$WORK/stack.log" 2>&1 || die "stack.sh $*: $(tail -n 5 "$WORK/stack.log")"; }
cleanup() {
  "$REPO_ROOT/scripts/stack.sh" down pooler postgres >/dev/null 2>&1 || true
  rm -rf "$TIDEPOOL_STATE_DIR" "$WORK"
}
trap cleanup EXIT
load_local_plan
stack up postgres pooler
workflow() {
  DATABASE_URL=$(pooled_url) TIDEPOOL_DIRECT_DATABASE_URL=$(direct_url) TIDEPOOL_LOG=warn \
    "$TIDEPOOL_LOADGEN_BIN" workflow "$@"
}

say "throughput: $BENCH_WORKFLOW_JOBS no-op jobs a round, eight ways, $BENCH_WORKFLOW_ROUNDS rounds"
workflow throughput --jobs "$BENCH_WORKFLOW_JOBS" --rounds "$BENCH_WORKFLOW_ROUNDS" > "$WORK/throughput.json"
say "precision: 100 claims a second, 4 workers, $BENCH_WORKFLOW_WINDOW"
workflow precision --limit 100 --workers 4 --window "$BENCH_WORKFLOW_WINDOW" > "$WORK/precision.json"
say "chord: $BENCH_WORKFLOW_MEMBERS members, 4 workers"
workflow chord --members "$BENCH_WORKFLOW_MEMBERS" --workers 4 > "$WORK/chord.json"
say "latency: 1,000 jobs a second for 15 s, LISTEN"
workflow latency --rate 1000 --window 15s > "$WORK/latency.json"

say "profile: 1 worker and 2, $BENCH_WORKFLOW_PROFILE_ROUNDS rounds, with pg_stat_statements"
# Loaded for this step only, so the figures above are of a PostgreSQL
# without it; PgBouncer reconnects after the restart.
psql_super -d postgres -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
stack down postgres
stack up postgres
psql_super -d "$APP_DB" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
# CPU time of PostgreSQL's processes, in µs: the postmaster with its exited
# children, and the children still running (one that exits between two
# readings moves from the second sum into the first).
pg_cpu_us() {
  local postmaster pid total
  postmaster=$(head -n 1 "$TIDEPOOL_STATE_DIR/postgres/postmaster.pid")
  total=$(cpu_ticks "$postmaster" reaped)
  for pid in $(pgrep -P "$postmaster"); do
    total=$((total + $(cpu_ticks "$pid" 2>/dev/null || echo 0)))
  done
  echo $((total * TICK_US))
}
# The worker's claim statements (CLAIM, CLAIM_LIMITED) and completion
# (COMPLETE) in service/src/queue/sql.rs, told apart by their CTE names.
STATEMENT_KIND="CASE WHEN query LIKE '%WITH picked AS%' OR query LIKE '%), picked AS%' THEN 'claim'
                     WHEN query LIKE '%by_ctid AS%' THEN 'complete' ELSE 'other' END"
for round in $(seq 1 "$BENCH_WORKFLOW_PROFILE_ROUNDS"); do
  for w in worker1 worker2; do
    psql_super -d "$APP_DB" -c "SELECT pg_stat_statements_reset()" > /dev/null
    before=$(pg_cpu_us)
    workflow throughput --jobs "$BENCH_WORKFLOW_JOBS" --ways "$w" --rounds 1 > "$WORK/profile-$w-$round.json"
    echo $(($(pg_cpu_us) - before)) > "$WORK/profile-$w-$round.cpu_us"
    psql_super -d "$APP_DB" -At -F ' ' -c "SELECT $STATEMENT_KIND, sum(calls), sum(rows),
        sum(shared_blks_hit + shared_blks_read), sum(total_exec_time) FROM pg_stat_statements GROUP BY 1" \
      > "$WORK/profile-$w-$round.stats"
    for kind in claim complete; do
      grep -q "^$kind " "$WORK/profile-$w-$round.stats" ||
        die "profile: no $kind statement in pg_stat_statements (has its SQL changed? see STATEMENT_KIND)"
    done
  done
done

field() { json_field "$WORK/$1.json" "$2"; }
# The jobs/s of way $1's rounds, one per line.
way() { py "
import json
for r in json.load(open('$WORK/throughput.json')):
    if r['way'] == '$1': print('%.0f' % r['jobs_per_second'])
"; }
raw_median() { py "import statistics, sys; print(statistics.median(float(l) for l in sys.stdin if l.strip()))"; }
spread() { py "import sys; v = [float(l) for l in sys.stdin if l.strip()]; print('{:,.0f} to {:,.0f}'.format(min(v), max(v)))"; }
m() { way "$1" | raw_median; }
pct() { py "print('%.0f %%' % (100 * $1 / $2))"; }
{
  echo "$START"
  echo "## 22. Rate limits, workflows and the worker's plain path"
  echo
  echo "Measured $(date -u +"%Y-%m-%d %H:%M UTC") at commit $(git rev-parse --short HEAD) by \`scripts/bench-workflows.sh\` (\`make bench-workflows\`): \`tidepool-loadgen workflow\` runs workers of the runtime in one process, each with pools of its own (what a \`tidepool worker\` process has), through the local stack's PgBouncer in transaction mode, on the machine above."
  echo
  echo "**No-op jobs/s.** $BENCH_WORKFLOW_JOBS no-op jobs a round, enqueued in batches, then worked; the eight ways alternating, $BENCH_WORKFLOW_ROUNDS rounds, the hot table vacuumed before each. Workers: concurrency 2,000, batches of 1,000 (two claim batches in flight), timed from start to their last success. The bare loop: the worker's own claim and completion statements (\`tidepool::queue::sql\`) back to back with batches of 1,000, on 1 or 2 connections through the same PgBouncer. *Beside*: the same workers also serve \`bench-metered\`, limited to 100 claims a second with a backlog of 100,000, and a chord of 1,000 no-op members and its callback runs in the no-op queue; the jobs/s count everything they worked. *Served but empty*: the worker also serves \`bench-quiet\` (no limit) or \`bench-metered\` (its limit declared), with no job in it."
  echo
  echo "| | jobs/s (median) | spread | runs |"
  echo "|---|---|---|---|"
  for w in worker1 worker2 bare1 bare2 worker1_second worker1_unused worker1_beside worker2_beside; do
    case $w in
      worker1) label="1 worker" ;; worker2) label="2 workers" ;;
      bare1) label="bare loop, 1 connection" ;; bare2) label="bare loop, 2 connections" ;;
      worker1_second) label="1 worker, a second queue served but empty" ;;
      worker1_unused) label="1 worker, a limited queue served but empty" ;;
      worker1_beside) label="1 worker, limit and chord beside" ;; worker2_beside) label="2 workers, limit and chord beside" ;;
    esac
    echo "| $label | $(DECIMALS=0 median $(way $w)) | $(way $w | spread) | $(DECIMALS=0 runs $(way $w)) |"
  done
  echo
  echo "1 worker / bare loop on 1 connection: **$(pct "$(m worker1)" "$(m bare1)")**; 2 workers / 1 worker: **$(pct "$(m worker2)" "$(m worker1)")**; 2 workers / bare loop on 2 connections: $(pct "$(m worker2)" "$(m bare2)"). A second queue served but empty / none: $(pct "$(m worker1_second)" "$(m worker1)"); a limited queue served but empty / none: $(pct "$(m worker1_unused)" "$(m worker1)"); limited / plain second queue: $(pct "$(m worker1_unused)" "$(m worker1_second)"). With a limit and a chord running beside / without: $(pct "$(m worker1_beside)" "$(m worker1)") (1 worker), $(pct "$(m worker2_beside)" "$(m worker2)") (2 workers) (medians)."
  echo
  echo "**Rate-limit precision.** A queue limited to $(field precision limit_per_second) claims a second, a backlog of 1.5 times what the window allows, $(field precision workers) workers (concurrency 50, batches of 100), for $(field precision window_seconds) s from the first claim; claim times are the jobs' \`started_at\` (the time the claim statement logged):"
  echo
  echo "| claims in the window | allowed | most in any second (sliding) | per whole second: min, median, max |"
  echo "|---|---|---|---|"
  echo "| $(field precision claims) | $(field precision allowed) | $(field precision max_in_any_second) | $(py "
import json, statistics
s = json.load(open('$WORK/precision.json'))['per_second']
print('%d, %d, %d' % (min(s), statistics.median(s), max(s)))
") |"
  echo
  echo "**A chord of $(field chord members).** $(field chord workers) workers (concurrency 50, batches of 100); the members return the time they ended, the callback reads all $(field chord members) outputs through its context: from the last member's end to the callback's start **$(field chord last_member_to_callback_ms) ms**; enqueue to the callback's end $(field chord seconds) s."
  echo
  echo "**Where PostgreSQL's time goes, 1 worker and 2.** The same rounds, one way per run of \`tidepool-loadgen workflow throughput\`, alternating, $BENCH_WORKFLOW_PROFILE_ROUNDS rounds each, PostgreSQL restarted with \`pg_stat_statements\` (reset before each round): per job claimed, the claim statement's and the completion statement's shared buffers and execution time (wall time inside PostgreSQL, which includes waiting for a CPU), and the CPU time of PostgreSQL's processes over the whole round (its enqueue and vacuum too), from \`/proc\`; medians."
  echo
  echo "| | jobs/s | claims: jobs a statement, buffers a job, µs a job | completions: jobs a statement, buffers a job, µs a job | PostgreSQL CPU a round |"
  echo "|---|---|---|---|---|"
  py "
import json, statistics
work, rounds = '$WORK', $BENCH_WORKFLOW_PROFILE_ROUNDS
med = statistics.median
for w, label in (('worker1', '1 worker'), ('worker2', '2 workers')):
    jps, cpu, per_job = [], [], {'claim': [], 'complete': []}
    for r in range(1, rounds + 1):
        jps.append(json.load(open(f'{work}/profile-{w}-{r}.json'))[0]['jobs_per_second'])
        cpu.append(int(open(f'{work}/profile-{w}-{r}.cpu_us').read()) / 1e6)
        for line in open(f'{work}/profile-{w}-{r}.stats'):
            kind, calls, rows, buffers, ms = line.split()
            if kind in per_job:
                rows = int(rows)
                per_job[kind].append((rows / int(calls), int(buffers) / rows, float(ms) * 1000 / rows))
    def cell(kind):
        jobs, buffers, us = (med(x[i] for x in per_job[kind]) for i in range(3))
        return '%.0f, %.1f, %.1f' % (jobs, buffers, us)
    print('| %s | %s | %s | %s | %.1f s |' % (label, format(round(med(jps)), ','), cell('claim'), cell('complete'), med(cpu)))
"
  echo
  echo "**Enqueue to start at $(field latency rate) jobs/s.** One statement per job at a steady rate for 15 s through PgBouncer, one worker (concurrency 50) woken by LISTEN on the direct connection; the first 2 s are the warm-up; from the job's \`run_at\` to its claim, $(field latency jobs) jobs: p50 $(field latency p50_ms) ms, **p99 $(field latency p99_ms) ms**, max $(field latency max_ms) ms."
  echo "$END"
} > "$WORK/section.md"
replace_report_section "$OUT" "$START" "$END" "$WORK/section.md"
say "wrote section 22 of docs/benchmarks.md"
