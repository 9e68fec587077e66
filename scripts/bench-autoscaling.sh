#!/usr/bin/env bash
# Scaling: section 13 of docs/benchmarks.md. Run by scripts/bench.sh after
# the dashboards; run alone (`make bench-autoscaling`), it replaces section
# 13 of an existing report. On the test cluster (scripts/test-env.sh):
#   - operator/tests/autoscaling.rs bench_backlog_to_target_replicas: a
#     backlog of 10,000 jobs to the worker Deployment's replicas set,
#     BENCH_TRIALS (20) times;
#   - bench_query_backlog_to_target_replicas, right after: the same for the
#     SQL signal (100 rows of a table of the app's own, counted by the
#     user's statement), BENCH_QUERY_TRIALS (10) times;
#   - bench_steady_load_near_a_threshold: BENCH_STEADY_SECONDS (600) of a
#     backlog wavering around a threshold, two Tidepools side by side (the
#     default windows, and none): replica changes, the operator's readings
#     per minute and their p99;
#   - operator/tests/real_node_e2e.rs both_tiers_scale_on_the_real_node_within_the_budget,
#     BENCH_REPEATS (3) times: real worker pods from zero and back, the web
#     HPA on CPU, the app's peak connections.
# Needs the machine's one real node: stop the test cluster first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_TRIALS:=20}" "${BENCH_QUERY_TRIALS:=10}" "${BENCH_STEADY_SECONDS:=600}" "${BENCH_REPEATS:=3}"
OUT=$REPO_ROOT/docs/benchmarks.md
source "$REPO_ROOT/scripts/test-env.sh"
bench_on_test_cluster
E2E=$WORK/e2e.jsonl

say "13. building the tests"
cargo test --quiet -p tidepool-operator --test autoscaling --test real_node_e2e --no-run
test_env_up
say "13. a backlog to the target replicas, $BENCH_TRIALS times"
TIDEPOOL_SCALING_FIGURES=$FIGURES TIDEPOOL_BENCH_TRIALS=$BENCH_TRIALS \
  cargo test --quiet -p tidepool-operator --test autoscaling bench_backlog_to_target_replicas -- --ignored --nocapture
say "13. a query's backlog to the target replicas, $BENCH_QUERY_TRIALS times"
TIDEPOOL_SCALING_FIGURES=$FIGURES TIDEPOOL_BENCH_QUERY_TRIALS=$BENCH_QUERY_TRIALS \
  cargo test --quiet -p tidepool-operator --test autoscaling bench_query_backlog_to_target_replicas -- --ignored --nocapture
say "13. $BENCH_STEADY_SECONDS s of a load near a threshold"
TIDEPOOL_SCALING_FIGURES=$FIGURES TIDEPOOL_BENCH_STEADY_SECONDS=$BENCH_STEADY_SECONDS \
  cargo test --quiet -p tidepool-operator --test autoscaling bench_steady_load_near_a_threshold -- --ignored --nocapture
for round in $(seq 1 "$BENCH_REPEATS"); do
  say "13. round $round of $BENCH_REPEATS: both tiers on the real node"
  TIDEPOOL_E2E_FIGURES=$E2E cargo test --quiet -p tidepool-operator --test real_node_e2e \
    both_tiers_scale_on_the_real_node_within_the_budget
done

bench_report autoscaling --work "$WORK" --report "$OUT" --date "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --trials "$BENCH_TRIALS" --steady-seconds "$BENCH_STEADY_SECONDS" --repeats "$BENCH_REPEATS"
say "13. written to docs/benchmarks.md"
