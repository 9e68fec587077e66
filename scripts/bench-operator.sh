#!/usr/bin/env bash
# The operator's benchmark: section 9 of docs/benchmarks.md. Run by
# scripts/bench.sh after the task sections; run alone (`make bench-operator`),
# it replaces section 9 of an existing report and leaves the rest as it is.
#
# A control plane of its own (scripts/kube.sh on ports of its own, fresh
# state, the kwok node), the release `tidepool-operator run` as a process,
# and operator/benches/scale.rs driving it (what it measures is in its doc
# comment): Tidepools applied at 10 per second and all at once, the time
# until their children exist; the operator's RSS and CPU with
# BENCH_TOTAL (1,000) Tidepools; writes per minute at rest by client, from
# the API server's audit log. Everything stays on loopback and every wait
# is bounded.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_TIDEPOOLS:=200}"
: "${BENCH_TOTAL:=1000}"
: "${BENCH_REST_SECONDS:=60}"
OUT=$REPO_ROOT/docs/benchmarks.md
WORK=$(mktemp -d)
KUBE_STATE=$WORK/kube-state
export TIDEPOOL_KUBE_ETCD_PORT=12479 TIDEPOOL_KUBE_API_PORT=16543
# Scale needs no real node (and one real node per machine is the rule).
export TIDEPOOL_KUBE_NODE=0
trap 'TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

say "building the operator and its benchmark (release)"
cargo build --release -p tidepool-operator
cargo bench -p tidepool-operator --bench scale --no-run
load_kube_tools
say "starting a control plane of the benchmark's own"
kube_up=$(TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" up)
eval "$(tail -n 1 <<< "$kube_up")"
export KUBECONFIG
"$TIDEPOOL_KUBE_BIN/kubectl" apply --server-side -f manifests/crd.yaml >/dev/null
# Polled: `kubectl wait` fails at once while a new CRD has no conditions.
crd_established() {
  [ "$("$TIDEPOOL_KUBE_BIN/kubectl" get crd/tidepools.tidepool.dev \
    -o jsonpath='{.status.conditions[?(@.type=="Established")].status}')" = True ]
}
wait_until crd_established 60 "the Tidepool CRD to be established"

say "9. $BENCH_TIDEPOOLS Tidepools at 10/s, $BENCH_TIDEPOOLS at once, then $BENCH_TOTAL in all and ${BENCH_REST_SECONDS} s at rest"
started=$SECONDS
TIDEPOOL_OPERATOR_BIN=$CARGO_TARGET_DIR/release/tidepool-operator \
  BENCH_AUDIT_LOG=$KUBE_STATE/kube/log/audit.log BENCH_OPERATOR_LOG=$WORK/operator.log \
  BENCH_TIDEPOOLS=$BENCH_TIDEPOOLS BENCH_TOTAL=$BENCH_TOTAL BENCH_REST_SECONDS=$BENCH_REST_SECONDS \
  cargo bench -q -p tidepool-operator --bench scale > "$WORK/result.json"
elapsed=$(( SECONDS - started ))
pods=$("$TIDEPOOL_KUBE_BIN/kubectl" get pods -A --no-headers 2>/dev/null | wc -l)

bench_report operator --work "$WORK" --report "$OUT" --date "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" --elapsed "$elapsed" --pods "$pods" --cores "$(nproc)"
say "wrote section 9 of $OUT"
