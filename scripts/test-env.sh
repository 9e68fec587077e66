# The services Tidepool's tests run against, for scripts/test.sh and
# scripts/soak-tests.sh. Source it after lib.sh; do not run it.
#
# A PostgreSQL cluster of the run's own, created afresh in
# $TIDEPOOL_STATE_DIR/test on port $TIDEPOOL_TEST_PG_PORT (15432), and the
# Kubernetes control plane (scripts/kube.sh; the first run on a machine
# builds it, later runs reuse the cache). The tests find them through the
# variables test_env_up exports.

# Below the kernel's ephemeral range (32768-60999), where an outgoing
# connection could hold the port.
: "${TIDEPOOL_TEST_PG_PORT:=15432}"
TEST_STATE=$TIDEPOOL_STATE_DIR/test

test_stack() {
  TIDEPOOL_STATE_DIR=$TEST_STATE TIDEPOOL_PG_PORT=$TIDEPOOL_TEST_PG_PORT TIDEPOOL_PG_MAX_CONNECTIONS=400 \
    TIDEPOOL_BIN=$CARGO_TARGET_DIR/debug/tidepool "$REPO_ROOT/scripts/stack.sh" "$@"
}
test_kube() { TIDEPOOL_STATE_DIR=$TEST_STATE "$REPO_ROOT/scripts/kube.sh" "$@"; }

# Stops both, whatever state they are in.
test_env_down() {
  test_kube down || true
  test_stack down postgres || true
}

# Starts both afresh (needs the debug build of `tidepool`) and exports what
# the tests read. Pair it with `trap test_env_down EXIT`.
test_env_up() {
  local kube_up
  test_env_down
  rm -rf "$TEST_STATE"
  test_stack up postgres
  say "building the Kubernetes tools (cached per version)"
  load_kube_tools
  say "starting the Kubernetes control plane"
  kube_up=$(test_kube up)
  eval "$(tail -n 1 <<< "$kube_up")"
  export KUBECONFIG
  export TIDEPOOL_TEST_STATE_DIR=$TEST_STATE TIDEPOOL_TEST_PG_PORT TIDEPOOL_RUN_AS
}
