#!/usr/bin/env bash
# Tidepool's web benchmarks. Writes docs/benchmarks.md (and plots in
# docs/img/) with the machine, the commands and the numbers:
#   1. the seed's experiment: ab -n 10 -c 10 against /slow-query/ (5 s), and
#      the same ten requests started all at once;
#   2. scaled: 1,000 one-second slow queries at once through 20 server
#      connections, sampling PostgreSQL's connections;
#   3. /row/ with wrk next to pgbench running the same query through the same
#      PgBouncer with the same client count, alternating in one run;
#   4. memory: RSS idle, and with 10,000 idle keep-alive connections;
#   5. the Kubernetes test control plane: start times, and with
#      BENCH_KUBE_COLD=1 the cold build of its tools (empty Go module, build
#      and tool caches; takes minutes);
#   6.-8. the task queue: scripts/bench-tasks.sh;
#   9. the operator at scale: scripts/bench-operator.sh;
#   10. the real node: scripts/bench-node.sh;
#   11. end to end on the real node: scripts/bench-e2e.sh.
#   12. the "Tidepool" dashboard drawn from real data (docs/img/):
#       scripts/bench-dashboards.sh;
#   13. scaling (a backlog to the target replicas, a load near a
#       threshold, both tiers on the real node): scripts/bench-autoscaling.sh;
#   16. the shop's POST /orders with and without its receipt job, orders to
#       receipts: scripts/bench-shop.sh;
#   17. the Django + Celery example on the real node beside its image's
#       processes on loopback and the Tidepool app: scripts/bench-django.sh;
#   18. /row/ with verify-full beside plaintext: scripts/bench-tls.sh;
#   19. a password rotation under load on the real node:
#       scripts/bench-rotation.sh;
#   20. CloudNativePG's PostgreSQL 17 beside the host's 15, its instance
#       restarted under load: scripts/bench-cloudnative-pg.sh;
#   21. periodic tasks: occurrence to job start, what schedule checks cost
#       PostgreSQL, no-op jobs/s beside schedules: scripts/bench-periodic.sh.
# (14, the router layer beside an old commit's, is `make bench-router`.)
# All traffic goes to loopback (and, for 10-11, to the test cluster inside
# the real node's network namespace); every step is bounded in time.
# BENCH_REPEATS (3) and BENCH_SECONDS (15) size the alternating runs;
# BENCH_WEB_ONLY=1 (`make bench-web`) runs 1 to 5 only.
set -euo pipefail
# The web sections measure one process behind 20 server connections.
export TIDEPOOL_POOLER_POOL_SIZE=${TIDEPOOL_POOLER_POOL_SIZE:-20}
source "$(dirname "$0")/lib.sh"
load_local_plan
cd "$REPO_ROOT"

: "${BENCH_REPEATS:=3}"
: "${BENCH_SECONDS:=15}"
WEB=http://127.0.0.1:$TIDEPOOL_WEB_PORT
OUT=$REPO_ROOT/docs/benchmarks.md
IMG=$REPO_ROOT/docs/img
WORK=$(mktemp -d)
mkdir -p "$IMG"
trap 'stop_connection_sampler; kill "${IDLE:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

web_pid() { head -n 1 "$TIDEPOOL_STATE_DIR/run/web.pid"; }
rss_mb() { awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# Restarts `tidepool web` with the given environment (VAR=value ...).
restart_web() {
  "$REPO_ROOT/scripts/stack.sh" down web
  env "$@" "$REPO_ROOT/scripts/stack.sh" up web
}

# No worker polling in the background, and a pooler of the size above.
"$REPO_ROOT/scripts/stack.sh" down worker web pooler
"$REPO_ROOT/scripts/stack.sh" up postgres pooler web

# --- 1. The seed's experiment -------------------------------------------
say "1. seed experiment: ab and all-at-once, $BENCH_REPEATS times each, alternating"
restart_web
ab_totals=(); burst_totals=(); ab_failed=0; burst_failed=0
for i in $(seq 1 "$BENCH_REPEATS"); do
  ab -n 10 -c 10 "$WEB/slow-query/" > "$WORK/ab.txt" 2>&1
  ab_totals+=("$(ab_total_seconds "$WORK/ab.txt")")
  ab_failed=$(( ab_failed + $(ab_failed_requests "$WORK/ab.txt") ))
  "$TIDEPOOL_LOADGEN_BIN" burst --requests 10 --url "$WEB/slow-query/" > "$WORK/burst.json"
  burst_totals+=("$(json_field "$WORK/burst.json" total_seconds)")
  burst_failed=$(( burst_failed + $(json_field "$WORK/burst.json" failed) ))
done
ab_median=$(median "${ab_totals[@]}")
burst_median=$(median "${burst_totals[@]}")

# --- 2. Scaled: 1,000 x 1 s through 20 server connections -----------------
say "2. scaled: 1,000 x /slow-query/?seconds=1 at once, 20 server connections"
restart_web TIDEPOOL_DB_POOL_WAIT=120s TIDEPOOL_MAX_IN_FLIGHT=2000
start_connection_sampler "$WORK/samples.txt"
"$TIDEPOOL_LOADGEN_BIN" burst --requests 1000 --url "$WEB/slow-query/?seconds=1" \
  --timeout 180s --timeline "$WORK/timeline.txt" > "$WORK/scaled.json"
stop_connection_sampler
awk 'NR == 1 {t0 = $1} {printf "%.2f %s\n", $1 - t0, $2}' "$WORK/samples.txt" > "$WORK/connections.txt"
scaled_total=$(py 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["total_seconds"])' "$WORK/scaled.json")
scaled_failed=$(json_field "$WORK/scaled.json" failed)
scaled_peak=$(sampled_peak "$WORK/samples.txt")
scaled_ideal=$(( (1000 + TIDEPOOL_POOLER_POOL_SIZE - 1) / TIDEPOOL_POOLER_POOL_SIZE ))
scaled_over=$(py "print('%.1f' % (100 * ($scaled_total / $scaled_ideal - 1)))")
sort -n "$WORK/timeline.txt" | awk '{n++; print $1, n}' > "$WORK/completions.txt"
gnuplot <<PLOT
set terminal pngcairo size 900,420 font "sans,10"
set output "$IMG/scaled-1000.png"
set title "1,000 one-second slow queries at once, one tidepool web, PgBouncer with ${TIDEPOOL_POOLER_POOL_SIZE} server connections"
set xlabel "seconds since the burst started"
set ylabel "requests completed"
set y2label "PostgreSQL server connections (app role)"
set y2tics
set ytics nomirror
set y2range [0:$(( TIDEPOOL_POOLER_POOL_SIZE * 2 ))]
set key left top
set grid
plot "$WORK/completions.txt" using 1:2 with lines lw 2 title "completed", \
     "$WORK/connections.txt" using 1:2 axes x1y2 with steps lw 1 title "server connections (sampled every 100 ms)"
PLOT

# --- 3. /row/: wrk next to pgbench ------------------------------------------
say "3. /row/ with wrk vs the same query with pgbench, 64 clients, $BENCH_REPEATS x ${BENCH_SECONDS}s each, alternating"
restart_web
cat > "$WORK/row.sql" <<'SQL'
\set id random(1, 10000)
SELECT id, randomnumber FROM world WHERE id = :id;
SQL
wrk_rps=(); wrk_p50=(); wrk_p99=(); pgb_tps=(); pgb_p50=(); pgb_p99=(); wrk_errors=0
for i in $(seq 1 "$BENCH_REPEATS"); do
  wrk -t2 -c64 -d"${BENCH_SECONDS}s" --latency "$WEB/row/" > "$WORK/wrk.txt"
  read -r rps p50 p99 < <(wrk_summary "$WORK/wrk.txt")
  wrk_rps+=("$rps"); wrk_p50+=("$p50"); wrk_p99+=("$p99")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$WORK/wrk.txt"); wrk_errors=$(( wrk_errors + ${non2xx:-0} ))
  rm -f "$WORK"/pgbench_log.*
  (cd "$WORK" && PGPASSWORD=$(secret app.password) pgbench -n -M simple -c 64 -j 2 -T "$BENCH_SECONDS" \
     -h 127.0.0.1 -p "$TIDEPOOL_POOLER_PORT" -U "$APP_USER" -f row.sql -l --log-prefix=pgbench_log "$APP_DB" > pgbench.txt 2>&1)
  pgb_tps+=("$(awk '/^tps = / {print $3}' "$WORK/pgbench.txt")")
  read -r p50 p99 < <(cat "$WORK"/pgbench_log.* | bench_report pgbench-latency)
  pgb_p50+=("$p50"); pgb_p99+=("$p99")
done
row_rps=$(median "${wrk_rps[@]}"); row_p50=$(median "${wrk_p50[@]}"); row_p99=$(median "${wrk_p99[@]}")
pgb_tps_median=$(median "${pgb_tps[@]}"); pgb_p50_median=$(median "${pgb_p50[@]}"); pgb_p99_median=$(median "${pgb_p99[@]}")
row_ratio=$(py "print('%.0f' % (100 * $row_rps / $pgb_tps_median))")

# --- 4. Memory ----------------------------------------------------------------
say "4. memory: idle, then 10,000 idle keep-alive connections"
restart_web TIDEPOOL_HEADER_READ_TIMEOUT=600s
curl -fsS "$WEB/row/" > /dev/null
rss_idle=$(rss_mb "$(web_pid)")
"$TIDEPOOL_LOADGEN_BIN" idle --connections 10000 --url "$WEB/healthz" --hold 120s \
  --ready-file "$WORK/idle.ready" > "$WORK/idle.json" &
IDLE=$!
wait_until "[ -s $WORK/idle.ready ] || ! kill -0 $IDLE" 150 "10,000 idle connections"
idle_open=$(cat "$WORK/idle.ready")
rss_10k=$(rss_mb "$(web_pid)")
kill -INT "$IDLE" 2>/dev/null || true
wait "$IDLE" 2>/dev/null || true
IDLE=
idle_failed=$(json_field "$WORK/idle.json" failed)
per_connection_kb=$(py "print('%.1f' % (($rss_10k - $rss_idle) * 1024 / $idle_open))")
restart_web

# --- 5. Kubernetes test control plane -----------------------------------------
say "5. Kubernetes test control plane"
KUBE_STATE=$WORK/kube-state
if [ "${BENCH_KUBE_COLD:-0}" = 1 ]; then
  say "   cold build of the Kubernetes tools into empty caches"
  cold=$WORK/cold
  started=$SECONDS
  GOCACHE=$cold/gocache GOMODCACHE=$cold/gomod TIDEPOOL_KUBE_CACHE=$cold/tools \
    "$REPO_ROOT/scripts/kube-build.sh" 2> "$WORK/kube-cold.log" > /dev/null
  kube_cold_total=$(( SECONDS - started ))
  kube_cold_detail=$(sed -n 's/^==> built \(.*\) in \([0-9]*\) s$/\1: \2 s/p' "$WORK/kube-cold.log" | paste -sd ';' - | sed 's/;/; /g')
  chmod -R u+w "$cold" && rm -rf "$cold"
fi
"$REPO_ROOT/scripts/kube-build.sh" > /dev/null 2>&1
started=$(date +%s.%N)
TIDEPOOL_KUBE_NODE=0 TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" up > /dev/null 2>&1
kube_fresh=$(py "import time; print('%.1f' % (time.time() - $started))")
TIDEPOOL_KUBE_NODE=0 TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" down
started=$(date +%s.%N)
TIDEPOOL_KUBE_NODE=0 TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" up > /dev/null 2>&1
kube_warm=$(py "import time; print('%.1f' % (time.time() - $started))")
TIDEPOOL_KUBE_NODE=0 TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" down

if [ -n "${kube_cold_total:-}" ]; then
  kube_cold_line="Cold build of every tool (\`scripts/kube-build.sh\` with empty Go module, build and tool caches, so modules were downloaded too): **${kube_cold_total} s** ($kube_cold_detail). A warm machine builds nothing."
else
  kube_cold_line="The cold build of the tools was not measured in this run (\`BENCH_KUBE_COLD=1 make bench\` measures it)."
fi

# --- Report -------------------------------------------------------------------
cpu=$(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}')
cat > "$WORK/web.md" <<REPORT
<!-- web benchmarks: scripts/bench.sh -->
# Benchmarks

Written by \`make bench\` (scripts/bench.sh) on $(date -u +"%Y-%m-%d %H:%M UTC"), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown).
Figures are medians of $BENCH_REPEATS runs where runs repeat; compared tools ran alternately in the same run.

## Machine

| | |
|---|---|
| CPU | $cpu, $(nproc) cores |
| memory | $(free -g | awk '/^Mem:/ {print $2}') GiB |
| kernel | $(uname -r) |
| PostgreSQL | $("$(pg_bindir)/postgres" --version | awk '{print $3}') (max_connections $TIDEPOOL_PG_MAX_CONNECTIONS, default durability) |
| PgBouncer | $(pgbouncer --version 2>/dev/null | awk 'NR==1 {print $2}'), transaction mode, $TIDEPOOL_POOLER_POOL_SIZE server connections (\`max_db_connections\`) |
| tidepool web | release build, one process, pool of $TIDEPOOL_DB_POOL_SIZE client connections to PgBouncer |
| clients | ab $(ab -V | awk 'NR==1 {print $5}'), $(wrk -v 2>&1 | awk 'NR==1 {print $1, $2}'), pgbench $(pgbench --version | awk '{print $3}'), tidepool-loadgen |

Everything (PostgreSQL, PgBouncer, tidepool web and the load generator) shares
the same two cores, so these figures include the clients' own CPU use.

## 1. The seed's experiment

\`ab -n 10 -c 10 $WEB/slow-query/\` against one \`tidepool web\` process
(each request runs \`SELECT pg_sleep(5)\`), and the same ten requests started
at once with \`tidepool-loadgen burst --requests 10 --url $WEB/slow-query/\`.

| client | total (median) | runs | failed | target | |
|---|---|---|---|---|---|
| all ten at once | ${burst_median} s | $(runs "${burst_totals[@]}") | $burst_failed | ≤ 5.2 s | $(verdict "$burst_median <= 5.2") |
| ab 2.3 | ${ab_median} s | $(runs "${ab_totals[@]}") | $ab_failed | ≤ 10.2 s | $(verdict "$ab_median <= 10.2") |

ab 2.3 opens one connection, waits for its response, and only then opens the
other nine: its total is two query times (about 10 s) whatever the server
does. The all-at-once client shows the server running all ten at once.

## 2. Scaled: 1,000 slow queries through 20 server connections

\`tidepool-loadgen burst --requests 1000 --url "$WEB/slow-query/?seconds=1"\`
against one process with \`TIDEPOOL_DB_POOL_WAIT=120s TIDEPOOL_MAX_IN_FLIGHT=2000\`
(so none is shed), PgBouncer \`max_db_connections = $TIDEPOOL_POOLER_POOL_SIZE\`,
and \`pg_stat_activity\` sampled every 100 ms for the application role.

| figure | measured | target | |
|---|---|---|---|
| total | ${scaled_total} s | within 5 % of ceil(1000/$TIDEPOOL_POOLER_POOL_SIZE) = ${scaled_ideal} s | ${scaled_over} % over: $(verdict "$scaled_total <= $scaled_ideal * 1.05") |
| failed requests | $scaled_failed | 0 | $(verdict "$scaled_failed == 0") |
| peak PostgreSQL server connections | $scaled_peak | ≤ $TIDEPOOL_POOLER_POOL_SIZE | $(verdict "$scaled_peak <= $TIDEPOOL_POOLER_POOL_SIZE") |

![completions and server connections over time](img/scaled-1000.png)

Requests complete in steps of $TIDEPOOL_POOLER_POOL_SIZE per second while
PostgreSQL never sees more than $TIDEPOOL_POOLER_POOL_SIZE connections of the
application: the other 980 wait in the web process, bounded and measured
(\`tidepool_db_pool_wait_seconds\`), not in PostgreSQL.

## 3. \`/row/\` next to pgbench

Alternating $BENCH_REPEATS times, ${BENCH_SECONDS} s each, 64 clients, the
same query (\`SELECT id, randomnumber FROM world WHERE id = \$1\`, random id)
through the same PgBouncer:

- \`wrk -t2 -c64 -d${BENCH_SECONDS}s --latency $WEB/row/\`
- \`pgbench -n -M simple -c 64 -j 2 -T $BENCH_SECONDS -f row.sql\` (simple protocol, \`\\set id random(1, 10000)\`), latency percentiles from its \`-l\` log

| | per second (median) | runs | p50 | p99 |
|---|---|---|---|---|
| tidepool web /row/ (HTTP, JSON) | ${row_rps} | $(runs "${wrk_rps[@]}") | ${row_p50} ms | ${row_p99} ms |
| pgbench (same query, same PgBouncer) | ${pgb_tps_median} | $(runs "${pgb_tps[@]}") | ${pgb_p50_median} ms | ${pgb_p99_median} ms |

tidepool web reaches **${row_ratio} %** of pgbench's transactions per second
(target ≥ 70 %: $(verdict "$row_ratio >= 70")); non-2xx responses: $wrk_errors.

## 4. Memory

| figure | measured | target | |
|---|---|---|---|
| RSS, idle (after start-up and one request) | ${rss_idle} MB | ≤ 30 MB | $(verdict "$rss_idle <= 30") |
| RSS with ${idle_open} idle keep-alive connections (each made one request) | ${rss_10k} MB | ≤ 150 MB | $(verdict "$rss_10k <= 150") |

\`tidepool-loadgen idle --connections 10000 --url $WEB/healthz\` with
\`TIDEPOOL_HEADER_READ_TIMEOUT=600s\` (the header timeout is also the idle
keep-alive timeout); RSS from \`/proc/<pid>/status\`. Connections that failed
to open: $idle_failed. That is about ${per_connection_kb} KB per idle connection:
hyper's 8 KB read buffer and 8 KB header buffer (of which only the first page
is touched), its connection state (1.6 KB) and the slot it keeps for the
request handler's future, which is why the route dispatch is boxed (a 4.7 KB
future kept per connection put the 10,000-connection figure at 167 MB), and
the task that serves the connection, whose future holds the connection once
(through \`FutureExt::map\`; an \`async\` block around it holds it twice, as a
capture and as what it awaits, about 2 KB more per connection).

## 5. The Kubernetes test control plane

\`scripts/kube.sh up\` until the API server is ready, the kwok node is Ready
and the default service account exists, with the tools already built:

| start | seconds |
|---|---|
| fresh state (new certificates, empty etcd) | $kube_fresh |
| warm (state kept from a previous start) | $kube_warm |

$kube_cold_line

<!-- end of web benchmarks -->
REPORT
# In place of their last run: the sections of the other scripts, and what
# was measured by hand between them, stay.
replace_report_section "$OUT" "<!-- web benchmarks: scripts/bench.sh -->" "<!-- end of web benchmarks -->" "$WORK/web.md"
say "wrote the web sections of $OUT"
# `make bench-web`: these sections alone.
[ -z "${BENCH_WEB_ONLY:-}" ] || exit 0
"$REPO_ROOT/scripts/bench-tasks.sh"
"$REPO_ROOT/scripts/bench-operator.sh"
"$REPO_ROOT/scripts/bench-node.sh"
"$REPO_ROOT/scripts/bench-e2e.sh"
"$REPO_ROOT/scripts/bench-dashboards.sh"
"$REPO_ROOT/scripts/bench-autoscaling.sh"
# The shop's stack runs on the local stack's ports: the one bench-tasks.sh
# leaves up stops first.
"$REPO_ROOT/scripts/stack.sh" down
"$REPO_ROOT/scripts/bench-shop.sh"
"$REPO_ROOT/scripts/bench-periodic.sh"
"$REPO_ROOT/scripts/bench-django.sh"
"$REPO_ROOT/scripts/bench-tls.sh"
"$REPO_ROOT/scripts/bench-rotation.sh"
"$REPO_ROOT/scripts/bench-cloudnative-pg.sh"
