#!/usr/bin/env bash
# Scaling: section 13 of docs/benchmarks.md. Run by scripts/bench.sh after
# the dashboards; run alone (`make bench-autoscaling`), it replaces section
# 13 of an existing report. On the test cluster (scripts/test-env.sh):
#   - operator/tests/autoscaling.rs bench_backlog_to_target_replicas: a
#     backlog of 10,000 jobs to the worker Deployment's replicas set,
#     BENCH_TRIALS (20) times;
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

: "${BENCH_TRIALS:=20}" "${BENCH_STEADY_SECONDS:=600}" "${BENCH_REPEATS:=3}"
OUT=$REPO_ROOT/docs/benchmarks.md
MARKER='<!-- scaling benchmarks: scripts/bench-autoscaling.sh -->'
END_MARKER='<!-- end of scaling benchmarks -->'
[ ! -e "/run/netns/$TIDEPOOL_NODE_NETNS" ] || die "a real node is up already (network namespace $TIDEPOOL_NODE_NETNS); stop it first (make kube-down, or the test cluster's)"
WORK=$(mktemp -d)
FIGURES=$WORK/scaling.jsonl
E2E=$WORK/e2e.jsonl
source "$REPO_ROOT/scripts/test-env.sh"
cleanup() {
  test_env_down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say "13. building the tests"
cargo test --quiet -p tidepool-operator --test autoscaling --test real_node_e2e --no-run
test_env_up
say "13. a backlog to the target replicas, $BENCH_TRIALS times"
TIDEPOOL_SCALING_FIGURES=$FIGURES TIDEPOOL_BENCH_TRIALS=$BENCH_TRIALS \
  cargo test --quiet -p tidepool-operator --test autoscaling bench_backlog_to_target_replicas -- --ignored --nocapture
say "13. $BENCH_STEADY_SECONDS s of a load near a threshold"
TIDEPOOL_SCALING_FIGURES=$FIGURES TIDEPOOL_BENCH_STEADY_SECONDS=$BENCH_STEADY_SECONDS \
  cargo test --quiet -p tidepool-operator --test autoscaling bench_steady_load_near_a_threshold -- --ignored --nocapture
for round in $(seq 1 "$BENCH_REPEATS"); do
  say "13. round $round of $BENCH_REPEATS: both tiers on the real node"
  TIDEPOOL_E2E_FIGURES=$E2E cargo test --quiet -p tidepool-operator --test real_node_e2e \
    both_tiers_scale_on_the_real_node_within_the_budget
done

python3 - "$WORK/section.md" "$MARKER" "$END_MARKER" "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$FIGURES" "$E2E" \
  "$BENCH_TRIALS" "$BENCH_STEADY_SECONDS" "$BENCH_REPEATS" <<'PY'
import json, statistics, sys
out, marker, end_marker, when, commit, figures_file, e2e_file, trials, steady, repeats = sys.argv[1:]
records = {}
for line in open(figures_file):
    record = json.loads(line)
    records[record["name"]] = record["figures"]
e2e = [json.loads(line)["figures"] for line in open(e2e_file)]
backlog, runs = records["backlog"], records["steady"]
seconds = backlog["seconds"]
def med(key):
    return statistics.median(f[key] for f in e2e)
def spread(key, digits=1):
    return ", ".join(f"{f[key]:.{digits}f}" for f in e2e)
lines = [
    marker,
    f"Measured {when} at commit {commit} by `scripts/bench-autoscaling.sh` "
    "(`make bench-autoscaling`) on the test cluster: the operator in-process, the kwok node for the "
    "first two, the real node for the third, the test PostgreSQL.",
    "",
    f"**A backlog to the target replicas** ({trials} trials: 10,000 jobs committed in one statement, "
    "1,000 per replica, so 1 → 10; readings every second, no up window; each trial at another moment "
    "of the scaler's cycle): from the commit to the worker Deployment's `spec.replicas` at 10, "
    f"**p50 {backlog['p50']:.2f} s, p99 {backlog['p99']:.2f} s** "
    f"(min {min(seconds):.2f} s, max {max(seconds):.2f} s). That is up to one polling interval, the "
    "reading, the Event, the Tidepool's patch, the reconcile it starts and the Deployment's apply. A "
    "spec's `scaleUpStabilizationSeconds` adds its length (the defaults, 10 s readings and a 15 s window, "
    "make it 15 to 25 s).",
    "",
    f"**A load near a threshold** ({int(steady) // 60} minutes, the same load on two Tidepools side by "
    "side: each second the backlog is set anew between 260 and 340 jobs at 100 per replica, so each "
    "reading asks for 3 or 4 replicas and the peaks need 4; readings every 10 s):",
    "",
    "| windows | replica changes | readings per minute | reading p50 | reading p99 | replicas at the end |",
    "|---|---|---|---|---|---|",
]
for run in runs:
    windows = "up 15 s, down 300 s (defaults)" if run["name"] == "default windows" else "none"
    lines.append(
        f"| {windows} | {run['decisions']:.0f} | {run['readings_per_minute']:.1f} | "
        f"{run['p50_ms']:.2f} ms | {run['p99_ms']:.2f} ms | {run['final_replicas']} |"
    )
by_name = {run["name"]: run for run in runs}
held, followed = by_name["default windows"], by_name["no windows"]
lines += [
    "",
    f"With the default windows the tier changed {held['decisions']:.0f} times (a reading asking for 4 "
    "has to last the whole up window, and one asking for 3 the whole down window); without them it "
    f"followed the readings, {followed['decisions']:.0f} times. A reading is one statement over the "
    "scaler's one connection, kept open; with about 60 readings the p99 is the slowest of them, and "
    "the first reading also opens the connection (TCP and SCRAM authentication). The figures are "
    "interpolated in the operator's histogram `tidepool_operator_database_query_duration_seconds`, "
    "as `histogram_quantile` would.",
    "",
    f"**Both tiers on the real node** ({repeats} runs of `both_tiers_scale_on_the_real_node_within_the_budget`: "
    "48 `slow_query` jobs of 3 s enqueued for a worker tier at zero (0 to 2 replicas, 8 available jobs "
    "per replica, readings every second, up window 2 s, down 10 s, concurrency 4), 8 clients on `/row/` "
    "through the web Service (HPA on CPU, 1 to 3 pods, target 50 %); times from the enqueue):",
    "",
    "| | median | runs |",
    "|---|---|---|",
    f"| worker replicas set to 2 | {med('workers_set_seconds'):.1f} s | {spread('workers_set_seconds')} |",
    f"| 2 worker pods ready | {med('workers_ready_seconds'):.1f} s | {spread('workers_ready_seconds')} |",
    f"| web scaled by the HPA | {med('web_scaled_seconds'):.1f} s | {spread('web_scaled_seconds')} |",
    f"| queue drained | {med('drained_seconds'):.1f} s | {spread('drained_seconds')} |",
    f"| workers back at zero | {med('workers_at_zero_seconds'):.1f} s | {spread('workers_at_zero_seconds')} |",
    f"| the app's peak connections (`pg_stat_activity`) | {med('peak'):.0f} | {spread('peak', 0)} (planned {e2e[0]['planned']}, available {e2e[0]['available']}) |",
    "",
    "The HPA's delay is metrics-server's resolution (15 s) and the HPA's period (5 s in the test "
    "cluster; 15 s by default) before the Tidepool's scale subresource is set.",
    end_marker,
]
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
PY

python3 - "$OUT" "$WORK/section.md" "$MARKER" "$END_MARKER" <<'PY'
import sys
path, section_file, marker, end_marker = sys.argv[1:]
text = open(path).read()
section = open(section_file).read().rstrip("\n")
heading = "## 13. Scaling"
if marker in text:
    start = text.index(marker)
    end = text.index(end_marker, start) + len(end_marker)
    text = text[:start] + section + text[end:]
else:
    text = text.rstrip("\n") + "\n\n" + heading + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
say "13. written to docs/benchmarks.md"
