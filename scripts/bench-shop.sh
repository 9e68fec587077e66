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
MARKER="<!-- shop benchmark: scripts/bench-shop.sh -->"
END_MARKER="<!-- end of the shop benchmark -->"
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

python3 - "$WORK" "$(git rev-parse --short HEAD)" "$BENCH_SHOP_ROUNDS" "$BENCH_SHOP_SECONDS" "$(date -u +"%Y-%m-%d %H:%M UTC")" "$WORK/section.md" <<'PY'
import statistics, sys
work, commit, rounds, seconds, date, out = sys.argv[1:]
rows = lambda name: [list(map(float, l.split())) for l in open(f"{work}/{name}")]
col = lambda rs, i: [r[i] for r in rs]
med = statistics.median
write, enqueue, shop, receipts = rows("write"), rows("enqueue"), rows("shop"), rows("receipts")
pg = {k: [float(l) for l in open(f"{work}/pgbench-{k}")] for k in ("write", "enqueue", "quiet")}
pg_paired = lambda a, b: med([100 * x / y for x, y in zip(pg[a], pg[b])])
def spread(v):
    return "%.0f to %.0f" % (min(v), max(v))
paired = lambda a, b: [100 * (x / y - 1) for x, y in zip(col(a, 0), col(b, 0))]
p_enqueue, p_shop = paired(enqueue, write), paired(shop, write)
row = lambda name, rs: "| %s | %.0f | %s | %.2f ms | %.2f ms |" % (name, med(col(rs, 0)), spread(col(rs, 0)), med(col(rs, 1)), med(col(rs, 2)))
lines = [
    "<!-- shop benchmark: scripts/bench-shop.sh -->",
    "## 16. The shop: `POST /orders` with its receipt job",
    "",
    f"Written by `make bench-shop` (scripts/bench-shop.sh) on {date}, commit {commit}, same machine.",
    "`POST /orders` of the example application (examples/shop: a three-line order, JSON) with",
    f"`wrk -t2 -c64 -d{seconds}s --latency` on the local stack as the local plan sizes it (release",
    "builds; PgBouncer in transaction mode; `web` with a pool of 20, `worker` of concurrency 50), three",
    f"variants in each of {rounds} rounds (the order rotates every round), each on empty tables after a",
    "2 s warm-up:",
    "",
    "- *write*: the same handler with `orders::write` in place of `orders::place`: the order's `INSERT`",
    "  and the answer's `SELECT`, no job (examples/shop/examples/without_receipts.rs); the worker idle;",
    "- *write + enqueue*: the shop as it is, the order, its `send_receipt` job and the order's",
    "  `receipt_job` in one transaction, and the job's state looked up for the answer; the worker",
    "  stopped, so this is the request's own cost;",
    "- *the shop*: the same with the worker sending the receipts meanwhile, on the same two cores.",
    "",
    "| variant | requests/s (median) | runs: min to max | p50 | p99 |",
    "|---|---|---|---|---|",
    row("write", write),
    row("write + enqueue, worker stopped", enqueue),
    row("the shop, worker running", shop),
    "",
    "- The transactional enqueue: **%.1f %%** of the write-alone requests per second (paired by round:" % (100 * med(col(enqueue, 0)) / med(col(write, 0))),
    "  %+.1f %% to %+.1f %%, median %+.1f %%); p99 %.2f ms against %.2f ms." % (min(p_enqueue), max(p_enqueue), med(p_enqueue), med(col(enqueue, 2)), med(col(write, 2))),
    "- With the worker sending receipts beside it: **%.1f %%** of the write-alone requests per second" % (100 * med(col(shop, 0)) / med(col(write, 0))),
    "  (paired: %+.1f %% to %+.1f %%, median %+.1f %%); p99 %.2f ms." % (min(p_shop), max(p_shop), med(p_shop), med(col(shop, 2))),
    "- The same statements from pgbench (`-M extended -c 20 -j 2 -T %s` through the same PgBouncer, in" % seconds,
    "  the same rounds): the write alone %.0f transactions/s, with the job %.0f (%.0f %%, paired), with" % (med(pg["write"]), med(pg["enqueue"]), pg_paired("enqueue", "write")),
    "  the job but the queue's `NOTIFY` trigger disabled %.0f (%.0f %%): the enqueue's cost is the" % (med(pg["quiet"]), pg_paired("quiet", "write")),
    "  database's, and the trigger's `NOTIFY` alone takes %.0f %% of the enqueuing throughput" % (100 - pg_paired("enqueue", "quiet")),
    "  (PostgreSQL serializes the commits of notifying transactions on one lock).",
    "- Orders to receipts (the shop, from each order's `created_at` and its `receipt_sent_at`, both the",
    "  start of their transactions; %.0f orders per run, median): the last order had its receipt" % med(col(receipts, 4)),
    "  **%.2f s** after it was placed (runs: %.2f to %.2f s), the last receipt of the run came %.2f s" % (med(col(receipts, 0)), min(col(receipts, 0)), max(col(receipts, 0)), med(col(receipts, 1))),
    "  after the last order; an order waited %.2f s for its receipt at the median and %.2f s at p99." % (med(col(receipts, 2)), med(col(receipts, 3))),
    "",
    "<!-- end of the shop benchmark -->",
    "",
    "",
]
open(out, "w").write("\n".join(lines))
PY
replace_report_section "$OUT" "$MARKER" "$END_MARKER" "$WORK/section.md"
say "16. written to docs/benchmarks.md"
