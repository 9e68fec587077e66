#!/usr/bin/env bash
# Periodic tasks: section 21 of docs/benchmarks.md (`make bench-periodic`).
#
# `tidepool-loadgen periodic` (loadgen/src/periodic.rs) runs workers of the
# runtime in its process, each with pools of its own, through the local
# stack's PgBouncer in transaction mode:
#   delay       BENCH_PERIODIC_SCHEDULES (10) schedules every second on 3
#               workers until 600 occurrences have started: from each
#               occurrence's instant to its job's start;
#   cost        3 idle workers for BENCH_PERIODIC_WINDOW (60 s) with 100
#               hourly schedules and with none, alternating
#               BENCH_PERIODIC_ROUNDS (3) times: what PostgreSQL did per
#               minute;
#   throughput  BENCH_PERIODIC_JOBS (200,000) no-op jobs worked by one
#               worker with 100 schedules present and with none,
#               alternating BENCH_PERIODIC_ROUNDS times.
# Everything on loopback, every wait bounded; the stack runs in a state
# folder of its own, removed at the end.
set -euo pipefail
unset TIDEPOOL_POOLER_POOL_SIZE TIDEPOOL_POOLER_MIN_POOL_SIZE
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_PERIODIC_SCHEDULES:=10}"
: "${BENCH_PERIODIC_WINDOW:=60s}"
: "${BENCH_PERIODIC_ROUNDS:=3}"
: "${BENCH_PERIODIC_JOBS:=200000}"
OUT=$REPO_ROOT/docs/benchmarks.md
START="<!-- periodic benchmark: scripts/bench-periodic.sh -->"
END="<!-- end of the periodic benchmark -->"
[ -x "$TIDEPOOL_LOADGEN_BIN" ] || die "tidepool-loadgen is not built (run: make build)"
WORK=$(mktemp -d)
export TIDEPOOL_STATE_DIR=$TIDEPOOL_STATE_DIR/bench-periodic
stack() { "$REPO_ROOT/scripts/stack.sh" "$@" >> "$WORK/stack.log" 2>&1 || die "stack.sh $*: $(tail -n 5 "$WORK/stack.log")"; }
cleanup() {
  "$REPO_ROOT/scripts/stack.sh" down pooler postgres >/dev/null 2>&1 || true
  rm -rf "$TIDEPOOL_STATE_DIR" "$WORK"
}
trap cleanup EXIT
load_local_plan
stack up postgres pooler
periodic() {
  DATABASE_URL=$(pooled_url) TIDEPOOL_DIRECT_DATABASE_URL=$(direct_url) TIDEPOOL_LOG=warn \
    "$TIDEPOOL_LOADGEN_BIN" periodic "$@"
}

say "delay: $BENCH_PERIODIC_SCHEDULES schedules every second, 3 workers, 600 occurrences"
periodic delay --workers 3 --schedules "$BENCH_PERIODIC_SCHEDULES" --occurrences 600 > "$WORK/delay.json"
say "cost: 3 idle workers with 100 hourly schedules and with none, $BENCH_PERIODIC_ROUNDS rounds of $BENCH_PERIODIC_WINDOW each"
periodic cost --workers 3 --schedules 100 --window "$BENCH_PERIODIC_WINDOW" --rounds "$BENCH_PERIODIC_ROUNDS" > "$WORK/cost.json"
say "throughput: $BENCH_PERIODIC_JOBS no-op jobs, one worker, with 100 schedules and with none, $BENCH_PERIODIC_ROUNDS rounds"
periodic throughput --schedules 100 --jobs "$BENCH_PERIODIC_JOBS" --rounds "$BENCH_PERIODIC_ROUNDS" > "$WORK/throughput.json"

field() { json_field "$WORK/$1.json" "$2"; }
# Per round of a side (schedules = $2) of $1.json, field $3, one per line.
side() { py "
import json
for r in json.load(open('$WORK/$1.json'))['rounds']:
    if r['schedules'] == $2: print('%.1f' % r['$3'])
"; }
ratio() { py "print('%.3f' % ($1 / $2))"; }
# The median of the numbers on standard input, unformatted.
raw_median() { py "import statistics, sys; print(statistics.median(float(l) for l in sys.stdin if l.strip()))"; }
duplicates=$(field delay duplicates)
[ "$duplicates" = 0 ] || die "occurrences with more than one job: $duplicates"
{
  echo "$START"
  echo "## 21. Periodic tasks"
  echo
  echo "Measured $(date -u +"%Y-%m-%d %H:%M UTC") at commit $(git rev-parse --short HEAD) by \`scripts/bench-periodic.sh\` (\`make bench-periodic\`): \`tidepool-loadgen periodic\` runs workers of the runtime in one process, each with pools of its own (what a \`tidepool worker\` process has), through the local stack's PgBouncer in transaction mode, polling only (no LISTEN connection), on the machine above."
  echo
  echo "**Delay.** $(field delay schedules) schedules every second on $(field delay workers) workers, until $(field delay occurrences) occurrences had started; from each occurrence's instant to its job's start (the task reads the clock first thing):"
  echo
  echo "| p50 | p90 | p99 | max | occurrences with two jobs |"
  echo "|---|---|---|---|---|"
  echo "| $(field delay p50_ms) ms | $(field delay p90_ms) ms | $(field delay p99_ms) ms | $(field delay max_ms) ms | $duplicates |"
  echo
  echo "Who enqueued them: $(py "
import json
print(', '.join('%s %d' % (w, n) for w, n in json.load(open('$WORK/delay.json'))['enqueued_by']))
"). The scheduler sleeps until the next occurrence by its clock corrected by the database's, enqueues it in one statement, and wakes its own worker's claim loop, so the job starts without waiting for a poll."
  echo
  echo "**What schedule checks cost PostgreSQL.** 3 idle workers for $BENCH_PERIODIC_WINDOW with 100 hourly schedules each (looked at every 5 s, rarely due) and with none, alternating $BENCH_PERIODIC_ROUNDS times; per minute, from \`pg_stat_database\`, \`pg_stat_user_tables\` and the \`postgres\` processes' CPU time in /proc:"
  echo
  echo "| | transactions | index scans of tidepool_schedules (one per schedule looked at) | its rows written (declarations, moves) | PostgreSQL CPU |"
  echo "|---|---|---|---|---|"
  for n in 0 100; do
    echo "| $n schedules | $(median $(side cost $n transactions_per_minute)) ($(runs $(side cost $n transactions_per_minute))) | $(median $(side cost $n schedule_scans_per_minute)) | $(median $(side cost $n schedule_rows_written_per_minute)) | $(median $(side cost $n postgres_cpu_ms_per_minute)) ms ($(runs $(side cost $n postgres_cpu_ms_per_minute))) |"
  done
  t0=$(median $(side cost 0 transactions_per_minute)) t1=$(median $(side cost 100 transactions_per_minute))
  c0=$(median $(side cost 0 postgres_cpu_ms_per_minute)) c1=$(median $(side cost 100 postgres_cpu_ms_per_minute))
  echo
  echo "The schedules add $(py "print('%.0f' % ($t1 - $t0))") transactions a minute for 3 workers (the idle workers' claims poll meanwhile, 4 a second each) and $(py "print('%.0f' % ($c1 - $c0))") ms of PostgreSQL's CPU a minute, the medians' difference (compare the rounds' spread): a look is one statement for all of a worker's schedules (\`unnest\` of their names), a declaration one more every 30 s."
  echo
  echo "**Jobs beside schedules.** $BENCH_PERIODIC_JOBS no-op jobs worked by one worker (concurrency 2,000, batches of 1,000) with 100 schedules present (every minute, enqueuing to a queue it does not serve) and with none, alternating $BENCH_PERIODIC_ROUNDS times:"
  echo
  echo "| | jobs/s (median) | runs |"
  echo "|---|---|---|"
  j0=$(DECIMALS=0 median $(side throughput 0 jobs_per_second)) j1=$(DECIMALS=0 median $(side throughput 100 jobs_per_second))
  echo "| no schedules | $j0 | $(DECIMALS=0 runs $(side throughput 0 jobs_per_second)) |"
  echo "| 100 schedules | $j1 | $(DECIMALS=0 runs $(side throughput 100 jobs_per_second)) |"
  echo
  echo "With schedules / without: $(ratio "$(side throughput 100 jobs_per_second | raw_median)" "$(side throughput 0 jobs_per_second | raw_median)") (medians)."
  echo "$END"
} > "$WORK/section.md"
replace_report_section "$OUT" "$START" "$END" "$WORK/section.md"
say "wrote section 21 of docs/benchmarks.md"
