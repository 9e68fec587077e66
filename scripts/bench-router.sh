#!/usr/bin/env bash
# The router layer: section 14 of docs/benchmarks.md (`make bench-router`).
#
# `GET /row/` served by today's `tidepool web` (the demo as an application:
# an axum Router behind Tidepool's server) beside the hand-written router of
# the last commit before it (BENCH_ROUTER_BASE, built once into a cache
# outside the checkout), alternating, BENCH_ROUTER_ROUNDS (7) rounds of
# BENCH_ROUTER_SECONDS (10 s) each: wrk with 64 connections (as many
# requests as the server answers: requests per second, latency percentiles,
# the web process's CPU time per request from /proc), then
# `tidepool-loadgen rate` at BENCH_ROUTER_RATE (3,000) requests per second
# over 64 connections (the CPU time per request at the same load for both:
# at saturation it depends on how many requests each wake-up finds, which
# differs with the throughput itself). In the same rounds, pgbench runs the same
# SELECT through the same PgBouncer in the simple and in the extended
# protocol (tokio-postgres' `query_typed` sends the extended one).
# Everything on loopback, every run bounded in time.
set -euo pipefail
export TIDEPOOL_POOLER_POOL_SIZE=${TIDEPOOL_POOLER_POOL_SIZE:-20}
source "$(dirname "$0")/lib.sh"
load_local_plan
cd "$REPO_ROOT"

: "${BENCH_ROUTER_BASE:=266fa53}"
: "${BENCH_ROUTER_ROUNDS:=7}"
: "${BENCH_ROUTER_SECONDS:=10}"
: "${BENCH_ROUTER_RATE:=3000}"
CACHE=${TIDEPOOL_BENCH_CACHE:-$HOME/.cache/tidepool/bench-router}
OUT=$REPO_ROOT/docs/benchmarks.md
WEB=http://127.0.0.1:$TIDEPOOL_WEB_PORT
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for tool in wrk pgbench; do command -v "$tool" >/dev/null || die "$tool is not installed (run: scripts/install-deps.sh bench)"; done
[ -x "$TIDEPOOL_LOADGEN_BIN" ] || die "tidepool-loadgen is not built (run: make build)"

# The base commit's release binary, built once per commit.
base=$(git rev-parse --short "$BENCH_ROUTER_BASE")
OLD_BIN=$CACHE/tidepool-$base
if [ ! -x "$OLD_BIN" ]; then
  say "building tidepool at $base (the hand-written router; once, cached in $CACHE)"
  mkdir -p "$CACHE"
  rm -rf "$CACHE/src"
  git worktree prune
  git worktree add --detach "$CACHE/src" "$base" >/dev/null
  (cd "$CACHE/src" && CARGO_TARGET_DIR=$CACHE/target cargo build --release -p tidepool --bin tidepool --quiet)
  cp "$CACHE/target/release/tidepool" "$OLD_BIN.new" && mv "$OLD_BIN.new" "$OLD_BIN"
  git worktree remove --force "$CACHE/src"
fi
NEW_BIN=$TIDEPOOL_BIN
new=$(git rev-parse --short HEAD)

"$REPO_ROOT/scripts/stack.sh" down worker web pooler
"$REPO_ROOT/scripts/stack.sh" up postgres pooler

cat > "$WORK/row.sql" <<'SQL'
\set id random(1, 10000)
SELECT id, randomnumber FROM world WHERE id = :id;
SQL

# One `tidepool web` from binary $1: a wrk run, then a run at the fixed
# rate; appends "rps p50_ms p99_ms cpu_us_per_request
# cpu_us_per_request_at_rate p50_ms_at_rate" to $2.
web_run() {
  local bin=$1 out=$2 pid before after
  "$REPO_ROOT/scripts/stack.sh" down web > "$WORK/stack.log" 2>&1
  TIDEPOOL_BIN=$bin TIDEPOOL_OPERATOR_BIN=$TIDEPOOL_OPERATOR_BIN "$REPO_ROOT/scripts/stack.sh" up web >> "$WORK/stack.log" 2>&1 \
    || die "tidepool web from $bin did not start: $(tail -n 5 "$WORK/stack.log")"
  pid=$(head -n 1 "$TIDEPOOL_STATE_DIR/run/web.pid")
  wrk -t2 -c64 -d2s "$WEB/row/" > /dev/null  # warm: connections, caches
  before=$(cpu_ticks "$pid")
  wrk -t2 -c64 -d"${BENCH_ROUTER_SECONDS}s" --latency "$WEB/row/" > "$WORK/wrk.txt"
  after=$(cpu_ticks "$pid")
  grep -q "Non-2xx" "$WORK/wrk.txt" && die "non-2xx answers from $bin: $(grep Non-2xx "$WORK/wrk.txt")"
  "$TIDEPOOL_LOADGEN_BIN" rate --url "$WEB/row/" --rate "$BENCH_ROUTER_RATE" --connections 64 --duration 2s > /dev/null
  local rate_before rate_after
  rate_before=$(cpu_ticks "$pid")
  "$TIDEPOOL_LOADGEN_BIN" rate --url "$WEB/row/" --rate "$BENCH_ROUTER_RATE" --connections 64 \
    --duration "${BENCH_ROUTER_SECONDS}s" > "$WORK/rate.json"
  rate_after=$(cpu_ticks "$pid")
  bench_report router-round --wrk "$WORK/wrk.txt" --cpu-us $(( (after - before) * TICK_US )) \
    --at-rate "$WORK/rate.json" --rate-cpu-us $(( (rate_after - rate_before) * TICK_US )) >> "$out"
}

# One pgbench run in protocol $1 (simple, extended); appends its tps to $2.
pgbench_run() {
  (cd "$WORK" && PGPASSWORD=$(secret app.password) pgbench -n -M "$1" -c 64 -j 2 -T "$BENCH_ROUTER_SECONDS" \
     -h 127.0.0.1 -p "$TIDEPOOL_POOLER_PORT" -U "$APP_USER" -f row.sql "$APP_DB" > pgbench.txt 2>&1) \
    || die "pgbench failed: $(tail -n 3 "$WORK/pgbench.txt")"
  awk '/^tps = / {print $3}' "$WORK/pgbench.txt" >> "$2"
}

say "14. /row/: $base's router and $new's (wrk, then $BENCH_ROUTER_RATE requests/s), pgbench simple and extended; $BENCH_ROUTER_ROUNDS rounds of ${BENCH_ROUTER_SECONDS}s each, alternating"
for round in $(seq 1 "$BENCH_ROUTER_ROUNDS"); do
  if (( round % 2 )); then order=(old new); else order=(new old); fi
  for variant in "${order[@]}"; do
    if [ "$variant" = old ]; then web_run "$OLD_BIN" "$WORK/old"; else web_run "$NEW_BIN" "$WORK/new"; fi
  done
  pgbench_run simple "$WORK/simple"
  pgbench_run extended "$WORK/extended"
  say "round $round/$BENCH_ROUTER_ROUNDS: old $(tail -n 1 "$WORK/old"), new $(tail -n 1 "$WORK/new"), pgbench $(tail -n 1 "$WORK/simple") / $(tail -n 1 "$WORK/extended") tps"
done
"$REPO_ROOT/scripts/stack.sh" down web pooler postgres >/dev/null 2>&1

bench_report router --work "$WORK" --report "$OUT" --date "$(date -u +"%Y-%m-%d %H:%M UTC")" --commit "$new" \
  --base "$base" --rounds "$BENCH_ROUTER_ROUNDS" --seconds "$BENCH_ROUTER_SECONDS" --rate "$BENCH_ROUTER_RATE"
say "14. written to docs/benchmarks.md"
