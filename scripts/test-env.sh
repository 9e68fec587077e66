# The services Tidepool's tests run against, for scripts/test.sh and
# scripts/soak-tests.sh. Source it after lib.sh; do not run it.
#
# A PostgreSQL cluster of the run's own, created afresh in
# $TIDEPOOL_STATE_DIR/test on port $TIDEPOOL_TEST_PG_PORT (15432), on
# loopback and on the real node's host end, and the Kubernetes cluster
# (scripts/kube.sh: the control plane, kwok's node and a real node, with
# the images of scripts/images.sh; the first run on a machine builds the
# tools and bases, later runs reuse the cache). The tests find them through
# the variables test_env_up exports. The release binaries must be built
# (the images carry them).

# Below the kernel's ephemeral range (32768-60999), where an outgoing
# connection could hold the port.
: "${TIDEPOOL_TEST_PG_PORT:=15432}"
TEST_STATE=$TIDEPOOL_STATE_DIR/test

# PostgreSQL 17 beside it: images/postgresql's root filesystem on loopback
# (scripts/stack.sh, TIDEPOOL_PG_ROOTFS), port $TIDEPOOL_TEST_PG17_PORT
# (15433), with the same passwords. The queue's, the periodic tasks', the
# workflows' and rate limits', the migrations' and the worker's tests run on
# it too (run_tests).
: "${TIDEPOOL_TEST_PG17_PORT:=15433}"
TEST17_STATE=$TIDEPOOL_STATE_DIR/test-pg17
TEST17_ROOTFS=$TIDEPOOL_STATE_DIR/test-pg17-rootfs

test_stack17() {
  TIDEPOOL_STATE_DIR=$TEST17_STATE TIDEPOOL_PG_PORT=$TIDEPOOL_TEST_PG17_PORT TIDEPOOL_PG_MAX_CONNECTIONS=400 \
    TIDEPOOL_PG_ROOTFS=$TEST17_ROOTFS TIDEPOOL_BIN=$CARGO_TARGET_DIR/debug/tidepool "$REPO_ROOT/scripts/stack.sh" "$@"
}

test_stack() {
  TIDEPOOL_STATE_DIR=$TEST_STATE TIDEPOOL_PG_PORT=$TIDEPOOL_TEST_PG_PORT TIDEPOOL_PG_MAX_CONNECTIONS=400 \
    TIDEPOOL_BIN=$CARGO_TARGET_DIR/debug/tidepool "$REPO_ROOT/scripts/stack.sh" "$@"
}
test_kube() { TIDEPOOL_STATE_DIR=$TEST_STATE "$REPO_ROOT/scripts/kube.sh" "$@"; }

# Stops both, whatever state they are in.
test_env_down() {
  test_kube down || true
  test_stack down postgres || true
  [ ! -d "$TEST17_ROOTFS" ] || test_stack17 down postgres || true
}

# For a benchmark on the test cluster: checks that no real node is up,
# makes a scratch folder $WORK (with $FIGURES, the tests' records, in it)
# and, on exit, stops the test environment and removes $WORK.
bench_on_test_cluster() {
  require_no_real_node
  WORK=$(mktemp -d)
  FIGURES=$WORK/figures.jsonl
  trap 'test_env_down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
}

# Starts both afresh (needs the debug build of `tidepool`) and exports what
# the tests read. Pair it with `trap test_env_down EXIT`.
test_env_up() {
  local kube_up
  test_env_down
  rm -rf "$TEST_STATE"
  say "building the Kubernetes tools (cached per version)"
  load_kube_tools
  say "building the images (scripts/images.sh)"
  "$REPO_ROOT/scripts/images.sh"
  say "starting the Kubernetes cluster"
  kube_up=$(test_kube up)
  eval "$(tail -n 1 <<< "$kube_up")"
  export KUBECONFIG
  # After the cluster: it listens on the veth's host end, for the pods.
  TIDEPOOL_PG_FOR_NODE=1 test_stack up postgres
  say "starting PostgreSQL 17 from images/postgresql on port $TIDEPOOL_TEST_PG17_PORT"
  rm -rf "$TEST17_STATE" "$TEST17_ROOTFS"
  "$REPO_ROOT/scripts/images.sh" rootfs postgresql "$TEST17_ROOTFS"
  mkdir -p "$TEST17_STATE"
  cp -a "$TEST_STATE/secrets" "$TEST17_STATE/"
  test_stack17 up postgres
  export TIDEPOOL_TEST_STATE_DIR=$TEST_STATE TIDEPOOL_TEST_PG_PORT TIDEPOOL_TEST_PG17_PORT TIDEPOOL_RUN_AS
  export TIDEPOOL_NODE_NETNS TIDEPOOL_NODE_HOST_IP TIDEPOOL_NODE_IP TIDEPOOL_POD_CIDR TIDEPOOL_SERVICE_CIDR
  # tidepool-loadgen and tidepool (enqueue) for the tests on the real node.
  export TIDEPOOL_TEST_BIN_DIR=$CARGO_TARGET_DIR/release
}

# Every test: all but the cluster-wide ones at once, then those alone (an
# operator for the whole cluster would reconcile the other tests'
# Tidepools; they are #[ignore]d for a plain `cargo test`). Arguments go to
# cargo (e.g. --no-fail-fast), TIDEPOOL_TEST_ARGS to the test harness.
# Fails when either part does; the second runs in any case.
run_tests() {
  local status=0
  # shellcheck disable=SC2086 # TIDEPOOL_TEST_ARGS is a list of arguments
  cargo test --workspace "$@" -- ${TIDEPOOL_TEST_ARGS:-} || status=$?
  # shellcheck disable=SC2086
  # --workspace, as above: the same features, so nothing is built again.
  cargo test --workspace --test cluster_wide "$@" -- --ignored ${TIDEPOOL_TEST_ARGS:-} || status=$?
  # The queue, its schedules, its migrations and the worker again, on
  # PostgreSQL 17: the SQL whose plans and locks could differ between
  # versions is theirs (the web's and the pooler's tests do not depend on
  # the server's version).
  local version
  version=$(PGPASSWORD=$(cat "$TEST_STATE/secrets/postgres.password") psql -X -At -h 127.0.0.1 \
    -p "$TIDEPOOL_TEST_PG17_PORT" -U postgres -d postgres -c 'SHOW server_version_num') || version=0
  if (( version / 10000 == 17 )); then
    # shellcheck disable=SC2086
    TIDEPOOL_TEST_PG_PORT=$TIDEPOOL_TEST_PG17_PORT \
      cargo test --workspace --test queue --test periodic --test workflow --test migrate --test worker "$@" -- ${TIDEPOOL_TEST_ARGS:-} || status=$?
  else
    say "PostgreSQL 17 is not on port $TIDEPOOL_TEST_PG17_PORT (server_version_num: $version)"
    status=1
  fi
  return "$status"
}
