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
MARKER='<!-- operator benchmarks: scripts/bench-operator.sh -->'
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

python3 - "$WORK/result.json" "$WORK/section.md" "$MARKER" "$elapsed" "$pods" \
  "$(date -u +"%Y-%m-%d %H:%M UTC")" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(nproc)" <<'PY'
import json, sys
result_path, out_path, marker, elapsed, pods, when, commit, cores = sys.argv[1:]
r = json.load(open(result_path))
ms = lambda v: "%.0f" % v
rows = []
for label, key in (("10 per second", "paced"), ("all at once (32 requests in flight)", "burst")):
    s = r[key]
    rows.append("| %s | %d | %s / %s | %s / %s / %s | %s / %s |" % (
        label, s["count"], ms(s["first_child_ms"]["p50"]), ms(s["first_child_ms"]["p99"]),
        ms(s["all_children_ms"]["p50"]), ms(s["all_children_ms"]["p99"]), ms(s["all_children_ms"]["max"]),
        ms(s["after_migration_ms"]["p50"]), ms(s["after_migration_ms"]["p99"])))
writes = r["writes_per_minute_at_rest"]
write_rows = "\n".join("| %s | %s | %.1f |" % (k.split(" ", 1)[0] or "(none)", k.split(" ", 1)[1] if " " in k else "", v)
                       for k, v in sorted(writes.items(), key=lambda kv: -kv[1])) or "| (none) | | 0 |"
operator_writes = sum(v for k, v in writes.items() if k.startswith("tidepool-operator/"))
section = f"""{marker}

## 9. The operator at scale

Written by `scripts/bench-operator.sh` on {when}, commit {commit}, same machine;
{elapsed} s in all. A control plane of its own (etcd, API server, controller
manager, scheduler, the kwok node; {pods} pods at the end), the release
`tidepool-operator run` (cluster-wide, no leader election, log level warn) and
`operator/benches/scale.rs`. Each Tidepool has a Secret of its own (its own
database server), 1 web and 1 worker pod. Times run from the create's answer
to the first sight, on a watch, of the migration Job (the operator's first
child) and of the worker Deployment (its last: applied once the controller
manager and kwok have run and completed the migration Job); the last column
runs from the first sight of the Job's success to the worker Deployment, the
operator's own part of that second half.

| Tidepools applied | count | first child p50 / p99 (ms) | all children p50 / p99 / max (ms) | migrated → Deployments p50 / p99 (ms) |
|---|---|---|---|---|
{chr(10).join(rows)}

The {r["burst"]["count"]} at once took {r["burst_created_s"]:.1f} s to create and {r["burst_all_children_s"]:.1f} s until the last one's children existed.

Everything here (etcd, the API server, the controller manager, the scheduler,
kwok, the operator and the client) shares the machine's {cores} cores. The
operator's own part is the first-child column and the last one; the time to
all children is mostly the migration Job's way through the controller
manager, the scheduler and kwok, which fall behind at these rates.

With {r["total"]} Tidepools, at rest (no reconcile for 10 s, then {r["rest_seconds"]} s measured):

| | |
|---|---|
| operator RSS | {r["rss_mib"]:.1f} MiB (peak {r["peak_rss_mib"]:.1f} MiB while they were created; target ≤ 64 MB) |
| operator CPU at rest | {r["cpu_percent_at_rest"]:.2f} % of one core ({r["cpu_seconds_total"]:.1f} CPU seconds since start, all phases) |
| reconciles at rest | {r["reconciles_at_rest"]:.0f} |
| the operator's writes at rest | {operator_writes:.1f} per minute |

Writes per minute at rest, by client (the API server's audit log, `userAgent` and resource):

| client | resource | writes per minute |
|---|---|---|
{write_rows}

<!-- end of operator benchmarks -->
"""
open(out_path, "w").write(section)
PY

replace_report_section "$OUT" "$MARKER" "<!-- end of operator benchmarks -->" "$WORK/section.md"
say "wrote section 9 of $OUT"
