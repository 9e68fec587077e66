#!/usr/bin/env bash
# The real node's benchmark: section 10 of docs/benchmarks.md. Run by
# scripts/bench.sh after the operator's; run alone (`make bench-node`), it
# replaces section 10 of an existing report and leaves the rest as it is.
#
#   - `scripts/images.sh` (what `make images` runs after the build) into an
#     empty image cache (cold: the mmdebstrap bases too) and again (warm);
#     the images' sizes;
#   - `scripts/kube.sh up` with the real node, from fresh state and again
#     with the state kept (the tools already built), and `kube.sh down`;
#   - `kubectl apply` of a Tidepool on the real node until its Ready
#     condition is True, BENCH_APPLIES (10) times, each in a namespace of its
#     own, with the release `tidepool-operator run` as a process and a
#     PostgreSQL of its own on the veth's host end.
# Needs the machine's one real node: stop the test cluster first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_APPLIES:=10}"
OUT=$REPO_ROOT/docs/benchmarks.md
WORK=$(mktemp -d)
# PostgreSQL runs as $TIDEPOOL_RUN_AS, which must reach its folder.
chmod 755 "$WORK"
KUBE_STATE=$WORK/kube-state
STACK_STATE=$WORK/stack
PG_PORT=15632
OPERATOR=
cleanup() {
  [ -z "$OPERATOR" ] || kill "$OPERATOR" 2>/dev/null || true
  TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" down >/dev/null 2>&1 || true
  TIDEPOOL_STATE_DIR=$STACK_STATE TIDEPOOL_PG_PORT=$PG_PORT "$REPO_ROOT/scripts/stack.sh" down postgres >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
require_no_real_node
[ -x "$TIDEPOOL_BIN" ] && [ -x "$TIDEPOOL_OPERATOR_BIN" ] || die "the release binaries are not built (run: make build)"
load_kube_tools

# Seconds since $1 (from `now`), one decimal.
now() { date +%s.%N; }
since() { py "import time; print('%.1f' % (time.time() - $1))"; }

say "10. images: cold (empty cache, bases included), then warm"
started=$(now)
TIDEPOOL_IMAGE_CACHE=$WORK/images TIDEPOOL_IMAGE_DIR=$WORK/images/archives "$REPO_ROOT/scripts/images.sh" 2> "$WORK/images-cold.log"
images_cold=$(since "$started")
started=$(now)
TIDEPOOL_IMAGE_CACHE=$WORK/images TIDEPOOL_IMAGE_DIR=$WORK/images/archives "$REPO_ROOT/scripts/images.sh" 2> "$WORK/images-warm.log"
images_warm=$(since "$started")
sizes=$(TIDEPOOL_IMAGE_CACHE=$WORK/images "$REPO_ROOT/scripts/images.sh" sizes)
rm -rf "$WORK/images"
# The cluster below imports the machine's archives.
"$REPO_ROOT/scripts/images.sh" 2>/dev/null

say "10. kube.sh up with the real node: fresh state, then warm; down"
started=$(now)
TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" up > "$WORK/kube-up.log" 2>&1
kube_fresh=$(since "$started")
started=$(now)
TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" down > /dev/null 2>&1
kube_down=$(since "$started")
started=$(now)
kube_up=$(TIDEPOOL_STATE_DIR=$KUBE_STATE "$REPO_ROOT/scripts/kube.sh" up 2>/dev/null)
kube_warm=$(since "$started")
eval "$(tail -n 1 <<< "$kube_up")"
export KUBECONFIG
kubectl_() { "$TIDEPOOL_KUBE_BIN/kubectl" "$@"; }

say "10. kubectl apply of a Tidepool until Ready, $BENCH_APPLIES times"
TIDEPOOL_STATE_DIR=$STACK_STATE TIDEPOOL_PG_PORT=$PG_PORT TIDEPOOL_PG_FOR_NODE=1 \
  "$REPO_ROOT/scripts/stack.sh" up postgres > /dev/null 2>&1
app_password=$(cat "$STACK_STATE/secrets/app.password")
kubectl_ apply --server-side -f manifests/crd.yaml > /dev/null
# (kubectl wait fails at once on a CRD with no conditions yet.)
crd_established() {
  [ "$(kubectl_ get crd/tidepools.tidepool.dev -o jsonpath='{.status.conditions[?(@.type=="Established")].status}')" = True ]
}
wait_until crd_established 60 "the Tidepool CRD to be established"
TIDEPOOL_OPERATOR_LOG=warn TIDEPOOL_OPERATOR_LISTEN=127.0.0.1:0 \
  "$TIDEPOOL_OPERATOR_BIN" run --no-leader-election > "$WORK/operator.log" 2>&1 &
OPERATOR=$!
for i in $(seq 1 "$BENCH_APPLIES"); do
  ns=bench-$i
  kubectl_ create namespace "$ns" > /dev/null
  kubectl_ -n "$ns" create secret generic shop-app --type=kubernetes.io/basic-auth \
    --from-literal=username="$APP_USER" --from-literal=password="$app_password" \
    --from-literal=host="$TIDEPOOL_NODE_HOST_IP" --from-literal=port="$PG_PORT" \
    --from-literal=dbname="$APP_DB" > /dev/null
  started=$(now)
  kubectl_ -n "$ns" apply -f - > /dev/null <<YAML
apiVersion: tidepool.dev/v1alpha1
kind: Tidepool
metadata: {name: shop}
spec:
  database: {secretRef: {name: shop-app}, maxConnections: 40, reservedConnections: 10}
  web: {replicas: 1, concurrency: 8, databasePool: 4}
  worker: {replicas: 1, concurrency: 4}
  nodeSelector: {type: real}
  tolerations: [{key: tidepool.dev/real-node, operator: Exists, effect: NoSchedule}]
YAML
  kubectl_ -n "$ns" wait --for=condition=Ready tidepool/shop --timeout=180s > /dev/null \
    || die "Tidepool $ns/shop was not Ready within 180 s (operator log: $WORK/operator.log)"
  apply_s=$(since "$started")
  # Where the time went, from the objects' own timestamps (whole seconds):
  # the migration Job from its creation to its completion, then the app
  # pods from their creation to Ready.
  read -r job_s pods_s < <(kubectl_ -n "$ns" get jobs,pods -o json | bench_report rollout-phases)
  echo "$apply_s $job_s $pods_s" >> "$WORK/applies"
  # One at a time: the next starts on an idle node.
  kubectl_ delete namespace "$ns" --wait=true --timeout=120s > /dev/null
done
echo "$images_cold $images_warm $kube_fresh $kube_warm $kube_down" > "$WORK/steps"
echo "$sizes" > "$WORK/sizes"
bench_report node --work "$WORK" --report "$OUT" --date "$(date -u +"%Y-%m-%d %H:%M UTC")" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "wrote section 10 of $OUT"
