#!/usr/bin/env bash
# Every test: formatting, lints, unit tests, and the integration tests
# against a real PostgreSQL and real PgBouncers on loopback, and against a
# real Kubernetes cluster built from upstream modules, with a real node
# (the services are described in scripts/test-env.sh; they are stopped at
# the end, pass or fail, and after a pass the host is checked to be as it
# was before they started).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$REPO_ROOT/scripts/test-env.sh"
cd "$REPO_ROOT"

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
say "building"
cargo build --workspace --bins --quiet
# The images carry the release binaries.
cargo build --release --workspace --bins --quiet

trap test_env_down EXIT
test_env_down
# What the real node may change on the host, before it starts: checked
# against the same after `kube.sh down` below.
host_before=$(TIDEPOOL_STATE_DIR=$TEST_STATE "$REPO_ROOT/scripts/kube.sh" host-state)
test_env_up

say "cargo test"
run_tests

say "stopping the test services; checking that the host is as it was"
trap - EXIT
test_env_down
host_after=$(TIDEPOOL_STATE_DIR=$TEST_STATE "$REPO_ROOT/scripts/kube.sh" host-state)
if [ "$host_before" != "$host_after" ]; then
  diff <(echo "$host_before") <(echo "$host_after") >&2 || true
  die "make kube-down left the host changed (< before the cluster started, > after it stopped)"
fi
say "the host is as it was: $(wc -l <<< "$host_after") facts compared"
