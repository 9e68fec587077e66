#!/usr/bin/env bash
# The "Tidepool" dashboard, drawn from real data: section 12 of
# docs/benchmarks.md and docs/img/dashboard-tidepool.png. Run by
# scripts/bench.sh; alone (`make bench-dashboards`) it redraws the picture.
#
# The local stack (scripts/stack.sh, on ports of its own) is scraped every
# second by a Prometheus of its own (Debian's package, on loopback; web and
# worker labelled as the chart's PodMonitor labels pods: namespace and
# tidepool "local", tier) while a workload runs:
#   - 4 clients on /row/ the whole time;
#   - the seed's experiments: 10 x /slow-query/ (5 s) at once, then 100
#     slow_query jobs posted one by one to /tasks/ for the worker
#     (concurrency 50);
#   - an overload burst: 300 x /slow-query/?seconds=2 at once against a web
#     tier of concurrency 100 and a pool of 20 (shed for both reasons);
#   - 4 jobs whose queries are terminated: 2 with one attempt (dead), 2 with
#     three (retried).
# Then scripts/draw-dashboard.py runs each panel's queries over the run.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

OUT=$REPO_ROOT/docs/benchmarks.md
IMG=$REPO_ROOT/docs/img/dashboard-tidepool.png
MARKER='<!-- dashboard pictures: scripts/bench-dashboards.sh -->'
END_MARKER='<!-- end of dashboard pictures -->'
[ -x "$TIDEPOOL_BIN" ] && [ -x "$TIDEPOOL_LOADGEN_BIN" ] || die "the release binaries are not built (run: make build)"
command -v prometheus >/dev/null || die "prometheus is not installed (run: make deps)"
# Debian's Python, with Debian's matplotlib (not whatever python3 is first
# on the PATH).
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || die "python3-matplotlib is not installed (run: scripts/install-deps.sh bench)"
WORK=$(mktemp -d)
chmod 755 "$WORK"
PG_PORT=15671 POOLER_PORT=16471 WEB_PORT=18071 WORKER_PORT=18072 PROMETHEUS_PORT=19071
WEB=http://127.0.0.1:$WEB_PORT

local_stack() {
  TIDEPOOL_STATE_DIR=$WORK/local TIDEPOOL_PG_PORT=$PG_PORT TIDEPOOL_POOLER_PORT=$POOLER_PORT \
    TIDEPOOL_WEB_PORT=$WEB_PORT TIDEPOOL_WORKER_PORT=$WORKER_PORT "$REPO_ROOT/scripts/stack.sh" "$@"
}
prometheus_pid=
steady_stop=$WORK/steady.stop
cleanup() {
  touch "$steady_stop"
  [ -z "$prometheus_pid" ] || kill "$prometheus_pid" 2>/dev/null || true
  local_stack down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say "12. the local stack, scraped by Prometheus $(prometheus --version 2>&1 | awk 'NR==1 {print $3}')"
require_free_port "$PROMETHEUS_PORT" Prometheus
TIDEPOOL_MAX_IN_FLIGHT=100 local_stack up >/dev/null
cat > "$WORK/prometheus.yml" <<YAML
global: {scrape_interval: 1s, scrape_timeout: 1s}
scrape_configs:
  - job_name: tidepool-local
    static_configs:
      - {targets: ["127.0.0.1:$WEB_PORT"], labels: {namespace: local, tidepool: local, tier: web}}
      - {targets: ["127.0.0.1:$WORKER_PORT"], labels: {namespace: local, tidepool: local, tier: worker}}
YAML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus" \
  --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --log.level=warn > "$WORK/prometheus.log" 2>&1 &
prometheus_pid=$!
wait_until "curl -fsS http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 30 "Prometheus (see $WORK/prometheus.log)"
targets_up() {
  [ "$(curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/targets" | bench_report prometheus-targets-up)" = 2 ]
}
wait_until targets_up 30 "Prometheus to scrape web and worker"
# The value of the instant query $1 (empty when it has no series).
prom_value() {
  curl -fsS --get --data-urlencode "query=$1" "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query" | bench_report prometheus-value
}
# Whether Prometheus has scraped web and worker at or after the time $1.
scraped_since() { [ "$(prom_value "min(timestamp(up{job=\"tidepool-local\"})) >= $1")" != "" ]; }

local_psql() {
  PGPASSWORD=$(cat "$WORK/local/secrets/postgres.password") \
    psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$APP_DB" -c "$1"
}
app_url="postgres://$APP_USER:$(cat "$WORK/local/secrets/app.password")@127.0.0.1:$POOLER_PORT/$APP_DB"
sleeping="FROM pg_stat_activity WHERE usename = '$APP_USER' AND query LIKE '%pg_sleep%' AND state = 'active' AND pid <> pg_backend_pid()"

start=$(date +%s)
"$TIDEPOOL_LOADGEN_BIN" steady --url "$WEB/row/" --clients 4 --timeout 600s --request-timeout 10s \
  --stop-file "$steady_stop" > "$WORK/steady.json" &
steady_pid=$!
wait_until "scraped_since $(( start + 5 ))" 20 "a baseline of 5 s"
say "12. the seed's experiments"
"$TIDEPOOL_LOADGEN_BIN" burst --requests 10 --url "$WEB/slow-query/" > "$WORK/seed-burst.json"
for _ in $(seq 100); do
  curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' \
    -d '{"task": "slow_query", "args": {"seconds": 5}}' "$WEB/tasks/"
done
wait_until "[ \"\$(local_psql 'SELECT count(*) FROM tidepool_jobs')\" = 0 ]" 120 "the 100 jobs"
say "12. an overload burst and jobs that fail"
"$TIDEPOOL_LOADGEN_BIN" burst --requests 300 --url "$WEB/slow-query/?seconds=2" --timeout 60s > "$WORK/overload.json"
for attempts in 1 3; do
  DATABASE_URL=$app_url "$TIDEPOOL_BIN" enqueue slow_query --args '{"seconds": 60}' --count 2 \
    --max-attempts "$attempts" > /dev/null
  wait_until "[ \"\$(local_psql \"SELECT count(*) $sleeping\")\" = 2 ]" 30 "the jobs' queries to run"
  local_psql "SELECT count(pg_terminate_backend(pid)) $sleeping" > /dev/null
done
wait_until "[ \"\$(local_psql \"SELECT count(*) FROM tidepool_dead_jobs\")\" -ge 2 ]" 60 "the dead jobs"
# The retried jobs run again (60 s each): let the picture end when they do.
wait_until "[ \"\$(local_psql 'SELECT count(*) FROM tidepool_jobs')\" = 0 ]" 180 "the retried jobs"
touch "$steady_stop"
wait "$steady_pid"
end=$(( $(date +%s) + 3 ))
wait_until "scraped_since $end" 20 "the last scrapes"

drawn=$(/usr/bin/python3 "$REPO_ROOT/scripts/draw-dashboard.py" --dashboard charts/tidepool/files/dashboards/tidepool.json \
  --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" --start "$start" --end "$end" \
  --set namespace=local --set tidepool=local --set 'tier=web|worker' --out "$IMG")
say "$drawn"
shed=$(prom_value "sum by (reason) (tidepool_http_requests_shed_total{job=\"tidepool-local\"})")
in_flight_shed=$(prom_value "sum(tidepool_http_requests_shed_total{job=\"tidepool-local\",reason=\"in_flight_limit\"})")
pool_shed=$(prom_value "sum(tidepool_http_requests_shed_total{job=\"tidepool-local\",reason=\"db_pool_wait\"})")
[ -n "$shed" ] || die "no shed requests were scraped"
cat > "$WORK/section.md" <<SECTION
$MARKER
## 12. The "Tidepool" dashboard, drawn from real data

Run at $(date -u +"%Y-%m-%d %H:%M UTC") by \`scripts/bench-dashboards.sh\` (\`make bench-dashboards\`).
No Grafana runs here: \`scripts/draw-dashboard.py\` reads
\`charts/tidepool/files/dashboards/tidepool.json\`, runs every panel's queries
as range queries on a real Prometheus ($(prometheus --version 2>&1 | awk 'NR==1 {print $3}'), Debian's package, scraping
every second on loopback) and draws them, one plot per panel. The
Prometheus scrapes the local stack (scripts/stack.sh, sized by
scripts/local-tidepool.yaml; web with \`TIDEPOOL_MAX_IN_FLIGHT=100\`), its web
and worker labelled as the chart's PodMonitor labels pods (\`namespace\` and
\`tidepool\` "local", \`tier\`). The two panels from the operator (the budget and
the replicas) have no data without Kubernetes; the e2e test
\`the_dashboards_see_a_tidepool_under_load\` checks every panel, those two
included, on the real node.

The run, $(( end - start )) s: 4 clients on \`/row/\` throughout; the seed's
experiments (10 × \`/slow-query/\` at once: $(json_field "$WORK/seed-burst.json" total_seconds | cut -c1-4) s; then 100 \`slow_query\` (5 s) jobs
posted to \`/tasks/\` for one worker of concurrency 50: queue depth and oldest
age rise while 50 run); an overload burst of 300 × \`/slow-query/?seconds=2\`
($(json_field "$WORK/overload.json" succeeded) answered 200; $in_flight_shed requests shed for the concurrency and $pool_shed for the pool wait
over the run, the steady clients' included); then 4 jobs whose queries
were terminated: 2 with one attempt (dead), 2 with three (retried, then run
again to the end).

![the Tidepool dashboard over the run](img/dashboard-tidepool.png)

$END_MARKER
SECTION
replace_report_section "$OUT" "$MARKER" "$END_MARKER" "$WORK/section.md"
say "wrote section 12 of $OUT and $IMG"
