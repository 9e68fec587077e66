#!/usr/bin/env bash
# Every test: formatting, lints, unit tests, and the integration tests
# against a real PostgreSQL and real PgBouncers on loopback, and against a
# real Kubernetes cluster built from upstream modules, with a real node
# (the services are described in scripts/test-env.sh; they are stopped at
# the end, pass or fail, and after a pass the host is checked to be as it
# was before they started, as a machine that never ran the project has it).
#
# The Go-built tools and the images' Debian bases (network and one core
# most of the time) are made in the background while the Rust builds run;
# each phase's time is printed at the end (docs/benchmarks.md, "make test,
# cold and warm").
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$REPO_ROOT/scripts/test-env.sh"
cd "$REPO_ROOT"

run_started=$SECONDS
phase_name=
phase_started=$SECONDS
timings=()
# Ends the phase under way (if any) and starts phase $1.
phase() {
  [ -z "$phase_name" ] || timings+=("$(printf '%-44s %5d s' "$phase_name" $(( SECONDS - phase_started )))")
  phase_name=$1
  phase_started=$SECONDS
  [ -z "$phase_name" ] || say "$phase_name"
}
print_timings() {
  phase ""
  say "phases (total $(( SECONDS - run_started )) s):"
  printf '    %s\n' "${timings[@]}" >&2
}

# What the run may change on the host (the real node, the image builds),
# recorded before anything runs: nothing of an earlier run is left up, and
# the host is made as a fresh machine's, so the check at the end holds for
# a first run too. Compared with the same after `kube.sh down`.
test_env_down
test_kube freshen-host
host_before=$(test_kube host-state)

# The tools' cached builds print nothing; a first build says what it builds.
mkdir -p "$TIDEPOOL_STATE_DIR"
tools_log=$TIDEPOOL_STATE_DIR/test-tools.log
tools_seconds=$TIDEPOOL_STATE_DIR/test-tools.seconds
rm -f "$tools_seconds"
say "building the Kubernetes tools and the image bases in the background (cached per version; log: $tools_log)"
# In a session of its own, so that a failure here stops all of it; it
# writes how long it took when it is done.
setsid bash -c '"$1/scripts/kube-build.sh" >/dev/null && "$1/scripts/images.sh" bases && echo "$SECONDS" > "$2"' \
  _ "$REPO_ROOT" "$tools_seconds" > "$tools_log" 2>&1 < /dev/null &
tools_pid=$!
stop_tools() { kill -TERM -- "-$tools_pid" 2>/dev/null || true; wait "$tools_pid" 2>/dev/null || true; }
trap stop_tools EXIT

phase "cargo fmt --check"
cargo fmt --all --check
phase "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
phase "cargo doc (the runtime's public API: no broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc -p tidepool -p tidepool-contract --no-deps --quiet
phase "cargo build (debug)"
cargo build --workspace --bins --quiet
# The images carry the release binaries.
phase "cargo build --release"
cargo build --release --workspace --bins --quiet

phase "waiting for the tools and bases"
if ! wait "$tools_pid"; then
  cat "$tools_log" >&2
  die "building the Kubernetes tools or the image bases failed (above, and in $tools_log)"
fi
timings+=("$(printf '%-44s %5d s' "(beside them: Go tools and image bases)" "$(cat "$tools_seconds")")")
trap - EXIT

trap test_env_down EXIT
phase "starting the test services (images, cluster, PostgreSQL)"
test_env_up

phase "cargo test"
status=0
run_tests || status=$?

phase "stopping the test services"
trap - EXIT
test_env_down
print_timings
[ "$status" -eq 0 ] || die "the tests failed (above)"
say "checking that the host is as it was"
host_after=$(test_kube host-state)
if [ "$host_before" != "$host_after" ]; then
  diff <(echo "$host_before") <(echo "$host_after") >&2 || true
  die "make kube-down left the host changed (< before the cluster started, > after it stopped)"
fi
say "the host is as it was: $(wc -l <<< "$host_after") facts compared"
