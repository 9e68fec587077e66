#!/usr/bin/env bash
# Two builds of tidepool-loadgen side by side: no-op jobs/s of 1 worker and
# 2 workers with each, on one local stack, alternating, so that a change to
# the worker's statements is measured against the commit before it on the
# same machine in the same minutes. What section 22 of docs/benchmarks.md
# quotes for the claim and completion by ctid.
#
#   scripts/compare-workers.sh BASE_LOADGEN NEW_LOADGEN [ROUNDS (9)]
#
# Build the base at its commit in a worktree of its own, e.g.
#   git worktree add /tmp/base 55a558a
#   (cd /tmp/base && CARGO_TARGET_DIR=~/.cache/tidepool/base-target cargo build --release -p tidepool-loadgen)
# Each run is `tidepool-loadgen workflow throughput --ways worker1|worker2
# --rounds 1` with BENCH_WORKFLOW_JOBS (200,000) jobs; prints every run,
# then the medians and ratios. Loopback only; the stack runs in a state
# folder of its own, removed at the end.
set -euo pipefail
unset TIDEPOOL_POOLER_POOL_SIZE TIDEPOOL_POOLER_MIN_POOL_SIZE
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

[ $# -ge 2 ] || die "usage: $0 BASE_LOADGEN NEW_LOADGEN [ROUNDS]"
BASE=$1 NEW=$2 ROUNDS=${3:-9}
: "${BENCH_WORKFLOW_JOBS:=200000}"
for bin in "$BASE" "$NEW"; do [ -x "$bin" ] || die "$bin is not an executable tidepool-loadgen"; done
WORK=$(mktemp -d)
export TIDEPOOL_STATE_DIR=$TIDEPOOL_STATE_DIR/compare-workers
cleanup() {
  "$REPO_ROOT/scripts/stack.sh" down pooler postgres >/dev/null 2>&1 || true
  rm -rf "$TIDEPOOL_STATE_DIR" "$WORK"
}
trap cleanup EXIT
load_local_plan
"$REPO_ROOT/scripts/stack.sh" up postgres pooler > "$WORK/stack.log" 2>&1 || die "stack.sh up: $(tail -n 5 "$WORK/stack.log")"

say "$ROUNDS rounds of $BENCH_WORKFLOW_JOBS no-op jobs: base, new; 1 worker, 2 workers"
for round in $(seq 1 "$ROUNDS"); do
  for build in base new; do
    bin=$BASE
    [ "$build" = new ] && bin=$NEW
    for w in worker1 worker2; do
      DATABASE_URL=$(pooled_url) TIDEPOOL_DIRECT_DATABASE_URL=$(direct_url) TIDEPOOL_LOG=warn \
        "$bin" workflow throughput --jobs "$BENCH_WORKFLOW_JOBS" --ways "$w" --rounds 1 > "$WORK/run.json"
      echo "$round $build $w $(py "import json; print(round(json.load(open('$WORK/run.json'))[0]['jobs_per_second']))")" | tee -a "$WORK/runs"
    done
  done
done
py "
import collections, statistics
runs = collections.defaultdict(list)
for line in open('$WORK/runs'):
    _, build, way, jps = line.split()
    runs[build, way].append(float(jps))
m = {k: statistics.median(v) for k, v in runs.items()}
for build in ('base', 'new'):
    pairs = [b / a for a, b in zip(runs[build, 'worker1'], runs[build, 'worker2'])]
    print('%s: 1 worker %s jobs/s, 2 workers %s; 2 / 1 %.0f %% (per round, median %.0f %%)' % (
        build, format(round(m[build, 'worker1']), ','), format(round(m[build, 'worker2']), ','),
        100 * m[build, 'worker2'] / m[build, 'worker1'], 100 * statistics.median(pairs)))
print('new / base: %.0f %% (1 worker), %.0f %% (2 workers)' % (
    100 * m['new', 'worker1'] / m['base', 'worker1'], 100 * m['new', 'worker2'] / m['base', 'worker2']))
"
