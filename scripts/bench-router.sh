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
MARKER="<!-- router benchmark: scripts/bench-router.sh -->"
END_MARKER="<!-- end of the router benchmark -->"
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

# CPU time (user + system) of process $1, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

# One `tidepool web` from binary $1: a wrk run, then a run at the fixed
# rate; appends "rps p50_ms p99_ms cpu_us_per_request
# cpu_us_per_request_at_rate p50_ms_at_rate" to $2.
web_run() {
  local bin=$1 out=$2 pid before after requests
  "$REPO_ROOT/scripts/stack.sh" down web > "$WORK/stack.log" 2>&1
  TIDEPOOL_BIN=$bin TIDEPOOL_OPERATOR_BIN=$TIDEPOOL_OPERATOR_BIN "$REPO_ROOT/scripts/stack.sh" up web >> "$WORK/stack.log" 2>&1 \
    || die "tidepool web from $bin did not start: $(tail -n 5 "$WORK/stack.log")"
  pid=$(head -n 1 "$TIDEPOOL_STATE_DIR/run/web.pid")
  wrk -t2 -c64 -d2s "$WEB/row/" > /dev/null  # warm: connections, caches
  before=$(cpu_ticks "$pid")
  wrk -t2 -c64 -d"${BENCH_ROUTER_SECONDS}s" --latency "$WEB/row/" > "$WORK/wrk.txt"
  after=$(cpu_ticks "$pid")
  requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
  grep -q "Non-2xx" "$WORK/wrk.txt" && die "non-2xx answers from $bin: $(grep Non-2xx "$WORK/wrk.txt")"
  "$TIDEPOOL_LOADGEN_BIN" rate --url "$WEB/row/" --rate "$BENCH_ROUTER_RATE" --connections 64 --duration 2s > /dev/null
  local rate_before rate_after
  rate_before=$(cpu_ticks "$pid")
  "$TIDEPOOL_LOADGEN_BIN" rate --url "$WEB/row/" --rate "$BENCH_ROUTER_RATE" --connections 64 \
    --duration "${BENCH_ROUTER_SECONDS}s" > "$WORK/rate.json"
  rate_after=$(cpu_ticks "$pid")
  py 'import json,sys
rps, p50, p99 = map(float, sys.argv[9].split())
before, after, tick, requests, rate_before, rate_after = map(int, sys.argv[3:9])
at_rate = json.load(open(sys.argv[2]))
if at_rate["failed"]:
    sys.exit("%d requests failed at the fixed rate: %s" % (at_rate["failed"], at_rate["statuses"]))
if at_rate["missed"] > at_rate["rate"]:
    sys.exit("the server did not keep up with %d requests/s (%d missed): lower BENCH_ROUTER_RATE" % (at_rate["rate"], at_rate["missed"]))
print("%.1f %.3f %.3f %.1f %.1f %.3f" % (rps, p50, p99, (after - before) * tick / requests,
      (rate_after - rate_before) * tick / at_rate["requests"], 1000 * at_rate["latency_p50_seconds"]))' \
    "$WORK/wrk.txt" "$WORK/rate.json" "$before" "$after" "$TICK_US" "$requests" "$rate_before" "$rate_after" \
    "$(wrk_summary "$WORK/wrk.txt")" >> "$out"
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

python3 - "$WORK" "$base" "$new" "$BENCH_ROUTER_ROUNDS" "$BENCH_ROUTER_SECONDS" "$(date -u +"%Y-%m-%d %H:%M UTC")" "$WORK/section.md" "$BENCH_ROUTER_RATE" <<'PY'
import statistics, sys
work, base, new, rounds, seconds, date, out, rate = sys.argv[1:]
rows = lambda name: [list(map(float, l.split())) for l in open(f"{work}/{name}")]
col = lambda rs, i: [r[i] for r in rs]
old, cur = rows("old"), rows("new")
simple = [float(l) for l in open(f"{work}/simple")]
extended = [float(l) for l in open(f"{work}/extended")]
med = statistics.median
def spread(v):
    m = med(v)
    return "%.0f to %.0f (%+.1f %% to %+.1f %%)" % (min(v), max(v), 100 * (min(v) / m - 1), 100 * (max(v) / m - 1))
ratio = lambda a, b: 100 * med(a) / med(b)
# Paired by round: each round ran both, one after the other.
paired = [100 * (n / o - 1) for n, o in zip(col(cur, 0), col(old, 0))]
cpu_paired = [100 * (n / o - 1) for n, o in zip(col(cur, 3), col(old, 3))]
rate_paired = [100 * (n / o - 1) for n, o in zip(col(cur, 4), col(old, 4))]
verdict = lambda v: "met" if abs(med(v)) <= 3 else "missed"
lines = [
    "<!-- router benchmark: scripts/bench-router.sh -->",
    "## 14. The router layer",
    "",
    f"Written by `make bench-router` (scripts/bench-router.sh) on {date}, commit {new}, same machine.",
    f"`GET /row/` with `wrk -t2 -c64 -d{seconds}s --latency` against one `tidepool web` (release build, a pool",
    "of 20 connections to PgBouncer in transaction mode with 20 server connections): the demo as an",
    f"application (an axum Router behind Tidepool's server, commit {new}) beside the hand-written router",
    f"of commit {base}, alternating in each of {rounds} rounds (the order flips every round), after a 2 s",
    "warm-up each. CPU per request is the web process's user and system time over the run (from",
    "`/proc`) divided by the requests it answered. Then, on the same server, `tidepool-loadgen rate",
    f"--rate {rate} --connections 64 --duration {seconds}s` (after a 2 s warm-up): the same load for both,",
    "so their CPU per request is compared at equal throughput (at saturation it also depends on how",
    "many requests each wake-up finds, which moves with the throughput itself). pgbench runs the same",
    "`SELECT` through the same PgBouncer in the same rounds",
    f"(`pgbench -n -M simple|extended -c 64 -j 2 -T {seconds}`).",
    "",
    f"| server | requests/s (median) | runs: min to max | p50 | p99 | CPU µs per request | at {rate}/s: CPU µs per request | at {rate}/s: p50 |",
    "|---|---|---|---|---|---|---|---|",
    "| hand-written router (%s) | %.0f | %s | %.2f ms | %.2f ms | %.1f | %.1f | %.2f ms |" % (base, med(col(old, 0)), spread(col(old, 0)), med(col(old, 1)), med(col(old, 2)), med(col(old, 3)), med(col(old, 4)), med(col(old, 5))),
    "| axum Router behind Tidepool (%s) | %.0f | %s | %.2f ms | %.2f ms | %.1f | %.1f | %.2f ms |" % (new, med(col(cur, 0)), spread(col(cur, 0)), med(col(cur, 1)), med(col(cur, 2)), med(col(cur, 3)), med(col(cur, 4)), med(col(cur, 5))),
    "| pgbench, simple protocol | %.0f | %s | | | | | |" % (med(simple), spread(simple)),
    "| pgbench, extended protocol | %.0f | %s | | | | | |" % (med(extended), spread(extended)),
    "",
    "- The router layer at saturation: the new server answers **%.1f %%** of the old one's requests per" % ratio(col(cur, 0), col(old, 0)),
    "  second (medians); round by round the difference runs from %+.1f %% to %+.1f %% (median %+.1f %%), and" % (min(paired), max(paired), med(paired)),
    "  the CPU time per request from %+.1f %% to %+.1f %% (median %+.1f %%). Goal within 3 %%: %s." % (min(cpu_paired), max(cpu_paired), med(cpu_paired), verdict(paired)),
    "- At the same %s requests/s: the new server's CPU time per request is **%+.1f %%** against the old one's" % (rate, med(rate_paired)),
    "  (paired median; round by round from %+.1f %% to %+.1f %%). Goal within 3 %%: %s." % (min(rate_paired), max(rate_paired), verdict(rate_paired)),
    "- Beside pgbench: `/row/` (HTTP, JSON, a pooled connection per request) reaches %.0f %% of pgbench's" % ratio(col(cur, 0), simple),
    "  transactions per second in the simple protocol and %.0f %% in the extended one, which is what" % ratio(col(cur, 0), extended),
    "  tokio-postgres sends; pgbench's extended protocol reaches %.0f %% of its simple one." % ratio(extended, simple),
    "",
    "<!-- end of the router benchmark -->",
    "",
    "",
]
open(out, "w").write("\n".join(lines))
PY
replace_report_section "$OUT" "$MARKER" "$END_MARKER" "$WORK/section.md"
say "14. written to docs/benchmarks.md"
