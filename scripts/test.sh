#!/usr/bin/env bash
# Every test: formatting, lints, unit tests, and the integration tests
# against a real PostgreSQL and real PgBouncers on loopback, and against a
# real Kubernetes control plane built from upstream modules (scripts/kube.sh;
# the first run on a machine builds it, later runs reuse the cache).
#
# A PostgreSQL cluster for the run is created afresh in
# $TIDEPOOL_STATE_DIR/test on port $TIDEPOOL_TEST_PG_PORT (15432) and stopped
# at the end, pass or fail.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

# Below the kernel's ephemeral range (32768-60999), where an outgoing
# connection could hold the port.
: "${TIDEPOOL_TEST_PG_PORT:=15432}"
TEST_STATE=$TIDEPOOL_STATE_DIR/test

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
say "building"
cargo build --workspace --bins --quiet

stack() {
  TIDEPOOL_STATE_DIR=$TEST_STATE TIDEPOOL_PG_PORT=$TIDEPOOL_TEST_PG_PORT TIDEPOOL_PG_MAX_CONNECTIONS=400 \
    TIDEPOOL_BIN=$CARGO_TARGET_DIR/debug/tidepool "$REPO_ROOT/scripts/stack.sh" "$@"
}
kube() { TIDEPOOL_STATE_DIR=$TEST_STATE "$REPO_ROOT/scripts/kube.sh" "$@"; }
stack down postgres || true
kube down || true
rm -rf "$TEST_STATE"
trap 'kube down || true; stack down postgres || true' EXIT
stack up postgres

say "building the Kubernetes tools (cached per version)"
load_kube_tools
say "starting the Kubernetes control plane"
kube_up=$(kube up)
eval "$(tail -n 1 <<< "$kube_up")"
export KUBECONFIG

export TIDEPOOL_TEST_STATE_DIR=$TEST_STATE TIDEPOOL_TEST_PG_PORT TIDEPOOL_RUN_AS
say "cargo test"
cargo test --workspace -- ${TIDEPOOL_TEST_ARGS:-}
