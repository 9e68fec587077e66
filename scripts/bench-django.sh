#!/usr/bin/env bash
# Any image under the operator: section 17 of docs/benchmarks.md, the
# Django + Celery example (examples/django-celery). Run alone (`make
# bench-django`); it replaces section 17 of an existing report.
#
# BENCH_REPEATS (3) rounds, each, one after another:
#   - on the real node (the test cluster of scripts/test-env.sh), the
#     seed's two experiments, ten /slow-query/ (5 s) at once through the web
#     Service and a hundred 5 s tasks for one worker of concurrency 50:
#     on the Django + Celery Tidepool (operator/tests/real_node_django.rs)
#     and on the Tidepool app (operator/tests/real_node_e2e.rs). Each test
#     appends what it measured to $TIDEPOOL_E2E_FIGURES;
#   - the same experiments on loopback with the same image's processes:
#     its root filesystem (scripts/images.sh rootfs), chrooted as the
#     image's user in a mount namespace of their own, so the same Django,
#     gunicorn (one gevent worker), Celery (gevent pool, concurrency 50) and
#     Redis, through one PgBouncer in transaction mode (scripts/stack.sh).
# Then once: the overload run on the real node (real_node_django.rs's
# budget test), a rollout of both tiers under 20 clients (its rollout
# test), and the clock's pod deleted and rolled (its clock test). First, before the test cluster starts: the exporter's
# scrape cost on loopback (`tidepool pooler-exporter` against the local
# PgBouncer, BENCH_SCRAPES (500) scrapes one after another).
# Needs the machine's one real node: stop the test cluster first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_REPEATS:=3}" "${BENCH_SCRAPES:=500}"
OUT=$REPO_ROOT/docs/benchmarks.md
require_no_real_node
[ -x "$TIDEPOOL_BIN" ] && [ -x "$TIDEPOOL_LOADGEN_BIN" ] || die "the release binaries are not built (run: make build)"
WORK=$(mktemp -d)
# PostgreSQL runs as $TIDEPOOL_RUN_AS, which must reach its folders.
chmod 755 "$WORK"
FIGURES=$WORK/figures.jsonl
# Before the local stack's variables below: the test cluster keeps its own.
source "$REPO_ROOT/scripts/test-env.sh"

# The local stack, on ports of its own, in a state folder of its own: one
# PgBouncer for both processes, room for the worker's 50 and the web's 10.
export TIDEPOOL_STATE_DIR=$WORK/local TIDEPOOL_PG_PORT=15661 TIDEPOOL_POOLER_PORT=16461 \
  TIDEPOOL_POOLER_POOL_SIZE=60 TIDEPOOL_POOLER_MIN_POOL_SIZE=0 TIDEPOOL_POOLER_MAX_CLIENT_CONN=1100
WEB_PORT=18061 REDIS_PORT=16379
WEB=http://127.0.0.1:$WEB_PORT
DJANGO=$WORK/rootfs/django REDIS=$WORK/rootfs/redis
# The image's user (examples/django-celery/Dockerfile: USER 65532:65532).
IMAGE_USER=65532:65532
LOOPBACK_PIDS=()

# Stops every process that runs in one of the root filesystems (gunicorn's
# workers too) and the exporter, and waits for them (bounded).
stop_loopback() {
  local proc pid pids=("${LOOPBACK_PIDS[@]}")
  for proc in /proc/[0-9]*; do
    case $(readlink "$proc/root" 2>/dev/null) in
      "$DJANGO" | "$REDIS") pids+=("${proc#/proc/}") ;;
    esac
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    timeout 30 tail --pid="$pid" -f /dev/null || kill -9 "$pid" 2>/dev/null || true
  done
  LOOPBACK_PIDS=()
}
cleanup() {
  stop_connection_sampler
  stop_loopback
  "$REPO_ROOT/scripts/stack.sh" down >/dev/null 2>&1 || true
  test_env_down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Runs "${@:2}" in root filesystem $1 as the image's user, in place of the
# calling shell (so a subshell's PID is the process's): a mount namespace
# of its own with the host's /dev and a /proc bound in (gone with the
# process), the host's loopback.
in_rootfs() {
  local root=$1
  shift
  exec_in_rootfs "$root" "$IMAGE_USER" "$@"
}
# Django's environment: what the plan tells a pod (libpq's variables, a
# 0600 password file), with the pooler's port, or PostgreSQL's for the
# migration ($1).
django_env() {
  printf '%s\n' env -C /app PGHOST=127.0.0.1 "PGPORT=$1" "PGDATABASE=$APP_DB" "PGUSER=$APP_USER" \
    PGPASSFILE=/tmp/pgpass "CELERY_BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0" \
    DJANGO_SETTINGS_MODULE=config.settings PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOSTNAME=loopback
}
# Starts "${@:3}" in root filesystem $2 in the background (a subshell that
# in_rootfs replaces), logging to $WORK/$1.log.
start_in_rootfs() {
  in_rootfs "${@:2}" </dev/null >>"$WORK/$1.log" 2>&1 &
  LOOPBACK_PIDS+=("$!")
}

say "17. building the images and the tests"
"$REPO_ROOT/scripts/images.sh" django redis
"$REPO_ROOT/scripts/images.sh" rootfs django "$DJANGO"
"$REPO_ROOT/scripts/images.sh" rootfs redis "$REDIS"
cargo test --quiet -p tidepool-operator --test real_node_django --test real_node_e2e --no-run

say "17. the same image's processes on loopback"
require_free_port "$WEB_PORT" "gunicorn on loopback"
require_free_port "$REDIS_PORT" "Redis on loopback"
load_local_plan
"$REPO_ROOT/scripts/stack.sh" up postgres pooler >/dev/null
(umask 077
 printf '127.0.0.1:%s:%s:%s:%s\n' "$TIDEPOOL_POOLER_PORT" "$APP_DB" "$APP_USER" "$(secret app.password)" \
   "$TIDEPOOL_PG_PORT" "$APP_DB" "$APP_USER" "$(secret app.password)" > "$DJANGO/tmp/pgpass")
chown "$IMAGE_USER" "$DJANGO/tmp/pgpass"
mapfile -t migrate_env < <(django_env "$TIDEPOOL_PG_PORT")
(in_rootfs "$DJANGO" "${migrate_env[@]}" python3 manage.py migrate --noinput) >"$WORK/migrate.log" 2>&1 \
  || { cat "$WORK/migrate.log" >&2; die "Django's migration failed on loopback"; }
mapfile -t app_env < <(django_env "$TIDEPOOL_POOLER_PORT")
start_in_rootfs redis "$REDIS" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --dir /tmp
start_in_rootfs gunicorn "$DJANGO" "${app_env[@]}" gunicorn config.wsgi:application --worker-class=gevent --workers=1 \
  --worker-connections=1000 "--bind=127.0.0.1:$WEB_PORT"
start_in_rootfs celery "$DJANGO" "${app_env[@]}" python3 -m celery --app=config worker --pool=gevent --concurrency=50 \
  --without-mingle --without-gossip --loglevel=INFO
wait_until "curl -fsS $WEB/readyz/" 60 "gunicorn on loopback (see $WORK/gunicorn.log)"
wait_until "grep -q ' ready\.' $WORK/celery.log" 60 "the Celery worker on loopback (see $WORK/celery.log)"

# The seed's experiments on loopback, once: a JSON record of the burst,
# the tasks' runs and the sampled peak of sleeping backends, appended to
# $FIGURES under test "loopback".
SLEEPING="state = 'active' AND query LIKE 'SELECT pg_sleep%'"
loopback_seed() {
  local batch=loopback$1
  start_connection_sampler "$WORK/sleeping.txt" "$SLEEPING"
  "$TIDEPOOL_LOADGEN_BIN" burst --requests 10 --url "$WEB/slow-query/" --timeout 60s > "$WORK/burst.json"
  stop_connection_sampler
  [ "$(json_field "$WORK/burst.json" succeeded)" = 10 ] || die "the loopback burst failed: $(cat "$WORK/burst.json")"
  local requests_peak
  requests_peak=$(sampled_peak "$WORK/sleeping.txt")
  start_connection_sampler "$WORK/sleeping.txt" "$SLEEPING"
  curl -fsS -X POST "$WEB/tasks/slow/?batch=$batch&count=100&seconds=5" >/dev/null
  wait_until "curl -fsS '$WEB/tasks/runs/?batch=$batch' | grep -q '\"runs\": 100,'" 180 "the loopback worker's 100 tasks"
  stop_connection_sampler
  curl -fsS "$WEB/tasks/runs/?batch=$batch" > "$WORK/runs.json"
  printf '{"test": "loopback", "figures": {"requests_seconds": %s, "requests_peak": %s, "tasks": %s, "tasks_peak": %s}}\n' \
    "$(json_field "$WORK/burst.json" total_seconds)" "$requests_peak" "$(cat "$WORK/runs.json")" \
    "$(sampled_peak "$WORK/sleeping.txt")" >> "$FIGURES"
}

# A test of operator/tests/$1.rs by its name $2, its figures to $FIGURES.
node_test() {
  TIDEPOOL_E2E_FIGURES=$FIGURES cargo test --quiet -p tidepool-operator --test "$1" -- --exact "$2" \
    > "$WORK/$2.log" 2>&1 || { cat "$WORK/$2.log" >&2; die "$1's $2 failed"; }
}

say "17. the exporter's scrape cost on loopback, $BENCH_SCRAPES scrapes"
EXPORTER_PORT=19127
# shellcheck disable=SC2046 # pooler_stats_env prints assignments without spaces
env $(pooler_stats_env) "$TIDEPOOL_BIN" pooler-exporter --listen "127.0.0.1:$EXPORTER_PORT" </dev/null >"$WORK/exporter.log" 2>&1 &
LOOPBACK_PIDS+=("$!")
exporter=$!
wait_until "curl -fsS http://127.0.0.1:$EXPORTER_PORT/metrics | grep -q '^pgbouncer_up 1'" 30 "the exporter (see $WORK/exporter.log)"
before=$(cpu_ticks "$exporter")
for _ in $(seq 1 "$BENCH_SCRAPES"); do
  curl -fsS -o "$WORK/scrape.txt" -w '%{time_total}\n' "http://127.0.0.1:$EXPORTER_PORT/metrics" >> "$WORK/scrapes.txt"
done
after=$(cpu_ticks "$exporter")
printf '{"test": "exporter", "figures": {"scrapes": %s, "seconds": [%s], "cpu_seconds": %s, "rss_kb": %s, "series": %s, "bytes": %s}}\n' \
  "$BENCH_SCRAPES" "$(paste -sd, "$WORK/scrapes.txt")" \
  "$(py "print(($after - $before) / $(getconf CLK_TCK))")" \
  "$(awk '/^VmRSS:/ {print $2}' "/proc/$exporter/status")" \
  "$(grep -c '^pgbouncer_' "$WORK/scrape.txt")" "$(wc -c < "$WORK/scrape.txt")" >> "$FIGURES"
kill "$exporter"
wait "$exporter" 2>/dev/null || true

test_env_up
for round in $(seq 1 "$BENCH_REPEATS"); do
  say "17. round $round of $BENCH_REPEATS: the seed's experiments, Django on the real node"
  node_test real_node_django the_seeds_experiments_run_on_the_django_celery_example
  say "17. round $round of $BENCH_REPEATS: the seed's experiments, the Tidepool app on the real node"
  node_test real_node_e2e the_seeds_experiments_run_through_the_web_service_and_a_worker_pod
  say "17. round $round of $BENCH_REPEATS: the seed's experiments, Django on loopback"
  loopback_seed "$round"
done
say "17. the overload run, Django on the real node"
node_test real_node_django the_budget_holds_for_the_django_celery_example_under_overload
say "17. a rollout of both Django tiers under load, on the real node"
node_test real_node_django a_rolling_update_of_the_django_example_under_load_fails_no_request
say "17. the clock (Celery beat) deleted and rolled, on the real node"
node_test real_node_django the_clock_never_runs_twice_when_its_pod_is_deleted_or_rolled
stop_loopback

bench_report django --work "$WORK" --report "$OUT" --date "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "wrote section 17 of $OUT"
