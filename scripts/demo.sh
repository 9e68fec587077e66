#!/usr/bin/env bash
# The main job, locally: starts the stack and runs the seed's two
# experiments at full size:
# - web: 10 requests of /slow-query/ (5 s each) against one `tidepool web`
#   process, with ab, then with a client that starts all ten at once;
# - tasks: 100 `slow_query` jobs (5 s each) enqueued one by one, as the
#   seed's loop of .delay() calls does, worked by one `tidepool worker`
#   with --concurrency 50.
# Prints each figure, its target and the peak number of PostgreSQL server
# connections. Exits non-zero only if the stack or an experiment could not
# run, not because a figure missed its target.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_local_plan

"$REPO_ROOT/scripts/stack.sh" up
WEB=http://127.0.0.1:$TIDEPOOL_WEB_PORT
WORK=$(mktemp -d)
trap 'stop_connection_sampler; rm -rf "$WORK"' EXIT

start_connection_sampler "$WORK/samples"

say "seed experiment with ab: ab -n 10 -c 10 $WEB/slow-query/"
ab -n 10 -c 10 "$WEB/slow-query/" > "$WORK/ab.txt" 2>&1 || { cat "$WORK/ab.txt" >&2; die "ab could not run"; }
ab_total=$(ab_total_seconds "$WORK/ab.txt")
ab_failed=$(ab_failed_requests "$WORK/ab.txt")
ab_non2xx=$(awk '/^Non-2xx responses:/ {print $3}' "$WORK/ab.txt"); ab_non2xx=${ab_non2xx:-0}

say "seed experiment, all ten at once: tidepool-loadgen burst --requests 10 --url $WEB/slow-query/"
"$TIDEPOOL_LOADGEN_BIN" burst --requests 10 --url "$WEB/slow-query/" > "$WORK/burst.json" || die "the all-at-once client could not run"
burst_total=$(printf '%.2f' "$(json_field "$WORK/burst.json" total_seconds)")
burst_failed=$(json_field "$WORK/burst.json" failed)

stop_connection_sampler
web_peak=$(sampled_peak "$WORK/samples")

say "seed task experiment: tidepool enqueue slow_query --count 100 --batch-size 1, one worker with --concurrency $TIDEPOOL_WORKER_CONCURRENCY"
start_connection_sampler "$WORK/task-samples"
DATABASE_URL=$(pooled_url) "$TIDEPOOL_BIN" enqueue slow_query --count 100 --batch-size 1 > "$WORK/ids" 2>/dev/null \
  || die "could not enqueue the jobs"
ids=$(id_range "$WORK/ids")
wait_until '[ "$(kept_results "$ids")" = 100 ]' 120 "the 100 jobs (see $TIDEPOOL_STATE_DIR/log/worker.log)"
stop_connection_sampler
task_peak=$(sampled_peak "$WORK/task-samples")
read -r task_total task_failed < <(psql_super -d "$APP_DB" -At -F ' ' -c "
  SELECT extract(epoch FROM max(finished_at) - min(created_at))::numeric(8,2),
         (SELECT count(*) FROM tidepool_dead_jobs WHERE id BETWEEN $ids)
  FROM tidepool_job_results WHERE id BETWEEN $ids")

# One line of the report's tables: figure, measured, target, verdict, note.
# Every column has its width whatever a figure's, so they stay aligned.
row() { printf '  %-42s %-11s %-10s %-7s %s' "$@" | sed 's/ *$//'; }
header() { row figure measured target verdict ""; }

cat <<REPORT

Tidepool demo: the seed's two experiments, locally
(sized by tidepool-operator plan -f scripts/local-tidepool.yaml: PgBouncer in
transaction mode with $TIDEPOOL_POOLER_POOL_SIZE server connections, planned peak $TIDEPOOL_PLANNED_PEAK with the LISTEN session)

Web: one tidepool web process, a pool of $TIDEPOOL_DB_POOL_SIZE connections
$(header)
$(row "10 x 5 s slow queries, all at once" "$burst_total s" "<= 5.2 s" "$(verdict "$burst_total <= 5.2")" "(failed: $burst_failed)")
$(row "the same with ab -n 10 -c 10" "$ab_total s" "<= 10.2 s" "$(verdict "$ab_total <= 10.2")" "(failed: $ab_failed, non-2xx: $ab_non2xx)")
$(row "peak PostgreSQL connections (whole stack)" "$web_peak" "<= $TIDEPOOL_PLANNED_PEAK" "$(verdict "$web_peak <= $TIDEPOOL_PLANNED_PEAK")")

Tasks: one tidepool worker, --concurrency $TIDEPOOL_WORKER_CONCURRENCY
$(header)
$(row "100 x 5 s slow_query jobs, first enqueue")
$(row "  to last completion (serially: 500 s)" "$task_total s" "<= 10.5 s" "$(verdict "$task_total <= 10.5")" "(dead: $task_failed)")
$(row "peak PostgreSQL connections (whole stack)" "$task_peak" "<= $TIDEPOOL_PLANNED_PEAK" "$(verdict "$task_peak <= $TIDEPOOL_PLANNED_PEAK")")

ab 2.3 opens one connection, waits for its response, and only then opens the
other nine, so its total is about two query times whatever the server does.
Jobs: curl http://127.0.0.1:$TIDEPOOL_WEB_PORT/tasks/$(tail -n 1 "$WORK/ids"); worker metrics: curl http://127.0.0.1:$TIDEPOOL_WORKER_PORT/metrics
The stack is still running: make down stops it.
REPORT
