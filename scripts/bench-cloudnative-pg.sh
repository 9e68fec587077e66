#!/usr/bin/env bash
# CloudNativePG on the real node: section 20 of docs/benchmarks.md
# (`make bench-cloudnative-pg`).
#
# BENCH_CNPG_ROUNDS (3) rounds on the test cluster (scripts/test-env.sh),
# each running, in an order that alternates from round to round:
# - real_node_e2e's seed experiments on the host's PostgreSQL 15, and
# - operator/tests/real_node_cloudnative_pg.rs: the same experiments on a
#   CloudNativePG cluster's PostgreSQL 17 (the Tidepool on `<cluster>-app`,
#   verify-full), then a password rotation through `<cluster>-app` under
#   10 clients, the instance's pod deleted under 5 clients, and the budget
#   under twice the planned load.
# Each test appends what it measured to $TIDEPOOL_E2E_FIGURES; this script
# also times each run of the CloudNativePG test (what it adds to a warm
# `make test`). Needs the machine's one real node: stop the test cluster
# first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_CNPG_ROUNDS:=3}"
OUT=$REPO_ROOT/docs/benchmarks.md
source "$REPO_ROOT/scripts/test-env.sh"
bench_on_test_cluster

run_host() {
  TIDEPOOL_E2E_FIGURES=$FIGURES cargo test --quiet -p tidepool-operator --test real_node_e2e -- --exact \
    the_seeds_experiments_run_through_the_web_service_and_a_worker_pod > "$WORK/host-$1.log" 2>&1 \
    || { cat "$WORK/host-$1.log" >&2; die "the host's seed test failed"; }
}
run_cnpg() {
  local started
  started=$(date +%s.%N)
  TIDEPOOL_E2E_FIGURES=$FIGURES cargo test --quiet -p tidepool-operator --test real_node_cloudnative_pg \
    > "$WORK/cnpg-$1.log" 2>&1 || { cat "$WORK/cnpg-$1.log" >&2; die "the CloudNativePG test failed"; }
  py "print('%.1f' % ($(date +%s.%N) - $started))" >> "$WORK/cnpg-seconds"
}

say "20. building the tests"
cargo test --quiet -p tidepool-operator --test real_node_e2e --test real_node_cloudnative_pg --no-run
test_env_up
for round in $(seq 1 "$BENCH_CNPG_ROUNDS"); do
  say "20. round $round of $BENCH_CNPG_ROUNDS: the seed's experiments on PostgreSQL 15 and on CloudNativePG's 17"
  if [ $((round % 2)) = 1 ]; then run_host "$round"; run_cnpg "$round"; else run_cnpg "$round"; run_host "$round"; fi
done

# One line per run and test: "test figure figure ...".
py "
import json
keys = {
    'seed': ['requests_seconds', 'jobs_seconds', 'requests_peak', 'jobs_peak'],
    'cloudnative_pg_seed': ['requests_seconds', 'jobs_seconds', 'requests_peak', 'jobs_peak'],
    'cloudnative_pg_rotation': ['requests', 'failed', 'rolled_seconds', 'cloudnative_pg_sessions',
                                'superuser_reserved_connections'],
    'cloudnative_pg_instance_deleted': ['healthy_seconds', 'serving_seconds', 'requests'],
    'cloudnative_pg_budget': ['requests', 'ok', 'shed', 'peak', 'planned', 'available', 'max_connections'],
}
for line in open('$FIGURES'):
    f = json.loads(line)
    if f['test'] in keys:
        print(f['test'], *(f['figures'][k] for k in keys[f['test']]))
    if f['test'] == 'cloudnative_pg_instance_deleted':
        print('statuses', ','.join('%s:%s' % kv for kv in sorted(f['figures']['statuses'].items())))
" > "$WORK/runs"
for test in seed cloudnative_pg_seed cloudnative_pg_rotation cloudnative_pg_instance_deleted cloudnative_pg_budget; do
  [ "$(grep -c "^$test " "$WORK/runs")" = "$BENCH_CNPG_ROUNDS" ] || die "expected $BENCH_CNPG_ROUNDS runs of $test: $(cat "$FIGURES")"
done
# The figure in column $2 of test $1's runs.
column() { awk -v t="$1" -v c="$2" '$1 == t {print $c}' "$WORK/runs"; }
list() { column "$1" "$2" | awk '{printf "%s%.2f", (NR > 1 ? ", " : ""), $1}'; }
host_requests=$(median $(column seed 2)) cnpg_requests=$(median $(column cloudnative_pg_seed 2))
host_jobs=$(median $(column seed 3)) cnpg_jobs=$(median $(column cloudnative_pg_seed 3))
ratio() { py "print('%+.1f %%' % (100 * ($2 - $1) / $1))"; }
healthy=$(median $(column cloudnative_pg_instance_deleted 2)) serving=$(median $(column cloudnative_pg_instance_deleted 3))
rolled=$(median $(column cloudnative_pg_rotation 4))
rotation_requests=$(column cloudnative_pg_rotation 2 | awk '{s += $1} END {print s}')
rotation_failed=$(column cloudnative_pg_rotation 3 | awk '{s += $1} END {print s}')
cnpg_seconds=$(median $(cat "$WORK/cnpg-seconds"))
{
  echo "<!-- cloudnative-pg benchmark: scripts/bench-cloudnative-pg.sh -->"
  echo "## 20. CloudNativePG and PostgreSQL 17"
  echo
  echo "Measured $(date -u +"%Y-%m-%d %H:%M UTC") at commit $(git rev-parse --short HEAD) by \`scripts/bench-cloudnative-pg.sh\` (\`make bench-cloudnative-pg\`): $BENCH_CNPG_ROUNDS rounds on the real node, each running \`real_node_e2e\`'s seed experiments (the host's PostgreSQL 15 on the veth's host end) and \`operator/tests/real_node_cloudnative_pg.rs\` (a CloudNativePG 1.27.1 \`Cluster\` of one PostgreSQL 17 instance on the real node, the Tidepool on \`pg-app\` with verify-full, its operator a pod from the chart), in an order that alternates. Same sizes on both: web 1 × pool 10, worker 1 × concurrency 50, the sidecars PgBouncer 1.24.1."
  echo
  echo "### The seed's experiments: CloudNativePG's PostgreSQL 17 beside the host's 15"
  echo
  echo "| experiment | host's PostgreSQL 15 (median) | runs | CloudNativePG's 17 (median) | runs | difference |"
  echo "|---|---|---|---|---|---|"
  echo "| 10 × \`/slow-query/\` (5 s) at once | $host_requests s | $(list seed 2) | $cnpg_requests s | $(list cloudnative_pg_seed 2) | $(ratio "$host_requests" "$cnpg_requests") |"
  echo "| 100 × \`slow_query\` (5 s), one worker pod, concurrency 50 | $host_jobs s | $(list seed 3) | $cnpg_jobs s | $(list cloudnative_pg_seed 3) | $(ratio "$host_jobs" "$cnpg_jobs") |"
  echo
  echo "Peaks on CloudNativePG (sampled from \`pg_stat_activity\` through \`kubectl exec psql\`): requests $(column cloudnative_pg_seed 4 | paste -sd, -), jobs $(column cloudnative_pg_seed 5 | paste -sd, -)."
  echo
  echo "### The instance's pod deleted under load"
  echo
  echo "5 clients of \`GET /row/\` through the web Service; the pod \`pg-1\` deleted. CloudNativePG starts it again on its volume."
  echo
  echo "| run | to the Cluster healthy again | to the first 200 again | requests | their statuses |"
  echo "|---|---|---|---|---|"
  paste <(column cloudnative_pg_instance_deleted 2) <(column cloudnative_pg_instance_deleted 3) \
    <(column cloudnative_pg_instance_deleted 4) <(column statuses 2) \
    | awk '{printf "| %d | %.1f s | %.1f s | %d | %s |\n", NR, $1, $2, $3, $4}'
  echo
  echo "Medians: healthy again after **$healthy s**, serving 200s after **$serving s**, with no container of the Tidepool restarted (the test asserts it)."
  echo
  echo "### Rotation through \`pg-app\`, and the budget"
  echo
  echo "The rotation (a new password in \`pg-app\`; CloudNativePG's instance manager sets it, the operator rolls the pods): $rotation_failed of $rotation_requests requests failed over all runs; the roll over a median **$rolled s** after the change. CloudNativePG's own sessions: $(column cloudnative_pg_rotation 5 | paste -sd, -) beside $(column cloudnative_pg_rotation 6 | head -1) superuser slots, in \`reservedConnections: 10\` with the queue scaler's one connection."
  echo
  echo "| run | max_connections | available | planned | app's peak | requests | 200 | 503 |"
  echo "|---|---|---|---|---|---|---|---|"
  awk '$1 == "cloudnative_pg_budget" {n++; printf "| %d | %d | %d | %d | %d | %d | %d | %d |\n", n, $8, $7, $6, $5, $2, $3, $4}' "$WORK/runs"
  echo
  echo "The CloudNativePG test's wall time: $(paste -sd, "$WORK/cnpg-seconds" | sed 's/,/ s, /g') s (median $cnpg_seconds s), what it adds to a warm \`make test\`; the images and the operator's build are cached after the first run."
  echo "<!-- end of the cloudnative-pg benchmark -->"
} > "$WORK/section.md"
replace_report_section "$OUT" "<!-- cloudnative-pg benchmark: scripts/bench-cloudnative-pg.sh -->" "<!-- end of the cloudnative-pg benchmark -->" "$WORK/section.md"
say "20. written to docs/benchmarks.md: seed requests $host_requests s (15) / $cnpg_requests s (17), jobs $host_jobs s / $cnpg_jobs s; instance healthy after $healthy s, serving after $serving s"
