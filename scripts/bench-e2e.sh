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
require_no_real_node
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

# One round of the seed's experiments on the local stack: "requests jobs"
# seconds, appended to $LOCAL.
local_seed() {
  local ids
  "$TIDEPOOL_LOADGEN_BIN" burst --requests 10 --url "http://127.0.0.1:18051/slow-query/" > "$WORK/burst.json"
  [ "$(json_field "$WORK/burst.json" succeeded)" = 10 ] || die "the local burst failed: $(cat "$WORK/burst.json")"
  ids=$(DATABASE_URL="postgres://$APP_USER:$(cat "$WORK/local/secrets/app.password")@127.0.0.1:16451/$APP_DB" \
    "$TIDEPOOL_BIN" enqueue slow_query --count 100 --batch-size 1 2>/dev/null | sort -n | sed -n '1p;$p' | paste -sd ' ' | sed 's/ / AND /')
  wait_until "[ \"\$(local_psql 'SELECT count(*) FROM tidepool_job_results WHERE id BETWEEN $ids')\" = 100 ]" 120 \
    "the local stack's 100 jobs"
  printf '%s %s\n' "$(json_field "$WORK/burst.json" total_seconds)" \
    "$(local_psql "SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM tidepool_job_results WHERE id BETWEEN $ids")" >> "$LOCAL"
}

for round in $(seq 1 "$BENCH_REPEATS"); do
  say "11. round $round of $BENCH_REPEATS: the end-to-end tests on the real node, one at a time"
  TIDEPOOL_E2E_FIGURES=$FIGURES cargo test --quiet -p tidepool-operator --test real_node_e2e -- --test-threads=1 \
    > "$WORK/tests-$round.log" 2>&1 || { cat "$WORK/tests-$round.log" >&2; die "the end-to-end tests failed"; }
  say "11. round $round of $BENCH_REPEATS: the seed's experiments on the local stack"
  local_seed
done

bench_report e2e --work "$WORK" --report "$OUT" --date "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "wrote section 11 of $OUT"
