#!/usr/bin/env bash
# Tidepool's task-queue benchmarks: sections 6 to 8 of docs/benchmarks.md.
# Run by scripts/bench.sh after the web sections; run alone, it replaces
# the task sections of an existing report and leaves the rest as it is.
#   6. the seed's task experiment at full size: 100 x slow_query (5 s) with
#      one `tidepool worker --concurrency 50`, enqueued one by one like the
#      seed's loop, with LISTEN and with polling only;
#   7. throughput: $BENCH_JOBS noop jobs worked by one and by two workers
#      next to the bare claim/complete loop (tidepool-loadgen queue-loop) with
#      the same SQL, batch size and PgBouncer, alternating; enqueue rates;
#      enqueue-to-start latency at a steady 1,000 jobs/s;
#   8. table health: sizes and dead tuples of the queue's tables through
#      those rounds, and before and after pruning results and dead jobs.
# Workers and clients talk to loopback only; every wait is bounded.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
load_local_plan
cd "$REPO_ROOT"

: "${BENCH_REPEATS:=3}"
: "${BENCH_JOBS:=1000000}"
# Worker settings of the throughput runs: two claim batches in flight.
: "${BENCH_CONCURRENCY:=2000}"
: "${BENCH_BATCH:=1000}"
# Server connections for the task runs: 50 tasks + 4 of the worker's own, and spare.
POOL=80
OUT=$REPO_ROOT/docs/benchmarks.md
IMG=$REPO_ROOT/docs/img
MARKER='<!-- task benchmarks: scripts/bench-tasks.sh -->'
WORK=$(mktemp -d)
# Worker PIDs go to a file, so workers started in a $(...) subshell are
# stopped too, also when that subshell fails.
WORKER_PIDS=$WORK/worker-pids
: > "$WORKER_PIDS"
trap 'stop_connection_sampler; stop_workers; rm -rf "$WORK"' EXIT
mkdir -p "$IMG"

q() { psql_super -d "$APP_DB" -At -c "$1"; }
int() { DECIMALS=0 median "$@"; }
ints() { DECIMALS=0 runs "$@"; }

# Starts `tidepool worker` number $1 (its /metrics on port 8100+$1) with the
# environment that follows (VAR=value ...), and waits for its /healthz.
start_worker() {
  local n=$1 port=$((8100 + $1))
  shift
  require_free_port "$port" "benchmark worker $n"
  env -u TIDEPOOL_DIRECT_DATABASE_URL DATABASE_URL="$(pooled_url)" TIDEPOOL_WORKER_LISTEN="127.0.0.1:$port" \
    TIDEPOOL_LOG=warn "$@" setsid "$TIDEPOOL_BIN" worker </dev/null >>"$WORK/worker-$n.log" 2>&1 &
  echo $! >> "$WORKER_PIDS"
  wait_until "curl -fsS http://127.0.0.1:$port/healthz" 30 "benchmark worker $n (see $WORK/worker-$n.log)"
}
# Starts worker $1 polling only ($2 = polling) or also listening on the
# direct connection ($2 = listen), with the environment that follows.
start_worker_in_mode() {
  local n=$1 mode=$2
  shift 2
  if [ "$mode" = listen ]; then
    start_worker "$n" TIDEPOOL_DIRECT_DATABASE_URL="$(direct_url)" "$@"
  else
    start_worker "$n" "$@"
  fi
}
stop_workers() {
  local pid
  [ -s "$WORKER_PIDS" ] || return 0
  while read -r pid; do
    kill -TERM "$pid" 2>/dev/null || true
    # Reaps our own children (a zombie would still answer kill -0); returns
    # at once for a subshell's.
    wait "$pid" 2>/dev/null || true
    wait_until "! kill -0 $pid" 40 "benchmark worker $pid to stop"
  done < "$WORKER_PIDS"
  : > "$WORKER_PIDS"
}
# Jobs the workers 1..$1 have recorded as succeeded, from their /metrics.
succeeded() {
  local total=0 n v
  for n in $(seq 1 "$1"); do
    v=$(curl -fsS "http://127.0.0.1:$((8100 + n))/metrics" | awk '/^tidepool_jobs_succeeded_total/ {s += $2} END {print s + 0}')
    total=$((total + v))
  done
  echo "$total"
}
# Jobs per second from `tidepool enqueue`'s summary in file $1.
enqueue_rate() { sed -n 's/.*: \([0-9]*\) jobs\/s$/\1/p' "$1"; }
now() { date +%s.%N; }

# One row per table named after the label ($2..., all three by default):
# size of the table, of its indexes, live and dead tuples (as ANALYZE
# counts them, not the statistics' lagging estimate), appended to $HEALTH.
table_health() {
  local label=$1 t
  shift
  [ $# -gt 0 ] || set -- tidepool_jobs tidepool_job_results tidepool_dead_jobs
  for t in "$@"; do
    q "ANALYZE $t" >/dev/null
    q "SELECT format('| %s | %s | %s | %s | %s | %s |', '$label', relname,
              pg_size_pretty(pg_relation_size(relid)), pg_size_pretty(pg_indexes_size(relid)),
              n_live_tup, n_dead_tup)
       FROM pg_stat_user_tables WHERE relname = '$t'" >> "$HEALTH"
  done
}
# Waits (at most 180 s) for autovacuum to clear the hot table's dead
# tuples; says whether it did or a manual VACUUM had to.
wait_for_autovacuum() {
  local waited=0
  q "ANALYZE tidepool_jobs" >/dev/null
  while [ "$(q "SELECT n_dead_tup > 0.01 * greatest(n_live_tup, 100000) FROM pg_stat_user_tables WHERE relname = 'tidepool_jobs'")" = t ]; do
    if [ "$waited" -ge 180 ]; then
      q "VACUUM tidepool_jobs" >/dev/null
      echo "manual VACUUM after 180 s"
      return
    fi
    sleep 5
    waited=$((waited + 5))
  done
  echo "autovacuum, within ${waited} s"
}

"$REPO_ROOT/scripts/stack.sh" up postgres
"$REPO_ROOT/scripts/stack.sh" down web worker pooler
# None kept open while idle (the local plan keeps its pools'): the sampled
# peaks are the connections the worker and the enqueuer open.
TIDEPOOL_POOLER_POOL_SIZE=$POOL TIDEPOOL_POOLER_MIN_POOL_SIZE=0 "$REPO_ROOT/scripts/stack.sh" up pooler
export DATABASE_URL
DATABASE_URL=$(pooled_url)
[ "$(q "SELECT count(*) FROM tidepool_jobs")" = 0 ] || die "the local queue has pending jobs; run make clean (or wait) before benchmarking"
# Start from empty queue tables (this drops the local stack's kept results
# and dead jobs), so the table health figures start from nothing.
q "TRUNCATE tidepool_jobs, tidepool_job_results, tidepool_dead_jobs" >/dev/null

# --- 6. The seed's task experiment --------------------------------------------
say "6. seed task experiment: 100 x slow_query (5 s), one worker with --concurrency 50, $BENCH_REPEATS times per mode"
seed_run() {
  local mode=$1 ids
  start_worker_in_mode 1 "$mode" TIDEPOOL_WORKER_CONCURRENCY=50
  sleep 1 # let an idle polling worker back off to its longest pause: the worst case
  "$TIDEPOOL_BIN" enqueue slow_query --count 100 --batch-size 1 > "$WORK/seed-ids" 2>/dev/null
  ids=$(id_range "$WORK/seed-ids")
  wait_until "[ \$(kept_results '$ids') = 100 ]" 60 "100 slow_query jobs"
  stop_workers
  q "SELECT extract(epoch FROM max(finished_at) - min(created_at))::numeric(8,2) FROM tidepool_job_results WHERE id BETWEEN $ids"
  q "SELECT extract(epoch FROM finished_at - min(created_at) OVER ())::numeric(8,3) FROM tidepool_job_results WHERE id BETWEEN $ids ORDER BY 1" > "$WORK/seed-$mode.txt"
}
start_connection_sampler "$WORK/seed-samples.txt"
seed_listen=(); seed_polling=()
for i in $(seq 1 "$BENCH_REPEATS"); do
  seed_listen+=("$(seed_run listen)")
  seed_polling+=("$(seed_run polling)")
done
stop_connection_sampler
seed_peak=$(sampled_peak "$WORK/seed-samples.txt")
seed_listen_median=$(median "${seed_listen[@]}")
seed_polling_median=$(median "${seed_polling[@]}")
awk '{n++; print $1, n}' "$WORK/seed-listen.txt" > "$WORK/seed-listen.dat"
awk '{n++; print $1, n}' "$WORK/seed-polling.txt" > "$WORK/seed-polling.dat"
gnuplot <<PLOT
set terminal pngcairo size 900,380 font "sans,10" noenhanced
set output "$IMG/seed-tasks.png"
set title "100 slow_query jobs (pg_sleep 5 s), one tidepool worker --concurrency 50 (last run of each mode)"
set xlabel "seconds since the first enqueue"
set ylabel "jobs finished"
set key left top
set grid
set xrange [0:12]
plot "$WORK/seed-listen.dat" using 1:2 with steps lw 2 title "polling + LISTEN", \
     "$WORK/seed-polling.dat" using 1:2 with steps lw 1 title "polling only"
PLOT

# --- 7. Throughput -------------------------------------------------------------
say "7. throughput: $BENCH_JOBS noop jobs, 1 and 2 workers vs the bare loop, $BENCH_REPEATS rounds"
HEALTH=$WORK/health-rounds.md
: > "$HEALTH"
table_health "empty, before the first round" tidepool_jobs
work_with_workers() {
  local workers=$1 started n
  started=$(now)
  for n in $(seq 1 "$workers"); do
    start_worker "$n" TIDEPOOL_WORKER_CONCURRENCY="$BENCH_CONCURRENCY" TIDEPOOL_WORKER_BATCH_SIZE="$BENCH_BATCH"
  done
  wait_until "[ \$(succeeded $workers) -ge $BENCH_JOBS ]" 600 "$BENCH_JOBS jobs worked by $workers worker(s)"
  py "print('%.0f' % ($BENCH_JOBS / ($(now) - $started)))"
  stop_workers
}
work_with_bare_loop() {
  "$TIDEPOOL_LOADGEN_BIN" queue-loop --loops "$1" --batch-size "$BENCH_BATCH" > "$WORK/bare.json"
  printf '%.0f\n' "$(json_field "$WORK/bare.json" jobs_per_second)"
}
worker1=(); worker2=(); bare1=(); bare2=(); enqueue_batched=(); round=0
for i in $(seq 1 "$BENCH_REPEATS"); do
  for mode in worker1 worker2 bare1 bare2; do
    round=$((round + 1))
    "$TIDEPOOL_BIN" enqueue noop --count "$BENCH_JOBS" --batch-size "$BENCH_BATCH" --quiet 2> "$WORK/enqueue.txt"
    enqueue_batched+=("$(enqueue_rate "$WORK/enqueue.txt")")
    [ "$round" -ne 1 ] || table_health "round 1: $(int "$BENCH_JOBS") enqueued" tidepool_jobs
    case $mode in
      worker1) worker1+=("$(work_with_workers 1)") ;;
      worker2) worker2+=("$(work_with_workers 2)") ;;
      bare1) bare1+=("$(work_with_bare_loop 1)") ;;
      bare2) bare2+=("$(work_with_bare_loop 2)") ;;
    esac
    [ "$(q "SELECT count(*) FROM tidepool_jobs")" = 0 ] || die "round $round left jobs behind"
    if [ "$round" -eq 1 ]; then
      table_health "round 1: all worked" tidepool_jobs
      vacuumed_by=$(wait_for_autovacuum)
      table_health "round 1: after $vacuumed_by" tidepool_jobs
    else
      # Every round starts from the same state.
      q "VACUUM tidepool_jobs" >/dev/null
      table_health "round $round ($mode), worked and vacuumed" tidepool_jobs
    fi
  done
done
w1=$(median "${worker1[@]}"); w2=$(median "${worker2[@]}"); b1=$(median "${bare1[@]}"); b2=$(median "${bare2[@]}")
best_bare=$(py "print(max($b1, $b2))")
w1_ratio=$(py "print('%.0f' % (100 * $w1 / $best_bare))"); w2_ratio=$(py "print('%.0f' % (100 * $w2 / $best_bare))")

say "   enqueue one job per statement"
enqueue_single=()
for i in $(seq 1 "$BENCH_REPEATS"); do
  "$TIDEPOOL_BIN" enqueue noop --queue bench-single --count 20000 --batch-size 1 --quiet 2> "$WORK/enqueue.txt"
  enqueue_single+=("$(enqueue_rate "$WORK/enqueue.txt")")
  q "DELETE FROM tidepool_jobs WHERE queue = 'bench-single'" >/dev/null
done

say "   enqueue-to-start latency at a steady 1,000 jobs/s"
latency_run() {
  start_worker_in_mode 1 "$1"
  "$TIDEPOOL_BIN" enqueue slow_query --args '{"seconds": 0}' --count 15000 --rate 1000 > "$WORK/latency-ids" 2>/dev/null
  # The first 2 s (2,000 jobs) are the warm-up.
  local ids
  ids=$(id_range "$WORK/latency-ids" 2001)
  wait_until "[ \$(kept_results '$ids') = 13000 ]" 60 "the latency run's jobs"
  stop_workers
  q "SELECT round((1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - run_at)))::numeric, 2)
         || ' ' || round((1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - run_at)))::numeric, 2)
     FROM tidepool_job_results WHERE id BETWEEN $ids"
}
latency=$(latency_run listen)
read -r lat_listen_p50 lat_listen_p99 <<< "$latency"
latency=$(latency_run polling)
read -r lat_polling_p50 lat_polling_p99 <<< "$latency"

# --- 8. Pruning ---------------------------------------------------------------
say "8. table health: 100,000 results and 100,000 dead jobs, then pruning"
HEALTH=$WORK/health-pruning.md
: > "$HEALTH"
q "INSERT INTO tidepool_jobs (queue, task, args, max_attempts)
   SELECT 'default', 'not_a_task', '{}', 1 FROM generate_series(1, 100000)" >/dev/null
"$TIDEPOOL_BIN" enqueue slow_query --args '{"seconds": 0}' --count 100000 --quiet 2>/dev/null
start_worker 1 TIDEPOOL_WORKER_CONCURRENCY=50 TIDEPOOL_WORKER_BATCH_SIZE=1000
wait_until "[ \$(psql_super -d $APP_DB -At -c 'SELECT count(*) FROM tidepool_jobs') = 0 ]" 300 "200,000 jobs to finish"
stop_workers
q "ANALYZE tidepool_job_results; ANALYZE tidepool_dead_jobs" >/dev/null
table_health "all worked: results kept (with those of sections 6 and 7) and dead jobs"
started=$(now)
start_worker 1 TIDEPOOL_RESULT_RETENTION=1s TIDEPOOL_DEAD_RETENTION=1s TIDEPOOL_WORKER_MAINTENANCE_INTERVAL=1s
wait_until "[ \$(psql_super -d $APP_DB -At -c 'SELECT (SELECT count(*) FROM tidepool_job_results) + (SELECT count(*) FROM tidepool_dead_jobs)') = 0 ]" 120 "pruning"
prune_seconds=$(py "print('%.1f' % ($(now) - $started))")
stop_workers
q "ANALYZE tidepool_job_results; ANALYZE tidepool_dead_jobs" >/dev/null
table_health "pruned (retention 1 s)"
q "VACUUM tidepool_job_results" >/dev/null
q "VACUUM tidepool_dead_jobs" >/dev/null
table_health "pruned, after VACUUM"

# Leave the local stack up, with this pooler.
"$REPO_ROOT/scripts/stack.sh" up

# --- Report -------------------------------------------------------------------
cat > "$WORK/tasks.md" <<REPORT
$MARKER

Task sections written by \`scripts/bench-tasks.sh\` on $(date -u +"%Y-%m-%d %H:%M UTC"), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), same machine.
For these, PgBouncer has $POOL server connections (\`max_db_connections\`) and
\`tidepool worker\` runs as a release build; PostgreSQL has default durability
and default autovacuum settings, plus the per-table settings of the queue's migration (\`service/migrations/0001_jobs.sql\`).

## 6. The seed's task experiment

100 \`slow_query\` jobs (\`SELECT pg_sleep(5)\` each), enqueued one statement
at a time like the seed's \`for _ in range(100): slow_query_task.delay()\`
(\`tidepool enqueue slow_query --count 100 --batch-size 1\`), worked by one
\`tidepool worker --concurrency 50\` that had been idle for a second. Total:
first enqueue (\`created_at\`) to last completion (\`finished_at\`).

| worker | total (median) | runs | target | |
|---|---|---|---|---|
| polling + LISTEN on the direct connection (the local stack's default) | ${seed_listen_median} s | $(runs "${seed_listen[@]}") | ≤ 10.5 s | $(verdict "$seed_listen_median <= 10.5") |
| polling only, through PgBouncer (\`--poll-interval-max\` 250 ms) | ${seed_polling_median} s | $(runs "${seed_polling[@]}") | ≤ 10.5 s | $(verdict "$seed_polling_median <= 10.5") |

Peak PostgreSQL connections of the application role during these runs
(sampled every 100 ms): $seed_peak (50 tasks, the worker's 4 own, the enqueuer's 1).

![jobs finished over time](img/seed-tasks.png)

## 7. No-op throughput

$(int "$BENCH_JOBS") \`noop\` jobs enqueued in batches (\`tidepool enqueue noop --count $BENCH_JOBS --batch-size $BENCH_BATCH\`),
then worked; $BENCH_REPEATS rounds, the four ways alternating, \`VACUUM tidepool_jobs\` between rounds.
Workers: \`tidepool worker --concurrency $BENCH_CONCURRENCY --batch-size $BENCH_BATCH\` (two claim
batches in flight per worker), timed from start to the last success in their \`/metrics\`.
The bare loop: \`tidepool-loadgen queue-loop --loops N --batch-size $BENCH_BATCH\`, the worker's own
claim and completion statements (\`tidepool::queue::sql\`) back to back, N connections, through the same PgBouncer.

| | jobs/s (median) | runs | share of the best bare loop |
|---|---|---|---|
| 1 worker process | $(int "$w1") | $(ints "${worker1[@]}") | ${w1_ratio} % |
| 2 worker processes | $(int "$w2") | $(ints "${worker2[@]}") | ${w2_ratio} % |
| bare loop, 1 connection | $(int "$b1") | $(ints "${bare1[@]}") | |
| bare loop, 2 connections | $(int "$b2") | $(ints "${bare2[@]}") | |

Targets: ≥ 40,000 jobs/s ($(verdict "min($w1, $w2) >= 40000") for both) and ≥ 60 % of the bare loop ($(verdict "min($w1_ratio, $w2_ratio) >= 60") for both).

| enqueue | jobs/s (median) | runs |
|---|---|---|
| batched, $BENCH_BATCH per statement, one connection | $(int "${enqueue_batched[@]}") | $(ints "${enqueue_batched[@]}") |
| one statement per job, one connection | $(int "${enqueue_single[@]}") | $(ints "${enqueue_single[@]}") |

Enqueue-to-start latency at a steady 1,000 jobs/s (\`tidepool enqueue slow_query --args '{"seconds": 0}' --count 15000 --rate 1000\`,
one default worker, \`started_at - run_at\` of the 13,000 jobs after a 2 s warm-up):

| worker | p50 | p99 |
|---|---|---|
| polling + LISTEN | ${lat_listen_p50} ms | ${lat_listen_p99} ms |
| polling only (\`--poll-interval-min\` 10 ms) | ${lat_polling_p50} ms | ${lat_polling_p99} ms |

## 8. Table health

The hot table holds only pending jobs, so after a round it is empty but for
dead tuples, which (auto)vacuum makes reusable (and, the table being empty,
truncates). Its indexes are not shrunk by VACUUM: B-tree pages emptied by one
VACUUM are reused after the next, so they level off at about two rounds'
worth of entries rather than growing with the number of jobs. The hot table
through the $round rounds of section 7:

| when | table | size | indexes | live tuples | dead tuples |
|---|---|---|---|---|---|
$(cat "$WORK/health-rounds.md")

Results and dead jobs leave their tables after their retention: 100,000
\`slow_query\` jobs with a kept result and 100,000 jobs of an unknown task
(dead at their only attempt), worked by one worker with the default
retention, then a worker with \`--result-retention 1s --dead-retention 1s\`
(pruning took ${prune_seconds} s from its start, 1,000 rows per statement):

| when | table | size | indexes | live tuples | dead tuples |
|---|---|---|---|---|---|
$(cat "$WORK/health-pruning.md")

<!-- end of task benchmarks -->
REPORT

replace_report_section "$OUT" "$MARKER" "<!-- end of task benchmarks -->" "$WORK/tasks.md"
say "wrote the task sections of $OUT"
