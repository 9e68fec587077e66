#!/usr/bin/env bash
# The shop's orders: section 16 of docs/benchmarks.md (`make bench-shop`).
#
# `POST /orders` (examples/shop) on the local stack, as the local plan sizes
# it (PgBouncer in transaction mode, `web` with a pool of 20, a `worker` of
# concurrency 50), in three variants alternating in BENCH_SHOP_ROUNDS (5)
# rounds of BENCH_SHOP_SECONDS (10 s):
#   write    the same handler writing the order alone, no receipt job
#            (examples/shop/examples/without_receipts.rs), the worker idle;
#   enqueue  the shop as it is, the order and its `send_receipt` job in one
#            transaction, the worker stopped (what the enqueue costs the
#            request, alone);
#   shop     the shop as it is with the worker sending receipts meanwhile
#            on the same two cores: requests per second and latency, then
#            orders to receipts (from the orders' own timestamps).
# Each variant starts on empty tables, warms up for 2 s, and is measured
# with wrk and 64 connections. In the same rounds pgbench sends the
# handlers' statements straight to the same PgBouncer (20 clients, the web
# pool), the write alone, with the job, and with the job but without the
# queue's NOTIFY trigger: where the cost is, without HTTP or the runtime. Everything on loopback, every wait bounded;
# the stack runs in a state folder of its own, removed at the end.
set -euo pipefail
# The local plan's sizes, also when run from bench.sh (which shrinks the pooler).
unset TIDEPOOL_POOLER_POOL_SIZE TIDEPOOL_POOLER_MIN_POOL_SIZE
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_SHOP_ROUNDS:=5}"
: "${BENCH_SHOP_SECONDS:=10}"
# The most a backlog may take to drain after a run before the run fails.
: "${BENCH_SHOP_DRAIN_LIMIT:=300}"
OUT=$REPO_ROOT/docs/benchmarks.md
WORK=$(mktemp -d)
for tool in wrk pgbench; do command -v "$tool" >/dev/null || die "$tool is not installed (run: scripts/install-deps.sh bench)"; done
[ -x "$TIDEPOOL_SHOP_BIN" ] || die "tidepool-shop is not built (run: make build)"
SHOP_BIN=$TIDEPOOL_SHOP_BIN
WRITE_BIN=$CARGO_TARGET_DIR/release/examples/without_receipts
say "building the baseline (examples/shop/examples/without_receipts.rs)"
cargo build --release --quiet -p tidepool-shop --example without_receipts

# A stack of its own: the shop's schema, not the demo's.
export TIDEPOOL_STATE_DIR=$TIDEPOOL_STATE_DIR/bench-shop
stack() { TIDEPOOL_BIN=$SHOP_BIN "$REPO_ROOT/scripts/stack.sh" "$@" >> "$WORK/stack.log" 2>&1 || die "stack.sh $*: $(tail -n 5 "$WORK/stack.log")"; }
cleanup() {
  "$REPO_ROOT/scripts/stack.sh" down worker web pooler postgres >/dev/null 2>&1 || true
  rm -rf "$TIDEPOOL_STATE_DIR" "$WORK"
}
trap cleanup EXIT
load_local_plan
stack up postgres pooler
WEB=http://127.0.0.1:$TIDEPOOL_WEB_PORT
sql() { psql_super -d "$APP_DB" -At -c "$1"; }

# An order of three lines, as a shop's client sends it.
cat > "$WORK/order.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"customer": "ada@example.com", "items": [{"sku": "TEA-1", "quantity": 2, "price_cents": 450}, {"sku": "CUP-7", "quantity": 1, "price_cents": 1200}, {"sku": "SPOON", "quantity": 4, "price_cents": 150}]}'
LUA

# The handlers' statements, as tokio-postgres sends them (extended protocol,
# unnamed), for pgbench: the order's INSERT, then (with the job) the queue's
# enqueue and the order's receipt_job in one transaction; then the answer.
ORDER_INSERT="INSERT INTO shop_order (customer, items, total_cents) VALUES ('ada@example.com', '[{\"sku\": \"TEA-1\", \"quantity\": 2, \"price_cents\": 450}]', 900) RETURNING id \\gset"
ORDER_SELECT="SELECT id, customer, items, total_cents, created_at, receipt_job, receipt_number, receipt_sent_at FROM shop_order WHERE id = :id;"
printf '%s\n' BEGIN\; "$ORDER_INSERT" COMMIT\; "$ORDER_SELECT" > "$WORK/write.sql"
printf '%s\n' BEGIN\; "$ORDER_INSERT" \
  "INSERT INTO tidepool_jobs (queue, task, args, priority, run_at, max_attempts) VALUES ('default', 'send_receipt', jsonb_build_object('order_id', :id::bigint), 0, now(), 3) RETURNING id AS job \\gset" \
  "UPDATE shop_order SET receipt_job = :job WHERE id = :id;" COMMIT\; "$ORDER_SELECT" \
  "SELECT id, state FROM tidepool_jobs WHERE id = :job UNION ALL SELECT id, 'succeeded' FROM tidepool_job_results WHERE id = :job LIMIT 1;" \
  > "$WORK/enqueue.sql"

# One pgbench run of script $1 (write, enqueue) on empty tables; appends
# its transactions per second to $WORK/pgbench-$2.
pgbench_run() {
  sql "TRUNCATE shop_order, tidepool_jobs RESTART IDENTITY" >/dev/null
  (cd "$WORK" && PGPASSWORD=$(secret app.password) pgbench -n -M extended -c 20 -j 2 -T "$BENCH_SHOP_SECONDS" \
     -h 127.0.0.1 -p "$TIDEPOOL_POOLER_PORT" -U "$APP_USER" -f "$1.sql" "$APP_DB" > pgbench.txt 2>&1) \
    || die "pgbench $1 failed: $(grep -m 3 -i error "$WORK/pgbench.txt")"
  awk '/^tps = / {print $3}' "$WORK/pgbench.txt" >> "$WORK/pgbench-$2"
}

# Waits until every order has its receipt, at most BENCH_SHOP_DRAIN_LIMIT s.
wait_receipts() {
  wait_until "[ \"\$(sql 'SELECT count(*) FROM shop_order WHERE receipt_sent_at IS NULL')\" = 0 ]" \
    "$BENCH_SHOP_DRAIN_LIMIT" "every order's receipt"
}

# One variant ($1: write, enqueue, shop); appends "rps p50_ms p99_ms" to
# $WORK/$1 and, for shop, the receipts' figures to $WORK/receipts.
run_variant() {
  local variant=$1 bin=$SHOP_BIN want
  [ "$variant" != write ] || bin=$WRITE_BIN
  stack down web worker
  sql "TRUNCATE shop_order, tidepool_jobs, tidepool_job_results, tidepool_dead_jobs RESTART IDENTITY" >/dev/null
  [ "$variant" = enqueue ] || stack up worker
  TIDEPOOL_BIN=$bin "$REPO_ROOT/scripts/stack.sh" up web >> "$WORK/stack.log" 2>&1 || die "web from $bin did not start: $(tail -n 5 "$WORK/stack.log")"
  wrk -t2 -c64 -d2s -s "$WORK/order.lua" "$WEB/orders" > /dev/null  # warm: connections, caches
  [ "$variant" != shop ] || wait_receipts
  local first
  first=$(sql "SELECT coalesce(max(id), 0) + 1 FROM shop_order")
  wrk -t2 -c64 -d"${BENCH_SHOP_SECONDS}s" --latency -s "$WORK/order.lua" "$WEB/orders" > "$WORK/wrk.txt"
  grep -q "Non-2xx" "$WORK/wrk.txt" && die "$variant: answers other than 201: $(grep Non-2xx "$WORK/wrk.txt")"
  wrk_summary "$WORK/wrk.txt" >> "$WORK/$variant"
  # Every order placed has its job, and the baseline's none.
  local orders jobs
  orders=$(sql "SELECT count(*) FROM shop_order")
  jobs=$(sql "SELECT count(*) FROM shop_order WHERE receipt_job IS NOT NULL")
  if [ "$variant" = write ]; then want=0; else want=$orders; fi
  [ "$jobs" = "$want" ] || die "$variant: $orders orders, $jobs with a receipt job (expected $want)"
  if [ "$variant" = shop ]; then
    wait_receipts
    # Seconds from the last order to its receipt, from the last order to
    # the last receipt, the median and p99 of every order's wait, the orders.
    sql "WITH o AS (SELECT created_at, receipt_sent_at AS sent FROM shop_order WHERE id >= $first),
              last AS (SELECT * FROM o ORDER BY created_at DESC LIMIT 1),
              waits AS (SELECT extract(epoch FROM sent - created_at) AS s FROM o)
         SELECT (SELECT extract(epoch FROM sent - created_at) FROM last),
                extract(epoch FROM (SELECT max(sent) FROM o) - (SELECT created_at FROM last)),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.99) WITHIN GROUP (ORDER BY s),
                count(*)
         FROM waits" | tr '|' ' ' >> "$WORK/receipts"
  fi
}

say "16. POST /orders: write alone, with its receipt job (worker stopped), the shop (worker running); $BENCH_SHOP_ROUNDS rounds of ${BENCH_SHOP_SECONDS}s, alternating"
variants=(write enqueue shop)
for round in $(seq 1 "$BENCH_SHOP_ROUNDS"); do
  # Each round in another order, so no variant always follows the same one.
  shift_by=$(( (round - 1) % 3 ))
  order=("${variants[@]:$shift_by}" "${variants[@]:0:$shift_by}")
  for variant in "${order[@]}"; do run_variant "$variant"; done
  stack down web worker
  pgbench_run write write
  pgbench_run enqueue enqueue
  sql "ALTER TABLE tidepool_jobs DISABLE TRIGGER tidepool_jobs_notify" >/dev/null
  pgbench_run enqueue quiet
  sql "ALTER TABLE tidepool_jobs ENABLE TRIGGER tidepool_jobs_notify" >/dev/null
  say "round $round/$BENCH_SHOP_ROUNDS: write $(tail -n 1 "$WORK/write"), enqueue $(tail -n 1 "$WORK/enqueue"), shop $(tail -n 1 "$WORK/shop"), receipts $(tail -n 1 "$WORK/receipts"); pgbench $(tail -n 1 "$WORK/pgbench-write") / $(tail -n 1 "$WORK/pgbench-enqueue") / $(tail -n 1 "$WORK/pgbench-quiet") tps"
done

bench_report shop --work "$WORK" --report "$OUT" --date "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  --commit "$(git rev-parse --short HEAD)" --rounds "$BENCH_SHOP_ROUNDS" --seconds "$BENCH_SHOP_SECONDS"
say "16. written to docs/benchmarks.md"
