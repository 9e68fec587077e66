#!/usr/bin/env bash
# TLS to PostgreSQL: section 18 of docs/benchmarks.md (`make bench-tls`).
#
# `GET /row/` through two PgBouncers that differ only in
# `server_tls_sslmode`: one `verify-full` with the test CA
# (service/tests/fixtures/tls), one `disable`, each in front of the same
# PostgreSQL (TLS-only for every address but loopback's plaintext line this
# script adds), each with its own `tidepool web`, alternating,
# BENCH_TLS_ROUNDS (7) rounds of BENCH_TLS_SECONDS (10 s): wrk with 64
# connections (as many requests as the pair answers), then
# `tidepool-loadgen rate` at BENCH_TLS_RATE (3,000) requests/s over 64
# connections (latency at the same load, and PgBouncer's CPU time per
# request, where the encryption is). Both PgBouncers keep their 20 server connections open
# (min_pool_size), as the pods' sidecars do, so what is measured is
# encryption per query, not handshakes. A state folder and ports of its
# own; everything on loopback, every run bounded in time.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_TLS_ROUNDS:=7}"
: "${BENCH_TLS_SECONDS:=10}"
: "${BENCH_TLS_RATE:=3000}"
OUT=$REPO_ROOT/docs/benchmarks.md
WORK=$(mktemp -d)
export TIDEPOOL_STATE_DIR=$TIDEPOOL_STATE_DIR/bench-tls
export TIDEPOOL_PG_PORT=25432 TIDEPOOL_POOLER_PORT=26432 TIDEPOOL_WEB_PORT=28000 TIDEPOOL_WORKER_PORT=28001
export TIDEPOOL_POOLER_POOL_SIZE=20 TIDEPOOL_POOLER_MIN_POOL_SIZE=20 TIDEPOOL_DB_POOL_SIZE=20
PLAIN_POOLER_PORT=26433 PLAIN_WEB_PORT=28002
PLAIN_DIR=$TIDEPOOL_STATE_DIR/pgbouncer-plain
stop_all() {
  local pid
  for pid in "$PLAIN_DIR/web.pid" "$PLAIN_DIR/pgbouncer.pid"; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  "$REPO_ROOT/scripts/stack.sh" down web pooler postgres >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap stop_all EXIT
command -v wrk >/dev/null || die "wrk is not installed (run: scripts/install-deps.sh bench)"
[ -x "$TIDEPOOL_LOADGEN_BIN" ] || die "tidepool-loadgen is not built (run: make build)"

say "18. a TLS-only PostgreSQL and PgBouncer with verify-full (scripts/stack.sh, TIDEPOOL_PG_TLS_DIR)"
TIDEPOOL_PG_TLS_DIR=$REPO_ROOT/service/tests/fixtures/tls "$REPO_ROOT/scripts/stack.sh" up postgres pooler web > "$WORK/stack.log" 2>&1 \
  || die "the stack did not start: $(tail -n 5 "$WORK/stack.log")"
# Plaintext from loopback too, for the second PgBouncer (hostssl lines
# come first: a TLS connection still matches them).
line="host all all 127.0.0.1/32 scram-sha-256"
grep -qxF "$line" "$TIDEPOOL_STATE_DIR/postgres/pg_hba.conf" || echo "$line" >> "$TIDEPOOL_STATE_DIR/postgres/pg_hba.conf"
psql_super -d postgres -c "SELECT pg_reload_conf()" >/dev/null

say "the same PgBouncer with server_tls_sslmode=disable on port $PLAIN_POOLER_PORT, and a tidepool web on $PLAIN_WEB_PORT"
mkdir -p "$PLAIN_DIR"
[ "$(id -u)" -ne 0 ] || chown "$TIDEPOOL_RUN_AS:" "$PLAIN_DIR"
plain_url=$(printf 'postgres://%s:%s@127.0.0.1:%s/%s?sslmode=disable' "$APP_USER" "$(secret app.password)" "$TIDEPOOL_PG_PORT" "$APP_DB")
TIDEPOOL_POOLER_UPSTREAM_URL=$plain_url as_service_user "$TIDEPOOL_BIN" pooler-config --out-dir "$PLAIN_DIR" \
  --listen "127.0.0.1:$PLAIN_POOLER_PORT" --pool-size 20 --min-pool-size 20 --max-client-conn 1000 >/dev/null
as_service_user_detached "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" "$PLAIN_DIR/pgbouncer.ini" \
  </dev/null >>"$PLAIN_DIR/pgbouncer.log" 2>&1 &
echo $! > "$PLAIN_DIR/pgbouncer.pid"
wait_until "port_in_use $PLAIN_POOLER_PORT" 30 "the plaintext PgBouncer (see $PLAIN_DIR/pgbouncer.log)"
env DATABASE_URL="$(printf 'postgres://%s:%s@127.0.0.1:%s/%s' "$APP_USER" "$(secret app.password)" "$PLAIN_POOLER_PORT" "$APP_DB")" \
  TIDEPOOL_LISTEN="127.0.0.1:$PLAIN_WEB_PORT" TIDEPOOL_DB_POOL_SIZE=20 TIDEPOOL_DRAIN_DELAY=0s \
  setsid "$TIDEPOOL_BIN" web </dev/null >>"$PLAIN_DIR/web.log" 2>&1 &
echo $! > "$PLAIN_DIR/web.pid"
wait_until "curl -fsS http://127.0.0.1:$PLAIN_WEB_PORT/readyz" 30 "the plaintext tidepool web (see $PLAIN_DIR/web.log)"

# Server connections of the app's role, encrypted and not: "ssl plain".
backends() {
  psql_super -d postgres -At -F ' ' -c "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
    FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = '$APP_USER'"
}

# Against web port $1, whose PgBouncer's pid is in file $3: a wrk run,
# then one at BENCH_TLS_RATE requests/s; appends "rps p50_ms p99_ms
# rate_p50_ms rate_p99_ms pgbouncer_cpu_us_per_request" to $2.
run() {
  local url=http://127.0.0.1:$1/row/ pgbouncer before after
  pgbouncer=$(cat "$3")
  wrk -t2 -c64 -d2s "$url" > /dev/null  # warm: connections, caches
  wrk -t2 -c64 -d"${BENCH_TLS_SECONDS}s" --latency "$url" > "$WORK/wrk.txt"
  grep -q "Non-2xx" "$WORK/wrk.txt" && die "non-2xx answers on port $1: $(grep Non-2xx "$WORK/wrk.txt")"
  before=$(cpu_ticks "$pgbouncer")
  "$TIDEPOOL_LOADGEN_BIN" rate --url "$url" --rate "$BENCH_TLS_RATE" --connections 64 \
    --duration "${BENCH_TLS_SECONDS}s" > "$WORK/rate.json"
  after=$(cpu_ticks "$pgbouncer")
  local failed requests
  failed=$(bench_report json "$WORK/rate.json" failed)
  requests=$(bench_report json "$WORK/rate.json" requests)
  [ "$failed" = 0 ] || die "$failed failed requests at $BENCH_TLS_RATE/s on port $1"
  echo "$(wrk_summary "$WORK/wrk.txt") $(awk -v a="$(bench_report json "$WORK/rate.json" latency_p50_seconds)" \
    -v b="$(bench_report json "$WORK/rate.json" latency_p99_seconds)" -v cpu=$(( (after - before) * TICK_US )) -v n="$requests" \
    'BEGIN {printf "%.3f %.3f %.1f", a * 1000, b * 1000, cpu / n}')" >> "$2"
}

say "/row/ through verify-full and through plaintext, $BENCH_TLS_ROUNDS rounds of ${BENCH_TLS_SECONDS}s each, alternating"
for round in $(seq 1 "$BENCH_TLS_ROUNDS"); do
  if (( round % 2 )); then order=(tls plain); else order=(plain tls); fi
  for variant in "${order[@]}"; do
    if [ "$variant" = tls ]; then
      run "$TIDEPOOL_WEB_PORT" "$WORK/tls" "$TIDEPOOL_STATE_DIR/run/pgbouncer.pid"
    else
      run "$PLAIN_WEB_PORT" "$WORK/plain" "$PLAIN_DIR/pgbouncer.pid"
    fi
  done
  say "round $round/$BENCH_TLS_ROUNDS: verify-full $(tail -n 1 "$WORK/tls"), plaintext $(tail -n 1 "$WORK/plain") (requests/s p50 p99, at the rate p50 p99, PgBouncer's µs a request)"
done
read -r ssl plain < <(backends)
tls_version=$(psql_super -d postgres -At -c "SELECT string_agg(DISTINCT s.version || ' ' || s.cipher, ', ') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.usename = '$APP_USER'")
(( ssl >= 20 && plain >= 20 )) || die "expected 20 encrypted and 20 plaintext server connections, found $ssl and $plain"

column() { awk -v c="$1" '{print $c}' "$2"; }
tls_rps=$(DECIMALS=0 median $(column 1 "$WORK/tls")) plain_rps=$(DECIMALS=0 median $(column 1 "$WORK/plain"))
ratios=$(paste "$WORK/tls" "$WORK/plain" | awk '{printf "%s%.4f", (NR > 1 ? ", " : ""), $1 / $7}')
ratio=$(DECIMALS=4 median ${ratios//,/})
of_medians=$(awk -v a="$(DECIMALS=4 median $(column 1 "$WORK/tls"))" -v b="$(DECIMALS=4 median $(column 1 "$WORK/plain"))" \
  'BEGIN {printf "%.4f", a / b}')
cost=$(awk -v r="$ratio" 'BEGIN {printf "%.1f", (1 - r) * 100}')
{
  echo "<!-- tls benchmark: scripts/bench-tls.sh -->"
  echo "## 18. TLS to PostgreSQL"
  echo
  echo "Measured $(date -u +"%Y-%m-%d %H:%M UTC") at commit $(git rev-parse --short HEAD) by \`scripts/bench-tls.sh\` (\`make bench-tls\`) on loopback: \`GET /row/\` (one \`SELECT\` by primary key) through two PgBouncers $(pgbouncer --version 2>/dev/null | head -n 1 | awk '{print $2}') that differ only in \`server_tls_sslmode\`, \`verify-full\` with the test CA and \`disable\`, in front of one PostgreSQL $(psql_super -d postgres -At -c 'SHOW server_version' | cut -d' ' -f1) (\`$tls_version\`, a P-256 certificate), each behind its own \`tidepool web\` (pool 20); both keep their 20 server connections open (\`min_pool_size\`), as the pods' sidecars do. $BENCH_TLS_ROUNDS rounds of ${BENCH_TLS_SECONDS} s, alternating which goes first, \`wrk -t2 -c64 --latency\` after 2 s of warming; at the end $ssl server connections were encrypted and $plain not (\`pg_stat_ssl\`)."
  echo
  echo "| | requests/s (median) | runs | p50 | p99 | at $BENCH_TLS_RATE/s: p50 | p99 | PgBouncer's CPU a request |"
  echo "|---|---|---|---|---|---|---|---|"
  for variant in tls plain; do
    name='`verify-full`'
    [ "$variant" = tls ] || name=plaintext
    f=$WORK/$variant
    echo "| $name | $(DECIMALS=0 median $(column 1 "$f")) | $(DECIMALS=0 runs $(column 1 "$f")) | $(median $(column 2 "$f")) ms | $(median $(column 3 "$f")) ms | $(median $(column 4 "$f")) ms | $(median $(column 5 "$f")) ms | $(DECIMALS=1 median $(column 6 "$f")) µs |"
  done
  echo
  echo "\`verify-full\` against plaintext, paired by round: **$ratio** of the requests per second (median of the rounds' ratios: $ratios), a cost of $cost % at saturation (the issue's goal: at most 3 %); the ratio of the medians is $of_medians. Latencies are medians of the rounds' percentiles. The handshake is paid once per server connection, when PgBouncer opens it; what remains is encryption per query, most of it in PgBouncer, which is single-threaded: at saturation on this machine's $(nproc) cores, shared by wrk, both webs, both PgBouncers and PostgreSQL, its extra CPU time is requests not served."
  echo "<!-- end of the tls benchmark -->"
} > "$WORK/section.md"
replace_report_section "$OUT" "<!-- tls benchmark: scripts/bench-tls.sh -->" "<!-- end of the tls benchmark -->" "$WORK/section.md"
say "18. written to docs/benchmarks.md: verify-full $tls_rps requests/s, plaintext $plain_rps, ratio $ratio"
